"""Tests of image editing: SDEdit (`samplers.edit`, `edit_fn`), DDIM inversion (`samplers.invert`, `encode_fn`)
and inpainting in the driver (`samplers.inpaint`, `inpaint_fn`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpointing
from diffusion_jax import images as images_lib
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import sampling
from diffusion_jax.diffusion import GaussianDiffusion

T = 10
SHAPE = (3, 4, 4, 2)
DIFFUSION = GaussianDiffusion.create(np.linspace(1e-3, 0.2, T))
RNG = jax.random.PRNGKey(0)
INDICES = jnp.arange(SHAPE[0], dtype=jnp.int32)


def _apply(params, x, t, cond=None):
  """A cheap deterministic 'network' (a t-dependent squashing of x; labels shift it)."""
  scale = (params["a"] + params["b"] * t.astype(jnp.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
  shift = 0.0 if cond is None else 0.1 * cond.astype(jnp.float32).reshape(scale.shape)
  return 0.9 * jnp.tanh(scale * x + 0.3 + shift)


MODEL_FN = jax.tree_util.Partial(_apply, {"a": jnp.float32(0.5), "b": jnp.float32(0.1)})
X0 = jax.random.uniform(jax.random.PRNGKey(1), SHAPE, minval=-1.0, maxval=1.0)
MASK = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, SHAPE[:3]))


def spec(name, num_timesteps=T, **settings):
  return samplers.resolve(name, num_timesteps=num_timesteps, **settings)


def scheme_noise(rng, index, step, shape, stream=None):
  """The package's per-example noise: normal(fold_in(key_b[, stream], step)), key_b = fold_in(rng, index)."""
  key = jax.random.fold_in(rng, index)
  if stream is not None:
    key = jax.random.fold_in(key, stream)
  return jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32)


# ----------------------------------------------------------------------------
# Inpainting.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_inpaint_keeps_known_pixels_and_samples_the_rest(name):
  out = samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, sampler=spec(name, num_steps=4))["samples"]
  known = np.broadcast_to(MASK[..., None], SHAPE)
  out, x0 = np.asarray(out), np.asarray(X0)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[known], x0[known])
  assert np.mean(np.abs(out[~known] - x0[~known])) > 0.1


def test_inpaint_with_guidance_keeps_known_pixels():
  cond = jnp.array([0, 1, 2], jnp.int32)
  out = samplers.inpaint(
    DIFFUSION,
    MODEL_FN,
    RNG,
    INDICES,
    X0,
    MASK[..., None],
    sampler=spec("ddim", num_steps=4),
    cond=cond,
    guidance_scale=2.0,
    null_label=3,
  )["samples"]
  known = np.broadcast_to(MASK[..., None], SHAPE)
  np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(X0)[known])


@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpmpp2m_sde", "heun"])
def test_inpaint_known_region_is_the_forward_marginal_of_the_network_timestep(name):
  # On integer grids, the known pixels the network sees at timestep t are q_sample(x0, t, z) with
  # z = normal(fold_in(fold_in(key_b, KNOWN_STREAM), t + 1)).
  settings = dict(timestep_spacing="leading") if name == "heun" else {}
  s = spec(name, num_steps=4, **settings)
  out = samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, MASK, sampler=s, progressive_every=1)
  plan = s.sampler.plan(DIFFUSION, s, None)
  steps = plan.t[plan.record]
  assert steps.dtype == np.int32 and out["trajectory"].shape[1] == steps.size
  known = np.broadcast_to(MASK[..., None], SHAPE)
  for k, t in enumerate(steps):
    z = jnp.stack([scheme_noise(RNG, i, int(t) + 1, SHAPE[1:], samplers.driver.KNOWN_STREAM) for i in range(3)])
    want = DIFFUSION.q_sample(X0, jnp.full((SHAPE[0],), t, jnp.int32), z)
    got = np.asarray(out["trajectory"][:, k])
    np.testing.assert_allclose(got[known], np.asarray(want)[known], rtol=1e-5, atol=1e-5, err_msg=f"t={t}")
    assert np.mean(np.abs(got[~known] - np.asarray(want)[~known])) > 0.1  # the unknown region is sampled


def test_inpaint_with_nothing_known_is_sampling():
  s = spec("ddim", num_steps=4, eta=1.0)
  a = samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, np.zeros(SHAPE[:3]), sampler=s)["samples"]
  b = samplers.sample(DIFFUSION, MODEL_FN, RNG, INDICES, SHAPE, sampler=s)["samples"]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inpaint_errors():
  with pytest.raises(ValueError, match="mask must hold 0"):
    samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, 0.5 * np.ones(SHAPE[:3]))
  with pytest.raises(ValueError, match="mask must have the images' shape"):
    samplers.inpaint(DIFFUSION, MODEL_FN, RNG, INDICES, X0, np.ones((3, 4, 5)))


# ----------------------------------------------------------------------------
# SDEdit.
# ----------------------------------------------------------------------------


