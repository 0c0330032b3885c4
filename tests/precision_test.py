"""bfloat16 training: which computations are half precision and which must stay float32.

With `model.dtype=bfloat16` the convolutions and dense layers run in bfloat16; GroupNorm's statistics, the attention
softmax (and its logits' accumulation) and the loss are computed in float32; parameters, the EMA and the optimizer
state are float32. Read from the train step's jaxpr, not run, so these hold whatever backend compiles it.
"""

import functools
import math

import jax
import jax.numpy as jnp

from diffusion_jax import runtime
from diffusion_jax import train_step


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
