r"""Command-line entry point.

  python -m diffusion_jax.main --config=configs/cifar.py --workdir=/path/to/run [--mode=train]

Override any config field on the command line, e.g.
`--config.training.batch_size=64`; misspelt fields are an error. The workdir
keeps the run's config, checkpoints, TensorBoard logs, samples and eval
results; running the same command again continues the run.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax import compat
from diffusion_jax import errors

MODES = ("train", "sample", "eval", "fid_stats", "inpaint", "distill")
# Exit status of a training run stopped by SIGTERM/SIGINT or a preemption notice once the checkpoint of its
# last step is written: EX_TEMPFAIL, "try again later". Schedulers that restart failed jobs (Kubernetes,
# a retry loop) then continue the run; a finished run exits with 0.
EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (configs/*.py), or a workdir's config.json.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples, eval results.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the workdir.")
_INPUTS = flags.DEFINE_string(
  "inputs", None, "--mode=inpaint: a folder of images X.png and masks X_mask.png (white = keep, black = fill)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for multi-process GPU runs ($JAX_COORDINATOR_ADDRESS; TPU VMs and srun need none).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Number of processes of a multi-process run ($JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run ($JAX_PROCESS_ID).")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"${name}={value!r} is not an integer.") from None


def _detect_cluster() -> str | None:
  """Names the multi-process environment `jax.distributed.initialize()` sets itself up from, if any."""
  if (_env_int("SLURM_STEP_NUM_TASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return "SLURM (srun)"  # inside a job step, one task per process
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "Open MPI"
  if "TPU_WORKER_HOSTNAMES" in os.environ or compat.on_cloud_tpu_vm():
    return "Cloud TPU VM"
  return None


def _jax_heartbeat_timeout_s() -> int:
  """JAX's own timeout for a dead task: twice the run's training.peer_timeout_s (at least JAX's default, 100 s), so
  the training run's watch (faults.PeerWatch) ends the survivors with a message before JAX aborts them."""
  peer = float(_CONFIG.value.training.get("peer_timeout_s", 0.0) or 0.0) or 300.0  # the largest platform default
  return int(max(100, 2 * peer))


def _initialize_distributed() -> None:
  """Joins a multi-process run: explicit flags (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID),
  else an environment JAX recognises (TPU VM pod slice, srun, Open MPI); otherwise runs as one process."""
  import jax  # pylint: disable=g-import-not-at-top

  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  explicit = any(v is not None for v in (coordinator, num_processes, process_id))
  cluster = None if explicit else _detect_cluster()
  if not explicit and cluster is None:
    return
  # Cross-process collectives on CPU need an implementation (gloo is the default from JAX 0.5 on).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (
    f"coordinator {coordinator}, {num_processes} processes, process id {process_id}"
    if explicit
    else f"auto-detected {cluster}"
  )
  logging.info("Starting the multi-process run (%s).", where)
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_seconds=_jax_heartbeat_timeout_s(),
    )
  except Exception as e:  # noqa: BLE001 - JAX raises several types; every one means the run cannot start
    raise RuntimeError(
      f"Could not join the multi-process run ({where}): {type(e).__name__}: {e}\n"
      "Start every process with the same --coordinator_address=HOST:PORT (a free port on the host of process 0), "
      "--num_processes=N and its own --process_id=0..N-1 (or run under srun, or on a TPU VM); "
      "for a single process pass none of them."
    ) from e
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 reports; the others only warn


