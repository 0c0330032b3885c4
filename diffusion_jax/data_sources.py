"""Data sources: a dataset's split by name → random-access uint8 images of `image_size² × channels`.

Each source is a grain `RandomAccessDataSource` yielding uint8 `[H, W, C]`
images, with `class_names` (None for unlabelled data) and, on labelled data,
`label(index)`:

* tensorflow-datasets, read by random access with `tfds.data_source` (the
  array_record format; no TensorFlow at read time): `cifar10`, `celeb_a_hq`
  (tfds `celeb_a_hq/256`), `lsun_bedroom`, `lsun_church_outdoor`, `lsun_cat`
  (tfds `lsun/<category>`).
* `folder`: the user's own images under `config.data.data_dir` (any sizes,
  searched recursively; one sub-folder per class gives labels). Unreadable
  files are found before training starts.
* `digits`: 8×8 handwritten digits shipped inside the package
  (`diffusion_jax/data/digits.npz`, see `diffusion_jax/data/README.md`).

Images that are not square or not `image_size` are center-cropped to a square
and resized, with an area filter (PIL BOX) when shrinking and bicubic when
enlarging. `make_source(config.data, split)` opens a split; `get_dataset_info`
and `class_names` describe one; `load_digits` returns the embedded digits as
arrays. TensorFlow is never imported by this module; tfds is imported when a
tfds dataset is opened.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageOps

from diffusion_jax import errors
from diffusion_jax import runtime

# Our dataset names → tfds names.
TFDS_DATASETS = {
  "cifar10": "cifar10",
  "celeb_a_hq": "celeb_a_hq/256",
  "lsun_bedroom": "lsun/bedroom",
  "lsun_church_outdoor": "lsun/church_outdoor",
  "lsun_cat": "lsun/cat",
}
DATASETS = tuple(sorted([*TFDS_DATASETS, "digits", "folder"]))

DIGITS_PATH = pathlib.Path(__file__).resolve().parent / "data" / "digits.npz"
DIGITS_SPLITS = ("train", "test")

# File name endings read by the `folder` dataset (case-insensitive).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Corrupt files named in an error or warning; the rest are counted.
_MAX_LISTED_FILES = 20


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a split holds after preprocessing.

  Attributes:
    num_examples: number of images in the split.
    image_shape: `(image_size, image_size, channels)` of every image.
  """

  num_examples: int
  image_shape: tuple[int, int, int]


# -----------------------------------------------------------------------------
# Image preprocessing.


def _center_crop_resize(image: Image.Image, size: int) -> Image.Image:
  """Crops the central square of `image` and resizes it to `size` × `size`."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  box = (left, top, left + side, top + side)
  if side == size:
    return image.crop(box) if (width, height) != (size, size) else image
  resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
  return image.resize((size, size), resample=resample, box=box)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
  """Converts to 'RGB' or 'L'; transparent pixels are composited over white."""
  if image.mode == mode:
    return image
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return image.convert(mode)


def _as_array(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image, dtype=np.uint8)
  return array.reshape(array.shape[0], array.shape[1], channels)


def _fit_array(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """Returns `image` (uint8 [h, w, c]) as uint8 [image_size, image_size, channels]."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape == (image_size, image_size, channels) and image.dtype == np.uint8:
    return image
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise errors.UserError(f"expected a uint8 [H, W, 1|3|4] image, got {image.dtype} {image.shape}")
  # uint8 [h, w] → 'L', [h, w, 3] → 'RGB', [h, w, 4] → 'RGBA'.
  pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
  pil = _to_mode(pil, "RGB" if channels == 3 else "L")
  return _as_array(_center_crop_resize(pil, image_size), channels)


def _load_image_file(path: pathlib.Path, image_size: int, channels: int) -> np.ndarray:
  """Decodes an image file into uint8 [image_size, image_size, channels]."""
  mode = "RGB" if channels == 3 else "L"
  with Image.open(path) as image:
    # JPEG: let the decoder downscale by a power of two while both sides stay
    # >= image_size; much faster for large photos.
    image.draft(mode, (image_size, image_size))
    image = ImageOps.exif_transpose(image)
    image = _to_mode(image, mode)
    return _as_array(_center_crop_resize(image, image_size), channels)


