"""Runs YAML tasks (eval/config.py) on a model and writes their results (launch/evaluate.py is the command line).

Per task: its files grouped by `file_pattern` (eval/data.py); every file (prompt variant) scored and its metrics
computed, then aggregated per group (eval/metrics.py: best prompt, median, size-weighted average). The results file
(JSON) is rewritten, atomically, as soon as a task finishes, so a crash or Ctrl-C loses nothing finished, and a rerun
with the same --out skips the tasks it already holds (their config unchanged). Every task file is validated, and its
data found, before the first one runs.

Task types (glm130b.md §7):
- mul: one sequence per example (`layouts.multiple_choice_layout`), scored in batches (eval/scoring.py); an option's
  score is the sum of its tokens' log-probabilities (divided by its token count with `length_normalization`); the
  prediction is the best option; per option also whether each of its tokens is the argmax ('greedy'). Each choice
  is encoded on its own (with the icetk layout, which adds a word-start marker to every encoded text, included).
- lm: perplexity windows (§7.4) of each document; word-level PPL and bits per byte.
- gen: GLM-130B's generation layout (text + [MASK or gMASK] + <sop>, bidirectional context) decoded by the
  Generator's decoder, greedy for BaseStrategy (evaluation is deterministic), beam search with the task's settings;
  EM and F1 against the targets. With `unidirectional`: [gMASK, <sop>] + text, fully causal (§7.3).
- module: a custom class, `package.module.ClassName`, built as cls(config, data_dir) and called
  `.evaluate(generator, scorer, progress) -> {group: {'files': [...], 'aggregate': {...}}}` (eval/lambada.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval import metrics as metrics_lib
from eval.config import TaskConfig, find_task_files, load_task
from eval.data import read_documents, read_examples, task_files
from eval.scoring import Scorer, choice_items, window_items
from glm_jax import layouts
from glm_jax.generation import blanks
from glm_jax.generation.api import make_strategy

GENERATION_BATCH = 16


def _write_json(path: Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def _as_json(value):
  """value as it reads back from the results file (tuples as lists, numpy numbers as Python's)."""
  return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, 'item') else str(x)))


def _config_key(config: TaskConfig) -> dict:
  return _as_json({k: v for k, v in dataclasses.asdict(config).items() if k != 'source'})


def _custom_task(config: TaskConfig, data_dir):
  """The `module` class of a task, built as cls(config, data_dir) (it reads and checks its data then)."""
  module_name, _, class_name = config.module.rpartition('.')
  try:
    cls = getattr(importlib.import_module(module_name), class_name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f'{config.source}: module: cannot import {config.module!r} ({e})') from None
  return cls(config, Path(data_dir))


def plan(task_paths, data_dir) -> list[tuple[TaskConfig, dict[str, list[Path]] | object]]:
  """Every task config with its files ({group: files}) or, for a `module` task, its built class; all validated
  before anything runs (ValueError naming file and field or line)."""
  tasks, names = [], {}
  for path in find_task_files(task_paths):
    config = load_task(path)
    if config.name in names:
      raise ValueError(f'{path}: name: {config.name!r} is also the name of {names[config.name]}')
    names[config.name] = path
    if config.module:
      tasks.append((config, _custom_task(config, data_dir)))
      continue
    groups = task_files(data_dir, config)
    for files in groups.values():  # every example checked now, not after hours of scoring
      for path in files:
        read_documents(path) if config.type == 'lm' else read_examples(path, config.type)
    tasks.append((config, groups))
  return tasks


