/* threadpool.h - a persistent pool of n_threads-1 worker threads plus the
 * calling thread, for the CPU backend's data-parallel loops. Workers spin
 * for a short while after each job (decode calls parallel_for hundreds of
 * times per token, back to back) and then sleep on a condition variable. */
#ifndef CP_THREADPOOL_H
#define CP_THREADPOOL_H

#include "../cp_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_threadpool cp_threadpool;

/* One unit of work: task in [0, n_tasks), thread in [0, n_threads) names the
 * thread running it (0 = the caller), so per-thread scratch can be indexed
 * by it. Which thread runs which task is not specified; a task must produce
 * the same result whichever thread runs it. */
typedef void (*cp_task_fn)(void *ctx, int task, int thread);

/* Starts n_threads-1 workers (n_threads >= 1; 1 starts none). *out is owned
 * by the caller and released with cp_threadpool_free.
 * Errors: CP_ERR_INVALID_ARG (n_threads < 1), CP_ERR_OOM, CP_ERR_INTERNAL
 * (a thread could not be created). */
cp_status cp_threadpool_init(int n_threads, cp_threadpool **out);

/* Stops and joins the workers. NULL is a no-op. */
void cp_threadpool_free(cp_threadpool *pool);

/* Threads taking part in a parallel_for, the caller included. */
int cp_threadpool_n_threads(const cp_threadpool *pool);

/* Runs fn(ctx, t, thread) once for every t in [0, n_tasks) on the workers and
 * the caller, and returns when all have finished (a full memory barrier:
 * their writes are visible to the caller). Tasks are handed out dynamically
 * in increasing order. Not reentrant: one parallel_for at a time per pool,
 * and fn must not call parallel_for on the same pool. n_tasks <= 0 returns
 * at once. */
void cp_threadpool_parallel_for(cp_threadpool *pool, int n_tasks, cp_task_fn fn, void *ctx);

#ifdef __cplusplus
}
#endif

#endif /* CP_THREADPOOL_H */
