"""Decoding strategies (glm_jax/generation/sampling.py, beam_search.py) against the published definitions.

Beam search is compared with `RefBeamSearch` below: a plain-Python transcription of GLM-130B's BeamSearchStrategy
as glm130b.md §5.4 describes it (plus the LAMBADA banned prefixes, §7.5), working on whole token rows (context +
generated) with lists and dicts. The one deliberate difference of the JAX version (row lengths exclude bucket
padding) does not show here because the reference rows are unpadded.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.generation import beam_search as bs
from glm_jax.generation import sampling as sp

NEG = -65504.0


def _key(seed):
  """PRNG keys for the tests. The strategies take any key type; 'rbg' compiles several times faster on CPU than the
  default threefry (which `test_default_key_type_traces` covers by tracing)."""
  return jax.random.key(seed, impl='rbg')


# ------------------------------------------------------------------------------------------------------------------
# Reference: GLM-130B's BeamSearchStrategy, from the spec text.

def _log_softmax32(x):
  x = np.asarray(x, np.float32)
  m = x.max(axis=-1, keepdims=True)
  return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


class RefBeamSearch:

  def __init__(self, batch_size, num_beams, length_penalty=1.0, consider_end=False, end_tokens=(), invalid_slices=(),
               no_repeat_ngram_size=0, min_gen_length=0, banned_prefixes=()):
    self.b, self.k, self.lp = batch_size, num_beams, length_penalty
    self.consider_end, self.end_tokens, self.invalid = consider_end, list(end_tokens), list(invalid_slices)
    self.ngram, self.min_gen_length, self.banned_prefixes = no_repeat_ngram_size, min_gen_length, banned_prefixes
    self.end_beams = [[] for _ in range(batch_size)]  # whole rows (context + generated + end token)
    self.end_scores = [[] for _ in range(batch_size)]
    self.beam_scores = None  # per row, per live beam
    self.bans = [[{} for _ in range(num_beams)] for _ in range(batch_size)]
    self.length_generated = 0
    self.done = [False] * batch_size
    self.bans_applied = 0  # coverage counters for the tests
    self.ends_added = 0

  def add_end_beam(self, score, beam, b):
    score = np.float32(score) / np.float32(((5.0 + len(beam)) / 6) ** self.lp)
    i = len(self.end_beams[b])
    while i > 0 and not score < self.end_scores[b][i - 1]:
      i -= 1  # goes in front of every beam whose score is not strictly greater
    self.end_beams[b].insert(i, beam)
    self.end_scores[b].insert(i, score)
    self.end_beams[b] = self.end_beams[b][:self.k]
    self.end_scores[b] = self.end_scores[b][:self.k]
    self.ends_added += 1

  def forward(self, logits, rows):
    """logits [B, nb, V] (nb = 1 on the first step); rows[b][beam] = list of tokens. Returns the new rows and, per
    row, the (parent, token, score) of each continuing beam."""
    logits = np.array(logits, np.float32)
    nbeams, vocab = logits.shape[1], logits.shape[2]
    # LAMBADA: prefix p bans p[-1] at generation step len(p)-1 when the last len(p)-1 tokens are p[:-1].
    for p in self.banned_prefixes:
      if self.length_generated == len(p) - 1:
        for b in range(self.b):
          for j in range(nbeams):
            if len(p) == 1 or rows[b][j][-(len(p) - 1):] == list(p[:-1]):
              logits[b, j, p[-1]] = NEG
    for t in self.invalid:
      logits[..., t] = NEG
    if self.min_gen_length > self.length_generated:
      for t in self.end_tokens:
        logits[..., t] = NEG
    for b in range(self.b):
      seq_len = len(rows[b][0])
      if self.ngram > 0 and seq_len > self.ngram:
        for j in range(nbeams):
          prefix = tuple(rows[b][j][-(self.ngram - 1):])
          for t in self.bans[b][j].get(prefix, ()):
            logits[b, j, t] = NEG
            self.bans_applied += 1
    scores = _log_softmax32(logits)
    if self.beam_scores is not None:
      scores = scores + np.asarray(self.beam_scores, np.float32)[:, :, None]
    flat = scores.reshape(self.b, nbeams * vocab)
    num_cand = (max(1, len(self.end_tokens)) + 1) * self.k
    out_rows, steps = [], []
    new_scores, new_bans = [], []
    for b in range(self.b):
      seq_len = len(rows[b][0])
      cand = sorted(range(nbeams * vocab), key=lambda i: (-flat[b, i], i))[:num_cand]  # top-k, sorted by score
      cont_rows, cont_scores, cont_bans, step = [], [], [], []
      for c in cand:
        parent, tok = c // vocab, c % vocab
        beam = rows[b][parent] + [tok]
        if not self.done[b] and tok in self.end_tokens:
          self.add_end_beam(flat[b, c], beam, b)
        elif len(cont_rows) < self.k:
          cont_rows.append(beam)
          cont_scores.append(flat[b, c])
          step.append((parent, tok, flat[b, c]))
          if self.ngram > 0:
            bans = dict(self.bans[b][parent])
            key = tuple(rows[b][parent][-(self.ngram - 1):])
            bans[key] = bans.get(key, ()) + (tok,)
            cont_bans.append(bans)
        else:
          break
      out_rows.append(cont_rows)
      new_scores.append(cont_scores)
      new_bans.append(cont_bans)
      steps.append(step)
    self.beam_scores = new_scores
    if self.ngram > 0:
      self.bans = new_bans
    self.length_generated += 1
    for b in range(self.b):
      seq_len = len(rows[b][0])
      if len(self.end_beams[b]) == self.k and self.end_scores[b][-1] >= \
          np.float32(max(self.beam_scores[b])) / np.float32(((5.0 + (seq_len + 1)) / 6) ** self.lp):
        self.done[b] = True
    return out_rows, steps

  def finalize(self, rows):
    if self.consider_end:
      for b in range(self.b):
        if not self.done[b]:
          for i in range(self.k):
            self.add_end_beam(self.beam_scores[b][i], rows[b][i], b)
    return self.end_beams, self.end_scores


# ------------------------------------------------------------------------------------------------------------------
# Beam search: parity with the reference on random logit tables.

# (config, how the JAX side runs): 'steps' calls the jitted beam_step from Python; 'while_loop' runs the whole search
# as one jitted lax.while_loop (as the decode loop does), recording the state after every step.
PARITY_CASES = [
    (dict(num_beams=3, length_penalty=0.7, consider_end=False, no_repeat_ngram_size=3, invalid_slices=(9,),
          banned_prefixes=((6,), (4, 5))), 'steps'),
    (dict(num_beams=2, length_penalty=1.0, consider_end=True, no_repeat_ngram_size=2), 'while_loop'),
    (dict(num_beams=4, length_penalty=1.5, consider_end=True, no_repeat_ngram_size=3, banned_prefixes=((3, 4),)),
     'while_loop'),
]
END = (1, 2)
VOCAB, STEPS, SEEDS = 16, 8, 6
CONTEXTS = [[7, 11, 3, 5, 14], [4, 12, 8, 6, 10, 13, 5, 3, 15]]  # real contexts (last one stands for <sop>)


def _logit_table(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, 2, 4, VOCAB)).astype(np.float32) * 1.5
  x[..., 3:7] += 1.5  # a few favourite tokens so that n-grams repeat
  x[..., list(END)] += rng.uniform(-1.0, 2.5, size=(STEPS, 2, 1, 1)).astype(np.float32)
  if seed % 2 == 0:  # exact ties between the two end tokens: candidates tie-break by lower id, and a new end beam
    x[..., END[1]] = x[..., END[0]]  # goes in front of an equal older one
  return x


def _parity_config(case):
  return bs.BeamSearchConfig(end_tokens=END, min_gen_length=2, deterministic=True, **PARITY_CASES[case][0]).validate()


def _init_parity_state(cfg):
  n = cfg.no_repeat_ngram_size
  return bs.init_beam_state(cfg, 2, STEPS, jnp.asarray([len(c) for c in CONTEXTS]),
                            context_tail=jnp.asarray([c[-(n - 1):] for c in CONTEXTS]))


def _search_steps(cfg, table):
  """Python loop over the jitted beam_step: per step (host state, parents, tokens), and finalize's output."""
  state, history = _init_parity_state(cfg), []
  for step in range(STEPS):
    state, parent, token = bs.beam_step(cfg, state, jnp.asarray(table[step]))
    history.append(jax.device_get((state, parent, token)))
    if history[-1][0].done.all():
      break
  return history, jax.device_get(bs.finalize(cfg, state))


