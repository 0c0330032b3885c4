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

import json
import math
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


def main(argv):
  del argv
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top
  from diffusion_jax import plan  # pylint: disable=g-import-not-at-top
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  xla_bytes = flops = None
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
    flops = float(analysis.get("flops", 0.0))
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
  comps = plan.hlo_computations(hlo)
  parts = [("the program (outside its loops)", comps["ENTRY"])]
  loops = [name for name in plan.hlo_loop_bodies(comps["ENTRY"]) if name in comps]
  parts += [(f"one trip of the loop {name}", comps[name]) for name in loops]
  if xla_bytes is not None:
    print(f"XLA's cost analysis: {flops:.4g} FLOPs, {xla_bytes:.4g} bytes accessed (a loop body counted once)")
  print(f"The float32 parameters are {param_bytes / 1e6:.0f} MB; 'passes' below are bytes / that.")
  results = {}
  for title, lines in parts:
    t = plan.hlo_traffic(lines, param_shapes)
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
          xla_flops=flops,
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
