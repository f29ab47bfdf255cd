"""Model-level checks that need no reference: the 130B shapes, config errors, initialisation, dropout, cache."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

from glm_jax import GLM, GLMConfig, count_params, cpu_kernels, init_cache, init_params, weights
from glm_jax.model import weight_specs
from glm_jax.weights import stack_layers, unstack_layers
from tests.conftest import REPO, load_config


def test_glm130b_parameter_count_by_abstract_evaluation():
  from glm_jax.sharding import parameter_table
  config = load_config('glm_130b')
  rows = parameter_table(config, dict(data=1, fsdp=1, tensor=8, stage=1))
  assert sum(r[3] for r in rows) == 128_697_794_560
  by_name = {r[0]: r for r in rows}
  # Tensor parallelism over 8: whole heads and whole GeGLU columns per device, LayerNorms replicated.
  assert by_name['layers.attention.qkv_kernel'][4] == 70 * 12288 * 12 * 3 * 128 * 2
  assert by_name['layers.input_layernorm.scale'][4] == 70 * 12288 * 2


def test_inspect_model_cli_rejects_a_bad_mesh_in_one_line():
  proc = subprocess.run([sys.executable, 'launch/inspect_model.py', '--config', 'configs/tiny.py',
                         '--config.mesh.tensor=two'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
  assert proc.stderr.startswith('inspect_model.py: error: ') and 'tensor' in proc.stderr


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='unknown field'):
    GLM(dict(load_config('tiny').model.to_dict(), num_layer=3))
  with pytest.raises(ValueError, match='hidden_size=250 is not divisible'):
    GLM(load_config('tiny', hidden_size=250).model)
  with pytest.raises(ValueError, match='config.model.dtype'):
    GLM(load_config('tiny', dtype='float64').model)


@pytest.fixture(scope='module')
def small_model():
  config = load_config('tiny', num_layers=2, hidden_size=128, num_attention_heads=4, inner_hidden_size=340,
                       vocab_size=256, max_sequence_length=64, hidden_dropout=0.1, attention_dropout=0.1,
                       embedding_dropout=0.1, init_std=0.0)  # 0: GLM-130B's (3 * hidden)^-1/2
  model = GLM(config.model)
  return config, model, init_params(model, config.model, jax.random.key(0))


def _assert_normal(w, std, what):
  """w looks like draws of N(0, std): mean, std (5%), and the kurtosis of a normal (3), which a uniform (1.8) or a
  2-sigma truncated normal (flax's variance-scaling default, ~2.4) with the same std does not have."""
  w = np.asarray(w, np.float64).ravel()
  assert abs(w.mean()) < 5 * std / np.sqrt(w.size), what
  np.testing.assert_allclose(w.std(), std, rtol=0.05, err_msg=what)
  assert abs(np.mean((w / w.std()) ** 4) - 3) < 0.25, what


def test_deepnorm_initialisation(small_model):
  """glm130b.md §3.1: Xavier-normal with gain beta = (2N)^-1/2 on both FFN matrices, v and the attention output;
  q, k and the embedding N(0, init_std); every bias 0, LayerNorm scales 1."""
  config, _, params = small_model
  n_layers, d = config.model.num_layers, config.model.hidden_size
  f, std = config.model.inner_hidden_size, (3 * d) ** -0.5
  beta = (2 * n_layers) ** -0.5
  attn, mlp = params['layers']['attention'], params['layers']['mlp']
  qkv = np.asarray(attn['qkv_kernel'])  # [L, D, N, 3, H]
  _assert_normal(qkv[..., 0, :], std, 'q')
  _assert_normal(qkv[..., 1, :], std, 'k')
  _assert_normal(qkv[..., 2, :], beta * np.sqrt(2 / (d + d)), 'v')
  _assert_normal(attn['dense_kernel'], beta * np.sqrt(2 / (d + d)), 'dense')
  _assert_normal(mlp['h_to_4h_kernel'], beta * np.sqrt(2 / (d + 2 * f)), 'h_to_4h')  # one [D, 2F] matrix
  _assert_normal(mlp['4h_to_h_kernel'], beta * np.sqrt(2 / (f + d)), '4h_to_h')
  _assert_normal(params['word_embeddings'], std, 'word_embeddings')
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']") or name.endswith("_bias']"):
      assert not np.any(np.asarray(leaf)), name
    elif name.endswith("['scale']"):
      np.testing.assert_array_equal(np.asarray(leaf), 1.0, err_msg=name)


