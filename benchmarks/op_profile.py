r"""Where the time of a train step or a sampler step goes, op by op, in JAX and in PyTorch at the same shapes.

Every layer call of the U-Net at the given batch is recorded (`flax.linen.intercept_methods`:
3×3 and strided convolutions, GroupNorm (+ swish where the network has it), dense layers,
the attention core, and the skip concatenations of the up path, whose shapes come from
the up-path residual blocks' inputs). Each distinct op is then timed alone — for
`--work=train` forward and backward (the gradient of a sum, with respect to input and
weights), for `--work=sample` forward only — as a jitted JAX function and as the same
PyTorch eager op on tensors of the same shape (NCHW), and the times are multiplied by how
often the network calls the op. The whole step is timed too (`programs.train_step` /
`programs.sampler` against `torch_baseline.TrainStep` / `AncestralSampler`, eager), so the
table shows how much of each side's step the ops explain; what is left is the rest of the
step (loss, optimizer, EMA, sampler arithmetic), dispatch, and for JAX the layout copies
XLA:CPU adds between ops (their count in the optimized HLO is printed).

Why not a trace: XLA:CPU runs convolutions asynchronously on its thread pool, so the
events of a `jax.profiler` trace cover only their launch (~0.1 ms for a 0.5 ms convolution);
the times below are measured with the work done.

  python -m benchmarks.op_profile --config=configs/digits.py --work=train --batch_size=64
  python -m benchmarks.op_profile --config=configs/digits.py --work=sample --batch_size=500
  python -m benchmarks.op_profile --config=configs/cifar.py --work=train --batch_size=8 --repeats=3
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import programs
from benchmarks import torch_baseline
from benchmarks.ops import CLASSES
from benchmarks.ops import hlo_op_counts
from benchmarks.ops import inner_repeats
from benchmarks.ops import inventory
from benchmarks.ops import jax_op
from benchmarks.ops import median_time
from benchmarks.ops import torch_op
from diffusion_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/digits.py", "The model/diffusion config.", lock_config=True
)
_WORK = flags.DEFINE_enum("work", "train", ["train", "sample"], "Train step (forward + backward) or sampler step.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats per op (median) and per whole step.")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time the PyTorch ops and step.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the breakdown here as JSON.")


def main(argv):
  del argv
  config = _CONFIG.value
  b, repeats = _BATCH.value, _REPEATS.value
  train = _WORK.value == "train"
  env = harness.environment()
  print(
    f"{env['device_kind']} x{env['num_devices']}, jax {env['jax']}, {env['cpu_count']} CPUs, load {env['load_average']}"
  )
  diffusion, model, params, image_shape = programs.model_and_params(config, "float32")
  calls = inventory(model, params, b, image_shape)

  torch = None
  if _TORCH.value and torch_baseline.import_torch() is not None:
    torch, _ = torch_baseline.import_torch()
    torch_baseline.setup(torch)

  # All JAX timings first, then all PyTorch ones: PyTorch's OpenMP threads keep spinning for a while
  # after its ops, which would slow a JAX op timed right after one.
  # The whole step first (windows of 5 dispatches, as a training loop overlaps them).
  if train:
    whole = programs.train_step(config, 1, b, "float32", None)
    per = 1
  else:
    per = 10
    whole = programs.sampler("jax", diffusion, model, params, image_shape, b, "ancestral", per, None)
  counts = hlo_op_counts(whole.hlo_text())
  jax_step = median_time(lambda: whole.run(5), repeats, 1) / (5 * per)
  ops = sorted(calls.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1]))
  rows = []
  for (kind, shape, extra), n in ops:
    fn = jax_op(kind, shape, extra, train)
    j = median_time(fn, repeats, inner_repeats(shape))
    rows.append({"class": kind, "shape": list(shape), "out": extra, "count": n, "jax_ms": j * 1e3, "torch_ms": None})
  torch_step = None
  if torch:
    for row, ((kind, shape, extra), _) in zip(rows, ops):
      row["torch_ms"] = median_time(torch_op(torch, kind, shape, extra, train), repeats, inner_repeats(shape)) * 1e3
    d = runtime.build_diffusion(config)
    peer = (
      torch_baseline.TrainStep(config, d, b, compile=False, autocast=False)
      if train
      else torch_baseline.AncestralSampler(config, d, b, per, compile=False, autocast=False)
    )
    torch_step = median_time(lambda: peer.run(5), repeats, 1) / (5 * per)
  for r in rows:
    print(
      f"  {r['class']:18s} {str(tuple(r['shape'])):20s} ->{r['out']:4d} x{r['count']:2d}: jax {r['jax_ms']:7.3f} ms"
      + (f", torch {r['torch_ms']:7.3f} ms" if r["torch_ms"] else ""),
      flush=True,
    )

  table = []
  for k in CLASSES:
    sel = [r for r in rows if r["class"] == k]
    if not sel:
      continue
    jt = sum(r["jax_ms"] * r["count"] for r in sel)
    tt = sum(r["torch_ms"] * r["count"] for r in sel) if torch else None
    table.append([k, sum(r["count"] for r in sel), jt, tt, (tt / jt) if tt else None])
  jt_sum = sum(r[2] for r in table)
  tt_sum = sum(r[3] for r in table) if torch else None
  table.append(["sum of the ops alone", "", jt_sum, tt_sum, (tt_sum / jt_sum) if torch else None])
  table.append(
    ["whole step", "", jax_step * 1e3, torch_step and torch_step * 1e3, (torch_step / jax_step) if torch_step else None]
  )
  what = "train step (forward + backward)" if train else "sampler step (forward)"
  harness.print_table(
    f"{what}, batch {b}: ms per step by op class (median of {repeats})",
    ["class", "calls", "jax ms", "torch eager ms", "JAX/PyTorch speed"],
    table,
    [f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "", "speed ratio > 1: JAX faster"],
  )
  harness.print_table(
    "optimized HLO of the whole JAX step: entry instructions by kind (most frequent)",
    ["instruction", "count"],
    counts.most_common(12),
  )
  harness.write_json(
    _JSON_OUT.value,
    {"env": env, "work": _WORK.value, "batch_size": b, "ops": rows, "table": table, "hlo_counts": dict(counts)},
  )


if __name__ == "__main__":
  app.run(main)
