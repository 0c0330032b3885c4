"""Image editing helpers: SDEdit's strength → timestep and the forward process under the package's noise scheme.

SDEdit (Meng et al. 2022) diffuses an image to an intermediate timestep t and
runs the reverse process from there. Here `strength` s ∈ (0, 1] picks

  t = max(round(s·T), 1) − 1,

so s = 1 is the top timestep T − 1 (x_t is then nearly pure noise) and any
s ≤ 1.5/T is t = 0, the smallest edit. The noised image of example b is

  x_t[b] = √ᾱ_t·x_0[b] + √(1 − ᾱ_t)·normal(fold_in(key_b, 0), shape[1:]),   key_b = fold_in(rng, indices[b]),

i.e. `GaussianDiffusion.q_sample` with the noise that `samplers.sample` would
draw as x_T: a chain started from x_t draws only step noise (keys t + 1 ≥ 1),
so the two never share a draw, and the result depends only on (rng, index)
like every sample of the package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.samplers import driver


def strength_to_timestep(strength, num_timesteps: int) -> int:
  """SDEdit's timestep of `strength` in (0, 1]: max(round(strength·T), 1) − 1 (module docstring)."""
  if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
    raise errors.UserError(f"strength must be a number in (0, 1], got {strength!r}.")
  if not (np.isfinite(strength) and 0 < strength <= 1):
    raise errors.UserError(
      f"strength must lie in (0, 1] (the fraction of the diffusion to noise to; 1 = pure noise), got {strength!r}."
    )
  return max(int(round(float(strength) * int(num_timesteps))), 1) - 1


@jax.jit
def q_sample_indexed(diffusion, rng, indices, x0, t):
  """x_t of images x0 [B, ...] at the integer timestep t, with the noise scheme's x_T noise (module docstring)."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)
  noise = driver.per_example_normal(keys, 0, x0.shape[1:])
  return diffusion.q_sample(x0.astype(jnp.float32), jnp.full((x0.shape[0],), t, jnp.int32), noise)
