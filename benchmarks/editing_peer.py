r"""The PyTorch peer of benchmarks/editing_digits.py: diffusers' RePaint and DDIM inversion, same network and data.

The trained JAX model's EMA weights are exported with the project's converter (`convert.params_to_diffusers` on
`checkpointing.load_params(workdir, use_ema=True)`: what `python -m diffusion_jax.convert jax2diffusers` does, in
process) to a diffusers `UNet2DModel` folder (--diffusers_dir, default a temporary folder; an existing export there is
reused) and loaded with `UNet2DModel.from_pretrained`. A sanity line first prints the largest difference between the
exported network and the JAX one on random inputs at a few timesteps (NHWC vs NCHW); above 1e-3 the run stops.
Then, on the digits test split (297 images, --max_images for fewer) and with the digit classifier of
docs/digits_metric.md, all images in one torch batch (`torch.no_grad()`, every core; one untimed network call at
that shape first, so the seconds are of the loops alone, without a first call's set-up):

* RePaint (`--parts=repaint`): the lower and the right half (--fills) of each test digit are filled in (the masks of
  `editing_digits.masks_for`, 1 = keep) with diffusers' `RePaintScheduler` driven by the loop of diffusers'
  `RePaintPipeline.__call__` (`set_timesteps(n, jump_length, jump_n_sample)`; for each t: `step` with a network
  call if t < t_last, else `undo_step(image, t_last)`), with RePaint's setting (250 steps, jump length 10, 10
  passes; --repaint_steps, --jump_length, --resample) and without resampling (jump_n_sample = 1). Rows: network
  calls, seconds of the loop, label kept and the digit metric of the results against the train split
  (`editing_digits.score`), and how many known pixels differ from the input before the known pixels are pasted
  back (diffusers' last step sets them to the input itself: ᾱ_prev = 1 there, so 0 is expected);
* this library on the same images, masks and settings in the same process, before each diffusers row
  (`sampling.inpaint_fn` with `resample`/`jump_length`, and `encode_fn`/`decode_fn`; its seconds include the
  compilation): the side-by-side rows of each table;
* DDIM inversion (`--parts=inversion`): `DDIMInverseScheduler` up, then `DDIMScheduler` (η = 0) down, for each of
  --inversion_steps; the figures of `editing_digits.inversion` (RMSE and max |error| in 0..255 units, PSNR, label
  kept after the round trip).

diffusers' RePaintScheduler (0.42): the mask is 1 = keep (known), 0 = fill, as ours; `step` draws x_{t−1} with DDIM's
formula (12) and `eta`: σ² = η²·β̃, β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), the posterior variance of the
respaced step; η = 1 is the ancestral DDPM step with σ² = β̃ (the paper's `fixedsmall`), η = 0 (the pipeline's
default) deterministic DDIM for the unknown pixels. There is no σ² = β option: the JAX side's model uses `fixedlarge`
(σ² = β' = 1 − ᾱ_t/ᾱ_prev on the respaced chain), so the variances differ; --eta defaults to 1.0, the DDPM step.
x̂_0 is clipped (clip_sample=True, as the JAX side's clip_denoised). The grid is s·(T // n) for s = 0..n−1 (top 996
for n = 250, where the JAX `even` grid tops at 999), and `undo_step(image, t_last)` noises with β[t_last..t_last +
T//n − 1] where the chain sits one stride lower (an approximation of the forward jump; the JAX side uses the exact
respaced β'). The same noise draw serves the unknown pixels' step and the known pixels' q_sample (disjoint pixels).

DDIM inversion choices (JAX: `encode_fn`/`decode_fn` on the `even` grid s_i = round(i·(T−1)/(n−1)), 0 and T − 1
included, the network at the current point with the current timestep): --inversion_spacing=trailing (default;
timesteps T − 1 − k·T/n: the top is T − 1 as the JAX latents', the bottom T/n − 1 instead of 0, even strides of
T/n where `even` has strides of (T−1)/(n−1)) with set_alpha_to_one=True in both schedulers (the step below the
lowest timestep is the clean image, ᾱ = 1, in both directions, as the JAX chain's x_0), clip_sample=False (as the
JAX default: clipping is not invertible), steps_offset 0, η = 0. `leading` is the other spacing both schedulers
know (0, T/n, …, T − T/n: 0 included as in `even`, but the top is T − T/n, not T − 1). Both schedulers step by
T // n, so n should divide T. The network timestep (--inversion_network_t, default both): `target` is diffusers'
pipelines' (DiffEdit, Pix2Pix-Zero: `unet(latents, t)` with t the level the inverse step goes TO, the input sitting
one stride lower), `current` is the JAX encode_fn's (t − T // n, the input's own level; the first step, from the
clean image, at its target t, as the JAX side's first step).

The flags shared with editing_digits (--workdir, --parts, --seed, --repaint_steps, --resample, --jump_length,
--inversion_steps, --json_out) are its own, defined by importing it, with this benchmark's defaults for --parts
(repaint,inversion) and --inversion_steps (10,50,250); its other flags (--strengths, --pictures_dir) do nothing here.
From the repository root (PYTHONPATH=. where the package is not installed):

  python -m benchmarks.editing_peer --workdir=/work/runs/digits --diffusers_dir=/tmp/editing_peer_unet \
    --json_out=/tmp/editing_peer.json
Smoke run:
  python -m benchmarks.editing_peer --workdir=/work/runs/digits --diffusers_dir=/tmp/editing_peer_unet \
    --repaint_steps=20 --resample=2 --jump_length=5 --inversion_steps=5 --max_images=16
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from benchmarks import editing_digits
from benchmarks import harness
from diffusion_jax import checkpointing
from diffusion_jax import cli
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax import sampling
from diffusion_jax.convert import diffusers as convert_diffusers
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.samplers import repaint

# The flags both benchmarks share are editing_digits' (importing it defines them), with this benchmark's defaults for
# --parts and --inversion_steps; its other flags (--strengths, --pictures_dir) are ignored here.
_WORKDIR = editing_digits._WORKDIR  # pylint: disable=protected-access
_PARTS = editing_digits._PARTS  # pylint: disable=protected-access
_SEED = editing_digits._SEED  # pylint: disable=protected-access
_REPAINT_STEPS = editing_digits._REPAINT_STEPS  # pylint: disable=protected-access
_RESAMPLE = editing_digits._RESAMPLE  # pylint: disable=protected-access
_JUMP = editing_digits._JUMP  # pylint: disable=protected-access
_INVERSION_STEPS = editing_digits._INVERSION_STEPS  # pylint: disable=protected-access
_JSON_OUT = editing_digits._JSON_OUT  # pylint: disable=protected-access
flags.FLAGS.set_default("parts", ["repaint", "inversion"])
flags.FLAGS.set_default("inversion_steps", ["10", "50", "250"])
for _name in ("workdir", "parts", "seed", "repaint_steps", "resample", "jump_length", "inversion_steps", "json_out"):
  flags.declare_key_flag(_name)

_DIFFUSERS_DIR = flags.DEFINE_string(
  "diffusers_dir", "", "Where to export the UNet2DModel (reused if it holds one); default a temporary folder."
)
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use the first this many test digits (0: all 297).")
_FILLS = flags.DEFINE_list("fills", ["lower", "right"], "Which halves to fill (editing_digits.masks_for).")
_ETA = flags.DEFINE_float("eta", 1.0, "RePaintScheduler's eta: 1.0 the DDPM step (σ² = β̃), 0.0 DDIM.")
_INVERSION_SPACING = flags.DEFINE_enum(
  "inversion_spacing", "trailing", ["trailing", "leading"], "timestep_spacing of both DDIM schedulers."
)
_INVERSION_T = flags.DEFINE_list(
  "inversion_network_t",
  ["target", "current"],
  "The network's timestep in the inverse steps: target (diffusers' pipelines), current (the JAX encode_fn's).",
)

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
# The quickstart's schedule (configs/digits.py: the paper's linear β over T = 1000) in diffusers' terms.
SCHEDULE = dict(
  num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear"
)
EQUIVALENCE_TIMESTEPS = (0, 10, 100, 500, 999)
EQUIVALENCE_TOLERANCE = 1e-3


def export(workdir: str, folder: str) -> tuple[pathlib.Path, int, bool]:
  """The workdir's EMA weights as a diffusers folder (the converter's jax2diffusers); (folder, step, reused)."""
  path = pathlib.Path(folder)
  if (path / convert_diffusers.DIFFUSERS_CONFIG).exists():
    return path, -1, True
  config, params, step = checkpointing.load_params(workdir, use_ema=True)
  convert_diffusers.params_to_diffusers(params, config, path)
  return path, int(step), False


def network_difference(torch, unet, model, batch: int = 8, seed: int = 0) -> float:
  """max |diffusers UNet − JAX network| on random N(0, 1) inputs at EQUIVALENCE_TIMESTEPS."""
  fn = runtime.bind(runtime.model_fn(model.network), model.params)
  x = np.random.default_rng(seed).standard_normal((batch, *model.image_shape)).astype(np.float32)
  worst = 0.0
  for t in EQUIVALENCE_TIMESTEPS:
    ours = np.asarray(fn(jax.numpy.asarray(x), jax.numpy.full((batch,), t, jax.numpy.int32)))
    with torch.no_grad():
      theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), t).sample.numpy().transpose(0, 2, 3, 1)
    worst = max(worst, float(np.abs(ours - theirs).max()))
  return worst


def _nchw(images: np.ndarray):
  """uint8 NHWC → float32 NCHW in [-1, 1] (x / 127.5 − 1, as `sampling._float_images`)."""
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def _uint8(torch_images) -> np.ndarray:
  """float NCHW in [-1, 1] → uint8 NHWC, `images.to_uint8`."""
  return images_lib.to_uint8(torch_images.numpy().transpose(0, 2, 3, 1))


def repaint_run(torch, diffusers, unet, test, masks, *, steps, jump_length, jump_n_sample, eta, seed):
  """diffusers' RePaintPipeline.__call__ loop on one batch: (uint8 NHWC results before the paste, calls, seconds)."""
  scheduler = diffusers.RePaintScheduler(**SCHEDULE, eta=eta, clip_sample=True)
  original = torch.from_numpy(_nchw(test))
  mask = torch.from_numpy(masks[:, None].astype(np.float32))  # [N, 1, H, W], 1 = keep
  generator = torch.Generator().manual_seed(seed)
  calls = 0
  with torch.no_grad():
    start = time.perf_counter()
    image = diffusers.utils.torch_utils.randn_tensor(original.shape, generator=generator, dtype=original.dtype)
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    scheduler.eta = eta
    t_last = scheduler.timesteps[0] + 1
    for t in scheduler.timesteps:
      if t < t_last:
        model_output = unet(image, t).sample
        image = scheduler.step(model_output, t, image, original, mask, generator).prev_sample
        calls += 1
      else:
        image = scheduler.undo_step(image, t_last, generator)
      t_last = t
    seconds = time.perf_counter() - start
  return _uint8(image), calls, seconds


