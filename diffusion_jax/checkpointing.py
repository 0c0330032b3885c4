"""Workdirs and checkpoints: Orbax save/restore/resume, config records, model loading.

A workdir holds everything of a run:

  workdir/config.json       the resolved config of the run
  workdir/checkpoints/N/    Orbax checkpoint of step N: item `state` (the train
                            state, or {step, params, ema_params} for imported
                            weights) and, for training runs, item `data` (the
                            input iterator's position)
  workdir/tensorboard/, samples/, eval/

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a checkpoint interrupted mid-write never shows up as a step; a
step that is present but unreadable is reported and the previous one used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"

# Config fields a run may change when it continues from a workdir; everything
# else (data, model, diffusion, optimizer) must match the saved config.
RESUMABLE_FIELDS = ("training", "sampling", "eval", "data.data_dir", "data.worker_count", "data.skip_corrupt",
                    "model.dtype", "model.remat")


# ----------------------------------------------------------------------------
# Configs in workdirs.
# ----------------------------------------------------------------------------


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads workdir/config.json; raises FileNotFoundError naming the path if absent."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not a diffusion_jax workdir.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def incompatible_fields(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """Dotted names of fields that differ between two configs, ignoring RESUMABLE_FIELDS."""

  def free(key):
    return any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS)

  a, b = _flatten(saved), _flatten(requested)
  return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k, "<missing>") != b.get(k, "<missing>"))


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records the run's config in the workdir, refusing an incompatible one.

  A workdir that already holds a config is only continued with a config whose
  data, model, diffusion and optimizer settings are the same; the training,
  sampling and eval settings may change (the new ones are recorded, the old
  file is kept as config.json.N).
  """
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  new = config_to_dict(config)
  if path.exists():
    old = json.loads(path.read_text())
    diff = incompatible_fields(old, new)
    if diff:
      a, b = _flatten(old), _flatten(new)
      details = "; ".join(f"{k}: saved {a.get(k, '<missing>')!r}, requested {b.get(k, '<missing>')!r}" for k in diff)
      raise ValueError(
          f"The workdir {workdir} holds a run with a different configuration ({details}). "
          "Use a new --workdir, or pass the saved configuration "
          f"(--config={path})."
      )
    if old == new:
      return
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if path.exists():
    n = 1
    while (workdir / f"{CONFIG_FILE}.{n}").exists():
      n += 1
    path.rename(workdir / f"{CONFIG_FILE}.{n}")
  tmp = workdir / f"{CONFIG_FILE}.tmp"
  tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
  tmp.rename(path)


# ----------------------------------------------------------------------------
# Checkpoint managers.
# ----------------------------------------------------------------------------


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


def create_manager(
    workdir: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True, item_handlers=None
) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager on workdir/checkpoints (created if needed)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=item_handlers)


def restore_latest(
    manager: ocp.CheckpointManager, make_args, *, steps: Sequence[int] | None = None
) -> tuple[int, Any] | None:
  """Restores the newest readable checkpoint; returns (step, restored) or None if there is none.

  A checkpoint that fails to restore (truncated or corrupt files) is reported
  with a warning and the next older one is tried; if none is readable the
  error names every step tried.

  Args:
    manager: the checkpoint manager.
    make_args: step -> `ocp.args.Composite` to restore with.
    steps: the steps to consider (default: all, newest first).
  """
  steps = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  errors = []
  for step in steps:
    try:
      restored = manager.restore(step, args=make_args(step))
    except Exception as e:  # noqa: BLE001 - any failure to read marks the checkpoint as bad
      logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying an older one.",
                      step, manager.directory, type(e).__name__, e)
      errors.append(f"step {step}: {type(e).__name__}: {e}")
      continue
    if errors:
      logging.warning("Resumed from step %d after skipping %d unreadable checkpoint(s).", step, len(errors))
    return step, restored
  if errors:
    raise RuntimeError(f"No checkpoint in {manager.directory} could be restored:\n  " + "\n  ".join(errors))
  return None


# ----------------------------------------------------------------------------
# Model checkpoints (imported weights) and loading parameters.
# ----------------------------------------------------------------------------


def save_model_checkpoint(
    directory: str | os.PathLike,
    *,
    config: ml_collections.ConfigDict,
    params: Any,
    ema_params: Any | None = None,
    step: int = 0,
) -> epath.Path:
  """Writes parameters as a workdir that `load_params`, sampling, eval and fine-tuning accept.

  Args:
    directory: the new workdir; it must not already hold a checkpoint at `step`.
    config: the model's full config.
    params: the raw parameters (the nested dict under 'params').
    ema_params: the EMA parameters (default: `params`).
    step: the training step the weights come from.

  Returns:
    The checkpoint directory.
  """
  directory = epath.Path(directory)
  write_config(directory, config)
  manager = create_manager(directory, max_to_keep=None, async_save=False)
  if step in manager.all_steps():
    raise FileExistsError(f"{checkpoint_dir(directory) / str(step)} already exists; refusing to overwrite it.")
  tree = dict(step=step, params=params, ema_params=params if ema_params is None else ema_params)
  manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree)}))
  manager.wait_until_finished()
  manager.close()
  return checkpoint_dir(directory) / str(step)


def _find_workdir(path: epath.Path) -> tuple[epath.Path, int | None]:
  """Accepts a workdir, its checkpoints/ folder or one step folder; returns (workdir, step or None)."""
  if (path / CONFIG_FILE).exists():
    return path, None
  if path.name == CHECKPOINT_DIR and (path.parent / CONFIG_FILE).exists():
    return path.parent, None
  if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR and (path.parent.parent / CONFIG_FILE).exists():
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(
      f"{path} holds no diffusion_jax checkpoint: expected a workdir with {CONFIG_FILE} and {CHECKPOINT_DIR}/, "
      "its checkpoints/ folder, or one checkpoints/<step> folder. To use released weights, convert them first "
      "(python -m diffusion_jax.convert --help)."
  )


def load_params(
    path: str | os.PathLike, *, use_ema: bool = True, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Any, int]:
  """Loads a model's parameters (as host NumPy arrays) from a workdir or checkpoint directory.

  Args:
    path: a training workdir, a converted-weights directory, its
      `checkpoints/` folder, or one `checkpoints/<step>` folder.
    use_ema: return the EMA parameters (used for sampling and evaluation).
    step: a specific step (default: the newest readable checkpoint).

  Returns:
    (config, params, step).
  """
  workdir, path_step = _find_workdir(epath.Path(path))
  config = read_config(workdir)
  step = path_step if step is None else step
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  if not manager.all_steps():
    raise FileNotFoundError(f"{checkpoint_dir(workdir)} holds no checkpoint.")
  if step is not None and step not in manager.all_steps():
    raise FileNotFoundError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; present: {manager.all_steps()}.")

  def args(_):
    return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()})

  found = restore_latest(manager, args, steps=None if step is None else [step])
  manager.close()
  assert found is not None
  step, restored = found
  tree = restored[STATE_ITEM]
  key = "ema_params" if use_ema else "params"
  if key not in tree:
    raise ValueError(f"The checkpoint at step {step} in {workdir} has no {key!r}.")
  params = jax.device_get(tree[key])
  return config, params, step
