"""Tests of diffusion_jax.diffusion against float64 NumPy written from the paper's equations and reference code.

The reference (`_Ref`) is written here from the formulas, never from values the
code under test produces. The code keeps its tables in float32 (as the original
does), so comparisons use float32 tolerances; where a tolerance is wider, the
comment says which float32 cancellation it allows for.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion
from diffusion_jax import schedules

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LN2 = math.log(2.0)

# Timesteps exercised in most tests: the decoder step, its neighbour, the middle, the last.
TS = np.array([0, 1, 500, 999])
SHAPE = (4, 4, 4, 3)  # [B, H, W, C], B = len(TS)

# Most comparisons: values are O(1) and the float32 tables carry ~6e-8 relative
# error, amplified by at most 1/√ᾱ_999 ≈ 157 in the x_0 predictions.
RTOL, ATOL = 2e-5, 2e-5


def _linear_betas(T=1000):
  return schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)


# ----------------------------------------------------------------------------
# The float64 NumPy reference.
# ----------------------------------------------------------------------------


class _Ref:
  """GaussianDiffusion's math in float64 NumPy, from the paper's equations (no code under test)."""

  def __init__(self, betas, mean_type="eps", var_type="fixedlarge", loss_type="mse", hybrid_lambda=0.001):
    b = np.asarray(betas, np.float64)
    self.T = len(b)
    self.mean_type, self.var_type, self.loss_type, self.lam = mean_type, var_type, loss_type, hybrid_lambda
    a = 1.0 - b
    abar = np.cumprod(a)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    self.betas, self.alphas, self.abar, self.abar_prev = b, a, abar, abar_prev
    self.post_var = b * (1 - abar_prev) / (1 - abar)
    self.post_logvar = np.log(np.concatenate([[self.post_var[1]], self.post_var[1:]]))
    self.fixedlarge_logvar = np.log(np.concatenate([[self.post_var[1]], b[1:]]))
    self.coef1 = b * np.sqrt(abar_prev) / (1 - abar)
    self.coef2 = (1 - abar_prev) * np.sqrt(a) / (1 - abar)

  @staticmethod
  def _e(table, t):
    return np.asarray(table)[np.asarray(t)][:, None, None, None]

  def q_mean_variance(self, x0, t):
    return np.sqrt(self._e(self.abar, t)) * x0, self._e(1 - self.abar, t), self._e(np.log(1 - self.abar), t)

  def q_sample(self, x0, t, noise):
    return np.sqrt(self._e(self.abar, t)) * x0 + np.sqrt(1 - self._e(self.abar, t)) * noise

  def q_posterior(self, x0, xt, t):
    mean = self._e(self.coef1, t) * x0 + self._e(self.coef2, t) * xt
    return mean, self._e(self.post_var, t), self._e(self.post_logvar, t)

  def x0_from_eps(self, xt, t, eps):
    ab = self._e(self.abar, t)
    return np.sqrt(1 / ab) * xt - np.sqrt(1 / ab - 1) * eps

  def v_target(self, x0, eps, t):
    ab = self._e(self.abar, t)
    return np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0

  def p_mean_variance(self, out, xt, t, clip):
    c = xt.shape[-1]
    if self.var_type in ("learned", "learned_range"):
      mean_out, var_out = out[..., :c], out[..., c:]
    else:
      mean_out = out
    ones = np.ones_like(xt)
    if self.var_type == "learned":
      logvar = var_out
      var = np.exp(logvar)
    elif self.var_type == "learned_range":
      frac = (var_out + 1) / 2
      logvar = frac * self._e(np.log(self.betas), t) + (1 - frac) * self._e(self.post_logvar, t)
      var = np.exp(logvar)
    elif self.var_type == "fixedlarge":
      var, logvar = self._e(self.betas, t) * ones, self._e(self.fixedlarge_logvar, t) * ones
    else:
      var, logvar = self._e(self.post_var, t) * ones, self._e(self.post_logvar, t) * ones
    cl = (lambda z: np.clip(z, -1, 1)) if clip else (lambda z: z)
    if self.mean_type == "xprev":
      x0 = cl((mean_out - self._e(self.coef2, t) * xt) / self._e(self.coef1, t))
      mean = mean_out
    else:
      if self.mean_type == "eps":
        x0 = self.x0_from_eps(xt, t, mean_out)
      elif self.mean_type == "xstart":
        x0 = mean_out
      else:  # v: x0 = √ᾱ x_t − √(1−ᾱ) v
        ab = self._e(self.abar, t)
        x0 = np.sqrt(ab) * xt - np.sqrt(1 - ab) * mean_out
      x0 = cl(x0)
      mean = self.q_posterior(x0, xt, t)[0]
    return dict(mean=mean, variance=var, log_variance=logvar, pred_xstart=x0)

  def p_sample(self, out, xt, t, noise, clip):
    o = self.p_mean_variance(out, xt, t, clip)
    mask = (np.asarray(t) != 0).astype(np.float64)[:, None, None, None]
    return dict(sample=o["mean"] + mask * np.exp(0.5 * o["log_variance"]) * noise, pred_xstart=o["pred_xstart"])

  def vb_terms_bpd(self, out, x0, xt, t, clip):
    true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
    o = self.p_mean_variance(out, xt, t, clip)
    kl = _np_normal_kl(true_mean, true_logvar, o["mean"], o["log_variance"]).mean(axis=(1, 2, 3)) / LN2
    nll = -_np_dgll(x0, o["mean"], 0.5 * o["log_variance"]).mean(axis=(1, 2, 3)) / LN2
    return dict(output=np.where(np.asarray(t) == 0, nll, kl), pred_xstart=o["pred_xstart"])

  def mse_target(self, x0, xt, t, noise):
    return {
      "eps": lambda: noise,
      "xstart": lambda: x0,
      "xprev": lambda: self.q_posterior(x0, xt, t)[0],
      "v": lambda: self.v_target(x0, noise, t),
    }[self.mean_type]()

  def training_losses(self, model_fn, x0, t, noise):
    xt = self.q_sample(x0, t, noise)
    out = model_fn(xt, t)
    if self.loss_type == "kl":
      return self.vb_terms_bpd(out, x0, xt, t, clip=False)["output"]
    c = x0.shape[-1]
    mse = ((self.mse_target(x0, xt, t, noise) - out[..., :c]) ** 2).mean(axis=(1, 2, 3))
    if self.loss_type == "mse":
      return mse
    return mse + self.lam * self.T * self.vb_terms_bpd(out, x0, xt, t, clip=False)["output"]

  def prior_bpd(self, x0):
    t = np.full(x0.shape[0], self.T - 1)
    mean, _, logvar = self.q_mean_variance(x0, t)
    return _np_normal_kl(mean, logvar * np.ones_like(x0), 0.0, 0.0).mean(axis=(1, 2, 3)) / LN2


def _np_normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _np_cdf(x):
  return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_dgll(x, means, log_scales):
  inv = np.exp(-log_scales)
  cdf_plus = _np_cdf(inv * (x - means + 1 / 255))
  cdf_min = _np_cdf(inv * (x - means - 1 / 255))
  return np.where(
    x < -0.999,
    np.log(np.maximum(cdf_plus, 1e-12)),
    np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
  )


# ----------------------------------------------------------------------------
# Fixtures: data on the 8-bit grid, noise, and model outputs near the truth.
# ----------------------------------------------------------------------------


def _f32(x):
  """Rounds to float32 and back, so both sides see identical inputs."""
  return np.asarray(x, np.float32).astype(np.float64)


@functools.lru_cache(maxsize=None)
def _data(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, 256, size=shape) / 127.5 - 1.0
  x0[:, 0, 0, :] = -1.0  # make sure both edge bins of the decoder occur
  x0[:, 0, 1, :] = 1.0
  noise = rng.standard_normal(shape)
  return _f32(x0), _f32(noise)


def _model_output(ref, x0, xt, t, noise, seed=1, scale=1.0):
  """A model output near the truth for `ref`'s parameterisation (float32-exact).

  Perturbations keep the t = 0 decoder mean within ~1σ (σ ≈ 0.0074) of x_0 so
  the discretized likelihood stays out of the float32-saturated far tails.
  """
  rng = np.random.default_rng(seed)
  n = rng.standard_normal(x0.shape)
  target = ref.mse_target(x0, xt, t, noise)
  step = {"eps": 0.5, "v": 0.5, "xstart": 0.005, "xprev": 0.005}[ref.mean_type]
  mean_out = target + scale * step * n
  if ref.var_type == "learned":
    var_out = ref._e(np.log(ref.betas), t) + 0.5 * rng.standard_normal(x0.shape)
  elif ref.var_type == "learned_range":
    var_out = rng.uniform(-1, 1, x0.shape)
  else:
    return _f32(mean_out)
  return _f32(np.concatenate([mean_out, var_out], axis=-1))


def _setup(mean_type, var_type, loss_type=None):
  if loss_type is None:
    loss_type = "hybrid" if var_type in ("learned", "learned_range") else "mse"
  betas = _linear_betas()
  d = diffusion.GaussianDiffusion.create(betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type)
  return d, _Ref(betas, mean_type, var_type, loss_type)


def _j(x, dtype=jnp.float32):
  return jnp.asarray(x, dtype)


# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------

# The reference code's tables, linear, T = 1000: t, β, ᾱ, β̃, log β̃ (clipped), log σ² fixedlarge, coef1, coef2.
FACTS_TABLE = np.array(
  [
    [0, 1e-4, 0.9999, 0.0, -9.816725135, -9.816725135, 1.0000000000001, 0.0],
    [1, 1.1991992e-4, 0.99978009, 5.4531877e-5, -9.816725135, -9.028686372, 0.54529150, 0.45470850],
    [499, 0.01004004, 0.078587243, 0.010031355, -4.602039550, -4.601174177, 0.0030700711, 0.99410667],
    [999, 0.02, 4.0358298e-5, 0.019999984, -3.912023829, -3.912023005, 1.2835149e-4, 0.98994868],
  ]
)


def test_reference_reproduces_facts_table():
  """Checks the float64 reference itself against the published values (8 significant digits)."""
  ref = _Ref(_linear_betas())
  t = FACTS_TABLE[:, 0].astype(int)
  got = np.stack(
    [
      ref.betas[t],
      ref.abar[t],
      ref.post_var[t],
      ref.post_logvar[t],
      ref.fixedlarge_logvar[t],
      ref.coef1[t],
      ref.coef2[t],
    ],
    axis=1,
  )
  np.testing.assert_allclose(got, FACTS_TABLE[:, 1:], rtol=1e-7, atol=1e-15)


def test_tables_match_facts_table():
  d = diffusion.GaussianDiffusion.create(_linear_betas())
  t = FACTS_TABLE[:, 0].astype(int)
  tables = [
    d.betas,
    d.alphas_cumprod,
    d.posterior_variance,
    d.posterior_log_variance_clipped,
    d.fixedlarge_log_variance,
    d.posterior_mean_coef1,
    d.posterior_mean_coef2,
  ]
  for table in tables:
    assert table.dtype == jnp.float32 and table.shape == (1000,)
  got = np.stack([np.asarray(table)[t] for table in tables], axis=1)
  # float32 storage: relative error ≤ 6e-8 on top of the table's 8 printed digits.
  np.testing.assert_allclose(got, FACTS_TABLE[:, 1:], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "quad"])
def test_all_tables_match_reference(name):
  betas = schedules.get_beta_schedule(name, num_timesteps=1000)
  d = diffusion.GaussianDiffusion.create(betas)
  r = _Ref(betas)
  expected = dict(
    betas=r.betas,
    alphas_cumprod=r.abar,
    alphas_cumprod_prev=r.abar_prev,
    sqrt_alphas_cumprod=np.sqrt(r.abar),
    sqrt_one_minus_alphas_cumprod=np.sqrt(1 - r.abar),
    log_one_minus_alphas_cumprod=np.log(1 - r.abar),
    sqrt_recip_alphas_cumprod=np.sqrt(1 / r.abar),
    sqrt_recipm1_alphas_cumprod=np.sqrt(1 / r.abar - 1),
    posterior_variance=r.post_var,
    posterior_log_variance_clipped=r.post_logvar,
    posterior_mean_coef1=r.coef1,
    posterior_mean_coef2=r.coef2,
    fixedlarge_log_variance=r.fixedlarge_logvar,
    log_betas=np.log(r.betas),
  )
  for key, value in expected.items():
    table = getattr(d, key)
    assert table.dtype == jnp.float32, key
    # Each table is a float64 value rounded once to float32 (cosine's ᾱ_T ≈ 1e-9 needs the atol).
    np.testing.assert_allclose(np.asarray(table), value, rtol=2e-7, atol=1e-30, err_msg=key)


def test_create_errors():
  betas = _linear_betas(10)
  for kwargs, match in [
    (dict(model_mean_type="mu"), "model_mean_type.*eps, xstart, xprev, v"),
    (dict(model_var_type="big"), "model_var_type.*fixedlarge, fixedsmall, learned, learned_range"),
    (dict(loss_type="l1"), "loss_type.*mse, kl, hybrid"),
    (dict(model_var_type="learned", loss_type="mse"), "hybrid"),
    (dict(model_var_type="learned_range", loss_type="mse"), "hybrid"),
    (dict(model_var_type="fixedlarge", loss_type="hybrid"), "learned"),
  ]:
    with pytest.raises(ValueError, match=match):
      diffusion.GaussianDiffusion.create(betas, **kwargs)
  with pytest.raises(ValueError, match="betas"):
    diffusion.GaussianDiffusion.create(np.zeros((2, 5)) + 0.1)
  with pytest.raises(ValueError, match="betas"):
    diffusion.GaussianDiffusion.create(np.array([0.1, 0.0, 0.2]))
  with pytest.raises(ValueError, match="betas"):
    diffusion.GaussianDiffusion.create(np.array([0.1, 1.5]))


# ----------------------------------------------------------------------------
# The forward process and its posterior.
# ----------------------------------------------------------------------------


def test_q_mean_variance_and_q_sample():
  d, r = _setup("eps", "fixedlarge")
  x0, noise = _data()
  mean, var, logvar = d.q_mean_variance(_j(x0), _j(TS, jnp.int32))
  rm, rv, rlv = r.q_mean_variance(x0, TS)
  np.testing.assert_allclose(np.broadcast_to(mean, x0.shape), rm, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(np.broadcast_to(var, x0.shape), np.broadcast_to(rv, x0.shape), rtol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(logvar, x0.shape), np.broadcast_to(rlv, x0.shape), rtol=1e-6)
  xt = d.q_sample(_j(x0), _j(TS, jnp.int32), _j(noise))
  assert xt.shape == x0.shape and xt.dtype == jnp.float32
  np.testing.assert_allclose(xt, r.q_sample(x0, TS, noise), rtol=RTOL, atol=1e-6)


def test_q_posterior_mean_variance():
  d, r = _setup("eps", "fixedlarge")
  x0, noise = _data()
  xt = _f32(r.q_sample(x0, TS, noise))
  mean, var, logvar = d.q_posterior_mean_variance(_j(x0), _j(xt), _j(TS, jnp.int32))
  rm, rv, rlv = r.q_posterior(x0, xt, TS)
  np.testing.assert_allclose(mean, rm, rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(var, x0.shape), np.broadcast_to(rv, x0.shape), rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(np.broadcast_to(logvar, x0.shape), np.broadcast_to(rlv, x0.shape), rtol=1e-6)


def test_posterior_is_the_bayes_posterior():
  """The posterior mean/variance from the Gaussian product rule, independent of the coef formulas."""
  d = diffusion.GaussianDiffusion.create(_linear_betas())
  r = _Ref(_linear_betas())
  x0, noise = _data()
  t = np.array([1, 10, 500, 999])
  xt = _f32(r.q_sample(x0, t, noise))
  # q(x_{t-1}|x_0) = N(√ᾱ_{t-1} x0, 1−ᾱ_{t-1}), q(x_t|x_{t-1}) = N(√α_t x_{t-1}, β_t).
  e = r._e
  prec = 1 / (1 - e(r.abar_prev, t)) + e(r.alphas, t) / e(r.betas, t)
  mean = (
    np.sqrt(e(r.abar_prev, t)) * x0 / (1 - e(r.abar_prev, t)) + np.sqrt(e(r.alphas, t)) * xt / e(r.betas, t)
  ) / prec
  got_mean, got_var, _ = d.q_posterior_mean_variance(_j(x0), _j(xt), _j(t, jnp.int32))
  np.testing.assert_allclose(got_mean, mean, rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(got_var, x0.shape), np.broadcast_to(1 / prec, x0.shape), rtol=1e-6)


# ----------------------------------------------------------------------------
# The reverse process.
# ----------------------------------------------------------------------------

COMBOS = list(itertools.product(MEAN_TYPES, VAR_TYPES, [True, False]))


def _check_dict(got, expected, keys, rtol=RTOL, atol=ATOL, values=True):
  for key in keys:
    g = np.asarray(got[key])
    assert g.dtype == np.float32, key
    assert g.shape == expected[key].shape, (key, g.shape)
    if values:
      np.testing.assert_allclose(g, expected[key], rtol=rtol, atol=atol, err_msg=key)


def _check_pred_xstart(got, expected, ref, t):
  """x_0 predictions; xprev's divides by coef1 (1.3e-4 at t = 999), amplifying float32 rounding."""
  for i, ti in enumerate(t):
    atol = ATOL + (1e-6 / ref.coef1[ti] if ref.mean_type == "xprev" else 0.0)
    np.testing.assert_allclose(
      got["pred_xstart"][i], expected["pred_xstart"][i], rtol=RTOL, atol=atol, err_msg=f"t={ti}"
    )


