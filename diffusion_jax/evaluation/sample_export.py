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
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.models import unet

# The sampler settings every entry point takes besides the sampler's name (see `samplers.resolve`).
SAMPLER_SETTINGS = ("num_steps", "eta", "timestep_spacing", "sigma_schedule", "order", "lower_order_final")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Everything needed to sample: the config, parameters, network and diffusion.

  `class_names` (label i is class_names[i]) is recorded by conditional
  training runs; None for unconditional models or names not recorded.
  """

  config: ml_collections.ConfigDict
  params: Any
  model: unet.UNet
  diffusion: diffusion_lib.GaussianDiffusion
  step: int
  use_ema: bool
  class_names: tuple[str, ...] | None = None
  cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return runtime.image_shape(self.config)

  @property
  def num_classes(self) -> int:
    """K of a class-conditional model (labels 0..K−1; K is the null class), 0 for an unconditional one."""
    return int(self.model.num_classes)

  def params_on(self, mesh: Mesh) -> Any:
    """The parameters replicated on `mesh`, transferred once per mesh."""
    key = ("params", id(mesh))
    if key not in self.cache:
      self.cache[key] = runtime.put_replicated(self.params, mesh)
    return self.cache[key]

  def __repr__(self):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    classes = f", classes={self.num_classes}" if self.num_classes else ""
    return (
      f"LoadedModel(dataset={self.config.data.dataset!r}, image_shape={self.image_shape}, "
      f"params={n:,}, step={self.step}, ema={self.use_ema}, T={self.diffusion.num_timesteps}{classes})"
    )


def model_from_config(
  config: ml_collections.ConfigDict, params, *, step: int = 0, use_ema: bool = True, class_names=None
) -> LoadedModel:
  """A `LoadedModel` of `params` in the network and diffusion that `config` describes."""
  network, diffusion = runtime.build(config)
  names = None if class_names is None else tuple(str(n) for n in class_names)
  if names is not None and len(names) != network.num_classes:
    raise errors.UserError(f"{len(names)} class names given for a model with model.num_classes={network.num_classes}.")
  return LoadedModel(
    config=config, params=params, model=network, diffusion=diffusion, step=step, use_ema=use_ema, class_names=names
  )


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
  names = None
  if int(config.model.get("num_classes", 0) or 0):
    workdir, _ = checkpointing._find_workdir(epath.Path(path))  # pylint: disable=protected-access
    names = checkpointing.read_class_names(workdir)
  return model_from_config(config, params, step=step, use_ema=use_ema, class_names=names)


# ----------------------------------------------------------------------------
# Sampler settings and class labels: resolved and validated here for every entry point.
# ----------------------------------------------------------------------------


def resolve_sampler(num_timesteps: int, sampler="ancestral", **settings) -> samplers.SamplerSpec:
  """The validated `SamplerSpec` of a sampler name and its settings (`SAMPLER_SETTINGS`); a spec passes through.

  `sample_fn`, `progressive_fn`, `interpolate_fn`, `--mode=sample`, the
  training grids and FID all resolve their sampler here, so names, checks,
  defaults and folder names (`SamplerSpec.folder_name`) are the same
  everywhere. Raises ValueError naming the bad setting and the valid choices.
  """
  unknown = sorted(set(settings) - set(SAMPLER_SETTINGS))
  if unknown:
    raise errors.UserError(f"Unknown sampler settings {unknown}; valid settings are {', '.join(SAMPLER_SETTINGS)}.")
  if isinstance(sampler, samplers.SamplerSpec):
    given = [k for k, v in settings.items() if v not in (None, 0, 0.0) or (k == "num_steps" and v is not None)]
    if given:
      raise errors.UserError(
        f"Pass either a SamplerSpec or sampler settings, not both (got {', '.join(given)} with a spec)."
      )
    return samplers.resolve(sampler, num_timesteps=num_timesteps)
  eta = settings.get("eta")
  return samplers.resolve(
    sampler,
    num_timesteps=num_timesteps,
    num_steps=settings.get("num_steps"),
    eta=None if eta is None else float(eta),
    timestep_spacing=settings.get("timestep_spacing"),
    sigma_schedule=settings.get("sigma_schedule"),
    order=settings.get("order"),
    lower_order_final=settings.get("lower_order_final"),
  )


def sampler_from_config(sampling_config: ml_collections.ConfigDict, num_timesteps: int) -> samplers.SamplerSpec:
  """The `SamplerSpec` of a config's `sampling` section ('' and 0 fields take the sampler's defaults)."""
  sc = sampling_config
  get = lambda k: sc.get(k) or None  # noqa: E731
  return resolve_sampler(
    num_timesteps,
    sc.sampler,
    num_steps=get("num_steps"),
    eta=float(sc.get("eta", 0.0)),
    timestep_spacing=get("timestep_spacing"),
    sigma_schedule=get("sigma_schedule"),
    order=get("order"),
  )


def validate_sampler(model: LoadedModel, sampler, num_steps: int | None = None, eta: float = 0.0) -> int:
  """The number of steps of a sampler setting for this model; ValueError names the valid choices."""
  return resolve_sampler(model.diffusion.num_timesteps, sampler, num_steps=num_steps, eta=eta).num_steps


def resolve_labels(model: LoadedModel, labels, num_samples: int) -> np.ndarray | None:
  """[num_samples] int32 class labels for a conditional model, None for an unconditional one.

  Args:
    model: the model.
    labels: None (sample i gets class i mod K: equal numbers per class), one
      int or class name (every sample), or a sequence of num_samples ints or
      class names (`model.class_names`).
    num_samples: the number of samples.

  Raises:
    ValueError: labels for an unconditional model, unknown names, labels
      outside [0, K), or a sequence of the wrong length.
  """
  k = model.num_classes
  if not k:
    if labels is not None:
      raise errors.UserError(
        "labels= applies to class-conditional models (model.num_classes > 0); this model is "
        "unconditional: leave labels=None."
      )
    return None
  if labels is None:
    return (np.arange(num_samples) % k).astype(np.int32)
  names = model.class_names or ()

  def one(v):
    if isinstance(v, (str, np.str_)):
      v = str(v).strip()
      if v in names:
        return names.index(v)
      if v.lstrip("-").isdigit():
        return one(int(v))
      raise errors.UserError(
        f"Unknown class name {v!r}; the model's classes are "
        f"{', '.join(names) if names else '(no names recorded) 0..' + str(k - 1)}."
      )
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise errors.UserError(f"Class labels must be ints in [0, {k}) or class names, got {v!r}.")
    if not 0 <= int(v) < k:
      raise errors.UserError(f"Class label {int(v)} is outside [0, {k}) (the model has {k} classes).")
    return int(v)

  if isinstance(labels, (str, np.str_, int, np.integer)) and not isinstance(labels, (bool, np.bool_)):
    return np.full((num_samples,), one(labels), np.int32)
  values = [one(v) for v in np.asarray(labels).reshape(-1).tolist()]
  if len(values) != num_samples:
    raise errors.UserError(
      f"labels has {len(values)} entries for {num_samples} samples: give one label per sample, or one label for all."
    )
  return np.asarray(values, np.int32)


def _check_guidance(model: LoadedModel, guidance_scale) -> float:
  scale = float(guidance_scale)
  if not np.isfinite(scale):
    raise errors.UserError(f"guidance_scale must be finite (1 = no guidance), got {guidance_scale!r}.")
  if scale != 1.0 and not model.num_classes:
    raise errors.UserError(
      f"guidance_scale={guidance_scale!r} needs a class-conditional model; this one is unconditional "
      "(use guidance_scale=1.0)."
    )
  return scale


def sampler_fn(
  model: LoadedModel,
  mesh: Mesh,
  spec: samplers.SamplerSpec,
  clip_denoised: bool,
  progressive_every: int,
  guided: bool = False,
):
  """The compiled sampler for these settings, cached on the model object."""
  key = (id(mesh), spec, clip_denoised, progressive_every, guided)
  if key not in model.cache:
    model.cache[key] = samplers.make_sharded_sampler(
      model.diffusion,
      runtime.inference_fn(model.model),
      mesh,
      model.image_shape,
      sampler=spec,
      clip_denoised=clip_denoised,
      progressive_every=progressive_every,
      axis=runtime.DATA_AXIS,
      guided=guided,
      null_label=model.model.null_label if guided else None,
    )
  return model.cache[key]


def generate(
  model: LoadedModel,
  indices: np.ndarray,
  rng,
  *,
  sampler="ancestral",
  clip_denoised=True,
  progressive_every=0,
  labels=None,
  guidance_scale=1.0,
  batch_size: int | None = None,
  mesh: Mesh | None = None,
  **settings,
) -> dict[str, np.ndarray]:
  """Samples the images with global indices `indices` in one sharded batch; float outputs in [-1, 1].

  The batch is padded to `batch_size` (default: len(indices)), rounded up to a
  multiple of the mesh size, with the indices that follow; their samples are
  computed and dropped. Padding every batch of a sample set to the same size
  runs one compiled program for all of them. `labels` ([len(indices)] int
  labels of a conditional model, None for index mod K) and `guidance_scale`
  as in `resolve_labels`; **settings as in `resolve_sampler`.
  """
  mesh = runtime.make_mesh() if mesh is None else mesh
  spec = resolve_sampler(model.diffusion.num_timesteps, sampler, **settings)
  scale = _check_guidance(model, guidance_scale)
  n = len(indices)
  batch_size = n if batch_size is None else max(int(batch_size), n)
  padded = runtime.pad_to_multiple(batch_size, runtime.data_size(mesh))
  pad = int(np.max(indices)) + 1 + np.arange(padded - n, dtype=np.int32)
  idx = np.concatenate([np.asarray(indices, np.int32), pad])
  sharding = runtime.batch_sharding(mesh)
  args = (model.params_on(mesh), rng, jax.device_put(idx, sharding))
  kwargs = {}
  if model.num_classes:
    if labels is None:  # sample i is of class i mod K
      labels = np.asarray(indices) % model.num_classes
    cond = np.concatenate([np.asarray(labels, np.int32), np.zeros((padded - n,), np.int32)])
    kwargs = dict(cond=jax.device_put(cond, sharding), guidance_scale=scale)
  elif labels is not None:
    resolve_labels(model, labels, n)  # raises: labels for an unconditional model
  fn = sampler_fn(model, mesh, spec, bool(clip_denoised), int(progressive_every), guided=scale != 1.0)
  out = fn(*args, **kwargs)
  return {k: v[:n] for k, v in runtime.to_host(out).items()}


def generate_set(
  model: LoadedModel,
  num_samples: int,
  rng,
  *,
  sampler="ancestral",
  clip_denoised=True,
  labels=None,
  guidance_scale=1.0,
  batch_size: int | None = None,
  progress: bool = False,
  **settings,
) -> np.ndarray:
  """uint8 [num_samples, H, W, C]: samples 0..num_samples−1 in batches of `batch_size` (default:
  config.sampling.batch_size), every batch padded to the same size; sample i depends only on (rng, i, its
  label). `labels` as in `resolve_labels`; **settings as in `resolve_sampler`."""
  spec = resolve_sampler(model.diffusion.num_timesteps, sampler, **settings)
  all_labels = resolve_labels(model, labels, int(num_samples))
  mesh = runtime.make_mesh()
  size = runtime.data_size(mesh)
  batch_size = int(batch_size or model.config.sampling.batch_size)
  batch_size = min(runtime.pad_to_multiple(batch_size, size), runtime.pad_to_multiple(num_samples, size))
  starts = range(0, num_samples, batch_size)
  out = []
  for start in progress_bar(starts, len(starts), progress, f"sampling ({spec.folder_name})"):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(
      generate(
        model,
        idx,
        rng,
        sampler=spec,
        clip_denoised=clip_denoised,
        labels=None if all_labels is None else all_labels[idx],
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        mesh=mesh,
      )["samples"]
    )
  return images_lib.to_uint8(np.concatenate(out))


def progress_bar(iterable, total, enabled, desc):
  """A tqdm bar over `iterable` on process 0 when `enabled`."""
  if not enabled or jax.process_index() != 0:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(iterable, total=total, desc=desc, unit="batch")


def _chunk_name(start: int, stop: int) -> str:
  return f"samples_{start:07d}_{stop:07d}.npz"


def write_sample_chunks(
  model: LoadedModel,
  out_dir: str | os.PathLike,
  num_samples: int,
  rng,
  *,
  sampler,
  clip_denoised: bool,
  chunk_size: int,
  labels=None,
  guidance_scale: float = 1.0,
  progress: bool = True,
  **settings,
) -> list[epath.Path]:
  """Writes samples [0, num_samples) as .npz chunks of `chunk_size`; finished chunks are kept and skipped.

  Each chunk is written to a temporary file and renamed, so an interrupted run
  leaves only whole chunks; running again writes just the missing ones. Sample
  i depends only on (rng, i, its label), so a resumed set equals an
  uninterrupted one. Every chunk, the last partial one included, runs the same
  compiled program. Conditional models: `labels` as in `resolve_labels` (None:
  sample i is of class i mod K), stored in each chunk as `labels`.

  Returns:
    The chunk paths in order.
  """
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mesh = runtime.make_mesh()
  spec = resolve_sampler(model.diffusion.num_timesteps, sampler, **settings)
  all_labels = resolve_labels(model, labels, num_samples)
  chunk_size = runtime.pad_to_multiple(chunk_size, runtime.data_size(mesh))
  bounds = [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]
  paths = [out_dir / _chunk_name(a, b) for a, b in bounds]
  todo = [(a, b, p) for (a, b), p in zip(bounds, paths) if not p.exists()]
  if len(todo) < len(bounds):
    logging.info(
      "%d of %d sample chunks already in %s; writing the other %d.",
      len(bounds) - len(todo),
      len(bounds),
      out_dir,
      len(todo),
    )
  for a, b, path in progress_bar(todo, len(todo), progress, "sample chunks"):
    chunk_labels = None if all_labels is None else all_labels[a:b]
    images = images_lib.to_uint8(
      generate(
        model,
        np.arange(a, b),
        rng,
        sampler=spec,
        clip_denoised=clip_denoised,
        labels=chunk_labels,
        guidance_scale=guidance_scale,
        batch_size=chunk_size,
        mesh=mesh,
      )["samples"]
    )
    if jax.process_index() == 0:
      buf = io.BytesIO()
      extra = {} if chunk_labels is None else {"labels": chunk_labels}
      np.savez(buf, images=images, indices=np.arange(a, b), **extra)
      runtime.atomic_write(path, buf.getvalue())
  return paths


def read_sample_chunks(paths, *, with_labels: bool = False):
  """The uint8 images of chunk files, concatenated in order (and their labels, None if unconditional)."""
  images, labels = [], []
  for p in paths:
    with np.load(epath.Path(p).open("rb")) as f:
      images.append(f["images"])
      labels.append(f["labels"] if "labels" in f.files else None)
  images = np.concatenate(images)
  if not with_labels:
    return images
  return images, (None if any(l is None for l in labels) else np.concatenate(labels))
