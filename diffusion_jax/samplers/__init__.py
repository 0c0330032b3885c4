"""Reverse-process samplers: one protocol, one scanned driver, one module per sampler.

Samplers (`SAMPLERS`; settings resolved and validated by `resolve`):
  * `ancestral`: the reference code's `p_sample_loop` (Ho et al. 2020), from
    T−1 down to 0, with x_0 clipping by default and no noise at t = 0; with
    `num_steps < T` on the respaced process (Nichol & Dhariwal 2021).
  * `ddim`: Song et al. (2021), eq. 12, η = 0 deterministic, η = 1 the
    ancestral sampler with σ² = β̃ (fixedsmall).
  * `dpmpp2m`, `dpmpp3m`: DPM-Solver++ multistep (Lu et al. 2022), orders 2 and
    3, with diffusers' lower-order final steps; `dpmpp2m_sde`, `dpmpp3m_sde`:
    their SDE variants.
  * `euler`, `heun`: Euler and Heun (2 network calls per step) on the
    probability-flow ODE in σ (Karras et al. 2022), σ uniform in t or Karras (ρ = 7).

Every sampler is a `base.Sampler` (its grid, initial carry and
`step(carry, model_output, t, t_next, ctx)`), run by `driver.run` as one
`lax.scan` that calls the network as `model_fn(x_t, t) -> model_output`
(`model_fn(x_t, t, cond)` with labels) with `t` a [B] array of ORIGINAL
timesteps in [0, T): int32, or float32 where a grid is fractional (Euler and
Heun on diffusers' `linspace` spacing or Karras σ's, as diffusers passes them).

Noise scheme. The noise of example b depends only on (rng, indices[b]), where
`indices` holds GLOBAL sample indices, so a given rng gives the same images
whatever the batch size or the number of devices and processes:

  key_b      = fold_in(rng, indices[b])
  x_T[b]     = normal(fold_in(key_b, 0), shape[1:])
  z_t[b]     = normal(fold_in(key_b, t + 1), shape[1:])   # noise of the step leaving ORIGINAL timestep t

Because steps are keyed by their original timestep, a respaced run with all
T steps draws exactly the noise of the full run. x_T is N(0, I) in the space
of x_t for every sampler (the σ-samplers start from √(1 + σ_max²)·x_T in
their variable x_t/√ᾱ_t).

Jitting and sharding. The public functions validate their arguments and build
the sampler's plan (grid, coefficients, respaced tables) eagerly, in NumPy,
then call one jitted function whose static arguments are the sampler, its
resolved `SamplerSpec` (η excluded), the flags and the image shape; the
per-step coefficients, η, rng and indices are traced, so repeated calls with
the same shapes do not recompile. `model_fn` is passed as a
`jax.tree_util.Partial` (wrapped if it is not one): pass
`Partial(apply_fn, params)` so that new parameters reuse the compiled loop.
Every per-example array is batch-first, so the functions run under `jax.jit`
with `NamedSharding(mesh, P('data'))` inputs and outputs. Plans need the
diffusion's tables as concrete values (except DDIM's): close over the
diffusion rather than passing it as a traced argument of an outer `jax.jit`.

Classifier-free guidance: `cond`, `guidance_scale`, `null_label` (see `driver`).

Editing: `edit` (SDEdit: an image diffused to timestep t and denoised; see
`editing`), `inpaint` (the unknown pixels sampled, the known ones replaced by
the forward process at every call, in the driver; see `driver`) and `invert`
(DDIM inversion of images into latents that `denoise` decodes; see `inversion`).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import ancestral  # noqa: F401
from diffusion_jax.samplers import ddim  # noqa: F401
from diffusion_jax.samplers import dpmpp  # noqa: F401
from diffusion_jax.samplers import driver  # noqa: F401
from diffusion_jax.samplers import editing  # noqa: F401
from diffusion_jax.samplers import euler  # noqa: F401
from diffusion_jax.samplers import grids  # noqa: F401
from diffusion_jax.samplers import heun  # noqa: F401
from diffusion_jax.samplers import inversion  # noqa: F401
from diffusion_jax.samplers import registry  # noqa: F401
from diffusion_jax.samplers import repaint  # noqa: F401
from diffusion_jax.samplers.base import Plan  # noqa: F401
from diffusion_jax.samplers.base import Sampler  # noqa: F401
from diffusion_jax.samplers.base import StepContext  # noqa: F401
from diffusion_jax.samplers.editing import strength_to_timestep  # noqa: F401
from diffusion_jax.samplers.grids import SIGMA_SCHEDULES  # noqa: F401
from diffusion_jax.samplers.grids import TIMESTEP_SPACINGS  # noqa: F401
from diffusion_jax.samplers.grids import respace  # noqa: F401
from diffusion_jax.samplers.grids import space_timesteps  # noqa: F401
from diffusion_jax.samplers.inversion import invert  # noqa: F401
from diffusion_jax.samplers.registry import SamplerSpec  # noqa: F401
from diffusion_jax.samplers.registry import register  # noqa: F401
from diffusion_jax.samplers.registry import resolve  # noqa: F401

SAMPLERS = registry.names()

Array = jax.Array
ModelFn = Callable[..., Array]

# The compiled chain (its cache size tells whether a call recompiled).
_run = driver._run  # pylint: disable=protected-access


def get_sampler(name: str) -> Sampler:
  """The registered sampler object of `name`."""
  return registry.get(name)


def network_calls(sampler, num_steps: int) -> int:
  """Network evaluations per image of `sampler` (a name or a SamplerSpec) with `num_steps` steps."""
  if isinstance(sampler, SamplerSpec):
    return sampler.network_calls
  return registry.get(sampler).network_calls(num_steps)


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def _maybe_concrete(x):
  """x as a NumPy array, or None if it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _spec_and_eta(diffusion, sampler, eta):
  """(spec, η): `sampler` (a SamplerSpec, or a name taken with its defaults) checked against the diffusion, and η:
  the spec's when `eta` is None, else `eta` (possibly traced) for a sampler that has one."""
  spec = registry.resolve(sampler, num_timesteps=diffusion.num_timesteps)
  registry.check_mean_type(spec, diffusion.model_mean_type)
  if eta is None:
    return spec, spec.eta
  value = _maybe_concrete(eta)
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


