"""The decode loop (glm_jax/generation/decode.py) against SAT's GLM130B and against full forwards, on a tiny model.

The tiny random model is PARITY_MODEL with init_std 0.1 and the final LayerNorm's scale negated: with the plain init
the tied embedding makes the model copy its input token (the DeepNorm skip path carries it to the output), so every
greedy path would be one repeated token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glm_jax import GLM, from_sat_state_dict, layouts, weights
from glm_jax.generation import decode as D
from glm_jax.generation.beam_search import BeamSearchConfig
from glm_jax.model import weight_specs
from tests import sat_reference as R
from tests.conftest import PARITY_MODEL, load_config

torch.set_num_threads(1)
REL_TOL = 1e-4
TIE = 1e-4  # a reference top-2 margin at or below this is a near tie: either token is right
IDS = layouts.SpecialIds(mask=500, gmask=501, smask=502, sop=504, eop=505, eos=506)
N_GEN = 12
FULL_ROWS = 48  # batch size of the uncached reference forwards


def _prompt(rng, n, kind):
  """(context ending with <sop>, mask_position, use_gmask) as generate.py builds them (§5.1 steps 1-6)."""
  ids = [int(t) for t in rng.integers(1, 500, n)]
  if kind in ('MASK', 'sMASK'):
    ids.insert(n // 2, IDS.mask if kind == 'MASK' else IDS.smask)
  blank = layouts.prepare_blank_filling(ids, IDS)
  return blank.seq + [IDS.sop], blank.seq.index(blank.generation_mask), blank.use_gmask


def _models(position_encoding_2d=False, seed=5):
  sat = R.build_sat_glm130b(**PARITY_MODEL, position_encoding_2d=position_encoding_2d, seed=seed, init_std=0.1)
  sd = {k: -v if k == 'transformer.final_layernorm.weight' else v for k, v in R.state_dict_numpy(sat).items()}
  R.load_state_dict_numpy(sat, sd)
  config = load_config('tiny', **PARITY_MODEL, position_encoding_2d=position_encoding_2d)
  model = GLM(config.model)
  params = jax.tree.map(jnp.asarray, from_sat_state_dict(sd, config.model))
  forward = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))
  decoder = D.Decoder(config.model)
  return sat, decoder.prepare(params), decoder, functools.partial(forward, params)


@pytest.fixture(scope='module')
def setup():
  sat, params, decoder, forward = _models()
  rng = np.random.default_rng(0)
  prompts = [_prompt(rng, 7, 'MASK'), _prompt(rng, 20, 'gMASK'), _prompt(rng, 11, 'sMASK')]
  return sat, params, decoder, forward, prompts


def _unzip(prompts):
  return [p[0] for p in prompts], [p[1] for p in prompts], [p[2] for p in prompts]


def _margin(logits):
  top = np.sort(logits)[-2:]
  return top[1] - top[0]


def _assert_close(ours, ref):
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= REL_TOL * np.abs(ref).max(), f'max|Δ|={err:.3g}, max|ref|={np.abs(ref).max():.3g}'


def _sat_greedy(sat, context, mask_position, gmask, n):
  """GLM-130B's batch_filling_sequence with top_k=1 for one prompt: prefill, then one token per step with mems.

  Mask and positions straight from §5.1 step 7 (get_masks_and_position_ids). Returns (tokens, logits [n, V]).
  """
  c, total = len(context), len(context) + n
  may = np.tril(np.ones((total, total), bool))
  may[:, :c - 1] = True
  pos = np.arange(total)
  if not gmask:
    pos[c - 1:] = mask_position
  tok = np.zeros(total, np.int64)
  tok[:c] = context
  logits, mems = R.sat_forward(sat, tok[None, :c], pos[None, :c], may[None, None, :c, :c])
  cur, out, step_logits = logits[0, c - 1], [], []
  for j in range(n):
    step_logits.append(cur)
    tok[c + j] = int(np.argmax(cur))
    out.append(int(tok[c + j]))
    if j + 1 < n:
      s = slice(c + j, c + j + 1)
      logits, mems = R.sat_forward(sat, tok[None, s], pos[None, s], may[None, None, s, :c + j + 1], mems=mems)
      cur = logits[0, 0]
  return out, np.stack(step_logits)


def _full_forward_rows(forward, rows, length, two_d=False):
  """Uncached forwards: rows = [(context, mask_position, use_gmask, generated)]; returns, per row, the logits at
  <sop> and at every generated token ([len(generated) + 1, V]), from one padded batch of generation layouts."""
  lays, spans = [], []
  for context, m, gmask, gen in rows:
    lay = layouts.generation_layout(context, m, len(gen), use_gmask=gmask, position_encoding_2d=two_d)
    lays.append(layouts.Layout(tokens=np.concatenate([lay.tokens[:len(context)], np.asarray(gen, np.int32)]),
                               position_ids=lay.position_ids, attention_mask=lay.attention_mask))
    spans.append((len(context) - 1, len(context) + len(gen)))
  lays += lays[:1] * (FULL_ROWS - len(lays))  # one batch shape for every call: one compile
  batch = layouts.pad_batch(lays, length=length)
  logits = np.asarray(forward(batch.tokens, batch.position_ids, batch.attention_mask))
  return [logits[i, a:b] for i, (a, b) in enumerate(spans)]


def test_length_buckets():
  assert D.length_buckets(200) == (16, 32, 64, 128, 192, 256)
  assert [D.bucket_length(n) for n in (1, 16, 17, 64, 65, 129, 2000)] == [16, 16, 32, 64, 128, 192, 2048]
  assert D.bucket_length(40, buckets=(8, 48, 96)) == 48
  assert D.bucket_length(100, buckets=(8, 48, 96)) == 128  # past the caller's buckets: the default policy


def test_greedy_matches_sat_greedy_loop(setup):
  """Token for token against SAT's prefill + mems loop, batch of [MASK], [gMASK], [sMASK] prompts of different
  lengths. Where the paths part, the reference must be at a near tie; then ours is re-run with the reference's
  tokens forced up to there. Along the reference path, every step's logits match SAT's."""
  sat, params, decoder, _, prompts = setup
  contexts, mask_positions, gmask = _unzip(prompts)
  refs = [_sat_greedy(sat, c, m, g, N_GEN) for c, m, g in prompts]
  forced = [[] for _ in prompts]
  for _ in range(5):
    out = decoder.generate(params, contexts, mask_positions, gmask, max_gen_length=N_GEN, prefix_tokens=forced,
                           return_debug=True)
    parted = False
    for b, (ref_tokens, ref_logits) in enumerate(refs):
      assert len(out.tokens[b]) == N_GEN
      diff = [j for j in range(N_GEN) if out.tokens[b][j] != ref_tokens[j]]
      if diff:
        j = diff[0]
        assert _margin(ref_logits[j]) <= TIE, f'prompt {b} step {j}: {out.tokens[b][j]} != {ref_tokens[j]}'
        forced[b] = ref_tokens[:j + 1]
        parted = True
    if not parted:
      break
  else:
    pytest.fail('paths kept parting')
  assert out.debug['num_steps'] == N_GEN
  for b, (_, ref_logits) in enumerate(refs):
    for j in range(N_GEN):
      _assert_close(out.debug['logits'][j, b], ref_logits[j])


def test_sampled_path_matches_full_forward_and_is_seeded(setup):
  """Cached decoding equals the uncached forward's last-token logits along a sampled path; seeds fix the path."""
  _, params, decoder, forward, prompts = setup
  contexts, mask_positions, gmask = _unzip(prompts)
  strategy = D.SamplingConfig(temperature=1.0, top_k=40, top_p=0.95)
  kw = dict(max_gen_length=N_GEN, strategy=strategy, return_debug=True)
  out = decoder.generate(params, contexts, mask_positions, gmask, seed=1, **kw)
  full = _full_forward_rows(forward, [p + (out.tokens[b],) for b, p in enumerate(prompts)], 48)
  for b in range(len(prompts)):
    assert len(out.tokens[b]) == N_GEN
    for j in range(N_GEN):
      _assert_close(out.debug['logits'][j, b], full[b][j])
  again = decoder.generate(params, contexts, mask_positions, gmask, seed=1, **kw)
  other = decoder.generate(params, contexts, mask_positions, gmask, seed=2, **kw)
  assert again.tokens == out.tokens
  assert other.tokens != out.tokens


