/* backend_cpu.c - the CPU backend: its context (thread pool, workspace,
 * vector primitives), the operation table and the threaded fast paths. Each
 * op has a readable twin in ops_ref.c, used instead when CP_CPU_FORCE_REF=1.
 * Calls on one backend must come from one thread at a time (one stream). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../cp_backend_impl.h"
#include "cpu_quants.h"
#include "cpu_ref.h"
#include "quants_sparse.h"
#include "threadpool.h"

typedef struct cpu_backend {
    struct cp_backend base; /* first: cp_backend_t points here */
    int n_threads;
    bool force_ref;
    cp_threadpool *pool;
    const cp_cpu_vec_ops *vec;
    /* Scratch shared by the ops (quantized activations, per-thread
     * attention/rope/sampling buffers). It only grows, so a steady decode
     * loop allocates nothing after its first step. */
    void *ws;
    size_t ws_size;
} cpu_backend;

static cpu_backend *cpu_of(cp_backend_t be) {
    return (cpu_backend *)be;
}

static cp_status ws_reserve(cpu_backend *cpu, size_t bytes, void **out) {
    if (bytes > cpu->ws_size) {
        /* Round up so that slowly growing requests do not reallocate often. */
        size_t want = bytes + bytes / 4 + 4096;
        void *p = NULL;
        CP_CHECK(cp_aligned_alloc(&p, want));
        cp_aligned_free(cpu->ws);
        cpu->ws = p;
        cpu->ws_size = want;
    }
    *out = cpu->ws;
    return CP_OK;
}

static size_t align64(size_t n) {
    return (n + 63) & ~(size_t)63;
}

/* ---- portable vector primitives (used when AVX2 is not available) ------ */

static float gen_dot_f32(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}
static float gen_dot_f16(const float *a, const cp_fp16_t *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * cp_fp16_to_fp32(b[i]);
    return s;
}
static void gen_axpy_f32(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}
static void gen_axpy_f16(float *y, float a, const cp_fp16_t *x, int n) {
    for (int i = 0; i < n; i++)
        y[i] += a * cp_fp16_to_fp32(x[i]);
}
static void gen_scale(float *y, float a, int n) {
    for (int i = 0; i < n; i++)
        y[i] *= a;
}
static float gen_sumsq(const float *x, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}
static void gen_mul_scaled(float *out, const float *x, float s, const float *w, int n) {
    for (int i = 0; i < n; i++)
        out[i] = x[i] * s * w[i];
}
static float gen_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > m) m = x[i];
    return m;
}
static float gen_exp_sum(float *x, float m, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}
static void gen_add(float *y, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}
static void gen_swiglu(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}
static void gen_f32_to_f16(cp_fp16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i++)
        dst[i] = cp_fp32_to_fp16(src[i]);
}

static void gen_div(float *y, const float *x, float d, int n) {
    for (int i = 0; i < n; i++)
        y[i] = x[i] / d;
}
static int gen_first_greater(const float *x, int n, float t) {
    for (int i = 0; i < n; i++)
        if (x[i] > t) return i;
    return n;
}

static const cp_cpu_vec_ops generic_ops = {
    /* .name = */ "scalar",
    /* .dot_f32 = */ gen_dot_f32,
    /* .dot_f16 = */ gen_dot_f16,
    /* .axpy_f32 = */ gen_axpy_f32,
    /* .axpy_f16 = */ gen_axpy_f16,
    /* .scale = */ gen_scale,
    /* .sumsq = */ gen_sumsq,
    /* .mul_scaled = */ gen_mul_scaled,
    /* .max = */ gen_max,
    /* .exp_sum = */ gen_exp_sum,
    /* .add = */ gen_add,
    /* .swiglu = */ gen_swiglu,
    /* .f32_to_f16 = */ gen_f32_to_f16,
    /* .div = */ gen_div,
    /* .first_greater = */ gen_first_greater,
};

const cp_cpu_vec_ops *cp_cpu_vec_ops_generic(void) {
    return &generic_ops;
}

/* ---- splitting a range of work over the pool --------------------------- */

typedef void (*range_fn)(void *ctx, size_t i0, size_t i1, int thread);

struct range_job {
    range_fn fn;
    void *ctx;
    size_t n, chunk;
};

static void range_task(void *vctx, int task, int thread) {
    struct range_job *j = vctx;
    size_t i0 = (size_t)task * j->chunk;
    size_t i1 = i0 + j->chunk < j->n ? i0 + j->chunk : j->n;
    j->fn(j->ctx, i0, i1, thread);
}

/* Runs fn over [0, n) in chunks of at least min_chunk items, about four
 * chunks per thread so that uneven threads still balance. Runs inline when
 * the work is too small to be worth a hand-off. */
static void parallel_range(cpu_backend *cpu, size_t n, size_t min_chunk, range_fn fn, void *ctx) {
    if (n == 0) return;
    size_t chunk = (n + (size_t)cpu->n_threads * 4 - 1) / ((size_t)cpu->n_threads * 4);
    if (chunk < min_chunk) chunk = min_chunk;
    if (cpu->n_threads == 1 || chunk >= n) {
        fn(ctx, 0, n, 0);
        return;
    }
    struct range_job j = {fn, ctx, n, chunk};
    cp_threadpool_parallel_for(cpu->pool, (int)((n + chunk - 1) / chunk), range_task, &j);
}

/* ---- backend basics ----------------------------------------------------- */

static void cpu_free(cp_backend_t be) {
    cpu_backend *cpu = cpu_of(be);
    cp_threadpool_free(cpu->pool);
    cp_aligned_free(cpu->ws);
    free(cpu);
}

static bool cpu_supports(cp_backend_t be, cp_dtype t) {
    (void)be;
    return cp_cpu_supports(t);
}

static cp_status cpu_alloc(cp_backend_t be, size_t bytes, void **out) {
    (void)be;
    return cp_aligned_alloc(out, bytes);
}

static void cpu_dealloc(cp_backend_t be, void *p) {
    (void)be;
    cp_aligned_free(p);
}

static cp_status cpu_copy(cp_backend_t be, void *dst, const void *src, size_t bytes,
                          cp_copy_kind kind) {
    (void)be;
    (void)kind; /* host memory on both sides whatever the kind */
    memmove(dst, src, bytes);
    return CP_OK;
}

static cp_status cpu_memset(cp_backend_t be, void *dst, int value, size_t bytes) {
    (void)be;
    memset(dst, value, bytes);
    return CP_OK;
}

