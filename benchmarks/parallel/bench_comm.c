/* bench_comm.c - latency and bandwidth of the collectives the attention
 * exchange of context parallelism uses (all-gather, all-gatherv, all-reduce,
 * reduce-scatter), through cp_comm over MPI (the deadline-polled calls the
 * runtime makes), from 8 bytes to 2 MiB per rank. Run it with mpirun;
 * rank 0 prints a Markdown table of the median time per call and, per
 * operation, the latency (the smallest size's time), the bandwidth (the
 * largest size's bytes per rank over its time, 2 MiB) and their product: the bytes
 * a call's latency is worth, which the exchange choice of forward.c counts
 * per collective (CP_CP_CALL_BYTES in cp_model.h). */
#include "cp_comm.h"
#include "cp_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { OP_ALLGATHER, OP_ALLGATHERV, OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_N };
static const char *const op_name[OP_N] = {"all-gather", "all-gatherv", "all-reduce", "reduce-scatter"};

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One call of op with n f32 elements of payload per rank. */
static cp_status call(cp_comm_t c, int op, float *send, float *recv, size_t n, size_t *counts) {
    const int size = cp_comm_size(c), rank = cp_comm_rank(c);
    switch (op) {
    case OP_ALLGATHER:
        return cp_comm_allgather(c, send, recv, n, CP_DTYPE_F32, NULL);
    case OP_ALLGATHERV:
        for (int r = 0; r < size; r++) counts[r] = n;
        return cp_comm_allgatherv(c, recv + (size_t)rank * n, n, recv, counts, CP_DTYPE_F32, NULL);
    case OP_ALLREDUCE:
        return cp_comm_allreduce(c, send, recv, n, CP_DTYPE_F32, CP_REDUCE_MAX, NULL);
    default:
        return cp_comm_reduce_scatter(c, send, recv, n, CP_DTYPE_F32, CP_REDUCE_SUM, NULL);
    }
}

int main(int argc, char **argv) {
    int reps = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: mpirun -np N bench_comm [--reps N (default 200)]\n");
            return 2;
        }
    }
    if (reps < 5) reps = 5;
    cp_comm_t w = NULL;
    if (cp_comm_init_world(CP_COMM_MPI, CP_COMM_TIMEOUT_DEFAULT, &w) != CP_OK) {
        fprintf(stderr, "bench_comm: %s\n", cp_last_error());
        return 1;
    }
    const int size = cp_comm_size(w), rank = cp_comm_rank(w);
    const size_t max_n = (2u << 20) / sizeof(float); /* sizes 2, 8, 32, ... floats */
    float *send = calloc(max_n * (size_t)size, sizeof(float)), *recv = calloc(max_n * (size_t)size, sizeof(float));
    size_t *counts = calloc((size_t)size, sizeof(size_t));
    double *t = calloc((size_t)reps, sizeof(double));
    if (!send || !recv || !counts || !t) {
        fprintf(stderr, "bench_comm: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < max_n * (size_t)size; i++) send[i] = (float)(i % 97);
    if (rank == 0) {
        printf("%d ranks, median of %d calls (after 5 untimed), payload per rank\n\n", size, reps);
        printf("| op | bytes per rank | us per call | GB/s per rank |\n|---|--:|--:|--:|\n");
    }
    double lat[OP_N], bw[OP_N];
    int rc = 0;
    for (int op = 0; op < OP_N && !rc; op++)
        for (size_t n = 2; n <= max_n && !rc; n *= 4) {
            for (int i = 0; i < 5 + reps && !rc; i++) {
                cp_comm_barrier(w);
                const double t0 = cp_time_now();
                if (call(w, op, send, recv, n, counts) != CP_OK) {
                    fprintf(stderr, "bench_comm: rank %d: %s\n", rank, cp_last_error());
                    rc = 1;
                }
                if (i >= 5) t[i - 5] = cp_time_now() - t0;
            }
            /* a call ends when its slowest rank is done */
            double med;
            qsort(t, (size_t)reps, sizeof(double), cmp_double);
            cp_comm_allreduce(w, &t[reps / 2], &med, 1, CP_DTYPE_F64, CP_REDUCE_MAX, NULL);
            const double bytes = (double)(n * sizeof(float));
            if (n == 2) lat[op] = med;
            bw[op] = bytes / med;
            if (rank == 0)
                printf("| %s | %.0f | %.1f | %.2f |\n", op_name[op], bytes, med * 1e6, bytes / med / 1e9);
        }
    if (rank == 0 && !rc) {
        printf("\n| op | latency (us, 8 B) | bandwidth (GB/s, 2 MiB) | latency x bandwidth (KiB) |\n"
               "|---|--:|--:|--:|\n");
        for (int op = 0; op < OP_N; op++)
            printf("| %s | %.1f | %.2f | %.1f |\n", op_name[op], lat[op] * 1e6, bw[op] / 1e9,
                   lat[op] * bw[op] / 1024.0);
    }
    free(send);
    free(recv);
    free(counts);
    free(t);
    cp_comm_free(w);
    return rc;
}
