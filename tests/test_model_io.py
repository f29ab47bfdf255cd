"""SAT checkpoint folders <-> glm-jax model checkpoints, through launch/convert_sat.py, checked against SAT."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from glm_jax import GLM, model_io
from tests import sat_reference as R
from tests.conftest import PARITY_MODEL, REPO, subprocess_env

torch.set_num_threads(1)
MODEL_FLAGS = [f'--config.model.{k}={v}' for k, v in PARITY_MODEL.items()]


def _cli(*args):
  return subprocess.run([sys.executable, 'launch/convert_sat.py', *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def sat_model():
  return R.build_sat_glm130b(**PARITY_MODEL, seed=11, init_std=0.1)


def test_sat_tp2_folder_to_glm_jax_and_back(sat_model, tmp_path):
  sd = R.state_dict_numpy(sat_model)
  sat_dir = model_io.write_sat_checkpoint(tmp_path / 'sat', sd, tp=2, iteration=7, dtype='float32')
  assert (sat_dir / 'latest').read_text() == '7'
  assert len(list((sat_dir / '7').glob('mp_rank_*_model_states.pt'))) == 2

  proc = _cli('--from-sat', str(sat_dir), '--config', 'configs/tiny.py', *MODEL_FLAGS, '--out', str(tmp_path / 'jax'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  params, config = model_io.load_model(tmp_path / 'jax')
  assert config.model.hidden_size == PARITY_MODEL['hidden_size']

  rng = np.random.default_rng(0)
  s = 12
  tokens = rng.integers(0, PARITY_MODEL['vocab_size'], (2, s)).astype(np.int32)
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (2, s))
  may = np.tril(np.ones((s, s), bool))[None, None]
  may[..., :5] = True
  ref, _ = R.sat_forward(sat_model, tokens, pos, may)
  ours = np.asarray(GLM(config.model).apply({'params': params}, tokens, pos, may))
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()

  proc = _cli('--to-sat', str(tmp_path / 'jax'), '--out', str(tmp_path / 'sat2'), '--tp', '2', '--dtype', 'float32')
  assert proc.returncode == 0, proc.stderr[-2000:]
  back = model_io.read_sat_checkpoint(tmp_path / 'sat2')
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  fresh = R.build_sat_glm130b(**PARITY_MODEL, seed=12, init_std=0.1)
  R.load_state_dict_numpy(fresh, back)  # strict


def test_the_merged_tp_layout_is_glu_aware(sat_model):
  """Rank r holds [value rows of r; gelu rows of r]: plain concatenation of ranks would be wrong."""
  from glm_jax import merge_tensor_parallel, split_tensor_parallel
  sd = R.state_dict_numpy(sat_model)
  shards = split_tensor_parallel(sd, 2)
  key = 'transformer.layers.0.mlp.dense_h_to_4h.weight'
  f = PARITY_MODEL['inner_hidden_size']
  np.testing.assert_array_equal(shards[1][key][:f // 2], sd[key][f // 2:f])  # rank 1's value half
  np.testing.assert_array_equal(shards[1][key][f // 2:], sd[key][f + f // 2:])  # rank 1's gelu half
  np.testing.assert_array_equal(merge_tensor_parallel(shards)[key], sd[key])
  assert not np.array_equal(np.concatenate([s[key] for s in shards]), sd[key])


def test_bad_inputs_give_one_line(tmp_path):
  proc = _cli('--from-sat', str(tmp_path / 'missing'), '--config', 'configs/tiny.py', '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'missing' in proc.stderr.strip().splitlines()[-1]
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(b'not a checkpoint')
  proc = _cli('--from-sat', str(bad), '--config', 'configs/tiny.py', '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2 and 'bad.pt' in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'o').exists()
