"""GLM-130B's training objectives as pure sample builders (glm130b.md §3.4). numpy only; randomness comes from an
explicit `np.random.Generator`, so a sample is a function of (tokens, generator state).

The layouts themselves (tokens, targets, position ids, attention mask, loss mask) come from `glm_jax.layouts`;
this module decides *what* is masked.

[MASK] (`mask_sample`): span corruption of a window of n source tokens, built to fit `max_len` (a quarter of the
  sequence). Span lengths are drawn one after another from Poisson(poisson_lambda) clipped to >= 1 (mean 3.05 for
  lambda 3). A sample with k spans is n + 2k tokens long (Part A n - masked + k, Part B masked + k), so after the
  k-th draw n = max_len - 2k (or fewer if fewer tokens are left); drawing stops at the first k whose spans cover
  mask_ratio * n, and the last span is dropped again when that brings the covered fraction closer to mask_ratio
  (without this the overshoot of the last span biases the fraction upwards by ~1.5 points at max_len 128). The
  spans are placed uniformly at random, not overlapping and with at least one unmasked token between two spans
  (so no two [MASK] tokens are adjacent). Part B holds the spans in a random order. Two rarer variants, as GLM-130B's
  preprocessing draws them (2% each by default, independently, in this order): a short sample (`short_seq_prob`)
  whose length is drawn uniformly from [min(32, max_len - 1), max_len) before the spans are drawn, and a single span
  (`single_span_prob`) of one Poisson(poisson_lambda) length, clipped to [1, n - 1], instead of 15% coverage.
[gMASK] (`gmask_sample`): a window of seq_len - 2 source tokens (so the sample is exactly seq_len long); the masked
  tail has a length drawn uniformly from [ceil(min_gmask_ratio * n), n - 1], so at least 20% is masked by default
  and at least one context token is kept. Targets end with <eop>.
MIP (`instruction_sample`): an instruction record laid out as a [MASK] blank at the end of its input: Part A =
  inputs + [MASK], Part B = <sop> + target, targets = target + <eop>, the whole Part B at the [MASK]'s position.
  This is the blank-infilling format the [MASK] samples use (§3.4 puts MIP in the same 4-per-sequence packing as
  [MASK]), and exactly the layout GLM-130B's evaluation gives a multiple-choice or generation prompt with a
  trailing blank (§7.2, §7.3, `use_task_mask: false`), so instruction training and zero-shot evaluation agree.
Packing (`pack_sequence`): quarter-length samples side by side in one sequence; each attends only within itself and
  its position ids restart at 0 (`layouts.pack_samples`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from glm_jax.layouts import Layout, SpecialIds, gmask_training_sample_layout, pack_samples, training_sample_layout

__all__ = [
    'mask_sample',
    'draw_span_lengths',
    'place_spans',
    'gmask_sample',
    'instruction_sample',
    'pack_sequence',
    'MIN_SAMPLE_LEN',
]

MIN_SAMPLE_LEN = 8  # shortest quarter-length window accepted


def draw_span_lengths(max_len: int, available: int, rng: np.random.Generator, *, mask_ratio: float = 0.15,
                      poisson_lambda: float = 3.0) -> tuple[list[int], int]:
  """Span lengths for one [MASK] sample and the number n of source tokens it uses (see the module docstring).

  Guarantees sum(lengths) + len(lengths) - 1 <= n (the spans fit with gaps) and n + 2 * len(lengths) <= max_len.
  """
  if available < 1:
    raise ValueError('no source tokens left for a [MASK] sample')
  if max_len < 3:
    raise ValueError(f'max_len {max_len} is too short for a [MASK] sample')

  def n_for(k):
    return min(max_len - 2 * k, available)

  lengths: list[int] = []
  total = 0
  while True:
    length = max(1, int(rng.poisson(poisson_lambda)))
    lengths.append(length)
    total += length
    k = len(lengths)
    n = n_for(k)
    if n <= k or total >= mask_ratio * n:  # covered, or no room for another span
      break
  if k > 1:
    n_prev = n_for(k - 1)
    if abs((total - length) / n_prev - mask_ratio) < abs(total / max(n, 1) - mask_ratio):
      lengths.pop()
      total -= length
  while lengths and (n_for(len(lengths)) < 1 or sum(lengths) + len(lengths) - 1 > n_for(len(lengths))):
    excess = sum(lengths) + len(lengths) - 1 - n_for(len(lengths))
    if lengths[-1] > excess >= 0 and n_for(len(lengths)) >= 1:
      lengths[-1] -= excess
    else:
      lengths.pop()
  if not lengths:  # only for tiny windows: one single-token span
    lengths = [1]
  return lengths, n_for(len(lengths))


def place_spans(n: int, lengths: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int]]:
  """(start, end) of each span in [0, n), uniformly among placements with >= 1 free token between spans."""
  k = len(lengths)
  free = n - sum(lengths) - (k - 1)
  if free < 0:
    raise ValueError(f'spans {list(lengths)} do not fit in {n} tokens')
  offsets = np.sort(rng.integers(0, free + 1, size=k))  # stars and bars: the free tokens before each span
  spans, used = [], 0  # used: tokens taken by earlier spans and their mandatory one-token gaps
  for offset, length in zip(offsets.tolist(), lengths):
    start = offset + used
    spans.append((start, start + length))
    used += length + 1
  return spans


def mask_sample(tokens: Sequence[int], seq_len_quarter: int, rng: np.random.Generator, special_ids: SpecialIds, *,
                mask_ratio: float = 0.15, poisson_lambda: float = 3.0, short_seq_prob: float = 0.0,
                single_span_prob: float = 0.0) -> tuple[Layout, int]:
  """One [MASK] span-corruption sample of at most `seq_len_quarter` tokens from the start of `tokens`.

  Returns (layout, n): the sample ([s] arrays, s <= seq_len_quarter) and how many source tokens it used
  (tokens[:n]); the next sample starts at tokens[n:].
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  max_len = seq_len_quarter
  if short_seq_prob and rng.random() < short_seq_prob and max_len > 3:
    max_len = int(rng.integers(max(3, min(32, max_len - 1)), max_len))
  if single_span_prob and rng.random() < single_span_prob:
    if tokens.size < 1:
      raise ValueError('no source tokens left for a [MASK] sample')
    n = min(max_len - 2, int(tokens.size))  # one span: Part A n - length + 1, Part B length + 1
    lengths = [int(min(max(1, rng.poisson(poisson_lambda)), max(1, n - 1)))]
  else:
    lengths, n = draw_span_lengths(max_len, int(tokens.size), rng, mask_ratio=mask_ratio,
                                   poisson_lambda=poisson_lambda)
  spans = place_spans(n, lengths, rng)
  source = tokens[:n]
  part_a: list[int] = []
  blanks: list[tuple[int, np.ndarray]] = []
  prev = 0
  for start, end in spans:
    part_a.extend(source[prev:start].tolist())
    blanks.append((len(part_a), source[start:end]))
    part_a.append(special_ids.mask)
    prev = end
  part_a.extend(source[prev:].tolist())
  order = rng.permutation(len(blanks))
  layout = training_sample_layout(part_a, [blanks[i] for i in order], special_ids)
  return layout, n


