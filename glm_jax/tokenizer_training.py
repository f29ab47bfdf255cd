"""Train a SentencePiece tokenizer for :class:`glm_jax.tokenizer.GLMTokenizer`.

``train_tokenizer`` reads ``.txt`` and ``.jsonl`` files (directories are
searched recursively), feeds their lines to SentencePiece through an iterator
and writes ``<out>.model`` plus the ``<out>.json`` sidecar (see
``glm_jax/tokenizer.py`` for the id layouts and the file format).

Input handling: files are found and read by the pre-training corpus's reader
(``glm_jax.data.corpus``), so that a tokenizer and a training run see the same
text:

* UTF-8 with or without a BOM (the BOM is dropped); CRLF and lone CR become
  LF; a file that is not UTF-8 is an error naming it.  Project Gutenberg's
  licence text (outside its START / END marker lines) is dropped.
* ``.jsonl``: one JSON object per line; its ``"text"``,
  ``"inputs_pretokenized"`` and ``"targets_pretokenized"`` string fields are
  each a document.  A line that is no such object is an error naming the file
  and line.  Any other file given explicitly is read as text.
* SentencePiece trains on lines (newlines never reach it), and silently
  drops any sentence longer than ``max_sentence_length`` bytes.  Lines longer
  than that are therefore cut into chunks below the limit, at whitespace
  where possible, so no text is lost.  Blank lines are skipped.
* ``input_sentence_size`` caps how many sentences SentencePiece keeps (it
  samples that many at random from everything read), which bounds the
  training time on large corpora.

Layouts:

* ``compact``: identity normalization, no dummy prefix, whitespace kept,
  ``"\\n"`` as a user-defined piece (id 1), byte fallback (ids 2..257), no
  ``<s>``/``</s>``/``<pad>`` pieces.  ``decode(encode(s)) == s`` exactly.
* ``icetk``: a stand-in for GLM-130B's ``ice_text.model`` with the same
  conventions: SentencePiece defaults (``nmt_nfkc`` normalization, dummy
  prefix, whitespace collapsing), ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<pad>`` 3, ``<n>`` 4, no byte fallback; ids are shifted by 20000 by
  ``GLMTokenizer``.

``vocab_size`` is the number of SentencePiece pieces.  For the compact layout
the model's embedding rows are ``vocab_size + 10`` rounded up to
``vocab_multiple``; choose ``vocab_size = k * vocab_multiple - 10`` to avoid
padding rows.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sentencepiece as spm

from glm_jax.tokenizer import ICETK_MAX_PIECES, LAYOUTS, GLMTokenizer, sidecar_path

__all__ = [
  'TokenizerTrainingError',
  'TrainResult',
  'find_text_files',
  'iter_sentences',
  'split_long_line',
  'train_tokenizer',
  'MIN_VOCAB_SIZE',
  'MODEL_TYPES',
  'TEXT_SUFFIXES',
]

TEXT_SUFFIXES = ('.txt', '.jsonl')
MODEL_TYPES = ('bpe', 'unigram')
# <unk> + "\n" + 256 byte pieces + at least one more (compact); 4 meta + <n> + 1 (icetk).
MIN_VOCAB_SIZE = {'compact': 259, 'icetk': 6}
_JSONL_FIELDS = ('inputs_pretokenized', 'targets_pretokenized')


class TokenizerTrainingError(ValueError):
  """Bad training input or settings; the message is one line meant for users.

  ``arg`` names the ``train_tokenizer`` argument at fault (``'inputs'``, ``'vocab_size'``, ...) or is None.
  """

  def __init__(self, message: str, arg: str | None = None):
    super().__init__(message)
    self.arg = arg


@dataclasses.dataclass
class TrainResult:
  model_path: Path
  sidecar_path: Path
  tokenizer: GLMTokenizer
  num_files: int
  num_sentences: int
  num_bytes: int
  seconds: float


@dataclasses.dataclass
class _Stats:
  files: int = 0
  sentences: int = 0
  bytes: int = 0
  long_lines: int = 0


def find_text_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
  """The text files of the inputs, as the pre-training corpus finds them (glm_jax.data.corpus.find_corpus_files:
  folders searched recursively for *.txt and *.jsonl, sorted; explicit files whatever their suffix);
  TokenizerTrainingError for a missing path or a folder without text files."""
  from glm_jax.data.corpus import find_corpus_files
  if not inputs:
    raise TokenizerTrainingError('no input given', 'inputs')
  try:
    return find_corpus_files(inputs)
  except ValueError as e:
    raise TokenizerTrainingError(str(e), 'inputs') from None


def split_long_line(line: str, max_bytes: int) -> list[str]:
  """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes.

  Cuts fall after whitespace where possible, else between characters.  The
  pieces concatenate back to ``line``.
  """
  if len(line.encode('utf-8')) <= max_bytes:
    return [line]
  chunks: list[str] = []
  cur: list[str] = []
  cur_bytes = 0
  for word in re.findall(r'\S+\s*|\s+', line):
    wb = len(word.encode('utf-8'))
    if cur_bytes + wb <= max_bytes:
      cur.append(word)
      cur_bytes += wb
      continue
    if cur:
      chunks.append(''.join(cur))
      cur, cur_bytes = [], 0
    if wb <= max_bytes:
      cur, cur_bytes = [word], wb
      continue
    for ch in word:  # a single word longer than the limit
      cb = len(ch.encode('utf-8'))
      if cur_bytes + cb > max_bytes:
        chunks.append(''.join(cur))
        cur, cur_bytes = [], 0
      cur.append(ch)
      cur_bytes += cb
  if cur:
    chunks.append(''.join(cur))
  return chunks


def _iter_documents(path: Path) -> list[str]:
  """One file's documents, read as the pre-training corpus reads them (glm_jax.data.corpus.read_documents: UTF-8,
  CRLF -> LF, Gutenberg licence text stripped) with instruction records' fields as text too; a file that is not
  UTF-8 or a bad jsonl line is a TokenizerTrainingError naming the file and line."""
  from glm_jax.data.corpus import read_documents
  try:
    return read_documents(path, jsonl_fields=('text',) + _JSONL_FIELDS)
  except ValueError as e:
    raise TokenizerTrainingError(str(e), 'inputs') from None


def iter_sentences(
  files: Sequence[Path],
  max_sentence_length: int = 4192,
  progress: Callable[[str], None] | None = None,
  stats: _Stats | None = None,
  report_every: int = 200_000,
) -> Iterator[str]:
  """The training sentences: non-blank lines, long ones cut below ``max_sentence_length`` bytes."""
  stats = stats if stats is not None else _Stats()
  t0 = time.monotonic()
  next_report = report_every
  for k, path in enumerate(files, 1):
    if progress:
      progress(f'reading [{k}/{len(files)}] {path}')
    stats.files += 1
    for doc in _iter_documents(path):
      for line in doc.split('\n'):
        if not line.strip():
          continue
        chunks = split_long_line(line, max_sentence_length)
        if len(chunks) > 1:
          stats.long_lines += 1
        for chunk in chunks:
          stats.sentences += 1
          stats.bytes += len(chunk.encode('utf-8'))
          yield chunk
          if progress and stats.sentences >= next_report:
            next_report += report_every
            progress(
              f'  {stats.sentences:,} sentences, {stats.bytes / 1e6:.1f} MB, '
              f'{time.monotonic() - t0:.1f}s'
            )
  if progress:
    extra = []
    if stats.long_lines:
      extra.append(f'{stats.long_lines:,} over-long lines cut into chunks')
    progress(
      f'read {stats.sentences:,} sentences ({stats.bytes / 1e6:.1f} MB) from {stats.files} files '
      f'in {time.monotonic() - t0:.1f}s' + (f" ({'; '.join(extra)})" if extra else '')
    )


def _trainer_options(layout: str) -> dict:
  if layout == 'compact':
    return dict(
      normalization_rule_name='identity',
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      byte_fallback=True,
      user_defined_symbols=['\n'],
      unk_id=0,
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
    )
  return dict(  # icetk stand-in: SentencePiece defaults, ice_text.model's meta pieces
    normalization_rule_name='nmt_nfkc',
    add_dummy_prefix=True,
    remove_extra_whitespaces=True,
    byte_fallback=False,
    user_defined_symbols=['<n>'],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
  )


def _explain_sentencepiece_error(
  e: BaseException, vocab_size: int, character_coverage: float
) -> tuple[str, str | None]:
  """A one-line message (and the argument at fault) for a SentencePiece training error."""
  msg = str(e)
  m = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', msg)
  if m:
    return (
      f'vocab size {vocab_size} is too small: the characters kept by character coverage '
      f'{character_coverage} plus reserved pieces need {m.group(2)}; raise the vocab size '
      'or lower the character coverage',
      'vocab_size',
    )
  m = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', msg)
  if m:
    return (
      f'vocab size {vocab_size} is too large for this corpus; use at most {m.group(2)} or add text',
      'vocab_size',
    )
  lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
  return 'sentencepiece training failed: ' + (lines[0] if lines else type(e).__name__), None


def train_tokenizer(
  inputs: Sequence[str | os.PathLike],
  vocab_size: int,
  out_path: str | os.PathLike,
  layout: str = 'compact',
  model_type: str = 'bpe',
  *,
  character_coverage: float = 0.9995,
  input_sentence_size: int = 1_000_000,
  max_sentence_length: int = 4192,
  vocab_multiple: int = 128,
  num_threads: int | None = None,
  seed: int | None = None,
  progress: Callable[[str], None] | None = None,
  verbose: bool = False,
) -> TrainResult:
  """Train a SentencePiece model and save it as ``<out>.model`` + ``<out>.json``.

  Args:
    inputs: files and/or directories (searched recursively for .txt/.jsonl).
    vocab_size: number of SentencePiece pieces (embedding rows are reported
      by the returned tokenizer's ``vocab_size``).
    out_path: output prefix; ``.model`` is appended unless already there.
    layout: ``"compact"`` (exact round trip, byte fallback) or ``"icetk"``
      (a stand-in for GLM-130B's ice_text.model).
    model_type: ``"bpe"`` (fast) or ``"unigram"`` (what icetk used; slower).
    character_coverage: fraction of characters the pieces must cover
      (0.9995 suits Chinese; tiny vocabularies need less).
    input_sentence_size: at most this many sentences are sampled for
      training (0 = all).
    max_sentence_length: longer lines are cut into chunks (bytes).
    vocab_multiple: compact layout: round the embedding rows up to this.
    num_threads: SentencePiece threads (default: CPU count, at most 16).
    seed: seed SentencePiece's random generator (sentence sampling).
    progress: called with one-line progress messages.
    verbose: let SentencePiece print its own log.

  Raises TokenizerTrainingError (a ValueError) with a one-line message for
  bad inputs or settings.  Writes are atomic (temporary file + rename).
  """
  t0 = time.monotonic()
  if layout not in LAYOUTS:
    raise TokenizerTrainingError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}", 'layout')
  if model_type not in MODEL_TYPES:
    raise TokenizerTrainingError(
      f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}", 'model_type'
    )
  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE[layout]:
    raise TokenizerTrainingError(
      f'vocab size {vocab_size} is too small: the {layout} layout needs at least '
      f'{MIN_VOCAB_SIZE[layout]} pieces'
      + (' (<unk>, newline and 256 byte pieces are reserved)' if layout == 'compact' else ''),
      'vocab_size',
    )
  if layout == 'icetk' and vocab_size > ICETK_MAX_PIECES:
    raise TokenizerTrainingError(
      f'vocab size {vocab_size} is too large for the icetk layout (at most {ICETK_MAX_PIECES})', 'vocab_size'
    )
  if not 0.0 < character_coverage <= 1.0:
    raise TokenizerTrainingError(
      f'character coverage must be in (0, 1], got {character_coverage}', 'character_coverage'
    )
  if max_sentence_length < 16:
    raise TokenizerTrainingError(
      f'max sentence length must be at least 16, got {max_sentence_length}', 'max_sentence_length'
    )
  if vocab_multiple < 1:
    raise TokenizerTrainingError(f'vocab multiple must be at least 1, got {vocab_multiple}', 'vocab_multiple')
  if input_sentence_size < 0:
    raise TokenizerTrainingError(
      f'input sentence size must be >= 0, got {input_sentence_size}', 'input_sentence_size'
    )

  out = Path(out_path).expanduser()
  if out.is_dir():
    raise TokenizerTrainingError(f'output path is a directory, expected a file prefix: {out_path}', 'out_path')
  model_path = out if out.suffix == '.model' else Path(str(out) + '.model')

  files = find_text_files(inputs)
  stats = _Stats()
  sentences = iter_sentences(files, max_sentence_length, progress, stats)
  try:
    first = next(sentences)
  except StopIteration:
    raise TokenizerTrainingError(
      f'no text found in the inputs ({len(files)} files, all empty or blank): '
      + ', '.join(str(i) for i in inputs),
      'inputs',
    ) from None
  try:  # fail before training, not after it
    model_path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise TokenizerTrainingError(
      f'cannot create output directory {model_path.parent}: {e.strerror or e}', 'out_path'
    ) from None

  reader_errors: list[BaseException] = []

  def all_sentences() -> Iterator[str]:
    # SentencePiece turns an exception raised by the iterator into a RuntimeError; keep the original.
    try:
      yield first
      yield from sentences
    except BaseException as e:
      reader_errors.append(e)
      raise

  if seed is not None:
    spm.set_random_generator_seed(int(seed))
  threads = num_threads if num_threads else min(os.cpu_count() or 1, 16)
  proto = io.BytesIO()
  options = _trainer_options(layout)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=all_sentences(),
      model_writer=proto,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      max_sentence_length=max_sentence_length,
      num_threads=threads,
      minloglevel=0 if verbose else 2,
      **options,
    )
  except RuntimeError as e:
    if reader_errors:
      raise reader_errors[0] from None
    message, arg = _explain_sentencepiece_error(e, vocab_size, character_coverage)
    raise TokenizerTrainingError(message, arg) from None
  if progress:
    progress(f'trained {model_type} model with {vocab_size} pieces in {time.monotonic() - t0:.1f}s')

  tokenizer = GLMTokenizer(
    proto.getvalue(), layout=layout, vocab_multiple=vocab_multiple, name=str(model_path)
  )
  try:
    tokenizer.save(
      model_path,
      extra={
        'model_type': model_type,
        'character_coverage': character_coverage,
        'input_sentence_size': input_sentence_size,
        'num_training_sentences': stats.sentences,
        'inputs': [str(i) for i in inputs],
        'sentencepiece_version': spm.__version__,
      },
    )
  except OSError as e:
    raise TokenizerTrainingError(f'cannot write {model_path}: {e.strerror or e}', 'out_path') from None
  return TrainResult(
    model_path=model_path,
    sidecar_path=sidecar_path(model_path),
    tokenizer=tokenizer,
    num_files=stats.files,
    num_sentences=stats.sentences,
    num_bytes=stats.bytes,
    seconds=time.monotonic() - t0,
  )


def train_tokenizer_on_training_split(corpus_paths, vocab_size: int, out_path: str | os.PathLike, *,
                                      heldout_fraction: float, strip_gutenberg: bool = True,
                                      **kwargs) -> TrainResult:
  """`train_tokenizer` on a pre-training corpus's training split only: each file's documents as glm_jax.data.corpus
  reads them (Gutenberg licence text stripped), less the held-out tail load_corpus keeps for evaluation, so that
  bits per byte is measured on text the tokenizer never saw. kwargs: as train_tokenizer."""
  import tempfile

  from glm_jax.data.corpus import find_corpus_files, read_documents, split_heldout
  with tempfile.TemporaryDirectory(prefix='glm_jax_tokenizer_') as tmp:
    for i, path in enumerate(find_corpus_files(corpus_paths)):
      train_docs, _ = split_heldout(read_documents(path, strip_gutenberg=strip_gutenberg), heldout_fraction)
      (Path(tmp) / f'{i:05d}.txt').write_text('\n'.join(train_docs), encoding='utf-8')
    return train_tokenizer([tmp], vocab_size, out_path, **kwargs)
