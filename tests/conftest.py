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
