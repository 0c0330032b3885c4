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
from diffusion_jax.conditioning import ClassLabels


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
  from configs import cifar  # noqa: PLC0415
  from configs import cifar_cond  # noqa: PLC0415

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
  out = np.asarray(ClassLabels(labels, 10).drop(jax.random.PRNGKey(0), 0.1).value)
  assert set(np.unique(out)) == {3, 10}
  frac = np.mean(out == 10)
  sigma = np.sqrt(0.1 * 0.9 / labels.size)
  assert abs(frac - 0.1) < 4 * sigma, frac
  np.testing.assert_array_equal(ClassLabels(labels, 10).drop(jax.random.PRNGKey(0), 0.0).value, labels)
  np.testing.assert_array_equal(ClassLabels(labels, 10).null_like().value, np.full(labels.shape, 10))


def test_train_step_with_full_label_dropout_trains_the_null_class():
  config = tiny_config(10)
  config.model.dropout = 0.0
  net, diffusion = runtime.build(config)
  state = train_step.create_train_state(config, net, jax.random.PRNGKey(0)).replace(step=3)
  x, _ = _inputs(8)
  rng = jax.random.PRNGKey(5)

  def run(labels, rate):
    fn = jax.jit(
      functools.partial(
        train_step.train_step, network=net, diffusion=diffusion, optim_config=config.optim, label_dropout=rate
      )
    )
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


# ----------------------------------------------------------------------------
# Guided sampling.
# ----------------------------------------------------------------------------


def _toy_conditional_model(out_channels=1):
  """A deterministic toy network out(x, t, c) whose output depends on the label (K = 3, null = 3)."""
  a = jnp.asarray([0.3, -0.2, 0.5, 0.1], jnp.float32)
  b = jnp.asarray([0.02, 0.05, -0.03, 0.0], jnp.float32)

  def model_fn(x_t, t, cond):
    out = a[cond][:, None, None, None] * x_t + b[cond][:, None, None, None] * t[:, None, None, None] / 20.0
    if out_channels > 1:  # learned variance: a second block of channels in [-1, 1]
      out = jnp.concatenate([out, jnp.tanh(out + 0.1 * cond[:, None, None, None])], axis=-1)
    return out

  return model_fn