def test_dropout_only_in_training(small_model):
  config, model, params = small_model
  s = 12
  tokens = jnp.arange(2 * s, dtype=jnp.int32).reshape(2, s) % 256
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
  mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
  eval_a = model.apply({'params': params}, tokens, pos, mask)
  eval_b = model.apply({'params': params}, tokens, pos, mask, deterministic=True)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = model.apply({'params': params}, tokens, pos, mask, deterministic=False,
                      rngs={'dropout': jax.random.key(1)})
  assert np.abs(np.asarray(train) - np.asarray(eval_a)).max() > 1e-3


def test_separate_input_embedding_only_changes_the_lookup(small_model):
  config, model, params = small_model
  s = 6
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]], jnp.int32)
  pos = jnp.arange(s, dtype=jnp.int32)[None]
  mask = jnp.ones((1, 1, s, s), bool)
  same = model.apply({'params': params}, tokens, pos, mask, input_embedding=params['word_embeddings'])
  np.testing.assert_array_equal(same, model.apply({'params': params}, tokens, pos, mask))
  other = model.apply({'params': params}, tokens, pos, mask, input_embedding=params['word_embeddings'][::-1])  # LN would undo a scale
  assert np.abs(np.asarray(other) - np.asarray(same)).max() > 1e-3
  # The reversed table at token t is the tied one at V-1-t: the same as the tied model on V-1-t, whose output
  # projection is still the tied table (were `input_embedding` used there too, the logits would come out reversed).
  remapped = np.asarray(model.apply({'params': params}, config.model.vocab_size - 1 - tokens, pos, mask))
  np.testing.assert_allclose(other, remapped, atol=1e-5 * np.abs(remapped).max(), rtol=0)


def test_mask_must_be_bool(small_model):
  _, model, params = small_model
  with pytest.raises(TypeError, match='True = may attend'):
    model.apply({'params': params}, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32),
                jnp.ones((1, 1, 4, 4), jnp.float32))


_PACKED = pytest.param(False, 'packed', marks=pytest.mark.skipif(
    not cpu_kernels.available(), reason=f'CPU kernels off: {cpu_kernels._state.get("why")}'))
LAYOUTS = [(True, 'in_out'), (False, 'in_out'), (True, 'out_in'), (False, 'out_in'), _PACKED,
           pytest.param(True, 'packed', marks=_PACKED.marks)]


def _variant(config, params, scan_layers, weight_format):
  """The same weights for a model with another layer layout and weight format."""
  cfg = dataclasses.replace(GLMConfig.make(config.model), scan_layers=scan_layers)
  if not scan_layers:
    params = unstack_layers(params)
  params = weights.convert_params(params, weight_specs(cfg), weight_format)
  return GLM(cfg, weight_format=weight_format), cfg, params


