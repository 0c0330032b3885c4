"""The DDPM U-Net's architecture: read off parameter trees, checked against configs, turned into configs.

Every format converts to and from our parameter tree (models/unet.py's
layout), so the checks live here, once:

* `infer_architecture(params)`: ch, ch_mult, num_res_blocks, the attention
  levels, resamp_with_conv, num_classes and the input/output channels, read
  off the tensors (the image size is not in them).
* `validate_params(params, config)`: every parameter against the U-Net the
  config builds (shapes from `jax.eval_shape`, nothing computed); mismatches
  are listed by path, with the `--config.*` overrides that describe the
  checkpoint. `check_diffusion_config` checks that the variance and loss
  types fit each other.
* `inferred_config(arch, ...)`: the full config of a checkpoint, a preset's
  (`PRESETS`) with the network read off the tensors and the variance its
  output channels imply.
* `write_checkpoint`: parameters validated against their config, written as
  the directory our loaders read (config.json + Orbax).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax.convert import common
from diffusion_jax.convert.common import ConversionError
from diffusion_jax.convert.common import Params

# ----------------------------------------------------------------------------
# The network's hyperparameters, read off a parameter tree.
# ----------------------------------------------------------------------------


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
  return {common.fmt(p): tuple(np.shape(v)) for p, v in common.flatten(tree).items()}


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


# ----------------------------------------------------------------------------
# The parameters of a network, and parameter trees and configs checked against them.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def abstract_params(
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
  return {path: tuple(v.shape) for path, v in common.flatten(variables["params"]).items()}


def _expected_from_architecture(arch: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  num_levels = len(arch["ch_mult"])
  image_size = 4 * 2 ** (num_levels - 1)  # any size divisible by 2^(levels-1): the shapes do not depend on it
  return abstract_params(
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


def model_out_ch(config) -> int:
  """The output channels of the network a full config builds: C, or 2C for a learned variance."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  return runtime.build_diffusion(config).model_output_channels(config.data.channels)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
  """{'down_0/block_0/conv1/kernel': shape, ...} of the U-Net a full config (model, data, diffusion) describes."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  model = runtime.build_network(config)
  shapes = abstract_params(
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
  return {common.fmt(p): s for p, s in shapes.items()}


def _compare(
  params: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]], fmt=common.fmt
) -> list[str]:
  flat = common.flatten(params)
  missing = sorted(fmt(p) for p in expected if p not in flat)
  unexpected = sorted(fmt(p) for p in flat if p not in expected)
  wrong = sorted(
    f"{fmt(p)}: checkpoint {tuple(np.shape(flat[p]))}, model {s}"
    for p, s in expected.items()
    if p in flat and tuple(np.shape(flat[p])) != s
  )
  parts = []
  if missing:
    parts.append(common.listing("missing from the checkpoint", missing))
  if unexpected:
    parts.append(common.listing("in the checkpoint but not in the model", unexpected))
  if wrong:
    parts.append(common.listing("shape mismatches", wrong))
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


def config_value(config, field: str) -> Any:
  """A config field named "section.key", lists as tuples; a config without model.num_classes has 0."""
  section, key = field.split(".")
  value = config[section].get(key, 0 if key == "num_classes" else None)
  return tuple(value) if isinstance(value, (list, tuple)) else value


def variance_fixes(
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


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "'(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")'"
  return str(v)


def flags_text(diffs: list[tuple[str, Any, Any]]) -> str:
  """The `--config.<field>=<value>` flags that set the wanted values of (field, current, wanted) triples."""
  return " ".join(f"--config.{k}={_flag_value(v)}" for k, _, v in diffs)


def fix_note(diffs: list[tuple[str, Any, Any]]) -> str:
  """A note in parentheses on fixes whose reason is not obvious (a learned variance's loss type), else ""."""
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
  expected = abstract_params(
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
      (k, config_value(config, k), v)
      for k, v in architecture_fields(arch, size).items()
      if config_value(config, k) != v
    ]
    diffs += variance_fixes(config, arch["out_ch"], arch["in_channels"], learned_var_type=learned_var_type)
    if diffs:
      fix = (
        "Choose the matching config file or pass "
        + flags_text(diffs)
        + fix_note(diffs)
        + ", or leave out --config to build the config from the checkpoint (see --preset, --image_size)."
      )
  raise ConversionError(
    f"The checkpoint holds {found}, which does not match the model of the config (model.ch={model.ch}, "
    f"model.ch_mult={tuple(model.ch_mult)}, model.num_res_blocks={model.num_res_blocks}, "
    f"model.attn_resolutions={tuple(model.attn_resolutions)}, model.resamp_with_conv={model.resamp_with_conv}, "
    f"model.num_classes={model.num_classes}, data.channels={config.data.channels} at data.image_size={size}, "
    f"out_ch={out_ch} from model_var_type={config.diffusion.model_var_type!r}).\n" + fix + "\n" + "\n".join(parts)
  )


def check_complete(params: Mapping[str, Any], source: str, fmt=common.fmt) -> None:
  """Checks a converted tree against the U-Net its own shapes imply (no config needed)."""
  arch = infer_architecture(params)
  parts = _compare(params, _expected_from_architecture(arch), fmt)
  if parts:
    raise ConversionError(f"{source} is not a complete DDPM U-Net with {_describe(arch)}:\n" + "\n".join(parts))


# ----------------------------------------------------------------------------
# Configs built from the checkpoint (no --config).
# ----------------------------------------------------------------------------


PRESETS = {"cifar10": "configs/cifar.py", "celebahq": "configs/celebahq.py", "lsun": "configs/lsun_bedroom.py"}


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


# ----------------------------------------------------------------------------
# Writing our checkpoint directories.
# ----------------------------------------------------------------------------


def write_checkpoint(
  directory: str | os.PathLike, *, config, params: Params, ema_params: Params | None = None, step: int = 0
):
  """Validates parameters against `config` and writes a directory our loaders accept (config.json + Orbax)."""
  validate_params(params, config)
  if ema_params is not None and ema_params is not params:
    validate_params(ema_params, config)
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  return checkpointing.save_model_checkpoint(directory, config=config, params=params, ema_params=ema_params, step=step)
