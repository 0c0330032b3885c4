"""The config schema and its defaults, shared by every file in configs/.

The defaults are the paper's CIFAR-10 setting (Ho et al. 2020, §4 and Appendix B); a file in
`configs/` starts from `get_base_config()` and changes what differs. Configs are
`ml_collections.ConfigDict`s with the sub-dicts data, model, diffusion, optim,
training, sampling and eval.
"""

from __future__ import annotations

import ml_collections

# The settings of an `ode_bpd` evaluation (evaluation/likelihood.py), and their defaults.
ODE_BPD_DEFAULTS = dict(
  rtol=1e-5,
  atol=1e-5,
  solver="tsit5",
  estimator="rademacher",
  num_probes=1,
  max_examples=0,
  t_start=1e-3,
  step_to_knots=False,
)


def get_base_config() -> ml_collections.ConfigDict:
  """The full schema with DDPM's CIFAR-10 values."""
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"  # cifar10 | celeb_a_hq | lsun_bedroom | lsun_church_outdoor | lsun_cat | digits | folder
  data.image_size = 32  # images are center-cropped and resized to image_size x image_size
  data.channels = 3  # 3 for RGB; 1 for the grayscale digits
  data.random_flip = True  # random horizontal flips during training
  data.data_dir = ""  # tfds data_dir, or the image folder for dataset='folder'; '' = tfds default
  data.train_split = "train"  # split used for training
  data.eval_split = "test"  # split used for bits/dim
  data.skip_corrupt = False  # folder: skip unreadable image files with a warning instead of failing
  data.worker_count = 0  # grain worker processes for training input (0 = main process); fixed within a run

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128  # base channels; every ch*mult must be a multiple of 32 (GroupNorm groups)
  model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution level
  model.num_res_blocks = 2  # residual blocks per level
  model.attn_resolutions = (16,)  # resolutions (height) with self-attention
  model.dropout = 0.1  # dropout in the residual blocks
  model.resamp_with_conv = True  # convolutions in down/upsampling
  model.dtype = "float32"  # activation dtype: float32 | bfloat16 (parameters stay float32)
  model.remat = False  # rematerialise levels in the backward pass (memory for compute)
  # ddpm: the paper's initialisation (fan-average uniform; residual branches, attention outputs and the last
  # convolution at 1e-10) | pytorch: PyTorch's layer defaults (weights and biases U(±1/√fan_in)), as diffusers starts.
  model.init = "ddpm"
  model.num_classes = 0  # 0 = unconditional (the paper); K > 0: class-conditional with a null class for guidance

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"  # linear | quad | const | jsd | warmup10 | warmup50 | cosine
  diffusion.beta_start = 1e-4  # β_1
  diffusion.beta_end = 0.02  # β_T
  diffusion.num_timesteps = 1000  # T
  diffusion.model_mean_type = "eps"  # eps | xstart | xprev | v
  diffusion.model_var_type = "fixedlarge"  # fixedlarge (σ²=β) | fixedsmall (σ²=β̃) | learned | learned_range
  diffusion.loss_type = "mse"  # mse (L_simple) | kl (L_vlb, bits/dim) | hybrid (L_simple + λ L_vlb)
  diffusion.hybrid_lambda = 0.001  # λ of the hybrid loss

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4  # peak learning rate
  optim.warmup_steps = 5000  # linear warmup from lr = 0 at step 0
  # After the warmup: "constant" (the paper) or "cosine" (to end_learning_rate at step decay_steps, warmup
  # included).
  optim.lr_decay = "constant"
  optim.decay_steps = 0
  optim.end_learning_rate = 0.0
  optim.grad_clip = 1.0  # global-norm clip (0 disables)
  # The paper clipped each of its 8 TPU cores' gradients (local batch 16) before
  # averaging; clip_groups splits the global batch into that many groups, clips
  # each group's gradient and averages, independently of the device count.
  optim.clip_groups = 8
  optim.b1 = 0.9  # Adam β1
  optim.b2 = 0.999  # Adam β2
  optim.eps = 1e-8  # Adam ε
  # TF1's Adam adds ε to √v before bias correction ("epsilon hat"); False gives optax's Adam.
  optim.epsilon_hat = True
  optim.ema_decay = 0.9999  # EMA of the parameters used for sampling and evaluation
  optim.ema_warmup = False  # decay min(ema_decay, (1 + n) / (10 + n)) at step n (diffusers' EMA); False: the paper's

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch size over all devices and hosts
  training.num_train_steps = 800_000  # total optimizer steps
  training.log_every = 100  # steps between logged metrics
  training.checkpoint_every = 5000  # steps between checkpoints (one is always written at the end; 0: only there)
  training.sample_every = 20_000  # steps between sample grids (0 disables)
  training.num_grid_samples = 64  # images in a training-time sample grid
  training.grid = sampler_section("ddim", num_steps=100)  # the grid's sampler (num_steps above T are T)
  training.keep_checkpoints = 2  # checkpoints kept (the paper kept 2)
  training.seed = 0  # a run is a function of (config, seed)
  training.init_from = ""  # start a new run from these weights (a workdir or converted checkpoint)
  training.label_dropout = 0.1  # conditional models: probability of training on the null class (guidance)
  training.prefetch = 2  # global batches put on the devices ahead of the step
  training.profile_steps = 0  # > 0: a jax.profiler trace of this many steps (after the first) in workdir/profile
  # > 0: training finishes normally (final checkpoint and grid, exit status 0) at the first step that ends more
  # than this many seconds after the first step of this invocation finished (start-up, restore and the first
  # step's compilation are not counted; a resumed run gets the budget afresh). 0 = off.
  training.time_budget_s = 0.0
  # Multi-process runs: a process that has not shown a sign of life (a heartbeat file in workdir/.heartbeats,
  # written every 1/5 of this) for this many seconds is taken as lost, and every other process exits with status
  # 75 and one message. 0 = the platform's default: 300 s on TPU, 60 s elsewhere.
  training.peer_timeout_s = 0.0

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ancestral"  # ancestral | ddim | dpmpp2m | dpmpp3m | dpmpp2m_sde | dpmpp3m_sde | euler | heun
  sampling.num_steps = 1000  # steps (fewer than T respaces the schedule)
  sampling.eta = 0.0  # DDIM η (0 = deterministic)
  sampling.timestep_spacing = ""  # even | leading | trailing | linspace ('' = the sampler's default)
  sampling.sigma_schedule = ""  # euler, heun, dpmpp*: uniform | karras ('' = uniform)
  sampling.order = 0  # multistep order where a sampler family takes one (0 = the sampler's own)
  sampling.clip_denoised = True  # clip the x0 prediction to [-1, 1] (the paper's sampler)
  sampling.batch_size = 256  # global sampling batch
  sampling.num_samples = 64  # images written by --mode=sample
  sampling.use_ema = True  # sample with the EMA parameters
  sampling.labels = ""  # conditional models: class labels or names, comma-separated ('' = one row per class)
  sampling.guidance_scale = 1.0  # classifier-free guidance s: eps(x, null) + s * (eps(x, c) - eps(x, null)); 1 = none
  sampling.resample = 1  # --mode=inpaint, ancestral: RePaint's passes over each stretch (1 = none; RePaint: 10)
  sampling.jump_length = 10  # --mode=inpaint with resample > 1: RePaint's jump length

  # --mode=distill (progressive distillation, Salimans & Ho 2022; docs/distillation.md): rounds that halve the
  # teacher's deterministic DDIM steps, start_steps -> start_steps/2 -> ... -> num_steps, each a training run of a
  # student (in workdir/distill/<n>steps) that starts from its teacher and learns to take two of its steps in one.
  config.distill = distill = ml_collections.ConfigDict()
  distill.num_steps = 4  # the last student's steps (a power-of-two fraction of start_steps)
  distill.start_steps = 128  # the DDIM steps of the trained model that the first round halves (at most T)
  distill.steps_per_round = 50_000  # optimizer steps of each round's student
  distill.batch_size = 0  # global batch of the rounds (0 = training.batch_size)
  distill.learning_rate = 1e-4  # Adam's rate, cosine-decayed to 0 over each round
  distill.ema_decay = 0.999  # the students' EMA (its parameters are the next round's teacher and are sampled)
  distill.parameterisation = "v"  # the students' output: v | xstart (an eps-predicting teacher is converted)
  distill.weighting = "truncated_snr"  # max(SNR, 1) (the paper's) | snr_plus_one (the v error)
  distill.clip_denoised = True  # clip the teacher's x0 predictions to [-1, 1], as its DDIM sampler does
  # Set in each round's config by --mode=distill (a config naming a teacher trains a student):
  distill.teacher = ""  # the teacher's workdir (its EMA parameters)
  distill.teacher_steps = 0  # the teacher's steps; the student takes half as many
  distill.student_steps = 0

  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.metrics = ("bpd", "rate_distortion")  # --mode=eval runs these entries of config.evals
  eval_config.num_samples = 50_000  # samples for FID/IS
  eval_config.batch_size = 256  # global batch for bits/dim and Inception
  eval_config.bpd_max_examples = 0  # 0 = the whole split (remainder reported)
  eval_config.fid_stats_path = ""  # .npz with mu, sigma of the reference set ('' = compute from data)
  eval_config.inception_weights = ""  # local pt_inception-2015-12-05 weights ('' = cache/download)
  eval_config.seed = 1  # rng for evaluation noise and samples
  eval_config.drop_remainder = True  # bits/dim: drop the last partial batch (the paper's protocol) instead of padding
  eval_config.clip_denoised = True  # bits/dim: clip the x0 predictions in the bound terms (the paper's protocol)
  eval_config.fid_split = ""  # split of the FID reference statistics ('' = data.train_split, as the paper)
  eval_config.fid_stats_max_examples = 0  # images for the reference statistics (0 = the whole split)
  eval_config.random_inception = False  # smoke tests only: random Inception weights, FID/IS not comparable

  # Evaluations by name (evaluation/evaluators/): --mode=eval runs those eval.metrics names; training runs those
  # with every > 0 (every N steps) or at_end=True (when it finishes). Samples: num_samples (0 = eval.num_samples)
  # drawn with the entry's sampler (sampler '' = config.sampling's).
  config.evals = evals = ml_collections.ConfigDict()
  evals.bpd = eval_entry("bpd")  # bits/dim of data.eval_split (the paper's protocol by default)
  evals.rate_distortion = eval_entry("rate_distortion")  # the rate–distortion curve of the same computation
  evals.fid = eval_entry("fid")  # FID and Inception Score (dataset=digits: the digit-classifier metric)
  evals.digits = eval_entry("digits", num_samples=500, sampler=sampler_section("ddim", num_steps=100))
  # Bits/dim of data.eval_split through the probability-flow ODE (evaluation/likelihood.py): diffrax's solver
  # (tsit5 | dopri5) with these tolerances, the trace estimator (rademacher | gaussian | exact) with num_probes
  # probes, uniform dequantisation; max_examples 0 = the whole split; t_start: where the data sits in continuous
  # time (timestep units); step_to_knots: end steps at every timestep (at least T steps; exact for short schedules).
  evals.ode_bpd = eval_entry("ode_bpd", **ODE_BPD_DEFAULTS)

  return config


