/* bench_sample.cu - time per sampling call on the GPU (timing only; the
 * choices are checked in tests/cuda/test_cuda_ops.cc): greedy, top-k 40,
 * top-p 0.9, min-p 0.05 and pure temperature through cp_sample_cuda, against
 * the former path that copies the rows to the host and runs the reference.
 *
 *   bench_sample [--vocab 128256] [--reps 50] [--seed 1]
 *
 * Logits are language-model like: a N(0, 2) bulk and 20 tokens near 12 per
 * row; "wide" rows are N(0, 0.5), whose top-p 0.9 nucleus is far wider than
 * the 256 device candidates (the whole-row draw on the device). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime.h>

#include "cp_cuda_ops.h"

#define CHECK_CUDA(x)                                                                              \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                               \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)
#define CHECK_CP(x)                                                                                \
    do {                                                                                           \
        cp_status s_ = (x);                                                                        \
        if (s_ != CP_OK) {                                                                         \
            fprintf(stderr, "%s: %s\n", #x, cp_last_error());                                      \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng_state;
static double uniform(void) { /* xorshift64*, (0, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return ((double)((rng_state * 2685821657736338717ull) >> 11) + 0.5) / 9007199254740992.0;
}
static float normal(void) {
    return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

typedef struct mode {
    const char *name;
    cp_sample_params sp;
    int wide; /* wide rows */
    int host; /* the former path: rows to the host, reference sampler */
} mode;

int main(int argc, char **argv) {
    int vocab = 128256, reps = 50;
    rng_state = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--vocab"))
            vocab = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed"))
            rng_state = (uint64_t)strtoull(argv[i + 1], NULL, 10) | 1;
        else {
            fprintf(stderr, "usage: bench_sample [--vocab N] [--reps N] [--seed N]\n");
            return 2;
        }
    }
    if (vocab < 1 || reps < 1) {
        fprintf(stderr, "bench_sample: --vocab and --reps must be at least 1\n");
        return 2;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "bench_sample: no CUDA GPU on this machine\n");
        return 1;
    }
    const int max_rows = 64, row_counts[] = {1, 8, 64};
    const size_t count = (size_t)max_rows * (size_t)vocab;
    float *h = (float *)malloc(count * sizeof(float) * 2);
    float *hrows = (float *)malloc(count * sizeof(float));
    float u[64];
    int32_t out[64];
    double *t = (double *)malloc((size_t)reps * sizeof(double));
    if (!h || !hrows || !t) return 1;
    for (int r = 0; r < max_rows; r++) {
        float *x = h + (size_t)r * vocab, *w = h + count + (size_t)r * vocab;
        for (int j = 0; j < vocab; j++) {
            x[j] = 2.0f * normal();
            w[j] = 0.5f * normal();
        }
        for (int k = 0; k < 20; k++)
            x[(size_t)(uniform() * vocab) % vocab] = 12.0f + 2.0f * normal();
    }
    float *d = NULL;
    CHECK_CUDA(cudaMalloc((void **)&d, count * sizeof(float) * 2));
    CHECK_CUDA(cudaMemcpy(d, h, count * sizeof(float) * 2, cudaMemcpyHostToDevice));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cp_sampler_cuda_t smp = NULL;
    CHECK_CP(cp_sampler_cuda_init(&smp));

    const mode modes[] = {
        {"greedy", {0.0f, 0, 1.0f, 0.0f}, 0, 0},
        {"top-k 40, T 0.8", {0.8f, 40, 1.0f, 0.0f}, 0, 0},
        {"top-p 0.9, T 0.8", {0.8f, 0, 0.9f, 0.0f}, 0, 0},
        {"min-p 0.05, T 1", {1.0f, 0, 1.0f, 0.05f}, 0, 0},
        {"temperature 1 (whole row)", {1.0f, 0, 1.0f, 0.0f}, 0, 0},
        {"top-p 0.9, T 1, wide rows", {1.0f, 0, 0.9f, 0.0f}, 1, 0},
        {"host path: top-p 0.9, T 0.8", {0.8f, 0, 0.9f, 0.0f}, 0, 1},
    };
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, vocab %d, median of %d calls (ms per call, all rows)\n", prop.name, vocab, reps);
    printf("%-30s %10s %10s %10s\n", "mode", "rows 1", "rows 8", "rows 64");
    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        printf("%-30s", modes[m].name);
        const float *logits = d + (modes[m].wide ? count : 0);
        for (size_t rc = 0; rc < sizeof row_counts / sizeof row_counts[0]; rc++) {
            const int n = row_counts[rc];
            const int runs =
                modes[m].host ? (reps < 5 ? reps : 5) : reps; /* the host path is slow */
            for (int i = -3; i < runs; i++) {
                for (int r = 0; r < n; r++)
                    u[r] = (float)uniform();
                const double t0 = now();
                if (modes[m].host) {
                    CHECK_CUDA(cudaMemcpyAsync(hrows, logits, (size_t)n * vocab * sizeof(float),
                                               cudaMemcpyDeviceToHost, stream));
                    CHECK_CUDA(cudaStreamSynchronize(stream));
                    CHECK_CP(cp_sample_host(hrows, n, vocab, &modes[m].sp, u, out));
                } else {
                    CHECK_CP(cp_sample_cuda(smp, logits, n, vocab, &modes[m].sp, u, out, stream));
                }
                if (i >= 0) t[i] = now() - t0;
            }
            qsort(t, (size_t)runs, sizeof *t, cmp_d);
            printf(" %10.3f", 1e3 * t[runs / 2]);
            fflush(stdout);
        }
        printf("\n");
    }
    cp_sampler_cuda_free(smp);
    cudaStreamDestroy(stream);
    cudaFree(d);
    free(h);
    free(hrows);
    free(t);
    return 0;
}
