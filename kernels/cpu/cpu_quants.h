/* cpu_quants.h - per-dtype CPU routines: row conversion to and from fp32 and
 * the dot product of a weight row with an activation row that was quantized
 * to the weight type's partner (vec_dot_type), as GGUF engines do. Each
 * routine has a readable reference (*_ref, no intrinsics) and a fast variant
 * chosen once at start-up from the CPU's features (AVX2+FMA+F16C, AVX-512). */
#ifndef CP_CPU_QUANTS_H
#define CP_CPU_QUANTS_H

#include "../cp_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

/* dst[0..n) = src row as fp32; n is a multiple of the block size. */
typedef void (*cp_to_float_fn)(const void *src, float *dst, int64_t n);
/* Packs n fp32 values into blocks of the type; n a multiple of the block size. */
typedef void (*cp_from_float_fn)(const float *src, void *dst, int64_t n);
/* *s = dot(x row of the weight type, y row of its vec_dot_type), n elements. */
typedef void (*cp_vec_dot_fn)(int64_t n, float *s, const void *x, const void *y);
/* s[0], s[1] = the dots of weight rows x0 and x1 with one activation row y:
 * each bit-identical to vec_dot's, sharing the loads of y (decode GEMV). */
typedef void (*cp_vec_dot2_fn)(int64_t n, float *s, const void *x0, const void *x1, const void *y);
/* s[0..3] = x0.y0, x1.y0, x0.y1, x1.y1 */
typedef void (*cp_vec_dot22_fn)(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);

typedef struct cp_cpu_type_traits {
    cp_dtype type;
    cp_dtype vec_dot_type;      /* the type activations are converted to: F32 for F32,
                                   F16 for F16, BF16 for BF16, Q8_0 for Q4_0/Q8_0,
                                   Q8_1 for Q4_1, Q8_K for Q4_K/Q6_K */
    cp_to_float_fn to_float;    /* NULL for activation-only types */
    cp_from_float_fn from_float_ref;
    cp_from_float_fn from_float; /* fast variant (may equal the reference) */
    cp_vec_dot_fn vec_dot_ref;   /* NULL for activation-only types */
    cp_vec_dot_fn vec_dot;       /* fast variant */
    cp_vec_dot2_fn vec_dot2;     /* optional two-row fast variant, NULL when absent */
    cp_vec_dot22_fn vec_dot22;   /* optional two weight rows x two activation rows, NULL when absent;
                                   like vec_dot2, each result equals vec_dot's bit for bit */
} cp_cpu_type_traits;

/* The traits of t, or NULL when the CPU backend has no routines for it.
 * Thread-safe; the first call detects the CPU features. With
 * CP_CPU_FORCE_REF=1 in the environment the fast slots hold the references. */
const cp_cpu_type_traits *cp_cpu_get_type_traits(cp_dtype t);

/* True when the CPU and OS support AVX2, FMA and F16C (the level every
 * *_avx2.c file is compiled for). False on other architectures. */
bool cp_cpu_has_avx2(void);

/* The SIMD level in use: "avx512", "avx2" or "scalar". */
const char *cp_cpu_simd_level(void);

#ifdef __cplusplus
}
#endif

#endif /* CP_CPU_QUANTS_H */
