r"""Import and export of pretrained DDPM weights.

Three formats, all for the paper's U-Net (models/unet.py):

* **tf**: the original TensorFlow 1 checkpoints released with the paper
  (`diffusion_cifar10_model/model.ckpt-790000`, LSUN bedroom/cat/church). The
  variables are `model/<scope>/W` and `/b` (convolutions HWIO, dense and 1x1
  "nin" layers [in, out]) and `model/<scope>/gamma`, `/beta` (GroupNorm), each
  with an exponential-moving-average copy `<name>/ExponentialMovingAverage`.
  The EMA copy is what the paper evaluated and is taken by default. Optimizer
  slots (`.../W/Adam`, `.../W/Adam_1`), `global_step` and `beta{1,2}_power`
  are ignored. Reading needs TensorFlow: pip install "diffusion_jax[tf]".
* **diffusers**: a folder with `config.json` and
  `diffusion_pytorch_model.safetensors` (or `.bin`) of a `UNet2DModel` with the
  DDPM architecture (google/ddpm-cifar10-32, google/ddpm-{celebahq,church,
  bedroom,cat}-256, google/ddpm-ema-*-256), or a pipeline folder whose `unet/`
  holds them. Other UNet2DModel architectures are refused with the config
  field that differs.
* **jax**: our own checkpoint directory (config.json + Orbax), as written by
  training or by the imports below.

Commands:

  # TF checkpoint -> our checkpoint directory (EMA weights; --raw for the raw ones)
  python -m diffusion_jax.convert tf2jax --checkpoint=/path/model.ckpt-790000 \
      --config=configs/cifar.py --out=/path/ddpm_cifar10
  # diffusers folder -> our checkpoint directory
  python -m diffusion_jax.convert diffusers2jax --folder=/path/ddpm-cifar10-32 \
      --config=configs/cifar.py --out=/path/ddpm_cifar10
  # our checkpoint (a workdir or a converted directory) -> diffusers folder
  python -m diffusion_jax.convert jax2diffusers --workdir=/path/run --out=/path/unet
  # TF checkpoint -> diffusers folder, without writing our format
  python -m diffusion_jax.convert tf2diffusers --checkpoint=/path/model.ckpt-790000 \
      --config=configs/cifar.py --out=/path/unet

The config chosen with --config (configs/cifar.py, configs/lsun_*.py,
configs/celebahq.py) must describe the checkpoint's network; every parameter
is checked against the U-Net built from it and mismatches are reported by
parameter path. Fields can be overridden as for training, e.g.
--config.model.dropout=0.0.

The library functions work on nested dicts of NumPy arrays:
`tf_checkpoint_to_params`, `diffusers_to_params`, `params_to_diffusers`,
`validate_params`, `infer_architecture`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

Params = dict[str, Any]

TF_INSTALL_HINT = 'pip install "diffusion_jax[tf]"'
TF_SCOPE = "model"
TF_EMA_SUFFIX = "ExponentialMovingAverage"
# TF leaf name -> (our leaf name). W/b of conv, dense and nin layers; gamma/beta of GroupNorm.
_TF_LEAVES = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}
_NORM_LAYERS = ("norm1", "norm2", "norm", "norm_out")

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"
_MAX_LISTED = 25


class ConversionError(ValueError):
  """A checkpoint that does not match the network it is converted to or from."""


# ----------------------------------------------------------------------------
# Parameter trees.
# ----------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
  tree: Params = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _fmt(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def _first_dim(tree: Mapping[str, Any], candidates) -> int | None:
  """The size of axis `axis` of the first leaf (layer, leaf, axis) present in `tree`."""
  for layer, leaf, axis in candidates:
    try:
      return int(np.shape(tree[layer][leaf])[axis])
    except (KeyError, IndexError, TypeError):
      pass
  return None


def _max_index(tree: Mapping[str, Any], prefix: str) -> int:
  """1 + the largest i of keys `{prefix}{i}` (0 if none)."""
  found = [int(k[len(prefix):]) for k in tree if re.fullmatch(re.escape(prefix) + r"\d+", k)]
  return max(found) + 1 if found else 0


_BLOCK_OUT = (("conv1", "kernel", 3), ("conv1", "bias", 0), ("conv2", "kernel", 3), ("conv2", "bias", 0),
              ("norm2", "scale", 0), ("norm2", "bias", 0), ("temb_proj", "kernel", 1), ("temb_proj", "bias", 0))


def infer_architecture(params: Mapping[str, Any]) -> dict[str, Any]:
  """Reads the U-Net's hyperparameters off a parameter tree (tolerating missing tensors).

  Args:
    params: our nested parameter dict (`conv_in`, `down_{i}`, ...).

  Returns:
    dict(ch, ch_mult, num_res_blocks, attn_levels, resamp_with_conv,
    in_channels, out_ch); `attn_levels` are the level indices (0 = full
    resolution) with attention, since the resolutions themselves depend on the
    image size.

  Raises:
    ConversionError: if the tree is not a DDPM U-Net's.
  """
  if not isinstance(params, Mapping):
    raise ConversionError(f"Expected a nested dict of parameters, got {type(params).__name__}.")
  ch = _first_dim(params, (("conv_in", "kernel", 3), ("conv_in", "bias", 0), ("norm_out", "scale", 0),
                           ("norm_out", "bias", 0), ("conv_out", "kernel", 2)))
  if ch is None and isinstance(params.get("temb"), Mapping):
    dense0 = _first_dim(params["temb"], (("dense0", "kernel", 0),))
    ch = dense0
  num_levels = _max_index(params, "down_")
  if ch is None or num_levels == 0 or not all(isinstance(params.get(f"down_{i}"), Mapping)
                                              for i in range(num_levels)):
    raise ConversionError(
        "Not a DDPM U-Net parameter tree: expected conv_in, down_0, ..., mid, up_0, ..., norm_out, conv_out; "
        f"got top-level keys {sorted(params)}.")
  ch_mult = []
  for i in range(num_levels):
    level = params[f"down_{i}"]
    out = None
    for j in range(_max_index(level, "block_")):
      if out is None and isinstance(level.get(f"block_{j}"), Mapping):
        out = _first_dim(level[f"block_{j}"], _BLOCK_OUT)
    if out is None or out % ch:
      raise ConversionError(f"Cannot read the channel count of down_{i} (ch={ch}) from the parameter tree.")
    ch_mult.append(out // ch)
  in_channels = _first_dim(params, (("conv_in", "kernel", 2),))
  out_ch = _first_dim(params, (("conv_out", "kernel", 3), ("conv_out", "bias", 0)))
  attn_levels = tuple(i for i in range(num_levels) if _max_index(params[f"down_{i}"], "attn_") > 0)
  resamp_with_conv = "downsample" in params["down_0"] if num_levels > 1 else True
  return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=_max_index(params["down_0"], "block_"),
              attn_levels=attn_levels, resamp_with_conv=resamp_with_conv,
              in_channels=3 if in_channels is None else in_channels, out_ch=3 if out_ch is None else out_ch)


@functools.lru_cache(maxsize=8)
def _abstract_params(ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv, image_size, in_channels,
                     out_ch) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of the U-Net with these hyperparameters, via jax.eval_shape (nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top

  model = unet.UNet(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    attn_resolutions=attn_resolutions, dropout=0.0, resamp_with_conv=resamp_with_conv)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)
  return {path: tuple(v.shape) for path, v in _flatten(variables["params"]).items()}


def _expected_from_architecture(arch: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  num_levels = len(arch["ch_mult"])
  image_size = 4 * 2 ** (num_levels - 1)  # any size divisible by 2^(levels-1): the shapes do not depend on it
  return _abstract_params(arch["ch"], tuple(arch["ch_mult"]), arch["num_res_blocks"],
                          tuple(image_size // 2**i for i in arch["attn_levels"]), arch["resamp_with_conv"],
                          image_size, arch["in_channels"], arch["out_ch"])


def _model_out_ch(config) -> int:
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  return runtime.build_diffusion(config).model_output_channels(config.data.channels)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
  """{'down_0/block_0/conv1/kernel': shape, ...} of the U-Net a full config (model, data, diffusion) describes."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  model = runtime.build_network(config)
  shapes = _abstract_params(model.ch, tuple(model.ch_mult), model.num_res_blocks, tuple(model.attn_resolutions),
                            model.resamp_with_conv, config.data.image_size, config.data.channels, model.out_ch)
  return {_fmt(p): s for p, s in shapes.items()}