def test_strength_to_timestep():
  assert samplers.strength_to_timestep(1.0, 1000) == 999
  assert samplers.strength_to_timestep(0.5, 1000) == 499
  assert samplers.strength_to_timestep(1e-6, 1000) == 0
  for bad in (0.0, 1.5, float("nan"), True):
    with pytest.raises(ValueError, match="strength must"):
      samplers.strength_to_timestep(bad, 1000)


@pytest.mark.parametrize("name", ["ancestral", "dpmpp2m"])
def test_edit_is_denoise_from_the_documented_q_sample(name):
  s, t = spec(name, num_steps=5), 6
  got = samplers.edit(DIFFUSION, MODEL_FN, RNG, INDICES, X0, t=t, sampler=s)["samples"]
  z = jnp.stack([scheme_noise(RNG, i, 0, SHAPE[1:]) for i in range(3)])
  x_t = DIFFUSION.q_sample(X0, jnp.full((3,), t, jnp.int32), z)
  want = samplers.denoise(DIFFUSION, MODEL_FN, RNG, INDICES, x_t, t=t, sampler=s)["samples"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# DDIM inversion on analytic models.
# ----------------------------------------------------------------------------

MU = 0.3 * jax.random.normal(jax.random.PRNGKey(3), (1,) + SHAPE[1:])


def point_mass_eps(diffusion):
  """The exact ε-model of the data distribution δ(x − MU): ε(x, t) = (x − √ᾱ_t μ)/√(1 − ᾱ_t)."""

  def fn(x, t):
    a = jnp.take(diffusion.alphas_cumprod, t).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - jnp.sqrt(a) * MU) / jnp.sqrt(1.0 - a)

  return fn


def gaussian_eps(diffusion, s2=0.25):
  """The exact ε-model of N(MU, s2·I): E[ε | x_t] = √(1 − ᾱ)(x − √ᾱ μ)/(ᾱ s2 + 1 − ᾱ)."""

  def fn(x, t):
    a = jnp.take(diffusion.alphas_cumprod, t).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * MU) / (a * s2 + 1.0 - a)

  return fn


def test_inversion_steps_invert_the_forward_ddim_steps_for_a_point_mass():
  # With x̂_0 = μ whatever x, each inverse step with the network at the current timestep is the exact inverse of
  # the forward step between the same two grid timesteps: the forward chain from the latent retraces the points.
  diffusion = GaussianDiffusion.create(np.linspace(1e-3, 0.05, 50))
  fn, s = point_mass_eps(diffusion), spec("ddim", num_timesteps=50, num_steps=6)
  inv = samplers.invert(diffusion, fn, X0, s, trajectory=True, network_t="current")
  grid = samplers.inversion.inversion_grid(s)
  assert inv["t"] == 49 and grid.tolist() == sorted(grid.tolist()) and grid[0] == 0
  fwd = samplers.denoise(
    diffusion, fn, RNG, INDICES, inv["latents"], t=inv["t"], sampler=s, clip_denoised=False, progressive_every=1
  )
  # Forward trajectory: the network inputs at s_{n−1}, ..., s_0; inversion's: x at s_0, ..., s_{n−1}.
  np.testing.assert_allclose(fwd["trajectory"][:, ::-1], inv["trajectory"], rtol=1e-4, atol=1e-4)
  # Upwards: the signal fades towards the top (the latent is mostly the scaled deviation from μ).
  dist = np.abs(np.asarray(inv["trajectory"]) - np.asarray(X0)[:, None]).mean(axis=(0, 2, 3, 4))
  assert np.all(np.diff(dist) > 0)


@pytest.mark.parametrize("network_t", ["target", "current"])
def test_inversion_round_trip_error_shrinks_with_more_steps(network_t):
  diffusion = GaussianDiffusion.create(np.linspace(1e-4, 0.05, 200))
  fn = gaussian_eps(diffusion)
  x0 = MU + 0.5 * jax.random.normal(jax.random.PRNGKey(4), SHAPE)
  errs = []
  for n in (4, 16, 64):
    s = spec("ddim", num_timesteps=200, num_steps=n)
    inv = samplers.invert(diffusion, fn, x0, s, network_t=network_t)
    back = samplers.denoise(diffusion, fn, RNG, INDICES, inv["latents"], t=inv["t"], sampler=s, clip_denoised=False)
    errs.append(float(jnp.max(jnp.abs(back["samples"] - x0))))
  assert errs[0] > errs[1] > errs[2] and errs[2] < 0.25 * errs[0], errs


