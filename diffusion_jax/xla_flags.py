"""XLA:CPU options for this package's programs, set by the command line's start (`cli.start`) or by hand.

jaxlib's XLA:CPU (0.10 and 0.12 measured) hands convolutions, reductions and
elementwise fusions to YNNPACK by default, and at the sizes of this package's
models those kernels keep one core busy where XLA's own (Eigen) kernels use
every core (benchmarks/README.md, "XLA:CPU options"). `apply()` appends

  --xla_cpu_experimental_ynn_fusion_type=

(no YNNPACK fusions) to `XLA_FLAGS`, under three conditions:

* the user's `XLA_FLAGS` does not set that option already (theirs wins);
* `DIFFUSION_JAX_XLA_FLAGS` is not `0` (the switch to turn this off);
* the installed jaxlib is one of `MEASURED_JAXLIB` (by its version number,
  read from the package metadata without importing it): XLA exits on an
  unknown flag, and a jaxlib this package has not measured may have renamed
  or dropped the option, or no longer need it.

The options only affect the CPU backend (GPU and TPU programs are unchanged)
and only take effect before JAX starts its backends (its first computation).
`python -m diffusion_jax...` commands call `apply()` first; in a notebook, call
`diffusion_jax.set_xla_cpu_options()` before the first JAX computation.
Importing the package changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

ENV = "DIFFUSION_JAX_XLA_FLAGS"
# (option, value) pairs appended for CPU runs.
CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
# jaxlib (major, minor) releases on which the options were measured to pay (benchmarks/README.md).
MEASURED_JAXLIB = frozenset({(0, 10), (0, 12)})


def jaxlib_version() -> tuple[int, int] | None:
  """(major, minor) of the installed jaxlib, from its package metadata; None if it is not installed."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def options_to_add(xla_flags: str, jaxlib: tuple[int, int] | None = None) -> list[str]:
  """The `--option=value` entries of `CPU_OPTIONS` that `xla_flags` lacks, for a measured jaxlib."""
  jaxlib = jaxlib_version() if jaxlib is None else jaxlib
  if jaxlib not in MEASURED_JAXLIB:
    return []
  return [f"--{option}={value}" for option, value in CPU_OPTIONS if f"--{option}" not in xla_flags]


def apply() -> list[str]:
  """Appends the package's XLA:CPU options to $XLA_FLAGS (see the module docstring); returns those added."""
  if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = options_to_add(current)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added


set_xla_cpu_options = apply  # the name the package exports: `diffusion_jax.set_xla_cpu_options()`
