"""One copy of the weights when decoding, and loading one layer at a time (benchmarks/decode_memory.py, small case).

A 240 MB model (8 layers of 28 MB) with random weights, each way of loading in a fresh process so that RssAnon
(anonymous resident memory: where numpy and, on CPU, device arrays live) measures that way alone.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.tokenizer_fixtures import train_tiny_tokenizer


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  tokenizer = train_tiny_tokenizer(tmp_path_factory.mktemp('tok'), 'compact')
  proc = subprocess.run([sys.executable, 'benchmarks/decode_memory.py', '--layers', '8', '--hidden', '768', '--heads',
                         '12', '--ffn', '2048', '--vocab', '4096', '--tokenizer', str(tokenizer), '--json'],
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generator_holds_one_copy_of_the_weights(report):
  model, gen = report['model_bytes'], report['generator']
  # The decode format ('packed' on CPU pads each matrix to whole tiles of rows): the model's bytes, a little more.
  assert model <= gen['weights_bytes'] <= 1.02 * model
  # After a generate, a streamed generate and a log_probs call: those weights and nothing else on the device (the
  # old Generator held the checkpoint layout, the decoder's copy and the streaming decoder's copy).
  assert gen['live_device_bytes'] == gen['weights_bytes']
  # No host copy kept: after loading, RssAnon grew by the weights plus the libraries' own (80-100 MB here), not by a
  # second model; the calls add compiled programs (140-190 MB here), not a copy of the weights.
  assert gen['after'] - gen['before'] - gen['weights_bytes'] < 0.75 * model
  assert gen['after_calls'] - gen['after'] < model


def test_loading_by_layer_peaks_near_one_layer_above_the_weights(report):
  model, layer = report['model_bytes'], report['layer_bytes']
  by_layer, whole = (report[k]['peak'] - report[k]['before'] - report[k]['weights_bytes'] for k in ('by_layer', 'whole'))
  # Reading the whole tree first holds a whole second model at the peak; by layer, a few layers at most (one layer
  # read, its converted copy, and the libraries' fixed 80-100 MB).
  assert whole > model
  assert by_layer < 4 * layer + 0.25 * model
