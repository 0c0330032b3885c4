"""FID and Inception Score, as TTUR/pytorch-fid and OpenAI's Inception Score code compute them.

* `make_inception_fn(params)` → a jitted `fn(images_uint8 [B, H, W, C]) ->
  (pool [B, 2048], logits [B, 1008])`, batch-shardable over a mesh axis.
* `ActivationStatistics` accumulates the mean and covariance of pool3
  features over batches in float64 (merging per-batch moments, so it is
  exact and stable for any number of batches); `mu`, `sigma` as
  `np.mean(x, 0)`, `np.cov(x, rowvar=False)`.
* `frechet_distance` is pytorch-fid's `calculate_frechet_distance`.
* `inception_score` is OpenAI's `get_inception_score` from logits: a softmax
  over all 1008 logits (the TF graph's classes; pytorch-fid/torch-fidelity
  do the same), 10 splits, mean and std of exp(E[KL(p(y|x) || p(y))]).
  The logits should be `InceptionV3`'s default, bias-free ones, which is
  what OpenAI's code feeds its softmax.
* `save_statistics`/`load_statistics`: the standard `.npz` with `mu` and
  `sigma` (TTUR's and pytorch-fid's reference statistics files).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax.evaluation import inception

InceptionFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------
# The feature extractor.
# ----------------------------------------------------------------------------


@jax.jit
def _float_range(images):
  x = images.astype(jnp.float32)
  return jnp.min(x), jnp.max(x), jnp.any(x != jnp.round(x))


def check_pixel_range(images) -> None:
  """Refuses float images that are not in [0, 255] (pytorch-fid's convention); uint8 images always pass.

  Floats in [-1, 1] or [0, 1] (a model's output, or ToTensor's) would be
  scaled by 1/255 as if they were pixels, giving a meaningless FID, so they
  are an error that says how to convert them.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    return
  lo, hi, fractional = (float(v) for v in jax.device_get(_float_range(images)))
  if lo < 0.0 or hi > 255.0 or (0.0 < hi <= 1.0 and fractional):
    raise errors.UserError(
      f"Inception takes uint8 images or floats in [0, 255] (pytorch-fid's convention); these {images.dtype} images "
      f"lie in [{lo:.3g}, {hi:.3g}]. Convert images in [-1, 1] with diffusion_jax.images.to_uint8, and images in "
      "[0, 1] by multiplying by 255."
    )


def make_inception_fn(
  params: inception.Params,
  *,
  mesh: Mesh | None = None,
  batch_axis: str | tuple[str, ...] = "data",
  model: inception.InceptionV3 | None = None,
) -> InceptionFn:
  """A jitted FID Inception feature extractor.

  Args:
    params: the Inception parameters (`inception_weights.load_params()`).
    mesh: if given, the parameters are replicated over it and the batch is
      sharded along `batch_axis` (inputs and outputs `P(batch_axis)`; the
      batch size must divide evenly). Without a mesh, the function follows
      the sharding of its input, so a batch already placed with a
      `NamedSharding` stays sharded.
    batch_axis: the mesh axis (or axes) of the batch.
    model: the network; defaults to `InceptionV3()` (resize to 299²,
      bias-free logits, HIGHEST precision).

  Returns:
    `fn(images) -> (pool [B, 2048], logits [B, 1008])`, float32, where
    `images` is [B, H, W, 1 or 3] uint8 (or floats in [0, 255]).
  """
  model = model if model is not None else inception.InceptionV3()

  def apply(p, images):
    return model.apply({"params": p}, images)

  if mesh is None:
    params = jax.device_put(params)
    jitted = jax.jit(apply)
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(batch_axis))
    params = jax.device_put(params, replicated)
    jitted = jax.jit(apply, in_shardings=(replicated, batch), out_shardings=(batch, batch))

  def inception_fn(images):
    check_pixel_range(images)
    return jitted(params, images)

  return inception_fn


# ----------------------------------------------------------------------------
# Activation statistics.
# ----------------------------------------------------------------------------


