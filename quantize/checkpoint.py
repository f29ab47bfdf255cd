"""Offline quantization of a glm-jax checkpoint (launch/quantize.py): read one layer at a time, quantize its four
matrices on the host, and write a checkpoint in a quantized weight format, which then loads (Generator.load,
launch/generate.py) without the float weights ever being read."""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from glm_jax import model_io, weights
from glm_jax.model import GLMConfig, weight_specs
from glm_jax.tokenizer import sidecar_path
from quantize import formats


def quantize_checkpoint(source: str | Path, out: str | Path, bits: int, *, group_size: int | None = None,
                        tensor_parallel: int | None = None, progress: bool = True) -> tuple[Path, str]:
  """Writes `source` (a model checkpoint or training run directory, in any float weight format) to `out` (which must
  not exist) with its layer matrices quantized; returns (out, the weight format written). The float weights are held
  one layer at a time; the quantized model (a quarter or an eighth of fp32) is held whole until it is written."""
  name = formats.format_name(bits, group_size, tensor_parallel)
  if Path(out).exists():
    raise ValueError(f'{out} already exists; choose a new output directory')
  config, entries = model_io.read_params_by_layer(source)
  if formats.is_quantized(config.weight_format):
    raise ValueError(f'{source} is quantized already ({config.weight_format})')
  specs = weight_specs(GLMConfig.make(config.model))
  quantized = {}
  for key, value in tqdm(entries, desc=f'quantizing to {name}', unit=' tensors', disable=not progress):
    value = weights.to_checkpoint_params({key: value}, specs, config.weight_format)[key]
    quantized[key] = weights.convert_params({key: value}, specs, name)[key]
  out = model_io.save_model(out, weights.stack_layers(quantized), config, weight_format=name)
  own = Path(source) / 'tokenizer.model'  # a run's own tokenizer travels with it (a configured one is named in config)
  if own.is_file():
    for path in (own, sidecar_path(own)):
      if path.is_file():
        shutil.copy(path, out / path.name)
  return out, name
