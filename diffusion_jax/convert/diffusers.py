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

Without --config the converters build the config from the checkpoint:
infer_architecture reads ch, ch_mult, num_res_blocks, the attention levels,
resamp_with_conv, the class table (num_classes) and the input/output channels
off the tensors, on top of a base config: --preset=cifar10|celebahq|lsun
(configs/cifar.py, configs/celebahq.py, configs/lsun_bedroom.py) or, for a bare
--image_size=N, configs/cifar.py at that size. A TF checkpoint does not tell
its image size, so tf2jax and tf2diffusers need --image_size or --preset;
diffusers2jax takes the folder's sample_size. 2C output channels mean a learned
variance: model_var_type 'learned' for TF checkpoints (the paper's code:
log σ²), for diffusers the scheduler's variance_type (scheduler/
scheduler_config.json) or else 'learned_range' (improved DDPM), with
loss_type 'hybrid', since 'mse' cannot train a learned variance. C output
channels keep the preset's fixed variance (or the scheduler's).

  python -m diffusion_jax.convert tf2jax --checkpoint=/path/model.ckpt-790000 \
      --preset=cifar10 --out=/path/ddpm_cifar10
  python -m diffusion_jax.convert diffusers2jax --folder=/path/ddpm-cifar10-32 --out=/path/ddpm_cifar10

A config chosen with --config (configs/cifar.py, configs/lsun_*.py,
configs/celebahq.py) must describe the checkpoint's network; every parameter
is checked against the U-Net built from it, mismatches are reported by
parameter path, and the message gives the `--config.*` overrides that describe
the checkpoint (e.g. --config.model.attn_resolutions='(16,)'
--config.diffusion.model_var_type=learned_range
--config.diffusion.loss_type=hybrid). Fields can be overridden as for
training, e.g. --config.model.dropout=0.0.

Class-conditional networks (model.num_classes = K > 0: `class_embed/embedding`
of K + 1 rows, the last the null class) are diffusers' UNet2DModel with
num_class_embeds = K + 1; both add the class row to the timestep embedding
after the time MLP. Other class_embed_types are refused.

User errors (bad flags, paths, checkpoints, configs) end the command with one
`error: <message>` line and exit status 2, without a traceback.

The library functions work on nested dicts of NumPy arrays:
`tf_checkpoint_to_params`, `diffusers_to_params`, `params_to_diffusers`,
`validate_params`, `infer_architecture`, `inferred_config`.
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

from diffusion_jax import cli
from diffusion_jax import errors

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


class ConversionError(errors.UserError):
  """A checkpoint that does not match the network it is converted to or from (a user error: no traceback)."""


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


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]] | str:
  if not isinstance(tree, Mapping):
    return type(tree).__name__
  return {_fmt(p): tuple(np.shape(v)) for p, v in _flatten(tree).items()}


def _max_index(tree: Mapping[str, Any], prefix: str) -> int:
  """1 + the largest i of keys `{prefix}{i}` (0 if none)."""
  found = [int(k[len(prefix) :]) for k in tree if re.fullmatch(re.escape(prefix) + r"\d+", k)]
  return max(found) + 1 if found else 0


_BLOCK_OUT = (
  ("conv1", "kernel", 3),
  ("conv1", "bias", 0),
  ("conv2", "kernel", 3),
  ("conv2", "bias", 0),
  ("norm2", "scale", 0),
  ("norm2", "bias", 0),
  ("temb_proj", "kernel", 1),
  ("temb_proj", "bias", 0),
)


def infer_architecture(params: Mapping[str, Any]) -> dict[str, Any]:
  """Reads the U-Net's hyperparameters off a parameter tree (tolerating missing tensors).

  Args:
    params: our nested parameter dict (`conv_in`, `down_{i}`, ...).

  Returns:
    dict(ch, ch_mult, num_res_blocks, attn_levels, resamp_with_conv,
    in_channels, out_ch, num_classes); `attn_levels` are the level indices
    (0 = full resolution) with attention, since the resolutions themselves
    depend on the image size; `num_classes` is 0 for an unconditional network
    and K for a `class_embed/embedding` of K + 1 rows (the last: the null class).

  Raises:
    ConversionError: if the tree is not a DDPM U-Net's.
  """
  if not isinstance(params, Mapping):
    raise ConversionError(f"Expected a nested dict of parameters, got {type(params).__name__}.")
  ch = _first_dim(
    params,
    (
      ("conv_in", "kernel", 3),
      ("conv_in", "bias", 0),
      ("norm_out", "scale", 0),
      ("norm_out", "bias", 0),
      ("conv_out", "kernel", 2),
    ),
  )
  if ch is None and isinstance(params.get("temb"), Mapping):
    dense0 = _first_dim(params["temb"], (("dense0", "kernel", 0),))
    ch = dense0
  num_levels = _max_index(params, "down_")
  if ch is None or num_levels == 0 or not all(isinstance(params.get(f"down_{i}"), Mapping) for i in range(num_levels)):
    raise ConversionError(
      "Not a DDPM U-Net parameter tree: expected conv_in, down_0, ..., mid, up_0, ..., norm_out, conv_out; "
      f"got top-level keys {sorted(params)}."
    )
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
  num_classes = 0
  if "class_embed" in params:
    rows = _first_dim(params, (("class_embed", "embedding", 0),))
    if rows is None or rows < 2:
      raise ConversionError(
        "class_embed/embedding must be a [num_classes + 1, 4 ch] table with at least 2 rows (the last is the null "
        f"class); got {_flat_shapes(params['class_embed'])}."
      )
    num_classes = rows - 1
  return dict(
    ch=ch,
    ch_mult=tuple(ch_mult),
    num_res_blocks=_max_index(params["down_0"], "block_"),
    attn_levels=attn_levels,
    resamp_with_conv=resamp_with_conv,
    in_channels=3 if in_channels is None else in_channels,
    out_ch=3 if out_ch is None else out_ch,
    num_classes=num_classes,
  )


