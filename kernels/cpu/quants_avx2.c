/* quants_avx2.c - AVX2 + FMA + F16C variants of the quantized dot products
 * and of the 8-bit activation quantizers (compiled with -mavx2 -mfma -mf16c,
 * installed by quants.c only on CPUs that report those features). Integer
 * dots within a block (maddubs/madd), fp32 across blocks; the quantizers
 * give the same bytes as the references in quants.c. */
#include "quants_simd.h"

#ifdef CP_X86

#include <float.h>
#include <immintrin.h>
#include <string.h>

/* ---- helpers -------------------------------------------------------------- */

static float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static float h2f(cp_fp16_t h) {
    return _cvtsh_ss(h);
}

/* 16 packed bytes -> 32 nibbles: low nibbles (elements 0-15) in the low
 * 128 bits, high nibbles (elements 16-31) in the high 128 bits. */
static __m256i unpack_nibbles_32(const uint8_t *qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* 32 bits (little-endian bytes) -> 32 bytes, 0xff where the bit is set. */
static __m256i bits_to_bytes_32(const uint8_t qh[4]) {
    uint32_t v;
    memcpy(&v, qh, 4);
    /* byte i takes byte i/8 of v, then keeps bit i%8 */
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)v),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
}

/* int32 x 8 of sum(a*b) over pairs of 4 bytes, a unsigned (< 128 or products
 * kept below 2^15 per pair), b signed. */
static __m256i dot_u8_s8(__m256i a, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

/* Signed x signed via |a| * sign(b, a); b must not hold -128 (the 8-bit
 * quantizers produce [-127, 127]). */
static __m256i dot_s8_s8(__m256i a, __m256i b) {
    return dot_u8_s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

/* ---- float types ---------------------------------------------------------- */

void cp_cpu_vec_dot_f32_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const float *x = (const float *)vx, *y = (const float *)vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        sum += x[i] * y[i];
    *s = sum;
}

static __m256 load_f16x8(const cp_fp16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

void cp_cpu_vec_dot_f16_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_fp16_t *x = (const cp_fp16_t *)vx, *y = (const cp_fp16_t *)vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load_f16x8(x + i), load_f16x8(y + i), a0);
        a1 = _mm256_fmadd_ps(load_f16x8(x + i + 8), load_f16x8(y + i + 8), a1);
        a2 = _mm256_fmadd_ps(load_f16x8(x + i + 16), load_f16x8(y + i + 16), a2);
        a3 = _mm256_fmadd_ps(load_f16x8(x + i + 24), load_f16x8(y + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(load_f16x8(x + i), load_f16x8(y + i), a0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        sum += h2f(x[i]) * h2f(y[i]);
    *s = sum;
}

static __m256 load_bf16x8(const cp_bf16_t *p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static float bf2f(cp_bf16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void cp_cpu_vec_dot_bf16_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_bf16_t *x = (const cp_bf16_t *)vx, *y = (const cp_bf16_t *)vy;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load_bf16x8(x + i), load_bf16x8(y + i), a0);
        a1 = _mm256_fmadd_ps(load_bf16x8(x + i + 8), load_bf16x8(y + i + 8), a1);
        a2 = _mm256_fmadd_ps(load_bf16x8(x + i + 16), load_bf16x8(y + i + 16), a2);
        a3 = _mm256_fmadd_ps(load_bf16x8(x + i + 24), load_bf16x8(y + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(load_bf16x8(x + i), load_bf16x8(y + i), a0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        sum += bf2f(x[i]) * bf2f(y[i]);
    *s = sum;
}

/* ---- 32-element blocks ---------------------------------------------------- *
 * Each block's exact int32 dot is spread over 8 lanes; the lanes are scaled
 * by the block's fp32 factor and accumulated with FMA (two accumulators to
 * hide the FMA latency), reduced once at the end. */

void cp_cpu_vec_dot_q4_0_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_0 *x = (const cp_block_q4_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    const int64_t nb = n / CP_QK4_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i off = _mm256_set1_epi8(8);
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const __m256i qx0 = _mm256_sub_epi8(unpack_nibbles_32(x[i].qs), off);
        const __m256i qx1 = _mm256_sub_epi8(unpack_nibbles_32(x[i + 1].qs), off);
        const __m256i p0 = dot_s8_s8(qx0, _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m256i p1 = dot_s8_s8(qx1, _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p0),
                               acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i + 1].d) * h2f(y[i + 1].d)),
                               _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i qx = _mm256_sub_epi8(unpack_nibbles_32(x[i].qs), off);
        const __m256i p = dot_s8_s8(qx, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 =
            _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p), acc0);
    }
    *s = hsum_ps(_mm256_add_ps(acc0, acc1));
}

void cp_cpu_vec_dot_q4_1_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_1 *x = (const cp_block_q4_1 *)vx;
    const cp_block_q8_1 *y = (const cp_block_q8_1 *)vy;
    const int64_t nb = n / CP_QK4_1;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float summs = 0.0f; /* sum of m * s, the offsets' share */
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const __m256i p0 =
            dot_u8_s8(unpack_nibbles_32(x[i].qs), _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m256i p1 = dot_u8_s8(unpack_nibbles_32(x[i + 1].qs),
                                     _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p0),
                               acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i + 1].d) * h2f(y[i + 1].d)),
                               _mm256_cvtepi32_ps(p1), acc1);
        summs += h2f(x[i].m) * h2f(y[i].s) + h2f(x[i + 1].m) * h2f(y[i + 1].s);
    }
    for (; i < nb; i++) {
        const __m256i p =
            dot_u8_s8(unpack_nibbles_32(x[i].qs), _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 =
            _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p), acc0);
        summs += h2f(x[i].m) * h2f(y[i].s);
    }
    *s = hsum_ps(_mm256_add_ps(acc0, acc1)) + summs;
}

