"""XLA:CPU options the package sets for itself, before JAX starts its backends.

jaxlib 0.10's XLA:CPU hands convolutions, reductions and elementwise fusions
to YNNPACK by default, and at the sizes of this package's models those kernels
keep one core busy where XLA's own (Eigen) kernels use every core: on a 2-core
machine the digits train step ran at 0.71× PyTorch's with YNNPACK fusions and
0.94× without them (benchmarks/README.md, "XLA:CPU options"). So
`import diffusion_jax` appends

  --xla_cpu_experimental_ynn_fusion_type=

(no YNNPACK fusions) to `XLA_FLAGS`, under three conditions:

* the user's `XLA_FLAGS` does not set that option already (theirs wins);
* `DIFFUSION_JAX_XLA_FLAGS` is not `0` (the switch to turn this off);
* the installed jaxlib knows the option: XLA exits on unknown flags, so the
  option's name is looked up in jaxlib's XLA library first.

It only affects the CPU backend (GPU and TPU programs are unchanged), and only
processes whose JAX backends have not started yet: importing the package after
running a JAX computation leaves the running backend as it is.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import mmap
import os

ENV = "DIFFUSION_JAX_XLA_FLAGS"
# (option, value) pairs appended for CPU runs.
CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.cache
def _jaxlib_knows(option: str) -> bool:
  """Whether jaxlib's XLA library contains the flag's name (so XLA will not exit on it)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = option.encode()
  for location in spec.submodule_search_locations:
    for path in sorted(glob.glob(os.path.join(location, "lib*.so")), key=os.path.getsize, reverse=True):
      try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(needle) >= 0:
            return True
      except (OSError, ValueError):
        continue
  return False


def options_to_add(xla_flags: str) -> list[str]:
  """The `--option=value` entries of `CPU_OPTIONS` that `xla_flags` lacks and jaxlib supports."""
  out = []
  for option, value in CPU_OPTIONS:
    if f"--{option}" in xla_flags:
      continue  # set by the user: theirs wins
    if _jaxlib_knows(option):
      out.append(f"--{option}={value}")
  return out


def apply() -> list[str]:
  """Appends the package's XLA:CPU options to $XLA_FLAGS (see the module docstring); returns those added."""
  if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = options_to_add(current)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added
