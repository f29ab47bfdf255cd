"""Evaluation for glm-jax: GLM-130B's YAML task framework (glm130b.md §7).

- `load_task(path)` / `TaskConfig`: the YAML schema, validated (eval/config.py).
- `evaluate(task_paths, data_dir, generator, out_path)`: runs tasks, writing results as each finishes
  (eval/evaluator.py); `python launch/evaluate.py` is its command line.
- `Scorer`: batched log-probabilities of multiple-choice options and language-modelling windows (eval/scoring.py).
- eval/metrics.py: Accuracy, EM / F1 (SQuAD normalisation, CJK per character), PPL, BPB, group aggregation.
- eval/lambada.py: LAMBADA as GLM-130B scores it (a `module` task); eval/prepare.py: raw datasets -> the task layout
  (`python launch/prepare_eval_data.py`); eval/lm_eval_adapter.py: the lm-evaluation-harness model `glm-jax`
  (imported on its own: it needs lm-eval).
"""

from eval.config import TaskConfig, load_task
from eval.evaluator import evaluate
from eval.scoring import Scorer

__all__ = ['TaskConfig', 'load_task', 'evaluate', 'Scorer']
