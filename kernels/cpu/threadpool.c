/* threadpool.c - persistent workers for the CPU backend. A job is published
 * by bumping a generation counter; workers spin on it for a short time, then
 * sleep on a condition variable. Tasks are claimed from one 64-bit counter
 * that carries the job's generation, and the caller waits only for claimed
 * tasks to finish, never for a worker that has not woken up (on a busy or
 * oversubscribed machine a descheduled worker would otherwise stall every
 * job for a whole time slice). */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

/* How long an idle worker polls before it sleeps. Decode issues its
 * parallel_for calls a few microseconds apart, so a worker that is still
 * spinning picks the next job up in well under a microsecond; a sleeping one
 * costs a futex wake-up (tens of microseconds). 0.5 ms bounds the CPU burnt
 * after the last job of a burst. */
#define SPIN_SECONDS 0.0005
#define SPIN_CLOCK_EVERY 64 /* read the clock only every this many polls */

/* Low half of the claim counter while a job is being set up: no task index
 * can be claimed until the caller stores the real start (0). */
#define CLAIM_CLOSED 0xFFFFFFFFu

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

struct worker {
    cp_threadpool *pool;
    int index; /* 1..n_threads-1; the caller is 0 */
    pthread_t thread;
};

struct cp_threadpool {
    int n_threads;
    struct worker *workers; /* [n_threads-1] */
    int n_started;
    uint32_t last_gen; /* caller side only */

    /* The current job. Atomic because a worker that woke up late may read
     * them while the caller sets up the next job; it then finds the claim
     * counter on a newer generation and discards what it read. */
    _Atomic(cp_task_fn) fn;
    _Atomic(void *) ctx;
    atomic_int n_tasks;

    /* Separate cache lines: gen is polled by idle workers, claim and done
     * are written by every thread of a job. */
    alignas(64) atomic_uint gen;
    alignas(64) atomic_uint_least64_t claim; /* generation << 32 | next task */
    alignas(64) atomic_int done;             /* tasks of the current job finished */
    alignas(64) atomic_int n_sleeping;
    atomic_bool stop;

    pthread_mutex_t mutex;
    pthread_cond_t cond;
    bool sync_ok; /* mutex and cond were initialised */
};

/* Runs tasks of generation g until none are left or the job is no longer g. */
static void run_tasks(cp_threadpool *pool, uint32_t g, int thread) {
    /* Acquire: if any of these was written for a newer job, the loads of
     * claim below see that job's generation (stored before them). */
    cp_task_fn fn = atomic_load_explicit(&pool->fn, memory_order_acquire);
    void *ctx = atomic_load_explicit(&pool->ctx, memory_order_acquire);
    const uint32_t n = (uint32_t)atomic_load_explicit(&pool->n_tasks, memory_order_acquire);
    uint_least64_t v = atomic_load_explicit(&pool->claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(v >> 32) != g || (uint32_t)v >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&pool->claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(ctx, (int)(uint32_t)v, thread);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        v = atomic_load_explicit(&pool->claim, memory_order_acquire);
    }
}

/* Waits until gen differs from seen (or stop), spinning first. */
static uint32_t wait_for_job(cp_threadpool *pool, uint32_t seen) {
    uint32_t g;
    double t0 = 0.0;
    for (long i = 0;; i++) {
        g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g != seen) return g;
        if (i % SPIN_CLOCK_EVERY == 0) {
            double now = cp_time_now();
            if (i == 0)
                t0 = now;
            else if (now - t0 > SPIN_SECONDS)
                break;
        }
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    /* seq_cst increment then load of gen pairs with the caller's seq_cst
     * store of gen then load of n_sleeping: one of the two sees the other. */
    atomic_fetch_add(&pool->n_sleeping, 1);
    while ((g = atomic_load(&pool->gen)) == seen && !atomic_load(&pool->stop))
        pthread_cond_wait(&pool->cond, &pool->mutex);
    atomic_fetch_sub(&pool->n_sleeping, 1);
    pthread_mutex_unlock(&pool->mutex);
    return g;
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    cp_threadpool *pool = w->pool;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_for_job(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_acquire)) break;
        run_tasks(pool, seen, w->index);
    }
    return NULL;
}

