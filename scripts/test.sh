#!/usr/bin/env bash
# The whole test suite, as CI runs it: the Release build with warnings as
# errors and every ctest suite; the loader/tokenizer suites again under
# AddressSanitizer + UndefinedBehaviorSanitizer; then each fuzz target for a
# bounded time (FUZZ_SECONDS, default 60). Needs scripts/install_deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
./scripts/fetch_model.sh

echo "== release build + all tests"
./scripts/build.sh
ctest --test-dir build --output-on-failure -j "$JOBS" --timeout 1500

echo "== sanitizer build (ASan + UBSan): loaders, tokenizer, model"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCP_SANITIZE=ON -DCP_WERROR=ON \
  -DCP_ENABLE_CUDA=OFF -DCP_ENABLE_MPI=OFF >/dev/null
cmake --build build-asan -j "$JOBS" --target cp_test_runtime
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j "$JOBS" -L runtime --timeout 1500

echo "== fuzzing (${FUZZ_SECONDS}s per target)"
cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCP_FUZZ=ON -DCP_BUILD_TESTS=OFF -DCP_ENABLE_CUDA=OFF -DCP_ENABLE_MPI=OFF >/dev/null
cmake --build build-fuzz -j "$JOBS" --target fuzz_gguf fuzz_safetensors
./tests/fuzz/run_fuzz.sh build-fuzz "$FUZZ_SECONDS"
echo "== all test stages passed"
