/* quants_sparse.h - private to the CPU backend: the routines of the 2:4
 * sparse weight type S24_Q8 (cp_block_s24_q8 in cp_dtype.h). quants.c
 * installs them in the type traits; backend_cpu.c repacks tiles of weight
 * rows when a batch of activation rows shares them. */
#ifndef CP_CPU_QUANTS_SPARSE_H
#define CP_CPU_QUANTS_SPARSE_H

#include "cpu_quants.h"

#ifdef __cplusplus
extern "C" {
#endif

/* References (quants_sparse.c), the contracts of cp_cpu_type_traits' slots;
 * n is a multiple of 32. The quantizer keeps, in every group of 4, the 2
 * elements of largest magnitude (the lower index on ties), so a row with at
 * most 2 nonzeros per group keeps all of them. The dot product takes a Q8_0
 * activation row. Decoding reads the first two set bits of each mask
 * nibble, so a damaged mask never reads outside its block. */
void cp_cpu_s24_q8_to_float(const void *src, float *dst, int64_t n);
void cp_cpu_s24_q8_from_float(const float *x, void *dst, int64_t n);
void cp_cpu_vec_dot_s24_q8_q8_0(int64_t n, float *s, const void *x, const void *y);

/* dst (n / 32 Q8_0 blocks) = the S24_Q8 row src of n elements with its
 * zeros written out: same scale, codes of dropped elements 0. Q8_0's dot
 * product on the result equals S24_Q8's (the references: bit for bit). */
void cp_cpu_s24_q8_to_q8_0(const void *src, void *dst, int64_t n);

/* A form of S24_Q8 rows that batched matmuls repack tiles of weight rows
 * into, so the work that depends on the weights alone is done once per
 * tile instead of once per activation row. vec_dot takes a packed row and a
 * Q8_0 activation row and gives exactly the traits' fast vec_dot. */
typedef struct cp_cpu_s24_repack {
    size_t (*row_size)(int64_t n);                       /* bytes of a packed row of n elements */
    void (*pack)(const void *src, void *dst, int64_t n); /* an S24_Q8 row -> a packed row */
    cp_vec_dot_fn vec_dot;
    /* s[i * s_stride] = vec_dot(n, packed row x, activation row i) for
     * i < ny, activation row i at y + i * y_stride (each bit for bit) */
    void (*vec_dot_rows)(int64_t n, float *s, size_t s_stride, const void *x, const void *y, size_t y_stride, int ny);
} cp_cpu_s24_repack;

/* The repacking that goes with the traits' fast vec_dot, or NULL when that
 * is the reference (no SIMD, or CP_CPU_FORCE_REF); defined in quants.c. */
const cp_cpu_s24_repack *cp_cpu_s24_q8_repack(void);

/* cp_cpu_s24_pick[i % 2][b]: the pshufb indices that pick, from the 16
 * activation bytes of one 128-bit lane, the 4 that meet the codes of mask
 * byte i (value b; elements 8i..8i+7, at lane offset 8 (i % 2)): the index
 * of the r-th kept element of each nibble (r < 2), 0x80 (zero) where a
 * nibble has fewer. Filled by cp_cpu_sparse_init (quants.c calls it once
 * before the traits are used). */
extern uint32_t cp_cpu_s24_pick[2][256];
void cp_cpu_sparse_init(void);

#ifdef CP_X86
/* AVX2 + FMA + F16C variants (quants_sparse_avx2.c); call only when the CPU
 * reports those features. */
void cp_cpu_vec_dot_s24_q8_q8_0_avx2(int64_t n, float *s, const void *x, const void *y);
void cp_cpu_vec_dot2_s24_q8_q8_0_avx2(int64_t n, float *s, const void *x0, const void *x1, const void *y);
extern const cp_cpu_s24_repack cp_cpu_s24_repack_avx2;
#endif

#ifdef __cplusplus
}
#endif

#endif /* CP_CPU_QUANTS_SPARSE_H */
