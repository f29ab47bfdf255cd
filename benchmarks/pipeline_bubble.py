"""The pipeline's bubble, counted from the schedule the training step runs, against GPipe's (N - 1) / (M + N - 1).

    python benchmarks/pipeline_bubble.py                    # the tested configurations and GLM-130B's 8 stages
    python benchmarks/pipeline_bubble.py --stages 4 --microbatches 16 --layers 70

`Pipeline.schedule()` is the table the step's loop consumes tick by tick (glm_jax/pipeline.py): each entry is the
micro-batch a stage runs at that tick, or -1 where the stage idles. The bubble is the share of idle stage-ticks.
Padding is the share of layer slots that hold no layer when the stages do not divide the layers (their compute is
wasted too). No wall-clock time: fake CPU devices share the same cores, so a timing of them would say nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_STAGES = flags.DEFINE_integer('stages', None, 'Pipeline stages (with --microbatches and --layers: one row).')
_MICRO = flags.DEFINE_integer('microbatches', None, 'Micro-batches per forward.')
_LAYERS = flags.DEFINE_integer('layers', 70, 'Transformer layers.')

# (stages, micro-batches, layers, where): tests/test_pipeline.py's configurations, then GLM-130B's 70 layers on 8
# stages at several micro-batch counts
CONFIGS = [(2, 2, 6, 'test: stage 2'), (4, 4, 6, 'test: stage 4'),
           (2, 2, 6, 'test: data 2 x tensor 2 x stage 2'), (4, 2, 6, 'test: fsdp 2 x stage 4, 2 micro-batches')]
CONFIGS += [(8, m, 70, 'GLM-130B layers on 8 stages') for m in (8, 16, 32, 64)]


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  from glm_jax.pipeline import Pipeline
  configs = CONFIGS
  if _STAGES.value or _MICRO.value:
    if not (_STAGES.value and _MICRO.value):
      raise cli.UsageError('give --stages and --microbatches together')
    configs = [(_STAGES.value, _MICRO.value, _LAYERS.value, 'given')]
  print(f'{"stages":>6} {"micro":>5} {"layers":>6} {"ticks":>5} {"idle/all stage-ticks":>20} {"counted":>8} '
        f'{"(N-1)/(M+N-1)":>13} {"padding":>8}  configuration')
  for n, m, layers, where in configs:
    try:
      p = Pipeline(n, m, layers)
    except ValueError as e:
      raise cli.UsageError(str(e)) from None
    sched = p.schedule()
    idle = int((sched < 0).sum())
    print(f'{n:>6} {m:>5} {layers:>6} {sched.shape[0]:>5} {f"{idle}/{sched.size}":>20} {p.bubble_fraction():>8.4f} '
          f'{(n - 1) / (m + n - 1):>13.4f} {p.padding_fraction():>8.4f}  {where}')
  return 0


if __name__ == '__main__':
  cli.run(main)
