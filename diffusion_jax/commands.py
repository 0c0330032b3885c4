"""The command-line modes that sample a workdir's model into its folders: `--mode=sample` and `--mode=inpaint`.

`sample_to_workdir` writes large sample sets in chunks that survive interruption (`evaluation.sample_export`);
`inpaint_folder` fills a folder of images and masks. Both sample on the device mesh through the notebook API
(`api`) and `inference`.
"""

from __future__ import annotations

import hashlib
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import checkpointing
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import samplers
from diffusion_jax.api import LoadedModel
from diffusion_jax.api import inpaint_fn
from diffusion_jax.api import load_model
from diffusion_jax.api import progressive_fn
from diffusion_jax.api import save_image_grid
from diffusion_jax.evaluation import sample_export

# ----------------------------------------------------------------------------
# --mode=sample: chunked, resumable sample sets (evaluation.sample_export).
# ----------------------------------------------------------------------------


def _config_labels(model: LoadedModel, text: str):
  """`sampling.labels` ('' = every class in turn; else comma-separated ints or class names) for the model."""
  text = str(text or "").strip()
  if not text:
    return None
  if not model.num_classes:
    raise errors.UserError(
      "config.sampling.labels applies to class-conditional models; this model is unconditional "
      "(leave --config.sampling.labels='')."
    )
  return [v.strip() for v in text.split(",") if v.strip()]


def _sample_folder(model: LoadedModel, spec: samplers.SamplerSpec, sc, labels) -> str:
  name = f"step_{model.step}_{spec.folder_name}"
  if model.num_classes and float(sc.guidance_scale) != 1.0:
    name += f"_cfg{float(sc.guidance_scale):g}"
  if labels is not None:
    text = "-".join(str(v) for v in labels)
    if len(text) > 40 or not text.replace("-", "").replace("_", "").isalnum():
      text = hashlib.sha1(",".join(map(str, labels)).encode()).hexdigest()[:10]
    name += f"_labels-{text}"
  if not sc.clip_denoised:
    name += "_noclip"
  return name + ("" if sc.use_ema else "_raw")


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 10) -> np.ndarray:
  """[K·m, H, W, C] images arranged as one row per class (the first m samples of each class, blanks if fewer)."""
  rows = []
  for c in range(num_classes):
    picked = images[labels == c][:per_class]
    pad = np.zeros((per_class - len(picked),) + images.shape[1:], images.dtype)
    rows.append(np.concatenate([picked, pad]))
  return np.concatenate(rows)


