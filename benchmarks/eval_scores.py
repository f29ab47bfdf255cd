"""A trained checkpoint's scores on every shipped task (eval/tasks/*.yaml, on the prepared shared data's dev splits)
next to chance level, in one run.

Chance for a multiple-choice task is computed from its data: the mean over the scored examples of 1 / their number of
options (what guessing uniformly scores in expectation). Generation (EM / F1) and language-modelling tasks have no
chance level. Each group's figure is the size-weighted average over its prompt files (MMLU: the overall group, per
example). Results are written to --out after each task, and a rerun with the same --out skips finished tasks
(launch/evaluate.py's behaviour).

    python launch/prepare_eval_data.py --source ../shared/data --out eval_data
    python benchmarks/eval_scores.py --checkpoint runs/tiny --data eval_data --out runs/tiny/eval_scores.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import cpu_threads  # benchmarks/, first on sys.path when the script runs; imports nothing that starts threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chance(files: list[dict]) -> float:
  """Expected accuracy of a uniform guess over the examples of a group's files."""
  inverse = [1 / len(json.loads(line)['choices_pretokenized'])
             for f in files for line in open(f['file'], encoding='utf-8') if line.strip()]
  return sum(inverse) / len(inverse)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True, help='a glm-jax checkpoint or run directory')
  p.add_argument('--data', required=True, help='the prepared evaluation data folder')
  p.add_argument('--out', required=True, help='results JSON (resumed when it exists)')
  p.add_argument('--tasks', nargs='*', default=None, help='task files (default: eval/tasks/*.yaml)')
  p.add_argument('--batch-tokens', type=int, default=8192)
  args = p.parse_args(argv)
  notes = cpu_threads.limit_threads(len(os.sched_getaffinity(0)))
  sys.path.insert(0, REPO)

  import common
  from eval.config import load_task
  from eval.evaluator import evaluate
  from glm_jax.generation.api import Generator

  common.print_header(f'eval_scores: {args.checkpoint} on every shipped task, next to chance', notes)
  tasks = args.tasks or sorted(glob.glob(os.path.join(REPO, 'eval', 'tasks', '*.yaml')))
  generator = Generator.load(args.checkpoint)
  results = evaluate(tasks, args.data, generator, args.out, max_batch_tokens=args.batch_tokens, print_fn=lambda _: 0)
  multiple_choice = {c.name for c in map(load_task, tasks) if c.type == 'mul' and not c.module}
  print(f'{"task":<22} {"group":<16} {"metric":<9} {"score":>10} {"chance":>8}  examples')
  for name, task in results['tasks'].items():
    for group, g in task['groups'].items():
      if name == 'mmlu' and group != 'overall':
        continue
      examples = sum(f['examples'] for f in g['files'])
      for metric, agg in g['aggregate'].items():
        level = chance(g['files']) if name in multiple_choice and metric == 'Accuracy' else None
        value = agg['average']
        print(f'{name:<22} {group:<16} {metric:<9} {f"{value:.4f}" if value < 1e4 else f"{value:.3e}":>10} '
              f'{"-" if level is None else f"{level:.4f}":>8}  {examples}')

if __name__ == '__main__':
  main()
