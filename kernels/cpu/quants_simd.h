/* quants_simd.h - private to the CPU backend: the block layouts cp_dtype.h
 * does not spell out (byte-identical to GGUF) and the SIMD variants of the
 * quantization routines, which quants.c installs in the traits at run time. */
#ifndef CP_CPU_QUANTS_SIMD_H
#define CP_CPU_QUANTS_SIMD_H

#include "cpu_quants.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    cp_fp16_t d;
    uint8_t qh[4];
    uint8_t qs[16];
} cp_block_q5_0; /* 22 B */
typedef struct {
    cp_fp16_t d, m;
    uint8_t qh[4];
    uint8_t qs[16];
} cp_block_q5_1; /* 24 B */
typedef struct {
    uint8_t scales[CP_QK_K / 16]; /* low nibble scale, high nibble min, per 16 */
    uint8_t qs[CP_QK_K / 4];      /* 2-bit quants */
    cp_fp16_t d, dmin;
} cp_block_q2_K; /* 84 B */
typedef struct {
    uint8_t hmask[CP_QK_K / 8]; /* high bit of each quant (set: no -4 offset) */
    uint8_t qs[CP_QK_K / 4];    /* low 2 bits */
    uint8_t scales[12];         /* 16 x 6-bit scales, biased by 32 */
    cp_fp16_t d;
} cp_block_q3_K; /* 110 B */
typedef struct {
    cp_fp16_t d, dmin;
    uint8_t scales[CP_K_SCALE_SIZE]; /* packed like Q4_K */
    uint8_t qh[CP_QK_K / 8];         /* 5th bits */
    uint8_t qs[CP_QK_K / 2];         /* low 4 bits */
} cp_block_q5_K;                     /* 176 B */

/* cparallel's own types (quants_own.c). cp_cpu_e4m3_lut[code] is the value
 * of an E4M3 code, filled by cp_cpu_own_types_init (called once by quants.c
 * before the traits are used). */
extern float cp_cpu_e4m3_lut[256];
void cp_cpu_own_types_init(void);
void cp_cpu_i8_row_to_float(const void *src, float *dst, int64_t n);
void cp_cpu_i8_row_from_float(const float *x, void *dst, int64_t n);
void cp_cpu_vec_dot_i8_row_f32(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_f8_row_to_float(const void *src, float *dst, int64_t n);
void cp_cpu_f8_row_from_float(const float *x, void *dst, int64_t n);
void cp_cpu_vec_dot_f8_row(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_i4_g32_to_float(const void *src, float *dst, int64_t n);
void cp_cpu_i4_g128_to_float(const void *src, float *dst, int64_t n);
void cp_cpu_i4_g32_from_float(const float *x, void *dst, int64_t n);
void cp_cpu_i4_g128_from_float(const float *x, void *dst, int64_t n);
void cp_cpu_vec_dot_i4_g32_f32(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_i4_g128_f32(int64_t n, float *s, const void *x, const void *y);

#ifdef CP_X86
/* AVX2 + FMA + F16C variants (quants_avx2.c); same contracts as the slots of
 * cp_cpu_type_traits. Call only when the CPU reports those features. */
void cp_cpu_vec_dot_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_f16_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_bf16_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_q4_0_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot22_q4_0_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);
void cp_cpu_vec_dot_q4_1_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_q5_0_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_q5_1_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_q8_0_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot22_q8_0_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);
void cp_cpu_vec_dot2_q4_1_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y);
void cp_cpu_vec_dot22_q4_1_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);
void cp_cpu_vec_dot_q4_K_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot22_q4_K_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);
void cp_cpu_vec_dot_q5_K_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_q6_K_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot22_q6_K_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                const void *y1);
void cp_cpu_vec_dot_i8_row_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_f8_row_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot2_f8_row_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y);
void cp_cpu_vec_dot22_f8_row_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y0,
                                  const void *y1);
void cp_cpu_vec_dot_i4_g32_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot_i4_g128_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_quantize_q8_0_avx2(const float *x, void *y, int64_t n);
void cp_cpu_quantize_q8_1_avx2(const float *x, void *y, int64_t n);
void cp_cpu_quantize_q8_K_avx2(const float *x, void *y, int64_t n);
#endif

#ifdef __cplusplus
}
#endif

#endif /* CP_CPU_QUANTS_SIMD_H */
