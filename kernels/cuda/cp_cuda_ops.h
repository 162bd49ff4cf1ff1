/* cp_cuda_ops.h - C-linkage launchers of the CUDA backend's kernels. Every
 * pointer is device memory unless a comment says otherwise; each launcher
 * enqueues on stream (its last argument), never synchronises, and returns
 * CP_ERR_CUDA when the launch fails. Argument validation is the caller's
 * (cp_backend.c); the CPU twins are in kernels/cpu/ops_ref.c. */
#ifndef CP_CUDA_OPS_H
#define CP_CUDA_OPS_H

#include <cuda_runtime_api.h>

#include "cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- ops.cu ---- */
cp_status cp_rmsnorm_cuda(float *out, const float *x, const float *w, int n, int dim, float eps,
                          cudaStream_t stream);
cp_status cp_rope_cuda(float *x, const int32_t *pos, int n_tok, int n_head,
                       const cp_rope_params *rp, cudaStream_t stream);
cp_status cp_add_cuda(float *y, const float *a, const float *b, size_t n, cudaStream_t stream);
cp_status cp_swiglu_cuda(float *out, const float *gate, const float *up, size_t n,
                         cudaStream_t stream);
cp_status cp_softmax_cuda(float *x, int n, int dim, cudaStream_t stream);
/* rows of table (any readable dtype) as fp32; ids are checked on the device:
 * an id outside [0, rows) sets *bad (device int, zeroed by the caller) to
 * 1 + its batch index and writes nothing for that row. */
cp_status cp_embed_cuda(const cp_tensor *table, const int32_t *ids, int n, float *out, int *bad,
                        cudaStream_t stream);
cp_status cp_dequantize_cuda(const cp_tensor *w, int64_t row0, int64_t nrows, float *out,
                             cudaStream_t stream);
/* Same as cp_dequantize_cuda but into fp16 (the GEMM operand of quantized
 * weights). */
cp_status cp_dequantize_f16_cuda(const cp_tensor *w, int64_t row0, int64_t nrows, void *out,
                                 cudaStream_t stream);
/* fp32 -> fp16 (to_bf16 false) or bf16 (to_bf16 true), n elements. */
cp_status cp_convert_f32_cuda(void *out, const float *x, size_t n, bool to_bf16,
                              cudaStream_t stream);
/* out[i] = argmax of row i of logits[n][vocab] (lowest index on ties; NaN
 * never wins). out is device memory. */
cp_status cp_argmax_cuda(const float *logits, int n, int vocab, int32_t *out, cudaStream_t stream);

cp_status cp_add_rmsnorm_cuda(float *x, const float *delta, const float *w, int n, int dim,
                              float eps, float *out, cudaStream_t stream);
cp_status cp_rope_store_cuda(const cp_rope_params *rp, const cp_attn_params *p, float *q, float *k,
                             const float *v, void *k_cache, void *v_cache, cudaStream_t stream);

/* ---- gemv.cu ---- */
/* y[n][m] = x[n][k] . W^T (+ bias) for small n (1..8) reading W once:
 * any readable dtype; float types need k % 8 == 0, block types whole
 * blocks. Returns CP_ERR_UNSUPPORTED (nothing launched) for shapes it does
 * not handle. */
cp_status cp_gemv_cuda(const cp_tensor *w, const float *x, int n, float *y, const float *bias,
                       cudaStream_t stream);
/* count (1..3) matrices of one dtype and row length sharing x, one launch. */
cp_status cp_gemv_group_cuda(int count, const cp_tensor *const *w, const float *x, int n,
                             float *const *y, const float *const *bias, cudaStream_t stream);
/* out = silu(x . Wg^T) * (x . Wu^T), one launch, Wg and Wu of one dtype. */
cp_status cp_gemv_swiglu_cuda(const cp_tensor *wg, const cp_tensor *wu, const float *x, int n,
                              float *out, cudaStream_t stream);

/* ---- fp8.cu: the W8A8 path of F8_ROW weights ---- */
/* Per token row of x[n][k]: scale sx[i] = amax / 448 and codes
 * e4m3(x * 448 / amax), bit-equal to the CPU reference's
 * (cp_quantize_ref F8_ROW). out receives, by mode: */
enum {
    CP_F8_ACT_DEQUANT = 0,   /* float [n][k]: e4m3(code) * sx (the reference's activations) */
    CP_F8_ACT_CODES = 1,     /* uint8 [n][k]: the E4M3 codes */
    CP_F8_ACT_CODES_F16 = 2  /* fp16 [n][k]: e4m3(code), exact, without sx */
};
cp_status cp_f8_quantize_act_cuda(const float *x, int n, int64_t k, int mode, void *out, float *sx,
                                  cudaStream_t stream);
/* sw[r] = the scale of row row0 + r of the F8_ROW (or I8_ROW) tensor w. */
cp_status cp_f8_row_scales_cuda(const cp_tensor *w, int64_t row0, int64_t nrows, float *sw,
                                cudaStream_t stream);
/* Rows row0 .. row0 + nrows of F8_ROW w as fp16 codes [nrows][cols]
 * without their scales (exact); cols % 4 == 0. */
