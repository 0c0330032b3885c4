r"""`--mode=eval` and `--mode=fid_stats`: bits/dim, rate–distortion, FID and Inception Score of a workdir.

  python -m diffusion_jax.main --mode=eval --config=configs/cifar.py --workdir=/path/to/run \
      --config.eval.metrics=bpd,fid

`evaluate(config, workdir)` loads the newest checkpoint's EMA parameters and
computes what `config.eval.metrics` asks for:

* `bpd`: bits/dim over `config.data.eval_split` (`bpd.compute_bpd`, the
  paper's protocol by default) and the rate–distortion curves derived from it.
* `fid`: `config.eval.num_samples` samples drawn with `config.sampling`'s
  sampler into `workdir/eval/samples_<step>_<sampler>_<steps>[_eta<η>]_seed<s>/`
  (chunked and resumable: an interrupted run keeps its finished chunks), their
  Inception features, FID against reference statistics and the Inception
  Score (10 splits, or one per sample below 10 samples).

Reference statistics come from `config.eval.fid_stats_path` (an `.npz` with
`mu` and `sigma`, e.g. TTUR's) or, when it is empty, from
`workdir/eval/fid_stats_<dataset>_<split>.npz`, computed from
`config.eval.fid_split` (default: the train split, as the paper) by
`--mode=fid_stats` or on the first evaluation that needs it. Existing files
are never overwritten.

Results are appended to `workdir/eval/` as new files named with the
checkpoint step (`bpd_step_000100.json`, `rate_distortion_step_000100.{json,png}`,
`fid_step_000100.json`; a later evaluation of the same step gets `_1`, `_2`, …),
logged in one summary line and written to TensorBoard (`workdir/tensorboard`,
tags `eval/…`) at the checkpoint's step, by process 0 only.

`config.eval.random_inception=True` swaps in randomly initialised Inception
weights (a fixed seed) for smoke tests without the real weights: every output
says `"inception_weights": "random (smoke test, not comparable)"`, the
TensorBoard tags end in `_random_inception`, and its reference statistics go
to their own file (`fid_stats_<dataset>_<split>_random_inception.npz`).

For `dataset=digits`, `fid` scores the same samples with the shipped digit
classifier instead of Inception (`digits_metric`, `compute_digit_fid`): no
Inception weights or statistics are needed; `fid_step_*.json` then holds
`digits_fd`, `digits_is`, `digits_confidence`, `digits_precision`,
`digits_recall`, `digits_memorisation` and the class histogram, against the
`config.eval.fid_split` of the digits (default: train), with TensorBoard tags
`eval/digits_*`; for a class-conditional model also `digits_class_accuracy`
(how often a sample is recognised as the class it was drawn for, overall and
per class) and the Fréchet distance of each class against that class's
reference images. `config.eval.random_inception=True` keeps the Inception
smoke test on digits.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import checkpointing
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writer
from diffusion_jax import runtime
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import sample_export

METRICS = ("bpd", "fid")
EVAL_DIR = "eval"
RANDOM_INCEPTION_LABEL = "random (smoke test, not comparable)"
REAL_INCEPTION_LABEL = "pt_inception-2015-12-05 (FID Inception, TTUR/pytorch-fid)"
IS_SPLITS = 10
# Seed of the random Inception weights: fixed, so reference statistics and samples use the same network.
_RANDOM_INCEPTION_SEED = 0
# Config fields that must match the checkpoint's saved config for its parameters to mean the same model.
_MODEL_FIELDS = ("model.", "diffusion.", "data.dataset", "data.image_size", "data.channels")
_IGNORED_MODEL_FIELDS = ("model.dropout",)  # no effect at evaluation


# ----------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------


def eval_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.eval.metrics` as a tuple of known names; comma-separated strings are accepted."""
  metrics = config.eval.metrics
  items = [metrics] if isinstance(metrics, str) else list(metrics)
  # `--config.eval.metrics=bpd,fid` arrives as ('bpd,fid',): split every item on commas and spaces.
  metrics = tuple(m.lower() for item in items for m in re.split(r"[,\s]+", str(item)) if m)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise errors.UserError(
      f"Unknown or no metrics in config.eval.metrics={tuple(config.eval.metrics)!r}; choose from "
      f"{METRICS}, e.g. --config.eval.metrics=bpd,fid."
    )
  return tuple(dict.fromkeys(metrics))


