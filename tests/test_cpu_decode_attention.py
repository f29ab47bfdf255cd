"""The CPU decode-attention kernel (glm_jax/csrc/decode_attention.cc) against the definition in float64 numpy:
scores q.k * c, a masked score set to -10000 * c (SAT's fill), softmax over every column, weighted values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import cpu_kernels, model
from glm_jax.generation import decode
from glm_jax.kv_cache import init_cache

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f'CPU kernel off: {cpu_kernels._state.get("why")}')


def _definition(q_RxH, k_RxTxH, v_RxTxH, mask_BxT, c, heads):
  q, k, v = (np.asarray(x, np.float64) for x in (q_RxH, k_RxTxH, v_RxTxH))
  mask = np.repeat(np.asarray(mask_BxT), heads, axis=0)
  scores = np.where(mask, np.einsum('rh,rth->rt', q, k) * c, -10000.0 * c)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum('rt,rth->rh', weights / weights.sum(-1, keepdims=True), v)


def _kernel(q_RxH, k_RxTxH, v_RxTxH, mask_BxT, c, heads):
  fn = jax.jit(lambda q, k, v, m, c: cpu_kernels.decode_context(
      q[:, None], k, v, m[:, None, None], c, heads, reference=model.attention_context, masked_score=model.MASKED_SCORE))
  return np.asarray(fn(q_RxH, k_RxTxH, v_RxTxH, mask_BxT, np.float32(c)))[:, 0]


def _inputs(rng, batch, heads, t, h, scale=1.0):
  r = batch * heads
  return (rng.standard_normal((r, h), dtype=np.float32) * scale, rng.standard_normal((r, t, h), dtype=np.float32),
          rng.standard_normal((r, t, h), dtype=np.float32))


@pytest.mark.parametrize('h,heads', [(64, 4), (16, 4), (128, 4), (64, 7), (64, 6), (16, 3)])
def test_kernel_matches_the_definition(h, heads):
  """Prompts of different lengths padded to a bucket, then generated columns (GLM's decode mask), several heads per
  sequence, a column count that is no multiple of 8; H = 64 takes the unrolled path, 16 and 128 the general one.
  The kernel reads the heads of a sequence in groups of 4: 7, 6 and 3 heads leave groups of 3, 2 and 3."""
  rng = np.random.default_rng(h + heads)
  batch, t, bucket = 3, 45, 20
  q, k, v = _inputs(rng, batch, heads, t, h)
  mask = np.zeros((batch, t), bool)
  for row, (length, generated) in enumerate([(20, 25), (7, 13), (1, 1)]):
    mask[row, :length] = True
    mask[row, bucket:bucket + generated] = True
  for c in (1.0, 3.0):
    want = _definition(q, k, v, mask, c, heads)
    # The kernel's fixed AVX2/FMA code gives the same bits on every such CPU: a tight bound.
    np.testing.assert_allclose(_kernel(q, k, v, mask, c, heads), want, rtol=2e-5, atol=2e-6)
    # XLA's attention (the model's other path) against the same float64 definition: its scores reach ~100, whose fp32
    # rounding (~1e-5 relative) exp() carries into every weight, in an order that XLA's code generation decides.
    xla = model.attention_context(q[:, None], k, v, mask[:, None, None], jnp.float32(c), heads)[:, 0]
    np.testing.assert_allclose(np.asarray(xla), want, rtol=1e-4, atol=1e-5)


def test_masked_columns_that_carry_weight():
  """When every allowed score lies within ~88 of the fill, the masked columns' weights exp(fill - max) are not zero:
  the kernel attends over every column. A row with every column masked averages all values."""
  rng = np.random.default_rng(0)
  batch, heads, t, h = 2, 2, 24, 64
  _, k, v = _inputs(rng, batch, heads, t, h)
  # q = e_0 and k[..., 0] = -9998 +- 1 in steps of 1/64: every score is exact in fp32, so fp32 and fp64 agree
  q = np.zeros((batch * heads, h), np.float32)
  q[:, 0] = 1.0
  k[:, :, 0] = -9998.0 + np.round(rng.uniform(-1, 1, (batch * heads, t)) * 64) / 64
  mask = np.zeros((batch, t), bool)
  mask[0, :10] = True  # allowed scores about -9998 against a fill of -10000: masked weights about e^-2 each
  got = _kernel(q, k, v, mask, 1.0, heads)
  want = _definition(q, k, v, mask, 1.0, heads)
  np.testing.assert_allclose(want[heads:], v[heads:].mean(1), rtol=1e-5, atol=1e-6)  # row 1: all masked
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  allowed_only = _definition(q[:heads], k[:heads, :10], v[:heads, :10], np.ones((1, 10), bool), 1.0, heads)
  assert np.abs(want[:heads] - allowed_only).max() > 0.05  # the masked columns do change row 0's context


def test_decode_steps_use_the_kernel_on_one_device_and_not_on_a_mesh():
  """The model's decode step (one new token, a cache) calls the kernel; under a device mesh it keeps XLA's attention
  (the kernel has no sharding rule); prefill and training never call it."""
  from glm_jax import sharding
  from glm_jax.config import default_config
  from tests.conftest import PARITY_MODEL
  config = default_config()
  config.model.update(PARITY_MODEL)
  glm = decode.Decoder(config.model).model  # the decoder's model, given the kernel by decode_format
  batch, length = 2, 16
  cache = init_cache(glm.config, batch, length)

  def program(s, with_cache=True):
    tokens, positions = jnp.zeros((batch, s), jnp.int32), jnp.zeros((batch, s), jnp.int32)
    mask = jnp.ones((batch, 1, s, length if with_cache else s), bool)

    def apply(p, cache):
      kw = dict(cache=cache, cache_index=3) if with_cache else {}
      return glm.apply({'params': p}, tokens, positions, mask, **kw)

    square = jnp.ones((batch, 1, s, s), bool)
    params = jax.eval_shape(lambda: glm.init(jax.random.key(0), tokens, positions, square))['params']
    return jax.jit(apply).lower(params, cache).as_text()

  assert 'glm_jax_decode_attention' in program(1)
  assert 'glm_jax_decode_attention' not in program(4)  # prefill
  assert 'glm_jax_decode_attention' not in program(4, with_cache=False)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=2, stage=1), jax.devices()[:2])
  with sharding.activate(mesh, sharding.axis_rules(config)):
    assert 'glm_jax_decode_attention' not in program(1)
