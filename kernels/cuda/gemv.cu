/* gemv.cu - matrix-vector products for decode (1 to 8 activation rows):
 * one warp per weight row, the weight read once with wide coalesced loads
 * and decoded in registers, fp32 accumulation. Larger batches go through
 * cuBLASLt (backend_cuda.cu). */
#include "cp_cuda_ops.h"
#include "cuda_common.cuh"

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

/* fp16 / bf16 weights: each lane takes 8 elements (16 bytes) per step, four
 * steps in flight. */
template <bool BF16, int NT>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_half_kernel(const uint4 *w, int64_t k, int m, const float *x, float *y,
                     const float *bias) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= m) return;
    const int64_t k8 = k / 8;
    const uint4 *wr = w + (size_t)row * k8;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    int64_t c = lane;
    for (; c + 96 < k8; c += 128) {
        uint4 u[4];
#pragma unroll
        for (int s = 0; s < 4; s++) u[s] = __ldg(wr + c + 32 * s);
#pragma unroll
        for (int s = 0; s < 4; s++) {
            float wv[8];
            unpack8(u[s], BF16, wv);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float xv[8];
                load_x8(x + (size_t)t * k + (c + 32 * s) * 8, xv);
#pragma unroll
                for (int j = 0; j < 8; j++) acc[t] = fmaf(wv[j], xv[j], acc[t]);
            }
        }
    }
    for (; c < k8; c += 32) {
        float wv[8];
        unpack8(__ldg(wr + c), BF16, wv);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float xv[8];
            load_x8(x + (size_t)t * k + c * 8, xv);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[t] = fmaf(wv[j], xv[j], acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)t * m + row] = s + (bias ? bias[row] : 0.0f);
    }
}

/* Block types: each lane decodes 32 values per step. */
template <int T, int NT>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_block_kernel(const uint8_t *w, size_t row_bytes, int64_t k, int m, const float *x,
                      float *y, const float *bias) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= m) return;
    const uint8_t *wr = w + (size_t)row * row_bytes;
    const int64_t chunks = k / 32;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    for (int64_t c = lane; c < chunks; c += 32) {
        float v[32];
        dq32<T>(wr, c, v);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float *xr = x + (size_t)t * k + c * 32;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float xv[8];
                load_x8(xr + 8 * q, xv);
#pragma unroll
                for (int j = 0; j < 8; j++) acc[t] = fmaf(v[8 * q + j], xv[j], acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)t * m + row] = s + (bias ? bias[row] : 0.0f);
    }
}

template <int NT>
static cp_status gemv_nt(const cp_tensor *w, const float *x, float *y, const float *bias,
                         cudaStream_t stream) {
    const int64_t k = w->ne[0];
    const int m = (int)w->ne[1];
    const unsigned blocks = (unsigned)((m + GEMV_WARPS - 1) / GEMV_WARPS);
    const int threads = GEMV_WARPS * 32;
    const cp_dtype t = w->dtype;
    if (t == CP_DTYPE_BF16)
        gemv_half_kernel<true, NT><<<blocks, threads, 0, stream>>>((const uint4 *)w->data, k, m, x, y, bias);
    else if (t == CP_DTYPE_F16)
        gemv_half_kernel<false, NT><<<blocks, threads, 0, stream>>>((const uint4 *)w->data, k, m, x, y, bias);
    else {
        const uint8_t *d = (const uint8_t *)w->data;
        const size_t rb = w->nb[1];
#define CP_GEMV_CALL(T) gemv_block_kernel<T, NT><<<blocks, threads, 0, stream>>>(d, rb, k, m, x, y, bias)
        switch (t) {
        case CP_DTYPE_Q4_0: CP_GEMV_CALL(CP_DTYPE_Q4_0); break;
        case CP_DTYPE_Q4_1: CP_GEMV_CALL(CP_DTYPE_Q4_1); break;
        case CP_DTYPE_Q5_0: CP_GEMV_CALL(CP_DTYPE_Q5_0); break;
        case CP_DTYPE_Q5_1: CP_GEMV_CALL(CP_DTYPE_Q5_1); break;
        case CP_DTYPE_Q8_0: CP_GEMV_CALL(CP_DTYPE_Q8_0); break;
        case CP_DTYPE_Q4_K: CP_GEMV_CALL(CP_DTYPE_Q4_K); break;
        case CP_DTYPE_Q5_K: CP_GEMV_CALL(CP_DTYPE_Q5_K); break;
        case CP_DTYPE_Q6_K: CP_GEMV_CALL(CP_DTYPE_Q6_K); break;
        default:
            return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv: no kernel for %s", cp_dtype_name(t));
        }
#undef CP_GEMV_CALL
    }
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

extern "C" cp_status cp_gemv_cuda(const cp_tensor *w, const float *x, int n, float *y,
                                  const float *bias, cudaStream_t stream) {
    const cp_dtype t = w->dtype;
    const int64_t k = w->ne[0];
    if (n < 1 || n > 8 || t == CP_DTYPE_F32 || w->ne[1] > INT32_MAX)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv: %d rows of %s", n, cp_dtype_name(t));
    const bool half = t == CP_DTYPE_F16 || t == CP_DTYPE_BF16;
    if ((half && k % 8 != 0) || (!half && k % 32 != 0) || ((uintptr_t)x & 15) ||
        (half && ((uintptr_t)w->data & 15)) || (!half && ((uintptr_t)w->data & 3)))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "gemv: unaligned operands");
    switch (n) {
    case 1: return gemv_nt<1>(w, x, y, bias, stream);
    case 2: return gemv_nt<2>(w, x, y, bias, stream);
    case 3: return gemv_nt<3>(w, x, y, bias, stream);
    case 4: return gemv_nt<4>(w, x, y, bias, stream);
    case 5: return gemv_nt<5>(w, x, y, bias, stream);
    case 6: return gemv_nt<6>(w, x, y, bias, stream);
    case 7: return gemv_nt<7>(w, x, y, bias, stream);
    default: return gemv_nt<8>(w, x, y, bias, stream);
    }
}
