"""Checkpoints: Orbax save, restore with fallback, integrity checksums, model loading.

A workdir holds everything of a run:

  workdir/config.json       the resolved config of the run (`workdirs`)
  workdir/checkpoints/N/    Orbax checkpoint of step N: item `state` (the train
                            state, or {step, params, ema_params} for imported
                            weights), item `integrity` (a checksum of every
                            array of `state`) and, for training runs, item
                            `data` (the input iterator's position)
  workdir/corrupt_checkpoints/N/  unreadable checkpoints a training run set aside
  workdir/tensorboard/, samples/, eval/

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a checkpoint interrupted mid-write never shows up as a step; a
step that is present but unreadable (missing, truncated or garbled files: the
checksums catch what the storage format does not) is reported and the previous
one used.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from diffusion_jax import compat
from diffusion_jax import errors as errors_lib
from diffusion_jax import workdirs

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"
CORRUPT_DIR = "corrupt_checkpoints"

# ----------------------------------------------------------------------------
# Checkpoint managers.
# ----------------------------------------------------------------------------


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """workdir/checkpoints, made absolute for local paths (Orbax requires absolute paths)."""
  workdir = os.fspath(workdir)
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / CHECKPOINT_DIR


class _SaveLog:
  """One console line per checkpoint: its step, size and seconds, logged when the save is complete.

  Asynchronous saves report from Orbax's finalisation thread
  (`AsyncOptions.post_finalization_callback`), so the line comes when the
  checkpoint is really written, not when training moves on.
  """

  def __init__(self, directory: epath.Path):
    self._directory = directory
    self._pending = []
    self._lock = threading.Lock()

  def started(self, step: int, args) -> None:
    try:
      state = args[STATE_ITEM].item
      size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    except (KeyError, AttributeError, TypeError):
      size = 0
    with self._lock:
      self._pending.append((step, size, time.monotonic()))

  def finished(self) -> None:
    with self._lock:
      if not self._pending:
        return
      step, size, t0 = self._pending.pop(0)
    if jax.process_index() == 0:
      logging.info(
        "Saved the checkpoint of step %d (%s of arrays, %.1f s) in %s.",
        step,
        workdirs.format_bytes(size),
        time.monotonic() - t0,
        self._directory,
      )


class _LoggingCheckpointManager(ocp.CheckpointManager):
  """A CheckpointManager that logs one line per completed save (see `_SaveLog`)."""

  def __init__(self, directory, *, save_log: _SaveLog, options: ocp.CheckpointManagerOptions, **kwargs):
    self._save_log = save_log
    self._async_save = options.enable_async_checkpointing
    super().__init__(directory, options=options, **kwargs)

  def save(self, step, *args, **kwargs):
    self._save_log.started(step, kwargs.get("args", args[0] if args else None))
    saved = super().save(step, *args, **kwargs)
    if not saved:
      self._save_log._pending.pop()  # pylint: disable=protected-access  (nothing was written)
    elif not self._async_save:
      self._save_log.finished()
    return saved


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the checkpoint folders in workdir/checkpoints (readable or not), ascending."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def create_manager(
  workdir: str | os.PathLike,
  *,
  max_to_keep: int | None = 2,
  async_save: bool = True,
  item_handlers=None,
  log_saves: bool = False,
) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager on workdir/checkpoints (created if needed).

  With `log_saves`, every completed save logs one line: step, size, seconds.
  Orbax waits for the previous asynchronous save to finish before it starts
  the next one, so at most one save is in progress at any time.
  """
  directory = checkpoint_dir(workdir)
  save_log = _SaveLog(directory) if log_saves else None
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,  # leftovers of saves cut short (kill -9, preemption)
    async_options=(
      ocp.AsyncOptions(post_finalization_callback=save_log.finished) if save_log is not None and async_save else None
    ),
  )
  if save_log is None:
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)
  return _LoggingCheckpointManager(directory, save_log=save_log, options=options, item_handlers=item_handlers)


def _leaf_name(path) -> str:
  """'params.down_0.block_0.conv1.kernel': the same for a TrainState and the dicts Orbax restores it as."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _leaf_checksum(x) -> jax.Array:
  """Σ bits(xᵢ)·wᵢ mod 2³² with odd weights wᵢ: any change of one element changes it; exact on any device."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  weights = (jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x9E3779B1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
  return [_leaf_checksum(x) for x in leaves]


