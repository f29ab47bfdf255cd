"""A GLM-130B-shaped model in INT4 on one GPU: greedy decoding at batch 1 and 8 against the HBM-bandwidth bound.

The model is configs/glm_130b.py (hidden 12288, 96 heads, GeGLU 32768, vocabulary 150528, fp16) with random weights
made on the GPU directly in the 'int4' format (quantize/formats.py: the four layer matrices as INT4 with fp16 scales,
the embedding fp16), so nothing of 130B size is ever built in floating point. With --layers 70 (the default) the
whole model decodes; with --derive L1,L2 two shorter models are timed and the 70-layer step derived as
t(L1) + (70 - L1) * (t(L2) - t(L1)) / (L2 - L1), said so in the output.

  - step time: (time of N new tokens - time of N/2) / (N - N/2), one compiled program; median over --repeats;
  - bytes per step: every weight (each read once per step) + the key/value cache columns attended;
  - bandwidth: the best device-to-device copy rate measured in the same run (read + write bytes / time);
  - fraction of the bound: (bytes per step / bandwidth) / step time. Target (issue 13): 60% or better.

    python benchmarks/glm130b_int4_decode.py                  # one H200 (141 GB): the INT4 model is about 67 GB
    python benchmarks/glm130b_int4_decode.py --derive 4,8     # fewer layers, the 70-layer figure derived
    python benchmarks/glm130b_int4_decode.py --smoke          # CPU, a tiny model: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--layers', type=int, default=None, help='layers of the model (default: 70; 2 with --smoke)')
  p.add_argument('--derive', default=None, help='L1,L2: time these layer counts and derive --layers from them')
  p.add_argument('--batches', default='1,8')
  p.add_argument('--new-tokens', type=int, default=32)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--smoke', action='store_true', help='a tiny model on CPU (checks the script)')
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(',') if b]
  if args.layers is None:
    args.layers = 2 if args.smoke else 70  # 70 unrolled layers take XLA:CPU minutes to compile
  if args.derive:
    args.derive = tuple(int(v) for v in args.derive.split(','))
  return args


def random_int4_params(jax, jnp, decoder, cfg, seed):
  """Stored params of the decoder's format, drawn on the device leaf by leaf (abstract shapes from the model)."""
  import flax.linen as nn

  from glm_jax.sharding import dummy_inputs
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(decoder.model.init(r, *dummy_inputs(cfg))['params']),
                          jax.random.key(0))
  key = jax.random.key(seed)
  out = []
  for i, (path, s) in enumerate(jax.tree_util.tree_leaves_with_path(shapes)):
    name, k = jax.tree_util.keystr(path), jax.random.fold_in(key, i)
    if s.dtype == jnp.int8:
      leaf = jax.random.randint(k, s.shape, -128, 128, jnp.int32).astype(jnp.int8)
    elif name.endswith("['scale']") and 'layernorm' not in name:
      leaf = jnp.full(s.shape, 0.002, s.dtype)  # INT4 quantization scales: |w| up to 0.014
    elif 'bias' in name:
      leaf = jnp.zeros(s.shape, s.dtype)
    elif 'layernorm' in name:
      leaf = jnp.full(s.shape, -1.0 if 'final' in name else 1.0, s.dtype)
    else:
      leaf = (jax.random.normal(k, s.shape, jnp.float32) * 0.02).astype(s.dtype)
    out.append(leaf)
  return jax.tree.unflatten(jax.tree.structure(shapes), out)


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import glm_130b
  from glm_jax.generation import decode as D
  from glm_jax.model import GLMConfig

  if jax.default_backend() != 'gpu' and not args.smoke:
    sys.exit(f'this benchmark needs a GPU; jax runs on {jax.default_backend()} (use --smoke to check the script)')
  config = glm_130b.get_config()
  if args.smoke:
    config.model.update(hidden_size=256, num_attention_heads=4, inner_hidden_size=512, vocab_size=1024)
  print(f'== glm130b_int4_decode: {jax.devices()[0].device_kind}, jax {jax.__version__} ==')

  # bandwidth: a device-to-device copy (read + write), best of several
  buf = jnp.zeros((2 ** 28 if not args.smoke else 2 ** 20,), jnp.float32)
  copy = jax.jit(lambda a: a + 1)
  jax.block_until_ready(copy(buf))
  bandwidth = 0.0
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(copy(buf))
    bandwidth = max(bandwidth, 2 * buf.nbytes / (time.perf_counter() - t0))
  del buf
  print(f'bandwidth (device copy, read + write): {bandwidth / 1e9:.0f} GB/s')

  n_new = args.new_tokens
  n_short = n_new // 2
  while D.bucket_length(n_short) != D.bucket_length(n_new):
    n_short += 1

  def measure(num_layers):
    config.model.num_layers = num_layers
    cfg = GLMConfig.make(config.model)
    decoder = D.Decoder(cfg, quantized='int4')
    params = random_int4_params(jax, jnp, decoder, cfg, 0)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(params))
    print(f'[{num_layers} layers] {nbytes / 1e9:.1f} GB of weights on the device ({decoder.weight_format})', flush=True)
    rng = np.random.default_rng(0)
    result = {}
    for b in args.batches:
      contexts = [list(rng.integers(10, cfg.vocab_size, 32)) for _ in range(b)]

      def run(n):
        out = decoder.generate(params, contexts, [30] * b, True, max_gen_length=n, strategy=D.GREEDY, end_tokens=())
        return np.asarray(out.tokens)

      t0 = time.perf_counter()
      run(n_new), run(n_short)
      compile_s = time.perf_counter() - t0
      steps = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        run(n_new)
        t1 = time.perf_counter()
        run(n_short)
        t2 = time.perf_counter()
        steps.append(((t1 - t0) - (t2 - t1)) / (n_new - n_short))
      kv = b * (32 + (n_new + n_short) / 2) * 2 * num_layers * cfg.hidden_size * 2
      result[b] = (float(np.median(steps)), nbytes + kv)
      print(f'  batch {b}: {result[b][0] * 1e3:.2f} ms/step (first calls, compile included: {compile_s:.0f} s)',
            flush=True)
    params = None  # the device memory goes before the next model is made (run() holds the variable, not a copy)
    return result

  if args.derive:
    l1, l2 = args.derive
    r1, r2 = measure(l1), measure(l2)
    result = {}
    for b in args.batches:
      per_layer = (r2[b][0] - r1[b][0]) / (l2 - l1)
      bytes_per_layer = (r2[b][1] - r1[b][1]) / (l2 - l1)
      result[b] = (r1[b][0] + (args.layers - l1) * per_layer, r1[b][1] + (args.layers - l1) * bytes_per_layer)
    how = f'derived from {l1} and {l2} layers'
  else:
    result = measure(args.layers)
    how = 'measured'
  print(f'\n{args.layers} layers ({how}):')
  for b, (step, nbytes) in result.items():
    bound = nbytes / bandwidth
    print(f'  batch {b}: {step * 1e3:.2f} ms/step, {b / step:.1f} tokens/s; bound {bound * 1e3:.2f} ms/step '
          f'({nbytes / 1e9:.1f} GB a step) -> {bound / step:.1%} of the bound (target 60%: '
          f'{"yes" if bound / step >= 0.6 else "NO"})')


if __name__ == '__main__':
  main()
