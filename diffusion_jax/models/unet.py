"""The DDPM U-Net (Ho et al. 2020, `diffusion_tf/models/unet.py`) in flax.linen.

Layer for layer the reference network: swish everywhere, GroupNorm(32, ε=1e-6),
a sinusoidal timestep embedding (sin first, frequencies exp(−ln(10⁴)·j/(half−1)))
fed through dense → swish → dense, residual blocks that add the projected
embedding after their first convolution, single-head self-attention at chosen
resolutions, stride-2 'SAME' convolutions to downsample and nearest-neighbour
×2 + conv to upsample.

The parameter tree mirrors the original TensorFlow variable scopes
(`temb/dense0`, `down_1/block_0/conv1`, `mid/attn_1/q`, `up_3/upsample/conv`,
`norm_out`, `conv_out`, …), so converting the released checkpoints is a
rename. Convolution kernels are HWIO and dense kernels [in, out], as in TF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import errors

GROUPS = 32
NORM_EPS = 1e-6


def default_init(scale: float = 1.0):
  """fan_avg/uniform variance scaling, with scale 0 mapped to 1e-10 as in the reference code."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


INIT_SCHEMES = ("ddpm", "pytorch")


def pytorch_init(rng: jax.Array, params: Any) -> Any:
  """`params` redrawn as PyTorch's defaults would draw them for the same layers (diffusers' UNet2DModel at start).

  Every convolution and dense kernel, and its bias, from U(−1/√fan_in, 1/√fan_in),
  fan_in being the kernel's input size (H·W·C_in for a convolution, C_in for a
  dense layer): `nn.Conv2d` and `nn.Linear`'s `reset_parameters`. Embeddings
  from N(0, 1) (`nn.Embedding`); GroupNorm keeps scale 1 and offset 0. No layer
  starts at zero, unlike the paper's initialisation (`default_init`), whose
  residual branches, attention outputs and last convolution start at 1e-10.
  The tree's structure, shapes and dtypes are unchanged.
  """
  flat = flax.traverse_util.flatten_dict(params)
  keys = dict(zip(sorted(flat), jax.random.split(rng, len(flat))))
  out = {}
  for path, value in flat.items():
    kind, key = path[-1], keys[path]
    if kind == "embedding":
      out[path] = jax.random.normal(key, value.shape, value.dtype)
    elif kind in ("kernel", "bias") and path[:-1] + ("kernel",) in flat:
      kernel = flat[path[:-1] + ("kernel",)]
      bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
      out[path] = jax.random.uniform(key, value.shape, value.dtype, -bound, bound)
    else:
      out[path] = value
  return flax.traverse_util.unflatten_dict(out)


def get_timestep_embedding(timesteps, embedding_dim: int):
  """Sinusoidal embedding [B, embedding_dim] of integer timesteps [B], computed in float32.

  Frequencies are exp(−ln(10000)·j/(half−1)), j = 0..half−1; sin comes first.
  """
  if timesteps.ndim != 1:
    raise errors.UserError(f"timesteps must have shape [B], got {timesteps.shape}.")
  half = embedding_dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _norm(name: str, dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=GROUPS, epsilon=NORM_EPS, dtype=dtype, name=name)


def _conv(features: int, name: str, dtype, *, scale: float = 1.0, stride: int = 1) -> nn.Conv:
  return nn.Conv(
    features, (3, 3), strides=(stride, stride), padding="SAME", kernel_init=default_init(scale), dtype=dtype, name=name
  )


def _dense(features: int, name: str, dtype, *, scale: float = 1.0) -> nn.Dense:
  return nn.Dense(features, kernel_init=default_init(scale), dtype=dtype, name=name)


class TimestepEmbedding(nn.Module):
  """temb/dense0 → swish → temb/dense1 (no activation after dense1)."""

  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    temb = get_timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, "dense0", self.dtype)(temb)
    return _dense(4 * self.ch, "dense1", self.dtype)(nn.swish(temb))


