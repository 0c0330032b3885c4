"""Every chain of the notebook API runs on the device mesh through `inference` (one door): the same results on one
and on four devices, guidance wherever a chain calls the network, and the inputs checked once at the door."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import api
from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.diffusion import GaussianDiffusion


def _model(num_classes=0, seed=0):
  """A tiny U-Net with every parameter randomised (outputs far from zero), as a LoadedModel."""
  config = tiny.get_config()
  config.model.num_classes = num_classes
  net = runtime.build_network(config)
  params = runtime.init_params(net, jax.random.PRNGKey(seed), (8, 8, 1))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  params = jax.tree.unflatten(
    treedef, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
  )
  return inference.model_from_config(config, params)


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def cond_model():
  return _model(num_classes=3)


def _images(n=3, seed=5):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n, 8, 8, 1), 0, 256), np.uint8)


def _masks(n=3):
  masks = np.zeros((n, 8, 8), np.uint8)
  masks[:, :, :4] = 1  # keep the left half
  return masks


RNG = jax.random.PRNGKey(0)

# name -> fn(model, mesh): each chain of the notebook API on 3 images (padded to 4 on four devices).
CHAINS = {
  "sample": lambda m, mesh: api.sample_fn(m, 3, RNG, sampler="ancestral", num_steps=5, progress=False, mesh=mesh),
  "progressive": lambda m, mesh: api.progressive_fn(m, 3, RNG, sampler="ddim", num_steps=5, every=2, mesh=mesh)[
    "pred_xstart"
  ],
  "edit": lambda m, mesh: api.edit_fn(m, _images(), 0.5, RNG, sampler="ancestral", num_steps=5, mesh=mesh),
  "inpaint": lambda m, mesh: api.inpaint_fn(m, _images(), _masks(), RNG, sampler="dpmpp2m", num_steps=4, mesh=mesh),
  "repaint": lambda m, mesh: api.inpaint_fn(
    m, _images(), _masks(), RNG, num_steps=5, resample=2, jump_length=2, mesh=mesh
  ),
  "encode": lambda m, mesh: api.encode_fn(m, _images(), num_steps=5, mesh=mesh),
  "decode": lambda m, mesh: api.decode_fn(m, np.asarray(jax.random.normal(RNG, (3, 8, 8, 1))), num_steps=5, mesh=mesh),
  "interpolate": lambda m, mesh: api.interpolate_fn(
    m, _images()[0], _images()[1], RNG, lambdas=[0.0, 0.3, 1.0], t=10, sampler="ddim", num_steps=5, mesh=mesh
  ),
  "slerp": lambda m, mesh: api.interpolate_fn(
    m, _images()[0], _images()[1], RNG, lambdas=[0.0, 0.5, 1.0], method="slerp", num_steps=5, mesh=mesh
  ),
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_every_chain_is_the_same_on_one_and_on_four_devices(model, chain, n_devices):
  one = runtime.make_mesh(devices=jax.devices()[:1])
  four = runtime.make_mesh()
  assert four.size == n_devices == 4
  a, b = CHAINS[chain](model, one), CHAINS[chain](model, four)
  assert a.shape[0] == 3 and a.dtype == b.dtype
  if a.dtype == np.uint8:
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a.reshape(a.shape[0], -1), axis=0)) > 1  # not a constant image
  else:  # the latents of inversion
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_chain_runs_sharded_over_the_mesh(model, monkeypatch):
  """The batch of a chain is split over the data axis of the mesh (not run on one device)."""
  seen = []
  put = jax.device_put

  def spy(x, sharding=None, *args, **kwargs):
    seen.append(sharding)
    return put(x, sharding, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", spy)
  api.edit_fn(model, _images(), 0.5, RNG, sampler="ddim", num_steps=3)
  batched = [
    s for s in seen if s is not None and getattr(s, "spec", None) == runtime.batch_sharding(runtime.make_mesh()).spec
  ]
  assert batched and all(len(s.device_set) == 4 for s in batched)


def test_the_ode_likelihood_is_one_system_on_any_mesh(model):
  images = _images(4)
  kw = dict(rtol=1e-3, atol=1e-3)
  a = api.likelihood_fn(model, images, RNG, mesh=runtime.make_mesh(devices=jax.devices()[:1]), **kw)
  b = api.likelihood_fn(model, images, RNG, mesh=runtime.make_mesh(), **kw)
  # One ODE system over the whole batch on either mesh; the convolutions round differently on per-device batches of
  # 4 and 1, which the adaptive controller amplifies near τ_0 (a random network's drift scales as 1/σ) into some
  # accepted and rejected steps of its own (as for the ode_bpd evaluator): the values agree to ten times the
  # solver's rtol, the step counts (127 against 151 on jax 0.12) to a quarter.
  np.testing.assert_allclose(b["bpd"], a["bpd"], rtol=1e-2)
  assert abs(int(a["nfe"]) - int(b["nfe"])) <= 0.25 * int(a["nfe"])
  odd = api.likelihood_fn(model, images[:3], RNG, **kw)  # padded to 4 rows, the padding dropped
  assert odd["bpd"].shape == (3,) and np.all(np.isfinite(odd["bpd"]))


# ----------------------------------------------------------------------------
# Guidance wherever a chain calls the network: RePaint and inversion use the driver's guided output.
# ----------------------------------------------------------------------------

T = 10
DIFFUSION = GaussianDiffusion.create(np.linspace(1e-3, 0.2, T))
NULL = 3


def _toy(x, t, cond=None):
  """A deterministic 'network' that depends on its labels."""
  shift = 0.0 if cond is None else 0.2 * cond.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.9 * jnp.tanh(
    (0.5 + 0.1 * t.astype(jnp.float32)).reshape(shift.shape if cond is not None else (-1, 1, 1, 1)) * x + shift
  )


def _by_formula(cond, scale):
  def model_fn(x, t):
    c, u = _toy(x, t, cond), _toy(x, t, jnp.full_like(cond, NULL))
    return u + scale * (c - u)

  return model_fn


def test_repaint_is_guided():
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 1), minval=-1.0, maxval=1.0)
  mask = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (3, 4, 4)))
  cond, idx = jnp.asarray([0, 2, 1], jnp.int32), jnp.arange(3)
  kw = dict(jump_length=2, jump_n_sample=3)
  guided = samplers.repaint.repaint(
    DIFFUSION, _toy, RNG, idx, x0, mask, cond=cond, guidance_scale=2.0, null_label=NULL, **kw
  )
  want = samplers.repaint.repaint(DIFFUSION, _by_formula(cond, 2.0), RNG, idx, x0, mask, **kw)
  np.testing.assert_allclose(guided["samples"], want["samples"], rtol=1e-5, atol=1e-5)
  conditional = samplers.repaint.repaint(DIFFUSION, _toy, RNG, idx, x0, mask, cond=cond, **kw)["samples"]
  assert not np.allclose(conditional, guided["samples"], atol=1e-3)


def test_inversion_is_guided():
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 1), minval=-1.0, maxval=1.0)
  cond = jnp.asarray([0, 2, 1], jnp.int32)
  spec = samplers.resolve("ddim", num_timesteps=T, num_steps=4)
  guided = samplers.invert(DIFFUSION, _toy, x0, spec, cond=cond, guidance_scale=2.0, null_label=NULL)["latents"]
  want = samplers.invert(DIFFUSION, _by_formula(cond, 2.0), x0, spec)["latents"]
  np.testing.assert_allclose(guided, want, rtol=1e-5, atol=1e-5)


def test_conditional_repaint_and_guided_inversion_from_the_notebook_api(cond_model):
  images, masks = _images(), _masks()
  kw = dict(num_steps=5, resample=2, jump_length=2)
  a = api.inpaint_fn(cond_model, images, masks, RNG, labels=[0, 1, 2], **kw)
  b = api.inpaint_fn(cond_model, images, masks, RNG, labels=[0, 1, 2], guidance_scale=3.0, **kw)
  np.testing.assert_array_equal(a[:, :, :4], images[:, :, :4])
  assert not np.array_equal(a, b)  # the scale reaches the RePaint chain
  z1 = api.encode_fn(cond_model, images, num_steps=5, labels=1)
  z3 = api.encode_fn(cond_model, images, num_steps=5, labels=1, guidance_scale=3.0)
  assert not np.allclose(z1, z3, atol=1e-4)


# ----------------------------------------------------------------------------
# Inputs checked at the door.
# ----------------------------------------------------------------------------


def test_float_images_outside_minus_one_one_are_refused(model):
  pixels = _images().astype(np.float32)  # 0..255 as floats: a common mistake
  with pytest.raises(errors.UserError, match=r"must lie in \[-1, 1\].*0\.\.255 pixel values\? pass them as uint8"):
    api.edit_fn(model, pixels, 0.5, RNG)
  with pytest.raises(errors.UserError, match=r"must lie in \[-1, 1\]"):
    api.inpaint_fn(model, pixels, _masks(), RNG)
  with pytest.raises(errors.UserError, match=r"x1 must lie in \[-1, 1\]|float x1 must lie"):
    api.interpolate_fn(model, pixels[0], pixels[1], RNG)
  ok = pixels / 127.5 - 1.0  # the documented float range passes
  assert api.edit_fn(model, ok, 0.5, RNG, sampler="ddim", num_steps=3).shape == ok.shape


def test_nan_images_are_refused(model):
  x = _images().astype(np.float32) / 127.5 - 1.0
  x[1, 2, 3, 0] = np.nan
  with pytest.raises(errors.UserError, match="NaN or infinite"):
    api.edit_fn(model, x, 0.5, RNG)
  with pytest.raises(errors.UserError, match="NaN or infinite"):
    api.encode_fn(model, x)
  with pytest.raises(errors.UserError, match="NaN or infinite"):
    api.decode_fn(model, x)


def test_integer_images_of_another_dtype_are_refused(model):
  with pytest.raises(errors.UserError, match=r"dtype int64: pass uint8 images"):
    api.edit_fn(model, _images().astype(np.int64), 0.5, RNG)


@pytest.mark.parametrize("bad", [0, 7, "seed", None])
def test_an_rng_that_is_not_a_key_is_named(model, bad):
  with pytest.raises(errors.UserError, match="rng must be a JAX random key"):
    api.sample_fn(model, 2, bad, progress=False)
  with pytest.raises(errors.UserError, match="rng must be a JAX random key"):
    api.edit_fn(model, _images(), 0.5, bad)
  assert api.sample_fn(model, 2, jax.random.key(0), num_steps=2, progress=False).shape == (2, 8, 8, 1)
