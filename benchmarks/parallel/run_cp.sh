#!/usr/bin/env bash
# run_cp.sh - context parallelism on a long prompt: prefill and decode rates
# of `cparallel generate` on the default model for one rank and for the
# layouts of np = 2 and 4 with and without --cp, each run REPS times (the
# median prefill rate shown), and whether the greedy text equals the
# single-rank text. The weights are converted to f32 at load so that the
# text comparison isolates the layouts (see README.md, "Across ranks").
# Writes benchmarks/parallel/results/cp_<date>.md.
#
#   BUILD=build benchmarks/parallel/run_cp.sh   (env: WORDS=700, GEN=32, REPS=3, OUT)
set -euo pipefail

. "$(dirname "$0")/common.sh"
CPAR=$BUILD/cparallel
WORDS=${WORDS:-700}
GEN=${GEN:-32}
REPS=${REPS:-3}
OUT=${OUT:-$REPO/benchmarks/parallel/results/cp_$DATE.md}
MODEL=$DEFAULT_MODEL

require cparallel

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# the prompt: the first WORDS words of the Python tutorial's control-flow
# chapter (python3-doc), English prose and code
SRC=""
for v in 3.11 3.12 3.13 3; do
    f=/usr/share/doc/python$v/html/_sources/tutorial/controlflow.rst.txt
    [ -f "$f" ] && { SRC=$f; break; }
done
[ -n "$SRC" ] || { echo "run_cp.sh: python3-doc is not installed" >&2; exit 1; }
tr -s ' \n' ' ' < "$SRC" | cut -d' ' -f1-"$WORDS" > "$TMP/prompt.txt"

ARGS=(generate --model "$MODEL" --prompt-file "$TMP/prompt.txt" --temperature 0 -n "$GEN"
      --ignore-eos --no-progress --convert f32)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
REF=""

# one layout REPS times: np, a label and the extra flags
run_one() {
    local np=$1 label=$2
    shift 2
    local rep lines=() cmd
    echo "== $label" >&2
    for rep in $(seq "$REPS"); do
        if [ "$np" = 1 ]; then
            cmd=("$CPAR" "${ARGS[@]}" "$@")
        else
            cmd=("${MPIRUN[@]}" -np "$np" "$CPAR" "${ARGS[@]}" "$@")
        fi
        timeout 600 "${cmd[@]}" > "$TMP/out" 2> "$TMP/err" || { cat "$TMP/err" >&2; return 1; }
        local stat
        stat=$(grep -m1 "prefill" "$TMP/err")
        echo "$stat" >&2
        # "prefill N tokens in X ms (R tok/s), decode M tokens in Y ms (S tok/s)"
        lines+=("$(echo "$stat" | sed -E 's/.*prefill ([0-9]+) tokens in [0-9.]+ ms \(([0-9.]+) tok\/s\), decode [0-9]+ tokens in [0-9.]+ ms \(([0-9.]+) tok\/s\).*/\2 \3 \1/')")
        [ -z "$REF" ] && REF=$(md5sum < "$TMP/out")
        SAME=$([ "$(md5sum < "$TMP/out")" = "$REF" ] && echo yes || echo "**no**")
    done
    local mid
    mid=$(printf '%s\n' "${lines[@]}" | sort -g | sed -n "$(( (REPS + 1) / 2 ))p")
    read -r pre dec ntok <<< "$mid"
    ROWS+=("| $label | $np | \`${*:-(none)}\` | $ntok | $pre | $dec | $SAME |")
}

run_one 1 "one rank, 2 threads" --threads 2
run_one 1 "one rank, 1 thread" --threads 1
run_one 2 "cp 2" --cp 2
run_one 2 "cp 2, passing queries" --cp 2 --cp-exchange queries
run_one 2 "cp 2, K/V around the ring" --cp 2 --cp-exchange ring
run_one 2 "pp 2" --pp 2
run_one 3 "tp 3" --tp 3
run_one 4 "cp 4" --cp 4
run_one 4 "cp 4, passing queries" --cp 4 --cp-exchange queries
run_one 4 "cp 4, K/V around the ring" --cp 4 --cp-exchange ring
run_one 4 "cp 2 x pp 2" --cp 2 --pp 2
run_one 6 "tp 3 x cp 2" --tp 3 --cp 2

{
    echo "# Context parallelism on a long prompt, $DATE"
    echo
    echo "Produced by \`benchmarks/parallel/run_cp.sh\`: \`cparallel generate\` on the default"
    echo "model (weights converted to f32 at load), a prompt of the first $WORDS words of the"
    echo "Python tutorial's control-flow chapter, then $GEN greedy tokens; each layout run"
    echo "$REPS times, the run with the median prefill rate shown. Ranks on one node split"
    echo "its cores (one thread per rank here); layouts with more ranks than cores are"
    echo "oversubscribed and show the cost of the exchange, not a speed-up. By default the"
    echo "cp ranks all-gather K/V rows for the fresh prompt and pass queries for decode"
    echo "steps; \`--cp-exchange queries\` passes queries for the prompt too, and"
    echo "\`--cp-exchange ring\` passes the prompt's K/V around the ring (ring attention)"
    echo "instead of all-gathering it."
    echo
    machine_section
    echo
    echo "| layout | np | flags | prompt tokens | prefill tok/s | decode tok/s | text as one rank |"
    echo "|---|---|---|---|---|---|---|"
    for r in "${ROWS[@]}"; do echo "$r"; done
    echo
    command_section Command "mpirun --oversubscribe --bind-to none -np NP build/cparallel ${ARGS[*]} FLAGS" |
        sed "s|$REPO/||g; s|$TMP/|/tmp/|g"
} > "$OUT"
echo "run_cp.sh: wrote $OUT" >&2
