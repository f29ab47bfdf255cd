"""Many processes on JAX's distributed runtime: glm_jax/distributed.py, launch/slurm_train.sh, launch/tpu_pod_train.sh.

Where a process learns who it is (pure functions of a faked environment); what the launch scripts would run (dry
runs under faked Slurm variables and a fake gcloud); and real runs on localhost (CPU, gloo collectives): two
processes train the tiny model with the losses of one process, a checkpoint written by two resumes in one and the
reverse, and a peer that never starts gives a one-line error within the timeout. The two-process runs go through
the launch scripts themselves, with a fake `srun` and a fake `gcloud` that start the processes here.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from glm_jax import distributed
from glm_jax.distributed import ProcessSpec, detect, expand_nodelist, resolve
from tests.conftest import REPO, SUBPROCESS_XLA_FLAGS, subprocess_env
from tests.tokenizer_fixtures import data_dir, train_tiny_tokenizer

STEPS = 4
_CACHE = Path(tempfile.gettempdir()) / f'glm-jax-test-xla-cache-{os.getuid()}'


# ------------------------------------------------------------------------------------------------------------------
# Where am I (pure functions)


def test_expand_nodelist():
  assert expand_nodelist('node[01-03,07]') == ['node01', 'node02', 'node03', 'node07']
  assert expand_nodelist('a,b[9-11],c') == ['a', 'b9', 'b10', 'b11', 'c']
  assert expand_nodelist('gpu[1-2]-ib') == ['gpu1-ib', 'gpu2-ib']
  assert expand_nodelist('r[1-2]n[08-09]') == ['r1n08', 'r1n09', 'r2n08', 'r2n09']
  for bad in ('node[01-03', 'n[a-b]', ''):
    with pytest.raises(ValueError, match='nodelist'):
      expand_nodelist(bad)
  assert distributed.slurm_tasks_per_node('2(x3),1') == [2, 2, 2, 1]


def test_slurm_plan_places_process_ids_node_by_node():
  env = dict(SLURM_JOB_ID='7', SLURM_JOB_NODELIST='n[1-3]', SLURM_TASKS_PER_NODE='2,1(x2)', SLURM_NTASKS='4')
  assert distributed.slurm_plan(env) == ('n1:20007', [(0, 'n1'), (1, 'n1'), (2, 'n2'), (3, 'n3')])
  env = dict(SLURM_JOB_NODELIST='n[1-3]', SLURM_NTASKS='5', JAX_COORDINATOR_PORT='999')
  assert distributed.slurm_plan(env) == ('n1:999', [(0, 'n1'), (1, 'n1'), (2, 'n2'), (3, 'n2'), (4, 'n3')])


SLURM_STEP = dict(SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='node[01-03,07]', SLURM_STEP_NODELIST='node[01-03,07]',
                  SLURM_NTASKS='8', SLURM_STEP_NUM_TASKS='8', SLURM_PROCID='5', SLURM_LOCALID='1')


@pytest.mark.parametrize('env, want', [
    ({}, distributed.SINGLE),
    (dict(HOME='/root', PATH='/bin'), distributed.SINGLE),
    (SLURM_STEP, ProcessSpec('node01:24242', 8, 5, 'slurm')),
    (dict(SLURM_STEP, JAX_COORDINATOR_PORT='1234'), ProcessSpec('node01:1234', 8, 5, 'slurm')),
    # a batch script's own variables, no srun step: one process
    ({k: v for k, v in SLURM_STEP.items() if not k.startswith('SLURM_STEP')}, distributed.SINGLE),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS='1', SLURM_PROCID='0'), ProcessSpec('node01:24242', 1, 0, 'slurm')),
    (dict(JAX_COORDINATOR_ADDRESS='10.0.0.1:9000', JAX_NUM_PROCESSES='4', JAX_PROCESS_ID='3'),
     ProcessSpec('10.0.0.1:9000', 4, 3, 'JAX_*')),
    # a Kubernetes indexed Job: a headless service as the coordinator, the completion index as the process id
    (dict(JAX_COORDINATOR_ADDRESS='train-0.train', JAX_NUM_PROCESSES='4', JOB_COMPLETION_INDEX='2'),
     ProcessSpec('train-0.train:8476', 4, 2, 'kubernetes')),
    (dict(SLURM_STEP, JAX_COORDINATOR_ADDRESS='h:1', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1'),
     ProcessSpec('h:1', 2, 1, 'JAX_*')),  # JAX's own variables win
    (dict(TPU_WORKER_HOSTNAMES='t-w-0,t-w-1,t-w-2,t-w-3', TPU_WORKER_ID='1'), ProcessSpec('t-w-0:8476', 4, 1, 'tpu')),
])
def test_detect_from_the_environment(env, want):
  assert detect(env) == want


def test_detect_names_what_is_missing_or_wrong():
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
    detect(dict(JAX_COORDINATOR_ADDRESS='h:1', JAX_PROCESS_ID='0'))
  with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
    detect(dict(SLURM_STEP, SLURM_PROCID='x'))


def test_flags_override_the_environment():
  assert resolve(SLURM_STEP, process_id=2) == ProcessSpec('node01:24242', 8, 2, 'slurm+flags')
  assert resolve(SLURM_STEP, coordinator='head:7000') == ProcessSpec('head:7000', 8, 5, 'slurm+flags')
  assert resolve(SLURM_STEP, num_processes=1) == distributed.SINGLE
  assert resolve({}, 'h:1', 2, 1) == ProcessSpec('h:1', 2, 1, 'flags')
  assert resolve({}, 'auto').source == 'auto'
  with pytest.raises(ValueError, match='--num-processes and --process-id must be given'):
    resolve({}, coordinator='h:1')
  with pytest.raises(ValueError, match='host:port'):
    resolve({}, 'h', 2, 0)
  with pytest.raises(ValueError, match=r'process id 2 is not in 0..1'):
    resolve({}, 'h:1', 2, 2)


# ------------------------------------------------------------------------------------------------------------------
# The launch scripts: dry runs, and fakes of srun and gcloud that start the processes on this machine

FAKE_SRUN = '''#!/usr/bin/env bash
# srun for tests: the command as SLURM_NTASKS tasks of a job step on this host
set -euo pipefail
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
'''

FAKE_GCLOUD = '''#!/usr/bin/env bash
# gcloud for tests: `... describe` prints the workers' addresses, `... ssh --command=C` runs C here
echo "$*" >> "$FAKE_GCLOUD_LOG"
for a; do case $a in --command=*) exec bash -c "${a#--command=}";; esac; done
echo "$FAKE_TPU_IPS"
'''


@pytest.fixture(scope='module')
def fake_bin(tmp_path_factory):
  bin_dir = tmp_path_factory.mktemp('bin')
  for name, text in (('srun', FAKE_SRUN), ('gcloud', FAKE_GCLOUD)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


def _clean_env(**extra):
  """subprocess_env without any process-topology variables of the machine running the tests."""
  env = {k: v for k, v in subprocess_env(**extra).items()
         if not k.startswith(('SLURM_', 'TPU_WORKER_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'))}
  env.update(extra)
  return env


def test_slurm_dry_run_prints_each_process_and_the_coordinator(fake_bin):
  env = _clean_env(SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='gpu[07-08]', SLURM_NTASKS='4',
                   SLURM_TASKS_PER_NODE='2(x2)', SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable,
                   PATH=f'{fake_bin}:{os.environ["PATH"]}')
  proc = subprocess.run(['bash', 'launch/slurm_train.sh', '--dry-run', '--config', 'configs/tiny.py', '--workdir',
                         '/shared/my runs/x'], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      (f"srun --kill-on-bad-exit=1 {sys.executable} launch/train.py --init-timeout=600 --config configs/tiny.py "
       f"--workdir '/shared/my runs/x'"),
      '  4 processes, coordinator gpu07:24242',
      '  process 0 on gpu07', '  process 1 on gpu07', '  process 2 on gpu08', '  process 3 on gpu08']
  proc = subprocess.run(['bash', 'launch/slurm_train.sh', '--dry-run'], cwd=REPO, capture_output=True, text=True,
                        env=_clean_env(PYTHON=sys.executable), timeout=60)
  assert proc.returncode != 0 and 'SLURM_JOB_NODELIST is not set' in proc.stderr


def test_tpu_pod_dry_run_prints_each_worker_command(fake_bin, tmp_path):
  log = tmp_path / 'gcloud.log'
  env = _clean_env(TPU_NAME='pod', ZONE='us-central2-b', PROJECT='proj', FAKE_TPU_IPS='10.130.0.5;10.130.0.6',
                   FAKE_GCLOUD_LOG=str(log), PATH=f'{fake_bin}:{os.environ["PATH"]}')
  proc = subprocess.run(['bash', 'launch/tpu_pod_train.sh', '--dry-run', '--config', 'configs/tiny.py',
                         '--workdir', '/mnt/runs/x'], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert log.read_text().split() == ['compute', 'tpus', 'tpu-vm', 'describe', 'pod', '--zone=us-central2-b',
                                     '--project=proj', '--format=value(networkEndpoints[].ipAddress)']
  lines = proc.stdout.splitlines()
  assert len(lines) == 4
  for i, ip in enumerate(('10.130.0.5', '10.130.0.6')):
    assert lines[2 * i] == f'process {i} of 2 on worker {i} ({ip}), coordinator 10.130.0.5:8476:'
    assert lines[2 * i + 1] == (
        f"  gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --project=proj --worker={i} --command='cd "
        f"glm-jax && python3 launch/train.py --coordinator=10.130.0.5:8476 --num-processes=2 --process-id={i} "
        f"--init-timeout=600 --config configs/tiny.py --workdir /mnt/runs/x'")


# ------------------------------------------------------------------------------------------------------------------
# Real processes on localhost


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def run_inputs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('inputs')
  tokenizer = train_tiny_tokenizer(tmp, 'compact')
  corpus = tmp / 'text'
  corpus.mkdir()
  text = (data_dir() / 'tinyshakespeare' / 'input.txt').read_text(encoding='utf-8')[:20_000]
  (corpus / 'shakespeare.txt').write_text(text, encoding='utf-8')
  return tokenizer, corpus


def _train_args(workdir, run_inputs):
  tokenizer, corpus = run_inputs
  return ['launch/train.py', '--config', 'configs/tiny.py', '--workdir', str(workdir),
          '--config.model.num_layers=2', '--config.model.hidden_size=64', '--config.model.num_attention_heads=4',
          '--config.model.inner_hidden_size=170', '--config.model.hidden_dropout=0.1',
          '--config.model.attention_dropout=0.1', '--config.train.batch_size=4', '--config.train.seq_len=32',
          '--config.train.warmup_steps=2', f'--config.train.decay_steps={STEPS}', f'--config.run.steps={STEPS}',
          '--config.run.save_every=2', '--config.run.log_every=1', '--config.run.peak_flops=1e10',
          f'--config.run.tokenizer={tokenizer}', f'--config.data.corpus_paths={corpus}',
          '--config.run.sample_prompts=()', '--config.run.tensorboard=false']


def _env(devices=1, **extra):
  # One process of two devices is the fair comparison for two processes of one: the same mesh (data 2), the same
  # programs. Every process compiles the same programs: shared through JAX's persistent cache.
  flags = SUBPROCESS_XLA_FLAGS + (f' --xla_force_host_platform_device_count={devices}' if devices > 1 else '')
  return _clean_env(XLA_FLAGS=flags, JAX_COMPILATION_CACHE_DIR=str(_CACHE),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                    **extra)


def _check(proc):
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  return proc


def _one_process(workdir, run_inputs):
  return _check(subprocess.run([sys.executable, *_train_args(workdir, run_inputs)], cwd=REPO, env=_env(devices=2),
                               capture_output=True, text=True, timeout=300))


def _two_processes_slurm(workdir, run_inputs, fake_bin):
  """launch/slurm_train.sh in a faked allocation of two tasks on this host (the fake srun sets SLURM_PROCID)."""
  env = _env(PATH=f'{fake_bin}:{os.environ["PATH"]}', PYTHON=sys.executable, SLURM_JOB_ID='77', SLURM_NTASKS='2',
             SLURM_JOB_NODELIST='localhost', SLURM_SUBMIT_DIR=str(REPO), JAX_COORDINATOR_PORT=str(_free_port()),
             INIT_TIMEOUT='120')
  return _check(subprocess.run(['bash', 'launch/slurm_train.sh', *_train_args(workdir, run_inputs)[1:]], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300))


def _two_processes_tpu(workdir, run_inputs, fake_bin, tmp_path):
  """launch/tpu_pod_train.sh on a faked pod of two workers, both this host (the fake gcloud runs each command)."""
  env = _env(PATH=f'{fake_bin}:{os.environ["PATH"]}', TPU_NAME='pod', ZONE='z', FAKE_TPU_IPS='127.0.0.1;127.0.0.1',
             FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud.log'), REPO_DIR=str(REPO), PYTHON=sys.executable,
             COORDINATOR_PORT=str(_free_port()), INIT_TIMEOUT='120')
  return _check(subprocess.run(['bash', 'launch/tpu_pod_train.sh', *_train_args(workdir, run_inputs)[1:]],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300))


def _records(workdir):
  """{(step, metric): value} of a run's training losses and held-out numbers."""
  out = {}
  for line in (Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    r = json.loads(line)
    out.update({(r['step'], k): r[k] for k in ('loss', 'grad_norm', 'heldout_loss', 'heldout_bpb') if k in r})
  return out


def _assert_same(got, want):
  assert got.keys() == want.keys()
  # They came out bit for bit equal here (the same programs; a sum of two terms is the same either way round).
  np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(got)], rtol=1e-5)


