/* cp_step_link.h - multi-rank serving: rank 0 runs the scheduler (and the
 * HTTP front end) and every other rank follows it. For each forward step
 * rank 0 broadcasts the step's batch descriptor (tokens, positions,
 * sequence rows, KV block tables, logit rows) over the world communicator,
 * then all ranks run cp_model_forward_top on it together, so TP, PP and SP work
 * exactly as for one request. KV blocks are allocated by rank 0's scheduler
 * only; the followers' caches hold the same blocks by id.
 *
 * Liveness: while rank 0 has no work it sends a heartbeat at least every
 * CP_STEP_LINK_HEARTBEAT_MS, so a follower waiting for the next step stays
 * inside the communicator's deadline and a dead rank is noticed within one
 * deadline on either side: a follower whose wait expires returns
 * CP_ERR_TIMEOUT naming rank 0; rank 0's next step or heartbeat fails with
 * the communicator's error and the link stays broken (later calls fail at
 * once with the first error). */
#ifndef CP_STEP_LINK_H
#define CP_STEP_LINK_H

#include <stdbool.h>

#include "cp_model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct cp_comm;

#define CP_STEP_LINK_HEARTBEAT_MS 1000

typedef struct cp_step_link *cp_step_link_t;

#define CP_STEP_LINK_MAX_DEPTH 16

/* Binds the world communicator (all tp x pp ranks, rank 0 leads) to this
 * rank's model and KV cache (all borrowed). Every rank's cache must have
 * the same number of blocks. pipelined (every rank alike): with pp > 1
 * stages (at most CP_STEP_LINK_MAX_DEPTH, no context parallelism) rank 0
 * may keep one step in flight per stage, each stage working on a
 * different one (cp_step_link_depth, cp_step_link_finish); otherwise a
 * step runs through every stage before the next starts. Collective over
 * world. Errors: CP_ERR_INVALID_ARG, CP_ERR_OOM, the communicator's. */
cp_status cp_step_link_init(struct cp_comm *world, cp_model_t m, cp_kv_cache_t kv, bool pipelined,
                            cp_step_link_t *out);
void cp_step_link_free(cp_step_link_t l);

/* Steps rank 0 may have in flight: the pipeline stages when pipelined,
 * else 1. */
int cp_step_link_depth(cp_step_link_t l);

/* Rank 0: sends b and what its logit rows need to every rank, then runs
 * cp_model_forward_top(b) with them. Pipelined, it runs the first stage
 * and passes the step on, and out is written by cp_step_link_finish (b
 * and out must stay untouched until then; at most depth steps in
 * flight). The signature of cp_sched_opts.forward. */
cp_status cp_step_link_forward(void *link, const cp_batch *b, const cp_logit_top *out);

/* Rank 0: waits for the oldest step in flight, whose output is out (a
 * no-op when not pipelined). The signature of cp_sched_opts.finish. */
cp_status cp_step_link_finish(void *link, const cp_logit_top *out);

/* Rank 0, when idle: sends a heartbeat if none went out for
 * CP_STEP_LINK_HEARTBEAT_MS. The signature of cp_sched_opts.idle. Fails
 * once the link is broken. */
cp_status cp_step_link_idle(void *link);

/* Rank 0: tells the followers to return from cp_step_link_follow (with
 * CP_OK when ok, else with CP_ERR_INTERNAL: rank 0 stopped after a
 * failure). Safe on a broken link (then it does nothing). */
cp_status cp_step_link_stop(cp_step_link_t l, bool ok);

/* Followers: runs every step rank 0 sends until it stops them. Returns
 * CP_OK on a clean stop; an error when rank 0 failed or vanished, or when
 * a forward step failed here (rank 0 sees the same step fail). */
cp_status cp_step_link_follow(cp_step_link_t l);

typedef struct cp_step_link_stats {
    int64_t steps, heartbeats;
    double bcast_s; /* rank 0: time spent sending descriptors */
} cp_step_link_stats;
void cp_step_link_get_stats(cp_step_link_t l, cp_step_link_stats *st);

#ifdef __cplusplus
}
#endif

#endif /* CP_STEP_LINK_H */
