"""Rotary position embedding as GLM-130B uses it (glm130b.md §2.4, §10 items 1-3).

Rotate-half (GPT-NeoX) convention: dim i pairs with dim i + d/2, the angle table is concat(freqs, freqs), and rows
of the cos/sin tables are gathered by position id (positions need not be contiguous: a [MASK] span repeats the
mask's position).

Two table precisions:
- 'fp32': inv_freq, positions and their product in fp32 (SAT 0.4.x).
- 'fp16_chain': the SAT 0.2.x chain that GLM-130B's published checkpoint and numbers used: fp16 inv_freq times
  fp16 positions, the product rounded to fp16, cos/sin of that fp16 angle rounded to fp16. The values are stored
  in fp32 here (every fp16 value is exact in fp32), and cast to the compute dtype where they are applied.

The tables are the same bits on every machine. The published chains call float32 ``pow``, ``cos`` and ``sin``,
which numpy and torch dispatch to SIMD code chosen by the CPU's features (their results differ by an ulp or two
from host to host). Here every transcendental step is correctly rounded instead: ``inv_freq`` is computed in
decimal arithmetic and rounded once to fp32; an angle is the fp32 product (one IEEE rounding); cos/sin are evaluated
in float64 and rounded once to fp32, and the few values whose float64 result lies too near a rounding boundary for
float64 to decide are recomputed in decimal. The fp16 chain then applies the published fp16 roundings to these.
"""

from __future__ import annotations

import decimal
import functools

import jax.numpy as jnp
import numpy as np

BASE = 10000

# Digits of pi (a constant), enough for range reduction of angles up to ~1e6 rad at 50 significant digits.
_PI = decimal.Decimal('3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863')
_DECIMAL = decimal.Context(prec=60)
# A float64 cos/sin result within this relative distance of an fp32 rounding boundary is recomputed in decimal:
# libm and numpy's SIMD float64 paths are accurate to a few float64 ulps (2^-52), far inside 2^-44.
_HARD_CASE_MARGIN = 2.0 ** -44


def _round_to_f32(d: decimal.Decimal) -> np.float32:
  """The float32 nearest to the decimal d (no double rounding through float64)."""
  r = np.float32(float(d))
  candidates = (np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf)))
  return min(candidates, key=lambda c: abs(decimal.Decimal(float(c)) - d))


