"""`rate_distortion`: the rate–distortion curve (§4.3) made from the bits/dim computation, and its chart."""

from __future__ import annotations

from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import bpd
from diffusion_jax.evaluation.evaluators import registry


@registry.register
class RateDistortionEvaluator(bpd.BpdEvaluator):
  """The curve of the bits/dim evaluator's computation (its terms, MSE and prior); a chart where matplotlib is."""

  kind = "rate_distortion"

  def result(self, bits: bpd.BitsPerDim) -> base.Result:
    result = bits.result
    rd = bpd_lib.rate_distortion(result["terms_bpd"], result["mse"], result["prior_bpd"])
    figures, details, _ = base.split_result(rd)
    config = self.config

    def chart(path, step):
      bpd_lib.plot_rate_distortion(
        rd,
        path,
        title=(
          f"{config.data.dataset}:{result['split']}, step {step} (EMA), {result['num_examples']} images: "
          f"rate {rd['final_rate_bpd']:.3f} + distortion {rd['final_distortion_bpd']:.3f} bits/dim"
        ),
      )

    return base.Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings={"split": result["split"], "num_examples": result["num_examples"], "prior_bpd": result["prior_bpd"]},
      seconds={"bpd": bits.seconds},
      scalars={"eval/rate_bpd": rd["final_rate_bpd"], "eval/distortion_rmse": rd["final_distortion_rmse"]},
      summary=(
        f"rate {rd['final_rate_bpd']:.4f} + distortion {rd['final_distortion_bpd']:.4f} bits/dim "
        f"(RMSE {rd['final_distortion_rmse']:.3f})"
      ),
      chart=chart if bpd_lib.have_matplotlib() else None,
    )