def _host_checksum(x: np.ndarray) -> int:
  """`_leaf_checksum` in NumPy (uint32 arithmetic wraps the same way), for arrays of at most 4-byte elements."""
  x = np.ascontiguousarray(x).reshape(-1)
  bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.itemsize])
  bits = bits.astype(np.uint32)
  weights = (np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)) * np.uint32(0x9E3779B1)
  return int(np.sum(bits * weights, dtype=np.uint32))


def _on_host(leaf) -> bool:
  if isinstance(leaf, np.ndarray | np.generic):
    return leaf.dtype.itemsize <= 4
  return (
    isinstance(leaf, jax.Array)
    and leaf.is_fully_addressable
    and leaf.dtype.itemsize <= 4
    and all(d.platform == "cpu" for d in leaf.devices())
  )


def checksums(tree: Any) -> dict[str, int]:
  """A 32-bit checksum of every array of `tree`, by dotted leaf name; computed where the arrays live.

  Arrays in host memory (NumPy, or JAX arrays on CPU devices) are summed with
  NumPy, which needs no compilation (a restart would otherwise trace and load
  a program over every leaf); others by one jitted program on their devices.
  """
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [leaf for _, leaf in paths_and_leaves]
  if all(_on_host(leaf) for leaf in leaves):
    values = [_host_checksum(np.asarray(leaf)) for leaf in leaves]
  else:
    values = jax.device_get(_checksums(leaves))
  return {_leaf_name(path): int(v) for (path, _), v in zip(paths_and_leaves, values)}


def integrity_save_args(state: Any):
  """The `integrity` item of a checkpoint of `state` (an `ocp.args.Composite` entry)."""
  return ocp.args.JsonSave({STATE_ITEM: checksums(state)})


def _verify_integrity(step: int, restored: Any) -> None:
  expected = restored[INTEGRITY_ITEM][STATE_ITEM]
  actual = checksums(restored[STATE_ITEM])
  bad = sorted(k for k in expected if actual.get(k) != expected[k])
  if bad:
    listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise errors_lib.UserError(
      f"checksum mismatch in {len(bad)} of {len(expected)} arrays ({listed}): the files of "
      f"step {step} were changed after they were written"
    )


def restore_latest(
  manager: ocp.CheckpointManager, make_args, *, steps: Sequence[int] | None = None
) -> tuple[int, Any] | None:
  """Restores the newest readable checkpoint; returns (step, restored) or None if there is none.

  A checkpoint that fails to restore (missing, truncated or corrupt files, or
  arrays whose checksums no longer match the `integrity` item written with
  them) is reported with a warning and the next older one is tried; if none is
  readable the error names every step tried.

  Args:
    manager: the checkpoint manager.
    make_args: step -> `ocp.args.Composite` to restore with. The `integrity`
      item, where the checkpoint has one, is added and checked here.
    steps: the steps to consider (default: all, newest first).
  """
  steps = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  errors = []
  compat.quiet_abandoned_reads()
  for step in steps:
    try:
      args = make_args(step)
      check = (
        INTEGRITY_ITEM not in args
        and STATE_ITEM in args
        and (epath.Path(manager.directory) / str(step) / INTEGRITY_ITEM).exists()
      )
      if check:
        args = ocp.args.Composite(**dict(args.items()), **{INTEGRITY_ITEM: ocp.args.JsonRestore()})
      restored = manager.restore(step, args=args)
      if check:
        _verify_integrity(step, restored)
    except Exception as e:  # noqa: BLE001 - any failure to read marks the checkpoint as bad
      logging.warning(
        "Checkpoint of step %d in %s is unreadable and is skipped: %s. Trying an older one.",
        step,
        manager.directory,
        compat.describe_restore_error(e),
      )
      errors.append(f"step {step}: {compat.describe_restore_error(e)}")
      continue
    if errors:
      logging.warning(
        "Using the checkpoint of step %d after skipping %d unreadable newer checkpoint(s) (steps %s).",
        step,
        len(errors),
        ", ".join(e.split(":")[0].split()[1] for e in errors),
      )
    return step, restored
  if errors:
    raise errors_lib.UserError(
      f"No checkpoint in {manager.directory} could be restored:\n  "
      + "\n  ".join(errors)
      + f"\nRestore the files from a backup, or move {manager.directory} aside to start over."
    )
  return None


