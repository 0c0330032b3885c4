r"""Whether the package's XLA:CPU options (diffusion_jax/xla_flags.py) pay, on one or more installed JAX releases.

XLA_FLAGS are read once, when JAX starts its backends, so each contender is a
fresh process: a train- or sampling-throughput benchmark run with the options
(the default) or without them (DIFFUSION_JAX_XLA_FLAGS=0), under each given
Python interpreter (each with its own jax). One round runs every contender back
to back; ratios are taken within a round (the same load) and their median over
rounds is printed.

  python -m benchmarks.xla_cpu_options --pythons=python,/path/to/venv312/bin/python --rounds=3 -- \
      benchmarks.train_throughput --config=configs/digits.py --batch_size=64 --clip_groups=1 --steps=30 --window=5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_PYTHONS = flags.DEFINE_list("pythons", [sys.executable], "Python interpreters to run the benchmark under.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; each runs every contender once.")


def _rate(payload) -> float:
  row = payload["rows"][0]
  return float(row.get("images_per_s") or row["image_steps_per_s"])


def _run(python: str, options: bool, module_args: list[str]) -> tuple[float, str]:
  """(rate, jax version) of one benchmark run in a fresh process."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["DIFFUSION_JAX_XLA_FLAGS"] = "1" if options else "0"
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    command = [python, "-m", *module_args, "--torch=false", f"--json_out={out}"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      payload = json.load(f)
  return _rate(payload), payload["environment"]["jax"]


def main(argv):
  module_args = argv[1:]
  if not module_args:
    raise app.UsageError("Give the benchmark after --, e.g. -- benchmarks.train_throughput --config=...")
  contenders = [(p, o) for p in _PYTHONS.value for o in (True, False)]
  rates = {c: [] for c in contenders}
  versions = {}
  for r in range(_ROUNDS.value):
    for python, options in contenders:
      rate, versions[python] = _run(python, options, module_args)
      rates[(python, options)].append(rate)
      print(f"round {r + 1}: jax {versions[python]}, options {'on ' if options else 'off'}: {rate:.4g}/s", flush=True)
  print(f"\n{' '.join(module_args)}; medians over {_ROUNDS.value} rounds (ratios within each round)")
  base = _PYTHONS.value[0]
  for python in _PYTHONS.value:
    on, off = rates[(python, True)], rates[(python, False)]
    ratio = statistics.median(a / b for a, b in zip(on, off))
    line = (
      f"  jax {versions[python]}: options on {statistics.median(on):.4g}/s, off {statistics.median(off):.4g}/s, "
      f"on/off {ratio:.3f} (rounds: {', '.join(f'{a / b:.3f}' for a, b in zip(on, off))})"
    )
    if python != base:
      for options in (True, False):
        vs = statistics.median(a / b for a, b in zip(rates[(python, options)], rates[(base, options)]))
        line += f"; against jax {versions[base]} with options {'on' if options else 'off'}: {vs:.3f}"
    print(line)


if __name__ == "__main__":
  app.run(main)
