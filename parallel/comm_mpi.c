/* comm_mpi.c - the MPI communicator (host buffers). Every collective is built
 * from non-blocking point-to-point messages polled against a deadline, so
 * that a rank that does not deliver is detected and named instead of hanging
 * the job. Algorithms: ring reduce-scatter + ring all-gather, recursive
 * doubling for small all-reduces, binomial-tree broadcast, dissemination
 * barrier. */
#ifdef CP_HAVE_MPI

#include "comm_impl.h"

#include <limits.h>
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Determinism and bit-identical results: every algorithm here is a fixed
 * function of (communicator size, element count), so the same inputs always
 * reduce in the same order. In the ring, each element is reduced along the
 * ring by exactly one chain ((x[c+1] op x[c+2]) op ...) op x[c] and the
 * result is then copied to every rank; in recursive doubling, both partners
 * of an exchange compute op(lower rank's value, higher rank's value) from
 * the same two operands and ranks outside the power of two receive a copy.
 * Either way every rank ends with the same bits. F16/BF16 travel as fp32
 * partial results and are rounded once, by the rank that finishes them. */

/* All-reduces whose accumulation buffer is at most this large use recursive
 * doubling (log2(n) rounds of latency); larger ones the ring (2(n-1) rounds,
 * but each rank sends only 2(n-1)/n of the data). */
#define RD_MAX_BYTES (64u * 1024u)
/* Largest single MPI message; bigger transfers are sent in pieces. */
#define PIECE_BYTES ((size_t)1 << 30)
#define MAX_REQS 96
/* A timed-out rank tells the others which ranks it waits for. */
#define DIAG_MAX_WAIT 8
#define DIAG_INTS (4 + DIAG_MAX_WAIT)
#define DIAG_MAGIC 0x43504447

enum coll_op {
    OP_ALLREDUCE,
    OP_ALLGATHER,
    OP_ALLGATHERV,
    OP_REDUCE_SCATTER,
    OP_BCAST,
    OP_BARRIER,
    OP_SPLIT,
    OP_SEND,
    OP_RECV,
    OP_SENDRECV,
    OP_COUNT
};
static const char *const op_names[OP_COUNT] = {"all_reduce",     "all_gather", "all_gatherv",
                                               "reduce_scatter", "broadcast",  "barrier",
                                               "split",          "send",       "recv",
                                               "sendrecv"};

/* One tag per message kind; between two ranks, messages with one tag match
 * in the order they were sent, and both sides run the same sequence of
 * collectives, so no per-call tag is needed. */
enum {
    TAG_RING_RS = 7001,
    TAG_RING_AG,
    TAG_RD,
    TAG_BCAST,
    TAG_BARRIER,
    TAG_SPLIT,
    TAG_P2P,
    TAG_DIAG,
    TAG_SHIFT,
};

typedef struct reqset {
    MPI_Request req[MAX_REQS];
    int peer[MAX_REQS];
    bool is_recv[MAX_REQS];
    int n;
} reqset;

typedef struct mpi_comm {
    MPI_Comm comm;
    bool holds_env;            /* releases an MPI environment reference on free */
    int *world_ranks;          /* [size] rank in MPI_COMM_WORLD of each rank */
    size_t *blk_off, *blk_len; /* [size] block layout of the current call (elements) */
    void *ws;                  /* workspace, grown on demand, reused across calls */
    size_t ws_bytes;
    int diag_out[DIAG_INTS]; /* outgoing timeout report (MPI may read it late) */
    reqset sr;               /* the sendrecv in flight */
} mpi_comm;

typedef struct opctx {
    cp_comm_t c;
    mpi_comm *m;
    enum coll_op op;
    double t0;
    double deadline; /* monotonic seconds; 0 = none */
} opctx;

/* ---- the MPI environment --------------------------------------------------
 * MPI is initialised at most once per process and finalized by the last
 * communicator that holds a reference, only if we initialised it. */

static int env_refs;
static bool env_initialised_here;
static bool env_no_finalize;
static bool env_tainted; /* some communicator broke: a peer may be stalled */

static cp_status env_error(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof(msg), "code %d", rc);
    return CP_ERROR(CP_ERR_MPI, "%s failed: %s", what, msg);
}

cp_status cp_comm_mpi_env_acquire(int *world_size) {
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (finalized)
        return CP_ERROR(CP_ERR_MPI, "MPI was already finalized in this process: create "
                                    "communicators before MPI_Finalize is called");
    if (!inited) {
        int provided = MPI_THREAD_SINGLE;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) return env_error(rc, "MPI_Init_thread");
        env_initialised_here = true;
        if (provided < MPI_THREAD_FUNNELED) {
            MPI_Finalize();
            env_initialised_here = false;
            return CP_ERROR(CP_ERR_MPI,
                            "the MPI library offers thread level %d, below "
                            "MPI_THREAD_FUNNELED which worker threads need",
                            provided);
        }
    }
    /* Errors come back as codes, so that they become cp_status values. */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rc = MPI_Comm_size(MPI_COMM_WORLD, world_size);
    if (rc != MPI_SUCCESS) return env_error(rc, "MPI_Comm_size");
    env_refs++;
    return CP_OK;
}

