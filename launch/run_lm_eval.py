"""lm-evaluation-harness's command line with glm-jax registered as the model `glm-jax` (eval/lm_eval_adapter.py).

    python launch/run_lm_eval.py --model_args checkpoint=runs/tiny --tasks lambada_openai --output_path out/
    python launch/run_lm_eval.py --model_args checkpoint=runs/tiny,use_gmask=true --tasks my_task \
        --include_path my_tasks/ --output_path out/

Every flag is lm-eval's own (`--help` lists them; lm-eval 0.4.13); `--model glm-jax` is implied. model_args:
checkpoint, tokenizer, quantization_bit_width (4 or 8), use_gmask, batch_tokens, max_gen_toks. Offline use: local
task files (`dataset_path: json`), and HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1. lm-eval's own flag errors follow
its style; an error of the model (a checkpoint that does not load, a bad model_args value) is one line, exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
  prog = os.path.basename(sys.argv[0])
  try:
    import eval.lm_eval_adapter  # noqa: F401  registers glm-jax
    from lm_eval.__main__ import cli_evaluate
  except ImportError as e:
    print(f"{prog}: error: lm-evaluation-harness is not installed ({e}); pip install -e '.[lm_eval]'", file=sys.stderr)
    return 2
  if len(sys.argv) > 1 and not any(a == '--model' or a.startswith('--model=') for a in sys.argv):
    sys.argv[1:1] = ['--model', 'glm-jax']
  try:
    cli_evaluate()
  except (ValueError, OSError) as e:
    print(f'{prog}: error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
