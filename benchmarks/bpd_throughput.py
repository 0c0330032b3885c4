r"""Bits/dim evaluation throughput: images × bound terms / s of the jitted, sharded `calc_bpd_loop`.

Times `GaussianDiffusion.calc_bpd_loop` (one `lax.scan` over the T terms of
the variational bound, one network call each) jitted with the batch sharded
over every device and the parameters replicated, as `evaluation.bpd` runs it,
with random parameters and random images. Each term costs one network call
whatever the schedule, so on small machines --num_terms runs the config's
schedule kind over fewer timesteps; the time of the paper's evaluation (the
10,000 CIFAR-10 test images × 1000 terms) is then extrapolated from the
measured rate and reported as such.

CPU:
  python -m benchmarks.bpd_throughput --batch_size=8 --num_terms=5 --json_out=/tmp/bpd.json
GPU:
  python -m benchmarks.bpd_throughput --batch_size=256 --dtype=bfloat16 --json_out=/tmp/bpd.json
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import programs
from diffusion_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar.py", "The model/diffusion config.", lock_config=True)
_BATCH = flags.DEFINE_integer(
  "batch_size", None, "Global eval batch (default: 8 on CPU, config.eval.batch_size otherwise)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype (model.dtype).")
_TERMS = flags.DEFINE_integer(
  "num_terms", None, "Bound terms (timesteps T) per call (default: 5 on CPU, the config's T otherwise)."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (after one untimed call).")
_EVAL_IMAGES = flags.DEFINE_integer("eval_images", 10_000, "Images of the evaluation to extrapolate to.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device (overrides the built-in table).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")


def main(argv):
  del argv
  config = _CONFIG.value
  on_cpu = jax.default_backend() == "cpu"
  batch_size = _BATCH.value or (8 if on_cpu else config.eval.batch_size)
  full_terms = config.diffusion.num_timesteps
  num_terms = _TERMS.value or (5 if on_cpu else full_terms)
  env = harness.environment()
  peak = harness.peak_flops_per_device(env["device_kind"], _DTYPE.value, _PEAK.value)
  print(
    f"{env['device_kind']} x{env['num_devices']}, jax {env['jax']}, {env['cpu_count']} CPUs, load {env['load_average']}"
  )

  config = config.copy_and_resolve_references()
  config.unlock()
  config.diffusion.num_timesteps = num_terms
  _, model, params, image_shape = programs.model_and_params(config, _DTYPE.value)
  diffusion = runtime.build_diffusion(config)
  flops_call = programs.forward_flops(model, params, batch_size, image_shape)

  print(f"Compiling calc_bpd_loop ({num_terms} terms, batch {batch_size})...", flush=True)
  c = programs.bpd_loop(model, params, diffusion, image_shape, batch_size)
  compile_s = c.info["compile_s"]
  print(f"  compiled in {compile_s:.1f} s")
  name = c.name
  r = harness.time_interleaved([c], warmup=1, windows=_REPEATS.value, per_window=1)[name]
  sec_per_term = r["seconds_per_run"] / num_terms
  achieved = flops_call / sec_per_term if flops_call else None
  mfu = achieved / (peak * jax.device_count()) if achieved and peak else None
  eval_s = _EVAL_IMAGES.value * full_terms / r["rate"]
  harness.print_table(
    f"Bits/dim throughput, {config.data.dataset} model, batch {batch_size}, {_DTYPE.value}",
    ["row", "img*terms/s", "s/term", "TFLOP/s", "MFU", "compile s", f"s for {_EVAL_IMAGES.value}x{full_terms}"],
    [
      [
        name,
        r["rate"],
        sec_per_term,
        achieved / 1e12 if achieved else None,
        f"{100 * mfu:.1f}%" if mfu else "n/a",
        compile_s,
        f"{eval_s:.4g} (extrapolated)",
      ]
    ],
    [
      f"load average at the start {env['load_average']}; {env['cpu_count']} CPUs",
      f"img*terms/s: median of {_REPEATS.value} calls; every term is one network call at batch {batch_size}",
      f"the {_EVAL_IMAGES.value}-image, {full_terms}-term evaluation is extrapolated from this rate",
    ],
  )
  harness.write_json(
    _JSON_OUT.value,
    {
      "benchmark": "bpd_throughput",
      "environment": env,
      "batch_size": batch_size,
      "dtype": _DTYPE.value,
      "num_terms": num_terms,
      "flops_per_network_call": flops_call,
      "peak_flops_per_device": peak,
      "image_terms_per_s": r["rate"],
      "seconds_per_term": sec_per_term,
      "achieved_tflops": achieved / 1e12 if achieved else None,
      "mfu": mfu,
      "compile_s": compile_s,
      f"seconds_for_{_EVAL_IMAGES.value}x{full_terms}_extrapolated": eval_s,
      **r,
    },
  )


if __name__ == "__main__":
  app.run(main)
