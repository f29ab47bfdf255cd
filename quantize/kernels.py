"""Fused dequantize-matmul kernels: y = x @ dequant(q, scale).T with float32 accumulation, in Pallas for GPU and TPU,
and the XLA formulation they fall back to.

Weights arrive in GLM-130B's layout (quantize/format.py): q int8 [O, I] (INT8) or [O, I/2] (INT4, the even column in
the high nibble), scales [O, G] (G groups of I/G input columns; G = 1 is one scale per row). The kernels never expand
the weight in memory: each block of q is read once, its nibbles unpacked in registers with shifts (int32, which every
backend supports), and multiplied with the matching activations. INT4's even and odd columns are not interleaved
back: x is split into its even and odd columns outside the kernel (x is small), and the block's product is
x_even @ hi.T + x_odd @ lo.T. Integer weights times activations are exact in the activation dtype, the sums are
float32, and the scale multiplies each group's float32 partial sum (per-row scales once, at the end).

Lowerings: GPU kernels go through Pallas's Triton lowering (`pltriton.CompilerParams`), not Mosaic GPU: Triton runs on
the Ampere cards GLM-130B's INT4 users have (RTX 3090, A100) as well as Hopper, and its kernels run in interpret mode
on CPU, so the tests check them here; Mosaic GPU targets Hopper and later and has no public multi-block interpreter.
TPU kernels go through Mosaic TPU (`pltpu.CompilerParams`) with the K axis as the grid's last, sequential dimension
and a VMEM accumulator. Both read int8 refs (TPU Pallas has no int4 refs).

The reference a kernel is tested against is SAT's W8A16 path: dequantize to the activation dtype, then matmul. The
two differ by one rounding of each dequantized weight to the activation dtype (relative 2^-11 in fp16, 2^-8 in bf16;
exact in fp32, where q * scale fits the significand) plus float32 summation order: see tests/test_quantize.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from glm_jax import cpu_kernels


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Block sizes: m rows of x, n output rows of W, k input columns (of the unpacked weight) per step."""
  m: int
  n: int
  k: int
  num_warps: int = 4
  num_stages: int = 2


def default_blocks(backend: str, m: int, group: int | None = None) -> Blocks:
  """Decode (M up to 16) reads the weight once and wants many small programs; prefill (M in the hundreds) wants
  square tiles that reuse each weight block across many rows. With groups, K steps never straddle two groups."""
  if backend == 'tpu':  # int8 tiles are (32, 128), bf16 (16, 128): every block here is a multiple
    blocks = Blocks(m=16, n=512, k=1024) if m <= 16 else Blocks(m=256, n=512, k=512)
  else:
    blocks = Blocks(m=16, n=64, k=256, num_stages=3) if m <= 16 else Blocks(m=64, n=128, k=128, num_stages=3)
  if group is not None and group < blocks.k:
    blocks = dataclasses.replace(blocks, k=group)
  return blocks


def _round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def unpack_int4(q):
  """int8 bytes [..., n] -> (even columns, odd columns), each int32 [..., n]: the high nibble and the low one, both
  sign-extended."""
  q32 = q.astype(jnp.int32)
  return q32 >> 4, (q32 << 28) >> 28


