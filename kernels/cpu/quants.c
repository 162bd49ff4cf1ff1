/* quants.c - readable references (no intrinsics) of the per-dtype CPU
 * routines: row dequantization, quantization and the dot product of a weight
 * row with an activation row of its vec_dot_type, in the GGUF block formats;
 * plus the traits table and the one-time choice of SIMD variants. */
#include "cpu_quants.h"
#include "quants_simd.h"
#include "quants_sparse.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef CP_X86
#include <cpuid.h>
#endif

#define FP16(h) cp_fp16_to_fp32(h)

/* Half away from zero, as the conventional Q8_0/Q8_1 quantizers round. */
static int round_away(float v) {
    return (int)roundf(v);
}
/* Nearest, ties to even (the default FP mode), as the Q8_K quantizer rounds. */
static int round_even(float v) {
    return (int)nearbyintf(v);
}

static int clampi(int v, int lo, int hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* 1/d for a block scale d stored as fp16 dh, or 0 when dh is zero: the block
 * then decodes to its offset alone, and 1/d could overflow for tiny d. */
static float inv_nonzero_fp16(cp_fp16_t dh, float d) {
    return (dh & 0x7fff) ? 1.0f / d : 0.0f;
}

/* ======================================================================= */
/* float types                                                              */

static void f32_to_float(const void *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void f32_from_float(const float *src, void *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void f16_to_float(const void *src, float *dst, int64_t n) {
    const cp_fp16_t *x = (const cp_fp16_t *)src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = cp_fp16_to_fp32(x[i]);
}
static void f16_from_float(const float *src, void *dst, int64_t n) {
    cp_fp16_t *y = (cp_fp16_t *)dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = cp_fp32_to_fp16(src[i]);
}
static void bf16_to_float(const void *src, float *dst, int64_t n) {
    const cp_bf16_t *x = (const cp_bf16_t *)src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = cp_bf16_to_fp32(x[i]);
}
static void bf16_from_float(const float *src, void *dst, int64_t n) {
    cp_bf16_t *y = (cp_bf16_t *)dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = cp_fp32_to_bf16(src[i]);
}

/* The float dot products accumulate in double: they are the yardstick the
 * SIMD variants (fp32 lanes) are measured against. */
static void vec_dot_f32(int64_t n, float *s, const void *vx, const void *vy) {
    const float *x = (const float *)vx, *y = (const float *)vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)x[i] * (double)y[i];
    *s = (float)sum;
}
static void vec_dot_f16(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_fp16_t *x = (const cp_fp16_t *)vx, *y = (const cp_fp16_t *)vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)FP16(x[i]) * (double)FP16(y[i]);
    *s = (float)sum;
}
static void vec_dot_bf16(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_bf16_t *x = (const cp_bf16_t *)vx, *y = (const cp_bf16_t *)vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)cp_bf16_to_fp32(x[i]) * (double)cp_bf16_to_fp32(y[i]);
    *s = (float)sum;
}

/* ======================================================================= */
/* 32-element blocks                                                        */

/* Signed value of largest magnitude (the first one on ties) and its |.|. */
static float signed_absmax(const float *x, int n, float *amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) {
            amax = a;
            max = x[j];
        }
    }
    if (amax_out) *amax_out = amax;
    return max;
}

/* Q4_0: x = d * (q - 8); element j < 16 in the low nibble of qs[j], element
 * j + 16 in its high nibble. */
