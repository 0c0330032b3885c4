"""Tests of the optimizer, the train step and the training loop on the tiny config."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import checkpointing
from diffusion_jax import optimizer
from diffusion_jax import runtime
from diffusion_jax import train
from diffusion_jax import train_step
from diffusion_jax import workdirs

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
  return tiny_config()


def _batch(config, seed=0, n=None):
  n = n or config.training.batch_size
  rng = np.random.default_rng(seed)
  shape = (n, config.data.image_size, config.data.image_size, config.data.channels)
  return {"image": rng.uniform(-1, 1, shape).astype(np.float32)}


def _tf1_adam_reference(grads_seq, lr_seq, b1, b2, eps):
  """tf.train.AdamOptimizer in float64: lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ); θ −= lr_t·m/(√v + ε)."""
  m = np.zeros_like(grads_seq[0], dtype=np.float64)
  v = np.zeros_like(m)
  theta = np.zeros_like(m)
  for t, (g, lr) in enumerate(zip(grads_seq, lr_seq), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    theta = theta - lr_t * m / (np.sqrt(v) + eps)
  return theta


def test_epsilon_hat_adam_matches_tf1_formula(config):
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(5,)) * 10.0 ** rng.integers(-9, 1) for _ in range(6)]
  oc = config.optim.to_dict()
  oc.update(learning_rate=0.1, warmup_steps=3, eps=1e-3)  # a large ε makes the ε-hat difference visible
  import ml_collections

  oc = ml_collections.ConfigDict(oc)
  tx = optimizer.create_optimizer(oc)
  params = jnp.zeros(5)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
  lrs = [0.1 * min(i / 3, 1.0) for i in range(6)]
  expected = _tf1_adam_reference(grads, lrs, oc.b1, oc.b2, oc.eps)
  np.testing.assert_allclose(np.asarray(params), expected, rtol=2e-5, atol=1e-7)
  # optax's Adam (ε after bias correction) is measurably different with this ε.
  assert not np.allclose(expected, _tf1_adam_reference(grads, lrs, oc.b1, oc.b2, oc.eps * np.sqrt(1 - oc.b2)))


def test_learning_rate_warmup_starts_at_zero(config):
  sched = optimizer.learning_rate_schedule(config.optim)
  lr, w = config.optim.learning_rate, config.optim.warmup_steps
  np.testing.assert_allclose([sched(0), sched(1), sched(w), sched(10 * w)], [0.0, lr / w, lr, lr], rtol=1e-6)


def test_cosine_decay_follows_the_warmup_and_ends_at_zero(config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.optim.update(learning_rate=1e-3, warmup_steps=100, lr_decay="cosine", decay_steps=1100)
  sched = optimizer.learning_rate_schedule(config.optim)
  steps = [0, 50, 100, 350, 600, 850, 1100, 5000]
  # lr·s/w in the warmup, then lr·(1 + cos(π·(s − w)/(D − w)))/2, 0 from D on.
  expected = [0.0, 5e-4, 1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 5e-4, 1e-3 * (1 + np.cos(3 * np.pi / 4)) / 2, 0, 0]
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=1e-5, atol=1e-12)
  # With a floor: lr_end + (lr − lr_end)·(1 + cos(π·(s − w)/(D − w)))/2, lr_end from D on.
  config.optim.end_learning_rate = 2e-4
  sched = optimizer.learning_rate_schedule(config.optim)
  floor = [2e-4 + 8e-4 * (1 + np.cos(a * np.pi / 4)) / 2 for a in (1, 2, 3)]
  expected = [0.0, 5e-4, 1e-3, *floor, 2e-4, 2e-4]
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=1e-5, atol=1e-12)
  config.optim.end_learning_rate = 2e-3
  with pytest.raises(ValueError, match=r"optim.end_learning_rate=0.002 must lie in \[0, optim.learning_rate=0.001\]"):
    optimizer.learning_rate_schedule(config.optim)
  config.optim.end_learning_rate = 0.0
  config.optim.decay_steps = 100
  with pytest.raises(ValueError, match=r"optim.decay_steps=100 must exceed optim.warmup_steps=100"):
    optimizer.learning_rate_schedule(config.optim)
  config.optim.lr_decay = "linear"
  with pytest.raises(ValueError, match=r"optim.lr_decay must be one of \('constant', 'cosine'\)"):
    optimizer.learning_rate_schedule(config.optim)


def _setup(config, devices):
  mesh = runtime.make_mesh(devices=devices)
  diffusion = runtime.build_diffusion(config)
  model = runtime.build_network(config, diffusion)
  state = train_step.init_state_sharded(config, model, mesh, jax.random.PRNGKey(0))
  sharding = jax.tree.map(lambda x: x.sharding, state)
  step = train_step.jit_train_step(mesh, model, diffusion, config.optim, sharding)
  return mesh, state, step


def _run_steps(config, devices, num_steps):
  mesh, state, step = _setup(config, devices)
  rng = jax.random.PRNGKey(1)
  all_metrics = []
  for i in range(num_steps):
    batch = {"image": jax.device_put(_batch(config, seed=i)["image"], NamedSharding(mesh, P("data")))}
    state, metrics = step(state, batch, rng)
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


def test_steps_update_params_and_ema_by_the_formulas(config):
  mesh, state0, step = _setup(config, jax.devices())
  shardings = jax.tree.map(lambda x: x.sharding, state0)
  params0 = jax.tree.map(np.array, state0.params)  # copies: state0 is donated below
  rng = jax.random.PRNGKey(1)
  batch = {"image": jax.device_put(_batch(config)["image"], NamedSharding(mesh, P("data")))}
  state1, m1 = step(state0, batch, rng)
  state1 = jax.device_get(state1)
  assert np.isfinite(m1["loss"]) and float(m1["loss"]) > 0
  assert float(m1["lr"]) == 0.0
  # lr = 0 at step 0: parameters unchanged; EMA copies them (decay ~0 before the first step).
  jax.tree.map(np.testing.assert_array_equal, state1.params, params0)
  jax.tree.map(np.testing.assert_array_equal, state1.ema_params, params0)
  ema1 = jax.tree.map(np.array, state1.ema_params)
  state2, m2 = step(jax.device_put(state1, shardings), batch, rng)
  state2 = jax.device_get(state2)
  assert int(state2.step) == 2
  np.testing.assert_allclose(float(m2["lr"]), config.optim.learning_rate / config.optim.warmup_steps, rtol=1e-6)
  # Layers behind the near-zero-initialised convolutions get gradients far below Adam's ε,
  # so only most (not all) tensors move measurably in one step.
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), state2.params, params0))
  assert sum(changed) > 0.5 * len(changed)
  assert not np.array_equal(state2.params["conv_out"]["kernel"], params0["conv_out"]["kernel"])
  d = config.optim.ema_decay
  jax.tree.map(
    lambda e, e1, p: np.testing.assert_allclose(e, d * e1 + (1 - d) * p, rtol=1e-6, atol=1e-7),
    state2.ema_params,
    ema1,
    state2.params,
  )
  for q in range(4):
    assert np.isfinite(m2[f"loss_q{q}"])


def test_grouped_clipping_averages_clipped_group_gradients(config):
  """clip_groups=G equals clipping each sub-batch's gradient separately, then averaging."""
  cfg = tiny_config()
  cfg.optim.clip_groups = 2
  cfg.optim.grad_clip = 0.05  # small enough that clipping is active
  cfg.model.dropout = 0.0
  diffusion = runtime.build_diffusion(cfg)
  model = runtime.build_network(cfg, diffusion)
  state = train_step.create_train_state(cfg, model, jax.random.PRNGKey(0))
  state = state.replace(step=5)  # past the first step so lr > 0
  batch = {"image": jnp.asarray(_batch(cfg)["image"])}
  rng = jax.random.PRNGKey(3)
  new_state, metrics = jax.jit(
    functools.partial(train_step.train_step, network=model, diffusion=diffusion, optim_config=cfg.optim)
  )(state, batch, rng)

  # Independent recomputation: the same t and noise, per-group gradients, clip, average.
  b = batch["image"].shape[0]
  t_rng, noise_rng, _ = jax.random.split(jax.random.fold_in(rng, 5), 3)
  t = jax.random.randint(t_rng, (b,), 0, diffusion.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, batch["image"].shape)

  @jax.jit
  @jax.grad
  def group_grad(params, x, tt, nz):
    fn = lambda x_t, t_: model.apply({"params": params}, x_t, t_, train=False)  # noqa: E731
    return jnp.mean(diffusion.training_losses(fn, x, tt, nz))

  grads = []
  for sl in (slice(0, b // 2), slice(b // 2, b)):
    g = group_grad(state.params, batch["image"][sl], t[sl], noise[sl])
    norm = optax.tree_utils.tree_norm(g)
    assert float(norm) > cfg.optim.grad_clip
    grads.append(jax.tree.map(lambda x: x * cfg.optim.grad_clip / norm, g))
  avg = jax.tree.map(lambda a, b_: (a + b_) / 2, *grads)
  expected_state = state.apply_gradients(grads=avg)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6), new_state.params, expected_state.params
  )
  assert np.isfinite(float(metrics["grad_norm"]))


