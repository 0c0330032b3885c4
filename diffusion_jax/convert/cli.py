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

import sys
from collections.abc import Mapping
from typing import Any

from absl import logging

from diffusion_jax import cli as cli_lib
from diffusion_jax.convert import architecture
from diffusion_jax.convert import diffusers
from diffusion_jax.convert import tf
from diffusion_jax.convert.common import ConversionError

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
  defined = dict(
    config=config,
    preset=flags.DEFINE_string(
      "preset",
      None,
      "Without --config: the base config, one of "
      + ", ".join(f"{k} ({v})" for k, v in architecture.PRESETS.items())
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
      "files, or its directory. Needs TensorFlow: " + tf.TF_INSTALL_HINT,
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
  # absl's --help lists the key flags of the program's main module (sys.argv[0], e.g. the package's __main__.py);
  # these are defined here, so they are declared the program's own.
  for holder in defined.values():
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
  return defined


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
  text = ", ".join(f"{k}={architecture.config_value(config, k)!r}" for k in fields)
  d = config.diffusion
  return f"{text}, diffusion.model_var_type={d.model_var_type!r}, diffusion.loss_type={d.loss_type!r}"


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
    architecture.preset_config(preset)  # an unknown preset fails before any checkpoint is read
  if config is not None and command != "jax2diffusers":
    architecture.check_diffusion_config(
      config
    )  # e.g. a learned variance with loss_type='mse': before reading the checkpoint

  def built(config, base):
    logging.info("Built the config from the checkpoint (base %s): %s.", base, _config_summary(config))
    return config

  if command in ("tf2jax", "tf2diffusers"):
    if config is None and not preset and image_size is None:
      raise ConversionError(
        f"{command} without --config needs the image size, which a TF checkpoint's tensors do not tell: pass "
        "--image_size=N (e.g. 32), --preset=cifar10|celebahq|lsun, or --config=configs/cifar.py."
      )
    ckpt = tf.read_tf_checkpoint(need("checkpoint"))
    chosen = tf.select_params(ckpt, use_ema=not f["raw"].value)
    if config is None:
      config = built(
        architecture.inferred_config(
          architecture.infer_architecture(chosen),
          image_size=image_size,
          preset=preset,
          learned_var_type=architecture.TF_LEARNED_VAR_TYPE,
        ),
        architecture.PRESETS[preset or "cifar10"],
      )
    architecture.validate_params(chosen, config, learned_var_type=architecture.TF_LEARNED_VAR_TYPE)
    if command == "tf2diffusers":
      diffusers.params_to_diffusers(chosen, config, out)
    else:
      params = ckpt["raw"] if ckpt["raw"] is not None and not f["raw"].value else chosen
      if params is not chosen:
        architecture.check_complete(params, f"The raw parameters of {ckpt['prefix']}", tf.variable_name)
      step = f["step"].value if f["step"].value is not None else (ckpt["step"] or 0)
      architecture.write_checkpoint(out, config=config, params=params, ema_params=chosen, step=step)
    logging.info("Converted %s (%s weights) to %s.", ckpt["prefix"], "raw" if f["raw"].value else "EMA", out)
  elif command == "diffusers2jax":
    folder = need("folder")
    params, overrides = diffusers.diffusers_to_params(folder)
    if config is None:
      size = overrides["data"]["image_size"]
      if image_size is not None and image_size != size:
        raise ConversionError(
          f"--image_size={image_size}, but the diffusers model's sample_size is {size} (it places the attention "
          f"layers); pass --image_size={size} or leave it out."
        )
      types = diffusers.diffusers_scheduler_types(folder)
      config = built(
        architecture.inferred_config(architecture.infer_architecture(params), image_size=size, preset=preset, **types),
        architecture.PRESETS[preset or "cifar10"],
      )
    else:
      diffusers.check_config_matches(config, overrides)
    architecture.write_checkpoint(out, config=config, params=params, ema_params=params, step=f["step"].value or 0)
    logging.info("Converted %s to %s.", folder, out)
  elif command == "jax2diffusers":
    from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

    config, params, step = checkpointing.load_params(need("workdir"), use_ema=not f["raw"].value, step=f["step"].value)
    diffusers.params_to_diffusers(params, config, out)
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
    cli_lib.start()
    cli_lib.exit_on_user_error(_run, argv[1], flag_values)

  app.run(run)
