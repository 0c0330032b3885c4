r"""A sample-quality metric for the 8×8 digits: a small shipped classifier in place of Inception.

Inception's features mean little on 8×8 grey digits, so `dataset=digits` is
scored with `DigitClassifier`, a small conv net trained on the digits train
split only (`python -m benchmarks.train_digit_classifier`; weights in
`diffusion_jax/data/digit_classifier.npz`, its log next to them). From its
penultimate features φ(x) [64] and class probabilities p(y|x) [10]:

* `digits_fd`: the Fréchet distance between Gaussians fitted to φ of the
  samples and of the reference images (FID's formula, `fid.frechet_distance`).
* `digits_is`: exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the
  samples (Inception Score's formula, one split); at most 10.
* `digits_confidence`: the mean over samples of max_y p(y|x).
* `digits_precision`, `digits_recall`: k-NN precision and recall in φ space
  (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): precision is the fraction of samples inside
  the union of reference k-NN balls, recall the fraction of reference images
  inside the union of sample k-NN balls (a ball's radius is the distance to its
  centre's k-th nearest neighbour in its own set).
* `digits_memorisation`: the fraction of samples whose nearest reference image
  (pixel space, L2) is closer than the median nearest-neighbour distance
  between reference images (copies of training images score 1).
* `digits_class_histogram`: the number of samples predicted as each digit.

For class-conditional samples, `conditional_digit_metrics` adds how often a sample is the digit it was drawn for
(`class_accuracy`) and the Fréchet distance of each class.

The reference is the digits train split unless given. `docs/digits_metric.md`
lists the values of the held-out test split (the floor a perfect model would
reach) with their noise.

  from diffusion_jax.evaluation import digits_metric
  result = digits_metric.compute_digit_metrics(samples)  # uint8 [N, 8, 8, 1]
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import data_sources
from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax.evaluation import fid as fid_lib

WEIGHTS_PATH = pathlib.Path(__file__).resolve().parent.parent / "data" / "digit_classifier.npz"
TRAIN_COMMAND = "python -m benchmarks.train_digit_classifier"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64
DEFAULT_K = 3
# The scalar figures of `compute_digit_metrics`, in the order tables print them.
FIGURES = (
  "digits_fd",
  "digits_is",
  "digits_confidence",
  "digits_precision",
  "digits_recall",
  "digits_memorisation",
)
_BATCH = 256  # classifier batch: inputs are padded to it, so there is one compilation
_DIST_CHUNK = 1024  # rows of a pairwise-distance block


# ----------------------------------------------------------------------------
# The classifier.
# ----------------------------------------------------------------------------


class DigitClassifier(nn.Module):
  """A small conv net for 8×8×1 digits: 3 convolutions, a feature layer and a linear classifier.

  `__call__(x [B, 8, 8, 1] float in [-1, 1]) -> (features [B, features], logits [B, num_classes])`,
  where the features are the penultimate dense layer's outputs before its ReLU (so no feature is constant, as a dead
  ReLU unit's would be, and their covariance has full rank).
  """

  features: int = FEATURE_DIM
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 4×4
    x = nn.relu(nn.Conv(64, (3, 3), name="conv3")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 2×2
    x = x.reshape((x.shape[0], -1))
    features = nn.Dense(self.features, name="dense_features")(x)
    return features, nn.Dense(self.num_classes, name="dense_logits")(nn.relu(features))


def init_params(rng) -> dict[str, Any]:
  """Freshly initialised `DigitClassifier` parameters."""
  return DigitClassifier().init(rng, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))["params"]


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def save_params(params, path: str | os.PathLike) -> pathlib.Path:
  """Writes the parameters as an `.npz` of float32 arrays with flat keys (`conv1/kernel`, …), no pickle."""
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **flat)
  runtime.atomic_write(path, buf.getvalue())
  return path


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """The classifier's parameters from `path` (default: the shipped `digit_classifier.npz`).

  Raises:
    FileNotFoundError: the file is missing (the message names the command that makes it).
    ValueError: the file is unreadable or its arrays do not match `DigitClassifier`.
  """
  path = pathlib.Path(path) if path is not None else WEIGHTS_PATH
  if not path.exists():
    raise errors.MissingFileError(
      f"The digit classifier weights {path} are missing; they ship with the package "
      f"(reinstall it) or can be made with `{TRAIN_COMMAND}`."
    )
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
      f"The digit classifier weights {path} are damaged or not an .npz of arrays ({e}); restore the "
      f"file from the package or remake it with `{TRAIN_COMMAND}`."
    ) from e
  expected = _expected_shapes()
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise errors.UserError(
      f"The digit classifier weights {path} do not match DigitClassifier (missing {missing}, "
      f"unexpected {extra}, wrong shapes {wrong}); restore the file or remake it with "
      f"`{TRAIN_COMMAND}`."
    )
  bad = [k for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all()]
  if bad:
    raise errors.UserError(
      f"The digit classifier weights {path} hold non-float or non-finite values in {sorted(bad)}; "
      f"restore the file or remake it with `{TRAIN_COMMAND}`."
    )
  return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")


@functools.lru_cache(maxsize=1)
def _shipped_params() -> dict[str, Any]:
  return load_params()


def weights_sha256(path: str | os.PathLike | None = None) -> str:
  """SHA-256 of the weights file (default: the shipped one), to record which classifier scored a run."""
  return hashlib.sha256(pathlib.Path(path or WEIGHTS_PATH).read_bytes()).hexdigest()


@jax.jit
def _apply(params, x):
  return DigitClassifier().apply({"params": params}, x)


# ----------------------------------------------------------------------------
# Inputs and classifier outputs.
# ----------------------------------------------------------------------------


def check_images(images, name: str = "samples") -> np.ndarray:
  """`images` as a uint8 NumPy array [N, 8, 8, 1], N ≥ 1, or a ValueError saying what is wrong."""
  dtype = getattr(images, "dtype", None)
  if dtype is None or np.dtype(dtype) != np.uint8:
    raise errors.UserError(
      f"{name} must be uint8 images [N, 8, 8, 1] in 0..255 (e.g. images.to_uint8(x) of [-1, 1] "
      f"floats), got dtype {dtype}."
    )
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] < 1:
    raise errors.UserError(f"{name} must have shape [N, 8, 8, 1] with N ≥ 1 (8×8 grey digits), got {images.shape}.")
  return images


def classify(images, params=None) -> tuple[np.ndarray, np.ndarray]:
  """Classifier features and logits of uint8 images.

  Args:
    images: uint8 [N, 8, 8, 1].
    params: classifier parameters (default: the shipped weights).

  Returns:
    (features [N, 64] float32, logits [N, 10] float32).
  """
  images = check_images(images)
  params = _shipped_params() if params is None else params
  features, logits = [], []
  for start in range(0, len(images), _BATCH):
    batch = images[start : start + _BATCH]
    n = len(batch)
    x = np.zeros((_BATCH,) + IMAGE_SHAPE, np.float32)
    x[:n] = batch.astype(np.float32) / 127.5 - 1.0
    f, lg = jax.device_get(_apply(params, x))
    features.append(np.asarray(f[:n]))
    logits.append(np.asarray(lg[:n]))
  return np.concatenate(features), np.concatenate(logits)


def softmax(logits) -> np.ndarray:
  """p(y|x) [N, K] in float64 from logits [N, K]."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------
