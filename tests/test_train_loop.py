"""The training run end to end through launch/train.py: resume after SIGKILL is bit-exact, metrics and plots.

These are subprocess tests because the process boundary is the thing under test: a run is killed (SIGKILL, at
named phases and at random times) and a new process resumes it.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO, subprocess_env
from tests.tokenizer_fixtures import data_dir, train_tiny_tokenizer

STEPS = 8
_CACHE = Path(tempfile.gettempdir()) / f'glm-jax-test-xla-cache-{os.getuid()}'
NO_TB = '--config.run.tensorboard=false'


@pytest.fixture(scope='module')
def run_inputs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('loop')
  tokenizer = train_tiny_tokenizer(tmp, 'compact')
  corpus = tmp / 'corpus'
  corpus.mkdir(exist_ok=True)
  text = (data_dir() / 'tinyshakespeare' / 'input.txt').read_text(encoding='utf-8')[:60_000]
  (corpus / 'shakespeare.txt').write_text(text, encoding='utf-8')
  return tokenizer, corpus


def _command(workdir, tokenizer, corpus, *extra):
  return [sys.executable, 'launch/train.py', '--config', 'configs/tiny.py', '--workdir', str(workdir),
          '--config.model.num_layers=2', '--config.model.hidden_size=64', '--config.model.num_attention_heads=4',
          '--config.model.inner_hidden_size=170', '--config.model.hidden_dropout=0.1',
          '--config.model.attention_dropout=0.1', '--config.model.init_std=0', '--config.train.learning_rate=2e-3',
          '--config.train.batch_size=4', '--config.train.seq_len=32',
          '--config.train.warmup_steps=2', f'--config.train.decay_steps={STEPS}', f'--config.run.steps={STEPS}',
          '--config.run.save_every=2', '--config.run.log_every=1', f'--config.run.eval_every={STEPS}',
          '--config.run.peak_flops=1e10', f'--config.run.tokenizer={tokenizer}',
          f'--config.data.corpus_paths={corpus}', '--config.data.mip_share=0.25', '--config.run.sample_prompts=()',
          *extra]


def _env(**extra):
  # Every process compiles the same programs: share them through JAX's persistent cache (same executables, so the
  # bit-exactness under test is unaffected).
  return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)


def _run(workdir, run_inputs, *extra, **env):
  return subprocess.run(_command(workdir, *run_inputs, *extra), cwd=REPO, env=_env(**env), capture_output=True,
                        text=True, timeout=300)


def _final_params(workdir):
  path = Path(workdir) / 'checkpoints' / str(STEPS) / 'state'
  with ocp.StandardCheckpointer() as c:
    state = c.restore(path)
  return state['params'], state['opt_state']


def _flat(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def uninterrupted(run_inputs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('plain')
  proc = _run(workdir, run_inputs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_quick_run_reports_heldout_bits_per_byte_and_metrics(uninterrupted, run_inputs, tmp_path):
  import jax

  from glm_jax import GLM, model_io
  from glm_jax.data import heldout_batches, load_corpus
  from glm_jax.tokenizer import GLMTokenizer
  workdir, proc = uninterrupted
  assert 'bits per byte' in proc.stdout
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train] == list(range(1, STEPS + 1))
  for key in ('loss', 'learning_rate', 'grad_norm', 'loss_scale', 'skipped', 'tokens_per_s', 'mfu'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert train[-1]['loss'] < train[0]['loss']
  (ev,) = [r for r in records if 'heldout_bpb' in r]
  assert ev['step'] == STEPS
  # The held-out numbers recomputed from the final parameters (a bare 'bpb > 0' passed whatever they were): the
  # model's log-softmax in float64 over the scored tokens of the held-out split (heldout_batches, checked in
  # tests/test_data.py); nats per scored token, and nats per UTF-8 byte / ln 2.
  params, config = model_io.load_model(workdir)
  tok = GLMTokenizer.load(run_inputs[0])
  model = GLM(config.model)
  forward = jax.jit(lambda p, b: model.apply({'params': p}, b['tokens'], b['position_ids'], b['attention_mask']))
  nats = scored = num_bytes = 0.0
  for batch, n in heldout_batches(load_corpus(run_inputs[1], tok), tok, config.train.seq_len,
                                  config.run.eval_batch_size):
    logits = np.asarray(forward(params, batch), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats -= (np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0] * batch['loss_mask']).sum()
    scored, num_bytes = scored + batch['loss_mask'].sum(), num_bytes + n
  # The run sums fp32 cross-entropies (each ~1e-6 relative) in fp32 over a batch of 8 x 32: ~1e-5 at most.
  assert ev['heldout_loss'] == pytest.approx(nats / scored, rel=1e-5)
  assert ev['heldout_bpb'] == pytest.approx(nats / num_bytes / np.log(2), rel=1e-5)
  assert list((workdir / 'tensorboard').iterdir())
  out = tmp_path / 'curves.png'
  plot = subprocess.run([sys.executable, 'launch/plot.py', str(workdir), '--out', str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert plot.returncode == 0, plot.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_resume_after_sigkill_is_bit_exact(uninterrupted, run_inputs, tmp_path):
  """Killed after a step, in the middle of a save, after a save, and at random times; resumed each time."""
  workdir = tmp_path / 'killed'
  for phase, step in (('after_step', 3), ('save_started', 4), ('after_save', 6)):
    proc = _run(workdir, run_inputs, NO_TB, GLM_JAX_KILL_AT=f'{phase}@{step}')
    assert proc.returncode == -signal.SIGKILL, (phase, proc.returncode, proc.stderr[-2000:])
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert all((workdir / 'checkpoints' / str(s) / 'commit_success.txt').exists() for s in steps)
    if phase == 'after_step':
      assert steps[-1] == 2
    if phase == 'save_started':  # the interrupted save is either invisible (temporary name) or complete
      assert steps[-1] in (2, 4)
    if phase == 'after_save':
      assert steps[-1] == 6
  rng = np.random.default_rng(0)
  for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):  # at random times, once the run is underway
    proc = subprocess.Popen(_command(workdir, *run_inputs, NO_TB), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      if 'resumed from' in line:
        break
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(sig)
    out = proc.stdout.read()
    proc.wait(timeout=60)
    if sig == signal.SIGTERM and proc.returncode == 0 and 'saved step' in out:  # unless it had already finished
      stopped_at = int(out.split('SIGTERM: saved step ')[1].split()[0])
      assert (workdir / 'checkpoints' / str(stopped_at) / 'commit_success.txt').exists()
  proc = _run(workdir, run_inputs, NO_TB)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref_params, ref_opt = _final_params(uninterrupted[0])
  params, opt = _final_params(workdir)
  for a, b in zip(_flat(ref_params) + _flat(ref_opt), _flat(params) + _flat(opt)):
    np.testing.assert_array_equal(a, b)


def test_a_half_written_checkpoint_is_never_picked(uninterrupted, run_inputs, tmp_path):
  """A step directory left under Orbax's temporary name (a save cut short) is ignored on resume."""
  import shutil
  workdir = tmp_path / 'half'
  shutil.copytree(uninterrupted[0], workdir)
  ckpts = workdir / 'checkpoints'
  shutil.rmtree(ckpts / str(STEPS))  # the last complete checkpoint is now STEPS - 2
  half = ckpts / f'{STEPS}.orbax-checkpoint-tmp-1'
  shutil.copytree(ckpts / str(STEPS - 2), half)
  for f in (half / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[:32])  # torn writes
  proc = _run(workdir, run_inputs, NO_TB)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'resumed from {ckpts / str(STEPS - 2)}' in proc.stdout
  for a, b in zip(_flat(_final_params(uninterrupted[0])), _flat(_final_params(workdir))):
    np.testing.assert_array_equal(a, b)


