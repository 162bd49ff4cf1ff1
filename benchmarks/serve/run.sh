#!/usr/bin/env bash
# run.sh - the serving benchmark: starts `cparallel serve`, drives it with
# loadgen.py, stops it with SIGTERM (exit code 0 expected), then does the same
# for llama.cpp's server from llama-cpp-python on the same GGUF and threads,
# and writes OUT/README.md with both side by side, the raw JSON and the logs.
#
#   benchmarks/serve/run.sh [--model PATH] [--device cpu|cuda] [--requests N]
#       [--concurrency LIST] [--peer|--no-peer] [--out DIR] [options]
#
# Run from anywhere; paths are taken relative to the repository root. See
# benchmarks/serve/README.md (or --help) for every option.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
HERE=benchmarks/serve
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
DEVICE=cpu
REQUESTS=32
CONC=1,8,32
PEER=auto
OUT=
BIN=
THREADS=
MIX=short
PLEN=
OLEN=
SEED=1
MAX_RUNNING=
MAX_STEP=
NP=
SERVE_ARGS=()
PEER_PY=${PEER_PYTHON:-}
PEER_CTX=4096
STARTUP_S=900

usage() {
  cat <<EOF
usage: $HERE/run.sh [options]
  --model PATH         GGUF file or model directory (default $MODEL); a directory
                       without tokenizer.json gets one from synth_tokenizer.py
  --device DEV         cpu (default) or cuda / cuda:N, passed to cparallel serve
  --requests N         requests per concurrency level (default $REQUESTS)
  --concurrency LIST   client counts, in turn (default $CONC)
  --mix NAME           short (default: prompts 32-256 / outputs 32-128) or long
  --prompt-len N --output-len N   fixed lengths instead of --mix
  --seed S             loadgen seed (default 1)
  --threads N          CPU threads of both servers (default: nproc)
  --max-running N      cparallel serve --max-running (default: the server's, 16)
  --max-step-tokens N  cparallel serve --max-step-tokens (default: the server's)
  --bin PATH           cparallel binary (default build/cparallel)
  --np N               run cparallel serve under mpirun -np N (--oversubscribe
                       --bind-to none); give the layout with --serve-arg
  --serve-arg ARG      one more argument for cparallel serve (repeat it:
                       --serve-arg --pp --serve-arg 2)
  --peer | --no-peer   run llama-cpp-python's server too (default: when the model
                       is a .gguf file and llama_cpp.server imports; --peer
                       makes a missing peer an error)
  --peer-python PATH   Python with llama-cpp-python[server] (default: env
                       PEER_PYTHON, $HERE/.venv/bin/python, python3)
  --out DIR            results folder (default $HERE/results/DEVICE_DATE)
EOF
}

die() { echo "run.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --concurrency) CONC=$2; shift 2 ;;
    --mix) MIX=$2; shift 2 ;;
    --prompt-len) PLEN=$2; shift 2 ;;
    --output-len) OLEN=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --max-running) MAX_RUNNING=$2; shift 2 ;;
    --max-step-tokens) MAX_STEP=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --np) NP=$2; shift 2 ;;
    --serve-arg) SERVE_ARGS+=("$2"); shift 2 ;;
    --peer) PEER=on; shift ;;
    --no-peer) PEER=off; shift ;;
    --peer-python) PEER_PY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

BIN=${BIN:-build/cparallel}
THREADS=${THREADS:-$(nproc)}
[ -x "$BIN" ] || die "no cparallel binary at $BIN (build it, or pass --bin PATH)"
[ -e "$MODEL" ] || die "no model at $MODEL"
OUT=${OUT:-$HERE/results/${DEVICE%%:*}_$(date +%Y-%m-%d)}
mkdir -p "$OUT"
LOAD_ARGS=(--requests "$REQUESTS" --concurrency "$CONC" --seed "$SEED")
if [ -n "$PLEN$OLEN" ]; then
  LOAD_ARGS+=(--prompt-len "$PLEN" --output-len "$OLEN")
else
  LOAD_ARGS+=(--mix "$MIX")
fi

CMDS="$OUT/commands.txt"
: > "$CMDS"
record() { # appends the command line, each argument shell-quoted where needed
  local a line=
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then line+=" $a"; else line+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "${line# }" >> "$CMDS"
}
note() { echo "run.sh: $*" >&2; }

