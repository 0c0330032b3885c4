r"""DDPM on LSUN Bedroom 256² (the paper's `run_lsun.py`).

Same network and optimizer as CelebA-HQ; 2.4M steps (released checkpoint at
2,388,000). Flips: the paper says every dataset but Bedroom is flipped, so
flips are off here. Paper FID 6.36 (4.90 for the larger model).

  python -m diffusion_jax.main --config=configs/lsun_bedroom.py --workdir=/path/to/run

Activations in float32 (model.dtype), as the paper's. With
--config.model.dtype=bfloat16 the step holds 5.48 instead of 8.34 GiB of HBM
per chip on a v5e-8 and moves 6.98e10 bytes of HBM per chip at 16 images on a
v5e-4 (341 FLOPs per byte, compute-bound by the roofline): the option for a
larger batch per chip (docs/tpu_plan.md, "bfloat16 and HBM traffic").
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("lsun_bedroom", num_train_steps=2_400_000, random_flip=False)
