/* fp8.cu - the W8A8 side of F8_ROW weights (kernels/cp_dtype.h): the
 * per-token E4M3 quantization of activations with the CPU reference's
 * arithmetic (cp_e4m3_encode, shared inline), the weights' per-row scales
 * gathered into a vector, fp16 copies of the weight codes for GPUs without
 * FP8 tensor cores, and the epilogue that applies both scales to a product
 * of codes. */
#include "cp_cuda_ops.h"
#include "cuda_common.cuh"

#include <float.h>

#define F8_THREADS 256

/* One block per token row: amax (infinite -> FLT_MAX, as row_amax of
 * kernels/cpu/quants_own.c), scale = amax / 448, codes e4m3(x * 448 / amax)
 * with the factor at most FLT_MAX (row_inv there); every step one correctly
 * rounded fp32 operation, so the codes equal the CPU reference's bit for
 * bit. */
template <int MODE>
static __global__ void __launch_bounds__(F8_THREADS)
    f8_quant_kernel(const float *x, int64_t k, void *out, float *sx) {
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float *xr = x + r * k;
    float a = 0.0f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) a = fmaxf(a, fabsf(xr[i]));
    a = block_max(a, red);
    if (!isfinite(a)) a = FLT_MAX;
    const float s = a / 448.0f, inv = a > 0.0f ? fminf(448.0f / a, FLT_MAX) : 0.0f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
        const uint8_t q = cp_e4m3_encode(xr[i] * inv);
        if (MODE == CP_F8_ACT_DEQUANT) ((float *)out)[r * k + i] = cp_e4m3_decode(q) * s;
        else if (MODE == CP_F8_ACT_CODES) ((uint8_t *)out)[r * k + i] = q;
        else ((__half *)out)[r * k + i] = __float2half_rn(cp_e4m3_decode(q)); /* exact */
    }
    if (threadIdx.x == 0 && sx) sx[r] = s;
}

extern "C" cp_status cp_f8_quantize_act_cuda(const float *x, int n, int64_t k, int mode, void *out,
                                             float *sx, cudaStream_t stream) {
    if (n < 1 || k < 1) return CP_OK;
    switch (mode) {
    case CP_F8_ACT_DEQUANT: f8_quant_kernel<CP_F8_ACT_DEQUANT><<<n, F8_THREADS, 0, stream>>>(x, k, out, sx); break;
    case CP_F8_ACT_CODES: f8_quant_kernel<CP_F8_ACT_CODES><<<n, F8_THREADS, 0, stream>>>(x, k, out, sx); break;
    case CP_F8_ACT_CODES_F16: f8_quant_kernel<CP_F8_ACT_CODES_F16><<<n, F8_THREADS, 0, stream>>>(x, k, out, sx); break;
    default: return CP_ERROR(CP_ERR_INVALID_ARG, "fp8 activations: unknown mode %d", mode);
    }
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* sw[r] = the scale trailing row row0 + r (4-byte aligned: cols % 4 == 0). */
static __global__ void f8_row_scales_kernel(const uint8_t *data, size_t row_bytes, int64_t cols,
                                            int64_t nrows, float *sw) {
    const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r < nrows) sw[r] = *(const float *)(data + (size_t)r * row_bytes + (size_t)cols);
}

extern "C" cp_status cp_f8_row_scales_cuda(const cp_tensor *w, int64_t row0, int64_t nrows,
                                           float *sw, cudaStream_t stream) {
    if (nrows < 1) return CP_OK;
    if (w->ne[0] % 4 != 0)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "fp8 rows of %lld values: the scale is not 4-byte aligned",
                        (long long)w->ne[0]);
    const uint8_t *d = (const uint8_t *)w->data + (size_t)row0 * w->nb[1];
    f8_row_scales_kernel<<<(unsigned)((nrows + 255) / 256), 256, 0, stream>>>(d, w->nb[1], w->ne[0],
                                                                              nrows, sw);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* out[r][c] = e4m3(code) as fp16 (exact), without the row's scale; four
 * codes per thread (cols % 4 == 0). */
static __global__ void f8_codes_f16_kernel(const uint8_t *data, size_t row_bytes, int64_t cols,
                                           int64_t nrows, __half *out) {
    for (int64_t r = blockIdx.y; r < nrows; r += gridDim.y) {
        const uint32_t *q = (const uint32_t *)(data + (size_t)r * row_bytes);
        __half *o = out + r * cols;
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < cols / 4;
             i += (int64_t)gridDim.x * blockDim.x) {
            const uint32_t v = q[i];
#pragma unroll
            for (int j = 0; j < 4; j++)
                o[4 * i + j] = __float2half_rn(cp_e4m3_decode((uint8_t)(v >> (8 * j))));
        }
    }
}

extern "C" cp_status cp_f8_codes_f16_cuda(const cp_tensor *w, int64_t row0, int64_t nrows, void *out,
                                          cudaStream_t stream) {
    if (nrows < 1) return CP_OK;
    if (w->ne[0] % 4 != 0)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "fp8 rows of %lld values are not whole 4-byte words",
                        (long long)w->ne[0]);
    const int64_t words = w->ne[0] / 4;
    dim3 grid((unsigned)((words + 255) / 256 > 16 ? 16 : (words + 255) / 256),
              (unsigned)(nrows < 65535 ? nrows : 65535));
    const uint8_t *d = (const uint8_t *)w->data + (size_t)row0 * w->nb[1];
    f8_codes_f16_kernel<<<grid, 256, 0, stream>>>(d, w->nb[1], w->ne[0], nrows, (__half *)out);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* y[i][j] (row stride ldd) = y[i][j] * sx[i] * sw[j] + bias[j]; any of the
 * three vectors may be NULL (factor 1, no bias). Rows on the grid's y
 * dimension, columns on x. */
static __global__ void f8_epilogue_kernel(float *y, int n, int64_t m, int64_t ldd, const float *sx,
                                          const float *sw, const float *bias) {
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
        const float a = sx ? sx[i] : 1.0f;
        float *yr = y + i * ldd;
        for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m;
             j += (int64_t)gridDim.x * blockDim.x) {
            float v = yr[j];
            if (sw) v *= sw[j]; /* the weight's scale first, as the CPU's dot products */
            v *= a;
            if (bias) v += bias[j];
            yr[j] = v;
        }
    }
}

extern "C" cp_status cp_f8_epilogue_cuda(float *y, int n, int64_t m, int64_t ldd, const float *sx,
                                         const float *sw, const float *bias, cudaStream_t stream) {
    if (n < 1 || m < 1 || (!sx && !sw && !bias)) return CP_OK;
    const int64_t bx = (m + 255) / 256;
    dim3 grid((unsigned)(bx > 64 ? 64 : bx), (unsigned)(n < 65535 ? n : 65535));
    f8_epilogue_kernel<<<grid, 256, 0, stream>>>(y, n, m, ldd, sx, sw, bias);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}