# ---- the machine ---------------------------------------------------------------
{
  echo "- date: $(date '+%Y-%m-%d %H:%M %Z')"
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) logical CPUs visible" \
       "($(lscpu | sed -n 's/^Core(s) per socket: *//p' | head -1) cores per socket," \
       "$(lscpu | sed -n 's/^Thread(s) per core: *//p' | head -1) thread(s) per core)," \
       "$(free -g | awk '/^Mem:/{print $2}') GiB memory"
  if [ "${DEVICE%%:*}" = cuda ] && command -v nvidia-smi > /dev/null; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  fi
  rev=unknown
  if rev=$(git rev-parse --short HEAD 2> /dev/null); then
    git diff --quiet HEAD 2> /dev/null || rev+=" (with uncommitted changes)"
  fi
  echo "- cparallel: \`$BIN\`, commit $rev"
  echo "- model: \`$MODEL\`, device $DEVICE, threads $THREADS"
  echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other processes on the machine lower the numbers)"
} > "$OUT/machine.md"

CP_PID=
PEER_PID=
cleanup() { # servers still running when the script stops early
  for p in $CP_PID $PEER_PID; do kill -TERM "$p" 2> /dev/null || true; done
}
trap cleanup EXIT

stop_server() { # NAME PID: SIGTERM, then returns the server's exit code
  local name=$1 pid=$2 rc=0
  if [ "$name" = cparallel ] && [ -n "$NP" ]; then
    # every rank, as Slurm signals them (mpirun itself ends the job with
    # an error when it is signalled); rank 0 drains and stops the others
    pkill -TERM -P "$pid" 2> /dev/null || true
  else
    kill -TERM "$pid" 2> /dev/null || true
  fi
  wait "$pid" || rc=$?
  echo "- $name: stopped with SIGTERM, exit code $rc" >> "$OUT/exit_codes.md"
  note "$name exited with code $rc"
  return "$rc"
}
: > "$OUT/exit_codes.md"
STATUS=0
JSONS=()

# ---- cparallel --------------------------------------------------------------------
if [ -d "$MODEL" ] && [ ! -f "$MODEL/tokenizer.json" ]; then
  record "$PY" "$HERE/synth_tokenizer.py" --model-dir "$MODEL"
  "$PY" "$HERE/synth_tokenizer.py" --model-dir "$MODEL"
fi
SERVE=("$BIN" serve --model "$MODEL" --port 0 --threads "$THREADS" --device "$DEVICE" --no-progress)
if [ -n "$MAX_RUNNING" ]; then SERVE+=(--max-running "$MAX_RUNNING"); fi
if [ -n "$MAX_STEP" ]; then SERVE+=(--max-step-tokens "$MAX_STEP"); fi
SERVE+=("${SERVE_ARGS[@]}")
if [ -n "$NP" ]; then
  command -v mpirun > /dev/null || die "--np: no mpirun on PATH"
  SERVE=(mpirun -np "$NP" --oversubscribe --bind-to none "${SERVE[@]}")
fi
record "${SERVE[@]}"
note "starting cparallel serve"
"${SERVE[@]}" 2> "$OUT/cparallel.log" &
CP_PID=$!
URL=
for _ in $(seq 1 $((STARTUP_S * 4))); do
  URL=$(sed -n 's/^cparallel: serving .* on \(http:\/\/[^ ]*\)$/\1/p' "$OUT/cparallel.log" | head -1)
  [ -n "$URL" ] && break
  kill -0 "$CP_PID" 2> /dev/null || { tail -5 "$OUT/cparallel.log" >&2; die "cparallel serve exited before serving"; }
  sleep 0.25
done
[ -n "$URL" ] || die "cparallel serve printed no address within $STARTUP_S s"
LG=("$PY" "$HERE/loadgen.py" --url "$URL" --wait-ready 600 --label cparallel --server-pid "$CP_PID" "${LOAD_ARGS[@]}"
    --length-mode ignore_eos --json "$OUT/cparallel.json")
