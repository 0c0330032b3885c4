"""`fid`: FID against the reference statistics and the Inception Score of samples.

The samples are the entry's sample set (`samples.draw_samples`: chunked and resumable, in
`workdir/eval/samples_<step>_<sampler>_seed<s>/`); the reference statistics are `fid_stats`'s. For
`dataset=digits` the shipped digit classifier scores them instead (the `digits` kind), unless
`config.eval.random_inception`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import runtime
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import fid_stats
from diffusion_jax.evaluation import model_loading
from diffusion_jax.evaluation import sample_export
from diffusion_jax.evaluation.evaluators import base
from diffusion_jax.evaluation.evaluators import registry
from diffusion_jax.evaluation.evaluators import samples

IS_SPLITS = 10


def _sample_batches(paths: Sequence[epath.Path], batch_size: int, num_samples: int) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 [batch_size, H, W, C], number of real images) from the chunk files, streamed; the last is padded."""
  buffer, held, seen = [], 0, 0
  for path in paths:
    buffer.append(sample_export.read_sample_chunks([path]))
    held += len(buffer[-1])
    while held >= batch_size:
      images = np.concatenate(buffer)
      buffer, held = [images[batch_size:]], held - batch_size
      seen += batch_size
      yield images[:batch_size], batch_size
  if held:
    images = np.concatenate(buffer)
    pad = np.zeros((batch_size - held,) + images.shape[1:], images.dtype)
    seen += held
    yield np.concatenate([images, pad]), held
  if seen != num_samples:
    raise RuntimeError(f"The sample chunks hold {seen} images, expected {num_samples}.")


def inception_figures(
  config: ml_collections.ConfigDict, workdir, paths: Sequence[epath.Path], num_samples: int, mesh: Mesh
) -> dict[str, Any]:
  """FID against the reference statistics and the Inception Score of the samples in chunk files.

  Returns:
    `fid`, `inception_score`, `inception_score_std`, `is_splits`, `inception_weights` (a label; random weights
    say so), `random_inception`, `reference_statistics` (path).
  """
  batch_size = model_loading.check_batch_size(config, mesh)
  params, label = fid_stats.inception_weights(config)
  inception_fn = fid_lib.make_inception_fn(params, mesh=mesh)
  if config.eval.fid_stats_path:
    ref_path = epath.Path(config.eval.fid_stats_path)
  else:
    ref_path = fid_stats.reference_statistics(config, workdir, inception_fn, label, mesh)
  mu_ref, sigma_ref = fid_stats.load_statistics(ref_path)
  sharded = runtime.batch_sharding(mesh)
  stats = fid_lib.ActivationStatistics()
  logits = []
  num_batches = -(-int(num_samples) // batch_size)
  for images, n in runtime.progress_bar(
    _sample_batches(paths, batch_size, int(num_samples)), num_batches, True, "Inception on samples"
  ):
    global_images = jax.make_array_from_callback(images.shape, sharded, lambda index, x=images: x[index])
    pool, lg = inception_fn(global_images)
    stats.update(runtime.to_host(pool)[:n])
    logits.append(runtime.to_host(lg)[:n])
  logits = np.concatenate(logits)
  fid_value = fid_lib.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
  splits = min(IS_SPLITS, len(logits))
  if splits < IS_SPLITS:
    logging.warning("Inception Score over %d samples uses %d splits instead of %d.", len(logits), splits, IS_SPLITS)
  is_mean, is_std = fid_lib.inception_score(logits, splits=splits)
  return {
    "fid": float(fid_value),
    "inception_score": float(is_mean),
    "inception_score_std": float(is_std),
    "is_splits": splits,
    "inception_weights": label,
    "random_inception": label == fid_stats.RANDOM_INCEPTION_LABEL,
    "reference_statistics": str(ref_path),
  }


@registry.register
class FidEvaluator(base.Evaluator):
  """FID and Inception Score of the entry's samples against reference statistics (`inception_figures`)."""

  kind = "fid"

  def check(self):
    fid_stats.check_fid_config(self.config)
    samples.check_samples(self)

  def run(self, model, *, mesh):
    paths, provenance, sampling_s = samples.draw_samples(self, model)
    start = time.time()
    out = inception_figures(self.config, self.workdir, paths, provenance["num_samples"], mesh)
    tail = "_random_inception" if out["random_inception"] else ""
    figures = {k: out[k] for k in ("fid", "inception_score", "inception_score_std")}
    settings = {
      **provenance,
      **{k: out[k] for k in ("is_splits", "inception_weights", "random_inception", "reference_statistics")},
    }
    return base.Result(
      kind=self.kind,
      figures=figures,
      details={},
      settings=settings,
      seconds={"sampling": sampling_s, "inception": time.time() - start},
      scalars={f"eval/fid{tail}": out["fid"], f"eval/inception_score{tail}": out["inception_score"]},
      summary=(
        f"FID {out['fid']:.3f}, IS {out['inception_score']:.3f} ± {out['inception_score_std']:.3f} over "
        f"{provenance['num_samples']} samples ({provenance['sampler_settings']})"
        + (f" [{fid_stats.RANDOM_INCEPTION_LABEL}]" if tail else "")
      ),
    )