cp_status cp_f8_codes_f16_cuda(const cp_tensor *w, int64_t row0, int64_t nrows, void *out,
                               cudaStream_t stream);
/* y[i][j] = y[i][j] * sx[i] * sw[j] + bias[j] over n rows of m (stride
 * ldd); NULL vectors are left out. */
cp_status cp_f8_epilogue_cuda(float *y, int n, int64_t m, int64_t ldd, const float *sx,
                              const float *sw, const float *bias, cudaStream_t stream);

/* The W8A8 GEMM form a CUDA backend starts at now: "vec" (FP8 with the
 * scales in cuBLASLt), "scalar" (FP8, the scales in a kernel), "f16"; a form
 * without a cuBLASLt algorithm moves it on ("none" for other backends). */
const char *cp_cuda_fp8_form(cp_backend_t be);

/* ---- attention.cu ---- */
cp_status cp_kv_store_cuda(const cp_attn_params *p, const float *k, const float *v, void *k_cache,
                           void *v_cache, cudaStream_t stream);
/* Paged attention for any head_dim <= 256 and either cache dtype, split
 * along the context: partial results of up to max_splits chunks go to
 * work (at least cp_attention_work_bytes floats... bytes), then merge. */
size_t cp_attention_work_bytes(const cp_attn_params *p, int max_pos);
cp_status cp_attention_paged_cuda(const cp_attn_params *p, int max_pos, const float *q,
                                  const void *k_cache, const void *v_cache, float *out, void *work,
                                  cudaStream_t stream);

/* ---- sample.cu ---- */
/* Sampling with cp_sample_host's choices (cp_backend.h). z = logits /
 * temperature (IEEE division); the reference's order is z descending, ties
 * to the lower id; NaN logits rank below -inf here (the reference leaves
 * their order unspecified). */
#define CP_SAMPLE_CUDA_MAX_K 256
/* Per row of logits[n][vocab], the k best tokens (1 <= k <= vocab, k <=
 * CP_SAMPLE_CUDA_MAX_K) in the reference's order: cand_z[n][k] (their z,
 * bit-equal to the host's) and cand_id[n][k]. With mass != NULL (vocab <=
 * 2^23), mass[n] = sum over the whole row of expf(z - zmax) (the device's
 * expf, within 2 ulp of the host's) in fixed point, units of 2^-40.
 * temperature > 0. CP_ERR_INVALID_ARG (nothing launched) otherwise. */
cp_status cp_sample_topk_cuda(const float *logits, int n, int vocab, float temperature, int k,
                              float *cand_z, int32_t *cand_id, uint64_t *mass,
                              cudaStream_t stream);
/* The reference's decision over whole rows: out[r] for r = rows[i], i < m
 * (rows NULL: r = i), u[r] in [0, 1). Top-k, top-p, min-p and the draw each
 * follow the reference's order; probabilities are the device's expf in
 * units of 2^-40, so a choice can differ from the host's only where u or a
 * threshold lies within ~1e-6 (relative) of a boundary. sp->temperature > 0,
 * vocab <= 2^23. out[r] = -1 reports an internal failure. */
cp_status cp_sample_tail_cuda(const float *logits, int m, const int32_t *rows, int vocab,
                              const cp_sample_params *sp, const float *u, int32_t *out,
                              cudaStream_t stream);
/* Host function: cp_sample_ref's decision for one row from the first k
 * entries of its sorted list (z best first, id; host memory), with prob[k]
 * as scratch. complete != 0: those k are every token top-k keeps (exact).
 * Otherwise total is the row's whole mass relative to the best (< 0:
 * unknown); returns -1 when the k alone cannot decide. */
int32_t cp_sample_decide(const float *z, const int32_t *id, int k, int complete, double total,
                         const cp_sample_params *sp, float u, float *prob);

/* Sampling state of one stream: device and pinned buffers for the
 * candidates, grown to the largest row count seen (never on a call whose
 * rows fit). */
typedef struct cp_sampler_cuda *cp_sampler_cuda_t;
cp_status cp_sampler_cuda_init(cp_sampler_cuda_t *out);
/* NULL is a no-op; the caller's stream must be idle. */
void cp_sampler_cuda_free(cp_sampler_cuda_t s);
/* cp_backend_sample on the device: logits device memory; u and out host
 * memory (borrowed for the call). Greedy rows take the device argmax; rows
 * whose top-k set fits CP_SAMPLE_CUDA_MAX_K are decided exactly on their
 * candidates; top-p / min-p rows too when their cut falls inside the K
 * best (the top-p threshold uses the device's whole-row mass); the rest
 * (pure temperature, wider nuclei) draw with cp_sample_tail_cuda, and rows
 * with u outside [0, 1) or vocab > 2^23 copy the row to the host reference.
 * Unlike the launchers above it synchronises stream (the tokens are host
 * memory when it returns). */
cp_status cp_sample_cuda(cp_sampler_cuda_t s, const float *logits, int n, int vocab,
                         const cp_sample_params *sp, const float *u, int32_t *out,
                         cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* CP_CUDA_OPS_H */
