"""Two processes on localhost (one CPU device each, gloo collectives) against one process with 4 devices.

One run covers the multi-process path end to end: `jax.distributed.initialize`
from the command-line flags, one mesh over both processes' devices, per-process
input shards, checkpoints written by both processes, logs by process 0 only,
and a SIGTERM sent to process 1 alone that stops both processes at the same
step (JAX's preemption service), each writing its part of that step's
checkpoint and exiting with status 75.

Each process has one device. With two per process, XLA:CPU connects the
process's own devices to each other through gloo as well, and that connection
has been seen to hang (jax 0.10 and 0.12, 2 of about 10 runs on a loaded
2-core host): process 0 never reaches its first step while process 1's devices
report all their peers connected. One device per process leaves only
cross-process connections.
"""

import re
import signal
import socket
import time

import jax
import numpy as np
import pytest
from conftest import cli_train_command
from conftest import start_cli
from conftest import tiny_config

from diffusion_jax import checkpointing
from diffusion_jax import train

# Each test runs alone (conftest.py): two processes' gloo connections can stall on an oversubscribed host.
pytestmark = pytest.mark.alone

EXIT_PREEMPTED = 75  # diffusion_jax.main.EXIT_PREEMPTED


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, process_id, port, log_path, num_classes=0, **training):
  command = cli_train_command(workdir, dict(dict(log_every=1), **training)) + [
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    f"--process_id={process_id}",
    f"--config.model.num_classes={num_classes}",
  ]
  return start_cli(command, log_path, devices=1)


@pytest.mark.parametrize("num_classes", [0, 10])  # 10: class-conditional, labels in the batch, label dropout
def test_two_processes_train_like_one_and_stop_together_on_sigterm(tmp_path, num_classes):
  workdir = tmp_path / "run"
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [
    _start(workdir, i, port, logs[i], num_classes=num_classes, num_train_steps=100, checkpoint_every=1000)
    for i in range(2)
  ]
  try:
    deadline = time.monotonic() + 400
    while "step 2/100" not in logs[0].read_text():  # both processes are in the training loop
      assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
      assert time.monotonic() < deadline, "timed out waiting for step 2"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice on one host only
    time.sleep(0.3)
    procs[1].send_signal(signal.SIGTERM)
    returncodes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  texts = [log.read_text() for log in logs]
  assert returncodes == [EXIT_PREEMPTED] * 2, [t[-3000:] for t in texts]

  # Both processes stopped at the same step and wrote its checkpoint together (the only one: no periodic ones).
  stops = [re.findall(r"Stopping at step (\d+) \(preemption notice", t) for t in texts]
  assert stops[0] and stops[0] == stops[1], stops
  step = int(stops[0][0])
  assert checkpointing.checkpoint_steps(workdir) == [step] and step < 100
  data = workdir / checkpointing.CHECKPOINT_DIR / str(step) / checkpointing.DATA_ITEM
  assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  # Only process 0 reports progress and writes TensorBoard events.
  assert f"step {step}/100" in texts[0] and "step 1/100" not in texts[1]
  assert len(list((workdir / "tensorboard").iterdir())) == 1

  # The same steps on one process with 4 devices: the same parameters up to float32 rounding (the
  # cross-process gradient sum over 2 devices adds in another order than the in-process one over 4). Two leaves
  # are rounding noise, compared by size alone: the biases of up_0/block_1's conv2 and nin_shortcut feed
  # norm_out, whose 32 groups are single channels here (ch=32), so their gradient is zero but for rounding;
  # their values stay below 1e-5 and differ by up to 6e-6 between the runs. Every other leaf: rtol 1e-5.
  config = tiny_config(num_train_steps=step, checkpoint_every=1000)
  config.model.num_classes = num_classes
  single = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "single")).state)
  for use_ema, expected in ((False, single.params), (True, single.ema_params)):
    _, params, loaded_step = checkpointing.load_params(workdir, use_ema=use_ema, step=step)
    assert loaded_step == step
    jax.tree.map(_assert_equal_up_to_rounding, params, expected)


def _assert_equal_up_to_rounding(got, want):
  got, want = np.asarray(got), np.asarray(want)
  if max(np.max(np.abs(got)), np.max(np.abs(want))) < 1e-5:  # rounding noise (see above)
    return
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)


LOST_STEPS = 12


def test_a_lost_process_ends_the_other_with_one_message_and_a_restart_resumes_exactly(tmp_path):
  training = dict(num_train_steps=LOST_STEPS, checkpoint_every=4, peer_timeout_s=10)
  # The uninterrupted two-process run.
  port = _free_port()
  logs = [tmp_path / f"reference_{i}.log" for i in range(2)]
  procs = [_start(tmp_path / "reference", i, port, logs[i], **training) for i in range(2)]
  assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text()[-3000:] for log in logs]

  workdir = tmp_path / "run"
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [_start(workdir, i, port, logs[i], **training) for i in range(2)]
  try:
    deadline = time.monotonic() + 300
    while not checkpointing.checkpoint_steps(workdir):
      assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
      assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
      time.sleep(0.05)
    procs[1].kill()
    killed = time.monotonic()
    returncode = procs[0].wait(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
  text = logs[0].read_text()
  assert returncode == 75, text[-3000:]
  assert waited < 10 + 2 + 10, waited  # the timeout, a heartbeat interval, slack for a loaded machine
  for forbidden in ("Traceback", "Fatal Python error", "Check failed", "SIGABRT", "Thread 0x"):
    assert forbidden not in text, text[-3000:]
  error_lines = [line for line in text.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and "Process 1 of 2 of this run stopped responding" in error_lines[0], text[-3000:]
  newest = checkpointing.checkpoint_steps(workdir)[-1]
  assert f"The newest complete checkpoint, of step {newest}, is intact." in error_lines[0], error_lines[0]
  assert "==== Training stopped: process 1 of 2 was lost" in text and "resume:" in text, text[-3000:]

  # Every process restarted with the same command: the run continues and ends as the uninterrupted one.
  port = _free_port()
  logs = [tmp_path / f"restart_{i}.log" for i in range(2)]
  procs = [_start(workdir, i, port, logs[i], **training) for i in range(2)]
  assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text()[-3000:] for log in logs]
  for use_ema in (False, True):
    _, got, step = checkpointing.load_params(workdir, use_ema=use_ema)
    _, want, _ = checkpointing.load_params(tmp_path / "reference", use_ema=use_ema)
    assert step == LOST_STEPS
    jax.tree.map(np.testing.assert_array_equal, got, want)
