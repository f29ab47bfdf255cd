"""The GLM-130B architecture as a pure functional Flax module (glm130b.md §2).

    logits = GLM(model_config).apply({'params': params}, tokens, position_ids, attention_mask)

Per layer (DeepNorm post-LN, alpha = sqrt(2 * num_layers)):
    y  = LN_in(x);   z = y * alpha + Attn(y)          # the skip path is the *normalised* input
    y2 = LN_post(z); out = y2 * alpha + GeGLU_MLP(y2)  # left un-normalised: the next LN_in normalises it
then final_layernorm and the tied output projection (no bias).

Attention: fused QKV with head-major rows (per head q, k, v), rotary positions gathered by position id, query-key
layer scaling by c = layer_id + 1 (a no-op in exact arithmetic that moves fp16 rounding as SAT does), masked
scores filled with -10000 (not -inf: fully masked padding rows become uniform, never NaN), fp32 softmax.
MLP: x1 * gelu(x2) with exact-erf GELU, x1 the first ("value") half of dense_h_to_4h, x2 the second.

Conventions: attention_mask is bool, True = may attend; shapes are in the names (B batch, S query length,
T key length, D hidden, N heads, H head dim, F GeGLU width, V vocabulary, L layers). Every parameter and the
main activations carry logical axis names, mapped to mesh axes by `config.axis_rules` (see sharding.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import cpu_kernels, rope

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
MASKED_SCORE = -10000.0  # SAT's fill value for masked attention scores


@dataclasses.dataclass(frozen=True)
class GLMConfig:
  """The model fields of a config (see glm_jax/config.py for what each means)."""
  num_layers: int
  hidden_size: int
  num_attention_heads: int
  inner_hidden_size: int
  vocab_size: int
  max_sequence_length: int
  position_encoding_2d: bool = False
  layernorm_epsilon: float = 1e-5
  rope_precision: str = 'fp32'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  embedding_dropout: float = 0.0
  init_std: float = 0.0
  remat_policy: str = 'none'
  scan_layers: bool = True
  kernel_layout: str = 'in_out'

  @classmethod
  def make(cls, config: Any) -> 'GLMConfig':
    """From a `config.model` ConfigDict, a mapping, or a GLMConfig; unknown or bad fields are named."""
    if isinstance(config, cls):
      return config
    values = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'config.model has unknown field(s) {unknown}; known fields: {sorted(known)}')
    cfg = cls(**values)
    cfg.validate()
    return cfg

  def validate(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'config.model.hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}')
    if self.position_encoding_2d and self.head_dim % 4:
      raise ValueError(f'2-D rotary positions need a head dim divisible by 4, got {self.head_dim}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'config.model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}')
    if self.rope_precision not in ('fp32', 'fp16_chain'):
      raise ValueError(f"config.model.rope_precision must be 'fp32' or 'fp16_chain', got {self.rope_precision!r}")
    if self.kernel_layout not in ('in_out', 'out_in', 'packed'):
      raise ValueError(f"config.model.kernel_layout must be 'in_out', 'out_in' or 'packed', got "
                       f'{self.kernel_layout!r}')
    if self.kernel_layout == 'packed' and self.scan_layers:
      raise ValueError("config.model.kernel_layout='packed' needs scan_layers=False (per-layer weights)")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'config.model.remat_policy must be one of {sorted(REMAT_POLICIES)}, '
                       f'got {self.remat_policy!r}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def deepnorm_alpha(self) -> float:
    return math.sqrt(2 * self.num_layers)

  @property
  def base_init_std(self) -> float:
    return self.init_std or (3 * self.hidden_size) ** -0.5


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ------------------------------------------------------------------------------------------------------------------
# Initialisers (glm130b.md §3.1)


def _normal(std):
  return nn.initializers.normal(stddev=std)


def _xavier_normal(gain, fan_in, fan_out):
  """Xavier-normal for a matrix whose logical shape is [fan_in, fan_out], whatever the array's shape."""
  return nn.initializers.normal(stddev=gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _qkv_init(cfg: GLMConfig):
  """q and k: N(0, init_std); v: DeepNorm Xavier-normal (gain beta) as a [D, D] projection."""
  beta = (2 * cfg.num_layers) ** -0.5
  d = cfg.hidden_size

  def init(key, shape, dtype):  # shape [D, N, 3, H]
    kq, kv = jax.random.split(key)
    qk = _normal(cfg.base_init_std)(kq, shape, dtype)
    v = _xavier_normal(beta, d, d)(kv, shape, dtype)
    return jnp.where(jnp.arange(3)[None, None, :, None] == 2, v, qk)
  return init


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# The four layer kernels: how many leading axes of their [in..., out...] shape are inputs, and their rank.
KERNEL_IN_AXES = {'qkv_kernel': 1, 'dense_kernel': 2, 'h_to_4h_kernel': 1, '4h_to_h_kernel': 1}
KERNEL_NDIM = {'qkv_kernel': 4, 'dense_kernel': 3, 'h_to_4h_kernel': 3, '4h_to_h_kernel': 2}


def _out_in_perm(ndim, n_in, lead=0):
  """The transpose of [lead..., in..., out...] to [lead..., out..., in...]."""
  return tuple(range(lead)) + tuple(range(lead + n_in, ndim)) + tuple(range(lead, lead + n_in))


@dataclasses.dataclass(frozen=True)
class PackedKernel:
  """A kernel in the 'packed' layout: W [O, I] (O, I the products of its output and input axes) in tiles of rows,
  [T, I, 4] (cpu_kernels.pack), and its logical output axes. Decoding on CPU uses it (cpu_kernels.packed_matmul)."""
  w: Any
  out_shape: tuple


def _as_o_by_i(w, n_in):
  """A kernel [in..., out...] as the matrix W [O, I] that the packed layout stores."""
  return w.reshape(math.prod(w.shape[:n_in]), -1).T


def _packed_param(module, name, init_OxI, o, i, dtype):
  """The array of a PackedKernel: W [o, i], made by init_OxI(key, dtype), in tiles of rows (cpu_kernels.pack)."""
  return _param(module, name, lambda key, _, dt: cpu_kernels.pack(init_OxI(key, dt)),
                (-(-o // cpu_kernels.TILE_ROWS), i, cpu_kernels.TILE_ROWS), (None, None, None), dtype)


def _kernel(module, name, init, shape, axes):
  """A layer kernel of logical shape [in..., out...]; stored [out..., in...] when kernel_layout is 'out_in', packed
  (a PackedKernel) when it is 'packed'."""
  cfg = module.cfg
  if cfg.kernel_layout == 'in_out':
    return _param(module, name, init, shape, axes, cfg.weight_dtype)
  n_in = KERNEL_IN_AXES[name]
  if cfg.kernel_layout == 'packed':
    i, o = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    w = _packed_param(module, name, lambda key, dtype: _as_o_by_i(init(key, shape, dtype), n_in), o, i,
                      cfg.weight_dtype)
    return PackedKernel(w, tuple(shape[n_in:]))
  perm = _out_in_perm(len(shape), n_in)
  return _param(module, name, lambda key, _, dtype: jnp.transpose(init(key, shape, dtype), perm),
                tuple(shape[i] for i in perm), tuple(axes[i] for i in perm), cfg.weight_dtype)


def to_out_in_kernels(params):
  """Layer kernels from the checkpoint layout [in..., out...] to [out..., in...] (kernel_layout='out_in'), stacked
  or per layer. Vector-matrix products, a decode step's matmuls, stream a weight 1.4-2x faster on CPU this way."""
  def convert(path, w):
    name = getattr(path[-1], 'key', None)
    if name not in KERNEL_IN_AXES:
      return w
    lead = w.ndim - KERNEL_NDIM[name]
    return jnp.transpose(w, _out_in_perm(w.ndim, KERNEL_IN_AXES[name], lead))
  return jax.tree_util.tree_map_with_path(convert, params)


def to_packed_kernels(params):
  """Per-layer parameters (unstack_layers) to kernel_layout='packed': the four layer kernels and the tied embedding
  as W [O, I] in tiles of rows (cpu_kernels.pack)."""
  def convert(path, w):
    name = getattr(path[-1], 'key', None)
    if name == 'word_embeddings':
      return cpu_kernels.pack(w)
    if name not in KERNEL_IN_AXES:
      return w
    if w.ndim != KERNEL_NDIM[name]:
      raise ValueError(f'to_packed_kernels takes per-layer parameters (unstack_layers); {name} has shape {w.shape}')
    return cpu_kernels.pack(_as_o_by_i(w, KERNEL_IN_AXES[name]))
  return jax.tree_util.tree_map_with_path(convert, params)


def _is_split(logical_axis: str) -> bool:
  """Whether the active axis rules and mesh (sharding.activate) split this logical axis over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  target = nn.logical_to_mesh_axes((logical_axis,))[0]
  names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return math.prod(mesh.shape[a] for a in names) > 1


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


# ------------------------------------------------------------------------------------------------------------------
# Building blocks


def gelu(x):
  """Exact GELU as torch computes it, x/2 * (1 + erf(x/sqrt2)): XLA's erf is one rational polynomial, where
  jax.nn.gelu's erfc form costs two polynomials, an exp and two divides per element (4x slower on CPU)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(1 / math.sqrt(2)).astype(x.dtype)))


def layer_norm(x, scale, bias, eps):
  """Statistics and normalisation in fp32 whatever x's dtype; the result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


class LayerNorm(nn.Module):
  cfg: GLMConfig

  @nn.compact
  def __call__(self, x):
    d = self.cfg.hidden_size
    scale = _param(self, 'scale', nn.initializers.ones, (d,), ('norm',), self.cfg.weight_dtype)
    bias = _param(self, 'bias', nn.initializers.zeros, (d,), ('norm',), self.cfg.weight_dtype)
    return layer_norm(x, scale, bias, self.cfg.layernorm_epsilon)


def _add_bias(y32, bias, dt, fused_bias):
  """`fused_bias` mirrors SAT's rounding: column-parallel layers add the bias inside the fp32 accumulation (torch
  addmm, one rounding); row-parallel layers add it after the product is rounded (two roundings)."""
  if bias is None:
    return y32.astype(dt)
  if fused_bias:
    return (y32 + bias.astype(jnp.float32)).astype(dt)
  return y32.astype(dt) + bias.astype(dt)


def linear(eq, x, kernel, bias=None, *, fused_bias):
  """The matmul seam of the four big linears: x @ kernel in x's dtype with fp32 accumulation."""
  dt = x.dtype
  return _add_bias(jnp.einsum(eq, x, kernel.astype(dt), preferred_element_type=jnp.float32), bias, dt, fused_bias)


# Up to this many rows (tokens), an output-major [O, I] kernel is applied as kernel @ x.T and the small [O, M] result
# transposed back: a decode step's product. On XLA:CPU, x @ kernel.T with 8 to 32 rows takes 1.5-2x as long as
# kernel @ x.T on the small config's kernels; from 128-256 rows on it is the faster GEMM (one core, M = 1..512).
OUTPUT_MAJOR_MAX_ROWS = 64


def _linear_out_in(x_MxI, kernel, bias, *, ins, outs, fused_bias):
  """x @ kernel for an output-major kernel [outs..., ins...] and few rows x [M, ins...], computed as kernel @ x.T
  and transposed back (see OUTPUT_MAJOR_MAX_ROWS)."""
  dt = x_MxI.dtype
  y32_OxM = jnp.einsum(f'{outs}{ins},M{ins}->{outs}M', kernel.astype(dt), x_MxI, preferred_element_type=jnp.float32)
  y_OxM = _add_bias(y32_OxM, None if bias is None else bias[..., None], dt, fused_bias)
  # The barrier keeps XLA from folding the transpose into the product, which would turn it back into x @ kernel.T.
  return jnp.moveaxis(jax.lax.optimization_barrier(y_OxM), -1, 0)


def project(eq, x, kernel, bias, *, n_in, layout, fused_bias, flat=False):
  """x @ kernel (`linear`) for a kernel stored in `layout`: 'in_out' [in..., out...], the kernel of the einsum `eq`,
  or 'out_in' [out..., in...], the same axes with the inputs last; its n_in input axes contract x's trailing axes.
  A PackedKernel (layout 'packed') goes to cpu_kernels.packed_matmul whatever `layout` says.

  flat=True runs one 2-D product over the kernel reshaped to [I, O] / [O, I]: on a kernel with several output axes
  XLA otherwise transposes it to put the contracted axes together, a weight copy per call (and in training per
  backward pass). Callers flatten only where the merge keeps the sharding (the split axis leads its group, as the
  QKV kernel's heads); the GeGLU kernel's [2, F] only when F is not split (merged, it would be gathered).
  """
  if isinstance(kernel, PackedKernel):
    lead = x.shape[:x.ndim - n_in]
    i = math.prod(x.shape[x.ndim - n_in:])
    y32_MxO = cpu_kernels.packed_matmul(x.reshape(-1, i), kernel.w, math.prod(kernel.out_shape))
    y = _add_bias(y32_MxO, None if bias is None else bias.reshape(-1), x.dtype, fused_bias)
    return y.reshape(lead + kernel.out_shape)
  k_io = eq.split('->')[0].split(',')[1]  # the kernel's axis letters, in_out order
  ins, outs = k_io[:n_in], k_io[n_in:]
  in_out = layout == 'in_out'
  lead = x.shape[:x.ndim - n_in]
  out_shape = kernel.shape[n_in:] if in_out else kernel.shape[:kernel.ndim - n_in]
  if flat:
    o = math.prod(out_shape)
    i = kernel.size // o
    kernel = kernel.reshape((i, o) if in_out else (o, i))
    x = x.reshape(lead + (i,))
    bias = None if bias is None else bias.reshape(o)
    ins, outs = 'i', 'o'
  if not in_out and math.prod(lead) <= OUTPUT_MAJOR_MAX_ROWS:
    y = _linear_out_in(x.reshape((-1,) + x.shape[len(lead):]), kernel, bias, ins=ins, outs=outs,
                       fused_bias=fused_bias)
  else:
    y = linear(f'...{ins},{ins + outs if in_out else outs + ins}->...{outs}', x, kernel, bias, fused_bias=fused_bias)
  return y.reshape(lead + out_shape)


def attention_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, heads, dropout=None):
  """softmax(q.k * c) v for each row r = b*N + n of N `heads` per sequence (q already divided by sqrt(H)*c), a masked
  score set to MASKED_SCORE*c as SAT does; the scores in fp32, the probabilities in q's dtype, `dropout` on them."""
  r, s, _ = q_RxSxH.shape
  t = k_RxTxH.shape[1]
  scores_RxSxT = jnp.einsum('rsh,rth->rst', q_RxSxH, k_RxTxH,
                            preferred_element_type=jnp.float32).astype(q_RxSxH.dtype)
  scores_BxNxSxT = scores_RxSxT.reshape(r // heads, heads, s, t).astype(jnp.float32) * c
  scores_BxNxSxT = jnp.where(mask_Bx1xSxT, scores_BxNxSxT, MASKED_SCORE * c)
  probs_BxNxSxT = jax.nn.softmax(scores_BxNxSxT, axis=-1).astype(q_RxSxH.dtype)
  if dropout is not None:
    probs_BxNxSxT = dropout(probs_BxNxSxT)
  return jnp.einsum('rst,rth->rsh', probs_BxNxSxT.reshape(r, s, t), v_RxTxH,
                    preferred_element_type=jnp.float32).astype(q_RxSxH.dtype)


class Attention(nn.Module):
  cfg: GLMConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, y_BxSxD, layer_id, rope_parts, mask_Bx1xSxT, cache_kv=None, cache_index=None):
    cfg = self.cfg
    d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    wdt = cfg.weight_dtype
    beta = (2 * cfg.num_layers) ** -0.5
    qkv_kernel = _kernel(self, 'qkv_kernel', _qkv_init(cfg), (d, n, 3, h), ('embed', 'heads', 'qkv', 'kv'))
    qkv_bias = _param(self, 'qkv_bias', nn.initializers.zeros, (n, 3, h), ('heads', 'qkv', 'kv'), wdt)
    out_kernel = _kernel(self, 'dense_kernel', _xavier_normal(beta, d, d), (n, h, d), ('heads', 'kv', 'embed'))
    out_bias = _param(self, 'dense_bias', nn.initializers.zeros, (d,), ('norm',), wdt)

    layout = cfg.kernel_layout
    qkv_BxSxNx3xH = project('bsd,dnth->bsnth', y_BxSxD, qkv_kernel, qkv_bias, n_in=1, layout=layout, fused_bias=True,
                            flat=True)
    qkv_BxSxNx3xH = _constrain(qkv_BxSxNx3xH, ('batch', 'length', 'act_heads', None, None))
    q_BxSxNxH, k_BxSxNxH, v_BxSxNxH = (qkv_BxSxNx3xH[:, :, :, i] for i in range(3))
    q_BxSxNxH = rope.apply_rope_parts(q_BxSxNxH, rope_parts)
    k_BxSxNxH = rope.apply_rope_parts(k_BxSxNxH, rope_parts)

    # Head-major with batch and heads merged into R = B*N rows: each attention matmul is a plain per-row
    # [S, H] x [H, T] / [S, T] x [T, H] product (XLA fuses these transposes into the ops that produce q, k and v),
    # and the cache is kept as [R, T, H], exactly what the matmuls read, so that a decode step updates it in place. (On
    # any other shape XLA fuses the update once per consumer shape and copies the whole cache every step.)
    b, s = y_BxSxD.shape[:2]
    q_RxSxH, k_RxSxH, v_RxSxH = (jnp.swapaxes(t, 1, 2).reshape(b * n, s, h) for t in (q_BxSxNxH, k_BxSxNxH, v_BxSxNxH))
    new_cache = None
    if cache_kv is not None:  # write this call's keys/values at cache_index, attend over the whole cache
      new_cache = tuple(jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), cache_index, 1)
                        for c, x in zip(cache_kv, (k_RxSxH, v_RxSxH)))
      k_RxTxH, v_RxTxH = (c.astype(q_RxSxH.dtype) for c in new_cache)
    else:
      k_RxTxH, v_RxTxH = k_RxSxH, v_RxSxH

    # Query-key layer scaling: divide q by sqrt(H)*c in the compute dtype, multiply the scores by c in fp32.
    c = (layer_id + 1).astype(jnp.float32)
    q_RxSxH = q_RxSxH / (math.sqrt(h) * c).astype(q_RxSxH.dtype)
    # (made on both paths, so that the hidden dropout below keeps its module name and random stream)
    dropout = functools.partial(nn.Dropout(cfg.attention_dropout), deterministic=self.deterministic)
    if cache_kv is not None and s == 1 and self.deterministic:  # a decode step: a CPU kernel where it applies
      ctx_RxSxH = cpu_kernels.decode_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, n,
                                             reference=attention_context)
    else:
      ctx_RxSxH = attention_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, n, dropout)
    ctx_BxSxNxH = jnp.swapaxes(ctx_RxSxH.reshape(b, n, s, h), 1, 2)
    ctx_BxSxNxH = _constrain(ctx_BxSxNxH, ('batch', 'length', 'act_heads', None))
    out_BxSxD = project('bsnh,nhd->bsd', ctx_BxSxNxH, out_kernel, out_bias, n_in=2, layout=layout, fused_bias=False,
                        flat=True)
    out_BxSxD = nn.Dropout(cfg.hidden_dropout)(out_BxSxD, deterministic=self.deterministic)
    return out_BxSxD, new_cache


