"""diffusers' UNet2DModel folders of the DDPM architecture, read into and written from our parameter tree.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or the
`.bin` pickle, which needs torch to read); a pipeline folder holds them in
`unet/`, and its `scheduler/scheduler_config.json` tells the variance and
prediction types. The google/ddpm-cifar10-32, google/ddpm-{celebahq,church,
bedroom,cat}-256 and google/ddpm-ema-*-256 models have our architecture;
`diffusers_architecture` refuses any other UNet2DModel, naming the config
field that differs.

The tensors map one to one: module names are renamed (`down_0/block_0/conv1`
is `down_blocks.0.resnets.0.conv1`, attention layers also under their names
before diffusers 0.15), convolutions go OIHW ↔ HWIO and dense and 1x1 layers
[out, in] ↔ [in, out]. Class-conditional networks (model.num_classes = K > 0:
`class_embed/embedding` of K + 1 rows, the last the null class) are
UNet2DModels with num_class_embeds = K + 1; both add the class row to the
timestep embedding after the time MLP.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from diffusion_jax import errors
from diffusion_jax.convert import architecture
from diffusion_jax.convert import common
from diffusion_jax.convert.common import ConversionError
from diffusion_jax.convert.common import Params

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"

# ----------------------------------------------------------------------------
# UNet2DModel's names and tensor layouts.
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
  if name in common.NORM_LAYERS:
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
    raise ConversionError(f"No diffusers counterpart for parameter {common.fmt(path)}.")
  if ".resnets." in block and path[2] in _RESNET:
    return [f"{block}.{_RESNET[path[2]]}"]
  if ".attentions." in block and path[2] in _ATTN:
    new = _ATTN[path[2]]
    return [f"{block}.{new}"] + ([f"{block}.{_ATTN_OLD[new]}"] if new in _ATTN_OLD else [])
  raise ConversionError(f"No diffusers counterpart for parameter {common.fmt(path)}.")


def _diffusers_keys(path: tuple[str, ...], num_levels: int) -> list[str]:
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}.get(path[-1])
  if leaf is None:
    raise ConversionError(f"No diffusers counterpart for parameter {common.fmt(path)}.")
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


# ----------------------------------------------------------------------------
# Reading a UNet2DModel folder.
# ----------------------------------------------------------------------------


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
  expected = architecture.abstract_params(
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
    parts.append(common.listing("missing", missing))
  if unused:
    parts.append(common.listing("unused", unused))
  if wrong:
    parts.append(common.listing("shape mismatches", wrong))
  if parts:
    raise ConversionError(f"The weights in {folder} do not match its {DIFFUSERS_CONFIG}:\n" + "\n".join(parts))
  return common.unflatten(flat), overrides


# ----------------------------------------------------------------------------
# Writing a UNet2DModel folder.
# ----------------------------------------------------------------------------


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
    "out_channels": int(out_ch if out_ch is not None else architecture.model_out_ch(config)),
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

  architecture.validate_params(params, config)
  out_ch = architecture.infer_architecture(params)["out_ch"]
  diffusers_config = diffusers_config_for(config, out_ch=out_ch)
  num_levels = len(config.model.ch_mult)
  tensors = {}
  for path, value in common.flatten(params).items():
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
# The scheduler's variance and prediction types, and configs checked against a folder.
# ----------------------------------------------------------------------------

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


def check_config_matches(
  config, overrides: Mapping[str, Any], *, learned_var_type: str = architecture.DIFFUSERS_LEARNED_VAR_TYPE
) -> None:
  """Checks that a config describes the network a diffusers model implies (see diffusers_to_params).

  Raises:
    ConversionError: listing the differing fields and the flags that fix them.
  """
  diffs = []
  for section in ("model", "data"):
    for key, value in overrides[section].items():
      current = architecture.config_value(config, f"{section}.{key}")
      if current != value:
        diffs.append((f"{section}.{key}", current, value))
  lines = [f"  {k}: config {c!r}, checkpoint {v!r}" for k, c, v in diffs]
  channels, out_ch = overrides["data"]["channels"], overrides["out_ch"]
  if out_ch not in (channels, 2 * channels):
    raise ConversionError(
      f"The network has {out_ch} output channels for {channels} input channels; the DDPM U-Net outputs C (a "
      "fixed variance) or 2C (a learned one), so it cannot be converted."
    )
  variance = architecture.variance_fixes(config, out_ch, channels, learned_var_type=learned_var_type)
  if variance:
    learned = config.diffusion.model_var_type in architecture.LEARNED_VAR_TYPES
    lines.append(
      f"  output channels: config {(2 if learned else 1) * channels} (diffusion.model_var_type="
      f"{config.diffusion.model_var_type!r}), checkpoint {out_ch}"
    )
    diffs += variance
  if lines:
    raise ConversionError(
      "The config does not describe this network:\n"
      + "\n".join(lines)
      + f"\nChoose the matching config file or pass {architecture.flags_text(diffs)}{architecture.fix_note(diffs)}, "
      "or leave out --config to build the config from the checkpoint."
    )
  architecture.check_diffusion_config(config)
