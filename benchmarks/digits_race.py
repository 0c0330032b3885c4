r"""The quickstart against the PyTorch peer at equal wall time: several training seeds, several evaluation seeds.

For each training seed, one right after the other on the same machine:

* the PyTorch peer (`benchmarks.digits_peer`: diffusers' DDPM recipe on the same
  U-Net) trained for `--seconds` of wall time;
* the quickstart command, `python -m diffusion_jax.main --config=configs/digits.py
  --workdir=… --config.training.seed=SEED`, plus `--ours_flags` (for example a
  smaller `training.time_budget_s` for a shorter row), timed as a whole.

Each final EMA model is then sampled with the quickstart's evaluation sampler
(`config.evals.digits.sampling`, DPM-Solver++(2M) SDE with 20 steps; diffusers'
`sde-dpmsolver++` of order 2 for the peer) once per evaluation seed, and each
sample set is scored by the digit metric against the train split. A single
evaluation of one model spreads by about ±0.005 in confidence and ±0.1 in IS
(benchmarks/README.md), so the table gives means with their min–max over all
runs × evaluation seeds, and the mean steps reached.

  python -m benchmarks.digits_race --seconds=600 --seeds=0,1,2 --workdir=runs/race

Ours' runs stay in `--workdir/ours_seed<N>` (their samples, checkpoints and
final evaluation as the quickstart writes them); the peer's EMA weights go to
`--workdir/peer_seed<N>.npz`. An existing run folder is an error, never
overwritten.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import digits_peer
from benchmarks import harness
from benchmarks import torch_baseline
from diffusion_jax import cli
from diffusion_jax import config_base
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import evaluators

FIGURES = digits_metric.FIGURES


def figures_of(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(metrics[k]) for k in FIGURES}


def ours_command(config_path: str, workdir: str, seed: int, extra_flags: Sequence[str]) -> list[str]:
  return [
    sys.executable,
    "-m",
    "diffusion_jax.main",
    f"--config={config_path}",
    f"--workdir={workdir}",
    f"--config.training.seed={seed}",
    *extra_flags,
  ]


def score_ours(workdir: str, eval_seeds: Sequence[int], num_samples: int) -> tuple[int, list[dict[str, float]]]:
  """(the final step, one figures dict per eval seed) of a trained workdir's EMA model, with the sampler of its
  end-of-training digits evaluation (`config.evals.digits`)."""
  model = inference.load_model(workdir, use_ema=True)
  config = model.config  # read_config upgrades the config.json of earlier versions (training.final_eval_*)
  spec = evaluators.sampler_spec(config, config.evals.digits)
  reference = input_pipeline.load_digits("train")[0]
  rows = []
  for seed in eval_seeds:
    images = inference.generate_set(
      model, num_samples, jax.random.PRNGKey(seed), spec, clip_denoised=config.sampling.clip_denoised
    )
    rows.append({"eval_seed": int(seed), **figures_of(digits_metric.compute_digit_metrics(images, reference))})
  return int(model.step), rows


def score_peer(model, ema, eval_seeds: Sequence[int], num_samples: int, num_steps: int) -> list[dict[str, float]]:
  """One figures dict per eval seed: the peer's EMA model sampled by diffusers' sde-dpmsolver++ (order 2)."""
  reference = input_pipeline.load_digits("train")[0]
  rows = []
  for seed in eval_seeds:
    x = digits_peer.sample(
      model, ema, num_samples=num_samples, num_steps=num_steps, sampler="dpmsolver_sde", seed=int(seed)
    )
    metrics = digits_metric.compute_digit_metrics(images_lib.to_uint8(x), reference)
    rows.append({"eval_seed": int(seed), **figures_of(metrics)})
  return rows


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per side: the runs' steps (mean, min, max), and each figure's mean, min and max over runs × eval seeds."""
  out: dict[str, dict[str, Any]] = {}
  for side in dict.fromkeys(r["side"] for r in runs):
    mine = [r for r in runs if r["side"] == side]
    evals = [e for r in mine for e in r["evals"]]
    steps = [r["steps"] for r in mine]
    entry: dict[str, Any] = {
      "runs": len(mine),
      "evaluations": len(evals),
      "steps": (float(np.mean(steps)), min(steps), max(steps)),
    }
    for k in FIGURES:
      values = [e[k] for e in evals]
      entry[k] = (float(np.mean(values)), float(np.min(values)), float(np.max(values)))
    out[side] = entry
  return out


def print_summary(summary: dict[str, dict[str, Any]], notes: Sequence[str]) -> None:
  header = ["side", "runs × evals", "steps", *(k.removeprefix("digits_") for k in FIGURES)]
  rows = []
  for side, s in summary.items():
    cells = [f"{m:.4g} ({lo:.4g}–{hi:.4g})" for m, lo, hi in (s[k] for k in FIGURES)]
    mean, lo, hi = s["steps"]
    rows.append([side, f"{s['runs']} × {s['evaluations'] // max(1, s['runs'])}", f"{mean:.0f} ({lo}–{hi})", *cells])
  harness.print_table("Digits at equal wall time: mean (min–max) over runs × evaluation seeds", header, rows, notes)


