/* cp_dtype.h - element types of tensors, including the GGUF block-quantized
 * types, with their block geometry and scalar conversions. The numeric values
 * equal GGUF's (ggml_type) so a GGUF tensor type maps to a cp_dtype as is. */
#ifndef CP_DTYPE_H
#define CP_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cp_dtype {
    CP_DTYPE_F32 = 0,
    CP_DTYPE_F16 = 1,
    CP_DTYPE_Q4_0 = 2,
    CP_DTYPE_Q4_1 = 3,
    CP_DTYPE_Q5_0 = 6,
    CP_DTYPE_Q5_1 = 7,
    CP_DTYPE_Q8_0 = 8,
    CP_DTYPE_Q8_1 = 9,   /* activations only (dot products with Q4_1) */
    CP_DTYPE_Q2_K = 10,
    CP_DTYPE_Q3_K = 11,
    CP_DTYPE_Q4_K = 12,
    CP_DTYPE_Q5_K = 13,
    CP_DTYPE_Q6_K = 14,
    CP_DTYPE_Q8_K = 15,  /* activations only (dot products with K-quants) */
    CP_DTYPE_I8 = 24,
    CP_DTYPE_I16 = 25,
    CP_DTYPE_I32 = 26,
    CP_DTYPE_I64 = 27,
    CP_DTYPE_F64 = 28,
    CP_DTYPE_BF16 = 30,
    /* cparallel's own weight types (not GGUF types: stored in safetensors,
     * see cp_quantize.h). The *_ROW types carry one fp32 scale per row (per
     * output channel): a row of n elements is n one-byte codes followed by
     * a 16-byte trailer (the scale, then 12 zero bytes), so rows stay
     * 16-byte aligned when n is a multiple of 16. */
    CP_DTYPE_I8_ROW = 40,   /* int8 codes q, value q * scale (symmetric) */
    CP_DTYPE_F8_ROW = 41,   /* FP8 E4M3 codes, value e4m3(code) * scale; activations
                               are quantized the same way per token (W8A8) */
    CP_DTYPE_I4_G32 = 42,   /* uint4, groups of 32: value (q - z) * d */
    CP_DTYPE_I4_G128 = 43,  /* uint4, groups of 128: value (q - z) * d */
    CP_DTYPE_S24_Q8 = 44,   /* 2:4 sparse int8 blocks of 32 (cp_block_s24_q8): value q * d
                               where kept, 0 elsewhere; activations Q8_0 */
    CP_DTYPE_COUNT = 48, /* upper bound of the numeric values, not a type */
} cp_dtype;

/* The first value that is not a GGUF type. */
#define CP_DTYPE_FIRST_OWN CP_DTYPE_I8_ROW

#define CP_QK4_0 32
#define CP_QK4_1 32
#define CP_QK8_0 32
#define CP_QK8_1 32
#define CP_QK_K 256
#define CP_K_SCALE_SIZE 12

typedef uint16_t cp_fp16_t;
typedef uint16_t cp_bf16_t;

/* Block layouts, byte-identical to GGUF. */
typedef struct { cp_fp16_t d; uint8_t qs[CP_QK4_0 / 2]; } cp_block_q4_0;          /* 18 B */
typedef struct { cp_fp16_t d, m; uint8_t qs[CP_QK4_1 / 2]; } cp_block_q4_1;       /* 20 B */
typedef struct { cp_fp16_t d; int8_t qs[CP_QK8_0]; } cp_block_q8_0;               /* 34 B */
typedef struct { cp_fp16_t d, s; int8_t qs[CP_QK8_1]; } cp_block_q8_1;            /* 36 B; s = d*sum(qs) */
typedef struct {
    cp_fp16_t d, dmin;
    uint8_t scales[CP_K_SCALE_SIZE]; /* 8 x (6-bit scale, 6-bit min) */
    uint8_t qs[CP_QK_K / 2];
} cp_block_q4_K;                                                                 /* 144 B */
typedef struct {
    uint8_t ql[CP_QK_K / 2];      /* low 4 bits */
    uint8_t qh[CP_QK_K / 4];      /* high 2 bits */
    int8_t scales[CP_QK_K / 16];  /* 8-bit scales of 16-element groups */
    cp_fp16_t d;
} cp_block_q6_K;                                                                 /* 210 B */
/* Asymmetric 4-bit groups (the layout of GPTQ/AWQ checkpoints, regrouped):
 * fp16 scale d, integer zero point z (0..16; 16 comes from GPTQ checkpoints
 * that store z - 1), then the codes of a group of
 * G elements packed two per byte: qs[j] holds element j in its low nibble and
 * element j + G/2 in its high nibble. */
typedef struct { cp_fp16_t d; uint8_t z, pad; uint8_t qs[16]; } cp_block_i4_g32;        /* 20 B */
typedef struct { cp_fp16_t d; uint8_t z, pad; uint8_t qs[64]; } cp_block_i4_g128;       /* 68 B */
/* 2:4 semi-structured sparse int8 (S24_Q8), 32 elements in 24 bytes:
 *   bytes 0-1   d, fp16 scale;
 *   bytes 2-3   pad, always 0;
 *   bytes 4-7   mask, uint32 little-endian: bit k set iff element k is kept;
 *               each group of 4 elements (nibble k/4) has exactly 2 bits set;
 *   bytes 8-23  qs, the 16 kept elements as int8 in increasing element order
 *               (group g's two in qs[2g], qs[2g + 1]).
 * A kept element is qs * d, every other one 0; blocks may be only 2-byte
 * aligned in a mapped file, so readers load the mask with memcpy. */
