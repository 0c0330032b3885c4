r"""DDPM on CelebA-HQ 256² (the paper's `run_celebahq.py`).

eps prediction with the posterior variance (fixedsmall, σ² = β̃), L_simple;
U-Net ch 128, ch_mult (1, 1, 2, 2, 4, 4), attention at 16², no dropout
(113,673,219 parameters); Adam 2e-5, batch 64, 0.5M steps, random flips.
The paper reports samples but no FID for CelebA-HQ.

  python -m diffusion_jax.main --config=configs/celebahq.py --workdir=/path/to/run

Activations in float32 (model.dtype), as the paper's. With
--config.model.dtype=bfloat16 the step holds 5.48 instead of 8.34 GiB of HBM
per chip on a v5e-8 and moves 6.98e10 bytes of HBM per chip at 16 images on a
v5e-4 (341 FLOPs per byte, compute-bound by the roofline): the option for a
larger batch per chip (docs/tpu_plan.md, "bfloat16 and HBM traffic").
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("celeb_a_hq", num_train_steps=500_000, random_flip=True)
