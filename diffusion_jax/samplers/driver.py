"""The one driver of every sampler: a single `lax.scan` over the network calls of a `Plan`.

The driver owns what all samplers share: the network call (with classifier-free
guidance), the per-sample noise of the package's noise scheme, x_0 prediction
and clipping (`StepContext.predict_xstart`), and the progressive buffers. The
sampler (`base.Sampler`) owns its grid, carry and update.

Classifier-free guidance: `request.Guidance.model_output` (the network call of every chain).

Inpainting (`known`: the image x_0 and a mask, True = keep). Before each
network call the known pixels of the sampler's current point are replaced by a
draw of the forward process at that call's noise level,

  x_t[known] = α·x_0 + σ·z,   (α, σ) = `Sampler.signal_noise` of the call (√ᾱ_t, √(1 − ᾱ_t) at an integer t),
  z[b]       = normal(fold_in(fold_in(key_b, KNOWN_STREAM), t + 1), shape[1:]),

(t + 1 is the call's `noise_step`, floored for fractional t), written into
the carry with `Sampler.with_input`. So the known region the network sees at
timestep t has exactly the marginal q(x_t | x_0) of that timestep, with noise
independent of the step noise (a separate stream of key_b), and every sampler
and guidance setting get the same treatment. After the last step the known
pixels of the output are x_0 itself. Without `known` the compiled chain is
the one of plain sampling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.base import Plan
from diffusion_jax.samplers.base import Sampler
from diffusion_jax.samplers.base import StepContext
from diffusion_jax.samplers.request import Request

# fold_in(key_b, KNOWN_STREAM) keys the forward-process noise of the known pixels (inpainting).
KNOWN_STREAM = 0x696E7061


def per_example_normal(keys, step, shape):
  """[B, *shape] standard normals, row b from fold_in(keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype=jnp.float32))(keys)


def _write_slot(buf, slot, value, write):
  """buf[:, slot] = value where `write`; buf is [B, K, ...]."""
  old = jax.lax.dynamic_index_in_dim(buf, slot, axis=1, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(write, value, old), slot, axis=1)


def predict_xstart(diffusion, clip_denoised, model_output, x_t, t_vec, *, alpha=None, sigma=None):
  """The x_0 prediction of a model output at x_t, clipped to [-1, 1] when `clip_denoised`.

  With alpha/sigma None it is `GaussianDiffusion.p_mean_variance`'s (the tables
  at the integer timesteps t_vec); otherwise x_t = alpha·x_0 + sigma·ε with the
  given (per-call) coefficients: x_0 = (x_t − sigma·ε)/alpha for eps,
  alpha·x_t − sigma·v for v, the output itself for xstart, and the tables at
  t_vec for xprev. Learned-variance outputs use their mean channels.
  """
  if alpha is None:
    return diffusion.p_mean_variance(model_output, x_t, t_vec, clip_denoised=clip_denoised)["pred_xstart"]
  mean_out, _ = diffusion._split_output(model_output, x_t)  # pylint: disable=protected-access
  mean_type = diffusion.model_mean_type
  if mean_type == "eps":
    x0 = (x_t - sigma * mean_out) / alpha
  elif mean_type == "v":
    x0 = alpha * x_t - sigma * mean_out
  elif mean_type == "xstart":
    x0 = mean_out
  else:
    x0 = diffusion.predict_xstart_from_xprev(x_t, t_vec, mean_out)
  return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0