static void q4_0_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q4_0 *b = (const cp_block_q4_0 *)src;
    for (int64_t i = 0; i < n / CP_QK4_0; i++, dst += CP_QK4_0) {
        const float d = FP16(b[i].d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((b[i].qs[j] & 0x0f) - 8);
            dst[j + 16] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}
/* Scale chosen so the value of largest magnitude maps to -8 exactly (the
 * full signed range is used on that side), truncation after +8.5 rounds. */
static void q4_0_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q4_0 *b = (cp_block_q4_0 *)dst;
    for (int64_t i = 0; i < n / CP_QK4_0; i++, x += CP_QK4_0) {
        const float max = signed_absmax(x, CP_QK4_0, NULL);
        const float d = max / -8.0f;
        b[i].d = cp_fp32_to_fp16(d);
        const float id = inv_nonzero_fp16(b[i].d, d);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)(x[j] * id + 8.5f), 0, 15);
            const int q1 = clampi((int)(x[j + 16] * id + 8.5f), 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

/* Q4_1: x = d * q + m. */
static void q4_1_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q4_1 *b = (const cp_block_q4_1 *)src;
    for (int64_t i = 0; i < n / CP_QK4_1; i++, dst += CP_QK4_1) {
        const float d = FP16(b[i].d), m = FP16(b[i].m);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(b[i].qs[j] & 0x0f) + m;
            dst[j + 16] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}
static void minmax(const float *x, int n, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    *mn = lo;
    *mx = hi;
}
static void q4_1_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q4_1 *b = (cp_block_q4_1 *)dst;
    for (int64_t i = 0; i < n / CP_QK4_1; i++, x += CP_QK4_1) {
        float lo, hi;
        minmax(x, CP_QK4_1, &lo, &hi);
        const float d = (hi - lo) / 15.0f;
        b[i].d = cp_fp32_to_fp16(d);
        const float id = inv_nonzero_fp16(b[i].d, d);
        b[i].m = cp_fp32_to_fp16(lo);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)((x[j] - lo) * id + 0.5f), 0, 15);
            const int q1 = clampi((int)((x[j + 16] - lo) * id + 0.5f), 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

/* Q5_0 / Q5_1: as Q4_0 / Q4_1 with a 5th bit per element in the 32-bit
 * little-endian qh (bit j for element j). Q5_0: x = d * (q - 16). */
static uint32_t load_qh(const uint8_t qh[4]) {
    return (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) |
           ((uint32_t)qh[3] << 24);
}
static void store_qh(uint8_t qh[4], uint32_t v) {
    for (int k = 0; k < 4; k++)
        qh[k] = (uint8_t)(v >> (8 * k));
}
static void q5_0_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q5_0 *b = (const cp_block_q5_0 *)src;
    for (int64_t i = 0; i < n / 32; i++, dst += 32) {
        const float d = FP16(b[i].d);
        const uint32_t qh = load_qh(b[i].qh);
        for (int j = 0; j < 16; j++) {
            const int q0 = (b[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            const int q1 = (b[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            dst[j] = d * (float)(q0 - 16);
            dst[j + 16] = d * (float)(q1 - 16);
        }
    }
}
static void q5_0_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q5_0 *b = (cp_block_q5_0 *)dst;
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        const float max = signed_absmax(x, 32, NULL);
        const float d = max / -16.0f;
        b[i].d = cp_fp32_to_fp16(d);
        const float id = inv_nonzero_fp16(b[i].d, d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)(x[j] * id + 16.5f), 0, 31);
            const int q1 = clampi((int)(x[j + 16] * id + 16.5f), 0, 31);
            b[i].qs[j] = (uint8_t)((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= ((uint32_t)(q0 >> 4) << j) | ((uint32_t)(q1 >> 4) << (j + 16));
        }
        store_qh(b[i].qh, qh);
    }
}
static void q5_1_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q5_1 *b = (const cp_block_q5_1 *)src;
    for (int64_t i = 0; i < n / 32; i++, dst += 32) {
        const float d = FP16(b[i].d), m = FP16(b[i].m);
        const uint32_t qh = load_qh(b[i].qh);
        for (int j = 0; j < 16; j++) {
            const int q0 = (b[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            const int q1 = (b[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            dst[j] = d * (float)q0 + m;
            dst[j + 16] = d * (float)q1 + m;
        }
    }
}
static void q5_1_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q5_1 *b = (cp_block_q5_1 *)dst;
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        float lo, hi;
        minmax(x, 32, &lo, &hi);
        const float d = (hi - lo) / 31.0f;
        b[i].d = cp_fp32_to_fp16(d);
        const float id = inv_nonzero_fp16(b[i].d, d);
        b[i].m = cp_fp32_to_fp16(lo);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)((x[j] - lo) * id + 0.5f), 0, 31);
            const int q1 = clampi((int)((x[j + 16] - lo) * id + 0.5f), 0, 31);
            b[i].qs[j] = (uint8_t)((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= ((uint32_t)(q0 >> 4) << j) | ((uint32_t)(q1 >> 4) << (j + 16));
        }
        store_qh(b[i].qh, qh);
    }
}

/* Q8_0: x = d * q; d = amax / 127, q = round(x * (1/d)) half away from zero
 * (the reciprocal is what the SIMD variant multiplies by too, so both give
 * identical bits). Used for weights and as Q4_0/Q5_0/Q8_0's activations.
 * A block whose d rounds to fp16 zero (amax < ~4e-6) is stored as zeros. */
static void q8_0_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q8_0 *b = (const cp_block_q8_0 *)src;
    for (int64_t i = 0; i < n / CP_QK8_0; i++, dst += CP_QK8_0) {
        const float d = FP16(b[i].d);
        for (int j = 0; j < CP_QK8_0; j++)
            dst[j] = d * (float)b[i].qs[j];
    }
}
static void q8_0_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q8_0 *b = (cp_block_q8_0 *)dst;
    for (int64_t i = 0; i < n / CP_QK8_0; i++, x += CP_QK8_0) {
        float amax;
        signed_absmax(x, CP_QK8_0, &amax);
        const float d = amax / 127.0f;
        b[i].d = cp_fp32_to_fp16(d);
        if (b[i].d == 0) { /* the block decodes to 0 anyway; avoids 1/d overflowing */
            memset(b[i].qs, 0, sizeof b[i].qs);
            continue;
        }
        const float id = 1.0f / d;
        for (int j = 0; j < CP_QK8_0; j++)
            b[i].qs[j] = (int8_t)round_away(x[j] * id);
    }
}
/* Q8_1: as Q8_0 plus s = d * sum(q) (Q4_1/Q5_1 fold their offset m into it). */
static void q8_1_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q8_1 *b = (cp_block_q8_1 *)dst;
    for (int64_t i = 0; i < n / CP_QK8_1; i++, x += CP_QK8_1) {
        float amax;
        signed_absmax(x, CP_QK8_1, &amax);
        const float d = amax / 127.0f;
        if (cp_fp32_to_fp16(d) == 0) { /* as Q8_0: a block that decodes to zero */
            memset(&b[i], 0, sizeof b[i]);
            continue;
        }
        const float id = 1.0f / d;
        int sum = 0;
        for (int j = 0; j < CP_QK8_1; j++) {
            const int q = round_away(x[j] * id);
            b[i].qs[j] = (int8_t)q;
            sum += q;
        }
        b[i].d = cp_fp32_to_fp16(d);
        b[i].s = cp_fp32_to_fp16((float)sum * d);
    }
}