@dataclasses.dataclass
class RunSummary:
  """What a --mode=train run did, filled in as it goes (train.train_and_evaluate(..., summary=)) and printed at exit.

  `started` and `logged` are called by the training loop; `print` writes the
  closing block: outcome, steps, wall time, final loss, where the
  checkpoints, sample grids, TensorBoard events and eval results are, and the
  commands that resume the run and sample from it.
  """

  workdir: str
  num_steps: int
  t0: float = dataclasses.field(default_factory=time.time)
  start_step: int | None = None
  step: int | None = None
  loss: float | None = None
  evaluations: list[str] = dataclasses.field(default_factory=list)  # the end-of-training evaluations' summaries
  resume_command: str | None = None  # default: this command without --mode
  sample_command: str | None = None  # default: this command with --mode=sample
  progress: str | None = None  # a progress bar over the steps with this label (process 0), or none
  _bar: object = dataclasses.field(default=None, repr=False)  # the tqdm bar while a run is in progress

  def started(self, start_step: int) -> None:
    self.start_step = self.step = start_step
    import jax  # pylint: disable=g-import-not-at-top

    if self.progress and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(total=self.num_steps, initial=start_step, desc=self.progress, unit="step", mininterval=2.0)

  def stepped(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def logged(self, step: int, metrics) -> None:
    self.step, self.loss = step, float(metrics["loss"])

  def _newest(self, folder: str, pattern: str) -> str | None:
    import glob  # pylint: disable=g-import-not-at-top

    found = sorted(glob.glob(os.path.join(folder, pattern)))
    return os.path.basename(found[-1]) if found else None

  def lines(self, outcome: str, *, step: int | None = None) -> list[str]:
    from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

    step = self.step if step is None else step
    workdir = self.workdir if "://" in self.workdir else os.path.abspath(self.workdir)
    wall = time.time() - self.t0
    wall_text = f"{int(wall) // 3600:d}:{int(wall) // 60 % 60:02d}:{int(wall) % 60:02d}"
    if step is None:
      steps = "none (the run stopped before training started)"
    else:
      done = step - (self.start_step or 0)
      steps = f"{step} of {self.num_steps}" + (
        f" ({done} in this run, from step {self.start_step})" if self.start_step else ""
      )
    ckpt_dir = str(checkpointing.checkpoint_dir(workdir))
    try:
      ckpts = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) if "://" not in ckpt_dir else []
    except OSError:
      ckpts = []
    grid = self._newest(os.path.join(workdir, "samples"), "grid_step_*.png") if "://" not in workdir else None
    evals = sorted(os.listdir(os.path.join(workdir, "eval"))) if os.path.isdir(os.path.join(workdir, "eval")) else []
    args = [a for a in sys.argv[1:] if not a.startswith("--mode")]
    command = "python -m diffusion_jax.main " + shlex.join(args)
    resume = self.resume_command or command
    sample = self.sample_command or f"{command} --mode=sample"
    return [
      f"==== {outcome}",
      f"  steps:        {steps}; wall time {wall_text}",
      f"  final loss:   {self.loss:.5f} (step {self.step})" if self.loss is not None else "  final loss:   none logged",
      f"  checkpoints:  {ckpt_dir}" + (f" (newest: step {ckpts[-1]})" if ckpts else " (none)"),
      f"  sample grids: {os.path.join(workdir, 'samples')}" + (f" (newest: {grid})" if grid else " (none)"),
      f"  TensorBoard:  tensorboard --logdir={os.path.join(workdir, 'tensorboard')}",
      f"  eval results: {os.path.join(workdir, 'eval')}"
      + (f" ({len(evals)} files)" if evals else " (none yet: add --mode=eval)"),
      *(f"  final eval:   {line}" for line in self.evaluations),
      f"  resume:       {resume}",
      f"  sample:       {sample}",
    ]

  def print(self, outcome: str, *, step: int | None = None) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if jax.process_index() == 0:
      sys.stderr.flush()
      sys.stderr.write("\n".join(self.lines(outcome, step=step)) + "\n")
      sys.stderr.flush()


def _train(config, workdir: str, *, summary: RunSummary | None = None) -> RunSummary:
  from diffusion_jax import faults  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top

  num_steps = config.training.num_train_steps
  summary = RunSummary(workdir, num_steps) if summary is None else summary
  try:
    with faults.PeerWatch(workdir, faults.peer_timeout_s(config), summary=summary) as watch:
      try:
        result = train.train_and_evaluate(config, workdir, summary=summary)
      except Exception as e:
        if not errors.is_user_error(e):
          watch.await_verdict()  # a collective that failed because a peer died: the watch says so
        raise
  except BaseException as e:
    what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__})"
    if compat.is_disk_full(e) and summary.step is not None:
      from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

      newest = checkpointing.checkpoint_steps(workdir)
      intact = (
        f"the newest complete checkpoint, of step {newest[-1]}, is intact" if newest else "no checkpoint was written"
      )
      summary.print(f"Training stopped at step {summary.step} of {num_steps}: the disk is full; {intact}.")
      raise _disk_full(e, workdir, f"{intact[0].upper()}{intact[1:]}") from e
    if summary.step is None:
      summary.print(
        f"Training {what} before its first step; the error is below. Fix it and run the same command again."
      )
    else:
      summary.print(
        f"Training {what} at step {summary.step} of {num_steps}; the newest complete checkpoint below is "
        "intact. Fix the error and run the same command again to continue."
      )
    raise
  step = result.steps
  if not result.finished:
    summary.print(
      f"Training stopped early at step {step} of {num_steps}; the checkpoint of step {step} is complete. "
      f"Run the same command again to continue. Exit status {EXIT_PREEMPTED}.",
      step=step,
    )
    sys.exit(EXIT_PREEMPTED)
  summary.evaluations = [f"{name}: {r.summary}" for name, r in result.evaluations.items()]
  outcome = (
    f"Training finished: time budget of {config.training.time_budget_s:g} s reached at step {step}."
    if result.finish_reason == "time_budget"
    else f"Training finished: {num_steps} steps."
  )
  summary.print(outcome, step=step)
  return summary


