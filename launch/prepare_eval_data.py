"""Convert raw benchmark files into the evaluation data layout that eval/tasks/*.yaml read.

    python launch/prepare_eval_data.py --source ../shared/data --out eval_data
    python launch/evaluate.py --checkpoint runs/tiny --data eval_data --out results.json eval/tasks/

Recognised folders (by name, checked by content; see eval/prepare.py): mmlu/<split>/*.csv, fewclue/<task>/*.json,
xcopa_zh/*.jsonl, cmrc2018/*.json, wikitext2/*.txt, lambada/*.jsonl. Prints how many examples each output file got,
and every source example or file that was not converted, with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_SOURCE = flags.DEFINE_string('source', None, 'Folder holding the raw dataset folders (e.g. ../shared/data).')
_OUT = flags.DEFINE_string('out', None, 'Output folder (the --data of launch/evaluate.py).')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  for flag in (_SOURCE, _OUT):
    if not flag.value:
      raise cli.UsageError(f'--{flag.name} is required')
  from eval.prepare import prepare
  report = prepare(_SOURCE.value, _OUT.value)
  for line in report.lines():
    print(line)
  print(f'{sum(report.written.values()):,} examples in {len(report.written)} files under {_OUT.value}')
  return 0


if __name__ == '__main__':
  cli.run(main)
