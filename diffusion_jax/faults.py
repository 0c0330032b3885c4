"""What the training loop does about faults: stop requests, lost processes, the time budget, a full disk.

* `Preemption`: SIGTERM/SIGINT and the cluster's preemption notices, as one stop
  decision per step, the same on every process.
* `PeerWatch`: heartbeats in workdir/.heartbeats; a process of a multi-process
  run that stops beating ends the others with one message and status
  `EXIT_LOST_PROCESS`.
* `TimeBudget`: `training.time_budget_s`, a normal finish at a step boundary.
* `check_room` and `check_no_failed_write`: room in the workdir for the next
  checkpoint, and asynchronous saves that failed for lack of space; either
  stops the run with one `errors.NoSpaceError`.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import checkpointing
from diffusion_jax import compat
from diffusion_jax import errors
from diffusion_jax import workdirs

# ----------------------------------------------------------------------------
# Stop requests.
# ----------------------------------------------------------------------------


def _preemption_service_running() -> bool:
  """Whether JAX's preemption service runs (`jax.distributed.initialize` starts it unless disabled)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Preemption:
  """Stop requests: SIGTERM/SIGINT and the cluster's preemption notices, as one decision per step.

  On one process, SIGTERM and SIGINT set a flag that the loop reads after each
  step. On several processes every process must stop (and save) at the same
  step. JAX's preemption service, started by `jax.distributed.initialize`,
  catches SIGTERM on any process and agrees on a step with the others;
  `reached_preemption_sync_point` reads that decision without communication,
  so it is asked at every step. Other stop signals (SIGINT, or SIGTERM where the
  service is off) are shared at the steps where the loop talks to the host
  anyway (logging and checkpoint steps). Signals after the first are ignored
  while the checkpoint is written.
  """

  def __init__(self):
    self.requested = threading.Event()
    self.reason = None
    self.stop_step = None  # one process: the step announced when the signal came, the one checkpointed
    self.checked = 0  # the last step whose stop decision was taken
    self._previous = {}
    self._service = False

  def __enter__(self):
    self._service = jax.process_count() > 1 and _preemption_service_running()
    # With the service, SIGTERM stays with JAX's own handler.
    signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested.is_set():
      logging.warning(
        "Received %s again: still writing the checkpoint before exiting (kill -9 aborts at once; "
        "the previous checkpoint stays intact).",
        name,
      )
      return
    self.reason = f"received {name}"
    if jax.process_count() == 1:
      # The first step whose stop decision is still open: should_stop stops exactly there.
      self.stop_step = self.checked + 1
      logging.warning("Received %s: training stops after step %d and writes its checkpoint.", name, self.stop_step)
    else:
      logging.warning("Received %s: training stops after the current step and writes its checkpoint.", name)
    self.requested.set()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int, *, sync: bool) -> bool:
    """Whether to save and stop after `step`; the same answer on every process.

    Args:
      step: the step just dispatched.
      sync: whether this is a step at which all processes exchange their stop
        flags (must be the same on all processes).
    """
    if jax.process_count() == 1:
      self.checked = step  # a signal from here on stops at step + 1
      return self.stop_step is not None and step >= self.stop_step
    stop = False
    if self._service and multihost_utils.reached_preemption_sync_point(step):
      stop, self.reason = True, "preemption notice (SIGTERM) to one of the processes"
    if sync:
      flags = multihost_utils.process_allgather(np.asarray(self.requested.is_set()))
      if np.any(flags) and not stop:
        stop = True
        self.reason = self.reason or f"stop signal on process(es) {np.flatnonzero(flags).tolist()}"
    return stop


# ----------------------------------------------------------------------------
# Lost processes.
# ----------------------------------------------------------------------------

EXIT_LOST_PROCESS = 75  # EX_TEMPFAIL, as a preemption: restarting every process continues the run
HEARTBEAT_DIR = ".heartbeats"
_DONE = "done"


def peer_timeout_s(config: ml_collections.ConfigDict) -> float:
  """`training.peer_timeout_s`, or the platform's default (0): 300 s on TPU, 60 s elsewhere."""
  value = float(config.training.get("peer_timeout_s", 0.0) or 0.0)
  if value > 0:
    return value
  return 300.0 if jax.default_backend() == "tpu" else 60.0