void cp_comm_mpi_env_release(bool skip_finalize) {
    if (env_refs <= 0) return;
    if (skip_finalize) env_no_finalize = true;
    if (--env_refs == 0 && env_initialised_here && !env_no_finalize) {
        MPI_Finalize();
        env_initialised_here = false;
    }
}

/* ---- errors and waiting -------------------------------------------------- */

static opctx begin(cp_comm_t c, enum coll_op op) {
    opctx o = {c, (mpi_comm *)c->impl, op, cp_time_now(), 0.0};
    if (c->timeout_ms > 0) o.deadline = o.t0 + c->timeout_ms * 1e-3;
    return o;
}

static cp_status op_error(opctx *o, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof(msg), "code %d", rc);
    o->c->broken = CP_ERR_MPI;
    env_tainted = true;
    return CP_ERROR(CP_ERR_MPI, "%s on %s (rank %d of %d): %s failed: %s", op_names[o->op],
                    o->c->label, o->c->rank, o->c->size, what, msg);
}

/* Idle waits first spin (latency of small messages), then yield the core
 * to other ranks sharing it, then sleep with a growing period. */
static void backoff(double waited) {
    if (waited < 50e-6) return;
    if (waited < 5e-3) {
        sched_yield();
        return;
    }
    long ns = waited < 0.1 ? 20000 : (waited < 2.0 ? 200000 : 1000000);
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

static cp_status post(opctx *o, reqset *rs, bool is_recv, const void *buf, size_t bytes, int peer,
                      int tag) {
    char *p = (char *)buf;
    do {
        size_t piece = bytes < PIECE_BYTES ? bytes : PIECE_BYTES;
        if (rs->n >= MAX_REQS)
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "%s on %s: transfer of %zu bytes needs more than %d pieces",
                            op_names[o->op], o->c->label, bytes, MAX_REQS);
        MPI_Request *rq = &rs->req[rs->n];
        int rc = is_recv ? MPI_Irecv(p, (int)piece, MPI_BYTE, peer, tag, o->m->comm, rq)
                         : MPI_Isend(p, (int)piece, MPI_BYTE, peer, tag, o->m->comm, rq);
        if (rc != MPI_SUCCESS) return op_error(o, rc, is_recv ? "MPI_Irecv" : "MPI_Isend");
        rs->peer[rs->n] = peer;
        rs->is_recv[rs->n] = is_recv;
        rs->n++;
        p += piece;
        bytes -= piece;
    } while (bytes > 0);
    return CP_OK;
}

