"""The launch scripts' shared command-line behaviour (glm_jax/cli.py): --help exits 0, and the errors a newcomer meets
are one line, '<script>: error: ...', exit status 2."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

SCRIPTS = ['train.py', 'generate.py', 'convert_sat.py', 'inspect_model.py', 'train_tokenizer.py', 'plot.py']


def _launch(script, *args):
  return subprocess.run([sys.executable, f'launch/{script}', *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def _one_error_line(proc, script):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{script}: error: '), proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_0(script):
  proc = _launch(script, '--help')
  assert proc.returncode == 0 and proc.stdout.strip() and not proc.stderr.strip(), proc.stderr[-2000:]


def test_a_misspelt_config_override_is_one_line():
  line = _one_error_line(_launch('train.py', '--config', 'configs/tiny.py', '--config.train.learnin_rate=1'),
                         'train.py')
  assert 'learnin_rate' in line and 'Did you mean "learning_rate"' in line


def test_a_mesh_that_cannot_split_the_model_is_named():
  line = _one_error_line(_launch('inspect_model.py', '--config', 'configs/glm_130b.py', '--config.mesh.tensor=7'),
                         'inspect_model.py')
  assert 'config.model.num_attention_heads=96' in line and 'tensor=7' in line and 'sizes that do: 1, 2, 3, 4' in line
