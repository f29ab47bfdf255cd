"""Print a GLM config's parameter table and the bytes each device holds on a mesh, without allocating the model.

    python launch/inspect_model.py --config configs/glm_130b.py --mesh data=1,fsdp=1,tensor=8
    python launch/inspect_model.py --config configs/tiny.py --forward     # also runs a forward pass

Shapes come from abstract evaluation (jax.eval_shape), so the 130B model is inspected in a second on a laptop.
The per-device bytes follow the config's axis rules on the given mesh, which need not exist on this machine.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/glm_130b.py.', lock_config=False)
_MESH = flags.DEFINE_string('mesh', None, 'Mesh to size the shards for, as axis=size pairs, e.g. '
                            '"data=1,fsdp=2,tensor=4" (axes: data, fsdp, tensor, stage; missing ones are 1). '
                            'Default: the config\'s mesh, with -1 read as 1.')
_FORWARD = flags.DEFINE_bool('forward', False, 'Also initialise the model on this machine and run one forward '
                             'pass on a batch of 2 x 16 tokens (only sensible for small configs).')


def shard_shape(shape, logical_axes, rules, sizes):
  table = dict(rules)
  out = []
  for dim, name in zip(shape, logical_axes):
    target = table.get(name)
    targets = () if target is None else (target if isinstance(target, tuple) else (target,))
    out.append(math.ceil(dim / math.prod(sizes[t] for t in targets)))
  return tuple(out)


def parameter_table(config, sizes):
  """Rows (path, shape, logical axes, count, bytes per device) and totals, by abstract evaluation."""
  import jax
  from glm_jax import GLM, axis_rules
  from glm_jax.sharding import abstract_params
  import flax.linen as nn

  boxed = abstract_params(GLM(config.model), config.model)
  rules = axis_rules(config)
  rows = []
  for path, box in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    value = box.value
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    count = math.prod(value.shape)
    per_device = math.prod(shard_shape(value.shape, box.names, rules, sizes)) * value.dtype.itemsize
    rows.append((name, tuple(value.shape), tuple(box.names), count, per_device))
  return rows


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
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the table
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/glm_130b.py')
  try:
    from glm_jax.sharding import parse_mesh
    sizes = parse_mesh(_MESH.value, config.mesh)
    rows = parameter_table(config, sizes)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  m = config.model
  print(f'GLM: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, '
        f'GeGLU {m.inner_hidden_size}, vocabulary {m.vocab_size}, params {m.param_dtype}, compute {m.dtype}')
  print(f'mesh: {", ".join(f"{k}={v}" for k, v in sizes.items())} ({math.prod(sizes.values())} devices)\n')
  width = max(len(r[0]) for r in rows)
  print(f'{"parameter":<{width}}  {"shape":<24} {"logical axes":<40} {"count":>17} {"bytes/device":>12}')
  for name, shape, names, count, per_device in rows:
    print(f'{name:<{width}}  {str(shape):<24} {str(names):<40} {count:>17,} {_fmt_bytes(per_device):>12}')
  total = sum(r[3] for r in rows)
  per_device = sum(r[4] for r in rows)
  print(f'\ntotal parameters: {total:,}')
  print(f'parameter bytes per device: {_fmt_bytes(per_device)} (all devices: {_fmt_bytes(per_device * math.prod(sizes.values()))})')
  if _FORWARD.value:
    forward_demo(config)
  return 0


if __name__ == '__main__':
  app.run(main)
