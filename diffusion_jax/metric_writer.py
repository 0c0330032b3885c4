"""One writer of scalars and images for training and evaluation: TensorBoard event files, process 0 only.

Uses tensorboardX (no TensorFlow needed), imported by the process that writes. Every other process gets a writer
that does nothing, so callers need no `process_index` checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath

TENSORBOARD_DIR = "tensorboard"


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
      for k, v in scalars.items():
        if math.isfinite(float(v)):  # TensorBoard cannot show NaN/inf; the JSON and console keep them
          self._writer.add_scalar(k, float(v), step)
      self._writer.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")
      self._writer.flush()

  def close(self):
    if self._writer:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
