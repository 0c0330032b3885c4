r"""A same-budget PyTorch peer for the digits quickstart: diffusers' DDPM recipe trained for a wall time, scored alike.

Trains diffusers' `UNet2DModel` with the architecture of configs/digits.py (our
quickstart U-Net: block_out_channels (32, 64), 2 layers per block, attention
at 4×4, about 1.0M parameters; `torch_baseline.build_unet`) on the embedded
8×8 digits with the recipe of diffusers' `train_unconditional` example:
`DDPMScheduler` (T = 1000, linear β from 1e-4 to 0.02), Adam (lr 2e-4, betas
(0.9, 0.999), eps 1e-8) with a linear warm-up from 0 and then a constant rate,
batch 64, the ε MSE at t uniform in [0, 1000), global-norm clipping at 1.0 and
an EMA of decay min(0.999, (1 + n) / (10 + n)) after n updates (diffusers'
`EMAModel` without its inverse-gamma warm-up). Training stops at the first step
that ends --seconds after the end of the first step, so start-up is not
counted, as our `training.time_budget_s`. The EMA weights then draw
--num_samples images with the scheduler's ancestral sampler (or
DPM-Solver++(2M), --sampler=dpmsolver), scored by
`evaluation.digits_metric.compute_digit_metrics` against the train split:
the figures of our quickstart's final evaluation.

The 600-second comparison (1,000 samples, 1,000 ancestral steps), on every core:
  python -m benchmarks.digits_peer --seconds=600 --json_out=/tmp/digits_peer.json \
      --samples_out=/tmp/digits_peer_samples.npz
With 50 DPM-Solver++ steps, as the quickstart's final evaluation:
  python -m benchmarks.digits_peer --seconds=600 --sampler=dpmsolver --num_steps=50 \
      --json_out=/tmp/digits_peer_dpm.json
Smoke test:
  python -m benchmarks.digits_peer --seconds=20 --num_samples=50 --num_steps=20 --json_out=/tmp/peer_smoke.json
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import torch_baseline
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import digits_metric

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
LOSS_WINDOW = 50  # the final loss is the mean of the last this many step losses


def digits_train_images() -> np.ndarray:
  """The digits train split as float32 NCHW in [-1, 1] (x / 127.5 - 1)."""
  images, _ = input_pipeline.load_digits("train")
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def ddpm_scheduler(diffusers):
  """The noise schedule of training and ancestral sampling (diffusers' train_unconditional defaults)."""
  return diffusers.DDPMScheduler(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_schedule="linear",
    beta_start=BETA_START,
    beta_end=BETA_END,
    variance_type="fixed_small",
    clip_sample=True,
  )


def sampling_scheduler(diffusers, sampler: str):
  if sampler == "ddpm":
    return ddpm_scheduler(diffusers)
  if sampler in ("dpmsolver", "dpmsolver_sde"):
    algorithm = "sde-dpmsolver++" if sampler == "dpmsolver_sde" else "dpmsolver++"
    return diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=NUM_TRAIN_TIMESTEPS,
      beta_schedule="linear",
      beta_start=BETA_START,
      beta_end=BETA_END,
      algorithm_type=algorithm,
      solver_order=2,
    )
  raise ValueError(f"Unknown sampler {sampler!r}; use 'ddpm', 'dpmsolver' or 'dpmsolver_sde'.")


def ema_decay(num_updates: int, max_decay: float) -> float:
  """diffusers' EMAModel decay without warm-up: min(max_decay, (1 + n) / (10 + n)) at the (n+1)-th update."""
  return min(max_decay, (1.0 + num_updates) / (10.0 + num_updates))


def warmup_factor(step: int, warmup_steps: int) -> float:
  """diffusers' constant_with_warmup: step / warmup_steps below the warm-up (0 at the first step), then 1."""
  if step < warmup_steps:
    return step / max(1, warmup_steps)
  return 1.0


