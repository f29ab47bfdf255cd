"""GLM-130B's weight-only INT8 / INT4 quantization for glm-jax.

- `quantize_weight(w, bits, group_size=None) -> (q, scale)`, `dequantize_weight(q, scale, bits)`, `pack_int4`,
  `unpack_int4`: the release's format on numpy arrays (quantize/format.py).
- The weight formats 'int8', 'int4', 'int4-g128', 'int4-tp8', ... (quantize/formats.py), registered with
  glm_jax.weights: `GLM(config.model, weight_format='int4')`, `weights.convert_params(params, specs, 'int4')`.
- The fused dequantize-matmul kernels, Pallas for GPU and TPU and the XLA fallback (quantize/kernels.py).
"""

from quantize.format import dequantize_weight, pack_int4, quantize_weight, unpack_int4
from quantize.formats import format_name, is_quantized

__all__ = ['quantize_weight', 'dequantize_weight', 'pack_int4', 'unpack_int4', 'format_name', 'is_quantized']
