"""Timestep grids, σ grids and respacing, computed in float64 NumPy.

Grids are returned in sampling order (descending timesteps). The names of
`TIMESTEP_SPACINGS` are diffusers' `timestep_spacing` values, plus `even`, the
grid of Nichol & Dhariwal's `space_timesteps` (this package's default for
`ancestral` and `ddim`). diffusers' schedulers do not agree on what a spacing
means, so each grid function takes the family of scheduler it reproduces:

  family     scheduler(s)                         linspace                           leading (r = T // n)
  "ddim"     DDPMScheduler, DDIMScheduler          round(linspace(0, T−1, n))         r·[0, n)
  "dpm"      DPMSolverMultistepScheduler           round(linspace(0, T−1, n+1))[1:]   (T // (n+1))·[1, n]
  "k"        Euler/HeunDiscreteScheduler           linspace(0, T−1, n) (float32)      r·[0, n)

and `trailing` is round(arange(T, 0, −T/n)) − 1 for all three (steps_offset = 0).

`nested` is ⌈i·T/n⌉ − 1 for i = n … 1: it ends at T − 1, each step spans T/n timesteps (rounded up), and the
grid of n steps is every other point of the grid of 2n steps for any T, so the grids of n, n/2, n/4, … nest
(`check_nested`: the grids of progressive distillation's students). Where n divides T it is `trailing`.
"""

from __future__ import annotations

import jax
import numpy as np

from diffusion_jax import errors
from diffusion_jax.diffusion import GaussianDiffusion

TIMESTEP_SPACINGS = ("even", "leading", "trailing", "linspace", "nested")
SIGMA_SCHEDULES = ("uniform", "karras")
KARRAS_RHO = 7.0


