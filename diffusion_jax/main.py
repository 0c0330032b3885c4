r"""Command-line entry point.

  python -m diffusion_jax.main --config=configs/cifar.py --workdir=/path/to/run [--mode=train]

Override any config field on the command line, e.g.
`--config.training.batch_size=64`; misspelt fields are an error. The workdir
keeps the run's config, checkpoints, TensorBoard logs, samples and eval
results; running the same command again continues the run.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "fid_stats")
# Exit status of a training run stopped by SIGTERM/SIGINT or a preemption notice once the checkpoint of its
# last step is written: EX_TEMPFAIL, "try again later". Schedulers that restart failed jobs (Kubernetes,
# a retry loop) then continue the run; a finished run exits with 0.
EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples, eval results.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the workdir.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process GPU runs ($JAX_COORDINATOR_ADDRESS; TPU VMs and srun need none).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run ($JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run ($JAX_PROCESS_ID).")


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


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"${name}={value!r} is not an integer.") from None


def _detect_cluster() -> str | None:
  """Names the multi-process environment `jax.distributed.initialize()` sets itself up from, if any."""
  if (_env_int("SLURM_STEP_NUM_TASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return "SLURM (srun)"  # inside a job step, one task per process
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "Open MPI"
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top

    on_tpu_vm = bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except ImportError:
    on_tpu_vm = False
  if on_tpu_vm or "TPU_WORKER_HOSTNAMES" in os.environ:
    return "Cloud TPU VM"
  return None


def _initialize_distributed() -> None:
  """Joins a multi-process run: explicit flags (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID),
  else an environment JAX recognises (TPU VM pod slice, srun, Open MPI); otherwise runs as one process."""
  import jax  # pylint: disable=g-import-not-at-top

  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  explicit = any(v is not None for v in (coordinator, num_processes, process_id))
  cluster = None if explicit else _detect_cluster()
  if not explicit and cluster is None:
    return
  # Cross-process collectives on CPU need an implementation (gloo is the default from JAX 0.5 on).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (f"coordinator {coordinator}, {num_processes} processes, process id {process_id}" if explicit
           else f"auto-detected {cluster}")
  logging.info("Starting the multi-process run (%s).", where)
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  except Exception as e:  # noqa: BLE001 - JAX raises several types; every one means the run cannot start
    raise RuntimeError(
        f"Could not join the multi-process run ({where}): {type(e).__name__}: {e}\n"
        "Start every process with the same --coordinator_address=HOST:PORT (a free port on the host of process 0), "
        "--num_processes=N and its own --process_id=0..N-1 (or run under srun, or on a TPU VM); "
        "for a single process pass none of them."
    ) from e
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 reports; the others only warn


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

    state = train.train_and_evaluate(config, _WORKDIR.value)
    step = int(state.step)
    if step < config.training.num_train_steps and train.last_finish() != "time_budget":
      logging.warning("Training stopped early at step %d of %d; the checkpoint of step %d is complete. Run the same "
                      "command again to continue. Exit status %d.", step, config.training.num_train_steps, step,
                      EXIT_PREEMPTED)
      sys.exit(EXIT_PREEMPTED)
    if config.training.get("final_eval", False):
      from diffusion_jax.evaluation import final_eval  # pylint: disable=g-import-not-at-top

      final_eval.evaluate_final(config, _WORKDIR.value, state.ema_params, step)
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
