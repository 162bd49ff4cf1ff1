/* comm.c - the public communicator calls: argument checks, the broken-after-
 * timeout rule, then dispatch to the backend's table. Also the backend
 * registry (cp_comm_init_world), the only place outside the backend files
 * that knows which backends this build contains. The public calls also keep
 * the per-communicator call/byte/time counters (cp_comm_get_stats). */
#include "comm_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A handle and its counters in one allocation. The handle is the first
 * member, so a cp_comm_t points at its block too: every backend creates its
 * handles through cp_comm_handle_new, and none needs to know the counters. */
typedef struct comm_block {
    struct cp_comm c;
    cp_comm_stats stats;
} comm_block;

static cp_comm_stats *stats_of(cp_comm_t c) {
    return &((comm_block *)c)->stats;
}

cp_status cp_comm_handle_new(const struct cp_comm_i *iface, cp_comm_kind kind, const char *label,
                             cp_comm_t *out) {
    *out = NULL;
    comm_block *blk = calloc(1, sizeof(*blk));
    if (!blk) return CP_ERROR(CP_ERR_OOM, "out of memory allocating a communicator");
    cp_comm_t c = &blk->c;
    c->iface = iface;
    c->kind = kind;
    c->size = 1;
    c->local_size = 1;
    c->timeout_ms = CP_COMM_TIMEOUT_DEFAULT_MS;
    snprintf(c->label, sizeof(c->label), "%s", label);
    *out = c;
    return CP_OK;
}

void cp_comm_handle_delete(cp_comm_t c) {
    free((comm_block *)c);
}

#ifdef CP_HAVE_MPI
/* True when an MPI launcher (mpirun/mpiexec, srun with PMI or PMIx) started
 * this process. Checked before MPI_Init so that a plain single-process run
 * under AUTO never initialises MPI. */
static bool started_by_mpi_launcher(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
                                       "MV2_COMM_WORLD_SIZE"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
        if (getenv(vars[i])) return true;
    return false;
}
#endif

static cp_status create_world(cp_comm_kind kind, int timeout_ms, cp_comm_t *out) {
    (void)timeout_ms; /* unused when built without MPI and NCCL */
    switch (kind) {
    case CP_COMM_SELF: return cp_comm_self_create(out);
    case CP_COMM_AUTO: {
#ifdef CP_HAVE_MPI
        if (started_by_mpi_launcher()) {
            int world = 0;
            CP_CHECK(cp_comm_mpi_env_acquire(&world));
            cp_status st;
            if (world > 1) {
                st = cp_comm_mpi_world_create(timeout_ms, out);
                cp_comm_mpi_env_release(false); /* the world comm holds its own reference */
                return st;
            }
            st = cp_comm_self_create(out);
            if (st != CP_OK) {
                cp_comm_mpi_env_release(false);
                return st;
            }
            (*out)->holds_mpi = true;
            return CP_OK;
        }
#endif
        return cp_comm_self_create(out);
    }
    case CP_COMM_MPI:
#ifdef CP_HAVE_MPI
        return cp_comm_mpi_world_create(timeout_ms, out);
#else
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "this build has no MPI support: install an MPI implementation, reconfigure "
                        "with CP_ENABLE_MPI=ON, or run a single rank (CP_COMM_SELF)");
#endif
    case CP_COMM_NCCL: {
#ifdef CP_HAVE_NCCL
        cp_comm_t boot = NULL;
#ifdef CP_HAVE_MPI
        if (started_by_mpi_launcher())
            CP_CHECK(cp_comm_mpi_world_create(timeout_ms, &boot));
        else
            CP_CHECK(cp_comm_self_create(&boot));
#else
        CP_CHECK(cp_comm_self_create(&boot));
#endif
        boot->is_world = true;
        boot->timeout_ms = timeout_ms;
        return cp_comm_nccl_world_create(boot, timeout_ms, out);
#else
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "this build has no NCCL support: build on a machine with the CUDA toolkit "
                        "and NCCL (CP_ENABLE_CUDA=ON, CP_ENABLE_NCCL=ON), or use CP_COMM_MPI");
#endif
    }
    }
    return CP_ERROR(CP_ERR_INVALID_ARG, "unknown communicator kind %d", (int)kind);
}

