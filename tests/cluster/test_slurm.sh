#!/usr/bin/env bash
# test_slurm.sh - cparallel under a real one-node Slurm started in a temporary
# directory (munged, slurmctld and slurmd on private sockets and ports):
#   a. srun --mpi=pmix -n 4 generate --tp 2 --pp 2 prints the text of a
#      single-process run (f32 random model: the same greedy tokens);
#   b. cluster/slurm/generate.sbatch (tp 2 from --ntasks-per-node=2) likewise;
#   c. cluster/slurm/serve_1node_8gpu.sbatch on the CPU (tp 1, pp 2, default
#      model, port 0): the address file appears, /health/ready answers 200,
#      a greedy completion matches the single-process text; scancel drains
#      rank 0 ("draining", "stopped"), every rank exits 0, nothing is left;
#   d. cluster/slurm/serve_multinode.sbatch on one node (tp 2 x pp 1 from the
#      task counts), stopped gracefully with scancel --signal=TERM: the job
#      ends COMPLETED with exit code 0;
#   e. serve_1node_8gpu.sbatch with CPARALLEL_REQUEUE=always gets the time
#      limit's SIGUSR1: the ranks drain and stop, the job is requeued.
# c and d send a long request just before the signal: it must finish in full.
# Everything is torn down on every exit path. Exit code 77 (skipped) without
# root, Slurm (slurm-wlm), munge, curl, an MPI build or Python with gguf+numpy.
# usage: test_slurm.sh CPARALLEL MODEL [PYTHON]
# CP_SLURM_TEST_KEEP=1 keeps the temporary directory (logs, job output).
set -u
cparallel=${1:-}
model=${2:-}
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
templates="$repo/cluster/slurm"
start_s=$(date +%s)

skip() {
    echo "SKIPPED: $*"
    exit 77
}
note() { echo "[$(($(date +%s) - start_s))s] $*"; }

# ---- prerequisites -----------------------------------------------------------
{ [ -n "$cparallel" ] && [ -x "$cparallel" ]; } || skip "no cparallel binary ('$cparallel')"
{ [ -n "$model" ] && [ -f "$model" ]; } || skip "no model at '$model' (scripts/fetch_model.sh)"
[ "$(id -u)" = 0 ] || skip "needs root (slurmd starts the job steps as root here)"
for b in munged munge slurmctld slurmd srun sbatch squeue scancel scontrol sinfo curl; do
    command -v "$b" >/dev/null 2>&1 ||
        skip "'$b' not found: apt-get install slurm-wlm (brings munge) and curl"
done
ldd "$cparallel" 2>/dev/null | grep -q 'libmpi' || skip "'$cparallel' is built without MPI"
py=""
for p in "${3:-}" "$repo/.venv-test/bin/python" python3; do
    if [ -n "$p" ] && "$p" -c "import gguf, numpy" >/dev/null 2>&1; then
        py=$p
        break
    fi
done
[ -n "$py" ] || skip "no Python with the gguf and numpy packages (scripts/install_deps.sh)"
cparallel="$(cd "$(dirname "$cparallel")" && pwd)/$(basename "$cparallel")"
model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"

# ---- temporary cluster, removed on every exit path ---------------------------
# A short path: munge and PMIx put Unix sockets under it.
T=$(mktemp -d /tmp/cp-slurm.XXXXXX) || exit 1
chmod 755 "$T"
daemon_pids=()
fail=0

# Every process of this test (daemons, job steps, ranks) carries this
# variable: the cleanup finds leftovers by it and nothing else.
export CP_SLURM_TEST_ID="$T"

# pids of live (not zombie) processes whose environment holds our marker and
# whose command line contains $1
marked_pids() {
    local d pid st
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$pid" = "$$" ] || [ "$pid" = "$BASHPID" ] && continue
        st=$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "$d/stat" 2>/dev/null) || continue
        [ "$st" = Z ] && continue
        tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "CP_SLURM_TEST_ID=$T" || continue
        tr '\0' ' ' 2>/dev/null <"$d/cmdline" | grep -qF -- "$1" || continue
        echo "$pid"
    done
}

