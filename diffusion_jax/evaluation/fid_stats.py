r"""FID's reference statistics: their file, the config checks, the Inception weights, `--mode=fid_stats`.

Reference statistics come from `config.eval.fid_stats_path` (an `.npz` with
`mu` and `sigma`, e.g. TTUR's) or, when it is empty, from
`workdir/eval/fid_stats_<dataset>_<split>.npz`, computed from
`config.eval.fid_split` (default: the train split, as the paper) by
`--mode=fid_stats` or on the first evaluation that needs it
(`reference_statistics`). Existing files are never overwritten.

`config.eval.random_inception=True` swaps in randomly initialised Inception
weights (a fixed seed) for smoke tests without the real weights: every output
says `"inception_weights": "random (smoke test, not comparable)"`, the
TensorBoard tags end in `_random_inception`, and its reference statistics go
to their own file (`fid_stats_<dataset>_<split>_random_inception.npz`).

The FID and Inception Score of samples are the `fid` evaluator's (`evaluators/fid.py`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import inception_weights as inception_weights_lib
from diffusion_jax.evaluation import model_loading

EVAL_DIR = "eval"
RANDOM_INCEPTION_LABEL = "random (smoke test, not comparable)"
REAL_INCEPTION_LABEL = "pt_inception-2015-12-05 (FID Inception, TTUR/pytorch-fid)"
# Seed of the random Inception weights: fixed, so reference statistics and samples use the same network.
_RANDOM_INCEPTION_SEED = 0


# ----------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------


def fid_split(config: ml_collections.ConfigDict) -> str:
  return config.eval.get("fid_split", "") or config.data.train_split


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "none"


def default_fid_stats_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """`workdir/eval/fid_stats_<dataset>_<split>[_first<N>][_random_inception].npz` for the config's settings."""
  name = f"fid_stats_{_safe_name(config.data.dataset)}_{_safe_name(fid_split(config))}"
  max_examples = int(config.eval.get("fid_stats_max_examples", 0))
  if max_examples:
    name += f"_first{max_examples}"
  if config.eval.get("random_inception", False):
    name += "_random_inception"
  return epath.Path(workdir) / EVAL_DIR / f"{name}.npz"


def _fid_stats_command(config: ml_collections.ConfigDict) -> str:
  return (
    "python -m diffusion_jax.main --mode=fid_stats --config=<your config> --workdir=<workdir> "
    f"(writes {default_fid_stats_path(config, '<workdir>')}, from the {fid_split(config)!r} split of "
    f"{config.data.dataset!r})"
  )


def check_fid_config(config: ml_collections.ConfigDict) -> None:
  """The reference statistics settings of FID (the sample count is checked with the evaluator's entry)."""
  ec = config.eval
  if ec.fid_stats_path:
    if ec.get("random_inception", False):
      raise errors.UserError(
        f"config.eval.random_inception=True cannot be compared with the reference statistics "
        f"{ec.fid_stats_path} (computed with other Inception weights): set --config.eval.fid_stats_path='' so "
        "that statistics are computed with the same random weights, or use the real weights."
      )
    if not epath.Path(ec.fid_stats_path).exists():
      raise errors.UserError(
        f"config.eval.fid_stats_path={ec.fid_stats_path!r} does not exist. Point it at an .npz with "
        f"mu and sigma, or create one with\n  {_fid_stats_command(config)}\nand set it to that file "
        "(or leave fid_stats_path empty to use and create that file automatically)."
      )


# ----------------------------------------------------------------------------
# Inception.
# ----------------------------------------------------------------------------


def inception_weights(config: ml_collections.ConfigDict) -> tuple[Any, str]:
  """(Inception parameters, a label for the outputs) as `config.eval` asks."""
  if config.eval.get("random_inception", False):
    logging.warning(
      "Using RANDOM Inception weights (config.eval.random_inception=True): FID and IS are smoke-test "
      "numbers, not comparable with anything else."
    )
    return inception.init_params(jax.random.PRNGKey(_RANDOM_INCEPTION_SEED)), RANDOM_INCEPTION_LABEL
  path = config.eval.inception_weights or None
  return inception_weights_lib.load_params(path), REAL_INCEPTION_LABEL


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------
# The statistics of the reference split.
# ----------------------------------------------------------------------------


