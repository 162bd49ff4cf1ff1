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

#ifdef __cplusplus
}
#endif

#endif /* CP_CUDA_OPS_H */