void cp_cpu_vec_dot_q5_0_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_0 *x = (const cp_block_q5_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    const int64_t nb = n / 32;
    __m256 acc = _mm256_setzero_ps();
    const __m256i hi_off = _mm256_set1_epi8((char)0xf0);
    for (int64_t i = 0; i < nb; i++) {
        /* q - 16 = nibble when the 5th bit is set, nibble | 0xf0 (as int8:
         * nibble - 16) when it is clear */
        const __m256i nib = unpack_nibbles_32(x[i].qs);
        const __m256i qx =
            _mm256_or_si256(nib, _mm256_andnot_si256(bits_to_bytes_32(x[i].qh), hi_off));
        const __m256i p = dot_s8_s8(qx, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc =
            _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps(acc);
}

void cp_cpu_vec_dot_q5_1_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_1 *x = (const cp_block_q5_1 *)vx;
    const cp_block_q8_1 *y = (const cp_block_q8_1 *)vy;
    const int64_t nb = n / 32;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    for (int64_t i = 0; i < nb; i++) {
        const __m256i nib = unpack_nibbles_32(x[i].qs);
        const __m256i qx = _mm256_or_si256(nib, _mm256_and_si256(bits_to_bytes_32(x[i].qh), bit4));
        const __m256i p = dot_u8_s8(qx, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc =
            _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p), acc);
        summs += h2f(x[i].m) * h2f(y[i].s);
    }
    *s = hsum_ps(acc) + summs;
}

void cp_cpu_vec_dot_q8_0_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q8_0 *x = (const cp_block_q8_0 *)vx;
    const cp_block_q8_0 *y = (const cp_block_q8_0 *)vy;
    const int64_t nb = n / CP_QK8_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    /* weights may hold -128 (other quantizers); |x| as unsigned is fine, and
     * the activations (y) are in [-127, 127] */
    for (; i + 1 < nb; i += 2) {
        const __m256i p0 = dot_s8_s8(_mm256_loadu_si256((const __m256i *)x[i].qs),
                                     _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m256i p1 = dot_s8_s8(_mm256_loadu_si256((const __m256i *)x[i + 1].qs),
                                     _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p0),
                               acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i + 1].d) * h2f(y[i + 1].d)),
                               _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i p = dot_s8_s8(_mm256_loadu_si256((const __m256i *)x[i].qs),
                                    _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc0 =
            _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d)), _mm256_cvtepi32_ps(p), acc0);
    }
    *s = hsum_ps(_mm256_add_ps(acc0, acc1));
}