cp_status cp_comm_init_world(cp_comm_kind kind, int timeout_ms, cp_comm_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_init_world: out is NULL");
    *out = NULL;
    if (timeout_ms == CP_COMM_TIMEOUT_DEFAULT) timeout_ms = CP_COMM_TIMEOUT_DEFAULT_MS;
    if (timeout_ms < 0)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "communicator timeout must be >= 0 ms (0 = none), got %d", timeout_ms);
    cp_comm_t c = NULL;
    CP_CHECK(create_world(kind, timeout_ms, &c));
    c->is_world = true;
    c->timeout_ms = timeout_ms;
    snprintf(c->label, sizeof(c->label), "world");
    *out = c;
    return CP_OK;
}

static cp_status check_usable(cp_comm_t c, const char *op);

cp_status cp_comm_nccl_create(int n, cp_comm_t const *hosts, int device, cp_comm_t *outs) {
    if (n < 0 || (n > 0 && (!hosts || !outs)))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_nccl_create: bad arguments");
    for (int i = 0; i < n; i++) outs[i] = NULL;
    for (int i = 0; i < n; i++) {
        if (!hosts[i]) continue;
        CP_CHECK(check_usable(hosts[i], "nccl_create"));
        if (hosts[i]->kind == CP_COMM_NCCL)
            return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_nccl_create: %s is already an NCCL communicator",
                            hosts[i]->label);
    }
#ifdef CP_HAVE_NCCL
    /* first every host copy (so that a group that fails to start NCCL
     * cannot leave another group's host collective waiting), then the
     * NCCL communicators; each is tried, the first failure is returned */
    enum { MAX_GROUPS = 8 };
    if (n > MAX_GROUPS) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_nccl_create: more than %d groups", MAX_GROUPS);
    cp_comm_t boots[MAX_GROUPS] = {NULL};
    for (int i = 0; i < n; i++) {
        if (!hosts[i]) continue;
        cp_status st = cp_comm_split(hosts[i], 0, hosts[i]->rank, &boots[i]);
        if (st != CP_OK) {
            for (int k = 0; k < i; k++) cp_comm_free(boots[k]);
            return st;
        }
        boots[i]->timeout_ms = hosts[i]->timeout_ms;
    }
    cp_status first = CP_OK;
    char why[512] = "";
    for (int i = 0; i < n; i++) {
        if (!boots[i]) continue;
        cp_status st = cp_comm_nccl_create_on(boots[i], device, &outs[i]); /* owns boots[i] */
        if (st == CP_OK) {
            snprintf(outs[i]->label, sizeof(outs[i]->label), "nccl(%.40s)", hosts[i]->label);
        } else if (first == CP_OK) {
            first = st;
            snprintf(why, sizeof(why), "%s", cp_last_error_detail());
        }
    }
    if (first == CP_OK) return CP_OK;
    for (int i = 0; i < n; i++) {
        cp_comm_free(outs[i]);
        outs[i] = NULL;
    }
    return CP_ERROR(first, "%s", why);
#else
    (void)device;
    return n == 0 ? CP_OK
                  : CP_ERROR(CP_ERR_UNSUPPORTED,
                             "this build has no NCCL support: build on a machine with the CUDA toolkit and NCCL "
                             "(CP_ENABLE_CUDA=ON, CP_ENABLE_NCCL=ON)");
#endif
}

int cp_comm_rank(cp_comm_t c) {
    return c ? c->rank : -1;
}
int cp_comm_size(cp_comm_t c) {
    return c ? c->size : -1;
}
int cp_comm_local_rank(cp_comm_t c) {
    return c ? c->local_rank : -1;
}
int cp_comm_local_size(cp_comm_t c) {
    return c ? c->local_size : -1;
}
const char *cp_comm_kind_name(cp_comm_t c) {
    return c ? c->iface->name : "none";
}

bool cp_comm_built(cp_comm_kind kind) {
    switch (kind) {
    case CP_COMM_AUTO:
    case CP_COMM_SELF: return true;
    case CP_COMM_MPI:
#ifdef CP_HAVE_MPI
        return true;
#else
        return false;
#endif
    case CP_COMM_NCCL:
#ifdef CP_HAVE_NCCL
        return true;
#else
        return false;
#endif
    }
    return false;
}

/* ---- argument checks ----------------------------------------------------- */

static cp_status check_usable(cp_comm_t c, const char *op) {
    if (!c) return CP_ERROR(CP_ERR_INVALID_ARG, "%s: communicator is NULL", op);
    if (c->broken != CP_OK)
        return CP_ERROR(c->broken,
                        "%s on %s (rank %d of %d): communicator is unusable after an earlier %s; "
                        "report the failure and restart the job",
                        op, c->label, c->rank, c->size,
                        c->broken == CP_ERR_TIMEOUT ? "timeout" : "error or abort");
    if (c->sr_pending)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "%s on %s (rank %d of %d): a sendrecv is in flight; call cp_comm_sendrecv_wait first", op,
                        c->label, c->rank, c->size);
    return CP_OK;
}

