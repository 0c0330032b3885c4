"""Import and export of pretrained DDPM weights: the paper's TF checkpoints, diffusers folders, our checkpoints.

One module per part, all working on nested dicts of NumPy arrays in our U-Net's
layout (models/unet.py):

* `tf`: the paper's TensorFlow 1 checkpoints, read (`tf_checkpoint_to_params`,
  `read_tf_checkpoint`); reading needs TensorFlow, imported only then.
* `diffusers`: diffusers' UNet2DModel folders of the DDPM architecture, read
  (`diffusers_to_params`) and written (`params_to_diffusers`,
  `diffusers_config_for`).
* `architecture`: the U-Net read off a tree (`infer_architecture`), trees and
  configs checked against each other (`validate_params`, `expected_shapes`),
  configs built from a checkpoint (`inferred_config`, `preset_config`,
  `PRESETS`), our checkpoint directories written (`write_checkpoint`).
* `common`: `ConversionError` and the parameter-tree helpers the others share.
* `cli`: the command line, `python -m diffusion_jax.convert
  {tf2jax,diffusers2jax,jax2diffusers,tf2diffusers}`; its docstring (and
  `--help`) documents the commands and the formats.

The names below are the library's: importing this package imports neither
TensorFlow, torch, diffusers nor JAX (they are imported by the functions that
need them).
"""

from diffusion_jax.convert.architecture import PRESETS
from diffusion_jax.convert.architecture import check_diffusion_config
from diffusion_jax.convert.architecture import expected_shapes
from diffusion_jax.convert.architecture import infer_architecture
from diffusion_jax.convert.architecture import inferred_config
from diffusion_jax.convert.architecture import preset_config
from diffusion_jax.convert.architecture import validate_params
from diffusion_jax.convert.architecture import write_checkpoint
from diffusion_jax.convert.common import ConversionError
from diffusion_jax.convert.diffusers import check_config_matches
from diffusion_jax.convert.diffusers import diffusers_architecture
from diffusion_jax.convert.diffusers import diffusers_config_for
from diffusion_jax.convert.diffusers import diffusers_scheduler_types
from diffusion_jax.convert.diffusers import diffusers_to_params
from diffusion_jax.convert.diffusers import params_to_diffusers
from diffusion_jax.convert.tf import read_tf_checkpoint
from diffusion_jax.convert.tf import tf_checkpoint_to_params

__all__ = (
  "PRESETS",
  "ConversionError",
  "check_config_matches",
  "check_diffusion_config",
  "diffusers_architecture",
  "diffusers_config_for",
  "diffusers_scheduler_types",
  "diffusers_to_params",
  "expected_shapes",
  "infer_architecture",
  "inferred_config",
  "params_to_diffusers",
  "preset_config",
  "read_tf_checkpoint",
  "tf_checkpoint_to_params",
  "validate_params",
  "write_checkpoint",
)
