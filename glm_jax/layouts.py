"""GLM's masking rules: tokens, position ids and attention masks for every GLM-130B layout (glm130b.md).

The single home of these rules; pure numpy (lists or arrays in, arrays out), no jax.

- §3.4 training samples: `training_sample_layout` ([MASK] spans), `gmask_training_sample_layout`, `pack_samples`.
- §5.1 generation (generate.py): `prepare_blank_filling`, `build_generation_input`, `generation_layout`,
  `splice_blank`.
- §7.2 multiple choice: `multiple_choice_layout`. §7.3 generation tasks: `generation_task_input`,
  `generation_task_layout`, `unidirectional_generation_layout`, `extend_for_generation`. §7.4 language modelling:
  `lm_window_layouts`. §7.1 / §10 item 17: `pad_batch`.

Conventions:
- attention_mask is bool with **True = may attend**. SAT's is the opposite (True = masked); invert only at the SAT
  boundary. Single samples give [s, s]; batches give [b, 1, s, s].
- "Part B" is <sop> plus every token after it that belongs to the same blank (teacher-forced or generated).
- position_ids are int32 [s] for 1-D RoPE (GLM-130B, the default): context tokens count 0, 1, 2, ...; Part B of a
  [MASK]/[sMASK] blank repeats the mask's position (§10 item 3); Part B of a [gMASK] blank continues counting.
  With position_encoding_2d=True they are [2, s], ChatGLM style: row 0 = the context's index, and for every Part-B
  token the position of its mask token ([gMASK] included); row 1 = block position, 0 over the context and
  1, 2, 3, ... over <sop> and the tokens after it. (G130 HEAD's own 2-D code is not self-consistent about the
  <sop> block position; this module always gives <sop> block position 1, as ChatGLM-6B does.)
- tokens / targets are int32, loss_mask is float32 (1.0 = scored).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of GLM's special tokens; `GLM130B_IDS` is the icetk layout (§4.1)."""
  mask: int
  gmask: int
  smask: int
  sop: int
  eop: int
  eos: int
  pad: int = 0  # evaluation pads with id 0 (§4.1, §10 item 17), not icetk's <pad> piece

  @classmethod
  def glm130b(cls) -> SpecialIds:
    return cls(mask=150000, gmask=150001, smask=150002, sop=150004, eop=150005, eos=20002, pad=0)

  @property
  def mask_ids(self) -> tuple[int, int, int]:
    return (self.mask, self.smask, self.gmask)


GLM130B_IDS = SpecialIds.glm130b()


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """One sample ([s] arrays) or a batch ([b, s] arrays, mask [b, 1, s, s]). Optional fields are None when unused."""
  tokens: np.ndarray  # int32 [s]
  position_ids: np.ndarray  # int32 [s], or [2, s] for 2-D positions
  attention_mask: np.ndarray  # bool [s, s], True = may attend
  targets: np.ndarray | None = None  # int32 [s]: the token each row predicts
  loss_mask: np.ndarray | None = None  # float32 [s]: 1.0 where the row is scored
  segment_ids: np.ndarray | None = None  # int32 [s]: set by pack_samples only (1, 2, ... per sample, 0 = padding)


@dataclasses.dataclass(frozen=True, eq=False)
class ChoiceLayout:
  """A multiple-choice sample (§7.2). Score of choice i = sum(log_softmax(logits)[read_rows[i], choice_targets[i]])."""
  layout: Layout
  read_rows: list[np.ndarray]  # per choice, int32 [len(c)]: rows whose logits predict the choice's tokens
  choice_targets: list[np.ndarray]  # per choice, int32 [len(c)]
  single_token: bool  # all choices read at the one <sop> row


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces.


def _i32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.int32)


def _prefix_lm_mask(s: int, num_bidirectional: int) -> np.ndarray:
  """[s, s] causal mask whose first `num_bidirectional` rows and columns are fully visible to each other.

  Every GLM layout with a single Part B is this: context bidirectional, Part B causal and seeing all the context.
  """
  mask = np.tril(np.ones((s, s), dtype=bool))
  mask[:num_bidirectional, :num_bidirectional] = True
  return mask