static cp_status cpu_synchronize(cp_backend_t be) {
    (void)be; /* every op has finished when it returns */
    return CP_OK;
}

static int cpu_n_threads(cp_backend_t be) {
    return cpu_of(be)->n_threads;
}

/* ---- matmul ------------------------------------------------------------- */

/* Weight rows per tile: a tile stays in L2 while every activation row of the
 * batch is dotted with it (16 rows of a 4096-wide Q4_1 matrix are 40 KiB). */
#define MM_TILE_ROWS 16

/* From this batch on, S24_Q8 weights are repacked a tile at a time (see
 * quants_sparse.h): the work that depends on the weights alone is then done
 * once per tile instead of once per activation row, and the results are
 * those of the one-row kernel bit for bit. */
#define MM_REPACK_MIN_BATCH 2

struct mm_job {
    cp_vec_dot_fn vec_dot;
    cp_vec_dot2_fn vec_dot2; /* optional: two weight rows per activation pass */
    cp_vec_dot22_fn vec_dot22; /* optional: two weight rows x two activation rows */
    const char *w; /* [m] rows of w_stride bytes */
    size_t w_stride;
    /* NULL, or how S24_Q8 weight rows are repacked into tile rows of
     * tile_stride bytes (tile: [n_threads][MM_TILE_ROWS] rows), each then
     * multiplied with every activation row in one call */
    const cp_cpu_s24_repack *repack;
    char *tile;
    size_t tile_stride;
    const char *xq; /* [n] activation rows of xq_stride bytes (vec_dot_type) */
    size_t xq_stride;
    int n;
    int64_t k, m;
    float *y; /* [n][m] */
    const float *bias;
    const cp_cpu_type_traits *xtr; /* activation quantizer (quantize step) */
    const float *x;
    char *xq_out;
};

/* Every y[i][r] is one vec_dot of a fixed pair of rows, so the result does
 * not depend on how rows are split over threads. */
static void mm_rows(void *vctx, size_t r0, size_t r1, int thread) {
    const struct mm_job *j = vctx;
    for (size_t t0 = r0; t0 < r1; t0 += MM_TILE_ROWS) {
        size_t t1 = t0 + MM_TILE_ROWS < r1 ? t0 + MM_TILE_ROWS : r1;
        if (j->repack) {
            char *tile = j->tile + (size_t)thread * MM_TILE_ROWS * j->tile_stride;
            for (size_t r = t0; r < t1; r++)
                j->repack->pack(j->w + r * j->w_stride, tile + (r - t0) * j->tile_stride, j->k);
            for (size_t r = t0; r < t1; r++) {
                j->repack->vec_dot_rows(j->k, j->y + r, (size_t)j->m, tile + (r - t0) * j->tile_stride, j->xq,
                                        j->xq_stride, j->n);
                if (j->bias)
                    for (int i = 0; i < j->n; i++) j->y[(size_t)i * (size_t)j->m + r] += j->bias[r];
            }
            continue;
        }
        int i = 0;
        if (j->vec_dot22)
            /* two activation rows at a time; an odd last one below */
            for (; i + 1 < j->n; i += 2) {
                const char *x0 = j->xq + (size_t)i * j->xq_stride, *x1 = x0 + j->xq_stride;
                float *y0 = j->y + (size_t)i * (size_t)j->m, *y1 = y0 + j->m;
                size_t r = t0;
                for (; r + 1 < t1; r += 2) {
                    float s4[4];
                    j->vec_dot22(j->k, s4, j->w + r * j->w_stride, j->w + (r + 1) * j->w_stride, x0, x1);
                    y0[r] = j->bias ? s4[0] + j->bias[r] : s4[0];
                    y0[r + 1] = j->bias ? s4[1] + j->bias[r + 1] : s4[1];
                    y1[r] = j->bias ? s4[2] + j->bias[r] : s4[2];
                    y1[r + 1] = j->bias ? s4[3] + j->bias[r + 1] : s4[3];
                }
                for (; r < t1; r++) {
                    float s0, s1;
                    j->vec_dot(j->k, &s0, j->w + r * j->w_stride, x0);
                    j->vec_dot(j->k, &s1, j->w + r * j->w_stride, x1);
                    y0[r] = j->bias ? s0 + j->bias[r] : s0;
                    y1[r] = j->bias ? s1 + j->bias[r] : s1;
                }
            }
        for (; i < j->n; i++) {
            const char *xi = j->xq + (size_t)i * j->xq_stride;
            float *yi = j->y + (size_t)i * (size_t)j->m;
            size_t r = t0;
            if (j->vec_dot2)
                for (; r + 1 < t1; r += 2) {
                    float s2[2];
                    j->vec_dot2(j->k, s2, j->w + r * j->w_stride, j->w + (r + 1) * j->w_stride, xi);
                    yi[r] = j->bias ? s2[0] + j->bias[r] : s2[0];
                    yi[r + 1] = j->bias ? s2[1] + j->bias[r + 1] : s2[1];
                }
            for (; r < t1; r++) {
                float s;
                j->vec_dot(j->k, &s, j->w + r * j->w_stride, xi);
                yi[r] = j->bias ? s + j->bias[r] : s;
            }
        }
    }
}

static void mm_quantize_rows(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct mm_job *j = vctx;
    for (size_t i = i0; i < i1; i++)
        j->xtr->from_float(j->x + i * (size_t)j->k, j->xq_out + i * j->xq_stride, j->k);
}