_WHILE_SEARCHES = {}


def _search_while_loop(cfg, table):
  """The same, as one jitted lax.while_loop that stops once every row is done."""
  if cfg not in _WHILE_SEARCHES:

    @jax.jit
    def search(table):
      state = _init_parity_state(cfg)
      hist = jax.tree.map(lambda x: jnp.zeros((STEPS,) + x.shape, x.dtype),
                          (state, jnp.zeros((2, cfg.num_beams), jnp.int32), jnp.zeros((2, cfg.num_beams), jnp.int32)))

      def body(carry):
        state, hist = carry
        step = state.length
        out = bs.beam_step(cfg, state, table[step])
        hist = jax.tree.map(lambda h, x: h.at[step].set(x), hist, out)
        return out[0], hist

      state, hist = jax.lax.while_loop(lambda c: (c[0].length < STEPS) & ~c[0].done.all(), body, (state, hist))
      return state.length, hist, bs.finalize(cfg, state)

    _WHILE_SEARCHES[cfg] = search
  num_steps, hist, final = jax.device_get(_WHILE_SEARCHES[cfg](jnp.asarray(table)))
  return [jax.tree.map(lambda h: h[i], hist) for i in range(int(num_steps))], final


@pytest.mark.parametrize('case', range(len(PARITY_CASES)))
def test_beam_search_matches_reference(case):
  cfg = _parity_config(case)
  search = _search_steps if PARITY_CASES[case][1] == 'steps' else _search_while_loop
  k, n = cfg.num_beams, cfg.no_repeat_ngram_size
  coverage = dict(bans=0, ends=0, early_done=0, frozen_steps=0)
  for seed in range(SEEDS):
    table = _logit_table(seed)[:, :, :k]
    history, final = search(cfg, table)
    ref = RefBeamSearch(2, k, cfg.length_penalty, cfg.consider_end, END, cfg.invalid_slices, n, 2,
                        cfg.banned_prefixes)
    rows = [[list(c)] for c in CONTEXTS]
    for step in range(STEPS):
      was_done = list(ref.done)
      rows, ref_steps = ref.forward(table[step, :, :1] if step == 0 else table[step], rows)
      host, parent, token = history[step]
      for b in range(2):
        if was_done[b]:  # frozen in the JAX version
          coverage['frozen_steps'] += 1
          np.testing.assert_array_equal(parent[b], np.arange(k))
          np.testing.assert_array_equal(token[b], cfg.pad_token_id)
          continue
        np.testing.assert_array_equal(parent[b], [s[0] for s in ref_steps[b]])
        np.testing.assert_array_equal(token[b], [s[1] for s in ref_steps[b]])
        np.testing.assert_allclose(host.scores[b], [s[2] for s in ref_steps[b]], rtol=1e-5, atol=1e-5)
        gen = [r[len(CONTEXTS[b]):] for r in rows[b]]
        np.testing.assert_array_equal(host.tokens[b, :, :step + 1], gen)
      _check_end_beams(host.end_tokens, host.end_lengths, host.end_scores, ref.end_beams, ref.end_scores)
      np.testing.assert_array_equal(host.end_count, [len(e) for e in ref.end_beams])
      np.testing.assert_array_equal(host.done, ref.done)
      if all(ref.done):
        coverage['early_done'] += step < STEPS - 1
        break
    assert len(history) == step + 1
    ref_beams, ref_scores = ref.finalize(rows)
    _check_end_beams(*final, ref_beams, ref_scores)
    coverage['bans'] += ref.bans_applied
    coverage['ends'] += ref.ends_added
  # The tables exercise what they are meant to.
  assert coverage['bans'] > 0 and coverage['ends'] > 0 and coverage['frozen_steps'] > 0, coverage


