/* comm_impl.h - private to parallel/: the communicator handle, the table of
 * operations every backend fills in, and the constructors the registry in
 * comm.c calls. Arguments reaching a backend have been validated by comm.c
 * (comm usable, buffers non-NULL when count > 0, dtype/op/root/peer valid). */
#ifndef CP_COMM_IMPL_H
#define CP_COMM_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "cp_comm.h"

#ifdef __cplusplus
extern "C" {
#endif

struct cp_comm_i {
    const char *name; /* "self", "mpi", "nccl" */
    cp_status (*split)(cp_comm_t c, int color, int key, cp_comm_t *out);
    cp_status (*allreduce)(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                           cp_reduce_op op, void *stream);
    cp_status (*allgather)(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                           cp_dtype dt, void *stream);
    cp_status (*allgatherv)(cp_comm_t c, const void *send, size_t count, void *recv,
                            const size_t *counts, cp_dtype dt, void *stream);
    cp_status (*reduce_scatter)(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                                cp_dtype dt, cp_reduce_op op, void *stream);
    cp_status (*bcast)(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root, void *stream);
    cp_status (*send)(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                      void *stream);
    cp_status (*recv)(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer, void *stream);
    cp_status (*barrier)(cp_comm_t c);
    /* bytes each way; dst/src checked, may be this rank */
    cp_status (*sendrecv_start)(cp_comm_t c, const void *send, int dst, void *recv, int src, size_t bytes,
                                void *stream);
    cp_status (*sendrecv_wait)(cp_comm_t c, void *stream);
    void (*abort)(cp_comm_t c, int code);
    void (*free)(cp_comm_t c); /* releases impl only; comm.c frees the handle */
};

struct cp_comm {
    const struct cp_comm_i *iface;
    cp_comm_kind kind;
    int rank, size;
    int local_rank, local_size;
    int timeout_ms;   /* 0 = no deadline */
    cp_status broken; /* CP_OK, or why the communicator became unusable (a timeout,
                         a transport error, cp_comm_abort) */
    bool is_world;
    bool holds_mpi; /* SELF world that must release the MPI environment */
    bool sr_pending; /* a sendrecv was started and not yet waited for */
    void *sr_stream; /* the stream it started on */
    uint64_t seq;   /* collective calls made so far (diagnostics) */
    char label[48]; /* "world", "split(color=3)": used in messages */
    void *impl;     /* backend state */
};

/* Allocates a zeroed handle with the given table and label (comm.c). */
cp_status cp_comm_handle_new(const struct cp_comm_i *iface, cp_comm_kind kind, const char *label,
                             cp_comm_t *out);
/* Frees a handle whose impl was already released (comm.c). */
void cp_comm_handle_delete(cp_comm_t c);

/* comm_single.c: a one-rank communicator. */
cp_status cp_comm_self_create(cp_comm_t *out);

/* comm_mpi.c (only with CP_HAVE_MPI). */
/* Initialises MPI unless done already and counts a reference to it; returns
 * the size of MPI_COMM_WORLD. */
cp_status cp_comm_mpi_env_acquire(int *world_size);
/* Drops a reference; the last one finalizes MPI when acquire initialised it,
 * unless skip_finalize (a timed-out job cannot finalize collectively). */
void cp_comm_mpi_env_release(bool skip_finalize);
/* The world communicator over MPI_COMM_WORLD (acquires the environment). */
cp_status cp_comm_mpi_world_create(int timeout_ms, cp_comm_t *out);

/* comm_nccl.c (only with CP_HAVE_NCCL): the world over NCCL. boot is a host
 * communicator over the same processes (MPI, or SELF for one rank) used to
 * exchange the unique id and the node-local ranks; ownership of boot passes
 * to the new communicator, also on failure. */
cp_status cp_comm_nccl_world_create(cp_comm_t boot, int timeout_ms, cp_comm_t *out);
/* An NCCL communicator over the ranks of boot (as above, owned from the
 * call on) on GPU `device` of this process, with boot's deadline. */
cp_status cp_comm_nccl_create_on(cp_comm_t boot, int device, cp_comm_t *out);

#ifdef __cplusplus
}
#endif

#endif /* CP_COMM_IMPL_H */
