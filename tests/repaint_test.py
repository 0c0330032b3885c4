"""RePaint's resampling (samplers.repaint): its time sequence, the mask invariant, and no resampling = inpaint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import repaint

T = 10
SHAPE = (3, 4, 4, 2)
DIFFUSION = GaussianDiffusion.create(np.linspace(1e-3, 0.2, T))
RNG = jax.random.PRNGKey(0)
INDICES = jnp.arange(SHAPE[0], dtype=jnp.int32)


def _apply(params, x, t):
  """A cheap deterministic 'network' (a t-dependent squashing of x)."""
  scale = (params["a"] + params["b"] * t.astype(jnp.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.9 * jnp.tanh(scale * x + 0.3)


MODEL_FN = jax.tree_util.Partial(_apply, {"a": jnp.float32(0.5), "b": jnp.float32(0.1)})
X0 = jax.random.uniform(jax.random.PRNGKey(1), SHAPE, minval=-1.0, maxval=1.0)
MASK = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, SHAPE[:3]))


def test_the_time_sequence_is_repaints():
  # RePaint's get_schedule_jump(t_T=6, jump_length=2, jump_n_sample=2) visits times
  # 6 5 4 3 2 3 4 3 2 1 0 1 2 1 0 (1-based, written out by hand from its algorithm): a reverse step leaves time s
  # at 0-based timestep s − 1; a forward step from time s goes to state s (0-based s − 1 → s).
  ts, up, calls = repaint.schedule(6, 2, 2)
  times = [6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0]
  want_t = [a - 1 for a in times[:-1]]  # a reverse step from a, and a forward step from a to a + 1: both at a − 1
  want_up = [b > a for a, b in zip(times[:-1], times[1:])]
  assert ts.tolist() == want_t and up.tolist() == want_up
  assert calls == 10 == int(np.sum(~up))  # 6 steps and 2 redone stretches of 2
  assert repaint.schedule(6, 2, 1)[2] == 6  # no resampling: T calls
  with pytest.raises(ValueError, match="jump_length=10 must be below the chain.s 10 steps"):
    repaint.schedule(10, 10, 2)
  with pytest.raises(ValueError, match="jump_n_sample must be an integer >= 1"):
    repaint.schedule(10, 2, 0)


def test_known_pixels_are_kept_and_the_rest_is_sampled():
  out = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=3, jump_n_sample=3)
  samples = np.asarray(out["samples"])
  known = np.broadcast_to(MASK[..., None], SHAPE)
  np.testing.assert_array_equal(samples[known], np.asarray(X0)[known])
  assert not np.allclose(samples[~known], np.asarray(X0)[~known])
  assert out["network_calls"] == repaint.schedule(T, 3, 3)[2] > T
  assert np.all(np.isfinite(samples))


def test_without_resampling_it_is_ancestral_inpainting():
  out = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=3, jump_n_sample=1)
  spec = samplers.resolve("ancestral", num_timesteps=T)
  want = samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, sampler=spec)["samples"]
  np.testing.assert_allclose(out["samples"], want, rtol=1e-6, atol=1e-6)
  assert out["network_calls"] == T


def test_resampling_changes_the_result_and_depends_only_on_rng_and_index():
  base = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=3, jump_n_sample=1)["samples"]
  resampled = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=3, jump_n_sample=2)
  assert not np.allclose(resampled["samples"], base)
  # Example 2 alone, with its global index, is the same image.
  alone = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES[2:], X0[2:], MASK[2:], jump_length=3, jump_n_sample=2)
  np.testing.assert_allclose(alone["samples"], resampled["samples"][2:], rtol=1e-6, atol=1e-6)


def test_revisits_draw_fresh_noise_for_the_step_and_for_the_known_pixels():
  # A constant-zero network and an all-known mask: the output is x0, but the chain before the final paste must not
  # reuse one draw for two purposes. Check the keys directly: the step and the known-pixel streams of a revisit
  # differ from each other and from the first visit's.
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(RNG, INDICES)
  known = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, samplers.driver.KNOWN_STREAM)
  again = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  streams = [keys, known, again(keys, repaint.RESAMPLE_STREAM + 1), again(known, repaint.RESAMPLE_STREAM + 1)]
  draws = [np.asarray(samplers.driver.per_example_normal(k, 3, (4,))) for k in streams]
  for i in range(len(draws)):
    for j in range(i):
      assert not np.allclose(draws[i], draws[j]), (i, j)


def test_a_window_limits_the_jumps():
  # T=10, jumps of 2: stretches at positions 0, 2, 4, 6; each redone once more with jump_n_sample=2.
  assert repaint.schedule(10, 2, 2)[2] == 18
  assert repaint.schedule(10, 2, 2, allowed=lambda j: j < 4)[2] == 14
  out = repaint.repaint(
    DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=2, jump_n_sample=2, resample_range=(4, 10)
  )
  assert out["network_calls"] == 14  # the stretches at 4-5 and 6-7
  # A window no stretch fits in would resample nothing: an error that says so.
  with pytest.raises(ValueError, match=r"resample_range=\(0, 2\) holds no stretch of 3 chain steps"):
    repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=3, jump_n_sample=4, resample_range=(0, 2))
  for bad in ((5, 5), (-1, 4), (0, 11), (0.5, 3), "ab", (1, 2, 3)):
    with pytest.raises(ValueError, match="resample_range must be two integer timesteps"):
      repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, jump_length=2, resample_range=bad)


def test_on_a_respaced_chain_without_resampling_it_is_respaced_ancestral_inpainting():
  spec = samplers.resolve("ancestral", num_timesteps=T, num_steps=4)
  steps = samplers.ancestral.chain_timesteps(spec, None)
  assert steps.size == 4 and steps[-1] < T
  out = repaint.repaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, timesteps=steps, jump_length=2, jump_n_sample=1)
  want = samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, sampler=spec)["samples"]
  np.testing.assert_allclose(out["samples"], want, rtol=1e-6, atol=1e-6)
  assert out["network_calls"] == 4


def test_every_network_call_sees_the_known_pixels_at_the_forward_marginal_of_its_timestep():
  # Record every network input: the timesteps follow RePaint's sequence on the respaced chain, and the known
  # pixels are q_sample(x0, s, z) with z from the visit's stream (the first visit: the driver's KNOWN_STREAM key
  # at s + 1; a revisit: its RESAMPLE_STREAM + v stream).
  calls = []

  def record(x, t):
    calls.append((np.asarray(x), np.asarray(t)))

  def model_fn(x, t):
    jax.debug.callback(record, x, t, ordered=True)
    return MODEL_FN(x, t)

  steps = np.array([0, 2, 3, 5, 7, 9], np.int32)
  out = repaint.repaint(DIFFUSION, model_fn, RNG, INDICES, X0, MASK, timesteps=steps, jump_length=2, jump_n_sample=3)
  jax.effects_barrier()
  ts, up, n = repaint.schedule(steps.size, 2, 3)
  assert len(calls) == n == out["network_calls"]
  assert [int(t[0]) for _, t in calls] == steps[ts[~up]].tolist()
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(RNG, INDICES)
  known_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, samplers.driver.KNOWN_STREAM)
  visits = repaint._visits(ts, up)[~up]
  known = np.broadcast_to(MASK[..., None], SHAPE)
  assert visits.max() == 2
  for (x, t), v in zip(calls, visits):
    base = (
      known_keys
      if v == 0
      else jax.vmap(jax.random.fold_in, in_axes=(0, None))(known_keys, repaint.RESAMPLE_STREAM + int(v))
    )
    z = samplers.driver.per_example_normal(base, int(t[0]) + 1, SHAPE[1:])
    want = np.asarray(DIFFUSION.q_sample(X0, jnp.asarray(t), z))
    np.testing.assert_allclose(x[known], want[known], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["samples"])[known], np.asarray(X0)[known])


def test_the_forward_steps_of_a_respaced_chain_go_from_one_marginal_to_the_next():
  # The forward step the chain runs (repaint.forward_step) from position i to i + 1 on a respaced chain is
  # √(1 − β')·x + √β'·z with β' = 1 − ᾱ_{s_{i+1}}/ᾱ_{s_i} (ᾱ from the original betas, in float64 here): applied to
  # q(x_{s_i} | x0) it gives q(x_{s_{i+1}} | x0) exactly (mean √ᾱ_{s_{i+1}}·x0, variance 1 − ᾱ_{s_{i+1}}).
  steps = np.array([0, 2, 3, 5, 7, 9], np.int32)
  loop = samplers.respace(DIFFUSION, steps)
  abar = np.cumprod(1.0 - np.asarray(DIFFUSION.betas, np.float64))
  x, z = np.asarray(X0, np.float64), np.asarray(jax.random.normal(jax.random.PRNGKey(7), SHAPE), np.float64)
  for i in range(steps.size - 1):
    ratio = abar[steps[i + 1]] / abar[steps[i]]
    got = repaint.forward_step(loop, jnp.asarray(x, jnp.float32), i, jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, np.sqrt(ratio) * x + np.sqrt(1.0 - ratio) * z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ratio * (1 - abar[steps[i]]) + (1 - ratio), 1 - abar[steps[i + 1]], rtol=1e-12)
