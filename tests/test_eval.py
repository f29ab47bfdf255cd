"""The evaluation framework (eval/): scores against SAT's GLM130B on layouts built here from glm130b.md §7, the YAML
schema and its errors, metrics worked by hand, and a whole run through launch/evaluate.py's library with resume."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from eval import metrics
from eval.config import load_task
from eval.evaluator import evaluate
from eval.scoring import Scorer, choice_items, window_items
from glm_jax import from_sat_state_dict, rope, save_model
from glm_jax.generation import blanks
from glm_jax.generation.api import Generator
from glm_jax.tokenizer import GLMTokenizer
from tests import sat_reference as R
from tests.conftest import PARITY_MODEL, REPO, load_config, subprocess_env
from tests.tokenizer_fixtures import train_tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """SAT's GLM130B at the parity size (vocabulary of the tiny tokenizer), the same weights as a checkpoint, and a
  Generator on it."""
  tmp = tmp_path_factory.mktemp('eval')
  tok_path = train_tiny_tokenizer(tmp, 'compact')
  tok = GLMTokenizer.load(tok_path)
  model = dict(PARITY_MODEL, vocab_size=tok.vocab_size, max_sequence_length=256)
  sat = R.build_sat_glm130b(**model, seed=5, init_std=0.1)
  R.set_rope_inv_freq(sat, rope.inv_freq_f32(model['hidden_size'] // model['num_attention_heads']))
  config = load_config('tiny', **model)
  path = save_model(tmp / 'ckpt', from_sat_state_dict(R.state_dict_numpy(sat), config.model), config)
  shutil.copy(tok_path, path / 'tokenizer.model')
  shutil.copy(tok_path.with_suffix('.json'), path / 'tokenizer.json')
  gen = Generator.load(path)
  return sat, gen, path


def _sat_logp(sat, tokens, positions, may_attend):
  logits = R.sat_forward(sat, tokens[None], positions[None], may_attend[None, None])[0][0]
  return torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), -1).numpy()


def _hand_choice_layout(context, choices, sid):
  """§7.2 with [MASK] appended (no blank in the context): every option a causal block [<sop>] + c[:-1] at the
  mask's position, seeing the whole context; options do not see each other; context rows see no option."""
  tokens = list(context) + [sid.mask]
  division = len(tokens)
  positions = list(range(division))
  reads = []
  for c in choices:
    reads.append((len(tokens), c))
    tokens += [sid.sop] + list(c[:-1])
    positions += [division - 1] * len(c)
  s = len(tokens)
  may = np.zeros((s, s), bool)
  may[:, :division] = True
  may[:division, division:] = False
  for start, c in reads:
    may[start:start + len(c), start:start + len(c)] = np.tril(np.ones((len(c), len(c)), bool))
  return np.array(tokens, np.int32), np.array(positions, np.int32), may, reads


def test_choice_scores_equal_sats(setup):
  """Sums of option log-probs from the batched scorer (many examples per call, padded to buckets) equal SAT's on
  layouts built by hand, to 1e-4 of the largest |score| (fp32 both: rounding only)."""
  sat, gen, _ = setup
  sid = blanks.special_ids(gen.tokenizer)
  rng = np.random.default_rng(0)
  cases = []
  for n in range(7):  # different lengths: several buckets and batch rows
    context = rng.integers(20, gen.tokenizer.vocab_size - 20, rng.integers(3, 40)).tolist()
    k = 1 if n == 3 else 3  # a single-token case
    choices = [rng.integers(20, 200, k if n == 3 else rng.integers(1, 5)).tolist() for _ in range(4)]
    cases.append((context, choices))
  scorer = Scorer(gen, max_batch_tokens=256)
  items = [choice_items(c, ch, sid, max_seq_length=256) for c, ch in cases]
  scored = scorer.score([it for it, _ in items])
  assert len(scorer.compiled_shapes) >= 2  # several sequences per call, more than one bucket
  for (context, choices), (logp, _), (_, slices) in zip(cases, scored, items):
    tokens, positions, may, reads = _hand_choice_layout(context, choices, sid)
    ref_logp = _sat_logp(sat, tokens, positions, may)
    ours = [float(logp[s].sum()) for s in slices]
    if all(len(c) == 1 for c in choices):  # §7.2: single-token options are read at one <sop> row
      ref = [ref_logp[reads[0][0], c[0]] for c in choices]
    else:
      ref = [sum(ref_logp[start + j, t] for j, t in enumerate(c)) for start, c in reads]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(abs(r) for r in ref))