class MLP(nn.Module):
  cfg: GLMConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, y_BxSxD):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.inner_hidden_size
    beta = (2 * cfg.num_layers) ** -0.5
    wdt = cfg.weight_dtype
    # [D, 2, F]: index 0 of the 'glu' axis is the value half, 1 the gelu half; splitting F over 'tensor' gives each
    # shard matching value and gate columns, which is SAT's GLU-interleaved tensor-parallel layout.
    w1 = _kernel(self, 'h_to_4h_kernel', _xavier_normal(beta, d, 2 * f), (d, 2, f), ('embed', 'glu', 'mlp'))
    b1 = _param(self, 'h_to_4h_bias', nn.initializers.zeros, (2, f), ('glu', 'mlp'), wdt)
    w2 = _kernel(self, '4h_to_h_kernel', _xavier_normal(beta, f, d), (f, d), ('mlp', 'embed'))
    b2 = _param(self, '4h_to_h_bias', nn.initializers.zeros, (d,), ('norm',), wdt)
    u_BxSx2xF = project('bsd,dgf->bsgf', y_BxSxD, w1, b1, n_in=1, layout=cfg.kernel_layout, fused_bias=True,
                        flat=not _is_split('mlp'))
    u_BxSx2xF = _constrain(u_BxSx2xF, ('batch', 'length', None, 'act_mlp'))
    act_BxSxF = u_BxSx2xF[:, :, 0] * gelu(u_BxSx2xF[:, :, 1])
    out_BxSxD = project('bsf,fd->bsd', act_BxSxF, w2, b2, n_in=1, layout=cfg.kernel_layout, fused_bias=False)
    return nn.Dropout(cfg.hidden_dropout)(out_BxSxD, deterministic=self.deterministic)


