"""Tests of the DDPM U-Net (diffusion_jax.models.unet) against the paper's Appendix B and its reference code.

Full-size networks are only traced (`jax.eval_shape`, no compilation); anything
that runs uses a tiny U-Net (ch = 32, ch_mult = (1, 2), 8×8 images). Layer
references are float64 NumPy written from the formulas.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import unet

NEAR_ZERO = ("conv2", "proj_out", "conv_out")  # initialised with scale 1e-10


def _init_shapes(model, size, channels=3, batch=1):
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)


def _flat(tree):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _expected_param_shapes(ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch=3):
  """The parameter tree of the reference code's TF scopes, path -> shape."""
  p = {}

  def dense(name, i, o):
    p[f"{name}/kernel"], p[f"{name}/bias"] = (i, o), (o,)

  def conv(name, i, o):
    p[f"{name}/kernel"], p[f"{name}/bias"] = (3, 3, i, o), (o,)

  def norm(name, c):
    p[f"{name}/scale"], p[f"{name}/bias"] = (c,), (c,)

  def block(name, i, o):
    norm(f"{name}/norm1", i)
    conv(f"{name}/conv1", i, o)
    dense(f"{name}/temb_proj", 4 * ch, o)
    norm(f"{name}/norm2", o)
    conv(f"{name}/conv2", o, o)
    if i != o:
      dense(f"{name}/nin_shortcut", i, o)

  def attn(name, c):
    norm(f"{name}/norm", c)
    for n in ("q", "k", "v", "proj_out"):
      dense(f"{name}/{n}", c, c)

  dense("temb/dense0", ch, 4 * ch)
  dense("temb/dense1", 4 * ch, 4 * ch)
  conv("conv_in", in_ch, ch)
  hs, h, res = [ch], ch, size
  for i, mult in enumerate(ch_mult):
    for j in range(num_res_blocks):
      block(f"down_{i}/block_{j}", h, ch * mult)
      h = ch * mult
      if res in attn_resolutions:
        attn(f"down_{i}/attn_{j}", h)
      hs.append(h)
    if i != len(ch_mult) - 1:
      conv(f"down_{i}/downsample/conv", h, h)
      hs.append(h)
      res //= 2
  block("mid/block_1", h, h)
  attn("mid/attn_1", h)
  block("mid/block_2", h, h)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      block(f"up_{i}/block_{j}", h + hs.pop(), ch * ch_mult[i])
      h = ch * ch_mult[i]
      if res in attn_resolutions:
        attn(f"up_{i}/attn_{j}", h)
    if i != 0:
      conv(f"up_{i}/upsample/conv", h, h)
      res *= 2
  assert not hs
  norm("norm_out", h)
  conv("conv_out", h, out_ch)
  return p


# ----------------------------------------------------------------------------
# Full-size networks, traced only.
# ----------------------------------------------------------------------------

CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
LARGE = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)


@pytest.mark.parametrize(
  "kwargs, out_ch, size, count, tensors",
  [
    (CIFAR, 3, 32, 35_746_307, 328),
    (CIFAR, 6, 32, 35_749_766, 328),
    (LARGE, 3, 256, 113_673_219, 450),
  ],
)
def test_parameter_tree_and_count(kwargs, out_ch, size, count, tensors):
  variables = _init_shapes(unet.UNet(out_ch=out_ch, **kwargs), size)
  assert set(variables) == {"params"}
  params = _flat(variables["params"])
  assert sum(math.prod(v.shape) for v in params.values()) == count
  assert len(params) == tensors
  assert all(v.dtype == jnp.float32 for v in params.values())
  expected = _expected_param_shapes(out_ch=out_ch, size=size, **{k: v for k, v in kwargs.items() if k != "dropout"})
  assert sum(math.prod(s) for s in expected.values()) == count  # the spec above agrees with the facts
  assert {k: tuple(v.shape) for k, v in params.items()} == expected


