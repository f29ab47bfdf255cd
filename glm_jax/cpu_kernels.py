"""Three XLA FFI kernels for decoding on CPU (C++ sources in glm_jax/csrc/), built on first use.

decode_context: a decode step's attention, reading only the cache columns that each row's mask allows. XLA:CPU
computes it as batched matrix-vector products over the whole padded cache (prompt bucket + generation bucket, on one
thread), so a step reads every column of the cache however few are in use. The kernel reads the allowed columns only
and splits the rows over helper threads (csrc/parallel.h); the math is the model's (`model.attention_context`, which the
decoder passes in with the model's masked-score value): scores q.k * c, masked ones at masked_score * c, softmax over
all columns, then the weighted values. A masked column's weight exp(masked_score * c - max) is exactly zero unless
every allowed score lies within ~88 of the fill; the kernel then falls back to attending over every column itself.

packed_matmul: x @ W.T for a weight W [O, I] packed in tiles of four rows (`pack`): the weight format 'packed'
(`PackedWeight`, registered with glm_jax/weights.py). XLA's product of 8 rows against a weight reaches neither the
core's FMA peak nor its bandwidth and reads the weight as one stream; the kernel fills every FMA lane at 8 rows and
reads three tiles side by side (see packed_matmul.cc; benchmarks/decode_vs_sat.py --profile, with and without
GLM_JAX_CPU_KERNELS=0, compares the two).

quantized_matmul: x @ W.T for GLM-130B's INT8 / INT4 weights (quantize/format.py's layout, the formats of
quantize/formats.py), converted to float in registers as they are read: a decode step reads an eighth (INT4) of the
fp32 bytes. XLA's own formulation dequantizes the whole matrix into memory on every call (measured about 15x slower
than an fp32 matrix-vector product for INT8). On a CPU with VNNI (AVX-VNNI, AVX-512 VNNI) the products are integer dot
products instead, x rounded to 22 bits below its row's largest element (csrc/vnni_matmul.h says why and how exact).

All are compiled with the system C++ compiler ($CXX, else g++) against jax's FFI headers into one library, cached
under $GLM_JAX_CACHE (default ~/.cache/glm_jax). They need an x86-64 CPU with AVX2 and FMA. Without a compiler or such
a CPU, or with GLM_JAX_CPU_KERNELS=0, `available()` is False (a failed build says why in a warning, once): decoding
then keeps XLA's attention and the 'out_in' format (the decoder's `decode_format` decides). The attention kernel is
also left out on another platform, under a device mesh, or in a dtype other than float32.
"""

from __future__ import annotations

import ctypes
import dataclasses
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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import weights

