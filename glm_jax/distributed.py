"""Many processes (one per host, or per GPU) on JAX's own distributed runtime.

    spec = distributed.resolve(os.environ, coordinator=..., num_processes=..., process_id=...)  # flags may be None
    distributed.initialize(spec, timeout_s=300)       # before anything touches a JAX backend; no-op for one process

Where a process learns who it is (`detect`, a pure function of the environment; the first that applies wins):
  1. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (any launcher; a Kubernetes indexed Job may give
     JOB_COMPLETION_INDEX in place of JAX_PROCESS_ID).
  2. A Slurm job step (srun): SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS); the
     coordinator is the first node of the nodelist. The variables of a batch script alone (no srun) do not count:
     that is one process.
  3. A TPU VM worker whose environment names the slice (GKE does): TPU_WORKER_HOSTNAMES (comma-separated) and
     TPU_WORKER_ID; the coordinator is the first host.
  Otherwise one process. The coordinator's port is JAX_COORDINATOR_PORT when set, else 8476 (Slurm: a port derived
  from the job id, so that two jobs sharing a node do not collide).
Explicit flags (launch/train.py's --coordinator, --num-processes, --process-id) override what the environment says;
--coordinator=auto hands everything to JAX's own cluster detection (Cloud TPU metadata, Slurm, Open MPI).

A peer that never comes: JAX retries for `initialization_timeout` seconds and then aborts the process from C++
(a LOG(FATAL) stack trace, no Python exception). `initialize` runs a watchdog that fires first and exits with one
line naming the coordinator, the process count and the timeout.

Training with many processes (glm_jax/train/loop.py): every process builds the same global numpy batch from the
seed and hands JAX only its own shards of it (`global_batch`); only process 0 writes metrics, config.json and a
trained tokenizer; every process takes part in Orbax's checkpoint saves and restores. The run directory must be on
a file system all hosts share.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PORT = 8476
AUTO = 'auto'


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  coordinator: str | None  # 'host:port' of process 0's coordination service; None: one process, or JAX detects it
  num_processes: int | None  # None: JAX detects it (coordinator 'auto')
  process_id: int | None
  source: str  # where this came from: 'none', 'flags', 'JAX_*', 'kubernetes', 'slurm', 'tpu', 'auto' ('+flags')

  @property
  def single(self) -> bool:
    return self.num_processes == 1


SINGLE = ProcessSpec(None, 1, 0, 'none')


# ------------------------------------------------------------------------------------------------------------------
# Where am I: the environment (a plain dict, so that tests fake it) and flags


def expand_nodelist(nodelist: str) -> list[str]:
  """Slurm's compressed host list, e.g. 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5 (zero padding
  kept; several bracket groups in one name multiply out)."""
  names, depth, start = [], 0, 0
  for i, ch in enumerate(nodelist + ','):  # split at the commas outside brackets
    depth += (ch == '[') - (ch == ']')
    if ch == ',' and depth == 0:
      if nodelist[start:i]:
        names.extend(_expand_name(nodelist[start:i]))
      start = i + 1
  if depth or not names:
    raise ValueError(f'cannot read the Slurm nodelist {nodelist!r}')
  return names


def _expand_name(name: str) -> list[str]:
  m = re.search(r'\[([^\]]*)\]', name)
  if m is None:
    return [name]
  head, tail = name[:m.start()], name[m.end():]
  values = []
  for part in m.group(1).split(','):
    lo, _, hi = part.partition('-')
    if not lo.isdigit() or (hi and not hi.isdigit()):
      raise ValueError(f'cannot read the Slurm nodelist range {part!r} in {name!r}')
    values += [str(v).zfill(len(lo)) for v in range(int(lo), int(hi or lo) + 1)]
  return [head + v + rest for v in values for rest in _expand_name(tail)]


def slurm_tasks_per_node(value: str) -> list[int]:
  """SLURM_TASKS_PER_NODE, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
  counts = []
  for part in value.split(','):
    m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if m is None:
      raise ValueError(f'cannot read SLURM_TASKS_PER_NODE={value!r}')
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f'{name}={env[name]!r} is not an integer') from None


def _port(env: Mapping[str, str], default: int = DEFAULT_PORT) -> int:
  return _int(env, 'JAX_COORDINATOR_PORT') if env.get('JAX_COORDINATOR_PORT') else default


def slurm_port(env: Mapping[str, str]) -> int:
  # Every task of a job computes the same port; jobs sharing a node get different ones (below Linux's ephemeral
  # range, so that no outgoing connection holds it).
  return _port(env, 20000 + _int(env, 'SLURM_JOB_ID') % 10000 if env.get('SLURM_JOB_ID') else DEFAULT_PORT)