static cp_status cpu_matmul(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y,
                            const float *bias) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_matmul_ref(w, x, n, y, bias);
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(w->dtype);
    struct mm_job j;
    j.vec_dot = tr->vec_dot;
    j.vec_dot2 = tr->vec_dot2;
    j.vec_dot22 = tr->vec_dot22;
    j.w = w->data;
    j.w_stride = w->nb[1];
    j.n = n;
    j.k = w->ne[0];
    j.m = w->ne[1];
    j.y = y;
    j.bias = bias;
    j.x = x;
    j.repack = NULL;
    j.tile = NULL;
    j.tile_stride = 0;
    if (tr->vec_dot_type == CP_DTYPE_F32) {
        j.xq = (const char *)x;
        j.xq_stride = (size_t)j.k * sizeof(float);
    } else {
        /* Quantize each activation row once; every weight row reuses it. */
        j.xtr = cp_cpu_get_type_traits(tr->vec_dot_type);
        if (!j.xtr || !j.xtr->from_float)
            return CP_ERROR(CP_ERR_INTERNAL, "matmul: no quantizer for %s activations",
                            cp_dtype_name(tr->vec_dot_type));
        j.xq_stride = cp_dtype_row_size(tr->vec_dot_type, j.k);
        if (j.xq_stride == 0)
            return CP_ERROR(CP_ERR_INVALID_ARG, "matmul: row length %lld does not fit %s blocks",
                            (long long)j.k, cp_dtype_name(tr->vec_dot_type));
        const size_t xq_bytes = align64(j.xq_stride * (size_t)n);
        size_t tile_bytes = 0;
        const cp_cpu_s24_repack *rp = w->dtype == CP_DTYPE_S24_Q8 ? cp_cpu_s24_q8_repack() : NULL;
        if (rp && n >= MM_REPACK_MIN_BATCH) {
            j.repack = rp;
            j.tile_stride = align64(rp->row_size(j.k));
            tile_bytes = (size_t)cpu->n_threads * MM_TILE_ROWS * j.tile_stride;
        }
        void *ws;
        CP_CHECK(ws_reserve(cpu, xq_bytes + tile_bytes, &ws));
        j.xq_out = ws;
        j.xq = ws;
        if (tile_bytes) j.tile = (char *)ws + xq_bytes;
        parallel_range(cpu, (size_t)n, 4, mm_quantize_rows, &j);
    }
    /* Hand off only when a thread gets at least ~32k multiply-adds. */
    size_t min_rows = (size_t)(32768 / ((int64_t)n * j.k) + 1);
    parallel_range(cpu, (size_t)j.m, min_rows, mm_rows, &j);
    return CP_OK;
}

/* ---- rmsnorm, softmax, add, swiglu --------------------------------------- */

struct rows_job {
    const cp_cpu_vec_ops *vec;
    float *out;
    const float *x, *w;
    int dim;
    float eps;
};

/* Sum of squares in fp32 (8-lane partial sums, so its error is far below
 * the fp32 rounding of the output for any realistic dim). */
static void rmsnorm_rows(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct rows_job *j = vctx;
    for (size_t i = i0; i < i1; i++) {
        const float *xi = j->x + i * (size_t)j->dim;
        float ss = j->vec->sumsq(xi, j->dim);
        float s = 1.0f / sqrtf(ss / (float)j->dim + j->eps);
        j->vec->mul_scaled(j->out + i * (size_t)j->dim, xi, s, j->w, j->dim);
    }
}

static cp_status cpu_rmsnorm(cp_backend_t be, float *out, const float *x, const float *w, int n,
                             int dim, float eps) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_rmsnorm_ref(out, x, w, n, dim, eps);
    struct rows_job j = {cpu->vec, out, x, w, dim, eps};
    parallel_range(cpu, (size_t)n, (size_t)(16384 / dim + 1), rmsnorm_rows, &j);
    return CP_OK;
}

static void softmax_rows(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct rows_job *j = vctx;
    const int dim = j->dim;
    for (size_t i = i0; i < i1; i++) {
        float *xi = j->out + i * (size_t)dim;
        float m = j->vec->max(xi, dim);
        if (m == -INFINITY) { /* all -inf: the limit of equal logits */
            for (int d = 0; d < dim; d++)
                xi[d] = 1.0f / (float)dim;
            continue;
        }
        float sum = j->vec->exp_sum(xi, m, dim);
        j->vec->scale(xi, 1.0f / sum, dim);
    }
}

static cp_status cpu_softmax(cp_backend_t be, float *x, int n, int dim) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_softmax_ref(x, n, dim);
    struct rows_job j = {cpu->vec, x, NULL, NULL, dim, 0.0f};
    parallel_range(cpu, (size_t)n, (size_t)(16384 / dim + 1), softmax_rows, &j);
    return CP_OK;
}

struct elem_job {
    const cp_cpu_vec_ops *vec;
    float *y;
    const float *a, *b;
};

static void add_range(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct elem_job *j = vctx;
    j->vec->add(j->y + i0, j->a + i0, j->b + i0, i1 - i0);
}

static void swiglu_range(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct elem_job *j = vctx;
    j->vec->swiglu(j->y + i0, j->a + i0, j->b + i0, i1 - i0);
}

/* Element-wise ops are memory bound: split only large arrays. */
#define ELEM_MIN_CHUNK 16384

static cp_status cpu_add(cp_backend_t be, float *y, const float *a, const float *b, size_t n) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_add_ref(y, a, b, n);
    struct elem_job j = {cpu->vec, y, a, b};
    parallel_range(cpu, n, ELEM_MIN_CHUNK, add_range, &j);
    return CP_OK;
}

static cp_status cpu_swiglu(cp_backend_t be, float *out, const float *gate, const float *up,
                            size_t n) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_swiglu_ref(out, gate, up, n);
    struct elem_job j = {cpu->vec, out, gate, up};
    parallel_range(cpu, n, ELEM_MIN_CHUNK / 4, swiglu_range, &j);
    return CP_OK;
}

/* ---- rope --------------------------------------------------------------- */

struct rope_job {
    float *x;
    const int32_t *pos;
    int n_head;
    const cp_rope_params *rp;
    const double *inv_freq; /* [rot_dim/2], freq_scale and freq_factors folded in */
    float *cs;              /* per thread: [rot_dim/2] cos then [rot_dim/2] sin */
    size_t cs_stride;       /* floats per thread */
};

/* Angles and their sin/cos in double (see cp_rope_ref), computed once per
 * token and shared by its heads; the rotation itself is fp32. */
static void rope_tokens(void *vctx, size_t t0, size_t t1, int thread) {
    const struct rope_job *j = vctx;
    const cp_rope_params *rp = j->rp;
    const int half = rp->rot_dim / 2, hd = rp->head_dim;
    float *c = j->cs + (size_t)thread * j->cs_stride, *s = c + half;
    const int stride_a = rp->mode == CP_ROPE_INTERLEAVED ? 2 : 1;
    const int off_b = rp->mode == CP_ROPE_INTERLEAVED ? 1 : half;
    for (size_t t = t0; t < t1; t++) {
        for (int i = 0; i < half; i++) {
            double a = (double)j->pos[t] * j->inv_freq[i];
            c[i] = (float)cos(a);
            s[i] = (float)sin(a);
        }
        for (int h = 0; h < j->n_head; h++) {
            float *xh = j->x + (t * (size_t)j->n_head + (size_t)h) * (size_t)hd;
            for (int i = 0; i < half; i++) {
                float *pa = xh + i * stride_a, *pb = pa + off_b;
                float a = *pa, b = *pb;
                *pa = a * c[i] - b * s[i];
                *pb = a * s[i] + b * c[i];
            }
        }
    }
}

