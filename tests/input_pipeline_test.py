"""Tests for diffusion_jax.input_pipeline and its sources (diffusion_jax.data_sources): sources, sharding, determinism,
resume, eval coverage."""

import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import config_base
from diffusion_jax import input_pipeline


def _config(dataset="digits", *, image_size=8, channels=1, batch_size=8, random_flip=True, data_dir=""):
  config = config_base.get_base_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.channels = channels
  config.data.random_flip = random_flip
  config.data.data_dir = data_dir
  config.training.batch_size = batch_size
  config.eval.batch_size = batch_size
  return config


def _take(iterator, num_batches):
  """The images of the next `num_batches` batches, concatenated: float32 [n·b, H, W, C]."""
  return np.concatenate([next(iterator)["image"] for _ in range(num_batches)])


def _to_uint8(images):
  return np.rint((images + 1.0) * 127.5).astype(np.uint8)


# -----------------------------------------------------------------------------
# The embedded digits.


def test_digits_file():
  train_images, train_labels = input_pipeline.load_digits("train")
  test_images, test_labels = input_pipeline.load_digits("test")
  assert train_images.shape == (1500, 8, 8, 1) and test_images.shape == (297, 8, 8, 1)
  assert train_images.dtype == np.uint8 and train_labels.shape == (1500,) and test_labels.shape == (297,)
  # 0..16 scaled by 255/16 and rounded: 17 levels from 0 to 255.
  levels = np.rint(np.arange(17) * 255 / 16).astype(np.uint8)
  assert set(np.unique(train_images)) <= set(levels) and train_images.max() == 255 and train_images.min() == 0
  assert set(np.unique(train_labels)) == set(range(10)) and set(np.unique(test_labels)) == set(range(10))
  with np.load(input_pipeline.DIGITS_PATH) as data:
    index = np.concatenate([data["train_index"], data["test_index"]])
  np.testing.assert_array_equal(np.sort(index), np.arange(1797))  # disjoint, complete


def test_digits_match_scikit_learn():
  from sklearn import datasets  # noqa: PLC0415

  original = datasets.load_digits()
  with np.load(input_pipeline.DIGITS_PATH) as data:
    for split in input_pipeline.DIGITS_SPLITS:
      index = data[f"{split}_index"]
      np.testing.assert_array_equal(data[f"{split}_labels"], original.target[index])
      expected = np.rint(original.images[index] * 255 / 16).astype(np.uint8)[..., None]
      np.testing.assert_array_equal(data[f"{split}_images"], expected)


def test_digits_train_batches():
  config = _config()
  info = input_pipeline.get_dataset_info(config.data, "train")
  assert info == input_pipeline.DatasetInfo(1500, (8, 8, 1))
  assert input_pipeline.get_dataset_info(config.data, "test").num_examples == 297
  batch = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))
  assert set(batch) == {"image"}
  image = batch["image"]
  assert image.shape == (8, 8, 8, 1) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() == -1.0 and image.max() == 1.0
  # Exactly x / 127.5 - 1 of a training image (possibly flipped).
  train_images, _ = input_pipeline.load_digits("train")
  candidates = {im.tobytes() for im in train_images} | {im[:, ::-1].copy().tobytes() for im in train_images}
  np.testing.assert_array_equal(_to_uint8(image).astype(np.float32) / 127.5 - 1.0, image)
  assert all(im.tobytes() in candidates for im in _to_uint8(image))


def test_digits_resized_to_rgb():
  config = _config(image_size=16, channels=3)
  image = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))["image"]
  assert image.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray as RGB


# -----------------------------------------------------------------------------
# Training iterator: determinism, flips, sharding, resume.


def test_same_seed_same_batches_and_different_seeds_differ():
  config = _config()
  first = _take(input_pipeline.create_train_iterator(config, seed=3, process_count=1, process_index=0), 5)
  again = _take(input_pipeline.create_train_iterator(config, seed=3, process_count=1, process_index=0), 5)
  other = _take(input_pipeline.create_train_iterator(config, seed=4, process_count=1, process_index=0), 5)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_epochs_are_permutations():
  config = _config(batch_size=300, random_flip=False)
  iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  train_images, _ = input_pipeline.load_digits("train")
  expected = sorted(im.tobytes() for im in train_images)
  epoch1, epoch2 = _to_uint8(_take(iterator, 5)), _to_uint8(_take(iterator, 5))
  assert sorted(im.tobytes() for im in epoch1) == expected
  assert sorted(im.tobytes() for im in epoch2) == expected
  assert not np.array_equal(epoch1, epoch2)  # reshuffled