/* One block of a 2 x 2 product: unsigned weight codes u0, u1 against the
 * signed activation codes v_wa each pair (weight row w, activation row a)
 * multiplies them by; each pair's int32 dot is scaled by the product of its
 * two scales (weight first, as the one-row kernels multiply them) and added
 * to its accumulator a_wa. */
static inline __attribute__((always_inline)) void u8_block22(__m256i u0, __m256i u1, __m256i v00, __m256i v10,
                                                             __m256i v01, __m256i v11, float dx0, float dx1,
                                                             float dy0, float dy1, __m256 *a00, __m256 *a10,
                                                             __m256 *a01, __m256 *a11) {
    *a00 = _mm256_fmadd_ps(_mm256_set1_ps(dx0 * dy0), _mm256_cvtepi32_ps(dot_u8_s8(u0, v00)), *a00);
    *a10 = _mm256_fmadd_ps(_mm256_set1_ps(dx1 * dy0), _mm256_cvtepi32_ps(dot_u8_s8(u1, v10)), *a10);
    *a01 = _mm256_fmadd_ps(_mm256_set1_ps(dx0 * dy1), _mm256_cvtepi32_ps(dot_u8_s8(u0, v01)), *a01);
    *a11 = _mm256_fmadd_ps(_mm256_set1_ps(dx1 * dy1), _mm256_cvtepi32_ps(dot_u8_s8(u1, v11)), *a11);
}

/* The same for signed weight codes w0, w1 against activation blocks v0, v1,
 * as dot_s8_s8 does it: |w| once per weight block, the activations carrying
 * w's signs. */
static inline __attribute__((always_inline)) void s8_block22(__m256i w0, __m256i w1, __m256i v0, __m256i v1,
                                                             float dx0, float dx1, float dy0, float dy1,
                                                             __m256 *a00, __m256 *a10, __m256 *a01,
                                                             __m256 *a11) {
    u8_block22(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(w1, w1), _mm256_sign_epi8(v0, w0),
               _mm256_sign_epi8(v0, w1), _mm256_sign_epi8(v1, w0), _mm256_sign_epi8(v1, w1), dx0, dx1, dy0, dy1,
               a00, a10, a01, a11);
}

/* The 2 x 2 kernels of Q8_0 and Q4_0 (prompt batches) against Q8_0
 * activations: s = {x0.y0, x1.y0, x0.y1, x1.y1}. Each output keeps the
 * one-row kernel's accumulators (even blocks, odd blocks), block order and
 * final reduction, so it is that kernel's result bit for bit; a weight
 * block is loaded (unpacked) once for both activation rows, and an
 * activation block once for both weight rows. WEIGHT(b) gives a block's
 * signed codes. */
#define S8_BLOCK22(i, WEIGHT, a00, a10, a01, a11)                                                              \
    s8_block22(WEIGHT(x0[i]), WEIGHT(x1[i]), _mm256_loadu_si256((const __m256i *)y0[i].qs),                   \
               _mm256_loadu_si256((const __m256i *)y1[i].qs), h2f(x0[i].d), h2f(x1[i].d), h2f(y0[i].d),       \
               h2f(y1[i].d), &a00, &a10, &a01, &a11)
#define S8_DOT22(WEIGHT)                                                                                       \
    do {                                                                                                       \
        const cp_block_q8_0 *y0 = (const cp_block_q8_0 *)vy0, *y1 = (const cp_block_q8_0 *)vy1;               \
        const int64_t nb = n / 32;                                                                             \
        __m256 e00 = _mm256_setzero_ps(), e10 = e00, e01 = e00, e11 = e00;                                     \
        __m256 o00 = e00, o10 = e00, o01 = e00, o11 = e00;                                                     \
        int64_t i = 0;                                                                                         \
        for (; i + 1 < nb; i += 2) {                                                                           \
            S8_BLOCK22(i, WEIGHT, e00, e10, e01, e11);                                                         \
            S8_BLOCK22(i + 1, WEIGHT, o00, o10, o01, o11);                                                     \
        }                                                                                                      \
        for (; i < nb; i++) S8_BLOCK22(i, WEIGHT, e00, e10, e01, e11);                                         \
        s[0] = hsum_ps(_mm256_add_ps(e00, o00));                                                               \
        s[1] = hsum_ps(_mm256_add_ps(e10, o10));                                                               \
        s[2] = hsum_ps(_mm256_add_ps(e01, o01));                                                               \
        s[3] = hsum_ps(_mm256_add_ps(e11, o11));                                                               \
    } while (0)