static cp_status cpu_rope(cp_backend_t be, float *x, const int32_t *pos, int n_tok, int n_head,
                          const cp_rope_params *rp) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_rope_ref(x, pos, n_tok, n_head, rp);
    const int half = rp->rot_dim / 2;
    struct rope_job j = {x, pos, n_head, rp, NULL, NULL, 0};
    j.cs_stride = align64((size_t)2 * (size_t)half * sizeof(float)) / sizeof(float);
    size_t if_bytes = align64((size_t)half * sizeof(double));
    void *ws;
    CP_CHECK(ws_reserve(cpu, if_bytes + (size_t)cpu->n_threads * j.cs_stride * sizeof(float), &ws));
    double *inv_freq = ws;
    for (int i = 0; i < half; i++) {
        inv_freq[i] = (double)rp->freq_scale * pow((double)rp->theta, -2.0 * i / rp->rot_dim);
        if (rp->freq_factors) inv_freq[i] /= rp->freq_factors[i];
    }
    j.inv_freq = inv_freq;
    j.cs = (float *)((char *)ws + if_bytes);
    parallel_range(cpu, (size_t)n_tok, (size_t)(4096 / ((size_t)n_head * (size_t)rp->head_dim) + 1),
                   rope_tokens, &j);
    return CP_OK;
}

/* ---- KV cache and attention --------------------------------------------- */

/* Element offset of the cache row of (sequence seq, slot pos, kv head). */
static size_t kv_offset(const cp_attn_params *p, int seq, int pos, int kvh) {
    int block =
        p->block_tables[(size_t)seq * (size_t)p->max_blocks + (size_t)(pos / p->block_size)];
    size_t slot = (size_t)block * (size_t)p->block_size + (size_t)(pos % p->block_size);
    return (slot * (size_t)p->n_head_kv + (size_t)kvh) * (size_t)p->head_dim;
}

static cp_status cpu_kv_store(cp_backend_t be, const cp_attn_params *p, const float *k,
                              const float *v, void *k_cache, void *v_cache) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_kv_store_ref(p, k, v, k_cache, v_cache);
    CP_CHECK(cp_cpu_check_tokens(p, "kv_store"));
    CP_CHECK(cp_cpu_check_held(p, "kv_store"));
    const int hd = p->head_dim;
    const size_t kv_dim = (size_t)p->n_head_kv * (size_t)hd;
    const bool quant = cp_kv_quantized(p->kv_dtype);
    const cp_cpu_type_traits *tr = quant ? cp_cpu_get_type_traits(p->kv_dtype) : NULL;
    const size_t rb = quant ? cp_dtype_row_size(p->kv_dtype, hd) : 0;
    for (int t = 0; t < p->n_tok; t++) {
        /* The heads of one slot are contiguous in the cache as in k and v. */
        size_t off = kv_offset(p, p->seq_of_tok[t], cp_attn_slot(p, p->pos_of_tok[t]), 0);
        const float *kt = k + (size_t)t * kv_dim, *vt = v + (size_t)t * kv_dim;
        if (quant) {
            /* one row of codes and its scale per head */
            for (int h = 0; h < p->n_head_kv; h++) {
                size_t row = off / (size_t)hd + (size_t)h;
                tr->from_float(kt + (size_t)h * hd, (char *)k_cache + row * rb, hd);
                tr->from_float(vt + (size_t)h * hd, (char *)v_cache + row * rb, hd);
            }
        } else if (p->kv_dtype == CP_DTYPE_F16) {
            cpu->vec->f32_to_f16((cp_fp16_t *)k_cache + off, kt, (int)kv_dim);
            cpu->vec->f32_to_f16((cp_fp16_t *)v_cache + off, vt, (int)kv_dim);
        } else {
            memcpy((float *)k_cache + off, kt, kv_dim * sizeof(float));
            memcpy((float *)v_cache + off, vt, kv_dim * sizeof(float));
        }
    }
    return CP_OK;
}

/* Keys scored per step of the streaming softmax: one rescale of the
 * accumulators per chunk instead of per key, and exp over a whole chunk. */
#define ATTN_CHUNK 64

struct attn_job {
    const cp_attn_params *p;
    const cp_cpu_vec_ops *vec;
    const float *q;
    const void *k_cache, *v_cache;
    float *out;
    int n_rep;             /* query heads per KV head */
    int group;             /* query heads per task, a divisor of n_rep */
    float *scratch;        /* per thread: acc[group][head_dim], s[group][ATTN_CHUNK], m, l,
                              then [group][max_ranges][head_dim + 2] range results, then
                              one dequantized K/V row [head_dim] (quantized caches) */
    size_t scratch_stride; /* floats per thread */
    int max_ranges;        /* context ranges of the longest token */
    const cp_cpu_type_traits *kv_tr; /* a quantized cache's rows (NULL: F32 / F16) */
    size_t kv_rb;          /* bytes of one quantized K/V row */
    int n_split;           /* tasks per (token, head group): 1, or max_ranges (one range each) */
    float *part;           /* n_split > 1: [n_tok][n_head][n_split][head_dim + 2] acc, m, l */
};

/* The context of a token is always cut into ranges of this many positions:
 * each range gets its own streaming softmax (acc, m, l), then the ranges are
 * merged. Decode of a few sequences runs each range as its own task to keep
 * the threads busy (split-K); otherwise one task runs all ranges of a token.
 * Either way a token's arithmetic is the same whatever else is in the batch
 * and however many threads run it, so a request gives the same logits alone
 * and in a crowd. */
#define ATTN_SPLIT 256
#define ATTN_SPLIT_MAX_TASKS 8 /* one task per range when n_tok * n_head_kv is at most this */

/* o[hd] = the merge of n range results pp[n][hd + 2] (acc, m, l): the
 * accumulators and sums rescaled to the largest running max of the
 * non-empty ranges, in range order. */
