"""What an evaluation of a workdir scores: the newest checkpoint's EMA parameters, in the model the config describes.

`load_eval_model` checks the config against the one the checkpoint was trained with (the fields that change what
the parameters mean); `check_batch_size` checks `config.eval.batch_size` against the mesh before anything loads.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import checkpointing
from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import workdirs

# Config fields that must match the checkpoint's saved config for its parameters to mean the same model.
_MODEL_FIELDS = ("model.", "diffusion.", "data.dataset", "data.image_size", "data.channels")
_IGNORED_MODEL_FIELDS = ("model.dropout",)  # no effect at evaluation


def _check_model_config(saved: ml_collections.ConfigDict, requested: ml_collections.ConfigDict, workdir) -> None:
  diff = [
    k
    for k in workdirs.incompatible_fields(workdirs.config_to_dict(saved), workdirs.config_to_dict(requested))
    if k.startswith(_MODEL_FIELDS) and k not in _IGNORED_MODEL_FIELDS
  ]
  if diff:
    raise errors.UserError(
      f"The config given for evaluation differs from the one {workdir} was trained with in "
      f"{', '.join(diff)}: pass the run's own config (--config={epath.Path(workdir) / 'config.json'} "
      "or the same configs/*.py file)."
    )


def load_eval_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> inference.LoadedModel:
  """The newest checkpoint's EMA parameters in the model that `config` describes (checked against the saved one)."""
  saved, params, step = checkpointing.load_params(workdir, use_ema=True)
  _check_model_config(saved, config, workdir)
  return inference.model_from_config(config, params, step=step, use_ema=True)


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """`config.eval.batch_size`, a positive multiple of the devices of `mesh` and of the processes."""
  batch_size = int(config.eval.batch_size)
  processes = jax.process_count()
  if batch_size < 1 or batch_size % mesh.size or batch_size % processes:
    unit = mesh.size * processes // math.gcd(mesh.size, processes)
    of = f"the number of devices ({mesh.size})"
    if processes > 1:
      of = f"{of} and of processes ({processes}), i.e. of {unit}"
    raise errors.UserError(
      f"config.eval.batch_size={batch_size} must be a positive multiple of {of}; set --config.eval.batch_size "
      f"accordingly (e.g. {max(unit, batch_size // unit * unit)})."
    )
  return batch_size