def _fid_split(config: ml_collections.ConfigDict) -> str:
  return config.eval.get("fid_split", "") or config.data.train_split


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "none"


def default_fid_stats_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """`workdir/eval/fid_stats_<dataset>_<split>[_first<N>][_random_inception].npz` for the config's settings."""
  name = f"fid_stats_{_safe_name(config.data.dataset)}_{_safe_name(_fid_split(config))}"
  max_examples = int(config.eval.get("fid_stats_max_examples", 0))
  if max_examples:
    name += f"_first{max_examples}"
  if config.eval.get("random_inception", False):
    name += "_random_inception"
  return epath.Path(workdir) / EVAL_DIR / f"{name}.npz"


def _fid_stats_command(config: ml_collections.ConfigDict) -> str:
  return (
    "python -m diffusion_jax.main --mode=fid_stats --config=<your config> --workdir=<workdir> "
    f"(writes {default_fid_stats_path(config, '<workdir>')}, from the {_fid_split(config)!r} split of "
    f"{config.data.dataset!r})"
  )


def _check_fid_config(config: ml_collections.ConfigDict) -> None:
  ec = config.eval
  if ec.num_samples < 2:
    raise errors.UserError(
      f"FID needs at least 2 samples (a covariance); config.eval.num_samples={ec.num_samples}. The paper used 50000."
    )
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


def _check_model_config(saved: ml_collections.ConfigDict, requested: ml_collections.ConfigDict, workdir) -> None:
  diff = [
    k
    for k in checkpointing.incompatible_fields(
      checkpointing.config_to_dict(saved), checkpointing.config_to_dict(requested)
    )
    if k.startswith(_MODEL_FIELDS) and k not in _IGNORED_MODEL_FIELDS
  ]
  if diff:
    raise errors.UserError(
      f"The config given for evaluation differs from the one {workdir} was trained with in "
      f"{', '.join(diff)}: pass the run's own config (--config={epath.Path(workdir) / 'config.json'} "
      "or the same configs/*.py file)."
    )


def load_eval_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> sample_export.LoadedModel:
  """The newest checkpoint's EMA parameters in the model that `config` describes (checked against the saved one)."""
  saved, params, step = checkpointing.load_params(workdir, use_ema=True)
  _check_model_config(saved, config, workdir)
  return sample_export.model_from_config(config, params, step=step, use_ema=True)


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
  return inception.load_params(path), REAL_INCEPTION_LABEL


def _batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  batch_size = int(config.eval.batch_size)
  if batch_size < 1 or batch_size % mesh.size or batch_size % jax.process_count():
    raise errors.UserError(
      f"config.eval.batch_size={batch_size} must be a positive multiple of the number of devices "
      f"({mesh.size}); set --config.eval.batch_size accordingly."
    )
  return batch_size


def _progress(iterable, total: int, desc: str):
  return sample_export.progress_bar(iterable, total, True, desc)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _data_statistics(config: ml_collections.ConfigDict, inception_fn, mesh: Mesh) -> fid_lib.ActivationStatistics:
  """Pool3 statistics of the FID reference split (padding excluded)."""
  split = _fid_split(config)
  batch_size = _batch_size(config, mesh)
  iterator = input_pipeline.create_eval_iterator(
    config,
    split=split,
    batch_size=batch_size,
    drop_remainder=False,
    max_examples=int(config.eval.get("fid_stats_max_examples", 0)),
  )
  sharded = runtime.batch_sharding(mesh)
  stats = fid_lib.ActivationStatistics()
  for index, batch in enumerate(_progress(iterator, iterator.num_batches, f"Inception on {split}")):
    images = jax.make_array_from_process_local_data(sharded, images_lib.to_uint8(batch["image"]))
    pool, _ = inception_fn(images)
    # Global batch k holds examples k·B … in order; only the last one has padding, at its end.
    keep = min(batch_size, iterator.num_examples - index * batch_size)
    stats.update(runtime.to_host(pool)[:keep])
  if stats.count != iterator.num_examples:
    raise RuntimeError(f"Inception saw {stats.count} reference images, expected {iterator.num_examples}.")
  return stats