def _check_end_beams(tokens, lengths, scores, ref_beams, ref_scores):
  tokens, lengths, scores = jax.device_get((tokens, lengths, scores))
  for b in range(2):
    gen = [beam[len(CONTEXTS[b]):] for beam in ref_beams[b]]
    m = len(gen)
    np.testing.assert_array_equal(lengths[b, :m], [len(g) for g in gen])
    for j, g in enumerate(gen):
      np.testing.assert_array_equal(tokens[b, j, :len(g)], g)
    np.testing.assert_allclose(scores[b, :m], ref_scores[b], rtol=1e-5, atol=1e-5)
    assert (lengths[b, m:] == 0).all() and np.isneginf(scores[b, m:]).all()


# ------------------------------------------------------------------------------------------------------------------
# Beam search: hand-checkable cases.

# One config (and one compiled step) for the K = 1 hand cases: each batch row strongly prefers a given token at each
# step; otherwise lower ids are preferred (0, then 1 = the end token, then 2, ...).
HAND = bs.BeamSearchConfig(num_beams=1, end_tokens=(1,), min_gen_length=2, no_repeat_ngram_size=2,
                           banned_prefixes=((5,), (3, 4)), invalid_slices=(7,), deterministic=True)


def _hand_run(prefs, context_tail=None):
  """3 rows x 5 steps under HAND; returns (tokens [3, 5], final host state)."""
  state = bs.init_beam_state(HAND, 3, 5, jnp.asarray([4, 6, 5]), context_tail=context_tail)
  out = []
  for i in range(5):
    logits = np.tile(-np.arange(8, dtype=np.float32), (3, 1))
    for row in range(3):
      logits[row, prefs[row][i]] = 10.0
    state, _, tok = bs.beam_step(HAND, state, jnp.asarray(logits)[:, None])
    out.append(np.asarray(tok)[:, 0])
  return np.stack(out, axis=1), jax.device_get(state)


