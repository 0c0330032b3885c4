"""Training: the train state with EMA, the optimizer, the jitted data-parallel step and the loop.

One `Mesh` over every device of every process with a single axis 'data':
batches are sharded as P('data'), the train state is replicated, and one
jitted `train_step` with a donated state does the work. A run is a function of
(config, seed): the data order comes from the seeded input pipeline and the
step's randomness from `fold_in(key(seed), step)`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import orbax.checkpoint as ocp
from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import samplers
from diffusion_jax.models import unet

DATA_AXIS = "data"


class TrainState(train_state.TrainState):
  """Flax's TrainState plus an exponential moving average of the parameters."""

  ema_params: Any = None


# ----------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------


def scale_by_adam_epsilon_hat(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam as TF1's `tf.train.AdamOptimizer`: ε ("epsilon hat") is added to √v before bias correction.

  TF1 updates by lr·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε), which is Adam on the
  bias-corrected moments with ε replaced by ε/√(1−β2ᵗ). The paper trained with it.
  """
  base = optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree_utils.tree_update_moment(updates, state.mu, b1, 1)
    nu = optax.tree_utils.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    updates = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps / jnp.sqrt(bc2)), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update_fn)


def learning_rate_schedule(optim_config) -> optax.Schedule:
  """lr·min(step/warmup, 1): zero at step 0, as the paper's warmup."""
  if optim_config.warmup_steps <= 0:
    return optax.constant_schedule(optim_config.learning_rate)
  return optax.linear_schedule(0.0, optim_config.learning_rate, optim_config.warmup_steps)


