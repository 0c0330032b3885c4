r"""Evaluators: one protocol for every metric, chosen by `config.evals`, run by `--mode=eval` and by training.

`config.evals` maps a name to an entry (`config_base.eval_entry`):

  kind         bpd | rate_distortion | fid | digits | ode_bpd
  every        run every N training steps (0: never during training)
  at_end       run when training finishes (num_train_steps or time_budget_s reached)
  num_samples  images to sample (fid, digits; 0: config.eval.num_samples)
  sampling     the sampler (a sampler section, see `SamplerSpec.from_config`; sampler '' = config.sampling's)

`--mode=eval` runs the entries that `config.eval.metrics` names. Each kind is
an `Evaluator` whose `run(model, mesh=..., memo=...)` returns a `Result`;
`run_all` writes every result the same way: one JSON file per entry,
`workdir/eval/<name>_step_<step:06d>[_n].json` (never overwritten; all files
of one evaluation share the counter), its scalars to TensorBoard (`eval/...`
at the checkpoint's step) and one summary line. The JSON schema is the same
for every kind:

  {"name", "kind", "step", "use_ema", "workdir", "created",
   "figures":  {scalar results},
   "details":  {the other results: per-timestep terms, histograms, per-class figures},
   "settings": {what was evaluated and how: split, sampler and its settings, seed, weights, ...},
   "seconds":  {where the time went}}

The kinds:
* `bpd`: bits/dim of `config.data.eval_split` (`bpd.compute_bpd`, the paper's protocol by default).
* `rate_distortion`: the rate–distortion curve derived from the same computation (and a chart, with matplotlib).
* `fid`: samples (chunked and resumable, in `workdir/eval/samples_<step>_<sampler>_seed<s>/`), their
  Inception features, FID against the reference statistics and the Inception Score. For `dataset=digits` the
  shipped digit classifier scores them instead (the `digits` kind), unless `config.eval.random_inception`.
* `digits`: the digit-classifier metric (`digits_metric`): Fréchet distance, classifier score, precision,
  recall, memorisation, the class histogram; class accuracy for a class-conditional model.
* `ode_bpd`: bits/dim of `config.data.eval_split` through the probability-flow ODE (`likelihood.compute_ode_bpd`),
  with the entry's solver, tolerances and trace estimator; per-batch results in
  `workdir/eval/ode_bpd_<step>_<settings>/` make it resumable.
"""

from __future__ import annotations

import abc
import dataclasses
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

from diffusion_jax import config_base
from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writer
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import fid_stats
from diffusion_jax.evaluation import likelihood
from diffusion_jax.evaluation import model_loading
from diffusion_jax.evaluation import sample_export

IS_SPLITS = 10
KINDS = ("bpd", "rate_distortion", "fid", "digits", "ode_bpd")
EVAL_DIR = "eval"
DIGIT_SCALARS = (*digits_metric.FIGURES, "digits_class_accuracy")


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


