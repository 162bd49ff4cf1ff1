/* backend_cuda.cu - the CUDA backend: one device, one stream, one cuBLASLt
 * handle and its workspace per context. GEMMs go through cuBLASLt (fp16 /
 * bf16 operands with fp32 accumulation and output, the bias fused as an
 * epilogue, algorithms cached per shape); decode-sized products through the
 * GEMV kernels; quantized weights are decoded to fp16 tiles for large
 * batches, except FP8 rows (W8A8), whose E4M3 codes go to the FP8 tensor
 * cores as they are (fp8.cu quantizes the activations). Host copies of
 * weights go through pinned staging buffers. */
#include <cublasLt.h>
#include <stdlib.h>
#include <string.h>

#include "attn_flash.h"
#include "cp_backend_impl.h"
#include "cp_cuda_ops.h"
#include "cpu/cpu_ref.h"
#include "cuda_common.cuh"
#include "cuda_graph.h"

#define CP_CUBLAS_CHECK(expr) CP_FOREIGN_CHECK_GEN(expr, CUBLAS_STATUS_SUCCESS, CP_ERR_CUBLAS, cublas_status_str)
/* FP8 GEMMs with per-row and per-column scales (outer-vector scaling) came
 * with cuBLAS 12.9 */
#define CP_LT_OUTER_VEC (CUBLAS_VERSION >= 120900)

#define LT_WORKSPACE_BYTES ((size_t)32 << 20)
#define STAGE_BYTES ((size_t)16 << 20)   /* each of the two pinned staging buffers */
#define DEQ_TILE_BYTES ((size_t)64 << 20) /* fp16 tile of a quantized weight for a GEMM */
#define GEMM_CACHE 128

static const char *cublas_status_str(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_MAPPING_ERROR: return "mapping error";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

/* What a cached GEMM configuration is made for: shape, operand types,
 * leading dimensions, pointer alignment and epilogue. */
typedef struct gemm_key {
    cudaDataType_t at, bt;
    int64_t m, n, k, lda, ldd;
    int align, has_bias, vec_scale;
} gemm_key;

static bool gemm_key_eq(const gemm_key *x, const gemm_key *y) {
    return x->at == y->at && x->bt == y->bt && x->m == y->m && x->n == y->n && x->k == y->k &&
           x->lda == y->lda && x->ldd == y->ldd && x->align == y->align && x->has_bias == y->has_bias &&
           x->vec_scale == y->vec_scale;
}

/* One cached GEMM configuration: its key, descriptors and the heuristic's
 * algorithm. */
typedef struct gemm_entry {
    bool used;
    gemm_key key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
} gemm_entry;

/* How the products of F8_ROW weights (W8A8) run at batches beyond the GEMV:
 * FP8 tensor cores with both scales applied by cuBLASLt (outer-vector
 * scaling), FP8 tensor cores with the scales applied by a kernel after, or
 * (GPUs before sm_89) fp16 tensor cores on the codes, exact in fp16. Each
 * call falls to the next when cuBLASLt has no algorithm for the shape. */
typedef enum { F8_VEC = 0, F8_SCALAR = 1, F8_F16 = 2 } f8_mode;

typedef struct cp_cuda_backend {
    struct cp_backend base;
    int device;
    char name[64];
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *lt_ws;           /* [LT_WORKSPACE_BYTES] */
    void *work;            /* activations in fp16/bf16, decoded weight tiles, attention splits */
    size_t work_bytes;
    void *stage[2];        /* pinned [STAGE_BYTES] x 2 */
    cudaEvent_t stage_ev[2];
    int *bad;              /* device flag of embed */
    int *bad_host;         /* pinned */
    cp_sampler_cuda_t sampler; /* candidates of cp_backend_sample (sample.cu) */
    int32_t *pos_host;     /* host copy of positions when n_ctx_max is unknown */
    int pos_cap;
    gemm_entry cache[GEMM_CACHE];
    int cache_next;
    bool no_flash;         /* CP_CUDA_NO_FLASH=1: the split kernel for every attention */
    f8_mode f8;            /* the first W8A8 GEMM form tried (CP_CUDA_FP8=vec|scalar|f16) */
    int64_t embed_rows;    /* an embedding ran since the last synchronisation: check bad */
    cp_cuda_graphs *graphs;  /* recorded steps (cuda_graph.h) */
    void *deferred[8];       /* device frees asked for while recording, done at graph_end */
    int n_deferred;
} cp_cuda_backend;

static cp_cuda_backend *ctx_of(cp_backend_t be) { return (cp_cuda_backend *)be; }

/* While a step is being recorded into a graph, stream work is recorded, not
 * run: a call that synchronises, allocates or copies host memory cannot be
 * part of it (and would invalidate the capture), so it fails with a clear
 * message instead; graph_end then discards the recording and the caller
 * reissues the step directly. */
static bool recording(const cp_cuda_backend *c) { return cp_cuda_graphs_capturing(c->graphs); }
#define CP_NOT_RECORDING(c, what)                                                                  \
    do {                                                                                           \
        if (recording(c))                                                                          \
            return CP_ERROR(CP_ERR_INTERNAL, "%s inside a step recorded as a CUDA graph", what);  \
    } while (0)

/* Grows the work buffer to at least bytes (the stream is drained first, so
 * no kernel still reads the old one). Recorded graphs hold the old address:
 * they are dropped. */
static cp_status ensure_work(cp_cuda_backend *c, size_t bytes) {
    if (bytes <= c->work_bytes) return CP_OK;
    CP_NOT_RECORDING(c, "workspace growth");
    cp_cuda_graphs_drop(c->graphs);
    CP_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->work) CP_CUDA_CHECK(cudaFree(c->work));
    c->work = NULL;
    c->work_bytes = 0;
    size_t want = bytes + bytes / 4;
    if (cudaMalloc(&c->work, want) != cudaSuccess) {
        (void)cudaGetLastError();
        return CP_ERROR(CP_ERR_OOM, "CUDA backend: cannot allocate %zu bytes of workspace", want);
    }
    c->work_bytes = want;
    return CP_OK;
}

