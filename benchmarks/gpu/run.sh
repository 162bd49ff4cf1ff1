#!/usr/bin/env bash
# Every GPU figure of benchmarks/gpu/results/, in one go, on a machine with
# one NVIDIA GPU: the fused attention kernel, the model against the copy and
# GEMM ceilings measured in the same run, and PyTorch + transformers on the
# same model and GPU. The model is a random-weight Llama-3-8B written by
# `cparallel synth` (16 GB of bf16; about 20 s on 16 cores).
#   benchmarks/gpu/run.sh [BIN_DIR (default build)] [OUT_DIR (default benchmarks/gpu/results/raw)]
# BIN_DIR holds cparallel, bench_gpu, bench_attention and bench_sample; MODEL=DIR reuses a
# model directory; SKIP_PEER=1 leaves out the PyTorch run.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-build}
OUT=${2:-benchmarks/gpu/results/raw}
MODEL=${MODEL:-/tmp/cparallel-llama3-8b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
[ -f "$MODEL/config.json" ] || "$BIN/cparallel" synth --arch llama3-8b --out "$MODEL" --no-progress
"$BIN/bench_attention" | tee "$OUT/attention.md"
"$BIN/bench_sample" | tee "$OUT/sample.md"
"$BIN/bench_gpu" --model "$MODEL" --json "$OUT/gpu.json" | tee "$OUT/gpu.md"
# the same model converted to fp8 rows at load: W8A8 on the FP8 tensor cores
"$BIN/bench_gpu" --model "$MODEL" --convert fp8 --json "$OUT/gpu_fp8.json" | tee "$OUT/gpu_fp8.md"
if [ "${SKIP_PEER:-0}" != 1 ]; then
  python3 benchmarks/gpu/peer_torch.py --model "$MODEL" --json "$OUT/torch.json" | tee "$OUT/torch.md"
fi
