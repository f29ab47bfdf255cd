"""SAT (SwissArmyTransformer `GLM130B`) state dicts <-> glm-jax parameters (glm130b.md §8).

SAT stores torch `[out, in]` weights per layer under `transformer.layers.{l}.…`; glm-jax stacks the layers along a
leading axis and keeps the head / GLU structure visible in the shapes:

| SAT key (per layer)                     | SAT shape   | glm-jax leaf (under params['layers'])  | shape          |
|-----------------------------------------|-------------|----------------------------------------|----------------|
| input_layernorm.{weight,bias}           | [D]         | input_layernorm.{scale,bias}           | [L, D]         |
| attention.query_key_value.weight        | [3D, D]     | attention.qkv_kernel                   | [L, D, N, 3, H]|
| attention.query_key_value.bias          | [3D]        | attention.qkv_bias                     | [L, N, 3, H]   |
| attention.dense.weight / bias           | [D, D], [D] | attention.dense_kernel / dense_bias    | [L, N, H, D], [L, D] |
| post_attention_layernorm.{weight,bias}  | [D]         | post_attention_layernorm.{scale,bias}  | [L, D]         |
| mlp.dense_h_to_4h.weight / bias         | [2F, D], [2F] | mlp.h_to_4h_kernel / h_to_4h_bias    | [L, D, 2, F], [L, 2, F] |
| mlp.dense_4h_to_h.weight / bias         | [D, F], [D] | mlp.4h_to_h_kernel / 4h_to_h_bias      | [L, F, D], [L, D] |

QKV rows are head-major (per head: q, k, v), so a reshape to [N, 3, H, D] is exact. dense_h_to_4h rows are the value
half then the gelu half ([2, F]). The tied `transformer.word_embeddings.weight` [V, D] and
`transformer.final_layernorm.{weight,bias}` map to `word_embeddings` and `final_layernorm.{scale,bias}`.

Released checkpoints are split over tensor-parallel ranks; `merge_tensor_parallel` rebuilds the TP=1 dict first
(GLU-aware for dense_h_to_4h) and `split_tensor_parallel` is its inverse.
"""

from __future__ import annotations

import re

import numpy as np

from glm_jax import weights
from glm_jax.model import GLMConfig, weight_specs

# Keys SAT may carry that hold no parameters (loading ignores them; the rotary table is always rebuilt).
IGNORED_KEY = re.compile(r'(^|\.)rotary_emb\.inv_freq$|^mixins\.rotary-embedding\.')
# The four matrices of a layer, by SAT key suffix and glm-jax leaf: what GLM-130B's quantization replaces
# (`weight` int8 + `weight_scale`; quantize/sat.py converts those).
LAYER_MATRICES = {'attention.query_key_value.weight': ('attention', 'qkv_kernel'),
                  'attention.dense.weight': ('attention', 'dense_kernel'),
                  'mlp.dense_h_to_4h.weight': ('mlp', 'h_to_4h_kernel'),
                  'mlp.dense_4h_to_h.weight': ('mlp', '4h_to_h_kernel')}


def layer_mappings(cfg: GLMConfig):
  """(SAT key suffix, (group, leaf), SAT -> ours, ours -> SAT) for one layer, in SAT's state-dict order."""
  d, n, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.inner_hidden_size
  same = (lambda w: w, lambda w: w)
  return [
      ('input_layernorm.weight', ('input_layernorm', 'scale'), *same),
      ('input_layernorm.bias', ('input_layernorm', 'bias'), *same),
      ('attention.query_key_value.weight', ('attention', 'qkv_kernel'),
       lambda w: w.reshape(n, 3, h, d).transpose(3, 0, 1, 2),
       lambda k: k.transpose(1, 2, 3, 0).reshape(3 * d, d)),
      ('attention.query_key_value.bias', ('attention', 'qkv_bias'),
       lambda b: b.reshape(n, 3, h), lambda b: b.reshape(3 * d)),
      ('attention.dense.weight', ('attention', 'dense_kernel'),
       lambda w: w.T.reshape(n, h, d), lambda k: k.reshape(n * h, d).T),
      ('attention.dense.bias', ('attention', 'dense_bias'), *same),
      ('post_attention_layernorm.weight', ('post_attention_layernorm', 'scale'), *same),
      ('post_attention_layernorm.bias', ('post_attention_layernorm', 'bias'), *same),
      ('mlp.dense_4h_to_h.weight', ('mlp', '4h_to_h_kernel'), lambda w: w.T, lambda k: k.T),
      ('mlp.dense_4h_to_h.bias', ('mlp', '4h_to_h_bias'), *same),
      ('mlp.dense_h_to_4h.weight', ('mlp', 'h_to_4h_kernel'),
       lambda w: w.reshape(2, f, d).transpose(2, 0, 1), lambda k: k.transpose(1, 2, 0).reshape(2 * f, d)),
      ('mlp.dense_h_to_4h.bias', ('mlp', 'h_to_4h_bias'), lambda b: b.reshape(2, f), lambda b: b.reshape(2 * f)),
  ]


