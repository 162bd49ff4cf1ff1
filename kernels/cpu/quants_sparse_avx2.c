/* quants_sparse_avx2.c - AVX2 + FMA + F16C dot products of S24_Q8 weights
 * with Q8_0 activations (quants_sparse.c has the references). Only the 16
 * kept products of a block are formed: two blocks go through one 256-bit
 * maddubs, their codes side by side and, against them, the activation
 * bytes the masks pick with one pshufb each. Batched matmuls pack the
 * weights-only part of that work (pick indices, code layout, fp32 scales)
 * once per tile of rows and run it against 4 activation rows at a time
 * (cp_cpu_s24_repack_avx2), with the one-row kernel's bits. */
#include "quants_sparse.h"

#ifdef CP_X86

#include <immintrin.h>
#include <string.h>

/* Blocks are worked on in pairs (a, b): pair p is blocks 2p and 2p + 1; an
 * odd last block pairs with an empty one (no kept codes, scale 0). Inside a
 * pair the 256-bit layout is, per 128-bit lane (lane 0: groups 0-3, lane 1:
 * groups 4-7 of both blocks), 8 bytes of block a then 8 of block b, so the
 * madd sums land in dwords [a a b b | a a b b]. */

static uint32_t mask_of(const uint8_t *blk) {
    uint32_t m;
    memcpy(&m, blk + 4, sizeof m);
    return m;
}

static uint16_t half_of(const void *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

/* The pick indices of a pair, applied to each block's 32 activation bytes. */
static inline __m256i pair_pick(uint32_t ma, uint32_t mb) {
    __m128i lo = _mm_cvtsi32_si128((int)cp_cpu_s24_pick[0][ma & 255]);
    lo = _mm_insert_epi32(lo, (int)cp_cpu_s24_pick[1][(ma >> 8) & 255], 1);
    lo = _mm_insert_epi32(lo, (int)cp_cpu_s24_pick[0][mb & 255], 2);
    lo = _mm_insert_epi32(lo, (int)cp_cpu_s24_pick[1][(mb >> 8) & 255], 3);
    __m128i hi = _mm_cvtsi32_si128((int)cp_cpu_s24_pick[0][(ma >> 16) & 255]);
    hi = _mm_insert_epi32(hi, (int)cp_cpu_s24_pick[1][ma >> 24], 1);
    hi = _mm_insert_epi32(hi, (int)cp_cpu_s24_pick[0][(mb >> 16) & 255], 2);
    hi = _mm_insert_epi32(hi, (int)cp_cpu_s24_pick[1][mb >> 24], 3);
    return _mm256_set_m128i(hi, lo);
}

/* The codes of a pair in the layout above. */
static inline __m256i pair_codes(__m128i qa, __m128i qb) {
    return _mm256_set_m128i(_mm_unpackhi_epi64(qa, qb), _mm_unpacklo_epi64(qa, qb));
}

/* [s_a s_a s_b s_b | s_a s_a s_b s_b] from s = (s_a, s_b, ., .). */
static inline __m256 pair_spread(__m128 s) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1));
}

/* acc + scale * (int32 dot of the pair's codes with the picked activation
 * bytes); ya, yb: the blocks' 32 activation codes (no -128); abs_codes:
 * sign(codes, codes). Codes may hold -128 (files): |code| as unsigned is
 * 128 and the pair sums stay in int16. */
static inline __m256 pair_fma(__m256i pick, __m256i codes, __m256i abs_codes, __m256i ya, __m256i yb, __m256 scale,
                              __m256 acc) {
    const __m256i act = _mm256_blend_epi32(_mm256_shuffle_epi8(ya, pick), _mm256_shuffle_epi8(yb, pick), 0xCC);
    const __m256i p16 = _mm256_maddubs_epi16(abs_codes, _mm256_sign_epi8(act, codes));
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
}

static float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define BLK sizeof(cp_block_s24_q8)