def test_load_model_reads_the_run_parameters_onto_a_mesh(uninterrupted):
  """model_io.load_model on a run directory: the latest parameters alone, as host arrays or straight into their
  shards on a mesh (placed by the run config's axis rules), equal to the saved training state's."""
  import jax

  from glm_jax import model_io, sharding
  from glm_jax.model import GLM
  want, _ = _final_params(uninterrupted[0])
  host, config = model_io.load_model(uninterrupted[0])
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, stage=1), jax.devices()[:4])
  placed, _ = model_io.load_model(uninterrupted[0], mesh=mesh)
  shardings = sharding.param_shardings(GLM(config.model), config.model, mesh, sharding.axis_rules(config))
  assert jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, placed, shardings)) == \
      [True] * len(jax.tree.leaves(want))
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))  # something is split
  assert jax.tree.structure(host) == jax.tree.structure(want)  # zip below would pass over a missing leaf
  for a, b, c in zip(_flat(want), _flat(host), _flat(placed)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_run_checkpoints_are_read_by_layer_without_warnings(uninterrupted, caplog):
  """A run's checkpoint stores its stacked arrays one layer per chunk, and model_io reads it layer by layer into the
  per-layer tree, without Orbax's warning about the item folder's missing _CHECKPOINT_METADATA."""
  import logging

  import jax
  import tensorstore as ts

  from glm_jax import model_io, weights
  want, _ = _final_params(uninterrupted[0])
  with caplog.at_level(logging.WARNING):
    _, entries = model_io.read_params_by_layer(uninterrupted[0])
    by_layer = dict(entries)
    model_io.load_model(uninterrupted[0])
  assert not [r for r in caplog.records if 'Metadata file does not exist' in r.getMessage()]
  # Every layer's every leaf (zip below would pass over missing ones).
  assert jax.tree.structure(by_layer) == jax.tree.structure(weights.unstack_layers(want))
  for a, b in zip(_flat(weights.unstack_layers(want)), _flat(by_layer)):
    np.testing.assert_array_equal(a, b)
  state = Path(uninterrupted[0]) / 'checkpoints' / str(STEPS) / 'state'
  qkv = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{state}',
                                               'path': 'params.layers.attention.qkv_kernel/'}}).result()
  assert qkv.chunk_layout.read_chunk.shape[0] == 1 and qkv.shape[0] > 1


