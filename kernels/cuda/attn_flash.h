/* attn_flash.h - fused causal attention of a batch of query tokens over the
 * paged fp16 KV cache on CUDA tensor cores (mma.sync, sm_80 and newer):
 * FlashAttention-2 style, the score matrix never leaves the chip. */
#ifndef CP_ATTN_FLASH_H
#define CP_ATTN_FLASH_H

#include <cuda_runtime.h>

#include "cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[n_tok][n_head*head_dim] = softmax(q k^T * scale, causal) v, with the
 * semantics of cp_backend_attention (see cp_attn_params): token t attends to
 * positions 0..pos_of_tok[t] of sequence seq_of_tok[t]; a batch may mix
 * sequences (decode rows and prompt chunks) in any order.
 *
 * q and out are fp32 device memory; k_cache and v_cache are fp16 device
 * memory laid out [n_blocks][block_size][n_head_kv][head_dim]; the params
 * struct is host memory and its seq_of_tok, pos_of_tok and block_tables are
 * device memory. All are borrowed for the call only. Entries of
 * block_tables past the last block a sequence uses are never read, and
 * cache slots past the largest position of a sequence in the batch are
 * never read.
 *
 * Supported: head_dim 64 or 128, kv_dtype CP_DTYPE_F16, 16-byte aligned
 * q/k_cache/v_cache and 8-byte aligned out, ceil(n_tok / 64) * n_head <
 * 2^31, cache slot indices (block id * block_size + slot) < 2^32 - 1.
 * Anything else returns CP_ERR_UNSUPPORTED without launching, so that the
 * caller can fall back to another kernel. Bad shapes (n_head not a multiple of
 * n_head_kv, block_size < 1, NULL pointers) are CP_ERR_INVALID_ARG.
 * A launch failure is CP_ERR_CUDA.
 *
 * Enqueued on stream; never synchronises and allocates nothing. n_tok == 0
 * is a no-op. */
cp_status cp_attention_flash_cuda(const cp_attn_params *p, const float *q, const void *k_cache,
                                  const void *v_cache, float *out, cudaStream_t stream);

/* As cp_attention_flash_cuda with an explicit block shape: tile_rows batch
 * rows per thread block on n_warps warps, one of 64/4 (16 rows a warp),
 * 128/8 (16 rows a warp) and 128/4 (32 rows a warp); 0/0 picks the
 * default. Other pairs are CP_ERR_INVALID_ARG. For benchmarks and tests
 * that compare the shapes. */
cp_status cp_attention_flash_config_cuda(const cp_attn_params *p, const float *q,
                                         const void *k_cache, const void *v_cache, float *out,
                                         int tile_rows, int n_warps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* CP_ATTN_FLASH_H */