static void attn_merge_ranges(const float *pp, int n, int hd, float *o, float *lse) {
    float m = -INFINITY;
    for (int s = 0; s < n; s++)
        if (pp[s * (hd + 2) + hd + 1] > 0 && pp[s * (hd + 2) + hd] > m) m = pp[s * (hd + 2) + hd];
    float l = 0;
    memset(o, 0, (size_t)hd * sizeof(float));
    if (m == -INFINITY) { /* no key (context parallelism: none held here) */
        if (lse) *lse = -INFINITY;
        return;
    }
    for (int s = 0; s < n; s++) {
        const float *ps = pp + s * (hd + 2);
        if (!(ps[hd + 1] > 0)) continue;
        const float w = expf(ps[hd] - m);
        l += ps[hd + 1] * w;
        for (int d = 0; d < hd; d++)
            o[d] += ps[d] * w;
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < hd; d++)
        o[d] *= inv;
    if (lse) *lse = m + logf(l);
}

/* One task = one token and a group of query heads that share one KV head,
 * so each key and value row is read once for the whole group, over one
 * context range (split-K) or all of them. Every head's arithmetic is the
 * same whatever the grouping. Streaming softmax in fp32 inside a range:
 * running max m, running sum l, accumulator rescaled by exp(m_old - m_new)
 * when the max grows. */
static void attn_task(void *vctx, int task, int thread) {
    const struct attn_job *j = vctx;
    const cp_attn_params *p = j->p;
    const cp_cpu_vec_ops *vec = j->vec;
    const int split = task % j->n_split;
    task /= j->n_split;
    const int hd = p->head_dim, n_rep = j->group, groups = p->n_head / n_rep;
    const int t = task / groups, h0 = (task % groups) * n_rep, kvh = h0 / j->n_rep;
    const int seq = p->seq_of_tok[t], n_pos = cp_attn_n_keys(p, p->pos_of_tok[t]);
    const int n_ranges = (n_pos + ATTN_SPLIT - 1) / ATTN_SPLIT;
    const bool f16 = p->kv_dtype == CP_DTYPE_F16;

    float *acc = j->scratch + (size_t)thread * j->scratch_stride;
    float *sc = acc + (size_t)n_rep * (size_t)hd;
    float *mx = sc + (size_t)n_rep * ATTN_CHUNK;
    float *sum = mx + n_rep;
    float *ranges = sum + n_rep; /* [n_rep][max_ranges][hd + 2] */
    float *kvrow = ranges + (j->n_split > 1 ? 0 : (size_t)n_rep * (size_t)j->max_ranges * (size_t)(hd + 2));
    const float *qg = j->q + ((size_t)t * (size_t)p->n_head + (size_t)h0) * (size_t)hd;

    /* this task's ranges: its own one (split-K; possibly empty), or all */
    const int r_first = j->n_split > 1 ? split : 0;
    const int r_end = j->n_split > 1 ? split + 1 : n_ranges;
    for (int rg = r_first; rg < r_end; rg++) {
        const int c0 = rg * ATTN_SPLIT;
        const int n_ctx = c0 + ATTN_SPLIT < n_pos ? c0 + ATTN_SPLIT : n_pos;
        memset(acc, 0, (size_t)n_rep * (size_t)hd * sizeof(float));
        for (int r = 0; r < n_rep; r++) {
            mx[r] = -INFINITY;
            sum[r] = 0.0f;
        }
        for (int j0 = c0; j0 < n_ctx; j0 += ATTN_CHUNK) {
            const int jn = n_ctx - j0 < ATTN_CHUNK ? n_ctx - j0 : ATTN_CHUNK;
            for (int jj = 0; jj < jn; jj++) {
                size_t off = kv_offset(p, seq, j0 + jj, kvh);
                const float *krow = (const float *)j->k_cache + off;
                if (j->kv_tr) {
                    j->kv_tr->to_float((const char *)j->k_cache + off / (size_t)hd * j->kv_rb, kvrow, hd);
                    krow = kvrow;
                }
                for (int r = 0; r < n_rep; r++) {
                    const float *qr = qg + (size_t)r * (size_t)hd;
                    float d = f16 ? vec->dot_f16(qr, (const cp_fp16_t *)j->k_cache + off, hd)
                                  : vec->dot_f32(qr, krow, hd);
                    sc[r * ATTN_CHUNK + jj] = d * p->scale;
                }
            }
            for (int r = 0; r < n_rep; r++) {
                float *sr = sc + r * ATTN_CHUNK;
                float cm = vec->max(sr, jn);
                if (cm > mx[r]) {
                    /* exp(-inf) = 0 on the first chunk: acc and sum are 0 anyway. */
                    float corr = expf(mx[r] - cm);
                    if (corr != 1.0f) {
                        vec->scale(acc + (size_t)r * (size_t)hd, corr, hd);
                        sum[r] *= corr;
                    }
                    mx[r] = cm;
                }
                sum[r] += vec->exp_sum(sr, mx[r], jn);
            }
            for (int jj = 0; jj < jn; jj++) {
                size_t off = kv_offset(p, seq, j0 + jj, kvh);
                const float *vrow = (const float *)j->v_cache + off;
                if (j->kv_tr) {
                    j->kv_tr->to_float((const char *)j->v_cache + off / (size_t)hd * j->kv_rb, kvrow, hd);
                    vrow = kvrow;
                }
                for (int r = 0; r < n_rep; r++) {
                    float *ar = acc + (size_t)r * (size_t)hd;
                    float w = sc[r * ATTN_CHUNK + jj];
                    if (f16)
                        vec->axpy_f16(ar, w, (const cp_fp16_t *)j->v_cache + off, hd);
                    else
                        vec->axpy_f32(ar, w, vrow, hd);
                }
            }
        }
        /* the range's unnormalised result; an empty range leaves m = -inf, l = 0 */
        for (int r = 0; r < n_rep; r++) {
            float *pp = j->n_split > 1
                            ? j->part + (((size_t)t * (size_t)p->n_head + (size_t)h0 + (size_t)r) *
                                             (size_t)j->n_split +
                                         (size_t)split) *
                                            (size_t)(hd + 2)
                            : ranges + ((size_t)r * (size_t)j->max_ranges + (size_t)rg) * (size_t)(hd + 2);
            memcpy(pp, acc + (size_t)r * (size_t)hd, (size_t)hd * sizeof(float));
            pp[hd] = mx[r];
            pp[hd + 1] = sum[r];
        }
    }
    if (j->n_split > 1) return;
    for (int r = 0; r < n_rep; r++)
        attn_merge_ranges(ranges + (size_t)r * (size_t)j->max_ranges * (size_t)(hd + 2), n_ranges, hd,
                          j->out + ((size_t)t * (size_t)p->n_head + (size_t)h0 + (size_t)r) * (size_t)hd,
                          p->lse ? p->lse + (size_t)t * (size_t)p->n_head + (size_t)h0 + (size_t)r : NULL);
}

