"""`digits`: the digit-classifier metric of samples (`digits_metric`), and what `fid` means for `dataset=digits`.

Fréchet distance, classifier score, precision, recall, memorisation, the class histogram; class accuracy and the
per-class Fréchet distance for a class-conditional model.
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from diffusion_jax import data_sources
from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import fid_stats
from diffusion_jax.evaluation import sample_export
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import registry
from diffusion_jax.evaluation.evaluators import samples

DIGIT_SCALARS = (*digits_metric.FIGURES, "digits_class_accuracy")


@registry.register
class DigitsEvaluator(base.Evaluator):
  """The digit-classifier metric of the entry's samples against `config.eval.fid_split` of the digits (default:
  train)."""

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
    samples.check_samples(self)

  def run(self, model, *, mesh):
    paths, provenance, sampling_s = samples.draw_samples(self, model)
    start = time.time()
    images, labels = sample_export.read_sample_chunks(paths, with_labels=True)
    if len(images) != provenance["num_samples"]:
      raise RuntimeError(f"The sample chunks hold {len(images)} images, expected {provenance['num_samples']}.")
    split = fid_stats.fid_split(self.config)
    reference, reference_labels = data_sources.load_digits(split)
    result = dict(digits_metric.compute_digit_metrics(images, reference))
    if model.num_classes:
      result.update(digits_metric.conditional_digit_metrics(images, labels, reference, np.asarray(reference_labels)))
    figures, details, _ = base.split_result(result)
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
    return base.Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"sampling": sampling_s, "metric": time.time() - start},
      scalars={f"eval/{k}": float(result[k]) for k in DIGIT_SCALARS if k in result},
      summary=summary,
    )
