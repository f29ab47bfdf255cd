"""Text in, text out: GLM-130B's `fill_blanks` (glm130b.md §5.1), batched over prompts.

    result = fill_blanks(functools.partial(decoder.generate, params), tokenizer, 'Paris is the [MASK] of France.',
                         out_seq_length=256, min_gen_length=0, strategy=GREEDY, seed=1234,
                         max_sequence_length=config.model.max_sequence_length)
    result.text      # the whole filled text;  result.blanks: each blank's generated text

Per prompt, exactly as G130's generate.py (§5.1 steps 1-6, §10 item 9):
1. the mask kind to fill: [MASK] if the text has one, else [sMASK], else [gMASK]; use_gmask (positions continue
   after the blank instead of repeating its position) only when the text has neither [MASK] nor [sMASK];
2. the raw text is split at `\\[[sg]?MASK\\]`, each text segment is tokenised on its own (`encode_with_masks`) and the
   mask ids go between them;
3. a text with no mask at all gets [gMASK] appended (and " [gMASK]" on the echoed text, `FillResult.input_text`);
4. eos is appended unless the raw text (after step 3) ends with "MASK]", a plain string test on the raw text;
5. prompts too long are rejected: ValueError "prompt is N tokens, longer than the maximum M", where
   M = min(out_seq_length, max_sequence_length) - 2 (the prompt, <sop> and at least one generated token must fit;
   G130 only checks N <= max_sequence_length and then fills blanks with nothing). An empty (or all-whitespace)
   prompt is a ValueError too;
6. while the sequence still holds a mask of the chosen kind: take the first one, decode from `seq + [<sop>]` with
   max_gen_length = out_seq_length - len(seq + [<sop>]) in a fresh forward (no cache reused between blanks), drop a
   trailing end token (<eop> or eos) and splice the generated ids in place of the mask (`layouts.splice_blank`). With
   beam search only beam 0's spliced sequence continues to the next blank. When no room is left
   (max_gen_length < 1) the blank is filled with nothing, as G130 does.

`out_seq_length` counts the context; it is capped at the model's `max_sequence_length` (the rotary table's size), so a
[gMASK] continuation never reaches a position the model has no row for.

Deliberate differences from G130 (both invisible for a trained model's usual output):
- mask tokens ([MASK], [sMASK], [gMASK]) are never generated (invalid ids): in G130 a generated mask token opens a
  new blank that the loop fills next, which can go on forever;
- `min_gen_length` also applies to sampling (G130 passes it to beam search only; the default 0 is the same).

Batching: a list of texts is filled in rounds; round r decodes blank r of every prompt that still has one, together
in one decoder call. Greedy results equal one-by-one filling. Sampling results depend on the batch (one random key
per step is shared by the rows), so a prompt sampled alone and in a batch differ; each is deterministic for its seed.
With sampling the rows of one call share the longest row's max_gen_length and each row is cut to its own (the same
tokens as decoding it with its own limit); beam search, where the limit changes the search, groups the rows by
max_gen_length (in practice: one prompt per call).

Seeds: round 0 uses `seed`, round r > 0 a seed derived from (seed, r).

The decoder is any callable `decoder_fn(contexts, mask_positions, use_gmask, *, max_gen_length, strategy, end_tokens,
min_gen_length, seed)` returning a `decode.DecodeOutput` (e.g. `functools.partial(Decoder(...).generate, params)`).
For streaming (`stream=`) it must also take `on_tokens=fn`, called on the host with (step, tokens [B]) as each token
is produced (`api.Generator` provides one).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from glm_jax import layouts
from glm_jax.generation import beam_search as beam_lib
from glm_jax.generation import decode as decode_lib
from glm_jax.tokenizer import MASK_PATTERN

MAX_SEED = 2**31 - 1


@dataclasses.dataclass
class Prompt:
  """A prompt after §5.1 steps 1-5."""
  text: str  # the raw text as given
  input_text: str  # the raw text as G130 echoes it (" [gMASK]" appended when it had no mask)
  seq: list[int]  # the token ids after steps 1-4 (eos included when appended)
  generation_mask: int  # the mask id whose blanks are filled, first one first
  use_gmask: bool


@dataclasses.dataclass
class FillResult:
  """One prompt's result.

  text: the answer, G130's `answers[0]`: the final sequence decoded (specials rendered), its trailing eos dropped.
  blanks: the generated text of each blank, in the order they were filled.
  beams: the answers of every beam of the last blank, best-first (beam search: up to num_beams texts, each the final
    sequence with that beam spliced in; G130 writes these to its output file). With sampling, [text].
  ids: the final token ids (beam 0), as spliced: a trailing eos of the prompt is still there.
  input_ids: the prompt's ids after §5.1 steps 1-4 (mask ids, appended [gMASK] and eos included).
  input_text: the raw text as G130 echoes it ("Input: ..."; " [gMASK]" appended when the text had no mask).
  blank_ids: the generated ids of each blank (end token dropped).
  beam_ids: the final ids of each beam (beam search), [ids] otherwise.
  use_gmask: whether [gMASK] was the generation mask (no [MASK] / [sMASK] in the text).
  """
  text: str
  blanks: list[str]
  beams: list[str]
  ids: list[int]
  input_ids: list[int]
  input_text: str
  blank_ids: list[list[int]]
  beam_ids: list[list[int]]
  use_gmask: bool


def special_ids(tokenizer) -> layouts.SpecialIds:
  """The tokenizer's GLM special ids as `layouts.SpecialIds`."""
  return layouts.SpecialIds(mask=tokenizer.mask_id, gmask=tokenizer.gmask_id, smask=tokenizer.smask_id,
                            sop=tokenizer.sop_id, eop=tokenizer.eop_id, eos=tokenizer.eos_id)


