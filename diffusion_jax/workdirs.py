"""A run's workdir and its records: config.json, classes.json, and whether the disk can take the run.

`write_config` records the resolved config and refuses to continue a run with
an incompatible one (`incompatible_fields`, `RESUMABLE_FIELDS`); `read_config`
reads it back in this version's schema (`config_base.upgrade`). A conditional
run records its class names in classes.json. `check_workdir`,
`check_free_space` and `free_bytes` stop a run before it writes what the disk
cannot hold. Checkpoints themselves are `checkpointing`'s.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from diffusion_jax import compat
from diffusion_jax import config_base
from diffusion_jax import errors as errors_lib
from diffusion_jax import runtime

CONFIG_FILE = "config.json"

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
  # --mode=distill's settings of the rounds to come; a round's own fields (teacher, its steps and the student's,
  # parameterisation, weighting, clipping) stay checked, as do the training and optim fields the rounds set.
  "distill.num_steps",
  "distill.start_steps",
  "distill.steps_per_round",
  "distill.batch_size",
  "distill.learning_rate",
  "distill.ema_decay",
)


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
    # Read in this version's schema: sections added since the run started take their defaults.
    old = config_to_dict(config_base.upgrade(json.loads(path.read_text())))
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


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def format_bytes(n: float) -> str:
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
      f"Not enough free space for the workdir {workdir}: {format_bytes(free)} free, but two checkpoints need about "
      f"{format_bytes(needed)} ({format_bytes(checkpoint_bytes)} each). Free some space or choose another "
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
      f"No room for {what} in {workdir}: {format_bytes(free)} free, about {format_bytes(needed)} needed.",
      os.fspath(workdir),
    )
