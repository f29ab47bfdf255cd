"""A notebook-friendly generation API: load once, then generate, fill blanks and score continuations.

    from glm_jax.generation import Generator
    gen = Generator.load('runs/tiny')                    # params + config + <checkpoint>/tokenizer.model
    gen.generate('The capital of France is [MASK].')     # -> str: the filled text (GLM-130B's answer)
    gen.generate('Once upon a time')                     # no mask: [gMASK] appended, a continuation
    gen.generate(['a [MASK] b', 'c'], top_k=1)           # a list -> a list of str, decoded in batches
    gen.fill('a [MASK] b', strategy='BeamSearchStrategy')   # -> blanks.FillResult: .text .blanks .beams .ids ...
    gen.log_probs('The capital of France is', [' Paris', ' London'])   # -> [float, float]

Options (the defaults are GLM-130B's `scripts/generate.sh` and generate.py's, glm130b.md §5.3-5.5):
  out_seq_length=256   the total length of the sequence, prompt included, per blank (capped at the model's
                       max_sequence_length);
  min_gen_length=0     per blank, end tokens are banned until this many tokens exist;
  strategy='BaseStrategy' (sampling: temperature, top_k, top_p; top_k=1 is greedy decoding) or
           'BeamSearchStrategy' (num_beams, length_penalty, no_repeat_ngram_size; consider_end=True and random
           candidates as G130's generate.py), or a decode.SamplingConfig / beam_search.BeamSearchConfig;
  top_k=0, top_p=0.7, temperature=1.0, num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, seed=1234.
Bad values raise ValueError naming the flag (`make_strategy`, `check_options`).

One copy of the weights: the Generator holds them once, in the decoder's format (`Decoder.prepare`, made at load),
and every mode (generation, streaming, `log_probs`) runs on that copy. Compiled programs are kept on the instance and
reused across calls: the decoder's prefill + loop (keyed by batch size, the prompt and generation length buckets, and
the strategy: changing temperature / top_k / top_p / beam settings compiles a new program) and the scorer of
`log_probs` (keyed by length buckets).

Streaming (`stream=callback`, one prompt): the callback receives the answer's text in pieces, in order: the text
before the blank at once, then the blank as its tokens are generated, then the rest; ''.join(pieces) is the answer.
With BaseStrategy this is genuine streaming: the decode loop reports every token to the host from inside the compiled
loop (`jax.debug.callback`; a second compiled program that differs from the plain one only by that callback, so the
tokens equal those of a call without streaming). With beam search the text comes at the end of each blank (the best
beam is known only then).

Not thread-safe: one call at a time per Generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from glm_jax import layouts, sharding
from glm_jax.config import default_config
from glm_jax.generation import blanks as blanks_lib
from glm_jax.generation import sampling as sampling_lib
from glm_jax.generation.beam_search import BeamSearchConfig
from glm_jax.generation.decode import Decoder, SamplingConfig, bucket_length
from glm_jax.model import GLMConfig
from glm_jax.model_io import read_config
from glm_jax.tokenizer import GLMTokenizer
from glm_jax.tokenizer import tokenizer_path as find_tokenizer

STRATEGIES = ('BaseStrategy', 'BeamSearchStrategy')


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def make_strategy(strategy='BaseStrategy', *, top_k=0, top_p=0.7, temperature=1.0, num_beams=4, length_penalty=1.0,
                  no_repeat_ngram_size=3):
  """The decoder strategy for these flags. Every flag is checked, whichever strategy uses it (a bad value is an
  error even when the chosen strategy ignores it). Raises ValueError naming the flag."""
  if not isinstance(strategy, (SamplingConfig, BeamSearchConfig)) and strategy not in STRATEGIES:
    raise ValueError(f'--sampling-strategy must be one of {", ".join(STRATEGIES)}, got {strategy!r}')
  if not _is_number(temperature):
    raise ValueError(f'--temperature must be a finite number > 0, got {temperature!r}')
  if not _is_number(top_p):
    raise ValueError(f'--top_p must be a number in [0, 1] (0 disables top-p), got {top_p!r}')
  sampling_lib.validate_sampling(float(temperature), int(top_k) if _is_int(top_k) else top_k, float(top_p))
  beam = BeamSearchConfig(num_beams=num_beams, length_penalty=length_penalty, consider_end=True,
                          no_repeat_ngram_size=no_repeat_ngram_size)
  beam.validate()
  if isinstance(strategy, (SamplingConfig, BeamSearchConfig)):
    return strategy
  if strategy == 'BeamSearchStrategy':
    return BeamSearchConfig(num_beams=int(num_beams), length_penalty=float(length_penalty), consider_end=True,
                            no_repeat_ngram_size=int(no_repeat_ngram_size))
  if int(top_k) == 1:
    return SamplingConfig(greedy=True)  # top-1 sampling is argmax (ties: the lowest id)
  return SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))


def check_options(*, out_seq_length=256, min_gen_length=0, seed=1234, **strategy_flags):
  """Checks every generation option; returns the strategy (see `make_strategy`). Raises ValueError naming the flag."""
  if not _is_int(out_seq_length) or out_seq_length < 2:
    raise ValueError(f'--out-seq-length must be an integer >= 2 (it counts the prompt), got {out_seq_length!r}')
  if not _is_int(min_gen_length) or min_gen_length < 0:
    raise ValueError(f'--min-gen-length must be an integer >= 0, got {min_gen_length!r}')
  if min_gen_length > out_seq_length - 2:
    raise ValueError(f'--min-gen-length {min_gen_length} cannot be met within --out-seq-length {out_seq_length}, '
                     f'which counts the prompt: at most {out_seq_length - 2} tokens are generated per blank')
  if not _is_int(seed) or not 0 <= seed <= blanks_lib.MAX_SEED:
    raise ValueError(f'--seed must be an integer in [0, {blanks_lib.MAX_SEED}], got {seed!r}')
  return make_strategy(**strategy_flags)


# ------------------------------------------------------------------------------------------------------------------
# Loading


def tokenizer_path(checkpoint: str | Path, tokenizer: str | Path | None = None, config=None) -> Path:
  """Where the tokenizer of this checkpoint is (glm_jax.tokenizer.tokenizer_path's policy: `tokenizer` if given,
  else the run's config.run.tokenizer, else <checkpoint>/tokenizer.model). ValueError if none."""
  config = config if config is not None else read_config(checkpoint)
  configured = config.run.tokenizer if 'run' in config and 'tokenizer' in config.run else None
  return find_tokenizer(checkpoint, tokenizer, configured)


def load_tokenizer_and_config(checkpoint: str | Path, tokenizer=None):
  """(GLMTokenizer, config) of a checkpoint, without loading the parameters; checks that they fit together."""
  config = read_config(checkpoint)
  tok = tokenizer if isinstance(tokenizer, GLMTokenizer) else GLMTokenizer.load(
      tokenizer_path(checkpoint, tokenizer, config))
  vocab = int(config.model.vocab_size)
  if tok.vocab_size > vocab:
    raise ValueError(f'the tokenizer has {tok.vocab_size} ids but the model only {vocab} embedding rows: '
                     'they do not belong together')
  return tok, config


def decode_mesh(config, sizes: dict[str, int]):
  """The device mesh of `--config.mesh.<axis>` sizes for this checkpoint config (None when every axis is 1), checked
  against the model: a ValueError names the config field and the mesh axis that disagree."""
  if all(n == 1 for n in sizes.values()):
    return None
  from glm_jax import sharding
  from glm_jax.model import GLM
  mesh = sharding.make_mesh(sizes)
  sharding.check_mesh_fits(GLM(config.model), config.model, sharding.axis_rules(config), dict(mesh.shape))
  return mesh


def quantized_format(stored_format: str, quantization_bit_width: int | None) -> str | None:
  """The quantized format to decode in: the checkpoint's own if it is quantized (a different bit width asked for
  is an error: requantizing quantized weights is not exact), else int<bits> per output row, else None."""
  import quantize
  if quantize.is_quantized(stored_format):
    bits = int(stored_format[3])
    if quantization_bit_width not in (None, bits):
      raise ValueError(f'the checkpoint is quantized to {bits} bits ({stored_format}); it cannot be decoded at '
                       f'--quantization-bit-width {quantization_bit_width}')
    return stored_format
  if quantization_bit_width is None:
    return None
  return quantize.format_name(quantization_bit_width)


# ------------------------------------------------------------------------------------------------------------------
# The generator


class Generator:
  """A model, its parameters and tokenizer, with compiled programs cached on the instance (see module docstring)."""

  def __init__(self, params, config, tokenizer: GLMTokenizer, *, mesh=None, quantization_bit_width: int | None = None):
    """params: the parameters (numpy or jax; a tree, or the (name, subtree) iterator of
    model_io.read_params_by_layer), their big matrices in config.weight_format (default: the checkpoint layout);
    converted once into the decoder's format and not kept (drop your reference to hold one copy). config: the run
    config (its axis_rules place the weights on `mesh`) or a model config. mesh: an optional device mesh
    (sharding.make_mesh) to decode and score on, the weights split by the axis rules. quantization_bit_width: 4 or
    8 quantizes the four layer matrices as GLM-130B does (quantize/), one layer at a time as they are converted; a
    checkpoint quantized already (launch/quantize.py) decodes in its own format without it."""
    self.config = config
    self.model_config = GLMConfig.make(config.model if hasattr(config, 'model') else config)
    if tokenizer.vocab_size > self.model_config.vocab_size:
      raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but the model only '
                       f'{self.model_config.vocab_size} embedding rows')
    self.tokenizer = tokenizer
    rules = None
    if mesh is not None:
      rules = sharding.axis_rules(config if hasattr(config, 'axis_rules') else default_config())
    self.special_ids = blanks_lib.special_ids(tokenizer)
    stored_format = config.get('weight_format', 'in_out') if hasattr(config, 'get') else 'in_out'
    quantized = quantized_format(stored_format, quantization_bit_width)
    self._decoder = Decoder(self.model_config, mesh=mesh, rules=rules, quantized=quantized)
    # the one copy: per layer, in the decoder's weight format
    self.weights = self._decoder.prepare(params, stored_format)

  @classmethod
  def load(cls, checkpoint: str | Path, tokenizer: str | Path | GLMTokenizer | None = None, *,
           mesh=None, quantization_bit_width: int | None = None) -> 'Generator':
    """From a glm-jax model checkpoint or a training run directory (model_io.load_model). The tokenizer defaults to
    <checkpoint>/tokenizer.model (a training run keeps its tokenizer there); ValueError naming what is missing.
    mesh: as for the constructor; each weight is read straight into its shards (no host holds the whole model).
    Without a mesh the checkpoint is read one layer at a time (model_io.read_params_by_layer), each layer converted
    to the decoder's format (quantized, with quantization_bit_width) before the next is read."""
    from glm_jax.model_io import load_model, read_params_by_layer
    tok, _ = load_tokenizer_and_config(checkpoint, tokenizer)
    if mesh is None:  # layer by layer from the files, each converted before the next is read
      config, params = read_params_by_layer(checkpoint)
    else:  # each weight's shards straight onto the devices
      params, config = load_model(checkpoint, mesh=mesh)
    return cls(params, config, tok, mesh=mesh, quantization_bit_width=quantization_bit_width)

  @property
  def max_sequence_length(self) -> int:
    return self.model_config.max_sequence_length

  @property
  def decoder(self) -> Decoder:
    """The Decoder; `decoder.trace_counts` shows what was compiled, `decoder.model` is the module it runs."""
    return self._decoder

  # -- generation ----------------------------------------------------------------------------------------------------

  def _decode(self, contexts, mask_positions, use_gmask, **kwargs):
    return self._decoder.generate(self.weights, contexts, mask_positions, use_gmask, **kwargs)

  def fill(self, text: str | Sequence[str], *, out_seq_length=256, min_gen_length=0, strategy='BaseStrategy', top_k=0,
           top_p=0.7, temperature=1.0, num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, seed=1234,
           stream: Callable[[str], None] | None = None):
    """Like `generate`, but returns blanks.FillResult (one text) or a list of them: .text, .blanks, .beams (every
    beam's answer, best-first, for beam search), .ids, .input_ids, .input_text."""
    strat = check_options(out_seq_length=out_seq_length, min_gen_length=min_gen_length, seed=seed, strategy=strategy,
                          top_k=top_k, top_p=top_p, temperature=temperature, num_beams=num_beams,
                          length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    return blanks_lib.fill_blanks(self._decode, self.tokenizer, text, out_seq_length=out_seq_length,
                                  min_gen_length=min_gen_length, strategy=strat, seed=seed,
                                  max_sequence_length=self.max_sequence_length, stream=stream)

  def generate(self, text: str | Sequence[str], *, out_seq_length=256, min_gen_length=0, strategy='BaseStrategy',
               top_k=0, top_p=0.7, temperature=1.0, num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3,
               seed=1234, stream: Callable[[str], None] | None = None) -> str | list[str]:
    """Fill the blanks of a text (str -> str) or of several texts (list -> list, decoded in batches).

    The result is GLM-130B's answer: the whole text with every blank filled (a text without a mask gets [gMASK]
    appended, so the answer is the prompt plus its continuation). Options: see the module docstring.
    stream: one text only; a callback receiving the answer in pieces as it is generated.
    """
    result = self.fill(text, out_seq_length=out_seq_length, min_gen_length=min_gen_length, strategy=strategy,
                       top_k=top_k, top_p=top_p, temperature=temperature, num_beams=num_beams,
                       length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, seed=seed,
                       stream=stream)
    return result.text if isinstance(result, blanks_lib.FillResult) else [r.text for r in result]

  # -- scoring ---------------------------------------------------------------------------------------------------

  def choice_layout(self, context, continuations, *, use_gmask: bool = False) -> layouts.ChoiceLayout:
    """The §7.2 multiple-choice layout `log_probs` scores (texts are tokenised; lists of ids are used as is)."""
    ctx = self.tokenizer.encode_with_masks(context) if isinstance(context, str) else [int(t) for t in context]
    if isinstance(continuations, str):
      raise TypeError('continuations must be a list of texts (or of id lists), not one str')
    conts = [self.tokenizer.encode(c) if isinstance(c, str) else [int(t) for t in c] for c in continuations]
    if not conts:
      raise ValueError('no continuations to score')
    return layouts.multiple_choice_layout(ctx, conts, self.special_ids, use_task_mask=use_gmask,
                                          position_encoding_2d=self.model_config.position_encoding_2d)

  def log_probs(self, context: str | Sequence[int], continuations: Sequence[str | Sequence[int]], *,
                use_gmask: bool = False) -> list[float]:
    """Sum of the log-probabilities of each continuation's tokens given the context (glm130b.md §7.2).

    GLM-130B's multiple-choice layout: [MASK] is appended to the context ([gMASK] with use_gmask) unless it already
    has a [MASK] (that blank is then scored); each continuation is a causal block [<sop>] + c[:-1] that sees the whole
    (bidirectional) context and no other continuation; all continuations go through one forward. An empty
    continuation scores <eop>. When every continuation is one token they are all read at one <sop> row. Scores are
    unnormalised sums (no length normalisation), log_softmax in fp32 over all vocabulary rows (GLM-130B: fp16).
    The sequence is padded to a length bucket, so contexts of similar length reuse one compiled program.
    """
    lay = self.choice_layout(context, continuations, use_gmask=use_gmask)
    s = int(lay.layout.tokens.shape[0])
    top = int(np.max(lay.layout.position_ids))
    if s > self.max_sequence_length or top >= self.max_sequence_length:
      raise ValueError(f'context and continuations are {s} tokens, longer than the maximum '
                       f'{self.max_sequence_length}')
    p = bucket_length(s)
    tokens = np.zeros((1, p), np.int32)
    tokens[0, :s] = lay.layout.tokens
    pos = lay.layout.position_ids
    positions = np.zeros((1,) + pos.shape[:-1] + (p,), np.int32)
    positions[0, ..., :s] = pos
    mask = np.zeros((p, p), bool)
    mask[:s, :s] = lay.layout.attention_mask
    mask[np.arange(s, p), np.arange(s, p)] = True  # padding rows see themselves; no real row sees padding
    rows = np.concatenate(lay.read_rows).astype(np.int32)
    targets = np.concatenate(lay.choice_targets).astype(np.int32)
    r = bucket_length(len(rows))
    rows = np.pad(rows, (0, r - len(rows)))
    targets = np.pad(targets, (0, r - len(targets)))
    logp = np.asarray(jax.device_get(self._decoder.score(self.weights, tokens, positions, mask[None, None], rows,
                                                          targets)))
    out, start = [], 0
    for c in lay.choice_targets:
      out.append(float(np.sum(logp[start:start + len(c)], dtype=np.float64)))
      start += len(c)
    return out