/* One pair of an S24_Q8 row; b may be NULL (the empty block). */
static inline __m256 pair_row(const uint8_t *a, const uint8_t *b, const cp_block_q8_0 *ya,
                              const cp_block_q8_0 *yb, __m256 acc) {
    const __m128i qa = _mm_loadu_si128((const __m128i *)(a + 8));
    const __m128i qb = b ? _mm_loadu_si128((const __m128i *)(b + 8)) : _mm_setzero_si128();
    /* the four fp16 scales in one conversion: (d_a, d_b, d_ya, d_yb) */
    const uint64_t h = (uint64_t)half_of(a) | (uint64_t)(b ? half_of(b) : 0) << 16 |
                       (uint64_t)half_of(&ya->d) << 32 | (uint64_t)(b ? half_of(&yb->d) : 0) << 48;
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
    const __m256 scale = pair_spread(_mm_mul_ps(f, _mm_movehl_ps(f, f)));
    const __m256i y0 = _mm256_loadu_si256((const __m256i *)ya->qs);
    const __m256i y1 = b ? _mm256_loadu_si256((const __m256i *)yb->qs) : y0;
    const __m256i codes = pair_codes(qa, qb);
    return pair_fma(pair_pick(mask_of(a), b ? mask_of(b) : 0), codes, _mm256_sign_epi8(codes, codes), y0, y1, scale,
                    acc);
}

/* Bytes of weights fetched ahead of use. The kernel does more work per
 * byte than Q8_0's, so the hardware prefetchers alone leave it waiting on
 * memory for part of the time; a prefetch this far ahead (measured: 1.5 to
 * 3 KiB do alike) hides most of it when the weights come from DRAM. Near
 * the end of a row it reaches into the next row of the matrix (short rows
 * are all "end"); the address is formed as an integer, and a prefetch of
 * memory that is not mapped is dropped, never a fault. */
#define PREFETCH_AHEAD 2048

static inline void prefetch_ahead(const uint8_t *p) {
    const uintptr_t a = (uintptr_t)p + PREFETCH_AHEAD;
    _mm_prefetch((const char *)a, _MM_HINT_T0);
    _mm_prefetch((const char *)(a + 64), _MM_HINT_T0);
}

/* One accumulator: each pair's work is long next to the latency of its
 * multiply-add, and the packed kernels, which work on 4 activation rows at
 * once, can then keep the same order of operations (hence the same bits). */
void cp_cpu_vec_dot_s24_q8_q8_0_avx2(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *x = vx;
    const cp_block_q8_0 *y = vy;
    const int64_t nb = n / CP_QK_S24;
    __m256 acc = _mm256_setzero_ps();
    int64_t p = 0;
    for (; 2 * p + 1 < nb; p++) {
        if (p % 2 == 0) prefetch_ahead(x + (size_t)(2 * p) * BLK); /* 96 bytes per two pairs */
        acc = pair_row(x + (size_t)(2 * p) * BLK, x + (size_t)(2 * p + 1) * BLK, &y[2 * p], &y[2 * p + 1], acc);
    }
    if (nb % 2) acc = pair_row(x + (size_t)(2 * p) * BLK, NULL, &y[2 * p], NULL, acc);
    *s = hsum_ps(acc);
}

/* Two weight rows against one activation row (decode): the activation
 * blocks and their scales are loaded once, and the two rows' independent
 * chains overlap. Each row's operations are those of the one-row kernel.
 * That pays on short rows (the default model's k = 576 and 1536: 10 to 15%
 * with the weights in cache); on long rows the two interleaved streams were
 * measured slower than one row after the other, which is then what runs. */