# The figures.
# ----------------------------------------------------------------------------


def frechet_distance(features1, features2) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets [N1, D], [N2, D] (FID's formula)."""
  mu1, sigma1 = fid_lib.compute_statistics(features1)
  mu2, sigma2 = fid_lib.compute_statistics(features2)
  return max(0.0, fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2))


def classifier_score(probs) -> float:
  """exp(E_x KL(p(y|x) || p(y))) over all rows of probs [N, K], p(y) their mean; in [1, K]."""
  p = np.asarray(probs, np.float64)
  p_y = p.mean(axis=0, keepdims=True)
  kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(p_y > 0, p_y, 1.0))), 0.0)
  return float(np.exp(kl.sum(axis=1).mean()))


def mean_confidence(probs) -> float:
  """The mean over rows of max_y p(y|x)."""
  return float(np.asarray(probs, np.float64).max(axis=1).mean())


def class_histogram(probs) -> list[int]:
  """The number of rows predicted (argmax) as each class, a list of K counts."""
  probs = np.asarray(probs)
  return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]).astype(int).tolist()


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared L2 distances [len(a), len(b)] in float64, clipped at 0."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def _chunks(n: int):
  for start in range(0, n, _DIST_CHUNK):
    yield slice(start, min(n, start + _DIST_CHUNK))


