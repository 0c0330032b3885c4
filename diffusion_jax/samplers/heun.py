"""`heun`: Heun's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1 without churn).

On the σ grid of `euler` (same variable x̃ = x_t/√ᾱ_t, same spacings and σ
schedules), each step from σ to σ' > 0 takes an Euler step to x̃', evaluates
the network again at (x̃', σ') and moves from x̃ with the mean of the two
slopes; the last step, to σ' = 0, is a plain Euler step. Network calls:
2n − 1 for n steps. The driver scans over calls: the second call of a step is a
call of its own (coefficient `second` = 1), so progressive pictures are taken
at the first call of each step. This is diffusers' `HeunDiscreteScheduler`,
with the start-of-chain convention of `euler`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Plan
from diffusion_jax.samplers.base import Sampler
from diffusion_jax.samplers.base import noise_steps
from diffusion_jax.samplers.base import per_call
from diffusion_jax.samplers.base import timesteps_array
from diffusion_jax.samplers.euler import K_SPACINGS
from diffusion_jax.samplers.euler import Euler
from diffusion_jax.samplers.euler import k_sigmas
from diffusion_jax.samplers.euler import sigma_coefficients


@dataclasses.dataclass(frozen=True)
class Heun(Sampler):
  """Heun (2nd order) on the probability-flow ODE."""

  def network_calls(self, num_steps):
    return 2 * int(num_steps) - 1

  def check(self, spec):
    Euler.check(self, spec)

  def plan(self, diffusion, spec, start):
    grid, sigmas = k_sigmas(diffusion, spec, start)
    m = sigmas.size
    sigmas_next = np.append(sigmas[1:], 0.0)
    # Calls: first of step i at σ_i, then (i < m − 1) second at σ_{i+1}, both with dt = σ_{i+1} − σ_i.
    call_step = np.repeat(np.arange(m), 2)[:-1]
    second = np.tile([0, 1], m)[:-1].astype(bool)
    at = np.where(second, call_step + 1, call_step)
    t = timesteps_array(grid[at])
    t_all = timesteps_array(np.append(grid, -1))
    coef = sigma_coefficients(sigmas[at]) | dict(
      dt=per_call((sigmas_next - sigmas)[call_step]), second=per_call(second)
    )
    return Plan(t=t, t_next=t_all[call_step + 1].astype(t.dtype), noise_step=noise_steps(t), record=~second, coef=coef)

  def init(self, x, coef):
    x = x * coef["scale"]
    return (x, jnp.zeros_like(x), jnp.zeros_like(x))

  def model_input(self, carry, coef):
    return carry[0] / coef["scale"]

  def with_input(self, carry, x, coef):
    return (x * coef["scale"],) + tuple(carry[1:])

  def signal_noise(self, diffusion, coef, t):
    return coef["alpha"], coef["sigma_vp"]

  def step(self, carry, model_output, t, t_next, ctx):
    x, x_start, d_first = carry
    c = ctx.coef
    pred_xstart = ctx.predict_xstart(model_output, x / c["scale"], alpha=c["alpha"], sigma=c["sigma_vp"])
    derivative = (x - pred_xstart) / c["sigma"]
    second = c["second"] > 0
    x_heun = x_start + (d_first + derivative) / 2 * c["dt"]
    x_euler = x + derivative * c["dt"]
    new = (jnp.where(second, x_heun, x_euler), jnp.where(second, x_start, x), jnp.where(second, d_first, derivative))
    return new, pred_xstart

  def output(self, carry):
    return carry[0]


HEUN = registry.register(
  Heun(
    name="heun",
    description="Heun on the probability-flow ODE (Karras et al. 2022); 2 network calls per step",
    spacings=K_SPACINGS,
    default_spacing="linspace",
    sigma_schedules=("uniform", "karras"),
    mean_types=("eps", "xstart", "v"),
  )
)
