"""The FID Inception-v3 network in flax.linen.

This is the network behind pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(the TensorFlow `inception-2015-12-05` graph used by TTUR's FID and OpenAI's
Inception Score, ported to PyTorch), layer for layer, quirks included:

  * torchvision's Inception3 stem and Mixed blocks, BatchNorm ε = 1e-3, no aux
    classifier, a 1008-way `fc` (the TF graph's 1008 classes);
  * pytorch-fid's `FIDInceptionA/C/E_1` blocks: the 3×3 average pool of the
    pool branch does not count the zero padding (`count_include_pad=False`);
  * `FIDInceptionE_2` (Mixed_7c): a 3×3 *max* pool in the pool branch.

Input handling follows pytorch-fid: uint8 images (or floats in [0, 255]) are
scaled to [0, 1], bilinearly resized to 299×299 as
`F.interpolate(mode='bilinear', align_corners=False)` does (no antialiasing),
then mapped to [-1, 1]. Grayscale images are repeated to three channels. The
outputs are the pool3 features [B, 2048] (FID) and the 1008 logits (IS).

Logits: by default they are `pool3 @ fc.kernel` *without* the fc bias. That is
what OpenAI's Inception Score code computes (it multiplies pool_3 by the
weight of `softmax/logits/MatMul`, skipping the bias), and what torch-fidelity
and torchmetrics call `logits_unbiased` and use for IS. `logits_with_bias=True`
gives the graph's `logits` output instead.

The parameter tree mirrors pytorch-fid's state_dict, so loading is a rename:
`Conv2d_1a_3x3/conv/kernel` (HWIO), `Mixed_5b/branch1x1/bn/{scale,bias,mean,var}`,
…, `fc/{kernel,bias}` (kernel [2048, 1008]). The BatchNorm statistics are
ordinary parameters: the network only ever runs in inference mode.

The weights are found, downloaded, verified and read by `inception_weights`
(`inception_weights.load_params()`); `.pth` files are parsed there by the
restricted unpickler of `torch_checkpoint`, which runs no code from the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import errors

INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3

# Parameters of pytorch-fid's model counted as torch does (conv, BN affine, fc;
# BN running statistics are buffers, not parameters).
TORCH_PARAMETER_COUNT = 23_850_960

Array = jax.Array
Params = Mapping[str, Any]
PrecisionLike = Any


# ----------------------------------------------------------------------------
# Input handling.
# ----------------------------------------------------------------------------


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize of [B, H, W, C] floats to [B, size[0], size[1], C].

  `jax.image.resize` without antialiasing: half-pixel centres and edge
  clamping, as `torch.nn.functional.interpolate(mode='bilinear',
  align_corners=False, antialias=False)` (pytorch-fid's resize) for up- and
  downsampling (equal to float32 rounding; tests/fid_test.py).
  """
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  return jax.image.resize(x, (b, int(size[0]), int(size[1]), c), method="bilinear", antialias=False)


