"""Multi-task instruction pre-training (MIP) data: records `{"inputs_pretokenized", "targets_pretokenized"}`.

`build_instruction_set(data_root)` turns the train/dev splits in shared/data into such records with prompts of our
own (GLM-130B used T0/PromptSource and DeepStruct, §3.4; those are not available here):

- FewCLUE (Chinese; the `train_few_all.json` split by default, so that the dev split stays clean for evaluation):
  eprstmt (sentiment), bustm (paraphrase), ocnli (NLI), csl (keyword match), tnews (news topic), iflytek (app
  category), csldcp (discipline), cluewsc (coreference), chid (idiom cloze).
- XCOPA-zh (`val.zh.jsonl`, the only split here): cause/effect choice, target = the chosen sentence.
- MMLU dev (English, 57 subjects x 5): question, choices (A)-(D), target = "(letter) choice text".

Every record also has a "task" field (e.g. "fewclue/eprstmt", "xcopa_zh", "mmlu/anatomy"); readers ignore it.
NB XCOPA val and MMLU dev are the only splits of those sets in shared/data: a model trained on this instruction set
has seen them, so evaluate on them only with that in mind.

How a record becomes a training sample (a [MASK] blank at the end of the input) is in `objective.py`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable

__all__ = [
    'build_instruction_set',
    'write_jsonl',
    'read_instructions',
    'INSTRUCTION_SOURCES',
]

INPUTS = 'inputs_pretokenized'
TARGETS = 'targets_pretokenized'

_SENTIMENT = {'Positive': '正面', 'Negative': '负面'}
_SAME = {'1': '相同', '0': '不同'}
_NLI = {'entailment': '正确', 'contradiction': '错误', 'neutral': '无法确定'}
_YES_NO = {'1': '是', '0': '不是', 'true': '是', 'false': '不是'}
_LETTERS = 'ABCD'


def _fewclue_eprstmt(r):
  if r.get('label') in _SENTIMENT:
    return f'评论：{r["sentence"]}\n这条评论表达的情感是正面还是负面？', _SENTIMENT[r['label']]


def _fewclue_bustm(r):
  if str(r.get('label')) in _SAME:
    return (f'句子一：{r["sentence1"]}\n句子二：{r["sentence2"]}\n这两句话的意思相同还是不同？',
            _SAME[str(r['label'])])


def _fewclue_ocnli(r):
  if r.get('label') in _NLI:
    return (f'已知：{r["sentence1"]}\n那么“{r["sentence2"]}”这句话是正确、错误，还是无法确定？',
            _NLI[r['label']])


def _fewclue_csl(r):
  if str(r.get('label')) in _YES_NO and r.get('keyword'):
    return (f'论文摘要：{r["abst"]}\n关键词：{"、".join(r["keyword"])}\n这些关键词都是这篇摘要的关键词吗？',
            _YES_NO[str(r['label'])])


def _fewclue_cluewsc(r):
  t = r.get('target') or {}
  if str(r.get('label')) in _YES_NO and t.get('span1_text') and t.get('span2_text'):
    return (f'{r["text"]}\n这段话里的“{t["span2_text"]}”指的是“{t["span1_text"]}”吗？',
            _YES_NO[str(r['label'])])


def _fewclue_chid(r):
  cands = r.get('candidates') or []
  answer = r.get('answer')
  if isinstance(answer, int) and 0 <= answer < len(cands) and r.get('content', '').count('#idiom#') == 1:
    content = r['content'].replace('#idiom#', '____')
    return f'{content}\n候选成语：{"、".join(cands)}\n横线处应该填哪个成语？', cands[answer]


def _classify(prompt, text_key, label_fn):
  def make(r):
    label = label_fn(r)
    if label and r.get(text_key):
      return prompt.format(text=r[text_key]), label
  return make


_FEWCLUE = {
    'eprstmt': _fewclue_eprstmt,
    'bustm': _fewclue_bustm,
    'ocnli': _fewclue_ocnli,
    'csl': _fewclue_csl,
    'tnews': None,  # needs the label table, built in build_instruction_set
    'iflytek': _classify('应用介绍：{text}\n这款应用属于哪一类？', 'sentence', lambda r: r.get('label_des')),
    'csldcp': _classify('论文摘要：{text}\n这篇论文属于哪个学科？', 'content', lambda r: r.get('label')),
    'cluewsc': _fewclue_cluewsc,
    'chid': _fewclue_chid,
}

INSTRUCTION_SOURCES = tuple(f'fewclue/{t}' for t in _FEWCLUE) + ('xcopa_zh', 'mmlu')


def _read_jsonl(path: Path) -> list[dict]:
  out = []
  with open(path, encoding='utf-8-sig') as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
  return out


def _tnews_maker(folder: Path):
  names = {}
  table = folder / 'label_index2en2zh.json'
  if table.is_file():
    for r in _read_jsonl(table):
      names[str(r['label'])] = r['label_zh']

  def make(r):
    label = names.get(str(r.get('label')))
    if label and r.get('sentence'):
      return f'新闻标题：{r["sentence"]}\n这条新闻属于哪个栏目？', label
  return make


def _xcopa(r):
  if r.get('label') in (0, 1) and r.get('question') in ('cause', 'effect'):
    ask = '原因' if r['question'] == 'cause' else '结果'
    choices = (r['choice1'], r['choice2'])
    return (f'{r["premise"]}\n下面哪一项更可能是它的{ask}？\n选项一：{choices[0]}\n选项二：{choices[1]}',
            choices[r['label']])


def _mmlu(path: Path) -> list[tuple[str, str]]:
  subject = path.name.removesuffix('_dev.csv').replace('_', ' ')
  with open(path, encoding='utf-8-sig', newline='') as f:
    rows = list(csv.DictReader(f))
  out = []
  for r in rows:
    try:
      choices = [r[f'choice{i}'] for i in range(4)]
      answer = int(r['answer'])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f'{path}: expected columns question,choice0..choice3,answer (0-3)') from None
    lines = [f'The following is a multiple choice question about {subject}.', '', r['question'].strip()]
    lines += [f'({_LETTERS[i]}) {c}' for i, c in enumerate(choices)]
    lines.append('Answer:')
    out.append(('\n'.join(lines), f'({_LETTERS[answer]}) {choices[answer]}'))
  return out


def build_instruction_set(data_root: str | os.PathLike, *, fewclue_splits: Iterable[str] = ('train',)) -> list[dict]:
  """Instruction records from the FewCLUE / XCOPA-zh / MMLU-dev folders of `data_root` (module docstring).

  `fewclue_splits`: 'train' and/or 'dev'. A missing source folder is skipped; ValueError if `data_root` is missing
  or no record could be built.
  """
  root = Path(data_root)
  if not root.is_dir():
    raise ValueError(f'instruction data folder not found: {root}')
  records: list[dict] = []

  def add(task, pair):
    if pair is not None:
      inputs, target = pair
      records.append({'task': task, INPUTS: inputs, TARGETS: target})

  for task, maker in _FEWCLUE.items():
    folder = root / 'fewclue' / task
    if not folder.is_dir():
      continue
    if maker is None:
      maker = _tnews_maker(folder)
    for split in fewclue_splits:
      path = folder / f'{split}_few_all.json'
      if path.is_file():
        for r in _read_jsonl(path):
          add(f'fewclue/{task}', maker(r))
  xcopa = root / 'xcopa_zh' / 'val.zh.jsonl'
  if xcopa.is_file():
    for r in _read_jsonl(xcopa):
      add('xcopa_zh', _xcopa(r))
  for path in sorted((root / 'mmlu' / 'dev').glob('*_dev.csv')):
    for pair in _mmlu(path):
      add(f'mmlu/{path.name.removesuffix("_dev.csv")}', pair)
  if not records:
    raise ValueError(f'no FewCLUE, XCOPA-zh or MMLU data found under {root}')
  return records


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
  """Write records as UTF-8 JSON Lines (non-ASCII kept readable)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8', newline='\n') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  return path


def read_instructions(path: str | os.PathLike) -> list[dict]:
  """Records of a MIP jsonl file (or of every .jsonl under a folder, sorted).

  Each line must be a JSON object with string "inputs_pretokenized" and "targets_pretokenized" fields; other fields
  are kept. ValueError names the file and line otherwise.
  """
  path = Path(path)
  if path.is_dir():
    files = sorted(path.rglob('*.jsonl'))
    if not files:
      raise ValueError(f'no .jsonl files under {path}')
  elif path.is_file():
    files = [path]
  else:
    raise ValueError(f'instruction data not found: {path}')
  records = []
  for f in files:
    for lineno, r in enumerate(_read_jsonl(f), start=1):
      if not (isinstance(r, dict) and isinstance(r.get(INPUTS), str) and isinstance(r.get(TARGETS), str)):
        raise ValueError(f'{f}: record {lineno}: expected string "{INPUTS}" and "{TARGETS}" fields')
      records.append(r)
  if not records:
    raise ValueError(f'no instruction records in {path}')
  return records
