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

Classifier-free guidance: `cond`, `guidance_scale`, `null_label`, checked once into a `request.Guidance`
(see `request`).

The chains (`sample`, `denoise`, `edit`, `inpaint`, `interpolate`) are in `chains`; this package only exports.
A new sampler is one module that defines a `base.Sampler` and registers it, listed in the imports below.

Editing: `edit` (SDEdit: an image diffused to timestep t and denoised; see
`editing`), `inpaint` (the unknown pixels sampled, the known ones replaced by
the forward process at every call, in the driver; see `driver`) and `invert`
(DDIM inversion of images into latents that `denoise` decodes; see `inversion`).
"""

from __future__ import annotations

from diffusion_jax.samplers import ancestral  # noqa: F401
from diffusion_jax.samplers import chains  # noqa: F401
from diffusion_jax.samplers import checks  # noqa: F401
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
from diffusion_jax.samplers import request  # noqa: F401
from diffusion_jax.samplers.base import Plan  # noqa: F401
from diffusion_jax.samplers.base import Sampler  # noqa: F401
from diffusion_jax.samplers.base import StepContext  # noqa: F401
from diffusion_jax.samplers.chains import denoise  # noqa: F401
from diffusion_jax.samplers.chains import edit  # noqa: F401
from diffusion_jax.samplers.chains import inpaint  # noqa: F401
from diffusion_jax.samplers.chains import interpolate  # noqa: F401
from diffusion_jax.samplers.chains import mix_latents  # noqa: F401
from diffusion_jax.samplers.chains import sample  # noqa: F401
from diffusion_jax.samplers.editing import strength_to_timestep  # noqa: F401
from diffusion_jax.samplers.grids import SIGMA_SCHEDULES  # noqa: F401
from diffusion_jax.samplers.grids import TIMESTEP_SPACINGS  # noqa: F401
from diffusion_jax.samplers.grids import respace  # noqa: F401
from diffusion_jax.samplers.grids import space_timesteps  # noqa: F401
from diffusion_jax.samplers.inversion import invert  # noqa: F401
from diffusion_jax.samplers.registry import SamplerSpec  # noqa: F401
from diffusion_jax.samplers.registry import register  # noqa: F401
from diffusion_jax.samplers.registry import resolve  # noqa: F401
from diffusion_jax.samplers.request import Guidance  # noqa: F401
from diffusion_jax.samplers.request import Request  # noqa: F401

SAMPLERS = registry.names()
