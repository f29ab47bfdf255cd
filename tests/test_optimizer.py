"""The optimiser (schedule, decay mask, Embedding Gradient Shrink), loss scaling, and gradient accumulation.

Compiles are the cost here, so one module fixture holds the tiny model, its initial state and three fp32 steps of
the real train step; the tests compare other formulations against them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from glm_jax import GLM
from glm_jax.config import train_defaults
from glm_jax.train import (LossScaleConfig, SplitEmbeddingGrads, TrainState, decay_mask, init_loss_scale,
                           init_train_state, make_base_optimizer, make_egs_schedule, make_optimizer, make_schedule,
                           make_train_step, update_loss_scale)
from glm_jax.train.optimizer import fold_embedding_grads
from glm_jax.train.precision import all_finite
from glm_jax.train.step import batch_grads
from tests.conftest import load_config

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=170, vocab_size=128,
             max_sequence_length=64)
B, S, STEPS = 8, 16, 3


def tiny_config(**train):
  config = load_config('tiny', **MODEL)
  config.train = train_defaults()
  # warmup 0: every step moves the weights; clip 0.5 so that clipping is active (the gradient norm is ~0.7).
  config.train.update(dict(learning_rate=5e-4, warmup_steps=0, decay_steps=6, clip_norm=0.5, batch_size=B,
                           seq_len=S))
  config.train.update(train)
  return config


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  loss_mask = (rng.random((B, S)) < 0.7).astype(np.float32)
  loss_mask[1::2, S // 2:] = 0  # micro-batch 1 of 2 (rows 1, 3, 5, 7) has far fewer loss tokens than micro-batch 0
  mask = np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, 1, S, S)).copy()
  mask[:, :, :, :4] = True  # a bidirectional prefix
  return dict(tokens=rng.integers(0, 128, (B, S), dtype=np.int32),
              targets=rng.integers(0, 128, (B, S), dtype=np.int32),
              position_ids=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
              attention_mask=mask, loss_mask=loss_mask)


def ref_token_ce(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def run_steps(step, state, batch, n=STEPS):
  losses, metrics = [], []
  for _ in range(n):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
    metrics.append({k: float(v) for k, v in m.items()})
  return state, np.array(losses), metrics


def max_err(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                             jax.tree.leaves(b)))


def max_abs(a):
  return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a))


@pytest.fixture(scope='module')
def trained():
  config = tiny_config()
  model = GLM(config.model)
  state0 = init_train_state(model, config, jax.random.key(0))
  batch = make_batch()
  step = make_train_step(model, config, donate=False)
  state, losses, metrics = run_steps(step, state0, batch)
  return dict(config=config, model=model, state0=state0, batch=batch, state=state, losses=losses, metrics=metrics)


# ------------------------------------------------------------------------------------------------------------------
# Schedules and the decay mask


def test_learning_rate_schedule_key_steps():
  t = train_defaults()
  # glm130b.md §3.2: AdamW b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1; gradient norm clipped at 1.0.
  assert (t.b1, t.b2, t.eps, t.weight_decay, t.clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
  lr = make_schedule(t)
  peak, floor = 8e-5, 8e-6
  np.testing.assert_allclose(float(lr(0)), 0.0)
  np.testing.assert_allclose(float(lr(t.warmup_steps // 2)), peak / 2, rtol=1e-3)
  np.testing.assert_allclose(float(lr(t.warmup_steps)), peak, rtol=1e-6)  # warm-up end
  np.testing.assert_allclose(float(lr((t.warmup_steps + t.decay_steps) // 2)), (peak + floor) / 2, rtol=1e-3)
  # A quarter into the decay the cosine is at (1 + cos(pi/4)) / 2 = 0.854 of the way from the floor to the peak
  # (a linear decay would be at 0.75; the points above do not tell the two apart).
  quarter = t.warmup_steps + (t.decay_steps - t.warmup_steps) / 4
  np.testing.assert_allclose(float(lr(quarter)), floor + (peak - floor) * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-3)
  np.testing.assert_allclose(float(lr(t.decay_steps)), floor, rtol=1e-6)  # end of decay: the floor
  np.testing.assert_allclose(float(lr(t.decay_steps + 10_000)), floor, rtol=1e-6)
  with pytest.raises(ValueError, match='decay_steps'):
    make_schedule(ConfigDict(dict(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_steps=10)))


def test_egs_alpha_schedule():
  t = train_defaults()
  assert float(make_egs_schedule(t)(0)) == pytest.approx(0.1)
  assert float(make_egs_schedule(t)(100_000)) == pytest.approx(0.1)
  t.update(dict(egs_warmup_start=6000, egs_warmup_steps=500))  # GLM-130B's later warm-up to 1
  alpha = make_egs_schedule(t)
  assert [round(float(alpha(n)), 6) for n in (0, 6000, 6250, 6500, 9000)] == [0.1, 0.1, 0.55, 1.0, 1.0]


def test_no_decay_on_biases_and_layernorm(trained):
  mask = decay_mask(trained['state0'].params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted([
      "['word_embeddings']", "['layers']['attention']['qkv_kernel']", "['layers']['attention']['dense_kernel']",
      "['layers']['mlp']['h_to_4h_kernel']", "['layers']['mlp']['4h_to_h_kernel']"]), decayed
  # And AdamW applies it: with zero gradients only the decayed leaves move (by -lr * wd * p).
  params = {'word_embeddings': jnp.ones((4, 2)), 'final_layernorm': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
            'layers': {'attention': {'qkv_kernel': jnp.ones((2, 2)), 'qkv_bias': jnp.ones(2)},
                       'input_layernorm': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}}
  tx = make_base_optimizer(ConfigDict(dict(learning_rate=0.5, min_lr_ratio=1.0, warmup_steps=0, decay_steps=1,
                                           b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)))
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
  moved = {jax.tree_util.keystr(k): float(jnp.abs(v).max()) for k, v in jax.tree_util.tree_leaves_with_path(updates)}
  assert moved == {"['final_layernorm']['bias']": 0.0, "['final_layernorm']['scale']": 0.0,
                   "['layers']['attention']['qkv_bias']": 0.0,
                   "['layers']['attention']['qkv_kernel']": pytest.approx(0.05),
                   "['layers']['input_layernorm']['bias']": 0.0, "['layers']['input_layernorm']['scale']": 0.0,
                   "['word_embeddings']": pytest.approx(0.05)}


def test_optimizer_chain_matches_the_definition():
  """make_optimizer against EGS, clipping and AdamW written out here in float64 from their published definitions
  (glm130b.md §3.2-3.3; AdamW's decoupled decay as torch.optim.AdamW and apex's Adam in adam_w_mode: p -= lr * (m^ /
  (sqrt(v^) + eps) + wd * p), decay on matrices and the embedding only). Adam is blind to a gradient scale that is
  the same every step, so the gradients' norms vary (clipping on at some steps, off at others), as do alpha (EGS
  warm-up) and the learning rate (warm-up, then cosine). (The training comparison below builds its reference with
  make_base_optimizer: it checks EGS, not AdamW or clipping.)"""
  t = train_defaults()
  t.update(dict(learning_rate=1e-2, min_lr_ratio=0.1, warmup_steps=2, decay_steps=5, egs_warmup_start=1,
                egs_warmup_steps=2))
  rng = np.random.default_rng(0)
  shapes = {'word_embeddings': (6, 3), 'final_layernorm': {'scale': (3,), 'bias': (3,)},
            'layers': {'attention': {'qkv_kernel': (3, 9), 'qkv_bias': (9,)}, 'mlp': {'h_to_4h_kernel': (3, 4)}}}
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes, is_leaf=is_shape)
  decays = {jax.tree_util.keystr(k): k[-1].key == 'word_embeddings' or k[-1].key.endswith('kernel')
            for k, _ in jax.tree_util.tree_leaves_with_path(params)}
  tx = make_optimizer(t)
  update = jax.jit(tx.update)
  state, p = tx.init(params), params
  ref = jax.tree.map(lambda x: x.astype(np.float64), params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
  lrs = [0.0, peak / 2, peak] + [floor + (peak - floor) * (1 + math.cos(math.pi * k / 3)) / 2 for k in (1, 2)]
  alphas = [0.1, 0.1, 0.55, 1.0, 1.0]
  clipped = []
  for n, scale in enumerate([3.0, 0.05, 2.0, 0.1, 5.0]):
    g = jax.tree.map(lambda s: (rng.standard_normal(s) * scale / 2).astype(np.float32), shapes, is_leaf=is_shape)
    g_in = (rng.standard_normal((6, 3)) * scale).astype(np.float32)
    updates, state = update(SplitEmbeddingGrads(params=g, input_embedding=g_in), state, p)
    p = optax.apply_updates(p, updates)
    before = ref
    # The definition: fold the shrunk input-lookup gradient into the tied table's, clip the global norm, AdamW.
    g = jax.tree.map(lambda x: x.astype(np.float64), g)
    g['word_embeddings'] = g['word_embeddings'] + alphas[n] * g_in.astype(np.float64)
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in jax.tree.leaves(g)))
    clipped.append(norm > t.clip_norm)
    g = jax.tree.map(lambda x: x * min(1.0, t.clip_norm / norm), g)
    m = jax.tree.map(lambda m, g: t.b1 * m + (1 - t.b1) * g, m, g)
    v = jax.tree.map(lambda v, g: t.b2 * v + (1 - t.b2) * g * g, v, g)

    def adamw(path, x, m, v):
      step = m / (1 - t.b1 ** (n + 1)) / (np.sqrt(v / (1 - t.b2 ** (n + 1))) + t.eps)
      return x - lrs[n] * (step + (t.weight_decay * x if decays[jax.tree_util.keystr(path)] else 0.0))

    ref = jax.tree_util.tree_map_with_path(adamw, ref, m, v)
    # Each step's update (<= a few lr) in fp32 against float64: a few roundings, ~1e-6 of it. (The parameters
    # themselves are compared no closer than their own fp32 rounding, ~1e-7 of ~2: too coarse for lr 1e-2.)
    assert max_err(updates, jax.tree.map(np.subtract, ref, before)) <= 1e-5 * peak, n
  assert clipped == [True, False, True, False, True]


# ------------------------------------------------------------------------------------------------------------------
# Embedding Gradient Shrink: our split gradient + transformation against GLM-130B's forward trick


@pytest.fixture(scope='module')
def trick(trained):
  """A reference step with GLM-130B's trick in the forward, `e*alpha + stop_gradient(e)*(1-alpha)` on the input
  lookup (alpha an argument), and clip + AdamW with no EGS transformation. Returns its gradient too."""
  model, batch = trained['model'], trained['batch']
  tx = make_base_optimizer(trained['config'].train)

  @jax.jit
  def trick_step(params, opt_state, alpha):
    def loss_fn(p):
      e = p['word_embeddings']
      table = e * alpha + jax.lax.stop_gradient(e) * (1 - alpha)
      logits = model.apply({'params': p}, batch['tokens'], batch['position_ids'], batch['attention_mask'],
                           input_embedding=table)
      return jnp.sum(batch['loss_mask'] * ref_token_ce(logits, batch['targets'])) / jnp.sum(batch['loss_mask'])
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, g

  return trick_step, tx


@pytest.fixture(scope='module')
def grads(trained, trick):
  """Our SplitEmbeddingGrads of the fixture batch at the initial parameters, accumulated over 2 micro-batches with
  very different loss-token counts; and the trick's full-batch gradients at alpha 0 and 0.1."""
  model, params, batch = trained['model'], trained['state0'].params, trained['batch']
  trick_step, tx = trick
  compute = jax.jit(lambda p, b: batch_grads(model, p, b, jax.random.key(0), 1.0, 2, jnp.float32))
  loss, tokens, split = compute(params, batch)
  out = dict(loss=float(loss), tokens=float(tokens), split=jax.tree.map(np.asarray, split))
  for alpha in (0.0, 0.1):
    _, _, ref_loss, ref = trick_step(params, tx.init(params), alpha)
    out[alpha] = (float(ref_loss), jax.tree.map(np.asarray, ref))
  return out


