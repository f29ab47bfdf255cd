"""SAT checkpoints (PyTorch, glm130b.md §8) <-> glm-jax model checkpoints, streamed: at GLM-130B's size on one host.

    import_sat(sat_dir, config, out)                       # `latest` + <iter>/mp_rank_XX_model_states.pt -> glm-jax
    export_sat(checkpoint, out, tp=8, dtype='float16')     # glm-jax -> a SAT folder split over `tp` ranks
    export_safetensors(checkpoint, out, dtype='bfloat16')  # glm-jax -> model-0000i-of-0000N.safetensors + index json

Nothing holds the model: a tensor is merged from (or split to) its ranks, converted and written before the next is
read, and the embedding [V, D] goes in slices of rows (model_io.MAX_CHUNK_BYTES), so host memory peaks at a few times
the largest tensor of a layer (benchmarks/convert_memory.py measures it). How:
- SAT files are memory-mapped (torch.load(mmap=True, weights_only=True)); a tensor's pages are read when touched and
  are file pages, not anonymous memory. The files are mapped again for every layer (an export: every 64 MB written),
  so that the pages touched so far leave the process (its RSS) rather than accumulate to the whole model.
- After each slice the C heap's freed memory goes back to the system (model_io.release_freed_memory, which also sets
  glibc's malloc so that tensorstore's threads do not keep freed buffers).
- glm-jax checkpoints are written by model_io.StreamedModelWriter (Orbax's layout, chunked by layer and by rows of the
  embedding) and read by model_io.StoredParams, slice by slice.
- A SAT rank file is first saved by torch.save with its tensors' bytes left out (torch.serialization.skip_data, on
  FakeTensors, so no memory is allocated), then mapped shared (MAP_SHARED) and filled tensor by tensor: the result
  is an ordinary torch.save file, each byte written once, straight into the page cache.
- safetensors files are written directly in that format (an 8-byte header length, a JSON header of dtypes, shapes
  and byte offsets, then the tensors' bytes in order): the header is known from the config before any tensor is read.
Every output is written under a temporary name next to the target and renamed when complete; an error leaves nothing.
Conversion rules (keys, layouts, the GLU-aware rank merge) are sat_convert's, so a streamed import equals
from_sat_state_dict(merge_tensor_parallel(...)) bit for bit. Quantized checkpoints are quantize/sat.py's.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from glm_jax import model_io, sat_convert, weights
from glm_jax.model import GLMConfig, weight_specs

DTYPES = {'float16': np.dtype(np.float16), 'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float32': np.dtype(np.float32)}
_SAFETENSORS_DTYPES = {'float16': 'F16', 'bfloat16': 'BF16', 'float32': 'F32'}
EMBEDDING = 'transformer.word_embeddings.weight'
# A SAT export maps its rank files again after this many bytes written, so that the written (dirty) pages leave the
# process's RSS as it goes (the kernel writes them back from the page cache).
_REMAP_BYTES = 64 * 2 ** 20


# ------------------------------------------------------------------------------------------------------------------
# SAT -> glm-jax


def param_shapes(cfg: GLMConfig) -> dict:
  """The glm-jax parameter tree of a float checkpoint ('in_out' layout, cfg.weight_dtype), as ShapeDtypeStructs."""
  def struct(shape):
    return jax.ShapeDtypeStruct(tuple(shape), cfg.weight_dtype)
  sat = sat_convert.expected_sat_shapes(cfg)
  layers: dict = {}
  for suffix, (group, leaf), to_ours, _ in sat_convert.layer_mappings(cfg):
    shape = jax.eval_shape(to_ours, struct(sat[f'transformer.layers.0.{suffix}'])).shape
    layers.setdefault(group, {})[leaf] = struct((cfg.num_layers,) + shape)
  d = cfg.hidden_size
  return {'word_embeddings': struct(sat[EMBEDDING]), 'final_layernorm': {'scale': struct((d,)), 'bias': struct((d,))},
          'layers': layers}


@contextlib.contextmanager
def _mapped_ranks(files):
  """The rank files' state dicts, memory-mapped; leaving the block drops the mappings (and the touched pages)."""
  shards = [model_io.load_sat_file(f, mmap=True) for f in files]
  try:
    yield shards
  finally:
    shards.clear()


