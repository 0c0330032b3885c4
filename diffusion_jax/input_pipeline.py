"""Input pipelines: datasets → per-process shards of global batches.

Sources, each yielding uint8 `[H, W, C]` images of `image_size² × channels`:

* tensorflow-datasets, read by random access with `tfds.data_source` (the
  array_record format; no TensorFlow at read time): `cifar10`, `celeb_a_hq`
  (tfds `celeb_a_hq/256`), `lsun_bedroom`, `lsun_church_outdoor`, `lsun_cat`
  (tfds `lsun/<category>`).
* `folder`: the user's own images under `config.data.data_dir` (any sizes,
  searched recursively). Unreadable files are found before training starts.
* `digits`: 8×8 handwritten digits shipped inside the package
  (`diffusion_jax/data/digits.npz`, see `diffusion_jax/data/README.md`).

Images that are not square or not `image_size` are center-cropped to a square
and resized, with an area filter (PIL BOX) when shrinking and bicubic when
enlarging. Inside the library images are float32 in [-1, 1]: `x / 127.5 - 1`.

Pipelines are built with grain:

* `create_train_iterator` returns an infinite, shuffled iterator over this
  process's part of every global batch. It is a `grain.DataLoaderIterator`, so
  its position can be saved and restored (`get_state`/`set_state`, or with
  Orbax through `train_checkpoint_args`/`train_restore_args`), and a resumed
  run sees exactly the batches an uninterrupted one would have seen.
* `create_eval_iterator` returns one fixed-order pass over a split per
  `iter()`, with an explicit treatment of the last partial batch: dropped, or
  padded and flagged in a boolean `mask`.

Sharding: process `p` of `P` reads only its contiguous share of each global
batch of `B` examples, rows [p·B/P, (p+1)·B/P); the caller assembles global
arrays with `runtime.global_array` (`jax.make_array_from_process_local_data`).
Which example lands in which row depends only on its position in the stream,
so training does not depend on the number of processes. TensorFlow is never imported by this
module; tfds is imported when a tfds dataset is opened.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
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

Batch = dict[str, np.ndarray]


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


class _ArraySource(grain.sources.RandomAccessDataSource):
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


def _make_source(data_config: ml_collections.ConfigDict, split: str) -> grain.sources.RandomAccessDataSource:
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
    return _ArraySource(images, f"digits:{split}", labels=labels, class_names=[str(i) for i in range(10)])
  if name == "folder":
    root = _folder_split_root(data_config, split)
    paths = _scan_folder(root, skip_corrupt=bool(data_config.get("skip_corrupt", False)))
    return _FolderSource(paths, split, size, channels, root=root)
  return _TfdsSource(TFDS_DATASETS[name], split, data_config.data_dir, size, channels)


def class_names(data_config: ml_collections.ConfigDict, split: str | None = None) -> tuple[str, ...] | None:
  """The class names of a dataset's split (digits: '0'..'9'; cifar10: tfds names; folder: sub-folders), or None."""
  return _make_source(data_config, split or data_config.train_split).class_names


def _check_labels(source, config: ml_collections.ConfigDict, split: str) -> bool:
  """Whether batches carry labels (conditional models); a conditional config on unlabelled data is refused."""
  num_classes = config.model.get("num_classes", 0)
  if not num_classes:
    return False
  names = source.class_names
  if names is None:
    hint = (
      " Put the images in one sub-folder per class under config.data.data_dir."
      if config.data.dataset == "folder"
      else ""
    )
    raise errors.UserError(
      f"config.model.num_classes={num_classes} asks for a class-conditional model, but "
      f"{config.data.dataset}:{split} has no class labels.{hint} Or set --config.model.num_classes=0."
    )
  if len(names) != num_classes:
    raise errors.UserError(
      f"config.model.num_classes={num_classes}, but {config.data.dataset}:{split} has {len(names)} "
      f"classes ({', '.join(names[:12])}{', …' if len(names) > 12 else ''}); set "
      f"--config.model.num_classes={len(names)}."
    )
  return True


