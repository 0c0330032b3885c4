"""What every command line of the package shares: a quiet console, the compilation cache, user errors.

* `quiet_logging()`: by default the console shows our own lines (INFO and
  up, from diffusion_jax modules) and every library's warnings and errors;
  the INFO lines of Orbax, JAX, absl, grain or TensorFlow are hidden. absl's
  `--verbosity=1` (or higher) shows everything again.
* `start()`: the XLA:CPU options (`xla_flags.apply()`), the above and
  `runtime.enable_compilation_cache()`, for the start of a command, before
  its first JAX computation.
* `exit_on_user_error(fn, *args)`: runs `fn`; a user error
  (`errors.is_user_error`) is printed as `error: <message>` and exits with
  status 2 and no traceback; other errors keep their traceback.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import logging

from diffusion_jax import compat
from diffusion_jax import errors
from diffusion_jax import xla_flags

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class OurLinesFilter(py_logging.Filter):
  """Passes warnings and errors, and lower levels only from modules of this package."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    if record.name == "diffusion_jax" or record.name.startswith("diffusion_jax."):
      return True
    return os.path.abspath(record.pathname or "").startswith(_PACKAGE_DIR + os.sep)


_FILTER = OurLinesFilter()


def quiet_logging() -> None:
  """Hides third-party INFO lines on the console unless absl's --verbosity is 1 or more; always folds the reports
  of writes that failed for lack of space into the command's own message (`compat.DISK_FULL_REPORTS`)."""
  handler = logging.get_absl_handler()
  if compat.DISK_FULL_REPORTS not in handler.filters:
    handler.addFilter(compat.DISK_FULL_REPORTS)
  verbose = logging.get_verbosity() >= 1  # --verbosity=1: everything, as absl prints it
  if verbose:
    handler.removeFilter(_FILTER)
  elif _FILTER not in handler.filters:
    handler.addFilter(_FILTER)


def start() -> str | None:
  """Sets up a command: XLA:CPU options, quiet logging, the compilation cache; returns the cache directory."""
  xla_flags.apply()  # before the command's first JAX computation starts the backends
  quiet_logging()
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (imports JAX)

  return runtime.enable_compilation_cache()


def exit_on_user_error(fn, *args, **kwargs):
  """Calls fn; prints a user error as `error: <message>` and exits with status 2 (no traceback)."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - only user errors are handled; the rest is re-raised
    if not errors.is_user_error(e):
      raise
    sys.stdout.flush()
    sys.stderr.write(f"error: {errors.message(e)}\n")
    sys.stderr.flush()
    sys.exit(getattr(e, "exit_status", errors.EXIT_USER_ERROR))