def check_sat_ranks(files, shards, cfg: GLMConfig) -> None:
  """Strict: every rank holds exactly the config's keys (rotary buffers aside) at its rank's shape, or a ValueError
  names the file and the first key that differs. Reads no tensor data."""
  expected = sat_convert.expected_sat_shapes(cfg)
  tp = len(files)
  for f, sd in zip(files, shards):
    keys = {k for k in sd if not sat_convert.IGNORED_KEY.search(k)}
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
      raise ValueError(f'{f}: does not match the config: missing keys {missing[:4]}{" ..." if len(missing) > 4 else ""}'
                       f', unexpected keys {unexpected[:4]}{" ..." if len(unexpected) > 4 else ""}')
    for key, shape in expected.items():
      try:
        want = sat_convert.rank_shape(key, shape, tp)
      except ValueError as e:
        raise ValueError(f'{f}: {e} (is a rank file missing?)') from None
      if tuple(sd[key].shape) != want:
        raise ValueError(f'{f}: {key} has shape {tuple(sd[key].shape)}, the config at {tp} tensor-parallel '
                         f'rank(s) expects {want}')
      if not sd[key].is_floating_point():
        raise ValueError(f'{f}: {key} is {sd[key].dtype}, not a float tensor (a quantized checkpoint?)')


def _merged_rows(shards, key: str, rows: slice) -> np.ndarray:
  """Rows [rows] of a key split by rows over the ranks (the embedding), read from the ranks that hold them."""
  per_rank = shards[0][key].shape[0]
  parts = []
  for r, sd in enumerate(shards):
    lo, hi = max(rows.start - r * per_rank, 0), min(rows.stop - r * per_rank, per_rank)
    if lo < hi:
      parts.append(sat_convert.to_numpy(sd[key][lo:hi]))
  return np.concatenate(parts, axis=0)


def import_sat(sat_path: str | Path, config, out: str | Path) -> Path:
  """A float SAT checkpoint (a folder with `latest`, an iteration folder, or one .pt file) -> a glm-jax model
  checkpoint at `out` (config.model describes the model; weights in config.model.param_dtype), streamed."""
  model_io.release_freed_memory()
  cfg = GLMConfig.make(config.model)
  files = model_io.sat_rank_files(sat_path)
  with _mapped_ranks(files) as shards:
    check_sat_ranks(files, shards, cfg)
  with model_io.StreamedModelWriter(out, config, param_shapes(cfg)) as ckpt:
    for rows in ckpt.row_slices(('word_embeddings',)):
      with _mapped_ranks(files) as shards:
        ckpt.write(('word_embeddings',), rows, _merged_rows(shards, EMBEDDING, rows))
    for layer in range(cfg.num_layers):
      with _mapped_ranks(files) as shards:
        for suffix, (group, leaf), to_ours, _ in sat_convert.layer_mappings(cfg):
          key = f'transformer.layers.{layer}.{suffix}'
          merged = sat_convert.merge_key(key, [sat_convert.to_numpy(sd[key]) for sd in shards])
          ckpt.write(('layers', group, leaf), layer, to_ours(merged))
    with _mapped_ranks(files) as shards:
      for leaf, suffix in (('scale', 'weight'), ('bias', 'bias')):
        ckpt.write(('final_layernorm', leaf), None, sat_convert.to_numpy(shards[0][f'transformer.final_layernorm.'
                                                                                     f'{suffix}']))
  return ckpt.directory


# ------------------------------------------------------------------------------------------------------------------
# glm-jax -> SAT tensors (TP=1), one at a time


def _sat_tensors(stored: model_io.StoredParams, dtype: str):
  """(key, first row, array) in SAT's key order: the model's SAT tensors at TP=1 cast to `dtype`, the embedding in
  slices of rows (first row > 0 for all but the first), everything else whole."""
  config = stored.config
  cfg = GLMConfig.make(config.model)
  weight_format = config.get('weight_format', 'in_out')
  fmt = weights.get(weight_format)
  if fmt.name not in ('in_out', 'out_in', 'packed'):
    raise ValueError(f'{stored.path}: weights in format {weight_format!r}: quantized checkpoints are exported by '
                     'quantize/sat.py (convert_sat.py --to-sat)')
  specs, expected, np_dtype = weight_specs(cfg), sat_convert.expected_sat_shapes(cfg), DTYPES[dtype]

  def checked(key, a):
    a = np.asarray(a)
    if a.shape != expected[key]:
      raise ValueError(f'{stored.path}: {key} comes out with shape {a.shape}, the config needs {expected[key]}')
    return a.astype(np_dtype, copy=False)

  def to_checkpoint(name, stored_value):  # a matrix in the checkpoint's format -> the checkpoint layout
    return weights.to_checkpoint_params({name: stored_value}, specs, weight_format)[name]

  # The embedding [V, D] is stored as [V, D] in 'in_out' and 'out_in': read in slices of whole stored chunks.
  v, d = expected[EMBEDDING]
  if fmt.name in ('in_out', 'out_in'):
    if tuple(stored.tree['word_embeddings'].shape) != (v, d):
      raise ValueError(f'{stored.path}: word_embeddings has shape {tuple(stored.tree["word_embeddings"].shape)}, the '
                       f'config needs {(v, d)}')
    chunk = stored.chunk_rows(('word_embeddings',))
    step = chunk * max(1, model_io.MAX_CHUNK_BYTES // (d * np.dtype(stored.tree['word_embeddings'].dtype).itemsize
                                                        * chunk))
    for a in range(0, v, step):
      rows = stored.read(('word_embeddings',), slice(a, min(a + step, v)))
      yield EMBEDDING, a, rows.astype(np_dtype, copy=False)
  else:  # another layout: the whole matrix, converted
    yield EMBEDDING, 0, checked(EMBEDDING, to_checkpoint('word_embeddings', _read_tree(stored, ('word_embeddings',))))
  for layer in range(cfg.num_layers):
    for suffix, (group, leaf), _, to_sat in sat_convert.layer_mappings(cfg):
      value = _read_tree(stored, ('layers', group, leaf), layer)
      if leaf in specs:
        value = to_checkpoint(leaf, value)
      key = f'transformer.layers.{layer}.{suffix}'
      yield key, 0, checked(key, to_sat(np.asarray(value)))
  for leaf, suffix in (('scale', 'weight'), ('bias', 'bias')):
    key = f'transformer.final_layernorm.{suffix}'
    yield key, 0, checked(key, stored.read(('final_layernorm', leaf)))


