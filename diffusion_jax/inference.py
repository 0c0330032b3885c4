"""Loaded models and sampling on a device mesh: what the command line, the evaluators and the notebook API share.

`LoadedModel` is everything needed to sample (config, parameters, network,
diffusion). `make_sharded_sampler` jits a sampler over a mesh with the
parameters as an argument; `generate` draws the images of given global
indices in one sharded batch, padded to a fixed size so that every batch of a
sample set runs the same compiled program; `generate_set` draws a whole set in
such batches. Sampler settings arrive resolved, as a `samplers.SamplerSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import workdirs
from diffusion_jax.models import unet


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Everything needed to sample: the config, parameters, network and diffusion.

  `class_names` (label i is class_names[i]) is recorded by conditional
  training runs; None for unconditional models or names not recorded.
  """

  config: ml_collections.ConfigDict
  params: Any
  network: unet.UNet
  diffusion: diffusion_lib.GaussianDiffusion
  step: int
  use_ema: bool
  class_names: tuple[str, ...] | None = None
  cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # params on each mesh
  # Compiled samplers (`sampler_fn`): they depend on the network and diffusion, not on the parameters, so
  # models of new parameters of the same network may share this dict (the training loop's evaluations do).
  compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return runtime.image_shape(self.config)

  @property
  def num_classes(self) -> int:
    """K of a class-conditional model (labels 0..K−1; K is the null class), 0 for an unconditional one."""
    return int(self.network.num_classes)

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
  config: ml_collections.ConfigDict, params, *, step: int = 0, use_ema: bool = True, class_names=None, compiled=None
) -> LoadedModel:
  """A `LoadedModel` of `params` in the network and diffusion that `config` describes.

  `compiled`: a dict of compiled samplers to share with other models of the same config (`LoadedModel.compiled`).
  """
  network, diffusion = runtime.build(config)
  names = None if class_names is None else tuple(str(n) for n in class_names)
  if names is not None and len(names) != network.num_classes:
    raise errors.UserError(f"{len(names)} class names given for a model with model.num_classes={network.num_classes}.")
  return LoadedModel(
    config=config,
    params=params,
    network=network,
    diffusion=diffusion,
    step=step,
    use_ema=use_ema,
    class_names=names,
    compiled={} if compiled is None else compiled,
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
    names = workdirs.read_class_names(workdir)
  return model_from_config(config, params, step=step, use_ema=use_ema, class_names=names)


# ----------------------------------------------------------------------------
# Class labels and guidance.
# ----------------------------------------------------------------------------


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


def check_guidance(model: LoadedModel, guidance_scale) -> float:
  scale = float(guidance_scale)
  if not np.isfinite(scale):
    raise errors.UserError(f"guidance_scale must be finite (1 = no guidance), got {guidance_scale!r}.")
  if scale != 1.0 and not model.num_classes:
    raise errors.UserError(
      f"guidance_scale={guidance_scale!r} needs a class-conditional model; this one is unconditional "
      "(use guidance_scale=1.0)."
    )
  return scale


# ----------------------------------------------------------------------------
# Sampling on a mesh.
# ----------------------------------------------------------------------------


def make_sharded_sampler(
  diffusion: diffusion_lib.GaussianDiffusion,
  model_fn: Callable[..., jax.Array],
  mesh: Mesh,
  image_shape: Sequence[int],
  spec: samplers.SamplerSpec,
  *,
  clip_denoised: bool = True,
  progressive_every: int = 0,
  guided: bool = False,
  null_label: int | None = None,
  axis: str = runtime.DATA_AXIS,
) -> Callable[..., dict[str, jax.Array]]:
  """`samplers.sample` jitted over a device mesh, with the parameters as an argument.

  Args:
    diffusion: the diffusion (closed over: plans need its concrete tables).
    model_fn: model_fn(params, x_t, t, cond=None) -> the network output; a
      hashable callable (e.g. `runtime.inference_fn(network)`), so that the
      compiled chain is shared by every parameter set.
    mesh: the device mesh; the batch is sharded over `axis`, parameters replicated.
    image_shape: [H, W, C] of one image.
    spec: the resolved sampler.
    clip_denoised, progressive_every, null_label: as in `samplers.sample`.
    guided: classifier-free guidance with the `guidance_scale` given at each
      call (needs `null_label`); False runs the conditional model as it is.
    axis: the mesh axis of the batch.

  Returns:
    fn(params, rng, indices [N], cond=None, guidance_scale=1.0) -> the dict of
    `samplers.sample`, sharded over `axis`; N must be a multiple of the mesh size; cond:
    [N] labels, sharded like indices (required when `guided`).
  """
  if not isinstance(spec, samplers.SamplerSpec):
    raise errors.UserError(f"spec must be a samplers.SamplerSpec (from samplers.resolve), got {spec!r}.")
  spec = samplers.resolve(spec, num_timesteps=diffusion.num_timesteps)
  samplers.registry.check_mean_type(spec, diffusion.model_mean_type)
  if guided and (isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer))):
    raise errors.UserError(f"guided=True needs null_label, the integer label of the null class, got {null_label!r}.")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  shape_tail = tuple(int(s) for s in image_shape)

  def sharded_sample(params, rng, indices, cond=None, guidance_scale=None):
    return samplers.sample(
      diffusion,
      jax.tree_util.Partial(model_fn, params),
      rng,
      indices,
      (indices.shape[0],) + shape_tail,
      sampler=spec,
      clip_denoised=clip_denoised,
      progressive_every=progressive_every,
      cond=cond,
      guidance_scale=guidance_scale if guided else 1.0,
      null_label=null_label,
    )

  unconditional = jax.jit(sharded_sample, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)
  conditional = jax.jit(
    functools.partial(sharded_sample, guidance_scale=1.0) if not guided else sharded_sample,
    in_shardings=(replicated, replicated, sharded, sharded) + ((replicated,) if guided else ()),
    out_shardings=sharded,
  )

  def sharded_fn(params, rng, indices, cond=None, guidance_scale=1.0):
    if cond is None:
      if guided:
        raise errors.UserError("This sampler was made with guided=True: pass cond=[N] class labels.")
      return unconditional(params, rng, indices)
    if guided:
      return conditional(params, rng, indices, cond, jnp.asarray(guidance_scale, jnp.float32))
    return conditional(params, rng, indices, cond)

  def ahead_of_time(method: str) -> Callable[..., Any]:
    # `trace`/`lower` as on a jitted function (ahead-of-time compilation, lowering for other platforms), with
    # the arguments of `sharded_fn`: the program a call with them would run.
    def fn(params, rng, indices, cond=None, guidance_scale=1.0):
      if cond is None:
        return getattr(conditional if guided else unconditional, method)(params, rng, indices)
      if guided:
        return getattr(conditional, method)(params, rng, indices, cond, guidance_scale)
      return getattr(conditional, method)(params, rng, indices, cond)

    return fn

  sharded_fn.lower = ahead_of_time("lower")
  sharded_fn.trace = ahead_of_time("trace")
  sharded_fn.spec = spec
  return sharded_fn


