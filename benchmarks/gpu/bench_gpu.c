/* bench_gpu.c - the model on one GPU against the GPU's own limits, measured
 * in the same run: a device-to-device copy (bytes read + written per
 * second) and cuBLASLt bf16 and E4M3 GEMMs (8192^3, random data) give the
 * ceilings; then prefill of a long prompt (TFLOP/s against the GEMM peak
 * of its operands: E4M3 for weights converted to fp8, else bf16)
 * and decode at several batch sizes (tokens/s; at batch 1 the model
 * bandwidth utilisation = bytes read per token / time per token / copy
 * bandwidth), each batch with decode steps replayed as CUDA graphs and
 * issued op by op (unless CP_CUDA_NO_GRAPH=1: op by op only). --convert
 * converts every matrix at load (fp8: the W8A8 path). Prints Markdown
 * tables; --json writes the numbers. */
#include "cp_runtime.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CK(x)                                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#define CKB(x)                                                                                     \
    do {                                                                                           \
        cublasStatus_t s_ = (x);                                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "%s:%d: %s: status %d\n", __FILE__, __LINE__, #x, (int)s_);            \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#define CKS(x)                                                                                     \
    do {                                                                                           \
        if ((x) != CP_OK) {                                                                        \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cp_last_error());          \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Random bits for device buffers (never zeros: they run faster): raw
 * (kind 0), bf16 in [-1, 1) (1), or E4M3 pairs in [-8, 8) without NaN
 * codes (2). */
enum { FILL_RAW = 0, FILL_BF16 = 1, FILL_E4M3 = 2 };
static void fill_random(void *dev, size_t bytes, uint64_t seed, int kind) {
    size_t n = bytes / 2;
    uint16_t *h = malloc(bytes);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        /* bf16 in [-1, 1): sign, exponent 120..126, random mantissa */
        uint16_t v = (uint16_t)(((s >> 20) & 0x8000) | ((120 + (s >> 40) % 7) << 7) | (s & 0x7f));
        /* E4M3: sign, exponent field 4..10, any mantissa */
        uint16_t lo = (uint16_t)(((s >> 8) & 0x80) | ((4 + (s >> 24) % 7) << 3) | (s & 7));
        uint16_t hi = (uint16_t)(((s >> 9) & 0x80) | ((4 + (s >> 32) % 7) << 3) | ((s >> 3) & 7));
        h[i] = kind == FILL_BF16 ? v : (kind == FILL_E4M3 ? (uint16_t)(lo | hi << 8) : (uint16_t)s);
    }
    CK(cudaMemcpy(dev, h, bytes, cudaMemcpyHostToDevice));
    free(h);
}

/* bytes read + written per second by a device-to-device copy of 2 GiB. */
static double copy_bandwidth(void) {
    const size_t bytes = (size_t)2 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    fill_random(a, bytes, 1, FILL_RAW);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    double t[10];
    for (int i = -2; i < 10; i++) {
        CK(cudaEventRecord(e0, 0));
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 0) t[i] = ms * 1e-3;
    }
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * (double)bytes / median(t, 10);
}

/* FLOP/s of a cuBLASLt GEMM m x n x k with fp32 accumulation: bf16
 * operands and output, or (fp8) E4M3 operands and fp32 output, the form the
 * W8A8 weights (F8_ROW) run in; 0 when cuBLASLt has no algorithm. */
