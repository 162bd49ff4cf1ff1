/* cp_comm.h - the communicator: collectives and point-to-point transfers
 * between the ranks of a job, each bounded by a deadline. Three backends sit
 * behind one opaque handle: MPI (host buffers), NCCL (device buffers, one GPU
 * per rank, bootstrapped over MPI) and a single-rank one that only copies. */
#ifndef CP_COMM_H
#define CP_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "cp_common.h"
#include "cp_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_comm *cp_comm_t;

typedef enum cp_comm_kind {
    CP_COMM_AUTO = 0, /* MPI when built with it and started by a launcher (mpirun, srun:
                         OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK, PMI_SIZE or
                         MV2_COMM_WORLD_SIZE set) with > 1 rank, else SELF */
    CP_COMM_SELF = 1, /* one rank, host buffers; collectives are copies */
    CP_COMM_MPI = 2,  /* host buffers, any number of ranks */
    CP_COMM_NCCL = 3, /* device buffers, one GPU per rank */
} cp_comm_kind;

typedef enum cp_reduce_op {
    CP_REDUCE_SUM = 0,
    CP_REDUCE_MAX = 1,
    CP_REDUCE_MIN = 2,
} cp_reduce_op;

/* timeout_ms value for cp_comm_init_world: the default deadline (60 s). */
#define CP_COMM_TIMEOUT_DEFAULT (-1)
#define CP_COMM_TIMEOUT_DEFAULT_MS 60000

/* ---- general contract --------------------------------------------------
 * Collective calls (every rank of the communicator must make them, in the
 * same order, with matching arguments): cp_comm_init_world, cp_comm_split,
 * cp_comm_allreduce, cp_comm_allgather, cp_comm_allgatherv,
 * cp_comm_reduce_scatter, cp_comm_bcast, cp_comm_barrier, cp_comm_same_i64,
 * cp_comm_free.
 * cp_comm_send / cp_comm_recv and the sendrecv pair involve two ranks each;
 * cp_comm_abort one.
 *
 * Buffers are borrowed for the call only and must be memory of the
 * communicator's kind: host memory for SELF and MPI, device memory of the
 * rank's GPU for NCCL. Counts are in elements of dt; dt must be a scalar
 * type (not block-quantized). Reductions take F32, F16, BF16, I32, I64 and
 * F64; data movement takes any scalar type.
 *
 * Streams: `stream` is a cudaStream_t for NCCL and is ignored by SELF and
 * MPI, which complete the transfer before returning. NCCL enqueues the
 * operation on the stream, ordered after earlier work on it; with a deadline
 * (timeout_ms > 0) the call then waits for the stream to reach the end of
 * the operation, so that a missing rank is detected; with no deadline it
 * returns once the operation is enqueued.
 *
 * Deadlines: every operation must finish within the communicator's timeout
 * (cp_comm_set_timeout; 0 = wait forever), counted from the call. On expiry
 * the call returns CP_ERR_TIMEOUT with a message naming the operation, the
 * communicator, this rank and, with MPI, the rank(s) that did not deliver
 * (found by asking the other timed-out ranks what they wait for, which adds
 * max(200 ms, timeout/10) capped at 2 s before the call returns). The
 * communicator is then unusable: every later call fails at once with the
 * same code (likewise after a transport error). Ranks may disagree on the
 * failed call: a late rank can still complete it with data its peers sent
 * before giving up. After a timeout the MPI backend may still read the send
 * buffers of the failed call; keep them alive until the communicator is
 * freed (in practice the process reports the error and exits non-zero).
 *
 * Threads: MPI is initialised with MPI_THREAD_FUNNELED, so every call on a
 * communicator must come from the thread that created the world.
 *
 * Determinism: the MPI backend reduces every element in a fixed order that
 * depends only on the communicator size and the message size, and every
 * rank ends with bit-identical results (see comm_mpi.c). F16/BF16 sums are
 * accumulated in fp32 and rounded once. Integer sums wrap around. */

/* Creates the world communicator of this process and returns it in *out.
 * kind: see cp_comm_kind. NCCL needs one GPU per rank on each node and
 * makes the rank's GPU (device number = node-local rank) current on the
 * calling thread. Initialises MPI (thread level FUNNELED or better) when
 * needed and not yet done; cp_comm_free of the world finalizes it again if
 * this call initialised it. timeout_ms: the
 * deadline of every operation, CP_COMM_TIMEOUT_DEFAULT for 60 s, 0 for
 * none. The caller owns *out (cp_comm_free). Errors: CP_ERR_UNSUPPORTED
 * (backend not built in, or too few GPUs), CP_ERR_MPI, CP_ERR_CUDA,
 * CP_ERR_NCCL, CP_ERR_TIMEOUT, CP_ERR_INVALID_ARG, CP_ERR_OOM. */
cp_status cp_comm_init_world(cp_comm_kind kind, int timeout_ms, cp_comm_t *out);