def detect(env: Mapping[str, str]) -> ProcessSpec:
  """The processes of this job as the environment describes them (module docstring); SINGLE when it does not."""
  if env.get('JAX_COORDINATOR_ADDRESS'):
    address = env['JAX_COORDINATOR_ADDRESS']
    if ':' not in address.rsplit(']', 1)[-1]:  # a bare host (or [ipv6]): the port separately
      address = f'{address}:{_port(env)}'
    id_var = 'JAX_PROCESS_ID' if 'JAX_PROCESS_ID' in env else 'JOB_COMPLETION_INDEX'
    missing = [v for v in ('JAX_NUM_PROCESSES', id_var) if v not in env]
    if missing:
      raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {" and ".join(missing)} is not'
                       + (' (nor JOB_COMPLETION_INDEX)' if id_var == 'JAX_PROCESS_ID' else ''))
    return ProcessSpec(address, _int(env, 'JAX_NUM_PROCESSES'), _int(env, id_var),
                       'JAX_*' if id_var == 'JAX_PROCESS_ID' else 'kubernetes')
  if 'SLURM_STEP_NODELIST' in env and 'SLURM_PROCID' in env:
    count = 'SLURM_STEP_NUM_TASKS' if 'SLURM_STEP_NUM_TASKS' in env else 'SLURM_NTASKS'
    first = expand_nodelist(env['SLURM_STEP_NODELIST'])[0]
    return ProcessSpec(f'{first}:{slurm_port(env)}', _int(env, count), _int(env, 'SLURM_PROCID'), 'slurm')
  if env.get('TPU_WORKER_HOSTNAMES') and 'TPU_WORKER_ID' in env:
    hosts = [h for h in env['TPU_WORKER_HOSTNAMES'].split(',') if h]
    return ProcessSpec(f'{hosts[0]}:{_port(env)}', len(hosts), _int(env, 'TPU_WORKER_ID'), 'tpu')
  return SINGLE