def test_scoring_on_a_mesh_equals_one_device(setup):
  """A Generator on a (data 2, tensor 2) mesh: batches split over data (odd batches padded to a multiple of 2),
  weights over tensor; the same scores as one device."""
  from glm_jax import sharding  # noqa: PLC0415
  _, gen, path = setup
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, stage=1), jax.devices()[:4])
  on_mesh = Generator.load(path, mesh=mesh)
  sid = blanks.special_ids(gen.tokenizer)
  rng = np.random.default_rng(4)
  items = [choice_items(rng.integers(20, 300, rng.integers(3, 30)).tolist(),
                        [rng.integers(20, 300, rng.integers(1, 4)).tolist() for _ in range(3)], sid,
                        max_seq_length=256)[0] for _ in range(5)]
  scorer = Scorer(on_mesh, max_batch_tokens=128)
  for (a, ga), (b, gb) in zip(scorer.score(items), Scorer(gen, max_batch_tokens=128).score(items)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (ga == gb).all()
  assert all(b % 2 == 0 for b, _, _ in scorer.compiled_shapes)


def test_lm_window_losses_equal_sats(setup):
  """Window nats from the scorer equal SAT's on §7.4 windows built by hand: window 0 scores every token after
  [MASK, <sop>]; window i > 0 has a bidirectional prompt of max_len - 1 - gen_len tokens and scores gen_len more."""
  sat, gen, _ = setup
  sid = blanks.special_ids(gen.tokenizer)
  ids = np.random.default_rng(1).integers(20, gen.tokenizer.vocab_size - 20, 150).tolist()
  max_len, gen_len = 64, 24
  items = window_items(ids, sid, max_seq_length=max_len, generation_length=gen_len, use_task_mask=False,
                       unidirectional=False)
  ours = [-float(logp.sum()) for logp, _ in Scorer(gen).score(items)]
  ref, i, covered = [], 0, 0
  while covered < len(ids):  # windows until the scored spans reach the document's end
    window = ids[i * gen_len:i * gen_len + max_len - 1]
    prompt, text = ([], window) if i == 0 else (window[:max_len - 1 - gen_len], window[max_len - 1 - gen_len:])
    n_ctx = len(prompt) + 1
    tokens = np.array(prompt + [sid.mask, sid.sop] + text[:-1], np.int32)
    positions = np.arange(len(tokens), dtype=np.int32)
    may = np.tril(np.ones((len(tokens), len(tokens)), bool))
    may[:, :n_ctx] = True
    logp = _sat_logp(sat, tokens, positions, may)
    ref.append(-sum(logp[n_ctx + j, t] for j, t in enumerate(text)))
    covered = i * gen_len + len(window)
    i += 1
  assert len(ours) == len(ref) == 5  # 63 tokens, then 24 a window: 63 + 3 * 24 + 15 = 150
  assert sum(len(it.rows) for it in items) == len(ids)  # the scored spans tile the document
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The schema, the data, the metrics


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding='utf-8')
  return path


@pytest.mark.parametrize('text,message', [
    ('name: t\ntype: mul\npath: x\nmetrics: [Accuracy, Bleu]\n', "metrics: unknown metric 'Bleu'"),
    ('name: t\ntype: mul\npath: x\nmicro-batch-size: many\n', 'micro-batch-size: must be a non-negative integer'),
    ('name: t\ntype: mul\npath: x\nuse_task_mask: true\nuse-task-mask: false\n', 'use-task-mask: given twice'),
    ('name: t\ntype: mul\npath: x\ncolour: red\n', 'colour: unknown field'),
    ('name: t\ntype: cls\npath: x\n', "type: 'cls' is not one of mul, gen, lm"),
    ('type: mul\npath: x\n', 'name: required'),
    ('name: t\ntype: gen\npath: x\nunidirectional: true\n', 'unidirectional: needs use_task_mask'),
    ('name: t\n  type: mul\n', 'line 2: not valid YAML'),
])
def test_task_file_errors_name_the_file_and_field(tmp_path, text, message):
  path = _write(tmp_path / 'task.yaml', text)
  with pytest.raises(ValueError) as e:
    load_task(path)
  assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_kebab_and_snake_keys_and_defaults(tmp_path):
  config = load_task(_write(tmp_path / 't.yaml', 'name: t\ntype: gen\npath: p\nuse-task-mask: true\n'
                            'max_gen_length: 5\nsampling-strategy: BeamSearchStrategy\nnum-beams: 16\n'))
  assert config.use_task_mask and config.max_gen_length == 5 and config.num_beams == 16
  assert config.metrics == ('EM', 'F1') and config.no_repeat_ngram_size == 3  # GLM-130B's gen defaults


