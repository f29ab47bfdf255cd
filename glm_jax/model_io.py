"""Model checkpoints for inference: save and load (params, config), and SAT checkpoint folders on disk.

A glm-jax model checkpoint is a directory:
    <dir>/config.json      the whole config (config.model is what the model needs), and `weight_format`: the format
                           of the big matrices stored (glm_jax/weights.py; 'in_out', the checkpoint layout, if absent)
    <dir>/params/...       the parameter pytree, an Orbax checkpoint (tensorstore arrays)
It is written under a temporary name and renamed when complete, so a crash never leaves a half checkpoint. Stacked
layer arrays ([L, ...] under 'layers') are stored in chunks of one layer, so that `read_params_by_layer` reads a
layer's slices and nothing more (tensorstore decodes whole chunks). For models larger than the host's memory,
`StreamedModelWriter` writes the same layout piece by piece (the embedding in chunks of rows too) and `StoredParams`
reads any stored array by slices (glm_jax/sat_stream.py converts SAT checkpoints with them).

`load_model` also accepts a training run directory (launch/train.py's --workdir): the parameters of its latest
complete checkpoint and the run's config.json.

SAT checkpoints (glm130b.md §8.1): `<dir>/latest` holds the iteration; `<dir>/<iteration>/mp_rank_XX_model_states.pt`
hold one tensor-parallel rank each, as `{'module': state_dict}`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def save_model(directory: str | Path, params, config, *, weight_format: str = 'in_out') -> Path:
  """Writes params (their big matrices in `weight_format`) and config to `directory` (which must not exist yet),
  atomically."""
  from glm_jax import weights
  weights.get(weight_format)
  config = ml_collections.ConfigDict(config.to_dict())
  config.weight_format = weight_format
  with atomic_directory(directory) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / 'params', params, save_args=layer_chunked_save_args(params))
      checkpointer.wait_until_finished()
    (tmp / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return Path(directory).resolve()


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
  """A temporary directory next to `directory` (which must not exist), renamed to it when the block succeeds and
  removed when it fails, so that an output appears only complete."""
  directory = Path(directory).resolve()
  if directory.exists():
    raise ValueError(f'{directory} already exists; choose a new output directory')
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.tmp-', dir=directory.parent))
  try:
    yield tmp
    os.replace(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


# A streamed checkpoint stores arrays that are not stacked layers (the embedding [V, D]) in chunks of rows of at most
# this many bytes, so that they are written and read in slices (stacked layer arrays: one layer per chunk).
MAX_CHUNK_BYTES = 16 * 2 ** 20
# Orbax's layout of StandardCheckpointer.save of numpy arrays (orbax-checkpoint 0.12.8), which StreamedModelWriter
# writes itself: one OCDBT database in <dir>/params holding a zarr v2 array per leaf at '<dotted key path>/', and
# _METADATA naming the leaves. tests/test_convert_streaming.py checks these against a save_model of the same tree.
_OCDBT_CONFIG = {'compression': {'id': 'zstd'}, 'max_decoded_node_bytes': 100_000_000, 'max_inline_value_bytes': 1024,
                 'version_tree_arity_log2': 4}
_ZARR_FIELDS = {'compressor': {'id': 'zstd', 'level': 1}, 'dimension_separator': '.', 'fill_value': None,
                'filters': None, 'order': 'C', 'zarr_format': 2}


class StreamedModelWriter:
  """A model checkpoint written piece by piece, for models larger than the host's memory: the layout save_model
  writes (load_model, load_params_like and read_params_by_layer read it), the arrays created empty up front and
  each filled by slices as they come, so only the slice being written is in memory.

      with StreamedModelWriter(out, config, shapes) as ckpt:        # shapes: a nested dict of jax.ShapeDtypeStruct
        ckpt.write(('layers', 'mlp', 'h_to_4h_kernel'), 3, w)        # layer 3 of a stacked [L, ...] array
        for rows in ckpt.row_slices(('word_embeddings',)):           # a big array, chunk by chunk
          ckpt.write(('word_embeddings',), rows, e[rows])

  Values are cast to the array's dtype. The checkpoint appears at `directory` (which must not exist) only when the
  block ends without an error and every array has been written in full; otherwise nothing is left behind.
  """

  def __init__(self, directory: str | Path, config, shapes, *, weight_format: str = 'in_out'):
    self.directory = Path(directory).resolve()
    if self.directory.exists():
      raise ValueError(f'{self.directory} already exists; choose a new output directory')
    self._config = ml_collections.ConfigDict(config.to_dict())
    self._config.weight_format = weight_format
    self._leaves = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(shapes)}
    self._arrays, self._written = {}, {}

  def __enter__(self):
    import tensorstore as ts
    self.directory.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = Path(tempfile.mkdtemp(prefix=f'.{self.directory.name}.tmp-', dir=self.directory.parent))
    try:
      # One context for all arrays: they share the database's writer (and no chunk cache is kept).
      context = ts.Context({'cache_pool': {'total_bytes_limit': 0}})
      kvstore = {'driver': 'ocdbt', 'base': f'file://{self._tmp / "params"}', 'config': _OCDBT_CONFIG}
      for keys, s in self._leaves.items():
        metadata = dict(_ZARR_FIELDS, shape=list(s.shape), chunks=list(self._chunks(keys, s)),
                        dtype='bfloat16' if s.dtype == jax.numpy.bfloat16 else np.dtype(s.dtype).str)
        self._arrays[keys] = ts.open({'driver': 'zarr', 'kvstore': dict(kvstore, path='.'.join(keys) + '/'),
                                      'metadata': metadata}, create=True, context=context).result()
        self._written[keys] = 0
    except BaseException:
      shutil.rmtree(self._tmp, ignore_errors=True)
      raise
    return self

  @staticmethod
  def _chunks(keys, s) -> tuple[int, ...]:
    if keys[0] == 'layers':
      return (1,) + tuple(s.shape[1:])
    row_bytes = np.dtype(s.dtype).itemsize * int(np.prod(s.shape[1:], dtype=np.int64))
    return (max(1, min(s.shape[0], MAX_CHUNK_BYTES // max(row_bytes, 1))),) + tuple(s.shape[1:]) if s.shape else ()

  def row_slices(self, keys: tuple[str, ...]) -> list[slice]:
    """Slices of the first axis, one stored chunk each: the pieces to write a big array in."""
    rows, n = self._arrays[keys].chunk_layout.write_chunk.shape[0], self._leaves[keys].shape[0]
    return [slice(a, min(a + rows, n)) for a in range(0, n, rows)]

  def write(self, keys: tuple[str, ...], index, value) -> None:
    """Writes `value` at `index` (None: the whole array; an int: that layer; a slice of rows) of the array `keys`."""
    array = self._arrays[keys] if index is None else self._arrays[keys][index]
    value = np.asarray(value).astype(self._leaves[keys].dtype, copy=False)
    if value.shape != tuple(array.shape):
      raise ValueError(f'{".".join(keys)}[{index}]: got shape {value.shape}, expected {tuple(array.shape)}')
    array.write(value).result()
    self._written[keys] += value.size
    release_freed_memory()

  def __exit__(self, exc_type, *_):
    try:
      if exc_type is None:
        short = [k for k, s in self._leaves.items() if self._written[k] != int(np.prod(s.shape, dtype=np.int64))]
        if short:
          raise ValueError(f'{self.directory}: parameter {".".join(short[0])} was not written in full')
        self._arrays.clear()
        (self._tmp / 'params' / '_METADATA').write_text(json.dumps(_orbax_tree_metadata(self._leaves)))
        (self._tmp / 'config.json').write_text(self._config.to_json_best_effort(indent=2))
        os.replace(self._tmp, self.directory)
    finally:
      if self._tmp.exists():
        shutil.rmtree(self._tmp, ignore_errors=True)


@functools.cache
def _glibc():
  try:
    libc = ctypes.CDLL(None)
    libc.mallopt(-8, 1)  # M_ARENA_MAX: threads started from now on share the main heap
    libc.mallopt(-3, 2 ** 20)  # M_MMAP_THRESHOLD: blocks of 1 MiB and more get mappings of their own
    return libc
  except (OSError, AttributeError):  # not glibc
    return None


def release_freed_memory() -> None:
  """Gives the memory this process's C heap holds free back to the system (glibc's malloc_trim; nothing elsewhere).
  A streamed conversion calls it before it starts and after each slice. The first call also sets glibc's malloc
  for good, process-wide: one heap for threads started from then on (glibc gives threads heaps of their own, where
  tensorstore's and torch's threads keep freed buffers that malloc_trim does not get back), and blocks of 1 MiB or
  more mapped on their own (glibc raises that threshold up to 32 MiB as large blocks are freed). Measured on a
  streamed import (6 layers of hidden 2048, 16 MB embedding slices): RssAnon kept after the slices 150 MB with none
  of this, 60-80 MB with either setting, 4 MB with both and malloc_trim."""
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)


def _orbax_tree_metadata(leaves) -> dict:
  """The _METADATA Orbax writes for a nested dict of numpy arrays (their paths `leaves`)."""
  tree = {str(keys): {'key_metadata': [{'key': k, 'key_type': 2} for k in keys],  # 2: a dict key
                      'value_metadata': {'value_type': 'np.ndarray', 'skip_deserialize': False}}
          for keys in sorted(leaves)}
  return {'tree_metadata': tree, 'use_ocdbt': True, 'use_zarr3': False, 'store_array_data_equal_to_fill_value': True,
          'custom_metadata': None}


@contextlib.contextmanager
def _metadata_warning_off():
  """Orbax warns that a training run's item folder (checkpoints/<step>/state) has no _CHECKPOINT_METADATA: its
  manager writes that file one level up, and the item reads fine without it."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def layer_chunked_save_args(tree):
  """Orbax SaveArgs storing every leaf under a 'layers' key (a stacked [L, ...] array) in chunks of one layer."""
  def args(path, _):
    stacked = any(getattr(k, 'key', None) == 'layers' for k in path)
    return ocp.SaveArgs(shard_axes=(0,)) if stacked else ocp.SaveArgs()
  return jax.tree_util.tree_map_with_path(args, tree)


