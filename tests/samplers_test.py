"""Tests of the reverse-process samplers against step-by-step Python loops of GaussianDiffusion."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_matches_stored
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import samplers
from diffusion_jax.diffusion import GaussianDiffusion

T = 10
SHAPE = (4, 4, 4, 2)  # [B, H, W, C]
BETAS = np.linspace(1e-3, 0.2, T)


def spec(name="ancestral", **settings):
  """The resolved sampler of the tests' diffusion (T steps)."""
  return samplers.resolve(name, num_timesteps=T, **settings)


def make_diffusion(mean_type="eps", var_type="fixedlarge", betas=BETAS):
  loss = "hybrid" if var_type.startswith("learned") else "mse"
  return GaussianDiffusion.create(betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss)


def _apply(params, x, t):
  """A cheap deterministic 'network': a t-dependent squashing of x."""
  scale = (params["a"] + params["b"] * t.astype(jnp.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.9 * jnp.tanh(scale * x + 0.3)


PARAMS = {"a": jnp.float32(0.5), "b": jnp.float32(0.1)}
model_fn = jax.tree_util.Partial(_apply, PARAMS)


def learned_model_fn(x, t):
  out = model_fn(x, t)
  return jnp.concatenate([out, 0.5 * jnp.tanh(out)], axis=-1)


def example_keys(rng, indices):
  return [jax.random.fold_in(rng, int(i)) for i in indices]


def noise(keys, step, shape):
  return jnp.stack([jax.random.normal(jax.random.fold_in(k, step), shape, jnp.float32) for k in keys])


def python_ancestral(diffusion, fn, rng, indices, shape, *, timesteps=None, clip_denoised=True, x_t=None):
  """The reference p_sample_loop, one Python step at a time, on `timesteps` (all by default)."""
  keys = example_keys(rng, indices)
  timesteps = np.arange(diffusion.num_timesteps) if timesteps is None else np.asarray(timesteps)
  x = noise(keys, 0, shape[1:]) if x_t is None else x_t
  preds = {}
  for i in reversed(range(len(timesteps))):
    t_orig = int(timesteps[i])
    out = fn(x, jnp.full((shape[0],), t_orig, jnp.int32))
    step = diffusion.p_sample(
      out, x, jnp.full((shape[0],), i, jnp.int32), noise(keys, t_orig + 1, shape[1:]), clip_denoised=clip_denoised
    )
    preds[t_orig] = (x, step["pred_xstart"])
    x = step["sample"]
  return x, preds


def float64_respaced_betas(betas32, timesteps):
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas32, np.float64))
  prev = np.append(1.0, alphas_cumprod[timesteps[:-1]])
  return 1.0 - alphas_cumprod[timesteps] / prev


INDICES = jnp.arange(SHAPE[0], dtype=jnp.int32)
RNG = jax.random.PRNGKey(0)


