"""The sharded forward equals the single-device forward, and parameters are split as the axis rules say."""

import math

import jax
import numpy as np
import pytest

from glm_jax import GLM, axis_rules, init_params, make_mesh
from glm_jax import weights
from glm_jax.sharding import activate, batch_sharding, mesh_shape
from tests.conftest import load_config

MESHES = {
    'data8': dict(data=8, fsdp=1, tensor=1),
    'fsdp2': dict(data=4, fsdp=2, tensor=1),
    'tensor2': dict(data=4, fsdp=1, tensor=2),
    'tensor4': dict(data=2, fsdp=1, tensor=4),
    'mixed222': dict(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope='module')
def setup():
  # inner 680 so that the GeGLU width splits 4 ways
  config = load_config('tiny', num_layers=2, vocab_size=512, inner_hidden_size=680)
  model = GLM(config.model)
  params = init_params(model, config.model, jax.random.key(1))
  b, s = 8, 16
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (b, s), dtype=np.int32)
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  mask = np.broadcast_to(np.tril(np.ones((s, s), bool)), (b, 1, s, s)).copy()
  mask[:, :, :, :5] = True  # a bidirectional prefix, as GLM's contexts
  ref = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))(params, tokens, positions, mask)
  return config, model, params, (tokens, positions, mask), np.asarray(ref)


def _expected_shard_shape(shape, logical, rules, sizes):
  table = dict(rules)
  out = []
  for dim, name in zip(shape, logical):
    target = table.get(name)
    targets = () if target is None else (target if isinstance(target, tuple) else (target,))
    out.append(dim // math.prod(sizes[t] for t in targets))
  return tuple(out)


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_sharded_forward_equals_single_device(setup, mesh_name):
  config, model, params, inputs, ref = setup
  config.mesh.update(MESHES[mesh_name])
  mesh = make_mesh(config.mesh)
  rules = axis_rules(config)
  sharded = init_params(model, config.model, jax.random.key(1), mesh, rules)

  # Created already sharded, as the rules say (shard shapes, not only specs).
  from glm_jax.sharding import abstract_params, logical_specs
  specs = logical_specs(abstract_params(model, config.model))
  sizes = mesh_shape(config.mesh, 8)
  n_split = 0
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    expected = _expected_shard_shape(leaf.shape, tuple(spec), rules, sizes)
    assert leaf.addressable_shards[0].data.shape == expected, jax.tree_util.keystr(path)
    n_split += expected != leaf.shape
  if sizes['fsdp'] > 1 or sizes['tensor'] > 1:
    assert n_split >= 5  # the four big linears and the embedding

  # Same initial values as the single-device init.
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  tokens, positions, mask = inputs
  with activate(mesh, rules):
    # The GeGLU kernel is computed as one flat [D, 2F] product only where F is not split (else it is resharded).
    assert weights._is_split('mlp') == (sizes['tensor'] > 1) and not weights._is_split('norm')
    args = [jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in (tokens, positions, mask)]
    out = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))(sharded, *args)
  assert out.sharding.spec[0] is not None or sizes['data'] * sizes['fsdp'] == 1
  err = np.abs(np.asarray(out) - ref).max()
  assert err <= 1e-5 * np.abs(ref).max(), (mesh_name, err)


def test_mesh_errors_name_the_field():
  config = load_config('tiny')
  config.mesh.update(dict(data=3, fsdp=1, tensor=1))
  with pytest.raises(ValueError, match='config.mesh'):
    make_mesh(config.mesh)
  config.mesh.update(dict(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match='only one axis may be -1'):
    make_mesh(config.mesh)
