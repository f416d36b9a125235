"""How every command line ends: a user error is one message on stderr and exit status 2, never a traceback.

`--debug` on any command, or LIDIT_DEBUG=1 in the environment, lets the error's traceback through instead.
A user error is anything the user can cause by what they pass or point at (a config value, a path, a
checkpoint, a file): `UserError`, and the ValueError / OSError family the libraries raise for those. Other
exceptions (TypeError, AttributeError, ...) are bugs of ours and keep their traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from absl import app, flags


class UserError(Exception):
  """A problem with what the user gave; the message names the value and the fix."""


class NotFound(UserError, KeyError):
  """A name the user gave or implied (a caption, a tensor) that is not there; a KeyError too, for callers."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""  # KeyError would quote the message


def explain_flag_error(argv, error: Exception) -> str:
  """One message for a command line that did not parse (`configs.define_flags` installs the --config one)."""
  del argv
  return f"bad command line: {str(error).strip() or type(error).__name__}. Fix: see --help for the flags"

USER_ERRORS = (UserError, ValueError, OSError, NotImplementedError, FloatingPointError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def debug_requested() -> bool:
  return "--debug" in sys.argv[1:] or os.environ.get("LIDIT_DEBUG", "") not in ("", "0")


def fail(message: str) -> NoReturn:
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def warn(message: str):
  print(f"warning: {message}", file=sys.stderr)


def describe(e: BaseException) -> str:
  return str(e).strip() or type(e).__name__


@contextlib.contextmanager
def user_errors():
  """Turn a user error raised inside into `fail(message)`, and Ctrl-C into one line and exit status 130 (unless
  --debug / LIDIT_DEBUG=1)."""
  try:
    yield
  except USER_ERRORS as e:
    if debug_requested():
      raise
    fail(describe(e))
  except KeyboardInterrupt:  # Ctrl-C outside the trainer's own handling: no traceback, the shell's status
    if debug_requested():
      raise
    sys.stdout.flush()
    print("interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def run(main) -> NoReturn:
  """`absl.app.run(main)` with flag and config errors, and user errors raised by `main`, as one message."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show the Python traceback of an error instead of one message "
                      "(also: LIDIT_DEBUG=1).")
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["debug"])  # listed under --help

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error, or whatever ml_collections raises for a --config.* override
      if debug_requested():
        raise
      fail(explain_flag_error(argv, e))

  def guarded(argv):
    with user_errors():
      return main(argv)

  app.run(guarded, flags_parser=parse)


def add_debug_flag(parser):
  """The same switch for argparse entry points."""
  parser.add_argument("--debug", action="store_true",
                      help="show the Python traceback of an error instead of one message (also: LIDIT_DEBUG=1)")
