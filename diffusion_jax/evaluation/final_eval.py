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

from diffusion_jax import images as images_lib
from diffusion_jax import metric_writer
from diffusion_jax import runtime
from diffusion_jax.evaluation import sample_export

EVAL_DIR = "eval"
METRIC_MODULE = "diffusion_jax.evaluation.digits_metric"
TENSORBOARD_PREFIX = "final_eval/"
# Figures shown in the summary line, in this order, where the metric returns them.
SUMMARY_KEYS = ("digits_fd", "digits_is", "digits_precision", "digits_recall", "digits_confidence",
                "digits_memorisation")


def import_digit_metric():
  """`compute_digit_metrics` of the digit-classifier metric; RuntimeError naming the fix where it is missing."""
  try:
    from diffusion_jax.evaluation import digits_metric  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name not in (METRIC_MODULE, None):
      raise  # the module exists, but one of its own imports is missing
    raise RuntimeError(
        f"training.final_eval needs the digit-classifier metric ({METRIC_MODULE}), which this installation of "
        "diffusion_jax does not have. The run's final checkpoint is complete. Install a version of diffusion_jax "
        "that includes it, or pass --config.training.final_eval=False.") from e
  return digits_metric.compute_digit_metrics


def samples_from_params(config: ml_collections.ConfigDict, params, num_samples: int, rng, *, sampler: str,
                        num_steps: int, step: int = 0) -> np.ndarray:
  """uint8 [num_samples, H, W, C] images from `params` (the model `config` describes), in batches of
  `config.sampling.batch_size`; sample i depends only on (rng, i)."""
  model = sample_export.model_from_config(config, params, step=step)
  sample_export.validate_sampler(model, sampler, num_steps, 0.0)
  mesh = runtime.make_mesh()
  size = runtime.data_size(mesh)
  batch_size = min(runtime.pad_to_multiple(int(config.sampling.batch_size), size),
                   runtime.pad_to_multiple(num_samples, size))
  out = []
  for start in range(0, num_samples, batch_size):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(sample_export.generate(model, idx, rng, sampler=sampler, num_steps=num_steps, eta=0.0,
                                      clip_denoised=config.sampling.clip_denoised, batch_size=batch_size,
                                      mesh=mesh)["samples"])
  return images_lib.to_uint8(np.concatenate(out))


def result_path(eval_dir: epath.Path, step: int) -> epath.Path:
  """`eval_dir/final_step_<step:06d>[_n].json`, the first name that does not exist yet."""
  n = 0
  while True:
    path = eval_dir / (f"final_step_{step:06d}" + (f"_{n}" if n else "") + ".json")
    if not path.exists():
      return path
    n += 1


def _scalars(figures: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in figures.items()
          if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


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
    RuntimeError: the digit-classifier metric is not installed.
  """
  if config.data.dataset != "digits":
    logging.info("training.final_eval: skipped, the digit-classifier metric covers dataset 'digits' only (this run: "
                 "%r).", config.data.dataset)
    return None
  tc = config.training
  compute_digit_metrics = import_digit_metric()
  num_samples = int(tc.get("final_eval_samples", 500))
  sampler = tc.get("final_eval_sampler", "ddim")
  num_steps = int(tc.get("final_eval_num_steps", 100))
  if num_samples < 2:
    raise ValueError(f"training.final_eval_samples must be >= 2 (the metric fits a covariance), got {num_samples}.")
  t0 = time.perf_counter()
  samples = samples_from_params(config, params, num_samples, jax.random.PRNGKey(config.eval.seed), sampler=sampler,
                                num_steps=num_steps, step=step)
  sample_seconds = time.perf_counter() - t0
  if jax.process_index() != 0:
    return None
  t1 = time.perf_counter()
  figures = dict(compute_digit_metrics(samples))
  score_seconds = time.perf_counter() - t1
  result = {
      "step": int(step),
      "sampler": sampler,
      "num_steps": num_steps,
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
  summary = ", ".join(f"{k} {scalars[k]:.4g}" for k in SUMMARY_KEYS if k in scalars and math.isfinite(scalars[k]))
  logging.info("Final evaluation at step %d (%d samples, %s %d steps, %.1f s): %s. Written to %s.", step,
               num_samples, sampler, num_steps, sample_seconds + score_seconds, summary or "no scalar figures", path)
  return result


def evaluate_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> dict | None:
  """`evaluate_final` for the newest checkpoint (EMA parameters) of a workdir, with its saved config."""
  model = sample_export.load_model(workdir, use_ema=True)
  return evaluate_final(config or model.config, workdir, model.params, model.step)
