r"""Sampling throughput (images × network steps / s) of the compiled samplers, and the paper's 256 × 1000 cost.

Times `inference.make_sharded_sampler` (the whole chain as one `lax.scan`,
batch sharded over every device) for the ancestral and DDIM samplers with
random parameters, each call running --num_steps network evaluations at
--batch_size; calls of the samplers (and of the optional PyTorch baseline)
alternate. Every step costs one network call whatever the subset of timesteps,
so the time of 1000 ancestral steps is extrapolated from the measured per-step
time, and reported as such, unless --full runs the 1000 steps for real.

CPU:
  python -m benchmarks.sampling_throughput --batch_size=8 --num_steps=5 --json_out=/tmp/sampling.json
GPU (the paper's 256 samples × 1000 ancestral steps, measured in full):
  python -m benchmarks.sampling_throughput --batch_size=256 --dtype=bfloat16 --full --json_out=/tmp/sampling.json
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import programs
from benchmarks import torch_baseline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar.py", "The model/diffusion config.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global sampling batch (default: 8 on CPU, 256 otherwise).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype (model.dtype).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Network steps per sampler call (default: 5 on CPU, 100 otherwise).")
_FULL = flags.DEFINE_boolean("full", False, "Run the ancestral sampler over all T steps (no extrapolation).")
_SAMPLERS = flags.DEFINE_list("samplers", ["ancestral", "ddim"], "Samplers to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per sampler (after one untimed call).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device (overrides the built-in table).")
_TORCH = flags.DEFINE_boolean("torch", False, "Also time a PyTorch ancestral sampler (diffusers UNet2DModel).")
_TORCH_COMPILE = flags.DEFINE_boolean("torch_compile", False, "torch.compile the baseline's network.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")

REFERENCE_SAMPLES = 256  # the paper's sampling batch for the reported cost (256 images x T steps)


def main(argv):
  del argv
  config = _CONFIG.value
  on_cpu = jax.default_backend() == "cpu"
  batch_size = _BATCH.value or (8 if on_cpu else REFERENCE_SAMPLES)
  T = config.diffusion.num_timesteps
  num_steps = min(_STEPS.value or (5 if on_cpu else 100), T)
  env = harness.environment()
  peak = harness.peak_flops_per_device(env["device_kind"], _DTYPE.value, _PEAK.value)
  print(
    f"{env['device_kind']} x{env['num_devices']}, jax {env['jax']}, {env['cpu_count']} CPUs, load {env['load_average']}"
  )
  diffusion, model, params, image_shape = programs.model_and_params(config, _DTYPE.value)
  flops_call = programs.forward_flops(model, params, batch_size, image_shape)
  contenders = []
  for sampler in _SAMPLERS.value:
    steps = T if (_FULL.value and sampler == "ancestral") else num_steps
    print(f"Compiling {sampler} ({steps} steps, batch {batch_size})...", flush=True)
    c = programs.sampler(
      f"jax {sampler} ({steps} steps)", diffusion, model, params, image_shape, batch_size, sampler, steps, flops_call
    )
    print(f"  compiled in {c.info['compile_s']:.1f} s")
    contenders.append(c)
  if _TORCH.value and torch_baseline.import_torch() is not None:
    torch, _ = torch_baseline.import_torch()
    steps = T if _FULL.value else num_steps
    autocast = _DTYPE.value == "bfloat16"
    s = torch_baseline.AncestralSampler(
      config, diffusion, batch_size, steps, compile=_TORCH_COMPILE.value, autocast=autocast
    )
    env.update(harness.torch_environment(torch))
    contenders.append(
      harness.Contender(
        f"torch ancestral ({steps} steps, {'compile' if _TORCH_COMPILE.value else 'eager'}"
        f"{', bf16 autocast' if autocast else ''})",
        s.run,
        batch_size * steps,
        None,
        {"compile_s": s.compile_seconds, "sampler": "ancestral", "num_steps": steps},
      )
    )

  results = harness.time_interleaved(contenders, warmup=1, windows=_REPEATS.value, per_window=1)
  torch_name = contenders[-1].name if contenders[-1].name.startswith("torch") else None
  rows, payload_rows = [], []
  for c in contenders:
    r = results[c.name]
    steps = c.info["num_steps"]
    sec_per_step = r["seconds_per_run"] / steps
    achieved = flops_call / sec_per_step if flops_call else None
    mfu = achieved / (peak * jax.device_count()) if achieved and peak else None
    t_full = sec_per_step * T
    measured_full = steps == T
    t_ref = t_full * (REFERENCE_SAMPLES / batch_size)
    ratio = harness.paired_ratio(results, c.name, torch_name) if torch_name and c.name != torch_name else None
    rows.append(
      [
        c.name,
        r["rate"],
        sec_per_step,
        achieved / 1e12 if achieved else None,
        f"{100 * mfu:.1f}%" if mfu else "n/a",
        c.info.get("compile_s"),
        f"{t_full:.4g} ({'measured' if measured_full else 'extrapolated'})",
        ratio,
      ]
    )
    payload_rows.append(
      {
        "name": c.name,
        "image_steps_per_s": r["rate"],
        "seconds_per_step": sec_per_step,
        "ratio_to_torch": ratio,
        "achieved_tflops": achieved / 1e12 if achieved else None,
        "mfu": mfu,
        f"seconds_for_{batch_size}x{T}_steps": t_full,
        "measured_full_chain": measured_full,
        f"seconds_for_{REFERENCE_SAMPLES}x{T}_steps": t_ref,
        f"seconds_for_{REFERENCE_SAMPLES}x{T}_steps_how": (
          "measured"
          if measured_full and batch_size == REFERENCE_SAMPLES
          else f"extrapolated from {batch_size} images x {steps} steps, linearly in steps"
          + ("" if batch_size == REFERENCE_SAMPLES else " and in batch size")
        ),
        **r,
        **c.info,
      }
    )
  notes = [
    f"load average at the start {env['load_average']}; {env['cpu_count']} CPUs",
    f"image-steps/s: batch x network steps per second, median of {_REPEATS.value} calls",
    f"s for {batch_size}x{T}: {'measured over the whole chain' if _FULL.value else 'extrapolated'} "
    f"from the measured per-step time" + ("" if _FULL.value else f" of {num_steps}-step calls"),
  ]
  if batch_size != REFERENCE_SAMPLES:
    notes.append(f"{REFERENCE_SAMPLES}x{T} (the paper's batch) extrapolated linearly in batch size as well: see JSON")
  harness.print_table(
    f"Sampling throughput, {config.data.dataset} model, batch {batch_size}, {_DTYPE.value}",
    ["row", "img*steps/s", "s/step", "TFLOP/s", "MFU", "compile s", f"s for {batch_size}x{T}", "JAX/PyTorch"],
    rows,
    notes,
  )
  harness.write_json(
    _JSON_OUT.value,
    {
      "benchmark": "sampling_throughput",
      "environment": env,
      "batch_size": batch_size,
      "dtype": _DTYPE.value,
      "num_steps": num_steps,
      "full": _FULL.value,
      "flops_per_network_call": flops_call,
      "peak_flops_per_device": peak,
      "rows": payload_rows,
      "notes": notes,
      "config": config.to_dict(),
    },
  )


if __name__ == "__main__":
  app.run(main)