def _resume_copy(workdir, tmp_path, name):
  """A copy of a finished run with its last checkpoint and its metrics removed: resuming it redoes steps 3-4."""
  copy = tmp_path / name
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / str(STEPS))
  (copy / 'metrics.jsonl').unlink()
  return copy


@pytest.fixture(scope='module')
def runs(run_inputs, fake_bin, tmp_path_factory):
  one, two = tmp_path_factory.mktemp('one'), tmp_path_factory.mktemp('two')
  _one_process(one, run_inputs)
  _two_processes_slurm(two, run_inputs, fake_bin)
  return one, two


def test_two_processes_train_with_the_losses_of_one(runs):
  one, two = runs
  want = _records(one)
  assert sorted({s for s, k in want if k == 'loss'}) == list(range(1, STEPS + 1)) and (STEPS, 'heldout_bpb') in want
  _assert_same(_records(two), want)
  assert (two / 'config.json').is_file() and sorted(p.name for p in (two / 'checkpoints').iterdir()) == ['2', '4']


def test_a_checkpoint_of_two_processes_resumes_in_one(runs, run_inputs, tmp_path):
  one, two = runs
  copy = _resume_copy(two, tmp_path, 'two_then_one')
  proc = _one_process(copy, run_inputs)
  assert f'resumed from {copy / "checkpoints" / "2"}' in proc.stdout
  _assert_same(_records(copy), {k: v for k, v in _records(one).items() if k[0] > 2})