def test_metrics_hand_worked():
  assert metrics.exact_match('The Eiffel  Tower!', ['eiffel tower']) == 1.0
  assert metrics.exact_match('a tower', ['Eiffel tower', 'tower']) == 1.0  # best target; the article goes
  # tokens: pred {paris, is, big} vs gold {paris}: precision 1/3, recall 1 -> F1 0.5
  assert metrics.f1_score('Paris is big', ['Paris']) == pytest.approx(0.5)
  # Chinese per character: 北京大学 vs 北京: common 2, precision 2/4, recall 1 -> 2/3; punctuation dropped
  assert metrics.f1_score('北京大学。', ['北京']) == pytest.approx(2 / 3)
  assert metrics.answer_tokens('北京abc 大') == ['北', '京', 'abc', '大']
  agg = metrics.aggregate([{'examples': 1, 'metrics': {'Accuracy': 1.0, 'PPL': 10.0}},
                           {'examples': 3, 'metrics': {'Accuracy': 0.0, 'PPL': 20.0}},
                           {'examples': 4, 'metrics': {'Accuracy': 0.5, 'PPL': 30.0}}])
  assert agg['Accuracy'] == {'best': 1.0, 'median': 0.5, 'average': pytest.approx((1 + 0 + 2) / 8)}
  assert agg['PPL']['best'] == 10.0  # lower is better
  assert metrics.perplexity(1000.0, 10) == pytest.approx(np.exp(20.0))  # capped as GLM-130B


# ---------------------------------------------------------------------------------------------------------------------
# A whole run


def _tasks(root):
  data, tasks = root / 'data', root / 'tasks'
  mul = [{'inputs_pretokenized': f'Question {i}: which word?', 'choices_pretokenized': ['yes', 'no', 'maybe so'],
          'label': i % 3} for i in range(9)]
  _write(data / 'qa' / 'prompt1' / 'validation.jsonl', '\n'.join(json.dumps(x) for x in mul[:5]) + '\n')
  _write(data / 'qa' / 'prompt2' / 'validation.jsonl', '\n'.join(json.dumps(x) for x in mul[5:]) + '\n')
  _write(data / 'text' / 'doc.txt', 'It was the best of times, it was the worst of times. ' * 12)
  gen = [{'inputs_pretokenized': 'The answer is', 'targets_pretokenized': ['times']}] * 3
  _write(data / 'gen' / 'p' / 'validation.jsonl', '\n'.join(json.dumps(x) for x in gen) + '\n')
  _write(tasks / 'qa.yaml', 'name: qa\ntype: mul\npath: qa\nfile-pattern:\n  dev: "**/validation.jsonl"\n')
  _write(tasks / 'lm' / 'text.yaml', 'name: text\ntype: lm\npath: text\nfile_pattern: "*.txt"\nmax_seq_length: 64\n'
         'generation_length: 24\nmetrics: [PPL, BPB]\n')
  _write(tasks / 'gen.yaml', 'name: gen\ntype: gen\npath: gen\nmax_gen_length: 4\n')
  return data, tasks


