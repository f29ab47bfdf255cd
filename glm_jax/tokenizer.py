"""GLM tokenizer: a SentencePiece model plus the GLM special tokens.

Two id layouts are supported. Both use the same ten special tokens, named as
in SAT's ``get_command``: ``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``eod``,
``sop``, ``eop``, ``ENC``, ``dBLOCK``, ``eos`` and ``pad``.

``layout="icetk"`` (GLM-130B, the ids the published checkpoint was trained on)
    ==================  =====================================================
    id                  meaning
    ==================  =====================================================
    0                   ``pad`` (really icetk image token 0; the evaluation
                        code pads with 0 and masks it out)
    1 .. 19999          icetk image tokens, never produced by ``encode``
    20000 + k           SentencePiece piece ``k`` (``ice_text.model`` has
                        130000 pieces: 20000 ``<unk>``, 20001 ``<s>``,
                        20002 ``</s>``, 20003 ``<pad>``, 20004 ``<n>``, ...)
    20002               ``eos`` (SentencePiece's ``</s>``; ``20000 + eos_id``)
    150000 .. 150007    ``[MASK]`` ``[gMASK]`` ``[sMASK]`` ``eod`` ``sop``
                        ``eop`` ``ENC`` ``dBLOCK`` (in this order)
    150008 .. 150527    embedding padding (``vocab_size`` = 150528)
    ==================  =====================================================

    Encoding follows SAT 0.2 + icetk, which produced the published numbers:
    ``encode(text)`` is SentencePiece ``EncodeAsIds(text)`` + 20000 on the raw
    string.  The model's own normalizer therefore applies.  For
    ``ice_text.model`` (and the stand-in ``train_tokenizer(layout="icetk")``
    builds, which uses SentencePiece's default ``nmt_nfkc`` rule) this means:

    * a dummy prefix ``▁`` is added at the start of *every* call (so each
      segment around a mask in :meth:`GLMTokenizer.encode_with_masks` gets
      its own);
    * ``\\n``, ``\\r`` and ``\\t`` are mapped to a space by the normalizer,
      then runs of whitespace collapse into one ``▁`` and leading/trailing
      whitespace is dropped.  So ``'abc\\nhi'`` encodes exactly like
      ``'abc hi'``, ``decode(encode('abc\\nhi')) == 'abc hi'`` (the icetk
      README example) and ``encode('\\n') == []``.  This is icetk's
      ``ignore_linebreak=True`` default; with ``ignore_linebreak=False``
      ``\\n`` is first replaced by ``<n>`` (20004), as icetk does.
    * NFKC folds full-width forms (``！`` -> ``!``); characters not in the
      model become ``<unk>`` (20000), which decodes as `` ⁇ ``.
    * ``decode`` replaces ``<n>`` by ``\\n`` (icetk always does).

    The SAT >= 0.3 / SAT4 ``GLM130BTokenizer`` encodes differently (``<n>``,
    tab and blank tokens, byte fallback; reference section 4.3) and is *not*
    implemented here.

``layout="compact"`` (tokenizers trained by :func:`train_tokenizer`)
    ==================  =====================================================
    id                  meaning
    ==================  =====================================================
    0 .. n-1            the n SentencePiece pieces.  As trained by
                        ``train_tokenizer``: 0 ``<unk>`` (never produced,
                        thanks to byte fallback), 1 ``"\\n"``, 2 .. 257 the
                        byte pieces ``<0x00>`` .. ``<0xFF>``, 258 .. n-1
                        learned pieces.  SentencePiece's own ``<s>``,
                        ``</s>`` and ``<pad>`` are disabled.
    n .. n+7            ``[MASK]`` ``[gMASK]`` ``[sMASK]`` ``eod`` ``sop``
                        ``eop`` ``ENC`` ``dBLOCK``
    n+8                 ``eos``
    n+9                 ``pad``
    n+10 .. V-1         embedding padding, V = ``vocab_size`` = n + 10
                        rounded up to a multiple of ``vocab_multiple``
                        (default 128; 1 disables the rounding)
    ==================  =====================================================

    The model is trained with normalization rule ``identity``,
    ``add_dummy_prefix=False``, ``remove_extra_whitespaces=False``,
    ``allow_whitespace_only_pieces=True``, ``byte_fallback=True`` and
    ``"\\n"`` as a user-defined piece, so ``decode(encode(s)) == s`` for every
    string: spaces (runs, leading, trailing) are ``▁`` pieces, ``"\\n"`` is
    piece 1, and ``"\\r"``, tabs (if not learned), emoji and any unseen
    character become UTF-8 byte pieces.  A literal ``U+2581`` (``▁``) in the
    input, which SentencePiece would otherwise turn into a space, is encoded
    as its three byte pieces.  There is no dummy prefix: ``encode('a')`` and
    ``encode(' a')`` differ.

Saved format
    ``<out>.model`` (the serialized SentencePiece ModelProto) plus an optional
    JSON sidecar ``<out>.json``::

        {"format": "glm_jax.tokenizer", "version": 1, "layout": "compact",
         "vocab_multiple": 128, "num_pieces": n, "vocab_size": V,
         "special_ids": {...}, ...training details...}

    (icetk-layout sidecars also hold ``"ignore_linebreak"``.)

    :meth:`GLMTokenizer.load` takes the ``.model`` path (or the path without
    the suffix).  Without a sidecar the layout is ``icetk``, so GLM-130B's
    ``ice_text.model`` loads as is.  ``num_pieces``/``vocab_size``/
    ``special_ids`` are informative; when present they are checked against
    the model, which catches a ``.model`` replaced under an old sidecar.

Decoding
    :meth:`GLMTokenizer.decode` splits the ids at special tokens (as SAT's
    ``detokenize`` does), decodes the text runs with SentencePiece and renders
    the specials as ``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``[eod]``, ``[sop]``,
    ``[eop]``, ``[ENC]``, ``[dBLOCK]``, ``</s>`` (eos) and ``[pad]``.  (SAT2
    itself prints ``[[MASK]]`` and ``[</s>]`` because it wraps the names in
    another pair of brackets.)  ``skip_special_tokens=True`` drops them.  Ids
    inside the embedding table that are not tokens (icetk image ids,
    padding rows) render as ``<unused_ID>``; ids outside ``[0, vocab_size)``
    raise ``ValueError``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import sentencepiece as spm

from glm_jax.files import atomic_write

__all__ = [
  'GLMTokenizer',
  'SPECIAL_TOKENS',
  'GLM_SPECIAL_TOKENS',
  'MASK_PATTERN',
  'ICETK_TEXT_OFFSET',
  'ICETK_SPECIAL_START',
  'ICETK_VOCAB_SIZE',
  'ICETK_MAX_PIECES',
  'LAYOUTS',
  'sidecar_path',
]

LAYOUTS = ('icetk', 'compact')

# The eight specials appended after the text vocabulary, in id order.
GLM_SPECIAL_TOKENS = ('[MASK]', '[gMASK]', '[sMASK]', 'eod', 'sop', 'eop', 'ENC', 'dBLOCK')
# All ten specials (compact layout ids n .. n+9 in this order).
SPECIAL_TOKENS = GLM_SPECIAL_TOKENS + ('eos', 'pad')

# How decode() renders each special.
_RENDER = {
  '[MASK]': '[MASK]',
  '[gMASK]': '[gMASK]',
  '[sMASK]': '[sMASK]',
  'eod': '[eod]',
  'sop': '[sop]',
  'eop': '[eop]',
  'ENC': '[ENC]',
  'dBLOCK': '[dBLOCK]',
  'eos': '</s>',
  'pad': '[pad]',
}

# Aliases accepted by get_command() on top of the canonical names.
_ALIASES = {
  'MASK': '[MASK]',
  'gMASK': '[gMASK]',
  'sMASK': '[sMASK]',
  '<sop>': 'sop',
  '<eop>': 'eop',
  '[sop]': 'sop',
  '[eop]': 'eop',
  '[eod]': 'eod',
  '</s>': 'eos',
  '[pad]': 'pad',
}

MASK_PATTERN = re.compile(r'\[[sg]?MASK\]')

ICETK_TEXT_OFFSET = 20000
ICETK_SPECIAL_START = 150000
ICETK_VOCAB_SIZE = 150528
ICETK_MAX_PIECES = ICETK_SPECIAL_START - ICETK_TEXT_OFFSET  # 130000

_SIDECAR_FORMAT = 'glm_jax.tokenizer'
_SIDECAR_VERSION = 1
_WORD_BOUNDARY = '\u2581'  # SentencePiece's meta symbol for whitespace
# Probe used to check that a compact-layout model round-trips exactly.
_ROUNDTRIP_PROBE = ' a  b\t\tc\r\n\nd  '


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def tokenizer_path(directory: str | os.PathLike, given: str | os.PathLike | None = None,
                   configured: str | os.PathLike | None = None, *, required: bool = True) -> Path | None:
  """The tokenizer of a run or checkpoint directory, by the one policy of training, generation and evaluation:
  `given` (a .model file; the suffix may be left out), else `configured` (the run config's run.tokenizer, when set: a
  run trained with a given tokenizer keeps no copy), else <directory>/tokenizer.model (a run that trained its own).
  A given or configured file that does not exist is a ValueError naming it; with none at all, ValueError (or None
  when not `required`)."""
  for name, value in (('tokenizer', given), ('config.run.tokenizer', configured)):
    if value:
      p = Path(value)
      if not p.exists() and p.suffix != '.model' and Path(str(p) + '.model').exists():
        p = Path(str(p) + '.model')
      if not p.is_file():
        raise ValueError(f'tokenizer model file not found: {p} ({name})')
      return p
  own = Path(directory) / 'tokenizer.model'
  if own.is_file():
    return own
  if required:
    raise ValueError(f'no tokenizer: {own} does not exist; pass --tokenizer (tokenizer=) with the .model file')
  return None


def sidecar_path(model_path: str | os.PathLike) -> Path:
  """Path of the JSON sidecar that belongs to ``<out>.model``."""
  p = Path(model_path)
  return p.with_suffix('.json') if p.suffix == '.model' else Path(str(p) + '.json')


class GLMTokenizer:
  """SentencePiece model + GLM special tokens, in the icetk or compact layout.

  Args:
    model_proto: the serialized SentencePiece ``ModelProto`` (the bytes of a
      ``.model`` file).  Use :meth:`load` to read one from disk.
    layout: ``"icetk"`` or ``"compact"`` (see the module docstring).
    vocab_multiple: compact layout only: ``vocab_size`` is pieces + 10
      rounded up to a multiple of this (1 = no rounding).  The icetk layout
      always has 150528 rows.
    ignore_linebreak: icetk layout only, as icetk's ``encode`` argument:
      True (default, what GLM-130B used) passes ``\\n`` to SentencePiece,
      which turns it into a space; False maps it to the ``<n>`` piece.
    name: a label used in error messages (e.g. the file name).
  """

  def __init__(
    self,
    model_proto: bytes,
    layout: str = 'icetk',
    *,
    vocab_multiple: int = 128,
    ignore_linebreak: bool = True,
    name: str = '<sentencepiece model>',
  ):
    if layout not in LAYOUTS:
      raise ValueError(f'{name}: unknown tokenizer layout {layout!r}; expected one of {LAYOUTS}')
    if not isinstance(vocab_multiple, int) or isinstance(vocab_multiple, bool) or vocab_multiple < 1:
      raise ValueError(f'{name}: vocab_multiple must be a positive integer, got {vocab_multiple!r}')
    self._name = name
    self._layout = layout
    self._vocab_multiple = vocab_multiple
    self._ignore_linebreak = bool(ignore_linebreak)
    self._proto = bytes(model_proto)
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
      raise ValueError(f'{name}: not a valid SentencePiece model ({_first_line(e)})') from None
    self._sp = sp
    n = sp.get_piece_size()
    self._num_pieces = n

    if layout == 'icetk':
      if n > ICETK_MAX_PIECES:
        raise ValueError(
          f'{name}: {n} pieces do not fit the icetk layout (at most {ICETK_MAX_PIECES})'
        )
      eos_sp = sp.eos_id()
      if eos_sp < 0:
        raise ValueError(f'{name}: the icetk layout needs a SentencePiece model with an eos piece')
      self._offset = ICETK_TEXT_OFFSET
      ids = {tok: ICETK_SPECIAL_START + i for i, tok in enumerate(GLM_SPECIAL_TOKENS)}
      ids['eos'] = ICETK_TEXT_OFFSET + eos_sp
      ids['pad'] = 0
      self._vocab_size = ICETK_VOCAB_SIZE
      if not self._ignore_linebreak:
        nl = sp.piece_to_id('<n>')
        if nl == sp.unk_id() or sp.id_to_piece(nl) != '<n>':
          raise ValueError(f"{name}: ignore_linebreak=False needs a '<n>' piece in the model")
      self._byte_ids_for_meta = None
    else:
      self._offset = 0
      ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
      self._vocab_size = _round_up(n + len(SPECIAL_TOKENS), vocab_multiple)
      # Byte pieces for a literal U+2581, which SentencePiece would
      # otherwise decode as a space.
      byte_ids = []
      for b in _WORD_BOUNDARY.encode('utf-8'):
        i = sp.piece_to_id(f'<0x{b:02X}>')
        if not sp.is_byte(i):
          byte_ids = None
          break
        byte_ids.append(i)
      self._byte_ids_for_meta = byte_ids
      if byte_ids is None or sp.decode(sp.encode(_ROUNDTRIP_PROBE)) != _ROUNDTRIP_PROBE:
        raise ValueError(
          f'{name}: this SentencePiece model does not round-trip text exactly, so it cannot '
          "use the compact layout (train it with train_tokenizer, or use layout='icetk')"
        )

    self._special_ids = dict(ids)
    self._special_decoder = {v: k for k, v in ids.items()}

  # ------------------------------------------------------------------ I/O

  @classmethod
  def load(
    cls,
    path: str | os.PathLike,
    *,
    layout: str | None = None,
    vocab_multiple: int | None = None,
    ignore_linebreak: bool | None = None,
  ) -> 'GLMTokenizer':
    """Read ``<out>.model`` and, if present, its ``<out>.json`` sidecar.

    ``path`` is the ``.model`` file or the same path without ``.model``.
    Without a sidecar the layout is icetk (so ``ice_text.model`` loads as
    is).  Keyword arguments that are not None override the sidecar.
    Raises ValueError naming the file when it is missing or unreadable.
    """
    p = Path(path)
    if not p.is_file() and p.suffix != '.model' and Path(str(p) + '.model').is_file():
      p = Path(str(p) + '.model')
    if not p.exists():
      raise ValueError(f'tokenizer model file not found: {p}')
    if not p.is_file():
      raise ValueError(f'tokenizer model path is not a file: {p}')
    try:
      proto = p.read_bytes()
    except OSError as e:
      raise ValueError(f'cannot read tokenizer model file {p}: {e.strerror or e}') from None
    if not proto:
      raise ValueError(f'{p}: not a valid SentencePiece model (empty file)')

    meta: dict = {}
    side = sidecar_path(p)
    if side.is_file():
      try:
        meta = json.loads(side.read_text(encoding='utf-8'))
      except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{side}: unreadable tokenizer sidecar ({_first_line(e)})') from None
      if not isinstance(meta, dict):
        raise ValueError(f'{side}: tokenizer sidecar must hold a JSON object')
      fmt = meta.get('format', _SIDECAR_FORMAT)
      if fmt != _SIDECAR_FORMAT:
        raise ValueError(f'{side}: unknown sidecar format {fmt!r}')

    tok = cls(
      proto,
      layout=layout if layout is not None else meta.get('layout', 'icetk'),
      vocab_multiple=vocab_multiple if vocab_multiple is not None else meta.get('vocab_multiple', 128),
      ignore_linebreak=(
        ignore_linebreak if ignore_linebreak is not None else meta.get('ignore_linebreak', True)
      ),
      name=str(p),
    )
    overridden = layout is not None or vocab_multiple is not None
    if meta and not overridden:
      for key, actual in (
        ('num_pieces', tok.num_pieces),
        ('vocab_size', tok.vocab_size),
        ('special_ids', tok.special_ids),
      ):
        if key in meta and meta[key] != actual:
          raise ValueError(
            f'{side}: sidecar says {key}={meta[key]!r} but {p.name} gives {actual!r} '
            '(model and sidecar do not belong together)'
          )
    return tok

  def save(self, path: str | os.PathLike, extra: Mapping | None = None) -> Path:
    """Write ``<path>.model`` and the ``<path>.json`` sidecar atomically.

    ``path`` may end in ``.model`` or not.  ``extra`` adds informational
    keys to the sidecar.  Returns the ``.model`` path.
    """
    p = Path(path)
    model = p if p.suffix == '.model' else Path(str(p) + '.model')
    meta = {
      'format': _SIDECAR_FORMAT,
      'version': _SIDECAR_VERSION,
      'layout': self._layout,
      'vocab_multiple': self._vocab_multiple,
      'num_pieces': self.num_pieces,
      'vocab_size': self.vocab_size,
      'special_ids': self.special_ids,
    }
    if self._layout == 'icetk':
      meta['ignore_linebreak'] = self._ignore_linebreak
    if extra:
      meta.update({k: v for k, v in extra.items() if k not in meta})
    atomic_write(model, self._proto)
    atomic_write(sidecar_path(model), json.dumps(meta, indent=2, ensure_ascii=False) + '\n')
    return model

  # ----------------------------------------------------------- properties

  @property
  def layout(self) -> str:
    return self._layout

  @property
  def vocab_size(self) -> int:
    """Embedding rows (150528 for icetk; pieces + 10 rounded up for compact)."""
    return self._vocab_size

  @property
  def vocab_multiple(self) -> int:
    return self._vocab_multiple

  @property
  def num_pieces(self) -> int:
    """Number of SentencePiece pieces in the model."""
    return self._num_pieces

  @property
  def text_offset(self) -> int:
    """Token id of SentencePiece piece 0 (20000 for icetk, 0 for compact)."""
    return self._offset

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    """The underlying SentencePiece processor (piece ids, no offset)."""
    return self._sp

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def special_ids(self) -> dict[str, int]:
    """{name: id} for the ten specials (names as in ``SPECIAL_TOKENS``)."""
    return dict(self._special_ids)

  @property
  def mask_id(self) -> int:
    return self._special_ids['[MASK]']

  @property
  def gmask_id(self) -> int:
    return self._special_ids['[gMASK]']

  @property
  def smask_id(self) -> int:
    return self._special_ids['[sMASK]']

  @property
  def eod_id(self) -> int:
    return self._special_ids['eod']

  @property
  def sop_id(self) -> int:
    return self._special_ids['sop']

  @property
  def eop_id(self) -> int:
    return self._special_ids['eop']

  @property
  def enc_id(self) -> int:
    return self._special_ids['ENC']

  @property
  def dblock_id(self) -> int:
    return self._special_ids['dBLOCK']

  @property
  def eos_id(self) -> int:
    return self._special_ids['eos']

  @property
  def pad_id(self) -> int:
    return self._special_ids['pad']

  @property
  def unk_id(self) -> int:
    return self._offset + self._sp.unk_id()

  def get_command(self, name: str) -> int:
    """Id of a special token by name (``'[MASK]'``, ``'sop'``, ``'<sop>'``, ``'eos'``, ...)."""
    key = _ALIASES.get(name, name)
    try:
      return self._special_ids[key]
    except KeyError:
      raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

  def is_special(self, token_id: int) -> bool:
    return int(token_id) in self._special_decoder

  # ------------------------------------------------------------- encoding

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no specials; see the module docstring)."""
    if not isinstance(text, str):
      raise TypeError(f'encode() expects str, got {type(text).__name__}')
    sp = self._sp
    if self._layout == 'icetk':
      if not self._ignore_linebreak:
        text = text.replace('\n', '<n>')
      off = self._offset
      return [i + off for i in sp.encode(text)]
    if _WORD_BOUNDARY not in text:
      return sp.encode(text)
    out: list[int] = []
    parts = text.split(_WORD_BOUNDARY)
    for k, part in enumerate(parts):
      if k:
        out.extend(self._byte_ids_for_meta)
      if part:
        out.extend(sp.encode(part))
    return out

  def encode_with_masks(self, text: str) -> list[int]:
    """Encode ``text`` with literal ``[MASK]``/``[sMASK]``/``[gMASK]`` as mask ids.

    Step 2 of GLM-130B's ``fill_blanks``: split at ``\\[[sg]?MASK\\]``,
    encode each non-empty segment on its own (each gets its own dummy
    prefix in the icetk layout) and put the mask ids between them.
    Choosing the generation mask, appending ``[gMASK]`` or eos is left to
    the caller.
    """
    out: list[int] = []
    pos = 0
    for m in MASK_PATTERN.finditer(text):
      if m.start() > pos:
        out.extend(self.encode(text[pos : m.start()]))
      out.append(self._special_ids[m.group(0)])
      pos = m.end()
    if pos < len(text):
      out.extend(self.encode(text[pos:]))
    return out

  # ------------------------------------------------------------- decoding

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``: text runs via SentencePiece, specials rendered (see module doc)."""
    pieces: list[str] = []
    run: list[int] = []
    off = self._offset
    n = self._num_pieces
    V = self._vocab_size

    def flush():
      if run:
        text = self._sp.decode(run)
        if self._layout == 'icetk':
          text = text.replace('<n>', '\n')
        pieces.append(text)
        run.clear()

    specials = self._special_decoder
    for raw in ids:
      i = int(raw)
      # Specials first: in the icetk layout eos (20002) is also SentencePiece's </s> piece; like SAT's
      # detokenize, it splits the text and is rendered.
      if off <= i < off + n and i not in specials:
        run.append(i - off)
        continue
      if not 0 <= i < V:
        raise ValueError(f'token id {i} is outside the vocabulary [0, {V})')
      flush()
      name = specials.get(i)
      if name is not None:
        if not skip_special_tokens:
          pieces.append(_RENDER[name])
      elif not skip_special_tokens:
        pieces.append(f'<unused_{i}>')
    flush()
    return ''.join(pieces)

  def id_to_piece(self, token_id: int) -> str:
    """The piece (or rendered special) of one id."""
    i = int(token_id)
    name = self._special_decoder.get(i)
    if name is not None:
      return _RENDER[name]
    if self._offset <= i < self._offset + self._num_pieces:
      return self._sp.id_to_piece(i - self._offset)
    if 0 <= i < self._vocab_size:
      return f'<unused_{i}>'
    raise ValueError(f'token id {i} is outside the vocabulary [0, {self._vocab_size})')

  def tokenize(self, text: str) -> list[str]:
    """Pieces of ``text`` (for inspection)."""
    return [self.id_to_piece(i) for i in self.encode(text)]

  def __repr__(self) -> str:
    return (
      f'GLMTokenizer(layout={self._layout!r}, pieces={self._num_pieces}, '
      f'vocab_size={self._vocab_size}, name={self._name!r})'
    )


def _first_line(e: BaseException) -> str:
  s = str(e).strip().splitlines()
  return s[0] if s else type(e).__name__