def inception_figures(
  config: ml_collections.ConfigDict, workdir, paths: Sequence[epath.Path], num_samples: int, mesh: Mesh
) -> dict[str, Any]:
  """FID against the reference statistics and the Inception Score of the samples in chunk files.

  Returns:
    `fid`, `inception_score`, `inception_score_std`, `is_splits`, `inception_weights` (a label; random weights
    say so), `random_inception`, `reference_statistics` (path).
  """
  batch_size = model_loading.check_batch_size(config, mesh)
  params, label = fid_stats.inception_weights(config)
  inception_fn = fid_lib.make_inception_fn(params, mesh=mesh)
  if config.eval.fid_stats_path:
    ref_path = epath.Path(config.eval.fid_stats_path)
  else:
    ref_path = fid_stats.reference_statistics(config, workdir, inception_fn, label, mesh)
  mu_ref, sigma_ref = fid_stats.load_statistics(ref_path)
  sharded = runtime.batch_sharding(mesh)
  stats = fid_lib.ActivationStatistics()
  logits = []
  num_batches = -(-int(num_samples) // batch_size)
  for images, n in runtime.progress_bar(
    _sample_batches(paths, batch_size, int(num_samples)), num_batches, True, "Inception on samples"
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
  return {
    "fid": float(fid_value),
    "inception_score": float(is_mean),
    "inception_score_std": float(is_std),
    "is_splits": splits,
    "inception_weights": label,
    "random_inception": label == fid_stats.RANDOM_INCEPTION_LABEL,
    "reference_statistics": str(ref_path),
  }


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


def _split(result: dict[str, Any], settings_keys=()) -> tuple[dict, dict, dict]:
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


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------
# One helper draws a sample set.
# ----------------------------------------------------------------------------


def sampler_spec(config: ml_collections.ConfigDict, entry) -> samplers.SamplerSpec:
  """The entry's sampler: its `sampling` section, or `config.sampling` where that names no sampler."""
  section = entry.sampling if entry.get("sampling") and entry.sampling.get("sampler") else config.sampling
  return samplers.SamplerSpec.from_config(section, num_timesteps=int(config.diffusion.num_timesteps))


def num_samples(config: ml_collections.ConfigDict, entry) -> int:
  return int(entry.get("num_samples", 0) or config.eval.num_samples)


def samples_dir(config, workdir, model: inference.LoadedModel, spec: samplers.SamplerSpec) -> epath.Path:
  """`workdir/eval/samples_<step>_<sampler settings>_seed<seed>[_cfg<s>][_noclip]/`."""
  sc = config.sampling
  name = f"samples_{model.step}_{spec.folder_name}_seed{config.eval.seed}"
  if model.num_classes and float(sc.guidance_scale) != 1.0:
    name += f"_cfg{float(sc.guidance_scale):g}"
  name += "" if sc.clip_denoised else "_noclip"
  return epath.Path(workdir) / EVAL_DIR / name


def draw_samples(model: inference.LoadedModel, config, workdir, entry) -> tuple[list, dict[str, Any], float]:
  """Draws (resumably) the entry's sample set: (chunk paths, provenance, seconds).

  Sample i depends only on (config.eval.seed, i) and, for a conditional model, is of class i mod K (with
  config.sampling.guidance_scale). Chunks of config.sampling.batch_size go to `samples_dir`.
  """
  sc = config.sampling
  spec = sampler_spec(config, entry)
  count = num_samples(config, entry)
  out_dir = samples_dir(config, workdir, model, spec)
  guidance = float(sc.get("guidance_scale", 1.0)) if model.num_classes else 1.0
  start = time.time()
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    count,
    jax.random.PRNGKey(config.eval.seed),
    spec,
    clip_denoised=bool(sc.clip_denoised),
    chunk_size=int(sc.batch_size),
    guidance_scale=guidance,
  )
  _sync("samples_written")
  provenance = {
    "samples_dir": str(out_dir),
    "num_samples": count,
    "sampler": spec.name,
    "sampler_settings": spec.folder_name,
    "num_steps": spec.num_steps,
    "network_calls": spec.network_calls,
    "eta": float(spec.eta),
    "guidance_scale": guidance,
    "clip_denoised": bool(sc.clip_denoised),
    "seed": int(config.eval.seed),
  }
  return paths, provenance, time.time() - start


# ----------------------------------------------------------------------------
# The kinds.
# ----------------------------------------------------------------------------


def _check_eval_split(evaluator, what: str) -> None:
  """Evaluations of the data need `config.data.eval_split`."""
  config = evaluator.config
  if not config.data.eval_split:
    raise errors.UserError(
      f"No eval split for dataset {config.data.dataset!r} (config.data.eval_split is empty), so {what} cannot "
      f"be computed: set --config.data.eval_split=<split> or leave {evaluator.name!r} out of config.eval.metrics "
      "(e.g. --config.eval.metrics=fid)."
    )


def _check_samples(evaluator) -> None:
  """The sampler settings and the sample count of an evaluation of samples, checked before anything runs."""
  sampler_spec(evaluator.config, evaluator.entry)
  count = num_samples(evaluator.config, evaluator.entry)
  if count < 2:
    raise errors.UserError(
      f"config.evals.{evaluator.name}: {evaluator.kind} needs at least 2 samples (it fits a covariance), got "
      f"num_samples={count} (the entry's num_samples, or config.eval.num_samples where it is 0). The paper used 50000."
    )


class Evaluator(abc.ABC):
  """One entry of `config.evals`: `run(model, mesh=, memo=)` evaluates a loaded model and returns a `Result`."""

  kind = ""

  def __init__(self, name: str, entry, config: ml_collections.ConfigDict, workdir):
    self.name, self.entry, self.config, self.workdir = name, entry, config, epath.Path(workdir)
    self.every = int(entry.get("every", 0) or 0)
    self.at_end = bool(entry.get("at_end", False))
    self.check()

  def check(self) -> None:
    """Raises UserError for settings that cannot work, before anything runs."""

  @abc.abstractmethod
  def run(self, model: inference.LoadedModel, *, mesh: Mesh, memo: dict) -> Result:
    """Evaluates `model`; `memo` is shared by the evaluators of one evaluation (bpd and rate_distortion)."""


class BpdEvaluator(Evaluator):
  kind = "bpd"
  _SETTINGS = (
    "split",
    "dataset",
    "step",
    "use_ema",
    "clip_denoised",
    "drop_remainder",
    "batch_size",
    "max_examples",
    "num_timesteps",
    "conditional",
    "metric",
    "split_size",
    "num_examples",
  )

  def check(self):
    _check_eval_split(self, "bits/dim")

  def compute(self, model, mesh, memo) -> tuple[dict[str, Any], float]:
    """compute_bpd's result for this model (once per model and step: rate_distortion shares it)."""
    key = ("bpd", id(model), model.step)
    if key not in memo:
      start = time.time()
      memo[key] = bpd_lib.compute_bpd(model, self.config, jax.random.PRNGKey(self.config.eval.seed), mesh=mesh)
      memo[key + ("seconds",)] = time.time() - start
    return memo[key], memo[key + ("seconds",)]

  def run(self, model, *, mesh, memo):
    result, seconds = self.compute(model, mesh, memo)
    figures, details, settings = _split(result, self._SETTINGS)
    return Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"bpd": seconds},
      scalars={
        "eval/bpd": result["total_bpd"],
        "eval/bpd_prior": result["prior_bpd"],
        "eval/bpd_decoder": result["decoder_bpd"],
      },
      summary=(
        f"bits/dim {result['total_bpd']:.4f} on {result['num_examples']} of {result['split_size']} "
        f"{self.config.data.dataset}:{result['split']} images"
      ),
    )


