"""GLM-130B's weight-only quantization format, on numpy arrays (glm130b.md §6).

A weight W [out, in] in float16 is stored as
- `scale` float16: absmax / (2^(bits-1) - 1) of each output row, computed on the fp16 weight (/127 for INT8, /7 for
  INT4), one per row, or one per row and group of `group_size` input columns: [out] or [out, in / group_size];
- `q` int8: the fp16 quotient W / scale rounded half to even, in [-127, 127] or [-7, 7]. INT4 values are packed two
  per byte, the even column in the high nibble: byte i of a row is (q[2i] << 4) | (q[2i+1] & 0xF), shape [out, in/2].
Dequantization is half(q) * scale, an fp16 multiply (rounded), as the release's extraction kernels compute it.

A release checkpoint split T ways for tensor parallelism carries, for its row-parallel layers, one scale per row per
shard: that is groups of in/T columns here, so importing it is exact, not a requantization.

Two places differ from the release's code, in cases it gets wrong: an all-zero row (scale 0) stores q = 0 where the
release divides 0 by 0, and a quotient that rounds past the range (possible only for subnormal scales) is clipped
where the release's int8 cast would wrap.
"""

from __future__ import annotations

import numpy as np

BITS = (4, 8)


def qmax(bits: int) -> int:
  """The largest stored magnitude: 127 for INT8, 7 for INT4."""
  if bits not in BITS:
    raise ValueError(f'quantization bit width must be 4 or 8, not {bits!r}')
  return 2 ** (bits - 1) - 1


def num_groups(in_features: int, group_size: int | None) -> int:
  """How many scales each row carries (1 without groups); ValueError unless group_size divides in_features."""
  if group_size is None:
    return 1
  if group_size <= 0 or in_features % group_size:
    raise ValueError(f'group size {group_size} does not divide the {in_features} input columns')
  return in_features // group_size


def quantize_weight(w, bits: int, group_size: int | None = None):
  """W [out, in] (float16, or any float array, which is first rounded to float16) -> (q, scale) in the release's
  layout: q int8 [out, in] for INT8 or [out, in/2] packed for INT4; scale float16 [out], or [out, in/group_size]
  with groups."""
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'quantize_weight takes a matrix [out, in], not shape {w.shape}')
  out_features, in_features = w.shape
  qmax(bits)  # validates bits
  if bits == 4 and in_features % 2:
    raise ValueError(f'INT4 packs two input columns per byte: {in_features} columns is odd')
  groups = num_groups(in_features, group_size)
  w16_OxGxK = w.astype(np.float16).reshape(out_features, groups, in_features // groups)
  scale_OxG = (np.abs(w16_OxGxK).max(-1) / np.float16(qmax(bits))).astype(np.float16)
  safe_OxG = np.where(scale_OxG == 0, np.float16(1), scale_OxG)
  q_OxGxK = np.rint(w16_OxGxK / safe_OxG[..., None])  # float16 divide, then round half to even
  q = np.clip(q_OxGxK, -qmax(bits), qmax(bits)).astype(np.int8).reshape(out_features, in_features)
  if bits == 4:
    q = pack_int4(q)
  return q, (scale_OxG[:, 0] if group_size is None else scale_OxG)


def dequantize_weight(q, scale, bits: int):
  """The float16 matrix [out, in] that (q, scale) stands for: half(q) * scale, rounded to float16."""
  qmax(bits)  # validates bits
  q, scale = np.asarray(q), np.asarray(scale)
  values = unpack_int4(q) if bits == 4 else q
  out_features, in_features = values.shape
  scale_OxG = scale.reshape(out_features, -1).astype(np.float16)
  groups = scale_OxG.shape[1]
  if in_features % groups:
    raise ValueError(f'{groups} scale groups do not divide the {in_features} input columns')
  w_OxGxK = values.astype(np.float16).reshape(out_features, groups, -1) * scale_OxG[..., None]
  return w_OxGxK.reshape(out_features, in_features)


def pack_int4(q):
  """int8 values in [-8, 7], [out, in] -> [out, in/2] int8, the even column in the high nibble."""
  q = np.asarray(q, np.int8)
  return ((q[:, 0::2].astype(np.uint8) << 4) | (q[:, 1::2].astype(np.uint8) & 0xF)).view(np.int8)


def unpack_int4(packed):
  """The inverse of `pack_int4`: the high nibble (sign-extended) is the even column."""
  packed = np.asarray(packed, np.int8)
  hi = packed >> 4                                       # arithmetic shift: sign-extended
  lo = (packed.astype(np.uint8) << 4).view(np.int8) >> 4
  return np.stack([hi, lo], axis=-1).reshape(packed.shape[0], -1)