/* Dot products of 32-blocks: exact integer sums inside a block, one fp32
 * multiply-add per block. */
static void vec_dot_q4_0_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_0 *x = (const cp_block_q4_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK4_0; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += ((x[i].qs[j] & 0x0f) - 8) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        }
        sumf += (float)sumi * (FP16(x[i].d) * FP16(y[i].d));
    }
    *s = sumf;
}
static void vec_dot_q4_1_q8_1(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_1 *x = (const cp_block_q4_1 *)vx;
    const cp_block_q8_1 *y = (const cp_block_q8_1 *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK4_1; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += (x[i].qs[j] & 0x0f) * y[i].qs[j];
            sumi += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        /* sum(d_x q_x + m)(d_y q_y) = d_x d_y sum(q_x q_y) + m * (d_y sum q_y) */
        sumf += (float)sumi * (FP16(x[i].d) * FP16(y[i].d)) + FP16(x[i].m) * FP16(y[i].s);
    }
    *s = sumf;
}
static void vec_dot_q5_0_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_0 *x = (const cp_block_q5_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        const uint32_t qh = load_qh(x[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = (x[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            const int q1 = (x[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            sumi += (q0 - 16) * y[i].qs[j] + (q1 - 16) * y[i].qs[j + 16];
        }
        sumf += (float)sumi * (FP16(x[i].d) * FP16(y[i].d));
    }
    *s = sumf;
}
static void vec_dot_q5_1_q8_1(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_1 *x = (const cp_block_q5_1 *)vx;
    const cp_block_q8_1 *y = (const cp_block_q8_1 *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        const uint32_t qh = load_qh(x[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = (x[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            const int q1 = (x[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + 16];
        }
        sumf += (float)sumi * (FP16(x[i].d) * FP16(y[i].d)) + FP16(x[i].m) * FP16(y[i].s);
    }
    *s = sumf;
}
static void vec_dot_q8_0_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q8_0 *x = (const cp_block_q8_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < CP_QK8_0; j++)
            sumi += x[i].qs[j] * y[i].qs[j];
        sumf += (float)sumi * (FP16(x[i].d) * FP16(y[i].d));
    }
    *s = sumf;
}

/* ======================================================================= */
/* K-quants: super-blocks of 256                                            */

/* Q4_K/Q5_K scale packing: 8 sub-blocks with a 6-bit scale and a 6-bit min
 * in 12 bytes. Bytes 0-3: scales 0-3 (low 6 bits), 4-7: mins 0-3 (low 6
 * bits); the top 2 bits of bytes 0-3 / 4-7 are the high bits of scales /
 * mins 4-7, whose low nibbles sit in bytes 8-11 (scale low, min high). */
static void get_scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
static void put_scales_mins_k4(uint8_t *q, const int sc[8], const int m[8]) {
    for (int j = 0; j < 4; j++) {
        q[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        q[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        q[j + 8] = (uint8_t)((sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4));
    }
}

/* Q4_K: x = d*sc_j*q - dmin*m_j, sub-block j = element / 32; the 4-bit
 * quants of sub-blocks 2c and 2c+1 share bytes qs[32c .. 32c+31] (low/high
 * nibble). */
static void q4_K_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q4_K *b = (const cp_block_q4_K *)src;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        const float d = FP16(b[i].d), dmin = FP16(b[i].dmin);
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b[i].qs + 32 * c;
            int sc0, m0, sc1, m1;
            get_scale_min_k4(2 * c, b[i].scales, &sc0, &m0);
            get_scale_min_k4(2 * c + 1, b[i].scales, &sc1, &m1);
            const float d0 = d * (float)sc0, o0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, o1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++)
                *dst++ = d0 * (float)(q[l] & 0x0f) - o0;
            for (int l = 0; l < 32; l++)
                *dst++ = d1 * (float)(q[l] >> 4) - o1;
        }
    }
}

/* Q5_K: as Q4_K, with the 5th bit of element 64c + l in bit 2c of qh[l] and
 * of element 64c + 32 + l in bit 2c + 1. */
static void q5_K_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q5_K *b = (const cp_block_q5_K *)src;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        const float d = FP16(b[i].d), dmin = FP16(b[i].dmin);
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b[i].qs + 32 * c;
            int sc0, m0, sc1, m1;
            get_scale_min_k4(2 * c, b[i].scales, &sc0, &m0);
            get_scale_min_k4(2 * c + 1, b[i].scales, &sc1, &m1);
            const float d0 = d * (float)sc0, o0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, o1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++)
                *dst++ = d0 * (float)((q[l] & 0x0f) + (((b[i].qh[l] >> (2 * c)) & 1) << 4)) - o0;
            for (int l = 0; l < 32; l++)
                *dst++ = d1 * (float)((q[l] >> 4) + (((b[i].qh[l] >> (2 * c + 1)) & 1) << 4)) - o1;
        }
    }
}

/* Q6_K: 16 groups of 16 with int8 scales, x = d*sc_g*(q-32). In each half
 * of 128 (ql += 64, qh += 32 per half), for l < 32: element l takes the low
 * nibble of ql[l] and bits 0-1 of qh[l]; l+32: low nibble of ql[l+32], bits
 * 2-3; l+64: high nibble of ql[l], bits 4-5; l+96: high nibble of ql[l+32],
 * bits 6-7. */
static void q6_K_unpack(const cp_block_q6_K *b, int8_t q[CP_QK_K]) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
        int8_t *o = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}