def sampler_fn(
  model: LoadedModel,
  mesh: Mesh,
  spec: samplers.SamplerSpec,
  clip_denoised: bool,
  progressive_every: int,
  guided: bool = False,
):
  """The compiled sampler for these settings, cached in `model.compiled`."""
  key = (id(mesh), spec, clip_denoised, progressive_every, guided)
  if key not in model.compiled:
    model.compiled[key] = make_sharded_sampler(
      model.diffusion,
      runtime.inference_fn(model.network),
      mesh,
      model.image_shape,
      spec,
      clip_denoised=clip_denoised,
      progressive_every=progressive_every,
      guided=guided,
      null_label=model.network.null_label if guided else None,
    )
  return model.compiled[key]


def padded_size(n: int, mesh: Mesh, batch_size: int | None = None) -> int:
  """The rows of a sharded batch of n examples: `batch_size` (default n), at least n, rounded up to a multiple of
  the mesh's data size."""
  batch_size = n if batch_size is None else max(int(batch_size), n)
  return runtime.pad_to_multiple(batch_size, runtime.data_size(mesh))


def _labels_of(model: LoadedModel, indices: np.ndarray, labels) -> np.ndarray | None:
  """[n] int32 labels of a conditional model (None: index mod K); None for an unconditional one."""
  if model.num_classes:
    if labels is None:  # sample i is of class i mod K
      labels = np.asarray(indices) % model.num_classes
    return np.asarray(labels, np.int32)
  if labels is not None:
    resolve_labels(model, labels, len(indices))  # raises: labels for an unconditional model
  return None


