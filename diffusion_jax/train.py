"""The training loop: resume, steps, metrics, checkpoints, preemption and sample grids.

One `Mesh` over every device of every process (`runtime.make_mesh`): batches
are sharded over 'data', prefetched to the devices two steps ahead, and the
replicated train state goes through one jitted, donated step
(`train_step.jit_train_step`). A run is a function of (config, seed): the data
order comes from the seeded input pipeline and the step's randomness from
`fold_in(key(seed), step)`. Metrics are fetched one step late, so logging never
waits for the step just dispatched. Stop requests, lost processes, the time
budget and a full disk are handled by `faults`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import checkpointing
from diffusion_jax import compat
from diffusion_jax import config_base
from diffusion_jax import data_sources
from diffusion_jax import distill_step
from diffusion_jax import errors
from diffusion_jax import faults
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writer
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import train_step as train_step_lib
from diffusion_jax import workdirs
from diffusion_jax.evaluation import evaluators as evaluators_lib

TrainState = train_step_lib.TrainState
PROFILE_DIR = "profile"


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """How a `train_and_evaluate` call ended.

  Attributes:
    state: the final train state.
    steps: the step it ended at.
    finish_reason: 'steps' (num_train_steps reached), 'time_budget' (training.time_budget_s reached: a normal
      finish) or 'stopped' (a signal or a preemption notice; the checkpoint of `steps` is complete).
    evaluations: name -> `evaluators.Result` of the evaluations that ran at the end (`config.evals`, at_end).
  """

  state: TrainState
  steps: int
  finish_reason: str
  evaluations: dict = dataclasses.field(default_factory=dict)

  @property
  def finished(self) -> bool:
    return self.finish_reason in ("steps", "time_budget")


# ----------------------------------------------------------------------------
# What happens at a step.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The step counts that decide what the loop does: training.* and the evaluations' `every` and `at_end`."""

  num_steps: int
  log_every: int
  checkpoint_every: int
  sample_every: int = 0
  evals: tuple[tuple[str, int, bool], ...] = ()  # (name, every, at_end)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, evals=()) -> Schedule:
    tc = config.training
    return cls(
      num_steps=int(tc.num_train_steps),
      log_every=int(tc.log_every),
      checkpoint_every=int(tc.checkpoint_every),
      sample_every=int(tc.sample_every or 0),
      evals=tuple((e.name, e.every, e.at_end) for e in evals),
    )


@dataclasses.dataclass(frozen=True)
class Actions:
  """What the loop does after a step: log its metrics, checkpoint, write a grid, run evaluations, finish."""

  log: bool = False
  checkpoint: bool = False
  grid: bool = False
  evaluate: tuple[str, ...] = ()  # evaluations due at this step (`every`)
  finish: str | None = None  # the loop ends after this step: 'steps', 'time_budget' or 'stopped'
  evaluate_at_end: tuple[str, ...] = ()  # evaluations run once the run has finished (`at_end`)