def test_evaluate_writes_each_task_and_resumes(setup, tmp_path):
  _, gen, _ = setup
  data, tasks = _tasks(tmp_path)
  out = tmp_path / 'results.json'
  lines = []
  results = evaluate([tasks], data, gen, out, progress=False, print_fn=lines.append)
  qa = results['tasks']['qa']['groups']['dev']
  assert [f['examples'] for f in qa['files']] == [5, 4]
  # Accuracy from the scores, and against Generator.log_probs (one example per call, another code path)
  for f in qa['files']:
    rows = [json.loads(line) for line in open(f['file'], encoding='utf-8')]
    for row, scores, pred in zip(rows, f['scores'], f['predictions']):
      ref = gen.log_probs(row['inputs_pretokenized'], row['choices_pretokenized'])
      np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
      assert pred == int(np.argmax(ref))
    assert f['metrics']['Accuracy'] == pytest.approx(np.mean([p == r['label'] for p, r in zip(f['predictions'], rows)]))
  text = results['tasks']['text']['groups']['text']['files'][0]
  assert text['metrics']['BPB'] == pytest.approx(text['nats'] / text['bytes'] / np.log(2))
  assert text['metrics']['PPL'] == pytest.approx(np.exp(min(20, text['nats'] / text['words'])))
  assert 0 <= results['tasks']['gen']['groups']['gen']['aggregate']['EM']['best'] <= 1
  assert json.loads(out.read_text()) == results
  assert any(line.startswith('qa ') for line in lines)

  # a rerun skips what is done; a changed task runs again
  lines.clear()
  evaluate([tasks], data, gen, out, progress=False, print_fn=lines.append)
  assert sum('skipped' in line for line in lines) == 3
  _write(tasks / 'gen.yaml', 'name: gen\ntype: gen\npath: gen\nmax_gen_length: 3\n')
  lines.clear()
  evaluate([tasks], data, gen, out, progress=False, print_fn=lines.append)
  assert sum('skipped' in line for line in lines) == 2


