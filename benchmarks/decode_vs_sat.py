#!/usr/bin/env python
"""Greedy decoding of the `small` GLM: glm-jax's Decoder.generate against SAT's GLM130B driven with its mems cache.

    python benchmarks/decode_vs_sat.py                         # batches 1 and 8, 128 new tokens, 3 timed rounds
    python benchmarks/decode_vs_sat.py --batches 1 --repeats 5
    python benchmarks/decode_vs_sat.py --threads 1             # both frameworks on one pinned core

Not part of CI. What it does, in one process:
  1. threads: by default both frameworks (and the probes) use every core the process may run on, as a user's
     generation does: torch.set_num_threads(cores), XLA's own pool over all of them. --threads 1 instead pins the
     process to one core with os.sched_setaffinity before numpy, torch and jax start any thread, and asks every
     framework for one thread (XLA_FLAGS --xla_cpu_multi_thread_eigen=false, torch.set_num_threads(1),
     OMP/OPENBLAS/MKL_NUM_THREADS=1), as benchmarks/forward_vs_sat.py does. Both give the two frameworks the same
     threads. One core times more quietly when other processes share the machine (a multi-threaded matvec waits for
     its slowest thread whenever another process holds a core); but at batch 8 one core is as much compute-bound as
     memory-bound (the flops lines of the report), so the whole machine does markedly better there;
  2. builds SAT's GLM130B at configs/small.py with random weights (std 0.02, tests/sat_reference.py), negates
     final_layernorm.weight as tests/test_decode.py does (with tied embeddings a random model otherwise greedily
     repeats one token forever; negated, it emits varied tokens), and converts the state dict for glm-jax;
  3. prompts: random ids, `context + [gMASK] + [<sop>]` of --context-lengths tokens (special ids at the end of the
     vocabulary), the real GLM-130B [gMASK] generation layout (glm130b.md §5.1 step 7): the context bidirectional,
     <sop> and the generated tokens causal, positions continuing. Batch B uses prompts 0..B-1 (different lengths);
  4. SAT: GLM-130B's batch_filling_sequence (glm130b.md §5.2) with greedy argmax, driven directly in torch: one
     batched prefill of the right-padded contexts (logits read at each row's <sop>), then one token per step with
     mems (SAT's own update_mems); the generated tokens sit after the padded length, as in G130;
     glm-jax: Decoder(config.model).generate(weights, ..., max_gen_length=N, strategy=GREEDY, end_tokens=()), compiled
     first (no end tokens: every row generates all N tokens);
  5. parity: both generate N tokens per row from the same prompts; the agreement is reported (prefix that agrees, and
     SAT's top-2 logit margin where they first differ: random weights make near-ties possible);
  6. timing: rounds of (glm-jax N tokens, glm-jax M tokens, SAT N tokens, probes), the order of the two
     frameworks alternating between rounds, so that all of them share the machine's noise. Two scopes:
       full call: prefill + the first token + N-1 decode steps, on both sides (glm-jax: the whole generate call,
         host-side batch building included; SAT: the whole loop); tokens/s = B*N / time;
       decode phase: tokens/s = B / (time of one decode step). SAT times its N-1 steps directly; glm-jax's step is
         (t(N) - t(M)) / (N - M) with M < N in the same generation bucket (the same compiled program; M = 65 for
         N = 128), so its prefill cancels;
  7. the memory-bandwidth bound, measured in the same rounds over a --bw-mb fp32 weight matrix (far larger than the
     caches): matrix-vector products in numpy, torch and jax (one stream each), glm-jax's own packed product at one
     row (the decode step's kernel: tiles read side by side, rows split over the threads), and a jax sum of four
     arrays (four streams at once), each as bytes read / time; and a numpy array copy (bytes read + written / time).
     The bandwidth used is the best read rate seen (max over the read probes and rounds): each streams its bytes once
     with negligible compute, as a decode step streams its weights, and the best of several stream patterns is what
     a step can reach on this machine; a copy also writes (and write-allocates), which decode does not;
     bytes per decode step = every parameter once (fp32; the tied embedding is read in full by the output projection)
       + the key/value cache that the step must read (2 * L * D * 4 bytes per attended key: context incl. <sop> plus
       the tokens generated so far, averaged over the N-1 steps). glm-jax's cache is padded (P + G columns; on CPU
       its attention kernel reads only the allowed ones); the bound counts only what a step needs;
     bound tokens/s = B / (bytes per step / bandwidth): at batch 8 the same weight bytes serve 8 tokens per step.
     Beside it, the compute a step needs at the peak FLOP/s (jax's best fp32 2048^3 matmul in the same rounds):
     2 * B * parameters + 4 * D * L per attended key per row; when that is close to the bandwidth bound (batch 8 on
     one core), a step can only reach the bound if its products overlap their weight streaming completely.

Reported per batch: SAT and glm-jax tokens/s, glm-jax/SAT, and each one's fraction of the bound (decode phase).
The machine is shared: read the ratios, not the absolute numbers. Exit status 0 unless the parity check fails
(fewer than --min-agree of the first tokens agree in some row, where SAT's margin there is not a near tie).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import cpu_threads  # benchmarks/, first on sys.path when the script runs; imports nothing that starts threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEAR_TIE = 1e-3  # a SAT top-2 logit margin at or below this is a near tie: either token is right


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
  p.add_argument('--batches', default='1,8', help='comma-separated batch sizes (default: %(default)s)')
  p.add_argument('--new-tokens', type=int, default=128, help='tokens generated per prompt (default: %(default)s)')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed rounds per batch size, the median is reported (default: %(default)s)')
  p.add_argument('--warmup', type=int, default=1,
                 help='untimed runs of each framework per batch size after compilation (default: %(default)s)')
  p.add_argument('--threads', choices=('all', '1'), default='all',
                 help='all: both frameworks use every core the process may run on; 1: pin the process to one core, '
                      'one thread per framework (default: %(default)s)')
  p.add_argument('--core', type=int, default=None,
                 help='with --threads 1, the core to pin to (default: the least busy allowed core, sampled at start)')
  p.add_argument('--context-lengths', default='32,64',
                 help='MIN,MAX prompt length in tokens, [gMASK] and <sop> included; prompt i has a random length in '
                      'that range (default: %(default)s)')
  p.add_argument('--bw-mb', type=int, default=256,
                 help='size in MB of the fp32 matrix that the bandwidth probes stream (default: %(default)s)')
  p.add_argument('--min-agree', type=int, default=16,
                 help='parity: at least this many first tokens must agree in every row (default: %(default)s)')
  p.add_argument('--config', default='small', help='config module under configs/ (default: %(default)s)')
  p.add_argument('--seed', type=int, default=0, help='seed of the random weights and prompts')
  p.add_argument('--profile', action='store_true',
                 help='after timing, per batch size: trace one glm-jax generate (jax.profiler) and print the ops that '
                      'take longest, and list the arrays the compiled decode loop materialises per step (from an '
                      'XLA dump of the optimised HLO)')
  p.add_argument('--glm-jax-path', default=None,
                 help='import glm_jax (and configs) from this directory instead of the repository: to measure a '
                      'patched copy side by side with SAT')
  args = p.parse_args(argv)
  try:
    args.batches = [int(b) for b in args.batches.split(',') if b.strip()]
    assert args.batches and min(args.batches) > 0
  except (ValueError, AssertionError):
    p.error(f'--batches must look like 1,8, got {args.batches!r}')
  try:
    lo, hi = (int(v) for v in args.context_lengths.split(','))
    assert 3 <= lo <= hi
    args.context_lengths = (lo, hi)
  except (ValueError, AssertionError):
    p.error(f'--context-lengths must be MIN,MAX with 3 <= MIN <= MAX, got {args.context_lengths!r}')
  args.threads = 1 if args.threads == '1' else len(os.sched_getaffinity(0))
  if args.repeats < 1 or args.new_tokens < 2:
    p.error('--repeats must be >= 1 and --new-tokens >= 2')
  return args


# ---------------------------------------------------------------------------------------------------------------------
# Threads (before numpy / torch / jax are imported)


def set_threads(args):
  """Pins / sizes the thread pools as --threads asks; returns notes describing it."""
  return cpu_threads.limit_threads(args.threads, args.core) + [
      f'torch.set_num_threads({args.threads}), set_num_interop_threads(1), no_grad']


def code_state(glm_jax_dir):
  """Where glm_jax comes from: the repository's commit and its uncommitted changes under glm_jax/, or the path."""
  import subprocess
  if os.path.realpath(glm_jax_dir) != os.path.realpath(os.path.join(REPO, 'glm_jax')):
    return f'{glm_jax_dir} (not the repository\'s)'
  try:
    rev = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', REPO, 'status', '--porcelain', '--', 'glm_jax'], capture_output=True,
                           text=True, check=True).stdout.split('\n')
    dirty = [line[3:] for line in dirty if line.strip()]
    return f'{glm_jax_dir} (commit {rev}' + (f', uncommitted changes: {", ".join(dirty)})' if dirty else ', clean)')
  except (OSError, subprocess.CalledProcessError):
    return glm_jax_dir


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and SAT's generation loop