def max_prompt_length(out_seq_length: int, max_sequence_length: int) -> int:
  """The longest prompt (ids after §5.1 steps 1-4) that leaves room for <sop> and one generated token."""
  return min(int(out_seq_length), int(max_sequence_length)) - 2


def prepare_prompt(tokenizer, text: str, *, out_seq_length: int, max_sequence_length: int) -> Prompt:
  """§5.1 steps 1-5 for one raw text; ValueError for an empty or over-long prompt."""
  if not isinstance(text, str):
    raise TypeError(f'a prompt must be a str, got {type(text).__name__}')
  if not text.strip():
    raise ValueError('empty prompt')
  sid = special_ids(tokenizer)
  ids = tokenizer.encode_with_masks(text)  # step 2: each segment on its own, mask ids between them
  input_text = text
  if not MASK_PATTERN.search(text):  # step 3 (prepare_blank_filling appends the id)
    input_text = text + ' [gMASK]'
  blank = layouts.prepare_blank_filling(ids, sid, ends_with_mask=input_text.endswith('MASK]'))  # steps 1, 3, 4
  limit = max_prompt_length(out_seq_length, max_sequence_length)
  if len(blank.seq) > limit:
    if out_seq_length <= max_sequence_length:
      why = f'--out-seq-length {out_seq_length} counts the prompt, <sop> and at least one generated token'
    else:
      why = f"the model's max_sequence_length is {max_sequence_length}, counting <sop> and one generated token"
    raise ValueError(f'prompt is {len(blank.seq)} tokens, longer than the maximum {limit} ({why})')
  return Prompt(text=text, input_text=input_text, seq=blank.seq, generation_mask=blank.generation_mask,
                use_gmask=blank.use_gmask)


def round_seed(seed: int, round_index: int) -> int:
  """The decoder seed of blank round `round_index` (round 0: the seed itself)."""
  if round_index == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)[0]) & MAX_SEED


def _strip_end(tokens: Sequence[int], end_tokens: Sequence[int]) -> list[int]:
  """G130: cut at the first -1 (the decoder already did) and drop one trailing end token."""
  tokens = [int(t) for t in tokens]
  if tokens and tokens[-1] in end_tokens:
    tokens = tokens[:-1]
  return tokens


