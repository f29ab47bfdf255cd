#!/usr/bin/env python
"""Forward pass of the `small` GLM: glm-jax (Flax, jit) against SAT's GLM130B (PyTorch), fp32, one CPU core each.

    python benchmarks/forward_vs_sat.py                       # sizes 1x64 and 8x256, 5 timed runs each
    python benchmarks/forward_vs_sat.py --sizes 8x256 --repeats 3

What it does, in one process:
  1. pins the whole process to one core (os.sched_setaffinity, before numpy/torch/jax are imported, so every thread
     they start inherits the one-core mask) and also asks each framework for one thread: XLA_FLAGS
     --xla_cpu_multi_thread_eigen=false (no Eigen intra-op pool), JAX_PLATFORMS=cpu; torch.set_num_threads(1),
     set_num_interop_threads(1), torch.no_grad(); OMP/OpenBLAS/MKL_NUM_THREADS=1 for numpy;
  2. builds SAT's GLM130B at configs/small.py with random weights (std 0.02, tests/sat_reference.py), converts its
     state dict with glm_jax.sat_convert.from_sat_state_dict, and checks max|dlogits| <= 1e-4 max|ref| at every
     size before timing (exit 1 otherwise): both sides compute the same function with the same weights. glm-jax runs
     per-layer weights as inference does (config.model.scan_layers=False); --scan-layers times the scanned stack;
  3. times each size after a jit warm-up: rounds of (JAX forward, SAT forward, square fp32 matmul in jax / torch /
     numpy), the order of JAX and SAT alternating between rounds, so that all of them share the machine's noise;
  4. reports median times, JAX/SAT (ratio of medians, and the median of the per-round ratios), and the achieved
     FLOP/s of the JAX forward as a fraction of the peak: the best single-core fp32 matmul FLOP/s seen in the same run
     (max over jax, torch and numpy, which is named). Everything is given twice: by wall time, and by process CPU
     time, which time-slicing by other processes on the core does not inflate (the run says how much of its core it
     got; below ~90% read the CPU-time figures);
  5. with --profile, traces one JAX forward per size (jax.profiler) and prints the XLA ops that take longest.

The machine is shared: read the ratios, not the absolute times. Exit status 0 unless the parity check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import cpu_threads  # benchmarks/, first on sys.path when the script runs; imports nothing that starts threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
  p.add_argument('--sizes', default='1x64,8x256',
                 help='comma-separated BATCHxSEQ sizes (default: %(default)s)')
  p.add_argument('--repeats', type=int, default=5,
                 help='timed rounds per size, the median is reported (default: %(default)s)')
  p.add_argument('--warmup', type=int, default=1,
                 help='untimed calls of each framework per size after compilation (default: %(default)s)')
  p.add_argument('--core', type=int, default=None,
                 help='CPU core to pin the process to (default: the least busy allowed core, sampled at start)')
  p.add_argument('--no-pin', action='store_true',
                 help='do not pin to one core (the frameworks are still asked for one thread)')
  p.add_argument('--peak-n', type=int, default=2048,
                 help='side of the square fp32 matmul that measures peak FLOP/s (default: %(default)s)')
  p.add_argument('--config', default='small', help='config module under configs/ (default: %(default)s)')
  p.add_argument('--seed', type=int, default=0, help='seed of the random weights and tokens')
  p.add_argument('--scan-layers', action='store_true',
                 help="run glm-jax's scanned layer stack (the training and checkpoint layout, config.model.scan_layers="
                      'True) instead of per-layer weights (scan_layers=False, the inference layout; the default)')
  p.add_argument('--profile', action='store_true',
                 help='after timing, trace one JAX forward per size (jax.profiler) and print the ops that take longest')
  args = p.parse_args(argv)
  try:
    args.sizes = [tuple(int(v) for v in s.lower().split('x')) for s in args.sizes.split(',') if s.strip()]
    assert args.sizes and all(len(s) == 2 and min(s) > 0 for s in args.sizes)
  except (ValueError, AssertionError):
    p.error(f'--sizes must look like 1x64,8x256, got {args.sizes!r}')
  if args.repeats < 1:
    p.error('--repeats must be >= 1')
  return args


def hold_to_one_core(args):
  """Pins the process (before any thread pool exists) and sets the one-thread environment. Returns a description."""
  return cpu_threads.limit_threads(1, args.core, pin=not args.no_pin) + [
      'torch.set_num_threads(1), set_num_interop_threads(1), no_grad']


def thread_cpu_ticks():
  """{thread id: user+system clock ticks} of this process's threads."""
  out = {}
  for tid in os.listdir('/proc/self/task'):
    try:
      with open(f'/proc/self/task/{tid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      out[tid] = int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError):
      pass
  return out


def thread_affinities():
  """The set of distinct Cpus_allowed_list values over this process's threads, and the thread count."""
  lists = set()
  tids = os.listdir('/proc/self/task')
  for tid in tids:
    try:
      with open(f'/proc/self/task/{tid}/status') as f:
        for line in f:
          if line.startswith('Cpus_allowed_list'):
            lists.add(line.split(':', 1)[1].strip())
    except (FileNotFoundError, ProcessLookupError):
      pass
  return lists, len(tids)


def forward_flops(cfg, b, s):
  """Matmul FLOPs of one forward (multiply-add = 2), by part. Layer norms, softmax, GeLU, rotary are left out."""
  d, f, v, L = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size, cfg.num_layers
  matmul_params = L * (d * 3 * d + d * d + d * 2 * f + f * d)  # qkv, dense, h_to_4h (GeGLU: 2F), 4h_to_h
  tokens = b * s
  parts = {
      'linears 2*P*tokens': 2 * matmul_params * tokens,
      'attention 2*2*b*s^2*D*L': L * 2 * 2 * b * s * s * d,  # q.k scores and probs.v context, full s x s
      'logits 2*b*s*D*V': 2 * tokens * d * v,
  }
  return parts, matmul_params


def main(argv=None):
  args = parse_args(argv)
  notes = hold_to_one_core(args)

  import numpy as np
  import torch
  torch.set_num_threads(1)
  torch.set_num_interop_threads(1)
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, REPO)
  import common
  from glm_jax import GLM, GLMConfig
  from glm_jax.weights import unstack_layers
  from tests import sat_reference as R

  config, cfg = common.fp32_config(args.config)
  common.print_header('forward_vs_sat: glm-jax (jit) vs SAT GLM130B, fp32, one core each', notes)

  # ---------------------------------------------------------------- models with the same weights
  t0 = time.perf_counter()
  sat_model, params = common.sat_and_params(config, cfg, args.seed)
  # Inference runs per-layer weights by default (no copy of each layer's weights out of a stacked array per call).
  if not args.scan_layers:
    params = unstack_layers(params)
  params = jax.tree.map(jnp.asarray, params)
  model = GLM(dataclasses.replace(GLMConfig.make(config.model), scan_layers=args.scan_layers, remat_policy='none'))
  print(f'glm-jax layers: {"scanned (stacked weights)" if args.scan_layers else "per-layer weights (scan_layers=False)"}')
  forward = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f'config {args.config}: L={cfg.num_layers} D={cfg.hidden_size} N={cfg.num_attention_heads} '
        f'F={cfg.inner_hidden_size} V={cfg.vocab_size}, {n_params / 1e6:.1f}M parameters; SAT built and converted in '
        f'{time.perf_counter() - t0:.1f} s')

  # ---------------------------------------------------------------- peak probes
  n = args.peak_n
  rng = np.random.default_rng(args.seed)
  a_np = rng.standard_normal((n, n), dtype=np.float32)
  b_np = rng.standard_normal((n, n), dtype=np.float32)
  a_jx, b_jx = jnp.asarray(a_np), jnp.asarray(b_np)
  a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
  mm_jax = jax.jit(jnp.matmul)
  mm_jax(a_jx, b_jx).block_until_ready()
  peak_fns = {
      'jax': lambda: mm_jax(a_jx, b_jx).block_until_ready(),
      'torch': lambda: torch.matmul(a_t, b_t),
      'numpy': lambda: a_np @ b_np,
  }
  peak_wall = {k: 0.0 for k in peak_fns}  # best FLOP/s over the run, by wall time
  peak_cpu = {k: 0.0 for k in peak_fns}  # and by process CPU time
  mm_flops = 2.0 * n ** 3

  def probe_peak():
    for k, fn in peak_fns.items():
      w, c = timed(fn)
      peak_wall[k] = max(peak_wall[k], mm_flops / w)
      peak_cpu[k] = max(peak_cpu[k], mm_flops / c)

  for _ in range(3):
    probe_peak()

  # ---------------------------------------------------------------- per size: parity, then timing
  results = []
  jax_cpu = jax_wall = 0.0
  busy_threads = {}
  with torch.no_grad():
    for b, s in args.sizes:
      if s > cfg.max_sequence_length:
        sys.exit(f'seq {s} > max_sequence_length {cfg.max_sequence_length}')
      tokens = rng.integers(0, cfg.vocab_size, (b, s)).astype(np.int32)
      pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
      # GLM's layout: the first half a bidirectional context, the rest causal (every score is computed anyway).
      may = np.tril(np.ones((s, s), bool))
      may[:, :s // 2] = True
      may = may[None, None]
      args_jx = (params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(may))
      tok_t, pos_t = torch.from_numpy(tokens).long(), torch.from_numpy(pos).long()
      mask_t = torch.from_numpy(np.ascontiguousarray(~may))  # SAT: True = masked

      t = time.perf_counter()
      ours = np.asarray(forward(*args_jx))
      compile_s = time.perf_counter() - t
      ref, _ = R.sat_forward_raw(sat_model, tokens, pos, may)
      err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
      ok = err <= 1e-4 * scale
      print(f'\n[{b}x{s}] parity: max|Δ| = {err:.3g}, max|ref| = {scale:.3g}, ratio {err / scale:.2e} '
            f'(bar 1e-4) -> {"OK" if ok else "FAIL"}; first JAX call (compile + run) {compile_s:.1f} s')
      if not ok:
        print('parity failed: the two programs do not compute the same logits, timings would be meaningless')
        return 1
      del ours, ref

      def run_jax():
        forward(*args_jx).block_until_ready()

      def run_sat():
        sat_model(tok_t, pos_t, mask_t)  # SAT's own forward: (logits, per-layer mem_kv dicts), left as tensors

      for _ in range(args.warmup):
        run_jax()
        run_sat()

      wall = {'jax': [], 'sat': []}
      cpu = {'jax': [], 'sat': []}
      for r in range(args.repeats):
        order = ('jax', 'sat') if r % 2 == 0 else ('sat', 'jax')
        for which in order:
          if which == 'jax':
            ticks0 = thread_cpu_ticks()
            w, c = timed(run_jax)
            ticks1 = thread_cpu_ticks()
            jax_wall += w
            jax_cpu += c
            for tid, v in ticks1.items():
              busy_threads[tid] = busy_threads.get(tid, 0) + v - ticks0.get(tid, 0)
          else:
            w, c = timed(run_sat)
          wall[which].append(w)
          cpu[which].append(c)
        probe_peak()
        print(f'  round {r + 1}/{args.repeats}: jax {wall["jax"][-1] * 1e3:8.1f} ms (cpu {cpu["jax"][-1] * 1e3:8.1f})'
              f'   sat {wall["sat"][-1] * 1e3:8.1f} ms (cpu {cpu["sat"][-1] * 1e3:8.1f})', flush=True)
      parts, matmul_params = forward_flops(cfg, b, s)
      res = dict(size=f'{b}x{s}', flops=sum(parts.values()), parts=parts, matmul_params=matmul_params)
      for name, d in (('wall', wall), ('cpu', cpu)):
        j, t_ = np.array(d['jax']), np.array(d['sat'])
        res[name] = dict(jax=float(np.median(j)), sat=float(np.median(t_)), paired=float(np.median(j / t_)),
                         jax_min=float(j.min()), sat_min=float(t_.min()))
      results.append(res)
      if args.profile:
        profile_forward(jax, forward, args_jx, f'{b}x{s}')

  # ---------------------------------------------------------------- report
  def peak_of(d):
    src = max(d, key=d.get)
    return d[src], src

  peak, peak_src = peak_of(peak_wall)
  peak_c, peak_c_src = peak_of(peak_cpu)
  print(f'\npeak: best single-core fp32 {n}x{n} matmul over the run (by wall time): '
        + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in peak_wall.items())
        + f' GFLOP/s -> peak = {peak / 1e9:.1f} GFLOP/s ({peak_src}); by CPU time: '
        + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in peak_cpu.items()) + f' -> {peak_c / 1e9:.1f} ({peak_c_src})')
  print(f'FLOPs per forward (matmuls only; non-embedding matmul parameters P = {results[0]["matmul_params"]:,}):')
  from glm_jax import flops as flops_lib
  for r in results:
    b, s = (int(v) for v in r['size'].split('x'))
    check = ''
    if hasattr(flops_lib, 'forward_flops_per_token'):
      same = abs(flops_lib.forward_flops_per_token(cfg, s) * b * s - r['flops']) <= 1e-9 * r['flops']
      check = '  (agrees with glm_jax.flops.forward_flops_per_token)' if same else \
          '  (DIFFERS from glm_jax.flops.forward_flops_per_token)'
    print(f'  {r["size"]:>7}: ' + ' + '.join(f'{k} {v / 1e9:.2f}' for k, v in r['parts'].items())
          + f' = {r["flops"] / 1e9:.2f} GFLOP{check}')

  print(f'\nwall time, median of {args.repeats} interleaved rounds. JAX/SAT < 1: JAX faster ("paired": median of the '
        f'per-round ratios). Fraction of peak: JAX median vs the wall-time peak.')
  hdr = (f'{"size":>7} | {"JAX ms":>9} | {"SAT ms":>9} | {"JAX/SAT":>7} | {"paired":>6} | {"SAT/JAX":>7} | '
         f'{"JAX GFLOP/s":>11} | {"of peak":>7} | {"SAT GFLOP/s":>11} | {"of peak":>7}')
  print(hdr)
  print('-' * len(hdr))
  for r in results:
    t = r['wall']
    gj, gs = r['flops'] / t['jax'], r['flops'] / t['sat']
    print(f'{r["size"]:>7} | {t["jax"] * 1e3:9.1f} | {t["sat"] * 1e3:9.1f} | {t["jax"] / t["sat"]:7.3f} | '
          f'{t["paired"]:6.3f} | {t["sat"] / t["jax"]:6.2f}x | {gj / 1e9:11.1f} | {gj / peak:7.1%} | '
          f'{gs / 1e9:11.1f} | {gs / peak:7.1%}')
  print(f'\nsame runs by process CPU time (not inflated when other processes take the core; fraction vs the CPU-time '
        f'peak {peak_c / 1e9:.1f} GFLOP/s):')
  hdr2 = (f'{"size":>7} | {"JAX cpu ms":>10} | {"SAT cpu ms":>10} | {"JAX/SAT":>7} | {"paired":>6} | '
          f'{"JAX GFLOP/s":>11} | {"of peak":>7} | {"SAT GFLOP/s":>11} | {"of peak":>7}')
  print(hdr2)
  print('-' * len(hdr2))
  for r in results:
    t = r['cpu']
    gj, gs = r['flops'] / t['jax'], r['flops'] / t['sat']
    print(f'{r["size"]:>7} | {t["jax"] * 1e3:10.1f} | {t["sat"] * 1e3:10.1f} | {t["jax"] / t["sat"]:7.3f} | '
          f'{t["paired"]:6.3f} | {gj / 1e9:11.1f} | {gj / peak_c:7.1%} | {gs / 1e9:11.1f} | {gs / peak_c:7.1%}')

  lists, n_threads = thread_affinities()
  worked = sorted((v for v in busy_threads.values() if v > 0), reverse=True)
  print(f'\none-core check: {n_threads} threads in the process, Cpus_allowed_list of all of them: {sorted(lists)}; '
        f'during the timed JAX forwards process CPU time / wall time = {jax_cpu / max(jax_wall, 1e-9):.2f} '
        f'(> 1 would mean work on more than one core at once; < 1: the core was shared with other processes); '
        f'threads that accumulated CPU ticks: {len(worked)} {worked[:8]}')
  print(f'load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}')

  share = jax_cpu / max(jax_wall, 1e-9)
  print('\ntargets (wall-time medians; CPU-time figures in brackets):')
  if share < 0.9:
    print(f'  note: this process got only {share:.0%} of its core during the timed runs (other processes ran on it), '
          f'so the long runs are inflated more than the short peak probes: read the CPU-time figures in brackets')
  for r in results:
    w, c = r['wall'], r['cpu']
    print(f'  {r["size"]}: faster than SAT: {"yes" if w["jax"] < w["sat"] else "NO"} '
          f'(JAX/SAT {w["jax"] / w["sat"]:.3f} [{c["jax"] / c["sat"]:.3f}])')
  for r in results:
    if r['size'] == '8x256':
      frac, frac_c = r['flops'] / r['wall']['jax'] / peak, r['flops'] / r['cpu']['jax'] / peak_c
      print(f'  8x256: at least 50% of peak: {"yes" if frac >= 0.5 else "NO"} ({frac:.1%} [{frac_c:.1%}])')
  return 0


