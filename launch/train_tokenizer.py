#!/usr/bin/env python
"""Train a SentencePiece tokenizer for glm-jax.

Example (from the repository root):

  python launch/train_tokenizer.py \\
      --input ../shared/data/tinyshakespeare --input ../shared/data/classics_zh \\
      --vocab-size 8182 --out runs/tok/zh_en

writes runs/tok/zh_en.model and runs/tok/zh_en.json; load it with
glm_jax.tokenizer.GLMTokenizer.load('runs/tok/zh_en.model').
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
  import glm_jax  # noqa: F401
except ImportError:  # running from a checkout without the package installed
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm_jax.tokenizer_training import (  # noqa: E402
  MIN_VOCAB_SIZE,
  MODEL_TYPES,
  TokenizerTrainingError,
  train_tokenizer,
)

PROG = 'train_tokenizer.py'

DESCRIPTION = """\
Train a SentencePiece tokenizer on .txt / .jsonl files and save it as
OUT.model plus the OUT.json sidecar that glm_jax.tokenizer.GLMTokenizer.load
reads.

Input: files and directories (searched recursively for *.txt and *.jsonl).
Text is UTF-8 (a BOM is dropped, CRLF becomes LF); .jsonl lines give the
"text" field, or "inputs_pretokenized" and "targets_pretokenized".  Lines
longer than --max-sentence-length bytes are cut into chunks.

Layouts (token ids):
  compact  ids 0..N-1 are the N pieces (0 <unk>, 1 newline, 2..257 bytes),
           then [MASK] [gMASK] [sMASK] eod sop eop ENC dBLOCK eos pad at
           N..N+9; embedding rows = N+10 rounded up to --vocab-multiple.
           Text round-trips exactly (whitespace, newlines, any character).
  icetk    GLM-130B's id space: text ids = piece id + 20000, eos 20002,
           specials at 150000..150007, pad 0, 150528 rows.  Trains a
           stand-in for ice_text.model (NFKC, dummy prefix, whitespace
           collapsed, newlines become spaces, <unk> for unknown characters).
"""

EPILOG = """\
--vocab-size counts SentencePiece pieces (not specials).  Use
k*128-10 (e.g. 8182, 32758) for a compact vocabulary without padding rows.
Small vocabularies with Chinese text may need --character-coverage below
0.9995.  Exit status: 0 success, 2 bad arguments or input, 1 other errors.
"""


# train_tokenizer argument -> command-line flag, for error messages.
_FLAGS = {
  'inputs': '--input',
  'vocab_size': '--vocab-size',
  'out_path': '--out',
  'layout': '--layout',
  'model_type': '--model-type',
  'character_coverage': '--character-coverage',
  'input_sentence_size': '--input-sentence-size',
  'max_sentence_length': '--max-sentence-length',
  'vocab_multiple': '--vocab-multiple',
}


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, no usage dump
    sys.stderr.write(f'{self.prog}: error: {message} (see --help)\n')
    sys.exit(2)


def _positive_int(s: str) -> int:
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected an integer, got {s!r}') from None
  if v <= 0:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {v}')
  return v


def _nonneg_int(s: str) -> int:
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected an integer, got {s!r}') from None
  if v < 0:
    raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {v}')
  return v


def _coverage(s: str) -> float:
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {s!r}') from None
  if not 0.0 < v <= 1.0:
    raise argparse.ArgumentTypeError(f'expected a value in (0, 1], got {v}')
  return v


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog=PROG,
    description=DESCRIPTION,
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    '--input',
    action='append',
    required=True,
    metavar='PATH[,PATH...]',
    help='text file or directory; repeat the flag or separate paths with commas',
  )
  p.add_argument(
    '--vocab-size',
    type=_positive_int,
    required=True,
    metavar='N',
    help=f"number of SentencePiece pieces (compact: at least {MIN_VOCAB_SIZE['compact']}; "
    'icetk: at most 130000)',
  )
  p.add_argument(
    '--out',
    required=True,
    metavar='PATH',
    help='output prefix: writes PATH.model and PATH.json (a trailing .model is accepted)',
  )
  p.add_argument('--layout', choices=('compact', 'icetk'), default='compact', help='id layout (default: compact)')
  p.add_argument(
    '--model-type', choices=MODEL_TYPES, default='bpe', help='bpe (fast, default) or unigram (icetk used it)'
  )
  p.add_argument(
    '--character-coverage',
    type=_coverage,
    default=0.9995,
    metavar='F',
    help='fraction of characters that must be covered by pieces (default 0.9995, good for Chinese)',
  )
  p.add_argument(
    '--input-sentence-size',
    type=_nonneg_int,
    default=1_000_000,
    metavar='N',
    help='train on at most N sentences sampled at random from the input; 0 = all (default 1000000)',
  )
  p.add_argument(
    '--max-sentence-length',
    type=_positive_int,
    default=4192,
    metavar='BYTES',
    help='longer lines are cut into chunks of at most this many bytes (default 4192)',
  )
  p.add_argument(
    '--vocab-multiple',
    type=_positive_int,
    default=128,
    metavar='M',
    help='compact layout: round the embedding rows up to a multiple of M (default 128; 1 = none)',
  )
  p.add_argument('--num-threads', type=_positive_int, default=None, metavar='N', help='training threads')
  p.add_argument('--seed', type=int, default=None, help='random seed for sentence sampling')
  p.add_argument('--quiet', action='store_true', help='no progress messages')
  p.add_argument('--verbose', action='store_true', help="show SentencePiece's own log")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  inputs = [s.strip() for flag in args.input for s in flag.split(',') if s.strip()]
  if not inputs:
    sys.stderr.write(f'{PROG}: error: argument --input: no path given\n')
    return 2
  t0 = time.monotonic()

  def progress(msg: str) -> None:
    if not args.quiet:
      sys.stderr.write(f'[{time.monotonic() - t0:7.1f}s] {msg}\n')
      sys.stderr.flush()

  try:
    result = train_tokenizer(
      inputs,
      vocab_size=args.vocab_size,
      out_path=args.out,
      layout=args.layout,
      model_type=args.model_type,
      character_coverage=args.character_coverage,
      input_sentence_size=args.input_sentence_size,
      max_sentence_length=args.max_sentence_length,
      vocab_multiple=args.vocab_multiple,
      num_threads=args.num_threads,
      seed=args.seed,
      progress=progress,
      verbose=args.verbose,
    )
  except TokenizerTrainingError as e:
    flag = _FLAGS.get(e.arg)
    sys.stderr.write(f'{PROG}: error: ' + (f'argument {flag}: ' if flag else '') + f'{e}\n')
    return 2
  except KeyboardInterrupt:
    sys.stderr.write(f'{PROG}: interrupted\n')
    return 130
  except Exception as e:  # unexpected: still one line, but a different status
    sys.stderr.write(f'{PROG}: error: {type(e).__name__}: {e}\n')
    return 1
  tok = result.tokenizer
  print(
    f'wrote {result.model_path} and {result.sidecar_path}: layout={tok.layout}, '
    f'pieces={tok.num_pieces}, vocab_size={tok.vocab_size} (embedding rows), '
    f'specials={tok.special_ids}, {result.num_sentences:,} sentences from {result.num_files} files, '
    f'{result.seconds:.1f}s'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