def _config_from_json(path: Path) -> ml_collections.ConfigDict:
  """A checkpoint's config, with `weight_format` set: configs written before it existed said it as
  config.model.kernel_layout (the only value they stored was the checkpoint layout, 'in_out')."""
  try:
    values = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read the config ({e})') from None
  if not isinstance(values, dict) or not isinstance(values.get('model'), dict):
    raise ValueError(f'{path}: not a glm-jax config (no "model" section)')
  old = values['model'].pop('kernel_layout', None)
  values.setdefault('weight_format', old or 'in_out')
  return ml_collections.ConfigDict(values)


def read_config(path: str | Path) -> ml_collections.ConfigDict:
  """The config of a glm-jax model checkpoint or training run directory, without reading the parameters."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f'{path}: no such checkpoint')
  if not (path / 'config.json').is_file() or not ((path / 'params').is_dir() or (path / 'checkpoints').is_dir()):
    raise ValueError(f'{path}: not a glm-jax checkpoint (expected config.json with params/ or checkpoints/)')
  return _config_from_json(path / 'config.json')


def _latest_run_step(run_dir: Path) -> Path:
  ckpts = run_dir / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / 'state').is_dir())
  if not steps:
    raise ValueError(f'{ckpts}: no complete checkpoint')
  return ckpts / str(steps[-1]) / 'state'


def _stored_params(path: Path):
  """(Orbax item folder, the parameters' key in it or None, their stored metadata tree) of a model checkpoint
  (<dir>/params) or a training run (the params of its latest complete checkpoint's state)."""
  if (path / 'params').is_dir():
    params_dir, subtree = path / 'params', None
  else:
    params_dir, subtree = _latest_run_step(path), 'params'
  with ocp.PyTreeCheckpointer() as checkpointer, _metadata_warning_off():
    stored = checkpointer.metadata(params_dir.resolve()).item_metadata.tree
  if subtree is not None and subtree not in stored:
    raise ValueError(f'{params_dir}: no {subtree!r} in this checkpoint')
  return params_dir, subtree, stored[subtree] if subtree else stored


def load_model(path: str | Path, *, mesh=None):
  """(params, config) from a model checkpoint or a training run directory; the params' big matrices are in
  config.weight_format (glm_jax/weights.py).

  Only the parameters are read (a training run's optimizer state stays on disk). mesh: an optional device mesh
  (sharding.make_mesh); each parameter is then read straight into its shards, placed by the config's axis rules,
  so no host ever holds the whole model. Without a mesh: numpy arrays on the host.
  """
  path = Path(path)
  config = read_config(path)
  params_dir, subtree, stored = _stored_params(path)
  with ocp.PyTreeCheckpointer() as checkpointer:
    if mesh is None:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    else:
      target, restore_args = _sharded_targets(stored, config, mesh, params_dir)
    if subtree is not None:
      target, restore_args = {subtree: target}, {subtree: restore_args}
    restored = checkpointer.restore(params_dir.resolve(), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=subtree is not None))
  return (restored[subtree] if subtree else restored), config


def load_params_like(path: str | Path, like):
  """The parameters of a model checkpoint or training run directory, read straight into the shardings of `like` (a
  tree of arrays: a new run's float32 parameters, on any mesh) and cast to its dtypes: the start of a fine-tuning
  run. ValueError naming the checkpoint and the first parameter whose shape differs from `like`'s, or a checkpoint
  whose weights are not the trainable `in_out` format (quantized or decode-format weights cannot be trained)."""
  path = Path(path)
  config = read_config(path)
  if config.get('weight_format', 'in_out') != 'in_out':
    raise ValueError(f'{path}: weight_format {config.weight_format!r}: training starts from float in_out weights')
  params_dir, subtree, stored = _stored_params(path)
  have = {jax.tree_util.keystr(k): tuple(m.shape) for k, m in jax.tree_util.tree_leaves_with_path(stored)}
  want = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(like)}
  for key in sorted(set(have) | set(want)):
    if have.get(key) != want.get(key):
      raise ValueError(f'{path}: parameter {key} is {have.get(key) or "missing"} there and '
                       f'{want.get(key) or "absent"} in this model')
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), like)
  if subtree is not None:
    target, restore_args = {subtree: target}, {subtree: restore_args}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(params_dir.resolve(), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=subtree is not None))
  return restored[subtree] if subtree else restored


