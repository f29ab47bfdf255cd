"""Rotary tables (glm130b.md §2.4, §10 item 1).

What is guaranteed, and tested as such:
- our tables equal, bit for bit, the correctly rounded constructions, checked against mpmath at 150 bits;
- they are the same bits whatever SIMD code numpy picks on this CPU (a subprocess with numpy's dispatch off);
- against torch on this machine (the published chains call float32 pow/cos/sin, whose SIMD code, chosen by the
  CPU's features, is off by an ulp or two): inv_freq within 2 ulps, and each table entry within the error those
  ulps imply at its position, plus one ulp of torch's own cos/sin.
"""

import os
import subprocess
import sys
from decimal import Decimal

import mpmath
import numpy as np
import pytest
import torch

from glm_jax import rope

DIM, N = 128, 2048
mpmath.mp.prec = 150
F32_ULP_AT_1 = 2.0 ** -23


def _nearest_f32(x: mpmath.mpf) -> np.float32:
  """The float32 nearest to the mpmath value x, chosen by exact comparison (no rounding through float64)."""
  r = np.float32(float(x))
  candidates = (np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf)))
  return min(candidates, key=lambda c: abs(mpmath.mpf(float(c)) - x))


def _ulps(a, b):
  return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def _sample(rng, n_rows, n_cols, k):
  return rng.integers(0, n_rows, k), rng.integers(0, n_cols, k)


@pytest.mark.parametrize('dim', [128, 64, 32])
def test_inv_freq_is_correctly_rounded(dim):
  want = np.array([_nearest_f32(mpmath.mpf(10000) ** (-mpmath.mpf(j) / dim)) for j in range(0, dim, 2)])
  np.testing.assert_array_equal(rope.inv_freq_f32(dim), want)