def sampler_section(sampler: str = "", *, num_steps: int = 0, eta: float = 0.0) -> ml_collections.ConfigDict:
  """A sampler's settings (`samplers.SamplerSpec.from_config`): '' and 0 take the sampler's defaults."""
  return ml_collections.ConfigDict(
    dict(sampler=sampler, num_steps=num_steps, eta=eta, timestep_spacing="", sigma_schedule="", order=0)
  )


def eval_entry(
  kind: str, *, every: int = 0, at_end: bool = False, num_samples: int = 0, sampler=None, **extras
) -> ml_collections.ConfigDict:
  """One entry of `config.evals`: its kind, when it runs in training, its sample count and sampler.

  `extras` are the kind's own settings (e.g. the ODE tolerances of `ode_bpd`), added to the common fields.
  """
  return ml_collections.ConfigDict(
    dict(
      kind=kind,
      every=every,
      at_end=at_end,
      num_samples=num_samples,
      sampling=sampler_section() if sampler is None else sampler,
      **extras,
    )
  )


# Keys of earlier versions, and where their values now live.
_RENAMED = {
  "training.grid_sampler": "training.grid.sampler",
  "training.grid_num_steps": "training.grid.num_steps",
  "training.final_eval": "evals.digits.at_end",
  "training.final_eval_samples": "evals.digits.num_samples",
  "training.final_eval_sampler": "evals.digits.sampling.sampler",
  "training.final_eval_num_steps": "evals.digits.sampling.num_steps",
  "training.final_eval_sigma_schedule": "evals.digits.sampling.sigma_schedule",
}


