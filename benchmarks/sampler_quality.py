r"""Quality per second of every sampler: wall time and the digit metric at a given number of network calls.

For a trained digits workdir (EMA parameters), each sampler draws the same
--num_samples images (rng --seed, sample i from (rng, i)) with enough steps
for each budget of --calls network evaluations per image (Heun: 2 per step
but the last, so (calls + 1) // 2 steps), and the samples are scored with the
shipped digit classifier (`diffusion_jax.evaluation.digits_metric`) against
the digits train split. The time is the sampling wall time of the set after
one untimed compilation call on the first batch; compilation is reported
separately. Prints a Markdown table and writes every figure to --json_out.

  python -m benchmarks.sampler_quality --workdir=runs/digits --num_samples=1000 \
    --json_out=/tmp/sampler_quality.json
"""

from __future__ import annotations

import json

import jax
from absl import app
from absl import flags

from benchmarks import harness
from diffusion_jax import cli
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import samplers

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "A trained digits workdir.")
_SAMPLERS = flags.DEFINE_list(
  "samplers", ["ancestral", "ddim", "dpmpp2m", "dpmpp3m", "dpmpp2m_sde", "euler", "heun"], "Samplers to measure."
)
_CALLS = flags.DEFINE_list("calls", ["10", "20", "50", "100"], "Network calls per image.")
_FULL = flags.DEFINE_list("full_samplers", ["ancestral"], "Samplers also run at T network calls (the paper's 1000).")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Images per setting.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Sampling batch.")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling rng.")
_KARRAS = flags.DEFINE_list("karras", ["dpmpp2m"], "σ-samplers also run on the Karras σ grid.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")

SIGMA_SAMPLERS = ("euler", "heun", "dpmpp2m", "dpmpp3m", "dpmpp2m_sde", "dpmpp3m_sde")


def _steps(sampler: str, calls: int) -> int:
  return (calls + 1) // 2 if sampler == "heun" else calls


def measure(model, spec, num_samples, batch_size, rng, reference):
  """(seconds, compile seconds, metric dict) of one sampler setting (`harness.digit_quality`)."""
  return harness.digit_quality(model, spec, num_samples, batch_size, rng, reference)[:3]


def main(argv):
  del argv
  cli.quiet_logging()  # our lines only on the console, as the package's commands
  model = inference.load_model(_WORKDIR.value)
  T = model.diffusion.num_timesteps
  reference = input_pipeline.load_digits("train")[0]
  rng = jax.random.PRNGKey(_SEED.value)
  settings = []
  for name in _SAMPLERS.value:
    for calls in [int(c) for c in _CALLS.value] + ([T] if name in _FULL.value else []):
      schedules = [None] + (["karras"] if name in _KARRAS.value and name in SIGMA_SAMPLERS else [])
      for schedule in schedules:
        try:
          spec = samplers.resolve(name, num_timesteps=T, num_steps=min(_steps(name, calls), T), sigma_schedule=schedule)
        except ValueError as e:
          print(f"skipping {name} at {calls} calls: {e}")
          continue
        settings.append(spec)
  rows = []
  print(f"{model!r}: {len(settings)} settings, {_NUM.value} samples each", flush=True)
  for spec in settings:
    seconds, compile_s, metric = measure(model, spec, _NUM.value, _BATCH.value, rng, reference)
    row = harness.digit_row(
      spec.folder_name, spec, seconds, compile_s, metric, sampler=spec.name, num_steps=spec.num_steps
    )
    rows.append(row)
    print(harness.digit_line(f"{spec.folder_name:32s}", spec.network_calls, seconds, metric), flush=True)
  print()
  print(f"| sampler | network calls | s / {_NUM.value} samples | FD | IS | confidence | precision | recall |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['setting']} | {r['calls']} | {r['seconds']:.1f} | {r['digits_fd']:.2f} | {r['digits_is']:.2f} | "
      f"{r['digits_confidence']:.3f} | {r['digits_precision']:.3f} | {r['digits_recall']:.3f} |"
    )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(
        dict(
          workdir=_WORKDIR.value,
          step=model.step,
          num_samples=_NUM.value,
          batch_size=_BATCH.value,
          devices=jax.device_count(),
          rows=rows,
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)
