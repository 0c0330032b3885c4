"""Sampler names, settings and their validation: the one place that resolves a sampler.

`resolve(name, num_timesteps=T, ...)` returns a `SamplerSpec`: a frozen,
hashable dataclass with every setting filled in, usable as a `jax.jit` static
argument or a cache key, with `folder_name` and `network_calls`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_jax import errors
from diffusion_jax.samplers import grids
from diffusion_jax.samplers.base import Sampler

_REGISTRY: dict[str, Sampler] = {}
# The settings of `resolve` besides the sampler's name.
SETTINGS = ("num_steps", "eta", "timestep_spacing", "sigma_schedule", "order", "lower_order_final")
# Fields of `config.sampling` that are not the sampler's settings (how many, in what batches, with what labels).
NOT_SAMPLER_SETTINGS = (
  "clip_denoised",
  "batch_size",
  "num_samples",
  "use_ema",
  "labels",
  "guidance_scale",
  "resample",
  "jump_length",
)
# Names that resolve to a registered sampler given an order: "dpmpp" with order=3 is "dpmpp3m".
_ORDER_ALIASES: dict[str, str] = {}


def register(sampler: Sampler, *, order_alias: str | None = None) -> Sampler:
  """Adds a sampler under `sampler.name`; `order_alias` names a family resolved with `order` (e.g. "dpmpp")."""
  if sampler.name in _REGISTRY:
    raise errors.UserError(f"A sampler named {sampler.name!r} is already registered.")
  _REGISTRY[sampler.name] = sampler
  if order_alias is not None:
    _ORDER_ALIASES[order_alias] = sampler.name.replace(str(sampler.default_order), "{order}", 1)
  return sampler


def get(name: str) -> Sampler:
  if name not in _REGISTRY:
    raise errors.UserError(f"Unknown sampler {name!r}; valid choices are {', '.join(names())}.")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A resolved, validated sampler setting (build it with `resolve`).

  Attributes:
    name: a registered sampler name (see `SAMPLERS`).
    num_timesteps: T of the diffusion it was resolved for.
    num_steps: sampler steps, in [1, T].
    eta: DDIM's η (0 for samplers without one).
    timestep_spacing: the timestep grid (`grids.TIMESTEP_SPACINGS`).
    sigma_schedule: "uniform" (σ at the grid's timesteps) or "karras" for σ-based samplers, else None.
    order: the solver order of multistep samplers, else None.
    lower_order_final: DPM-Solver++'s lower-order final steps (diffusers' `lower_order_final`), else None.
  """

  name: str
  num_timesteps: int
  num_steps: int
  eta: float = 0.0
  timestep_spacing: str = "even"
  sigma_schedule: str | None = None
  order: int | None = None
  lower_order_final: bool | None = None

  @property
  def sampler(self) -> Sampler:
    return get(self.name)

  @property
  def network_calls(self) -> int:
    """Network evaluations per image (Heun: 2 per step but the last; guidance batches its two passes into one)."""
    return self.sampler.network_calls(self.num_steps)

  @property
  def folder_name(self) -> str:
    """A short name of these settings, e.g. "ddim_50steps_eta0.5", "dpmpp2m_20steps_karras"."""
    sampler = self.sampler
    parts = [f"{self.name}_{self.num_steps}steps"]
    if sampler.has_eta:
      parts.append(f"eta{self.eta:g}")
    if self.timestep_spacing != sampler.default_spacing:
      parts.append(self.timestep_spacing)
    if self.sigma_schedule not in (None, "uniform"):
      parts.append(self.sigma_schedule)
    if self.lower_order_final is False:
      parts.append("nolof")
    return "_".join(parts)

  def with_eta(self, eta: float) -> SamplerSpec:
    return dataclasses.replace(self, eta=float(eta))

  @classmethod
  def from_config(cls, section, *, num_timesteps: int) -> SamplerSpec:
    """The spec of a config's sampler section (`config.sampling`, an eval's or the grid's `sampling`).

    The section has `sampler` and any of `num_steps`, `eta`, `timestep_spacing`, `sigma_schedule`, `order`,
    `lower_order_final`; empty and zero values take the sampler's defaults (see `resolve`).
    """
    known = ("sampler", *SETTINGS)
    unknown = sorted(k for k in section.keys() if k not in known and k not in NOT_SAMPLER_SETTINGS)
    if unknown:
      raise errors.UserError(f"Unknown sampler settings {unknown}; a sampler section takes {', '.join(known)}.")
    value = lambda k: section.get(k) or None  # noqa: E731
    lof = section.get("lower_order_final")
    return resolve(
      section.get("sampler") or "ancestral",
      num_timesteps=num_timesteps,
      num_steps=value("num_steps"),
      eta=float(section.get("eta", 0.0) or 0.0),
      timestep_spacing=value("timestep_spacing"),
      sigma_schedule=value("sigma_schedule"),
      order=value("order"),
      lower_order_final=None if lof in (None, "") else lof,
    )