def _check_flags(clip_denoised, progressive_every):
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise errors.UserError(f"clip_denoised must be a bool, got {clip_denoised!r}.")
  if (
    isinstance(progressive_every, bool) or not isinstance(progressive_every, (int, np.integer)) or progressive_every < 0
  ):
    raise errors.UserError(f"progressive_every must be an integer >= 0 (0 = off), got {progressive_every!r}.")


def _check_indices(indices, batch):
  if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] != batch:
    raise errors.UserError(
      f"indices must have shape [B] = [{batch}] (the global index of each sample), got shape {jnp.shape(indices)}."
    )
  if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
    raise errors.UserError(f"indices must be integers (global sample indices), got dtype {jnp.result_type(indices)}.")


def _check_guidance(cond, guidance_scale, null_label, batch):
  if cond is None:
    if not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1):
      raise errors.UserError(
        f"guidance_scale={guidance_scale!r} needs class labels: pass cond=[B] labels, or guidance_scale=1.0."
      )
    return
  if jnp.ndim(cond) != 1 or jnp.shape(cond)[0] != batch or not jnp.issubdtype(jnp.result_type(cond), jnp.integer):
    raise errors.UserError(
      f"cond must be [B] = [{batch}] integer class labels, got shape {jnp.shape(cond)}, dtype {jnp.result_type(cond)}."
    )
  scale = _maybe_concrete(guidance_scale)
  if scale is not None and (scale.ndim != 0 or not np.isfinite(scale)):
    raise errors.UserError(
      f"guidance_scale must be a finite scalar (1 = the conditional model), got {guidance_scale!r}."
    )
  guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1)
  if guided and (isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer))):
    raise errors.UserError(
      f"guidance_scale={guidance_scale!r} needs null_label, the integer label of the unconditional "
      f"(null) class, got {null_label!r}; or use guidance_scale=1.0."
    )