def _answer_text(tokenizer, ids: Sequence[int]) -> str:
  ids = list(ids)
  if ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  return tokenizer.decode(ids)


def _with_mask_ids_banned(strategy, mask_ids):
  if isinstance(strategy, beam_lib.BeamSearchConfig):
    banned = tuple(dict.fromkeys(tuple(strategy.invalid_slices) + tuple(mask_ids)))
    return dataclasses.replace(strategy, invalid_slices=banned)
  if isinstance(strategy, decode_lib.SamplingConfig):
    banned = tuple(dict.fromkeys(tuple(strategy.invalid_ids) + tuple(mask_ids)))
    return dataclasses.replace(strategy, invalid_ids=banned)
  raise TypeError(f'strategy must be a SamplingConfig or a BeamSearchConfig, got {type(strategy).__name__}')


class TextStream:
  """Turns a growing token sequence into text pieces for a callback.

  `update(ids)` decodes the whole sequence and passes on what was not passed before. While the text ends with an
  incomplete UTF-8 character (U+FFFD from byte pieces) it waits. The pieces concatenate to the final text unless the
  tokenizer's decoding of an earlier part changes as tokens are added (it does not for the compact layout).
  """

  def __init__(self, tokenizer, callback: Callable[[str], None]):
    self.tokenizer = tokenizer
    self.callback = callback
    self.emitted = ''

  def update(self, ids: Sequence[int], *, final: bool = False) -> None:
    text = self.tokenizer.decode(ids)
    if not final and text.endswith('\ufffd'):
      return
    if len(text) > len(self.emitted):
      piece = text[len(self.emitted):]
      self.emitted = text
      self.callback(piece)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


