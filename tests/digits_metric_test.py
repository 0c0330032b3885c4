"""Tests of diffusion_jax.evaluation.digits_metric and its --mode=eval hook for dataset=digits."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import write_model_workdir

from configs import tiny
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writer
from diffusion_jax.evaluation import digits_metric as dm
from diffusion_jax.evaluation import evaluators
from diffusion_jax.evaluation import fid_stats

STEP = 5
LOG_PATH = dm.WEIGHTS_PATH.with_name(dm.WEIGHTS_PATH.stem + "_log.txt")


@pytest.fixture(scope="module")
def digits():
  train_images, train_labels = input_pipeline.load_digits("train")
  test_images, test_labels = input_pipeline.load_digits("test")
  return train_images, train_labels, test_images, test_labels


def _noisy(images, std, seed=0):
  noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
  return np.clip(np.round(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def _noise_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)


# ----------------------------------------------------------------------------
# The shipped classifier.
# ----------------------------------------------------------------------------


def test_shipped_weights_reach_the_logged_test_accuracy(digits):
  _, _, test_images, test_labels = digits
  log = LOG_PATH.read_text()
  logged = float(re.search(r"^test_accuracy: ([0-9.]+)$", log, re.M).group(1))
  assert re.search(r"^seed: \d+$", log, re.M) and re.search(r"^steps: \d+$", log, re.M)
  assert dm.weights_sha256() in log  # the log describes these weights
  features, logits = dm.classify(test_images)
  assert features.shape == (297, dm.FEATURE_DIM) and logits.shape == (297, 10)
  accuracy = float((logits.argmax(1) == test_labels).mean())
  assert accuracy >= 0.97
  assert abs(accuracy - logged) <= 1.0 / len(test_labels) + 1e-9  # at most one image off (other CPUs' rounding)
  result = dm.class_accuracy(test_images, test_labels.astype(np.int64))
  assert result["overall"] == pytest.approx(accuracy)
  assert sum(result["counts"].values()) == 297 and all(v >= 0.8 for v in result["per_class"].values())
  wrong = dm.class_accuracy(test_images, (test_labels.astype(np.int64) + 1) % 10)
  assert wrong["overall"] < 0.05


def test_load_params_errors(tmp_path):
  missing = tmp_path / "missing.npz"
  with pytest.raises(FileNotFoundError, match=f"(?s){re.escape(str(missing))}.*train_digit_classifier"):
    dm.load_params(missing)
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(dm.WEIGHTS_PATH.read_bytes()[:1000])
  with pytest.raises(ValueError, match=f"{re.escape(str(damaged))} are damaged"):
    dm.load_params(damaged)
  params = dm.load_params()
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, **{"conv1/kernel": np.zeros((3, 3, 1, 8), np.float32)})
  with pytest.raises(ValueError, match="do not match DigitClassifier"):
    dm.load_params(wrong)
  saved = dm.save_params(params, tmp_path / "copy.npz")
  with np.load(saved, allow_pickle=False) as data:
    assert "dense_features/kernel" in data.files and all(data[k].dtype == np.float32 for k in data.files)
  assert jax.tree.all(jax.tree.map(np.array_equal, dm.load_params(saved), params))


def test_module_stays_below_the_face(repo_root):
  code = (
    "import sys; from diffusion_jax.evaluation import digits_metric; "
    "assert 'diffusion_jax.sampling' not in sys.modules, 'digits_metric imports sampling'; "
    "assert not digits_metric._shipped_params.cache_info().currsize, 'weights loaded at import'"
  )
  subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bad_inputs(digits):
  images = digits[2][:10]
  with pytest.raises(ValueError, match="must be uint8"):
    dm.compute_digit_metrics(images.astype(np.float32) / 127.5 - 1.0)
  with pytest.raises(ValueError, match=r"shape \[N, 8, 8, 1\].*\(10, 8, 8\)"):
    dm.compute_digit_metrics(images[..., 0])
  with pytest.raises(ValueError, match=r"shape \[N, 8, 8, 1\]"):
    dm.compute_digit_metrics(np.zeros((10, 16, 16, 1), np.uint8))
  with pytest.raises(ValueError, match="reference must be uint8"):
    dm.compute_digit_metrics(images, images.astype(np.int32))
  with pytest.raises(ValueError, match="at least 4 images"):
    dm.compute_digit_metrics(images[:3])
  with pytest.raises(ValueError, match="requested_labels must be integers"):
    dm.class_accuracy(images, np.zeros(9, np.int32))
  with pytest.raises(ValueError, match="0..9"):
    dm.class_accuracy(images, np.full(10, 10))


# ----------------------------------------------------------------------------
# The figures.
# ----------------------------------------------------------------------------


def test_kth_nearest_distances_match_brute_force():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
  d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  np.testing.assert_allclose(dm.kth_nearest_distances(a, b, k=2), np.sort(d, 1)[:, 1], rtol=1e-10)
  dd = np.sqrt(((b[:, None] - b[None]) ** 2).sum(-1))
  np.testing.assert_allclose(dm.kth_nearest_distances(b, b, k=3, within=True), np.sort(dd, 1)[:, 3], rtol=1e-7)


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise(digits):
  train_images = digits[0]
  features, _ = dm.classify(train_images)
  assert dm.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
  fd = [dm.compute_digit_metrics(_noisy(train_images, std), train_images)["digits_fd"] for std in (0, 25, 50, 100)]
  assert fd[0] == pytest.approx(0.0, abs=1e-6)
  assert all(b > a for a, b in zip(fd, fd[1:])), fd
  assert fd[-1] > 100


def test_precision_recall_memorisation_and_scores(digits):
  train_images, _, test_images, _ = digits
  same = dm.compute_digit_metrics(train_images)  # the reference defaults to the train split
  assert same["num_reference"] == 1500 and same["num_samples"] == 1500 and same["k"] == 3
  assert same["digits_precision"] == 1.0 and same["digits_recall"] == 1.0
  assert same["digits_memorisation"] == 1.0  # copies of training images
  assert same["digits_is"] > 9.5 and same["digits_confidence"] > 0.99
  assert sum(same["digits_class_histogram"]) == 1500 and min(same["digits_class_histogram"]) > 120

  held_out = dm.compute_digit_metrics(test_images)
  assert 0.7 < held_out["digits_precision"] < 1.0 and 0.7 < held_out["digits_recall"] < 1.0
  assert 0.3 < held_out["digits_memorisation"] < 0.7  # by construction about half of new digits are "that close"
  assert held_out["digits_memorisation_threshold"] == same["digits_memorisation_threshold"] > 0

  noise = dm.compute_digit_metrics(_noise_images(300))
  assert noise["digits_precision"] < 0.2 and noise["digits_recall"] < 0.2
  assert noise["digits_memorisation"] == 0.0
  assert noise["digits_fd"] > 10 * held_out["digits_fd"] and noise["digits_is"] < 5
  json.dumps(noise)  # JSON-serialisable


def test_classifier_score_and_confidence_closed_forms():
  one_hot = np.eye(10)[np.arange(50) % 10]
  assert dm.classifier_score(one_hot) == pytest.approx(10.0)
  assert dm.classifier_score(np.full((20, 10), 0.1)) == pytest.approx(1.0)
  assert dm.classifier_score(np.eye(10)[np.zeros(20, int)]) == pytest.approx(1.0)  # one class only
  assert dm.mean_confidence(np.array([[0.5, 0.5], [0.9, 0.1]])) == pytest.approx(0.7)
  assert dm.class_histogram(np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])) == [1, 2]


# ----------------------------------------------------------------------------
# --mode=eval on dataset=digits: the digit metric instead of Inception.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return write_model_workdir(tmp_path_factory.mktemp("digits_eval_workdir"), step=STEP)


def test_eval_hook_scores_digits_without_inception(workdir, monkeypatch, n_devices):
  def no_inception(*args, **kwargs):
    raise AssertionError("Inception must not be used for dataset=digits")

  monkeypatch.setattr(fid_stats, "inception_weights", no_inception)
  written = {}
  scalars = metric_writer.MetricWriter.scalars
  monkeypatch.setattr(
    metric_writer.MetricWriter,
    "scalars",
    lambda self, step, values: (written.update(values), scalars(self, step, values)),
  )
  cfg = tiny.get_config()
  cfg.eval.metrics = ("fid",)
  cfg.eval.num_samples = 12
  cfg.sampling.sampler, cfg.sampling.num_steps = "ddim", 3
  assert evaluators.uses_digit_metric(cfg)
  out = evaluators.evaluate(cfg, workdir)

  step = f"step_{STEP:06d}"
  eval_dir = workdir / "eval"
  assert out["files"] == [str(eval_dir / f"fid_{step}.json")]
  record = json.loads((eval_dir / f"fid_{step}.json").read_text())
  settings, figures = record["settings"], record["figures"]
  assert record["kind"] == "digits" and record["step"] == STEP and settings["reference_split"] == "train"
  assert figures["num_samples"] == 12 and figures["num_reference"] == 1500 and settings["sampler"] == "ddim"
  assert settings["classifier_sha256"] == dm.weights_sha256() and sum(record["details"]["digits_class_histogram"]) == 12
  # The figures are those of the exported samples.
  samples = np.concatenate(
    [np.load(p)["images"] for p in sorted((eval_dir / "samples_5_ddim_3steps_eta0_seed1").glob("samples_*.npz"))]
  )
  expected = dm.compute_digit_metrics(samples)
  for name in (
    "digits_fd",
    "digits_is",
    "digits_confidence",
    "digits_precision",
    "digits_recall",
    "digits_memorisation",
  ):
    assert figures[name] == pytest.approx(expected[name], rel=1e-9)
    assert written[f"eval/{name}"] == pytest.approx(expected[name], rel=1e-9)
  assert not list(eval_dir.glob("fid_stats_*"))  # no Inception reference statistics
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

  # Inception's smoke test can still be asked for explicitly.
  cfg.eval.random_inception = True
  assert not evaluators.uses_digit_metric(cfg)
  cfg.eval.random_inception = False
  cfg.data.image_size = 16
  with pytest.raises(ValueError, match="8×8×1"):
    evaluators.make("fid", cfg.evals.fid, cfg, workdir)
