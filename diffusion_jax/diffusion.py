"""Gaussian diffusion: the forward process, the posterior, the reverse step and the losses.

A pure-functional port of `GaussianDiffusion2` in the reference implementation
(`diffusion_tf/diffusion_utils_2.py`), with the names kept so the two can be
read side by side. Extensions beyond DDPM, in the same object: v-prediction
(Salimans & Ho 2022), `learned_range` variances and the `hybrid` loss
(Nichol & Dhariwal 2021).

Conventions:
  * images are float32 NHWC in [-1, 1]; every per-example quantity is [B];
  * timesteps are 0-based integers t in [0, T): code t = 0 is the paper's t = 1;
  * the tables are computed in float64 NumPy and stored once as float32, as
    the reference code does when it gathers them (`_extract`);
  * likelihood terms are in bits per dimension (mean over H·W·C, / ln 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax import schedules

MODEL_MEAN_TYPES = ("eps", "xstart", "xprev", "v")
MODEL_VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------
# Elementwise likelihood helpers.
# ----------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise (broadcasting)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The standard normal CDF by the tanh approximation (the GELU one), as the reference code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """Log-likelihood (nats) of 8-bit data rescaled to [-1, 1] under a discretized Gaussian.

  Each of the 256 values owns a bin of width 2/255; the two outermost bins
  extend to ±infinity, so the probabilities of the 256 values sum to one.

  Args:
    x: data, [B, H, W, C], on the grid {-1, -1 + 2/255, ..., 1}.
    means: Gaussian means, broadcastable to `x`.
    log_scales: log standard deviations, broadcastable to `x`.

  Returns:
    [B, H, W, C] log-probabilities, floored at log(1e-12).
  """
  if x.shape != jnp.broadcast_shapes(x.shape, jnp.shape(means), jnp.shape(log_scales)):
    raise errors.UserError(
      f"means {jnp.shape(means)} and log_scales {jnp.shape(log_scales)} must broadcast to x {x.shape}."
    )
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _meanflat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------
# GaussianDiffusion.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class GaussianDiffusion:
  """Tables of a diffusion process and the pure functions that use them.

  Build with `GaussianDiffusion.create(betas, ...)`. The object is an immutable
  pytree: the float32 tables are leaves, the parameterisation is static, so it
  can be passed into and closed over by jitted functions.
  """

  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  log_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  # log σ² of `fixedlarge`: log(append(β̃_1, β[1:])); t = 0 takes log β̃_1 on purpose
  # ("to get a better decoder log likelihood" in the reference code).
  fixedlarge_log_variance: Array
  log_betas: Array
  model_mean_type: str = flax.struct.field(pytree_node=False, default="eps")
  model_var_type: str = flax.struct.field(pytree_node=False, default="fixedlarge")
  loss_type: str = flax.struct.field(pytree_node=False, default="mse")
  # Weight λ of L_vlb in the hybrid loss L_simple + λ·L_vlb (Nichol & Dhariwal 2021).
  hybrid_lambda: float = flax.struct.field(pytree_node=False, default=0.001)

  @classmethod
  def create(
    cls,
    betas,
    *,
    model_mean_type: str = "eps",
    model_var_type: str = "fixedlarge",
    loss_type: str = "mse",
    hybrid_lambda: float = 0.001,
  ) -> GaussianDiffusion:
    """Precomputes the tables in float64 and stores them as float32.

    Args:
      betas: [T] forward-process variances in (0, 1] (see `schedules`).
      model_mean_type: what the network predicts: `eps` (the noise), `xstart`
        (x_0), `xprev` (the posterior mean of x_{t-1}) or `v` (√ᾱ ε − √(1−ᾱ) x_0).
      model_var_type: `fixedlarge` (σ² = β), `fixedsmall` (σ² = β̃), `learned`
        (the network outputs log σ²) or `learned_range` (the network outputs
        v ∈ [-1, 1] interpolating log β̃ and log β).
      loss_type: `mse` (L_simple; fixed variances), `kl` (the variational
        bound, in bits/dim) or `hybrid` (L_simple + λ·L_vlb; learned variances).
      hybrid_lambda: λ of the hybrid loss.

    Returns:
      The diffusion object.

    Raises:
      ValueError: for an unknown type, betas outside (0, 1] or of the wrong
        rank, or a loss that does not fit the variance type.
    """
    for name, value, choices in (
      ("model_mean_type", model_mean_type, MODEL_MEAN_TYPES),
      ("model_var_type", model_var_type, MODEL_VAR_TYPES),
      ("loss_type", loss_type, LOSS_TYPES),
    ):
      if value not in choices:
        raise errors.UserError(f"Unknown {name} {value!r}; valid choices are {', '.join(choices)}.")
    learned = model_var_type in ("learned", "learned_range")
    if loss_type == "mse" and learned:
      raise errors.UserError(
        f"loss_type='mse' cannot train a {model_var_type!r} variance; use loss_type='hybrid' or 'kl', "
        "or a fixed variance (fixedlarge/fixedsmall)."
      )
    if loss_type == "hybrid" and not learned:
      raise errors.UserError(
        f"loss_type='hybrid' trains a learned variance, but model_var_type={model_var_type!r}; "
        "use 'learned' or 'learned_range', or loss_type='mse'."
      )

    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
      raise errors.UserError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not ((betas > 0).all() and (betas <= 1).all()):
      raise errors.UserError("betas must lie in (0, 1].")

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore"):
      posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
      # β̃_0 = 0, so index 0 takes β̃_1 (for T = 1 there is no β̃_1: fall back to β_0).
      first = posterior_variance[1] if len(betas) > 1 else betas[0]
      posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
      fixedlarge_log_variance = np.log(np.append(first, betas[1:]))
      tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixedlarge_log_variance=fixedlarge_log_variance,
        log_betas=np.log(betas),
      )
    return cls(
      **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
      loss_type=loss_type,
      hybrid_lambda=float(hybrid_lambda),
    )

  # --------------------------------------------------------------------------
  # Shapes and gathering.
  # --------------------------------------------------------------------------

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def learned_variance(self) -> bool:
    return self.model_var_type in ("learned", "learned_range")

  def model_output_channels(self, channels: int) -> int:
    """Channels the network must output for images with `channels` channels."""
    return 2 * channels if self.learned_variance else channels

  def _check(self, x, t, name="x_t"):
    if jnp.ndim(x) < 2:
      raise errors.UserError(f"{name} must be batched, [B, ...] (e.g. [B, H, W, C]); got shape {jnp.shape(x)}.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise errors.UserError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}.")
    if jnp.ndim(t) != 1 or jnp.shape(t)[0] != jnp.shape(x)[0]:
      raise errors.UserError(
        f"t must have shape [B] = [{jnp.shape(x)[0]}] (one timestep per example), got shape {jnp.shape(t)}."
      )
    if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
      raise errors.UserError(
        f"t must hold integer timesteps in [0, {self.num_timesteps}), got dtype {jnp.result_type(t)}."
      )

  @staticmethod
  def _extract(table, t, x_shape):
    """table[t] as [B, 1, ..., 1], ready to broadcast against x of shape x_shape."""
    return jnp.take(table, t).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))

  # --------------------------------------------------------------------------
  # The forward process and its posterior.
  # --------------------------------------------------------------------------

  def q_mean_variance(self, x_start, t):
    """Mean, variance and log-variance of q(x_t | x_0); each broadcastable to x_start."""
    self._check(x_start, t, "x_start")
    mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    # From the float64-derived table: 1 - ᾱ_t in float32 loses 1e-4 relative at t = 0.
    variance = self._extract(jnp.square(self.sqrt_one_minus_alphas_cumprod), t, x_start.shape)
    log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    """Diffuses x_start [B, ...] to step t [B] with the given noise: √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    self._check(x_start, t, "x_start")
    if noise.shape != x_start.shape:
      raise errors.UserError(f"noise has shape {noise.shape}, expected x_start's shape {x_start.shape}.")
    return (
      self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
      + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    self._check(x_t, t)
    if x_start.shape != x_t.shape:
      raise errors.UserError(f"x_start has shape {x_start.shape}, expected x_t's shape {x_t.shape}.")
    mean = (
      self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
      + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = self._extract(self.posterior_variance, t, x_t.shape)
    log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped

  # --------------------------------------------------------------------------
  # Conversions between the parameterisations.
  # --------------------------------------------------------------------------

  def predict_xstart_from_eps(self, x_t, t, eps):
    return (
      self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
      - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / self._extract(
      self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )

  def predict_xstart_from_xprev(self, x_t, t, xprev):
    coef1 = self._extract(self.posterior_mean_coef1, t, x_t.shape)
    coef2 = self._extract(self.posterior_mean_coef2, t, x_t.shape)
    return xprev / coef1 - (coef2 / coef1) * x_t

  def predict_xstart_from_v(self, x_t, t, v):
    return (
      self._extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
      - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )

  def get_v(self, x_start, noise, t):
    """The v-prediction target √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022)."""
    return (
      self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
      - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
    )

  # --------------------------------------------------------------------------
  # The reverse process.
  # --------------------------------------------------------------------------

  def _split_output(self, model_output, x_t):
    """Splits the network output into its mean part and (if learned) its variance part."""
    c = x_t.shape[-1]
    expected = x_t.shape[:-1] + (self.model_output_channels(c),)
    if model_output.shape != expected:
      raise errors.UserError(
        f"model_output has shape {model_output.shape}, expected {expected} "
        f"(model_var_type={self.model_var_type!r} needs {self.model_output_channels(c)} output channels)."
      )
    model_output = model_output.astype(jnp.float32)
    if self.learned_variance:
      return model_output[..., :c], model_output[..., c:]
    return model_output, None

  def p_mean_variance(self, model_output, x_t, t, *, clip_denoised=True):
    """Mean and variance of p(x_{t-1} | x_t) from the network's output.

    Args:
      model_output: the network's output at (x_t, t): [B, H, W, C], or
        [B, H, W, 2C] for a learned variance (mean part first).
      x_t: [B, H, W, C].
      t: [B] integer timesteps.
      clip_denoised: clip the x_0 prediction to [-1, 1] before the posterior
        mean is taken (the reference code's default). The `xprev` mean is never
        clipped, only its derived x_0.

    Returns:
      dict of `mean`, `variance`, `log_variance` and `pred_xstart`, each of x_t's shape.
    """
    self._check(x_t, t)
    mean_out, var_out = self._split_output(model_output, x_t)

    if self.model_var_type == "learned":
      log_variance = var_out
    elif self.model_var_type == "learned_range":
      min_log = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
      max_log = self._extract(self.log_betas, t, x_t.shape)
      frac = (var_out + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
    elif self.model_var_type == "fixedlarge":
      log_variance = jnp.broadcast_to(self._extract(self.fixedlarge_log_variance, t, x_t.shape), x_t.shape)
    else:
      log_variance = jnp.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, x_t.shape), x_t.shape)
    if self.model_var_type == "fixedlarge":
      variance = jnp.broadcast_to(self._extract(self.betas, t, x_t.shape), x_t.shape)
    elif self.model_var_type == "fixedsmall":
      variance = jnp.broadcast_to(self._extract(self.posterior_variance, t, x_t.shape), x_t.shape)
    else:
      variance = jnp.exp(log_variance)

    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if self.model_mean_type == "xprev":
      pred_xstart = maybe_clip(self.predict_xstart_from_xprev(x_t, t, mean_out))
      mean = mean_out
    else:
      if self.model_mean_type == "xstart":
        pred_xstart = maybe_clip(mean_out)
      elif self.model_mean_type == "eps":
        pred_xstart = maybe_clip(self.predict_xstart_from_eps(x_t, t, mean_out))
      else:
        pred_xstart = maybe_clip(self.predict_xstart_from_v(x_t, t, mean_out))
      mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  def p_sample(self, model_output, x_t, t, noise, *, clip_denoised=True):
    """One ancestral step x_t → x_{t-1}: mean + [t > 0]·σ_t·noise.

    At t = 0 no noise is added, so the final sample is the (clipped) x_0
    prediction's posterior mean, which for eps equals the clipped x_0 prediction.

    Returns:
      dict of `sample` and `pred_xstart`, each of x_t's shape.
    """
    if noise.shape != x_t.shape:
      raise errors.UserError(f"noise has shape {noise.shape}, expected x_t's shape {x_t.shape}.")
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    nonzero_mask = self._extract((jnp.arange(self.num_timesteps) != 0).astype(jnp.float32), t, x_t.shape)
    sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
    return dict(sample=sample, pred_xstart=out["pred_xstart"])

  # --------------------------------------------------------------------------
  # Likelihood terms and losses.
  # --------------------------------------------------------------------------

  def vb_terms_bpd(self, model_output, x_start, x_t, t, *, clip_denoised):
    """One term of the variational bound, in bits/dim.

    L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the
    discretized decoder NLL −log p(x_0 | x_1) for t = 0.

    Returns:
      dict of `output` [B] and `pred_xstart` [B, H, W, C].
    """
    true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
    kl = _meanflat(kl) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    decoder_nll = _meanflat(decoder_nll) / math.log(2.0)
    return dict(output=jnp.where(t == 0, decoder_nll, kl), pred_xstart=out["pred_xstart"])

  def training_losses(self, model_fn: ModelFn, x_start, t, noise):
    """Per-example training loss [B] at timesteps t [B] with the given noise.

    `mse` is the mean (over dimensions, not the paper's sum) of the squared
    error against the target of `model_mean_type`; `kl` is the bound term in
    bits/dim; `hybrid` is `mse` on the mean part plus λ·T times the bound term
    computed with the mean held fixed (stop-gradient), so the bound trains only
    the variance, as in Nichol & Dhariwal (2021).

    Args:
      model_fn: model_fn(x_t, t) -> model output.
      x_start: [B, H, W, C] data in [-1, 1].
      t: [B] integer timesteps.
      noise: [B, H, W, C] standard normal noise.

    Returns:
      [B] float32 losses.
    """
    self._check(x_start, t, "x_start")
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, t)

    if self.loss_type == "kl":
      return self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)["output"]

    mean_out, var_out = self._split_output(model_output, x_t)
    if self.model_mean_type == "eps":
      target = noise
    elif self.model_mean_type == "xstart":
      target = x_start
    elif self.model_mean_type == "v":
      target = self.get_v(x_start, noise, t)
    else:
      target, _, _ = self.q_posterior_mean_variance(x_start, x_t, t)
    mse = _meanflat(jnp.square(target - mean_out))
    if self.loss_type == "mse":
      return mse
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    vb = self.vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)["output"]
    return mse + self.hybrid_lambda * self.num_timesteps * vb

  def prior_bpd(self, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]; about 1e-5 for the linear schedule."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
    kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
    return _meanflat(jnp.broadcast_to(kl_prior, x_start.shape)) / math.log(2.0)

  def calc_bpd_loop(self, model_fn: ModelFn, x_start, rng, *, clip_denoised=True):
    """The full variational bound, one Monte Carlo draw per term, as one `lax.scan` over T.

    The noise of term t is `jax.random.normal(jax.random.fold_in(rng, t),
    x_start.shape)`. `clip_denoised=True` is the reference code's default and
    what the paper's test NLL used.

    Args:
      model_fn: model_fn(x_t, t) -> model output.
      x_start: [B, H, W, C] data in [-1, 1].
      rng: a PRNG key.
      clip_denoised: clip the x_0 predictions in the bound terms.

    Returns:
      dict of `total_bpd` [B], `terms_bpd` [B, T], `prior_bpd` [B] and
      `mse` [B, T] (the x_0 prediction's mean squared error at each t).
    """
    batch = x_start.shape[0]

    def body(carry, t_scalar):
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, dtype=jnp.float32)
      x_t = self.q_sample(x_start, t, noise)
      vb = self.vb_terms_bpd(model_fn(x_t, t), x_start, x_t, t, clip_denoised=clip_denoised)
      mse = _meanflat(jnp.square(vb["pred_xstart"] - x_start))
      return carry, (vb["output"], mse)

    timesteps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms, mse) = jax.lax.scan(body, None, timesteps)
    # Scanned from t = T-1 down to 0: flip so that column t holds timestep t.
    terms_bpd = jnp.flip(terms, axis=0).T
    mse = jnp.flip(mse, axis=0).T
    prior = self.prior_bpd(x_start)
    return dict(total_bpd=jnp.sum(terms_bpd, axis=1) + prior, terms_bpd=terms_bpd, prior_bpd=prior, mse=mse)


def from_config(config: Any) -> GaussianDiffusion:
  """Builds a GaussianDiffusion from a config's `diffusion` section (see configs/)."""
  betas = schedules.get_beta_schedule(
    config.beta_schedule,
    beta_start=config.beta_start,
    beta_end=config.beta_end,
    num_timesteps=config.num_timesteps,
  )
  return GaussianDiffusion.create(
    betas,
    model_mean_type=config.model_mean_type,
    model_var_type=config.model_var_type,
    loss_type=config.loss_type,
    hybrid_lambda=config.get("hybrid_lambda", 0.001),
  )
