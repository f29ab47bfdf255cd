"""Weight formats: how each big matrix of the model is stored and multiplied. The model's one seam for it.

The model declares its five matrices (the four kernels of each layer and the tied embedding) by a `Spec` (logical
shape and axis names, and how the checkpoint stores it) and uses each only through the `Weight` that `declare`
returns: `w.matmul(x)` is x @ W with float32 accumulation, and `w.lookup(ids)` the rows of the tied embedding. How
the arrays are laid out, and how the product is computed, is the format's business; the model does not know which
formats exist.

Formats, by name (`get`, `names`):
- 'in_out': the checkpoint layout, in which training runs: a layer kernel [*in, *out], the tied embedding [V, D].
- 'out_in': layer kernels [*out, *in]. A decode step's vector-matrix products stream a weight faster this way on CPU,
  and up to OUTPUT_MAJOR_MAX_ROWS rows XLA:CPU computes W @ x.T faster than x @ W.T (the tied embedding [V, D] is
  output-major in every format that keeps it, so it takes the same path).
- 'packed' (registered by glm_jax/cpu_kernels.py): W [O, I] in tiles of four rows, for the CPU decoding kernel.
- 'int8', 'int4', 'int4-g128', 'int4-tp8', ... (registered by quantize/formats.py, a family of names): GLM-130B's
  weight-only quantization.

Registering a format (glm_jax/cpu_kernels.py does it for 'packed'; quantize/ does it for 'int8' and 'int4'):

    @weights.register
    @dataclasses.dataclass(frozen=True)
    class MyWeight(weights.Weight):
      name = 'my_format'              # ClassVar: the name configs, checkpoints and converters use
      w: jax.Array                    # the stored arrays: dataclass fields, the pytree's children
      spec: weights.Spec              # static (the pytree's auxiliary data): shapes and logical axes

      @classmethod
      def convert(cls, w, spec): ...  # the stored arrays (an array, or a dict of arrays) from the checkpoint array
                                      # w (numpy or jax, shape spec.checkpoint_shape)
      @classmethod
      def axes(cls, spec): ...        # the logical axis names of each stored array (same structure as convert's)
      def matmul(self, x): ...        # x [..., *spec.in_shape] -> [..., *spec.out_shape], float32
      def lookup(self, ids): ...      # the matrix's rows by output index (for the tied embedding), [..., I]
      def to_checkpoint(self): ...    # optional: back to the checkpoint array (default: an error naming the format)

`register` makes the class a pytree (its array fields the children, `spec` static) and adds it by name. The default
`declare` creates the stored arrays as one Flax parameter, initialised by converting a checkpoint-layout draw, each
array boxed with its logical axis names so that the mesh rules shard it; `wrap(stored, spec)` rebuilds the Weight
from stored arrays (the default takes an array as the first field, or a dict's keys as the fields).

Parameter trees convert between formats with `convert_params` / `to_checkpoint_params`, leaf by leaf and layer by
layer (a stacked [L, ...] leaf is converted one layer at a time).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import math
import re
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CHECKPOINT_FORMAT = 'in_out'
# Up to this many rows (tokens), an output-major [O, I] weight is applied on CPU as W @ x.T and the small [O, M]
# result transposed back: a decode step's product. On XLA:CPU, x @ W.T with 8 to 32 rows takes 1.5-2x as long as
# W @ x.T on the small config's kernels; from 128-256 rows on it is the faster GEMM (one core, M = 1..512).
OUTPUT_MAJOR_MAX_ROWS = 64

_FORMATS: dict[str, type['Weight']] = {}
_FAMILIES: list[tuple[Any, Callable[[str], type['Weight']]]] = []  # (compiled name pattern, class factory)
# Formats registered by a module imported on first use: name pattern -> module.
_LAZY = (('packed', 'glm_jax.cpu_kernels'), (r'int[0-9]+(-.*)?', 'quantize.formats'))


@dataclasses.dataclass(frozen=True)
class Spec:
  """One matrix of the model: x [..., *in_shape] @ W -> [..., *out_shape], the logical axis names of both sides, and
  how the checkpoint stores it: 'in_out' ([*in_shape, *out_shape], the layer kernels) or 'out_in' ([*out_shape,
  *in_shape], the tied embedding [V, D], whose rows are also looked up)."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  checkpoint: str = 'in_out'

  @property
  def i(self) -> int:
    return math.prod(self.in_shape)

  @property
  def o(self) -> int:
    return math.prod(self.out_shape)

  @property
  def checkpoint_shape(self) -> tuple[int, ...]:
    return self.in_shape + self.out_shape if self.checkpoint == 'in_out' else self.out_shape + self.in_shape

  @property
  def checkpoint_axes(self) -> tuple[str | None, ...]:
    return self.in_axes + self.out_axes if self.checkpoint == 'in_out' else self.out_axes + self.in_axes

  def o_by_i(self, w):
    """The checkpoint array w as the matrix W [O, I]."""
    return w.reshape(self.i, self.o).T if self.checkpoint == 'in_out' else w.reshape(self.o, self.i)

  def from_o_by_i(self, w_OxI):
    """The inverse of `o_by_i`."""
    return (w_OxI.T if self.checkpoint == 'in_out' else w_OxI).reshape(self.checkpoint_shape)