def repaint_part(torch, diffusers, unet, test, labels, reference, results):
  header = ["fill", "setting", "network calls", "s", "known px changed before paste", "label kept"]
  header += list(editing_digits.FIGURES)
  settings = (
    (f"RePaint, {_REPAINT_STEPS.value} steps, jump {_JUMP.value}, {_RESAMPLE.value} passes", _RESAMPLE.value),
    (f"{_REPAINT_STEPS.value} steps, no resampling (jump_n_sample=1)", 1),
  )
  table = []
  model = sampling.load_model(_WORKDIR.value)
  rng = jax.random.PRNGKey(_SEED.value)
  for kind in _FILLS.value:
    masks = editing_digits.masks_for(kind, len(test))
    known = masks[..., None].astype(bool)
    for name, jump_n_sample in settings:
      # This library on the same images, masks and settings, in the same process (compilation included).
      start = time.perf_counter()
      ours = sampling.inpaint_fn(
        model,
        test,
        masks,
        rng,
        sampler="ancestral",
        num_steps=_REPAINT_STEPS.value,
        resample=jump_n_sample,
        jump_length=_JUMP.value,
      )
      ours_seconds = time.perf_counter() - start
      ours_calls = repaint.schedule(_REPAINT_STEPS.value, _JUMP.value, jump_n_sample)[2]
      s = editing_digits.score(ours, labels, reference)
      s.update(network_calls=ours_calls, seconds=ours_seconds)
      results[f"repaint/{kind}/diffusion_jax/{name}"] = s
      table.append(
        [kind, f"diffusion_jax: {name}", ours_calls, f"{ours_seconds:.1f}", "0 (pasted)", f"{s['label_kept']:.3f}"]
        + [f"{s[k]:.3f}" for k in editing_digits.FIGURES]
      )
      print(f"  diffusion_jax {kind} half, {name}: label kept {s['label_kept']:.3f} ({ours_seconds:.1f} s)", flush=True)
      raw, calls, seconds = repaint_run(
        torch,
        diffusers,
        unet,
        test,
        masks,
        steps=_REPAINT_STEPS.value,
        jump_length=_JUMP.value,
        jump_n_sample=jump_n_sample,
        eta=_ETA.value,
        seed=_SEED.value,
      )
      changed = int(np.sum((raw != test) & known))
      filled = np.where(known, test, raw)
      s = editing_digits.score(filled, labels, reference)
      s.update(
        network_calls=calls,
        seconds=seconds,
        known_pixels_changed_before_paste=changed,
        known_pixels=int(known.sum()),
        settings=dict(
          num_inference_steps=_REPAINT_STEPS.value,
          jump_length=_JUMP.value,
          jump_n_sample=jump_n_sample,
          eta=_ETA.value,
          clip_sample=True,
          seed=_SEED.value,
        ),
      )
      results[f"repaint/{kind}/diffusers/{name}"] = s
      table.append(
        [
          kind,
          f"diffusers: {name}",
          calls,
          f"{seconds:.1f}",
          f"{changed} of {int(known.sum())}",
          f"{s['label_kept']:.3f}",
        ]
        + [f"{s[k]:.3f}" for k in editing_digits.FIGURES]
      )
      print(f"  RePaint {kind} half, {name}: label kept {s['label_kept']:.3f} ({seconds:.1f} s)", flush=True)
  editing_digits._table(  # pylint: disable=protected-access
    f"diffusers RePaintScheduler inpainting of the digits test split (eta {_ETA.value:g})", header, table
  )