def _cos_sin_decimal(x: float) -> tuple[decimal.Decimal, decimal.Decimal]:
  """cos(x) and sin(x) to about 50 significant digits (range reduction by pi/2, then Taylor series)."""
  with decimal.localcontext(_DECIMAL):
    half_pi = _PI / 2
    xd = decimal.Decimal(x)  # exact
    k = int((xd / half_pi).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
    r = xd - k * half_pi  # |r| <= pi/4
    c = s = decimal.Decimal(0)
    term, n = decimal.Decimal(1), 0  # r^n / n!
    while term and abs(term) > decimal.Decimal('1e-62'):
      if n % 4 == 0:
        c += term
      elif n % 4 == 1:
        s += term
      elif n % 4 == 2:
        c -= term
      else:
        s -= term
      n += 1
      term = term * r / n
    return ((c, -s, -c, s)[k % 4], (s, c, -s, -c)[k % 4])


def _near_f32_boundary(y: np.ndarray, margin: float) -> np.ndarray:
  """True where the float64 y lies within margin*|y| of a point half-way between two float32 values."""
  r = y.astype(np.float32)
  lo = np.nextafter(r, np.float32(-np.inf)).astype(np.float64)
  hi = np.nextafter(r, np.float32(np.inf)).astype(np.float64)
  r64 = r.astype(np.float64)
  dist = np.minimum(np.abs(y - (r64 + lo) / 2), np.abs(y - (r64 + hi) / 2))
  return dist <= margin * np.abs(y)


def cos_sin_f32(angles: np.ndarray, margin: float = _HARD_CASE_MARGIN) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin of float32 angles, each correctly rounded to float32 (the same bits on every machine)."""
  a = np.asarray(angles, np.float32)
  out = []
  for which, fn in enumerate((np.cos, np.sin)):
    y = fn(a.astype(np.float64))
    res = y.astype(np.float32)
    for idx in zip(*np.nonzero(_near_f32_boundary(y, margin))):
      res[idx] = _round_to_f32(_cos_sin_decimal(float(a[idx]))[which])
    out.append(res)
  return out[0], out[1]


@functools.lru_cache(maxsize=16)
def inv_freq_f32(dim: int) -> np.ndarray:
  """1 / BASE^(2j/dim), j = 0 .. dim/2 - 1, each correctly rounded to float32."""
  with decimal.localcontext(_DECIMAL):
    exact = [decimal.Decimal(BASE) ** (decimal.Decimal(-j) / decimal.Decimal(dim)) for j in range(0, dim, 2)]
  return np.array([_round_to_f32(d) for d in exact], np.float32)


@functools.lru_cache(maxsize=16)
def rope_angles(num_positions: int, dim: int, precision: str) -> np.ndarray:
  """Angle table [num_positions, dim] (fp32 values), concat(freqs, freqs) along the last axis."""
  return np.concatenate([_freqs(num_positions, dim, precision)] * 2, axis=-1)


def _freqs(num_positions: int, dim: int, precision: str) -> np.ndarray:
  inv_freq = inv_freq_f32(dim)  # fp32 in both SAT versions; SAT 0.2 then casts it to fp16
  t = np.arange(num_positions, dtype=np.float32)
  if precision == 'fp32':
    return (t.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]).astype(np.float32)  # exact, then
    # one rounding: the IEEE fp32 product
  if precision == 'fp16_chain':
    inv16 = inv_freq.astype(np.float16)
    t16 = t.astype(np.float16)  # round-to-nearest-even above 2048
    # The product of two fp16 values is exact in fp32, so one rounding to fp16 is the correctly rounded product.
    return (t16.astype(np.float32)[:, None] * inv16.astype(np.float32)[None, :]).astype(np.float16).astype(np.float32)
  raise ValueError(f"config.model.rope_precision must be 'fp32' or 'fp16_chain', got {precision!r}")


@functools.lru_cache(maxsize=16)
def rope_table(num_positions: int, dim: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each [num_positions, dim] fp32 numpy, in the given precision."""
  cos, sin = cos_sin_f32(_freqs(num_positions, dim, precision))
  if precision == 'fp16_chain':
    # cos/sin of the fp16 angle in fp32, rounded to fp16 (as torch does for half tensors on CPU).
    cos, sin = (v.astype(np.float16).astype(np.float32) for v in (cos, sin))
  return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BxSxNxH, cos_BxSxH, sin_BxSxH):
  """x*cos + rotate_half(x)*sin, elementwise in x's dtype; cos/sin broadcast over heads."""
  cos = cos_BxSxH[:, :, None, :].astype(x_BxSxNxH.dtype)
  sin = sin_BxSxH[:, :, None, :].astype(x_BxSxNxH.dtype)
  return x_BxSxNxH * cos + rotate_half(x_BxSxNxH) * sin


def gather_rope(position_ids, head_dim: int, max_positions: int, precision: str, position_encoding_2d: bool):
  """cos/sin rows for each token: a list of (cos, sin) pairs, one per rotated part of the head.

  1-D: one part covering the whole head, gathered by position_ids [b, s].
  2-D: two halves of the head, the first gathered by position_ids[:, 0], the second by position_ids[:, 1].
  """
  if position_encoding_2d:
    if position_ids.ndim != 3 or position_ids.shape[1] != 2:
      raise ValueError(f'2-D rotary positions need position_ids [b, 2, s], got shape {position_ids.shape}')
    cos, sin = rope_table(max_positions, head_dim // 2, precision)
    return [(jnp.take(cos, position_ids[:, i], axis=0), jnp.take(sin, position_ids[:, i], axis=0)) for i in (0, 1)]
  if position_ids.ndim != 2:
    raise ValueError(f'1-D rotary positions need position_ids [b, s], got shape {position_ids.shape}')
  cos, sin = rope_table(max_positions, head_dim, precision)
  return [(jnp.take(cos, position_ids, axis=0), jnp.take(sin, position_ids, axis=0))]


def apply_rope_parts(x_BxSxNxH, parts):
  """Applies gather_rope's parts: the head is split into len(parts) equal pieces, each rotated on its own."""
  if len(parts) == 1:
    return apply_rope(x_BxSxNxH, *parts[0])
  pieces = jnp.split(x_BxSxNxH, len(parts), axis=-1)
  return jnp.concatenate([apply_rope(p, c, s) for p, (c, s) in zip(pieces, parts)], axis=-1)
