"""diffusion_jax: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) in JAX/Flax.

The public API is loaded lazily, so `import diffusion_jax` is cheap:

  model = diffusion_jax.load_model("/path/to/workdir")
  images = diffusion_jax.sample_fn(model, 16, jax.random.PRNGKey(0), sampler="ddim", num_steps=50)

On a CPU, call `diffusion_jax.set_xla_cpu_options()` before the first JAX
computation for the XLA:CPU options the command line sets for itself
(diffusion_jax/xla_flags.py); importing the package has no side effects.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
  "load_model": "diffusion_jax.api",
  "sample_fn": "diffusion_jax.api",
  "interpolate_fn": "diffusion_jax.api",
  "progressive_fn": "diffusion_jax.api",
  "edit_fn": "diffusion_jax.api",
  "encode_fn": "diffusion_jax.api",
  "decode_fn": "diffusion_jax.api",
  "inpaint_fn": "diffusion_jax.api",
  "likelihood_fn": "diffusion_jax.api",
  "save_image_grid": "diffusion_jax.api",
  "LoadedModel": "diffusion_jax.api",
  "GaussianDiffusion": "diffusion_jax.diffusion",
  "get_beta_schedule": "diffusion_jax.schedules",
  "UNet": "diffusion_jax.models.unet",
  "set_xla_cpu_options": "diffusion_jax.xla_flags",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