def expected_sat_shapes(cfg: GLMConfig) -> dict[str, tuple[int, ...]]:
  """Every SAT key of the model (TP=1) and its shape, in SAT's state-dict order."""
  d, f, v = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
  per_layer = {
      'input_layernorm.weight': (d,), 'input_layernorm.bias': (d,),
      'attention.query_key_value.weight': (3 * d, d), 'attention.query_key_value.bias': (3 * d,),
      'attention.dense.weight': (d, d), 'attention.dense.bias': (d,),
      'post_attention_layernorm.weight': (d,), 'post_attention_layernorm.bias': (d,),
      'mlp.dense_4h_to_h.weight': (d, f), 'mlp.dense_4h_to_h.bias': (d,),
      'mlp.dense_h_to_4h.weight': (2 * f, d), 'mlp.dense_h_to_4h.bias': (2 * f,),
  }
  shapes = {'transformer.word_embeddings.weight': (v, d)}
  for layer in range(cfg.num_layers):
    shapes.update({f'transformer.layers.{layer}.{k}': s for k, s in per_layer.items()})
  shapes.update({'transformer.final_layernorm.weight': (d,), 'transformer.final_layernorm.bias': (d,)})
  return shapes


def to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor; bf16 has no numpy dtype, so go through fp32
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def is_layer_matrix(key: str) -> bool:
  return any(key.endswith(f'.{suffix}') or key.endswith(f'.{suffix}_scale') for suffix in LAYER_MATRICES)


def from_sat_state_dict(state_dict, model_config, *, layer_matrices: bool = True) -> dict:
  """SAT `GLM130B` state dict (TP=1; numpy arrays or torch tensors) -> glm-jax params (numpy, param_dtype).

  Strict: a missing key, an unexpected key or a wrong shape raises a ValueError naming it. layer_matrices=False
  leaves the four matrices of each layer (LAYER_MATRICES, and their `_scale` keys) to the caller: quantize/sat.py.
  """
  cfg = GLMConfig.make(model_config)
  expected = expected_sat_shapes(cfg)
  if not layer_matrices:
    expected = {k: v for k, v in expected.items() if not is_layer_matrix(k)}
    state_dict = {k: v for k, v in state_dict.items() if not is_layer_matrix(k)}
  keys = {k for k in state_dict if not IGNORED_KEY.search(k)}
  missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
  if missing or unexpected:
    raise ValueError(f'SAT state dict does not match the config: missing keys {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}, unexpected keys {unexpected[:8]}'
                     f'{" ..." if len(unexpected) > 8 else ""}')
  arrays = {}
  for key, shape in expected.items():
    a = to_numpy(state_dict[key])
    if tuple(a.shape) != shape:
      raise ValueError(f'SAT key {key} has shape {tuple(a.shape)}, the config expects {shape}')
    arrays[key] = a.astype(cfg.weight_dtype)

  layers: dict = {}
  for suffix, (group, leaf), to_ours, _ in layer_mappings(cfg):
    if not layer_matrices and suffix in LAYER_MATRICES:
      continue
    stacked = np.stack([to_ours(arrays[f'transformer.layers.{l}.{suffix}']) for l in range(cfg.num_layers)])
    layers.setdefault(group, {})[leaf] = stacked
  return {
      'word_embeddings': arrays['transformer.word_embeddings.weight'],
      'final_layernorm': {'scale': arrays['transformer.final_layernorm.weight'],
                          'bias': arrays['transformer.final_layernorm.bias']},
      'layers': layers,
  }