def get_dataset_info(data_config: ml_collections.ConfigDict, split: str) -> DatasetInfo:
  """Number of examples and image shape of a split (opens or scans the data).

  Args:
    data_config: `config.data`.
    split: a split name ('train', 'test', or a tfds split string like 'train[:90%]').

  Returns:
    DatasetInfo(num_examples, image_shape=(image_size, image_size, channels)).
  """
  source = _make_source(data_config, split)
  return DatasetInfo(len(source), (data_config.image_size, data_config.image_size, data_config.channels))


# -----------------------------------------------------------------------------
# Pipelines.


class _Normalize(grain.transforms.Map):
  """uint8 [..., H, W, C] (and int labels) → {'image': float32 in [-1, 1], 'label': int32}."""

  def map(self, element) -> Batch:
    if isinstance(element, tuple):
      images, labels = element
      return {
        "image": images.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
        "label": np.asarray(labels, np.int32),
      }
    return {"image": element.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}


def _read_options(source: grain.sources.RandomAccessDataSource, buffer_size: int) -> grain.ReadOptions:
  """Reader threads for sources that decode files; none for images already in memory."""
  num_threads = 0 if isinstance(source, _ArraySource) else min(16, os.cpu_count() or 1)
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(buffer_size, 1))


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise errors.UserError(f"Need 0 <= process_index < process_count, got {process_index} and {process_count}.")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise errors.UserError(
      f"{what}={global_batch_size} must be a positive multiple of the number of "
      f"processes ({process_count}); change the batch size."
    )
  return global_batch_size // process_count


class _TrainLayout(grain.sources.RandomAccessDataSource):
  """This process's contiguous slots of every global training batch, in stream order.

  The global stream is the shuffled, endlessly repeated order of `sampler`
  (position n holds record `sampler[n].record_key`, flipped by the first draw of
  `sampler[n].rng` when flips are on). Global batch k holds positions
  [k·B, (k+1)·B); process p of P reads the positions [k·B + p·b, k·B + (p+1)·b)
  with b = B / P. Which example lands in which row of a global batch therefore
  depends on its position only, not on the number of processes, and one process
  reads exactly the stream.
  """

  def __init__(
    self, source, sampler, *, global_batch: int, local_batch: int, process_index: int, flip: bool, labels: bool = False
  ):
    self._labels = labels
    self._source = source
    self._sampler = sampler
    self._global_batch = global_batch
    self._local_batch = local_batch
    self._offset = process_index * local_batch
    self._flip = flip

  def __len__(self) -> int:
    return _STREAM_LENGTH

  def __getitem__(self, index: int) -> np.ndarray:
    batch, slot = divmod(index, self._local_batch)
    record = self._sampler[batch * self._global_batch + self._offset + slot]
    image = self._source[record.record_key]
    if self._flip and record.rng.random() < 0.5:
      image = image[:, ::-1]
    if self._labels:
      return image, np.int32(self._source.label(record.record_key))
    return image

  def __repr__(self) -> str:
    return (
      f"TrainLayout({self._source!r}, {self._sampler!r}, global_batch={self._global_batch}, "
      f"local_batch={self._local_batch}, offset={self._offset}, flip={self._flip}"
      + (", labels=True)" if self._labels else ")")
    )


# Positions a training stream can address (endless in practice: 2**40 examples).
_STREAM_LENGTH = 2**40