def test_length_penalty_uses_the_whole_row():
  """K = 1 under HAND (ends allowed from step 2). Each row generates 2 (p .6), 3 (p .6); at step 2 the end token
  (p q1) gives the end beam E1 = [2, 3, <end>] with raw score -2.0 while 4 (p .5) continues; at step 3 the end token
  (p q2) gives E2 = [2, 3, 4, <end>] with raw score -2.18 (lower). With lp = 1, penalised = raw / ((5 + len) / 6),
  len = context + generated tokens incl. the end. The better one is kept:
    context 7: E1 -2.0/(15/6) = -0.8      beats E2 -2.18/(16/6) = -0.8175;
    context 4: E1 -2.0/(12/6) = -1.0      beats E2 -2.18/(13/6) = -1.00615;
    context 1: E2 -2.18/(10/6) = -1.308   beats E1 -2.0/(9/6) = -1.3333 (as if only generated tokens counted)."""
  s = 2 * math.log(0.6)
  q1, q2 = math.exp(-2.0 - s), math.exp(-2.18 - s - math.log(0.5))

  def dist(probs, rest_ids):
    p = np.zeros(8)
    for t, q in probs.items():
      p[t] = q
    p[list(rest_ids)] = (1.0 - sum(probs.values())) / len(rest_ids)
    return np.log(np.maximum(p, 1e-30))  # "no mass": e^-69

  steps = [dist({2: 0.6}, (0, 3, 4, 6)), dist({3: 0.6}, (0, 2, 4, 6)), dist({4: 0.5, 1: q1}, (0, 2, 5, 6)),
           dist({1: q2}, (0, 2, 5, 6))]  # ids 1 (blocked end, steps 0-1) and 7 (invalid) get no mass
  state = bs.init_beam_state(HAND, 3, 5, jnp.asarray([7, 4, 1]))
  for logits in steps:
    state, _, _ = bs.beam_step(HAND, state, jnp.asarray(np.tile(logits, (3, 1, 1)), jnp.float32))
  state = jax.device_get(state)
  np.testing.assert_allclose(state.end_scores[:, 0], [-2.0 / (15 / 6), -2.0 / (12 / 6), -2.18 / (10 / 6)], rtol=1e-5)
  np.testing.assert_array_equal(state.end_lengths[:, 0], [3, 3, 4])
  np.testing.assert_array_equal(state.end_tokens[:, 0, :4], [[2, 3, 1, 0], [2, 3, 1, 0], [2, 3, 4, 1]])


