"""Greedy decoding and temperature / top-k / top-p sampling (GLM-130B's BaseStrategy, glm130b.md §5.3).

Everything here works on a batch `[B, V]` of next-token logits, is pure and jit-compatible, and can run inside
`lax.while_loop`. `top_k` and `top_p` are Python numbers (top_k, and whether top_p > 0, are static: they fix shapes
and branches; top_p's value is an operand); `temperature` may be a Python float or a traced scalar.

Differences from the original, on purpose:
- top-p works per row on a batch (SAT's `top_k_logits` reshapes to one row, so it supports batch 1 only);
- the top-p softmax and cumulative sum are computed in fp32 (GLM-130B ran them in the fp16 logits' dtype), so a
  token whose cumulative mass is within fp16 rounding of `top_p` can be kept or dropped differently;
- `top_k` larger than the vocabulary keeps everything (torch.topk would raise).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG = -65504.0  # GLM-130B's fill value for removed logits (the most negative fp16 number).


def validate_sampling(temperature, top_k, top_p) -> None:
  """Checks the sampling flags in Python (before tracing); raises ValueError naming the offending flag."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
      or temperature <= 0:
    raise ValueError(f'--temperature must be a finite number > 0, got {temperature!r}')
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f'--top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}')
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
    raise ValueError(f'--top_p must be a number in [0, 1] (0 disables top-p), got {top_p!r}')


def apply_invalid(logits_BxV, invalid_mask_V):
  """Sets the logits of ids where `invalid_mask_V` ([V] bool, or broadcastable to the logits) is True to NEG."""
  if invalid_mask_V is None:
    return logits_BxV
  return jnp.where(invalid_mask_V, jnp.asarray(NEG, logits_BxV.dtype), logits_BxV)


def top_k_top_p_filter(logits_BxV, top_k: int = 0, top_p: float = 0.0):
  """SAT's `top_k_logits`, per row of a batch. Removed logits become NEG.

  top_k > 0: keeps every logit >= the k-th largest of its row (so ties with the k-th value are all kept, as
    `logits < topk[..., -1]` does in SAT).
  top_p > 0: sorts the row descending, takes softmax and the cumulative sum (in fp32), removes the sorted positions
    where cumsum > top_p shifted right by one (the first token that crosses the threshold stays; the top token always
    stays). Applied after top-k, on the top-k-filtered logits, as in SAT.
  top_k and top_p are Python numbers: top_k and whether top_p > 0 are static (they fix shapes and branches); the value
  of top_p is passed to the compiled function as an operand, so changing it does not recompile.
  """
  return _filter(logits_BxV, jnp.float32(top_p), top_k=int(top_k), use_top_p=top_p > 0.0)


def _filter_impl(logits, top_p, top_k: int, use_top_p: bool):
  b, v = logits.shape
  neg = jnp.asarray(NEG, logits.dtype)
  if top_k > 0 and top_k < v:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if use_top_p:
    sorted_logits, order = jax.lax.top_k(logits.astype(jnp.float32), v)  # descending, ties by lower id
    cumsum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumsum > top_p
    remove_sorted = jnp.concatenate([jnp.zeros((b, 1), bool), remove_sorted[:, :-1]], axis=-1)
    remove = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(remove_sorted)
    logits = jnp.where(remove, neg, logits)
  return logits


_filter = jax.jit(_filter_impl, static_argnames=('top_k', 'use_top_p'))


def sample_tokens(logits_BxV, rng, *, temperature=1.0, top_k: int = 0, top_p: float = 0.0,
                  invalid_mask_V=None):
  """One sampled id per row, int32 [B]: logits / temperature -> invalid ids to NEG -> top-k/top-p -> categorical.

  The logits are used in fp32. Deterministic for a given `rng`. Call `validate_sampling` on the flags first
  (temperature must be > 0). top_k / top_p as in `top_k_top_p_filter`; temperature may be traced.
  """
  return _sample(logits_BxV, rng, jnp.float32(temperature), jnp.float32(top_p), invalid_mask_V, top_k=int(top_k),
                 use_top_p=top_p > 0.0)


@functools.partial(jax.jit, static_argnames=('top_k', 'use_top_p'))
def _sample(logits, rng, temperature, top_p, invalid_mask_V, top_k: int, use_top_p: bool):
  logits = logits.astype(jnp.float32) / temperature
  logits = apply_invalid(logits, invalid_mask_V)
  logits = _filter_impl(logits, top_p, top_k, use_top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@jax.jit
def greedy_tokens(logits_BxV, invalid_mask_V=None):
  """Argmax per row, int32 [B], after setting invalid ids to NEG; ties go to the lowest id."""
  logits = apply_invalid(logits_BxV.astype(jnp.float32), invalid_mask_V)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