/* ---- memory ---- */

static cp_status cuda_alloc(cp_backend_t be, size_t bytes, void **out) {
    CP_NOT_RECORDING(ctx_of(be), "alloc");
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        return CP_ERROR(CP_ERR_OOM, "CUDA: cannot allocate %zu bytes (%zu of %zu bytes free): %s",
                        bytes, free_b, total_b, cudaGetErrorString(e));
    }
    *out = p;
    return CP_OK;
}

static void cuda_dealloc(cp_backend_t be, void *p) {
    cp_cuda_backend *c = ctx_of(be);
    if (recording(c)) {
        /* freeing would end the capture: done at graph_end instead */
        CP_ASSERT(c->n_deferred < (int)(sizeof(c->deferred) / sizeof(c->deferred[0])));
        c->deferred[c->n_deferred++] = p;
        return;
    }
    /* a recorded graph may name this memory */
    cp_cuda_graphs_drop(c->graphs);
    cudaStreamSynchronize(c->stream);
    cudaFree(p);
}

/* Host to device through the two pinned buffers: the copy of chunk i+1 into
 * pinned memory overlaps the transfer of chunk i. */
static cp_status copy_h2d_staged(cp_cuda_backend *c, void *dst, const void *src, size_t bytes) {
    size_t off = 0;
    int i = 0;
    while (off < bytes) {
        const size_t len = bytes - off < STAGE_BYTES ? bytes - off : STAGE_BYTES;
        CP_CUDA_CHECK(cudaEventSynchronize(c->stage_ev[i]));
        memcpy(c->stage[i], (const char *)src + off, len);
        CP_CUDA_CHECK(cudaMemcpyAsync((char *)dst + off, c->stage[i], len, cudaMemcpyHostToDevice,
                                      c->stream));
        CP_CUDA_CHECK(cudaEventRecord(c->stage_ev[i], c->stream));
        off += len;
        i ^= 1;
    }
    return CP_OK;
}

static cp_status cuda_copy(cp_backend_t be, void *dst, const void *src, size_t bytes,
                           cp_copy_kind kind) {
    cp_cuda_backend *c = ctx_of(be);
    if (kind != CP_COPY_DEVICE_TO_DEVICE) CP_NOT_RECORDING(c, "a copy to or from host memory");
    switch (kind) {
    case CP_COPY_HOST_TO_DEVICE:
        if (bytes >= ((size_t)1 << 20)) return copy_h2d_staged(c, dst, src, bytes);
        CP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
        return CP_OK;
    case CP_COPY_DEVICE_TO_HOST:
        CP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
        CP_CUDA_CHECK(cudaStreamSynchronize(c->stream));
        return CP_OK;
    case CP_COPY_DEVICE_TO_DEVICE:
        CP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
        return CP_OK;
    }
    return CP_ERROR(CP_ERR_INVALID_ARG, "copy: unknown kind %d", (int)kind);
}

static cp_status cuda_memset(cp_backend_t be, void *dst, int value, size_t bytes) {
    CP_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, ctx_of(be)->stream));
    return CP_OK;
}

static cp_status cuda_synchronize(cp_backend_t be) {
    cp_cuda_backend *c = ctx_of(be);
    CP_NOT_RECORDING(c, "synchronize");
    CP_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->embed_rows) {
        CP_CUDA_CHECK(cudaMemcpy(c->bad_host, c->bad, sizeof(int), cudaMemcpyDeviceToHost));
        const int bad = *c->bad_host;
        c->embed_rows = 0;
        if (bad) {
            CP_CUDA_CHECK(cudaMemset(c->bad, 0, sizeof(int)));
            return CP_ERROR(CP_ERR_INVALID_ARG, "embed: the token id at batch row %d is outside the "
                            "table", bad - 1);
        }
    }
    return CP_OK;
}

/* The float types and the block types the kernels decode. */
static bool cuda_supports(cp_backend_t be, cp_dtype t) {
    (void)be;
    if (t == CP_DTYPE_F32 || t == CP_DTYPE_F16 || t == CP_DTYPE_BF16) return true;
#define CP_READS(T) return true
    CP_CUDA_SWITCH_BLOCK_DTYPE(t, CP_READS, return false)
#undef CP_READS
}

/* ---- GEMM through cuBLASLt ---- */

static int ptr_align(const void *p) {
    uintptr_t v = (uintptr_t)p;
    int a = 1;
    while (a < 256 && (v & (uintptr_t)a) == 0) a <<= 1;
    return a;
}

static void gemm_entry_free(gemm_entry *e) {
    if (!e->used) return;
    cublasLtMatmulDescDestroy(e->desc);
    cublasLtMatrixLayoutDestroy(e->a);
    cublasLtMatrixLayoutDestroy(e->b);
    cublasLtMatrixLayoutDestroy(e->d);
    memset(e, 0, sizeof(*e));
}

/* One cuBLASLt product d[n][ldd] (first m of each row) = b[n][k] . a^T,
 * a [m] rows of lda elements of type at. */
typedef struct lt_args {
    cudaDataType_t at, bt;
    const void *a, *b;
    float *d;
    int64_t m, n, k, lda, ldd;
    const float *bias;                /* fp32, fused as the epilogue; NULL: none */
    const float *scale_a, *scale_b;   /* fp32 [m] and [n] (outer-vector scaling); NULL: none */
} lt_args;