def _distill(config, workdir: str) -> None:
  """--mode=distill: the rounds of `distill_rounds.plan`, each a training run (`_train`), then one table."""
  from diffusion_jax import distill_rounds  # pylint: disable=g-import-not-at-top

  rounds = distill_rounds.plan(config, workdir)
  logging.info(
    "Distilling %s in %d round(s): %s; students in %s.",
    workdir,
    len(rounds),
    ", ".join(f"{r.teacher_steps} -> {r.student_steps}" for r in rounds),
    os.path.join(workdir, distill_rounds.DISTILL_DIR),
  )
  resume = "python -m diffusion_jax.main " + shlex.join(sys.argv[1:])
  rows = []
  for r in rounds:
    if distill_rounds.finished(r):
      logging.info("%s: finished before, in %s; skipped.", r.name, r.workdir)
      rows.append((r, "finished before", None, None))
      continue
    logging.info("==== %s (%d of %d): the student trains in %s.", r.name, r.index, len(rounds), r.workdir)
    # The student's own config samples it with its sampler (DDIM on its nested grid).
    sample = "python -m diffusion_jax.main " + shlex.join(
      [f"--config={r.workdir / 'config.json'}", f"--workdir={r.workdir}", "--mode=sample"]
    )
    summary = RunSummary(
      str(r.workdir),
      r.config.training.num_train_steps,
      resume_command=resume,
      sample_command=sample,
      progress=f"round {r.index}/{len(rounds)} ({r.teacher_steps} -> {r.student_steps} steps)",
    )
    t0 = time.time()
    _train(r.config, str(r.workdir), summary=summary)
    rows.append((r, f"{time.time() - t0:.0f} s", summary.loss, "; ".join(summary.evaluations)))
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    lines = [f"==== Distillation finished: {len(rounds)} round(s) of {rounds[0].config.training.num_train_steps} steps"]
    for r, wall, loss, evals in rows:
      loss_text = "" if loss is None else f", final loss {loss:.5f}"
      lines.append(f"  {r.name}: {wall}{loss_text}; {r.workdir}" + (f"; {evals}" if evals else ""))
    last = rounds[-1]
    lines.append(
      f"  sample the {last.student_steps}-step student: diffusion_jax.sample_fn(load_model({str(last.workdir)!r}), "
      f"n, rng, sampler='ddim', num_steps={last.student_steps}, timestep_spacing={distill_rounds.SPACING!r})"
    )
    sys.stderr.flush()
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def _disk_full(error: BaseException, workdir: str, intact: str) -> errors.NoSpaceError:
  """One message for a write that failed for lack of space: what failed, the free space, what is intact, what next."""
  from diffusion_jax import workdirs  # pylint: disable=g-import-not-at-top

  free = workdirs.free_bytes(workdir)
  room = f" ({workdirs.format_bytes(free)} free)" if free is not None else ""
  detail = errors.message(error) if isinstance(error, errors.NoSpaceError) else compat.short_error(error)
  return errors.NoSpaceError(
    errno.ENOSPC,
    f"No space left for the workdir {workdir}{room}: {detail} {intact}. Free some space (or move the workdir "
    f"elsewhere) and run the same command again to continue. Exit status {errors.EXIT_NO_SPACE}.",
  )


def _finished_work_is_kept(fn, workdir: str, what: str):
  """Runs fn(); a write that fails for lack of space ends as one message (exit status 74)."""
  try:
    return fn()
  except Exception as e:
    if compat.is_disk_full(e):
      raise _disk_full(e, workdir, f"The {what} finished before are intact and are not redone") from e
    raise


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/cifar.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/ddpm_cifar")
  cli.start()
  _initialize_distributed()

  import jax  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  from diffusion_jax import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.upgrade(_CONFIG.value)
  if _MODE.value == "train":
    _train(config, _WORKDIR.value)
  elif _MODE.value == "distill":
    _distill(config, _WORKDIR.value)
  elif _MODE.value == "sample":
    from diffusion_jax import commands  # pylint: disable=g-import-not-at-top

    _finished_work_is_kept(lambda: commands.sample_to_workdir(config, _WORKDIR.value), _WORKDIR.value, "sample chunks")
  elif _MODE.value == "eval":
    from diffusion_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top

    _finished_work_is_kept(lambda: evaluators.evaluate(config, _WORKDIR.value), _WORKDIR.value, "results")
  elif _MODE.value == "inpaint":
    if not _INPUTS.value:
      raise app.UsageError("--mode=inpaint needs --inputs=DIR, a folder of images X.png and masks X_mask.png.")
    from diffusion_jax import commands  # pylint: disable=g-import-not-at-top

    _finished_work_is_kept(
      lambda: commands.inpaint_folder(config, _WORKDIR.value, _INPUTS.value), _WORKDIR.value, "inpainted images"
    )
  else:
    from diffusion_jax.evaluation import fid_stats  # pylint: disable=g-import-not-at-top

    fid_stats.compute_fid_stats(config, _WORKDIR.value)


def main(argv):
  """The command: user errors (bad configs, paths, checkpoints) end as `error: ...`, exit status 2."""
  cli.exit_on_user_error(_main, argv)


if __name__ == "__main__":
  from diffusion_jax import workdir_config  # pylint: disable=g-import-not-at-top

  flags.mark_flags_as_required(["workdir"])
  app.run(main, argv=workdir_config.rewrite_argv(sys.argv))
