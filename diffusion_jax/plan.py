r"""The plan of a run on a TPU slice, compiled ahead of time on any host: HBM fit, FLOPs, bytes and a roofline.

  python -m diffusion_jax.plan --config=configs/cifar.py --topology=v3-8
  python -m diffusion_jax.plan --config=configs/lsun_church.py --topology=v5e-8 --programs=train --max_batch

With `jax[tpu]` installed (libtpu), XLA's TPU compiler runs on a host that has
no TPU: the programs a run would compile are compiled for the named slice's
devices, over a mesh built by the same code that builds the real one
(`runtime.make_mesh`), and never run. For each program the plan prints, per
device: the HBM the compiled program holds (arguments, temporaries, outputs,
and their total against the chip's HBM), the FLOPs and HBM bytes XLA's cost
model counts for one call (one loop trip for the samplers and bits/dim), and
the roofline bounds of its time: the larger and the sum of the compute time
(FLOPs at the chip's peak bfloat16 rate) and the memory time (bytes at its HBM
bandwidth). These are estimates from the compiler's cost model and the chips'
published peaks, never measurements; where the paper measured the same work on
the same hardware (its original TensorFlow code), that figure stands beside them.

A program that does not fit is reported as one message: the HBM it needs
against what the compiler has, the largest batch that fits (found by compiling
only) and whether `model.remat` or `model.dtype=bfloat16` would make the asked
batch fit.

Compiles of the 256² models take many minutes on a small CPU: each finished
compile's figures are cached (in the package's cache directory, plan/), keyed
by the lowered program, the slice and the jax and libtpu versions, so configs
whose programs are identical share one compile and a second plan is instant.

From a notebook:

  from diffusion_jax import plan
  report = plan.plan(config, "v5e-8", programs=("train",))
  print(report.table())
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import ml_collections

from diffusion_jax import errors

PROGRAMS = ("train", "sample", "bpd", "grid", "eval")
GiB = 1024**3


# ----------------------------------------------------------------------------
# The chips.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published figures, per chip, and how many JAX devices one chip is."""

  kind: str
  peak_bf16_flops: float  # per chip, FLOP/s
  hbm_bandwidth: float  # per chip, bytes/s
  hbm_bytes: float  # per chip
  devices_per_chip: int  # 2 on v2/v3 (one device per TensorCore); 1 elsewhere (v4 and v5p as megacore)
  source: str

  @property
  def device_peak_flops(self) -> float:
    return self.peak_bf16_flops / self.devices_per_chip

  @property
  def device_hbm_bandwidth(self) -> float:
    return self.hbm_bandwidth / self.devices_per_chip

  @property
  def device_hbm_bytes(self) -> float:
    return self.hbm_bytes / self.devices_per_chip


# Google Cloud's TPU documentation, one page per generation (cloud.google.com/tpu/docs/<page>).
CHIPS = {
  "v2": Chip(
    "TPU v2", 45e12, 700e9, 16 * GiB, 2, "cloud.google.com/tpu/docs/v2: 45 TFLOP/s, 16 GiB, 700 GB/s per chip"
  ),
  "v3": Chip(
    "TPU v3", 123e12, 900e9, 32 * GiB, 2, "cloud.google.com/tpu/docs/v3: 123 TFLOP/s, 32 GiB, 900 GB/s per chip"
  ),
  "v4": Chip(
    "TPU v4", 275e12, 1200e9, 32 * GiB, 1, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB, 1,200 GB/s per chip"
  ),
  "v5e": Chip(
    "TPU v5e", 197e12, 819e9, 16 * GiB, 1, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB, 819 GB/s per chip"
  ),
  "v5p": Chip(
    "TPU v5p",
    459e12,
    2765e9,
    95 * GiB,
    1,
    "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB, 2,765 GB/s per chip",
  ),
  "v6e": Chip(
    "TPU v6e",
    918e12,
    1640e9,
    32 * GiB,
    1,
    "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB, 1,640 GB/s per chip",
  ),
}


# ----------------------------------------------------------------------------
# What the paper measured (Ho et al. 2020, Appendix B), with its original TensorFlow code on a v3-8.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperFigure:
  slice_name: str
  program: str
  image_size: int
  batch: int
  per_second: float  # train: steps/s; sample: images/s of the whole chain
  unit: str
  text: str


PAPER = (
  PaperFigure("v3-8", "train", 32, 128, 21.0, "steps/s", "21 steps/s at batch 128 (CIFAR-10)"),
  PaperFigure("v3-8", "train", 256, 64, 2.2, "steps/s", "2.2 steps/s at batch 64 (256×256)"),
  PaperFigure("v3-8", "sample", 32, 256, 256 / 17, "images/s", "256 samples in 17 s (CIFAR-10, 1000 steps)"),
  PaperFigure("v3-8", "sample", 256, 128, 128 / 300, "images/s", "128 samples in 300 s (256×256, 1000 steps)"),
)


def paper_figure(slice_name: str, program: str, image_size: int, batch: int, steps: int) -> PaperFigure | None:
  """The paper's measurement of the same work on the same slice, if it made one."""
  if program == "sample" and steps != 1000:
    return None
  for f in PAPER:
    if (f.slice_name, f.program, f.image_size) == (slice_name, program, image_size):
      # Sampling rates compare at any batch that fills the slice; a train step only at the paper's batch.
      if f.batch == batch or program == "sample":
        return f
  return None


