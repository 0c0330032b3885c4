"""RePaint's resampling (Lugmayr et al. 2022) for the ancestral sampler: inpainting that goes back up and redoes.

Plain inpainting (`samplers.inpaint`) replaces the known pixels before each
network call; the unknown pixels then see the known ones only through one
reverse step each. RePaint harmonises them by jumping back up the chain: after
every `jump_length` reverse steps (at chain positions that are multiples of
`jump_length`), the chain is diffused forward again by `jump_length` steps with
q(x_{t'} | x_t) and those steps are redone, `jump_n_sample − 1` times. The time
sequence is RePaint's `get_schedule_jump` time list, stepped as diffusers'
`RePaintScheduler` steps it (a reverse step leaves time s for s − 1), in
0-based chain positions (`schedule`), run as one `lax.scan`: a row is either a reverse step at position
i (one network call, the known pixels replaced by q_sample(x0, s_i, z) first,
as in `driver`) or a forward step i → i + 1 (no network call).

The chain is the ancestral sampler's: all T timesteps, or a respaced subset
s_0 < … < s_{n−1} (RePaint itself runs a 1000-step model on 250 steps). On a
respaced chain the reverse step is the respaced process's (`grids.respace`,
the network called at the original s_i) and the forward step from s_i to
s_{i+1} is q(x_{s_{i+1}} | x_{s_i}) = N(√(1 − β'_{i+1})·x, β'_{i+1}·I) with
β'_{i+1} = 1 − ᾱ_{s_{i+1}}/ᾱ_{s_i}, so a forward step undoes exactly the
marginal a reverse step removes. `resample_range` limits the jumps to a window
of timesteps (as RePaint's `start_resampling` does in chain positions), since
every pass multiplies the network calls there: `schedule` returns their count.

Noise. Example b's key is key_b = fold_in(rng, indices[b]); x_T is
normal(fold_in(key_b, 0)) as in `samplers.sample`. The v-th visit (v = 0, 1,
…) of timestep s draws its step noise from fold_in(key_b, s + 1) for v = 0
(the noise of plain ancestral sampling) and from a separate stream for
v > 0 (fold_in(base, RESAMPLE_STREAM + v) of the step's and of the known
pixels' own base keys, `driver.KNOWN_STREAM` for the latter); a forward step
draws from its own stream. With `jump_n_sample = 1` the chain is
exactly `samplers.inpaint` with the ancestral sampler on the same timesteps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.samplers import ancestral
from diffusion_jax.samplers import checks
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import grids

RESAMPLE_STREAM = 0x72657361  # fold_in(base, RESAMPLE_STREAM + v): noise of the v-th revisit (v ≥ 1)
FORWARD_STREAM = 0x666F7277  # fold_in(key_b, FORWARD_STREAM): noise of the forward (back-up) steps


def schedule(
  num_steps: int, jump_length: int, jump_n_sample: int, *, allowed=None
) -> tuple[np.ndarray, np.ndarray, int]:
  """RePaint's time sequence over chain positions 0..n−1: (i [N] int32, up [N] bool, network calls).

  Row k is a reverse step at position i[k] (up False: x_{s_i} → x_{s_{i−1}}, one network call) or a forward
  step i[k] → i[k] + 1 (up True). The chain starts at n − 1 and its last row is the reverse step at 0.
  `allowed(j) -> bool` (default: always) says whether the stretch of positions j..j + jump_length − 1 may be
  redone; the jumps elsewhere are dropped (`resample_range`).
  """
  for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise errors.UserError(f"{name} must be an integer >= 1, got {value!r}.")
  if jump_length >= num_steps:
    raise errors.UserError(f"jump_length={jump_length} must be below the chain's {num_steps} steps.")
  # RePaint's get_schedule_jump over 1-based times n..0; a reverse step leaves time s for s − 1, i.e. it runs at
  # our 0-based position s − 1.
  jumps = {
    j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length) if allowed is None or allowed(j)
  }
  s, times = num_steps, [num_steps]
  while s >= 1:
    s -= 1
    times.append(s)
    if jumps.get(s, 0) > 0:
      jumps[s] -= 1
      for _ in range(jump_length):
        s += 1
        times.append(s)
  ts, up = [], []
  for a, b in zip(times[:-1], times[1:]):
    if b < a:
      ts.append(a - 1)  # reverse step at 0-based position a − 1
      up.append(False)
    else:
      ts.append(b - 2)  # forward step from 0-based position b − 2 to b − 1
      up.append(True)
  ts, up = np.asarray(ts, np.int32), np.asarray(up, bool)
  return ts, up, int(np.sum(~up))


def _visits(ts: np.ndarray, up: np.ndarray) -> np.ndarray:
  """[N] how many times each row's timestep was visited before by a row of the same kind."""
  seen: dict = {}
  out = np.zeros(ts.shape, np.int32)
  for i, (t, u) in enumerate(zip(ts.tolist(), up.tolist())):
    out[i] = seen.get((t, u), 0)
    seen[(t, u)] = out[i] + 1
  return out