def test_flip_rate_is_about_half():
  kwargs = dict(seed=7, process_index=0, process_count=1)
  flipped = _take(input_pipeline.create_train_iterator(_config(batch_size=250), **kwargs), 4)
  plain = _take(input_pipeline.create_train_iterator(_config(batch_size=250, random_flip=False), **kwargs), 4)
  asymmetric = np.any(plain != plain[:, :, ::-1], axis=(1, 2, 3))
  is_plain = np.all(flipped == plain, axis=(1, 2, 3))
  is_mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(is_plain | is_mirrored)  # flips change nothing else, and not the order
  rate = is_mirrored[asymmetric].mean()
  assert 0.45 < rate < 0.55, rate


def test_processes_read_disjoint_shards_of_the_same_stream():
  config = _config()
  single = _take(input_pipeline.create_train_iterator(config, process_index=0, process_count=1), 12)
  shards = []
  for process_index in range(2):
    iterator = input_pipeline.create_train_iterator(config, process_index=process_index, process_count=2)
    batch = next(iterator)["image"]
    assert batch.shape == (4, 8, 8, 1)  # the global batch of 8 split in two
    shards.append(np.concatenate([batch, _take(iterator, 11)]))
  # Process p reads rows [4p, 4p + 4) of each global batch of 8: concatenated per batch in process order they are
  # the 1-process stream, flips included.
  joined = np.concatenate([s.reshape((12, 4) + s.shape[1:]) for s in shards], axis=1).reshape(single.shape)
  np.testing.assert_array_equal(joined, single)


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    input_pipeline.create_train_iterator(_config(batch_size=9), process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    input_pipeline.create_train_iterator(_config(), process_index=2, process_count=2)


def test_bad_seed():
  with pytest.raises(ValueError, match="seed"):
    input_pipeline.create_train_iterator(_config(), seed=-1, process_index=0, process_count=1)


@pytest.mark.parametrize("process_index", [0, 1])
def test_state_restores_exact_continuation(process_index):
  config = _config()
  kwargs = dict(seed=5, process_index=process_index, process_count=2)
  iterator = input_pipeline.create_train_iterator(config, **kwargs)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 200)  # crosses epoch boundaries (750 records per process and epoch)
  resumed = input_pipeline.create_train_iterator(config, **kwargs)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 200), expected)