def test_beam_search_reorders_the_cache(setup):
  """With 3 beams, the logits the loop used for beam k at step i equal a full forward over that beam's row: the
  context plus the beam's history, rebuilt from the recorded (parent, token) of every step."""
  _, params, decoder, forward, prompts = setup
  prompts = prompts[:2]
  contexts, mask_positions, gmask = _unzip(prompts)
  n, k = 8, 3
  cfg = BeamSearchConfig(num_beams=k, consider_end=True, deterministic=True)
  out = decoder.generate(params, contexts, mask_positions, gmask, max_gen_length=n, strategy=cfg, return_debug=True)
  dbg = out.debug
  assert dbg['num_steps'] == n
  parents, tokens, logits = dbg['parents'], dbg['tokens'], dbg['logits']
  assert (parents[1:] != np.arange(k)).any(), 'no beam ever changed parent: the test would prove nothing'
  hist = [[[int(tokens[0, b, j])] for j in range(k)] for b in range(len(prompts))]
  rows, where = [], []
  for i in range(1, n):
    for b in range(len(prompts)):
      for j in range(k):  # row b*K + j at step i is beam j after step i-1
        rows.append(prompts[b] + (hist[b][j],))
        where.append((i, b * k + j))
      hist[b] = [hist[b][parents[i, b, j]] + [int(tokens[i, b, j])] for j in range(k)]
  full = _full_forward_rows(forward, rows, 48)
  for (i, r), f in zip(where, full):
    _assert_close(logits[i, r], f[-1])
  # Step 0: every beam saw the <sop> logits.
  first = _full_forward_rows(forward, [p + ([],) for p in prompts], 48)
  for b in range(len(prompts)):
    for j in range(k):
      _assert_close(logits[0, b * k + j], first[b][0])
  # finalize's beams are the live histories (no end token, consider_end), best first.
  for b in range(len(prompts)):
    assert len(out.beams[b]) == k and out.tokens[b] == out.beams[b][0]
    assert sorted(map(tuple, out.beams[b])) == sorted(map(tuple, hist[b]))
    assert out.beam_scores[b] == sorted(out.beam_scores[b], reverse=True)


