"""DDIM inversion: the deterministic DDIM ODE run from an image x_0 up to the top of the grid.

On the ascending DDIM grid s_0 < s_1 < ... < s_{n−1} of a `ddim` spec (the
timesteps that `sample`/`denoise` with the same spec visit, descending), step
i goes from the current point x (x_0 for i = 0, else x_{s_{i−1}}) to
x_{s_i}:

  ε̂ = ε(x, e_i),  x̂_0 = (x − √(1 − ᾱ_{s_{i−1}})·ε̂)/√ᾱ_{s_{i−1}}  (x itself for i = 0),
  x_{s_i} = √ᾱ_{s_i}·x̂_0 + √(1 − ᾱ_{s_i})·ε̂,

with the network evaluated at the CURRENT point. Its timestep label e_i is
`network_t`'s:

* "target" (the default; for ε-models diffusers' `DDIMInverseScheduler` as
  its inversion pipelines call it, which for x_0- and v-models instead keeps
  the output's x̂_0): e_i = s_i, the timestep the step goes to, the one at
  which the forward (decoding) step from x_{s_i} evaluates the network. Only
  the point differs from the forward step's, so the round trip is exact to
  first order in the step; on the digits quickstart model its round-trip
  error is about half the other's (docs/editing.md).
* "current": e_i = s_{i−1}, the point's own timestep (ε̂ and x̂_0 are then the
  network's predictions at (x, s_{i−1})). Where x̂_0 does not depend on x (a
  point-mass data distribution and its exact ε-model), step i then inverts
  the forward step from s_i to s_{i−1} exactly.

The first step, from x_0 (ᾱ = 1, no timestep of its own), evaluates the
network at x_0 with timestep s_0 in both. ε̂ is read from the network output
at its label's level (eps, xstart or v) and recomputed from the (optionally
clipped) x̂_0, as in the `ddim` sampler. Decoding the latent x_{s_{n−1}} with
`denoise(..., t=s_{n−1})` (or `sample` from it, the same chain on the `even`
grid, whose top is T − 1) gives the image back only approximately, more
closely with more steps. n network calls for n steps.

Grids: the forward `ddim` chain on the `even` and `leading` spacings visits
exactly these timesteps, and on `trailing` when n divides T; otherwise
(and on `linspace`) its steps go to t − T // n, which need not be grid timesteps (see
`ddim`), and the inverse is of the grid, not of that chain. At few steps
`trailing` round-trips more closely than `even` (whose first step, from the
image to s_0 = 0, is nearly the identity). x̂_0 clipping is off by default:
clipping is not invertible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.samplers import checks
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import grids


def inversion_grid(spec) -> np.ndarray:
  """[n] int32 ascending timesteps s_0 < ... < s_{n−1}: the `ddim` grid of `spec`, in inversion order."""
  grid = grids.timestep_grid(spec.timestep_spacing, spec.num_timesteps, spec.num_steps, family="ddim")
  return np.ascontiguousarray(grid[::-1]).astype(np.int32)


NETWORK_T = ("target", "current")


@functools.partial(jax.jit, static_argnames=("clip_denoised", "channels", "trajectory", "network_t"))
def _invert(diffusion, model_fn, x0, xs, guidance, *, clip_denoised, channels, trajectory, network_t):
  """The scanned inversion over rows xs = dict(t_eval, t_cur, t_next, first), from x0."""
  batch = x0.shape[0]

  def body(x, row):
    t_vec = jnp.full((batch,), row["t_eval"], jnp.int32)
    out = guidance.model_output(model_fn, x, t_vec, channels)
    if network_t == "current":
      pred_xstart = driver.predict_xstart(diffusion, clip_denoised, out, x, t_vec)
      eps = diffusion.predict_eps_from_xstart(x, t_vec, pred_xstart)
    else:
      # ε̂ as the network gives it at its label's level; x̂_0 from it at the point's own level.
      t_cur = jnp.full((batch,), row["t_cur"], jnp.int32)
      eps = diffusion.predict_eps_from_xstart(x, t_vec, driver.predict_xstart(diffusion, False, out, x, t_vec))
      pred_xstart = diffusion.predict_xstart_from_eps(x, t_cur, eps)
      if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        eps = diffusion.predict_eps_from_xstart(x, t_cur, pred_xstart)
    x_hat = jnp.where(row["first"], x, pred_xstart)
    a_next = jnp.take(diffusion.alphas_cumprod, row["t_next"])
    x_next = jnp.sqrt(a_next) * x_hat + jnp.sqrt(1.0 - a_next) * eps
    return x_next, (x_next if trajectory else None)

  x, traj = jax.lax.scan(body, x0.astype(jnp.float32), xs)
  result = dict(latents=x)
  if trajectory:
    result["trajectory"] = jnp.moveaxis(traj, 0, 1)
  return result


def invert(
  diffusion,
  model_fn,
  x0,
  spec,
  *,
  clip_denoised: bool = False,
  trajectory: bool = False,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
  network_t: str = "target",
) -> dict:
  """Encodes images x0 into DDIM latents by running the DDIM ODE upwards (module docstring).

  Args:
    diffusion: the diffusion the model was trained with (concrete tables).
    model_fn: model_fn(x_t, t) -> model output, as in `samplers.sample` (model_fn(x_t, t, cond) with labels).
    x0: [B, ...] float images in [-1, 1].
    spec: a `ddim` SamplerSpec with η = 0 (or the name "ddim"); its grid is the inversion's.
    clip_denoised: clip x̂_0 to [-1, 1] (off by default: clipping is not invertible).
    trajectory: also return every point x_{s_0}, ..., x_{s_{n−1}}.
    cond, guidance_scale, null_label: classifier-free guidance, as in `samplers.sample`.
    network_t: the network's timestep in step i, "target" (s_i) or "current" (s_{i−1}) (module docstring).

  Returns:
    dict with `latents` [B, ...] float32, the point at timestep `t`; `t`, the Python int s_{n−1} to pass to
    `denoise(..., t=t)` with the same spec to decode; with `trajectory`, `trajectory` [B, n, ...], x at s_0..s_{n−1}.

  Raises:
    UserError: a spec that is not `ddim` with η = 0, or bad arguments.
  """
  spec, _ = checks.spec_and_eta(diffusion, spec, None)
  if spec.name != "ddim" or spec.eta != 0:
    raise errors.UserError(
      f"DDIM inversion needs the deterministic ddim sampler (eta=0), got {spec.name!r} with eta={spec.eta}."
    )
  clip_denoised, _ = checks.flags(clip_denoised, 0)
  checks.batched_float(x0, "x0")
  guidance = checks.guidance(cond, guidance_scale, null_label, jnp.shape(x0)[0])
  if network_t not in NETWORK_T:
    raise errors.UserError(f"network_t must be one of {', '.join(NETWORK_T)}, got {network_t!r}.")
  steps = inversion_grid(spec)
  previous = np.concatenate([steps[:1], steps[:-1]])
  xs = dict(
    t_eval=jnp.asarray(previous if network_t == "current" else steps, jnp.int32),
    t_cur=jnp.asarray(previous, jnp.int32),
    t_next=jnp.asarray(steps, jnp.int32),
    first=jnp.asarray(np.arange(steps.size) == 0),
  )
  result = _invert(
    diffusion,
    checks.as_partial(model_fn),
    x0,
    xs,
    guidance,
    clip_denoised=clip_denoised,
    channels=int(jnp.shape(x0)[-1]),
    trajectory=bool(trajectory),
    network_t=network_t,
  )
  return dict(result, t=int(steps[-1]))
