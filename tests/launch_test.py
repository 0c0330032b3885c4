"""launch/tpu_vm.sh end to end without a TPU: a fake `gcloud` (and `uv`) first on PATH.

The fake records every call; its TPU is a folder (a state file and one worker's home directory). `ssh --command`
runs the command locally in that home, `scp` copies into it, `create` gives a fresh home (a re-created TPU has new
disks). Training runs on the CPU against a local workdir, with the repository's committed HEAD as a worker gets it.
"""

import importlib.util
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

from conftest import CACHE_DIR
from conftest import REPO_ROOT

from diffusion_jax import checkpointing

FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$FAKE_TPU/calls.log"
if [[ "$1 $2 $3" == "config get-value project" ]]; then echo fake-project; exit 0; fi
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || { echo "fake gcloud: unexpected call: $*" >&2; exit 2; }
shift 3
action=$1; shift
home="$FAKE_TPU/worker_0"
case "$action" in
  describe)
    if [[ -f "$FAKE_TPU/state" ]]; then cat "$FAKE_TPU/state"; else echo "NOT_FOUND: $1" >&2; exit 1; fi ;;
  create)
    echo READY > "$FAKE_TPU/state"; rm -rf "$home"; mkdir -p "$home" ;;
  delete)
    rm -f "$FAKE_TPU/state"; rm -rf "$home" ;;
  scp)
    src=$1; dest=${2#*:}; cp "$src" "$home/$dest" ;;
  ssh)
    shift  # the TPU's name
    command=""
    for arg in "$@"; do [[ "$arg" == --command=* ]] && command=${arg#--command=}; done
    cd "$home" && HOME="$home" bash -c "$command" ;;
  *)
    echo "fake gcloud: unexpected action $action" >&2; exit 2 ;;
esac
"""

FAKE_UV = r"""#!/usr/bin/env bash
set -euo pipefail
echo "uv $*" >> "$FAKE_TPU/calls.log"
if [[ "$1" == venv ]]; then  # uv venv --python VERSION DIR: this machine's Python, which has the packages
  mkdir -p "$4/bin"
  printf '#!/usr/bin/env bash\nexec "%s" "$@"\n' "$FAKE_PYTHON" > "$4/bin/python"
  chmod +x "$4/bin/python"
fi  # uv pip install ...: the packages are installed already
"""


def _write_tool(directory: pathlib.Path, name: str, text: str) -> None:
  path = directory / name
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _launcher(fake: pathlib.Path, workdir: pathlib.Path):
  bin_dir = fake / "bin"
  bin_dir.mkdir(parents=True, exist_ok=True)
  _write_tool(bin_dir, "gcloud", FAKE_GCLOUD)
  _write_tool(bin_dir, "uv", FAKE_UV)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    FAKE_TPU=str(fake),
    FAKE_PYTHON=sys.executable,
    WORKDIR=str(workdir),
    LOCAL_WORKDIR="1",
    CONFIG="configs/tiny.py",
    TPU_NAME="ddpm-test",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR / "jax"),
  )
  train_args = ["--config.training.num_train_steps=100000", "--config.training.checkpoint_every=5"]

  def run(action, timeout=300):
    return subprocess.run(
      ["bash", str(REPO_ROOT / "launch" / "tpu_vm.sh"), action, *train_args],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )

  return run


def _pid(fake):
  path = fake / "worker_0" / "diffusion_jax_logs" / "train.pid"
  return int(path.read_text()) if path.exists() else None


def _wait(predicate, what, timeout=300):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_tpu_vm_launcher_trains_stops_and_continues_after_a_spot_preemption(tmp_path):
  fake, workdir = tmp_path / "tpu", tmp_path / "run"
  fake.mkdir()
  run = _launcher(fake, workdir)
  pids = []
  try:
    # A fresh TPU: `all` creates it, sets the worker up and starts training in the background.
    proc = run("all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Creating the TPU VM ddpm-test" in proc.stdout and "training started" in proc.stdout, proc.stdout
    pids.append(_pid(fake))
    _wait(lambda: checkpointing.checkpoint_steps(workdir), "the first checkpoint")

    proc = run("status")
    assert proc.returncode == 0 and "running" in proc.stdout, proc.stdout + proc.stderr
    # `logs` follows the log forever: read what it shows in a few seconds.
    logs = subprocess.run(
      ["timeout", "5", "bash", str(REPO_ROOT / "launch" / "tpu_vm.sh"), "logs"],
      cwd=REPO_ROOT,
      env=_launcher_env(fake, workdir),
      capture_output=True,
      text=True,
    )
    assert "step " in logs.stdout, logs.stdout + logs.stderr

    # `stop`: SIGTERM; training writes the checkpoint of the step it is at and exits with 75.
    proc = run("stop")
    assert proc.returncode == 0 and "SIGTERM sent" in proc.stdout, proc.stdout + proc.stderr
    _wait(lambda: not _alive(pids[0]), "training to exit")
    log = (fake / "worker_0" / "diffusion_jax_logs" / "train.log").read_text()
    assert "Exit status 75." in log, log[-3000:]
    stopped = checkpointing.checkpoint_steps(workdir)[-1]
    assert f"Training stopped early at step {stopped} of 100000" in log, log[-3000:]

    # A Spot preemption: the same command deletes the TPU, creates it again and continues from the checkpoint.
    (fake / "state").write_text("PREEMPTED\n")
    proc = run("all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is PREEMPTED: deleting it to create it again" in proc.stdout, proc.stdout
    pids.append(_pid(fake))
    log_path = fake / "worker_0" / "diffusion_jax_logs" / "train.log"
    _wait(
      lambda: log_path.exists() and f"Resumed from the checkpoint of step {stopped}" in log_path.read_text(),
      "the resumed run",
    )
    calls = (fake / "calls.log").read_text().splitlines()
    tpu_calls = [c.split()[3] for c in calls if c.startswith("compute tpus tpu-vm")]
    assert tpu_calls[-6:-3] == ["describe", "delete", "create"], tpu_calls
  finally:
    for pid in pids:
      if pid and _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _launcher_env(fake, workdir):
  return dict(
    os.environ,
    PATH=f"{fake / 'bin'}:{os.environ['PATH']}",
    FAKE_TPU=str(fake),
    WORKDIR=str(workdir),
    LOCAL_WORKDIR="1",
    TPU_NAME="ddpm-test",
  )


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun --ntasks-per-node=1 --output=PATTERN bash -c SCRIPT train ARGS...: one task, here, its output to the pattern.
set -uo pipefail
echo "srun $*" >> "$FAKE_SLURM/calls.log"
output=""
args=()
for arg in "$@"; do
  case "$arg" in
    --output=*) output=${arg#--output=} ;;
    --ntasks-per-node=*) ;;
    *) args+=("$arg") ;;
  esac
done
output=${output//%x/ddpm}; output=${output//%j/$SLURM_JOB_ID}; output=${output//%t/0}
SLURM_PROCID=0 "${args[@]}" >> "$output" 2>&1
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM/calls.log"
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; fi
"""


