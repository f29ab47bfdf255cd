"""Model sizes: parameter counts, and FLOPs per token (the numerator of model FLOP utilisation and of the benchmarks'
compute bounds)."""

from __future__ import annotations

import jax
import numpy as np


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def forward_flops_per_token(cfg, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token at sequence length seq_len (full S x S attention).

  Per layer: QKV 2*D*3D, attention output 2*D*D, GeGLU 2*D*2F + 2*F*D, scores and context 2*2*S*D;
  plus the tied output projection 2*D*V. Elementwise work (LayerNorm, softmax, GELU, RoPE) is not counted.
  """
  d, f, v = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
  per_layer = 2 * (3 * d * d + d * d + 2 * d * f + f * d) + 4 * seq_len * d
  return cfg.num_layers * per_layer + 2 * d * v


def train_flops_per_token(cfg, seq_len: int) -> float:
  """Forward plus backward (twice the forward), without rematerialisation: the model FLOPs of MFU."""
  return 3 * forward_flops_per_token(cfg, seq_len)
