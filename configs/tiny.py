r"""A tiny configuration for tests: 8×8 grayscale digits, a 2-level U-Net, T = 20.

python -m diffusion_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from diffusion_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.diffusion.num_timesteps = 20
  config.diffusion.beta_end = 0.2
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.optim.clip_groups = 1
  config.optim.ema_decay = 0.9
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every = 10  # a 40-step run prints a screenful; tests that watch steps pass log_every=1
  config.training.checkpoint_every = 20
  config.training.sample_every = 0
  config.training.num_grid_samples = 4
  config.training.grid.num_steps = 5
  config.sampling.num_steps = 20
  config.sampling.batch_size = 8
  config.sampling.num_samples = 8
  config.eval.batch_size = 8
  config.eval.num_samples = 16
  return config
