"""Noise schedules β_1..β_T for the forward process.

Every schedule is computed in float64 NumPy, as the reference implementation
does (`diffusion_tf/diffusion_utils_2.py: get_beta_schedule`); the diffusion
tables built from it are cast to float32 only once, in
`diffusion.GaussianDiffusion.create`.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_jax import errors

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")

# Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models", eq. 17.
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


def _warmup_beta(beta_start: float, beta_end: float, num_timesteps: int, frac: float) -> np.ndarray:
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_beta(num_timesteps: int) -> np.ndarray:
  def alpha_bar(u):
    return math.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

  betas = [
    min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), _COSINE_MAX_BETA)
    for i in range(num_timesteps)
  ]
  return np.asarray(betas, dtype=np.float64)


def get_beta_schedule(
  name: str, *, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> np.ndarray:
  """Returns the variances β_t of the forward process, t = 0..T-1.

  Args:
    name: one of `SCHEDULES`. `linear` with 1e-4 → 0.02 and T = 1000 is the
      DDPM setting; `cosine` (Nichol & Dhariwal 2021, β clipped at 0.999)
      ignores `beta_start` and `beta_end`.
    beta_start: β at the first step (linear, quad, warmup*).
    beta_end: β at the last step (linear, quad, const, warmup*).
    num_timesteps: T, the number of diffusion steps.

  Returns:
    float64 array of shape [T] with every entry in (0, 1].

  Raises:
    ValueError: for an unknown name, T < 1, or betas outside (0, 1].
  """
  if name not in SCHEDULES:
    raise errors.UserError(f"Unknown beta schedule {name!r}; valid choices are {', '.join(SCHEDULES)}.")
  if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
    raise errors.UserError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  if name not in ("jsd", "cosine"):
    if not 0.0 < beta_end <= 1.0:
      raise errors.UserError(f"beta_end must lie in (0, 1], got {beta_end}.")
    if name != "const" and not 0.0 < beta_start <= beta_end:
      raise errors.UserError(f"beta_start must lie in (0, beta_end], got beta_start={beta_start}, beta_end={beta_end}.")

  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.5)
  else:
    betas = _cosine_beta(num_timesteps)
  assert betas.shape == (num_timesteps,)
  return betas
