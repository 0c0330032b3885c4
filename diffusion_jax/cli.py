"""What every command line of the package shares: a quiet console, the compilation cache, user errors.

* `quiet_logging()`: by default the console shows our own lines (INFO and
  up, from diffusion_jax modules) and every library's warnings and errors;
  the INFO lines of Orbax, JAX, absl, grain or TensorFlow are hidden. absl's
  `--verbosity=1` (or higher) shows everything again.
* `start()`: glibc's malloc arenas capped (`limit_malloc_arenas()`), the
  XLA:CPU options (`xla_flags.apply()`), the above and
  `runtime.enable_compilation_cache()`, for the start of a command, before
  its first JAX computation.
* `exit_on_user_error(fn, *args)`: runs `fn`; a user error
  (`errors.is_user_error`) is printed as `error: <message>` and exits with
  status 2 and no traceback; other errors keep their traceback.
"""

from __future__ import annotations

import ctypes
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


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
  """Caps glibc's malloc arenas (as MALLOC_ARENA_MAX=`arenas`) unless MALLOC_ARENA_MAX is set; True if capped.

  Every asynchronous checkpoint runs on threads Orbax starts for it; glibc gives
  threads their own arenas (up to 8 per core) and the memory a save frees there
  stays mapped, fragmented: resident memory grows by megabytes per 1,000 steps
  (benchmarks/soak.py) while the memory in use stays flat. With two arenas it
  stays flat. Must run before the process starts its other threads.
  """
  if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_ARENA_MAX, arenas))


def leave_out_absent_tpu() -> bool:
  """On a machine with libtpu installed (for the plan) but no TPU chip, JAX runs on the CPU without loading libtpu.

  JAX would load libtpu anyway, and libtpu would print its start-up warnings. Nothing changes where JAX_PLATFORMS
  or JAX_FORCE_TPU_INIT is set, where another accelerator plugin is installed, or without libtpu. True if it set
  the platform.
  """
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or not compat.libtpu_without_tpu():
    return False
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_platforms:
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def start() -> str | None:
  """Sets up a command: XLA:CPU options, quiet logging, the compilation cache; returns the cache directory."""
  limit_malloc_arenas()  # before JAX, TensorStore and Orbax start their threads
  xla_flags.apply()  # before the command's first JAX computation starts the backends
  quiet_logging()
  leave_out_absent_tpu()
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
