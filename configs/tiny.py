"""A tiny GLM for tests, notebooks and the CPU quickstart: 4 layers, hidden 256, 4 heads, GeGLU 682, fp32.

The vocabulary size comes from the tokenizer the model is used with; 16384 stands until one is given.
"""

from glm_jax.config import default_config


def get_config():
  config = default_config()
  m = config.model
  m.num_layers = 4
  m.hidden_size = 256
  m.num_attention_heads = 4
  m.inner_hidden_size = 682
  m.vocab_size = 16384
  m.max_sequence_length = 512
  m.rope_precision = 'fp32'
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  # The CPU quickstart: a few minutes of training on the sample corpus.
  t = config.train
  t.batch_size = 8
  t.seq_len = 128
  t.learning_rate = 2e-3
  t.warmup_steps = 30
  t.decay_steps = 400
  r = config.run
  r.steps = 400
  r.log_every = 10
  r.eval_every = 200
  r.save_every = 100
  r.sample_prompts = ('KING RICHARD: My lord, the [MASK] is come.', 'First Citizen:', '宝玉听了，')
  return config
