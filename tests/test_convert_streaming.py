"""Streamed conversion (glm_jax/sat_stream.py, launch/convert_sat.py): SAT folders and safetensors <-> glm-jax.

The streamed import must equal the in-memory conversion (from_sat_state_dict(merge_tensor_parallel(...))) bit for bit;
the TP 1 export loads strictly into SAT's GLM130B and gives our logits; TP 2 and 4 exports, merged here by §8.2's rules
(written from the spec, not sat_convert's), give back the TP 1 export exactly; safetensors hold the TP 1 export's
tensors. Tiny random models in fp32 (and one fp16 import), with the embedding cut into chunks that straddle ranks.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from glm_jax import GLM, from_sat_state_dict, model_io, rope, sat_stream
from glm_jax.sat_convert import merge_tensor_parallel
from tests import sat_reference as R
from tests.conftest import PARITY_MODEL, REPO, load_config, subprocess_env

torch.set_num_threads(1)
CONFIG = load_config('tiny', **PARITY_MODEL)
MODEL_FLAGS = [f'--config.model.{k}={v}' for k, v in PARITY_MODEL.items()]
# 48 rows of the [512, 128] fp32 embedding per chunk: 11 chunks, the last short, across the rank boundaries.
CHUNK_BYTES = 48 * PARITY_MODEL['hidden_size'] * 4


@pytest.fixture(scope='module', autouse=True)
def small_chunks():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(model_io, 'MAX_CHUNK_BYTES', CHUNK_BYTES)
    yield


@pytest.fixture(scope='module')
def sat_model():
  model = R.build_sat_glm130b(**PARITY_MODEL, seed=21, init_std=0.1)
  R.set_rope_inv_freq(model, rope.inv_freq_f32(PARITY_MODEL['hidden_size'] // PARITY_MODEL['num_attention_heads']))
  return model


@pytest.fixture(scope='module')
def sd(sat_model):
  return R.state_dict_numpy(sat_model)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
  return tmp_path_factory.mktemp('convert')


@pytest.fixture(scope='module')
def sat_folders(sd, work):
  """SAT checkpoint folders of the model at TP 1, 2 and 4 (fp32), as SAT's convert_tp would write them."""
  return {tp: model_io.write_sat_checkpoint(work / f'sat{tp}', sd, tp=tp, iteration=3, dtype='float32')
          for tp in (1, 2, 4)}


@pytest.fixture(scope='module')
def imported(sat_folders, work):
  return {tp: sat_stream.import_sat(path, CONFIG, work / f'jax{tp}') for tp, path in sat_folders.items()}


@pytest.fixture(scope='module')
def exports(imported, work):
  """SAT exports of the TP 1 import at TP 1, 2 and 4, fp32: {tp: per-rank module dicts}."""
  out = {}
  for tp in (1, 2, 4):
    path = sat_stream.export_sat(imported[1], work / f'export{tp}', tp=tp, dtype='float32', iteration=5)
    assert (path / 'latest').read_text() == '5'
    out[tp] = [torch.load(f, weights_only=True)['module'] for f in model_io.sat_rank_files(path)]
  return out


def _assert_trees_equal(ours, ref):
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)


def _in_memory(sat_dir, config):
  return from_sat_state_dict(merge_tensor_parallel(model_io.read_sat_shards(sat_dir)), config.model)


@pytest.mark.parametrize('tp', [1, 2, 4])
def test_streamed_import_equals_the_in_memory_conversion(imported, sat_folders, tp):
  params, config = model_io.load_model(imported[tp])
  assert config.weight_format == 'in_out' and config.model.hidden_size == PARITY_MODEL['hidden_size']
  _assert_trees_equal(params, _in_memory(sat_folders[tp], CONFIG))
  stored = model_io.StoredParams(imported[tp])
  assert stored.chunk_rows(('word_embeddings',)) == 48
  assert stored.chunk_rows(('layers', 'mlp', 'h_to_4h_kernel')) == 1
  _, entries = model_io.read_params_by_layer(imported[tp])
  by_layer = dict(entries)
  np.testing.assert_array_equal(by_layer['layers_2']['attention']['qkv_kernel'],
                                params['layers']['attention']['qkv_kernel'][2])


def test_streamed_import_in_fp16(sd, work):
  config = load_config('tiny', **PARITY_MODEL, dtype='float16', param_dtype='float16')
  sat_dir = model_io.write_sat_checkpoint(work / 'sat2_fp16', sd, tp=2, dtype='float16')
  params, _ = model_io.load_model(sat_stream.import_sat(sat_dir, config, work / 'jax2_fp16'))
  assert params['word_embeddings'].dtype == np.float16
  _assert_trees_equal(params, _in_memory(sat_dir, config))


