"""The samplers' argument checks, in one place: each raises a `UserError` that names the argument and the fix.

Arrays may be traced (the public functions run inside `jax.jit` on a mesh): a check of values applies where
they are concrete, a check of shapes and dtypes always.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.conditioning import ClassLabels
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.request import UNGUIDED
from diffusion_jax.samplers.request import Guidance
from diffusion_jax.samplers.request import Request


def maybe_concrete(x):
  """x as a NumPy array, or None if it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def spec_and_eta(diffusion, sampler, eta):
  """(spec, η): `sampler` (a SamplerSpec, or a name taken with its defaults) checked against the diffusion, and η:
  the spec's when `eta` is None, else `eta` (possibly traced) for a sampler that has one."""
  spec = registry.resolve(sampler, num_timesteps=diffusion.num_timesteps)
  registry.check_mean_type(spec, diffusion.model_mean_type)
  if eta is None:
    return spec, spec.eta
  value = maybe_concrete(eta)
  if value is not None:
    if value.ndim != 0 or not np.isfinite(value) or value < 0:
      raise errors.UserError(f"eta must be a finite scalar >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}.")
    if value == spec.eta:
      return spec, spec.eta
  if not spec.sampler.has_eta:
    raise errors.UserError(
      f"eta={eta!r} applies only to samplers with an eta (ddim); {spec.name!r} has none: leave eta=None."
    )
  return spec, eta


def flags(clip_denoised, progressive_every) -> tuple[bool, int]:
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise errors.UserError(f"clip_denoised must be a bool, got {clip_denoised!r}.")
  if (
    isinstance(progressive_every, bool) or not isinstance(progressive_every, (int, np.integer)) or progressive_every < 0
  ):
    raise errors.UserError(f"progressive_every must be an integer >= 0 (0 = off), got {progressive_every!r}.")
  return bool(clip_denoised), int(progressive_every)


def indices(values, batch: int) -> None:
  if jnp.ndim(values) != 1 or jnp.shape(values)[0] != batch:
    raise errors.UserError(
      f"indices must have shape [B] = [{batch}] (the global index of each sample), got shape {jnp.shape(values)}."
    )
  if not jnp.issubdtype(jnp.result_type(values), jnp.integer):
    raise errors.UserError(f"indices must be integers (global sample indices), got dtype {jnp.result_type(values)}.")


def timestep(t, num_timesteps: int) -> int:
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < num_timesteps:
    raise errors.UserError(
      f"t must be a Python integer in [0, {num_timesteps}) (the timestep to start from), got {t!r}."
    )
  return int(t)


def batched_float(x, name: str, what: str = " in [-1, 1]") -> None:
  """`x` must be a batched float array [B, ...] (images, or latents with what='')."""
  if jnp.ndim(x) < 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise errors.UserError(
      f"{name} must be a batched float array [B, ...]{what}, got shape {jnp.shape(x)}, dtype {jnp.result_type(x)}."
    )


def mask(values, shape: tuple[int, ...]) -> jax.Array:
  """[B, ...] bool of `shape` from a 0/1 (or bool) mask of the images' shape or missing trailing axes of size 1."""
  mask_shape = tuple(jnp.shape(values))
  mask_shape = mask_shape + (1,) * (len(shape) - len(mask_shape))
  if (
    len(mask_shape) != len(shape)
    or any(m not in (1, s) for m, s in zip(mask_shape, shape))
    or mask_shape[0] != shape[0]
  ):
    raise errors.UserError(
      f"mask must have the images' shape {shape} or broadcast to it over channels (e.g. [B, H, W]), "
      f"got shape {jnp.shape(values)}."
    )
  concrete = maybe_concrete(values)
  if concrete is not None and not np.all((concrete == 0) | (concrete == 1)):
    raise errors.UserError("mask must hold 0 (sample) and 1 (keep) only.")
  return jnp.broadcast_to(jnp.reshape(jnp.asarray(values) != 0, mask_shape), shape)


def _is_one(scale) -> bool:
  return isinstance(scale, (int, float)) and scale == 1


def guidance(cond, guidance_scale, null_label, batch: int) -> Guidance:
  """The `Guidance` of [B] labels `cond` (or a `ClassLabels`; None: an unconditional model) at scale s.

  s != 1 guides (and needs the null class: `null_label`, or the ClassLabels'); s may be traced.
  """
  if cond is None:
    if not _is_one(guidance_scale):
      raise errors.UserError(
        f"guidance_scale={guidance_scale!r} needs class labels: pass cond=[B] labels, or guidance_scale=1.0."
      )
    return UNGUIDED
  if isinstance(cond, ClassLabels):
    null_label = cond.null_label if null_label is None else null_label
    cond = cond.labels
  if jnp.ndim(cond) != 1 or jnp.shape(cond)[0] != batch or not jnp.issubdtype(jnp.result_type(cond), jnp.integer):
    raise errors.UserError(
      f"cond must be [B] = [{batch}] integer class labels, got shape {jnp.shape(cond)}, dtype {jnp.result_type(cond)}."
    )
  scale = maybe_concrete(guidance_scale)
  if scale is not None and (scale.ndim != 0 or not np.isfinite(scale)):
    raise errors.UserError(
      f"guidance_scale must be a finite scalar (1 = the conditional model), got {guidance_scale!r}."
    )
  guided = not _is_one(guidance_scale)
  if guided and (isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer))):
    raise errors.UserError(
      f"guidance_scale={guidance_scale!r} needs null_label, the integer label of the unconditional "
      f"(null) class, got {null_label!r}; or use guidance_scale=1.0."
    )
  return Guidance(
    cond=ClassLabels(cond, None if null_label is None else int(null_label)),
    scale=jnp.asarray(guidance_scale, jnp.float32) if guided else None,
    guided=guided,
  )


def request(diffusion, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale, null_label, batch):
  """The checked `Request` of a chain over a batch of `batch` examples."""
  spec, eta = spec_and_eta(diffusion, sampler, eta)
  clip_denoised, progressive_every = flags(clip_denoised, progressive_every)
  return Request(spec, eta, clip_denoised, progressive_every, guidance(cond, guidance_scale, null_label, batch))


def as_partial(model_fn):
  if isinstance(model_fn, jax.tree_util.Partial):
    return model_fn
  if not callable(model_fn):
    raise errors.UserError(f"model_fn must be callable as model_fn(x_t, t), got {model_fn!r}.")
  return jax.tree_util.Partial(model_fn)
