"""The evaluator protocol: `Evaluator` (one configured evaluation) and `Result` (what it found)."""

from __future__ import annotations

import abc
import dataclasses
import datetime
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import errors
from diffusion_jax import inference

EVAL_DIR = "eval"


@dataclasses.dataclass
class Result:
  """What an evaluator found: the sections of the JSON schema, TensorBoard scalars and a summary line."""

  kind: str
  figures: dict[str, Any]
  details: dict[str, Any]
  settings: dict[str, Any]
  seconds: dict[str, float]
  scalars: dict[str, float]  # TensorBoard tag -> value
  summary: str
  chart: Any = None  # chart(path, title_prefix) writes a picture beside the JSON, or None

  def record(self, name: str, *, step: int, use_ema: bool, workdir) -> dict[str, Any]:
    return {
      "name": name,
      "kind": self.kind,
      "step": int(step),
      "use_ema": bool(use_ema),
      "workdir": str(workdir),
      "created": timestamp(),
      "figures": self.figures,
      "details": self.details,
      "settings": self.settings,
      "seconds": self.seconds,
    }


def timestamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def split_result(result: dict[str, Any], settings_keys=()) -> tuple[dict, dict, dict]:
  """(figures, details, settings) of a metric's flat result: numbers, the rest, and the named settings."""
  figures, details, settings = {}, {}, {}
  for k, v in result.items():
    if k in settings_keys:
      settings[k] = v
    elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
      figures[k] = v
    else:
      details[k] = v
  return figures, details, settings


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Evaluator(abc.ABC):
  """One entry of `config.evals`, configured: the entry's settings are the constructor's keyword arguments, and
  `run(model, mesh=)` evaluates a loaded model and returns a `Result`.

  The keyword arguments here are the fields every entry has (`config_base.eval_entry`): `every` and `at_end`
  (when the training loop runs it), `num_samples` and `sampling` (the sample set of the kinds that draw one). A
  kind's own settings are keyword arguments of its constructor. The constructor checks them all (`check`), so
  settings that cannot work fail before anything runs.
  """

  kind = ""

  def __init__(
    self,
    name: str,
    config: ml_collections.ConfigDict,
    workdir,
    *,
    every: int = 0,
    at_end: bool = False,
    num_samples: int = 0,
    sampling: ml_collections.ConfigDict | None = None,
  ):
    self.name, self.config, self.workdir = name, config, epath.Path(workdir)
    self.every = int(every or 0)
    self.at_end = bool(at_end)
    self.num_samples = int(num_samples or 0)
    self.sampling = sampling
    self.check()

  def check(self) -> None:
    """Raises UserError for settings that cannot work, before anything runs."""

  @abc.abstractmethod
  def run(self, model: inference.LoadedModel, *, mesh: Mesh) -> Result:
    """Evaluates `model` on the devices of `mesh`."""


def check_eval_split(evaluator: Evaluator, what: str) -> None:
  """Evaluations of the data need `config.data.eval_split`."""
  config = evaluator.config
  if not config.data.eval_split:
    raise errors.UserError(
      f"No eval split for dataset {config.data.dataset!r} (config.data.eval_split is empty), so {what} cannot "
      f"be computed: set --config.data.eval_split=<split> or leave {evaluator.name!r} out of config.eval.metrics "
      "(e.g. --config.eval.metrics=fid)."
    )
