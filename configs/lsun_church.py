r"""DDPM on LSUN Church 256² (the paper's `run_lsun.py`).

1.2M steps in the paper (the released checkpoint is at step 4,432,000), random
flips. Paper FID 7.89.

  python -m diffusion_jax.main --config=configs/lsun_church.py --workdir=/path/to/run
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("lsun_church_outdoor", num_train_steps=1_200_000, random_flip=True)
