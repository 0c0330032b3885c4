"""DPM-Solver++ multistep (Lu et al. 2022): `dpmpp2m`, `dpmpp3m` and the SDE variants `dpmpp2m_sde`, `dpmpp3m_sde`.

With x_t = α_t x_0 + σ_t ε (α_t = √ᾱ_t), λ_t = log(α_t/σ_t), h = λ_{t'} − λ_t and
D the x_0 predictions (clipped when `clip_denoised`) of the last steps, the
first-order step is x_{t'} = (σ_{t'}/σ_t) x_t − α_{t'}(e^{−h} − 1) D_0 and the
second (midpoint) and third orders add the divided differences of the
previous predictions, exactly as diffusers' `DPMSolverMultistepScheduler`
(`algorithm_type="dpmsolver++"`, `solver_type="midpoint"`; the SDE variants
`"sde-dpmsolver++"` add σ_{t'}√(1 − e^{−2h})·z with the package's step noise).
Every step is precomputed in float64 as a linear combination

  x_{t'} = c_x·x_t + c_0·D_0 + c_1·D_1 + c_2·D_2 (+ c_z·z),

so the carry is (x_t, D_1, D_2). The order of each step follows diffusers:
the first steps warm up (order 1, then 2), the last step is first order (the
final σ is 0, diffusers' `final_sigmas_type="zero"`, which forces it), and
with `lower_order_final` (default) and fewer than 15 steps the second to last
is at most second order.

Grids (family "dpm" of `grids`): `linspace` (default), `leading`, `trailing`;
σ "uniform" takes the table's σ at those timesteps, "karras" spaces σ's with
ρ = 7 between σ_0 and σ_{T−1} (in `denoise`: σ_t) and calls the network at the
rounded timesteps t(σ), as diffusers does. The chain runs on x_t itself
(diffusers' `init_noise_sigma = 1`). The SDE variants key their noise by t + 1 of
the (rounded) timestep left, as every sampler.
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
from diffusion_jax.samplers.base import per_call
from diffusion_jax.samplers.base import timesteps_array

DPM_SPACINGS = ("leading", "trailing", "linspace")


def dpm_sigmas(diffusion, spec, start):
  """(timesteps [m], σ [m]) descending; σ = √((1 − ᾱ)/ᾱ) (module docstring)."""
  alphas_cumprod = grids.alphas_cumprod64(diffusion, spec.name)
  table = grids.vp_sigmas(alphas_cumprod)
  grid = grids.truncate_grid(
    grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="dpm"), start
  )
  if spec.sigma_schedule == "karras":
    sigma_max = table[-1] if start is None else table[int(start)]
    sigmas = grids.karras_sigmas(sigma_max, table[0], grid.size)
    grid = np.round(grids.sigma_to_t(sigmas, np.log(table)))
  else:
    sigmas = np.interp(grid, np.arange(table.size), table)
  return grid, sigmas


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """The order of each step, as `DPMSolverMultistepScheduler.step` chooses it (final σ = 0)."""
  orders = []
  for i in range(num_steps):
    warm = min(i, order)  # diffusers' lower_order_nums
    final = i == num_steps - 1  # always first order: the final σ is 0
    second_to_last = i == num_steps - 2 and lower_order_final and num_steps < 15
    if order == 1 or warm < 1 or final:
      orders.append(1)
    elif order == 2 or warm < 2 or second_to_last:
      orders.append(2)
    else:
      orders.append(3)
  return np.asarray(orders)


def coefficients(sigmas: np.ndarray, orders: np.ndarray, sde: bool) -> dict[str, np.ndarray]:
  """c_x, c_0, c_1, c_2 (and c_z) of every step, in float64 (module docstring)."""
  sigmas_all = np.append(sigmas, 0.0)
  alpha = 1.0 / np.sqrt(sigmas_all**2 + 1.0)
  sigma = sigmas_all * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)
  m = sigmas.size
  out = {k: np.zeros(m) for k in ("cx", "c0", "c1", "c2", "cz")}
  for i in range(m):
    a_t, s_t, s_0 = alpha[i + 1], sigma[i + 1], sigma[i]
    h = lam[i + 1] - lam[i]
    em = np.exp(-h)
    if sde:
      cx, b = s_t / s_0 * em, a_t * (1.0 - np.exp(-2.0 * h))
      out["cz"][i] = s_t * np.sqrt(1.0 - np.exp(-2.0 * h))
    else:
      cx, b = s_t / s_0, -a_t * (em - 1.0)
    d = np.array([b, 0.0, 0.0])  # the coefficients of D_0, D_1, D_2 in (m0, m1, m2)
    if orders[i] == 2:
      r0 = (lam[i] - lam[i - 1]) / h
      d1 = np.array([1.0, -1.0, 0.0]) / r0
      d = d + 0.5 * b * d1
    elif orders[i] == 3:
      r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
      d1_0, d1_1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
      d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      if sde:
        c1 = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        c2 = a_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        d = d + c1 * d1 + c2 * d2
      else:
        c1 = a_t * ((em - 1.0) / h + 1.0)
        c2 = a_t * ((em - 1.0 + h) / h**2 - 0.5)
        d = d + c1 * d1 - c2 * d2
    out["cx"][i] = cx
    out["c0"][i], out["c1"][i], out["c2"][i] = d
  out["alpha"], out["sigma"] = alpha[:m], sigma[:m]
  return out


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(Sampler):
  """DPM-Solver++ multistep of order `default_order`, ODE or SDE."""

  sde: bool = False

  def min_steps(self, order):
    return int(order or 1)

  def check(self, spec):
    grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="dpm")

  def stochastic(self, spec):
    return self.sde

  def plan(self, diffusion, spec, start):
    grid, sigmas = dpm_sigmas(diffusion, spec, start)
    orders = step_orders(sigmas.size, spec.order, spec.lower_order_final)
    coef = {k: per_call(v) for k, v in coefficients(sigmas, orders, self.sde).items()}
    t = timesteps_array(grid)
    return Plan(
      t=t,
      t_next=np.append(t[1:], -1).astype(t.dtype),
      noise_step=noise_steps(t),
      record=np.ones(t.size, bool),
      coef=coef,
    )

  def init(self, x, coef):
    return (x, jnp.zeros_like(x), jnp.zeros_like(x))

  def model_input(self, carry, coef):
    return carry[0]

  def with_input(self, carry, x, coef):
    return (x,) + tuple(carry[1:])

  def signal_noise(self, diffusion, coef, t):
    return coef["alpha"], coef["sigma"]

  def step(self, carry, model_output, t, t_next, ctx):
    x, m1, m2 = carry
    c = ctx.coef
    m0 = ctx.predict_xstart(model_output, x, alpha=c["alpha"], sigma=c["sigma"])
    x_next = c["cx"] * x + c["c0"] * m0 + c["c1"] * m1 + c["c2"] * m2
    if self.sde:
      x_next = x_next + c["cz"] * ctx.noise
    return (x_next, m0, m1), m0

  def output(self, carry):
    return carry[0]


_COMMON = dict(
  spacings=DPM_SPACINGS,
  default_spacing="linspace",
  sigma_schedules=grids.SIGMA_SCHEDULES,
  orders=(1, 2, 3),
  has_lower_order_final=True,
  mean_types=("eps", "xstart", "v"),
)
DPMPP2M = registry.register(
  DPMSolverPP(name="dpmpp2m", description="DPM-Solver++(2M) (Lu et al. 2022)", default_order=2, **_COMMON),
  order_alias="dpmpp",
)
DPMPP3M = registry.register(
  DPMSolverPP(name="dpmpp3m", description="DPM-Solver++(3M) (Lu et al. 2022)", default_order=3, **_COMMON)
)
DPMPP2M_SDE = registry.register(
  DPMSolverPP(
    name="dpmpp2m_sde", description="SDE-DPM-Solver++(2M) (Lu et al. 2022)", default_order=2, sde=True, **_COMMON
  ),
  order_alias="dpmpp_sde",
)
DPMPP3M_SDE = registry.register(
  DPMSolverPP(
    name="dpmpp3m_sde", description="SDE-DPM-Solver++(3M) (Lu et al. 2022)", default_order=3, sde=True, **_COMMON
  )
)