_CSRC = Path(__file__).parent / 'csrc'
_SOURCES = tuple(_CSRC / name for name in ('decode_attention.cc', 'packed_matmul.cc', 'quantized_matmul.cc'))
_HEADERS = (_CSRC / 'parallel.h', _CSRC / 'vnni_matmul.h')
# vnni_matmul.cc once per instruction set, each object called only on a CPU that has it (quantized_matmul.cc checks)
_VNNI = _CSRC / 'vnni_matmul.cc'
_VNNI_VARIANTS = (('-mavx2', '-mfma', '-mavxvnni'),
                  ('-mavx2', '-mfma', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512vnni', '-DGLM_VNNI_ZMM'))
_TARGETS = {'glm_jax_decode_attention': 'GlmDecodeAttention', 'glm_jax_packed_matmul': 'GlmPackedMatmul',
            'glm_jax_quantized_matmul': 'GlmQuantizedMatmul'}
TILE_ROWS = 4  # rows of W per tile of the packed layout (kRows in packed_matmul.cc)
_FLAGS = ('-O3', '-mavx2', '-mfma', '-std=c++17', '-fPIC')
# quantized_matmul.cc's paths (its PathMask): 'float' on any AVX2 CPU, integer dot products on 256-bit (AVX-VNNI) or
# 512-bit (AVX-512 VNNI) vectors where the CPU has them
QUANTIZED_PATHS = {'float': 1, 'vnni256': 2, 'vnni512': 4}
_lock = threading.Lock()
_state: dict = {}  # 'ok': bool once decided; 'why': the reason it is off; 'paths': QUANTIZED_PATHS' mask


def _cpu_supports_avx2_fma() -> bool:
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    return False
  try:
    flags = next(line for line in Path('/proc/cpuinfo').read_text().splitlines() if line.startswith('flags'))
  except (OSError, StopIteration):
    return False
  return {'avx2', 'fma'} <= set(flags.split(':', 1)[1].split())


def _run_compiler(args, what: str) -> None:
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
  if proc.returncode != 0:
    first = next((line for line in proc.stderr.splitlines() if 'error' in line), proc.stderr.strip()[:200])
    raise RuntimeError(f'{args[0]} failed on {what}: {first}')


def _compile() -> Path:
  """The shared library, built once per sources, compiler flags and jax version (OSError / RuntimeError if not). A
  compiler that cannot build the VNNI objects gets the library without them (quantized products then take the
  float path)."""
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
  include = jax.ffi.include_dir()
  key = hashlib.sha256(b'\0'.join([*(f.read_bytes() for f in _SOURCES + _HEADERS + (_VNNI,)),
                                   repr((_FLAGS, _VNNI_VARIANTS)).encode(), cxx.encode(),
                                   jax.__version__.encode()])).hexdigest()[:16]
  cache = Path(os.environ.get('GLM_JAX_CACHE', Path.home() / '.cache' / 'glm_jax')) / 'cpu_kernels'
  library = cache / f'cpu_kernels-{key}.so'
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='.cpu_kernels-', dir=cache) as tmp:
    common = [*_FLAGS, '-isystem', include]
    try:
      objects = []
      for i, flags in enumerate(_VNNI_VARIANTS):
        objects.append(f'{tmp}/vnni_matmul_{i}.o')
        _run_compiler([cxx, *common, *flags, '-c', str(_VNNI), '-o', objects[-1]], _VNNI.name)
      defines = []
    except (RuntimeError, subprocess.SubprocessError) as e:
      warnings.warn(f'glm_jax: the VNNI kernels are off ({e})', stacklevel=3)
      objects, defines = [], ['-DGLM_JAX_NO_VNNI']
    out = f'{tmp}/cpu_kernels.so'
    _run_compiler([cxx, *common, *defines, '-shared', *map(str, _SOURCES), *objects, '-o', out],
                  ', '.join(f.name for f in _SOURCES))
    os.replace(out, library)  # atomic: concurrent builders each write their own file, one wins
  return library


def available() -> bool:
  """Whether the kernels are built and registered (builds them on the first call; a failed build warns, once)."""
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
          for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
          _state['paths'] = library.GlmQuantizedPaths()
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
          why = str(e)
          warnings.warn(f'glm_jax: the CPU decoding kernels are off ({why}); decoding uses XLA attention and '
                        'products', stacklevel=2)
      _state.update(ok=why is None, why=why)
    return _state['ok']


def decode_context(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, heads, *, reference, masked_score: float):
  """The attention context [R, 1, H] of a decode step (S = 1) with the kernel on CPU, and `reference` (a function of
  the same arguments, model.attention_context, whose masked scores are masked_score * c) wherever the kernel does not
  apply."""
  r, s, h = q_RxSxH.shape
  applies = (s == 1 and h % 8 == 0 and mask_Bx1xSxT.shape[2] == 1 and r % mask_Bx1xSxT.shape[0] == 0
             and all(x.dtype == jnp.float32 for x in (q_RxSxH, k_RxTxH, v_RxTxH))
             and jax.sharding.get_abstract_mesh().empty and available())
  if not applies:
    return reference(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, heads)

  def kernel(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c):
    mask_BxT = mask_Bx1xSxT[:, 0, 0, :]
    ctx_RxH = jax.ffi.ffi_call('glm_jax_decode_attention', jax.ShapeDtypeStruct((r, h), jnp.float32))(
        q_RxSxH[:, 0], k_RxTxH, v_RxTxH, mask_BxT, jnp.asarray(c, jnp.float32).reshape(()),
        masked_score=np.float32(masked_score))
    return ctx_RxH[:, None]

  return jax.lax.platform_dependent(q_RxSxH, k_RxTxH, v_RxTxH, mask_Bx1xSxT, c, cpu=kernel,
                                    default=functools.partial(reference, heads=heads))


# ---------------------------------------------------------------------------------------------------------------------
# Packed products: the weight format 'packed'


def pack(w_OxI):
  """W [O, I] to tiles of TILE_ROWS rows, [T, I, TILE_ROWS] with T = ceil(O / TILE_ROWS): w[t, i, r] = W[4t + r, i],
  rows past O zero. Works on numpy arrays and inside jit."""
  o, i = w_OxI.shape
  t = -(-o // TILE_ROWS)
  xp = np if isinstance(w_OxI, np.ndarray) else jnp
  w = xp.pad(w_OxI, ((0, t * TILE_ROWS - o), (0, 0)))
  return w.reshape(t, TILE_ROWS, i).transpose(0, 2, 1)


def unpack(w_TxIxR, out_features: int):
  """The inverse of `pack`: W [out_features, I]."""
  t, i, r = w_TxIxR.shape
  return w_TxIxR.transpose(0, 2, 1).reshape(t * r, i)[:out_features]


def packed_rows(w_TxIxR, rows):
  """Rows `rows` (int array, any shape) of the packed W: [..., I], a lookup (the tied embedding's input side)."""
  return w_TxIxR[rows // TILE_ROWS, :, rows % TILE_ROWS]


def packed_matmul(x_MxI, w_TxIxR, out_features: int):
  """x [M, I] @ W.T -> [M, out_features] in float32 for a packed W (`pack`): the kernel on CPU, an XLA product of the
  unpacked weight (a copy of it per call) elsewhere or when the kernel is not `available()`."""
  m, _ = x_MxI.shape
  t = w_TxIxR.shape[0]
  x_MxI, w_TxIxR = x_MxI.astype(jnp.float32), w_TxIxR.astype(jnp.float32)

  def kernel(x, w):
    y = jax.ffi.ffi_call('glm_jax_packed_matmul', jax.ShapeDtypeStruct((m, t * TILE_ROWS), jnp.float32))(x, w)
    return y[:, :out_features]

  def reference(x, w):
    return jnp.einsum('mi,oi->mo', x, unpack(w, out_features), preferred_element_type=jnp.float32)

  if not available():
    return reference(x_MxI, w_TxIxR)
  return jax.lax.platform_dependent(x_MxI, w_TxIxR, cpu=kernel, default=reference)


@weights.register
@dataclasses.dataclass(frozen=True)
class PackedWeight(weights.Weight):
  """W [O, I] in tiles of TILE_ROWS rows, [T, I, TILE_ROWS] (`pack`): products by `packed_matmul`, and the tied
  embedding's rows looked up in place (no second copy)."""
  name: ClassVar[str] = 'packed'
  w: Any
  spec: weights.Spec

  @classmethod
  def convert(cls, w, spec):
    return pack(spec.o_by_i(w))

  @classmethod
  def axes(cls, spec):
    return (None, None, None)

  def matmul(self, x):
    lead = x.shape[:x.ndim - len(self.spec.in_shape)]
    y32_MxO = packed_matmul(x.reshape(-1, self.spec.i), self.w, self.spec.o)
    return y32_MxO.reshape(lead + self.spec.out_shape)

  def lookup(self, ids):
    return packed_rows(self.w, ids)

  def to_checkpoint(self):
    return self.spec.from_o_by_i(unpack(self.w, self.spec.o))


# ---------------------------------------------------------------------------------------------------------------------
# Quantized products (quantize/formats.py's 'int8' / 'int4' formats on CPU)

QUANTIZED_MAX_ROWS = 16  # decode-sized products; more rows (prefill) are compute-bound: XLA's GEMM on dequantized W


def quantized_paths() -> tuple[str, ...]:
  """The paths of quantized_matmul this CPU has (QUANTIZED_PATHS' names); () when the kernels are off."""
  if not available():
    return ()
  return tuple(name for name, bit in QUANTIZED_PATHS.items() if _state['paths'] & bit)


def quantized_matmul(x_MxI, q, scale_OxG, bits: int, *, reference, path: str | None = None):
  """x [M, I] @ dequant(q, scale).T -> [M, O] float32 with the kernel on CPU for float32 x and at most
  QUANTIZED_MAX_ROWS rows; `reference` (same arguments and bits=) elsewhere. path: one of quantized_paths() (for
  tests and benchmarks), by default the fastest."""
  m, _ = x_MxI.shape
  o = q.shape[0]
  if not (m <= QUANTIZED_MAX_ROWS and x_MxI.dtype == jnp.float32 and available()):
    return reference(x_MxI, q, scale_OxG, bits=bits)
  if path is not None and path not in quantized_paths():
    raise ValueError(f'path {path!r} is not available on this CPU (it has: {", ".join(quantized_paths())})')

  def kernel(x, q, scale):
    return jax.ffi.ffi_call('glm_jax_quantized_matmul', jax.ShapeDtypeStruct((m, o), jnp.float32))(
        x, q, scale.astype(jnp.float32), bits=np.int64(bits), path=np.int64(QUANTIZED_PATHS.get(path, 0)))

  return jax.lax.platform_dependent(x_MxI, q, scale_OxG, cpu=kernel,
                                    default=functools.partial(reference, bits=bits))
