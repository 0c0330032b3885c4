r"""Distilled students beside their teacher's samplers: the digit metric at the same number of network calls.

For a digits workdir distilled with `--mode=distill` (students in <workdir>/distill/<n>steps), every setting
draws the same --num_samples images (rng --seed, sample i from (rng, i)) and is scored with the shipped digit
classifier against the digits train split (`harness.digit_quality`, as `sampler_quality`; the time is the
sampling wall time after one untimed compilation call):

  * each student of --students, with its own sampler (DDIM, η = 0, its `nested` grid);
  * the teacher (the trained model, EMA) at the same number of calls: DDIM on the same grid, DPM-Solver++(2M)
    and its SDE variant; at one call (where DPM-Solver++(2M) cannot run) DDIM, ancestral, Euler and Heun;
  * the teacher's DPM-Solver++(2M) SDE and DPM-Solver++(2M) at 20 calls, and the paper's ancestral sampler at 1000.

Prints a Markdown table, writes every figure to --json_out and, with --pictures, one 8×8 grid of samples per
student and a comparison grid (one row per setting).

  python -m benchmarks.distill_quality --workdir=runs/digits --json_out=/tmp/distill_quality.json \
    --pictures=docs/distillation
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app
from absl import flags

from benchmarks import harness
from diffusion_jax import cli
from diffusion_jax import distill_rounds
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import samplers

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "A trained and distilled digits workdir.")
_STUDENTS = flags.DEFINE_list("students", ["8", "4", "2", "1"], "Student steps to measure.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Images per setting.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Sampling batch.")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling rng.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")
_PICTURES = flags.DEFINE_string("pictures", "", "Write PNG grids to <this>_<n>steps.png and <this>_compare.png.")


def _teacher_settings(T: int, calls: int) -> list:
  # DPM-Solver++(2M) takes 2 steps at least (its one-step, first-order form is DDIM): at one call, the samplers
  # that take one step instead.
  names = ["ddim", "dpmpp2m", "dpmpp2m_sde"] if calls > 1 else ["ddim", "ancestral", "euler", "heun"]
  specs = []
  for name in names:
    spacing = distill_rounds.SPACING if name == "ddim" else None
    specs.append(samplers.resolve(name, num_timesteps=T, num_steps=calls, timestep_spacing=spacing))
  return specs


def main(argv):
  del argv
  cli.quiet_logging()
  teacher = inference.load_model(_WORKDIR.value)
  T = teacher.diffusion.num_timesteps
  reference = input_pipeline.load_digits("train")[0]
  rng = jax.random.PRNGKey(_SEED.value)
  settings = []  # (label, model, spec)
  for n in [int(s) for s in _STUDENTS.value]:
    student = inference.load_model(distill_rounds.student_workdir(_WORKDIR.value, n))
    settings.append(
      (f"student {n}", student, samplers.SamplerSpec.from_config(student.config.sampling, num_timesteps=T))
    )
    settings += [(f"teacher {spec.folder_name}", teacher, spec) for spec in _teacher_settings(T, n)]
  settings += [
    (f"teacher {spec.folder_name}", teacher, spec)
    for spec in (
      samplers.resolve("dpmpp2m_sde", num_timesteps=T, num_steps=min(20, T - 1)),  # T - 1: tiny test models
      samplers.resolve("dpmpp2m", num_timesteps=T, num_steps=min(20, T - 1)),
      samplers.resolve("ancestral", num_timesteps=T, num_steps=T),
    )
  ]
  rows, pictures = [], {}
  print(f"teacher {teacher!r}: {len(settings)} settings, {_NUM.value} samples each", flush=True)
  for label, model, spec in settings:
    seconds, compile_s, metric, images = measure(model, spec, rng, reference)
    pictures[label] = images[:64]
    rows.append(harness.digit_row(label, spec, seconds, compile_s, metric, sampler=spec.folder_name))
    print(harness.digit_line(f"{label:40s}", spec.network_calls, seconds, metric), flush=True)
  print()
  print(
    f"| setting | network calls | s / {_NUM.value} samples | FD ↓ | IS ↑ | confidence ↑ | precision ↑ | recall ↑ "
    "| memorisation (≈0.5) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['setting']} | {r['calls']} | {r['seconds']:.1f} | {r['digits_fd']:.2f} | {r['digits_is']:.2f} | "
      f"{r['digits_confidence']:.3f} | {r['digits_precision']:.3f} | {r['digits_recall']:.3f} | "
      f"{r['digits_memorisation']:.3f} |"
    )
  if _PICTURES.value:
    for n in _STUDENTS.value:
      grid = images_lib.make_grid(pictures[f"student {n}"], scale=4, ncols=8)
      images_lib.save_image(grid, f"{_PICTURES.value}_{n}steps.png", overwrite=True)
    labels = [r["setting"] for r in rows if r["setting"].startswith("student") or "_20steps" in r["setting"]]
    labels += [r["setting"] for r in rows if r["calls"] == 1 and r["setting"].startswith("teacher")]
    strip = np.concatenate([pictures[label][:16] for label in labels])
    images_lib.save_image(
      images_lib.make_grid(strip, scale=4, ncols=16), f"{_PICTURES.value}_compare.png", overwrite=True
    )
    print(f"pictures: {_PICTURES.value}_<n>steps.png; {_PICTURES.value}_compare.png rows: {', '.join(labels)}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(
        dict(workdir=_WORKDIR.value, num_samples=_NUM.value, seed=_SEED.value, devices=jax.device_count(), rows=rows),
        f,
        indent=1,
      )


def measure(model, spec, rng, reference):
  return harness.digit_quality(model, spec, _NUM.value, _BATCH.value, rng, reference)


if __name__ == "__main__":
  app.run(main)
