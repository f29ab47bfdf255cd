"""Pre-training corpora: find text files, read them, split off a held-out tail, tokenize.

Files
  A path is a file or a folder; folders are searched recursively for ``*.txt`` and ``*.jsonl`` (sorted, so the
  order, and with it every token offset, is reproducible). A file named explicitly is read whatever its suffix:
  as JSON Lines if it ends in ``.jsonl``, otherwise as plain text.

Reading
  UTF-8 with or without a BOM (the BOM is dropped); CRLF and lone CR become LF. Bytes that are not UTF-8 raise
  ValueError naming the file. A ``.txt`` file is one document. A ``.jsonl`` file is one document per line: a JSON
  object whose ``"text"`` field is a string (blank lines are skipped; anything else raises ValueError with the
  line number). With ``strip_gutenberg`` (default), a text holding Project Gutenberg's ``*** START OF`` and
  ``*** END OF`` marker lines keeps only what lies between them: the licence boilerplate after the END marker
  (about 350 lines in each shared/data/gutenberg_en file) would otherwise be all of that file's held-out tail.

Held-out split (evaluation loss and bits per byte; never trained on)
  Each file's documents are laid end to end (n characters in all). The held-out part is the last
  ``ceil(fraction * n)`` characters (fraction 0.01 by default), with the cut moved to the nearest line boundary
  (just after a ``\\n``, or a document boundary); only a file with no such boundary at all is cut mid-line. The
  document holding the cut is split in two there. Everything before the cut is training text, everything after it
  is held out: the two never share a token.

Tokens
  Training: one stream per file, each training document's tokens followed by ``eos`` (the tokenizer's ``eos`` id:
  ``</s>`` = 20002 in the icetk layout), and the files' streams concatenated in file order into
  ``Corpus.train_tokens`` (int32). Training windows are cut from that stream, so a window can cross a document (or
  file) boundary, which the ``eos`` marks. We use ``eos`` rather than ``eod`` because GLM's data code ends every
  document with ``eos``; GLM-130B's own pipeline is not public.
  Held-out: one ``HeldoutDocument`` per held-out piece, with its text, its UTF-8 byte count (of the text after the
  BOM and CRLF clean-up above) and its tokens (no ``eos``: bits per byte scores the text's own tokens, as G130's
  Pile evaluation does).

Nothing is cached on disk: tokenizing the ~14 MB of shared/data takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    'Corpus',
    'HeldoutDocument',
    'find_corpus_files',
    'read_text',
    'read_documents',
    'split_heldout',
    'load_corpus',
    'normalize_paths',
]

TEXT_SUFFIXES = ('.txt', '.jsonl')

_GUTENBERG_START = re.compile(r'^\*\*\* ?START OF [^\n]*$', re.MULTILINE)
_GUTENBERG_END = re.compile(r'^\*\*\* ?END OF [^\n]*$', re.MULTILINE)


@dataclasses.dataclass(frozen=True, eq=False)
class HeldoutDocument:
  path: Path  # the corpus file it comes from
  text: str  # the held-out text (LF line ends, no BOM)
  tokens: np.ndarray  # int32 [n], no eos

  @property
  def num_bytes(self) -> int:
    """UTF-8 bytes of `text`: the denominator of bits per byte."""
    return len(self.text.encode('utf-8'))


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  files: tuple[Path, ...]
  train_tokens: np.ndarray  # int32 [T]: every file's training documents, each followed by eos, in file order
  file_offsets: np.ndarray  # int64 [len(files) + 1]: file i is train_tokens[file_offsets[i]:file_offsets[i + 1]]
  heldout: tuple[HeldoutDocument, ...]
  heldout_fraction: float

  @property
  def num_heldout_bytes(self) -> int:
    return sum(d.num_bytes for d in self.heldout)

  @property
  def num_heldout_tokens(self) -> int:
    return sum(int(d.tokens.size) for d in self.heldout)


def normalize_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
  """A path, a comma-separated string of paths, or a sequence of paths -> list of Paths."""
  if isinstance(paths, (str, os.PathLike)):
    parts = [p.strip() for p in str(paths).split(',')] if isinstance(paths, str) else [paths]
  else:
    parts = list(paths)
  out = [Path(p).expanduser() for p in parts if str(p).strip()]
  if not out:
    raise ValueError('no corpus paths given')
  return out


def find_corpus_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
  """The text files under `paths` (see the module docstring). Raises ValueError for a missing path or no files."""
  files: list[Path] = []
  for p in normalize_paths(paths):
    if p.is_file():
      files.append(p)
    elif p.is_dir():
      found = sorted(f for f in p.rglob('*') if f.is_file() and f.suffix in TEXT_SUFFIXES)
      if not found:
        raise ValueError(f'no .txt or .jsonl files under {p}')
      files.extend(found)
    elif p.exists():
      raise ValueError(f'corpus path is neither a file nor a folder: {p}')
    else:
      raise ValueError(f'corpus path not found: {p}')
  seen, unique = set(), []
  for f in files:
    key = f.resolve()
    if key not in seen:
      seen.add(key)
      unique.append(f)
  return unique


def read_text(path: str | os.PathLike) -> str:
  """A file's text: UTF-8 with or without BOM, CRLF / CR -> LF. ValueError (naming the path) when unreadable."""
  path = Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise ValueError(f'cannot read {path}: {e.strerror or e}') from None
  try:
    text = raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 (byte {e.start}: {e.reason})') from None
  return text.replace('\r\n', '\n').replace('\r', '\n')