static cp_status gemm_entry_make(cp_cuda_backend *c, gemm_entry *e, const lt_args *g, const gemm_key *key) {
    memset(e, 0, sizeof(*e));
    const bool fp8 = g->at == CUDA_R_8F_E4M3;
    const int has_bias = key->has_bias, vec_scale = key->vec_scale, align = key->align;
    const cublasComputeType_t ct = CUBLAS_COMPUTE_32F;
    CP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&e->desc, ct, CUDA_R_32F));
    e->used = true; /* from here on gemm_entry_free releases what exists */
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (has_bias) {
        const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
        const cudaDataType_t biast = CUDA_R_32F;
        CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &biast, sizeof(biast)));
    }
    if (vec_scale) {
#if CP_LT_OUTER_VEC
        /* a library that does not take these is CP_ERR_UNSUPPORTED: the
         * caller tries the next form */
        const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        if (cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)) ||
            cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)) ||
            /* the heuristic sees the pointers it will be given */
            cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g->scale_a,
                                           sizeof(g->scale_a)) ||
            cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g->scale_b,
                                           sizeof(g->scale_b)))
            return CP_ERROR(CP_ERR_UNSUPPORTED, "this cuBLASLt takes no outer-vector scales");
#else
        return CP_ERROR(CP_ERR_UNSUPPORTED, "built with a cuBLASLt older than 12.9: no outer-vector scales");
#endif
    }
    /* column-major views: W [m][lda] row-major is k x m (op T), x is k x n, y is m x n (ld ldd) */
    CP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&e->a, g->at, (uint64_t)g->k, (uint64_t)g->m, g->lda));
    CP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&e->b, g->bt, (uint64_t)g->k, (uint64_t)g->n, g->k));
    CP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&e->d, CUDA_R_32F, (uint64_t)g->m, (uint64_t)g->n, g->ldd));
    cublasLtMatmulPreference_t pref;
    CP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = LT_WORKSPACE_BYTES;
    uint32_t al = (uint32_t)align;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, sizeof(al));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, sizeof(al));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, sizeof(al));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, sizeof(al));
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(c->lt, e->desc, e->a, e->b, e->d, e->d, pref,
                                                      1, &res, &nres);
    cublasLtMatmulPreferenceDestroy(pref);
    /* an FP8 form without an algorithm is CP_ERR_UNSUPPORTED: the caller
     * tries the next form */
    if (s != CUBLAS_STATUS_SUCCESS || nres == 0)
        return CP_ERROR(fp8 ? CP_ERR_UNSUPPORTED : CP_ERR_CUBLAS,
                        "cuBLASLt has no algorithm for a %lld x %lld x %lld GEMM (types %d/%d, "
                        "lda %lld, alignment %d%s): %s",
                        (long long)g->m, (long long)g->n, (long long)g->k, (int)g->at, (int)g->bt,
                        (long long)g->lda, align, vec_scale ? ", vector scales" : "",
                        cublas_status_str(s));
    e->algo = res.algo;
    e->key = *key;
    return CP_OK;
}

static cp_status lt_run(cp_cuda_backend *c, const lt_args *g) {
    int align = ptr_align(g->a);
    const int ab = ptr_align(g->b), ad = ptr_align(g->d);
    if (ab < align) align = ab;
    if (ad < align) align = ad;
    if (g->bias && ptr_align(g->bias) < align) align = ptr_align(g->bias);
    const int vec_scale = g->scale_a != NULL;
    const gemm_key key = {g->at, g->bt, g->m, g->n, g->k, g->lda, g->ldd, align, g->bias != NULL, vec_scale};
    gemm_entry *e = NULL;
    for (int i = 0; i < GEMM_CACHE && !e; i++)
        if (c->cache[i].used && gemm_key_eq(&c->cache[i].key, &key)) e = &c->cache[i];
    if (!e) {
        /* a slot is taken only by a configuration that works */
        gemm_entry made;
        cp_status st = gemm_entry_make(c, &made, g, &key);
        if (st != CP_OK) {
            gemm_entry_free(&made);
            return st;
        }
        e = &c->cache[c->cache_next];
        c->cache_next = (c->cache_next + 1) % GEMM_CACHE;
        gemm_entry_free(e);
        *e = made;
    }
    if (g->bias)
        CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                       &g->bias, sizeof(g->bias)));
    if (vec_scale) {
        CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                       &g->scale_a, sizeof(g->scale_a)));
        CP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                       &g->scale_b, sizeof(g->scale_b)));
    }
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t ms = cublasLtMatmul(c->lt, e->desc, &alpha, g->a, e->a, g->b, e->b, &beta, g->d,
                                             e->d, g->d, e->d, &e->algo, c->lt_ws, LT_WORKSPACE_BYTES, c->stream);
    if (ms == CUBLAS_STATUS_SUCCESS) return CP_OK;
    /* an FP8 form refused at run time: the caller tries the next one */
    return CP_ERROR(ms == CUBLAS_STATUS_NOT_SUPPORTED && g->at == CUDA_R_8F_E4M3 ? CP_ERR_UNSUPPORTED : CP_ERR_CUBLAS,
                    "cublasLtMatmul (%lld x %lld x %lld): %s (%d)", (long long)g->m, (long long)g->n,
                    (long long)g->k, cublas_status_str(ms), (int)ms);
}

