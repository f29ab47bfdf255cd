"""Print a GLM config's parameter table and what each device must hold to train and to decode it on a mesh, without
allocating the model.

    python launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=8
    python launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=4 --config.mesh.stage=8 \
        --config.train.batch_size=176 --config.train.grad_accum_steps=22 --config.train.pipeline_microbatches=8 \
        --config.model.remat_policy=full --compile
    python launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=1 --quantization-bit-width 4
    python launch/inspect_model.py --config configs/tiny.py --forward     # also runs a forward pass

Shapes come from abstract evaluation (jax.eval_shape), so the 130B model is inspected in a second on a laptop.
The per-device bytes follow the config's axis rules on its mesh (`--config.mesh.<axis>=N`; an axis at -1 counts as 1
here), which need not exist on this machine. A mesh that cannot split the model is an error naming the config field.

Memory per device (glm_jax/memory.py states the formulas): for a training step of config.train's batch
(batch_size, seq_len, grad_accum_steps, pipeline_microbatches; config.model.remat_policy), the fp32 master weights,
gradients, Adam moments, activations and logits; for decoding --decode-batch prompts into a cache of --decode-length
columns, the weights and the key/value cache. --compile also compiles the train step and the decoder's program ahead
of time for a mesh of fake CPU devices, on abstract inputs, and prints XLA's memory analysis beside the count,
labelled as the XLA:CPU estimate it is.
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
_MEMORY = flags.DEFINE_enum('memory', 'both', ['both', 'train', 'decode', 'none'], 'Which per-device memory '
                             'reports to print (with --quantization-bit-width: decoding only).')
_DECODE_BATCH = flags.DEFINE_integer('decode-batch', 1, 'Prompts decoded at once, for the decoding report.')
_DECODE_LENGTH = flags.DEFINE_integer('decode-length', 0, 'Key/value cache columns of the decoding report: prompt '
                                      'and generated tokens, half each (rounded up to the decoder\'s buckets); 0 = '
                                      'config.model.max_sequence_length.')
_COMPILE = flags.DEFINE_bool('compile', False, 'Also compile the train step and the decoder ahead of time on as many '
                             'fake CPU devices as the mesh has, and print XLA:CPU\'s memory analysis beside the count.')
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


def memory_reports(config, sizes, quantized):
  """The training and decoding memory reports (glm_jax/memory.py), with XLA:CPU's analysis beside them (--compile)."""
  import jax
  from glm_jax import memory
  devices = jax.devices('cpu')[:math.prod(sizes.values())] if _COMPILE.value else None
  where = ', '.join(f'{k}={v}' for k, v in sizes.items())
  t, m = config.train, config.model

  def report(title, count, compile_fn, caveats=()):
    compiled, note = None, ''
    if devices:
      compiled, seconds, how = compile_fn()
      note = f' ({len(devices)} fake CPU device{"s" if len(devices) > 1 else ""}, compiled in {seconds:.0f} s{how})'
    print(memory.format_report(title, count, compiled, note, caveats))

  if _MEMORY.value in ('both', 'train') and not quantized:
    pipelined = f', pipeline_microbatches {t.pipeline_microbatches}' if sizes['stage'] > 1 else ''
    report(f'\ntraining, bytes per device ({where}): batch {t.batch_size} x {t.seq_len} tokens, grad_accum_steps '
           f'{t.grad_accum_steps}{pipelined}, remat {m.remat_policy}, compute {m.dtype}',
           memory.train_count(config, sizes), lambda: (*memory.compile_train_step(config, devices), ''))
  if _MEMORY.value in ('both', 'decode'):
    batch = _DECODE_BATCH.value
    prompt, generated = memory.decode_lengths(_DECODE_LENGTH.value or m.max_sequence_length)
    report(f'\ndecoding, bytes per device ({where}): {batch} prompt(s) of {prompt} tokens + {generated} generated, '
           f'weights {quantized or m.param_dtype}, cache {m.dtype}',
           memory.decode_count(config, sizes, batch, prompt, generated, quantized),
           lambda: memory.compile_decode(config, devices, batch, prompt, generated, quantized),
           memory.decode_caveats(config, quantized))


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise cli.UsageError('--config is required, e.g. --config configs/glm_130b.py')
  from glm_jax.sharding import check_mesh_fits, nominal_mesh_shape, parameter_table
  sizes = nominal_mesh_shape(config.mesh)
  if _COMPILE.value:  # fake devices for the whole mesh: set before anything touches a JAX backend
    import jax
    jax.config.update('jax_num_cpu_devices', math.prod(sizes.values()))
  from glm_jax import GLM, axis_rules, pipeline
  check_mesh_fits(GLM(config.model, pipeline=pipeline.for_config(config)), config.model, axis_rules(config),
                  sizes)
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
  if _MEMORY.value != 'none':
    memory_reports(config, sizes, weight_format if weight_format != 'in_out' else None)
  if _FORWARD.value:
    forward_demo(config)
  return 0


if __name__ == '__main__':
  cli.run(main)
