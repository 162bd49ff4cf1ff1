/* quants_own_avx2.c - AVX2 + FMA + F16C dot products of cparallel's own
 * weight types (quants_own.c has the references): int8 and 4-bit codes are
 * widened to fp32 and multiplied with fp32 activations; FP8 codes of both
 * operands are decoded through a 256-entry table (the products are exact). */
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

static __m256 e4m3x8(const uint8_t *p) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_i32gather_ps(cp_cpu_e4m3_lut, idx, 4);
}

void cp_cpu_vec_dot_f8_row_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *a = vx, *b = vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(e4m3x8(a + i), e4m3x8(b + i), a0);
        a1 = _mm256_fmadd_ps(e4m3x8(a + i + 8), e4m3x8(b + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) acc += cp_cpu_e4m3_lut[a[i]] * cp_cpu_e4m3_lut[b[i]];
    *s = acc * cp_row_scale(vx, n) * cp_row_scale(vy, n);
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
