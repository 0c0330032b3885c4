r"""bfloat16 against float32 on the digits quickstart: training over seeds, and sampling on the same parameters.

Training: for each `--seeds` value and each dtype, the quickstart command

  python -m diffusion_jax.main --config=configs/digits.py --workdir=ROOT/<dtype>_seed<N> \
    --config.training.seed=N --config.model.dtype=<dtype> --config.training.time_budget_s=0 \
    --config.training.num_train_steps=STEPS --config.optim.decay_steps=STEPS

(equal steps, not equal wall time: the budget is off, so both dtypes train the same schedule), then its final EMA
model scored by the digit metric (the quickstart's evaluation: DPM-Solver++(2M) SDE, 20 steps, `--num_samples`
images) with each `--eval_seeds` value. Prints per dtype each figure's mean (min–max over runs × evaluation seeds),
the difference of the means against the spread of the float32 seeds, and the training losses side by side at each
logged step (mean over seeds); writes the loss curves as a PNG with `--plot`.

Sampling: the float32-trained model of the first seed, sampled with its float32 parameters by the float32 network
and by the bfloat16 network (same parameters, same rng), with DPM-Solver++(2M) at 20 steps (`--num_samples`) and
ancestral at 1000 (200 samples: 1000 steps of a batch take minutes on a CPU):
the sample-level difference (RMS and max in [-1, 1] units; the fraction of pixels whose 8-bit value differs) and the
digit metric of each.

  python -m benchmarks.bf16_numerics --root=runs/bf16 --seeds=0,1,2 --json_out=runs/bf16/numerics.json \
    --plot=docs/bf16_losses.png

A run folder that already holds a finished run is scored again, not retrained; a folder with an unfinished run
resumes (the quickstart's exact resume).
"""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from benchmarks import harness
from diffusion_jax import cli
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import evaluators

