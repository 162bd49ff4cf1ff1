/* comm_nccl.c - the NCCL communicator (device buffers, one GPU per rank).
 * The unique id and the node-local ranks come from a host "boot"
 * communicator (MPI, or self for one rank). Communicators are non-blocking
 * (config.blocking = 0): every call is enqueued, then its completion is
 * polled against the deadline; on expiry the NCCL communicator is aborted. */
#ifdef CP_HAVE_NCCL

#include "comm_impl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct nccl_comm {
    ncclComm_t comm; /* NULL once aborted */
    cp_comm_t boot;  /* host communicator over the same ranks (owned) */
    int device;
    cudaStream_t internal; /* barrier's stream */
    void *scratch;         /* device int32 for the barrier */
} nccl_comm;

static double deadline_of(cp_comm_t c) {
    return c->timeout_ms > 0 ? cp_time_now() + c->timeout_ms * 1e-3 : 0.0;
}

static void backoff(double waited) {
    if (waited < 50e-6) return;
    if (waited < 5e-3) {
        sched_yield();
        return;
    }
    struct timespec ts = {0, waited < 0.1 ? 20000 : 200000};
    nanosleep(&ts, NULL);
}

static cp_status nccl_fail(cp_comm_t c, const char *op, const char *call, ncclResult_t r) {
    nccl_comm *nc = c->impl;
    const char *detail = nc && nc->comm ? ncclGetLastError(nc->comm) : NULL;
    c->broken = CP_ERR_NCCL;
    return CP_ERROR(CP_ERR_NCCL, "%s on %s (rank %d of %d, NCCL): %s failed: %s%s%s", op, c->label,
                    c->rank, c->size, call, ncclGetErrorString(r), detail && *detail ? ": " : "",
                    detail ? detail : "");
}

static cp_status cuda_fail(cp_comm_t c, const char *op, const char *call, cudaError_t e) {
    c->broken = CP_ERR_CUDA;
    return CP_ERROR(CP_ERR_CUDA, "%s on %s (rank %d of %d, NCCL): %s failed: %s", op, c->label,
                    c->rank, c->size, call, cudaGetErrorString(e));
}

static cp_status timeout_abort(cp_comm_t c, const char *op) {
    nccl_comm *nc = c->impl;
    if (nc->comm) {
        ncclCommAbort(nc->comm);
        nc->comm = NULL;
    }
    c->broken = CP_ERR_TIMEOUT;
    return CP_ERROR(CP_ERR_TIMEOUT,
                    "%s on %s (rank %d of %d, NCCL) timed out after %d ms; NCCL cannot tell which "
                    "rank did not arrive (look for the rank that reported an error or is missing "
                    "from the logs); the NCCL communicator was aborted and is now unusable",
                    op, c->label, c->rank, c->size, c->timeout_ms);
}

/* Waits until a non-blocking NCCL call on comm has left ncclInProgress. */
static cp_status wait_ready(cp_comm_t c, ncclComm_t comm, const char *op, double deadline) {
    double start = cp_time_now();
    for (;;) {
        ncclResult_t a = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(comm, &a);
        if (r != ncclSuccess) return nccl_fail(c, op, "ncclCommGetAsyncError", r);
        if (a == ncclSuccess) return CP_OK;
        if (a != ncclInProgress) return nccl_fail(c, op, "NCCL", a);
        double now = cp_time_now();
        if (deadline > 0 && now >= deadline) return timeout_abort(c, op);
        backoff(now - start);
    }
}

/* Finishes an enqueued collective: r is what the NCCL call returned. With a
 * deadline, waits for the stream to pass the operation while watching the
 * communicator for asynchronous errors. */
static cp_status finish(cp_comm_t c, const char *op, const char *call, ncclResult_t r,
                        cudaStream_t stream, double deadline, bool always_wait) {
    nccl_comm *nc = c->impl;
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(c, op, call, r);
    CP_CHECK(wait_ready(c, nc->comm, op, deadline));
    if (deadline == 0 && !always_wait) return CP_OK;
    double start = cp_time_now();
    for (;;) {
        cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) return CP_OK;
        if (e != cudaErrorNotReady) return cuda_fail(c, op, "cudaStreamQuery", e);
        ncclResult_t a = ncclSuccess;
        ncclCommGetAsyncError(nc->comm, &a);
        if (a != ncclSuccess && a != ncclInProgress) return nccl_fail(c, op, "NCCL", a);
        double now = cp_time_now();
        if (deadline > 0 && now >= deadline) return timeout_abort(c, op);
        backoff(now - start);
    }
}

