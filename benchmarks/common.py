"""Setup the benchmarks against SAT share: an fp32 config, the two models with the same weights, the run's header.

Imported after the script has limited its threads (cpu_threads) and put the repository on sys.path.
"""

from __future__ import annotations

import importlib
import os
import sys
import time


def fp32_config(name: str):
  """(config, GLMConfig) of configs/<name>.py; exits naming the file when it is not float32 throughout."""
  from glm_jax.model import GLMConfig
  config = importlib.import_module(f'configs.{name}').get_config()
  cfg = GLMConfig.make(config.model)
  if cfg.dtype != 'float32' or cfg.param_dtype != 'float32':
    sys.exit(f'this benchmark is fp32; configs/{name}.py has dtype={cfg.dtype} param_dtype={cfg.param_dtype}')
  return config, cfg


def sat_and_params(config, cfg, seed: int, *, negate_final_layernorm: bool = False):
  """SAT's GLM130B built at the config's size with random weights (std 0.02, tests/sat_reference.py), and the same
  weights as glm-jax checkpoint-layout params (numpy). negate_final_layernorm: flip the final LayerNorm's scale on
  both, so that greedy decoding of a random model does not just copy its input token (the tied embedding and the
  DeepNorm skip path otherwise carry it to the output)."""
  from glm_jax import from_sat_state_dict
  from tests import sat_reference as R
  sat = R.build_sat_glm130b(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                            num_attention_heads=cfg.num_attention_heads, inner_hidden_size=cfg.inner_hidden_size,
                            vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_sequence_length,
                            position_encoding_2d=cfg.position_encoding_2d, layernorm_epsilon=cfg.layernorm_epsilon,
                            seed=seed, init_std=0.02)
  sd = R.state_dict_numpy(sat)
  if negate_final_layernorm:
    sd['transformer.final_layernorm.weight'] = -sd['transformer.final_layernorm.weight']
    R.load_state_dict_numpy(sat, sd)
  return sat, from_sat_state_dict(sd, config.model)


def print_header(title: str, notes) -> None:
  """The run's first lines: what is compared, the machine's load, the library versions and the threads held."""
  import jax
  import numpy as np
  print(f'== {title} ==')
  la = os.getloadavg()
  print(f'load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({os.cpu_count()} cores on the machine)')
  line = f'jax {jax.__version__} ({jax.devices()[0].platform}), numpy {np.__version__}'
  if 'torch' in sys.modules:  # the benchmarks against SAT
    torch = sys.modules['torch']
    line += (f', torch {torch.__version__}; torch threads {torch.get_num_threads()}/'
             f'{torch.get_num_interop_threads()}')
  print(line)
  print('threads:')
  for n in notes:
    print('  - ' + n)


def timed(fn):
  """(result, wall seconds, process CPU seconds) of one call."""
  c0, w0 = time.process_time(), time.perf_counter()
  out = fn()
  w1, c1 = time.perf_counter(), time.process_time()
  return out, w1 - w0, c1 - c0


class Probes:
  """fp32 read rates (matvec in numpy, torch (unless torch is None) and jax, the packed decode kernel at one row, a
  four-stream sum), a numpy copy rate and jax's fp32 matmul FLOP/s on a square 2048 x 2048 product (the peak); keeps
  the best of each."""

  def __init__(self, np, torch, jax, jnp, mb, seed):
    n = int((mb * 2 ** 20 / 4) ** 0.5)
    rng = np.random.default_rng(seed)
    self.nbytes = n * n * 4
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    x8 = rng.standard_normal((n, 8), dtype=np.float32)
    wj, xj, x8j = jnp.asarray(w), jnp.asarray(x), jnp.asarray(x8)
    mv = jax.jit(jnp.matmul)
    mv(wj, xj).block_until_ready()
    mv(wj, x8j).block_until_ready()
    src = rng.standard_normal(n * n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    self.n = n
    self.probes = {
        'matvec numpy': (lambda: w @ x, 1),
        'matvec jax': (lambda: mv(wj, xj).block_until_ready(), 1),
        'W@X[:, 8] jax': (lambda: mv(wj, x8j).block_until_ready(), 1),
        'copy numpy (read+write)': (lambda: np.copyto(dst, src), 2),
    }
    from glm_jax import cpu_kernels
    if cpu_kernels.available():  # the decode step's own kernel, at one row
      wp, x1 = jnp.asarray(cpu_kernels.pack(w)), jnp.asarray(x[None])
      packed = jax.jit(lambda x, w: cpu_kernels.packed_matmul(x, w, n))
      packed(x1, wp).block_until_ready()
      self.probes['packed matvec jax'] = (lambda: packed(x1, wp).block_until_ready(), 1)
    quarters = [jnp.asarray(q) for q in np.split(src[:4 * (src.size // 4)], 4)]
    sum4 = jax.jit(lambda a, b, c, d: a.sum() + b.sum() + c.sum() + d.sum())
    sum4(*quarters).block_until_ready()
    self.probes['4-stream sum jax'] = (lambda: sum4(*quarters).block_until_ready(), 1)
    if torch is not None:
      wt, xt, x8t = torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(x8)
      self.probes['matvec torch'] = (lambda: torch.mv(wt, xt), 1)
      self.probes['W@X[:, 8] torch'] = (lambda: torch.mm(wt, x8t), 1)
    self.best = {k: 0.0 for k in self.probes}
    a = jnp.asarray(rng.standard_normal((2048, 2048), dtype=np.float32))
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    self.matmul = lambda: mm(a, a).block_until_ready()
    self.peak_flops = 0.0

  def probe(self):
    for k, (fn, factor) in self.probes.items():
      _, w, _ = timed(fn)
      self.best[k] = max(self.best[k], factor * self.nbytes / w)
    _, w, _ = timed(self.matmul)
    self.peak_flops = max(self.peak_flops, 2 * 2048 ** 3 / w)

  @property
  def bandwidth(self):
    k = max((k for k in self.best if not k.startswith('copy')), key=self.best.get)
    return self.best[k], k
