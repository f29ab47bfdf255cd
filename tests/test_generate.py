"""Text generation: fill_blanks (glm130b.md §5.1), the Generator API, launch/generate.py and examples/generate.ipynb.

The model is a random tiny GLM (random weights: these are plumbing tests, the ids' structure is checked, not the
text). §5.1's rules are checked exactly with a scripted decoder; the real model checks batching, determinism,
streaming and the log-probabilities. Subprocesses (the CLI, the notebook's kernel) share a persistent compilation
cache.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from glm_jax import layouts
from glm_jax.generation import BeamSearchConfig, Generator, SamplingConfig, api, blanks, fill_blanks
from glm_jax.generation.decode import GREEDY, DecodeOutput
from tests.conftest import REPO, load_config, subprocess_env
from tests.tokenizer_fixtures import train_tiny_tokenizer

OUT = 32  # out_seq_length of most tests: small buckets, few compiles
MAX_SEQ = 128
LONG = ' '.join(['word'] * 40)  # over OUT tokens
_CACHE = Path(tempfile.gettempdir()) / f'glm-jax-test-xla-cache-{os.getuid()}'


def _random_params(model, model_config, seed=0):
  """Random N(0, 0.2) weights (LayerNorm scales 1) without compiling an initialiser."""
  import flax.linen as nn
  from glm_jax.sharding import dummy_inputs
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init(r, *dummy_inputs(model_config))['params']),
                          jax.random.key(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if 'scale' in jax.tree_util.keystr(path):
      return np.ones(s.shape, s.dtype)
    return (rng.standard_normal(s.shape) * 0.2).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  from glm_jax import GLM, save_model
  from glm_jax.tokenizer import GLMTokenizer
  tmp = tmp_path_factory.mktemp('generate')
  tok_path = train_tiny_tokenizer(tmp, 'compact')
  tok = GLMTokenizer.load(tok_path)
  config = load_config('tiny', num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=170,
                       vocab_size=tok.vocab_size, max_sequence_length=MAX_SEQ)
  path = save_model(tmp / 'ckpt', _random_params(GLM(config.model), config.model), config)
  shutil.copy(tok_path, path / 'tokenizer.model')
  shutil.copy(tok_path.with_suffix('.json'), path / 'tokenizer.json')
  return path


@pytest.fixture(scope='module')
def gen(checkpoint):
  return Generator.load(checkpoint)


@pytest.fixture(scope='module')
def tok(gen):
  return gen.tokenizer


def _env(**extra):
  return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)


def _cli(*args, stdin=None):
  return subprocess.run([sys.executable, 'launch/generate.py', *map(str, args)], cwd=REPO, env=_env(),
                        input=stdin, capture_output=True, text=True, timeout=300)


@functools.cache
def _cli_module():
  """launch/generate.py as a module, loaded once (its absl flags are defined at import)."""
  spec = importlib.util.spec_from_file_location('launch_generate', REPO / 'launch' / 'generate.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------------------------------------
# §5.1 steps 1-5 on token level


def test_prompt_rules(tok):
  enc = tok.encode
  mask, gmask, smask, eos = tok.mask_id, tok.gmask_id, tok.smask_id, tok.eos_id

  def prep(text, out=OUT):
    return blanks.prepare_prompt(tok, text, out_seq_length=out, max_sequence_length=MAX_SEQ)

  p = prep('Good night [MASK] sweet prince')  # each segment tokenised on its own; eos: text does not end in MASK]
  assert p.seq == enc('Good night ') + [mask] + enc(' sweet prince') + [eos]
  assert (p.generation_mask, p.use_gmask, p.input_text) == (mask, False, 'Good night [MASK] sweet prince')
  p = prep('a [sMASK] b [MASK]')  # [MASK] wins over [sMASK]; ends with "MASK]": no eos
  assert p.seq == enc('a ') + [smask] + enc(' b ') + [mask] and (p.generation_mask, p.use_gmask) == (mask, False)
  p = prep('a [sMASK] b')
  assert p.seq == enc('a ') + [smask] + enc(' b') + [eos] and (p.generation_mask, p.use_gmask) == (smask, False)
  p = prep('a [gMASK] b [gMASK]')  # only [gMASK]: use_gmask, no extra [gMASK]
  assert p.seq == enc('a ') + [gmask] + enc(' b ') + [gmask] and (p.generation_mask, p.use_gmask) == (gmask, True)
  p = prep('Once upon a time')  # no mask: [gMASK] appended (also to the echoed text), no eos
  assert p.seq == enc('Once upon a time') + [gmask] and p.use_gmask and p.input_text == 'Once upon a time [gMASK]'
  # The eos rule reads the raw text: "MASK]" at the end without a mask token there still means no eos ...
  assert prep('x [MASK] y MASK]').seq == enc('x ') + [mask] + enc(' y MASK]')
  # ... and a trailing space after the last mask means eos.
  assert prep('x [MASK] ').seq == enc('x ') + [mask] + enc(' ') + [eos]


def test_bad_prompts(tok, gen):
  for text in ('', '   \n'):
    with pytest.raises(ValueError, match='^empty prompt$'):
      blanks.prepare_prompt(tok, text, out_seq_length=OUT, max_sequence_length=MAX_SEQ)
  n = len(tok.encode(LONG)) + 1  # + [gMASK]
  with pytest.raises(ValueError, match=f'^prompt is {n} tokens, longer than the maximum {OUT - 2} '):
    gen.generate(LONG, out_seq_length=OUT)
  longer = 'word ' * 200  # out_seq_length is capped at the model's max_sequence_length
  n = len(tok.encode(longer)) + 1
  assert n > MAX_SEQ - 2
  with pytest.raises(ValueError, match=f'^prompt is {n} tokens, longer than the maximum {MAX_SEQ - 2} '):
    gen.generate(longer, out_seq_length=10_000)
  with pytest.raises(ValueError, match='^prompt 1: empty prompt$'):
    gen.generate(['fine', ''], out_seq_length=OUT)
  with pytest.raises(ValueError, match='one prompt at a time'):
    gen.generate(['a', 'b'], stream=print)


# ----------------------------------------------------------------------------------------------------------------
# §5.1 step 6 with a scripted decoder


class ScriptedDecoder:
  """Records every call; answers each row with the next scripted token list (or, for beams, list of beams)."""

  def __init__(self, script):
    self.script = list(script)
    self.calls = []

  def __call__(self, contexts, mask_positions, use_gmask, **kwargs):
    self.calls.append(dict(contexts=[list(c) for c in contexts], mask_positions=list(mask_positions),
                           use_gmask=list(use_gmask), **kwargs))
    rows = [self.script.pop(0) for _ in contexts]
    if isinstance(kwargs['strategy'], BeamSearchConfig):
      return DecodeOutput(tokens=[r[0] for r in rows], beams=rows, beam_scores=[[0.0] * len(r) for r in rows])
    return DecodeOutput(tokens=rows)


def test_blanks_filled_left_to_right(tok):
  sop, eop, eos, mask = tok.sop_id, tok.eop_id, tok.eos_id, tok.mask_id
  a, b, c = 300, 301, 302
  dec = ScriptedDecoder([[a, b, eop], [c]])  # blank 1 ends with <eop> (dropped); blank 2 hits the length limit
  res = fill_blanks(dec, tok, 'The [MASK] and [MASK] end', out_seq_length=OUT, strategy=GREEDY, seed=3,
                    max_sequence_length=MAX_SEQ)
  seq0 = tok.encode('The ') + [mask] + tok.encode(' and ') + [mask] + tok.encode(' end') + [eos]
  assert res.input_ids == seq0
  m1 = seq0.index(mask)
  call1, call2 = dec.calls
  assert call1['contexts'] == [seq0 + [sop]] and call1['mask_positions'] == [m1] and call1['use_gmask'] == [False]
  assert call1['max_gen_length'] == OUT - len(seq0 + [sop])
  assert set(call1['end_tokens']) == {eop, eos} and call1['seed'] == 3
  assert set(tok.special_ids[k] for k in ('[MASK]', '[sMASK]', '[gMASK]')) <= set(call1['strategy'].invalid_ids)
  seq1 = seq0[:m1] + [a, b] + seq0[m1 + 1:]  # splice: the mask replaced, <sop> and after dropped
  m2 = seq1.index(mask)
  assert call2['contexts'] == [seq1 + [sop]] and call2['mask_positions'] == [m2]  # a fresh forward of the new seq
  assert call2['max_gen_length'] == OUT - len(seq1 + [sop]) and call2['seed'] != 3
  assert res.ids == seq1[:m2] + [c] + seq1[m2 + 1:]
  assert res.blank_ids == [[a, b], [c]] and res.blanks == [tok.decode([a, b]), tok.decode([c])]
  assert res.text == tok.decode(res.ids[:-1]) and res.beams == [res.text]  # the trailing eos is not shown

  dec = ScriptedDecoder([[a, eos]])  # [gMASK]: positions continue (use_gmask), eos ends the blank
  res = fill_blanks(dec, tok, 'Once', out_seq_length=OUT, strategy=GREEDY, seed=0, max_sequence_length=MAX_SEQ)
  assert dec.calls[0]['use_gmask'] == [True] and res.ids == tok.encode('Once') + [a]


def test_beam_zero_continues(tok):
  sop, eop, mask = tok.sop_id, tok.eop_id, tok.mask_id
  beam_cfg = BeamSearchConfig(num_beams=2, consider_end=True)
  dec = ScriptedDecoder([[[300, eop], [301, 302, eop]], [[310], [311, eop]]])
  res = fill_blanks(dec, tok, 'x [MASK] y [MASK]', out_seq_length=OUT, strategy=beam_cfg, seed=0,
                    max_sequence_length=MAX_SEQ)
  seq0 = tok.encode('x ') + [mask] + tok.encode(' y ') + [mask]  # ends with MASK]: no eos
  m1 = seq0.index(mask)
  seq1 = seq0[:m1] + [300] + seq0[m1 + 1:]  # beam 0 only
  assert dec.calls[1]['contexts'] == [seq1 + [sop]]
  m2 = seq1.index(mask)
  assert res.beam_ids == [seq1[:m2] + [310], seq1[:m2] + [311]] and res.ids == res.beam_ids[0]
  assert res.beams == [tok.decode(ids) for ids in res.beam_ids] and res.text == res.beams[0]
  assert set(tok.special_ids[k] for k in ('[MASK]', '[sMASK]', '[gMASK]')) <= set(
      dec.calls[0]['strategy'].invalid_slices)


def test_batched_rounds(tok):
  """Round r decodes blank r of every prompt that has one, in one call; rows are cut to their own limit."""
  eop = tok.eop_id
  long_row = list(range(300, 330))
  dec = ScriptedDecoder([long_row, [400, eop], [401, eop]])
  texts = ['p [MASK] q [MASK] r', 'a much longer prompt than the other one [MASK] s']
  res = fill_blanks(dec, tok, texts, out_seq_length=OUT, strategy=SamplingConfig(top_p=0.5), seed=5,
                    max_sequence_length=MAX_SEQ)
  first, second = dec.calls
  assert len(first['contexts']) == 2 and len(second['contexts']) == 1
  own = [OUT - (len(r.input_ids) + 1) for r in res]
  assert first['max_gen_length'] == max(own)
  assert res[0].blank_ids[0] == long_row[:own[0]] and res[1].blank_ids == [[400]]
  assert res[0].blank_ids[1] == [401] and len(res[0].blanks) == 2


# ----------------------------------------------------------------------------------------------------------------
# The real (random) model


# Two blanks, a continuation, one [sMASK] blank: the batch decodes round 0 with three rows, round 1 with one.
TEXTS = ['The king [MASK] and the [MASK] queen.', 'Once upon a time', 'a [sMASK] b']


def test_greedy_structure_and_batching(gen, tok):
  singles = [gen.fill(t, top_k=1, out_seq_length=OUT) for t in TEXTS]
  r = singles[0]
  assert len(r.blank_ids) == 2 and tok.mask_id not in r.ids
  ids = r.input_ids
  for generated in r.blank_ids:  # the final ids are the input with each blank spliced in, left to right
    assert len(generated) <= OUT - (len(ids) + 1)
    assert not set(generated) & {tok.mask_id, tok.smask_id, tok.gmask_id, tok.eop_id}
    ids = layouts.splice_blank(ids, ids.index(tok.mask_id), generated)
  assert r.ids == ids and r.text == tok.decode(ids[:-1]) and ids[-1] == tok.eos_id
  assert singles[1].use_gmask and singles[1].text.startswith('Once upon a time')
  assert len(singles[2].blank_ids) == 1 and tok.smask_id not in singles[2].ids
  batched = gen.fill(TEXTS, top_k=1, out_seq_length=OUT)
  assert [b.ids for b in batched] == [s.ids for s in singles]
  assert gen.generate(TEXTS, top_k=1, out_seq_length=OUT) == [s.text for s in singles]


def test_sampling_deterministic_and_streamed(gen):
  text = 'First Citizen:'
  a = gen.fill(text, out_seq_length=OUT, seed=7)
  assert gen.fill(text, out_seq_length=OUT, seed=7).ids == a.ids
  assert gen.fill(text, out_seq_length=OUT, seed=8).ids != a.ids
  pieces = []
  streamed = gen.fill(text, out_seq_length=OUT, seed=7, stream=pieces.append)
  assert streamed.ids == a.ids and ''.join(pieces) == a.text
  assert len(pieces) > 3  # the prompt, then the tokens one by one
  assert pieces[0] == text


def _choice_layout_by_hand(tok, context, options, gmask):
  """GLM-130B's multiple-choice sample (glm130b.md §7.2), written here from the spec (not with glm_jax.layouts):
  (tokens, positions, may-attend mask, per option the rows read and the target ids). One point follows G130's
  evaluation code (ModelForEvaluation.build_multiple_choice_sample), whose numbers were published, over §7.2's text:
  [gMASK] options count from mask_position = len(text), the appended [gMASK]'s own position, not from division."""
  ctx = tok.encode_with_masks(context)
  if tok.mask_id in ctx:
    mask_position = ctx.index(tok.mask_id)  # the context's own blank
  else:
    ctx, mask_position = ctx + [tok.gmask_id if gmask else tok.mask_id], len(ctx)
  division = len(ctx)
  targets = [tok.encode(o) or [tok.eop_id] for o in options]  # an empty option scores <eop> (our API's rule)
  single = all(len(t) == 1 for t in targets)
  blocks = [[tok.sop_id]] if single else [[tok.sop_id] + t[:-1] for t in targets]
  tokens = ctx + [x for blk in blocks for x in blk]
  n = len(tokens)
  positions = list(range(division))
  may = np.zeros((n, n), bool)
  may[:, :division] = True  # every row sees the whole context; context rows see no option
  rows, start = [], division
  for blk in blocks:
    positions += [mask_position + j for j in range(len(blk))] if gmask else [mask_position] * len(blk)
    for j in range(len(blk)):
      may[start + j, start:start + j + 1] = True  # causal within its own block only
    rows.append(list(range(start, start + len(blk))))
    start += len(blk)
  if single:
    rows = [rows[0]] * len(targets)  # every option read at the one <sop> row
  return np.array(tokens, np.int32), np.array(positions, np.int32), may, rows, targets


