#!/usr/bin/env python
"""Training throughput: tokens/s and model FLOP utilisation of the jitted train step, tiny and small configs.

    python benchmarks/train_step.py                         # tiny 8x128 and small 4x256, 5 timed steps each
    python benchmarks/train_step.py --runs small:8x512 --steps 3

MFU = tokens/s x model FLOPs per token (forward + backward = 3x the forward's matmul FLOPs, no recomputation;
glm_jax.flops.train_flops_per_token) / peak, where peak is this machine's fp32 matmul FLOP/s measured in the same
run with the same threads (the best of jax's and numpy's square matmuls, which is named). Batches come from the
real data pipeline (GLM's [MASK]/[gMASK] mix on the sample corpus) with a tokenizer trained on the fly, so masks
and packing are those of a real run. The machine is shared and noisy: read the ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_flops(n: int, seconds: float = 2.0) -> tuple[float, str]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  ja = jnp.asarray(a)
  f = jax.jit(lambda x: x @ x)
  f(ja).block_until_ready()
  best = {}
  for name, fn in (('jax', lambda: f(ja).block_until_ready()), ('numpy', lambda: a @ a)):
    fn()
    t_best, start = float('inf'), time.perf_counter()
    while time.perf_counter() - start < seconds:
      t = time.perf_counter()
      fn()
      t_best = min(t_best, time.perf_counter() - t)
    best[name] = 2 * n ** 3 / t_best
  name = max(best, key=best.get)
  return best[name], f"{name} {n}x{n} fp32 ({', '.join(f'{k} {v / 1e9:.1f}' for k, v in best.items())} GFLOP/s)"


def run_config(config_name: str, batch: int, seq: int, overrides):
  """configs/<config_name>.py at this batch and length, with the --config.* overrides applied and the model fields
  checked (a bad field name or value raises ValueError before anything is trained)."""
  from glm_jax.model import GLMConfig
  config = importlib.import_module(f'configs.{config_name}').get_config()
  config.train.batch_size, config.train.seq_len = batch, seq
  for key, value in overrides:
    node = config
    *parents, leaf = key.split('.')
    try:
      for name in parents:
        node = node[name]
      old = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'{key}: no such config field') from None
    try:
      node[leaf] = value.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(value)
    except (TypeError, ValueError):
      raise ValueError(f'{key}: {value!r} is not a {type(old).__name__}') from None
  GLMConfig.make(config.model)
  return config


def bench(config, steps: int, tokenizer, corpus):
  import jax
  from glm_jax import GLM, sharding
  from glm_jax.data.pipeline import TrainBatches
  from glm_jax.flops import train_flops_per_token
  from glm_jax.model import GLMConfig
  from glm_jax.train.step import init_train_state, make_train_step

  config.model.vocab_size = tokenizer.vocab_size
  batch, seq = config.train.batch_size, config.train.seq_len
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config)
  model = GLM(config.model)
  state = init_train_state(model, config, 0, mesh, rules)
  step = make_train_step(model, config, mesh, rules)
  batches = TrainBatches(config.data, tokenizer, seq, batch, 0, corpus=corpus)
  data = [next(batches) for _ in range(steps + 1)]
  state, m = step(state, data[0])  # compile
  jax.block_until_ready(m)
  times = []
  for b in data[1:]:
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return statistics.median(times), train_flops_per_token(GLMConfig.make(config.model), seq)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--runs', default='tiny:8x128,small:4x256', help='CONFIG:BATCHxSEQ list (default: %(default)s)')
  p.add_argument('--steps', type=int, default=5, help='timed steps per run, the median is reported')
  p.add_argument('--peak-n', type=int, default=2048, help='side of the square matmul measuring the peak')
  args, rest = p.parse_known_args(argv)
  overrides = []  # --config.<group>.<field>=value, as launch/train.py takes them, for every run
  for item in rest:
    key, eq, value = item.partition('=')
    if not key.startswith('--config.') or not eq:
      p.error(f'unrecognized argument {item!r} (config overrides look like --config.model.remat_policy=dots)')
    overrides.append((key[len('--config.'):], value))
  runs = []
  for item in args.runs.split(','):
    name, _, size = item.partition(':')
    b, _, s = size.lower().partition('x')
    if not (b.isdigit() and s.isdigit()):
      p.error(f'--runs entries look like small:4x256, got {item!r}')
    try:
      runs.append((name, int(b), int(s), run_config(name, int(b), int(s), overrides)))
    except ModuleNotFoundError:
      p.error(f'--runs: no config configs/{name}.py')
    except ValueError as exc:
      p.error(f'--config.{exc}')

  from glm_jax.data.corpus import load_corpus
  from glm_jax.tokenizer import GLMTokenizer
  from glm_jax.tokenizer_training import train_tokenizer
  from glm_jax.config import data_defaults
  paths = list(data_defaults().corpus_paths)
  with tempfile.TemporaryDirectory() as tmp:
    train_tokenizer(paths, 8182, Path(tmp) / 'tok', layout='compact', seed=0)
    tokenizer = GLMTokenizer.load(Path(tmp) / 'tok.model')
  corpus = load_corpus(paths, tokenizer)
  import jax
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s); default threads')
  peak, how = peak_flops(args.peak_n)
  print(f'peak: {peak / 1e9:.1f} GFLOP/s ({how})\n')
  print(f'{"run":<16} {"step s":>8} {"tokens/s":>10} {"GFLOP/s":>9} {"MFU":>7}')
  for name, b, s, config in runs:
    seconds, flops_per_token = bench(config, args.steps, tokenizer, corpus)
    tps = b * s / seconds
    print(f'{name + f" {b}x{s}":<16} {seconds:>8.3f} {tps:>10.0f} {tps * flops_per_token / 1e9:>9.1f} '
          f'{tps * flops_per_token / peak:>7.1%}')
  peak2, _ = peak_flops(args.peak_n, seconds=1.0)
  print(f'\npeak re-measured after the runs: {peak2 / 1e9:.1f} GFLOP/s (a large change means a noisy machine)')


if __name__ == '__main__':
  main()
