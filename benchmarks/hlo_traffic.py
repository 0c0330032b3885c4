r"""Where a compiled train step's HBM bytes go: the optimized TPU program read instruction by instruction.

Compiles a config's train step for a TPU slice (as `diffusion_jax.plan` does: libtpu on this host, no TPU needed)
and reads the optimized HLO's top-level instructions: each one's bytes are its operands plus its outputs (an async
copy or slice counts its destination once, its done op nothing). Every tensor is then put in one class:

* parameter-shaped (`weights`): shaped like a parameter or a slice of one: the parameters, their bfloat16 copies,
  gradients, Adam moments and the EMA, by dtype;
* `activations`: everything else (the network's activations and their gradients), by dtype;

and the same bytes by kind of instruction (convolution fusions, elementwise fusions, the optimizer's fused update,
all-reduce, async copies). Arrays laid out in the chip's own memory (memory space 1: VMEM, where XLA keeps most
activations of the v5e program and prefetches parameter slices) are not HBM traffic and are not counted.

XLA's own figure (`cost_analysis()["bytes accessed"]`, the plan's bytes) counts every operand and output of every
fused operation wherever it lives, on-chip memory included, so on generations whose compiler keeps activations in
VMEM it is far above the HBM traffic. It is printed beside this reading. On a v3 program (no VMEM-resident arrays)
the two agree within about 10%: this reading explains where the bytes go, not their last digit.

  python -m benchmarks.hlo_traffic --config=configs/cifar.py --topology=v5e-4 --config.model.dtype=bfloat16
  python -m benchmarks.hlo_traffic --hlo=/tmp/step.hlo --params=configs/cifar.py   # an HLO dumped earlier

Needs `jax[tpu]` (libtpu) to compile; `--hlo` reads a saved program instead (`--save_hlo` writes one).
"""

from __future__ import annotations

import collections
import json
import math
import re
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-4", "TPU slice (Cloud TPU name).")
_HLO = flags.DEFINE_string("hlo", "", "Read this optimized HLO text instead of compiling.")
_SAVE_HLO = flags.DEFINE_string("save_hlo", "", "Write the compiled program's optimized HLO here.")
_PROGRAM = flags.DEFINE_string("program", "train", "The plan's program: train, sample, grid or bpd.")
_TOP = flags.DEFINE_integer("top", 12, "Instructions listed, the largest first.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the figures here as JSON.")

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


def computations(hlo: str) -> dict[str, list[str]]:
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


def loop_bodies(lines: list[str]) -> list[str]:
  """The body computations of the while loops among `lines`."""
  return [m.group(1) for line in lines for m in [re.search(r"body=%?([\w.\-]+)", line)] if m]


def traffic(lines: list[str], param_shapes: set[tuple[int, ...]]) -> dict:
  """Bytes of a computation's instructions by class, dtype and kind; and the largest instructions."""
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


def main(argv):
  del argv
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top
  from diffusion_jax import plan  # pylint: disable=g-import-not-at-top
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  xla_bytes = None
  if _HLO.value:
    with open(_HLO.value, encoding="utf-8") as f:
      hlo = f.read()
    import jax  # pylint: disable=g-import-not-at-top
  else:
    plan._setup_host()  # pylint: disable=protected-access
    cli.start()
    import jax  # pylint: disable=g-import-not-at-top

    mesh = runtime.make_mesh(devices=runtime.topology_devices(_TOPOLOGY.value))
    program = plan.programs_of(config, mesh, (_PROGRAM.value,))[0]
    t0 = time.perf_counter()
    with plan._quiet_libtpu():  # pylint: disable=protected-access
      compiled = program.jitted.trace(*program.args).lower().compile()
    print(f"compiled in {time.perf_counter() - t0:.0f} s")
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla_bytes = float(analysis.get("bytes accessed", 0.0))
    hlo = compiled.as_text()
    if _SAVE_HLO.value:
      with open(_SAVE_HLO.value, "w", encoding="utf-8") as f:
        f.write(hlo)
  network, _ = runtime.build(config)
  params = jax.eval_shape(
    lambda: runtime.init_params(network, jax.random.PRNGKey(0), shape=runtime.image_shape(config))
  )
  param_shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
  param_bytes = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(params))
  comps = computations(hlo)
  parts = [("the program (outside its loops)", comps["ENTRY"])]
  parts += [(f"one trip of the loop {name}", comps[name]) for name in loop_bodies(comps["ENTRY"]) if name in comps]
  if xla_bytes is not None:
    print(f"XLA's cost analysis: {xla_bytes:.4g} bytes accessed (a loop body counted once)")
  print(f"The float32 parameters are {param_bytes / 1e6:.0f} MB; 'passes' below are bytes / that.")
  results = {}
  for title, lines in parts:
    t = traffic(lines, param_shapes)
    total = sum(t["by_class"].values())
    if not total:
      continue
    results[title] = t
    print(f"HBM bytes of {title}: {total:.4g}")
    for (cls, dtype), n in sorted(t["by_class"].items(), key=lambda kv: -kv[1])[:6]:
      print(f"  {cls:12s} {dtype:5s} {n:10.4g}  {n / total:5.1%}  {n / param_bytes:6.1f} passes")
    print("  by instruction kind:")
    for kind, n in t["by_kind"].most_common(8):
      print(f"    {kind:30s} {n:10.4g}  {n / total:5.1%}")
    print(f"  the {_TOP.value} largest instructions:")
    for n, name, shape in t["largest"][: _TOP.value]:
      print(f"    {n:10.4g}  {name:32s} {shape}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(
        dict(
          xla_bytes_accessed=xla_bytes,
          parameter_bytes=param_bytes,
          parts={
            title: dict(
              total=sum(t["by_class"].values()),
              by_class={f"{c}/{d}": n for (c, d), n in t["by_class"].items()},
              by_kind=dict(t["by_kind"]),
            )
            for title, t in results.items()
          },
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)