def timed(fn):
  """(wall seconds, process CPU seconds) of one call."""
  c0, w0 = time.process_time(), time.perf_counter()
  fn()
  w1, c1 = time.perf_counter(), time.process_time()
  return w1 - w0, c1 - c0


def profile_forward(jax, forward, args_jx, label, top=14):
  """Traces one JAX forward with jax.profiler and prints the XLA ops that took longest (summed over layers)."""
  import collections
  import glob
  import gzip
  import json
  import re
  import shutil
  import tempfile
  d = tempfile.mkdtemp(prefix='forward_vs_sat_profile_')
  try:
    hlo = forward.lower(*args_jx).compile().as_text()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      forward(*args_jx).block_until_ready()
    files = glob.glob(os.path.join(d, 'plugins', 'profile', '*', 'perfetto_trace.json.gz'))
    if not files:
      print(f'  [{label}] profile: no perfetto trace was written')
      return
    with gzip.open(files[0]) as f:
      events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    dur, cnt = collections.defaultdict(float), collections.Counter()
    for e in events:
      name = e.get('name', '')
      if e.get('ph') != 'X' or name.startswith(('$', 'ThunkExecutor', 'while', 'Pjit')):
        continue
      m = re.search(r'\n\s*(?:ROOT )?%' + re.escape(name) + r' = [^\n]*?op_name="([^"]*)"', hlo)
      what = '/'.join(m.group(1).split('/')[-2:]) if m else '?'
      key = f'{re.sub(r"[.][0-9]+$", "", name)}  {what}'
      dur[key] += e.get('dur', 0) / 1e3
      cnt[key] += 1
    total = sum(dur.values())
    print(f'  [{label}] profile of one JAX forward: {total:.0f} ms in XLA ops; longest (summed over calls):')
    for k, v in sorted(dur.items(), key=lambda kv: -kv[1])[:top]:
      print(f'    {v:9.1f} ms {v / total:6.1%}  x{cnt[k]:<3d} {k[:100]}')
  except Exception as exc:  # a diagnostic: never let it fail the benchmark
    print(f'  [{label}] profile failed: {type(exc).__name__}: {exc}')
  finally:
    shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
