"""glm_jax.data: corpus reading and held-out split, §3.4 sample statistics and structure, the batch iterator."""

import json
from pathlib import Path

import numpy as np
import pytest

from glm_jax.config import data_defaults
from glm_jax.data import (GMASK, MASK, MIP, TrainBatches, build_instruction_set, find_corpus_files, gmask_sample,
                          heldout_batches, instruction_sample, load_corpus, mask_sample, read_documents,
                          read_instructions, special_ids_of, split_heldout, write_jsonl)
from glm_jax.data.instructions import INSTRUCTION_SOURCES
from glm_jax.tokenizer import GLMTokenizer
from tests.tokenizer_fixtures import data_dir, train_tiny_tokenizer

SEQ = 64  # tiny sequences: quarter samples of 16 tokens
MARKER = 'HELDOUTMARKER'


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return GLMTokenizer.load(train_tiny_tokenizer(tmp_path_factory.mktemp('tok'), 'compact'))


@pytest.fixture(scope='module')
def sid(tok):
  return special_ids_of(tok)


@pytest.fixture(scope='module')
def instructions():
  root = data_dir()
  if not (root / 'fewclue').is_dir():
    pytest.skip(f'shared data not found: {root}')
  return build_instruction_set(root)


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  """1000 lines of 40 characters (CRLF, BOM) whose last 10 lines, exactly the last 1%, carry MARKER; a jsonl."""
  root = tmp_path_factory.mktemp('corpus')
  src = data_dir() / 'tinyshakespeare' / 'input.txt'
  if not src.is_file():
    pytest.skip(f'shared data not found: {src}')
  words = src.read_text(encoding='utf-8').split()
  lines, w = [], 0
  while len(lines) < 990:
    line = ''
    while len(line) + len(words[w]) + 1 <= 39:
      line += words[w] + ' '
      w += 1
    lines.append(line.ljust(39))
  lines += [f'{MARKER} number {i:03d} of the tail'.ljust(39) for i in range(10)]
  text = '\n'.join(lines) + '\n'
  assert len(text) == 40_000
  (root / 'en.txt').write_bytes(b'\xef\xbb\xbf' + text.replace('\n', '\r\n').encode('utf-8'))
  with open(root / 'more.jsonl', 'w', encoding='utf-8') as f:
    for i in range(100):
      f.write(json.dumps({'text': ' '.join(words[i * 20:(i + 1) * 20])}) + '\n')
  return root


def _cfg(**kw):
  cfg = data_defaults()
  cfg.update(kw)
  return cfg


def _source_of_mask_layout(layout, sid):
  """(source tokens, span lengths) reconstructed from a [MASK] sample: Part A with each span put back."""
  part_a = layout.tokens[layout.loss_mask == 0]
  b_tokens, b_pos = layout.tokens[layout.loss_mask > 0], layout.position_ids[layout.loss_mask > 0]
  starts = np.flatnonzero(b_tokens == sid.sop)
  spans = {}
  for s, e in zip(starts, list(starts[1:]) + [b_tokens.size]):
    spans[int(b_pos[s])] = b_tokens[s + 1:e].tolist()
  source = []
  for i, t in enumerate(part_a.tolist()):
    source.extend(spans[i] if t == sid.mask else [t])
  return source, [len(v) for v in spans.values()]


# ------------------------------------------------------------------------------------------------ corpus files


