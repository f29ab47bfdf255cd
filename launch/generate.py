"""Generate text with a GLM checkpoint: GLM-130B's generate.py (glm130b.md §5), in JAX.

    python launch/generate.py --checkpoint runs/tiny                                   # interactive
    python launch/generate.py --checkpoint runs/tiny --input-source prompts.txt        # file -> samples/prompts.jsonl
    python launch/generate.py --checkpoint glm130b-jax --tokenizer ice_text.model \\
        --sampling-strategy BeamSearchStrategy --num-beams 4 --out-seq-length 128

--checkpoint is a glm-jax (Orbax) checkpoint: a training run's directory (launch/train.py --workdir; its tokenizer
is <run>/tokenizer.model) or a model checkpoint converted from SAT (launch/convert_sat.py; pass --tokenizer).

A prompt is filled as GLM-130B does (glm_jax/generation/blanks.py): its [MASK] blanks (else [sMASK], else a [gMASK]
appended at the end, i.e. a continuation) are generated one after another; the answer is the whole text with every
blank filled.

Interactive mode reads one prompt per line from stdin, prints "Input: ..." (the prompt as the model sees it) and
"Output: ..." with the answer streamed as it is generated (beam search: printed when done); 'stop' or end of input
ends the session. A rejected prompt (empty, too long) prints one error line and the session goes on; the exit status
is then 2.

File mode (--input-source FILE) reads one prompt per line (blank lines are skipped; with --with-id each line is
"id<TAB>prompt"), checks every prompt before generating, shows a progress bar on stderr, prints each answer, and
writes <output-path>/<FILE's name without its suffix>.jsonl, one JSON object per prompt, in input order:
    {"line": 3, "id": "q7", "input": "...", "output": "...", "blanks": ["..."], "beams": ["...", ...]}
"id" only with --with-id; "beams" (every beam's answer, best first) only with BeamSearchStrategy. The file is written
through a temporary file and a rename when every prompt is done, so it is never left half written. Every prompt uses
--seed, so an answer does not depend on the other lines.

Mesh: --config.mesh.<axis>=N (axes data, fsdp, tensor, stage; one may be -1 for the devices the others leave)
decodes on a device mesh, the weights split by the checkpoint config's axis rules (heads, GeGLU width and vocabulary
over tensor), the prompts over data; e.g. --config.mesh.tensor=8. Without it: the default device.

Errors (bad flags or values, a missing checkpoint, tokenizer or input file, a bad prompt in the file, a mesh that
cannot split the model) print one line "generate.py: error: ..." and exit with status 2. Flags are checked before
the checkpoint is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from glm_jax import cli  # noqa: E402
from glm_jax.files import atomic_write  # noqa: E402

PROG = 'generate.py'
PROMPT = "Please input a prompt ('stop' to exit) >>> "
UsageError = cli.UsageError

# GLM-130B's generate.py flag names and defaults.
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'glm-jax (Orbax) checkpoint: a training run directory or a '
                                  'model checkpoint (e.g. converted from SAT).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'SentencePiece .model file (default: the checkpoint\'s own).')
_QUANTIZATION = flags.DEFINE_enum('quantization-bit-width', None, ['4', '8'], 'Quantize the four matrices of every '
                                  'layer to INT4 or INT8 as GLM-130B does, one layer at a time while loading (a '
                                  'checkpoint written by launch/quantize.py is quantized already).')
_INPUT_SOURCE = flags.DEFINE_string('input-source', 'interactive', "'interactive' (prompts from stdin, answers "
                                    'streamed) or a text file with one prompt per line.')
_OUTPUT_PATH = flags.DEFINE_string('output-path', 'samples', 'File mode: directory receiving <input file name>.jsonl.')
_OUT_SEQ_LENGTH = flags.DEFINE_integer('out-seq-length', 256, 'Maximum length of the whole sequence, the prompt '
                                       'included, for each blank.')
_MIN_GEN_LENGTH = flags.DEFINE_integer('min-gen-length', 0, 'Minimum number of tokens generated per blank (end '
                                       'tokens are banned until then).')
_STRATEGY = flags.DEFINE_enum('sampling-strategy', 'BaseStrategy', ['BaseStrategy', 'BeamSearchStrategy'],
                              'BaseStrategy: sampling with --temperature/--top_k/--top_p (--top_k 1 is greedy). '
                              'BeamSearchStrategy: beam search with --num-beams/--length-penalty/'
                              '--no-repeat-ngram-size.')
_NUM_BEAMS = flags.DEFINE_integer('num-beams', 4, 'Beam search: number of beams.')
_LENGTH_PENALTY = flags.DEFINE_float('length-penalty', 1.0, 'Beam search: exponent of the length penalty '
                                     "((5 + length) / 6) ** length_penalty that divides a finished beam's "
                                     'log-probability; larger values favour longer answers.')
_NO_REPEAT = flags.DEFINE_integer('no-repeat-ngram-size', 3, 'Beam search: never repeat an n-gram of this size, 0 '
                                  'disables.')
_PRINT_ALL_BEAMS = flags.DEFINE_bool('print-all-beams', False, "Beam search: print every beam's answer, not only "
                                     'the best.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sampling: keep the k most likely tokens, 0 disables.')
_TOP_P = flags.DEFINE_float('top_p', 0.7, 'Sampling: nucleus sampling, keep the most likely tokens up to this '
                            'probability mass, 0 disables.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling: divides the logits, > 0.')
_SEED = flags.DEFINE_integer('seed', 1234, 'Random seed; the same seed gives the same answers.')
_WITH_ID = flags.DEFINE_bool('with-id', False, 'File mode: each input line is "id<TAB>prompt".')
_MESH = cli.define_mesh_flags('decode')


def read_args():
  """The flags as one namespace (what check_args, run_file and run_interactive read)."""
  import types
  return types.SimpleNamespace(
      checkpoint=_CHECKPOINT.value, tokenizer=_TOKENIZER.value, input_source=_INPUT_SOURCE.value,
      quantization_bit_width=None if _QUANTIZATION.value is None else int(_QUANTIZATION.value),
      output_path=_OUTPUT_PATH.value, out_seq_length=_OUT_SEQ_LENGTH.value, min_gen_length=_MIN_GEN_LENGTH.value,
      sampling_strategy=_STRATEGY.value, num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
      no_repeat_ngram_size=_NO_REPEAT.value, print_all_beams=_PRINT_ALL_BEAMS.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, temperature=_TEMPERATURE.value, seed=_SEED.value, with_id=_WITH_ID.value,
      mesh={axis: flag.value for axis, flag in _MESH.items()})


def check_args(args) -> dict:
  """Validates the generation flags (no model needed); returns the keyword arguments of Generator.fill."""
  from glm_jax.generation import api
  options = dict(out_seq_length=args.out_seq_length, min_gen_length=args.min_gen_length, seed=args.seed,
                 strategy=args.sampling_strategy, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                 num_beams=args.num_beams, length_penalty=args.length_penalty,
                 no_repeat_ngram_size=args.no_repeat_ngram_size)
  try:
    api.check_options(**options)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return options


def read_prompts(path: Path, with_id: bool) -> list[dict]:
  """The non-blank lines of the input file as records {'line', 'id'?, 'input'}."""
  if not path.is_file():
    raise UsageError(f'--input-source {path}: no such file (or use --input-source interactive)')
  try:
    lines = path.read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f'--input-source {path}: cannot read ({e})') from None
  records = []
  for n, line in enumerate(lines, 1):
    text = line.strip()
    if not text:
      continue
    record = {'line': n}
    if with_id:
      qid, tab, rest = line.partition('\t')
      if not tab or not qid.strip():
        raise UsageError(f'{path} line {n}: expected "id<TAB>prompt" (--with-id)')
      record['id'] = qid.strip()
      text = rest.strip()
      if not text:
        raise UsageError(f'{path} line {n}: empty prompt')
    record['input'] = text
    records.append(record)
  if not records:
    raise UsageError(f'{path}: no prompts (every line is blank)')
  return records


def run_file(gen, records, options, args) -> int:
  from tqdm import tqdm
  source = Path(args.input_source)
  out_path = Path(args.output_path) / (source.stem + '.jsonl')
  is_beam = options['strategy'] == 'BeamSearchStrategy'
  lines = []
  with tqdm(total=len(records), desc='generating', unit='prompt', file=sys.stderr, dynamic_ncols=True) as bar:
    for record in records:
      result = gen.fill(record['input'], **options)
      row = dict(record, output=result.text, blanks=result.blanks)
      if is_beam:
        row['beams'] = result.beams
      lines.append(json.dumps(row, ensure_ascii=False))
      tag = record.get('id', f'line {record["line"]}')
      if args.print_all_beams and len(result.beams) > 1:
        for k, beam in enumerate(result.beams):
          bar.write(f'[{tag}] beam {k}: {beam}', file=sys.stdout)
      else:
        bar.write(f'[{tag}] {result.text}', file=sys.stdout)
      bar.update(1)
  atomic_write(out_path, '\n'.join(lines) + '\n')
  print(f'wrote {len(lines)} answers to {out_path}', file=sys.stderr)
  return 0


def run_interactive(gen, options, args) -> int:
  from glm_jax.generation import blanks
  failures = 0
  is_beam = options['strategy'] == 'BeamSearchStrategy'

  def write(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()

  while True:
    try:
      line = input(PROMPT)
    except EOFError:
      print()
      break
    text = line.strip()
    if text == 'stop':
      break
    try:
      prompt = blanks.prepare_prompt(gen.tokenizer, text, out_seq_length=options['out_seq_length'],
                                     max_sequence_length=gen.max_sequence_length)
    except ValueError as e:
      cli.error(PROG, e)
      sys.stderr.flush()
      failures += 1
      continue
    print(f'\nInput: {prompt.input_text}', flush=True)
    if is_beam and args.print_all_beams:
      for k, beam in enumerate(gen.fill(text, **options).beams):
        print(f'Output beam {k}: {beam}', flush=True)
    else:
      write('Output: ')
      gen.fill(text, **options, stream=write)
      write('\n')
  return 2 if failures else 0


def main(argv) -> int:
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {argv[1:]}')
  args = read_args()
  if not args.checkpoint:
    raise UsageError('--checkpoint is required')
  options = check_args(args)
  records = None
  if args.input_source != 'interactive':
    records = read_prompts(Path(args.input_source), args.with_id)
    out_dir = Path(args.output_path)
    if out_dir.exists() and not out_dir.is_dir():
      raise UsageError(f'--output-path {out_dir} exists and is not a directory')
  from glm_jax.generation import api, blanks
  tokenizer, config = api.load_tokenizer_and_config(args.checkpoint, args.tokenizer)
  if records is not None:  # every prompt is checked before anything is loaded or generated
    for record in records:
      try:
        blanks.prepare_prompt(tokenizer, record['input'], out_seq_length=args.out_seq_length,
                              max_sequence_length=int(config.model.max_sequence_length))
      except ValueError as e:
        raise UsageError(f'{args.input_source} line {record["line"]}: {e}') from None
    Path(args.output_path).mkdir(parents=True, exist_ok=True)  # fail now, not after generating everything
  mesh = api.decode_mesh(config, args.mesh)
  try:
    api.quantized_format(config.get('weight_format', 'in_out'), args.quantization_bit_width)
  except ValueError as e:
    raise UsageError(f'--quantization-bit-width: {e}') from None
  gen = api.Generator.load(args.checkpoint, tokenizer, mesh=mesh, quantization_bit_width=args.quantization_bit_width)
  if records is not None:
    return run_file(gen, records, options, args)
  return run_interactive(gen, options, args)


if __name__ == '__main__':
  cli.run(main)
