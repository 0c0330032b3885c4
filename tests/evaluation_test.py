"""Tests of diffusion_jax.evaluation.{bpd,evaluators}: bits/dim over a split, rate–distortion, --mode=eval."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from conftest import write_model_workdir

from configs import tiny
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import schedules
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation import evaluators
from diffusion_jax.evaluation import fid_stats
from diffusion_jax.evaluation import model_loading

STEP = 7
MAX_EXAMPLES = 12  # with eval batch 8: one full batch and a remainder of 4


def _config():
  cfg = tiny.get_config()
  cfg.eval.bpd_max_examples = MAX_EXAMPLES
  return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return write_model_workdir(tmp_path_factory.mktemp("eval_workdir"), step=STEP)


@pytest.fixture(scope="module")
def loaded(workdir):
  return model_loading.load_eval_model(_config(), workdir)


# ----------------------------------------------------------------------------
# Bits/dim against an independent NumPy loop.
# ----------------------------------------------------------------------------


def _numpy_bpd(model, x0, rng):
  """calc_bpd_loop's math in float64 NumPy (eps model, fixedlarge, x0 clipping); the network via model.apply.

  Returns: (terms [B, T], mse [B, T], prior [B]) for the batch x0 [B, H, W, C].
  """
  cfg = model.config.diffusion
  betas = schedules.get_beta_schedule(
    cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end, num_timesteps=cfg.num_timesteps
  )
  T = len(betas)
  ab = np.cumprod(1.0 - betas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  model_logvar = np.log(np.append(post_var[1], betas[1:]))
  c1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
  c2 = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
  x0 = np.asarray(x0, np.float64)
  b = x0.shape[0]
  meanflat = lambda a: a.reshape(b, -1).mean(axis=1)  # noqa: E731

  def kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

  def cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

  terms, mse = np.zeros((b, T)), np.zeros((b, T))
  for t in range(T):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32), np.float64)
    x_t = np.sqrt(ab[t]) * x0 + np.sqrt(1.0 - ab[t]) * noise
    eps = np.asarray(
      model.network.apply(
        {"params": model.params}, jnp.asarray(x_t, jnp.float32), jnp.full((b,), t, jnp.int32), train=False
      ),
      np.float64,
    )
    pred_x0 = np.clip(np.sqrt(1.0 / ab[t]) * x_t - np.sqrt(1.0 / ab[t] - 1.0) * eps, -1.0, 1.0)
    mean = c1[t] * pred_x0 + c2[t] * x_t
    if t == 0:
      inv = np.exp(-0.5 * model_logvar[0])
      plus, minus = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
      ll = np.where(
        x0 < -0.999,
        np.log(np.maximum(plus, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))),
      )
      terms[:, t] = -meanflat(ll) / np.log(2.0)
    else:
      true_mean = c1[t] * x0 + c2[t] * x_t
      terms[:, t] = meanflat(kl(true_mean, post_logvar[t], mean, model_logvar[t])) / np.log(2.0)
    mse[:, t] = meanflat((pred_x0 - x0) ** 2)
  prior = meanflat(kl(np.sqrt(ab[-1]) * x0, np.log(1.0 - ab[-1]), 0.0, 0.0)) / np.log(2.0)
  return terms, mse, prior


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_bpd_over_split_matches_numpy_loop(loaded, drop_remainder, n_devices):
  cfg = _config()
  rng = jax.random.PRNGKey(3)
  result = bpd_lib.compute_bpd(loaded, cfg, rng, drop_remainder=drop_remainder, progress=False)
  T = cfg.diffusion.num_timesteps

  images = input_pipeline.load_digits("test")[0][:MAX_EXAMPLES].astype(np.float32) / 127.5 - 1.0
  n = 8 if drop_remainder else MAX_EXAMPLES
  assert result["num_examples"] == n
  assert result["split_size"] == 297 and result["split"] == "test" and result["dataset"] == "digits"
  assert result["step"] == STEP and result["use_ema"] and result["clip_denoised"]
  assert result["drop_remainder"] == drop_remainder and result["num_timesteps"] == T
  assert len(result["terms_bpd"]) == T and len(result["mse"]) == T

  # The reference: batch k with fold_in(rng, k), the last batch padded with the pipeline's padding (zeros → -1)
  # so that its noise is that of the same [8, ...] draw; padded rows are dropped before averaging.
  terms, mse, prior = [], [], []
  for k, start in enumerate(range(0, n, 8)):
    batch = images[start : start + 8]
    real = len(batch)
    padded = np.concatenate([batch, -np.ones((8 - real,) + batch.shape[1:], np.float32)])
    t_, m_, p_ = _numpy_bpd(loaded, padded, jax.random.fold_in(rng, k))
    terms.append(t_[:real])
    mse.append(m_[:real])
    prior.append(p_[:real])
  terms, mse, prior = np.concatenate(terms), np.concatenate(mse), np.concatenate(prior)
  assert terms.shape == (n, T)
  np.testing.assert_allclose(result["terms_bpd"], terms.mean(0), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(result["mse"], mse.mean(0), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(result["prior_bpd"], prior.mean(), rtol=1e-4)
  np.testing.assert_allclose(result["total_bpd"], (terms.sum(1) + prior).mean(), rtol=1e-4)
  # Internal consistency: total = prior + Σ terms; decoder and KL parts.
  np.testing.assert_allclose(result["total_bpd"], result["prior_bpd"] + sum(result["terms_bpd"]), rtol=1e-6)
  np.testing.assert_allclose(result["decoder_bpd"], result["terms_bpd"][0], rtol=1e-7)
  np.testing.assert_allclose(result["kl_bpd"], sum(result["terms_bpd"][1:]), rtol=1e-6)
  assert result["total_bpd_sem"] > 0 and result["decoder_bpd"] > 0.1  # a non-trivial model
  assert result["total_bpd"] == pytest.approx(float(np.mean(terms.sum(1) + prior)), rel=1e-4)

  if not drop_remainder:
    # Masked sums over the padded last batch equal the plain average over its unpadded images.
    out = loaded.diffusion.calc_bpd_loop(
      lambda x, t: loaded.network.apply({"params": loaded.params}, x, t, train=False),
      jnp.asarray(np.concatenate([images[8:], -np.ones((4, 8, 8, 1), np.float32)])),
      jax.random.fold_in(rng, 1),
    )
    first = loaded.diffusion.calc_bpd_loop(
      lambda x, t: loaded.network.apply({"params": loaded.params}, x, t, train=False),
      jnp.asarray(images[:8]),
      jax.random.fold_in(rng, 0),
    )
    direct = np.concatenate([np.asarray(first["total_bpd"]), np.asarray(out["total_bpd"])[:4]])
    assert result["total_bpd"] == pytest.approx(float(direct.mean()), rel=1e-5)


def test_bpd_errors(loaded):
  cfg = _config()
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    bpd_lib.compute_bpd(loaded, cfg, jax.random.PRNGKey(0), batch_size=6, progress=False)
  cfg.data.eval_split = ""
  with pytest.raises(ValueError, match="No eval split.*eval_split"):
    bpd_lib.compute_bpd(loaded, cfg, jax.random.PRNGKey(0), progress=False)


# ----------------------------------------------------------------------------
# Rate–distortion.
# ----------------------------------------------------------------------------


def test_rate_distortion_endpoints_and_indexing(tmp_path, monkeypatch):
  T = 6
  terms = np.array([1.9, 0.5, 0.3, 0.2, 0.1, 0.05])  # [0] is the decoder term
  mse = np.array([1e-4, 4e-4, 1e-3, 1e-2, 0.1, 0.4])
  prior = 1e-5
  rd = bpd_lib.rate_distortion(terms, mse, prior)
  rate, dist = np.array(rd["rate_bpd"]), np.array(rd["distortion_rmse"])
  assert rd["reverse_steps"] == list(range(1, T + 1))
  assert rate[0] == pytest.approx(prior)  # k = 1: only x_T sent
  assert rate[-1] == pytest.approx(prior + terms[1:].sum())  # k = T: every KL term, never the decoder term
  assert dist[0] == pytest.approx(math.sqrt(mse[T - 1]) * 127.5)
  assert dist[-1] == pytest.approx(math.sqrt(mse[0]) * 127.5)
  assert rd["final_distortion_rmse"] == pytest.approx(math.sqrt(mse[0]) * 127.5)
  assert rd["final_distortion_bpd"] == pytest.approx(terms[0])
  assert rd["total_bpd"] == pytest.approx(prior + terms.sum())
  # Every k against the formula rate_k = prior + Σ_{s=T-k+1}^{T-1} terms[s], distortion_k = √mse[T-k]·127.5.
  for k in range(1, T + 1):
    assert rate[k - 1] == pytest.approx(prior + terms[T - k + 1 :].sum())
    assert dist[k - 1] == pytest.approx(math.sqrt(mse[T - k]) * 127.5)
  assert np.all(np.diff(rate) >= 0)
  # The paper's endpoint arithmetic: 1.78 rate + 1.97 distortion = 3.75 bits/dim.
  paper = bpd_lib.rate_distortion([1.97, 1.78 - 1e-5], [(0.95 / 127.5) ** 2, 0.5], 1e-5)
  assert paper["final_rate_bpd"] + paper["final_distortion_bpd"] == pytest.approx(3.75)
  assert paper["final_distortion_rmse"] == pytest.approx(0.95)

  png = bpd_lib.plot_rate_distortion(rd, tmp_path / "rd.png", title="test")
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(png) as image:
    assert image.size[0] > image.size[1] > 100
  with pytest.raises(FileExistsError):
    bpd_lib.plot_rate_distortion(rd, png)
  monkeypatch.setattr(bpd_lib, "have_matplotlib", lambda: False)  # without the `plot` extra: a clear message
  with pytest.raises(ImportError, match=r'pip install "diffusion_jax\[plot\]"'):
    bpd_lib.plot_rate_distortion(rd, tmp_path / "other.png")
  assert not (tmp_path / "other.png").exists()
  with pytest.raises(ValueError, match=r"\[T\]"):
    bpd_lib.rate_distortion(terms, mse[:-1], prior)


# ----------------------------------------------------------------------------
# --mode=eval end to end.
# ----------------------------------------------------------------------------


def _eval_files(workdir):
  return sorted(p.name for p in (workdir / "eval").glob("*step_*"))


def test_mode_eval_end_to_end(workdir, monkeypatch, repo_root, n_devices):
  from diffusion_jax import main  # pylint: disable=g-import-not-at-top

  argv = [
    "main",
    f"--config={repo_root / 'configs' / 'tiny.py'}",
    f"--workdir={workdir}",
    "--mode=eval",
    "--config.eval.metrics=bpd,rate_distortion,fid",
    "--config.eval.random_inception=True",
    "--config.eval.num_samples=8",
    f"--config.eval.bpd_max_examples={MAX_EXAMPLES}",
    "--config.eval.drop_remainder=False",
    "--config.eval.fid_stats_max_examples=8",
    "--config.sampling.sampler=ddim",
    "--config.sampling.num_steps=3",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags registers the --config.* overrides it sees in sys.argv
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top

  absl_level = absl_logging.get_absl_logger().level
  flags.FLAGS(argv)
  try:
    main.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
    # Leave logging as the other tests expect it (parsing and unparsing the flags moves absl's verbosity).
    absl_logging.get_absl_logger().setLevel(absl_level)
    absl_logging.get_absl_handler().removeFilter(cli._FILTER)  # pylint: disable=protected-access

  eval_dir = workdir / "eval"
  step = f"step_{STEP:06d}"
  first = {f"bpd_{step}.json", f"rate_distortion_{step}.json", f"rate_distortion_{step}.png", f"fid_{step}.json"}
  assert set(_eval_files(workdir)) == first
  records = {
    name: json.loads((eval_dir / f"{name}_{step}.json").read_text()) for name in ("bpd", "rate_distortion", "fid")
  }
  schema = {"name", "kind", "step", "use_ema", "workdir", "created", "figures", "details", "settings", "seconds"}
  assert all(set(r) == schema for r in records.values())  # one schema for every kind
  bpd = records["bpd"]
  assert bpd["kind"] == "bpd" and bpd["step"] == STEP and bpd["use_ema"]
  assert bpd["settings"]["num_examples"] == MAX_EXAMPLES
  assert (
    not bpd["settings"]["drop_remainder"] and bpd["settings"]["clip_denoised"] and bpd["settings"]["split"] == "test"
  )
  assert len(bpd["details"]["terms_bpd"]) == 20 and math.isfinite(bpd["figures"]["total_bpd"])
  rd = records["rate_distortion"]
  assert rd["details"]["rate_bpd"][0] == pytest.approx(bpd["figures"]["prior_bpd"])
  assert rd["figures"]["final_distortion_rmse"] == pytest.approx(math.sqrt(bpd["details"]["mse"][0]) * 127.5)
  fid, fid_settings = records["fid"]["figures"], records["fid"]["settings"]
  assert fid_settings["inception_weights"] == "random (smoke test, not comparable)" and fid_settings["random_inception"]
  assert math.isfinite(fid["fid"]) and fid["fid"] >= -1e-6
  assert math.isfinite(fid["inception_score"]) and fid["inception_score"] >= 1.0 - 1e-6
  assert fid_settings["num_samples"] == 8 and fid_settings["sampler"] == "ddim" and fid_settings["num_steps"] == 3
  stats = eval_dir / "fid_stats_digits_train_first8_random_inception.npz"
  assert fid_settings["reference_statistics"] == str(stats) and stats.exists()
  assert json.loads(stats.with_suffix(".json").read_text())["num_examples"] == 8
  assert len(list((eval_dir / "samples_7_ddim_3steps_eta0_seed1").glob("samples_*.npz"))) == 1
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

  # --mode=fid_stats keeps the existing statistics file.
  cfg = _config()
  cfg.eval.random_inception, cfg.eval.fid_stats_max_examples = True, 8
  mtime = stats.stat().st_mtime_ns
  assert fid_stats.compute_fid_stats(cfg, workdir) == stats and stats.stat().st_mtime_ns == mtime

  # A second evaluation appends new files and keeps the first ones unchanged.
  before = {name: (eval_dir / name).read_bytes() for name in first}
  cfg.eval.metrics = ("bpd", "rate_distortion")
  out = evaluators.evaluate(cfg, workdir)
  assert set(_eval_files(workdir)) == first | {
    f"bpd_{step}_1.json",
    f"rate_distortion_{step}_1.json",
    f"rate_distortion_{step}_1.png",
  }
  assert all((eval_dir / name).read_bytes() == data for name, data in before.items())
  assert out["results"]["bpd"]["settings"]["num_examples"] == 8  # drop_remainder=True by default (the paper)
  assert sorted(out["files"]) == sorted(
    str(eval_dir / n) for n in (f"bpd_{step}_1.json", f"rate_distortion_{step}_1.json", f"rate_distortion_{step}_1.png")
  )


def test_result_paths_never_reuse_names(tmp_path):
  paths = evaluators.result_paths(tmp_path, 5, ["bpd.json", "fid.json"])
  assert paths["bpd.json"].name == "bpd_step_000005.json"
  paths["fid.json"].write_text("{}")  # any existing member moves the whole set to the next counter
  again = evaluators.result_paths(tmp_path, 5, ["bpd.json", "fid.json"])
  assert again["bpd.json"].name == "bpd_step_000005_1.json" and again["fid.json"].name == "fid_step_000005_1.json"


def test_evaluate_returns_the_records_it_wrote(tmp_path, monkeypatch):
  workdir = write_model_workdir(tmp_path / "wd", step=STEP)
  # A model labelled as raw (not EMA) parameters: a record made again for the return value, and not the one
  # written, would say otherwise.
  made = inference.model_from_config
  monkeypatch.setattr(inference, "model_from_config", lambda *a, **k: made(*a, **{**k, "use_ema": False}))
  cfg = _config()
  cfg.eval.metrics = ("bpd", "rate_distortion")
  out = evaluators.evaluate(cfg, workdir)
  written = [json.loads(pathlib.Path(f).read_text()) for f in out["files"] if f.endswith(".json")]
  assert {r["name"]: r for r in written} == out["results"]
  assert sorted(out["results"]) == ["bpd", "rate_distortion"] and not out["results"]["bpd"]["use_ema"]


def test_eval_config_errors(workdir):
  cfg = _config()
  cfg.eval.metrics = ("bpd,fid",)  # what --config.eval.metrics=bpd,fid gives
  assert evaluators.eval_names(cfg) == ("bpd", "fid")
  cfg.eval.metrics = ("bpd", "nll")
  with pytest.raises(ValueError, match=r"config.eval.metrics names \['nll'\], which config.evals does not define"):
    evaluators.evaluate(cfg, workdir)
  cfg.eval.metrics = ("bpd",)
  cfg.evals.bpd.kind = "nll"
  with pytest.raises(ValueError, match="config.evals.bpd.kind='nll' is not a kind of evaluation"):
    evaluators.evaluate(cfg, workdir)
  cfg.eval.metrics = ("fid",)
  cfg.eval.fid_stats_path = str(workdir / "missing.npz")
  with pytest.raises(ValueError, match="(?s)does not exist.*--mode=fid_stats"):
    fid_stats.check_fid_config(cfg)  # (dataset=digits is scored without Inception statistics: see below)
  cfg.eval.random_inception = True
  with pytest.raises(ValueError, match="random_inception"):
    evaluators.evaluate(cfg, workdir)
  cfg = _config()
  cfg.data.eval_split = ""
  with pytest.raises(ValueError, match="No eval split.*eval_split"):
    evaluators.evaluate(cfg, workdir)
  cfg = _config()
  cfg.model.ch = 64
  with pytest.raises(ValueError, match="model.ch"):
    evaluators.evaluate(cfg, workdir)


def test_an_eval_batch_that_does_not_fit_the_processes_names_them(monkeypatch):
  from diffusion_jax import runtime  # noqa: PLC0415
  from diffusion_jax.evaluation import model_loading  # noqa: PLC0415

  config = tiny.get_config()
  mesh = runtime.make_mesh()  # 4 devices
  config.eval.batch_size = 6
  with pytest.raises(ValueError, match=r"multiple of the number of devices \(4\); set"):
    model_loading.check_batch_size(config, mesh)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  config.eval.batch_size = 8  # a multiple of the 4 devices, not of 3 processes
  with pytest.raises(ValueError, match=r"devices \(4\) and of processes \(3\), i\.e\. of 12.*e\.g\. 12"):
    model_loading.check_batch_size(config, mesh)