/* d[n][ldd] (first m of each row) = b[n][k] . a^T with a [m][k] of type at. */
static cp_status lt_gemm(cp_cuda_backend *c, cudaDataType_t at, const void *a, cudaDataType_t bt,
                         const void *b, float *d, int64_t m, int64_t n, int64_t k, int64_t ldd,
                         const float *bias) {
    const lt_args g = {at, bt, a, b, d, m, n, k, k, ldd, bias, NULL, NULL};
    return lt_run(c, &g);
}

/* decode-sized products read the weight once in the GEMV kernels; for
 * fp16/bf16 weights cuBLASLt is as fast from 3 rows on (measured) */
static bool gemv_rows_ok(cp_dtype t, int n) {
    const bool half_w = t == CP_DTYPE_F16 || t == CP_DTYPE_BF16;
    return t != CP_DTYPE_F32 && n <= (half_w ? 2 : 8);
}

#define ALIGN256(b) (((size_t)(b) + 255) & ~(size_t)255)

/* Rows of a k-wide weight decoded per fp16 tile: the whole matrix, or as
 * many rows (a multiple of 64) as DEQ_TILE_BYTES holds. */
static int64_t tile_rows(int64_t m, int64_t k) {
    int64_t tile = m;
    if ((size_t)m * (size_t)k * 2 > DEQ_TILE_BYTES) {
        tile = (int64_t)(DEQ_TILE_BYTES / ((size_t)k * 2));
        tile = tile >= 64 ? tile / 64 * 64 : (tile > 0 ? tile : 1);
    }
    return tile;
}

/* y[n][m] (+ bias) = xh[n][k] . w^T on fp16 tensor cores, w decoded tile
 * by tile (tile rows of w) into the fp16 buffer wt by decode (the rows
 * dequantized, or FP8 rows' bare codes); xh fp16. */
typedef cp_status (*f16_decoder)(const cp_tensor *w, int64_t row0, int64_t nrows, void *out,
                                  cudaStream_t stream);
static cp_status tiled_f16_gemm(cp_cuda_backend *c, const cp_tensor *w, f16_decoder decode, const void *xh,
                                int n, float *y, const float *bias, void *wt, int64_t tile) {
    const int64_t k = w->ne[0], m = w->ne[1];
    for (int64_t r0 = 0; r0 < m; r0 += tile) {
        const int64_t rows = m - r0 < tile ? m - r0 : tile;
        CP_CHECK(decode(w, r0, rows, wt, c->stream));
        CP_CHECK(lt_gemm(c, CUDA_R_16F, wt, CUDA_R_16F, xh, y + r0, rows, n, k, m, bias ? bias + r0 : NULL));
    }
    return CP_OK;
}

/* ---- F8_ROW: W8A8 ---- */

/* The activations as the CPU reference sees them (each token's E4M3 codes
 * times its scale), at the start of the work buffer, for the GEMV kernels. */
static cp_status f8_dequant_acts(cp_cuda_backend *c, const float *x, int n, int64_t k, float **out) {
    CP_CHECK(ensure_work(c, (size_t)n * (size_t)k * sizeof(float)));
    *out = (float *)c->work;
    return cp_f8_quantize_act_cuda(x, n, k, CP_F8_ACT_DEQUANT, c->work, NULL, c->stream);
}

/* y = x . w^T for F8_ROW w beyond the GEMV: a product of codes, then both
 * scales (and the bias). The work buffer holds the activations' codes, their
 * scales [n], the weight's scales [m], and in the fp16 form a tile of the
 * weight's codes. */
static cp_status f8_gemm(cp_cuda_backend *c, const cp_tensor *w, const float *x, int n, float *y,
                         const float *bias) {
    const int64_t k = w->ne[0], m = w->ne[1];
    const size_t sxb = ALIGN256((size_t)n * 4), swb = ALIGN256((size_t)m * 4);
    f8_mode form = c->f8;
    if (k % 16 != 0 || w->nb[1] % 16 != 0) form = F8_F16; /* FP8 operands need 16-byte rows */
    if (form != F8_F16) {
        const size_t qb = ALIGN256((size_t)n * (size_t)k);
        CP_CHECK(ensure_work(c, qb + sxb + swb));
        uint8_t *q = (uint8_t *)c->work;
        float *sx = (float *)(q + qb), *sw = (float *)((char *)sx + sxb);
        CP_CHECK(cp_f8_quantize_act_cuda(x, n, k, CP_F8_ACT_CODES, q, sx, c->stream));
        CP_CHECK(cp_f8_row_scales_cuda(w, 0, m, sw, c->stream));
        for (; form != F8_F16; form = (f8_mode)(form + 1)) {
            const bool vec = form == F8_VEC;
            const lt_args g = {CUDA_R_8F_E4M3, CUDA_R_8F_E4M3, w->data, q, y, m, n, k,
                               (int64_t)w->nb[1], m, NULL, vec ? sw : NULL, vec ? sx : NULL};
            const cp_status st = lt_run(c, &g);
            if (st == CP_ERR_UNSUPPORTED) {
                /* no algorithm: the next form; outer-vector scaling is the
                 * library's and the GPU's, not the shape's: never tried again */
                if (vec) c->f8 = F8_SCALAR;
                continue;
            }
            CP_CHECK(st);
            return cp_f8_epilogue_cuda(y, n, m, m, vec ? NULL : sx, vec ? NULL : sw, bias, c->stream);
        }
    }
    /* fp16 tensor cores on the codes (exact in fp16), products in fp32 */
    const size_t qb = ALIGN256((size_t)n * (size_t)k * 2);
    const int64_t tile = tile_rows(m, k);
    CP_CHECK(ensure_work(c, qb + sxb + swb + (size_t)tile * (size_t)k * 2));
    void *q = c->work;
    float *sx = (float *)((char *)q + qb), *sw = (float *)((char *)sx + sxb);
    void *wt = (char *)sw + swb;
    CP_CHECK(cp_f8_quantize_act_cuda(x, n, k, CP_F8_ACT_CODES_F16, q, sx, c->stream));
    CP_CHECK(cp_f8_row_scales_cuda(w, 0, m, sw, c->stream));
    CP_CHECK(tiled_f16_gemm(c, w, cp_f8_codes_f16_cuda, q, n, y, NULL, wt, tile));
    return cp_f8_epilogue_cuda(y, n, m, m, sx, sw, bias, c->stream);
}

