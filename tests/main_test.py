"""Command-line behaviour of `python -m diffusion_jax.main`."""

import os
import subprocess
import sys

import pytest
from conftest import CACHE_DIR
from conftest import REPO_ROOT


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR / "jax"))
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", "diffusion_jax.main", *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_misspelt_override_fails_loudly(tmp_path):
  proc = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.training.batch_szie=64")
  assert proc.returncode != 0
  assert "batch_szie" in proc.stderr
  assert not (tmp_path / "config.json").exists()


def test_missing_workdir_is_a_usage_error():
  proc = _run("--config=configs/tiny.py")
  assert proc.returncode != 0
  assert "workdir" in proc.stderr


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.diffusion.beta_schedule=cosinus", "Unknown beta schedule 'cosinus'"),
    ("--config.optim.clip_groups=3", "clip_groups=3 must be a positive divisor"),
    ("--config.model.attn_resolutions=(5,)", "attn_resolutions (5,) contains [5]"),
    ("--config.model.init=torch", "Unknown model.init 'torch'; valid choices are ddpm, pytorch"),
  ],
)
def test_bad_config_values_name_the_problem(tmp_path, override, message):
  proc = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_train_then_sample_from_the_command_line(tmp_path):
  proc = _run(
    "--config=configs/tiny.py",
    f"--workdir={tmp_path}",
    "--config.training.num_train_steps=2",
    "--config.training.sample_every=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stderr
  assert (tmp_path / "samples" / "grid_step_00000002.png").exists()
  assert list((tmp_path / "tensorboard").iterdir())
  proc = _run(
    "--config=configs/tiny.py",
    f"--workdir={tmp_path}",
    "--mode=sample",
    "--config.sampling.sampler=ddim",
    "--config.sampling.num_steps=4",
    "--config.sampling.num_samples=6",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "samples" / "step_2_ddim_4steps_eta0"
  assert sorted(p.name for p in out.iterdir()) == ["grid.png", "progressive.png", "samples_0000000_0000006.npz"]


def test_a_short_tiny_run_prints_only_our_lines_and_the_summary(tmp_path):
  proc = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.training.num_train_steps=40")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = (proc.stdout + proc.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  assert "Traceback" not in proc.stderr and "tensorflow" not in proc.stderr.lower()
  assert sum("Saved the checkpoint of step" in line for line in lines) == 2  # steps 20 and 40
  assert "==== Training finished: 40 steps." in proc.stderr
  assert f"resume:       python -m diffusion_jax.main --config=configs/tiny.py --workdir={tmp_path}" in proc.stderr
  assert "orbax" not in proc.stderr.lower()


def test_user_errors_print_one_message_and_exit_2(tmp_path):
  proc = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.diffusion.beta_schedule=cosinus")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: " in proc.stderr and "Traceback" not in proc.stderr


def test_the_tensorboard_writer_imports_tensorboardx_only_where_it_writes(tmp_path):
  script = f"""
import sys
import numpy as np
from diffusion_jax import metric_writer
assert "tensorboardX" not in sys.modules, "importing the writer's module imported tensorboardX"
with metric_writer.MetricWriter({str(tmp_path)!r}) as w:
  w.scalars(1, {{"loss": 0.5}})
  w.image(1, "grid", np.zeros((8, 8, 3), np.uint8))
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 100
