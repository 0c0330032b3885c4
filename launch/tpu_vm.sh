#!/usr/bin/env bash
# Trains diffusion_jax on a Cloud TPU VM or TPU pod slice: one process per TPU host, all started at once.
#
#   WORKDIR=gs://my-bucket/ddpm_cifar10 ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b \
#     launch/tpu_vm.sh [all|create|setup|train|status|logs|stop|delete] [--config.FIELD=VALUE ...]
#
#   all (default)  plan, create (or reuse) the TPU, set up every worker, start training
#   plan           compile the run's programs for $ACCELERATOR_TYPE here, without a TPU (python -m diffusion_jax.plan):
#                  stops before anything is created when a program does not fit its HBM (PREFLIGHT=0 skips it)
#   create         create the TPU VM / pod slice, or reuse it; a preempted Spot TPU is deleted and re-created
#   setup          copy this repository (its committed HEAD) to every worker and install it in a virtualenv
#   train          start training on every worker in the background; logs in ~/diffusion_jax_logs/ per worker
#   status         is training running on each worker; the last log line of each
#   logs           follow the log of worker 0
#   stop           SIGTERM to training on every worker: the current step is checkpointed, then it exits (75)
#   delete         delete the TPU VM (the workdir in the bucket stays)
#
# Arguments after the action are passed to training, e.g. --config.training.batch_size=256.
# After a preemption run the same command again: the TPU is re-created if needed and training continues
# from the last checkpoint in $WORKDIR. Every worker must see the same workdir, so use a gs:// bucket in
# the TPU's region that the TPU's service account can write.
set -euo pipefail

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
TPU_NAME="${TPU_NAME:-ddpm}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
# tpu-ubuntu2204-base for v4; v2-alpha-tpuv5-lite for v5e; v2-alpha-tpuv5 for v5p; v2-alpha-tpuv6e for v6e.
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"                        # 1: create a Spot TPU (cheaper; preempted at any time)
CONFIG="${CONFIG:-configs/cifar.py}"     # relative to the repository root
WORKDIR="${WORKDIR:-}"                   # gs://bucket/path: checkpoints, logs, samples of the run
LOCAL_WORKDIR="${LOCAL_WORKDIR:-0}"      # 1: WORKDIR may be a path every worker sees (single host, shared FS)
PYTHON_VERSION="${PYTHON_VERSION:-3.11}" # the TPU images ship Python 3.10; uv installs this one
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"         # pin here, e.g. "jax[tpu]==0.10.2"
REMOTE_DIR="diffusion_jax"               # on every worker, under the home directory
VENV_DIR="diffusion_jax_venv"
LOG_DIR="diffusion_jax_logs"
PREFLIGHT="${PREFLIGHT:-1}"              # 0: skip the plan that `all` runs before it creates the TPU
PYTHON="${PYTHON:-python3}"              # the local Python with diffusion_jax (and jax[tpu] for the plan)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