static double gemm_peak(int m, int n, int k, int fp8) {
    cublasLtHandle_t lt;
    CKB(cublasLtCreate(&lt));
    void *A, *B, *C, *ws;
    const size_t wsb = (size_t)32 << 20;
    const size_t ab = fp8 ? 1 : 2, cb = fp8 ? 4 : 2;
    CK(cudaMalloc(&A, (size_t)m * k * ab));
    CK(cudaMalloc(&B, (size_t)k * n * ab));
    CK(cudaMalloc(&C, (size_t)m * n * cb));
    CK(cudaMalloc(&ws, wsb));
    fill_random(A, (size_t)m * k * ab, 2, fp8 ? FILL_E4M3 : FILL_BF16);
    fill_random(B, (size_t)k * n * ab, 3, fp8 ? FILL_E4M3 : FILL_BF16);
    const cudaDataType_t ot = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF, dt = fp8 ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDesc_t desc;
    CKB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CKB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CKB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    cublasLtMatrixLayout_t la, lb, lc;
    CKB(cublasLtMatrixLayoutCreate(&la, ot, k, m, k));
    CKB(cublasLtMatrixLayoutCreate(&lb, ot, k, n, k));
    CKB(cublasLtMatrixLayoutCreate(&lc, dt, m, n, m));
    cublasLtMatmulPreference_t pref;
    CKB(cublasLtMatmulPreferenceCreate(&pref));
    CKB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &res, &nres);
    if (hs != CUBLAS_STATUS_SUCCESS || nres == 0) nres = 0;
    float alpha = 1, beta = 0;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    double t[10];
    for (int i = -3; i < 10 && nres > 0; i++) {
        CK(cudaEventRecord(e0, 0));
        CKB(cublasLtMatmul(lt, desc, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res.algo, ws, wsb, 0));
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 0) t[i] = ms * 1e-3;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(lt);
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    cudaFree(ws);
    return nres > 0 ? 2.0 * m * n * (double)k / median(t, 10) : 0.0;
}

typedef struct bench {
    cp_engine_t e;
    cp_model_t m;
    cp_kv_cache_t kv;
    const cp_model_config *c;
    int block;
} bench;

/* Prefill of n tokens (one sequence): seconds, median of runs. */
static double prefill(bench *b, int n, int runs) {
    int nb = (n + b->block - 1) / b->block;
    int32_t *table = malloc((size_t)nb * 4), *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4),
            *seq = calloc((size_t)n, 4);
    CKS(cp_kv_cache_alloc_blocks(b->kv, nb, table));
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)((i * 7919u + 11u) % (unsigned)b->c->n_vocab);
        pos[i] = i;
    }
    int32_t row = n - 1, out;
    float u = 0.5f;
    cp_sample_params sp = {0};
    cp_batch bt = {n, tok, pos, seq, table, 1, nb, &row, 1};
    double t[16];
    for (int r = -1; r < runs; r++) {
        double t0 = now();
        CKS(cp_model_forward_sample(b->m, b->kv, &bt, &sp, &u, &out));
        if (r >= 0) t[r] = now() - t0;
    }
    cp_kv_cache_release_blocks(b->kv, table, nb);
    free(table);
    free(tok);
    free(pos);
    free(seq);
    return median(t, runs);
}

/* Decode steps at batch B after a 16-token prompt per sequence: median
 * seconds per step. */
static double decode(bench *b, int B, int gen) {
    const int prompt = 16, ctx = prompt + gen + 8;
    const int nb = (ctx + b->block - 1) / b->block;
    int32_t *tables = malloc((size_t)B * nb * 4);
    CKS(cp_kv_cache_alloc_blocks(b->kv, B * nb, tables));
    int n = B * prompt;
    int32_t *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4), *seq = malloc((size_t)n * 4),
            *rows = malloc((size_t)n * 4), *out = malloc((size_t)n * 4);
    float *u = calloc((size_t)n, 4);
    for (int s = 0; s < B; s++)
        for (int i = 0; i < prompt; i++) {
            int j = s * prompt + i;
            tok[j] = (int32_t)(((unsigned)j * 7919u + 3u) % (unsigned)b->c->n_vocab);
            pos[j] = i;
            seq[j] = s;
        }
    for (int s = 0; s < B; s++) rows[s] = s * prompt + prompt - 1;
    cp_sample_params sp = {0};
    cp_batch bt = {n, tok, pos, seq, tables, B, nb, rows, B};
    CKS(cp_model_forward_sample(b->m, b->kv, &bt, &sp, u, out));
    double *t = malloc((size_t)gen * sizeof(double));
    for (int g = 0; g < gen; g++) {
        for (int s = 0; s < B; s++) {
            tok[s] = out[s];
            pos[s] = prompt + g;
            seq[s] = s;
            rows[s] = s;
        }
        cp_batch st = {B, tok, pos, seq, tables, B, nb, rows, B};
        double t0 = now();
        CKS(cp_model_forward_sample(b->m, b->kv, &st, &sp, u, out));
        t[g] = now() - t0;
    }
    const int warm = gen > 8 ? 4 : 0;
    double med = median(t + warm, gen - warm);
    cp_kv_cache_release_blocks(b->kv, tables, B * nb);
    free(t);
    free(tables);
    free(tok);
    free(pos);
    free(seq);
    free(rows);
    free(out);
    free(u);
    return med;
}

