#!/usr/bin/env bash
# run_stall.sh - the communicator's deadline test. Runs comm_stall with 4
# ranks; rank 3 sleeps 10 s before an all-reduce whose deadline is 1500 ms.
# Passes when ranks 0-2 report CP_ERR_TIMEOUT naming rank 3 within the
# deadline + slack, refuse the next call at once, the job ends by itself
# well before rank 3 wakes up, and no process is left behind.
# usage: run_stall.sh MPIEXEC NUMPROC_FLAG STALL_BINARY COUNT [mpiexec flags...]
set -u
mpiexec=$1 npflag=$2 bin=$3 count=$4
shift 4
timeout_ms=1500
slack_ms=2500 # diagnosis grace (200 ms) + start-up and scheduling on 2 shared cores
token="cp_stall_$$_$RANDOM"

t0=$(date +%s%N)
out=$(timeout -k 5 60 "$mpiexec" "$npflag" 4 "$@" "$bin" --timeout-ms "$timeout_ms" \
        --stall-rank 3 --stall-s 10 --count "$count" --token "$token" 2>&1)
rc=$?
wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "$out"
echo "-- mpirun exit status $rc after $wall_ms ms"

fail=0
if [ "$rc" -eq 0 ]; then echo "FAIL: the job exited 0"; fail=1; fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "FAIL: the job did not end by itself within 60 s"; fail=1
fi
# rank 3 sleeps 10 s: the job must end (killed by the launcher) well before
if [ "$wall_ms" -gt 9000 ]; then echo "FAIL: the job took $wall_ms ms"; fail=1; fi
for r in 0 1 2; do
  line=$(printf '%s\n' "$out" | grep "^rank $r: CP_ERR_TIMEOUT after " | head -n1)
  want="all_reduce on world (rank $r of 4) timed out after $timeout_ms ms waiting for rank 3"
  if [ -z "$line" ] || [[ "$line" != *"$want"* ]]; then
    echo "FAIL: rank $r did not report '$want'"; fail=1; continue
  fi
  ms=$(printf '%s\n' "$line" | sed -E 's/^rank [0-9]+: CP_ERR_TIMEOUT after ([0-9]+) ms.*/\1/')
  if [ "$ms" -lt "$timeout_ms" ] || [ "$ms" -gt $((timeout_ms + slack_ms)) ]; then
    echo "FAIL: rank $r detected the timeout after $ms ms"; fail=1
  else
    echo "rank $r: timeout detected after $ms ms (deadline $timeout_ms ms)"
  fi
  if ! printf '%s\n' "$out" | grep -q "^rank $r: next call CP_ERR_TIMEOUT after 0\.[0-9] ms: .*unusable after an earlier timeout"; then
    echo "FAIL: rank $r's next call did not fail at once"; fail=1
  fi
done
sleep 0.5
left=$(pgrep -f "$token" || true)
if [ -n "$left" ]; then
  echo "FAIL: processes left behind: $left"; fail=1
  for p in $left; do kill -9 "$p" 2>/dev/null; done
fi
[ "$fail" -eq 0 ] && echo "PASS"
exit "$fail"