def _context_positions(n: int, two_d: bool) -> np.ndarray:
  pos = np.arange(n)
  return np.stack([pos, np.zeros(n, dtype=pos.dtype)]) if two_d else pos


def _part_b_positions(n: int, mask_position: int, start: int | None, two_d: bool) -> np.ndarray:
  """Positions of <sop> and the n-1 tokens after it.

  1-D: `start is None` ([MASK]/[sMASK]) repeats mask_position; otherwise ([gMASK]) counts start, start+1, ....
  2-D: row 0 is mask_position throughout and row 1 counts 1..n, whatever the mask type.
  """
  if two_d:
    return np.stack([np.full(n, mask_position), np.arange(1, n + 1)])
  return np.full(n, mask_position) if start is None else np.arange(start, start + n)


def _concat_positions(*parts: np.ndarray) -> np.ndarray:
  return _i32(np.concatenate(parts, axis=-1))


# ---------------------------------------------------------------------------------------------------------------
# §5.1 generation (generate.py: fill_blanks, get_masks_and_position_ids).


@dataclasses.dataclass(frozen=True)
class BlankFilling:
  seq: list[int]  # context token ids after §5.1 steps 3-4
  generation_mask: int  # id of the mask kind whose blanks get filled, first one first
  use_gmask: bool  # True only when the text has neither [MASK] nor [sMASK]


def prepare_blank_filling(ids: Sequence[int], special_ids: SpecialIds, *,
                          ends_with_mask: bool | None = None) -> BlankFilling:
  """§5.1 steps 1-4 on token ids.

  `ids` is the text already tokenised the generate.py way: the raw text split at the mask strings, each text segment
  tokenised separately, the mask ids inserted between them (step 2).
  Step 4 tests whether the *raw text* ends with "MASK]"; by default that is read as "the last id is a mask id", which
  differs only when text after the last mask tokenises to nothing (e.g. trailing spaces): pass `ends_with_mask`
  from the raw text to be exact.
  """
  seq = [int(t) for t in ids]
  sid = special_ids
  if sid.mask in seq:
    generation_mask = sid.mask
  elif sid.smask in seq:
    generation_mask = sid.smask
  else:
    generation_mask = sid.gmask
  use_gmask = sid.mask not in seq and sid.smask not in seq
  if not any(m in seq for m in sid.mask_ids):  # step 3: no blank at all -> generate a continuation
    seq.append(sid.gmask)
    ends_with_mask = True  # the echoed raw text gets " [gMASK]" appended
  if ends_with_mask is None:
    ends_with_mask = bool(seq) and seq[-1] in sid.mask_ids
  if not ends_with_mask:  # step 4: "A [MASK] B" -> A [MASK] B </s>; "prompt [gMASK]" gets no eos
    seq.append(sid.eos)
  return BlankFilling(seq=seq, generation_mask=generation_mask, use_gmask=use_gmask)


def generation_layout(seq: Sequence[int], mask_position: int, max_gen_length: int, *, use_gmask: bool,
                      position_encoding_2d: bool = False) -> Layout:
  """§5.1 step 7, G130 `get_masks_and_position_ids`: the whole [C + max_gen_length] layout for one blank.

  `seq` is the context and already ends with <sop>; C = len(seq). tokens are padded with -1 (not yet generated).
  Mask: lower-triangular, with columns [0, C-1) visible to every row, so the context before <sop> (mask tokens and
  trailing eos included) is bidirectional and <sop> plus generated tokens are causal (§10 item 9).
  Positions: arange; unless use_gmask, positions [C-1:] (<sop> and every generated token) are mask_position.
  """
  c = len(seq)
  s = c + max_gen_length
  tokens = np.concatenate([_i32(seq), np.full(max_gen_length, -1, dtype=np.int32)])
  position_ids = _concat_positions(
      _context_positions(c - 1, position_encoding_2d),
      _part_b_positions(max_gen_length + 1, mask_position, None if not use_gmask else c - 1, position_encoding_2d))
  return Layout(tokens=tokens, position_ids=position_ids, attention_mask=_prefix_lm_mask(s, c - 1))


