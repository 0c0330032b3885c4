"""The sampler protocol: what one sampler module provides to the driver.

A sampler is a frozen (hashable) object with

  * its settings: which options of `resolve` it takes (`eta`, `timestep_spacing`,
    `sigma_schedule`, `order`, `lower_order_final`), their defaults and choices;
  * `network_calls(num_steps)`: network evaluations per image for that many steps;
  * `plan(diffusion, spec, start) -> Plan`: the timestep grid and every per-call
    coefficient, computed on the host in float64 NumPy (stored as float32), for
    a chain that starts at timestep `start` (None: from pure noise at the top of the grid);
  * `init(x, coef) -> carry`: the initial carry from x_T (or the given x_t),
    with `coef` the coefficients of the first call;
  * `model_input(carry, coef) -> x_t`: the point the network is evaluated at;
  * `with_input(carry, x_t, coef) -> carry`: the carry with its current point
    replaced by x_t (the inverse of `model_input`; inpainting writes the known
    pixels through it), and `signal_noise(diffusion, coef, t) -> (α, σ)`: the
    noise level of that point, x_t = α·x_0 + σ·ε. The defaults are for a carry
    that is x_t itself at an integer timestep t (the diffusion's √ᾱ_t, √(1 − ᾱ_t));
  * `step(carry, model_output, t, t_next, ctx) -> (carry, pred_xstart)`: one
    network call's update; `pred_xstart` is the x_0 prediction shown in progressive pictures;
  * `output(carry) -> samples`.

The driver (`driver.run`) scans over the plan's calls: it evaluates the network
(with classifier-free guidance), draws the step noise of the package's noise
scheme, predicts x_0 with or without clipping (`StepContext.predict_xstart`)
and fills the progressive buffers. A new sampler is one module that defines
such an object and passes it to `registry.register`, plus its line in the
imports of `samplers/__init__.py` (importing the module registers it).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sampler's host-side schedule: one row per network call, in sampling order.

  Attributes:
    t: [N] network timesteps, int32, or float32 where the grid is fractional.
    t_next: [N] the timestep the call's step goes to (−1: the end of the chain), same dtype as t.
    noise_step: [N] int32 keys of the step noise: t + 1 for integer t (the noise scheme of `samplers`).
    record: [N] bool, the calls that start a sampler step (a progressive picture is taken there).
    coef: dict of [N] arrays (float32 coefficients or int32 indices), handed to `step` one row at a time.
    tables: a pytree of device arrays the steps need besides the diffusion (e.g. respaced tables), or None.
    static: hashable facts the step branches on in Python (part of the compilation key).
  """

  t: np.ndarray
  t_next: np.ndarray
  noise_step: np.ndarray
  record: np.ndarray
  coef: dict
  tables: Any = None
  static: tuple = ()

  @property
  def num_calls(self) -> int:
    return int(self.t.shape[0])

  @property
  def num_steps(self) -> int:
    return int(np.sum(self.record))


class StepContext(NamedTuple):
  """What the driver hands to `Sampler.step` besides the carry and the model output.

  Attributes:
    diffusion: the GaussianDiffusion the model was trained with.
    tables: `Plan.tables`.
    coef: this call's row of `Plan.coef` (scalars).
    t_vec: [B] the timesteps the network was called with.
    noise: [B, ...] standard normal step noise, or None for deterministic samplers.
    eta: scalar float32 (DDIM's η; 0 for samplers without one).
    clip_denoised: whether x_0 predictions are clipped to [-1, 1].
    static: `Plan.static`.
    predict_xstart: predict_xstart(model_output, x_t, *, alpha=None, sigma=None) -> x_0, clipped when
      `clip_denoised`: with alpha/sigma None from the diffusion's tables at t_vec
      (`GaussianDiffusion.p_mean_variance`), otherwise from x_t = alpha·x_0 + sigma·ε.
  """

  diffusion: Any
  tables: Any
  coef: dict
  t_vec: Any
  noise: Any
  eta: Any
  clip_denoised: bool
  static: tuple
  predict_xstart: Callable


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Base of the samplers; subclasses override the protocol methods (module docstring)."""

  name: str
  description: str = ""
  has_eta: bool = False
  spacings: tuple = ("even",)
  default_spacing: str = "even"
  sigma_schedules: tuple = ()
  orders: tuple = ()
  default_order: int | None = None
  has_lower_order_final: bool = False
  mean_types: tuple = ("eps", "xstart", "xprev", "v")

  def network_calls(self, num_steps: int) -> int:
    return int(num_steps)

  def min_steps(self, order: int | None) -> int:
    return 1

  def check(self, spec) -> None:
    """Raises ValueError for settings the sampler cannot run (e.g. a grid without distinct steps)."""

  def stochastic(self, spec) -> bool:
    return False

  def plan(self, diffusion, spec, start: int | None) -> Plan:
    raise NotImplementedError

  def init(self, x, coef):
    return x

  def model_input(self, carry, coef):
    return carry

  def with_input(self, carry, x, coef):
    return x

  def signal_noise(self, diffusion, coef, t):
    return jnp.take(diffusion.sqrt_alphas_cumprod, t), jnp.take(diffusion.sqrt_one_minus_alphas_cumprod, t)

  def step(self, carry, model_output, t, t_next, ctx: StepContext):
    raise NotImplementedError

  def output(self, carry):
    return carry


def per_call(values, dtype=np.float32) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(values, np.float64).astype(dtype))


def timesteps_array(grid: np.ndarray) -> np.ndarray:
  """The grid as int32 if every timestep is an integer, else float32 (fractional timesteps)."""
  grid = np.asarray(grid, np.float64)
  if np.all(grid == np.round(grid)):
    return grid.astype(np.int32)
  return grid.astype(np.float32)


def noise_steps(t: np.ndarray) -> np.ndarray:
  """Noise keys t + 1 (the noise of the step leaving timestep t); fractional t are floored."""
  return (np.floor(np.asarray(t, np.float64)) + 1).astype(np.int32)
