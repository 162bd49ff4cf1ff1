/* gemv.cu - matrix-vector products for decode (1 to 8 activation rows):
 * one warp per weight row, the weight read once with wide coalesced loads
 * and decoded in registers, fp32 accumulation. Larger batches go through
 * cuBLASLt (backend_cuda.cu). */
#include "cp_cuda_ops.h"
#include "cuda_common.cuh"

#include <string.h>

#define GEMV_WARPS 4

/* x row t, 8 floats at element e (16-byte aligned). */
static __device__ __forceinline__ void load_x8(const float *x, float v[8]) {
    const float4 a = __ldg((const float4 *)x), b = __ldg((const float4 *)x + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

static __device__ __forceinline__ void unpack8(uint4 u, bool bf16, float w[8]) {
    if (bf16) {
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(h[j]);
            w[2 * j] = f.x;
            w[2 * j + 1] = f.y;
        }
    } else {
        const __half2 *h = (const __half2 *)&u;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __half22float2(h[j]);
            w[2 * j] = f.x;
            w[2 * j + 1] = f.y;
        }
    }
}

/* Up to three weight matrices of one dtype and row length, rows laid end to
 * end: a warp's global row picks its matrix. SWIGLU: two matrices (gate, up)
 * of the same rows, each warp computes both rows and writes silu(g) * u. */
typedef struct gemv_args {
    /* scalar fields, never arrays: a kernel parameter indexed at run time
     * is copied to local memory */
    const uint8_t *w0, *w1, *w2;
    float *y0, *y1, *y2;
    const float *b0, *b1, *b2;
    int end0, end1, total; /* cumulative row ends of matrices 0 and 1; all rows */
    int m0, m1, m2;        /* rows of each matrix (the stride of its output rows) */
    size_t row_bytes;
} gemv_args;

template <typename T> static __device__ __forceinline__ T pick3(int s, T a, T b, T c) {
    return s == 0 ? a : (s == 1 ? b : c);
}

static __device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* fp16 / bf16 weights: each lane takes 8 elements (16 bytes) per step, four
 * steps in flight. S warps share a row (S = 1, 2 or 4; a block holds 4 / S
 * rows): warp j of a row takes its chunks of 128 x 16 bytes j, j + S, ...,
 * and the warp after the last full chunk's takes the rest; the S partial
 * sums meet in shared memory and add in warp order. Products of few rows
 * (4096 x 4096 or 4096 x 14336 at decode) then have enough warps in flight
 * to keep the memory busy. */
template <bool BF16, int NT, bool SWI, int S>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_half_kernel(const gemv_args a, int64_t k, const float *x) {
    static_assert(S == 1 || S == 2 || S == 4, "warps per row");
    __shared__ float part[GEMV_WARPS][NT], partu[GEMV_WARPS][NT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = warp % S; /* this warp's share of its row */
    const int row = blockIdx.x * (GEMV_WARPS / S) + warp / S;
    const bool valid = row < a.total; /* no early return: the block meets at a barrier */
    const int seg = SWI ? 0 : (row < a.end0 ? 0 : (row < a.end1 ? 1 : 2));
    const int lr = seg == 0 ? row : row - (seg == 1 ? a.end0 : a.end1);
    const int64_t k8 = k / 8;
    const uint4 *wr = (const uint4 *)pick3(seg, a.w0, a.w1, a.w2) + (size_t)lr * k8;
    const uint4 *wu = SWI ? (const uint4 *)a.w1 + (size_t)lr * k8 : wr;
    float acc[NT], accu[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = accu[t] = 0.0f;
    const int64_t nfull = k8 / 128; /* chunks of 128 x 16 bytes: 4 loads per lane */
    for (int64_t q = j; valid && q < nfull; q += S) {
        const int64_t c = q * 128 + lane;
        uint4 u[4], uu[4];
#pragma unroll
        for (int s = 0; s < 4; s++) {
            u[s] = __ldg(wr + c + 32 * s);
            if (SWI) uu[s] = __ldg(wu + c + 32 * s);
        }
#pragma unroll
        for (int s = 0; s < 4; s++) {
            float wv[8], wuv[8];
            unpack8(u[s], BF16, wv);
            if (SWI) unpack8(uu[s], BF16, wuv);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float xv[8];
                load_x8(x + (size_t)t * k + (c + 32 * s) * 8, xv);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    acc[t] = fmaf(wv[e], xv[e], acc[t]);
                    if (SWI) accu[t] = fmaf(wuv[e], xv[e], accu[t]);
                }
            }
        }
    }
    if (valid && j == (int)(nfull % S))
        for (int64_t c = nfull * 128 + lane; c < k8; c += 32) {
            float wv[8], wuv[8];
            unpack8(__ldg(wr + c), BF16, wv);
            if (SWI) unpack8(__ldg(wu + c), BF16, wuv);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float xv[8];
                load_x8(x + (size_t)t * k + c * 8, xv);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    acc[t] = fmaf(wv[e], xv[e], acc[t]);
                    if (SWI) accu[t] = fmaf(wuv[e], xv[e], accu[t]);
                }
            }
        }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        acc[t] = warp_sum(acc[t]);
        if (SWI) accu[t] = warp_sum(accu[t]);
    }
    if (S > 1) {
        if (lane == 0)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                part[warp][t] = acc[t];
                partu[warp][t] = accu[t];
            }
        __syncthreads();
        if (j == 0)