def _save_statistics(path: epath.Path, stats: fid_lib.ActivationStatistics, info: dict[str, Any]) -> None:
  """Writes mu/sigma (.npz, TTUR format) and a `<name>.json` describing them; never overwrites."""
  if path.exists():
    raise errors.ExistingFileError(f"{path} exists; refusing to overwrite it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, mu=stats.mu, sigma=stats.sigma)
  tmp.rename(path)
  _write_json(path.parent / (path.name[: -len(".npz")] + ".json"), info, overwrite=True)


def _load_statistics(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  with path.open("rb") as f:
    return fid_lib.load_statistics(f)


def _write_fid_stats(config: ml_collections.ConfigDict, workdir, inception_fn, label: str, mesh: Mesh) -> epath.Path:
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
        "split": _fid_split(config),
        "num_examples": stats.count,
        "max_examples": int(config.eval.get("fid_stats_max_examples", 0)),
        "image_size": config.data.image_size,
        "inception_weights": label,
        "created": _timestamp(),
      },
    )
  _sync("fid_stats_written")
  logging.info(
    "Wrote FID reference statistics of %d images of %s:%s to %s (%.0f s; Inception weights: %s).",
    stats.count,
    config.data.dataset,
    _fid_split(config),
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
  _batch_size(config, mesh)
  path = default_fid_stats_path(config, workdir)
  if path.exists():
    logging.info("FID reference statistics %s already exist; keeping them (delete the file to recompute).", path)
    return path
  params, label = inception_weights(config)
  return _write_fid_stats(config, workdir, fid_lib.make_inception_fn(params, mesh=mesh), label, mesh)


# ----------------------------------------------------------------------------
# FID and IS of samples.
# ----------------------------------------------------------------------------


def _sampler_spec(config: ml_collections.ConfigDict, model: sample_export.LoadedModel):
  """The `SamplerSpec` of config.sampling for this model (ValueError names bad settings)."""
  return sample_export.sampler_from_config(config.sampling, model.diffusion.num_timesteps)


def samples_dir(config: ml_collections.ConfigDict, workdir, model: sample_export.LoadedModel) -> epath.Path:
  """`workdir/eval/samples_<step>_<sampler settings>_seed<seed>[_cfg<s>][_noclip]/` for the FID samples."""
  sc = config.sampling
  name = f"samples_{model.step}_{_sampler_spec(config, model).folder_name}_seed{config.eval.seed}"
  if model.num_classes and float(sc.guidance_scale) != 1.0:
    name += f"_cfg{float(sc.guidance_scale):g}"
  name += "" if sc.clip_denoised else "_noclip"
  return epath.Path(workdir) / EVAL_DIR / name


def _sample_batches(paths: Sequence[epath.Path], batch_size: int, num_samples: int) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 [batch_size, H, W, C], number of real images) from the chunk files, streamed; the last is padded."""
  buffer, held, seen = [], 0, 0
  for path in paths:
    buffer.append(sample_export.read_sample_chunks([path]))
    held += len(buffer[-1])
    while held >= batch_size:
      images = np.concatenate(buffer)
      buffer, held = [images[batch_size:]], held - batch_size
      seen += batch_size
      yield images[:batch_size], batch_size
  if held:
    images = np.concatenate(buffer)
    pad = np.zeros((batch_size - held,) + images.shape[1:], images.dtype)
    seen += held
    yield np.concatenate([images, pad]), held
  if seen != num_samples:
    raise RuntimeError(f"The sample chunks hold {seen} images, expected {num_samples}.")


def compute_fid(
  model: sample_export.LoadedModel,
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  mesh: Mesh | None = None,
) -> dict[str, Any]:
  """Samples (resumably), Inception features, FID against the reference statistics, and IS.

  Args:
    model: the model to sample (EMA parameters for the paper's numbers).
    config: reads `config.sampling` (sampler, num_steps, eta, clip_denoised,
      batch_size as the chunk size) and `config.eval` (num_samples, seed,
      batch_size for Inception, fid_stats_path, random_inception, …).
    workdir: where samples and default reference statistics live.
    mesh: the device mesh (default: all devices).

  Returns:
    A JSON-serialisable dict: `fid`, `inception_score`, `inception_score_std`,
    `is_splits`, `num_samples`, `inception_weights` (a label; random weights
    say so), `reference_statistics` (path), `samples_dir`, `sampler`,
    `num_steps`, `eta`, `clip_denoised`, `seed`, `step`, `use_ema`.
  """
  _check_fid_config(config)
  ec, sc = config.eval, config.sampling
  mesh = runtime.make_mesh() if mesh is None else mesh
  batch_size = _batch_size(config, mesh)
  spec = _sampler_spec(config, model)
  num_steps = spec.num_steps
  out_dir = samples_dir(config, workdir, model)
  start = time.time()
  # Conditional models: sample i is of class i mod K, an equal number per class.
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    int(ec.num_samples),
    jax.random.PRNGKey(ec.seed),
    sampler=spec,
    clip_denoised=bool(sc.clip_denoised),
    chunk_size=int(sc.batch_size),
    guidance_scale=float(sc.get("guidance_scale", 1.0)),
  )
  _sync("fid_samples_written")
  sampling_s = time.time() - start

  params, label = inception_weights(config)
  inception_fn = fid_lib.make_inception_fn(params, mesh=mesh)
  if ec.fid_stats_path:
    ref_path = epath.Path(ec.fid_stats_path)
  else:
    ref_path = _write_fid_stats(config, workdir, inception_fn, label, mesh)
  mu_ref, sigma_ref = _load_statistics(ref_path)

  start = time.time()
  sharded = runtime.batch_sharding(mesh)
  stats = fid_lib.ActivationStatistics()
  logits = []
  num_batches = -(-int(ec.num_samples) // batch_size)
  for images, n in _progress(
    _sample_batches(paths, batch_size, int(ec.num_samples)), num_batches, "Inception on samples"
  ):
    global_images = jax.make_array_from_callback(images.shape, sharded, lambda index, x=images: x[index])
    pool, lg = inception_fn(global_images)
    stats.update(runtime.to_host(pool)[:n])
    logits.append(runtime.to_host(lg)[:n])
  logits = np.concatenate(logits)
  fid_value = fid_lib.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
  splits = min(IS_SPLITS, len(logits))
  if splits < IS_SPLITS:
    logging.warning("Inception Score over %d samples uses %d splits instead of %d.", len(logits), splits, IS_SPLITS)
  is_mean, is_std = fid_lib.inception_score(logits, splits=splits)
  result = {
    "metric": "fid_is",
    "fid": float(fid_value),
    "inception_score": float(is_mean),
    "inception_score_std": float(is_std),
    "is_splits": splits,
    "num_samples": int(stats.count),
    "inception_weights": label,
    "random_inception": label == RANDOM_INCEPTION_LABEL,
    "reference_statistics": str(ref_path),
    "samples_dir": str(out_dir),
    "sampler": spec.name,
    "sampler_settings": spec.folder_name,
    "num_steps": num_steps,
    "network_calls": spec.network_calls,
    "eta": float(spec.eta),
    "guidance_scale": float(sc.get("guidance_scale", 1.0)) if model.num_classes else 1.0,
    "clip_denoised": bool(sc.clip_denoised),
    "seed": int(ec.seed),
    "step": int(model.step),
    "use_ema": bool(model.use_ema),
    "sampling_seconds": sampling_s,
    "inception_seconds": time.time() - start,
  }
  logging.info(
    "FID %.4f, IS %.3f ± %.3f over %d samples (%s, %d steps) vs %s; Inception weights: %s.",
    result["fid"],
    is_mean,
    is_std,
    stats.count,
    spec.folder_name,
    num_steps,
    ref_path,
    label,
  )
  return result


# ----------------------------------------------------------------------------
# The digit-classifier metric (dataset=digits).
# ----------------------------------------------------------------------------


def uses_digit_metric(config: ml_collections.ConfigDict) -> bool:
  """Whether 'fid' is scored with `digits_metric` (dataset=digits) instead of Inception.

  `config.eval.random_inception=True` asks for the Inception smoke test explicitly and keeps it.
  """
  return config.data.dataset == "digits" and not config.eval.get("random_inception", False)


def conditional_digit_metrics(
  images: np.ndarray, labels: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray
) -> dict[str, Any]:
  """Class accuracy (overall, per class) and the per-class Fréchet distance of class-conditional digit samples."""
  acc = digits_metric.class_accuracy(images, labels)
  fake_features, _ = digits_metric.classify(images)
  real_features, _ = digits_metric.classify(reference)
  per_class_fd = {}
  for c in range(digits_metric.NUM_CLASSES):
    fake, real = fake_features[labels == c], real_features[reference_labels == c]
    per_class_fd[str(c)] = digits_metric.frechet_distance(fake, real) if len(fake) >= 2 and len(real) >= 2 else None
  return {
    "digits_class_accuracy": acc["overall"],
    "digits_class_accuracy_per_class": {str(c): v for c, v in acc["per_class"].items()},
    "digits_class_counts": {str(c): v for c, v in acc["counts"].items()},
    "digits_fd_per_class": per_class_fd,
  }


def compute_digit_fid(
  model: sample_export.LoadedModel,
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  mesh: Mesh | None = None,
) -> dict[str, Any]:
  """Samples (resumably, as `compute_fid`) scored by `digits_metric.compute_digit_metrics` against the digits.

  The reference is `config.eval.fid_split` of the digits (default: the train
  split). No Inception weights or reference statistics are used. A
  class-conditional model draws sample i for class i mod 10 (with
  config.sampling.guidance_scale) and is also scored by `conditional_digit_metrics`.

  Returns:
    A JSON-serialisable dict: `digits_fd`, `digits_is`, `digits_confidence`,
    `digits_precision`, `digits_recall`, `digits_memorisation`,
    `digits_class_histogram`, … (see `compute_digit_metrics`), the classifier's
    file and SHA-256, the reference split and the sampling settings.
  """
  _check_fid_config(config)
  ec, sc = config.eval, config.sampling
  image_shape = runtime.image_shape(config)
  if image_shape != digits_metric.IMAGE_SHAPE:
    raise errors.UserError(
      f"The digit metric scores 8×8×1 images, but this model makes {image_shape}: use "
      "--config.data.image_size=8 --config.data.channels=1, or Inception's smoke test "
      "(--config.eval.random_inception=True)."
    )
  if ec.fid_stats_path:
    logging.warning(
      "config.eval.fid_stats_path=%s is not used: dataset=digits is scored with the digit classifier.",
      ec.fid_stats_path,
    )
  spec = _sampler_spec(config, model)
  out_dir = samples_dir(config, workdir, model)
  guidance = float(sc.get("guidance_scale", 1.0)) if model.num_classes else 1.0
  start = time.time()
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    int(ec.num_samples),
    jax.random.PRNGKey(ec.seed),
    sampler=spec,
    clip_denoised=bool(sc.clip_denoised),
    chunk_size=int(sc.batch_size),
    guidance_scale=guidance,
  )
  _sync("digit_samples_written")
  sampling_s = time.time() - start
  start = time.time()
  images, labels = sample_export.read_sample_chunks(paths, with_labels=True)
  if len(images) != int(ec.num_samples):
    raise RuntimeError(f"The sample chunks hold {len(images)} images, expected {ec.num_samples}.")
  split = _fid_split(config)
  reference, reference_labels = input_pipeline.load_digits(split)
  result = {
    "metric": "digits",
    **digits_metric.compute_digit_metrics(images, reference),
    "classifier_weights": str(digits_metric.WEIGHTS_PATH),
    "classifier_sha256": digits_metric.weights_sha256(),
    "reference_split": split,
    "samples_dir": str(out_dir),
    "sampler": spec.name,
    "sampler_settings": spec.folder_name,
    "num_steps": spec.num_steps,
    "network_calls": spec.network_calls,
    "eta": float(spec.eta),
    "guidance_scale": guidance,
    "clip_denoised": bool(sc.clip_denoised),
    "seed": int(ec.seed),
    "step": int(model.step),
    "use_ema": bool(model.use_ema),
  }
  if model.num_classes:
    result.update(conditional_digit_metrics(images, labels, reference, np.asarray(reference_labels)))
  result.update(sampling_seconds=sampling_s, metric_seconds=time.time() - start)
  logging.info(
    "Digit metric over %d samples (%s) vs digits:%s: FD %.3f, IS %.3f, confidence %.3f, "
    "precision %.3f, recall %.3f, memorisation %.3f%s.",
    result["num_samples"],
    spec.folder_name,
    split,
    result["digits_fd"],
    result["digits_is"],
    result["digits_confidence"],
    result["digits_precision"],
    result["digits_recall"],
    result["digits_memorisation"],
    f", class accuracy {result['digits_class_accuracy']:.3f}" if model.num_classes else "",
  )
  return result


DIGIT_SCALARS = (*digits_metric.FIGURES, "digits_class_accuracy")


def digit_scalars_and_summary(result: dict[str, Any]) -> tuple[dict[str, float], str]:
  """TensorBoard scalars (`eval/digits_*`) and the summary line of `compute_digit_fid`'s result."""
  summary = (
    f"digits FD {result['digits_fd']:.3f}, IS {result['digits_is']:.3f}, confidence "
    f"{result['digits_confidence']:.3f}, precision {result['digits_precision']:.3f}, recall "
    f"{result['digits_recall']:.3f}, memorisation {result['digits_memorisation']:.3f}"
    + (f", class accuracy {result['digits_class_accuracy']:.3f}" if "digits_class_accuracy" in result else "")
    + f" over {result['num_samples']} samples ({result['sampler_settings']})"
  )
  return {f"eval/{name}": float(result[name]) for name in DIGIT_SCALARS if name in result}, summary


# ----------------------------------------------------------------------------
# Result files and the --mode=eval entry point.
# ----------------------------------------------------------------------------


def _timestamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: epath.Path, obj: Any, *, overwrite: bool = False) -> epath.Path:
  if path.exists() and not overwrite:
    raise errors.ExistingFileError(f"{path} exists; refusing to overwrite it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")
  tmp.rename(path)
  return path


