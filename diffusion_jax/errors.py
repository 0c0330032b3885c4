"""User errors: problems with what the user gave, reported as one message that names the problem and the fix.

`UserError` (a `ValueError`) is raised for bad configs, paths, damaged or
mismatched checkpoints, weights and images. The command-line entry points print
such errors as `error: <message>` and exit with status `EXIT_USER_ERROR`, with
no traceback; every other exception is an internal error and keeps its
traceback.

Messages our code raises as `ValueError`, `OSError` (missing, existing or
unwritable files, a full disk), `ImportError` (a missing optional package) or
`FloatingPointError` (a diverged run) are user errors too, when the `raise`
is ours: `is_user_error` tells them from the same types raised inside JAX,
NumPy or Orbax, which are internal.

This module imports nothing from the package, so every floor may use it.
"""

from __future__ import annotations

import os

EXIT_USER_ERROR = 2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OUR_TYPES = (ValueError, OSError, ImportError, FloatingPointError)


class UserError(ValueError):
  """A problem with the user's input (config, path, checkpoint, weights, images); the message names the fix."""


def _raised_here(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is in this package (our own `raise`)."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return filename.startswith(_PACKAGE_DIR + os.sep)


def is_user_error(error: BaseException) -> bool:
  """True for `UserError`s and for the user-facing messages our code raises as other standard types."""
  if isinstance(error, UserError):
    return True
  return isinstance(error, _OUR_TYPES) and _raised_here(error)


def message(error: BaseException) -> str:
  """The message of a user error, without the exception type (OSErrors: the text given to them)."""
  if isinstance(error, OSError) and error.strerror and error.args and len(error.args) >= 2:
    return str(error.strerror)
  return str(error).strip() or type(error).__name__
