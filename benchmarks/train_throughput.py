r"""Training throughput (images/s) and MFU of the jitted train step, against a same-architecture PyTorch run.

The JAX side is `train_step.jit_train_step` exactly as the training loop uses it
(replicated state donated, batch sharded over every device), on a synthetic
batch already on the devices (the input pipeline is not timed). FLOPs per step
come from XLA's cost analysis of the compiled step; MFU is achieved FLOP/s over
the device's dense peak (`harness.PEAK_TFLOPS`, or --peak_tflops). The PyTorch
baseline (`torch_baseline.TrainStep`: diffusers' UNet2DModel with the same
architecture, Adam, clipping, EMA) runs in the same process, its windows
interleaved with ours.

CPU (the issue's setting):
  python -m benchmarks.train_throughput --batch_size=8 --dtype=float32 \
      --json_out=benchmarks/results/cpu/train.json
GPU:
  python -m benchmarks.train_throughput --batch_size=128 --dtype=bfloat16 \
      --clip_groups=1,8 --torch_compile=on --torch_autocast=on --json_out=/tmp/train.json
"""

from __future__ import annotations

import os

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import programs
from benchmarks import torch_baseline
from diffusion_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar.py", "The model/diffusion config.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: 8 on CPU, else the config's).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype (model.dtype).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per contender (default: 8 on CPU, 100 otherwise).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per contender after compilation.")
_WINDOW = flags.DEFINE_integer("window", None, "Steps per timed window (default: 1 on CPU, 10 otherwise).")
_CLIP_GROUPS = flags.DEFINE_list(
  "clip_groups",
  ["1"],
  "JAX rows to time, one per optim.clip_groups value; 1 is the same work as the PyTorch "
  "step, 8 is the paper's per-TPU-core clipping (configs/cifar.py).",
)
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device (overrides the built-in table).")
_TORCH = flags.DEFINE_boolean("torch", None, "Time the PyTorch baseline (default: if torch and diffusers import).")
_TORCH_COMPILE = flags.DEFINE_enum(
  "torch_compile",
  "auto",
  ["auto", "on", "off", "both"],
  "torch.compile the baseline; auto = on for CUDA, both (eager and compiled rows) on CPU.",
)
_TORCH_AUTOCAST = flags.DEFINE_enum(
  "torch_autocast", "auto", ["auto", "on", "off"], "bfloat16 autocast in the baseline; auto = on iff --dtype=bfloat16."
)
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")


