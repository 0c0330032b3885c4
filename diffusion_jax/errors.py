"""User errors: problems with what the user gave, reported as one message that names the problem and the fix.

Our code raises `UserError`, or one of its subclasses below, exactly where the
user can fix the problem: bad configs, paths, damaged or mismatched
checkpoints, weights and images, a missing optional package, a diverged run.
The command-line entry points print such errors as `error: <message>` and exit
with status `EXIT_USER_ERROR`, with no traceback. Every other exception,
whatever its type and wherever it is raised (our code, JAX, NumPy, Orbax), is
an internal error and keeps its traceback.

The subclasses also derive from the standard type a caller would catch
(`FileNotFoundError`, `ImportError`, ...), so `except FileNotFoundError` still
sees a missing file.

This module imports nothing from the package, so every floor may use it.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
# A write failed for lack of space (EX_IOERR). Nothing complete was lost: the same command continues once space is
# freed. Distinct from 75 (stopped by a signal or preemption), which schedulers restart at once.
EXIT_NO_SPACE = 74


class UserError(ValueError):
  """A problem with the user's input (config, path, checkpoint, weights, images); the message names the fix."""


class MissingFileError(FileNotFoundError, UserError):
  """A file or folder the user named (or a run needs) does not exist."""


class ExistingFileError(FileExistsError, UserError):
  """A file the command would write exists already; nothing is overwritten."""


class UnwritableError(PermissionError, UserError):
  """A folder the command must write to cannot be written."""


class NoSpaceError(OSError, UserError):
  """Not enough free space for what the command must write; the command exits with `EXIT_NO_SPACE`."""

  exit_status = EXIT_NO_SPACE


class MissingPackageError(ImportError, UserError):
  """An optional package the requested work needs is not installed; the message names the pip command."""


class DivergedError(FloatingPointError, UserError):
  """Training produced a non-finite loss or gradient."""


def is_user_error(error: BaseException) -> bool:
  """True for `UserError`s (and its subclasses): problems the message tells the user how to fix."""
  return isinstance(error, UserError)


def message(error: BaseException) -> str:
  """The message of a user error, without the exception type."""
  if isinstance(error, OSError) and error.strerror and error.args and len(error.args) >= 2:
    return str(error.strerror)
  return str(error).strip() or type(error).__name__