static ncclDataType_t nccl_type(cp_dtype dt) {
    switch (dt) {
    case CP_DTYPE_F32: return ncclFloat32;
    case CP_DTYPE_F16: return ncclFloat16;
    case CP_DTYPE_BF16: return ncclBfloat16;
    case CP_DTYPE_I32: return ncclInt32;
    case CP_DTYPE_I64: return ncclInt64;
    case CP_DTYPE_F64: return ncclFloat64;
    default: return ncclInt8;
    }
}

static ncclRedOp_t nccl_op(cp_reduce_op op) {
    return op == CP_REDUCE_MAX ? ncclMax : (op == CP_REDUCE_MIN ? ncclMin : ncclSum);
}

/* ---- operations ---------------------------------------------------------- */

static cp_status nc_allreduce(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                              cp_reduce_op op, void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = ncclAllReduce(send, recv, count, nccl_type(dt), nccl_op(op), nc->comm, s);
    return finish(c, "all_reduce", "ncclAllReduce", r, s, dl, false);
}

/* Data movement goes as bytes: any scalar type, including ones NCCL lacks. */
static cp_status nc_allgather(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                              void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r =
        ncclAllGather(send, recv, count * cp_dtype_type_size(dt), ncclInt8, nc->comm, s);
    return finish(c, "all_gather", "ncclAllGather", r, s, dl, false);
}

/* NCCL has no all-gatherv: one broadcast per rank, fused in a group. */
static cp_status nc_allgatherv(cp_comm_t c, const void *send, size_t count, void *recv,
                               const size_t *counts, cp_dtype dt, void *stream) {
    (void)count;
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    size_t es = cp_dtype_type_size(dt), off = 0;
    ncclResult_t r = ncclGroupStart();
    for (int q = 0; q < c->size && r == ncclSuccess; q++) {
        char *dst = (char *)recv + off * es;
        if (counts[q] > 0)
            r = ncclBroadcast(q == c->rank ? send : dst, dst, counts[q] * es, ncclInt8, q, nc->comm,
                              s);
        off += counts[q];
    }
    ncclResult_t e = ncclGroupEnd();
    if (r == ncclSuccess) r = e;
    return finish(c, "all_gatherv", "ncclBroadcast group", r, s, dl, false);
}

static cp_status nc_reduce_scatter(cp_comm_t c, const void *send, void *recv, size_t count,
                                   cp_dtype dt, cp_reduce_op op, void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = ncclReduceScatter(send, recv, count, nccl_type(dt), nccl_op(op), nc->comm, s);
    return finish(c, "reduce_scatter", "ncclReduceScatter", r, s, dl, false);
}

static cp_status nc_bcast(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root,
                          void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r =
        ncclBroadcast(buf, buf, count * cp_dtype_type_size(dt), ncclInt8, root, nc->comm, s);
    return finish(c, "broadcast", "ncclBroadcast", r, s, dl, false);
}

static cp_status nc_send(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                         void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = ncclSend(buf, count * cp_dtype_type_size(dt), ncclInt8, peer, nc->comm, s);
    return finish(c, "send", "ncclSend", r, s, dl, false);
}

static cp_status nc_recv(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer,
                         void *stream) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = ncclRecv(buf, count * cp_dtype_type_size(dt), ncclInt8, peer, nc->comm, s);
    return finish(c, "recv", "ncclRecv", r, s, dl, false);
}

/* Both directions in one group on the stream; the wait is that of any
 * enqueued operation (finish), its deadline counted from the wait. */
static cp_status nc_sendrecv_start(cp_comm_t c, const void *send, int dst, void *recv, int src, size_t bytes,
                                   void *stream) {
    nccl_comm *nc = c->impl;
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = ncclGroupStart();
    if (r == ncclSuccess) r = ncclSend(send, bytes, ncclInt8, dst, nc->comm, s);
    if (r == ncclSuccess) r = ncclRecv(recv, bytes, ncclInt8, src, nc->comm, s);
    ncclResult_t e = ncclGroupEnd();
    if (r == ncclSuccess) r = e;
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(c, "sendrecv", "ncclSend/ncclRecv", r);
    return CP_OK;
}

static cp_status nc_sendrecv_wait(cp_comm_t c, void *stream) {
    return finish(c, "sendrecv", "ncclGroupEnd", ncclSuccess, (cudaStream_t)stream, deadline_of(c), false);
}

/* A one-element all-reduce on a private stream, waited for on the host. */
static cp_status nc_barrier(cp_comm_t c) {
    nccl_comm *nc = c->impl;
    double dl = deadline_of(c);
    ncclResult_t r =
        ncclAllReduce(nc->scratch, nc->scratch, 1, ncclInt32, ncclSum, nc->comm, nc->internal);
    return finish(c, "barrier", "ncclAllReduce", r, nc->internal, dl, true);
}