# -----------------------------------------------------------------------------
# Sources. Each is a grain RandomAccessDataSource of final uint8 images, with a
# `repr` that is stable across runs (grain stores it in the iterator state and
# compares it on restore).


class ArraySource(grain.sources.RandomAccessDataSource):
  """Images held in memory, uint8 [N, H, W, C], with optional int labels [N]."""

  def __init__(
    self,
    images: np.ndarray,
    description: str,
    labels: np.ndarray | None = None,
    class_names: collections.abc.Sequence[str] | None = None,
  ):
    self._images = images
    self._description = description
    self._labels = labels
    self.class_names = None if labels is None else tuple(class_names)

  def label(self, index: int) -> int:
    return int(self._labels[index])

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self._images[index]

  def __repr__(self) -> str:
    return f"ArraySource({self._description}, num_examples={len(self)}, image_shape={self._images.shape[1:]})"


class _TfdsSource(grain.sources.RandomAccessDataSource):
  """A tfds split read with `tfds.data_source`, preprocessed to the target shape."""

  def __init__(self, tfds_name: str, split: str, data_dir: str, image_size: int, channels: int):
    self._tfds_name = tfds_name
    self._split = split
    self._data_dir = data_dir
    self._image_size = image_size
    self._channels = channels
    self._source = _open_tfds_source(tfds_name, split, data_dir)
    self._len = len(self._source)
    self.class_names = None
    try:
      feature = self._source.dataset_info.features["label"]
      self.class_names = tuple(feature.names)
    except (AttributeError, KeyError, TypeError):
      pass  # no 'label' class feature: an unconditional source

  def label(self, index: int) -> int:
    if self._source is None:
      self._source = _open_tfds_source(self._tfds_name, self._split, self._data_dir)
    return int(self._source[index]["label"])

  def __getstate__(self) -> dict[str, Any]:
    # Open file readers do not travel to worker processes; they reopen there.
    state = self.__dict__.copy()
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    if self._source is None:
      self._source = _open_tfds_source(self._tfds_name, self._split, self._data_dir)
    return _fit_array(self._source[index]["image"], self._image_size, self._channels)

  def __repr__(self) -> str:
    return (
      f"TfdsSource(name={self._tfds_name!r}, split={self._split!r}, num_examples={self._len}, "
      f"image_size={self._image_size}, channels={self._channels})"
    )


class _FolderSource(grain.sources.RandomAccessDataSource):
  """Image files decoded on access."""

  def __init__(
    self,
    paths: collections.abc.Sequence[pathlib.Path],
    split: str,
    image_size: int,
    channels: int,
    root: pathlib.Path | None = None,
  ):
    self._paths = tuple(paths)
    self._split = split
    self._image_size = image_size
    self._channels = channels
    # One sub-folder per class (names sorted) when every image lies in a sub-folder of the root.
    self.class_names, self._labels = None, None
    if root is not None:
      parts = [p.relative_to(root).parts for p in self._paths]
      if parts and all(len(q) > 1 for q in parts):
        self.class_names = tuple(sorted({q[0] for q in parts}))
        index = {name: i for i, name in enumerate(self.class_names)}
        self._labels = np.array([index[q[0]] for q in parts], np.int32)

  def label(self, index: int) -> int:
    return int(self._labels[index])

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return _load_image_file(self._paths[index], self._image_size, self._channels)

  def __repr__(self) -> str:
    return (
      f"FolderSource(split={self._split!r}, num_examples={len(self)}, "
      f"image_size={self._image_size}, channels={self._channels})"
    )


def _prepare_instructions(tfds_name: str, data_dir: str) -> str:
  data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  if tfds_name.startswith("celeb_a_hq"):
    return (
      "CelebA-HQ cannot be downloaded automatically: follow the manual download steps at "
      "https://www.tensorflow.org/datasets/catalog/celeb_a_hq, put the files in MANUAL_DIR, then run "
      "(needs TensorFlow: pip install 'diffusion_jax[tf]')\n"
      f"  tfds build {tfds_name} --manual_dir=MANUAL_DIR --file_format=array_record{data_dir_flag}"
    )
  return (
    "prepare it once (needs TensorFlow: pip install 'diffusion_jax[tf]') with\n"
    f"  tfds build {tfds_name} --file_format=array_record{data_dir_flag}\n"
    f"or in Python: tfds.builder({tfds_name!r}, data_dir={data_dir or None!r}, "
    "file_format='array_record').download_and_prepare()"
  )