class ActivationStatistics:
  """Streaming mean and covariance of feature vectors, in float64.

  Each batch contributes its mean and centred scatter matrix, merged with
  Chan et al.'s pairwise update, so the result equals `np.mean(x, 0)` and
  `np.cov(x, rowvar=False)` of the concatenated features to rounding.
  """

  def __init__(self, dim: int = inception.POOL_FEATURES):
    self.dim = dim
    self.count = 0
    self._mean = np.zeros((dim,), np.float64)
    self._m2 = np.zeros((dim, dim), np.float64)

  def update(self, features) -> None:
    """Adds a batch of features [B, dim] (any float dtype, host or device)."""
    x = np.asarray(runtime.to_host(features) if isinstance(features, jax.Array) else features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise errors.UserError(f"features must have shape [B, {self.dim}], got {x.shape}.")
    n_b = x.shape[0]
    if n_b == 0:
      return
    mean_b = x.mean(axis=0)
    centered = x - mean_b
    self._merge(n_b, mean_b, centered.T @ centered)

  def merge(self, other: ActivationStatistics) -> None:
    """Adds the features accumulated by `other` (e.g. another host's)."""
    if other.dim != self.dim:
      raise errors.UserError(f"cannot merge statistics of dimension {other.dim} into {self.dim}.")
    if other.count:
      self._merge(other.count, other._mean, other._m2)

  def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
    n = self.count + n_b
    delta = mean_b - self._mean
    self._m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
    self._mean += delta * (n_b / n)
    self.count = n

  @property
  def mu(self) -> np.ndarray:
    """Mean [dim], float64."""
    if self.count == 0:
      raise errors.UserError("no features accumulated.")
    return self._mean.copy()

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance [dim, dim] (divides by N − 1, as np.cov), float64."""
    if self.count < 2:
      raise errors.UserError(f"a covariance needs at least 2 samples, have {self.count}.")
    return self._m2 / (self.count - 1)


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) of features [N, D] in float64, as pytorch-fid."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise errors.UserError(f"features must have shape [N, D], got {x.shape}.")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def run_inception(
  inception_fn: InceptionFn, batches: Iterable[Any], *, num_samples: int | None = None
) -> tuple[ActivationStatistics, np.ndarray]:
  """Feeds image batches through `inception_fn`.

  Args:
    inception_fn: from `make_inception_fn`.
    batches: [B, H, W, C] uint8 image batches (NumPy or global jax.Arrays).
    num_samples: stop after this many images (the last batch is truncated).

  Returns:
    (pool3 statistics, logits [N, 1008] float32 on the host).
  """
  stats = ActivationStatistics()
  logits = []
  seen = 0
  for images in batches:
    pool, lg = inception_fn(images)
    pool, lg = runtime.to_host(pool), runtime.to_host(lg)
    if num_samples is not None:
      keep = max(0, min(pool.shape[0], num_samples - seen))
      pool, lg = pool[:keep], lg[:keep]
    stats.update(pool)
    logits.append(lg)
    seen += pool.shape[0]
    if num_samples is not None and seen >= num_samples:
      break
  if num_samples is not None and seen < num_samples:
    raise errors.UserError(f"the batches held {seen} images, fewer than num_samples={num_samples}.")
  all_logits = np.concatenate(logits, axis=0) if logits else np.zeros((0, inception.NUM_LOGITS), np.float32)
  return stats, all_logits


# ----------------------------------------------------------------------------
# The metrics.
# ----------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as TTUR/pytorch-fid.

  d² = ||mu1 − mu2||² + Tr(sigma1 + sigma2 − 2·sqrtm(sigma1·sigma2)).
  If the product is singular (non-finite square root), eps·I is added to both
  covariances; an imaginary part of the square root is dropped if its
  diagonal is within 1e-3 of zero, and an error otherwise.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].
    eps: the diagonal offset of the retry.

  Returns:
    The distance (a Python float).
  """
  from scipy import linalg  # pylint: disable=g-import-not-at-top

  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise errors.UserError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}.")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise errors.UserError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}.")

  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product of covariances; adding %g to their diagonals.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise errors.UserError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1·sigma2).")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score from logits, as OpenAI's `get_inception_score`.

  p(y|x) = softmax over all the logits (1008 for the FID Inception); the N
  samples are cut into `splits` consecutive parts (part i is
  [i·N//splits, (i+1)·N//splits)); each part scores
  exp(mean_x KL(p(y|x) || mean_x p(y|x))).

  Args:
    logits: [N, K].
    splits: number of parts.

  Returns:
    (mean, std) of the per-part scores (population std, as np.std).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise errors.UserError(f"logits must have shape [N, K], got {logits.shape}.")
  n = logits.shape[0]
  if splits < 1 or n < splits:
    raise errors.UserError(f"need at least one sample per split: N={n}, splits={splits}.")
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    part_p = p[i * n // splits : (i + 1) * n // splits]
    part_log_p = log_p[i * n // splits : (i + 1) * n // splits]
    log_py = np.log(part_p.mean(axis=0, keepdims=True))
    kl = np.where(part_p > 0, part_p * (part_log_p - log_py), 0.0)
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# Reference statistics files.
# ----------------------------------------------------------------------------


def save_statistics(path: str | os.PathLike, mu, sigma) -> None:
  """Writes `mu` [D] and `sigma` [D, D] (float64) to an `.npz`, the standard format."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise errors.UserError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, mu=mu, sigma=sigma)
  runtime.atomic_write(path, buf.getvalue())


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) in float64 from an `.npz` with keys `mu` and `sigma`."""
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise errors.UserError(
        f"{path} holds {data.files}; FID reference statistics need the arrays 'mu' and 'sigma' "
        "(TTUR/pytorch-fid format)."
      )
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise errors.UserError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  return mu, sigma
