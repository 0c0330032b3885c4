"""The JAX programs the benchmarks time, built as the package runs them and compiled ahead of time.

Each function returns a `harness.Contender` whose `run(n)` does n units of
work and waits for the devices; compile time goes in `info['compile_s']`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import train_step as train_step_lib


def model_and_params(config, dtype: str):
  """(diffusion, model, random float32 params) of the config with activation dtype `dtype`."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.model.dtype = dtype
  model, diffusion = runtime.build(config)
  image_shape = runtime.image_shape(config)
  params = jax.jit(runtime.init_params, static_argnums=(0, 2))(model, jax.random.PRNGKey(0), image_shape)
  return diffusion, model, params, image_shape


def forward_flops(model, params, batch_size: int, image_shape) -> float | None:
  """FLOPs of one network call at this batch (XLA's cost analysis; loops hide their trip count, calls do not)."""
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  fn = jax.jit(runtime.model_fn(model))
  return harness.compiled_flops(fn.lower(params, x, t).compile())


def train_step(config, clip_groups: int, batch_size: int, dtype: str, peak: float | None) -> harness.Contender:
  """The training loop's `jit_train_step`, compiled ahead of time; `run(n)` does n steps on its own output state.

  The donated state must be consumed (`info['donated_state']`), and the step loop runs under
  `jax.transfer_guard("disallow")`, so any implicit host transfer in it raises.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  config.training.batch_size = batch_size
  config.optim.clip_groups = clip_groups
  config.model.dtype = dtype
  train_step_lib.validate_config(config)
  model, diffusion = runtime.build(config)
  mesh = runtime.make_mesh(config)
  state = train_step_lib.init_state_sharded(config, model, mesh, jax.random.PRNGKey(0))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  step_fn = train_step_lib.jit_train_step(mesh, model, diffusion, config.optim, state_sharding)
  shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  batch = runtime.global_array({"image": images}, mesh)
  rng = runtime.put_replicated(jax.random.PRNGKey(1), mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  flops = harness.compiled_flops(compiled)

  # The donated state must be consumed: its buffers are deleted after the call.
  old = jax.tree.leaves(state.params)[0]
  box = {"state": compiled(state, batch, rng)[0]}
  jax.block_until_ready(box["state"])
  donated = old.is_deleted()

  def run(n):
    # No host transfer may happen inside the step loop: the guard raises on any implicit one.
    with jax.transfer_guard("disallow"):
      state = box["state"]
      for _ in range(n):
        state, _ = compiled(state, batch, rng)
      box["state"] = jax.block_until_ready(state)

  info = {
    "compile_s": compile_s,
    "clip_groups": clip_groups,
    "dtype": dtype,
    "donated_state": donated,
    "flops_per_step_per_device": flops,
    "peak_flops_per_device": peak,
  }
  name = f"jax (clip_groups={clip_groups})"
  return harness.Contender(
    name, run, batch_size, flops * jax.device_count() if flops else None, info, hlo_text=compiled.as_text
  )


def sampler(name, diffusion, model, params, image_shape, batch_size, sampler_name, num_steps, flops_per_call):
  """`inference.make_sharded_sampler` compiled ahead of time; `run(n)` draws n batches of num_steps steps."""
  mesh = runtime.make_mesh()
  spec = samplers.resolve(sampler_name, num_timesteps=diffusion.num_timesteps, num_steps=num_steps)
  fn = inference.make_sharded_sampler(diffusion, runtime.inference_fn(model), mesh, image_shape, spec)
  params = runtime.put_replicated(params, mesh)
  indices = jax.device_put(jnp.arange(batch_size, dtype=jnp.int32), runtime.batch_sharding(mesh))
  rng = runtime.put_replicated(jax.random.PRNGKey(1), mesh)
  t0 = time.perf_counter()
  compiled = fn.lower(params, rng, indices).compile()
  compile_s = time.perf_counter() - t0

  def run(n):
    for _ in range(n):
      out = compiled(params, rng, indices)
    jax.block_until_ready(out)

  info = {"compile_s": compile_s, "sampler": sampler_name, "num_steps": num_steps}
  return harness.Contender(
    name,
    run,
    batch_size * num_steps,
    flops_per_call * num_steps if flops_per_call else None,
    info,
    hlo_text=compiled.as_text,
  )


def bpd_loop(model, params, diffusion, image_shape, batch_size: int) -> harness.Contender:
  """`calc_bpd_loop` jitted as `evaluation.bpd` runs it (batch sharded, parameters replicated); `run(n)`: n batches."""
  mesh = runtime.make_mesh()
  replicated = runtime.replicated(mesh)
  sharded = runtime.batch_sharding(mesh)
  apply = runtime.model_fn(model)

  def fn(params, diffusion, images, rng):
    return jnp.mean(diffusion.calc_bpd_loop(runtime.bind(apply, params), images, rng, clip_denoised=True)["total_bpd"])

  jitted = jax.jit(fn, in_shardings=(replicated, replicated, sharded, replicated), out_shardings=replicated)
  images = np.random.default_rng(0).uniform(-1, 1, (batch_size,) + image_shape).astype(np.float32)
  images = jax.device_put(images, sharded)
  params = jax.device_put(params, replicated)
  diffusion = jax.device_put(diffusion, replicated)
  rng = jax.device_put(jax.random.PRNGKey(1), replicated)
  t0 = time.perf_counter()
  compiled = jitted.lower(params, diffusion, images, rng).compile()
  compile_s = time.perf_counter() - t0

  def run(n):
    for _ in range(n):
      out = compiled(params, diffusion, images, rng)
    jax.block_until_ready(out)

  num_terms = diffusion.num_timesteps
  return harness.Contender(
    f"jax calc_bpd_loop ({num_terms} terms)",
    run,
    batch_size * num_terms,
    None,
    {"compile_s": compile_s, "num_terms": num_terms},
  )