def make_prompts(rng, n, vocab, lengths):
  """n prompts (context ending with [gMASK], <sop>) with random ids; returns (contexts, mask_positions, ids)."""
  gmask, sop = vocab - 3, vocab - 2
  contexts, mask_positions = [], []
  for _ in range(n):
    c = int(rng.integers(lengths[0], lengths[1] + 1))
    ids = [int(t) for t in rng.integers(1, vocab - 16, c - 2)]
    contexts.append(ids + [gmask, sop])
    mask_positions.append(c - 2)
  return contexts, mask_positions, dict(gmask=gmask, sop=sop)


def sat_batch(np, torch, contexts, n_new):
  """GLM-130B's [gMASK] generation layout (glm130b.md §5.1 step 7), built from scratch the G130 way per row and
  right-padded to the longest context C_max; generated token j of every row at column C_max + j.

  Returns (tokens [B, C_max + n] long, positions [B, C_max + n] long, SAT mask [B, 1, T, T] bool True = masked,
  context lengths [B] long, C_max)."""
  b = len(contexts)
  lengths = [len(c) for c in contexts]
  cmax = max(lengths)
  t = cmax + n_new
  tokens = np.zeros((b, t), np.int64)
  positions = np.zeros((b, t), np.int64)
  may = np.zeros((b, 1, t, t), bool)
  for i, ctx in enumerate(contexts):
    c = len(ctx)
    # G130 get_masks_and_position_ids on the unpadded [c + n] sequence: tril, then columns [0, c-1) for every row;
    # positions arange (gMASK: they simply continue).
    m = np.tril(np.ones((c + n_new, c + n_new), bool))
    m[:, :c - 1] = True
    cols = np.r_[np.arange(c), cmax + np.arange(n_new)]  # where the unpadded columns sit in the padded layout
    may[i, 0][np.ix_(cols, cols)] = m
    tokens[i, :c] = ctx
    positions[i, cols] = np.arange(c + n_new)
  return (torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(~may),
          torch.as_tensor(lengths, dtype=torch.long), cmax)


