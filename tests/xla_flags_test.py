"""The package's XLA:CPU options: appended to XLA_FLAGS unless the user set them, turned off, or unknown to jaxlib."""

import os

from diffusion_jax import xla_flags


def test_this_process_runs_with_the_options():
  assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
  assert "--xla_force_host_platform_device_count=" in os.environ["XLA_FLAGS"]  # the user's (conftest's) kept


def test_the_users_setting_wins_and_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_flags.apply() == []
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setenv(xla_flags.ENV, "0")
  assert xla_flags.apply() == [] and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.delenv(xla_flags.ENV)
  assert xla_flags.apply() == ["--xla_cpu_experimental_ynn_fusion_type="]
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="


def test_options_unknown_to_jaxlib_are_not_added(monkeypatch):
  # XLA exits on an unknown flag, so only names found in jaxlib's library are ever added.
  assert xla_flags._jaxlib_knows("xla_cpu_experimental_ynn_fusion_type")
  assert not xla_flags._jaxlib_knows("xla_cpu_no_such_option_anywhere_zz")
  monkeypatch.setattr(xla_flags, "CPU_OPTIONS", (("xla_cpu_no_such_option_anywhere_zz", "1"),))
  assert xla_flags.options_to_add("") == []
