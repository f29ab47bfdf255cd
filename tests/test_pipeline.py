"""Pipeline stages (glm_jax/pipeline.py) on fake devices: the GPipe schedule, gradients and training equal to one
stage, layer counts the stages do not divide, and checkpoints in the [L, ...] layout across stage counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLM, axis_rules, make_mesh, pipeline
from glm_jax.config import train_defaults
from glm_jax.train import init_train_state, make_train_step, state_shardings
from glm_jax.train.checkpoint import Checkpointer, abstract_like
from glm_jax.train.step import batch_grads
from tests.conftest import load_config

# Six layers: two stages hold three each, four stages hold two each with two padding slots at the end.
MODEL = dict(num_layers=6, hidden_size=64, num_attention_heads=4, inner_hidden_size=172, vocab_size=128,
             max_sequence_length=64)
B, S, STEPS = 16, 16, 3


def make_config(data=1, fsdp=1, tensor=1, stage=1, microbatches=0, accum=1):
  config = load_config('tiny', **MODEL)
  config.train = train_defaults()
  config.train.update(dict(learning_rate=5e-4, warmup_steps=1, decay_steps=8, grad_accum_steps=accum,
                           batch_size=B, seq_len=S, pipeline_microbatches=microbatches))
  config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor, stage=stage))
  return config


def make_batch():
  rng = np.random.default_rng(0)
  mask = np.tril(np.ones((B, 1, S, S), bool))
  mask[:, :, :, :5] = True  # a bidirectional context, as GLM's
  return dict(tokens=rng.integers(0, 128, (B, S), dtype=np.int32),
              targets=rng.integers(0, 128, (B, S), dtype=np.int32),
              position_ids=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
              attention_mask=mask, loss_mask=(rng.random((B, S)) < 0.8).astype(np.float32))


def on_mesh(config):
  """(model, mesh, rules) for a config: the model pipelined when config.mesh.stage > 1."""
  mesh = make_mesh(config.mesh, jax.devices()[:int(np.prod([config.mesh[a] for a in config.mesh]))])
  return GLM(config.model, pipeline=pipeline.for_config(config)), mesh, axis_rules(config)


def grads_of(model, params, mesh=None, rules=None):
  fn = jax.jit(lambda p, b: batch_grads(model, p, b, jax.random.key(0), 1.0, 1, jnp.float32))
  if mesh is None:
    return fn(params, make_batch())
  from glm_jax.sharding import activate
  with activate(mesh, rules):
    return fn(params, make_batch())


@pytest.fixture(scope='module')
def reference():
  """One stage on one device: the initial state, the loss and gradients of the batch, and three training steps."""
  config = make_config()
  model = GLM(config.model)
  state0 = jax.tree.map(np.asarray, init_train_state(model, config, jax.random.key(3)))
  loss, _, grads = grads_of(model, state0.params)
  step, state, losses = make_train_step(model, config), state0, []
  for _ in range(STEPS):
    state, m = step(state, make_batch())
    losses.append(float(m['loss']))
  return state0, float(loss), jax.tree.map(np.asarray, grads), losses


def test_schedule_and_bubble_are_gpipe():
  # Hand-worked: 2 stages, 4 micro-batches; stage 1 starts a tick late and ends a tick after stage 0.
  p = pipeline.Pipeline(stages=2, microbatches=4, num_layers=4)
  np.testing.assert_array_equal(p.schedule(), [[0, -1], [1, 0], [2, 1], [3, 2], [-1, 3]])
  assert p.bubble_fraction() == pytest.approx(2 / 10)
  for n, m in [(2, 1), (2, 8), (4, 4), (4, 16), (8, 8), (8, 32)]:
    sched = pipeline.Pipeline(n, m, 70).schedule()
    # every micro-batch visits every stage once, stage s one tick after stage s - 1
    for s in range(n):
      np.testing.assert_array_equal(np.flatnonzero(sched[:, s] >= 0), np.arange(m) + s)
      np.testing.assert_array_equal(sched[sched[:, s] >= 0, s], np.arange(m))
    assert pipeline.Pipeline(n, m, 70).bubble_fraction() == pytest.approx((n - 1) / (m + n - 1))
  paper = pipeline.Pipeline(stages=8, microbatches=8, num_layers=70)  # GLM-130B: 70 layers on 8 stages
  assert (paper.layers_per_stage, paper.padded_layers) == (9, 72)
  assert paper.padding_fraction() == pytest.approx(2 / 72)


@pytest.mark.parametrize('mesh', [dict(stage=2), dict(stage=4), dict(data=2, tensor=2, stage=2),
                                  dict(fsdp=2, stage=4, microbatches=2)],
                         ids=['stage2', 'stage4-uneven', 'data2-tensor2-stage2', 'fsdp2-stage4-uneven'])
def test_loss_and_gradients_equal_one_stage(reference, mesh):
  state0, ref_loss, ref_grads, _ = reference
  config = make_config(**mesh)
  model, device_mesh, rules = on_mesh(config)
  pp = model.pipeline
  shardings = state_shardings(model, config, device_mesh, rules).params
  params = jax.device_put(pp.pad_layers(state0.params), shardings)
  qkv = params['layers']['attention']['qkv_kernel']
  assert qkv.shape[0] == pp.padded_layers
  assert qkv.addressable_shards[0].data.shape[0] == pp.layers_per_stage  # each stage holds its own layers only
  loss, _, grads = grads_of(model, params, device_mesh, rules)

  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  padding = jax.tree.leaves(jax.tree.map(lambda g: np.asarray(g)[MODEL['num_layers']:], grads.params['layers']))
  assert all(not p.any() for p in padding)  # padding slots get no gradient
  got = jax.tree.map(np.asarray, grads._replace(params=pp.unpad_layers(grads.params)))
  for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref_grads)):
    err = np.abs(g - want).max() / np.abs(want).max()
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)


def place(model, state0, shardings):
  """The one-device state on a run's shardings, its layer stacks padded to the pipeline's stages."""
  return jax.device_put(state0 if model.pipeline is None else model.pipeline.pad_layers(state0), shardings)


def test_training_equals_one_stage_and_resumes_on_other_stage_counts(reference, tmp_path):
  """Three steps with 4 uneven stages, 2 pipeline micro-batches and 2 accumulation steps give one stage's losses; a
  checkpoint of step 1 holds [L, ...] stacks and resumes on 2 stages (with tensor 2) and on one device."""
  state0, _, _, ref_losses = reference
  config = make_config(data=2, stage=4, microbatches=2, accum=2)
  model, mesh, rules = on_mesh(config)
  step = make_train_step(model, config, mesh, rules)
  state, losses = place(model, state0, step.state_shardings), []
  for i in range(STEPS):
    state, m = step(state, make_batch())
    losses.append(float(m['loss']))
    if i == 0:
      saver = Checkpointer(tmp_path, async_save=False)
      saver.save(1, pipeline.to_stored(model.pipeline, state), {}, {})
      saver.close()
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)

  import orbax.checkpoint as ocp  # noqa: PLC0415
  with ocp.PyTreeCheckpointer() as c:
    stored = c.metadata((tmp_path / 'checkpoints' / '1' / 'state').resolve()).item_metadata.tree
  stacks = [m.shape[0] for path, m in jax.tree_util.tree_leaves_with_path(stored) if 'layers' in str(path)]
  assert len(stacks) == 3 * 12 and set(stacks) == {MODEL['num_layers']}  # params, Adam's mu and nu

  for target in (make_config(data=2, tensor=2, stage=2), make_config()):
    model, mesh, rules = on_mesh(target)
    step = make_train_step(model, target, mesh, rules)
    shardings = step.state_shardings or jax.tree.map(lambda _: jax.devices()[0], state0)
    like = abstract_like(place(model, state0, shardings))
    loader = Checkpointer(tmp_path, async_save=False)
    _, state, _, _ = loader.restore(pipeline.stored_target(model.pipeline, like))
    loader.close()
    state = pipeline.from_stored(model.pipeline, state, step.state_shardings)
    resumed = []
    for _ in range(STEPS - 1):
      state, m = step(state, make_batch())
      resumed.append(float(m['loss']))
    np.testing.assert_allclose(resumed, ref_losses[1:], rtol=1e-4, err_msg=str(dict(target.mesh)))