def test_slurm_script_requeues_the_job_after_a_checkpointed_stop(tmp_path):
  fake, workdir = tmp_path / "slurm", tmp_path / "run"
  (fake / "bin").mkdir(parents=True)
  _write_tool(fake / "bin", "srun", FAKE_SRUN)
  _write_tool(fake / "bin", "scontrol", FAKE_SCONTROL)
  env = dict(
    os.environ,
    PATH=f"{fake / 'bin'}:{os.environ['PATH']}",
    FAKE_SLURM=str(fake),
    SLURM_JOB_ID="4242",
    SLURM_JOB_NODELIST="localhost",
    SLURM_NTASKS="1",
    WORKDIR=str(workdir),
    CONFIG="configs/tiny.py",
    PYTHON=sys.executable,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR / "jax"),
  )
  job = subprocess.Popen(
    [
      "bash",
      str(REPO_ROOT / "launch" / "slurm_gpu.sbatch"),
      "--config.training.num_train_steps=100000",
      "--config.training.checkpoint_every=5",
    ],
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    _wait(lambda: checkpointing.checkpoint_steps(workdir), "the first checkpoint")
    found = subprocess.run(["pgrep", "-f", "--", f"--workdir={workdir}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert pids, found
    for pid in pids:
      os.kill(pid, signal.SIGTERM)  # what SLURM sends 2 minutes before the time limit
    out, _ = job.communicate(timeout=300)
  finally:
    job.kill()
  assert job.returncode == 75, out
  assert "requeueing job 4242 to continue" in out, out
  assert "scontrol requeue 4242" in (fake / "calls.log").read_text()
  log = (workdir / "slurm_logs" / "ddpm-4242-node0.log").read_text()
  assert "Exit status 75." in log, log[-3000:]


def test_tpu_vm_preflight_plan_is_skipped_without_libtpu_or_when_asked(tmp_path):
  run = _launcher(tmp_path / "fake", tmp_path / "workdir")
  out = run("plan")
  assert out.returncode == 0, out.stderr
  if importlib.util.find_spec("libtpu") is None:
    assert "Preflight skipped: libtpu is not installed" in out.stdout
  skipped = subprocess.run(
    ["bash", str(REPO_ROOT / "launch" / "tpu_vm.sh"), "plan"],
    cwd=REPO_ROOT,
    env=dict(os.environ, PREFLIGHT="0"),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert skipped.returncode == 0 and skipped.stdout.strip() == "Preflight skipped (PREFLIGHT=0)."
  assert not (tmp_path / "fake" / "worker_0").exists()  # nothing was created
