"""A sampling request as one value: the chain's options and its classifier-free guidance, checked once.

The public functions of `chains` (and `inversion.invert`, `repaint.repaint`) take their arguments as keywords,
check them here once (`checks`) and hand one `Request` down to the driver; nothing below re-checks.

Classifier-free guidance (Ho & Salimans 2022). With conditioning `cond` (a `conditioning.ClassLabels`) the
model is called as model_fn(x_t, t, cond.value); with guidance (scale s != 1) the conditional and the
null pass run as ONE call on the batch concatenated with itself (conditioning cond and `cond.null_like()`),
and the output is

  out = out(x, ∅) + s·(out(x, c) − out(x, ∅)),

linear in whatever the network predicts (ε, x_0, v or the x_{t−1} mean), so s = 1 is the conditional model and
s = 0 the unconditional one. Learned-variance models are guided on their mean channels; the variance channels
are the conditional pass's. The other common convention, ε̂ = (1 + w)·ε(x, c) − w·ε(x, ∅) (Ho & Salimans' w),
is s = 1 + w.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from diffusion_jax.conditioning import ClassLabels


@flax.struct.dataclass
class Guidance:
  """The conditioning of a batch and its guidance: `cond` None (an unconditional model), or the conditioning
  with `scale` (a float32 scalar, possibly traced) when `guided`, else the conditional model as it is."""

  cond: ClassLabels | None = None
  scale: Any = None
  guided: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def null_label(self) -> int | None:
    return None if self.cond is None else self.cond.null_label

  def model_output(self, model_fn, x_t: jax.Array, t_vec: jax.Array, channels: int) -> jax.Array:
    """The network output at (x_t, t_vec), guided (module docstring); `channels`: the image's channels."""
    if self.cond is None:
      return model_fn(x_t, t_vec)
    if not self.guided:
      return model_fn(x_t, t_vec, self.cond.value)
    batch = x_t.shape[0]
    both = self.cond.concatenate(self.cond.null_like())
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t_vec, t_vec]), both.value)
    out = out.astype(jnp.float32)
    out_c, out_u = out[:batch], out[batch:]
    s = jnp.asarray(self.scale, jnp.float32)
    mean = out_u[..., :channels] + s * (out_c[..., :channels] - out_u[..., :channels])
    if out.shape[-1] == channels:
      return mean
    return jnp.concatenate([mean, out_c[..., channels:]], axis=-1)


UNGUIDED = Guidance()


@dataclasses.dataclass(frozen=True)
class Request:
  """One chain's options, checked (`checks`): the resolved sampler, its η (possibly traced), x_0 clipping, the
  progressive pictures' interval (0: none) and the guidance."""

  spec: Any
  eta: Any
  clip_denoised: bool = True
  progressive_every: int = 0
  guidance: Guidance = UNGUIDED