action="all"
if [[ $# -gt 0 && "$1" != --* ]]; then
  action="$1"
  shift
fi
train_args=("$@")

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"
}

on_workers() {
  # Runs a shell command on every worker of the TPU, in parallel.
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

plan() {
  # The train step and the samplers the run schedules, compiled for the slice on this host (libtpu, no TPU).
  if [[ "$PREFLIGHT" == 0 ]]; then
    echo "Preflight skipped (PREFLIGHT=0)."
    return
  fi
  if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("libtpu") is None)' 2>/dev/null; then
    echo "Preflight skipped: libtpu is not installed for $PYTHON here (pip install \"jax[tpu]\" to check the" \
      "run fits $ACCELERATOR_TYPE before creating it; PREFLIGHT=0 skips this line)."
    return
  fi
  local overrides=()
  for arg in "${train_args[@]}"; do
    [[ "$arg" == --config.* ]] && overrides+=("$arg")
  done
  echo "Preflight: compiling $CONFIG for $ACCELERATOR_TYPE on this host (python -m diffusion_jax.plan)."
  (cd "$REPO_ROOT" && "$PYTHON" -m diffusion_jax.plan --config="$CONFIG" --topology="$ACCELERATOR_TYPE" \
    --programs=train,grid,eval "${overrides[@]}") || {
    echo "Preflight failed: nothing was created. Change the config (above), or PREFLIGHT=0 to skip the check." >&2
    exit 1
  }
}

create() {
  local state
  state="$(tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || true)"
  case "$state" in
    READY)
      echo "Reusing the TPU VM $TPU_NAME ($ACCELERATOR_TYPE in $ZONE)."
      return
      ;;
    PREEMPTED | TERMINATED)
      echo "The TPU VM $TPU_NAME is $state: deleting it to create it again."
      tpu delete "$TPU_NAME" --quiet
      ;;
    "")
      ;;
    *)
      echo "The TPU VM $TPU_NAME is $state; wait until it is READY (or delete it) and run this again." >&2
      exit 1
      ;;
  esac
  local extra=()
  if [[ "$SPOT" == 1 ]]; then
    extra+=(--spot)
  fi
  echo "Creating the TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE."
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local tmp
  tmp="$(mktemp -d)"
  git -C "$REPO_ROOT" archive --format=tar.gz -o "$tmp/diffusion_jax.tar.gz" HEAD
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "Note: uncommitted changes are not copied; the workers get the committed HEAD." >&2
  fi
  tpu scp "$tmp/diffusion_jax.tar.gz" "$TPU_NAME:diffusion_jax.tar.gz" --worker=all
  rm -rf "$tmp"
  on_workers "set -euo pipefail
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/diffusion_jax.tar.gz -C ~/$REMOTE_DIR
    command -v uv >/dev/null || [[ -x ~/.local/bin/uv ]] || curl -LsSf https://astral.sh/uv/install.sh | sh
    UV=\$(command -v uv || echo ~/.local/bin/uv)
    [[ -x ~/$VENV_DIR/bin/python ]] || \"\$UV\" venv --python $PYTHON_VERSION ~/$VENV_DIR
    \"\$UV\" pip install --python ~/$VENV_DIR/bin/python '$JAX_SPEC' 'etils[epath-gcs]' google-cloud-storage \
      -e ~/$REMOTE_DIR
    ~/$VENV_DIR/bin/python -c 'import jax; print(jax.process_count(), \"processes\", jax.device_count(), \"devices\")'"
}

train() {
  if [[ "$WORKDIR" != gs://* && "$LOCAL_WORKDIR" != 1 ]]; then
    echo "Set WORKDIR to a gs:// path: every worker of the TPU writes the same checkpoints" \
      "(LOCAL_WORKDIR=1 takes a path every worker sees: a single-host TPU's disk or a shared file system)." >&2
    exit 1
  fi
  local flags
  flags="$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "${train_args[@]}")"
  # The same command on every worker; jax.distributed.initialize() finds the other workers by itself.
  # A run that is already going is left alone (stop it first).
  on_workers "set -euo pipefail
    mkdir -p ~/$LOG_DIR
    if [[ -f ~/$LOG_DIR/train.pid ]] && kill -0 \"\$(cat ~/$LOG_DIR/train.pid)\" 2>/dev/null; then
      echo \"\$(hostname): training is already running (pid \$(cat ~/$LOG_DIR/train.pid)).\"; exit 0
    fi
    cd ~/$REMOTE_DIR
    echo \"=== \$(date -u +%FT%TZ) start:$flags\" >> ~/$LOG_DIR/train.log
    nohup ~/$VENV_DIR/bin/python -m diffusion_jax.main$flags >> ~/$LOG_DIR/train.log 2>&1 < /dev/null &
    echo \$! > ~/$LOG_DIR/train.pid
    echo \"\$(hostname): training started (pid \$!), log ~/$LOG_DIR/train.log\""
}

status() {
  on_workers "if [[ -f ~/$LOG_DIR/train.pid ]] && kill -0 \"\$(cat ~/$LOG_DIR/train.pid)\" 2>/dev/null; then
      echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi
    tail -n 1 ~/$LOG_DIR/train.log 2>/dev/null || true"
}

logs() {
  tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 200 -F ~/$LOG_DIR/train.log"
}

stop() {
  on_workers "if [[ -f ~/$LOG_DIR/train.pid ]] && kill -0 \"\$(cat ~/$LOG_DIR/train.pid)\" 2>/dev/null; then
      kill -TERM \"\$(cat ~/$LOG_DIR/train.pid)\" && echo \"\$(hostname): SIGTERM sent; it checkpoints and exits.\"
    else echo \"\$(hostname): not running\"; fi"
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

case "$action" in
  all)
    plan
    create
    setup
    train
    ;;
  plan | create | setup | train | status | logs | stop | delete)
    "$action"
    ;;
  *)
    echo "Unknown action '$action'; use all, plan, create, setup, train, status, logs, stop or delete." >&2
    exit 2
    ;;
esac