class RateDistortionEvaluator(BpdEvaluator):
  kind = "rate_distortion"

  def run(self, model, *, mesh, memo):
    result, seconds = self.compute(model, mesh, memo)
    rd = bpd_lib.rate_distortion(result["terms_bpd"], result["mse"], result["prior_bpd"])
    figures, details, _ = _split(rd)
    config = self.config

    def chart(path, step):
      bpd_lib.plot_rate_distortion(
        rd,
        path,
        title=(
          f"{config.data.dataset}:{result['split']}, step {step} (EMA), {result['num_examples']} images: "
          f"rate {rd['final_rate_bpd']:.3f} + distortion {rd['final_distortion_bpd']:.3f} bits/dim"
        ),
      )

    return Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings={"split": result["split"], "num_examples": result["num_examples"], "prior_bpd": result["prior_bpd"]},
      seconds={"bpd": seconds},
      scalars={"eval/rate_bpd": rd["final_rate_bpd"], "eval/distortion_rmse": rd["final_distortion_rmse"]},
      summary=(
        f"rate {rd['final_rate_bpd']:.4f} + distortion {rd['final_distortion_bpd']:.4f} bits/dim "
        f"(RMSE {rd['final_distortion_rmse']:.3f})"
      ),
      chart=chart if bpd_lib.have_matplotlib() else None,
    )


class FidEvaluator(Evaluator):
  """FID and Inception Score of samples against reference statistics (`inception_figures`)."""

  kind = "fid"

  def check(self):
    fid_stats.check_fid_config(self.config)
    _check_samples(self)

  def run(self, model, *, mesh, memo):
    paths, provenance, sampling_s = draw_samples(model, self.config, self.workdir, self.entry)
    start = time.time()
    out = inception_figures(self.config, self.workdir, paths, provenance["num_samples"], mesh)
    tail = "_random_inception" if out["random_inception"] else ""
    figures = {k: out[k] for k in ("fid", "inception_score", "inception_score_std")}
    settings = {
      **provenance,
      **{k: out[k] for k in ("is_splits", "inception_weights", "random_inception", "reference_statistics")},
    }
    return Result(
      kind=self.kind,
      figures=figures,
      details={},
      settings=settings,
      seconds={"sampling": sampling_s, "inception": time.time() - start},
      scalars={f"eval/fid{tail}": out["fid"], f"eval/inception_score{tail}": out["inception_score"]},
      summary=(
        f"FID {out['fid']:.3f}, IS {out['inception_score']:.3f} ± {out['inception_score_std']:.3f} over "
        f"{provenance['num_samples']} samples ({provenance['sampler_settings']})"
        + (f" [{fid_stats.RANDOM_INCEPTION_LABEL}]" if tail else "")
      ),
    )


