"""Tests for glm_jax.tokenizer, glm_jax.tokenizer_training and launch/train_tokenizer.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glm_jax.tokenizer import (
  GLM_SPECIAL_TOKENS,
  ICETK_SPECIAL_START,
  ICETK_TEXT_OFFSET,
  ICETK_VOCAB_SIZE,
  SPECIAL_TOKENS,
  GLMTokenizer,
)
from glm_jax.tokenizer_training import (
  TokenizerTrainingError,
  find_text_files,
  iter_sentences,
  split_long_line,
  train_tokenizer,
)
from tests.tokenizer_fixtures import TINY_VOCAB_PIECES, train_tiny_tokenizer, write_tiny_corpus

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / 'launch' / 'train_tokenizer.py'


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('tok')
  write_tiny_corpus(d)
  return d


@pytest.fixture(scope='session')
def compact_path(tiny_dir):
  return train_tiny_tokenizer(tiny_dir, 'compact')


@pytest.fixture(scope='session')
def icetk_path(tiny_dir):
  return train_tiny_tokenizer(tiny_dir, 'icetk')


@pytest.fixture(scope='session')
def compact(compact_path):
  return GLMTokenizer.load(compact_path)


@pytest.fixture(scope='session')
def icetk(icetk_path):
  return GLMTokenizer.load(icetk_path)


# --------------------------------------------------------------- compact layout

TRICKY = [
  '',
  'hello world',
  'line one\r\nline two\r\n',
  'a\tb\t\tc',
  'many     spaces   here',
  '   leading spaces',
  'trailing spaces   ',
  ' ',
  '\n',
  '\n\n',
  'para one\n\npara two\n',
  '\r',
  '    \t第一回　甄士隐梦幻识通灵\r\n',
  '你好，世界！',
  'emoji 😀🎉 and 👩‍👩‍👧',
  'unseen: ꙮ Ω ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x07',
  'literal \u2581 meta symbol \u2581\u2581',
  'ＡＢＣ full width',
  '[MASK] text that looks special </s> <unk> <pad>',
]


@pytest.mark.parametrize('text', TRICKY)
def test_compact_round_trip_exact(compact, text):
  ids = compact.encode(text)
  assert all(0 <= i < compact.num_pieces for i in ids)
  assert compact.decode(ids) == text


def test_compact_whole_file_round_trip(compact, tiny_dir):
  raw = (tiny_dir / 'corpus' / 'zh' / 'hongloumeng.txt').read_bytes().decode('utf-8')[:3000]
  assert '\r\n' in raw
  assert compact.decode(compact.encode(raw)) == raw


def test_compact_newline_and_bytes(compact):
  sp = compact.sp
  assert compact.encode('\n') == [1] and sp.id_to_piece(1) == '\n'
  assert sp.id_to_piece(0) == '<unk>'
  assert [sp.id_to_piece(i) for i in (2, 257)] == ['<0x00>', '<0xFF>']
  # CR is not in the vocabulary: byte piece, then the newline piece.
  assert compact.tokenize('\r\n') == ['<0x0D>', '\n']
  # No dummy prefix: a leading space is a real token.
  assert compact.encode('a') != compact.encode(' a')
  # Unseen characters fall back to their UTF-8 bytes, never <unk>.
  emoji = compact.encode('😀')
  assert [compact.id_to_piece(i) for i in emoji] == ['<0xF0>', '<0x9F>', '<0x98>', '<0x80>']
  assert compact.unk_id not in compact.encode('ꙮ😀∮')


def test_compact_special_ids_and_vocab(compact, compact_path):
  n = TINY_VOCAB_PIECES
  assert compact.layout == 'compact'
  assert compact.num_pieces == n
  assert compact.special_ids == {name: n + k for k, name in enumerate(SPECIAL_TOKENS)}
  assert (compact.mask_id, compact.gmask_id, compact.smask_id) == (n, n + 1, n + 2)
  assert (compact.eod_id, compact.sop_id, compact.eop_id) == (n + 3, n + 4, n + 5)
  assert (compact.eos_id, compact.pad_id) == (n + 8, n + 9)
  assert compact.get_command('<sop>') == compact.sop_id == compact.get_command('sop')
  assert compact.vocab_size == 2048  # 1994 + 10 = 2004 -> multiple of 128
  proto = compact.model_proto
  assert GLMTokenizer(proto, 'compact', vocab_multiple=1).vocab_size == n + 10
  assert GLMTokenizer(proto, 'compact', vocab_multiple=64).vocab_size == 2048
  assert GLMTokenizer(proto, 'compact', vocab_multiple=1000).vocab_size == 3000
  side = json.loads(compact_path.with_suffix('.json').read_text())
  assert side['layout'] == 'compact' and side['vocab_multiple'] == 128 and side['vocab_size'] == 2048


def test_compact_masks_and_decode(compact):
  text = 'The [MASK] sat on [sMASK] mat.\n[gMASK]'
  ids = compact.encode_with_masks(text)
  assert ids == (
    compact.encode('The ')
    + [compact.mask_id]
    + compact.encode(' sat on ')
    + [compact.smask_id]
    + compact.encode(' mat.\n')
    + [compact.gmask_id]
  )
  assert compact.decode(ids) == text
  assert compact.encode_with_masks('[MASK][MASK]') == [compact.mask_id] * 2
  rendered = compact.decode(
    [compact.sop_id] + compact.encode('x') + [compact.eop_id, compact.eos_id, compact.pad_id, compact.eod_id]
  )
  assert rendered == '[sop]x[eop]</s>[pad][eod]'
  assert compact.decode([compact.sop_id] + compact.encode('x') + [compact.eos_id], skip_special_tokens=True) == 'x'
  assert compact.decode([compact.vocab_size - 1]) == f'<unused_{compact.vocab_size - 1}>'
  with pytest.raises(ValueError, match='outside the vocabulary'):
    compact.decode([compact.vocab_size])
  with pytest.raises(ValueError):
    compact.decode([-1])


# ----------------------------------------------------------------- icetk layout

def test_icetk_offsets_and_specials(icetk):
  sp = icetk.sp
  for text in ['Hello World! I am icetk.', '你好世界！这里是 icetk。', 'a  b\tc', 'ＡＢ']:
    assert icetk.encode(text) == [i + ICETK_TEXT_OFFSET for i in sp.EncodeAsIds(text)]
  assert icetk.layout == 'icetk'
  assert icetk.vocab_size == ICETK_VOCAB_SIZE == 150528
  assert icetk.eos_id == 20002 and sp.id_to_piece(2) == '</s>'
  assert icetk.pad_id == 0
  assert icetk.unk_id == 20000
  # The stand-in has ice_text.model's first pieces (ICETK README: 20000 <unk>, 20003 <pad>; PAPER: 20004 <n>).
  assert [icetk.id_to_piece(i) for i in range(20000, 20005)] == ['<unk>', '<s>', '</s>', '<pad>', '<n>']
  assert icetk.id_to_piece(0) == '[pad]'
  expected = {name: ICETK_SPECIAL_START + k for k, name in enumerate(GLM_SPECIAL_TOKENS)}
  assert {k: icetk.special_ids[k] for k in GLM_SPECIAL_TOKENS} == expected
  assert list(expected.values()) == list(range(150000, 150008))
  assert (icetk.mask_id, icetk.gmask_id, icetk.smask_id, icetk.eod_id) == (150000, 150001, 150002, 150003)
  assert (icetk.sop_id, icetk.eop_id) == (150004, 150005)


def test_icetk_dummy_prefix_per_segment(icetk):
  ids = icetk.encode_with_masks('a [MASK] b')
  assert ids == icetk.encode('a') + [150000] + icetk.encode('b')
  for seg in ('a', 'b', '你好', 'Hello there'):
    assert icetk.tokenize(seg)[0].startswith('\u2581')
  ids = icetk.encode_with_masks('你好[gMASK]世界[sMASK]')
  assert ids == icetk.encode('你好') + [150001] + icetk.encode('世界') + [150002]
  # Each segment, even one glued to the mask, starts with its own dummy prefix.
  world = icetk.encode('世界')
  assert icetk.id_to_piece(world[0]).startswith('\u2581')
  # Whitespace around masks is absorbed by each segment's normalisation.
  assert icetk.encode_with_masks('  a   [MASK]   b  ') == icetk.encode('a') + [150000] + icetk.encode('b')


def test_icetk_newlines_and_unknown(icetk, icetk_path):
  # '\n', '\r', '\t' become spaces, runs collapse, edges are stripped.
  assert icetk.encode('abc\nhi') == icetk.encode('abc hi')
  assert icetk.decode(icetk.encode('abc\nhi')) == 'abc hi'
  assert icetk.encode('a\r\n\n\tb') == icetk.encode('a b')
  assert icetk.encode('\n') == [] and icetk.encode('  \n ') == []
  assert 20004 not in icetk.encode('x\ny')
  # icetk's ignore_linebreak=False: '\n' -> '<n>' (20004), and decode maps it back.
  keep = GLMTokenizer.load(icetk_path, ignore_linebreak=False)
  ids = keep.encode('abc\nhi')
  assert 20004 in ids and keep.decode(ids) == 'abc\nhi'
  # Unknown characters -> <unk> = 20000.
  ids = icetk.encode('a😀b')
  assert 20000 in ids
  assert '\u2047' in icetk.decode(ids)  # sentencepiece renders <unk> as ' ⁇ '


def test_icetk_decode_renders_specials(icetk):
  a, b = icetk.encode('Hello'), icetk.encode('world')
  ids = a + [150000] + b + [150004] + icetk.encode('there') + [150005, 20002]
  assert icetk.decode(ids) == 'Hello[MASK]world[sop]there[eop]</s>'
  assert icetk.decode(ids, skip_special_tokens=True) == 'Helloworldthere'
  assert icetk.decode([0, 150001, 150003, 150006, 150007, 150002]) == '[pad][gMASK][eod][ENC][dBLOCK][sMASK]'
  # Image ids and padding rows are inside the table but are not tokens.
  assert icetk.decode([5, 150008, 150527]) == '<unused_5><unused_150008><unused_150527>'
  with pytest.raises(ValueError):
    icetk.decode([150528])


# ------------------------------------------------------------------- load/save

def test_load_errors_and_sidecar(tmp_path, compact_path, icetk_path):
  missing = tmp_path / 'nope.model'
  with pytest.raises(ValueError, match='nope.model'):
    GLMTokenizer.load(missing)
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'this is not a protobuf')
  with pytest.raises(ValueError, match='bad.model'):
    GLMTokenizer.load(bad)
  empty = tmp_path / 'empty.model'
  empty.write_bytes(b'')
  with pytest.raises(ValueError, match='empty.model'):
    GLMTokenizer.load(empty)

  # No sidecar -> icetk layout (how GLM-130B's ice_text.model loads).
  plain = tmp_path / 'ice_text.model'
  shutil.copy(icetk_path, plain)
  tok = GLMTokenizer.load(plain)
  assert tok.layout == 'icetk' and tok.eos_id == 20002
  # The path without the suffix works too.
  assert GLMTokenizer.load(str(compact_path)[: -len('.model')]).layout == 'compact'

  # A compact model without its sidecar has no eos piece: a clear error.
  lone = tmp_path / 'lone.model'
  shutil.copy(compact_path, lone)
  with pytest.raises(ValueError, match='lone.model'):
    GLMTokenizer.load(lone)
  assert GLMTokenizer.load(lone, layout='compact').vocab_size == 2048

  # The icetk stand-in does not round-trip, so it cannot be compact.
  with pytest.raises(ValueError, match='round-trip'):
    GLMTokenizer.load(icetk_path, layout='compact')

  # A sidecar that does not match its model is refused; a corrupt one too.
  mism = tmp_path / 'mism.model'
  shutil.copy(compact_path, mism)
  side = json.loads(compact_path.with_suffix('.json').read_text())
  side['num_pieces'] += 1
  mism.with_suffix('.json').write_text(json.dumps(side))
  with pytest.raises(ValueError, match='mism.json'):
    GLMTokenizer.load(mism)
  mism.with_suffix('.json').write_text('{not json')
  with pytest.raises(ValueError, match='mism.json'):
    GLMTokenizer.load(mism)

  # save() writes both files and nothing else.
  out = tok.save(tmp_path / 'saved' / 'tok')
  assert sorted(p.name for p in out.parent.iterdir()) == ['tok.json', 'tok.model']
  again = GLMTokenizer.load(out)
  assert again.layout == 'icetk' and again.encode('hi there') == tok.encode('hi there')


# -------------------------------------------------------------- training input

def test_reading_bom_crlf_jsonl_and_long_lines(tmp_path):
  d = tmp_path / 'in'
  (d / 'sub').mkdir(parents=True)
  (d / 'a.txt').write_bytes('\ufeffFirst line\r\nsecond\r\n\r\n   \r\nthird\r'.encode('utf-8'))
  (d / 'sub' / 'b.jsonl').write_text(
    '\n'.join(
      [
        json.dumps({'text': 'doc one\nline two'}),
        json.dumps({'inputs_pretokenized': 'Q?', 'targets_pretokenized': 'A!'}),
      ]
    ),
    encoding='utf-8',
  )
  (d / 'sub' / 'ignored.csv').write_text('x,y\n')
  files = find_text_files([d])
  assert [f.name for f in files] == ['a.txt', 'b.jsonl']
  sents = list(iter_sentences(files))
  assert sents == ['First line', 'second', 'third', 'doc one', 'line two', 'Q?', 'A!']
  # The pre-training corpus's reader (one for both): a bad line or a file that is not UTF-8 is named, not skipped.
  (d / 'sub' / 'b.jsonl').write_text(json.dumps({'text': 'ok'}) + '\nnot json\n', encoding='utf-8')
  with pytest.raises(TokenizerTrainingError, match='b.jsonl:2: not valid JSON'):
    list(iter_sentences(files))
  (d / 'sub' / 'b.jsonl').write_text(json.dumps({'other': 1}), encoding='utf-8')
  with pytest.raises(TokenizerTrainingError, match='b.jsonl:1: expected a JSON object with a string "text" or'):
    list(iter_sentences(files))
  (d / 'a.txt').write_bytes(b'caf\xe9\n')
  with pytest.raises(TokenizerTrainingError, match='a.txt: not UTF-8'):
    list(iter_sentences(files[:1]))

  line = 'word ' * 50 + 'x' * 300 + ' 汉字' * 40
  chunks = split_long_line(line, 64)
  assert ''.join(chunks) == line
  assert all(len(c.encode('utf-8')) <= 64 for c in chunks)
  assert split_long_line('short', 64) == ['short']


def test_training_errors(tmp_path, tiny_dir):
  with pytest.raises(TokenizerTrainingError, match='path not found'):
    train_tokenizer([tmp_path / 'missing'], 500, tmp_path / 'o')
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(TokenizerTrainingError, match='no .txt or .jsonl files'):
    train_tokenizer([tmp_path / 'empty_dir'], 500, tmp_path / 'o')
  blank = tmp_path / 'blank.txt'
  blank.write_text('\n \n\t\n')
  with pytest.raises(TokenizerTrainingError, match='no text found'):
    train_tokenizer([blank], 500, tmp_path / 'o')
  with pytest.raises(TokenizerTrainingError, match='too small'):
    train_tokenizer([blank], 100, tmp_path / 'o')
  # 300 pieces cannot hold the characters of 100k chars of Chinese at 0.9995 coverage.
  with pytest.raises(TokenizerTrainingError, match='character coverage'):
    train_tokenizer([tiny_dir / 'corpus' / 'zh'], 300, tmp_path / 'o', num_threads=1)
  assert not list(tmp_path.glob('o*'))


# ------------------------------------------------------------------------- CLI

def _run_cli(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, str(CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
  )


def test_cli_trains(tmp_path, tiny_dir):
  out = tmp_path / 'cli' / 'tok'
  en = tiny_dir / 'corpus' / 'en.txt'
  jl = tiny_dir / 'corpus' / 'zh' / 'extra.jsonl'
  r = _run_cli('--input', f'{en},{jl}', '--vocab-size', 500, '--out', out, '--num-threads', 1, '--seed', 1)
  assert r.returncode == 0, r.stderr
  assert 'reading [1/2]' in r.stderr and 'sentences' in r.stderr
  assert 'vocab_size=512' in r.stdout
  tok = GLMTokenizer.load(str(out) + '.model')
  assert tok.layout == 'compact' and tok.num_pieces == 500 and tok.vocab_size == 512
  text = 'To be, or not to be:\r\n\tthat is the question. 你好'
  assert tok.decode(tok.encode(text)) == text
  assert sorted(p.name for p in out.parent.iterdir()) == ['tok.json', 'tok.model']


@pytest.mark.parametrize(
  'args, needle',
  [
    (['--input', '{tmp}/does/not/exist', '--vocab-size', '500', '--out', '{tmp}/o'], '--input: corpus path not found'),
    (['--input', '{en}', '--vocab-size', '100', '--out', '{tmp}/o'], '--vocab-size: vocab size 100 is too small'),
    (['--input', '{en}', '--out', '{tmp}/o'], 'required: --vocab-size'),
  ],
  ids=['missing-input', 'vocab-too-small', 'missing-flag'],
)
def test_cli_bad_input(tmp_path, tiny_dir, args, needle):
  en = tiny_dir / 'corpus' / 'en.txt'
  r = _run_cli(*[a.format(tmp=tmp_path, en=en) for a in args])
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('train_tokenizer.py: error: ') and needle in lines[0], lines[0]
  assert 'Traceback' not in r.stderr
  assert not list(tmp_path.glob('o*'))


def test_a_run_tokenizer_never_sees_the_heldout_text(tmp_path):
  """train_tokenizer_on_training_split: a character that occurs only in a file's held-out tail is no piece."""
  from glm_jax.tokenizer_training import train_tokenizer_on_training_split
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  lines = [f'line {i} of the training text, with some words in it.' for i in range(2000)]
  (corpus / 'a.txt').write_text('\n'.join(lines + ['龘龘龘 held out 龘龘龘']) + '\n', encoding='utf-8')
  both = train_tokenizer([corpus], 300, tmp_path / 'all', character_coverage=1.0).tokenizer
  split = train_tokenizer_on_training_split([corpus], 300, tmp_path / 'split', heldout_fraction=0.01,
                                            character_coverage=1.0).tokenizer
  assert both.sp.piece_to_id('龘') != both.sp.unk_id()  # the whole file: the character is a piece
  assert split.sp.piece_to_id('龘') == split.sp.unk_id()  # the training split only: it is not
