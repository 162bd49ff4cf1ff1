/* bench_sparse.c - the CPU backend's matmul on 2:4 sparse S24_Q8 weights
 * against dense Q8_0 and F16 holding the same 2:4-pruned values (so all
 * three do the same arithmetic), at decode (batch 1) and prefill batches,
 * for the default model's matrix shapes and two large ones, with 1 and 2
 * threads; best of N; next to the memcpy bandwidth measured in the same run. */
#include "cp_backend.h"
#include "cp_dtype.h"
#include "cpu/cpu_quants.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct shape {
    int64_t m, k; /* output rows x input columns */
    const char *what;
} shape;

static const shape kShapes[] = {
    {576, 576, "q/o proj"},     {1536, 576, "gate/up"},   {576, 1536, "down"},
    {49152, 576, "lm head"},    {4096, 4096, "7B q/o"},   {11008, 4096, "7B gate/up"},
};

typedef struct opts {
    int reps, max_threads, batches[8], n_batches;
    bool hot, small_only;
} opts;

static void usage(FILE *f) {
    fprintf(f, "usage: bench_sparse [--reps N] [--threads N] [--batches B,B,...] [--hot] [--small]\n"
               "  --reps N        timed calls per type and case, the best is reported\n"
               "                  (default 7; the types take turns)\n"
               "  --threads N     run 1..N threads, doubling (default 2)\n"
               "  --batches LIST  activation rows per call (default 1,16,64)\n"
               "  --hot           keep the weights in cache between calls (default: each\n"
               "                  call starts with the caches flushed, as in a forward\n"
               "                  pass whose weights do not fit the last-level cache)\n"
               "  --small         the default model's shapes only\n");
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* xorshift64*, and a cheap near-gaussian (sum of 4 uniforms) */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}
static float rng_normal(float sigma) {
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += (float)(rng_next() >> 40) * 0x1p-24f;
    return (s - 2.0f) * 1.7320508f * sigma; /* variance of the sum: 4/12 */
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "bench_sparse: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static void check(cp_status st, const char *what) {
    if (st != CP_OK) {
        fprintf(stderr, "bench_sparse: %s: %s\n", what, cp_last_error());
        exit(1);
    }
}

/* ---- memory bandwidth ---------------------------------------------------- */

#define FLUSH_BYTES ((size_t)128 << 20) /* 4x the last-level cache of common parts */
static char *flush_buf;

/* Evicts the weights: writes and reads a buffer larger than the caches. */
static void flush_caches(void) {
    memset(flush_buf, (int)(rng_next() & 0x7f), FLUSH_BYTES);
    volatile char sink = 0;
    for (size_t i = 0; i < FLUSH_BYTES; i += 4096) sink ^= flush_buf[i];
    (void)sink;
}

typedef struct copy_job {
    char *dst;
    const char *src;
    size_t n;
} copy_job;

static void *copy_part(void *p) {
    copy_job *j = p;
    memcpy(j->dst, j->src, j->n);
    return NULL;
}

/* Best of reps: bytes read plus bytes written per second by memcpy of a
 * buffer far larger than the caches, split over `threads` threads. */
static double memcpy_gbs(int threads, int reps) {
    const size_t n = (size_t)256 << 20;
    char *a = xmalloc(n), *b = xmalloc(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        pthread_t th[64];
        copy_job jobs[64];
        const size_t part = n / (size_t)threads;
        const double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            jobs[t] = (copy_job){b + (size_t)t * part, a + (size_t)t * part, part};
            if (t) pthread_create(&th[t], NULL, copy_part, &jobs[t]);
        }
        copy_part(&jobs[0]);
        for (int t = 1; t < threads; t++) pthread_join(th[t], NULL);
        const double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    free(a);
    free(b);
    return 2.0 * (double)n / best / 1e9;
}

/* ---- the matmul cases ----------------------------------------------------- */

enum { T_F16, T_Q8_0, T_S24, N_TYPES };
static const cp_dtype kTypes[N_TYPES] = {CP_DTYPE_F16, CP_DTYPE_Q8_0, CP_DTYPE_S24_Q8};

/* Best time of each type over o->reps rounds; a round times one call of
 * every type, so that load from other processes hits all of them alike. */
static void time_types(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y, const opts *o,
                       double *best) {
    for (int ty = 0; ty < N_TYPES; ty++) {
        check(cp_backend_matmul(be, &w[ty], x, n, y, NULL), "warm-up matmul");
        best[ty] = 1e30;
    }
    for (int r = 0; r < o->reps; r++)
        for (int ty = 0; ty < N_TYPES; ty++) {
            if (!o->hot) flush_caches();
            const double t0 = now_s();
            check(cp_backend_matmul(be, &w[ty], x, n, y, NULL), "matmul");
            const double dt = now_s() - t0;
            if (dt < best[ty]) best[ty] = dt;
        }
}