class DigitsEvaluator(Evaluator):
  """The digit-classifier metric of samples against `config.eval.fid_split` of the digits (default: train)."""

  kind = "digits"

  def check(self):
    image_shape = runtime.image_shape(self.config)
    if image_shape != digits_metric.IMAGE_SHAPE:
      raise errors.UserError(
        f"The digit metric scores 8×8×1 images, but this model makes {image_shape}: use "
        "--config.data.image_size=8 --config.data.channels=1, or Inception's smoke test "
        "(--config.eval.random_inception=True)."
      )
    if self.config.eval.fid_stats_path:
      logging.warning(
        "config.eval.fid_stats_path=%s is not used by config.evals.%s: the digit classifier scores the samples.",
        self.config.eval.fid_stats_path,
        self.name,
      )
    _check_samples(self)

  def run(self, model, *, mesh, memo):
    paths, provenance, sampling_s = draw_samples(model, self.config, self.workdir, self.entry)
    start = time.time()
    images, labels = sample_export.read_sample_chunks(paths, with_labels=True)
    if len(images) != provenance["num_samples"]:
      raise RuntimeError(f"The sample chunks hold {len(images)} images, expected {provenance['num_samples']}.")
    split = fid_stats.fid_split(self.config)
    reference, reference_labels = input_pipeline.load_digits(split)
    result = dict(digits_metric.compute_digit_metrics(images, reference))
    if model.num_classes:
      result.update(digits_metric.conditional_digit_metrics(images, labels, reference, np.asarray(reference_labels)))
    figures, details, _ = _split(result)
    settings = {
      **provenance,
      "reference_split": split,
      "classifier_weights": str(digits_metric.WEIGHTS_PATH),
      "classifier_sha256": digits_metric.weights_sha256(),
    }
    summary = (
      f"digits FD {result['digits_fd']:.3f}, IS {result['digits_is']:.3f}, confidence "
      f"{result['digits_confidence']:.3f}, precision {result['digits_precision']:.3f}, recall "
      f"{result['digits_recall']:.3f}, memorisation {result['digits_memorisation']:.3f}"
      + (f", class accuracy {result['digits_class_accuracy']:.3f}" if "digits_class_accuracy" in result else "")
      + f" over {result['num_samples']} samples ({provenance['sampler_settings']})"
    )
    return Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"sampling": sampling_s, "metric": time.time() - start},
      scalars={f"eval/{k}": float(result[k]) for k in DIGIT_SCALARS if k in result},
      summary=summary,
    )