def forward_step(loop_diffusion, x, i, noise):
  """Chain position i → i + 1: a draw of q(x_{s_{i+1}} | x_{s_i}), variance β'_{i+1} = 1 − ᾱ_{s_{i+1}}/ᾱ_{s_i}."""
  beta = loop_diffusion.betas[i + 1]
  return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise


@functools.partial(jax.jit, static_argnames=("clip_denoised", "respaced"))
def _run(diffusion, loop_diffusion, model_fn, rng, indices, x0, mask, rows, guidance, *, clip_denoised, respaced):
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)
  known_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, driver.KNOWN_STREAM)
  forward_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, FORWARD_STREAM)
  shape = x0.shape
  x0 = x0.astype(jnp.float32)
  x = driver.per_example_normal(keys, 0, shape[1:])

  def stream(base, visit):
    """The keys of the v-th visit: `base` for v = 0, else a stream of `base` (so step and known noise differ)."""
    again = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, RESAMPLE_STREAM + visit)
    return jax.tree.map(lambda a, b: jnp.where(visit == 0, a, b), base, again)

  def reverse(x, row):
    t, visit = row["t"], row["visit"]
    t_vec = jnp.full((shape[0],), t, jnp.int32)  # the original timestep s_i: the network's and the noise's
    loop_t = jnp.full((shape[0],), row["i"], jnp.int32)  # the chain position i: the respaced tables'
    known_noise = driver.per_example_normal(stream(known_keys, visit), t + 1, shape[1:])
    known = diffusion.q_sample(x0, t_vec, known_noise)
    x_in = jnp.where(mask, known, x)
    noise = driver.per_example_normal(stream(keys, visit), t + 1, shape[1:])
    model_output = guidance.model_output(model_fn, x_in, t_vec, shape[-1])
    if respaced and diffusion.model_mean_type == "xprev":
      model_output = ancestral.xprev_to_respaced(diffusion, loop_diffusion, model_output, x_in, t_vec, loop_t)
    return loop_diffusion.p_sample(model_output, x_in, loop_t, noise, clip_denoised=clip_denoised)["sample"]

  def forward(x, row):
    return forward_step(loop_diffusion, x, row["i"], driver.per_example_normal(forward_keys, row["index"], shape[1:]))

  def body(x, row):
    return jax.lax.cond(row["up"], forward, reverse, x, row), None

  x, _ = jax.lax.scan(body, x, rows)
  return jnp.where(mask, x0, x)


