"""`ddim`: Song et al. (2021), eq. 12, with η (0 = deterministic, 1 = ancestral with σ² = β̃).

  x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z,  σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t'})),

with x̂_0 the (clipped) x_0 prediction, ε̂ recomputed from it, and ᾱ_{t'} = 1
after the last step (diffusers' `set_alpha_to_one=True`).

The next timestep t' follows the grid. On the `even` grid (the default) and the
`nested` one (distilled students' grids) it is the next grid timestep. On diffusers' spacings it is t − T // n, as
`DDIMScheduler.step` computes it; for `leading` that is the next grid
timestep, for `trailing` and `linspace` it may not be (a convention of
diffusers kept for parity). In `denoise`, the first step from the given t
goes to the next grid timestep below it.

Conventions that differ from diffusers' `DDIMScheduler`: ε̂ is always the one
recomputed from the clipped x̂_0 (diffusers' `use_clipped_model_output=True`;
without clipping the two agree), and clipping is to [−1, 1] (`clip_sample_range=1`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import grids
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Plan
from diffusion_jax.samplers.base import Sampler
from diffusion_jax.samplers.base import noise_steps
from diffusion_jax.samplers.base import timesteps_array


@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
  """DDIM on a timestep grid; needs only ᾱ at the original timesteps (no respaced tables)."""

  def check(self, spec):
    grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="ddim")

  def stochastic(self, spec):
    return True

  def plan(self, diffusion, spec, start):
    grid = grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="ddim")
    if spec.timestep_spacing in ("even", "nested"):
      t = grids.truncate_grid(grid, start)
      t_next = np.append(t[1:], -1)
    else:
      t_next_of = lambda s: np.where(
        s - spec.num_timesteps // spec.num_steps >= 0, s - spec.num_timesteps // spec.num_steps, -1
      )
      below = grid[grid < start] if start is not None else grid
      t = grids.truncate_grid(grid, start)
      t_next = t_next_of(t)
      if start is not None and start not in grid:
        t_next[0] = below[0] if below.size else -1
    t = timesteps_array(t)
    return Plan(
      t=t, t_next=np.asarray(t_next, np.int32), noise_step=noise_steps(t), record=np.ones(t.size, bool), coef={}
    )

  def step(self, carry, model_output, t, t_next, ctx):
    x = carry
    alphas_cumprod = ctx.diffusion.alphas_cumprod
    pred_xstart = ctx.predict_xstart(model_output, x)
    eps = ctx.diffusion.predict_eps_from_xstart(x, ctx.t_vec, pred_xstart)
    a = jnp.take(alphas_cumprod, t)
    a_prev = jnp.where(t_next >= 0, jnp.take(alphas_cumprod, jnp.maximum(t_next, 0)), jnp.float32(1.0))
    sigma = ctx.eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    # ≥ 0 in exact arithmetic for eta ≤ 1; the floor guards rounding (and eta > 1).
    eps_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - jnp.square(sigma), 0.0))
    return jnp.sqrt(a_prev) * pred_xstart + eps_coef * eps + sigma * ctx.noise, pred_xstart


DDIM_SAMPLER = registry.register(
  DDIM(
    name="ddim",
    description="DDIM (Song et al. 2021), η = 0 deterministic",
    has_eta=True,
    spacings=grids.TIMESTEP_SPACINGS,
  )
)