# ----------------------------------------------------------------------------
# The programs a run compiles.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  """One program of a run, ready to lower: a jitted function and the shapes (with shardings) of its arguments.

  `trips` is how many times one call runs its loop body (the sampler's steps, the T terms of bits/dim; 1 for
  the train step). XLA's cost analysis counts a loop body once, so its FLOPs and bytes are per trip.
  """

  name: str
  description: str
  jitted: Any
  args: tuple
  batch: int
  trips: int
  unit: str  # what one trip is: "step", "sampler step", "bpd term"


def _abstract(tree, sharding):
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _train_program(config, mesh) -> Program:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top

  train_step_lib.validate_config(config, num_devices=mesh.size)
  network, diffusion = runtime.build(config)
  create = functools.partial(
    train_step_lib.create_train_state, config, network, tx=optimizer_lib.create_optimizer(config.optim)
  )
  replicated = runtime.replicated(mesh)
  abstract = jax.eval_shape(create, jax.random.PRNGKey(0))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  step = train_step_lib.jit_train_step(
    mesh,
    network,
    diffusion,
    config.optim,
    state_sharding,
    label_dropout=float(config.training.get("label_dropout", 0.0)),
  )
  b = int(config.training.batch_size)
  batch = {"image": jax.ShapeDtypeStruct((b,) + runtime.image_shape(config), jnp.float32)}
  if network.num_classes:
    batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
  batch = _abstract(batch, runtime.batch_sharding(mesh))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  return Program(
    "train",
    "the train step (train_step.jit_train_step)",
    step,
    (_abstract(abstract, replicated), batch, rng),
    b,
    1,
    "step",
  )


def _sampler_program(
  config, mesh, name: str, section, batch: int, description: str, *, clip_denoised: bool = True, guidance_scale=1.0
) -> Program:
  """The sampler a run compiles for `section`; a conditional network's with labels, guided when the scale is not 1."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top

  network, diffusion = runtime.build(config)
  T = diffusion.num_timesteps
  section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  section["num_steps"] = min(int(section.get("num_steps") or T), T)
  spec = samplers.SamplerSpec.from_config(section, num_timesteps=T)
  guided = bool(network.num_classes) and float(guidance_scale) != 1.0
  fn = inference.make_sharded_sampler(
    diffusion,
    runtime.inference_fn(network),
    mesh,
    runtime.image_shape(config),
    spec,
    clip_denoised=bool(clip_denoised),
    guided=guided,
    null_label=network.null_label if guided else None,
  )
  n = runtime.pad_to_multiple(int(batch), mesh.size)
  replicated = runtime.replicated(mesh)
  params = jax.eval_shape(
    functools.partial(runtime.init_params, network, shape=runtime.image_shape(config)), jax.random.PRNGKey(0)
  )
  args = (
    _abstract(params, replicated),
    jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    jax.ShapeDtypeStruct((n,), jnp.int32, sharding=runtime.batch_sharding(mesh)),
  )
  if network.num_classes:
    args += (jax.ShapeDtypeStruct((n,), jnp.int32, sharding=runtime.batch_sharding(mesh)),)
  if guided:
    args += (jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),)
  steps = int(spec.num_steps or T)
  return Program(name, f"{description}: {spec.name}, {steps} steps", fn, args, n, steps, "sampler step")


def _bpd_program(config, mesh) -> Program:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation import bpd  # pylint: disable=g-import-not-at-top

  network, diffusion = runtime.build(config)
  fn = bpd._bpd_sums_fn(  # pylint: disable=protected-access
    network, mesh, bool(config.eval.clip_denoised), bool(network.num_classes)
  )
  b = runtime.pad_to_multiple(int(config.eval.batch_size), mesh.size)
  replicated, sharded = runtime.replicated(mesh), runtime.batch_sharding(mesh)
  params = jax.eval_shape(
    functools.partial(runtime.init_params, network, shape=runtime.image_shape(config)), jax.random.PRNGKey(0)
  )
  args = (
    _abstract(params, replicated),
    _abstract(diffusion, replicated),
    jax.ShapeDtypeStruct((b,) + runtime.image_shape(config), jnp.float32, sharding=sharded),
    jax.ShapeDtypeStruct((b,), jnp.float32, sharding=sharded),
    jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
  )
  if network.num_classes:
    args += (jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded),)
  T = diffusion.num_timesteps
  return Program("bpd", f"bits/dim (evaluation.bpd): the {T} terms of the bound", fn, args, b, T, "bpd term")


def programs_of(config: ml_collections.ConfigDict, mesh, names: Sequence[str] = PROGRAMS) -> list[Program]:
  """The programs of a run of `config` on `mesh` among `names` (see PROGRAMS), in the order a run compiles them.

  train: the train step; sample: `--mode=sample`'s sampler (config.sampling); bpd: the bits/dim evaluation;
  grid: the training-time grid (when training.sample_every > 0); eval: the sampler of every evaluation the
  training loop runs (config.evals entries with `every` or `at_end`) that draws samples.
  """
  unknown = [n for n in names if n not in PROGRAMS]
  if unknown:
    raise errors.UserError(f"Unknown programs {unknown}; choose among {', '.join(PROGRAMS)}.")
  out = []
  if "train" in names:
    out.append(_train_program(config, mesh))
  tc, sc = config.training, config.sampling
  sampling_settings = dict(
    clip_denoised=bool(sc.get("clip_denoised", True)), guidance_scale=float(sc.get("guidance_scale", 1.0))
  )
  if "grid" in names and int(tc.get("sample_every", 0) or 0) > 0:
    out.append(_sampler_program(config, mesh, "grid", tc.grid, tc.num_grid_samples, "the training-time grid"))
  if "eval" in names:
    for name, entry in config.evals.items():
      if not (int(entry.get("every", 0) or 0) > 0 or entry.get("at_end")):
        continue
      if entry.kind in ("fid", "digits"):
        section = entry.sampling if entry.sampling.get("sampler") else config.sampling
        # As evaluators.draw_samples runs it: chunks of config.sampling.batch_size, its clipping and guidance.
        out.append(
          _sampler_program(
            config, mesh, f"eval:{name}", section, sc.batch_size, f"evaluation {name!r}", **sampling_settings
          )
        )
      elif entry.kind in ("bpd", "rate_distortion") and "bpd" not in names:
        names = (*names, "bpd")
  if "sample" in names:
    out.append(_sampler_program(config, mesh, "sample", sc, sc.batch_size, "--mode=sample", **sampling_settings))
  if "bpd" in names:
    out.append(_bpd_program(config, mesh))
  return out


