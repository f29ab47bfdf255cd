"""Convert checkpoints between SwissArmyTransformer (PyTorch, GLM-130B's format) and glm-jax.

    # SAT -> glm-jax (e.g. the released GLM-130B: a folder with `latest` and 49300/mp_rank_0X_model_states.pt)
    python launch/convert_sat.py --from-sat /ckpt/glm-130b-sat --config configs/glm_130b.py --out /ckpt/glm-130b-jax
    # glm-jax (a converted model or a training run directory) -> SAT, split over 2 tensor-parallel ranks
    python launch/convert_sat.py --to-sat runs/tiny --out /tmp/tiny-sat --tp 2
    # glm-jax -> safetensors (SAT's key names, merged): model-0000i-of-0000N.safetensors + model.safetensors.index.json
    python launch/convert_sat.py --to-safetensors runs/tiny --out /tmp/tiny-st --dtype bfloat16 --max-shard-size 2GB

Tensor-parallel ranks are merged GLU-aware (glm130b.md §8.2) and loading is strict: a missing or unexpected key
is an error naming it. The output directory must not exist; it appears only once complete.

Float checkpoints convert streamed (glm_jax/sat_stream.py): one tensor at a time, the SAT files memory-mapped and the
embedding in slices, so host memory stays near one layer's tensors whatever the model's size (GLM-130B on one host).

Quantized checkpoints (GLM-130B's INT8 / INT4 release layout: `weight` int8 + `weight_scale`, glm130b.md §6) convert
exactly in both directions: a SAT checkpoint quantized for T ranks becomes a glm-jax checkpoint in the format
'int4-tp<T>' (one scale per row and rank for the row-parallel layers), and a quantized glm-jax checkpoint exports at
the tensor-parallel degree its scales were computed for (--requantize to quantize each new shard again instead).
"""

from __future__ import annotations

import re
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
_TO_SAFETENSORS = flags.DEFINE_string('to-safetensors', None, 'A glm-jax model checkpoint or training run directory '
                                      '(float weights) to export as safetensors files.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist).')
_TP = flags.DEFINE_integer('tp', 1, 'With --to-sat: tensor-parallel ranks to split into.')
_DTYPE = flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32', 'bfloat16'], 'With --to-sat and '
                           '--to-safetensors: tensor dtype (of the floating-point tensors; quantized weights stay int8, '
                           'their scales float16).')
_MAX_SHARD_SIZE = flags.DEFINE_string('max-shard-size', '5GB', 'With --to-safetensors: the most bytes per file (e.g. '
                                      '5GB, 500MB, 2GiB, or a number of bytes); a larger tensor gets a file of its own.')
_REQUANTIZE = flags.DEFINE_bool('requantize', False, 'With --to-sat of a quantized checkpoint whose scale groups do '
                                'not match --tp: dequantize and quantize each target shard again (not exact).')


def byte_size(text: str) -> int:
  """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '123' -> 123 (UsageError otherwise)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*', text, re.IGNORECASE)
  if not m or float(m.group(1)) <= 0:
    raise cli.UsageError(f'--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes')
  unit = (m.group(2) or 'B').upper().rstrip('B') or 'B'
  scale = {'B': 1, 'K': 10 ** 3, 'M': 10 ** 6, 'G': 10 ** 9, 'T': 10 ** 12,
           'KI': 2 ** 10, 'MI': 2 ** 20, 'GI': 2 ** 30, 'TI': 2 ** 40}[unit]
  return int(float(m.group(1)) * scale)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if sum(bool(f.value) for f in (_FROM_SAT, _TO_SAT, _TO_SAFETENSORS)) != 1:
    raise cli.UsageError('give exactly one of --from-sat, --to-sat or --to-safetensors')
  if not _OUT.value:
    raise cli.UsageError('--out is required')
  import quantize
  from glm_jax import model_io, sat_stream
  from quantize import sat as quantized_sat
  if _FROM_SAT.value:
    config = _CONFIG.value
    if config is None:
      raise cli.UsageError('--from-sat needs --config (the model the checkpoint holds)')
    files = model_io.sat_rank_files(_FROM_SAT.value)
    if quantized_sat.is_quantized_sat([model_io.load_sat_file(files[0], mmap=True)]):
      shards = model_io.read_sat_shards(_FROM_SAT.value)
      params, weight_format = quantized_sat.from_sat_quantized(shards, config.model)
      out = model_io.save_model(_OUT.value, params, config, weight_format=weight_format)
    else:
      out, weight_format = sat_stream.import_sat(_FROM_SAT.value, config, _OUT.value), 'in_out'
    print(f'wrote glm-jax checkpoint {out} (weights {weight_format})')
    return 0
  source = _TO_SAT.value or _TO_SAFETENSORS.value
  config = model_io.read_config(source)
  quantized = quantize.is_quantized(config.weight_format)
  if _TO_SAFETENSORS.value:
    if quantized:
      raise cli.UsageError(f'{source}: weights {config.weight_format}: quantized checkpoints export with --to-sat')
    out = sat_stream.export_safetensors(source, _OUT.value, dtype=_DTYPE.value,
                                        max_shard_bytes=byte_size(_MAX_SHARD_SIZE.value))
    print(f'wrote safetensors {out} ({config.weight_format} weights, {_DTYPE.value})')
    return 0
  if config.model.num_attention_heads % _TP.value or config.model.inner_hidden_size % _TP.value:
    raise cli.UsageError(f'--tp {_TP.value} does not divide the heads ({config.model.num_attention_heads}) and '
                         f'the GeGLU width ({config.model.inner_hidden_size})')
  if quantized:
    params, config = model_io.load_model(source)
    shards = quantized_sat.to_sat_quantized(params, config.model, config.weight_format, _TP.value,
                                            requantize=_REQUANTIZE.value)
    out = model_io.write_sat_shards(_OUT.value, shards, dtype=_DTYPE.value)
  else:
    out = sat_stream.export_sat(source, _OUT.value, tp=_TP.value, dtype=_DTYPE.value)
  print(f'wrote SAT checkpoint {out} ({_TP.value} rank(s), {config.weight_format} weights, {_DTYPE.value})')
  return 0


if __name__ == '__main__':
  cli.run(main)