@pytest.mark.parametrize("groups,dropout,sharded", [(8, 0.1, True), (4, 0.1, True), (2, 0.0, True), (2, 0.1, False)])
def test_clip_groups_on_four_devices_match_one_device(n_devices, groups, dropout, sharded):
  """Per-device group clipping (shard_map) gives the one-device step; groups split over devices only without dropout."""
  cfg = tiny_config()
  cfg.optim.clip_groups = groups
  cfg.optim.grad_clip = 0.05  # active for every group
  cfg.model.dropout = dropout
  diffusion = runtime.build_diffusion(cfg)
  model = runtime.build_network(cfg, diffusion)
  mesh4 = runtime.make_mesh(devices=jax.devices())
  fn = functools.partial(train_step.train_step, network=model, diffusion=diffusion, optim_config=cfg.optim, mesh=mesh4)
  state = jax.eval_shape(lambda: train_step.create_train_state(cfg, model, jax.random.PRNGKey(0)))
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)}
  jaxpr = str(jax.make_jaxpr(fn)(state, batch, jax.random.PRNGKey(1)))
  assert ("shard_map" in jaxpr) == sharded
  state4, m4 = _run_steps(cfg, jax.devices(), 3)
  state1, m1 = _run_steps(cfg, jax.devices()[:1], 3)
  np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=1e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in m4], [m["grad_norm"] for m in m1], rtol=1e-5)
  assert all(float(m["grad_norm"]) > cfg.optim.grad_clip for m in m1[1:])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state4.params, state1.params)