def step_actions(step: int, schedule: Schedule, *, stop: bool = False, out_of_time: bool = False) -> Actions:
  """What the loop does after `step`, from the step, the schedule and the clock; a pure function.

  `stop`: a stop was requested (a signal or a preemption notice): checkpoint this step and end, unless it is
  the last anyway. `out_of_time`: training.time_budget_s has run out: finish normally here (final
  checkpoint, grid and evaluations). The last step (num_train_steps) always logs, checkpoints and writes a
  grid; a stopped run skips the evaluations.
  """
  if step >= schedule.num_steps:
    finish = "steps"
  else:
    finish = "stopped" if stop else ("time_budget" if out_of_time else None)
  done = finish in ("steps", "time_budget")
  at_end = tuple(name for name, _, end in schedule.evals if end) if done else ()
  return Actions(
    log=step % schedule.log_every == 0 or done,
    checkpoint=(bool(schedule.checkpoint_every) and step % schedule.checkpoint_every == 0) or finish is not None,
    grid=bool(schedule.sample_every) and (step % schedule.sample_every == 0 or done),
    evaluate=tuple(
      name
      for name, every, _ in schedule.evals
      if every and step % every == 0 and finish != "stopped" and name not in at_end
    ),
    finish=finish,
    evaluate_at_end=at_end,
  )


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _check_finite(step: int, metrics: Mapping[str, float], last_saved: int | None, workdir) -> None:
  if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
    where = (
      f"the last good checkpoint (step {last_saved}) in {checkpointing.checkpoint_dir(workdir)} is intact"
      if last_saved is not None
      else "no checkpoint was written"
    )
    raise errors.DivergedError(
      f"Non-finite training loss/gradient at step {step} (loss={metrics['loss']}, "
      f"grad_norm={metrics['grad_norm']}); {where}. Lower optim.learning_rate, keep optim.grad_clip > 0, "
      "or train in float32 (model.dtype='float32')."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, summary=None) -> TrainResult:
  """Trains (or continues training) the model of `config` in `workdir`, and runs the evaluations it asks for.

  Resumes from the newest readable checkpoint in the workdir (train state and
  input position); otherwise starts from `config.training.init_from` weights if
  set, or from a fresh initialisation. What happens after each step (metrics,
  checkpoints, sample grids, evaluations, the end) is `step_actions`: metrics every `log_every` steps,
  checkpoints every `checkpoint_every` steps, at the end and on SIGTERM, a sample grid every `sample_every`
  steps, the `config.evals` entries every their `every` steps and, with `at_end`, once training has finished.
  With `training.time_budget_s` set, finishes normally at the first step boundary past the budget (`faults.TimeBudget`).

  Args:
    config: the run's config.
    workdir: the run's directory.
    summary: optional; told the start step (`summary.started(step)`) and each
      logged step's metrics (`summary.logged(step, metrics)`), for the command
      line's closing summary, and, where it has a `stepped` method, each step
      (`summary.stepped(step)`, for a progress bar).

  Returns:
    A `TrainResult`.
  """
  config = config_base.upgrade(config)
  run = _Run(config, epath.Path(workdir), summary)
  step, state = run.start_step, run.state
  actions = Actions(finish="steps") if step >= run.schedule.num_steps else Actions()
  budget, previous_metrics = run.budget, None
  with faults.Preemption() as preemption, _closing(run.manager, run.writer, run.profiler):
    preemption.checked = step
    while actions.finish is None:
      run.profiler.before_step(step)
      state, metrics = run.step_fn(state, next(run.train_iter), run.step_rng)
      step += 1
      faults.check_no_failed_write(run.workdir, step)
      run.report_pending()
      planned = step_actions(step, run.schedule)
      sync = planned.log or planned.checkpoint  # the steps where the processes exchange their stop flags
      stop = preemption.should_stop(step, sync=sync)
      out_of_time = not (stop or planned.finish) and budget.reached(metrics, previous_metrics, sync=sync)
      actions = step_actions(step, run.schedule, stop=stop, out_of_time=out_of_time)
      previous_metrics = metrics
      run.after_step(step, state, metrics, actions, reason=preemption.reason)
      if getattr(run.summary, "stepped", None) is not None:
        run.summary.stepped(step)  # a progress bar (the distillation rounds')
    run.report_pending()
  evaluations = run.evaluate(step, state, actions.evaluate_at_end, at_end=True) if actions.evaluate_at_end else {}
  if actions.finish == "stopped":
    logging.warning(
      "Stopped at step %d of %d; the checkpoint of step %d is complete in %s.",
      step,
      run.schedule.num_steps,
      step,
      checkpointing.checkpoint_dir(run.workdir),
    )
  return TrainResult(state=state, steps=step, finish_reason=actions.finish, evaluations=evaluations)


