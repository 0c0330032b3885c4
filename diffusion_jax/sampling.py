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

import dataclasses
import math
import os
from typing import Any

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import images as images_lib
from diffusion_jax import samplers
from diffusion_jax.models import unet

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Everything needed to sample: the config, parameters, network and diffusion."""

  config: ml_collections.ConfigDict
  params: Any
  model: unet.UNet
  diffusion: diffusion_lib.GaussianDiffusion
  step: int
  use_ema: bool
  cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  def __repr__(self):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    return (f"LoadedModel(dataset={self.config.data.dataset!r}, image_shape={self.image_shape}, "
            f"params={n:,}, step={self.step}, ema={self.use_ema}, T={self.diffusion.num_timesteps})")


def model_from_config(config: ml_collections.ConfigDict, params, *, step: int = 0, use_ema: bool = True) -> LoadedModel:
  diffusion = diffusion_lib.from_config(config.diffusion)
  model = unet.from_config(config.model, out_ch=diffusion.model_output_channels(config.data.channels))
  return LoadedModel(config=config, params=params, model=model, diffusion=diffusion, step=step, use_ema=use_ema)


def load_model(path: str | os.PathLike, *, use_ema: bool = True, step: int | None = None) -> LoadedModel:
  """Loads a model from a training workdir or a converted checkpoint directory.

  Args:
    path: a workdir (with config.json and checkpoints/), its checkpoints/
      folder, or one checkpoints/<step> folder.
    use_ema: the EMA parameters (what the paper samples and evaluates with);
      False gives the raw parameters.
    step: a specific checkpoint step (default: the newest).

  Returns:
    A `LoadedModel` for `sample_fn` and `interpolate_fn`.
  """
  config, params, step = checkpointing.load_params(path, use_ema=use_ema, step=step)
  return model_from_config(config, params, step=step, use_ema=use_ema)


_MESHES = {}


def _mesh() -> Mesh:
  devices = tuple(jax.devices())
  if devices not in _MESHES:
    _MESHES[devices] = Mesh(np.asarray(devices), (DATA_AXIS,))
  return _MESHES[devices]


def _validate(model: LoadedModel, sampler: str, num_steps: int | None, eta: float) -> int:
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; valid choices are {', '.join(samplers.SAMPLERS)}.")
  T = model.diffusion.num_timesteps
  num_steps = T if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must lie in [1, {T}] (the model's T), got {num_steps}.")
  if eta < 0:
    raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}.")
  return num_steps


def _sampler_fn(model: LoadedModel, mesh: Mesh, sampler, num_steps, eta, clip_denoised, progressive_every):
  """The compiled sampler for these settings, cached on the model object."""
  key = (id(mesh), sampler, num_steps, eta, clip_denoised, progressive_every)
  if key not in model.cache:
    model.cache[key] = samplers.make_sharded_sampler(
        model.diffusion, model.model.apply, mesh, model.image_shape, sampler=sampler, num_steps=num_steps, eta=eta,
        clip_denoised=clip_denoised, progressive_every=progressive_every, axis=DATA_AXIS)
  return model.cache[key]


def _progress(iterable, total, enabled, desc):
  if not enabled or jax.process_index() != 0:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(iterable, total=total, desc=desc, unit="batch")


def generate(model: LoadedModel, indices: np.ndarray, rng, *, sampler="ancestral", num_steps=None, eta=0.0,
             clip_denoised=True, progressive_every=0, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Samples the images with global indices `indices` (one padded, sharded batch); float outputs in [-1, 1]."""
  mesh = _mesh() if mesh is None else mesh
  num_steps = _validate(model, sampler, num_steps, eta)
  n = len(indices)
  padded = -(-n // mesh.size) * mesh.size
  # Pad with the following indices (their samples are computed and dropped) to fill every device.
  idx = np.concatenate([np.asarray(indices, np.int32), int(np.max(indices)) + 1 + np.arange(padded - n, dtype=np.int32)])
  fn = _sampler_fn(model, mesh, sampler, num_steps, float(eta), bool(clip_denoised), int(progressive_every))
  params = jax.device_put(model.params, NamedSharding(mesh, P()))
  out = fn(params, rng, jax.device_put(idx, NamedSharding(mesh, P(DATA_AXIS))))
  out = jax.experimental.multihost_utils.process_allgather(out, tiled=True)
  return {k: np.asarray(v)[:n] for k, v in out.items()}


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
  mesh = _mesh()
  batch_size = min(-(-batch_size // mesh.size) * mesh.size, -(-num_samples // mesh.size) * mesh.size)
  starts = range(0, num_samples, batch_size)
  out = []
  for start in _progress(starts, len(starts), progress, f"sampling ({sampler}, {num_steps or 'T'} steps)"):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(generate(model, idx, rng, sampler=sampler, num_steps=num_steps, eta=eta,
                        clip_denoised=clip_denoised, mesh=mesh)["samples"])
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

  def model_fn(x_t, tt):
    return model.model.apply({"params": model.params}, x_t, tt, train=False)

  out = samplers.interpolate(model.diffusion, model_fn, rng, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(lambdas),
                             t=t, sampler=sampler, num_steps=num_steps, eta=eta, same_noise=same_noise,
                             clip_denoised=clip_denoised)
  return images_lib.to_uint8(out)


def save_image_grid(images, path: str | os.PathLike, *, ncols: int | None = None, scale: int = 1,
                    overwrite: bool = False) -> epath.Path:
  """Writes uint8 [N, H, W, C] images as one PNG grid; refuses to overwrite an existing file unless asked."""
  return images_lib.save_image(images_lib.make_grid(images, ncols=ncols, scale=scale), path, overwrite=overwrite)


# ----------------------------------------------------------------------------
# --mode=sample: chunked, resumable sample sets.
# ----------------------------------------------------------------------------


def _chunk_name(start: int, stop: int) -> str:
  return f"samples_{start:07d}_{stop:07d}.npz"


def write_sample_chunks(model: LoadedModel, out_dir: str | os.PathLike, num_samples: int, rng, *, sampler: str,
                        num_steps: int | None, eta: float, clip_denoised: bool, chunk_size: int,
                        progress: bool = True) -> list[epath.Path]:
  """Writes samples [0, num_samples) as .npz chunks of `chunk_size`; finished chunks are kept and skipped.

  Each chunk is written to a temporary file and renamed, so an interrupted run
  leaves only whole chunks; running again writes just the missing ones. Sample
  i depends only on (rng, i), so a resumed set equals an uninterrupted one.

  Returns:
    The chunk paths in order.
  """
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mesh = _mesh()
  chunk_size = -(-chunk_size // mesh.size) * mesh.size
  bounds = [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]
  paths = [out_dir / _chunk_name(a, b) for a, b in bounds]
  todo = [(a, b, p) for (a, b), p in zip(bounds, paths) if not p.exists()]
  if len(todo) < len(bounds):
    logging.info("%d of %d sample chunks already in %s; writing the other %d.", len(bounds) - len(todo), len(bounds),
                 out_dir, len(todo))
  for a, b, path in _progress(todo, len(todo), progress, "sample chunks"):
    images = images_lib.to_uint8(generate(model, np.arange(a, b), rng, sampler=sampler, num_steps=num_steps, eta=eta,
                                          clip_denoised=clip_denoised, mesh=mesh)["samples"])
    if jax.process_index() == 0:
      tmp = out_dir / (path.name + ".tmp")
      with tmp.open("wb") as f:
        np.savez(f, images=images, indices=np.arange(a, b))
      tmp.rename(path)
  return paths


def read_sample_chunks(paths) -> np.ndarray:
  return np.concatenate([np.load(epath.Path(p).open("rb"))["images"] for p in paths])


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