def _compare(params: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]], fmt=_fmt) -> list[str]:
  flat = _flatten(params)
  missing = sorted(fmt(p) for p in expected if p not in flat)
  unexpected = sorted(fmt(p) for p in flat if p not in expected)
  wrong = sorted(f"{fmt(p)}: checkpoint {tuple(np.shape(flat[p]))}, model {s}"
                 for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != s)
  parts = []
  if missing:
    parts.append(_listing("missing from the checkpoint", missing))
  if unexpected:
    parts.append(_listing("in the checkpoint but not in the model", unexpected))
  if wrong:
    parts.append(_listing("shape mismatches", wrong))
  return parts


def _describe(arch: Mapping[str, Any]) -> str:
  return (f"ch={arch['ch']}, ch_mult={tuple(arch['ch_mult'])}, num_res_blocks={arch['num_res_blocks']}, "
          f"attention at levels {tuple(arch['attn_levels'])}, in_channels={arch['in_channels']}, "
          f"out_ch={arch['out_ch']}")


def validate_params(params: Mapping[str, Any], config) -> None:
  """Checks that `params` fit the U-Net that `config` (model, data, diffusion sections) builds.

  Raises:
    ConversionError: listing missing, unexpected and wrongly shaped parameters by path.
  """
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  model = runtime.build_network(config)
  out_ch = model.out_ch
  expected = _abstract_params(model.ch, tuple(model.ch_mult), model.num_res_blocks, tuple(model.attn_resolutions),
                              model.resamp_with_conv, config.data.image_size, config.data.channels, out_ch)
  parts = _compare(params, expected)
  if not parts:
    return
  try:
    found = "a U-Net with " + _describe(infer_architecture(params))
  except ConversionError:
    found = "parameters"
  raise ConversionError(
      f"The checkpoint holds {found}, which does not match the model of the config (ch={model.ch}, "
      f"ch_mult={tuple(model.ch_mult)}, num_res_blocks={model.num_res_blocks}, "
      f"attn_resolutions={tuple(model.attn_resolutions)} at image_size={config.data.image_size}, "
      f"channels={config.data.channels}, out_ch={out_ch} from model_var_type={config.diffusion.model_var_type!r}).\n"
      "Choose the matching config (configs/cifar.py, configs/lsun_*.py, configs/celebahq.py) or override fields "
      "(e.g. --config.model.ch_mult=..., --config.diffusion.model_var_type=...).\n" + "\n".join(parts))


