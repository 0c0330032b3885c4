r"""DDPM on LSUN Cat 256² (the paper's `run_lsun.py`).

1.8M steps (released checkpoint at 1,761,000). Flips conflict in the sources:
the paper flips every dataset but Bedroom, while the script's docstring passes
`--randflip 0` for Cat. We follow the paper (flips on); set
`--config.data.random_flip=False` for the script's choice. Paper FID 19.75.

  python -m diffusion_jax.main --config=configs/lsun_cat.py --workdir=/path/to/run

Activations in float32 (model.dtype), as the paper's. With
--config.model.dtype=bfloat16 the step holds 5.48 instead of 8.34 GiB of HBM
per chip on a v5e-8 and moves 6.98e10 bytes of HBM per chip at 16 images on a
v5e-4 (341 FLOPs per byte, compute-bound by the roofline): the option for a
larger batch per chip (docs/tpu_plan.md, "bfloat16 and HBM traffic").
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("lsun_cat", num_train_steps=1_800_000, random_flip=True)