def build_generation_input(seq: Sequence[int], special_ids: SpecialIds, *, generation_mask: int, use_gmask: bool,
                           max_gen_length: int, position_encoding_2d: bool = False) -> tuple[Layout, int]:
  """§5.1 step 6-7 for the next blank: the first `generation_mask` in seq; input = seq + [<sop>].

  Returns (layout, mask_position). generate.py passes max_gen_length = out_seq_length - (len(seq) + 1).
  Raises ValueError when no blank is left (the fill loop's exit condition: `generation_mask in seq`).
  """
  seq = [int(t) for t in seq]
  mask_position = seq.index(generation_mask)
  layout = generation_layout(seq + [special_ids.sop], mask_position, max_gen_length, use_gmask=use_gmask,
                             position_encoding_2d=position_encoding_2d)
  return layout, mask_position


def splice_blank(seq: Sequence[int], mask_position: int, generated: Sequence[int]) -> list[int]:
  """§5.1 step 6: put the generated tokens (end token already dropped) in place of the mask token at mask_position.

  `seq` is the context without <sop>; generate.py's `output[:mask_position] + generated +
  output[mask_position + 1 : sop_index]` is this with the old <sop> and everything after it dropped.
  """
  return list(seq[:mask_position]) + list(generated) + list(seq[mask_position + 1:])


# ---------------------------------------------------------------------------------------------------------------
# §7.3 generation tasks (ModelForEvaluation.build_generation_sample, generate_text).


def generation_task_input(text: Sequence[int], special_ids: SpecialIds, *, use_task_mask: bool = False,
                          unidirectional: bool = False) -> tuple[list[int], int]:
  """§7.3's decoder input: (context ending with <sop>, mask position).

  - bidirectional, no blank: text + [mask, <sop>] ([gMASK] with use_task_mask), mask position len(text).
  - a blank already in text ([MASK] only): text + [<sop>], mask position = its index.
  - unidirectional (needs [gMASK] and no blank): [gMASK, <sop>] + text, mask position 0.
  """
  sid = special_ids
  mask_id = sid.gmask if use_task_mask else sid.mask
  text = [int(t) for t in text]
  blank_filling = mask_id in text
  if unidirectional:
    if not use_task_mask or blank_filling:
      raise ValueError('unidirectional generation needs use_task_mask and no blank in the text')
    return [mask_id, sid.sop] + text, 0
  if blank_filling:
    if use_task_mask:
      raise ValueError('blank filling only supports [MASK]')
    return text + [sid.sop], text.index(mask_id)
  return text + [mask_id, sid.sop], len(text)


def generation_task_layout(text: Sequence[int], special_ids: SpecialIds, *, max_gen_length: int,
                           use_task_mask: bool = False, unidirectional: bool = False,
                           position_encoding_2d: bool = False) -> tuple[Layout, np.ndarray]:
  """§7.3: the context layout [C] of a generation sample (tokens: `generation_task_input`) and the positions [G] of
  the tokens to generate. Bidirectional: everything before <sop> bidirectional; unidirectional: fully causal.
  1-D positions: arange; for [MASK], <sop> and all targets sit at mask_position; for [gMASK] they continue.
  Returns (layout with tokens/position_ids/attention_mask, target_position_ids int32 [G] or [2, G]);
  C = layout.tokens.shape[0]. `extend_for_generation` builds the full decode-time layout from these.
  """
  tokens, mask_position = generation_task_input(text, special_ids, use_task_mask=use_task_mask,
                                                unidirectional=unidirectional)
  c = len(tokens)
  if unidirectional:
    full = unidirectional_generation_layout(tokens, max_gen_length, position_encoding_2d=position_encoding_2d)
    return (Layout(tokens=full.tokens[:c], position_ids=full.position_ids[..., :c],
                   attention_mask=full.attention_mask[:c, :c]), full.position_ids[..., c:])
  positions = _concat_positions(
      _context_positions(c - 1, position_encoding_2d),
      _part_b_positions(1 + max_gen_length, mask_position, c - 1 if use_task_mask else None, position_encoding_2d))
  layout = Layout(tokens=_i32(tokens), position_ids=positions[..., :c], attention_mask=_prefix_lm_mask(c, c - 1))
  return layout, positions[..., c:]


