"""The fast decoding core: batched prefill into a key/value cache, then one jit-compiled `lax.while_loop`.

    decoder = Decoder(config.model)
    weights = decoder.prepare(params)     # the one copy of the weights it runs: per layer, in its weight format
    out = decoder.generate(weights, contexts, mask_positions, use_gmask, max_gen_length=64,
                           strategy=SamplingConfig(greedy=True), end_tokens=(eos, eop))
    out.tokens[i]          # prompt i's generated ids (end token kept, as G130's batch_filling_sequence returns)

Layout (glm130b.md §5.1 step 7, §5.2, §10 items 3, 9, 17). Prompt b is a context `contexts[b]` of C_b ids ending
with <sop>, its blank at mask_positions[b]. Its row semantics come from `layouts.generation_layout`: the context before
<sop> bidirectional (mask tokens and eos included), <sop> and the generated tokens causal; positions arange, and for
[MASK]/[sMASK] (use_gmask False) <sop> and every generated token sit at the mask's position, for [gMASK] they continue.
A batch is right-padded to a common bucketed length P (padding: token 0, position 0, fully masked rows and columns).
The cache holds T = P + G columns, G = the bucketed max_gen_length: generated token j is written at column P + j,
after the padded length (§10 item 17), and sees its own context columns [0, C_b) plus the generated columns so far.
The first generated token is read from the prefill logits at each row's own <sop> row, C_b - 1.
With `unidirectional=True` (GLM-130B's unidirectional generation tasks, §7.3) a context is [gMASK, <sop>] + text,
fully causal (`layouts.unidirectional_generation_layout`), and generation continues after the text's last row.

Buckets (`length_buckets`): powers of two from 16 up to 64, then multiples of 64. P = the smallest bucket that holds
the longest context, G = the smallest that holds max_gen_length (or the caller's own bucket list). Prompts whose
lengths and max_gen_length fall in the same buckets reuse one compiled program.

Weights: `Decoder.prepare` converts checkpoint-layout params, once, into what the decoder runs: per-layer arrays in
the weight format `decode_format` picks (glm_jax/weights.py: 'packed' for the CPU kernels when decoding float32 on CPU
without a mesh, else output-major 'out_in'; or the quantized format asked for, quantize/formats.py). `generate` and `score` take that tree; the decoder keeps no copy. With
`Decoder(..., mesh=, rules=)` the weights are placed on the mesh by the axis rules and the programs run under it.

Streaming: `generate(..., on_tokens=f)` (greedy / sampling) calls f(step, tokens [B]) from inside the compiled loop
as each token is fed back (`jax.debug.callback`), and once more with the last token: the same program but for that
callback (compiled separately), so the tokens equal those of a call without it.

Compile cache: one `jax.jit` per Decoder; its cache key is (params shapes, batch B, P, G, strategy, debug, stream);
all the rest (tokens, positions, masks, context lengths, max_gen_length, min_gen_length, end tokens, forced tokens,
seed) is traced data. `Decoder.trace_counts` counts traces per (B, P, T = P + G, strategy, debug) key.

Strategies:
- `SamplingConfig` (greedy or temperature / top-k / top-p sampling, glm130b.md §5.3): after a row emits an end token
  it is done and its later tokens are -1 (as G130's BaseStrategy); the loop stops when every row is done or
  max_gen_length tokens were generated. End tokens are banned until min_gen_length tokens exist.
- `BeamSearchConfig` (glm_jax/generation/beam_search.py, §5.4): the prefilled cache's B rows are repeated to B*K
  (row b*K + k is beam k of prompt b); after every `beam_step` the cache rows are gathered by the
  step's parent indices (flat row b*K + parent[b, k]), so each beam's cache always holds its own history.

Randomness: the step-i key is `fold_in(PRNGKey(seed), i)`; the same seed, prompts and batch give the same tokens.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import cpu_kernels, layouts, sharding, weights
from glm_jax.generation import beam_search as beam_lib
from glm_jax.generation import sampling as sampling_lib
from glm_jax.kv_cache import init_cache, take_cache_rows
from glm_jax.model import GLM, MASKED_SCORE, GLMConfig, attention_context, weight_specs

# ------------------------------------------------------------------------------------------------------------------
# Strategy configs and buckets


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Greedy (greedy=True; temperature/top_k/top_p ignored) or sampling as G130's BaseStrategy (§5.3).

  invalid_ids: token ids that are never produced (G130's invalid_slices). Part of the compile key.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 0.0
  greedy: bool = False
  invalid_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'invalid_ids', tuple(int(t) for t in self.invalid_ids))


GREEDY = SamplingConfig(greedy=True)

MIN_BUCKET = 16
BUCKET_STEP = 64


def length_buckets(max_length: int, *, min_bucket: int = MIN_BUCKET, step: int = BUCKET_STEP) -> tuple[int, ...]:
  """Bucket sizes up to (and including the first one >= ) max_length: min_bucket, 2*min_bucket, ... (powers of two)
  up to `step`, then multiples of `step`. E.g. (16, 32, 64, 128, 192, 256, ...)."""
  out = []
  b = min_bucket
  while b < step:
    out.append(b)
    if b >= max_length:
      return tuple(out)
    b *= 2
  b = step
  while True:
    out.append(b)
    if b >= max_length:
      return tuple(out)
    b += step


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
  """The smallest bucket >= n: from `buckets` when given (falling back to the default policy past its end), else
  from `length_buckets`."""
  if n < 1:
    raise ValueError(f'length must be >= 1, got {n}')
  if buckets:
    fits = [int(b) for b in buckets if int(b) >= n]
    if fits:
      return min(fits)
  return length_buckets(n)[-1]


# ------------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class DecodeOutput:
  """What `Decoder.generate` returns.

  tokens: per prompt, the generated ids (best beam for beam search, [] if no beam finished). They stop after the
    first end token, which is kept (G130's batch_filling_sequence output cut at the first -1; fill_blanks drops it).
  beams / beam_scores: beam search only; per prompt the finished beams best-first (up to K; beam_search.finalize:
    with consider_end unfinished rows add their live beams) and their length-penalised scores.
  debug: with `return_debug=True`, numpy arrays of what the loop did at every step i (for i < num_steps):
    'logits' [num_steps, R, V] the raw model logits the strategy saw (R = B, or B*K rows, beam k of prompt b at b*K+k),
    'tokens' [num_steps, B] or [num_steps, B, K] the tokens chosen (before -1 masking), and for beams
    'parents' [num_steps, B, K]. 'num_steps' is the number of steps that ran.
  """
  tokens: list[list[int]]
  beams: list[list[list[int]]] | None = None
  beam_scores: list[list[float]] | None = None
  debug: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------------------------
# Host-side batch building


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
  tokens: np.ndarray  # int32 [B, P]
  positions: np.ndarray  # int32 [B, P] or [B, 2, P]
  prefill_mask: np.ndarray  # bool [B, P, P]
  context_visible: np.ndarray  # bool [B, P]: the context columns a generated row sees
  gen_positions: np.ndarray  # int32 [B, G] or [B, 2, G]: position of generated token j
  context_lengths: np.ndarray  # int32 [B]


def build_batch(contexts: Sequence[Sequence[int]], mask_positions: Sequence[int], use_gmask: Sequence[bool], *,
                prompt_bucket: int, gen_bucket: int, position_encoding_2d: bool, unidirectional: bool = False) -> _Batch:
  """Right-pads every prompt's `generation_layout` (or `unidirectional_generation_layout`) to P = prompt_bucket and
  extracts what the loop needs."""
  b, p, g = len(contexts), prompt_bucket, gen_bucket
  pos_shape = (b, 2) if position_encoding_2d else (b,)
  tokens = np.zeros((b, p), np.int32)
  positions = np.zeros(pos_shape + (p,), np.int32)
  prefill_mask = np.zeros((b, p, p), bool)
  context_visible = np.zeros((b, p), bool)
  gen_positions = np.zeros(pos_shape + (g,), np.int32)
  lengths = np.zeros(b, np.int32)
  for i, (seq, m, gm) in enumerate(zip(contexts, mask_positions, use_gmask)):
    c = len(seq)
    if unidirectional:
      lay = layouts.unidirectional_generation_layout(seq, g, position_encoding_2d=position_encoding_2d)
    else:
      lay = layouts.generation_layout(seq, int(m), g, use_gmask=bool(gm), position_encoding_2d=position_encoding_2d)
    mask = lay.attention_mask
    # The loop's compact form of the generated rows: one context view shared by every generated row, and a causal
    # block over the generated columns. Both hold for every GLM generation layout; check rather than assume.
    if not (mask[c:, :c] == mask[c, :c]).all() or not np.array_equal(mask[c:, c:], np.tril(np.ones((g, g), bool))):
      raise AssertionError('generation_layout changed shape: generated rows are no longer (context view, causal)')
    tokens[i, :c] = lay.tokens[:c]
    positions[i, ..., :c] = lay.position_ids[..., :c]
    prefill_mask[i, :c, :c] = mask[:c, :c]
    context_visible[i, :c] = mask[c, :c]
    gen_positions[i] = lay.position_ids[..., c:]
    lengths[i] = c
  return _Batch(tokens, positions, prefill_mask, context_visible, gen_positions, lengths)


# ------------------------------------------------------------------------------------------------------------------
# The decoder


def _take_last(x, i):
  """x[..., i:i+1] for a traced i."""
  return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=x.ndim - 1)


def decode_format(cfg: GLMConfig, mesh=None, quantized: str | None = None) -> tuple[str, Callable | None]:
  """The one place that decides how decoding runs a model: (weight format, decode-step attention or None for XLA's).
  The CPU kernels (glm_jax/cpu_kernels.py: the 'packed' format and the decode attention) for float32 on CPU without
  a mesh, where they build; elsewhere output-major 'out_in' weights and XLA's attention. `quantized`: a quantized
  format name (quantize/formats.py: 'int4', 'int8-g128', ...), which then stores the weights."""
  on_cpu = (mesh is None and jax.default_backend() == 'cpu' and cfg.dtype == 'float32'
            and cfg.param_dtype == 'float32' and cpu_kernels.available())
  attention = functools.partial(cpu_kernels.decode_context, reference=attention_context,
                                masked_score=MASKED_SCORE) if on_cpu else None
  if quantized is not None:
    return quantized, attention
  return ('packed' if on_cpu else 'out_in'), attention


class Decoder:
  """Holds the jit-compiled prefill + decode loop for one model; reuse it across calls (see module docstring)."""

  def __init__(self, config_model, *, mesh=None, rules=None, quantized: str | None = None):
    """mesh / rules (sharding.make_mesh, sharding.axis_rules): decode on a device mesh. The weights are placed by the
    rules (e.g. heads, GeGLU width and vocabulary over 'tensor'), the batch and the cache follow the model's
    activation constraints, and each program runs under the mesh. Without a mesh: the default device.
    quantized: decode with weights in this quantized format ('int4', 'int8', 'int4-g128', ...: quantize/)."""
    self.cfg = dataclasses.replace(GLMConfig.make(config_model), scan_layers=False, remat_policy='none')
    if (mesh is None) != (rules is None):
      raise ValueError('Decoder: give both mesh and rules (sharding.make_mesh, sharding.axis_rules), or neither')
    # Per-layer weights (no per-layer copy out of a stacked array at every step; each layer's cache updated in place)
    # in the format decode_format picks.
    self.weight_format, attention = decode_format(self.cfg, mesh, quantized)
    self.model = GLM(self.cfg, weight_format=self.weight_format, decode_attention=attention)
    self.mesh, self.rules = mesh, rules
    self._shardings = None
    if mesh is not None:
      self._shardings = sharding.shardings_for(sharding.abstract_params(self.model, self.cfg), mesh, rules)
    self.trace_counts: collections.Counter = collections.Counter()
    self._listener: Callable | None = None
    self._listener_error: BaseException | None = None
    self._run = jax.jit(self._program, static_argnames=('strategy', 'gen_bucket', 'debug', 'stream'))
    self._score = jax.jit(self._score_impl)

  # -- public ------------------------------------------------------------------------------------------------------

  def prepare(self, params, weight_format: str = weights.CHECKPOINT_FORMAT):
    """Parameters as the decoder runs them: per-layer arrays in its weight format, on its devices.

    params: a parameter tree (stacked or per layer; numpy on the host or jax arrays) whose big matrices are in
    `weight_format`, or an iterator of (name, subtree) pairs of the per-layer tree (model_io.read_params_by_layer).
    One top-level entry (a layer) is converted and placed at a time, so that besides the result at most one layer
    is held twice; drop `params` afterwards to keep one copy."""
    specs = weight_specs(self.cfg)
    entries = weights.unstack_layers(params).items() if isinstance(params, collections.abc.Mapping) else params
    out = {}
    for key, value in entries:
      if weight_format != self.weight_format:
        value = weights.to_checkpoint_params({key: value}, specs, weight_format)[key]
        value = weights.convert_params({key: value}, specs, self.weight_format)[key]
      out[key] = jax.device_put(value, None if self._shardings is None else self._shardings[key])
    return out

  def generate(self, params, contexts: Sequence[Sequence[int]], mask_positions: Sequence[int],
               use_gmask: Sequence[bool] | bool, *, max_gen_length: int, strategy=GREEDY,
               end_tokens: Sequence[int] = (), min_gen_length: int = 0, seed: int = 0,
               buckets: Sequence[int] | None = None, prefix_tokens: Sequence[Sequence[int]] | None = None,
               return_debug: bool = False, on_tokens: Callable[[int, np.ndarray], None] | None = None,
               unidirectional: bool = False) -> DecodeOutput:
    """Fill one blank per prompt, batched (glm130b.md §5.1-§5.4), with `params` from `prepare`.

    contexts: per prompt the context ids ending with <sop> (e.g. `build_generation_input(...)[0].tokens` without the
      -1 slots, or `seq + [sop]`); mask_positions: the blank's index; use_gmask: per prompt or one for all.
    max_gen_length: at most this many tokens per prompt (G130's out_seq_length - len(context)).
    strategy: a SamplingConfig (greedy / sampling) or a beam_search.BeamSearchConfig.
    end_tokens: ids that finish a row. min_gen_length: end tokens are banned while fewer tokens than this have been
      generated. (Beam search keeps both in its BeamSearchConfig; these arguments fill in the config's unset fields.)
    buckets: explicit length buckets for P and G (default `length_buckets`).
    prefix_tokens: per prompt, tokens forced as the first generated tokens (teacher forcing; sampling only). The
      forced tokens count as generated (an end token among them ends the row).
    return_debug: also return per-step logits and choices (DecodeOutput.debug).
    unidirectional: contexts are [gMASK, <sop>] + text, fully causal (§7.3); mask_positions are 0 and use_gmask True.
    on_tokens: streaming (greedy / sampling): called with (step, tokens [B]) as each step's tokens are known.
    """
    cfg = self.cfg
    b = len(contexts)
    if b == 0:
      raise ValueError('no prompts')
    if len(mask_positions) != b:
      raise ValueError(f'{len(mask_positions)} mask_positions for {b} contexts')
    gmask = [bool(use_gmask)] * b if isinstance(use_gmask, (bool, np.bool_)) else [bool(x) for x in use_gmask]
    if len(gmask) != b:
      raise ValueError(f'{len(gmask)} use_gmask flags for {b} contexts')
    if max_gen_length < 1:
      raise ValueError(f'max_gen_length must be >= 1, got {max_gen_length}')
    if unidirectional and (not all(gmask) or any(mask_positions)):
      raise ValueError('unidirectional generation takes [gMASK, <sop>] + text: use_gmask True, mask_positions 0')
    for i, seq in enumerate(contexts):
      if len(seq) < 1 + unidirectional:
        raise ValueError(f'context {i} is empty (it must end with <sop>)')
      if not 0 <= mask_positions[i] < len(seq) - 1:
        raise ValueError(f'context {i}: mask_position {mask_positions[i]} is outside its {len(seq) - 1} tokens '
                         'before <sop>')
    is_beam = isinstance(strategy, beam_lib.BeamSearchConfig)
    if is_beam:
      strategy = _merge_beam_ends(strategy, end_tokens, min_gen_length).validate()
      end_tokens, min_gen_length = strategy.end_tokens, strategy.min_gen_length
      if prefix_tokens is not None:
        raise ValueError('prefix_tokens is supported for greedy / sampling only')
    elif isinstance(strategy, SamplingConfig):
      if not strategy.greedy:
        sampling_lib.validate_sampling(strategy.temperature, strategy.top_k, strategy.top_p)
    else:
      raise TypeError(f'strategy must be a SamplingConfig or a BeamSearchConfig, got {type(strategy).__name__}')
    for name, ids in (('end_tokens', end_tokens), ('invalid_ids', getattr(strategy, 'invalid_ids', ()))):
      if any(not 0 <= int(t) < cfg.vocab_size for t in ids):
        raise ValueError(f'{name} {tuple(ids)} has ids outside the vocabulary [0, {cfg.vocab_size})')

    p = bucket_length(max(len(s) for s in contexts), buckets)
    g = bucket_length(max_gen_length, buckets)
    batch = build_batch(contexts, mask_positions, gmask, prompt_bucket=p, gen_bucket=g,
                        position_encoding_2d=cfg.position_encoding_2d, unidirectional=unidirectional)
    top = max(int(batch.positions.max()), int(batch.gen_positions[..., :max_gen_length].max()))
    if top >= cfg.max_sequence_length:  # the rotary table has max_sequence_length rows
      raise ValueError(f'positions reach {top} >= max_sequence_length {cfg.max_sequence_length}: shorten the '
                       'contexts or max_gen_length')
    # Slots past max_gen_length never run; clip them so that even they index the rotary table in range.
    batch = dataclasses.replace(batch, gen_positions=np.minimum(batch.gen_positions, cfg.max_sequence_length - 1))
    forced = np.full((b, g), -1, np.int32)
    if prefix_tokens is not None and len(prefix_tokens) != b:
      raise ValueError(f'{len(prefix_tokens)} prefix_tokens lists for {b} contexts')
    for i, pre in enumerate(prefix_tokens or ()):
      pre = list(pre)[:g]
      forced[i, :len(pre)] = pre
    end_mask = np.zeros(cfg.vocab_size, bool)
    end_mask[list(end_tokens)] = True
    inputs = dict(tokens=batch.tokens, positions=batch.positions, prefill_mask=batch.prefill_mask,
                  context_visible=batch.context_visible, gen_positions=batch.gen_positions,
                  context_lengths=batch.context_lengths, forced=forced, end_mask=end_mask,
                  max_gen_length=np.int32(max_gen_length), min_gen_length=np.int32(min_gen_length),
                  rng=jax.random.PRNGKey(seed))
    if is_beam and strategy.no_repeat_ngram_size > 1:  # the n-gram keys of the first tokens reach into the context
      m = strategy.no_repeat_ngram_size - 1
      tail = np.full((b, m), -1, np.int32)
      for i, seq in enumerate(contexts):
        last = [int(x) for x in seq[-m:]]
        tail[i, m - len(last):] = last
      inputs['context_tail'] = tail
    stream = on_tokens is not None and not is_beam
    self._listener, self._listener_error = on_tokens, None
    try:
      with sharding.activate(self.mesh, self.rules):
        out = self._run(params, inputs, strategy=strategy, gen_bucket=g, debug=return_debug, stream=stream)
      out = jax.device_get(out)
    finally:
      self._listener = None
    if self._listener_error is not None:
      err, self._listener_error = self._listener_error, None
      raise err
    debug = None
    if return_debug:
      n = int(out['num_steps'])
      debug = {k: v[:n] for k, v in out['debug'].items()}
      debug['num_steps'] = n
    if is_beam:
      beams, scores = [], []
      for i in range(b):
        # Empty slots (a row with fewer than K finished beams, without consider_end) are left out.
        kept = [k for k in range(out['beam_tokens'].shape[1])
                if out['beam_lengths'][i, k] > 0 or np.isfinite(out['beam_scores'][i, k])]
        beams.append([[int(t) for t in out['beam_tokens'][i, k, :out['beam_lengths'][i, k]]] for k in kept])
        scores.append([float(out['beam_scores'][i, k]) for k in kept])
      return DecodeOutput(tokens=[bs[0] if bs else [] for bs in beams], beams=beams, beam_scores=scores, debug=debug)
    tokens = []
    for row in out['tokens'][:, :max_gen_length]:
      stop = np.flatnonzero(row < 0)
      tokens.append([int(t) for t in row[:stop[0] if stop.size else len(row)]])
    if stream and len(tokens) == 1 and tokens[0]:
      # The loop never feeds back its last token: report it now (when the row ended earlier this is its end token,
      # which the listener has seen already).
      on_tokens(len(tokens[0]) - 1, np.asarray(tokens[0][-1:], np.int32))
    return DecodeOutput(tokens=tokens, debug=debug)

  def score(self, params, tokens, positions, mask, rows, targets):
    """log p(targets[j]) at row rows[j] of one sequence (tokens [1, P], positions, mask [1, 1, P, P]) under the
    `prepare`d weights: float32 [R] (multiple-choice scoring, glm130b.md §7.2)."""
    with sharding.activate(self.mesh, self.rules):
      return self._score(params, tokens, positions, mask, rows, targets)

  def _score_impl(self, params, tokens, positions, mask, rows, targets):
    logits = self.model.apply({'params': params}, tokens, positions, mask)  # [1, P, V] float32
    logp = jax.nn.log_softmax(jnp.take(logits[0], rows, axis=0), axis=-1)  # [R, V]
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]

  def _emit(self, step, tokens):
    """The streaming callback (from inside the compiled loop): an error is kept and raised by `generate`."""
    if self._listener is None or self._listener_error is not None:
      return
    try:
      self._listener(int(step), np.asarray(tokens))
    except BaseException as e:  # noqa: BLE001 - re-raised in generate(), outside the XLA runtime
      self._listener_error = e

  # -- the compiled program ----------------------------------------------------------------------------------------

  def _forward(self, params, tokens, positions, mask, cache, index, logits_index=None):
    return self.model.apply({'params': params}, tokens, positions, mask, cache=cache, cache_index=index,
                                    logits_index=logits_index)

  def _program(self, params, inputs, *, strategy, gen_bucket, debug, stream):
    b, p = inputs['tokens'].shape
    g = gen_bucket
    t = p + g
    self.trace_counts[(b, p, t, strategy, debug)] += 1

    # Prefill: the padded contexts into columns [0, P) of a fresh cache (per layer [B*N, T, H]).
    mask = jnp.pad(inputs['prefill_mask'], ((0, 0), (0, 0), (0, g)))[:, None]
    logits, cache = self._forward(params, inputs['tokens'], inputs['positions'], mask,
                                  init_cache(self.cfg, b, t), 0,
                                  logits_index=inputs['context_lengths'] - 1)  # only each row's <sop> row
    first_logits = logits[:, 0]

    if isinstance(strategy, beam_lib.BeamSearchConfig):
      return self._beam_loop(params, inputs, cache, first_logits, strategy, g, debug)
    return self._sampling_loop(params, inputs, cache, first_logits, strategy, g, debug, stream)

  def _step_forward(self, params, inputs, cache, last_tokens, i, rows_per_prompt, stream=False):
    """Feed generated token i-1 of every row (written at column P + i - 1); return logits [R, V] and the cache."""
    if stream:
      jax.debug.callback(self._emit, i - 1, last_tokens, ordered=True)
    p = inputs['tokens'].shape[1]
    g = inputs['forced'].shape[1]
    ctx_vis = inputs['context_visible']
    gen_pos = inputs['gen_positions']
    if rows_per_prompt > 1:
      ctx_vis = jnp.repeat(ctx_vis, rows_per_prompt, axis=0)
      gen_pos = jnp.repeat(gen_pos, rows_per_prompt, axis=0)
    r = ctx_vis.shape[0]
    gen_vis = jnp.broadcast_to(jnp.arange(g) < i, (r, g))
    mask = jnp.concatenate([ctx_vis, gen_vis], axis=1)[:, None, None, :]
    logits, cache = self._forward(params, last_tokens[:, None], _take_last(gen_pos, i - 1), mask, cache, p + i - 1)
    return logits[:, 0], cache

  def _sampling_loop(self, params, inputs, cache, first_logits, strategy: SamplingConfig, g, debug, stream):
    b, v = first_logits.shape
    invalid = np.zeros(v, bool)
    invalid[list(strategy.invalid_ids)] = True
    invalid = jnp.asarray(invalid)
    end_mask = inputs['end_mask']

    def choose(logits, i, done):
      banned = invalid | (end_mask & (i < inputs['min_gen_length']))
      if strategy.greedy:
        tok = sampling_lib.greedy_tokens(logits, banned)
      else:
        tok = sampling_lib.sample_tokens(logits, jax.random.fold_in(inputs['rng'], i),
                                         temperature=strategy.temperature, top_k=strategy.top_k,
                                         top_p=strategy.top_p, invalid_mask_V=banned)
      forced = inputs['forced'][:, i]
      tok = jnp.where(forced >= 0, forced, tok).astype(jnp.int32)
      emitted = jnp.where(done, -1, tok)
      return tok, emitted, done | end_mask[tok]

    def record(state, i, logits, tok):
      if debug:
        state['debug'] = {'logits': state['debug']['logits'].at[i].set(logits),
                          'tokens': state['debug']['tokens'].at[i].set(tok)}
      return state

    done0 = jnp.zeros(b, bool)
    tok, emitted, done = choose(first_logits, 0, done0)
    state = {'i': jnp.int32(1), 'cache': cache, 'last': tok, 'done': done,
             'tokens': jnp.full((b, g), -1, jnp.int32).at[:, 0].set(emitted)}
    if debug:
      state['debug'] = {'logits': jnp.zeros((g, b, v), jnp.float32), 'tokens': jnp.full((g, b), -1, jnp.int32)}
    state = record(state, 0, first_logits, tok)

    def cond(s):
      return (s['i'] < inputs['max_gen_length']) & ~s['done'].all()

    def body(s):
      i = s['i']
      logits, cache = self._step_forward(params, inputs, s['cache'], s['last'], i, 1, stream)
      tok, emitted, done = choose(logits, i, s['done'])
      s = dict(s, i=i + 1, cache=cache, last=tok, done=done,
               tokens=jax.lax.dynamic_update_slice_in_dim(s['tokens'], emitted[:, None], i, axis=1))
      return record(s, i, logits, tok)

    state = jax.lax.while_loop(cond, body, state)
    out = {'tokens': state['tokens'], 'num_steps': state['i']}
    if debug:
      out['debug'] = state['debug']
    return out

  def _beam_loop(self, params, inputs, cache, first_logits, cfg_beam, g, debug):
    b, v = first_logits.shape
    k = cfg_beam.num_beams
    beam_state = beam_lib.init_beam_state(cfg_beam, b, g, inputs['context_lengths'],
                                          context_tail=inputs.get('context_tail'))
    # Step 0: every beam of a prompt sees its <sop> logits (beam_step keeps only one live beam on the first step).
    beam_state, parent, tok = beam_lib.beam_step(cfg_beam, beam_state, jnp.broadcast_to(first_logits[:, None],
                                                                                         (b, k, v)),
                                                 jax.random.fold_in(inputs['rng'], 0))
    # B -> B*K cache rows: row b*K + j is beam j of prompt b. All beams share the context, so the first reorder is a
    # no-op and is skipped.
    cache = take_cache_rows(cache, jnp.repeat(jnp.arange(b), k), self.cfg.num_attention_heads)
    state = {'i': jnp.int32(1), 'cache': cache, 'last': tok.reshape(b * k).astype(jnp.int32), 'beam': beam_state}
    if debug:
      state['debug'] = {'logits': jnp.zeros((g, b * k, v), jnp.float32).at[0].set(jnp.repeat(first_logits, k, 0)),
                        'tokens': jnp.full((g, b, k), -1, jnp.int32).at[0].set(tok),
                        'parents': jnp.zeros((g, b, k), jnp.int32).at[0].set(parent)}

    def cond(s):
      return (s['i'] < inputs['max_gen_length']) & ~s['beam'].done.all()

    def body(s):
      i = s['i']
      logits, cache = self._step_forward(params, inputs, s['cache'], s['last'], i, k)
      beam, parent, tok = beam_lib.beam_step(cfg_beam, s['beam'], logits.reshape(b, k, v),
                                             jax.random.fold_in(inputs['rng'], i))
      # Beam reordering inside the cache: new beam j of prompt b continues old beam parent[b, j].
      rows = (jnp.arange(b)[:, None] * k + parent).reshape(b * k)
      cache = take_cache_rows(cache, rows, self.cfg.num_attention_heads)
      s = dict(s, i=i + 1, cache=cache, last=tok.reshape(b * k).astype(jnp.int32), beam=beam)
      if debug:
        s['debug'] = {'logits': s['debug']['logits'].at[i].set(logits),
                      'tokens': s['debug']['tokens'].at[i].set(tok),
                      'parents': s['debug']['parents'].at[i].set(parent)}
      return s

    state = jax.lax.while_loop(cond, body, state)
    tokens, lengths, scores = beam_lib.finalize(cfg_beam, state['beam'])
    out = {'beam_tokens': tokens, 'beam_lengths': lengths, 'beam_scores': scores, 'num_steps': state['i']}
    if debug:
      out['debug'] = state['debug']
    return out


def _merge_beam_ends(cfg, end_tokens, min_gen_length):
  """Beam search keeps end tokens and min_gen_length in its config; the call's arguments fill them in when the config
  leaves them unset, and must agree with it otherwise."""
  end_tokens = tuple(int(t) for t in end_tokens)
  if end_tokens and cfg.end_tokens and end_tokens != cfg.end_tokens:
    raise ValueError(f'end_tokens {end_tokens} differ from the BeamSearchConfig\'s {cfg.end_tokens}')
  if min_gen_length and cfg.min_gen_length and min_gen_length != cfg.min_gen_length:
    raise ValueError(f'min_gen_length {min_gen_length} differs from the BeamSearchConfig\'s {cfg.min_gen_length}')
  return dataclasses.replace(cfg, end_tokens=cfg.end_tokens or end_tokens,
                             min_gen_length=cfg.min_gen_length or int(min_gen_length))
