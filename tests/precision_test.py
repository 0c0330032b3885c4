"""bfloat16 training: which tensors are half precision and which must stay float32.

With `model.dtype=bfloat16` the activations, and what the backward pass keeps of them, are bfloat16; GroupNorm's
statistics, the attention softmax and the loss are computed in float32; parameters, their gradients, the EMA and
the optimizer state are float32. Read from the train step's jaxpr and from the residuals of the network's vjp, not
run, so these hold whatever backend compiles them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import runtime
from diffusion_jax import train_step
from diffusion_jax.models import unet


def _config(dtype, **model):
  from configs import tiny  # noqa: PLC0415

  config = tiny.get_config()
  config.model.update(dtype=dtype, **model)
  return config


def _subjaxprs(value):
  if hasattr(value, "eqns"):  # a Jaxpr
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (jit, remat, custom_jvp, scan, cond)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _equations(sub)


@functools.lru_cache(maxsize=None)
def _train_step_equations(dtype):
  config = _config(dtype, num_classes=0)
  network, diffusion = runtime.build(config)
  state = jax.eval_shape(lambda: train_step.create_train_state(config, network, jax.random.PRNGKey(0)))
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)}
  step = functools.partial(train_step.train_step, network=network, diffusion=diffusion, optim_config=config.optim)
  closed = jax.make_jaxpr(step)(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
  eqns = list(_equations(closed.jaxpr))
  return network, eqns, closed


def _operand_dtypes(eqns, primitive, ndim, axes=None):
  """The dtypes of the first operand of each `primitive` equation whose operand has `ndim` dimensions (and that
  reduces `axes`, if given)."""
  return [
    str(e.invars[0].aval.dtype)
    for e in eqns
    if e.primitive.name == primitive
    and len(getattr(e.invars[0].aval, "shape", ())) == ndim
    and (axes is None or tuple(e.params.get("axes", ())) == axes)
  ]


def test_bfloat16_network_runs_its_convolutions_in_bfloat16():
  _, eqns, _ = _train_step_equations("bfloat16")
  convs = [str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and set(convs) == {"bfloat16"}, sorted(set(convs))
  _, eqns32, _ = _train_step_equations("float32")
  assert {str(e.invars[0].aval.dtype) for e in eqns32 if e.primitive.name == "conv_general_dilated"} == {"float32"}


def test_bfloat16_keeps_groupnorm_softmax_and_loss_in_float32():
  _, eqns, _ = _train_step_equations("bfloat16")
  # GroupNorm's statistics: sums of [B, H, W, groups, C/groups] over H, W and C/groups (the forward pass and the
  # backward's recomputation).
  stats = _operand_dtypes(eqns, "reduce_sum", 5, axes=(1, 2, 4))
  assert len(stats) >= 4 and set(stats) == {"float32"}, stats
  # The attention softmax: its max and exp over the logits ([..., queries, keys]).
  softmax = [
    str(e.invars[0].aval.dtype)
    for e in eqns
    if e.primitive.name in ("reduce_max", "exp") and getattr(e.invars[0].aval, "ndim", 0) >= 4
  ]
  assert len(softmax) >= 2 and set(softmax) == {"float32"}, softmax
  # The attention logits are accumulated in float32 (the q·k product's result), whatever q and k are.
  logits = [
    str(e.outvars[0].aval.dtype)
    for e in eqns
    if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim >= 4 and e.invars[0].aval.dtype == jnp.bfloat16
  ]
  assert "float32" in logits, logits
  # The loss: the mean squared error of each [H, W, C] image. (The bias gradients, sums of the bfloat16 cotangents
  # over B, H and W, are bfloat16 as in any flax layer with dtype=bfloat16, and become float32 with the parameter.)
  loss = _operand_dtypes(eqns, "reduce_sum", 4, axes=(1, 2, 3))
  assert loss and set(loss) == {"float32"}, loss


def test_bfloat16_parameters_gradients_and_optimizer_state_stay_float32():
  _, _, closed = _train_step_equations("bfloat16")
  state_out = closed.out_avals
  big = [a for a in state_out if a.ndim and math.prod(a.shape) > 1]
  assert big and {str(a.dtype) for a in big} == {"float32"}


# ----------------------------------------------------------------------------
# What the backward pass keeps (the vjp's residuals).
# ----------------------------------------------------------------------------

MODEL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
BATCH, SIZE = 4, 8


def _residuals(dtype, **model):
  network = unet.UNet(dtype=dtype, **{**MODEL, **model})
  x = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  params = jax.eval_shape(functools.partial(network.init, train=False), jax.random.PRNGKey(0), x, t)

  def loss(p, x, t):
    out = network.apply(p, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(jnp.square(out - x))

  vjp_fn = jax.eval_shape(lambda p, x, t: jax.vjp(functools.partial(loss, x=x, t=t), p)[1], params, x, t)
  leaves = jax.tree.leaves(vjp_fn)
  param_shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
  # The parameters, and their bfloat16 copies, are residuals too; only the activations count here.
  return [leaf for leaf in leaves if leaf.shape not in param_shapes]


def _bytes(leaves):
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


@pytest.mark.parametrize("remat", [False, True])
def test_bfloat16_backward_keeps_no_float32_activation(remat):
  # A full-resolution activation is BATCH·SIZE²·ch elements; the float32 network keeps many (the detector works).
  activation = BATCH * SIZE * SIZE * MODEL["ch"]
  kept32 = _residuals(jnp.float32, remat=remat)
  assert sum(math.prod(r.shape) >= activation for r in kept32) >= 4
  kept16 = _residuals(jnp.bfloat16, remat=remat)
  float32_activations = [
    (r.shape, str(r.dtype)) for r in kept16 if r.dtype == jnp.float32 and math.prod(r.shape) >= activation
  ]
  assert not float32_activations
  # Half the bytes of float32 or less (bfloat16 is half; dropout masks and small float32 statistics add a little).
  assert _bytes(kept16) <= 0.55 * _bytes(kept32), (_bytes(kept16), _bytes(kept32))
