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

The five big matrices (four kernels per layer and the tied embedding) are declared by their `weight_specs` and used
through glm_jax/weights.py, in the storage format the module is built with: `GLM(config.model, weight_format=...)`
(the checkpoint layout 'in_out' by default). A decode step's attention may be given a kernel (`decode_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import rope, weights

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

  @classmethod
  def make(cls, config: Any) -> 'GLMConfig':
    """From a `config.model` ConfigDict, a mapping, or a GLMConfig; unknown or bad fields are named."""
    if isinstance(config, cls):
      return config
    values = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    if values.pop('kernel_layout', 'in_out') != 'in_out':  # an inference choice older configs carried
      raise ValueError('config.model.kernel_layout is gone: the storage of the weights is GLM(..., weight_format=) '
                       '(glm_jax/weights.py)')
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


def weight_specs(cfg: GLMConfig) -> dict[str, weights.Spec]:
  """The model's big matrices by parameter name: x [..., *in] @ W -> [..., *out], logical axes, checkpoint layout."""
  d, n, h, f, v = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.inner_hidden_size, cfg.vocab_size
  spec = weights.Spec
  return {
      'qkv_kernel': spec((d,), (n, 3, h), ('embed',), ('heads', 'qkv', 'kv')),  # head-major rows: q, k, v per head
      'dense_kernel': spec((n, h), (d,), ('heads', 'kv'), ('embed',)),
      # [D, 2, F]: index 0 of 'glu' is the value half, 1 the gelu half; splitting F over 'tensor' gives each shard
      # matching value and gate columns, which is SAT's GLU-interleaved tensor-parallel layout.
      'h_to_4h_kernel': spec((d,), (2, f), ('embed',), ('glu', 'mlp')),
      '4h_to_h_kernel': spec((f,), (d,), ('mlp',), ('embed',)),
      'word_embeddings': spec((d,), (v,), ('embed',), ('vocab',), checkpoint='out_in'),  # tied: [V, D]
  }


def _matrix(module, cfg: GLMConfig, name, init):
  """The big matrix `name` of weight_specs, in the module's weight format (a weights.Weight)."""
  return weights.get(module.weight_format).declare(module, name, weight_specs(cfg)[name], init, cfg.weight_dtype)


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
  weight_format: str
  deterministic: bool = True
  decode_attention: Callable | None = None

  @nn.compact
  def __call__(self, y_BxSxD, layer_id, rope_parts, mask_Bx1xSxT, cache_kv=None, cache_index=None):
    cfg = self.cfg
    d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    wdt, dt = cfg.weight_dtype, y_BxSxD.dtype
    beta = (2 * cfg.num_layers) ** -0.5
    qkv = _matrix(self, cfg, 'qkv_kernel', _qkv_init(cfg))
    qkv_bias = _param(self, 'qkv_bias', nn.initializers.zeros, (n, 3, h), ('heads', 'qkv', 'kv'), wdt)
    out = _matrix(self, cfg, 'dense_kernel', _xavier_normal(beta, d, d))
    out_bias = _param(self, 'dense_bias', nn.initializers.zeros, (d,), ('norm',), wdt)

    qkv_BxSxNx3xH = _add_bias(qkv.matmul(y_BxSxD), qkv_bias, dt, fused_bias=True)
    qkv_BxSxNx3xH = nn.with_logical_constraint(qkv_BxSxNx3xH, ('batch', 'length', 'act_heads', None, None))
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
    if cache_kv is not None and s == 1 and self.deterministic and self.decode_attention is not None:
      ctx_RxSxH = self.decode_attention(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, n)  # a decode step's kernel
    else:
      ctx_RxSxH = attention_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, n, dropout)
    ctx_BxSxNxH = jnp.swapaxes(ctx_RxSxH.reshape(b, n, s, h), 1, 2)
    ctx_BxSxNxH = nn.with_logical_constraint(ctx_BxSxNxH, ('batch', 'length', 'act_heads', None))
    out_BxSxD = _add_bias(out.matmul(ctx_BxSxNxH), out_bias, dt, fused_bias=False)
    out_BxSxD = nn.Dropout(cfg.hidden_dropout)(out_BxSxD, deterministic=self.deterministic)
    return out_BxSxD, new_cache