def test_four_devices_match_one_device(config, n_devices):
  state4, m4 = _run_steps(config, jax.devices(), 3)
  state1, m1 = _run_steps(config, jax.devices()[:1], 3)
  np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state4.params, state1.params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state4.ema_params, state1.ema_params
  )


def test_batch_not_divisible_by_devices_is_a_clear_error(config):
  cfg = tiny_config()
  cfg.training.batch_size = 6
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    train_step.validate_config(cfg, num_devices=4)


@pytest.mark.parametrize(
  "key,value,match",
  [("log_every", 0, "log_every must be at least 1"), ("checkpoint_every", -1, r"0 \(only at the end\)")],
)
def test_bad_intervals_are_clear_errors(key, value, match):
  cfg = tiny_config()
  cfg.training[key] = value
  with pytest.raises(ValueError, match=match):
    train_step.validate_config(cfg, num_devices=1)


def _train(cfg, workdir):
  return jax.device_get(train.train_and_evaluate(cfg, str(workdir)).state)


@pytest.mark.parametrize("num_classes", [0, 10])  # 10: labels in the batch and label dropout resume exactly too
def test_train_loop_checkpoints_and_resumes_exactly(tmp_path, num_classes):
  cfg = tiny_config()
  cfg.model.num_classes = num_classes
  cfg.training.num_train_steps = 4
  cfg.training.checkpoint_every = 2
  full = _train(cfg, tmp_path / "full")
  assert checkpointing.create_manager(tmp_path / "full").all_steps() == [2, 4]
  saved = json.loads((tmp_path / "full" / "config.json").read_text())
  assert saved["model"]["ch"] == cfg.model.ch

  # Stop after 2 steps, then continue to 4 from the checkpoint: the same parameters.
  short = tiny_config()
  short.model.num_classes = num_classes
  short.training.num_train_steps = 2
  _train(short, tmp_path / "resumed")
  resumed = _train(cfg, tmp_path / "resumed")
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params, full.ema_params)

  # The restored checkpoint equals the state that was saved.
  _, ema, step = checkpointing.load_params(tmp_path / "full")
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, ema, full.ema_params)