def test_reads_bom_and_crlf(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_bytes(b'\xef\xbb\xbfline one\r\nline two\r\n')
  (tmp_path / 'sub' / 'b.jsonl').write_bytes(b'\xef\xbb\xbf{"text": "x\\r\\ny"}\r\n\r\n{"text": "z"}\r\n')
  (tmp_path / 'notes.md').write_text('ignored')
  files = find_corpus_files(tmp_path)
  assert [f.name for f in files] == ['a.txt', 'b.jsonl']
  assert read_documents(files[0]) == ['line one\nline two\n']
  assert read_documents(files[1]) == ['x\ny', 'z']
  assert find_corpus_files(f'{files[0]},{files[1]}') == files


def test_path_errors(tmp_path):
  with pytest.raises(ValueError, match='not found: .*nowhere'):
    find_corpus_files(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no .txt or .jsonl files under .*empty'):
    find_corpus_files(tmp_path / 'empty')
  (tmp_path / 'bad.jsonl').write_text('{"text": 1}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:1'):
    read_documents(tmp_path / 'bad.jsonl')


def test_real_files():
  gutenberg = data_dir() / 'gutenberg_en' / '1342-0.txt'
  zh = data_dir() / 'classics_zh' / '红楼梦.txt'
  if not (gutenberg.is_file() and zh.is_file()):
    pytest.skip('shared data not found')
  assert gutenberg.read_bytes()[:3] == b'\xef\xbb\xbf' and b'\r\n' in gutenberg.read_bytes()[:2000]
  (text,) = read_documents(gutenberg)
  assert not text.startswith('\ufeff') and '\r' not in text
  assert 'START OF THIS PROJECT GUTENBERG' not in text and 'Project Gutenberg-tm' not in text[-20000:]
  assert 'It is a truth universally acknowledged' in text[:5000]
  (full,) = read_documents(gutenberg, strip_gutenberg=False)
  assert 'END OF THIS PROJECT GUTENBERG' in full
  (zh_text,) = read_documents(zh)
  assert '\r' not in zh_text and '宝玉' in zh_text


def test_split_heldout_is_last_percent_at_a_line_boundary():
  text = ''.join(f'line {i} ' + 'x' * (i % 7) + '\n' for i in range(500))
  train, held = split_heldout([text], 0.01)
  assert ''.join(train + held) == text
  assert train[0].endswith('\n')
  assert abs(len(held[0]) - 0.01 * len(text)) <= 15  # nearest line boundary to the 1% cut
  docs = [f'doc {i} ' * 10 for i in range(300)]  # jsonl-like: no newlines, cut at a document boundary
  train, held = split_heldout(docs, 0.01)
  assert train + held == docs and len(held) == 3
  assert split_heldout(['abc'], 0.0) == (['abc'], [])


# ---------------------------------------------------------------------------------------- held-out split, BPB


def test_heldout_never_trained_and_heldout_batches(tok, sid, corpus_dir):
  corpus = load_corpus(corpus_dir, tok)
  assert [d.path.name for d in corpus.heldout][:2] == ['en.txt', 'more.jsonl']
  assert MARKER in corpus.heldout[0].text and corpus.heldout[0].text.count(MARKER) == 10
  assert corpus.heldout[0].num_bytes == 400  # exactly the last 1% of the (LF-normalised) file
  assert MARKER not in tok.decode(corpus.train_tokens)
  held_jsonl = sum(d.path.name == 'more.jsonl' for d in corpus.heldout)
  assert 1 <= held_jsonl <= 2 and (corpus.train_tokens == sid.eos).sum() == 1 + 100 - held_jsonl  # eos per document

  # One epoch of all-[gMASK] sequences reads every chunk once, and only training tokens.
  it = TrainBatches(_cfg(mask_prob=0.0, mip_share=0.0), tok, SEQ, 4, seed=3, corpus=corpus)
  seen = set()
  for i in range(it.num_chunks):
    layout, kind = it.sequence_at(i)
    assert kind == GMASK
    source = [t for t in layout.targets.tolist() if t not in (sid.gmask, sid.eop)]
    m = it.chunk_index(i)
    seen.add(m)
    assert source == corpus.train_tokens[m * (SEQ - 2):(m + 1) * (SEQ - 2)].tolist()
    assert MARKER not in tok.decode(source)
  assert seen == set(range(it.num_chunks)) and it.num_chunks == corpus.train_tokens.size // (SEQ - 2)

  batches = list(heldout_batches(corpus, tok, SEQ, 4))
  assert sum(n for _, n in batches) == corpus.num_heldout_bytes
  assert sum(b['loss_mask'].sum() for b, _ in batches) == corpus.num_heldout_tokens  # every token scored once
  scored = np.concatenate([b['targets'][b['loss_mask'] > 0] for b, _ in batches])
  assert MARKER in tok.decode(scored[:sum(d.tokens.size for d in corpus.heldout[:1])])
  b = batches[0][0]
  assert b['tokens'].shape == (4, SEQ) and b['attention_mask'].shape == (4, 1, SEQ, SEQ)
  assert (b['tokens'] == sid.gmask).sum() == 4  # one [gMASK] per window


# ------------------------------------------------------------------------------------------ §3.4 statistics


def test_mask_sample_statistics_and_structure(tok, sid):
  rng = np.random.default_rng(0)
  stream = np.asarray(tok.encode(read_documents(data_dir() / 'tinyshakespeare' / 'input.txt')[0][:120000]), np.int32)
  fractions, span_lengths, offset = [], [], 0
  for _ in range(300):
    layout, n = mask_sample(stream[offset:], 128, rng, sid)
    assert layout.tokens.size <= 128
    source, lengths = _source_of_mask_layout(layout, sid)
    assert source == stream[offset:offset + n].tolist()  # Part A + spans give back the window
    fractions.append(sum(lengths) / n)
    span_lengths += lengths
    offset += n
  assert abs(np.mean(fractions) - 0.15) < 0.005
  assert 2.8 < np.mean(span_lengths) < 3.3  # Poisson(3) clipped to >= 1: mean 3.05
  assert min(span_lengths) >= 1 and np.mean(np.asarray(span_lengths) == 3) > 0.15

  # Structure of one sample.
  layout, n = mask_sample(stream, 128, np.random.default_rng(1), sid)
  a = int((layout.loss_mask == 0).sum())
  assert np.all(layout.loss_mask[:a] == 0) and np.all(layout.loss_mask[a:] == 1)  # loss on Part B only
  assert np.array_equal(layout.position_ids[:a], np.arange(a))
  mask_positions = np.flatnonzero(layout.tokens[:a] == sid.mask)
  sops = np.flatnonzero(layout.tokens == sid.sop)
  assert len(sops) == len(mask_positions) >= 2
  for s, e in zip(sops, list(sops[1:]) + [layout.tokens.size]):
    assert layout.position_ids[s] in mask_positions
    assert np.all(layout.position_ids[s:e] == layout.position_ids[s])  # the span sits at its mask
    assert layout.targets[e - 1] == sid.eop  # each span's targets end with <eop>
    assert np.array_equal(layout.targets[s:e - 1], layout.tokens[s + 1:e])
  m = layout.attention_mask
  assert m[:a, :a].all() and not m[:a, a:].any()  # Part A bidirectional, blind to Part B
  assert m[a:, :a].all() and np.array_equal(m[a:, a:], np.tril(np.ones((n := m.shape[0] - a, n), bool)))


def test_short_and_single_span_variants(tok, sid):
  stream = np.asarray(tok.encode(read_documents(data_dir() / 'tinyshakespeare' / 'input.txt')[0]), np.int32)

  def samples(count, seed, **kw):
    rng, offset = np.random.default_rng(seed), 0
    for _ in range(count):
      layout, n = mask_sample(stream[offset:], 128, rng, sid, **kw)
      source, lengths = _source_of_mask_layout(layout, sid)
      assert source == stream[offset:offset + n].tolist()
      offset += n
      yield layout, lengths

  # Always short: a length drawn from [32, 128), spans still covering about 15% of it.
  sizes = [(lay.tokens.size, sum(ls) / (lay.tokens.size - 2 * len(ls))) for lay, ls in samples(200, 0, short_seq_prob=1)]
  assert min(s for s, _ in sizes) >= 32 and max(s for s, _ in sizes) < 128 and np.mean([s for s, _ in sizes]) < 90
  assert abs(np.mean([f for _, f in sizes]) - 0.15) < 0.02
  # Always one span, of Poisson(3) length clipped to >= 1.
  singles = [ls for _, ls in samples(300, 1, single_span_prob=1)]
  assert all(len(ls) == 1 for ls in singles) and 2.8 < np.mean([ls[0] for ls in singles]) < 3.3
  # GLM-130B's 2% each: about 2% of samples are single-span, which a 15% sample of 128 tokens never is.
  share = np.mean([len(ls) == 1 for _, ls in samples(2000, 2, single_span_prob=0.02, short_seq_prob=0.02)])
  assert 0.008 < share < 0.035


def test_part_b_order_is_shuffled(sid):
  rng = np.random.default_rng(5)
  orders = set()
  for _ in range(50):
    layout, _ = mask_sample(np.arange(200) % 50, 64, rng, sid)
    pos = layout.position_ids[layout.tokens == sid.sop]
    orders.add(bool(np.all(np.diff(pos) > 0)))
  assert orders == {True, False}


def test_gmask_sample_statistics(sid):
  rng = np.random.default_rng(2)
  fractions = []
  for _ in range(300):
    layout = gmask_sample(np.arange(100) % 50, 64, rng, sid)
    assert layout.tokens.size == 64
    g = int(np.flatnonzero(layout.tokens == sid.gmask)[0])
    assert layout.tokens[g + 1] == sid.sop and layout.targets[-1] == sid.eop
    assert np.all(layout.loss_mask[:g + 1] == 0) and np.all(layout.loss_mask[g + 1:] == 1)
    assert np.array_equal(layout.position_ids, np.arange(64))
    fractions.append((64 - 2 - g) / 62)
  assert min(fractions) >= 0.2 and max(fractions) < 1
  assert abs(np.mean(fractions) - 0.6) < 0.04  # uniform on [0.2, 1)


def test_mix_and_mip_share(tok, corpus_dir, instructions):
  it = TrainBatches(_cfg(), tok, SEQ, 4, seed=7, corpus=load_corpus(corpus_dir, tok), instructions=instructions)
  kinds = [it.sequence_kind(i) for i in range(4000)]
  assert abs(kinds.count(MIP) - 0.05 * 4000) <= 1  # exact-rate schedule: the configured share of positions
  self_supervised = [k for k in kinds if k != MIP]
  assert abs(self_supervised.count(MASK) / len(self_supervised) - 0.3) < 0.03
  it = TrainBatches(_cfg(mip_share=0.25), tok, SEQ, 4, seed=7, corpus=it.corpus, instructions=instructions)
  assert abs([it.sequence_kind(i) for i in range(1000)].count(MIP) - 250) <= 1


# ------------------------------------------------------------------------------------------ packed sequences


def _check_packed(layout, sid, quarter):
  seg = layout.segment_ids
  assert seg.max() == 4
  for s in range(1, 5):
    idx = np.flatnonzero(seg == s)
    assert idx.size <= quarter and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
    assert layout.position_ids[idx[0]] == 0  # positions restart in each sample
    outside = seg != s
    assert not layout.attention_mask[np.ix_(idx, np.flatnonzero(outside))].any()  # attends only within itself
    assert not layout.attention_mask[np.ix_(np.flatnonzero(outside), idx)].any()
    part_b = idx[layout.loss_mask[idx] > 0]
    assert layout.tokens[part_b[0]] == sid.sop and layout.targets[part_b[-1]] == sid.eop


def test_packed_mask_and_mip_sequences(tok, sid, corpus_dir, instructions):
  it = TrainBatches(_cfg(mip_share=0.5), tok, SEQ, 4, seed=11, corpus=load_corpus(corpus_dir, tok),
                    instructions=instructions)
  kinds = {}
  for i in range(40):
    layout, kind = it.sequence_at(i)
    assert kind == it.sequence_kind(i) and layout.tokens.shape == (SEQ,)
    if kind in (MASK, MIP) and kind not in kinds:
      kinds[kind] = layout
  _check_packed(kinds[MASK], sid, SEQ // 4)
  mip = kinds[MIP]
  _check_packed(mip, sid, SEQ // 4)
  for s in range(1, 5):  # a MIP sample: inputs + [MASK] | <sop> target <eop>, Part B at the [MASK]'s position
    idx = np.flatnonzero(mip.segment_ids == s)
    a = idx[mip.loss_mask[idx] == 0]
    assert mip.tokens[a[-1]] == sid.mask and (mip.tokens[a] == sid.mask).sum() == 1
    assert np.all(mip.position_ids[idx[mip.loss_mask[idx] > 0]] == a.size - 1)


def test_instruction_sample_layout(sid):
  layout = instruction_sample([5, 6, 7], [8, 9], 16, sid)
  assert layout.tokens.tolist() == [5, 6, 7, sid.mask, sid.sop, 8, 9]
  assert layout.targets.tolist()[3:] == [sid.mask, 8, 9, sid.eop]
  assert layout.position_ids.tolist() == [0, 1, 2, 3, 3, 3, 3]
  assert layout.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 1]
  long = instruction_sample(list(range(100)), list(range(200, 240)), 16, sid)  # keeps the end of the input
  assert long.tokens.size == 16 and long.tokens[:7].tolist() == list(range(93, 100))
  assert long.targets[-1] == sid.eop


# ------------------------------------------------------------------------------ determinism, resume, batches


def test_batches_deterministic_and_resumable(tok, sid, corpus_dir, instructions):
  corpus = load_corpus(corpus_dir, tok)
  cfg = _cfg(mip_share=0.2)

  def make(seed=0):
    return TrainBatches(cfg, tok, SEQ, 3, seed=seed, corpus=corpus, instructions=instructions)

  a, b = make(), make()
  first = [next(a) for _ in range(4)]
  for x, y in zip(first, [next(b) for _ in range(4)]):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
  x = first[0]
  assert x['tokens'].dtype == np.int32 and x['tokens'].shape == (3, SEQ)
  assert x['targets'].dtype == np.int32 and x['position_ids'].dtype == np.int32
  assert x['attention_mask'].dtype == bool and x['attention_mask'].shape == (3, 1, SEQ, SEQ)
  assert x['loss_mask'].dtype == np.float32 and x['loss_mask'].shape == (3, SEQ)
  assert not np.array_equal(next(make(seed=1))['tokens'], first[0]['tokens'])

  c = make()
  for _ in range(2):
    next(c)
  state = json.loads(json.dumps(c.get_state()))
  resumed = make()
  resumed.set_state(state)
  for want in first[2:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  with pytest.raises(ValueError, match='seed'):
    make(seed=5).set_state(state)
  other = make(seed=5)
  other.set_state(state, strict=False)
  assert other.step == 2


# -------------------------------------------------------------------------------------- instructions, config


def test_instruction_set_from_shared_data(instructions, tmp_path, tok):
  tasks = {r['task'] if not r['task'].startswith('mmlu/') else 'mmlu' for r in instructions}
  assert tasks == set(INSTRUCTION_SOURCES)
  for source in INSTRUCTION_SOURCES:
    recs = [r for r in instructions if r['task'] == source or r['task'].startswith(source + '/')]
    assert len(recs) >= 50, source
    assert all(r['inputs_pretokenized'].strip() and r['targets_pretokenized'].strip() for r in recs), source
  mmlu = next(r for r in instructions if r['task'].startswith('mmlu/'))
  assert '(A) ' in mmlu['inputs_pretokenized'] and mmlu['inputs_pretokenized'].endswith('Answer:')
  assert mmlu['targets_pretokenized'][:4] in ('(A) ', '(B) ', '(C) ', '(D) ')
  path = write_jsonl(instructions[:20], tmp_path / 'mip.jsonl')
  assert read_instructions(path) == instructions[:20]
  (tmp_path / 'bad.jsonl').write_text('{"inputs_pretokenized": "x"}\n')
  with pytest.raises(ValueError, match='bad.jsonl'):
    read_instructions(tmp_path / 'bad.jsonl')


def test_data_defaults():
  d = data_defaults()
  assert (d.mask_prob, d.mask_ratio, d.poisson_lambda, d.min_gmask_ratio) == (0.3, 0.15, 3.0, 0.2)
  assert (d.mip_share, d.mip_path, d.heldout_fraction, d.samples_per_sequence) == (0.05, '', 0.01, 4)
  assert [p.split('/')[-1] for p in d.corpus_paths] == ['tinyshakespeare', 'gutenberg_en', 'classics_zh']


def test_heldout_baselines_by_hand():
  """Unigram: add-one counts of the training tokens [0, 0, 1] over 3 ids are 3, 2, 1 (of 6); the held-out tokens
  0, 1, 2 of 'abc' (3 bytes) cost 1 + log2(3) + log2(6) bits. Compressors: a repetitive text packs below 1 bit."""
  from glm_jax.data.baselines import heldout_baselines
  from glm_jax.data.corpus import Corpus, HeldoutDocument
  corpus = Corpus(files=(Path('a.txt'),), train_tokens=np.array([0, 0, 1], np.int32),
                  file_offsets=np.array([0, 3]), heldout=(HeldoutDocument(Path('a.txt'), 'abc', np.array([0, 1, 2])),),
                  heldout_fraction=0.01)
  assert heldout_baselines(corpus, 3)['unigram'] == pytest.approx((1 + np.log2(3) + np.log2(6)) / 3)
  repetitive = Corpus(files=(Path('a.txt'),), train_tokens=np.array([0], np.int32), file_offsets=np.array([0, 1]),
                      heldout=(HeldoutDocument(Path('a.txt'), 'to be or not ' * 500, np.array([0])),),
                      heldout_fraction=0.01)
  bpb = heldout_baselines(repetitive, 1)
  assert set(bpb) == {'unigram', 'bzip2 -9', 'xz -9e', 'gzip -9'}
  assert all(0 < bpb[k] < 1 for k in ('bzip2 -9', 'xz -9e', 'gzip -9'))