def test_space_timesteps():
  np.testing.assert_array_equal(samplers.space_timesteps(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(samplers.space_timesteps(1000, 1000), np.arange(1000))
  np.testing.assert_array_equal(samplers.space_timesteps(10, 1), [9])
  np.testing.assert_array_equal(samplers.space_timesteps(1000, 50)[:3], [0, 20, 41])
  for n in range(2, 101):
    s = samplers.space_timesteps(100, n)
    assert s.dtype == np.int32 and s.shape == (n,) and s[0] == 0 and s[-1] == 99
    assert np.all(np.diff(s) > 0)
  for bad in (0, 11, 2.5, None):
    with pytest.raises(ValueError, match="num_steps"):
      samplers.space_timesteps(10, bad)


def test_respace_tables():
  diffusion = make_diffusion()
  assert samplers.respace(diffusion, np.arange(T)) is diffusion
  steps = samplers.space_timesteps(T, 4)
  rd = samplers.respace(diffusion, steps)
  np.testing.assert_allclose(rd.betas, float64_respaced_betas(diffusion.betas, steps), rtol=1e-6)
  np.testing.assert_allclose(rd.alphas_cumprod, np.asarray(diffusion.alphas_cumprod)[steps], rtol=1e-6)
  assert (rd.model_mean_type, rd.model_var_type) == (diffusion.model_mean_type, diffusion.model_var_type)
  # The float64 recomputation on all steps gives back the betas.
  np.testing.assert_allclose(float64_respaced_betas(diffusion.betas, np.arange(T)), diffusion.betas, rtol=1e-6)
  with pytest.raises(ValueError, match="strictly increasing"):
    samplers.respace(diffusion, [3, 3, 5])


# Each distinct configuration compiles a loop (~2 s here): the tests share configurations where they can.
@pytest.mark.parametrize("mean_type,var_type,clip", [("eps", "fixedlarge", True), ("eps", "fixedsmall", False)])
def test_ancestral_equals_python_loop(mean_type, var_type, clip):
  diffusion = make_diffusion(mean_type, var_type)
  got = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, clip_denoised=clip)["samples"]
  want, _ = python_ancestral(diffusion, model_fn, RNG, INDICES, SHAPE, clip_denoised=clip)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if clip and mean_type == "eps":
    assert np.all(np.abs(np.asarray(got)) <= 1.0)
  # All T steps of the respaced sampler are the full sampler.
  full = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, sampler=spec(num_steps=T), clip_denoised=clip)
  np.testing.assert_array_equal(full["samples"], got)
  # A bare name takes the sampler's defaults: all T steps.
  full = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, sampler="ancestral", clip_denoised=clip)["samples"]
  np.testing.assert_array_equal(full, got)


def test_respaced_ancestral_equals_python_loop():
  diffusion = make_diffusion("eps", "fixedsmall")
  steps = samplers.space_timesteps(T, 4)
  got = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, sampler=spec(num_steps=4), clip_denoised=False)
  got = got["samples"]
  rd = GaussianDiffusion.create(float64_respaced_betas(diffusion.betas, steps), model_var_type="fixedsmall")
  want, _ = python_ancestral(rd, model_fn, RNG, INDICES, SHAPE, timesteps=steps, clip_denoised=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_respaced_xprev_matches_eps():
  """An xprev model built from an eps model samples the same images on a subset (no clipping)."""
  eps_diffusion = make_diffusion("eps", "fixedsmall")
  xprev_diffusion = make_diffusion("xprev", "fixedsmall")

  def xprev_fn(x, t):
    x0 = eps_diffusion.predict_xstart_from_eps(x, t, model_fn(x, t))
    return eps_diffusion.q_posterior_mean_variance(x0, x, t)[0]

  kw = dict(sampler=spec(num_steps=4), clip_denoised=False)
  want = samplers.sample(eps_diffusion, model_fn, RNG, INDICES, SHAPE, **kw)["samples"]
  got = samplers.sample(xprev_diffusion, xprev_fn, RNG, INDICES, SHAPE, **kw)["samples"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [None, 4])
def test_ddim_eta1_equals_fixedsmall_ancestral(num_steps):
  diffusion = make_diffusion("eps", "fixedsmall")
  kw = dict(clip_denoised=False)
  ddim_spec = spec("ddim", num_steps=num_steps, eta=1.0)
  ddim = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, sampler=ddim_spec, **kw)["samples"]
  ancestral = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, sampler=spec(num_steps=num_steps), **kw)
  ancestral = ancestral["samples"]
  np.testing.assert_allclose(ddim, ancestral, rtol=1e-4, atol=1e-5)


