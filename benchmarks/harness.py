"""What every benchmark shares: the environment, device peaks, XLA FLOP counts, interleaved timing, output.

Timing protocol. Each contender (a JAX program, a PyTorch baseline) is warmed
up, then timed in windows of a few steps that end with a device sync
(`block_until_ready`, `torch.cuda.synchronize`). Windows of the contenders
alternate (A B A B …), so a change of machine load hits all of them alike; a
rate is the median over windows, and the ratio of two contenders is also
given as the median of their per-window ratios, which is the figure to trust
on a shared machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax

from diffusion_jax import runtime

# Dense peak TFLOP/s per chip by `device_kind` substring (first match wins), as (bfloat16, float32).
# GPUs: NVIDIA's dense (no sparsity) tensor-core figure for bf16 and the plain FP32 (non-tensor-core) figure;
# with TF32 enabled, float32 matmuls can reach the TF32 peak instead (H100 SXM 495, A100 156).
# TPUs have one matrix-unit peak (bf16); float32 matmuls run through it in bf16 passes, so both use it.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
  ("H100 PCIe", 756.0, 51.0),
  ("H100", 989.0, 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
  ("H200", 989.0, 67.0),
  ("GH200", 989.0, 67.0),
  ("A100", 312.0, 19.5),
  ("TPU v3", 123.0, 123.0),
  ("TPU v4", 275.0, 275.0),
  ("TPU v5 lite", 197.0, 197.0),  # v5e
  ("TPU v5e", 197.0, 197.0),
  ("TPU v5p", 459.0, 459.0),
  ("TPU v5", 459.0, 459.0),  # v5p reports "TPU v5"
  ("TPU v6 lite", 918.0, 918.0),  # v6e (Trillium)
  ("TPU v6e", 918.0, 918.0),
)


def peak_flops_per_device(device_kind: str, dtype: str, override_tflops: float | None = None) -> float | None:
  """The device's dense peak in FLOP/s for `dtype` ('float32' | 'bfloat16'), or None if unknown (e.g. CPUs)."""
  if override_tflops:
    return float(override_tflops) * 1e12
  for key, bf16, fp32 in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return (bf16 if dtype in ("bfloat16", "float16") else fp32) * 1e12
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled JAX executable from XLA's cost analysis (per device for SPMD programs).

  `Compiled.cost_analysis()` returned a list with one dict per module in older
  JAX versions and returns a dict now; None when the backend gives no count.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def environment() -> dict[str, Any]:
  """Versions, devices, threads and machine load, for the JSON and the table header."""
  devices = jax.devices()
  env = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "num_processes": jax.process_count(),
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "hostname": platform.node(),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  try:
    import flax  # pylint: disable=g-import-not-at-top

    env["flax"] = flax.__version__
  except ImportError:
    pass
  return env


def torch_environment(torch) -> dict[str, Any]:
  env = {
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_interop_threads": torch.get_num_interop_threads(),
  }
  try:
    import diffusers  # pylint: disable=g-import-not-at-top

    env["diffusers"] = diffusers.__version__
  except ImportError:
    pass
  if torch.cuda.is_available():
    env["torch_device"] = torch.cuda.get_device_name(0)
  return env


@dataclasses.dataclass
class Contender:
  """Something to time: `run(n)` does n units of work and returns once the device is done.

  Attributes:
    name: the row's name.
    run: does n steps (or whole sampler calls) and syncs the device.
    items_per_run: work items per unit (images per training step, images × steps per sampler call, …).
    flops_per_run: FLOPs per unit, for MFU (None if unknown).
    info: extra facts for the JSON (compile time, dtype, …).
    hlo_text: returns the optimized HLO of the compiled program (JAX rows; for `op_profile`).
  """

  name: str
  run: Callable[[int], None]
  items_per_run: float
  flops_per_run: float | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  hlo_text: Callable[[], str] | None = None


def _median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


