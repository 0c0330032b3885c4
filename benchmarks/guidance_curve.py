r"""Class accuracy and sample quality of a class-conditional digits model against the guidance scale.

For each scale s in --scales, draws --num_samples images (sample i of class i mod 10, rng --seed) with
classifier-free guidance ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)) and scores them with the shipped digit
classifier: how often a sample is classified as the digit it was drawn for (overall and per class),
and the digit metric of the whole set (Fréchet distance, IS, confidence, precision, recall) against the
digits train split. Prints a Markdown table; --json_out writes every figure.

  python -m benchmarks.guidance_curve --workdir=runs/digits_cond --scales=1,1.5,2,3,5 \
    --json_out=/tmp/guidance.json
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app
from absl import flags

from diffusion_jax import cli
from diffusion_jax import input_pipeline
from diffusion_jax import sampling
from diffusion_jax.evaluation import digits_metric

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits_cond", "A trained class-conditional digits workdir.")
_SCALES = flags.DEFINE_list("scales", ["1", "1.5", "2", "3", "5"], "Guidance scales s (1 = no guidance).")
_SAMPLER = flags.DEFINE_string("sampler", "dpmpp2m", "Sampler.")
_STEPS = flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Images per scale (class i mod 10).")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Sampling batch.")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling rng.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")


def main(argv):
  del argv
  cli.quiet_logging()  # our lines only on the console, as the package's commands
  model = sampling.load_model(_WORKDIR.value)
  if not model.num_classes:
    raise app.UsageError(f"{_WORKDIR.value} holds an unconditional model (model.num_classes = 0).")
  reference, reference_labels = input_pipeline.load_digits("train")
  rng = jax.random.PRNGKey(_SEED.value)
  labels = np.arange(_NUM.value) % model.num_classes
  rows = []
  print(f"{model!r}: {_SAMPLER.value}, {_STEPS.value} steps, {_NUM.value} samples per scale", flush=True)
  for scale in [float(s) for s in _SCALES.value]:
    t0 = time.perf_counter()
    images = sampling.sample_fn(
      model,
      _NUM.value,
      rng,
      sampler=_SAMPLER.value,
      num_steps=_STEPS.value,
      labels=labels,
      guidance_scale=scale,
      batch_size=_BATCH.value,
      progress=False,
    )
    seconds = time.perf_counter() - t0
    metric = digits_metric.compute_digit_metrics(images, reference)
    cond = digits_metric.conditional_digit_metrics(images, labels, reference, np.asarray(reference_labels))
    rows.append(dict(guidance_scale=scale, seconds=seconds, **metric, **cond))
    print(
      f"s={scale:g}: class accuracy {cond['digits_class_accuracy']:.3f}, FD {metric['digits_fd']:.2f}, "
      f"IS {metric['digits_is']:.2f}, precision {metric['digits_precision']:.3f}, recall "
      f"{metric['digits_recall']:.3f} ({seconds:.0f} s)",
      flush=True,
    )
  print()
  print("| guidance scale s | class accuracy | FD | IS | confidence | precision | recall |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['guidance_scale']:g} | {r['digits_class_accuracy']:.3f} | {r['digits_fd']:.2f} | "
      f"{r['digits_is']:.2f} | {r['digits_confidence']:.3f} | {r['digits_precision']:.3f} | "
      f"{r['digits_recall']:.3f} |"
    )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(
        dict(
          workdir=_WORKDIR.value,
          step=model.step,
          sampler=_SAMPLER.value,
          num_steps=_STEPS.value,
          num_samples=_NUM.value,
          rows=rows,
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)