/* count F8_ROW products of one x: decode-sized batches through the GEMV
 * kernels on the activations quantized once, larger ones through f8_gemm. */
static cp_status f8_matmul(cp_cuda_backend *c, int count, const cp_tensor *const *w, const float *x,
                           int n, float *const *y, const float *const *bias) {
    for (int i = 0; i < count; i++) CP_CHECK(cuda_check_row_width(w[i]->dtype, w[i]->ne[0]));
    if (gemv_rows_ok(CP_DTYPE_F8_ROW, n)) {
        float *xq;
        CP_CHECK(f8_dequant_acts(c, x, n, w[0]->ne[0], &xq));
        const cp_status st = cp_gemv_group_cuda(count, w, xq, n, y, bias, c->stream);
        if (st != CP_ERR_UNSUPPORTED) return st;
    }
    for (int i = 0; i < count; i++) CP_CHECK(f8_gemm(c, w[i], x, n, y[i], bias ? bias[i] : NULL));
    return CP_OK;
}

static cp_status cuda_matmul(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y,
                             const float *bias) {
    cp_cuda_backend *c = ctx_of(be);
    const cp_dtype t = w->dtype;
    const int64_t k = w->ne[0], m = w->ne[1];
    if (t == CP_DTYPE_F8_ROW) return f8_matmul(c, 1, &w, x, n, &y, &bias);
    if (gemv_rows_ok(t, n)) {
        cp_status st = cp_gemv_cuda(w, x, n, y, bias, c->stream);
        if (st != CP_ERR_UNSUPPORTED) return st;
    }
    if (t == CP_DTYPE_F32) return lt_gemm(c, CUDA_R_32F, w->data, CUDA_R_32F, x, y, m, n, k, m, bias);
    const bool bf16 = t == CP_DTYPE_BF16;
    const cudaDataType_t ht = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const size_t xh_bytes = ALIGN256((size_t)n * (size_t)k * 2);
    const bool quant = t != CP_DTYPE_F16 && t != CP_DTYPE_BF16;
    const int64_t tile = tile_rows(m, k);
    CP_CHECK(ensure_work(c, xh_bytes + (quant ? (size_t)tile * (size_t)k * 2 : 0)));
    void *xh = c->work;
    CP_CHECK(cp_convert_f32_cuda(xh, x, (size_t)n * (size_t)k, bf16, c->stream));
    if (!quant) return lt_gemm(c, ht, w->data, ht, xh, y, m, n, k, m, bias);
    return tiled_f16_gemm(c, w, cp_dequantize_f16_cuda, xh, n, y, bias, (char *)c->work + xh_bytes, tile);
}

/* ---- fused operations ---- */

static cp_status cuda_matmul_group(cp_backend_t be, int count, const cp_tensor *const *w,
                                   const float *x, int n, float *const *y,
                                   const float *const *bias) {
    cp_cuda_backend *c = ctx_of(be);
    const cp_dtype t = w[0]->dtype;
    bool same = true;
    for (int i = 1; i < count; i++) same = same && w[i]->dtype == t;
    if (same && t == CP_DTYPE_F8_ROW) return f8_matmul(c, count, w, x, n, y, bias);
    if (same && gemv_rows_ok(t, n)) {
        cp_status st = cp_gemv_group_cuda(count, w, x, n, y, bias, c->stream);
        if (st != CP_ERR_UNSUPPORTED) return st;
    }
    if (same && (t == CP_DTYPE_F16 || t == CP_DTYPE_BF16)) {
        /* the activations converted once for every matrix */
        const int64_t k = w[0]->ne[0];
        const cudaDataType_t ht = t == CP_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
        CP_CHECK(ensure_work(c, (size_t)n * (size_t)k * 2));
        CP_CHECK(cp_convert_f32_cuda(c->work, x, (size_t)n * (size_t)k, t == CP_DTYPE_BF16, c->stream));
        for (int i = 0; i < count; i++)
            CP_CHECK(lt_gemm(c, ht, w[i]->data, ht, c->work, y[i], w[i]->ne[1], n, k, w[i]->ne[1],
                             bias ? bias[i] : NULL));
        return CP_OK;
    }
    for (int i = 0; i < count; i++) CP_CHECK(cuda_matmul(be, w[i], x, n, y[i], bias ? bias[i] : NULL));
    return CP_OK;
}

static cp_status cuda_matmul_swiglu(cp_backend_t be, const cp_tensor *wg, const cp_tensor *wu,
                                    const float *x, int n, float *out, float *up) {
    cp_cuda_backend *c = ctx_of(be);
    if (wg->dtype == wu->dtype && n <= 2 && gemv_rows_ok(wg->dtype, n)) {
        const float *xg = x;
        if (wg->dtype == CP_DTYPE_F8_ROW) { /* W8A8: the activations quantized per token */
            CP_CHECK(cuda_check_row_width(wg->dtype, wg->ne[0]));
            float *xq;
            CP_CHECK(f8_dequant_acts(c, x, n, wg->ne[0], &xq));
            xg = xq;
        }
        cp_status st = cp_gemv_swiglu_cuda(wg, wu, xg, n, out, c->stream);
        if (st != CP_ERR_UNSUPPORTED) return st;
    }
    const cp_tensor *ws[2] = {wg, wu};
    float *ys[2] = {out, up};
    CP_CHECK(cuda_matmul_group(be, 2, ws, x, n, ys, NULL));
    return cp_swiglu_cuda(out, out, up, (size_t)n * (size_t)wg->ne[1], c->stream);
}

