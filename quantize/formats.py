"""The quantized weight formats, registered with glm_jax/weights.py: 'int8' and 'int4', and their grouped variants.

Names:
- 'int8', 'int4': one scale per output row (GLM-130B's format at tensor-parallel degree 1);
- 'int8-g128', 'int4-g64', ...: one scale per output row and group of that many input columns;
- 'int8-tp8', 'int4-tp4', ...: a release checkpoint quantized for that tensor-parallel degree, whose row-parallel
  layers (attention dense, 4h-to-h: input axes split over 'tensor') carry one scale per row per shard, and whose
  column-parallel ones one per row.

The four layer matrices are stored as {'q': int8 [*out, I * bits / 8], 'scale': float16 [*out, G]}: the release's
layout (quantize/format.py) with the output axes kept apart (the model's [N, 3, H] for QKV, [2, F] for the GeGLU
input), and the input axes merged (their first one is the one that may be split). The product is
quantize/kernels.py's. The tied embedding keeps floating point in the checkpoint's dtype, output-major ('out_in'), as
GLM-130B keeps it in fp16. Quantized weights shard by the float weights' logical axes: q by the output axes and its
(packed) columns by the input axis, the scales' groups by the input axis when there is more than one group. So tensor
parallelism splits QKV's heads and the GeGLU width F (each shard holding matching value and gate rows, as SAT's
GLU-interleaved ranks) and the input groups of the row-parallel layers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import weights
from quantize import format as release_format
from quantize import kernels

# Input axes that tensor parallelism splits (glm_jax/config.py's rules): the row-parallel layers.
_TENSOR_SPLIT_INPUTS = ('heads', 'mlp')
_NAME = re.compile(r'int(4|8)(?:-(g|tp)([1-9][0-9]*))?')


def is_quantized(weight_format: str) -> bool:
  return _NAME.fullmatch(weight_format) is not None


def format_name(bits: int, group_size: int | None = None, tensor_parallel: int | None = None) -> str:
  release_format.qmax(bits)
  if group_size and tensor_parallel:
    raise ValueError('give a group size or a tensor-parallel degree, not both')
  return f'int{bits}' + (f'-g{group_size}' if group_size else f'-tp{tensor_parallel}' if tensor_parallel else '')


def _keeps_float(spec: weights.Spec) -> bool:
  """The tied embedding (the one matrix whose checkpoint is output-major and whose rows are looked up)."""
  return spec.checkpoint == 'out_in'


@dataclasses.dataclass(frozen=True)
class QuantizedWeight(weights.Weight):
  """A layer matrix as int8 q [*out, I*bits/8] and float16 scales [*out, G]; subclasses fix bits and the groups."""
  name: ClassVar[str]
  bits: ClassVar[int]
  group_size: ClassVar[int | None] = None       # input columns per scale group
  tensor_parallel: ClassVar[int | None] = None  # or: groups per shard of the row-parallel layers
  q: Any
  scale: Any
  spec: weights.Spec

  @classmethod
  def groups(cls, spec: weights.Spec) -> int:
    if cls.tensor_parallel:
      if spec.in_axes[0] not in _TENSOR_SPLIT_INPUTS:
        return 1
      if spec.i % cls.tensor_parallel:
        raise ValueError(f'{cls.name}: {spec.i} input columns do not split into {cls.tensor_parallel} shards')
      return cls.tensor_parallel
    return release_format.num_groups(spec.i, cls.group_size)

  @classmethod
  def convert(cls, w, spec):
    if _keeps_float(spec):
      return weights.OutIn.convert(w, spec)
    groups = cls.groups(spec)
    w_OxI = spec.o_by_i(w)
    if isinstance(w_OxI, np.ndarray):
      q, scale = release_format.quantize_weight(w_OxI, cls.bits, spec.i // groups if groups > 1 else None)
      stored = {'q': q, 'scale': scale}
    else:
      stored = _quantize_traced(w_OxI, cls.bits, groups)
    return {k: v.reshape(spec.out_shape + (-1,)) for k, v in stored.items()}

  @classmethod
  def axes(cls, spec):
    if _keeps_float(spec):
      return weights.OutIn.axes(spec)
    in_axis = spec.in_axes[0]
    return {'q': spec.out_axes + (in_axis,), 'scale': spec.out_axes + (in_axis if cls.groups(spec) > 1 else None,)}

  @classmethod
  def from_release(cls, q_OxB, scale_OxG, spec: weights.Spec) -> dict:
    """Stored arrays from the release's q [O, bytes] and scales [O] or [O, G]."""
    return {'q': q_OxB.reshape(spec.out_shape + (-1,)), 'scale': scale_OxG.reshape(spec.out_shape + (-1,))}

  def release(self):
    """(q [O, bytes], scales [O, G]): the release's layout (leading stacked-layer axes kept)."""
    n_out = len(self.spec.out_shape)
    lead = self.q.shape[:self.q.ndim - n_out - 1]
    return self.q.reshape(lead + (self.spec.o, -1)), self.scale.reshape(lead + (self.spec.o, -1))

  @classmethod
  def wrap(cls, stored, spec):
    if _keeps_float(spec):
      return weights.OutIn(w=stored, spec=spec)
    return cls(q=stored['q'], scale=stored['scale'], spec=spec)

  def matmul(self, x):
    lead = x.shape[:x.ndim - len(self.spec.in_shape)]
    x_MxI = x.reshape(-1, self.spec.i)
    if not jax.sharding.get_abstract_mesh().empty:  # the output axes kept apart, so that their sharding holds
      w = kernels.dequantize(self.q, self.scale, self.bits, x.dtype)
      outs = 'nopqrst'[:len(self.spec.out_shape)]
      y = jnp.einsum(f'mi,{outs}i->m{outs}', x_MxI, w, preferred_element_type=jnp.float32)
      return y.reshape(lead + self.spec.out_shape)
    q_OxB, scale_OxG = self.release()
    y_MxO = kernels.quantized_matmul(x_MxI, q_OxB, scale_OxG, self.bits)
    return y_MxO.reshape(lead + self.spec.out_shape)

  def to_checkpoint(self):
    """The dequantized float16 matrix (what the release's extraction kernels compute), in the checkpoint layout."""
    q_OxB, scale_OxG = self.release()
    if isinstance(q_OxB, np.ndarray):
      w_OxI = release_format.dequantize_weight(q_OxB, scale_OxG, self.bits)
    else:
      w_OxI = kernels.dequantize(q_OxB, scale_OxG, self.bits, jnp.float16)
    return self.spec.from_o_by_i(w_OxI)


