#!/usr/bin/env bash
# Runs every benchmark with the issue's GPU settings and writes one JSON per benchmark to OUT_DIR:
# the CIFAR-10 model in bfloat16, training at batch 128 against diffusers' UNet2DModel with torch.compile and
# bf16 autocast, the paper's 256 samples x 1000 ancestral steps measured in full, and bits/dim at batch 256.
#
#   bash benchmarks/run_gpu.sh OUT_DIR            # the real run (a few minutes on an H100)
#   bash benchmarks/run_gpu.sh --smoke OUT_DIR    # tiny settings that run anywhere, CPU included, in minutes
#
# Settings can be overridden with environment variables: CONFIG, DTYPE, TRAIN_BATCH, TRAIN_STEPS, TRAIN_WARMUP,
# TRAIN_WINDOW, CLIP_GROUPS, TORCH_COMPILE, TORCH_AUTOCAST, SAMPLE_BATCH, SAMPLE_STEPS, SAMPLE_FULL (1/0),
# SAMPLE_TORCH (1/0), BPD_BATCH, BPD_TERMS, PEAK_TFLOPS, PYTHON.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=1
  shift
fi
OUT_DIR="${1:-benchmarks/results/gpu}"
cd "$(dirname "$0")/.."
mkdir -p "${OUT_DIR}"
PYTHON="${PYTHON:-python}"

if [[ "${SMOKE}" == 1 ]]; then
  : "${CONFIG:=configs/tiny.py}" "${DTYPE:=float32}" "${TRAIN_BATCH:=8}" "${TRAIN_STEPS:=2}" "${TRAIN_WARMUP:=1}"
  : "${TRAIN_WINDOW:=1}" "${CLIP_GROUPS:=1,2}" "${TORCH_COMPILE:=off}" "${TORCH_AUTOCAST:=auto}"
  : "${SAMPLE_BATCH:=8}" "${SAMPLE_STEPS:=3}" "${SAMPLE_FULL:=1}" "${SAMPLE_TORCH:=1}" "${BPD_BATCH:=8}"
  : "${BPD_TERMS:=3}"
else
  : "${CONFIG:=configs/cifar.py}" "${DTYPE:=bfloat16}" "${TRAIN_BATCH:=128}" "${TRAIN_STEPS:=100}"
  : "${TRAIN_WARMUP:=5}" "${TRAIN_WINDOW:=10}" "${CLIP_GROUPS:=1,8}" "${TORCH_COMPILE:=on}"
  : "${TORCH_AUTOCAST:=on}" "${SAMPLE_BATCH:=256}" "${SAMPLE_STEPS:=100}" "${SAMPLE_FULL:=1}" "${SAMPLE_TORCH:=1}"
  : "${BPD_BATCH:=256}" "${BPD_TERMS:=1000}"
fi
PEAK_FLAG=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then
  PEAK_FLAG=(--peak_tflops="${PEAK_TFLOPS}")
fi
FULL_FLAG=--nofull
[[ "${SAMPLE_FULL}" == 1 ]] && FULL_FLAG=--full
TORCH_SAMPLE_FLAG=--notorch
[[ "${SAMPLE_TORCH}" == 1 ]] && TORCH_SAMPLE_FLAG=--torch

set -x
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${OUT_DIR}/nvidia_smi.txt" 2>&1 || true
"${PYTHON}" -m benchmarks.train_throughput --config="${CONFIG}" --dtype="${DTYPE}" --batch_size="${TRAIN_BATCH}" \
  --steps="${TRAIN_STEPS}" --warmup="${TRAIN_WARMUP}" --window="${TRAIN_WINDOW}" --clip_groups="${CLIP_GROUPS}" \
  --torch_compile="${TORCH_COMPILE}" --torch_autocast="${TORCH_AUTOCAST}" "${PEAK_FLAG[@]}" \
  --json_out="${OUT_DIR}/train.json" 2>&1 | tee "${OUT_DIR}/train.log"
"${PYTHON}" -m benchmarks.sampling_throughput --config="${CONFIG}" --dtype="${DTYPE}" --batch_size="${SAMPLE_BATCH}" \
  --num_steps="${SAMPLE_STEPS}" "${FULL_FLAG}" "${TORCH_SAMPLE_FLAG}" --torch_compile="$([[ ${TORCH_COMPILE} == on ]] \
  && echo true || echo false)" --repeats=2 "${PEAK_FLAG[@]}" --json_out="${OUT_DIR}/sampling.json" 2>&1 \
  | tee "${OUT_DIR}/sampling.log"
"${PYTHON}" -m benchmarks.bpd_throughput --config="${CONFIG}" --dtype="${DTYPE}" --batch_size="${BPD_BATCH}" \
  --num_terms="${BPD_TERMS}" --repeats=2 "${PEAK_FLAG[@]}" --json_out="${OUT_DIR}/bpd.json" 2>&1 \
  | tee "${OUT_DIR}/bpd.log"
