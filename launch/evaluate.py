"""Evaluate a model on GLM-130B-style YAML tasks (glm130b.md §7), writing results as each task finishes.

    python launch/evaluate.py --checkpoint runs/tiny --data eval_data --out results.json eval/tasks/
    python launch/evaluate.py --checkpoint /ckpt/glm-130b-int4 --data eval_data --out r.json eval/tasks/mmlu.yaml
    python launch/evaluate.py --checkpoint runs/tiny --quantization-bit-width 4 --data eval_data --out r4.json tasks/

Tasks are YAML files, or folders searched recursively for them (eval/tasks/ holds the shipped ones; `python
launch/prepare_eval_data.py` writes their data folder). Every task file and every example is checked before the
first task runs; a bad one is an error naming the file and the field or line. The results (JSON: per task, group and
file, the metrics, and each example's prediction) are rewritten as each task finishes; rerunning with the same --out
skips the tasks already there. A table of every group's best prompt, median and size-weighted average is printed.

Mesh: --config.mesh.<axis>=N (e.g. --config.mesh.data=4 --config.mesh.tensor=2): the weights split by the
checkpoint config's axis rules, each batch of examples over the data axes. Without it: the default device.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A glm-jax model checkpoint or training run directory.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, "SentencePiece .model file (default: the checkpoint's own).")
_DATA = flags.DEFINE_string('data', None, 'The data folder; each task\'s `path` is relative to it.')
_OUT = flags.DEFINE_string('out', None, 'The results file (JSON); an existing one is resumed.')
_QUANTIZATION = flags.DEFINE_enum('quantization-bit-width', None, ['4', '8'], 'Quantize the four matrices of every '
                                  'layer to INT4 or INT8 while loading (quantize/).')
_BATCH_TOKENS = flags.DEFINE_integer('batch-tokens', 8192, 'Tokens per scoring call (padded): a batch of sequences '
                                     'of one length bucket.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar per file.')
_MESH = cli.define_mesh_flags('evaluate')


def main(argv):
  tasks = argv[1:]
  for flag in (_CHECKPOINT, _DATA, _OUT):
    if not flag.value:
      raise cli.UsageError(f'--{flag.name} is required')
  if not tasks:
    raise cli.UsageError('name the task files or folders to run (e.g. eval/tasks/)')
  if _BATCH_TOKENS.value < 1:
    raise cli.UsageError(f'--batch-tokens must be positive, not {_BATCH_TOKENS.value}')
  from eval.evaluator import evaluate, plan
  plan(tasks, _DATA.value)  # every task file, data folder and example, before the model is loaded
  from glm_jax.generation import api
  _, config = api.load_tokenizer_and_config(_CHECKPOINT.value, _TOKENIZER.value)
  mesh = api.decode_mesh(config, {axis: flag.value for axis, flag in _MESH.items()})
  generator = api.Generator.load(_CHECKPOINT.value, _TOKENIZER.value, mesh=mesh,
                                 quantization_bit_width=int(_QUANTIZATION.value) if _QUANTIZATION.value else None)
  evaluate(tasks, _DATA.value, generator, _OUT.value, max_batch_tokens=_BATCH_TOKENS.value,
           progress=_PROGRESS.value)
  print(f'results in {_OUT.value}')
  return 0


if __name__ == '__main__':
  cli.run(main)
