/* ranks.h - the MPI world of a command that runs a model across ranks: the
 * world communicator, its tensor- and pipeline-parallel groups, and the
 * per-rank defaults that come from the node layout (threads, GPU). */
#ifndef CP_LAUNCHER_RANKS_H
#define CP_LAUNCHER_RANKS_H

#include "cp_comm.h"
#include "cp_runtime.h"
#include "cp_tensor.h"

typedef struct ranks {
    cp_comm_t world, tp, pp, cp;
    cp_comm_t tp_dev, pp_dev; /* NCCL twins of tp and pp for activations on GPUs (NULL: none) */
    int rank, size;
    int n_cp;       /* context-parallel ranks per stage and TP slot */
    int64_t *peers; /* [size][2] {pid, host hash} after ranks_learn_peers, else NULL */
    char mark[128]; /* the fault mark file of rank 0's host ("" when none) */
    bool reported;  /* rank 0: a fault was reported */
} ranks;

/* The world and its groups for tp x cp x pp ranks
 * (rank = (stage * cp + cp rank) * tp + tp rank). Returns 0, or the exit
 * code after printing one line on every rank (2 when the job's size does
 * not match tp x cp x pp). ranks_free is needed either way. */
int ranks_init(ranks *r, int tp, int pp, int cp, int timeout_ms);
void ranks_free(ranks *r);

/* Ranks sharing a node share its cores (when *threads is 0) and take its
 * GPUs in turn by node-local rank (when dev is CUDA and *device_id < 0).
 * Then, collectively, the device communicators: with dev CUDA and how
 * CP_COMM_AUTO, NCCL twins of the TP and pipeline groups (tp_dev, pp_dev)
 * when this build has NCCL and no two ranks of a node run on the same GPU
 * (told by the GPUs' UUIDs, so CUDA_VISIBLE_DEVICES per rank works), else
 * none: the activations then pass through host memory over MPI, and rank 0
 * says why in one line when the ranks run on GPUs. An NCCL start that fails
 * falls back likewise, with a warning. how CP_COMM_NCCL makes each of these
 * an error; CP_COMM_MPI never tries. Returns 0, or 1 after printing why. */
int ranks_node_defaults(ranks *r, cp_device dev, cp_comm_kind how, int *threads, int *device_id);

/* The engine options of this rank that every command running a model
 * across the ranks shares (model, device, threads, context, the tp x cp x pp
 * layout and its groups); the caller sets the rest. device_id < 0: 0. */
cp_engine_opts ranks_engine_opts(const ranks *r, const char *model, cp_device dev, int device_id,
                                 int threads, int n_ctx, int tp, int pp);

/* Every rank learns each rank's pid and host (collective). Returns 0, or
 * 1 after printing why. */
int ranks_learn_peers(ranks *r);

/* Exactly one process reports a fault of the job: rank 0 while it lives,
 * else the lowest follower on rank 0's host. They agree through a small
 * mark file on that host (in /dev/shm), made by ranks_learn_peers when
 * rank 0 has a follower beside it: rank 0 calls ranks_fault_reported when
 * it ran its fault hook, and a follower that lost the job calls
 * ranks_reports_lead_loss, which waits (up to wait_s) until rank 0 either
 * marked the fault or is gone, and is true only when rank 0 is gone
 * without a mark and this rank is the designated follower. Ranks on other
 * hosts cannot tell and get false. The mark is removed at the end. */
void ranks_fault_reported(ranks *r);
bool ranks_reports_lead_loss(ranks *r, double wait_s);

#endif /* CP_LAUNCHER_RANKS_H */