def unidirectional_generation_layout(seq: Sequence[int], max_gen_length: int, *,
                                    position_encoding_2d: bool = False) -> Layout:
  """§7.3 unidirectional generation: the whole [C + max_gen_length] layout, `seq` = [gMASK, <sop>] + text (C tokens),
  tokens padded with -1 (not yet generated). Fully causal. [gMASK] at 0 is the whole context; <sop>, the text and
  the generated tokens are Part B, counting from 1 (1-D: arange)."""
  c = len(seq)
  s = c + max_gen_length
  tokens = np.concatenate([_i32(seq), np.full(max_gen_length, -1, dtype=np.int32)])
  positions = _concat_positions(_context_positions(1, position_encoding_2d),
                                _part_b_positions(s - 1, 0, 1, position_encoding_2d))
  return Layout(tokens=tokens, position_ids=positions, attention_mask=_prefix_lm_mask(s, 0))


def extend_for_generation(batch: Layout, context_lengths: np.ndarray, target_position_ids: np.ndarray) -> Layout:
  """G130 `generate_text`'s get_masks_and_position_ids: append G generation slots after the (padded) context.

  batch: tokens [b, L], position_ids [b, L] or [b, 2, L], attention_mask [b, 1, L, L] (from `pad_batch`);
  context_lengths [b]; target_position_ids [b, G] or [b, 2, G]. Returns [b, L+G] tokens (-1 in the new slots),
  positions and [b, 1, L+G, L+G] mask. New tokens go after the padded length L (§10 item 17). A generated row sees
  exactly what its sample's <sop> row (context_length - 1) sees, plus the generated tokens causally; context rows do
  not see generated columns (they are never recomputed).
  """
  b, ell = batch.tokens.shape
  n_gen = target_position_ids.shape[-1]
  context_lengths = np.asarray(context_lengths)
  tokens = np.concatenate([_i32(batch.tokens), np.full((b, n_gen), -1, dtype=np.int32)], axis=1)
  position_ids = _concat_positions(batch.position_ids, target_position_ids)
  mask = batch.attention_mask[:, 0]  # [b, L, L]
  sop_rows = mask[np.arange(b), context_lengths - 1]  # [b, L]
  gen_rows = np.concatenate([np.repeat(sop_rows[:, None, :], n_gen, axis=1),  # [b, G, L]
                             np.broadcast_to(np.tril(np.ones((n_gen, n_gen), dtype=bool)), (b, n_gen, n_gen))],
                            axis=2)
  ctx_rows = np.concatenate([mask, np.zeros((b, ell, n_gen), dtype=bool)], axis=2)
  full = np.concatenate([ctx_rows, gen_rows], axis=1)[:, None]  # [b, 1, L+G, L+G]
  return Layout(tokens=tokens, position_ids=position_ids, attention_mask=full)


# ---------------------------------------------------------------------------------------------------------------
# §7.2 multiple choice (ModelForEvaluation.build_multiple_choice_sample).


