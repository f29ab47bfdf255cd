"""AdamW with GLM-130B's schedule, clipping and Embedding Gradient Shrink (glm130b.md §3.2-3.3).

    tx = make_optimizer(config)                    # config or config.train
    opt_state = tx.init(params)
    updates, opt_state = tx.update(SplitEmbeddingGrads(params=g, input_embedding=g_in), opt_state, params)

The chain is: Embedding Gradient Shrink -> clip_by_global_norm(clip_norm) -> AdamW(b1, b2, eps, weight decay,
schedule). Gradient accumulation is not an optimiser wrapper: the train step scans over micro-batches inside one
jitted call (glm_jax/train/step.py), so the optimiser always sees the gradient of the whole global batch.

Embedding Gradient Shrink. GLM-130B rewrites the input lookup as `e*alpha + stop_gradient(e)*(1-alpha)`: the value
is unchanged and only the gradient reaching the tied table *through the input lookup* is multiplied by alpha; the
output projection's share is not shrunk. Here the step differentiates with respect to the parameters and, as a
separate argument, the table used for the input lookup (the model's `input_embedding=`, holding the same values as
params['word_embeddings']). The gradient handed to the optimiser is therefore a `SplitEmbeddingGrads`:

    params           grads shaped like params; grads['word_embeddings'] is the output projection's share only
    input_embedding  the [V, D] gradient of the input lookup

`embedding_gradient_shrink` folds the two: grads['word_embeddings'] + alpha(count) * input_embedding, and returns a
tree shaped like params for the rest of the chain. This equals the forward trick exactly in exact arithmetic
(tests/test_optimizer.py checks training with both).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

EMBEDDING_KEY = 'word_embeddings'


def train_config(config):
  """`config.train` when given a whole config, else the argument itself (already the train fields)."""
  try:
    return config['train'] if 'train' in config else config
  except TypeError:
    return config


# ------------------------------------------------------------------------------------------------------------------
# Schedules


def make_schedule(cfg) -> optax.Schedule:
  """Learning rate by applied-update count n: linear warm-up 0 -> learning_rate over warmup_steps, then cosine
  decay to learning_rate * min_lr_ratio at n = decay_steps (warm-up included), flat afterwards.

  As SAT's AnnealingLR: lr(n) = peak * n / warmup for n < warmup (so the very first update has lr 0 when there is a
  warm-up), lr(warmup) = peak, lr(decay_steps) = floor.
  """
  t = train_config(cfg)
  peak = float(t.learning_rate)
  floor = peak * float(t.min_lr_ratio)
  warmup, decay = int(t.warmup_steps), int(t.decay_steps)
  if warmup < 0 or decay <= warmup:
    raise ValueError(f'config.train: need 0 <= warmup_steps < decay_steps, got warmup_steps={warmup}, '
                     f'decay_steps={decay}')
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=floor)


def make_egs_schedule(cfg) -> optax.Schedule:
  """EGS alpha by applied-update count: egs_alpha, optionally warmed up linearly to 1 over
  [egs_warmup_start, egs_warmup_start + egs_warmup_steps] (egs_warmup_steps = 0: constant)."""
  t = train_config(cfg)
  alpha = float(t.egs_alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'config.train.egs_alpha must be in [0, 1], got {alpha}')
  steps = int(t.egs_warmup_steps)
  if steps <= 0:
    return optax.constant_schedule(alpha)
  return optax.linear_schedule(alpha, 1.0, steps, transition_begin=int(t.egs_warmup_start))


# ------------------------------------------------------------------------------------------------------------------
# Embedding Gradient Shrink


class SplitEmbeddingGrads(NamedTuple):
  """Gradients with the input lookup's share of the tied embedding gradient kept apart (see the module doc)."""
  params: Any
  input_embedding: jax.Array


class EmbeddingGradientShrinkState(NamedTuple):
  count: jax.Array  # applied updates so far (int32); the alpha schedule is evaluated here


def fold_embedding_grads(grads: SplitEmbeddingGrads, alpha, key: str = EMBEDDING_KEY):
  """grads.params with grads.input_embedding * alpha added into params[key] (the tied table's leaf)."""
  if not isinstance(grads, SplitEmbeddingGrads):
    raise TypeError('embedding_gradient_shrink expects a SplitEmbeddingGrads(params=..., input_embedding=...) '
                    f'gradient (see glm_jax/train/optimizer.py), got {type(grads).__name__}')
  out = dict(grads.params)
  g_out = out[key]
  alpha = jnp.asarray(alpha, jnp.float32)
  out[key] = (g_out.astype(jnp.float32) + alpha * grads.input_embedding.astype(jnp.float32)).astype(g_out.dtype)
  return out


def embedding_gradient_shrink(alpha_schedule: float | Callable[[jax.Array], jax.Array],
                              key: str = EMBEDDING_KEY) -> optax.GradientTransformation:
  """Scale the input-lookup gradient by alpha(count) and fold it into the tied table's gradient.

  update(SplitEmbeddingGrads, state, params=None) -> (grads shaped like params, state). `init` takes the params
  (shaped like the output), so the transformations chained after this one initialise as usual.
  """
  schedule = alpha_schedule if callable(alpha_schedule) else optax.constant_schedule(float(alpha_schedule))

  def init(params):
    del params
    return EmbeddingGradientShrinkState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    folded = fold_embedding_grads(updates, schedule(state.count), key)
    return folded, EmbeddingGradientShrinkState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def applied_updates(opt_state) -> jax.Array:
  """The number of applied updates recorded in an optimiser state built by `make_optimizer`."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmbeddingGradientShrinkState))
           if isinstance(s, EmbeddingGradientShrinkState)]
  if len(found) != 1:
    raise ValueError('the optimiser state has no (or several) EmbeddingGradientShrinkState entries')
  return found[0].count


# ------------------------------------------------------------------------------------------------------------------
# AdamW


def decay_mask(params):
  """True where weight decay applies: every matrix, the word embedding included (as Megatron / GLM-130B); False on
  biases (names ending in 'bias') and LayerNorm parameters (anything under a '*layernorm' module)."""

  def decays(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if names[-1].endswith('bias'):
      return False
    return not any(n.endswith('layernorm') for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_base_optimizer(cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW (masked decay, schedule), on gradients shaped like params (no EGS)."""
  t = train_config(cfg)
  parts = []
  if float(t.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(t.clip_norm)))
  parts.append(optax.adamw(make_schedule(t), b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                           weight_decay=float(t.weight_decay), mask=decay_mask))
  return optax.chain(*parts)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """The full chain: embedding_gradient_shrink(alpha schedule) -> clip -> AdamW. Takes SplitEmbeddingGrads."""
  t = train_config(cfg)
  return optax.chain(embedding_gradient_shrink(make_egs_schedule(t)), make_base_optimizer(t))
