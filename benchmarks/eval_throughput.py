"""Multiple-choice scoring throughput (eval/scoring.py) against the plain forward pass, in one run.

On real task files (MMLU dev and FewCLUE EPRSTMT dev, as launch/prepare_eval_data.py writes them) and the `small`
config (fp32, random weights, the vocabulary of --tokenizer): every example's sequence is scored by the batched
scorer (sorted by length, padded to length buckets, up to --batch-tokens a call); its throughput counts the
non-padding tokens only. The reference is the plain forward (`model.apply`, logits at every position) on batches of
the same shape as the scorer's most used one, counting every token. Ratio = scorer / forward; target (issue 14): at
least 70%.

    python launch/prepare_eval_data.py --source ../shared/data --out eval_data
    python benchmarks/eval_throughput.py --data eval_data --tokenizer runs/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import cpu_threads  # benchmarks/, first on sys.path when the script runs; imports nothing that starts threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ('mmlu/**/dev.jsonl', 'fewclue_eprstmt/**/dev.jsonl')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', required=True, help='the prepared evaluation data folder')
  p.add_argument('--tokenizer', required=True, help='a GLMTokenizer .model file')
  p.add_argument('--batch-tokens', type=int, default=8192)
  p.add_argument('--examples', type=int, default=64,
                 help='examples per dataset, spread evenly over its files (0: all; all of MMLU dev takes about '
                      'half an hour a pass on 2 cores)')
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args(argv)
  notes = cpu_threads.limit_threads(len(os.sched_getaffinity(0)))
  sys.path.insert(0, REPO)
  from pathlib import Path

  import jax
  import numpy as np

  import common
  from eval.scoring import Scorer, choice_items
  from glm_jax.generation import blanks
  from glm_jax.generation.api import Generator
  from glm_jax.tokenizer import GLMTokenizer

  common.print_header('eval_throughput: multiple-choice scoring vs the plain forward, small config, fp32', notes)
  tok = GLMTokenizer.load(args.tokenizer)
  config, _ = common.fp32_config('small')
  config.model.vocab_size = tok.vocab_size
  from glm_jax import GLM, init_params
  params = jax.tree.map(np.asarray, init_params(GLM(config.model), config.model, jax.random.key(0)))
  gen = Generator(params, config, tok)
  sid = blanks.special_ids(tok)
  items = []
  for pattern in FILES:
    rows = [json.loads(line) for path in sorted(Path(args.data).glob(pattern)) for line in open(path, encoding='utf-8')]
    if args.examples and len(rows) > args.examples:
      rows = [rows[i] for i in np.linspace(0, len(rows) - 1, args.examples).round().astype(int)]
    for row in rows:
      choices = [tok.encode(c) for c in row['choices_pretokenized']]
      item, _ = choice_items(tok.encode(row['inputs_pretokenized']), choices, sid,
                             max_seq_length=gen.max_sequence_length)
      items.append(item)
  if not items:
    sys.exit(f'no examples under {args.data} for {FILES}: run launch/prepare_eval_data.py first')
  scorer = Scorer(gen, max_batch_tokens=args.batch_tokens)
  scorer.score(items)  # compiles every shape
  real = sum(it.layout.tokens.shape[0] for it in items)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    scorer.score(items)
    times.append(time.perf_counter() - t0)
  scorer_tps = real / float(np.median(times))
  # the forward reference at the scorer's largest-token shape
  b, pad, _ = max(scorer.compiled_shapes, key=lambda s: s[0] * s[1])
  model = gen.decoder.model
  forward = jax.jit(lambda w, t, q, m: model.apply({'params': w}, t, q, m))
  tokens = np.random.default_rng(0).integers(0, tok.vocab_size, (b, pad)).astype(np.int32)
  positions = np.broadcast_to(np.arange(pad, dtype=np.int32), (b, pad)).copy()
  mask = np.broadcast_to(np.tril(np.ones((pad, pad), bool)), (b, 1, pad, pad)).copy()
  jax.block_until_ready(forward(gen.weights, tokens, positions, mask))
  ftimes = []
  for _ in range(args.repeats * 3):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(gen.weights, tokens, positions, mask))
    ftimes.append(time.perf_counter() - t0)
  forward_tps = b * pad / float(np.median(ftimes))
  print(f'{len(items)} examples, {real:,} tokens (non-padding); scorer shapes (batch, length, rows): '
        f'{sorted(scorer.compiled_shapes)}')
  print(f'scorer: {scorer_tps:,.0f} non-padding tokens/s; plain forward at {b} x {pad}: {forward_tps:,.0f} tokens/s')
  ratio = scorer_tps / forward_tps
  print(f'ratio {ratio:.1%} (target >= 70%: {"yes" if ratio >= 0.7 else "NO"})')


if __name__ == '__main__':
  main()
