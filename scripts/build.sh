#!/usr/bin/env bash
# Configures and builds cparallel into build/ (Release, warnings as errors).
# CUDA, MPI and NCCL are used when found; pass -DCP_ENABLE_CUDA=OFF etc. to
# turn them off. Extra arguments go to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCP_WERROR=ON "$@" >/dev/null
cmake --build build -j "$JOBS"