def test_a_checkpoint_of_one_process_resumes_in_two(runs, run_inputs, fake_bin, tmp_path):
  one, _ = runs
  copy = _resume_copy(one, tmp_path, 'one_then_two')
  proc = _two_processes_tpu(copy, run_inputs, fake_bin, tmp_path)
  assert proc.stdout.count(f'resumed from {copy / "checkpoints" / "2"}') == 2  # both processes
  _assert_same(_records(copy), {k: v for k, v in _records(one).items() if k[0] > 2})


def test_a_peer_that_never_starts_is_a_one_line_error_within_the_timeout(run_inputs, tmp_path):
  timeout = 3
  cases = {  # (process id, processes): the coordinator alone, a peer whose coordinator never started
      (0, 3): _free_port(), (1, 2): _free_port()}
  procs, start = {}, time.monotonic()
  for (pid, n), port in cases.items():
    args = [f'--coordinator=127.0.0.1:{port}', f'--num-processes={n}', f'--process-id={pid}',
            f'--init-timeout={timeout}']
    procs[pid, n] = subprocess.Popen([sys.executable, *_train_args(tmp_path / f'p{pid}', run_inputs), *args],
                                     cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # a missing flag: one line before anything waits
  bad = subprocess.run([sys.executable, *_train_args(tmp_path / 'bad', run_inputs), '--coordinator=127.0.0.1:1'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      ('train.py: error: --num-processes and --process-id must be given too (or an environment that says them: '
       "Slurm, TPU_WORKER_*, JAX_*), or --coordinator=auto for JAX's own detection")]
  for (pid, n), proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines() == [
        (f'train.py: error: process {pid} gave up after {timeout} s waiting for all {n} processes at the '
         f'coordinator 127.0.0.1:{cases[pid, n]}: a peer never started, or cannot reach it (check the host, the '
         'port and that every process was given the same coordinator and process count)')]
  elapsed = time.monotonic() - start
  assert timeout < elapsed < timeout + 60, elapsed  # Python's and JAX's start-up on a loaded machine, not a hang
  assert not (tmp_path / 'p0').exists()  # nothing was written


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(run_inputs, tmp_path):
  workdir, port = tmp_path / 'run', _free_port()
  args = [*_train_args(workdir, run_inputs), '--config.run.steps=200', '--config.train.decay_steps=200',
          '--config.run.save_every=1000', '--config.run.eval_every=1000', f'--coordinator=127.0.0.1:{port}',
          '--num-processes=2', '--init-timeout=120']
  procs = [subprocess.Popen([sys.executable, *args, f'--process-id={i}'], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  deadline = time.monotonic() + 180
  while not ((workdir / 'metrics.jsonl').is_file() and len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  outs = [p.communicate(timeout=180) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
  stopped = [int(out.split(': saved step ')[1].split()[0]) for out, _ in outs]
  assert stopped[0] == stopped[1] < 200, outs
  assert 'a signal to another process: saved step' in outs[0][0] and 'SIGTERM: saved step' in outs[1][0]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [str(stopped[0])]
  assert max(json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()) == stopped[0]