static void add_unique(int *list, int *n, int cap, int v) {
    for (int i = 0; i < *n; i++)
        if (list[i] == v) return;
    if (*n < cap) list[(*n)++] = v;
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Cancels what can be cancelled and lets MPI free the rest when it
 * completes. Receives are cancelled so that a late message cannot land in
 * a buffer the caller got back. */
static void drop_requests(MPI_Request *req, const bool *is_recv, int n) {
    for (int i = 0; i < n; i++) {
        if (req[i] == MPI_REQUEST_NULL) continue;
        int flag = 0;
        if (is_recv[i]) {
            MPI_Cancel(&req[i]);
            MPI_Test(&req[i], &flag, MPI_STATUS_IGNORE);
        }
        if (req[i] != MPI_REQUEST_NULL) MPI_Request_free(&req[i]);
    }
}

/* A rank blamed for a timeout. */
typedef enum { CUL_DIRECT, CUL_SILENT, CUL_ELSEWHERE } culprit_kind;
typedef struct culprit {
    int rank;
    culprit_kind kind; /* awaited directly (no diagnosis) / did not answer / answered
                          from another call */
    int seq, op;       /* its call when CUL_ELSEWHERE */
} culprit;

/* After a timeout in a collective: every rank that times out sends the
 * others its call number and the ranks it is blocked on, and listens for
 * the same from them for a grace period. Following "blocked on" links from
 * this rank ends at the ranks that did not answer (stalled or dead) or that
 * answered from another call (collectives called out of order): those are
 * named. Ranks that finished the call are on nobody's chain. Falls back to
 * the directly awaited ranks. */
static int diagnose(opctx *o, const int *waiting, int nw, culprit *out, int cap) {
    cp_comm_t c = o->c;
    mpi_comm *m = o->m;
    int n = c->size, me = c->rank, nc = 0;
    int myseq = (int)(c->seq & 0x7fffffff);
    int *in = malloc((size_t)n * DIAG_INTS * sizeof(int));
    MPI_Request *rq = malloc((size_t)n * sizeof(MPI_Request));
    bool *got = calloc((size_t)n, sizeof(bool)), *seen = calloc((size_t)n, sizeof(bool));
    bool *is_recv = malloc((size_t)n * sizeof(bool));
    int *queue = malloc((size_t)n * sizeof(int));
    if (!in || !rq || !got || !seen || !is_recv || !queue) goto direct;

    m->diag_out[0] = DIAG_MAGIC;
    m->diag_out[1] = myseq;
    m->diag_out[2] = (int)o->op;
    m->diag_out[3] = nw < DIAG_MAX_WAIT ? nw : DIAG_MAX_WAIT;
    for (int i = 0; i < m->diag_out[3]; i++)
        m->diag_out[4 + i] = waiting[i];
    for (int q = 0; q < n; q++) {
        rq[q] = MPI_REQUEST_NULL;
        is_recv[q] = true;
        if (q == me) continue;
        MPI_Irecv(in + (size_t)q * DIAG_INTS, DIAG_INTS, MPI_INT, q, TAG_DIAG, m->comm, &rq[q]);
        MPI_Request sr = MPI_REQUEST_NULL;
        if (MPI_Isend(m->diag_out, DIAG_INTS, MPI_INT, q, TAG_DIAG, m->comm, &sr) == MPI_SUCCESS)
            MPI_Request_free(&sr);
    }
    /* Ranks blocked on the same missing peer time out within a few ms of each
     * other; the grace period covers that skew. */
    double grace = c->timeout_ms * 1e-4;
    grace = grace < 0.2 ? 0.2 : (grace > 2.0 ? 2.0 : grace);
    double t_start = cp_time_now(), t_end = t_start + grace;
    for (;;) {
        int pending = 0;
        for (int q = 0; q < n; q++) {
            if (rq[q] == MPI_REQUEST_NULL) continue;
            int flag = 0;
            MPI_Test(&rq[q], &flag, MPI_STATUS_IGNORE);
            if (flag)
                got[q] = in[(size_t)q * DIAG_INTS] == DIAG_MAGIC;
            else
                pending++;
        }
        double now = cp_time_now();
        if (pending == 0 || now >= t_end) break;
        backoff(now - t_start);
    }
    drop_requests(rq, is_recv, n);

    int head = 0, tail = 0;
    for (int i = 0; i < nw; i++)
        if (!seen[waiting[i]]) {
            seen[waiting[i]] = true;
            queue[tail++] = waiting[i];
        }
    while (head < tail && nc < cap) {
        int q = queue[head++];
        const int *rep = in + (size_t)q * DIAG_INTS;
        if (!got[q]) {
            out[nc++] = (culprit){q, CUL_SILENT, 0, 0};
        } else if (rep[1] != myseq) {
            int rop = rep[2] >= 0 && rep[2] < OP_COUNT ? rep[2] : OP_COUNT - 1;
            out[nc++] = (culprit){q, CUL_ELSEWHERE, rep[1], rop};
        } else {
            int k = rep[3] < DIAG_MAX_WAIT ? rep[3] : DIAG_MAX_WAIT;
            for (int i = 0; i < k; i++) {
                int w = rep[4 + i];
                if (w >= 0 && w < n && w != me && !seen[w]) {
                    seen[w] = true;
                    queue[tail++] = w;
                }
            }
        }
    }
    if (nc > 0) goto done;
direct:
    nc = 0;
    for (int i = 0; i < nw && nc < cap; i++)
        out[nc++] = (culprit){waiting[i], CUL_DIRECT, 0, 0};
done:
    free(in);
    free(rq);
    free(got);
    free(seen);
    free(is_recv);
    free(queue);
    return nc;
}

static int fmt_rank(char *buf, size_t len, const mpi_comm *m, const cp_comm_t c, int r) {
    if (c->is_world || !m->world_ranks) return snprintf(buf, len, "rank %d", r);
    return snprintf(buf, len, "rank %d (world rank %d)", r, m->world_ranks[r]);
}

static cp_status timed_out(opctx *o, reqset *rs) {
    cp_comm_t c = o->c;
    int waiting[MAX_REQS], nw = 0;
    for (int i = 0; i < rs->n; i++) {
        if (rs->req[i] == MPI_REQUEST_NULL) continue;
        int flag = 0;
        MPI_Test(&rs->req[i], &flag, MPI_STATUS_IGNORE);
        if (!flag) add_unique(waiting, &nw, MAX_REQS, rs->peer[i]);
    }
    drop_requests(rs->req, rs->is_recv, rs->n);
    rs->n = 0;
    qsort(waiting, (size_t)nw, sizeof(int), cmp_int);
    c->broken = CP_ERR_TIMEOUT;
    env_tainted = true;

    culprit cul[DIAG_MAX_WAIT];
    int nc;
    const bool p2p = o->op == OP_SEND || o->op == OP_RECV || o->op == OP_SENDRECV;
    if (p2p) {
        nc = 0;
        for (int i = 0; i < nw && nc < DIAG_MAX_WAIT; i++)
            cul[nc++] = (culprit){waiting[i], CUL_DIRECT, 0, 0};
    } else {
        nc = diagnose(o, waiting, nw, cul, DIAG_MAX_WAIT);
    }

    char who[256] = "", why[320] = "";
    size_t w = 0;
    for (int i = 0; i < nc && w < sizeof(who); i++) {
        if (i > 0) w += (size_t)snprintf(who + w, sizeof(who) - w, ", ");
        if (w < sizeof(who)) w += (size_t)fmt_rank(who + w, sizeof(who) - w, o->m, c, cul[i].rank);
    }
    if (nc == 0) snprintf(who, sizeof(who), "(no pending peer)");
    if (nc > 0 && cul[0].kind == CUL_ELSEWHERE) {
        snprintf(why, sizeof(why),
                 "; rank %d is in %s call #%d instead of %s call #%d: ranks made collective calls "
                 "in different orders, or it gave up after its own timeout",
                 cul[0].rank, op_names[cul[0].op], cul[0].seq, op_names[o->op],
                 (int)(c->seq & 0x7fffffff));
    } else if (nc > 0 && p2p) {
        snprintf(why, sizeof(why), "; it did not post the matching %s",
                 o->op == OP_SEND ? "receive" : (o->op == OP_RECV ? "send" : "sendrecv"));
    } else if (nc > 0 && cul[0].kind == CUL_SILENT) {
        bool direct = false;
        for (int i = 0; i < nw; i++)
            direct |= waiting[i] == cul[0].rank;
        char via[64] = "";
        if (!direct && nw > 0)
            snprintf(via, sizeof(via), "; this rank waits on it through rank %d", waiting[0]);
        snprintf(why, sizeof(why),
                 "; it did not reach this call in time (stalled, dead or much "
                 "slower than the others)%s",
                 via);
    }
    return CP_ERROR(CP_ERR_TIMEOUT,
                    "%s on %s (rank %d of %d) timed out after %d ms waiting for %s%s; the "
                    "communicator is now unusable",
                    op_names[o->op], c->label, c->rank, c->size, c->timeout_ms, who, why);
}

/* Completes every request of rs or fails at the deadline. */
static cp_status wait_all(opctx *o, reqset *rs) {
    if (rs->n == 0) return CP_OK;
    double start = cp_time_now();
    for (;;) {
        int done = 0;
        int rc = MPI_Testall(rs->n, rs->req, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) return op_error(o, rc, "MPI_Testall");
        if (done) {
            rs->n = 0;
            return CP_OK;
        }
        double now = cp_time_now();
        if (o->deadline > 0 && now >= o->deadline) return timed_out(o, rs);
        backoff(now - start);
    }
}

/* One exchange round: receive from `from` and send to `to`, then wait. */
static cp_status exchange(opctx *o, void *rbuf, size_t rbytes, int from, const void *sbuf,
                          size_t sbytes, int to, int tag) {
    reqset rs;
    rs.n = 0;
    CP_CHECK(post(o, &rs, true, rbuf, rbytes, from, tag));
    CP_CHECK(post(o, &rs, false, sbuf, sbytes, to, tag));
    return wait_all(o, &rs);
}

/* ---- element arithmetic -------------------------------------------------- */

/* Type in which partial results travel and are combined. */
static cp_dtype acc_type(cp_dtype dt) {
    return dt == CP_DTYPE_F16 || dt == CP_DTYPE_BF16 ? CP_DTYPE_F32 : dt;
}

static void to_acc(float *dst, const void *src, size_t n, cp_dtype dt) {
    const uint16_t *s = src;
    if (dt == CP_DTYPE_F16)
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_fp16_to_fp32(s[i]);
    else
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_bf16_to_fp32(s[i]);
}

static void from_acc(void *dst, const float *src, size_t n, cp_dtype dt) {
    uint16_t *d = dst;
    if (dt == CP_DTYPE_F16)
        for (size_t i = 0; i < n; i++)
            d[i] = cp_fp32_to_fp16(src[i]);
    else
        for (size_t i = 0; i < n; i++)
            d[i] = cp_fp32_to_bf16(src[i]);
}

/* dst[i] = a[i] op b[i] in the accumulation type adt; dst may alias a or b.
 * The operand order is part of the determinism contract: a is the partial
 * result from upstream (or the lower rank's value). Integer sums wrap. */
#define REDUCE_LOOP(T, EXPR)                                                                       \
    do {                                                                                           \
        T *d_ = dst;                                                                               \
        const T *a_ = a, *b_ = b;                                                                  \
        for (size_t i = 0; i < n; i++) {                                                           \
            T x = a_[i], y = b_[i];                                                                \
            d_[i] = (EXPR);                                                                        \
        }                                                                                          \
    } while (0)
#define REDUCE_OPS(T, SUM_EXPR)                                                                    \
    switch (op) {                                                                                  \
    case CP_REDUCE_SUM: REDUCE_LOOP(T, SUM_EXPR); break;                                           \
    case CP_REDUCE_MAX: REDUCE_LOOP(T, y > x ? y : x); break;                                      \
    case CP_REDUCE_MIN: REDUCE_LOOP(T, y < x ? y : x); break;                                      \
    }

static void reduce_acc(void *dst, const void *a, const void *b, size_t n, cp_dtype adt,
                       cp_reduce_op op) {
    switch (adt) {
    case CP_DTYPE_F32: REDUCE_OPS(float, x + y); break;
    case CP_DTYPE_F64: REDUCE_OPS(double, x + y); break;
    case CP_DTYPE_I32: REDUCE_OPS(int32_t, (int32_t)((uint32_t)x + (uint32_t)y)); break;
    case CP_DTYPE_I64: REDUCE_OPS(int64_t, (int64_t)((uint64_t)x + (uint64_t)y)); break;
    default: CP_ASSERT(!"reduce_acc: type checked by comm.c"); break;
    }
}

static size_t pad64(size_t b) {
    return (b + 63) & ~(size_t)63;
}

static cp_status ensure_ws(opctx *o, size_t bytes) {
    mpi_comm *m = o->m;
    if (bytes <= m->ws_bytes) return CP_OK;
    cp_aligned_free(m->ws);
    m->ws = NULL;
    m->ws_bytes = 0;
    CP_CHECK(cp_aligned_alloc(&m->ws, bytes));
    m->ws_bytes = bytes;
    return CP_OK;
}

static int mod(int a, int n) {
    return ((a % n) + n) % n;
}

/* Blocks of `count` elements spread over the ranks as evenly as possible. */
static size_t even_blocks(mpi_comm *m, int n, size_t count) {
    size_t base = count / (size_t)n, rem = count % (size_t)n;
    for (int q = 0; q < n; q++) {
        m->blk_len[q] = base + ((size_t)q < rem);
        m->blk_off[q] = (size_t)q * base + ((size_t)q < rem ? (size_t)q : rem);
    }
    return base + (rem > 0);
}

/* ---- ring building blocks ------------------------------------------------ */

/* Ring reduce-scatter over the blocks in m->blk_off/blk_len (elements of
 * dt) of src; the fully reduced block `rank` is written to out. At step s
 * rank r forwards the partial result of block r-s-1 to r+1 and combines
 * the partial of block r-s-2 from r-1 with its own data, so block c is
 * reduced in the fixed order x[c+1], x[c+2], ..., x[c]. out may alias src:
 * it is written only after the last read of src. */
static cp_status ring_reduce_scatter(opctx *o, const void *src, void *out, size_t maxlen,
                                     cp_dtype dt, cp_reduce_op op, int tag) {
    cp_comm_t c = o->c;
    mpi_comm *m = o->m;
    int n = c->size, r = c->rank, left = mod(r - 1, n), right = mod(r + 1, n);
    cp_dtype adt = acc_type(dt);
    size_t es = cp_dtype_type_size(dt), as = cp_dtype_type_size(adt);
    bool native = adt == dt;
    const char *s = src;
    if (n == 1) {
        if (out != src) memmove(out, s + m->blk_off[0] * es, m->blk_len[0] * es);
        return CP_OK;
    }
    size_t slot = pad64(maxlen * as);
    CP_CHECK(ensure_ws(o, 3 * slot));
    char *A = m->ws, *B = A + slot, *C = B + slot; /* in-flight partial, outgoing, own (acc) */
    const void *outgoing = NULL;
    for (int step = 0; step < n - 1; step++) {
        int cs = mod(r - step - 1, n), cr = mod(r - step - 2, n);
        if (step == 0) {
            if (native) {
                outgoing = s + m->blk_off[cs] * es;
            } else {
                to_acc((float *)B, s + m->blk_off[cs] * es, m->blk_len[cs], dt);
                outgoing = B;
            }
        }
        CP_CHECK(
            exchange(o, A, m->blk_len[cr] * as, left, outgoing, m->blk_len[cs] * as, right, tag));
        size_t len = m->blk_len[cr];
        const void *own = s + m->blk_off[cr] * es;
        if (!native) {
            to_acc((float *)C, own, len, dt);
            own = C;
        }
        if (step == n - 2) {
            if (native) {
                reduce_acc(out, A, own, len, adt, op);
            } else {
                reduce_acc(C, A, own, len, adt, op);
                from_acc(out, (const float *)C, len, dt);
            }
        } else {
            reduce_acc(B, A, own, len, adt, op);
            outgoing = B;
        }
    }
    return CP_OK;
}

/* Ring all-gather of the blocks in m->blk_off/blk_len (elements of size es)
 * of base; block `rank` must already be in place. */
static cp_status ring_allgather(opctx *o, void *base, size_t es, int tag) {
    cp_comm_t c = o->c;
    mpi_comm *m = o->m;
    int n = c->size, r = c->rank, left = mod(r - 1, n), right = mod(r + 1, n);
    char *b = base;
    for (int step = 0; step < n - 1; step++) {
        int cs = mod(r - step, n), cr = mod(r - step - 1, n);
        CP_CHECK(exchange(o, b + m->blk_off[cr] * es, m->blk_len[cr] * es, left,
                          b + m->blk_off[cs] * es, m->blk_len[cs] * es, right, tag));
    }
    return CP_OK;
}

/* ---- collectives --------------------------------------------------------- */

/* Recursive doubling: ranks beyond the largest power of two p2 first hand
 * their data to rank r - p2 and get the result back at the end. */
static cp_status rd_allreduce(opctx *o, const void *send, void *recv, size_t count, cp_dtype dt,
                              cp_reduce_op op) {
    cp_comm_t c = o->c;
    int n = c->size, r = c->rank;
    cp_dtype adt = acc_type(dt);
    size_t as = cp_dtype_type_size(adt), bytes = count * as, slot = pad64(bytes);
    CP_CHECK(ensure_ws(o, 2 * slot));
    char *acc = o->m->ws, *tmp = acc + slot;
    if (adt == dt)
        memcpy(acc, send, bytes);
    else
        to_acc((float *)acc, send, count, dt);
    int p2 = 1;
    while (p2 * 2 <= n)
        p2 *= 2;
    int extra = n - p2;
    if (r >= p2) {
        reqset rs;
        rs.n = 0;
        CP_CHECK(post(o, &rs, false, acc, bytes, r - p2, TAG_RD));
        CP_CHECK(wait_all(o, &rs));
        CP_CHECK(post(o, &rs, true, acc, bytes, r - p2, TAG_RD));
        CP_CHECK(wait_all(o, &rs));
    } else {
        if (r < extra) {
            reqset rs;
            rs.n = 0;
            CP_CHECK(post(o, &rs, true, tmp, bytes, r + p2, TAG_RD));
            CP_CHECK(wait_all(o, &rs));
            reduce_acc(acc, acc, tmp, count, adt, op);
        }
        for (int mask = 1; mask < p2; mask <<= 1) {
            int partner = r ^ mask;
            CP_CHECK(exchange(o, tmp, bytes, partner, acc, bytes, partner, TAG_RD));
            if (partner > r)
                reduce_acc(acc, acc, tmp, count, adt, op);
            else
                reduce_acc(acc, tmp, acc, count, adt, op);
        }
        if (r < extra) {
            reqset rs;
            rs.n = 0;
            CP_CHECK(post(o, &rs, false, acc, bytes, r + p2, TAG_RD));
            CP_CHECK(wait_all(o, &rs));
        }
    }
    if (adt == dt)
        memcpy(recv, acc, bytes);
    else
        from_acc(recv, (const float *)acc, count, dt);
    return CP_OK;
}

static cp_status mpi_allreduce(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                               cp_reduce_op op, void *stream) {
    (void)stream;
    opctx o = begin(c, OP_ALLREDUCE);
    size_t es = cp_dtype_type_size(dt);
    if (count == 0) return CP_OK;
    if (c->size == 1) {
        if (send != recv) memcpy(recv, send, count * es);
        return CP_OK;
    }
    if (count * cp_dtype_type_size(acc_type(dt)) <= RD_MAX_BYTES)
        return rd_allreduce(&o, send, recv, count, dt, op);
    size_t maxlen = even_blocks(o.m, c->size, count);
    CP_CHECK(ring_reduce_scatter(&o, send, (char *)recv + o.m->blk_off[c->rank] * es, maxlen, dt,
                                 op, TAG_RING_RS));
    return ring_allgather(&o, recv, es, TAG_RING_AG);
}

static cp_status mpi_reduce_scatter(cp_comm_t c, const void *send, void *recv, size_t count,
                                    cp_dtype dt, cp_reduce_op op, void *stream) {
    (void)stream;
    opctx o = begin(c, OP_REDUCE_SCATTER);
    for (int q = 0; q < c->size; q++) {
        o.m->blk_off[q] = (size_t)q * count;
        o.m->blk_len[q] = count;
    }
    return ring_reduce_scatter(&o, send, recv, count, dt, op, TAG_RING_RS);
}

static cp_status allgather_common(opctx *o, const void *send, void *recv, cp_dtype dt) {
    cp_comm_t c = o->c;
    size_t es = cp_dtype_type_size(dt);
    char *mine = (char *)recv + o->m->blk_off[c->rank] * es;
    if ((const void *)mine != send && o->m->blk_len[c->rank] > 0)
        memmove(mine, send, o->m->blk_len[c->rank] * es);
    return ring_allgather(o, recv, es, TAG_RING_AG);
}

static cp_status mpi_allgather(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                               void *stream) {
    (void)stream;
    opctx o = begin(c, OP_ALLGATHER);
    for (int q = 0; q < c->size; q++) {
        o.m->blk_off[q] = (size_t)q * count;
        o.m->blk_len[q] = count;
    }
    return allgather_common(&o, send, recv, dt);
}

static cp_status mpi_allgatherv(cp_comm_t c, const void *send, size_t count, void *recv,
                                const size_t *counts, cp_dtype dt, void *stream) {
    (void)stream;
    (void)count;
    opctx o = begin(c, OP_ALLGATHERV);
    size_t off = 0;
    for (int q = 0; q < c->size; q++) {
        o.m->blk_off[q] = off;
        o.m->blk_len[q] = counts[q];
        off += counts[q];
    }
    return allgather_common(&o, send, recv, dt);
}

/* Binomial tree rooted at root (ranks renumbered so that root is 0). */
static cp_status mpi_bcast(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root,
                           void *stream) {
    (void)stream;
    opctx o = begin(c, OP_BCAST);
    int n = c->size, vr = mod(c->rank - root, n);
    size_t bytes = count * cp_dtype_type_size(dt);
    reqset rs;
    rs.n = 0;
    int mask = 1;
    while (mask < n) {
        if (vr & mask) {
            CP_CHECK(post(&o, &rs, true, buf, bytes, mod(vr - mask + root, n), TAG_BCAST));
            CP_CHECK(wait_all(&o, &rs));
            break;
        }
        mask <<= 1;
    }
    for (mask >>= 1; mask > 0; mask >>= 1)
        if (vr + mask < n)
            CP_CHECK(post(&o, &rs, false, buf, bytes, mod(vr + mask + root, n), TAG_BCAST));
    return wait_all(&o, &rs);
}

/* Dissemination: in round k every rank signals r + 2^k and waits for
 * r - 2^k; after ceil(log2 n) rounds everyone has heard from everyone. */
static cp_status mpi_barrier(cp_comm_t c) {
    opctx o = begin(c, OP_BARRIER);
    int n = c->size, r = c->rank;
    char dummy = 0, sink = 0;
    for (int k = 1; k < n; k <<= 1)
        CP_CHECK(exchange(&o, &sink, 0, mod(r - k, n), &dummy, 0, mod(r + k, n), TAG_BARRIER));
    return CP_OK;
}

static cp_status mpi_send(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                          void *stream) {
    (void)stream;
    opctx o = begin(c, OP_SEND);
    reqset rs;
    rs.n = 0;
    CP_CHECK(post(&o, &rs, false, buf, count * cp_dtype_type_size(dt), peer, TAG_P2P));
    return wait_all(&o, &rs);
}

static cp_status mpi_recv(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer,
                          void *stream) {
    (void)stream;
    opctx o = begin(c, OP_RECV);
    reqset rs;
    rs.n = 0;
    CP_CHECK(post(&o, &rs, true, buf, count * cp_dtype_type_size(dt), peer, TAG_P2P));
    return wait_all(&o, &rs);
}

/* Both directions are posted, and one test gives the progress engine a
 * chance to match them before the caller goes off to compute. A start that
 * fails leaves nothing posted: a stray receive would take the next shift's
 * message. */
static cp_status mpi_sendrecv_start(cp_comm_t c, const void *send, int dst, void *recv, int src, size_t bytes,
                                    void *stream) {
    (void)stream;
    opctx o = begin(c, OP_SENDRECV);
    reqset *rs = &o.m->sr;
    rs->n = 0;
    const size_t pieces = bytes == 0 ? 1 : (bytes + PIECE_BYTES - 1) / PIECE_BYTES;
    if (2 * pieces > MAX_REQS)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "sendrecv on %s: a shift of %zu bytes each way needs more than %d pieces",
                        c->label, bytes, MAX_REQS);
    cp_status st = post(&o, rs, true, recv, bytes, src, TAG_SHIFT);
    if (st == CP_OK) st = post(&o, rs, false, send, bytes, dst, TAG_SHIFT);
    int done = 0;
    if (st == CP_OK) {
        int rc = MPI_Testall(rs->n, rs->req, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) st = op_error(&o, rc, "MPI_Testall");
    }
    if (st != CP_OK || done) {
        if (!done) drop_requests(rs->req, rs->is_recv, rs->n);
        rs->n = 0;
    }
    return st;
}

