"""The device mesh, logical-axis rules, and parameters created already sharded.

The model names every parameter axis and its main activations with logical names ('embed', 'heads', 'batch', ...).
`config.axis_rules` maps those names to the mesh axes of `config.mesh` (data, fsdp, tensor, stage). A parameter is
created under jit with its output sharding, so no device ever holds the whole model unless the rules say so.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor', 'stage')


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes from `config.mesh`, resolving one -1 to the devices left over."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  unknown = sorted(set(mesh_config.keys()) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}')
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}')
  if any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f'config.mesh: axis sizes must be positive (or one -1), got {sizes}')
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh {sizes}: {num_devices} devices are not divisible by {fixed}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'config.mesh {sizes} needs {math.prod(sizes.values())} devices, '
                     f'but {num_devices} are available')
  return sizes


def nominal_mesh_shape(mesh_config) -> dict[str, int]:
  """Axis sizes of `config.mesh` for a mesh that need not exist here (sizing shards): -1 read as 1."""
  return {a: max(1, int(mesh_config[a])) for a in MESH_AXES}


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A classic (Auto-axis, GSPMD) mesh over `devices` (default: all), axes in MESH_AXES order."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  """The rule list as tuples (ConfigDict stores what the config file wrote)."""
  return tuple((name, tuple(target) if isinstance(target, list) else target) for name, target in config.axis_rules)


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules):
  """Within this block, the model's activation constraints resolve against `mesh` and `rules` (mesh None: no-op)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_specs(boxed_tree):
  """Logical PartitionSpecs of a tree of nn.LogicallyPartitioned boxes (e.g. from jax.eval_shape of init)."""
  return nn.get_partition_spec(boxed_tree)


def shardings_for(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for each leaf of a boxed abstract tree, by the rules."""
  return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def dummy_inputs(model_config, batch: int = 1, length: int = 8):
  """Inputs of the right shapes and dtypes for initialising or tracing the model."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  if model_config.position_encoding_2d:
    positions = jnp.zeros((batch, 2, length), jnp.int32)
  else:
    positions = jnp.zeros((batch, length), jnp.int32)
  mask = jnp.ones((1, 1, length, length), jnp.bool_)
  return tokens, positions, mask


def abstract_params(model, model_config):
  """Boxed abstract parameters (shapes, dtypes, logical axes) without allocating anything."""
  rng = jax.random.key(0)
  return jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model_config))['params'], rng)


def init_params(model, model_config, rng, mesh: Mesh | None = None, rules=None):
  """Initialised parameters as a plain dict, each created directly with its sharding (when a mesh is given); a
  pipelined model's layer stacks padded to its stages (glm_jax/pipeline.py)."""
  boxed = abstract_params(model, model_config)

  def init(r):
    params = nn.meta.unbox(model.init(r, *dummy_inputs(model_config))['params'])
    return params if model.pipeline is None else model.pipeline.pad_layers(params)

  if mesh is None:
    return jax.jit(init)(rng)
  out_shardings = shardings_for(boxed, mesh, rules)
  with activate(mesh, rules):
    return jax.jit(init, out_shardings=out_shardings)(rng)


def param_shardings(model, model_config, mesh: Mesh, rules):
  """NamedShardings for the plain parameter dict (for jit in_shardings or Orbax restore targets)."""
  return shardings_for(abstract_params(model, model_config), mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch-leading input array of rank `ndim`: batch axis by the rules, the rest replicated."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec if spec is not None else PartitionSpec())


def batch_devices(mesh: Mesh, rules) -> int:
  """How many ways the rules split the batch axis over the mesh (a batch must be a multiple of it)."""
  return math.prod(mesh.shape[a] for a in _rule_axes(dict(rules).get('batch')))


def _rule_axes(target) -> tuple[str, ...]:
  """The mesh axes a rule's target names (None, one axis, or a tuple of axes)."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


# The config.model field behind each logical parameter axis, for errors that say what to change.
_AXIS_FIELDS = {'embed': 'hidden_size', 'heads': 'num_attention_heads', 'mlp': 'inner_hidden_size',
                'vocab': 'vocab_size', 'layers': 'num_layers'}


def check_mesh_fits(model, model_config, rules, sizes: dict[str, int]) -> None:
  """ValueError unless every parameter dimension divides by the mesh axes the rules split it over. The message
  names the config field, the mesh axis and the sizes of that axis that would work. (A pipelined model pads its
  layer stacks to the stages: any layer count fits.)"""
  boxed = abstract_params(model, model_config)
  table = dict(rules)
  for path, box in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    for dim, name in zip(box.value.shape, box.names):
      if name == 'layers' and getattr(model, 'pipeline', None) is not None:
        continue
      axes = _rule_axes(table.get(name))
      split = math.prod(sizes.get(a, 1) for a in axes)
      if split > 1 and dim % split:
        field = _AXIS_FIELDS.get(name)
        what = f'config.model.{field}={dim}' if field else f'the {name!r} axis ({dim})'
        where = ' x '.join(f'{a}={sizes[a]}' for a in axes)
        fits = [d for d in range(2, min(dim, 1024) + 1) if dim % d == 0][:8]
        raise ValueError(f'the mesh cannot split {what} over {where} (logical axis {name!r} of '
                         f'{jax.tree_util.keystr(path)}, by config.axis_rules); {where} must divide {dim}: '
                         f'sizes that do: 1{"".join(f", {d}" for d in fits)}')


def shard_shape(shape, logical_axes, rules, sizes: dict[str, int]) -> tuple[int, ...]:
  """The shape of one device's shard of an array with these logical axes, by the rules, on a mesh of these sizes."""
  table = dict(rules)
  out = []
  for dim, name in zip(shape, logical_axes):
    out.append(math.ceil(dim / math.prod(sizes[t] for t in _rule_axes(table.get(name)))))
  return tuple(out)


def parameter_table(config, sizes: dict[str, int], weight_format: str = 'in_out'):
  """Rows (path, shape, logical axes, count, bytes per device) of a config's parameters, their big matrices stored
  in `weight_format` (e.g. 'int4': quantize/), on a mesh of these sizes (which need not exist here), by abstract
  evaluation: nothing is allocated. `count` is the stored elements (an INT4 byte holds two weights)."""
  from glm_jax.model import GLM
  boxed = abstract_params(GLM(config.model, weight_format=weight_format), config.model)
  rules = axis_rules(config)
  rows = []
  for path, box in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    value = box.value
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    count = math.prod(value.shape)
    per_device = math.prod(shard_shape(value.shape, box.names, rules, sizes)) * value.dtype.itemsize
    rows.append((name, tuple(value.shape), tuple(box.names), count, per_device))
  return rows