static void run_shape(const shape *s, cp_backend_t *bes, int n_be, const opts *o) {
    const int64_t m = s->m, k = s->k;
    const size_t nel = (size_t)(m * k);
    float *w = xmalloc(nel * sizeof(float));
    for (size_t i = 0; i < nel; i++) w[i] = rng_normal(0.02f);
    void *data[N_TYPES];
    size_t bytes[N_TYPES];
    for (int t = 0; t < N_TYPES; t++) {
        bytes[t] = cp_dtype_row_size(kTypes[t], k) * (size_t)m;
        data[t] = xmalloc(bytes[t]);
    }
    /* S24_Q8 chooses the 2 of every 4 kept; the dense types get those
     * values with the other two set to 0 (Q8_0 of that row is S24_Q8's
     * blocks written out: the same integer arithmetic) */
    check(cp_backend_quantize(bes[n_be - 1], CP_DTYPE_S24_Q8, w, m, k, data[T_S24]), "quantize S24_Q8");
    const cp_block_s24_q8 *blk = data[T_S24];
    for (size_t b = 0; b < nel / 32; b++) {
        uint32_t mask;
        memcpy(&mask, &blk[b].mask, sizeof mask);
        for (int e = 0; e < 32; e++)
            if (!((mask >> e) & 1u)) w[32 * b + (size_t)e] = 0.0f;
    }
    check(cp_backend_quantize(bes[n_be - 1], CP_DTYPE_Q8_0, w, m, k, data[T_Q8_0]), "quantize Q8_0");
    check(cp_backend_quantize(bes[n_be - 1], CP_DTYPE_F16, w, m, k, data[T_F16]), "quantize F16");
    free(w);
    int max_n = 1;
    for (int b = 0; b < o->n_batches; b++)
        if (o->batches[b] > max_n) max_n = o->batches[b];
    float *x = xmalloc((size_t)max_n * (size_t)k * sizeof(float));
    float *y = xmalloc((size_t)max_n * (size_t)m * sizeof(float));
    for (size_t i = 0; i < (size_t)max_n * (size_t)k; i++) x[i] = rng_normal(1.0f);
    for (int b = 0; b < o->n_batches; b++)
        for (int e = 0; e < n_be; e++) {
            const int n = o->batches[b];
            double t[N_TYPES];
            cp_tensor wt[N_TYPES];
            for (int ty = 0; ty < N_TYPES; ty++) wt[ty] = cp_tensor_2d(kTypes[ty], m, k, data[ty]);
            time_types(bes[e], wt, x, n, y, o, t);
            printf("| %lld x %lld (%s) | %d | %d |", (long long)m, (long long)k, s->what, n,
                   cp_backend_n_threads(bes[e]));
            for (int ty = 0; ty < N_TYPES; ty++)
                printf(" %.3f | %.1f |", t[ty] * 1e3, (double)bytes[ty] / t[ty] / 1e9);
            printf(" %.2fx |\n", t[T_Q8_0] / t[T_S24]);
            fflush(stdout);
        }
    for (int t = 0; t < N_TYPES; t++) free(data[t]);
    free(x);
    free(y);
}

static bool parse_int(const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (!s[0] || (*end && *end != ',') || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

static int parse_args(int argc, char **argv, opts *o) {
    *o = (opts){.reps = 7, .max_threads = 2, .batches = {1, 16, 64}, .n_batches = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--reps") && v && parse_int(v, 1, 100000, &o->reps)) {
            i++;
        } else if (!strcmp(a, "--threads") && v && parse_int(v, 1, 64, &o->max_threads)) {
            i++;
        } else if (!strcmp(a, "--batches") && v) {
            o->n_batches = 0;
            for (const char *p = v; *p && o->n_batches < 8;) {
                if (!parse_int(p, 1, 4096, &o->batches[o->n_batches++])) {
                    fprintf(stderr, "bench_sparse: bad batch list '%s'\n", v);
                    return 2;
                }
                p = strchr(p, ',');
                if (!p) break;
                p++;
            }
            i++;
        } else if (!strcmp(a, "--hot")) {
            o->hot = true;
        } else if (!strcmp(a, "--small")) {
            o->small_only = true;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "bench_sparse: unknown, incomplete or invalid option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    return 0;
}

static void cpu_name(char *out, size_t n) {
    snprintf(out, n, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        const char *c = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && c) {
            snprintf(out, n, "%s", c + 2);
            out[strcspn(out, "\n")] = '\0';
            break;
        }
    }
    fclose(f);
}

int main(int argc, char **argv) {
    opts o;
    if (parse_args(argc, argv, &o)) return 2;
    flush_buf = xmalloc(FLUSH_BYTES);
    memset(flush_buf, 0, FLUSH_BYTES);
    cp_backend_t bes[8];
    int n_be = 0;
    for (int t = 1; t <= o.max_threads && n_be < 8; t *= 2) check(cp_backend_cpu_init(t, &bes[n_be++]), "cpu backend");
    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    printf("CPU: %s, SIMD: %s; weights %s between calls; best of %d calls\n\n", cpu, cp_cpu_simd_level(),
           o.hot ? "kept in cache" : "flushed from the caches", o.reps);
    printf("memcpy (bytes read + written per second):");
    for (int e = 0; e < n_be; e++)
        printf(" %d thread%s %.1f GB/s%s", cp_backend_n_threads(bes[e]), cp_backend_n_threads(bes[e]) > 1 ? "s" : "",
               memcpy_gbs(cp_backend_n_threads(bes[e]), 5), e + 1 < n_be ? "," : "\n\n");
    printf("| shape (m x k) | batch | threads | F16 ms | F16 GB/s | Q8_0 ms | Q8_0 GB/s | S24_Q8 ms "
           "| S24_Q8 GB/s | S24_Q8 vs Q8_0 |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    const int n_shapes = (int)(sizeof kShapes / sizeof kShapes[0]);
    for (int s = 0; s < n_shapes; s++) {
        if (o.small_only && kShapes[s].k > 2048) continue;
        run_shape(&kShapes[s], bes, n_be, &o);
    }
    for (int e = 0; e < n_be; e++) cp_backend_free(bes[e]);
    free(flush_buf);
    return 0;
}
