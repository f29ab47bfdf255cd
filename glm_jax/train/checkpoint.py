"""Orbax checkpoints of a training run: train state (sharded arrays), data-iterator state and run metadata.

Layout of a run directory:
    <run>/checkpoints/<step>/state/...      the TrainState pytree (tensorstore arrays, one shard file per host)
    <run>/checkpoints/<step>/data/...       the data iterator's state (JSON)
    <run>/checkpoints/<step>/meta/...       the config and glm-jax version it was written with (JSON)

Orbax writes each checkpoint into a temporary directory and renames it only when every part is complete, and the
manager lists finalized steps only; so a run killed in the middle of a save (even by SIGKILL) resumes from the
previous complete checkpoint, and a half-written one is never picked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Periodic async saves, keep the last N, restore the latest complete checkpoint onto given shardings."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).resolve() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns at once. wait() or close() before relying on the files."""
    from glm_jax.model_io import layer_chunked_save_args
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=layer_chunked_save_args(state)),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
    """(step, state, data_state, meta) of `step` (default: the latest complete one).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `sharding=` set: arrays are read directly into
    those shardings, whatever mesh the checkpoint was written on.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return step, restored['state'], restored['data'], restored['meta']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target for a state shaped like it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