#define Q8_0_WEIGHT(b) _mm256_loadu_si256((const __m256i *)(b).qs)
#define Q4_0_WEIGHT(b) _mm256_sub_epi8(unpack_nibbles_32((b).qs), _mm256_set1_epi8(8))

void cp_cpu_vec_dot22_q8_0_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                const void *vy1) {
    const cp_block_q8_0 *x0 = (const cp_block_q8_0 *)vx0, *x1 = (const cp_block_q8_0 *)vx1;
    S8_DOT22(Q8_0_WEIGHT);
}

void cp_cpu_vec_dot22_q4_0_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                const void *vy1) {
    const cp_block_q4_0 *x0 = (const cp_block_q4_0 *)vx0, *x1 = (const cp_block_q4_0 *)vx1;
    S8_DOT22(Q4_0_WEIGHT);
}

#undef Q8_0_WEIGHT
#undef Q4_0_WEIGHT
#undef S8_DOT22
#undef S8_BLOCK22

/* Two weight rows against one activation row: each row keeps the
 * accumulators, block order and final reduction of the one-row kernel above,
 * so its result is bit-identical; the activation block and its scales are
 * loaded once for both. Measured 10.2 vs 9.1 GB/s (one thread, 6144 x 576).
 * The same scheme for Q8_0 measured slower (7 vs 14 GB/s) and is not used. */
void cp_cpu_vec_dot2_q4_1_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy) {
    const cp_block_q4_1 *x0 = (const cp_block_q4_1 *)vx0, *x1 = (const cp_block_q4_1 *)vx1;
    const cp_block_q8_1 *y = (const cp_block_q8_1 *)vy;
    const int64_t nb = n / CP_QK4_1;
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
    __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
    float m0 = 0.0f, m1 = 0.0f;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const __m256i ya = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i yb = _mm256_loadu_si256((const __m256i *)y[i + 1].qs);
        const float da = h2f(y[i].d), db = h2f(y[i + 1].d), sa = h2f(y[i].s), sb = h2f(y[i + 1].s);
        a00 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x0[i].d) * da),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x0[i].qs), ya)), a00);
        a01 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x0[i + 1].d) * db),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x0[i + 1].qs), yb)), a01);
        a10 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x1[i].d) * da),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x1[i].qs), ya)), a10);
        a11 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x1[i + 1].d) * db),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x1[i + 1].qs), yb)), a11);
        m0 += h2f(x0[i].m) * sa + h2f(x0[i + 1].m) * sb;
        m1 += h2f(x1[i].m) * sa + h2f(x1[i + 1].m) * sb;
    }
    for (; i < nb; i++) {
        const __m256i ya = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const float da = h2f(y[i].d), sa = h2f(y[i].s);
        a00 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x0[i].d) * da),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x0[i].qs), ya)), a00);
        a10 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x1[i].d) * da),
                              _mm256_cvtepi32_ps(dot_u8_s8(unpack_nibbles_32(x1[i].qs), ya)), a10);
        m0 += h2f(x0[i].m) * sa;
        m1 += h2f(x1[i].m) * sa;
    }
    s[0] = hsum_ps(_mm256_add_ps(a00, a01)) + m0;
    s[1] = hsum_ps(_mm256_add_ps(a10, a11)) + m1;
}

/* Two Q4_1 weight rows x two activation rows (prompt batches), as
 * cp_cpu_vec_dot22_q8_0_avx2: a weight block is unpacked once for both
 * activation rows, and each output keeps the one-row kernel's accumulators,
 * pairing of the offset terms and final reduction, bit for bit. */
