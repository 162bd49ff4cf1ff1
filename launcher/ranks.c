/* ranks.c - the world communicator and parallel groups of a multi-rank
 * command (see ranks.h). */
#include "ranks.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cp_plan.h"
#include "cp_backend.h"
#include "cp_common.h"

void ranks_free(ranks *r) {
    /* rank 0 leaves a reported fault's mark for the follower that checks it */
    if (r->rank == 0 && r->mark[0] && !r->reported) unlink(r->mark);
    free(r->peers);
    cp_comm_free(r->tp_dev); /* before the host groups they were made from */
    cp_comm_free(r->pp_dev);
    cp_comm_free(r->tp);
    cp_comm_free(r->pp);
    cp_comm_free(r->cp);
    cp_comm_free(r->world);
    memset(r, 0, sizeof(*r));
}

int ranks_init(ranks *r, int tp, int pp, int cp, int timeout_ms) {
    memset(r, 0, sizeof(*r));
    if (cp < 1) cp = 1;
    r->n_cp = cp;
    if (cp_comm_init_world(CP_COMM_AUTO, timeout_ms, &r->world) != CP_OK) {
        cli_report_error("cannot start the communicator");
        return 1;
    }
    r->rank = cp_comm_rank(r->world);
    r->size = cp_comm_size(r->world);
    if (tp * pp * cp != r->size) {
        if (cp > 1)
            fprintf(stderr,
                    "cparallel: error: rank %d: --tp %d x --cp %d x --pp %d = %d ranks, but the job has %d "
                    "(start it with mpirun -np %d or change --tp/--cp/--pp)\n",
                    r->rank, tp, cp, pp, tp * cp * pp, r->size, tp * cp * pp);
        else
            fprintf(stderr,
                    "cparallel: error: rank %d: --tp %d x --pp %d = %d ranks, but the job has %d "
                    "(start it with mpirun -np %d or change --tp/--pp)\n",
                    r->rank, tp, pp, tp * pp, r->size, tp * pp);
        return 2;
    }
    /* the ranks of a TP group are consecutive (cp_plan.h) */
    const cp_plan_colors col = cp_plan_group_colors(r->rank, tp, cp);
    if ((tp > 1 && cp_comm_split(r->world, col.tp, r->rank, &r->tp) != CP_OK) ||
        (pp > 1 && cp_comm_split(r->world, col.pp, r->rank, &r->pp) != CP_OK) ||
        (cp > 1 && cp_comm_split(r->world, col.cp, r->rank, &r->cp) != CP_OK)) {
        cli_report_error("cannot create the parallel groups");
        return 1;
    }
    return 0;
}

cp_engine_opts ranks_engine_opts(const ranks *r, const char *model, cp_device dev, int device_id,
                                 int threads, int n_ctx, int tp, int pp) {
    return (cp_engine_opts){
        .model_path = model,
        .n_threads = threads,
        .device = dev,
        .device_id = device_id < 0 ? 0 : device_id,
        .n_ctx = n_ctx,
        .n_seq = 1,
        .tp = tp,
        .pp = pp,
        .cp = r->n_cp,
        .rank = r->rank,
        .tp_comm = r->tp,
        .pp_comm = r->pp,
        .cp_comm = r->cp,
        .tp_dev_comm = dev == CP_DEVICE_CUDA ? r->tp_dev : NULL,
        .pp_dev_comm = dev == CP_DEVICE_CUDA ? r->pp_dev : NULL,
    };
}

static int64_t host_hash(void);
static int device_comms(ranks *r, cp_device dev, cp_comm_kind how, int device_id);

int ranks_node_defaults(ranks *r, cp_device dev, cp_comm_kind how, int *threads, int *device_id) {
    int local = cp_comm_local_size(r->world);
    if (*threads == 0 && local > 1) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        *threads = (int)(cores / local);
        if (*threads < 1) *threads = 1;
    }
    if (dev == CP_DEVICE_CUDA && *device_id < 0) {
        int count = 0;
        cp_backend_cuda_device_count(&count);
        *device_id = count > 0 ? cp_comm_local_rank(r->world) % count : 0;
    }
    return device_comms(r, dev, how, *device_id);
}