def kth_nearest_distances(queries, points, *, k: int, within: bool = False) -> np.ndarray:
  """L2 distance [len(queries)] from each query to its k-th nearest point.

  Args:
    queries: [M, D].
    points: [N, D].
    k: which neighbour (1 = the nearest).
    within: queries are `points` itself: each point's own zero distance is
      skipped (duplicates still count as neighbours at distance 0).
  """
  q = np.asarray(queries, np.float64).reshape(len(queries), -1)
  p = np.asarray(points, np.float64).reshape(len(points), -1)
  kk = k + 1 if within else k
  if not 1 <= kk <= len(p):
    raise errors.UserError(f"k={k} needs at least {kk} points, got {len(p)}.")
  out = np.empty(len(q), np.float64)
  for rows in _chunks(len(q)):
    d = _sq_dists(q[rows], p)
    if within:
      d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = -1.0  # own entry sorts first and is skipped
    out[rows] = np.partition(d, kk - 1, axis=1)[:, kk - 1]
  return np.sqrt(out)


def _fraction_in_balls(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  """Fraction of queries within distance radii[j] of some centre j."""
  inside = np.zeros(len(queries), bool)
  r2 = radii**2
  for rows in _chunks(len(queries)):
    inside[rows] = (_sq_dists(queries[rows], centres) <= r2[None, :]).any(axis=1)
  return float(inside.mean())


def precision_recall(real_features, fake_features, *, k: int = DEFAULT_K) -> tuple[float, float]:
  """k-NN precision and recall (Kynkäänniemi et al. 2019) of fake [N, D] against real [M, D] features.

  Precision: the fraction of fake points within the k-NN radius of some real
  point; recall: the fraction of real points within the k-NN radius of some
  fake point. Radii are taken within each set (k-th neighbour, self excluded).
  """
  if k < 1:
    raise errors.UserError(f"k must be ≥ 1, got {k}.")
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  if min(len(real), len(fake)) < k + 1:
    raise errors.UserError(
      f"k-NN precision/recall with k={k} need at least {k + 1} images in each set, got "
      f"{len(real)} reference and {len(fake)} samples."
    )
  real_radii = kth_nearest_distances(real, real, k=k, within=True)
  fake_radii = kth_nearest_distances(fake, fake, k=k, within=True)
  return _fraction_in_balls(fake, real, real_radii), _fraction_in_balls(real, fake, fake_radii)


def memorisation(samples, reference) -> tuple[float, float]:
  """Fraction of samples whose nearest reference image (pixel L2) is closer than the reference's median NN distance.

  Args:
    samples: uint8 [N, 8, 8, 1].
    reference: uint8 [M, 8, 8, 1], the training images.

  Returns:
    (fraction, threshold): the threshold is the median over reference images
    of the distance to their nearest other reference image, in uint8 pixel units.
  """
  s = np.asarray(samples, np.float64).reshape(len(samples), -1)
  r = np.asarray(reference, np.float64).reshape(len(reference), -1)
  threshold = float(np.median(kth_nearest_distances(r, r, k=1, within=True)))
  return float((kth_nearest_distances(s, r, k=1) < threshold).mean()), threshold


# ----------------------------------------------------------------------------
# The metric.
# ----------------------------------------------------------------------------


def reference_images(split: str = "train") -> np.ndarray:
  """The digits images of `split` (uint8 [N, 8, 8, 1]), the default reference."""
  return data_sources.load_digits(split)[0]


def compute_digit_metrics(samples_uint8, reference_uint8=None, *, k: int = DEFAULT_K, params=None) -> dict[str, Any]:
  """Every digit figure of a set of samples against a reference set.

  Args:
    samples_uint8: uint8 [N, 8, 8, 1], N ≥ k + 1 (and ≥ 2 for the covariance).
    reference_uint8: uint8 [M, 8, 8, 1], the training images (default: the
      digits train split).
    k: the neighbour of the precision/recall radii.
    params: classifier parameters (default: the shipped weights).

  Returns:
    A JSON-serialisable dict: `digits_fd`, `digits_is`, `digits_confidence`,
    `digits_precision`, `digits_recall`, `digits_memorisation` (floats),
    `digits_class_histogram` (10 counts), `digits_memorisation_threshold`
    (pixels), `num_samples`, `num_reference`, `k`.
  """
  samples = check_images(samples_uint8, "samples")
  reference = check_images(reference_images() if reference_uint8 is None else reference_uint8, "reference")
  if len(samples) < 2 or len(reference) < 2:
    raise errors.UserError(
      f"The Fréchet distance needs at least 2 samples and 2 reference images, got {len(samples)} and {len(reference)}."
    )
  fake_features, fake_logits = classify(samples, params)
  real_features, _ = classify(reference, params)
  probs = softmax(fake_logits)
  precision, recall = precision_recall(real_features, fake_features, k=k)
  memo, threshold = memorisation(samples, reference)
  return {
    "digits_fd": frechet_distance(fake_features, real_features),
    "digits_is": classifier_score(probs),
    "digits_confidence": mean_confidence(probs),
    "digits_precision": precision,
    "digits_recall": recall,
    "digits_memorisation": memo,
    "digits_memorisation_threshold": threshold,
    "digits_class_histogram": class_histogram(probs),
    "num_samples": int(len(samples)),
    "num_reference": int(len(reference)),
    "k": int(k),
  }


def class_accuracy(samples, requested_labels, *, params=None) -> dict[str, Any]:
  """How often the classifier recognises the requested digit in class-conditional samples.

  Args:
    samples: uint8 [N, 8, 8, 1].
    requested_labels: int [N], the class each sample was drawn for (0..9).
    params: classifier parameters (default: the shipped weights).

  Returns:
    dict(overall=float, per_class={digit: float or None (no samples)}, counts={digit: int}).
  """
  samples = check_images(samples)
  labels = np.asarray(requested_labels)
  if labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer):
    raise errors.UserError(
      f"requested_labels must be integers of shape [{len(samples)}] (one per sample), got "
      f"{labels.dtype} {labels.shape}."
    )
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise errors.UserError(f"requested_labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}.")
  _, logits = classify(samples, params)
  correct = logits.argmax(axis=1) == labels
  per_class = {c: (float(correct[labels == c].mean()) if (labels == c).any() else None) for c in range(NUM_CLASSES)}
  counts = {c: int((labels == c).sum()) for c in range(NUM_CLASSES)}
  return {"overall": float(correct.mean()), "per_class": per_class, "counts": counts}


def conditional_digit_metrics(
  images: np.ndarray, labels: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray
) -> dict[str, Any]:
  """Class accuracy (overall, per class) and the per-class Fréchet distance of class-conditional digit samples."""
  acc = class_accuracy(images, labels)
  fake_features, _ = classify(images)
  real_features, _ = classify(reference)
  per_class_fd = {}
  for c in range(NUM_CLASSES):
    fake, real = fake_features[labels == c], real_features[reference_labels == c]
    per_class_fd[str(c)] = frechet_distance(fake, real) if len(fake) >= 2 and len(real) >= 2 else None
  return {
    "digits_class_accuracy": acc["overall"],
    "digits_class_accuracy_per_class": {str(c): v for c, v in acc["per_class"].items()},
    "digits_class_counts": {str(c): v for c, v in acc["counts"].items()},
    "digits_fd_per_class": per_class_fd,
  }