def _check_t(t, num_timesteps):
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < num_timesteps:
    raise errors.UserError(
      f"t must be a Python integer in [0, {num_timesteps}) (the timestep to start from), got {t!r}."
    )
  return int(t)


def _as_partial(model_fn):
  if isinstance(model_fn, jax.tree_util.Partial):
    return model_fn
  if not callable(model_fn):
    raise errors.UserError(f"model_fn must be callable as model_fn(x_t, t), got {model_fn!r}.")
  return jax.tree_util.Partial(model_fn)


def _chain(
  diffusion,
  model_fn,
  rng,
  indices,
  x_t,
  spec,
  eta,
  *,
  start,
  shape,
  clip_denoised,
  progressive_every,
  cond,
  guidance_scale,
  null_label,
  known=None,
):
  registry.check_mean_type(spec, diffusion.model_mean_type)
  plan = spec.sampler.plan(diffusion, spec, start)
  return driver.run(
    diffusion,
    _as_partial(model_fn),
    rng,
    indices,
    x_t,
    spec,
    plan,
    shape=shape,
    eta=eta,
    clip_denoised=clip_denoised,
    progressive_every=progressive_every,
    cond=cond,
    guidance_scale=guidance_scale,
    null_label=null_label,
    known=known,
  )


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _from_noise(
  diffusion,
  model_fn,
  rng,
  indices,
  shape,
  spec,
  eta,
  clip_denoised,
  progressive_every,
  cond,
  guidance_scale,
  null_label,
  known=None,
):
  """The chain from x_T ~ N(0, I) for `sample` and `inpaint`, after their own checks."""
  _check_indices(indices, shape[0])
  _check_guidance(cond, guidance_scale, null_label, shape[0])
  return _chain(
    diffusion,
    model_fn,
    rng,
    indices,
    None,
    spec,
    eta,
    start=None,
    shape=shape,
    clip_denoised=bool(clip_denoised),
    progressive_every=int(progressive_every),
    cond=cond,
    guidance_scale=guidance_scale,
    null_label=null_label,
    known=known,
  )