static cp_status mpi_sendrecv_wait(cp_comm_t c, void *stream) {
    (void)stream;
    opctx o = begin(c, OP_SENDRECV);
    return wait_all(&o, &o.m->sr);
}

static void mpi_abort(cp_comm_t c, int code) {
    (void)c;
    MPI_Abort(MPI_COMM_WORLD, code);
}

static void mpi_free(cp_comm_t c) {
    mpi_comm *m = c->impl;
    if (!m) return;
    /* MPI_Finalize waits for every rank without a deadline. After some
     * communicator broke, a peer may be stalled: check with a bounded
     * barrier first, and on failure leave MPI unfinalized (the launcher
     * then ends the job). */
    if (m->holds_env && c->broken == CP_OK && env_tainted) {
        int saved = c->timeout_ms;
        c->timeout_ms = saved > 0 && saved < 5000 ? saved : 5000;
        mpi_barrier(c);
        c->timeout_ms = saved;
    }
    bool broken = c->broken != CP_OK;
    bool holds_env = m->holds_env;
    /* After a timeout MPI may still read the workspace or the report buffer
     * of abandoned sends, and freeing the MPI communicator would wait for
     * them: leave both to process exit. */
    if (!broken) {
        MPI_Comm_free(&m->comm);
        cp_aligned_free(m->ws);
        free(m->world_ranks);
        free(m->blk_off);
        free(m->blk_len);
        free(m);
    }
    c->impl = NULL;
    if (holds_env) cp_comm_mpi_env_release(broken);
}