def _open_tfds_source(tfds_name: str, split: str, data_dir: str):
  """Opens a tfds split for random access, or explains how to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # tfds raises several types; diagnose below.
    where = data_dir or "the default tfds data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir or None)
      prepared = builder.is_prepared()
      file_format = builder.info.file_format
      splits = list(builder.info.splits) if prepared else []
      version_dir = builder.data_dir
    except Exception:  # pylint: disable=broad-except
      raise errors.UserError(f"Cannot open tfds dataset {tfds_name!r} split {split!r} in {where}: {error}") from error
    if not prepared:
      raise errors.UserError(
        f"tfds dataset {tfds_name!r} is not prepared in {where}; {_prepare_instructions(tfds_name, data_dir)}"
      ) from error
    if file_format is not None and str(getattr(file_format, "value", file_format)) not in ("array_record", "parquet"):
      raise errors.UserError(
        f"tfds dataset {tfds_name!r} in {version_dir} is stored as {getattr(file_format, 'value', file_format)}, "
        "which has no random access; convert it (needs TensorFlow: pip install 'diffusion_jax[tf]') with\n"
        f"  tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record\n"
        f"or rebuild it: {_prepare_instructions(tfds_name, data_dir)}"
      ) from error
    base_split = split.split("[", 1)[0].split("+", 1)[0]
    if splits and base_split not in splits:
      raise errors.UserError(
        f"tfds dataset {tfds_name!r} has no split {split!r}; its splits are {sorted(splits)}. "
        "Set config.data.train_split / eval_split accordingly."
      ) from error
    raise
  finally:
    runtime.hide_tensorflow_if_loaded()  # tfds may have imported TensorFlow
  return source


def _list_image_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `root`, recursively, sorted; hidden files and folders are skipped."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(pathlib.Path(dirpath) / name)
  return sorted(paths)


# (path, size, mtime_ns) → None if the file decodes, else the error.
_SCAN_CACHE: dict[tuple[str, int, int], str | None] = {}


def _check_image_file(path: pathlib.Path) -> str | None:
  """Decodes the whole file; returns None if it is a readable image, else why not."""
  stat = path.stat()
  key = (str(path), stat.st_size, stat.st_mtime_ns)
  if key not in _SCAN_CACHE:
    try:
      with Image.open(path) as image:
        image.load()  # a full decode: truncated or damaged data fails here, not in training.
        if image.width < 1 or image.height < 1:
          raise errors.UserError("empty image")
      _SCAN_CACHE[key] = None
    except Exception as error:  # pylint: disable=broad-except
      _SCAN_CACHE[key] = f"{type(error).__name__}: {error}"
  return _SCAN_CACHE[key]


def _scan_folder(root: pathlib.Path, skip_corrupt: bool) -> list[pathlib.Path]:
  """The readable image files under `root`; corrupt ones raise or are skipped with a warning."""
  paths = _list_image_files(root)
  if not paths:
    raise errors.UserError(
      f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}. "
      "Set config.data.data_dir to a folder that contains images (searched recursively)."
    )
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
    problems = list(pool.map(_check_image_file, paths))
  bad = [(path, error) for path, error in zip(paths, problems) if error is not None]
  if not bad:
    return paths
  listed = "\n".join(f"  {path.relative_to(root)}  ({error})" for path, error in bad[:_MAX_LISTED_FILES])
  more = f"\n  … and {len(bad) - _MAX_LISTED_FILES} more" if len(bad) > _MAX_LISTED_FILES else ""
  summary = f"{len(bad)} of {len(paths)} image files under {root} cannot be read:\n{listed}{more}"
  if not skip_corrupt:
    raise errors.UserError(f"{summary}\nRepair or remove them, or set config.data.skip_corrupt=True to skip them.")
  logging.warning("%s\nSkipping these %d files (config.data.skip_corrupt=True).", summary, len(bad))
  good = [path for path, error in zip(paths, problems) if error is None]
  if not good:
    raise errors.UserError(f"None of the {len(paths)} image files under {root} can be read.")
  return good


def _folder_split_root(data_config: ml_collections.ConfigDict, split: str) -> pathlib.Path:
  """`data_dir/<split>` if that folder exists, else `data_dir` itself for the train split."""
  if not data_config.data_dir:
    raise errors.UserError(
      "dataset='folder' reads images from config.data.data_dir, which is empty: "
      "set --config.data.data_dir=/path/to/images."
    )
  root = pathlib.Path(data_config.data_dir).expanduser()
  if not root.is_dir():
    raise errors.UserError(f"config.data.data_dir={str(root)!r} is not a folder; point it at a folder of images.")
  if split and (root / split).is_dir():
    return root / split
  if split == data_config.get("train_split", "train"):
    return root
  raise errors.UserError(
    f"The image folder {root} has no sub-folder {split!r} for split {split!r}: "
    f"create {root / split} with its images, or set config.data.eval_split='' to skip evaluation "
    "on data."
  )


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """The embedded 8×8 digits (UCI optdigits, as in scikit-learn's `load_digits`).

  Args:
    split: 'train' (1,500 images) or 'test' (297 images).

  Returns:
    `(images, labels)`: uint8 [N, 8, 8, 1] in 0..255 (the original 0..16 scaled
    by 255/16 and rounded) and uint8 [N] digit labels 0..9.
  """
  if split not in DIGITS_SPLITS:
    raise errors.UserError(f"The digits dataset has splits {DIGITS_SPLITS}, not {split!r}.")
  with np.load(DIGITS_PATH) as data:
    return data[f"{split}_images"], data[f"{split}_labels"]


def _check_data_config(data_config: ml_collections.ConfigDict) -> None:
  if data_config.dataset not in DATASETS:
    raise errors.UserError(
      f"Unknown dataset {data_config.dataset!r}; config.data.dataset must be one of {list(DATASETS)}."
    )
  if data_config.channels not in (1, 3):
    raise errors.UserError(f"config.data.channels must be 1 (grayscale) or 3 (RGB), got {data_config.channels}.")
  if not isinstance(data_config.image_size, int) or data_config.image_size < 1:
    raise errors.UserError(f"config.data.image_size must be a positive integer, got {data_config.image_size!r}.")


def make_source(data_config: ml_collections.ConfigDict, split: str) -> grain.sources.RandomAccessDataSource:
  """The source for `split`, yielding uint8 [image_size, image_size, channels]."""
  _check_data_config(data_config)
  if not split:
    raise errors.UserError(
      f"No split given for dataset {data_config.dataset!r} (config.data.train_split / eval_split)."
    )
  name, size, channels = data_config.dataset, data_config.image_size, data_config.channels
  if name == "digits":
    images, labels = load_digits(split)
    if images.shape[1:] != (size, size, channels):
      images = np.stack([_fit_array(image, size, channels) for image in images])
    return ArraySource(images, f"digits:{split}", labels=labels, class_names=[str(i) for i in range(10)])
  if name == "folder":
    root = _folder_split_root(data_config, split)
    paths = _scan_folder(root, skip_corrupt=bool(data_config.get("skip_corrupt", False)))
    return _FolderSource(paths, split, size, channels, root=root)
  return _TfdsSource(TFDS_DATASETS[name], split, data_config.data_dir, size, channels)


def class_names(data_config: ml_collections.ConfigDict, split: str | None = None) -> tuple[str, ...] | None:
  """The class names of a dataset's split (digits: '0'..'9'; cifar10: tfds names; folder: sub-folders), or None."""
  return make_source(data_config, split or data_config.train_split).class_names


def get_dataset_info(data_config: ml_collections.ConfigDict, split: str) -> DatasetInfo:
  """Number of examples and image shape of a split (opens or scans the data).

  Args:
    data_config: `config.data`.
    split: a split name ('train', 'test', or a tfds split string like 'train[:90%]').

  Returns:
    DatasetInfo(num_examples, image_shape=(image_size, image_size, channels)).
  """
  source = make_source(data_config, split)
  return DatasetInfo(len(source), (data_config.image_size, data_config.image_size, data_config.channels))
