#!/usr/bin/env bash
# run_fuzz.sh - runs every libFuzzer target of a CP_FUZZ build for a while on
# a scratch copy of the seed corpus (the committed seeds stay unchanged).
# Exits non-zero when a target crashes, leaks, times out or runs out of
# memory; the reproducer is kept under BUILD_DIR/fuzz-artifacts/.
#
# usage: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS [TARGET...]
#   BUILD_DIR  a build configured with -DCP_FUZZ=ON (clang)
#   SECONDS    time per target
#   TARGET     fuzz_gguf, fuzz_safetensors, ... (default: all built)
set -u

if [ $# -lt 2 ]; then
    echo "usage: $0 BUILD_DIR SECONDS [TARGET...]" >&2
    exit 2
fi
build=$(cd "$1" && pwd) || exit 2
secs=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in "$here"/fuzz_*.c; do targets+=("$(basename "$f" .c)"); done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cp_fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"

status=0
for t in "${targets[@]}"; do
    bin="$build/tests/$t"
    if [ ! -x "$bin" ]; then
        echo "run_fuzz: $bin not found (configure with -DCP_FUZZ=ON and build)" >&2
        status=1
        continue
    fi
    corpus="$work/$t"
    mkdir -p "$corpus"
    seeds="$here/corpus/${t#fuzz_}"
    [ -d "$seeds" ] && cp "$seeds"/* "$corpus"/ 2>/dev/null
    log="$work/$t.log"
    echo "run_fuzz: $t for ${secs}s ($(ls "$corpus" | wc -l) seeds)"
    "$bin" "$corpus" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$t-" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "run_fuzz: $t: rc=$rc, ${execs:-?} runs, ${rate:-?} exec/s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) files"
    if [ $rc -ne 0 ]; then
        status=1
        echo "run_fuzz: $t FAILED; reproducer(s) in $artifacts, log tail:" >&2
        tail -60 "$log" >&2
    fi
done
exit $status