def test_cifar_names():
  params = _flat(_init_shapes(unet.UNet(**CIFAR), 32)["params"])
  for path, shape in {
    "temb/dense0/kernel": (128, 512),
    "temb/dense1/kernel": (512, 512),
    "conv_in/kernel": (3, 3, 3, 128),
    "down_0/block_0/conv1/kernel": (3, 3, 128, 128),
    "down_1/block_0/nin_shortcut/kernel": (128, 256),
    "down_1/block_0/temb_proj/kernel": (512, 256),
    "down_1/attn_0/q/kernel": (256, 256),
    "down_1/attn_1/proj_out/bias": (256,),
    "down_1/attn_0/norm/scale": (256,),
    "down_2/downsample/conv/kernel": (3, 3, 256, 256),
    "mid/block_1/norm1/scale": (256,),
    "mid/attn_1/k/kernel": (256, 256),
    "mid/block_2/conv2/kernel": (3, 3, 256, 256),
    "up_3/block_0/nin_shortcut/kernel": (512, 256),
    "up_3/upsample/conv/kernel": (3, 3, 256, 256),
    "up_1/attn_2/v/kernel": (256, 256),
    "up_0/block_2/nin_shortcut/kernel": (256, 128),
    "norm_out/scale": (128,),
    "norm_out/bias": (128,),
    "conv_out/kernel": (3, 3, 128, 3),
  }.items():
    assert tuple(params[path].shape) == shape, path
  for absent in ("down_3/downsample/conv/kernel", "up_0/upsample/conv/kernel", "down_0/attn_0/q/kernel"):
    assert absent not in params
  # Six attention blocks: down_1 ×2 at 16², mid, up_1 ×3 (the reference code's CIFAR-10 network).
  attn = sorted({p.rsplit("/", 2)[0] for p in params if p.endswith("/q/kernel")})
  assert attn == ["down_1/attn_0", "down_1/attn_1", "mid/attn_1", "up_1/attn_0", "up_1/attn_1", "up_1/attn_2"]
  assert {p.rsplit("/", 1)[1] for p in params} == {"kernel", "bias", "scale"}


def test_output_shape_traced():
  model = unet.UNet(out_ch=6, **CIFAR)
  variables = _init_shapes(model, 32)
  x = jax.ShapeDtypeStruct((5, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((5,), jnp.int32)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x, t)
  assert out.shape == (5, 32, 32, 6) and out.dtype == jnp.float32


@pytest.mark.parametrize(
  "kwargs, size, match",
  [
    (dict(ch=48, ch_mult=(1, 2)), 8, "multiple of 32"),
    (dict(ch=16, ch_mult=(2, 2)), 8, "multiple of 32"),
    (dict(ch=32, ch_mult=(1, 2, 2, 2)), 12, "divisible by 2\\^\\(levels-1\\) = 8"),
    (dict(ch=32, ch_mult=(1, 2), attn_resolutions=(3,)), 8, "never occur"),
    (dict(ch=32, ch_mult=(1, 2), attn_resolutions=(16,)), 8, "never occur"),
    (dict(ch=32, ch_mult=()), 8, "ch_mult"),
  ],
)
def test_config_errors(kwargs, size, match):
  kwargs.setdefault("attn_resolutions", ())
  with pytest.raises(ValueError, match=match):
    _init_shapes(unet.UNet(num_res_blocks=1, **kwargs), size)


def test_input_errors():
  model = unet.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  init = functools.partial(model.init, train=False)
  with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
    jax.eval_shape(init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jax.eval_shape(init, jax.random.key(0), jnp.zeros((8, 8, 3)), jnp.zeros((8,), jnp.int32))


# ----------------------------------------------------------------------------
# Timestep embedding.
# ----------------------------------------------------------------------------


def _np_timestep_embedding(t, dim):
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
  args = np.asarray(t, np.float64)[:, None] * freqs[None, :]
  return np.concatenate([np.sin(args), np.cos(args)], axis=1)  # sin first


@pytest.mark.parametrize("dim", [128, 32])
def test_timestep_embedding(dim):
  t = np.array([0, 1, 2, 17, 500, 999])
  got = unet.get_timestep_embedding(jnp.asarray(t, jnp.int32), dim)
  assert got.shape == (len(t), dim) and got.dtype == jnp.float32
  # float32 arguments t·f carry ~999·6e-8 ≈ 6e-5 absolute error (~7e-5 at t = 999).
  np.testing.assert_allclose(got, _np_timestep_embedding(t, dim), rtol=0, atol=2e-4)
  # The low-t rows are exact enough to tell sin-first from cos-first and half from half−1.
  np.testing.assert_allclose(got[:4], _np_timestep_embedding(t[:4], dim), rtol=0, atol=1e-6)


def test_timestep_embedding_module():
  """temb = dense1(swish(dense0(emb))), no activation after dense1."""
  module = unet.TimestepEmbedding(ch=32)
  t = jnp.array([0, 5, 999], jnp.int32)
  params = _randomize(_shapes(module, t), 0)  # random biases, so that a missing bias would show
  p = _f64(params)
  h = _np_timestep_embedding(np.asarray(t), 32) @ p["dense0"]["kernel"] + p["dense0"]["bias"]
  h = h / (1 + np.exp(-h))
  expected = h @ p["dense1"]["kernel"] + p["dense1"]["bias"]
  got = module.apply({"params": params}, t)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # float32 matmuls over 128 terms


# ----------------------------------------------------------------------------
# Layers against NumPy.
# ----------------------------------------------------------------------------


def _np_swish(x):
  return x / (1 + np.exp(-x))


def _np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _np_conv3x3(x, kernel, bias, stride=1):
  """TF 'SAME' 3×3 convolution; stride 2 on even sizes pads 0 top/left and 1 bottom/right."""
  b, h, w, _ = x.shape
  if stride == 1:
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  else:
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  oh, ow = h // stride, w // stride
  out = np.zeros((b, oh, ow, kernel.shape[-1])) + bias
  for dy in range(3):
    for dx in range(3):
      patch = xp[:, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride, :]
      out += patch @ kernel[dy, dx]
  return out


def _randomize(params, seed):
  """Normal draws of params' shapes: kernels with std 1/√fan_in, biases and norm scales/offsets around 0 (or 1)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in _flat(params).items():
    if len(leaf.shape) > 1:
      value = rng.normal(scale=1.0 / math.sqrt(math.prod(leaf.shape[:-1])), size=leaf.shape)
    else:
      value = rng.normal(scale=0.3, size=leaf.shape) + (1.0 if path.endswith("scale") else 0.0)
    flat[tuple(path.split("/"))] = np.asarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _shapes(module, *args, **kwargs):
  """The module's parameter shapes, by tracing only."""
  return jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)["params"]


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_group_norm():
  """32 groups, ε = 1e-6; inputs with variance ~1e-5 make ε visible."""
  x = (3e-3 * np.random.default_rng(1).normal(size=(2, 4, 4, 64))).astype(np.float32)
  module = unet._norm("norm", jnp.float32)
  params = _randomize(_shapes(module, x), 2)
  got = module.apply({"params": params}, x)
  # Normalised values are O(1); float32 statistics over 32 values per group.
  np.testing.assert_allclose(got, _np_group_norm(x.astype(np.float64), **_f64(params)), rtol=1e-4, atol=1e-4)


def test_resnet_block():
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 32)).astype(np.float32)
  temb = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
  module = unet.ResnetBlock(out_ch=64, dropout=0.0)
  params = _randomize(_shapes(module, x, temb, train=False), 3)
  got = module.apply({"params": params}, x, temb, train=False)
  p = _f64(params)
  x64, temb64 = x.astype(np.float64), temb.astype(np.float64)
  h = _np_conv3x3(_np_swish(_np_group_norm(x64, **p["norm1"])), **p["conv1"])
  h = h + (_np_swish(temb64) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None, :]
  h = _np_conv3x3(_np_swish(_np_group_norm(h, **p["norm2"])), **p["conv2"])
  shortcut = x64 @ p["nin_shortcut"]["kernel"] + p["nin_shortcut"]["bias"]
  # float32 through two convolutions of 288/576 terms and two group norms.
  np.testing.assert_allclose(got, shortcut + h, rtol=1e-4, atol=1e-4)


