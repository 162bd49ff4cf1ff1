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
  openmpi-bin libopenmpi-dev \
  clang libclang-rt-14-dev >/dev/null
echo "dependencies installed"