def _ddim_config(spacing: str) -> dict:
  return dict(
    **SCHEDULE,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    timestep_spacing=spacing,
  )


def invert(diffusers, unet, x0, steps: int, spacing: str, network_t: str):
  """DDIMInverseScheduler from x0 up to the top of its grid: (latents, network calls)."""
  scheduler = diffusers.DDIMInverseScheduler(**_ddim_config(spacing))
  scheduler.set_timesteps(steps)
  stride = NUM_TRAIN_TIMESTEPS // steps
  x, calls = x0, 0
  for t in scheduler.timesteps:
    t_net = t if network_t == "target" or t - stride < 0 else t - stride
    x = scheduler.step(unet(x, t_net).sample, t, x).prev_sample
    calls += 1
  return x, calls


def decode(diffusers, unet, latents, steps: int, spacing: str):
  """DDIMScheduler (η = 0) from the latents down to the clean image: (images, network calls)."""
  scheduler = diffusers.DDIMScheduler(**_ddim_config(spacing))
  scheduler.set_timesteps(steps)
  x, calls = latents, 0
  for t in scheduler.timesteps:
    x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    calls += 1
  return x, calls


def _round_trip(again: np.ndarray, test: np.ndarray, labels: np.ndarray, **info) -> dict:
  """The round-trip figures of editing_digits.inversion for uint8 results `again`."""
  err = again.astype(np.float64) - test.astype(np.float64)
  rmse = float(np.sqrt(np.mean(err**2)))
  _, logits = digits_metric.classify(again)
  return dict(
    info,
    rmse=rmse,
    max_abs_error=float(np.abs(err).max()),
    psnr=float(20 * np.log10(255.0 / max(rmse, 1e-12))),
    label_kept=float(np.mean(logits.argmax(axis=1) == labels)),
  )