@functools.lru_cache(maxsize=8)
def _abstract_params(
  ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv, image_size, in_channels, out_ch, num_classes=0
) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of the U-Net with these hyperparameters, via jax.eval_shape (nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top

  model = unet.UNet(
    ch=ch,
    out_ch=out_ch,
    ch_mult=ch_mult,
    num_res_blocks=num_res_blocks,
    attn_resolutions=attn_resolutions,
    dropout=0.0,
    resamp_with_conv=resamp_with_conv,
    num_classes=num_classes,
  )
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)
  return {path: tuple(v.shape) for path, v in _flatten(variables["params"]).items()}


def _expected_from_architecture(arch: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  num_levels = len(arch["ch_mult"])
  image_size = 4 * 2 ** (num_levels - 1)  # any size divisible by 2^(levels-1): the shapes do not depend on it
  return _abstract_params(
    arch["ch"],
    tuple(arch["ch_mult"]),
    arch["num_res_blocks"],
    tuple(image_size // 2**i for i in arch["attn_levels"]),
    arch["resamp_with_conv"],
    image_size,
    arch["in_channels"],
    arch["out_ch"],
    arch.get("num_classes", 0),
  )


def _model_out_ch(config) -> int:
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  return runtime.build_diffusion(config).model_output_channels(config.data.channels)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
  """{'down_0/block_0/conv1/kernel': shape, ...} of the U-Net a full config (model, data, diffusion) describes."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  model = runtime.build_network(config)
  shapes = _abstract_params(
    model.ch,
    tuple(model.ch_mult),
    model.num_res_blocks,
    tuple(model.attn_resolutions),
    model.resamp_with_conv,
    config.data.image_size,
    config.data.channels,
    model.out_ch,
    model.num_classes,
  )
  return {_fmt(p): s for p, s in shapes.items()}


def _compare(params: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]], fmt=_fmt) -> list[str]:
  flat = _flatten(params)
  missing = sorted(fmt(p) for p in expected if p not in flat)
  unexpected = sorted(fmt(p) for p in flat if p not in expected)
  wrong = sorted(
    f"{fmt(p)}: checkpoint {tuple(np.shape(flat[p]))}, model {s}"
    for p, s in expected.items()
    if p in flat and tuple(np.shape(flat[p])) != s
  )
  parts = []
  if missing:
    parts.append(_listing("missing from the checkpoint", missing))
  if unexpected:
    parts.append(_listing("in the checkpoint but not in the model", unexpected))
  if wrong:
    parts.append(_listing("shape mismatches", wrong))
  return parts


LEARNED_VAR_TYPES = ("learned", "learned_range")
# The learned variance each source implies for 2C output channels: the paper's TF code has only 'learned' (the
# network outputs log σ²); diffusers' models with a learned variance come from improved DDPM, 'learned_range'.
TF_LEARNED_VAR_TYPE = "learned"
DIFFUSERS_LEARNED_VAR_TYPE = "learned_range"
LEARNED_LOSS_TYPE = "hybrid"  # L_simple + λ L_vlb (improved DDPM); 'kl' (the bound alone) trains it as well


def architecture_fields(arch: Mapping[str, Any], image_size: int) -> dict[str, Any]:
  """Config fields ({"model.ch": 32, ...}) of an `infer_architecture` result for images of `image_size`."""
  return {
    "model.ch": arch["ch"],
    "model.ch_mult": tuple(arch["ch_mult"]),
    "model.num_res_blocks": arch["num_res_blocks"],
    "model.attn_resolutions": tuple(int(image_size) // 2**i for i in arch["attn_levels"]),
    "model.resamp_with_conv": arch["resamp_with_conv"],
    "model.num_classes": arch.get("num_classes", 0),
    "data.channels": arch["in_channels"],
  }


def _describe(arch: Mapping[str, Any], image_size: int | None = None) -> str:
  """The network in config-field terms; attention as levels only when no image size places it."""
  fields = architecture_fields(arch, image_size or 1)
  if image_size is None:
    del fields["model.attn_resolutions"]
  text = ", ".join(f"{k}={v!r}" for k, v in fields.items())
  if image_size is None:
    text += f", attention at levels {tuple(arch['attn_levels'])} (0 = full resolution)"
  return text + f", {arch['out_ch']} output channels"


def _config_value(config, field: str) -> Any:
  section, key = field.split(".")
  value = config[section].get(key, 0 if key == "num_classes" else None)
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _variance_fixes(
  config, out_ch: int, channels: int, *, learned_var_type: str = DIFFUSERS_LEARNED_VAR_TYPE
) -> list[tuple[str, Any, Any]]:
  """(field, config value, needed value) of the diffusion fields that give `out_ch` outputs for `channels` inputs."""
  var_type, loss_type = config.diffusion.model_var_type, config.diffusion.loss_type
  fixes = []
  if out_ch == 2 * channels and var_type not in LEARNED_VAR_TYPES:
    fixes.append(("diffusion.model_var_type", var_type, learned_var_type))
    if loss_type == "mse":
      fixes.append(("diffusion.loss_type", loss_type, LEARNED_LOSS_TYPE))
  elif out_ch == channels and var_type in LEARNED_VAR_TYPES:
    fixes.append(("diffusion.model_var_type", var_type, "fixedlarge"))
    if loss_type == "hybrid":
      fixes.append(("diffusion.loss_type", loss_type, "mse"))
  return fixes


def _flags_text(diffs: list[tuple[str, Any, Any]]) -> str:
  return " ".join(f"--config.{k}={_flag_value(v)}" for k, _, v in diffs)


def _fix_note(diffs: list[tuple[str, Any, Any]]) -> str:
  wanted = {k: v for k, _, v in diffs}
  notes = []
  if wanted.get("diffusion.loss_type") == LEARNED_LOSS_TYPE:
    notes.append("a learned variance is trained by loss_type hybrid or kl, not mse")
  if wanted.get("diffusion.model_var_type") == "fixedlarge":
    notes.append("fixedsmall is the other fixed variance (the paper's 256x256 models)")
  return f" ({'; '.join(notes)})" if notes else ""


def check_diffusion_config(config) -> None:
  """Checks the diffusion section's variance and loss types, naming the `--config.diffusion.*` flag that fixes them.

  Raises:
    ConversionError: for a learned variance with loss_type='mse' or a fixed one with loss_type='hybrid'.
  """
  var_type, loss_type = config.diffusion.model_var_type, config.diffusion.loss_type
  if var_type in LEARNED_VAR_TYPES and loss_type == "mse":
    raise ConversionError(
      f"diffusion.model_var_type={var_type!r} is a learned variance, which loss_type='mse' cannot train; pass "
      f"--config.diffusion.loss_type={LEARNED_LOSS_TYPE} (or --config.diffusion.loss_type=kl) as well."
    )
  if var_type not in LEARNED_VAR_TYPES and loss_type == "hybrid":
    raise ConversionError(
      f"diffusion.loss_type='hybrid' trains a learned variance, but model_var_type={var_type!r} is fixed; pass "
      "--config.diffusion.loss_type=mse, or --config.diffusion.model_var_type=learned_range for a network "
      "with 2C output channels."
    )


def validate_params(params: Mapping[str, Any], config, *, learned_var_type: str = DIFFUSERS_LEARNED_VAR_TYPE) -> None:
  """Checks that `params` fit the U-Net that `config` (model, data, diffusion sections) builds.

  Args:
    params: our nested parameter dict.
    config: the full config.
    learned_var_type: the model_var_type the fix in the message names for 2C
      output channels ('learned' for the paper's TF checkpoints).

  Raises:
    ConversionError: listing missing, unexpected and wrongly shaped parameters by path, with the
      `--config.*` overrides that describe the checkpoint.
  """
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  check_diffusion_config(config)
  model = runtime.build_network(config)
  out_ch = model.out_ch
  expected = _abstract_params(
    model.ch,
    tuple(model.ch_mult),
    model.num_res_blocks,
    tuple(model.attn_resolutions),
    model.resamp_with_conv,
    config.data.image_size,
    config.data.channels,
    out_ch,
    model.num_classes,
  )
  parts = _compare(params, expected)
  if not parts:
    return
  size = int(config.data.image_size)
  try:
    arch = infer_architecture(params)
  except ConversionError:
    arch = None
  fix = (
    "Choose the matching config (configs/cifar.py, configs/lsun_*.py, configs/celebahq.py) or override fields "
    "(e.g. --config.model.ch_mult=..., --config.diffusion.model_var_type=...)."
  )
  found = "parameters"
  if arch is not None:
    found = f"a U-Net with {_describe(arch, size)} (at data.image_size={size})"
    diffs = [
      (k, _config_value(config, k), v)
      for k, v in architecture_fields(arch, size).items()
      if _config_value(config, k) != v
    ]
    diffs += _variance_fixes(config, arch["out_ch"], arch["in_channels"], learned_var_type=learned_var_type)
    if diffs:
      fix = (
        "Choose the matching config file or pass "
        + _flags_text(diffs)
        + _fix_note(diffs)
        + ", or leave out --config to build the config from the checkpoint (see --preset, --image_size)."
      )
  raise ConversionError(
    f"The checkpoint holds {found}, which does not match the model of the config (model.ch={model.ch}, "
    f"model.ch_mult={tuple(model.ch_mult)}, model.num_res_blocks={model.num_res_blocks}, "
    f"model.attn_resolutions={tuple(model.attn_resolutions)}, model.resamp_with_conv={model.resamp_with_conv}, "
    f"model.num_classes={model.num_classes}, data.channels={config.data.channels} at data.image_size={size}, "
    f"out_ch={out_ch} from model_var_type={config.diffusion.model_var_type!r}).\n" + fix + "\n" + "\n".join(parts)
  )


def _check_complete(params: Mapping[str, Any], source: str, fmt=_fmt) -> None:
  """Checks a converted tree against the U-Net its own shapes imply (no config needed)."""
  arch = infer_architecture(params)
  parts = _compare(params, _expected_from_architecture(arch), fmt)
  if parts:
    raise ConversionError(f"{source} is not a complete DDPM U-Net with {_describe(arch)}:\n" + "\n".join(parts))


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
    raise errors.MissingPackageError(
      f"Reading the original TensorFlow checkpoints needs TensorFlow: {TF_INSTALL_HINT} ({e.__cause__ or e})."
    ) from None


def _resolve_tf_path(path: str | os.PathLike, tf) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise errors.MissingFileError(
        f"{path} is a directory without a TF 'checkpoint' index file; pass the checkpoint prefix, "
        "e.g. .../model.ckpt-790000."
      )
    return latest
  for suffix in (".index", ".meta"):
    path = path.removesuffix(suffix)
  path = re.sub(r"\.data-\d+-of-\d+$", "", path)
  if not os.path.exists(path + ".index"):
    raise errors.MissingFileError(
      f"No TensorFlow checkpoint at {path}: expected {path}.index and {path}.data-00000-of-00001 "
      "(pass the prefix, e.g. .../model.ckpt-790000)."
    )
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
      + _listing("unused", unknown)
    )
  if not raw and not ema:
    raise ConversionError(
      f"The TensorFlow checkpoint {prefix} has no variables in scope {scope!r}; it holds "
      f"{', '.join(sorted(shapes)[:10]) or 'nothing'}."
    )
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
        "convert the raw weights instead (use_ema=False, --raw)."
      )
    if raw is not None:
      raw_paths, ema_paths = set(_flatten(raw)), set(_flatten(ema))
      parts = []
      if raw_paths - ema_paths:
        parts.append(_listing("without an EMA copy", sorted(_tf_name(p) for p in raw_paths - ema_paths)))
      if ema_paths - raw_paths:
        parts.append(
          _listing(
            "EMA copy without the variable", sorted(f"{_tf_name(p)}/{TF_EMA_SUFFIX}" for p in ema_paths - raw_paths)
          )
        )
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
  sample_size=None,
  in_channels=3,
  out_channels=3,
  center_input_sample=False,
  time_embedding_type="positional",
  time_embedding_dim=None,
  freq_shift=0,
  flip_sin_to_cos=True,
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  mid_block_type="UNetMidBlock2D",
  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  block_out_channels=(224, 448, 672, 896),
  layers_per_block=2,
  mid_block_scale_factor=1,
  downsample_padding=1,
  downsample_type="conv",
  upsample_type="conv",
  dropout=0.0,
  act_fn="silu",
  attention_head_dim=8,
  norm_num_groups=32,
  attn_norm_num_groups=None,
  norm_eps=1e-5,
  resnet_time_scale_shift="default",
  add_attention=True,
  class_embed_type=None,
  num_class_embeds=None,
  num_train_timesteps=None,
)

_RESNET = {
  "norm1": "norm1",
  "conv1": "conv1",
  "temb_proj": "time_emb_proj",
  "norm2": "norm2",
  "conv2": "conv2",
  "nin_shortcut": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' attention layers before 0.15 (and in google/ddpm-* .bin files).
_ATTN_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _layer_kind(path: tuple[str, ...]) -> str:
  """conv (HWIO ↔ OIHW), dense ([in,out] ↔ Linear [out,in]), nin ([in,out] ↔ 1x1 conv) or norm."""
  name = path[-1]
  if name in _NORM_LAYERS:
    return "norm"
  if name == "class_embed":
    return "embed"
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
  if path == ("class_embed",):
    return ["class_embedding"]  # nn.Embedding(num_class_embeds, 4 ch): the same [rows, 4 ch] table
  m = re.fullmatch(r"(down|up)_(\d+)", path[0])
  if len(path) != 3:
    block = None
  elif path[0] == "mid":
    block = {
      "block_1": "mid_block.resnets.0",
      "block_2": "mid_block.resnets.1",
      "attn_1": "mid_block.attentions.0",
    }.get(path[1])
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
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}.get(path[-1])
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
    "Only the architecture of Ho et al. 2020 (google/ddpm-*) can be converted."
  )


def diffusers_architecture(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
  """Checks a UNet2DModel config.json for the DDPM architecture and reads its hyperparameters.

  Args:
    diffusers_config: the parsed config.json; absent fields take UNet2DModel's defaults.

  Returns:
    Our config fields: {"model": {ch, ch_mult, num_res_blocks,
    attn_resolutions, resamp_with_conv, num_classes}, "data": {image_size,
    channels}}, plus "out_ch" (the network's output channels). A
    `num_class_embeds` table (diffusers adds its row to the timestep embedding
    after the time MLP, as our U-Net adds `class_embed`) gives num_classes =
    num_class_embeds - 1: the last row is our null class.

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
    (
      "class_embed_type",
      lambda v: v is None,
      "None (with num_class_embeds: a learned class table added to the timestep embedding, the only "
      "class conditioning the DDPM U-Net implements)",
    ),
    (
      "num_class_embeds",
      lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2),
      "None (unconditional) or num_classes + 1 >= 2 (the last row is the null class)",
    ),
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
      raise _refuse(
        f"up_block_types[{num_levels - 1 - i}]",
        up_kind,
        f"{want_up!r} to mirror down_block_types[{i}]={kind!r} (attention at the same resolution)",
      )
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
    model=dict(
      ch=ch,
      ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=int(cfg["layers_per_block"]),
      attn_resolutions=tuple(size // 2**i for i in attn_levels),
      resamp_with_conv=True,
      num_classes=int(cfg["num_class_embeds"]) - 1 if cfg["num_class_embeds"] else 0,
    ),
    data=dict(image_size=size, channels=int(cfg["in_channels"])),
    out_ch=int(cfg["out_channels"]),
  )


def _model_folder(folder: pathlib.Path) -> pathlib.Path:
  if not folder.is_dir():
    raise errors.MissingFileError(f"{folder} is not a directory; expected a diffusers UNet2DModel folder.")
  if not (folder / DIFFUSERS_CONFIG).exists() and (folder / "unet" / DIFFUSERS_CONFIG).exists():
    return folder / "unet"  # a pipeline folder (model_index.json, unet/, scheduler/)
  if (folder / DIFFUSERS_CONFIG).exists():
    config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    if config.get("_class_name") not in (None, "UNet2DModel") and (folder / "unet" / DIFFUSERS_CONFIG).exists():
      return folder / "unet"
    return folder
  raise errors.MissingFileError(f"{folder} has no {DIFFUSERS_CONFIG}; expected a diffusers UNet2DModel folder.")


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
        f"({type(e).__name__}: {e})."
      ) from None
  if binary.exists():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise errors.MissingPackageError(
        f"{binary} is a PyTorch pickle and reading it needs torch (pip install torch); or convert it to "
        f"{DIFFUSERS_SAFETENSORS}, which needs nothing."
      ) from None
    try:
      state = torch.load(str(binary), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{binary} cannot be read ({type(e).__name__}: {e}); download it again.") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
  if (folder / (DIFFUSERS_SAFETENSORS + ".index.json")).exists():
    raise ConversionError(f"{folder} holds a sharded checkpoint, which is not supported; save it unsharded.")
  raise errors.MissingFileError(f"{folder} has neither {DIFFUSERS_SAFETENSORS} nor {DIFFUSERS_BIN}.")


def diffusers_to_params(folder: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
  """Converts a diffusers UNet2DModel folder of the DDPM architecture to our parameter tree.

  Args:
    folder: a folder with config.json and diffusion_pytorch_model.safetensors
      (or .bin, which needs torch), or a pipeline folder with such a `unet/`.

  Returns:
    (params, overrides): float32 NumPy arrays in our layout, and the config
    values the network implies, {"model": {ch, ch_mult, num_res_blocks,
    attn_resolutions, resamp_with_conv, num_classes}, "data": {image_size,
    channels}, "out_ch": output channels}.

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
  expected = _abstract_params(
    m["ch"],
    m["ch_mult"],
    m["num_res_blocks"],
    m["attn_resolutions"],
    True,
    overrides["data"]["image_size"],
    overrides["data"]["channels"],
    overrides["out_ch"],
    m["num_classes"],
  )
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
    raise ConversionError(
      "diffusers' UNet2DModel always resamples with convolutions; model.resamp_with_conv=False cannot be exported."
    )
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
    # Our class_embed (num_classes + 1 rows, the last the null class) is diffusers' class_embedding table.
    "num_class_embeds": int(model.num_classes) + 1 if model.get("num_classes", 0) else None,
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
      raise errors.ExistingFileError(f"{folder / name} already exists; refusing to overwrite it.")
  folder.mkdir(parents=True, exist_ok=True)
  st_numpy.save_file(tensors, str(folder / DIFFUSERS_SAFETENSORS), metadata={"format": "pt"})
  (folder / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
  return folder


# ----------------------------------------------------------------------------
# Configs built from the checkpoint (no --config).
# ----------------------------------------------------------------------------

PRESETS = {"cifar10": "configs/cifar.py", "celebahq": "configs/celebahq.py", "lsun": "configs/lsun_bedroom.py"}
DIFFUSERS_SCHEDULER_CONFIG = "scheduler_config.json"
# DDPMScheduler.variance_type -> our model_var_type. fixed_small_log samples with the same σ as fixed_small;
# fixed_large_log is GLIDE's log β, our fixedlarge.
_DIFFUSERS_VARIANCE = {
  "fixed_small": "fixedsmall",
  "fixed_small_log": "fixedsmall",
  "fixed_large": "fixedlarge",
  "fixed_large_log": "fixedlarge",
  "learned_range": "learned_range",
}
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "sample": "xstart", "v_prediction": "v"}


def preset_config(name: str):
  """The full config of a preset: cifar10, celebahq or lsun (configs/cifar.py, celebahq.py, lsun_bedroom.py).

  Raises:
    ConversionError: for an unknown name, listing the presets.
  """
  from diffusion_jax import config_base  # pylint: disable=g-import-not-at-top

  if name == "cifar10":
    return config_base.get_base_config()
  if name == "celebahq":
    return config_base.get_256_config("celeb_a_hq", num_train_steps=500_000, random_flip=True)
  if name == "lsun":
    return config_base.get_256_config("lsun_bedroom", num_train_steps=2_400_000, random_flip=False)
  raise ConversionError(
    f"Unknown preset {name!r}; choose one of " + ", ".join(f"--preset={k} ({v})" for k, v in PRESETS.items()) + "."
  )


def inferred_config(
  arch: Mapping[str, Any],
  *,
  image_size: int | None = None,
  preset: str | None = None,
  model_var_type: str | None = None,
  model_mean_type: str | None = None,
  learned_var_type: str = DIFFUSERS_LEARNED_VAR_TYPE,
):
  """The full config of a checkpoint: a preset's with the network read off the tensors.

  Args:
    arch: `infer_architecture(params)`.
    image_size: the image size (data.image_size); default: the preset's.
    preset: the base config (see `PRESETS`); default cifar10, configs/cifar.py.
    model_var_type: the variance type the source records (a diffusers
      scheduler's), checked against the output channels; default: the
      preset's for C output channels, `learned_var_type` for 2C.
    model_mean_type: the source's prediction type; default: the preset's (eps).
    learned_var_type: the learned variance type 2C output channels imply.

  Returns:
    The config: model.ch, ch_mult, num_res_blocks, attn_resolutions (image_size
    // 2**level of each attention level), resamp_with_conv, num_classes and
    data.channels from the tensors, data.image_size, and the diffusion's
    model_var_type with loss_type 'hybrid' for a learned variance.

  Raises:
    ConversionError: for an image size the network cannot take, or a variance
      type that contradicts the output channels.
  """
  config = preset_config(preset or "cifar10")
  if image_size is not None:
    if int(image_size) < 1:
      raise ConversionError(f"--image_size must be positive, got {image_size}.")
    config.data.image_size = int(image_size)
  size = int(config.data.image_size)
  factor = 2 ** (len(arch["ch_mult"]) - 1)
  if size % factor:
    raise ConversionError(
      f"Image size {size} is not divisible by 2^(levels-1) = {factor} for the checkpoint's "
      f"{len(arch['ch_mult'])} levels; pass the size it was trained at, e.g. --image_size={max(factor, 32)}."
    )
  for field, value in architecture_fields(arch, size).items():
    section, key = field.split(".")
    config[section][key] = value
  channels, out_ch = arch["in_channels"], arch["out_ch"]
  if out_ch == 2 * channels:
    var_type = model_var_type or learned_var_type
    if var_type not in LEARNED_VAR_TYPES:
      raise ConversionError(
        f"The network has {out_ch} = 2 x {channels} output channels (a learned variance), but its source records "
        f"the fixed variance {var_type!r}; pass --config with the variance type you mean."
      )
    config.diffusion.model_var_type = var_type
    if config.diffusion.loss_type == "mse":
      config.diffusion.loss_type = LEARNED_LOSS_TYPE
  elif out_ch == channels:
    var_type = model_var_type or config.diffusion.model_var_type
    if var_type in LEARNED_VAR_TYPES:
      raise ConversionError(
        f"The network has {out_ch} output channels for {channels} input channels (a fixed variance), but its "
        f"source records the learned variance {var_type!r}; pass --config with the variance type you mean."
      )
    config.diffusion.model_var_type = var_type
    if config.diffusion.loss_type == "hybrid":
      config.diffusion.loss_type = "mse"
  else:
    raise ConversionError(
      f"The network has {out_ch} output channels for {channels} input channels; the DDPM U-Net outputs C (a "
      "fixed variance) or 2C (a learned one), so no config describes it."
    )
  if model_mean_type:
    config.diffusion.model_mean_type = model_mean_type
  return config


def diffusers_scheduler_types(folder: str | os.PathLike) -> dict[str, str]:
  """model_var_type and model_mean_type from a diffusers folder's scheduler config, if it has one.

  Looks for `scheduler/scheduler_config.json` in the folder (a pipeline), in
  the pipeline above a `unet/` folder, and for `scheduler_config.json` itself.

  Returns:
    {} without a scheduler config; else the fields it sets, e.g.
    {"model_var_type": "fixedlarge", "model_mean_type": "eps"}.

  Raises:
    ConversionError: for a variance or prediction type we do not implement.
  """
  folder = pathlib.Path(folder)
  candidates = [folder / "scheduler" / DIFFUSERS_SCHEDULER_CONFIG, folder / DIFFUSERS_SCHEDULER_CONFIG]
  if folder.name == "unet":
    candidates.append(folder.parent / "scheduler" / DIFFUSERS_SCHEDULER_CONFIG)
  path = next((c for c in candidates if c.is_file()), None)
  if path is None:
    return {}
  try:
    scheduler = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from None
  out = {}
  variance = scheduler.get("variance_type")
  if variance is not None:
    if variance not in _DIFFUSERS_VARIANCE:
      why = (
        " (diffusers' 'learned' network outputs the variance itself, ours 'learned' its log)"
        if variance == "learned"
        else ""
      )
      raise ConversionError(
        f"{path} has variance_type={variance!r}, which has no counterpart here{why}; supported: "
        f"{', '.join(_DIFFUSERS_VARIANCE)}. Pass --config with the model_var_type you mean."
      )
    out["model_var_type"] = _DIFFUSERS_VARIANCE[variance]
  prediction = scheduler.get("prediction_type")
  if prediction is not None:
    if prediction not in _DIFFUSERS_PREDICTION:
      raise ConversionError(
        f"{path} has prediction_type={prediction!r}; supported: "
        f"{', '.join(_DIFFUSERS_PREDICTION)}. Pass --config with the model_mean_type you mean."
      )
    out["model_mean_type"] = _DIFFUSERS_PREDICTION[prediction]
  return out


def _config_summary(config) -> str:
  fields = [
    "data.image_size",
    "data.channels",
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.resamp_with_conv",
    "model.num_classes",
  ]
  text = ", ".join(f"{k}={_config_value(config, k)!r}" for k in fields)
  d = config.diffusion
  return f"{text}, diffusion.model_var_type={d.model_var_type!r}, diffusion.loss_type={d.loss_type!r}"


# ----------------------------------------------------------------------------
# Writing our checkpoint directories.
# ----------------------------------------------------------------------------


def check_config_matches(
  config, overrides: Mapping[str, Any], *, learned_var_type: str = DIFFUSERS_LEARNED_VAR_TYPE
) -> None:
  """Checks that a config describes the network a diffusers model implies (see diffusers_to_params).

  Raises:
    ConversionError: listing the differing fields and the flags that fix them.
  """
  diffs = []
  for section in ("model", "data"):
    for key, value in overrides[section].items():
      current = _config_value(config, f"{section}.{key}")
      if current != value:
        diffs.append((f"{section}.{key}", current, value))
  lines = [f"  {k}: config {c!r}, checkpoint {v!r}" for k, c, v in diffs]
  channels, out_ch = overrides["data"]["channels"], overrides["out_ch"]
  if out_ch not in (channels, 2 * channels):
    raise ConversionError(
      f"The network has {out_ch} output channels for {channels} input channels; the DDPM U-Net outputs C (a "
      "fixed variance) or 2C (a learned one), so it cannot be converted."
    )
  variance = _variance_fixes(config, out_ch, channels, learned_var_type=learned_var_type)
  if variance:
    learned = config.diffusion.model_var_type in LEARNED_VAR_TYPES
    lines.append(
      f"  output channels: config {(2 if learned else 1) * channels} (diffusion.model_var_type="
      f"{config.diffusion.model_var_type!r}), checkpoint {out_ch}"
    )
    diffs += variance
  if lines:
    raise ConversionError(
      "The config does not describe this network:\n"
      + "\n".join(lines)
      + f"\nChoose the matching config file or pass {_flags_text(diffs)}{_fix_note(diffs)}, "
      "or leave out --config to build the config from the checkpoint."
    )
  check_diffusion_config(config)


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "'(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")'"
  return str(v)


def write_checkpoint(
  directory: str | os.PathLike, *, config, params: Params, ema_params: Params | None = None, step: int = 0
):
  """Validates parameters against `config` and writes a directory our loaders accept (config.json + Orbax)."""
  validate_params(params, config)
  if ema_params is not None and ema_params is not params:
    validate_params(ema_params, config)
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  return checkpointing.save_model_checkpoint(directory, config=config, params=params, ema_params=ema_params, step=step)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

COMMANDS = ("tf2jax", "diffusers2jax", "jax2diffusers", "tf2diffusers")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file of the network (configs/cifar.py, configs/lsun_*.py, configs/celebahq.py) for "
    "tf2jax, diffusers2jax and tf2diffusers; fields can be overridden: --config.model.dropout=0.0. Without it, "
    "the config is built from the checkpoint's tensors (see --preset, --image_size).",
    lock_config=True,
  )
  return dict(
    config=config,
    preset=flags.DEFINE_string(
      "preset",
      None,
      "Without --config: the base config, one of "
      + ", ".join(f"{k} ({v})" for k, v in PRESETS.items())
      + "; the network (ch, ch_mult, blocks, attention, "
      "channels, variance) is read off the checkpoint. Default: cifar10.",
    ),
    image_size=flags.DEFINE_integer(
      "image_size",
      None,
      "Without --config: the image size (the TF tensors do not tell it; tf2jax and "
      "tf2diffusers need --image_size or --preset). diffusers2jax takes the folder's sample_size.",
    ),
    checkpoint=flags.DEFINE_string(
      "checkpoint",
      None,
      "tf2jax/tf2diffusers: the TF1 checkpoint prefix (.../model.ckpt-790000), one of its "
      "files, or its directory. Needs TensorFlow: " + TF_INSTALL_HINT,
    ),
    raw=flags.DEFINE_bool(
      "raw",
      False,
      "Convert the raw training weights instead of the EMA weights (tf2jax, tf2diffusers, "
      "jax2diffusers). tf2jax without --raw keeps both copies (params = raw, ema_params = EMA).",
    ),
    folder=flags.DEFINE_string(
      "folder",
      None,
      "diffusers2jax: a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors "
      "or .bin) or a pipeline folder with unet/ (and scheduler/, whose variance_type is used without --config).",
    ),
    workdir=flags.DEFINE_string(
      "workdir", None, "jax2diffusers: our training workdir or converted directory (or one checkpoints/<step>)."
    ),
    step=flags.DEFINE_integer(
      "step",
      None,
      "Step recorded in (tf2jax, diffusers2jax) or read from "
      "(jax2diffusers) our checkpoint; default: the TF global_step, 0, the newest.",
    ),
    out=flags.DEFINE_string(
      "out",
      None,
      "Output: our checkpoint directory (*2jax) or a diffusers folder "
      "(*2diffusers). Existing outputs are never overwritten.",
    ),
  )


def _value(f: Mapping[str, Any], name: str):
  return f[name].value if name in f else None


def _run(command: str, f: Mapping[str, Any]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  def need(name):
    if f[name].value in (None, ""):
      raise app.UsageError(f"{command} needs --{name}.")
    return f[name].value

  out = need("out")
  config = f["config"].value
  preset, image_size = _value(f, "preset") or None, _value(f, "image_size")
  if config is not None and (preset or image_size is not None):
    raise ConversionError(
      "Give either --config or --preset/--image_size (which build the config from the "
      "checkpoint), not both; drop --preset/--image_size or --config."
    )
  if preset:
    preset_config(preset)  # an unknown preset fails before any checkpoint is read
  if config is not None and command != "jax2diffusers":
    check_diffusion_config(config)  # e.g. a learned variance with loss_type='mse': before reading the checkpoint

  def built(config, base):
    logging.info("Built the config from the checkpoint (base %s): %s.", base, _config_summary(config))
    return config

  if command in ("tf2jax", "tf2diffusers"):
    if config is None and not preset and image_size is None:
      raise ConversionError(
        f"{command} without --config needs the image size, which a TF checkpoint's tensors do not tell: pass "
        "--image_size=N (e.g. 32), --preset=cifar10|celebahq|lsun, or --config=configs/cifar.py."
      )
    ckpt = read_tf_checkpoint(need("checkpoint"))
    chosen = _tf_select(ckpt, use_ema=not f["raw"].value)
    if config is None:
      config = built(
        inferred_config(
          infer_architecture(chosen), image_size=image_size, preset=preset, learned_var_type=TF_LEARNED_VAR_TYPE
        ),
        PRESETS[preset or "cifar10"],
      )
    validate_params(chosen, config, learned_var_type=TF_LEARNED_VAR_TYPE)
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
    folder = need("folder")
    params, overrides = diffusers_to_params(folder)
    if config is None:
      size = overrides["data"]["image_size"]
      if image_size is not None and image_size != size:
        raise ConversionError(
          f"--image_size={image_size}, but the diffusers model's sample_size is {size} (it places the attention "
          f"layers); pass --image_size={size} or leave it out."
        )
      types = diffusers_scheduler_types(folder)
      config = built(
        inferred_config(infer_architecture(params), image_size=size, preset=preset, **types),
        PRESETS[preset or "cifar10"],
      )
    else:
      check_config_matches(config, overrides)
    write_checkpoint(out, config=config, params=params, ema_params=params, step=f["step"].value or 0)
    logging.info("Converted %s to %s.", folder, out)
  elif command == "jax2diffusers":
    from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

    config, params, step = checkpointing.load_params(need("workdir"), use_ema=not f["raw"].value, step=f["step"].value)
    params_to_diffusers(params, config, out)
    logging.info(
      "Exported step %d (%s weights) of %s to %s.", step, "raw" if f["raw"].value else "EMA", f["workdir"].value, out
    )


def main() -> None:
  """The command: user errors (configs, paths, checkpoints) end as one `error: ...` line with exit status 2."""
  from absl import app  # pylint: disable=g-import-not-at-top

  flag_values = _define_flags()

  def run(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise app.UsageError(f"Give one command, one of {', '.join(COMMANDS)}; got {argv[1:]}. See --help.")
    cli.start()
    cli.exit_on_user_error(_run, argv[1], flag_values)

  app.run(run)


if __name__ == "__main__":
  main()
