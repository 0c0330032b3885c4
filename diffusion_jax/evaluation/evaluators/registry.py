"""The kinds of evaluation and the one place that makes an evaluator of a `config.evals` entry.

Each kind's module registers its class with `@registry.register`; `make(name, entry, config, workdir)` looks the
entry's `kind` up and passes the entry's other fields to the constructor as keyword arguments.
"""

from __future__ import annotations

import inspect
import re

import ml_collections

from diffusion_jax import errors
from diffusion_jax.evaluation.evaluators import base

_REGISTRY: dict[str, type[base.Evaluator]] = {}


def register(cls: type[base.Evaluator]) -> type[base.Evaluator]:
  """Adds an evaluator class under its `kind` (used as a class decorator)."""
  if not cls.kind or cls.kind in _REGISTRY:
    raise ValueError(f"An evaluator needs a kind of its own; {cls.__name__} has {cls.kind!r}.")
  _REGISTRY[cls.kind] = cls
  return cls


def kinds() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def settings_of(cls: type[base.Evaluator]) -> tuple[str, ...]:
  """The keyword arguments of the constructors of `cls` and its bases: the fields an entry of its kind may have."""
  names = {}
  for c in cls.__mro__:
    if issubclass(c, base.Evaluator) and "__init__" in vars(c):
      for p in inspect.signature(c.__init__).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
          names[p.name] = None
  return tuple(names)


def uses_digit_metric(config: ml_collections.ConfigDict) -> bool:
  """Whether 'fid' is scored with `digits_metric` (dataset=digits) instead of Inception.

  `config.eval.random_inception=True` asks for the Inception smoke test explicitly and keeps it.
  """
  return config.data.dataset == "digits" and not config.eval.get("random_inception", False)


def make(name: str, entry, config: ml_collections.ConfigDict, workdir) -> base.Evaluator:
  """The evaluator of one `config.evals` entry (`fid` on the digits is the digit metric, see `uses_digit_metric`)."""
  kind = str(entry.get("kind", ""))
  if kind not in _REGISTRY:
    raise errors.UserError(f"config.evals.{name}.kind={kind!r} is not a kind of evaluation; choose from {kinds()}.")
  if kind == "fid" and uses_digit_metric(config):
    kind = "digits"
  cls = _REGISTRY[kind]
  settings = {k: v for k, v in entry.items() if k != "kind"}
  unknown = sorted(set(settings) - set(settings_of(cls)))
  if unknown:
    raise errors.UserError(
      f"config.evals.{name} sets {', '.join(unknown)}, which a {kind} evaluation does not take; its settings: "
      f"{', '.join(settings_of(cls))}."
    )
  return cls(name, config, workdir, **settings)


def from_config(
  config: ml_collections.ConfigDict, workdir, *, names=None, training: bool = False
) -> list[base.Evaluator]:
  """The evaluators of `config.evals`: those named (`--mode=eval`), or those that run during training."""
  evals = config.get("evals") or {}
  if names is not None:
    missing = [n for n in names if n not in evals]
    if missing:
      raise errors.UserError(
        f"config.eval.metrics names {missing}, which config.evals does not define; choose from "
        f"{tuple(evals.keys())}, e.g. --config.eval.metrics=bpd,fid."
      )
    return [make(n, evals[n], config, workdir) for n in names]
  if training:
    return [make(n, e, config, workdir) for n, e in evals.items() if int(e.get("every", 0) or 0) > 0 or e.get("at_end")]
  return [make(n, e, config, workdir) for n, e in evals.items()]


def eval_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.eval.metrics` as a tuple of entry names; comma-separated strings are accepted."""
  metrics = config.eval.metrics
  items = [metrics] if isinstance(metrics, str) else list(metrics)
  # `--config.eval.metrics=bpd,fid` arrives as ('bpd,fid',): split every item on commas and spaces.
  names = tuple(dict.fromkeys(m.lower() for item in items for m in re.split(r"[,\s]+", str(item)) if m))
  if not names:
    raise errors.UserError(
      f"No metrics in config.eval.metrics; choose from {tuple((config.get('evals') or {}).keys())}, e.g. "
      "--config.eval.metrics=bpd,fid."
    )
  return names