@pytest.mark.parametrize("spacing", ["even", "trailing"])
def test_inversion_target_step_by_hand(spacing):
  # Step i from x at s_{i−1} to s_i: ε̂ = ε(x, s_i) (the target's label), x̂_0 = (x − √(1 − ᾱ_{s_{i−1}}) ε̂)/√ᾱ_{s_{i−1}},
  # x_{s_i} = √ᾱ_{s_i} x̂_0 + √(1 − ᾱ_{s_i}) ε̂; the first step from x_0 (ᾱ = 1) with ε̂ = ε(x_0, s_0).
  diffusion = GaussianDiffusion.create(np.linspace(1e-4, 0.05, 100))
  fn = gaussian_eps(diffusion)
  s = spec("ddim", num_timesteps=100, num_steps=5, timestep_spacing=spacing)
  inv = samplers.invert(diffusion, fn, X0, s, trajectory=True)
  grid = samplers.inversion.inversion_grid(s)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.05, 100))
  x, a_cur = np.asarray(X0, np.float64), 1.0
  for i, t in enumerate(grid.tolist()):
    eps = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.full((SHAPE[0],), t, jnp.int32)), np.float64)
    x0_hat = (x - np.sqrt(1.0 - a_cur) * eps) / np.sqrt(a_cur)
    x = np.sqrt(abar[t]) * x0_hat + np.sqrt(1.0 - abar[t]) * eps
    a_cur = abar[t]
    np.testing.assert_allclose(inv["trajectory"][:, i], x, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
  # On the same grid the current-timestep convention is another map (only the first step is shared).
  other = samplers.invert(diffusion, fn, X0, s, trajectory=True, network_t="current")["trajectory"]
  np.testing.assert_allclose(other[:, 0], inv["trajectory"][:, 0], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(other[:, -1]) - np.asarray(inv["trajectory"][:, -1])).max() > 1e-3


def test_invert_errors():
  with pytest.raises(ValueError, match="network_t must be one of target, current"):
    samplers.invert(DIFFUSION, MODEL_FN, X0, spec("ddim"), network_t="next")
  with pytest.raises(ValueError, match="needs the deterministic ddim"):
    samplers.invert(DIFFUSION, MODEL_FN, X0, spec("ancestral"))
  with pytest.raises(ValueError, match="needs the deterministic ddim"):
    samplers.invert(DIFFUSION, MODEL_FN, X0, spec("ddim", eta=1.0))


# ----------------------------------------------------------------------------
# The notebook API on a tiny UNet.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  cfg = tiny.get_config()
  path = tmp_path_factory.mktemp("model")
  net = runtime.build_network(cfg)
  params = runtime.init_params(net, jax.random.PRNGKey(0), (8, 8, 1))
  checkpointing.save_model_checkpoint(path, config=cfg, params=params, ema_params=params, step=1)
  return sampling.load_model(path)


def _images(n=4):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(5), (n, 8, 8, 1), 0, 256), np.uint8)


def test_edit_fn(model):
  images, rng = _images(), jax.random.PRNGKey(0)
  near = sampling.edit_fn(model, images, 0.05, rng, sampler="ddim", num_steps=5)
  assert near.dtype == np.uint8 and near.shape == images.shape
  far = sampling.edit_fn(model, images, 1.0, rng, sampler="ddim", num_steps=5)
  diff = lambda a: np.mean(np.abs(a.astype(np.float32) - images.astype(np.float32)))
  assert diff(near) < 8 and diff(far) > 4 * diff(near)
  # The documented scheme: q_sample with the x_T noise of image i, then denoise from t.
  t = samplers.strength_to_timestep(0.05, model.diffusion.num_timesteps)
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  z = jnp.stack([scheme_noise(rng, i, 0, (8, 8, 1)) for i in range(4)])
  x_t = model.diffusion.q_sample(x0, jnp.full((4,), t, jnp.int32), z)
  fn = runtime.bind(runtime.model_fn(model.network), model.params)
  s = samplers.resolve("ddim", num_timesteps=model.diffusion.num_timesteps, num_steps=5)
  want = samplers.denoise(model.diffusion, fn, rng, jnp.arange(4), x_t, t=t, sampler=s)["samples"]
  assert np.max(np.abs(near.astype(int) - images_lib.to_uint8(want).astype(int))) <= 1


def test_encode_and_decode_fn(model):
  images = _images()
  latents = sampling.encode_fn(model, images, num_steps=5)
  assert latents.dtype == np.float32 and latents.shape == images.shape and np.all(np.isfinite(latents))
  fn = runtime.bind(runtime.model_fn(model.network), model.params)
  s = samplers.resolve("ddim", num_timesteps=model.diffusion.num_timesteps, num_steps=5)
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  np.testing.assert_allclose(latents, samplers.invert(model.diffusion, fn, x0, s)["latents"], rtol=1e-5, atol=1e-5)
  back = sampling.decode_fn(model, latents, num_steps=5)
  assert back.dtype == np.uint8 and back.shape == images.shape


@pytest.mark.parametrize("masks_shape", [(4, 8, 8), (4, 8, 8, 1)])
def test_inpaint_fn_keeps_known_pixels(model, masks_shape):
  images = _images()
  masks = np.zeros(masks_shape, np.uint8)
  masks[:, :, :4] = 1  # keep the left half
  out = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), sampler="dpmpp2m", num_steps=4)
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out[:, :, :4], images[:, :, :4])
  assert not np.array_equal(out[:, :, 4:], images[:, :, 4:])
  with pytest.raises(ValueError, match="masks must hold 0"):
    sampling.inpaint_fn(model, images, 2 * masks, jax.random.PRNGKey(0))
