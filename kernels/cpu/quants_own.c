/* quants_own.c - CPU routines of cparallel's own weight types (references,
 * no intrinsics): I8_ROW (int8, one fp32 scale per row), F8_ROW (FP8 E4M3,
 * one fp32 scale per row, activations quantized per token: W8A8) and the
 * asymmetric 4-bit groups I4_G32 / I4_G128. quants.c installs them in the
 * type traits; quants_own_avx2.c has the fast dot products. */
#include "quants_simd.h"

#include <float.h>
#include <math.h>
#include <string.h>

float cp_cpu_e4m3_lut[256];

void cp_cpu_own_types_init(void) {
    for (int i = 0; i < 256; i++) cp_cpu_e4m3_lut[i] = cp_e4m3_to_fp32((uint8_t)i);
}

static void put_trailer(void *row, int64_t n, float scale) {
    unsigned char *p = (unsigned char *)row + n;
    memcpy(p, &scale, sizeof scale);
    memset(p + sizeof scale, 0, CP_ROW_TRAILER - sizeof scale);
}

static float row_amax(const float *x, int64_t n) {
    float a = 0.0f;
    for (int64_t i = 0; i < n; i++) a = fmaxf(a, fabsf(x[i]));
    return isfinite(a) ? a : FLT_MAX;
}

/* ---- I8_ROW ------------------------------------------------------------- */

void cp_cpu_i8_row_to_float(const void *src, float *dst, int64_t n) {
    const int8_t *q = src;
    const float s = cp_row_scale(src, n);
    for (int64_t i = 0; i < n; i++) dst[i] = (float)q[i] * s;
}

/* The factor a row is multiplied by before rounding: qmax / amax, at most
 * FLT_MAX (a row whose largest value is below ~1e-36 would make it inf,
 * and 0 x inf a NaN code); 0 for a row of zeros. */
static float row_inv(float amax, float qmax) { return amax > 0 ? fminf(qmax / amax, FLT_MAX) : 0.0f; }

/* Symmetric: scale = amax / 127, codes round(x / scale) in -127..127 (NaN
 * -> 0). */
void cp_cpu_i8_row_from_float(const float *x, void *dst, int64_t n) {
    int8_t *q = dst;
    const float amax = row_amax(x, n);
    const float s = amax / 127.0f, inv = row_inv(amax, 127.0f);
    for (int64_t i = 0; i < n; i++) {
        float v = rintf(x[i] * inv);
        q[i] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v == v ? (int)v : 0);
    }
    put_trailer(dst, n, s);
}

void cp_cpu_vec_dot_i8_row_f32(int64_t n, float *s, const void *vx, const void *vy) {
    const int8_t *q = vx;
    const float *y = vy;
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += (float)q[i] * y[i];
    *s = acc * cp_row_scale(vx, n);
}

/* ---- F8_ROW ------------------------------------------------------------- */

void cp_cpu_f8_row_to_float(const void *src, float *dst, int64_t n) {
    const uint8_t *q = src;
    const float s = cp_row_scale(src, n);
    for (int64_t i = 0; i < n; i++) dst[i] = cp_cpu_e4m3_lut[q[i]] * s;
}

/* scale = amax / 448 and codes e4m3(x * (448 / amax)): every step is one
 * correctly rounded fp32 operation, so any IEEE implementation (the CUDA
 * kernels included) gives the same bytes. (A NaN value gives the NaN code;
 * the row's scale ignores it.) */
void cp_cpu_f8_row_from_float(const float *x, void *dst, int64_t n) {
    uint8_t *q = dst;
    const float amax = row_amax(x, n);
    const float s = amax / 448.0f, inv = row_inv(amax, 448.0f);
    for (int64_t i = 0; i < n; i++) q[i] = cp_fp32_to_e4m3(x[i] * inv);
    put_trailer(dst, n, s);
}

/* Weight row x and activation row y both F8_ROW: products of two E4M3
 * values are exact in fp32; sums in fp32, then both scales. */
void cp_cpu_vec_dot_f8_row(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *a = vx, *b = vy;
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += cp_cpu_e4m3_lut[a[i]] * cp_cpu_e4m3_lut[b[i]];
    *s = acc * cp_row_scale(vx, n) * cp_row_scale(vy, n);
}

/* ---- I4_G32 / I4_G128 --------------------------------------------------- */

/* Both block layouts share the header; only the group size differs. */
typedef struct {
    cp_fp16_t d;
    uint8_t z, pad;
    uint8_t qs[];
} i4_head;

