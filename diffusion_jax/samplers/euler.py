"""`euler`: Euler steps on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1 without churn).

The variable is x̃ = x_t/√ᾱ_t = x_0 + σ ε with σ_t = √((1 − ᾱ_t)/ᾱ_t); the
ODE is dx̃/dσ = (x̃ − x̂_0(x̃, σ))/σ, and one step is

  x̃' = x̃ + (σ' − σ)·(x̃ − x̂_0)/σ,

with the network evaluated at x_t = x̃/√(1 + σ²) and timestep t(σ). The last
step goes to σ = 0 (diffusers' `final_sigmas_type="zero"`), so the output is
x̃ at σ = 0, an image. This is diffusers' `EulerDiscreteScheduler` (no churn,
`interpolation_type="linear"`):

  * σ grid "uniform": the timesteps of `timestep_spacing` (family "k" of
    `grids`: `linspace` gives fractional timesteps, passed to the network as
    float32) and σ interpolated linearly in t from the table;
  * σ grid "karras": ρ = 7 between the σ's of the spacing's first and last
    timesteps, the timesteps interpolated in log σ (fractional).

Conventions that differ: the chain starts from x̃ = √(1 + σ_max²)·x_T with x_T
~ N(0, I), the consistent start in x_t; diffusers' pipelines start from
σ_max·x_T for `linspace` and `trailing` (its `init_noise_sigma`), a relative
difference of 1/(2σ_max²). x̂_0 may be clipped (`clip_denoised`), which diffusers' Euler does not offer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_jax.samplers import grids
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Plan
from diffusion_jax.samplers.base import Sampler
from diffusion_jax.samplers.base import noise_steps
from diffusion_jax.samplers.base import per_call
from diffusion_jax.samplers.base import timesteps_array

K_SPACINGS = ("leading", "trailing", "linspace")


def k_sigmas(diffusion, spec, start):
  """(timesteps [m] float64, σ [m] float64), descending: the σ grid of Euler/Heun (module docstring)."""
  alphas_cumprod = grids.alphas_cumprod64(diffusion, spec.name)
  table = grids.vp_sigmas(alphas_cumprod)
  grid = grids.truncate_grid(
    grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="k"), start
  )
  sigmas = np.interp(grid, np.arange(table.size), table)
  if spec.sigma_schedule == "karras":
    sigmas = grids.karras_sigmas(sigmas[0], sigmas[-1], sigmas.size)
    grid = grids.sigma_to_t(sigmas, np.log(table))
  return grid, sigmas


def sigma_coefficients(sigmas):
  """Per-call coefficients of σ's: the input scale √(1 + σ²), and α, σ_vp of x_t = α x_0 + σ_vp ε."""
  scale = np.sqrt(sigmas**2 + 1.0)
  return dict(
    scale=per_call(scale), alpha=per_call(1.0 / scale), sigma_vp=per_call(sigmas / scale), sigma=per_call(sigmas)
  )


@dataclasses.dataclass(frozen=True)
class Euler(Sampler):
  """Euler on the probability-flow ODE."""

  def check(self, spec):
    grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="k")

  def plan(self, diffusion, spec, start):
    grid, sigmas = k_sigmas(diffusion, spec, start)
    sigmas_next = np.append(sigmas[1:], 0.0)
    t = timesteps_array(grid)
    coef = sigma_coefficients(sigmas) | dict(dt=per_call(sigmas_next - sigmas))
    return Plan(
      t=t,
      t_next=np.append(t[1:], -1).astype(t.dtype),
      noise_step=noise_steps(t),
      record=np.ones(t.size, bool),
      coef=coef,
    )

  def init(self, x, coef):
    return x * coef["scale"]

  def model_input(self, carry, coef):
    return carry / coef["scale"]

  def with_input(self, carry, x, coef):
    return x * coef["scale"]

  def signal_noise(self, diffusion, coef, t):
    return coef["alpha"], coef["sigma_vp"]

  def step(self, carry, model_output, t, t_next, ctx):
    x = carry
    c = ctx.coef
    pred_xstart = ctx.predict_xstart(model_output, x / c["scale"], alpha=c["alpha"], sigma=c["sigma_vp"])
    derivative = (x - pred_xstart) / c["sigma"]
    return x + derivative * c["dt"], pred_xstart


EULER = registry.register(
  Euler(
    name="euler",
    description="Euler on the probability-flow ODE (Karras et al. 2022)",
    spacings=K_SPACINGS,
    default_spacing="linspace",
    sigma_schedules=grids.SIGMA_SCHEDULES,
    mean_types=("eps", "xstart", "v"),
  )
)
