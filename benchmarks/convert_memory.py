"""Host memory of the streamed SAT conversions (glm_jax/sat_stream.py) on a synthetic 8-rank fp16 checkpoint.

    python benchmarks/convert_memory.py      # 20 x 2048, 16 heads, GeGLU 5464, vocabulary 150528: 1.32B parameters
    python benchmarks/convert_memory.py --layers 2 --hidden 256 --heads 4 --ffn 688 --vocab 16384   # a quick look

Writes a SAT checkpoint of random fp16 weights split over --tp ranks (`latest`, 0/mp_rank_XX_model_states.pt, itself
written tensor by tensor) in a temporary directory under --dir, then runs each conversion in a fresh process:
  import       sat_stream.import_sat: the SAT folder -> a glm-jax checkpoint (param_dtype float16)
  export_sat   sat_stream.export_sat: that checkpoint -> a SAT folder at --tp ranks, fp16
  safetensors  sat_stream.export_safetensors: that checkpoint -> safetensors files (fp16, 2 GB shards) + index
This process polls the child's /proc/<pid>/status every 2 ms for RssAnon (anonymous memory: the arrays; the mapped
SAT files and the page cache are not in it) and RssFile (file pages mapped by the child); the child reports its
RssAnon and VmHWM (its peak RSS, file pages included) once its libraries are loaded, and its VmHWM at the end. Printed: each peak's
growth over the child's start, against one layer's bytes (all ranks) and the whole model's. The SAT export is then
compared with the source folder rank by rank, tensor by tensor (bit-exact), and everything written is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def proc_status(pid='self') -> dict:
  """RssAnon, RssFile, VmRSS and VmHWM of a process, in bytes."""
  out = {}
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      name, _, value = line.partition(':')
      if name in ('RssAnon', 'RssFile', 'VmRSS', 'VmHWM'):
        out[name] = int(value.split()[0]) * 1024
  return out


def model_config(args):
  from glm_jax.config import default_config
  config = default_config()
  config.model.update(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      inner_hidden_size=args.ffn, vocab_size=args.vocab, max_sequence_length=2048,
                      dtype='float16', param_dtype='float16')
  return config


def make_sat_checkpoint(args, directory: Path) -> dict:
  """Random fp16 weights (std 0.02) as a SAT folder of args.tp ranks, one tensor (embedding: 8192 rows) at a time."""
  import numpy as np

  from glm_jax import sat_convert, sat_stream
  from glm_jax.model import GLMConfig
  cfg = GLMConfig.make(model_config(args).model)
  shapes = sat_convert.expected_sat_shapes(cfg)
  (directory / '0').mkdir(parents=True)
  rng = np.random.default_rng(0)
  ranks = sat_stream.SatRanksWriter(directory / '0', shapes, args.tp, 'float16')
  for key, shape in shapes.items():
    step = 8192 if key == sat_stream.EMBEDDING else shape[0]
    for row in range(0, shape[0], step):
      n = min(step, shape[0] - row)
      ranks.write(key, row, (rng.standard_normal((n,) + shape[1:], np.float32) * 0.02).astype(np.float16))
  ranks.close()
  (directory / 'latest').write_text('0')
  nbytes = {k: 2 * int(np.prod(s)) for k, s in shapes.items()}
  # One layer across all ranks: the split tensors once, the replicated ones (LayerNorms, row-parallel biases) tp times.
  layer = sum(2 * int(np.prod(sat_convert.rank_shape(k, s, args.tp))) * args.tp
              for k, s in shapes.items() if k.startswith('transformer.layers.0.'))
  largest = max(v for k, v in nbytes.items() if k.startswith('transformer.layers.0.'))
  return {'model_bytes': sum(nbytes.values()), 'layer_bytes': layer, 'largest_layer_tensor': largest,
          'embedding_bytes': nbytes[sat_stream.EMBEDDING], 'parameters': sum(nbytes.values()) // 2}


def child(step: str, source: str, out: str, setup: str) -> dict:
  """One conversion, in this (fresh) process; setup: JSON of the model config and the ranks."""
  import numpy as np
  import orbax.checkpoint  # noqa: F401
  import tensorstore  # noqa: F401

  from glm_jax import sat_stream
  from glm_jax.config import default_config
  # The libraries first, their code and tables loaded (torch's FakeTensorMode and serialization, which a SAT export
  # loads lazily, are most of it: about 80 MB), then the start figures: the growth is the conversion's own.
  with tempfile.TemporaryDirectory() as warm:
    ranks = sat_stream.SatRanksWriter(Path(warm), {'transformer.final_layernorm.weight': (8,)}, 1, 'float16')
    ranks.write('transformer.final_layernorm.weight', 0, np.ones(8, np.float16))
    ranks.close()
  setup = json.loads(setup)
  start = proc_status()
  t0 = time.perf_counter()
  if step == 'import':
    config = default_config()
    config.model.update(setup['model'])
    sat_stream.import_sat(source, config, out)
  elif step == 'export_sat':
    sat_stream.export_sat(source, out, tp=setup['tp'], dtype='float16')
  else:
    sat_stream.export_safetensors(source, out, dtype='float16', max_shard_bytes=2 * 10 ** 9)
  return {'start': start, 'end': proc_status(), 'seconds': time.perf_counter() - t0}


def run_child(step, source, out, setup) -> dict:
  """Runs `child` in a fresh process and polls its RssAnon / RssFile peaks."""
  cmd = [sys.executable, __file__, '--child', step, str(source), str(out), json.dumps(setup)]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  peak = {'RssAnon': 0, 'RssFile': 0}
  with tempfile.TemporaryFile('w+') as stdout, tempfile.TemporaryFile('w+') as stderr:  # no pipe to fill up
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env)
    while proc.poll() is None:
      try:
        status = proc_status(proc.pid)
      except (OSError, ValueError):  # exiting
        break
      peak = {k: max(v, status.get(k, 0)) for k, v in peak.items()}
      time.sleep(0.002)
    proc.wait()
    stdout.seek(0)
    stderr.seek(0)
    if proc.returncode != 0:
      sys.exit(f'convert_memory.py: {step} failed:\n{stderr.read()[-3000:]}')
    result = json.loads(stdout.read().strip().splitlines()[-1])
  result['peak'] = peak
  return result


def compare_sat(a: Path, b: Path) -> int:
  """Tensors compared between two SAT folders, rank by rank and key by key (memory-mapped); exits on a difference."""
  import torch

  from glm_jax import model_io
  n = 0
  for fa, fb in zip(model_io.sat_rank_files(a), model_io.sat_rank_files(b), strict=True):
    sa, sb = model_io.load_sat_file(fa, mmap=True), model_io.load_sat_file(fb, mmap=True)
    if list(sa) != list(sb):
      sys.exit(f'convert_memory.py: {fb.name}: keys differ from the source')
    for k in sa:
      if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k]):
        sys.exit(f'convert_memory.py: {fb.name}: {k} differs from the source')
      n += 1
  return n


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=20)
  p.add_argument('--hidden', type=int, default=2048)
  p.add_argument('--heads', type=int, default=16)
  p.add_argument('--ffn', type=int, default=5464, help='GeGLU width (divisible by --tp)')
  p.add_argument('--vocab', type=int, default=150528)
  p.add_argument('--tp', type=int, default=8)
  p.add_argument('--dir', default=tempfile.gettempdir(), help='where the temporary checkpoints go')
  p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
  p.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  sys.path.insert(0, str(REPO))
  if args.child:
    print(json.dumps(child(*args.child)))
    return 0
  tmp = Path(tempfile.mkdtemp(prefix='convert_memory-', dir=args.dir))
  try:
    t0 = time.perf_counter()
    info = make_sat_checkpoint(args, tmp / 'sat')
    info['make_seconds'] = time.perf_counter() - t0
    setup = {'model': model_config(args).model.to_dict(), 'tp': args.tp}
    info['import'] = run_child('import', tmp / 'sat', tmp / 'jax', setup)
    info['export_sat'] = run_child('export_sat', tmp / 'jax', tmp / 'sat_back', setup)
    info['safetensors'] = run_child('safetensors', tmp / 'jax', tmp / 'st', setup)
    info['tensors_compared'] = compare_sat(tmp / 'sat', tmp / 'sat_back')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if args.json:
    print(json.dumps(info))
    return 0
  mb, layer, total = 1e6, info['layer_bytes'], info['model_bytes']
  print(f'model: {args.layers} layers x hidden {args.hidden}, {args.heads} heads, GeGLU {args.ffn}, vocabulary '
        f'{args.vocab}, {args.tp} ranks: {info["parameters"] / 1e9:.2f}B parameters, {total / mb:.0f} MB fp16; one '
        f'layer (all ranks) {layer / mb:.1f} MB, its largest tensor {info["largest_layer_tensor"] / mb:.1f} MB; '
        f'embedding {info["embedding_bytes"] / mb:.0f} MB')
  print(f'{"step":<12} {"seconds":>8} {"RssAnon peak-start":>19} {"in layers":>10} {"of model":>9} '
        f'{"RssFile peak-start":>19} {"VmHWM end-start":>16} {"VmHWM":>8}')
  for step in ('import', 'export_sat', 'safetensors'):
    r = info[step]
    grow = r['peak']['RssAnon'] - r['start']['RssAnon']
    files = r['peak']['RssFile'] - r['start']['RssFile']
    hwm = r['end']['VmHWM'] - r['start']['VmHWM']
    print(f'{step:<12} {r["seconds"]:>8.1f} {grow / mb:>18.0f}M {grow / layer:>10.2f} {grow / total:>8.1%} '
          f'{files / mb:>18.0f}M {hwm / mb:>15.0f}M {r["end"]["VmHWM"] / mb:>7.0f}M')
  print(f'SAT export at {args.tp} ranks equals the source, {info["tensors_compared"]} tensors bit for bit')
  return 0


if __name__ == '__main__':
  sys.exit(main())
