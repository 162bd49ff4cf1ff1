/* quants_sparse.c - CPU references (no intrinsics) of the 2:4 sparse weight
 * type S24_Q8: 32-element blocks holding the 2 kept elements of every group
 * of 4 as int8 codes with one fp16 scale, multiplied with Q8_0 activations
 * exactly as Q8_0 weights are. quants_sparse_avx2.c has the fast variants. */
#include "quants_sparse.h"

#include <math.h>
#include <string.h>

uint32_t cp_cpu_s24_pick[2][256];

/* Code j = 2g + r of a block belongs to the r-th set bit of nibble g; only
 * r < 2 has a code. Every decoder follows this rule, so a mask that breaks
 * the format (not 2 bits per nibble) reads nothing outside its block. */
void cp_cpu_sparse_init(void) {
    for (int par = 0; par < 2; par++)
        for (int b = 0; b < 256; b++) {
            uint32_t c = 0x80808080u;
            for (int h = 0; h < 2; h++) { /* the two nibbles of the byte */
                const int v = (b >> (4 * h)) & 15;
                int r = 0;
                for (int p = 0; p < 4 && r < 2; p++)
                    if ((v >> p) & 1) {
                        const int slot = 2 * h + r++;
                        c = (c & ~(0xffu << (8 * slot))) | (uint32_t)(8 * par + 4 * h + p) << (8 * slot);
                    }
            }
            cp_cpu_s24_pick[par][b] = c;
        }
}

/* pos[j] = the element (0..31) that code j of a block with this mask
 * belongs to, or -1 when its group has fewer than 2 set bits. */
static void kept_positions(uint32_t mask, int pos[CP_QK_S24 / 2]) {
    for (int g = 0; g < 8; g++) {
        const unsigned v = (mask >> (4 * g)) & 15u;
        int r = 0;
        pos[2 * g] = pos[2 * g + 1] = -1;
        for (int p = 0; p < 4 && r < 2; p++)
            if ((v >> p) & 1u) pos[2 * g + r++] = 4 * g + p;
    }
}

/* Blocks may be only 2-byte aligned (a mapped file): copy each one out. */
static void load_block(const void *row, int64_t i, cp_block_s24_q8 *b) {
    memcpy(b, (const char *)row + (size_t)i * sizeof *b, sizeof *b);
}

/* The mask field is little-endian whatever the host's byte order. */
static uint32_t get_mask(const cp_block_s24_q8 *b) {
    const uint8_t *m = (const uint8_t *)&b->mask;
    return (uint32_t)m[0] | (uint32_t)m[1] << 8 | (uint32_t)m[2] << 16 | (uint32_t)m[3] << 24;
}

static void put_mask(cp_block_s24_q8 *b, uint32_t v) {
    uint8_t *m = (uint8_t *)&b->mask;
    for (int k = 0; k < 4; k++) m[k] = (uint8_t)(v >> (8 * k));
}

void cp_cpu_s24_q8_to_float(const void *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n / CP_QK_S24; i++, dst += CP_QK_S24) {
        cp_block_s24_q8 b;
        int pos[CP_QK_S24 / 2];
        load_block(src, i, &b);
        kept_positions(get_mask(&b), pos);
        const float d = cp_fp16_to_fp32(b.d);
        memset(dst, 0, CP_QK_S24 * sizeof *dst);
        for (int j = 0; j < CP_QK_S24 / 2; j++)
            if (pos[j] >= 0) dst[pos[j]] = d * (float)b.qs[j];
    }
}

void cp_cpu_s24_q8_to_q8_0(const void *src, void *dst, int64_t n) {
    cp_block_q8_0 *o = dst;
    for (int64_t i = 0; i < n / CP_QK_S24; i++) {
        cp_block_s24_q8 b;
        int pos[CP_QK_S24 / 2];
        load_block(src, i, &b);
        kept_positions(get_mask(&b), pos);
        o[i].d = b.d;
        memset(o[i].qs, 0, sizeof o[i].qs);
        for (int j = 0; j < CP_QK_S24 / 2; j++)
            if (pos[j] >= 0) o[i].qs[pos[j]] = b.qs[j];
    }
}

/* |x| as the selection sees it: NaN counts as 0, so the order below is
 * total and every group keeps exactly 2 elements. */
static float keep_key(float x) {
    const float a = fabsf(x);
    return a == a ? a : 0.0f;
}

/* Per group of 4, element e is kept when fewer than 2 others beat it (a
 * larger key, or an equal key at a lower index). d = amax / 127 over the
 * kept values, codes round(x / d) half away from zero: the bytes Q8_0's
 * quantizer gives the block with its dropped elements set to 0. */
void cp_cpu_s24_q8_from_float(const float *x, void *dst, int64_t n) {
    for (int64_t i = 0; i < n / CP_QK_S24; i++, x += CP_QK_S24) {
        cp_block_s24_q8 b;
        uint32_t mask = 0;
        float amax = 0.0f;
        for (int g = 0; g < 8; g++) {
            float key[4];
            for (int e = 0; e < 4; e++) key[e] = keep_key(x[4 * g + e]);
            for (int e = 0; e < 4; e++) {
                int beaten = 0;
                for (int o = 0; o < 4; o++)
                    if (key[o] > key[e] || (key[o] == key[e] && o < e)) beaten++;
                if (beaten < 2) {
                    mask |= 1u << (4 * g + e);
                    if (key[e] > amax) amax = key[e];
                }
            }
        }
        const float d = amax / 127.0f;
        b.d = cp_fp32_to_fp16(d);
        b.pad = 0;
        put_mask(&b, mask);
        memset(b.qs, 0, sizeof b.qs);
        if (b.d != 0) { /* else the block decodes to 0, and 1/d could overflow */
            const float id = 1.0f / d;
            int pos[CP_QK_S24 / 2];
            kept_positions(mask, pos);
            for (int j = 0; j < CP_QK_S24 / 2; j++) {
                const float v = roundf(x[pos[j]] * id); /* a valid mask: every pos[j] >= 0 */
                b.qs[j] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v == v ? (int)v : 0);
            }
        }
        memcpy((char *)dst + (size_t)i * sizeof b, &b, sizeof b);
    }
}

/* Exact integer sum per block over its kept elements, then one fp32
 * multiply-add with d * d_act: Q8_0's dot product on the expanded block. */
void cp_cpu_vec_dot_s24_q8_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const cp_block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / CP_QK_S24; i++) {
        cp_block_s24_q8 b;
        int pos[CP_QK_S24 / 2];
        load_block(vx, i, &b);
        kept_positions(get_mask(&b), pos);
        int sumi = 0;
        for (int j = 0; j < CP_QK_S24 / 2; j++)
            if (pos[j] >= 0) sumi += b.qs[j] * y[i].qs[pos[j]];
        sumf += (float)sumi * (cp_fp16_to_fp32(b.d) * cp_fp16_to_fp32(y[i].d));
    }
    *s = sumf;
}
