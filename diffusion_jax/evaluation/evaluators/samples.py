"""The one sample-set helper of the evaluators that score samples (`fid`, `digits`)."""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
from etils import epath

from diffusion_jax import errors
from diffusion_jax import inference
from diffusion_jax import samplers
from diffusion_jax.evaluation import sample_export
from diffusion_jax.evaluation.evaluators import base


def resolve_sampler(config: ml_collections.ConfigDict, sampling) -> samplers.SamplerSpec:
  """The sampler of a `sampling` section, or `config.sampling`'s where that names no sampler."""
  section = sampling if sampling and sampling.get("sampler") else config.sampling
  return samplers.SamplerSpec.from_config(section, num_timesteps=int(config.diffusion.num_timesteps))


def sampler_spec(config: ml_collections.ConfigDict, entry) -> samplers.SamplerSpec:
  """The sampler of a `config.evals` entry: its `sampling` section, or `config.sampling` where that names none."""
  return resolve_sampler(config, entry.get("sampling"))


def sample_count(config: ml_collections.ConfigDict, num_samples: int) -> int:
  """An entry's `num_samples`, or `config.eval.num_samples` where it is 0."""
  return int(num_samples or config.eval.num_samples)


def samples_dir(config, workdir, model: inference.LoadedModel, spec: samplers.SamplerSpec) -> epath.Path:
  """`workdir/eval/samples_<step>_<sampler settings>_seed<seed>[_cfg<s>][_noclip]/`."""
  sc = config.sampling
  name = f"samples_{model.step}_{spec.folder_name}_seed{config.eval.seed}"
  if model.num_classes and float(sc.guidance_scale) != 1.0:
    name += f"_cfg{float(sc.guidance_scale):g}"
  name += "" if sc.clip_denoised else "_noclip"
  return epath.Path(workdir) / base.EVAL_DIR / name


def check_samples(evaluator: base.Evaluator) -> None:
  """The sampler settings and the sample count of an evaluation of samples, checked before anything runs."""
  resolve_sampler(evaluator.config, evaluator.sampling)
  count = sample_count(evaluator.config, evaluator.num_samples)
  if count < 2:
    raise errors.UserError(
      f"config.evals.{evaluator.name}: {evaluator.kind} needs at least 2 samples (it fits a covariance), got "
      f"num_samples={count} (the entry's num_samples, or config.eval.num_samples where it is 0). The paper used 50000."
    )


def draw_samples(evaluator: base.Evaluator, model: inference.LoadedModel) -> tuple[list, dict[str, Any], float]:
  """Draws (resumably) the evaluator's sample set: (chunk paths, provenance, seconds).

  Sample i depends only on (config.eval.seed, i) and, for a conditional model, is of class i mod K (with
  config.sampling.guidance_scale). Chunks of config.sampling.batch_size go to `samples_dir`.
  """
  config = evaluator.config
  sc = config.sampling
  spec = resolve_sampler(config, evaluator.sampling)
  count = sample_count(config, evaluator.num_samples)
  out_dir = samples_dir(config, evaluator.workdir, model, spec)
  guidance = float(sc.get("guidance_scale", 1.0)) if model.num_classes else 1.0
  start = time.time()
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    count,
    jax.random.PRNGKey(config.eval.seed),
    spec,
    clip_denoised=bool(sc.clip_denoised),
    chunk_size=int(sc.batch_size),
    guidance_scale=guidance,
  )
  base.sync("samples_written")
  provenance = {
    "samples_dir": str(out_dir),
    "num_samples": count,
    "sampler": spec.name,
    "sampler_settings": spec.folder_name,
    "num_steps": spec.num_steps,
    "network_calls": spec.network_calls,
    "eta": float(spec.eta),
    "guidance_scale": guidance,
    "clip_denoised": bool(sc.clip_denoised),
    "seed": int(config.eval.seed),
  }
  return paths, provenance, time.time() - start