def test_the_streamed_checkpoint_is_what_orbax_writes(imported, sat_folders, work):
  """Same _METADATA and zarr metadata as save_model of the same tree (but the embedding's chunks), and Orbax
  restores it onto a mesh (load_params_like)."""
  import tensorstore as ts
  params = _in_memory(sat_folders[1], CONFIG)
  reference = model_io.save_model(work / 'saved', params, CONFIG)

  def layout(path):
    kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{path}/params'}).result()
    arrays = {k.decode(): json.loads(kv.read(k).result().value) for k in kv.list().result()
              if k.endswith(b'/.zarray')}
    arrays['word_embeddings/.zarray'].pop('chunks')
    return json.loads((path / 'params' / '_METADATA').read_text()), arrays

  assert layout(imported[1]) == layout(reference)
  mesh = jax.make_mesh((2, 4), ('a', 'b'))
  like = jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, jnp.float32), jax.NamedSharding(
      mesh, jax.sharding.PartitionSpec('b' if x.shape[0] % 4 == 0 else None))), params)
  restored = model_io.load_params_like(imported[1], like)
  _assert_trees_equal(jax.tree.map(np.asarray, restored), params)


def test_tp1_export_loads_strictly_into_sat_and_gives_our_logits(exports, imported, sd, sat_model):
  module = exports[1][0]
  assert list(module) == list(sd)  # SAT's keys, in SAT's order, and nothing else
  fresh = R.build_sat_glm130b(**PARITY_MODEL, seed=99, init_std=0.1)
  R.set_rope_inv_freq(fresh, rope.inv_freq_f32(PARITY_MODEL['hidden_size'] // PARITY_MODEL['num_attention_heads']))
  R.load_state_dict_numpy(fresh, {k: v.numpy() for k, v in module.items()})  # strict
  for k in sd:
    assert module[k].dtype == torch.float32 and np.array_equal(module[k].numpy(), sd[k]), k

  params, config = model_io.load_model(imported[1])
  rng = np.random.default_rng(0)
  s = 12
  tokens = rng.integers(0, PARITY_MODEL['vocab_size'], (2, s)).astype(np.int32)
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (2, s))
  may = np.tril(np.ones((s, s), bool))[None, None]
  may[..., :5] = True
  ref, _ = R.sat_forward(fresh, tokens, pos, may)
  ours = np.asarray(GLM(config.model).apply({'params': params}, tokens, pos, may))
  assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def _merge_by_spec(ranks: list[dict]) -> dict:
  """glm130b.md §8.2, from the spec: column-parallel keys (embedding rows, whole heads of query_key_value) concatenate
  along dim 0, row-parallel weights (attention.dense, dense_4h_to_h) along dim 1, dense_h_to_4h rank r holds
  [V_r; G_r] so the logical matrix is [V_0 .. V_T-1; G_0 .. G_T-1], and everything else is replicated."""
  merged = {}
  for key in ranks[0]:
    parts = [r[key] for r in ranks]
    if key.endswith(('word_embeddings.weight', 'query_key_value.weight', 'query_key_value.bias')):
      merged[key] = torch.cat(parts, dim=0)
    elif key.endswith(('attention.dense.weight', 'mlp.dense_4h_to_h.weight')):
      merged[key] = torch.cat(parts, dim=1)
    elif key.endswith(('mlp.dense_h_to_4h.weight', 'mlp.dense_h_to_4h.bias')):
      halves = [p.chunk(2, dim=0) for p in parts]
      merged[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    else:
      assert all(torch.equal(p, parts[0]) for p in parts), key
      merged[key] = parts[0]
  return merged


@pytest.mark.parametrize('tp', [2, 4])
def test_tp_exports_merged_by_the_spec_give_the_tp1_export(exports, tp):
  ranks = exports[tp]
  assert len(ranks) == tp
  d, f = PARITY_MODEL['hidden_size'], PARITY_MODEL['inner_hidden_size']
  assert tuple(ranks[0]['transformer.layers.0.mlp.dense_h_to_4h.weight'].shape) == (2 * f // tp, d)
  assert tuple(ranks[0]['transformer.layers.0.attention.dense.weight'].shape) == (d, d // tp)
  merged, tp1 = _merge_by_spec(ranks), exports[1][0]
  assert list(merged) == list(tp1)
  for k in tp1:
    assert merged[k].dtype == tp1[k].dtype and torch.equal(merged[k], tp1[k]), k


def test_sat_to_jax_to_sat_round_trips_exactly(imported, sat_folders, work):
  back = sat_stream.export_sat(imported[2], work / 'back2', tp=2, dtype='float32', iteration=3)
  for original, exported in zip(model_io.sat_rank_files(sat_folders[2]), model_io.sat_rank_files(back)):
    a, b = torch.load(original, weights_only=True)['module'], torch.load(exported, weights_only=True)['module']
    assert list(a) == list(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (exported.name, k)


@pytest.mark.parametrize('weight_format', ['in_out', 'out_in'])
def test_jax_to_sat_to_jax_round_trips_exactly(sat_folders, work, weight_format):
  """From a save_model checkpoint (its embedding one chunk), in the checkpoint layout or another float format."""
  from glm_jax import weights
  from glm_jax.model import GLMConfig, weight_specs
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (a + rng.standard_normal(a.shape)).astype(a.dtype),
                        _in_memory(sat_folders[1], CONFIG))
  stored = weights.convert_params(params, weight_specs(GLMConfig.make(CONFIG.model)), weight_format)
  source = model_io.save_model(work / f'own_{weight_format}', stored, CONFIG, weight_format=weight_format)
  sat_dir = sat_stream.export_sat(source, work / f'own_{weight_format}_sat4', tp=4, dtype='float32')
  back, _ = model_io.load_model(sat_stream.import_sat(sat_dir, CONFIG, work / f'own_{weight_format}_back'))
  _assert_trees_equal(back, params)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
def test_safetensors_hold_the_tp1_sat_export(imported, work, dtype):
  tp1 = sat_stream.export_sat(imported[1], work / f'export1_{dtype}', dtype=dtype)
  reference = torch.load(model_io.sat_rank_files(tp1)[0], weights_only=True)['module']
  max_bytes = 300_000
  out = sat_stream.export_safetensors(imported[1], work / f'st_{dtype}', dtype=dtype, max_shard_bytes=max_bytes)
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  files = sorted(p.name for p in out.glob('*.safetensors'))
  assert len(files) > 2 and files == sorted(set(index['weight_map'].values()))
  assert files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  assert list(index['weight_map']) == list(reference)
  total = 0
  for name in files:
    with safe_open(out / name, framework='pt') as f:
      keys = list(f.keys())
      size = sum(f.get_tensor(k).nbytes for k in keys)
      assert size <= max_bytes or len(keys) == 1, name
      total += size
      for k in keys:
        assert index['weight_map'][k] == name
        t = f.get_tensor(k)
        assert t.dtype == reference[k].dtype and torch.equal(t, reference[k]), k
  assert total == index['metadata']['total_size']


def test_an_error_while_writing_leaves_nothing(sat_folders, work, monkeypatch):
  from glm_jax import sat_convert
  real = sat_convert.merge_key

  def failing(key, parts):
    if key.startswith('transformer.layers.2.'):
      raise ValueError(f'{key}: injected failure')
    return real(key, parts)

  monkeypatch.setattr(sat_convert, 'merge_key', failing)
  with pytest.raises(ValueError, match='injected'):
    sat_stream.import_sat(sat_folders[2], CONFIG, work / 'failed' / 'out')
  assert list((work / 'failed').iterdir()) == []  # neither the output nor its temporary folder


def _cli(*args):
  return subprocess.run([sys.executable, 'launch/convert_sat.py', *map(str, args)], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def test_cli_converts_both_ways(sat_folders, imported, work):
  proc = _cli('--from-sat', sat_folders[4], '--config', 'configs/tiny.py', *MODEL_FLAGS, '--out', work / 'cli_jax')
  assert proc.returncode == 0, proc.stderr[-2000:]
  _assert_trees_equal(model_io.load_model(work / 'cli_jax')[0], model_io.load_model(imported[4])[0])
  proc = _cli('--to-safetensors', work / 'cli_jax', '--out', work / 'cli_st', '--dtype', 'float32',
              '--max-shard-size', '1MB')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(list((work / 'cli_st').glob('*.safetensors'))) >= 2
  proc = _cli('--to-sat', work / 'cli_jax', '--out', work / 'cli_sat', '--tp', '3')
  assert proc.returncode == 2 and '--tp 3' in proc.stderr.strip().splitlines()[-1]
  assert not (work / 'cli_sat').exists()


@pytest.mark.parametrize('damage', ['truncated', 'missing', 'key_missing'])
def test_a_bad_rank_file_gives_one_line_and_no_output(sat_folders, work, damage):
  import shutil
  broken = work / f'broken_{damage}'
  shutil.copytree(sat_folders[4], broken)
  rank1 = broken / '3' / 'mp_rank_01_model_states.pt'
  if damage == 'truncated':
    rank1.write_bytes(rank1.read_bytes()[:100_000])
  elif damage == 'missing':
    rank1.unlink()
  else:
    blob = torch.load(rank1, weights_only=True)
    del blob['module']['transformer.layers.1.mlp.dense_4h_to_h.bias']
    torch.save(blob, rank1)
  out = work / f'out_{damage}'
  proc = _cli('--from-sat', broken, '--config', 'configs/tiny.py', *MODEL_FLAGS, '--out', out)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
  assert 'mp_rank_01_model_states.pt' in lines[0]
  if damage == 'key_missing':
    assert 'transformer.layers.1.mlp.dense_4h_to_h.bias' in lines[0]
  assert not out.exists() and not list(work.glob(f'.out_{damage}*'))
