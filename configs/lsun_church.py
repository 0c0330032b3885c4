r"""DDPM on LSUN Church 256² (the paper's `run_lsun.py`).

1.2M steps in the paper (the released checkpoint is at step 4,432,000), random
flips. Paper FID 7.89.

  python -m diffusion_jax.main --config=configs/lsun_church.py --workdir=/path/to/run

Activations in float32 (model.dtype), as the paper's. With
--config.model.dtype=bfloat16 the step holds 5.48 instead of 8.34 GiB of HBM
per chip on a v5e-8 and moves 6.98e10 bytes of HBM per chip at 16 images on a
v5e-4 (341 FLOPs per byte, compute-bound by the roofline): the option for a
larger batch per chip (docs/tpu_plan.md, "bfloat16 and HBM traffic").
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("lsun_church_outdoor", num_train_steps=1_200_000, random_flip=True)
