"""GLM-130B's BeamSearchStrategy (glm130b.md §5.4, §7.5, §10 items 11-12) as pure, fixed-shape JAX functions.

The decode loop (a `lax.while_loop` over a KV cache) calls, for B prompts, K beams and at most T generated tokens:

  state = init_beam_state(cfg, B, T, context_lengths)            # optionally context_tail=
  state, parent_BxK, tokens_BxK = beam_step(cfg, state, logits_BxKxV, rng)   # once per generated token
  tokens_BxKxT, lengths_BxK, scores_BxK = finalize(cfg, state)

`cfg` (a frozen, hashable BeamSearchConfig) is static under jit; `beam_step` and `finalize` are jitted with it as a
static argument and contain no Python branching on traced values. After a step, new beam j of prompt b continues old
beam `parent[b, j]` of the same prompt (the loop gathers its cache rows by it) and its next input is `tokens[b, j]`.

One step, exactly as G130's `forward` (differences listed below):
1. logits in fp32; every id in `invalid_slices` -> NEG (-65504);
2. while `length < min_gen_length` (tokens generated before this step), every end token -> NEG;
3. no-repeat-ngram (n = no_repeat_ngram_size > 0, when the row length context_length + length > n): the beam's ban
   list is looked up with its last n-1 tokens and the listed ids -> NEG;
4. banned prefixes (the LAMBADA strategy): prefix p bans p[-1] at step len(p)-1 only, on the beams whose generated
   tokens so far equal p[:-1] (a 1-token prefix bans its token at step 0), i.e. a word may not *start* with it;
5. log_softmax + the beam's cumulative score; flatten to [B, K*V]; on the first step only beam 0 is live (the other
   beams start with score -inf, which is G130's "keep the first V" in fixed shape);
6. C = (max(1, len(end_tokens)) + 1) * K candidates: the top C when `deterministic`, else C samples without replacement
   from softmax(flat scores) (Gumbel-top-k: the C largest of score + Gumbel noise are an exact sample without
   replacement, the same distribution as torch.multinomial(replacement=False)); sorted by score, descending (equal
   scores: lower flat index, i.e. lower beam then lower id, first; torch leaves the order of ties unspecified);
7. walk the candidates in order: an end token becomes an end beam with the penalised score
   score / ((5 + len) / 6) ** length_penalty, len = context_length + length + 1 (the whole real row: context with
   its mask and eos, <sop>, the generated tokens and the end token); any other candidate continues while fewer than
   K continue; the walk stops at the first non-end candidate after K continuing ones (so end candidates that come
   after the K-th continuing candidate but before the next non-end one are still added, as in G130);
   end beams stay sorted best-first (a new beam goes before older ones with an equal score) and truncated to K;
8. the row is done when it has K end beams and the worst of them >= max(live scores) / ((5 + row_len + 1) / 6) ** lp,
   where row_len = context_length + length (the real row length before this step's token; row_len + 1 is the row
   length after it, G130's `seq_len + 1`). A done row is frozen: later steps change nothing in it and return
   parents = arange(K) and tokens = pad_token_id for it.

No-repeat-ngram, made jit-friendly. G130 keeps per beam a dict (n-1 tokens -> banned ids), inherited from the parent
beam and extended, whenever the beam continues with token t, by (the row's last n-1 tokens before t -> t). So the
banned ids are the beam's own generated (chosen, continuing) tokens, each keyed by the n-1 row tokens before it. We
scan instead: with ext = context_tail[-(n-1):] + generated tokens, any generated position i (< length) whose key
ext[i : i+n-1] equals the current key ext[length : length+n-1] bans generated token i. This is the same set. Keys
of the first n-1 generated tokens reach into the context; pass `context_tail` (the last tokens of each row's real
context, ending with <sop>) to match that exactly. Without it the tail is -1, which no token equals: only keys made
entirely of generated tokens can match (bans from generated tokens only). With n = 1 every generated token is banned
(the natural meaning; G130's n = 1 path keys on the whole row, so it never bans anything: its "TODO ngram=1").

Deliberate differences from G130:
- lengths use each row's real context length (`context_lengths`), never the padded bucket length: G130's evaluation
  pads contexts to a multiple of 32 and its length penalty, done test and `seq_len > n` test then count the padding
  (§10 item 12), and its first n-gram keys hold padding tokens rather than the context's tail; generate.py (batch 1,
  unpadded) is matched exactly;
- deterministic candidates are the top C of the fp32 scores; G130 takes top-k of softmax(scores), which only differs
  among candidates whose probability underflows to 0 (where torch's order is unspecified);
- a done row is frozen; G130 keeps extending its live beams (end tokens then continue), which only changes live beams
  that its finalize never returns with consider_end=True;
- `finalize` always returns end beams (see there); G130 without consider_end returns the raw live rows.
Tokens past T are never generated: a step with length == T changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.generation.sampling import NEG


def _as_int_tuple(x):
  return tuple(x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class BeamSearchConfig:
  """Beam search settings (G130 BeamSearchStrategy + the LAMBADA banned prefixes). Hashable: a jit static argument.

  end_tokens: ids that end a beam (e.g. (<eop>, eos)). invalid_slices: ids never produced (GLM-130B's name; ids, not
  Python slices). banned_prefixes: token sequences p; p[-1] is banned at generation step len(p)-1 after p[:-1].
  pad_token_id: the token returned for frozen (done) rows and stored after a beam's end (an extension; 0 is GLM-130B's
  padding id, a valid embedding row).
  Lists are converted to tuples.
  """
  num_beams: int
  length_penalty: float = 1.0
  consider_end: bool = False
  end_tokens: tuple[int, ...] = ()
  no_repeat_ngram_size: int = 0
  min_gen_length: int = 0
  deterministic: bool = False
  invalid_slices: tuple[int, ...] = ()
  banned_prefixes: tuple[tuple[int, ...], ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, 'end_tokens', _as_int_tuple(self.end_tokens))
    object.__setattr__(self, 'invalid_slices', _as_int_tuple(self.invalid_slices))
    prefixes = self.banned_prefixes
    if isinstance(prefixes, (list, tuple)):
      prefixes = tuple(_as_int_tuple(p) for p in prefixes)
    object.__setattr__(self, 'banned_prefixes', prefixes)

  @property
  def num_candidates(self) -> int:
    """(max(1, len(end_tokens)) + 1) * num_beams: candidates drawn per step (3K with two end tokens)."""
    return (max(1, len(self.end_tokens)) + 1) * self.num_beams

  def validate(self) -> 'BeamSearchConfig':
    """Raises ValueError naming the offending flag / field; returns self."""

    def is_int(x):
      return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    def ids(name, xs):
      if not isinstance(xs, tuple) or not all(is_int(t) and t >= 0 for t in xs):
        raise ValueError(f'{name} must be a sequence of token ids >= 0, got {xs!r}')

    if not is_int(self.num_beams) or self.num_beams < 1:
      raise ValueError(f'--num-beams must be an integer >= 1, got {self.num_beams!r}')
    if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
        or not math.isfinite(self.length_penalty):
      raise ValueError(f'--length-penalty must be a finite number, got {self.length_penalty!r}')
    if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
      raise ValueError(f'--no-repeat-ngram-size must be an integer >= 0, got {self.no_repeat_ngram_size!r}')
    if not is_int(self.min_gen_length) or self.min_gen_length < 0:
      raise ValueError(f'--min-gen-length must be an integer >= 0, got {self.min_gen_length!r}')
    if not isinstance(self.consider_end, bool):
      raise ValueError(f'consider_end must be a bool, got {self.consider_end!r}')
    if not isinstance(self.deterministic, bool):
      raise ValueError(f'deterministic must be a bool, got {self.deterministic!r}')
    ids('end_tokens', self.end_tokens)
    if len(set(self.end_tokens)) != len(self.end_tokens):
      raise ValueError(f'end_tokens must be distinct, got {self.end_tokens!r}')
    ids('invalid_slices', self.invalid_slices)
    if not isinstance(self.banned_prefixes, tuple):
      raise ValueError(f'banned_prefixes must be a sequence of token sequences, got {self.banned_prefixes!r}')
    for p in self.banned_prefixes:
      ids('banned_prefixes entries', p)
      if not p:
        raise ValueError('banned_prefixes entries must be non-empty')
    if not is_int(self.pad_token_id) or self.pad_token_id < 0:
      raise ValueError(f'pad_token_id must be a token id >= 0, got {self.pad_token_id!r}')
    return self


@flax.struct.dataclass
class BeamState:
  """Fixed-shape beam search state for B prompts, K beams, at most T generated tokens (a pytree).

  tokens [B,K,T] int32: live beams' generated tokens (positions >= length hold pad_token_id).
  scores [B,K] fp32: live beams' cumulative log-probs (unpenalised); -inf for beams 1..K-1 before the first step.
  length [] int32: tokens generated so far (the same for every live beam).
  end_tokens [B,K,T] int32: finished beams' generated tokens, best first, the end token included.
  end_lengths [B,K] int32: their generated length including the end token (0 for an empty slot).
  end_scores [B,K] fp32: their penalised scores, best first (-inf for an empty slot).
  end_count [B] int32: filled end slots (<= K).
  done [B] bool: the row has finished (frozen from then on).
  context_lengths [B] int32: the row's real context length (with its mask / eos and <sop>; padding excluded).
  context_tail [B, max(n-1, 0)] int32: the last n-1 context tokens for the n-gram keys (-1: unknown, never matches).
  """
  tokens: jax.Array
  scores: jax.Array
  length: jax.Array
  end_tokens: jax.Array
  end_lengths: jax.Array
  end_scores: jax.Array
  end_count: jax.Array
  done: jax.Array
  context_lengths: jax.Array
  context_tail: jax.Array


def init_beam_state(cfg: BeamSearchConfig, batch: int, max_gen_length: int, context_lengths,
                    context_tail=None) -> BeamState:
  """The state before the first step. `batch`, `max_gen_length` are Python ints; `context_lengths` [B] ints.

  context_tail (optional extension): [B, m] the last m tokens of each row's real context (ending with <sop>),
  right-aligned; the last n-1 are used (missing ones are -1). Only the no-repeat-ngram keys use it (module doc).
  """
  k, t = cfg.num_beams, max_gen_length
  m = max(cfg.no_repeat_ngram_size - 1, 0)
  tail = jnp.full((batch, m), -1, jnp.int32)
  if context_tail is not None and m > 0:
    ct = jnp.asarray(context_tail, jnp.int32).reshape(batch, -1)[:, -m:]
    tail = tail.at[:, m - ct.shape[1]:].set(ct)
  pad = cfg.pad_token_id
  return BeamState(
      tokens=jnp.full((batch, k, t), pad, jnp.int32),
      scores=jnp.full((batch, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
      length=jnp.zeros((), jnp.int32),
      end_tokens=jnp.full((batch, k, t), pad, jnp.int32),
      end_lengths=jnp.zeros((batch, k), jnp.int32),
      end_scores=jnp.full((batch, k), -jnp.inf, jnp.float32),
      end_count=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      context_lengths=jnp.broadcast_to(jnp.asarray(context_lengths, jnp.int32), (batch,)),
      context_tail=tail,
  )


def length_penalty_factor(row_length, length_penalty: float):
  """((5 + len) / 6) ** length_penalty in fp32 (OpenNMT / GNMT); `len` counts the whole real token row."""
  return ((5.0 + jnp.asarray(row_length, jnp.float32)) / 6.0) ** jnp.float32(length_penalty)


def _static_id_mask(ids, v: int, what: str) -> np.ndarray:
  mask = np.zeros(v, bool)
  for i in ids:
    if i >= v:
      raise ValueError(f'{what} id {i} is outside the vocabulary of the logits (size {v})')
    mask[i] = True
  return mask


def _ban_mask(cfg: BeamSearchConfig, state: BeamState, v: int):
  """[B,K,V] bool: the logits set to NEG at this step (invalid ids, early ends, n-gram bans, banned prefixes)."""
  b, k, t = state.tokens.shape
  length = state.length
  static = _static_id_mask(cfg.invalid_slices, v, 'invalid_slices')
  end_mask = _static_id_mask(cfg.end_tokens, v, 'end_tokens')
  ban = jnp.asarray(static) | (jnp.asarray(end_mask) & (length < cfg.min_gen_length))
  ban = jnp.broadcast_to(ban, (b, k, v))

  conds, ids = [], []
  n = cfg.no_repeat_ngram_size
  if n > 0:
    m = n - 1
    tail = jnp.broadcast_to(state.context_tail[:, None, :], (b, k, m))
    ext = jnp.concatenate([tail, state.tokens], axis=2)  # [B,K,m+T]; generated token i sits at ext[m + i]
    key = jax.lax.dynamic_slice_in_dim(ext, jnp.minimum(length, t), m, axis=2)  # the last n-1 row tokens
    match = jnp.ones((b, k, t), bool)
    for j in range(m):
      match &= ext[:, :, j:j + t] == key[:, :, j:j + 1]
    earlier = jnp.arange(t) < length
    row_long_enough = (state.context_lengths + length) > n  # G130: seq_len > ngram
    conds.append(match & earlier & row_long_enough[:, None, None])
    ids.append(state.tokens)
  for p in cfg.banned_prefixes:
    if p[-1] >= v:
      raise ValueError(f'banned_prefixes id {p[-1]} is outside the vocabulary of the logits (size {v})')
    if len(p) - 1 >= t:
      continue  # step len(p)-1 never happens
    hit = length == len(p) - 1
    if len(p) > 1:
      hit = hit & jnp.all(state.tokens[:, :, :len(p) - 1] == jnp.asarray(p[:-1], jnp.int32), axis=-1)
    conds.append(jnp.broadcast_to(hit, (b, k))[:, :, None])
    ids.append(jnp.full((b, k, 1), p[-1], jnp.int32))
  if conds:
    cond = jnp.concatenate(conds, axis=2)
    idx = jnp.concatenate(ids, axis=2)
    hits = jnp.zeros((b, k, v), jnp.int32).at[
        jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], idx].add(cond.astype(jnp.int32), mode='drop')
    ban = ban | (hits > 0)
  return ban


def _gather_beams(x, idx_BxM):
  """x [B,K,...] -> [B,M,...]: x[b, idx[b, m]]."""
  idx = idx_BxM.reshape(idx_BxM.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _merge_end_beams(cfg: BeamSearchConfig, end_tokens, end_lengths, end_scores, end_count,
                     new_tokens, new_lengths, new_scores, new_added):
  """Inserts new end beams (in the given order, one after the other) into the sorted end-beam storage.

  G130 inserts each new beam right after the last beam with a strictly greater score (so before older beams with an
  equal score), then truncates to K. Repeated insertion therefore equals one
  stable sort by descending score of [new beams, last inserted first] + [old beams, in their order]. Entries with
  new_added False carry -inf and are not counted.
  """
  k = cfg.num_beams
  scores = jnp.concatenate([jnp.where(new_added, new_scores, -jnp.inf)[:, ::-1], end_scores], axis=1)
  tokens = jnp.concatenate([new_tokens[:, ::-1], end_tokens], axis=1)
  lengths = jnp.concatenate([new_lengths[:, ::-1], end_lengths], axis=1)
  _, order = jax.lax.top_k(scores, k)  # = a stable sort's first K: ties keep the lower index first
  count = jnp.minimum(end_count + new_added.sum(axis=1, dtype=jnp.int32), k)
  filled = jnp.arange(k)[None, :] < count[:, None]
  scores = jnp.where(filled, jnp.take_along_axis(scores, order, axis=1), -jnp.inf)
  lengths = jnp.where(filled, jnp.take_along_axis(lengths, order, axis=1), 0)
  tokens = jnp.where(filled[:, :, None], _gather_beams(tokens, order), cfg.pad_token_id)
  return tokens, lengths, scores, count


@functools.partial(jax.jit, static_argnums=0)
def beam_step(cfg: BeamSearchConfig, state: BeamState, logits_BxKxV, rng=None):
  """One beam-search step (module doc). Returns (new state, parent [B,K] int32, tokens [B,K] int32).

  logits_BxKxV: next-token logits of the K live beams ([B,1,V] is broadcast; on the first step only beam 0 is
  used). rng: a PRNG key, required unless cfg.deterministic. V must be >= cfg.num_candidates (G130's top-k /
  multinomial would fail otherwise).
  """
  k = cfg.num_beams
  b, _, t = state.tokens.shape
  v = logits_BxKxV.shape[-1]
  c = cfg.num_candidates
  if v < c:
    raise ValueError(f'the vocabulary ({v}) must hold at least (max(1, len(end_tokens)) + 1) * num_beams = {c} ids')
  if not cfg.deterministic and rng is None:
    raise ValueError('beam_step needs an rng key unless cfg.deterministic')
  length = state.length
  ctx = state.context_lengths
  pad = cfg.pad_token_id

  logits = jnp.broadcast_to(logits_BxKxV.astype(jnp.float32), (b, k, v))
  logits = jnp.where(_ban_mask(cfg, state, v), jnp.float32(NEG), logits)
  scores = jax.nn.log_softmax(logits, axis=-1) + state.scores[:, :, None]
  flat = scores.reshape(b, k * v)
  if cfg.deterministic:
    cand_scores, cand = jax.lax.top_k(flat, c)  # sorted descending, ties by lower flat index
  else:
    # Gumbel-top-k: an exact sample of c distinct candidates without replacement from softmax(flat).
    _, cand = jax.lax.top_k(flat + jax.random.gumbel(rng, flat.shape, jnp.float32), c)
    cand_scores, order = jax.lax.top_k(jnp.take_along_axis(flat, cand, axis=1), c)  # sorted by score
    cand = jnp.take_along_axis(cand, order, axis=1)
  cand_parent = (cand // v).astype(jnp.int32)
  cand_token = (cand % v).astype(jnp.int32)

  # The walk over the sorted candidates.
  if cfg.end_tokens:
    is_end = jnp.isin(cand_token, jnp.asarray(cfg.end_tokens, jnp.int32))
  else:
    is_end = jnp.zeros((b, c), bool)
  cont = ~is_end
  cont_incl = jnp.cumsum(cont, axis=1, dtype=jnp.int32)
  cont_before = cont_incl - cont
  take_cont = cont & (cont_incl <= k)
  take_end = is_end & (cont_before <= k)  # the walk breaks at the (K+1)-th continuing candidate

  at_length = (jnp.arange(t) == length)[None, None, :]

  # Continuing beams: the first K non-end candidates, in order.
  sel = jnp.argmax(take_cont[:, None, :] & (cont_incl[:, None, :] == jnp.arange(1, k + 1)[None, :, None]), axis=2)
  parent = jnp.take_along_axis(cand_parent, sel, axis=1)
  token = jnp.take_along_axis(cand_token, sel, axis=1)
  live_scores = jnp.take_along_axis(cand_scores, sel, axis=1)
  live_tokens = jnp.where(at_length, token[:, :, None], _gather_beams(state.tokens, parent))

  # End beams: score / ((5 + len) / 6) ** lp with len = the whole real row, end token included.
  row_len = ctx + length  # the real row length before this step's token
  end_pen = cand_scores / length_penalty_factor(row_len + 1, cfg.length_penalty)[:, None]
  cand_tokens = jnp.where(at_length, cand_token[:, :, None], _gather_beams(state.tokens, cand_parent))
  end_tokens, end_lengths, end_scores, end_count = _merge_end_beams(
      cfg, state.end_tokens, state.end_lengths, state.end_scores, state.end_count,
      cand_tokens, jnp.full((b, c), length + 1, jnp.int32), end_pen, take_end)

  best_live = live_scores.max(axis=1) / length_penalty_factor(row_len + 1, cfg.length_penalty)
  done = (end_count == k) & (end_scores[:, k - 1] >= best_live)

  # Frozen rows (done before this step) and steps past T change nothing.
  active = ~state.done & (length < t)
  a1, a2, a3 = active[:, None], active[:, None, None], active
  new = BeamState(
      tokens=jnp.where(a2, live_tokens, state.tokens),
      scores=jnp.where(a1, live_scores, state.scores),
      length=jnp.where(length < t, length + 1, length).astype(jnp.int32),
      end_tokens=jnp.where(a2, end_tokens, state.end_tokens),
      end_lengths=jnp.where(a1, end_lengths, state.end_lengths),
      end_scores=jnp.where(a1, end_scores, state.end_scores),
      end_count=jnp.where(a3, end_count, state.end_count),
      done=jnp.where(a3, done, state.done),
      context_lengths=state.context_lengths,
      context_tail=state.context_tail,
  )
  parent = jnp.where(a1, parent, jnp.arange(k, dtype=jnp.int32)[None, :])
  token = jnp.where(a1, token, jnp.int32(pad))
  return new, parent.astype(jnp.int32), token.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def finalize(cfg: BeamSearchConfig, state: BeamState):
  """The finished beams, best first: (tokens [B,K,T] int32, lengths [B,K] int32, penalised scores [B,K] fp32).

  With consider_end, every row that is not done adds its live beams (beam 0 first, each one inserted as in a step)
  as end beams with score / ((5 + context_length + length) / 6) ** lp (the row has no end token). Live beams that
  never got a token (score -inf: finalize before any step) are skipped.
  Rows with fewer than K end beams keep the filler in the remaining slots: tokens pad_token_id, length 0, score
  -inf. Without consider_end this returns the end beams only (G130 returns the raw live rows instead).
  tokens[b, j, :lengths[b, j]] are beam j's generated tokens; it ended with an end token iff the last of them is one.
  """
  tokens, lengths, scores, count = state.end_tokens, state.end_lengths, state.end_scores, state.end_count
  if cfg.consider_end:
    k = cfg.num_beams
    b = state.scores.shape[0]
    pen = state.scores / length_penalty_factor(state.context_lengths + state.length, cfg.length_penalty)[:, None]
    add = ~state.done[:, None] & jnp.isfinite(state.scores)
    tokens, lengths, scores, count = _merge_end_beams(
        cfg, tokens, lengths, scores, count, state.tokens, jnp.full((b, k), state.length, jnp.int32), pen, add)
  return tokens, lengths, scores
