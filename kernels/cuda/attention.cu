/* attention.cu - KV-cache writes and paged attention for decode (and any
 * shape the fused prefill kernel does not take): one block per (token, query
 * head, context split); each warp scores 32 keys at once (a lane per key),
 * keeps an online softmax, and accumulates V with coalesced loads; splits
 * are merged by a second kernel. Caches hold fp16, fp32, or quantized rows
 * (I8_ROW / F8_ROW: head_dim codes and a 16-byte trailer whose first 4
 * bytes are the row's fp32 scale), written with the CPU reference's
 * arithmetic. CPU twins: cp_kv_store_ref, cp_attention_ref. */
#include "cp_cuda_ops.h"
#include "cuda_common.cuh"

#include <float.h>

#define ATT_WARPS 4
#define ATT_MAX_NI 8 /* head_dim <= 256 */

/* Offset, in cache elements, of the row of (position pos, kv head kvh):
 * rows of `row` elements (head_dim for fp16/fp32 caches; head_dim + the
 * trailer, in bytes, for quantized ones). */
static __device__ __forceinline__ size_t kv_offset(const int32_t *bt, int block_size,
                                                   int n_head_kv, int row, int pos, int kvh) {
    const size_t slot = (size_t)bt[pos / block_size] * block_size + (size_t)(pos % block_size);
    return (slot * n_head_kv + kvh) * (size_t)row;
}

/* Elements of one cache row of dtype t (cache elements: bytes for the
 * quantized rows). */
static int kv_row_elems(cp_dtype t, int head_dim) {
    return cp_kv_quantized(t) ? (int)cp_dtype_row_size(t, head_dim) : head_dim;
}

/* Quantized rows need their fp32 scale 4-byte aligned. */
static cp_status kv_check_quantized(const cp_attn_params *p, const char *op) {
    if (cp_kv_quantized(p->kv_dtype) && p->head_dim % 4 != 0)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "%s: a %s KV cache on the GPU needs head_dim a multiple of 4, not %d",
                        op, cp_dtype_name(p->kv_dtype), p->head_dim);
    return CP_OK;
}

/* ---- kv_store ---- */

template <typename KV>
static __global__ void kv_store_kernel(int n_tok, int n_head_kv, int head_dim, int block_size,
                                       int max_blocks, const int32_t *seq, const int32_t *pos,
                                       const int32_t *tables, const float *k, const float *v,
                                       KV *kc, KV *vc) {
    const int kv_dim = n_head_kv * head_dim;
    const int64_t total = (int64_t)n_tok * kv_dim;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int t = (int)(i / kv_dim), e = (int)(i % kv_dim);
        const int h = e / head_dim, d = e % head_dim;
        const int32_t *bt = tables + (size_t)seq[t] * max_blocks;
        const size_t off = kv_offset(bt, block_size, n_head_kv, head_dim, pos[t], h) + d;
        if (sizeof(KV) == 2) {
            ((__half *)kc)[off] = __float2half_rn(k[i]);
            ((__half *)vc)[off] = __float2half_rn(v[i]);
        } else {
            ((float *)kc)[off] = k[i];
            ((float *)vc)[off] = v[i];
        }
    }
}

/* Quantized rows: a warp per (token, kv head) row of K or V, as the CPU
 * reference's from_float: amax (infinite -> FLT_MAX), the factor qmax /
 * amax at most FLT_MAX, I8_ROW codes rint(x * 127 / amax) within +-127 (NaN
 * -> 0) and scale amax / 127, F8_ROW codes e4m3(x * 448 / amax) and scale
 * amax / 448; then the trailer (the scale, 12 zero bytes). */