static cp_status mpi_split(cp_comm_t c, int color, int key, cp_comm_t *out);

static const struct cp_comm_i mpi_iface = {
    /* .name           = */ "mpi",
    /* .split          = */ mpi_split,
    /* .allreduce      = */ mpi_allreduce,
    /* .allgather      = */ mpi_allgather,
    /* .allgatherv     = */ mpi_allgatherv,
    /* .reduce_scatter = */ mpi_reduce_scatter,
    /* .bcast          = */ mpi_bcast,
    /* .send           = */ mpi_send,
    /* .recv           = */ mpi_recv,
    /* .barrier        = */ mpi_barrier,
    /* .sendrecv_start = */ mpi_sendrecv_start,
    /* .sendrecv_wait  = */ mpi_sendrecv_wait,
    /* .abort          = */ mpi_abort,
    /* .free           = */ mpi_free,
};

/* Node-local rank from the launcher's environment (Open MPI, then Slurm);
 * -1 when neither says. */
static int env_local_rank(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char *v = getenv(vars[i]);
        if (!v || !*v) continue;
        char *end = NULL;
        long x = strtol(v, &end, 10);
        if (*end == '\0' && x >= 0 && x < INT_MAX) return (int)x;
    }
    return -1;
}

/* Wraps an MPI communicator we own (duplicated or split) into a handle.
 * Takes ownership of comm, also on failure. Collective over comm. */
