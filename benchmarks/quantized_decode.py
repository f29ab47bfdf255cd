"""Greedy decoding with INT8 / INT4 weights (quantize/) against fp32, and each against its own bandwidth bound.

For each config (default: `small`, and `large`: the small config at hidden 2048, 16 heads, GeGLU width 5464, 12
layers, whose INT4 layer weights are about 505 MB, far beyond the caches) and each weight format (fp32: the decoder's
default, the packed CPU kernel; int8; int4), one `Decoder` decodes random prompts greedily at batch 1 and 8:

  1. the step time is (time of N new tokens - time of N/2) / (N - N/2), the same compiled program (same buckets),
     after an untimed run of N/2 (else the first run pays for caches the previous format filled); tokens/s = batch /
     step time; median over --repeats rounds, formats interleaved within a round;
  2. bytes per step = every weight the decoder holds (each read once per step: the layer matrices in their format,
     the fp32 tied embedding, biases and LayerNorms) + the key/value cache columns a step attends;
  3. the bound = bytes per step / the machine's best read rate, measured by benchmarks/common.py's probes in the same
     rounds; the fraction of the bound is the bound's step time / the measured step time.

Then the INT8 and INT4 products alone on each path this CPU has (glm_jax/cpu_kernels.py: 'float', and the integer
'vnni256' / 'vnni512' where the CPU has VNNI; decoding takes the last): the larger config's GeGLU input matrix at one
row, in GB/s of weights read, 16 copies in turn so that the weights come from memory.

Targets (issue 13), batch 1 on the larger config: INT8 at least 2x fp32 tokens/s, INT4 at least 2.5x, both at 75% or
more of their own bound. Random weights (std 0.02, the final LayerNorm negated so that greedy decoding does not copy
its input), random prompts of 32 tokens.

    python benchmarks/quantized_decode.py                        # about 8 minutes on the 2-core CPU machines
    python benchmarks/quantized_decode.py --configs small --batches 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys

import cpu_threads  # benchmarks/, first on sys.path when the script runs; imports nothing that starts threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE = dict(hidden_size=2048, num_attention_heads=16, inner_hidden_size=5464, num_layers=12)
FORMATS = ('fp32', 'int8', 'int4')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default='small,large', help="'small' and/or 'large' (default: %(default)s)")
  p.add_argument('--batches', default='1,8', help='comma-separated batch sizes (default: %(default)s)')
  p.add_argument('--new-tokens', type=int, default=64, help='tokens generated per prompt (default: %(default)s)')
  p.add_argument('--repeats', type=int, default=3, help='timed rounds (default: %(default)s)')
  p.add_argument('--threads', choices=('all', '1'), default='all', help='every allowed core, or one pinned core')
  p.add_argument('--bw-mb', type=int, default=256, help='MB of fp32 the bandwidth probes stream')
  p.add_argument('--group-size', type=int, default=None, help='quantize with one scale per this many input columns')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  args.configs = [c for c in args.configs.split(',') if c]
  if not set(args.configs) <= {'small', 'large'}:
    p.error(f'--configs takes small and large, not {args.configs}')
  try:
    args.batches = [int(b) for b in args.batches.split(',') if b.strip()]
    assert args.batches and min(args.batches) > 0
  except (ValueError, AssertionError):
    p.error(f'--batches must look like 1,8, got {args.batches!r}')
  if args.new_tokens < 8 or args.repeats < 1:
    p.error('--new-tokens must be >= 8 and --repeats >= 1')
  args.threads = 1 if args.threads == '1' else len(os.sched_getaffinity(0))
  return args


def random_params(np, model, cfg, seed):
  """Checkpoint-layout numpy params, N(0, 0.02), LayerNorm scales 1 (the final one -1), biases 0."""
  import flax.linen as nn
  import jax

  from glm_jax.sharding import dummy_inputs
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init(r, *dummy_inputs(cfg))['params']), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if 'bias' in name:
      return np.zeros(s.shape, s.dtype)
    if 'scale' in name:
      return np.full(s.shape, -1.0 if 'final' in name else 1.0, s.dtype)
    return rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def path_rates(jax, jnp, np, cfg, bits, seed, copies=16, repeats=10):
  """{path: GB/s of weights} of one row times the GeGLU input matrix [2 F, H] quantized to `bits`, `copies` of it in
  turn."""
  import time

  import quantize
  from glm_jax import cpu_kernels
  from quantize import kernels
  rng = np.random.default_rng(seed)
  o, i = 2 * cfg.inner_hidden_size, cfg.hidden_size
  q, scale = quantize.quantize_weight((rng.standard_normal((o, i), dtype=np.float32) * 0.02).astype(np.float16),
                                     bits)
  qs = [jnp.asarray(q) + 0 * c for c in range(copies)]
  scale = jnp.asarray(scale.reshape(o, 1))
  x = jnp.asarray(rng.standard_normal((1, i), dtype=np.float32))
  rates = {}
  for path in cpu_kernels.quantized_paths():
    product = jax.jit(lambda x, s, *qs, path=path: [cpu_kernels.quantized_matmul(
        x, q, s, bits, reference=kernels.xla_matmul, path=path) for q in qs])
    jax.block_until_ready(product(x, scale, *qs))
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(product(x, scale, *qs))
      best = min(best, time.perf_counter() - t)
    rates[path] = copies * q.nbytes / best / 1e9
  return rates


def main(argv=None):
  args = parse_args(argv)
  notes = cpu_threads.limit_threads(args.threads)
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np

  import common
  import quantize
  from glm_jax import GLM
  from glm_jax.generation import decode as D
  from glm_jax.model import GLMConfig

  common.print_header('quantized_decode: greedy decoding with fp32 / INT8 / INT4 weights, glm-jax Decoder', notes)
  bw = common.Probes(np, None, jax, jnp, args.bw_mb, args.seed)
  bw.probe()
  n_new = args.new_tokens
  n_short = n_new // 2
  while D.bucket_length(n_short) != D.bucket_length(n_new):
    n_short += 1
  rows = []
  paths = {}
  for name in args.configs:
    config, _ = common.fp32_config('small')
    if name == 'large':
      config.model.update(LARGE)
    cfg = GLMConfig.make(config.model)
    params = random_params(np, GLM(cfg), cfg, args.seed)
    decoders = {}
    for fmt in FORMATS:
      quantized = None if fmt == 'fp32' else quantize.format_name(int(fmt[3:]), args.group_size)
      decoder = D.Decoder(cfg, quantized=quantized)
      weights = decoder.prepare(params)
      nbytes = sum(a.nbytes for a in jax.tree.leaves(weights))
      decoders[fmt] = decoder, weights, nbytes
      print(f'[{name}] {fmt}: weight format {decoder.weight_format!r}, {nbytes / 2 ** 20:.0f} MiB of weights')
    del params
    rng = np.random.default_rng(args.seed)
    for b in args.batches:
      contexts = [list(rng.integers(10, cfg.vocab_size, 32)) for _ in range(b)]  # the last one stands for <sop>
      masks = [30] * b

      def run(fmt, n, contexts=contexts, masks=masks):
        decoder, weights, _ = decoders[fmt]
        out = decoder.generate(weights, contexts, masks, True, max_gen_length=n, strategy=D.GREEDY, end_tokens=())
        return np.asarray(out.tokens)

      tokens = {fmt: (run(fmt, n_new), run(fmt, n_short))[0] for fmt in FORMATS}  # compile both lengths
      steps = {fmt: [] for fmt in FORMATS}
      for r in range(args.repeats):
        for fmt in (FORMATS if r % 2 == 0 else FORMATS[::-1]):
          run(fmt, n_short)  # untimed: the long run does not start in caches another format just filled
          _, w_long, _ = common.timed(lambda fmt=fmt: run(fmt, n_new))
          _, w_short, _ = common.timed(lambda fmt=fmt: run(fmt, n_short))
          steps[fmt].append((w_long - w_short) / (n_new - n_short))
        bw.probe()
      bandwidth, source = bw.bandwidth
      keys = 32 + (n_new + n_short) / 2  # columns attended by a step, on average over the timed steps
      kv = b * keys * 2 * cfg.num_layers * cfg.hidden_size * 4
      fp32_step = float(np.median(steps['fp32']))
      for fmt in FORMATS:
        step = float(np.median(steps[fmt]))
        bound = (decoders[fmt][2] + kv) / bandwidth
        agree = float(np.mean(tokens[fmt] == tokens['fp32']))
        rows.append((name, b, fmt, b / step, fp32_step / step, bound / step, agree))
      print(f'[{name}] batch {b}: bandwidth {bandwidth / 1e9:.1f} GB/s ({source})', flush=True)
    if name == 'large':
      paths = {bits: path_rates(jax, jnp, np, cfg, bits, args.seed) for bits in (8, 4)}

  print(f'\n{"config":7} {"batch":>5} {"format":6} {"tokens/s":>9} {"vs fp32":>8} {"of bound":>9} {"tokens = fp32":>14}')
  for name, b, fmt, tps, speedup, frac, agree in rows:
    print(f'{name:7} {b:5d} {fmt:6} {tps:9.1f} {speedup:7.2f}x {frac:9.1%} {agree:14.1%}')
  print('\n(tokens = fp32: the share of generated tokens equal to fp32 decoding\'s; quantized weights change the model, '
        'so greedy paths part once a near tie is decided differently)')
  if paths:
    print(f'\nproduct paths, one row x [{2 * LARGE["inner_hidden_size"]}, {LARGE["hidden_size"]}], GB/s of weights '
          '(decoding uses the last):')
    for bits, rates in paths.items():
      print(f'  int{bits}: ' + ', '.join(f'{p} {r:.1f} ({r / rates["float"]:.2f}x float)' for p, r in rates.items()))
  for name, b, fmt, tps, speedup, frac, _ in rows:
    if name == 'large' and b == 1 and fmt != 'fp32':
      want = 2.0 if fmt == 'int8' else 2.5
      ok = speedup >= want and frac >= 0.75
      print(f'target, large batch 1, {fmt}: >= {want}x fp32 and >= 75% of its bound: {"yes" if ok else "NO"} '
            f'({speedup:.2f}x, {frac:.1%})')


if __name__ == '__main__':
  main()
