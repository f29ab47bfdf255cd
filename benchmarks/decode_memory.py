"""Memory of loading a model for decoding: one copy of the weights, and a host peak near one layer above them.

    python benchmarks/decode_memory.py          # about 1B parameters (20 x 2048, GeGLU 5461, vocabulary 32768)
    python benchmarks/decode_memory.py --layers 8 --hidden 768 --heads 12 --ffn 2048 --vocab 4096 \\
        --tokenizer T.model --json             # the test suite's small case (tests/test_decode_memory.py)

Makes a model of the given size with random float32 weights and saves it as a glm-jax checkpoint (save_model, which
stores stacked layer arrays in chunks of one layer) in a temporary directory. Then, each in a fresh process:
  by_layer   Decoder.prepare(model_io.read_params_by_layer(ckpt)): what Generator.load does without a mesh, each
             layer's slices read, converted to the decode format and placed before the next is read;
  whole      Decoder.prepare(model_io.load_model(ckpt)[0]): the whole parameter tree on the host first.
Each reports RssAnon (anonymous resident memory, where the arrays live; file pages mapped by the checkpoint reader are
not counted, unlike RSS) before loading, its peak while loading (sampled every 2 ms) and after, and prints the growth
against one layer's bytes and the whole model's.
With --tokenizer, also `generator`: Generator.load, then a generate, a streamed generate and a log_probs call; it
reports the bytes of live device arrays (one copy of the weights and nothing else is expected) and RssAnon after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_anon() -> int:
  """This process's RssAnon in bytes (/proc/self/status)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('RssAnon:'):
        return int(line.split()[1]) * 1024
  raise OSError('no RssAnon in /proc/self/status (Linux only)')


class PeakRssAnon:
  """Samples RssAnon every 2 ms while the block runs; .peak is the largest value seen."""

  def __enter__(self):
    self.peak, self._stop = rss_anon(), False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop:
      self.peak = max(self.peak, rss_anon())
      time.sleep(0.002)

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()
    self.peak = max(self.peak, rss_anon())


def _config(args):
  from glm_jax.config import default_config
  config = default_config()
  config.model.update(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      inner_hidden_size=args.ffn, vocab_size=args.vocab, max_sequence_length=256)
  return config


def make_checkpoint(args, directory: Path) -> dict:
  """Random weights saved with save_model; returns the model's and one layer's bytes."""
  import flax.linen as nn
  import jax
  import numpy as np
  from glm_jax import GLM, save_model, sharding
  config = _config(args)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(sharding.abstract_params(GLM(config.model), config.model)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  layer = sum(x.nbytes for x in jax.tree.leaves(params['layers'])) // args.layers
  path = save_model(directory / 'ckpt', params, config)
  if args.tokenizer:
    shutil.copy(args.tokenizer, path / 'tokenizer.model')
    shutil.copy(Path(args.tokenizer).with_suffix('.json'), path / 'tokenizer.json')
  return dict(model_bytes=total, layer_bytes=layer, checkpoint=str(path))


def measure(mode: str, checkpoint: str) -> dict:
  """One way of loading, in this process (a fresh one: see main)."""
  import gc

  import jax
  from glm_jax import model_io
  from glm_jax.generation.decode import Decoder
  out = {'mode': mode}
  before = rss_anon()
  with PeakRssAnon() as peak:
    if mode == 'by_layer':
      config, entries = model_io.read_params_by_layer(checkpoint)
      weights = Decoder(config.model).prepare(entries)
    elif mode == 'whole':
      params, config = model_io.load_model(checkpoint)
      weights = Decoder(config.model).prepare(params)
      del params
    else:  # generator
      from glm_jax.generation import Generator
      gen = Generator.load(checkpoint)
      weights = gen.weights
  gc.collect()
  out.update(before=before, peak=peak.peak, after=rss_anon(),
             weights_bytes=sum(x.nbytes for x in jax.tree.leaves(weights)))
  if mode == 'generator':
    gen.generate('The king [MASK] the queen.', out_seq_length=40, top_k=1)
    pieces = []
    gen.generate('Once upon a time', out_seq_length=40, top_k=1, stream=pieces.append)
    assert pieces, 'nothing streamed'
    gen.log_probs('The capital is', [' Paris', ' a big town'])
    gc.collect()
    out.update(live_device_bytes=sum(x.nbytes for x in jax.live_arrays()), after_calls=rss_anon())
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=20)
  p.add_argument('--hidden', type=int, default=2048)
  p.add_argument('--heads', type=int, default=16)
  p.add_argument('--ffn', type=int, default=5461)
  p.add_argument('--vocab', type=int, default=32768)
  p.add_argument('--tokenizer', default=None, help='a .model file: also measure the Generator (see above)')
  p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
  p.add_argument('--measure', nargs=2, metavar=('MODE', 'CHECKPOINT'), help=argparse.SUPPRESS)  # the child process
  args = p.parse_args(argv)
  sys.path.insert(0, str(REPO))
  if args.measure:
    print(json.dumps(measure(*args.measure)))
    return 0
  with tempfile.TemporaryDirectory(prefix='decode_memory-') as tmp:
    info = make_checkpoint(args, Path(tmp))
    modes = ['by_layer', 'whole'] + (['generator'] if args.tokenizer else [])
    for mode in modes:
      proc = subprocess.run([sys.executable, __file__, '--measure', mode, info['checkpoint']], capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu')))
      if proc.returncode != 0:
        sys.exit(f'decode_memory.py: the {mode} run failed:\n{proc.stderr[-3000:]}')
      info[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  if args.json:
    print(json.dumps(info))
    return 0
  mb, layer, total = 1e6, info['layer_bytes'], info['model_bytes']
  print(f'model: {args.layers} layers x hidden {args.hidden}, GeGLU {args.ffn}, vocabulary {args.vocab}: '
        f'{total / 4e9:.2f}B parameters, {total / mb:.0f} MB float32; one layer {layer / mb:.0f} MB')
  print(f'{"loading":<10} {"weights":>9} {"peak - before":>14} {"peak - weights":>15} {"in layers":>10} '
        f'{"after - before":>15}')
  for mode in ('by_layer', 'whole'):
    r = info[mode]
    grow, extra = r['peak'] - r['before'], r['peak'] - r['before'] - r['weights_bytes']
    print(f'{mode:<10} {r["weights_bytes"] / mb:>8.0f}M {grow / mb:>13.0f}M {extra / mb:>14.0f}M '
          f'{extra / layer:>10.2f} {(r["after"] - r["before"]) / mb:>14.0f}M')
  if 'generator' in info:
    r = info['generator']
    print(f'generator: live device arrays after generate + stream + log_probs {r["live_device_bytes"] / mb:.0f} MB '
          f'(weights {r["weights_bytes"] / mb:.0f} MB); RssAnon growth {(r["after_calls"] - r["before"]) / mb:.0f} MB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
