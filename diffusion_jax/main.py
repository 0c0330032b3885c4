r"""Command-line entry point.

  python -m diffusion_jax.main --config=configs/cifar.py --workdir=/path/to/run [--mode=train]

Override any config field on the command line, e.g.
`--config.training.batch_size=64`; misspelt fields are an error. The workdir
keeps the run's config, checkpoints, TensorBoard logs, samples and eval
results; running the same command again continues the run.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "fid_stats")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples, eval results.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the workdir.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process GPU runs (TPU VMs and SLURM need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _hide_accelerators_from_tensorflow() -> None:
  """tfds may import TensorFlow; it must not take GPU/TPU memory that JAX needs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")
  try:
    tf.config.set_visible_devices([], "TPU")
  except (ValueError, RuntimeError):
    pass


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    try:
      jax.distributed.initialize()  # auto-detected cluster (TPU VM pod slice, SLURM, Open MPI)
    except (RuntimeError, ValueError) as e:
      logging.warning("jax.distributed.initialize() found no cluster (%s); running as a single process.", e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/cifar.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/ddpm_cifar")
  _hide_accelerators_from_tensorflow()
  _initialize_distributed()

  import jax  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  config = _CONFIG.value
  if _MODE.value == "train":
    from diffusion_jax import train  # pylint: disable=g-import-not-at-top

    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "sample":
    from diffusion_jax import sampling  # pylint: disable=g-import-not-at-top

    sampling.sample_to_workdir(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    from diffusion_jax.evaluation import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

    eval_lib.evaluate(config, _WORKDIR.value)
  else:
    from diffusion_jax.evaluation import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

    eval_lib.compute_fid_stats(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