def to_sat_state_dict(params, model_config, *, weight_format: str = 'in_out',
                      layer_matrices: bool = True) -> dict[str, np.ndarray]:
  """glm-jax params -> SAT `GLM130B` state dict (numpy, TP=1), the exact inverse of from_sat_state_dict.

  params: stacked or per layer, their big matrices in `weight_format` (a checkpoint's config.weight_format); other
  formats are converted back to the checkpoint layout first, or refused (ValueError) when they cannot be. Every
  matrix's shape is checked against the config, so weights in another layout are never silently mis-transposed.
  layer_matrices=False leaves out the four matrices of each layer (quantize/sat.py exports those).
  """
  cfg = GLMConfig.make(model_config)
  specs = weight_specs(cfg)
  if layer_matrices:
    params = weights.to_checkpoint_params(params, specs, weight_format)
  else:  # only the tied embedding is converted
    params = dict(params, word_embeddings=weights.to_checkpoint_params(
        {'word_embeddings': params['word_embeddings']}, specs, weight_format)['word_embeddings'])
  params = weights.stack_layers(params)
  checks = {'word_embeddings': (params['word_embeddings'], specs['word_embeddings'].checkpoint_shape)}
  for suffix, (group, leaf), _, _ in layer_mappings(cfg):
    if leaf in specs and (layer_matrices or suffix not in LAYER_MATRICES):
      checks[leaf] = (params['layers'][group][leaf], (cfg.num_layers,) + specs[leaf].checkpoint_shape)
  for leaf, (w, shape) in checks.items():
    if tuple(np.shape(w)) != shape:
      raise ValueError(f'{leaf} has shape {tuple(np.shape(w))}, but in the checkpoint layout (weight_format '
                       f'{weight_format!r} given) the config needs {shape}')
  sd = {
      'transformer.word_embeddings.weight': np.asarray(params['word_embeddings']),
      'transformer.final_layernorm.weight': np.asarray(params['final_layernorm']['scale']),
      'transformer.final_layernorm.bias': np.asarray(params['final_layernorm']['bias']),
  }
  for suffix, (group, leaf), _, to_sat in layer_mappings(cfg):
    if not layer_matrices and suffix in LAYER_MATRICES:
      continue
    stacked = np.asarray(params['layers'][group][leaf])
    for layer in range(cfg.num_layers):
      sd[f'transformer.layers.{layer}.{suffix}'] = np.ascontiguousarray(to_sat(stacked[layer]))
  return sd


# ------------------------------------------------------------------------------------------------------------------
# Tensor-parallel ranks (glm130b.md §8.2)

_ROW_PARALLEL_INPUT = re.compile(r'attention\.dense\.weight$|mlp\.dense_4h_to_h\.weight$')  # split along dim 1
_COLUMN_PARALLEL = re.compile(r'word_embeddings\.weight$|query_key_value\.(weight|bias)$')  # split along dim 0
_GLU = re.compile(r'mlp\.dense_h_to_4h\.(weight|bias)$')  # per rank [V_r; G_r]


def merge_key(key: str, parts: list[np.ndarray]) -> np.ndarray:
  """One key's per-rank arrays (rank order) -> its TP=1 array."""
  if _ROW_PARALLEL_INPUT.search(key):
    return np.concatenate(parts, axis=1)
  if _COLUMN_PARALLEL.search(key):
    return np.concatenate(parts, axis=0)
  if _GLU.search(key):
    halves = [np.split(p, 2, axis=0) for p in parts]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  return parts[0]  # replicated (LayerNorms, row-parallel biases): every rank holds the same copy


def split_key(key: str, a: np.ndarray, tp: int) -> list[np.ndarray]:
  """One key's TP=1 array -> its `tp` per-rank arrays (views where the split allows), the inverse of merge_key."""
  if _ROW_PARALLEL_INPUT.search(key):
    return np.split(a, tp, axis=1)
  if _COLUMN_PARALLEL.search(key):
    return np.split(a, tp, axis=0)
  if _GLU.search(key):
    chunks = np.split(a, 2 * tp, axis=0)
    return [np.concatenate([chunks[r], chunks[tp + r]], axis=0) for r in range(tp)]
  return [a] * tp


def rank_shape(key: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
  """The shape each of `tp` ranks holds of a key whose TP=1 shape is `shape` (ValueError if it does not divide)."""
  axis = 1 if _ROW_PARALLEL_INPUT.search(key) else 0 if _COLUMN_PARALLEL.search(key) or _GLU.search(key) else None
  if axis is None:
    return tuple(shape)
  if shape[axis] % (2 * tp if _GLU.search(key) else tp):
    raise ValueError(f'{key}: dimension {shape[axis]} does not split over {tp} tensor-parallel ranks')
  return tuple(n // tp if i == axis else n for i, n in enumerate(shape))


def is_split_by_rows(key: str) -> bool:
  """Whether the ranks hold contiguous row ranges of the key (the embedding, query_key_value)."""
  return bool(_COLUMN_PARALLEL.search(key))


def merge_tensor_parallel(shards: list[dict]) -> dict:
  """Per-rank SAT state dicts (rank order) -> one TP=1 state dict."""
  return {key: merge_key(key, [to_numpy(s[key]) for s in shards]) for key in shards[0]}


def split_tensor_parallel(state_dict: dict, tp: int) -> list[dict]:
  """A TP=1 SAT state dict -> `tp` per-rank dicts, the inverse of merge_tensor_parallel."""
  shards = [{} for _ in range(tp)]
  for key, value in state_dict.items():
    for shard, piece in zip(shards, split_key(key, to_numpy(value), tp)):
      shard[key] = piece
  return shards