void cp_cpu_vec_dot22_q4_1_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                const void *vy1) {
    const cp_block_q4_1 *x0 = (const cp_block_q4_1 *)vx0, *x1 = (const cp_block_q4_1 *)vx1;
    const cp_block_q8_1 *y0 = (const cp_block_q8_1 *)vy0, *y1 = (const cp_block_q8_1 *)vy1;
    const int64_t nb = n / CP_QK4_1;
    __m256 e00 = _mm256_setzero_ps(), e10 = _mm256_setzero_ps(), e01 = _mm256_setzero_ps(),
           e11 = _mm256_setzero_ps();
    __m256 o00 = _mm256_setzero_ps(), o10 = _mm256_setzero_ps(), o01 = _mm256_setzero_ps(),
           o11 = _mm256_setzero_ps();
    float m00 = 0.0f, m10 = 0.0f, m01 = 0.0f, m11 = 0.0f; /* [weight row][activation row] */
#define Q4_1_BLOCK22(i, a00, a10, a01, a11)                                                                    \
    do {                                                                                                       \
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)y0[i].qs);                                      \
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)y1[i].qs);                                      \
        u8_block22(unpack_nibbles_32(x0[i].qs), unpack_nibbles_32(x1[i].qs), v0, v0, v1, v1, h2f(x0[i].d),     \
                   h2f(x1[i].d), h2f(y0[i].d), h2f(y1[i].d), &a00, &a10, &a01, &a11);                          \
    } while (0)
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        Q4_1_BLOCK22(i, e00, e10, e01, e11);
        Q4_1_BLOCK22(i + 1, o00, o10, o01, o11);
        m00 += h2f(x0[i].m) * h2f(y0[i].s) + h2f(x0[i + 1].m) * h2f(y0[i + 1].s);
        m10 += h2f(x1[i].m) * h2f(y0[i].s) + h2f(x1[i + 1].m) * h2f(y0[i + 1].s);
        m01 += h2f(x0[i].m) * h2f(y1[i].s) + h2f(x0[i + 1].m) * h2f(y1[i + 1].s);
        m11 += h2f(x1[i].m) * h2f(y1[i].s) + h2f(x1[i + 1].m) * h2f(y1[i + 1].s);
    }
    for (; i < nb; i++) {
        Q4_1_BLOCK22(i, e00, e10, e01, e11);
        m00 += h2f(x0[i].m) * h2f(y0[i].s);
        m10 += h2f(x1[i].m) * h2f(y0[i].s);
        m01 += h2f(x0[i].m) * h2f(y1[i].s);
        m11 += h2f(x1[i].m) * h2f(y1[i].s);
    }
#undef Q4_1_BLOCK22
    s[0] = hsum_ps(_mm256_add_ps(e00, o00)) + m00;
    s[1] = hsum_ps(_mm256_add_ps(e10, o10)) + m10;
    s[2] = hsum_ps(_mm256_add_ps(e01, o01)) + m01;
    s[3] = hsum_ps(_mm256_add_ps(e11, o11)) + m11;
}

/* ---- K-quants ------------------------------------------------------------- *
 * The int32 dot of a whole super-block is reduced exactly and then scaled
 * with the same fp32 operations, in the same order, as the reference: the
 * results are bit-identical to it. */

/* 6-bit scales and mins of Q4_K/Q5_K (layout documented in quants.c). */
static void k4_scales_mins(const uint8_t *q, int sc[8], int m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        m[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0x0f) | ((q[j] >> 6) << 4);
        m[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

void cp_cpu_vec_dot_q4_K_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q4_K *x = (const cp_block_q4_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int sc[8], m[8];
        k4_scales_mins(x[i].scales, sc, m);
        int summs = 0;
        for (int j = 0; j < 8; j++)
            summs += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        __m256i isum = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c + 32));
            /* int16 pair sums (<= 2*15*127), weighted by the sub-block scale */
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0),
                                                 _mm256_set1_epi16((short)sc[2 * c]));
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1),
                                                 _mm256_set1_epi16((short)sc[2 * c + 1]));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        const float d = y[i].d * h2f(x[i].d), dmin = y[i].d * h2f(x[i].dmin);
        sumf += d * (float)hsum_epi32(isum) - dmin * (float)summs;
    }
    *s = sumf;
}

/* Two Q4_K weight rows x two Q8_K activation rows (prompt batches): s =
 * {x0.y0, x1.y0, x0.y1, x1.y1}. A weight super-block's scales, minimums and
 * nibbles are decoded once for both activation rows; each output's integer
 * sums are exact and its fp32 steps those of cp_cpu_vec_dot_q4_K_avx2, so
 * it is that kernel's result bit for bit. */
