"""The launch scripts' command line: absl flags (with ml-collections config files), and one way to fail.

    from glm_jax import cli
    ...                                    # absl flags defined at module level, e.g. config_flags.DEFINE_config_file
    if __name__ == '__main__':
      cli.run(main)                        # main(argv) -> exit status; cli.invoke(main, argv) returns it instead

--help (also -h, --helpshort, --helpfull) prints the script's docstring and its flags and exits 0. A bad flag, a bad
config file or override (a misspelt field gets ml-collections' "Did you mean ..."), and any cli.UsageError,
ValueError or OSError raised by main print one line on stderr, '<script>: error: <what is wrong>', and exit with
status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from absl import app, flags, logging

HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')


class UsageError(Exception):
  """A user error: printed as one line, exit status 2."""


def error(prog: str, message) -> int:
  """Prints '<prog>: error: <message>' (on one line) to stderr; returns the exit status 2."""
  print(f'{prog}: error: {" ".join(str(message).split())}', file=sys.stderr)
  return 2


def _parse_error(e: Exception) -> str:
  if isinstance(e, (AttributeError, KeyError)):  # ml-collections: an override names a field the config lacks
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if text[:1] in '\'"' and text[-1:] == text[:1]:  # a KeyError's message, passed on as its repr
      text = ast.literal_eval(text)
    field, _, hint = text.partition('\n')
    return f'bad config override: no field {field}' + (f'. {hint}' if hint else '')
  return str(e)


def invoke(main, argv) -> int:
  """Parses argv (argv[0] the script) into the absl flags of the __main__ module, calls main(remaining argv) and
  returns the exit status (see the module docstring); flags start from their defaults on every call, so tests can
  invoke a script in process."""
  argv = [str(a) for a in argv]
  prog = Path(argv[0]).name
  if any(a in HELP_FLAGS for a in argv[1:]):
    module = sys.modules['__main__']
    try:
      print((module.__doc__ or '').strip() + '\n\nflags:\n' + flags.FLAGS.module_help(module), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader left; nothing more to say
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  flags.FLAGS.unparse_flags()
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - absl's flag errors, and whatever a config file or override raises
    return error(prog, _parse_error(e))
  logging.set_verbosity(logging.WARNING)
  try:
    return main(rest) or 0
  except (UsageError, app.UsageError, ValueError, OSError) as e:  # OSError: also a config file that failed to load
    return error(prog, e)
  except KeyboardInterrupt:
    print(file=sys.stderr)
    return 130


def run(main):
  """invoke(main, sys.argv), then exit with its status."""
  sys.exit(invoke(main, sys.argv))


def define_mesh_flags(purpose: str) -> dict:
  """--config.mesh.<axis> integer flags, as the config files name the mesh (one axis may be -1: the devices the
  others leave). Returns {axis: flag holder}."""
  from glm_jax.sharding import MESH_AXES
  return {axis: flags.DEFINE_integer(f'config.mesh.{axis}', 1, f'Size of the mesh axis {axis!r} to {purpose} on.')
          for axis in MESH_AXES}
