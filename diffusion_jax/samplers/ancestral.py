"""`ancestral`: the reference code's `p_sample_loop` (Ho et al. 2020), full or respaced.

From T−1 down to 0 with `GaussianDiffusion.p_sample`: x_0 clipping by
default, no noise at t = 0. On a subset s_0 < ... < s_{n−1} of the timesteps
(`num_steps` < T, or `denoise` from t) it runs the respaced process of
`grids.respace` (Nichol & Dhariwal 2021): β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}}, the
network still called at the original s_i. This is diffusers' `DDPMScheduler`
on the same grid (it steps to the previous grid timestep with the same β'),
up to the variance at t = 0, where neither adds noise.

An `xprev` model predicts the mean of one ORIGINAL step; on a respaced grid the
prediction goes through its (unclipped) x_0 to the posterior mean of the
respaced step. Variance channels are used as the respaced step's.
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


def xprev_to_respaced(diffusion, loop_diffusion, model_output, x_t, t, loop_t):
  """Re-expresses an `xprev` output (one original step) as the posterior mean of the respaced step."""
  c = x_t.shape[-1]
  mean_out = model_output[..., :c].astype(jnp.float32)
  pred_xstart = diffusion.predict_xstart_from_xprev(x_t, t, mean_out)
  respaced_mean, _, _ = loop_diffusion.q_posterior_mean_variance(pred_xstart, x_t, loop_t)
  if loop_diffusion.learned_variance:
    return jnp.concatenate([respaced_mean, model_output[..., c:].astype(jnp.float32)], axis=-1)
  return respaced_mean


def chain_timesteps(spec, start):
  """Ascending int32 timesteps of the chain: the spec's grid, restricted below `start` and starting there."""
  grid = grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="ddim")
  return np.sort(grids.truncate_grid(grid, start)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Ancestral(Sampler):
  """Ancestral sampling with p_sample on the (respaced) chain."""

  def check(self, spec):
    chain_timesteps(spec, None)

  def stochastic(self, spec):
    return True

  def plan(self, diffusion, spec, start):
    steps = chain_timesteps(spec, start)
    n = steps.size
    if np.array_equal(steps, np.arange(n)):
      # A prefix 0..k-1 of the timesteps: the original tables are already those of the chain.
      loop_diffusion, loop_t, respaced = diffusion, steps, False
    else:
      loop_diffusion, loop_t, respaced = grids.respace(diffusion, steps), np.arange(n, dtype=np.int32), True
    t = timesteps_array(steps[::-1])
    t_next = np.append(t[1:], -1).astype(np.int32)
    return Plan(
      t=t,
      t_next=t_next,
      noise_step=noise_steps(t),
      record=np.ones(n, bool),
      coef=dict(loop_t=np.ascontiguousarray(loop_t[::-1], np.int32)),
      tables=loop_diffusion,
      static=(respaced,),
    )

  def step(self, carry, model_output, t, t_next, ctx):
    x = carry
    (respaced,) = ctx.static
    loop_diffusion = ctx.tables
    loop_t = jnp.full((x.shape[0],), ctx.coef["loop_t"], dtype=jnp.int32)
    if respaced and ctx.diffusion.model_mean_type == "xprev":
      model_output = xprev_to_respaced(ctx.diffusion, loop_diffusion, model_output, x, ctx.t_vec, loop_t)
    out = loop_diffusion.p_sample(model_output, x, loop_t, ctx.noise, clip_denoised=ctx.clip_denoised)
    return out["sample"], out["pred_xstart"]


ANCESTRAL = registry.register(
  Ancestral(
    name="ancestral",
    description="DDPM ancestral sampling (Ho et al. 2020), respaced on fewer steps (Nichol & Dhariwal 2021)",
    spacings=grids.TIMESTEP_SPACINGS,
  )
)
