"""Train a SentencePiece tokenizer for glm-jax.

    python launch/train_tokenizer.py --input ../shared/data/tinyshakespeare --input ../shared/data/classics_zh \\
        --vocab-size 8182 --out runs/tok/zh_en

writes runs/tok/zh_en.model and runs/tok/zh_en.json; load it with glm_jax.tokenizer.GLMTokenizer.load.

Input: files and directories (searched recursively for *.txt and *.jsonl), --input repeated or comma-separated,
read as launch/train.py reads a corpus: UTF-8 (a BOM is dropped, CRLF becomes LF), Project Gutenberg's licence text
dropped; .jsonl lines give their "text", "inputs_pretokenized" and "targets_pretokenized" fields. Lines longer than
--max-sentence-length bytes are cut into chunks.

Layouts (token ids):
  compact  ids 0..N-1 are the N pieces (0 <unk>, 1 newline, 2..257 bytes), then [MASK] [gMASK] [sMASK] eod sop eop
           ENC dBLOCK eos pad at N..N+9; embedding rows = N+10 rounded up to --vocab-multiple. Text round-trips
           exactly (whitespace, newlines, any character).
  icetk    GLM-130B's id space: text ids = piece id + 20000, eos 20002, specials at 150000..150007, pad 0, 150528
           rows. Trains a stand-in for ice_text.model (NFKC, dummy prefix, whitespace collapsed, newlines become
           spaces, <unk> for unknown characters).

--vocab-size counts SentencePiece pieces (not specials): k*128-10 (e.g. 8182, 32758) gives a compact vocabulary
without padding rows. Small vocabularies with Chinese text may need --character-coverage below 0.9995.
Exit status: 0 success, 2 bad arguments or input (one line: train_tokenizer.py: error: ...), 1 other errors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402
from glm_jax.tokenizer_training import (MIN_VOCAB_SIZE, MODEL_TYPES, TokenizerTrainingError,  # noqa: E402
                                       train_tokenizer)

_INPUT = flags.DEFINE_multi_string('input', None, 'Text file or directory; repeat the flag or separate paths with '
                                   'commas.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab-size', None, 'Number of SentencePiece pieces (compact: at least '
                                   f"{MIN_VOCAB_SIZE['compact']}; icetk: at most 130000).", lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Output prefix: writes OUT.model and OUT.json (a trailing .model is '
                           'accepted).')
_LAYOUT = flags.DEFINE_enum('layout', 'compact', ['compact', 'icetk'], 'Id layout.')
_MODEL_TYPE = flags.DEFINE_enum('model-type', 'bpe', list(MODEL_TYPES), 'bpe (fast) or unigram (icetk used it).')
_COVERAGE = flags.DEFINE_float('character-coverage', 0.9995, 'Fraction of characters that must be covered by '
                               'pieces, in (0, 1] (0.9995 suits Chinese).')
_SENTENCES = flags.DEFINE_integer('input-sentence-size', 1_000_000, 'Train on at most this many sentences sampled '
                                  'at random from the input; 0 = all.', lower_bound=0)
_MAX_LENGTH = flags.DEFINE_integer('max-sentence-length', 4192, 'Longer lines are cut into chunks of at most this '
                                   'many bytes.', lower_bound=1)
_MULTIPLE = flags.DEFINE_integer('vocab-multiple', 128, 'Compact layout: round the embedding rows up to a multiple '
                                 'of this (1 = none).', lower_bound=1)
_THREADS = flags.DEFINE_integer('num-threads', None, 'Training threads (default: the CPU count, at most 16).',
                                lower_bound=1)
_SEED = flags.DEFINE_integer('seed', None, 'Random seed for sentence sampling.')
_QUIET = flags.DEFINE_bool('quiet', False, 'No progress messages.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show SentencePiece's own log.")

# train_tokenizer argument -> command-line flag, for error messages.
_FLAG_OF = {'inputs': '--input', 'vocab_size': '--vocab-size', 'out_path': '--out', 'layout': '--layout',
            'model_type': '--model-type', 'character_coverage': '--character-coverage',
            'input_sentence_size': '--input-sentence-size', 'max_sentence_length': '--max-sentence-length',
            'vocab_multiple': '--vocab-multiple'}


def main(argv) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  missing = [f'--{name}' for name, flag in (('input', _INPUT), ('vocab-size', _VOCAB_SIZE), ('out', _OUT))
             if not flag.value]
  if missing:
    raise cli.UsageError(f'required: {", ".join(missing)}')
  inputs = [s.strip() for value in _INPUT.value for s in value.split(',') if s.strip()]
  if not inputs:
    raise cli.UsageError('--input: no path given')
  if not 0.0 < _COVERAGE.value <= 1.0:
    raise cli.UsageError(f'--character-coverage must be in (0, 1], got {_COVERAGE.value}')
  t0 = time.monotonic()

  def progress(msg: str) -> None:
    if not _QUIET.value:
      sys.stderr.write(f'[{time.monotonic() - t0:7.1f}s] {msg}\n')
      sys.stderr.flush()

  try:
    result = train_tokenizer(inputs, vocab_size=_VOCAB_SIZE.value, out_path=_OUT.value, layout=_LAYOUT.value,
                             model_type=_MODEL_TYPE.value, character_coverage=_COVERAGE.value,
                             input_sentence_size=_SENTENCES.value, max_sentence_length=_MAX_LENGTH.value,
                             vocab_multiple=_MULTIPLE.value, num_threads=_THREADS.value, seed=_SEED.value,
                             progress=progress, verbose=_VERBOSE.value)
  except TokenizerTrainingError as e:
    flag = _FLAG_OF.get(e.arg)
    raise cli.UsageError((f'{flag}: ' if flag else '') + str(e)) from None
  except (KeyboardInterrupt, cli.UsageError):
    raise
  except Exception as e:  # noqa: BLE001 - unexpected: still one line, but status 1
    cli.error('train_tokenizer.py', f'{type(e).__name__}: {e}')
    return 1
  tok = result.tokenizer
  print(f'wrote {result.model_path} and {result.sidecar_path}: layout={tok.layout}, pieces={tok.num_pieces}, '
        f'vocab_size={tok.vocab_size} (embedding rows), specials={tok.special_ids}, '
        f'{result.num_sentences:,} sentences from {result.num_files} files, {result.seconds:.1f}s')
  return 0


if __name__ == '__main__':
  cli.run(main)