# ----------------------------------------------------------------------------
# Compiling, with the figures cached.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
  """What one compile for one slice gave, per device (one call; one loop trip for FLOPs and bytes)."""

  fits: bool
  compile_s: float
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  code_bytes: float = 0.0
  flops: float = 0.0
  bytes_accessed: float = 0.0  # XLA's cost analysis: every fused operation's operands and outputs, on-chip included
  hbm_bytes: float = 0.0  # read from the optimized program: HBM traffic only (0: an entry cached before it existed)
  required_bytes: float = 0.0  # a program that does not fit: what the compiler said it needs
  available_bytes: float = 0.0  # ... and what it has
  error: str = ""
  crashed: bool = False  # the compiler crashed (a fault in libtpu): neither fits nor says what it needs

  @property
  def total_bytes(self) -> float:
    """HBM in use while the program runs: arguments, temporaries, outputs not aliased to an argument, code."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_SHAPE = re.compile(r"\b(f64|s64|u64|f32|s32|u32|bf16|f16|s16|u16|s8|u8|pred)\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "while",
  "call",
  "conditional",
}


def _tensors(text: str) -> list[tuple[str, tuple[int, ...], bool]]:
  """(dtype, shape, on chip) of each array in an HLO shape; on chip: a layout in memory space 1 (`S(1)`, VMEM)."""
  return [
    (dt, tuple(int(d) for d in dims.split(",") if d), "S(1)" in layout) for dt, dims, layout in _SHAPE.findall(text)
  ]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
  return math.prod(shape) * _BYTES.get(dtype, 1)


def _is_parameter_shaped(shape: tuple[int, ...], param_shapes: set[tuple[int, ...]]) -> bool:
  """Shaped like a parameter, or like a slice of one along its leading axis (XLA's async prefetches)."""
  if shape in param_shapes:
    return True
  return any(len(p) == len(shape) and p[1:] == shape[1:] and shape[0] <= p[0] for p in param_shapes if p)


def hlo_computations(hlo: str) -> dict[str, list[str]]:
  """The module's computations: name -> instruction lines ("ENTRY" for the entry computation)."""
  out: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    if line and not line.startswith((" ", "}")) and line.rstrip().endswith("{"):
      current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
      out[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      out[current].append(line)
  return out


def hlo_loop_bodies(lines: list[str]) -> list[str]:
  """The body computations of the while loops among `lines`."""
  return [m.group(1) for line in lines for m in [re.search(r"body=%?([\w.\-]+)", line)] if m]


def hlo_traffic(lines: list[str], param_shapes: set[tuple[int, ...]] = frozenset()) -> dict:
  """HBM bytes of an optimized HLO computation's instructions (operands + outputs; an async copy or slice counts its
  destination once; arrays in memory space 1, on the chip, not at all) by (class, dtype), by kind of instruction,
  and the largest instructions. Class: "weights" for arrays shaped like one of `param_shapes` (or a leading-axis
  slice of one), "activations" for the rest."""
  outputs: dict[str, list] = {}
  by_class: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  largest = []
  for line in lines:
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape_text, op, rest = m.groups()
    out = _tensors(shape_text)
    moved = op in ("copy-start", "slice-start")
    if moved and len(out) >= 2:
      # ((source), destination, context): the destination is what crosses between HBM and the chip's memory.
      out = [(out[1][0], out[1][1], False)]
    outputs[name] = out
    if op in _FREE or op.endswith("-done"):
      continue
    operands = [a.strip().lstrip("%") for a in rest.split(")", 1)[0].split(",") if a.strip()]
    read = [] if moved else [t for a in operands for t in outputs.get(a, [])]
    kind = op
    if op == "fusion":
      kind = "convolution fusion" if "convolution" in line or "conv" in name else "fusion"
      if name.startswith("multiply_add_fusion"):
        kind = "optimizer/EMA update fusion"
    total = 0
    for dtype, shape, on_chip in out + read:
      if on_chip:  # read or written in the chip's own memory, not HBM
        continue
      n = _nbytes(dtype, shape)
      cls = "weights" if _is_parameter_shaped(shape, param_shapes) else "activations"
      by_class[(cls, dtype)] += n
      total += n
    by_kind[kind] += total
    largest.append((total, name, shape_text[:90]))
  largest.sort(reverse=True)
  return dict(by_class=by_class, by_kind=by_kind, largest=largest)


def hbm_bytes(hlo: str) -> float:
  """The HBM traffic of an optimized HLO module: its entry computation and each loop body once (XLA's convention for
  `bytes accessed`), arrays that live in the chip's own memory apart. Unlike XLA's `bytes accessed`, which counts
  every fused operation's operands and outputs wherever they live, this is what crosses to and from HBM."""
  comps = hlo_computations(hlo)
  if "ENTRY" not in comps:
    return 0.0
  parts = [comps["ENTRY"]] + [comps[n] for n in hlo_loop_bodies(comps["ENTRY"]) if n in comps]
  return float(sum(sum(hlo_traffic(lines)["by_class"].values()) for lines in parts))


_OOM = re.compile(
  r"(?:required|requires|needs?)[^()]*\(([\d.]+)\s*([KMGT]?)i?B?\)[^()]*available[^()]*\(([\d.]+)\s*([KMGT]?)i?B?\)"
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _parse_oom(message: str) -> tuple[float, float] | None:
  m = _OOM.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]


def _cost(compiled) -> tuple[float, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def versions() -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = "none"
  return {"jax": jax.__version__, "libtpu": libtpu}


def cache_dir() -> str | None:
  """plan/ in the package's cache directory (None when $DIFFUSION_JAX_CACHE_DIR turns caches off)."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  env = os.environ.get(runtime.CACHE_ENV)
  if env is not None and env.strip().lower() in ("0", "", "off", "false", "no"):
    return None
  return os.path.join(runtime.default_cache_dir(), "plan")


# The lines libtpu writes to stderr when it starts on a host that is not a TPU VM (no accelerator type, no worker
# hostnames): they say nothing about the compile.
_STARTUP_NOISE = (
  "could not determine TPU",
  "Logging before InitGoogle",
  "TPU_WORKER_HOSTNAMES",
  "Source Location Trace",
  "libtpu_init_utils",
  "Failed to find host bounds",
)


@contextlib.contextmanager
def _quiet_libtpu():
  """Holds back what libtpu writes to stderr (file descriptor 2) and passes on only what is not start-up noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines()
      keep = [line for line in lines if line.strip() and not any(n in line for n in _STARTUP_NOISE)]
      if keep:
        sys.stderr.write("\n".join(keep) + "\n")


def _setup_host() -> None:
  """Compiling for a TPU that is not here: no metadata-server queries; JAX itself runs on the CPU.

  libtpu is loaded without its one-process lock, so plans run beside each other and beside a run that holds the
  host's TPU: a plan only compiles.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top

  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  if not runtime.libtpu_installed():
    raise errors.MissingPackageError(
      f'The plan compiles for TPUs with libtpu, which is not installed here: pip install "jax[tpu]=={jax.__version__}"'
    )
  if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")


@functools.cache
def slice_devices(slice_name: str, num_slices: int = 1):
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  _setup_host()
  with _quiet_libtpu():
    return tuple(runtime.topology_devices(slice_name, num_slices))


class NotCached(Exception):
  """`only_cached=True` and a program whose figures are not in the cache."""


class ChildCrashed(Exception):
  """The process `run_isolated` started ended by a signal."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"the process ended by {_signal_name(signum)}")


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


# Signals by which a process ends of its own fault (a compiler's crash does again on the same program), unlike
# SIGKILL or SIGTERM (the out-of-memory killer, a person): a compile that ended by one of these is cached.
_FAULTS = frozenset(
  int(getattr(signal, name)) for name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE") if hasattr(signal, name)
)

_CHILD = """
import pickle, sys
with open(sys.argv[1], "rb") as f:
  fn, args = pickle.load(f)
try:
  out = pickle.dumps(("value", fn(*args)))
except BaseException as e:
  try:
    out = pickle.dumps(("raised", e))
  except Exception:  # an error that does not pickle: its type and message
    out = pickle.dumps(("raised", RuntimeError(f"{type(e).__name__}: {e}")))
with open(sys.argv[2], "wb") as f:
  f.write(out)
"""


def run_isolated(fn: Callable[..., Any], *args) -> Any:
  """fn(*args) run in a fresh Python process: a crash there (a fault in native code) cannot end this one.

  `fn` and `args` go by pickle (so `fn` is a module-level function); the child imports from this process's
  sys.path and inherits its environment and stderr. Returns what `fn` returned and raises what it raised;
  raises `ChildCrashed` where the process ended by a signal.
  """
  with tempfile.TemporaryDirectory(prefix="diffusion_jax_plan_") as tmp:
    request, reply = os.path.join(tmp, "request"), os.path.join(tmp, "reply")
    with open(request, "wb") as f:
      pickle.dump((fn, args), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    sys.stderr.flush()
    rc = subprocess.run([sys.executable, "-c", _CHILD, request, reply], env=env, check=False).returncode
    if rc < 0:
      raise ChildCrashed(-rc)
    try:
      with open(reply, "rb") as f:
        kind, value = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError) as e:
      raise RuntimeError(f"the isolated process exited with status {rc} and no result") from e
  if kind == "raised":
    raise value
  return value


def compile_figures(
  program: Program,
  slice_name: str,
  num_slices: int = 1,
  *,
  use_cache: bool = True,
  only_cached: bool = False,
  elsewhere: Callable[[Any, str], Figures] | None = None,
) -> tuple[Figures, bool]:
  """(figures, from the cache?) of `program` compiled for the slice; a program that does not fit gives fits=False.

  `elsewhere(lowered, key)`, where given, compiles the program (lowered, its cache key) and gives its figures, in
  another process (see `run_isolated`): a crash there gives figures with crashed=True.
  """
  lowered = program.jitted.trace(*program.args).lower()
  key = _cache_key(lowered.as_text(), slice_name, num_slices)
  directory = cache_dir() if use_cache else None
  path = os.path.join(directory, f"{key}.json") if directory else None
  if path and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return Figures(**json.load(f)), True
    except (OSError, ValueError, TypeError):
      pass  # a damaged entry: compile again
  if only_cached:
    raise NotCached(f"{program.name} for {slice_name} is not in the cache")
  if elsewhere is None:
    figures = _compile_lowered(lowered)
  else:
    t0 = time.perf_counter()
    try:
      figures = elsewhere(lowered, key)
    except ChildCrashed as e:
      if e.signum not in _FAULTS:
        raise
      figures = Figures(
        fits=False,
        compile_s=time.perf_counter() - t0,
        crashed=True,
        error=f"the compiler crashed ({_signal_name(e.signum)}; libtpu {versions()['libtpu']})",
      )
  if path:
    from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

    os.makedirs(directory, exist_ok=True)
    runtime.atomic_write(path, json.dumps(dataclasses.asdict(figures), indent=1))
  return figures, False


def _cache_key(text: str, slice_name: str, num_slices: int) -> str:
  """The figures' cache key: the lowered program's text, the slice, the jax and libtpu versions."""
  head = json.dumps([slice_name, num_slices, versions()]).encode()
  return hashlib.sha256(head + b"\0" + text.encode()).hexdigest()[:32]


def _compile_lowered(lowered) -> Figures:
  import jax  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  # JAX's persistent compilation cache holds executables for the devices of this host: none for a TPU that is
  # not here (its figures are cached above instead).
  persistent = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    with _quiet_libtpu(), warnings.catch_warnings():
      # Where the persistent cache was already in use when the plan began (a notebook, a test), JAX looks there
      # anyway, and says it cannot read a TPU executable on this host: the figures' own cache covers it.
      warnings.filterwarnings("ignore", message="Error (reading|writing) persistent compilation cache entry")
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
      raise
    parsed = _parse_oom(message) or (0.0, 0.0)
    return Figures(
      fits=False,
      compile_s=time.perf_counter() - t0,
      required_bytes=parsed[0],
      available_bytes=parsed[1],
      error=message.strip().splitlines()[0][:500],
    )
  finally:
    jax.config.update("jax_enable_compilation_cache", persistent)
  memory = compiled.memory_analysis()
  flops, bytes_accessed = _cost(compiled)
  return Figures(
    fits=True,
    compile_s=time.perf_counter() - t0,
    argument_bytes=float(memory.argument_size_in_bytes),
    output_bytes=float(memory.output_size_in_bytes),
    alias_bytes=float(memory.alias_size_in_bytes),
    temp_bytes=float(memory.temp_size_in_bytes),
    code_bytes=float(memory.generated_code_size_in_bytes),
    flops=flops,
    bytes_accessed=bytes_accessed,
    hbm_bytes=hbm_bytes(compiled.as_text()),
  )


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class ProgramPlan:
  program: str
  description: str
  batch: int
  batch_per_device: int
  trips: int
  unit: str
  figures: Figures
  cached: bool
  chip: Chip
  paper: PaperFigure | None = None

  @property
  def compute_s(self) -> float:
    return self.figures.flops / self.chip.device_peak_flops

  @property
  def memory_s(self) -> float:
    return self.figures.bytes_accessed / self.chip.device_hbm_bandwidth

  @property
  def trip_s(self) -> tuple[float, float]:
    """Roofline bounds of one trip (one step; one sampler step; one bpd term): max and sum of the two times."""
    return max(self.compute_s, self.memory_s), self.compute_s + self.memory_s

  @property
  def call_s(self) -> tuple[float, float]:
    lo, hi = self.trip_s
    return lo * self.trips, hi * self.trips

  @property
  def images_per_s(self) -> tuple[float, float]:
    """Roofline bounds of the images a call handles per second (slowest, fastest)."""
    lo, hi = self.call_s
    return (self.batch / hi if hi else 0.0), (self.batch / lo if lo else 0.0)

  def to_dict(self) -> dict[str, Any]:
    f = self.figures
    out = {
      "program": self.program,
      "description": self.description,
      "batch": self.batch,
      "batch_per_device": self.batch_per_device,
      "trips": self.trips,
      "unit": self.unit,
      "cached": self.cached,
      **dataclasses.asdict(f),
      "total_bytes": f.total_bytes,
    }
    if f.fits:
      out.update(
        compute_s=self.compute_s,
        memory_s=self.memory_s,
        trip_s=list(self.trip_s),
        call_s=list(self.call_s),
        images_per_s=list(self.images_per_s),
        flops_per_byte=f.flops / f.bytes_accessed if f.bytes_accessed else None,
        flops_per_hbm_byte=f.flops / f.hbm_bytes if f.hbm_bytes else None,
      )
    if self.paper:
      out["paper"] = dataclasses.asdict(self.paper)
    return out


@dataclasses.dataclass
class MaxBatch:
  program: str
  largest_fitting: int  # global batch
  smallest_failing: int | None
  per_device: int
  compiles: list[tuple[int, bool, float]]  # (global batch, fits, HBM total or required)
  crashed: list[int] = dataclasses.field(default_factory=list)  # batches whose compile crashed


@dataclasses.dataclass
class Plan:
  """A config's programs compiled for a TPU slice; `table()` is the printed report."""

  config_name: str
  slice: Any  # runtime.TpuSlice
  num_slices: int
  chip: Chip
  programs: list[ProgramPlan]
  max_batch: MaxBatch | None = None
  advice: list[str] = dataclasses.field(default_factory=list)  # one message per program that does not fit
  notes: list[str] = dataclasses.field(default_factory=list)  # what the figures suggest for a program that fits

  @property
  def fits(self) -> bool:
    return all(p.figures.fits for p in self.programs)

  def to_dict(self) -> dict[str, Any]:
    return {
      "config": self.config_name,
      "slice": dataclasses.asdict(self.slice),
      "num_slices": self.num_slices,
      "chip": dataclasses.asdict(self.chip),
      "versions": versions(),
      "programs": [p.to_dict() for p in self.programs],
      "max_batch": dataclasses.asdict(self.max_batch) if self.max_batch else None,
      "advice": self.advice,
      "notes": self.notes,
    }

  def table(self) -> str:
    s, chip = self.slice, self.chip
    slices = f" × {self.num_slices} slices" if self.num_slices > 1 else ""
    devices = s.devices * self.num_slices
    lines = [
      f"Plan of {self.config_name} on {s.name}{slices}: {devices} devices ({chip.kind}, {s.chips * self.num_slices} "
      f"chips, {s.hosts * self.num_slices} host(s)); per device {_gib(chip.device_hbm_bytes)} HBM, "
      f"{chip.device_peak_flops / 1e12:.1f} TFLOP/s bf16, {chip.device_hbm_bandwidth / 1e9:.0f} GB/s "
      f"({chip.source}).",
      "Estimates from the compiled programs (XLA's cost model and memory analysis, per device), not measurements.",
      "Bytes: XLA's count (every fused operation's operands and outputs, on-chip memory included; the roofline's) "
      "and the HBM traffic read from the program (arrays the compiler keeps on the chip apart).",
      "",
    ]
    head = (
      "program",
      "batch (/device)",
      "HBM GiB: args + temps + outs + code = total",
      "FLOPs/trip",
      "bytes/trip: XLA | HBM",
      "roofline /trip",
      "rate (roofline)",
      "compile",
    )
    rows = [head]
    for p in self.programs:
      f = p.figures
      batch = f"{p.batch} ({p.batch_per_device})"
      compile_s = "cached" if p.cached else f"{f.compile_s:.0f} s"
      if not f.fits:
        need = f"needs {_gib(f.required_bytes)} of {_gib(f.available_bytes)}" if f.required_bytes else f.error
        rows.append((p.program, batch, "DOES NOT FIT: " + need, "", "", "", "", compile_s))
        continue
      mem = (
        f"{_gb(f.argument_bytes)} + {_gb(f.temp_bytes)} + {_gb(f.output_bytes - f.alias_bytes)} + "
        f"{_gb(f.code_bytes)} = "
        f"{_gb(f.total_bytes)} ({100 * f.total_bytes / chip.device_hbm_bytes:.0f}%)"
      )
      lo, hi = p.trip_s
      trip = f"{_ms(lo)}–{_ms(hi)}"
      rate = _rate_text(p) + ("" if p.program == "train" else f" ({p.trips} {p.unit}s)")
      hbm = f"{f.hbm_bytes:.3g}" if f.hbm_bytes else "–"
      rows.append((p.program, batch, mem, f"{f.flops:.3g}", f"{f.bytes_accessed:.3g} | {hbm}", trip, rate, compile_s))
    lines += _format_rows(rows)
    for p in self.programs:
      if p.paper is not None and p.figures.fits:
        lines.append(
          f"Paper, measured with its TensorFlow code on {p.paper.slice_name}: {p.paper.text} — "
          f"{p.program} above: {_rate_text(p)} (roofline estimate)."
        )
    for p in self.programs:
      lines.append(f"{p.program}: {p.description}.")
    if self.max_batch:
      m = self.max_batch
      fail = f"; {m.smallest_failing} does not" if m.smallest_failing else ""
      if m.smallest_failing in m.crashed:
        fail += " (the compiler crashes compiling it)"
      lines.append(
        f"Largest {m.program} batch that fits: {m.largest_fitting} ({m.per_device} per device, "
        f"{m.per_device * chip.devices_per_chip} per chip){fail}; found by compiling {len(m.compiles)} batch sizes."
      )
    lines += self.advice + self.notes
    return "\n".join(lines)


def _rate_text(p: ProgramPlan) -> str:
  lo, hi = p.trip_s
  if p.program == "train":
    return f"{1 / hi:.3g}–{1 / lo:.3g} steps/s"
  slow, fast = p.images_per_s
  return f"{slow:.3g}–{fast:.3g} img/s"


def _format_rows(rows) -> list[str]:
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def _gb(n: float) -> str:  # GiB, without the unit (the column names it)
  return f"{n / GiB:.2f}" if n >= 0.01 * GiB else f"{n / GiB:.3f}"


def _ms(s: float) -> str:
  return f"{s * 1e3:.3g} ms" if s < 10 else f"{s:.3g} s"


# ----------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------


def _with(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def _log(message: str, progress: Callable[[str], None] | None) -> None:
  if progress is not None:
    progress(message)


def plan(
  config: ml_collections.ConfigDict,
  slice_name: str,
  *,
  programs: Sequence[str] = PROGRAMS,
  num_slices: int = 1,
  max_batch: bool = False,
  max_batch_tolerance: float = 0.125,
  advise: bool = True,
  use_cache: bool = True,
  config_name: str = "the config",
  progress: Callable[[str], None] | None = None,
  only_cached: bool = False,
) -> Plan:
  """Compiles the run's `programs` for `num_slices` TPU slices named `slice_name` (e.g. "v5e-8") and sizes them.

  Args:
    config: the run's config.
    slice_name: a Cloud TPU accelerator type: v3-8, v4-8, v5e-8, v5p-8, v6e-8, v4-32, ...
    programs: among PROGRAMS.
    num_slices: slices joined over the data-centre network (multislice).
    max_batch: also find the largest train batch that fits, by compiling only.
    max_batch_tolerance: how close (a fraction) the smallest failing batch must be to the largest fitting one.
    advise: for a program that does not fit, find what would (the largest batch; `model.remat`; bfloat16).
    use_cache: reuse and keep compiled figures (plan/ in the package's cache directory).
    config_name: how the report names the config.
    progress: called with a line before and after each compile.
    only_cached: compile nothing: raise `NotCached` for a program whose figures are not in the cache.

  Returns:
    The `Plan`; `plan.table()` is the report.
  """
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  spec = runtime.tpu_slice(slice_name)
  chip = CHIPS[spec.generation]
  devices = slice_devices(spec.name, num_slices)
  mesh = runtime.make_mesh(config, devices=devices)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked, ours
  built = programs_of(config, mesh, programs)
  out = []
  for i, program in enumerate(built):
    figures, cached = _compile(
      program, spec.name, num_slices, use_cache, progress, f"[{i + 1}/{len(built)}] ", only_cached=only_cached
    )
    paper = paper_figure(spec.name, program.name, int(config.data.image_size), program.batch, program.trips)
    out.append(
      ProgramPlan(
        program.name,
        program.description,
        program.batch,
        program.batch // mesh.size,
        program.trips,
        program.unit,
        figures,
        cached,
        chip,
        paper if num_slices == 1 else None,
      )
    )
  result = Plan(config_name, spec, num_slices, chip, out)
  train = next((p for p in out if p.program == "train"), None)
  if train is not None and (max_batch or (advise and not train.figures.fits)):  # what fits, by compiling
    result.max_batch = largest_batch(
      config,
      mesh,
      spec.name,
      num_slices,
      train,
      tolerance=max_batch_tolerance,
      use_cache=use_cache,
      progress=progress,
      only_cached=only_cached,
    )
  groups, d = int(config.optim.clip_groups), mesh.size
  if (
    train is not None
    and groups > 1
    and d > 1
    and not (groups % d == 0 or (d % groups == 0 and not config.model.dropout))
  ):
    result.notes.append(
      f"Note: optim.clip_groups={groups} on {d} devices{' with dropout' if config.model.dropout else ''} takes the "
      "train step's global grouped form (train_step.grouped_clipped_gradients), which repeats the groups' work "
      f"across the devices; a multiple of {d} (--config.optim.clip_groups={d}) or 1 keeps each device on its own rows."
    )
  for p in out:
    if not p.figures.fits:
      result.advice.append(
        _advice(config, mesh, spec.name, num_slices, p, result.max_batch, use_cache, progress, compile_more=advise)
      )
  return result


def _compile(
  program: Program, slice_name, num_slices, use_cache, progress, prefix="", only_cached=False, elsewhere=None
) -> tuple[Figures, bool]:
  _log(f"{prefix}{program.name}: compiling for {slice_name} (batch {program.batch}) ...", progress)
  figures, cached = compile_figures(
    program, slice_name, num_slices, use_cache=use_cache, only_cached=only_cached, elsewhere=elsewhere
  )
  verdict = "the compiler crashed" if figures.crashed else "fits" if figures.fits else "does not fit"
  _log(
    f"{prefix}{program.name}: {'from the cache' if cached else f'compiled in {figures.compile_s:.0f} s'}, {verdict}.",
    progress,
  )
  return figures, cached


def _train_figures(
  config, mesh, slice_name, num_slices, batch: int, use_cache, progress, only_cached=False, **overrides
) -> Figures:
  """The train step at `batch` (and `overrides`), compiled in a process of its own (see `run_isolated`).

  The batches and variants a search tries are where the compiler is pushed hardest, and where it has crashed: a
  crash there is a figure of the search (crashed=True), not the end of the plan.
  """
  config = _with(config, training__batch_size=int(batch), **overrides)
  program = _train_program(config, mesh)
  plain = config.to_dict()

  def elsewhere(lowered, key: str) -> Figures:
    try:
      return run_isolated(_compile_train, plain, slice_name, num_slices, key)
    except _OtherProgram:  # a jax.config setting of this process's that the child lacks: compile here
      return _compile_lowered(lowered)

  return _compile(
    program, slice_name, num_slices, use_cache, progress, "  ", only_cached=only_cached, elsewhere=elsewhere
  )[0]


class _OtherProgram(Exception):
  """The child lowered a program other than its parent's."""


def _compile_train(config: dict, slice_name: str, num_slices: int, key: str) -> Figures:
  """`_train_figures`' child: the train step of `config` compiled for the slice, if it is the parent's program."""
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config)
  mesh = runtime.make_mesh(config, devices=slice_devices(slice_name, num_slices))
  program = _train_program(config, mesh)
  lowered = program.jitted.trace(*program.args).lower()
  if _cache_key(lowered.as_text(), slice_name, num_slices) != key:
    raise _OtherProgram
  return _compile_lowered(lowered)


def largest_batch(
  config,
  mesh,
  slice_name,
  num_slices,
  train: ProgramPlan,
  *,
  tolerance=0.125,
  use_cache=True,
  progress=None,
  only_cached=False,
  **overrides,
) -> MaxBatch:
  """The largest global train batch (a multiple of the devices and of optim.clip_groups) that compiles within HBM.

  See `search_batch`; each candidate is compiled for the slice (with the config changed by `overrides`).
  """
  d = mesh.size
  groups = int(config.optim.clip_groups)

  def figures_at(batch: int) -> Figures:
    if batch == train.batch and not overrides:
      return train.figures
    return _train_figures(
      config, mesh, slice_name, num_slices, batch, use_cache, progress, only_cached=only_cached, **overrides
    )

  return search_batch(
    figures_at,
    start=train.batch,
    unit=d * groups // math.gcd(d, groups),
    available=CHIPS[runtime_generation(slice_name)].device_hbm_bytes,
    devices=d,
    tolerance=tolerance,
  )


def search_batch(
  figures_at: Callable[[int], Figures], *, start: int, unit: int, available: float, devices: int, tolerance: float
) -> MaxBatch:
  """The largest batch (a multiple of `unit`) for which `figures_at(batch)` fits, compiling as little as it can.

  A batch that does not fit is cheap to try: the compiler gives up within a minute and says how much HBM it would
  need. One that fits is compiled to the end (minutes to an hour for the paper's networks). So the search probes
  from above: from the first batch's HBM it guesses where the limit is and tries four times that (doubling up
  from a batch that fits, four times at a time, until one does not); then, between the largest batch that fits and
  the smallest that does not, it tries where the line through their HBM crosses the compiler's (or `available`,
  until the compiler has said it), or one step above the batch that fits where the line says that is the limit.
  Where the compiler squeezes a batch in by recomputing (a batch fits where the line said it would not) the line
  says nothing more, and it steps down from the failing batch, a fraction `tolerance` at a time, to the first
  that fits (bisecting where `tolerance` is 0), or at once to where the line through the failures' own HBM
  crosses the compiler's, where that line agrees that the fitting batch fits (`_failures_crossing`). It stops
  when the batch that fails is within `tolerance` (a fraction) of the one that fits, or one `unit` above it. A
  batch whose compile crashes (`Figures.crashed`) counts as one that does not fit, of unknown HBM: the search
  steps down from it.
  """
  record: list[tuple[int, bool, float]] = []
  crashed: list[int] = []
  capacity = [available]
  fixed = [0.0]

  def fits(batch: int) -> bool:
    f = figures_at(batch)
    if f.crashed:
      crashed.append(batch)
    used = f.total_bytes if f.fits else f.required_bytes
    if f.available_bytes:
      capacity[0] = f.available_bytes  # the compiler's own figure
    if f.fits and not record:
      fixed[0] = f.argument_bytes
    record.append((batch, f.fits, used))
    return f.fits

  def down(b: float) -> int:
    return int(b // unit * unit)

  def step(lo: int) -> int:
    return max(unit, down(tolerance * lo))

  def done(lo: int, hi: int | None) -> bool:
    return hi is not None and (hi - lo <= max(unit, tolerance * lo) or (lo == 0 and hi <= unit))

  b0 = max(unit, down(start))
  lo, hi = (b0, None) if fits(b0) else (0, b0)
  squeezed = expect_fail = False
  for _ in range(40):
    if done(lo, hi):
      break
    used = {b: m for b, _, m in record}
    if hi is None:  # nothing has failed yet: overshoot (a failure is cheap)
      if len(record) == 1:
        per_image = max(used[lo] - fixed[0], 1.0) / lo
        guess = lo + max(capacity[0] - used[lo], 0.0) / per_image
        candidate = max(down(4 * guess), 2 * lo)
      else:
        candidate = 4 * lo
    elif lo == 0:  # nothing fits yet: the line through the two smallest failures, else half
      failed = sorted(b for b, ok, _ in record if not ok and b not in crashed)[:2]
      candidate = down(hi / 2)
      if len(failed) == 2:
        (b1, m1), (b2, m2) = [(b, used[b]) for b in failed]
        slope = (m2 - m1) / (b2 - b1)
        if slope > 0:
          candidate = min(candidate, max(unit, down(b1 - (m1 - capacity[0]) / slope)))
      if candidate < unit:
        break
    else:
      below = -down(-hi / (1 + tolerance)) if tolerance else hi - unit  # fits: done
      if squeezed or hi in crashed or used[hi] <= used[lo]:
        squeezed = squeezed or hi not in crashed  # a crash says nothing of HBM: step down from it
        candidate = below if tolerance else down((lo + hi) / 2)
        jump = _failures_crossing(record, crashed, lo, capacity[0], down) if tolerance else None
        if jump is not None:  # the failures' own HBM says the limit is further down: go there at once
          candidate = min(below, max(jump, lo + step(lo)))
      else:
        crossing = down(lo + (capacity[0] - used[lo]) * (hi - lo) / (used[hi] - used[lo]))
        expect_fail = crossing < lo + step(lo)  # the line says lo is the limit: one step up confirms it
        candidate = min(max(crossing, lo + step(lo)), below)
    if candidate <= lo or (hi is not None and candidate >= hi):
      candidate = down((lo + hi) / 2) if hi is not None else 2 * max(lo, unit)
      if candidate <= lo:
        break
    if fits(candidate):
      squeezed = squeezed or expect_fail  # it fits where the line said it would not: the compiler recomputes
      lo = candidate
    else:
      hi = candidate
    expect_fail = False
  return MaxBatch("train", lo, hi, lo // devices if lo else 0, record, crashed)


def _failures_crossing(record, crashed, lo: int, capacity: float, down: Callable[[float], int]) -> int | None:
  """Where the line through the two smallest failures' HBM crosses `capacity`, if that line has `lo` (nearly) fit.

  A compiler that recomputes to squeeze a batch in says, for one it cannot, what it needs after trying: near the
  limit those figures are close to the capacity, and their line finds the limit from above in a few failing
  compiles. One whose figures are what it would need without recomputing puts `lo` (which fits) above the
  capacity on that line, by more than the 2% a figure after squeezing may exceed it: then the line says nothing
  (None), and the search steps down a fraction at a time.
  """
  failed = sorted((b, m) for b, ok, m in record if not ok and b not in crashed and m > 0)[:2]
  if len(failed) < 2:
    return None
  (b1, m1), (b2, m2) = failed
  slope = (m2 - m1) / (b2 - b1)
  if slope <= 0 or m1 - slope * (b1 - lo) > 1.02 * capacity:
    return None
  return down(b1 - (m1 - capacity) / slope)


def runtime_generation(slice_name: str) -> str:
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  return runtime.tpu_slice(slice_name).generation


def _advice(
  config,
  mesh,
  slice_name,
  num_slices,
  p: ProgramPlan,
  max_batch: MaxBatch | None,
  use_cache,
  progress,
  *,
  compile_more: bool = True,
) -> str:
  """One message for a program that does not fit: what it needs, what the compiler has, and what would fit."""
  f = p.figures
  head = (
    f"{p.program} does not fit on {slice_name}: it needs {_gib(f.required_bytes)} of HBM per device and the "
    f"compiler has {_gib(f.available_bytes)}"
    if f.required_bytes
    else f"{p.program} does not fit on {slice_name} ({f.error})"
  )
  if not compile_more:
    return head + " (--advise compiles what would fit)."
  if p.program != "train":
    return head + f"; lower its batch ({p.batch}: config.sampling.batch_size or config.eval.batch_size)."
  tries = []
  if max_batch and max_batch.largest_fitting:
    tries.append(
      f"the largest batch that fits is {max_batch.largest_fitting} (--config.training.batch_size="
      f"{max_batch.largest_fitting})"
    )
  elif max_batch:
    tries.append("no batch fits")
  variants = []
  if not config.model.get("remat", False):
    variants.append(("model.remat=True", dict(model__remat=True)))
  if config.model.get("dtype", "float32") != "bfloat16":
    variants.append(("model.dtype=bfloat16", dict(model__dtype="bfloat16")))
    if not config.model.get("remat", False):
      variants.append(("model.remat=True and model.dtype=bfloat16", dict(model__remat=True, model__dtype="bfloat16")))
  for name, overrides in variants:
    g = _train_figures(config, mesh, slice_name, num_slices, p.batch, use_cache, progress, **overrides)
    if g.crashed:
      tries.append(f"with {name} the compiler crashes")
      continue
    if g.fits:
      tries.append(f"with {name} batch {p.batch} fits ({_gib(g.total_bytes)})")
      break
    tries.append(f"with {name} it still needs {_gib(g.required_bytes)}")
  return head + "; " + "; ".join(tries) + "."


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
  flags.DEFINE_list("topology", None, "TPU slices as Cloud TPU names them: v3-8, v4-8, v5e-8, v5p-8, v6e-8, v4-32, ...")
  flags.DEFINE_integer("num_slices", 1, "Slices of that topology in a multislice run.")
  flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, among {', '.join(PROGRAMS)}.")
  flags.DEFINE_bool("max_batch", False, "Also find the largest train batch that fits, by compiling only.")
  flags.DEFINE_float(
    "max_batch_tolerance",
    0.125,
    "--max_batch stops when the smallest batch that fails is within "
    "this fraction of the largest that fits (0: one batch step; each step is a compile).",
  )
  flags.DEFINE_bool("advise", True, "For a program that does not fit, compile what would (slow).")
  flags.DEFINE_bool("cache", True, "Reuse and keep compiled figures (the plan/ folder of the package's cache).")
  flags.DEFINE_string("json_out", "", "Also write the plans as JSON to this file (it must not exist).")
  flags.mark_flags_as_required(["config", "topology"])


def _main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  FLAGS = flags.FLAGS  # noqa: N806
  if FLAGS.json_out and os.path.exists(FLAGS.json_out):
    raise errors.ExistingFileError(f"--json_out={FLAGS.json_out} exists; name a new file (nothing is overwritten).")
  # Checked before anything heavy: libtpu, the slice names.
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  for name in FLAGS.topology:
    runtime.tpu_slice(name)
  _setup_host()
  cli.start()
  reports, not_fitting = [], []
  for name in FLAGS.topology:
    report = plan(
      FLAGS.config,
      name,
      programs=tuple(FLAGS.programs),
      num_slices=FLAGS.num_slices,
      max_batch=FLAGS.max_batch,
      max_batch_tolerance=FLAGS.max_batch_tolerance,
      advise=FLAGS.advise,
      use_cache=FLAGS.cache,
      config_name=flags.FLAGS["config"].value and _config_path(),
      progress=logging.info,
    )
    print(report.table(), flush=True)
    print(flush=True)
    reports.append(report)
    not_fitting += report.advice or [
      f"{p.program} does not fit on {name}" for p in report.programs if not p.figures.fits
    ]
  if FLAGS.json_out:
    runtime.atomic_write(FLAGS.json_out, json.dumps([r.to_dict() for r in reports], indent=1))
  if not_fitting:
    raise errors.UserError(" ".join(not_fitting))


def _config_path() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "the config"


def main(argv) -> None:
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top

  cli.exit_on_user_error(_main, argv)


def _run() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  # `python -m diffusion_jax.plan` runs the imported module rather than this copy of it (__main__): the functions
  # and classes the search's compile processes exchange by pickle are then diffusion_jax.plan's, which they import.
  from diffusion_jax import plan as _plan  # pylint: disable=g-import-not-at-top,import-self

  _plan._run()  # noqa: SLF001
