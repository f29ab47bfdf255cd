"""A decode step's attention on CPU as an XLA FFI kernel (cpu_decode_attention.cc), reading only the cache columns
that each row's mask allows.

XLA:CPU computes a decode step's attention as batched matrix-vector products over the whole padded cache (prompt
bucket + generation bucket, on one thread), so a step reads every column of the cache however few are in use. The
kernel reads the allowed columns only and splits the rows over XLA's intra-op thread pool; the math is the model's
(`model.attention_context`): scores q.k * c, masked ones at MASKED_SCORE * c, softmax over all columns, then the
weighted values. A masked column's weight exp(MASKED_SCORE * c - max) is exactly zero unless every allowed score
lies within ~88 of the fill; the kernel then falls back to attending over every column itself.

The kernel is compiled on first use with the system C++ compiler ($CXX, else g++) against jax's FFI headers and
cached under $GLM_JAX_CACHE (default ~/.cache/glm_jax). It needs an x86-64 CPU with AVX2 and FMA. Without a compiler
or such a CPU, or with GLM_JAX_CPU_KERNELS=0, the decode step keeps XLA's attention (a failed build says why in a
warning, once); so does any step on another platform, under a device mesh, or in a dtype other than float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_suffix('.cc')
_TARGET = 'glm_jax_decode_attention'
_FLAGS = ('-O3', '-mavx2', '-mfma', '-std=c++17', '-shared', '-fPIC')
_lock = threading.Lock()
_state: dict = {}  # 'ok': bool once decided; 'why': the reason it is off


def _cpu_supports_avx2_fma() -> bool:
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    return False
  try:
    flags = next(line for line in Path('/proc/cpuinfo').read_text().splitlines() if line.startswith('flags'))
  except (OSError, StopIteration):
    return False
  return {'avx2', 'fma'} <= set(flags.split(':', 1)[1].split())


def _compile() -> Path:
  """The shared library, built once per source, compiler flags and jax version (OSError / RuntimeError if not)."""
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
  include = jax.ffi.include_dir()
  key = hashlib.sha256(b'\0'.join([_SOURCE.read_bytes(), ' '.join(_FLAGS).encode(), cxx.encode(),
                                   jax.__version__.encode()])).hexdigest()[:16]
  cache = Path(os.environ.get('GLM_JAX_CACHE', Path.home() / '.cache' / 'glm_jax')) / 'cpu_kernels'
  library = cache / f'decode_attention-{key}.so'
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.decode_attention-', suffix='.so', dir=cache)
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *_FLAGS, '-isystem', include, str(_SOURCE), '-o', tmp], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
      first = next((line for line in proc.stderr.splitlines() if 'error' in line), proc.stderr.strip()[:200])
      raise RuntimeError(f'{cxx} failed on {_SOURCE.name}: {first}')
    os.replace(tmp, library)  # atomic: concurrent builders each write their own file, one wins
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return library


def available() -> bool:
  """Whether the kernel is built and registered (builds it on the first call; a failed build warns, once)."""
  with _lock:
    if 'ok' not in _state:
      why = None
      if os.environ.get('GLM_JAX_CPU_KERNELS', '1') == '0':
        why = 'GLM_JAX_CPU_KERNELS=0'
      elif not _cpu_supports_avx2_fma():
        why = 'this CPU lacks AVX2/FMA'
      else:
        try:
          library = ctypes.cdll.LoadLibrary(str(_compile()))
          jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.GlmDecodeAttention), platform='cpu')
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
          why = str(e)
          warnings.warn(f'glm_jax: the CPU decode-attention kernel is off ({why}); decoding uses XLA attention',
                        stacklevel=2)
      _state.update(ok=why is None, why=why)
    return _state['ok']


def decode_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, heads, reference):
  """The attention context [R, 1, H] of a decode step (S = 1) with the kernel on CPU, and `reference` (a function of
  the same arguments, model.attention_context) wherever the kernel does not apply."""
  r, s, h = q_RxSxH.shape
  applies = (s == 1 and h % 8 == 0 and mask_Bx1xSxT.shape[2] == 1 and r % mask_Bx1xSxT.shape[0] == 0
             and all(x.dtype == jnp.float32 for x in (q_RxSxH, k_RxTxH, v_RxTxH))
             and jax.sharding.get_abstract_mesh().empty and available())
  if not applies:
    return reference(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, heads)

  def kernel(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c):
    mask_BxT = mask_Bx1xSxT[:, 0, 0, :]
    ctx_RxH = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((r, h), jnp.float32))(
        q_RxSxH[:, 0], k_RxTxH, v_RxTxH, mask_BxT, jnp.asarray(c, jnp.float32).reshape(()))
    return ctx_RxH[:, None]

  return jax.lax.platform_dependent(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, cpu=kernel,
                                    default=functools.partial(reference, heads=heads))
