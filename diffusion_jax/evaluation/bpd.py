"""Bits/dim over a data split and the paper's rate–distortion curves (§4.3, Figure 5, Table 4).

`compute_bpd` runs `GaussianDiffusion.calc_bpd_loop` over a whole eval split,
data-parallel over every device of every process, with the protocol of the
paper's NLL (Table 1) by default: EMA parameters, x_0 clipping in the bound
terms, one noise draw per term, and the last partial global batch dropped (9,984 of
CIFAR-10's 10,000 test images at batch 256). With `drop_remainder=False` the
last batch is padded and the padding masked out, so every image counts once.
Averages are masked sums over images divided by the number of images (not
means of per-batch means). Batch `k` uses the rng `fold_in(rng, k)`, and term
`t` of that batch the noise `normal(fold_in(fold_in(rng, k), t), [B, H, W, C])`
of the whole global batch, so the result depends on (params, data, rng, B)
but not on the number of devices or processes.

`rate_distortion` turns the per-timestep averages into the paper's
progressive-coding curves; `plot_rate_distortion` draws them as a PNG with PIL.

Index conventions. Code timestep j (0-based, `terms_bpd[j]`, `mse[j]`) is the
paper's x_{j+1}. After k reverse steps (k = 1 … T) the receiver holds
x_T … x_{T-k+1} (paper indexing), so

  rate_k       = prior + Σ_{s=T-k+1}^{T-1} terms_bpd[s]     (KL terms only)
  distortion_k = RMSE of the x_0 prediction from x_{T-k+1} on the 0–255 scale
               = sqrt(mse[T-k]) · 127.5.

At k = 1 the rate is the prior term alone (≈1e-5 bits/dim: "rate 0 at the
start"); at k = T it is prior + Σ_{s≥1} terms_bpd[s], and the remaining
decoder term terms_bpd[0] is the distortion in bits/dim (the paper's CIFAR-10
model: rate 1.78 + distortion 1.97 = 3.75 bits/dim, RMSE 0.95).
"""

from __future__ import annotations

import functools
import io
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import errors
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax.models import unet

# ----------------------------------------------------------------------------
# Bits/dim over a split.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _bpd_sums_fn(model_def: unet.UNet, mesh: Mesh, clip_denoised: bool, conditional: bool = False):
  """jit(params, diffusion, images [B, H, W, C], mask [B], rng[, labels [B]]) -> masked sums, replicated.

  A conditional network is evaluated on each image's true label: the bound is that of p(x | y).
  """
  replicated = runtime.replicated(mesh)
  sharded = runtime.batch_sharding(mesh)
  apply = runtime.model_fn(model_def)

  def fn(params, diffusion, images, mask, rng, *labels):
    model_fn = runtime.bind(apply, params)
    if labels:
      bound, (y,) = model_fn, labels
      model_fn = lambda x_t, t: bound(x_t, t, y)  # noqa: E731
    out = diffusion.calc_bpd_loop(model_fn, images, rng, clip_denoised=clip_denoised)
    m = mask.astype(jnp.float32)
    return {
      "count": jnp.sum(m),
      "total": jnp.sum(out["total_bpd"] * m),
      "total_sq": jnp.sum(jnp.square(out["total_bpd"]) * m),
      "prior": jnp.sum(out["prior_bpd"] * m),
      "terms": jnp.sum(out["terms_bpd"] * m[:, None], axis=0),
      "mse": jnp.sum(out["mse"] * m[:, None], axis=0),
    }

  in_shardings = (replicated, replicated, sharded, sharded, replicated) + ((sharded,) if conditional else ())
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=replicated)