/* NCCL twins of host communicators (MPI or SELF): outs[i] is an NCCL
 * communicator over the ranks of hosts[i] in the same order, on GPU
 * `device` of this process (made current on the calling thread), with
 * hosts[i]'s deadline (NULL hosts[i]: NULL outs[i]; n <= 8). For groups
 * whose device buffers move over NCCL while their host messages stay on
 * the hosts. Collective over each host in turn: a copy of every host is
 * made first (the unique ids go over the copies), then each NCCL
 * communicator is started, and every one is tried even after a failure,
 * so that the ranks of each group meet whatever another group did; a
 * failure leaves the hosts usable. Each rank must name a GPU of its own
 * (NCCL refuses two ranks on one GPU). All or nothing: on error every
 * outs[i] is NULL and the first failure is returned. The outs are the
 * caller's and must be freed before their hosts. Errors:
 * CP_ERR_UNSUPPORTED (no NCCL in this build), CP_ERR_INVALID_ARG (a host is
 * NCCL itself, no such GPU), CP_ERR_CUDA, CP_ERR_NCCL, CP_ERR_TIMEOUT. */
cp_status cp_comm_nccl_create(int n, cp_comm_t const *hosts, int device, cp_comm_t *outs);

/* Rank and size of this process in c; local_rank/local_size count the ranks
 * of c on the same node. Return -1 for a NULL c. */
int cp_comm_rank(cp_comm_t c);
int cp_comm_size(cp_comm_t c);
int cp_comm_local_rank(cp_comm_t c);
int cp_comm_local_size(cp_comm_t c);
/* "self", "mpi" or "nccl" ("none" for NULL). Static storage. */
const char *cp_comm_kind_name(cp_comm_t c);

/* Whether this build contains the backend of kind (AUTO and SELF always;
 * MPI and NCCL when compiled in). Says nothing of whether it can start
 * here (NCCL also needs a GPU per rank). Local call. */
bool cp_comm_built(cp_comm_kind kind);

/* Collective over c: ranks with the same color >= 0 form a new communicator,
 * ordered by key (ties by rank in c); a rank passing a negative color gets
 * *out = NULL. The child is of c's kind and inherits c's deadline; it is
 * owned by the caller and must be freed before c. */
cp_status cp_comm_split(cp_comm_t c, int color, int key, cp_comm_t *out);

/* recv[i] = op over ranks of send[i], i < count, on every rank. In place
 * when send == recv; otherwise the buffers must not overlap. */
cp_status cp_comm_allreduce(cp_comm_t c, const void *send, void *recv, size_t count, cp_dtype dt,
                            cp_reduce_op op, void *stream);

/* recv (size * count_per_rank elements) = the send buffers of ranks 0..size-1
 * one after another. In place when send == recv + rank * count_per_rank. */
cp_status cp_comm_allgather(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                            cp_dtype dt, void *stream);

/* Like allgather with counts[r] elements from rank r (zero allowed): recv
 * holds sum(counts) elements, rank r's at offset counts[0] + ... +
 * counts[r-1]. counts has size entries, equal on every rank, and
 * count == counts[rank]. In place when send is this rank's slot of recv. */
cp_status cp_comm_allgatherv(cp_comm_t c, const void *send, size_t count, void *recv,
                             const size_t *counts, cp_dtype dt, void *stream);

/* send holds size * count_per_rank elements; recv (count_per_rank) = block
 * `rank` of the element-wise reduction over ranks. recv may alias send. */
cp_status cp_comm_reduce_scatter(cp_comm_t c, const void *send, void *recv, size_t count_per_rank,
                                 cp_dtype dt, cp_reduce_op op, void *stream);

/* buf (count elements) of rank root is copied into buf on every rank. */
cp_status cp_comm_bcast(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int root, void *stream);

/* Point-to-point: count elements to / from rank peer (!= own rank). Messages
 * between two ranks arrive in the order sent. With MPI, a send may wait for
 * the matching receive, so pairs of ranks that exchange must order their
 * calls (e.g. even ranks send first). */
cp_status cp_comm_send(cp_comm_t c, const void *buf, size_t count, cp_dtype dt, int peer,
                       void *stream);
cp_status cp_comm_recv(cp_comm_t c, void *buf, size_t count, cp_dtype dt, int peer, void *stream);

/* A shift between two ranks, started now and finished by
 * cp_comm_sendrecv_wait: count elements of send go to rank dst while count
 * elements from rank src arrive in recv (a ring step: dst = rank + 1, src =
 * rank - 1). dst and src are both this rank or both another (a shift to
 * itself is a local copy; one to itself from another rank could never be
 * matched, and is refused). Both ranks of each pair must post it; unlike
 * cp_comm_send/recv no ordering is needed, as both directions are posted
 * before either is waited for. Work done between the two calls may overlap
 * the transfer: NCCL enqueues it on the stream, so work on another stream
 * runs beside it; MPI moves what its progress engine moves during the start
 * (small messages go eagerly), the rest inside the wait. One sendrecv per
 * communicator may be in flight, and no other call on c may come between
 * start and wait. The buffers are borrowed until the wait returns (NCCL: in
 * stream order, as for every call), and the communicator must be freed
 * while they live if it still has one in flight. The wait uses the start's
 * stream (pass that stream or NULL). The deadline is counted from the
 * wait. */
