#!/usr/bin/env bash
# One command for a fresh Debian 12 machine: installs the dependencies,
# builds cparallel, fetches the default model, then runs the main job on it:
# `cparallel serve` on a free loopback port, one OpenAI-style chat request
# through it (curl), and a clean SIGTERM drain. SETUP_SERVE=1 keeps the
# server running in the foreground on port 8080 instead (Ctrl-C to stop).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_deps.sh
./scripts/build.sh
./scripts/fetch_model.sh
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${SETUP_SERVE:-0}" = 1 ]; then
  exec build/cparallel serve --model "$MODEL" --port 8080
fi
log=$(mktemp)
build/cparallel serve --model "$MODEL" --port 0 --no-progress 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
url=""
for _ in $(seq 1 600); do
  url=$(grep -o 'http://[0-9.:]*' "$log" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "setup: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "cparallel serve is up at $url; asking it one question:"
payload=$(CP_PROMPT="${CP_PROMPT:-What is the capital of France?}" python3 -c '
import json, os
print(json.dumps({"messages": [{"role": "user", "content": os.environ["CP_PROMPT"]}],
                  "temperature": 0, "max_tokens": 64}))')
curl -sS "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$payload" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(r["choices"][0]["message"]["content"])
print("(%d prompt + %d completion tokens)" % (r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]))'
kill -TERM $pid
wait $pid
echo "done. To keep serving: build/cparallel serve --model $MODEL --port 8080"
