"""Conditioning of the network: what a conditional model is told besides x_t and t.

A kind of conditioning is one type here. It is a pytree (it travels through `jax.jit` and is sharded with
the batch) and knows the two operations classifier-free guidance needs of it:

  * `null_like()`: the same batch told nothing (the unconditional model, Ho & Salimans 2022);
  * `drop(rng, rate)`: each example told nothing with probability `rate`, independently (training's label
    dropout, which teaches the network the unconditional model alongside the conditional one);

and `value`, what the network's `cond` argument receives. `ClassLabels` is the kind the U-Net takes:
[B] int32 class labels with a null class K = `null_label` (`unet.UNet.null_label`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ClassLabels:
  """[B] int32 class labels of a class-conditional model; `null_label` is its null (unconditional) class."""

  labels: jax.Array
  null_label: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def value(self) -> jax.Array:
    """The network's `cond` argument."""
    return self.labels

  @property
  def batch_size(self) -> int:
    return int(jnp.shape(self.labels)[0])

  def _null(self) -> int:
    if self.null_label is None:
      raise ValueError("ClassLabels without a null_label has no unconditional form: pass null_label=K.")
    return self.null_label

  def null_like(self) -> ClassLabels:
    """The same batch labelled with the null class."""
    return ClassLabels(jnp.full_like(self.labels, self._null()), self.null_label)

  def drop(self, rng: jax.Array, rate: float) -> ClassLabels:
    """Each label replaced by the null class with probability `rate`, independently (rate 0: unchanged)."""
    labels = jnp.asarray(self.labels).astype(jnp.int32)
    if rate <= 0:
      return ClassLabels(labels, self.null_label)
    return ClassLabels(jnp.where(jax.random.bernoulli(rng, rate, labels.shape), self._null(), labels), self.null_label)

  def concatenate(self, other: ClassLabels) -> ClassLabels:
    """This batch followed by `other` (guidance runs the conditional and null passes as one call)."""
    return ClassLabels(jnp.concatenate([self.labels, other.labels]), self.null_label)
