"""Loaded models and sample generation below the user-facing API: one padded batch, and resumable sample sets.

`LoadedModel` is everything needed to sample (config, parameters, network,
diffusion). `generate` draws the images of given global indices in one
sharded batch, padded to a fixed size so that every batch of a sample set runs
the same compiled program; `write_sample_chunks` writes a whole sample set as
`.npz` chunks that survive interruption. `--mode=sample`, FID and the notebook
API (`diffusion_jax.sampling`) all use these.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import images as images_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.models import unet


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
    return runtime.image_shape(self.config)

  def params_on(self, mesh: Mesh) -> Any:
    """The parameters replicated on `mesh`, transferred once per mesh."""
    key = ("params", id(mesh))
    if key not in self.cache:
      self.cache[key] = runtime.put_replicated(self.params, mesh)
    return self.cache[key]

  def __repr__(self):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    return (f"LoadedModel(dataset={self.config.data.dataset!r}, image_shape={self.image_shape}, "
            f"params={n:,}, step={self.step}, ema={self.use_ema}, T={self.diffusion.num_timesteps})")


def model_from_config(config: ml_collections.ConfigDict, params, *, step: int = 0, use_ema: bool = True) -> LoadedModel:
  """A `LoadedModel` of `params` in the network and diffusion that `config` describes."""
  network, diffusion = runtime.build(config)
  return LoadedModel(config=config, params=params, model=network, diffusion=diffusion, step=step, use_ema=use_ema)


def load_model(path: str | os.PathLike, *, use_ema: bool = True, step: int | None = None) -> LoadedModel:
  """Loads a model from a training workdir or a converted checkpoint directory.

  Args:
    path: a workdir (with config.json and checkpoints/), its checkpoints/
      folder, or one checkpoints/<step> folder.
    use_ema: the EMA parameters (what the paper samples and evaluates with);
      False gives the raw parameters.
    step: a specific checkpoint step (default: the newest).

  Returns:
    A `LoadedModel` for sampling.
  """
  config, params, step = checkpointing.load_params(path, use_ema=use_ema, step=step)
  return model_from_config(config, params, step=step, use_ema=use_ema)


def validate_sampler(model: LoadedModel, sampler: str, num_steps: int | None, eta: float) -> int:
  """The number of steps of a sampler setting for this model; ValueError names the valid choices."""
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; valid choices are {', '.join(samplers.SAMPLERS)}.")
  T = model.diffusion.num_timesteps
  num_steps = T if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must lie in [1, {T}] (the model's T), got {num_steps}.")
  if eta < 0:
    raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}.")
  return num_steps


def sampler_fn(model: LoadedModel, mesh: Mesh, sampler, num_steps, eta, clip_denoised, progressive_every):
  """The compiled sampler for these settings, cached on the model object."""
  key = (id(mesh), sampler, num_steps, eta, clip_denoised, progressive_every)
  if key not in model.cache:
    model.cache[key] = samplers.make_sharded_sampler(
        model.diffusion, model.model.apply, mesh, model.image_shape, sampler=sampler, num_steps=num_steps, eta=eta,
        clip_denoised=clip_denoised, progressive_every=progressive_every, axis=runtime.DATA_AXIS)
  return model.cache[key]


def generate(model: LoadedModel, indices: np.ndarray, rng, *, sampler="ancestral", num_steps=None, eta=0.0,
             clip_denoised=True, progressive_every=0, batch_size: int | None = None,
             mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Samples the images with global indices `indices` in one sharded batch; float outputs in [-1, 1].

  The batch is padded to `batch_size` (default: len(indices)), rounded up to a
  multiple of the mesh size, with the indices that follow; their samples are
  computed and dropped. Padding every batch of a sample set to the same size
  runs one compiled program for all of them.
  """
  mesh = runtime.make_mesh() if mesh is None else mesh
  num_steps = validate_sampler(model, sampler, num_steps, eta)
  n = len(indices)
  batch_size = n if batch_size is None else max(int(batch_size), n)
  padded = runtime.pad_to_multiple(batch_size, runtime.data_size(mesh))
  idx = np.concatenate([np.asarray(indices, np.int32), int(np.max(indices)) + 1 + np.arange(padded - n, dtype=np.int32)])
  fn = sampler_fn(model, mesh, sampler, num_steps, float(eta), bool(clip_denoised), int(progressive_every))
  out = fn(model.params_on(mesh), rng, jax.device_put(idx, runtime.batch_sharding(mesh)))
  return {k: v[:n] for k, v in runtime.to_host(out).items()}


def progress_bar(iterable, total, enabled, desc):
  """A tqdm bar over `iterable` on process 0 when `enabled`."""
  if not enabled or jax.process_index() != 0:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(iterable, total=total, desc=desc, unit="batch")


def _chunk_name(start: int, stop: int) -> str:
  return f"samples_{start:07d}_{stop:07d}.npz"


def write_sample_chunks(model: LoadedModel, out_dir: str | os.PathLike, num_samples: int, rng, *, sampler: str,
                        num_steps: int | None, eta: float, clip_denoised: bool, chunk_size: int,
                        progress: bool = True) -> list[epath.Path]:
  """Writes samples [0, num_samples) as .npz chunks of `chunk_size`; finished chunks are kept and skipped.

  Each chunk is written to a temporary file and renamed, so an interrupted run
  leaves only whole chunks; running again writes just the missing ones. Sample
  i depends only on (rng, i), so a resumed set equals an uninterrupted one.
  Every chunk, the last partial one included, runs the same compiled program.

  Returns:
    The chunk paths in order.
  """
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mesh = runtime.make_mesh()
  chunk_size = runtime.pad_to_multiple(chunk_size, runtime.data_size(mesh))
  bounds = [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]
  paths = [out_dir / _chunk_name(a, b) for a, b in bounds]
  todo = [(a, b, p) for (a, b), p in zip(bounds, paths) if not p.exists()]
  if len(todo) < len(bounds):
    logging.info("%d of %d sample chunks already in %s; writing the other %d.", len(bounds) - len(todo), len(bounds),
                 out_dir, len(todo))
  for a, b, path in progress_bar(todo, len(todo), progress, "sample chunks"):
    images = images_lib.to_uint8(generate(model, np.arange(a, b), rng, sampler=sampler, num_steps=num_steps, eta=eta,
                                          clip_denoised=clip_denoised, batch_size=chunk_size, mesh=mesh)["samples"])
    if jax.process_index() == 0:
      buf = io.BytesIO()
      np.savez(buf, images=images, indices=np.arange(a, b))
      runtime.atomic_write(path, buf.getvalue())
  return paths


def read_sample_chunks(paths) -> np.ndarray:
  """The uint8 images of chunk files, concatenated in order."""
  return np.concatenate([np.load(epath.Path(p).open("rb"))["images"] for p in paths])
