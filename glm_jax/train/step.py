"""The training state and the jitted training step (fp32 master weights, bf16/fp16 compute, sharded by the rules).

    state = init_train_state(model, config, jax.random.key(config.seed), mesh, rules)
    train_step = make_train_step(model, config, mesh, rules)
    state, metrics = train_step(state, batch)

`config` is a whole config with `config.model` and `config.train` (glm_jax/config.py `train_defaults()`).

batch: a dict of numpy or jax arrays
    tokens [B, S] int32, targets [B, S] int32, position_ids [B, S] int32 (or [B, 2, S] for 2-D positions),
    attention_mask [B, 1, S, S] bool (True = may attend; a [1, 1, S, S] mask is broadcast), loss_mask [B, S] float32.

Loss and gradient accumulation. The loss of a step is the mean token cross-entropy over every loss token of the
global batch,
    loss = sum_b,s(loss_mask * CE(logits, targets)) / sum_b,s(loss_mask)        (fp32; 0 when there are no tokens)
whatever config.train.grad_accum_steps is. With M = grad_accum_steps the batch is split into M micro-batches
(micro-batch m = rows m, m+M, m+2M, ...: a strided split, so each device keeps its own rows and nothing is
resharded), the step scans over them inside one jit, each contributing the gradient of its token-sum of CE divided
by the global token count, and sums those in fp32. The result equals the M = 1 gradient of the same batch (only
summation order differs); when every micro-batch holds the same number of loss tokens it is also the mean of the
per-micro-batch mean-loss gradients (the Megatron / GLM-130B convention, which weights micro-batches equally).

Precision. params are fp32 master weights (whatever config.model.param_dtype says) and so is the optimiser state.
The forward and backward run on a copy cast to config.model.dtype inside the differentiated function, so gradients
arrive in fp32. With float16 compute the loss is multiplied by a dynamic loss scale (glm_jax/train/precision.py)
and the gradients divided by it in fp32. In every dtype a step whose gradients are not all finite is skipped:
parameters and optimiser state are kept, `skipped` = 1, and (fp16) the scale is lowered.

Counters. state.step counts every call (skipped ones too): dropout keys are fold_in(rng, step) then fold_in(.., m)
per micro-batch. The learning rate and the EGS alpha follow the optimiser's count of *applied* updates, which a
skipped step does not advance (as Megatron's scheduler, stepped only on successful updates).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax import sharding
from glm_jax.model import GLMConfig
from glm_jax.train import precision
from glm_jax.train.optimizer import (EMBEDDING_KEY, SplitEmbeddingGrads, applied_updates, fold_embedding_grads,
                                     make_egs_schedule, make_optimizer, make_schedule)

BATCH_KEYS = ('tokens', 'targets', 'position_ids', 'attention_mask', 'loss_mask')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: train_step calls so far, skipped steps included
  params: Any  # fp32 master weights, the model's parameter dict
  opt_state: Any  # optax state of make_optimizer(config.train); Adam moments shaped and sharded like params
  loss_scale: precision.LossScaleState  # dynamic loss scale (scale 1 and unused unless compute is float16)
  rng: jax.Array  # uint32 raw key data (jax.random.key_data) of the dropout key; raw so that it checkpoints plainly


# ------------------------------------------------------------------------------------------------------------------
# Loss and gradients


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def token_cross_entropy(logits, targets):
  """Per-token CE in fp32: logsumexp(logits) - logits[target] (a select, not a gather, so a vocab-sharded row is
  reduced in place)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  return lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def micro_batch_grads(model, params, batch, dropout_key, factor, compute_dtype):
  """For one micro-batch: (sum of loss_mask * CE, SplitEmbeddingGrads of factor * that sum).

  The input lookup uses a separate argument holding params['word_embeddings'], so its share of the tied table's
  gradient comes back apart as `input_embedding` (see glm_jax/train/optimizer.py, Embedding Gradient Shrink).
  """

  def loss_fn(p, table):
    logits = model.apply({'params': _cast_floats(p, compute_dtype)}, batch['tokens'], batch['position_ids'],
                         batch['attention_mask'], deterministic=False, input_embedding=table.astype(compute_dtype),
                         rngs={'dropout': dropout_key})
    token_sum = jnp.sum(batch['loss_mask'].astype(jnp.float32) * token_cross_entropy(logits, batch['targets']))
    return token_sum * factor, token_sum

  (_, token_sum), (g, g_in) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params, params[EMBEDDING_KEY])
  return token_sum, SplitEmbeddingGrads(params=g, input_embedding=g_in)


