"""Convert checkpoints between SwissArmyTransformer (PyTorch, GLM-130B's format) and glm-jax.

    # SAT -> glm-jax (e.g. the released GLM-130B: a folder with `latest` and 49300/mp_rank_0X_model_states.pt)
    python launch/convert_sat.py --from-sat /ckpt/glm-130b-sat --config configs/glm_130b.py --out /ckpt/glm-130b-jax
    # glm-jax (a converted model or a training run directory) -> SAT, split over 2 tensor-parallel ranks
    python launch/convert_sat.py --to-sat runs/tiny --out /tmp/tiny-sat --tp 2

Tensor-parallel ranks are merged GLU-aware (glm130b.md §8.2) and loading is strict: a missing or unexpected key
is an error naming it. The output directory must not exist; it appears only once complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'With --from-sat: the config whose config.model '
                                          'describes the SAT model, e.g. configs/glm_130b.py.', lock_config=False)
_FROM_SAT = flags.DEFINE_string('from-sat', None, 'A SAT checkpoint: a folder with `latest`, an iteration folder '
                                'of mp_rank_XX_model_states.pt files, or one .pt file.')
_TO_SAT = flags.DEFINE_string('to-sat', None, 'A glm-jax model checkpoint or training run directory to export.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist).')
_TP = flags.DEFINE_integer('tp', 1, 'With --to-sat: tensor-parallel ranks to split into.')
_DTYPE = flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32', 'bfloat16'], 'With --to-sat: tensor dtype.')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if bool(_FROM_SAT.value) == bool(_TO_SAT.value):
    raise cli.UsageError('give exactly one of --from-sat or --to-sat')
  if not _OUT.value:
    raise cli.UsageError('--out is required')
  from glm_jax import model_io
  from glm_jax.sat_convert import from_sat_state_dict, to_sat_state_dict
  if _FROM_SAT.value:
    config = _CONFIG.value
    if config is None:
      raise cli.UsageError('--from-sat needs --config (the model the checkpoint holds)')
    sd = model_io.read_sat_checkpoint(_FROM_SAT.value)
    params = from_sat_state_dict(sd, config.model)
    out = model_io.save_model(_OUT.value, params, config)
    print(f'wrote glm-jax checkpoint {out}')
  else:
    params, config = model_io.load_model(_TO_SAT.value)
    if config.model.num_attention_heads % _TP.value or config.model.inner_hidden_size % _TP.value:
      raise cli.UsageError(f'--tp {_TP.value} does not divide the heads ({config.model.num_attention_heads}) and '
                           f'the GeGLU width ({config.model.inner_hidden_size})')
    state_dict = to_sat_state_dict(params, config.model, weight_format=config.weight_format)
    out = model_io.write_sat_checkpoint(_OUT.value, state_dict, tp=_TP.value, dtype=_DTYPE.value)
    print(f'wrote SAT checkpoint {out} ({_TP.value} rank(s), {_DTYPE.value})')
  return 0


if __name__ == '__main__':
  cli.run(main)