@pytest.mark.parametrize("mean_type, var_type, clip", COMBOS)
def test_p_mean_variance(mean_type, var_type, clip):
  d, r = _setup(mean_type, var_type)
  x0, noise = _data()
  xt = _f32(r.q_sample(x0, TS, noise))
  # scale=40 pushes many x_0 predictions out of [-1, 1] so that clipping matters.
  for scale in (1.0, 40.0):
    out = _model_output(r, x0, xt, TS, noise, scale=scale)
    got = d.p_mean_variance(_j(out), _j(xt), _j(TS, jnp.int32), clip_denoised=clip)
    exp = r.p_mean_variance(out, xt, TS, clip)
    _check_dict(got, exp, ["mean", "variance", "log_variance"])
    _check_dict(got, exp, ["pred_xstart"], values=False)
    _check_pred_xstart(got, exp, r, TS)
    if clip:
      assert np.abs(np.asarray(got["pred_xstart"])).max() <= 1.0
  # The clipping was exercised: some unclipped x_0 predictions leave [-1, 1].
  assert np.abs(r.p_mean_variance(out, xt, TS, False)["pred_xstart"]).max() > 1.5


def test_fixedlarge_log_variance_quirk_at_t0():
  d, _ = _setup("eps", "fixedlarge")
  x0, _ = _data()
  out = d.p_mean_variance(_j(x0), _j(x0), _j(TS, jnp.int32))
  # t = 0: variance β_0 = 1e-4 but log-variance log β̃_1 (the reference code's table), not log β_0 = -9.2103.
  np.testing.assert_allclose(out["variance"][0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(out["log_variance"][0], -9.816725135, rtol=1e-6)
  # t = 1: log β_1.
  np.testing.assert_allclose(out["log_variance"][1], -9.028686372, rtol=1e-6)
  # fixedsmall uses log β̃_1 at both t = 0 and t = 1.
  d_small, _ = _setup("eps", "fixedsmall")
  out = d_small.p_mean_variance(_j(x0), _j(x0), _j(TS, jnp.int32))
  np.testing.assert_allclose(out["log_variance"][:2], -9.816725135, rtol=1e-6)


@pytest.mark.parametrize("mean_type, var_type, clip", COMBOS)
def test_p_sample(mean_type, var_type, clip):
  d, r = _setup(mean_type, var_type)
  x0, noise = _data()
  xt = _f32(r.q_sample(x0, TS, noise))
  out = _model_output(r, x0, xt, TS, noise, scale=10.0)
  z = _f32(np.random.default_rng(5).standard_normal(x0.shape))
  got = d.p_sample(_j(out), _j(xt), _j(TS, jnp.int32), _j(z), clip_denoised=clip)
  exp = r.p_sample(out, xt, TS, z, clip)
  _check_dict(got, exp, ["sample"])
  _check_dict(got, exp, ["pred_xstart"], values=False)
  _check_pred_xstart(got, exp, r, TS)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_algorithm_2_equals_p_sample_without_clipping(var_type):
  """Paper Algorithm 2: x_{t-1} = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t + σ_t z, with z = 0 at the last step."""
  betas = _linear_betas()
  d = diffusion.GaussianDiffusion.create(betas, model_var_type=var_type)
  rng = np.random.default_rng(3)
  t = np.array([0, 1, 2, 100, 500, 998, 999])
  shape = (len(t), 4, 4, 3)
  xt, eps, z = (_f32(rng.standard_normal(shape)) for _ in range(3))
  alphas = 1 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  sigma2 = betas if var_type == "fixedlarge" else betas * (1 - abar_prev) / (1 - abar)
  e = lambda a: a[t][:, None, None, None]  # noqa: E731
  expected = (xt - e(betas) / np.sqrt(1 - e(abar)) * eps) / np.sqrt(e(alphas)) + np.where(
    (t > 0)[:, None, None, None], np.sqrt(e(sigma2)), 0.0
  ) * z
  got = d.p_sample(_j(eps), _j(xt), _j(t, jnp.int32), _j(z), clip_denoised=False)["sample"]
  # At t = 999 the code goes through x̂_0 = 157·x_t − 157·ε (float32 cancellation of ~1e-5).
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_final_sample_is_clipped_x0_prediction(var_type):
  d = diffusion.GaussianDiffusion.create(_linear_betas(), model_var_type=var_type)
  rng = np.random.default_rng(4)
  shape = (3, 4, 4, 3)
  xt = _f32(rng.uniform(-1.3, 1.3, shape))
  eps = _f32(rng.standard_normal(shape))
  t = jnp.zeros((3,), jnp.int32)
  x0_hat = np.sqrt(1 / 0.9999) * xt - np.sqrt(1 / 0.9999 - 1) * eps
  assert np.abs(x0_hat).max() > 1.1  # clipping happens
  for z_scale in (0.0, 100.0):  # no noise is added at t = 0
    out = d.p_sample(_j(eps), _j(xt), t, _j(z_scale * np.ones(shape)))
    np.testing.assert_allclose(out["sample"], np.clip(x0_hat, -1, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["sample"], out["pred_xstart"], rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(out["sample"])).max() <= 1.0


# ----------------------------------------------------------------------------
# Likelihood helpers.
# ----------------------------------------------------------------------------


def test_normal_kl_and_cdf():
  rng = np.random.default_rng(0)
  m1, m2, lv1, lv2 = (_f32(rng.normal(size=(5, 7))) for _ in range(4))
  np.testing.assert_allclose(
    diffusion.normal_kl(_j(m1), _j(lv1), _j(m2), _j(lv2)), _np_normal_kl(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-6
  )
  # KL of a distribution with itself is 0.
  np.testing.assert_allclose(diffusion.normal_kl(_j(m1), _j(lv1), _j(m1), _j(lv1)), 0.0, atol=1e-7)
  x = _f32(np.linspace(-6, 6, 101))
  np.testing.assert_allclose(diffusion.approx_standard_normal_cdf(_j(x)), _np_cdf(x), rtol=1e-6, atol=1e-7)


def _grid():
  return (np.arange(256) / 127.5 - 1.0).reshape(256, 1, 1, 1)


@pytest.mark.parametrize("sigma", [0.0074, 0.02, 0.3, 2.0])
@pytest.mark.parametrize("mean", [-1.0, -0.4, 0.0031, 0.9, 1.0])
def test_discretized_likelihood_sums_to_one(mean, sigma):
  x = _grid()
  ll = diffusion.discretized_gaussian_log_likelihood(
    _j(x), means=_j(np.full((1, 1, 1, 1), mean)), log_scales=_j(np.full((1, 1, 1, 1), math.log(sigma)))
  )
  assert ll.shape == (256, 1, 1, 1)
  # 256 float32 bin masses, each with ~1e-7 error.
  np.testing.assert_allclose(np.exp(np.asarray(ll, np.float64)).sum(), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.exp(_np_dgll(x, mean, math.log(sigma))).sum(), 1.0, atol=1e-9)


def test_discretized_likelihood_matches_reference():
  rng = np.random.default_rng(1)
  x0, _ = _data()
  sigma = 0.0074  # the t = 0 decoder's σ = √β̃_1
  means = _f32(x0 + sigma * rng.uniform(-3, 3, x0.shape))  # within a few σ, out of float32's saturated tails
  log_scales = _f32(np.log(sigma) + 0.1 * rng.standard_normal(x0.shape))
  got = diffusion.discretized_gaussian_log_likelihood(_j(x0), means=_j(means), log_scales=_j(log_scales))
  # log-probabilities from differences of float32 CDF values of ~0.5 and ~1e-3 masses.
  np.testing.assert_allclose(got, _np_dgll(x0, means, log_scales), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="broadcast"):
    diffusion.discretized_gaussian_log_likelihood(_j(x0), means=_j(means[:, :2]), log_scales=_j(log_scales))


# ----------------------------------------------------------------------------
# Bound terms and losses.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mean_type, var_type, clip", COMBOS)
def test_vb_terms_bpd(mean_type, var_type, clip):
  d, r = _setup(mean_type, var_type)
  x0, noise = _data()
  xt = _f32(r.q_sample(x0, TS, noise))
  out = _model_output(r, x0, xt, TS, noise)
  got = d.vb_terms_bpd(_j(out), _j(x0), _j(xt), _j(TS, jnp.int32), clip_denoised=clip)
  exp = r.vb_terms_bpd(out, x0, xt, TS, clip)
  assert got["output"].shape == (len(TS),) and got["output"].dtype == jnp.float32
  # KL terms are small differences of O(1) numbers in float32 (e.g. −1 + e^{Δ} − Δ): ~1e-6 absolute.
  np.testing.assert_allclose(got["output"], exp["output"], rtol=1e-4, atol=2e-6)
  assert np.all(exp["output"] > 0)
  # The t = 0 entry is the decoder NLL, a few bits/dim; the others are KLs.
  assert 1.0 < exp["output"][0] < 10.0


@pytest.mark.parametrize(
  "mean_type, var_type, loss_type",
  [
    (m, v, l)
    for m in MEAN_TYPES
    for v in VAR_TYPES
    for l in (("kl", "hybrid") if v.startswith("learned") else ("mse", "kl"))
  ],
)
def test_training_losses(mean_type, var_type, loss_type):
  d, r = _setup(mean_type, var_type, loss_type)
  x0, noise = _data()
  base = _model_output(r, x0, _f32(r.q_sample(x0, TS, noise)), TS, noise)

  # A model that depends on x_t and t, so the losses must hand it the right ones.
  def model_np(xt, t):
    w = (1 + t / 1000)[:, None, None, None]
    return base + 1e-3 * np.concatenate([xt] * (base.shape[-1] // xt.shape[-1]), -1) * w

  def model_jnp(xt, t):
    w = (1 + t.astype(jnp.float32) / 1000)[:, None, None, None]
    return _j(base) + 1e-3 * jnp.concatenate([xt] * (base.shape[-1] // xt.shape[-1]), -1) * w

  got = d.training_losses(model_jnp, _j(x0), _j(TS, jnp.int32), _j(noise))
  exp = r.training_losses(model_np, x0, TS, noise)
  assert got.shape == (len(TS),) and got.dtype == jnp.float32
  # hybrid multiplies the KL's ~1e-6 absolute float32 error by λT = 1.
  np.testing.assert_allclose(got, exp, rtol=1e-4, atol=2e-6)
  if loss_type == "mse":
    # The paper's L_simple is a mean over dimensions of the squared error against the target.
    step = {"eps": 0.5, "v": 0.5, "xstart": 0.005, "xprev": 0.005}[mean_type]
    assert np.all(exp < 4 * step**2)


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_hybrid_loss_and_stop_gradient(mean_type, var_type):
  d, r = _setup(mean_type, var_type, "hybrid")
  x0, noise = _data()
  t = np.array([0, 3, 500, 999])
  xt = _f32(r.q_sample(x0, t, noise))
  out = _model_output(r, x0, xt, t, noise)
  c = x0.shape[-1]
  loss_fn = lambda o: d.training_losses(lambda *_: o, _j(x0), _j(t, jnp.int32), _j(noise)).sum()  # noqa: E731
  grad = np.asarray(jax.grad(loss_fn)(_j(out)), np.float64)

  # The mean part's gradient is exactly the MSE's: the bound term contributes nothing to it.
  target = r.mse_target(x0, xt, t, noise)
  n = np.prod(x0.shape[1:])
  # The float32 target carries ~1e-6 absolute error, i.e. 2e-6/n in the gradient.
  np.testing.assert_allclose(grad[..., :c], -2 * (target - out[..., :c]) / n, rtol=1e-4, atol=2e-6 / n)

  # ... although the bound term does depend on the mean (so the stop-gradient matters) ...
  def ref_vb(o):
    return r.vb_terms_bpd(o, x0, xt, t, clip=False)["output"].sum()

  idx = (0, 2, 1, 0)  # a mean-part entry at t = 0, where the decoder term is sensitive to the mean
  h = 1e-4
  bump = np.zeros_like(out)
  bump[idx] = h
  dvb_dmean = (ref_vb(out + bump) - ref_vb(out - bump)) / (2 * h)
  assert abs(0.001 * 1000 * dvb_dmean) > 100 * (abs(grad[idx] + 2 * (target[idx] - out[idx]) / n) + 2e-6 / n)

  # ... and the variance part's gradient is λ·T times the bound's, checked by central differences in float64.
  for idx in [(0, 1, 1, c), (1, 2, 3, c + 1), (2, 0, 2, c + 2), (3, 3, 0, c)]:
    bump = np.zeros_like(out)
    bump[idx] = h
    fd = 0.001 * 1000 * (ref_vb(out + bump) - ref_vb(out - bump)) / (2 * h)
    # float32 gradients of values ~1e-4..1 (per element, divided by H·W·C).
    np.testing.assert_allclose(grad[idx], fd, rtol=2e-3, atol=1e-7, err_msg=str(idx))


def test_prior_bpd():
  x0, _ = _data()
  # Linear T = 1000: about 1e-5 bits/dim (the paper's L_T).
  d, r = _setup("eps", "fixedlarge")
  got = d.prior_bpd(_j(x0))
  exp = r.prior_bpd(x0)
  assert got.shape == (x0.shape[0],)
  assert np.all((exp > 1e-6) & (exp < 1e-4))
  # −1 + e^{log(1−ᾱ)} − log(1−ᾱ) cancels in float32 to ~1e-7 absolute.
  np.testing.assert_allclose(got, exp, atol=3e-7)
  # A short schedule leaves a sizeable prior term, checked tightly.
  betas = schedules.get_beta_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=8)
  d = diffusion.GaussianDiffusion.create(betas)
  exp = _Ref(betas).prior_bpd(x0)
  assert np.all(exp > 0.1)
  np.testing.assert_allclose(d.prior_bpd(_j(x0)), exp, rtol=1e-5)


@pytest.mark.parametrize("mean_type, var_type", [("eps", "fixedlarge"), ("xstart", "learned_range")])
def test_calc_bpd_loop(mean_type, var_type):
  T = 6
  betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.3, num_timesteps=T)
  loss = "hybrid" if var_type.startswith("learned") else "mse"
  d = diffusion.GaussianDiffusion.create(betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss)
  r = _Ref(betas, mean_type, var_type, loss)
  x0, _ = _data(seed=7, shape=(2, 4, 4, 3))
  # A fixed linear function of x_t and t.
  a = np.linspace(0.2, 0.9, T)
  b = np.linspace(-0.05, 0.05, T)
  # xstart: 0.995·x_t stays within σ of x_0 at t = 0, 1.2·x_t is clipped near the edges at t > 0.
  if mean_type == "xstart":
    a = np.concatenate([[0.995], np.linspace(1.2, 0.5, T - 1)])
    b = np.zeros(T)

  def model_np(xt, t):
    mean_part = a[t][:, None, None, None] * xt + b[t][:, None, None, None]
    if var_type == "learned_range":
      return np.concatenate([mean_part, np.tanh(xt)], -1)
    return mean_part

  def model_jnp(xt, t):
    mean_part = _j(a)[t][:, None, None, None] * xt + _j(b)[t][:, None, None, None]
    if var_type == "learned_range":
      return jnp.concatenate([mean_part, jnp.tanh(xt)], -1)
    return mean_part

  rng = jax.random.key(42)
  # The documented noise of term t.
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, t), x0.shape), np.float64) for t in range(T)]
  prior = r.prior_bpd(x0)
  results = {}
  for clip in (True, False):
    got = d.calc_bpd_loop(model_jnp, _j(x0), rng, clip_denoised=clip)
    terms = np.zeros((2, T))
    mse = np.zeros((2, T))
    for t in range(T):
      tt = np.full(2, t)
      xt = _f32(r.q_sample(x0, tt, noises[t]))
      vb = r.vb_terms_bpd(model_np(xt, tt), x0, xt, tt, clip)
      terms[:, t] = vb["output"]
      mse[:, t] = ((vb["pred_xstart"] - x0) ** 2).mean(axis=(1, 2, 3))

    assert got["terms_bpd"].shape == (2, T) and got["mse"].shape == (2, T)
    assert got["prior_bpd"].shape == (2,) and got["total_bpd"].shape == (2,)
    assert np.all(terms > 0) and np.all(np.diff(mse, axis=1) != 0)
    np.testing.assert_allclose(got["terms_bpd"], terms, rtol=1e-4, atol=2e-6, err_msg=f"clip={clip}")
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-4, atol=1e-7, err_msg=f"clip={clip}")
    np.testing.assert_allclose(got["prior_bpd"], prior, rtol=1e-5)
    np.testing.assert_allclose(got["total_bpd"], terms.sum(1) + prior, rtol=1e-4)
    results[clip] = terms
  assert not np.allclose(results[True], results[False])  # the clipping was exercised


# ----------------------------------------------------------------------------
# v-prediction.
# ----------------------------------------------------------------------------


def test_v_round_trip():
  d, r = _setup("v", "fixedlarge")
  x0, noise = _data()
  t = _j(TS, jnp.int32)
  v = d.get_v(_j(x0), _j(noise), t)
  np.testing.assert_allclose(v, r.v_target(x0, noise, TS), rtol=RTOL, atol=1e-6)
  xt = d.q_sample(_j(x0), t, _j(noise))
  np.testing.assert_allclose(d.predict_xstart_from_v(xt, t, v), x0, atol=1e-5)
  # ε = √ᾱ v + √(1−ᾱ) x_t, and back through the eps parameterisation.
  ab = r._e(r.abar, TS)
  eps_from_v = np.sqrt(ab) * np.asarray(v, np.float64) + np.sqrt(1 - ab) * np.asarray(xt, np.float64)
  np.testing.assert_allclose(eps_from_v, noise, atol=1e-5)
  # predict_eps divides by √(1/ᾱ−1) = 0.01 at t = 0, amplifying float32 error 100-fold.
  np.testing.assert_allclose(d.predict_eps_from_xstart(xt, t, d.predict_xstart_from_v(xt, t, v)), noise, atol=2e-3)
  np.testing.assert_allclose(d.predict_xstart_from_eps(xt, t, _j(noise)), x0, atol=1e-4)


# ----------------------------------------------------------------------------
# Bad inputs, and jit.
# ----------------------------------------------------------------------------


BAD_INPUTS = [
  (lambda d, dl, x0, t, n: d.q_sample(x0, t[:, None], n), r"t must have shape \[B\]"),
  (lambda d, dl, x0, t, n: d.q_sample(x0, t[:2], n), r"t must have shape \[B\] = \[4\]"),
  (lambda d, dl, x0, t, n: d.q_sample(x0, jnp.int32(3), n), r"t must have shape \[B\]"),
  (lambda d, dl, x0, t, n: d.q_sample(x0, t.astype(jnp.float32), n), "integer"),
  (lambda d, dl, x0, t, n: d.q_mean_variance(x0, t.astype(jnp.float32)), "integer"),
  (lambda d, dl, x0, t, n: d.q_sample(x0, t, n[:, :2]), "noise has shape"),
  (lambda d, dl, x0, t, n: d.q_sample(x0[0, 0, 0], t[:3], n[0, 0, 0]), "batched"),
  (lambda d, dl, x0, t, n: d.q_sample(x0.astype(jnp.int32), t, n), "floating"),
  (lambda d, dl, x0, t, n: d.q_posterior_mean_variance(x0[..., :2], x0, t), "x_start has shape"),
  (lambda d, dl, x0, t, n: d.p_mean_variance(x0[..., :2], x0, t), "model_output has shape.*3 output channels"),
  (lambda d, dl, x0, t, n: dl.p_mean_variance(x0, x0, t), "model_output.*'learned' needs 6 output channels"),
  (lambda d, dl, x0, t, n: d.p_sample(x0, x0, t, n[..., :1]), "noise has shape"),
  (lambda d, dl, x0, t, n: d.p_sample(x0, x0, t.astype(jnp.float32), n), "integer"),
  (lambda d, dl, x0, t, n: d.vb_terms_bpd(x0, x0, x0, t[:3], clip_denoised=True), r"t must have shape"),
  (lambda d, dl, x0, t, n: d.training_losses(lambda xt, tt: xt[..., :2], x0, t, n), "model_output has shape"),
  (lambda d, dl, x0, t, n: d.training_losses(lambda xt, tt: xt, x0, t.astype(jnp.float32), n), "integer"),
  (lambda d, dl, x0, t, n: d.training_losses(lambda xt, tt: xt, x0, t, n[:2]), "noise has shape"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise(case):
  fn, match = BAD_INPUTS[case]
  d, _ = _setup("eps", "fixedlarge")
  dl, _ = _setup("eps", "learned")
  x0, noise = (_j(a) for a in _data())
  with pytest.raises(ValueError, match=match):
    fn(d, dl, x0, _j(TS, jnp.int32), noise)


def test_is_a_pytree_and_jits():
  d, r = _setup("eps", "fixedsmall")
  x0, noise = _data()
  xt = _f32(r.q_sample(x0, TS, noise))
  leaves, treedef = jax.tree.flatten(d)
  assert len(leaves) == 14 and all(leaf.dtype == jnp.float32 for leaf in leaves)
  d2 = jax.tree.unflatten(treedef, leaves)
  assert d2.model_var_type == "fixedsmall"

  @jax.jit
  def step(diff, out, xt, t, z):
    return diff.p_sample(out, xt, t, z)["sample"]

  got = step(d, _j(noise), _j(xt), _j(TS, jnp.int32), _j(noise))
  np.testing.assert_allclose(got, r.p_sample(noise, xt, TS, noise, True)["sample"], rtol=RTOL, atol=ATOL)
