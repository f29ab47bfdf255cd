"""The key/value cache of cached decoding: one preallocated array pair per layer, head-major rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_cache(model_config, batch: int, max_length: int):
  """A preallocated key/value cache in the compute dtype: {'k', 'v'} each [L, B*N, max_length, H] (row b*N + n holds
  head n of sequence b), or with scan_layers=False a tuple of L arrays [B*N, max_length, H].

  Rotated keys are stored (as SAT's mems), so a cached step only rotates its own query and key.
  """
  from glm_jax.model import GLMConfig
  cfg = GLMConfig.make(model_config)
  shape = (batch * cfg.num_attention_heads, max_length, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.num_layers,) + shape
    return {'k': jnp.zeros(shape, cfg.compute_dtype), 'v': jnp.zeros(shape, cfg.compute_dtype)}
  return {name: tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers)) for name in 'kv'}


def take_cache_rows(cache, rows, num_heads: int):
  """The cache of sequences `rows` (int [R]), in either layout: beam search repeats and reorders beams with it."""
  def take(x):  # [..., B*N, T, H] -> [..., R*N, T, H]
    lead, (bn, t, h) = x.shape[:-3], x.shape[-3:]
    x = x.reshape(lead + (bn // num_heads, num_heads, t, h))
    return jnp.take(x, rows, axis=len(lead)).reshape(lead + (-1, t, h))
  return jax.tree.map(take, cache)