def test_log_probs_match_full_forward(gen, tok, checkpoint):
  from glm_jax import GLM, load_model
  params, config = load_model(checkpoint)  # the checkpoint's own model (the Generator runs the decoder's format)
  model = GLM(config.model)
  forward = jax.jit(lambda p, t, q, m: model.apply({'params': p}, t, q, m))
  cases = [('To be or not [MASK] be', [' to', ' a big town', ''], False),  # the context's blank; <eop> for ''
           ('Farewell,', [' my', ' good'], True),  # [gMASK] appended; single-token options share one <sop> row
           ('Farewell,', [' my lord', ' good'], False)]  # [MASK] appended; options at the mask's position
  assert all(len(tok.encode(o)) == 1 for o in cases[1][1]) and len(tok.encode(' my lord')) > 1
  for context, options, gmask in cases:
    scores = gen.log_probs(context, options, use_gmask=gmask)
    tokens, positions, may, rows, targets = _choice_layout_by_hand(tok, context, options, gmask)
    logits = np.asarray(forward(params, tokens[None], positions[None], may[None, None]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = [float(logp[r, t].sum()) for r, t in zip(rows, targets)]
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
  compiled = gen.decoder._score._cache_size()
  assert gen.log_probs('To be or not [MASK] be', [' at']) == gen.log_probs('To be or not [MASK] be', [' at'])
  assert gen.decoder._score._cache_size() == compiled  # the same length buckets reuse the compiled scorer


def test_tokenizer_resolution(checkpoint, tmp_path):
  assert api.tokenizer_path(checkpoint) == checkpoint / 'tokenizer.model'
  bare = tmp_path / 'bare'
  shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns('tokenizer.*'))
  with pytest.raises(ValueError, match=f'^no tokenizer: {bare}/tokenizer.model does not exist; pass --tokenizer'):
    Generator.load(bare)
  tok, config = api.load_tokenizer_and_config(bare, checkpoint / 'tokenizer')  # the path without .model works too
  assert tok.vocab_size == config.model.vocab_size


# ----------------------------------------------------------------------------------------------------------------
# Options and the CLI


def test_option_validation():
  bad = [dict(top_p=1.5, flag='--top_p'), dict(temperature=-1.0, flag='--temperature'),
         dict(num_beams=0, flag='--num-beams'), dict(top_k=-1, flag='--top_k'),
         dict(strategy='Greedy', flag='--sampling-strategy'), dict(out_seq_length=1, flag='--out-seq-length'),
         dict(min_gen_length=-1, flag='--min-gen-length'), dict(seed=-5, flag='--seed'),
         dict(no_repeat_ngram_size=-1, flag='--no-repeat-ngram-size'),
         dict(temperature=float('nan'), flag='--temperature')]
  for case in bad:
    flag = case.pop('flag')
    with pytest.raises(ValueError, match=f'^{flag} '):
      api.check_options(**case)
  assert api.check_options() == SamplingConfig(temperature=1.0, top_k=0, top_p=0.7)
  assert api.check_options(top_k=1) == GREEDY
  beam = api.check_options(strategy='BeamSearchStrategy', num_beams=3, length_penalty=0.5)
  assert dataclasses.astuple(beam)[:5] == (3, 0.5, True, (), 3)


def test_cli_errors_in_process(capsys, checkpoint, tok, tmp_path):
  from absl import flags

  from glm_jax import cli as cli_lib
  cli = _cli_module()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['generate.py', '--checkpoint', 'x'])
  args = cli.read_args()
  assert (args.input_source, args.output_path, args.out_seq_length, args.min_gen_length, args.sampling_strategy,
          args.num_beams, args.length_penalty, args.no_repeat_ngram_size, args.print_all_beams, args.top_k,
          args.top_p, args.temperature, args.seed, args.with_id, args.mesh) == (
              'interactive', 'samples', 256, 0, 'BaseStrategy', 4, 1.0, 3, False, 0, 0.7, 1.0, 1234, False,
              dict(data=1, fsdp=1, tensor=1, stage=1))
  long_file = tmp_path / 'long.txt'
  long_file.write_text('ok prompt\n' + LONG + '\n')
  n = len(tok.encode(LONG)) + 1
  cases = [(['--checkpoint', checkpoint, '--top_p', '1.5'], '--top_p must be'),
           (['--checkpoint', checkpoint, '--temperature', '-1'], '--temperature must be'),
           (['--checkpoint', checkpoint, '--num-beams', '0'], '--num-beams must be'),
           (['--checkpoint', tmp_path / 'missing'], 'no such checkpoint'),
           (['--checkpoint', checkpoint, '--tokenizer', tmp_path / 'no.model'], 'tokenizer model file not found'),
           (['--checkpoint', checkpoint, '--input-source', tmp_path / 'none.txt'], 'no such file'),
           (['--checkpoint', checkpoint, '--input-source', long_file, '--out-seq-length', '32', '--output-path',
             tmp_path / 'out'],
            f'{long_file} line 2: prompt is {n} tokens, longer than the maximum {OUT - 2}'),
           (['--checkpoint', checkpoint, '--bogus'], "Unknown command line flag 'bogus'"),
           (['--checkpoint', checkpoint, '--top_k', 'x'], "--top_k=x: invalid literal for int()"),
           (['--checkpoint', checkpoint, '--sampling-strategy', 'Greedy'], 'should be one of'),
           (['--checkpoint', checkpoint, '--config.mesh.tensor=two'], "--config.mesh.tensor=two: invalid literal"),
           (['--checkpoint', checkpoint, '--config.mesh.tensr=2'], 'Did you mean: config.mesh.tensor'),
           (['--checkpoint', checkpoint, '--config.mesh.tensor=16'], 'needs 16 devices, but 8 are available'),
           (['--checkpoint', checkpoint, '--config.mesh.tensor=4', '--config.mesh.data=2'],
            'cannot split config.model.inner_hidden_size=170 over tensor=4'),
           (['--checkpoint', checkpoint, '--min-gen-length', '500', '--out-seq-length', '64'],
            '--min-gen-length 500 cannot be met within --out-seq-length 64')]
  capsys.readouterr()
  for argv, message in cases:
    status = cli_lib.invoke(cli.main, ['generate.py', *argv])
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    assert err.count('\n') == 1 and err.startswith('generate.py: error: ') and message in err, (argv, err)
  assert not (tmp_path / 'out').exists()  # nothing written or created


