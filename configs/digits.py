r"""The offline quickstart: DDPM on the 8×8 handwritten digits that ship with the package.

Runs on a laptop CPU in minutes, no download:

  python -m diffusion_jax.main --config=configs/digits.py --workdir=runs/digits

and writes sample grids to runs/digits/samples/. Same math as the paper
(eps, fixedlarge, L_simple, linear β, T = 1000), a small U-Net started from
PyTorch's layer initialisation.
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
  # PyTorch's layer defaults instead of the paper's initialisation (whose residual branches start at zero): at
  # equal wall time higher IS and confidence on the digit metric (benchmarks/README.md, "Digits quickstart recipe").
  config.model.init = "pytorch"
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.lr_decay = "cosine"  # the last steps refine at a small learning rate
  config.optim.decay_steps = 4000
  # The cosine ends at 2e-4 rather than 0: the EMA then still averages moving weights (higher recall and a lower
  # Fréchet distance at the same steps; benchmarks/README.md, "Digits quickstart recipe").
  config.optim.end_learning_rate = 2e-4
  config.optim.clip_groups = 1
  config.optim.ema_decay = 0.999
  config.optim.ema_warmup = True  # min(0.999, (1 + n) / (10 + n)): the average tracks the early, fast-moving weights
  config.training.batch_size = 64
  # Trains num_train_steps steps, or stops at 525 s of wall time (the loop after the first step; start-up and
  # compilation not counted) on a slower machine; then the final checkpoint, grid and evaluation. The recipe's
  # changes, each measured with the digit metric: benchmarks/README.md, "Digits quickstart recipe".
  config.training.time_budget_s = 525.0
  config.training.num_train_steps = 4000
  config.training.log_every = 500
  config.training.checkpoint_every = 2000
  config.training.sample_every = 2000
  config.training.num_grid_samples = 64
  # DPM-Solver++(2M) SDE: 20 network calls per grid and per evaluation sample instead of the paper's 1000.
  config.training.grid = config_base.sampler_section("dpmpp2m_sde", num_steps=20)
  # The digit-classifier figures of the final EMA model, in runs/digits/eval/digits_step_*.json.
  config.evals.digits.update(at_end=True, num_samples=1000)
  config.evals.digits.sampling = config_base.sampler_section("dpmpp2m_sde", num_steps=20)
  # --mode=distill: students of 64, 32, …, 1 steps from the DDIM sampler of 128 steps (docs/distillation.md).
  config.distill.start_steps = 128
  config.distill.num_steps = 1
  config.distill.steps_per_round = 1500
  config.distill.learning_rate = 3e-4
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 100
  config.sampling.batch_size = 256
  config.sampling.num_samples = 256
  config.eval.batch_size = 256
  config.eval.num_samples = 1000
  return config