def test_no_repeat_ngram_bans():
  """Bigrams. Row 0: 2 4 2, then 4 would repeat (2, 4): banned, the fallback 0 is taken. Rows 1 and 2: the first
  generated token is keyed by the context's last token (<sop>, here 6): with that context tail, 4 6 is followed by a
  ban of 4 (the bigram (6, 4) exists); with an unknown tail (-1, the default) only generated tokens form keys."""
  tail = jnp.asarray([[3], [6], [-1]])
  toks, _ = _hand_run([[2, 4, 2, 4, 0], [4, 6, 4, 2, 2], [4, 6, 4, 2, 2]], context_tail=tail)
  np.testing.assert_array_equal(toks, [[2, 4, 2, 0, 0], [4, 6, 0, 2, 2], [4, 6, 4, 2, 2]])


def test_min_gen_length_blocks_end_tokens():
  """Row 0 prefers the end token 1 throughout: it is blocked at steps 0 and 1 (fallback 0), allowed at step 2
  (length_generated == min_gen_length), giving the end beam [0, 0, 1] (length 3) and the done row."""
  toks, state = _hand_run([[1, 1, 1, 1, 1], [2, 4, 2, 4, 0], [1, 2, 3, 2, 6]])
  np.testing.assert_array_equal(toks[0, :2], [0, 0])
  # Row 1 (row 0 of the n-gram case) also gets an end beam at step 3: with 4 banned the two candidates are 0 (it
  # continues) and the end token 1, which comes after the K-th continuing candidate but before the next one.
  np.testing.assert_array_equal(state.end_count, [1, 1, 0])
  np.testing.assert_array_equal(state.end_tokens[0, 0, :3], [0, 0, 1])
  assert state.end_lengths[0, 0] == 3 and state.done[0]
  np.testing.assert_array_equal(toks[0, 3:], [HAND.pad_token_id] * 2)  # frozen once done
  np.testing.assert_array_equal(toks[2], [0, 2, 3, 2, 6])
  assert not state.done[2]


def test_banned_prefix_only_at_its_step():
  toks, _ = _hand_run([[5, 4, 5, 3, 4], [3, 4, 5, 3, 4], [2, 4, 5, 6, 6]])
  np.testing.assert_array_equal(toks, [
      [0, 4, 5, 3, 4],  # 5 banned at step 0 only; (3, 4) does not apply after 0
      [3, 0, 5, 3, 4],  # 4 banned at step 1 after 3; not at step 4
      [2, 4, 5, 6, 6],  # nothing applies
  ])


def test_invalid_slices_never_produced():
  # The first parity config (invalid_slices=(9,), K=3, consider_end=False), with id 9 boosted by 20.
  cfg = _parity_config(0)
  invalid = cfg.invalid_slices
  table = _logit_table(11)[:, :, :3]
  table[..., list(invalid)] += 20.0
  state = bs.init_beam_state(cfg, 2, STEPS, jnp.asarray([3, 9]), context_tail=jnp.asarray([[1, 2], [3, 4]]))
  for step in range(STEPS):
    state, _, tok = bs.beam_step(cfg, state, jnp.asarray(table[step]))
    assert not np.isin(np.asarray(tok), invalid).any()
  tokens, lengths, _ = jax.device_get(bs.finalize(cfg, state))
  for b in range(2):
    for j in range(3):
      assert not np.isin(tokens[b, j, :lengths[b, j]], invalid).any()
  assert (lengths > 0).any()
  assert not np.isin(jax.device_get(state.tokens), invalid).any()


def test_sampled_candidates():
  """Non-deterministic mode: C = 2 candidates sampled without replacement from p = [0.5, 0.3, 0.2]; the live beam
  is the better of the two, so P(token 0) = 1 - P(pair {1, 2}) with P({1, 2}) = .3*.2/.7 + .2*.3/.8, P(2) = 0."""
  cfg = bs.BeamSearchConfig(num_beams=1)
  n = 3000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.5, 0.3, 0.2])), (n, 1, 3))
  state = bs.init_beam_state(cfg, n, 2, jnp.full((n,), 4))
  _, _, tok = bs.beam_step(cfg, state, logits, _key(1))
  _, _, again = bs.beam_step(cfg, state, logits, _key(1))
  np.testing.assert_array_equal(np.asarray(tok), np.asarray(again))  # deterministic for a key
  freq = np.bincount(np.asarray(tok)[:, 0], minlength=3) / n
  p12 = .3 * .2 / .7 + .2 * .3 / .8
  np.testing.assert_allclose(freq, [1 - p12, p12, 0.0], atol=0.03)  # ~4.5 sigma