class Evaluator:
  def __init__(self, generator, data_dir, *, max_batch_tokens: int = 8192, progress: bool = True):
    self.generator, self.data_dir, self.progress = generator, Path(data_dir), progress
    self.tokenizer = generator.tokenizer
    self.special_ids = blanks.special_ids(self.tokenizer)
    self.scorer = Scorer(generator, max_batch_tokens=max_batch_tokens)
    self.two_d = bool(generator.model_config.position_encoding_2d)

  # -- one file -----------------------------------------------------------------------------------------------------

  def multiple_choice(self, config: TaskConfig, examples, bar=None) -> dict:
    items, slices = [], []
    for ex in examples:
      context = self.tokenizer.encode(ex.inputs)
      choices = [self.tokenizer.encode(c) for c in ex.choices]
      try:
        item, sl = choice_items(context, choices, self.special_ids, use_task_mask=config.use_task_mask,
                                use_multitask_encoding=config.use_multitask_encoding,
                                max_seq_length=min(config.max_seq_length, self.generator.max_sequence_length),
                                position_encoding_2d=self.two_d)
      except ValueError as e:
        raise ValueError(f'{ex.where}: {e}') from None
      items.append(item)
      slices.append(sl)
    scored = self.scorer.score(items, progress=bar.update if bar is not None else None)
    predictions, scores, greedy = [], [], []
    for (logp, is_argmax), sl in zip(scored, slices):
      option = [float(logp[s].sum()) / (max(s.stop - s.start, 1) if config.length_normalization else 1)
                for s in sl]
      scores.append(option)
      greedy.append([bool(is_argmax[s].all()) for s in sl])
      predictions.append(int(np.argmax(option)))
    accuracy = float(np.mean([p == ex.label for p, ex in zip(predictions, examples)]))
    return {'metrics': {'Accuracy': accuracy}, 'predictions': predictions, 'scores': scores, 'greedy': greedy}

  def language_model(self, config: TaskConfig, documents, bar=None) -> dict:
    nats, words, nbytes, tokens = 0.0, 0, 0, 0
    items, max_len = [], min(config.max_seq_length, self.generator.max_sequence_length)
    for doc in documents:
      ids = self.tokenizer.encode(doc)
      if not ids:
        continue
      items += window_items(ids, self.special_ids, max_seq_length=max_len,
                            generation_length=min(config.generation_length, max_len - 2),
                            use_task_mask=config.use_task_mask, unidirectional=config.unidirectional,
                            position_encoding_2d=self.two_d)
      words += len(doc.strip().split(' '))
      nbytes += len(doc.encode('utf-8'))
    if bar is not None:
      bar.total = len(items)
    for logp, _ in self.scorer.score(items, progress=bar.update if bar is not None else None):
      nats -= float(logp.sum())
      tokens += len(logp)
    values = {'PPL': metrics_lib.perplexity(nats, words), 'BPB': metrics_lib.bits_per_byte(nats, nbytes)}
    return {'metrics': {k: v for k, v in values.items() if k in config.metrics},
            'nats': nats, 'tokens': tokens, 'words': words, 'bytes': nbytes}

  def generation(self, config: TaskConfig, examples, bar=None) -> dict:
    if config.sampling_strategy == 'BeamSearchStrategy':
      strategy = dataclasses.replace(  # deterministic candidates: evaluation is repeatable (§7.5)
          make_strategy('BeamSearchStrategy', num_beams=config.num_beams, length_penalty=config.length_penalty,
                        no_repeat_ngram_size=config.no_repeat_ngram_size), deterministic=True)
    else:
      strategy = make_strategy('BaseStrategy', top_k=1)
    sid = self.special_ids
    mask_id = sid.gmask if config.use_task_mask else sid.mask
    max_len = min(config.max_seq_length, self.generator.max_sequence_length)
    predictions = []
    for start in range(0, len(examples), GENERATION_BATCH):
      chunk = examples[start:start + GENERATION_BATCH]
      contexts, masks = [], []
      for ex in chunk:
        text = self.tokenizer.encode(ex.inputs)
        if config.unidirectional or mask_id not in text:  # a blank is filled in place, untruncated
          text = text[max(0, len(text) - (max_len - config.max_gen_length - 2)):]  # left-truncated (§7.1)
        try:
          context, mask_position = layouts.generation_task_input(text, sid, use_task_mask=config.use_task_mask,
                                                                 unidirectional=config.unidirectional)
        except ValueError as e:
          raise ValueError(f'{ex.where}: {e}') from None
        contexts.append(context)
        masks.append(mask_position)
      out = self.generator.decoder.generate(
          self.generator.weights, contexts, masks, config.use_task_mask, max_gen_length=config.max_gen_length,
          strategy=strategy, end_tokens=(sid.eos, sid.eop), min_gen_length=config.min_gen_length,
          unidirectional=config.unidirectional)
      for ids in out.tokens:
        ids = [t for t in ids if t not in (sid.eos, sid.eop)]
        predictions.append(self.tokenizer.decode(ids).strip())
      if bar is not None:
        bar.update(len(chunk))
    values = {'EM': float(np.mean([metrics_lib.exact_match(p, ex.targets) for p, ex in zip(predictions, examples)])),
              'F1': float(np.mean([metrics_lib.f1_score(p, ex.targets) for p, ex in zip(predictions, examples)]))}
    return {'metrics': {k: v for k, v in values.items() if k in config.metrics}, 'predictions': predictions}

  # -- one task -----------------------------------------------------------------------------------------------------

  def run_task(self, config: TaskConfig, groups) -> dict:
    """groups: {group: files}, or the built class of a `module` task (see `plan`)."""
    if config.module:
      return {'groups': groups.evaluate(self.generator, self.scorer, self.progress)}
    out = {}
    for group, files in groups.items():
      per_file = []
      for path in files:
        if config.type == 'lm':
          data = read_documents(path)
          total = None
        else:
          data = read_examples(path, config.type)
          total = len(data)
        with tqdm(total=total, desc=f'{config.name} {path.name}', unit=' examples', leave=False,
                  disable=not self.progress) as bar:
          if config.type == 'mul':
            result = self.multiple_choice(config, data, bar)
          elif config.type == 'lm':
            result = self.language_model(config, data, bar)
          else:
            result = self.generation(config, data, bar)
        per_file.append({'file': str(path), 'examples': len(data), **result})
      out[group] = {'files': per_file, 'aggregate': metrics_lib.aggregate(per_file)}
    return {'groups': out}


