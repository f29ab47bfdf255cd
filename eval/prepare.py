"""Raw benchmark files -> the task data layout (eval/data.py): `<out>/<task>/<prompt>/<split>.jsonl` (and .txt for
language modelling). launch/prepare_eval_data.py is the command line.

Datasets are recognised by their folder's name and checked by content (not by file name), as laid out in
shared/data; other splits in the same layouts (test files under other names) convert the same way, named after the
source file (`dev_few_all.json` -> dev, `val.zh.jsonl` -> val, a folder `mmlu/test/` -> test):
- `mmlu/<split>/*.csv` (with or without the header row question,choice0..3,answer; answers as letters A-D or indices
  0-3) -> `mmlu/<category>/<subject>/<split>.jsonl`, 5-shot prompts in the published "Answer: (" form with shots from
  the dev split (scoring dev itself, an example's shots are the other dev examples of its subject, never itself);
- `fewclue/<task>/*.json` (JSON Lines; label tables beside them are recognised by content and used) -> our own
  prompts (GLM-130B's are in its separate data download; each is documented in eval/tasks/fewclue_*.yaml);
- `xcopa_zh/*.jsonl`, `cmrc2018/*.json` (gen), `wikitext2/*.txt` (lm), `lambada/*.jsonl` (`{"text": passage}`: the
  target is the last word; gen).
Every example becomes a task example; a source example that cannot (a label outside the task's classes) is counted
and reported by reason, never dropped silently.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import re
from pathlib import Path

# MMLU's subjects by category (hendrycks/test categories.py: subcategory -> category).
MMLU_CATEGORIES = {
    'stem': ('abstract_algebra astronomy college_biology college_chemistry college_computer_science '
             'college_mathematics college_physics computer_security conceptual_physics electrical_engineering '
             'elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science '
             'high_school_mathematics high_school_physics high_school_statistics machine_learning'),
    'humanities': ('formal_logic high_school_european_history high_school_us_history high_school_world_history '
                   'international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy '
                   'prehistory professional_law world_religions'),
    'social_sciences': ('econometrics high_school_geography high_school_government_and_politics '
                        'high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality '
                        'professional_psychology public_relations security_studies sociology us_foreign_policy'),
    'other': ('anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management '
              'marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine '
              'virology'),
}
SUBJECT_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects.split()}
LETTERS = 'ABCD'


class Report:
  """Counts per output file, and every skipped source example with its reason."""

  def __init__(self):
    self.written: dict[str, int] = {}
    self.skipped: collections.Counter = collections.Counter()
    self.ignored: list[str] = []

  def lines(self):
    out = [f'{n:6d}  {name}' for name, n in sorted(self.written.items())]
    out += [f'skipped {n} example(s): {why}' for why, n in sorted(self.skipped.items())]
    out += [f'not a dataset file: {why}' for why in self.ignored]
    return out


def split_name(path: Path) -> str:
  name = path.name.split('.')[0]
  return re.sub(r'_few_all$', '', re.sub(r'^cmrc2018_', '', name))


def _write(out: Path, rel: str, rows: list, report: Report) -> None:
  path = out / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  report.written[rel] = len(rows)


def _jsonl(path: Path) -> list[dict] | None:
  """The objects of a JSON Lines file, or None if it is not one."""
  rows = []
  try:
    for line in path.read_text(encoding='utf-8-sig').split('\n'):  # not splitlines: U+2028 etc. sit inside strings
      if line.strip():
        item = json.loads(line)
        if not isinstance(item, dict):
          return None
        rows.append(item)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return rows


# ---------------------------------------------------------------------------------------------------------------------
# MMLU


def _mmlu_rows(path: Path) -> list[tuple[str, list[str], int]]:
  rows = list(csv.reader(io.StringIO(path.read_text(encoding='utf-8-sig'), newline='')))
  if rows and [c.strip().lower() for c in rows[0][:2]] == ['question', 'choice0']:
    rows = rows[1:]
  out = []
  for n, row in enumerate(rows, 1):
    if len(row) != 6:
      raise ValueError(f'{path} row {n}: expected question, 4 choices and an answer, got {len(row)} fields')
    answer = row[5].strip()
    label = LETTERS.index(answer) if answer in LETTERS else int(answer) if answer in '0123' and answer else None
    if label is None:
      raise ValueError(f'{path} row {n}: answer {answer!r} is neither A-D nor 0-3')
    out.append((row[0], row[1:5], label))
  return out


def _mmlu_block(question, choices, answer=None) -> str:
  text = question + '\n' + ''.join(f'({LETTERS[i]}) {c}\n' for i, c in enumerate(choices)) + 'Answer: ('
  return text + (f'{LETTERS[answer]})\n\n' if answer is not None else '')


def prepare_mmlu(folder: Path, out: Path, report: Report) -> None:
  splits = {p.name: p for p in folder.iterdir() if p.is_dir()}
  if 'dev' not in splits:
    raise ValueError(f'{folder}: MMLU needs its dev split (the 5-shot examples) in {folder}/dev')
  dev = {p.name[:-len('_dev.csv')] if p.name.endswith('_dev.csv') else p.stem: _mmlu_rows(p)
         for p in sorted(splits['dev'].glob('*.csv'))}
  for split, path in sorted(splits.items()):
    for csv_path in sorted(path.glob('*.csv')):
      subject = re.sub(rf'_{split}$', '', csv_path.stem)
      if subject not in SUBJECT_CATEGORY:
        report.ignored.append(f'{csv_path} (not one of the 57 MMLU subjects)')
        continue
      shots_pool = dev.get(subject, [])
      header = f'The following are multiple choice questions about {subject.replace("_", " ")}.\n\n'
      rows = []
      for i, (question, choices, label) in enumerate(_mmlu_rows(csv_path)):
        shots = [s for j, s in enumerate(shots_pool) if not (split == 'dev' and j == i)][:5]
        prompt = header + ''.join(_mmlu_block(q, c, a) for q, c, a in shots) + _mmlu_block(question, choices)
        rows.append({'inputs_pretokenized': prompt, 'choices_pretokenized': list(LETTERS), 'label': label})
      _write(out, f'mmlu/{SUBJECT_CATEGORY[subject]}/{subject}/{split}.jsonl', rows, report)


# ---------------------------------------------------------------------------------------------------------------------
# FewCLUE: our prompts (documented in eval/tasks/fewclue_*.yaml)

YES_NO = ['不是', '是']


def _fewclue_example(task: str, item: dict, labels: dict):
  """(inputs, choices, label) of one FewCLUE example, or a reason string when it has no usable label."""
  if task == 'eprstmt':
    classes = {'Negative': 0, 'Positive': 1}
    return (f'{item["sentence"]}\n问：这条评论是正面的还是负面的？\n答：', ['负面', '正面'],
            classes.get(item['label'], f'eprstmt label {item["label"]!r}'))
  if task == 'bustm':
    return (f'句子一：{item["sentence1"]}\n句子二：{item["sentence2"]}\n问：这两句话的意思相同吗？\n答：', ['不同', '相同'],
            int(item['label']) if str(item['label']) in ('0', '1') else f'bustm label {item["label"]!r}')
  if task == 'ocnli':
    classes = {'entailment': 0, 'contradiction': 1, 'neutral': 2}
    return (f'{item["sentence1"]}\n问：根据上文，“{item["sentence2"]}”是对的、错的，还是可能对？\n答：', ['对', '错', '可能对'],
            classes.get(item['label'], f'ocnli label {item["label"]!r} (no majority among the annotators)'))
  if task == 'csl':
    return (f'摘要：{item["abst"]}\n关键词：{"，".join(item["keyword"])}\n问：这些关键词都是这篇摘要的关键词吗？\n答：',
            YES_NO, int(item['label']) if str(item['label']) in ('0', '1') else f'csl label {item["label"]!r}')
  if task == 'cluewsc':
    t = item['target']
    label = {'true': 1, 'false': 0}.get(str(item['label']).lower(), f'cluewsc label {item["label"]!r}')
    return f'{item["text"]}\n问：这里的“{t["span2_text"]}”指的是“{t["span1_text"]}”吗？\n答：', YES_NO, label
  if task == 'chid':
    text = item['content'].replace('#idiom#', '[MASK]', 1).replace('#idiom#', '____')
    return text, list(item['candidates']), int(item['answer'])
  if task in ('tnews', 'iflytek', 'csldcp'):
    names = labels[task]
    key = {'tnews': 'label', 'iflytek': 'label', 'csldcp': 'label'}[task]
    value = str(item[key])
    text = item.get('sentence') or item.get('content')
    question = {'tnews': '这条新闻属于哪一类？', 'iflytek': '这个应用属于哪一类？', 'csldcp': '这篇论文摘要属于哪个学科？'}[task]
    if value not in names:
      return f'{task} label {value!r} not in its label table'
    return f'{text}\n问：{question}\n答：', [n for n, _ in names.values()], names[value][1]
  raise KeyError(task)


_FEWCLUE_FIELDS = {'eprstmt': 'sentence', 'bustm': 'sentence1', 'ocnli': 'sentence1', 'csl': 'abst',
                   'cluewsc': 'target', 'chid': 'candidates', 'tnews': 'sentence', 'iflytek': 'sentence',
                   'csldcp': 'content'}


def _label_table(task: str, folder: Path, data_files: list[tuple[Path, list[dict]]]) -> dict:
  """{label value: (class name, index)} of the classification tasks: tnews from label_index2en2zh.json, csldcp from
  labels_all.txt (names are the labels), iflytek from the label / label_des pairs in its own files."""
  if task == 'tnews':
    table = None
    for p in sorted(folder.iterdir()):
      rows = _jsonl(p) if p.is_file() else None
      if rows and all({'label', 'label_zh'} <= set(r) and 'sentence' not in r for r in rows):
        table = rows
    if table is None:
      raise ValueError(f'{folder}: no label table (JSON Lines of label, label_desc, label_zh) beside the tnews data')
    return {str(r['label']): (r['label_zh'], i) for i, r in enumerate(table)}
  if task == 'csldcp':
    tables = [p for p in sorted(folder.glob('*.txt'))]
    if not tables:
      raise ValueError(f'{folder}: no label list (a .txt file of discipline names) beside the csldcp data')
    names = [line.strip() for line in tables[0].read_text(encoding='utf-8').splitlines() if line.strip()]
    return {n: (n, i) for i, n in enumerate(names)}
  pairs = sorted({(int(r['label']), r['label_des']) for _, rows in data_files for r in rows})
  return {str(label): (name, i) for i, (label, name) in enumerate(pairs)}


def prepare_fewclue(folder: Path, out: Path, report: Report) -> None:
  for task_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
    task = task_dir.name
    if task not in _FEWCLUE_FIELDS:
      report.ignored.append(f'{task_dir} (not a FewCLUE task this converter knows)')
      continue
    data_files = []
    for p in sorted(task_dir.iterdir()):
      rows = _jsonl(p) if p.is_file() and p.suffix in ('.json', '.jsonl') else None
      if rows and all(_FEWCLUE_FIELDS[task] in r for r in rows):
        data_files.append((p, rows))
      elif p.is_file() and not (task == 'csldcp' and p.suffix == '.txt'):
        if not (rows and task == 'tnews'):  # the tnews label table is used, not converted
          report.ignored.append(f'{p} (no {task} examples in it: a label table or statistics)')
    labels = {task: _label_table(task, task_dir, data_files)} if task in ('tnews', 'iflytek', 'csldcp') else {}
    for p, rows in data_files:
      examples = []
      for item in rows:
        inputs, choices, label = _fewclue_example(task, item, labels)
        if isinstance(label, str):
          report.skipped[f'{p}: {label}'] += 1
          continue
        examples.append({'inputs_pretokenized': inputs, 'choices_pretokenized': choices, 'label': label})
      _write(out, f'fewclue_{task}/prompt0/{split_name(p)}.jsonl', examples, report)


# ---------------------------------------------------------------------------------------------------------------------
# XCOPA (Chinese), CMRC 2018, WikiText-2, LAMBADA


def prepare_xcopa(folder: Path, out: Path, report: Report) -> None:
  questions = {'cause': '问：这是什么原因造成的？\n答：', 'effect': '问：这导致了什么结果？\n答：'}
  for p in sorted(folder.glob('*.jsonl')):
    rows = _jsonl(p)
    if not rows or not all({'premise', 'choice1', 'choice2', 'question', 'label'} <= set(r) for r in rows):
      report.ignored.append(f'{p} (not XCOPA examples)')
      continue
    examples = [{'inputs_pretokenized': f'{r["premise"]}\n{questions[r["question"]]}',
                 'choices_pretokenized': [r['choice1'], r['choice2']], 'label': int(r['label'])} for r in rows]
    _write(out, f'xcopa_zh/prompt0/{split_name(p)}.jsonl', examples, report)


def prepare_cmrc2018(folder: Path, out: Path, report: Report) -> None:
  for p in sorted(folder.glob('*.json')):
    try:
      contexts = json.loads(p.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
      report.ignored.append(f'{p} (not JSON)')
      continue
    if not isinstance(contexts, list) or not all('context_text' in c and 'qas' in c for c in contexts):
      report.ignored.append(f'{p} (not CMRC 2018 contexts)')
      continue
    examples = []
    for c in contexts:
      for qa in c['qas']:
        answers = [a for a in qa['answers'] if a.strip()]
        if not answers:
          report.skipped[f'{p}: a question without answers'] += 1
          continue
        examples.append({'inputs_pretokenized': f'阅读文章：{c["context_text"]}\n问：{qa["query_text"]}\n答：',
                         'targets_pretokenized': answers})
    _write(out, f'cmrc2018/prompt0/{split_name(p)}.jsonl', examples, report)


def prepare_wikitext2(folder: Path, out: Path, report: Report) -> None:
  for p in sorted(folder.glob('*.txt')):
    text = p.read_text(encoding='utf-8')
    rel = f'wikitext2/{split_name(p)}.txt'
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_text(text, encoding='utf-8')
    report.written[rel] = 1


def prepare_lambada(folder: Path, out: Path, report: Report) -> None:
  for p in sorted(folder.glob('*.jsonl')):
    rows = _jsonl(p)
    if not rows or not all(isinstance(r.get('text'), str) for r in rows):
      report.ignored.append(f'{p} (not {{"text": passage}} lines)')
      continue
    examples = []
    for r in rows:
      words = r['text'].rstrip().split(' ')
      if len(words) < 2:
        report.skipped[f'{p}: a passage of one word'] += 1
        continue
      examples.append({'inputs_pretokenized': ' '.join(words[:-1]), 'targets_pretokenized': [words[-1]]})
    _write(out, f'lambada/prompt0/{split_name(p)}.jsonl', examples, report)


CONVERTERS = {'mmlu': prepare_mmlu, 'fewclue': prepare_fewclue, 'xcopa_zh': prepare_xcopa,
              'cmrc2018': prepare_cmrc2018, 'wikitext2': prepare_wikitext2, 'lambada': prepare_lambada}


def prepare(source: str | Path, out: str | Path) -> Report:
  """Converts every dataset folder under `source` (see module docstring) into `out`."""
  source, out = Path(source), Path(out)
  if not source.is_dir():
    raise ValueError(f'--source {source}: no such folder')
  report = Report()
  found = False
  for folder in sorted(p for p in source.iterdir() if p.is_dir()):
    converter = CONVERTERS.get(folder.name)
    if converter is None:
      report.ignored.append(f'{folder} (no converter for this folder name; known: {", ".join(CONVERTERS)})')
      continue
    found = True
    converter(folder, out, report)
  if not found:
    raise ValueError(f'--source {source}: none of the dataset folders {", ".join(CONVERTERS)}')
  return report