static cp_status cuda_add_rmsnorm(cp_backend_t be, float *x, const float *delta, const float *w,
                                  int n, int dim, float eps, float *out) {
    return cp_add_rmsnorm_cuda(x, delta, w, n, dim, eps, out, ctx_of(be)->stream);
}

static cp_status cuda_rope_store(cp_backend_t be, const cp_rope_params *rp, const cp_attn_params *p,
                                 float *q, float *k, const float *v, void *k_cache, void *v_cache) {
    cudaStream_t s = ctx_of(be)->stream;
    if (cp_kv_quantized(p->kv_dtype)) { /* a row's scale needs the whole rotated row first */
        CP_CHECK(cp_rope_cuda(q, p->pos_of_tok, p->n_tok, p->n_head, rp, s));
        CP_CHECK(cp_rope_cuda(k, p->pos_of_tok, p->n_tok, p->n_head_kv, rp, s));
        return cp_kv_store_cuda(p, k, v, k_cache, v_cache, s);
    }
    return cp_rope_store_cuda(rp, p, q, k, v, k_cache, v_cache, s);
}

/* ---- the other ops ---- */

static cp_status cuda_rmsnorm(cp_backend_t be, float *out, const float *x, const float *w, int n,
                              int dim, float eps) {
    return cp_rmsnorm_cuda(out, x, w, n, dim, eps, ctx_of(be)->stream);
}

static cp_status cuda_rope(cp_backend_t be, float *x, const int32_t *pos, int n_tok, int n_head,
                           const cp_rope_params *rp) {
    return cp_rope_cuda(x, pos, n_tok, n_head, rp, ctx_of(be)->stream);
}

static cp_status cuda_kv_store(cp_backend_t be, const cp_attn_params *p, const float *k,
                               const float *v, void *k_cache, void *v_cache) {
    return cp_kv_store_cuda(p, k, v, k_cache, v_cache, ctx_of(be)->stream);
}

static cp_status cuda_attention(cp_backend_t be, const cp_attn_params *p, const float *q,
                                const void *k_cache, const void *v_cache, float *out) {
    cp_cuda_backend *c = ctx_of(be);
    /* the fused prefill kernel takes batches of prompt chunks (it makes a
     * pass per sequence in a tile, so decode rows of many sequences go to
     * the split kernel) */
    const bool prompts = p->n_seq_hint <= 0 || p->n_tok >= 4 * p->n_seq_hint;
    if (!c->no_flash && prompts && p->n_tok >= 16 && p->kv_dtype == CP_DTYPE_F16 &&
        (p->head_dim == 64 || p->head_dim == 128)) {
        cp_status st = cp_attention_flash_cuda(p, q, k_cache, v_cache, out, c->stream);
        if (st != CP_ERR_UNSUPPORTED) return st;
    }
    int max_pos = p->n_ctx_max - 1;
    if (p->n_ctx_max <= 0) {
        if (p->n_tok > c->pos_cap) {
            int32_t *np = (int32_t *)realloc(c->pos_host, (size_t)p->n_tok * sizeof(int32_t));
            if (!np) return CP_ERROR(CP_ERR_OOM, "attention: out of memory");
            c->pos_host = np;
            c->pos_cap = p->n_tok;
        }
        CP_CHECK(cuda_copy(be, c->pos_host, p->pos_of_tok, (size_t)p->n_tok * sizeof(int32_t),
                           CP_COPY_DEVICE_TO_HOST));
        max_pos = 0;
        for (int t = 0; t < p->n_tok; t++)
            if (c->pos_host[t] > max_pos) max_pos = c->pos_host[t];
    }
    CP_CHECK(ensure_work(c, cp_attention_work_bytes(p, max_pos)));
    return cp_attention_paged_cuda(p, max_pos, q, k_cache, v_cache, out, c->work, c->stream);
}

static cp_status cuda_add(cp_backend_t be, float *y, const float *a, const float *b, size_t n) {
    return cp_add_cuda(y, a, b, n, ctx_of(be)->stream);
}

static cp_status cuda_swiglu(cp_backend_t be, float *out, const float *gate, const float *up,
                             size_t n) {
    return cp_swiglu_cuda(out, gate, up, n, ctx_of(be)->stream);
}

static cp_status cuda_softmax(cp_backend_t be, float *x, int n, int dim) {
    return cp_softmax_cuda(x, n, dim, ctx_of(be)->stream);
}

static cp_status cuda_embed(cp_backend_t be, const cp_tensor *table, const int32_t *ids, int n,
                            float *out) {
    cp_cuda_backend *c = ctx_of(be);
    /* ids live on the device: a bad one raises a flag that the next
     * synchronisation reports, so the lookup never stalls the stream */
    CP_CHECK(cp_embed_cuda(table, ids, n, out, c->bad, c->stream));
    c->embed_rows = table->ne[1];
    return CP_OK;
}

static cp_status cuda_dequantize(cp_backend_t be, const cp_tensor *w, int64_t row0, int64_t nrows,
                                 float *out) {
    return cp_dequantize_cuda(w, row0, nrows, out, ctx_of(be)->stream);
}

