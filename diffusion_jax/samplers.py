"""Reverse-process samplers: ancestral (full or respaced), DDIM, progressive, interpolation.

Every sampler runs the whole chain as one `lax.scan`, built from the pure
functions of `diffusion.GaussianDiffusion`, and calls the network as
`model_fn(x_t, t) -> model_output` with `t` a [B] int32 array of ORIGINAL
timesteps in [0, T), whatever subset of timesteps is used.

Samplers:
  * `ancestral`: the reference code's `p_sample_loop` (Ho et al. 2020), from
    T-1 down to 0, with x_0 clipping by default and no noise at t = 0. With
    `num_steps < T` it runs on the evenly spaced subset of `space_timesteps`
    with the betas recomputed from ᾱ on that subset (Nichol & Dhariwal 2021,
    "respacing"): β'_i = 1 − ᾱ_{s_i} / ᾱ_{s_{i-1}}.
  * `ddim`: Song et al. (2021), eq. 12, on the same subsets, with `eta` = 0
    deterministic and `eta` = 1 the ancestral sampler with σ² = β̃ (fixedsmall).

Noise scheme. The noise of example b depends only on (rng, indices[b]), where
`indices` holds GLOBAL sample indices, so a given rng gives the same images
whatever the batch size or the number of devices and processes:

  key_b      = fold_in(rng, indices[b])
  x_T[b]     = normal(fold_in(key_b, 0), shape[1:])
  z_t[b]     = normal(fold_in(key_b, t + 1), shape[1:])   # noise of the step leaving ORIGINAL timestep t

Because steps are keyed by their original timestep, a respaced run with all
T steps draws exactly the noise of the full run.

Jitting and sharding. The public functions validate their arguments and build
any respaced tables eagerly, in NumPy, then call one jitted function whose
static arguments are the sampler name, the flags and the image shape; the
timesteps, `eta`, rng and indices are traced, so repeated calls with the same
shapes do not recompile. `model_fn` is passed as a `jax.tree_util.Partial`
(wrapped if it is not one): pass `Partial(apply_fn, params)` so that new
parameters reuse the compiled loop. Every per-example array is batch-first, so
the functions run under `jax.jit` with `NamedSharding(mesh, P('data'))` inputs
and outputs. Respacing the ancestral sampler needs the diffusion's tables as
concrete values: close over the diffusion rather than passing it as a traced
argument of an outer `jax.jit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import GaussianDiffusion

SAMPLERS = ("ancestral", "ddim")

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------
# Timestep subsets and respacing.
# ----------------------------------------------------------------------------


def _check_num_steps(num_timesteps: int, num_steps: int) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(
        f"num_steps must be an integer in [1, {num_timesteps}] (or None for all steps), got {num_steps!r}."
    )
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(
        f"num_steps={num_steps} is out of range: use an integer in [1, {num_timesteps}] "
        f"(the diffusion has T={num_timesteps} steps), or None for all of them."
    )
  return int(num_steps)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The evenly spaced subset of timesteps used by a sampler with `num_steps` steps.

  As Nichol & Dhariwal's `space_timesteps` with one section: s_i =
  round(i·(T−1)/(n−1)) (halves rounded up), so 0 and T−1 are always included
  and `num_steps = T` gives every timestep. A single step uses T−1 alone, the
  only choice that starts from pure noise.

  Args:
    num_timesteps: T, the number of steps of the diffusion.
    num_steps: n, the number of steps to use, in [1, T].

  Returns:
    int32 array [n] of strictly increasing timesteps in [0, T).

  Raises:
    ValueError: if `num_steps` is not an integer in [1, T].
  """
  num_timesteps = int(num_timesteps)
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}.")
  n = _check_num_steps(num_timesteps, num_steps)
  if n == 1:
    return np.array([num_timesteps - 1], dtype=np.int32)
  i = np.arange(n, dtype=np.int64)
  # floor(i·(T−1)/(n−1) + 1/2) in exact integer arithmetic; the stride is ≥ 1, so no duplicates.
  return ((2 * i * (num_timesteps - 1) + (n - 1)) // (2 * (n - 1))).astype(np.int32)


def _check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
  timesteps = np.asarray(timesteps)
  if timesteps.ndim != 1 or timesteps.size == 0 or not np.issubdtype(timesteps.dtype, np.integer):
    raise ValueError(f"timesteps must be a non-empty 1-D integer array, got {timesteps!r}.")
  if np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= num_timesteps:
    raise ValueError(
        f"timesteps must be strictly increasing and lie in [0, {num_timesteps}), got {timesteps.tolist()}; "
        "use space_timesteps(T, num_steps)."
    )
  return timesteps.astype(np.int32)


def _concrete(x, what: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(
        f"{what} needs concrete values, but got a traced array; build the GaussianDiffusion outside "
        "jax.jit and close over it instead of passing it as a jitted argument."
    ) from e


def respace(diffusion: GaussianDiffusion, timesteps) -> GaussianDiffusion:
  """The diffusion restricted to a subset of its timesteps (Nichol & Dhariwal 2021).

  Step i of the new process goes from ᾱ_{s_i} to ᾱ_{s_{i-1}} (ᾱ_{s_{-1}} = 1),
  so β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i-1}}; ᾱ is recomputed in float64 from the
  stored betas (a ratio of float32 ᾱ's would lose the small betas). The types
  are kept. The network must still be called with the ORIGINAL timestep s_i.
  All T timesteps return `diffusion` itself.

  Args:
    diffusion: the diffusion, with concrete (not traced) tables.
    timesteps: [n] strictly increasing timesteps in [0, T), e.g. from
      `space_timesteps`.

  Returns:
    A GaussianDiffusion with n steps.

  Raises:
    ValueError: for bad timesteps or traced tables.
  """
  num_timesteps = diffusion.num_timesteps
  timesteps = _check_timesteps(timesteps, num_timesteps)
  if timesteps.size == num_timesteps:
    return diffusion
  betas = _concrete(diffusion.betas, "respace").astype(np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[timesteps[:-1]])
  new_betas = 1.0 - alphas_cumprod[timesteps] / alphas_cumprod_prev
  return GaussianDiffusion.create(
      new_betas,
      model_mean_type=diffusion.model_mean_type,
      model_var_type=diffusion.model_var_type,
      loss_type=diffusion.loss_type,
      hybrid_lambda=diffusion.hybrid_lambda,
  )


# ----------------------------------------------------------------------------
# The jitted reverse loop.
# ----------------------------------------------------------------------------


def _per_example_normal(keys, step, shape):
  """[B, *shape] standard normals, row b from fold_in(keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype=jnp.float32))(keys)


def _write_slot(buf, slot, value, write):
  """buf[:, slot] = value where `write`; buf is [B, K, ...]."""
  old = jax.lax.dynamic_index_in_dim(buf, slot, axis=1, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(write, value, old), slot, axis=1)


def _xprev_to_respaced(diffusion, loop_diffusion, model_output, x_t, t, loop_t):
  """Re-expresses an `xprev` output (one original step) as the posterior mean of the respaced step.

  The network predicts the mean of x_{t-1}; a respaced step goes to x_{s_{i-1}}.
  Both are posterior means of the same (unclipped) x_0 prediction, so go
  through it; the variance channels, if any, are kept.
  """
  c = x_t.shape[-1]
  mean_out = model_output[..., :c].astype(jnp.float32)
  pred_xstart = diffusion.predict_xstart_from_xprev(x_t, t, mean_out)
  respaced_mean, _, _ = loop_diffusion.q_posterior_mean_variance(pred_xstart, x_t, loop_t)
  if loop_diffusion.learned_variance:
    return jnp.concatenate([respaced_mean, model_output[..., c:].astype(jnp.float32)], axis=-1)
  return respaced_mean


@functools.partial(
    jax.jit, static_argnames=("shape", "sampler", "respaced", "clip_denoised", "progressive_every")
)
def _run(
    diffusion,
    loop_diffusion,
    model_fn,
    rng,
    indices,
    x_t,
    model_timesteps,
    loop_timesteps,
    eta,
    *,
    shape,
    sampler,
    respaced,
    clip_denoised,
    progressive_every,
):
  """The reverse chain over `model_timesteps` [n] (ascending), from x_t (or x_T ~ N(0, I) if None)."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)
  if x_t is None:
    x_t = _per_example_normal(keys, 0, shape[1:])
  x_t = x_t.astype(jnp.float32)
  batch = x_t.shape[0]
  n = model_timesteps.shape[0]
  alphas_cumprod_prev = jnp.concatenate(
      [jnp.ones((1,), jnp.float32), jnp.take(diffusion.alphas_cumprod, model_timesteps[:-1])]
  )
  eta = jnp.asarray(eta, jnp.float32)

  def step(x, t_model, t_loop, a_prev):
    """(x_prev, pred_xstart) of the step from x at original timestep t_model."""
    t = jnp.full((batch,), t_model, dtype=jnp.int32)
    model_output = model_fn(x, t)
    noise = _per_example_normal(keys, t_model + 1, x.shape[1:])
    if sampler == "ancestral":
      loop_t = jnp.full((batch,), t_loop, dtype=jnp.int32)
      if respaced and diffusion.model_mean_type == "xprev":
        model_output = _xprev_to_respaced(diffusion, loop_diffusion, model_output, x, t, loop_t)
      out = loop_diffusion.p_sample(model_output, x, loop_t, noise, clip_denoised=clip_denoised)
      return out["sample"], out["pred_xstart"]
    # DDIM (Song et al. 2021, eq. 12), with ε recomputed from the (clipped) x_0 prediction.
    pred_xstart = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x, t, pred_xstart)
    a = jnp.take(diffusion.alphas_cumprod, t_model)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    # ≥ 0 in exact arithmetic for eta ≤ 1; the floor guards rounding (and eta > 1).
    eps_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - jnp.square(sigma), 0.0))
    return jnp.sqrt(a_prev) * pred_xstart + eps_coef * eps + sigma * noise, pred_xstart

  num_slots = -(-n // progressive_every) if progressive_every else 0

  def body(carry, xs):
    x, bufs = carry
    j, t_model, t_loop, a_prev = xs
    x_prev, pred_xstart = step(x, t_model, t_loop, a_prev)
    if progressive_every:
      # Slots in sampling order: slot K-1 is step j = 0 (the last), slot K-1-m is j = m·every.
      slot = (num_slots - 1) - j // progressive_every
      write = (j % progressive_every) == 0
      pred_buf, traj_buf = bufs
      bufs = (_write_slot(pred_buf, slot, pred_xstart, write), _write_slot(traj_buf, slot, x, write))
    return (x_prev, bufs), None

  if progressive_every:
    buf = jnp.zeros((batch, num_slots) + x_t.shape[1:], jnp.float32)
    bufs = (buf, buf)
  else:
    bufs = ()
  xs = (
      jnp.arange(n - 1, -1, -1, dtype=jnp.int32),
      jnp.flip(model_timesteps),
      jnp.flip(loop_timesteps),
      jnp.flip(alphas_cumprod_prev),
  )
  (x0, bufs), _ = jax.lax.scan(body, (x_t, bufs), xs)
  result = dict(samples=x0)
  if progressive_every:
    result["pred_xstart"], result["trajectory"] = bufs
  return result


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def _maybe_concrete(x):
  """x as a NumPy array, or None if it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_common(sampler, eta, clip_denoised, progressive_every):
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; valid choices are {', '.join(SAMPLERS)}.")
  eta_value = _maybe_concrete(eta)
  if eta_value is not None:
    if eta_value.ndim != 0 or not np.isfinite(eta_value) or eta_value < 0:
      raise ValueError(f"eta must be a finite scalar >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}.")
    if sampler == "ancestral" and eta_value != 0:
      raise ValueError(f"eta={eta!r} applies only to sampler='ddim'; use sampler='ddim' or eta=0.0.")
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise ValueError(f"clip_denoised must be a bool, got {clip_denoised!r}.")
  if (
      isinstance(progressive_every, bool)
      or not isinstance(progressive_every, (int, np.integer))
      or progressive_every < 0
  ):
    raise ValueError(f"progressive_every must be an integer >= 0 (0 = off), got {progressive_every!r}.")


def _check_indices(indices, batch):
  if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] != batch:
    raise ValueError(
        f"indices must have shape [B] = [{batch}] (the global index of each sample), got shape {jnp.shape(indices)}."
    )
  if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
    raise ValueError(f"indices must be integers (global sample indices), got dtype {jnp.result_type(indices)}.")


def _check_t(t, num_timesteps):
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < num_timesteps:
    raise ValueError(f"t must be a Python integer in [0, {num_timesteps}) (the timestep to start from), got {t!r}.")
  return int(t)


def _as_partial(model_fn):
  if isinstance(model_fn, jax.tree_util.Partial):
    return model_fn
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable as model_fn(x_t, t), got {model_fn!r}.")
  return jax.tree_util.Partial(model_fn)


def _steps_down_from(num_timesteps, num_steps, t):
  """The subset of `num_steps` steps at or below t, starting exactly at t."""
  base = space_timesteps(num_timesteps, num_timesteps if num_steps is None else num_steps)
  return np.union1d(base[base < t], [t]).astype(np.int32)


def _denoise_steps(
    diffusion, model_fn, rng, indices, x_t, steps, *, shape, sampler, eta, clip_denoised, progressive_every
):
  if sampler == "ddim":
    # DDIM needs only ᾱ at the original timesteps: no respaced tables.
    loop_diffusion, loop_timesteps, respaced = diffusion, steps, False
  elif np.array_equal(steps, np.arange(steps.size)):
    # A prefix 0..k-1 of the timesteps: the original tables are already those of the chain.
    loop_diffusion, loop_timesteps, respaced = diffusion, steps, False
  else:
    loop_diffusion = respace(diffusion, steps)
    loop_timesteps, respaced = np.arange(steps.size, dtype=np.int32), True
  return _run(
      diffusion,
      loop_diffusion,
      _as_partial(model_fn),
      rng,
      indices,
      x_t,
      jnp.asarray(steps, jnp.int32),
      jnp.asarray(loop_timesteps, jnp.int32),
      eta,
      shape=shape,
      sampler=sampler,
      respaced=respaced,
      clip_denoised=bool(clip_denoised),
      progressive_every=int(progressive_every),
  )


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    rng,
    indices,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progressive_every: int = 0,
) -> dict[str, Array]:
  """Draws samples by running the reverse process from x_T ~ N(0, I).

  Args:
    diffusion: the diffusion the model was trained with.
    model_fn: model_fn(x_t [B, ...], t [B] int32 original timesteps) -> model
      output, as `GaussianDiffusion.p_mean_variance` expects it. A
      `jax.tree_util.Partial(apply_fn, params)` avoids recompiling for new params.
    rng: a PRNG key (raw or typed).
    indices: [B] integer global sample indices; see the module's noise scheme.
    shape: the full output shape [B, H, W, C] (any [B, ...]).
    sampler: one of `SAMPLERS`.
    num_steps: steps to use, in [1, T]; None (or T) runs all T steps. Fewer
      steps use the timesteps of `space_timesteps`.
    eta: DDIM's noise scale, >= 0 (0 = deterministic); must be 0 for ancestral.
    clip_denoised: clip each x_0 prediction to [-1, 1] (the reference default).
    progressive_every: k > 0 also records, every k steps of the chain, the x_0
      prediction and the x_t it was made from (paper Fig. 6; the reference
      `p_sample_loop_progressive(include_xstartpred_freq=k)`).

  Returns:
    dict with `samples` [B, ...] float32 (in [-1, 1] for eps/xstart/v models
    with clipping; the last step returns the posterior mean at t = 0) and, when
    `progressive_every` = k > 0, `pred_xstart` and `trajectory`, each
    [B, K, ...] with K = ceil(n / k) for n steps, in sampling order: slot
    K−1−m holds step m·k of the chain counted from the end (step 0 is the last,
    at timestep 0 unless num_steps = 1), so the last slot is the x_0 prediction at t = 0 and the
    first `trajectory` slot is x_T when (n − 1) is a multiple of k. For n = T
    = 1000, k = 50 the slots are timesteps 950, 900, ..., 0: the reference's
    array in reverse order.

  Raises:
    ValueError: for an unknown sampler, num_steps outside [1, T], eta < 0 (or
      eta != 0 with ancestral), or indices that do not match the batch.
  """
  _check_common(sampler, eta, clip_denoised, progressive_every)
  num_timesteps = diffusion.num_timesteps
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f"shape must be the full batched shape [B, ...] (e.g. [B, H, W, C]), got {shape}.")
  _check_indices(indices, shape[0])
  steps = space_timesteps(num_timesteps, num_timesteps if num_steps is None else num_steps)
  return _denoise_steps(
      diffusion,
      model_fn,
      rng,
      indices,
      None,
      steps,
      shape=shape,
      sampler=sampler,
      eta=eta,
      clip_denoised=clip_denoised,
      progressive_every=progressive_every,
  )


def denoise(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    rng,
    indices,
    x_t,
    *,
    t: int,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progressive_every: int = 0,
) -> dict[str, Array]:
  """Runs the reverse process from given latents x_t at timestep t down to 0.

  The chain visits t and then the timesteps of `space_timesteps(T, num_steps)`
  below t (all of 0..t for num_steps=None), so `denoise` from x_{T−1} = x_T
  with the same noise is `sample`. Step noise follows the module's scheme.

  Args:
    diffusion, model_fn, rng, indices, sampler, num_steps, eta, clip_denoised,
      progressive_every: as in `sample`.
    x_t: [B, ...] latents at timestep t.
    t: the Python integer timestep of x_t, in [0, T).

  Returns:
    dict as in `sample`.

  Raises:
    ValueError: as in `sample`, and for t outside [0, T).
  """
  _check_common(sampler, eta, clip_denoised, progressive_every)
  num_timesteps = diffusion.num_timesteps
  t = _check_t(t, num_timesteps)
  if jnp.ndim(x_t) < 2 or not jnp.issubdtype(jnp.result_type(x_t), jnp.floating):
    raise ValueError(
        f"x_t must be a batched float array [B, ...], got shape {jnp.shape(x_t)}, dtype {jnp.result_type(x_t)}."
    )
  if num_steps is not None:
    _check_num_steps(num_timesteps, num_steps)
  _check_indices(indices, jnp.shape(x_t)[0])
  steps = _steps_down_from(num_timesteps, num_steps, t)
  return _denoise_steps(
      diffusion,
      model_fn,
      rng,
      indices,
      x_t,
      steps,
      shape=None,
      sampler=sampler,
      eta=eta,
      clip_denoised=clip_denoised,
      progressive_every=progressive_every,
  )


@jax.jit
def _diffuse_and_mix(diffusion, rng, x1, x2, lambdas, t, same_noise):
  noise = jax.random.normal(rng, (2,) + x1.shape, jnp.float32)
  noise1, noise2 = noise[0], jnp.where(same_noise, noise[0], noise[1])
  t_vec = jnp.full((1,), t, jnp.int32)
  x_t1 = diffusion.q_sample(x1[None].astype(jnp.float32), t_vec, noise1[None])
  x_t2 = diffusion.q_sample(x2[None].astype(jnp.float32), t_vec, noise2[None])
  lam = lambdas.astype(jnp.float32).reshape((-1,) + (1,) * x1.ndim)
  return (1.0 - lam) * x_t1 + lam * x_t2


def interpolate(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    rng,
    x1,
    x2,
    lambdas,
    *,
    t: int,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    same_noise: bool = False,
    clip_denoised: bool = True,
) -> Array:
  """Interpolates two images in latent space (paper §4.4, Fig. 8).

  Both endpoints are diffused to timestep t, x_t1 = q_sample(x1, t, ε1) and
  x_t2 = q_sample(x2, t, ε2), mixed as x_t = (1−λ)·x_t1 + λ·x_t2 for each λ,
  and denoised from t down to 0 by `denoise`. With `q_rng, d_rng =
  jax.random.split(rng)` and `z = normal(q_rng, (2, *x1.shape))`: ε1 = z[0],
  ε2 = z[1] (independent, the reference code's choice) or z[0]
  (`same_noise`); every row denoises with global index 0 under d_rng, i.e.
  the same reverse noise, so rows differ only by their latents and the rows
  at λ = 0 and λ = 1 are the endpoints' reconstructions.

  Args:
    diffusion, model_fn, sampler, num_steps, eta, clip_denoised: as in `sample`.
    rng: a PRNG key.
    x1, x2: the endpoints, [H, W, C] (any unbatched shape) in [-1, 1].
    lambdas: [L] mixing weights in [0, 1].
    t: the Python integer timestep to diffuse to, in [0, T); the paper uses 500
      of 1000.
    same_noise: diffuse both endpoints with the same noise.

  Returns:
    [L, H, W, C] float32 images, row l for lambdas[l].

  Raises:
    ValueError: for endpoints of different shapes, lambdas that are not a
      non-empty 1-D array in [0, 1], t outside [0, T), and as in `sample`.
  """
  _check_common(sampler, eta, clip_denoised, 0)
  t = _check_t(t, diffusion.num_timesteps)
  if jnp.shape(x1) != jnp.shape(x2) or jnp.ndim(x1) < 1:
    raise ValueError(
        f"x1 and x2 must be single images of the same shape (e.g. [H, W, C]), got {jnp.shape(x1)} and {jnp.shape(x2)}."
    )
  if jnp.ndim(lambdas) != 1 or jnp.shape(lambdas)[0] == 0:
    raise ValueError(f"lambdas must be a non-empty 1-D array of weights in [0, 1], got shape {jnp.shape(lambdas)}.")
  lam = _maybe_concrete(lambdas)
  if lam is not None and not (np.all(np.isfinite(lam)) and np.all(lam >= 0) and np.all(lam <= 1)):
    raise ValueError(f"lambdas must lie in [0, 1] (0 gives x1, 1 gives x2), got {lam.tolist()}.")
  if not isinstance(same_noise, (bool, np.bool_)):
    raise ValueError(f"same_noise must be a bool, got {same_noise!r}.")
  q_rng, d_rng = jax.random.split(rng)
  x_t = _diffuse_and_mix(
      diffusion, q_rng, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(lambdas), t, bool(same_noise)
  )
  indices = jnp.zeros((x_t.shape[0],), jnp.int32)
  return denoise(
      diffusion,
      model_fn,
      d_rng,
      indices,
      x_t,
      t=t,
      sampler=sampler,
      num_steps=num_steps,
      eta=eta,
      clip_denoised=clip_denoised,
  )["samples"]


def make_sharded_sampler(
    diffusion: GaussianDiffusion,
    apply_fn: Callable[..., jax.Array],
    mesh: jax.sharding.Mesh,
    image_shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progressive_every: int = 0,
    axis: str = "data",
) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """`sample` for a Flax network, jitted over a device mesh.

  Args:
    diffusion: the diffusion (closed over: respacing needs its concrete tables).
    apply_fn: the network's `apply`, called as apply_fn({"params": p}, x_t, t, train=False).
    mesh: the device mesh; the batch is sharded over `axis`, parameters replicated.
    image_shape: [H, W, C] of one image.
    sampler, num_steps, eta, clip_denoised, progressive_every: as in `sample`.
    axis: the mesh axis of the batch.

  Returns:
    fn(params, rng, indices [N]) -> the dict of `sample`, sharded over `axis`;
    N must be a multiple of the mesh size.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))

  def fn(params, rng, indices):
    def model_fn(x_t, t):
      return apply_fn({"params": params}, x_t, t, train=False)

    return sample(diffusion, model_fn, rng, indices, (indices.shape[0],) + tuple(image_shape), sampler=sampler,
                  num_steps=num_steps, eta=eta, clip_denoised=clip_denoised, progressive_every=progressive_every)

  return jax.jit(fn, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)