def test_generator_on_a_mesh(checkpoint, gen):
  """Generator.load(mesh=...): weights split over 'tensor', prompts over 'data'; the same answers and scores."""
  from glm_jax import sharding
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, stage=1), jax.devices()[:4])
  on_mesh = Generator.load(checkpoint, mesh=mesh)
  # out_in [N, 3, H, D] per layer: heads over 'tensor'
  assert on_mesh.weights['layers_0']['attention']['qkv_kernel'].sharding.spec[0] == 'tensor'
  prompts = ['The king [MASK] and the queen.', 'First Citizen:']
  kw = dict(out_seq_length=48, top_k=1)
  assert on_mesh.generate(prompts, **kw) == gen.generate(prompts, **kw)
  np.testing.assert_allclose(on_mesh.log_probs('The king', [' and', ' the queen']),
                             gen.log_probs('The king', [' and', ' the queen']), rtol=1e-5, atol=1e-5)


def test_cli_subprocess_error_exit():
  """The process boundary: exit status 2 and exactly one line on stderr (the rest is checked in process)."""
  proc = _cli('--checkpoint', 'does/not/exist', '--num-beams', '0')
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr == 'generate.py: error: --num-beams must be an integer >= 1, got 0\n', proc.stderr


def test_cli_file_mode(checkpoint, gen, tmp_path):
  source = tmp_path / 'prompts.txt'
  source.write_text('q1\tThe king [MASK] and the queen.\n\nq2\tFirst Citizen:\n', encoding='utf-8')
  out_dir = tmp_path / 'samples'
  out_dir.mkdir()
  (out_dir / 'prompts.jsonl').write_text('old contents\n')
  # The notebook's beam search settings and length buckets: its kernel finds this program in the compilation cache.
  options = ['--out-seq-length', 64, '--sampling-strategy', 'BeamSearchStrategy', '--num-beams', 2, '--seed', 11]
  proc = _cli('--checkpoint', checkpoint, '--input-source', source, '--output-path', out_dir, '--with-id', *options)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(p.name for p in out_dir.iterdir()) == ['prompts.jsonl']  # replaced, no temporary file left
  rows = [json.loads(line) for line in (out_dir / 'prompts.jsonl').read_text(encoding='utf-8').splitlines()]
  assert [(r['line'], r['id'], r['input']) for r in rows] == [(1, 'q1', 'The king [MASK] and the queen.'),
                                                               (3, 'q2', 'First Citizen:')]
  want = gen.fill('The king [MASK] and the queen.', out_seq_length=64, strategy='BeamSearchStrategy', num_beams=2,
                  seed=11)
  assert (rows[0]['output'], rows[0]['blanks'], rows[0]['beams']) == (want.text, want.blanks, want.beams)
  assert len(rows[1]['beams']) == 2 and rows[1]['output'] == rows[1]['beams'][0]
  assert f'[q1] {want.text}' in proc.stdout and '2/2' in proc.stderr  # answers printed, progress shown