#pragma unroll
            for (int t = 0; t < NT; t++)
#pragma unroll
                for (int i = 1; i < S; i++) {
                    acc[t] += part[warp + i][t];
                    if (SWI) accu[t] += partu[warp + i][t];
                }
    }
    if (!valid || j != 0 || lane != 0) return;
    float *y = pick3(seg, a.y0, a.y1, a.y2);
    const float *bias = pick3(seg, a.b0, a.b1, a.b2);
    const int m = pick3(seg, a.m0, a.m1, a.m2);
#pragma unroll
    for (int t = 0; t < NT; t++)
        y[(size_t)t * m + lr] = SWI ? silu_mul(acc[t], accu[t]) : acc[t] + (bias ? bias[lr] : 0.0f);
}

/* Block types: each lane decodes 32 values per step. */
template <int T, int NT, bool SWI>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_block_kernel(const gemv_args a, int64_t k, const float *x) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= a.total) return;
    const int seg = SWI ? 0 : (row < a.end0 ? 0 : (row < a.end1 ? 1 : 2));
    const int lr = seg == 0 ? row : row - (seg == 1 ? a.end0 : a.end1);
    const uint8_t *wr = pick3(seg, a.w0, a.w1, a.w2) + (size_t)lr * a.row_bytes;
    const uint8_t *wu = SWI ? a.w1 + (size_t)lr * a.row_bytes : wr;
    const int64_t chunks = k / 32;
    float acc[NT], accu[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = accu[t] = 0.0f;
    for (int64_t c = lane; c < chunks; c += 32) {
        float v[32], vu[32];
        dq32_row<T>(wr, k, c, v);
        if (SWI) dq32_row<T>(wu, k, c, vu);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float *xr = x + (size_t)t * k + c * 32;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float xv[8];
                load_x8(xr + 8 * q, xv);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    acc[t] = fmaf(v[8 * q + j], xv[j], acc[t]);
                    if (SWI) accu[t] = fmaf(vu[8 * q + j], xv[j], accu[t]);
                }
            }
        }
    }
    float *y = pick3(seg, a.y0, a.y1, a.y2);
    const float *bias = pick3(seg, a.b0, a.b1, a.b2);
    const int m = pick3(seg, a.m0, a.m1, a.m2);
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        const float su = SWI ? warp_sum(accu[t]) : 0.0f;
        if (lane == 0) y[(size_t)t * m + lr] = SWI ? silu_mul(s, su) : s + (bias ? bias[lr] : 0.0f);
    }
}