#define DOT2_MAX_BLOCKS 64
static inline void pair_row2(const uint8_t *a0, const uint8_t *b0, const uint8_t *a1, const uint8_t *b1,
                             const cp_block_q8_0 *ya, const cp_block_q8_0 *yb, __m256 *acc0, __m256 *acc1) {
    const uint64_t hx = (uint64_t)half_of(a0) | (uint64_t)(b0 ? half_of(b0) : 0) << 16 | (uint64_t)half_of(a1) << 32 |
                        (uint64_t)(b1 ? half_of(b1) : 0) << 48;
    const uint32_t hy = (uint32_t)half_of(&ya->d) | (uint32_t)(yb ? half_of(&yb->d) : 0) << 16;
    const __m128 fx = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)hx)), fy = _mm_cvtph_ps(_mm_cvtsi32_si128((int)hy));
    const __m256 scale0 = pair_spread(_mm_mul_ps(fx, fy)), scale1 = pair_spread(_mm_mul_ps(_mm_movehl_ps(fx, fx), fy));
    const __m256i y0 = _mm256_loadu_si256((const __m256i *)ya->qs);
    const __m256i y1 = yb ? _mm256_loadu_si256((const __m256i *)yb->qs) : y0;
    const __m256i c0 = pair_codes(_mm_loadu_si128((const __m128i *)(a0 + 8)),
                                  b0 ? _mm_loadu_si128((const __m128i *)(b0 + 8)) : _mm_setzero_si128());
    const __m256i c1 = pair_codes(_mm_loadu_si128((const __m128i *)(a1 + 8)),
                                  b1 ? _mm_loadu_si128((const __m128i *)(b1 + 8)) : _mm_setzero_si128());
    *acc0 = pair_fma(pair_pick(mask_of(a0), b0 ? mask_of(b0) : 0), c0, _mm256_sign_epi8(c0, c0), y0, y1, scale0, *acc0);
    *acc1 = pair_fma(pair_pick(mask_of(a1), b1 ? mask_of(b1) : 0), c1, _mm256_sign_epi8(c1, c1), y0, y1, scale1, *acc1);
}

void cp_cpu_vec_dot2_s24_q8_q8_0_avx2(int64_t n, float *s, const void *vx0, const void *vx1, const void *vy) {
    const uint8_t *x0 = vx0, *x1 = vx1;
    const cp_block_q8_0 *y = vy;
    const int64_t nb = n / CP_QK_S24;
    if (nb > DOT2_MAX_BLOCKS) {
        cp_cpu_vec_dot_s24_q8_q8_0_avx2(n, &s[0], vx0, vy);
        cp_cpu_vec_dot_s24_q8_q8_0_avx2(n, &s[1], vx1, vy);
        return;
    }
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t p = 0;
    for (; 2 * p + 1 < nb; p++) {
        if (p % 2 == 0) {
            prefetch_ahead(x0 + (size_t)(2 * p) * BLK);
            prefetch_ahead(x1 + (size_t)(2 * p) * BLK);
        }
        const size_t o = (size_t)(2 * p) * BLK;
        pair_row2(x0 + o, x0 + o + BLK, x1 + o, x1 + o + BLK, &y[2 * p], &y[2 * p + 1], &acc0, &acc1);
    }
    if (nb % 2) {
        const size_t o = (size_t)(2 * p) * BLK;
        pair_row2(x0 + o, NULL, x1 + o, NULL, &y[2 * p], NULL, &acc0, &acc1);
    }
    s[0] = hsum_ps(acc0);
    s[1] = hsum_ps(acc1);
}

/* ---- packed rows for batched matmuls -------------------------------------- */

/* Per pair: the pick indices, the codes in the pair layout, the two scales
 * as fp32 (d_b = 0 for the empty block). */
typedef struct {
    uint8_t pick[32];
    int8_t codes[32];
    float d[2];
} packed_pair; /* 72 B */

static size_t packed_row_size(int64_t n) {
    return (size_t)((n / CP_QK_S24 + 1) / 2) * sizeof(packed_pair);
}

static void pack_row(const void *src, void *dst, int64_t n) {
    const uint8_t *x = src;
    const int64_t nb = n / CP_QK_S24;
    for (int64_t p = 0; p < (nb + 1) / 2; p++) {
        const uint8_t *a = x + (size_t)(2 * p) * BLK, *b = 2 * p + 1 < nb ? a + BLK : NULL;
        packed_pair pp;
        _mm256_storeu_si256((__m256i *)pp.pick, pair_pick(mask_of(a), b ? mask_of(b) : 0));
        const __m128i qa = _mm_loadu_si128((const __m128i *)(a + 8));
        const __m128i qb = b ? _mm_loadu_si128((const __m128i *)(b + 8)) : _mm_setzero_si128();
        _mm256_storeu_si256((__m256i *)pp.codes, pair_codes(qa, qb));
        pp.d[0] = _cvtsh_ss(half_of(a));
        pp.d[1] = b ? _cvtsh_ss(half_of(b)) : 0.0f;
        memcpy((char *)dst + (size_t)p * sizeof pp, &pp, sizeof pp);
    }
}