record "${LG[@]}"
rc=0
"${LG[@]}" | tee "$OUT/cparallel.md" || rc=$?
[ "$rc" = 0 ] || { note "loadgen reported errors for cparallel (exit $rc)"; STATUS=1; }
if [ -f "$OUT/cparallel.json" ]; then JSONS+=(--json "$OUT/cparallel.json"); fi
rc=0
stop_server cparallel "$CP_PID" || rc=$?
CP_PID=
[ "$rc" = 0 ] || { note "cparallel serve did not exit with 0"; STATUS=1; }

# ---- llama.cpp's server (llama-cpp-python) ------------------------------------------
PEER_NOTE=
if [ "$PEER" != off ]; then
  if [ -z "$PEER_PY" ]; then
    if [ -x "$HERE/.venv/bin/python" ]; then PEER_PY=$HERE/.venv/bin/python; else PEER_PY=python3; fi
  fi
  why=
  case "$MODEL" in *.gguf) ;; *) why="the model is not a GGUF file" ;; esac
  if [ -z "$why" ] && ! "$PEER_PY" -c 'import llama_cpp.server.app' 2> /dev/null; then
    why="$PEER_PY cannot import llama_cpp.server (pip install 'llama-cpp-python[server]')"
  fi
  if [ -n "$why" ]; then
    [ "$PEER" = on ] && die "--peer: $why"
    PEER_NOTE="llama.cpp's server was not run: $why."
    note "$PEER_NOTE"
  else
    PVER=$("$PEER_PY" -c 'import llama_cpp; print(llama_cpp.__version__)')
    echo "- peer: llama-cpp-python $PVER (\`$PEER_PY\`), threads $THREADS, n_ctx $PEER_CTX" >> "$OUT/machine.md"
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # --interrupt_requests False: the default (True) ends a running stream as
    # soon as another request waits, so concurrent clients get cut-off outputs
    PSERVE=("$PEER_PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$PORT"
            --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx "$PEER_CTX"
            --interrupt_requests False --verbose False)
    record "${PSERVE[@]}"
    note "starting llama-cpp-python's server"
    "${PSERVE[@]}" > "$OUT/peer.log" 2>&1 &
    PEER_PID=$!
    # llama-cpp-python ignores ignore_eos; its min_tokens keeps EOS away until
    # max_tokens, and repeat_penalty 1 matches cparallel's plain greedy sampling
    LG=("$PY" "$HERE/loadgen.py" --url "http://127.0.0.1:$PORT" --wait-ready "$STARTUP_S"
        --label llama.cpp --server-pid "$PEER_PID" "${LOAD_ARGS[@]}" --length-mode min_tokens
        --extra '{"repeat_penalty": 1.0}' --json "$OUT/peer.json")
    record "${LG[@]}"
    rc=0
    "${LG[@]}" | tee "$OUT/peer.md" || rc=$?
    [ "$rc" = 0 ] || { note "loadgen reported errors for llama.cpp (exit $rc)"; STATUS=1; }
    if [ -f "$OUT/peer.json" ]; then JSONS+=(--json "$OUT/peer.json"); fi
    rc=0
    stop_server llama.cpp "$PEER_PID" || rc=$?
    PEER_PID=
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught
    if [ "$rc" = 143 ] && grep -q "Finished server process" "$OUT/peer.log"; then
      echo "  (143 = 128 + SIGTERM: uvicorn re-raises the signal after its graceful shutdown," \
           "'Finished server process' in peer.log)" >> "$OUT/exit_codes.md"
    elif [ "$rc" != 0 ]; then
      note "llama-cpp-python's server did not stop cleanly"
    fi
  fi
fi

# ---- the page -------------------------------------------------------------------------
echo "- load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.md"
{
  cat "$OUT/exit_codes.md"
  if [ -n "$PEER_NOTE" ]; then echo "- $PEER_NOTE"; fi
} > "$OUT/notes.md"
sed -i '1i ## Server exits\n' "$OUT/notes.md"
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" "$HERE/report.py" --title "Serving benchmark: ${DEVICE}, $(basename "$MODEL")" \
    "${JSONS[@]}" --machine "$OUT/machine.md" --commands "$CMDS" --notes "$OUT/notes.md" \
    --out "$OUT/README.md"
  rm -f "$OUT/machine.md" "$OUT/notes.md" "$OUT/exit_codes.md"
  note "wrote $OUT/README.md"
fi
exit "$STATUS"
