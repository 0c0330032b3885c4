r"""Trains the digit classifier behind `evaluation.digits_metric` and writes the shipped weights and their log.

  python -m benchmarks.train_digit_classifier

Trains `digits_metric.DigitClassifier` on the digits TRAIN split only (1,500
images), with a fixed seed and random shifts of up to one pixel, then writes
`diffusion_jax/data/digit_classifier.npz` (float32 arrays, flat keys, no
pickle) and `diffusion_jax/data/digit_classifier_log.txt` (seed, steps,
settings, train and held-out TEST accuracy, the weights' SHA-256). The test
split is only scored at the end, never used to choose anything. About a minute
on one CPU core; on the same machine and JAX version a rerun gives the same
weights.
"""

from __future__ import annotations

import datetime
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import digits_metric

_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, data order and augmentation.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate (linear warmup, then cosine decay to 0).")
_WD = flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
_SHIFT = flags.DEFINE_integer("max_shift", 1, "Random shifts of up to this many pixels in each direction.")
_OUT = flags.DEFINE_string(
  "out",
  str(digits_metric.WEIGHTS_PATH),
  "Where to write the weights (.npz); the log goes next to it as <name>_log.txt.",
)


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def _shift(x: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Each image of x [B, H, W, C] moved by its own random (dy, dx) ∈ [-max_shift, max_shift]², background filled."""
  if max_shift == 0:
    return x
  b, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


def _accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
  _, logits = digits_metric.classify(images, params)
  return float((logits.argmax(axis=1) == labels).mean())


def train(seed: int, steps: int, batch_size: int, learning_rate: float, weight_decay: float, max_shift: int):
  """Returns (params, info dict) of a training run on the digits train split."""
  train_images, train_labels = input_pipeline.load_digits("train")
  model = digits_metric.DigitClassifier()
  key = jax.random.PRNGKey(seed)
  params = digits_metric.init_params(jax.random.fold_in(key, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10), steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = tx.init(params)
  aug_key = jax.random.fold_in(key, 1)

  @jax.jit
  def step_fn(params, opt_state, x, y, step):
    x = _shift(x, jax.random.fold_in(aug_key, step), max_shift)

    def loss_fn(p):
      _, logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x_all, y_all = _to_float(train_images), train_labels.astype(np.int32)
  order_rng = np.random.default_rng(seed)
  order, pos = order_rng.permutation(len(x_all)), 0
  losses = []
  start = time.time()
  for step in range(steps):
    if pos + batch_size > len(order):
      order, pos = order_rng.permutation(len(x_all)), 0
    idx = order[pos : pos + batch_size]
    pos += batch_size
    params, opt_state, loss = step_fn(params, opt_state, x_all[idx], y_all[idx], step)
    if (step + 1) % 500 == 0 or step + 1 == steps:
      losses.append((step + 1, float(loss)))
      print(f"step {step + 1}/{steps}: loss {float(loss):.4f}", flush=True)
  params = jax.device_get(params)
  return params, {"train_seconds": time.time() - start, "losses": losses}


def main(argv):
  del argv
  seed, steps, batch_size = _SEED.value, _STEPS.value, _BATCH.value
  params, info = train(seed, steps, batch_size, _LR.value, _WD.value, _SHIFT.value)
  train_images, train_labels = input_pipeline.load_digits("train")
  test_images, test_labels = input_pipeline.load_digits("test")
  train_acc = _accuracy(params, train_images, train_labels)
  test_acc = _accuracy(params, test_images, test_labels)
  errors = int(round((1.0 - test_acc) * len(test_labels)))
  out = digits_metric.save_params(params, _OUT.value)
  log_path = out.with_name(out.stem + "_log.txt")
  lines = [
    "# Training log of the digit classifier (diffusion_jax.evaluation.digits_metric.DigitClassifier)",
    f"command: python -m benchmarks.train_digit_classifier --seed={seed} --steps={steps} --batch_size={batch_size} "
    f"--learning_rate={_LR.value:g} --weight_decay={_WD.value:g} --max_shift={_SHIFT.value}",
    "data: digits train split (1500 images) for training; test split (297 images) only scored at the end",
    f"seed: {seed}",
    f"steps: {steps}",
    f"batch_size: {batch_size}",
    f"optimizer: adamw, peak learning rate {_LR.value:g}, warmup + cosine decay, weight decay {_WD.value:g}",
    f"augmentation: random shifts of up to {_SHIFT.value} pixel(s) in each direction, background-filled",
    f"feature_dim: {digits_metric.FEATURE_DIM}",
    f"parameters: {sum(int(np.size(v)) for v in jax.tree.leaves(params))}",
    *[f"loss at step {s}: {loss:.4f}" for s, loss in info["losses"]],
    f"train_accuracy: {train_acc:.4f}",
    f"test_accuracy: {test_acc:.4f}",
    f"test_errors: {errors} of {len(test_labels)}",
    f"train_seconds: {info['train_seconds']:.1f}",
    f"jax: {jax.__version__}, platform: {jax.default_backend()}, python: {platform.python_version()}",
    f"weights: {out.name}, sha256 {digits_metric.weights_sha256(out)}",
    f"created: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
  ]
  pathlib.Path(log_path).write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"Wrote {out} and {log_path}.")


if __name__ == "__main__":
  app.run(main)