#define CP_QK_S24 32
typedef struct { cp_fp16_t d; uint16_t pad; uint32_t mask; int8_t qs[CP_QK_S24 / 2]; } cp_block_s24_q8; /* 24 B */
#define CP_ROW_TRAILER 16 /* bytes after the codes of an I8_ROW / F8_ROW row */

typedef struct {
    float d;
    int8_t qs[CP_QK_K];
    int16_t bsums[CP_QK_K / 16];  /* sums of groups of 16 */
} cp_block_q8_K;                                                                 /* 292 B */

/* Name as GGUF writes it ("F32", "Q4_K", ...) or NULL for an unknown value. */
const char *cp_dtype_name(cp_dtype t);
/* true when the value names a type this build knows the geometry of. */
bool cp_dtype_known(int t);
/* Elements per block (1 for scalar types), bytes per block. 0 if unknown. */
int64_t cp_dtype_block_size(cp_dtype t);
size_t cp_dtype_type_size(cp_dtype t);
/* Bytes of a row of n elements; n must be a multiple of the block size. */
size_t cp_dtype_row_size(cp_dtype t, int64_t n);
/* true for the block-quantized types (and the per-row scaled ones). */
bool cp_dtype_is_quantized(cp_dtype t);
/* true when the value is a type GGUF files may hold (known and < CP_DTYPE_FIRST_OWN). */
bool cp_dtype_is_gguf(int t);
/* Bytes each row carries after its blocks (CP_ROW_TRAILER for the *_ROW
 * types, else 0); included in cp_dtype_row_size. */
size_t cp_dtype_row_extra(cp_dtype t);

/* The per-row scale of an I8_ROW / F8_ROW row of n elements. */
static inline float cp_row_scale(const void *row, int64_t n) {
    float s;
    const unsigned char *p = (const unsigned char *)row + n;
    memcpy(&s, p, sizeof s);
    return s;
}

/* FP8 E4M3 (the OCP "fn" variant: bias 7, no infinities, 0x7f/0xff NaN,
 * largest finite 448). Encoding rounds to nearest even and saturates: finite
 * values and infinities beyond +-448 give +-448, NaN gives 0x7f whatever
 * its sign (a NaN's sign is not portable: x86 makes 0 x inf negative, a
 * GPU positive). */
uint8_t cp_fp32_to_e4m3(float f);
float cp_e4m3_to_fp32(uint8_t v);

/* The same two conversions as inline code that the CUDA kernels compile
 * too, so the CPU reference and the device round every value alike (the
 * functions above are these). Both are exact whether or not the process
 * flushes subnormals: decoding never makes one, and encoding reads one only
 * where the code is 0 either way. */
#ifdef __CUDACC__
#define CP_HD __host__ __device__
#else
#define CP_HD
#endif
static inline CP_HD uint32_t cp_f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}
static inline CP_HD float cp_bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}
/* Normal codes: the code bits placed in an fp32 (exponent field e, mantissa
 * m << 20) are the value times 2^-120, one exact multiply; subnormal codes
 * (e = 0) are m x 2^-9 (not through an fp32 subnormal, which a process with
 * flush-to-zero would read as 0); the NaN codes give NaN. Selects, no
 * branches on the device. */
static inline CP_HD float cp_e4m3_decode(uint8_t v) {
    const uint32_t sign = (uint32_t)(v & 0x80u) << 24;
    const float normal = cp_bits_f32(sign | (uint32_t)(v & 0x7fu) << 20) * 0x1p120f;
    const float sub = cp_bits_f32(sign | cp_f32_bits((float)(v & 7u) * 0x1p-9f));
    const float a = (v & 0x78u) ? normal : sub;
    return (v & 0x7fu) == 0x7fu ? cp_bits_f32(0x7fc00000u | sign) : a;
}
static inline CP_HD uint8_t cp_e4m3_encode(float f) {
    const uint32_t x = cp_f32_bits(f);
    const uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fu;                     /* NaN, unsigned */
    if (ax >= 0x43e00000u) return (uint8_t)(sign | 0x7eu); /* >= 448 (and inf): saturate */
    if (ax >= 0x3c800000u) {                                /* normal (>= 2^-6) */
        ax += 0x7ffffu + ((ax >> 20) & 1u);                 /* RNE to 3 mantissa bits */
        return (uint8_t)(sign | ((ax >> 20) - (120u << 3)));
    }
    /* subnormal or zero: round(|f| * 2^9) to nearest even, 0..8 (8 is the
     * smallest normal, whose code follows naturally); the scaling is exact */
    const float a = cp_bits_f32(ax) * 512.0f;
    uint32_t q = (uint32_t)a;
    const float rem = a - (float)q;
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) q++;
    return (uint8_t)(sign | q);
}
#undef CP_HD

/* fp16 / bf16 scalar conversions (round to nearest even). */
float cp_fp16_to_fp32(cp_fp16_t h);
cp_fp16_t cp_fp32_to_fp16(float f);
float cp_bf16_to_fp32(cp_bf16_t h);
cp_bf16_t cp_fp32_to_bf16(float f);

#ifdef __cplusplus
}
#endif

#endif /* CP_DTYPE_H */
