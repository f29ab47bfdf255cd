"""INT4 weight-only matmul on one GPU: the Pallas kernel (quantize/kernels.py) against XLA's bf16 dot and against
XLA's own fused int4 formulation (an `s4` weight converted and scaled feeding the dot), GLM-130B's shapes, one run.

For each weight shape K x N (in x out: 12288x36864 QKV, 12288x12288 dense, 12288x65536 h-to-4h, 32768x12288 4h-to-h)
and each M (rows of x: 1, 4, 16, 64, 256), bf16 activations, GLM-130B's format (one fp16 scale per output row):
  - bf16: jnp.dot(x [M, K], W [K, N]) with W in bf16;
  - s4:   XLA's fused int4: jnp.einsum(x, W_s4.astype(bf16)) * scale, W_s4 a jnp.int4 [N, K] array;
  - ours: the Pallas (Triton) kernel on the release layout (int8 [N, K/2], two nibbles a byte), the best of a few
          block sizes (printed; `default_blocks` is what the model uses without tuning);
and prints microseconds per call (median of --reps timings of --iters calls), ours against bf16 and s4, and the
INT4 bytes read per second. Each result is checked against the XLA reference first.

Targets (issue 13): at least 3x bf16 for M <= 16, within 10% of bf16 at M = 256.

    python benchmarks/int4_matmul.py                      # one H100 / H200, a few minutes
    python benchmarks/int4_matmul.py --smoke              # CPU, interpret mode, tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((12288, 36864), (12288, 12288), (12288, 65536), (32768, 12288))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ms', default='1,4,16,64,256', help='rows of x (default: %(default)s)')
  p.add_argument('--iters', type=int, default=20, help='calls per timing (default: %(default)s)')
  p.add_argument('--reps', type=int, default=5, help='timings per case, the median kept (default: %(default)s)')
  p.add_argument('--no-tune', action='store_true', help='only the default block sizes')
  p.add_argument('--smoke', action='store_true', help='tiny shapes in interpret mode on CPU (checks the script)')
  args = p.parse_args(argv)
  args.ms = [int(m) for m in args.ms.split(',') if m]
  return args


def candidates(kernels, m: int, tune: bool):
  """Block sizes tried: the default first."""
  default = kernels.default_blocks('gpu', m)
  if not tune:
    return [default]
  if m <= 16:
    more = [kernels.Blocks(16, n, k, num_warps=w, num_stages=s)
            for n, k, w, s in ((32, 256, 4, 3), (64, 512, 4, 3), (128, 256, 4, 4), (128, 512, 8, 3), (32, 512, 4, 4))]
  else:
    bm = min(128, max(16, m))
    more = [kernels.Blocks(bm, n, k, num_warps=w, num_stages=s)
            for n, k, w, s in ((128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 4))]
  return [default] + [b for b in more if b != default]


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from quantize import formats, kernels

  backend = jax.default_backend()
  if backend != 'gpu' and not args.smoke:
    sys.exit(f'int4_matmul.py measures a GPU; this machine runs jax on {backend} (use --smoke to check the script)')
  shapes = ((256, 384), (512, 256)) if args.smoke else SHAPES
  print(f'== int4_matmul: Pallas INT4 x bf16 vs XLA bf16 and XLA s4, {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__} ==')

  def timeit(fn, *a):
    jax.block_until_ready(fn(*a))
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      for _ in range(args.iters):
        out = fn(*a)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / args.iters)
    return float(np.median(times))

  rows = []
  key = jax.random.key(0)
  for k, n in shapes:
    key, kw, kx = jax.random.split(key, 3)
    w_NxK = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    stored = formats._quantize_traced(w_NxK.astype(jnp.float32), 4, 1)
    q, scale = stored['q'], stored['scale']
    hi, lo = kernels.unpack_int4(q)
    w_s4 = jnp.stack([hi, lo], axis=-1).reshape(n, k).astype(jnp.int4)
    w_KxN = kernels.dequantize(q, scale, 4, jnp.bfloat16).T  # the same weights in bf16
    del w_NxK, hi, lo
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    s4 = jax.jit(lambda x, w, s: jnp.einsum('mk,nk->mn', x, w.astype(x.dtype), preferred_element_type=jnp.float32)
                 * s[:, 0].astype(jnp.float32))
    for m in args.ms:
      x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.float32).astype(jnp.bfloat16)
      ref = np.asarray(kernels.xla_matmul(x, q, scale, 4))
      mass = np.abs(np.asarray(x, np.float32)) @ np.abs(np.asarray(w_KxN, np.float32))
      tol = (2.0 ** -8 + 2 * k * 2.0 ** -24) * mass + 1e-6
      t_bf16 = timeit(bf16, x, w_KxN)
      t_s4 = timeit(s4, x, w_s4, scale)
      best = None
      for blocks in candidates(kernels, m, not args.no_tune):
        fn = jax.jit(lambda x, q, s, b=blocks: kernels.gpu_matmul(x, q, s, 4, blocks=b, interpret=args.smoke))
        try:
          y = np.asarray(fn(x, q, scale))
        except Exception as e:  # noqa: BLE001 - a block size the compiler refuses is skipped, and said
          print(f'  {k}x{n} M={m}: blocks {blocks} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
          continue
        if not (np.abs(y - ref) <= tol).all():
          print(f'  {k}x{n} M={m}: blocks {blocks} gave wrong results (max error {np.abs(y - ref).max():.3g})')
          continue
        t = timeit(fn, x, q, scale)
        if best is None or t < best[0]:
          best = (t, blocks)
      if best is None:
        print(f'{k}x{n} M={m}: no block size worked')
        continue
      rows.append((k, n, m, t_bf16, t_s4, best[0], best[1], q.nbytes))
      print(f'{k:>6}x{n:<6} M={m:<4} bf16 {t_bf16 * 1e6:9.1f} us  s4 {t_s4 * 1e6:9.1f} us  ours {best[0] * 1e6:9.1f} us'
            f'  ({t_bf16 / best[0]:5.2f}x bf16, {t_s4 / best[0]:5.2f}x s4, {q.nbytes / best[0] / 1e9:7.1f} GB/s int4)'
            f'  blocks m={best[1].m} n={best[1].n} k={best[1].k} warps={best[1].num_warps} '
            f'stages={best[1].num_stages}', flush=True)

  print('\ntargets:')
  small = [r for r in rows if r[2] <= 16]
  if small:
    worst = min(r[3] / r[5] for r in small)
    print(f'  M <= 16, at least 3x bf16: {"yes" if worst >= 3 else "NO"} (worst {worst:.2f}x)')
  big = [r for r in rows if r[2] == 256]
  if big:
    worst = min(r[3] / r[5] for r in big)
    print(f'  M = 256, within 10% of bf16: {"yes" if worst >= 1 / 1.1 else "NO"} (worst {worst:.2f}x)')


if __name__ == '__main__':
  main()
