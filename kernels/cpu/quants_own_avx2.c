/* quants_own_avx2.c - AVX2 + FMA + F16C dot products of cparallel's own
 * weight types (quants_own.c has the references): int8 and 4-bit codes are
 * widened to fp32 and multiplied with fp32 activations; FP8 codes of both
 * operands are decoded through F16C (the products are exact). */
#include "quants_simd.h"

#ifdef CP_X86

#include <immintrin.h>
#include <string.h>

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void cp_cpu_vec_dot_i8_row_f32_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const int8_t *q = vx;
    const float *y = vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + i));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(y + i), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(y + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) acc += (float)q[i] * y[i];
    *s = acc * cp_row_scale(vx, n);
}

/* 8 E4M3 codes decoded as their values x 2^-8, without a table: the code's
 * exponent and mantissa bits, placed in an fp16's, make an fp16 of exactly
 * that value (exponent bias 15 against 7; E4M3 subnormals become fp16
 * subnormals of the same mantissa), which F16C widens; the sign bit moves
 * to bit 15 and the NaN codes (0x7f, 0xff) become NaN. */
static __m256 e4m3x8_scaled(const uint8_t *p) {
    const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i mag = _mm_and_si128(x, _mm_set1_epi16(0x7f));
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8);
    const __m256 v = _mm256_cvtph_ps(_mm_or_si128(sign, _mm_slli_epi16(mag, 7)));
    const __m128i nan = _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f));
    return _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan)));
}

/* The products of two scaled values are the exact products x 2^-16, far
 * above fp32's smallest normal (2^-34 at least), and every sum rounds as it
 * would unscaled: multiplying by 2^16 at the end gives what decoding
 * through the table gives, bit for bit. */
void cp_cpu_vec_dot_f8_row_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *a = vx, *b = vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(e4m3x8_scaled(a + i), e4m3x8_scaled(b + i), a0);
        a1 = _mm256_fmadd_ps(e4m3x8_scaled(a + i + 8), e4m3x8_scaled(b + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1)) * 65536.0f;
    for (; i < n; i++) acc += cp_cpu_e4m3_lut[a[i]] * cp_cpu_e4m3_lut[b[i]];
    *s = acc * cp_row_scale(vx, n) * cp_row_scale(vy, n);
}

/* Two weight rows against one activation row, which is decoded once; each
 * row's sums in cp_cpu_vec_dot_f8_row_avx2's order, so each result equals
 * that function's bit for bit. */
void cp_cpu_vec_dot2_f8_row_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy) {
    const uint8_t *a = vx0, *c = vx1, *b = vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 y0 = e4m3x8_scaled(b + i), y1 = e4m3x8_scaled(b + i + 8);
        a0 = _mm256_fmadd_ps(e4m3x8_scaled(a + i), y0, a0);
        a1 = _mm256_fmadd_ps(e4m3x8_scaled(a + i + 8), y1, a1);
        c0 = _mm256_fmadd_ps(e4m3x8_scaled(c + i), y0, c0);
        c1 = _mm256_fmadd_ps(e4m3x8_scaled(c + i + 8), y1, c1);
    }
    float sa = hsum(_mm256_add_ps(a0, a1)) * 65536.0f, sc = hsum(_mm256_add_ps(c0, c1)) * 65536.0f;
    for (; i < n; i++) {
        sa += cp_cpu_e4m3_lut[a[i]] * cp_cpu_e4m3_lut[b[i]];
        sc += cp_cpu_e4m3_lut[c[i]] * cp_cpu_e4m3_lut[b[i]];
    }
    const float sy = cp_row_scale(vy, n);
    s[0] = sa * cp_row_scale(vx0, n) * sy;
    s[1] = sc * cp_row_scale(vx1, n) * sy;
}

/* Two weight rows x two activation rows (prompt batches): s = {x0.y0,
 * x1.y0, x0.y1, x1.y1}, every operand decoded once per 8 codes; each
 * output's sums in cp_cpu_vec_dot_f8_row_avx2's order, bit for bit. */