@pytest.mark.parametrize(
  "mean_type,var_type", [("eps", "fixedlarge"), ("xstart", "fixedsmall"), ("v", "fixedlarge"), ("eps", "learned_range")]
)
def test_guided_output_equals_the_formula_for_every_parametrisation(mean_type, var_type):
  from diffusion_jax import diffusion as diffusion_lib  # noqa: PLC0415
  from diffusion_jax import samplers  # noqa: PLC0415
  from diffusion_jax import schedules  # noqa: PLC0415

  diffusion = diffusion_lib.GaussianDiffusion.create(
    schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=20),
    model_mean_type=mean_type,
    model_var_type=var_type,
    loss_type="mse" if var_type != "learned_range" else "kl",
  )
  learned = var_type == "learned_range"
  toy = _toy_conditional_model(2 if learned else 1)
  s, null = 2.5, 3
  cond = jnp.asarray([0, 1, 2, 1], jnp.int32)

  def by_formula(x_t, t):  # guidance written out: the mean part guided, the variance part the conditional pass's
    c, u = toy(x_t, t, cond), toy(x_t, t, jnp.full_like(cond, null))
    mean = u[..., :1] + s * (c[..., :1] - u[..., :1])
    return jnp.concatenate([mean, c[..., 1:]], axis=-1) if learned else mean

  kw = dict(
    sampler=samplers.resolve("ancestral", num_timesteps=diffusion.num_timesteps, num_steps=5), clip_denoised=False
  )
  rng, idx, shape = jax.random.PRNGKey(0), jnp.arange(4), (4, 8, 8, 1)
  guided = samplers.sample(diffusion, toy, rng, idx, shape, cond=cond, guidance_scale=s, null_label=null, **kw)
  want = samplers.sample(diffusion, by_formula, rng, idx, shape, **kw)
  np.testing.assert_allclose(guided["samples"], want["samples"], rtol=1e-5, atol=1e-5)
  # Scale 1 is the conditional model; scale 0 the unconditional (null-label) one.
  one = samplers.sample(diffusion, toy, rng, idx, shape, cond=cond, guidance_scale=1.0, **kw)["samples"]
  traced_one = jax.jit(
    lambda g: samplers.sample(diffusion, toy, rng, idx, shape, cond=cond, guidance_scale=g, null_label=null, **kw)[
      "samples"
    ]
  )(1.0)
  np.testing.assert_allclose(traced_one, one, rtol=1e-5, atol=1e-5)
  if not learned:  # (a learned variance keeps the conditional pass's variance at every scale)
    zero = samplers.sample(diffusion, toy, rng, idx, shape, cond=cond, guidance_scale=0.0, null_label=null, **kw)
    uncond = samplers.sample(diffusion, toy, rng, idx, shape, cond=jnp.full_like(cond, null), **kw)
    np.testing.assert_allclose(zero["samples"], uncond["samples"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def cond_workdir(tmp_path_factory):
  from diffusion_jax import checkpointing  # noqa: PLC0415
  from diffusion_jax import workdirs  # noqa: PLC0415

  config = tiny_config(10)
  net = runtime.build_network(config)
  params = _params(net)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [np.asarray(jax.random.normal(k, v.shape) * 0.2) for k, v in zip(keys, leaves)])
  path = tmp_path_factory.mktemp("cond_model")
  checkpointing.save_model_checkpoint(path, config=config, params=params, ema_params=params, step=4)
  workdirs.write_class_names(path, [f"digit{i}" for i in range(10)])
  return path


def test_sample_fn_takes_labels_as_ints_names_or_arrays(cond_workdir):
  from diffusion_jax import sampling  # noqa: PLC0415

  model = sampling.load_model(cond_workdir)
  assert model.num_classes == 10 and model.class_names[3] == "digit3" and "classes=10" in repr(model)
  rng = jax.random.PRNGKey(0)
  kw = dict(sampler="ddim", num_steps=4, progress=False)
  mixed = sampling.sample_fn(model, 6, rng, labels=[3, 5, 3, 7, 7, 1], guidance_scale=2.0, **kw)
  threes = sampling.sample_fn(model, 6, rng, labels=3, guidance_scale=2.0, **kw)
  named = sampling.sample_fn(model, 6, rng, labels="digit3", guidance_scale=2.0, batch_size=2, **kw)
  # Sample i depends only on (rng, i, its label), whatever the batch size.
  np.testing.assert_array_equal(mixed[[0, 2]], threes[[0, 2]])
  np.testing.assert_array_equal(named, threes)
  assert not np.array_equal(mixed[1], threes[1])
  unguided = sampling.sample_fn(model, 6, rng, labels=3, **kw)
  assert not np.array_equal(unguided, threes)
  # Default labels: sample i is of class i mod K.
  np.testing.assert_array_equal(
    sampling.sample_fn(model, 4, rng, **kw), sampling.sample_fn(model, 4, rng, labels=[0, 1, 2, 3], **kw)
  )
  with pytest.raises(ValueError, match="Unknown class name 'cat'; the model's classes are digit0, digit1"):
    sampling.sample_fn(model, 2, rng, labels="cat", **kw)
  with pytest.raises(ValueError, match=r"Class label 10 is outside \[0, 10\)"):
    sampling.sample_fn(model, 2, rng, labels=10, **kw)
  with pytest.raises(ValueError, match="labels has 3 entries for 2 samples"):
    sampling.sample_fn(model, 2, rng, labels=[1, 2, 3], **kw)


def test_unconditional_models_refuse_labels_and_guidance(tmp_path):
  from diffusion_jax import checkpointing  # noqa: PLC0415
  from diffusion_jax import sampling  # noqa: PLC0415

  config = tiny_config(0)
  params = _params(runtime.build_network(config))
  checkpointing.save_model_checkpoint(tmp_path, config=config, params=params, ema_params=params, step=1)
  model = sampling.load_model(tmp_path)
  with pytest.raises(ValueError, match="this model is unconditional: leave labels=None"):
    sampling.sample_fn(model, 2, jax.random.PRNGKey(0), labels=3, num_steps=2, sampler="ddim", progress=False)
  with pytest.raises(ValueError, match="guidance_scale=3.0 needs a class-conditional model"):
    sampling.sample_fn(model, 2, jax.random.PRNGKey(0), guidance_scale=3.0, num_steps=2, sampler="ddim", progress=False)


def test_mode_sample_writes_one_row_per_class_and_stores_labels(cond_workdir, tmp_path):
  import shutil  # noqa: PLC0415

  from diffusion_jax import sampling  # noqa: PLC0415
  from diffusion_jax import workdirs  # noqa: PLC0415
  from diffusion_jax.evaluation import sample_export  # noqa: PLC0415

  run = tmp_path / "run"
  shutil.copytree(cond_workdir, run)
  config = workdirs.read_config(run)
  config.sampling.sampler, config.sampling.num_steps = "ddim", 3
  config.sampling.num_samples, config.sampling.batch_size, config.sampling.guidance_scale = 20, 8, 2.0
  out = sampling.sample_to_workdir(config, run)
  assert out.name == "step_4_ddim_3steps_eta0_cfg2"
  images, labels = sample_export.read_sample_chunks(sorted(out.glob("samples_*.npz")), with_labels=True)
  np.testing.assert_array_equal(labels, np.arange(20) % 10)
  grid = np.asarray(Image.open(out / "grid.png"))
  scale = 64 // 8
  cell = 8 * scale + 2
  assert grid.shape[:2] == (10 * cell + 2, 2 * cell + 2)  # 10 rows (classes) of 2 samples
  # Row c, column j holds the j-th sample of class c, i.e. sample 10·j + c.
  np.testing.assert_array_equal(
    grid[2 + 3 * cell : 2 + 3 * cell + 8 * scale : scale, 2 + cell : 2 + cell + 8 * scale : scale], images[13, :, :, 0]
  )
  config.sampling.labels = "digit7,2"
  config.sampling.num_samples = 2
  out2 = sampling.sample_to_workdir(config, run)
  assert out2.name == "step_4_ddim_3steps_eta0_cfg2_labels-digit7-2"
  _, labels2 = sample_export.read_sample_chunks(sorted(out2.glob("samples_*.npz")), with_labels=True)
  np.testing.assert_array_equal(labels2, [7, 2])


def test_bits_per_dim_of_a_conditional_model_use_the_true_labels(cond_workdir):
  from diffusion_jax import sampling  # noqa: PLC0415
  from diffusion_jax.evaluation import bpd  # noqa: PLC0415

  model = sampling.load_model(cond_workdir)
  rng = jax.random.PRNGKey(7)
  result = bpd.compute_bpd(model, model.config, rng, batch_size=8, max_examples=8, drop_remainder=True, progress=False)
  assert result["conditional"] and result["num_examples"] == 8
  images, labels = input_pipeline.load_digits(model.config.data.eval_split)
  x = jnp.asarray(images[:8].astype(np.float32) / 127.5 - 1.0)
  fn = runtime.bind(runtime.model_fn(model.network), model.params)

  def total(y):
    out = model.diffusion.calc_bpd_loop(lambda x_t, t: fn(x_t, t, y), x, jax.random.fold_in(rng, 0))
    return float(np.mean(out["total_bpd"]))

  assert result["total_bpd"] == pytest.approx(total(jnp.asarray(labels[:8], jnp.int32)), rel=1e-5)
  assert result["total_bpd"] != pytest.approx(total(jnp.full((8,), 10, jnp.int32)), rel=1e-5)  # not the null class