def compute_bpd(
  model: Any,
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  *,
  split: str | None = None,
  batch_size: int | None = None,
  drop_remainder: bool | None = None,
  max_examples: int | None = None,
  clip_denoised: bool | None = None,
  mesh: Mesh | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """The variational bound in bits/dim, averaged over a data split.

  Args:
    model: an `inference.LoadedModel` (its `params`, `network`, `diffusion`,
      `step`, `use_ema`); the paper evaluates the EMA parameters.
    config: the run config; reads `config.data` and the `config.eval` defaults.
    rng: a PRNG key; batch k uses `fold_in(rng, k)`.
    split: the split (default `config.data.eval_split`).
    batch_size: the global batch B (default `config.eval.batch_size`); a
      multiple of the number of devices.
    drop_remainder: drop the last partial batch (the paper) instead of padding
      and masking it (default `config.eval.drop_remainder`).
    max_examples: use only the first examples of the split (default
      `config.eval.bpd_max_examples`; 0 = all).
    clip_denoised: clip x_0 predictions in the bound terms (default
      `config.eval.clip_denoised`; the paper: True).
    mesh: the device mesh (default: all devices on one 'data' axis).
    progress: a tqdm progress bar on process 0.

  A class-conditional model is evaluated on each image's true label (the
  bound of p(x | y); `"conditional": true` in the result).

  Returns:
    A JSON-serialisable dict: `total_bpd` (mean over images of prior + Σ_t
    terms), `total_bpd_sem` (its standard error over images), `prior_bpd`,
    `terms_bpd` [T] and `mse` [T] (per-timestep means; mse on the [-1, 1]
    scale), `decoder_bpd` (= terms_bpd[0]), `kl_bpd` (= Σ_{t≥1} terms_bpd[t]),
    `num_examples` (images covered), `split_size`, `split`, `dataset`, `step`,
    `use_ema`, `clip_denoised`, `drop_remainder`, `batch_size`,
    `max_examples`, `num_timesteps`.

  Raises:
    ValueError: no eval split, or a batch size that does not fit the devices.
  """
  ec = config.eval
  split = config.data.eval_split if split is None else split
  batch_size = int(ec.batch_size if batch_size is None else batch_size)
  drop_remainder = bool(ec.get("drop_remainder", True) if drop_remainder is None else drop_remainder)
  max_examples = int(ec.get("bpd_max_examples", 0) if max_examples is None else max_examples)
  clip_denoised = bool(ec.get("clip_denoised", True) if clip_denoised is None else clip_denoised)
  mesh = runtime.make_mesh() if mesh is None else mesh
  if not split:
    raise errors.UserError(
      f"No eval split for dataset {config.data.dataset!r} (config.data.eval_split is empty), so "
      "bits/dim cannot be computed: set --config.data.eval_split=<split> or remove 'bpd' from "
      "config.eval.metrics."
    )
  if batch_size < 1 or batch_size % mesh.size:
    raise errors.UserError(
      f"The eval batch size {batch_size} must be a positive multiple of the number of devices "
      f"({mesh.size}); set --config.eval.batch_size accordingly."
    )

  iterator = input_pipeline.create_eval_iterator(
    config, split=split, batch_size=batch_size, drop_remainder=drop_remainder, max_examples=max_examples
  )
  conditional = bool(getattr(model.network, "num_classes", 0))
  fn = _bpd_sums_fn(model.network, mesh, clip_denoised, conditional)
  replicated = runtime.replicated(mesh)
  params = jax.device_put(model.params, replicated)
  diffusion = jax.device_put(model.diffusion, replicated)
  T = model.diffusion.num_timesteps

  sums = {
    "count": 0.0,
    "total": 0.0,
    "total_sq": 0.0,
    "prior": 0.0,
    "terms": np.zeros((T,), np.float64),
    "mse": np.zeros((T,), np.float64),
  }

  def accumulate(out):
    for k, v in jax.device_get(out).items():
      sums[k] = sums[k] + np.asarray(v, np.float64)

  pending = None
  desc = f"bits/dim on {config.data.dataset}:{split}"
  for index, batch in enumerate(runtime.progress_bar(iterator, iterator.num_batches, progress, desc)):
    arrays = runtime.global_array((batch["image"], batch["mask"]) + ((batch["label"],) if conditional else ()), mesh)
    out = fn(params, diffusion, *arrays[:2], jax.random.fold_in(rng, index), *arrays[2:])
    if pending is not None:
      accumulate(pending)  # the previous batch's sums, while this batch runs
    pending = out
  if pending is not None:
    accumulate(pending)

  count = int(round(float(sums["count"])))
  if count != iterator.num_examples:
    raise RuntimeError(f"bits/dim covered {count} images, the eval iterator promised {iterator.num_examples}.")
  mean = lambda x: np.asarray(x, np.float64) / count  # noqa: E731
  total = float(mean(sums["total"]))
  variance = max(float(mean(sums["total_sq"])) - total * total, 0.0) * count / max(count - 1, 1)
  terms = mean(sums["terms"])
  result = {
    "metric": "bits_per_dim",
    "total_bpd": total,
    "total_bpd_sem": math.sqrt(variance / count),
    "prior_bpd": float(mean(sums["prior"])),
    "decoder_bpd": float(terms[0]),
    "kl_bpd": float(np.sum(terms[1:])),
    "terms_bpd": [float(x) for x in terms],
    "mse": [float(x) for x in mean(sums["mse"])],
    "num_examples": count,
    "split_size": iterator.split_size,
    "split": split,
    "dataset": config.data.dataset,
    "step": int(model.step),
    "use_ema": bool(model.use_ema),
    "clip_denoised": clip_denoised,
    "drop_remainder": drop_remainder,
    "batch_size": batch_size,
    "max_examples": max_examples,
    "num_timesteps": T,
    "conditional": conditional,
  }
  logging.info(
    "bits/dim %.5f ± %.5f on %d of %d images of %s:%s (prior %.2e, decoder %.4f, step %d, ema=%s).",
    total,
    result["total_bpd_sem"],
    count,
    iterator.split_size,
    config.data.dataset,
    split,
    result["prior_bpd"],
    result["decoder_bpd"],
    model.step,
    model.use_ema,
  )
  return result


# ----------------------------------------------------------------------------
# Rate–distortion.
# ----------------------------------------------------------------------------


def rate_distortion(terms_bpd, mse, prior_bpd: float) -> dict[str, Any]:
  """The paper's progressive lossy compression curves from per-timestep averages.

  Args:
    terms_bpd: [T] mean bound terms in bits/dim (code timesteps; [0] is the
      decoder term).
    mse: [T] mean squared error of the x_0 prediction at each timestep, on the
      [-1, 1] scale.
    prior_bpd: the mean prior term L_T in bits/dim.

  Returns:
    A JSON-serialisable dict with lists over k = 1 … T reverse steps:
    `reverse_steps` [T], `rate_bpd` [T] (prior + KL terms sent so far) and
    `distortion_rmse` [T] (0–255 scale); and the endpoints `final_rate_bpd`
    (prior + Σ_{s≥1} terms), `final_distortion_bpd` (the decoder term
    terms_bpd[0]), `final_distortion_rmse` and `total_bpd` (their sum).

  Raises:
    ValueError: arrays of different or wrong shapes, or non-finite values.
  """
  terms = np.asarray(terms_bpd, np.float64)
  mse = np.asarray(mse, np.float64)
  if terms.ndim != 1 or terms.shape != mse.shape or terms.size < 1:
    raise errors.UserError(f"terms_bpd and mse must both be [T], got shapes {terms.shape} and {mse.shape}.")
  if not (np.isfinite(terms).all() and np.isfinite(mse).all() and math.isfinite(prior_bpd)):
    raise errors.UserError("terms_bpd, mse and prior_bpd must be finite.")
  if (mse < 0).any():
    raise errors.UserError("mse must be non-negative.")
  T = terms.size
  k = np.arange(1, T + 1)
  # Terms sent after k steps: s = T-k+1 … T-1, i.e. the reversed cumulative sum of terms[1:], shifted by one.
  kl_sent = np.concatenate([[0.0], np.cumsum(terms[1:][::-1])])  # [T]: entry k-1 = Σ of the last k-1 KL terms
  rate = prior_bpd + kl_sent
  distortion = np.sqrt(mse[T - k]) * 127.5
  return {
    "reverse_steps": [int(x) for x in k],
    "rate_bpd": [float(x) for x in rate],
    "distortion_rmse": [float(x) for x in distortion],
    "final_rate_bpd": float(rate[-1]),
    "final_distortion_bpd": float(terms[0]),
    "final_distortion_rmse": float(distortion[-1]),
    "total_bpd": float(rate[-1] + terms[0]),
    "convention": (
      "after k reverse steps the receiver holds x_T..x_{T-k+1} (paper indexing; code timestep j = "
      "paper x_{j+1}): rate_k = prior + sum_{s=T-k+1}^{T-1} terms_bpd[s], distortion_k = "
      "sqrt(mse[T-k]) * 127.5; the decoder term terms_bpd[0] is the final distortion in bits/dim"
    ),
  }


# ----------------------------------------------------------------------------
# The rate–distortion chart (matplotlib, the optional `plot` extra).
# ----------------------------------------------------------------------------


def have_matplotlib() -> bool:
  """Whether the rate–distortion chart can be drawn (`pip install "diffusion_jax[plot]"`)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec("matplotlib") is not None


def plot_rate_distortion(rd: dict[str, Any], path: str | os.PathLike, *, title: str = "") -> epath.Path:
  """Draws the paper's Figure 5 (distortion and rate vs. reverse steps, distortion vs. rate) as a PNG.

  Needs matplotlib (`pip install "diffusion_jax[plot]"`); the figures
  themselves are in rate_distortion.json and TensorBoard either way.

  Args:
    rd: from `rate_distortion`.
    path: the PNG to write; an existing file is an error (nothing is overwritten).
    title: a line of text above the panels.

  Returns:
    The path written.

  Raises:
    FileExistsError: `path` exists.
    ImportError: matplotlib is not installed (the message names the extra).
  """
  path = epath.Path(path)
  if path.exists():
    raise errors.ExistingFileError(f"{path} exists; refusing to overwrite it.")
  if not have_matplotlib():
    raise errors.MissingPackageError('The rate-distortion chart needs matplotlib: pip install "diffusion_jax[plot]".')
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg", force=False)
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  steps, rate, dist = rd["reverse_steps"], rd["rate_bpd"], rd["distortion_rmse"]
  fig = figure.Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
  axes = fig.subplots(1, 3)
  panels = [
    (steps, dist, "Distortion vs. reverse steps", "reverse steps k", "RMSE [0, 255]", "C0"),
    (steps, rate, "Rate vs. reverse steps", "reverse steps k", "rate (bits/dim)", "C3"),
    (rate, dist, "Distortion vs. rate", "rate (bits/dim)", "RMSE [0, 255]", "C2"),
  ]
  for ax, (xs, ys, name, xlabel, ylabel, color) in zip(axes, panels):
    ax.plot(xs, ys, color=color, linewidth=1.5)
    ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return runtime.atomic_write(path, buf.getvalue())
