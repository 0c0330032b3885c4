"""One writer of scalars and images for training and evaluation: TensorBoard event files, process 0 only.

Uses tensorboardX (no TensorFlow needed), imported by the process that writes. Every other process gets a writer
that does nothing, so callers need no `process_index` checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import compat
from diffusion_jax import errors
from diffusion_jax import workdirs

TENSORBOARD_DIR = "tensorboard"
_ROOM = 1 << 20  # free bytes required before a write: event files grow by a few KiB per write


class MetricWriter:
  """Scalars and images under `workdir/tensorboard`, written by process 0."""

  def __init__(self, workdir, *, filename_suffix: str = ""):
    """Opens the writer; `filename_suffix` keeps event files of concurrent writers apart."""
    self._writer = None
    self.logdir = epath.Path(workdir) / TENSORBOARD_DIR
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (only where it writes)

      self._writer = SummaryWriter(str(self.logdir), filename_suffix=filename_suffix)

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer:
      self._check_room(f"the TensorBoard scalars of step {step}")
      for k, v in scalars.items():
        if math.isfinite(float(v)):  # TensorBoard cannot show NaN/inf; the JSON and console keep them
          self._writer.add_scalar(k, float(v), step)
      self._flush(f"the TensorBoard scalars of step {step}")

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._check_room(f"the TensorBoard image {name} of step {step}")
      self._writer.add_image(name, image, step, dataformats="HWC")
      self._flush(f"the TensorBoard image {name} of step {step}")

  def _check_room(self, what: str) -> None:
    """A full disk stops the work here, before tensorboardX's writer thread would fail on it."""
    workdirs.check_free_space(self.logdir, _ROOM, what)

  def _flush(self, what: str) -> None:
    try:
      self._writer.flush()
    except OSError as e:
      if compat.is_disk_full(e):
        self._abandon()
        raise errors.NoSpaceError(e.errno, f"No room for {what} in {self.logdir}: {e.strerror}.") from e
      raise

  def _abandon(self) -> None:
    """Drops the writer after a failed write: its buffered events cannot be written either."""
    writer, self._writer = self._writer, None
    try:
      writer.close()
    except OSError:
      pass  # the same full disk, already reported

  def close(self):
    if self._writer:
      try:
        self._writer.close()
      except OSError as e:
        if not compat.is_disk_full(e):
          raise
        logging.warning("The last TensorBoard events could not be written to %s: %s.", self.logdir, e.strerror)
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
