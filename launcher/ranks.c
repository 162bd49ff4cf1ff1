/* ranks.c - the world communicator and parallel groups of a multi-rank
 * command (see ranks.h). */
#include "ranks.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "cp_backend.h"

void ranks_free(ranks *r) {
    cp_comm_free(r->tp);
    cp_comm_free(r->pp);
    cp_comm_free(r->world);
    memset(r, 0, sizeof(*r));
}

int ranks_init(ranks *r, int tp, int pp, int timeout_ms) {
    memset(r, 0, sizeof(*r));
    if (cp_comm_init_world(CP_COMM_AUTO, timeout_ms, &r->world) != CP_OK) {
        cli_report_error("cannot start the communicator");
        return 1;
    }
    r->rank = cp_comm_rank(r->world);
    r->size = cp_comm_size(r->world);
    if (tp * pp != r->size) {
        fprintf(stderr,
                "cparallel: error: rank %d: --tp %d x --pp %d = %d ranks, but the job has %d "
                "(start it with mpirun -np %d or change --tp/--pp)\n",
                r->rank, tp, pp, tp * pp, r->size, tp * pp);
        return 2;
    }
    /* ranks of one stage are consecutive: rank = pp_rank * tp + tp_rank */
    if ((tp > 1 && cp_comm_split(r->world, r->rank / tp, r->rank, &r->tp) != CP_OK) ||
        (pp > 1 && cp_comm_split(r->world, r->rank % tp, r->rank, &r->pp) != CP_OK)) {
        cli_report_error("cannot create the parallel groups");
        return 1;
    }
    return 0;
}

void ranks_node_defaults(const ranks *r, cp_device dev, int *threads, int *device_id) {
    int local = cp_comm_local_size(r->world);
    if (*threads == 0 && local > 1) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        *threads = (int)(cores / local);
        if (*threads < 1) *threads = 1;
    }
    if (dev == CP_DEVICE_CUDA && *device_id < 0) {
        int count = 0;
        cp_backend_cuda_device_count(&count);
        *device_id = count > 0 ? cp_comm_local_rank(r->world) % count : 0;
    }
}