def create_train_iterator(
  config: ml_collections.ConfigDict,
  *,
  seed: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int | None = None,
) -> grain.DataLoaderIterator:
  """An infinite, shuffled iterator over this process's contiguous part of every global batch.

  Epochs are reshuffled and run into each other (no partial batches). Flips, when
  `config.data.random_flip`, are drawn from grain's per-position rng. The
  global stream is a function of (data, seed) alone: process `p` of `P` reads
  rows [p·B/P, (p+1)·B/P) of each global batch of B (see `_TrainLayout`), so
  concatenating the processes' batches in process order gives the same global
  batches for any number of processes, with no communication.

  Args:
    config: the run config; reads `config.data` and `config.training.batch_size`
      (global, over all processes).
    seed: the shuffle/flip seed, a 32-bit non-negative integer; defaults to
      `config.training.seed`.
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    worker_count: grain worker processes; defaults to `config.data.worker_count`
      (0: read in this process with threads).

  Returns:
    A `grain.DataLoaderIterator` yielding `{'image': float32 [B / P, H, W, C]}`
    in [-1, 1] (and `'label'`: int32 [B / P] for a class-conditional config), with
    `get_state() -> bytes` and `set_state(bytes)`. A state restores only into an
    iterator built with the same data, seed, process count and worker count.
  """
  seed = config.training.seed if seed is None else seed
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise errors.UserError(f"The data seed must be an integer in [0, 2**32), got {seed!r}; set config.training.seed.")
  process_index, process_count = _process_shard(process_index, process_count)
  global_batch = config.training.batch_size
  local_batch = _local_batch_size(global_batch, process_count, "config.training.batch_size")
  worker_count = config.data.get("worker_count", 0) if worker_count is None else worker_count
  if worker_count < 0:
    raise errors.UserError(f"config.data.worker_count must be >= 0, got {worker_count}.")
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside an absl app (Colab, tests)
    # nothing parses them, so take their defaults.
    flags.FLAGS.mark_as_parsed()
  source = _make_source(config.data, config.data.train_split)
  stream = grain.samplers.IndexSampler(num_records=len(source), shuffle=True, num_epochs=None, seed=int(seed))
  labels = _check_labels(source, config, config.data.train_split)
  layout = _TrainLayout(
    source,
    stream,
    global_batch=global_batch,
    local_batch=local_batch,
    process_index=process_index,
    flip=bool(config.data.random_flip),
    labels=labels,
  )
  loader = grain.DataLoader(
    data_source=layout,
    sampler=grain.samplers.SequentialSampler(num_records=_STREAM_LENGTH),
    operations=[grain.transforms.Batch(local_batch, drop_remainder=True), _Normalize()],
    worker_count=worker_count,
    read_options=_read_options(source, 2 * local_batch),
  )
  return iter(loader)


def train_checkpoint_args(iterator: grain.DataLoaderIterator):
  """Orbax save args for the train iterator's position, an item of `ocp.args.Composite`.

  Each process writes its own `process_<i>-of-<n>.json`. The position is read
  when `CheckpointManager.save` is called.
  """
  import grain.checkpoint as grain_checkpoint  # pylint: disable=g-import-not-at-top  (imports Orbax)

  return grain_checkpoint.CheckpointSave(iterator)


def train_restore_args(iterator: grain.DataLoaderIterator):
  """Orbax restore args that set `iterator` (built as for the saved run) to the saved position.

  The restored Composite item is `iterator` itself, moved in place.
  """
  import grain.checkpoint as grain_checkpoint  # pylint: disable=g-import-not-at-top  (imports Orbax)

  return grain_checkpoint.CheckpointRestore(iterator)


class _EvalLayout(grain.sources.RandomAccessDataSource):
  """This process's slots of the global eval batches, in order, padded past the split's end.

  Global batch k holds examples [k·B, (k+1)·B); process p takes the slots
  [k·B + p·b, k·B + (p+1)·b) with b = B / P. Slots past the end are padding.
  """

  def __init__(
    self, source, num_examples: int, num_batches: int, global_batch: int, process_index: int, local_batch: int
  ):
    self._source = source
    self._num_examples = num_examples
    self._num_batches = num_batches
    self._global_batch = global_batch
    self._offset = process_index * local_batch
    self._local_batch = local_batch
    self._pad = np.zeros(source[0].shape, np.uint8)
    self.labels = False  # set to True to add each example's class label (0 on padding)

  def __len__(self) -> int:
    return self._num_batches * self._local_batch

  def __getitem__(self, index: int) -> tuple[np.ndarray, bool]:
    batch, slot = divmod(index, self._local_batch)
    example = batch * self._global_batch + self._offset + slot
    if example < self._num_examples:
      if self.labels:
        return self._source[example], True, self._source.label(example)
      return self._source[example], True
    return (self._pad, False, 0) if self.labels else (self._pad, False)


def _eval_batch(elements: collections.abc.Sequence[tuple[np.ndarray, bool]]) -> Batch:
  images = np.stack([e[0] for e in elements])
  batch = {
    "image": images.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
    "mask": np.array([e[1] for e in elements], dtype=bool),
  }
  if elements and len(elements[0]) == 3:
    batch["label"] = np.array([e[2] for e in elements], np.int32)
  return batch


