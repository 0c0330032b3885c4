"""Images for people: [-1, 1] floats to uint8, grids, PNG files that are never silently overwritten."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from etils import epath

from diffusion_jax import errors
from diffusion_jax import runtime


def to_uint8(x) -> np.ndarray:
  """Images in [-1, 1] (any float array, NHWC) → uint8 NHWC, as round((x + 1)·127.5) clipped to [0, 255]."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
  images, *, ncols: int | None = None, padding: int = 2, scale: int = 1, pad_value: int = 255
) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [H', W', C] picture.

  Args:
    images: uint8 [N, H, W, C] (floats in [-1, 1] are converted with `to_uint8`).
    ncols: images per row (default: about √N).
    padding: pixels between images.
    scale: nearest-neighbour magnification (useful for 8×8 digits).
    pad_value: colour of the padding.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if images.ndim != 4:
    raise errors.UserError(f"images must be [N, H, W, C], got shape {images.shape}.")
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def save_image(image, path: str | os.PathLike, *, overwrite: bool = False) -> epath.Path:
  """Writes a uint8 [H, W, C] (C = 1 or 3) image as PNG; refuses to overwrite unless asked."""
  from PIL import Image

  path = epath.Path(path)
  if path.exists() and not overwrite:
    raise errors.ExistingFileError(
      f"{path} exists; refusing to overwrite it (choose another path or pass overwrite=True)."
    )
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise errors.UserError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}.")
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  path.parent.mkdir(parents=True, exist_ok=True)
  return runtime.atomic_write(path, buf.getvalue())
