r"""Reference values of the digit metric: real held-out digits scored against the train split.

  python -m benchmarks.digits_metric_reference [--json_out=/tmp/digits_reference.json]

Scores with `digits_metric.compute_digit_metrics` (reference: the 1,500
digits of the train split, k = 3):

* the whole test split (297 held-out digits): what a perfect model's 297
  samples would score;
* random halves of the test split (148 images; `--num_partitions` random
  partitions into two disjoint halves): mean ± std, the noise of a figure over
  sets of that size;
* 297 random copies of training images: what a model that memorised its data
  would score;
* the test split with Gaussian pixel noise (σ = 25 and 50 of 255): how the
  figures move for degraded digits;
* 297 images of uniform pixel noise: what no digits at all score.

Prints a Markdown table (the one in docs/digits_metric.md) and writes every
number to --json_out when given.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app
from absl import flags

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import digits_metric

_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random subsets and the pixel noise.")
_PARTITIONS = flags.DEFINE_integer("num_partitions", 5, "Random partitions of the test split into two halves.")
_K = flags.DEFINE_integer("k", digits_metric.DEFAULT_K, "Neighbour of the precision/recall radii.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")

FIGURES = ("digits_fd", "digits_is", "digits_confidence", "digits_precision", "digits_recall", "digits_memorisation")


def _noisy(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
  noise = rng.normal(0.0, std, images.shape)
  return np.clip(np.round(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def reference_values(seed: int = 0, num_partitions: int = 5, k: int = digits_metric.DEFAULT_K) -> dict:
  """Every row of the table as {name: {figure: value or (mean, std), 'num_samples': N}}."""
  train_images, _ = input_pipeline.load_digits("train")
  test_images, _ = input_pipeline.load_digits("test")
  rng = np.random.default_rng(seed)
  score = lambda images: digits_metric.compute_digit_metrics(images, train_images, k=k)  # noqa: E731
  rows = {"test split": score(test_images)}
  halves = []
  half = len(test_images) // 2
  for _ in range(num_partitions):
    order = rng.permutation(len(test_images))
    halves += [score(test_images[order[:half]]), score(test_images[order[half : 2 * half]])]
  rows[f"test halves ({len(halves)}×{half})"] = {
    **{f: (float(np.mean([h[f] for h in halves])), float(np.std([h[f] for h in halves], ddof=1))) for f in FIGURES},
    "num_samples": half,
    "num_reference": len(train_images),
    "k": k,
  }
  rows["train copies"] = score(train_images[rng.permutation(len(train_images))[: len(test_images)]])
  for std in (25, 50):
    rows[f"test + noise σ={std}"] = score(_noisy(test_images, std, rng))
  rows["uniform noise"] = score(rng.integers(0, 256, test_images.shape).astype(np.uint8))
  return rows


def markdown_table(rows: dict) -> str:
  head = (
    "| set | N | FD ↓ | IS ↑ | confidence ↑ | precision ↑ | recall ↑ | memorisation |\n"
    "|---|---|---|---|---|---|---|---|"
  )
  lines = [head]
  for name, row in rows.items():
    cells = []
    for f in FIGURES:
      value = row[f]
      digits = 2 if f in ("digits_fd", "digits_is") else 3
      cells.append(
        f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}" if isinstance(value, tuple) else f"{value:.{digits}f}"
      )
    lines.append(f"| {name} | {row['num_samples']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = reference_values(_SEED.value, _PARTITIONS.value, _K.value)
  print(
    f"Digit metric against the digits train split (1500 images), k = {_K.value}, seed {_SEED.value}, "
    f"classifier sha256 {digits_metric.weights_sha256()[:12]}:\n"
  )
  print(markdown_table(rows))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(
        {"seed": _SEED.value, "k": _K.value, "classifier_sha256": digits_metric.weights_sha256(), "rows": rows},
        f,
        indent=2,
      )
    print(f"\nWrote {_JSON_OUT.value}.")


if __name__ == "__main__":
  app.run(main)