cp_status cp_threadpool_init(int n_threads, cp_threadpool **out) {
    cp_status st = CP_OK;
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "threadpool: out is NULL");
    *out = NULL;
    if (n_threads < 1)
        return CP_ERROR(CP_ERR_INVALID_ARG, "threadpool: n_threads must be >= 1, got %d",
                        n_threads);
    cp_threadpool *pool = NULL;
    CP_CHECK(cp_aligned_alloc((void **)&pool, sizeof *pool));
    pool->n_threads = n_threads;
    pool->workers = NULL;
    pool->n_started = 0;
    pool->last_gen = 0;
    atomic_init(&pool->fn, NULL);
    atomic_init(&pool->ctx, NULL);
    atomic_init(&pool->n_tasks, 0);
    atomic_init(&pool->gen, 0u);
    atomic_init(&pool->claim, (uint_least64_t)CLAIM_CLOSED);
    atomic_init(&pool->done, 0);
    atomic_init(&pool->n_sleeping, 0);
    atomic_init(&pool->stop, false);
    pool->sync_ok = false;
    if (pthread_mutex_init(&pool->mutex, NULL) != 0) {
        st = CP_ERROR(CP_ERR_INTERNAL, "threadpool: pthread_mutex_init failed");
        goto fail;
    }
    if (pthread_cond_init(&pool->cond, NULL) != 0) {
        pthread_mutex_destroy(&pool->mutex);
        st = CP_ERROR(CP_ERR_INTERNAL, "threadpool: pthread_cond_init failed");
        goto fail;
    }
    pool->sync_ok = true;
    if (n_threads > 1) {
        pool->workers = calloc((size_t)(n_threads - 1), sizeof *pool->workers);
        if (!pool->workers) {
            st = CP_ERROR(CP_ERR_OOM, "threadpool: out of memory for %d workers", n_threads - 1);
            goto fail;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            struct worker *w = &pool->workers[i];
            w->pool = pool;
            w->index = i + 1;
            if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
                st = CP_ERROR(CP_ERR_INTERNAL,
                              "threadpool: could not start worker %d of %d (thread limit?)", i + 1,
                              n_threads - 1);
                goto fail;
            }
            pool->n_started++;
        }
    }
    *out = pool;
    return CP_OK;
fail:
    cp_threadpool_free(pool);
    return st;
}

void cp_threadpool_free(cp_threadpool *pool) {
    if (!pool) return;
    if (pool->n_started > 0) {
        pthread_mutex_lock(&pool->mutex);
        atomic_store(&pool->stop, true);
        atomic_fetch_add(&pool->gen, 1u);
        pthread_cond_broadcast(&pool->cond);
        pthread_mutex_unlock(&pool->mutex);
        for (int i = 0; i < pool->n_started; i++)
            pthread_join(pool->workers[i].thread, NULL);
    }
    if (pool->sync_ok) {
        pthread_cond_destroy(&pool->cond);
        pthread_mutex_destroy(&pool->mutex);
    }
    free(pool->workers);
    cp_aligned_free(pool);
}

int cp_threadpool_n_threads(const cp_threadpool *pool) {
    return pool ? pool->n_threads : 1;
}

void cp_threadpool_parallel_for(cp_threadpool *pool, int n_tasks, cp_task_fn fn, void *ctx) {
    if (n_tasks <= 0) return;
    /* A single task or a single thread: no hand-off at all. */
    if (n_tasks == 1 || pool->n_threads == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    const uint32_t g = ++pool->last_gen;
    const uint_least64_t base = (uint_least64_t)g << 32;
    /* 1. Close claiming under the new generation, so that a worker that reads
     *    any field of this job (below) can no longer claim a task of the
     *    previous one with it. */
    atomic_store_explicit(&pool->claim, base | CLAIM_CLOSED, memory_order_release);
    atomic_store_explicit(&pool->fn, fn, memory_order_release);
    atomic_store_explicit(&pool->ctx, ctx, memory_order_release);
    atomic_store_explicit(&pool->n_tasks, n_tasks, memory_order_release);
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    /* 2. Open task 0, then wake the workers. seq_cst on gen orders it
     *    against the load of n_sleeping (see wait_for_job). */
    atomic_store_explicit(&pool->claim, base, memory_order_release);
    atomic_store(&pool->gen, g);
    if (atomic_load(&pool->n_sleeping) > 0) {
        pthread_mutex_lock(&pool->mutex);
        pthread_cond_broadcast(&pool->cond);
        pthread_mutex_unlock(&pool->mutex);
    }
    run_tasks(pool, g, 0);
    /* Only tasks already claimed by a worker can be outstanding here. */
    for (long i = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < n_tasks; i++) {
        if (i < 4096)
            cpu_relax();
        else
            sched_yield();
    }
}
