"""GLM-130B's YAML task files (glm130b.md §7.1), loaded with yaml.safe_load and validated: kebab-case and snake_case
keys are both accepted; a missing or unknown field, a bad value or an unknown metric is a ValueError naming the file
and the field (the original silently scored an unknown metric as true)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

TYPES = ('mul', 'gen', 'lm')
DEFAULT_METRICS = {'mul': ('Accuracy',), 'gen': ('EM', 'F1'), 'lm': ('PPL',)}
KNOWN_METRICS = ('Accuracy', 'EM', 'F1', 'PPL', 'BPB')
STRATEGIES = ('BaseStrategy', 'BeamSearchStrategy')


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str
  type: str
  path: str                                  # relative to the data folder (--data)
  source: str = ''                           # the YAML file it came from
  module: str | None = None                  # a custom task: 'package.module.ClassName' (eval/tasks/ has examples)
  metrics: tuple[str, ...] = ()
  use_task_mask: bool = False                # [gMASK] instead of [MASK]
  use_multitask_encoding: bool = False       # mul: options at consecutive positions
  unidirectional: bool = False               # gen / lm; needs use_task_mask
  max_seq_length: int = 2048
  file_pattern: Any = '**/*.json*'           # a glob, or {group: glob}: each file is one prompt variant
  micro_batch_size: int = 1
  length_normalization: bool = False         # mul: divide each option's log-prob by its token count
  # gen
  sampling_strategy: str = 'BaseStrategy'
  num_beams: int = 4
  length_penalty: float = 1.0
  no_repeat_ngram_size: int = 3
  min_gen_length: int = 0
  max_gen_length: int = 128
  # lm
  generation_length: int = 256
  # custom task modules' own settings (e.g. MMLU's shots)
  options: dict = dataclasses.field(default_factory=dict)


_FIELDS = {f.name: f for f in dataclasses.fields(TaskConfig) if f.name != 'source'}
_INTS = ('max_seq_length', 'micro_batch_size', 'num_beams', 'no_repeat_ngram_size', 'min_gen_length',
         'max_gen_length', 'generation_length')
_BOOLS = ('use_task_mask', 'use_multitask_encoding', 'unidirectional', 'length_normalization')


def load_task(path: str | Path) -> TaskConfig:
  """A task YAML file -> TaskConfig (ValueError '<file>: <field>: <what is wrong>')."""
  path = Path(path)
  try:
    raw = yaml.safe_load(path.read_text(encoding='utf-8'))
  except OSError as e:
    raise ValueError(f'{path}: cannot read ({e.strerror or e})') from None
  except yaml.YAMLError as e:
    mark = getattr(e, 'problem_mark', None)
    where = f' line {mark.line + 1}:' if mark is not None else ''
    raise ValueError(f'{path}:{where} not valid YAML ({getattr(e, "problem", None) or e})') from None
  if not isinstance(raw, dict):
    raise ValueError(f'{path}: a task file holds a mapping of fields, not {type(raw).__name__}')

  written = {}  # field -> the key as the file wrote it, for messages

  def bad(field, what):
    return ValueError(f'{path}: {written.get(field, field)}: {what}')

  values = {}
  for key, value in raw.items():
    name = str(key).replace('-', '_')
    if name not in _FIELDS:
      raise bad(key, f'unknown field (known: {", ".join(sorted(_FIELDS))})')
    if name in values:
      raise ValueError(f'{path}: {key}: given twice (kebab-case and snake_case name the same field)')
    values[name] = value
    written[name] = str(key)
  for required in ('name', 'type', 'path'):
    if not values.get(required):
      raise bad(required, 'required')
    if not isinstance(values[required], str):
      raise bad(required, f'must be a string, not {values[required]!r}')
  if values['type'] not in TYPES:
    raise bad('type', f'{values["type"]!r} is not one of {", ".join(TYPES)} (type other needs a module)')
  for name in _INTS:
    if name in values and (not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 0):
      raise bad(name, f'must be a non-negative integer, not {values[name]!r}')
  for name in _BOOLS:
    if name in values and not isinstance(values[name], bool):
      raise bad(name, f'must be true or false, not {values[name]!r}')
  if values.get('max_seq_length', 2048) < 8:
    raise bad('max_seq_length', 'must be at least 8')
  if 'length_penalty' in values and not isinstance(values['length_penalty'], (int, float)):
    raise bad('length_penalty', f'must be a number, not {values["length_penalty"]!r}')
  if values.get('sampling_strategy', 'BaseStrategy') not in STRATEGIES:
    raise bad('sampling_strategy', f'{values["sampling_strategy"]!r} is not one of {", ".join(STRATEGIES)}')
  metrics = values.get('metrics', DEFAULT_METRICS[values['type']])
  if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
    raise bad('metrics', f'must be a list of metric names, not {metrics!r}')
  for m in metrics:
    if m not in KNOWN_METRICS:
      raise bad('metrics', f'unknown metric {m!r} (known: {", ".join(KNOWN_METRICS)})')
  values['metrics'] = tuple(metrics)
  pattern = values.get('file_pattern', '**/*.json*')
  if not (isinstance(pattern, str) or (isinstance(pattern, dict) and pattern
                                       and all(isinstance(v, str) for v in pattern.values()))):
    raise bad('file_pattern', f'must be a glob or a mapping of group names to globs, not {pattern!r}')
  if values.get('unidirectional') and not values.get('use_task_mask'):
    raise bad('unidirectional', 'needs use_task_mask: true (left-to-right scoring uses [gMASK])')
  if 'options' in values and not isinstance(values['options'], dict):
    raise bad('options', f'must be a mapping, not {values["options"]!r}')
  if values.get('module') is not None and not isinstance(values['module'], str):
    raise bad('module', f'must be a dotted class path, not {values["module"]!r}')
  return TaskConfig(source=str(path), **values)


def find_task_files(paths) -> list[Path]:
  """YAML task files from files and folders (searched recursively), sorted per folder; ValueError naming a path
  that is neither."""
  found = []
  for p in map(Path, paths):
    if p.is_dir():
      found += sorted(q for q in p.rglob('*') if q.suffix in ('.yaml', '.yml') and q.is_file())
    elif p.is_file():
      found.append(p)
    else:
      raise ValueError(f'{p}: no such task file or folder')
  if not found:
    raise ValueError(f'no task files (.yaml) in {", ".join(map(str, paths))}')
  return found