def upgrade(config) -> ml_collections.ConfigDict:
  """A config (a ConfigDict or the dict of a workdir's config.json) in this version's schema.

  Keys of earlier versions move to their new places (with one warning naming them); sections and entries this
  version added take their defaults. A ConfigDict already in the schema comes back unchanged (the same object).
  """
  data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  moved = []
  for old, new in _RENAMED.items():
    section, key = old.split(".")
    if key in (data.get(section) or {}):
      value = data[section].pop(key)
      node = data
      *parents, leaf = new.split(".")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = value
      moved.append(f"{old} -> {new}")
  base = get_base_config().to_dict()
  evals = data.setdefault("evals", {})
  for name in base["evals"]:
    evals[name] = _merged(base["evals"][name], evals.get(name, {}))
  for name, entry in evals.items():
    if name not in base["evals"]:
      evals[name] = _merged(eval_entry(str(entry.get("kind", ""))).to_dict(), entry)
  for section in ("distill",):  # sections this version added
    data[section] = _merged(base[section], data.get(section, {}))
  if "training" in data:
    data["training"]["grid"] = _merged(base["training"]["grid"], data["training"].get("grid", {}))
  if moved:
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.warning("This config uses keys of an earlier version; read as: %s.", ", ".join(moved))
  if isinstance(config, ml_collections.ConfigDict) and data == config.to_dict():
    return config
  return ml_collections.ConfigDict(data)


def _merged(default: dict, given: dict) -> dict:
  out = dict(default)
  for k, v in given.items():
    out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def get_256_config(dataset: str, *, num_train_steps: int, random_flip: bool) -> ml_collections.ConfigDict:
  """The paper's 256² setting (CelebA-HQ and LSUN): §4 and Appendix B."""
  config = get_base_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.random_flip = random_flip
  config.data.eval_split = ""  # these datasets have no test split
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "fixedsmall"
  config.optim.learning_rate = 2e-5
  config.optim.clip_groups = 8  # 8 TPU cores × 8 images
  config.training.batch_size = 64
  config.training.num_train_steps = num_train_steps
  config.sampling.batch_size = 64
  config.eval.num_samples = 50_000
  config.eval.metrics = ("fid",)
  return config
