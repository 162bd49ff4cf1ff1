#!/usr/bin/env bash
# run_logits.sh - what the logit rows of a serving step cost across ranks:
# every row's full logits gathered (cp_model_forward) against each row's
# best candidate, as the server asks for a greedy row (cp_model_forward_top),
# and against a token sampled by the forward pass for every row, as the
# server asks for temperature sampling without a top-k (plain at
# temperature 1, and top-p 0.95 at temperature 0.8).
# One step of S streams decoding after H tokens of history plus a fresh
# prompt chunk of P tokens (bench_parallel --mixed), on the default model at
# tp 3, pp 2 and tp 3 x pp 2; bytes passed by rank 0 and the step's time.
# Writes benchmarks/parallel/results/logits_<date>.md.
#
#   BUILD=build benchmarks/parallel/run_logits.sh   (env: S=16, H=64, P=16, OUT)
set -euo pipefail

. "$(dirname "$0")/common.sh"
S=${S:-16}
H=${H:-64}
P=${P:-16}
OUT=${OUT:-$REPO/benchmarks/parallel/results/logits_$DATE.md}
MODEL=$DEFAULT_MODEL
require bench_parallel

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for layout in "3 1" "1 2" "3 2"; do
    read -r tp pp <<< "$layout"
    for mode in full top sample nucleus; do
        echo "== tp $tp pp $pp, logits $mode" >&2
        err=$(mktemp)
        row=$("${MPIRUN[@]}" -np $((tp * pp)) "$BUILD/bench_parallel" --model "$MODEL" --tp "$tp" --pp "$pp" \
                  --mixed "$S" --prompt "$H" --fresh "$P" --logits "$mode" --name "$mode" 2> >(tee "$err" >&2) | tail -1)
        sleep 1 # the tee behind the process substitution may still write
        how=$(sed -n 's/^bench_parallel: \([0-9]*\) rows sampled from the candidates, \([0-9]*\) by the owning rank, \([0-9]*\) from full rows$/\1 \/ \2 \/ \3/p' "$err" | tail -1)
        rm -f "$err"
        ROWS+=("$row ${how:--} |")
    done
done

{
    echo "# Logit rows of a serving step across ranks, $DATE"
    echo
    echo "Produced by \`benchmarks/parallel/run_logits.sh\`: \`bench_parallel --mixed $S --prompt $H"
    echo "--fresh $P\` on the default model: $S streams with $H tokens of history decode one token"
    echo "each in the same step as a $P-token prompt chunk; $((S + 1)) rows want logits."
    echo "\`full\`: every row's logits reach every rank (the vocabulary slices all-gathered over"
    echo "TP, the rows broadcast from the last pipeline stage). \`top\`: each row's best candidate"
    echo "only, as the server asks for a greedy row (each TP rank passes its best (logit, id)"
    echo "and the stages pass the merged one). \`sample\` and \`nucleus\`: the forward pass samples"
    echo "every row (temperature 1 without filters; temperature 0.8 with top-p 0.95), as the"
    echo "server asks for temperature sampling without a top-k: the TP ranks pass their 256 best"
    echo "candidates and their slices' sums; the last column says how many rows the candidates"
    echo "settled, how many the rank owning u's share of the mass sampled (plain sampling beyond"
    echo "the candidates: one more all-gather of a token per row), and how many needed the"
    echo "full rows (a top-p cut beyond the candidates). Bytes: the payload rank 0 passed over"
    echo "its groups during the step, activations included; time: the slowest rank, one run."
    echo
    machine_section
    echo
    echo "| logits | tp | pp | cp | exchange | streams x history | fresh tokens | bytes (rank 0) | step ms | sampled: candidates / owner / full rows |"
    echo "|---|--:|--:|--:|---|--:|--:|--:|--:|---|"
    for r in "${ROWS[@]}"; do echo "$r"; done
    echo
    command_section Command "mpirun --oversubscribe --bind-to none -np TP*PP build/bench_parallel --model models/$(basename "$MODEL") --tp TP --pp PP --mixed $S --prompt $H --fresh $P --logits full|top|sample|nucleus"
} > "$OUT"
echo "run_logits.sh: wrote $OUT" >&2