static void q6_K_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q6_K *b = (const cp_block_q6_K *)src;
    int8_t q[CP_QK_K];
    for (int64_t i = 0; i < n / CP_QK_K; i++, dst += CP_QK_K) {
        const float d = FP16(b[i].d);
        q6_K_unpack(&b[i], q);
        for (int k = 0; k < CP_QK_K; k++)
            dst[k] = d * (float)b[i].scales[k / 16] * (float)q[k];
    }
}

/* Q2_K: 16 groups of 16; scales[g] low nibble = scale, high nibble = min;
 * x = d*sc*q - dmin*m. In each half of 128 (qs += 32), the four 32-element
 * quarters take bit pairs 0-1, 2-3, 4-5, 6-7 of the same 32 bytes. */
static void q2_K_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q2_K *b = (const cp_block_q2_K *)src;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        const float d = FP16(b[i].d), dmin = FP16(b[i].dmin);
        int g = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *q = b[i].qs + 32 * h;
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; half++, g++) {
                    const float dl = d * (float)(b[i].scales[g] & 0x0f);
                    const float ml = dmin * (float)(b[i].scales[g] >> 4);
                    for (int l = 0; l < 16; l++)
                        *dst++ = dl * (float)((q[16 * half + l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

/* Q3_K: 16 groups of 16 with 6-bit scales (biased by 32): scale g has its
 * low nibble in scales[g] (g < 8) or the high nibble of scales[g-8], and its
 * top 2 bits in bits 2*(g/4) of scales[8 + g%4]. Quants: 2 low bits laid out
 * as Q2_K, and hmask bit (set = no offset, clear = -4), bit k of hmask[l]
 * for element 32k + l. */
static void q3_K_to_float(const void *src, float *dst, int64_t n) {
    const cp_block_q3_K *b = (const cp_block_q3_K *)src;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        const float d = FP16(b[i].d);
        int sc[16];
        for (int g = 0; g < 16; g++) {
            const int lo = g < 8 ? (b[i].scales[g] & 0x0f) : (b[i].scales[g - 8] >> 4);
            const int hi = (b[i].scales[8 + g % 4] >> (2 * (g / 4))) & 3;
            sc[g] = (lo | (hi << 4)) - 32;
        }
        int g = 0, k = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *q = b[i].qs + 32 * h;
            for (int shift = 0; shift < 8; shift += 2, k++) {
                for (int half = 0; half < 2; half++, g++) {
                    const float dl = d * (float)sc[g];
                    for (int l = 0; l < 16; l++) {
                        const int idx = 16 * half + l;
                        const int hb = (b[i].hmask[idx] >> k) & 1;
                        *dst++ = dl * (float)(((q[idx] >> shift) & 3) - (hb ? 0 : 4));
                    }
                }
            }
        }
    }
}

/* ---- K-quant weight quantizers ------------------------------------------
 * Method (ours, documented for the quantize tool): per sub-block, fit
 * x ~= s*q - b (q in [0, nmax], s >= 0, b >= 0 so that b is a "min" the
 * format can store) by trying 16 candidate inverse scales around
 * nmax / (max - min); for each, round to q, refit s and b by least squares
 * (b clamped at 0) and keep the fit of least squared error. Then the
 * sub-block scales and mins are quantized to 6 bits against the super-block
 * d = max s / 63, dmin = max b / 63 (stored fp16), and the quants are
 * recomputed with the scales as stored, so decode matches what was fitted. */
static float fit_scale_min(const float *x, int n, int nmax, float *b_out) {
    float lo, hi;
    minmax(x, n, &lo, &hi);
    if (lo > 0.0f) lo = 0.0f; /* the offset can only move values down */
    if (hi <= lo) {           /* constant sub-block at or below zero */
        *b_out = -lo;
        return 0.0f;
    }
    float best_s = (hi - lo) / (float)nmax, best_b = -lo, best_err = INFINITY;
    for (int k = -5; k <= 10; k++) {
        const float iscale = ((float)nmax + 0.1f * (float)k) / (hi - lo);
        if (!(iscale <= FLT_MAX)) break; /* range too small to resolve */
        double sq = 0, sqq = 0, sx = 0, sxq = 0;
        int qv[CP_QK_K];
        for (int l = 0; l < n; l++) {
            qv[l] = clampi(round_even((x[l] - lo) * iscale), 0, nmax);
            sq += qv[l];
            sqq += (double)qv[l] * qv[l];
            sx += x[l];
            sxq += (double)x[l] * qv[l];
        }
        const double det = n * sqq - sq * sq;
        double s, c; /* x ~= s*q + c */
        if (det <= 0.0) continue;
        s = (n * sxq - sq * sx) / det;
        c = (sx - s * sq) / n;
        if (c > 0.0) { /* b = -c must be >= 0 */
            c = 0.0;
            s = sqq > 0.0 ? sxq / sqq : 0.0;
        }
        if (s < 0.0) continue;
        double err = 0.0;
        for (int l = 0; l < n; l++) {
            const double e = x[l] - (s * qv[l] + c);
            err += e * e;
        }
        if (err < best_err) {
            best_err = (float)err;
            best_s = (float)s;
            best_b = (float)-c;
        }
    }
    *b_out = best_b;
    return best_s;
}

/* Quantizes the 8 (s, b) fits of one super-block to 6 bits; returns the
 * stored effective scales/offsets in es/eb. */
static void pack_k4_scales(const float s[8], const float bo[8], cp_fp16_t *d_out,
                           cp_fp16_t *dmin_out, uint8_t scales[12], float es[8], float eb[8]) {
    float ms = 0.0f, mb = 0.0f;
    for (int j = 0; j < 8; j++) {
        if (s[j] > ms) ms = s[j];
        if (bo[j] > mb) mb = bo[j];
    }
    *d_out = cp_fp32_to_fp16(ms / 63.0f);
    *dmin_out = cp_fp32_to_fp16(mb / 63.0f);
    const float d = FP16(*d_out), dmin = FP16(*dmin_out);
    int sc[8], m[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = d > 0.0f ? clampi(round_even(s[j] / d), 0, 63) : 0;
        m[j] = dmin > 0.0f ? clampi(round_even(bo[j] / dmin), 0, 63) : 0;
        es[j] = d * (float)sc[j];
        eb[j] = dmin * (float)m[j];
    }
    put_scales_mins_k4(scales, sc, m);
}

static void quantize_k4_levels(const float *x, int nmax, cp_fp16_t *d, cp_fp16_t *dmin,
                               uint8_t scales[12], uint8_t q[CP_QK_K]) {
    float s[8], bo[8], es[8], eb[8];
    for (int j = 0; j < 8; j++)
        s[j] = fit_scale_min(x + 32 * j, 32, nmax, &bo[j]);
    pack_k4_scales(s, bo, d, dmin, scales, es, eb);
    for (int j = 0; j < 8; j++) {
        for (int l = 0; l < 32; l++) {
            const float v = x[32 * j + l] + eb[j];
            q[32 * j + l] = (uint8_t)(es[j] > 0.0f ? clampi(round_even(v / es[j]), 0, nmax) : 0);
        }
    }
}

static void q4_K_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q4_K *b = (cp_block_q4_K *)dst;
    uint8_t q[CP_QK_K];
    for (int64_t i = 0; i < n / CP_QK_K; i++, x += CP_QK_K) {
        quantize_k4_levels(x, 15, &b[i].d, &b[i].dmin, b[i].scales, q);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                b[i].qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    }
}

static void q5_K_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q5_K *b = (cp_block_q5_K *)dst;
    uint8_t q[CP_QK_K];
    for (int64_t i = 0; i < n / CP_QK_K; i++, x += CP_QK_K) {
        quantize_k4_levels(x, 31, &b[i].d, &b[i].dmin, b[i].scales, q);
        memset(b[i].qh, 0, sizeof b[i].qh);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                const int q0 = q[64 * c + l], q1 = q[64 * c + 32 + l];
                b[i].qs[32 * c + l] = (uint8_t)((q0 & 0x0f) | ((q1 & 0x0f) << 4));
                b[i].qh[l] |= (uint8_t)(((q0 >> 4) << (2 * c)) | ((q1 >> 4) << (2 * c + 1)));
            }
        }
    }
}