def test_beam_config_validation():
  for kw, flag in [(dict(num_beams=0), '--num-beams'), (dict(num_beams=2, length_penalty=float('nan')),
                                                         '--length-penalty'),
                   (dict(num_beams=2, no_repeat_ngram_size=-1), '--no-repeat-ngram-size'),
                   (dict(num_beams=2, min_gen_length=-2), '--min-gen-length'),
                   (dict(num_beams=2, end_tokens=(1, -1)), 'end_tokens'),
                   (dict(num_beams=2, banned_prefixes=((),)), 'banned_prefixes')]:
    with pytest.raises(ValueError, match=flag):
      bs.BeamSearchConfig(**kw).validate()
  cfg = bs.BeamSearchConfig(num_beams=2, end_tokens=[1, 2], banned_prefixes=[[3, 4]]).validate()
  assert cfg.end_tokens == (1, 2) and cfg.banned_prefixes == ((3, 4),) and hash(cfg) is not None
  assert cfg.num_candidates == 6
  with pytest.raises(ValueError, match='vocabulary'):
    bs.beam_step(cfg, bs.init_beam_state(cfg, 1, 2, jnp.asarray([3])), jnp.zeros((1, 2, 5)), None)


# ------------------------------------------------------------------------------------------------------------------
# Sampling.

def test_top_k_keeps_the_k_largest_per_row():
  logits = jnp.asarray([[0.1, 2.0, -1.0, 3.0, 0.5, 1.0],
                        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                        [1.0, 1.0, 1.0, 0.0, 2.0, -3.0]])  # row 2: ties with the 2nd value are all kept
  out = np.asarray(sp.top_k_top_p_filter(logits, top_k=2, top_p=0.0))
  keep = out > NEG
  np.testing.assert_array_equal(keep, [[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0]])
  np.testing.assert_array_equal(out[keep], np.asarray(logits)[keep])
  assert (out[~keep] == NEG).all()
  assert (np.asarray(sp.top_k_top_p_filter(logits, top_k=10)) == np.asarray(logits)).all()