def time_interleaved(
  contenders: Sequence[Contender], *, warmup: int, windows: int, per_window: int, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
  """Warms up every contender, then times `windows` alternating windows of `per_window` units each.

  Returns:
    {name: {rate (items/s, median over windows), rates (per window),
    seconds_per_run (median), windows, per_window}}.
  """
  for c in contenders:
    if warmup:
      t0 = time.perf_counter()
      c.run(warmup)
      log(f"  warmup {c.name}: {warmup} x {time.perf_counter() - t0:.2f} s total")
  rates = {c.name: [] for c in contenders}
  secs = {c.name: [] for c in contenders}
  for w in range(windows):
    parts = []
    for c in contenders:
      t0 = time.perf_counter()
      c.run(per_window)
      dt = max(time.perf_counter() - t0, 1e-9)
      rates[c.name].append(per_window * c.items_per_run / dt)
      secs[c.name].append(dt / per_window)
      parts.append(f"{c.name} {rates[c.name][-1]:.3g}/s")
    load = f" | load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    log(f"  window {w + 1}/{windows}: " + ", ".join(parts) + load)
  return {
    c.name: {
      "rate": _median(rates[c.name]),
      "rates": rates[c.name],
      "seconds_per_run": _median(secs[c.name]),
      "windows": windows,
      "per_window": per_window,
    }
    for c in contenders
  }


def paired_ratio(results: Mapping[str, Mapping[str, Any]], a: str, b: str) -> float:
  """Median over windows of rate(a)/rate(b): each pair ran back to back, under the same load."""
  return _median([x / y for x, y in zip(results[a]["rates"], results[b]["rates"]) if y > 0])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
  def fmt(v):
    if v is None:
      return "n/a"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[fmt(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
  line = "  ".join("-" * w for w in widths)
  print(f"\n{title}")
  print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
  print(line)
  for r in cells:
    print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
  for n in notes:
    print(f"  * {n}")
  sys.stdout.flush()


def write_json(path: str | None, payload: Mapping[str, Any]) -> None:
  if not path:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  runtime.atomic_write(path, json.dumps(payload, indent=2, default=str))
  print(f"Wrote {path}")


def digit_quality(model, spec, num_samples: int, batch_size: int, rng, reference):
  """(seconds, compile seconds, digit-metric dict, uint8 images) of one sampler setting on a digits model.

  The set is drawn in batches over every device (sample i from (rng, i)) after one untimed compilation call
  on the first batch; the seconds are the set's sampling wall time, the compile seconds the first call's
  excess; the images are scored with the shipped digit classifier against `reference`.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation import digits_metric  # pylint: disable=g-import-not-at-top

  mesh = runtime.make_mesh()
  batch_size = runtime.pad_to_multiple(min(batch_size, num_samples), runtime.data_size(mesh))
  t0 = time.perf_counter()
  inference.generate(model, np.arange(batch_size), rng, spec, batch_size=batch_size, mesh=mesh)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = []
  for start in range(0, num_samples, batch_size):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(inference.generate(model, idx, rng, spec, batch_size=batch_size, mesh=mesh)["samples"])
  seconds = time.perf_counter() - t0
  images = images_lib.to_uint8(np.concatenate(out))
  metric = digits_metric.compute_digit_metrics(images, reference)
  return seconds, compile_s - seconds * batch_size / num_samples, metric, images


def digit_row(setting: str, spec, seconds: float, compile_s: float, metric: dict, **extra) -> dict[str, Any]:
  """One JSON row of a digit-quality table: the setting, its sampler, timings and the metric's scalars."""
  return dict(
    setting=setting,
    **extra,
    calls=spec.network_calls,
    seconds=seconds,
    compile_seconds=compile_s,
    **{k: v for k, v in metric.items() if not isinstance(v, list)},
  )


def digit_line(label: str, calls: int, seconds: float, metric: dict) -> str:
  """The console line of one digit-quality setting (`label` already padded)."""
  return (
    f"{label} calls {calls:5d}  {seconds:7.1f} s  FD {metric['digits_fd']:7.3f}  "
    f"IS {metric['digits_is']:5.2f}  conf {metric['digits_confidence']:.3f}  prec {metric['digits_precision']:.3f}"
    f"  rec {metric['digits_recall']:.3f}  memo {metric['digits_memorisation']:.3f}"
  )