/* Q6_K quantizer: per group of 16, symmetric fit x ~= s*q, q in [-32, 31],
 * over 13 candidate inverse scales around -32/max (max = the signed value of
 * largest magnitude, so it lands on -32 where the range is widest), each
 * refitted by least squares; group scales then go to int8 against
 * d = max|s| / 127 and the quants are recomputed with the stored scales. */
static void q6_K_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q6_K *b = (cp_block_q6_K *)dst;
    for (int64_t i = 0; i < n / CP_QK_K; i++, x += CP_QK_K) {
        float s[16], ms = 0.0f;
        for (int g = 0; g < 16; g++) {
            const float *xg = x + 16 * g;
            const float mx = signed_absmax(xg, 16, NULL);
            s[g] = 0.0f;
            if (mx == 0.0f) continue;
            float best_err = INFINITY;
            for (int k = -4; k <= 8; k++) {
                const float iscale = -(32.0f + 0.25f * (float)k) / mx;
                if (!(fabsf(iscale) <= FLT_MAX)) break;
                double sxq = 0, sqq = 0;
                int qv[16];
                for (int l = 0; l < 16; l++) {
                    qv[l] = clampi(round_even(xg[l] * iscale), -32, 31);
                    sxq += (double)xg[l] * qv[l];
                    sqq += (double)qv[l] * qv[l];
                }
                if (sqq == 0.0) continue;
                const double sc = sxq / sqq;
                double err = 0.0;
                for (int l = 0; l < 16; l++) {
                    const double e = xg[l] - sc * qv[l];
                    err += e * e;
                }
                if (err < best_err) {
                    best_err = (float)err;
                    s[g] = (float)sc;
                }
            }
            if (fabsf(s[g]) > ms) ms = fabsf(s[g]);
        }
        b[i].d = cp_fp32_to_fp16(ms / 127.0f);
        const float d = FP16(b[i].d);
        uint8_t q[CP_QK_K];
        for (int g = 0; g < 16; g++) {
            const int sc = d > 0.0f ? clampi(round_even(s[g] / d), -127, 127) : 0;
            b[i].scales[g] = (int8_t)sc;
            const float es = d * (float)sc;
            for (int l = 0; l < 16; l++) {
                const int v = es != 0.0f ? clampi(round_even(x[16 * g + l] / es), -32, 31) : 0;
                q[16 * g + l] = (uint8_t)(v + 32);
            }
        }
        for (int h = 0; h < 2; h++) {
            uint8_t *ql = b[i].ql + 64 * h, *qh = b[i].qh + 32 * h;
            const uint8_t *o = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((o[l] & 0x0f) | ((o[l + 64] & 0x0f) << 4));
                ql[l + 32] = (uint8_t)((o[l + 32] & 0x0f) | ((o[l + 96] & 0x0f) << 4));
                qh[l] = (uint8_t)((o[l] >> 4) | ((o[l + 32] >> 4) << 2) | ((o[l + 64] >> 4) << 4) |
                                  ((o[l + 96] >> 4) << 6));
            }
        }
    }
}