static cp_status wrap(MPI_Comm comm, bool world, cp_comm_t *out) {
    *out = NULL;
    cp_status st = CP_OK;
    cp_comm_t c = NULL;
    mpi_comm *m = calloc(1, sizeof(*m));
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Group g = MPI_GROUP_NULL, wg = MPI_GROUP_NULL;
    int *idx = NULL;
    if (!m) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory allocating an MPI communicator");
        goto fail;
    }
    m->comm = comm;
    CP_CHECK_GOTO(cp_comm_handle_new(&mpi_iface, CP_COMM_MPI, world ? "world" : "split", &c), st,
                  fail);
    c->impl = m;
    int rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm, &c->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &c->size);
    if (rc != MPI_SUCCESS) {
        st = env_error(rc, "querying an MPI communicator");
        goto fail;
    }
    size_t n = (size_t)c->size;
    m->world_ranks = malloc(n * sizeof(int));
    m->blk_off = malloc(n * sizeof(size_t));
    m->blk_len = malloc(n * sizeof(size_t));
    idx = malloc(n * sizeof(int));
    if (!m->world_ranks || !m->blk_off || !m->blk_len || !idx) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory allocating a %zu-rank communicator", n);
        goto fail;
    }
    for (size_t i = 0; i < n; i++)
        idx[i] = (int)i;
    rc = MPI_Comm_group(comm, &g);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_group(MPI_COMM_WORLD, &wg);
    if (rc == MPI_SUCCESS) rc = MPI_Group_translate_ranks(g, c->size, idx, wg, m->world_ranks);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(node, &c->local_rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(node, &c->local_size);
    if (rc != MPI_SUCCESS) {
        st = env_error(rc, "setting up an MPI communicator");
        goto fail;
    }
    if (world) {
        int lr = env_local_rank();
        if (lr >= 0 && lr < c->local_size) c->local_rank = lr;
    }
    if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
    if (g != MPI_GROUP_NULL) MPI_Group_free(&g);
    if (wg != MPI_GROUP_NULL) MPI_Group_free(&wg);
    free(idx);
    *out = c;
    return CP_OK;
fail:
    if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
    if (g != MPI_GROUP_NULL) MPI_Group_free(&g);
    if (wg != MPI_GROUP_NULL) MPI_Group_free(&wg);
    free(idx);
    if (m) {
        MPI_Comm_free(&m->comm);
        free(m->world_ranks);
        free(m->blk_off);
        free(m->blk_len);
        free(m);
    }
    if (c) cp_comm_handle_delete(c);
    return st;
}

