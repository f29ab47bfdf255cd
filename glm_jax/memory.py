"""Will it fit: the bytes one device holds to train or decode a config on a mesh, counted by hand and as XLA
compiles it (launch/inspect_model.py prints both).

Analytical count, per device (shards by `sharding.shard_shape`, so the config's axis rules decide what splits):
- parameters: fp32 master weights (train/step.py keeps them whatever config.model.param_dtype), or for decoding the
  weights in their stored format (param_dtype, or INT4 / INT8: quantize/);
- Adam: mu and nu, 2 x fp32 per parameter;
- gradients: fp32, shaped like the parameters, plus the separate gradient of the input lookup's copy of the tied
  embedding (Embedding Gradient Shrink); twice that with grad_accum_steps > 1 (the accumulator and the micro-batch's);
- the weights cast to the compute dtype for the forward and backward (when it is not float32); with fsdp > 1, one
  layer's weights gathered over fsdp and its fp32 gradient before the reduce-scatter;
- activations: what the backward keeps, per layer and token, in bytes (e = compute dtype bytes, 2 for fp16; D hidden,
  F GeGLU width, N heads, S sequence length, t = tensor-parallel size; read off jax's saved residuals of the model):
    remat 'none': 24D (each LayerNorm keeps three fp32 D-vectors) + e(2D + 4D/t + 6F/t) (the normed inputs of QKV
                  and the MLP; scaled q, k and v; the attention context; six GeGLU-wide tensors)
                  + NS/t (4 + e) (the fp32 softmax and its compute-dtype copy); once for all layers, the attention
                  mask broadcast over heads, 5NS/t
    remat 'dots': eD (the layer input) + 4(3D/t + 2F/t + D) (fp32 outputs of the weight matmuls XLA keeps)
    remat 'full': eD (the layer input)
  times the layers a device runs and the tokens of one step's micro-batch on it; 'dots' and 'full' add one layer's
  'none' set, recomputed in the backward. Tokens: batch_size / grad_accum_steps / (data x fsdp) rows of seq_len. With
  pipeline stages (glm_jax/pipeline.py) a device runs its stage's ceil(L / stage) layers, and its GPipe loop keeps
  every tick's activations, idle ticks included: M + stage - 1 ticks of a 1/M slice of those rows (M =
  pipeline_microbatches), i.e. (M + stage - 1) / M times the rows;
- logits: 13 bytes a token and vocabulary entry (of V/t): the loss keeps an fp32 exp and an fp32 select of the fp32
  logits and a bool target mask, and the backward makes their fp32 gradient; on every stage, for all the rows;
- the batch: tokens, targets, positions and loss mask (4 bytes a token each) and the [B, 1, S, S] bool mask.
Decoding (glm_jax/generation/decode.py: layers unrolled, the cache in the compute dtype, no pipeline): the weights
(not split over `stage`), the key/value cache 2 x L x B x T x D / t (B split over data x fsdp, T = prompt +
generated columns), and the prefill's working set: one layer's 'none' activations at the prompt, and the logits.

The compiled count lowers the jitted train step (train/step.py) and the decoder's generate program (prefill and
loop) on abstract inputs (jax.ShapeDtypeStruct with shardings: nothing is allocated) over a mesh of fake CPU devices,
and reads XLA's memory analysis of one device's program. It is an XLA:CPU estimate: its arguments are exact, its
temporaries follow XLA:CPU's fusion and layouts. For GLM-130B's train step (fp16 compute; remat none, dots and full;
tensor 8, tensor 4 x stage 8, fsdp 8 x tensor 4) the analytical temporaries came within 10% of XLA:CPU's. For
decoding fp16 or quantized weights XLA:CPU's are far larger than a GPU's or TPU's would be (`decode_caveats`).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax import pipeline as pipeline_lib
from glm_jax import sharding
from glm_jax.model import GLM, GLMConfig


@dataclasses.dataclass
class Count:
  """Analytical bytes per device, by component; `kind` says which buffers of XLA's analysis a component is part of:
  'argument' (the inputs the program is given) or 'temp' (what it allocates while it runs)."""
  rows: list[tuple[str, str, float]]  # (component, kind, bytes)

  def total(self, kind: str | None = None) -> float:
    return sum(b for _, k, b in self.rows if kind is None or k == kind)


def param_elements(config, sizes: dict[str, int], weight_format: str = 'in_out', *, stacked: bool = True):
  """{parameter path: (elements of one device's shard, itemsize)} by the config's rules on a mesh of these sizes.
  stacked=False: the per-layer layout decoding runs (no 'layers' axis, so `stage` splits nothing)."""
  model_config = config.model.copy_and_resolve_references()
  model_config.scan_layers = stacked
  boxed = sharding.abstract_params(GLM(model_config, weight_format=weight_format), model_config)
  rules = sharding.axis_rules(config)
  out = {}
  for path, box in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    out[name] = (math.prod(sharding.shard_shape(box.value.shape, box.names, rules, sizes)), box.value.dtype.itemsize)
  return out


def layer_activation_bytes(cfg: GLMConfig, seq_len: int, tensor: int, policy: str) -> float:
  """Bytes per token that one layer keeps for the backward under a remat policy (module docstring)."""
  d, f, n, e = cfg.hidden_size, cfg.inner_hidden_size, cfg.num_attention_heads, jnp.dtype(cfg.compute_dtype).itemsize
  if policy == 'none':
    return 24 * d + e * (2 * d + 4 * d / tensor + 6 * f / tensor) + n * seq_len / tensor * (4 + e)
  if policy == 'dots':
    return e * d + 4 * (3 * d / tensor + 2 * f / tensor + d)
  if policy == 'full':
    return e * d
  raise ValueError(f'unknown remat policy {policy!r}')


def train_count(config, sizes: dict[str, int]) -> Count:
  """Analytical bytes per device of one training step (module docstring) on a mesh of these axis sizes."""
  cfg, t = GLMConfig.make(config.model), config.train
  params = param_elements(config, sizes)
  n_params = sum(n for n, _ in params.values())
  n_embedding = params['word_embeddings'][0]
  accum = int(t.grad_accum_steps)
  replicas = sizes['data'] * sizes['fsdp']
  rows = t.batch_size / accum / replicas  # one accumulation micro-batch, on one device
  s, tensor, e = int(t.seq_len), sizes['tensor'], jnp.dtype(cfg.compute_dtype).itemsize
  pipe = pipeline_lib.for_config(config)
  if pipe is None:
    layers, slot_rows, layer_rows = cfg.num_layers, rows, rows
  else:  # a stage's layers; every tick of the GPipe loop keeps its slot's activations (module docstring)
    layers, slot_rows = pipe.layers_per_stage, rows / pipe.microbatches
    layer_rows = slot_rows * (pipe.microbatches + pipe.stages - 1)
  policy = cfg.remat_policy
  activations = layers * layer_rows * s * layer_activation_bytes(cfg, s, tensor, policy)
  if policy == 'none':  # the attention mask broadcast over heads (bool and fp32), kept once for all layers
    activations += slot_rows * s * cfg.num_attention_heads * s / tensor * 5
  else:  # one layer recomputed in the backward
    activations += slot_rows * s * layer_activation_bytes(cfg, s, tensor, 'none')
  position_bytes = 8 if cfg.position_encoding_2d else 4
  out = [
      ('parameters (fp32 master)', 'argument', 4 * n_params),
      ('Adam mu, nu (2 x fp32)', 'argument', 8 * n_params),
      ('batch (tokens, targets, positions, masks)', 'argument',
       t.batch_size / replicas * s * (12 + position_bytes + s)),
      ('gradients (fp32)' + (' + accumulator' if accum > 1 else ''), 'temp',
       4 * (n_params + n_embedding) * (2 if accum > 1 else 1)),
  ]
  if cfg.dtype != 'float32':
    out.append((f'weights cast to {cfg.dtype}', 'temp', e * n_params))
  if sizes['fsdp'] > 1:  # a layer's weights all-gathered for its matmuls, its fp32 gradient before the reduce-scatter
    layer = sum(n for name, (n, _) in params.items() if name.startswith('layers.')) / layers
    out.append(('one layer gathered over fsdp, and its gradient', 'temp', (e + 4) * layer * sizes['fsdp']))
  out += [
      (f'activations (remat {policy}, {layers} layers x {layer_rows:g} rows)', 'temp', activations),
      ('logits: saved for the loss, and their gradient', 'temp', 13 * rows * s * math.ceil(cfg.vocab_size / tensor)),
  ]
  return Count(out)


def decode_count(config, sizes: dict[str, int], batch: int, prompt: int, generated: int,
                 weight_format: str | None = None) -> Count:
  """Analytical bytes per device of decoding `batch` prompts of `prompt` tokens into `generated` more."""
  cfg = GLMConfig.make(config.model)
  fmt = weight_format or 'out_in'
  weight_bytes = sum(n * size for n, size in param_elements(config, sizes, fmt, stacked=False).values())
  rows = math.ceil(batch / (sizes['data'] * sizes['fsdp']))
  tensor, e, cache_len = sizes['tensor'], jnp.dtype(cfg.compute_dtype).itemsize, prompt + generated
  return Count([
      (f'weights ({fmt if weight_format else cfg.param_dtype})', 'argument', weight_bytes),
      (f'key/value cache ({cfg.dtype}, {cache_len} columns)', 'temp',
       2 * cfg.num_layers * rows * cache_len * cfg.hidden_size / tensor * e),
      ('prefill: one layer\'s activations, logits', 'temp',
       rows * prompt * layer_activation_bytes(cfg, cache_len, tensor, 'none')
       + rows * 4 * math.ceil(cfg.vocab_size / tensor)),
  ])


def decode_lengths(length: int) -> tuple[int, int]:
  """(prompt, generated) bucket sizes for a decode of `length` cache columns: half prompt, half generated, each
  rounded up to the decoder's buckets."""
  from glm_jax.generation.decode import bucket_length
  return bucket_length(max(1, length // 2)), bucket_length(max(1, length - length // 2))


# ----------------------------------------------------------------------------------------------------------------
# Compiled ahead of time


def memory_stats(compiled) -> dict[str, int]:
  """One device's buffers in XLA's memory analysis of a compiled program, and the peak they imply."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def compile_train_step(config, devices) -> tuple[dict[str, int], float]:
  """(memory_stats, seconds) of the train step compiled for `devices` (all of config.mesh's), on abstract inputs."""
  from glm_jax.train import step as step_lib
  mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.axis_rules(config)
  model = GLM(config.model, pipeline=pipeline_lib.for_config(config))
  train_step = step_lib.make_train_step(model, config, mesh, rules)
  state = _with_shardings(jax.eval_shape(lambda: step_lib.init_train_state(model, config, 0)),
                          train_step.state_shardings)
  b, s = int(config.train.batch_size), int(config.train.seq_len)
  positions = (b, 2, s) if GLMConfig.make(config.model).position_encoding_2d else (b, s)
  shapes = dict(tokens=((b, s), jnp.int32), targets=((b, s), jnp.int32), position_ids=(positions, jnp.int32),
                attention_mask=((b, 1, s, s), jnp.bool_), loss_mask=((b, s), jnp.float32))
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape)))
           for k, (shape, dtype) in shapes.items()}
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  return memory_stats(compiled), time.perf_counter() - start


# Decoding runs its layers unrolled (decode.py), and XLA:CPU's compile time grows faster than the layer count (70
# layers of GLM-130B: 13 minutes on 2 cores). Every layer adds the same buffers, so past this many layers the program
# is compiled at two smaller depths and each figure extrapolated linearly (for GLM-130B on 8 devices this gave
# arguments and temporaries within 0.1% of the full 70-layer compile).
DECODE_COMPILE_MAX_LAYERS = 8


def compile_decode(config, devices, batch: int, prompt: int, generated: int,
                   quantized: str | None = None) -> tuple[dict[str, int], float, str]:
  """(memory_stats, seconds, note) of the decoder's greedy generate program (prefill of `prompt` columns, then up to
  `generated` steps) for `batch` prompts, compiled for `devices` (one device: no mesh, as launch/generate.py); a deep
  model's figures extrapolated from two shallower compiles (DECODE_COMPILE_MAX_LAYERS), which `note` says."""
  layers = int(config.model.num_layers)
  if layers <= DECODE_COMPILE_MAX_LAYERS:
    stats, seconds = _compile_decode(config.model, config, devices, batch, prompt, generated, quantized)
    return stats, seconds, ''
  runs = []
  for depth in (2, 4):
    model_config = config.model.copy_and_resolve_references()
    model_config.num_layers = depth
    runs.append(_compile_decode(model_config, config, devices, batch, prompt, generated, quantized))
  (a, sec_a), (b, sec_b) = runs
  stats = {k: int(a[k] + (b[k] - a[k]) * (layers - 2) / 2) for k in a}
  return stats, sec_a + sec_b, f'; extrapolated to {layers} layers from compiles of 2 and 4'


def _compile_decode(model_config, config, devices, batch, prompt, generated, quantized):
  from glm_jax.generation import decode
  mesh, rules = None, None
  if len(devices) > 1:
    mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.axis_rules(config)
  decoder = decode.Decoder(model_config, mesh=mesh, rules=rules, quantized=quantized)
  boxed = sharding.abstract_params(decoder.model, decoder.cfg)
  params = nn.meta.unbox(boxed)
  if mesh is not None:
    params = _with_shardings(params, sharding.shardings_for(boxed, mesh, rules))
  else:
    one = jax.sharding.SingleDeviceSharding(devices[0])
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), params)
  cfg = decoder.cfg
  pos = (batch, 2) if cfg.position_encoding_2d else (batch,)
  spec = jax.ShapeDtypeStruct
  # The inputs Decoder.generate builds (decode.py), as abstract arrays.
  inputs = dict(tokens=spec((batch, prompt), jnp.int32), positions=spec(pos + (prompt,), jnp.int32),
                prefill_mask=spec((batch, prompt, prompt), jnp.bool_), context_visible=spec((batch, prompt), jnp.bool_),
                gen_positions=spec(pos + (generated,), jnp.int32), context_lengths=spec((batch,), jnp.int32),
                forced=spec((batch, generated), jnp.int32), end_mask=spec((cfg.vocab_size,), jnp.bool_),
                max_gen_length=spec((), jnp.int32), min_gen_length=spec((), jnp.int32),
                rng=spec((2,), jnp.uint32))
  start = time.perf_counter()
  with sharding.activate(mesh, rules):
    lowered = decoder._run.lower(params, inputs, strategy=decode.GREEDY, gen_bucket=generated, debug=False,
                                 stream=False)
  compiled = lowered.compile()
  return memory_stats(compiled), time.perf_counter() - start