class ResnetBlock(nn.Module):
  out_ch: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, *, train: bool):
    h = _conv(self.out_ch, "conv1", self.dtype)(nn.swish(_norm("norm1", self.dtype)(x)))
    h = h + _dense(self.out_ch, "temb_proj", self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", self.dtype, scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, "nin_shortcut", self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H·W positions, head dimension C."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _norm("norm", self.dtype)(x)
    q = _dense(c, "q", self.dtype)(h).reshape(b, hgt * wid, 1, c)
    k = _dense(c, "k", self.dtype)(h).reshape(b, hgt * wid, 1, c)
    v = _dense(c, "v", self.dtype)(h).reshape(b, hgt * wid, 1, c)
    # Softmax(q·k / √C) over all keys; XLA or cuDNN picks the kernel.
    h = jax.nn.dot_product_attention(q, k, v).reshape(b, hgt, wid, c)
    return x + _dense(c, "proj_out", self.dtype, scale=0.0)(h)


class Downsample(nn.Module):
  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      # 'SAME' with stride 2 pads 0 top/left and 1 bottom/right, as TF does.
      return _conv(x.shape[-1], "conv", self.dtype, stride=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Upsample(nn.Module):
  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Nearest-neighbour ×2 (align_corners resize at exactly 2× is pixel repetition).
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv(x.shape[-1], "conv", self.dtype)(x)
    return x


class DownLevel(nn.Module):
  """`down_{i}`: residual blocks (+attention), then a downsample unless last."""

  out_ch: int
  num_res_blocks: int
  use_attn: bool
  downsample: bool
  dropout: float
  resamp_with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, train: bool):  # train positional: nn.remat takes it as a static argument
    hs = []
    for j in range(self.num_res_blocks):
      h = ResnetBlock(self.out_ch, self.dropout, self.dtype, name=f"block_{j}")(h, temb, train=train)
      if self.use_attn:
        h = AttnBlock(self.dtype, name=f"attn_{j}")(h)
      hs.append(h)
    if self.downsample:
      h = Downsample(self.resamp_with_conv, self.dtype, name="downsample")(h)
      hs.append(h)
    return hs


class MidBlock(nn.Module):
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, *, train: bool):
    c = h.shape[-1]
    h = ResnetBlock(c, self.dropout, self.dtype, name="block_1")(h, temb, train=train)
    h = AttnBlock(self.dtype, name="attn_1")(h)
    return ResnetBlock(c, self.dropout, self.dtype, name="block_2")(h, temb, train=train)