void cp_cpu_vec_dot22_f8_row_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                  const void *vy1) {
    const uint8_t *x[2] = {vx0, vx1}, *y[2] = {vy0, vy1};
    /* a[lane half][weight row][activation row] */
    __m256 a000 = _mm256_setzero_ps(), a010 = a000, a001 = a000, a011 = a000;
    __m256 a100 = a000, a110 = a000, a101 = a000, a111 = a000;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = e4m3x8_scaled(x[0] + i), w1 = e4m3x8_scaled(x[1] + i);
        __m256 v0 = e4m3x8_scaled(y[0] + i), v1 = e4m3x8_scaled(y[1] + i);
        a000 = _mm256_fmadd_ps(w0, v0, a000);
        a010 = _mm256_fmadd_ps(w1, v0, a010);
        a001 = _mm256_fmadd_ps(w0, v1, a001);
        a011 = _mm256_fmadd_ps(w1, v1, a011);
        w0 = e4m3x8_scaled(x[0] + i + 8);
        w1 = e4m3x8_scaled(x[1] + i + 8);
        v0 = e4m3x8_scaled(y[0] + i + 8);
        v1 = e4m3x8_scaled(y[1] + i + 8);
        a100 = _mm256_fmadd_ps(w0, v0, a100);
        a110 = _mm256_fmadd_ps(w1, v0, a110);
        a101 = _mm256_fmadd_ps(w0, v1, a101);
        a111 = _mm256_fmadd_ps(w1, v1, a111);
    }
    float acc[4] = {hsum(_mm256_add_ps(a000, a100)) * 65536.0f, hsum(_mm256_add_ps(a010, a110)) * 65536.0f,
                    hsum(_mm256_add_ps(a001, a101)) * 65536.0f, hsum(_mm256_add_ps(a011, a111)) * 65536.0f};
    for (int q = 0; q < 4; q++) {
        const uint8_t *a = x[q & 1], *b = y[q >> 1];
        for (int64_t t = i; t < n; t++) acc[q] += cp_cpu_e4m3_lut[a[t]] * cp_cpu_e4m3_lut[b[t]];
        s[q] = acc[q] * cp_row_scale(a, n) * cp_row_scale(b, n);
    }
}

/* Groups of g: qs[j] holds element j (low nibble) and j + g/2 (high). Each
 * 16 code bytes give 16 low and 16 high elements, weighted (q - z) * d. */
static void i4_dot_avx2(int64_t n, float *s, const void *vx, const float *y, int g) {
    const size_t bytes = 4 + (size_t)g / 2;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / g; b++) {
        const uint8_t *blk = (const uint8_t *)vx + (size_t)b * bytes;
        cp_fp16_t dh;
        memcpy(&dh, blk, 2);
        const float d = _cvtsh_ss(dh);
        const __m256 dv = _mm256_set1_ps(d), zd = _mm256_set1_ps((float)blk[2] * d);
        const uint8_t *qs = blk + 4;
        const float *yb = y + b * g;
        for (int j = 0; j < g / 2; j += 16) {
            const __m128i q = _mm_loadu_si128((const __m128i *)(qs + j));
            const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
            const __m256 l0 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, zd);
            const __m256 l1 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, zd);
            const __m256 h0 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, zd);
            const __m256 h1 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, zd);
            acc = _mm256_fmadd_ps(l0, _mm256_loadu_ps(yb + j), acc);
            acc = _mm256_fmadd_ps(l1, _mm256_loadu_ps(yb + j + 8), acc);
            acc = _mm256_fmadd_ps(h0, _mm256_loadu_ps(yb + g / 2 + j), acc);
            acc = _mm256_fmadd_ps(h1, _mm256_loadu_ps(yb + g / 2 + j + 8), acc);
        }
    }
    *s = hsum(acc);
}

void cp_cpu_vec_dot_i4_g32_f32_avx2(int64_t n, float *s, const void *x, const void *y) {
    i4_dot_avx2(n, s, x, y, 32);
}
void cp_cpu_vec_dot_i4_g128_f32_avx2(int64_t n, float *s, const void *x, const void *y) {
    i4_dot_avx2(n, s, x, y, 128);
}

#endif /* CP_X86 */
