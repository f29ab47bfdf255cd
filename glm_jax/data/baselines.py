"""Reference points for a run's held-out bits per byte: what counting tokens and general-purpose compressors reach on
the same held-out bytes. A model that does not beat them has learned little beyond token frequencies.

- unigram: the training tokens' frequencies (add-one counts over the vocabulary), the held-out tokens scored with
  them; bits per byte = total -log2 p over the held-out tokens / held-out UTF-8 bytes (the model's own denominator).
- bzip2 -9, xz -9e, gzip -9: 8 * compressed size / size of the held-out text, every held-out piece of every file
  joined with newlines (Python's bz2, lzma and zlib modules, the same algorithms and levels as the command-line tools).
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import numpy as np

from glm_jax.data.corpus import Corpus


def unigram_bits_per_byte(corpus: Corpus, vocab_size: int) -> float:
  counts = np.bincount(corpus.train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
  logp = np.log2(counts / counts.sum())
  bits = sum(-float(logp[d.tokens].sum()) for d in corpus.heldout)
  return bits / corpus.num_heldout_bytes


def heldout_baselines(corpus: Corpus, vocab_size: int) -> dict[str, float]:
  """{'unigram', 'bzip2 -9', 'xz -9e', 'gzip -9'}: bits per byte on the corpus's held-out text."""
  text = '\n'.join(d.text for d in corpus.heldout).encode('utf-8')
  bpb = {'unigram': unigram_bits_per_byte(corpus, vocab_size)}
  compressed = {'bzip2 -9': bz2.compress(text, 9), 'xz -9e': lzma.compress(text, preset=9 | lzma.PRESET_EXTREME),
                'gzip -9': zlib.compress(text, 9)}
  bpb.update({name: 8 * len(blob) / len(text) for name, blob in compressed.items()})
  return bpb
