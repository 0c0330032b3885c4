r"""A long run of the tiny config: does resident memory or the number of open files grow with the steps?

Trains configs/tiny.py for --steps steps with a checkpoint every 100 and a sample grid every 1,000 (the training
loop exactly as the command line runs it), and prints the process's resident memory and open file descriptors at
every 1,000th step, then their growth per 1,000 steps (a least-squares slope over the second half, after the
compilation caches and allocator pools have settled) and the checkpoints left on disk.

  python -m benchmarks.soak --steps=20000 --workdir=/tmp/soak
"""

from __future__ import annotations

import os
import shutil

from absl import app
from absl import flags

_STEPS = flags.DEFINE_integer("steps", 20_000, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 1_000, "Steps between readings (and sample grids).")
_GRIDS = flags.DEFINE_boolean("grids", True, "Write a sample grid at every reading (--nogrids: none).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/diffusion_jax_soak", "A fresh workdir (removed first).")


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def _open_fds() -> int:
  return len(os.listdir("/proc/self/fd"))


class _Readings:
  """The training loop's summary hook (train_and_evaluate(summary=...)): one reading per logged step."""

  def __init__(self):
    self.rows = []

  def started(self, step):
    del step

  def logged(self, step, metrics):
    self.rows.append((step, _rss_mib(), _open_fds()))
    print(f"step {step:>6}: resident {self.rows[-1][1]:8.1f} MiB, open files {self.rows[-1][2]:4d}", flush=True)


def _slope(xs, ys) -> float:
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  den = sum((x - mx) ** 2 for x in xs)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main(argv):
  del argv
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top

  cli.start()
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  config = tiny.get_config()
  config.training.update(
    num_train_steps=_STEPS.value,
    checkpoint_every=_CHECKPOINT_EVERY.value,
    sample_every=_EVERY.value if _GRIDS.value else 0,
    log_every=_EVERY.value,
  )
  readings = _Readings()
  train.train_and_evaluate(config, _WORKDIR.value, summary=readings)
  rows = readings.rows[len(readings.rows) // 2 :]
  steps = [r[0] / 1000 for r in rows]
  print(
    f"\n{_STEPS.value} steps of configs/tiny.py, a checkpoint every {_CHECKPOINT_EVERY.value}, "
    f"{f'a grid every {_EVERY.value}' if _GRIDS.value else 'no grids'}: growth per "
    f"1,000 steps over steps {rows[0][0]}-{rows[-1][0]}: resident memory {_slope(steps, [r[1] for r in rows]):+.2f} "
    f"MiB, open files {_slope(steps, [r[2] for r in rows]):+.2f}; resident memory at the end "
    f"{readings.rows[-1][1]:.1f} MiB; checkpoints on disk: {checkpointing.checkpoint_steps(_WORKDIR.value)} "
    f"(training.keep_checkpoints={config.training.keep_checkpoints})"
  )


if __name__ == "__main__":
  app.run(main)