class StoredParams:
  """The parameters of a model checkpoint or training run directory, opened for reading by slices: `tree` is their
  stored metadata (shapes, dtypes), `read(keys, index)` reads the array at the tuple of dict keys `keys` (a leaf's
  path in the tree), whole or its `index` (a layer, a slice of rows) as a host numpy array (tensorstore decodes whole
  stored chunks, so a slice costs the chunks it touches)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.config = read_config(self.path)
    self._dir, subtree, self.tree = _stored_params(self.path)
    self._prefix = f'{subtree}.' if subtree else ''

  def open(self, keys: tuple[str, ...]):
    import tensorstore as ts
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{self._dir.resolve()}',
                                          'path': self._prefix + '.'.join(keys) + '/'}}
    try:
      return ts.open(spec, open=True, read=True).result()
    except ValueError as e:
      raise ValueError(f'{self._dir}: cannot open parameter {".".join(keys)} ({str(e).splitlines()[0][:200]})') from None

  def chunk_rows(self, keys: tuple[str, ...]) -> int:
    """Rows (along the first axis) per stored chunk of the array at `keys`."""
    return self.open(keys).chunk_layout.read_chunk.shape[0]

  def read(self, keys: tuple[str, ...], index=None) -> np.ndarray:
    array = self.open(keys)
    if index is None:
      return array.read().result()
    if isinstance(index, slice) or array.chunk_layout.read_chunk.shape[0] == 1:
      return array[index].read().result()
    return array.read().result()[index]  # one layer of an array not chunked by layer: the whole array, then the slice


def read_params_by_layer(path: str | Path):
  """(config, entries) of a model checkpoint or training run directory: the parameters as an iterator of
  (name, subtree) pairs of host numpy arrays, one top-level entry at a time, the stacked layers as 'layers_0',
  'layers_1', ... (the per-layer layout of weights.unstack_layers), each read as its own slices of the stored arrays.
  A caller that converts and places each entry before taking the next never holds the whole model on the host.
  (A checkpoint whose stacked arrays are not chunked by layer, as written before save_model chunked them, is read
  one whole array at a time instead.)"""
  stored = StoredParams(path)

  def entries():
    for name, value in stored.tree.items():
      if name != 'layers':
        yield name, _map_keyed(lambda keys, _: stored.read((name,) + keys), value)
        continue
      num_layers = jax.tree.leaves(value)[0].shape[0]
      for i in range(num_layers):
        yield f'layers_{i}', _map_keyed(lambda keys, _, i=i: stored.read(('layers',) + keys, i), value)
  return stored.config, entries()


def _map_keyed(fn, tree, keys=()):
  """fn(keys, leaf) over a nested dict (or a leaf), keys the tuple of dict keys leading to the leaf."""
  if isinstance(tree, dict):
    return {k: _map_keyed(fn, v, keys + (k,)) for k, v in tree.items()}
  return fn(keys, tree)


def _sharded_targets(stored, config, mesh, params_dir: Path):
  """Restore targets placing each stored parameter on `mesh` by the config's axis rules (sharding.param_shardings)."""
  import flax.linen as nn

  from glm_jax import sharding
  from glm_jax.model import GLM

  model = GLM(config.model, weight_format=config.weight_format)
  boxed = sharding.abstract_params(model, config.model)
  expected = nn.meta.unbox(boxed)
  if jax.tree.structure(expected) != jax.tree.structure(stored) or any(
      tuple(e.shape) != tuple(m.shape) for e, m in zip(jax.tree.leaves(expected), jax.tree.leaves(stored))):
    raise ValueError(f'{params_dir}: the stored parameters do not match the model its config.json describes')
  shardings = sharding.shardings_for(boxed, mesh, sharding.axis_rules(config))
  targets = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), stored, shardings)
  return targets, jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)