def fill_blanks(decoder_fn, tokenizer, text: str | Sequence[str], *, out_seq_length: int, min_gen_length: int = 0,
                strategy=decode_lib.GREEDY, seed: int = 0, max_sequence_length: int,
                stream: Callable[[str], None] | None = None) -> FillResult | list[FillResult]:
  """Fill every blank of one text (returns a FillResult) or of a list of texts (returns a list); see the module
  docstring. strategy: a decode.SamplingConfig or a beam_search.BeamSearchConfig. stream: for one text only, a
  callback receiving the answer's text in pieces as tokens are generated (with beam search: at the end of each
  blank)."""
  out_seq_length = _check_int('--out-seq-length', out_seq_length, 2)
  min_gen_length = _check_int('--min-gen-length', min_gen_length, 0)
  seed = _check_int('--seed', seed, 0)
  if seed > MAX_SEED:
    raise ValueError(f'--seed must be an integer in [0, {MAX_SEED}], got {seed}')
  single = isinstance(text, str)
  texts = [text] if single else list(text)
  if not texts:
    raise ValueError('no prompts')
  if stream is not None and not single:
    raise ValueError('stream= works with one prompt at a time')
  prompts = []
  for i, t in enumerate(texts):
    try:
      prompts.append(prepare_prompt(tokenizer, t, out_seq_length=out_seq_length,
                                    max_sequence_length=max_sequence_length))
    except ValueError as e:
      raise ValueError(str(e) if single else f'prompt {i}: {e}') from None

  sid = special_ids(tokenizer)
  end_tokens = (sid.eop, sid.eos)
  strategy = _with_mask_ids_banned(strategy, sid.mask_ids)
  is_beam = isinstance(strategy, beam_lib.BeamSearchConfig)
  total = min(out_seq_length, int(max_sequence_length))
  streamer = TextStream(tokenizer, stream) if stream is not None else None

  n = len(prompts)
  seqs = [list(p.seq) for p in prompts]
  blank_ids: list[list[list[int]]] = [[] for _ in range(n)]
  beam_ids: list[list[list[int]] | None] = [None] * n
  round_index = 0
  while True:
    active = [i for i in range(n) if prompts[i].generation_mask in seqs[i]]
    if not active:
      break
    mask_pos = {i: seqs[i].index(prompts[i].generation_mask) for i in active}
    max_gen = {i: total - (len(seqs[i]) + 1) for i in active}
    new_beams: dict[int, list[list[int]]] = {}
    for i in active:
      if max_gen[i] < 1:  # no room left: G130 generates nothing and the mask is dropped
        new_beams[i] = [[]]
    todo = [i for i in active if max_gen[i] >= 1]
    for group in _groups(todo, seqs, max_gen, prompts, is_beam, int(max_sequence_length)):
      g_max = max(max_gen[i] for i in group)
      kwargs = dict(max_gen_length=g_max, strategy=strategy, end_tokens=end_tokens, min_gen_length=min_gen_length,
                    seed=round_seed(seed, round_index))
      if streamer is not None and not is_beam:
        prefix = seqs[group[0]][:mask_pos[group[0]]]
        streamer.update(prefix)  # the text before the blank, at once
        kwargs['on_tokens'] = _stream_listener(streamer, prefix, end_tokens)
      out = decoder_fn([seqs[i] + [sid.sop] for i in group], [mask_pos[i] for i in group],
                       [prompts[i].use_gmask for i in group], **kwargs)
      for j, i in enumerate(group):
        if is_beam:
          beams = [_strip_end(b, end_tokens) for b in (out.beams[j] or [[]])]
        else:
          beams = [_strip_end(out.tokens[j][:max_gen[i]], end_tokens)]
        new_beams[i] = beams
    for i in active:
      beams = new_beams[i]
      blank_ids[i].append(beams[0])
      beam_ids[i] = [layouts.splice_blank(seqs[i], mask_pos[i], b) for b in beams]
      seqs[i] = beam_ids[i][0]  # only beam 0 continues
      if streamer is not None:  # the text up to the end of this blank is final now
        streamer.update(seqs[i][:mask_pos[i] + len(beams[0])])
    round_index += 1

  results = []
  for i, p in enumerate(prompts):
    finals = beam_ids[i] if beam_ids[i] is not None else [seqs[i]]
    text_i = _answer_text(tokenizer, seqs[i])
    results.append(FillResult(
        text=text_i, blanks=[tokenizer.decode(b) for b in blank_ids[i]],
        beams=[_answer_text(tokenizer, b) for b in finals] if is_beam else [text_i], ids=seqs[i],
        input_ids=list(p.seq), input_text=p.input_text, blank_ids=blank_ids[i],
        beam_ids=finals if is_beam else [seqs[i]], use_gmask=p.use_gmask))
  if streamer is not None:
    ids = seqs[0][:-1] if seqs[0] and seqs[0][-1] == sid.eos else seqs[0]
    streamer.update(ids, final=True)
  return results[0] if single else results


def _stream_listener(streamer: TextStream, prefix: list[int], end_tokens):
  generated: list[int] = []
  ended = [False]

  def on_tokens(step, tokens):
    del step
    if ended[0]:
      return
    t = int(np.asarray(tokens).reshape(-1)[0])
    if t < 0 or t in end_tokens:
      ended[0] = True
      return
    generated.append(t)
    streamer.update(prefix + generated)

  return on_tokens


def _groups(todo, seqs, max_gen, prompts, is_beam, max_sequence_length):
  """Rows decoded together in one call. Beam search: rows with the same max_gen_length. Sampling: all rows, except
  that a [gMASK] row's positions run up to len(context) - 2 + the call's max_gen_length, which must stay below
  max_sequence_length (a long row cannot share the call of a much shorter one when out_seq_length is capped)."""
  if not todo:
    return []
  if is_beam:
    by_len: dict[int, list[int]] = {}
    for i in todo:
      by_len.setdefault(max_gen[i], []).append(i)
    return list(by_len.values())
  groups: list[list[int]] = []
  for i in sorted(todo, key=lambda i: -max_gen[i]):  # the group's first row has the largest max_gen_length
    if groups:
      g_max = max_gen[groups[-1][0]]
      if not prompts[i].use_gmask or len(seqs[i]) + 1 - 2 + g_max < max_sequence_length:
        groups[-1].append(i)
        continue
    groups.append([i])
  return [sorted(g) for g in groups]