def test_cli_interactive_streams(checkpoint, gen, tok):
  text = 'First Citizen:'
  n = len(tok.encode(LONG)) + 1
  want = gen.fill(text, out_seq_length=OUT, seed=7)
  proc = _cli('--checkpoint', checkpoint, '--out-seq-length', OUT, '--seed', 7,
              stdin=f'{LONG}\n{text}\n')  # a rejected prompt, a good one, then end of input
  assert proc.returncode == 2  # a prompt was rejected; the session went on
  assert proc.stderr.count(f'generate.py: error: prompt is {n} tokens, longer than the maximum {OUT - 2}') == 1
  assert f'Input: {text} [gMASK]\nOutput: {want.text}\n' in proc.stdout
  assert 'Traceback' not in proc.stderr


def test_notebook_runs(checkpoint, monkeypatch):
  import nbclient
  import nbformat
  nb = nbformat.read(REPO / 'examples' / 'generate.ipynb', as_version=4)
  assert all(not c.get('outputs') and c.get('execution_count') is None for c in nb.cells if c.cell_type == 'code')
  for key, value in _env(GLM_JAX_CHECKPOINT=str(checkpoint)).items():
    monkeypatch.setenv(key, value)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(REPO)}}).execute()
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.outputs for c in code)  # every cell ran and printed
  text = ''.join(o.get('text', '') for c in code for o in c.outputs)
  assert 'max_sequence_length 128' in text and 'blanks:' in text and "' my lord'" in text
