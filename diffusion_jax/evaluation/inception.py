"""The FID Inception-v3 network in flax.linen, with safe loading of its PyTorch weights.

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

Weights are read from a local `.pth` (or the `.npz` this module writes), or
downloaded once into `~/.cache/diffusion_jax/` with the sha256 prefix in the
file name verified. `.pth` files are parsed by a restricted unpickler that
accepts only the globals torch uses to rebuild tensors and storages; torch is
never imported and no arbitrary code from the file can run.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import pathlib
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from diffusion_jax import errors

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_NPZ_FILENAME = "pt_inception-2015-12-05-6726825d.npz"

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


# ----------------------------------------------------------------------------
# Safe reading of PyTorch checkpoints (no torch, no arbitrary globals).
# ----------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError, errors.UserError):
  """A checkpoint's pickle references something other than tensors and storages."""


_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "UntypedStorage": np.dtype(np.uint8),
}


class _StorageType:
  """Stands in for `torch.FloatStorage` & co.: only carries a dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype


class _Storage:
  """A storage named in the pickle; its bytes are attached once read."""

  __slots__ = ("key", "dtype", "numel", "array")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.array: np.ndarray | None = None


class _LazyTensor:
  """A tensor view of a storage, materialized after all storages are read."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a storage.")
    if not (isinstance(offset, int) and all(isinstance(v, int) for v in (*size, *stride)) and len(size) == len(stride)):
      raise UnsafeCheckpointError(f"malformed tensor metadata: offset={offset!r} size={size!r} stride={stride!r}.")
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
      raise UnsafeCheckpointError(f"negative tensor metadata: offset={offset} size={size} stride={stride}.")
    if 0 not in size:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= storage.numel:
        raise UnsafeCheckpointError(
          f"tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) overruns its storage of "
          f"{storage.numel} elements."
        )
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    data = self.storage.array
    if data is None:
      raise pickle.UnpicklingError(f"storage {self.storage.key!r} has no data in the file.")
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      data[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False
    )
    return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  if not isinstance(data, _LazyTensor):
    raise UnsafeCheckpointError(f"parameter rebuilt from {type(data).__name__}, expected a tensor.")
  return data


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the whitelisted globals and torch's storage ids."""

  def __init__(self, file, *, source: str, storage_factory=None):
    super().__init__(file, encoding="utf-8")
    self._source = source
    self._storage_factory = storage_factory

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load {self._source}: its pickle references the global '{module}.{name}', which is not a "
        "tensor or storage. Only plain state_dicts of tensors can be read safely; re-save the weights with "
        "`torch.save(model.state_dict(), path)` from a trusted source."
      ) from None

  def persistent_load(self, pid):
    if self._storage_factory is None:
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id outside the tensor pickle.")
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r:.80}.")
    return self._storage_factory(pid[1:])


def _resolve(obj):
  """Replaces lazy tensors with arrays in nested dicts/lists/tuples."""
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def _storage_from_pid(data, storages: dict, source: str, *, legacy: bool) -> _Storage:
  if legacy:
    if len(data) != 5:
      raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
    storage_type, key, _, numel, view_metadata = data
    if view_metadata is not None:
      raise pickle.UnpicklingError(f"{source}: storage views of the legacy format are not supported.")
  else:
    if len(data) != 4:
      raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
    storage_type, key, _, numel = data
  if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
    raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
  key = key.decode("ascii") if isinstance(key, bytes) else str(key)
  if key in storages:
    return storages[key]
  storage = _Storage(key, storage_type.dtype, numel)
  storages[key] = storage
  return storage


