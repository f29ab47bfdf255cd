"""A small GLM (about 100M parameters with a 16k vocabulary): 12 layers, hidden 768, 12 heads, GeGLU 2048, fp32.

The vocabulary size comes from the tokenizer the model is used with; 16384 stands until one is given.
"""

from glm_jax.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 12
  m.hidden_size = 768
  m.num_attention_heads = 12
  m.inner_hidden_size = 2048
  m.vocab_size = 16384
  m.max_sequence_length = 1024
  m.rope_precision = 'fp32'
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  # Keep only matmul outputs for the backward pass and recompute the rest: on CPU the scanned layers then stack far
  # fewer residuals, and a train step is about 8% faster (benchmarks/train_step.py: MFU 52% against 48% with 'none').
  m.remat_policy = 'dots'
  t = config.train
  t.batch_size = 16
  t.seq_len = 512
  t.learning_rate = 6e-4
  t.warmup_steps = 200
  t.decay_steps = 5000
  config.run.steps = 5000
  return config
