r"""The offline quickstart: DDPM on the 8×8 handwritten digits that ship with the package.

Runs on a laptop CPU in minutes, no download:

  python -m diffusion_jax.main --config=configs/digits.py --workdir=runs/digits

and writes sample grids to runs/digits/samples/. Same math as the paper
(eps, fixedlarge, L_simple, linear β, T = 1000), a small U-Net.
"""

from diffusion_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.clip_groups = 1
  config.optim.ema_decay = 0.995
  config.training.batch_size = 64
  config.training.num_train_steps = 2000
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.training.num_grid_samples = 64
  config.training.grid_sampler = "ancestral"  # the paper's sampler: crisper than DDIM on this small model
  config.training.grid_num_steps = 1000
  config.training.final_eval = True  # digit-classifier figures of the final EMA model in runs/digits/eval/
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 100
  config.sampling.batch_size = 256
  config.sampling.num_samples = 256
  config.eval.batch_size = 256
  config.eval.num_samples = 1000
  return config
