"""The training run: data, sharded state, the jitted step, checkpoints, metrics and held-out evaluation.

    summary = run(config, workdir)      # launch/train.py is the command line around this

A run directory holds `checkpoints/` (Orbax; see checkpoint.py), `metrics.jsonl` (one JSON object per logged
step and per evaluation), TensorBoard event files under `tensorboard/`, the tokenizer (`tokenizer.model` + `.json`)
when the run trained its own, and `config.json`. Rerunning with the same workdir resumes from the latest complete
checkpoint, with parameters, optimiser state, step, RNG and data-iterator state, and continues exactly as if it had
not stopped. SIGTERM (and SIGINT) save a checkpoint and stop cleanly.

Fault injection for tests: GLM_JAX_KILL_AT="<phase>@<step>" kills the process with SIGKILL at a named phase:
  after_step    the train step `step` has completed (its state not yet saved)
  save_started  the checkpoint of `step` is being written in the background
  after_save    the checkpoint of `step` is complete
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from glm_jax import distributed, pipeline, sharding
from glm_jax.flops import train_flops_per_token
from glm_jax.model import GLM, GLMConfig
from glm_jax.train import checkpoint as ckpt
from glm_jax.train.step import init_train_state, make_train_step

def _fault_point(phase: str, step: int):
  spec = os.environ.get('GLM_JAX_KILL_AT')
  if spec and spec == f'{phase}@{step}':
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def measure_peak_flops(seconds: float = 1.0, n: int = 1024) -> float:
  """This machine's fp32 matmul FLOP/s with JAX's current threading (best of a few runs), for MFU."""
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, start = math.inf, time.perf_counter()
  while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


class MetricsWriter:
  """metrics.jsonl (appended, so a resumed run continues the same file) and TensorBoard."""

  def __init__(self, workdir: Path, tensorboard: bool = True):
    self.jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, values: dict):
    self.jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and k != 'time':
          self.tb.add_scalar(k, v, step)

  def close(self):
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


class _NoMetrics:
  """The metrics writer of processes other than 0."""

  def write(self, step: int, values: dict):
    pass

  def close(self):
    pass


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (a save then a clean exit)."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
  """A run's metrics.jsonl as {metric: [(step, value), ...]} sorted by step (ValueError naming a bad line)."""
  run_dir = Path(run_dir)
  path = run_dir / 'metrics.jsonl'
  if not path.is_file():
    raise ValueError(f'{path}: no such file (is {run_dir} a run directory of launch/train.py?)')
  series: dict[str, dict[int, float]] = {}
  for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{n}: not JSON ({e.msg})') from None
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        series.setdefault(k, {})[int(record['step'])] = float(v)  # a resumed run's repeated steps: the last wins
  return {k: sorted(v.items()) for k, v in series.items()}


def evaluate_heldout(eval_fn, params, batches) -> dict:
  """Held-out loss (nats per loss token) and bits per byte (total nats / UTF-8 bytes / ln 2)."""
  total_nats, total_tokens, total_bytes = 0.0, 0.0, 0
  for batch, num_bytes in batches:
    nats, tokens = eval_fn(params, batch)
    total_nats += float(nats)
    total_tokens += float(tokens)
    total_bytes += num_bytes
  if total_tokens == 0:
    return {}
  return {'heldout_loss': total_nats / total_tokens,
          'heldout_bpb': total_nats / max(total_bytes, 1) / math.log(2)}


def make_eval_fn(model, config, mesh, rules):
  from glm_jax.train.step import token_cross_entropy
  compute_dtype = GLMConfig.make(config.model).compute_dtype

  def eval_fn(params, batch):
    p = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    logits = model.apply({'params': p}, batch['tokens'], batch['position_ids'], batch['attention_mask'])
    mask = batch['loss_mask'].astype(np.float32)
    return (mask * token_cross_entropy(logits, batch['targets'])).sum(), mask.sum()

  jitted = jax.jit(eval_fn)

  def run(params, batch):
    with sharding.activate(mesh, rules):
      return jitted(params, batch)
  return run


