/* comm_stall.c - deadline test program, run under mpirun by run_stall.sh:
 * after one good all-reduce, rank --stall-rank sleeps --stall-s seconds
 * before the next one while the others enter it; they must fail with
 * CP_ERR_TIMEOUT naming the stalled rank, print "rank R: ..." lines and
 * exit non-zero (0.5 s later) without finalizing, so that the launcher
 * ends the job. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cp_comm.h"

static long arg_long(int argc, char **argv, const char *name, long def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return strtol(argv[i + 1], NULL, 10);
    return def;
}

int main(int argc, char **argv) {
    int timeout_ms = (int)arg_long(argc, argv, "--timeout-ms", 1500);
    int stall_rank = (int)arg_long(argc, argv, "--stall-rank", 3);
    long stall_s = arg_long(argc, argv, "--stall-s", 10);
    size_t count = (size_t)arg_long(argc, argv, "--count", 1000);
    /* --token is only a marker on the command line for run_stall.sh */

    cp_comm_t w = NULL;
    if (cp_comm_init_world(CP_COMM_MPI, timeout_ms, &w) != CP_OK) {
        fprintf(stderr, "cannot create the world communicator: %s\n", cp_last_error());
        return 2;
    }
    int rank = cp_comm_rank(w);
    float *buf = calloc(count ? count : 1, sizeof(float));
    if (!buf) return 2;
    for (size_t i = 0; i < count; i++)
        buf[i] = 1.0f;
    if (cp_comm_allreduce(w, buf, buf, count, CP_DTYPE_F32, CP_REDUCE_SUM, NULL) != CP_OK) {
        printf("rank %d: warm-up all_reduce failed: %s\n", rank, cp_last_error_detail());
        return 2;
    }
    if (rank == stall_rank) {
        struct timespec ts = {stall_s, 0};
        nanosleep(&ts, NULL);
    }
    double t0 = cp_time_now();
    cp_status st = cp_comm_allreduce(w, buf, buf, count, CP_DTYPE_F32, CP_REDUCE_SUM, NULL);
    double ms = (cp_time_now() - t0) * 1e3;
    if (st == CP_OK) {
        printf("rank %d: all_reduce completed after %.0f ms\n", rank, ms);
        fflush(stdout);
        free(buf);
        cp_comm_free(w);
        return 0;
    }
    printf("rank %d: %s after %.0f ms: %s\n", rank, cp_status_str(st), ms, cp_last_error_detail());
    t0 = cp_time_now();
    st = cp_comm_barrier(w);
    printf("rank %d: next call %s after %.1f ms: %s\n", rank, cp_status_str(st),
           (cp_time_now() - t0) * 1e3, cp_last_error_detail());
    fflush(stdout);
    /* The first rank to exit makes the launcher kill the others: give them
     * time to print their own report first. */
    struct timespec linger = {0, 500000000};
    nanosleep(&linger, NULL);
    free(buf);
    cp_comm_free(w); /* broken: does not finalize MPI */
    return 1;
}