def create_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam (TF1 ε-hat by default) with the warmup schedule. Clipping happens in `train_step`."""
  if optim_config.epsilon_hat:
    adam = scale_by_adam_epsilon_hat(optim_config.b1, optim_config.b2, optim_config.eps)
  else:
    adam = optax.scale_by_adam(optim_config.b1, optim_config.b2, optim_config.eps)
  return optax.chain(adam, optax.scale_by_learning_rate(learning_rate_schedule(optim_config)))


# ----------------------------------------------------------------------------
# Model, state and step.
# ----------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Cross-field checks that must hold before anything is built; ValueError names the fix."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  bs = config.training.batch_size
  if bs % num_devices:
    raise ValueError(
        f"training.batch_size={bs} is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices} (e.g. --config.training.batch_size={max(1, bs // num_devices) * num_devices})."
    )
  groups = config.optim.clip_groups
  if groups < 1 or bs % groups:
    raise ValueError(
        f"optim.clip_groups={groups} must be a positive divisor of training.batch_size={bs} "
        "(set --config.optim.clip_groups=1 to clip the whole batch's gradient)."
    )
  if config.optim.ema_decay < 0 or config.optim.ema_decay >= 1:
    raise ValueError(f"optim.ema_decay must lie in [0, 1), got {config.optim.ema_decay}.")
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  build_model(config).check_input(jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))


def build_diffusion(config) -> diffusion_lib.GaussianDiffusion:
  return diffusion_lib.from_config(config.diffusion)


def build_model(config, diffusion: diffusion_lib.GaussianDiffusion | None = None) -> unet.UNet:
  diffusion = build_diffusion(config) if diffusion is None else diffusion
  return unet.from_config(config.model, out_ch=diffusion.model_output_channels(config.data.channels))


def init_params(model: unet.UNet, rng, image_shape) -> Any:
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,), jnp.int32), train=False)["params"]


def create_train_state(config, model: unet.UNet, rng, params=None, ema_params=None, tx=None) -> TrainState:
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  if params is None:
    params = init_params(model, rng, image_shape)
  ema_params = params if ema_params is None else ema_params
  tx = create_optimizer(config.optim) if tx is None else tx
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, ema_params=ema_params)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    diffusion: diffusion_lib.GaussianDiffusion,
    optim_config,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; pure, to be jitted with a donated state.

  The step's randomness is `fold_in(rng, state.step)`. With `clip_groups` G > 1
  the batch is split into G groups whose mean-loss gradients are clipped
  separately and then averaged (the paper's per-TPU-core clipping).

  Args:
    state: the replicated train state.
    batch: {"image": [B, H, W, C] float32 in [-1, 1]}, sharded over 'data'.
    rng: the run's base key.
    diffusion: the diffusion (static tables).
    optim_config: config.optim.

  Returns:
    (new state, metrics) with scalar metrics: loss, loss_q0..loss_q3 (mean loss
    by quarter of the timestep range), grad_norm (before clipping), lr.
  """
  x = batch["image"]
  b = x.shape[0]
  step_rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  t = jax.random.randint(t_rng, (b,), 0, diffusion.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x.shape, jnp.float32)

  def loss_fn(params, x, t, noise, dropout_rng):
    def model_fn(x_t, t_):
      return state.apply_fn({"params": params}, x_t, t_, train=True, rngs={"dropout": dropout_rng})

    losses = diffusion.training_losses(model_fn, x, t, noise)
    return jnp.mean(losses), losses

  groups = optim_config.clip_groups
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if groups == 1:
    (_, losses), grads = grad_fn(state.params, x, t, noise, dropout_rng)
    grad_norm = optax.tree_utils.tree_norm(grads)
    if optim_config.grad_clip > 0:
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, optim_config.grad_clip / (grad_norm + 1e-12)), grads)
  else:
    def split(a):
      return a.reshape((groups, b // groups) + a.shape[1:])

    rngs = jax.random.split(dropout_rng, groups)
    (_, losses), grads = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, 0))(
        state.params, split(x), split(t), split(noise), rngs
    )
    losses = losses.reshape(b)
    norms = jax.vmap(optax.tree_utils.tree_norm)(grads)
    grad_norm = jnp.mean(norms)
    if optim_config.grad_clip > 0:
      scale = jnp.minimum(1.0, optim_config.grad_clip / (norms + 1e-12))
      grads = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / groups, grads)
    else:
      grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)

  new_state = state.apply_gradients(grads=grads)
  # tf.train.ExponentialMovingAverage as used by the paper: decay ~0 before the first step.
  decay = jnp.where(state.step < 1, 1e-10, optim_config.ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_state.params)
  new_state = new_state.replace(ema_params=ema)

  quarter = jnp.minimum(t * 4 // diffusion.num_timesteps, 3)
  onehot = jax.nn.one_hot(quarter, 4, dtype=jnp.float32)
  per_quarter = jnp.sum(onehot * losses[:, None], axis=0) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
  metrics = dict(
      loss=jnp.mean(losses),
      grad_norm=grad_norm,
      lr=learning_rate_schedule(optim_config)(state.step),
      **{f"loss_q{i}": per_quarter[i] for i in range(4)},
  )
  return new_state, metrics


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process, grouped by process)."""
  if devices is None:
    # Process p then holds rows [p·B/P, (p+1)·B/P) of every global batch (see `global_batch`).
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def jit_train_step(mesh: Mesh, diffusion, optim_config, state_sharding) -> Callable:
  """train_step jitted for `mesh`: replicated state (donated), batch sharded on 'data'."""
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  return jax.jit(
      functools.partial(train_step, diffusion=diffusion, optim_config=optim_config),
      in_shardings=(state_sharding, {"image": batch_sharding}, replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )


def init_state_sharded(config, model, mesh: Mesh, rng, params=None, ema_params=None) -> TrainState:
  """Creates the train state directly in its (replicated) sharding, through shapes first."""
  replicated = NamedSharding(mesh, P())
  # One optimizer object: the state's tree structure (and so its sharding tree) includes it.
  create = functools.partial(create_train_state, config, model, tx=create_optimizer(config.optim))
  abstract = jax.eval_shape(create, rng)
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  if params is None:
    return jax.jit(create, out_shardings=state_sharding)(rng)
  params = jax.device_put(params, replicated)
  ema_params = params if ema_params is None else jax.device_put(ema_params, replicated)
  init = jax.jit(lambda r, p, e: create(r, params=p, ema_params=e), out_shardings=state_sharding)
  return init(rng, params, ema_params)


@functools.cache
def _interleave(mesh: Mesh, num_processes: int) -> Callable:
  """[P, B/P] rows in process order → the examples' order in the global stream (rows j·P + p)."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def interleave(x):
    return x.reshape((num_processes, x.shape[0] // num_processes) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

  return jax.jit(interleave, out_shardings=sharding, donate_argnums=0)


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch → one global array sharded over 'data'.

  Process p of P reads examples p, p + P, … of each global batch (the input
  pipeline's sharding); on several processes they are put back in stream order
  so that every example meets the same timestep and noise, and training gives
  the same result, whatever the number of processes.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  image = jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"]))
  if jax.process_count() > 1:
    image = _interleave(mesh, jax.process_count())(image)
  return {"image": image}


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def _preemption_service_running() -> bool:
  """Whether JAX's preemption service runs (started by `jax.distributed.initialize`)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  state = distributed.global_state
  return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


class _Preemption:
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
      logging.warning("Received %s again: still writing the checkpoint before exiting (kill -9 aborts at once; "
                      "the previous checkpoint stays intact).", name)
      return
    self.reason = f"received {name}"
    logging.warning("Received %s: training stops after this step and writes its checkpoint.", name)
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
      return self.requested.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    stop = False
    if self._service and multihost_utils.reached_preemption_sync_point(step):
      stop, self.reason = True, "preemption notice (SIGTERM) to one of the processes"
    if sync:
      flags = multihost_utils.process_allgather(np.asarray(self.requested.is_set()))
      if np.any(flags) and not stop:
        stop = True
        self.reason = self.reason or f"stop signal on process(es) {np.flatnonzero(flags).tolist()}"
    return stop


class MetricWriter:
  """TensorBoard event files (tensorboardX, no TensorFlow needed) and a console line; process 0 only."""

  def __init__(self, workdir):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer:
      for k, v in scalars.items():
        self._writer.add_scalar(k, float(v), step)
      self._writer.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")
      self._writer.flush()

  def close(self):
    if self._writer:
      self._writer.close()


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
    raise FloatingPointError(
        f"Non-finite training loss/gradient at step {step} (loss={metrics['loss']}, "
        f"grad_norm={metrics['grad_norm']}); {where}. Lower optim.learning_rate, keep optim.grad_clip > 0, "
        "or train in float32 (model.dtype='float32')."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or continues training) the model of `config` in `workdir`.

  Resumes from the newest readable checkpoint in the workdir (train state and
  input position); otherwise starts from `config.training.init_from` weights if
  set, or from a fresh initialisation. Writes metrics every `log_every` steps,
  checkpoints every `checkpoint_every` steps, at the end and on SIGTERM, and a
  sample grid every `sample_every` steps.

  Returns:
    The final train state.
  """
  workdir = epath.Path(workdir)
  validate_config(config)
  tc = config.training

  diffusion = build_diffusion(config)
  model = build_model(config, diffusion)
  rng = jax.random.PRNGKey(tc.seed)
  init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
  # Fail before any compilation on a workdir that cannot take the run's checkpoints.
  abstract = jax.eval_shape(functools.partial(create_train_state, config, model, tx=create_optimizer(config.optim)),
                            init_rng)
  checkpoint_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  checkpointing.check_workdir(workdir, checkpoint_bytes=checkpoint_bytes)
  checkpointing.write_config(workdir, config)
  mesh = make_mesh()

  train_iter = input_pipeline.create_train_iterator(config, seed=tc.seed)
  state = init_state_sharded(config, model, mesh, init_rng)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  manager = checkpointing.create_manager(workdir, max_to_keep=tc.keep_checkpoints)

  abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

  def restore_args(_):
    return ocp.args.Composite(**{
        checkpointing.STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        checkpointing.DATA_ITEM: input_pipeline.train_restore_args(train_iter),
    })

  found = checkpointing.restore_latest(manager, restore_args)
  if jax.process_count() > 1:
    steps = jax.experimental.multihost_utils.process_allgather(np.asarray(-1 if found is None else found[0]))
    if len(set(np.asarray(steps).tolist())) != 1:
      raise RuntimeError(
          f"The processes found different checkpoints to resume from (steps by process: {steps.tolist()}, -1: "
          f"none) in {checkpointing.checkpoint_dir(workdir)}. The workdir must be storage that every process sees "
          "the same (a bucket or a shared file system).")
  if found is not None:
    start_step, restored = found
    state = restored[checkpointing.STATE_ITEM]
    logging.info("Resumed from the checkpoint of step %d in %s.", start_step, workdir)
    # Unreadable newer checkpoints go aside, so these steps can be written again.
    checkpointing.set_aside(manager, [s for s in manager.all_steps() if s > start_step])
  else:
    start_step = 0
    if tc.get("init_from"):
      _, params, src_step = checkpointing.load_params(tc.init_from, use_ema=False)
      _, ema, _ = checkpointing.load_params(tc.init_from, use_ema=True, step=src_step)
      state = init_state_sharded(config, model, mesh, init_rng, params=params, ema_params=ema)
      logging.info("Initialised from %s (step %d).", tc.init_from, src_step)
  assert int(state.step) == start_step, (int(state.step), start_step)

  step_fn = jit_train_step(mesh, diffusion, config.optim, state_sharding)
  writer = MetricWriter(workdir)
  last_saved = start_step if found is not None else None

  def save(step, state):
    nonlocal last_saved
    manager.save(step, args=ocp.args.Composite(**{
        checkpointing.STATE_ITEM: ocp.args.StandardSave(state),
        checkpointing.DATA_ITEM: input_pipeline.train_checkpoint_args(train_iter),
        checkpointing.INTEGRITY_ITEM: checkpointing.integrity_save_args(state),
    }), force=True)
    last_saved = step

  num_steps = tc.num_train_steps
  images_per_step = tc.batch_size
  metrics = None
  t_last, step_last = time.time(), start_step
  step = start_step
  with _Preemption() as preemption, _closing(manager, writer):
    while step < num_steps:
      batch = global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, step_rng)
      step += 1

      is_last = step == num_steps
      want_log = step % tc.log_every == 0 or is_last
      want_ckpt = step % tc.checkpoint_every == 0 or is_last
      stop = preemption.should_stop(step, sync=want_log or want_ckpt)
      if stop and not is_last:
        logging.warning("Stopping at step %d (%s): writing the checkpoint of step %d, then exiting.", step,
                        preemption.reason, step)
      if want_log or want_ckpt or stop:
        host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, host_metrics, last_saved, workdir)
      if want_log:
        now = time.time()
        steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        host_metrics.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * images_per_step)
        writer.scalars(step, host_metrics)
        if jax.process_index() == 0:
          logging.info(
              "step %d/%d | loss %.5f (q0..q3 %.4f %.4f %.4f %.4f) | grad_norm %.3f | lr %.2e | "
              "%.2f steps/s, %.1f img/s | ETA %s",
              step, num_steps, host_metrics["loss"], *(host_metrics[f"loss_q{i}"] for i in range(4)),
              host_metrics["grad_norm"], host_metrics["lr"], steps_per_sec, steps_per_sec * images_per_step,
              _format_eta((num_steps - step) / max(steps_per_sec, 1e-9)),
          )
      if want_ckpt or stop:
        save(step, state)
      if tc.sample_every and (step % tc.sample_every == 0 or is_last):
        _write_sample_grid(config, diffusion, model, state, mesh, sample_rng, step, workdir, writer)
      if stop and not is_last:
        break
  if step < num_steps:
    logging.warning("Stopped at step %d of %d; the checkpoint of step %d is complete in %s.", step, num_steps, step,
                    checkpointing.checkpoint_dir(workdir))
  return state


