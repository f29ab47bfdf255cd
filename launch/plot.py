"""Draw the training curves of one or more runs to a PNG.

    python launch/plot.py runs/tiny runs/tiny-lr3e-3 --out curves.png
    python launch/plot.py runs/tiny --metrics loss,heldout_bpb,learning_rate --out tiny.png

Each run directory's metrics.jsonl (written by launch/train.py) gives one line per run in each panel.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402
from glm_jax.files import atomic_write  # noqa: E402
from glm_jax.train.loop import read_metrics  # noqa: E402

DEFAULT_METRICS = ('loss', 'heldout_loss', 'heldout_bpb', 'learning_rate', 'grad_norm', 'tokens_per_s')
_OUT = flags.DEFINE_string('out', None, 'The PNG file to write.')
_METRICS = flags.DEFINE_string('metrics', ','.join(DEFAULT_METRICS), 'Comma-separated metric names, one panel each: '
                               'whatever metrics.jsonl holds, e.g. mfu, loss_scale too.')


def plot(runs: list[Path], metrics: list[str], out: Path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  data = {run: read_metrics(run) for run in runs}
  metrics = [m for m in metrics if any(m in d for d in data.values())]
  if not metrics:
    raise ValueError('none of the requested metrics occur in the runs given')
  cols = min(3, len(metrics))
  rows = -(-len(metrics) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for run, d in data.items():
      if metric in d:
        steps, values = zip(*d[metric])
        ax.plot(steps, values, label=run.name, marker='.' if len(steps) < 30 else None)
    ax.set_title(metric)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if metric in ('learning_rate',):
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis('off')
  axes.flat[0].legend(fontsize='small')
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=110)
  plt.close(fig)
  atomic_write(out, png.getvalue())  # written whole, then renamed: never a half file


def main(argv) -> int:
  runs = [Path(a) for a in argv[1:]]
  if not runs:
    raise cli.UsageError('give one or more run directories, e.g. plot.py runs/tiny --out curves.png')
  if not _OUT.value:
    raise cli.UsageError('--out is required (the PNG file to write)')
  plot(runs, [m for m in _METRICS.value.split(',') if m], Path(_OUT.value))
  print(f'wrote {_OUT.value}')
  return 0


if __name__ == '__main__':
  cli.run(main)