template <bool F8>
static __global__ void kv_store_q_kernel(int n_tok, int n_head_kv, int head_dim, int block_size,
                                         int max_blocks, const int32_t *seq, const int32_t *pos,
                                         const int32_t *tables, const float *k, const float *v,
                                         uint8_t *kc, uint8_t *vc) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int64_t rows = (int64_t)n_tok * n_head_kv;
    const int rb = head_dim + CP_ROW_TRAILER;
    for (int64_t r = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); r < 2 * rows;
         r += (int64_t)gridDim.x * warps) {
        const bool is_v = r >= rows;
        const int64_t rr = is_v ? r - rows : r;
        const int t = (int)(rr / n_head_kv), h = (int)(rr % n_head_kv);
        const float *x = (is_v ? v : k) + ((size_t)t * n_head_kv + h) * (size_t)head_dim;
        uint8_t *row = (is_v ? vc : kc) +
                       kv_offset(tables + (size_t)seq[t] * max_blocks, block_size, n_head_kv, rb, pos[t], h);
        float a = 0.0f;
        for (int d = lane; d < head_dim; d += 32) a = fmaxf(a, fabsf(x[d]));
        a = warp_max(a);
        if (!isfinite(a)) a = FLT_MAX;
        const float qmax = F8 ? 448.0f : 127.0f;
        const float s = a / qmax, inv = a > 0.0f ? fminf(qmax / a, FLT_MAX) : 0.0f;
        for (int d = lane; d < head_dim; d += 32) {
            if (F8) {
                row[d] = cp_e4m3_encode(x[d] * inv);
            } else {
                const float q = rintf(x[d] * inv);
                row[d] = (uint8_t)(int8_t)(q > 127.0f ? 127 : q < -127.0f ? -127 : q == q ? (int)q : 0);
            }
        }
        if (lane == 0) *(float *)(row + head_dim) = s;
        else if (lane < CP_ROW_TRAILER / 4) *(uint32_t *)(row + head_dim + 4 * lane) = 0u;
    }
}

