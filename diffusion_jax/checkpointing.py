"""Workdirs and checkpoints: Orbax save/restore/resume, config records, model loading.

A workdir holds everything of a run:

  workdir/config.json       the resolved config of the run
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

import errno
import json
import os
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
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
from diffusion_jax import config_base
from diffusion_jax import errors as errors_lib
from diffusion_jax import runtime

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"
CORRUPT_DIR = "corrupt_checkpoints"

# Config fields a run may change when it continues from a workdir; everything
# else (data, model, diffusion, optimizer) must match the saved config.
RESUMABLE_FIELDS = (
  "training",
  "sampling",
  "eval",
  "evals",
  "data.data_dir",
  "data.worker_count",
  "data.skip_corrupt",
  "model.dtype",
  "model.remat",
)


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
    raise errors_lib.MissingFileError(f"{path} does not exist: {workdir} is not a diffusion_jax workdir.")
  return config_base.upgrade(json.loads(path.read_text()))


def incompatible_fields(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """Dotted names of fields that differ between two configs, ignoring RESUMABLE_FIELDS."""

  def free(key):
    return any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS)

  a, b = _flatten(saved), _flatten(requested)
  # A field that one config lacks (written by an older version) counts as the base config's default.
  defaults = _flatten(config_base.get_base_config().to_dict())
  return sorted(
    k
    for k in set(a) | set(b)
    if not free(k) and a.get(k, defaults.get(k, "<missing>")) != b.get(k, defaults.get(k, "<missing>"))
  )


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
      raise errors_lib.UserError(
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
  runtime.atomic_write(path, json.dumps(new, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------
# Checkpoint managers.
# ----------------------------------------------------------------------------


CLASSES_FILE = "classes.json"


def write_class_names(workdir: str | os.PathLike, names) -> None:
  """Records a conditional run's class names (label i is names[i]) in workdir/classes.json (process 0)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / CLASSES_FILE
  names = [str(n) for n in names]
  if path.exists():
    old = json.loads(path.read_text())
    if old != names:
      raise errors_lib.UserError(
        f"{path} lists the classes {old}, but the data now has {names}: train in a new workdir."
      )
    return
  runtime.atomic_write(path, json.dumps(names, indent=1) + "\n")


def read_class_names(workdir: str | os.PathLike) -> list[str] | None:
  """The class names recorded by a conditional run, or None."""
  path = epath.Path(workdir) / CLASSES_FILE
  return json.loads(path.read_text()) if path.exists() else None


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
        _format_bytes(size),
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
# Early checks of a workdir.
# ----------------------------------------------------------------------------


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  raise AssertionError


def check_workdir(workdir: str | os.PathLike, *, checkpoint_bytes: int = 0) -> None:
  """Fails early, naming the fix, if the workdir cannot be written or has no room for checkpoints.

  Every process writes and removes a small probe file in the workdir (creating
  it if needed). For local paths the free space must hold two checkpoints of
  `checkpoint_bytes` each; object stores (gs://) are not measured.

  Raises:
    UnwritableError: the workdir cannot be created or written.
    NoSpaceError: not enough free space.
  """
  workdir = epath.Path(workdir)
  probe = workdir / f".write_probe.{jax.process_index()}.{uuid.uuid4().hex}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("diffusion_jax write probe\n")
    probe.unlink()
  except OSError as e:
    raise errors_lib.UnwritableError(
      f"The workdir {workdir} is not writable ({e.strerror or compat.short_error(e)}). Checkpoints, logs and "
      "samples are written there: choose a writable --workdir, or fix the permissions or mount (read-only file "
      "system?)."
    ) from e
  if not _is_local(workdir) or checkpoint_bytes <= 0:
    return
  free = free_bytes(workdir)
  needed = 2 * checkpoint_bytes
  if free < needed:
    raise errors_lib.NoSpaceError(
      errno.ENOSPC,
      f"Not enough free space for the workdir {workdir}: {_format_bytes(free)} free, but two checkpoints need about "
      f"{_format_bytes(needed)} ({_format_bytes(checkpoint_bytes)} each). Free some space or choose another "
      "--workdir.",
      os.fspath(workdir),
    )


def free_bytes(path: str | os.PathLike) -> int | None:
  """Free space on the file system of `path` (or of its nearest existing parent); None for object stores."""
  path = epath.Path(path)
  if not _is_local(path):
    return None
  path = pathlib.Path(os.fspath(path)).absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


def check_free_space(workdir: str | os.PathLike, needed: int, what: str) -> None:
  """Raises `NoSpaceError` before `what` is written if the workdir's file system has less than `needed` bytes free.

  Checked before each checkpoint (and each TensorBoard write), so a full disk stops the run at once, with one
  message, instead of failing inside a background write; object stores are not measured.
  """
  free = free_bytes(workdir)
  if free is not None and free < needed:
    raise errors_lib.NoSpaceError(
      errno.ENOSPC,
      f"No room for {what} in {workdir}: {_format_bytes(free)} free, about {_format_bytes(needed)} needed.",
      os.fspath(workdir),
    )


format_bytes = _format_bytes


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
  if (path / CONFIG_FILE).exists():
    return path, None
  if path.name == CHECKPOINT_DIR and (path.parent / CONFIG_FILE).exists():
    return path.parent, None
  if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR and (path.parent.parent / CONFIG_FILE).exists():
    return path.parent.parent, int(path.name)
  raise errors_lib.MissingFileError(
    f"{path} holds no diffusion_jax checkpoint: expected a workdir with {CONFIG_FILE} and {CHECKPOINT_DIR}/, "
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
  config = read_config(workdir)
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
