#!/usr/bin/env bash
# Installs the Debian 12 packages cparallel builds and tests with. Needs root
# (or sudo). Safe to run again.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake pkg-config git ca-certificates python3 python3-pip unzip \
  libjansson-dev libgtest-dev googletest \
  libmicrohttpd-dev libcurl4-openssl-dev curl python3-venv python3-doc \
  openmpi-bin libopenmpi-dev slurm-wlm \
  clang libclang-rt-14-dev >/dev/null
# The server tests drive `cparallel serve` with the official openai client,
# and the multi-rank ones write a small random model with the gguf package,
# from a virtual environment at the repository root (Debian's pip refuses
# system-wide installs). Made again only when it cannot import them.
VENV="${CP_TEST_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv-test}"
if ! "$VENV/bin/python" -c "import openai, gguf, numpy" >/dev/null 2>&1; then
  python3 -m venv --clear "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check openai gguf numpy
fi
echo "dependencies installed"
