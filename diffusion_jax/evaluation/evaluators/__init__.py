r"""Evaluators: one protocol for every metric, chosen by `config.evals`, run by `--mode=eval` and by training.

`config.evals` maps a name to an entry (`config_base.eval_entry`):

  kind         bpd | rate_distortion | fid | digits | ode_bpd
  every        run every N training steps (0: never during training)
  at_end       run when training finishes (num_train_steps or time_budget_s reached)
  num_samples  images to sample (fid, digits; 0: config.eval.num_samples)
  sampling     the sampler (a sampler section, see `SamplerSpec.from_config`; sampler '' = config.sampling's)
  ...          the kind's own settings (ode_bpd: the solver, tolerances and trace estimator)

Each kind is a module of this package with one `Evaluator` class, registered with `@registry.register`:
`registry.make` passes the entry's fields to its constructor as keyword arguments, so the evaluator object is
the configured evaluation and `run(model, mesh=...)` returns a `Result`:

  bpd.py              bits/dim of `config.data.eval_split` (`bpd.compute_bpd`, the paper's protocol by default)
  rate_distortion.py  the rate–distortion curve made from the same bits/dim computation (and a chart, with
                      matplotlib)
  fid.py              FID against the reference statistics (`fid_stats`) and the Inception Score of samples
  digits.py           the digit-classifier metric (`digits_metric`); `fid` on `dataset=digits` is this kind,
                      unless `config.eval.random_inception`
  ode_bpd.py          bits/dim through the probability-flow ODE (`likelihood.compute_ode_bpd`), resumable

with `base.py` (the protocol), `registry.py` (the kinds, `make`, `from_config`), `samples.py` (the one
sample-set helper: chunked and resumable, in `workdir/eval/samples_<step>_<sampler>_seed<s>/`), `results.py`
(the one writer) and `run.py` (`run_all`, `evaluate`).

`--mode=eval` runs the entries that `config.eval.metrics` names; `run_all` writes every result the same way: one
JSON file per entry, `workdir/eval/<name>_step_<step:06d>[_n].json` (never overwritten; all files of one
evaluation share the counter), its scalars to TensorBoard (`eval/...` at the checkpoint's step) and one summary
line. The JSON schema is the same for every kind:

  {"name", "kind", "step", "use_ema", "workdir", "created",
   "figures":  {scalar results},
   "details":  {the other results: per-timestep terms, histograms, per-class figures},
   "settings": {what was evaluated and how: split, sampler and its settings, seed, weights, ...},
   "seconds":  {where the time went}}
"""

from diffusion_jax.evaluation.evaluators import base  # noqa: F401
from diffusion_jax.evaluation.evaluators import bpd  # noqa: F401
from diffusion_jax.evaluation.evaluators import digits  # noqa: F401
from diffusion_jax.evaluation.evaluators import fid  # noqa: F401
from diffusion_jax.evaluation.evaluators import ode_bpd  # noqa: F401
from diffusion_jax.evaluation.evaluators import rate_distortion  # noqa: F401
from diffusion_jax.evaluation.evaluators import registry
from diffusion_jax.evaluation.evaluators import results  # noqa: F401
from diffusion_jax.evaluation.evaluators import run  # noqa: F401
from diffusion_jax.evaluation.evaluators import samples  # noqa: F401
from diffusion_jax.evaluation.evaluators.base import EVAL_DIR  # noqa: F401
from diffusion_jax.evaluation.evaluators.base import Evaluator  # noqa: F401
from diffusion_jax.evaluation.evaluators.base import Result  # noqa: F401
from diffusion_jax.evaluation.evaluators.registry import eval_names  # noqa: F401
from diffusion_jax.evaluation.evaluators.registry import from_config  # noqa: F401
from diffusion_jax.evaluation.evaluators.registry import make  # noqa: F401
from diffusion_jax.evaluation.evaluators.registry import register  # noqa: F401
from diffusion_jax.evaluation.evaluators.registry import uses_digit_metric  # noqa: F401
from diffusion_jax.evaluation.evaluators.results import result_paths  # noqa: F401
from diffusion_jax.evaluation.evaluators.results import write_results  # noqa: F401
from diffusion_jax.evaluation.evaluators.run import evaluate  # noqa: F401
from diffusion_jax.evaluation.evaluators.run import run_all  # noqa: F401
from diffusion_jax.evaluation.evaluators.samples import draw_samples  # noqa: F401
from diffusion_jax.evaluation.evaluators.samples import sampler_spec  # noqa: F401

KINDS = registry.kinds()