extern "C" cp_status cp_kv_store_cuda(const cp_attn_params *p, const float *k, const float *v,
                                      void *k_cache, void *v_cache, cudaStream_t stream) {
    const int64_t total = (int64_t)p->n_tok * p->n_head_kv * p->head_dim;
    int64_t blocks = (total + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    CP_CHECK(kv_check_quantized(p, "kv_store"));
    if (cp_kv_quantized(p->kv_dtype)) {
        const int64_t rows = 2 * (int64_t)p->n_tok * p->n_head_kv; /* 8 warps a block */
        int64_t qb = (rows + 7) / 8;
        if (qb > 8192) qb = 8192;
#define CP_KVQ_CALL(F8)                                                                            \
    kv_store_q_kernel<F8><<<(unsigned)qb, 256, 0, stream>>>(                                       \
        p->n_tok, p->n_head_kv, p->head_dim, p->block_size, p->max_blocks, p->seq_of_tok,          \
        p->pos_of_tok, p->block_tables, k, v, (uint8_t *)k_cache, (uint8_t *)v_cache)
        if (p->kv_dtype == CP_DTYPE_F8_ROW) CP_KVQ_CALL(true);
        else CP_KVQ_CALL(false);
#undef CP_KVQ_CALL
    } else if (p->kv_dtype == CP_DTYPE_F16)
        kv_store_kernel<__half><<<(unsigned)blocks, 256, 0, stream>>>(
            p->n_tok, p->n_head_kv, p->head_dim, p->block_size, p->max_blocks, p->seq_of_tok,
            p->pos_of_tok, p->block_tables, k, v, (__half *)k_cache, (__half *)v_cache);
    else
        kv_store_kernel<float><<<(unsigned)blocks, 256, 0, stream>>>(
            p->n_tok, p->n_head_kv, p->head_dim, p->block_size, p->max_blocks, p->seq_of_tok,
            p->pos_of_tok, p->block_tables, k, v, (float *)k_cache, (float *)v_cache);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- paged attention ---- */

static __device__ __forceinline__ float cache_elem(const __half *c, size_t i) { return __half2float(c[i]); }
static __device__ __forceinline__ float cache_elem(const float *c, size_t i) { return c[i]; }
/* quantized rows: int8_t for I8_ROW, uint8_t for F8_ROW codes (row_code) */
static __device__ __forceinline__ float cache_elem(const int8_t *c, size_t i) {
    return row_code<CP_DTYPE_I8_ROW>((uint8_t)c[i]);
}
static __device__ __forceinline__ float cache_elem(const uint8_t *c, size_t i) {
    return row_code<CP_DTYPE_F8_ROW>(c[i]);
}

/* The scale of the row starting at r: 1 for fp16/fp32 rows. */
static __device__ __forceinline__ float row_scale(const __half *, int) { return 1.0f; }
static __device__ __forceinline__ float row_scale(const float *, int) { return 1.0f; }
static __device__ __forceinline__ float row_scale(const int8_t *r, int hd) { return *(const float *)(r + hd); }
static __device__ __forceinline__ float row_scale(const uint8_t *r, int hd) { return *(const float *)(r + hd); }

/* q . K row (head_dim elements at kr), q in shared memory. */
static __device__ __forceinline__ float dot_row(const float *q, const __half *kr, int hd) {
    float s = 0.0f;
    if ((hd & 7) == 0) {
        for (int d = 0; d < hd; d += 8) {
            const uint4 u = *(const uint4 *)(kr + d);
            const __half2 *h = (const __half2 *)&u;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 f = __half22float2(h[j]);
                s = fmaf(q[d + 2 * j], f.x, s);
                s = fmaf(q[d + 2 * j + 1], f.y, s);
            }
        }
    } else {
        for (int d = 0; d < hd; d++) s = fmaf(q[d], __half2float(kr[d]), s);
    }
    return s;
}
static __device__ __forceinline__ float dot_row(const float *q, const float *kr, int hd) {
    float s = 0.0f;
    if ((hd & 3) == 0) {
        for (int d = 0; d < hd; d += 4) {
            const float4 f = *(const float4 *)(kr + d);
            s = fmaf(q[d], f.x, s);
            s = fmaf(q[d + 1], f.y, s);
            s = fmaf(q[d + 2], f.z, s);
            s = fmaf(q[d + 3], f.w, s);
        }
    } else {
        for (int d = 0; d < hd; d++) s = fmaf(q[d], kr[d], s);
    }
    return s;
}

/* q . (codes x scale) of a quantized row, four codes per load (hd % 4 == 0). */
template <typename C>
static __device__ __forceinline__ float dot_row_q(const float *q, const C *kr, int hd) {
    float s = 0.0f;
    for (int d = 0; d < hd; d += 4) {
        const uint32_t u = *(const uint32_t *)(kr + d);
#pragma unroll
        for (int j = 0; j < 4; j++) s = fmaf(q[d + j], cache_elem((const C *)&u, (size_t)j), s);
    }
    return s * row_scale(kr, hd);
}
static __device__ __forceinline__ float dot_row(const float *q, const int8_t *kr, int hd) { return dot_row_q(q, kr, hd); }
static __device__ __forceinline__ float dot_row(const float *q, const uint8_t *kr, int hd) { return dot_row_q(q, kr, hd); }

/* grid (n_split, n_head, n_tok). Writes out directly when n_split == 1,
 * else the unnormalised partial o and (max, sum) of its split to work. */
template <typename KV, int NI>
static __global__ void __launch_bounds__(ATT_WARPS * 32)
    attn_paged_kernel(int n_head, int n_head_kv, int head_dim, int kv_row, int block_size, int max_blocks,
                      float scale, const int32_t *seq_of_tok, const int32_t *pos_of_tok,
                      const int32_t *tables, const float *q, const KV *kc, const KV *vc, float *out,
                      int split_len, float *work_o, float2 *work_ml) {
    __shared__ float qs[ATT_MAX_NI * 32];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wo[ATT_WARPS][ATT_MAX_NI * 32];
    const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int n_split = gridDim.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hd = head_dim, kvh = h / (n_head / n_head_kv);
    const int ctx = pos_of_tok[t] + 1;
    const int j0 = split * split_len, j1 = min(ctx, j0 + split_len);
    const int32_t *bt = tables + (size_t)seq_of_tok[t] * max_blocks;
    const float *qh = q + ((size_t)t * n_head + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qh[d] * scale;
    __syncthreads();

    float m = -INFINITY, l = 0.0f, acc[NI];
#pragma unroll
    for (int i = 0; i < NI; i++) acc[i] = 0.0f;
    for (int jt = j0 + warp * 32; jt < j1; jt += ATT_WARPS * 32) {
        const int j = jt + lane;
        float s = -INFINITY, vsc = 0.0f;
        size_t off = 0;
        if (j < j1) {
            off = kv_offset(bt, block_size, n_head_kv, kv_row, j, kvh);
            s = dot_row(qs, kc + off, hd);
            vsc = row_scale(vc + off, hd);
        }
        const float tmax = warp_max(s);
        const float mn = fmaxf(m, tmax);
        const float alpha = __expf(m - mn); /* m = -inf on the first tile: 0 */
        const float p = j < j1 ? __expf(s - mn) : 0.0f;
        l = l * alpha + warp_sum(p);
        m = mn;
#pragma unroll
        for (int i = 0; i < NI; i++) acc[i] *= alpha;
        const int nk = min(32, j1 - jt);
#pragma unroll 4
        for (int kk = 0; kk < nk; kk++) {
            const float pk = __shfl_sync(0xffffffffu, p, kk) * __shfl_sync(0xffffffffu, vsc, kk);
            const size_t ok = __shfl_sync(0xffffffffu, off, kk);
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + 32 * i;
                if (d < hd) acc[i] = fmaf(pk, cache_elem(vc, ok + d), acc[i]);
            }
        }
    }
    /* combine the warps */
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < NI; i++) wo[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, wm[w]);
    float L = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++)
        if (wm[w] > -INFINITY) L += wl[w] * __expf(wm[w] - M);
    const size_t row = ((size_t)t * n_head + h);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (wm[w] > -INFINITY) o += wo[w][d] * __expf(wm[w] - M);
        if (n_split == 1)
            out[row * hd + d] = o / L;
        else
            work_o[(row * n_split + split) * hd + d] = o;
    }
    if (n_split > 1 && threadIdx.x == 0) work_ml[row * n_split + split] = make_float2(M, L);
}

