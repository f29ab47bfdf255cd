"""Quantized SAT checkpoints (GLM-130B's release layout, glm130b.md §6, §8) <-> glm-jax's quantized formats.

A quantized SAT rank holds, for each of the four matrices of a layer, `<linear>.weight` int8 [out_local,
in_local * bits / 8] and `<linear>.weight_scale` float16 [out_local], the scales computed on that rank's shard. So
the column-parallel matrices (query_key_value, dense_h_to_4h, whose shards are rows) merge into one scale per row,
and the row-parallel ones (attention.dense, dense_4h_to_h, whose shards are input columns) into one scale per row and
rank: the format 'int<bits>-tp<ranks>' (quantize/formats.py). Importing is exact (no requantization); exporting to a
tensor-parallel degree whose shards do not match the stored groups is an error unless `requantize=True`, which
dequantizes (fp16, as the release) and quantizes each target shard again.
"""

from __future__ import annotations

import numpy as np

from glm_jax import sat_convert, weights
from glm_jax.model import GLMConfig, weight_specs
from quantize import format as release_format
from quantize import formats

_ROW_PARALLEL = ('attention.dense.weight', 'mlp.dense_4h_to_h.weight')  # shards are input columns
_GLU = 'mlp.dense_h_to_4h.weight'  # rank r holds [V_r; G_r]


def is_quantized_sat(shards: list[dict]) -> bool:
  return any(k.endswith('.weight_scale') for k in shards[0])


def _merge_rows(parts, glu: bool):
  if glu:
    halves = [np.split(p, 2, axis=0) for p in parts]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  return np.concatenate(parts, axis=0)


def _split_rows(a, tp: int, glu: bool):
  if glu:
    chunks = np.split(a, 2 * tp, axis=0)
    return [np.concatenate([chunks[r], chunks[tp + r]], axis=0) for r in range(tp)]
  return np.split(a, tp, axis=0)


def from_sat_quantized(shards: list[dict], model_config) -> tuple[dict, str]:
  """Per-rank quantized SAT state dicts (rank order) -> (glm-jax params, their weight format), exactly."""
  cfg = GLMConfig.make(model_config)
  specs = weight_specs(cfg)
  tp = len(shards)
  floats = sat_convert.merge_tensor_parallel(
      [{k: v for k, v in s.items() if not sat_convert.is_layer_matrix(k)} for s in shards])
  params = sat_convert.from_sat_state_dict(floats, model_config, layer_matrices=False)
  bits_seen = set()
  for suffix, (group, leaf) in sat_convert.LAYER_MATRICES.items():
    spec = specs[leaf]
    qs, scales = [], []
    for layer in range(cfg.num_layers):
      key = f'transformer.layers.{layer}.{suffix}'
      try:
        q_parts = [sat_convert.to_numpy(s[key]) for s in shards]
        s_parts = [sat_convert.to_numpy(s[key + '_scale']).astype(np.float16) for s in shards]
      except KeyError as e:
        raise ValueError(f'quantized SAT checkpoint: rank without key {e.args[0]}') from None
      if q_parts[0].dtype != np.int8:
        raise ValueError(f'{key}: expected int8 quantized weights, found {q_parts[0].dtype}')
      in_local = spec.i // tp if suffix in _ROW_PARALLEL else spec.i
      bits = 8 * q_parts[0].shape[1] // in_local
      if bits not in release_format.BITS or bits * in_local != 8 * q_parts[0].shape[1]:
        raise ValueError(f'{key}: {q_parts[0].shape[1]} bytes per row fit neither INT8 nor INT4 of {in_local} '
                         'input columns')
      bits_seen.add(bits)
      if suffix in _ROW_PARALLEL:
        q, scale = np.concatenate(q_parts, axis=1), np.stack(s_parts, axis=1)
      else:
        glu = suffix == _GLU
        q, scale = _merge_rows(q_parts, glu), _merge_rows(s_parts, glu)[:, None]
      if q.shape != (spec.o, spec.i * bits // 8):
        raise ValueError(f'{key}: merged quantized weight has shape {q.shape}, the config needs '
                         f'{(spec.o, spec.i * bits // 8)}')
      qs.append(q)
      scales.append(scale)
    stored = [formats.QuantizedWeight.from_release(q, scale, spec) for q, scale in zip(qs, scales)]
    params['layers'][group][leaf] = {k: np.stack([s[k] for s in stored]) for k in ('q', 'scale')}
  if len(bits_seen) != 1:
    raise ValueError(f'quantized SAT checkpoint mixes bit widths {sorted(bits_seen)}')
  return params, formats.format_name(bits_seen.pop(), tensor_parallel=tp if tp > 1 else None)


def to_sat_quantized(params, model_config, weight_format: str, tp: int, *, requantize: bool = False) -> list[dict]:
  """glm-jax params in a quantized format -> `tp` per-rank quantized SAT state dicts (model_io.write_sat_shards)."""
  cfg = GLMConfig.make(model_config)
  specs = weight_specs(cfg)
  fmt = weights.get(weight_format)
  if not formats.is_quantized(weight_format):
    raise ValueError(f'weights in format {weight_format!r} are not quantized')
  params = weights.stack_layers(params)
  floats = sat_convert.to_sat_state_dict(params, model_config, weight_format=weight_format, layer_matrices=False)
  shards = sat_convert.split_tensor_parallel(floats, tp)
  for suffix, (group, leaf) in sat_convert.LAYER_MATRICES.items():
    spec = specs[leaf]
    stored = params['layers'][group][leaf]
    row_parallel = suffix in _ROW_PARALLEL
    want_groups = tp if row_parallel else 1
    for layer in range(cfg.num_layers):
      key = f'transformer.layers.{layer}.{suffix}'
      q = np.asarray(stored['q'][layer]).reshape(spec.o, -1)
      scale = np.asarray(stored['scale'][layer]).reshape(spec.o, -1)
      if scale.shape[1] != want_groups:
        if not requantize:
          raise ValueError(f'{leaf} is stored with {scale.shape[1]} scale group(s) per row ({weight_format}); SAT '
                           f'at tensor-parallel degree {tp} needs {want_groups} (one per row per shard): export at '
                           'the degree it was quantized for, or requantize')
        w16 = release_format.dequantize_weight(q, scale, fmt.bits)
        q, scale = release_format.quantize_weight(w16, fmt.bits, spec.i // want_groups if want_groups > 1 else None)
        scale = scale.reshape(spec.o, want_groups)
      if row_parallel:
        q_parts, s_parts = np.split(q, tp, axis=1), [scale[:, r] for r in range(tp)]
      else:
        glu = suffix == _GLU
        q_parts, s_parts = _split_rows(q, tp, glu), _split_rows(scale[:, 0], tp, glu)
      for r in range(tp):
        shards[r][key] = q_parts[r]
        shards[r][key + '_scale'] = s_parts[r]
  return shards
