"""Sample sets on disk: `.npz` chunks that survive interruption (`--mode=sample`, FID and the digit metric).

`write_sample_chunks` draws a set with `inference.generate`, one chunk at a
time, each written whole or not at all; a rerun writes only the missing
chunks. `read_sample_chunks` reads them back in order.
"""

from __future__ import annotations

import io
import os

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers

LoadedModel = inference.LoadedModel


def _chunk_name(start: int, stop: int) -> str:
  return f"samples_{start:07d}_{stop:07d}.npz"


def write_sample_chunks(
  model: LoadedModel,
  out_dir: str | os.PathLike,
  num_samples: int,
  rng,
  spec: samplers.SamplerSpec,
  *,
  clip_denoised: bool,
  chunk_size: int,
  labels=None,
  guidance_scale: float = 1.0,
  progress: bool = True,
) -> list[epath.Path]:
  """Writes samples [0, num_samples) as .npz chunks of `chunk_size`; finished chunks are kept and skipped.

  Each chunk is written to a temporary file and renamed, so an interrupted run
  leaves only whole chunks; running again writes just the missing ones. Sample
  i depends only on (rng, i, its label), so a resumed set equals an
  uninterrupted one. Every chunk, the last partial one included, runs the same
  compiled program. Conditional models: `labels` as in `resolve_labels` (None:
  sample i is of class i mod K), stored in each chunk as `labels`.

  Returns:
    The chunk paths in order.
  """
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mesh = runtime.make_mesh()
  all_labels = inference.resolve_labels(model, labels, num_samples)
  chunk_size = runtime.pad_to_multiple(chunk_size, runtime.data_size(mesh))
  bounds = [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]
  paths = [out_dir / _chunk_name(a, b) for a, b in bounds]
  todo = [(a, b, p) for (a, b), p in zip(bounds, paths) if not p.exists()]
  if len(todo) < len(bounds):
    logging.info(
      "%d of %d sample chunks already in %s; writing the other %d.",
      len(bounds) - len(todo),
      len(bounds),
      out_dir,
      len(todo),
    )
  for a, b, path in runtime.progress_bar(todo, len(todo), progress, "sample chunks"):
    chunk_labels = None if all_labels is None else all_labels[a:b]
    images = images_lib.to_uint8(
      inference.generate(
        model,
        np.arange(a, b),
        rng,
        spec,
        clip_denoised=clip_denoised,
        labels=chunk_labels,
        guidance_scale=guidance_scale,
        batch_size=chunk_size,
        mesh=mesh,
      )["samples"]
    )
    if jax.process_index() == 0:
      buf = io.BytesIO()
      extra = {} if chunk_labels is None else {"labels": chunk_labels}
      np.savez(buf, images=images, indices=np.arange(a, b), **extra)
      runtime.atomic_write(path, buf.getvalue())
  return paths


def read_sample_chunks(paths, *, with_labels: bool = False):
  """The uint8 images of chunk files, concatenated in order (and their labels, None if unconditional)."""
  images, labels = [], []
  for p in paths:
    with np.load(epath.Path(p).open("rb")) as f:
      images.append(f["images"])
      labels.append(f["labels"] if "labels" in f.files else None)
  images = np.concatenate(images)
  if not with_labels:
    return images
  return images, (None if any(l is None for l in labels) else np.concatenate(labels))