/* Element size of a type that can be moved (scalar, known); 0 otherwise. */
static size_t movable_size(cp_dtype dt) {
    if (!cp_dtype_known((int)dt) || cp_dtype_is_quantized(dt) || cp_dtype_block_size(dt) != 1)
        return 0;
    return cp_dtype_type_size(dt);
}

static cp_status check_dtype(cp_comm_t c, const char *op, cp_dtype dt, bool reduce) {
    if (movable_size(dt) == 0) {
        const char *name = cp_dtype_name(dt);
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "%s on %s: dtype %s cannot be communicated (only scalar types)", op,
                        c->label, name ? name : "(unknown)");
    }
    if (reduce && dt != CP_DTYPE_F32 && dt != CP_DTYPE_F16 && dt != CP_DTYPE_BF16 &&
        dt != CP_DTYPE_I32 && dt != CP_DTYPE_I64 && dt != CP_DTYPE_F64)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s on %s: reductions support F32, F16, BF16, I32, I64 and F64, not %s", op,
                        c->label, cp_dtype_name(dt));
    return CP_OK;
}

static cp_status check_op(cp_comm_t c, const char *op, cp_reduce_op rop) {
    if (rop != CP_REDUCE_SUM && rop != CP_REDUCE_MAX && rop != CP_REDUCE_MIN)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s on %s: unknown reduction op %d", op, c->label,
                        (int)rop);
    return CP_OK;
}

/* count elements of dt times mult must fit in size_t. */
static cp_status check_count(cp_comm_t c, const char *op, size_t count, size_t mult, cp_dtype dt) {
    size_t es = movable_size(dt);
    if (mult != 0 && count > SIZE_MAX / mult / es)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s on %s: element count %zu x %zu overflows", op,
                        c->label, count, mult);
    return CP_OK;
}

static cp_status check_ptr(cp_comm_t c, const char *op, const void *p, size_t count,
                           const char *what) {
    if (count > 0 && !p)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s on %s: %s buffer is NULL for %zu elements", op,
                        c->label, what, count);
    return CP_OK;
}

static cp_status check_rank(cp_comm_t c, const char *op, int r, const char *what) {
    if (r < 0 || r >= c->size)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "%s on %s: %s %d is not a rank of a %d-rank "
                        "communicator",
                        op, c->label, what, r, c->size);
    return CP_OK;
}

/* ---- statistics ---------------------------------------------------------- */

/* Records one call of op that moved `bytes` and started at t0. */
static void count_call(cp_comm_t c, cp_comm_op op, size_t bytes, double t0) {
    cp_comm_stats *s = stats_of(c);
    s->calls[op]++;
    s->bytes[op] += (uint64_t)bytes;
    s->seconds[op] += cp_time_now() - t0;
}

void cp_comm_get_stats(cp_comm_t c, cp_comm_stats *out) {
    if (!out) return;
    if (!c) {
        memset(out, 0, sizeof(*out));
        return;
    }
    *out = *stats_of(c);
}

void cp_comm_reset_stats(cp_comm_t c) {
    if (c) memset(stats_of(c), 0, sizeof(cp_comm_stats));
}

const char *cp_comm_op_name(cp_comm_op op) {
    static const char *const names[CP_COMM_OP_COUNT] = {
        "all_reduce", "all_gather", "all_gatherv", "reduce_scatter",
        "broadcast",  "send",       "recv",        "barrier",    "sendrecv",
    };
    return (int)op >= 0 && op < CP_COMM_OP_COUNT ? names[op] : "?";
}

/* ---- public calls -------------------------------------------------------- */

cp_status cp_comm_split(cp_comm_t c, int color, int key, cp_comm_t *out) {
    const char *op = "split";
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "split: out is NULL");
    *out = NULL;
    CP_CHECK(check_usable(c, op));
    c->seq++;
    cp_comm_t child = NULL;
    CP_CHECK(c->iface->split(c, color < 0 ? -1 : color, key, &child));
    if (child) {
        child->timeout_ms = c->timeout_ms;
        snprintf(child->label, sizeof(child->label), "split(color=%d)", color);
    }
    *out = child;
    return CP_OK;
}