/* Each rank's {host, GPU UUID (two words), usable}: a rank that cannot use
 * NCCL says why into why[] and shares usable = 0. */
enum { DC_HOST, DC_UUID0, DC_UUID1, DC_OK, DC_WORDS };

static int device_comms(ranks *r, cp_device dev, cp_comm_kind how, int device_id) {
    if (how == CP_COMM_MPI || r->size < 2 || (!r->tp && !r->pp)) return 0;
    char why[256] = "";
    int64_t me[DC_WORDS] = {host_hash(), 0, 0, 0};
    uint8_t uuid[16];
    if (dev != CP_DEVICE_CUDA)
        snprintf(why, sizeof why, "the ranks run on the CPU (NCCL needs --device cuda)");
    else if (!cp_comm_built(CP_COMM_NCCL))
        snprintf(why, sizeof why, "this build has no NCCL");
    else if (cp_backend_cuda_device_uuid(device_id, uuid) != CP_OK)
        snprintf(why, sizeof why, "cannot identify GPU %d: %s", device_id, cp_last_error_detail());
    else {
        memcpy(&me[DC_UUID0], uuid, 16);
        me[DC_OK] = 1;
    }
    int64_t *all = malloc((size_t)r->size * DC_WORDS * sizeof(int64_t));
    if (!all) { /* the others are in the all-gather already: end the job rather than leave them waiting */
        fprintf(stderr, "cparallel: error: rank %d: out of memory\n", r->rank);
        cp_comm_abort(r->world, 1);
        return 1;
    }
    if (cp_comm_allgather(r->world, me, all, DC_WORDS, CP_DTYPE_I64, NULL) != CP_OK) {
        free(all);
        cli_report_error("the ranks could not compare their GPUs");
        return 1;
    }
    /* every rank reads the same table, so all decide alike */
    int unusable = -1, share_a = -1, share_b = -1;
    for (int q = 0; q < r->size && unusable < 0 && share_a < 0; q++) {
        const int64_t *a = all + (size_t)q * DC_WORDS;
        if (!a[DC_OK]) {
            unusable = q;
            break;
        }
        for (int p = 0; p < q; p++) {
            const int64_t *b = all + (size_t)p * DC_WORDS;
            if (a[DC_HOST] == b[DC_HOST] && a[DC_UUID0] == b[DC_UUID0] && a[DC_UUID1] == b[DC_UUID1]) {
                share_a = p;
                share_b = q;
                break;
            }
        }
    }
    free(all);
    if (unusable < 0 && share_a >= 0)
        snprintf(why, sizeof why, "ranks %d and %d run on the same GPU (NCCL needs a GPU per rank)", share_a,
                 share_b);
    if (unusable >= 0 || share_a >= 0) {
        /* one line: from the first rank that cannot, or from rank 0 */
        const bool says = unusable >= 0 ? unusable == r->rank : r->rank == 0;
        if (how == CP_COMM_NCCL) {
            if (says) fprintf(stderr, "cparallel: error: rank %d: --comm nccl: %s\n", r->rank, why);
            return 1;
        }
        if (says && dev == CP_DEVICE_CUDA)
            fprintf(stderr, "cparallel: activations pass through host memory over MPI: %s\n", why);
        return 0;
    }

    /* every rank tries both groups, so the ranks of each meet; a rank whose
     * start failed can reach the agreement up to two deadlines (one NCCL
     * start each) before the others, which its own deadline must cover */
    cp_comm_t hosts[2] = {r->tp, r->pp}, twins[2] = {NULL, NULL};
    const cp_status st = cp_comm_nccl_create(2, hosts, device_id, twins);
    r->tp_dev = twins[0];
    r->pp_dev = twins[1];
    if (st != CP_OK)
        fprintf(stderr, "cparallel: %s: rank %d: NCCL did not start: %s\n", how == CP_COMM_NCCL ? "error" : "warning",
                r->rank, cp_last_error_detail());
    const int timeout = cp_comm_get_timeout(r->world);
    if (timeout > 0) cp_comm_set_timeout(r->world, timeout > INT_MAX / 4 ? INT_MAX : 3 * timeout + 5000);
    int64_t ok = st == CP_OK, all_ok = 0;
    const cp_status agreed = cp_comm_allreduce(r->world, &ok, &all_ok, 1, CP_DTYPE_I64, CP_REDUCE_MIN, NULL);
    if (timeout > 0) cp_comm_set_timeout(r->world, timeout);
    if (agreed != CP_OK) {
        cli_report_error("the ranks could not agree on NCCL");
        return 1;
    }
    if (all_ok) return 0;
    cp_comm_free(r->tp_dev);
    cp_comm_free(r->pp_dev);
    r->tp_dev = r->pp_dev = NULL;
    if (how == CP_COMM_NCCL) {
        /* the ranks that failed said why; rank 0 says it if it did not */
        if (ok && r->rank == 0)
            fprintf(stderr, "cparallel: error: --comm nccl: NCCL did not start on every rank (see their messages)\n");
        return 1;
    }
    if (r->rank == 0)
        fprintf(stderr, "cparallel: warning: NCCL did not start (see the ranks' messages); activations pass through "
                        "host memory over MPI\n");
    return 0;
}

