r"""Where the time of a train step or a sampler step goes, op by op, in JAX and in PyTorch at the same shapes.

Every layer call of the U-Net at the given batch is recorded (`flax.linen.intercept_methods`:
3×3 and strided convolutions, GroupNorm (+ swish where the network has it), dense layers,
the attention core, and the skip concatenations of the up path, whose shapes come from
the up-path residual blocks' inputs). Each distinct op is then timed alone — for
`--work=train` forward and backward (the gradient of a sum, with respect to input and
weights), for `--work=sample` forward only — as a jitted JAX function and as the same
PyTorch eager op on tensors of the same shape (NCHW), and the times are multiplied by how
often the network calls the op. The whole step is timed too (`programs.train_step` /
`programs.sampler` against `torch_baseline.TrainStep` / `AncestralSampler`, eager), so the
table shows how much of each side's step the ops explain; what is left is the rest of the
step (loss, optimizer, EMA, sampler arithmetic), dispatch, and for JAX the layout copies
XLA:CPU adds between ops (their count in the optimized HLO is printed).

Why not a trace: XLA:CPU runs convolutions asynchronously on its thread pool, so the
events of a `jax.profiler` trace cover only their launch (~0.1 ms for a 0.5 ms convolution);
the times below are measured with the work done.

  python -m benchmarks.op_profile --config=configs/digits.py --work=train --batch_size=64
  python -m benchmarks.op_profile --config=configs/digits.py --work=sample --batch_size=500
  python -m benchmarks.op_profile --config=configs/cifar.py --work=train --batch_size=8 --repeats=3
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import harness
from benchmarks import programs
from benchmarks import torch_baseline
from diffusion_jax import runtime
from diffusion_jax.models import unet

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/digits.py", "The model/diffusion config.", lock_config=True
)
_WORK = flags.DEFINE_enum("work", "train", ["train", "sample"], "Train step (forward + backward) or sampler step.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats per op (median) and per whole step.")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time the PyTorch ops and step.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the breakdown here as JSON.")

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


def _median_time(fn, repeats: int, inner: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _inner(shape) -> int:
  return max(1, min(20, int(2e6 // max(1, np.prod(shape)))))


def jax_op(kind: str, shape, extra: int, train: bool):
  """A jitted JAX function of the op (forward, or forward + backward) and its arguments."""
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
  return (lambda: jax.block_until_ready(jitted(*args))), shape


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
    if op == "fusion":
      base = re.sub(r"\.\d+$", "", name)
      op = "fusion: " + (
        "transpose/copy" if ("transpose" in base or "copy" in base) else base.split("_")[-2] if "_" in base else base
      )
    counts[op] += 1
  return counts


def main(argv):
  del argv
  config = _CONFIG.value
  b, repeats = _BATCH.value, _REPEATS.value
  train = _WORK.value == "train"
  env = harness.environment()
  print(
    f"{env['device_kind']} x{env['num_devices']}, jax {env['jax']}, {env['cpu_count']} CPUs, load {env['load_average']}"
  )
  diffusion, model, params, image_shape = programs.model_and_params(config, "float32")
  calls = inventory(model, params, b, image_shape)

  torch = None
  if _TORCH.value and torch_baseline.import_torch() is not None:
    torch, _ = torch_baseline.import_torch()
    torch_baseline.setup(torch)

  # All JAX timings first, then all PyTorch ones: PyTorch's OpenMP threads keep spinning for a while
  # after its ops, which would slow a JAX op timed right after one.
  # The whole step first (windows of 5 dispatches, as a training loop overlaps them).
  if train:
    whole = programs.train_step(config, 1, b, "float32", None)
    per = 1
  else:
    per = 10
    whole = programs.sampler("jax", diffusion, model, params, image_shape, b, "ancestral", per, None)
  counts = hlo_op_counts(whole.hlo_text())
  jax_step = _median_time(lambda: whole.run(5), repeats, 1) / (5 * per)
  ops = sorted(calls.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1]))
  rows = []
  for (kind, shape, extra), n in ops:
    fn, _ = jax_op(kind, shape, extra, train)
    j = _median_time(fn, repeats, _inner(shape))
    rows.append({"class": kind, "shape": list(shape), "out": extra, "count": n, "jax_ms": j * 1e3, "torch_ms": None})
  torch_step = None
  if torch:
    for row, ((kind, shape, extra), _) in zip(rows, ops):
      row["torch_ms"] = _median_time(torch_op(torch, kind, shape, extra, train), repeats, _inner(shape)) * 1e3
    d = runtime.build_diffusion(config)
    peer = (
      torch_baseline.TrainStep(config, d, b, compile=False, autocast=False)
      if train
      else torch_baseline.AncestralSampler(config, d, b, per, compile=False, autocast=False)
    )
    torch_step = _median_time(lambda: peer.run(5), repeats, 1) / (5 * per)
  for r in rows:
    print(
      f"  {r['class']:18s} {str(tuple(r['shape'])):20s} ->{r['out']:4d} x{r['count']:2d}: jax {r['jax_ms']:7.3f} ms"
      + (f", torch {r['torch_ms']:7.3f} ms" if r["torch_ms"] else ""),
      flush=True,
    )

  table = []
  for k in CLASSES:
    sel = [r for r in rows if r["class"] == k]
    if not sel:
      continue
    jt = sum(r["jax_ms"] * r["count"] for r in sel)
    tt = sum(r["torch_ms"] * r["count"] for r in sel) if torch else None
    table.append([k, sum(r["count"] for r in sel), jt, tt, (tt / jt) if tt else None])
  jt_sum = sum(r[2] for r in table)
  tt_sum = sum(r[3] for r in table) if torch else None
  table.append(["sum of the ops alone", "", jt_sum, tt_sum, (tt_sum / jt_sum) if torch else None])
  table.append(
    ["whole step", "", jax_step * 1e3, torch_step and torch_step * 1e3, (torch_step / jax_step) if torch_step else None]
  )
  what = "train step (forward + backward)" if train else "sampler step (forward)"
  harness.print_table(
    f"{what}, batch {b}: ms per step by op class (median of {repeats})",
    ["class", "calls", "jax ms", "torch eager ms", "JAX/PyTorch speed"],
    table,
    [f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "", "speed ratio > 1: JAX faster"],
  )
  harness.print_table(
    "optimized HLO of the whole JAX step: entry instructions by kind (most frequent)",
    ["instruction", "count"],
    counts.most_common(12),
  )
  harness.write_json(
    _JSON_OUT.value,
    {"env": env, "work": _WORK.value, "batch_size": b, "ops": rows, "table": table, "hlo_counts": dict(counts)},
  )


if __name__ == "__main__":
  app.run(main)