def sat_generate(torch, model, update_mems, batch, n_new, margins=False, sync=lambda: None):
  """batch_filling_sequence with greedy argmax: prefill, then one token per step with mems (SAT's update_mems), on
  the device of the batch's tensors; `sync` waits for that device before each clock reading (a GPU's
  torch.cuda.synchronize).

  Returns (tokens [B, n] numpy, prefill seconds, decode seconds, per-step top-2 margins [n, B] or None)."""
  from tests.sat_reference import MAX_MEMORY_LENGTH
  tokens, positions, mask, lengths, cmax = batch
  tokens = tokens.clone()
  b = tokens.shape[0]
  rows = torch.arange(b, device=tokens.device)
  top2 = []
  with torch.no_grad():
    sync()
    t0 = time.perf_counter()
    logits, *layers = model(tokens[:, :cmax], positions[:, :cmax], mask[:, :, :cmax, :cmax])
    mems = update_mems([o['mem_kv'] for o in layers], None, MAX_MEMORY_LENGTH)
    logits = logits[rows, lengths - 1]
    tokens[:, cmax] = logits.argmax(-1)
    if margins:
      top2.append(logits.topk(2, -1).values)
    sync()
    t1 = time.perf_counter()
    for j in range(1, n_new):
      s = cmax + j - 1  # feed generated token j-1, read the logits of token j
      logits, *layers = model(tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, :, s:s + 1, :s + 1], mems=mems)
      mems = update_mems([o['mem_kv'] for o in layers], mems, MAX_MEMORY_LENGTH)
      logits = logits[:, -1]
      tokens[:, s + 1] = logits.argmax(-1)
      if margins:
        top2.append(logits.topk(2, -1).values)
    sync()
    t2 = time.perf_counter()
  m = None
  if margins:
    v = torch.stack(top2).float().cpu().numpy()
    m = v[..., 0] - v[..., 1]
  return tokens[:, cmax:].cpu().numpy(), t1 - t0, t2 - t1, m


