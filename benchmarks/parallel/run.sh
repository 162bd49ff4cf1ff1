#!/usr/bin/env bash
# run.sh - communication per generated token for every (tp, pp, cp) layout
# of np = 2 and 4 ranks (plus the one-rank baseline and tp = 3 where the model
# allows it) on the default model and on a random model with 16 query / 4 KV
# heads (so that tp = 2 and 4 are valid). Writes
# benchmarks/parallel/results/<date>.md with the machine, the commands and
# the tables printed by bench_parallel.
#
#   BUILD=build benchmarks/parallel/run.sh   (env: PROMPT=32, GEN=64, REPS=3, OUT)
set -euo pipefail

. "$(dirname "$0")/common.sh"
BENCH=$BUILD/bench_parallel
PROMPT=${PROMPT:-32}
GEN=${GEN:-64}
REPS=${REPS:-3}
OUT=${OUT:-$REPO/benchmarks/parallel/results/$DATE.md}
RAND_MODEL=$REPO/models/rand-1024x16.Q8_0.gguf
PY=${PY:-/opt/llamacpp/bin/python}

require bench_parallel
if [ ! -f "$RAND_MODEL" ]; then
    # the mid-size model of benchmarks/README.md: dim 1024, 16 layers,
    # 16 heads, 4 KV heads, FFN 2816, untied LM head, Q8_0
    "$PY" "$REPO/benchmarks/make_random_gguf.py" --out "$REPO/models/rand-1024x16.f16.gguf" \
        --dim 1024 --layers 16 --heads 16 --kv-heads 4 --ffn 2816 --quantize q8_0
fi

mkdir -p "$(dirname "$OUT")"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
OPS=$TMP/ops.md
ROWS=$TMP/rows.md
"$BENCH" --header-only --ops-out "$OPS" > "$ROWS"
CMDS=()
SKIPPED=()

# one layout, REPS times: appends the row (and its per-operation rows) of the
# repetition with the median decode rate, or a note when the layout does not
# fit the model
run_one() {
    local model=$1 name=$2 tp=$3 pp=$4 cp=${5:-1}
    local np=$((tp * pp * cp)) rep picks=()
    echo "== $name np=$np tp=$tp pp=$pp cp=$cp" >&2
    for rep in $(seq "$REPS"); do
        local cmd=(timeout 300 "${MPIRUN[@]}" -np "$np" "$BENCH" --model "$model" --name "$name"
                   --tp "$tp" --pp "$pp" --cp "$cp" --prompt "$PROMPT" --gen "$GEN" --ops-out "$TMP/ops.$rep")
        [ "$rep" = 1 ] && CMDS+=("$(printf '%s ' "${cmd[@]}" | sed "s|$REPO/||g; s|$TMP/ops.1|OPS.md|")")
        : > "$TMP/ops.$rep"
        if ! "${cmd[@]}" > "$TMP/row.$rep" 2> "$TMP/log"; then
            cat "$TMP/log" >&2
            local why
            why=$(grep -m1 -E "cannot load|error|rank 0" "$TMP/log" | sed 's/^bench_parallel: //' || true)
            SKIPPED+=("$name tp=$tp pp=$pp cp=$cp: ${why:-failed (see the log on stderr)}")
            return 0
        fi
        cat "$TMP/log" >&2
        picks+=("$(cut -d'|' -f7 "$TMP/row.$rep" | tr -d ' ') $rep")
    done
    local mid
    mid=$(printf '%s\n' "${picks[@]}" | sort -g | sed -n "$(( (REPS + 1) / 2 ))p" | cut -d' ' -f2)
    cat "$TMP/row.$mid" >> "$ROWS"
    cat "$TMP/ops.$mid" >> "$OPS"
}

for spec in "$DEFAULT_MODEL|SmolLM2-135M-Q4_1" "$RAND_MODEL|rand-1024x16-Q8_0"; do
    model=${spec%%|*}
    name=${spec#*|}
    run_one "$model" "$name" 1 1
    for np in 2 4; do
        for cp in 1 2 4; do
            for tp in 1 2 4; do
                [ $((np % (tp * cp))) -eq 0 ] || continue
                run_one "$model" "$name" "$tp" $((np / (tp * cp))) "$cp"
            done
        done
    done
done
run_one "$DEFAULT_MODEL" "SmolLM2-135M-Q4_1" 3 1

{
    echo "# Communication per generated token, $DATE"
    echo
    echo "Produced by \`benchmarks/parallel/run.sh\` (bench_parallel: prompt $PROMPT tokens, then"
    echo "$GEN measured greedy decode steps; each layout run $REPS times, the run with the median"
    echo "decode rate shown; see benchmarks/parallel/README.md for the method)."
    echo
    machine_section
    echo
    echo "## Per layout"
    echo
    echo "Bytes are the payload passed to the collectives per decode step (one token),"
    echo "\"predicted\" is the count from the layout (README.md); \"exact\" means calls and"
    echo "bytes agree on every rank and for every operation. Times include waiting for"
    echo "peers; \"other\" is decode time outside communication calls (compute, sampling)."
    echo
    cat "$ROWS"
    echo
    echo "## Per operation (sum over all ranks)"
    echo
    cat "$OPS"
    echo
    if [ ${#SKIPPED[@]} -gt 0 ]; then
        echo "## Layouts the model does not allow"
        echo
        for s in "${SKIPPED[@]}"; do echo "- $s"; done
        echo
    fi
    command_section Commands "${CMDS[@]}"
} > "$OUT"
echo "run.sh: wrote $OUT" >&2
