"""The package's XLA:CPU options: set by the command line's start, unless the user set them, turned off, or the
installed jaxlib is one the options were not measured on."""

import os
import subprocess
import sys

from diffusion_jax import xla_flags

OPTION = "--xla_cpu_experimental_ynn_fusion_type="


def test_this_process_runs_with_the_options():
  # conftest calls xla_flags.apply() as a command's start does.
  assert OPTION in os.environ["XLA_FLAGS"]
  assert "--xla_force_host_platform_device_count=" in os.environ["XLA_FLAGS"]  # the user's (conftest's) kept


def test_the_users_setting_wins_and_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_flags.apply() == []
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setenv(xla_flags.ENV, "0")
  assert xla_flags.apply() == [] and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.delenv(xla_flags.ENV)
  assert xla_flags.apply() == [OPTION]
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OPTION}"


def test_only_measured_jaxlib_versions_get_the_options():
  assert xla_flags.options_to_add("", jaxlib=(0, 10)) == [OPTION]
  assert xla_flags.options_to_add("", jaxlib=(0, 12)) == [OPTION]
  assert xla_flags.options_to_add("", jaxlib=(0, 9)) == []
  assert xla_flags.options_to_add("", jaxlib=(0, 13)) == []
  assert xla_flags.options_to_add("", jaxlib=(1, 0)) == []


def test_the_installed_jaxlib_was_measured_and_accepts_the_options():
  # Fails when a new jaxlib is installed: measure the options on it (benchmarks/README.md, "XLA:CPU options"), then
  # add it to MEASURED_JAXLIB if they still pay there (and XLA still knows them), or leave it out.
  version = xla_flags.jaxlib_version()
  assert version in xla_flags.MEASURED_JAXLIB, (
    f"jaxlib {version} is not among the versions the XLA:CPU options were measured on ({xla_flags.MEASURED_JAXLIB})"
  )
  # XLA exits on an option it does not know: a fresh process with only these options must compute.
  env = {**os.environ, "XLA_FLAGS": OPTION, "JAX_PLATFORMS": "cpu"}
  code = "import jax.numpy as jnp; print(float(jnp.ones((4, 4)).sum()))"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "16.0", proc.stderr[-3000:]


def test_importing_the_package_leaves_xla_flags_alone():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = "import os, diffusion_jax, diffusion_jax.sampling; print(repr(os.environ.get('XLA_FLAGS')))"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr[-3000:]
  code = "import os, diffusion_jax; diffusion_jax.set_xla_cpu_options(); print(os.environ['XLA_FLAGS'])"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == OPTION, proc.stderr[-3000:]
