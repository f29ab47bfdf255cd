"""GLM-130B as released: 70 layers, hidden 12288, 96 heads, GeGLU 32768, vocabulary 150528, fp16.

Numerics follow the published checkpoint: the fp16-chain rotary table of SAT 0.2 (glm130b.md §2.4, §10.1) and
fp16 compute and storage. `python launch/inspect_model.py --config configs/glm_130b.py` prints its parameter table.
"""

from glm_jax.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 70
  m.hidden_size = 12288
  m.num_attention_heads = 96
  m.inner_hidden_size = 32768
  m.vocab_size = 150528
  m.max_sequence_length = 2048
  m.rope_precision = 'fp16_chain'
  m.dtype = 'float16'
  m.param_dtype = 'float16'
  # The released checkpoint was split 8 ways by tensor parallelism for inference on one 8-GPU node.
  config.mesh.data = 1
  config.mesh.tensor = 8
  return config
