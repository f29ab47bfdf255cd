"""Print a GLM config's parameter table and the bytes each device holds on a mesh, without allocating the model.

    python launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=8
    python launch/inspect_model.py --config configs/tiny.py --forward     # also runs a forward pass

Shapes come from abstract evaluation (jax.eval_shape), so the 130B model is inspected in a second on a laptop.
The per-device bytes follow the config's axis rules on its mesh (`--config.mesh.<axis>=N`; an axis at -1 counts as 1
here), which need not exist on this machine. A mesh that cannot split the model is an error naming the config field.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glm_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/glm_130b.py.', lock_config=False)
_QUANTIZATION = flags.DEFINE_enum('quantization-bit-width', None, ['4', '8'], 'Report the bytes with the four '
                                  'matrices of every layer in GLM-130B\'s INT4 or INT8 format (quantize/).')
_FORWARD = flags.DEFINE_bool('forward', False, 'Also initialise the model on this machine and run one forward '
                             'pass on a batch of 2 x 16 tokens (only sensible for small configs).')


def _fmt_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return str(n)


def forward_demo(config):
  import jax
  import numpy as np
  from glm_jax import GLM, init_params
  model = GLM(config.model)
  params = init_params(model, config.model, jax.random.key(config.seed))
  b, s = 2, 16
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (b, s), dtype=np.int32)
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  if config.model.position_encoding_2d:
    positions = np.stack([positions, np.zeros_like(positions)], axis=1)
  mask = np.tril(np.ones((s, s), bool))[None, None]
  mask[..., :s // 2] = True  # GLM: a bidirectional context, then causal
  logits = jax.jit(lambda p: model.apply({'params': p}, tokens, positions, mask))(params)
  print(f'\nforward pass: tokens {tokens.shape} -> logits {logits.shape} {logits.dtype}, '
        f'finite={bool(np.isfinite(np.asarray(logits)).all())}, '
        f'mean |logit| {float(np.abs(np.asarray(logits)).mean()):.4f}')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise cli.UsageError('--config is required, e.g. --config configs/glm_130b.py')
  from glm_jax import GLM, axis_rules
  from glm_jax.sharding import check_mesh_fits, nominal_mesh_shape, parameter_table
  sizes = nominal_mesh_shape(config.mesh)
  check_mesh_fits(GLM(config.model), config.model, axis_rules(config), sizes)
  weight_format = 'in_out'
  if _QUANTIZATION.value:
    import quantize
    weight_format = quantize.format_name(int(_QUANTIZATION.value))
  rows = parameter_table(config, sizes, weight_format)
  total = sum(r[3] for r in parameter_table(config, sizes)) if weight_format != 'in_out' else sum(r[3] for r in rows)
  m = config.model
  print(f'GLM: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, '
        f'GeGLU {m.inner_hidden_size}, vocabulary {m.vocab_size}, params {m.param_dtype}, compute {m.dtype}'
        + (f'; layer matrices in {weight_format}' if weight_format != 'in_out' else ''))
  print(f'mesh: {", ".join(f"{k}={v}" for k, v in sizes.items())} ({math.prod(sizes.values())} devices)\n')
  width = max(len(r[0]) for r in rows)
  print(f'{"parameter":<{width}}  {"shape":<24} {"logical axes":<40} {"count":>17} {"bytes/device":>12}')
  for name, shape, names, count, per_device in rows:
    print(f'{name:<{width}}  {str(shape):<24} {str(names):<40} {count:>17,} {_fmt_bytes(per_device):>12}')
  per_device = sum(r[4] for r in rows)
  print(f'\ntotal parameters: {total:,}')
  print(f'parameter bytes per device: {_fmt_bytes(per_device)} (all devices: {_fmt_bytes(per_device * math.prod(sizes.values()))})')
  if _FORWARD.value:
    forward_demo(config)
  return 0


if __name__ == '__main__':
  cli.run(main)