class OdeBpdEvaluator(Evaluator):
  """Bits/dim through the probability-flow ODE (`likelihood.compute_ode_bpd`), resumable per batch."""

  kind = "ode_bpd"
  _SETTINGS = (
    "split",
    "dataset",
    "step",
    "use_ema",
    "batch_size",
    "max_examples",
    "conditional",
    "metric",
    "split_size",
    "num_examples",
    "num_batches",
    "resumed_batches",
    "dequantization",
    "prior",
    "time_map",
    "out_dir",
    *likelihood.DEFAULTS,
  )

  def options(self) -> dict[str, Any]:
    """The entry's ODE settings, with `likelihood.DEFAULTS` for those it does not set."""
    return {k: type(v)(self.entry.get(k, v)) for k, v in likelihood.DEFAULTS.items()}

  def check(self):
    _check_eval_split(self, "the ODE bits/dim")
    o = self.options()
    try:
      likelihood.solver_settings(**{k: v for k, v in o.items() if k != "max_examples"})
      likelihood.check_model(
        self.config.diffusion.model_mean_type, int(self.config.diffusion.num_timesteps), o["t_start"]
      )
      if o["max_examples"] < 0:
        raise errors.UserError(f"max_examples must be >= 0, got {o['max_examples']}.")
    except errors.UserError as e:
      raise errors.UserError(f"config.evals.{self.name}: {e}") from e

  def out_dir(self, step: int) -> epath.Path:
    """`workdir/eval/<name>_<step>_<solver>_rtol<r>_atol<a>_<estimator><K>_t<τ0>[_knots]_b<B>_seed<s>[_max<N>]/`."""
    o = self.options()
    most = f"_max{o['max_examples']}" if o["max_examples"] else ""
    name = (
      f"{self.name}_{step}_{o['solver']}_rtol{o['rtol']:g}_atol{o['atol']:g}_{o['estimator']}{o['num_probes']}"
      f"_t{o['t_start']:g}{'_knots' if o['step_to_knots'] else ''}_b{int(self.config.eval.batch_size)}"
      f"_seed{int(self.config.eval.seed)}{most}"
    )
    return self.workdir / EVAL_DIR / name

  def run(self, model, *, mesh, memo):
    start = time.time()
    result = likelihood.compute_ode_bpd(
      model,
      self.config,
      jax.random.PRNGKey(self.config.eval.seed),
      mesh=mesh,
      out_dir=self.out_dir(model.step),
      **self.options(),
    )
    figures, details, settings = _split(result, self._SETTINGS)
    settings["seed"] = int(self.config.eval.seed)
    return Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"ode_bpd": time.time() - start},
      scalars={"eval/ode_bpd": result["ode_bpd"], "eval/ode_bpd_nfe": result["nfe_mean"]},
      summary=(
        f"ODE bits/dim {result['ode_bpd']:.4f} ± {result['ode_bpd_sem']:.4f} on {result['num_examples']} of "
        f"{result['split_size']} {self.config.data.dataset}:{result['split']} images ({result['solver']}, rtol "
        f"{result['rtol']:g}, atol {result['atol']:g}, mean NFE {result['nfe_mean']:.0f})"
      ),
    )


_KINDS = {
  cls.kind: cls for cls in (BpdEvaluator, RateDistortionEvaluator, FidEvaluator, DigitsEvaluator, OdeBpdEvaluator)
}


def uses_digit_metric(config: ml_collections.ConfigDict) -> bool:
  """Whether 'fid' is scored with `digits_metric` (dataset=digits) instead of Inception.

  `config.eval.random_inception=True` asks for the Inception smoke test explicitly and keeps it.
  """
  return config.data.dataset == "digits" and not config.eval.get("random_inception", False)


def make(name: str, entry, config: ml_collections.ConfigDict, workdir) -> Evaluator:
  """The evaluator of one `config.evals` entry (`fid` on the digits is the digit metric, see the module doc)."""
  kind = str(entry.get("kind", ""))
  if kind not in _KINDS:
    raise errors.UserError(f"config.evals.{name}.kind={kind!r} is not a kind of evaluation; choose from {KINDS}.")
  if kind == "fid" and uses_digit_metric(config):
    kind = "digits"
  return _KINDS[kind](name, entry, config, workdir)


def from_config(config: ml_collections.ConfigDict, workdir, *, names=None, training: bool = False) -> list[Evaluator]:
  """The evaluators of `config.evals`: those named (`--mode=eval`), or those that run during training."""
  evals = config.get("evals") or {}
  if names is not None:
    missing = [n for n in names if n not in evals]
    if missing:
      raise errors.UserError(
        f"config.eval.metrics names {missing}, which config.evals does not define; choose from "
        f"{tuple(evals.keys())}, e.g. --config.eval.metrics=bpd,fid."
      )
    return [make(n, evals[n], config, workdir) for n in names]
  if training:
    return [make(n, e, config, workdir) for n, e in evals.items() if int(e.get("every", 0) or 0) > 0 or e.get("at_end")]
  return [make(n, e, config, workdir) for n, e in evals.items()]


