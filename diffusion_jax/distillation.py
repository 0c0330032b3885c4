"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): the target and the loss, as pure functions.

A student with n steps is trained so that one deterministic DDIM step of its own (η = 0) lands where two of
its teacher's land. Both walk the `nested` grids (`samplers.grids.nested_grid`): student point j is teacher
point 2j, so a student step t → t'' spans the teacher's steps t → t' → t''. With α_s = √ᾱ_s, σ_s = √(1 − ᾱ_s)
(ᾱ = 1 past the last step) and the teacher's x_0 predictions x̂ (clipped as its sampler clips them):

  z_{t'}  = α_{t'} x̂(z_t) + (σ_{t'}/σ_t)(z_t − α_t x̂(z_t))          (the teacher's first DDIM step)
  z_{t''} = α_{t''} x̂(z_{t'}) + (σ_{t''}/σ_{t'})(z_{t'} − α_{t'} x̂(z_{t'}))   (its second)
  x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)       (the x_0 whose one step lands there)

and the loss is w(t)·‖x̂_student(z_t) − x̃‖² (mean over pixels), with the paper's "truncated SNR" weight
w = max(α²/σ², 1), or "SNR + 1" (= the v-prediction error). The student predicts v or x_0, never ε: from pure
noise (α_{T−1} ≈ 0.006 for the linear schedule) an ε-student's x_0 = (z − σ ε̂)/α multiplies its error by 1/α,
and the last rounds' students take their one or two steps from there.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import grids

WEIGHTINGS = ("truncated_snr", "snr_plus_one")
PARAMETERISATIONS = ("v", "xstart")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> network output


def step_tables(num_timesteps: int, teacher_steps: int, student_steps: int) -> dict[str, np.ndarray]:
  """Per student step j (sampling order): its timestep t, the teacher's middle t' and its end t'' (−1: x_0).

  Each is an int32 [student_steps] array; for a student of n steps the teacher has 2n (`check_nested`).
  """
  k = grids.check_nested(num_timesteps, teacher_steps, student_steps)
  if k != 2:
    raise errors.UserError(
      f"Progressive distillation halves the steps: a {student_steps}-step student needs a {2 * student_steps}-step "
      f"teacher, not {teacher_steps}."
    )
  teacher = np.append(grids.nested_grid(num_timesteps, teacher_steps), -1)
  return dict(
    t=teacher[0:-1:2].astype(np.int32), t_mid=teacher[1::2].astype(np.int32), t_next=teacher[2::2].astype(np.int32)
  )


def alpha_sigma(diffusion: GaussianDiffusion, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) shaped [B, 1, ...] for `ndim`-dimensional images; t = −1 gives (1, 0)."""
  a = jnp.where(t >= 0, jnp.take(diffusion.alphas_cumprod, jnp.maximum(t, 0)), jnp.float32(1.0))
  a = a.reshape(a.shape + (1,) * (ndim - 1))
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def predict_xstart(diffusion: GaussianDiffusion, model_output, x_t, t, *, clip: bool) -> jax.Array:
  """x_0 from a network output in the diffusion's parameterisation (clipped to [−1, 1] when `clip`)."""
  return diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip)["pred_xstart"]


def ddim_step(x_t, pred_xstart, alpha_t, sigma_t, alpha_next, sigma_next) -> jax.Array:
  """The deterministic DDIM step α' x̂ + (σ'/σ)(x_t − α x̂)."""
  return alpha_next * pred_xstart + (sigma_next / sigma_t) * (x_t - alpha_t * pred_xstart)


def target(
  teacher_fn: ModelFn,
  teacher_diffusion: GaussianDiffusion,
  x_t: jax.Array,
  t: jax.Array,
  t_mid: jax.Array,
  t_next: jax.Array,
  *,
  clip: bool = True,
) -> jax.Array:
  """x̃: the x_0 prediction whose one DDIM step from (x_t, t) to t_next lands where the teacher's two steps land.

  Args:
    teacher_fn: the teacher network, (x, t [B]) -> output in `teacher_diffusion`'s parameterisation.
    teacher_diffusion: the teacher's diffusion (its tables give ᾱ).
    x_t: [B, ...] the student's input at timestep t.
    t, t_mid, t_next: [B] int32 timesteps, t > t_mid > t_next ≥ −1 (−1: the end of the chain, ᾱ = 1).
    clip: clip the teacher's x_0 predictions to [−1, 1], as its DDIM sampler does by default.

  Returns:
    x̃ [B, ...] float32 (not clipped).
  """
  nd = x_t.ndim
  a_t, s_t = alpha_sigma(teacher_diffusion, t, nd)
  a_mid, s_mid = alpha_sigma(teacher_diffusion, t_mid, nd)
  a_next, s_next = alpha_sigma(teacher_diffusion, t_next, nd)
  x0 = predict_xstart(teacher_diffusion, teacher_fn(x_t, t), x_t, t, clip=clip)
  z_mid = ddim_step(x_t, x0, a_t, s_t, a_mid, s_mid)
  x0_mid = predict_xstart(teacher_diffusion, teacher_fn(z_mid, t_mid), z_mid, t_mid, clip=clip)
  z_next = ddim_step(z_mid, x0_mid, a_mid, s_mid, a_next, s_next)
  ratio = s_next / s_t
  return (z_next - ratio * x_t) / (a_next - ratio * a_t)


def weight(diffusion: GaussianDiffusion, t: jax.Array, weighting: str) -> jax.Array:
  """[B] loss weights of the x_0 error: max(SNR, 1) ("truncated_snr") or SNR + 1 ("snr_plus_one")."""
  a = jnp.take(diffusion.alphas_cumprod, t)
  snr = a / (1.0 - a)
  if weighting == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr_plus_one":
    return snr + 1.0
  raise errors.UserError(f"Unknown distill.weighting {weighting!r}; valid choices are {', '.join(WEIGHTINGS)}.")


def losses(
  student_fn: ModelFn,
  student_diffusion: GaussianDiffusion,
  teacher_fn: ModelFn,
  teacher_diffusion: GaussianDiffusion,
  x_start: jax.Array,
  step_index: jax.Array,
  noise: jax.Array,
  tables: dict,
  *,
  weighting: str = "truncated_snr",
  clip: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Per-example distillation losses [B] and the student timesteps t [B].

  `step_index` [B] picks student steps (rows of `step_tables`); z_t = α_t x_0 + σ_t ε is the student's input,
  the target is computed without gradient.
  """
  t = jnp.take(jnp.asarray(tables["t"]), step_index)
  t_mid = jnp.take(jnp.asarray(tables["t_mid"]), step_index)
  t_next = jnp.take(jnp.asarray(tables["t_next"]), step_index)
  x_t = student_diffusion.q_sample(x_start, t, noise)
  x_tilde = jax.lax.stop_gradient(target(teacher_fn, teacher_diffusion, x_t, t, t_mid, t_next, clip=clip))
  x_hat = predict_xstart(student_diffusion, student_fn(x_t, t), x_t, t, clip=False)
  err = jnp.mean(jnp.square(x_hat - x_tilde), axis=tuple(range(1, x_t.ndim)))
  return weight(student_diffusion, t, weighting) * err, t


def check_settings(parameterisation: str, weighting: str, model_var_type: str) -> None:
  if parameterisation not in PARAMETERISATIONS:
    raise errors.UserError(
      f"distill.parameterisation={parameterisation!r}: a student predicts one of {', '.join(PARAMETERISATIONS)} "
      "(ε-prediction fails at few steps: its x_0 from pure noise divides the error by α ≈ 0.006)."
    )
  if weighting not in WEIGHTINGS:
    raise errors.UserError(f"Unknown distill.weighting {weighting!r}; valid choices are {', '.join(WEIGHTINGS)}.")
  if model_var_type in ("learned", "learned_range"):
    raise errors.UserError(
      f"Distillation needs a teacher with a fixed variance; this one has model_var_type={model_var_type!r}."
    )