def test_padding_and_buckets(setup):
  """A prompt alone and batched with a longer one (another prompt bucket) decodes identically; new prompt lengths
  and max_gen_length inside the same buckets reuse the compiled program."""
  _, params, decoder, _, prompts = setup
  rng = np.random.default_rng(7)
  short = prompts[0]
  alone = decoder.generate(params, *_unzip([short]), max_gen_length=N_GEN, return_debug=True)
  assert (1, 16, 32, D.GREEDY, True) in decoder.trace_counts  # (B, P, T = P + G, strategy, debug)
  batched = decoder.generate(params, *_unzip(prompts), max_gen_length=N_GEN, return_debug=True)  # P = 32
  assert batched.tokens[0] == alone.tokens[0]
  np.testing.assert_allclose(batched.debug['logits'][:, 0], alone.debug['logits'][:, 0], rtol=1e-5, atol=1e-5)

  before = dict(decoder.trace_counts)
  other = _prompt(rng, 9, 'MASK')  # 9 + [MASK] + eos + <sop> = 12 tokens: the same 16 bucket as `short` (10)
  assert len(other[0]) != len(short[0])
  decoder.generate(params, *_unzip([other]), max_gen_length=N_GEN - 3, return_debug=True)
  assert dict(decoder.trace_counts) == before


