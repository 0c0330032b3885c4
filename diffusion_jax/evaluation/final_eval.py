r"""The end-of-training evaluation (`training.final_eval`): sample the final EMA model and score the samples.

When a training run finishes (`num_train_steps` or `training.time_budget_s`
reached), `python -m diffusion_jax.main` calls `evaluate_final`, which samples
`training.final_eval_samples` images with `training.final_eval_sampler` over
`training.final_eval_num_steps` steps (rng `config.eval.seed`), scores them
with the digit-classifier metric (`diffusion_jax.evaluation.digits_metric`,
reference: the digits train split) and writes

* `workdir/eval/final_step_<step:06d>.json` (a later evaluation of the same
  step gets `_1`, `_2`, …; nothing is overwritten),
* the scalar figures to TensorBoard as `final_eval/<name>` at the step,
* one summary line to the log.

Datasets other than digits are skipped with an info line. The same figures for
any sampler setting, from a workdir:

  python -c "import diffusion_jax.evaluation.final_eval as f; f.evaluate_workdir('runs/digits')"
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import errors
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writer
from diffusion_jax import runtime
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import evaluate as evaluate_lib
from diffusion_jax.evaluation import sample_export

EVAL_DIR = "eval"
TENSORBOARD_PREFIX = "final_eval/"
# Figures shown in the summary line, in this order, where the metric returns them.
SUMMARY_KEYS = (
  "digits_fd",
  "digits_is",
  "digits_precision",
  "digits_recall",
  "digits_confidence",
  "digits_memorisation",
  "digits_class_accuracy",
)


def samples_from_params(
  config: ml_collections.ConfigDict,
  params,
  num_samples: int,
  rng,
  *,
  sampler,
  step: int = 0,
  guidance_scale: float = 1.0,
  **settings,
) -> tuple[np.ndarray, np.ndarray | None]:
  """(uint8 [num_samples, H, W, C] images, their labels or None) from `params` (the model `config` describes).

  Batches of `config.sampling.batch_size`; sample i depends only on (rng, i)
  and, for a conditional model, is of class i mod K.
  """
  model = sample_export.model_from_config(config, params, step=step)
  labels = sample_export.resolve_labels(model, None, num_samples)
  images = sample_export.generate_set(
    model,
    num_samples,
    rng,
    sampler=sampler,
    clip_denoised=config.sampling.clip_denoised,
    labels=labels,
    guidance_scale=guidance_scale,
    **settings,
  )
  return images, labels


def result_path(eval_dir: epath.Path, step: int) -> epath.Path:
  """`eval_dir/final_step_<step:06d>[_n].json`, the first name that does not exist yet."""
  n = 0
  while True:
    path = eval_dir / (f"final_step_{step:06d}" + (f"_{n}" if n else "") + ".json")
    if not path.exists():
      return path
    n += 1


def _scalars(figures: dict[str, Any]) -> dict[str, float]:
  return {
    k: float(v)
    for k, v in figures.items()
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
  }


def evaluate_final(config: ml_collections.ConfigDict, workdir: str | os.PathLike, params, step: int) -> dict | None:
  """Samples `params` (the final EMA parameters) and writes their digit-metric figures.

  Args:
    config: the run's config; reads `training.final_eval_*`, `sampling.batch_size`,
      `sampling.clip_denoised` and `eval.seed`.
    workdir: the run's workdir; results go to `workdir/eval/` and TensorBoard.
    params: the parameters to sample with (replicated arrays or host arrays).
    step: the training step of `params`, used in the file name and as the
      TensorBoard step.

  Returns:
    The result written to the JSON file (figures and settings), or None where
    the dataset is not digits.

  Raises:
    ValueError: bad final-evaluation settings (sampler, steps, sample count).
  """
  if config.data.dataset != "digits":
    logging.info(
      "training.final_eval: skipped, the digit-classifier metric covers dataset 'digits' only (this run: %r).",
      config.data.dataset,
    )
    return None
  tc = config.training
  num_samples = int(tc.get("final_eval_samples", 500))
  if num_samples < 2:
    raise errors.UserError(
      f"training.final_eval_samples must be >= 2 (the metric fits a covariance), got {num_samples}."
    )
  settings = dict(
    num_steps=int(tc.get("final_eval_num_steps", 100)) or None,
    sigma_schedule=tc.get("final_eval_sigma_schedule", "") or None,
  )
  spec = sample_export.resolve_sampler(
    int(config.diffusion.num_timesteps), tc.get("final_eval_sampler", "ddim"), **settings
  )
  conditional = int(config.model.get("num_classes", 0) or 0) > 0
  guidance = float(config.sampling.get("guidance_scale", 1.0)) if conditional else 1.0
  t0 = time.perf_counter()
  samples, labels = samples_from_params(
    config, params, num_samples, jax.random.PRNGKey(config.eval.seed), sampler=spec, step=step, guidance_scale=guidance
  )
  sample_seconds = time.perf_counter() - t0
  if jax.process_index() != 0:
    return None
  t1 = time.perf_counter()
  reference, reference_labels = input_pipeline.load_digits("train")
  figures = dict(digits_metric.compute_digit_metrics(samples, reference))
  if conditional:
    figures.update(evaluate_lib.conditional_digit_metrics(samples, labels, reference, np.asarray(reference_labels)))
  score_seconds = time.perf_counter() - t1
  result = {
    "step": int(step),
    "sampler": spec.name,
    "sampler_settings": spec.folder_name,
    "num_steps": spec.num_steps,
    "network_calls": spec.network_calls,
    "guidance_scale": guidance,
    "num_samples": num_samples,
    "seed": int(config.eval.seed),
    "use_ema": True,
    "sample_seconds": sample_seconds,
    "score_seconds": score_seconds,
    "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "metrics": figures,
  }
  eval_dir = epath.Path(workdir) / EVAL_DIR
  eval_dir.mkdir(parents=True, exist_ok=True)
  path = runtime.atomic_write(result_path(eval_dir, step), json.dumps(result, indent=2, default=float) + "\n")
  scalars = _scalars(figures)
  # A unique suffix: tensorboardX names event files by the second and host only.
  with metric_writer.MetricWriter(workdir, filename_suffix=f".final_eval.{os.getpid()}.{time.time_ns()}") as writer:
    writer.scalars(step, {TENSORBOARD_PREFIX + k: v for k, v in scalars.items()})
  summary = summary_line(result)
  logging.info(
    "Final evaluation at step %d: %s, %.1f s. Written to %s.", step, summary, sample_seconds + score_seconds, path
  )
  return result


def summary_line(result: dict[str, Any]) -> str:
  """The figures of an `evaluate_final` result in one line (FD, IS, precision, recall, …)."""
  scalars = _scalars(result["metrics"])
  figures = ", ".join(
    f"{k.removeprefix('digits_')} {scalars[k]:.4g}" for k in SUMMARY_KEYS if k in scalars and math.isfinite(scalars[k])
  )
  return f"{figures or 'no scalar figures'} ({result['num_samples']} samples, {result['sampler_settings']})"


def evaluate_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> dict | None:
  """`evaluate_final` for the newest checkpoint (EMA parameters) of a workdir, with its saved config."""
  model = sample_export.load_model(workdir, use_ema=True)
  return evaluate_final(config or model.config, workdir, model.params, model.step)