cp_status cp_comm_sendrecv_start(cp_comm_t c, const void *send, int dst, void *recv, int src,
                                 size_t count, cp_dtype dt, void *stream);
cp_status cp_comm_sendrecv_wait(cp_comm_t c, void *stream);

/* Returns once every rank of c has called it (or the deadline passed). */
cp_status cp_comm_barrier(cp_comm_t c);

/* Whether the ranks of c hold the same n values (host memory, n <= 16,
 * each above INT64_MIN): lo[i] and hi[i] become the smallest and the
 * largest v[i] over the ranks (hi or lo may be NULL), and *same whether
 * they are equal for every i. One all-reduce of 2n values, so every rank
 * gets the same answer and can refuse a setting together. */
cp_status cp_comm_same_i64(cp_comm_t c, const int64_t *v, int n, int64_t *lo, int64_t *hi, bool *same);

/* ---- statistics ----------------------------------------------------------
 * Every communicator counts, per operation, the calls that passed the
 * argument checks and reached the backend (successful or not), the payload
 * bytes this rank passed to them and the wall time spent inside them. Bytes
 * are element count x element size of the operation's full vector: count
 * for all-reduce, broadcast, send and recv (the root of a broadcast and its
 * receivers count the same); the count sent for a sendrecv, whose seconds
 * are those spent in its two calls; the whole gathered buffer for
 * all-gather (size x count_per_rank) and all-gatherv (sum of counts); the
 * whole input for reduce-scatter (size x count_per_rank); 0 for barrier.
 * They describe what the algorithm asks to move, not the traffic a
 * backend's algorithm puts on the wire (a ring all-reduce sends about
 * 2 (size-1)/size times the payload per rank). Seconds include waiting for
 * late peers; with NCCL and no deadline a call returns once enqueued, so
 * its time is the enqueue time only. Counting costs two clock reads per
 * call. cp_comm_same_i64 counts as the all-reduce it makes. Counters start at zero and
 * are per communicator (a split child starts at zero too); they are plain
 * counters, used from the communicator's single calling thread. */
typedef enum cp_comm_op {
    CP_COMM_OP_ALLREDUCE = 0,
    CP_COMM_OP_ALLGATHER,
    CP_COMM_OP_ALLGATHERV,
    CP_COMM_OP_REDUCE_SCATTER,
    CP_COMM_OP_BCAST,
    CP_COMM_OP_SEND,
    CP_COMM_OP_RECV,
    CP_COMM_OP_BARRIER,
    CP_COMM_OP_SENDRECV,
    CP_COMM_OP_COUNT
} cp_comm_op;

typedef struct cp_comm_stats {
    uint64_t calls[CP_COMM_OP_COUNT];
    uint64_t bytes[CP_COMM_OP_COUNT];
    double seconds[CP_COMM_OP_COUNT];
} cp_comm_stats;

/* Copies c's counters into *out (zeros for a NULL c). Local call. */
void cp_comm_get_stats(cp_comm_t c, cp_comm_stats *out);
/* Sets c's counters to zero. Local call; NULL is a no-op. */
void cp_comm_reset_stats(cp_comm_t c);
/* "all_reduce", "all_gather", "all_gatherv", "reduce_scatter", "broadcast",
 * "send", "recv", "barrier", "sendrecv"; "?" for a value out of range.
 * Static storage. */
const char *cp_comm_op_name(cp_comm_op op);

/* Deadline of every later operation on c, in ms (0 = none). Local call.
 * Errors: CP_ERR_INVALID_ARG for a negative value or a NULL c. */
cp_status cp_comm_set_timeout(cp_comm_t c, int timeout_ms);
/* The current deadline in ms (0 = none); -1 for a NULL c. */
int cp_comm_get_timeout(cp_comm_t c);

/* Ends the job after a fatal error, for the launcher: MPI aborts every
 * process of the job with `code` (MPI_Abort, does not return); NCCL aborts
 * its communicator (pending GPU work is cancelled) and then the MPI job.
 * SELF only marks c unusable and returns: the caller exits. NULL: no-op. */
void cp_comm_abort(cp_comm_t c, int code);

/* Collective (except after a timeout): releases c. Freeing the world
 * communicator finalizes MPI when cp_comm_init_world initialised it, unless
 * c broke: finalizing waits for every rank, so a process whose communicator
 * broke should report and exit non-zero (the launcher then ends the other
 * ranks). When only another communicator broke, every rank must first reach
 * a barrier within min(timeout, 5 s), else MPI is left unfinalized too.
 * NULL is a no-op. */
void cp_comm_free(cp_comm_t c);

#ifdef __cplusplus
}
#endif

#endif /* CP_COMM_H */
