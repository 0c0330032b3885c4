r"""Exact likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling").

A trained DDPM also defines a normalised density through the deterministic probability-flow ODE that carries a
standard normal at the end of the process to the data. This module evaluates that density, per image, with an
adaptive ODE solver (diffrax) and the Skilling–Hutchinson estimator of the divergence, and turns it into bits/dim
of 8-bit images with uniform dequantisation, as score_sde's `likelihood.py` does.

Continuous time. The discrete schedule ᾱ_0 … ᾱ_{T-1} (code timesteps) becomes a continuous one on τ ∈ [0, T]:
log ᾱ(τ) is piecewise linear through the knots log ᾱ(0) = 0 (the data, ᾱ = 1) and log ᾱ(k + 1) = log ᾱ_k, so the
continuous process has exactly the discrete marginals at every integer τ = k + 1 and a constant rate
β(τ) = −d log ᾱ/dτ = −log(1 − β_k) on (k, k + 1]. The network is called with the float timestep t = τ − 1 (code
timestep k at τ = k + 1; the sinusoidal embedding takes any float, and over τ < 1 it is extrapolated smoothly below
the first trained timestep). The integration starts at τ_0 = `t_start` > 0 (default 1e-3, where
1 − ᾱ ≈ 1e-3·β_0, i.e. a noise level far below one 8-bit bin), because the ε-parameterised drift divides by
√(1 − ᾱ), which vanishes at τ = 0.

The formula. With x_{τ_0} = z the (dequantised, [-1, 1]-scaled) image of D dimensions, the probability-flow ODE

  dx/dτ = f(x, τ) = −½ β(τ) [x − ε̂(x, τ) / √(1 − ᾱ(τ))]

is integrated forwards, from the data at τ_0 to the noise at τ = T, together with its divergence:

  log p(z) = log N(x_T; 0, I) + ∫_{τ_0}^{T} ∇·f(x_τ, τ) dτ = prior + delta_logp,
  log N(x_T; 0, I) = −½ ‖x_T‖² − (D/2) log 2π.

(Along the flow d log p(x_τ)/dτ = −∇·f, so the data's log-density is the prior's plus the integrated divergence.)
∇·f is estimated as the mean over K probes v (Rademacher or Gaussian, drawn once per solve) of vᵀ (∂f/∂x) v
(a `jax.linearize` Jacobian–vector product); `estimator="exact"` uses the D standard basis vectors instead (the
exact trace, for small D). Each probe's integral is a separate ODE state, so the estimator's standard error per image
is the spread of the K integrals over √K.

Dequantisation. An 8-bit value k ∈ {0 … 255} (stored as k/127.5 − 1) becomes z = 2 (k + u)/256 − 1 with
u ~ U[0, 1): a density on [-1, 1]^D with bins of width 2/256. Since P(k) = ∫_bin p ≥ exp E_u[log p(z) + D log(2/256)]
(Jensen), the bits/dim

  bits/dim = −(log p(z) + D log(2/256)) / (D ln 2) = −log p(z) / (D ln 2) + 7

is an upper bound (in expectation over u) on the discrete model's bits/dim, and is never negative for a density that
integrates to one over the bins (a model uniform on [-1, 1]^D gives exactly 8). Without dequantisation a continuous
density evaluated at the 8-bit grid can exceed any bound and give negative bits/dim (score_sde issue #24).

Sharding. `compute_ode_bpd` solves each global batch as one ODE system: the adaptive step controller's error norm is
taken over the whole batch, so every device takes the same steps and the result depends on the batch, the tolerances
and the rng, not on the number of devices. Each finished batch is written to `out_dir/batch_<k>.npz`; a rerun skips the
batches whose file exists.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import config_base
from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.models import unet

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
ESTIMATORS = ("rademacher", "gaussian", "exact")
MEAN_TYPES = ("eps", "xstart", "v")
# Each step of the two FSAL 7-stage solvers evaluates 6 new stages; the first stage of the solve is one more.
_STAGES_PER_STEP = 6
# The defaults of an `ode_bpd` entry of config.evals.
DEFAULTS = config_base.ODE_BPD_DEFAULTS
# log2(256 / 2): the 8-bit bin width 2/256 on the [-1, 1] scale, in bits.
DEQUANTIZATION_BITS = 7.0


# ----------------------------------------------------------------------------
# The continuous-time schedule and the drift.
# ----------------------------------------------------------------------------


def log_alpha_bar(diffusion: GaussianDiffusion, tau):
  """log ᾱ(τ): piecewise linear through 0 at τ = 0 and log ᾱ_k at τ = k + 1 (τ ∈ [0, T])."""
  knots = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(jnp.log1p(-diffusion.betas))])
  return jnp.interp(tau, jnp.arange(diffusion.num_timesteps + 1, dtype=jnp.float32), knots)


def beta(diffusion: GaussianDiffusion, tau):
  """β(τ) = −d log ᾱ/dτ = −log(1 − β_k) on (k, k + 1]."""
  k = jnp.clip(jnp.ceil(tau).astype(jnp.int32) - 1, 0, diffusion.num_timesteps - 1)
  return -jnp.log1p(-jnp.take(diffusion.betas, k))


def check_mean_type(model_mean_type: str) -> None:
  if model_mean_type not in MEAN_TYPES:
    raise errors.UserError(
      f"The probability-flow likelihood needs the noise (or an equivalent) at any continuous time, which "
      f"model_mean_type={model_mean_type!r} does not give (it predicts a discrete posterior mean); supported: "
      f"{', '.join(MEAN_TYPES)}."
    )


def check_model(model_mean_type: str, num_timesteps: int, t_start: float) -> None:
  """The solver's settings against a model (`solver_settings` checks them alone): its mean type gives the noise at
  any continuous time, and τ_0 = `t_start` lies in (0, T).

  Raises:
    UserError: an `xprev` model, or `t_start` outside (0, T).
  """
  check_mean_type(model_mean_type)
  if not 0.0 < t_start < num_timesteps:
    raise errors.UserError(f"t_start must lie in (0, T = {num_timesteps}), got {t_start}.")


def drift(diffusion: GaussianDiffusion, model_fn, x, tau):
  """The probability-flow drift f(x, τ) = −½ β(τ) [x − ε̂ / √(1 − ᾱ(τ))] for a batch x at the scalar time τ.

  `model_fn(x, t)` is called with the float timesteps t = τ − 1 ([B]); its mean part (x_0, ε or v, as the
  diffusion's `model_mean_type` says) is turned into ε̂ with the continuous ᾱ(τ).
  """
  check_mean_type(diffusion.model_mean_type)
  la = log_alpha_bar(diffusion, tau)
  sqrt_abar = jnp.exp(0.5 * la)
  sigma = jnp.sqrt(-jnp.expm1(la))
  t = jnp.full((x.shape[0],), tau - 1.0, dtype=jnp.float32)
  out, _ = diffusion._split_output(model_fn(x, t), x)  # pylint: disable=protected-access
  if diffusion.model_mean_type == "eps":
    eps = out
  elif diffusion.model_mean_type == "xstart":
    eps = (x - sqrt_abar * out) / sigma
  else:  # v = √ᾱ ε − √(1−ᾱ) x_0, so ε = √(1−ᾱ) x + √ᾱ v.
    eps = sigma * x + sqrt_abar * out
  return -0.5 * beta(diffusion, tau) * (x - eps / sigma)


# ----------------------------------------------------------------------------
# Dequantisation, the prior and bits/dim.
# ----------------------------------------------------------------------------


def dequantize(images, rng):
  """Images k/127.5 − 1 (k ∈ {0 … 255}) → z = 2 (k + u)/256 − 1, u ~ U[0, 1) per dimension."""
  k = jnp.round((images.astype(jnp.float32) + 1.0) * 127.5)
  u = jax.random.uniform(rng, images.shape, dtype=jnp.float32)
  return (k + u) / 128.0 - 1.0


def prior_logp(x_T):
  """log N(x_T; 0, I) per example, [B]."""
  d = math.prod(x_T.shape[1:])
  return -0.5 * jnp.sum(jnp.square(x_T).reshape(x_T.shape[0], -1), axis=1) - 0.5 * d * math.log(2.0 * math.pi)


def bits_per_dim(logp, num_dims: int, *, dequantized: bool = True):
  """−log p / (D ln 2), plus the 7 bits of the [-1, 1] bin width 2/256 for a density of dequantised 8-bit data."""
  return -logp / (num_dims * math.log(2.0)) + (DEQUANTIZATION_BITS if dequantized else 0.0)


# ----------------------------------------------------------------------------
# The ODE log-likelihood of a batch.
# ----------------------------------------------------------------------------


def _probes(rng, x_shape, estimator: str, num_probes: int):
  """[K, B, ...] probe vectors: K Rademacher or Gaussian draws, or the D standard basis vectors (`exact`)."""
  if estimator == "exact":
    d = math.prod(x_shape[1:])
    basis = jnp.eye(d, dtype=jnp.float32).reshape((d, 1) + tuple(x_shape[1:]))
    return jnp.broadcast_to(basis, (d,) + tuple(x_shape))
  draw = jax.random.rademacher if estimator == "rademacher" else jax.random.normal
  return draw(rng, (num_probes,) + tuple(x_shape), dtype=jnp.float32)


def ode_log_likelihood(
  diffusion: GaussianDiffusion,
  model_fn,
  x,
  rng,
  *,
  rtol: float,
  atol: float,
  solver: str = "tsit5",
  estimator: str = "rademacher",
  num_probes: int = 1,
  t_start: float = DEFAULTS["t_start"],
  max_steps: int = 4096,
  step_to_knots: bool = False,
) -> dict[str, Any]:
  """log p(x) per example through the probability-flow ODE (the module doc's formula), as one ODE system.

  Args:
    diffusion: the diffusion (its schedule and `model_mean_type`: eps, xstart or v).
    model_fn: model_fn(x_t [B, ...], t [B] float) -> the network output.
    x: [B, ...] points of the density (dequantised images: see `dequantize`).
    rng: the key of the probes (unused by `exact`).
    rtol, atol: the tolerances of diffrax's `PIDController` (over the whole batch's state).
    solver: `tsit5` or `dopri5`.
    estimator: `rademacher`, `gaussian` (K probes) or `exact` (the D basis vectors).
    num_probes: K of the Hutchinson estimators.
    t_start: τ_0, where the data is (0 < τ_0 < T).
    max_steps: the solver's step limit (an error beyond it).
    step_to_knots: end steps exactly at the integer τ where β(τ) jumps (diffrax's `jump_ts`): at least T steps,
      but the global error then follows the tolerances; without it a schedule whose β jumps by a large fraction per
      step (short schedules) can be solved with an error well above them.

  Returns:
    dict of `logp`, `prior`, `delta_logp`, `delta_logp_sem` (the estimator's standard error per example: 0 for
    `exact`, NaN for one probe), each [B]; `x_T` [B, ...]; `nfe` (network evaluations, one per drift evaluation:
    1 + 6 per step), `num_steps` and `num_accepted_steps` (scalars, shared by the whole batch).

  Raises:
    UserError: settings that `solver_settings` or `check_model` refuse.
  """
  solver_settings(rtol, atol, solver, estimator, num_probes, t_start, step_to_knots)
  T = diffusion.num_timesteps
  check_model(diffusion.model_mean_type, T, t_start)
  x = jnp.asarray(x, jnp.float32)
  probes = _probes(rng, x.shape, estimator, num_probes)
  axes = tuple(range(2, probes.ndim))

  def vector_field(tau, state, args):
    del args
    y, _ = state
    fy, jvp = jax.linearize(lambda z: drift(diffusion, model_fn, z, tau), y)
    div = jnp.sum(probes * jax.vmap(jvp)(probes), axis=axes)  # [K, B]: vᵀ (∂f/∂x) v per probe
    return fy, div

  y0 = (x, jnp.zeros(probes.shape[:2], jnp.float32))
  # β(τ) jumps at the integer knots; landing on them keeps the solver's error estimate honest there.
  knots = np.arange(1, T, dtype=np.float32) if step_to_knots and T > 1 else None
  sol = diffrax.diffeqsolve(
    diffrax.ODETerm(vector_field),
    SOLVERS[solver](),
    t0=float(t_start),
    t1=float(T),
    dt0=None,
    y0=y0,
    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, jump_ts=knots),
    max_steps=max_steps,
  )
  x_T, per_probe = sol.ys[0][-1], sol.ys[1][-1]
  if estimator == "exact":
    delta = jnp.sum(per_probe, axis=0)
    sem = jnp.zeros_like(delta)
  else:
    delta = jnp.mean(per_probe, axis=0)
    k = per_probe.shape[0]
    sem = jnp.std(per_probe, axis=0, ddof=1) / math.sqrt(k) if k > 1 else jnp.full_like(delta, jnp.nan)
  prior = prior_logp(x_T)
  num_steps = sol.stats["num_steps"]
  return dict(
    logp=prior + delta,
    prior=prior,
    delta_logp=delta,
    delta_logp_sem=sem,
    x_T=x_T,
    nfe=1 + _STAGES_PER_STEP * num_steps,
    num_steps=num_steps,
    num_accepted_steps=sol.stats["num_accepted_steps"],
  )


# ----------------------------------------------------------------------------
# Bits/dim over a split.
# ----------------------------------------------------------------------------


def solver_settings(rtol, atol, solver, estimator, num_probes, t_start, step_to_knots) -> tuple:
  """`ode_log_likelihood`'s options, checked, as the hashable, typed tuple `batch_fn` is cached on.

  The one check of the settings themselves, for every caller (`ode_log_likelihood`, `compute_ode_bpd`, the
  `ode_bpd` evaluator, `sampling.likelihood_fn`); `check_model` checks them against a model.

  Raises:
    UserError: an unknown solver or trace estimator, rtol or atol not above 0, or fewer than one probe.
  """
  settings = (
    ("rtol", float(rtol)),
    ("atol", float(atol)),
    ("solver", str(solver)),
    ("estimator", str(estimator)),
    ("num_probes", int(num_probes)),
    ("t_start", float(t_start)),
    ("step_to_knots", bool(step_to_knots)),
  )
  o = dict(settings)
  if o["solver"] not in SOLVERS:
    raise errors.UserError(f"Unknown ODE solver {o['solver']!r}; choose from {', '.join(SOLVERS)}.")
  if o["estimator"] not in ESTIMATORS:
    raise errors.UserError(f"Unknown trace estimator {o['estimator']!r}; choose from {', '.join(ESTIMATORS)}.")
  if not (o["rtol"] > 0 and o["atol"] > 0 and o["num_probes"] >= 1):
    raise errors.UserError(
      f"rtol and atol must be > 0 and num_probes >= 1; got rtol={o['rtol']:g}, atol={o['atol']:g}, "
      f"num_probes={o['num_probes']}."
    )
  return settings


@functools.lru_cache(maxsize=8)
def batch_fn(model_def: unet.UNet, mesh: Mesh, settings: tuple, conditional: bool):
  """jit(params, diffusion, images [B, ...], rng[, labels [B]]) -> per-image results: one ODE system per batch."""
  options = dict(settings)
  apply = runtime.model_fn(model_def)
  replicated, sharded = runtime.replicated(mesh), runtime.batch_sharding(mesh)

  def fn(params, diffusion, images, rng, *labels):
    model_fn = runtime.bind(apply, params)
    if labels:
      bound, (y,) = model_fn, labels
      model_fn = lambda x_t, t: bound(x_t, t, y)  # noqa: E731
    dequant_rng, probe_rng = jax.random.split(rng)
    z = dequantize(images, dequant_rng)
    out = ode_log_likelihood(diffusion, model_fn, z, probe_rng, **options)
    d = math.prod(images.shape[1:])
    out["bpd"] = bits_per_dim(out["logp"], d)
    out["delta_logp_sem_bpd"] = out["delta_logp_sem"] / (d * math.log(2.0))
    del out["x_T"]
    return out

  in_shardings = (replicated, replicated, sharded, replicated) + ((sharded,) if conditional else ())
  return jax.jit(fn, in_shardings=in_shardings)


_PER_IMAGE = ("bpd", "logp", "prior", "delta_logp", "delta_logp_sem", "delta_logp_sem_bpd", "index")
_PER_BATCH = ("nfe", "num_steps", "num_accepted_steps")


def _write_batch(path: epath.Path, record: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **record)
  runtime.atomic_write(path, buf.getvalue())


def _read_batch(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open("rb") as f, np.load(f) as data:
    return {k: np.asarray(data[k]) for k in data.files}


def batch_path(out_dir, index: int) -> epath.Path:
  return epath.Path(out_dir) / f"batch_{index:05d}.npz"


def compute_ode_bpd(
  model: inference.LoadedModel,
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  *,
  mesh: Mesh | None = None,
  progress: bool = True,
  out_dir=None,
  rtol: float = DEFAULTS["rtol"],
  atol: float = DEFAULTS["atol"],
  solver: str = DEFAULTS["solver"],
  estimator: str = DEFAULTS["estimator"],
  num_probes: int = DEFAULTS["num_probes"],
  max_examples: int = DEFAULTS["max_examples"],
  t_start: float = DEFAULTS["t_start"],
  step_to_knots: bool = DEFAULTS["step_to_knots"],
  split: str | None = None,
  batch_size: int | None = None,
) -> dict[str, Any]:
  """Bits/dim of the probability-flow ODE density over a data split, with uniform dequantisation.

  The split is read in fixed order in global batches of `batch_size` (default `config.eval.batch_size`); the last
  partial batch is padded and the padding left out, so every image counts once. Batch k uses the key
  `fold_in(rng, k)` (split into the dequantisation noise and the probes of the whole global batch) and is solved as
  one ODE system on the mesh. With `out_dir`, each finished batch's per-image results go to
  `out_dir/batch_<k>.npz` (process 0, atomically) and batches whose file exists are read instead of solved.

  Args:
    model: an `inference.LoadedModel` (EMA parameters, for the paper's protocol).
    config: the run config; reads `config.data` and `config.eval.batch_size`.
    rng: a PRNG key.
    mesh: the device mesh (default: all devices on one 'data' axis).
    progress: a tqdm progress bar on process 0.
    out_dir: the folder of the per-batch files (None: nothing is written or resumed).
    rtol, atol, solver, estimator, num_probes, t_start, step_to_knots: see `ode_log_likelihood`.
    max_examples: the first examples of the split only (0 = all).
    split: the split (default `config.data.eval_split`).
    batch_size: the global batch B, a multiple of the number of devices.

  Returns:
    A JSON-serialisable dict: `ode_bpd` (the mean over images), `ode_bpd_sem` (its standard error over images,
    which includes the estimator's noise), `estimator_sem_bpd` (the mean per-image standard error of the trace
    estimator, in bits/dim; NaN for one probe), `prior_bpd` and `delta_bpd` (the two terms' means in bits/dim,
    without the 7 bits of dequantisation), `nfe_mean` (network evaluations per batch, averaged over batches),
    `num_examples`, `num_batches`, `resumed_batches`, and the settings.

  Raises:
    UserError: no eval split, an unsupported model or setting, or a batch size that does not fit the devices.
  """
  settings = solver_settings(rtol, atol, solver, estimator, num_probes, t_start, step_to_knots)
  check_model(model.diffusion.model_mean_type, model.diffusion.num_timesteps, t_start)
  split = config.data.eval_split if split is None else split
  batch_size = int(config.eval.batch_size if batch_size is None else batch_size)
  mesh = runtime.make_mesh() if mesh is None else mesh
  if not split:
    raise errors.UserError(
      f"No eval split for dataset {config.data.dataset!r} (config.data.eval_split is empty), so the ODE bits/dim "
      "cannot be computed: set --config.data.eval_split=<split>."
    )
  if batch_size < 1 or batch_size % mesh.size:
    raise errors.UserError(
      f"The eval batch size {batch_size} must be a positive multiple of the number of devices ({mesh.size}); set "
      "--config.eval.batch_size accordingly."
    )
  iterator = input_pipeline.create_eval_iterator(
    config, split=split, batch_size=batch_size, drop_remainder=False, max_examples=int(max_examples)
  )
  conditional = bool(model.num_classes)
  fn = batch_fn(model.network, mesh, settings, conditional)
  params = model.params_on(mesh)
  diffusion = runtime.put_replicated(model.diffusion, mesh)

  out_dir = None if out_dir is None else epath.Path(out_dir)
  done = set()
  if out_dir is not None:
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
    done = {k for k in range(iterator.num_batches) if batch_path(out_dir, k).exists()}
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ode_bpd_resume")  # every process decides on the same files

  batches = []
  desc = f"ODE bits/dim on {config.data.dataset}:{split}"
  for index, batch in enumerate(runtime.progress_bar(iterator, iterator.num_batches, progress, desc)):
    if index in done:
      batches.append(_read_batch(batch_path(out_dir, index)))
      continue
    arrays = runtime.global_array((batch["image"],) + ((batch["label"],) if conditional else ()), mesh)
    out = runtime.to_host(fn(params, diffusion, arrays[0], jax.random.fold_in(rng, index), *arrays[1:]))
    mask = runtime.to_host(runtime.global_array(batch["mask"], mesh)).astype(bool)
    record = {k: np.asarray(out[k])[mask] for k in _PER_IMAGE if k != "index"}
    record["index"] = (index * batch_size + np.arange(batch_size))[mask]
    record.update({k: np.asarray(out[k]) for k in _PER_BATCH})
    if out_dir is not None and jax.process_index() == 0:
      _write_batch(batch_path(out_dir, index), record)
    batches.append(record)

  cat = lambda k: np.concatenate([np.asarray(b[k], np.float64) for b in batches]) if batches else np.zeros(0)  # noqa: E731
  bpd = cat("bpd")
  count = int(bpd.size)
  if count != iterator.num_examples:
    raise RuntimeError(f"The ODE bits/dim covered {count} images, the eval iterator promised {iterator.num_examples}.")
  d = math.prod(runtime.image_shape(config))
  to_bits = 1.0 / (d * math.log(2.0))
  nfe = [float(b["nfe"]) for b in batches]
  result = {
    "metric": "ode_bits_per_dim",
    "ode_bpd": float(np.mean(bpd)) if count else math.nan,
    "ode_bpd_sem": float(np.std(bpd, ddof=1) / math.sqrt(count)) if count > 1 else math.nan,
    "estimator_sem_bpd": float(np.mean(cat("delta_logp_sem_bpd"))) if count else math.nan,
    "prior_bpd": float(-np.mean(cat("prior")) * to_bits) if count else math.nan,
    "delta_bpd": float(-np.mean(cat("delta_logp")) * to_bits) if count else math.nan,
    "nfe_mean": float(np.mean(nfe)) if nfe else math.nan,
    "nfe_max": float(np.max(nfe)) if nfe else math.nan,
    "num_examples": count,
    "num_batches": iterator.num_batches,
    "resumed_batches": len(done),
    "split_size": iterator.split_size,
    "split": split,
    "dataset": config.data.dataset,
    "step": int(model.step),
    "use_ema": bool(model.use_ema),
    "batch_size": batch_size,
    "max_examples": int(max_examples),
    "conditional": conditional,
    "dequantization": "uniform (score_sde): z = 2 (k + u)/256 - 1, u ~ U[0, 1); +7 bits/dim for the bin width",
    "prior": "N(0, I) at tau = T",
    "time_map": "log alpha_bar piecewise linear; tau = k + 1 is code timestep k; network t = tau - 1",
    "out_dir": "" if out_dir is None else str(out_dir),
    **dict(settings),
  }
  logging.info(
    "ODE bits/dim %.5f ± %.5f on %d of %d images of %s:%s (%s, rtol %g, atol %g, %s×%d, mean NFE %.0f).",
    result["ode_bpd"],
    result["ode_bpd_sem"],
    count,
    iterator.split_size,
    config.data.dataset,
    split,
    solver,
    rtol,
    atol,
    estimator,
    num_probes,
    result["nfe_mean"],
  )
  return result
