#!/usr/bin/env bash
# run_ring.sh - the two forms of passing K/V under context parallelism on a
# fresh prompt: all-gathered (--cp-exchange kv) against ring attention
# (--cp-exchange ring), on the default model at cp 2 and cp 4 for prompts of
# P tokens (bench_parallel, one thread per rank): prefill time, the part of
# it rank 0 spent inside communicator calls (for a ring step, the start and
# the wait: what the attention between them did not hide), the payload
# rank 0 passed per prompt token (as cp_comm.h counts it: the whole gathered
# buffer for an all-gather, what it sent for a ring step) and the most K/V
# one layer's exchange held at once. The median prefill of REPS runs.
# Writes benchmarks/parallel/results/cp_ring_<date>.md.
#
#   BUILD=build benchmarks/parallel/run_ring.sh   (env: PROMPTS="1000 4000", REPS=3, OUT)
set -euo pipefail

. "$(dirname "$0")/common.sh"
PROMPTS=${PROMPTS:-"1000 4000"}
REPS=${REPS:-3}
OUT=${OUT:-$REPO/benchmarks/parallel/results/cp_ring_$DATE.md}
MODEL=$DEFAULT_MODEL
require bench_parallel

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for P in $PROMPTS; do
    for cp in 2 4; do
        for x in kv ring; do
            echo "== prompt $P, cp $cp, $x" >&2
            runs=()
            for rep in $(seq "$REPS"); do
                line=$("${MPIRUN[@]}" -np "$cp" "$BUILD/bench_parallel" --model "$MODEL" --cp "$cp" --prompt "$P" \
                           --gen 4 --threads 1 --cp-exchange "$x" 2>&1 >/dev/null | grep "exchange $x holding")
                echo "$line" >&2
                # "prefill P tokens T ms (B bytes per token passed by rank 0, C ms in its communicator
                # calls), ... holding at most M MB of K/V per layer"
                runs+=("$(echo "$line" | sed -E 's/.*prefill [0-9]+ tokens ([0-9.]+) ms \(([0-9]+) bytes per token[^,]*, ([0-9.]+) ms in its communicator calls.*at most ([0-9.]+) MB.*/\1 \2 \3 \4/')")
            done
            read -r ms bytes cms mb <<< "$(printf '%s\n' "${runs[@]}" | sort -g | sed -n "$(( (REPS + 1) / 2 ))p")"
            tps=$(awk -v p="$P" -v ms="$ms" 'BEGIN { printf "%.1f", p / (ms / 1000) }')
            ROWS+=("| $P | $cp | $x | $ms | $tps | $cms | $bytes | $mb |")
        done
    done
done

{
    echo "# Ring attention against the all-gathered K/V, $DATE"
    echo
    echo "Produced by \`benchmarks/parallel/run_ring.sh\`: \`bench_parallel\` on the default model"
    echo "(SmolLM2-135M, 30 layers, 3 KV heads of 64, fp16 KV cache: 768 bytes of K and V"
    echo "per position and layer), a fresh prompt of P tokens then 4 tokens, one thread per"
    echo "rank; the median prefill of $REPS runs. Both forms pass K/V for the whole prompt;"
    echo "\`kv\` all-gathers every rank's rows and lays the sequence out whole, \`ring\`"
    echo "passes one rank's block at a time around the ring while attending to the one in"
    echo "hand (cp - 1 sendrecv steps per layer)."
    echo
    machine_section
    echo
    echo "| prompt tokens | cp | exchange | prefill ms | prefill tok/s | of it in communicator calls (rank 0), ms | bytes per token (rank 0) | K/V held per layer, MB |"
    echo "|--:|--:|---|--:|--:|--:|--:|--:|"
    for r in "${ROWS[@]}"; do echo "$r"; done
    echo
    command_section Command \
        "mpirun --oversubscribe --bind-to none -np CP build/bench_parallel --model models/$(basename "$MODEL") \\" \
        "    --cp CP --prompt P --gen 4 --threads 1 --cp-exchange kv|ring"
} > "$OUT"
echo "run_ring.sh: wrote $OUT" >&2
