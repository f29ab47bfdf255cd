"""Metrics and their aggregation (glm130b.md §7.1, §7.3).

- Accuracy: the share of examples whose highest-scoring option is the label.
- EM / F1: SQuAD's normalisation (lowercase; punctuation, including CJK punctuation, removed; the articles a, an,
  the removed; whitespace collapsed), the best over the targets. F1 counts tokens: whitespace-separated words, and
  each CJK character as a word of its own (Chinese has no spaces).
- PPL: exp(min(20, nats / words)), words = whitespace-separated words of the raw text (§7.4); BPB: nats / UTF-8
  bytes / ln 2.

Aggregation over a group of files (prompt variants): the best prompt (GLM-130B's `calc_group_metrics` takes the max;
for PPL and BPB, where lower is better, the min), the median, and the average weighted by file size.
"""

from __future__ import annotations

import collections
import math
import re
import statistics
import string
import unicodedata

_ARTICLES = re.compile(r'\b(a|an|the)\b')


def is_punctuation(ch: str) -> bool:
  return ch in string.punctuation or unicodedata.category(ch).startswith('P')


def _is_cjk(ch: str) -> bool:
  return '\u4e00' <= ch <= '\u9fff' or '\u3400' <= ch <= '\u4dbf' or '\uf900' <= ch <= '\ufaff'


def normalize_answer(text: str) -> str:
  text = ''.join(ch for ch in text.lower() if not is_punctuation(ch))
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def answer_tokens(text: str) -> list[str]:
  """Words of a normalised answer, every CJK character a word of its own."""
  out = []
  for word in normalize_answer(text).split():
    piece = ''
    for ch in word:
      if _is_cjk(ch):
        if piece:
          out.append(piece)
          piece = ''
        out.append(ch)
      else:
        piece += ch
    if piece:
      out.append(piece)
  return out


def exact_match(prediction: str, targets) -> float:
  return float(max(normalize_answer(prediction) == normalize_answer(t) for t in targets))


def f1_score(prediction: str, targets) -> float:
  def one(target):
    pred, gold = answer_tokens(prediction), answer_tokens(target)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
      return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
  return max(one(t) for t in targets)


def perplexity(nats: float, words: int) -> float:
  return math.exp(min(20.0, nats / max(words, 1)))


def bits_per_byte(nats: float, num_bytes: int) -> float:
  return nats / max(num_bytes, 1) / math.log(2)


LOWER_IS_BETTER = ('PPL', 'BPB')


def aggregate(per_file: list[dict]) -> dict:
  """per_file: [{'file', 'examples', 'metrics': {name: value}}] of one group -> {name: {'best', 'median',
  'average'}}, the average weighted by examples."""
  out = {}
  total = sum(f['examples'] for f in per_file)
  for name in per_file[0]['metrics']:
    values = [f['metrics'][name] for f in per_file]
    best = min(values) if name in LOWER_IS_BETTER else max(values)
    out[name] = {'best': best, 'median': statistics.median(values),
                 'average': sum(f['metrics'][name] * f['examples'] for f in per_file) / max(total, 1)}
  return out