class Weight:
  """A matrix in some storage format: a pytree of its arrays with a static `spec` (see the module docstring)."""
  name: ClassVar[str]
  spec: Spec

  @classmethod
  def convert(cls, w, spec: Spec):
    raise NotImplementedError

  @classmethod
  def axes(cls, spec: Spec):
    raise NotImplementedError

  @classmethod
  def wrap(cls, stored, spec: Spec) -> 'Weight':
    arrays = stored if isinstance(stored, collections.abc.Mapping) else {dataclasses.fields(cls)[0].name: stored}
    return cls(**arrays, spec=spec)

  @classmethod
  def declare(cls, module: nn.Module, name: str, spec: Spec, init: Callable, dtype) -> 'Weight':
    """Creates the parameter `name` of `module` in this format; init(key, spec.checkpoint_shape, dtype) draws the
    matrix in the checkpoint layout."""
    def make(key):
      stored = cls.convert(init(key, spec.checkpoint_shape, dtype), spec)
      return jax.tree.map(lambda a, names: nn.LogicallyPartitioned(a, names), stored, cls.axes(spec))
    return cls.wrap(module.param(name, make), spec)

  def matmul(self, x):
    raise NotImplementedError

  def lookup(self, ids):
    raise NotImplementedError(f'weight format {self.name!r} has no row lookup')

  def to_checkpoint(self):
    raise ValueError(f"weights in format {self.name!r} cannot be converted back to the checkpoint layout "
                     f"({CHECKPOINT_FORMAT!r})")


def register(cls: type[Weight]) -> type[Weight]:
  """Adds a Weight subclass (a frozen dataclass) under its `name` and registers it as a pytree (class decorator)."""
  if not getattr(cls, 'name', None):
    raise ValueError(f'{cls.__name__} needs a class attribute `name`')
  if cls.name in _FORMATS and _FORMATS[cls.name] is not cls:
    raise ValueError(f'weight format {cls.name!r} is registered already (by {_FORMATS[cls.name].__name__})')
  fields = [f.name for f in dataclasses.fields(cls)]
  jax.tree_util.register_dataclass(cls, data_fields=[f for f in fields if f != 'spec'], meta_fields=['spec'])
  _FORMATS[cls.name] = cls
  return cls


def register_family(pattern, factory: Callable[[str], type[Weight]]) -> None:
  """Adds a family of format names: `get(name)` for a name that fully matches the compiled regex `pattern` calls
  factory(name), which registers and returns the class (quantize/formats.py: 'int4-g128' and the like)."""
  _FAMILIES.append((pattern, factory))


def get(name: str) -> type[Weight]:
  """The format registered under `name` (ValueError listing the known ones)."""
  if name not in _FORMATS:
    for pattern, module in _LAZY:
      if re.fullmatch(pattern, name):
        importlib.import_module(module)
    family = next((factory for pattern, factory in _FAMILIES if pattern.fullmatch(name)), None)
    if family is not None:
      return family(name)
  if name not in _FORMATS:
    raise ValueError(f'unknown weight format {name!r}; known formats: {", ".join(names())}, and int8 / int4 with '
                     '-g<group size> or -tp<tensor-parallel degree>')
  return _FORMATS[name]