def _read_tree(stored: model_io.StoredParams, keys, index=None):
  """The stored value at `keys` (an array, or a dict of arrays for a format that stores several), at `index`."""
  node = stored.tree
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      raise ValueError(f'{stored.path}: no parameter {".".join(keys)} in this checkpoint')
    node = node[k]
  if isinstance(node, dict):
    return {k: _read_tree(stored, keys + (k,), index) for k in node}
  return stored.read(keys, index)


# ------------------------------------------------------------------------------------------------------------------
# Writers of SAT tensors


class SatRanksWriter:
  """`tp` SAT rank files in `folder` (mp_rank_XX_model_states.pt), created with every key of `shapes` (TP=1 shapes,
  in order) at its rank's shape in `dtype`, then filled by write() with TP=1 tensors, split here; close() when done."""

  def __init__(self, folder: Path, shapes: dict, tp: int, dtype: str):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    self._torch, self._tp = torch, tp
    self._files = [folder / f'mp_rank_{r:02d}_model_states.pt' for r in range(tp)]
    torch_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype]
    with FakeTensorMode():  # shapes and dtypes only: no memory
      module = {k: torch.empty(sat_convert.rank_shape(k, s, tp), dtype=torch_dtype) for k, s in shapes.items()}
    for f in self._files:
      with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({'module': module}, f)
      # The skipped bytes are a hole in the file: reserve the disk now, so that a full disk is an OSError here and
      # not a SIGBUS when a mapped page is first written.
      with open(f, 'r+b') as fd:
        os.posix_fallocate(fd.fileno(), 0, os.fstat(fd.fileno()).st_size)
    self._shards, self._since_map = None, 0

  def _map(self):
    torch = self._torch
    self._shards = None  # unmaps the previous mappings first
    old = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)  # writes to the tensors go to the files
    try:
      self._shards = [torch.load(f, mmap=True, weights_only=True)['module'] for f in self._files]
    finally:
      torch.serialization.set_default_mmap_options(old)
    self._since_map = 0

  def write(self, key: str, row: int, value: np.ndarray) -> None:
    """Writes `value`, the TP=1 tensor `key` (or its rows from `row` on, for a key split by rows), to the ranks."""
    if self._shards is None or self._since_map > _REMAP_BYTES:
      self._map()
    if sat_convert.is_split_by_rows(key):  # rank r holds rows [r n, (r + 1) n): the part of `value` that falls there
      n = self._shards[0][key].shape[0]
      for r, sd in enumerate(self._shards):
        lo, hi = max(row, r * n), min(row + value.shape[0], (r + 1) * n)
        if lo < hi:
          self._copy(sd[key][lo - r * n:hi - r * n], value[lo - row:hi - row])
    else:
      for sd, part in zip(self._shards, sat_convert.split_key(key, value, self._tp)):
        self._copy(sd[key], part)
    self._since_map += value.nbytes

  def _copy(self, dst, part: np.ndarray) -> None:
    torch = self._torch
    if part.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16 torch knows: copy the bits
      src = torch.from_numpy(np.ascontiguousarray(part).view(np.uint16)).view(torch.bfloat16)
    else:
      src = torch.from_numpy(part)
    dst.copy_(src)

  def close(self) -> None:
    self._shards = None


