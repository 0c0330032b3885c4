"""The PyTorch baseline: diffusers' `UNet2DModel` configured as our U-Net, trained and sampled like ours.

The network is `UNet2DModel(**convert.diffusers_config_for(config))`, which for
configs/cifar.py is the paper's CIFAR-10 model (35,746,307 parameters, the
same as ours; the paper's Appendix B gives 35.7M). A training step does the work of our
`train_step` with `clip_groups=1`: random t, x_t = q_sample(x_0, t, ε), the ε
MSE, backward, global-norm clipping, Adam, and the EMA update. Sampling runs
the ancestral reverse step (ε prediction, x_0 clipping) in a Python loop.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


def import_torch():
  """(torch, diffusers), or None if either is missing."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch, diffusers


def setup(torch) -> str:
  """Uses every core for intra-op work; returns the device name ('cuda' or 'cpu')."""
  torch.set_num_threads(os.cpu_count() or 1)
  if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return "cuda"
  return "cpu"


def autocast_supported(torch, device: str) -> bool:
  if device == "cuda":
    return torch.cuda.is_bf16_supported()
  return True  # CPU autocast to bfloat16 exists; whether it is fast depends on the CPU


def build_unet(config, torch, diffusers, device: str):
  """diffusers' UNet2DModel with the architecture of `config` (our U-Net), in float32."""
  from diffusion_jax import convert  # pylint: disable=g-import-not-at-top

  cfg = convert.diffusers_config_for(config)
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
  model = diffusers.UNet2DModel(**cfg)
  return model.to(device)


def _sync(torch, device):
  if device == "cuda":
    torch.cuda.synchronize()


def _tables(diffusion, torch, device) -> dict[str, Any]:
  def t(name):
    return torch.as_tensor(np.array(getattr(diffusion, name), np.float32), device=device)

  return {
    name: t(name)
    for name in (
      "sqrt_alphas_cumprod",
      "sqrt_one_minus_alphas_cumprod",
      "betas",
      "sqrt_recip_alphas_cumprod",
      "sqrt_recipm1_alphas_cumprod",
      "posterior_mean_coef1",
      "posterior_mean_coef2",
      "fixedlarge_log_variance",
      "posterior_log_variance_clipped",
    )
  }


class TrainStep:
  """One optimizer step of the baseline; `run(n)` does n steps and syncs.

  Args:
    config: the run config (model, data, optim sections).
    diffusion: our GaussianDiffusion (its q_sample tables are used).
    batch_size: images per step.
    compile: wrap the network in `torch.compile`.
    autocast: run the forward pass under bfloat16 autocast (parameters and
      optimizer stay float32, like our bf16 mode).
  """

  def __init__(self, config, diffusion, batch_size: int, *, compile: bool, autocast: bool, seed: int = 0):
    torch, diffusers = import_torch()
    self.torch = torch
    self.device = setup(torch)
    torch.manual_seed(seed)
    self.model = build_unet(config, torch, diffusers, self.device).train()
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    fused = self.device == "cuda"
    self.opt = torch.optim.Adam(
      self.params,
      lr=config.optim.learning_rate,
      betas=(config.optim.b1, config.optim.b2),
      eps=config.optim.eps,
      fused=fused or None,
      foreach=None if fused else True,
    )
    self.grad_clip = float(config.optim.grad_clip)
    self.ema_decay = float(config.optim.ema_decay)
    self.num_timesteps = diffusion.num_timesteps
    self.tables = _tables(diffusion, torch, self.device)
    self.forward = torch.compile(self.model) if compile else self.model
    self.autocast = autocast
    c, s = config.data.channels, config.data.image_size
    self.x0 = torch.rand((batch_size, c, s, s), device=self.device) * 2 - 1
    self.compile_seconds = None
    if compile:
      t0 = time.perf_counter()
      self.run(1)
      self.compile_seconds = time.perf_counter() - t0

  def _step(self):
    torch = self.torch
    b = self.x0.shape[0]
    t = torch.randint(0, self.num_timesteps, (b,), device=self.device)
    noise = torch.randn_like(self.x0)
    x_t = (
      self.tables["sqrt_alphas_cumprod"][t].view(b, 1, 1, 1) * self.x0
      + self.tables["sqrt_one_minus_alphas_cumprod"][t].view(b, 1, 1, 1) * noise
    )
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      out = self.forward(x_t, t).sample
    loss = torch.mean(torch.square(out.float() - noise))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return loss

  def run(self, n: int) -> None:
    for _ in range(n):
      self._step()
    _sync(self.torch, self.device)


class AncestralSampler:
  """The paper's sampler (ε model, x_0 clipping, σ² from the diffusion's variance type) over `num_steps` steps.

  Steps T-1 … T-num_steps of the full chain are run (each costs what any step
  costs), so `run(1)` times num_steps network calls at batch `batch_size`.
  """

  def __init__(
    self, config, diffusion, batch_size: int, num_steps: int, *, compile: bool, autocast: bool, seed: int = 0
  ):
    torch, diffusers = import_torch()
    if diffusion.model_mean_type != "eps" or diffusion.model_var_type not in ("fixedlarge", "fixedsmall"):
      raise ValueError("The PyTorch sampling baseline covers eps models with a fixed variance only.")
    self.torch = torch
    self.device = setup(torch)
    torch.manual_seed(seed)
    self.model = build_unet(config, torch, diffusers, self.device).eval()
    self.forward = torch.compile(self.model) if compile else self.model
    self.autocast = autocast
    self.tables = _tables(diffusion, torch, self.device)
    fixed_large = diffusion.model_var_type == "fixedlarge"
    self.log_var = self.tables["fixedlarge_log_variance" if fixed_large else "posterior_log_variance_clipped"]
    self.num_timesteps = diffusion.num_timesteps
    self.num_steps = num_steps
    c, s = config.data.channels, config.data.image_size
    self.shape = (batch_size, c, s, s)
    self.compile_seconds = None
    if compile:
      t0 = time.perf_counter()
      self.run(1)
      self.compile_seconds = time.perf_counter() - t0

  def _p_sample(self, x, t_int):
    torch = self.torch
    b = x.shape[0]
    t = torch.full((b,), t_int, device=self.device, dtype=torch.long)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      eps = self.forward(x, t).sample.float()
    tb = self.tables
    x0 = (tb["sqrt_recip_alphas_cumprod"][t_int] * x - tb["sqrt_recipm1_alphas_cumprod"][t_int] * eps).clamp(-1, 1)
    mean = tb["posterior_mean_coef1"][t_int] * x0 + tb["posterior_mean_coef2"][t_int] * x
    if t_int == 0:
      return mean
    return mean + torch.exp(0.5 * self.log_var[t_int]) * torch.randn_like(x)

  def run(self, n: int) -> None:
    torch = self.torch
    with torch.inference_mode():
      for _ in range(n):
        x = torch.randn(self.shape, device=self.device)
        for i in range(self.num_steps):
          x = self._p_sample(x, self.num_timesteps - 1 - i)
    _sync(torch, self.device)