def sample(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  rng,
  indices,
  shape: Sequence[int],
  *,
  sampler: SamplerSpec | str = "ancestral",
  eta=None,
  clip_denoised: bool = True,
  progressive_every: int = 0,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> dict[str, Array]:
  """Draws samples by running the reverse process from x_T ~ N(0, I).

  Args:
    diffusion: the diffusion the model was trained with.
    model_fn: model_fn(x_t [B, ...], t [B] original timesteps) -> model
      output, as `GaussianDiffusion.p_mean_variance` expects it (with `cond`:
      model_fn(x_t, t, cond [B])). A `jax.tree_util.Partial(apply_fn, params)`
      avoids recompiling for new params.
    rng: a PRNG key (raw or typed).
    indices: [B] integer global sample indices; see the module's noise scheme.
    shape: the full output shape [B, H, W, C] (any [B, ...]).
    sampler: a `SamplerSpec` from `resolve` (or `SamplerSpec.from_config`); a
      bare name takes that sampler's defaults (all T steps).
    eta: DDIM's η, possibly traced (one compilation for every η); None takes the spec's.
    clip_denoised: clip each x_0 prediction to [-1, 1] (the reference default).
    progressive_every: k > 0 also records, every k steps of the chain, the x_0
      prediction and the x_t it was made from (paper Fig. 6; the reference
      `p_sample_loop_progressive(include_xstartpred_freq=k)`).
    cond: optional [B] integer class labels (None: unconditional model).
    guidance_scale: classifier-free guidance scale s, possibly traced (1 = the
      conditional model; ε̂ = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)); w = s − 1 in the other convention).
    null_label: the label of the unconditional class, needed when s != 1.

  Returns:
    dict with `samples` [B, ...] float32 (in [-1, 1] for eps/xstart/v models
    with clipping; the last ancestral step returns the posterior mean at t = 0) and, when
    `progressive_every` = k > 0, `pred_xstart` and `trajectory`, each
    [B, K, ...] with K = ceil(n / k) for n steps, in sampling order: slot
    K−1−m holds step m·k of the chain counted from the end (step 0 is the last,
    at timestep 0 unless num_steps = 1), so the last slot is the x_0 prediction at t = 0 and the
    first `trajectory` slot is x_T when (n − 1) is a multiple of k. For n = T
    = 1000, k = 50 the slots are timesteps 950, 900, ..., 0: the reference's
    array in reverse order. `trajectory` holds the network's input x_t.

  Raises:
    UserError: a spec resolved for another T, a model mean type the sampler
      does not support, eta for a sampler without one, indices that do not
      match the batch, or bad guidance arguments.
  """
  spec, eta = _spec_and_eta(diffusion, sampler, eta)
  _check_flags(clip_denoised, progressive_every)
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise errors.UserError(f"shape must be the full batched shape [B, ...] (e.g. [B, H, W, C]), got {shape}.")
  return _from_noise(
    diffusion,
    model_fn,
    rng,
    indices,
    shape,
    spec,
    eta,
    clip_denoised,
    progressive_every,
    cond,
    guidance_scale,
    null_label,
  )


def denoise(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  rng,
  indices,
  x_t,
  *,
  t: int,
  sampler: SamplerSpec | str = "ancestral",
  eta=None,
  clip_denoised: bool = True,
  progressive_every: int = 0,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> dict[str, Array]:
  """Runs the reverse process from given latents x_t at timestep t down to 0.

  The chain visits t and then the timesteps of the sampler's grid for
  `num_steps` below t (all of 0..t for num_steps = T with the `even` grid),
  so `denoise` from x_{T−1} = x_T with the same noise is `sample`. Step noise
  follows the module's scheme. σ-samplers start at σ_t (Karras σ's then run from σ_t down).

  Args:
    diffusion, model_fn, rng, indices, sampler, eta, clip_denoised,
      progressive_every, cond, guidance_scale, null_label: as in `sample`.
    x_t: [B, ...] latents at timestep t.
    t: the Python integer timestep of x_t, in [0, T).

  Returns:
    dict as in `sample`.

  Raises:
    UserError: as in `sample`, and for t outside [0, T).
  """
  spec, eta = _spec_and_eta(diffusion, sampler, eta)
  _check_flags(clip_denoised, progressive_every)
  t = _check_t(t, diffusion.num_timesteps)
  if jnp.ndim(x_t) < 2 or not jnp.issubdtype(jnp.result_type(x_t), jnp.floating):
    raise errors.UserError(
      f"x_t must be a batched float array [B, ...], got shape {jnp.shape(x_t)}, dtype {jnp.result_type(x_t)}."
    )
  _check_indices(indices, jnp.shape(x_t)[0])
  _check_guidance(cond, guidance_scale, null_label, jnp.shape(x_t)[0])
  return _chain(
    diffusion,
    model_fn,
    rng,
    indices,
    x_t,
    spec,
    eta,
    start=t,
    shape=None,
    clip_denoised=bool(clip_denoised),
    progressive_every=int(progressive_every),
    cond=cond,
    guidance_scale=guidance_scale,
    null_label=null_label,
  )


@jax.jit
def _diffuse_and_mix(diffusion, rng, x1, x2, lambdas, t, same_noise):
  noise = jax.random.normal(rng, (2,) + x1.shape, jnp.float32)
  noise1, noise2 = noise[0], jnp.where(same_noise, noise[0], noise[1])
  t_vec = jnp.full((1,), t, jnp.int32)
  x_t1 = diffusion.q_sample(x1[None].astype(jnp.float32), t_vec, noise1[None])
  x_t2 = diffusion.q_sample(x2[None].astype(jnp.float32), t_vec, noise2[None])
  lam = lambdas.astype(jnp.float32).reshape((-1,) + (1,) * x1.ndim)
  return (1.0 - lam) * x_t1 + lam * x_t2


def interpolate(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  rng,
  x1,
  x2,
  lambdas,
  *,
  t: int,
  sampler: SamplerSpec | str = "ancestral",
  eta=None,
  same_noise: bool = False,
  clip_denoised: bool = True,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> Array:
  """Interpolates two images in latent space (paper §4.4, Fig. 8).

  Both endpoints are diffused to timestep t, x_t1 = q_sample(x1, t, ε1) and
  x_t2 = q_sample(x2, t, ε2), mixed as x_t = (1−λ)·x_t1 + λ·x_t2 for each λ,
  and denoised from t down to 0 by `denoise`. With `q_rng, d_rng =
  jax.random.split(rng)` and `z = normal(q_rng, (2, *x1.shape))`: ε1 = z[0],
  ε2 = z[1] (independent, the reference code's choice) or z[0]
  (`same_noise`); every row denoises with global index 0 under d_rng, i.e.
  the same reverse noise, so rows differ only by their latents and the rows
  at λ = 0 and λ = 1 are the endpoints' reconstructions.

  Args:
    diffusion, model_fn, sampler, eta, clip_denoised: as in `sample`.
    rng: a PRNG key.
    x1, x2: the endpoints, [H, W, C] (any unbatched shape) in [-1, 1].
    lambdas: [L] mixing weights in [0, 1].
    t: the Python integer timestep to diffuse to, in [0, T); the paper uses 500
      of 1000.
    same_noise: diffuse both endpoints with the same noise.
    cond, guidance_scale, null_label: as in `denoise` (cond: [L] labels).

  Returns:
    [L, H, W, C] float32 images, row l for lambdas[l].

  Raises:
    UserError: for endpoints of different shapes, lambdas that are not a
      non-empty 1-D array in [0, 1], t outside [0, T), and as in `sample`.
  """
  _spec_and_eta(diffusion, sampler, eta)
  _check_flags(clip_denoised, 0)
  t = _check_t(t, diffusion.num_timesteps)
  if jnp.shape(x1) != jnp.shape(x2) or jnp.ndim(x1) < 1:
    raise errors.UserError(
      f"x1 and x2 must be single images of the same shape (e.g. [H, W, C]), got {jnp.shape(x1)} and {jnp.shape(x2)}."
    )
  if jnp.ndim(lambdas) != 1 or jnp.shape(lambdas)[0] == 0:
    raise errors.UserError(
      f"lambdas must be a non-empty 1-D array of weights in [0, 1], got shape {jnp.shape(lambdas)}."
    )
  lam = _maybe_concrete(lambdas)
  if lam is not None and not (np.all(np.isfinite(lam)) and np.all(lam >= 0) and np.all(lam <= 1)):
    raise errors.UserError(f"lambdas must lie in [0, 1] (0 gives x1, 1 gives x2), got {lam.tolist()}.")
  if not isinstance(same_noise, (bool, np.bool_)):
    raise errors.UserError(f"same_noise must be a bool, got {same_noise!r}.")
  q_rng, d_rng = jax.random.split(rng)
  x_t = _diffuse_and_mix(diffusion, q_rng, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(lambdas), t, bool(same_noise))
  indices = jnp.zeros((x_t.shape[0],), jnp.int32)
  return denoise(
    diffusion,
    model_fn,
    d_rng,
    indices,
    x_t,
    t=t,
    sampler=sampler,
    eta=eta,
    clip_denoised=clip_denoised,
    cond=cond,
    guidance_scale=guidance_scale,
    null_label=null_label,
  )["samples"]


def edit(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  rng,
  indices,
  x0,
  *,
  t: int,
  sampler: SamplerSpec | str = "ancestral",
  eta=None,
  clip_denoised: bool = True,
  progressive_every: int = 0,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> dict[str, Array]:
  """SDEdit (Meng et al. 2022): diffuses images x0 to timestep t and runs the reverse process from there.

  x_t = `editing.q_sample_indexed(diffusion, rng, indices, x0, t)` (q_sample with the noise scheme's x_T
  noise of each example), then `denoise(..., x_t, t=t)` with the same rng and indices. Small t keeps the
  image, t = T − 1 nearly forgets it; `editing.strength_to_timestep` maps a strength in (0, 1] to t.

  Args:
    x0: [B, ...] float images in [-1, 1].
    t: the Python integer timestep to diffuse to, in [0, T).
    diffusion, model_fn, rng, indices, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale,
      null_label: as in `sample`.

  Returns:
    dict as in `sample`.
  """
  t = _check_t(t, diffusion.num_timesteps)
  if jnp.ndim(x0) < 2 or not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
    raise errors.UserError(
      f"x0 must be a batched float array [B, ...] in [-1, 1], got shape {jnp.shape(x0)}, dtype {jnp.result_type(x0)}."
    )
  _check_indices(indices, jnp.shape(x0)[0])
  x_t = editing.q_sample_indexed(diffusion, rng, jnp.asarray(indices), jnp.asarray(x0), t)
  return denoise(
    diffusion,
    model_fn,
    rng,
    indices,
    x_t,
    t=t,
    sampler=sampler,
    eta=eta,
    clip_denoised=clip_denoised,
    progressive_every=progressive_every,
    cond=cond,
    guidance_scale=guidance_scale,
    null_label=null_label,
  )


def inpaint(
  diffusion: GaussianDiffusion,
  model_fn: ModelFn,
  rng,
  indices,
  x0,
  mask,
  *,
  sampler: SamplerSpec | str = "ancestral",
  eta=None,
  clip_denoised: bool = True,
  progressive_every: int = 0,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> dict[str, Array]:
  """Inpainting with any sampler: samples the unknown pixels, keeping the known ones (`driver`'s docstring).

  The chain starts from x_T ~ N(0, I) as in `sample` (same rng and indices give the same x_T and step
  noise). Before every network call the known pixels of the current point are replaced by the forward
  process of x0 at that call's noise level, q_sample(x0, t, z) with z from the separate noise stream
  fold_in(key_b, `driver.KNOWN_STREAM`) keyed by t + 1; the known pixels of the result are x0's exactly.

  Args:
    x0: [B, ...] float images in [-1, 1] (only the known pixels are read).
    mask: 1 (or True) = known, 0 = to sample; x0's shape, or missing trailing axes of size 1 (e.g.
      [B, H, W] or [B, H, W, 1] for [B, H, W, C] images), broadcast over channels.
    diffusion, model_fn, rng, indices, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale,
      null_label: as in `sample` (`trajectory` then holds the network inputs, known pixels included).

  Returns:
    dict as in `sample`.
  """
  spec, eta = _spec_and_eta(diffusion, sampler, eta)
  _check_flags(clip_denoised, progressive_every)
  if jnp.ndim(x0) < 2 or not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
    raise errors.UserError(
      f"x0 must be a batched float array [B, ...] in [-1, 1], got shape {jnp.shape(x0)}, dtype {jnp.result_type(x0)}."
    )
  shape = tuple(int(s) for s in jnp.shape(x0))
  mask_shape = tuple(jnp.shape(mask))
  mask_shape = mask_shape + (1,) * (len(shape) - len(mask_shape))
  if (
    len(mask_shape) != len(shape)
    or any(m not in (1, s) for m, s in zip(mask_shape, shape))
    or mask_shape[0] != shape[0]
  ):
    raise errors.UserError(
      f"mask must have the images' shape {shape} or broadcast to it over channels (e.g. [B, H, W]), "
      f"got shape {jnp.shape(mask)}."
    )
  values = _maybe_concrete(mask)
  if values is not None and not np.all((values == 0) | (values == 1)):
    raise errors.UserError("mask must hold 0 (sample) and 1 (keep) only.")
  known = dict(
    x0=jnp.asarray(x0, jnp.float32),
    mask=jnp.broadcast_to(jnp.reshape(jnp.asarray(mask) != 0, mask_shape), shape),
  )
  return _from_noise(
    diffusion,
    model_fn,
    rng,
    indices,
    shape,
    spec,
    eta,
    clip_denoised,
    progressive_every,
    cond,
    guidance_scale,
    null_label,
    known=known,
  )