def dequantize(q, scale_OxG, bits: int, dtype):
  """W [..., I] in `dtype` from q [..., I * bits / 8] and scales [..., G] (any leading output axes, left as they are:
  under a mesh they keep their sharding): q * scale computed in float32 (exact) and rounded once to dtype, as SAT's
  fp16 extraction kernels round half(q) * scale."""
  if bits == 4:
    hi, lo = unpack_int4(q)
    values = jnp.stack([hi, lo], axis=-1).reshape(q.shape[:-1] + (-1,))
  else:
    values = q.astype(jnp.int32)
  lead, i = values.shape[:-1], values.shape[-1]
  g = scale_OxG.shape[-1]
  w = values.astype(jnp.float32).reshape(lead + (g, i // g)) * scale_OxG.astype(jnp.float32)[..., None]
  return w.reshape(lead + (i,)).astype(dtype)


def xla_matmul(x_MxI, q, scale_OxG, bits: int):
  """The XLA formulation (and the reference): dequantize to x's dtype, then x @ W.T accumulated in float32."""
  w_OxI = dequantize(q, scale_OxG, bits, x_MxI.dtype)
  return jnp.einsum('mi,oi->mo', x_MxI, w_OxI, preferred_element_type=jnp.float32)


def _block_product(xs, q, bits: int):
  """One block's x @ W.T (W the integer weights, in x's dtype) in float32; xs = (x,) for INT8, (x_even, x_odd) for
  INT4, each [bm, kq]; q int8 [bn, kq]."""
  dims = (((1,), (1,)), ((), ()))
  dt = xs[0].dtype
  if bits == 4:
    hi, lo = unpack_int4(q)
    return (jax.lax.dot_general(xs[0], hi.astype(dt), dims, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(xs[1], lo.astype(dt), dims, preferred_element_type=jnp.float32))
  return jax.lax.dot_general(xs[0], q.astype(jnp.int32).astype(dt), dims, preferred_element_type=jnp.float32)


def _prepare(x_MxI, q, scale_OxG, bits: int, blocks: Blocks):
  """Pads to whole blocks (zeros add nothing) and splits x for INT4. Returns (xs, q, scale_GxO f32, padded sizes)."""
  m, i = x_MxI.shape
  o, g = scale_OxG.shape
  group = i // g
  if g > 1 and group % blocks.k:
    raise ValueError(f'block k={blocks.k} must divide the group size {group}')
  mp, op, ip = _round_up(m, blocks.m), _round_up(o, blocks.n), _round_up(i, blocks.k)
  x = jnp.pad(x_MxI, ((0, mp - m), (0, ip - i)))
  per_byte = 8 // bits
  q = jnp.pad(q, ((0, op - o), (0, (ip - i) // per_byte)))
  scale_GxO = jnp.pad(scale_OxG.astype(jnp.float32).T, ((0, 0), (0, op - o)))
  xs = (x[:, 0::2], x[:, 1::2]) if bits == 4 else (x,)
  return xs, q, scale_GxO, (mp, op, ip)


def _scale_index(kb, blocks_per_group: int | None):
  """The scale group of K step kb (non-negative: lax.div truncates, which Mosaic lowers; // floors, which it
  does not)."""
  return 0 if blocks_per_group is None else jax.lax.div(kb, blocks_per_group)


def gpu_matmul(x_MxI, q, scale_OxG, bits: int, blocks: Blocks | None = None, interpret: bool = False):
  """The Pallas GPU (Triton) kernel: a grid over (row blocks, output blocks), each program looping over K."""
  m, i = x_MxI.shape
  o, g = scale_OxG.shape
  blocks = blocks or default_blocks('gpu', m, None if g == 1 else i // g)
  xs, q, scale_GxO, (mp, op, ip) = _prepare(x_MxI, q, scale_OxG, bits, blocks)
  kq = blocks.k * bits // 8                       # q columns per K step (INT4: two weights a byte)
  kx = blocks.k // 2 if bits == 4 else blocks.k  # columns of each x part per K step
  num_k = ip // blocks.k
  per_group = None if g == 1 else (i // g) // blocks.k

  def kernel(*refs):
    *x_refs, q_ref, s_ref, o_ref = refs

    def step(kb, acc):
      xb = tuple(r[:, pl.ds(kb * kx, kx)] for r in x_refs)
      part = _block_product(xb, q_ref[:, pl.ds(kb * kq, kq)], bits)
      if per_group is not None:
        part = part * s_ref[pl.ds(_scale_index(kb, per_group), 1), :]
      return acc + part

    acc = jax.lax.fori_loop(0, num_k, step, jnp.zeros((blocks.m, blocks.n), jnp.float32))
    if per_group is None:
      acc = acc * s_ref[...]
    o_ref[...] = acc

  x_spec = pl.BlockSpec((blocks.m, xs[0].shape[1]), lambda a, b: (a, 0))
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32),
      grid=(mp // blocks.m, op // blocks.n),
      in_specs=[x_spec] * len(xs) + [pl.BlockSpec((blocks.n, q.shape[1]), lambda a, b: (b, 0)),
                                     pl.BlockSpec((g, blocks.n), lambda a, b: (0, b))],
      out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda a, b: (a, b)),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name=f'glm_jax_int{bits}_matmul',
  )(*xs, q, scale_GxO)
  return y[:m, :o]


def tpu_matmul(x_MxI, q, scale_OxG, bits: int, blocks: Blocks | None = None, interpret: bool = False):
  """The Pallas TPU (Mosaic) kernel: a grid over (row blocks, output blocks, K blocks), K sequential, the partial
  sums in a VMEM accumulator."""
  m, i = x_MxI.shape
  o, g = scale_OxG.shape
  blocks = blocks or default_blocks('tpu', m, None if g == 1 else i // g)
  xs, q, scale_GxO, (mp, op, ip) = _prepare(x_MxI, q, scale_OxG, bits, blocks)
  kq = blocks.k * bits // 8
  kx = blocks.k // 2 if bits == 4 else blocks.k
  num_k = ip // blocks.k
  per_group = None if g == 1 else (i // g) // blocks.k

  def kernel(*refs):
    *x_refs, q_ref, s_ref, o_ref, acc_ref = refs
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    part = _block_product(tuple(r[...] for r in x_refs), q_ref[...], bits)
    acc_ref[...] += part if per_group is None else part * s_ref[0]

    @pl.when(kb == num_k - 1)
    def _():
      o_ref[...] = acc_ref[...] * s_ref[0] if per_group is None else acc_ref[...]

  # The scales as [G, 1, O]: a block (1, 1, n) is one group's row of scales, which the index map picks per K step
  # (a (1, n) block of [G, O] would break TPU's (8, 128) tiling).
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32),
      grid=(mp // blocks.m, op // blocks.n, num_k),
      in_specs=[pl.BlockSpec((blocks.m, kx), lambda a, b, c: (a, c))] * len(xs)
      + [pl.BlockSpec((blocks.n, kq), lambda a, b, c: (b, c)),
         pl.BlockSpec((1, 1, blocks.n), lambda a, b, c: (_scale_index(c, per_group), 0, b))],
      out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda a, b, c: (a, b)),
      scratch_shapes=[pltpu.VMEM((blocks.m, blocks.n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name=f'glm_jax_int{bits}_matmul',
  )(*xs, q, scale_GxO[:, None, :])
  return y[:m, :o]


def kernel_applies(backend: str, bits: int, i: int, g: int, blocks: Blocks) -> bool:
  """Whether a kernel takes this shape: groups (if any) whole multiples of the K block, and on TPU, K steps of whole
  (.., 128) int8 tiles (INT4 with groups of 128 columns, 64 bytes, falls back to XLA there)."""
  fits_groups = g == 1 or (i // g) % blocks.k == 0
  return fits_groups and (backend != 'tpu' or (blocks.k * bits // 8) % 128 == 0)


def quantized_matmul(x_MxI, q, scale_OxG, bits: int):
  """x [M, I] @ dequant(q, scale).T -> [M, O] float32 on one device: the Pallas kernel for the backend (GPU: Triton,
  TPU: Mosaic) where its block sizes fit the groups; on CPU glm_jax/cpu_kernels.py's for decode-sized float32
  products; the XLA formulation elsewhere (prefill on CPU). (Under a device mesh the weight formats use the XLA
  formulation, which XLA's partitioner places: a custom call is one opaque op to it.)"""
  m, i = x_MxI.shape
  g = scale_OxG.shape[1]
  branches = {}
  for platform, kernel in (('cuda', gpu_matmul), ('tpu', tpu_matmul)):
    backend = 'tpu' if platform == 'tpu' else 'gpu'
    blocks = default_blocks(backend, m, None if g == 1 else i // g)
    if kernel_applies(backend, bits, i, g, blocks):
      branches[platform] = functools.partial(kernel, bits=bits, blocks=blocks)
  branches['cpu'] = functools.partial(cpu_kernels.quantized_matmul, bits=bits, reference=xla_matmul)
  return jax.lax.platform_dependent(x_MxI, q, scale_OxG, **branches,
                                    default=functools.partial(xla_matmul, bits=bits))
