"""The U-Net's layer calls and each op alone, in JAX and in PyTorch at the same shapes (for `op_profile`)."""

from __future__ import annotations

import collections
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import unet

CLASSES = ("conv 3x3", "conv 3x3 stride 2", "groupnorm+swish", "groupnorm", "dense", "attention core", "concatenate")


def inventory(model, params, batch_size: int, image_shape) -> collections.Counter:
  """{(class, shape, extra): count} of the network's layer calls at this batch."""
  calls = collections.Counter()

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__":
      x = args[0] if args else None
      if isinstance(mod, nn.Conv):
        kind = "conv 3x3 stride 2" if tuple(mod.strides or (1, 1)) != (1, 1) else "conv 3x3"
        calls[(kind, tuple(x.shape), mod.features)] += 1
      elif isinstance(mod, nn.Dense):
        calls[("dense", tuple(x.shape), mod.features)] += 1
      elif isinstance(mod, nn.GroupNorm):
        # Every GroupNorm of the network but the attention block's is followed by swish.
        kind = "groupnorm" if isinstance(mod.parent, unet.AttnBlock) else "groupnorm+swish"
        calls[(kind, tuple(x.shape), 0)] += 1
      elif isinstance(mod, unet.AttnBlock):
        calls[("attention core", tuple(x.shape), 0)] += 1
      elif isinstance(mod, unet.ResnetBlock) and mod.name and mod.parent is not None:
        if isinstance(mod.parent, unet.UpLevel):
          calls[("concatenate", tuple(x.shape), int(mod.out_ch))] += 1
    return next_fun(*args, **kwargs)

  x = jnp.zeros((batch_size,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, x, t, train=False), params)
  return calls


def median_time(fn, repeats: int, inner: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def inner_repeats(shape) -> int:
  return max(1, min(20, int(2e6 // max(1, np.prod(shape)))))


def jax_op(kind: str, shape, extra: int, train: bool):
  """A call of the jitted JAX op (forward, or forward + backward) on arguments of its shape, waiting for the result."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  c = shape[-1]
  if kind.startswith("conv"):
    stride = 2 if "stride" in kind else 1
    w = jnp.asarray(rng.standard_normal((3, 3, c, extra), np.float32) * 0.05)

    def f(x, w):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    args = (x, w)
  elif kind == "dense":
    w = jnp.asarray(rng.standard_normal((c, extra), np.float32) * 0.05)
    f, args = (lambda x, w: x @ w), (x, w)
  elif kind.startswith("groupnorm"):
    norm = nn.GroupNorm(num_groups=unet.GROUPS, epsilon=unet.NORM_EPS)
    p = norm.init(jax.random.PRNGKey(0), x)
    act = nn.swish if kind == "groupnorm+swish" else (lambda h: h)
    f, args = (lambda x, p: act(norm.apply(p, x))), (x, p)
  elif kind == "attention core":
    b, h, w_, _ = shape
    q = x.reshape(b, h * w_, 1, c)
    f, args = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v)), (q, q + 1.0, q - 1.0)
  elif kind == "concatenate":
    a, b = x[..., : c // 2], x[..., c // 2 :]
    f, args = (lambda a, b: jnp.concatenate([a, b], axis=-1)), (a, b)
  else:
    raise ValueError(kind)
  if train:
    fwd = f
    f = jax.grad(lambda *a: jnp.sum(fwd(*a) ** 2), argnums=tuple(range(len(args))))
  jitted = jax.jit(f)
  return lambda: jax.block_until_ready(jitted(*args))


def torch_op(torch, kind: str, shape, extra: int, train: bool):
  """The same op in PyTorch eager (NCHW tensors), forward or forward + backward."""
  F = torch.nn.functional
  if kind == "dense":
    c = shape[-1]
    weight = (torch.randn(extra, c) * 0.05).requires_grad_(train)
    xl = torch.randn(*shape, requires_grad=train)
    f = lambda: F.linear(xl, weight)  # noqa: E731
    return _torch_runner(torch, f, train)
  b, h, w_, c = shape
  x = torch.randn(b, c, h, w_, requires_grad=train)
  if kind.startswith("conv"):
    stride = 2 if "stride" in kind else 1
    weight = (torch.randn(extra, c, 3, 3) * 0.05).requires_grad_(train)
    # TF 'SAME' at stride 2 pads bottom/right only, as the diffusers model does with its own padding.
    f = (
      (lambda: F.conv2d(F.pad(x, (0, 1, 0, 1)), weight, stride=2))
      if stride == 2
      else (lambda: F.conv2d(x, weight, padding=1))
    )
  elif kind.startswith("groupnorm"):
    gamma, beta = torch.ones(c, requires_grad=train), torch.zeros(c, requires_grad=train)
    act = F.silu if kind == "groupnorm+swish" else (lambda h: h)
    f = lambda: act(F.group_norm(x, unet.GROUPS, gamma, beta, unet.NORM_EPS))  # noqa: E731
  elif kind == "attention core":
    q = torch.randn(b, 1, h * w_, c, requires_grad=train)
    f = lambda: F.scaled_dot_product_attention(q, q + 1.0, q - 1.0)  # noqa: E731
  elif kind == "concatenate":
    a, bb = x[:, : c // 2].contiguous(), x[:, c // 2 :].contiguous()
    if train:
      a, bb = a.detach().requires_grad_(), bb.detach().requires_grad_()
    f = lambda: torch.cat([a, bb], dim=1)  # noqa: E731
  else:
    raise ValueError(kind)
  return _torch_runner(torch, f, train)


def _torch_runner(torch, f, train: bool):
  def run():
    if train:
      y = f()
      (y * y).sum().backward()
    else:
      with torch.no_grad():
        f()

  return run


def hlo_op_counts(hlo_text: str) -> collections.Counter:
  """Counts of the entry computation's instructions by opcode (fusions by their name's kind)."""
  counts = collections.Counter()
  entry = hlo_text[hlo_text.find("\nENTRY") :]
  for line in entry.splitlines()[1:]:
    if line.startswith("}"):
      break
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*\)|\S+)\s+([\w\-]+)\(", line)
    if not m:
      continue
    name, op = m.groups()
    if op == "fusion":  # named by XLA after its ops, e.g. "multiply_add_fusion.3"
      base = re.sub(r"\.\d+$", "", name).removesuffix("_fusion")
      kind = "transpose/copy" if ("transpose" in base or "copy" in base) else base.split("_")[-1]
      op = f"fusion: {kind}"
    counts[op] += 1
  return counts