class MLP(nn.Module):
  cfg: GLMConfig
  weight_format: str
  deterministic: bool = True

  @nn.compact
  def __call__(self, y_BxSxD):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.inner_hidden_size
    beta = (2 * cfg.num_layers) ** -0.5
    wdt, dt = cfg.weight_dtype, y_BxSxD.dtype
    w1 = _matrix(self, cfg, 'h_to_4h_kernel', _xavier_normal(beta, d, 2 * f))
    b1 = _param(self, 'h_to_4h_bias', nn.initializers.zeros, (2, f), ('glu', 'mlp'), wdt)
    w2 = _matrix(self, cfg, '4h_to_h_kernel', _xavier_normal(beta, f, d))
    b2 = _param(self, '4h_to_h_bias', nn.initializers.zeros, (d,), ('norm',), wdt)
    u_BxSx2xF = _add_bias(w1.matmul(y_BxSxD), b1, dt, fused_bias=True)
    u_BxSx2xF = nn.with_logical_constraint(u_BxSx2xF, ('batch', 'length', None, 'act_mlp'))
    act_BxSxF = u_BxSx2xF[:, :, 0] * gelu(u_BxSx2xF[:, :, 1])
    out_BxSxD = _add_bias(w2.matmul(act_BxSxF), b2, dt, fused_bias=False)
    return nn.Dropout(cfg.hidden_dropout)(out_BxSxD, deterministic=self.deterministic)


class Block(nn.Module):
  """One DeepNorm layer: scanned over the layer axis (parameters stacked along a leading 'layers' axis), or one of
  L modules `layers_0` ... `layers_{L-1}` with scan_layers=False (see weights.unstack_layers)."""
  cfg: GLMConfig
  weight_format: str
  deterministic: bool = True
  decode_attention: Callable | None = None

  @nn.compact
  def __call__(self, x_BxSxD, xs, rope_parts, mask_Bx1xSxT, cache_index):
    layer_id, cache_kv = xs
    alpha = jnp.asarray(self.cfg.deepnorm_alpha, x_BxSxD.dtype)
    y_BxSxD = LayerNorm(self.cfg, name='input_layernorm')(x_BxSxD)
    a_BxSxD, new_cache = Attention(self.cfg, self.weight_format, self.deterministic, self.decode_attention,
                                   name='attention')(y_BxSxD, layer_id, rope_parts, mask_Bx1xSxT, cache_kv, cache_index)
    z_BxSxD = y_BxSxD * alpha + a_BxSxD
    y2_BxSxD = LayerNorm(self.cfg, name='post_attention_layernorm')(z_BxSxD)
    m_BxSxD = MLP(self.cfg, self.weight_format, self.deterministic, name='mlp')(y2_BxSxD)
    out_BxSxD = nn.with_logical_constraint(y2_BxSxD * alpha + m_BxSxD, ('batch', 'length', 'act_embed'))
    return out_BxSxD, new_cache


