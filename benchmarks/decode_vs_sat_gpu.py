#!/usr/bin/env python
"""Greedy decoding of the `small` GLM on one GPU: glm-jax's Decoder.generate against SAT's GLM130B driven with its
mems cache, both on the GPU.

    python benchmarks/decode_vs_sat_gpu.py                     # batches 1 and 8, 128 new tokens, 5 timed rounds
    python benchmarks/decode_vs_sat_gpu.py --precision default # JAX's default fp32 matmuls (TF32 on recent GPUs)

Not part of CI. Needs one CUDA GPU, jax and torch with CUDA, and SAT 0.4.12 (tests/install_peers.sh, with a CUDA
torch). The weights and prompts are benchmarks/decode_vs_sat.py's: SAT's GLM130B at configs/small.py with random
weights (tests/sat_reference.py), final_layernorm.weight negated, converted for glm-jax; random-id prompts of 32 to
64 tokens ending [gMASK] <sop>; fp32 on both sides. JAX runs fp32 matmuls at 'highest' precision by default here,
as torch's fp32 matmuls do (JAX's own default on GPUs is TF32).
  SAT: decode_vs_sat.py's greedy loop (sat_generate) with every tensor on the GPU, timed with
    torch.cuda.synchronize() around the prefill and around the N-1 decode steps;
  glm-jax: the whole generate call (tokens back on the host), and one decode step as (t(N) - t(M)) / (N - M) with M
    in N's generation bucket (the same compiled program), as decode_vs_sat.py.
Reported per batch: greedy parity (the prefix of each row that agrees with SAT), medians of both sides' full-call and
per-step times, and glm-jax/SAT tokens/s for each. Exit status 1 if a row agrees on fewer than --min-agree tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
  p.add_argument('--batches', default='1,8', help='comma-separated batch sizes (default: %(default)s)')
  p.add_argument('--new-tokens', type=int, default=128, help='tokens generated per prompt (default: %(default)s)')
  p.add_argument('--repeats', type=int, default=5, help='timed rounds; medians are reported (default: %(default)s)')
  p.add_argument('--precision', choices=('highest', 'default'), default='highest',
                 help="JAX's fp32 matmul precision (default: %(default)s)")
  p.add_argument('--min-agree', type=int, default=16,
                 help='fewest leading tokens each row must share with SAT (default: %(default)s)')
  args = p.parse_args(argv)
  try:
    args.batches = [int(b) for b in args.batches.split(',')]
  except ValueError:
    p.error(f'--batches must be comma-separated integers, got {args.batches!r}')
  if min(args.batches) < 1 or max(args.batches) > 8:
    p.error('--batches must lie in 1..8 (there are 8 prompts)')
  if args.new_tokens < 2 or args.repeats < 1:
    p.error('--new-tokens must be >= 2 and --repeats >= 1')
  return args


def main(argv=None):
  args = parse_args(argv)
  sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]
  import jax
  import numpy as np
  import torch
  if not torch.cuda.is_available() or not jax.devices()[0].platform == 'gpu':
    sys.exit('decode_vs_sat_gpu.py: needs a CUDA GPU visible to both torch and jax')
  jax.config.update('jax_default_matmul_precision', None if args.precision == 'default' else 'highest')
  real_current_device = torch.cuda.current_device

  import common
  import decode_vs_sat as B  # the prompts and SAT's batch layout
  from glm_jax.generation import decode as D
  from tests import sat_reference as R

  config, cfg = common.fp32_config('small')
  sat, params = common.sat_and_params(config, cfg, 0, negate_final_layernorm=True)
  torch.cuda.current_device = real_current_device  # the CPU harness points it at the CPU
  decoder = D.Decoder(config.model)
  params = decoder.prepare(params)
  sat = sat.cuda().eval()
  update_mems = R._import_sat()['update_mems']
  print(f'== decode_vs_sat_gpu: small config, fp32 (JAX matmul precision {args.precision}), greedy, '
        f'{args.new_tokens} new tokens; torch {torch.__version__}, jax {jax.__version__}, '
        f'{torch.cuda.get_device_name()} ==', flush=True)

  n_new = args.new_tokens
  m_short = next(m for m in range(n_new // 2, n_new + 1)
                 if m == n_new or D.bucket_length(m) == D.bucket_length(n_new))
  if m_short >= n_new:
    sys.exit(f'--new-tokens {n_new} is the first length of its generation bucket: no shorter run shares its program')
  contexts_all, masks_all, _ = B.make_prompts(np.random.default_rng(0), 8, cfg.vocab_size, (32, 64))
  ok = True
  print(f'{"batch":>5} | {"agreeing prefix per row":>40} | {"SAT full":>9} | {"jax full":>9} | {"ratio":>6} | '
        f'{"SAT step":>9} | {"jax step":>9} | {"ratio":>6}')
  for b in args.batches:
    contexts, masks = contexts_all[:b], masks_all[:b]
    batch = tuple(x.cuda() if torch.is_tensor(x) else x for x in B.sat_batch(np, torch, contexts, n_new))

    def sat_run():
      return B.sat_generate(torch, sat, update_mems, batch, n_new, sync=torch.cuda.synchronize)

    def run(n):
      return decoder.generate(params, contexts, masks, True, max_gen_length=n, strategy=D.GREEDY, end_tokens=())

    ours = run(n_new).tokens
    run(m_short)
    ref = sat_run()[0]
    agree = [next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), n_new) for o, r in zip(ours, ref)]
    ok &= min(agree) >= min(args.min_agree, n_new)
    times = {k: [] for k in ('jax_full', 'jax_step', 'sat_full', 'sat_step')}
    for _ in range(args.repeats):
      t = time.perf_counter()
      run(n_new)
      full = time.perf_counter() - t
      t = time.perf_counter()
      run(m_short)
      times['jax_full'].append(full)
      times['jax_step'].append((full - (time.perf_counter() - t)) / (n_new - m_short))
      _, pre, dec, _ = sat_run()
      times['sat_full'].append(pre + dec)
      times['sat_step'].append(dec / (n_new - 1))
    m = {k: float(np.median(v)) for k, v in times.items()}
    print(f'{b:>5} | {str(agree):>40} | {m["sat_full"] * 1e3:6.1f} ms | {m["jax_full"] * 1e3:6.1f} ms | '
          f'{m["sat_full"] / m["jax_full"]:5.1f}x | {m["sat_step"] * 1e3:6.2f} ms | {m["jax_step"] * 1e3:6.3f} ms | '
          f'{m["sat_step"] / m["jax_step"]:5.1f}x', flush=True)
  print('ratio: glm-jax tokens/s / SAT tokens/s, for the whole call (prefill + all tokens) and for one decode step')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