def run(config, workdir: str | Path, *, tokenizer, train_batches, heldout_fn=None, progress: bool = True) -> dict:
  """Trains until config.run.steps, resuming from workdir's latest checkpoint. Returns a summary dict.

  tokenizer: a GLMTokenizer (its vocabulary must equal config.model.vocab_size).
  train_batches: a resumable iterator of batches (get_state() / set_state(state), next()).
  heldout_fn: a callable returning an iterable of (batch, num_utf8_bytes) for held-out evaluation, or None.
  """
  r = config.run
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} but the tokenizer has '
                     f'{tokenizer.vocab_size} ids')
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config)
  pp = pipeline.for_config(config)
  model = GLM(config.model, pipeline=pp)
  sharding.check_mesh_fits(model, config.model, rules, dict(mesh.shape))
  # XLA:CPU runs donated buffers while Orbax may still read them for an async save; elsewhere Orbax copies first.
  train_step = make_train_step(model, config, mesh, rules, donate=jax.default_backend() != 'cpu')
  state = init_train_state(model, config, config.seed, mesh, rules)
  checkpointer = ckpt.Checkpointer(workdir, keep=r.keep_checkpoints)
  start = 0
  if checkpointer.latest_step() is not None:
    start, state, data_state, _ = checkpointer.restore(pipeline.stored_target(pp, ckpt.abstract_like(state)))
    state = pipeline.from_stored(pp, state, train_step.state_shardings)
    train_batches.set_state(data_state)
    print(f'resumed from {checkpointer.directory / str(start)}')
  elif r.init_from:  # fine-tuning: the parameters of another run or model, a fresh optimizer and data stream
    from glm_jax import model_io
    params = model_io.load_params_like(r.init_from, pipeline.stored_target(pp, ckpt.abstract_like(state.params)))
    state = state.replace(params=pipeline.from_stored(pp, params, train_step.state_shardings.params))
    print(f'parameters from {r.init_from}')
  # Many processes (glm_jax/distributed.py): process 0 writes the run's files; every process feeds its own shards
  # of the same global batch.
  primary, feed, stop_agreed = distributed.is_primary(), lambda b: b, distributed.LaggedAny()
  if jax.process_count() > 1:
    feed = lambda b: distributed.global_batch(b, mesh, rules)  # noqa: E731
  if primary:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

  eval_fn = make_eval_fn(model, config, mesh, rules) if heldout_fn is not None else None
  peak = r.peak_flops or measure_peak_flops()
  flops_per_token = train_flops_per_token(GLMConfig.make(config.model), config.train.seq_len)
  writer = MetricsWriter(workdir, r.tensorboard) if primary else _NoMetrics()
  meta = {'config': json.loads(config.to_json_best_effort()), 'glm_jax': 'checkpoint format 1'}

  bar = None
  if progress and primary:
    from tqdm import tqdm
    bar = tqdm(total=r.steps, initial=start, desc='train', unit='step', dynamic_ncols=True)
  last = {}
  step = start
  t_last, tokens_since = time.perf_counter(), 0
  try:
    with _StopSignal() as stop:
      while step < r.steps:
        batch = next(train_batches)
        state, metrics = train_step(state, feed(batch))
        step += 1
        _fault_point('after_step', step)
        tokens_since += int(np.prod(batch['tokens'].shape))
        if step % r.log_every == 0 or step == r.steps:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          dt = time.perf_counter() - t_last
          m['tokens_per_s'] = tokens_since / dt
          m['mfu'] = m['tokens_per_s'] * flops_per_token / peak
          m['time'] = time.time()
          writer.write(step, m)
          last.update(m)
          t_last, tokens_since = time.perf_counter(), 0
          if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
        if eval_fn is not None and (step % r.eval_every == 0 or step == r.steps):
          ev = evaluate_heldout(eval_fn, state.params, heldout_fn())
          writer.write(step, ev)
          last.update(ev)
          if bar is not None and ev:
            bar.write(f"step {step}: held-out loss {ev['heldout_loss']:.4f}, bits per byte {ev['heldout_bpb']:.4f}")
        if bar is not None:
          bar.update(1)
        stopping = stop_agreed(stop.received is not None)  # many processes: all stop after the same step
        if step % r.save_every == 0 or step == r.steps or stopping:
          checkpointer.save(step, pipeline.to_stored(pp, state), train_batches.get_state(), meta, force=True)
          _fault_point('save_started', step)
          checkpointer.wait()
          _fault_point('after_save', step)
        if stopping:
          print(f'\n{stop.received or "a signal to another process"}: saved step {step} to '
                f'{checkpointer.directory}; rerun to resume')
          break
  finally:
    if bar is not None:
      bar.close()
    checkpointer.close()
    writer.close()
  params = pipeline.to_stored(pp, state.params)
  return {'step': step, 'params': params, **{k: v for k, v in last.items() if k != 'time'}}
