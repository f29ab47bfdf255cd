"""Train a GLM from scratch with GLM-130B's objective, on one CPU or a device mesh; rerun to resume.

    python launch/train.py --config configs/tiny.py                       # the quickstart: tokenizer + tiny model
    python launch/train.py --config configs/tiny.py --workdir runs/t2 --config.run.steps=1000 --config.mesh.fsdp=2
    python launch/train.py --config configs/small.py --config.data.corpus_paths=/my/corpus
    python launch/train.py --config configs/tiny.py --workdir runs/ft --config.run.init_from=runs/tiny \
        --config.data.corpus_paths=/my/text --config.mesh.data=2       # fine-tune: another run's weights, any mesh

The run directory (--workdir, default runs/<config name>) receives checkpoints, metrics.jsonl, TensorBoard events
and, unless --config.run.tokenizer names one, a tokenizer trained on the corpus. Rerunning the same command resumes
from the latest complete checkpoint and continues exactly as if the run had not stopped; SIGTERM or Ctrl-C saves
and stops. With --config.run.init_from=CKPT (a model checkpoint, converted from SAT or trained here, or a run
directory) a new run starts from those parameters, on any mesh, with a fresh optimizer and the checkpoint's tokenizer;
the model config must describe the same shapes (a mismatch names the parameter). Draw the curves with
`python launch/plot.py <workdir> --out curves.png`.

Many processes (hosts): each finds its process id, the process count and the coordinator in Slurm's, a TPU
worker's or JAX_* variables, or in --coordinator=HOST:PORT --num-processes=N --process-id=I (which win), and gives up
with a one-line error after --init-timeout seconds without all of them (README "Many hosts"; launch/slurm_train.sh,
launch/tpu_pod_train.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glm_jax import cli, distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py; override any field '
                                          'with --config.<group>.<field>=value.', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config file name>).')
_DISTRIBUTED = distributed.define_flags()  # many processes: --coordinator, --num-processes, --process-id
flags.adopt_module_key_flags(distributed)  # listed by --help


def _tokenizer(config, workdir: Path):
  """The run's tokenizer (glm_jax.tokenizer.tokenizer_path's policy: config.run.tokenizer if set, else the one in
  the workdir), else that of config.run.init_from's checkpoint (recorded as config.run.tokenizer), else one trained
  there."""
  from glm_jax.tokenizer import GLMTokenizer, tokenizer_path
  from glm_jax.tokenizer_training import train_tokenizer_on_training_split
  distributed.barrier('tokenizer-look')  # many processes: all look before process 0 may write one
  found = tokenizer_path(workdir, configured=config.run.tokenizer, required=False)
  if found is None and config.run.init_from:
    from glm_jax.generation.api import tokenizer_path as checkpoint_tokenizer
    found = checkpoint_tokenizer(config.run.init_from)
    config.run.tokenizer = str(found.resolve())
  if found is not None:
    return GLMTokenizer.load(found)
  own = workdir / 'tokenizer.model'
  if distributed.is_primary():  # the others read it from the shared run directory
    print(f'training a {config.run.tokenizer_vocab_size}-piece tokenizer on the training split of '
          f'{list(config.data.corpus_paths)} -> {own}')
    train_tokenizer_on_training_split(list(config.data.corpus_paths), config.run.tokenizer_vocab_size,
                                      workdir / 'tokenizer', heldout_fraction=config.data.heldout_fraction,
                                      strip_gutenberg=config.data.strip_gutenberg, layout='compact', seed=config.seed)
  distributed.barrier('tokenizer-written')
  return GLMTokenizer.load(own)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise cli.UsageError('--config is required, e.g. --config configs/tiny.py')
  config_name = Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem
  distributed.initialize_from_flags(_DISTRIBUTED)  # before anything touches a JAX backend
  return _train(config, Path(_WORKDIR.value or Path('runs') / config_name))


def _train(config, workdir: Path) -> int:
  import jax

  from glm_jax.data.corpus import load_corpus
  from glm_jax.data.pipeline import TrainBatches, heldout_batches
  from glm_jax.train import loop

  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = _tokenizer(config, workdir)
  if config.model.vocab_size != tokenizer.vocab_size:
    config.model.vocab_size = tokenizer.vocab_size  # the vocabulary comes from the tokenizer (configs/tiny.py)
  t = config.train
  corpus = load_corpus(list(config.data.corpus_paths), tokenizer, heldout_fraction=config.data.heldout_fraction,
                       strip_gutenberg=config.data.strip_gutenberg)
  batches = TrainBatches(config.data, tokenizer, t.seq_len, t.batch_size, config.seed, corpus=corpus)
  print(f'corpus: {corpus.train_tokens.size:,} training tokens, {corpus.num_heldout_bytes:,} held-out bytes; '
        f'model vocabulary {config.model.vocab_size}; workdir {workdir}')
  summary = loop.run(config, workdir, tokenizer=tokenizer, train_batches=batches,
                     heldout_fn=lambda: heldout_batches(corpus, tokenizer, t.seq_len, config.run.eval_batch_size))
  if not distributed.is_primary():
    return 0
  if 'heldout_bpb' in summary:
    from glm_jax.data.baselines import heldout_baselines
    print(f"step {summary['step']}: held-out loss {summary['heldout_loss']:.4f} nats/token, "
          f"bits per byte {summary['heldout_bpb']:.4f}")
    others = ', '.join(f'{k} {v:.4f}' for k, v in heldout_baselines(corpus, config.model.vocab_size).items())
    print(f'  the same {corpus.num_heldout_bytes:,} held-out bytes, in bits per byte: {others}')
  if config.run.sample_prompts and jax.process_count() > 1:
    print(f'samples: python launch/generate.py on {workdir} (not sampled here, in a run of many processes)')
  elif config.run.sample_prompts:
    from glm_jax.generation import Generator
    gen = Generator.load(workdir, tokenizer)
    print('samples (top-p 0.7, seed 1234):')
    for prompt in config.run.sample_prompts:
      print(f'  {prompt}\n    -> {gen.generate(prompt, out_seq_length=64)}')
  return 0


if __name__ == '__main__':
  cli.run(main)
