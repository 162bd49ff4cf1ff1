/* cp_dtype.c - names and block geometry of the element types (GGUF type ids)
 * and portable bit-level fp16/bf16 <-> fp32 conversions (round to nearest
 * even, subnormals, inf and NaN handled as IEEE 754 specifies). */
#include "cp_dtype.h"

#include <string.h>

typedef struct {
    const char *name;
    int64_t block_size; /* elements per block */
    size_t type_size;   /* bytes per block */
    bool quantized;
    size_t row_extra;   /* bytes after the blocks of each row */
} dtype_info;

/* Sizes of the block layouts (GGUF): fp16 scales are 2 bytes, Q8_K's is a
 * float. Types without an entry are unknown to this build. */
static const dtype_info dtype_table[CP_DTYPE_COUNT] = {
    [CP_DTYPE_F32] = {"F32", 1, 4, false},
    [CP_DTYPE_F16] = {"F16", 1, 2, false},
    [CP_DTYPE_Q4_0] = {"Q4_0", 32, 2 + 16, true},
    [CP_DTYPE_Q4_1] = {"Q4_1", 32, 2 + 2 + 16, true},
    [CP_DTYPE_Q5_0] = {"Q5_0", 32, 2 + 4 + 16, true},
    [CP_DTYPE_Q5_1] = {"Q5_1", 32, 2 + 2 + 4 + 16, true},
    [CP_DTYPE_Q8_0] = {"Q8_0", 32, 2 + 32, true},
    [CP_DTYPE_Q8_1] = {"Q8_1", 32, 2 + 2 + 32, true},
    [CP_DTYPE_Q2_K] = {"Q2_K", 256, 16 + 64 + 2 + 2, true},
    [CP_DTYPE_Q3_K] = {"Q3_K", 256, 32 + 64 + 12 + 2, true},
    [CP_DTYPE_Q4_K] = {"Q4_K", 256, 2 + 2 + 12 + 128, true},
    [CP_DTYPE_Q5_K] = {"Q5_K", 256, 2 + 2 + 12 + 32 + 128, true},
    [CP_DTYPE_Q6_K] = {"Q6_K", 256, 128 + 64 + 16 + 2, true},
    [CP_DTYPE_Q8_K] = {"Q8_K", 256, 4 + 256 + 32, true},
    [CP_DTYPE_I8] = {"I8", 1, 1, false},
    [CP_DTYPE_I16] = {"I16", 1, 2, false},
    [CP_DTYPE_I32] = {"I32", 1, 4, false},
    [CP_DTYPE_I64] = {"I64", 1, 8, false},
    [CP_DTYPE_F64] = {"F64", 1, 8, false},
    [CP_DTYPE_BF16] = {"BF16", 1, 2, false},
    [CP_DTYPE_I8_ROW] = {"I8_ROW", 1, 1, true, CP_ROW_TRAILER},
    [CP_DTYPE_F8_ROW] = {"F8_ROW", 1, 1, true, CP_ROW_TRAILER},
    [CP_DTYPE_I4_G32] = {"I4_G32", 32, 2 + 2 + 16, true},
    [CP_DTYPE_I4_G128] = {"I4_G128", 128, 2 + 2 + 64, true},
    [CP_DTYPE_S24_Q8] = {"S24_Q8", 32, 2 + 2 + 4 + 16, true},
};

static const dtype_info *info_of(int t) {
    if (t < 0 || t >= CP_DTYPE_COUNT || dtype_table[t].name == NULL) return NULL;
    return &dtype_table[t];
}

const char *cp_dtype_name(cp_dtype t) {
    const dtype_info *i = info_of((int)t);
    return i ? i->name : NULL;
}

bool cp_dtype_known(int t) {
    return info_of(t) != NULL;
}

int64_t cp_dtype_block_size(cp_dtype t) {
    const dtype_info *i = info_of((int)t);
    return i ? i->block_size : 0;
}

size_t cp_dtype_type_size(cp_dtype t) {
    const dtype_info *i = info_of((int)t);
    return i ? i->type_size : 0;
}

/* Returns 0 for an unknown type, a negative n or one that is not a multiple
 * of the block size, so callers can treat 0 as "invalid". */
size_t cp_dtype_row_size(cp_dtype t, int64_t n) {
    const dtype_info *i = info_of((int)t);
    if (!i || n < 0 || n % i->block_size != 0) return 0;
    return (size_t)(n / i->block_size) * i->type_size + i->row_extra;
}

size_t cp_dtype_row_extra(cp_dtype t) {
    const dtype_info *i = info_of((int)t);
    return i ? i->row_extra : 0;
}

bool cp_dtype_is_gguf(int t) {
    return t < CP_DTYPE_FIRST_OWN && info_of(t) != NULL;
}

bool cp_dtype_is_quantized(cp_dtype t) {
    const dtype_info *i = info_of((int)t);
    return i ? i->quantized : false;
}

float cp_fp16_to_fp32(cp_fp16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in fp32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) return cp_bits_f32(sign | 0x7f800000u | (man << 13)); /* inf, NaN payload kept */
    return cp_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));       /* rebias 15 -> 127 */
}

cp_fp16_t cp_fp32_to_fp16(float f) {
    const uint32_t x = cp_f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: keep the top payload bits, force quiet so it stays NaN */
        return (uint16_t)(sign | 0x7c00u | 0x200u | ((ax >> 13) & 0x3ffu));
    /* 65520 is halfway between 65504 (max half, odd mantissa) and 2^16: ties
     * to even round it up, so everything from there on overflows to inf. */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (ax >= 0x38800000u) {              /* normal half (>= 2^-14) */
        ax += 0xfffu + ((ax >> 13) & 1u); /* RNE; a mantissa carry bumps the exponent */
        return (uint16_t)(sign | ((ax - 0x38000000u) >> 13));
    }
    /* subnormal half or zero: round(|f| * 2^24) to nearest even, 0..1024
     * (1024 is the smallest normal, whose encoding follows naturally) */
    const uint32_t e = ax >> 23;
    if (e < 102) return sign; /* |f| < 2^-25: rounds to zero (2^-25 itself ties to 0) */
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t s = 126u - e; /* 14..24 */
    uint32_t q = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

float cp_bf16_to_fp32(cp_bf16_t h) {
    return cp_bits_f32((uint32_t)h << 16);
}

cp_bf16_t cp_fp32_to_bf16(float f) {
    const uint32_t x = cp_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (cp_bf16_t)((x >> 16) | 0x40u); /* quiet NaN */
    return (cp_bf16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* E4M3: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent field 0 is
 * subnormal (m / 8 * 2^-6); 0x7f and 0xff are NaN; no infinities. The
 * arithmetic is inline in cp_dtype.h, shared with the CUDA kernels. */
float cp_e4m3_to_fp32(uint8_t v) { return cp_e4m3_decode(v); }

uint8_t cp_fp32_to_e4m3(float f) { return cp_e4m3_encode(f); }
