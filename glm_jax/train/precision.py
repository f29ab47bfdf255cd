"""Dynamic loss scaling for fp16 compute (GLM-130B: initial 2^16, window 2000, hysteresis 2, minimum 1).

The state is a small pytree of scalars that lives in the TrainState and is checkpointed with it. The rule is
DeepSpeed's / Megatron's dynamic scaler:

- a step whose gradients are not all finite is skipped (the caller keeps the old parameters and optimiser state),
  the run of good steps restarts at 0, and the hysteresis budget drops by one; once it is spent (it is 1 when the
  overflow arrives) the scale is halved, never below the minimum. With hysteresis 2 the first overflow only spends
  the budget and the second halves the scale; later overflows halve it each time until the scale grows again.
- after `window` consecutive finite steps the scale doubles, and the hysteresis budget is restored.

With bf16 or fp32 compute scaling is off (`enabled=False`): the scale stays at 1 and only the skip applies.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
  enabled: bool
  init: float = 2.0 ** 16
  window: int = 2000
  hysteresis: int = 2
  min_scale: float = 1.0

  @classmethod
  def from_config(cls, config) -> 'LossScaleConfig':
    """From a whole config: enabled iff config.model.dtype == 'float16'; the values from config.train."""
    t = config.train
    return cls(enabled=config.model.dtype == 'float16', init=float(t.loss_scale_init),
               window=int(t.loss_scale_window), hysteresis=int(t.loss_scale_hysteresis),
               min_scale=float(t.loss_scale_min))


class LossScaleState(NamedTuple):
  scale: jax.Array  # float32 scalar: the loss is multiplied by this before differentiation
  good_steps: jax.Array  # int32: consecutive finite steps since the last overflow or growth
  hysteresis_left: jax.Array  # int32: overflows left before the scale is halved


def init_loss_scale(cfg: LossScaleConfig) -> LossScaleState:
  scale = cfg.init if cfg.enabled else 1.0
  return LossScaleState(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros([], jnp.int32),
                        hysteresis_left=jnp.asarray(max(cfg.hysteresis, 1), jnp.int32))


def all_finite(tree) -> jax.Array:
  """A bool scalar: every element of every floating leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def update_loss_scale(state: LossScaleState, finite: jax.Array, cfg: LossScaleConfig) -> LossScaleState:
  """The scale for the next step, given whether this step's gradients were finite."""
  if not cfg.enabled:
    return state
  finite = jnp.asarray(finite)
  # overflow
  spend = state.hysteresis_left > 1
  bad = LossScaleState(
      scale=jnp.where(spend, state.scale, jnp.maximum(state.scale * 0.5, cfg.min_scale)),
      good_steps=jnp.zeros_like(state.good_steps),
      hysteresis_left=jnp.where(spend, state.hysteresis_left - 1, state.hysteresis_left))
  # finite
  good_steps = state.good_steps + 1
  grow = good_steps >= cfg.window
  good = LossScaleState(
      scale=jnp.where(grow, state.scale * 2.0, state.scale),
      good_steps=jnp.where(grow, 0, good_steps),
      hysteresis_left=jnp.where(grow, jnp.asarray(max(cfg.hysteresis, 1), jnp.int32), state.hysteresis_left))
  return jax.tree.map(lambda g, b: jnp.where(finite, g, b), good, bad)