def repaint(
  diffusion,
  model_fn,
  rng,
  indices,
  x0,
  mask,
  *,
  timesteps=None,
  jump_length: int = 10,
  jump_n_sample: int = 10,
  resample_range: tuple[int, int] | None = None,
  clip_denoised: bool = True,
  cond=None,
  guidance_scale=1.0,
  null_label: int | None = None,
) -> dict:
  """Inpaints with the ancestral sampler and RePaint's resampling (module docstring).

  Args:
    diffusion: the diffusion the model was trained with.
    model_fn: model_fn(x_t, t) -> model output (a `jax.tree_util.Partial` avoids recompiling for new params).
    rng, indices: as in `samplers.sample` (the noise of example b depends on (rng, indices[b]) only).
    x0: [B, ...] float images in [-1, 1] (only the known pixels are read).
    mask: 1 = known, 0 = to sample; x0's shape or missing trailing axes of size 1, broadcast.
    timesteps: the chain, strictly increasing timesteps in [0, T) (the ancestral sampler's grid,
      `ancestral.chain_timesteps`); None: all T.
    jump_length: reverse steps between jumps back up, and the length of each jump (RePaint: 10).
    jump_n_sample: passes over each stretch (1 = no resampling; RePaint: 10).
    resample_range: (lo, hi): redo only the stretches whose timesteps all lie in lo <= t < hi; None: all.
    clip_denoised: clip the x_0 predictions (the paper's sampler).
    cond, guidance_scale, null_label: classifier-free guidance, as in `samplers.sample`.

  Returns:
    dict(samples [B, ...] with the known pixels x0's exactly, network_calls per image).
  """
  checks.batched_float(x0, "x0")
  x0 = jnp.asarray(x0)
  mask = checks.mask(mask, x0.shape)
  clip_denoised, _ = checks.flags(clip_denoised, 0)
  guidance = checks.guidance(cond, guidance_scale, null_label, x0.shape[0])
  steps = np.arange(diffusion.num_timesteps, dtype=np.int32) if timesteps is None else np.asarray(timesteps)
  steps = grids.check_timesteps(steps, diffusion.num_timesteps).astype(np.int32)
  allowed = None
  if resample_range is not None and jump_n_sample == 1:
    raise errors.UserError(
      f"resample_range={resample_range!r} limits RePaint's resampling, and jump_n_sample=1 (resample=1) does none: "
      "pass jump_n_sample (resample) > 1, or leave resample_range=None."
    )
  if resample_range is not None:
    lo, hi = _check_range(resample_range, diffusion.num_timesteps)
    allowed = lambda j: lo <= steps[j] and steps[j + jump_length - 1] < hi  # noqa: E731
  ts, up, calls = schedule(steps.size, jump_length, jump_n_sample, allowed=allowed)
  if resample_range is not None and jump_n_sample > 1 and calls == steps.size:
    raise errors.UserError(
      f"resample_range={tuple(resample_range)} holds no stretch of {jump_length} chain steps (timesteps "
      f"{steps.tolist() if steps.size <= 12 else '…'}), so nothing would be resampled: widen it or shorten jump_length."
    )
  rows = dict(
    i=jnp.asarray(ts),
    t=jnp.asarray(steps[ts]),
    up=jnp.asarray(up),
    visit=jnp.asarray(_visits(ts, up)),
    index=jnp.arange(len(ts), dtype=jnp.int32),
  )
  respaced = steps.size != diffusion.num_timesteps
  loop_diffusion = grids.respace(diffusion, steps) if respaced else diffusion
  checks.indices(indices, x0.shape[0])
  samples = _run(
    diffusion,
    loop_diffusion,
    checks.as_partial(model_fn),
    rng,
    jnp.asarray(indices),
    x0,
    mask,
    rows,
    guidance,
    clip_denoised=clip_denoised,
    respaced=respaced,
  )
  return dict(samples=samples, network_calls=calls)


def _check_range(resample_range, num_timesteps: int) -> tuple[int, int]:
  """(lo, hi) integers with 0 <= lo < hi <= T, or a UserError."""
  try:
    lo, hi = (int(v) for v in resample_range)
    ok = all(float(v) == int(v) for v in resample_range) and 0 <= lo < hi <= num_timesteps
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise errors.UserError(
      f"resample_range must be two integer timesteps (lo, hi) with 0 <= lo < hi <= T={num_timesteps} "
      f"(resampling where lo <= t < hi), got {resample_range!r}."
    )
  return lo, hi