def gmask_sample(tokens: Sequence[int], seq_len: int, rng: np.random.Generator, special_ids: SpecialIds, *,
                 min_gmask_ratio: float = 0.2) -> Layout:
  """One [gMASK] sample of exactly `seq_len` tokens from the first seq_len - 2 of `tokens` (padded if fewer)."""
  tokens = np.asarray(tokens, dtype=np.int32)[:seq_len - 2]
  n = int(tokens.size)
  if n < 2:
    raise ValueError(f'a [gMASK] sample needs at least 2 source tokens, got {n}')
  low = min(max(1, math.ceil(min_gmask_ratio * n)), n - 1)
  masked = int(rng.integers(low, n))  # in [low, n - 1]: at least one context token
  layout = gmask_training_sample_layout(tokens[:n - masked], tokens[n - masked:], special_ids)
  if layout.tokens.size < seq_len:
    layout = pack_samples([layout], seq_len, pad_id=special_ids.pad)
  return layout


def instruction_sample(inputs: Sequence[int], targets: Sequence[int], max_len: int,
                       special_ids: SpecialIds) -> Layout:
  """A MIP sample: inputs + [MASK] | <sop> + targets, targets + <eop>, at most `max_len` tokens.

  Too long: the target keeps at most max(half the room, what the input leaves); the input keeps its *end* (the
  prompts put the question last).
  """
  inputs = [int(t) for t in inputs]
  targets = [int(t) for t in targets]
  room = max_len - 2  # [MASK] and <sop>
  if room < 1:
    raise ValueError(f'max_len {max_len} is too short for an instruction sample')
  if len(inputs) + len(targets) > room:
    targets = targets[:max(room // 2, room - len(inputs))]
    keep = room - len(targets)
    inputs = inputs[len(inputs) - keep:] if keep > 0 else []
  return training_sample_layout(inputs + [special_ids.mask], [(len(inputs), targets)], special_ids)


def pack_sequence(samples: Sequence[Layout], seq_len: int, special_ids: SpecialIds) -> Layout:
  """Pack quarter-length samples into one `seq_len` sequence (block-diagonal attention, positions restart)."""
  return pack_samples(samples, seq_len, pad_id=special_ids.pad)
