"""The samplers' chains: sampling, denoising from a given point, SDEdit, inpainting and interpolation.

Each public function checks its arguments once (`checks`), into one `request.Request`, and runs the sampler's
plan on the one driver (`driver.run`). The noise scheme, jitting and sharding are described in `samplers`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import checks
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import editing
from diffusion_jax.samplers.registry import SamplerSpec
from diffusion_jax.samplers.request import Request

Array = jax.Array
ModelFn = Callable[..., Array]


def _chain(diffusion, model_fn, rng, indices, x_t, request: Request, *, start, shape, known=None):
  """The chain of `request` from x_t at timestep `start` (None: from x_T ~ N(0, I) of `shape`)."""
  plan = request.spec.sampler.plan(diffusion, request.spec, start)
  return driver.run(diffusion, checks.as_partial(model_fn), rng, indices, x_t, request, plan, shape=shape, known=known)


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
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise errors.UserError(f"shape must be the full batched shape [B, ...] (e.g. [B, H, W, C]), got {shape}.")
  request = checks.request(
    diffusion, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale, null_label, shape[0]
  )
  checks.indices(indices, shape[0])
  return _chain(diffusion, model_fn, rng, indices, None, request, start=None, shape=shape)


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
  checks.batched_float(x_t, "x_t", what="")
  batch = jnp.shape(x_t)[0]
  request = checks.request(
    diffusion, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale, null_label, batch
  )
  t = checks.timestep(t, diffusion.num_timesteps)
  checks.indices(indices, batch)
  return _chain(diffusion, model_fn, rng, indices, x_t, request, start=t, shape=None)


@jax.jit
def _diffuse_and_mix(diffusion, rng, x1, x2, lambdas, t, same_noise):
  noise = jax.random.normal(rng, (2,) + x1.shape, jnp.float32)
  noise1, noise2 = noise[0], jnp.where(same_noise, noise[0], noise[1])
  t_vec = jnp.full((1,), t, jnp.int32)
  x_t1 = diffusion.q_sample(x1[None].astype(jnp.float32), t_vec, noise1[None])
  x_t2 = diffusion.q_sample(x2[None].astype(jnp.float32), t_vec, noise2[None])
  lam = lambdas.astype(jnp.float32).reshape((-1,) + (1,) * x1.ndim)
  return (1.0 - lam) * x_t1 + lam * x_t2


def mix_latents(diffusion: GaussianDiffusion, rng, x1, x2, lambdas, *, t: int, same_noise: bool = False):
  """(x_t [L, ...], d_rng): `interpolate`'s mixed latents at timestep t and the key its rows denoise with.

  With `q_rng, d_rng = jax.random.split(rng)`, both endpoints are diffused with q_rng (`interpolate`) and mixed
  as (1−λ)·x_t1 + λ·x_t2 for each λ; `denoise(..., d_rng, zeros([L]), x_t, t=t)` then gives `interpolate`'s
  rows.
  """
  t = checks.timestep(t, diffusion.num_timesteps)
  if jnp.shape(x1) != jnp.shape(x2) or jnp.ndim(x1) < 1:
    raise errors.UserError(
      f"x1 and x2 must be single images of the same shape (e.g. [H, W, C]), got {jnp.shape(x1)} and {jnp.shape(x2)}."
    )
  if jnp.ndim(lambdas) != 1 or jnp.shape(lambdas)[0] == 0:
    raise errors.UserError(
      f"lambdas must be a non-empty 1-D array of weights in [0, 1], got shape {jnp.shape(lambdas)}."
    )
  lam = checks.maybe_concrete(lambdas)
  if lam is not None and not (np.all(np.isfinite(lam)) and np.all(lam >= 0) and np.all(lam <= 1)):
    raise errors.UserError(f"lambdas must lie in [0, 1] (0 gives x1, 1 gives x2), got {lam.tolist()}.")
  if not isinstance(same_noise, (bool, np.bool_)):
    raise errors.UserError(f"same_noise must be a bool, got {same_noise!r}.")
  q_rng, d_rng = jax.random.split(rng)
  x_t = _diffuse_and_mix(diffusion, q_rng, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(lambdas), t, bool(same_noise))
  return x_t, d_rng


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
  checks.spec_and_eta(diffusion, sampler, eta)
  checks.flags(clip_denoised, 0)
  x_t, d_rng = mix_latents(diffusion, rng, x1, x2, lambdas, t=t, same_noise=same_noise)
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
  t = checks.timestep(t, diffusion.num_timesteps)
  checks.batched_float(x0, "x0")
  checks.indices(indices, jnp.shape(x0)[0])
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
  checks.batched_float(x0, "x0")
  shape = tuple(int(s) for s in jnp.shape(x0))
  request = checks.request(
    diffusion, sampler, eta, clip_denoised, progressive_every, cond, guidance_scale, null_label, shape[0]
  )
  checks.indices(indices, shape[0])
  known = dict(x0=jnp.asarray(x0, jnp.float32), mask=checks.mask(mask, shape))
  return _chain(diffusion, model_fn, rng, indices, None, request, start=None, shape=shape, known=known)