@contextlib.contextmanager
def _closing(manager, writer):
  """Finishes pending asynchronous checkpoint writes (also when training fails), then closes."""
  try:
    yield
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()


_GRID_SAMPLERS = {}


def _write_sample_grid(config, diffusion, model, state, mesh, rng, step, workdir, writer) -> None:
  """Samples a grid with the EMA parameters (fast sampler) and writes it as PNG and to TensorBoard."""
  tc = config.training
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  n = -(-tc.num_grid_samples // mesh.size) * mesh.size  # a multiple of the device count
  key = (id(diffusion), model, id(mesh), image_shape, tc.grid_sampler, tc.grid_num_steps)
  if key not in _GRID_SAMPLERS:  # one compilation per run, not one per grid
    _GRID_SAMPLERS[key] = samplers.make_sharded_sampler(
        diffusion, model.apply, mesh, image_shape, sampler=tc.grid_sampler,
        num_steps=min(tc.grid_num_steps, diffusion.num_timesteps), axis=DATA_AXIS)
  fn = _GRID_SAMPLERS[key]
  indices = jax.device_put(jnp.arange(n, dtype=jnp.int32), NamedSharding(mesh, P(DATA_AXIS)))
  samples = fn(state.ema_params, rng, indices)["samples"]
  samples = jax.experimental.multihost_utils.process_allgather(samples, tiled=True)
  if jax.process_index() == 0:
    scale = max(1, 64 // config.data.image_size)
    grid = images_lib.make_grid(images_lib.to_uint8(samples[: tc.num_grid_samples]), scale=scale)
    images_lib.save_image(grid, epath.Path(workdir) / "samples" / f"grid_step_{step:08d}.png", overwrite=True)
    writer.image(step, "samples", grid)