def split_micro_batches(batch, num_micro: int):
  """Leaves [B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, ... (a leading dim of 1 is broadcast)."""

  def split(x):
    if x.shape[0] == 1:
      return jnp.broadcast_to(x[None], (num_micro,) + x.shape)
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}


def batch_grads(model, params, batch, dropout_key, loss_scale, num_micro: int, compute_dtype, grad_shardings=None):
  """(loss, token count, unscaled fp32 SplitEmbeddingGrads of the loss) for a whole batch, accumulating over
  `num_micro` micro-batches in a scan. loss = token-sum CE / max(token count, 1)."""
  tokens = jnp.sum(batch['loss_mask'].astype(jnp.float32))
  factor = loss_scale / jnp.maximum(tokens, 1.0)

  def constrain(g):
    return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

  if num_micro == 1:
    token_sum, grads = micro_batch_grads(model, params, batch, jax.random.fold_in(dropout_key, 0), factor,
                                         compute_dtype)
  else:
    micro = split_micro_batches(batch, num_micro)
    zeros = constrain(SplitEmbeddingGrads(params=jax.tree.map(jnp.zeros_like, params),
                                          input_embedding=jnp.zeros_like(params[EMBEDDING_KEY])))

    def body(carry, xs):
      index, mb = xs
      s, g = micro_batch_grads(model, params, mb, jax.random.fold_in(dropout_key, index), factor, compute_dtype)
      acc_s, acc_g = carry
      return (acc_s + s, constrain(jax.tree.map(jnp.add, acc_g, g))), None

    (token_sum, grads), _ = jax.lax.scan(body, (jnp.zeros([], jnp.float32), zeros),
                                         (jnp.arange(num_micro, dtype=jnp.int32), micro))
  grads = jax.tree.map(lambda g: g.astype(jnp.float32) / loss_scale, grads)
  return token_sum / jnp.maximum(tokens, 1.0), tokens, grads


# ------------------------------------------------------------------------------------------------------------------
# State


def _as_key(rng):
  if isinstance(rng, int):
    return jax.random.key(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def _abstract_master_params(model, config):
  boxed = sharding.abstract_params(model, config.model)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), nn.meta.unbox(boxed))


def state_shardings(model, config, mesh: Mesh, rules, tx: optax.GradientTransformation | None = None) -> TrainState:
  """A TrainState of NamedShardings: params and every params-shaped optimiser tree (Adam's mu, nu) by the axis
  rules, everything else (counters, loss scale, rng) replicated. Also the target for an Orbax restore."""
  tx = make_optimizer(config.train) if tx is None else tx
  replicated = NamedSharding(mesh, PartitionSpec())
  param_sh = sharding.param_shardings(model, config.model, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, _abstract_master_params(model, config))
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  ls = precision.LossScaleState(replicated, replicated, replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, loss_scale=ls, rng=replicated)


def init_train_state(model, config, rng, mesh: Mesh | None = None, rules=None) -> TrainState:
  """A fresh TrainState; with a mesh every array is created with its sharding (params and Adam moments split by
  the rules). rng: a key (typed or raw) or an int seed; split into the parameter-init key and the dropout key."""
  tx = make_optimizer(config.train)
  params_key, dropout_key = jax.random.split(_as_key(rng))
  params = sharding.init_params(model, config.model, params_key, mesh, rules)
  if any(x.dtype != jnp.float32 for x in jax.tree.leaves(params)):
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # fp32 master weights
  loss_scale = precision.init_loss_scale(precision.LossScaleConfig.from_config(config))
  step = jnp.zeros([], jnp.int32)
  rng_data = jax.random.key_data(dropout_key)
  if mesh is None:
    opt_state = jax.jit(tx.init)(params)
  else:
    shardings = state_shardings(model, config, mesh, rules, tx)
    with sharding.activate(mesh, rules):
      opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step, loss_scale, rng_data = jax.device_put((step, loss_scale, rng_data),
                                                (shardings.step, shardings.loss_scale, shardings.rng))
  return TrainState(step=step, params=params, opt_state=opt_state, loss_scale=loss_scale, rng=rng_data)


# ------------------------------------------------------------------------------------------------------------------
# Step


