"""Model checkpoints for inference: save and load (params, config), and SAT checkpoint folders on disk.

A glm-jax model checkpoint is a directory:
    <dir>/config.json      the whole config (config.model is what the model needs)
    <dir>/params/...       the parameter pytree, an Orbax checkpoint (tensorstore arrays)
It is written under a temporary name and renamed when complete, so a crash never leaves a half checkpoint.

`load_model` also accepts a training run directory (launch/train.py's --workdir): the parameters of its latest
complete checkpoint and the run's config.json.

SAT checkpoints (glm130b.md §8.1): `<dir>/latest` holds the iteration; `<dir>/<iteration>/mp_rank_XX_model_states.pt`
hold one tensor-parallel rank each, as `{'module': state_dict}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def save_model(directory: str | Path, params, config) -> Path:
  """Writes params and config to `directory` (which must not exist yet), atomically."""
  directory = Path(directory).resolve()
  if directory.exists():
    raise ValueError(f'{directory} already exists; choose a new output directory')
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.tmp-', dir=directory.parent))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / 'params', params)
      checkpointer.wait_until_finished()
    (tmp / 'config.json').write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return directory


def _config_from_json(path: Path) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding='utf-8')))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read the config ({e})') from None


def _latest_run_step(run_dir: Path) -> Path:
  ckpts = run_dir / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / 'state').is_dir())
  if not steps:
    raise ValueError(f'{ckpts}: no complete checkpoint')
  return ckpts / str(steps[-1]) / 'state'


def load_model(path: str | Path, *, shardings=None):
  """(params, config) from a model checkpoint or a training run directory.

  shardings: an optional pytree of shardings (e.g. sharding.param_shardings(...)) to place the parameters on a
  mesh; by default they land on the default device.
  """
  path = Path(path)
  if not path.exists():
    raise ValueError(f'{path}: no such checkpoint')
  if (path / 'params').is_dir() and (path / 'config.json').is_file():
    config, params_dir, subtree = _config_from_json(path / 'config.json'), path / 'params', None
  elif (path / 'checkpoints').is_dir() and (path / 'config.json').is_file():
    config, params_dir, subtree = _config_from_json(path / 'config.json'), _latest_run_step(path), 'params'
  else:
    raise ValueError(f'{path}: not a glm-jax checkpoint (expected config.json with params/ or checkpoints/)')
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(params_dir.resolve())
  params = restored[subtree] if subtree else restored
  params = jax.tree.map(np.asarray, params)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params, config


# ------------------------------------------------------------------------------------------------------------------
# SAT checkpoint folders


def read_sat_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
  """A SAT checkpoint (folder with `latest`, an iteration folder, or one .pt file) -> one merged TP=1 state dict."""
  import torch  # the PyTorch side is only needed here
  from glm_jax.sat_convert import merge_tensor_parallel

  path = Path(path)
  if path.is_file():
    files = [path]
  else:
    if (path / 'latest').is_file():
      path = path / (path / 'latest').read_text().strip()
    files = sorted(path.glob('mp_rank_*_model_states.pt'), key=lambda p: int(re.findall(r'\d+', p.name)[0]))
    if not files:
      raise ValueError(f'{path}: no mp_rank_XX_model_states.pt files')
  shards = []
  for f in files:
    try:
      blob = torch.load(f, map_location='cpu', weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
      raise ValueError(f'{f}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
    sd = blob.get('module', blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict):
      raise ValueError(f"{f}: expected a dict with a 'module' state dict")
    shards.append(sd)
  return merge_tensor_parallel(shards)


def write_sat_checkpoint(directory: str | Path, state_dict: dict, *, tp: int = 1, iteration: int = 0,
                         dtype: str = 'float16') -> Path:
  """Writes a SAT checkpoint folder (`latest` + `<iteration>/mp_rank_XX_model_states.pt`), atomically."""
  import torch
  from glm_jax.sat_convert import split_tensor_parallel

  directory = Path(directory).resolve()
  if directory.exists():
    raise ValueError(f'{directory} already exists; choose a new output directory')
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.tmp-', dir=directory.parent))
  torch_dtype = {'float16': torch.float16, 'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  try:
    (tmp / str(iteration)).mkdir()
    for rank, shard in enumerate(split_tensor_parallel(state_dict, tp)):
      tensors = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float32))).to(torch_dtype)
                 for k, v in shard.items()}
      torch.save({'module': tensors}, tmp / str(iteration) / f'mp_rank_{rank:02d}_model_states.pt')
    (tmp / 'latest').write_text(str(iteration))
    os.replace(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return directory
