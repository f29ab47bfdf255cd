"""Batched scoring of evaluation layouts on a Generator's weights (the one decode-format copy).

Every multiple-choice example (glm130b.md §7.2, `layouts.multiple_choice_layout`) and language-modelling window
(§7.4, `layouts.lm_window_layouts`) is one sequence with some rows to read and their target tokens. Sequences are
sorted by length and packed into batches that share a padded length (`decode.bucket_length`: a few buckets, so few
compiles) and a row count, up to `max_batch_tokens` tokens a batch; one jit-compiled forward per batch returns the
log-probability of each target and whether it is the argmax (logits are computed at the read rows only). Padding:
token 0, position 0, rows that see only themselves and that no real row sees; padded read rows are dropped. On a
mesh (the Generator's), each batch is split over the data axes (padded to a multiple of them) and the weights are
the decoder's sharded ones.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import layouts, sharding
from glm_jax.generation.decode import bucket_length


@dataclasses.dataclass(frozen=True)
class Item:
  """One sequence to score: its layout, and the rows read with their target tokens."""
  layout: layouts.Layout
  rows: np.ndarray     # int32 [R]
  targets: np.ndarray  # int32 [R]


class Scorer:
  """Log-probabilities of target tokens, many sequences per compiled call (see module docstring)."""

  def __init__(self, generator, *, max_batch_tokens: int = 8192):
    self.generator = generator
    self.max_batch_tokens = max_batch_tokens
    decoder = generator.decoder
    self._model, self._mesh, self._rules = decoder.model, decoder.mesh, decoder.rules
    self._batch_multiple = 1 if self._mesh is None else sharding.batch_devices(self._mesh, self._rules)
    self._forward = jax.jit(self._logprobs)
    self.compiled_shapes: set = set()
    self.real_tokens = 0

  def _logprobs(self, params, tokens, positions, mask, rows, targets):
    logits = self._model.apply({'params': params}, tokens, positions, mask, logits_index=rows)  # [B, R, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets

  def score(self, items: Sequence[Item], progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item, (log-probabilities float32 [R], is-argmax bool [R]) of its targets at its rows, in input order."""
    max_len = self.generator.max_sequence_length
    for it in items:
      if it.layout.tokens.shape[0] > max_len:
        raise ValueError(f'a sequence of {it.layout.tokens.shape[0]} tokens is longer than the model\'s {max_len}')
    order = sorted(range(len(items)), key=lambda i: items[i].layout.tokens.shape[0])
    out: list = [None] * len(items)
    i = 0
    while i < len(order):
      p = min(bucket_length(items[order[i]].layout.tokens.shape[0]), max_len)
      batch = [order[i]]
      i += 1
      per_batch = max(1, self.max_batch_tokens // p)
      while i < len(order) and len(batch) < per_batch and \
          min(bucket_length(items[order[i]].layout.tokens.shape[0]), max_len) == p:
        batch.append(order[i])
        i += 1
      for j, result in zip(batch, self._run([items[j] for j in batch], p, per_batch)):
        out[j] = result
      if progress is not None:
        progress(len(batch))
    return out

  def _run(self, items, p, per_batch):
    b = 1 << (len(items) - 1).bit_length()  # batch sizes in powers of two: few compiled shapes
    b = min(b, 1 << (per_batch - 1).bit_length())
    b = -(-b // self._batch_multiple) * self._batch_multiple  # the data axes split the batch evenly
    r = 1 << (max(len(it.rows) for it in items) - 1).bit_length()
    two_d = items[0].layout.position_ids.ndim == 2
    tokens = np.zeros((b, p), np.int32)
    positions = np.zeros((b, 2, p) if two_d else (b, p), np.int32)
    mask = np.zeros((b, 1, p, p), bool)
    mask[:, 0, np.arange(p), np.arange(p)] = True  # padding rows see themselves; no real row sees padding
    rows = np.zeros((b, r), np.int32)
    targets = np.zeros((b, r), np.int32)
    for k, it in enumerate(items):
      s = it.layout.tokens.shape[0]
      tokens[k, :s] = it.layout.tokens
      positions[k, ..., :s] = it.layout.position_ids
      mask[k, 0, :s, :s] = it.layout.attention_mask
      rows[k, :len(it.rows)] = it.rows
      targets[k, :len(it.targets)] = it.targets
      self.real_tokens += s
    self.compiled_shapes.add((b, p, r))
    with sharding.activate(self._mesh, self._rules):
      args = [tokens, positions, mask, rows, targets]
      if self._mesh is not None:
        args = [jax.device_put(a, sharding.batch_sharding(self._mesh, self._rules, a.ndim)) for a in args]
      logp, greedy = self._forward(self.generator.weights, *args)
    logp, greedy = np.asarray(logp), np.asarray(greedy)
    return [(logp[k, :len(it.rows)], greedy[k, :len(it.rows)]) for k, it in enumerate(items)]


def choice_items(context_ids, choices_ids, special_ids, *, use_task_mask=False, use_multitask_encoding=False,
                 max_seq_length: int, position_encoding_2d: bool = False) -> tuple[Item, list[slice]]:
  """One multiple-choice example as an Item, and per choice the slice of its rows. The context is left-truncated so
  that the sequence (context, its mask, every choice's block) fits max_seq_length (glm130b.md §7.1)."""
  single = all(len(c) == 1 for c in choices_ids)
  blocks = 1 if single else sum(max(len(c), 1) for c in choices_ids)
  keep = max_seq_length - 1 - blocks
  if keep < 1:
    raise ValueError(f'the choices alone take {blocks} tokens, more than max_seq_length {max_seq_length} allows')
  context_ids = list(context_ids)[-keep:]
  lay = layouts.multiple_choice_layout(context_ids, choices_ids, special_ids, use_task_mask=use_task_mask,
                                       use_multitask_encoding=use_multitask_encoding,
                                       position_encoding_2d=position_encoding_2d)
  rows, targets, slices, start = [], [], [], 0
  for read, target in zip(lay.read_rows, lay.choice_targets):
    rows.append(read)
    targets.append(target)
    slices.append(slice(start, start + len(target)))
    start += len(target)
  return Item(lay.layout, np.concatenate(rows), np.concatenate(targets)), slices


def continuation_item(context_ids, target_ids, special_ids, *, use_task_mask: bool, unidirectional: bool = False,
                      max_seq_length: int, position_encoding_2d: bool = False) -> Item:
  """The target as the decoder would generate it after the context (§7.3, `layouts.generation_task_layout`): context
  + [mask, <sop>] + target[:-1] (unidirectional: [gMASK, <sop>] + context + target[:-1], causal), generated rows at
  the generation positions ([gMASK]: continuing after the mask; [MASK]: the mask's, which is also §7.2's option
  layout). The context is left-truncated so that the whole sequence fits max_seq_length."""
  target = [int(t) for t in target_ids]
  if not target:
    raise ValueError('an empty target')
  keep = max_seq_length - len(target) - 1
  if keep < 1:
    raise ValueError(f'a target of {len(target)} tokens leaves no room for a context in max_seq_length '
                     f'{max_seq_length}')
  context = list(context_ids)[-keep:]
  lay, target_positions = layouts.generation_task_layout(context, special_ids, max_gen_length=len(target) - 1,
                                                         use_task_mask=use_task_mask, unidirectional=unidirectional,
                                                         position_encoding_2d=position_encoding_2d)
  c = lay.tokens.shape[0]
  s = c + len(target) - 1
  mask = np.tril(np.ones((s, s), bool))
  mask[:c - 1, :c - 1] = lay.attention_mask[:c - 1, :c - 1]  # bidirectional context, or causal when unidirectional
  full = layouts.Layout(tokens=np.concatenate([lay.tokens, np.asarray(target[:-1], np.int32)]).astype(np.int32),
                        position_ids=np.concatenate([lay.position_ids, target_positions], axis=-1).astype(np.int32),
                        attention_mask=mask)
  return Item(full, np.arange(c - 1, s, dtype=np.int32), np.asarray(target, np.int32))


def window_items(token_ids, special_ids, *, max_seq_length: int, generation_length: int, use_task_mask: bool,
                 unidirectional: bool, position_encoding_2d: bool = False) -> list[Item]:
  """The perplexity windows of one document (§7.4) as Items reading their scored rows."""
  items = []
  for lay in layouts.lm_window_layouts(token_ids, special_ids, max_seq_length=max_seq_length,
                                       generation_length=generation_length, use_task_mask=use_task_mask,
                                       unidirectional=unidirectional, position_encoding_2d=position_encoding_2d):
    rows = np.flatnonzero(lay.loss_mask).astype(np.int32)
    items.append(Item(lay, rows, lay.targets[rows]))
  return items