static void i4_to_float(const void *src, float *dst, int64_t n, int g) {
    const size_t bytes = 4 + (size_t)g / 2;
    for (int64_t b = 0; b < n / g; b++) {
        const i4_head *h = (const i4_head *)((const char *)src + (size_t)b * bytes);
        const float d = cp_fp16_to_fp32(h->d);
        const int z = h->z;
        float *o = dst + b * g;
        for (int j = 0; j < g / 2; j++) {
            o[j] = (float)((h->qs[j] & 15) - z) * d;
            o[j + g / 2] = (float)((h->qs[j] >> 4) - z) * d;
        }
    }
}

/* One group: asymmetric min/max quantization over a range that includes 0
 * (as GPTQ and AWQ do, so the zero point is a code), shrunk by the factor
 * (of six) that gives the least squared error: one outlier otherwise costs
 * the other weights of its group half their resolution. */
static void i4_group(const float *x, int g, i4_head *h) {
    float mn = 0.0f, mx = 0.0f;
    for (int i = 0; i < g; i++) {
        mn = fminf(mn, x[i]);
        mx = fmaxf(mx, x[i]);
    }
    h->d = 0;
    h->z = 0;
    h->pad = 0;
    memset(h->qs, 0, (size_t)g / 2);
    if (!(mx > mn) || !isfinite(mx - mn)) return; /* all zeros (or not finite) */
    static const float shrink[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f};
    double best = INFINITY;
    for (size_t k = 0; k < sizeof shrink / sizeof shrink[0]; k++) {
        const float lo = mn * shrink[k], hi = mx * shrink[k];
        const cp_fp16_t d16 = cp_fp32_to_fp16(fminf((hi - lo) / 15.0f, 65504.0f));
        const float d = cp_fp16_to_fp32(d16);
        if (!(d > 0)) continue;
        const float id = 1.0f / d;
        float zf = rintf(-lo * id);
        const int z = zf < 0 ? 0 : zf > 15 ? 15 : (int)zf;
        double err = 0;
        for (int i = 0; i < g; i++) {
            float q = rintf(x[i] * id) + (float)z;
            q = q < 0 ? 0 : q > 15 ? 15 : q;
            const double e = (double)x[i] - (double)((q - (float)z) * d);
            err += e * e;
        }
        if (err < best) {
            best = err;
            h->d = d16;
            h->z = (uint8_t)z;
        }
    }
    if (best == INFINITY) return; /* range below fp16's resolution: zeros */
    const float d = cp_fp16_to_fp32(h->d), id = 1.0f / d;
    for (int j = 0; j < g / 2; j++) {
        float q0 = rintf(x[j] * id) + (float)h->z, q1 = rintf(x[j + g / 2] * id) + (float)h->z;
        q0 = q0 < 0 ? 0 : q0 > 15 ? 15 : q0;
        q1 = q1 < 0 ? 0 : q1 > 15 ? 15 : q1;
        h->qs[j] = (uint8_t)((int)q0 | (int)q1 << 4);
    }
}

static void i4_from_float(const float *x, void *dst, int64_t n, int g) {
    const size_t bytes = 4 + (size_t)g / 2;
    for (int64_t b = 0; b < n / g; b++) i4_group(x + b * g, g, (i4_head *)((char *)dst + (size_t)b * bytes));
}

static void i4_dot(int64_t n, float *s, const void *vx, const float *y, int g) {
    const size_t bytes = 4 + (size_t)g / 2;
    float acc = 0.0f;
    for (int64_t b = 0; b < n / g; b++) {
        const i4_head *h = (const i4_head *)((const char *)vx + (size_t)b * bytes);
        const float *yb = y + b * g;
        float sum = 0.0f;
        for (int j = 0; j < g / 2; j++)
            sum += (float)((h->qs[j] & 15) - h->z) * yb[j] + (float)((h->qs[j] >> 4) - h->z) * yb[j + g / 2];
        acc += sum * cp_fp16_to_fp32(h->d);
    }
    *s = acc;
}

void cp_cpu_i4_g32_to_float(const void *src, float *dst, int64_t n) { i4_to_float(src, dst, n, 32); }
void cp_cpu_i4_g128_to_float(const void *src, float *dst, int64_t n) { i4_to_float(src, dst, n, 128); }
void cp_cpu_i4_g32_from_float(const float *x, void *dst, int64_t n) { i4_from_float(x, dst, n, 32); }
void cp_cpu_i4_g128_from_float(const float *x, void *dst, int64_t n) { i4_from_float(x, dst, n, 128); }
void cp_cpu_vec_dot_i4_g32_f32(int64_t n, float *s, const void *x, const void *y) { i4_dot(n, s, x, y, 32); }
void cp_cpu_vec_dot_i4_g128_f32(int64_t n, float *s, const void *x, const void *y) { i4_dot(n, s, x, y, 128); }
