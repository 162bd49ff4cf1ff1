#!/usr/bin/env bash
# run_mixed.sh - the attention exchange of context parallelism in a serving
# step that mixes a fresh prompt with running streams: S sequences with H
# tokens of history each decode one token in the same batch as the P tokens
# of a new prompt (bench_parallel --mixed), on the default model at cp 2 and
# cp 4, with the exchange chosen per sequence (auto) and forced each way for
# the whole step; bytes passed by rank 0 and the step's time, the median of
# REPS runs (1 by default: the bytes do not vary from run to run; each run
# first prefills the S histories, 70 s at cp 2 on 2 cores). Then the collectives' latency and bandwidth on this machine
# (bench_comm), which ground the per-collective allowance of the choice.
# Writes benchmarks/parallel/results/cp_mixed_<date>.md.
#
#   BUILD=build benchmarks/parallel/run_mixed.sh   (env: S=16, H=1000, P=256, REPS=1, OUT)
set -euo pipefail

. "$(dirname "$0")/common.sh"
S=${S:-16}
H=${H:-1000}
P=${P:-256}
REPS=${REPS:-1}
OUT=${OUT:-$REPO/benchmarks/parallel/results/cp_mixed_$DATE.md}
MODEL=$DEFAULT_MODEL
require bench_parallel bench_comm

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for cp in 2 4; do
    for x in auto queries kv; do
        echo "== cp $cp, $x" >&2
        runs=()
        for rep in $(seq "$REPS"); do
            runs+=("$("${MPIRUN[@]}" -np "$cp" "$BUILD/bench_parallel" --model "$MODEL" --cp "$cp" \
                       --mixed "$S" --prompt "$H" --fresh "$P" --cp-exchange "$x" | tail -1)")
        done
        # the run with the median time (last column)
        ROWS+=("$(printf '%s\n' "${runs[@]}" | sort -t'|' -k11 -g | sed -n "$(( (REPS + 1) / 2 ))p")")
    done
done
COMM=$("${MPIRUN[@]}" -np 2 "$BUILD/bench_comm")

{
    echo "# Context parallelism in a mixed serving step, $DATE"
    echo
    echo "Produced by \`benchmarks/parallel/run_mixed.sh\`: \`bench_parallel --mixed $S --prompt $H"
    echo "--fresh $P\` on the default model (f32 KV cache): $S sequences with $H tokens of history"
    echo "each decode one token in the same batch as a new prompt of $P tokens, one chunk."
    echo "\`auto\` chooses per sequence (the prompt passes K/V, the streams their queries);"
    echo "\`queries\` and \`kv\` force one exchange on the whole step. Bytes: the payload rank 0"
    echo "passed over its groups during the step; time: the slowest rank, the median of $REPS run(s)."
    echo
    machine_section
    echo
    echo "| model | tp | pp | cp | exchange | streams x history | fresh tokens | bytes (rank 0) | step ms |"
    echo "|---|--:|--:|--:|---|--:|--:|--:|--:|"
    for r in "${ROWS[@]}"; do echo "$r"; done
    echo
    echo "## The collectives on this machine (bench_comm, 2 ranks)"
    echo
    echo "$COMM"
    echo
    command_section Command \
        "mpirun --oversubscribe --bind-to none -np CP build/bench_parallel --model models/$(basename "$MODEL") --cp CP --mixed $S --prompt $H --fresh $P --cp-exchange auto|queries|kv" \
        "mpirun --oversubscribe --bind-to none -np 2 build/bench_comm"
} > "$OUT"
echo "run_mixed.sh: wrote $OUT" >&2