def torch_contenders(config, batch_size: int, dtype: str) -> list[harness.Contender]:
  """The PyTorch baseline rows (eager and/or torch.compile); failures are reported, not fatal."""
  imported = torch_baseline.import_torch()
  if imported is None:
    return []
  torch, _ = imported
  device = torch_baseline.setup(torch)
  mode = _TORCH_COMPILE.value
  if mode == "auto":
    mode = "on" if device == "cuda" else "both"
  compiles = {"on": [True], "off": [False], "both": [False, True]}[mode]
  autocast = {"auto": dtype == "bfloat16", "on": True, "off": False}[_TORCH_AUTOCAST.value]
  if autocast and not torch_baseline.autocast_supported(torch, device):
    print("bfloat16 autocast is not supported on this device; the baseline runs in float32.")
    autocast = False
  diffusion = runtime.build_diffusion(config)
  out = []
  for compiled in compiles:
    name = f"torch ({'compile' if compiled else 'eager'}, {'bf16 autocast' if autocast else 'float32'})"
    print(f"Building {name} on {device} ({torch.get_num_threads()} threads)...", flush=True)
    try:
      step = torch_baseline.TrainStep(config, diffusion, batch_size, compile=compiled, autocast=autocast)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name} failed: {type(e).__name__}: {e}")
      continue
    info = {"compile_s": step.compile_seconds, "device": device, "torch_compile": compiled, "autocast": autocast}
    out.append(harness.Contender(name, step.run, batch_size, None, info))
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  on_cpu = jax.default_backend() == "cpu"
  batch_size = _BATCH.value or (8 if on_cpu else config.training.batch_size)
  steps = _STEPS.value or (8 if on_cpu else 100)
  window = min(_WINDOW.value or (1 if on_cpu else 10), steps)
  env = harness.environment()
  peak = harness.peak_flops_per_device(env["device_kind"], _DTYPE.value, _PEAK.value)
  print(
    f"{env['device_kind']} x{env['num_devices']} ({env['backend']}), jax {env['jax']}, "
    f"{env['cpu_count']} CPUs, load {env['load_average']}, XLA_FLAGS={env['xla_flags']!r}"
  )
  print(f"batch {batch_size}, {_DTYPE.value}, {steps} timed steps in windows of {window}, warmup {_WARMUP.value}")

  contenders = []
  for g in _CLIP_GROUPS.value:
    g = config.optim.clip_groups if g == "config" else int(g)
    print(f"Compiling the JAX train step (clip_groups={g})...", flush=True)
    c = programs.train_step(config, g, batch_size, _DTYPE.value, peak)
    print(
      f"  compiled in {c.info['compile_s']:.1f} s; {c.info['flops_per_step_per_device'] or 0:.4g} FLOPs/step "
      f"per device; state donated: {c.info['donated_state']}"
    )
    contenders.append(c)
  use_torch = _TORCH.value if _TORCH.value is not None else torch_baseline.import_torch() is not None
  torch_rows = torch_contenders(config, batch_size, _DTYPE.value) if use_torch else []
  if use_torch:
    env.update(harness.torch_environment(torch_baseline.import_torch()[0]))
  contenders += torch_rows

  results = harness.time_interleaved(
    contenders, warmup=_WARMUP.value, windows=max(1, steps // window), per_window=window
  )
  jax_ref = contenders[0]
  flops_step = jax_ref.flops_per_run  # the same network: use XLA's count for the baseline's MFU too
  best_torch = max(torch_rows, key=lambda c: results[c.name]["rate"]) if torch_rows else None
  rows, payload_rows = [], []
  for c in contenders:
    r = results[c.name]
    steps_per_s = r["rate"] / batch_size
    f = c.flops_per_run or flops_step
    achieved = f * steps_per_s if f else None
    total_peak = peak * jax.device_count() if peak else None
    mfu = achieved / total_peak if achieved and total_peak else None
    ratio = harness.paired_ratio(results, c.name, best_torch.name) if best_torch and c not in torch_rows else None
    rows.append(
      [
        c.name,
        r["rate"],
        1.0 / steps_per_s,
        achieved / 1e12 if achieved else None,
        f"{100 * mfu:.1f}%" if mfu else "n/a",
        c.info.get("compile_s"),
        ratio,
      ]
    )
    payload_rows.append(
      {
        "name": c.name,
        "images_per_s": r["rate"],
        "seconds_per_step": 1.0 / steps_per_s,
        "achieved_tflops": achieved / 1e12 if achieved else None,
        "mfu": mfu,
        "ratio_to_best_torch": ratio,
        **r,
        **c.info,
      }
    )
  notes = [
    f"{env['device_kind']} x{jax.device_count()}; load average at the start {env['load_average']}; "
    f"{os.cpu_count()} CPUs" + (f"; torch threads {env.get('torch_threads')}" if use_torch else ""),
    "img/s: median over windows; ratio: median over windows of JAX/PyTorch"
    + (f" against the faster baseline row, {best_torch.name}" if best_torch else ""),
    "FLOPs per step from XLA's cost analysis of the JAX step (also used for the baseline's TFLOP/s)",
    "MFU: n/a without a known peak for this device (give --peak_tflops)"
    if not peak
    else f"MFU against a peak of {peak / 1e12:g} TFLOP/s per device ({_DTYPE.value})",
  ]
  harness.print_table(
    f"Training throughput, {config.data.dataset} model, batch {batch_size}, {_DTYPE.value}",
    ["row", "img/s", "s/step", "TFLOP/s", "MFU", "compile s", "JAX/PyTorch"],
    rows,
    notes,
  )
  harness.write_json(
    _JSON_OUT.value,
    {
      "benchmark": "train_throughput",
      "environment": env,
      "batch_size": batch_size,
      "dtype": _DTYPE.value,
      "steps": steps,
      "window": window,
      "warmup": _WARMUP.value,
      "flops_per_step": flops_step,
      "peak_flops_per_device": peak,
      "rows": payload_rows,
      "notes": notes,
      "config": config.to_dict(),
    },
  )


if __name__ == "__main__":
  app.run(main)
