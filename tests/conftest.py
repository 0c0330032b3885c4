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

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = pathlib.Path(
  os.environ.get("DIFFUSION_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "diffusion_jax_tests")
)

jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# Deprecations become errors where they are attributed to the libraries the package is built on, to the package or
# to the tests (the code that called the deprecated API), so a removal announced in one release fails CI before the
# release that makes it. Warnings of other libraries (TensorFlow, PyTorch, ...) stay warnings.
WARNINGS_AS_ERRORS = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "diffusion_jax", "benchmarks", r".*_test")


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "torch: needs PyTorch and diffusers (deselect with -m 'not torch' where they are not installed)"
  )
  config.addinivalue_line(
    "markers", 'tpu: compiles for TPU slices with libtpu (jax[tpu]); CI\'s TPU leg runs them (README "Tests")'
  )
  config.addinivalue_line(
    "markers",
    "alone: runs with the machine to itself: other test workers wait (between their tests) until it ends",
  )
  for category in ("DeprecationWarning", "FutureWarning"):
    for module in WARNINGS_AS_ERRORS:
      config.addinivalue_line("filterwarnings", f"error::{category}:{module}")


@contextlib.contextmanager
def _flock(path: pathlib.Path, operation: int):
  with open(path, "a") as f:
    fcntl.flock(f, operation)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Every test shares the machine with the other pytest processes (`pytest -n N` workers), except those marked
  `alone`.

  A multi-process CPU run (tests/multihost_test.py) connects its processes'
  devices with gloo; on an oversubscribed host (2 cores, another worker
  training or compiling next to its 2 processes) those connections have been
  seen to stall until the test's deadline. So an `alone` test takes the machine
  exclusively: it waits for the tests running elsewhere to end, and no new one
  starts until it is done. The turnstile gives a waiting `alone` test priority
  over tests that arrive after it. The whole protocol is inside the lock: the
  setup of the module and session fixtures a test is the first to use, and the
  teardown of those it is the last to use.
  """
  CACHE_DIR.mkdir(parents=True, exist_ok=True)
  turnstile, share = CACHE_DIR / "machine.turnstile", CACHE_DIR / "machine.lock"
  if item.get_closest_marker("alone"):
    with _flock(turnstile, fcntl.LOCK_EX), _flock(share, fcntl.LOCK_EX):
      yield
  else:
    with _flock(turnstile, fcntl.LOCK_EX):
      pass
    with _flock(share, fcntl.LOCK_SH):
      yield


def cli_env(devices: int = _N_DEVICES) -> dict[str, str]:
  """The environment of a `python -m diffusion_jax...` subprocess: CPU, `devices` devices, the tests' cache."""
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR / "jax"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def start_cli(command: list[str], log_path, *, devices: int = _N_DEVICES) -> subprocess.Popen:
  """Starts `command` (e.g. `cli_train_command(...)`) from the repository's root with `cli_env(devices)`, its
  stdout and stderr going to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env(devices), stdout=log, stderr=subprocess.STDOUT)


def tiny_config(**training):
  """configs/tiny.py with `training.K=V` overrides."""
  from configs import tiny  # noqa: PLC0415 - imported where used: conftest runs before XLA_FLAGS-dependent imports

  config = tiny.get_config()
  config.training.update(training)
  return config


def write_model_workdir(path, *, step: int, config=None, scale: float = 0.05):
  """A workdir of the tiny model at `step` whose (EMA) parameters are random but give a non-trivial output:
  the initialisation (whose residual branches start at zero) plus `scale` standard normals (seeded)."""
  from diffusion_jax import checkpointing  # noqa: PLC0415
  from diffusion_jax import runtime  # noqa: PLC0415

  config = config or tiny_config()
  params = runtime.init_params(runtime.build_network(config), jax.random.PRNGKey(0), runtime.image_shape(config))
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda x: np.asarray(x) + scale * rs.standard_normal(x.shape).astype(np.float32), params)
  checkpointing.save_model_checkpoint(path, config=config, params=params, ema_params=params, step=step)
  return path


def cli_train_command(workdir, training: dict, config: str = "configs/tiny.py") -> list[str]:
  """`python -m diffusion_jax.main` training `config` in `workdir`, with `--config.training.K=V` overrides."""
  return [
    sys.executable,
    "-m",
    "diffusion_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *(f"--config.training.{k}={v}" for k, v in training.items()),
  ]


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
# operations. Measured on the samplers' stored outputs, jax 0.12.0.1 against the 0.10.2 that wrote them: max
# |difference| 9e-8 to 1.4e-6 per case, at most 4.8e-7 of the array's largest magnitude (about 4 float32 ulps).
# The tolerance is 4x that, relative to max(1, largest magnitude); a change of behaviour moves these outputs by
# orders of magnitude more.
STORED_OUTPUT_TOLERANCE = 2e-6


def installed_jax_versions() -> dict[str, str]:
  import jaxlib  # noqa: PLC0415

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def assert_matches_stored(got, want, recorded: dict, *, err_msg: str = "") -> None:
  """`got` equals the stored `want` bit for bit when the installed jax and jaxlib are the `recorded` ones, else
  within `STORED_OUTPUT_TOLERANCE` of max(1, the largest |want|)."""
  import numpy as np  # noqa: PLC0415

  installed = installed_jax_versions()
  if all(recorded.get(k) == v for k, v in installed.items()):
    np.testing.assert_array_equal(got, want, err_msg=f"{err_msg} (bit for bit: written by {recorded})")
  else:
    atol = STORED_OUTPUT_TOLERANCE * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(
      got, want, rtol=0, atol=atol, err_msg=f"{err_msg} (written by {recorded}, run on {installed})"
    )
