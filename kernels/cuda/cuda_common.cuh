/* cuda_common.cuh - private to kernels/cuda: error translation macros,
 * warp reductions and the device-side decoding of the GGUF block formats
 * (32 values at a time), shared by the .cu files of the CUDA backend. */
#ifndef CP_CUDA_COMMON_CUH
#define CP_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cp_common.h"
#include "cp_dtype.h"

/* One generic translation of a foreign status into cp_status. */
#define CP_FOREIGN_CHECK_GEN(expr, ok, code, str_fn)                                               \
    do {                                                                                           \
        auto cp_fst_ = (expr);                                                                     \
        if (cp_fst_ != (ok))                                                                       \
            return CP_ERROR(code, "%s: %s (%d)", #expr, str_fn(cp_fst_), (int)cp_fst_);            \
    } while (0)

#define CP_CUDA_CHECK(expr) CP_FOREIGN_CHECK_GEN(expr, cudaSuccess, CP_ERR_CUDA, cudaGetErrorString)
#define CP_CUDA_LAUNCH_CHECK() CP_CUDA_CHECK(cudaGetLastError())

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over a block of at most 1024 threads; every thread gets the result.
 * red must hold 32 floats; the block size a multiple of 32. */
static __device__ __forceinline__ float block_sum(float v, float *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}

static __device__ __forceinline__ float block_max(float v, float *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return warp_max(v);
}

static __device__ __forceinline__ float ld_f16(const uint8_t *p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

static __device__ __forceinline__ uint32_t ld_u32_bytes(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* K-quant 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
static __device__ __forceinline__ void k4_scale_min(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Bytes per block and elements per block of the weight types the CUDA
 * backend reads. */
template <int T> struct cp_qtraits;
template <> struct cp_qtraits<CP_DTYPE_F32> { enum { bytes = 4, elems = 1 }; };
template <> struct cp_qtraits<CP_DTYPE_F16> { enum { bytes = 2, elems = 1 }; };
template <> struct cp_qtraits<CP_DTYPE_BF16> { enum { bytes = 2, elems = 1 }; };
template <> struct cp_qtraits<CP_DTYPE_Q4_0> { enum { bytes = 18, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_Q4_1> { enum { bytes = 20, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_Q5_0> { enum { bytes = 22, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_Q5_1> { enum { bytes = 24, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_Q8_0> { enum { bytes = 34, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_Q4_K> { enum { bytes = 144, elems = 256 }; };
template <> struct cp_qtraits<CP_DTYPE_Q5_K> { enum { bytes = 176, elems = 256 }; };
template <> struct cp_qtraits<CP_DTYPE_Q6_K> { enum { bytes = 210, elems = 256 }; };
template <> struct cp_qtraits<CP_DTYPE_I4_G32> { enum { bytes = 20, elems = 32 }; };
template <> struct cp_qtraits<CP_DTYPE_I4_G128> { enum { bytes = 68, elems = 128 }; };
template <> struct cp_qtraits<CP_DTYPE_S24_Q8> { enum { bytes = 24, elems = 32 }; };

/* Decodes the 32 consecutive values c*32 .. c*32+31 of a row (row: its first
 * byte) into v. Same arithmetic as the CPU reference in kernels/cpu/quants.c. */
template <int T> static __device__ __forceinline__ void dq32(const uint8_t *row, int64_t c, float v[32]);

template <> __device__ __forceinline__ void dq32<CP_DTYPE_F32>(const uint8_t *row, int64_t c, float v[32]) {
    const float4 *p = (const float4 *)(row + c * 128);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float4 f = p[i];
        v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_F16>(const uint8_t *row, int64_t c, float v[32]) {
    const uint4 *p = (const uint4 *)(row + c * 64);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint4 u = p[i];
        const __half2 *h = (const __half2 *)&u;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __half22float2(h[j]);
            v[8 * i + 2 * j] = f.x; v[8 * i + 2 * j + 1] = f.y;
        }
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_BF16>(const uint8_t *row, int64_t c, float v[32]) {
    const uint4 *p = (const uint4 *)(row + c * 64);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint4 u = p[i];
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(h[j]);
            v[8 * i + 2 * j] = f.x; v[8 * i + 2 * j + 1] = f.y;
        }
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q4_0>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 18;
    const float d = ld_f16(b);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int q = b[2 + j];
        v[j] = d * (float)((q & 15) - 8);
        v[j + 16] = d * (float)((q >> 4) - 8);
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q4_1>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 20;
    const float d = ld_f16(b), m = ld_f16(b + 2);
    const uint32_t *qs = (const uint32_t *)(b + 4); /* 20-byte blocks: 4-byte aligned */
#pragma unroll
    for (int w = 0; w < 4; w++) {
        const uint32_t q = qs[w];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int x = (q >> (8 * j)) & 0xff;
            v[4 * w + j] = d * (float)(x & 15) + m;
            v[4 * w + j + 16] = d * (float)(x >> 4) + m;
        }
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q5_0>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 22;
    const float d = ld_f16(b);
    const uint32_t qh = ld_u32_bytes(b + 2);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int q = b[6 + j];
        const int q0 = (q & 15) | (int)(((qh >> j) & 1u) << 4);
        const int q1 = (q >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        v[j] = d * (float)(q0 - 16);
        v[j + 16] = d * (float)(q1 - 16);
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q5_1>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 24;
    const float d = ld_f16(b), m = ld_f16(b + 2);
    const uint32_t qh = ld_u32_bytes(b + 4);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int q = b[8 + j];
        const int q0 = (q & 15) | (int)(((qh >> j) & 1u) << 4);
        const int q1 = (q >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        v[j] = d * (float)q0 + m;
        v[j + 16] = d * (float)q1 + m;
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q8_0>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 34;
    const float d = ld_f16(b);
    const uint16_t *qs = (const uint16_t *)(b + 2); /* 34-byte blocks: 2-byte aligned */
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const uint16_t q = qs[j];
        v[2 * j] = d * (float)(int8_t)(q & 0xff);
        v[2 * j + 1] = d * (float)(int8_t)(q >> 8);
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q4_K>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + (c >> 3) * 144;
    const int j = (int)(c & 7);
    const float d = ld_f16(b), dmin = ld_f16(b + 2);
    int sc, m;
    k4_scale_min(j, b + 4, &sc, &m);
    const float dd = d * (float)sc, o = dmin * (float)m;
    const uint32_t *q = (const uint32_t *)(b + 16 + 32 * (j >> 1));
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int w = 0; w < 8; w++) {
        const uint32_t x = q[w];
#pragma unroll
        for (int k = 0; k < 4; k++) v[4 * w + k] = dd * (float)((x >> (8 * k + shift)) & 15) - o;
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q5_K>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + (c >> 3) * 176;
    const int j = (int)(c & 7);
    const float d = ld_f16(b), dmin = ld_f16(b + 2);
    int sc, m;
    k4_scale_min(j, b + 4, &sc, &m);
    const float dd = d * (float)sc, o = dmin * (float)m;
    const uint8_t *qh = b + 16, *q = b + 48 + 32 * (j >> 1);
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int l = 0; l < 32; l++) {
        const int x = ((q[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4);
        v[l] = dd * (float)x - o;
    }
}
template <> __device__ __forceinline__ void dq32<CP_DTYPE_Q6_K>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + (c >> 3) * 210;
    const int j = (int)(c & 7), h = j >> 2, qq = j & 3;
    const uint8_t *ql = b + 64 * h + (qq & 1) * 32, *qh = b + 128 + 32 * h;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = ld_f16(b + 208);
    const int lshift = (qq >> 1) * 4, hshift = 2 * qq;
    const float d0 = d * (float)scales[8 * h + 2 * qq], d1 = d * (float)scales[8 * h + 2 * qq + 1];
#pragma unroll
    for (int l = 0; l < 32; l++) {
        const int x = (((ql[l] >> lshift) & 15) | (((qh[l] >> hshift) & 3) << 4)) - 32;
        v[l] = (l < 16 ? d0 : d1) * (float)x;
    }
}
/* Asymmetric 4-bit groups (cparallel's int4/awq output and the regrouped
 * GPTQ/AWQ checkpoints): value (q - z) * d, element j of a group in the low
 * nibble of qs[j] and element j + G/2 in the high one. Blocks of 20 and 68
 * bytes keep their codes 4-byte aligned. */
template <> __device__ __forceinline__ void dq32<CP_DTYPE_I4_G32>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 20;
    const float d = ld_f16(b);
    const int z = b[2];
    const uint32_t *qs = (const uint32_t *)(b + 4);
#pragma unroll
    for (int w = 0; w < 4; w++) {
        const uint32_t q = qs[w];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int x = (q >> (8 * j)) & 0xff;
            v[4 * w + j] = (float)((x & 15) - z) * d;
            v[4 * w + j + 16] = (float)((x >> 4) - z) * d;
        }
    }
}
/* Chunk c is quarter c % 4 of group c / 4: quarters 0 and 1 are the low
 * nibbles of qs[0..32) and qs[32..64), quarters 2 and 3 their high ones. */
template <> __device__ __forceinline__ void dq32<CP_DTYPE_I4_G128>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + (c >> 2) * 68;
    const float d = ld_f16(b);
    const int z = b[2];
    const int quarter = (int)(c & 3), shift = (quarter >> 1) * 4;
    const uint32_t *qs = (const uint32_t *)(b + 4 + (quarter & 1) * 32);
#pragma unroll
    for (int w = 0; w < 8; w++) {
        const uint32_t q = qs[w] >> shift;
#pragma unroll
        for (int j = 0; j < 4; j++) v[4 * w + j] = (float)((int)((q >> (8 * j)) & 15) - z) * d;
    }
}
/* 2:4 sparse int8 (S24_Q8, kernels/cp_dtype.h): {fp16 d; u16 0; u32 mask;
 * int8 qs[16]}; in group g of 4 elements, the r-th set bit of nibble g
 * (r < 2) holds qs[2g + r] * d, every other element 0 (the rule of
 * cp_cpu_s24_q8_to_float, so a malformed mask reads nothing outside its
 * block). Bytewise loads: a block is only 2-byte aligned in general. */
template <> __device__ __forceinline__ void dq32<CP_DTYPE_S24_Q8>(const uint8_t *row, int64_t c, float v[32]) {
    const uint8_t *b = row + c * 24;
    const float d = ld_f16(b);
    const uint32_t mask = ld_u32_bytes(b + 4);
#pragma unroll
    for (int g = 0; g < 8; g++) {
        const uint32_t nib = (mask >> (4 * g)) & 15u;
        const float q0 = (float)(int8_t)b[8 + 2 * g], q1 = (float)(int8_t)b[9 + 2 * g];
        int r = 0;
#pragma unroll
        for (int p = 0; p < 4; p++) {
            const bool kept = ((nib >> p) & 1u) && r < 2;
            v[4 * g + p] = kept ? d * (r == 0 ? q0 : q1) : 0.0f;
            r += kept;
        }
    }
}
/* dq32 for a row of cols values: the same, except for int8 and fp8 rows
 * (I8_ROW, F8_ROW), whose fp32 scale follows the row's cols codes (value
 * code * scale, as the CPU reference); with cols a multiple of 32 both are
 * 4-byte aligned. */
template <int T>
static __device__ __forceinline__ void dq32_row(const uint8_t *row, int64_t cols, int64_t c, float v[32]) {
    (void)cols;
    dq32<T>(row, c, v);
}
/* The rows' codes: int8 (I8_ROW) or E4M3 (F8_ROW; cp_e4m3_decode is the
 * inline code behind the CPU's cp_e4m3_to_fp32). */
template <int T> static __device__ __forceinline__ float row_code(uint8_t b);
template <> __device__ __forceinline__ float row_code<CP_DTYPE_I8_ROW>(uint8_t b) { return (float)(int8_t)b; }
template <> __device__ __forceinline__ float row_code<CP_DTYPE_F8_ROW>(uint8_t b) { return cp_e4m3_decode(b); }
template <int T>
static __device__ __forceinline__ void dq32_scaled_row(const uint8_t *row, int64_t cols, int64_t c, float v[32]) {
    const float s = *(const float *)(row + cols);
    const uint32_t *q = (const uint32_t *)(row + c * 32);
#pragma unroll
    for (int w = 0; w < 8; w++) {
        const uint32_t x = q[w];
#pragma unroll
        for (int j = 0; j < 4; j++) v[4 * w + j] = row_code<T>((uint8_t)(x >> (8 * j))) * s;
    }
}
template <>
__device__ __forceinline__ void dq32_row<CP_DTYPE_I8_ROW>(const uint8_t *row, int64_t cols, int64_t c, float v[32]) {
    dq32_scaled_row<CP_DTYPE_I8_ROW>(row, cols, c, v);
}
template <>
__device__ __forceinline__ void dq32_row<CP_DTYPE_F8_ROW>(const uint8_t *row, int64_t cols, int64_t c, float v[32]) {
    dq32_scaled_row<CP_DTYPE_F8_ROW>(row, cols, c, v);
}

/* Element offset of (cache slot of position pos of a sequence whose block
 * table row is bt, kv head kvh). */
static __device__ __forceinline__ size_t kv_slot(const int32_t *bt, int block_size, int n_head_kv,
                                                 int head_dim, int pos, int kvh) {
    const size_t slot = (size_t)bt[pos / block_size] * block_size + (size_t)(pos % block_size);
    return (slot * n_head_kv + kvh) * (size_t)head_dim;
}
static __device__ __forceinline__ void store_kv(__half *c, size_t i, float v) { c[i] = __float2half_rn(v); }
static __device__ __forceinline__ void store_kv(float *c, size_t i, float v) { c[i] = v; }

/* The block types' rows hold 32 values or more; int8 / fp8 rows (I8_ROW,
 * F8_ROW) may hold any number, and the kernels read them 32 at a time. */
static inline cp_status cuda_check_row_width(cp_dtype t, int64_t cols) {
    if (cols % 32 != 0)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "the CUDA backend reads %s rows of a multiple of 32 "
                        "values, not %lld", cp_dtype_name(t), (long long)cols);
    return CP_OK;
}

/* Row bytes of cols elements of a block type T. */
template <int T> static __host__ __device__ __forceinline__ int64_t row_bytes_t(int64_t cols) {
    return cols / cp_qtraits<T>::elems * cp_qtraits<T>::bytes;
}

/* The block types (every type the CUDA backend reads but the float ones):
 * CALL(T) with T the compile-time constant of t, else the statement(s)
 * after CALL. One list for the GEMV and the row-decoding kernels. */
#define CP_CUDA_SWITCH_BLOCK_DTYPE(t, CALL, ...)                                                   \
    switch (t) {                                                                                   \
    case CP_DTYPE_Q4_0: CALL(CP_DTYPE_Q4_0); break;                                                \
    case CP_DTYPE_Q4_1: CALL(CP_DTYPE_Q4_1); break;                                                \
    case CP_DTYPE_Q5_0: CALL(CP_DTYPE_Q5_0); break;                                                \
    case CP_DTYPE_Q5_1: CALL(CP_DTYPE_Q5_1); break;                                                \
    case CP_DTYPE_Q8_0: CALL(CP_DTYPE_Q8_0); break;                                                \
    case CP_DTYPE_Q4_K: CALL(CP_DTYPE_Q4_K); break;                                                \
    case CP_DTYPE_Q5_K: CALL(CP_DTYPE_Q5_K); break;                                                \
    case CP_DTYPE_Q6_K: CALL(CP_DTYPE_Q6_K); break;                                                \
    case CP_DTYPE_I4_G32: CALL(CP_DTYPE_I4_G32); break;                                            \
    case CP_DTYPE_I4_G128: CALL(CP_DTYPE_I4_G128); break;                                          \
    case CP_DTYPE_I8_ROW: CALL(CP_DTYPE_I8_ROW); break;                                            \
    case CP_DTYPE_F8_ROW: CALL(CP_DTYPE_F8_ROW); break;                                            \
    case CP_DTYPE_S24_Q8: CALL(CP_DTYPE_S24_Q8); break;                                            \
    default: __VA_ARGS__;                                                                          \
    }

#endif /* CP_CUDA_COMMON_CUH */
