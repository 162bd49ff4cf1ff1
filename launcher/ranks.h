/* ranks.h - the MPI world of a command that runs a model across ranks: the
 * world communicator, its tensor- and pipeline-parallel groups, and the
 * per-rank defaults that come from the node layout (threads, GPU). */
#ifndef CP_LAUNCHER_RANKS_H
#define CP_LAUNCHER_RANKS_H

#include "cp_comm.h"
#include "cp_tensor.h"

typedef struct ranks {
    cp_comm_t world, tp, pp;
    int rank, size;
} ranks;

/* The world and its groups for tp x pp ranks (rank = stage * tp + tp rank).
 * Returns 0, or the exit code after printing one line on every rank (2 when
 * the job's size does not match tp x pp). ranks_free is needed either way. */
int ranks_init(ranks *r, int tp, int pp, int timeout_ms);
void ranks_free(ranks *r);

/* Ranks sharing a node share its cores (when *threads is 0) and take its
 * GPUs in turn by node-local rank (when dev is CUDA and *device_id < 0). */
void ranks_node_defaults(const ranks *r, cp_device dev, int *threads, int *device_id);

#endif /* CP_LAUNCHER_RANKS_H */
