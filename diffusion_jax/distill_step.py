"""A distillation round's teacher and its jitted, data-parallel step (`distillation` holds the math).

A round is a training run (`train.train_and_evaluate`) whose config names a teacher (`config.distill.teacher`,
a workdir): the student's state is the usual `TrainState` (checkpointed, resumed, EMA'd like training), the
teacher's EMA parameters are placed on the mesh once, replicated, and every step runs the teacher's two DDIM
steps and the student's gradient in one program (`jit_distill_step`), its batch sharded over 'data'.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import distillation
from diffusion_jax import errors
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax import runtime
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.models import unet


def is_distillation(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a distillation round (it names a teacher)."""
  return bool(config.get("distill", {}).get("teacher", ""))


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The teacher of a round: its network and diffusion, its EMA parameters (host arrays), the step tables.

  Attributes:
    path: the teacher's workdir.
    step: the checkpoint step its parameters come from.
    network, diffusion: as `runtime.build` gives them for the teacher's config.
    params: the teacher's EMA parameters, host NumPy arrays.
    tables: `distillation.step_tables` of the round (int32 [student steps] t, t_mid, t_next).
  """

  path: str
  step: int
  network: unet.UNet
  diffusion: diffusion_lib.GaussianDiffusion
  params: Any
  tables: dict


def load_teacher(config: ml_collections.ConfigDict, student_params_shape=None) -> Teacher:
  """The teacher of the round `config` describes, checked against the student it trains.

  Args:
    config: the round's config (`config.distill`: teacher, teacher_steps, student_steps, parameterisation,
      weighting).
    student_params_shape: the student's parameters as shapes (a pytree of ShapeDtypeStruct), to check that the
      student can start from the teacher's parameters; None skips the check.
  """
  d = config.distill
  teacher_config, params, step = checkpointing.load_params(d.teacher, use_ema=True)
  network, diffusion = runtime.build(teacher_config)
  distillation.check_settings(d.parameterisation, d.weighting, teacher_config.diffusion.model_var_type)
  if network.num_classes:
    raise errors.UserError(
      f"The teacher {d.teacher} is class-conditional (model.num_classes={network.num_classes}); distillation "
      "takes unconditional models only."
    )
  _, student_diffusion = runtime.build(config)
  if not np.array_equal(np.asarray(diffusion.betas), np.asarray(student_diffusion.betas)):
    raise errors.UserError(
      f"The teacher {d.teacher} was trained with another noise schedule than this config's diffusion "
      f"({teacher_config.diffusion.beta_schedule}, T={diffusion.num_timesteps}); distil with the teacher's "
      "diffusion settings."
    )
  if student_params_shape is not None:
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if jax.tree.structure(params) != jax.tree.structure(student_params_shape) or shapes(params) != shapes(
      student_params_shape
    ):
      raise errors.UserError(
        f"The student's network (config.model) differs from the teacher's in {d.teacher}; a student starts "
        "from its teacher's parameters, so both need the teacher's model settings."
      )
  tables = distillation.step_tables(diffusion.num_timesteps, int(d.teacher_steps), int(d.student_steps))
  return Teacher(path=str(d.teacher), step=step, network=network, diffusion=diffusion, params=params, tables=tables)


def distill_step(
  state: train_step_lib.TrainState,
  teacher_params,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  network: unet.UNet,
  diffusion: diffusion_lib.GaussianDiffusion,
  teacher_network: unet.UNet,
  teacher_diffusion: diffusion_lib.GaussianDiffusion,
  tables: dict,
  optim_config,
  weighting: str,
  clip: bool,
) -> tuple[train_step_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step of the student on a global batch; pure, to be jitted with a donated state.

  Each example gets a student step j, uniform over the student's grid, drawn with its noise from
  `fold_in(rng, state.step)` (as the train step draws t and ε); the metrics are the train step's, with
  `loss` the weighted distillation loss.
  """
  apply, teacher_apply = runtime.model_fn(network), runtime.model_fn(teacher_network)
  x = batch["image"]
  b = x.shape[0]
  step_rng = jax.random.fold_in(rng, state.step)
  index_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  index = jax.random.randint(index_rng, (b,), 0, tables["t"].shape[0], dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x.shape, jnp.float32)

  def teacher_fn(x_t, t):
    return teacher_apply(teacher_params, x_t, t)

  def loss_fn(params):
    def student_fn(x_t, t):
      return apply(params, x_t, t, train=True, rng=dropout_rng)

    losses, t = distillation.losses(
      student_fn, diffusion, teacher_fn, teacher_diffusion, x, index, noise, tables, weighting=weighting, clip=clip
    )
    return jnp.mean(losses), (losses, t)

  (_, (losses, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads, grad_norm = optimizer_lib.clip_by_global_norm(grads, optim_config.grad_clip)
  new_state = train_step_lib.apply_update(state, grads, optim_config)
  return new_state, train_step_lib.step_metrics(state, losses, t, grad_norm, diffusion, optim_config)


def jit_distill_step(
  mesh: Mesh, network: unet.UNet, diffusion, teacher: Teacher, config: ml_collections.ConfigDict, state_sharding
) -> Callable:
  """The round's step for `mesh` as `fn(state, batch, rng)`: the teacher's parameters go to the mesh once here.

  The jitted program takes (state [donated, replicated], teacher parameters [replicated], batch [sharded on
  'data'], rng); the returned function passes the teacher's device arrays, placed here, to every call.
  """
  replicated = runtime.replicated(mesh)
  teacher_params = jax.device_put(teacher.params, replicated)
  tables = {k: np.asarray(v) for k, v in teacher.tables.items()}
  step = jax.jit(
    functools.partial(
      distill_step,
      network=network,
      diffusion=diffusion,
      teacher_network=teacher.network,
      teacher_diffusion=teacher.diffusion,
      tables=tables,
      optim_config=config.optim,
      weighting=str(config.distill.weighting),
      clip=bool(config.distill.clip_denoised),
    ),
    in_shardings=(state_sharding, replicated, runtime.batch_sharding(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )

  def fn(state, batch, rng):
    return step(state, teacher_params, batch, rng)

  return fn