def test_egs_shrinks_only_the_input_lookup_share(grads):
  split = SplitEmbeddingGrads(*grads['split'])
  for alpha in (0.0, 0.1):
    # alpha = 0: the tied table's gradient is the output projection's share alone; 0.1: GLM-130B's default.
    ref_loss, ref = grads[alpha]
    # fp32 sums over 128 tokens in two orders: ~1e-6 of the largest gradient; the shrink moves it by ~1e-2.
    assert max_err(fold_embedding_grads(split, alpha), ref) <= 1e-5 * max_abs(ref), alpha
  # Both shares are substantial, so this tells shrinking the lookup's share from shrinking the whole table's.
  e_in, e_out = split.input_embedding, split.params['word_embeddings']
  assert np.abs(e_in).max() > 0.1 * np.abs(e_out).max() and np.abs(e_out).max() > 0.1 * np.abs(e_in).max()
  with pytest.raises(TypeError, match='SplitEmbeddingGrads'):
    fold_embedding_grads(split.params, 0.1)


def test_accumulated_gradient_is_the_global_token_mean(grads):
  """Two micro-batches with very different loss-token counts give the full batch's loss and gradient (the above
  compares their gradient with the full-batch reference): the loss is the mean over all loss tokens of the batch,
  not a mean of micro-batch means. (The train step wraps batch_grads; tests/test_train_sharded.py runs it with
  accumulation over 2 micro-batches on every mesh.)"""
  np.testing.assert_allclose(grads['loss'], grads[0.1][0], rtol=1e-5)
  mask = np.asarray(make_batch()['loss_mask'])
  assert grads['tokens'] == mask.sum()
  assert mask[0::2].sum() > 1.5 * mask[1::2].sum()  # the batch does tell the two definitions apart