def _quantize_traced(w_OxI, bits: int, groups: int):
  """quantize_weight for jax arrays (inside jit: random initialisation, on-device conversion)."""
  o, i = w_OxI.shape
  qmax = release_format.qmax(bits)
  w16 = w_OxI.astype(jnp.float16).reshape(o, groups, i // groups)
  scale = (jnp.abs(w16).max(-1) / jnp.float16(qmax)).astype(jnp.float16)
  safe = jnp.where(scale == 0, jnp.float16(1), scale)
  q = jnp.clip(jnp.round(w16 / safe[..., None]), -qmax, qmax).astype(jnp.int8).reshape(o, i)
  if bits == 4:
    q = ((q[:, 0::2].astype(jnp.uint8) << 4) | (q[:, 1::2].astype(jnp.uint8) & 0xF)).view(jnp.int8)
  return {'q': q, 'scale': scale}


def format_class(name: str) -> type[QuantizedWeight]:
  """The registered class of a quantized format name (creating and registering it on first use)."""
  match = _NAME.fullmatch(name)
  if match is None:
    raise ValueError(f'{name!r} is not a quantized weight format (int8, int4, int4-g128, int4-tp8, ...)')
  bits, kind, n = int(match[1]), match[2], int(match[3]) if match[3] else None
  attrs = {'name': name, 'bits': bits, 'group_size': n if kind == 'g' else None,
           'tensor_parallel': n if kind == 'tp' else None, '__qualname__': f'Int{bits}Weight'}
  cls = dataclasses.dataclass(frozen=True)(type(f'Int{bits}Weight', (QuantizedWeight,), attrs))
  return weights.register(cls)


weights.register_family(_NAME, format_class)