cp_status cp_comm_allreduce(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                            cp_reduce_op rop, void *stream) {
    const char *op = "all_reduce";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, true));
    CP_CHECK(check_op(c, op, rop));
    CP_CHECK(check_count(c, op, count, 1, dt));
    CP_CHECK(check_ptr(c, op, send, count, "send"));
    CP_CHECK(check_ptr(c, op, recv, count, "recv"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->allreduce(c, send, recv, count, dt, rop, stream);
    count_call(c, CP_COMM_OP_ALLREDUCE, count * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_allgather(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                            cp_dtype dt, void *stream) {
    const char *op = "all_gather";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    CP_CHECK(check_count(c, op, count_per_rank, (size_t)c->size, dt));
    CP_CHECK(check_ptr(c, op, send, count_per_rank, "send"));
    CP_CHECK(check_ptr(c, op, recv, count_per_rank, "recv"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->allgather(c, send, recv, count_per_rank, dt, stream);
    count_call(c, CP_COMM_OP_ALLGATHER, (size_t)c->size * count_per_rank * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_allgatherv(cp_comm_t c, const void *send, size_t count, void *recv,
                             const size_t *counts, cp_dtype dt, void *stream) {
    const char *op = "all_gatherv";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    if (!counts) return CP_ERROR(CP_ERR_INVALID_ARG, "%s on %s: counts is NULL", op, c->label);
    if (counts[c->rank] != count)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "%s on %s: count %zu of rank %d differs from counts[%d] = %zu", op,
                        c->label, count, c->rank, c->rank, counts[c->rank]);
    size_t total = 0;
    for (int r = 0; r < c->size; r++) {
        if (counts[r] > SIZE_MAX / movable_size(dt) - total)
            return CP_ERROR(CP_ERR_INVALID_ARG, "%s on %s: total element count overflows", op,
                            c->label);
        total += counts[r];
    }
    CP_CHECK(check_ptr(c, op, send, count, "send"));
    CP_CHECK(check_ptr(c, op, recv, total, "recv"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->allgatherv(c, send, count, recv, counts, dt, stream);
    count_call(c, CP_COMM_OP_ALLGATHERV, total * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_reduce_scatter(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                                 cp_dtype dt, cp_reduce_op rop, void *stream) {
    const char *op = "reduce_scatter";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, true));
    CP_CHECK(check_op(c, op, rop));
    CP_CHECK(check_count(c, op, count_per_rank, (size_t)c->size, dt));
    CP_CHECK(check_ptr(c, op, send, count_per_rank, "send"));
    CP_CHECK(check_ptr(c, op, recv, count_per_rank, "recv"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->reduce_scatter(c, send, recv, count_per_rank, dt, rop, stream);
    count_call(c, CP_COMM_OP_REDUCE_SCATTER, (size_t)c->size * count_per_rank * movable_size(dt),
               t0);
    return st;
}

cp_status cp_comm_bcast(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root, void *stream) {
    const char *op = "broadcast";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    CP_CHECK(check_count(c, op, count, 1, dt));
    CP_CHECK(check_ptr(c, op, buf, count, "data"));
    CP_CHECK(check_rank(c, op, root, "root"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->bcast(c, buf, count, dt, root, stream);
    count_call(c, CP_COMM_OP_BCAST, count * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_send(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                       void *stream) {
    const char *op = "send";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    CP_CHECK(check_count(c, op, count, 1, dt));
    CP_CHECK(check_ptr(c, op, buf, count, "send"));
    CP_CHECK(check_rank(c, op, peer, "peer"));
    if (peer == c->rank)
        return CP_ERROR(CP_ERR_INVALID_ARG, "send on %s: rank %d cannot send to itself", c->label,
                        peer);
    double t0 = cp_time_now();
    cp_status st = c->iface->send(c, buf, count, dt, peer, stream);
    count_call(c, CP_COMM_OP_SEND, count * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_recv(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer, void *stream) {
    const char *op = "recv";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    CP_CHECK(check_count(c, op, count, 1, dt));
    CP_CHECK(check_ptr(c, op, buf, count, "recv"));
    CP_CHECK(check_rank(c, op, peer, "peer"));
    if (peer == c->rank)
        return CP_ERROR(CP_ERR_INVALID_ARG, "recv on %s: rank %d cannot receive from itself",
                        c->label, peer);
    double t0 = cp_time_now();
    cp_status st = c->iface->recv(c, buf, count, dt, peer, stream);
    count_call(c, CP_COMM_OP_RECV, count * movable_size(dt), t0);
    return st;
}

cp_status cp_comm_sendrecv_start(cp_comm_t c, const void *send, int dst, void *recv, int src,
                                 size_t count, cp_dtype dt, void *stream) {
    const char *op = "sendrecv";
    CP_CHECK(check_usable(c, op));
    CP_CHECK(check_dtype(c, op, dt, false));
    CP_CHECK(check_count(c, op, count, 1, dt));
    CP_CHECK(check_ptr(c, op, send, count, "send"));
    CP_CHECK(check_ptr(c, op, recv, count, "recv"));
    CP_CHECK(check_rank(c, op, dst, "destination"));
    CP_CHECK(check_rank(c, op, src, "source"));
    if ((dst == c->rank) != (src == c->rank))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "sendrecv on %s (rank %d of %d): a shift %s itself must also %s itself (destination %d, "
                        "source %d); nothing else could match it",
                        c->label, c->rank, c->size, dst == c->rank ? "to" : "from",
                        dst == c->rank ? "receive from" : "send to", dst, src);
    double t0 = cp_time_now();
    cp_status st = c->iface->sendrecv_start(c, send, dst, recv, src, count * movable_size(dt), stream);
    count_call(c, CP_COMM_OP_SENDRECV, count * movable_size(dt), t0);
    c->sr_pending = st == CP_OK;
    c->sr_stream = stream;
    return st;
}

cp_status cp_comm_sendrecv_wait(cp_comm_t c, void *stream) {
    if (!c) return CP_ERROR(CP_ERR_INVALID_ARG, "sendrecv wait: communicator is NULL");
    if (!c->sr_pending)
        return CP_ERROR(CP_ERR_INVALID_ARG, "sendrecv wait on %s (rank %d of %d): no sendrecv is in flight",
                        c->label, c->rank, c->size);
    if (stream && stream != c->sr_stream)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "sendrecv wait on %s (rank %d of %d): the stream is not the one the sendrecv started on "
                        "(pass that one, or NULL)",
                        c->label, c->rank, c->size);
    c->sr_pending = false;
    CP_CHECK(check_usable(c, "sendrecv"));
    double t0 = cp_time_now();
    cp_status st = c->iface->sendrecv_wait(c, c->sr_stream);
    stats_of(c)->seconds[CP_COMM_OP_SENDRECV] += cp_time_now() - t0;
    return st;
}

cp_status cp_comm_barrier(cp_comm_t c) {
    CP_CHECK(check_usable(c, "barrier"));
    c->seq++;
    double t0 = cp_time_now();
    cp_status st = c->iface->barrier(c);
    count_call(c, CP_COMM_OP_BARRIER, 0, t0);
    return st;
}

cp_status cp_comm_same_i64(cp_comm_t c, const int64_t *v, int n, int64_t *lo, int64_t *hi, bool *same) {
    enum { MAX_VALUES = 16 };
    if (!v || !same || n < 1 || n > MAX_VALUES)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_same_i64: needs 1 to %d values and an answer (n = %d)",
                        MAX_VALUES, n);
    int64_t x[2 * MAX_VALUES];
    for (int i = 0; i < n; i++) {
        x[i] = v[i];
        x[n + i] = -v[i]; /* the largest negation is the smallest value */
    }
    CP_CHECK(cp_comm_allreduce(c, x, x, 2 * (size_t)n, CP_DTYPE_I64, CP_REDUCE_MAX, NULL));
    *same = true;
    for (int i = 0; i < n; i++) {
        if (x[i] != -x[n + i]) *same = false;
        if (lo) lo[i] = -x[n + i];
        if (hi) hi[i] = x[i];
    }
    return CP_OK;
}

cp_status cp_comm_set_timeout(cp_comm_t c, int timeout_ms) {
    if (!c) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_comm_set_timeout: communicator is NULL");
    if (timeout_ms < 0)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "communicator timeout must be >= 0 ms (0 = none), got %d", timeout_ms);
    c->timeout_ms = timeout_ms;
    return CP_OK;
}

int cp_comm_get_timeout(cp_comm_t c) {
    return c ? c->timeout_ms : -1;
}

void cp_comm_abort(cp_comm_t c, int code) {
    if (!c) return;
    c->broken = CP_ERR_INTERNAL;
    c->iface->abort(c, code);
}

void cp_comm_free(cp_comm_t c) {
    if (!c) return;
    /* a transfer still in flight finishes (or times out) before the buffers
     * it borrows can go; an error here was the caller's to see */
    if (c->sr_pending) cp_comm_sendrecv_wait(c, NULL);
    bool holds_mpi = c->holds_mpi, broken = c->broken != CP_OK;
    c->iface->free(c);
    cp_comm_handle_delete(c);
#ifdef CP_HAVE_MPI
    if (holds_mpi) cp_comm_mpi_env_release(broken);
#else
    (void)holds_mpi;
    (void)broken;
#endif
}