void cp_cpu_vec_dot22_q4_K_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                const void *vy1) {
    const cp_block_q4_K *x[2] = {(const cp_block_q4_K *)vx0, (const cp_block_q4_K *)vx1};
    const cp_block_q8_K *y[2] = {(const cp_block_q8_K *)vy0, (const cp_block_q8_K *)vy1};
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    float sumf[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* [activation row * 2 + weight row] */
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int sc[2][8], m[2][8], summs[4] = {0, 0, 0, 0};
        k4_scales_mins(x[0][i].scales, sc[0], m[0]);
        k4_scales_mins(x[1][i].scales, sc[1], m[1]);
        for (int a = 0; a < 2; a++)
            for (int w = 0; w < 2; w++)
                for (int j = 0; j < 8; j++)
                    summs[2 * a + w] += m[w][j] * (y[a][i].bsums[2 * j] + y[a][i].bsums[2 * j + 1]);
        __m256i i00 = _mm256_setzero_si256(), i10 = i00, i01 = i00, i11 = i00;
        for (int c = 0; c < 4; c++) {
            const __m256i q0 = _mm256_loadu_si256((const __m256i *)(x[0][i].qs + 32 * c));
            const __m256i q1 = _mm256_loadu_si256((const __m256i *)(x[1][i].qs + 32 * c));
            const __m256i lo0 = _mm256_and_si256(q0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(q0, 4), m4);
            const __m256i lo1 = _mm256_and_si256(q1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(q1, 4), m4);
            const __m256i s0a = _mm256_set1_epi16((short)sc[0][2 * c]), s0b = _mm256_set1_epi16((short)sc[0][2 * c + 1]);
            const __m256i s1a = _mm256_set1_epi16((short)sc[1][2 * c]), s1b = _mm256_set1_epi16((short)sc[1][2 * c + 1]);
            for (int a = 0; a < 2; a++) {
                const __m256i ya = _mm256_loadu_si256((const __m256i *)(y[a][i].qs + 64 * c));
                const __m256i yb = _mm256_loadu_si256((const __m256i *)(y[a][i].qs + 64 * c + 32));
                const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo0, ya), s0a),
                                                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi0, yb), s0b));
                const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo1, ya), s1a),
                                                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi1, yb), s1b));
                if (a == 0) {
                    i00 = _mm256_add_epi32(i00, p0);
                    i10 = _mm256_add_epi32(i10, p1);
                } else {
                    i01 = _mm256_add_epi32(i01, p0);
                    i11 = _mm256_add_epi32(i11, p1);
                }
            }
        }
        const __m256i isum[4] = {i00, i10, i01, i11};
        for (int a = 0; a < 2; a++)
            for (int w = 0; w < 2; w++) {
                const float d = y[a][i].d * h2f(x[w][i].d), dmin = y[a][i].d * h2f(x[w][i].dmin);
                sumf[2 * a + w] += d * (float)hsum_epi32(isum[2 * a + w]) - dmin * (float)summs[2 * a + w];
            }
    }
    for (int q = 0; q < 4; q++) s[q] = sumf[q];
}

void cp_cpu_vec_dot_q5_K_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q5_K *x = (const cp_block_q5_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        int sc[8], m[8];
        k4_scales_mins(x[i].scales, sc, m);
        int summs = 0;
        for (int j = 0; j < 8; j++)
            summs += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)x[i].qh);
        __m256i isum = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * c));
            /* bit 2c / 2c+1 of qh[l] -> 16 added to the nibble (shifting in
             * 16-bit lanes is safe: only bit 0 of each byte is kept) */
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                               _mm256_slli_epi16(h1, 4));
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c + 32));
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0),
                                                 _mm256_set1_epi16((short)sc[2 * c]));
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1),
                                                 _mm256_set1_epi16((short)sc[2 * c + 1]));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        const float d = y[i].d * h2f(x[i].d), dmin = y[i].d * h2f(x[i].dmin);
        sumf += d * (float)hsum_epi32(isum) - dmin * (float)summs;
    }
    *s = sumf;
}

