r"""The TPU plan of every shipped config on the single-host slices, as the tables of docs/tpu_plan.md.

Runs `diffusion_jax.plan` (ahead-of-time compilation for TPU slices on this host; needs `jax[tpu]`) for each
config × slice and prints Markdown tables: does the train step fit at the config's batch, its HBM per device,
the roofline steps/s, the largest batch that fits (with --max_batch) and, where the paper measured the same
work, its figure. Every compile is cached (the plan/ folder of the package's cache), so a table whose compiles
have run is printed in seconds; the first run of the 256² configs takes many minutes per slice on a small CPU.

  python -m benchmarks.tpu_plan                                   # train step, every config × 5 slices
  python -m benchmarks.tpu_plan --configs=cifar --programs=train,sample,bpd --slices=v3-8,v5e-8
  python -m benchmarks.tpu_plan --configs=cifar --max_batch       # + the largest batch per slice
  python -m benchmarks.tpu_plan --configs=cifar --slices=v5e-16   # a multi-host slice
  python -m benchmarks.tpu_plan --configs=cifar --dtype=bfloat16  # the same with bfloat16 activations
"""

from __future__ import annotations

import importlib
import json
import time

from absl import app
from absl import flags
from absl import logging

SLICES = ("v3-8", "v4-8", "v5e-8", "v5p-8", "v6e-8")
CONFIGS = (
  "cifar",
  "cifar_cond",
  "celebahq",
  "lsun_bedroom",
  "lsun_cat",
  "lsun_church",
  "digits",
  "digits_cond",
  "tiny",
)

_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Config modules of configs/.")
_SLICES = flags.DEFINE_list("slices", list(SLICES), "TPU slices (Cloud TPU names).")
_PROGRAMS = flags.DEFINE_list("programs", ["train"], "Programs to compile (diffusion_jax.plan.PROGRAMS).")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find the largest train batch that fits.")
_TOLERANCE = flags.DEFINE_float("max_batch_tolerance", 0.125, "As the plan's --max_batch_tolerance.")
_DTYPE = flags.DEFINE_string("dtype", "", "Override model.dtype (float32 | bfloat16); '' keeps the config's.")
_REMAT = flags.DEFINE_bool("remat", None, "Override model.remat.")
_ONLY_CACHED = flags.DEFINE_bool("only_cached", False, "Compile nothing: rows whose compiles are not cached say so.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Append each plan as a JSON line to this file.")


def _config(name: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.unlock()
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _REMAT.value is not None:
    config.model.remat = _REMAT.value
  return config


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def row(config_name: str, report, *, search_unfinished: bool = False) -> str:
  """One table row: config, slice, batch/device, fits, HBM in use, roofline steps/s, largest batch, paper."""
  train = next(p for p in report.programs if p.program == "train")
  f, chip = train.figures, report.chip
  per_chip = train.batch_per_device * chip.devices_per_chip
  if f.fits:
    lo, hi = train.trip_s
    fit = f"yes ({_gib(f.total_bytes)} of {_gib(chip.device_hbm_bytes)} GiB)"
    rate = f"{1 / hi:.3g}–{1 / lo:.3g}"
    intensity = f"{f.flops / f.bytes_accessed:.0f}" if f.bytes_accessed else ""
  else:
    fit = f"**no** (needs {_gib(f.required_bytes)} of {_gib(f.available_bytes)} GiB)"
    rate, intensity = "", ""
  m = report.max_batch
  largest = "search not finished" if search_unfinished else ""
  if m is not None:
    largest = f"{m.largest_fitting} ({m.per_device * chip.devices_per_chip}/chip)" if m.largest_fitting else "none"
    if m.smallest_failing:
      crashed = m.smallest_failing in m.crashed
      largest += f"; {m.smallest_failing} {'crashes the compiler' if crashed else 'fails'}"
  paper = f"{train.paper.per_second:g} {train.paper.unit}" if train.paper else ""
  compile_s = f"{f.compile_s:.0f}"
  cells = [
    config_name,
    report.slice.name,
    f"{train.batch} ({per_chip}/chip)",
    fit,
    rate,
    intensity,
    largest,
    paper,
    compile_s,
  ]
  return "| " + " | ".join(cells) + " |"


HEADER = (
  "| config | slice | batch | fits (HBM/device) | roofline steps/s | FLOPs/byte | largest batch | paper (TF, measured) "
  "| compile s |\n|---|---|---|---|---|---|---|---|---|"
)


def main(argv):
  del argv
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top
  from diffusion_jax import plan  # pylint: disable=g-import-not-at-top

  plan._setup_host()  # pylint: disable=protected-access
  cli.start()
  rows, others = [], []
  for slice_name in _SLICES.value:
    for name in _CONFIGS.value:
      t0 = time.perf_counter()
      kwargs = dict(
        programs=tuple(_PROGRAMS.value),
        max_batch_tolerance=_TOLERANCE.value,
        advise=False,
        config_name=f"configs/{name}.py",
        progress=logging.info,
        only_cached=_ONLY_CACHED.value,
      )
      report, search_unfinished = None, False
      try:
        report = plan.plan(_config(name), slice_name, max_batch=_MAX_BATCH.value, **kwargs)
      except plan.NotCached as e:
        if _MAX_BATCH.value:  # the programs may be cached where the largest-batch search is not
          try:
            report, search_unfinished = plan.plan(_config(name), slice_name, max_batch=False, **kwargs), True
          except plan.NotCached:
            pass
        if report is None:
          rows.append(f"| {name} | {slice_name} | not compiled yet ({e}) | | | | | | |")
          continue
      logging.info("%s on %s: %.0f s", name, slice_name, time.perf_counter() - t0)
      if "train" in _PROGRAMS.value:
        rows.append(row(name, report, search_unfinished=search_unfinished))
      others += [report.table(), ""]
      if _JSON_OUT.value:
        with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
          f.write(json.dumps(report.to_dict()) + "\n")
  if rows:
    print(HEADER)
    print("\n".join(rows))
    print()
  if _PROGRAMS.value != ["train"] or _MAX_BATCH.value:
    print("\n".join(others))


if __name__ == "__main__":
  app.run(main)