/* grid (n_head, n_tok): merges the splits of each row. */
static __global__ void attn_merge_kernel(int n_head, int head_dim, int n_split, const float *work_o,
                                         const float2 *work_ml, float *out) {
    const size_t row = (size_t)blockIdx.y * n_head + blockIdx.x;
    const float2 *ml = work_ml + row * n_split;
    float M = -INFINITY;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, ml[s].x);
    float L = 0.0f;
    for (int s = 0; s < n_split; s++)
        if (ml[s].x > -INFINITY) L += ml[s].y * __expf(ml[s].x - M);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_split; s++)
            if (ml[s].x > -INFINITY) o += work_o[(row * n_split + s) * head_dim + d] * __expf(ml[s].x - M);
        out[row * head_dim + d] = o / L;
    }
}

/* Context positions per split: a multiple of the block's 128 keys, sized so
 * the grid has at least ~2 blocks per multiprocessor and at most 64 splits. */
static int split_len_for(const cp_attn_params *p, int max_pos) {
    const int ctx = max_pos + 1;
    const int64_t rows = (int64_t)p->n_tok * p->n_head;
    int want = rows >= 264 ? 1 : (int)((264 + rows - 1) / rows);
    int len = (ctx + want - 1) / want;
    len = ((len + 127) / 128) * 128;
    if (len < 256) len = 256;
    if ((ctx + len - 1) / len > 64) len = ((ctx + 63) / 64 + 127) / 128 * 128;
    return len;
}

