"""The probability-flow ODE likelihood (evaluation/likelihood.py) against closed forms, and its evaluator.

Gaussian data N(μ, s²·I) diffused by x_τ = √ᾱ x_0 + √(1−ᾱ) ε stays Gaussian, N(√ᾱ μ, ᾱ s² + 1 − ᾱ), so the optimal
ε-predictor is analytic, ε̂ = √(1−ᾱ) (x − √ᾱ μ) / (ᾱ s² + 1 − ᾱ), the flow map is affine and every term of the
likelihood has a hand formula.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import schedules
from diffusion_jax.evaluation import evaluators
from diffusion_jax.evaluation import likelihood

MU, S = 0.3, 0.5
SHAPE = (8, 4, 4, 1)
D = 16
# ᾱ_T ≈ 1e-8: N(0, I) is the true marginal at τ = T to ~1e-8 per dimension.
DIFFUSION = diffusion_lib.GaussianDiffusion.create(
  schedules.get_beta_schedule("linear", beta_start=0.05, beta_end=0.95, num_timesteps=20)
)
T_START = 1e-6  # 1 − ᾱ(τ_0) ≈ 5e-8: the density at τ_0 is the data's to ~1e-6 nats over D = 16


def _eps_fn(x, t):
  la = likelihood.log_alpha_bar(DIFFUSION, t[0] + 1.0)
  var = jnp.exp(la) * S * S - jnp.expm1(la)
  return jnp.sqrt(-jnp.expm1(la)) * (x - jnp.exp(0.5 * la) * MU) / var


def _log_normal(x, mean, var):
  return jnp.sum(-0.5 * jnp.square(x - mean) / var - 0.5 * jnp.log(2 * math.pi * var), axis=(1, 2, 3))


def _marginal(tau):
  la = likelihood.log_alpha_bar(DIFFUSION, tau)
  return jnp.exp(0.5 * la) * MU, jnp.exp(la) * S * S - jnp.expm1(la)


def _solve(x, *, estimator, num_probes=1, tol=1e-5, knots=True, seed=1):
  fn = lambda x, rng: likelihood.ode_log_likelihood(  # noqa: E731
    DIFFUSION,
    _eps_fn,
    x,
    rng,
    rtol=tol,
    atol=tol,
    estimator=estimator,
    num_probes=num_probes,
    t_start=T_START,
    step_to_knots=knots,
  )
  return jax.jit(fn)(x, jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def data():
  return MU + S * jax.random.normal(jax.random.PRNGKey(0), SHAPE)


@pytest.fixture(scope="module")
def exact(data):
  return _solve(data, estimator="exact")


def test_exact_trace_gives_the_true_log_density(data, exact):
  # rtol = atol = 1e-5 on states of size O(1) (x) and O(D) (the log-det): a global error of a few 1e-5 nats; the
  # float32 sums over D = 16 terms add ~1e-5. 2e-4 nats (1e-5 nats per dimension) leaves a margin of 5.
  true = _log_normal(data, MU, S * S)
  np.testing.assert_allclose(exact["logp"], true, atol=2e-4, rtol=0)
  assert int(exact["nfe"]) == 1 + 6 * int(exact["num_steps"])


def test_flow_map_and_delta_logp_against_the_marginals(data, exact):
  # Integrated forwards, data → noise: the affine flow map x_T = √ᾱ_T μ + (x − √ᾱ_0 μ)·√(v_T / v_0).
  m0, v0 = _marginal(T_START)
  mT, vT = _marginal(float(DIFFUSION.num_timesteps))
  np.testing.assert_allclose(exact["x_T"], mT + (data - m0) * jnp.sqrt(vT / v0), atol=2e-5)
  # delta_logp alone = log p_0(x) − log p_T(x_T) (the change of variables).
  np.testing.assert_allclose(
    exact["delta_logp"], _log_normal(data, m0, v0) - _log_normal(exact["x_T"], mT, vT), atol=2e-4
  )


def test_prior_term_alone(exact):
  x_T = np.asarray(exact["x_T"], np.float64).reshape(SHAPE[0], -1)
  hand = -0.5 * np.sum(x_T**2, axis=1) - 0.5 * D * np.log(2 * np.pi)
  np.testing.assert_allclose(exact["prior"], hand, rtol=1e-6)
  np.testing.assert_allclose(exact["logp"], exact["prior"] + exact["delta_logp"], rtol=1e-6)


def test_dequantization_term_alone():
  k = np.arange(256, dtype=np.float32).reshape(4, 8, 8, 1)
  images = k / np.float32(127.5) - 1
  z = np.asarray(likelihood.dequantize(jnp.asarray(images), jax.random.PRNGKey(3)), np.float64)
  lo = 2 * k.astype(np.float64) / 256 - 1
  assert (z >= lo - 1e-6).all() and (z < lo + 2 / 256 + 1e-6).all()  # each value in its own bin of width 2/256
  # The uniform density on [-1, 1]^D, log p = −D log 2, gives exactly the 8 bits of a uniform 8-bit value.
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.float32(-64 * math.log(2.0)), 64), 8.0, rtol=1e-6)
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.float32(-64 * math.log(2.0)), 64, dequantized=False), 1.0)


def test_rademacher_is_exact_for_a_diagonal_jacobian(data, exact):
  # vᵀ J v = Σ J_ii v_i² = tr J for v_i = ±1 and diagonal J: no estimator noise at all here.
  out = _solve(data, estimator="rademacher", num_probes=2)
  np.testing.assert_allclose(out["logp"], exact["logp"], atol=1e-4)
  np.testing.assert_allclose(out["delta_logp_sem"], 0.0, atol=1e-4)


def test_gaussian_probes_within_three_standard_errors(data, exact):
  out = _solve(data, estimator="gaussian", num_probes=32)
  err = np.asarray(out["logp"] - _log_normal(data, MU, S * S))
  sem = np.asarray(out["delta_logp_sem"])
  assert (sem > 0.05).all()  # the estimator's noise dominates the solver's 2e-4
  assert (np.abs(err) < 3 * sem + 2e-4).all(), (err, sem)
  assert abs(err.mean()) < 3 * math.sqrt(np.sum(sem**2)) / len(err) + 2e-4


def test_without_knots_the_error_is_reported_not_hidden(data):
  # Without landing on the knots the β jumps of this short schedule cost accuracy; the result stays close.
  out = _solve(data, estimator="exact", knots=False)
  np.testing.assert_allclose(out["logp"], _log_normal(data, MU, S * S), atol=0.1)


def test_bits_per_dim_positive_with_dequantization():
  # 8-bit data from a sharp Gaussian (s = 4/255: ~4 values); the continuous Gaussian fitted to the dequantised data
  # would give negative bits/dim on the bare 8-bit grid, never on dequantised data.
  rng = np.random.RandomState(0)
  k = np.clip(np.round(127.5 + 2 * rng.standard_normal(SHAPE)), 0, 255).astype(np.float32)
  z = likelihood.dequantize(jnp.asarray(k / np.float32(127.5) - 1), jax.random.PRNGKey(0))
  logp = _log_normal(z, float(jnp.mean(z)), float(jnp.var(z)))
  bare = _log_normal(jnp.asarray(k / np.float32(127.5) - 1), float(jnp.mean(z)), float(jnp.var(z)))
  assert (likelihood.bits_per_dim(logp, D) > 0).all()
  assert (likelihood.bits_per_dim(bare, D, dequantized=False) < 0).all()  # score_sde #24


def test_xprev_refused():
  diffusion = diffusion_lib.GaussianDiffusion.create(np.linspace(0.1, 0.2, 4), model_mean_type="xprev")
  with pytest.raises(errors.UserError, match="model_mean_type='xprev'"):
    likelihood.ode_log_likelihood(diffusion, _eps_fn, jnp.zeros(SHAPE), jax.random.PRNGKey(0), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# The evaluator on the tiny model.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from conftest import tiny_config  # noqa: PLC0415
  from conftest import write_model_workdir  # noqa: PLC0415

  workdir = write_model_workdir(tmp_path_factory.mktemp("ode") / "wd", step=3)
  config = tiny_config()
  config.eval.batch_size = 4
  config.evals.ode_bpd.update(rtol=1e-3, atol=1e-3, max_examples=8)
  model = inference.load_model(workdir)
  return config, workdir, model


def test_evaluator_end_to_end_and_resumable(tiny, monkeypatch):
  config, workdir, model = tiny
  mesh = runtime.make_mesh()
  ev = evaluators.make("ode_bpd", config.evals.ode_bpd, config, workdir)
  results, files = evaluators.run_all([ev], model, workdir=workdir, mesh=mesh)
  (path,) = files
  assert "ode_bpd_step_000003" in path
  record = json.loads(open(path).read())
  assert set(record) >= {"figures", "details", "settings", "seconds", "name", "kind", "step"}
  figures, settings = record["figures"], record["settings"]
  assert 0 < figures["ode_bpd"] < 20 and figures["ode_bpd_sem"] > 0 and figures["nfe_mean"] > 6
  assert settings["num_examples"] == 8 and settings["solver"] == "tsit5" and settings["rtol"] == 1e-3
  out_dir = ev.out_dir(model.step)
  assert sorted(p.name for p in out_dir.iterdir()) == ["batch_00000.npz", "batch_00001.npz"]

  # A rerun reads the per-batch files and solves nothing.
  monkeypatch.setattr(likelihood, "ode_log_likelihood", lambda *a, **k: pytest.fail("solved again"))
  again, _ = evaluators.run_all([ev], model, workdir=workdir, mesh=mesh)
  assert again["ode_bpd"].figures["ode_bpd"] == figures["ode_bpd"]
  assert again["ode_bpd"].settings["resumed_batches"] == 2


def test_solver_settings_are_checked_in_one_place(tiny):
  config, workdir, model = tiny
  with pytest.raises(errors.UserError, match="Unknown ODE solver 'rk4'; choose from tsit5, dopri5"):
    likelihood.solver_settings(1e-3, 1e-3, "rk4", "rademacher", 1, 1e-3, False)
  with pytest.raises(errors.UserError, match="num_probes >= 1"):
    likelihood.ode_log_likelihood(
      DIFFUSION, _eps_fn, jnp.zeros(SHAPE), jax.random.PRNGKey(0), rtol=1e-3, atol=1e-3, num_probes=0
    )
  cfg = config.copy_and_resolve_references()
  cfg.evals.ode_bpd.estimator = "hutchinson"
  with pytest.raises(errors.UserError, match="config.evals.ode_bpd: Unknown trace estimator 'hutchinson'"):
    evaluators.make("ode_bpd", cfg.evals.ode_bpd, cfg, workdir)
  cfg.evals.ode_bpd.update(estimator="rademacher", t_start=float(cfg.diffusion.num_timesteps))
  with pytest.raises(errors.UserError, match=r"config.evals.ode_bpd: t_start must lie in \(0, T = 20\)"):
    evaluators.make("ode_bpd", cfg.evals.ode_bpd, cfg, workdir)
  with pytest.raises(errors.UserError, match=r"t_start must lie in \(0, T = 20\)"):
    likelihood.compute_ode_bpd(model, cfg, jax.random.PRNGKey(0), t_start=20.0)
  # An entry's other fields are its constructor's arguments: a setting its kind does not take is refused.
  cfg.evals.bpd.rtol = 1e-3
  with pytest.raises(errors.UserError, match="config.evals.bpd sets rtol, which a bpd evaluation does not take"):
    evaluators.make("bpd", cfg.evals.bpd, cfg, workdir)


def test_one_and_four_devices_agree_to_the_solver_tolerance(tiny, n_devices):
  config, workdir, model = tiny
  runs = [
    likelihood.compute_ode_bpd(
      model, config, jax.random.PRNGKey(0), mesh=mesh, progress=False, rtol=1e-3, atol=1e-3, max_examples=4
    )
    for mesh in (runtime.make_mesh(devices=jax.devices()[:1]), runtime.make_mesh())
  ]
  # One system per global batch: within a run every device takes the same steps (one error norm over the batch).
  # Across device counts the convolutions round differently (per-device batches of 4 and 1), and near τ_0 the drift
  # ε̂/σ(τ) of a (random) network scales as 1/σ and amplifies that, so the controller may accept or reject a few
  # different steps: the step counts agree to 10% and the values to ten times the solver's rtol (the global error
  # of an adaptive solve is a multiple of its local tolerance), not to float rounding.
  assert abs(runs[1]["nfe_mean"] - runs[0]["nfe_mean"]) <= 0.1 * runs[0]["nfe_mean"]
  np.testing.assert_allclose(runs[1]["ode_bpd"], runs[0]["ode_bpd"], rtol=1e-2)


def test_likelihood_fn_is_the_evaluators_computation_on_a_batch(tiny):
  config, workdir, model = tiny
  from diffusion_jax import input_pipeline  # noqa: PLC0415
  from diffusion_jax import sampling  # noqa: PLC0415

  images = input_pipeline.load_digits(config.data.eval_split)[0][:4]
  settings = dict(rtol=1e-3, atol=1e-3)
  want = likelihood.compute_ode_bpd(
    model,
    config,
    jax.random.PRNGKey(5),
    mesh=runtime.make_mesh(devices=jax.devices()[:1]),
    progress=False,
    max_examples=4,
    batch_size=4,
    **settings,
  )
  # The evaluator's batch k draws from fold_in(rng, k); one batch of the same 4 images here.
  one = runtime.make_mesh(devices=jax.devices()[:1])
  got = sampling.likelihood_fn(model, images, jax.random.fold_in(jax.random.PRNGKey(5), 0), mesh=one, **settings)
  assert got["bpd"].shape == (4,) and got["nfe"] > 6
  np.testing.assert_allclose(got["bpd"].mean(), want["ode_bpd"], rtol=1e-6)
  np.testing.assert_allclose(got["prior_bpd"].mean(), want["prior_bpd"], rtol=1e-5)
  np.testing.assert_allclose(got["bpd"], got["prior_bpd"] + got["delta_bpd"] + 7.0, rtol=1e-6)
  assert np.all(np.isnan(got["bpd_sem"]))  # one Rademacher probe: no standard error
  with pytest.raises(ValueError, match="images must be uint8"):
    sampling.likelihood_fn(model, images.astype(np.float32), jax.random.PRNGKey(0))
