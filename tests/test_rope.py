"""Rotary tables against the published constructions, computed by torch (glm130b.md §2.4, §10 item 1)."""

import numpy as np
import pytest
import torch

from glm_jax import rope

DIM, N = 128, 2048


def _torch_fp16_chain(n, dim):
  """SAT 0.2's table as torch builds it in fp16 on CPU: fp16 inv_freq x fp16 arange, fp16 product and cos/sin."""
  inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
  t = torch.arange(n, dtype=torch.half)
  freqs = torch.einsum('i,j->ij', t, inv_freq)
  emb = torch.cat((freqs, freqs), dim=-1)
  return emb.numpy(), emb.cos().numpy(), emb.sin().numpy()


def _torch_fp32(n, dim):
  """SAT 0.4's table: fp32 inv_freq and fp32 arange."""
  inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
  emb = torch.cat([torch.einsum('i,j->ij', torch.arange(n, dtype=torch.float32), inv_freq)] * 2, dim=-1)
  return emb.cos().numpy(), emb.sin().numpy()


def _on_fp16_tie(angle16, fn):
  """True where fn(angle) lies (to fp32 precision) half-way between two fp16 values, so rounding may go either way."""
  exact = fn(angle16.astype(np.float64))
  lo = exact.astype(np.float16)
  nxt = np.nextafter(lo, np.where(exact > lo, np.float16(np.inf), np.float16(-np.inf)))
  mid = (lo.astype(np.float64) + nxt.astype(np.float64)) / 2
  return np.abs(exact - mid) <= 2 * np.finfo(np.float32).eps * np.maximum(np.abs(exact), 1e-3)


def test_fp16_chain_matches_torch():
  angles_t, cos_t, sin_t = _torch_fp16_chain(N, DIM)
  angles = rope.rope_angles(N, DIM, 'fp16_chain')
  np.testing.assert_array_equal(angles, angles_t.astype(np.float32))  # identical angles
  cos, sin = rope.rope_table(N, DIM, 'fp16_chain')
  a16 = angles_t.astype(np.float16)
  for ours, ref, fn in ((cos, cos_t, np.cos), (sin, sin_t, np.sin)):
    ours16 = ours.astype(np.float16)
    assert np.array_equal(ours16.astype(np.float32), ours)  # stored values are fp16 values
    differ = ours16 != ref
    ulps = np.abs(ours16.view(np.int16).astype(np.int32) - ref.view(np.int16).astype(np.int32))
    assert np.all(ulps[differ] <= 1)
    assert np.all(_on_fp16_tie(a16, fn)[differ]), 'a difference away from a rounding tie'


def test_fp32_matches_sat04():
  cos_t, sin_t = _torch_fp32(N, DIM)
  cos, sin = rope.rope_table(N, DIM, 'fp32')
  np.testing.assert_allclose(cos, cos_t, atol=2e-6)
  np.testing.assert_allclose(sin, sin_t, atol=2e-6)


def test_the_two_precisions_really_differ():
  """The fp16 chain is far from exact RoPE at large positions (up to ~1 rad): matching one is not matching both."""
  a16 = rope.rope_angles(N, DIM, 'fp16_chain')
  a32 = rope.rope_angles(N, DIM, 'fp32')
  assert np.abs(a16 - a32).max() > 0.5


def test_unknown_precision_is_named():
  with pytest.raises(ValueError, match='rope_precision'):
    rope.rope_angles(8, 8, 'fp8')
