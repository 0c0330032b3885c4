"""The few places where this package relies on what its dependencies do not promise, fenced in one module.

Each function here depends on a detail a dependency may change in any release
(an error's text, a private function's name, a device file). Each is covered by
a test in tests/compat_test.py (and the behaviour tests named there) that
fails, naming the dependency, when that detail changes, so a new release of
JAX, Orbax or TensorStore shows up in CI instead of as a silently worse
message for users. Nothing else in the package reaches into a dependency's
internals.

* `describe_restore_error`: TensorStore's text for an unreadable array of an
  OCDBT checkpoint ("Error reading ... in OCDBT database at local file ...",
  "byte range [a, b) is not valid for value of size n"): Orbax passes the
  error on as text, with no structured field for the array or the file.
* `quiet_abandoned_reads`: the name of Orbax's coroutine that reads one array
  (`ABANDONED_READ`), to drop the reports of the reads a failed restore
  abandons.
* `is_disk_full` and `DISK_FULL_REPORTS`: a write that failed for lack of
  space, where a dependency passes it on as text (TensorStore's
  "RESOURCE_EXHAUSTED: ... No space left on device") rather than as an
  `OSError` with errno ENOSPC; the text is the C library's own
  (`os.strerror(ENOSPC)`).
* `on_cloud_tpu_vm`: TPU chips are found as the device files the TPU driver
  creates (/dev/accel*, /dev/vfio/N) with libtpu installed; JAX's own check is
  private (`jax._src.cloud_tpu_init`). `libtpu_without_tpu`: the same device
  files, and the `jax_plugins` namespace package where JAX finds accelerator
  plugins.
"""

from __future__ import annotations

import errno
import glob
import importlib.util
import logging as logging_std
import os
import pathlib
import pkgutil
import re
import sys
import threading
import traceback
import warnings

from etils import epath


def short_error(error: BaseException, limit: int = 400) -> str:
  """The first line of an error, shortened: TensorStore errors carry pages of JSON specs."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text if len(text) <= limit else text[:limit] + " …"
  return f"{type(error).__name__}: {text}"


_READ_ERROR = re.compile(r'Error reading "(?P<key>[^"]+)" in OCDBT database at local file "(?P<db>[^"]+)"')
_VALUE_SIZE = re.compile(r"byte range \[\d+, (?P<wanted>\d+)\) is not valid for value of size (?P<size>\d+)")


def _errors_in_chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def describe_restore_error(error: BaseException) -> str:
  """What failed, in the user's terms: the array and the file where TensorStore says so, else the error's first line.

  Orbax reports an unreadable array as "Encountered error while reading array
  index …" with a TensorStore spec; the cause underneath names the array's key
  in the OCDBT database and, for a short file, the size it found. The data file
  of that size in the database is the damaged one.
  """
  for e in _errors_in_chain(error):
    match = _READ_ERROR.search(str(e))
    if not match:
      continue
    array = match.group("key").rsplit("/", 1)[0]
    database = epath.Path(match.group("db"))
    size = _VALUE_SIZE.search(str(e))
    if size:
      found, wanted = int(size.group("size")), int(size.group("wanted"))
      files = [
        pathlib.Path(root) / name
        for root, _, names in os.walk(database)
        for name in names
        if pathlib.Path(root).name == "d" and (pathlib.Path(root) / name).stat().st_size == found
      ]
      where = f"the data file {files[0]}" if len(files) == 1 else f"a data file in {database}"
      return (
        f"array {array} cannot be read: {where} holds {found:,} bytes, but the array is stored up to byte "
        f"{wanted:,} (the file is truncated)"
      )
    return f"array {array} cannot be read from {database}: {short_error(e)}"
  return short_error(error)


ABANDONED_READ = "_read_array_index_and_device_put"  # Orbax's coroutine reading one array


def _raised_in_abandoned_read(error: BaseException | None) -> bool:
  for e in _errors_in_chain(error):
    if _READ_ERROR.search(str(e)) or any(
      frame.name == ABANDONED_READ for frame in traceback.extract_tb(e.__traceback__)
    ):
      return True
  return False


def _is_abandoned_read(unraisable) -> bool:
  if getattr(getattr(unraisable, "object", None), "__qualname__", "").endswith(ABANDONED_READ):
    return True
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return bool(frames) and frames[-1].name == "_check_closed"
  return _raised_in_abandoned_read(error)


class _AbandonedReadFilter(logging_std.Filter):
  """asyncio's "exception was never retrieved" for the reads of a restore that already failed."""

  def filter(self, record):
    return not (record.exc_info and _raised_in_abandoned_read(record.exc_info[1]))


def quiet_abandoned_reads() -> None:
  """Drops the reports of the reads Orbax abandons after a failed restore; everything else passes on.

  When one array of a checkpoint cannot be read, Orbax's restore raises at
  once and closes its event loop while TensorStore is still reading the other
  arrays; each of those reads then reports "Event loop is closed", its
  coroutine's own error, an unretrieved future or a coroutine never awaited
  through `sys.unraisablehook`, asyncio's logger and `warnings`: thousands of tracebacks for one damaged file.
  `checkpointing.restore_latest` reports the failure itself.
  """
  if getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(_AbandonedReadFilter())
  warnings.filterwarnings("ignore", message=f"coroutine '{ABANDONED_READ}' was never awaited", category=RuntimeWarning)


def _tpu_chips_here() -> bool:
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def on_cloud_tpu_vm() -> bool:
  """Whether this machine has Cloud TPU chips (the TPU driver's device files) and libtpu installed."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return _tpu_chips_here()


def libtpu_without_tpu() -> bool:
  """Whether libtpu is installed (for the plan) on a machine with no TPU chip and no other accelerator plugin.

  JAX then loads libtpu when it starts its backends all the same, and libtpu writes several lines of warnings
  (no accelerator type, no worker hostnames) before JAX goes on with the CPU. Accelerator plugins are the modules
  of the `jax_plugins` namespace package, where JAX itself finds them (`jax._src.xla_bridge`).
  """
  if importlib.util.find_spec("libtpu") is None or _tpu_chips_here():
    return False
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top

    if any(pkgutil.iter_modules(jax_plugins.__path__)):
      return False
  return True


_NO_SPACE_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` (or an error in its chain of causes) is a write that failed for lack of space."""
  for e in _errors_in_chain(error):
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if _NO_SPACE_TEXT in str(e):
      return True
  return False


class _DiskFullReports(logging_std.Filter):
  """Drops the log records that report a write failed for lack of space, and remembers the first.

  Orbax's background save threads log one failed write several times, each
  with a traceback; the command reports the failure once, in its own words
  (what failed, the free space, what is intact, how to continue). `first` is
  the first such report (its exception, or its message); the training loop
  reads it after each step and stops.
  """

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self.first: BaseException | str | None = None

  def filter(self, record: logging_std.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and is_disk_full(error):
      report = error
    elif _NO_SPACE_TEXT in record.getMessage():
      report = record.getMessage()
    else:
      return True
    with self._lock:
      if self.first is None:
        self.first = report
    return False

  def reset(self) -> None:
    with self._lock:
      self.first = None


DISK_FULL_REPORTS = _DiskFullReports()
