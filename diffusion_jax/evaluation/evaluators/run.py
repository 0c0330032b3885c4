"""Running evaluators on a model: `run_all` (the training loop's and `--mode=eval`'s) and `evaluate` (`--mode=eval`)."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging
from jax.sharding import Mesh

from diffusion_jax import config_base
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax.evaluation import model_loading
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import bpd
from diffusion_jax.evaluation.evaluators import registry
from diffusion_jax.evaluation.evaluators import results as results_lib


def results_of(evaluators, model: inference.LoadedModel, *, mesh: Mesh) -> dict[str, base.Result]:
  """Each evaluator's result for `model`, by name.

  The bits/dim evaluators (`bpd`, and `rate_distortion`, which is made from the same computation) present one
  computation of the model's bits/dim, made by the first of them: its settings are `config.eval`'s, the same for all.
  """
  bits = None
  results = {}
  for ev in evaluators:
    if isinstance(ev, bpd.BpdEvaluator):
      bits = ev.compute(model, mesh=mesh) if bits is None else bits
      results[ev.name] = ev.result(bits)
    else:
      results[ev.name] = ev.run(model, mesh=mesh)
  return results


def _run_and_write(evaluators, model, *, workdir, mesh, writer, what):
  results = results_of(evaluators, model, mesh=mesh)
  records, files = results_lib.write_results(
    results, workdir=workdir, step=model.step, use_ema=model.use_ema, writer=writer
  )
  ema = " (EMA)" if model.use_ema else ""
  logging.info("%s step %d%s | %s.", what, model.step, ema, " | ".join(f"{n}: {r.summary}" for n, r in results.items()))
  if files:
    logging.info("Eval results written to %s.", ", ".join(files))
  return results, records, files


def run_all(
  evaluators, model: inference.LoadedModel, *, workdir, mesh: Mesh, writer=None, what: str = "eval"
) -> tuple[dict[str, base.Result], list[str]]:
  """Runs the evaluators on one model (`results_of`), writes their results (`write_results`), logs one summary line.

  Returns:
    (name -> Result, the files written).
  """
  results, _, files = _run_and_write(evaluators, model, workdir=workdir, mesh=mesh, writer=writer, what=what)
  return results, files


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=eval`: the evaluations `config.eval.metrics` names, of the workdir's newest checkpoint (EMA).

  Args:
    config: the run's config (its model must match the checkpoint's); the
      `eval`, `evals`, `sampling` and data location fields may differ from training.
    workdir: the training workdir (or a converted-weights directory).

  Returns:
    dict with `step`, `files` (paths written, on process 0) and `results`: name -> the record its JSON file holds.

  Raises:
    UserError: unknown entries or kinds, no eval split for bits/dim, a missing
      reference statistics file, or a config that does not match the checkpoint.
  """
  config = config_base.upgrade(config)
  evaluators = registry.from_config(config, workdir, names=registry.eval_names(config))
  mesh = runtime.make_mesh()
  model_loading.check_batch_size(config, mesh)
  model = model_loading.load_eval_model(config, workdir)
  logging.info(
    "Evaluating %s at step %d (EMA parameters): %s.", workdir, model.step, ", ".join(e.name for e in evaluators)
  )
  _, records, files = _run_and_write(evaluators, model, workdir=workdir, mesh=mesh, writer=None, what="eval")
  return {"step": int(model.step), "files": files, "results": records}