def test_end_tokens_and_min_gen_length(setup):
  _, params, decoder, _, prompts = setup
  args = _unzip(prompts)
  free = decoder.generate(params, *args, max_gen_length=N_GEN, return_debug=True).tokens
  # Every row ends at its own step-2 token (or earlier, if that token shows up before).
  ends = tuple(sorted({row[2] for row in free}))
  out = decoder.generate(params, *args, max_gen_length=N_GEN, end_tokens=ends, return_debug=True)
  cut = [next(j for j, t in enumerate(row) if t in ends) + 1 for row in free]
  assert out.tokens == [row[:c] for row, c in zip(free, cut)]
  assert out.debug['num_steps'] == max(cut)  # the loop stops once every row is done
  # min_gen_length bans the end tokens for the first 5 tokens.
  late = decoder.generate(params, *args, max_gen_length=N_GEN, end_tokens=ends, min_gen_length=5, return_debug=True)
  for b, row in enumerate(late.tokens):
    assert not set(row[:5]) & set(ends)
    assert row[:cut[b] - 1] == free[b][:cut[b] - 1]  # the same path until the first banned end token
    lg = late.debug['logits'][cut[b] - 1, b].copy()
    lg[list(ends)] = -np.inf
    assert row[cut[b] - 1] == int(np.argmax(lg))
  # prefix_tokens forces the first tokens of a row (teacher forcing); the others are untouched.
  forced = decoder.generate(params, *args, max_gen_length=N_GEN, prefix_tokens=[[], [7, 8, 9], []], return_debug=True)
  assert forced.tokens[0] == free[0] and forced.tokens[2] == free[2]
  assert forced.tokens[1][:3] == [7, 8, 9] and forced.tokens[1] != free[1]


def test_2d_positions_cached_equals_full_forward(setup):
  """ChatGLM-style 2-D positions ([B, 2, S]) through the same loop: cached logits equal the full forward's."""
  _, params, decoder, forward = _models(position_encoding_2d=True, seed=4)
  prompts = setup[-1][:2]
  out = decoder.generate(params, *_unzip(prompts), max_gen_length=N_GEN, return_debug=True)
  full = _full_forward_rows(forward, [p + (out.tokens[b],) for b, p in enumerate(prompts)], 48, two_d=True)
  for b in range(len(prompts)):
    assert len(out.tokens[b]) == N_GEN
    for j in range(N_GEN):
      _assert_close(out.debug['logits'][j, b], full[b][j])


def test_decoding_on_a_mesh_equals_one_device(setup):
  """Decoding with the weights split over 'tensor' (heads, GeGLU width, vocabulary) and the batch over 'data' gives
  one device's per-step logits and tokens, for greedy and beam search."""
  from glm_jax import sharding
  _, params, decoder, _, prompts = setup
  config = load_config('tiny', **PARITY_MODEL)
  config.mesh.data, config.mesh.tensor = 2, 4
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config)
  on_mesh = D.Decoder(config.model, mesh=mesh, rules=rules)
  split = on_mesh.prepare(weights.to_checkpoint_params(params, weight_specs(decoder.cfg), decoder.weight_format))
  assert split['layers_0']['mlp']['h_to_4h_kernel'].sharding.spec[1] == 'tensor'  # [2, F, D]: F over 'tensor'
  assert split['word_embeddings'].sharding.spec[0] == 'tensor'
  contexts, mask_positions, gmask = _unzip(prompts[:2])
  for strategy in (D.GREEDY, BeamSearchConfig(num_beams=3, consider_end=True, deterministic=True)):
    ref, out = (d.generate(p, contexts, mask_positions, gmask, max_gen_length=6, strategy=strategy,
                           return_debug=True) for d, p in ((decoder, params), (on_mesh, split)))
    _assert_close(out.debug['logits'], ref.debug['logits'])
    assert out.tokens == ref.tokens and out.beams == ref.beams
  with pytest.raises(ValueError, match='both mesh and rules'):
    D.Decoder(config.model, mesh=mesh)
