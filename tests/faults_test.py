"""Faults of the environment, through the command line: a full disk stops the run at once with one message and no
traceback, exit status 74; every complete checkpoint stays; the same command continues, bit for bit."""

import os
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import cli_train_command
from conftest import tiny_config

from diffusion_jax import checkpointing
from diffusion_jax import errors
from diffusion_jax import train
from diffusion_jax import workdirs

NUM_STEPS = 16
OVERRIDES = {"num_train_steps": NUM_STEPS, "checkpoint_every": 4, "log_every": 4, "keep_checkpoints": 2}


def _config():
  return tiny_config(**OVERRIDES)


def _command(workdir):
  return cli_train_command(workdir, OVERRIDES)


def _env():
  return cli_env()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the faults' config: (final state, workdir)."""
  workdir = tmp_path_factory.mktemp("reference")
  return train.train_and_evaluate(_config(), str(workdir)).state, workdir


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (the test runs as root, as CI does)."""
  if os.geteuid() != 0:
    pytest.fail("this test mounts a tmpfs and must run as root (as CI does)")
  mount = tmp_path / "disk"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: pathlib.Path, leave: int) -> pathlib.Path:
  """Writes a file that leaves `leave` bytes free on the file system of `path`."""
  filler = path / "filler"
  size = workdirs.free_bytes(path) - leave
  with open(filler, "wb") as f:
    f.truncate(0)
    f.write(b"\0" * size)
  return filler


def test_a_full_disk_stops_training_with_one_message_and_the_same_command_continues_exactly(small_disk, reference):
  reference, _ = reference
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(reference))
  workdir = small_disk / "run"
  # Room for the start's check (two checkpoints) and two saves, not a third one.
  filler = _fill(small_disk, int(2.6 * state_bytes))

  proc = subprocess.run(_command(workdir), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  stderr = proc.stderr
  assert proc.returncode == errors.EXIT_NO_SPACE, stderr[-3000:]
  assert "Traceback" not in stderr and "RESOURCE_EXHAUSTED" not in stderr, stderr[-3000:]
  error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, stderr[-3000:]
  steps = checkpointing.checkpoint_steps(workdir)
  assert steps and steps[-1] < NUM_STEPS, steps
  message = error_lines[0]
  assert f"No space left for the workdir {workdir} (" in message and " free)" in message, message
  assert f"The newest complete checkpoint, of step {steps[-1]}, is intact." in message, message
  assert "run the same command again to continue" in message, message
  assert "==== Training stopped at step" in stderr and "the disk is full" in stderr, stderr[-3000:]
  assert len(stderr.splitlines()) < 40, stderr  # the summary block, our lines, one error: no flood

  filler.unlink()
  proc = subprocess.run(_command(workdir), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {steps[-1]}" in proc.stderr, proc.stderr[-3000:]
  _, params, step = checkpointing.load_params(workdir, use_ema=False)
  assert step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(reference.params))


def test_a_diverged_run_stops_at_the_step_with_one_message_and_only_finite_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  command = [*_command(workdir), "--config.optim.learning_rate=1e5", "--config.training.checkpoint_every=1"]
  proc = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  stderr = proc.stderr
  assert proc.returncode == errors.EXIT_USER_ERROR, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and "Non-finite training loss/gradient at step " in error_lines[0], stderr[-3000:]
  assert "Lower optim.learning_rate" in error_lines[0], error_lines[0]
  bad_step = int(error_lines[0].split("at step ")[1].split()[0])
  steps = checkpointing.checkpoint_steps(workdir)
  assert all(s < bad_step for s in steps), (steps, bad_step)
  for step in steps:
    _, params, _ = checkpointing.load_params(workdir, use_ema=False, step=step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


@pytest.mark.parametrize(
  "mode, flags, kept",
  [
    (
      "sample",
      ["--config.sampling.sampler=ddim", "--config.sampling.num_steps=2", "--config.sampling.num_samples=16"],
      "The sample chunks finished before are intact and are not redone",
    ),
    (
      "eval",
      ["--config.eval.metrics=('bpd',)", "--config.eval.bpd_max_examples=8", "--config.eval.drop_remainder=False"],
      "The results finished before are intact and are not redone",
    ),
  ],
)
def test_a_full_disk_in_mode_sample_or_eval_is_one_message(small_disk, reference, mode, flags, kept):
  _, trained = reference
  workdir = small_disk / "run"
  shutil.copytree(trained, workdir)
  _fill(small_disk, 0)
  command = [*_command(workdir), f"--mode={mode}", *flags]
  proc = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  stderr = proc.stderr
  assert proc.returncode == errors.EXIT_NO_SPACE, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, stderr[-3000:]
  assert f"No space left for the workdir {workdir} (0 B free)" in error_lines[0], error_lines[0]
  assert kept in error_lines[0], error_lines[0]


def test_a_full_disk_stops_the_tensorboard_writer_with_one_error(small_disk):
  from diffusion_jax import metric_writer  # noqa: PLC0415

  writer = metric_writer.MetricWriter(small_disk / "run")
  writer.scalars(1, {"loss": 0.5})
  _fill(small_disk, 0)
  with pytest.raises(errors.NoSpaceError, match=r"No room for the TensorBoard scalars of step 2 in .*tensorboard"):
    writer.scalars(2, {"loss": 0.4})
  writer.close()  # nothing more to report