/* Merges the split-K partial results of every (token, head) into out. */
static void attn_merge(const struct attn_job *j) {
    const cp_attn_params *p = j->p;
    const int hd = p->head_dim;
    for (int th = 0; th < p->n_tok * p->n_head; th++)
        attn_merge_ranges(j->part + (size_t)th * (size_t)j->n_split * (size_t)(hd + 2), j->n_split, hd,
                          j->out + (size_t)th * (size_t)hd, p->lse ? p->lse + th : NULL);
}

static cp_status cpu_attention(cp_backend_t be, const cp_attn_params *p, const float *q,
                               const void *k_cache, const void *v_cache, float *out) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_attention_ref(p, q, k_cache, v_cache, out);
    CP_CHECK(cp_cpu_check_tokens(p, "attention"));
    struct attn_job j;
    j.p = p;
    j.vec = cpu->vec;
    j.q = q;
    j.k_cache = k_cache;
    j.v_cache = v_cache;
    j.out = out;
    j.n_rep = p->n_head / p->n_head_kv;
    j.group = j.n_rep;
    j.n_split = 1;
    j.part = NULL;
    j.kv_tr = cp_kv_quantized(p->kv_dtype) ? cp_cpu_get_type_traits(p->kv_dtype) : NULL;
    j.kv_rb = j.kv_tr ? cp_dtype_row_size(p->kv_dtype, p->head_dim) : 0;
    int max_keys = 1;
    for (int t = 0; t < p->n_tok; t++)
        if (cp_attn_n_keys(p, p->pos_of_tok[t]) > max_keys) max_keys = cp_attn_n_keys(p, p->pos_of_tok[t]);
    j.max_ranges = (max_keys + ATTN_SPLIT - 1) / ATTN_SPLIT;
    if (p->n_tok * p->n_head_kv <= ATTN_SPLIT_MAX_TASKS) j.n_split = j.max_ranges;
    /* Whole KV groups per task unless that leaves threads idle (decode of one
     * sequence with 3 KV heads on 16 threads): then split the groups. */
    while (j.n_split == 1 && j.group > 1 && p->n_tok * (p->n_head / j.group) < 4 * cpu->n_threads) {
        int g = j.group - 1;
        while (j.n_rep % g)
            g--;
        j.group = g;
    }
    size_t floats = (size_t)j.group * ((size_t)p->head_dim + ATTN_CHUNK + 2);
    if (j.n_split == 1) floats += (size_t)j.group * (size_t)j.max_ranges * ((size_t)p->head_dim + 2);
    floats += (size_t)p->head_dim; /* the dequantized K/V row */
    j.scratch_stride = align64(floats * sizeof(float)) / sizeof(float);
    size_t scratch_bytes = (size_t)cpu->n_threads * j.scratch_stride * sizeof(float);
    size_t part_bytes = j.n_split > 1 ? (size_t)p->n_tok * (size_t)p->n_head * (size_t)j.n_split *
                                            (size_t)(p->head_dim + 2) * sizeof(float)
                                      : 0;
    void *ws;
    CP_CHECK(ws_reserve(cpu, scratch_bytes + part_bytes, &ws));
    j.scratch = ws;
    if (part_bytes) j.part = (float *)((char *)ws + scratch_bytes);
    cp_threadpool_parallel_for(cpu->pool, p->n_tok * (p->n_head / j.group) * j.n_split, attn_task, &j);
    if (j.n_split > 1) attn_merge(&j);
    return CP_OK;
}

/* ---- embed, dequantize, quantize ----------------------------------------- */

struct conv_job {
    const cp_cpu_type_traits *tr;
    const char *src;
    size_t src_stride;
    const int32_t *ids; /* NULL: rows row0 + i */
    int64_t row0, cols;
    float *out;
    const float *in;
    char *qout;
    size_t qstride;
};

static void to_float_rows(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct conv_job *j = vctx;
    for (size_t i = i0; i < i1; i++) {
        int64_t row = j->ids ? j->ids[i] : j->row0 + (int64_t)i;
        j->tr->to_float(j->src + (size_t)row * j->src_stride, j->out + i * (size_t)j->cols,
                        j->cols);
    }
}

static void from_float_rows(void *vctx, size_t i0, size_t i1, int thread) {
    (void)thread;
    const struct conv_job *j = vctx;
    for (size_t i = i0; i < i1; i++)
        j->tr->from_float_ref(j->in + i * (size_t)j->cols, j->qout + i * j->qstride, j->cols);
}

static cp_status cpu_embed(cp_backend_t be, const cp_tensor *table, const int32_t *ids, int n,
                           float *out) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_embed_ref(table, ids, n, out);
    CP_CHECK(cp_cpu_check_ids(table, ids, n));
    struct conv_job j = {cp_cpu_get_type_traits(table->dtype),
                         table->data,
                         table->nb[1],
                         ids,
                         0,
                         table->ne[0],
                         out,
                         NULL,
                         NULL,
                         0};
    parallel_range(cpu, (size_t)n, (size_t)(65536 / j.cols + 1), to_float_rows, &j);
    return CP_OK;
}

static cp_status cpu_dequantize(cp_backend_t be, const cp_tensor *w, int64_t row0, int64_t nrows,
                                float *out) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_dequantize_ref(w, row0, nrows, out);
    struct conv_job j = {cp_cpu_get_type_traits(w->dtype),
                         w->data,
                         w->nb[1],
                         NULL,
                         row0,
                         w->ne[0],
                         out,
                         NULL,
                         NULL,
                         0};
    parallel_range(cpu, (size_t)nrows, (size_t)(65536 / j.cols + 1), to_float_rows, &j);
    return CP_OK;
}

static cp_status cpu_quantize(cp_backend_t be, cp_dtype t, const float *x, int64_t nrows,
                              int64_t cols, void *out) {
    cpu_backend *cpu = cpu_of(be);
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    if (cpu->force_ref || !tr || !tr->from_float_ref)
        return cp_quantize_ref(t, x, nrows, cols, out); /* also reports the missing quantizer */
    struct conv_job j = {tr, NULL, 0, NULL, 0, cols, NULL, x, out, cp_dtype_row_size(t, cols)};
    parallel_range(cpu, (size_t)nrows, (size_t)(16384 / cols + 1), from_float_rows, &j);
    return CP_OK;
}