def eval_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.eval.metrics` as a tuple of entry names; comma-separated strings are accepted."""
  metrics = config.eval.metrics
  items = [metrics] if isinstance(metrics, str) else list(metrics)
  # `--config.eval.metrics=bpd,fid` arrives as ('bpd,fid',): split every item on commas and spaces.
  names = tuple(dict.fromkeys(m.lower() for item in items for m in re.split(r"[,\s]+", str(item)) if m))
  if not names:
    raise errors.UserError(
      f"No metrics in config.eval.metrics; choose from {tuple((config.get('evals') or {}).keys())}, e.g. "
      "--config.eval.metrics=bpd,fid."
    )
  return names


# ----------------------------------------------------------------------------
# One writer of results.
# ----------------------------------------------------------------------------


def result_paths(eval_dir: epath.Path, step: int, names) -> dict[str, epath.Path]:
  """New file names `<stem>_step_<step:06d>[_n].<ext>` for `names` (e.g. 'bpd.json'), none of which exist yet.

  All files of one evaluation share the smallest free counter `_n`, so they stay paired; earlier results are
  never touched.
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


def write_results(results: dict[str, Result], *, workdir, step: int, use_ema: bool, writer=None) -> list[str]:
  """Writes each result's JSON (and chart) under workdir/eval, its scalars to TensorBoard; returns the files.

  JSON and charts are written by process 0; `writer` is an open `MetricWriter` (default: a new one).
  """
  files = []
  if jax.process_index() == 0 and results:
    eval_dir = epath.Path(workdir) / EVAL_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name, result in results.items():
      names += [f"{name}.json"] + ([f"{name}.png"] if result.chart else [])
    paths = result_paths(eval_dir, step, names)
    for name, result in results.items():
      record = result.record(name, step=step, use_ema=use_ema, workdir=workdir)
      text = json.dumps(record, indent=2, default=float, allow_nan=True) + "\n"
      files.append(str(runtime.atomic_write(paths[f"{name}.json"], text)))
      if result.chart:
        result.chart(paths[f"{name}.png"], step)
        files.append(str(paths[f"{name}.png"]))
  _sync("eval_results_written")
  scalars = {k: v for result in results.values() for k, v in result.scalars.items()}
  if scalars:
    if writer is None:
      # A unique suffix: tensorboardX names event files by the second and host only.
      with metric_writer.MetricWriter(workdir, filename_suffix=f".eval.{os.getpid()}.{time.time_ns()}") as own:
        own.scalars(step, scalars)
    else:
      writer.scalars(step, scalars)
  return files


def run_all(
  evaluators, model: inference.LoadedModel, *, workdir, mesh: Mesh, writer=None, what: str = "eval"
) -> tuple[dict[str, Result], list[str]]:
  """Runs the evaluators on one model, writes their results (`write_results`), logs one summary line.

  Returns:
    (name -> Result, the files written).
  """
  memo: dict = {}
  results = {ev.name: ev.run(model, mesh=mesh, memo=memo) for ev in evaluators}
  files = write_results(results, workdir=workdir, step=model.step, use_ema=model.use_ema, writer=writer)
  ema = " (EMA)" if model.use_ema else ""
  logging.info("%s step %d%s | %s.", what, model.step, ema, " | ".join(f"{n}: {r.summary}" for n, r in results.items()))
  if files:
    logging.info("Eval results written to %s.", ", ".join(files))
  return results, files


# ----------------------------------------------------------------------------
# --mode=eval.
# ----------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=eval`: the evaluations `config.eval.metrics` names, of the workdir's newest checkpoint (EMA).

  Args:
    config: the run's config (its model must match the checkpoint's); the
      `eval`, `evals`, `sampling` and data location fields may differ from training.
    workdir: the training workdir (or a converted-weights directory).

  Returns:
    dict with `step`, `files` (paths written, on process 0) and `results`: name -> the JSON record.

  Raises:
    UserError: unknown entries or kinds, no eval split for bits/dim, a missing
      reference statistics file, or a config that does not match the checkpoint.
  """
  config = config_base.upgrade(config)
  evaluators = from_config(config, workdir, names=eval_names(config))
  mesh = runtime.make_mesh()
  model_loading.check_batch_size(config, mesh)
  model = model_loading.load_eval_model(config, workdir)
  logging.info(
    "Evaluating %s at step %d (EMA parameters): %s.", workdir, model.step, ", ".join(e.name for e in evaluators)
  )
  results, files = run_all(evaluators, model, workdir=workdir, mesh=mesh)
  records = {n: r.record(n, step=model.step, use_ema=True, workdir=workdir) for n, r in results.items()}
  return {"step": int(model.step), "files": files, "results": records}