def test_training_with_egs_equals_forward_trick(trained, trick):
  config, batch = trained['config'], trained['batch']
  trick_step, tx = trick
  params = trained['state0'].params
  opt_state = tx.init(params)
  losses = []
  for _ in range(STEPS):
    params, opt_state, loss, _ = trick_step(params, opt_state, config.train.egs_alpha)
    losses.append(float(loss))
  np.testing.assert_allclose(trained['losses'], losses, rtol=1e-5)
  ref = jax.tree.map(np.asarray, params)
  err = max_err(trained['state'].params, ref)
  # Adam's first steps are about lr * sign(g): a gradient entry at its rounding noise may flip, moving that weight by
  # ~lr (5e-4 of the scale); the weights themselves move by > 1e-3.
  assert err <= 1e-4 * max_abs(ref), err
  # The weights did move, by far more than the tolerance, and EGS was on.
  assert max_err(trained['state'].params, trained['state0'].params) > 1e-3
  assert [m['egs_alpha'] for m in trained['metrics']] == pytest.approx([0.1] * STEPS)
  assert [m['skipped'] for m in trained['metrics']] == [0] * STEPS
  assert trained['metrics'][0]['tokens'] == float(batch['loss_mask'].sum())
  lr = make_schedule(config.train)
  assert [m['learning_rate'] for m in trained['metrics']] == pytest.approx([float(lr(i)) for i in range(STEPS)])


