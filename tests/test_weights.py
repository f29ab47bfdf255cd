"""The weight-format seam (glm_jax/weights.py): registering a format, checkpoints that say their format, converters
that check it. (Each format against the checkpoint layout, in value and in the cached forward: tests/test_model.py.)"""

import dataclasses
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLM, init_params, model_io, weights
from glm_jax.model import weight_specs
from glm_jax.sat_convert import to_sat_state_dict
from tests.conftest import PARITY_MODEL, load_config


@weights.register
@dataclasses.dataclass(frozen=True)
class HalfRows(weights.Weight):
  """A format as quantize/ would add one: W [O, I] stored as two arrays (the even and the odd rows) in bfloat16 with
  a float32 scale per row, by the registration API alone."""
  name: ClassVar[str] = 'test_half_rows'
  even: Any
  odd: Any
  scale: Any
  spec: weights.Spec

  @classmethod
  def convert(cls, w, spec):
    w_OxI = spec.o_by_i(w)
    scale = jnp.abs(w_OxI).max(axis=1) + 1e-30
    q = (w_OxI / scale[:, None]).astype(jnp.bfloat16)
    return {'even': q[0::2], 'odd': q[1::2], 'scale': scale.astype(jnp.float32)}

  @classmethod
  def axes(cls, spec):
    return {'even': (None, None), 'odd': (None, None), 'scale': (None,)}

  def _o_by_i(self):
    o = self.spec.o
    w = jnp.zeros((o, self.spec.i), jnp.float32).at[0::2].set(self.even).at[1::2].set(self.odd)
    return w * self.scale[:, None]

  def matmul(self, x):
    lead = x.shape[:x.ndim - len(self.spec.in_shape)]
    y = jnp.einsum('mi,oi->mo', x.reshape(-1, self.spec.i), self._o_by_i().astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return y.reshape(lead + self.spec.out_shape)

  def lookup(self, ids):
    return jnp.take(self._o_by_i(), ids, axis=0)


@pytest.fixture(scope='module')
def tiny():
  config = load_config('tiny', **PARITY_MODEL)
  model = GLM(config.model)
  return config, model, init_params(model, config.model, jax.random.key(1))


def _inputs(config, s=9):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (2, s)).astype(np.int32)
  return tokens, np.broadcast_to(np.arange(s, dtype=np.int32), (2, s)), np.tril(np.ones((s, s), bool))[None, None]


def test_a_registered_format_runs_the_model(tiny):
  config, model, params = tiny
  assert 'test_half_rows' in weights.names()
  converted = weights.convert_params(params, weight_specs(model.config), 'test_half_rows')
  qkv = converted['layers']['attention']['qkv_kernel']  # stacked: converted one layer at a time
  assert set(qkv) == {'even', 'odd', 'scale'} and qkv['scale'].shape == (config.model.num_layers, 3 * 128)
  # Its own initialisation creates the same tree (names, shapes, dtypes), with the axes it declared.
  created = jax.eval_shape(lambda: init_params(GLM(config.model, weight_format='test_half_rows'), config.model,
                                               jax.random.key(0)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), created) == jax.tree.map(lambda a: (a.shape, a.dtype), converted)
  ref = np.asarray(model.apply({'params': params}, *_inputs(config)))
  got = np.asarray(GLM(config.model, weight_format='test_half_rows').apply({'params': converted}, *_inputs(config)))
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 1e-5 < err < 0.05, err  # bfloat16 storage: close, and really not the float32 weights
  with pytest.raises(ValueError, match='cannot be converted back'):
    weights.to_checkpoint_params(converted, weight_specs(model.config), 'test_half_rows')
  with pytest.raises(ValueError, match="unknown weight format 'int3'.*in_out"):
    GLM(config.model, weight_format='int3')


def test_converters_check_the_format(tiny):
  config, model, params = tiny
  host = jax.tree.map(np.asarray, params)
  want = to_sat_state_dict(host, config.model)
  out_in = weights.convert_params(host, weight_specs(model.config), 'out_in')
  got = to_sat_state_dict(out_in, config.model, weight_format='out_in')  # converted back, exactly
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  packed = weights.convert_params(weights.unstack_layers(host), weight_specs(model.config), 'packed')
  got = to_sat_state_dict(packed, config.model, weight_format='packed')  # per layer, packed: also exact
  assert all(np.array_equal(got[k], want[k]) for k in want)
  with pytest.raises(ValueError, match='qkv_kernel has shape .* checkpoint layout'):
    to_sat_state_dict(out_in, config.model)  # said to be the checkpoint layout: refused, not mis-transposed
  with pytest.raises(ValueError, match='not the checkpoint layout'):
    weights.convert_params(out_in, weight_specs(model.config), 'packed')


def test_checkpoints_record_their_weight_format(tiny, tmp_path):
  config, model, params = tiny
  path = model_io.save_model(tmp_path / 'ckpt', jax.tree.map(np.asarray, params), config)
  assert json.loads((path / 'config.json').read_text())['weight_format'] == 'in_out'
  # Stacked layer arrays are stored one layer per chunk; read_params_by_layer reads them as the per-layer tree.
  _, entries = model_io.read_params_by_layer(path)
  by_layer = dict(entries)
  want = weights.unstack_layers(jax.tree.map(np.asarray, params))
  assert jax.tree.all(jax.tree.map(np.array_equal, by_layer, want))
  # A config written before weight_format existed said model.kernel_layout: it still loads, as the checkpoint layout.
  old = json.loads((path / 'config.json').read_text())
  del old['weight_format']
  old['model']['kernel_layout'] = 'in_out'
  (path / 'config.json').write_text(json.dumps(old))
  loaded, loaded_config = model_io.load_model(path)
  assert loaded_config.weight_format == 'in_out' and 'kernel_layout' not in loaded_config.model
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, jax.tree.map(np.asarray, params)))  # as saved, unconverted
  GLM(loaded_config.model)
  with pytest.raises(ValueError, match='kernel_layout is gone'):
    GLM(dict(config.model.to_dict(), kernel_layout='out_in'))