def result_paths(eval_dir: epath.Path, step: int, names: Sequence[str]) -> dict[str, epath.Path]:
  """New file names `<stem>_step_<step:06d>[_n].<ext>` for `names` (e.g. 'bpd.json'), none of which exist yet.

  All files of one evaluation share the smallest free counter `_n`, so they
  stay paired; earlier results are never touched.
  """
  n = 0
  while True:
    suffix = f"_{n}" if n else ""
    paths = {}
    for name in names:
      stem, ext = name.split(".", 1)
      paths[name] = eval_dir / f"{stem}_step_{step:06d}{suffix}.{ext}"
    if not any(p.exists() for p in paths.values()):
      return paths
    n += 1


def _write_tensorboard(workdir, step: int, scalars: dict[str, float]) -> None:
  if not scalars:
    return
  # A unique suffix: tensorboardX names event files by the second and host only.
  with metric_writer.MetricWriter(workdir, filename_suffix=f".eval.{os.getpid()}.{time.time_ns()}") as writer:
    writer.scalars(step, scalars)


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=eval`: the metrics of `config.eval.metrics` for the workdir's newest checkpoint (EMA).

  Args:
    config: the run's config (its model must match the checkpoint's); the
      `eval`, `sampling` and data location fields may differ from training.
    workdir: the training workdir (or a converted-weights directory).

  Returns:
    dict with `step`, `files` (paths written, on process 0) and, as computed,
    `bpd` (see `bpd.compute_bpd`), `rate_distortion` (see
    `bpd.rate_distortion`) and `fid` (see `compute_fid`).

  Raises:
    ValueError: unknown metrics, no eval split for bits/dim, a missing
      reference statistics file, or a config that does not match the checkpoint.
  """
  metrics = eval_metrics(config)
  if "bpd" in metrics and not config.data.eval_split:
    raise errors.UserError(
      f"No eval split for dataset {config.data.dataset!r} (config.data.eval_split is empty), so "
      "bits/dim cannot be computed: set --config.data.eval_split=<split> or drop 'bpd' from "
      "config.eval.metrics (e.g. --config.eval.metrics=fid)."
    )
  if "fid" in metrics:
    _check_fid_config(config)
  mesh = runtime.make_mesh()
  _batch_size(config, mesh)
  model = load_eval_model(config, workdir)
  step = int(model.step)
  logging.info("Evaluating %s at step %d (EMA parameters): %s.", workdir, step, ", ".join(metrics))
  common = {"workdir": str(workdir), "checkpoint_step": step, "use_ema": True, "created": _timestamp()}
  results: dict[str, Any] = {"step": step, "files": []}
  scalars: dict[str, float] = {}
  summary = [f"eval step {step} (EMA)"]

  if "bpd" in metrics:
    bpd_result = bpd_lib.compute_bpd(model, config, jax.random.PRNGKey(config.eval.seed), mesh=mesh)
    rd = bpd_lib.rate_distortion(bpd_result["terms_bpd"], bpd_result["mse"], bpd_result["prior_bpd"])
    results["bpd"], results["rate_distortion"] = bpd_result, rd
    scalars.update(
      {
        "eval/bpd": bpd_result["total_bpd"],
        "eval/bpd_prior": bpd_result["prior_bpd"],
        "eval/bpd_decoder": bpd_result["decoder_bpd"],
        "eval/rate_bpd": rd["final_rate_bpd"],
        "eval/distortion_rmse": rd["final_distortion_rmse"],
      }
    )
    summary.append(
      f"bits/dim {bpd_result['total_bpd']:.4f} on {bpd_result['num_examples']} of "
      f"{bpd_result['split_size']} {config.data.dataset}:{bpd_result['split']} images "
      f"(rate {rd['final_rate_bpd']:.4f} + distortion {rd['final_distortion_bpd']:.4f} bits/dim, "
      f"RMSE {rd['final_distortion_rmse']:.3f})"
    )
  if "fid" in metrics and uses_digit_metric(config):  # dataset=digits: the digit classifier instead of Inception
    results["fid"] = compute_digit_fid(model, config, workdir, mesh=mesh)
    digit_scalars, digit_summary = digit_scalars_and_summary(results["fid"])
    scalars.update(digit_scalars)
    summary.append(digit_summary)
  elif "fid" in metrics:
    fid_result = compute_fid(model, config, workdir, mesh=mesh)
    results["fid"] = fid_result
    tail = "_random_inception" if fid_result["random_inception"] else ""
    scalars.update({f"eval/fid{tail}": fid_result["fid"], f"eval/inception_score{tail}": fid_result["inception_score"]})
    summary.append(
      f"FID {fid_result['fid']:.3f}, IS {fid_result['inception_score']:.3f} ± "
      f"{fid_result['inception_score_std']:.3f} over {fid_result['num_samples']} samples "
      f"({fid_result['sampler']}, {fid_result['num_steps']} steps)" + (f" [{RANDOM_INCEPTION_LABEL}]" if tail else "")
    )

  if jax.process_index() == 0:
    eval_dir = epath.Path(workdir) / EVAL_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    chart = bpd_lib.have_matplotlib()
    if "bpd" in results and not chart:
      logging.info('Rate-distortion figures in rate_distortion.json; for the chart: pip install "diffusion_jax[plot]".')
    names = (
      ["bpd.json", "rate_distortion.json"] + (["rate_distortion.png"] if chart else []) if "bpd" in results else []
    )
    names += ["fid.json"] if "fid" in results else []
    paths = result_paths(eval_dir, step, names)
    if "bpd" in results:
      _write_json(paths["bpd.json"], {**common, **results["bpd"]})
      rd_record = {
        **common,
        "split": results["bpd"]["split"],
        "num_examples": results["bpd"]["num_examples"],
        "prior_bpd": results["bpd"]["prior_bpd"],
        **results["rate_distortion"],
      }
      _write_json(paths["rate_distortion.json"], rd_record)
      if chart:
        rd = results["rate_distortion"]
        bpd_lib.plot_rate_distortion(
          rd,
          paths["rate_distortion.png"],
          title=(
            f"{config.data.dataset}:{results['bpd']['split']}, step {step} (EMA), "
            f"{results['bpd']['num_examples']} images: rate {rd['final_rate_bpd']:.3f}"
            f" + distortion {rd['final_distortion_bpd']:.3f} bits/dim"
          ),
        )
    if "fid" in results:
      _write_json(paths["fid.json"], {**common, **results["fid"]})
    results["files"] = [str(p) for p in paths.values()]
  _sync("eval_results_written")
  _write_tensorboard(workdir, step, scalars)
  logging.info("%s.", " | ".join(summary))
  if results["files"]:
    logging.info("Eval results written to %s.", ", ".join(results["files"]))
  return results