static void nc_abort(cp_comm_t c, int code) {
    nccl_comm *nc = c->impl;
    if (!nc) return;
    if (nc->comm) {
        ncclCommAbort(nc->comm);
        nc->comm = NULL;
    }
    cp_comm_abort(nc->boot, code);
}

static void nc_free(cp_comm_t c) {
    nccl_comm *nc = c->impl;
    if (!nc) return;
    if (nc->comm) {
        if (c->broken != CP_OK) {
            ncclCommAbort(nc->comm);
        } else {
            /* Finalize flushes pending work; a peer that never gets there
             * turns into an abort at the deadline. */
            double dl = deadline_of(c);
            ncclResult_t r = ncclCommFinalize(nc->comm);
            if ((r == ncclSuccess || r == ncclInProgress) &&
                wait_ready(c, nc->comm, "free", dl) == CP_OK)
                ncclCommDestroy(nc->comm);
            else if (nc->comm)
                ncclCommAbort(nc->comm);
        }
        nc->comm = NULL;
    }
    if (nc->scratch) cudaFree(nc->scratch);
    if (nc->internal) cudaStreamDestroy(nc->internal);
    /* Finalizing MPI waits for every rank: not after a failure. */
    if (c->broken != CP_OK && nc->boot && nc->boot->broken == CP_OK) nc->boot->broken = c->broken;
    cp_comm_free(nc->boot);
    free(nc);
    c->impl = NULL;
}

static cp_status nc_split(cp_comm_t c, int color, int key, cp_comm_t *out);

static const struct cp_comm_i nccl_iface = {
    /* .name           = */ "nccl",
    /* .split          = */ nc_split,
    /* .allreduce      = */ nc_allreduce,
    /* .allgather      = */ nc_allgather,
    /* .allgatherv     = */ nc_allgatherv,
    /* .reduce_scatter = */ nc_reduce_scatter,
    /* .bcast          = */ nc_bcast,
    /* .send           = */ nc_send,
    /* .recv           = */ nc_recv,
    /* .barrier        = */ nc_barrier,
    /* .sendrecv_start = */ nc_sendrecv_start,
    /* .sendrecv_wait  = */ nc_sendrecv_wait,
    /* .abort          = */ nc_abort,
    /* .free           = */ nc_free,
};

/* Builds the handle around an initialised (or initialising) NCCL
 * communicator; takes ownership of comm and boot, also on failure. */
static cp_status wrap(ncclComm_t comm, cp_comm_t boot, int device, const char *label,
                      double deadline, cp_comm_t *out) {
    *out = NULL;
    cp_status st = CP_OK;
    cp_comm_t c = NULL;
    nccl_comm *nc = calloc(1, sizeof(*nc));
    if (!nc) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory allocating an NCCL communicator");
        goto fail;
    }
    nc->comm = comm;
    nc->boot = boot;
    nc->device = device;
    CP_CHECK_GOTO(cp_comm_handle_new(&nccl_iface, CP_COMM_NCCL, label, &c), st, fail);
    c->impl = nc;
    c->rank = boot->rank;
    c->size = boot->size;
    c->local_rank = boot->local_rank;
    c->local_size = boot->local_size;
    c->timeout_ms = boot->timeout_ms;
    c->is_world = boot->is_world;
    comm = NULL;
    boot = NULL;
    CP_CHECK_GOTO(wait_ready(c, nc->comm, "init", deadline), st, fail);
    cudaError_t e = cudaStreamCreateWithFlags(&nc->internal, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc(&nc->scratch, 64);
    if (e != cudaSuccess) {
        st = cuda_fail(c, "init", "cudaStreamCreate/cudaMalloc", e);
        goto fail;
    }
    *out = c;
    return CP_OK;
fail:
    if (c) {
        nc_free(c);
        cp_comm_handle_delete(c);
    } else {
        if (comm) ncclCommAbort(comm);
        cp_comm_free(boot);
        free(nc);
    }
    return st;
}