def strip_gutenberg_boilerplate(text: str) -> str:
  """The text between Project Gutenberg's START and END marker lines, or `text` unchanged if it has no pair."""
  start = _GUTENBERG_START.search(text)
  if start is None:
    return text
  end = _GUTENBERG_END.search(text, start.end())
  if end is None:
    return text
  return text[start.end():end.start()].strip('\n') + '\n'


def read_documents(path: str | os.PathLike, *, strip_gutenberg: bool = True,
                   jsonl_fields: Sequence[str] = ('text',)) -> list[str]:
  """The documents of one corpus file (empty documents dropped). A .jsonl line gives one document per field of
  `jsonl_fields` it holds as a string (at least one; tokenizer training also takes instruction records'
  inputs_pretokenized and targets_pretokenized)."""
  path = Path(path)
  text = read_text(path)
  if path.suffix != '.jsonl':
    if strip_gutenberg:
      text = strip_gutenberg_boilerplate(text)
    return [text] if text else []
  docs = []
  for lineno, line in enumerate(text.split('\n'), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
    values = [record.get(k) for k in jsonl_fields] if isinstance(record, dict) else []
    values = [v for v in values if isinstance(v, str)]
    if not values:
      fields = ' or '.join(f'"{k}"' for k in jsonl_fields)
      raise ValueError(f'{path}:{lineno}: expected a JSON object with a string {fields} field')
    docs.extend(v.replace('\r\n', '\n').replace('\r', '\n') for v in values if v)
  return docs


def split_heldout(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
  """(training documents, held-out documents): the held-out part is the last `fraction` of the characters.

  See the module docstring for where exactly the cut falls. Empty pieces are dropped.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'heldout_fraction must be in [0, 1), got {fraction}')
  docs = [d for d in documents if d]
  total = sum(len(d) for d in docs)
  if fraction == 0.0 or total == 0:
    return docs, []
  cut = total - math.ceil(fraction * total)
  starts = np.cumsum([0] + [len(d) for d in docs])
  k = int(np.searchsorted(starts, cut, side='right')) - 1  # the document holding character `cut`
  k = min(k, len(docs) - 1)
  local = cut - int(starts[k])
  doc = docs[k]
  if local != 0:  # find the nearest line boundary in global coordinates
    back = doc.rfind('\n', 0, local)
    back = int(starts[k]) + back + 1 if back >= 0 else int(starts[k])
    fwd = doc.find('\n', local)
    fwd = int(starts[k]) + fwd + 1 if fwd >= 0 else int(starts[k + 1])
    candidates = [b for b in (back, fwd) if 0 < b < total]
    if candidates:
      cut = min(candidates, key=lambda b: (abs(b - cut), b))
    k = min(int(np.searchsorted(starts, cut, side='right')) - 1, len(docs) - 1)
    local = cut - int(starts[k])
  train = docs[:k] + ([docs[k][:local]] if local else [])
  heldout = [docs[k][local:]] + docs[k + 1:]
  return [d for d in train if d], [d for d in heldout if d]


def load_corpus(paths, tokenizer, *, heldout_fraction: float = 0.01, strip_gutenberg: bool = True) -> Corpus:
  """Find, read, split and tokenize a corpus (module docstring). `tokenizer`: a GLMTokenizer (encode, eos_id)."""
  files = find_corpus_files(paths)
  eos = int(tokenizer.eos_id)
  streams, heldout = [], []
  for path in files:
    train_docs, heldout_docs = split_heldout(read_documents(path, strip_gutenberg=strip_gutenberg), heldout_fraction)
    ids: list[int] = []
    for doc in train_docs:
      ids.extend(tokenizer.encode(doc))
      ids.append(eos)
    streams.append(np.asarray(ids, dtype=np.int32))
    for doc in heldout_docs:
      heldout.append(HeldoutDocument(path=path, text=doc, tokens=np.asarray(tokenizer.encode(doc), dtype=np.int32)))
  offsets = np.cumsum([0] + [s.size for s in streams]).astype(np.int64)
  train_tokens = np.concatenate(streams) if streams else np.zeros(0, np.int32)
  if train_tokens.size == 0:
    raise ValueError(f'no training text in {", ".join(str(p) for p in normalize_paths(paths))}')
  return Corpus(files=tuple(files), train_tokens=train_tokens, file_offsets=offsets, heldout=tuple(heldout),
                heldout_fraction=heldout_fraction)