def test_ddim_equals_python_formula():
  diffusion = make_diffusion("v", "learned_range")
  eta, steps = 0.5, samplers.space_timesteps(T, 4)
  got = samplers.sample(diffusion, learned_model_fn, RNG, INDICES, SHAPE, sampler=spec("ddim", num_steps=4, eta=eta))
  keys = example_keys(RNG, INDICES)
  x = noise(keys, 0, SHAPE[1:])
  ac = np.asarray(diffusion.alphas_cumprod, np.float64)
  for i in reversed(range(len(steps))):
    t = jnp.full((SHAPE[0],), steps[i], jnp.int32)
    x0 = diffusion.p_mean_variance(learned_model_fn(x, t), x, t)["pred_xstart"]
    eps = (x - np.sqrt(ac[steps[i]]) * x0) / np.sqrt(1 - ac[steps[i]])
    a, a_prev = ac[steps[i]], (ac[steps[i - 1]] if i > 0 else 1.0)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise(keys, steps[i] + 1, SHAPE[1:])
  np.testing.assert_allclose(got["samples"], x, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_is_deterministic():
  diffusion = make_diffusion()
  x_T = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
  # The configuration of the ddim interpolation test below: starts at t = 5, steps 5, 3, 0.
  run = functools.partial(
    samplers.denoise,
    diffusion,
    model_fn,
    indices=jnp.zeros(SHAPE[0], jnp.int32),
    x_t=x_T,
    t=5,
    sampler=spec("ddim", num_steps=4),
  )
  a = run(jax.random.PRNGKey(1), eta=0.0)["samples"]
  b = run(jax.random.PRNGKey(2), eta=0.0)["samples"]
  c = run(jax.random.PRNGKey(2), eta=1.0)["samples"]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(b, c)


def test_same_images_whatever_the_batch_size():
  diffusion = make_diffusion()
  shape8 = (8,) + SHAPE[1:]
  for kw in (dict(sampler=spec("ddim", num_steps=4, eta=0.7)),):
    whole = samplers.sample(diffusion, model_fn, RNG, jnp.arange(8), shape8, **kw)["samples"]
    halves = [samplers.sample(diffusion, model_fn, RNG, jnp.arange(4) + 4 * h, SHAPE, **kw)["samples"] for h in (0, 1)]
    np.testing.assert_allclose(whole, np.concatenate(halves), rtol=1e-6, atol=1e-6)


def test_same_images_on_one_or_four_devices(n_devices):
  diffusion = make_diffusion()
  shape8 = (8,) + SHAPE[1:]
  results, ddim = [], spec("ddim", num_steps=4)
  for devices in (jax.devices()[:1], jax.devices()[:n_devices]):
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    indices = jax.device_put(jnp.arange(8, dtype=jnp.int32), sharding)
    fn = jax.jit(
      lambda rng, idx: samplers.sample(diffusion, model_fn, rng, idx, shape8, sampler=ddim, eta=1.0),
      out_shardings=sharding,
    )
    out = fn(RNG, indices)["samples"]
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    results.append(np.asarray(out))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_progressive():
  diffusion = make_diffusion()
  every = 3  # 10 steps: slots at chain steps 9, 6, 3, 0 = timesteps 9, 6, 3, 0.
  out = samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, progressive_every=every)
  assert out["pred_xstart"].shape == out["trajectory"].shape == (SHAPE[0], 4) + SHAPE[1:]
  np.testing.assert_allclose(out["pred_xstart"][:, -1], out["samples"], atol=1e-6)
  _, preds = python_ancestral(diffusion, model_fn, RNG, INDICES, SHAPE)
  for slot, t in enumerate((9, 6, 3, 0)):
    np.testing.assert_allclose(out["trajectory"][:, slot], preds[t][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pred_xstart"][:, slot], preds[t][1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["trajectory"][:, 0], noise(example_keys(RNG, INDICES), 0, SHAPE[1:]))


@pytest.mark.parametrize(
  "same_noise,sampler,num_steps", [(False, "ancestral", None), (True, "ancestral", 4), (False, "ddim", 4)]
)
def test_interpolation(same_noise, sampler, num_steps):
  diffusion = make_diffusion()
  x1 = jnp.linspace(-1, 1, 32).reshape(SHAPE[1:])
  x2 = -jnp.flip(x1)
  lambdas = jnp.array([0.0, 0.3, 0.6, 1.0])
  t = 5
  kw = dict(t=t, sampler=spec(sampler, num_steps=num_steps))
  rows = samplers.interpolate(diffusion, model_fn, RNG, x1, x2, lambdas, same_noise=same_noise, **kw)
  assert rows.shape == (4,) + SHAPE[1:]
  # The documented noise: q_rng diffuses the endpoints, d_rng denoises every row with index 0.
  q_rng, d_rng = jax.random.split(RNG)
  z = jax.random.normal(q_rng, (2,) + x1.shape)
  eps1, eps2 = z[0], (z[0] if same_noise else z[1])
  t_vec = jnp.full((1,), t, jnp.int32)
  x_t1, x_t2 = diffusion.q_sample(x1[None], t_vec, eps1[None]), diffusion.q_sample(x2[None], t_vec, eps2[None])
  lam = lambdas.reshape(-1, 1, 1, 1)
  x_t = (1 - lam) * x_t1 + lam * x_t2
  np.testing.assert_array_equal(x_t[0], x_t1[0])
  np.testing.assert_array_equal(x_t[-1], x_t2[0])
  # Rows 0 and -1 are the reconstructions of x1 and x2.
  want = samplers.denoise(diffusion, model_fn, d_rng, jnp.zeros(4, jnp.int32), x_t, **kw)["samples"]
  np.testing.assert_allclose(rows, want, rtol=1e-6, atol=1e-6)
  if sampler == "ancestral" and num_steps is None:
    recon, _ = python_ancestral(diffusion, model_fn, d_rng, [0], (1,) + SHAPE[1:], timesteps=np.arange(t + 1), x_t=x_t1)
    np.testing.assert_allclose(rows[0], recon[0], rtol=1e-5, atol=1e-5)


def test_no_recompilation_for_new_values():
  diffusion = make_diffusion()
  kw = dict(sampler=spec("ddim", num_steps=4, eta=0.3))
  samplers.sample(diffusion, model_fn, RNG, INDICES, SHAPE, **kw)
  size = samplers.driver._run._cache_size()
  new_model = jax.tree_util.Partial(_apply, {"a": jnp.float32(0.7), "b": jnp.float32(0.2)})
  samplers.sample(diffusion, new_model, jax.random.PRNGKey(3), INDICES + 4, SHAPE, **(kw | dict(eta=0.9)))
  samplers.sample(make_diffusion(betas=BETAS * 0.5), model_fn, RNG, INDICES, SHAPE, **kw)
  assert samplers.driver._run._cache_size() == size


def test_validation():
  diffusion = make_diffusion()
  call = functools.partial(samplers.sample, diffusion, model_fn, RNG, INDICES, SHAPE)
  with pytest.raises(ValueError, match="Unknown sampler"):
    call(sampler="unknown")
  with pytest.raises(ValueError, match="num_steps"):
    spec(num_steps=0)
  with pytest.raises(ValueError, match="num_steps"):
    spec(num_steps=T + 1)
  with pytest.raises(ValueError, match="eta"):
    call(sampler="ddim", eta=-0.1)
  with pytest.raises(ValueError, match="eta=0.5 applies only to samplers with an eta"):
    call(eta=0.5)
  with pytest.raises(ValueError, match="resolved for T=20, but the diffusion has T=10"):
    call(sampler=samplers.resolve("ddim", num_timesteps=2 * T))
  with pytest.raises(ValueError, match="indices"):
    samplers.sample(diffusion, model_fn, RNG, jnp.arange(3), SHAPE)
  with pytest.raises(ValueError, match="progressive_every"):
    call(progressive_every=-1)
  x = jnp.zeros(SHAPE[1:])
  interp = functools.partial(samplers.interpolate, diffusion, model_fn, RNG, x, x)
  with pytest.raises(ValueError, match="lambdas"):
    interp(jnp.array([0.0, 1.5]), t=3)
  with pytest.raises(ValueError, match="lambdas"):
    interp(jnp.zeros((2, 2)), t=3)
  for bad_t in (-1, T, 2.0):
    with pytest.raises(ValueError, match="t must be"):
      interp(jnp.array([0.5]), t=bad_t)
  with pytest.raises(ValueError, match="same shape"):
    samplers.interpolate(diffusion, model_fn, RNG, x, jnp.zeros((2, 2, 2)), jnp.array([0.5]), t=3)


# ----------------------------------------------------------------------------
# Stored outputs: the samplers must reproduce what they produced before (tests/data/): bit for bit on the jax and
# jaxlib that wrote them, within conftest.STORED_OUTPUT_TOLERANCE on other releases.
# ----------------------------------------------------------------------------


def _reference_module():
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parent / "data" / "make_samplers_reference.py"
  spec = importlib.util.spec_from_file_location("make_samplers_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


REFERENCE = _reference_module()


@pytest.mark.parametrize("case", list(REFERENCE.CASES))
def test_reproduces_stored_outputs(case):
  stored = np.load(REFERENCE.OUT)
  got = REFERENCE.run_case(case)
  want_keys = sorted(k.split("/", 1)[1] for k in stored.files if k.startswith(case + "/"))
  assert sorted(got) == want_keys
  recorded = json.loads(str(stored["_meta"]))
  for key in want_keys:
    assert_matches_stored(got[key], stored[f"{case}/{key}"], recorded, err_msg=f"{case}/{key}")


# ----------------------------------------------------------------------------
# Parity with diffusers' scheduler loops, on an analytic model written identically in JAX and PyTorch.
# ----------------------------------------------------------------------------

PARITY_T = 100
PARITY_BETAS = np.linspace(1e-4, 0.1, PARITY_T)
PARITY_SHAPE = (2, 4, 4, 3)  # [B, H, W, C]
PARITY_ATOL = 1e-4  # float32; outputs of size ~1


PARITY_SQRT_1M_ABAR = np.sqrt(1 - np.cumprod(1 - PARITY_BETAS))


def _parity_model_jax(x, t):
  """NHWC. Roughly the ε of N(0, I) data, so samples stay of size ~1; fractional t interpolate the table."""
  tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  c = jnp.interp(tf, jnp.arange(PARITY_T, dtype=jnp.float32), jnp.asarray(PARITY_SQRT_1M_ABAR, jnp.float32))
  mixed = 0.6 * x + 0.4 * jnp.roll(x, 1, axis=1) - 0.2 * jnp.flip(x, axis=-1)
  return 0.9 * c * x + 0.3 * jnp.tanh(mixed + 0.1 * jnp.cos(0.03 * tf))


def _parity_model_torch(torch, x, t):
  """The same function on NCHW tensors, for one scalar timestep t."""
  tf = float(t)
  c = np.float32(np.interp(tf, np.arange(PARITY_T), PARITY_SQRT_1M_ABAR))
  mixed = 0.6 * x + 0.4 * torch.roll(x, 1, dims=2) - 0.2 * torch.flip(x, dims=[1])
  return 0.9 * float(c) * x + 0.3 * torch.tanh(mixed + 0.1 * float(np.cos(np.float32(0.03) * np.float32(tf))))


def _learned_range_jax(x, t):
  out = _parity_model_jax(x, t)
  return jnp.concatenate([out, 0.8 * jnp.tanh(2 * out)], axis=-1)


def _learned_range_torch(torch, x, t):
  out = _parity_model_torch(torch, x, t)
  return torch.cat([out, 0.8 * torch.tanh(2 * out)], dim=1)


# (our sampler, our settings, diffusers scheduler class, its settings)
PARITY_CASES = {
  "ancestral_leading_clip": (
    "ancestral",
    dict(timestep_spacing="leading"),
    "DDPMScheduler",
    dict(variance_type="fixed_large", clip_sample=True),
  ),
  "ancestral_fixedsmall_linspace": (
    "ancestral",
    dict(timestep_spacing="linspace", clip_denoised=False),
    "DDPMScheduler",
    dict(variance_type="fixed_small", clip_sample=False, timestep_spacing="linspace"),
  ),
  "ddim": ("ddim", dict(timestep_spacing="leading", clip_denoised=False), "DDIMScheduler", dict(clip_sample=False)),
  "ddim_trailing_eta": (
    "ddim",
    dict(timestep_spacing="trailing", eta=0.5, clip_denoised=False),
    "DDIMScheduler",
    dict(clip_sample=False, timestep_spacing="trailing"),
  ),
  "dpmpp2m": ("dpmpp2m", dict(clip_denoised=False), "DPMSolverMultistepScheduler", dict(solver_order=2)),
  "dpmpp3m": ("dpmpp3m", dict(clip_denoised=False), "DPMSolverMultistepScheduler", dict(solver_order=3)),
  "dpmpp2m_karras_leading": (
    "dpmpp2m",
    dict(sigma_schedule="karras", timestep_spacing="leading", clip_denoised=False),
    "DPMSolverMultistepScheduler",
    dict(solver_order=2, use_karras_sigmas=True, timestep_spacing="leading"),
  ),
  "dpmpp3m_sde_trailing": (
    "dpmpp3m_sde",
    dict(timestep_spacing="trailing", clip_denoised=False),
    "DPMSolverMultistepScheduler",
    dict(solver_order=3, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"),
  ),
  "euler": ("euler", dict(clip_denoised=False), "EulerDiscreteScheduler", dict()),
  "euler_karras": (
    "euler",
    dict(sigma_schedule="karras", clip_denoised=False),
    "EulerDiscreteScheduler",
    dict(use_karras_sigmas=True),
  ),
  "heun": ("heun", dict(clip_denoised=False), "HeunDiscreteScheduler", dict()),
  "heun_karras_clip": (
    "heun",
    dict(sigma_schedule="karras"),
    "HeunDiscreteScheduler",
    dict(use_karras_sigmas=True, clip_sample=True),
  ),
}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "xstart": "sample", "v": "v_prediction"}


def diffusers_loop(scheduler, model, x_T, num_steps, noise_of_t, torch):
  """diffusers' generic scheduler loop; returns (final sample NHWC, network calls)."""
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
  if hasattr(scheduler, "sigmas") and type(scheduler).__name__ != "DPMSolverMultistepScheduler":
    x = x * float((scheduler.sigmas[0] ** 2 + 1) ** 0.5)  # x_T in x_t's space (see samplers.euler)
  calls = 0
  for t in scheduler.timesteps:
    inp = scheduler.scale_model_input(x, t)
    out = model(torch, inp, t)
    calls += 1
    kw = {}
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
      kw = dict(eta=scheduler.parity_eta, variance_noise=noise_of_t(int(t)), use_clipped_model_output=True)
    elif name == "DPMSolverMultistepScheduler" and "sde" in scheduler.config.algorithm_type:
      kw = dict(variance_noise=noise_of_t(int(t)))
    elif name == "DDPMScheduler":
      scheduler.parity_noise = noise_of_t(int(t))
    x = scheduler.step(out, t, x, **kw).prev_sample
  return x.numpy().transpose(0, 2, 3, 1), calls


# Every case with eps at 10 and 50 steps; v and xstart on one configuration per sampler at 10 steps
# (compilation time).
PARITY_PARAMS = [(case, "eps", n) for case in PARITY_CASES for n in (10, 50)] + [
  (case, mean_type, 10)
  for case in PARITY_CASES
  for mean_type in ("v", "xstart")
  if not case.endswith(("karras", "eta", "trailing", "leading"))
]


@pytest.mark.torch
@pytest.mark.parametrize("case,mean_type,num_steps", PARITY_PARAMS)
def test_parity_with_diffusers(case, mean_type, num_steps, monkeypatch):
  import diffusers
  import torch
  from diffusers.schedulers import scheduling_ddpm

  name, settings, scheduler_name, scheduler_settings = PARITY_CASES[case]
  settings = dict(settings)
  clip = settings.pop("clip_denoised", True)
  diffusion = GaussianDiffusion.create(
    PARITY_BETAS,
    model_mean_type=mean_type,
    model_var_type="fixedsmall" if scheduler_settings.get("variance_type") == "fixed_small" else "fixedlarge",
  )
  rng, indices = jax.random.PRNGKey(3), jnp.arange(PARITY_SHAPE[0], dtype=jnp.int32)
  spec = samplers.resolve(name, num_timesteps=PARITY_T, num_steps=num_steps, **settings)
  got = samplers.sample(
    diffusion, jax.tree_util.Partial(_parity_model_jax), rng, indices, PARITY_SHAPE, sampler=spec, clip_denoised=clip
  )["samples"]

  keys = example_keys(rng, indices)
  noise_of_t = lambda t: torch.from_numpy(np.asarray(noise(keys, t + 1, PARITY_SHAPE[1:])).transpose(0, 3, 1, 2).copy())
  scheduler_cls = getattr(diffusers, scheduler_name)
  kw = dict(num_train_timesteps=PARITY_T, trained_betas=PARITY_BETAS, prediction_type=DIFFUSERS_PREDICTION[mean_type])
  scheduler = scheduler_cls(**(kw | scheduler_settings))
  scheduler.parity_eta = spec.eta
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: scheduler.parity_noise)
  want, calls = diffusers_loop(
    scheduler, _parity_model_torch, noise(keys, 0, PARITY_SHAPE[1:]), num_steps, noise_of_t, torch
  )
  assert calls == spec.network_calls
  np.testing.assert_allclose(got, want, rtol=0, atol=PARITY_ATOL)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["ddim", "dpmpp2m", "euler_karras"])
def test_parity_with_diffusers_on_a_converted_unet(case, tmp_path, monkeypatch):
  """The tiny U-Net as a diffusers UNet2DModel (random weights), converted to ours: the same samples, 10 steps."""
  import re

  import diffusers
  import torch

  from configs import tiny
  from diffusion_jax import convert
  from diffusion_jax import runtime

  config = tiny.get_config()
  config.diffusion.num_timesteps = PARITY_T
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(
    **{k: v for k, v in convert.diffusers_config_for(config).items() if not k.startswith("_")}
  ).eval()
  with torch.no_grad():  # every parameter random (zero-initialised layers too), so the output depends on all
    for pname, p in unet.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if re.search(r"norm[^.]*\.weight$", pname) else 0.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  unet.save_pretrained(tmp_path / "unet")
  params, _ = convert.diffusers_to_params(tmp_path / "unet")
  network = runtime.build_network(config)
  model_fn = runtime.bind(runtime.model_fn(network), params)

  name, settings, scheduler_name, scheduler_settings = PARITY_CASES[case]
  settings = dict(settings)
  clip = settings.pop("clip_denoised", True)
  shape = (2, 8, 8, 1)
  diffusion = GaussianDiffusion.create(PARITY_BETAS, model_mean_type="eps", model_var_type="fixedlarge")
  rng, indices = jax.random.PRNGKey(3), jnp.arange(shape[0], dtype=jnp.int32)
  spec = samplers.resolve(name, num_timesteps=PARITY_T, num_steps=10, **settings)
  got = samplers.sample(diffusion, model_fn, rng, indices, shape, sampler=spec, clip_denoised=clip)["samples"]

  def torch_model(torch_, x, t):
    with torch_.no_grad():
      return unet(x, t).sample

  keys = example_keys(rng, indices)
  noise_of_t = lambda t: torch.from_numpy(np.asarray(noise(keys, t + 1, shape[1:])).transpose(0, 3, 1, 2).copy())
  scheduler = getattr(diffusers, scheduler_name)(
    num_train_timesteps=PARITY_T, trained_betas=PARITY_BETAS, prediction_type="epsilon", **scheduler_settings
  )
  scheduler.parity_eta = spec.eta
  want, calls = diffusers_loop(scheduler, torch_model, noise(keys, 0, shape[1:]), 10, noise_of_t, torch)
  assert calls == spec.network_calls
  np.testing.assert_allclose(got, want, rtol=0, atol=PARITY_ATOL)