extern "C" size_t cp_attention_work_bytes(const cp_attn_params *p, int max_pos) {
    const int len = split_len_for(p, max_pos);
    const int n_split = (max_pos + 1 + len - 1) / len;
    if (n_split <= 1) return 0;
    const size_t rows = (size_t)p->n_tok * p->n_head * n_split;
    return rows * (size_t)p->head_dim * sizeof(float) + rows * sizeof(float2);
}

extern "C" cp_status cp_attention_paged_cuda(const cp_attn_params *p, int max_pos, const float *q,
                                             const void *k_cache, const void *v_cache, float *out,
                                             void *work, cudaStream_t stream) {
    if (p->head_dim > ATT_MAX_NI * 32)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "attention: head_dim %d > %d", p->head_dim,
                        ATT_MAX_NI * 32);
    CP_CHECK(kv_check_quantized(p, "attention"));
    const int kv_row = kv_row_elems(p->kv_dtype, p->head_dim);
    const int len = split_len_for(p, max_pos);
    const int n_split = (max_pos + 1 + len - 1) / len;
    const size_t rows = (size_t)p->n_tok * p->n_head * n_split;
    float *work_o = n_split > 1 ? (float *)work : NULL;
    float2 *work_ml = n_split > 1 ? (float2 *)((float *)work + rows * p->head_dim) : NULL;
    if (p->n_tok > 65535 || p->n_head > 65535)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "attention: %d tokens x %d heads exceed the grid",
                        p->n_tok, p->n_head);
    dim3 grid((unsigned)n_split, (unsigned)p->n_head, (unsigned)p->n_tok);
    const int ni = (p->head_dim + 31) / 32;
#define CP_ATT_CALL(KV, NI)                                                                        \
    attn_paged_kernel<KV, NI><<<grid, ATT_WARPS * 32, 0, stream>>>(                                \
        p->n_head, p->n_head_kv, p->head_dim, kv_row, p->block_size, p->max_blocks, p->scale,      \
        p->seq_of_tok, p->pos_of_tok, p->block_tables, q, (const KV *)k_cache,                     \
        (const KV *)v_cache, out, len, work_o, work_ml)
    if (p->kv_dtype == CP_DTYPE_F16) {
        if (ni <= 2) CP_ATT_CALL(__half, 2);
        else if (ni <= 4) CP_ATT_CALL(__half, 4);
        else CP_ATT_CALL(__half, 8);
    } else if (p->kv_dtype == CP_DTYPE_I8_ROW) {
        if (ni <= 2) CP_ATT_CALL(int8_t, 2);
        else if (ni <= 4) CP_ATT_CALL(int8_t, 4);
        else CP_ATT_CALL(int8_t, 8);
    } else if (p->kv_dtype == CP_DTYPE_F8_ROW) {
        if (ni <= 2) CP_ATT_CALL(uint8_t, 2);
        else if (ni <= 4) CP_ATT_CALL(uint8_t, 4);
        else CP_ATT_CALL(uint8_t, 8);
    } else {
        if (ni <= 2) CP_ATT_CALL(float, 2);
        else if (ni <= 4) CP_ATT_CALL(float, 4);
        else CP_ATT_CALL(float, 8);
    }
#undef CP_ATT_CALL
    CP_CUDA_LAUNCH_CHECK();
    if (n_split > 1) {
        dim3 g2((unsigned)p->n_head, (unsigned)p->n_tok);
        attn_merge_kernel<<<g2, 128, 0, stream>>>(p->n_head, p->head_dim, n_split, work_o, work_ml,
                                                  out);
        CP_CUDA_LAUNCH_CHECK();
    }
    return CP_OK;
}