/* Q8_K (activations of the K-quants): max = signed value of largest |x|,
 * iscale = -127/max, q = min(127, nearest_even(iscale*x)), d = 1/iscale,
 * bsums = sums of q over groups of 16. An all-zero block (or one below
 * 127/FLT_MAX, where iscale overflows) gives d = 0, q = 0. */
static void q8_K_from_float(const float *x, void *dst, int64_t n) {
    cp_block_q8_K *b = (cp_block_q8_K *)dst;
    for (int64_t i = 0; i < n / CP_QK_K; i++, x += CP_QK_K) {
        float amax;
        const float max = signed_absmax(x, CP_QK_K, &amax);
        const float iscale = amax != 0.0f ? -127.0f / max : 0.0f;
        if (!(fabsf(iscale) <= FLT_MAX) || iscale == 0.0f) { /* zero, or |max| < 127/FLT_MAX */
            memset(&b[i], 0, sizeof b[i]);
            continue;
        }
        for (int j = 0; j < CP_QK_K; j++) {
            const int v = round_even(iscale * x[j]);
            b[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < CP_QK_K / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++)
                sum += b[i].qs[16 * g + l];
            b[i].bsums[g] = (int16_t)sum;
        }
        b[i].d = 1.0f / iscale;
    }
}

/* K-quant dot products with Q8_K: exact int32 sums per super-block (the
 * mins enter through Q8_K's bsums), then fp32 per super-block. */
static void vec_dot_q4_K_q8_K(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_K *x = (const cp_block_q4_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int isum = 0, summs = 0;
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = x[i].qs + 32 * c;
            const int8_t *q8 = y[i].qs + 64 * c;
            int sc0, m0, sc1, m1, s0 = 0, s1 = 0;
            get_scale_min_k4(2 * c, x[i].scales, &sc0, &m0);
            get_scale_min_k4(2 * c + 1, x[i].scales, &sc1, &m1);
            for (int l = 0; l < 32; l++) {
                s0 += (q[l] & 0x0f) * q8[l];
                s1 += (q[l] >> 4) * q8[l + 32];
            }
            isum += sc0 * s0 + sc1 * s1;
            summs += m0 * (y[i].bsums[4 * c] + y[i].bsums[4 * c + 1]) +
                     m1 * (y[i].bsums[4 * c + 2] + y[i].bsums[4 * c + 3]);
        }
        const float d = y[i].d * FP16(x[i].d), dmin = y[i].d * FP16(x[i].dmin);
        sumf += d * (float)isum - dmin * (float)summs;
    }
    *s = sumf;
}
static void vec_dot_q5_K_q8_K(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_K *x = (const cp_block_q5_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int isum = 0, summs = 0;
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = x[i].qs + 32 * c;
            const int8_t *q8 = y[i].qs + 64 * c;
            int sc0, m0, sc1, m1, s0 = 0, s1 = 0;
            get_scale_min_k4(2 * c, x[i].scales, &sc0, &m0);
            get_scale_min_k4(2 * c + 1, x[i].scales, &sc1, &m1);
            for (int l = 0; l < 32; l++) {
                const int h0 = ((x[i].qh[l] >> (2 * c)) & 1) << 4;
                const int h1 = ((x[i].qh[l] >> (2 * c + 1)) & 1) << 4;
                s0 += ((q[l] & 0x0f) + h0) * q8[l];
                s1 += ((q[l] >> 4) + h1) * q8[l + 32];
            }
            isum += sc0 * s0 + sc1 * s1;
            summs += m0 * (y[i].bsums[4 * c] + y[i].bsums[4 * c + 1]) +
                     m1 * (y[i].bsums[4 * c + 2] + y[i].bsums[4 * c + 3]);
        }
        const float d = y[i].d * FP16(x[i].d), dmin = y[i].d * FP16(x[i].dmin);
        sumf += d * (float)isum - dmin * (float)summs;
    }
    *s = sumf;
}
static void vec_dot_q6_K_q8_K(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q6_K *x = (const cp_block_q6_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    float sumf = 0.0f;
    int8_t q[CP_QK_K];
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        q6_K_unpack(&x[i], q);
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int sg = 0;
            for (int l = 0; l < 16; l++)
                sg += q[16 * g + l] * y[i].qs[16 * g + l];
            isum += x[i].scales[g] * sg;
        }
        sumf += (y[i].d * FP16(x[i].d)) * (float)isum;
    }
    *s = sumf;
}

/* Q2_K / Q3_K with Q8_K (references only): element k belongs to group
 * k / 16; its 2-bit quant is bits 2r..2r+1 of qs[32h + l] for
 * k = 128h + 32r + l (the layout of q2_K_to_float / q3_K_to_float). */