/* ---- sampling ------------------------------------------------------------ */

/* Probabilities relative to the largest lie in (0, 1]; for positive floats
 * the bit pattern grows with the value, so bits >> 19 sorts them into 2032
 * buckets of 1/16 octave each (bucket 0 holds the zeros). */
#define SAMPLE_BUCKET_SHIFT 19
#define SAMPLE_BUCKETS ((0x3F800000u >> SAMPLE_BUCKET_SHIFT) + 1)

struct sample_job {
    const float *logits;
    int vocab;
    const cp_sample_params *sp;
    const float *u;
    int32_t *out;
    const cp_cpu_vec_ops *vec;
    char *scratch;
    size_t scratch_stride; /* bytes per thread */
};

/* Bytes of one thread's sampling scratch for a vocabulary of v. */
static size_t sample_scratch_bytes(int v) {
    return align64((size_t)v * 4) * 5 + align64(SAMPLE_BUCKETS * (sizeof(double) + sizeof(int)));
}

static unsigned bucket_of(float p) {
    uint32_t bits;
    memcpy(&bits, &p, sizeof bits);
    return bits >> SAMPLE_BUCKET_SHIFT;
}

/* Candidate a ranks before b: larger scaled logit, lower id on ties. */
static bool ranks_before(const float *z, int32_t a, int32_t b) {
    return z[a] > z[b] || (z[a] == z[b] && a < b);
}

/* Binary heap over id[0..n) (with prob[] moved alongside when not NULL).
 * best_on_top: the best-ranked candidate at the root, else the worst. */
static void sift_down(int32_t *id, float *prob, int n, int i, const float *z, bool best_on_top) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, top = i;
        if (best_on_top) {
            if (l < n && ranks_before(z, id[l], id[top])) top = l;
            if (r < n && ranks_before(z, id[r], id[top])) top = r;
        } else {
            if (l < n && ranks_before(z, id[top], id[l])) top = l;
            if (r < n && ranks_before(z, id[top], id[r])) top = r;
        }
        if (top == i) return;
        int32_t ti = id[i];
        id[i] = id[top];
        id[top] = ti;
        if (prob) {
            float tp = prob[i];
            prob[i] = prob[top];
            prob[top] = tp;
        }
        i = top;
    }
}

/* Sorts id[0..n) (prob alongside) best first: heap sort with the worst on
 * top, each popped worst going to the back. */
static void sort_best_first(int32_t *id, float *prob, int n, const float *z) {
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_down(id, prob, n, i, z, false);
    for (int end = n - 1; end > 0; end--) {
        int32_t ti = id[0];
        float tp = prob[0];
        id[0] = id[end];
        prob[0] = prob[end];
        id[end] = ti;
        prob[end] = tp;
        sift_down(id, prob, end, 0, z, false);
    }
}

/* Copies the candidates of bucket b to gid/gprob, sorted best first. */
static int gather_bucket(const int32_t *id, const float *prob, int n, unsigned b, const float *z,
                         int32_t *gid, float *gprob) {
    int m = 0;
    for (int i = 0; i < n; i++)
        if (bucket_of(prob[i]) == b) {
            gid[m] = id[i];
            gprob[m++] = prob[i];
        }
    sort_best_first(gid, gprob, m, z);
    return m;
}

static int32_t argmax_lowest(const cp_cpu_vec_ops *vec, const float *x, int n) {
    float m = vec->max(x, n);
    for (int i = 0; i < n; i++)
        if (x[i] == m) return i;
    return 0; /* only NaNs */
}

/* The decisions of cp_sample_ref without sorting the vocabulary. Top-k uses
 * a bounded min-heap (O(V log k)). Then every candidate's probability goes
 * into a histogram of its float bits, which orders buckets exactly as the
 * sorted list is ordered, so the top-p cut, the kept mass and the draw each
 * need only the one bucket they fall into sorted. Sums are in double; they
 * add the same values as the reference in a different order (relative
 * differences ~1e-16, far below any probability that matters). */