def resolve(env: Mapping[str, str], coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> ProcessSpec:
  """`detect(env)` with each given flag in place of what the environment says; checked (ValueError)."""
  if coordinator == AUTO:
    return ProcessSpec(None, num_processes, process_id, AUTO)
  if num_processes == 1:  # one process, whatever the environment says
    return SINGLE
  spec = detect(env)
  given = {k: v for k, v in dict(coordinator=coordinator, num_processes=num_processes,
                                 process_id=process_id).items() if v is not None}
  if given:
    base = ProcessSpec(None, None, None, 'flags') if spec.single else dataclasses.replace(
        spec, source=spec.source + '+flags')
    spec = dataclasses.replace(base, **given)
  if spec.single:
    return spec
  missing = [f'--{k.replace("_", "-")}' for k in ('coordinator', 'num_processes', 'process_id')
             if getattr(spec, k) is None]
  if missing:
    raise ValueError(f'{" and ".join(missing)} must be given too (or an environment that says them: Slurm, '
                     f'TPU_WORKER_*, JAX_*), or --coordinator=auto for JAX\'s own detection')
  if not re.fullmatch(r'.+:\d+', spec.coordinator):
    raise ValueError(f'the coordinator must be host:port, got {spec.coordinator!r}')
  if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
    raise ValueError(f'process id {spec.process_id} is not in 0..{spec.num_processes - 1} ({spec.source})')
  return spec


def define_flags() -> dict:
  """Launch scripts' absl flags --coordinator, --num-processes, --process-id and --init-timeout (read by
  initialize_from_flags)."""
  from absl import flags
  return {
      'coordinator': flags.DEFINE_string(
          'coordinator', None, "Many processes: process 0's host:port (default: from Slurm / TPU_WORKER_* / JAX_* "
          "variables, else one process); 'auto': JAX's own cluster detection (Cloud TPU, Slurm, Open MPI)."),
      'num_processes': flags.DEFINE_integer('num-processes', None, 'Processes in the job (1: one, whatever the '
                                            'environment says; default: from the environment).'),
      'process_id': flags.DEFINE_integer('process-id', None, "This process's id, 0 .. num_processes - 1 "
                                         '(default: from the environment).'),
      'init_timeout': flags.DEFINE_integer('init-timeout', 300, 'Seconds to wait for every process to join '
                                           'before giving up with an error.'),
  }


def initialize_from_flags(holders: dict, env: Mapping[str, str] | None = None) -> ProcessSpec:
  if holders['init_timeout'].value <= 0:
    raise ValueError(f'--init-timeout must be positive, got {holders["init_timeout"].value}')
  spec = resolve(os.environ if env is None else env, holders['coordinator'].value, holders['num_processes'].value,
                 holders['process_id'].value)
  initialize(spec, holders['init_timeout'].value)
  return spec


# ------------------------------------------------------------------------------------------------------------------
# Joining


def initialize(spec: ProcessSpec, timeout_s: int = 300, *, prog: str | None = None) -> None:
  """jax.distributed.initialize for `spec` (nothing for one process). When not every process has joined after
  timeout_s seconds, prints '<prog>: error: ...' (one line) and exits the process with status 2."""
  if spec.single:
    return
  import jax
  prog = prog or Path(sys.argv[0]).name
  if spec.source == AUTO:
    waiting = "the processes JAX's cluster detection expects"
  else:
    waiting = f'all {spec.num_processes} processes at the coordinator {spec.coordinator}'
  message = (f'process {spec.process_id if spec.process_id is not None else "?"} gave up after {timeout_s} s '
             f'waiting for {waiting}: a peer never started, or cannot reach it (check the host, the port and '
             f'that every process was given the same coordinator and process count)')

  def give_up():
    print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is blocked inside JAX's C++ client: nothing softer would stop it

  # JAX's own deadline comes later, so that this one-line error, not its abort, is what the user sees.
  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    if spec.source == AUTO:
      try:
        jax.distributed.initialize(None, spec.num_processes, spec.process_id, initialization_timeout=timeout_s + 60)
      except ValueError as e:  # e.g. 'coordinator_address should be defined.'
        raise ValueError(f"--coordinator=auto: JAX's cluster detection found no cluster here ({e})") from None
    else:
      # 'deactivate': the spec is complete, and JAX's Slurm detection would otherwise limit a process to one GPU.
      jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                 cluster_detection_method='deactivate', initialization_timeout=timeout_s + 60)
    # The backend's start exchanges device lists with every peer: inside the watchdog too.
    jax.devices()
  finally:
    watchdog.cancel()
  print(f'process {jax.process_index()} of {jax.process_count()} ({spec.source}): {jax.local_device_count()} of '
        f'{jax.device_count()} devices here', flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Training with many processes


def is_primary() -> bool:
  """True in process 0 (and when there is one process): the one that writes run files."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached `name` (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class LaggedAny:
  """`lagged_any(flag)` -> whether `flag` was true in any process at the previous call (a collective: every process
  calls it at the same steps; with one process: `flag`, at once). One call late so that a check every step waits
  for the step before, not the one just dispatched: the device keeps running."""

  def __init__(self):
    self.pending = None

  def __call__(self, flag: bool) -> bool:
    import jax
    if jax.process_count() == 1:
      return bool(flag)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if self.pending is None:
      self.mesh = Mesh(np.asarray(jax.devices()), ('all',))
      self.any = jax.jit(jnp.any, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
    local = np.full([jax.local_device_count()], bool(flag))
    flags = jax.make_array_from_process_local_data(NamedSharding(self.mesh, PartitionSpec('all')), local)
    previous, self.pending = self.pending, self.any(flags)  # dispatched, not waited for
    return previous is not None and bool(previous)


def global_batch(batch: dict, mesh, rules) -> dict:
  """The same host batch (numpy, identical in every process) -> global jax Arrays sharded as the train step
  expects (rows over the batch axes; an array whose leading dim is not the batch's, replicated); each process
  places only the shards its own devices hold."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from glm_jax import sharding
  rows = np.shape(batch['tokens'])[0]
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sh = (sharding.batch_sharding(mesh, rules, v.ndim) if v.shape[0] == rows
          else NamedSharding(mesh, PartitionSpec()))
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda index, v=v: v[index])
  return out


# ------------------------------------------------------------------------------------------------------------------
# launch/slurm_train.sh --dry-run: what each task of the allocation would be


def slurm_plan(env: Mapping[str, str]) -> tuple[str, list[tuple[int, str]]]:
  """(coordinator, [(process id, node)]) for an srun over the whole allocation of a batch script (block
  distribution: SLURM_PROCID counts up node by node)."""
  nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
  if not nodelist:
    raise ValueError('no Slurm allocation: SLURM_JOB_NODELIST is not set (run inside sbatch or salloc)')
  nodes = expand_nodelist(nodelist)
  if env.get('SLURM_TASKS_PER_NODE'):
    per_node = slurm_tasks_per_node(env['SLURM_TASKS_PER_NODE'])
  elif env.get('SLURM_NTASKS_PER_NODE'):
    per_node = [_int(env, 'SLURM_NTASKS_PER_NODE')] * len(nodes)
  else:  # --ntasks alone: Slurm's block distribution fills nodes in turn
    per_node = [-(-_int(env, 'SLURM_NTASKS') // len(nodes)) if env.get('SLURM_NTASKS') else 1] * len(nodes)
  tasks = [node for node, n in zip(nodes, per_node) for _ in range(n)]
  if env.get('SLURM_NTASKS'):
    tasks = tasks[:_int(env, 'SLURM_NTASKS')]
  return f'{nodes[0]}:{slurm_port(env)}', list(enumerate(tasks))


def _print_slurm_plan(command: list[str]) -> None:
  coordinator, tasks = slurm_plan(os.environ)
  print(shlex.join(command))
  print(f'  {len(tasks)} processes, coordinator {coordinator}')
  for pid, node in tasks:
    print(f'  process {pid} on {node}')


if __name__ == '__main__':  # python -m glm_jax.distributed slurm-plan COMMAND...  (launch/slurm_train.sh)
  if sys.argv[1:2] != ['slurm-plan']:
    sys.exit('usage: python -m glm_jax.distributed slurm-plan COMMAND...')
  try:
    _print_slurm_plan(sys.argv[2:])
  except ValueError as e:
    sys.exit(f'slurm_train.sh: error: {e}')