def test_top_p_nucleus_per_row():
  # Row 0: probs [0.5, 0.3, 0.15, 0.05], scrambled: cumsum 0.5, 0.8, 0.95, 1.0.
  # p = 0.7 keeps 0.5 and 0.3 (0.3 is the first to cross); p = 0.9 keeps three; 0.96 keeps all.
  # Row 1: probs [0.05, 0.88, 0.04, 0.03], cumsum 0.88, 0.93, 0.97, 1.0: p = 0.7 keeps 1, 0.9 keeps 2, 0.96 keeps 3.
  probs = np.asarray([[0.15, 0.5, 0.05, 0.3], [0.05, 0.88, 0.04, 0.03]])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  keep = lambda p: np.asarray(sp.top_k_top_p_filter(logits, top_p=p)) > NEG
  np.testing.assert_array_equal(keep(0.7), [[0, 1, 0, 1], [0, 1, 0, 0]])
  np.testing.assert_array_equal(keep(0.9), [[1, 1, 0, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(keep(0.96), [[1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(keep(1.0), np.ones((2, 4), bool))
  # top-k first, then top-p on what is left: k=2 leaves {0.5, 0.3} renormalised to {0.625, 0.375}: p=0.6 keeps 1.
  np.testing.assert_array_equal(np.asarray(sp.top_k_top_p_filter(logits, top_k=2, top_p=0.6))[0] > NEG,
                                [0, 1, 0, 0])


def _chi2(counts, probs):
  n = counts.sum()
  on = probs > 0
  assert (counts[~on] == 0).all()
  exp = n * probs[on]
  return ((counts[on] - exp) ** 2 / exp).sum()


BASE = np.asarray([2.0, 1.0, 0.5, 0.0, -0.5, 1.5], np.float32)
N_DRAWS = 20000


def _draw(key, temperature, top_p, invalid=(), logits=None):
  """N_DRAWS samples of BASE with top_k=3 (one compiled sampler: temperature, top_p's value and the mask are
  operands)."""
  mask = jnp.asarray(np.isin(np.arange(6), invalid))
  logits = jnp.broadcast_to(jnp.asarray(BASE), (N_DRAWS, 6)) if logits is None else logits
  return sp.sample_tokens(logits, key, temperature=temperature, top_k=3, top_p=top_p, invalid_mask_V=mask)


def test_sampling_frequencies_match_the_filtered_distribution():
  # temperature 0.7, top-k 3: tokens 0, 5, 1 with softmax(BASE / 0.7) restricted to them (cumsum 0.58, 0.86, 1.0,
  # so top_p = 0.99 removes nothing more).
  tok = np.asarray(_draw(_key(0), 0.7, 0.99))
  z = np.exp(BASE / 0.7) * np.isin(np.arange(6), [0, 1, 5])
  assert _chi2(np.bincount(tok, minlength=6), z / z.sum()) < 16.3  # df 2, p ~ 3e-4
  # temperature 2, token 0 invalid, top-k 3 leaves 5, 1, 2 (probs .42, .33, .25), then top-p 0.6 keeps 5 and 1.
  tok = np.asarray(_draw(_key(1), 2.0, 0.6, invalid=(0,)))
  t = BASE / 2.0
  t[0] = NEG
  t[np.argsort(-t, kind='stable')[3:]] = NEG  # top-k 3
  p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
  order = np.argsort(-p, kind='stable')
  kept = order[np.concatenate([[True], np.cumsum(p[order])[:-1] <= 0.6])]
  assert sorted(kept) == [1, 5]
  q = np.where(np.isin(np.arange(6), kept), p, 0.0)
  assert _chi2(np.bincount(tok, minlength=6), q / q.sum()) < 10.9  # df 1, p ~ 1e-3


def test_temperature_and_determinism():
  key = _key(7)
  a = _draw(key, 0.7, 0.99)
  np.testing.assert_array_equal(a, _draw(key, 0.7, 0.99))
  logits = jnp.broadcast_to(jnp.asarray(BASE), (N_DRAWS, 6))
  np.testing.assert_array_equal(a, _draw(key, 1.0, 0.99, logits=logits / 0.7))  # temperature = logits / T
  assert (np.asarray(a) != np.asarray(_draw(_key(8), 0.7, 0.99))).any()
  assert a.dtype == jnp.int32 and a.shape == (N_DRAWS,)
  # Traceable with a traced temperature (as inside a jitted decode loop).
  out = jax.eval_shape(lambda l, k, t: sp.sample_tokens(l, k, temperature=t, top_k=2, top_p=0.9), logits, key, 0.5)
  assert out.shape == (N_DRAWS,) and out.dtype == jnp.int32


def test_default_key_type_traces():
  key = jax.random.key(0)  # threefry2x32
  logits = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  assert jax.eval_shape(lambda l, k: sp.sample_tokens(l, k, top_k=2), logits, key).shape == (4,)
  cfg = bs.BeamSearchConfig(num_beams=1)
  state = bs.init_beam_state(cfg, 4, 2, jnp.full((4,), 3))
  out = jax.eval_shape(lambda s, l, k: bs.beam_step(cfg, s, l, k), state, jax.ShapeDtypeStruct((4, 1, 6), jnp.float32),
                       key)
  assert out[2].shape == (4, 1)


def test_greedy():
  logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 5.0, 0.0], [2.0, 9.0, 1.0, 1.0]])
  np.testing.assert_array_equal(sp.greedy_tokens(logits), [1, 0, 1])
  np.testing.assert_array_equal(sp.greedy_tokens(logits, jnp.asarray([True, True, False, False])), [2, 2, 2])


def test_sampling_validation_names_the_flag():
  sp.validate_sampling(1.0, 0, 0.0)
  sp.validate_sampling(0.7, 40, 1.0)
  for args, flag in [((0.0, 0, 0.0), '--temperature'), ((-1.0, 0, 0.0), '--temperature'),
                     ((1.0, -1, 0.0), '--top_k'), ((1.0, 2.5, 0.0), '--top_k'), ((1.0, 0, 1.5), '--top_p'),
                     ((1.0, 0, -0.1), '--top_p')]:
    with pytest.raises(ValueError, match=flag):
      sp.validate_sampling(*args)
  x = jnp.asarray([[1.0, 2.0]])
  np.testing.assert_array_equal(sp.apply_invalid(x, jnp.asarray([False, True])), [[1.0, NEG]])