template <int NT, bool SWI>
static cp_status gemv_nt(cp_dtype t, const gemv_args &a, int64_t k, const float *x,
                         cudaStream_t stream) {
    const int rows = a.total;
    const unsigned blocks = (unsigned)((rows + GEMV_WARPS - 1) / GEMV_WARPS);
    const int threads = GEMV_WARPS * 32;
    if (t == CP_DTYPE_BF16 || t == CP_DTYPE_F16) {
        /* warps per row: at least ~16k warps in all where the row has a
         * full chunk for each (an H100 holds 132 x 64) */
        const int64_t chunks = k / 8 / 128;
        const int S = rows <= 4096 && chunks >= 4 ? 4 : (rows <= 8192 && chunks >= 2 ? 2 : 1);
        const unsigned sb = (unsigned)(((int64_t)rows * S + GEMV_WARPS - 1) / GEMV_WARPS);
#define CP_GEMV_HALF(B, S_) gemv_half_kernel<B, NT, SWI, S_><<<sb, threads, 0, stream>>>(a, k, x)
        if (t == CP_DTYPE_BF16) {
            if (S == 4) CP_GEMV_HALF(true, 4);
            else if (S == 2) CP_GEMV_HALF(true, 2);
            else CP_GEMV_HALF(true, 1);
        } else {
            if (S == 4) CP_GEMV_HALF(false, 4);
            else if (S == 2) CP_GEMV_HALF(false, 2);
            else CP_GEMV_HALF(false, 1);
        }
#undef CP_GEMV_HALF
    } else {
#define CP_GEMV_CALL(T) gemv_block_kernel<T, NT, SWI><<<blocks, threads, 0, stream>>>(a, k, x)
        CP_CUDA_SWITCH_BLOCK_DTYPE(t, CP_GEMV_CALL,
                                   return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv: no kernel for %s",
                                                   cp_dtype_name(t)))
#undef CP_GEMV_CALL
    }
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* Whether the GEMV kernels take these operands; fills a. */
static bool gemv_prepare(int count, const cp_tensor *const *w, const float *x, int n,
                         float *const *y, const float *const *bias, int max_n, gemv_args *a) {
    const cp_dtype t = w[0]->dtype;
    const int64_t k = w[0]->ne[0];
    if (n < 1 || n > max_n || t == CP_DTYPE_F32 || count < 1 || count > 3) return false;
    const bool half = t == CP_DTYPE_F16 || t == CP_DTYPE_BF16;
    if ((half && k % 8 != 0) || (!half && k % 32 != 0) || ((uintptr_t)x & 15)) return false;
    int64_t end = 0;
    int ends[3] = {0, 0, 0};
    memset(a, 0, sizeof(*a));
    for (int i = 0; i < count; i++) {
        if (w[i]->dtype != t || w[i]->ne[0] != k) return false;
        if ((half && ((uintptr_t)w[i]->data & 15)) || (!half && ((uintptr_t)w[i]->data & 3)))
            return false;
        end += w[i]->ne[1];
        if (end > INT32_MAX / 2) return false;
        ends[i] = (int)end;
    }
    a->w0 = (const uint8_t *)w[0]->data;
    a->y0 = y[0];
    a->b0 = bias ? bias[0] : NULL;
    a->m0 = (int)w[0]->ne[1];
    if (count > 1) {
        a->w1 = (const uint8_t *)w[1]->data;
        a->y1 = y[1];
        a->b1 = bias ? bias[1] : NULL;
        a->m1 = (int)w[1]->ne[1];
    }
    if (count > 2) {
        a->w2 = (const uint8_t *)w[2]->data;
        a->y2 = y[2];
        a->b2 = bias ? bias[2] : NULL;
        a->m2 = (int)w[2]->ne[1];
    }
    a->end0 = ends[0];
    a->end1 = count > 1 ? ends[1] : ends[0];
    a->total = (int)end;
    a->row_bytes = w[0]->nb[1];
    return true;
}

template <bool SWI>
static cp_status gemv_dispatch(cp_dtype t, const gemv_args &a, int64_t k, const float *x, int n,
                               cudaStream_t stream) {
    switch (n) {
    case 1: return gemv_nt<1, SWI>(t, a, k, x, stream);
    case 2: return gemv_nt<2, SWI>(t, a, k, x, stream);
    case 3: return gemv_nt<3, SWI>(t, a, k, x, stream);
    case 4: return gemv_nt<4, SWI>(t, a, k, x, stream);
    case 5: return gemv_nt<5, SWI>(t, a, k, x, stream);
    case 6: return gemv_nt<6, SWI>(t, a, k, x, stream);
    case 7: return gemv_nt<7, SWI>(t, a, k, x, stream);
    default: return gemv_nt<8, SWI>(t, a, k, x, stream);
    }
}

extern "C" cp_status cp_gemv_group_cuda(int count, const cp_tensor *const *w, const float *x,
                                        int n, float *const *y, const float *const *bias,
                                        cudaStream_t stream) {
    gemv_args a;
    if (!gemv_prepare(count, w, x, n, y, bias, 8, &a))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv: %d rows of %s", n, cp_dtype_name(w[0]->dtype));
    return gemv_dispatch<false>(w[0]->dtype, a, w[0]->ne[0], x, n, stream);
}

extern "C" cp_status cp_gemv_cuda(const cp_tensor *w, const float *x, int n, float *y,
                                  const float *bias, cudaStream_t stream) {
    const cp_tensor *ws[1] = {w};
    float *ys[1] = {y};
    const float *bs[1] = {bias};
    return cp_gemv_group_cuda(1, ws, x, n, ys, bs, stream);
}

/* The fused SwiGLU product runs for up to 2 rows (the decode batches where
 * the weights dominate); 2 matrices x 32 decoded values per lane. */
extern "C" cp_status cp_gemv_swiglu_cuda(const cp_tensor *wg, const cp_tensor *wu, const float *x,
                                         int n, float *out, cudaStream_t stream) {
    const cp_tensor *ws[2] = {wg, wu};
    float *ys[2] = {out, out};
    gemv_args a;
    if (!gemv_prepare(2, ws, x, n, ys, NULL, 2, &a) || wg->ne[1] != wu->ne[1])
        return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv swiglu: %d rows of %s", n, cp_dtype_name(wg->dtype));
    /* one grid over the rows of gate; each warp reads both matrices */
    a.end0 = a.end1 = a.total = (int)wg->ne[1];
    switch (n) {
    case 1: return gemv_nt<1, true>(wg->dtype, a, wg->ne[0], x, stream);
    default: return gemv_nt<2, true>(wg->dtype, a, wg->ne[0], x, stream);
    }
}