def _inversion_row(name: str, s: dict) -> list:
  return [name, s["steps"], s["network_calls"], f"{s['seconds']:.1f}", f"{s['rmse']:.2f}"] + [
    f"{s['max_abs_error']:.0f}",
    f"{s['psnr']:.1f}",
    f"{s['label_kept']:.3f}",
  ]


def inversion_part(torch, diffusers, unet, test, labels, results):
  header = [
    "who (network t, grid)",
    "steps",
    "network calls",
    "s",
    "RMSE (0-255)",
    r"max \|error\| (0-255)",
    "PSNR (dB)",
  ]
  header += ["label kept"]
  table = []
  spacing = _INVERSION_SPACING.value
  x0 = torch.from_numpy(_nchw(test))
  model = sampling.load_model(_WORKDIR.value)
  for grid in ("even", spacing):
    for steps in [int(v) for v in _INVERSION_STEPS.value]:
      # This library: encode_fn/decode_fn (network_t="target", the default) on the `even` grid (the default) and
      # on diffusers' grid, in the same process (compilation included).
      kw = dict(num_steps=steps, timestep_spacing=grid)
      start = time.perf_counter()
      again = sampling.decode_fn(model, sampling.encode_fn(model, test, **kw), **kw)
      seconds = time.perf_counter() - start
      s = _round_trip(again, test, labels, steps=steps, network_calls=2 * steps, seconds=seconds)
      results[f"inversion/diffusion_jax/{grid}/{steps}"] = s
      table.append(_inversion_row(f"diffusion_jax (target t, {grid})", s))
  for network_t in _INVERSION_T.value:
    if network_t not in ("target", "current"):
      raise app.UsageError(f"--inversion_network_t takes target and current, got {network_t!r}.")
    for steps in [int(v) for v in _INVERSION_STEPS.value]:
      with torch.no_grad():
        start = time.perf_counter()
        latents, up = invert(diffusers, unet, x0, steps, spacing, network_t)
        again, down = decode(diffusers, unet, latents, steps, spacing)
        seconds = time.perf_counter() - start
      s = _round_trip(
        _uint8(again),
        test,
        labels,
        steps=steps,
        network_t=network_t,
        timestep_spacing=spacing,
        network_calls=up + down,
        seconds=seconds,
        latent_std=float(latents.std()),
      )
      results[f"inversion/diffusers/{network_t}/{steps}"] = s
      table.append(_inversion_row(f"diffusers ({network_t} t, {spacing})", s))
      print(f"  inversion ({network_t} t) {steps} steps: RMSE {s['rmse']:.2f}", flush=True)
  editing_digits._table(  # pylint: disable=protected-access
    f"diffusers DDIM inversion round trip on the digits test split (DDIMInverseScheduler, then DDIMScheduler; "
    f"{spacing} spacing, set_alpha_to_one, no clipping)",
    header,
    table,
  )