def preprocess(images: Array, *, resize: bool = True) -> Array:
  """Images as pytorch-fid feeds them to the network.

  Args:
    images: [B, H, W, C] with C in {1, 3}, uint8 or floats in [0, 255].
    resize: resize to 299×299 (pytorch-fid's `resize_input`).

  Returns:
    [B, 299, 299, 3] float32 in [-1, 1] (spatial size unchanged if not `resize`).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.UserError(f"Inception expects images [B, H, W, 1 or 3] (NHWC), got shape {images.shape}.")
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize:
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
  return 2.0 * x - 1.0


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


def _pad(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm: (x − mean)/√(var + ε)·scale + bias, statistics as parameters."""

  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    shape = (1,) * (x.ndim - 1) + (c,)
    inv = (scale * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
    return (x - mean.reshape(shape)) * inv + bias.reshape(shape)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) → BatchNorm(ε=1e-3) → ReLU."""

  features: int
  kernel_size: int | tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    x = nn.Conv(
      self.features,
      k,
      strides=(self.strides, self.strides),
      padding=_pad(self.padding),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x: Array) -> Array:
  """3×3/1 average pool, padding 1, not counting the padding (TF's behaviour)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA). Output channels 224 + pool_features."""

  pool_features: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, name, **kw: BasicConv2d(f, k, precision=self.precision, name=name, **kw)  # noqa: E731
    b1 = conv(64, 1, "branch1x1")(x)
    b5 = conv(48, 1, "branch5x5_1")(x)
    b5 = conv(64, 5, "branch5x5_2", padding=2)(b5)
    b3 = conv(64, 1, "branch3x3dbl_1")(x)
    b3 = conv(96, 3, "branch3x3dbl_2", padding=1)(b3)
    b3 = conv(96, 3, "branch3x3dbl_3", padding=1)(b3)
    bp = conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's InceptionB): 35×35 → 17×17, 288 → 768 channels."""

  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, name, **kw: BasicConv2d(f, k, precision=self.precision, name=name, **kw)  # noqa: E731
    b3 = conv(384, 3, "branch3x3", strides=2)(x)
    bd = conv(64, 1, "branch3x3dbl_1")(x)
    bd = conv(96, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = conv(96, 3, "branch3x3dbl_3", strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC). 768 → 768 channels."""

  channels_7x7: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, name, **kw: BasicConv2d(f, k, precision=self.precision, name=name, **kw)  # noqa: E731
    c7 = self.channels_7x7
    b1 = conv(192, 1, "branch1x1")(x)
    b7 = conv(c7, 1, "branch7x7_1")(x)
    b7 = conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
    b7 = conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
    bd = conv(c7, 1, "branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
    bd = conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
    bd = conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
    bd = conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
    bp = conv(192, 1, "branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's InceptionD): 17×17 → 8×8, 768 → 1280 channels."""

  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, name, **kw: BasicConv2d(f, k, precision=self.precision, name=name, **kw)  # noqa: E731
    b3 = conv(192, 1, "branch3x3_1")(x)
    b3 = conv(320, 3, "branch3x3_2", strides=2)(b3)
    b7 = conv(192, 1, "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
    b7 = conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
    b7 = conv(192, 3, "branch7x7x3_4", strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool). → 2048 channels."""

  pool: str = "avg"
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, name, **kw: BasicConv2d(f, k, precision=self.precision, name=name, **kw)  # noqa: E731
    b1 = conv(320, 1, "branch1x1")(x)
    b3 = conv(384, 1, "branch3x3_1")(x)
    b3 = jnp.concatenate(
      [conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3), conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)],
      axis=-1,
    )
    bd = conv(448, 1, "branch3x3dbl_1")(x)
    bd = conv(384, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
        conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise errors.UserError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = conv(192, 1, "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The 2048 → 1008 `fc` layer; its bias is applied only if `use_bias`."""

  features: int = NUM_LOGITS
  use_bias: bool = False
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.dot(x, kernel, precision=self.precision)
    if self.use_bias:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3 (`fid_inception_v3()` + its input handling).

  Attributes:
    resize_input: resize to 299×299 first (pytorch-fid's default). Turn off
      only for inputs that are already 299×299 or for shape-only uses.
    logits_with_bias: add the fc bias to the logits (the graph's `logits`);
      off by default, giving OpenAI's IS logits (see the module docstring).
    precision: matmul/conv precision. HIGHEST by default, so that TPUs and
      TF32-capable GPUs compute the features in full float32 (FID is
      sensitive to small feature perturbations).
  """

  resize_input: bool = True
  logits_with_bias: bool = False
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    """Pool3 features and logits.

    Args:
      images: [B, H, W, C], C in {1, 3}, uint8 or floats in [0, 255].

    Returns:
      (pool [B, 2048] float32, logits [B, 1008] float32).
    """
    p = self.precision
    x = preprocess(images, resize=self.resize_input)
    x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)  # 149²
    x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)  # 147²
    x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # 73²
    x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)  # 71²
    x = _max_pool_3x3_s2(x)  # 35²
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 288
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17², 768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8², 1280
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # 2048
    pool = jnp.mean(x, axis=(1, 2))
    logits = Logits(use_bias=self.logits_with_bias, precision=p, name="fc")(pool)
    return pool, logits


def init_params(rng: Array) -> Params:
  """Random parameters with the FID Inception's tree (for tests and shape checks)."""
  # Parameters do not depend on the spatial size; 75² is the smallest valid input.
  model = InceptionV3(resize_input=False)
  return jax.jit(model.init)(rng, jnp.zeros((1, 75, 75, 3), jnp.uint8))["params"]


def param_shapes() -> Params:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without computing anything."""
  model = InceptionV3(resize_input=False)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.uint8))["params"]


def count_params(params: Params, *, include_bn_statistics: bool = False) -> int:
  """Number of parameters; without BN mean/var it matches torch's `parameters()` count."""
  flat = traverse_util.flatten_dict(params)
  return sum(
    int(np.prod(v.shape))
    for k, v in flat.items()
    if include_bn_statistics or not (k[-2] == "bn" and k[-1] in ("mean", "var"))
  )


__all__: Sequence[str] = (
  "InceptionV3",
  "Logits",
  "count_params",
  "init_params",
  "param_shapes",
  "preprocess",
  "resize_bilinear",
)
