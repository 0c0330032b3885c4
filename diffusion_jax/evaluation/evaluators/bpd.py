"""`bpd`: bits/dim of `config.data.eval_split` (`bpd.compute_bpd`, the paper's protocol by default)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from diffusion_jax import inference
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import registry


@dataclasses.dataclass(frozen=True)
class BitsPerDim:
  """One computation of a model's bits/dim: `bpd.compute_bpd`'s result and the seconds it took."""

  result: dict[str, Any]
  seconds: float


@registry.register
class BpdEvaluator(base.Evaluator):
  """Bits/dim: `compute` does the work, `result` presents it.

  The computation holds the per-timestep terms, MSE and prior that the rate–distortion curve is made of:
  `rate_distortion.RateDistortionEvaluator` is this evaluator with another `result`, and `run.run_all` computes
  bits/dim once for every such evaluator of one model (their settings are all `config.eval`'s).
  """

  kind = "bpd"
  SETTINGS = (  # the keys of compute_bpd's result that go to the record's settings
    "split",
    "dataset",
    "step",
    "use_ema",
    "clip_denoised",
    "drop_remainder",
    "batch_size",
    "max_examples",
    "num_timesteps",
    "conditional",
    "metric",
    "split_size",
    "num_examples",
  )

  def check(self):
    base.check_eval_split(self, "bits/dim")

  def compute(self, model: inference.LoadedModel, *, mesh) -> BitsPerDim:
    start = time.time()
    result = bpd_lib.compute_bpd(model, self.config, jax.random.PRNGKey(self.config.eval.seed), mesh=mesh)
    return BitsPerDim(result, time.time() - start)

  def result(self, bits: BitsPerDim) -> base.Result:
    result = bits.result
    figures, details, settings = base.split_result(result, self.SETTINGS)
    return base.Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"bpd": bits.seconds},
      scalars={
        "eval/bpd": result["total_bpd"],
        "eval/bpd_prior": result["prior_bpd"],
        "eval/bpd_decoder": result["decoder_bpd"],
      },
      summary=(
        f"bits/dim {result['total_bpd']:.4f} on {result['num_examples']} of {result['split_size']} "
        f"{self.config.data.dataset}:{result['split']} images"
      ),
    )

  def run(self, model, *, mesh):
    return self.result(self.compute(model, mesh=mesh))