stop_pid() { # TERM, up to 5 s, then KILL; reaps our own children
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

cleanup() {
    trap - EXIT INT TERM
    if [ -f "$T/slurm.conf" ] && [ ${#daemon_pids[@]} -eq 3 ]; then
        scancel --quiet --partition=cptest 2>/dev/null
        for _ in $(seq 50); do
            [ -z "$(squeue -h 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    local i
    for ((i = ${#daemon_pids[@]} - 1; i >= 0; i--)); do stop_pid "${daemon_pids[i]}"; done
    local left
    left=$(marked_pids "")
    if [ -n "$left" ]; then
        echo "cleanup: killing leftover processes: ${left//$'\n'/ }"
        # shellcheck disable=SC2086 # one pid per word
        kill -9 $left 2>/dev/null
    fi
    if [ "${CP_SLURM_TEST_KEEP:-0}" = 1 ]; then
        echo "kept $T"
    else
        rm -rf "$T"
    fi
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 1' INT TERM

dump() { # the logs that explain a failure
    local f
    for f in "$@"; do
        [ -f "$f" ] || continue
        echo "---- $f (last 40 lines)"
        tail -n 40 "$f"
    done
}

re_match() { [[ $1 =~ $2 ]]; }

check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then
        echo "ok: $what"
    else
        echo "FAIL: $what"
        fail=1
    fi
}

# ---- references: the random tp-capable model and single-process texts -------
prompt="The capital of France is"
rand="$T/rand.gguf"
"$py" "$repo/benchmarks/make_random_gguf.py" --out "$rand" --dim 256 --layers 4 --heads 8 \
    --kv-heads 4 --ffn 512 --type f32 --ctx 1024 --tie-embeddings --tokenizer-from "$model" \
    >"$T/make_random.log" 2>&1 || {
    dump "$T/make_random.log"
    echo "FAIL: cannot write the random model"
    exit 1
}
gen_args=(--prompt "$prompt" --temperature 0 --threads 1 --no-progress)
timeout 120 "$cparallel" generate --model "$rand" -n 16 "${gen_args[@]}" >"$T/ref_rand.txt" \
    2>"$T/ref_rand.err" || {
    dump "$T/ref_rand.err"
    echo "FAIL: single-process generate on the random model"
    exit 1
}
timeout 120 "$cparallel" generate --model "$model" -n 8 "${gen_args[@]}" >"$T/ref_model.txt" \
    2>"$T/ref_model.err" || {
    dump "$T/ref_model.err"
    echo "FAIL: single-process generate on $model"
    exit 1
}
note "references written"

# ---- start munge and Slurm ---------------------------------------------------
# A Slurm job around this test must not leak into the private cluster.
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_'); do unset "$v"; done
node=$(hostname -s)
ports=$("$py" -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s:
    x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
read -r ctld_port slurmd_port <<<"$ports"
mkdir -p "$T/munge" "$T/state" "$T/spool" "$T/tmp" "$T/jobs"
chmod 755 "$T/munge"
head -c 1024 /dev/urandom >"$T/munge/munge.key"
chmod 400 "$T/munge/munge.key"
# CPUs=2 with OverSubscribe=FORCE:4: up to 4 ranks on 2 cores (--overcommit)
cat >"$T/slurm.conf" <<EOF
ClusterName=cptest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
TmpFS=$T/tmp
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=cptest Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF="$T/slurm.conf"

startup_deadline=$(($(date +%s) + 30))
startup_failed() {
    dump "$T/munged.out" "$T/slurmctld.log" "$T/slurmctld.out" "$T/slurmd.log" "$T/slurmd.out"
    echo "FAIL: $1 did not start within 30 s (logs above)"
    exit 1
}
munged -F --force --socket="$T/munge/munge.socket" --key-file="$T/munge/munge.key" \
    --pid-file="$T/munge/munged.pid" --seed-file="$T/munge/munged.seed" \
    --log-file="$T/munge/munged.log" >"$T/munged.out" 2>&1 &
daemon_pids+=($!)
# PID 1 may not reap zombies here: ask munge itself, not pgrep
until munge -n -S "$T/munge/munge.socket" </dev/null >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$startup_deadline" ] || startup_failed munged
    sleep 0.1
done
slurmctld -D -i -f "$T/slurm.conf" >"$T/slurmctld.out" 2>&1 &
daemon_pids+=($!)
slurmd -D -f "$T/slurm.conf" -N "$node" >"$T/slurmd.out" 2>&1 &
daemon_pids+=($!)
until [ "$(sinfo -h -N -n "$node" -o %t 2>/dev/null)" = idle ]; do
    [ "$(date +%s)" -lt "$startup_deadline" ] || startup_failed "Slurm (slurmctld + slurmd)"
    for pid in "${daemon_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || startup_failed "a daemon (pid $pid exited)"
    done
    sleep 0.2
done
note "Slurm is up: node $node idle (slurmctld :$ctld_port, slurmd :$slurmd_port)"

# ---- functions for jobs --------------------------------------------------------
job_state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
job_exit() { scontrol show job "$1" 2>/dev/null | grep -o ' ExitCode=[0-9:]*' | cut -d= -f2; }
wait_job_end() { # wait_job_end JOB SECONDS: 0 once it left the queue
    local end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$end" ]; do
        case "$(job_state "$1")" in
        PENDING | RUNNING | CONFIGURING | COMPLETING | SUSPENDED | REQUEUED) sleep 0.2 ;;
        *) return 0 ;;
        esac
    done
    return 1
}
no_ranks_left() {
    local left="" i
    for i in $(seq 25); do
        left=$(marked_pids "$cparallel")
        [ -z "$left" ] && return 0
        sleep 0.2
    done
    echo "  cparallel processes left: ${left//$'\n'/ }"
    return 1
}
# The completion's text must be what the single-process run printed after
# the prompt (generate prints prompt + text + a newline).
same_completion() { # same_completion RESPONSE_JSON REFERENCE_TXT
    "$py" - "$1" "$2" "$prompt" <<'EOF'
import json, sys
resp = json.load(open(sys.argv[1]))
ref = open(sys.argv[2], encoding="utf-8").read()
text = resp["choices"][0]["text"]
want = ref[len(sys.argv[3]):].removesuffix("\n")
if not ref.startswith(sys.argv[3]) or text != want:
    print(f"  got  {text!r}\n  want {want!r}")
    sys.exit(1)
print(f"  text {text!r}")
EOF
}
wait_ready() { # wait_ready ADDRESS_FILE JOB: prints the URL once /health/ready is 200
    local end=$(($(date +%s) + 120)) url="" code=""
    while [ "$(date +%s)" -lt "$end" ]; do
        case "$(job_state "$2")" in PENDING | RUNNING | CONFIGURING) ;; *) return 1 ;; esac
        if [ -z "$url" ] && [ -s "$1" ]; then url=$(head -n 1 "$1"); fi
        if [ -n "$url" ]; then
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "${curl_route[@]}" \
                "$url/health/ready")
            if [ "$code" = 200 ]; then
                echo "$url"
                return 0
            fi
        fi
        sleep 0.3
    done
    return 1
}

# ---- a. srun: tp 2 x pp 2 ------------------------------------------------------
note "a. srun --mpi=pmix -n 4 --overcommit cparallel generate --tp 2 --pp 2"
timeout -k 5 120 srun --mpi=pmix -n 4 --overcommit --job-name=cp-generate \
    "$cparallel" generate --model "$rand" -n 16 --tp 2 --pp 2 "${gen_args[@]}" \
    >"$T/jobs/srun.out" 2>"$T/jobs/srun.err"
rc=$?
check "srun exit status 0 (got $rc)" [ "$rc" = 0 ]
check "tp 2 x pp 2 text equals the single-process text" cmp -s "$T/jobs/srun.out" "$T/ref_rand.txt"
[ "$fail" = 0 ] || dump "$T/jobs/srun.err" "$T/jobs/srun.out" "$T/ref_rand.txt"
note "a. done"

# ---- b. generate.sbatch --------------------------------------------------------
note "b. sbatch generate.sbatch (2 tasks on one node: tp 2 x pp 1)"
b_fail=$fail
job=$(CPARALLEL_BIN="$cparallel" CPARALLEL_MODEL="$rand" CPARALLEL_DEVICE=cpu \
    CPARALLEL_N_PREDICT=16 CPARALLEL_ARGS="--threads 1" \
    sbatch --parsable --gpus-per-node=0 --ntasks-per-node=2 --time=5 \
    --output="$T/jobs/generate.out" --error="$T/jobs/generate.err" "$templates/generate.sbatch")
if [ -z "$job" ]; then
    check "sbatch generate.sbatch" false
else
    check "generate job $job ended within 120 s" wait_job_end "$job" 120
    check "generate job state COMPLETED, exit 0:0 (got $(job_state "$job") $(job_exit "$job"))" \
        [ "$(job_state "$job"):$(job_exit "$job")" = "COMPLETED:0:0" ]
    check "the template chose tp 2 x pp 1" grep -q "2 x 1 ranks (tp x pp)" "$T/jobs/generate.err"
    check "tp 2 text equals the single-process text" \
        cmp -s "$T/jobs/generate.out" "$T/ref_rand.txt"
fi
[ "$fail" = "$b_fail" ] || dump "$T/jobs/generate.err" "$T/jobs/generate.out"
note "b. done"

# ---- c. serve_1node_8gpu.sbatch on the CPU, stopped by scancel -----------------
curl_route=()
serve_job() { # serve_job NAME TEMPLATE MODEL SBATCH_OPTIONS... : prints the job id
    local name=$1 tmpl=$2 m=$3
    shift 3
    CPARALLEL_BIN="$cparallel" CPARALLEL_MODEL="$m" CPARALLEL_DEVICE=cpu CPARALLEL_PORT=0 \
        CPARALLEL_MODEL_NAME=m CPARALLEL_ADDRESS_FILE="$T/jobs/$name.address" \
        CPARALLEL_ARGS="--threads 1 --ctx-size 512 --max-running 4" \
        sbatch --parsable --gpus-per-node=0 --time=5 "$@" --output="$T/jobs/$name.log" \
        "$templates/$tmpl"
}
post_completion() { # post_completion URL OUT_JSON MAX_TOKENS [MORE_JSON]: prints the HTTP status
    curl -s --max-time 90 "${curl_route[@]}" -H 'Content-Type: application/json' \
        -d "{\"model\": \"m\", \"prompt\": \"$prompt\", \"max_tokens\": $3, \"temperature\": 0${4:-}}" \
        -o "$2" -w '%{http_code}' "$1/v1/completions"
}
wait_running() { # wait_running URL: until the scheduler runs a sequence (30 s at most)
    local end=$(($(date +%s) + 30))
    while [ "$(date +%s)" -lt "$end" ]; do
        curl -s --max-time 5 "${curl_route[@]}" "$1/metrics" |
            grep -qE '^cparallel_running_sequences [1-9]' && return 0
        sleep 0.1
    done
    return 1
}
long_ok() { # long_ok CODE_FILE JSON TOKENS: the request in flight finished in full
    [ "$(cat "$1")" = 200 ] &&
        "$py" -c 'import json, sys
u = json.load(open(sys.argv[1]))["usage"]
sys.exit(u["completion_tokens"] != int(sys.argv[2]))' "$2" "$3"
}
serve_check() { # serve_check NAME JOB MODEL_REF MAX_TOKENS STOP_COMMAND...
    local name=$1 job=$2 ref=$3 ntok=$4
    shift 4
    local url code
    # clients resolve the first node's name; where it does not resolve here,
    # connect to its port on the loopback instead
    if ! url=$(wait_ready "$T/jobs/$name.address" "$job"); then
        check "$name: address published and /health/ready 200 within 120 s" false
        dump "$T/jobs/$name.log"
        return
    fi
    check "$name: address $url names node $node" re_match "$url" "^http://$node:[0-9]+\$"
    code=$(post_completion "$url" "$T/jobs/$name.json" "$ntok")
    check "$name: POST /v1/completions 200 (got $code)" [ "$code" = 200 ]
    check "$name: the completion equals the single-process text" \
        same_completion "$T/jobs/$name.json" "$ref"
    # a long request is in flight when the signal comes: the drain lets it
    # finish, in full, before the ranks stop
    local long=256
    post_completion "$url" "$T/jobs/$name.long.json" "$long" ', "ignore_eos": true' \
        >"$T/jobs/$name.long.code" &
    local curl_pid=$!
    check "$name: a $long-token request is running" wait_running "$url"
    note "$name: stopping with: $* $job"
    "$@" "$job"
    check "$name: job $job ended within 60 s of the signal" wait_job_end "$job" 60
    wait "$curl_pid"
    check "$name: the request in flight got all $long tokens (HTTP $(cat "$T/jobs/$name.long.code"))" \
        long_ok "$T/jobs/$name.long.code" "$T/jobs/$name.long.json" "$long"
    check "$name: rank 0 drained 1 request" \
        grep -q "cparallel: draining: 1 request(s) in flight" "$T/jobs/$name.log"
    check "$name: rank 0 stopped" grep -q "^cparallel: stopped" "$T/jobs/$name.log"
    check "$name: every rank exited 0" grep -q "ranks exited with status 0" "$T/jobs/$name.log"
    check "$name: the address file is removed" [ ! -e "$T/jobs/$name.address" ]
    check "$name: no cparallel process left" no_ranks_left
}
resolve_route() { # curl goes to 127.0.0.1 where the node name does not resolve
    if ! getent hosts "$node" >/dev/null 2>&1; then
        curl_route=(--connect-to "$node::127.0.0.1:")
        echo "  ($node does not resolve: curl connects to 127.0.0.1)"
    fi
}
resolve_route

note "c. sbatch serve_1node_8gpu.sbatch (CPU, tp 1 x pp 2, port 0) + scancel"
c_fail=$fail
job=$(CPARALLEL_TP=1 CPARALLEL_PP=2 serve_job serve1 serve_1node_8gpu.sbatch "$model" \
    --ntasks-per-node=2)
if [ -z "$job" ]; then
    check "sbatch serve_1node_8gpu.sbatch" false
else
    serve_check serve1 "$job" "$T/ref_model.txt" 8 scancel
    check "serve1: job state CANCELLED (got $(job_state "$job"))" \
        [ "$(job_state "$job")" = CANCELLED ]
fi
[ "$fail" = "$c_fail" ] || dump "$T/jobs/serve1.log"
note "c. done"

# ---- d. serve_multinode.sbatch on one node, scancel --signal=TERM ------------
note "d. sbatch serve_multinode.sbatch --nodes=1 (tp 2 x pp 1) + scancel --signal=TERM"
d_fail=$fail
job=$(serve_job servem serve_multinode.sbatch "$rand" --nodes=1 --ntasks-per-node=2)
if [ -z "$job" ]; then
    check "sbatch serve_multinode.sbatch" false
else
    serve_check servem "$job" "$T/ref_rand.txt" 16 scancel --signal=TERM
    check "servem: the template chose tp 2 x pp 1" grep -q "2 x 1 ranks (tp x pp)" \
        "$T/jobs/servem.log"
    check "servem: job state COMPLETED, exit 0:0 (got $(job_state "$job") $(job_exit "$job"))" \
        [ "$(job_state "$job"):$(job_exit "$job")" = "COMPLETED:0:0" ]
fi
[ "$fail" = "$d_fail" ] || dump "$T/jobs/servem.log"
note "d. done"

# ---- e. the time limit: SIGUSR1 to the batch shell, drain, requeue ------------
note "e. serve_1node_8gpu.sbatch (tp 2 from the tasks), SIGUSR1 as at the time limit, requeue"
e_fail=$fail
job=$(CPARALLEL_REQUEUE=always serve_job servet serve_1node_8gpu.sbatch "$rand" \
    --ntasks-per-node=2)
requeued() { # the job went back to the queue after one run
    grep -q "requeueing (restart 1 of at most 3)" "$T/jobs/servet.log" &&
        scontrol show job "$1" 2>/dev/null | grep -q "Restarts=1" &&
        [ "$(job_state "$1")" = PENDING ]
}
wait_requeued() {
    local end=$(($(date +%s) + 60))
    until requeued "$1"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.2
    done
}
if [ -z "$job" ]; then
    check "sbatch serve_1node_8gpu.sbatch" false
elif ! url=$(wait_ready "$T/jobs/servet.address" "$job"); then
    check "servet: address published and /health/ready 200 within 120 s" false
else
    check "servet: the template chose tp 2 x pp 1" grep -q "2 x 1 ranks (tp x pp)" \
        "$T/jobs/servet.log"
    # what --signal=B:USR1@120 does 120 s before the time limit
    scancel --batch --signal=USR1 "$job"
    check "servet: job $job drained and went back to the queue within 60 s" \
        wait_requeued "$job"
    check "servet: the time limit was announced" grep -q "time limit near: draining" \
        "$T/jobs/servet.log"
    check "servet: rank 0 drained and stopped" grep -q "^cparallel: stopped" "$T/jobs/servet.log"
    check "servet: every rank exited 0" grep -q "ranks exited with status 0" "$T/jobs/servet.log"
    check "servet: no cparallel process left" no_ranks_left
    scancel "$job"
fi
[ "$fail" = "$e_fail" ] || dump "$T/jobs/servet.log"
note "e. done"

if [ "$fail" = 0 ]; then
    note "PASS"
else
    dump "$T/slurmctld.log" "$T/slurmd.log"
    note "FAIL"
fi
exit "$fail"
