"""The optimizer: Adam as TF1 computes it (ε-hat), the paper's warmup, and gradient clipping.

`create_optimizer(config.optim)` is Adam (TF1's ε-hat form by default) with
the warmup schedule; clipping, which the paper applies per TPU core (per group
of the batch), is done by the train step with `clip_by_global_norm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import errors


def scale_by_adam_epsilon_hat(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam as TF1's `tf.train.AdamOptimizer`: ε ("epsilon hat") is added to √v before bias correction.

  TF1 updates by lr·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε), which is Adam on the
  bias-corrected moments with ε replaced by ε/√(1−β2ᵗ). The paper trained with it.
  """
  base = optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree_utils.tree_update_moment(updates, state.mu, b1, 1)
    nu = optax.tree_utils.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    updates = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps / jnp.sqrt(bc2)), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update_fn)


LR_DECAYS = ("constant", "cosine")


def learning_rate_schedule(optim_config) -> optax.Schedule:
  """lr·min(step/warmup, 1): zero at step 0, as the paper's warmup; then constant, or a cosine down.

  With `lr_decay="cosine"` the rate follows the warmup to `learning_rate` and
  then half a cosine down to `end_learning_rate` (default 0) at step
  `decay_steps` (counted from step 0, so the warmup is included), and stays
  there after it.
  """
  decay = optim_config.get("lr_decay", "constant")
  if decay not in LR_DECAYS:
    raise errors.UserError(f"optim.lr_decay must be one of {LR_DECAYS}, got {decay!r}.")
  if decay == "cosine":
    decay_steps = int(optim_config.get("decay_steps", 0))
    if decay_steps <= max(optim_config.warmup_steps, 0):
      raise errors.UserError(
        f"optim.decay_steps={decay_steps} must exceed optim.warmup_steps={optim_config.warmup_steps} for "
        "lr_decay='cosine'; set it to the number of training steps."
      )
    end = float(optim_config.get("end_learning_rate", 0.0))
    if not 0.0 <= end <= optim_config.learning_rate:
      raise errors.UserError(
        f"optim.end_learning_rate={end:g} must lie in [0, optim.learning_rate={optim_config.learning_rate:g}]: "
        "it is the rate the cosine decays to."
      )
    return optax.warmup_cosine_decay_schedule(
      0.0, optim_config.learning_rate, max(optim_config.warmup_steps, 0), decay_steps, end_value=end
    )
  if optim_config.warmup_steps <= 0:
    return optax.constant_schedule(optim_config.learning_rate)
  return optax.linear_schedule(0.0, optim_config.learning_rate, optim_config.warmup_steps)


def create_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam (TF1 ε-hat by default) with the warmup schedule. Clipping happens in `train_step`."""
  if optim_config.epsilon_hat:
    adam = scale_by_adam_epsilon_hat(optim_config.b1, optim_config.b2, optim_config.eps)
  else:
    adam = optax.scale_by_adam(optim_config.b1, optim_config.b2, optim_config.eps)
  return optax.chain(adam, optax.scale_by_learning_rate(learning_rate_schedule(optim_config)))


def clip_by_global_norm(grads, max_norm: float):
  """(grads scaled to global norm ≤ max_norm (no-op for max_norm ≤ 0), the global norm before clipping)."""
  norm = optax.tree_utils.tree_norm(grads)
  if max_norm <= 0:
    return grads, norm
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-12)), grads), norm