def _data_statistics(config: ml_collections.ConfigDict, inception_fn, mesh: Mesh) -> fid_lib.ActivationStatistics:
  """Pool3 statistics of the FID reference split (padding excluded)."""
  split = fid_split(config)
  batch_size = model_loading.check_batch_size(config, mesh)
  iterator = input_pipeline.create_eval_iterator(
    config,
    split=split,
    batch_size=batch_size,
    drop_remainder=False,
    max_examples=int(config.eval.get("fid_stats_max_examples", 0)),
  )
  sharded = runtime.batch_sharding(mesh)
  stats = fid_lib.ActivationStatistics()
  for index, batch in enumerate(runtime.progress_bar(iterator, iterator.num_batches, True, f"Inception on {split}")):
    images = jax.make_array_from_process_local_data(sharded, images_lib.to_uint8(batch["image"]))
    pool, _ = inception_fn(images)
    # Global batch k holds examples k·B … in order; only the last one has padding, at its end.
    keep = min(batch_size, iterator.num_examples - index * batch_size)
    stats.update(runtime.to_host(pool)[:keep])
  if stats.count != iterator.num_examples:
    raise RuntimeError(f"Inception saw {stats.count} reference images, expected {iterator.num_examples}.")
  return stats


def _save_statistics(path: epath.Path, stats: fid_lib.ActivationStatistics, info: dict[str, Any]) -> None:
  """Writes mu/sigma (`fid.save_statistics`) and a `<name>.json` describing them; never overwrites."""
  if path.exists():
    raise errors.ExistingFileError(f"{path} exists; refusing to overwrite it.")
  fid_lib.save_statistics(path, stats.mu, stats.sigma)
  runtime.atomic_write(path.parent / (path.name[: -len(".npz")] + ".json"), json.dumps(info, indent=2) + "\n")


def load_statistics(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  """(mu [2048], sigma [2048, 2048]) of a statistics file."""
  with path.open("rb") as f:
    return fid_lib.load_statistics(f)


def reference_statistics(
  config: ml_collections.ConfigDict, workdir, inception_fn, label: str, mesh: Mesh
) -> epath.Path:
  """`default_fid_stats_path`, computed with `inception_fn` (weights labelled `label`) where it does not exist."""
  path = default_fid_stats_path(config, workdir)
  if path.exists():
    logging.info("FID reference statistics %s already exist; keeping them.", path)
    return path
  start = time.time()
  stats = _data_statistics(config, inception_fn, mesh)
  if jax.process_index() == 0:
    _save_statistics(
      path,
      stats,
      {
        "dataset": config.data.dataset,
        "split": fid_split(config),
        "num_examples": stats.count,
        "max_examples": int(config.eval.get("fid_stats_max_examples", 0)),
        "image_size": config.data.image_size,
        "inception_weights": label,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      },
    )
  _sync("fid_stats_written")
  logging.info(
    "Wrote FID reference statistics of %d images of %s:%s to %s (%.0f s; Inception weights: %s).",
    stats.count,
    config.data.dataset,
    fid_split(config),
    path,
    time.time() - start,
    label,
  )
  return path


def compute_fid_stats(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """`--mode=fid_stats`: Inception statistics of the reference split into `default_fid_stats_path`.

  Uses `config.eval.fid_split` (default the train split), at most
  `config.eval.fid_stats_max_examples` images (0 = all), and the Inception
  weights of `config.eval`. An existing file is kept, never overwritten.

  Returns:
    The statistics file (an `.npz` with `mu` [2048] and `sigma` [2048, 2048],
    next to a `.json` naming the dataset, split, count and weights).
  """
  mesh = runtime.make_mesh()
  model_loading.check_batch_size(config, mesh)
  path = default_fid_stats_path(config, workdir)
  if path.exists():
    logging.info("FID reference statistics %s already exist; keeping them (delete the file to recompute).", path)
    return path
  params, label = inception_weights(config)
  return reference_statistics(config, workdir, fid_lib.make_inception_fn(params, mesh=mesh), label, mesh)
