"""Setup the benchmarks against SAT share: an fp32 config, the two models with the same weights, the run's header.

Imported after the script has limited its threads (cpu_threads) and put the repository on sys.path.
"""

from __future__ import annotations

import importlib
import os
import sys


def fp32_config(name: str):
  """(config, GLMConfig) of configs/<name>.py; exits naming the file when it is not float32 throughout."""
  from glm_jax.model import GLMConfig
  config = importlib.import_module(f'configs.{name}').get_config()
  cfg = GLMConfig.make(config.model)
  if cfg.dtype != 'float32' or cfg.param_dtype != 'float32':
    sys.exit(f'this benchmark is fp32; configs/{name}.py has dtype={cfg.dtype} param_dtype={cfg.param_dtype}')
  return config, cfg


def sat_and_params(config, cfg, seed: int, *, negate_final_layernorm: bool = False):
  """SAT's GLM130B built at the config's size with random weights (std 0.02, tests/sat_reference.py), and the same
  weights as glm-jax checkpoint-layout params (numpy). negate_final_layernorm: flip the final LayerNorm's scale on
  both, so that greedy decoding of a random model does not just copy its input token (the tied embedding and the
  DeepNorm skip path otherwise carry it to the output)."""
  from glm_jax import from_sat_state_dict
  from tests import sat_reference as R
  sat = R.build_sat_glm130b(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                            num_attention_heads=cfg.num_attention_heads, inner_hidden_size=cfg.inner_hidden_size,
                            vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_sequence_length,
                            position_encoding_2d=cfg.position_encoding_2d, layernorm_epsilon=cfg.layernorm_epsilon,
                            seed=seed, init_std=0.02)
  sd = R.state_dict_numpy(sat)
  if negate_final_layernorm:
    sd['transformer.final_layernorm.weight'] = -sd['transformer.final_layernorm.weight']
    R.load_state_dict_numpy(sat, sd)
  return sat, from_sat_state_dict(sd, config.model)


def print_header(title: str, notes) -> None:
  """The run's first lines: what is compared, the machine's load, the library versions and the threads held."""
  import jax
  import numpy as np
  import torch
  print(f'== {title} ==')
  la = os.getloadavg()
  print(f'load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({os.cpu_count()} cores on the machine)')
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, numpy {np.__version__}; '
        f'torch threads {torch.get_num_threads()}/{torch.get_num_interop_threads()}')
  print('threads:')
  for n in notes:
    print('  - ' + n)