def multiple_choice_layout(context: Sequence[int], choices: Sequence[Sequence[int]], special_ids: SpecialIds, *,
                           use_task_mask: bool = False, use_multitask_encoding: bool = False,
                           single_token: bool | None = None, position_encoding_2d: bool = False) -> ChoiceLayout:
  """§7.2: one sequence holding the context and every choice; options are scored by summed log-probs.

  - context: if it has no mask ([gMASK] when use_task_mask, else [MASK]) one is appended, mask_position = len(text);
    otherwise the existing [MASK] is the blank. division = len(context tokens).
  - per choice c (an empty choice becomes [<eop>]): tokens [<sop>] + c[:-1], read at rows len(tokens_before) +
    arange(len(c)) against targets c. Each choice is a causal block that sees the whole context and no other choice;
    context rows see no choice (always bidirectional; `unidirectional` is ignored for mul, §10 item 10).
  - 1-D positions of a choice: [MASK] repeats mask_position; with use_multitask_encoding (no blank) or [gMASK]
    they are mask_position + arange(len(c)). NB for [gMASK] mask_position = len(text) = division - 1, i.e. <sop>
    shares the [gMASK] token's position: this follows G130's code (evaluation/model.py); glm130b.md §7.2 says
    division + arange, which the code does not do.
  - single_token (default: every choice has exactly one token): only one <sop> is appended and every choice is read
    at that row. G130 decides this per dataset (False as soon as any item has a multi-token choice): pass
    single_token=False to reproduce that.
  """
  sid = special_ids
  mask_id = sid.gmask if use_task_mask else sid.mask
  text = [int(t) for t in context]
  choices = [[int(t) for t in c] if len(c) else [sid.eop] for c in choices]
  if single_token is None:
    single_token = all(len(c) == 1 for c in choices)
  elif single_token and not all(len(c) == 1 for c in choices):
    raise ValueError('single_token needs every choice to be exactly one token')
  blank_filling = mask_id in text
  if blank_filling:
    if use_task_mask or use_multitask_encoding:
      raise ValueError('blank filling supports neither [gMASK] nor multitask encoding')
    mask_position = text.index(mask_id)
    tokens = text
  else:
    mask_position = len(text)
    tokens = text + [mask_id]
  division = len(tokens)
  counting = use_task_mask or use_multitask_encoding
  positions = [_context_positions(division, position_encoding_2d)]
  blocks = [np.ones((division, division), dtype=bool)]
  read_rows = []
  for c in choices[:1] if single_token else choices:
    read_rows.append(_i32(np.arange(len(tokens), len(tokens) + len(c))))
    positions.append(_part_b_positions(len(c), mask_position, mask_position if counting else None,
                                       position_encoding_2d))
    blocks.append(np.tril(np.ones((len(c), len(c)), dtype=bool)))
    tokens = tokens + [sid.sop] + c[:-1]
  if single_token:
    read_rows = read_rows * len(choices)
  choice_targets = [_i32(c) for c in choices]
  s = len(tokens)
  mask = np.zeros((s, s), dtype=bool)
  start = 0
  for block in blocks:  # block-diagonal: context block, then one causal block per choice
    n = block.shape[0]
    mask[start:start + n, start:start + n] = block
    start += n
  mask[division:, :division] = True  # every choice row sees the whole context
  layout = Layout(tokens=_i32(tokens), position_ids=_concat_positions(*positions), attention_mask=mask)
  return ChoiceLayout(layout=layout, read_rows=read_rows, choice_targets=choice_targets, single_token=single_token)


# ---------------------------------------------------------------------------------------------------------------
# §7.4 language modelling windows (LanguageModelTaskDataset).


def lm_window_layouts(token_ids: Sequence[int], special_ids: SpecialIds, *, max_seq_length: int,
                      generation_length: int, use_task_mask: bool = False, unidirectional: bool = False,
                      position_encoding_2d: bool = False) -> list[Layout]:
  """§7.4: the perplexity windows over one tokenised document.

  Window i covers token_ids[i*g : i*g + max_seq_length - 1] (g = generation_length). Window 0 (and every window
  when unidirectional) has no prompt and scores all its tokens; a later window uses its first
  max_seq_length - 1 - g tokens as the prompt and scores the rest, so the scored spans tile the document without
  overlap (with unidirectional they overlap, as in G130). Number of windows:
  max(ceil(max(N - (max_seq_length - 1), 0) / g) + 1, 1).
  Sample: tokens prompt + [mask, <sop>] + text[:-1]; targets prompt + [mask] + text; 1-D positions 0..s-1 even for
  [MASK]; mask causal except the bidirectional (prompt + mask) block; loss on the text rows only.
  (G130 HEAD's 2-D variant scores only the last min(len(text), g) rows of each window; this follows the spec.)
  """
  sid = special_ids
  mask_id = sid.gmask if use_task_mask else sid.mask
  ids = [int(t) for t in token_ids]
  if not ids:
    raise ValueError('empty document')
  num_windows = max(math.ceil(max(len(ids) - (max_seq_length - 1), 0) / generation_length) + 1, 1)
  layouts = []
  for i in range(num_windows):
    window = ids[i * generation_length:i * generation_length + max_seq_length - 1]
    if i == 0 or unidirectional:
      prompt, text = [], window
    else:
      prompt_length = max_seq_length - 1 - generation_length
      prompt, text = window[:prompt_length], window[prompt_length:]
    n_ctx = len(prompt) + 1  # prompt + [mask]
    s = n_ctx + len(text)
    positions = _concat_positions(_context_positions(n_ctx, position_encoding_2d),
                                  _part_b_positions(len(text), len(prompt), n_ctx, position_encoding_2d))
    layouts.append(Layout(
        tokens=_i32(prompt + [mask_id, sid.sop] + text[:-1]),
        position_ids=positions,
        attention_mask=_prefix_lm_mask(s, n_ctx),
        targets=_i32(prompt + [mask_id] + text),
        loss_mask=np.concatenate([np.zeros(n_ctx), np.ones(len(text))]).astype(np.float32)))
  return layouts