def decode_caveats(config, quantized: str | None = None) -> list[str]:
  """Why XLA:CPU's decoding temporaries overstate a GPU's or TPU's for this config (seen in its compiled HLO)."""
  notes = []
  if config.model.dtype != 'float32':
    notes.append(f'XLA:CPU has no {config.model.dtype} matrix multiply: it converts each layer\'s weights to fp32 '
                 'and hoists the converted copies out of the token loop, all layers at once; a GPU or TPU multiplies '
                 f'{config.model.dtype} directly.')
  if quantized:
    notes.append(f'{quantized} on CPU runs the XLA fallback of quantize/kernels.py, which dequantizes each layer\'s '
                 'weights, and XLA:CPU keeps them all across the loop; the GPU and TPU kernels never expand them: '
                 'read the analytical column.')
  return notes


# ----------------------------------------------------------------------------------------------------------------
# The report


def format_report(title: str, count: Count, compiled: dict[str, int] | None = None, note: str = '',
                  caveats: tuple[str, ...] = ()) -> str:
  """A table of the analytical count per device (GiB, or MiB for a small model), its argument and temporary
  subtotals beside XLA's memory analysis when given, then `caveats` about that analysis."""
  unit, scale = ('GiB', 1024 ** 3) if count.total() >= 1024 ** 3 else ('MiB', 1024 ** 2)
  num = lambda n: f'{n / scale:10.2f}' if n is not None else ' ' * 10  # noqa: E731
  comparisons = (('arguments', count.total('argument'), 'argument'), ('outputs', None, 'output'),
                 ('aliased (donated inputs)', None, 'alias'), ('temporaries', count.total('temp'), 'temp'),
                 ('generated code', None, 'generated_code'),
                 ('peak: arguments + outputs - aliased + temporaries', count.total(), 'peak'))
  width = max(len(r[0]) for r in list(count.rows) + list(comparisons if compiled else ())) + 2
  lines = [title, f'  {"component":<{width}} {unit + "/device":>10}']
  lines += [f'  {name:<{width}} {num(b)}' for name, _, b in count.rows]
  lines.append(f'  {"total":<{width}} {num(count.total())}')
  if compiled is not None:
    lines += [f'\n  XLA:CPU estimate{note}:', f'  {"":<{width}} {"analytical":>10} {"XLA:CPU":>10}']
    lines += [f'  {label:<{width}} {num(a)} {num(compiled[key])}' for label, a, key in comparisons]
    lines += [textwrap.fill(c, 116, initial_indent='  note: ', subsequent_indent='        ') for c in caveats]
  return '\n'.join(lines)
