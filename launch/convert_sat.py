"""Convert checkpoints between SwissArmyTransformer (PyTorch, GLM-130B's format) and glm-jax.

    # SAT -> glm-jax (e.g. the released GLM-130B: a folder with `latest` and 49300/mp_rank_0X_model_states.pt)
    python launch/convert_sat.py --from-sat /ckpt/glm-130b-sat --config configs/glm_130b.py --out /ckpt/glm-130b-jax
    # glm-jax (a converted model or a training run directory) -> SAT, split over 2 tensor-parallel ranks
    python launch/convert_sat.py --to-sat runs/tiny --out /tmp/tiny-sat --tp 2

Tensor-parallel ranks are merged GLU-aware (glm130b.md §8.2) and loading is strict: a missing or unexpected key
is an error naming it. The output directory must not exist; it appears only once complete.

Quantized checkpoints (GLM-130B's INT8 / INT4 release layout: `weight` int8 + `weight_scale`, glm130b.md §6) convert
exactly in both directions: a SAT checkpoint quantized for T ranks becomes a glm-jax checkpoint in the format
'int4-tp<T>' (one scale per row and rank for the row-parallel layers), and a quantized glm-jax checkpoint exports at
the tensor-parallel degree its scales were computed for (--requantize to quantize each new shard again instead).
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
_DTYPE = flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32', 'bfloat16'], 'With --to-sat: tensor dtype '
                           '(of the floating-point tensors; quantized weights stay int8, their scales float16).')
_REQUANTIZE = flags.DEFINE_bool('requantize', False, 'With --to-sat of a quantized checkpoint whose scale groups do '
                                'not match --tp: dequantize and quantize each target shard again (not exact).')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if bool(_FROM_SAT.value) == bool(_TO_SAT.value):
    raise cli.UsageError('give exactly one of --from-sat or --to-sat')
  if not _OUT.value:
    raise cli.UsageError('--out is required')
  from glm_jax import model_io
  from glm_jax.sat_convert import from_sat_state_dict, merge_tensor_parallel, to_sat_state_dict
  if _FROM_SAT.value:
    config = _CONFIG.value
    if config is None:
      raise cli.UsageError('--from-sat needs --config (the model the checkpoint holds)')
    shards = model_io.read_sat_shards(_FROM_SAT.value)
    from quantize import sat as quantized_sat
    if quantized_sat.is_quantized_sat(shards):
      params, weight_format = quantized_sat.from_sat_quantized(shards, config.model)
    else:
      params, weight_format = from_sat_state_dict(merge_tensor_parallel(shards), config.model), 'in_out'
    out = model_io.save_model(_OUT.value, params, config, weight_format=weight_format)
    print(f'wrote glm-jax checkpoint {out} (weights {weight_format})')
  else:
    params, config = model_io.load_model(_TO_SAT.value)
    if config.model.num_attention_heads % _TP.value or config.model.inner_hidden_size % _TP.value:
      raise cli.UsageError(f'--tp {_TP.value} does not divide the heads ({config.model.num_attention_heads}) and '
                           f'the GeGLU width ({config.model.inner_hidden_size})')
    import quantize
    if quantize.is_quantized(config.weight_format):
      from quantize import sat as quantized_sat
      shards = quantized_sat.to_sat_quantized(params, config.model, config.weight_format, _TP.value,
                                              requantize=_REQUANTIZE.value)
      out = model_io.write_sat_shards(_OUT.value, shards, dtype=_DTYPE.value)
    else:
      state_dict = to_sat_state_dict(params, config.model, weight_format=config.weight_format)
      out = model_io.write_sat_checkpoint(_OUT.value, state_dict, tp=_TP.value, dtype=_DTYPE.value)
    print(f'wrote SAT checkpoint {out} ({_TP.value} rank(s), {config.weight_format} weights, {_DTYPE.value})')
  return 0


if __name__ == '__main__':
  cli.run(main)
