"""Shared fixtures: 8 fake CPU devices, the tiny config, the reference model builder.

The device count must be set before JAX first touches a backend, so it is set here, at import.
"""

import os
import sys
from pathlib import Path

# Eight fake devices for the mesh tests; XLA's backend optimisations off, which halves compile time on the tiny
# test models (parity bounds are unaffected); and the CPU-independent arithmetic of XLA's matmul library (it would
# otherwise pick kernels, and so summation orders, by the CPU's features), so that two XLA programs compared here
# give the same bits on any x86-64 host. Added to any XLA_FLAGS the caller set (e.g. --xla_cpu_max_isa=AVX2 to run
# the suite as on an older CPU). Subprocesses get the same flags on one device (`subprocess_env`).
_OURS = {'--xla_backend_optimization_level': '0', '--xla_cpu_enable_platform_dependent_math': 'false'}
_given = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform')]
SUBPROCESS_XLA_FLAGS = ' '.join(_given + [f'{k}={v}' for k, v in _OURS.items()
                                          if not any(f.startswith(k + '=') for f in _given)])
os.environ['XLA_FLAGS'] = SUBPROCESS_XLA_FLAGS + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def subprocess_env(**extra) -> dict:
  """The environment of a test's subprocess (a launch script, a notebook kernel): one CPU device and the suite's
  XLA flags, so that what it computes can be compared with the test process's own results."""
  env = dict(os.environ, XLA_FLAGS=SUBPROCESS_XLA_FLAGS, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.update(extra)
  return env


import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ and tests/ are imported as packages


def load_config(name: str, **model_overrides):
  """A config from configs/<name>.py with `config.model` fields overridden."""
  import importlib
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.update(model_overrides)
  return config


# Small enough for SAT on one CPU thread, large enough to have several heads, layers and a real GeGLU width.
PARITY_MODEL = dict(num_layers=3, hidden_size=128, num_attention_heads=4, inner_hidden_size=340, vocab_size=512,
                    max_sequence_length=128)


@pytest.fixture(scope='session')
def tiny_config():
  return load_config('tiny', vocab_size=512)
