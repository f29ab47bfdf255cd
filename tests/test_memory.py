"""Will it fit (glm_jax/memory.py, launch/inspect_model.py): the analytical count against a hand count and against
XLA's memory analysis of the compiled train step and decoder."""

import subprocess
import sys

import jax
import pytest

from glm_jax import memory
from tests.conftest import REPO, load_config, subprocess_env

L, D, N, F, V = 4, 256, 4, 682, 512  # configs/tiny.py with a small vocabulary


def tiny(layers=L, **mesh):
  config = load_config('tiny', vocab_size=V, num_layers=layers)
  config.mesh.update(dict(data=1, **mesh))
  return config


def sizes_of(config):
  return {a: max(1, int(config.mesh[a])) for a in ('data', 'fsdp', 'tensor', 'stage')}


@pytest.mark.parametrize('layers, mesh', [(4, dict(fsdp=2, tensor=2)), (3, dict(tensor=2, stage=2))])
def test_parameters_gradients_and_adam_equal_a_hand_count(layers, mesh):
  config = tiny(layers, **mesh)
  f, t = mesh.get('fsdp', 1), mesh.get('tensor', 1)
  per_layer = (D * 3 * D / (f * t) + 3 * D / t  # QKV kernel [embed, heads..], bias [heads..]
               + D * D / (t * f) + D  # attention dense kernel [heads.., embed], bias (replicated)
               + D * 2 * F / (f * t) + 2 * F / t  # GeGLU input kernel [embed, glu, mlp], bias [glu, mlp]
               + F * D / (t * f) + D  # GeGLU output kernel [mlp, embed], bias
               + 4 * D)  # two LayerNorms
  device_layers = -(-layers // mesh.get('stage', 1))  # a stage's share of the (padded) layer stack
  embedding = V * D / (t * f)
  elements = device_layers * per_layer + embedding + 2 * D  # + the final LayerNorm
  rows = {name: b for name, _, b in memory.train_count(config, sizes_of(config)).rows}
  assert rows['parameters (fp32 master)'] == 4 * elements
  assert rows['Adam mu, nu (2 x fp32)'] == 8 * elements
  assert rows['gradients (fp32)'] == 4 * (elements + embedding)  # + the input lookup's own embedding gradient


def test_the_decoding_cache_is_two_by_layers_batch_length_hidden_over_tensor():
  config = tiny(tensor=2)
  rows = memory.decode_count(config, sizes_of(config), batch=3, prompt=64, generated=32).rows
  cache = [b for name, _, b in rows if name.startswith('key/value cache')]
  assert cache == [2 * L * 3 * 96 * D / 2 * 4]
  int4 = memory.decode_count(config, sizes_of(config), 3, 64, 32, weight_format='int4').rows[0][2]
  assert int4 < 0.4 * rows[0][2]  # the layer matrices at half a byte a weight (the embedding stays fp32)


@pytest.mark.parametrize('policy', ['none', 'dots', 'full'])
def test_activations_grow_with_the_batch_as_xla_compiles_them(policy):
  """Between two batch sizes, the compiled train step's temporaries grow by what the formula says the activations
  and logits grow by (a loose factor: the formula counts jax's saved residuals, XLA fuses and lays them out)."""
  temps, counted = [], []
  for batch in (2, 4):
    config = tiny(layers=2, tensor=1)
    config.model.remat_policy = policy
    config.train.update(dict(batch_size=batch, seq_len=64))
    stats, _ = memory.compile_train_step(config, jax.devices()[:1])
    temps.append(stats['temp'])
    counted.append(memory.train_count(config, sizes_of(config)).total('temp'))
  ratio = (temps[1] - temps[0]) / (counted[1] - counted[0])
  assert 0.6 < ratio < 1.6, (policy, temps, counted)
  assert 0.6 < temps[1] / counted[1] < 1.6


def _inspect(*args):
  return subprocess.run([sys.executable, 'launch/inspect_model.py', '--config', 'configs/tiny.py',
                         '--config.model.vocab_size=512', *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)


def _table(text, label):
  """The numbers of the lines starting with `label` ('arguments', 'temporaries', ...), one list per table."""
  return [[float(x) for x in line.split()[-2:]] for line in text.splitlines() if line.strip().startswith(label + ' ')]


def test_compile_on_a_pipelined_four_device_mesh():
  proc = _inspect('--config.mesh.tensor=2', '--config.mesh.stage=2', '--config.train.pipeline_microbatches=4',
                  '--config.model.remat_policy=full', '--compile')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert out.count('XLA:CPU estimate (4 fake CPU devices') == 2  # training and decoding
  (train_args, decode_args) = _table(out, 'arguments')
  assert train_args[0] == pytest.approx(train_args[1], rel=0.01)  # the state and the batch, exactly
  assert decode_args[0] == pytest.approx(decode_args[1], rel=0.02)  # the weights (and the small inputs)
  train_temp = _table(out, 'temporaries')[0]
  assert 0.6 < train_temp[1] / train_temp[0] < 1.6  # a tiny model: XLA's fixed buffers weigh more


def test_a_bad_mesh_with_compile_is_one_line():
  proc = _inspect('--config.mesh.tensor=3', '--compile')
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('inspect_model.py: error: ') and 'tensor=3' in lines[0], proc.stderr


def test_glm_130b_on_the_papers_stages_is_padded_not_refused():
  """70 layers on 8 stages: each stage holds 9 layer slots (glm_jax/pipeline.py pads), which the report counts."""
  proc = subprocess.run([sys.executable, 'launch/inspect_model.py', '--config', 'configs/glm_130b.py',
                         '--config.mesh.tensor=4', '--config.mesh.stage=8', '--config.model.remat_policy=full',
                         '--memory=train'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '(remat full, 9 layers x' in proc.stdout