def test_attn_block():
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 32)).astype(np.float32)
  module = unet.AttnBlock()
  params = _randomize(_shapes(module, x), 4)
  got = module.apply({"params": params}, x)
  p = _f64(params)
  x64 = x.astype(np.float64)
  h = _np_group_norm(x64, **p["norm"]).reshape(2, 16, 32)
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  logits = np.einsum("bic,bjc->bij", q, k) / math.sqrt(32)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = np.einsum("bij,bjc->bic", w, v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
  np.testing.assert_allclose(got, x64 + h.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_down_and_upsample():
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 32)).astype(np.float32)
  down = unet.Downsample(with_conv=True)
  params = _randomize(_shapes(down, x), 5)
  got = down.apply({"params": params}, x)
  assert got.shape == (2, 4, 4, 32)
  expected = _np_conv3x3(x.astype(np.float64), stride=2, **_f64(params)["conv"])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Without the conv: 2×2 average pooling.
  pooled = x.reshape(2, 4, 2, 4, 2, 32).mean(axis=(2, 4))
  np.testing.assert_allclose(unet.Downsample(with_conv=False).apply({}, x), pooled, rtol=1e-6, atol=1e-6)
  up = unet.Upsample(with_conv=True)
  params = _randomize(_shapes(up, x), 6)
  got = up.apply({"params": params}, x)
  assert got.shape == (2, 16, 16, 32)
  repeated = x.astype(np.float64).repeat(2, axis=1).repeat(2, axis=2)  # nearest neighbour, exact 2×
  np.testing.assert_allclose(got, _np_conv3x3(repeated, **_f64(params)["conv"]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# The tiny network, compiled.
# ----------------------------------------------------------------------------

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


@functools.lru_cache(maxsize=None)
def _tiny():
  model = unet.UNet(**TINY)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  t = jnp.array([0, 999], jnp.int32)
  # The rbg generator compiles several times faster than threefry on CPU; init's distributions are the same.
  key = jax.random.key(0, impl="unsafe_rbg")
  params = jax.jit(functools.partial(model.init, train=False))(key, x, t)["params"]
  return model, params, x, t


@functools.lru_cache(maxsize=None)
def _apply_fn(dtype, train):
  model = unet.UNet(dtype=dtype, **TINY)
  return jax.jit(lambda p, x, t, rng: model.apply({"params": p}, x, t, train=train, rngs={"dropout": rng}))


def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _glorot_limit(shape, scale):
  receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
  fan_avg = (shape[-2] + shape[-1]) * receptive / 2
  return math.sqrt(3 * scale / fan_avg)


def test_init_distributions():
  _, params, _, _ = _tiny()
  flat = _flat(params)
  assert _expected_param_shapes(out_ch=3, size=8, **{k: v for k, v in TINY.items() if k != "dropout"}) == {
    k: v.shape for k, v in flat.items()
  }
  for path, leaf in flat.items():
    leaf = np.asarray(leaf, np.float64)
    assert leaf.dtype == np.float64 and flat[path].dtype == jnp.float32
    layer, kind = path.rsplit("/", 2)[-2:]
    if kind == "bias":
      np.testing.assert_array_equal(leaf, 0.0, err_msg=path)
    elif kind == "scale":
      np.testing.assert_array_equal(leaf, 1.0, err_msg=path)
    else:
      # variance_scaling(scale, 'fan_avg', 'uniform'): U(±√(3·scale/fan_avg)), scale 1e-10 for the near-zero layers.
      limit = _glorot_limit(leaf.shape, 1e-10 if layer in NEAR_ZERO else 1.0)
      assert np.abs(leaf).max() <= limit * (1 + 1e-6), path
      assert np.abs(leaf).max() > 0.9 * limit, path
      np.testing.assert_allclose(leaf.std(), limit / math.sqrt(3), rtol=0.15, err_msg=path)


def test_initial_output_is_near_zero():
  model, params, x, t = _tiny()
  out = _apply_fn(jnp.float32, False)(params, x, t, _key(0))
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
  # conv_out's weights are U(±1.4e-6), so with O(1) activations over 288 inputs |out| ~ 1e-5.
  assert np.abs(out).max() < 1e-4
  # The same network with a normally initialised conv_out gives O(0.1..1) outputs.
  params = dict(params, conv_out=_randomize(params["conv_out"], 7))
  out = _apply_fn(jnp.float32, False)(params, x, t, _key(0))
  assert np.abs(out).max() > 0.1


def test_timestep_changes_output():
  _, params, x, _ = _tiny()
  params = _randomize(params, 8)
  fn = _apply_fn(jnp.float32, False)
  out_a = fn(params, x, jnp.array([0, 999], jnp.int32), _key(0))
  out_b = fn(params, x, jnp.array([999, 0], jnp.int32), _key(0))
  assert np.abs(np.asarray(out_a) - np.asarray(out_b)).max() > 1e-2
  # Examples are independent: swapping both inputs and timesteps swaps the outputs.
  out_c = fn(params, x[::-1], jnp.array([999, 0], jnp.int32), _key(0))
  np.testing.assert_allclose(out_c, out_a[::-1], rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  _, params, x, t = _tiny()
  params = _randomize(params, 8)
  eval_out = _apply_fn(jnp.float32, False)(params, x, t, _key(0))
  np.testing.assert_array_equal(eval_out, _apply_fn(jnp.float32, False)(params, x, t, _key(1)))
  train = _apply_fn(jnp.float32, True)
  a, b, c = (train(params, x, t, _key(k)) for k in (0, 1, 0))
  np.testing.assert_array_equal(a, c)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  assert np.abs(np.asarray(a) - np.asarray(eval_out)).max() > 1e-3


def test_bfloat16_activations():
  model, params, x, t = _tiny()
  bf16_model = unet.UNet(dtype=jnp.bfloat16, **TINY)
  # Parameters stay float32 with bf16 activations.
  shapes = _init_shapes(bf16_model, 8)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  # Normal weights everywhere (conv2, proj_out and conv_out included) so the output is O(1).
  params = _randomize(params, 8)
  ref = np.asarray(_apply_fn(jnp.float32, False)(params, x, t, _key(0)), np.float64)
  got = _apply_fn(jnp.bfloat16, False)(params, x, t, _key(0))
  assert got.dtype == jnp.float32
  got = np.asarray(got, np.float64)
  assert np.abs(ref).max() > 0.3
  # bf16 keeps 8 mantissa bits (relative 4e-3 per rounding) through ~15 layers: a few percent in norm.
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 0.05, rel
  assert rel > 1e-4  # the activations really were bf16
