/* ranks.c - the world communicator and parallel groups of a multi-rank
 * command (see ranks.h). */
#include "ranks.h"

#include <errno.h>
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
    };
}

void ranks_node_defaults(const ranks *r, cp_device dev, int *threads, int *device_id) {
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