static cp_status mpi_split(cp_comm_t c, int color, int key, cp_comm_t *out) {
    *out = NULL;
    opctx o = begin(c, OP_SPLIT);
    int n = c->size;
    /* MPI_Comm_split blocks without a deadline: first check with a deadline
     * that every rank has arrived, by gathering everyone's (color, key). */
    CP_CHECK(ensure_ws(&o, 2 * (size_t)n * sizeof(int)));
    int *ck = o.m->ws;
    ck[2 * c->rank] = color;
    ck[2 * c->rank + 1] = key;
    for (int q = 0; q < n; q++) {
        o.m->blk_off[q] = 2 * (size_t)q;
        o.m->blk_len[q] = 2;
    }
    CP_CHECK(ring_allgather(&o, ck, sizeof(int), TAG_SPLIT));
    MPI_Comm nc = MPI_COMM_NULL;
    int rc = MPI_Comm_split(o.m->comm, color < 0 ? MPI_UNDEFINED : color, key, &nc);
    if (rc != MPI_SUCCESS) return op_error(&o, rc, "MPI_Comm_split");
    if (nc == MPI_COMM_NULL) return CP_OK;
    return wrap(nc, false, out);
}

cp_status cp_comm_mpi_world_create(int timeout_ms, cp_comm_t *out) {
    *out = NULL;
    int world = 0;
    CP_CHECK(cp_comm_mpi_env_acquire(&world));
    MPI_Comm dup = MPI_COMM_NULL;
    /* A private copy of MPI_COMM_WORLD keeps our messages apart from any
     * the application sends itself. */
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &dup);
    if (rc != MPI_SUCCESS) {
        cp_status st = env_error(rc, "MPI_Comm_dup(MPI_COMM_WORLD)");
        cp_comm_mpi_env_release(false);
        return st;
    }
    cp_status st = wrap(dup, true, out);
    if (st != CP_OK) {
        cp_comm_mpi_env_release(false);
        return st;
    }
    ((mpi_comm *)(*out)->impl)->holds_env = true;
    (*out)->timeout_ms = timeout_ms;
    (*out)->is_world = true;
    return CP_OK;
}

#else
/* Built without MPI: comm.c never refers to this backend. */
typedef int comm_mpi_not_built;
#endif /* CP_HAVE_MPI */