def test_incompatible_resume_is_refused(tmp_path):
  cfg = tiny_config()
  cfg.training.num_train_steps = 1
  _train(cfg, tmp_path)
  other = tiny_config()
  other.model.ch = 64
  with pytest.raises(ValueError, match=r"model\.ch: saved 32, requested 64"):
    train.train_and_evaluate(other, str(tmp_path))


def _vmapped_grouped_gradients(grad_fn, params, batch, rngs, max_norm):
  """The former implementation (vmapped per-group gradients), kept as the reference."""
  groups = rngs.shape[0]
  b = batch[0].shape[0]
  split = lambda a: a.reshape((groups, b // groups) + a.shape[1:])  # noqa: E731
  (_, losses), grads = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, 0))(params, *(split(a) for a in batch), rngs)
  norms = jax.vmap(optax.tree_utils.tree_norm)(grads)
  if max_norm > 0:
    scale = jnp.minimum(1.0, max_norm / (norms + 1e-12))
    grads = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / groups, grads)
  else:
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
  return grads, losses.reshape(b), jnp.mean(norms)


@pytest.mark.parametrize("max_norm", [0.05, 0.0])
def test_grouped_gradients_match_the_vmapped_reference(max_norm):
  """Same groups, t, noise and per-group dropout keys as the vmapped form: equal to float32 rounding."""
  cfg = tiny_config()
  diffusion = runtime.build_diffusion(cfg)
  model = runtime.build_network(cfg, diffusion)
  params = runtime.init_params(model, jax.random.PRNGKey(0), runtime.image_shape(cfg))
  apply = runtime.model_fn(model)

  def grad_fn(params, x, t, noise, rng):
    def loss(p):
      losses = diffusion.training_losses(lambda x_t, t_: apply(p, x_t, t_, train=True, rng=rng), x, t, noise)
      return jnp.mean(losses), losses

    return jax.value_and_grad(loss, has_aux=True)(params)

  x = jnp.asarray(_batch(cfg)["image"])
  t = jax.random.randint(jax.random.PRNGKey(1), (x.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  rngs = jax.random.split(jax.random.PRNGKey(3), 4)
  new = jax.jit(lambda *a: train_step.grouped_clipped_gradients(grad_fn, *a, max_norm))(params, (x, t, noise), rngs)
  ref = jax.jit(lambda *a: _vmapped_grouped_gradients(grad_fn, *a, max_norm))(params, (x, t, noise), rngs)
  # Summation order differs: elements far below the gradient's scale (some are rounding noise around an exact 0)
  # get an absolute tolerance at that scale.
  atol = 1e-6 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref[0]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol), new[0], ref[0])
  np.testing.assert_allclose(new[1], ref[1], rtol=1e-6)
  np.testing.assert_allclose(new[2], ref[2], rtol=1e-5)


def test_configs_of_older_versions_resume_when_new_fields_take_their_defaults():
  """A saved config without a field added since (e.g. optim.ema_warmup) equals one with the field's default."""
  cfg = tiny_config()
  saved = cfg.to_dict()
  del saved["optim"]["ema_warmup"], saved["model"]["num_classes"]
  assert workdirs.incompatible_fields(saved, cfg.to_dict()) == []
  cfg.optim.ema_warmup = True
  assert workdirs.incompatible_fields(saved, cfg.to_dict()) == ["optim.ema_warmup"]


def test_ema_warmup_follows_diffusers_decay_schedule():
  cfg = tiny_config()
  cfg.optim.ema_decay, cfg.optim.ema_warmup, cfg.model.dropout = 0.999, True, 0.0
  net, diffusion = runtime.build(cfg)
  state = train_step.create_train_state(cfg, net, jax.random.PRNGKey(0)).replace(step=jnp.asarray(5, jnp.int32))
  batch = {"image": jnp.asarray(_batch(cfg)["image"])}
  new, _ = jax.jit(functools.partial(train_step.train_step, network=net, diffusion=diffusion, optim_config=cfg.optim))(
    state, batch, jax.random.PRNGKey(1)
  )
  decay = (1 + 5) / (10 + 5)  # min(0.999, (1 + n) / (10 + n)) at n = 5
  want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.ema_params, want)