# ---------------------------------------------------------------------------------------------------------------------
# Bandwidth and FLOP/s probes


# ---------------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
  args = parse_args(argv)
  notes = set_threads(args)

  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  import jax
  import jax.numpy as jnp
  dump_dir = None
  if args.profile:  # the XLA dump flag must be set before the CPU backend starts
    import tempfile
    dump_dir = tempfile.mkdtemp(prefix='decode_vs_sat_hlo_')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump_dir} '
                               '--xla_dump_hlo_module_re=.*_program.*').strip()

  sys.path.insert(0, REPO)
  if args.glm_jax_path:
    sys.path.insert(0, os.path.abspath(args.glm_jax_path))
  import common
  import glm_jax
  from glm_jax.generation import decode as D
  from tests import sat_reference as R

  config, cfg = common.fp32_config(args.config)
  n_new = args.new_tokens
  common.print_header(f'decode_vs_sat: greedy decoding, glm-jax Decoder.generate vs SAT GLM130B with mems, fp32, '
                      f'{args.threads} thread(s) each', notes)
  print(f'glm_jax from {code_state(os.path.dirname(os.path.abspath(glm_jax.__file__)))}')

  # ------------------------------------------------------------------------------------------- models, same weights
  t0 = time.perf_counter()
  sat_model, params = common.sat_and_params(config, cfg, args.seed, negate_final_layernorm=True)
  update_mems = R._import_sat()['update_mems']
  decoder = D.Decoder(config.model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  weight_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
  params = decoder.prepare(params)  # the decoder's own format (packed on CPU)
  print(f'config {args.config}: L={cfg.num_layers} D={cfg.hidden_size} N={cfg.num_attention_heads} '
        f'F={cfg.inner_hidden_size} V={cfg.vocab_size}, {n_params / 1e6:.1f}M parameters ({weight_bytes / 1e6:.0f} MB '
        f'fp32); SAT built and converted in {time.perf_counter() - t0:.1f} s')

  bw = common.Probes(np, torch, jax, jnp, args.bw_mb, args.seed)
  for _ in range(2):
    bw.probe()

  rng = np.random.default_rng(args.seed)
  all_contexts, all_masks, special = make_prompts(rng, max(args.batches), cfg.vocab_size, args.context_lengths)
  print(f'prompts: random ids + [gMASK]={special["gmask"]} + <sop>={special["sop"]}, lengths '
        f'{[len(c) for c in all_contexts]}; greedy, {n_new} new tokens, no end tokens')

  # glm-jax's decode step is timed as (t(N) - t(M)) / (N - M) with M in N's generation bucket (one compiled program).
  g_bucket = D.bucket_length(n_new)
  m_short = max(1, n_new // 2)
  while m_short < n_new and D.bucket_length(m_short) != g_bucket:
    m_short += 1
  if m_short >= n_new:
    sys.exit(f'--new-tokens {n_new} is the first length of its generation bucket: no shorter run shares its program')

  results = []
  parity_ok = True
  kv_bytes_per_key = 2 * cfg.num_layers * cfg.hidden_size * 4
  for b in args.batches:
    contexts, masks = all_contexts[:b], all_masks[:b]
    batch = sat_batch(np, torch, contexts, n_new)

    def run_jax(n):
      return decoder.generate(params, contexts, masks, True, max_gen_length=n, strategy=D.GREEDY, end_tokens=())

    # ---------------------------------------------------------------------------------------- compile and parity
    out, compile_s, _ = common.timed(lambda: run_jax(n_new))
    run_jax(m_short)
    ours = np.array(out.tokens)
    ref, sat_prefill_s, sat_decode_s, margin = sat_generate(torch, sat_model, update_mems, batch, n_new, margins=True)
    agree_rows = []
    row_ok = True
    for i in range(b):
      diff = np.flatnonzero(ours[i] != ref[i])
      k = int(diff[0]) if diff.size else n_new
      tie = diff.size > 0 and margin[k, i] <= NEAR_TIE
      agree_rows.append((k, float(margin[k, i]) if diff.size else None))
      if k < min(args.min_agree, n_new) and not tie:
        row_ok = False
    n_agree = sum(int((ours[i] == ref[i]).all()) for i in range(b))
    distinct = len(np.unique(ref))
    print(f'\n[batch {b}] glm-jax first call (compile + run) {compile_s:.1f} s. parity: {n_agree}/{b} rows generate '
          f'the same {n_new} tokens; agreeing prefix per row: '
          + ', '.join(f'{k}' + (f' (SAT top-2 margin there {m:.2g})' if m is not None else '') for k, m in agree_rows)
          + f'; {distinct} distinct token ids among SAT\'s; row 0 starts {ref[0][:8].tolist()} -> '
          + ('OK' if row_ok else 'FAIL'))
    if not row_ok:
      parity_ok = False
      print('parity failed: the two programs do not generate the same tokens; timings would be meaningless')
      continue

    for _ in range(args.warmup):
      run_jax(n_new)
      run_jax(m_short)
      sat_generate(torch, sat_model, update_mems, batch, n_new)

    rec = collections.defaultdict(list)
    for r in range(args.repeats):
      order = ('jax', 'sat') if r % 2 == 0 else ('sat', 'jax')
      for which in order:
        if which == 'jax':
          _, w, c = common.timed(lambda: run_jax(n_new))
          _, w2, c2 = common.timed(lambda: run_jax(m_short))
          rec['jax_full'].append(w)
          rec['jax_full_cpu'].append(c)
          rec['jax_step'].append((w - w2) / (n_new - m_short))
          rec['jax_step_cpu'].append((c - c2) / (n_new - m_short))
        else:
          (_, pre, dec, _), w, c = common.timed(
              lambda: sat_generate(torch, sat_model, update_mems, batch, n_new))
          rec['sat_full'].append(w)
          rec['sat_full_cpu'].append(c)
          rec['sat_prefill'].append(pre)
          rec['sat_step'].append(dec / (n_new - 1))
      bw.probe()
      print(f'  round {r + 1}/{args.repeats}: glm-jax {rec["jax_full"][-1]:6.2f} s ({rec["jax_step"][-1] * 1e3:6.1f} '
            f'ms/step)   SAT {rec["sat_full"][-1]:6.2f} s ({rec["sat_step"][-1] * 1e3:6.1f} ms/step, prefill '
            f'{rec["sat_prefill"][-1] * 1e3:.0f} ms)', flush=True)

    lengths = np.array([len(c) for c in contexts])
    keys_per_step = float(np.mean([np.sum(lengths + j) for j in range(1, n_new)]))  # step j attends c_b + j keys
    p_bucket = D.bucket_length(int(lengths.max()))
    med = {k: float(np.median(v)) for k, v in rec.items()}
    paired_full = float(np.median(np.array(rec['sat_full']) / np.array(rec['jax_full'])))
    paired_step = float(np.median(np.array(rec['sat_step']) / np.array(rec['jax_step'])))
    results.append(dict(b=b, med=med, paired_full=paired_full, paired_step=paired_step,
                        kv_bytes=keys_per_step * kv_bytes_per_key,
                        kv_bytes_jax=b * (p_bucket + g_bucket) * kv_bytes_per_key, p_bucket=p_bucket))
    if args.profile:
      profile_generate(jax, lambda: run_jax(n_new), f'batch {b}', dump_dir=dump_dir)

  if not results:
    return 1

  # ---------------------------------------------------------------------------------------------------------- report
  bandwidth, bw_src = bw.bandwidth
  print(f'\nbandwidth probes, best over {args.repeats * len(results) + 2} rounds, {bw.nbytes / 2 ** 20:.0f} MB fp32 '
        f'matrix ({bw.n}x{bw.n}), GB/s of bytes read: '
        + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in bw.best.items())
        + f'\n  -> bandwidth = {bandwidth / 1e9:.1f} GB/s ({bw_src}; the best read rate: a decode step streams its '
          'weights the same ways)')
  print(f'bytes per decode step: weights {weight_bytes / 1e6:.1f} MB (all {n_params / 1e6:.1f}M parameters, the tied '
        f'[V, D] embedding read in full by the output projection) + the keys/values a step must read '
        f'(2*L*D*4 = {kv_bytes_per_key / 1e3:.1f} kB per attended key per row):')
  for r in results:
    step_bytes = weight_bytes + r['kv_bytes']
    r['bound_step'] = step_bytes / bandwidth
    r['bound_tps'] = r['b'] / r['bound_step']
    print(f'  batch {r["b"]}: {weight_bytes / 1e6:.1f} + {r["kv_bytes"] / 1e6:.1f} MB (mean over the {n_new - 1} steps) '
          f'= {step_bytes / 1e6:.1f} MB -> bound {r["bound_step"] * 1e3:.2f} ms/step = {r["bound_tps"]:.1f} tokens/s; '
          f'(glm-jax\'s padded cache, P={r["p_bucket"]} + G={g_bucket} columns, is {r["kv_bytes_jax"] / 1e6:.1f} MB)')

  print(f'flops per decode step: 2*B*{n_params / 1e6:.1f}M for the weight products + 4*D*L per attended key per row; '
        f'at the peak, jax\'s best fp32 2048x2048 matmul over the rounds ({bw.peak_flops / 1e9:.1f} GFLOP/s):')
  for r in results:
    flops = 2 * r['b'] * n_params + 4 * cfg.hidden_size * cfg.num_layers * r['kv_bytes'] / kv_bytes_per_key
    r['compute_step'] = flops / bw.peak_flops
    both = (max(r['bound_step'], r['compute_step']), r['bound_step'] + r['compute_step'])
    print(f'  batch {r["b"]}: {flops / 1e9:.2f} GFLOP -> {r["compute_step"] * 1e3:.1f} ms/step at the peak; with the '
          f'bandwidth bound, {both[0] * 1e3:.1f} ms/step if compute and memory traffic overlap fully, '
          f'{both[1] * 1e3:.1f} if they never do')
  print(f'\ntokens/s, medians of {args.repeats} interleaved rounds (wall time). "full": the whole call, prefill + '
        f'{n_new} tokens (B*{n_new} / time, both sides); "decode": B / (time of one decode step), prefill excluded. '
        f'jax/SAT "paired": median of the per-round ratios. "of bound": decode tokens/s / bound tokens/s.')
  hdr = (f'{"batch":>5} | {"SAT full":>8} | {"jax full":>8} | {"jax/SAT":>7} | {"paired":>6} | {"SAT dec":>8} | '
         f'{"jax dec":>8} | {"jax/SAT":>7} | {"paired":>6} | {"bound":>7} | {"jax of bound":>12} | '
         f'{"SAT of bound":>12}')
  print(hdr)
  print('-' * len(hdr))
  for r in results:
    m, b = r['med'], r['b']
    sf, jf = b * n_new / m['sat_full'], b * n_new / m['jax_full']
    sd_, jd = b / m['sat_step'], b / m['jax_step']
    r.update(sat_full=sf, jax_full=jf, sat_dec=sd_, jax_dec=jd)
    print(f'{b:>5} | {sf:8.1f} | {jf:8.1f} | {jf / sf:6.2f}x | {r["paired_full"]:5.2f}x | {sd_:8.1f} | {jd:8.1f} | '
          f'{jd / sd_:6.2f}x | {r["paired_step"]:5.2f}x | {r["bound_tps"]:7.1f} | {jd / r["bound_tps"]:12.1%} | '
          f'{sd_ / r["bound_tps"]:12.1%}')
  one = args.threads == 1  # with one thread the process's CPU time is the time it held its core: a check on wall time
  print('\nper step and per call (medians' + ('; CPU time of the process in brackets, not inflated when another '
                                             'process takes the core)' if one else ')') + ':')
  for r in results:
    m = r['med']
    jax_step, jax_full, sat_full = f'{m["jax_step"] * 1e3:.1f}', f'{m["jax_full"]:.2f}', f'{m["sat_full"]:.2f}'
    if one:
      jax_step += f' [{m["jax_step_cpu"] * 1e3:.1f}]'
      jax_full += f' [{m["jax_full_cpu"]:.2f}]'
      sat_full += f' [{m["sat_full_cpu"]:.2f}]'
    line = (f'  batch {r["b"]}: glm-jax {jax_step} ms/step, full call {jax_full} s; SAT {m["sat_step"] * 1e3:.1f} '
            f'ms/step, prefill {m["sat_prefill"] * 1e3:.0f} ms, full call {sat_full} s; bound '
            f'{r["bound_step"] * 1e3:.1f} ms/step')
    if one:
      line += f'; glm-jax decode by CPU time: {r["b"] / m["jax_step_cpu"] / r["bound_tps"]:.1%} of the bound'
    print(line)
  la = os.getloadavg()
  print(f'load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}')

  print('\ntargets:')
  for r in results:
    if r['b'] == 1:
      f = r['jax_dec'] / r['bound_tps']
      print(f'  batch 1: glm-jax at >= 75% of the bandwidth bound: {"yes" if f >= 0.75 else "NO"} ({f:.1%}; SAT '
            f'{r["sat_dec"] / r["bound_tps"]:.1%})')
    if r['b'] == 8:
      print(f'  batch 8: glm-jax >= 4x SAT tokens/s: {"yes" if r["jax_full"] >= 4 * r["sat_full"] else "NO"} '
            f'(full call {r["jax_full"] / r["sat_full"]:.2f}x, decode phase {r["jax_dec"] / r["sat_dec"]:.2f}x)')
  if dump_dir:
    report_hlo(dump_dir)
  return 0 if parity_ok else 1


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (--profile)


def custom_call_targets(dump_dir):
  """{instruction name: custom-call target} in the newest compiled program of the XLA dump (the one just traced), so
  that the profile tells the FFI kernels apart (each is an `ffi_call.N` there)."""
  import glob
  files = glob.glob(os.path.join(dump_dir, '*_program*after_optimizations.txt')) if dump_dir else []
  if not files:
    return {}
  with open(max(files, key=os.path.getmtime)) as f:
    return dict(re.findall(r'%(\S+) = .*custom_call_target="([^"]+)"', f.read()))


def profile_generate(jax, fn, label, top=14, dump_dir=None):
  """Traces one glm-jax generate with jax.profiler and prints the XLA ops that took longest (summed); custom calls
  under their targets' names when the XLA dump (dump_dir) has them."""
  import glob
  import gzip
  import json
  import shutil
  import tempfile
  targets = custom_call_targets(dump_dir)
  d = tempfile.mkdtemp(prefix='decode_vs_sat_profile_')
  try:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      fn()
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
      if e.get('ph') != 'X' or name.startswith(('$', 'ThunkExecutor', 'while', 'Pjit', 'np.')):
        continue
      key = targets.get(name) or re.sub(r'[.][0-9]+$', '', name)
      dur[key] += e.get('dur', 0) / 1e3
      cnt[key] += 1
    total = sum(dur.values())
    print(f'  [{label}] profile of one glm-jax generate: {total:.0f} ms in XLA ops; longest (summed):')
    for k, v in sorted(dur.items(), key=lambda kv: -kv[1])[:top]:
      print(f'    {v:9.1f} ms {v / total:6.1%}  x{cnt[k]:<6d} {k[:90]}')
  except Exception as exc:  # a diagnostic: never let it fail the benchmark
    print(f'  [{label}] profile failed: {type(exc).__name__}: {exc}')
  finally:
    shutil.rmtree(d, ignore_errors=True)


_SHAPE = re.compile(r'^(f32|f16|bf16|s32|pred|u32|s8|u8)\[([0-9,]*)\]')
_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'f16': 2, 'bf16': 2, 'pred': 1, 's8': 1, 'u8': 1}


