"""Every config in configs/ loads, builds its diffusion and its U-Net; cifar.py is the paper's setting."""

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import diffusion
from diffusion_jax import schedules
from diffusion_jax.models import unet

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
SECTIONS = {"data", "model", "diffusion", "optim", "training", "sampling", "eval", "evals"}


def load_config(name):
  """Loads configs/<name> by path, as ml_collections' config_flags does."""
  path = CONFIG_DIR / name
  spec = importlib.util.spec_from_file_location(f"config_under_test_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@functools.lru_cache(maxsize=None)
def _num_params(name):
  """Parameter count of configs/<name>'s U-Net, by tracing only (cached: the 256² trace takes seconds)."""
  config = load_config(name)
  d = diffusion.from_config(config.diffusion)
  model = unet.from_config(config.model, out_ch=d.model_output_channels(config.data.channels))
  size, channels = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x, t)
  assert out.shape == (1, size, size, d.model_output_channels(channels))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables))


def test_configs_found():
  assert {"cifar.py", "celebahq.py", "lsun_bedroom.py", "lsun_church.py", "lsun_cat.py", "tiny.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads_and_builds(name):
  config = load_config(name)
  assert isinstance(config, ml_collections.ConfigDict)
  assert SECTIONS <= set(config.keys())
  d = diffusion.from_config(config.diffusion)
  assert d.num_timesteps == config.diffusion.num_timesteps
  assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
    config.diffusion.model_mean_type,
    config.diffusion.model_var_type,
    config.diffusion.loss_type,
  )
  assert _num_params(name) > 0
  # config_flags locks the config, so a misspelt override fails loudly.
  config.lock()
  with pytest.raises(AttributeError):
    config.training.batch_szie = 64


def test_cifar_is_the_paper_setting():
  """The paper's CIFAR-10 setting (§4, Appendix B): the reference code's run_cifar.py exactly."""
  c = load_config("cifar.py")
  assert c.data.dataset == "cifar10" and c.data.image_size == 32 and c.data.channels == 3
  assert c.data.random_flip is True
  assert c.data.eval_split == "test"
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
  assert tuple(c.model.attn_resolutions) == (16,)
  assert c.model.dropout == 0.1 and c.model.resamp_with_conv is True
  assert (c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end) == ("linear", 1e-4, 0.02)
  assert c.diffusion.num_timesteps == 1000
  assert c.diffusion.model_mean_type == "eps"
  assert c.diffusion.model_var_type == "fixedlarge" and c.diffusion.loss_type == "mse"
  assert c.optim.learning_rate == 2e-4 and c.optim.warmup_steps == 5000
  assert c.optim.grad_clip == 1.0 and c.optim.clip_groups == 8  # 8 cores × 16, clipped per core
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8) and c.optim.epsilon_hat is True
  assert c.optim.ema_decay == 0.9999
  assert c.training.batch_size == 128 and c.training.num_train_steps == 800_000
  assert c.training.keep_checkpoints == 2
  assert c.sampling.clip_denoised is True
  assert c.eval.num_samples == 50_000
  assert _num_params("cifar.py") == 35_746_307
  betas = schedules.get_beta_schedule(
    c.diffusion.beta_schedule,
    beta_start=c.diffusion.beta_start,
    beta_end=c.diffusion.beta_end,
    num_timesteps=c.diffusion.num_timesteps,
  )
  np.testing.assert_allclose(diffusion.from_config(c.diffusion).betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
  np.testing.assert_array_equal(betas, np.linspace(1e-4, 0.02, 1000))
  for number in ("3.17", "9.46", "3.75"):  # the docstring names the expected numbers
    assert number in (CONFIG_DIR / "cifar.py").read_text()


@pytest.mark.parametrize(
  "name, dataset, steps, flip",
  [
    ("celebahq.py", "celeb_a_hq", 500_000, True),
    ("lsun_bedroom.py", "lsun_bedroom", 2_400_000, False),  # the paper: no flips for Bedroom only
    ("lsun_church.py", "lsun_church_outdoor", 1_200_000, True),
    ("lsun_cat.py", "lsun_cat", 1_800_000, True),  # follows the paper; the script's docstring disagrees
  ],
)
def test_256_configs(name, dataset, steps, flip):
  c = load_config(name)
  assert c.data.dataset == dataset and c.data.image_size == 256 and c.data.random_flip is flip
  assert tuple(c.model.ch_mult) == (1, 1, 2, 2, 4, 4) and c.model.ch == 128 and c.model.dropout == 0.0
  assert tuple(c.model.attn_resolutions) == (16,) and c.model.num_res_blocks == 2
  assert c.diffusion.model_mean_type == "eps"
  assert c.diffusion.model_var_type == "fixedsmall" and c.diffusion.loss_type == "mse"
  assert (c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end) == ("linear", 1e-4, 0.02)
  assert c.diffusion.num_timesteps == 1000
  assert c.optim.learning_rate == 2e-5 and c.optim.warmup_steps == 5000 and c.optim.ema_decay == 0.9999
  assert c.training.batch_size == 64 and c.training.num_train_steps == steps
  assert _num_params(name) == 113_673_219
