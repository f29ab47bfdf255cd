"""Three training steps on (data, fsdp, tensor) meshes equal the one-device run (fp32), with the state sharded.

The steps accumulate over two micro-batches, so the scan and the strided micro-batch split run sharded too.
"""

import jax
import numpy as np
import optax
import pytest

from glm_jax import GLM, axis_rules, make_mesh
from glm_jax.config import train_defaults
from glm_jax.sharding import mesh_shape
from glm_jax.train import init_train_state, make_train_step, state_shardings
from tests.conftest import load_config

# 8 heads and inner 176 so that the heads and the GeGLU width split 8 ways; vocab 128 splits over tensor, hidden 64
# over fsdp
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=8, inner_hidden_size=176, vocab_size=128,
             max_sequence_length=64)
B, S, STEPS = 16, 16, 3
MESHES = [(2, 2, 2), (1, 2, 4), (8, 1, 1)]


def make_config():
  config = load_config('tiny', **MODEL)
  config.train = train_defaults()
  config.train.update(dict(learning_rate=5e-4, warmup_steps=1, decay_steps=8, grad_accum_steps=2, batch_size=B,
                           seq_len=S))
  return config


def make_batch():
  rng = np.random.default_rng(0)
  return dict(tokens=rng.integers(0, 128, (B, S), dtype=np.int32),
              targets=rng.integers(0, 128, (B, S), dtype=np.int32),
              position_ids=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
              attention_mask=np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, 1, S, S)).copy(),
              loss_mask=np.ones((B, S), np.float32))


def train(model, config, state, mesh=None, rules=None):
  step = make_train_step(model, config, mesh, rules)
  batch, metrics = make_batch(), []
  for _ in range(STEPS):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  return state, metrics


def mesh_for(shape):
  config = make_config()
  config.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), shape)))
  return config, make_mesh(config.mesh), axis_rules(config)


@pytest.fixture(scope='module')
def reference():
  """The initial state, created sharded on the first mesh (one init compile serves the whole file), and three
  steps of it on one device."""
  config, mesh, rules = mesh_for(MESHES[0])
  model = GLM(config.model)
  state0 = init_train_state(model, config, jax.random.key(3), mesh, rules)
  host0 = jax.tree.map(np.asarray, state0)
  state, metrics = train(model, make_config(), jax.device_put(host0, jax.devices()[0]))
  return model, state0, host0, jax.tree.map(np.asarray, state.params), metrics


def test_state_is_created_sharded(reference):
  model, state0, _, _, _ = reference
  config, mesh, rules = mesh_for(MESHES[0])
  shardings = state_shardings(model, config, mesh, rules)
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state0), jax.tree.leaves(shardings)))
  # Adam's moments are laid out like the parameters, and split as the rules say.
  mu = optax.tree_utils.tree_get(state0.opt_state, 'mu')
  for p, m in zip(jax.tree.leaves(state0.params), jax.tree.leaves(mu)):
    assert m.sharding == p.sharding
    assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape
  sizes = mesh_shape(config.mesh, 8)
  assert state0.params['word_embeddings'].addressable_shards[0].data.shape == (128 // sizes['tensor'],
                                                                                64 // sizes['fsdp'])
  assert mu['layers']['mlp']['h_to_4h_kernel'].addressable_shards[0].data.shape == (2, 32, 2, 176 // 2)
  # (That a sharded init gives the one-device values is tests/test_sharding.py's check of init_params.)


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_training_equals_one_device(reference, shape):
  model, _, host0, ref_params, ref_metrics = reference
  config, mesh, rules = mesh_for(shape)
  shardings = state_shardings(model, config, mesh, rules)
  state = jax.device_put(host0, shardings)
  state, metrics = train(model, config, state, mesh, rules)

  assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(shardings.params)[0]
  for key in ('loss', 'grad_norm'):
    got, want = [m[key] for m in metrics], [m[key] for m in ref_metrics]
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
  scale = max(np.abs(x).max() for x in jax.tree.leaves(ref_params))
  errors = {jax.tree_util.keystr(k): float(np.abs(np.asarray(a) - b).max())
            for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_params))}
  worst = max(errors, key=errors.get)
  # Adam's first steps are about lr * sign(g): a gradient entry at its rounding noise (sums split over other
  # devices) may flip, moving that one weight by ~lr; every other weight agrees far more closely.
  assert errors[worst] <= 1e-4 * scale, (shape, worst, errors[worst], scale)
  # and training moved the weights by several times the tolerance
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(host0.params)))
  assert moved > 5 * 1e-4 * scale


@pytest.mark.parametrize('target', [(1, 1, 8, 1), (1, 8, 1, 1), (4, 2, 1, 1), (1, 2, 2, 2), None],
                         ids=['1x1x8', '1x8x1', '4x2x1', 'stage2', 'one-device'])
def test_checkpoint_restores_onto_another_mesh(reference, tmp_path, target):
  """A train state saved from the (2, 2, 2) mesh restores bit for bit onto another mesh shape (data, fsdp, tensor,
  stage), a stage-split one, and a single device, each array laid out as the target's rules say."""
  from glm_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: PLC0415
  model, state0, host0, _, _ = reference
  saver = Checkpointer(tmp_path, async_save=False)
  saver.save(0, state0, {}, {})
  saver.close()
  if target is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state0)
  else:
    config = make_config()
    config.mesh.update(dict(zip(('data', 'fsdp', 'tensor', 'stage'), target)))
    shardings = state_shardings(model, config, make_mesh(config.mesh), axis_rules(config))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_like(state0),
                          shardings)
  loader = Checkpointer(tmp_path, async_save=False)
  step, state, _, _ = loader.restore(abstract)
  loader.close()
  assert step == 0
  for got, want, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(host0), jax.tree.leaves(shardings)):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)
  if target is not None and target[3] == 2:  # the stacked layer axis is split over the stages
    qkv = state.params['layers']['attention']['qkv_kernel']
    assert qkv.addressable_shards[0].data.shape[0] == MODEL['num_layers'] // 2
