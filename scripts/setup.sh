#!/usr/bin/env bash
# One command for a fresh Debian 12 machine: installs the dependencies,
# builds cparallel, fetches the default model, and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_deps.sh
./scripts/build.sh
./scripts/fetch_model.sh
exec build/cparallel generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --chat \
  --prompt "${CP_PROMPT:-What is the capital of France?}" --temperature 0 -n 64