def names() -> list[str]:
  return sorted(_FORMATS)


# ------------------------------------------------------------------------------------------------------------------
# Products shared by the array formats


def _is_split(logical_axis: str | None) -> bool:
  """Whether the active axis rules and mesh (sharding.activate) split this logical axis over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or logical_axis is None:
    return False
  target = nn.logical_to_mesh_axes((logical_axis,))[0]
  axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return math.prod(mesh.shape[a] for a in axes) > 1


def _may_merge(axes) -> bool:
  """Whether a group of axes may be merged into one without moving data: no axis but the first is split."""
  return not any(_is_split(a) for a in axes[1:])


def _letters(spec: Spec):
  return 'abcdefg'[:len(spec.in_shape)], 'nopqrst'[:len(spec.out_shape)]


def _matmul_in_major(x, w, spec: Spec):
  """x [..., *in] @ w [*in, *out] in float32. Where the merge keeps the sharding, as one 2-D product over w [I, O]:
  on a kernel with several output axes XLA otherwise transposes it to put the contracted axes together, a weight copy
  per call (in training, per backward pass)."""
  lead = x.shape[:x.ndim - len(spec.in_shape)]
  if _may_merge(spec.in_axes) and _may_merge(spec.out_axes):
    y = jnp.einsum('...i,io->...o', x.reshape(lead + (spec.i,)), w.reshape(spec.i, spec.o),
                   preferred_element_type=jnp.float32)
    return y.reshape(lead + spec.out_shape)
  ins, outs = _letters(spec)
  return jnp.einsum(f'...{ins},{ins}{outs}->...{outs}', x, w, preferred_element_type=jnp.float32)


def _matmul_out_major(x, w, spec: Spec):
  """x [..., *in] @ w.T for w [*out, *in] in float32; with at most OUTPUT_MAJOR_MAX_ROWS rows on CPU as w @ x.T."""
  lead = x.shape[:x.ndim - len(spec.in_shape)]
  merge = _may_merge(spec.in_axes) and _may_merge(spec.out_axes)
  ins, outs = ('i', 'o') if merge else _letters(spec)
  if merge:
    x, w = x.reshape(lead + (spec.i,)), w.reshape(spec.o, spec.i)

  def general(x, w):
    return jnp.einsum(f'...{ins},{outs}{ins}->...{outs}', x, w, preferred_element_type=jnp.float32)

  def few_rows(x, w):
    x_Mx = x.reshape((-1,) + x.shape[len(lead):])
    y_xM = jnp.einsum(f'{outs}{ins},M{ins}->{outs}M', w, x_Mx, preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose into the product, which would turn it back into x @ w.T.
    y_Mx = jnp.moveaxis(jax.lax.optimization_barrier(y_xM), -1, 0)
    return y_Mx.reshape(lead + y_Mx.shape[1:])

  if math.prod(lead) <= OUTPUT_MAJOR_MAX_ROWS:
    y = jax.lax.platform_dependent(x, w, cpu=few_rows, default=general)
  else:
    y = general(x, w)
  return y.reshape(lead + spec.out_shape)


@register
@dataclasses.dataclass(frozen=True)
class InOut(Weight):
  """The checkpoint layout: a layer kernel [*in, *out], the tied embedding [V, D] (output-major)."""
  name: ClassVar[str] = 'in_out'
  w: Any
  spec: Spec

  @classmethod
  def convert(cls, w, spec):
    return w

  @classmethod
  def axes(cls, spec):
    return spec.checkpoint_axes

  def matmul(self, x):
    w = self.w.astype(x.dtype)
    if self.spec.checkpoint == 'out_in':
      return _matmul_out_major(x, w, self.spec)
    return _matmul_in_major(x, w, self.spec)

  def lookup(self, ids):
    return jnp.take(self.w, ids, axis=0)

  def to_checkpoint(self):
    return self.w


@register
@dataclasses.dataclass(frozen=True)
class OutIn(Weight):
  """Every matrix output-major, [*out, *in] (the tied embedding as in the checkpoint)."""
  name: ClassVar[str] = 'out_in'
  w: Any
  spec: Spec

  @classmethod
  def convert(cls, w, spec):
    if spec.checkpoint == 'out_in':
      return w
    n_in = len(spec.in_shape)
    perm = tuple(range(n_in, w.ndim)) + tuple(range(n_in))
    return w.transpose(perm)

  @classmethod
  def axes(cls, spec):
    return spec.out_axes + spec.in_axes

  def matmul(self, x):
    return _matmul_out_major(x, self.w.astype(x.dtype), self.spec)

  def lookup(self, ids):
    return jnp.take(self.w, ids, axis=0)

  def to_checkpoint(self):
    if self.spec.checkpoint == 'out_in':
      return self.w
    n_out = len(self.spec.out_shape)
    return self.w.transpose(tuple(range(n_out, self.w.ndim)) + tuple(range(n_out)))


# ------------------------------------------------------------------------------------------------------------------
# Parameter trees


def _map_layers(fn, stored, lead: int):
  """fn on one layer's arrays; over `lead` leading (stacked layer) axes, one index at a time."""
  if lead == 0:
    return fn(stored)
  leaves = jax.tree.leaves(stored)
  if all(isinstance(a, np.ndarray) for a in leaves):  # on the host: one layer's copy at a time
    parts = [_map_layers(fn, jax.tree.map(lambda a, i=i: a[i], stored), lead - 1) for i in range(leaves[0].shape[0])]
    return jax.tree.map(lambda *xs: np.stack(xs), *parts)
  return jax.vmap(lambda one: _map_layers(fn, one, lead - 1))(stored)


