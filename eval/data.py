"""A task's data (glm130b.md §7.1): a folder per task, one file per prompt variant, grouped by `file_pattern`.

Multiple-choice and generation files are JSON Lines: `inputs_pretokenized` (str), and `choices_pretokenized` (list of
str) with `label` (int) for mul, or `targets_pretokenized` (list of str) for gen. Language-modelling files are plain
text (.txt, one document) or JSON Lines with `text` (one document a line). A bad line is a ValueError naming the file
and the line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from eval.config import TaskConfig


@dataclasses.dataclass(frozen=True)
class Example:
  inputs: str
  choices: tuple[str, ...] = ()
  label: int | None = None
  targets: tuple[str, ...] = ()
  where: str = ''  # 'file:line', for messages


def task_files(data_dir: str | Path, config: TaskConfig) -> dict[str, list[Path]]:
  """{group: files} of a task (one group, named after the task, for a plain glob); ValueError when the folder is
  missing or a group has no file."""
  root = Path(data_dir) / config.path
  if not root.is_dir():
    raise ValueError(f'{config.source}: path: the data folder {root} does not exist (--data {data_dir})')
  patterns = config.file_pattern if isinstance(config.file_pattern, dict) else {config.name: config.file_pattern}
  groups = {}
  for group, pattern in patterns.items():
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
      raise ValueError(f'{config.source}: file_pattern: {pattern!r} matches no file under {root}')
    groups[group] = files
  return groups


def read_examples(path: Path, task_type: str) -> list[Example]:
  """The examples of one mul / gen file (ValueError '<file> line <n>: ...')."""
  out = []
  try:
    lines = path.read_text(encoding='utf-8').split('\n')  # not splitlines: U+2028 etc. may sit inside strings
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: cannot read ({e})') from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f'{path} line {n}'
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not JSON ({e.msg})') from None
    if not isinstance(item, dict) or not isinstance(item.get('inputs_pretokenized'), str):
      raise ValueError(f'{where}: needs "inputs_pretokenized", a string')
    if task_type == 'mul':
      choices, label = item.get('choices_pretokenized'), item.get('label')
      if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f'{where}: needs "choices_pretokenized", a non-empty list of strings')
      if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ValueError(f'{where}: "label" must be an index into its {len(choices)} choices, not {label!r}')
      out.append(Example(item['inputs_pretokenized'], tuple(choices), label, where=where))
    else:
      targets = item.get('targets_pretokenized')
      if isinstance(targets, str):
        targets = [targets]
      if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f'{where}: needs "targets_pretokenized", a non-empty list of strings')
      out.append(Example(item['inputs_pretokenized'], targets=tuple(targets), where=where))
  if not out:
    raise ValueError(f'{path}: no examples')
  return out


def read_documents(path: Path) -> list[str]:
  """The documents of one language-modelling file: a .txt file is one document; JSON Lines give one per line."""
  try:
    text = path.read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: cannot read ({e})') from None
  if path.suffix == '.txt':
    return [text] if text.strip() else []
  docs = []
  for n, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {n}: not JSON ({e.msg})') from None
    if not isinstance(item, dict) or not isinstance(item.get('text'), str):
      raise ValueError(f'{path} line {n}: needs "text", a string')
    docs.append(item['text'])
  return docs