def _check_complete(params: Mapping[str, Any], source: str, fmt=_fmt) -> None:
  """Checks a converted tree against the U-Net its own shapes imply (no config needed)."""
  arch = infer_architecture(params)
  parts = _compare(params, _expected_from_architecture(arch), fmt)
  if parts:
    raise ConversionError(
        f"{source} is not a complete DDPM U-Net with {_describe(arch)}:\n" + "\n".join(parts))


# ----------------------------------------------------------------------------
# Original TensorFlow checkpoints.
# ----------------------------------------------------------------------------


def _tf_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> the original TF variable name."""
  if path[-1] == "kernel":
    leaf = "W"
  elif path[-1] == "scale":
    leaf = "gamma"
  else:
    leaf = "beta" if len(path) > 1 and path[-2] in _NORM_LAYERS else "b"
  return "/".join((TF_SCOPE,) + path[:-1] + (leaf,))


def _import_tensorflow():
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  try:
    return runtime.import_tensorflow()
  except ImportError as e:
    raise ImportError(
        f"Reading the original TensorFlow checkpoints needs TensorFlow: {TF_INSTALL_HINT} ({e.__cause__ or e})."
    ) from None


def _resolve_tf_path(path: str | os.PathLike, tf) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise FileNotFoundError(
          f"{path} is a directory without a TF 'checkpoint' index file; pass the checkpoint prefix, "
          "e.g. .../model.ckpt-790000.")
    return latest
  for suffix in (".index", ".meta"):
    path = path.removesuffix(suffix)
  path = re.sub(r"\.data-\d+-of-\d+$", "", path)
  if not os.path.exists(path + ".index"):
    raise FileNotFoundError(
        f"No TensorFlow checkpoint at {path}: expected {path}.index and {path}.data-00000-of-00001 "
        "(pass the prefix, e.g. .../model.ckpt-790000).")
  return path


def read_tf_checkpoint(path: str | os.PathLike, *, scope: str = TF_SCOPE) -> dict[str, Any]:
  """Reads a TF1 checkpoint of the paper's model into our layout, both copies.

  Args:
    path: the checkpoint prefix (`.../model.ckpt-790000`), one of its files, or
      a directory with a TF `checkpoint` file.
    scope: the model's variable scope.

  Returns:
    dict(raw=params or None, ema=params or None, step=int or None,
    prefix=the checkpoint prefix read); the trees are renamed (W→kernel,
    b→bias, gamma→scale, beta→bias) but not yet checked for completeness.

  Raises:
    ConversionError: for variables in the model scope that are not parameters.
  """
  tf = _import_tensorflow()
  prefix = _resolve_tf_path(path, tf)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"Cannot read the TensorFlow checkpoint {prefix}: {type(e).__name__}: {e}") from None
  raw, ema, unknown, ignored = {}, {}, [], []
  for name in sorted(shapes):
    parts = name.split("/")
    if parts[0] != scope:
      ignored.append(name)  # global_step, beta1_power, ...
      continue
    if len(parts) >= 3 and parts[-1] == TF_EMA_SUFFIX and parts[-2] in _TF_LEAVES:
      ema[tuple(parts[1:-1])] = name
    elif len(parts) >= 2 and parts[-1] in _TF_LEAVES:
      raw[tuple(parts[1:])] = name
    elif len(parts) >= 3 and (parts[-2] in _TF_LEAVES or (parts[-2] == TF_EMA_SUFFIX and parts[-3] in _TF_LEAVES)):
      ignored.append(name)  # optimizer slots: .../W/Adam, .../W/Adam_1, .../W/Momentum
    else:
      unknown.append(name)
  if unknown:
    raise ConversionError(
        f"The TensorFlow checkpoint {prefix} has variables in scope {scope!r} that are no DDPM U-Net parameter "
        "(expected .../W, /b, /gamma, /beta, their /ExponentialMovingAverage copies and optimizer slots):\n"
        + _listing("unused", unknown))
  if not raw and not ema:
    raise ConversionError(
        f"The TensorFlow checkpoint {prefix} has no variables in scope {scope!r}; it holds "
        f"{', '.join(sorted(shapes)[:10]) or 'nothing'}.")
  if ignored:
    logging.info("Ignoring %d variables that are no model parameters (e.g. %s).", len(ignored), ignored[0])

  def read(names):
    if not names:
      return None
    flat = {}
    for scope_path, name in names.items():
      value = np.asarray(reader.get_tensor(name))
      if not np.issubdtype(value.dtype, np.floating):
        raise ConversionError(f"{name} has dtype {value.dtype}; expected floating point parameters.")
      flat[scope_path[:-1] + (_TF_LEAVES[scope_path[-1]],)] = value.astype(np.float32, copy=False)
    if len(flat) != len(names):
      raise ConversionError(f"{prefix} holds both a bias 'b' and a GroupNorm 'beta' in the same scope.")
    return _unflatten(flat)

  step = None
  if "global_step" in shapes:
    step = int(reader.get_tensor("global_step"))
  else:
    m = re.search(r"-(\d+)$", prefix)
    step = int(m.group(1)) if m else None
  return dict(raw=read(raw), ema=read(ema), step=step, prefix=prefix)


def _tf_select(ckpt: Mapping[str, Any], *, use_ema: bool) -> Params:
  raw, ema, prefix = ckpt["raw"], ckpt["ema"], ckpt["prefix"]
  if use_ema:
    if ema is None:
      raise ConversionError(
          f"The TensorFlow checkpoint {prefix} has no {TF_EMA_SUFFIX} copies of the parameters; "
          "convert the raw weights instead (use_ema=False, --raw).")
    if raw is not None:
      raw_paths, ema_paths = set(_flatten(raw)), set(_flatten(ema))
      parts = []
      if raw_paths - ema_paths:
        parts.append(_listing("without an EMA copy", sorted(_tf_name(p) for p in raw_paths - ema_paths)))
      if ema_paths - raw_paths:
        parts.append(_listing("EMA copy without the variable",
                              sorted(f"{_tf_name(p)}/{TF_EMA_SUFFIX}" for p in ema_paths - raw_paths)))
      if parts:
        raise ConversionError(f"The TensorFlow checkpoint {prefix} is inconsistent:\n" + "\n".join(parts))
    params, what = ema, "EMA"
  else:
    if raw is None:
      raise ConversionError(f"The TensorFlow checkpoint {prefix} holds only EMA copies; use_ema=False is impossible.")
    params, what = raw, "raw"
  _check_complete(params, f"The {what} parameters of {prefix}", _tf_name)
  return params


def tf_checkpoint_to_params(path: str | os.PathLike, *, use_ema: bool = True) -> Params:
  """Converts one of the paper's TF1 checkpoints to our parameter tree.

  Args:
    path: the checkpoint prefix (e.g. `.../model.ckpt-790000`), one of its
      files, or a directory with a TF `checkpoint` file.
    use_ema: take the `ExponentialMovingAverage` copies (what the paper
      evaluated); False takes the raw training weights.

  Returns:
    Nested dict of float32 NumPy arrays with our U-Net's layout.

  Raises:
    ImportError: if TensorFlow is not installed.
    FileNotFoundError: if there is no checkpoint at `path`.
    ConversionError: for unused, missing or wrongly shaped variables.
  """
  return _tf_select(read_tf_checkpoint(path), use_ema=use_ema)


# ----------------------------------------------------------------------------
# diffusers UNet2DModel.
# ----------------------------------------------------------------------------

# UNet2DModel's constructor defaults: fields absent from an (older) config.json take these values.
_DIFFUSERS_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' attention layers before 0.15 (and in google/ddpm-* .bin files).
_ATTN_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _layer_kind(path: tuple[str, ...]) -> str:
  """conv (HWIO ↔ OIHW), dense ([in,out] ↔ Linear [out,in]), nin ([in,out] ↔ 1x1 conv) or norm."""
  name = path[-1]
  if name in _NORM_LAYERS:
    return "norm"
  if name in ("dense0", "dense1", "temb_proj", "q", "k", "v", "proj_out"):
    return "dense"
  if name == "nin_shortcut":
    return "nin"
  return "conv"


def _diffusers_layer(path: tuple[str, ...], num_levels: int) -> list[str]:
  """Our layer path (without the leaf) -> diffusers module names, preferred first, then aliases."""
  if path == ("temb", "dense0"):
    return ["time_embedding.linear_1"]
  if path == ("temb", "dense1"):
    return ["time_embedding.linear_2"]
  if path in (("conv_in",), ("conv_out",)):
    return [path[0]]
  if path == ("norm_out",):
    return ["conv_norm_out"]
  m = re.fullmatch(r"(down|up)_(\d+)", path[0])
  if len(path) != 3:
    block = None
  elif path[0] == "mid":
    block = {"block_1": "mid_block.resnets.0", "block_2": "mid_block.resnets.1",
             "attn_1": "mid_block.attentions.0"}.get(path[1])
  elif m:
    i = int(m.group(2))
    top = f"down_blocks.{i}" if m.group(1) == "down" else f"up_blocks.{num_levels - 1 - i}"
    if path[1] in ("downsample", "upsample") and len(path) == 3 and path[2] == "conv":
      sampler = f"{top}.{path[1]}rs.0"
      return [f"{sampler}.conv", f"{sampler}.Conv2d_0"]
    bm = re.fullmatch(r"(block|attn)_(\d+)", path[1])
    block = None if bm is None else f"{top}.{'resnets' if bm.group(1) == 'block' else 'attentions'}.{bm.group(2)}"
  else:
    block = None
  if block is None or len(path) != 3:
    raise ConversionError(f"No diffusers counterpart for parameter {_fmt(path)}.")
  if ".resnets." in block and path[2] in _RESNET:
    return [f"{block}.{_RESNET[path[2]]}"]
  if ".attentions." in block and path[2] in _ATTN:
    new = _ATTN[path[2]]
    return [f"{block}.{new}"] + ([f"{block}.{_ATTN_OLD[new]}"] if new in _ATTN_OLD else [])
  raise ConversionError(f"No diffusers counterpart for parameter {_fmt(path)}.")


def _diffusers_keys(path: tuple[str, ...], num_levels: int) -> list[str]:
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(path[-1])
  if leaf is None:
    raise ConversionError(f"No diffusers counterpart for parameter {_fmt(path)}.")
  return [f"{layer}.{leaf}" for layer in _diffusers_layer(path[:-1], num_levels)]


def _from_torch_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  """A diffusers tensor -> our layout (shape errors are left to the caller's shape check)."""
  if path[-1] != "kernel":
    return value
  kind = _layer_kind(path[:-1])
  if kind == "conv" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  if kind in ("dense", "nin"):
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # 1x1 conv -> Linear
    if value.ndim == 2:
      return value.T
  return value


def _to_torch_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  kind = _layer_kind(path[:-1])
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  if kind == "nin":
    return value.T[:, :, None, None]
  return value.T


def _refuse(field: str, value: Any, wanted: str) -> ConversionError:
  return ConversionError(
      f"Unsupported diffusers UNet2DModel: {field}={value!r}, but the DDPM U-Net needs {wanted}. "
      "Only the architecture of Ho et al. 2020 (google/ddpm-*) can be converted.")


def diffusers_architecture(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
  """Checks a UNet2DModel config.json for the DDPM architecture and reads its hyperparameters.

  Args:
    diffusers_config: the parsed config.json; absent fields take UNet2DModel's defaults.

  Returns:
    Our config fields: {"model": {ch, ch_mult, num_res_blocks,
    attn_resolutions, resamp_with_conv}, "data": {image_size, channels}},
    plus "out_ch" (the network's output channels).

  Raises:
    ConversionError: naming the first field that the DDPM U-Net does not implement.
  """
  name = diffusers_config.get("_class_name", "UNet2DModel")
  if name != "UNet2DModel":
    raise _refuse("_class_name", name, "'UNet2DModel'")
  cfg = dict(_DIFFUSERS_DEFAULTS)
  cfg.update({k: v for k, v in diffusers_config.items() if not k.startswith("_")})
  unknown = sorted(set(cfg) - set(_DIFFUSERS_DEFAULTS))
  if unknown:
    logging.warning("Ignoring config fields that UNet2DModel does not know (as diffusers does): %s", unknown)

  requirements = [
      ("center_input_sample", lambda v: v is False, "False"),
      ("time_embedding_type", lambda v: v == "positional", "'positional' (sinusoidal)"),
      ("flip_sin_to_cos", lambda v: v is False, "False (sin first)"),
      ("freq_shift", lambda v: v == 1, "1 (frequencies exp(-ln(1e4) j/(half-1)))"),
      ("act_fn", lambda v: v in ("silu", "swish"), "'silu'"),
      ("norm_num_groups", lambda v: v == 32, "32"),
      ("attn_norm_num_groups", lambda v: v in (None, 32), "None or 32"),
      ("norm_eps", lambda v: isinstance(v, (int, float)) and math.isclose(v, 1e-6, rel_tol=1e-6), "1e-6"),
      ("downsample_padding", lambda v: v == 0, "0 (pad right/bottom, as TF 'SAME')"),
      ("downsample_type", lambda v: v == "conv", "'conv'"),
      ("upsample_type", lambda v: v == "conv", "'conv'"),
      ("mid_block_type", lambda v: v == "UNetMidBlock2D", "'UNetMidBlock2D'"),
      ("mid_block_scale_factor", lambda v: v == 1, "1"),
      ("resnet_time_scale_shift", lambda v: v == "default", "'default' (additive)"),
      ("add_attention", lambda v: v is True, "True"),
      ("class_embed_type", lambda v: v is None, "None"),
      ("num_class_embeds", lambda v: v is None, "None"),
  ]
  for field, ok, wanted in requirements:
    if not ok(cfg[field]):
      raise _refuse(field, cfg[field], wanted)

  channels = [int(c) for c in cfg["block_out_channels"]]
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  num_levels = len(channels)
  if not channels or len(down) != num_levels or len(up) != num_levels:
    raise _refuse("down_block_types/up_block_types", (down, up), "one block per entry of block_out_channels")
  ch = channels[0]
  if any(c % ch for c in channels):
    raise _refuse("block_out_channels", channels, "multiples of the first entry (ch * ch_mult)")
  if cfg["time_embedding_dim"] not in (None, 4 * ch):
    raise _refuse("time_embedding_dim", cfg["time_embedding_dim"], f"None or 4 * {ch}")
  attn_levels = []
  for i, kind in enumerate(down):
    if kind not in ("DownBlock2D", "AttnDownBlock2D"):
      raise _refuse(f"down_block_types[{i}]", kind, "'DownBlock2D' or 'AttnDownBlock2D'")
    up_kind = up[num_levels - 1 - i]
    want_up = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
    if up_kind != want_up:
      raise _refuse(f"up_block_types[{num_levels - 1 - i}]", up_kind,
                    f"{want_up!r} to mirror down_block_types[{i}]={kind!r} (attention at the same resolution)")
    if kind == "AttnDownBlock2D":
      attn_levels.append(i)
  head_dim = cfg["attention_head_dim"]
  if head_dim is not None:
    for c in [channels[i] for i in attn_levels] + [channels[-1]]:
      if head_dim != c:
        raise _refuse("attention_head_dim", head_dim, f"None (one head over all {c} channels)")

  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise _refuse("sample_size", size, "a square size")
    size = size[0]
  if size is None:
    raise _refuse("sample_size", size, "the image size (it places the attention layers)")
  size = int(size)
  if size % 2 ** (num_levels - 1):
    raise _refuse("sample_size", size, f"a multiple of 2^(levels-1) = {2 ** (num_levels - 1)}")
  return dict(
      model=dict(ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=int(cfg["layers_per_block"]),
                 attn_resolutions=tuple(size // 2**i for i in attn_levels), resamp_with_conv=True),
      data=dict(image_size=size, channels=int(cfg["in_channels"])),
      out_ch=int(cfg["out_channels"]),
  )


def _model_folder(folder: pathlib.Path) -> pathlib.Path:
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a directory; expected a diffusers UNet2DModel folder.")
  if not (folder / DIFFUSERS_CONFIG).exists() and (folder / "unet" / DIFFUSERS_CONFIG).exists():
    return folder / "unet"  # a pipeline folder (model_index.json, unet/, scheduler/)
  if (folder / DIFFUSERS_CONFIG).exists():
    config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    if config.get("_class_name") not in (None, "UNet2DModel") and (folder / "unet" / DIFFUSERS_CONFIG).exists():
      return folder / "unet"
    return folder
  raise FileNotFoundError(f"{folder} has no {DIFFUSERS_CONFIG}; expected a diffusers UNet2DModel folder.")


def _read_diffusers_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  st, binary = folder / DIFFUSERS_SAFETENSORS, folder / DIFFUSERS_BIN
  if st.exists():
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

    try:
      return dict(st_numpy.load_file(str(st)))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise ConversionError(
          f"{st} cannot be read: it is corrupt or truncated, or holds a dtype NumPy lacks such as bfloat16 "
          f"({type(e).__name__}: {e}).") from None
  if binary.exists():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          f"{binary} is a PyTorch pickle and reading it needs torch (pip install torch); or convert it to "
          f"{DIFFUSERS_SAFETENSORS}, which needs nothing.") from None
    try:
      state = torch.load(str(binary), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{binary} cannot be read ({type(e).__name__}: {e}); download it again.") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
  if (folder / (DIFFUSERS_SAFETENSORS + ".index.json")).exists():
    raise ConversionError(f"{folder} holds a sharded checkpoint, which is not supported; save it unsharded.")
  raise FileNotFoundError(f"{folder} has neither {DIFFUSERS_SAFETENSORS} nor {DIFFUSERS_BIN}.")


def diffusers_to_params(folder: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
  """Converts a diffusers UNet2DModel folder of the DDPM architecture to our parameter tree.

  Args:
    folder: a folder with config.json and diffusion_pytorch_model.safetensors
      (or .bin, which needs torch), or a pipeline folder with such a `unet/`.

  Returns:
    (params, overrides): float32 NumPy arrays in our layout, and the config
    values the network implies, {"model": {ch, ch_mult, num_res_blocks,
    attn_resolutions, resamp_with_conv}, "data": {image_size, channels},
    "out_ch": output channels}.

  Raises:
    ConversionError: for an architecture we do not implement (naming the
      config field), a corrupt file, or missing, unused or wrongly shaped tensors.
  """
  folder = _model_folder(pathlib.Path(folder))
  try:
    diffusers_config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{folder / DIFFUSERS_CONFIG} is not valid JSON: {e}") from None
  overrides = diffusers_architecture(diffusers_config)
  m = overrides["model"]
  expected = _abstract_params(m["ch"], m["ch_mult"], m["num_res_blocks"], m["attn_resolutions"], True,
                              overrides["data"]["image_size"], overrides["data"]["channels"], overrides["out_ch"])
  state = _read_diffusers_weights(folder)
  num_levels = len(m["ch_mult"])
  used, flat, missing, wrong = set(), {}, [], []
  for path, shape in expected.items():
    keys = [k for k in _diffusers_keys(path, num_levels) if k in state]
    if not keys:
      missing.append(_diffusers_keys(path, num_levels)[0])
      continue
    for alias in keys[1:]:  # the same tensor under an old name too: fine if equal
      if not np.array_equal(state[alias], state[keys[0]]):
        raise ConversionError(f"{folder} holds different tensors under {keys[0]} and its alias {alias}.")
    used.update(keys)
    value = _from_torch_layout(np.asarray(state[keys[0]]), path)
    if tuple(value.shape) != shape:
      wrong.append(f"{keys[0]}: {tuple(state[keys[0]].shape)}, expected {_to_torch_shape(shape, path)}")
      continue
    flat[path] = np.asarray(value, dtype=np.float32)
  unused = sorted(set(state) - used)
  parts = []
  if missing:
    parts.append(_listing("missing", missing))
  if unused:
    parts.append(_listing("unused", unused))
  if wrong:
    parts.append(_listing("shape mismatches", wrong))
  if parts:
    raise ConversionError(f"The weights in {folder} do not match its {DIFFUSERS_CONFIG}:\n" + "\n".join(parts))
  return _unflatten(flat), overrides


def _to_torch_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  return tuple(_to_torch_layout(np.empty(shape, np.float32), path).shape)


def diffusers_config_for(config, *, out_ch: int | None = None) -> dict[str, Any]:
  """The UNet2DModel config.json for our U-Net of a full config (model and data sections)."""
  model = config.model
  if not model.resamp_with_conv:
    raise ConversionError("diffusers' UNet2DModel always resamples with convolutions; "
                          "model.resamp_with_conv=False cannot be exported.")
  size = int(config.data.image_size)
  num_levels = len(model.ch_mult)
  attn = [size // 2**i in tuple(model.attn_resolutions) for i in range(num_levels)]
  return {
      "_class_name": "UNet2DModel",
      "sample_size": size,
      "in_channels": int(config.data.channels),
      "out_channels": int(out_ch if out_ch is not None else _model_out_ch(config)),
      "center_input_sample": False,
      "time_embedding_type": "positional",
      "time_embedding_dim": None,
      "freq_shift": 1,
      "flip_sin_to_cos": False,
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "mid_block_type": "UNetMidBlock2D",
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "block_out_channels": [int(model.ch * m) for m in model.ch_mult],
      "layers_per_block": int(model.num_res_blocks),
      "mid_block_scale_factor": 1,
      "downsample_padding": 0,
      "downsample_type": "conv",
      "upsample_type": "conv",
      "dropout": float(model.dropout),
      "act_fn": "silu",
      "attention_head_dim": None,
      "norm_num_groups": 32,
      "attn_norm_num_groups": None,
      "norm_eps": 1e-6,
      "resnet_time_scale_shift": "default",
      "add_attention": True,
      "class_embed_type": None,
      "num_class_embeds": None,
      "num_train_timesteps": None,
  }


def params_to_diffusers(params: Mapping[str, Any], config, folder: str | os.PathLike) -> pathlib.Path:
  """Writes our parameters as a diffusers UNet2DModel folder that `UNet2DModel.from_pretrained` loads.

  Args:
    params: our nested parameter dict.
    config: the full config (model, data and diffusion sections), e.g. the one
      `checkpointing.load_params` returns; it is checked against `params`.
    folder: the output folder; it must not hold a model yet.

  Returns:
    The folder, holding config.json and diffusion_pytorch_model.safetensors.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  validate_params(params, config)
  out_ch = infer_architecture(params)["out_ch"]
  diffusers_config = diffusers_config_for(config, out_ch=out_ch)
  num_levels = len(config.model.ch_mult)
  tensors = {}
  for path, value in _flatten(params).items():
    key = _diffusers_keys(path, num_levels)[0]
    tensors[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value, dtype=np.float32), path))
  folder = pathlib.Path(folder)
  for name in (DIFFUSERS_CONFIG, DIFFUSERS_SAFETENSORS):
    if (folder / name).exists():
      raise FileExistsError(f"{folder / name} already exists; refusing to overwrite it.")
  folder.mkdir(parents=True, exist_ok=True)
  st_numpy.save_file(tensors, str(folder / DIFFUSERS_SAFETENSORS), metadata={"format": "pt"})
  (folder / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
  return folder


# ----------------------------------------------------------------------------
# Writing our checkpoint directories.
# ----------------------------------------------------------------------------


def check_config_matches(config, overrides: Mapping[str, Any]) -> None:
  """Checks that a config describes the network a diffusers model implies (see diffusers_to_params).

  Raises:
    ConversionError: listing the differing fields and the flags that fix them.
  """
  diffs = []
  for section in ("model", "data"):
    for key, value in overrides[section].items():
      current = config[section][key]
      if isinstance(current, (list, tuple)):
        current = tuple(current)
      if current != value:
        diffs.append((f"{section}.{key}", current, value))
  lines = [f"  {k}: config {c!r}, checkpoint {v!r}" for k, c, v in diffs]
  fix = " ".join(f"--config.{k}={_flag_value(v)}" for k, _, v in diffs)
  if not diffs:
    out_ch = _model_out_ch(config)
    if out_ch != overrides["out_ch"]:
      lines.append(f"  output channels: config {out_ch} (diffusion.model_var_type="
                   f"{config.diffusion.model_var_type!r}), checkpoint {overrides['out_ch']}")
      fix = ("a model_var_type with " + ("a learned variance (learned or learned_range, with loss_type hybrid or kl)"
                                         if overrides["out_ch"] == 2 * config.data.channels else
                                         "a fixed variance (fixedlarge or fixedsmall)"))
  if lines:
    raise ConversionError("The config does not describe this network:\n" + "\n".join(lines)
                          + f"\nChoose the matching config file or pass {fix}")


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "'(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")'"
  return str(v)


def write_checkpoint(directory: str | os.PathLike, *, config, params: Params, ema_params: Params | None = None,
                     step: int = 0):
  """Validates parameters against `config` and writes a directory our loaders accept (config.json + Orbax)."""
  validate_params(params, config)
  if ema_params is not None and ema_params is not params:
    validate_params(ema_params, config)
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  return checkpointing.save_model_checkpoint(directory, config=config, params=params, ema_params=ema_params,
                                             step=step)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

COMMANDS = ("tf2jax", "diffusers2jax", "jax2diffusers", "tf2diffusers")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file(
      "config", None, "Config file of the network (configs/cifar.py, configs/lsun_*.py, configs/celebahq.py); "
      "needed by tf2jax, diffusers2jax and tf2diffusers. Fields can be overridden: --config.model.dropout=0.0.",
      lock_config=True)
  return dict(
      config=config,
      checkpoint=flags.DEFINE_string(
          "checkpoint", None, "tf2jax/tf2diffusers: the TF1 checkpoint prefix (.../model.ckpt-790000), one of its "
          "files, or its directory. Needs TensorFlow: " + TF_INSTALL_HINT),
      raw=flags.DEFINE_bool(
          "raw", False, "Convert the raw training weights instead of the EMA weights (tf2jax, tf2diffusers, "
          "jax2diffusers). tf2jax without --raw keeps both copies (params = raw, ema_params = EMA)."),
      folder=flags.DEFINE_string(
          "folder", None, "diffusers2jax: a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors "
          "or .bin) or a pipeline folder with unet/."),
      workdir=flags.DEFINE_string(
          "workdir", None, "jax2diffusers: our training workdir or converted directory (or one checkpoints/<step>)."),
      step=flags.DEFINE_integer("step", None, "Step recorded in (tf2jax, diffusers2jax) or read from "
                                "(jax2diffusers) our checkpoint; default: the TF global_step, 0, the newest."),
      out=flags.DEFINE_string("out", None, "Output: our checkpoint directory (*2jax) or a diffusers folder "
                              "(*2diffusers). Existing outputs are never overwritten."),
  )


def _run(command: str, f: Mapping[str, Any]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  def need(name):
    if f[name].value in (None, ""):
      raise app.UsageError(f"{command} needs --{name}.")
    return f[name].value

  out = need("out")
  if command in ("tf2jax", "tf2diffusers"):
    config = need("config")
    ckpt = read_tf_checkpoint(need("checkpoint"))
    chosen = _tf_select(ckpt, use_ema=not f["raw"].value)
    validate_params(chosen, config)
    if command == "tf2diffusers":
      params_to_diffusers(chosen, config, out)
    else:
      params = ckpt["raw"] if ckpt["raw"] is not None and not f["raw"].value else chosen
      if params is not chosen:
        _check_complete(params, f"The raw parameters of {ckpt['prefix']}", _tf_name)
      step = f["step"].value if f["step"].value is not None else (ckpt["step"] or 0)
      write_checkpoint(out, config=config, params=params, ema_params=chosen, step=step)
    logging.info("Converted %s (%s weights) to %s.", ckpt["prefix"], "raw" if f["raw"].value else "EMA", out)
  elif command == "diffusers2jax":
    config = need("config")
    params, overrides = diffusers_to_params(need("folder"))
    check_config_matches(config, overrides)
    write_checkpoint(out, config=config, params=params, ema_params=params, step=f["step"].value or 0)
    logging.info("Converted %s to %s.", f["folder"].value, out)
  elif command == "jax2diffusers":
    from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

    config, params, step = checkpointing.load_params(need("workdir"), use_ema=not f["raw"].value,
                                                     step=f["step"].value)
    params_to_diffusers(params, config, out)
    logging.info("Exported step %d (%s weights) of %s to %s.", step, "raw" if f["raw"].value else "EMA",
                 f["workdir"].value, out)


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  flag_values = _define_flags()

  def run(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise app.UsageError(f"Give one command, one of {', '.join(COMMANDS)}; got {argv[1:]}. See --help.")
    try:
      _run(argv[1], flag_values)
    except (ConversionError, FileNotFoundError, FileExistsError, ImportError) as e:
      raise SystemExit(f"{argv[1]} failed: {e}") from None

  app.run(run)


if __name__ == "__main__":
  main()