def test_load_model_names_a_config_that_does_not_fit_the_parameters(uninterrupted, tmp_path):
  import shutil

  import jax

  from glm_jax import model_io, sharding
  workdir = tmp_path / 'edited'
  shutil.copytree(uninterrupted[0], workdir)
  config = json.loads((workdir / 'config.json').read_text())
  config['model']['inner_hidden_size'] += 8
  (workdir / 'config.json').write_text(json.dumps(config))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=2, stage=1), jax.devices()[:2])
  with pytest.raises(ValueError, match='the stored parameters do not match the model its config.json describes'):
    model_io.load_model(workdir, mesh=mesh)


def test_fine_tuning_starts_from_another_runs_parameters_on_another_mesh(uninterrupted, run_inputs, tmp_path):
  """--config.run.init_from=RUN: a new run on a (tensor 2, stage 2) mesh, pipelined, starts from RUN's final
  parameters with a fresh optimizer (at learning rate 0 they stay bit for bit RUN's; its Adam moments are its own two steps'); a model
  whose shapes differ is one line naming the parameter, exit 2."""
  import jax
  want, source_opt = _final_params(uninterrupted[0])
  workdir = tmp_path / 'ft'
  proc = _run(workdir, run_inputs, NO_TB, f'--config.run.init_from={uninterrupted[0]}', '--config.run.steps=2',
              '--config.run.save_every=2', '--config.run.eval_every=2', '--config.train.learning_rate=0',
              '--config.mesh.data=1', '--config.mesh.tensor=2', '--config.mesh.stage=2', JAX_NUM_CPU_DEVICES='4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'parameters from {uninterrupted[0]}' in proc.stdout
  path = workdir / 'checkpoints' / '2' / 'state'
  with ocp.StandardCheckpointer() as c:
    state = c.restore(path)
  assert int(state['step']) == 2
  assert jax.tree.structure(state['params']) == jax.tree.structure(want)
  for a, b in zip(_flat(want), _flat(state['params'])):
    np.testing.assert_array_equal(a, b)
  # a fresh optimizer: its step counters count this run's two steps, not the source's eight more
  counts = [int(x) for x in _flat(state['opt_state']) if x.ndim == 0 and x.dtype.kind == 'i']
  assert counts and set(counts) == {2}, counts
  assert {int(x) for x in _flat(source_opt) if x.ndim == 0 and x.dtype.kind == 'i'} == {STEPS}
  assert json.loads((workdir / 'config.json').read_text())['run']['tokenizer'] == str(Path(run_inputs[0]).resolve())
  proc = _run(tmp_path / 'bad', run_inputs, NO_TB, f'--config.run.init_from={uninterrupted[0]}',
              '--config.model.hidden_size=32')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith('train.py: error: ') and "['final_layernorm']['bias'] is (64,) there and (32,)" in line, line


def test_bad_flags_give_one_line_and_exit_2(run_inputs, tmp_path):
  proc = subprocess.run(_command(tmp_path / 'bad', *run_inputs, NO_TB, '--config.data.corpus_paths=/no/such/dir'),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert '/no/such/dir' in proc.stderr.strip().splitlines()[-1]