def _load_zip(path: pathlib.Path, source: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise pickle.UnpicklingError(f"{source}: a PyTorch zip checkpoint has one data.pkl, found {pkl or 'none'}.")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
    storages: dict[str, _Storage] = {}
    factory = lambda data: _storage_from_pid(data, storages, source, legacy=False)  # noqa: E731
    with zf.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(f, source=source, storage_factory=factory).load()
    for key, storage in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise pickle.UnpicklingError(f"{source}: storage record {record!r} is missing.")
      raw = zf.read(record)
      storage.array = _storage_array(raw, storage, byteorder == "little", source)
  return obj


def _storage_array(raw: bytes, storage: _Storage, little_endian: bool, source: str) -> np.ndarray:
  nbytes = storage.numel * storage.dtype.itemsize
  if len(raw) < nbytes:
    raise pickle.UnpicklingError(f"{source}: storage {storage.key!r} holds {len(raw)} bytes, expected {nbytes}.")
  dtype = storage.dtype.newbyteorder("<" if little_endian else ">") if storage.dtype.itemsize > 1 else storage.dtype
  return np.frombuffer(raw[:nbytes], dtype=dtype).astype(storage.dtype)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: pathlib.Path, source: str):
  with open(path, "rb") as f:
    load = lambda: _RestrictedUnpickler(f, source=source).load()  # noqa: E731
    if load() != _LEGACY_MAGIC:
      raise pickle.UnpicklingError(f"{source} is neither a PyTorch zip checkpoint nor a legacy torch.save file.")
    if (version := load()) != _LEGACY_PROTOCOL:
      raise pickle.UnpicklingError(f"{source}: unsupported legacy protocol version {version}.")
    sys_info = load()
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    factory = lambda data: _storage_from_pid(data, storages, source, legacy=True)  # noqa: E731
    obj = _RestrictedUnpickler(f, source=source, storage_factory=factory).load()
    keys = load()
    if not isinstance(keys, list):
      raise pickle.UnpicklingError(f"{source}: malformed storage key list.")
    for key in keys:
      if key not in storages:
        raise pickle.UnpicklingError(f"{source}: storage {key!r} listed but never referenced.")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise pickle.UnpicklingError(f"{source}: truncated file.")
      numel = struct.unpack("<q" if little_endian else ">q", header)[0]
      if numel != storage.numel:
        raise pickle.UnpicklingError(f"{source}: storage {key!r} has {numel} elements, expected {storage.numel}.")
      raw = f.read(numel * storage.dtype.itemsize)
      storage.array = _storage_array(raw, storage, little_endian, source)
  return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file of tensors without torch and without running arbitrary code.

  Both the zip format (torch ≥ 1.6) and the legacy format are supported.
  The pickle may reference only `collections.OrderedDict`, torch's tensor
  rebuild functions and the typed storage classes; anything else raises
  `UnsafeCheckpointError` before it is resolved.

  Args:
    path: the `.pth`/`.pt` file.

  Returns:
    The saved object with every tensor replaced by a NumPy array (a state_dict
    becomes an `OrderedDict[str, np.ndarray]`).
  """
  path = pathlib.Path(path)
  source = str(path)
  if zipfile.is_zipfile(path):
    obj = _load_zip(path, source)
  else:
    if tarfile.is_tarfile(path):
      raise pickle.UnpicklingError(f"{source}: the pre-1.0 tar format of torch.save is not supported.")
    obj = _load_legacy(path, source)
  return _resolve(obj)


# ----------------------------------------------------------------------------
# state_dict ↔ Flax parameters.
# ----------------------------------------------------------------------------

_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> Params:
  """Maps pytorch-fid's Inception state_dict onto the Flax parameter tree.

  Conv weights OIHW → HWIO, fc weight [out, in] → [in, out], BatchNorm
  weight/bias/running_mean/running_var → scale/bias/mean/var;
  `num_batches_tracked` is dropped.

  Raises:
    ValueError: keys missing, unexpected or of the wrong shape (e.g. the
      torchvision ImageNet Inception, which has AuxLogits and 1000 classes).
  """
  flat = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if len(parts) >= 2 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
      flat[(*parts[:-1], "kernel")] = value.transpose(2, 3, 1, 0)
    elif len(parts) >= 2 and parts[-2] == "bn" and parts[-1] in _BN_LEAVES:
      flat[(*parts[:-1], _BN_LEAVES[parts[-1]])] = value
    elif parts == ["fc", "weight"] and value.ndim == 2:
      flat[("fc", "kernel")] = value.T
    elif parts == ["fc", "bias"]:
      flat[("fc", "bias")] = value
    else:
      flat[tuple(parts)] = value
  return _check_params(flat, "state_dict")


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(param_shapes()).items()}


def _check_params(flat: Mapping[tuple[str, ...], np.ndarray], source: str) -> Params:
  expected = _expected_shapes()
  missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
  unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
  wrong = sorted(
    f"{'/'.join(k)}: {np.shape(flat[k])} vs {expected[k]}"
    for k in expected.keys() & flat.keys()
    if np.shape(flat[k]) != expected[k]
  )
  if missing or unexpected or wrong:
    show = lambda xs: ", ".join(xs[:5]) + (f" … ({len(xs)} in all)" if len(xs) > 5 else "")  # noqa: E731
    raise errors.UserError(
      f"{source} is not the FID Inception (pytorch-fid's pt_inception-2015-12-05): "
      + "; ".join(
        s
        for s in (
          missing and f"missing {show(missing)}",
          unexpected and f"unexpected {show(unexpected)}",
          wrong and f"wrong shapes {show(wrong)}",
        )
        if s
      )
    )
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def save_params_npz(params: Params, path: str | os.PathLike) -> None:
  """Writes the parameters to `.npz` ('/'-joined keys), atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def load_params_npz(path: str | os.PathLike) -> Params:
  """Reads parameters written by `save_params_npz` (no pickle allowed)."""
  with np.load(path, allow_pickle=False) as data:
    flat = {tuple(k.split("/")): data[k] for k in data.files}
  return _check_params(flat, str(path))


# ----------------------------------------------------------------------------
# Finding, downloading and verifying the weights.
# ----------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
  """`$DIFFUSION_JAX_CACHE` or `~/.cache/diffusion_jax`."""
  return pathlib.Path(os.environ.get("DIFFUSION_JAX_CACHE", pathlib.Path.home() / ".cache" / "diffusion_jax"))