def _batches(num: int, batch_size: int, rng: np.random.Generator):
  """Index batches forever: a fresh permutation per epoch, full batches only (the remainder is dropped)."""
  if batch_size > num:
    raise ValueError(f"The batch ({batch_size}) is larger than the dataset ({num}).")
  while True:
    perm = rng.permutation(num)
    for i in range(num // batch_size):
      yield perm[i * batch_size : (i + 1) * batch_size]


def train(
  config,
  *,
  seconds: float,
  batch_size: int = 64,
  lr: float = 2e-4,
  warmup_steps: int = 100,
  ema_max_decay: float = 0.999,
  grad_clip: float = 1.0,
  seed: int = 0,
  log_every_s: float = 60.0,
):
  """Trains the diffusers U-Net for `seconds` of wall time after the first step.

  Args:
    config: a config with model and data sections (the U-Net's architecture).
    seconds: the budget, counted from the end of the first step; checked after
      every step, so training stops at the first step that ends past it.
    batch_size: images per step.
    lr: the Adam learning rate after the warm-up.
    warmup_steps: linear warm-up from 0 over this many steps.
    ema_max_decay: the cap of the EMA decay.
    grad_clip: global-norm clipping threshold (0: none).
    seed: seeds torch (init, t, ε) and the numpy epoch shuffles.
    log_every_s: progress lines this often (seconds; 0: none).

  Returns:
    `(model, ema_params, stats)`: the trained network, the EMA copy of its
    parameters (a list of tensors in `model.parameters()` order), and a dict of
    training figures (steps, seconds, steps/s, losses).
  """
  torch, diffusers = torch_baseline.import_torch()
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  data = torch.from_numpy(digits_train_images())
  model = torch_baseline.build_unet(config, torch, diffusers, "cpu").train()
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True)
  scheduler = ddpm_scheduler(diffusers)
  batches = _batches(len(data), batch_size, rng)

  losses: list[float] = []
  step = 0
  t_start = time.perf_counter()
  t_first = None  # end of the first step: the budget's origin
  next_log = log_every_s
  while True:
    for group in opt.param_groups:
      group["lr"] = lr * warmup_factor(step, warmup_steps)
    clean = data[next(batches)]
    noise = torch.randn_like(clean)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (clean.shape[0],), dtype=torch.long)
    noisy = scheduler.add_noise(clean, noise, t)
    eps = model(noisy, t).sample
    loss = torch.nn.functional.mse_loss(eps, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - ema_decay(step, ema_max_decay))  # pylint: disable=protected-access
    losses.append(float(loss.item()))
    step += 1
    now = time.perf_counter()
    if t_first is None:
      t_first = now
      first_step_s = now - t_start
    elapsed = now - t_first
    if log_every_s and elapsed >= next_log:
      print(f"  step {step}, {elapsed:.0f} s, loss {np.mean(losses[-LOSS_WINDOW:]):.4f}", flush=True)
      next_log += log_every_s
    if elapsed >= seconds:
      break
  train_s = now - t_first
  stats = {
    "steps": step,
    "train_seconds": train_s,  # after the first step
    "first_step_seconds": first_step_s,
    "steps_per_s": (step - 1) / train_s if train_s > 0 else float("nan"),  # the steps after the first
    "images_per_s": (step - 1) * batch_size / train_s if train_s > 0 else float("nan"),
    "final_loss": float(np.mean(losses[-LOSS_WINDOW:])),
    "first_loss": losses[0],
    "epochs": step * batch_size / len(data),
  }
  return model, ema, stats