def test_bad_data_is_one_line_naming_file_and_line(setup, tmp_path):
  data, tasks = _tasks(tmp_path)
  bad = data / 'qa' / 'prompt2' / 'validation.jsonl'
  bad.write_text(bad.read_text().replace('"label": 2', '"label": 7'), encoding='utf-8')
  run = subprocess.run([sys.executable, 'launch/evaluate.py', '--checkpoint', setup[2], '--data', data,
                        '--out', tmp_path / 'r.json', tasks / 'qa.yaml'], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
  assert f'{bad} line' in run.stderr and '"label" must be an index into its 3 choices, not 7' in run.stderr
  run = subprocess.run([sys.executable, 'launch/evaluate.py', '--checkpoint', setup[2], '--data', tmp_path / 'none',
                        '--out', tmp_path / 'r.json', tasks / 'qa.yaml'], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 2 and 'does not exist' in run.stderr and 'qa.yaml: path:' in run.stderr, run.stderr
  assert not (tmp_path / 'r.json').exists()


# ---------------------------------------------------------------------------------------------------------------------
# launch/prepare_eval_data.py


def test_prepare_converts_every_example_and_the_shipped_tasks_load(tmp_path):
  """The shared data converts with every example kept (the counts of shared/data/README.md), and every shipped task
  file finds its data."""
  from eval.evaluator import plan  # noqa: PLC0415
  from eval.prepare import prepare  # noqa: PLC0415
  from tests.tokenizer_fixtures import data_dir  # noqa: PLC0415
  report = prepare(data_dir(), tmp_path)
  written = report.written
  assert sum(n for k, n in written.items() if k.startswith('mmlu/')) == 285
  expected = {'eprstmt': (160, 160), 'bustm': (160, 160), 'ocnli': (160, 160), 'csl': (160, 160),
              'cluewsc': (160, 159), 'chid': (202, 202), 'tnews': (1185, 1098), 'iflytek': (3024, 1373),
              'csldcp': (2036, 2068)}
  for task, (train, dev) in expected.items():
    assert written[f'fewclue_{task}/prompt0/train.jsonl'] == train, task
    assert written[f'fewclue_{task}/prompt0/dev.jsonl'] == dev, task
  assert written['xcopa_zh/prompt0/val.jsonl'] == 100 and written['cmrc2018/prompt0/trial.jsonl'] == 1002
  assert not report.skipped
  # eval/tasks/*.yaml, as the README runs them (LAMBADA's, in eval/tasks/lambada/, needs passages shared/data lacks)
  tasks = {config.name: groups for config, groups in plan(sorted((REPO / 'eval' / 'tasks').glob('*.yaml')), tmp_path)}
  assert len(tasks['mmlu']['overall']) == 57 and sum(len(tasks['mmlu'][g]) for g in
                                                     ('stem', 'humanities', 'social_sciences', 'other')) == 57
  tnews = [json.loads(line) for line in open(tmp_path / 'fewclue_tnews/prompt0/dev.jsonl', encoding='utf-8')]
  assert len(tnews[0]['choices_pretokenized']) == 15 and '体育' in tnews[0]['choices_pretokenized']


def test_prepare_layouts_by_hand(tmp_path):
  """MMLU with and without a header, answers as indices and letters, shots from dev (never the example itself);
  a FewCLUE label outside the classes is reported, not dropped silently; LAMBADA's target is the last word."""
  from eval.prepare import prepare  # noqa: PLC0415
  src = tmp_path / 'src'
  _write(src / 'mmlu' / 'dev' / 'virology_dev.csv',
         'question,choice0,choice1,choice2,choice3,answer\nQ1?,a,b,c,d,2\nQ2?,e,f,g,h,0\n"Q3,\nwith a comma",i,j,k,l,3\n')
  _write(src / 'mmlu' / 'test' / 'virology_test.csv', 'T1?,w,x,y,z,B\n')
  _write(src / 'fewclue' / 'ocnli' / 'dev_few_all.json',
         '{"sentence1": "甲", "sentence2": "乙", "label": "neutral"}\n{"sentence1": "丙", "sentence2": "丁", "label": "-"}\n')
  book = (data_dir_path() / 'gutenberg_en' / '84-0.txt').read_text(encoding='utf-8-sig')
  passages = [' '.join(p.split()) for p in book.split('\n\n') if len(p.split()) > 40][10:13]  # read_text: \n
  assert len(passages) == 3
  _write(src / 'lambada' / 'passages.jsonl', ''.join(json.dumps({'text': p}) + '\n' for p in passages))
  report = prepare(src, tmp_path / 'out')
  dev = [json.loads(line) for line in open(tmp_path / 'out/mmlu/other/virology/dev.jsonl', encoding='utf-8')]
  test = [json.loads(line) for line in open(tmp_path / 'out/mmlu/other/virology/test.jsonl', encoding='utf-8')]
  assert [d['label'] for d in dev] == [2, 0, 3] and test[0]['label'] == 1
  assert dev[0]['inputs_pretokenized'] == (
      'The following are multiple choice questions about virology.\n\n'
      'Q2?\n(A) e\n(B) f\n(C) g\n(D) h\nAnswer: (A)\n\n'
      'Q3,\nwith a comma\n(A) i\n(B) j\n(C) k\n(D) l\nAnswer: (D)\n\n'
      'Q1?\n(A) a\n(B) b\n(C) c\n(D) d\nAnswer: (')
  assert test[0]['inputs_pretokenized'].count('Answer: (') == 4 and 'Q1?' in test[0]['inputs_pretokenized']
  assert dev[0]['choices_pretokenized'] == ['A', 'B', 'C', 'D']
  assert report.written['fewclue_ocnli/prompt0/dev.jsonl'] == 1
  assert sum(report.skipped.values()) == 1 and "'-'" in next(iter(report.skipped))
  lambada = [json.loads(line) for line in open(tmp_path / 'out/lambada/prompt0/passages.jsonl', encoding='utf-8')]
  for row, passage in zip(lambada, passages):
    assert row['targets_pretokenized'] == [passage.split(' ')[-1]]
    assert row['inputs_pretokenized'] + ' ' + row['targets_pretokenized'][0] == passage


def data_dir_path():
  from tests.tokenizer_fixtures import data_dir  # noqa: PLC0415
  return data_dir()


# ---------------------------------------------------------------------------------------------------------------------
# LAMBADA (eval/lambada.py) and lm-evaluation-harness (eval/lm_eval_adapter.py)


def _gutenberg_passages(n, start=10):
  book = (data_dir_path() / 'gutenberg_en' / '84-0.txt').read_text(encoding='utf-8-sig')
  passages = [' '.join(p.split()) for p in book.split('\n\n') if 30 < len(p.split()) < 80]
  return passages[start:start + n]


@pytest.fixture(scope='module')
def lambada_run(setup, tmp_path_factory):
  """eval/tasks/lambada/lambada.yaml (with 4 beams instead of 16, to keep the suite fast) on passages cut from a
  Gutenberg book, prepared by launch/prepare_eval_data.py's library."""
  from eval.prepare import prepare  # noqa: PLC0415
  _, gen, _ = setup
  tmp = tmp_path_factory.mktemp('lambada')
  passages = _gutenberg_passages(5)
  _write(tmp / 'src' / 'lambada' / 'test.jsonl', ''.join(json.dumps({'text': p}) + '\n' for p in passages))
  prepare(tmp / 'src', tmp / 'data')
  for name in ('lambada', 'lambada_unidirectional'):
    task = (REPO / 'eval' / 'tasks' / 'lambada' / f'{name}.yaml').read_text(encoding='utf-8')
    assert 'num-beams: 16\n' in task
    _write(tmp / 'tasks' / f'{name}.yaml', task.replace('num-beams: 16\n', 'num-beams: 4\n'))
  results = evaluate([tmp / 'tasks'], tmp / 'data', gen, tmp / 'results.json', progress=False, print_fn=lambda _: 0)
  return tmp, passages, results['tasks']['lambada']['groups']['lambada']['files'][0], \
      results['tasks']['lambada_unidirectional']['groups']['lambada_unidirectional']['files'][0]


def test_lambada_target_scores_equal_sats(setup, lambada_run):
  """The target word's log-probability after passage + [gMASK] + <sop> (unidirectional: after [gMASK, <sop>] +
  passage), and whether each of its tokens is the argmax, equal SAT's on the generation layouts built here; Accuracy
  is the share of exact first-word matches."""
  sat, gen, _ = setup
  _, passages, bidirectional, unidirectional = lambada_run
  tok, sid = gen.tokenizer, blanks.special_ids(gen.tokenizer)
  words = [p.rsplit(' ', 1)[1] for p in passages]
  for result, causal in ((bidirectional, False), (unidirectional, True)):
    assert result['examples'] == len(passages) == 5
    for passage, logp, greedy, pred in zip(passages, result['target_logprobs'], result['target_greedy'],
                                           result['predictions']):
      context, word = passage.rsplit(' ', 1)
      ctx, target = tok.encode(context), tok.encode(' ' + word)
      # §7.3's generation layouts, positions arange: [gMASK, <sop>] + context + target[:-1], causal; or
      # context + [gMASK, <sop>] + target[:-1] with context + [gMASK] bidirectional
      tokens = np.array([sid.gmask, sid.sop] + ctx + target[:-1] if causal else
                        ctx + [sid.gmask, sid.sop] + target[:-1], np.int32)
      positions = np.arange(len(tokens), dtype=np.int32)
      may = np.tril(np.ones((len(tokens), len(tokens)), bool))
      if not causal:
        may[:len(ctx) + 1, :len(ctx) + 1] = True
      start = len(ctx) + 1
      ref = _sat_logp(sat, tokens, positions, may)
      np.testing.assert_allclose(logp, sum(ref[start + j, t] for j, t in enumerate(target)), rtol=1e-4)
      assert greedy == all(int(np.argmax(ref[start + j])) == t for j, t in enumerate(target))
      assert pred == '' or (' ' not in pred and pred[0] not in ',.;:!?"\'')  # one word, no punctuation first
    assert result['metrics']['Accuracy'] == np.mean([p == w for p, w in zip(result['predictions'], words)])
    assert result['metrics']['Greedy accuracy'] == np.mean(result['target_greedy'])
  assert bidirectional['target_logprobs'] != unidirectional['target_logprobs']


def test_unidirectional_generation_equals_sats_steps(setup):
  """Decoder.generate(unidirectional=True), greedy, batched, equals greedy steps of SAT's full forward on
  [gMASK, <sop>] + text + generated so far, positions arange, causal (§7.3), while SAT's margin is clear."""
  sat, gen, _ = setup
  sid = blanks.special_ids(gen.tokenizer)
  rng = np.random.default_rng(3)
  texts = [rng.integers(20, gen.tokenizer.vocab_size - 20, n).tolist() for n in (7, 19)]
  from glm_jax.generation.decode import GREEDY  # noqa: PLC0415
  out = gen.decoder.generate(gen.weights, [[sid.gmask, sid.sop] + t for t in texts], [0, 0], True, max_gen_length=6,
                             strategy=GREEDY, unidirectional=True)
  for text, ours in zip(texts, out.tokens):
    seq = [sid.gmask, sid.sop] + text
    for tok in ours:
      n = len(seq)
      logp = _sat_logp(sat, np.array(seq, np.int32), np.arange(n, dtype=np.int32), np.tril(np.ones((n, n), bool)))
      top2 = np.sort(logp[-1])[-2:]
      assert tok == int(np.argmax(logp[-1])) or top2[1] - top2[0] < 1e-4
      seq.append(tok)
    assert len(ours) == 6


def test_lambada_punctuation_and_beam_choice_by_hand(setup):
  from eval.lambada import choose_beam, first_word, punctuation_bans  # noqa: PLC0415
  tok = setup[1].tokenizer
  invalid, prefixes = punctuation_bans(tok)
  for ch in ',.;!?':
    ids = tok.encode(ch)
    assert (len(ids) == 1 and ids[0] in invalid) or tuple(ids) in prefixes, ch
  for word in ('the', ' the', ' was', 'Frankenstein'):
    assert not set(tok.encode(word)) & set(invalid), word
  assert tok.encode('，') in [list(p) for p in prefixes] or set(tok.encode('，')) <= set(invalid)
  # G130: the first beam (best first) whose second space-separated field is punctuation ('' included), else the best
  assert choose_beam(['London was big', 'Paris , he said', 'Rome .']) == 'Paris , he said'
  assert choose_beam(['London was big', 'Paris']) == 'London was big'
  assert choose_beam(['a  b', 'c .']) == 'a  b'
  assert first_word('  Paris , he') == 'Paris' and first_word('') == ''


def test_split_request_english_and_chinese(tmp_path):
  """lm-eval's continuation keeps its leading space; the context's trailing space moves to it. With our tokenizers
  (spaces are pieces) an English word start encodes as inside the whole text; Chinese has no space to move. With the
  icetk layout every encoded text starts a word (GLM-130B's options are encoded that way)."""
  from eval.lm_eval_adapter import split_request  # noqa: PLC0415
  compact = GLMTokenizer.load(train_tiny_tokenizer(tmp_path / 'c', 'compact'))
  whole = compact.encode('The cat sat on the mat')
  ctx, cont = split_request(compact, 'The cat sat on the', ' mat')
  assert ctx + cont == whole and cont == compact.encode(' mat') != compact.encode('mat')
  assert split_request(compact, 'The cat sat on the ', 'mat') == (ctx, cont)
  ctx, cont = split_request(compact, '北京是中国的', '首都')
  assert ctx == compact.encode('北京是中国的') and cont == compact.encode('首都')
  assert ctx + cont == compact.encode('北京是中国的首都')
  icetk = GLMTokenizer.load(train_tiny_tokenizer(tmp_path / 'i', 'icetk'))
  for context, continuation, alone in (('The cat sat on the', ' mat', 'mat'), ('北京是中国的', '首都', '首都')):
    ctx, cont = split_request(icetk, context, continuation)
    assert ctx == icetk.encode(context) and cont == icetk.encode(alone)
    assert icetk.id_to_piece(cont[0]).startswith('▁')


LM_EVAL_TASKS = {
    'glmjax_mc': 'output_type: multiple_choice\ndoc_to_text: inputs_pretokenized\ndoc_to_choice: choices_pretokenized\n'
                 'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n',
    'glmjax_lambada': 'output_type: loglikelihood\ndoc_to_text: inputs_pretokenized\n'
                      'doc_to_target: "{{\' \' + targets_pretokenized[0]}}"\ntarget_delimiter: ""\n'
                      'metric_list:\n  - metric: acc\n',
    'glmjax_text': 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
                   'metric_list:\n  - metric: word_perplexity\n',
    'glmjax_gen': 'output_type: generate_until\ndoc_to_text: inputs_pretokenized\n'
                  'doc_to_target: "{{targets_pretokenized[0]}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
                  '  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n',
}


def _lm_eval_tasks(folder, files):
  for name, body in LM_EVAL_TASKS.items():
    _write(folder / f'{name}.yaml', f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
           f'    test: {files[name]}\ntest_split: test\n{body}')


@pytest.fixture(scope='module')
def lm_eval_offline(tmp_path_factory):
  """lm_eval, imported offline with a private HF cache (peers-on-cpu.md §2)."""
  import os  # noqa: PLC0415
  home = tmp_path_factory.mktemp('hf_home')
  for key, value in (('HF_DATASETS_OFFLINE', '1'), ('HF_HUB_OFFLINE', '1'), ('HF_HOME', str(home))):
    os.environ[key] = value
  import lm_eval  # noqa: PLC0415
  import lm_eval.tasks  # noqa: PLC0415
  return lm_eval


def test_lm_eval_equals_our_evaluator(setup, lambada_run, lm_eval_offline, tmp_path):
  """The same examples through our evaluator and through lm-eval 0.4.13 with GLMJaxLM give the same log-probabilities
  and greedy flags (multiple choice per option, the LAMBADA word), the same document log-likelihoods (rolling, §7.4
  windows) and the same greedy generations."""
  from eval.lm_eval_adapter import GLMJaxLM  # noqa: PLC0415
  _, gen, _ = setup
  lambada_dir, passages, lambada, _ = lambada_run
  data, tasks = _tasks(tmp_path)
  doc = data / 'text' / 'doc.txt'
  _write(data / 'text.jsonl', json.dumps({'text': doc.read_text(encoding='utf-8')}) + '\n')
  # ours, with lm-eval's windows (the model's whole length, generation_length = length - 2)
  _write(tasks / 'lm' / 'text.yaml', 'name: text\ntype: lm\npath: text\nfile_pattern: "*.txt"\n'
         'max_seq_length: 256\ngeneration_length: 254\nmetrics: [PPL]\n')
  ours = evaluate([tasks], data, gen, tmp_path / 'ours.json', progress=False, print_fn=lambda _: 0)['tasks']
  files = {'glmjax_mc': data / 'qa' / 'prompt1' / 'validation.jsonl',
           'glmjax_lambada': lambada_dir / 'data' / 'lambada' / 'prompt0' / 'test.jsonl',
           'glmjax_text': data / 'text.jsonl', 'glmjax_gen': data / 'gen' / 'p' / 'validation.jsonl'}
  _lm_eval_tasks(tmp_path / 'lm_eval_tasks', files)
  manager = lm_eval_offline.tasks.TaskManager(include_path=str(tmp_path / 'lm_eval_tasks'), include_defaults=False)

  def run(lm, names):
    res = lm_eval_offline.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=0,
                                          bootstrap_iters=0, log_samples=True)
    return {name: sorted(res['samples'][name], key=lambda x: x['doc_id']) for name in names}, res['results']

  samples, results = run(GLMJaxLM(generator=gen), ['glmjax_mc', 'glmjax_text', 'glmjax_gen'])
  mc = ours['qa']['groups']['dev']['files'][0]
  assert len(samples['glmjax_mc']) == len(mc['scores']) == 5
  for sample, scores, greedy in zip(samples['glmjax_mc'], mc['scores'], mc['greedy']):
    np.testing.assert_allclose([r[0][0] for r in sample['resps']], scores, rtol=1e-5)
    assert [r[0][1] for r in sample['resps']] == greedy
  text = ours['text']['groups']['text']['files'][0]
  np.testing.assert_allclose(samples['glmjax_text'][0]['resps'][0][0], -text['nats'], rtol=1e-5)
  gen_ours = ours['gen']['groups']['gen']['files'][0]['predictions']
  assert [s['resps'][0][0].strip() for s in samples['glmjax_gen']] == gen_ours

  samples, results = run(GLMJaxLM(generator=gen, use_gmask='true'), ['glmjax_lambada'])
  got = samples['glmjax_lambada']
  assert len(got) == len(passages)
  np.testing.assert_allclose([s['resps'][0][0][0] for s in got], lambada['target_logprobs'], rtol=1e-5)
  assert [s['resps'][0][0][1] for s in got] == lambada['target_greedy']
  assert results['glmjax_lambada']['acc,none'] == pytest.approx(lambada['metrics']['Greedy accuracy'])


def test_lm_eval_command_line(setup, lambada_run, tmp_path):
  """launch/run_lm_eval.py: lm-eval's command line with --model glm-jax implied, offline on a local task; a model
  that does not load is one line, exit 2."""
  lambada_dir, _, lambada, _ = lambada_run
  _lm_eval_tasks(tmp_path / 'tasks', {name: lambada_dir / 'data' / 'lambada' / 'prompt0' / 'test.jsonl'
                                      for name in LM_EVAL_TASKS})
  env = dict(subprocess_env(), HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
  run = subprocess.run([sys.executable, 'launch/run_lm_eval.py', '--model_args', f'checkpoint={setup[2]},use_gmask=1',
                        '--tasks', 'glmjax_lambada', '--include_path', tmp_path / 'tasks', '--output_path',
                        tmp_path / 'out'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  written = list((tmp_path / 'out').rglob('results*.json'))
  assert len(written) == 1
  acc = json.loads(written[0].read_text())['results']['glmjax_lambada']['acc,none']
  assert acc == pytest.approx(lambada['metrics']['Greedy accuracy'])
  run = subprocess.run([sys.executable, 'launch/run_lm_eval.py', '--model_args', f'checkpoint={tmp_path / "none"}',
                        '--tasks', 'glmjax_lambada', '--include_path', tmp_path / 'tasks'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith('run_lm_eval.py: error: '), run.stderr
