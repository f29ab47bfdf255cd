"""Quantize a glm-jax checkpoint to GLM-130B's INT8 / INT4 weight-only format, offline.

    python launch/quantize.py --checkpoint runs/tiny --bits 4 --out runs/tiny-int4
    python launch/quantize.py --checkpoint /ckpt/glm-130b-jax --bits 4 --group-size 128 --out /ckpt/glm-130b-int4
    python launch/generate.py --checkpoint runs/tiny-int4          # decodes in INT4; the float weights are not read

The four matrices of every layer are quantized (per output row, absmax / 7 or / 127 in fp16, glm130b.md §6;
--group-size gives one scale per row and group of that many input columns); the embedding, LayerNorms and biases keep
their dtype. The float weights are read one layer at a time. The output directory must not exist; it appears only
once complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A glm-jax model checkpoint or training run directory.')
_BITS = flags.DEFINE_enum('bits', None, ['4', '8'], 'Bits per weight: 4 or 8.')
_GROUP_SIZE = flags.DEFINE_integer('group-size', None, 'One scale per output row and group of this many input '
                                   'columns (e.g. 128); default: one scale per row, as GLM-130B.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist).')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  for flag in (_CHECKPOINT, _BITS, _OUT):
    if flag.value is None:
      raise cli.UsageError(f'--{flag.name} is required')
  if _GROUP_SIZE.value is not None and _GROUP_SIZE.value <= 0:
    raise cli.UsageError(f'--group-size must be positive, not {_GROUP_SIZE.value}')
  if not Path(_CHECKPOINT.value).is_dir():
    raise cli.UsageError(f'--checkpoint {_CHECKPOINT.value}: no such directory')
  from quantize.checkpoint import quantize_checkpoint
  out, name = quantize_checkpoint(_CHECKPOINT.value, _OUT.value, int(_BITS.value), group_size=_GROUP_SIZE.value)
  print(f'wrote {name} checkpoint {out}')
  return 0


if __name__ == '__main__':
  cli.run(main)