def sample(
  model, ema_params, *, num_samples: int, num_steps: int, batch_size: int = 500, sampler: str = "ddpm", seed: int = 0
) -> np.ndarray:
  """Draws images with the EMA weights (copied into `model`); float32 NHWC, as the sampler leaves them.

  Args:
    model: the UNet2DModel (its parameters are overwritten by `ema_params`).
    ema_params: tensors in `model.parameters()` order.
    num_samples: images to draw.
    num_steps: scheduler steps (`set_timesteps(num_steps)`).
    batch_size: images per sampling batch.
    sampler: 'ddpm' (DDPMScheduler), 'dpmsolver' (DPM-Solver++, order 2) or 'dpmsolver_sde' (its SDE variant).
    seed: seeds the torch.Generator of the initial noise and the step noise.
  """
  torch, diffusers = torch_baseline.import_torch()
  with torch.no_grad():
    for p, e in zip(model.parameters(), ema_params):
      p.copy_(e)
  model.eval()
  c, s = model.config.in_channels, model.config.sample_size
  generator = torch.Generator().manual_seed(seed)
  out = []
  with torch.inference_mode():
    for start in range(0, num_samples, batch_size):
      n = min(batch_size, num_samples - start)
      scheduler = sampling_scheduler(diffusers, sampler)  # fresh per batch: the multistep solver keeps state
      scheduler.set_timesteps(num_steps)
      x = torch.randn((n, c, s, s), generator=generator) * scheduler.init_noise_sigma
      for t in scheduler.timesteps:
        eps = model(x, t).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
      out.append(x.permute(0, 2, 3, 1).numpy().astype(np.float32))
  return np.concatenate(out, axis=0)


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def run(
  config,
  *,
  seconds: float,
  batch_size: int = 64,
  lr: float = 2e-4,
  warmup_steps: int = 100,
  ema_max_decay: float = 0.999,
  grad_clip: float = 1.0,
  threads: int | None = None,
  seed: int = 0,
  sampler: str = "ddpm",
  num_samples: int = 1000,
  num_steps: int = 1000,
  sample_batch: int = 500,
  log_every_s: float = 60.0,
) -> tuple[dict[str, Any], np.ndarray]:
  """Trains, samples and scores; returns (the JSON payload, the uint8 samples [N, 8, 8, 1])."""
  load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  imported = torch_baseline.import_torch()
  if imported is None:
    raise ImportError("benchmarks.digits_peer needs torch and diffusers (pip install torch diffusers).")
  torch, _ = imported
  threads = threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  env = harness.environment()
  env.update(harness.torch_environment(torch))
  print(
    f"torch {env['torch']}, diffusers {env.get('diffusers')}, {threads} threads of {os.cpu_count()} CPUs, "
    f"load {load_average}",
    flush=True,
  )

  model, ema, train_stats = train(
    config,
    seconds=seconds,
    batch_size=batch_size,
    lr=lr,
    warmup_steps=warmup_steps,
    ema_max_decay=ema_max_decay,
    grad_clip=grad_clip,
    seed=seed,
    log_every_s=log_every_s,
  )
  num_params = sum(p.numel() for p in model.parameters())
  print(
    f"UNet2DModel: {num_params:,} parameters; {train_stats['steps']} steps in {train_stats['train_seconds']:.1f} s "
    f"after the first ({train_stats['steps_per_s']:.2f} steps/s), final loss {train_stats['final_loss']:.4f}",
    flush=True,
  )

  print(f"Sampling {num_samples} images, {num_steps} {sampler} steps, batch {sample_batch}...", flush=True)
  t0 = time.perf_counter()
  samples = sample(
    model, ema, num_samples=num_samples, num_steps=num_steps, batch_size=sample_batch, sampler=sampler, seed=seed
  )
  sampling_s = time.perf_counter() - t0
  samples_uint8 = images_lib.to_uint8(samples)

  reference = input_pipeline.load_digits("train")[0]
  t0 = time.perf_counter()
  metrics = digits_metric.compute_digit_metrics(samples_uint8, reference)
  metric_s = time.perf_counter() - t0

  payload = {
    "benchmark": "digits_peer",
    "load_average_at_start": load_average,
    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "environment": env,
    "num_params": int(num_params),
    "recipe": {
      "network": "diffusers UNet2DModel(**convert.diffusers_config_for(config))",
      "scheduler": f"DDPMScheduler(T={NUM_TRAIN_TIMESTEPS}, linear beta {BETA_START}..{BETA_END}, "
      "fixed_small, clip_sample=True)",
      "optimizer": "Adam(betas=(0.9, 0.999), eps=1e-8), linear warm-up from 0, then constant",
      "lr": lr,
      "warmup_steps": warmup_steps,
      "batch_size": batch_size,
      "grad_clip": grad_clip,
      "ema": f"min({ema_max_decay}, (1 + n) / (10 + n))",
      "ema_max_decay": ema_max_decay,
      "threads": threads,
      "seed": seed,
    },
    "budget_seconds": seconds,
    **train_stats,
    "sampler": sampler,
    "num_steps": num_steps,
    "sample_batch": sample_batch,
    "sampling_seconds": sampling_s,
    "metric_seconds": metric_s,
    **metrics,
    "config": config.to_dict(),
  }
  return payload, samples_uint8