def test_state_of_another_seed_is_rejected():
  config = _config()
  iterator = input_pipeline.create_train_iterator(config, seed=1, process_index=0, process_count=1)
  next(iterator)
  other = input_pipeline.create_train_iterator(config, seed=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Sampler"):
    other.set_state(iterator.get_state())


def test_orbax_checkpoint_restores_exact_continuation(tmp_path):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  config = _config()
  kwargs = dict(seed=11, process_index=0, process_count=1)
  iterator = input_pipeline.create_train_iterator(config, **kwargs)
  _take(iterator, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(data=input_pipeline.train_checkpoint_args(iterator)))
    expected = _take(iterator, 20)  # the position was taken at save(), not when the write finished
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 4
    fresh = input_pipeline.create_train_iterator(config, **kwargs)
    restored = manager.restore(4, args=ocp.args.Composite(data=input_pipeline.train_restore_args(fresh)))
  assert restored.data is fresh
  np.testing.assert_array_equal(_take(fresh, 20), expected)


# -----------------------------------------------------------------------------
# Eval iterator.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pads_and_masks_every_example_exactly_once(process_count):
  config = _config()
  test_images, _ = input_pipeline.load_digits("test")
  shards = []
  for process_index in range(process_count):
    data = input_pipeline.create_eval_iterator(
      config, split="test", batch_size=16, process_index=process_index, process_count=process_count
    )
    assert (data.num_examples, data.num_batches, data.split_size, len(data)) == (297, 19, 297, 19)
    batches = list(data)
    assert len(batches) == 19
    assert all(b["image"].shape == (16 // process_count, 8, 8, 1) and b["mask"].dtype == bool for b in batches)
    shards.append(batches)
  # Global batch k is the processes' local batches side by side; real examples come in the split's order.
  images = np.concatenate([np.concatenate([s[k]["image"] for s in shards]) for k in range(19)])
  mask = np.concatenate([np.concatenate([s[k]["mask"] for s in shards]) for k in range(19)])
  assert mask.sum() == 297 and mask[:297].all() and not mask[297:].any()
  np.testing.assert_array_equal(_to_uint8(images[mask]), test_images)
  assert len(list(data)) == 19  # each iter() is a new pass


def test_eval_drop_remainder_and_max_examples():
  config = _config()
  data = input_pipeline.create_eval_iterator(
    config, split="test", batch_size=16, drop_remainder=True, process_index=0, process_count=2
  )
  assert (data.num_examples, data.num_batches) == (288, 18)
  assert all(b["mask"].all() for b in data)
  capped = input_pipeline.create_eval_iterator(
    config, split="test", batch_size=16, max_examples=20, process_index=0, process_count=1
  )
  assert (capped.num_examples, capped.num_batches) == (20, 2)
  assert sum(b["mask"].sum() for b in capped) == 20
  with pytest.raises(ValueError, match="fewer than one global eval batch"):
    input_pipeline.create_eval_iterator(
      config, split="test", batch_size=16, drop_remainder=True, max_examples=10, process_index=0, process_count=1
    )
  config.data.eval_split = ""
  with pytest.raises(ValueError, match="eval_split"):
    input_pipeline.create_eval_iterator(config)


# -----------------------------------------------------------------------------
# Config errors.


def test_unknown_dataset_lists_valid_names():
  config = _config("cifar100")
  with pytest.raises(ValueError, match="Unknown dataset 'cifar100'.*cifar10.*digits.*folder.*lsun_cat"):
    input_pipeline.get_dataset_info(config.data, "train")


def test_bad_channels():
  with pytest.raises(ValueError, match="channels"):
    input_pipeline.get_dataset_info(_config(channels=2).data, "train")


# -----------------------------------------------------------------------------
# Image folders.


def _write_folder(root: pathlib.Path) -> pathlib.Path:
  """Seven images of several sizes, formats and modes, one in a sub-folder, plus non-images."""
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  # 40×20 (w×h): blue left, green center, red right; the center crop is all green.
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :10, 2] = 255
  wide[:, 10:30, 1] = 255
  wide[:, 30:, 0] = 255
  Image.fromarray(wide).save(root / "a_wide.png")
  Image.fromarray(rng.integers(0, 256, (64, 48, 3), np.uint8)).save(root / "b_tall.jpg", quality=90)
  Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)).save(root / "c_gray.png")
  Image.fromarray(rng.integers(0, 256, (33, 33, 4), np.uint8)).save(root / "d_alpha.png")
  Image.fromarray(rng.integers(0, 256, (12, 30, 3), np.uint8)).save(root / "e_small.webp")
  Image.fromarray(rng.integers(0, 256, (100, 80, 3), np.uint8)).save(root / "sub" / "f.JPEG")
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).convert("P").save(root / "sub" / "g.gif")
  (root / "notes.txt").write_text("not an image")
  (root / ".hidden.png").write_bytes(b"ignored")
  return root


def test_folder_images_of_any_size(tmp_path):
  root = _write_folder(tmp_path / "images")
  config = _config("folder", image_size=16, channels=3, batch_size=7, random_flip=False, data_dir=str(root))
  assert input_pipeline.get_dataset_info(config.data, "train") == input_pipeline.DatasetInfo(7, (16, 16, 3))
  data = input_pipeline.create_eval_iterator(config, split="train", batch_size=7, process_index=0, process_count=1)
  (batch,) = list(data)
  assert batch["image"].shape == (7, 16, 16, 3) and batch["mask"].all()
  wide = _to_uint8(batch["image"][0])  # files are sorted: a_wide.png first
  np.testing.assert_array_equal(wide[..., 1], 255)
  np.testing.assert_array_equal(wide[..., [0, 2]], 0)
  train = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))["image"]
  assert train.shape == (7, 16, 16, 3) and -1.0 <= train.min() and train.max() <= 1.0
  config.data.channels = 1
  gray = next(iter(input_pipeline.create_eval_iterator(config, split="train", process_index=0, process_count=1)))
  assert gray["image"].shape == (7, 16, 16, 1)


