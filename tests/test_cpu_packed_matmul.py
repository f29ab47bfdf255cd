"""The CPU packed product (glm_jax/csrc/packed_matmul.cc) against x @ W.T in float64 numpy, and the packed layout."""

import jax
import numpy as np
import pytest

from glm_jax import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f'CPU kernels off: {cpu_kernels._state.get("why")}')


def test_pack_unpack_and_row_lookup():
  w = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # O = 7: one zero row pads the second tile
  p = cpu_kernels.pack(w)
  assert p.shape == (2, 3, 4)
  np.testing.assert_array_equal(p[1, :, 2], w[6])
  np.testing.assert_array_equal(p[1, :, 3], 0)
  np.testing.assert_array_equal(cpu_kernels.unpack(p, 7), w)
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.pack)(w)), p)
  rows = np.array([[6, 0], [3, 4]])
  np.testing.assert_array_equal(cpu_kernels.packed_rows(p, rows), w[rows])


@pytest.mark.parametrize('o,k', [(4, 8), (37, 18), (64, 33), (1003, 40)])
@pytest.mark.parametrize('m', [1, 2, 8, 9, 20, 30])
def test_packed_matmul_matches_the_definition(m, o, k):
  """Row counts: M = 1 (its own path unless K is odd; K = 18 leaves two k after its steps of four), one and two blocks
  of 8 (tiles side by side), three blocks at once and (30) a block left over; O that leaves a zero-padded tile; tile
  counts that leave no group of three, a remainder, and (1003 rows) several chunks over the threads."""
  rng = np.random.default_rng(m * 1000 + o + k)
  x = rng.standard_normal((m, k), dtype=np.float32)
  w = rng.standard_normal((o, k), dtype=np.float32)
  got = np.asarray(jax.jit(lambda x, p: cpu_kernels.packed_matmul(x, p, o))(x, cpu_kernels.pack(w)))
  assert got.shape == (m, o)
  np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_decoder_packs_its_weights_on_one_cpu_and_not_on_a_mesh():
  from glm_jax import sharding
  from glm_jax.config import default_config
  from glm_jax.generation.decode import Decoder
  from tests.conftest import PARITY_MODEL
  config = default_config()
  config.model.update(PARITY_MODEL)
  assert Decoder(config.model).weight_format == 'packed'
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, stage=1), jax.devices()[:1])
  on_mesh = Decoder(config.model, mesh=mesh, rules=sharding.axis_rules(config))
  assert on_mesh.weight_format == 'out_in' and on_mesh.model.decode_attention is None


def test_decoding_without_the_kernels_keeps_xla(tmp_path):
  """GLM_JAX_CPU_KERNELS=0 (read once per process, hence a subprocess): no library is built, and the decoder keeps the
  out_in layout and XLA's attention, and generates. (tests/test_model.py checks that the layouts agree.)"""
  import os
  import subprocess
  import sys
  from tests.conftest import PARITY_MODEL, REPO
  script = f'''
import jax, numpy as np
from glm_jax import GLM, cpu_kernels, init_params
from glm_jax.config import default_config
from glm_jax.generation.decode import Decoder
config = default_config()
config.model.update({PARITY_MODEL!r})
params = init_params(GLM(config.model), config.model, jax.random.key(0))
decoder = Decoder(config.model)
assert not cpu_kernels.available() and decoder.weight_format == 'out_in' and decoder.model.decode_attention is None
out = decoder.generate(decoder.prepare(params), [[5, 6, 7, 501, 504]], [3], True, max_gen_length=6)
print(np.asarray(out.tokens).shape)
'''
  env = {**os.environ, 'GLM_JAX_CPU_KERNELS': '0', 'GLM_JAX_CACHE': str(tmp_path)}
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == '(1, 6)'
  assert not any(tmp_path.iterdir())  # nothing was built
