"""Training and held-out batches: deterministic, resumable, counter-based (no Grain needed).

Batch format (numpy; B = batch_size, S = seq_len)::

    tokens          int32   [B, S]
    targets         int32   [B, S]      the token each row predicts
    position_ids    int32   [B, S]      1-D (GLM-130B); restart at 0 in each packed sample
    attention_mask  bool    [B, 1, S, S] True = may attend
    loss_mask       float32 [B, S]      1.0 on scored rows (Part B only)

The mask is dense: B * S * S bytes per batch (4 MiB per sequence at S = 2048), fine for the tiny and small configs.

Training sequences (TrainBatches)
  Global sequence i (batch k holds i = k*B ... k*B + B - 1) is a pure function of (seed, i):
  - MIP or not: an exact-rate schedule, sequence i is MIP iff floor((i+1)*mip_share + phase) > floor(i*mip_share +
    phase), phase in [0, 1) drawn from the seed. So the MIP share of sequences (= of token positions; every
    sequence is S long) is mip_share to within one sequence over any stretch. A MIP sequence packs
    `samples_per_sequence` instruction samples, each at most S // samples_per_sequence long (padding fills the
    rest, so the share of *non-padding* tokens is lower when the instructions are short). The j-th MIP sequence
    takes records 4j .. 4j+3 of a per-epoch permutation of the instruction set.
  - Otherwise, with c = i - (MIP sequences before i), it reads chunk c of the training stream: chunks are the
    disjoint windows corpus.train_tokens[m*(S-2) : (m+1)*(S-2)], visited in a fresh permutation every epoch.
    rng = default_rng([seed, 1, i]); the first draw picks [MASK] (< mask_prob) or [gMASK]; the rest of the same
    generator builds the sample: one [gMASK] sample of the whole chunk, or `samples_per_sequence` [MASK] samples
    cut one after another from the chunk's start (their unused tail, ~10%, is skipped).
  The iterator's whole state is the next batch index, so `get_state()` is a small JSON-serialisable dict and a fresh
  iterator given `set_state(state)` yields exactly the batches the original would have.

Held-out (heldout_batches)
  §7.4's language-model windows with [gMASK] (`layouts.lm_window_layouts(use_task_mask=True)`) over each held-out
  document's tokens: window i covers tokens[i*g : i*g + S - 1]; the first window scores all its tokens, later ones
  use their first S - 1 - g tokens as a bidirectional prompt and score the last g, so every token is scored exactly
  once. g = S // 2 by default (G130's Pile setting: half the window is context). Bits per byte =
  sum(loss nats) / sum(num_bytes) / ln 2 over all batches.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping

import numpy as np

from glm_jax.data.corpus import Corpus, load_corpus
from glm_jax.data.instructions import INPUTS, TARGETS, build_instruction_set, read_instructions
from glm_jax.data.objective import MIN_SAMPLE_LEN, gmask_sample, instruction_sample, mask_sample, pack_sequence
from glm_jax.layouts import Layout, SpecialIds, lm_window_layouts, pad_batch

__all__ = [
    'TrainBatches',
    'heldout_batches',
    'special_ids_of',
    'data_config',
    'stack_layouts',
    'bits_per_byte',
    'GMASK',
    'MASK',
    'MIP',
]

GMASK, MASK, MIP = 'gmask', 'mask', 'mip'
_STATE_VERSION = 1
BATCH_KEYS = ('tokens', 'targets', 'position_ids', 'attention_mask', 'loss_mask')

# default_rng stream tags, so that no two uses of the seed share a generator.
_CHUNK_PERM, _SEQUENCE, _MIP_PERM, _MIP_PHASE = 0, 1, 2, 3


def special_ids_of(tokenizer) -> SpecialIds:
  """SpecialIds of a GLMTokenizer (a SpecialIds is returned as is)."""
  if isinstance(tokenizer, SpecialIds):
    return tokenizer
  return SpecialIds(mask=tokenizer.mask_id, gmask=tokenizer.gmask_id, smask=tokenizer.smask_id, sop=tokenizer.sop_id,
                    eop=tokenizer.eop_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id)


def data_config(config_data=None) -> dict:
  """`config.data` (ConfigDict or mapping, may be partial) merged over `glm_jax.config.data_defaults()`."""
  from glm_jax.config import data_defaults

  merged = data_defaults().to_dict()
  if config_data is not None:
    given = config_data.to_dict() if hasattr(config_data, 'to_dict') else dict(config_data)
    merged.update(given)
  return merged


def stack_layouts(layouts: list[Layout]) -> dict[str, np.ndarray]:
  """Equal-length [s] layouts -> the batch dict."""
  return {
      'tokens': np.stack([x.tokens for x in layouts]).astype(np.int32),
      'targets': np.stack([x.targets for x in layouts]).astype(np.int32),
      'position_ids': np.stack([x.position_ids for x in layouts]).astype(np.int32),
      'attention_mask': np.stack([x.attention_mask for x in layouts])[:, None].astype(bool),
      'loss_mask': np.stack([x.loss_mask for x in layouts]).astype(np.float32),
  }


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
  return float(total_nats) / max(int(total_bytes), 1) / math.log(2)


class TrainBatches:
  """Deterministic, resumable iterator of training batches (module docstring).

  Args:
    config_data: `config.data` (see `glm_jax.config.data_defaults`), a ConfigDict or a dict; missing keys take
      the defaults.
    tokenizer: a GLMTokenizer (encode, special ids).
    seq_len, batch_size, seed: seed must be a non-negative integer.
    corpus: an already loaded Corpus (else loaded from config_data.corpus_paths).
    instructions: MIP records (else read from config_data.mip_path, or built from config_data.data_root when that
      is ''); not loaded at all when mip_share is 0.
  """

  def __init__(self, config_data, tokenizer, seq_len: int, batch_size: int, seed: int, *,
               corpus: Corpus | None = None, instructions: list[dict] | None = None):
    cfg = data_config(config_data)
    self.config = cfg
    self.tokenizer = tokenizer
    self.special_ids = special_ids_of(tokenizer)
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    if self.seed < 0:
      raise ValueError(f'seed must be >= 0, got {seed}')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.mask_prob = float(cfg['mask_prob'])
    self.mask_ratio = float(cfg['mask_ratio'])
    self.poisson_lambda = float(cfg['poisson_lambda'])
    self.short_seq_prob = float(cfg['short_seq_prob'])
    self.single_span_prob = float(cfg['single_span_prob'])
    self.min_gmask_ratio = float(cfg['min_gmask_ratio'])
    self.mip_share = float(cfg['mip_share'])
    self.samples_per_sequence = int(cfg['samples_per_sequence'])
    for name in ('mask_prob', 'mask_ratio', 'min_gmask_ratio', 'mip_share', 'short_seq_prob', 'single_span_prob'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'data.{name} must be in [0, 1], got {getattr(self, name)}')
    if self.samples_per_sequence < 1:
      raise ValueError(f'data.samples_per_sequence must be >= 1, got {self.samples_per_sequence}')
    self.sample_len = self.seq_len // self.samples_per_sequence
    if self.sample_len < MIN_SAMPLE_LEN and (self.mask_prob > 0 or self.mip_share > 0):
      raise ValueError(f'seq_len {seq_len} // samples_per_sequence {self.samples_per_sequence} = {self.sample_len} '
                       f'is below the shortest [MASK]/MIP sample ({MIN_SAMPLE_LEN})')

    if corpus is None and self.mip_share < 1.0:
      corpus = load_corpus(cfg['corpus_paths'], tokenizer, heldout_fraction=float(cfg['heldout_fraction']),
                           strip_gutenberg=bool(cfg['strip_gutenberg']))
    self.corpus = corpus
    self.chunk_len = self.seq_len - 2  # a [gMASK] sample is its source + [gMASK, <sop>]
    self.num_chunks = 0 if corpus is None else int(corpus.train_tokens.size) // self.chunk_len
    if self.mip_share < 1.0 and self.num_chunks == 0:
      raise ValueError(f'the training text ({0 if corpus is None else corpus.train_tokens.size} tokens) is shorter '
                       f'than one sequence window ({self.chunk_len} tokens)')

    if self.mip_share > 0 and instructions is None:
      instructions = (read_instructions(cfg['mip_path']) if cfg['mip_path']
                      else build_instruction_set(cfg['data_root']))
    self.instructions = list(instructions or []) if self.mip_share > 0 else []
    if self.mip_share > 0 and not self.instructions:
      raise ValueError('mip_share > 0 but the instruction set is empty')
    self._mip_tokens: dict[int, tuple[list[int], list[int]]] = {}
    self._mip_phase = float(np.random.default_rng([self.seed, _MIP_PHASE]).random())
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
    self._step = 0

  # -------------------------------------------------------------------- state

  def _fingerprint(self) -> dict:
    return {
        'seed': self.seed, 'seq_len': self.seq_len, 'batch_size': self.batch_size,
        'train_tokens': 0 if self.corpus is None else int(self.corpus.train_tokens.size),
        'num_instructions': len(self.instructions),
        'objective': [self.mask_prob, self.mask_ratio, self.poisson_lambda, self.min_gmask_ratio, self.mip_share,
                      self.samples_per_sequence, self.short_seq_prob, self.single_span_prob],
    }

  def get_state(self) -> dict:
    """JSON-serialisable state: the next batch index plus what must match for an exact resume."""
    return {'version': _STATE_VERSION, 'step': self._step, **self._fingerprint()}

  def set_state(self, state: Mapping, *, strict: bool = True) -> None:
    """Continue from `state` (from get_state).

    strict: ValueError if the state was saved with another seed, shape, objective or data size (an exact resume is
    then impossible); strict=False takes only the step.
    """
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'unknown data iterator state version {state.get("version")!r}')
    mine = self._fingerprint()
    diff = [k for k in mine if _plain(state.get(k)) != _plain(mine[k])]
    if diff and strict:
      raise ValueError('data iterator state does not match this iterator (' +
                       ', '.join(f'{k}: saved {state.get(k)!r}, now {mine[k]!r}' for k in diff) + ')')
    step = int(state['step'])
    if step < 0:
      raise ValueError(f'bad step {step} in data iterator state')
    self._step = step

  @property
  def step(self) -> int:
    """Index of the next batch."""
    return self._step

  # ---------------------------------------------------------------- iteration

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self._step)
    self._step += 1
    return batch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """Batch number `step` (pure: does not move the iterator)."""
    first = int(step) * self.batch_size
    return stack_layouts([self.sequence_at(i)[0] for i in range(first, first + self.batch_size)])

  # ------------------------------------------------------------ the schedule

  def mip_before(self, i: int) -> int:
    """Number of MIP sequences among global sequences 0 .. i-1."""
    return math.floor(i * self.mip_share + self._mip_phase)

  def sequence_kind(self, i: int) -> str:
    """GMASK, MASK or MIP for global sequence i (cheap: builds nothing)."""
    if self.mip_before(i + 1) > self.mip_before(i):
      return MIP
    return MASK if np.random.default_rng([self.seed, _SEQUENCE, i]).random() < self.mask_prob else GMASK

  def chunk_index(self, c: int) -> int:
    """Training-stream chunk read by the c-th non-MIP sequence (a new permutation every epoch)."""
    epoch, pos = divmod(c, self.num_chunks)
    return int(self._permutation(_CHUNK_PERM, epoch, self.num_chunks)[pos])

  def chunk(self, m: int) -> np.ndarray:
    return self.corpus.train_tokens[m * self.chunk_len:(m + 1) * self.chunk_len]

  def sequence_at(self, i: int) -> tuple[Layout, str]:
    """(layout of global sequence i, its kind). The layout has [seq_len] arrays and a [seq_len, seq_len] mask."""
    sid = self.special_ids
    if self.mip_before(i + 1) > self.mip_before(i):
      return self._mip_sequence(self.mip_before(i)), MIP
    rng = np.random.default_rng([self.seed, _SEQUENCE, i])
    kind = MASK if rng.random() < self.mask_prob else GMASK
    tokens = self.chunk(self.chunk_index(i - self.mip_before(i)))
    if kind == GMASK:
      return gmask_sample(tokens, self.seq_len, rng, sid, min_gmask_ratio=self.min_gmask_ratio), kind
    samples, offset = [], 0
    for _ in range(self.samples_per_sequence):
      layout, used = mask_sample(tokens[offset:], self.sample_len, rng, sid, mask_ratio=self.mask_ratio,
                                 poisson_lambda=self.poisson_lambda, short_seq_prob=self.short_seq_prob,
                                 single_span_prob=self.single_span_prob)
      samples.append(layout)
      offset += used
    return pack_sequence(samples, self.seq_len, sid), kind

  def _mip_sequence(self, j: int) -> Layout:
    m = len(self.instructions)
    samples = []
    for t in range(self.samples_per_sequence):
      epoch, pos = divmod(j * self.samples_per_sequence + t, m)
      r = int(self._permutation(_MIP_PERM, epoch, m)[pos])
      inputs, targets = self._instruction_tokens(r)
      samples.append(instruction_sample(inputs, targets, self.sample_len, self.special_ids))
    return pack_sequence(samples, self.seq_len, self.special_ids)

  def _instruction_tokens(self, r: int) -> tuple[list[int], list[int]]:
    if r not in self._mip_tokens:
      rec = self.instructions[r]
      self._mip_tokens[r] = (self.tokenizer.encode(rec[INPUTS]), self.tokenizer.encode(rec[TARGETS]))
    return self._mip_tokens[r]

  def _permutation(self, tag: int, epoch: int, n: int) -> np.ndarray:
    key = (tag, epoch)
    perm = self._perm_cache.get(key)
    if perm is None:
      if len(self._perm_cache) > 4:  # only the current epochs are ever needed
        self._perm_cache.clear()
      perm = np.random.default_rng([self.seed, tag, epoch]).permutation(n)
      self._perm_cache[key] = perm
    return perm


def _plain(x):
  """Tuples -> lists, so that a state that went through JSON compares equal."""
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _empty_row(seq_len: int, pad_id: int) -> Layout:
  return Layout(tokens=np.full(seq_len, pad_id, np.int32), position_ids=np.zeros(seq_len, np.int32),
                attention_mask=np.eye(seq_len, dtype=bool), targets=np.full(seq_len, pad_id, np.int32),
                loss_mask=np.zeros(seq_len, np.float32))


def heldout_batches(corpus: Corpus, tokenizer, seq_len: int, batch_size: int, *,
                    generation_length: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Yield (batch, num_bytes) over the held-out split (module docstring), always in the same order.

  A document's UTF-8 bytes are counted in the batch that holds its last window, so the num_bytes of all batches
  sum to `corpus.num_heldout_bytes` (minus documents with no tokens, which are skipped). The last batch is filled
  with rows that score nothing. BPB = sum of the loss (nats, summed over loss_mask) / sum(num_bytes) / ln 2.
  """
  sid = special_ids_of(tokenizer)
  g = seq_len // 2 if generation_length is None else int(generation_length)
  if not 1 <= g <= seq_len - 1:
    raise ValueError(f'generation_length must be in [1, seq_len - 1], got {g}')
  rows: list[Layout] = []
  nbytes = 0
  for doc in corpus.heldout:
    if doc.tokens.size == 0:
      continue
    windows = lm_window_layouts(doc.tokens, sid, max_seq_length=seq_len, generation_length=g, use_task_mask=True)
    for w, layout in enumerate(windows):
      rows.append(layout)
      if w == len(windows) - 1:
        nbytes += doc.num_bytes
      if len(rows) == batch_size:
        yield _heldout_batch(rows, seq_len, sid), nbytes
        rows, nbytes = [], 0
  if rows:
    rows += [_empty_row(seq_len, sid.pad)] * (batch_size - len(rows))
    yield _heldout_batch(rows, seq_len, sid), nbytes


def _heldout_batch(rows: list[Layout], seq_len: int, sid: SpecialIds) -> dict[str, np.ndarray]:
  padded = pad_batch(rows, length=seq_len, pad_id=sid.pad, pad_rows_attend_self=True)
  return {
      'tokens': padded.tokens,
      'targets': padded.targets,
      'position_ids': padded.position_ids,
      'attention_mask': padded.attention_mask,
      'loss_mask': padded.loss_mask,
  }