@pytest.mark.parametrize('scan_layers,weight_format', LAYOUTS[1:])
def test_layer_layouts_and_weight_formats_compute_the_same_function(small_model, scan_layers, weight_format):
  config, model, params = small_model
  s = 10
  tokens = (jnp.arange(2 * s, dtype=jnp.int32).reshape(2, s) * 7) % 256
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
  mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
  ref = np.asarray(model.apply({'params': params}, tokens, pos, mask))
  other, cfg, other_params = _variant(config, params, scan_layers, weight_format)
  # The converted tree is exactly what the variant itself creates: same names, shapes and dtypes.
  created = jax.eval_shape(lambda: init_params(other, cfg, jax.random.key(0)))
  assert jax.tree.structure(created) == jax.tree.structure(other_params)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), created) == jax.tree.map(lambda a: (a.shape, a.dtype), other_params)
  # Another product kernel (sums in another order): fp32 rounding, ~1e-6 of the largest logit.
  np.testing.assert_allclose(other.apply({'params': other_params}, tokens, pos, mask), ref,
                             atol=1e-5 * np.abs(ref).max(), rtol=0)
  # ... and converts back to the checkpoint layout exactly.
  back = weights.to_checkpoint_params(other_params, weight_specs(cfg), weight_format)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                   back if scan_layers else stack_layers(back), params))
  if not scan_layers:
    restored = stack_layers(unstack_layers(params))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), restored, params))
    # Dropout still draws a fresh mask per layer and per call (each unscanned block has its own rng stream).
    train = [np.asarray(other.apply({'params': other_params}, tokens, pos, mask, deterministic=False,
                                    rngs={'dropout': jax.random.key(k)})) for k in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert np.abs(train[0] - train[2]).max() > 1e-3 and np.abs(train[0] - ref).max() > 1e-3
    # ... per layer: the MLP's hidden dropout zeroes other entries in layer 0 than in layer 1 (same shape, same call).
    _, state = other.apply({'params': other_params}, tokens, pos, mask, deterministic=False,
                           rngs={'dropout': jax.random.key(1)}, mutable=['intermediates'],
                           capture_intermediates=lambda module, _: isinstance(module, nn.Dropout))
    dropped = [np.asarray(state['intermediates'][f'layers_{i}']['mlp']['Dropout_0']['__call__'][0]) == 0
               for i in range(2)]
    assert dropped[0].any() and (dropped[0] != dropped[1]).any()


@pytest.mark.parametrize('scan_layers,weight_format', LAYOUTS)
def test_cache_prefill_then_steps_equal_full_forward(small_model, scan_layers, weight_format):
  config, base_model, base_params = small_model
  model, cfg, params = _variant(config, base_params, scan_layers, weight_format)
  b, c, total, t_max = 2, 5, 9, 16
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (b, total)).astype(np.int32)
  pos = np.broadcast_to(np.arange(total, dtype=np.int32), (b, total))
  may = np.tril(np.ones((total, total), bool))
  may[:, :c] = True
  full = np.asarray(base_model.apply({'params': base_params}, tokens, pos, may[None, None]))
  cache = init_cache(cfg, b, t_max)
  if scan_layers:
    assert cache['k'].shape == (2, b * 4, t_max, 32)  # [L, B*N, T, H]
  else:
    assert len(cache['k']) == 2 and cache['k'][0].shape == (b * 4, t_max, 32)
  m = np.zeros((1, 1, total, t_max), bool)
  m[..., :total] = may
  logits, cache = model.apply({'params': params}, tokens[:, :c], pos[:, :c], m[..., :c, :], cache=cache,
                              cache_index=0)
  tol = 1e-5 * np.abs(full).max()  # fp32 rounding of products over other row counts and cache lengths
  np.testing.assert_allclose(logits, full[:, :c], atol=tol)
  for t in range(c, total):
    logits, cache = model.apply({'params': params}, tokens[:, t:t + 1], pos[:, t:t + 1], m[..., t:t + 1, :],
                                cache=cache, cache_index=t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=tol)
  assert count_params(params) > 0


def test_logits_index_reads_one_row_per_sequence(small_model):
  _, model, params = small_model
  s = 7
  tokens = jnp.arange(2 * s, dtype=jnp.int32).reshape(2, s)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
  mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
  full = model.apply({'params': params}, tokens, pos, mask)
  rows = jnp.array([3, 6], jnp.int32)
  picked = model.apply({'params': params}, tokens, pos, mask, logits_index=rows)
  assert picked.shape == (2, 1, full.shape[-1])
  np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), rows], atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize('rows', [1, weights.OUTPUT_MAJOR_MAX_ROWS, weights.OUTPUT_MAJOR_MAX_ROWS + 1])
@pytest.mark.parametrize('in_shape', [(16,), (4, 4)])
def test_output_major_product_on_both_sides_of_the_row_threshold(rows, in_shape):
  """An output-major weight is applied as W @ x.T on CPU up to OUTPUT_MAJOR_MAX_ROWS rows (the fast decode-step
  product) and as x @ W.T above, and only on CPU: both are x @ W.T, in value and in gradient."""
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((1, rows) + in_shape).astype(np.float32)  # the threshold counts all leading rows
  spec = weights.Spec(in_shape, (2, 5), (None,) * len(in_shape), (None, None))
  w = rng.standard_normal((2, 5) + in_shape).astype(np.float32)  # out_in: [*out, *in]

  def f(x, w):
    return weights.get('out_in')(w, spec).matmul(x)

  y = np.asarray(f(x, w))
  ref = np.einsum('bsi,goi->bsgo', x.reshape(1, rows, -1).astype(np.float64), w.reshape(2, 5, -1))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  lowered = jax.jit(f).lower(x, w)
  assert ('optimization_barrier' in lowered.as_text()) == (rows <= weights.OUTPUT_MAJOR_MAX_ROWS)
  for platform in ('cuda', 'tpu'):  # the trick is XLA:CPU's: lowered for an accelerator, the plain product only
    exported = jax.export.export(jax.jit(f), platforms=(platform,))(x, w)
    assert 'optimization_barrier' not in exported.mlir_module()
  g = jax.grad(lambda w: (f(x, w) ** 2).sum())(w)
  g_ref = jax.grad(lambda w: (jnp.einsum('bsi,goi->bsgo', x.reshape(1, rows, -1), w.reshape(2, 5, -1)) ** 2).sum())(w)
  np.testing.assert_allclose(g, g_ref.reshape(w.shape), rtol=1e-4, atol=1e-4)
