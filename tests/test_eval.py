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
  sid = blanks.special_ids(gen.tokenizer)
  del sid
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
  tasks = {config.name: groups for config, groups in plan([REPO / 'eval' / 'tasks'], tmp_path)}
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