class UpLevel(nn.Module):
  """`up_{i}`: num_res_blocks + 1 blocks on [h, skip] (+attention), then an upsample unless level 0."""

  out_ch: int
  num_res_blocks: int
  use_attn: bool
  upsample: bool
  dropout: float
  resamp_with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skips, temb, train: bool):  # train positional: nn.remat takes it as a static argument
    for j in range(self.num_res_blocks + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = ResnetBlock(self.out_ch, self.dropout, self.dtype, name=f"block_{j}")(h, temb, train=train)
      if self.use_attn:
        h = AttnBlock(self.dtype, name=f"attn_{j}")(h)
    if self.upsample:
      h = Upsample(self.resamp_with_conv, self.dtype, name="upsample")(h)
    return h


class UNet(nn.Module):
  """The DDPM U-Net.

  Attributes:
    ch: base channel count (128 in the paper); every ch·mult must be a multiple of 32.
    out_ch: output channels: C, or 2C for a learned variance.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: spatial sizes (height) at which attention follows each block.
    dropout: dropout rate inside the residual blocks (active when `train=True`).
    resamp_with_conv: convolutions in the down/upsampling layers.
    dtype: activation dtype (e.g. jnp.bfloat16); parameters stay float32 and
      the output is returned in float32.
    remat: rematerialise each residual block in the backward pass (saves memory
      on the 256² models at the cost of recomputation).
    num_classes: 0 (the paper: unconditional) or the number of classes K of a
      class-conditional network. A learned embedding `class_embed` of K + 1
      rows (row K is the null class used for classifier-free guidance) is
      added to the timestep embedding, as ADM and diffusers' UNet2DModel
      (`num_class_embeds`) do. Labels are ignored when num_classes is 0.
  """

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  num_classes: int = 0

  @property
  def null_label(self) -> int:
    """The label of the null class (unconditional passes of a conditional network)."""
    return self.num_classes

  def check_input(self, x) -> None:
    """Raises ValueError if x [B, H, W, C] cannot go through this network."""
    num_levels = len(self.ch_mult)
    if num_levels < 1 or any(int(m) < 1 for m in self.ch_mult):
      raise errors.UserError(f"ch_mult must be a non-empty sequence of positive integers, got {tuple(self.ch_mult)}.")
    bad = [c for c in dict.fromkeys([self.ch] + [self.ch * m for m in self.ch_mult]) if c % GROUPS]
    if bad:
      raise errors.UserError(
        f"GroupNorm uses {GROUPS} groups, so every level's channel count ch*mult must be a multiple of {GROUPS}; "
        f"ch={self.ch} with ch_mult={tuple(self.ch_mult)} gives {bad}. Use a ch that is a multiple of {GROUPS}."
      )
    if x.ndim != 4:
      raise errors.UserError(f"x must be [B, H, W, C], got shape {x.shape}.")
    _, hgt, wid, _ = x.shape
    factor = 2 ** (num_levels - 1)
    if hgt % factor or wid % factor:
      raise errors.UserError(
        f"Image size {hgt}x{wid} must be divisible by 2^(levels-1) = {factor} for ch_mult={tuple(self.ch_mult)} "
        f"({num_levels} levels); resize the images or use fewer levels."
      )
    resolutions = [hgt // 2**i for i in range(num_levels)]
    missing = [r for r in self.attn_resolutions if r not in resolutions]
    if missing:
      raise errors.UserError(
        f"attn_resolutions {tuple(self.attn_resolutions)} contains {missing}, which never occur(s) for "
        f"{hgt}x{wid} inputs with {num_levels} levels (resolutions: {resolutions})."
      )

  @nn.compact
  def __call__(self, x, t, *, train: bool, y=None):
    """Predicts the model output for noisy images x [B, H, W, C] at integer timesteps t [B].

    `y` [B] holds int class labels in [0, num_classes] (num_classes = the null
    class) for a conditional network; None there means the null class.
    """
    self.check_input(x)
    if t.shape != (x.shape[0],):
      raise errors.UserError(f"t must have shape [B] = [{x.shape[0]}], got {t.shape}.")
    if self.num_classes and y is not None and y.shape != (x.shape[0],):
      raise errors.UserError(f"y must have shape [B] = [{x.shape[0]}] (one class label per image), got {y.shape}.")
    num_levels = len(self.ch_mult)
    # Rematerialisation wraps whole levels, which keeps the parameter names unchanged.
    down_cls = nn.remat(DownLevel, static_argnums=(3,)) if self.remat else DownLevel
    up_cls = nn.remat(UpLevel, static_argnums=(4,)) if self.remat else UpLevel

    temb = TimestepEmbedding(self.ch, self.dtype, name="temb")(t)
    if self.num_classes:
      if y is None:
        y = jnp.full((x.shape[0],), self.null_label, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype, name="class_embed")(y)
    h = _conv(self.ch, "conv_in", self.dtype)(x.astype(self.dtype))
    hs = [h]
    for i, mult in enumerate(self.ch_mult):
      level = down_cls(
        out_ch=self.ch * mult,
        num_res_blocks=self.num_res_blocks,
        use_attn=h.shape[1] in self.attn_resolutions,
        downsample=i != num_levels - 1,
        dropout=self.dropout,
        resamp_with_conv=self.resamp_with_conv,
        dtype=self.dtype,
        name=f"down_{i}",
      )
      outs = level(h, temb, train) if self.remat else level(h, temb, train=train)
      hs.extend(outs)
      h = hs[-1]

    h = MidBlock(self.dropout, self.dtype, name="mid")(h, temb, train=train)

    for i in reversed(range(num_levels)):
      level = up_cls(
        out_ch=self.ch * self.ch_mult[i],
        num_res_blocks=self.num_res_blocks,
        use_attn=h.shape[1] in self.attn_resolutions,
        upsample=i != 0,
        dropout=self.dropout,
        resamp_with_conv=self.resamp_with_conv,
        dtype=self.dtype,
        name=f"up_{i}",
      )
      n = self.num_res_blocks + 1
      skips, hs = hs[-n:], hs[:-n]
      h = level(h, skips, temb, train) if self.remat else level(h, skips, temb, train=train)
    assert not hs

    h = nn.swish(_norm("norm_out", self.dtype)(h))
    h = _conv(self.out_ch, "conv_out", self.dtype, scale=0.0)(h)
    return h.astype(jnp.float32)


def from_config(model_config, *, out_ch: int) -> UNet:
  """Builds the UNet from a config's `model` section; `out_ch` comes from the diffusion's variance type."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  dtype = model_config.get("dtype", "float32")
  if dtype not in dtypes:
    raise errors.UserError(f"Unknown model.dtype {dtype!r}; valid choices are {', '.join(dtypes)}.")
  return UNet(
    ch=model_config.ch,
    out_ch=out_ch,
    ch_mult=tuple(model_config.ch_mult),
    num_res_blocks=model_config.num_res_blocks,
    attn_resolutions=tuple(model_config.attn_resolutions),
    dropout=model_config.dropout,
    resamp_with_conv=model_config.resamp_with_conv,
    dtype=dtypes[dtype],
    remat=model_config.get("remat", False),
    num_classes=model_config.get("num_classes", 0),
  )
