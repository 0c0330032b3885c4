r"""Time to the first training step: cold (empty compilation cache, new run) and warm (a restart), per config.

For each config, in a fresh temporary directory:

* `import`: a bare `python -c "import jax, flax, optax, orbax.checkpoint"`, the floor any JAX program pays;
* `cold`: `python -m diffusion_jax.main` of a new run with an empty compilation cache
  (DIFFUSION_JAX_CACHE_DIR pointing at a new folder), until its first progress line (`step 1/…`);
* `warm`: the same command extending the finished run by a few steps (a restart: the checkpoint is restored
  and every program comes from the persistent cache), until its first progress line.

Each figure is the median of --repeats runs; `warm − import` is what the package adds to a restart.

  python -m benchmarks.startup --configs=configs/tiny.py,configs/digits.py --repeats=3
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list("configs", ["configs/tiny.py", "configs/digits.py"], "Configs to start.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per figure (the median is reported).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")

_FIRST_STEP = re.compile(r"\] step \d+/\d+ \|")


def _env(cache_dir: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "XLA_FLAGS"))}
  env.update(JAX_PLATFORMS="cpu", DIFFUSION_JAX_CACHE_DIR=cache_dir)
  return env


def time_to_first_step(command: list[str], env: dict[str, str], timeout: float = 600.0) -> float:
  """Seconds from the start of `command` to its first progress line; the process is then stopped."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    for line in proc.stdout:
      if _FIRST_STEP.search(line):
        return time.perf_counter() - t0
      if time.perf_counter() - t0 > timeout:
        break
    raise RuntimeError(f"{' '.join(command)} printed no progress line (exit status {proc.poll()}).")
  finally:
    proc.kill()
    proc.wait()


def bare_import() -> float:
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-c", "import jax, flax, optax, orbax.checkpoint"], check=True)
  return time.perf_counter() - t0


def _train(config: str, workdir: str, steps: int) -> list[str]:
  return [
    sys.executable,
    "-m",
    "diffusion_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.training.num_train_steps={steps}",
    "--config.training.log_every=1",
    "--config.training.sample_every=0",
    "--config.evals.digits.at_end=False",
    "--config.training.time_budget_s=0",
    f"--config.training.checkpoint_every={steps}",
  ]


def measure(config: str, repeats: int) -> dict[str, float]:
  runs = {"import": [], "cold": [], "warm": []}
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      cache, workdir = os.path.join(tmp, "cache"), os.path.join(tmp, "run")
      env = _env(cache)
      runs["import"].append(bare_import())
      runs["cold"].append(time_to_first_step(_train(config, workdir, 2), env))
      subprocess.run(_train(config, workdir, 2), env=env, check=True, capture_output=True)  # finish the run
      runs["warm"].append(time_to_first_step(_train(config, workdir, 12), env))
  out = {k: statistics.median(v) for k, v in runs.items()}
  out["warm_minus_import"] = out["warm"] - out["import"]
  out["runs"] = runs
  return out


def main(argv):
  del argv
  results = {}
  print(f"load average at the start: {os.getloadavg()}")
  for config in _CONFIGS.value:
    r = measure(config, _REPEATS.value)
    results[config] = r
    print(
      f"{config}: import {r['import']:.1f} s, cold first step {r['cold']:.1f} s, warm restart first step "
      f"{r['warm']:.1f} s (warm − import {r['warm_minus_import']:.1f} s; medians of {_REPEATS.value})",
      flush=True,
    )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