def test_folder_split_subfolders(tmp_path):
  root = tmp_path / "images"
  for split, count in [("train", 3), ("test", 2)]:
    (root / split).mkdir(parents=True)
    for i in range(count):
      Image.new("RGB", (10, 10), (i, i, i)).save(root / split / f"{i}.png")
  config = _config("folder", image_size=8, channels=3, data_dir=str(root))
  assert input_pipeline.get_dataset_info(config.data, "train").num_examples == 3
  assert input_pipeline.get_dataset_info(config.data, "test").num_examples == 2
  with pytest.raises(ValueError, match="no sub-folder 'validation'"):
    input_pipeline.get_dataset_info(config.data, "validation")


def test_folder_corrupt_files_are_named(tmp_path, caplog):
  root = _write_folder(tmp_path / "images")
  (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  good = (root / "b_tall.jpg").read_bytes()
  (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
  config = _config("folder", image_size=8, channels=3, data_dir=str(root))
  with pytest.raises(ValueError, match=r"(?s)2 of 9 image files.*broken\.png.*truncated\.jpg.*skip_corrupt"):
    input_pipeline.get_dataset_info(config.data, "train")
  config.data.skip_corrupt = True
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(config.data, "train")
  assert info.num_examples == 7
  assert "2 of 9 image files" in caplog.text and "broken.png" in caplog.text and "Skipping these 2 files" in caplog.text
  batch = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 8, 8, 3)


def test_folder_lists_at_most_twenty_corrupt_files(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for i in range(25):
    (root / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
  config = _config("folder", image_size=8, channels=3, data_dir=str(root))
  with pytest.raises(ValueError, match="25 of 25") as error:
    input_pipeline.get_dataset_info(config.data, "train")
  assert "bad19.jpg" in str(error.value) and "bad20.jpg" not in str(error.value) and "5 more" in str(error.value)
  config.data.skip_corrupt = True
  with pytest.raises(ValueError, match="None of the 25"):
    input_pipeline.get_dataset_info(config.data, "train")


def test_folder_empty_or_missing(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="No image files"):
    input_pipeline.get_dataset_info(_config("folder", data_dir=str(tmp_path / "empty")).data, "train")
  with pytest.raises(ValueError, match="not a folder"):
    input_pipeline.get_dataset_info(_config("folder", data_dir=str(tmp_path / "missing")).data, "train")
  with pytest.raises(ValueError, match="data_dir"):
    input_pipeline.get_dataset_info(_config("folder").data, "train")


# -----------------------------------------------------------------------------
# tensorflow-datasets (mocked: nothing is downloaded).


def test_cifar10_through_mocked_tfds_data_source():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  config = _config("cifar10", image_size=32, channels=3, batch_size=4)
  with tfds.testing.mock_data(num_examples=10):
    assert input_pipeline.get_dataset_info(config.data, "train") == input_pipeline.DatasetInfo(10, (32, 32, 3))
    raw = tfds.data_source("cifar10", split="train", download=False)
    raw_images = np.stack([raw[i]["image"] for i in range(10)])
    iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    image = _take(iterator, 5)  # two epochs
    data = input_pipeline.create_eval_iterator(config, split="test", batch_size=4, process_index=0, process_count=1)
    batches = list(data)
  assert image.shape == (20, 32, 32, 3) and image.dtype == np.float32
  candidates = {im.tobytes() for im in raw_images} | {im[:, ::-1].copy().tobytes() for im in raw_images}
  assert all(im.tobytes() in candidates for im in _to_uint8(image))
  assert (data.num_examples, data.num_batches) == (10, 3)
  assert sum(b["mask"].sum() for b in batches) == 10


def test_lsun_through_mocked_tfds_is_center_cropped_and_resized():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  config = _config("lsun_bedroom", image_size=16, channels=3, batch_size=4)
  with tfds.testing.mock_data(num_examples=4):
    batch = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 16, 16, 3)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  config = _config("cifar10", image_size=32, channels=3, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"(?s)not prepared.*tfds build cifar10 --file_format=array_record"):
    input_pipeline.get_dataset_info(config.data, "train")
  config.data.dataset = "celeb_a_hq"
  with pytest.raises(ValueError, match=r"(?s)manual.*tfds build celeb_a_hq/256 --manual_dir"):
    input_pipeline.get_dataset_info(config.data, "train")


def test_import_does_not_import_tensorflow():
  code = "import sys, diffusion_jax.input_pipeline; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