def generate(
  model: LoadedModel,
  indices: np.ndarray,
  rng,
  spec: samplers.SamplerSpec,
  *,
  clip_denoised=True,
  progressive_every=0,
  labels=None,
  guidance_scale=1.0,
  batch_size: int | None = None,
  mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
  """Samples the images with global indices `indices` in one sharded batch; float outputs in [-1, 1].

  The batch is padded to `batch_size` (default: len(indices)), rounded up to a
  multiple of the mesh size, with the indices that follow; their samples are
  computed and dropped. Padding every batch of a sample set to the same size
  runs one compiled program for all of them. `labels` ([len(indices)] int
  labels of a conditional model, None for index mod K) and `guidance_scale`
  as in `resolve_labels` and `check_guidance`.
  """
  mesh = runtime.make_mesh() if mesh is None else mesh
  scale = check_guidance(model, guidance_scale)
  n = len(indices)
  padded = padded_size(n, mesh, batch_size)
  pad = int(np.max(indices)) + 1 + np.arange(padded - n, dtype=np.int32)
  idx = np.concatenate([np.asarray(indices, np.int32), pad])
  sharding = runtime.batch_sharding(mesh)
  args = (model.params_on(mesh), rng, jax.device_put(idx, sharding))
  kwargs = {}
  cond = _labels_of(model, indices, labels)
  if cond is not None:
    cond = np.concatenate([cond, np.zeros((padded - n,), np.int32)])
    kwargs = dict(cond=jax.device_put(cond, sharding), guidance_scale=scale)
  fn = sampler_fn(model, mesh, spec, bool(clip_denoised), int(progressive_every), guided=scale != 1.0)
  out = fn(*args, **kwargs)
  return {k: v[:n] for k, v in runtime.to_host(out).items()}


def generate_set(
  model: LoadedModel,
  num_samples: int,
  rng,
  spec: samplers.SamplerSpec,
  *,
  clip_denoised=True,
  labels=None,
  guidance_scale=1.0,
  batch_size: int | None = None,
  progress: bool = False,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """uint8 [num_samples, H, W, C]: samples 0..num_samples−1 in batches of `batch_size` (default:
  config.sampling.batch_size), every batch padded to the same size; sample i depends only on (rng, i, its
  label). `labels` as in `resolve_labels`; `mesh`: default all devices."""
  all_labels = resolve_labels(model, labels, int(num_samples))
  mesh = runtime.make_mesh() if mesh is None else mesh
  size = runtime.data_size(mesh)
  batch_size = int(batch_size or model.config.sampling.batch_size)
  batch_size = min(runtime.pad_to_multiple(batch_size, size), runtime.pad_to_multiple(num_samples, size))
  starts = range(0, num_samples, batch_size)
  out = []
  for start in runtime.progress_bar(starts, len(starts), progress, f"sampling ({spec.folder_name})"):
    idx = np.arange(start, min(start + batch_size, num_samples))
    out.append(
      generate(
        model,
        idx,
        rng,
        spec,
        clip_denoised=clip_denoised,
        labels=None if all_labels is None else all_labels[idx],
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        mesh=mesh,
      )["samples"]
    )
  return images_lib.to_uint8(np.concatenate(out))


# ----------------------------------------------------------------------------
# Every other chain on the mesh: denoising (SDEdit, decoding, interpolation), inpainting (every sampler and
# RePaint), DDIM inversion. One door: `run_on_mesh`.
# ----------------------------------------------------------------------------


def pad_rows(x: np.ndarray, padded: int) -> np.ndarray:
  """x [n, ...] with its last row repeated up to `padded` rows (rows whose results are dropped)."""
  x = np.asarray(x)
  if x.shape[0] == padded:
    return x
  return np.concatenate([x, np.repeat(x[-1:], padded - x.shape[0], axis=0)])


def run_on_mesh(
  model: LoadedModel,
  key: tuple,
  fn: Callable[..., dict[str, jax.Array]],
  batched: Sequence[np.ndarray],
  replicated: Sequence[Any] = (),
  *,
  mesh: Mesh | None = None,
  batch_size: int | None = None,
) -> dict[str, np.ndarray]:
  """fn(params, *replicated, *batched) jitted over the mesh; its outputs [n, ...] on the host.

  The `batched` arrays ([n, ...] each) are padded to `padded_size(n, mesh, batch_size)` rows (the last row
  repeated; those rows' results are dropped) and sharded over the data axis; the parameters and `replicated`
  are held whole on every device. `fn` returns a dict of batch-first arrays. The compiled program is cached in
  `model.compiled` under (`key`, the mesh): `key` names everything `fn` closes over.
  """
  mesh = runtime.make_mesh() if mesh is None else mesh
  n = int(np.shape(batched[0])[0])
  padded = padded_size(n, mesh, batch_size)
  cache_key = ("chain", id(mesh), key, len(replicated), len(batched))
  if cache_key not in model.compiled:
    whole, split = runtime.replicated(mesh), runtime.batch_sharding(mesh)
    model.compiled[cache_key] = jax.jit(
      fn, in_shardings=(whole,) * (1 + len(replicated)) + (split,) * len(batched), out_shardings=split
    )
  sharding = runtime.batch_sharding(mesh)
  rows = [jax.device_put(pad_rows(x, padded), sharding) for x in batched]
  out = model.compiled[cache_key](model.params_on(mesh), *replicated, *rows)
  return {k: v[:n] for k, v in runtime.to_host(out).items()}


def _guidance_inputs(model: LoadedModel, labels: np.ndarray | None, guidance_scale) -> tuple[list, list, bool]:
  """([cond] or [], [scale] or [], guided): the batched labels and replicated scale of a chain's call."""
  scale = check_guidance(model, guidance_scale)
  if labels is None:
    return [], [], False
  guided = scale != 1.0
  return [np.asarray(labels, np.int32)], ([np.float32(scale)] if guided else []), guided


def _chain_args(model: LoadedModel, guided: bool, num_scale: int, num_inputs: int, args: tuple) -> tuple:
  """(the chain's `num_inputs` batched inputs, its guidance keywords) of a chain's traced arguments, which
  `run_on_mesh` passes as (*scale, *inputs, *cond)."""
  inputs = args[num_scale : num_scale + num_inputs]
  return inputs, _guidance_kwargs(model, guided, args[:num_scale] + args[num_scale + num_inputs :])


def _guidance_kwargs(model: LoadedModel, guided: bool, scale_and_cond: tuple) -> dict:
  """The samplers' cond/guidance_scale/null_label of a chain's traced (scale, cond) arguments."""
  if not scale_and_cond:
    return {}
  if guided:
    scale, cond = scale_and_cond
    return dict(cond=cond, guidance_scale=scale, null_label=model.network.null_label)
  (cond,) = scale_and_cond
  return dict(cond=cond)


def denoise(
  model: LoadedModel,
  x: np.ndarray,
  rng,
  spec: samplers.SamplerSpec,
  *,
  t: int,
  indices: np.ndarray,
  edit: bool = False,
  clip_denoised: bool = True,
  labels: np.ndarray | None = None,
  guidance_scale=1.0,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """[n, ...] images from latents x [n, ...] at timestep t (`samplers.denoise`), or from images x diffused to t
  first (`edit`: SDEdit, `samplers.edit`), sharded over the mesh; example i depends on (rng, indices[i]) only.

  `labels`: [n] int32 (conditional models; the null class for the unconditional density), None otherwise.
  """
  cond, scale, guided = _guidance_inputs(model, labels, guidance_scale)
  chain = samplers.edit if edit else samplers.denoise
  model_fn = runtime.inference_fn(model.network)
  diffusion = model.diffusion

  def fn(params, rng, *args):
    (indices, x), guidance = _chain_args(model, guided, len(scale), 2, args)
    return chain(
      diffusion,
      jax.tree_util.Partial(model_fn, params),
      rng,
      indices,
      x,
      t=t,
      sampler=spec,
      clip_denoised=clip_denoised,
      **guidance,
    )

  key = ("edit" if edit else "denoise", spec, int(t), bool(clip_denoised), bool(cond), guided)
  batched = [np.asarray(indices, np.int32), np.asarray(x, np.float32)] + cond
  return run_on_mesh(model, key, fn, batched, [rng] + scale, mesh=mesh)["samples"]


def inpaint(
  model: LoadedModel,
  x0: np.ndarray,
  mask: np.ndarray,
  rng,
  spec: samplers.SamplerSpec,
  *,
  indices: np.ndarray,
  clip_denoised: bool = True,
  labels: np.ndarray | None = None,
  guidance_scale=1.0,
  repaint: dict | None = None,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """[n, ...] images inpainted where mask [n, ...] (bool, True = keep) is False (`samplers.inpaint`), or with
  RePaint's resampling (`repaint`: dict(timesteps, jump_length, jump_n_sample, resample_range) of
  `samplers.repaint.repaint`), sharded over the mesh; example i depends on (rng, indices[i]) only."""
  cond, scale, guided = _guidance_inputs(model, labels, guidance_scale)
  model_fn = runtime.inference_fn(model.network)
  diffusion = model.diffusion
  options = None if repaint is None else tuple(sorted((k, _hashable(v)) for k, v in repaint.items()))

  def fn(params, rng, *args):
    (indices, x0, mask), guidance = _chain_args(model, guided, len(scale), 3, args)
    bound = jax.tree_util.Partial(model_fn, params)
    if repaint is None:
      return samplers.inpaint(
        diffusion, bound, rng, indices, x0, mask, sampler=spec, clip_denoised=clip_denoised, **guidance
      )
    out = samplers.repaint.repaint(
      diffusion, bound, rng, indices, x0, mask, clip_denoised=clip_denoised, **repaint, **guidance
    )
    return dict(samples=out["samples"])

  key = ("inpaint", spec, options, bool(clip_denoised), bool(cond), guided)
  batched = [np.asarray(indices, np.int32), np.asarray(x0, np.float32), np.asarray(mask, bool)] + cond
  return run_on_mesh(model, key, fn, batched, [rng] + scale, mesh=mesh)["samples"]


def invert(
  model: LoadedModel,
  x0: np.ndarray,
  spec: samplers.SamplerSpec,
  *,
  clip_denoised: bool = False,
  network_t: str = "target",
  labels: np.ndarray | None = None,
  guidance_scale=1.0,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """[n, ...] DDIM latents of images x0 [n, ...] (`samplers.invert`), sharded over the mesh."""
  cond, scale, guided = _guidance_inputs(model, labels, guidance_scale)
  model_fn = runtime.inference_fn(model.network)
  diffusion = model.diffusion

  def fn(params, *args):
    (x0,), guidance = _chain_args(model, guided, len(scale), 1, args)
    out = samplers.invert(
      diffusion,
      jax.tree_util.Partial(model_fn, params),
      x0,
      spec,
      clip_denoised=clip_denoised,
      network_t=network_t,
      **guidance,
    )
    return dict(latents=out["latents"])

  key = ("invert", spec, bool(clip_denoised), network_t, bool(cond), guided)
  return run_on_mesh(model, key, fn, [np.asarray(x0, np.float32)] + cond, scale, mesh=mesh)["latents"]


def _hashable(v):
  if isinstance(v, (list, tuple, np.ndarray)):
    return tuple(_hashable(x) for x in np.asarray(v).tolist()) if np.ndim(v) else v.item()
  return v
