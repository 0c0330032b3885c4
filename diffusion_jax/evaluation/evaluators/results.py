"""The one writer of results: a JSON file per result, its chart, its TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from etils import epath

from diffusion_jax import metric_writer
from diffusion_jax import runtime
from diffusion_jax.evaluation.evaluators import base


def result_paths(eval_dir: epath.Path, step: int, names) -> dict[str, epath.Path]:
  """New file names `<stem>_step_<step:06d>[_n].<ext>` for `names` (e.g. 'bpd.json'), none of which exist yet.

  All files of one evaluation share the smallest free counter `_n`, so they stay paired; earlier results are
  never touched.
  """
  n = 0
  while True:
    suffix = f"_{n}" if n else ""
    paths = {}
    for name in names:
      stem, ext = name.split(".", 1)
      paths[name] = eval_dir / f"{stem}_step_{step:06d}{suffix}.{ext}"
    if not any(p.exists() for p in paths.values()):
      return paths
    n += 1


def write_results(
  results: dict[str, base.Result], *, workdir, step: int, use_ema: bool, writer=None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """Writes each result's JSON (and chart) under workdir/eval, its scalars to TensorBoard.

  JSON and charts are written by process 0; `writer` is an open `MetricWriter` (default: a new one).

  Returns:
    (name -> the record its JSON file holds, as read back from the text written; the files written).
  """
  texts = {}
  for name, result in results.items():
    record = result.record(name, step=step, use_ema=use_ema, workdir=workdir)
    texts[name] = json.dumps(record, indent=2, default=float, allow_nan=True) + "\n"
  files = []
  if jax.process_index() == 0 and results:
    eval_dir = epath.Path(workdir) / base.EVAL_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name, result in results.items():
      names += [f"{name}.json"] + ([f"{name}.png"] if result.chart else [])
    paths = result_paths(eval_dir, step, names)
    for name, result in results.items():
      files.append(str(runtime.atomic_write(paths[f"{name}.json"], texts[name])))
      if result.chart:
        result.chart(paths[f"{name}.png"], step)
        files.append(str(paths[f"{name}.png"]))
  base.sync("eval_results_written")
  scalars = {k: v for result in results.values() for k, v in result.scalars.items()}
  if scalars:
    if writer is None:
      # A unique suffix: tensorboardX names event files by the second and host only.
      with metric_writer.MetricWriter(workdir, filename_suffix=f".eval.{os.getpid()}.{time.time_ns()}") as own:
        own.scalars(step, scalars)
    else:
      writer.scalars(step, scalars)
  return {name: json.loads(text) for name, text in texts.items()}, files