def _check_batch(batch, num_micro: int, batch_devices: int, pipeline=None):
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f'the batch lacks {missing}; a batch has {list(BATCH_KEYS)}')
  b = np.shape(batch['tokens'])[0]
  if b % num_micro:
    raise ValueError(f'batch size {b} is not divisible by config.train.grad_accum_steps={num_micro}')
  if (b // num_micro) % batch_devices:
    raise ValueError(f'micro-batch size {b // num_micro} (batch {b} / config.train.grad_accum_steps={num_micro}) '
                     f'is not divisible by the {batch_devices} devices the batch is split over (data x fsdp)')
  if pipeline is not None and (b // num_micro) % (pipeline.microbatches * batch_devices):
    raise ValueError(f'batch {b} / config.train.grad_accum_steps={num_micro} must divide into '
                     f'config.train.pipeline_microbatches={pipeline.microbatches} micro-batches of a multiple of the '
                     f'{batch_devices} devices the batch is split over (data x fsdp)')
  if np.dtype(batch['attention_mask'].dtype) != np.bool_:
    raise TypeError(f"batch['attention_mask'] must be bool (True = may attend), got {batch['attention_mask'].dtype}")


def make_train_step(model, config, mesh: Mesh | None = None, rules=None, *, donate: bool = True):
  """train_step(state, batch) -> (state, metrics), jitted (under a mesh: with the state's and the batch's
  shardings, traced inside sharding.activate(mesh, rules)). With donate=True the input state's buffers are reused
  for the output: do not use a state after passing it in.

  metrics (scalars): loss (mean CE over loss tokens), grad_norm (global norm of the EGS-folded, unscaled gradient
  before clipping), learning_rate and egs_alpha (the values this update used), loss_scale (the scale this step
  used), skipped (1 when the gradients were not finite and nothing was updated), tokens (loss tokens in the batch).
  train_step.lower(state, batch) lowers the step for such (possibly abstract) arguments without running it.
  """
  t = config.train
  tx = make_optimizer(t)
  lr_schedule, egs_schedule = make_schedule(t), make_egs_schedule(t)
  ls_cfg = precision.LossScaleConfig.from_config(config)
  compute_dtype = GLMConfig.make(config.model).compute_dtype
  num_micro = int(t.grad_accum_steps)
  if num_micro < 1:
    raise ValueError(f'config.train.grad_accum_steps must be >= 1, got {num_micro}')

  shardings = None if mesh is None else state_shardings(model, config, mesh, rules, tx)
  grad_shardings = None if shardings is None else SplitEmbeddingGrads(
      params=shardings.params, input_embedding=shardings.params[EMBEDDING_KEY])

  def step_fn(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    scale = state.loss_scale.scale
    loss, tokens, grads = batch_grads(model, state.params, batch, key, scale, num_micro, compute_dtype,
                                      grad_shardings)
    finite = precision.all_finite(grads)
    count = applied_updates(state.opt_state)
    alpha = egs_schedule(count)
    grad_norm = optax.tree.norm(fold_embedding_grads(grads, alpha))

    def update(_):
      updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), new_opt_state

    # A branch, not a leafwise where: the select would read and write every parameter and moment once more per step.
    new_params, new_opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        loss_scale=precision.update_loss_scale(state.loss_scale, finite, ls_cfg),
        rng=state.rng)
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=jnp.asarray(lr_schedule(count), jnp.float32),
                   loss_scale=scale, skipped=jnp.logical_not(finite).astype(jnp.int32), tokens=tokens,
                   egs_alpha=jnp.asarray(alpha, jnp.float32))
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  compiled = {}
  batch_devices = 1
  if mesh is not None:
    spec = sharding.batch_sharding(mesh, rules, 2).spec[0]
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    batch_devices = int(np.prod([mesh.shape[a] for a in axes]))

  def build(batch):
    if mesh is None:
      return jax.jit(step_fn, donate_argnums=donate_argnums)
    b = np.shape(batch['tokens'])[0]
    batch_sh = {k: (sharding.batch_sharding(mesh, rules, np.ndim(v)) if np.shape(v)[0] == b
                    else NamedSharding(mesh, PartitionSpec())) for k, v in batch.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                   donate_argnums=donate_argnums)

  def train_step(state: TrainState, batch):
    batch = dict(batch)
    signature = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))
    fn = compiled.get(signature)
    if fn is None:
      _check_batch(batch, num_micro, batch_devices, model.pipeline)
      fn = compiled[signature] = build(batch)
    if mesh is None:
      return fn(state, batch)
    with sharding.activate(mesh, rules):
      return fn(state, batch)

  def lower(state, batch):
    """The step lowered, not run, for these (possibly abstract: jax.ShapeDtypeStruct) state and batch: for
    compiling ahead of time, e.g. to read its memory analysis (glm_jax/memory.py)."""
    batch = dict(batch)
    _check_batch(batch, num_micro, batch_devices, model.pipeline)
    with sharding.activate(mesh, rules):
      return build(batch).lower(state, batch)

  train_step.optimizer = tx
  train_step.state_shardings = shardings
  train_step.lower = lower
  return train_step