def _copy_tree(src: epath.Path, dest: epath.Path) -> None:
  dest.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      _copy_tree(child, dest / child.name)
    else:
      child.copy(dest / child.name)


def set_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> None:
  """Moves unreadable checkpoints to workdir/corrupt_checkpoints/ so the run can write those steps again.

  Every process calls this; process 0 moves the files (on object stores that
  cannot rename directories: copies, then deletes them).
  """
  directory = epath.Path(manager.directory)
  if steps and jax.process_index() == 0:
    dest_root = directory.parent / CORRUPT_DIR
    for step in steps:
      src = directory / str(step)
      dest, n = dest_root / str(step), 1
      while dest.exists():
        dest, n = dest_root / f"{step}.{n}", n + 1
      dest_root.mkdir(parents=True, exist_ok=True)
      try:
        src.rename(dest)
      except Exception:  # noqa: BLE001 - object stores may not rename directories: copy, then delete
        _copy_tree(src, dest)
        src.rmtree()
      logging.warning("Moved the unreadable checkpoint %s to %s.", src, dest)
  if steps and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("diffusion_jax.checkpointing.set_aside")
  manager.reload()


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
  workdirs.write_config(directory, config)
  manager = create_manager(directory, max_to_keep=None, async_save=False)
  if step in manager.all_steps():
    raise errors_lib.ExistingFileError(
      f"{checkpoint_dir(directory) / str(step)} already exists; refusing to overwrite it."
    )
  tree = dict(step=step, params=params, ema_params=params if ema_params is None else ema_params)
  manager.save(
    step,
    args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree), INTEGRITY_ITEM: integrity_save_args(tree)}),
  )
  manager.wait_until_finished()
  manager.close()
  return checkpoint_dir(directory) / str(step)


def _find_workdir(path: epath.Path) -> tuple[epath.Path, int | None]:
  """Accepts a workdir, its checkpoints/ folder or one step folder; returns (workdir, step or None)."""
  if (path / workdirs.CONFIG_FILE).exists():
    return path, None
  if path.name == CHECKPOINT_DIR and (path.parent / workdirs.CONFIG_FILE).exists():
    return path.parent, None
  if (
    path.name.isdigit() and path.parent.name == CHECKPOINT_DIR and (path.parent.parent / workdirs.CONFIG_FILE).exists()
  ):
    return path.parent.parent, int(path.name)
  raise errors_lib.MissingFileError(
    f"{path} holds no diffusion_jax checkpoint: expected a workdir with {workdirs.CONFIG_FILE} and {CHECKPOINT_DIR}/, "
    "its checkpoints/ folder, or one checkpoints/<step> folder. To use released weights, convert them first "
    "(python -m diffusion_jax.convert --help)."
  )


def _host_target(manager: ocp.CheckpointManager, step: int) -> Any:
  """A restore target that puts every saved array whole on this process's first device.

  A checkpoint records the device mesh it was written from; restoring without a
  target only works on the same topology. With this target a checkpoint from a
  TPU pod slice or several GPU hosts loads on one CPU, and vice versa.
  """
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(manager.directory) / str(step) / STATE_ITEM)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(m):
    if isinstance(m, ocp.metadata.ArrayMetadata):
      return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
    return m

  return jax.tree.map(leaf, metadata)


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
  config = workdirs.read_config(workdir)
  step = path_step if step is None else step
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  if not manager.all_steps():
    raise errors_lib.MissingFileError(f"{checkpoint_dir(workdir)} holds no checkpoint.")
  if step is not None and step not in manager.all_steps():
    raise errors_lib.MissingFileError(
      f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; present: {manager.all_steps()}."
    )

  def args(step):
    return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(_host_target(manager, step))})

  found = restore_latest(manager, args, steps=None if step is None else [step])
  manager.close()
  assert found is not None
  step, restored = found
  tree = restored[STATE_ITEM]
  key = "ema_params" if use_ema else "params"
  if key not in tree:
    raise errors_lib.UserError(f"The checkpoint at step {step} in {workdir} has no {key!r}.")
  params = jax.device_get(tree[key])
  return config, params, step
