"""Class-conditional networks: the class embedding, labels from the data, label dropout in the train step."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import input_pipeline
from diffusion_jax import runtime
from diffusion_jax import train_step
from diffusion_jax.models import unet


def tiny_config(num_classes=0):
  from configs import tiny  # noqa: PLC0415

  config = tiny.get_config()
  config.model.num_classes = num_classes
  return config


def _inputs(b=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (b, 8, 8, 1)).astype(np.float32))
  t = jnp.asarray(rng.integers(0, 20, (b,)).astype(np.int32))
  return x, t


def _params(net):
  return runtime.init_params(net, jax.random.PRNGKey(0), (8, 8, 1))


def test_unconditional_network_ignores_labels_and_keeps_its_parameters():
  net = runtime.build_network(tiny_config(0))
  params = _params(net)
  assert "class_embed" not in params
  x, t = _inputs()
  fn = runtime.model_fn(net)
  np.testing.assert_array_equal(fn(params, x, t), fn(params, x, t, cond=jnp.array([0, 1, 2, 3])))


def test_paper_parameter_count_unchanged_and_conditional_adds_the_table():
  from configs import cifar, cifar_cond  # noqa: PLC0415

  def count(config):
    net = runtime.build_network(config)
    shapes = jax.eval_shape(functools.partial(runtime.init_params, net, shape=(32, 32, 3)), jax.random.PRNGKey(0))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

  assert count(cifar.get_config()) == 35_746_307
  assert count(cifar_cond.get_config()) == 35_746_307 + 11 * 512


def test_conditional_network_uses_labels_and_none_means_the_null_class():
  net = runtime.build_network(tiny_config(10))
  assert net.null_label == 10
  params = _params(net)
  assert params["class_embed"]["embedding"].shape == (11, 4 * net.ch)
  # The near-zero-initialised layers hide the conditioning; give every parameter random weights.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [jax.random.normal(k, v.shape) * 0.2 for k, v in zip(keys, leaves)])
  x, t = _inputs()
  fn = runtime.model_fn(net)
  a = fn(params, x, t, cond=jnp.array([0, 1, 2, 3]))
  b = fn(params, x, t, cond=jnp.array([4, 5, 6, 7]))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  np.testing.assert_array_equal(fn(params, x, t), fn(params, x, t, cond=jnp.full((4,), 10)))
  with pytest.raises(ValueError, match=r"y must have shape \[B\] = \[4\]"):
    fn(params, x, t, cond=jnp.zeros((3,), jnp.int32))


def test_drop_labels_replaces_labels_at_the_given_rate():
  labels = jnp.zeros((40_000,), jnp.int32) + 3
  out = np.asarray(train_step.drop_labels(jax.random.PRNGKey(0), labels, 0.1, 10))
  assert set(np.unique(out)) == {3, 10}
  frac = np.mean(out == 10)
  sigma = np.sqrt(0.1 * 0.9 / labels.size)
  assert abs(frac - 0.1) < 4 * sigma, frac
  np.testing.assert_array_equal(train_step.drop_labels(jax.random.PRNGKey(0), labels, 0.0, 10), labels)


def test_train_step_with_full_label_dropout_trains_the_null_class():
  config = tiny_config(10)
  config.model.dropout = 0.0
  net, diffusion = runtime.build(config)
  state = train_step.create_train_state(config, net, jax.random.PRNGKey(0)).replace(step=3)
  x, _ = _inputs(8)
  rng = jax.random.PRNGKey(5)

  def run(labels, rate):
    fn = jax.jit(functools.partial(train_step.train_step, network=net, diffusion=diffusion, optim_config=config.optim,
                                   label_dropout=rate))
    return fn(state, {"image": x, "label": jnp.asarray(labels, jnp.int32)}, rng)

  dropped, m1 = run(np.arange(8) % 10, 1.0)
  null, m2 = run(np.full((8,), 10), 0.0)
  kept, m3 = run(np.arange(8) % 10, 0.0)
  np.testing.assert_array_equal(m1["loss"], m2["loss"])
  jax.tree.map(np.testing.assert_array_equal, dropped.params, null.params)
  del kept, m3


def test_digits_batches_carry_the_true_labels():
  config = tiny_config(10)
  config.data.random_flip = False  # compare with the stored images as they are
  it = input_pipeline.create_train_iterator(config, seed=0)
  images, labels = input_pipeline.load_digits("train")
  ref = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
  for _ in range(3):
    batch = next(it)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    for img, lab in zip(batch["image"], batch["label"]):
      nearest = np.argmin(np.abs(ref - img.reshape(-1)).sum(axis=1))
      assert labels[nearest] == lab
  assert input_pipeline.class_names(config.data) == tuple(str(i) for i in range(10))


def test_unconditional_batches_have_no_labels():
  batch = next(input_pipeline.create_train_iterator(tiny_config(0), seed=0))
  assert set(batch) == {"image"}


def _write_folder(root: pathlib.Path, classes):
  for c, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")


def test_folder_classes_come_from_sorted_sub_folders(tmp_path):
  _write_folder(tmp_path, ["zebra", "ant"])
  config = tiny_config(2)
  config.data.dataset = "folder"
  config.data.data_dir = str(tmp_path)
  assert input_pipeline.class_names(config.data) == ("ant", "zebra")
  batch = next(input_pipeline.create_train_iterator(config, seed=0))
  u8 = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)[..., 0, 0, 0]
  # ant images were written with value 40·1 + i (class index 1 in writing order), zebra with 0 + i.
  np.testing.assert_array_equal(batch["label"], np.where(u8 >= 40, 0, 1))


def test_conditional_config_on_unlabelled_or_mismatched_data_is_refused(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / f"{i}.png")
  config = tiny_config(2)
  config.data.dataset = "folder"
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"has no class labels\. Put the images in one sub-folder per class"):
    input_pipeline.create_train_iterator(config, seed=0)
  with pytest.raises(ValueError, match=r"num_classes=3, but digits:train has 10 classes.*num_classes=10"):
    input_pipeline.create_train_iterator(tiny_config(3), seed=0)