static int designated(const ranks *r);
static bool gone(int64_t pid);

static int64_t host_hash(void) {
    char host[256] = "";
    gethostname(host, sizeof(host) - 1);
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *p = host; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return (int64_t)(h >> 1);
}

int ranks_learn_peers(ranks *r) {
    free(r->peers);
    r->peers = malloc((size_t)r->size * 2 * sizeof(int64_t));
    if (!r->peers) {
        fprintf(stderr, "cparallel: error: out of memory\n");
        return 1;
    }
    int64_t me[2] = {(int64_t)getpid(), host_hash()};
    if (cp_comm_allgather(r->world, me, r->peers, 2, CP_DTYPE_I64, NULL) != CP_OK) {
        cli_report_error("the ranks could not exchange their process ids");
        free(r->peers);
        r->peers = NULL;
        return 1;
    }
    r->mark[0] = '\0';
    if (designated(r) > 0 && (r->rank == 0 || r->rank == designated(r))) {
        const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(r->mark, sizeof(r->mark), "%s/cparallel-fault-%lld-%llx", dir,
                 (long long)r->peers[0], (unsigned long long)r->peers[1]);
        if (r->rank == 0) {
            FILE *f = fopen(r->mark, "w");
            if (f)
                fclose(f);
            else
                r->mark[0] = '\0';
        }
    }
    return 0;
}

/* Whether a process of this host is gone (a zombie counts as gone). */
static bool gone(int64_t pid) {
    if (kill((pid_t)pid, 0) != 0) return errno == ESRCH;
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')'); /* "pid (comm) S ..." */
    return paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

/* The follower that reports rank 0's loss: the lowest rank on its host. */
static int designated(const ranks *r) {
    for (int q = 1; q < r->size; q++)
        if (r->peers[2 * q + 1] == r->peers[1]) return q;
    return -1;
}

void ranks_fault_reported(ranks *r) {
    r->reported = true;
    if (r->rank != 0 || !r->mark[0]) return;
    FILE *f = fopen(r->mark, "w");
    if (!f) return;
    fputs("reported\n", f);
    fclose(f);
}

static bool marked(const char *path) {
    char buf[16] = "";
    FILE *f = fopen(path, "r");
    if (!f) return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return !strncmp(buf, "reported", 8);
}

bool ranks_reports_lead_loss(ranks *r, double wait_s) {
    if (!r->peers || r->rank == 0 || !r->mark[0] || designated(r) != r->rank) return false;
    double until = cp_time_now() + wait_s;
    bool report = false;
    for (;;) {
        if (marked(r->mark)) break;
        if (gone(r->peers[0])) {
            report = !marked(r->mark);
            break;
        }
        if (cp_time_now() >= until) break; /* alive and silent: it still reports itself */
        nanosleep(&(struct timespec){0, 50000000L}, NULL);
    }
    unlink(r->mark);
    r->mark[0] = '\0';
    return report;
}