def export_sat(checkpoint: str | Path, out: str | Path, *, tp: int = 1, dtype: str = 'float16',
               iteration: int = 0) -> Path:
  """A float glm-jax model checkpoint or training run -> a SAT checkpoint folder at `out` (`latest` +
  `<iteration>/mp_rank_XX_model_states.pt`, `{'module': state_dict}`) split over `tp` ranks, tensors in `dtype`."""
  model_io.release_freed_memory()
  stored = model_io.StoredParams(checkpoint)
  cfg = GLMConfig.make(stored.config.model)
  shapes = sat_convert.expected_sat_shapes(cfg)
  for key, shape in shapes.items():
    sat_convert.rank_shape(key, shape, tp)  # a ValueError before anything is written
  with model_io.atomic_directory(out) as tmp:
    (tmp / str(iteration)).mkdir()
    _write_sat_tensors(SatRanksWriter(tmp / str(iteration), shapes, tp, dtype), stored, dtype)
    (tmp / 'latest').write_text(str(iteration))
  return Path(out).resolve()


def _write_sat_tensors(writer, stored: model_io.StoredParams, dtype: str):
  """Every SAT tensor of `stored` through writer.write(key, row, value), one at a time (each freed before the next is
  read); closes the writer and returns it."""
  try:
    for key, row, value in _sat_tensors(stored, dtype):
      writer.write(key, row, value)
      del value
      model_io.release_freed_memory()
  finally:
    writer.close()
  return writer


class _SafetensorsWriter:
  """Sharded safetensors files in `folder`, planned from the keys' shapes (in order) before any tensor is written:
  a new file starts where the next tensor would take the current one past `max_shard_bytes`."""

  def __init__(self, folder: Path, shapes: dict, dtype: str, max_shard_bytes: int):
    itemsize = DTYPES[dtype].itemsize
    plan: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
      n = itemsize * int(np.prod(shape, dtype=np.int64))
      if plan[-1] and size + n > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append(key)
      size += n
    self.weight_map, self.total_size = {}, 0
    self._files, self._order = [], []
    for i, keys in enumerate(plan):
      name = f'model-{i + 1:05d}-of-{len(plan):05d}.safetensors'
      header, offset = {'__metadata__': {'format': 'pt'}}, 0
      for key in keys:
        n = itemsize * int(np.prod(shapes[key], dtype=np.int64))
        header[key] = {'dtype': _SAFETENSORS_DTYPES[dtype], 'shape': list(shapes[key]),
                       'data_offsets': [offset, offset + n]}
        offset += n
        self.weight_map[key] = name
        self._order.append((key, n))
      self.total_size += offset
      text = json.dumps(header, separators=(',', ':')).encode()
      text += b' ' * (-len(text) % 8)  # the tensors' bytes start 8-byte aligned
      f = open(folder / name, 'wb')  # noqa: SIM115 - closed in close()
      f.write(struct.pack('<Q', len(text)) + text)
      self._files.append(f)
    self._file_of = {key: self._files[i] for i, keys in enumerate(plan) for key in keys}
    self._next, self._done = 0, 0  # the key expected next, and its bytes written so far

  def write(self, key: str, row: int, value: np.ndarray) -> None:
    want, n = self._order[self._next]
    if key != want:
      raise ValueError(f'safetensors: {key} written out of order (expected {want})')
    data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    self._file_of[key].write(data)
    self._done += data.size
    if self._done == n:
      self._next, self._done = self._next + 1, 0

  def close(self) -> None:
    for f in self._files:
      f.close()

  def check_complete(self) -> None:
    if self._next != len(self._order):
      raise ValueError(f'safetensors: {self._order[self._next][0]} was not written')


def export_safetensors(checkpoint: str | Path, out: str | Path, *, dtype: str = 'float16',
                       max_shard_bytes: int = 5 * 10 ** 9) -> Path:
  """A float glm-jax model checkpoint or training run -> safetensors files at `out` (SAT's key names, TP=1, tensors
  in `dtype`): model-0000i-of-0000N.safetensors of at most `max_shard_bytes` each (a larger tensor gets a file of its
  own) and model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map": {key: file}})."""
  model_io.release_freed_memory()
  stored = model_io.StoredParams(checkpoint)
  shapes = sat_convert.expected_sat_shapes(GLMConfig.make(stored.config.model))
  with model_io.atomic_directory(out) as tmp:
    files = _write_sat_tensors(_SafetensorsWriter(tmp, shapes, dtype, max_shard_bytes), stored, dtype)
    files.check_complete()
    index = {'metadata': {'total_size': files.total_size}, 'weight_map': files.weight_map}
    (tmp / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
  return Path(out).resolve()