def _choices(values) -> str:
  return ", ".join(repr(v) for v in values)


def resolve(
  name,
  *,
  num_timesteps: int,
  num_steps: int | None = None,
  eta: float | None = None,
  timestep_spacing: str | None = None,
  sigma_schedule: str | None = None,
  order: int | None = None,
  lower_order_final: bool | None = None,
) -> SamplerSpec:
  """Validates a sampler's settings and fills in its defaults.

  Args:
    name: a sampler name (`SAMPLERS`), "dpmpp"/"dpmpp_sde" with `order`, or a
      `SamplerSpec` (checked against num_timesteps and returned).
    num_timesteps: T of the diffusion.
    num_steps: steps in [1, T]; None for T.
    eta: DDIM's η >= 0; None or 0 for samplers without one.
    timestep_spacing: one of `grids.TIMESTEP_SPACINGS` the sampler supports;
      None for its default (`even` for ancestral and DDIM, `linspace` for the
      solvers, as diffusers' defaults for them).
    sigma_schedule: "uniform" or "karras" (ρ = 7) for σ-based samplers
      (euler, heun, dpmpp*); None for "uniform".
    order: solver order for multistep samplers (dpmpp: 1, 2 or 3).
    lower_order_final: DPM-Solver++ only: lower-order final steps when fewer
      than 15 steps (default True, as diffusers).

  Returns:
    A SamplerSpec.

  Raises:
    ValueError: naming the bad setting, the valid choices and the fix.
  """
  if isinstance(name, SamplerSpec):
    if name.num_timesteps != num_timesteps:
      raise errors.UserError(
        f"The SamplerSpec was resolved for T={name.num_timesteps}, but the diffusion has T={num_timesteps}; "
        "resolve it again with num_timesteps=diffusion.num_timesteps."
      )
    return name
  if not isinstance(name, str):
    raise errors.UserError(f"sampler must be a name ({', '.join(names())}) or a SamplerSpec, got {name!r}.")
  if name in _ORDER_ALIASES:
    family = _ORDER_ALIASES[name]
    default = get(family.replace("{order}", "2")).default_order
    order_value = default if order is None else order
    candidate = family.format(order=order_value)
    if candidate not in _REGISTRY:
      orders = sorted(int(k[len(family.split("{")[0])]) for k in _REGISTRY if _matches(family, k))
      raise errors.UserError(f"order={order!r} is not available for sampler {name!r}; valid orders are {orders}.")
    name = candidate
  sampler = get(name)
  num_timesteps = int(num_timesteps)
  n = num_timesteps if num_steps is None else grids.check_num_steps(num_timesteps, num_steps)

  # eta.
  if eta is None:
    eta = 0.0
  eta_value = np.asarray(eta)
  if eta_value.ndim != 0 or not np.isfinite(eta_value) or eta_value < 0:
    raise errors.UserError(f"eta must be a finite scalar >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}.")
  eta = float(eta_value)
  if not sampler.has_eta and eta != 0:
    with_eta = [k for k, s in _REGISTRY.items() if s.has_eta]
    raise errors.UserError(
      f"eta={eta!r} applies only to sampler={with_eta[0]!r}; use sampler={with_eta[0]!r} or eta=0.0 "
      f"({name!r} has no eta)."
    )

  # The timestep grid.
  spacing = sampler.default_spacing if timestep_spacing is None else timestep_spacing
  if spacing not in sampler.spacings:
    raise errors.UserError(
      f"timestep_spacing={timestep_spacing!r} is not available for sampler {name!r}; valid choices are "
      f"{_choices(sampler.spacings)} (None for {sampler.default_spacing!r})."
    )

  # The σ grid.
  if sampler.sigma_schedules:
    schedule = "uniform" if sigma_schedule is None else sigma_schedule
    if schedule not in sampler.sigma_schedules:
      raise errors.UserError(
        f"sigma_schedule={sigma_schedule!r} is not available for sampler {name!r}; valid choices are "
        f"{_choices(sampler.sigma_schedules)}."
      )
  else:
    if sigma_schedule not in (None, "uniform"):
      with_sigmas = [k for k, s in _REGISTRY.items() if s.sigma_schedules]
      raise errors.UserError(
        f"sigma_schedule={sigma_schedule!r} does not apply to sampler {name!r} (it steps on timesteps); "
        f"use one of {_choices(with_sigmas)}, or sigma_schedule=None."
      )
    schedule = None

  # The order.
  if sampler.orders:
    order_value = sampler.default_order if order is None else order
    if order_value != sampler.default_order:
      family = [a for a, f in _ORDER_ALIASES.items() if _matches(f, name) and f.format(order=order_value) in _REGISTRY]
      hint = f"sampler={family[0]!r} with order={order_value!r}" if family else f"order={sampler.default_order}"
      raise errors.UserError(f"sampler {name!r} has order {sampler.default_order}, got order={order!r}; use {hint}.")
    order = order_value
  elif order is not None:
    with_order = [k for k, s in _REGISTRY.items() if s.orders]
    raise errors.UserError(
      f"order={order!r} does not apply to sampler {name!r}; multistep samplers are {_choices(with_order)}."
    )
  if n < sampler.min_steps(order):
    lower = [
      f.format(order=o)
      for f in _ORDER_ALIASES.values()
      if _matches(f, name)
      for o in range(1, order)
      if f.format(order=o) in _REGISTRY and n >= _REGISTRY[f.format(order=o)].min_steps(o)
    ]
    raise errors.UserError(
      f"sampler {name!r} (order {order}) needs num_steps >= {sampler.min_steps(order)}, got {n}; use more steps"
      + (f" or sampler={lower[-1]!r}." if lower else " (with one step, a first-order solver is DDIM: sampler='ddim').")
    )

  if sampler.has_lower_order_final:
    lower_order_final = True if lower_order_final is None else lower_order_final
    if not isinstance(lower_order_final, (bool, np.bool_)):
      raise errors.UserError(f"lower_order_final must be a bool, got {lower_order_final!r}.")
    lower_order_final = bool(lower_order_final)
  elif lower_order_final is not None:
    raise errors.UserError(
      f"lower_order_final applies only to the DPM-Solver++ samplers, not to {name!r}; leave it None."
    )

  spec = SamplerSpec(
    name=name,
    num_timesteps=num_timesteps,
    num_steps=n,
    eta=eta,
    timestep_spacing=spacing,
    sigma_schedule=schedule,
    order=order,
    lower_order_final=lower_order_final,
  )
  # Building the grid once here catches spacings that cannot give n distinct steps.
  sampler.check(spec)
  return spec


def _matches(family: str, name: str) -> bool:
  head, tail = family.split("{order}")
  return name.startswith(head) and name.endswith(tail) and name[len(head) : len(name) - len(tail)].isdigit()


def check_mean_type(spec: SamplerSpec, mean_type: str) -> None:
  sampler = spec.sampler
  if mean_type not in sampler.mean_types:
    supported = [k for k, s in _REGISTRY.items() if mean_type in s.mean_types]
    raise errors.UserError(
      f"sampler {spec.name!r} does not support model_mean_type={mean_type!r} (it supports "
      f"{', '.join(sampler.mean_types)}); use one of {_choices(supported)}."
    )