def check_num_steps(num_timesteps: int, num_steps) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise errors.UserError(
      f"num_steps must be an integer in [1, {num_timesteps}] (or None for all steps), got {num_steps!r}."
    )
  if not 1 <= num_steps <= num_timesteps:
    raise errors.UserError(
      f"num_steps={num_steps} is out of range: use an integer in [1, {num_timesteps}] "
      f"(the diffusion has T={num_timesteps} steps), or None for all of them."
    )
  return int(num_steps)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The evenly spaced subset of timesteps used by a sampler with `num_steps` steps (the `even` grid).

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
    raise errors.UserError(f"num_timesteps must be at least 1, got {num_timesteps}.")
  n = check_num_steps(num_timesteps, num_steps)
  if n == 1:
    return np.array([num_timesteps - 1], dtype=np.int32)
  i = np.arange(n, dtype=np.int64)
  # floor(i·(T−1)/(n−1) + 1/2) in exact integer arithmetic; the stride is ≥ 1, so no duplicates.
  return ((2 * i * (num_timesteps - 1) + (n - 1)) // (2 * (n - 1))).astype(np.int32)


def nested_grid(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The `nested` grid ⌈i·T/n⌉ − 1, i = n … 1, descending (int64; exact integer arithmetic)."""
  T, n = int(num_timesteps), check_num_steps(num_timesteps, num_steps)
  i = np.arange(n, 0, -1, dtype=np.int64)
  return (i * T + n - 1) // n - 1


def check_nested(num_timesteps: int, teacher_steps: int, student_steps: int) -> int:
  """The number of teacher steps per student step, k = teacher/student, if the `nested` grids nest.

  Student point j is teacher point k·j (both descending from T − 1), which holds exactly when k is a whole
  number; `UserError` otherwise, naming grids that do nest.
  """
  T = int(num_timesteps)
  teacher_steps = check_num_steps(T, teacher_steps)
  student_steps = check_num_steps(T, student_steps)
  if teacher_steps % student_steps or teacher_steps == student_steps:
    below = [n for n in range(student_steps - 1, 0, -1) if teacher_steps % n == 0][:1]
    raise errors.UserError(
      f"A {student_steps}-step grid does not nest in the teacher's {teacher_steps}-step grid: the teacher's steps "
      f"must be a multiple (2 or more) of the student's" + (f", e.g. {below[0]} student steps" if below else "") + "."
    )
  k = teacher_steps // student_steps
  assert np.array_equal(nested_grid(T, teacher_steps)[::k], nested_grid(T, student_steps))
  return k


def timestep_grid(spacing: str, num_timesteps: int, num_steps: int, family: str = "ddim") -> np.ndarray:
  """The timesteps of a diffusers `timestep_spacing` (or `even`), in sampling order (descending).

  Args:
    spacing: one of `TIMESTEP_SPACINGS`.
    num_timesteps: T.
    num_steps: n.
    family: "ddim", "dpm" or "k": whose convention to follow (module docstring).

  Returns:
    [n] float64 timesteps, descending; integers except for family "k" with `linspace`.

  Raises:
    ValueError: for an unknown spacing, or a grid that does not have n distinct timesteps in [0, T).
  """
  T, n = int(num_timesteps), int(num_steps)
  if spacing == "even":
    grid = space_timesteps(T, n)[::-1].astype(np.float64)
  elif spacing == "trailing":
    grid = np.round(np.arange(T, 0, -T / n)) - 1.0
  elif spacing == "nested":
    grid = nested_grid(T, n).astype(np.float64)
  elif spacing == "linspace":
    if family == "dpm":
      grid = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif family == "k":
      grid = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
      grid = np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == "leading":
    if family == "dpm":
      grid = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.float64)
    else:
      grid = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64)
  else:
    raise errors.UserError(f"Unknown timestep_spacing {spacing!r}; valid choices are {', '.join(TIMESTEP_SPACINGS)}.")
  grid = np.ascontiguousarray(grid, dtype=np.float64)
  if grid.shape != (n,) or np.any(np.diff(grid) >= 0) or grid[-1] < 0 or grid[0] > T - 1:
    raise errors.UserError(
      f"timestep_spacing={spacing!r} with num_steps={n} and T={T} does not give {n} distinct timesteps in "
      f"[0, {T}) (got {grid.tolist()}); use fewer steps or another timestep_spacing ({', '.join(TIMESTEP_SPACINGS)})."
    )
  return grid


def truncate_grid(grid: np.ndarray, start: int | None) -> np.ndarray:
  """The descending grid restricted to timesteps below `start`, with `start` prepended (None: unchanged)."""
  if start is None:
    return grid
  return np.concatenate([[float(start)], grid[grid < start]])


def concrete(x, what: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise errors.UserError(
      f"{what} needs concrete values, but got a traced array; build the GaussianDiffusion outside "
      "jax.jit and close over it instead of passing it as a jitted argument."
    ) from e


def alphas_cumprod64(diffusion: GaussianDiffusion, what: str) -> np.ndarray:
  """ᾱ recomputed in float64 from the stored (float32) betas."""
  return np.cumprod(1.0 - concrete(diffusion.betas, what).astype(np.float64))


def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level of x_t/√ᾱ_t (the probability-flow ODE's variable)."""
  return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional timesteps of noise levels σ, by linear interpolation in log σ (diffusers' `_sigma_to_t`)."""
  sigma = np.asarray(sigma, np.float64)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al. (2022) eq. 5: (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, descending."""
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
  timesteps = np.asarray(timesteps)
  if timesteps.ndim != 1 or timesteps.size == 0 or not np.issubdtype(timesteps.dtype, np.integer):
    raise errors.UserError(f"timesteps must be a non-empty 1-D integer array, got {timesteps!r}.")
  if np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= num_timesteps:
    raise errors.UserError(
      f"timesteps must be strictly increasing and lie in [0, {num_timesteps}), got {timesteps.tolist()}; "
      "use space_timesteps(T, num_steps)."
    )
  return timesteps.astype(np.int32)


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
  timesteps = check_timesteps(timesteps, num_timesteps)
  if timesteps.size == num_timesteps:
    return diffusion
  alphas_cumprod = alphas_cumprod64(diffusion, "respace")
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[timesteps[:-1]])
  new_betas = 1.0 - alphas_cumprod[timesteps] / alphas_cumprod_prev
  return GaussianDiffusion.create(
    new_betas,
    model_mean_type=diffusion.model_mean_type,
    model_var_type=diffusion.model_var_type,
    loss_type=diffusion.loss_type,
    hybrid_lambda=diffusion.hybrid_lambda,
  )