static void sample_row(void *vctx, int row, int thread) {
    const struct sample_job *j = vctx;
    const cp_sample_params *sp = j->sp;
    const int V = j->vocab;
    const float *l = j->logits + (size_t)row * (size_t)V;
    if (!(sp->temperature > 0.0f)) { /* NaN too, as the reference */
        j->out[row] = argmax_lowest(j->vec, l, V);
        return;
    }
    char *base = j->scratch + (size_t)thread * j->scratch_stride;
    const size_t arr = align64((size_t)V * 4);
    float *z = (float *)base;
    int32_t *id = (int32_t *)(base + arr);
    float *prob = (float *)(base + 2 * arr);
    int32_t *gid = (int32_t *)(base + 3 * arr);
    float *gprob = (float *)(base + 4 * arr);
    double *bmass = (double *)(base + 5 * arr);
    int *bcount = (int *)(bmass + SAMPLE_BUCKETS);

    j->vec->div(z, l, sp->temperature, V); /* the same IEEE division as the reference */
    int n = V;
    if (sp->top_k > 0 && sp->top_k < V) {
        n = sp->top_k;
        for (int i = 0; i < n; i++)
            id[i] = i;
        for (int i = n / 2 - 1; i >= 0; i--)
            sift_down(id, NULL, n, i, z, false);
        /* Ids scanned later are larger than every id in the heap, so a tie
         * with the worst kept never displaces it: only z > worst counts. */
        for (int i = n; i < V; i++) {
            i += j->vec->first_greater(z + i, V - i, z[id[0]]);
            if (i >= V) break;
            id[0] = i;
            sift_down(id, NULL, n, 0, z, false);
        }
    } else {
        for (int i = 0; i < V; i++)
            id[i] = i;
    }
    int32_t best = id[0];
    for (int i = 1; i < n; i++)
        if (ranks_before(z, id[i], best)) best = id[i];
    const float zmax = z[best];
    if (!(zmax > -INFINITY) || zmax == INFINITY) { /* no finite distribution */
        j->out[row] = best;
        return;
    }
    memset(bmass, 0, SAMPLE_BUCKETS * sizeof *bmass);
    memset(bcount, 0, SAMPLE_BUCKETS * sizeof *bcount);
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        float p = expf(z[id[i]] - zmax); /* the best has exactly 1 */
        prob[i] = p;
        total += p;
        unsigned b = bucket_of(p);
        bmass[b] += p;
        bcount[b]++;
    }

    /* kept = how many of the best candidates survive top-p and min-p;
     * kept_mass = their probability mass. */
    int kept = n;
    double kept_mass = total;
    if (sp->top_p < 1.0f) {
        const double need = (double)sp->top_p * total;
        double cum = 0.0;
        int above = 0;
        unsigned b = SAMPLE_BUCKETS - 1;
        while (b > 0 && cum + bmass[b] < need) {
            cum += bmass[b];
            above += bcount[b];
            b--;
        }
        /* The cut falls inside bucket b (b = 0 holds only zeros: a cut
         * there would take all nonzero tokens plus the first zero). */
        int m = gather_bucket(id, prob, n, b, z, gid, gprob);
        int take = 0;
        while (take < m) {
            cum += gprob[take++];
            if (cum >= need) break;
        }
        if (above + take == 0) take = 1; /* at least one token */
        kept = above + take;
        kept_mass = cum;
    }
    if (sp->min_p > 0.0f) {
        /* Sorted by probability, so min-p keeps a prefix too: all tokens
         * with p >= min_p (p_max is 1), at least the best. */
        int cnt = 0;
        double mass = 0.0;
        for (int i = 0; i < n; i++)
            if (prob[i] >= sp->min_p) {
                cnt++;
                mass += prob[i];
            }
        if (cnt == 0) {
            cnt = 1;
            mass = 1.0;
        }
        if (cnt < kept) {
            kept = cnt;
            kept_mass = mass;
        }
    }

    /* The draw: the first of the kept candidates (best first) whose running
     * mass exceeds u * kept_mass. Buckets wholly inside the kept prefix are
     * skipped by their mass; the one holding the crossing is sorted. */
    const double target = (double)j->u[row] * kept_mass;
    double cum = 0.0;
    int seen = 0;
    for (unsigned b = SAMPLE_BUCKETS; b-- > 0;) {
        if (bcount[b] == 0) continue;
        const bool last = seen + bcount[b] >= kept; /* the kept prefix ends here */
        if (!last && cum + bmass[b] <= target) {
            cum += bmass[b];
            seen += bcount[b];
            continue;
        }
        int m = gather_bucket(id, prob, n, b, z, gid, gprob);
        int lim = last ? kept - seen : m;
        for (int i = 0; i < lim; i++) {
            cum += gprob[i];
            if (cum > target) {
                j->out[row] = gid[i];
                return;
            }
        }
        if (last) { /* rounding left the target unreached: the last kept */
            j->out[row] = gid[lim - 1];
            return;
        }
        seen += m;
    }
    j->out[row] = best; /* not reached: the kept prefix ends in some bucket */
}

static cp_status cpu_sample(cp_backend_t be, const float *logits, int n, int vocab,
                            const cp_sample_params *sp, const float *u, int32_t *out) {
    cpu_backend *cpu = cpu_of(be);
    if (cpu->force_ref) return cp_sample_ref(logits, n, vocab, sp, u, out);
    struct sample_job j = {logits, vocab, sp, u, out, cpu->vec, NULL, 0};
    if (sp->temperature > 0.0f) {
        j.scratch_stride = sample_scratch_bytes(vocab);
        /* Any thread may run a row, so every thread gets a slice. */
        int threads = n == 1 ? 1 : cpu->n_threads;
        void *ws;
        CP_CHECK(ws_reserve(cpu, (size_t)threads * j.scratch_stride, &ws));
        j.scratch = ws;
    }
    /* Rows are independent; a row of a large vocabulary is ~1 ms of work. */
    if (n == 1)
        sample_row(&j, 0, 0);
    else
        cp_threadpool_parallel_for(cpu->pool, n, sample_row, &j);
    return CP_OK;
}

/* ---- construction ------------------------------------------------------- */

static const struct cp_backend_i cpu_iface = {
    /* .name = */ "cpu",
    /* .device = */ CP_DEVICE_CPU,
    /* .free = */ cpu_free,
    /* .supports = */ cpu_supports,
    /* .alloc = */ cpu_alloc,
    /* .dealloc = */ cpu_dealloc,
    /* .copy = */ cpu_copy,
    /* .memset = */ cpu_memset,
    /* .synchronize = */ cpu_synchronize,
    /* .matmul = */ cpu_matmul,
    /* .rmsnorm = */ cpu_rmsnorm,
    /* .rope = */ cpu_rope,
    /* .kv_store = */ cpu_kv_store,
    /* .attention = */ cpu_attention,
    /* .add = */ cpu_add,
    /* .swiglu = */ cpu_swiglu,
    /* .softmax = */ cpu_softmax,
    /* .embed = */ cpu_embed,
    /* .dequantize = */ cpu_dequantize,
    /* .quantize = */ cpu_quantize,
    /* .sample = */ cpu_sample,
    /* .n_threads = */ cpu_n_threads,
    /* fused operations: the compositions in cp_backend.c */
    /* .matmul_group = */ NULL,
    /* .matmul_swiglu = */ NULL,
    /* .add_rmsnorm = */ NULL,
    /* .rope_store = */ NULL,
    /* .stream = */ NULL,
};

/* Upper bound on the thread count, far above any socket's core count; it
 * only guards against nonsense such as a negative sysconf result cast. */
#define MAX_THREADS 1024

cp_status cp_backend_cpu_init(int n_threads, cp_backend_t *out) {
    cp_status st = CP_OK;
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cpu backend: out is NULL");
    *out = NULL;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)(n < MAX_THREADS ? n : MAX_THREADS) : 1;
    }
    if (n_threads > MAX_THREADS)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cpu backend: %d threads is more than the limit of %d",
                        n_threads, MAX_THREADS);
    cpu_backend *cpu = calloc(1, sizeof *cpu);
    if (!cpu) return CP_ERROR(CP_ERR_OOM, "cpu backend: out of memory");
    cpu->base.iface = cpu_iface;
    cpu->n_threads = n_threads;
    const char *env = getenv("CP_CPU_FORCE_REF");
    cpu->force_ref = env && strcmp(env, "1") == 0;
    cpu->vec = cp_cpu_vec_ops_avx2();
    if (!cpu->vec || cpu->force_ref) cpu->vec = &generic_ops;
    CP_CHECK_GOTO(cp_threadpool_init(n_threads, &cpu->pool), st, fail);
    *out = &cpu->base;
    return CP_OK;
fail:
    cpu_free(&cpu->base);
    return st;
}
