"""GLM-130B's INT8 / INT4 weight format (quantize/), its weight formats in the model, and the Pallas kernels.

The format is checked bit for bit against SAT 0.4.12's own `quantize()` on a half-precision GLM130B, with SAT's CUDA
INT4 packer replaced by `_spec_pack_int4` below, written from glm130b.md §6 ("byte i of a row = (q[2i] << 4) |
(q[2i+1] & 0xF)"), and a quantized model's logits against SAT's quantized model run in half precision, its CUDA
weight extraction replaced by `_spec_extract` (§6: half(q) * scale, hi nibble sign-extended for the even column).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import quantize
from glm_jax import GLM, from_sat_state_dict, init_params, rope, weights
from glm_jax.model import GLMConfig, weight_specs
from quantize import kernels
from tests import sat_reference as R
from tests.conftest import PARITY_MODEL, REPO, load_config, subprocess_env

torch.set_num_threads(1)
LINEARS = ('attention.query_key_value', 'attention.dense', 'mlp.dense_h_to_4h', 'mlp.dense_4h_to_h')
OURS = {'attention.query_key_value': ('attention', 'qkv_kernel'), 'attention.dense': ('attention', 'dense_kernel'),
        'mlp.dense_h_to_4h': ('mlp', 'h_to_4h_kernel'), 'mlp.dense_4h_to_h': ('mlp', '4h_to_h_kernel')}


def _spec_pack_int4(q: torch.Tensor) -> torch.Tensor:
  """glm130b.md §6: byte i of a row = (q[2i] << 4) | (q[2i+1] & 0xF), as int8."""
  q = q.to(torch.int32)
  byte = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)) & 0xFF
  return torch.where(byte > 127, byte - 256, byte).to(torch.int8)


def _spec_extract(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
  """glm130b.md §6: hi = byte >> 4 (sign-extended) is the even column, lo = (int8)(byte << 4) >> 4 the odd one;
  w = half(value) * scale, an fp16 multiply."""
  if bits == 4:
    b = weight.to(torch.int32)
    hi = b >> 4
    lo = ((b << 28) & 0xFFFFFFFF).to(torch.int64)
    lo = torch.where(lo >= 2**31, lo - 2**32, lo) >> 28
    values = torch.stack([hi.to(torch.int64), lo], dim=-1).reshape(weight.shape[0], -1)
  else:
    values = weight
  return values.half() * scale.half()[:, None]


@pytest.fixture(scope='module')
def sat_quantized():
  """{bits: (SAT model quantized by SAT's quantize() in half precision, its fp16 state before quantization)}."""
  sat_kernels = R.sat_module('quantization')
  models = {}
  for bits in (8, 4):
    sat = R.build_sat_glm130b(**PARITY_MODEL, seed=3, init_std=0.1).half()
    head_dim = PARITY_MODEL['hidden_size'] // PARITY_MODEL['num_attention_heads']
    R.set_rope_inv_freq(sat, rope.inv_freq_f32(head_dim))
    fp16_state = {k: v.clone() for k, v in sat.state_dict().items()}
    original = sat_kernels.compress_int4_weight
    sat_kernels.compress_int4_weight = _spec_pack_int4
    try:
      sat_kernels.quantize(sat, bits)
    finally:
      sat_kernels.compress_int4_weight = original
    models[bits] = sat, fp16_state
  return models


@pytest.mark.parametrize('bits', [8, 4])
def test_quantize_weight_equals_sat_quantize_bit_for_bit(sat_quantized, bits):
  sat, fp16_state = sat_quantized[bits]
  state = sat.state_dict()
  for layer in range(PARITY_MODEL['num_layers']):
    for linear in LINEARS:
      key = f'transformer.layers.{layer}.{linear}'
      q, scale = quantize.quantize_weight(fp16_state[f'{key}.weight'].numpy(), bits)
      np.testing.assert_array_equal(q, state[f'{key}.weight'].numpy(), err_msg=key)
      assert scale.dtype == np.float16
      np.testing.assert_array_equal(scale.view(np.int16), state[f'{key}.weight_scale'].numpy().view(np.int16),
                                    err_msg=key)


@pytest.mark.parametrize('bits', [8, 4])
def test_model_format_stores_sats_arrays_and_matches_its_logits(sat_quantized, bits):
  """Converting the fp16 checkpoint to the 'int{bits}' format stores SAT's q and scales (the same row order), and
  the quantized model in fp16 matches SAT's quantized model in half precision within 4 fp16 ulps of the largest
  logit, the bar of the fp16 parity test (tests/test_sat_parity.py), whose reasoning carries over: both dequantize
  to the same fp16 weights (checked here), then differ only in where fp16 activations round."""
  sat, fp16_state = sat_quantized[bits]
  config = load_config('tiny', **dict(PARITY_MODEL, max_sequence_length=2048), dtype='float16',
                       param_dtype='float16')
  sd = {k: v.float().numpy() for k, v in fp16_state.items()}
  params = weights.convert_params(from_sat_state_dict(sd, config.model), weight_specs(GLMConfig.make(config.model)),
                                  f'int{bits}')
  state = sat.state_dict()
  for linear, (module, name) in OURS.items():
    q = params['layers'][module][name]['q']
    for layer in range(PARITY_MODEL['num_layers']):
      sat_q = state[f'transformer.layers.{layer}.{linear}.weight'].numpy()
      np.testing.assert_array_equal(q[layer].reshape(sat_q.shape), sat_q)

  sat_kernels = R.sat_module('quantization')
  original = sat_kernels.extract_weight_to_half
  sat_kernels.extract_weight_to_half = _spec_extract
  try:
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, PARITY_MODEL['vocab_size'], (2, 20)).astype(np.int32)
    may = np.tril(np.ones((20, 20), bool))
    may[:, :8] = True
    case = (tokens, np.broadcast_to(np.arange(20, dtype=np.int32), (2, 20)).copy(), may[None, None])
    ref = R.sat_forward(sat, *case)[0]
  finally:
    sat_kernels.extract_weight_to_half = original
  ours = np.asarray(GLM(config.model, weight_format=f'int{bits}').apply({'params': params}, *case), np.float32)
  ulp = 2.0 ** -11 * np.abs(ref).max()
  assert np.abs(ours - ref).max() <= 4 * ulp, np.abs(ours - ref).max() / ulp


def test_int4_packing_hand_worked():
  q = np.array([[3, -2, -7, 7], [0, -1, 7, -8]], np.int8)
  packed = quantize.pack_int4(q)
  # 3 -> 0x3, -2 -> 0xE: 0x3E = 62; -7 -> 0x9, 7 -> 0x7: 0x97 = 151 = -105 as int8; 0x0F = 15; 0x78 = 120
  np.testing.assert_array_equal(packed, np.array([[62, -105], [15, 120]], np.int8))
  np.testing.assert_array_equal(quantize.unpack_int4(packed), q)


def test_quantize_hand_worked_row_and_groups():
  w = np.array([[0.7, -0.35, 0.1, 0.0], [-2.0, 1.0, 4.0, -1.0]], np.float16)
  q, scale = quantize.quantize_weight(w, 4)
  # row 0: scale = half(0.7 / 7) = half(0.1); 0.7/0.1 = 7, -0.35/0.1 = -3.5 -> -4 (ties to even), 0.1/0.1 = 1
  assert scale[0] == np.float16(np.float16(0.7) / np.float16(7))
  np.testing.assert_array_equal(quantize.unpack_int4(q)[0], [7, -4, 1, 0])
  # groups of 2 columns: row 1's groups have absmax 2 and 4
  q, scale = quantize.quantize_weight(w, 8, group_size=2)
  assert scale.shape == (2, 2)
  assert scale[1, 0] == np.float16(np.float16(2.0) / np.float16(127))
  assert scale[1, 1] == np.float16(np.float16(4.0) / np.float16(127))
  assert q[1, 0] == -127 and q[1, 2] == 127 and q[1, 3] == -32  # -1/(4/127) = -31.75 -> -32
  deq = quantize.dequantize_weight(q, scale, 8)
  assert deq.dtype == np.float16 and deq[1, 2] == np.float16(np.float16(127) * scale[1, 1])


def test_release_tensor_parallel_groups_are_per_shard_scales():
  """'int4-tp2': a row-parallel layer's scales are those of each TP shard quantized alone (glm130b.md §6, TP note);
  a column-parallel layer's are per row."""
  config = load_config('tiny', **PARITY_MODEL)
  specs = weight_specs(GLMConfig.make(config.model))
  rng = np.random.default_rng(0)
  fmt = weights.get('int4-tp2')
  for name in ('dense_kernel', 'qkv_kernel'):
    spec = specs[name]
    w = rng.normal(size=spec.checkpoint_shape).astype(np.float32)
    stored = {k: v.reshape(spec.o, -1) for k, v in fmt.convert(w, spec).items()}
    w_OxI = spec.o_by_i(w)
    if name == 'dense_kernel':
      shards = [quantize.quantize_weight(part, 4) for part in np.split(w_OxI, 2, axis=1)]
      np.testing.assert_array_equal(stored['q'], np.concatenate([s[0] for s in shards], axis=1))
      np.testing.assert_array_equal(stored['scale'], np.stack([s[1] for s in shards], axis=1))
    else:
      np.testing.assert_array_equal(stored['scale'][:, 0], quantize.quantize_weight(w_OxI, 4)[1])


def test_bad_formats_and_shapes_name_the_problem():
  with pytest.raises(ValueError, match='bit width must be 4 or 8'):
    quantize.quantize_weight(np.ones((2, 4), np.float16), 3)
  with pytest.raises(ValueError, match='odd'):
    quantize.quantize_weight(np.ones((2, 3), np.float16), 4)
  with pytest.raises(ValueError, match='group size 3 does not divide the 4 input columns'):
    quantize.quantize_weight(np.ones((2, 4), np.float16), 8, group_size=3)
  with pytest.raises(ValueError, match='unknown weight format'):
    weights.get('int5')
  config = load_config('tiny', **PARITY_MODEL)
  params = jax.tree.map(np.asarray, _random_params(config))
  with pytest.raises(ValueError, match='dense_kernel: group size 96 does not divide the 128 input columns'):
    weights.convert_params(params, weight_specs(GLMConfig.make(config.model)), 'int4-g96')


def _random_params(config):
  return init_params(GLM(config.model), config.model, jax.random.key(0))


# ---------------------------------------------------------------------------------------------------------------------
# Kernels, in interpret mode on CPU, against the reference (dequantize to the activation dtype, then matmul)


def _tolerance(x, w_deq_f32, dtype):
  """Per element: one rounding of each dequantized weight to the activation dtype (the reference rounds q * scale,
  the kernel scales the exact float32 sum: relative 2^-11 for fp16, 2^-8 for bf16, 0 for fp32, where q * scale is
  exact), plus float32 summation in another order (I * 2^-24 relative, twice), all of sum |x| |w|."""
  unit = {jnp.float16: 2.0 ** -11, jnp.bfloat16: 2.0 ** -8, jnp.float32: 0.0}[dtype]
  mass = np.abs(np.asarray(x, np.float32)) @ np.abs(w_deq_f32).T
  return (unit + 2 * x.shape[1] * 2.0 ** -24) * mass + 1e-30


CASES = [  # (bits, O, I, group, M, dtype): odd and even sizes, block multiples and not, groups or not
    (4, 37, 70, None, 1, jnp.float32),
    (4, 64, 512, 256, 3, jnp.bfloat16),
    (4, 33, 256, 128, 16, jnp.float16),
    (4, 48, 128, None, 64, jnp.float32),
    (8, 37, 70, None, 3, jnp.float16),
    (8, 64, 512, 256, 1, jnp.float32),
    (8, 40, 256, 128, 64, jnp.bfloat16),
    (8, 31, 64, None, 16, jnp.bfloat16),
]


@pytest.mark.parametrize('kernel', ['gpu', 'tpu'])
@pytest.mark.parametrize('bits,o,i,group,m,dtype', CASES)
def test_pallas_kernel_matches_dequantize_then_matmul(kernel, bits, o, i, group, m, dtype):
  rng = np.random.default_rng(o * i + m)
  q, scale = quantize.quantize_weight(rng.normal(size=(o, i)).astype(np.float16), bits, group)
  scale_OxG = scale.reshape(o, -1)
  x = jnp.asarray(rng.normal(size=(m, i)), dtype)
  # small blocks keep the interpret-mode grids short and make most shapes straddle a block edge
  blocks = kernels.Blocks(m=8 if kernel == 'tpu' else 16, n=32, k=min(group or 64, 128))
  fn = kernels.gpu_matmul if kernel == 'gpu' else kernels.tpu_matmul
  y = np.asarray(fn(x, jnp.asarray(q), jnp.asarray(scale_OxG), bits, blocks=blocks, interpret=True))
  w_deq = quantize.dequantize_weight(q, scale, bits)  # fp16, as SAT's extraction kernels
  ref = np.asarray(jnp.einsum('mi,oi->mo', x, jnp.asarray(w_deq.astype(np.float32)).astype(dtype),
                              preferred_element_type=jnp.float32))
  if dtype == jnp.float32:  # the reference in fp32 is the exact q * scale, not its fp16 rounding
    ref = np.asarray(kernels.xla_matmul(x, jnp.asarray(q), jnp.asarray(scale_OxG), bits))
  assert y.shape == (m, o) and y.dtype == np.float32
  tol = _tolerance(x, w_deq.astype(np.float32), dtype)
  assert (np.abs(y - ref) <= tol).all(), np.max(np.abs(y - ref) / tol)


def test_xla_formulation_is_the_exact_dequantized_product():
  """In fp32 the XLA product equals x @ (q * scale).T computed in float64, to float32 summation error."""
  rng = np.random.default_rng(1)
  for bits in (4, 8):
    q, scale = quantize.quantize_weight(rng.normal(size=(24, 96)).astype(np.float16), bits, 32)
    values = quantize.unpack_int4(q) if bits == 4 else q
    w64 = values.astype(np.float64) * np.repeat(scale.astype(np.float64), 32, axis=1)
    x = rng.normal(size=(5, 96)).astype(np.float32)
    y = np.asarray(kernels.xla_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), bits))
    exact = x.astype(np.float64) @ w64.T
    assert np.abs(y - exact).max() <= 96 * 2.0 ** -24 * (np.abs(x) @ np.abs(w64).T).max()


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_kernels_lower_for_their_platform(platform):
  """jax.export lowers each kernel for its target on this CPU machine: tracing and lowering errors (block shapes,
  unsupported ops) show here, not first on a TPU or GPU."""
  fn, backend = (kernels.tpu_matmul, 'tpu') if platform == 'tpu' else (kernels.gpu_matmul, 'gpu')
  checks = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  for bits, dtype, m, groups in ((4, jnp.bfloat16, 1, 1), (4, jnp.float16, 64, 4), (8, jnp.bfloat16, 256, 1),
                                 (8, jnp.float32, 16, 2)):
    o, i = 1024, 2048
    blocks = kernels.default_blocks(backend, m, None if groups == 1 else i // groups)
    assert kernels.kernel_applies(backend, bits, i, groups, blocks)
    args = (jax.ShapeDtypeStruct((m, i), dtype), jax.ShapeDtypeStruct((o, i * bits // 8), jnp.int8),
            jax.ShapeDtypeStruct((o, groups), jnp.float16))
    exported = jax.export.export(jax.jit(functools.partial(fn, bits=bits)), platforms=(platform,),
                                 disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert ('tpu_custom_call' if platform == 'tpu' else 'triton') in text, (bits, dtype, m, groups)


# ---------------------------------------------------------------------------------------------------------------------
# Quantized checkpoints and decoding


@pytest.fixture(scope='module')
def float_checkpoint(tmp_path_factory):
  import shutil  # noqa: PLC0415
  from glm_jax import save_model  # noqa: PLC0415
  from glm_jax.tokenizer import GLMTokenizer  # noqa: PLC0415
  from tests.tokenizer_fixtures import train_tiny_tokenizer  # noqa: PLC0415
  tmp = tmp_path_factory.mktemp('quantize')
  tok_path = train_tiny_tokenizer(tmp, 'compact')
  config = load_config('tiny', num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=170,
                       vocab_size=GLMTokenizer.load(tok_path).vocab_size, max_sequence_length=128)
  params = jax.tree.map(np.asarray, init_params(GLM(config.model), config.model, jax.random.key(3)))
  path = save_model(tmp / 'float', params, config)
  shutil.copy(tok_path, path / 'tokenizer.model')
  shutil.copy(tok_path.with_suffix('.json'), path / 'tokenizer.json')
  return path, params, config


def _quantize_script(*args):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  return subprocess.run([sys.executable, 'launch/quantize.py', *map(str, args)], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)


def test_offline_quantized_checkpoint_holds_the_release_arrays(float_checkpoint, tmp_path):
  from glm_jax import load_model  # noqa: PLC0415
  from quantize.checkpoint import quantize_checkpoint  # noqa: PLC0415
  path, params, config = float_checkpoint
  run = _quantize_script('--checkpoint', path, '--bits', 4, '--out', tmp_path / 'q4')
  assert run.returncode == 0 and 'wrote int4 checkpoint' in run.stdout, run.stderr
  loaded, qconfig = load_model(tmp_path / 'q4')
  assert qconfig.weight_format == 'int4' and (tmp_path / 'q4' / 'tokenizer.model').is_file()
  specs = weight_specs(GLMConfig.make(config.model))
  for module, name in OURS.values():
    for layer in range(2):
      w_OxI = specs[name].o_by_i(params['layers'][module][name][layer])
      q, scale = quantize.quantize_weight(w_OxI, 4)
      stored = loaded['layers'][module][name]
      np.testing.assert_array_equal(np.asarray(stored['q'][layer]).reshape(q.shape), q)
      np.testing.assert_array_equal(np.asarray(stored['scale'][layer]).reshape(scale.shape), scale)
  np.testing.assert_array_equal(np.asarray(loaded['word_embeddings']), params['word_embeddings'])  # kept in fp32
  np.testing.assert_array_equal(np.asarray(loaded['layers']['attention']['qkv_bias']),
                                params['layers']['attention']['qkv_bias'])  # biases kept

  # errors: one line, exit 2 (the script's); the library's ValueErrors name what is wrong
  run = _quantize_script('--checkpoint', path, '--bits', 3, '--out', tmp_path / 'x')
  assert run.returncode == 2 and run.stderr.startswith('quantize.py: error:') and '--bits' in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1
  with pytest.raises(ValueError, match=r'quantized already \(int4\)'):
    quantize_checkpoint(tmp_path / 'q4', tmp_path / 'again', 8, progress=False)
  with pytest.raises(ValueError, match='group size 48 does not divide'):
    quantize_checkpoint(path, tmp_path / 'x', 4, group_size=48, progress=False)
  assert not (tmp_path / 'x').exists()


def test_quantized_decoding_equals_the_dequantized_float_model(float_checkpoint, tmp_path):
  """Greedy tokens of the INT4 and INT8 decoders (quantized while loading, or from an offline checkpoint) equal
  those of a float32 decoder given the exact dequantized weights q * scale: the quantized product is that matmul."""
  from glm_jax.generation.api import Generator  # noqa: PLC0415
  from glm_jax.tokenizer import GLMTokenizer  # noqa: PLC0415
  from quantize.checkpoint import quantize_checkpoint  # noqa: PLC0415
  path, params, config = float_checkpoint
  tok = GLMTokenizer.load(path / 'tokenizer.model')
  specs = weight_specs(GLMConfig.make(config.model))
  prompts = ['The quick brown [MASK] jumps.', 'Once upon a time']
  for bits in (4, 8):
    quantized = Generator.load(path, quantization_bit_width=bits)
    assert quantized.decoder.weight_format == f'int{bits}'
    q_params = weights.convert_params(params, specs, f'int{bits}')

    def exact(module, name):
      stored, spec = q_params['layers'][module][name], specs[name]
      w = [np.asarray(kernels.dequantize(stored['q'][i], stored['scale'][i], bits, jnp.float32)) for i in range(2)]
      return np.stack([spec.from_o_by_i(w[i].reshape(spec.o, spec.i)) for i in range(2)])
    float_params = jax.tree.map(lambda a: a, params)
    for module, name in OURS.values():
      float_params['layers'][module][name] = exact(module, name)
    reference = Generator(float_params, config, tok)
    ours = quantized.generate(prompts, out_seq_length=40, strategy='BaseStrategy', top_k=1)
    assert ours == reference.generate(prompts, out_seq_length=40, strategy='BaseStrategy', top_k=1), bits
  quantize_checkpoint(path, tmp_path / 'q8', 8, progress=False)
  offline = Generator.load(tmp_path / 'q8')
  assert offline.decoder.weight_format == 'int8'
  assert offline.generate(prompts, out_seq_length=40, top_k=1) == Generator.load(
      path, quantization_bit_width=8).generate(prompts, out_seq_length=40, top_k=1)
  with pytest.raises(ValueError, match='quantized to 8 bits .* cannot be decoded at --quantization-bit-width 4'):
    Generator.load(tmp_path / 'q8', quantization_bit_width=4)


needs_cpu_kernels = pytest.mark.skipif(not __import__('glm_jax.cpu_kernels').cpu_kernels.available(),
                                       reason='CPU kernels not built')


def _cpu_paths():
  """(bits, path) for both widths and every path of glm_jax/csrc/quantized_matmul.cc this CPU has (none without
  the kernels)."""
  from glm_jax import cpu_kernels  # noqa: PLC0415
  return [(bits, path) for bits in (8, 4) for path in cpu_kernels.quantized_paths()]


def _cpu_product(bits, path):
  from glm_jax import cpu_kernels  # noqa: PLC0415
  return jax.jit(lambda x, q, s: cpu_kernels.quantized_matmul(x, q, s, bits, reference=kernels.xla_matmul,
                                                                path=path))


def _exact_and_bound(x, q, scale_OxG, bits):
  """x @ (q * scale).T in float64, and what the kernel may differ by: float32 summation (2 K 2^-24 sum |x w|) plus,
  for the integer paths, x rounded to 22 bits below its row's largest |x| (at most 2^-22 max|x| sum |w|)."""
  i = x.shape[1]
  values = quantize.unpack_int4(q) if bits == 4 else q
  w64 = values.astype(np.float64) * np.repeat(scale_OxG.astype(np.float64), i // scale_OxG.shape[1], axis=1)
  exact = x.astype(np.float64) @ w64.T
  bound = (2 * i * 2.0 ** -24 * (np.abs(x) @ np.abs(w64).T)
           + 2.0 ** -22 * np.abs(x).max(1, keepdims=True) * np.abs(w64).sum(1))
  return exact, bound


@needs_cpu_kernels
@pytest.mark.parametrize('bits,path', _cpu_paths())
def test_cpu_kernel_is_the_exact_dequantized_product(bits, path):
  """glm_jax/csrc/quantized_matmul.cc (in floats and, where the CPU has VNNI, in integer dot products on 256- and
  512-bit vectors) against x @ (q * scale).T in float64, for every block of rows each path picks, output rows in and
  out of its streams, groups and group tails (a group's bytes not a multiple of the vector)."""
  rng = np.random.default_rng(bits)
  product = _cpu_product(bits, path)
  for o, i, group in ((37, 70, None), (64, 512, 128), (33, 682, None), (50, 96, 24), (9, 300, 150)):
    q, scale = quantize.quantize_weight(rng.normal(size=(o, i)).astype(np.float16), bits, group)
    scale_OxG = scale.reshape(o, -1)
    for m in (1, 2, 3, 4, 7, 8, 13, 16):
      x = rng.normal(size=(m, i)).astype(np.float32)
      assert 'glm_jax_quantized_matmul' in product.lower(x, q, scale_OxG).as_text()  # the kernel, not the fallback
      exact, bound = _exact_and_bound(x, q, scale_OxG, bits)
      assert (np.abs(np.asarray(product(x, q, scale_OxG)) - exact) <= bound).all(), (o, i, group, m)


@needs_cpu_kernels
@pytest.mark.parametrize('bits,path', _cpu_paths())
def test_cpu_kernel_rows_of_any_magnitude(bits, path):
  """Rows of x at 1e-35 (whose power of two is beyond float32's), 1e30, with an outlier 1e4 times the rest, all zero,
  or holding inf / NaN (their outputs NaN); each row on its own, whatever its neighbours hold."""
  rng = np.random.default_rng(7)
  o, i = 40, 256
  q, scale = quantize.quantize_weight(rng.normal(size=(o, i)).astype(np.float16), bits)
  scale_OxG = scale.reshape(o, -1)
  x = rng.normal(size=(6, i)).astype(np.float32)
  x[0] *= np.float32(1e-35)
  x[1] *= np.float32(1e30)
  x[2, 5] = 3e4
  x[3] = 0
  x[4, 17], x[5, 3] = np.inf, np.nan
  y = np.asarray(_cpu_product(bits, path)(x, q, scale_OxG))
  exact, bound = _exact_and_bound(x[:4], q, scale_OxG, bits)
  assert (np.abs(y[:4] - exact) <= bound).all()
  assert (y[3] == 0).all()
  assert not np.isfinite(y[4:]).any()


@needs_cpu_kernels
def test_cpu_kernel_refuses_a_path_this_cpu_lacks():
  from glm_jax import cpu_kernels  # noqa: PLC0415
  x, q, scale = np.ones((1, 64), np.float32), np.zeros((4, 32), np.int8), np.ones((4, 1), np.float32)
  with pytest.raises(ValueError, match="path 'vnni1024' is not available"):
    cpu_kernels.quantized_matmul(x, q, scale, 4, reference=kernels.xla_matmul, path='vnni1024')


@needs_cpu_kernels
def test_a_compiler_without_vnni_builds_the_float_path(tmp_path):
  """A compiler that refuses the VNNI flags (an older g++) still builds the kernels, with a warning, and quantized
  products then take the float path."""
  import shutil  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  cxx = tmp_path / 'old-g++'
  cxx.write_text('#!/bin/sh\ncase "$*" in *-mavxvnni*|*-mavx512vnni*) echo "error: unrecognized option" >&2; exit 1;; esac\n'
                 f'exec {shutil.which("g++")} "$@"\n')
  cxx.chmod(0o755)
  script = """
import warnings
import numpy as np, jax
import quantize
from glm_jax import cpu_kernels
from quantize import kernels
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  assert cpu_kernels.available(), cpu_kernels._state['why']
assert any('the VNNI kernels are off' in str(w.message) for w in caught), [str(w.message) for w in caught]
print(cpu_kernels.quantized_paths())
rng = np.random.default_rng(0)
q, scale = quantize.quantize_weight(rng.normal(size=(24, 64)).astype(np.float16), 4)
x = rng.normal(size=(3, 64)).astype(np.float32)
y = jax.jit(lambda x: cpu_kernels.quantized_matmul(x, q, scale.reshape(24, 1), 4, reference=kernels.xla_matmul))(x)
w = quantize.unpack_int4(q).astype(np.float64) * scale.astype(np.float64)[:, None]  # exact, not rounded to fp16
print(float(np.abs(np.asarray(y) - x.astype(np.float64) @ w.T).max()))
"""
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=subprocess_env(CXX=str(cxx), GLM_JAX_CACHE=str(tmp_path / 'cache')))
  assert proc.returncode == 0, proc.stderr[-2000:]
  paths, error = proc.stdout.strip().splitlines()[-2:]
  assert paths == "('float',)"
  assert float(error) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Quantized SAT checkpoints (the release layout)


def _spec_quantize(w: torch.Tensor, bits: int):
  """glm130b.md §6 on one shard: scale = half(absmax_row / (2^(b-1) - 1)), q = round(w / scale) (fp16 divide,
  ties to even), INT4 packed by _spec_pack_int4."""
  scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
  q = torch.round(w / scale[:, None]).to(torch.int8)
  return (_spec_pack_int4(q) if bits == 4 else q), scale


def _release_shards(fp16_state, tp: int, bits: int):
  """A TP-split quantized SAT checkpoint written from glm130b.md §6 and §8.2 alone: column-parallel rows, row-parallel
  input columns, dense_h_to_4h GLU-interleaved ([V_r; G_r]), the rest replicated; each rank's four matrices quantized
  on its own shard."""
  shards = [{} for _ in range(tp)]
  for key, w in fp16_state.items():
    if 'rotary' in key:
      continue
    if key.endswith(('attention.dense.weight', 'dense_4h_to_h.weight')):
      parts = torch.chunk(w, tp, dim=1)
    elif key.endswith(('query_key_value.weight', 'query_key_value.bias', 'word_embeddings.weight')):
      parts = torch.chunk(w, tp, dim=0)
    elif 'dense_h_to_4h' in key:
      chunks = torch.chunk(w, 2 * tp, dim=0)
      parts = [torch.cat([chunks[r], chunks[tp + r]]) for r in range(tp)]
    else:
      parts = [w] * tp
    for r in range(tp):
      if key.endswith(tuple(LINEARS_WEIGHT)):
        shards[r][key], shards[r][key + '_scale'] = _spec_quantize(parts[r].contiguous(), bits)
      else:
        shards[r][key] = parts[r].clone()
  return shards


LINEARS_WEIGHT = tuple(f'{linear}.weight' for linear in LINEARS)


def test_quantized_sat_export_at_tp1_is_sats_own_quantized_state(sat_quantized):
  """Our int4 params exported to SAT's layout hold exactly the keys, dtypes and values of SAT's quantized model (so it
  loads them strictly), biases included."""
  from quantize import sat as quantized_sat  # noqa: PLC0415
  sat, fp16_state = sat_quantized[4]
  config = load_config('tiny', **PARITY_MODEL, dtype='float16', param_dtype='float16')
  sd = {k: v.float().numpy() for k, v in fp16_state.items()}
  params = weights.convert_params(from_sat_state_dict(sd, config.model), weight_specs(GLMConfig.make(config.model)),
                                  'int4')
  [exported] = quantized_sat.to_sat_quantized(params, config.model, 'int4', 1)
  ref = {k: v for k, v in sat.state_dict().items() if 'rotary' not in k}
  assert set(exported) == set(ref)
  for key, value in ref.items():
    ours = np.asarray(exported[key])
    if value.dtype == torch.int8:
      assert ours.dtype == np.int8, key
      np.testing.assert_array_equal(ours, value.numpy(), err_msg=key)
    else:
      np.testing.assert_array_equal(ours.astype(np.float16), value.numpy(), err_msg=key)


def test_release_tp2_int4_imports_exactly_and_exports_back(sat_quantized, tmp_path):
  """A TP-2 INT4 release checkpoint (written by _release_shards from the spec) converts to 'int4-tp2' without
  requantizing: our fp16 model's logits match SAT's fp16 model given the same weights dequantized by the spec
  (_spec_extract per shard, then merged), within the 4-ulp bar; exporting at TP 2 gives back every tensor exactly, and
  at TP 1 needs requantizing (an error naming it)."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from glm_jax import load_model  # noqa: PLC0415
  from glm_jax.model_io import read_sat_shards  # noqa: PLC0415
  from quantize import sat as quantized_sat  # noqa: PLC0415
  _, fp16_state = sat_quantized[4]
  shards = _release_shards(fp16_state, 2, 4)
  src = tmp_path / 'release'
  (src / '1').mkdir(parents=True)
  (src / 'latest').write_text('1')
  for r, shard in enumerate(shards):
    torch.save({'module': shard}, src / '1' / f'mp_rank_{r:02d}_model_states.pt')
  config_py = tmp_path / 'parity.py'
  config_py.write_text('from tests.conftest import PARITY_MODEL, load_config\n\n\ndef get_config():\n'
                       "  return load_config('tiny', **dict(PARITY_MODEL, max_sequence_length=2048), dtype='float16', "
                       "param_dtype='float16')\n")
  run = subprocess.run([sys.executable, 'launch/convert_sat.py', '--from-sat', src, '--config', config_py,
                        '--out', tmp_path / 'ours'], cwd=REPO, env=subprocess_env(PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and '(weights int4-tp2)' in run.stdout, run.stderr
  params, config = load_model(tmp_path / 'ours')
  assert config.weight_format == 'int4-tp2'

  # the same model in fp16 in SAT: each shard dequantized by the spec, merged as §8.2
  merged = {}
  for key in shards[0]:
    if key.endswith('_scale'):
      continue
    if key.endswith(LINEARS_WEIGHT):
      parts = [_spec_extract(s[key], s[key + '_scale'], 4) for s in shards]
    else:
      parts = [s[key] for s in shards]
    if key.endswith(('attention.dense.weight', 'dense_4h_to_h.weight')):
      merged[key] = torch.cat(parts, dim=1)
    elif key.endswith(('query_key_value.weight', 'query_key_value.bias', 'word_embeddings.weight')):
      merged[key] = torch.cat(parts, dim=0)
    elif 'dense_h_to_4h' in key:
      merged[key] = torch.cat([torch.chunk(p, 2)[0] for p in parts] + [torch.chunk(p, 2)[1] for p in parts])
    else:
      merged[key] = parts[0]
  sat = R.build_sat_glm130b(**PARITY_MODEL, seed=3, init_std=0.1).half()
  head_dim = PARITY_MODEL['hidden_size'] // PARITY_MODEL['num_attention_heads']
  R.set_rope_inv_freq(sat, rope.inv_freq_f32(head_dim))
  sat.load_state_dict(merged, strict=False)
  rng = np.random.default_rng(8)
  tokens = rng.integers(0, PARITY_MODEL['vocab_size'], (2, 16)).astype(np.int32)
  case = (tokens, np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy(),
          np.tril(np.ones((16, 16), bool))[None, None])
  ref = R.sat_forward(sat, *case)[0]
  ours = np.asarray(GLM(config.model, weight_format='int4-tp2').apply({'params': params}, *case), np.float32)
  assert np.abs(ours - ref).max() <= 4 * 2.0 ** -11 * np.abs(ref).max()

  run = subprocess.run([sys.executable, 'launch/convert_sat.py', '--to-sat', tmp_path / 'ours', '--tp', '2',
                        '--out', tmp_path / 'back'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr
  back = read_sat_shards(tmp_path / 'back')
  for r in range(2):
    assert set(back[r]) == set(shards[r])
    for key, value in shards[r].items():
      assert back[r][key].dtype == value.dtype, key
      assert torch.equal(back[r][key], value), key
  with pytest.raises(ValueError, match='2 scale group.*needs 1.*requantize'):
    quantized_sat.to_sat_quantized(params, config.model, 'int4-tp2', 1)
  requantized = quantized_sat.to_sat_quantized(params, config.model, 'int4-tp2', 1, requantize=True)[0]
  key = 'transformer.layers.0.attention.dense.weight'
  w16 = torch.cat([_spec_extract(s[key], s[key + '_scale'], 4) for s in shards], dim=1)
  q, scale = _spec_quantize(w16, 4)
  np.testing.assert_array_equal(requantized[key], q.numpy())
  np.testing.assert_array_equal(requantized[key + '_scale'], scale.numpy())


@pytest.mark.parametrize('fmt,mesh_sizes', [('int4', dict(data=2, fsdp=2, tensor=2)),
                                            ('int4-tp2', dict(data=4, fsdp=1, tensor=2))])
def test_quantized_weights_shard_by_the_float_axes(fmt, mesh_sizes):
  """On a mesh, q's rows split with the output axis and its (packed) columns with the input axis, the scales' groups
  with the input axis: tensor parallelism gives column-parallel layers their rows and row-parallel ones their input
  groups (with 'int4-tp2', each device holds its own shard's scales). The forward equals one device's."""
  from glm_jax import axis_rules, make_mesh  # noqa: PLC0415
  from glm_jax.sharding import activate, abstract_params, batch_sharding, shardings_for  # noqa: PLC0415
  config = load_config('tiny', num_layers=2, vocab_size=512, inner_hidden_size=680)
  config.mesh.update(mesh_sizes)
  specs = weight_specs(GLMConfig.make(config.model))
  params = weights.convert_params(jax.tree.map(np.asarray, _random_params(config)), specs, fmt)
  model = GLM(config.model, weight_format=fmt)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (8, 16), dtype=np.int32)
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()
  mask = np.broadcast_to(np.tril(np.ones((16, 16), bool)), (8, 1, 16, 16)).copy()
  forward = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))
  ref = np.asarray(forward(params, tokens, positions, mask))

  mesh, rules = make_mesh(config.mesh), axis_rules(config)
  placed = jax.device_put(params, shardings_for(abstract_params(model, config.model), mesh, rules))
  t, d = mesh_sizes['tensor'], mesh_sizes['fsdp']
  attention, mlp = placed['layers']['attention'], placed['layers']['mlp']
  shard = lambda a: a.addressable_shards[0].data.shape  # noqa: E731
  # qkv [L, N, 3, H, D/2]: heads over tensor, packed input (embed) over fsdp
  assert shard(attention['qkv_kernel']['q']) == (2, 4 // t, 3, 64, 128 // d)
  # h_to_4h [L, 2, F, D/2]: the GeGLU width over tensor (matching value and gate rows on each device)
  assert shard(mlp['h_to_4h_kernel']['q']) == (2, 2, 680 // t, 128 // d)
  # dense (row-parallel) [L, D, N*H/2]: rows (embed) over fsdp, packed input (heads) over tensor, scale groups too
  assert shard(attention['dense_kernel']['q']) == (2, 256 // d, 128 // t)
  groups = 2 if fmt == 'int4-tp2' else 1
  assert shard(attention['dense_kernel']['scale']) == (2, 256 // d, groups // t if groups > 1 else 1)
  assert shard(mlp['4h_to_h_kernel']['q']) == (2, 256 // d, 340 // t)
  with activate(mesh, rules):
    args = [jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in (tokens, positions, mask)]
    out = np.asarray(forward(placed, *args))
  assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
