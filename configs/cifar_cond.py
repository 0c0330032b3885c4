r"""The paper's CIFAR-10 model, class-conditional with classifier-free guidance (Ho & Salimans 2022).

configs/cifar.py plus `model.num_classes = 10` (a learned class embedding added
to the timestep embedding, with a null class) and 10% label dropout. The
parameter count grows by 11 × 512 (the embedding table).

  python -m diffusion_jax.main --config=configs/cifar_cond.py --workdir=/path/to/run
"""

from diffusion_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance_scale = 2.0
  return config
