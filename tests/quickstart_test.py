"""The quickstart's time budget (`training.time_budget_s`) and its end-of-training evaluation (`final_eval`)."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import CACHE_DIR
from conftest import REPO_ROOT

from diffusion_jax import checkpointing
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax import train
from diffusion_jax import train_step
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import final_eval

BIG = 1_000_000


def tiny_config():
  from configs import tiny  # noqa: PLC0415 - configs/ is a folder of files, not a package

  return tiny.get_config()


def _budget_config(seconds=2.0):
  cfg = tiny_config()
  cfg.training.num_train_steps = BIG
  cfg.training.time_budget_s = seconds
  cfg.training.log_every = 25
  cfg.training.checkpoint_every = BIG
  cfg.training.sample_every = BIG  # no grid during training; the final one at the budget's step
  return cfg


def test_time_budget_ends_the_run_early_with_a_checkpoint_and_grid(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  state = train.train_and_evaluate(_budget_config(), str(tmp_path))
  step = int(state.step)
  assert 2 <= step < BIG
  assert train.last_finish() == "time_budget"
  assert checkpointing.create_manager(tmp_path).all_steps() == [step]
  assert (tmp_path / "samples" / f"grid_step_{step:08d}.png").exists()
  log = caplog.text
  assert f"Time budget of 2 s reached at step {step}" in log
  assert "Stopped at step" not in log  # not reported as an interruption


def test_time_budget_exits_0_from_the_command_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR / "jax"))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "diffusion_jax.main",
      "--config=configs/tiny.py",
      f"--workdir={tmp_path}",
      f"--config.training.num_train_steps={BIG}",
      "--config.training.time_budget_s=2",
      f"--config.training.checkpoint_every={BIG}",
      "--config.training.log_every=25",
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Time budget of 2 s reached at step" in proc.stderr
  assert "Training stopped early" not in proc.stderr
  assert len(checkpointing.create_manager(tmp_path).all_steps()) == 1


def _eval_config():
  cfg = tiny_config()
  cfg.training.final_eval = True
  cfg.training.final_eval_samples = 6
  cfg.training.final_eval_sampler = "ddim"
  cfg.training.final_eval_num_steps = 3
  return cfg


def _params(cfg):
  network, _ = runtime.build(cfg)
  return train_step.create_train_state(cfg, network, jax.random.PRNGKey(0)).ema_params


def test_final_eval_writes_new_json_and_tensorboard_each_time(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  cfg = _eval_config()
  params = _params(cfg)
  first = final_eval.evaluate_final(cfg, tmp_path, params, 7)
  second = final_eval.evaluate_final(cfg, tmp_path, params, 7)
  paths = sorted(p.name for p in (tmp_path / "eval").iterdir())
  assert paths == ["final_step_000007.json", "final_step_000007_1.json"]
  saved = json.loads((tmp_path / "eval" / "final_step_000007.json").read_text())
  # The figures are the digit metric's of the samples of (config.eval.seed, index), drawn again here.
  samples, labels = final_eval.samples_from_params(
    cfg, params, 6, jax.random.PRNGKey(cfg.eval.seed), sampler="ddim", num_steps=3
  )
  assert samples.dtype == np.uint8 and samples.shape == (6, 8, 8, 1) and labels is None
  expected = digits_metric.compute_digit_metrics(samples, input_pipeline.load_digits("train")[0])
  assert saved["metrics"]["digits_fd"] == pytest.approx(expected["digits_fd"], rel=1e-9) and saved["step"] == 7
  assert (saved["sampler"], saved["num_steps"], saved["num_samples"]) == ("ddim", 3, 6)
  assert first["metrics"] == second["metrics"]
  assert list((tmp_path / "tensorboard").iterdir())
  assert "Final evaluation at step 7: fd " in caplog.text and "(6 samples, ddim_3steps_eta0)" in caplog.text
  assert f"fd {expected['digits_fd']:.4g}, is {expected['digits_is']:.4g}" in caplog.text


def test_final_eval_of_a_conditional_model_reports_class_accuracy(tmp_path):
  cfg = _eval_config()
  cfg.model.num_classes = 10
  cfg.training.final_eval_samples = 20
  result = final_eval.evaluate_final(cfg, tmp_path, _params(cfg), 2)
  metrics = result["metrics"]
  assert 0.0 <= metrics["digits_class_accuracy"] <= 1.0
  assert metrics["digits_class_counts"] == {str(c): 2 for c in range(10)}  # sample i is of class i mod 10
  assert set(metrics["digits_fd_per_class"]) == {str(c) for c in range(10)}


def test_final_eval_bad_settings_are_clear_errors(tmp_path):
  cfg = _eval_config()
  cfg.training.final_eval_sampler = "plms"
  with pytest.raises(ValueError, match="Unknown sampler 'plms'"):
    final_eval.evaluate_final(cfg, tmp_path, None, 3)
  cfg = _eval_config()
  cfg.training.final_eval_samples = 1
  with pytest.raises(ValueError, match="final_eval_samples must be >= 2"):
    final_eval.evaluate_final(cfg, tmp_path, None, 3)
  assert not (tmp_path / "eval").exists()


def test_final_eval_skips_other_datasets(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  cfg = _eval_config()
  cfg.data.dataset = "cifar10"
  assert final_eval.evaluate_final(cfg, tmp_path, None, 3) is None
  assert not (tmp_path / "eval").exists()
  assert "skipped" in caplog.text