def sample_to_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """--mode=sample: samples the workdir's newest checkpoint into workdir/samples/.

  Writes `<name>/samples_*.npz` chunks (uint8 images; labels for conditional
  models), `<name>/grid.png` (one row per class for a conditional model) and
  `<name>/progressive.png`, where <name> records the step, the sampler and its
  settings (`SamplerSpec.folder_name`), guidance and labels. An interrupted run
  resumes from the last finished chunk.
  """
  sc = config.sampling
  model = load_model(workdir, use_ema=sc.use_ema)
  newer = [s for s in checkpointing.checkpoint_steps(workdir) if s > model.step]
  if newer:
    logging.warning(
      "SAMPLING THE CHECKPOINT OF STEP %d, NOT THE NEWEST: the checkpoint(s) of step %s in %s could "
      "not be read (see the warnings above). The samples go to a folder named after step %d.",
      model.step,
      ", ".join(map(str, newer)),
      checkpointing.checkpoint_dir(workdir),
      model.step,
    )
  spec = samplers.SamplerSpec.from_config(sc, num_timesteps=model.diffusion.num_timesteps)
  labels = _config_labels(model, sc.get("labels", ""))
  if labels is not None and len(labels) not in (1, sc.num_samples):
    raise errors.UserError(
      f"config.sampling.labels lists {len(labels)} labels for num_samples={sc.num_samples}: give one "
      "label, or one per sample."
    )
  resolved = inference.resolve_labels(
    model, None if labels is None else (labels if len(labels) > 1 else labels[0]), sc.num_samples
  )
  scale = float(sc.get("guidance_scale", 1.0))
  out_dir = epath.Path(workdir) / "samples" / _sample_folder(model, spec, sc, labels)
  rng = jax.random.PRNGKey(config.eval.seed)
  logging.info(
    "Sampling step %d of %s (%s%s) into %s.",
    model.step,
    workdir,
    spec.folder_name,
    f", guidance {scale:g}" if model.num_classes else "",
    out_dir,
  )
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    sc.num_samples,
    rng,
    spec,
    clip_denoised=sc.clip_denoised,
    chunk_size=sc.batch_size,
    labels=resolved,
    guidance_scale=scale,
  )
  if jax.process_index() == 0:
    images, chunk_labels = sample_export.read_sample_chunks(paths, with_labels=True)
    scale_px = max(1, 64 // model.image_shape[0])
    grid_path = out_dir / "grid.png"
    if not grid_path.exists():
      if model.num_classes and labels is None:
        per_class = max(1, min(10, sc.num_samples // model.num_classes))
        save_image_grid(
          class_grid(images, chunk_labels, model.num_classes, per_class), grid_path, ncols=per_class, scale=scale_px
        )
      else:
        save_image_grid(images[:256], grid_path, scale=scale_px)
    prog_path = out_dir / "progressive.png"
    if not prog_path.exists():
      n_prog = min(8, sc.num_samples)
      prog = progressive_fn(
        model, n_prog, rng, sampler=spec, labels=None if resolved is None else resolved[:n_prog], guidance_scale=scale
      )
      rows = prog["pred_xstart"]  # [N, K, H, W, C]: one row per sample, x0 predictions left to right
      k = rows.shape[1]
      save_image_grid(rows.reshape((-1,) + rows.shape[2:]), prog_path, ncols=k, scale=scale_px)
    logging.info("Wrote %d samples, %s and %s to %s.", sc.num_samples, grid_path.name, prog_path.name, out_dir)
  return out_dir


# ----------------------------------------------------------------------------
# --mode=inpaint: a folder of images and masks in, a folder and a grid out.
# ----------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MASK_SUFFIX = "_mask"


def _read_inpaint_inputs(folder: epath.Path, model: LoadedModel):
  """(names, uint8 images [N, H, W, C], 0/1 masks [N, H, W]) of `folder`: each image X with its mask X_mask.png."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not folder.is_dir():
    raise errors.MissingFileError(f"--inputs={folder} is not a folder of images and masks.")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  images_in = [p for p in files if not p.stem.endswith(MASK_SUFFIX)]
  if not images_in:
    raise errors.UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) to inpaint.")
  h, w, c = model.image_shape
  names, images, masks = [], [], []
  for path in images_in:
    mask_path = next((p for p in files if p.stem == path.stem + MASK_SUFFIX), None)
    if mask_path is None:
      raise errors.MissingFileError(
        f"{path.name} has no mask: add {path.stem}{MASK_SUFFIX}.png (white = keep, black = fill) to {folder}."
      )
    with path.open("rb") as f:
      image = np.asarray(Image.open(f).convert("L" if c == 1 else "RGB"))
    with mask_path.open("rb") as f:
      mask = np.asarray(Image.open(f).convert("L"))
    image = image[..., None] if image.ndim == 2 else image
    if image.shape != (h, w, c) or mask.shape != (h, w):
      raise errors.UserError(
        f"{path.name} is {image.shape[1]}×{image.shape[0]} and its mask {mask.shape[1]}×{mask.shape[0]}; this "
        f"model inpaints {w}×{h} images: resize both first."
      )
    names.append(path.stem)
    images.append(image)
    masks.append((mask >= 128).astype(np.uint8))
  return names, np.stack(images), np.stack(masks)


def inpaint_folder(config: ml_collections.ConfigDict, workdir: str | os.PathLike, inputs: str | os.PathLike):
  """--mode=inpaint: fills the black part of each image's mask with the workdir's newest model.

  `inputs` holds images X.png (the model's size) and masks X_mask.png (white = keep, black = fill). The
  sampler is `config.sampling`'s (with RePaint's resampling for `sampling.resample` > 1 and
  `sampling.jump_length`); image i is sampled from (config.eval.seed, i) in batches of
  `config.sampling.batch_size`. Writes `workdir/inpaint/<inputs folder>_step_<step>_<sampler settings>[_n]/`:
  X.png for each image and grid.png (one row per image: the input with the fill region black, the result).
  Earlier results are never overwritten: a new run gets the next free `_n`.

  Returns:
    The output folder.
  """
  sc = config.sampling
  model = load_model(workdir, use_ema=sc.use_ema)
  spec = samplers.SamplerSpec.from_config(sc, num_timesteps=model.diffusion.num_timesteps)
  resample, jump_length = int(sc.get("resample", 1)), int(sc.get("jump_length", 10))
  settings = spec.folder_name + (f"_resample{resample}_jump{jump_length}" if resample != 1 else "")
  names, images, masks = _read_inpaint_inputs(epath.Path(inputs), model)
  base = epath.Path(workdir) / "inpaint" / f"{epath.Path(inputs).name}_step_{model.step}_{settings}"
  out_dir, n = base, 0
  while out_dir.exists():
    n += 1
    out_dir = base.parent / f"{base.name}_{n}"
  rng = jax.random.PRNGKey(config.eval.seed)
  batch = max(1, int(sc.batch_size))
  logging.info(
    "Inpainting %d images of %s with step %d (%s) into %s.", len(names), inputs, model.step, settings, out_dir
  )
  filled = np.concatenate(
    [
      inpaint_fn(
        model,
        images[i : i + batch],
        masks[i : i + batch],
        jax.random.fold_in(rng, i),
        sampler=spec,
        clip_denoised=sc.clip_denoised,
        guidance_scale=float(sc.get("guidance_scale", 1.0)),
        resample=resample,
        jump_length=jump_length,
      )
      for i in range(0, len(names), batch)
    ]
  )
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=False)
    for name, image in zip(names, filled):
      images_lib.save_image(image, out_dir / f"{name}.png")
    blanked = images * masks[..., None]
    scale = max(1, 64 // model.image_shape[0])
    save_image_grid(
      np.stack([blanked, filled], axis=1).reshape((-1,) + filled.shape[1:]), out_dir / "grid.png", ncols=2, scale=scale
    )
    logging.info("Wrote %d inpainted images and grid.png to %s.", len(names), out_dir)
  return out_dir