_ROOT = flags.DEFINE_string("root", "runs/bf16", "Folder of the runs (one workdir per dtype and seed).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_EVAL_SEEDS = flags.DEFINE_list("eval_seeds", ["0"], "Sampling seeds of each final model's evaluation.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values to compare.")
_STEPS = flags.DEFINE_integer("steps", 4000, "Training steps of every run (the quickstart's num_train_steps).")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Images per digit-metric evaluation.")
_SAMPLING = flags.DEFINE_list(
  "sampling",
  ["dpmpp2m:20", "ancestral:1000:200"],
  "sampler:steps[:samples] of the sampling part (samples: --num_samples).",
)
_SKIP_TRAIN = flags.DEFINE_bool("skip_training", False, "Only the sampling part (on ROOT/float32_seed<first>).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")
_PLOT = flags.DEFINE_string("plot", "", "Write the loss curves here (PNG; needs matplotlib).")

FIGURES = digits_metric.FIGURES


def workdir(dtype: str, seed: int) -> pathlib.Path:
  return pathlib.Path(_ROOT.value) / f"{dtype}_seed{seed}"


def train(dtype: str, seed: int) -> float:
  """Trains (or resumes) one run; the seconds it took (0 when it had already finished)."""
  wd = workdir(dtype, seed)
  if any((wd / "eval").glob("digits_step_*.json")):
    return 0.0
  cmd = [
    sys.executable,
    "-m",
    "diffusion_jax.main",
    "--config=configs/digits.py",
    f"--workdir={wd}",
    f"--config.training.seed={seed}",
    f"--config.model.dtype={dtype}",
    "--config.training.time_budget_s=0",
    f"--config.training.num_train_steps={_STEPS.value}",
    f"--config.optim.decay_steps={_STEPS.value}",
    f"--config.optim.warmup_steps={min(100, _STEPS.value // 4)}",  # the quickstart's 100 (shorter runs: a quarter)
    f"--config.training.checkpoint_every={_STEPS.value // 2}",
    f"--config.training.sample_every={_STEPS.value}",
    f"--config.training.log_every={max(1, min(100, _STEPS.value // 20))}",
  ]
  print("$", " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True)
  return time.perf_counter() - t0


def losses(wd: pathlib.Path) -> dict[int, float]:
  """The logged training loss by step, from the run's TensorBoard events."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out = {}
  for path in sorted((wd / "tensorboard").glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.tag == "loss":
          out[int(event.step)] = float(value.simple_value)
  return out


def score(model, spec, seed: int, reference) -> dict[str, float]:
  images = inference.generate_set(model, _NUM.value, jax.random.PRNGKey(seed), spec, clip_denoised=True)
  metrics = digits_metric.compute_digit_metrics(images, reference)
  return {k: float(metrics[k]) for k in FIGURES}


def training_part(reference) -> dict:
  runs = []
  for seed in [int(s) for s in _SEEDS.value]:
    for dtype in _DTYPES.value:
      seconds = train(dtype, seed)
      model = inference.load_model(workdir(dtype, seed), use_ema=True)
      spec = evaluators.sampler_spec(model.config, model.config.evals.digits)
      evals = [score(model, spec, int(e), reference) for e in _EVAL_SEEDS.value]
      runs.append(
        dict(
          dtype=dtype,
          seed=seed,
          steps=int(model.step),
          seconds=seconds,
          evals=evals,
          losses=losses(workdir(dtype, seed)),
        )
      )
      print(f"{dtype} seed {seed}: step {model.step}, {evals}", flush=True)
  summary = {}
  for dtype in _DTYPES.value:
    evals = [e for r in runs if r["dtype"] == dtype for e in r["evals"]]
    summary[dtype] = {
      k: (
        float(np.mean([e[k] for e in evals])),
        float(np.min([e[k] for e in evals])),
        float(np.max([e[k] for e in evals])),
      )
      for k in FIGURES
    }
  rows = [[d, *(f"{m:.4g} ({lo:.4g}–{hi:.4g})" for m, lo, hi in (summary[d][k] for k in FIGURES))] for d in summary]
  if len(_DTYPES.value) == 2:
    a, b = _DTYPES.value
    diff = []
    for k in FIGURES:
      spread = summary[a][k][2] - summary[a][k][1]
      delta = summary[b][k][0] - summary[a][k][0]
      diff.append(f"{delta:+.3g} ({'within' if abs(delta) <= spread else 'OUTSIDE'} {a}'s spread {spread:.3g})")
    rows.append([f"{b} − {a}", *diff])
  harness.print_table(
    f"Digit metric of the final EMA models, {_STEPS.value} steps: mean (min–max) over seeds {_SEEDS.value}",
    ["dtype", *(k.removeprefix("digits_") for k in FIGURES)],
    rows,
    [],
  )
  steps = sorted(set.intersection(*(set(r["losses"]) for r in runs))) if runs else []
  curve = {d: [float(np.mean([r["losses"][s] for r in runs if r["dtype"] == d])) for s in steps] for d in _DTYPES.value}
  harness.print_table(
    "Training loss (mean over seeds) at the logged steps",
    ["step", *_DTYPES.value],
    [[s, *(f"{curve[d][i]:.5f}" for d in _DTYPES.value)] for i, s in enumerate(steps)],
    [],
  )
  if _PLOT.value:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for r in runs:
      s = sorted(r["losses"])
      ax.plot(
        s,
        [r["losses"][i] for i in s],
        color="C0" if r["dtype"] == _DTYPES.value[0] else "C1",
        alpha=0.6,
        label=f"{r['dtype']}" if r["seed"] == int(_SEEDS.value[0]) else None,
      )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (L_simple)")
    ax.set_yscale("log")
    ax.set_title(f"digits quickstart, seeds {','.join(_SEEDS.value)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(_PLOT.value)
    print(f"wrote {_PLOT.value}")
  return dict(runs=runs, summary=summary, loss_steps=steps, loss_curves=curve)


def float_samples(model, spec, rng, count: int, batch_size: int = 500) -> np.ndarray:
  """Samples 0..count−1 as float32 in [-1, 1] (before the 8-bit quantisation)."""
  mesh = runtime.make_mesh()
  batch_size = runtime.pad_to_multiple(min(batch_size, count), runtime.data_size(mesh))
  out = []
  for start in range(0, count, batch_size):
    idx = np.arange(start, min(start + batch_size, count))
    out.append(np.asarray(inference.generate(model, idx, rng, spec, batch_size=batch_size, mesh=mesh)["samples"]))
  return np.concatenate(out).astype(np.float32)


def sampling_part(reference) -> dict:
  wd = workdir(_DTYPES.value[0], int(_SEEDS.value[0]))
  model32 = inference.load_model(wd, use_ema=True)
  config = model32.config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  model16 = inference.model_from_config(config, model32.params, step=model32.step)
  T = model32.diffusion.num_timesteps
  rows, out = [], []
  for item in _SAMPLING.value:
    name, steps, *count = item.split(":")
    count = int(count[0]) if count else _NUM.value
    spec = samplers.resolve(name, num_timesteps=T, num_steps=min(int(steps), T))
    rng = jax.random.PRNGKey(int(_EVAL_SEEDS.value[0]))
    x32, x16 = (float_samples(m, spec, rng, count) for m in (model32, model16))
    u32, u16 = images_lib.to_uint8(x32), images_lib.to_uint8(x16)
    m32 = digits_metric.compute_digit_metrics(u32, reference)
    m16 = digits_metric.compute_digit_metrics(u16, reference)
    entry = dict(
      sampler=item,
      num_samples=count,
      rms=float(np.sqrt(np.mean((x16 - x32) ** 2))),
      max=float(np.max(np.abs(x16 - x32))),
      pixels_differing=float(np.mean(u16 != u32)),
      float32={k: float(m32[k]) for k in FIGURES},
      bfloat16={k: float(m16[k]) for k in FIGURES},
    )
    out.append(entry)
    for d in ("float32", "bfloat16"):
      rows.append(
        [
          item,
          d,
          f"{entry['rms']:.4f}",
          f"{entry['max']:.3f}",
          f"{entry['pixels_differing']:.3f}",
          *(f"{entry[d][k]:.4g}" for k in FIGURES),
        ]
      )
    print(f"{item}: done", flush=True)
  harness.print_table(
    f"Sampling the float32-trained model ({wd}) with float32 and bfloat16 activations, same parameters and rng",
    [
      "sampler",
      "network",
      "RMS diff",
      "max diff",
      "8-bit pixels differing",
      *(k.removeprefix("digits_") for k in FIGURES),
    ],
    rows,
    [],
  )
  return dict(workdir=str(wd), step=int(model32.step), samplers=out)


def main(argv):
  del argv
  cli.quiet_logging()
  reference = input_pipeline.load_digits("train")[0]
  result = {"steps": _STEPS.value, "seeds": _SEEDS.value, "eval_seeds": _EVAL_SEEDS.value, "num_samples": _NUM.value}
  if not _SKIP_TRAIN.value:
    result["training"] = training_part(reference)
  result["sampling"] = sampling_part(reference)
  if _JSON_OUT.value:
    pathlib.Path(_JSON_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_JSON_OUT.value).write_text(json.dumps(result, indent=1))
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