/* Quantization is a load-time operation: done by the CPU reference on a
 * host copy. */
static cp_status cuda_quantize(cp_backend_t be, cp_dtype t, const float *x, int64_t nrows,
                               int64_t cols, void *out) {
    const size_t in_bytes = (size_t)nrows * (size_t)cols * sizeof(float);
    const size_t out_bytes = (size_t)nrows * cp_dtype_row_size(t, cols);
    float *hx = (float *)malloc(in_bytes);
    void *hy = malloc(out_bytes);
    cp_status st = CP_OK;
    if (!hx || !hy) {
        st = CP_ERROR(CP_ERR_OOM, "quantize: out of host memory for %zu bytes", in_bytes + out_bytes);
        goto done;
    }
    CP_CHECK_GOTO(cuda_copy(be, hx, x, in_bytes, CP_COPY_DEVICE_TO_HOST), st, done);
    CP_CHECK_GOTO(cp_quantize_ref(t, hx, nrows, cols, hy), st, done);
    CP_CHECK_GOTO(cuda_copy(be, out, hy, out_bytes, CP_COPY_HOST_TO_DEVICE), st, done);
    CP_CHECK_GOTO(cuda_synchronize(be), st, done);
done:
    free(hx);
    free(hy);
    return st;
}

/* Every row is decided on the device (sample.cu): greedy rows by argmax,
 * top-k / top-p / min-p rows on their best candidates, wide rows by the
 * whole-row draw; only rows the device cannot decide (u outside [0, 1),
 * vocabularies over 2^23) copy the row to the host reference. */
static cp_status cuda_sample(cp_backend_t be, const float *logits, int n, int vocab,
                             const cp_sample_params *sp, const float *u, int32_t *out) {
    cp_cuda_backend *c = ctx_of(be);
    CP_NOT_RECORDING(c, "sample");
    /* the logits' step has finished and its token ids were in the table */
    CP_CHECK(cuda_synchronize(be));
    if (!c->sampler) CP_CHECK(cp_sampler_cuda_init(&c->sampler));
    return cp_sample_cuda(c->sampler, logits, n, vocab, sp, u, out, c->stream);
}

/* ---- graphs of repeated steps (cuda_graph.cu) ---- */

static cp_status cuda_graph_begin(cp_backend_t be, uint64_t key, bool *replay) {
    return cp_cuda_graphs_begin(ctx_of(be)->graphs, key, replay);
}

static cp_status cuda_graph_end(cp_backend_t be, bool failed, bool *reissue) {
    cp_cuda_backend *c = ctx_of(be);
    /* a replay restores the embedding's pending check that its recording set */
    cp_status st = cp_cuda_graphs_end(c->graphs, failed, &c->embed_rows, reissue);
    const int n = c->n_deferred;
    c->n_deferred = 0;
    for (int i = 0; i < n; i++) cuda_dealloc(be, c->deferred[i]);
    return st;
}

static void cuda_graph_set_enabled(cp_backend_t be, bool enabled) {
    cp_cuda_graphs_set_enabled(ctx_of(be)->graphs, enabled);
}

static void cuda_graph_get_stats(cp_backend_t be, cp_backend_graph_stats *out) {
    cp_cuda_graphs_stats(ctx_of(be)->graphs, out);
}

static void *cuda_stream(cp_backend_t be) {
    return (void *)ctx_of(be)->stream;
}

static int cuda_n_threads(cp_backend_t be) {
    (void)be;
    return 1;
}

static void cuda_free(cp_backend_t be) {
    cp_cuda_backend *c = ctx_of(be);
    cp_cuda_graphs_free(c->graphs);
    c->graphs = NULL;
    for (int i = 0; i < c->n_deferred; i++) cudaFree(c->deferred[i]);
    if (c->stream) cudaStreamSynchronize(c->stream);
    cp_sampler_cuda_free(c->sampler);
    for (int i = 0; i < GEMM_CACHE; i++) gemm_entry_free(&c->cache[i]);
    if (c->lt) cublasLtDestroy(c->lt);
    cudaFree(c->lt_ws);
    cudaFree(c->work);
    cudaFree(c->bad);
    cudaFreeHost(c->bad_host);
    for (int i = 0; i < 2; i++) {
        if (c->stage[i]) cudaFreeHost(c->stage[i]);
        if (c->stage_ev[i]) cudaEventDestroy(c->stage_ev[i]);
    }
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c->pos_host);
    free(c);
}

static const struct cp_backend_i cuda_iface = {
    /* .name = */ "cuda",
    /* .device = */ CP_DEVICE_CUDA,
    /* .free = */ cuda_free,
    /* .supports = */ cuda_supports,
    /* .alloc = */ cuda_alloc,
    /* .dealloc = */ cuda_dealloc,
    /* .copy = */ cuda_copy,
    /* .memset = */ cuda_memset,
    /* .synchronize = */ cuda_synchronize,
    /* .matmul = */ cuda_matmul,
    /* .rmsnorm = */ cuda_rmsnorm,
    /* .rope = */ cuda_rope,
    /* .kv_store = */ cuda_kv_store,
    /* .attention = */ cuda_attention,
    /* .add = */ cuda_add,
    /* .swiglu = */ cuda_swiglu,
    /* .softmax = */ cuda_softmax,
    /* .embed = */ cuda_embed,
    /* .dequantize = */ cuda_dequantize,
    /* .quantize = */ cuda_quantize,
    /* .sample = */ cuda_sample,
    /* .n_threads = */ cuda_n_threads,
    /* .matmul_group = */ cuda_matmul_group,
    /* .matmul_swiglu = */ cuda_matmul_swiglu,
    /* .add_rmsnorm = */ cuda_add_rmsnorm,
    /* .rope_store = */ cuda_rope_store,
    /* .stream = */ cuda_stream,
};