class PeerWatch:
  """Notices a lost process of a multi-process run within `timeout` seconds and ends this one with a status.

  Each process writes a counter to workdir/.heartbeats/process_<i> every
  timeout/5 seconds from a background thread (so compiling, saving or waiting
  in a collective does not stop it) and watches the others' files. A peer whose
  counter has not changed for `timeout` seconds is taken as lost: this process
  prints the closing summary and one message (the lost process, the newest
  complete checkpoint, the command that continues) and exits with status
  `EXIT_LOST_PROCESS` at once. Without it, a survivor waits in its next
  collective until JAX's coordination service gives up on the dead task and
  aborts the process with a native stack trace; `main` sets JAX's heartbeat
  timeout to twice this one, so this watch speaks first. `main` starts it right
  after `jax.distributed.initialize` (which returns on every process at about
  the same time), around the whole run.
  """

  def __init__(self, workdir, timeout: float, *, summary=None):
    self._dir = epath.Path(workdir) / HEARTBEAT_DIR
    self._timeout = timeout
    self._summary = summary
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    if jax.process_count() > 1:
      self._dir.mkdir(parents=True, exist_ok=True)
      self._thread = threading.Thread(target=self._run, name="peer_watch", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      try:  # a process that left the loop is not lost: the others stop watching it
        (self._dir / f"process_{jax.process_index()}").write_text(_DONE)
      except OSError:
        pass

  def await_verdict(self) -> None:
    """After an error, in a multi-process run: gives the watch the time to find a lost peer first.

    A collective whose peer died may fail at once (gloo: "Connection reset by
    peer") instead of waiting; if a peer is lost, the watch ends the process
    with its message within `timeout`; otherwise this returns and the error is
    reported as it is.
    """
    if self._thread is not None:
      self._thread.join(self._timeout + 2 * max(0.2, self._timeout / 5))

  def _run(self) -> None:
    me, n = jax.process_index(), jax.process_count()
    interval = max(0.2, self._timeout / 5)
    unread = object()
    last = {peer: unread for peer in range(n)}  # the last content read of each peer's file
    changed = {peer: time.monotonic() for peer in range(n)}  # when it last changed
    beating = set()  # peers seen beating in this run: only their "done" means they finished
    beat = 0
    while not self._stop.is_set():
      beat += 1
      try:
        (self._dir / f"process_{me}").write_text(str(beat))
      except OSError as e:
        logging.warning("Could not write the heartbeat of process %d in %s: %s", me, self._dir, e)
      now = time.monotonic()
      for peer in range(n):
        if peer == me:
          continue
        try:
          value = (self._dir / f"process_{peer}").read_text()
        except OSError:
          value = None
        if value != last[peer]:
          if last[peer] is not unread and value not in (None, _DONE):
            beating.add(peer)
          last[peer], changed[peer] = value, now
        if value == _DONE and peer in beating:
          continue
        if now - changed[peer] > self._timeout:
          self._lost(peer, now - changed[peer])
          return
      self._stop.wait(interval)

  def _lost(self, peer: int, silent_s: float) -> None:
    steps = checkpointing.checkpoint_steps(self._dir.parent)
    intact = f"the newest complete checkpoint, of step {steps[-1]}, is intact" if steps else "no checkpoint was written"
    if self._summary is not None:
      self._summary.print(f"Training stopped: process {peer} of {jax.process_count()} was lost; {intact}.")
    sys.stdout.flush()
    sys.stderr.write(
      f"error: Process {peer} of {jax.process_count()} of this run stopped responding (no heartbeat for "
      f"{silent_s:.0f} s, training.peer_timeout_s={self._timeout:g}). {intact[0].upper()}{intact[1:]}. Restart every "
      f"process with the same command to continue. Exit status {EXIT_LOST_PROCESS}.\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_LOST_PROCESS)  # pylint: disable=protected-access  (the main thread may be stuck in a collective)


# ----------------------------------------------------------------------------
# The time budget.
# ----------------------------------------------------------------------------


class TimeBudget:
  """`training.time_budget_s`: a normal finish once the loop has run that long, decided at a step boundary.

  The clock starts when the first step of this invocation has finished (so
  start-up, restoring and that step's compilation are not counted); from then
  on everything in the loop counts (steps, logging, checkpoints, grids). While
  a budget is set, the loop waits after each dispatch until the previous step
  has finished, so the host is at most one step ahead of the devices and the
  clock measures finished work. Several processes decide together at the
  steps where they exchange their stop flags (log and checkpoint steps).
  """

  def __init__(self, seconds: float):
    self.seconds = float(seconds or 0.0)
    self.start = None
    self.elapsed = 0.0

  def reached(self, metrics, previous_metrics, *, sync: bool) -> bool:
    """Whether to finish after the step that returned `metrics` (the same answer on every process)."""
    if self.seconds <= 0:
      return False
    if self.start is None:
      jax.block_until_ready(metrics)
      self.start = time.perf_counter()
      return False
    jax.block_until_ready(previous_metrics)
    self.elapsed = time.perf_counter() - self.start
    over = self.elapsed > self.seconds
    if jax.process_count() > 1:
      over = sync and bool(np.any(multihost_utils.process_allgather(np.asarray(over))))
    return over

  def remaining(self) -> float:
    return max(0.0, self.seconds - self.elapsed) if self.seconds > 0 else math.inf


# ----------------------------------------------------------------------------
# Room for checkpoints.
# ----------------------------------------------------------------------------


# Room kept free beyond a checkpoint's arrays: Orbax's metadata, the data iterator's state, TensorBoard events.
_CHECKPOINT_ROOM = 4 << 20


def check_room(workdir, checkpoint_bytes: int, step: int) -> None:
  """Stops before the checkpoint of `step` if the workdir cannot take it: one message, nothing half-written.

  Every process checks; with several processes they agree (any one short of room stops all), since each writes
  its part of the checkpoint.
  """
  needed = checkpoint_bytes + _CHECKPOINT_ROOM
  free = workdirs.free_bytes(workdir)
  short = free is not None and free < needed
  if jax.process_count() > 1:
    short = bool(np.any(multihost_utils.process_allgather(np.asarray(short))))
  if short:
    workdirs.check_free_space(workdir, needed, f"the checkpoint of step {step}")
    raise errors.NoSpaceError(
      errno.ENOSPC, f"Another process has no room for its part of the checkpoint of step {step}.", str(workdir)
    )


def check_no_failed_write(workdir, step: int) -> None:
  """Stops after `step` if a background write (an asynchronous checkpoint save) failed for lack of space.

  One process only: with several, a save that fails on one of them surfaces when the run waits for its saves.
  """
  report = compat.DISK_FULL_REPORTS.first if jax.process_count() == 1 else None
  if report is None:
    return
  compat.DISK_FULL_REPORTS.reset()
  detail = compat.short_error(report) if isinstance(report, BaseException) else str(report).splitlines()[0]
  raise errors.NoSpaceError(
    errno.ENOSPC,
    f"A checkpoint write in {workdir} failed for lack of space before step {step} ({detail}).",
    str(workdir),
  )