class Block(nn.Module):
  """One DeepNorm layer: scanned over the layer axis (parameters stacked along a leading 'layers' axis), or one of
  L modules `layers_0` ... `layers_{L-1}` with scan_layers=False (see `unstack_layers`)."""
  cfg: GLMConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxSxD, xs, rope_parts, mask_Bx1xSxT, cache_index):
    layer_id, cache_kv = xs
    alpha = jnp.asarray(self.cfg.deepnorm_alpha, x_BxSxD.dtype)
    y_BxSxD = LayerNorm(self.cfg, name='input_layernorm')(x_BxSxD)
    a_BxSxD, new_cache = Attention(self.cfg, self.deterministic, name='attention')(
        y_BxSxD, layer_id, rope_parts, mask_Bx1xSxT, cache_kv, cache_index)
    z_BxSxD = y_BxSxD * alpha + a_BxSxD
    y2_BxSxD = LayerNorm(self.cfg, name='post_attention_layernorm')(z_BxSxD)
    m_BxSxD = MLP(self.cfg, self.deterministic, name='mlp')(y2_BxSxD)
    out_BxSxD = _constrain(y2_BxSxD * alpha + m_BxSxD, ('batch', 'length', 'act_embed'))
    return out_BxSxD, new_cache


class GLM(nn.Module):
  """GLM-130B. Build it from the `config.model` ConfigDict of a config file: `GLM(config.model)`."""
  config: Any

  def __post_init__(self):
    object.__setattr__(self, 'config', GLMConfig.make(self.config))
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxS, position_ids, attention_mask, *, deterministic: bool = True, cache=None,
               cache_index=None, input_embedding=None, logits_index=None):
    """Logits [B, S, V] float32; with `cache` (from init_cache) returns (logits, new_cache).

    tokens_BxS: int32 [B, S]. position_ids: int32 [B, S] (1-D) or [B, 2, S] (2-D).
    attention_mask: bool [B or 1, 1, S, T], True = may attend; T = S without a cache, the cache length with one.
    cache_index: where this call's S keys/values are written in the cache (a scalar; prefill 0, then each step).
    input_embedding: an optional [V, D] table for the input lookup, defaulting to the tied one. Training passes the
      tied table here as its own leaf so that the lookup's share of the gradient can be treated separately.
    logits_index: optional int32 [B]: compute logits only at this row of each sequence (logits [B, 1, V]); a
      prefill reads one row per prompt, and at GLM-130B's vocabulary the full [B, S, V] would be gigabytes.
    """
    cfg: GLMConfig = self.config
    dt = cfg.compute_dtype
    v, d = cfg.vocab_size, cfg.hidden_size
    if attention_mask.dtype != jnp.bool_:
      raise TypeError(f'attention_mask must be bool (True = may attend), got {attention_mask.dtype}')
    if cfg.kernel_layout == 'packed':
      embedding = PackedKernel(
          _packed_param(self, 'word_embeddings', lambda key, dtype: _normal(cfg.base_init_std)(key, (v, d), dtype),
                        v, d, cfg.weight_dtype), (v,))
    else:
      embedding = _param(self, 'word_embeddings', _normal(cfg.base_init_std), (v, d), ('vocab', 'embed'),
                         cfg.weight_dtype)
    if input_embedding is not None:
      x_BxSxD = jnp.take(input_embedding, tokens_BxS, axis=0)
    elif isinstance(embedding, PackedKernel):
      x_BxSxD = cpu_kernels.packed_rows(embedding.w, tokens_BxS)
    else:
      x_BxSxD = jnp.take(embedding, tokens_BxS, axis=0)
    x_BxSxD = x_BxSxD.astype(dt)
    x_BxSxD = _constrain(x_BxSxD, ('batch', 'length', 'act_embed'))
    x_BxSxD = nn.Dropout(cfg.embedding_dropout)(x_BxSxD, deterministic=deterministic)

    rope_parts = rope.gather_rope(position_ids, cfg.head_dim, cfg.max_sequence_length, cfg.rope_precision,
                                  cfg.position_encoding_2d)
    if cache is not None and cache_index is None:
      raise ValueError('calling GLM with a cache needs cache_index (where the new keys/values are written)')

    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    if cfg.scan_layers:
      layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      cache_kv = None if cache is None else (cache['k'], cache['v'])
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxSxD, new_cache_kv = stack(cfg, deterministic, name='layers')(
          x_BxSxD, (layer_ids, cache_kv), rope_parts, attention_mask, cache_index)
    else:
      # Separate per-layer weights and caches: no per-layer copy out of a stacked array (a dynamic slice of every
      # weight, which costs a sixth of a small forward and most of a decode step), and in-place cache updates.
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        cache_kv = None if cache is None else (cache['k'][i], cache['v'][i])
        x_BxSxD, layer_cache = block(cfg, deterministic, name=f'layers_{i}')(
            x_BxSxD, (jnp.int32(i), cache_kv), rope_parts, attention_mask, cache_index)
        if cache is not None:
          new_k.append(layer_cache[0])
          new_v.append(layer_cache[1])
      new_cache_kv = (tuple(new_k), tuple(new_v))

    if logits_index is not None:
      x_BxSxD = jnp.take_along_axis(x_BxSxD, logits_index[:, None, None], axis=1)
    x_BxSxD = LayerNorm(cfg, name='final_layernorm')(x_BxSxD)
    # The tied [V, D] embedding is an output-major kernel (or, packed, a PackedKernel).
    logits_BxSxV = project('bsd,dv->bsv', x_BxSxD, embedding, None, n_in=1, layout='out_in',
                           fused_bias=True).astype(jnp.float32)
    logits_BxSxV = _constrain(logits_BxSxV, ('batch', 'length', 'act_vocab'))
    if cache is None:
      return logits_BxSxV
    return logits_BxSxV, {'k': new_cache_kv[0], 'v': new_cache_kv[1]}


def init_cache(model_config, batch: int, max_length: int):
  """A preallocated key/value cache in the compute dtype: {'k', 'v'} each [L, B*N, max_length, H] (row b*N + n holds
  head n of sequence b), or with scan_layers=False a tuple of L arrays [B*N, max_length, H].

  Rotated keys are stored (as SAT's mems), so a cached step only rotates its own query and key.
  """
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


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def forward_flops_per_token(cfg: GLMConfig, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token at sequence length seq_len (full S x S attention).

  Per layer: QKV 2*D*3D, attention output 2*D*D, GeGLU 2*D*2F + 2*F*D, scores and context 2*2*S*D;
  plus the tied output projection 2*D*V. Elementwise work (LayerNorm, softmax, GELU, RoPE) is not counted.
  """
  d, f, v = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
  per_layer = 2 * (3 * d * d + d * d + 2 * d * f + f * d) + 4 * seq_len * d
  return cfg.num_layers * per_layer + 2 * d * v


def train_flops_per_token(cfg: GLMConfig, seq_len: int) -> float:
  """Forward plus backward (twice the forward), without rematerialisation: the model FLOPs of MFU."""
  return 3 * forward_flops_per_token(cfg, seq_len)
