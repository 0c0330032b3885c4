"""The API a notebook user touches: load a model, sample, interpolate, look at grids.

Example (runs as is on a workdir trained with configs/digits.py)::

  import jax
  import diffusion_jax

  model = diffusion_jax.load_model("runs/digits")            # EMA parameters
  images = diffusion_jax.sample_fn(model, 64, jax.random.PRNGKey(0), sampler="ddim", num_steps=50)
  diffusion_jax.save_image_grid(images, "digits.png", scale=4)  # uint8 [64, 8, 8, 1] → PNG

`--mode=sample` of `diffusion_jax.main` uses `sample_to_workdir`, which writes
large sample sets in chunks that survive interruption.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import images as images_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.evaluation import sample_export
from diffusion_jax.evaluation.sample_export import LoadedModel, load_model, model_from_config  # noqa: F401 (API)

_validate = sample_export.validate_sampler
_progress = sample_export.progress_bar
generate = sample_export.generate
write_sample_chunks = sample_export.write_sample_chunks
read_sample_chunks = sample_export.read_sample_chunks


def sample_fn(
    model: LoadedModel,
    num_samples: int,
    rng: jax.Array,
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    batch_size: int | None = None,
    progress: bool = True,
) -> np.ndarray:
  """Draws `num_samples` images from the model.

  Sample i depends only on (rng, i): the same rng gives the same images for
  any batch size or number of devices.

  Args:
    model: from `load_model`.
    num_samples: how many images.
    rng: a `jax.random.PRNGKey`.
    sampler: `ancestral` (the paper's) or `ddim`.
    num_steps: reverse steps (default T; fewer respaces the schedule).
    eta: DDIM η (0 = deterministic).
    clip_denoised: clip x0 predictions to [-1, 1] (the paper's sampler).
    batch_size: images per device batch round (default: config.sampling.batch_size).
    progress: show a progress bar over batches.

  Returns:
    uint8 NumPy array [num_samples, H, W, C].

  Example:
    >>> images = sample_fn(model, 16, jax.random.PRNGKey(0), sampler="ddim", num_steps=50)
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  _validate(model, sampler, num_steps, eta)
  batch_size = int(batch_size or model.config.sampling.batch_size)
  mesh = runtime.make_mesh()
  size = runtime.data_size(mesh)
  batch_size = min(runtime.pad_to_multiple(batch_size, size), runtime.pad_to_multiple(num_samples, size))
  starts = range(0, num_samples, batch_size)
  out = []
  for start in _progress(starts, len(starts), progress, f"sampling ({sampler}, {num_steps or 'T'} steps)"):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(generate(model, idx, rng, sampler=sampler, num_steps=num_steps, eta=eta,
                        clip_denoised=clip_denoised, batch_size=batch_size, mesh=mesh)["samples"])
  return images_lib.to_uint8(np.concatenate(out))


def progressive_fn(model: LoadedModel, num_samples: int, rng: jax.Array, *, every: int | None = None,
                   sampler: str = "ancestral", num_steps: int | None = None, eta: float = 0.0) -> dict[str, np.ndarray]:
  """Progressive generation (the paper's Figure 6): x0 predictions and x_t along the reverse process.

  Returns:
    dict with uint8 `samples` [N, H, W, C], `pred_xstart` and `trajectory` [N, K, H, W, C].
  """
  n_steps = _validate(model, sampler, num_steps, eta)
  every = every or max(1, n_steps // 10)
  out = generate(model, np.arange(num_samples), rng, sampler=sampler, num_steps=num_steps, eta=eta,
                 progressive_every=every)
  return {k: images_lib.to_uint8(v) for k, v in out.items()}


def interpolate_fn(model: LoadedModel, x1, x2, rng: jax.Array, *, lambdas=None, t: int | None = None,
                   sampler: str = "ancestral", num_steps: int | None = None, eta: float = 0.0,
                   same_noise: bool = False, clip_denoised: bool = True) -> np.ndarray:
  """Interpolates between two images in latent space (the paper's §4.4, Figure 8).

  Both images are diffused to step t, their latents mixed as (1−λ)x_t + λx'_t
  and the mixture denoised back to an image.

  Args:
    model: from `load_model`.
    x1, x2: uint8 [H, W, C] images (or floats in [-1, 1]).
    rng: a `jax.random.PRNGKey`.
    lambdas: mixing weights (default 11 values from 0 to 1).
    t: the diffusion step to mix at (default T/2; the paper used 500 of 1000).
    sampler, num_steps, eta, clip_denoised: as in `sample_fn`.
    same_noise: diffuse both endpoints with the same noise (the reference
      code draws independent noise).

  Returns:
    uint8 [len(lambdas), H, W, C].
  """
  _validate(model, sampler, num_steps, eta)
  lambdas = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(lambdas, np.float32)
  t = model.diffusion.num_timesteps // 2 if t is None else int(t)

  def prep(x, name):
    x = np.asarray(x)
    if x.shape != model.image_shape:
      raise ValueError(f"{name} has shape {x.shape}; the model takes {model.image_shape} images.")
    return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)

  x1, x2 = prep(x1, "x1"), prep(x2, "x2")

  model_fn = runtime.bind(runtime.model_fn(model.model), model.params)
  out = samplers.interpolate(model.diffusion, model_fn, rng, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(lambdas),
                             t=t, sampler=sampler, num_steps=num_steps, eta=eta, same_noise=same_noise,
                             clip_denoised=clip_denoised)
  return images_lib.to_uint8(out)


def save_image_grid(images, path: str | os.PathLike, *, ncols: int | None = None, scale: int = 1,
                    overwrite: bool = False) -> epath.Path:
  """Writes uint8 [N, H, W, C] images as one PNG grid; refuses to overwrite an existing file unless asked."""
  return images_lib.save_image(images_lib.make_grid(images, ncols=ncols, scale=scale), path, overwrite=overwrite)


# ----------------------------------------------------------------------------
# --mode=sample: chunked, resumable sample sets (evaluation.sample_export).
# ----------------------------------------------------------------------------


def sample_to_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """--mode=sample: samples the workdir's newest checkpoint into workdir/samples/.

  Writes `<name>/samples_*.npz` chunks (uint8 images), `<name>/grid.png` and
  `<name>/progressive.png`, where <name> records the step, sampler and steps.
  An interrupted run resumes from the last finished chunk.
  """
  sc = config.sampling
  model = load_model(workdir, use_ema=sc.use_ema)
  num_steps = _validate(model, sc.sampler, sc.num_steps, sc.eta)
  name = f"step_{model.step}_{sc.sampler}_{num_steps}steps" + (f"_eta{sc.eta:g}" if sc.sampler == "ddim" else "")
  name += "" if sc.use_ema else "_raw"
  out_dir = epath.Path(workdir) / "samples" / name
  rng = jax.random.PRNGKey(config.eval.seed)
  paths = write_sample_chunks(model, out_dir, sc.num_samples, rng, sampler=sc.sampler, num_steps=num_steps,
                              eta=sc.eta, clip_denoised=sc.clip_denoised, chunk_size=sc.batch_size)
  if jax.process_index() == 0:
    images = read_sample_chunks(paths)[:256]
    scale = max(1, 64 // model.image_shape[0])
    grid_path = out_dir / "grid.png"
    if not grid_path.exists():
      save_image_grid(images, grid_path, scale=scale)
    prog_path = out_dir / "progressive.png"
    if not prog_path.exists():
      prog = progressive_fn(model, min(8, sc.num_samples), rng, sampler=sc.sampler, num_steps=num_steps, eta=sc.eta)
      rows = prog["pred_xstart"]  # [N, K, H, W, C]: one row per sample, x0 predictions left to right
      k = rows.shape[1]
      save_image_grid(rows.reshape((-1,) + rows.shape[2:]), prog_path, ncols=k, scale=scale)
    logging.info("Wrote %d samples, %s and %s to %s.", sc.num_samples, grid_path.name, prog_path.name, out_dir)
  return out_dir
