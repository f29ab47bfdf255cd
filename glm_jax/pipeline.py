"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule written as one SPMD program.

With `--config.mesh.stage=N` (N > 1) the L transformer layers are cut into N stages of ceil(L/N) consecutive layers.
Stage s holds only its own layers (the stacked layer arrays are split over `stage`, nothing gathers them) and the
batch is cut into M = config.train.pipeline_microbatches micro-batches that stream through the stages:

    tick t:  stage s runs micro-batch t - s (when 0 <= t - s < M), then hands its activations to stage s + 1.

The loop runs in `jax.shard_map`, manual over `stage` only: each stage's devices run the whole schedule on their
own layers, handing their slot (one micro-batch's activations) to the next stage every tick with a collective
permute; the last stage's outputs are summed over `stage` (the others contribute zeros) to give the layer stack's
output on every device. Reverse-mode differentiation of that loop is GPipe's backward pass. The data, fsdp and
tensor axes stay automatic inside each stage: the model's logical constraints apply there as everywhere else.

A stage count that does not divide L (GLM-130B trained 70 layers on 8 stages) pads the stack to N * ceil(L/N)
layers at its end: the padding slots hold zeros, are skipped (their output is their input), and receive zero
gradients, so AdamW keeps them at zero. Checkpoints never see them: `to_stored` / `from_stored` convert between
the padded train state and the stacked [L, ...] layout of every checkpoint, whatever the stage count.

The schedule is a table (`schedule()`: the micro-batch each stage runs at each tick, -1 for idle), and the loop
consumes it row by row, so `bubble_fraction()` counts the idle stage-ticks of exactly what runs.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Pipeline:
  stages: int  # N: the `stage` mesh axis
  microbatches: int  # M: micro-batches per forward (a batch must divide by it)
  num_layers: int  # L: the model's layers

  def __post_init__(self):
    if self.stages < 2:
      raise ValueError(f'a pipeline needs 2 or more stages, got {self.stages}')
    if self.microbatches < 1:
      raise ValueError(f'config.train.pipeline_microbatches must be >= 1, got {self.microbatches}')
    if self.num_layers < self.stages:
      raise ValueError(f'{self.num_layers} layers cannot fill {self.stages} pipeline stages')

  @property
  def layers_per_stage(self) -> int:
    return math.ceil(self.num_layers / self.stages)

  @property
  def padded_layers(self) -> int:
    return self.stages * self.layers_per_stage

  def schedule(self) -> np.ndarray:
    """[ticks, stages] int32: the micro-batch each stage runs at each tick (GPipe's forward), -1 where it idles."""
    m = np.arange(self.microbatches + self.stages - 1)[:, None] - np.arange(self.stages)[None, :]
    return np.where((m >= 0) & (m < self.microbatches), m, -1).astype(np.int32)

  def bubble_fraction(self) -> float:
    """Idle stage-ticks / all stage-ticks of schedule(): (N - 1) / (M + N - 1) for GPipe."""
    return float((self.schedule() < 0).mean())

  def padding_fraction(self) -> float:
    """Layer slots that hold padding / all layer slots (0 when N divides L)."""
    return 1 - self.num_layers / self.padded_layers

  # ------------------------------------------------------------------------------------------------------------
  # The forward pass of the layer stack

  def __call__(self, block_fn, layers, x_BxSxD, rope_parts, mask, dropout_key=None):
    """The layer stack on x [B, S, D], pipelined. block_fn(params, x, layer_id, rope_parts, mask, key) -> x runs one
    layer; `layers`: the stacked layer parameters, padded to [padded_layers, ...]; rope_parts and mask: the model's,
    per batch row (or broadcast with a leading 1); dropout_key: None when deterministic, else each layer of each
    micro-batch folds in (micro-batch, layer)."""
    n, lps, num_micro = self.stages, self.layers_per_stage, self.microbatches
    b_total = x_BxSxD.shape[0]
    if b_total % num_micro:
      raise ValueError(f'batch {b_total} is not divisible by config.train.pipeline_microbatches={num_micro}')
    lead = jax.tree.leaves(layers)[0].shape[0]
    if lead != self.padded_layers:
      raise ValueError(f'pipelined layers must be padded to {self.padded_layers}, got {lead} (pipeline.pad_layers)')

    def split(a):  # [B, ...] -> [M, B/M, ...], micro-batch m = rows m, m + M, ... (each device keeps its rows)
      a = jnp.asarray(a)
      if a.shape[0] == 1:
        return jnp.broadcast_to(a[None], (num_micro,) + a.shape)
      a = a.reshape((b_total // num_micro, num_micro) + a.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(a, (None, 'batch') + (None,) * (a.ndim - 2))

    x_MxbxSxD = split(x_BxSxD)
    aux_M = jax.tree.map(split, (rope_parts, mask))
    params_NxL = jax.tree.map(lambda w: w.reshape((n, lps) + w.shape[1:]), layers)

    def run_stage(p_L, x_bxSxD, micro, stage):
      """One stage's layers on one micro-batch (`micro` -1: an idle tick, computed on whatever the slot holds)."""
      m = jnp.maximum(micro, 0)
      parts, mask_m = jax.tree.map(lambda a: a[m], aux_M)

      def layer(x, p_i):
        p, i = p_i
        layer_id = stage * lps + i
        key = None if dropout_key is None else jax.random.fold_in(jax.random.fold_in(dropout_key, m), layer_id)
        y = block_fn(p, x, layer_id, parts, mask_m, key)
        return jnp.where(layer_id < self.num_layers, y, x), None  # a padding slot passes its input on

      return jax.lax.scan(layer, x_bxSxD, (p_L, jnp.arange(lps, dtype=jnp.int32)))[0]

    schedule_TxN = jnp.asarray(self.schedule())

    def stage_loop(p_1xL, x_Mxbx, sched):
      """On each stage's devices (manual over `stage`, automatic over the other mesh axes): the whole schedule."""
      stage = jax.lax.axis_index('stage')
      p_L = jax.tree.map(lambda w: w[0], p_1xL)

      def tick(carry, micro_N):
        slot, out_Mxbx = carry
        # Hand the slot to the next stage (stage 0 receives nothing) and take micro-batch micro_N[0] in at stage 0.
        slot = jax.lax.ppermute(slot, 'stage', [(i, i + 1) for i in range(n - 1)])
        slot = jnp.where(stage == 0, x_Mxbx[jnp.maximum(micro_N[0], 0)], slot)
        slot = run_stage(p_L, slot, micro_N[stage], stage)
        done = micro_N[n - 1]  # the micro-batch the last stage just finished, or -1
        row = jnp.maximum(done, 0)
        keep = (done >= 0) & (stage == n - 1)
        out_Mxbx = out_Mxbx.at[row].set(jnp.where(keep, slot, out_Mxbx[row]))
        return (slot, out_Mxbx), None

      init = jax.lax.pcast((jnp.zeros_like(x_Mxbx[0]), jnp.zeros_like(x_Mxbx)), ('stage',), to='varying')
      (_, out_Mxbx), _ = jax.lax.scan(tick, init, sched)
      return jax.lax.psum(out_Mxbx, 'stage')  # only the last stage's is non-zero

    out_MxbxSxD = jax.shard_map(stage_loop, in_specs=(PartitionSpec('stage'), PartitionSpec(), PartitionSpec()),
                                out_specs=PartitionSpec(), axis_names={'stage'})(params_NxL, x_MxbxSxD, schedule_TxN)
    return out_MxbxSxD.swapaxes(0, 1).reshape(x_BxSxD.shape)

  # ------------------------------------------------------------------------------------------------------------
  # Padded layer stacks <-> the stored [L, ...] layout

  def pad_layers(self, tree):
    """Every stacked array under a 'layers' key padded with zero layers to [padded_layers, ...]."""
    extra = self.padded_layers - self.num_layers
    return _map_layers(lambda x: jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)) if extra else x, tree)

  def unpad_layers(self, tree):
    return _map_layers(lambda x: x[:self.num_layers], tree)


def for_config(config) -> Pipeline | None:
  """The Pipeline a config asks for (config.mesh.stage > 1), or None."""
  stages = int(config.mesh.stage)
  if stages <= 1:
    return None
  return Pipeline(stages, int(config.train.get('pipeline_microbatches', 0)) or stages, int(config.model.num_layers))


def _map_layers(fn, tree, *others):
  """fn(leaf, *others' leaves) over the leaves under a 'layers' key (params, and Adam's moments shaped like them);
  other leaves are kept."""
  def visit(path, x, *o):
    return fn(x, *o) if any(getattr(k, 'key', getattr(k, 'name', None)) == 'layers' for k in path) else x
  return jax.tree_util.tree_map_with_path(visit, tree, *others)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: the train state's padded stacks written as [L, ...]


def stored_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """Where an unpadded [L, ...] copy of a stage-split array lives: `stage` moves from the layer axis to the first
  other axis it divides (after that axis's own split), or is dropped (small arrays, e.g. LayerNorm scales)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  axes = lambda t: () if t is None else (t,) if isinstance(t, str) else tuple(t)  # noqa: E731
  if 'stage' not in axes(spec[0]):
    return sharding
  mesh = sharding.mesh
  spec[0] = tuple(a for a in axes(spec[0]) if a != 'stage') or None
  for d in range(1, len(shape)):
    split = math.prod(mesh.shape[a] for a in axes(spec[d])) * mesh.shape['stage']
    if shape[d] % split == 0:
      spec[d] = axes(spec[d]) + ('stage',)
      break
  return NamedSharding(mesh, PartitionSpec(*spec))


def to_stored(pipeline: Pipeline | None, tree):
  """A train state (or params) with padded stacks -> the same with [L, ...] stacks, for a checkpoint write."""
  if pipeline is None or pipeline.padded_layers == pipeline.num_layers:
    return tree
  return _map_layers(lambda x: jax.jit(lambda a: a[:pipeline.num_layers], out_shardings=stored_sharding(
      x.sharding, (pipeline.num_layers,) + x.shape[1:]))(x), tree)


def stored_target(pipeline: Pipeline | None, abstract):
  """Restore targets (ShapeDtypeStructs with shardings) in the [L, ...] layout for a padded abstract state."""
  if pipeline is None or pipeline.padded_layers == pipeline.num_layers:
    return abstract

  def target(x):
    shape = (pipeline.num_layers,) + tuple(x.shape[1:])
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=stored_sharding(x.sharding, shape))
  return _map_layers(target, abstract)


def from_stored(pipeline: Pipeline | None, tree, shardings):
  """The inverse of to_stored: [L, ...] stacks padded and placed on the train state's `shardings`."""
  if pipeline is None or pipeline.padded_layers == pipeline.num_layers:
    return tree
  extra = pipeline.padded_layers - pipeline.num_layers

  def pad(x, s):
    return jax.jit(lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)), out_shardings=s)(x)
  return _map_layers(pad, tree, shardings)
