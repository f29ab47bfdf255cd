"""Thread limits for the benchmarks, applied before numpy, torch or jax is imported (every thread pool they start
later inherits the process's CPU affinity and reads these environment variables once)."""

from __future__ import annotations

import os
import time

XLA_ONE_THREAD = '--xla_cpu_multi_thread_eigen=false'


def cpu_busy(sample_s: float = 0.5) -> dict[int, float]:
  """Fraction of time each core was busy over a short sample, from /proc/stat."""
  def read():
    out = {}
    with open('/proc/stat') as f:
      for line in f:
        if line.startswith('cpu') and line[3].isdigit():
          name, *vals = line.split()
          vals = [int(v) for v in vals]
          out[int(name[3:])] = (sum(vals), vals[3] + vals[4])  # total, idle + iowait
    return out
  a = read()
  time.sleep(sample_s)
  b = read()
  return {c: 1.0 - (b[c][1] - a[c][1]) / max(1, b[c][0] - a[c][0]) for c in a if c in b}


def limit_threads(threads: int, core: int | None = None, pin: bool = True) -> list[str]:
  """threads=1: pin the process to `core` (default: the least busy allowed core) unless pin is False, and ask XLA for
  one thread; any other count leaves the affinity alone. OMP/OpenBLAS/MKL get `threads` threads, JAX the CPU platform.
  Returns notes describing what was done (torch's own thread counts are the caller's: set_num_threads)."""
  notes = []
  allowed = sorted(os.sched_getaffinity(0))
  if threads == 1:
    if pin:
      if core is None:
        try:
          busy = cpu_busy()
          core = min(allowed, key=lambda c: busy.get(c, 1.0))
          notes.append('core busy before start: ' + ', '.join(f'{c}: {busy.get(c, float("nan")):.0%}' for c in allowed))
        except OSError:
          core = allowed[-1]
      os.sched_setaffinity(0, {core})
      notes.insert(0, f'process pinned to core {core} with os.sched_setaffinity (of {allowed}); set before numpy, '
                      'torch and jax start any thread, so all their threads inherit it')
    flags = os.environ.get('XLA_FLAGS', '')
    if 'xla_cpu_multi_thread_eigen' not in flags:
      os.environ['XLA_FLAGS'] = (flags + ' ' + XLA_ONE_THREAD).strip()
  else:
    notes.append(f'{threads} threads: no pinning (allowed cores {allowed})')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[var] = str(threads)
  notes.append(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, JAX_PLATFORMS=cpu; '
               f'OMP/OPENBLAS/MKL_NUM_THREADS={threads}')
  return notes