class GLM(nn.Module):
  """GLM-130B. Build it from the `config.model` ConfigDict of a config file: `GLM(config.model)`.

  weight_format: how the big matrices are stored (glm_jax/weights.py; 'in_out' is the checkpoint layout).
  decode_attention: optional f(q [R, 1, H], k, v [R, T, H], mask [B, 1, 1, T], c, heads) -> [R, 1, H] computing a
    decode step's attention (one new token with a cache, no dropout) as `attention_context` does; e.g. a CPU kernel.
  pipeline: optional glm_jax.pipeline.Pipeline: the layer stack runs as pipeline stages over the `stage` mesh axis,
    its stacked parameters padded to pipeline.padded_layers (training and scoring; not with a cache).
  """
  config: Any
  weight_format: str = weights.CHECKPOINT_FORMAT
  decode_attention: Callable | None = None
  pipeline: Any = None

  def __post_init__(self):
    object.__setattr__(self, 'config', GLMConfig.make(self.config))
    weights.get(self.weight_format)  # a bad name fails here, naming the known formats
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
    logits_index: optional int32 [B] or [B, R]: compute logits only at these rows of each sequence (logits [B, 1, V]
      or [B, R, V]); a prefill reads one row per prompt, scoring a few per sequence, and at GLM-130B's vocabulary
      the full [B, S, V] would be gigabytes.
    """
    cfg: GLMConfig = self.config
    if attention_mask.dtype != jnp.bool_:
      raise TypeError(f'attention_mask must be bool (True = may attend), got {attention_mask.dtype}')
    if cache is not None and cache_index is None:
      raise ValueError('calling GLM with a cache needs cache_index (where the new keys/values are written)')
    embedding = _matrix(self, cfg, 'word_embeddings', _normal(cfg.base_init_std))
    if input_embedding is not None:
      x_BxSxD = jnp.take(input_embedding, tokens_BxS, axis=0)
    else:
      x_BxSxD = embedding.lookup(tokens_BxS)
    x_BxSxD = nn.with_logical_constraint(x_BxSxD.astype(cfg.compute_dtype), ('batch', 'length', 'act_embed'))
    x_BxSxD = nn.Dropout(cfg.embedding_dropout)(x_BxSxD, deterministic=deterministic)
    rope_parts = rope.gather_rope(position_ids, cfg.head_dim, cfg.max_sequence_length, cfg.rope_precision,
                                  cfg.position_encoding_2d)

    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    args = (cfg, self.weight_format, deterministic, self.decode_attention)
    if self.pipeline is not None and cache is None and not self.is_initializing():
      def block_fn(p, x, layer_id, parts, mask, key):
        return block(*args).apply({'params': p}, x, (layer_id, None), parts, mask, None,
                                  rngs=None if key is None else {'dropout': key})[0]
      x_BxSxD = self.pipeline(block_fn, self.variables['params']['layers'], x_BxSxD, rope_parts, attention_mask,
                              None if deterministic else self.make_rng('dropout'))
      new_cache_kv = None
    elif cfg.scan_layers:
      layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      cache_kv = None if cache is None else (cache['k'], cache['v'])
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxSxD, new_cache_kv = stack(*args, name='layers')(x_BxSxD, (layer_ids, cache_kv), rope_parts, attention_mask,
                                                         cache_index)
    else:
      # Separate per-layer weights and caches: no per-layer copy out of a stacked array (a dynamic slice of every
      # weight, which costs a sixth of a small forward and most of a decode step), and in-place cache updates.
      layer_caches = []
      for i in range(cfg.num_layers):
        cache_kv = None if cache is None else (cache['k'][i], cache['v'][i])
        x_BxSxD, layer_cache = block(*args, name=f'layers_{i}')(x_BxSxD, (jnp.int32(i), cache_kv), rope_parts,
                                                                attention_mask, cache_index)
        layer_caches.append(layer_cache)
      new_cache_kv = None if cache is None else tuple(zip(*layer_caches))

    if logits_index is not None:
      rows_BxR = logits_index[:, None] if logits_index.ndim == 1 else logits_index
      x_BxSxD = jnp.take_along_axis(x_BxSxD, rows_BxR[:, :, None], axis=1)
    x_BxSxD = LayerNorm(cfg, name='final_layernorm')(x_BxSxD)
    logits_BxSxV = nn.with_logical_constraint(embedding.matmul(x_BxSxD), ('batch', 'length', 'act_vocab'))
    if cache is None:
      return logits_BxSxV
    return logits_BxSxV, {'k': new_cache_kv[0], 'v': new_cache_kv[1]}
