"""The GPU and TPU programs, lowered (not run) on this CPU: the train step in bfloat16, the samplers, bits/dim.

`jax.jit(...).trace(...).lower(lowering_platforms=(p,))` builds the StableHLO
module the `cuda` or `tpu` backend would compile, so a lowering that only those
platforms reject (an attention kernel, a dtype, a sharding) fails here.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import train_step
from diffusion_jax.evaluation import bpd

PLATFORMS = ("cuda", "tpu")


def tiny_config(**model):
  from configs import tiny  # noqa: PLC0415

  config = tiny.get_config()
  config.model.update(model)
  return config


def _lowered_text(traced, platform):
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  assert "func.func public @main" in text
  return text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("clip_groups,num_classes", [(1, 0), (2, 10), (8, 0)])
def test_train_step_lowers_in_bfloat16(platform, clip_groups, num_classes):
  config = tiny_config(dtype="bfloat16", num_classes=num_classes)
  config.optim.clip_groups = clip_groups
  network, diffusion = runtime.build(config)
  mesh = runtime.make_mesh()
  state = jax.eval_shape(lambda: train_step.create_train_state(config, network, jax.random.PRNGKey(0)))
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)}
  if num_classes:
    batch["label"] = jax.ShapeDtypeStruct((8,), jnp.int32)
  sharding = jax.tree.map(lambda _: runtime.replicated(mesh), state)
  fn = train_step.jit_train_step(mesh, network, diffusion, config.optim, sharding, label_dropout=0.1)
  text = _lowered_text(fn.trace(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)), platform)
  assert "bf16" in text  # the network runs in bfloat16


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("sampler,guided", [("ancestral", False), ("dpmpp2m", True), ("heun", False)])
def test_samplers_lower(platform, sampler, guided):
  config = tiny_config(num_classes=10 if guided else 0)
  network, diffusion = runtime.build(config)
  mesh = runtime.make_mesh()
  fn = inference.make_sharded_sampler(
    diffusion,
    runtime.inference_fn(network),
    mesh,
    (8, 8, 1),
    samplers.resolve(sampler, num_timesteps=diffusion.num_timesteps, num_steps=4),
    guided=guided,
    null_label=network.null_label if guided else None,
  )
  params = jax.eval_shape(functools.partial(runtime.init_params, network, shape=(8, 8, 1)), jax.random.PRNGKey(0))
  n = runtime.data_size(mesh)
  args = [params, jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((n,), jnp.int32)]
  if guided:
    args += [jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)]
  _lowered_text(fn.trace(*args), platform)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bpd_loop_lowers(platform):
  config = tiny_config()
  network, diffusion = runtime.build(config)
  mesh = runtime.make_mesh()
  params = jax.eval_shape(functools.partial(runtime.init_params, network, shape=(8, 8, 1)), jax.random.PRNGKey(0))
  n = runtime.data_size(mesh)
  fn = bpd._bpd_sums_fn(network, mesh, True)  # pylint: disable=protected-access
  _lowered_text(
    fn.trace(
      params,
      diffusion,
      jax.ShapeDtypeStruct((n, 8, 8, 1), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.bool_),
      jax.ShapeDtypeStruct((2,), jnp.uint32),
    ),
    platform,
  )
