"""`ode_bpd`: bits/dim of `config.data.eval_split` through the probability-flow ODE (`likelihood.compute_ode_bpd`).

The entry's solver, tolerances and trace estimator (`likelihood.DEFAULTS` where it does not set them) are
checked by `likelihood.solver_settings` and `likelihood.check_model`, as every caller of the likelihood has them
checked. Per-batch results in `workdir/eval/ode_bpd_<step>_<settings>/` make it resumable.
"""

from __future__ import annotations

import time

import jax

from diffusion_jax import errors
from diffusion_jax.evaluation import likelihood
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import registry

_DEFAULTS = likelihood.DEFAULTS


@registry.register
class OdeBpdEvaluator(base.Evaluator):
  """Bits/dim through the probability-flow ODE with the entry's settings, resumable per batch."""

  kind = "ode_bpd"
  SETTINGS = (  # the keys of compute_ode_bpd's result that go to the record's settings
    "split",
    "dataset",
    "step",
    "use_ema",
    "batch_size",
    "max_examples",
    "conditional",
    "metric",
    "split_size",
    "num_examples",
    "num_batches",
    "resumed_batches",
    "dequantization",
    "prior",
    "time_map",
    "out_dir",
    *_DEFAULTS,
  )

  def __init__(
    self,
    name,
    config,
    workdir,
    *,
    rtol: float = _DEFAULTS["rtol"],
    atol: float = _DEFAULTS["atol"],
    solver: str = _DEFAULTS["solver"],
    estimator: str = _DEFAULTS["estimator"],
    num_probes: int = _DEFAULTS["num_probes"],
    max_examples: int = _DEFAULTS["max_examples"],
    t_start: float = _DEFAULTS["t_start"],
    step_to_knots: bool = _DEFAULTS["step_to_knots"],
    **entry,
  ):
    self._solver = dict(
      rtol=rtol,
      atol=atol,
      solver=solver,
      estimator=estimator,
      num_probes=num_probes,
      t_start=t_start,
      step_to_knots=step_to_knots,
    )
    self.max_examples = int(max_examples)
    super().__init__(name, config, workdir, **entry)

  @property
  def solver_settings(self) -> tuple:
    """The entry's solver settings, checked and typed (`likelihood.solver_settings`)."""
    return likelihood.solver_settings(**self._solver)

  def check(self):
    base.check_eval_split(self, "the ODE bits/dim")
    try:
      t_start = dict(self.solver_settings)["t_start"]
      likelihood.check_model(self.config.diffusion.model_mean_type, int(self.config.diffusion.num_timesteps), t_start)
      if self.max_examples < 0:
        raise errors.UserError(f"max_examples must be >= 0, got {self.max_examples}.")
    except errors.UserError as e:
      raise errors.UserError(f"config.evals.{self.name}: {e}") from e

  def out_dir(self, step: int):
    """`workdir/eval/<name>_<step>_<solver>_rtol<r>_atol<a>_<estimator><K>_t<τ0>[_knots]_b<B>_seed<s>[_max<N>]/`."""
    o = dict(self.solver_settings)
    most = f"_max{self.max_examples}" if self.max_examples else ""
    name = (
      f"{self.name}_{step}_{o['solver']}_rtol{o['rtol']:g}_atol{o['atol']:g}_{o['estimator']}{o['num_probes']}"
      f"_t{o['t_start']:g}{'_knots' if o['step_to_knots'] else ''}_b{int(self.config.eval.batch_size)}"
      f"_seed{int(self.config.eval.seed)}{most}"
    )
    return self.workdir / base.EVAL_DIR / name

  def run(self, model, *, mesh):
    start = time.time()
    result = likelihood.compute_ode_bpd(
      model,
      self.config,
      jax.random.PRNGKey(self.config.eval.seed),
      mesh=mesh,
      out_dir=self.out_dir(model.step),
      max_examples=self.max_examples,
      **dict(self.solver_settings),
    )
    figures, details, settings = base.split_result(result, self.SETTINGS)
    settings["seed"] = int(self.config.eval.seed)
    return base.Result(
      kind=self.kind,
      figures=figures,
      details=details,
      settings=settings,
      seconds={"ode_bpd": time.time() - start},
      scalars={"eval/ode_bpd": result["ode_bpd"], "eval/ode_bpd_nfe": result["nfe_mean"]},
      summary=(
        f"ODE bits/dim {result['ode_bpd']:.4f} ± {result['ode_bpd_sem']:.4f} on {result['num_examples']} of "
        f"{result['split_size']} {self.config.data.dataset}:{result['split']} images ({result['solver']}, rtol "
        f"{result['rtol']:g}, atol {result['atol']:g}, mean NFE {result['nfe_mean']:.0f})"
      ),
    )