def evaluate(task_paths, data_dir, generator, out_path, *, max_batch_tokens: int = 8192, progress: bool = True,
             print_fn=print) -> dict:
  """Runs every task (files or folders of YAML) and writes `out_path` after each; returns the results."""
  tasks = plan(task_paths, data_dir)
  out_path = Path(out_path)
  results = {'tasks': {}}
  if out_path.exists():
    try:
      results = json.loads(out_path.read_text(encoding='utf-8'))
      assert isinstance(results.get('tasks'), dict)
    except (OSError, ValueError, AssertionError):
      raise ValueError(f'{out_path}: exists and is not a results file of evaluate.py; choose another --out') from None
  evaluator = Evaluator(generator, data_dir, max_batch_tokens=max_batch_tokens, progress=progress)
  for config, groups in tasks:
    done = results['tasks'].get(config.name)
    if done is not None and done.get('config') == _config_key(config):
      print_fn(f'{config.name}: done already in {out_path}, skipped')
      continue
    task_result = evaluator.run_task(config, groups)
    results['tasks'][config.name] = _as_json({'config': _config_key(config), **task_result})
    _write_json(out_path, results)
    print_fn(format_task(config.name, task_result))
  return results


def format_task(name: str, task_result: dict) -> str:
  """One line per group and metric: best prompt, median, weighted average."""
  lines = []
  for group, g in task_result['groups'].items():
    for metric, agg in g['aggregate'].items():
      lines.append(f'{name:<24} {group:<24} {metric:<9} best {agg["best"]:8.4f}  median {agg["median"]:8.4f}  '
                   f'average {agg["average"]:8.4f}  ({len(g.get("files", []))} files)')
  return '\n'.join(lines)