# ---------------------------------------------------------------------------------------------------------------
# §3.4 training samples.


def training_sample_layout(part_a: Sequence[int], spans: Sequence[tuple[int, Sequence[int]]],
                           special_ids: SpecialIds, *, position_encoding_2d: bool = False) -> Layout:
  """§3.4 [MASK]/[sMASK] blank infilling, GLM `blocklm_utils` layout. Deterministic: the caller permutes spans.

  part_a: the corrupted text, each span already replaced by one mask token. spans: (index of its mask token in
  part_a, span token ids), in the order to emit them. Part B, per span: inputs [<sop>] + span, targets span + [<eop>].
  1-D positions: part A 0..A-1; every Part-B token of a span (<sop> included) takes its mask's position.
  Mask: part A bidirectional (sees only part A); Part B causal over all of Part B (later spans see earlier ones)
  and sees all of part A. Loss on Part B only; targets over part A are the part-A tokens (unscored).
  """
  return _blank_infilling_layout(part_a, spans, special_ids, continue_positions=False,
                                 position_encoding_2d=position_encoding_2d)


def gmask_training_sample_layout(context: Sequence[int], target: Sequence[int], special_ids: SpecialIds, *,
                                 position_encoding_2d: bool = False) -> Layout:
  """§3.4 [gMASK]: tokens context + [gMASK, <sop>] + target, targets context + [gMASK] + target + [<eop>].

  (GLM writes target[:-1] / target with target already ending in <eop>; here `target` excludes the <eop>.)
  1-D positions 0..s-1; (context + [gMASK]) bidirectional, the rest causal; loss on the len(target) + 1 rows that
  predict target + [<eop>].
  """
  context = [int(t) for t in context]
  return _blank_infilling_layout(context + [special_ids.gmask], [(len(context), target)], special_ids,
                                 continue_positions=True, position_encoding_2d=position_encoding_2d)


def _blank_infilling_layout(part_a, spans, special_ids, *, continue_positions, position_encoding_2d):
  sid = special_ids
  part_a = [int(t) for t in part_a]
  n_a = len(part_a)
  tokens, targets = list(part_a), list(part_a)
  positions = [_context_positions(n_a, position_encoding_2d)]
  for mask_position, span in spans:
    if part_a[mask_position] not in sid.mask_ids:
      raise ValueError(f'part_a[{mask_position}] = {part_a[mask_position]} is not a mask token')
    span = [int(t) for t in span]
    start = len(tokens) if continue_positions else None
    positions.append(_part_b_positions(len(span) + 1, mask_position, start, position_encoding_2d))
    tokens += [sid.sop] + span
    targets += span + [sid.eop]
  s = len(tokens)
  return Layout(tokens=_i32(tokens), position_ids=_concat_positions(*positions),
                attention_mask=_prefix_lm_mask(s, n_a), targets=_i32(targets),
                loss_mask=np.concatenate([np.zeros(n_a), np.ones(s - n_a)]).astype(np.float32))