def main(argv):
  del argv
  cli.quiet_logging()
  import diffusers  # pylint: disable=g-import-not-at-top
  import diffusers.utils.torch_utils  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(_PARTS.value) - {"repaint", "inversion"})
  if unknown:
    raise app.UsageError(f"--parts takes repaint and inversion, got {unknown}.")
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  env = harness.environment()
  env.update(harness.torch_environment(torch))

  model = sampling.load_model(_WORKDIR.value)
  folder = _DIFFUSERS_DIR.value or tempfile.mkdtemp(prefix="editing_peer_unet_")
  folder, step, reused = export(_WORKDIR.value, folder)
  unet = diffusers.UNet2DModel.from_pretrained(str(folder)).eval()
  difference = network_difference(torch, unet, model)
  print(
    f"{model!r}: {'reused the export in' if reused else f'exported step {step} (EMA weights) to'} {folder}; "
    f"torch {torch.__version__}, diffusers {diffusers.__version__}, {threads} threads",
    flush=True,
  )
  print(
    f"network equivalence: max |diffusers UNet2DModel - JAX network| = {difference:.2e} "
    f"(random N(0, 1) inputs, t in {EQUIVALENCE_TIMESTEPS})",
    flush=True,
  )
  if not difference < EQUIVALENCE_TOLERANCE:
    raise SystemExit(f"The exported network differs from the JAX one by {difference:.2e}; is {folder} stale?")

  test, labels = input_pipeline.load_digits("test")
  if _MAX_IMAGES.value:
    test, labels = test[: _MAX_IMAGES.value], labels[: _MAX_IMAGES.value]
  reference, _ = input_pipeline.load_digits("train")
  print(f"{len(test)} test digits, seed {_SEED.value}", flush=True)
  with torch.no_grad():  # one untimed call at the batch's shape, so no timed loop pays torch's first-call set-up
    unet(torch.from_numpy(_nchw(test)), 500)
  results = {
    "workdir": _WORKDIR.value,
    "step": int(model.step),
    "diffusers_dir": str(folder),
    "network_max_abs_difference": difference,
    "seed": _SEED.value,
    "num_images": len(test),
    "environment": env,
  }
  if "repaint" in _PARTS.value:
    repaint_part(torch, diffusers, unet, test, labels, reference, results)
  if "inversion" in _PARTS.value:
    inversion_part(torch, diffusers, unet, test, labels, results)
  harness.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
