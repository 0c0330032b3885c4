"""The train state and the one jitted, data-parallel training step.

The state (parameters, optimizer state, EMA) is replicated over the mesh and
donated to the step; the batch is a pytree (`image`, and `label` where the
data has one) sharded over the data axis. The step's randomness is
`fold_in(rng, state.step)`, so a run is a function of (config, seed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax import runtime
from diffusion_jax.conditioning import ClassLabels
from diffusion_jax.models import unet


class TrainState(train_state.TrainState):
  """Flax's TrainState plus an exponential moving average of the parameters."""

  ema_params: Any = None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Cross-field checks that must hold before anything is built; ValueError names the fix."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  bs = config.training.batch_size
  if bs % num_devices:
    raise errors.UserError(
      f"training.batch_size={bs} is not divisible by the {num_devices} devices; "
      f"use a multiple of {num_devices} "
      f"(e.g. --config.training.batch_size={max(1, bs // num_devices) * num_devices})."
    )
  groups = config.optim.clip_groups
  if groups < 1 or bs % groups:
    raise errors.UserError(
      f"optim.clip_groups={groups} must be a positive divisor of training.batch_size={bs} "
      "(set --config.optim.clip_groups=1 to clip the whole batch's gradient)."
    )
  tc = config.training
  if int(tc.log_every) < 1:
    raise errors.UserError(f"training.log_every must be at least 1 (steps between logged metrics), got {tc.log_every}.")
  for name, zero in (("checkpoint_every", "only at the end"), ("sample_every", "no grids")):
    if int(tc.get(name, 0) or 0) < 0:
      raise errors.UserError(f"training.{name} must be 0 ({zero}) or a positive number of steps, got {tc[name]}.")
  if config.optim.ema_decay < 0 or config.optim.ema_decay >= 1:
    raise errors.UserError(f"optim.ema_decay must lie in [0, 1), got {config.optim.ema_decay}.")
  init = config.model.get("init", "ddpm")
  if init not in unet.INIT_SCHEMES:
    raise errors.UserError(
      f"Unknown model.init {init!r}; valid choices are {', '.join(unet.INIT_SCHEMES)} "
      "(ddpm: the paper's initialisation; pytorch: PyTorch's layer defaults)."
    )
  runtime.build_network(config).check_input(jax.ShapeDtypeStruct((1,) + runtime.image_shape(config), jnp.float32))


def create_train_state(config, network: unet.UNet, rng, params=None, ema_params=None, tx=None) -> TrainState:
  if params is None:
    params = runtime.init_params(network, rng, runtime.image_shape(config), config.model.get("init", "ddpm"))
  ema_params = params if ema_params is None else ema_params
  tx = optimizer_lib.create_optimizer(config.optim) if tx is None else tx
  state = TrainState.create(apply_fn=network.apply, params=params, tx=tx, ema_params=ema_params)
  # A strongly typed int32 step, as a restored checkpoint has it: a fresh and a resumed run then compile the
  # same program, so a restart finds the fresh run's step in the persistent compilation cache.
  return state.replace(step=jnp.zeros((), jnp.int32))


def grouped_clipped_gradients(grad_fn, params, batch, rngs, max_norm: float):
  """The mean over G groups of the batch of each group's gradient clipped to global norm ≤ max_norm.

  Group g is rows [g·B/G, (g+1)·B/G) of every array of `batch` and uses
  `rngs[g]`. The groups run one after another (a fully unrolled `lax.scan`),
  each clipped gradient added to one accumulator as soon as it is computed, so
  no [G, ...] gradient tree is built and every convolution keeps its batched,
  ungrouped form.

  Args:
    grad_fn: `(params, *batch, rng) -> ((loss, per-example losses), grads)`.
    params: the parameters (not split).
    batch: a tuple of arrays with leading axis B.
    rngs: [G] keys, one per group.
    max_norm: the clip norm (≤ 0: no clipping).

  Returns:
    (mean of the clipped group gradients, per-example losses [B], mean of the
    group gradients' norms before clipping).
  """
  groups = rngs.shape[0]
  b = batch[0].shape[0]
  split = lambda a: a.reshape((groups, b // groups) + a.shape[1:])  # noqa: E731

  def body(acc, xs):
    *group, rng = xs
    (_, losses), grads = grad_fn(params, *group, rng)
    norm = optax.tree_utils.tree_norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-12)) if max_norm > 0 else 1.0
    return jax.tree.map(lambda a, g: a + scale * g, acc, grads), (losses, norm)

  zeros = jax.tree.map(jnp.zeros_like, params)
  # Unrolled: inside a while loop XLA:CPU leaves the weight-gradient convolutions in a
  # non-canonical layout, off its fast path (benchmarks/README.md, "Performance notes (CPU)").
  acc, (losses, norms) = jax.lax.scan(body, zeros, tuple(split(a) for a in batch) + (rngs,), unroll=True)
  return jax.tree.map(lambda a: a / groups, acc), losses.reshape(b), jnp.mean(norms)