def _hlo_computations(text):
  comps, name, lines = {}, None, []
  for line in text.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) ', line)
    if m and line.rstrip().endswith('{') and not line.startswith(' '):
      name, lines = m.group(1), []
      if line.startswith('ENTRY'):
        comps['__entry__'] = name
      continue
    if line.startswith('}'):
      comps[name] = lines
      name = None
      continue
    if name is not None:
      lines.append(line)
  return comps


def _materialised(comps, body, mult, out, min_bytes=256 * 1024, depth=0):
  """Walks a while body (and the bodies of whiles nested in it, times their trip counts): the non-dot instructions
  whose array result is at least min_bytes, i.e. the arrays the loop writes per iteration."""
  for line in comps.get(body, ()):
    if ' while(' in line:  # a nested loop (the scanned layers): its body runs trip-count times per iteration
      inner = re.search(r'body=%([\w.\-]+)', line).group(1)
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      _materialised(comps, inner, mult * (int(trip.group(1)) if trip else 1), out, min_bytes, depth + 1)
      continue
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\S+?)\(', line)
    if not m:
      continue
    name, shape, op = m.groups()
    s = _SHAPE.match(shape)
    if not s or op in ('dot', 'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant'):
      continue
    n = _BYTES[s.group(1)]
    for d in s.group(2).split(','):
      n *= int(d) if d else 1
    if n >= min_bytes and 'dynamic-update-slice' not in name:  # an in-place update writes only its slice
      kind = re.sub(r'[.][0-9]+$', '', name)
      out[(kind, shape.split('{')[0])][0] += mult
      out[(kind, shape.split('{')[0])][1] += mult * n


def report_hlo(dump_dir):
  """For each compiled decode program: the arrays >= 256 kB its decode while-loop writes per step (excluding dot
  outputs), from the optimised HLO that XLA dumped."""
  import glob
  files = sorted(glob.glob(os.path.join(dump_dir, '*_program*after_optimizations.txt')))
  print(f'\ncompiled decode loops (XLA dump in {dump_dir}): arrays of >= 256 kB written per decode step (dot outputs '
        'and dynamic-update-slice fusions, in place when XLA can alias them, excluded; copies of weights or of the '
        'cache show up here):')
  for path in files:
    text = open(path).read()
    comps = _hlo_computations(text)
    entry = comps.get(comps.get('__entry__'), [])
    loops = [l for l in entry if ' while(' in l and 'GLM/while' not in l]  # the decode loop, not the prefill scan
    for line in loops:
      body = re.search(r'body=%([\w.\-]+)', line).group(1)
      cache = re.findall(r'f32\[(\d+),(\d+),(\d+),(\d+),(\d+)\]', line.split(' while(')[0])
      out = collections.defaultdict(lambda: [0, 0])
      _materialised(comps, body, 1, out)
      total = sum(v[1] for v in out.values())
      print(f'  {os.path.basename(path)[:60]}: cache-like arrays in the loop state {sorted(set(cache))[:2]}; '
            f'{total / 1e6:.1f} MB written per step by:')
      for (kind, shape), (count, nbytes) in sorted(out.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f'    {nbytes / 1e6:8.1f} MB  x{count:<4d} {kind} {shape}')


if __name__ == '__main__':
  sys.exit(main())