def test_fp32_table_is_the_correctly_rounded_construction():
  inv = rope.inv_freq_f32(DIM)
  angles = rope.rope_angles(N, DIM, 'fp32')
  # Each angle is the IEEE float32 product of the position and the float32 inv_freq (one rounding).
  np.testing.assert_array_equal(angles[:, :DIM // 2], np.arange(N, dtype=np.float32)[:, None] * inv[None, :])
  np.testing.assert_array_equal(angles[:, DIM // 2:], angles[:, :DIM // 2])
  cos, sin = rope.rope_table(N, DIM, 'fp32')
  # cos/sin correctly rounded: every entry near a rounding boundary (where float64 alone could be wrong) and a
  # random sample of the rest, against mpmath.
  a = angles[:, :DIM // 2]
  near = rope._near_f32_boundary(np.cos(a.astype(np.float64)), 2.0 ** -36) | rope._near_f32_boundary(
      np.sin(a.astype(np.float64)), 2.0 ** -36)
  rows, cols = np.nonzero(near)
  r2, c2 = _sample(np.random.default_rng(0), N, DIM // 2, 1500)
  for i, j in zip(np.concatenate([rows, r2]), np.concatenate([cols, c2])):
    x = mpmath.mpf(float(a[i, j]))
    assert cos[i, j] == _nearest_f32(mpmath.cos(x)) and cos[i, j + DIM // 2] == cos[i, j], (i, j)
    assert sin[i, j] == _nearest_f32(mpmath.sin(x)) and sin[i, j + DIM // 2] == sin[i, j], (i, j)


def test_fp16_chain_is_the_correctly_rounded_construction():
  inv16 = rope.inv_freq_f32(DIM).astype(np.float16)
  t16 = np.arange(N).astype(np.float16)
  angles = rope.rope_angles(N, DIM, 'fp16_chain')[:, :DIM // 2]
  # fp16 x fp16 is exact in float64; one rounding to fp16.
  want = (t16.astype(np.float64)[:, None] * inv16.astype(np.float64)[None, :]).astype(np.float16)
  np.testing.assert_array_equal(angles, want.astype(np.float32))
  cos, sin = rope.rope_table(N, DIM, 'fp16_chain')
  for i, j in zip(*_sample(np.random.default_rng(1), N, DIM // 2, 1500)):
    x = mpmath.mpf(float(angles[i, j]))
    # the published chain: cos/sin in fp32 (here correctly rounded), then rounded to fp16
    assert cos[i, j] == np.float32(_nearest_f32(mpmath.cos(x)).astype(np.float16)), (i, j)
    assert sin[i, j] == np.float32(_nearest_f32(mpmath.sin(x)).astype(np.float16)), (i, j)


def test_decimal_fallback_agrees_where_float64_decides():
  """The decimal path (taken near rounding boundaries) gives the same bits as float64 wherever float64 decides:
  forcing thousands of entries through it changes nothing."""
  a = rope.rope_angles(N, DIM, 'fp32')[:, :DIM // 2]
  forced = rope.cos_sin_f32(a, margin=2.0 ** -30)
  assert rope._near_f32_boundary(np.cos(a.astype(np.float64)), 2.0 ** -30).sum() > 1000
  default = rope.cos_sin_f32(a)
  np.testing.assert_array_equal(forced[0], default[0])
  np.testing.assert_array_equal(forced[1], default[1])


def test_round_to_f32_avoids_double_rounding():
  """A value just above the midpoint of two float32s, whose float64 rounding is the midpoint itself (which float32
  rounding then sends to the even neighbour, the wrong one)."""
  lo = np.float32(1.0)
  hi = np.nextafter(lo, np.float32(2))
  mid = (Decimal(float(lo)) + Decimal(float(hi))) / 2
  d = mid + Decimal(2) ** -60
  assert float(d) == float(mid) and np.float32(float(d)) == lo
  assert rope._round_to_f32(d) == hi


# The tables of three configurations, hashed (run in this process and in a subprocess).
_DIGEST = """
import hashlib
from glm_jax import rope
arrays = [*rope.rope_table(2048, 128, 'fp32'), *rope.rope_table(2048, 128, 'fp16_chain'),
          *rope.rope_table(2048, 32, 'fp32')]
digest = hashlib.sha256(b''.join(a.tobytes() for a in arrays)).hexdigest()
"""


def test_same_bits_without_numpy_simd_dispatch():
  from numpy._core import _multiarray_umath as umath
  found = ' '.join(t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t))
  env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=found, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _DIGEST + 'print(digest)'], capture_output=True, text=True,
                       timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  here = {}
  exec(_DIGEST, here)
  assert out.stdout.split()[-1] == here['digest']


# Against torch on this machine.

def _torch_inv_freq(dim):
  return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).numpy()


def test_fp32_table_against_torch_within_its_pow_ulps():
  """SAT 0.4's table: fp32 inv_freq (torch's pow) times fp32 positions, torch's fp32 cos/sin."""
  inv_t = _torch_inv_freq(DIM)
  inv = rope.inv_freq_f32(DIM)
  assert _ulps(inv, inv_t).max() <= 2
  t = torch.arange(N, dtype=torch.float32)
  emb = torch.cat([torch.einsum('i,j->ij', t, torch.from_numpy(inv_t))] * 2, dim=-1)
  angles = rope.rope_angles(N, DIM, 'fp32')
  differs = np.tile(inv != inv_t, 2)[None, :]
  # Same inv_freq: the same IEEE product, bit for bit. Otherwise: apart by position * |d inv_freq| + one ulp.
  np.testing.assert_array_equal(np.where(differs, 0, angles), np.where(differs, 0, emb.numpy()))
  dinv = np.tile(np.abs(inv.astype(np.float64) - inv_t), 2)[None, :]
  bound = np.arange(N)[:, None] * dinv + differs * np.spacing(np.abs(angles)) + 2 * F32_ULP_AT_1
  cos, sin = rope.rope_table(N, DIM, 'fp32')
  for ours, ref in ((cos, emb.cos().numpy()), (sin, emb.sin().numpy())):
    err = np.abs(ours.astype(np.float64) - ref)
    assert np.all(err <= bound), f'worst excess {np.max(err - bound):.3g}'


def _on_fp16_tie(angle16, fn):
  """True where fn(angle) lies (to float32 precision) half-way between two fp16 values, so rounding may go either way."""
  exact = fn(angle16.astype(np.float64))
  lo = exact.astype(np.float16)
  nxt = np.nextafter(lo, np.where(exact > lo, np.float16(np.inf), np.float16(-np.inf)))
  mid = (lo.astype(np.float64) + nxt.astype(np.float64)) / 2
  return np.abs(exact - mid) <= 4 * np.finfo(np.float32).eps * np.maximum(np.abs(exact), 1e-3)


def test_fp16_chain_against_torch():
  """SAT 0.2's table as torch builds it in fp16 on CPU: fp16 inv_freq x fp16 arange, fp16 product and cos/sin.

  Where torch's fp32 inv_freq rounds to another fp16 value than ours (its pow was off near an fp16 rounding
  boundary), the whole column differs by design; everywhere else the angles are the same bits and cos/sin differ
  by at most one fp16 ulp, only at fp16 rounding ties."""
  inv_t = _torch_inv_freq(DIM)
  inv16_t = torch.from_numpy(inv_t).half()
  inv16 = rope.inv_freq_f32(DIM).astype(np.float16)
  other_column = inv16 != inv16_t.numpy()
  assert np.all(rope.inv_freq_f32(DIM)[other_column] != inv_t[other_column])
  assert other_column.sum() <= 2
  freqs = torch.einsum('i,j->ij', torch.arange(N, dtype=torch.half), inv16_t)
  emb = torch.cat((freqs, freqs), dim=-1)
  keep = ~np.tile(other_column, 2)
  angles = rope.rope_angles(N, DIM, 'fp16_chain')[:, keep]
  np.testing.assert_array_equal(angles, emb.numpy()[:, keep].astype(np.float32))
  cos, sin = rope.rope_table(N, DIM, 'fp16_chain')
  a16 = angles.astype(np.float16)
  for ours, ref, fn in ((cos[:, keep], emb.cos().numpy()[:, keep], np.cos),
                        (sin[:, keep], emb.sin().numpy()[:, keep], np.sin)):
    ours16 = ours.astype(np.float16)
    assert np.array_equal(ours16.astype(np.float32), ours)  # stored values are fp16 values
    differ = ours16 != ref
    ulps = np.abs(ours16.view(np.int16).astype(np.int32) - ref.view(np.int16).astype(np.int32))
    assert np.all(ulps[differ] <= 1)
    assert np.all(_on_fp16_tie(a16, fn)[differ]), 'a difference away from a rounding tie'


def test_the_two_precisions_really_differ():
  """The fp16 chain is far from exact RoPE at large positions (up to ~1 rad): matching one is not matching both."""
  a16 = rope.rope_angles(N, DIM, 'fp16_chain')
  a32 = rope.rope_angles(N, DIM, 'fp32')
  assert np.abs(a16 - a32).max() > 0.5


def test_unknown_precision_is_named():
  with pytest.raises(ValueError, match='rope_precision'):
    rope.rope_angles(8, 8, 'fp8')