_GROUP_AXIS, _MEMBER_AXIS = "clip_group", "clip_member"


def sharded_grouped_clipped_gradients(grad_fn, params, batch, rngs, max_norm: float, mesh: Mesh):
  """`grouped_clipped_gradients` with the groups laid on the devices of the data axis (per-core clipping).

  Group g is the same rows [g·B/G, (g+1)·B/G) of the global batch, with `rngs[g]`, so the result
  equals `grouped_clipped_gradients` up to float32 summation order. Each device computes the
  gradient of its own rows only, inside `jax.shard_map`:

  * G a multiple of the D devices: each device holds G/D whole groups, clips them one after
    another (`grouped_clipped_gradients` on its rows), and the D means are averaged (one all-reduce);
  * D a multiple of G: the k = D/G devices of a group average their gradients (an all-reduce
    within the group), every device clips its group's gradient, and the G groups are averaged.
    Each device draws dropout for its own rows from `rngs[g]`, so with dropout this is not the
    global form's draw (`train_step` uses it only for networks without dropout).

  Without this, the global form slices each group out of the sharded batch, so a group's
  rows live on few devices and the others wait (D = G: one device busy at a time).

  Args and returns as `grouped_clipped_gradients`; `mesh` has the one data axis the batch is
  sharded over, and D (its size) and G must divide one another.
  """
  groups = rngs.shape[0]
  d = runtime.data_size(mesh)
  if groups % d and d % groups:
    raise errors.UserError(f"{groups} clip groups cannot be laid on {d} devices: one must divide the other.")
  whole = groups >= d
  # Whole groups: the mesh itself. Split groups: the same devices as a (group, member) grid.
  grid = mesh if whole else runtime.grid_mesh(mesh, groups, (_GROUP_AXIS, _MEMBER_AXIS))
  axes = (runtime.DATA_AXIS,) if whole else (_GROUP_AXIS, _MEMBER_AXIS)
  spec = jax.sharding.PartitionSpec(axes)
  replicated = jax.sharding.PartitionSpec()

  def local(params, *xs):
    *arrays, rngs = xs
    if whole:
      acc, losses, norm = grouped_clipped_gradients(grad_fn, params, tuple(arrays), rngs, max_norm)
    else:  # one group over k devices: its gradient is the mean of theirs (equal row counts)
      (_, losses), grads = grad_fn(params, *arrays, rngs[0])
      acc, norm = optimizer_lib.clip_by_global_norm(jax.lax.pmean(grads, _MEMBER_AXIS), max_norm)
    # Every member of a group holds the same clipped gradient, so the mean over all devices is the mean over groups.
    return jax.lax.pmean(acc, axes), losses, jax.lax.pmean(norm, axes)

  rng_spec = spec if whole else jax.sharding.PartitionSpec(_GROUP_AXIS)
  fn = jax.shard_map(
    local,
    mesh=grid,
    in_specs=(replicated,) + (spec,) * len(batch) + (rng_spec,),
    out_specs=(replicated, spec, replicated),
    # Unchecked: a gradient with respect to the replicated parameters is then each device's own (with the
    # check, autodiff would sum it over the devices); the pmeans make the outputs replicated.
    check_vma=False,
  )
  return fn(params, *batch, rngs)


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  network: unet.UNet,
  diffusion: diffusion_lib.GaussianDiffusion,
  optim_config,
  label_dropout: float = 0.0,
  mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; pure, to be jitted with a donated state.

  The step's randomness is `fold_in(rng, state.step)`. With `clip_groups` G > 1
  the batch is split into G groups whose mean-loss gradients are clipped
  separately and then averaged (the paper's per-TPU-core clipping).

  Args:
    state: the replicated train state.
    batch: {"image": [B, H, W, C] float32 in [-1, 1]} and, for a class-
      conditional network, "label": [B] int32; sharded over 'data'.
    rng: the run's base key.
    network: the U-Net (static).
    diffusion: the diffusion (static tables).
    optim_config: config.optim.
    label_dropout: conditional networks: the probability that an example is
      trained on the null class (classifier-free guidance), drawn per example
      from `fold_in(step key, 3)`.
    mesh: the mesh the batch is sharded over; with clip groups and a data axis
      of more than one device whose size and G divide one another, each device
      clips the groups of its own rows (`sharded_grouped_clipped_gradients`).

  Returns:
    (new state, metrics) with scalar metrics: loss, loss_q0..loss_q3 (mean loss
    by quarter of the timestep range), grad_norm (before clipping), lr.
  """
  apply = runtime.model_fn(network)
  x = batch["image"]
  b = x.shape[0]
  step_rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  t = jax.random.randint(t_rng, (b,), 0, diffusion.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x.shape, jnp.float32)
  cond = batch.get("label") if network.num_classes else None
  if cond is not None:
    cond = ClassLabels(cond, network.null_label).drop(jax.random.fold_in(step_rng, 3), label_dropout).value

  def loss_fn(params, x, t, noise, dropout_rng, cond=None):
    def model_fn(x_t, t_):
      return apply(params, x_t, t_, cond=cond, train=True, rng=dropout_rng)

    losses = diffusion.training_losses(model_fn, x, t, noise)
    return jnp.mean(losses), losses

  groups = optim_config.clip_groups
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if groups == 1:
    (_, losses), grads = grad_fn(state.params, x, t, noise, dropout_rng, cond)
    grads, grad_norm = optimizer_lib.clip_by_global_norm(grads, optim_config.grad_clip)
  else:
    # (params, x, t, noise[, cond], rng): the batch arrays first, the group's dropout key last.
    def group_grad_fn(params, x, t, noise, *rest):
      *labels, rng = rest
      return grad_fn(params, x, t, noise, rng, *labels)

    arrays = (x, t, noise) + (() if cond is None else (cond,))
    rngs = jax.random.split(dropout_rng, groups)
    d = 1 if mesh is None else runtime.data_size(mesh)
    # A group split over k devices draws its dropout masks per device, not as one [B/G, ...] draw: only
    # without dropout does that give the same step on every device count.
    if d > 1 and (groups % d == 0 or (d % groups == 0 and not network.dropout)):
      grads, losses, grad_norm = sharded_grouped_clipped_gradients(
        group_grad_fn, state.params, arrays, rngs, optim_config.grad_clip, mesh
      )
    else:
      grads, losses, grad_norm = grouped_clipped_gradients(
        group_grad_fn, state.params, arrays, rngs, optim_config.grad_clip
      )

  return apply_update(state, grads, optim_config), step_metrics(state, losses, t, grad_norm, diffusion, optim_config)


def apply_update(state: TrainState, grads, optim_config) -> TrainState:
  """The optimizer step on `grads` and the EMA update of the new parameters."""
  new_state = state.apply_gradients(grads=grads)
  # tf.train.ExponentialMovingAverage as used by the paper: decay ~0 before the first step.
  decay = jnp.where(state.step < 1, 1e-10, optim_config.ema_decay)
  if optim_config.get("ema_warmup", False):
    # The warm-up of diffusers' EMAModel (and tf.train.ExponentialMovingAverage's num_updates):
    # decay_n = min(ema_decay, (1 + n) / (10 + n)), so early averages are not dominated by the initialisation.
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_state.params)
  return new_state.replace(ema_params=ema)


def step_metrics(state: TrainState, losses, t, grad_norm, diffusion, optim_config) -> dict[str, jax.Array]:
  """loss, loss_q0..loss_q3 (mean loss by quarter of the timestep range), grad_norm, lr."""
  quarter = jnp.minimum(t * 4 // diffusion.num_timesteps, 3)
  onehot = jax.nn.one_hot(quarter, 4, dtype=jnp.float32)
  per_quarter = jnp.sum(onehot * losses[:, None], axis=0) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
  return dict(
    loss=jnp.mean(losses),
    grad_norm=grad_norm,
    lr=optimizer_lib.learning_rate_schedule(optim_config)(state.step),
    **{f"loss_q{i}": per_quarter[i] for i in range(4)},
  )


def jit_train_step(
  mesh: Mesh, network: unet.UNet, diffusion, optim_config, state_sharding, *, label_dropout: float = 0.0
) -> Callable:
  """train_step jitted for `mesh`: replicated state (donated), batch pytree sharded on 'data'."""
  return jax.jit(
    functools.partial(
      train_step,
      network=network,
      diffusion=diffusion,
      optim_config=optim_config,
      label_dropout=label_dropout,
      mesh=mesh,
    ),
    in_shardings=(state_sharding, runtime.batch_sharding(mesh), runtime.replicated(mesh)),
    out_shardings=(state_sharding, runtime.replicated(mesh)),
    donate_argnums=(0,),
  )


def init_state_sharded(config, network: unet.UNet, mesh: Mesh, rng, params=None, ema_params=None) -> TrainState:
  """Creates the train state directly in its (replicated) sharding, through shapes first."""
  replicated = runtime.replicated(mesh)
  # One optimizer object: the state's tree structure (and so its sharding tree) includes it.
  create = functools.partial(create_train_state, config, network, tx=optimizer_lib.create_optimizer(config.optim))
  abstract = jax.eval_shape(create, rng)
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  if params is None:
    return jax.jit(create, out_shardings=state_sharding)(rng)
  params = jax.device_put(params, replicated)
  ema_params = params if ema_params is None else jax.device_put(ema_params, replicated)
  init = jax.jit(lambda r, p, e: create(r, params=p, ema_params=e), out_shardings=state_sharding)
  return init(rng, params, ema_params)
