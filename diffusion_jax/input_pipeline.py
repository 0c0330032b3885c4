"""Input pipelines: data sources → per-process shards of global batches.

The sources (tensorflow-datasets, image folders, the embedded digits) are
`data_sources`; its public names (`load_digits`, `get_dataset_info`,
`class_names`, `DatasetInfo`, `DATASETS`, …) are reachable here as well. Inside
the library images are float32 in [-1, 1]: `x / 127.5 - 1`.

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
module or `data_sources`; tfds is imported when a tfds dataset is opened.
"""

from __future__ import annotations

import collections.abc
import os

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from diffusion_jax import data_sources
from diffusion_jax import errors

# The sources' public names, for the callers of this module.
DATASETS = data_sources.DATASETS
TFDS_DATASETS = data_sources.TFDS_DATASETS
IMAGE_EXTENSIONS = data_sources.IMAGE_EXTENSIONS
DIGITS_PATH = data_sources.DIGITS_PATH
DIGITS_SPLITS = data_sources.DIGITS_SPLITS
DatasetInfo = data_sources.DatasetInfo
load_digits = data_sources.load_digits
get_dataset_info = data_sources.get_dataset_info
class_names = data_sources.class_names

Batch = dict[str, np.ndarray]


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
  num_threads = 0 if isinstance(source, data_sources.ArraySource) else min(16, os.cpu_count() or 1)
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
  source = data_sources.make_source(config.data, config.data.train_split)
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
  source = data_sources.make_source(config.data, split)
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