def run_peer(config, seed: int, seconds: float, eval_seeds, num_samples: int, num_steps: int, weights_path: str):
  model, ema, stats = digits_peer.train(config, seconds=seconds, seed=seed)
  np.savez(weights_path, *[e.detach().numpy() for e in ema])
  evals = score_peer(model, ema, eval_seeds, num_samples, num_steps)
  stats["num_params"] = sum(p.numel() for p in model.parameters())
  return {"side": "peer", "seed": seed, "steps": int(stats["steps"]), "train_seconds": stats["train_seconds"],
          "stats": stats, "evals": evals}  # fmt: skip


def run_ours(config_path: str, seed: int, workdir: str, extra_flags: Sequence[str], eval_seeds, num_samples: int):
  cmd = ours_command(config_path, workdir, seed, extra_flags)
  print("$ " + shlex.join(cmd), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"Our command exited with {proc.returncode}: {shlex.join(cmd)}")
  steps, evals = score_ours(workdir, eval_seeds, num_samples)
  return {"side": "ours", "seed": seed, "steps": steps, "command_seconds": wall, "command": shlex.join(cmd),
          "evals": evals}  # fmt: skip


def define_flags() -> None:
  """Defines the command-line flags (called when run as a script, so importing the module defines none).

  --config (its U-Net is also the peer's), --seconds (the peer's training wall time), --num_samples (per
  evaluation) and --json_out are digits_peer's.
  """
  digits_peer.define_flags()
  flags.DEFINE_list("seeds", ["0"], "Training seeds; one run per side and seed.")
  flags.DEFINE_list("eval_seeds", ["1", "2", "3", "4", "5", "6"], "Sampling seeds scored per model.")
  flags.DEFINE_list("sides", ["peer", "ours"], "Which sides to run, in this order for each seed.")
  flags.DEFINE_string("ours_flags", "", "Extra flags for our command, e.g. '--config.training.time_budget_s=225'.")
  flags.DEFINE_string("workdir", None, "Where the runs go (must not hold runs of the same seeds).")


def main(argv):
  del argv
  cli.quiet_logging()  # our lines only on the console, as the package's commands
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required: the runs are kept there.")
  seeds = [int(s) for s in flags.FLAGS.seeds]
  eval_seeds = [int(s) for s in flags.FLAGS.eval_seeds]
  bad = sorted(set(flags.FLAGS.sides) - {"peer", "ours"})
  if bad:
    raise app.UsageError(f"--sides takes 'peer' and 'ours', got {bad}.")
  config = config_base.upgrade(flags.FLAGS.config)
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  os.makedirs(flags.FLAGS.workdir, exist_ok=True)
  targets = {}
  for seed in seeds:
    for side in flags.FLAGS.sides:
      path = os.path.join(flags.FLAGS.workdir, f"peer_seed{seed}.npz" if side == "peer" else f"ours_seed{seed}")
      if os.path.exists(path):
        raise app.UsageError(f"{path} exists; pass another --workdir or other --seeds (runs are never overwritten).")
      targets[(side, seed)] = path
  torch, _ = torch_baseline.import_torch() or (None, None)
  if torch is None and "peer" in flags.FLAGS.sides:
    raise app.UsageError("The peer needs torch and diffusers (pip install torch diffusers).")
  if torch is not None:
    torch.set_num_threads(os.cpu_count() or 1)
  env = harness.environment()
  load_start = list(os.getloadavg())
  num_steps = int(config.evals.digits.sampling.get("num_steps", 20))  # the peer samples with as many steps as ours
  runs = []
  for seed in seeds:
    for side in flags.FLAGS.sides:
      print(f"\n== {side}, training seed {seed} ==", flush=True)
      if side == "peer":
        row = run_peer(
          config, seed, flags.FLAGS.seconds, eval_seeds, flags.FLAGS.num_samples, num_steps, targets[(side, seed)]
        )
      else:
        extra = shlex.split(flags.FLAGS.ours_flags)
        row = run_ours(config_path, seed, targets[(side, seed)], extra, eval_seeds, flags.FLAGS.num_samples)
      row["load_average_at_end"] = list(os.getloadavg())
      runs.append(row)
      means = {k.removeprefix("digits_"): round(float(np.mean([e[k] for e in row["evals"]])), 4) for k in FIGURES}
      print(f"{side} seed {seed}: {row['steps']} steps; means over {len(eval_seeds)} evaluations {means}", flush=True)
  summary = summarize(runs)
  ours = shlex.join(ours_command(config_path, "…", 0, []))
  notes = [
    f"peer: {flags.FLAGS.seconds:g} s of training; ours: the command `{ours} {flags.FLAGS.ours_flags}` as a whole",
    f"{flags.FLAGS.num_samples} samples per evaluation, eval seeds {eval_seeds}, {num_steps} SDE-DPM-Solver++ steps",
    f"load average at the start {load_start}, at the end {list(os.getloadavg())}",
  ]
  print_summary(summary, notes)
  payload = {
    "benchmark": "digits_race",
    "environment": env,
    "peer_seconds": flags.FLAGS.seconds,
    "ours_flags": flags.FLAGS.ours_flags,
    "eval_seeds": eval_seeds,
    "num_samples": flags.FLAGS.num_samples,
    "runs": runs,
    "summary": summary,
    "load_average_at_start": load_start,
  }
  harness.write_json(flags.FLAGS.json_out or os.path.join(flags.FLAGS.workdir, "race.json"), payload)


if __name__ == "__main__":
  define_flags()
  app.run(main)