/* The arithmetic of pair_row on the packed form: the same picks, codes and
 * fp32 scale products in the same order, so the same bits. */
static inline __m256 pair_packed(__m256i pick, __m256i codes, __m256i abs_codes, __m128 dx, const cp_block_q8_0 *ya,
                                 const cp_block_q8_0 *yb, __m256 acc) {
    const uint32_t h = (uint32_t)half_of(&ya->d) | (uint32_t)(yb ? half_of(&yb->d) : 0) << 16;
    const __m256 scale = pair_spread(_mm_mul_ps(dx, _mm_cvtph_ps(_mm_cvtsi32_si128((int)h))));
    const __m256i y0 = _mm256_loadu_si256((const __m256i *)ya->qs);
    const __m256i y1 = yb ? _mm256_loadu_si256((const __m256i *)yb->qs) : y0;
    return pair_fma(pick, codes, abs_codes, y0, y1, scale, acc);
}

/* s[i * s_stride] = dot(packed row x, activation row i) for i < R (1..4),
 * activation row i at y + i * y_stride: the weights' part of each pair is
 * loaded once for all R rows. */
static inline void dot_packed_rows(int64_t n, float *s, size_t s_stride, const packed_pair *x, const char *y,
                                   size_t y_stride, int R) {
    const int64_t nb = n / CP_QK_S24;
    const cp_block_q8_0 *yr[4];
    __m256 acc[4];
    for (int r = 0; r < R; r++) {
        yr[r] = (const cp_block_q8_0 *)(y + (size_t)r * y_stride);
        acc[r] = _mm256_setzero_ps();
    }
    int64_t p = 0;
    for (; 2 * p + 1 < nb; p++) {
        const __m256i pick = _mm256_loadu_si256((const __m256i *)x[p].pick);
        const __m256i codes = _mm256_loadu_si256((const __m256i *)x[p].codes);
        const __m256i abs_codes = _mm256_sign_epi8(codes, codes);
        const __m128 dx = _mm_castpd_ps(_mm_load_sd((const double *)x[p].d));
        for (int r = 0; r < R; r++)
            acc[r] = pair_packed(pick, codes, abs_codes, dx, &yr[r][2 * p], &yr[r][2 * p + 1], acc[r]);
    }
    if (nb % 2) {
        const __m256i pick = _mm256_loadu_si256((const __m256i *)x[p].pick);
        const __m256i codes = _mm256_loadu_si256((const __m256i *)x[p].codes);
        const __m256i abs_codes = _mm256_sign_epi8(codes, codes);
        const __m128 dx = _mm_castpd_ps(_mm_load_sd((const double *)x[p].d));
        for (int r = 0; r < R; r++) acc[r] = pair_packed(pick, codes, abs_codes, dx, &yr[r][2 * p], NULL, acc[r]);
    }
    for (int r = 0; r < R; r++) s[(size_t)r * s_stride] = hsum_ps(acc[r]);
}

static void vec_dot_packed(int64_t n, float *s, const void *vx, const void *vy) {
    dot_packed_rows(n, s, 1, vx, vy, 0, 1);
}

static void vec_dot_packed_rows(int64_t n, float *s, size_t s_stride, const void *vx, const void *vy,
                                size_t y_stride, int ny) {
    int i = 0;
    for (; i + 4 <= ny; i += 4)
        dot_packed_rows(n, s + (size_t)i * s_stride, s_stride, vx, (const char *)vy + (size_t)i * y_stride, y_stride, 4);
    for (; i < ny; i++)
        dot_packed_rows(n, s + (size_t)i * s_stride, s_stride, vx, (const char *)vy + (size_t)i * y_stride, y_stride, 1);
}

const cp_cpu_s24_repack cp_cpu_s24_repack_avx2 = {
    /* .row_size = */ packed_row_size,
    /* .pack = */ pack_row,
    /* .vec_dot = */ vec_dot_packed,
    /* .vec_dot_rows = */ vec_dot_packed_rows,
};

#endif /* CP_X86 */
