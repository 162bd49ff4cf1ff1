#!/usr/bin/env bash
# pp_compare.sh - a quick look at pipelined serving: starts `cparallel
# serve` under mpirun with the given layout, times 8 concurrent greedy
# streams of 150 tokens and then one long prompt (1540 tokens of the default
# model, one output token), and stops the ranks with SIGTERM.
#
#   benchmarks/serve/pp_compare.sh NP [serve options...]
#   benchmarks/serve/pp_compare.sh 2 --pp 2 --threads 1
#   benchmarks/serve/pp_compare.sh 2 --pp 2 --threads 1 --pp-serial
#
# Env: MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf), BIN
# (default build/cparallel). Prints one line; run.sh is the full benchmark.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
NP=$1; shift
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${BIN:-build/cparallel}
LOG=$(mktemp)
mpirun -np "$NP" --oversubscribe --bind-to none "$BIN" serve --model "$MODEL" --port 0 --no-progress "$@" \
  2> "$LOG" &
JOB=$!
trap 'pkill -TERM -P $JOB 2> /dev/null || true; wait $JOB 2> /dev/null || true; rm -f "$LOG"' EXIT
URL=
for _ in $(seq 1 600); do
  URL=$(sed -n 's/^cparallel: serving .* on \(http:\/\/[^ ]*\)$/\1/p' "$LOG" | head -1)
  [ -n "$URL" ] && break
  kill -0 "$JOB" 2> /dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.5
done
[ -n "$URL" ] || { echo "pp_compare.sh: the server printed no address" >&2; exit 1; }
python3 - "$URL" <<'PY'
import json, sys, threading, time, urllib.request
url = sys.argv[1]

def post(prompt, n):
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())

post("warm up", 4)
t = time.time()
ts = [threading.Thread(target=post, args=("Story %d about the sea:" % i, 150)) for i in range(8)]
for x in ts:
    x.start()
for x in ts:
    x.join()
decode = 8 * 150 / (time.time() - t)
prompt = " ".join("The patient was seen on day %d and reported mild symptoms." % i for i in range(110))
t = time.time()
r = post(prompt, 1)
print("8 streams x 150 tokens: %.1f tok/s | one prompt of %d tokens: %.2f s"
      % (decode, r["usage"]["prompt_tokens"], time.time() - t))
PY