@functools.partial(
  jax.jit,
  static_argnames=(
    "sampler",
    "spec",
    "static",
    "shape",
    "clip_denoised",
    "progressive_every",
    "num_slots",
  ),
)
def _run(
  diffusion,
  tables,
  model_fn,
  rng,
  indices,
  x_t,
  xs,
  eta,
  guidance,
  known=None,
  *,
  sampler: Sampler,
  spec,
  static,
  shape,
  clip_denoised,
  progressive_every,
  num_slots,
):
  """The scanned chain over the plan's calls `xs`, from x_t (or x_T ~ N(0, I) if None); `known`: inpainting."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)
  if known is not None:
    known_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, KNOWN_STREAM)
  if x_t is None:
    x_t = per_example_normal(keys, 0, shape[1:])
  x_t = x_t.astype(jnp.float32)
  batch, channels = x_t.shape[0], x_t.shape[-1]
  eta = jnp.asarray(eta, jnp.float32)
  stochastic = sampler.stochastic(spec)
  first_coef = jax.tree_util.tree_map(lambda a: a[0], xs["coef"])
  state = sampler.init(x_t, first_coef)

  def body(carry, row):
    state, bufs = carry
    coef = row["coef"]
    x_in = sampler.model_input(state, coef)
    if known is not None:
      alpha, sigma = sampler.signal_noise(diffusion, coef, row["t"])
      z = per_example_normal(known_keys, row["noise_step"], x_in.shape[1:])
      x_in = jnp.where(known["mask"], alpha * known["x0"] + sigma * z, x_in)
      state = sampler.with_input(state, x_in, coef)
    t_vec = jnp.full((batch,), row["t"], dtype=row["t"].dtype)
    model_output = guidance.model_output(model_fn, x_in, t_vec, channels)
    noise = per_example_normal(keys, row["noise_step"], x_in.shape[1:]) if stochastic else None
    ctx = StepContext(
      diffusion=diffusion,
      tables=tables,
      coef=coef,
      t_vec=t_vec,
      noise=noise,
      eta=eta,
      clip_denoised=clip_denoised,
      static=static,
      predict_xstart=lambda out, x, alpha=None, sigma=None: predict_xstart(
        diffusion, clip_denoised, out, x, t_vec, alpha=alpha, sigma=sigma
      ),
    )
    state, pred_xstart = sampler.step(state, model_output, row["t"], row["t_next"], ctx)
    if progressive_every:
      pred_buf, traj_buf = bufs
      bufs = (
        _write_slot(pred_buf, row["slot"], pred_xstart, row["write"]),
        _write_slot(traj_buf, row["slot"], x_in, row["write"]),
      )
    return (state, bufs), None

  if progressive_every:
    buf = jnp.zeros((batch, num_slots) + x_t.shape[1:], jnp.float32)
    bufs = (buf, buf)
  else:
    bufs = ()
  (state, bufs), _ = jax.lax.scan(body, (state, bufs), xs)
  samples = sampler.output(state)
  if known is not None:
    samples = jnp.where(known["mask"], known["x0"], samples)
  result = dict(samples=samples)
  if progressive_every:
    result["pred_xstart"], result["trajectory"] = bufs
  return result


def progressive_slots(record: np.ndarray, every: int):
  """(slot [N] int32, write [N] bool, K) of the progressive buffers.

  Steps are counted from the end: step j = 0 is the last; slot K−1−m holds
  step m·every, so the slots are in sampling order and the last is the final
  step's x_0 prediction; K = ceil(n/every) for n steps.
  """
  n = int(np.sum(record))
  if not every:
    return np.zeros(record.shape, np.int32), np.zeros(record.shape, bool), 0
  num_slots = -(-n // every)
  j = n - np.cumsum(record)  # the step index counted from the end, at each recorded call
  slot = np.where(record, (num_slots - 1) - j // every, 0).astype(np.int32)
  write = record & (j % every == 0)
  return slot, write, num_slots


def run(diffusion, model_fn, rng, indices, x_t, request: Request, plan: Plan, *, shape, known=None):
  """Runs `request.spec.sampler` over `plan`; see `chains.sample` for the arguments and the result.

  `known`: None, or dict(x0=[B, ...] float32 images, mask=[B, ...] bool, True = keep) for inpainting (module
  docstring).
  """
  slot, write, num_slots = progressive_slots(plan.record, request.progressive_every)
  xs = dict(
    t=jnp.asarray(plan.t),
    t_next=jnp.asarray(plan.t_next),
    noise_step=jnp.asarray(plan.noise_step, jnp.int32),
    coef={k: jnp.asarray(v) for k, v in plan.coef.items()},
  )
  if request.progressive_every:
    xs["slot"], xs["write"] = jnp.asarray(slot), jnp.asarray(write)
  return _run(
    diffusion,
    plan.tables,
    model_fn,
    rng,
    indices,
    x_t,
    xs,
    request.eta,
    request.guidance,
    known,
    sampler=request.spec.sampler,
    spec=_static_spec(request.spec),
    static=plan.static,
    shape=shape,
    clip_denoised=request.clip_denoised,
    progressive_every=request.progressive_every,
    num_slots=num_slots,
  )


def _static_spec(spec):
  """The spec with η zeroed: η is a traced argument, so new values do not recompile."""
  return spec.with_eta(0.0)