def sha256_of(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_checksum(path: str | os.PathLike, sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX) -> None:
  """Raises ValueError unless the file's sha256 starts with `sha256_prefix`."""
  digest = sha256_of(path)
  if not digest.startswith(sha256_prefix):
    raise errors.UserError(
      f"{path}: sha256 {digest} does not start with {sha256_prefix}; the file is corrupt or not the FID "
      f"Inception weights. Delete it and download {FID_WEIGHTS_URL} again."
    )


def download_weights(dest: str | os.PathLike, url: str = FID_WEIGHTS_URL, *, sha256_prefix=FID_WEIGHTS_SHA256_PREFIX):
  """Downloads `url` to `dest` (atomically), verifying the sha256 prefix."""
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
  try:
    h = hashlib.sha256()
    try:
      response = urllib.request.urlopen(url, timeout=60)
    except OSError as e:  # URLError, timeouts, DNS: offline or blocked
      raise errors.UserError(
        f"Could not download the FID Inception weights from {url} ({getattr(e, 'reason', e)}). On a machine "
        f"without internet access, download the file elsewhere and copy it to {dest} (or to torch hub's "
        "checkpoints folder), or pass its path with --config.eval.inception_weights=<path>."
      ) from None
    with os.fdopen(fd, "wb") as f, response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        h.update(chunk)
        f.write(chunk)
    if not h.hexdigest().startswith(sha256_prefix):
      raise errors.UserError(f"downloaded {url} has sha256 {h.hexdigest()}, expected the prefix {sha256_prefix}.")
    os.replace(tmp, dest)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return dest


def _read_weights(path: pathlib.Path):
  """`load_torch_checkpoint(path)`, with files that are not torch checkpoints reported by name."""
  try:
    return load_torch_checkpoint(path)
  except UnsafeCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, struct.error, zipfile.BadZipFile) as e:
    raise errors.UserError(
      f"{path} is not a PyTorch checkpoint of the FID Inception weights ({type(e).__name__}: {e}). Pass "
      f"pytorch-fid's {FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}) or a .npz written by this package."
    ) from None


def load_params(
  path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Params:
  """The FID Inception parameters.

  Args:
    path: a `.pth` state_dict (read with `load_torch_checkpoint`) or a `.npz`
      from `save_params_npz`. None: use the cached weights — the converted
      `.npz` in `cache_dir`, else pytorch-fid's `.pth` there or in torch hub's
      cache (checksum verified, converted and cached as `.npz`), else download.
    cache_dir: defaults to `default_cache_dir()`.
    download: allow downloading `FID_WEIGHTS_URL` when nothing is cached.

  Returns:
    The parameter tree (NumPy float32 leaves).
  """
  if path is not None:
    path = pathlib.Path(path)
    if not path.is_file():
      raise errors.UserError(
        f"FID Inception weights {path} do not exist: pass pytorch-fid's {FID_WEIGHTS_FILENAME} "
        f"or a .npz written by this package (downloaded from {FID_WEIGHTS_URL})."
      )
    if path.suffix == ".npz":
      return load_params_npz(path)
    return params_from_state_dict(_read_weights(path))

  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  npz = cache_dir / FID_WEIGHTS_NPZ_FILENAME
  if npz.exists():
    return load_params_npz(npz)
  torch_hub = pathlib.Path(os.environ.get("TORCH_HOME", pathlib.Path.home() / ".cache" / "torch"))
  candidates = [cache_dir / FID_WEIGHTS_FILENAME, torch_hub / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME]
  pth = next((c for c in candidates if c.exists()), None)
  if pth is None:
    if not download:
      raise errors.MissingFileError(
        f"FID Inception weights not found in {candidates[0]} or {candidates[1]}. Download {FID_WEIGHTS_URL} "
        "to one of them, pass its path, or allow downloading."
      )
    pth = download_weights(candidates[0])
  verify_checksum(pth)
  params = params_from_state_dict(_read_weights(pth))
  save_params_npz(params, npz)
  return params


def count_params(params: Params, *, include_bn_statistics: bool = False) -> int:
  """Number of parameters; without BN mean/var it matches torch's `parameters()` count."""
  flat = traverse_util.flatten_dict(params)
  return sum(
    int(np.prod(v.shape))
    for k, v in flat.items()
    if include_bn_statistics or not (k[-2] == "bn" and k[-1] in ("mean", "var"))
  )


__all__: Sequence[str] = (
  "FID_WEIGHTS_URL",
  "InceptionV3",
  "UnsafeCheckpointError",
  "count_params",
  "download_weights",
  "init_params",
  "load_params",
  "load_params_npz",
  "load_torch_checkpoint",
  "param_shapes",
  "params_from_state_dict",
  "preprocess",
  "resize_bilinear",
  "save_params_npz",
  "verify_checksum",
)