def print_summary(payload: dict[str, Any]) -> None:
  rows = [
    ["parameters", f"{payload['num_params']:,}"],
    ["steps", payload["steps"]],
    ["steps/s", payload["steps_per_s"]],
    ["train s (after step 1)", payload["train_seconds"]],
    ["first step s", payload["first_step_seconds"]],
    ["epochs", payload["epochs"]],
    [f"final loss (last {LOSS_WINDOW})", payload["final_loss"]],
    [
      f"sampling s ({payload['num_samples']} × {payload['num_steps']} {payload['sampler']})",
      payload["sampling_seconds"],
    ],
  ]
  for key in digits_metric.FIGURES:
    rows.append([key, payload[key]])
  rows.append(["class histogram", " ".join(str(c) for c in payload["digits_class_histogram"])])
  notes = [
    f"load average at the start {payload['load_average_at_start']}, at the end "
    f"{payload['load_average_at_end']}; "
    f"torch threads {payload['environment'].get('torch_threads')} of {os.cpu_count()} CPUs",
    f"budget {payload['budget_seconds']:g} s of training wall time after the first step",
  ]
  harness.print_table("PyTorch peer (diffusers DDPM recipe) on the 8×8 digits", ["figure", "value"], rows, notes)


def save_samples(path: str, samples_uint8: np.ndarray) -> tuple[str, str]:
  """Writes `path` (.npz, key 'images') and the PNG grid beside it (scale 4); both overwrite."""
  root, ext = os.path.splitext(path)
  npz_path = path if ext == ".npz" else path + ".npz"
  os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
  np.savez_compressed(npz_path, images=samples_uint8)
  png_path = (root if ext == ".npz" else path) + ".png"
  images_lib.save_image(images_lib.make_grid(samples_uint8, scale=4), png_path, overwrite=True)
  print(f"Wrote {npz_path} and {png_path}")
  return npz_path, png_path


def define_flags() -> None:
  """Defines the command-line flags (called when run as a script, so importing the module defines none)."""
  config_flags.DEFINE_config_file("config", "configs/digits.py", "The config whose U-Net is built.", lock_config=True)
  flags.DEFINE_float("seconds", 600.0, "Training wall time, counted from the end of the first step.")
  flags.DEFINE_integer("batch_size", 64, "Training batch.")
  flags.DEFINE_float("lr", 2e-4, "Adam learning rate after the warm-up.")
  flags.DEFINE_integer("warmup_steps", 100, "Linear learning-rate warm-up from 0, in steps.")
  flags.DEFINE_float("ema_max_decay", 0.999, "The EMA decay is min(this, (1 + n) / (10 + n)).")
  flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clipping (0: none).")
  flags.DEFINE_integer("threads", None, "torch intra-op threads (default: os.cpu_count()).")
  flags.DEFINE_integer("seed", 0, "Seeds torch, the epoch shuffles and the sampling generator.")
  flags.DEFINE_enum(
    "sampler",
    "ddpm",
    ["ddpm", "dpmsolver", "dpmsolver_sde"],
    "ddpm: DDPMScheduler ancestral steps; dpmsolver: DPM-Solver++(2M); "
    "dpmsolver_sde: its SDE variant (sde-dpmsolver++, order 2).",
  )
  flags.DEFINE_integer("num_samples", 1000, "Images to draw and score.")
  flags.DEFINE_integer("num_steps", 1000, "Sampler steps (network calls per image).")
  flags.DEFINE_integer("sample_batch", 500, "Sampling batch.")
  flags.DEFINE_string("json_out", "", "Write the results here as JSON.")
  flags.DEFINE_string(
    "samples_out",
    "",
    "Write the uint8 samples here (.npz, key 'images') and a PNG grid beside it (same name, .png); "
    "both are overwritten.",
  )


def main(argv):
  del argv
  payload, samples_uint8 = run(
    flags.FLAGS.config,
    seconds=flags.FLAGS.seconds,
    batch_size=flags.FLAGS.batch_size,
    lr=flags.FLAGS.lr,
    warmup_steps=flags.FLAGS.warmup_steps,
    ema_max_decay=flags.FLAGS.ema_max_decay,
    grad_clip=flags.FLAGS.grad_clip,
    threads=flags.FLAGS.threads,
    seed=flags.FLAGS.seed,
    sampler=flags.FLAGS.sampler,
    num_samples=flags.FLAGS.num_samples,
    num_steps=flags.FLAGS.num_steps,
    sample_batch=flags.FLAGS.sample_batch,
  )
  print_summary(payload)
  if flags.FLAGS.samples_out:
    payload["samples_npz"], payload["samples_png"] = save_samples(flags.FLAGS.samples_out, samples_uint8)
  bad = [k for k in ("digits_fd", "digits_is", "digits_precision", "digits_recall") if not _finite(payload[k])]
  if bad:
    print(f"Warning: non-finite figures: {bad}")
  harness.write_json(flags.FLAGS.json_out, payload)


if __name__ == "__main__":
  define_flags()
  app.run(main)
