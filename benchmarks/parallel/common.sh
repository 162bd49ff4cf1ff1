# common.sh - sourced by run.sh and run_cp.sh: the repository, build and
# date, mpirun for several ranks on one machine, and the "Machine" section
# of a results file.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${BUILD:-$REPO/build}
DATE=$(date +%Y-%m-%d)
DEFAULT_MODEL=$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# no binding: Open MPI binds each rank to one core by default when np <= 2,
# which would put a one-rank run's threads on a single core
MPIRUN=(mpirun --oversubscribe --bind-to none)

# machine_section: the machine, the MPI, the load (LOAD_BEFORE, set by the
# script when its runs begin, and now) and the source revision.
machine_section() {
    echo "## Machine"
    echo
    echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores online"
    echo "- memory: $(free -g | awk '/^Mem:/ {print $2}') GiB; kernel $(uname -sr)"
    echo "- $(mpirun --version 2>/dev/null | head -1); communicator: MPI (host buffers), CPU backend"
    echo "- load average before the runs: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- source: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit') $(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
}