static int q2_bits(const uint8_t *qs, int k) {
    const int h = k / 128, r = (k % 128) / 32, l = k % 32;
    return (qs[32 * h + l] >> (2 * r)) & 3;
}
static void vec_dot_q2_K_q8_K(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q2_K *x = (const cp_block_q2_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int isum = 0, summs = 0;
        for (int g = 0; g < 16; g++) {
            int sg = 0;
            for (int l = 0; l < 16; l++)
                sg += q2_bits(x[i].qs, 16 * g + l) * y[i].qs[16 * g + l];
            isum += (x[i].scales[g] & 0x0f) * sg;
            summs += (x[i].scales[g] >> 4) * y[i].bsums[g];
        }
        const float d = y[i].d * FP16(x[i].d), dmin = y[i].d * FP16(x[i].dmin);
        sumf += d * (float)isum - dmin * (float)summs;
    }
    *s = sumf;
}
static void vec_dot_q3_K_q8_K(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q3_K *x = (const cp_block_q3_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            const int lo = g < 8 ? (x[i].scales[g] & 0x0f) : (x[i].scales[g - 8] >> 4);
            const int hi = (x[i].scales[8 + g % 4] >> (2 * (g / 4))) & 3;
            int sg = 0;
            for (int l = 0; l < 16; l++) {
                const int k = 16 * g + l;
                const int q =
                    q2_bits(x[i].qs, k) - (((x[i].hmask[k % 32] >> (k / 32)) & 1) ? 0 : 4);
                sg += q * y[i].qs[k];
            }
            isum += ((lo | (hi << 4)) - 32) * sg;
        }
        sumf += (y[i].d * FP16(x[i].d)) * (float)isum;
    }
    *s = sumf;
}

/* ======================================================================= */
/* traits and dispatch                                                      */

static cp_cpu_type_traits traits[CP_DTYPE_COUNT];
static const char *simd_level = "scalar";
static const cp_cpu_s24_repack *s24_repack; /* NULL: batches use vec_dot as is */
static pthread_once_t traits_once = PTHREAD_ONCE_INIT;

static void set_traits(cp_dtype t, cp_dtype vdt, cp_to_float_fn to, cp_from_float_fn from,
                       cp_vec_dot_fn dot) {
    traits[t] = (cp_cpu_type_traits){
        /* .type = */ t,
        /* .vec_dot_type = */ vdt,
        /* .to_float = */ to,
        /* .from_float_ref = */ from,
        /* .from_float = */ from,
        /* .vec_dot_ref = */ dot,
        /* .vec_dot = */ dot,
        /* .vec_dot2 = */ NULL,
        /* .vec_dot22 = */ NULL,
    };
}

static bool force_ref(void) {
    const char *e = getenv("CP_CPU_FORCE_REF");
    return e && e[0] != '\0' && strcmp(e, "0") != 0;
}

bool cp_cpu_has_avx2(void) {
#ifdef CP_X86
    /* F16C through CPUID leaf 1 (ECX bit 29): not every compiler's
     * __builtin_cpu_supports knows the name. Only asked after AVX2, whose
     * check includes the OS saving the YMM state. */
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    return (c & (1u << 29)) != 0;
#else
    return false;
#endif
}