static const struct cp_backend_graph_i cuda_graph_iface = {
    /* .begin = */ cuda_graph_begin,
    /* .end = */ cuda_graph_end,
    /* .set_enabled = */ cuda_graph_set_enabled,
    /* .get_stats = */ cuda_graph_get_stats,
};

extern "C" const char *cp_cuda_fp8_form(cp_backend_t be) {
    static const char *const names[] = {"vec", "scalar", "f16"};
    return be && cp_backend_device(be) == CP_DEVICE_CUDA ? names[ctx_of(be)->f8] : "none";
}

extern "C" cp_status cp_backend_cuda_device_count(int *count) {
    *count = 0;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
            return CP_ERROR(CP_ERR_UNSUPPORTED, "no CUDA GPU on this machine (%s); run with --device cpu",
                            e == cudaErrorNoDevice ? "no device" : "no usable driver");
        return CP_ERROR(CP_ERR_UNSUPPORTED, "no usable CUDA device: %s", cudaGetErrorString(e));
    }
    *count = n;
    return CP_OK;
}

extern "C" cp_status cp_backend_cuda_device_uuid(int device, uint8_t uuid[16]) {
    memset(uuid, 0, 16);
    int n = 0;
    CP_CHECK(cp_backend_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return CP_ERROR(CP_ERR_INVALID_ARG, "CUDA device %d does not exist (this machine has %d)", device, n);
    cudaDeviceProp prop;
    CP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    memcpy(uuid, prop.uuid.bytes, 16);
    return CP_OK;
}

static cp_status init_ctx(cp_cuda_backend *c) {
    CP_CUDA_CHECK(cudaSetDevice(c->device));
    cudaDeviceProp prop;
    CP_CUDA_CHECK(cudaGetDeviceProperties(&prop, c->device));
    snprintf(c->name, sizeof(c->name), "cuda:%d", c->device);
    if (prop.major * 10 + prop.minor < 89) c->f8 = F8_F16;
    else if (!CP_LT_OUTER_VEC && c->f8 == F8_VEC) c->f8 = F8_SCALAR;
    c->base.iface.name = c->name;
    CP_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    /* Decode steps are recorded as graphs unless CP_CUDA_NO_GRAPH=1 (for
     * comparisons and as a way out) */
    const char *ng = getenv("CP_CUDA_NO_GRAPH");
    CP_CHECK(cp_cuda_graphs_init(c->stream, !(ng && ng[0] == '1'), &c->graphs));
    CP_CUBLAS_CHECK(cublasLtCreate(&c->lt));
    CP_CUDA_CHECK(cudaMalloc(&c->lt_ws, LT_WORKSPACE_BYTES));
    CP_CUDA_CHECK(cudaMalloc(&c->bad, sizeof(int)));
    CP_CUDA_CHECK(cudaMemset(c->bad, 0, sizeof(int)));
    CP_CUDA_CHECK(cudaMallocHost(&c->bad_host, sizeof(int)));
    for (int i = 0; i < 2; i++) {
        CP_CUDA_CHECK(cudaMallocHost(&c->stage[i], STAGE_BYTES));
        CP_CUDA_CHECK(cudaEventCreateWithFlags(&c->stage_ev[i], cudaEventDisableTiming));
    }
    return CP_OK;
}

extern "C" cp_status cp_backend_cuda_init(int device, cp_backend_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_backend_cuda_init: out is NULL");
    *out = NULL;
    int n = 0;
    CP_CHECK(cp_backend_cuda_device_count(&n));
    if (n == 0) return CP_ERROR(CP_ERR_UNSUPPORTED, "no CUDA device is present");
    if (device < 0 || device >= n)
        return CP_ERROR(CP_ERR_INVALID_ARG, "CUDA device %d does not exist (this machine has %d)",
                        device, n);
    cp_cuda_backend *c = (cp_cuda_backend *)calloc(1, sizeof(*c));
    if (!c) return CP_ERROR(CP_ERR_OOM, "out of memory");
    c->base.iface = cuda_iface;
    c->base.graph = &cuda_graph_iface;
    c->device = device;
    const char *nf = getenv("CP_CUDA_NO_FLASH");
    c->no_flash = nf && nf[0] == '1';
    /* CP_CUDA_FP8=scalar or f16: start W8A8 GEMMs at that form (for
     * comparisons and as a way out); GPUs before sm_89 have no FP8 tensor
     * cores (init_ctx) */
    const char *f8 = getenv("CP_CUDA_FP8");
    c->f8 = f8 && !strcmp(f8, "f16") ? F8_F16 : (f8 && !strcmp(f8, "scalar") ? F8_SCALAR : F8_VEC);
    /* CP_CUDA_UNFUSED=all or a list of swiglu,group,norm,rope: run those
     * fused operations as their compositions (for comparisons) */
    const char *uf = getenv("CP_CUDA_UNFUSED");
    if (uf) {
        const bool all = strstr(uf, "all") != NULL;
        if (all || strstr(uf, "swiglu")) c->base.iface.matmul_swiglu = NULL;
        if (all || strstr(uf, "group")) c->base.iface.matmul_group = NULL;
        if (all || strstr(uf, "norm")) c->base.iface.add_rmsnorm = NULL;
        if (all || strstr(uf, "rope")) c->base.iface.rope_store = NULL;
    }
    cp_status st = init_ctx(c);
    if (st != CP_OK) {
        cuda_free(&c->base);
        return st;
    }
    *out = &c->base;
    return CP_OK;
}