class EvalIterator(collections.abc.Iterable):
  """Fixed-order passes over an eval split; every `iter()` starts a new pass.

  Each pass yields `num_batches` dicts (the same number on every process):
    image: float32 [B / P, H, W, C] in [-1, 1].
    mask: bool [B / P], True for real examples, False for padding.

  Attributes:
    num_examples: real examples in one pass over all processes (each exactly once).
    num_batches: batches per pass.
    split_size: examples in the split (more than num_examples when batches are dropped or capped).
    global_batch_size: B.
    local_batch_size: B / P.
  """

  def __init__(
    self,
    dataset: grain.MapDataset,
    *,
    num_examples: int,
    num_batches: int,
    split_size: int,
    global_batch_size: int,
    local_batch_size: int,
  ):
    self._dataset = dataset
    self.num_examples = num_examples
    self.num_batches = num_batches
    self.split_size = split_size
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size

  def __iter__(self) -> collections.abc.Iterator[Batch]:
    return iter(self._dataset)

  def __len__(self) -> int:
    return self.num_batches

  def __repr__(self) -> str:
    return (
      f"EvalIterator(num_examples={self.num_examples}, num_batches={self.num_batches}, "
      f"split_size={self.split_size}, global_batch_size={self.global_batch_size})"
    )


def create_eval_iterator(
  config: ml_collections.ConfigDict,
  *,
  split: str | None = None,
  batch_size: int | None = None,
  drop_remainder: bool = False,
  max_examples: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalIterator:
  """Fixed-order batches over a whole split, sharded across processes.

  The examples are taken in the split's order; global batch k holds examples
  k·B … (k+1)·B - 1 whatever the number of processes. The last partial batch
  is either dropped (`drop_remainder=True`, the paper's bits/dim protocol:
  9,984 of CIFAR-10's 10,000 test images at B = 256) or padded, with `mask`
  False on the padding, so every example is seen exactly once.

  Args:
    config: the run config; reads `config.data` and `config.eval.batch_size`.
    split: the split; defaults to `config.data.eval_split`.
    batch_size: the global batch B; defaults to `config.eval.batch_size`. Must
      be a multiple of the process count.
    drop_remainder: drop the last partial global batch instead of padding it.
    max_examples: if > 0, use only the first `max_examples` of the split.
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An `EvalIterator`: iterate it for one pass of `{'image', 'mask'}` batches;
    `num_examples` is the number of real examples a pass covers.
  """
  split = config.data.eval_split if split is None else split
  if not split:
    raise errors.UserError(
      f"No eval split: config.data.eval_split is empty for dataset {config.data.dataset!r}. "
      "Set it (e.g. --config.data.eval_split=test) or skip data-based evaluation."
    )
  batch_size = config.eval.batch_size if batch_size is None else batch_size
  if max_examples < 0:
    raise errors.UserError(f"max_examples must be >= 0 (0 = the whole split), got {max_examples}.")
  process_index, process_count = _process_shard(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count, "the eval batch size (config.eval.batch_size)")
  source = _make_source(config.data, split)
  split_size = len(source)
  total = min(split_size, max_examples) if max_examples else split_size
  num_batches = total // batch_size if drop_remainder else -(-total // batch_size)
  if num_batches == 0:
    raise errors.UserError(
      f"The split {split!r} has {total} examples, fewer than one global eval batch of {batch_size} "
      "with drop_remainder=True: lower the batch size or pad instead."
    )
  num_examples = min(total, num_batches * batch_size)
  layout = _EvalLayout(source, total, num_batches, batch_size, process_index, local_batch)
  layout.labels = _check_labels(source, config, split) if "model" in config else False
  dataset = (
    grain.MapDataset.source(layout)
    .batch(local_batch, batch_fn=_eval_batch)
    .to_iter_dataset(_read_options(source, 2 * local_batch))
  )
  if num_examples < split_size:
    logging.info(
      "Eval on %s:%s covers %d of %d examples (batch %d, drop_remainder=%s, max_examples=%d).",
      config.data.dataset,
      split,
      num_examples,
      split_size,
      batch_size,
      drop_remainder,
      max_examples,
    )
  return EvalIterator(
    dataset,
    num_examples=num_examples,
    num_batches=num_batches,
    split_size=split_size,
    global_batch_size=batch_size,
    local_batch_size=local_batch,
  )