def _leading_axes(stored, fmt: type[Weight], spec: Spec) -> int:
  first_axes = jax.tree.leaves(fmt.axes(spec), is_leaf=lambda x: isinstance(x, tuple))[0]
  return jax.tree.leaves(stored)[0].ndim - len(first_axes)


def convert_params(params, specs: dict[str, Spec], weight_format: str):
  """A checkpoint-layout ('in_out') parameter tree with every matrix named in `specs` (by leaf name, stacked or per
  layer) stored in `weight_format` instead; the other leaves are kept as they are."""
  fmt = get(weight_format)

  def convert(key, w):
    spec = specs[key]
    lead = w.ndim - len(spec.checkpoint_shape)
    if lead < 0 or tuple(w.shape[lead:]) != spec.checkpoint_shape:
      raise ValueError(f'{key} has shape {tuple(w.shape)}, not the checkpoint layout {spec.checkpoint_shape} (is '
                       'this tree in another weight format already?)')
    try:
      return _map_layers(lambda v: fmt.convert(v, spec), w, lead)
    except ValueError as e:
      raise ValueError(f'{key}: {e}') from None
  return _map_matrices(convert, params, specs) if fmt is not InOut else params


def to_checkpoint_params(params, specs: dict[str, Spec], weight_format: str):
  """The inverse of `convert_params`: every matrix back in the checkpoint layout (ValueError naming a format that
  cannot be converted back)."""
  fmt = get(weight_format)

  def back(key, stored):
    spec = specs[key]
    return _map_layers(lambda s: fmt.wrap(s, spec).to_checkpoint(), stored, _leading_axes(stored, fmt, spec))
  return _map_matrices(back, params, specs) if fmt is not InOut else params


def _map_matrices(fn, params, specs):
  """params with fn(key, value) in place of every value whose key names a matrix in `specs` (at any depth)."""
  return {k: fn(k, v) if k in specs else _map_matrices(fn, v, specs) if isinstance(v, collections.abc.Mapping)
          else v for k, v in params.items()}


def unstack_layers(params):
  """Stacked layer parameters (params['layers'], leading axis L: the layout of training and checkpoints) to the
  per-layer trees params['layers_0'] ... of a scan_layers=False model. Works on numpy arrays (once, on the host) and
  inside jit (slices, copied once per call)."""
  if 'layers' not in params:
    return params
  stacked = params['layers']
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def stack_layers(params):
  """The inverse of `unstack_layers`."""
  names = sorted((k for k in params if k.startswith('layers_')), key=lambda k: int(k.split('_')[1]))
  if not names:
    return params
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  out['layers'] = jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs),
                               *(params[k] for k in names))
  return out