# ------------------------------------------------------------------------------------------------------------------
# SAT checkpoint folders


def read_sat_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
  """A SAT checkpoint (folder with `latest`, an iteration folder, or one .pt file) -> one merged TP=1 state dict."""
  from glm_jax.sat_convert import merge_tensor_parallel
  return merge_tensor_parallel(read_sat_shards(path))


def sat_rank_files(path: str | Path) -> list[Path]:
  """The rank files of a SAT checkpoint (a folder with `latest`, an iteration folder, or one .pt file), in rank
  order; ValueError naming the folder when there are none or a rank is missing."""
  path = Path(path)
  if path.is_file():
    return [path]
  if (path / 'latest').is_file():
    path = path / (path / 'latest').read_text().strip()
  files = {int(re.findall(r'\d+', p.name)[0]): p for p in path.glob('mp_rank_*_model_states.pt')}
  if not files:
    raise ValueError(f'{path}: no mp_rank_XX_model_states.pt files')
  missing = sorted(set(range(max(files) + 1)) - set(files))
  if missing:
    raise ValueError(f'{path}: rank file mp_rank_{missing[0]:02d}_model_states.pt is missing '
                     f'({len(files)} of {max(files) + 1} ranks present)')
  return [files[r] for r in sorted(files)]


def load_sat_file(f: Path, *, mmap: bool = False) -> dict:
  """One SAT rank file's state dict (its 'module' dict), loaded with weights_only=True (never unpickling arbitrary
  objects); mmap: memory-map the file instead of reading it, so a tensor's bytes are read only when touched."""
  import torch  # the PyTorch side is only needed here

  try:
    blob = torch.load(f, map_location='cpu', weights_only=True, mmap=mmap)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
    raise ValueError(f'{f}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
  sd = blob.get('module', blob) if isinstance(blob, dict) else None
  if not isinstance(sd, dict):
    raise ValueError(f"{f}: expected a dict with a 'module' state dict")
  return sd


def read_sat_shards(path: str | Path, *, mmap: bool = False) -> list[dict]:
  """The per-rank state dicts of a SAT checkpoint (rank order), each loaded with weights_only=True (load_sat_file)."""
  return [load_sat_file(f, mmap=mmap) for f in sat_rank_files(path)]


def write_sat_checkpoint(directory: str | Path, state_dict: dict, *, tp: int = 1, iteration: int = 0,
                         dtype: str = 'float16') -> Path:
  """Writes a SAT checkpoint folder (`latest` + `<iteration>/mp_rank_XX_model_states.pt`), atomically."""
  from glm_jax.sat_convert import split_tensor_parallel
  return write_sat_shards(directory, split_tensor_parallel(state_dict, tp), iteration=iteration, dtype=dtype)


def write_sat_shards(directory: str | Path, shards: list[dict], *, iteration: int = 0,
                     dtype: str = 'float16') -> Path:
  """Writes per-rank state dicts as a SAT checkpoint folder, atomically: floating-point arrays in `dtype`, integer
  ones (quantized weights) as they are; a `..._scale` array (quantization scales) stays float16."""
  import torch

  torch_dtype = {'float16': torch.float16, 'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  with atomic_directory(directory) as tmp:
    (tmp / str(iteration)).mkdir()
    for rank, shard in enumerate(shards):
      tensors = {}
      for k, v in shard.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.integer):
          tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
        else:
          dt = torch.float16 if k.endswith('_scale') else torch_dtype
          tensors[k] = torch.from_numpy(np.ascontiguousarray(v.astype(np.float32))).to(dt)
      torch.save({'module': tensors}, tmp / str(iteration) / f'mp_rank_{rank:02d}_model_states.pt')
    (tmp / 'latest').write_text(str(iteration))
  return Path(directory).resolve()