static void init_traits(void) {
    set_traits(CP_DTYPE_F32, CP_DTYPE_F32, f32_to_float, f32_from_float, vec_dot_f32);
    set_traits(CP_DTYPE_F16, CP_DTYPE_F16, f16_to_float, f16_from_float, vec_dot_f16);
    set_traits(CP_DTYPE_BF16, CP_DTYPE_BF16, bf16_to_float, bf16_from_float, vec_dot_bf16);
    set_traits(CP_DTYPE_Q4_0, CP_DTYPE_Q8_0, q4_0_to_float, q4_0_from_float, vec_dot_q4_0_q8_0);
    set_traits(CP_DTYPE_Q4_1, CP_DTYPE_Q8_1, q4_1_to_float, q4_1_from_float, vec_dot_q4_1_q8_1);
    set_traits(CP_DTYPE_Q5_0, CP_DTYPE_Q8_0, q5_0_to_float, q5_0_from_float, vec_dot_q5_0_q8_0);
    set_traits(CP_DTYPE_Q5_1, CP_DTYPE_Q8_1, q5_1_to_float, q5_1_from_float, vec_dot_q5_1_q8_1);
    set_traits(CP_DTYPE_Q8_0, CP_DTYPE_Q8_0, q8_0_to_float, q8_0_from_float, vec_dot_q8_0_q8_0);
    set_traits(CP_DTYPE_Q8_1, CP_DTYPE_Q8_1, NULL, q8_1_from_float, NULL);
    /* Q2_K / Q3_K: decode and dot products only (no quantizer yet) */
    set_traits(CP_DTYPE_Q2_K, CP_DTYPE_Q8_K, q2_K_to_float, NULL, vec_dot_q2_K_q8_K);
    set_traits(CP_DTYPE_Q3_K, CP_DTYPE_Q8_K, q3_K_to_float, NULL, vec_dot_q3_K_q8_K);
    set_traits(CP_DTYPE_Q4_K, CP_DTYPE_Q8_K, q4_K_to_float, q4_K_from_float, vec_dot_q4_K_q8_K);
    set_traits(CP_DTYPE_Q5_K, CP_DTYPE_Q8_K, q5_K_to_float, q5_K_from_float, vec_dot_q5_K_q8_K);
    set_traits(CP_DTYPE_Q6_K, CP_DTYPE_Q8_K, q6_K_to_float, q6_K_from_float, vec_dot_q6_K_q8_K);
    set_traits(CP_DTYPE_Q8_K, CP_DTYPE_Q8_K, NULL, q8_K_from_float, NULL);
    cp_cpu_own_types_init();
    set_traits(CP_DTYPE_I8_ROW, CP_DTYPE_F32, cp_cpu_i8_row_to_float, cp_cpu_i8_row_from_float,
               cp_cpu_vec_dot_i8_row_f32);
    set_traits(CP_DTYPE_F8_ROW, CP_DTYPE_F8_ROW, cp_cpu_f8_row_to_float, cp_cpu_f8_row_from_float,
               cp_cpu_vec_dot_f8_row);
    set_traits(CP_DTYPE_I4_G32, CP_DTYPE_F32, cp_cpu_i4_g32_to_float, cp_cpu_i4_g32_from_float,
               cp_cpu_vec_dot_i4_g32_f32);
    set_traits(CP_DTYPE_I4_G128, CP_DTYPE_F32, cp_cpu_i4_g128_to_float, cp_cpu_i4_g128_from_float,
               cp_cpu_vec_dot_i4_g128_f32);
    /* 2:4 sparse int8: Q8_0 activations, so it multiplies as Q8_0 weights do */
    cp_cpu_sparse_init();
    set_traits(CP_DTYPE_S24_Q8, CP_DTYPE_Q8_0, cp_cpu_s24_q8_to_float, cp_cpu_s24_q8_from_float,
               cp_cpu_vec_dot_s24_q8_q8_0);

    if (force_ref()) return;
#ifdef CP_X86
    if (cp_cpu_has_avx2()) {
        traits[CP_DTYPE_F32].vec_dot = cp_cpu_vec_dot_f32_avx2;
        traits[CP_DTYPE_F16].vec_dot = cp_cpu_vec_dot_f16_avx2;
        traits[CP_DTYPE_BF16].vec_dot = cp_cpu_vec_dot_bf16_avx2;
        traits[CP_DTYPE_Q4_0].vec_dot = cp_cpu_vec_dot_q4_0_avx2;
        traits[CP_DTYPE_Q4_0].vec_dot22 = cp_cpu_vec_dot22_q4_0_avx2;
        traits[CP_DTYPE_Q4_1].vec_dot = cp_cpu_vec_dot_q4_1_avx2;
        traits[CP_DTYPE_Q4_1].vec_dot2 = cp_cpu_vec_dot2_q4_1_avx2;
        traits[CP_DTYPE_Q4_1].vec_dot22 = cp_cpu_vec_dot22_q4_1_avx2;
        traits[CP_DTYPE_Q5_0].vec_dot = cp_cpu_vec_dot_q5_0_avx2;
        traits[CP_DTYPE_Q5_1].vec_dot = cp_cpu_vec_dot_q5_1_avx2;
        traits[CP_DTYPE_Q8_0].vec_dot = cp_cpu_vec_dot_q8_0_avx2;
        traits[CP_DTYPE_Q8_0].vec_dot22 = cp_cpu_vec_dot22_q8_0_avx2;
        traits[CP_DTYPE_Q4_K].vec_dot = cp_cpu_vec_dot_q4_K_avx2;
        traits[CP_DTYPE_Q4_K].vec_dot22 = cp_cpu_vec_dot22_q4_K_avx2;
        traits[CP_DTYPE_Q5_K].vec_dot = cp_cpu_vec_dot_q5_K_avx2;
        traits[CP_DTYPE_Q6_K].vec_dot = cp_cpu_vec_dot_q6_K_avx2;
        traits[CP_DTYPE_Q6_K].vec_dot22 = cp_cpu_vec_dot22_q6_K_avx2;
        traits[CP_DTYPE_I8_ROW].vec_dot = cp_cpu_vec_dot_i8_row_f32_avx2;
        traits[CP_DTYPE_F8_ROW].vec_dot = cp_cpu_vec_dot_f8_row_avx2;
        traits[CP_DTYPE_F8_ROW].vec_dot2 = cp_cpu_vec_dot2_f8_row_avx2;
        traits[CP_DTYPE_F8_ROW].vec_dot22 = cp_cpu_vec_dot22_f8_row_avx2;
        traits[CP_DTYPE_I4_G32].vec_dot = cp_cpu_vec_dot_i4_g32_f32_avx2;
        traits[CP_DTYPE_I4_G128].vec_dot = cp_cpu_vec_dot_i4_g128_f32_avx2;
        traits[CP_DTYPE_S24_Q8].vec_dot = cp_cpu_vec_dot_s24_q8_q8_0_avx2;
        traits[CP_DTYPE_S24_Q8].vec_dot2 = cp_cpu_vec_dot2_s24_q8_q8_0_avx2;
        s24_repack = &cp_cpu_s24_repack_avx2;
        /* weights and activations share Q8_0's quantizer */
        traits[CP_DTYPE_Q8_0].from_float = cp_cpu_quantize_q8_0_avx2;
        traits[CP_DTYPE_Q8_1].from_float = cp_cpu_quantize_q8_1_avx2;
        traits[CP_DTYPE_Q8_K].from_float = cp_cpu_quantize_q8_K_avx2;
        simd_level = "avx2";
    }
#endif
}

const cp_cpu_type_traits *cp_cpu_get_type_traits(cp_dtype t) {
    pthread_once(&traits_once, init_traits);
    if ((int)t < 0 || (int)t >= CP_DTYPE_COUNT) return NULL;
    if (traits[t].from_float_ref == NULL && traits[t].to_float == NULL) return NULL;
    return &traits[t];
}

const char *cp_cpu_simd_level(void) {
    pthread_once(&traits_once, init_traits);
    return simd_level;
}

const cp_cpu_s24_repack *cp_cpu_s24_q8_repack(void) {
    pthread_once(&traits_once, init_traits);
    return s24_repack;
}