int main(int argc, char **argv) {
    const char *model = NULL, *json = NULL, *batches = "1,8,32,64", *convert = NULL;
    int n_prompt = 2048, gen = 64;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(argv[i], "--batches") && i + 1 < argc) batches = argv[++i];
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) n_prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gen") && i + 1 < argc) gen = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--convert") && i + 1 < argc) convert = argv[++i];
        else {
            fprintf(stderr, "usage: bench_gpu --model PATH [--prompt 2048] [--gen 64] "
                            "[--batches 1,8,32,64] [--convert fp8|int8|int4|q8_0|q4_k] [--json FILE]\n");
            return 2;
        }
    }
    /* --convert: every matrix converted at load, as `cparallel --convert` */
    static const struct {
        const char *name;
        cp_dtype t;
    } conv[] = {{"fp8", CP_DTYPE_F8_ROW}, {"int8", CP_DTYPE_I8_ROW}, {"int4", CP_DTYPE_I4_G128},
                {"q8_0", CP_DTYPE_Q8_0}, {"q4_k", CP_DTYPE_Q4_K}};
    cp_dtype conv_t = CP_DTYPE_BF16;
    for (size_t i = 0; convert && i < sizeof(conv) / sizeof(conv[0]); i++)
        if (!strcmp(convert, conv[i].name)) conv_t = conv[i].t;
    if (convert && conv_t == CP_DTYPE_BF16) {
        fprintf(stderr, "bench_gpu: unknown --convert '%s' (fp8, int8, int4, q8_0 or q4_k)\n", convert);
        return 2;
    }
    if (!model || n_prompt < 1 || gen < 2) {
        fprintf(stderr, "bench_gpu: --model is required\n");
        return 2;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const double bw = copy_bandwidth();
    const double peak_bf16 = gemm_peak(8192, 8192, 8192, 0);
    const double peak_fp8 = gemm_peak(8192, 8192, 8192, 1);
    /* prefill is measured against the tensor-core peak of its own operands */
    const double peak = conv_t == CP_DTYPE_F8_ROW && peak_fp8 > 0 ? peak_fp8 : peak_bf16;
    printf("device: %s, %d SMs\n\n", prop.name, prop.multiProcessorCount);
    printf("| ceiling | measured |\n|---|---|\n");
    printf("| device copy (read + write) | %.0f GB/s |\n", bw / 1e9);
    printf("| cuBLASLt bf16 GEMM 8192^3 | %.0f TFLOP/s |\n", peak_bf16 / 1e12);
    if (peak_fp8 > 0) printf("| cuBLASLt E4M3 GEMM 8192^3 (fp32 out) | %.0f TFLOP/s |\n\n", peak_fp8 / 1e12);
    else printf("| cuBLASLt E4M3 GEMM | no algorithm on this GPU |\n\n");
    fflush(stdout);

    bench b = {0};
    int max_b = 1;
    for (const char *p = batches; *p;) {
        int v = atoi(p);
        if (v > max_b) max_b = v;
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    cp_engine_opts eo = {.model_path = model, .device = CP_DEVICE_CUDA, .n_ctx = n_prompt + 16,
                         .n_seq = 1, .tokens_only = true, .convert_weights = convert != NULL,
                         .weight_dtype = conv_t};
    double t0 = now();
    CKS(cp_engine_init(&eo, &b.e));
    const double load_s = now() - t0;
    b.m = cp_engine_model(b.e);
    b.c = cp_model_get_config(b.m);
    b.block = 16;
    int blocks = (n_prompt + 15) / 16 + max_b * ((16 + gen + 8 + 15) / 16) + 8;
    cp_kv_cache_opts ko = {.n_blocks = blocks, .block_size = 16, .dtype = CP_DTYPE_F16};
    CKS(cp_kv_cache_init(b.m, &ko, &b.kv));
    cp_model_stats ms;
    cp_model_get_stats(b.m, &ms);
    const cp_model_config *c = b.c;
    /* bytes a decode step reads: every weight but the embedding table (one
     * row of it) when the head is a separate matrix */
    const size_t embd_bytes = (size_t)c->n_vocab * cp_dtype_row_size(conv_t, c->dim);
    const size_t read_bytes = ms.weight_bytes - (c->tied_embeddings ? 0 : embd_bytes);
    const double matmul_params = (double)ms.n_params - (c->tied_embeddings ? 0 : (double)c->n_vocab * c->dim);
    printf("model: %s%s%s: %d layers, dim %d, %lld parameters, %.2f GB of weights; loaded in %.1f s "
           "(%.1f GB/s)\n\n",
           model, convert ? " converted to " : "", convert ? cp_dtype_name(conv_t) : "", c->n_layer,
           c->dim, (long long)ms.n_params, ms.weight_bytes / 1e9, load_s, ms.weight_bytes / 1e9 / load_s);

    const double tp = prefill(&b, n_prompt, 5);
    const double attn_flop = 2.0 * (double)n_prompt * n_prompt * c->head_dim * c->n_head * c->n_layer;
    const double pf_flop = 2.0 * matmul_params * n_prompt + attn_flop;
    printf("| prefill | tokens | ms | tokens/s | TFLOP/s | of GEMM peak |\n|---|---|---|---|---|---|\n");
    printf("| one sequence | %d | %.1f | %.0f | %.0f | %.0f%% |\n\n", n_prompt, tp * 1e3,
           n_prompt / tp, pf_flop / tp / 1e12, 100.0 * pf_flop / tp / peak);
    fflush(stdout);

    FILE *jf = json ? fopen(json, "w") : NULL;
    if (jf)
        fprintf(jf, "{\"device\": \"%s\", \"weights\": \"%s\", \"copy_GBps\": %.1f, "
                    "\"gemm_TFLOPs\": %.1f, \"gemm_fp8_TFLOPs\": %.1f, "
                    "\"weight_bytes\": %zu, \"read_bytes_per_token\": %zu, \"prefill_tokens\": %d, "
                    "\"prefill_s\": %.6f, \"prefill_TFLOPs\": %.1f, \"decode\": [",
                prop.name, convert ? cp_dtype_name(conv_t) : "as stored", bw / 1e9, peak_bf16 / 1e12,
                peak_fp8 / 1e12, ms.weight_bytes, read_bytes, n_prompt, tp, pf_flop / tp / 1e12);
    /* graphs on and off on the same backend: the A/B of one model load */
    cp_backend_t be = cp_engine_backend(b.e);
    cp_backend_graph_stats gs;
    cp_backend_graph_get_stats(be, &gs);
    const int graphs = gs.enabled;
    printf("| decode batch | ms/step | tokens/s | bytes/step / time / copy BW | tokens/s without "
           "graphs | graph speed-up |\n|---|---|---|---|---|---|\n");
    int first = 1;
    for (const char *p = batches; *p;) {
        int B = atoi(p);
        if (B >= 1) {
            cp_backend_graph_set_enabled(be, false);
            double te = decode(&b, B, gen);
            cp_backend_graph_set_enabled(be, graphs);
            double ts = graphs ? decode(&b, B, gen) : te;
            double mbu = (double)read_bytes / ts / bw;
            printf("| %d | %.2f | %.0f | %.1f%% | %.0f | %.2fx |\n", B, ts * 1e3, B / ts,
                   100.0 * mbu, B / te, te / ts);
            fflush(stdout);
            if (jf)
                fprintf(jf,
                        "%s{\"batch\": %d, \"step_s\": %.6f, \"tokens_per_s\": %.1f, \"mbu\": %.4f, "
                        "\"graphs\": %s, \"tokens_per_s_no_graph\": %.1f}",
                        first ? "" : ", ", B, ts, B / ts, mbu, graphs ? "true" : "false", B / te);
            first = 0;
        }
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    cp_backend_graph_get_stats(be, &gs);
    printf("\ngraphs: %lld captured, %lld replays, %lld steps run directly, %lld failures\n\n",
           (long long)gs.captures, (long long)gs.replays, (long long)gs.direct,
           (long long)gs.failures);
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    cp_kv_cache_free(b.kv);
    cp_engine_free(b.e);
    return 0;
}
