"""Test setup: 4 fake CPU devices, a persistent compilation cache, strict rank promotion.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at
conftest import, before any test module imports jax.
"""

import os
import pathlib

_N_DEVICES = 4
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_N_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (tfds, checkpoint conversion) must never take accelerator memory or threads we need.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from diffusion_jax import xla_flags  # noqa: E402

xla_flags.apply()  # the XLA:CPU options every command of the package starts with (cli.start)

import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = pathlib.Path(
  os.environ.get("DIFFUSION_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "diffusion_jax_tests")
)

jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# `from configs import tiny` in tests: configs/ is a folder of config files at the repository root.
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def n_devices() -> int:
  assert jax.device_count() == _N_DEVICES, jax.devices()
  return _N_DEVICES


# ----------------------------------------------------------------------------
# Stored outputs (tests/data/): bit for bit on the JAX release that wrote them, within float32 rounding on others.
# ----------------------------------------------------------------------------

# Another jax/jaxlib release may compile the same program into a different but equally valid float32 order of
# operations. Measured on the samplers' stored outputs (values of size ~1), jax 0.12.0.1 against the 0.10.2 that
# wrote them: max |difference| 9e-8 to 5e-7 per case (about 1 to 4 float32 ulps at 1.0). The tolerance is 4x the
# largest; a real change of behaviour moves these outputs by orders of magnitude more.
STORED_OUTPUT_ATOL = 2e-6


def installed_jax_versions() -> dict[str, str]:
  import jaxlib  # noqa: PLC0415

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def assert_matches_stored(got, want, recorded: dict, *, err_msg: str = "") -> None:
  """`got` equals the stored `want` bit for bit when the installed jax and jaxlib are the `recorded` ones, else
  within `STORED_OUTPUT_ATOL`."""
  import numpy as np  # noqa: PLC0415

  installed = installed_jax_versions()
  if all(recorded.get(k) == v for k, v in installed.items()):
    np.testing.assert_array_equal(got, want, err_msg=f"{err_msg} (bit for bit: written by {recorded})")
  else:
    np.testing.assert_allclose(
      got, want, rtol=0, atol=STORED_OUTPUT_ATOL, err_msg=f"{err_msg} (written by {recorded}, run on {installed})"
    )
