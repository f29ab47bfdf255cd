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
  # --- layout of the layers ---------------------------------------------------------------------------------------
  # True: one scanned block with every layer parameter stacked along a leading 'layers' axis (params['layers']):
  # one compiled layer whatever num_layers, the layout of training and of checkpoints. False: L separate blocks
  # params['layers_0'] ... (glm_jax.weights.unstack_layers converts), no per-layer weight copy out of the stack:
  # faster inference, longer compiles. Decoding always runs unstacked (glm_jax/generation/decode.py).
  m.scan_layers = True
  return m


def mesh_defaults() -> ml_collections.ConfigDict:
  """Mesh axis sizes. One axis may be -1: it takes all the devices the others leave."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # pure data parallelism: batch split, parameters replicated
  mesh.fsdp = 1  # fully sharded data parallelism: batch split, parameters split over their 'embed' axis
  mesh.tensor = 1  # tensor (model) parallelism: heads, GeGLU width and vocabulary split
  # pipeline stages (glm_jax/pipeline.py): each holds ceil(num_layers / stage) consecutive layers, micro-batches
  # stream through them (config.train.pipeline_microbatches)
  mesh.stage = 1
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
  config.train = train_defaults()
  config.data = data_defaults()
  config.run = run_defaults()
  config.seed = 0  # parameter initialisation, dropout and the data order all derive from it
  return config


def train_defaults() -> ml_collections.ConfigDict:
  """The `config.train` fields: optimiser, schedule, batch, Embedding Gradient Shrink, loss scaling.

  Values are GLM-130B's starting configuration (glm130b.md §3.2-3.3, PAPER Table 11); the run itself changed the
  learning rate and the EGS alpha later (§10 item 19). Tiny and small configs override the sizes and the rate.
  Step counts are optimiser updates (one update = one global batch, after gradient accumulation); the schedules
  count *applied* updates, so a step skipped for non-finite gradients does not advance them.
  """
  t = ml_collections.ConfigDict()
  # --- AdamW (decoupled weight decay, no decay on biases and LayerNorm parameters; the embedding is decayed) --------
  t.learning_rate = 8e-5  # peak learning rate: GLM-130B's 8e-5
  t.min_lr_ratio = 0.1  # cosine floor = learning_rate * min_lr_ratio (GLM-130B: 8e-6, i.e. 0.1)
  t.warmup_steps = 260  # linear warm-up from 0 to learning_rate (GLM-130B: 0.5% of samples, ~1.1M / 4224)
  t.decay_steps = 46817  # the floor is reached at this update, warm-up included (GLM-130B: ~197.8M samples / 4224)
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.clip_norm = 1.0  # global-norm clipping of the (EGS-shrunk, unscaled) gradients; 0 = off
  # --- batch ----------------------------------------------------------------------------------------------------------
  t.batch_size = 4224  # global batch (sequences per update); GLM-130B: 4224
  t.seq_len = 2048
  # Micro-batches per update, run as a scan inside the jitted step; batch_size must be divisible by it (and each
  # micro-batch by the data x fsdp mesh size). The loss is the mean over all loss tokens of the global batch,
  # whatever this value (see glm_jax/train/step.py).
  t.grad_accum_steps = 1
  # With config.mesh.stage > 1: micro-batches streamed through the pipeline stages per forward (of each
  # accumulation micro-batch). GPipe idles (stage - 1) / (pipeline_microbatches + stage - 1) of the stage time, so
  # more is better, down to micro-batches of one row per data x fsdp device; 0 = as many as stages.
  t.pipeline_microbatches = 0
  # --- Embedding Gradient Shrink (only the gradient through the input lookup is multiplied by alpha) --------------
  t.egs_alpha = 0.1  # GLM-130B's shrink_embedding_gradient_alpha; 1.0 = EGS off
  # Optional linear warm-up of alpha from egs_alpha to 1 over egs_warmup_steps updates starting at update
  # egs_warmup_start (GLM-130B did this from step ~6000 over 500 steps, `--shrink-embedding-gradient-steps 6000 500`).
  # egs_warmup_steps = 0: alpha stays at egs_alpha.
  t.egs_warmup_start = 0
  t.egs_warmup_steps = 0
  # --- dynamic loss scaling: used automatically when config.model.dtype == 'float16' (GLM-130B's fp16 run) --------
  t.loss_scale_init = 65536.0  # 2^16
  t.loss_scale_window = 2000  # the scale doubles after this many consecutive finite steps
  t.loss_scale_hysteresis = 2  # overflows tolerated before the scale is halved (reset when the scale grows)
  t.loss_scale_min = 1.0
  return t


def data_defaults() -> ml_collections.ConfigDict:
  """The `config.data` fields: corpora, GLM-130B's objective mix (glm130b.md §3.4) and the held-out split.

  Read by `glm_jax.data.TrainBatches` / `heldout_batches` (see glm_jax/data/). The shared data folder is
  `<repository>/../shared/data`, or `$GLM_JAX_DATA` when set.
  """
  import os
  from pathlib import Path

  data_root = Path(os.environ.get('GLM_JAX_DATA') or Path(__file__).resolve().parents[2] / 'shared' / 'data')
  d = ml_collections.ConfigDict()
  # Pre-training text: files or folders (searched recursively for .txt / .jsonl with a "text" field). A
  # comma-separated string is accepted too, e.g. --config.data.corpus_paths=/data/a,/data/b.
  d.corpus_paths = tuple(str(data_root / name) for name in ('tinyshakespeare', 'gutenberg_en', 'classics_zh'))
  d.data_root = str(data_root)  # where build_instruction_set finds FewCLUE / XCOPA-zh / MMLU when mip_path is ''
  d.strip_gutenberg = True  # keep only the text between Project Gutenberg's *** START OF / *** END OF lines
  d.heldout_fraction = 0.01  # the last 1% of each corpus file (cut at a line boundary): evaluation only
  # Objectives, per sequence (§3.4).
  d.mask_prob = 0.3  # P([MASK] span corruption) for a self-supervised sequence; the rest are [gMASK]
  d.mask_ratio = 0.15  # [MASK]: fraction of a sample's source tokens covered by spans
  d.poisson_lambda = 3.0  # [MASK]: span lengths ~ max(1, Poisson(lambda))
  d.short_seq_prob = 0.02  # [MASK]: P(a sample is cut to a random shorter length, at least 32 tokens)
  d.single_span_prob = 0.02  # [MASK]: P(a sample masks one Poisson-length span instead of 15% of its tokens)
  d.min_gmask_ratio = 0.2  # [gMASK]: masked tail length ~ uniform [ceil(ratio * n), n - 1]
  d.samples_per_sequence = 4  # [MASK] and MIP samples are seq_len // this long, packed this many to a sequence
  # Multi-task instruction pre-training.
  d.mip_share = 0.05  # share of sequences (hence of token positions) holding instruction samples
  # MIP jsonl file or folder of them ({"inputs_pretokenized", "targets_pretokenized"}); '' = build from data_root.
  d.mip_path = ''
  return d


def run_defaults() -> ml_collections.ConfigDict:
  """The `config.run` fields: length of the run, logging, evaluation, checkpoints, tokenizer (launch/train.py)."""
  r = ml_collections.ConfigDict()
  r.steps = 1000  # optimiser updates in the whole run (a resumed run continues up to this)
  r.log_every = 10  # steps between metric records (metrics.jsonl, TensorBoard, the progress bar)
  r.eval_every = 250  # steps between held-out evaluations (loss and bits per byte over the whole held-out split)
  r.eval_batch_size = 8  # held-out windows per evaluation batch
  r.save_every = 250  # steps between checkpoints (always one at the end, and on SIGTERM)
  r.keep_checkpoints = 3  # the newest N complete checkpoints are kept
  r.tensorboard = True  # also write TensorBoard event files (metrics.jsonl is always written)
  r.peak_flops = 0.0  # the machine's peak FLOP/s for model FLOP utilisation; 0 = measure an fp32 matmul at start
  r.tokenizer = ''  # a GLMTokenizer .model file; '' = the run directory's own, trained on the corpus if missing
  # fine-tuning: a model checkpoint or run directory whose parameters a new run starts from (on any mesh), with a
  # fresh optimizer; ignored once the run has a checkpoint of its own (it resumes from that)
  r.init_from = ''
  r.tokenizer_vocab_size = 8182  # pieces of a tokenizer trained by the run (+10 specials = 8192 ids)
  # launch/train.py ends by printing the trained model's answer to each of these prompts (GLM-130B's generate.py
  # defaults: top-p 0.7 sampling, seed 1234; a prompt without a mask is continued after [gMASK]); () = none.
  r.sample_prompts = ()
  return r
