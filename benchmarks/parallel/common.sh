# common.sh - sourced by the run*.sh scripts: the repository, build and
# date, mpirun for several ranks on one machine, the check that the programs
# and the model are there, and the "Machine" and "Command" sections of a
# results file.

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

# require PROGRAM...: the build's programs and the default model exist, or
# the script says what to do and exits.
require() {
    local me b
    me=$(basename "$0")
    for b in "$@"; do
        [ -x "$BUILD/$b" ] || { echo "$me: $BUILD/$b not found: build first (cmake --build $BUILD --target $b)" >&2; exit 1; }
    done
    [ -f "$DEFAULT_MODEL" ] || { echo "$me: $DEFAULT_MODEL missing: run scripts/fetch_model.sh" >&2; exit 1; }
}

# command_section TITLE LINE...: a results file's last section, the command
# lines in an sh block after the MPI environment they need.
command_section() {
    echo "## $1"
    echo
    echo '```sh'
    echo "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    shift
    printf '%s\n' "$@"
    echo '```'
}
