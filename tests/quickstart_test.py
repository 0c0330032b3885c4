"""The quickstart's time budget (`training.time_budget_s`) and the evaluations during and after training."""

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
from conftest import tiny_config

from diffusion_jax import checkpointing
from diffusion_jax import config_base
from diffusion_jax import inference
from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import train
from diffusion_jax import train_step
from diffusion_jax import workdirs
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.evaluation import evaluators

BIG = 1_000_000


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
  result = train.train_and_evaluate(_budget_config(), str(tmp_path))
  step = int(result.state.step)
  assert 2 <= step < BIG and result.steps == step
  assert result.finish_reason == "time_budget"
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
  cfg.evals.digits.update(at_end=True, num_samples=6)
  cfg.evals.digits.sampling.update(sampler="ddim", num_steps=3)
  return cfg


def _params(cfg):
  network, _ = runtime.build(cfg)
  return train_step.create_train_state(cfg, network, jax.random.PRNGKey(0)).ema_params


def _run_digits(cfg, workdir, params, step):
  model = inference.model_from_config(cfg, params, step=step)
  evaluator = evaluators.make("digits", cfg.evals.digits, cfg, workdir)
  results, _ = evaluators.run_all([evaluator], model, workdir=workdir, mesh=runtime.make_mesh())
  return results["digits"]


def test_digits_evaluation_writes_new_json_and_tensorboard_each_time(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  cfg = _eval_config()
  params = _params(cfg)
  first = _run_digits(cfg, tmp_path, params, 7)
  second = _run_digits(cfg, tmp_path, params, 7)
  paths = sorted(p.name for p in (tmp_path / "eval").glob("*.json"))
  assert paths == ["digits_step_000007.json", "digits_step_000007_1.json"]
  saved = json.loads((tmp_path / "eval" / "digits_step_000007.json").read_text())
  assert set(saved) == {
    "name",
    "kind",
    "step",
    "use_ema",
    "workdir",
    "created",
    "figures",
    "details",
    "settings",
    "seconds",
  }
  # The figures are the digit metric's of the samples of (config.eval.seed, index), drawn again here in memory.
  model = inference.model_from_config(cfg, params, step=7)
  spec = samplers.resolve("ddim", num_timesteps=cfg.diffusion.num_timesteps, num_steps=3)
  samples = inference.generate_set(model, 6, jax.random.PRNGKey(cfg.eval.seed), spec)
  assert samples.dtype == np.uint8 and samples.shape == (6, 8, 8, 1)
  expected = digits_metric.compute_digit_metrics(samples, input_pipeline.load_digits("train")[0])
  assert saved["figures"]["digits_fd"] == pytest.approx(expected["digits_fd"], rel=1e-9) and saved["step"] == 7
  assert (saved["kind"], saved["settings"]["sampler"], saved["settings"]["num_steps"]) == ("digits", "ddim", 3)
  assert saved["settings"]["num_samples"] == 6
  assert first.figures == second.figures
  assert list((tmp_path / "tensorboard").iterdir())
  assert "digits: digits FD " in caplog.text and "over 6 samples (ddim_3steps_eta0)" in caplog.text


def test_digits_evaluation_of_a_conditional_model_reports_class_accuracy(tmp_path):
  cfg = _eval_config()
  cfg.model.num_classes = 10
  cfg.evals.digits.num_samples = 20
  result = _run_digits(cfg, tmp_path, _params(cfg), 2)
  assert 0.0 <= result.figures["digits_class_accuracy"] <= 1.0
  assert result.details["digits_class_counts"] == {str(c): 2 for c in range(10)}  # sample i is of class i mod 10
  assert set(result.details["digits_fd_per_class"]) == {str(c) for c in range(10)}


def test_end_of_training_evaluation_runs_when_training_finishes(tmp_path):
  result = train.train_and_evaluate(_eval_config(), str(tmp_path))
  assert result.finish_reason == "steps" and result.steps == 4
  assert set(result.evaluations) == {"digits"}
  saved = json.loads((tmp_path / "eval" / "digits_step_000004.json").read_text())
  assert saved["figures"] == pytest.approx(result.evaluations["digits"].figures)


def test_evaluations_every_n_steps_during_training(tmp_path):
  cfg = tiny_config()
  cfg.evals.digits.update(every=2, num_samples=4)
  cfg.evals.digits.sampling.update(sampler="ddim", num_steps=2)
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result.evaluations == {}  # not at_end
  assert sorted(p.name for p in (tmp_path / "eval").glob("*.json")) == [
    "digits_step_000002.json",
    "digits_step_000004.json",
  ]


def test_evaluation_settings_are_checked_before_training(tmp_path):
  cfg = _eval_config()
  cfg.evals.digits.sampling.sampler = "plms"
  with pytest.raises(ValueError, match="Unknown sampler 'plms'"):
    train.train_and_evaluate(cfg, str(tmp_path))
  cfg = _eval_config()
  cfg.evals.digits.num_samples = 1
  with pytest.raises(ValueError, match="needs at least 2 samples"):
    train.train_and_evaluate(cfg, str(tmp_path))
  cfg = _eval_config()
  cfg.evals.digits.kind = "fidd"
  with pytest.raises(ValueError, match="config.evals.digits.kind='fidd' is not a kind of evaluation"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "eval").exists()


def test_digit_metric_refuses_other_image_shapes(tmp_path):
  cfg = _eval_config()
  cfg.data.dataset, cfg.data.image_size, cfg.data.channels = "cifar10", 32, 3
  with pytest.raises(ValueError, match="The digit metric scores 8×8×1 images"):
    evaluators.make("digits", cfg.evals.digits, cfg, tmp_path)


def test_configs_of_earlier_versions_are_read_in_the_new_schema(tmp_path, caplog):
  cfg = tiny_config().to_dict()
  del cfg["evals"]
  cfg["training"].pop("grid")
  cfg["training"].update(
    final_eval=True,
    final_eval_samples=6,
    final_eval_sampler="ddim",
    final_eval_num_steps=3,
    grid_sampler="ddim",
    grid_num_steps=5,
  )
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  caplog.set_level(logging.WARNING)
  config = workdirs.read_config(tmp_path)
  assert "training.final_eval -> evals.digits.at_end" in caplog.text
  assert "final_eval" not in config.training and "grid_sampler" not in config.training
  assert config.evals.digits.at_end and config.evals.digits.num_samples == 6
  assert (config.evals.digits.sampling.sampler, config.evals.digits.sampling.num_steps) == ("ddim", 3)
  assert (config.training.grid.sampler, config.training.grid.num_steps) == ("ddim", 5)
  assert config.evals.bpd.kind == "bpd"  # sections this version added take their defaults
  assert config_base.upgrade(config) is config
