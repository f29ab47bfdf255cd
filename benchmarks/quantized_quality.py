"""Held-out quality of a trained model with its layer matrices quantized (quantize/): INT8 and INT4, per output row
(GLM-130B's format) and in groups, as ratios to the float model.

The run's own held-out split (the training run directory's config and tokenizer, glm_jax.data.pipeline's held-out
windows, exactly what training reports) is scored with the float weights and with each quantized format, quantized
from the same checkpoint; printed: loss (nats per loss token), perplexity, bits per byte, and perplexity as a ratio to
float. A group size that does not divide a matrix's input columns is reported as not applicable (the tiny config's
GeGLU width 682 divides by no power of two above 2; at width 768 every group size up to 256 applies).

The tiny config at GeGLU width 768, 3000 steps with the longer-run recipe of configs/tiny.py (23 minutes on the 2-core
CPU machines; held-out 2.5896 bits per byte): float 1.0000, int8 1.0000, int4 1.0039, int4-g128 1.0035, int4-g64 1.0021.

    python launch/train.py --config configs/tiny.py --workdir runs/tiny-ffn768 --config.model.inner_hidden_size=768 \
        --config.run.steps=3000 --config.train.decay_steps=3000 --config.train.learning_rate=5e-4 \
        --config.train.warmup_steps=100
    python benchmarks/quantized_quality.py --checkpoint runs/tiny-ffn768 --formats int8,int4,int4-g128,int4-g64
"""

from __future__ import annotations

import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True, help='a training run directory (its config, tokenizer and corpus)')
  p.add_argument('--formats', default='int8,int4,int4-g128,int4-g64', help='quantized formats (default: %(default)s)')
  args = p.parse_args(argv)
  sys.path.insert(0, REPO)
  import jax
  import numpy as np

  from glm_jax import GLM, load_model, weights
  from glm_jax.data.corpus import load_corpus
  from glm_jax.data.pipeline import heldout_batches
  from glm_jax.generation.api import load_tokenizer_and_config
  from glm_jax.model import GLMConfig, weight_specs
  from glm_jax.train.loop import evaluate_heldout
  from glm_jax.train.step import token_cross_entropy

  tokenizer, config = load_tokenizer_and_config(args.checkpoint)
  params, config = load_model(args.checkpoint)
  params = jax.tree.map(np.asarray, params)
  corpus = load_corpus(list(config.data.corpus_paths), tokenizer, heldout_fraction=config.data.heldout_fraction,
                       strip_gutenberg=config.data.strip_gutenberg)
  specs = weight_specs(GLMConfig.make(config.model))
  print(f'== quantized_quality: {args.checkpoint}, {corpus.num_heldout_bytes:,} held-out bytes ==')

  def score(fmt, stored):
    model = GLM(config.model, weight_format=fmt)

    @jax.jit
    def eval_fn(p, batch):
      logits = model.apply({'params': p}, batch['tokens'], batch['position_ids'], batch['attention_mask'])
      mask = batch['loss_mask'].astype(np.float32)
      return (mask * token_cross_entropy(logits, batch['targets'])).sum(), mask.sum()
    return evaluate_heldout(eval_fn, stored, heldout_batches(corpus, tokenizer, config.train.seq_len,
                                                             config.run.eval_batch_size))

  base = score('in_out', params)
  rows = [('float32', base, None)]
  for fmt in [f for f in args.formats.split(',') if f]:
    try:
      stored = weights.convert_params(params, specs, fmt)
    except ValueError as e:
      rows.append((fmt, None, str(e)))
      continue
    rows.append((fmt, score(fmt, stored), None))
  print(f'\n{"format":10} {"loss":>8} {"perplexity":>11} {"bits/byte":>10} {"ppl / float":>12}')
  for fmt, r, why in rows:
    if r is None:
      print(f'{fmt:10} not applicable: {why}')
      continue
    ppl = math.exp(r['heldout_loss'])
    ratio = ppl / math.exp(base['heldout_loss'])
    print(f'{fmt:10} {r["heldout_loss"]:8.4f} {ppl:11.2f} {r["heldout_bpb"]:10.4f} {ratio:12.4f}')


if __name__ == '__main__':
  main()