static cp_status nc_split(cp_comm_t c, int color, int key, cp_comm_t *out) {
    nccl_comm *nc = c->impl;
    *out = NULL;
    double dl = deadline_of(c);
    cp_comm_t boot = NULL;
    /* The host split first: it has a deadline that names missing ranks. */
    CP_CHECK(cp_comm_split(nc->boot, color, key, &boot));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t child = NULL;
    ncclResult_t r =
        ncclCommSplit(nc->comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        cp_comm_free(boot);
        return nccl_fail(c, "split", "ncclCommSplit", r);
    }
    cp_status st = wait_ready(c, nc->comm, "split", dl);
    if (st != CP_OK) {
        if (child) ncclCommAbort(child);
        cp_comm_free(boot);
        return st;
    }
    if (!child || !boot) {
        if (child) ncclCommAbort(child);
        cp_comm_free(boot);
        return CP_OK;
    }
    boot->timeout_ms = c->timeout_ms;
    return wrap(child, boot, nc->device, "split", dl, out);
}

/* The communicator over boot's ranks on GPU `device` (made current); takes
 * ownership of boot, also on failure. Every rank first prepares (its GPU,
 * rank 0 the unique id), then all learn whether all could, so that no rank
 * waits in NCCL's initialisation for one that will never come. */
static cp_status create_on(cp_comm_t boot, int device, const char *label, cp_comm_t *out) {
    *out = NULL;
    cp_status st = CP_OK;
    double dl = deadline_of(boot);
    ncclUniqueId id;
    memset(&id, 0, sizeof(id));
    cp_status mine = CP_OK;
    int ndev = 0; /* left untouched when the call fails */
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e == cudaSuccess && (device < 0 || device >= ndev)) {
        mine = CP_ERROR(CP_ERR_INVALID_ARG, "an NCCL communicator on GPU %d of rank %d: this process has %d GPU(s)",
                        device, boot->rank, ndev);
    } else if (e == cudaSuccess && (e = cudaSetDevice(device)) == cudaSuccess) {
        if (boot->rank == 0) {
            ncclResult_t r = ncclGetUniqueId(&id);
            if (r != ncclSuccess) mine = CP_ERROR(CP_ERR_NCCL, "ncclGetUniqueId failed: %s", ncclGetErrorString(r));
        }
    }
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        mine = CP_ERROR(CP_ERR_CUDA, "an NCCL communicator on GPU %d of rank %d: %s", device, boot->rank,
                        cudaGetErrorString(e));
    }
    char why[256] = "";
    if (mine != CP_OK) snprintf(why, sizeof(why), "%s", cp_last_error_detail());
    int32_t ready = mine == CP_OK, all_ready = 0;
    CP_CHECK_GOTO(cp_comm_allreduce(boot, &ready, &all_ready, 1, CP_DTYPE_I32, CP_REDUCE_MIN, NULL), st, fail);
    if (!all_ready) {
        st = mine != CP_OK ? CP_ERROR(mine, "%s", why)
                           : CP_ERROR(CP_ERR_NCCL, "another rank of the group could not prepare NCCL (see its message)");
        goto fail;
    }
    CP_CHECK_GOTO(cp_comm_bcast(boot, &id, sizeof(id), CP_DTYPE_I8, 0, NULL), st, fail);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRankConfig(&comm, boot->size, id, boot->rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        if (comm) ncclCommAbort(comm);
        st = CP_ERROR(CP_ERR_NCCL, "ncclCommInitRankConfig failed on rank %d of %d: %s", boot->rank,
                      boot->size, ncclGetErrorString(r));
        goto fail;
    }
    return wrap(comm, boot, device, label, dl, out);
fail:
    cp_comm_free(boot);
    return st;
}

cp_status cp_comm_nccl_world_create(cp_comm_t boot, int timeout_ms, cp_comm_t *out) {
    *out = NULL;
    cp_status st = CP_OK;
    boot->timeout_ms = timeout_ms;
    int ndev = 0; /* left untouched when the call fails */
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        st = CP_ERROR(e != cudaSuccess ? CP_ERR_CUDA : CP_ERR_UNSUPPORTED,
                      "the NCCL communicator needs a CUDA GPU on rank %d, but none is usable (%s); "
                      "use the MPI communicator on machines without GPUs",
                      boot->rank, e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        goto fail;
    }
    if (boot->local_size > ndev) {
        st = CP_ERROR(CP_ERR_UNSUPPORTED,
                      "the NCCL communicator needs one GPU per rank, but %d ranks share a node "
                      "with %d GPU(s); start at most %d ranks per node or use the MPI communicator",
                      boot->local_size, ndev, ndev);
        goto fail;
    }
    return create_on(boot, boot->local_rank, "world", out);
fail:
    cp_comm_free(boot);
    return st;
}

cp_status cp_comm_nccl_create_on(cp_comm_t boot, int device, cp_comm_t *out) {
    return create_on(boot, device, "nccl", out);
}

#else
/* Built without NCCL: comm.c never refers to this backend. */
typedef int comm_nccl_not_built;
#endif /* CP_HAVE_NCCL */