def pack_samples(samples: Sequence[Layout], seq_len: int, pad_id: int = 0) -> Layout:
  """Concatenate short training samples into one [seq_len] sequence.

  The mask is block-diagonal (a sample attends only within itself, with its own mask); position ids restart in each
  sample (they are the samples' own). Padding: tokens/targets pad_id, position 0, loss 0, segment id 0, and a padding
  row attends to itself only, so that no row is fully masked (a fully masked row is NaN under a -inf fill) while no
  real row sees padding. segment_ids are 1, 2, ... per sample.
  """
  total = sum(x.tokens.shape[-1] for x in samples)
  if total > seq_len:
    raise ValueError(f'samples hold {total} tokens > seq_len {seq_len}')
  two_d = bool(samples) and samples[0].position_ids.ndim == 2
  tokens = np.full(seq_len, pad_id, dtype=np.int32)
  targets = np.full(seq_len, pad_id, dtype=np.int32)
  position_ids = np.zeros((2, seq_len) if two_d else seq_len, dtype=np.int32)
  loss_mask = np.zeros(seq_len, dtype=np.float32)
  segment_ids = np.zeros(seq_len, dtype=np.int32)
  mask = np.zeros((seq_len, seq_len), dtype=bool)
  start = 0
  for i, x in enumerate(samples):
    n = x.tokens.shape[-1]
    sl = slice(start, start + n)
    tokens[sl] = x.tokens
    targets[sl] = x.targets if x.targets is not None else pad_id
    position_ids[..., sl] = x.position_ids
    loss_mask[sl] = x.loss_mask if x.loss_mask is not None else 0.0
    segment_ids[sl] = i + 1
    mask[sl, sl] = x.attention_mask
    start += n
  pad = np.arange(start, seq_len)
  mask[pad, pad] = True
  return Layout(tokens=tokens, position_ids=position_ids, attention_mask=mask, targets=targets, loss_mask=loss_mask,
                segment_ids=segment_ids)


# ---------------------------------------------------------------------------------------------------------------
# §7.1 / §10 item 17 evaluation batching (evaluation/dataset.py pad_batch + collate_fn).


def pad_batch(layouts: Sequence[Layout], *, pad_to_multiple: int = 32, length: int | None = None, pad_id: int = 0,
              pad_rows_attend_self: bool = False) -> Layout:
  """Right-pad samples to a common length and stack them: tokens [b, L], positions [b, L] / [b, 2, L],
  mask [b, 1, L, L], targets / loss_mask [b, L] when every sample has them.

  L = `length` if given, else the longest sample rounded up to a multiple of pad_to_multiple. Padding is token
  pad_id (0), position 0, mask False on padding rows and columns, target pad_id, loss 0, as G130. Padding rows are
  then fully masked: SAT's -10000 fill makes them uniform, not NaN; pass pad_rows_attend_self=True to let each
  padding row see itself instead (real rows are unaffected either way).
  """
  longest = max(x.tokens.shape[-1] for x in layouts)
  ell = length if length is not None else -(-longest // pad_to_multiple) * pad_to_multiple
  if ell < longest:
    raise ValueError(f'length {ell} < longest sample {longest}')
  tokens, positions, masks, targets, losses = [], [], [], [], []
  for x in layouts:
    n = x.tokens.shape[-1]
    extra = ell - n
    tokens.append(np.pad(_i32(x.tokens), (0, extra), constant_values=pad_id))
    pos = _i32(x.position_ids)
    positions.append(np.pad(pos, [(0, 0)] * (pos.ndim - 1) + [(0, extra)]))
    mask = np.pad(x.attention_mask.astype(bool), ((0, extra), (0, extra)))
    if pad_rows_attend_self:
      mask[np.arange(n, ell), np.arange(n, ell)] = True
    masks.append(mask)
    if x.targets is not None:
      targets.append(np.pad(_i32(x.targets), (0, extra), constant_values=pad_id))
    if x.loss_mask is not None:
      losses.append(np.pad(x.loss_mask.astype(np.float32), (0, extra)))
  b = len(layouts)
  return Layout(tokens=np.stack(tokens), position_ids=np.stack(positions), attention_mask=np.stack(masks)[:, None],
                targets=np.stack(targets) if len(targets) == b else None,
                loss_mask=np.stack(losses) if len(losses) == b else None)
