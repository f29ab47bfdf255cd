"""Default configuration shared by every file in `configs/`.

A config is an ml-collections `ConfigDict` with three parts that this module owns:

- `config.model`: the architecture. The first eight fields carry GLM-130B's / SAT's own names; the rest are
  glm-jax choices (numerics, dropout, initialisation, rematerialisation).
- `config.mesh`: the device mesh shape, one entry per named mesh axis.
- `config.axis_rules`: the list that maps the model's logical axis names to mesh axes (MaxText style).
  Switching between data parallelism, FSDP and tensor parallelism is a change of `config.mesh` (and, if wanted,
  of these rules); the model never changes.

Every field can be overridden on the command line, e.g. `--config.model.num_layers=4 --config.mesh.tensor=2`.
"""

from __future__ import annotations

import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
  """The `config.model` fields, with GLM-130B's values where they are fixed by the architecture."""
  m = ml_collections.ConfigDict()
  # --- named as GLM-130B and SAT name them -----------------------------------------------------------------------
  m.num_layers = 70
  m.hidden_size = 12288
  m.num_attention_heads = 96
  m.inner_hidden_size = 32768  # GeGLU width f; dense_h_to_4h has 2f outputs (value half, then gelu half)
  m.vocab_size = 150528  # embedding rows (tied with the output projection)
  m.max_sequence_length = 2048  # no learned position table: sets the size of the rotary table only
  m.position_encoding_2d = False  # True: ChatGLM-style 2-D RoPE, position_ids [b, 2, s]
  m.layernorm_epsilon = 1e-5
  # --- numerics ----------------------------------------------------------------------------------------------------
  # Rotary table precision: 'fp32' (SAT 0.4.x) or 'fp16_chain' (SAT 0.2.x, what GLM-130B's published
  # checkpoint and numbers used: fp16 inv_freq x fp16 positions, an fp16 product, fp16 cos/sin).
  m.rope_precision = 'fp32'
  m.dtype = 'float32'  # compute dtype: float32 | bfloat16 | float16. Softmax and LayerNorm stats are always fp32
  m.param_dtype = 'float32'  # storage dtype of the parameters
  # --- training-only behaviour ---------------------------------------------------------------------------------------
  m.hidden_dropout = 0.0  # after the attention output and the MLP output (GLM-130B trained with 0.1)
  m.attention_dropout = 0.0  # on the attention probabilities (GLM-130B: 0.1)
  m.embedding_dropout = 0.0  # on the input embedding (GLM-130B: 0.1)
  # DeepNorm initialisation (glm130b.md §3.1): Xavier-normal with gain (2N)^-1/2 on both FFN matrices, the value
  # projection and the attention output; N(0, init_std) elsewhere. 0.0 means (3 * hidden_size)^-1/2, which is
  # GLM-130B's 0.0052 at hidden 12288.
  m.init_std = 0.0
  # Rematerialisation of each transformer block in the backward pass: 'none' (keep all activations),
  # 'full' (recompute the whole block, as GLM-130B's checkpoint_activations), or 'dots' (keep matmul outputs).
  m.remat_policy = 'none'
  return m


def mesh_defaults() -> ml_collections.ConfigDict:
  """Mesh axis sizes. One axis may be -1: it takes all the devices the others leave."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # pure data parallelism: batch split, parameters replicated
  mesh.fsdp = 1  # fully sharded data parallelism: batch split, parameters split over their 'embed' axis
  mesh.tensor = 1  # tensor (model) parallelism: heads, GeGLU width and vocabulary split
  mesh.stage = 1  # reserved for pipelining: the stacked layer axis is mapped to it
  return mesh


def axis_rules_defaults() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Logical axis name -> mesh axis (or axes, or None for replicated). The first matching rule wins."""
  return (
      # parameters
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('kv', None),
      ('qkv', None),
      ('glu', None),
      ('norm', None),
      ('layers', 'stage'),
      # activations
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('act_embed', None),
      ('act_heads', 'tensor'),
      ('act_mlp', 'tensor'),
      ('act_vocab', 'tensor'),
      ('cache_length', None),
  )


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_defaults()
  config.mesh = mesh_defaults()
  config.axis_rules = axis_rules_defaults()
  config.seed = 0
  return config
