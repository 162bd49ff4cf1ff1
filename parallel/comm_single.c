/* comm_single.c - the one-rank communicator, always built: every collective
 * over a single rank is a copy (or nothing when in place), there is no peer
 * to send to, and nothing can time out. */
#include "comm_impl.h"

#include <string.h>

static size_t bytes_of(size_t count, cp_dtype dt) {
    return count * cp_dtype_type_size(dt);
}

/* memmove: in-place and overlapping calls are allowed by the contract. */
static void copy(void *dst, const void *src, size_t bytes) {
    if (bytes > 0 && dst != src) memmove(dst, src, bytes);
}

static cp_status self_split(cp_comm_t c, int color, int key, cp_comm_t *out) {
    (void)c;
    (void)key;
    *out = NULL;
    if (color < 0) return CP_OK;
    return cp_comm_self_create(out);
}

static cp_status self_allreduce(cp_comm_t c, const void *send, void *recv, size_t count,
                                cp_dtype dt, cp_reduce_op op, void *stream) {
    (void)c;
    (void)op;
    (void)stream;
    copy(recv, send, bytes_of(count, dt));
    return CP_OK;
}

static cp_status self_allgather(cp_comm_t c, const void *send, void *recv, size_t count,
                                cp_dtype dt, void *stream) {
    (void)c;
    (void)stream;
    copy(recv, send, bytes_of(count, dt));
    return CP_OK;
}

static cp_status self_allgatherv(cp_comm_t c, const void *send, size_t count, void *recv,
                                 const size_t *counts, cp_dtype dt, void *stream) {
    (void)c;
    (void)counts;
    (void)stream;
    copy(recv, send, bytes_of(count, dt));
    return CP_OK;
}

static cp_status self_reduce_scatter(cp_comm_t c, const void *send, void *recv, size_t count,
                                     cp_dtype dt, cp_reduce_op op, void *stream) {
    (void)c;
    (void)op;
    (void)stream;
    copy(recv, send, bytes_of(count, dt));
    return CP_OK;
}

static cp_status self_bcast(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root,
                            void *stream) {
    (void)c;
    (void)buf;
    (void)count;
    (void)dt;
    (void)root;
    (void)stream;
    return CP_OK;
}

/* comm.c rejects every peer of a one-rank communicator before we get here. */
static cp_status self_send(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                           void *stream) {
    (void)buf;
    (void)count;
    (void)dt;
    (void)stream;
    return CP_ERROR(CP_ERR_INVALID_ARG, "send on %s: a single-rank communicator has no rank %d",
                    c->label, peer);
}

static cp_status self_recv(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer,
                           void *stream) {
    (void)buf;
    (void)count;
    (void)dt;
    (void)stream;
    return CP_ERROR(CP_ERR_INVALID_ARG, "recv on %s: a single-rank communicator has no rank %d",
                    c->label, peer);
}

/* dst and src are 0 here (comm.c checked them): a copy. */
static cp_status self_sendrecv_start(cp_comm_t c, const void *send, int dst, void *recv, int src, size_t bytes,
                                     void *stream) {
    (void)c;
    (void)dst;
    (void)src;
    (void)stream;
    copy(recv, send, bytes);
    return CP_OK;
}

static cp_status self_sendrecv_wait(cp_comm_t c, void *stream) {
    (void)c;
    (void)stream;
    return CP_OK;
}

static cp_status self_barrier(cp_comm_t c) {
    (void)c;
    return CP_OK;
}

/* Nothing to tear down: the caller exits after a fatal error. */
static void self_abort(cp_comm_t c, int code) {
    (void)c;
    (void)code;
}

static void self_free(cp_comm_t c) {
    (void)c;
}

static const struct cp_comm_i self_iface = {
    /* .name           = */ "self",
    /* .split          = */ self_split,
    /* .allreduce      = */ self_allreduce,
    /* .allgather      = */ self_allgather,
    /* .allgatherv     = */ self_allgatherv,
    /* .reduce_scatter = */ self_reduce_scatter,
    /* .bcast          = */ self_bcast,
    /* .send           = */ self_send,
    /* .recv           = */ self_recv,
    /* .barrier        = */ self_barrier,
    /* .sendrecv_start = */ self_sendrecv_start,
    /* .sendrecv_wait  = */ self_sendrecv_wait,
    /* .abort          = */ self_abort,
    /* .free           = */ self_free,
};

cp_status cp_comm_self_create(cp_comm_t *out) {
    CP_CHECK(cp_comm_handle_new(&self_iface, CP_COMM_SELF, "self", out));
    (*out)->rank = 0;
    (*out)->size = 1;
    (*out)->local_rank = 0;
    (*out)->local_size = 1;
    return CP_OK;
}
