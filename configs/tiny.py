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
  # A DeepNorm (post-LN) model this small plateaus at the unigram level (held-out 7.58 nats/token at step 200, 7.53
  # at 400) with the peak learning rate 2e-3 and GLM-130B's init std (3 * hidden)^-1/2 = 0.036. Measured on the
  # quickstart (200 steps, decay over 200; held-out nats/token): lr 5e-4 7.08, 2e-4 7.42; lr 5e-4 with init_std
  # 0.02 6.96, lr 1e-3 with 0.02 6.89, with 0.01 6.98; the full 400-step quickstart with lr 1e-3, init_std 0.02:
  # 6.64 nats/token = 2.98 bits per byte, below bzip2 -9 (3.10) on the same held-out bytes. (EGS off: no change.)
  # Longer runs want a lower peak: 3000 steps (decay_steps 3000) at lr 1e-3 spike (gradient norms up to ~450) and
  # end at 3.08 bits per byte; at lr 5e-4 with 100 warm-up steps they reach 2.75 at step 1000 and 2.58 at 3000:
  #   --config.run.steps=3000 --config.train.decay_steps=3000 --config.train.learning_rate=5e-4
  #   --config.train.warmup_steps=100
  m.init_std = 0.02
  # The CPU quickstart: a few minutes of training on the sample corpus.
  t = config.train
  t.batch_size = 8
  t.seq_len = 128
  t.learning_rate = 1e-3
  t.warmup_steps = 30
  t.decay_steps = 400
  r = config.run
  r.steps = 400
  r.log_every = 10
  r.eval_every = 200
  r.save_every = 100
  r.sample_prompts = ('KING RICHARD: My lord, the [MASK] is come.', 'First Citizen:', '宝玉听了，')
  return config