def test_batch_must_split_into_micro_batches(trained):
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    make_train_step(trained['model'], tiny_config(grad_accum_steps=3))(trained['state0'], trained['batch'])


# ------------------------------------------------------------------------------------------------------------------
# Dynamic loss scaling


def test_loss_scale_rules():
  defaults = train_defaults()
  assert (defaults.loss_scale_init, defaults.loss_scale_window, defaults.loss_scale_hysteresis,
          defaults.loss_scale_min) == (65536.0, 2000, 2, 1.0)
  cfg = LossScaleConfig(enabled=True, init=8.0, window=3, hysteresis=2, min_scale=2.0)
  update = jax.jit(lambda s, f: update_loss_scale(s, f, cfg))
  state = init_loss_scale(cfg)
  trace = []
  for finite in [False, False, False, False,  # hysteresis: 8, then halved to 4, 2, and never below the minimum
                 True, True, True,  # a window of good steps doubles the scale and restores the hysteresis
                 False, True, True, False,  # one overflow is tolerated again; the next halves (good run broken)
                 True, True, True]:  # three good steps in a row double it
    state = update(state, finite)
    trace.append(float(state.scale))
  assert trace == [8, 4, 2, 2, 2, 2, 4, 4, 4, 4, 2, 2, 2, 4]
  # Disabled (bf16 / fp32 compute): the scale is 1 and stays 1.
  off = LossScaleConfig(enabled=False)
  assert float(update_loss_scale(init_loss_scale(off), False, off).scale) == 1.0
  assert not bool(all_finite({'a': jnp.ones(3), 'b': jnp.array([1.0, jnp.inf])}))
  assert bool(all_finite({'a': jnp.ones(3), 'i': jnp.arange(3)}))


def test_fp16_training_skips_overflows_and_stays_finite(trained):
  # fp16 compute, a start scale too large for this model (its fp16 gradients overflow from about 2^20 on) and a
  # short window, so the run sees skipped steps, the hysteresis, halving, and growth.
  config = tiny_config(loss_scale_init=2.0 ** 21, loss_scale_window=2)
  config.model.dtype = 'float16'
  model = GLM(config.model)
  ls_cfg = LossScaleConfig.from_config(config)
  assert ls_cfg.enabled
  state = trained['state0'].replace(loss_scale=init_loss_scale(ls_cfg))
  step = make_train_step(model, config, donate=False)
  expected_scale = state.loss_scale
  skipped, scales = [], []
  for _ in range(8):
    new_state, m = step(state, trained['batch'])
    assert float(m['loss_scale']) == float(expected_scale.scale)
    finite = not m['skipped']
    skipped.append(int(m['skipped']))
    if not finite:  # nothing moved
      assert max_err(new_state.params, state.params) == 0.0
      assert max_err(new_state.opt_state, state.opt_state) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new_state.params))
    expected_scale = update_loss_scale(expected_scale, finite, ls_cfg)
    assert float(new_state.loss_scale.scale) == float(expected_scale.scale) >= 1.0
    scales.append(float(m['loss_scale']))
    state = new_state
  assert skipped[:2] == [1, 1] and skipped.count(0) >= 2, (skipped, scales)
  assert scales[1] == scales[0] and min(scales) < scales[0], scales  # hysteresis, then lowered
  assert np.isfinite(float(m['loss']))
  assert int(state.step) == 8
  # Applied updates (what the schedules follow) count only the steps that were not skipped.
  from glm_jax.train.optimizer import applied_updates
  assert int(applied_updates(state.opt_state)) == skipped.count(0)
  assert max_err(state.params, trained['state0'].params) > 1e-4


def test_train_state_is_a_pytree(trained):
  state = trained['state0']
  assert isinstance(state, TrainState)
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert state.rng.dtype == jnp.uint32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
