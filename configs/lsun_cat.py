r"""DDPM on LSUN Cat 256² (the paper's `run_lsun.py`).

1.8M steps (released checkpoint at 1,761,000). Flips conflict in the sources:
the paper flips every dataset but Bedroom, while the script's docstring passes
`--randflip 0` for Cat. We follow the paper (flips on); set
`--config.data.random_flip=False` for the script's choice. Paper FID 19.75.

  python -m diffusion_jax.main --config=configs/lsun_cat.py --workdir=/path/to/run
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_256_config("lsun_cat", num_train_steps=1_800_000, random_flip=True)
