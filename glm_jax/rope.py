"""Rotary position embedding as GLM-130B uses it (glm130b.md §2.4, §10 items 1-3).

Rotate-half (GPT-NeoX) convention: dim i pairs with dim i + d/2, the angle table is concat(freqs, freqs), and rows
of the cos/sin tables are gathered by position id (positions need not be contiguous: a [MASK] span repeats the
mask's position).

Two table precisions:
- 'fp32': inv_freq, positions and their product in fp32 (SAT 0.4.x).
- 'fp16_chain': the SAT 0.2.x chain that GLM-130B's published checkpoint and numbers used: fp16 inv_freq times
  fp16 positions, the product rounded to fp16, cos/sin of that fp16 angle rounded to fp16. The values are stored
  in fp32 here (every fp16 value is exact in fp32), and cast to the compute dtype where they are applied.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

BASE = 10000.0


@functools.lru_cache(maxsize=16)
def rope_angles(num_positions: int, dim: int, precision: str) -> np.ndarray:
  """Angle table [num_positions, dim] (fp32 values), concat(freqs, freqs) along the last axis."""
  # inv_freq is computed in fp32 in both SAT versions; SAT 0.2 then casts it to fp16.
  inv_freq = (1.0 / (np.float32(BASE) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  inv_freq = inv_freq.astype(np.float32)
  if precision == 'fp32':
    t = np.arange(num_positions, dtype=np.float32)
    freqs = np.outer(t, inv_freq).astype(np.float32)
  elif precision == 'fp16_chain':
    inv16 = inv_freq.astype(np.float16)
    t16 = np.arange(num_positions, dtype=np.float32).astype(np.float16)  # round-to-nearest-even above 2048
    # The product of two fp16 values is exact in fp32, so one rounding to fp16 is the correctly rounded product.
    freqs = (t16.astype(np.float32)[:, None] * inv16.astype(np.float32)[None, :]).astype(np.float16)
  else:
    raise ValueError(f"config.model.rope_precision must be 'fp32' or 'fp16_chain', got {precision!r}")
  return np.concatenate([freqs, freqs], axis=-1)


@functools.lru_cache(maxsize=16)
def rope_table(num_positions: int, dim: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each [num_positions, dim] fp32 numpy, in the given precision."""
  angles = rope_angles(num_positions, dim, precision)
  if precision == 'fp16_chain':
    # cos/sin of the fp16 angle, evaluated in fp32 and rounded to fp16 (as torch does for half tensors on CPU).
    a32 = angles.astype(np.float32)
    return (np.cos(a32).astype(np.float16).astype(np.float32), np.sin(a32).astype(np.float16).astype(np.float32))
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


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
