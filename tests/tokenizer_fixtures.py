"""Tiny tokenizers for tests, trained on real text from the shared data folder.

``train_tiny_tokenizer(tmp_dir, layout)`` trains a BPE model on about 300 KB
of tiny Shakespeare plus about 300 KB (100k characters) of 红楼梦 and returns
the path of the ``.model`` file.  It takes well under a second.  Wrap it in a
session-scoped fixture (e.g. in conftest.py)::

    @pytest.fixture(scope="session")
    def compact_tokenizer_path(tmp_path_factory):
        return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), "compact")

The data folder is ``<repo>/../shared/data``; the environment variable
``GLM_JAX_DATA`` overrides it.  Tests are skipped when the data is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TINY_VOCAB_PIECES = 1994  # + 10 specials = 2004 -> 2048 rows with vocab_multiple=128
TINY_CHARACTER_COVERAGE = 0.98  # 0.9995 would need more pieces than 1994 for the Chinese text
EN_CHARS = 300_000
ZH_CHARS = 100_000  # ~300 KB of UTF-8


def data_dir() -> Path:
  env = os.environ.get('GLM_JAX_DATA')
  return Path(env) if env else Path(__file__).resolve().parents[2] / 'shared' / 'data'


def write_tiny_corpus(tmp_dir: Path) -> Path:
  """Write the training slices under ``tmp_dir/corpus`` (a .txt with LF, a .txt with CRLF, a .jsonl)."""
  data = data_dir()
  en_src = data / 'tinyshakespeare' / 'input.txt'
  zh_src = data / 'classics_zh' / '红楼梦.txt'
  for src in (en_src, zh_src):
    if not src.is_file():
      pytest.skip(f'training data not found: {src} (set GLM_JAX_DATA)')
  corpus = Path(tmp_dir) / 'corpus'
  (corpus / 'zh').mkdir(parents=True, exist_ok=True)
  en = en_src.read_text(encoding='utf-8')[:EN_CHARS]
  (corpus / 'en.txt').write_text(en, encoding='utf-8')
  # Keep the Chinese file's CRLF line endings (newline="" disables translation).
  with open(zh_src, encoding='utf-8', newline='') as f:
    zh = f.read(ZH_CHARS)
  with open(corpus / 'zh' / 'hongloumeng.txt', 'w', encoding='utf-8', newline='') as f:
    f.write(zh)
  # A few JSON lines so the .jsonl reader is exercised too.
  with open(corpus / 'zh' / 'extra.jsonl', 'w', encoding='utf-8') as f:
    for line in en.splitlines()[:50]:
      if line.strip():
        f.write(json.dumps({'text': line}) + '\n')
  return corpus


def train_tiny_tokenizer(tmp_dir: str | os.PathLike, layout: str = 'compact', model_type: str = 'bpe') -> Path:
  """Train a tiny tokenizer in ``tmp_dir`` and return its ``.model`` path."""
  from glm_jax.tokenizer_training import train_tokenizer

  tmp_dir = Path(tmp_dir)
  corpus = tmp_dir / 'corpus'
  if not corpus.is_dir():
    corpus = write_tiny_corpus(tmp_dir)
  result = train_tokenizer(
    [corpus],
    vocab_size=TINY_VOCAB_PIECES,
    out_path=tmp_dir / f'tiny_{layout}_{model_type}',
    layout=layout,
    model_type=model_type,
    character_coverage=TINY_CHARACTER_COVERAGE,
    num_threads=2,
    seed=1234,
  )
  return result.model_path
