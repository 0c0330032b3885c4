"""Tests of diffusion_jax.schedules against float64 NumPy written from the reference code's schedules."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules

ALL_NAMES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _reference_betas(name, beta_start, beta_end, T):
  """The reference code's schedules, written independently, elementwise in float64."""
  if name == "linear":
    return (
      np.array([beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)])
      if T > 1
      else np.array([beta_start])
    )
  if name == "quad":
    s, e = math.sqrt(beta_start), math.sqrt(beta_end)
    return np.array([(s + (e - s) * i / (T - 1)) ** 2 for i in range(T)])
  if name == "const":
    return np.full(T, beta_end)
  if name == "jsd":
    return np.array([1.0 / (T - i) for i in range(T)])
  if name in ("warmup10", "warmup50"):
    n = int(T * (0.1 if name == "warmup10" else 0.5))
    betas = np.full(T, beta_end)
    for i in range(n):
      betas[i] = beta_start + (beta_end - beta_start) * i / (n - 1) if n > 1 else beta_start
    return betas
  if name == "cosine":
    s = 0.008

    def alpha_bar(u):
      return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
  raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("num_timesteps", [1000, 37, 10])
def test_schedule_matches_formula(name, num_timesteps):
  betas = schedules.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=num_timesteps)
  assert betas.dtype == np.float64
  assert betas.shape == (num_timesteps,)
  # Both sides are float64; linspace vs. the elementwise formula differ by a few ulps.
  np.testing.assert_allclose(betas, _reference_betas(name, 1e-4, 0.02, num_timesteps), rtol=1e-12, atol=0)
  assert np.all(betas > 0) and np.all(betas <= 1)


def test_linear_is_the_ddpm_setting():
  betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  # Reference values of the reference code's schedules (0-based t).
  np.testing.assert_allclose(betas[[0, 1, 499, 999]], [1e-4, 1.1991992e-4, 0.01004004, 0.02], rtol=1e-7)
  # The defaults are the DDPM setting.
  np.testing.assert_array_equal(schedules.get_beta_schedule("linear"), betas)


def test_jsd_ends_at_one():
  betas = schedules.get_beta_schedule("jsd", num_timesteps=10)
  assert betas[-1] == 1.0
  assert betas[0] == pytest.approx(0.1)
  assert np.cumprod(1.0 - betas)[-1] == 0.0


@pytest.mark.parametrize("name, frac", [("warmup10", 0.1), ("warmup50", 0.5)])
def test_warmup_shape(name, frac):
  betas = schedules.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  n = int(1000 * frac)
  assert betas[0] == 1e-4
  np.testing.assert_array_equal(betas[n - 1 :], 0.02)
  assert np.all(np.diff(betas[:n]) > 0)


def test_cosine_clipped_at_0999():
  betas = schedules.get_beta_schedule("cosine", num_timesteps=1000)
  assert betas.max() == 0.999  # the last step, where ᾱ(1) = 0, is clipped
  assert betas[-1] == 0.999
  assert np.all(np.diff(betas) >= 0)
  # Nichol & Dhariwal's ᾱ_t = f(t)/f(0) with f(u) = cos²((u+s)/(1+s)·π/2): the unclipped
  # product telescopes, so ᾱ at the step before last is f((T-1)/T)/f(0).
  s = 0.008
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  np.testing.assert_allclose(np.cumprod(1 - betas)[-2], f(999 / 1000) / f(0), rtol=1e-10)
  # beta_start/beta_end do not affect it.
  np.testing.assert_array_equal(
    schedules.get_beta_schedule("cosine", beta_start=0.3, beta_end=0.5, num_timesteps=1000), betas
  )


def test_unknown_name_lists_valid_choices():
  with pytest.raises(ValueError, match="nope") as info:
    schedules.get_beta_schedule("nope")
  for name in ALL_NAMES:
    assert name in str(info.value)


@pytest.mark.parametrize("num_timesteps", [0, -5, 2.5, True, "10"])
def test_bad_num_timesteps(num_timesteps):
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.get_beta_schedule("linear", num_timesteps=num_timesteps)


@pytest.mark.parametrize(
  "name, beta_start, beta_end, match",
  [
    ("linear", 1e-4, 0.0, "beta_end"),
    ("linear", 1e-4, 1.5, "beta_end"),
    ("const", 1e-4, -0.1, "beta_end"),
    ("quad", 0.0, 0.02, "beta_start"),
    ("linear", -1e-4, 0.02, "beta_start"),
    ("warmup10", 0.5, 0.02, "beta_start"),
  ],
)
def test_bad_ranges(name, beta_start, beta_end, match):
  with pytest.raises(ValueError, match=match):
    schedules.get_beta_schedule(name, beta_start=beta_start, beta_end=beta_end, num_timesteps=100)