void cp_cpu_vec_dot_q6_K_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q6_K *x = (const cp_block_q6_K *)vx;
    const cp_block_q8_K *y = (const cp_block_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_K; i++) {
        /* quants are used unsigned (0..63); the -32 comes back through the
         * activation group sums: sum sc*(q-32)*y = sum sc*q*y - 32 sum sc*bsum */
        int corr = 0;
        for (int g = 0; g < 16; g++)
            corr += x[i].scales[g] * y[i].bsums[g];
        __m256i isum = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = x[i].ql + 64 * h;
            const int8_t *sc = x[i].scales + 8 * h;
            const int8_t *q8 = y[i].qs + 128 * h;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(x[i].qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            q[1] = _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            q[2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            q[3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            for (int r = 0; r < 4; r++) {
                /* 32 elements = groups 2r and 2r+1 of this half: the low 8
                 * int16 pair sums belong to the first, the high 8 to the second */
                const __m256i p =
                    _mm256_maddubs_epi16(q[r], _mm256_loadu_si256((const __m256i *)(q8 + 32 * r)));
                const __m256i scv =
                    _mm256_set_m128i(_mm_set1_epi16(sc[2 * r + 1]), _mm_set1_epi16(sc[2 * r]));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, scv));
            }
        }
        const int total = hsum_epi32(isum) - 32 * corr;
        sumf += (y[i].d * h2f(x[i].d)) * (float)total;
    }
    *s = sumf;
}

/* Two Q6_K weight rows x two Q8_K activation rows (prompt batches): s =
 * {x0.y0, x1.y0, x0.y1, x1.y1}. Each weight half-block's 6-bit codes are
 * assembled once for both activation rows; each output's integer sums are
 * exact and its fp32 steps those of cp_cpu_vec_dot_q6_K_avx2, bit for bit. */
void cp_cpu_vec_dot22_q6_K_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy0,
                                const void *vy1) {
    const cp_block_q6_K *x[2] = {(const cp_block_q6_K *)vx0, (const cp_block_q6_K *)vx1};
    const cp_block_q8_K *y[2] = {(const cp_block_q8_K *)vy0, (const cp_block_q8_K *)vy1};
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    float sumf[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* [activation row * 2 + weight row] */
    for (int64_t i = 0; i < n / CP_QK_K; i++)
        for (int w = 0; w < 2; w++) {
            const cp_block_q6_K *xb = &x[w][i];
            int corr0 = 0, corr1 = 0;
            for (int g = 0; g < 16; g++) {
                corr0 += xb->scales[g] * y[0][i].bsums[g];
                corr1 += xb->scales[g] * y[1][i].bsums[g];
            }
            __m256i is0 = _mm256_setzero_si256(), is1 = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = xb->ql + 64 * h;
                const int8_t *sc = xb->scales + 8 * h;
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(xb->qh + 32 * h));
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
                q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
                for (int r = 0; r < 4; r++) {
                    const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[2 * r + 1]), _mm_set1_epi16(sc[2 * r]));
                    const __m256i p0 =
                        _mm256_maddubs_epi16(q[r], _mm256_loadu_si256((const __m256i *)(y[0][i].qs + 128 * h + 32 * r)));
                    const __m256i p1 =
                        _mm256_maddubs_epi16(q[r], _mm256_loadu_si256((const __m256i *)(y[1][i].qs + 128 * h + 32 * r)));
                    is0 = _mm256_add_epi32(is0, _mm256_madd_epi16(p0, scv));
                    is1 = _mm256_add_epi32(is1, _mm256_madd_epi16(p1, scv));
                }
            }
            const int t0 = hsum_epi32(is0) - 32 * corr0, t1 = hsum_epi32(is1) - 32 * corr1;
            sumf[w] += (y[0][i].d * h2f(xb->d)) * (float)t0;
            sumf[2 + w] += (y[1][i].d * h2f(xb->d)) * (float)t1;
        }
    for (int q = 0; q < 4; q++) s[q] = sumf[q];
}

/* ---- activation quantizers (bit-identical to the references) -------------- */

/* 32 int32 in four vectors -> 32 int8 in element order. */
static __m256i pack_32_epi8(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    /* packs works per 128-bit lane: the 4-byte units come out as
     * i0[0:4] i1[0:4] i2[0:4] i3[0:4] | i0[4:8] i1[4:8] i2[4:8] i3[4:8] */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* round half away from zero, exactly as roundf: trunc(v) + sign(v) when the
 * dropped fraction (exact in fp32) is >= 0.5 */
static __m256 round_away_ps(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 absfrac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    const __m256 up = _mm256_cmp_ps(absfrac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(sign, _mm256_set1_ps(1.0f))));
}