class _Run:
  """One invocation of the loop: its model, data, mesh, checkpoint manager, writer and caches."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path, summary):
    train_step_lib.validate_config(config)
    self.config, self.workdir, self.summary = config, workdir, summary
    tc = config.training
    self.evaluators = evaluators_lib.from_config(config, workdir, training=True)  # settings fail here, not at the end
    self.schedule = Schedule.from_config(config, self.evaluators)
    self.network, self.diffusion = runtime.build(config)
    init_rng, self.step_rng, self.sample_rng = jax.random.split(jax.random.PRNGKey(tc.seed), 3)
    # Fail before any compilation on a workdir that cannot take the run's checkpoints.
    create = functools.partial(
      train_step_lib.create_train_state, config, self.network, tx=optimizer_lib.create_optimizer(config.optim)
    )
    abstract = jax.eval_shape(create, init_rng)
    self.checkpoint_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    # A distillation round (the config names a teacher): the same loop, with the teacher's step and its start.
    self.teacher = distill_step.load_teacher(config, abstract.params) if distill_step.is_distillation(config) else None
    workdirs.check_workdir(workdir, checkpoint_bytes=self.checkpoint_bytes)
    workdirs.write_config(workdir, config)
    if self.network.num_classes:
      workdirs.write_class_names(workdir, data_sources.class_names(config.data))
    self.mesh = runtime.make_mesh(config)
    self.train_iter = runtime.prefetch(
      input_pipeline.create_train_iterator(config, seed=tc.seed), self.mesh, size=max(1, tc.get("prefetch", 2))
    )
    self.manager = checkpointing.create_manager(workdir, max_to_keep=tc.keep_checkpoints, log_saves=True)
    self.start_step, self.state, found = self._restore_or_init(abstract, init_rng)
    self.last_saved = self.start_step if found else None
    if summary is not None:
      summary.started(self.start_step)
    state_sharding = jax.tree.map(lambda x: x.sharding, self.state)
    if self.teacher is not None:
      self.step_fn = distill_step.jit_distill_step(
        self.mesh, self.network, self.diffusion, self.teacher, config, state_sharding
      )
    else:
      self.step_fn = train_step_lib.jit_train_step(
        self.mesh,
        self.network,
        self.diffusion,
        config.optim,
        state_sharding,
        label_dropout=float(tc.get("label_dropout", 0.0)),
      )
    self.writer = metric_writer.MetricWriter(workdir)
    self.profiler = _Profiler(workdir, self.start_step + 1, tc.get("profile_steps", 0))
    self.budget = faults.TimeBudget(tc.get("time_budget_s", 0.0))
    self.pending = None  # (step, metrics) of a log step whose metrics are fetched after the next dispatch
    self._clock = (time.time(), self.start_step)
    self._compiled = {}  # the evaluations' compiled samplers (inference.LoadedModel.compiled)

  def _restore_or_init(self, abstract, init_rng):
    """(start step, state, whether a checkpoint was found): the newest readable checkpoint, else a new state."""
    # The state lives replicated; a restart restores into shapes (nothing is initialised or compiled for it).
    replicated = runtime.replicated(self.mesh)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)

    def restore_args(_):
      return ocp.args.Composite(
        **{
          checkpointing.STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          checkpointing.DATA_ITEM: input_pipeline.train_restore_args(self.train_iter),
        }
      )

    found = checkpointing.restore_latest(self.manager, restore_args)
    if jax.process_count() > 1:
      steps = multihost_utils.process_allgather(np.asarray(-1 if found is None else found[0]))
      if len(set(np.asarray(steps).tolist())) != 1:
        raise RuntimeError(
          f"The processes found different checkpoints to resume from (steps by process: {steps.tolist()}, -1: "
          f"none) in {checkpointing.checkpoint_dir(self.workdir)}. The workdir must be storage that every process "
          "sees the same (a bucket or a shared file system)."
        )
    config, tc = self.config, self.config.training
    if found is not None:
      start_step, restored = found
      state = restored[checkpointing.STATE_ITEM]
      logging.info("Resumed from the checkpoint of step %d in %s.", start_step, self.workdir)
      # Unreadable newer checkpoints go aside, so these steps can be written again.
      checkpointing.set_aside(self.manager, [s for s in self.manager.all_steps() if s > start_step])
    else:
      start_step = 0
      if self.teacher is not None:  # a student starts as its teacher (parameters and EMA)
        teacher = self.teacher.params
        state = train_step_lib.init_state_sharded(
          config, self.network, self.mesh, init_rng, params=teacher, ema_params=teacher
        )
        logging.info("Student initialised from its teacher %s (step %d).", self.teacher.path, self.teacher.step)
      elif tc.get("init_from"):
        _, params, src_step = checkpointing.load_params(tc.init_from, use_ema=False)
        _, ema, _ = checkpointing.load_params(tc.init_from, use_ema=True, step=src_step)
        state = train_step_lib.init_state_sharded(
          config, self.network, self.mesh, init_rng, params=params, ema_params=ema
        )
        logging.info("Initialised from %s (step %d).", tc.init_from, src_step)
      else:
        state = train_step_lib.init_state_sharded(config, self.network, self.mesh, init_rng)
    assert int(state.step) == start_step, (int(state.step), start_step)
    return start_step, state, found is not None

  def after_step(self, step, state, metrics, actions: Actions, *, reason) -> None:
    """Carries out `actions` for `step` (metrics of log steps without a checkpoint are fetched one step late)."""
    if actions.finish == "time_budget":
      logging.info(
        "Time budget of %.0f s reached at step %d (%.1f s since the first step finished): writing the "
        "final checkpoint and finishing.",
        self.budget.seconds,
        step,
        self.budget.elapsed,
      )
    elif actions.finish == "stopped":
      logging.warning("Stopping at step %d (%s): writing the checkpoint of step %d, then exiting.", step, reason, step)
    if actions.checkpoint:
      # Checked before the checkpoint is written, so a non-finite state is never saved.
      if actions.log:
        self.report(step, metrics)
      else:
        _check_finite(step, {k: float(v) for k, v in jax.device_get(metrics).items()}, self.last_saved, self.workdir)
      self.save(step, state)
    elif actions.log:
      self.pending = (step, metrics)
    if actions.grid:
      self.write_grid(step, state)
    if actions.evaluate:
      self.evaluate(step, state, actions.evaluate)

  def save(self, step, state) -> None:
    faults.check_room(self.workdir, self.checkpoint_bytes, step)
    self.manager.save(
      step,
      args=ocp.args.Composite(
        **{
          checkpointing.STATE_ITEM: ocp.args.StandardSave(state),
          checkpointing.DATA_ITEM: input_pipeline.train_checkpoint_args(self.train_iter),
          checkpointing.INTEGRITY_ITEM: checkpointing.integrity_save_args(state),
        }
      ),
      force=True,
    )
    self.last_saved = step

  def report_pending(self) -> None:
    if self.pending is not None:
      self.report(*self.pending)
      self.pending = None

  def report(self, step, metrics) -> None:
    """Fetches `metrics` of `step` (waits for that step only), checks them, logs them."""
    host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, host_metrics, self.last_saved, self.workdir)
    now = time.time()
    t_last, step_last = self._clock
    steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
    self._clock = (now, step)
    images_per_step = self.config.training.batch_size
    host_metrics.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * images_per_step)
    self.writer.scalars(step, host_metrics)
    if self.summary is not None:
      self.summary.logged(step, host_metrics)
    if jax.process_index() == 0:
      num_steps = self.schedule.num_steps
      logging.info(
        "step %d/%d | loss %.5f (q0..q3 %.4f %.4f %.4f %.4f) | grad_norm %.3f | lr %.2e | "
        "%.2f steps/s, %.1f img/s | ETA %s",
        step,
        num_steps,
        host_metrics["loss"],
        *(host_metrics[f"loss_q{i}"] for i in range(4)),
        host_metrics["grad_norm"],
        host_metrics["lr"],
        steps_per_sec,
        steps_per_sec * images_per_step,
        _format_eta(min((num_steps - step) / max(steps_per_sec, 1e-9), self.budget.remaining())),
      )

  def write_grid(self, step, state) -> None:
    """Samples a grid with the EMA parameters (training.grid's sampler) and writes it as PNG and to TensorBoard."""
    tc, T = self.config.training, self.diffusion.num_timesteps
    section = dict(tc.grid.to_dict(), num_steps=min(tc.grid.get("num_steps") or T, T))
    spec = samplers.SamplerSpec.from_config(section, num_timesteps=T)
    # The compiled sampler is shared by every grid of the run: the parameters are its argument.
    model = inference.model_from_config(self.config, state.ema_params, step=step, compiled=self._compiled)
    # Conditional models: sample i is of class i mod K, so each grid column is one class.
    indices = np.arange(tc.num_grid_samples)
    samples = inference.generate(model, indices, self.sample_rng, spec, mesh=self.mesh)["samples"]
    if jax.process_index() == 0:
      scale = max(1, 64 // self.config.data.image_size)
      k = self.network.num_classes
      grid = images_lib.make_grid(images_lib.to_uint8(samples), scale=scale, ncols=k or None)
      images_lib.save_image(grid, self.workdir / "samples" / f"grid_step_{step:08d}.png", overwrite=True)
      self.writer.image(step, "samples", grid)

  def evaluate(self, step, state, names, *, at_end: bool = False) -> dict:
    """Runs the named evaluations on the EMA parameters of `state` (`evaluators.run_all`)."""
    # One set of compiled samplers for every evaluation of the run: the parameters are arguments.
    model = inference.model_from_config(self.config, state.ema_params, step=step, compiled=self._compiled)
    chosen = [e for e in self.evaluators if e.name in names]
    writer = None if at_end else self.writer  # at the end the loop's writer is closed
    results, _ = evaluators_lib.run_all(
      chosen, model, workdir=self.workdir, mesh=self.mesh, writer=writer, what="final eval" if at_end else "eval"
    )
    return results


class _Profiler:
  """A jax.profiler trace of `num_steps` steps from `first_step` into workdir/profile (process 0)."""

  def __init__(self, workdir, first_step: int, num_steps: int):
    self._dir = epath.Path(workdir) / PROFILE_DIR
    self._first = first_step
    self._last = first_step + max(0, num_steps)
    self._active = False
    self._enabled = num_steps > 0 and jax.process_index() == 0

  def before_step(self, step: int) -> None:
    if not self._enabled:
      return
    if step == self._first and not self._active:
      jax.profiler.start_trace(str(self._dir))
      self._active = True
      logging.info(
        "Tracing steps %d to %d into %s (open with TensorBoard's profile plugin or Perfetto).",
        self._first + 1,
        self._last,
        self._dir,
      )
    elif step == self._last and self._active:
      self.stop()

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False


@contextlib.contextmanager
def _closing(manager, writer, profiler=None):
  """Finishes pending asynchronous checkpoint writes (also when training fails), then closes.

  When training already failed for lack of space, a pending save that fails for the same reason is not reported
  again (the error on its way out says it all)."""
  failed_for_space = False
  try:
    yield
  except errors.NoSpaceError:
    failed_for_space = True
    raise
  finally:
    if profiler is not None:
      profiler.stop()
    for finish in (manager.wait_until_finished, manager.wait_until_finished, manager.close):
      try:
        finish()  # waited for twice: after a failed save, Orbax's other threads of that save may still run
      except Exception as e:  # noqa: BLE001 - re-raised unless it is the failure already on its way out
        if not (failed_for_space and compat.is_disk_full(e)):
          raise
    writer.close()