static float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Quantizes one block of 32 like the Q8_0 reference; returns sum(q) and the
 * unrounded d, or 0 and d = 0 for a block stored as zeros. */
static int quantize_block_32(const float *x, int8_t *qs, float *d_out, cp_fp16_t *dh_out) {
    const __m256 absmask = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(absmask, v[k]));
    }
    const float d = hmax_ps(amax) / 127.0f;
    const cp_fp16_t dh = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    *dh_out = dh;
    *d_out = d;
    if (dh == 0) {
        memset(qs, 0, 32);
        return 0;
    }
    const __m256 id = _mm256_set1_ps(1.0f / d);
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_cvtps_epi32(round_away_ps(_mm256_mul_ps(v[k], id)));
    _mm256_storeu_si256((__m256i *)qs, pack_32_epi8(q[0], q[1], q[2], q[3]));
    return hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
}

void cp_cpu_quantize_q8_0_avx2(const float *x, void *vy, int64_t n) {
    cp_block_q8_0 *y = (cp_block_q8_0 *)vy;
    for (int64_t i = 0; i < n / CP_QK8_0; i++) {
        float d;
        (void)quantize_block_32(x + i * CP_QK8_0, y[i].qs, &d, &y[i].d);
    }
}

void cp_cpu_quantize_q8_1_avx2(const float *x, void *vy, int64_t n) {
    cp_block_q8_1 *y = (cp_block_q8_1 *)vy;
    for (int64_t i = 0; i < n / CP_QK8_1; i++) {
        float d;
        const int sum = quantize_block_32(x + i * CP_QK8_1, y[i].qs, &d, &y[i].d);
        y[i].s = y[i].d ? _cvtss_sh((float)sum * d, _MM_FROUND_TO_NEAREST_INT) : 0;
    }
}

void cp_cpu_quantize_q8_K_avx2(const float *x, void *vy, int64_t n) {
    cp_block_q8_K *y = (cp_block_q8_K *)vy;
    const __m256 absmask = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / CP_QK_K; i++, x += CP_QK_K) {
        __m256 amaxv = _mm256_setzero_ps();
        for (int k = 0; k < CP_QK_K; k += 8)
            amaxv = _mm256_max_ps(amaxv, _mm256_andnot_ps(absmask, _mm256_loadu_ps(x + k)));
        const float amax = hmax_ps(amaxv);
        /* the reference keeps the first element of largest magnitude */
        float max = 0.0f;
        if (amax != 0.0f) {
            const __m256 target = _mm256_set1_ps(amax);
            for (int k = 0; k < CP_QK_K; k += 8) {
                const int hit = _mm256_movemask_ps(_mm256_cmp_ps(
                    _mm256_andnot_ps(absmask, _mm256_loadu_ps(x + k)), target, _CMP_EQ_OQ));
                if (hit) {
                    max = x[k + __builtin_ctz((unsigned)hit)];
                    break;
                }
            }
        }
        const float iscale = amax != 0.0f ? -127.0f / max : 0.0f;
        if (!(iscale <= FLT_MAX && iscale >= -FLT_MAX) || iscale == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const __m256 is = _mm256_set1_ps(iscale);
        const __m256i q127 = _mm256_set1_epi32(127);
        for (int k = 0; k < CP_QK_K; k += 32) {
            __m256i q[4];
            for (int u = 0; u < 4; u++) {
                const __m256 v = _mm256_round_ps(_mm256_mul_ps(is, _mm256_loadu_ps(x + k + 8 * u)),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[u] = _mm256_min_epi32(_mm256_cvtps_epi32(v), q127);
            }
            _mm256_storeu_si256((__m256i *)(y[i].qs + k), pack_32_epi8(q[0], q[1], q[2], q[3]));
            y[i].bsums[k / 16] = (int16_t)hsum_epi32(_mm256_add_epi32(q[0], q[1]));
            y[i].bsums[k / 16 + 1] = (int16_t)hsum_epi32(_mm256_add_epi32(q[2], q[3]));
        }
        y[i].d = 1.0f / iscale;
    }
}

#endif /* CP_X86 */
