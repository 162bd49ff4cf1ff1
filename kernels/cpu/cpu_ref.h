/* cpu_ref.h - readable single-threaded fp32 references of every backend op
 * (ops_ref.c), which the fast CPU paths and every other backend are tested
 * against, and the small table of vector primitives the fast CPU paths are
 * built from (portable C in backend_cpu.c, AVX2 in ops_avx2.c). */
#ifndef CP_CPU_REF_H
#define CP_CPU_REF_H

#include "../cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The references take the same arguments, with the same meaning, as the
 * cp_backend_* op of the same name (see cp_backend.h); pointers are host
 * memory borrowed for the call. They check what the public wrappers leave to
 * the backend (token ids, positions, block ids, dtype support) and return
 * CP_ERR_INVALID_ARG / CP_ERR_UNSUPPORTED with a message, CP_ERR_OOM when a
 * scratch buffer cannot be allocated (references allocate per call; the
 * fast paths do not). */

/* y = x W^T (+ bias): each weight row is converted to fp32 with the type's
 * to_float, then dotted with the fp32 activation row in fp32. */
cp_status cp_matmul_ref(const cp_tensor *w, const float *x, int n, float *y, const float *bias);
/* Sum of squares in double, scale and product in fp32. */
cp_status cp_rmsnorm_ref(float *out, const float *x, const float *w, int n, int dim, float eps);
/* Angles pos * freq_scale * theta^(-2i/rot_dim) / freq_factors[i] and their
 * sin/cos are computed in double, so positions of 1e5 and more keep full fp32
 * accuracy (an fp32 angle of 1e5 rad has an ulp of 0.008). */
cp_status cp_rope_ref(float *x, const int32_t *pos, int n_tok, int n_head,
                      const cp_rope_params *rp);
cp_status cp_kv_store_ref(const cp_attn_params *p, const float *k, const float *v, void *k_cache,
                          void *v_cache);
/* Two-pass softmax per (token, head) in fp32. */
cp_status cp_attention_ref(const cp_attn_params *p, const float *q, const void *k_cache,
                           const void *v_cache, float *out);
cp_status cp_add_ref(float *y, const float *a, const float *b, size_t n);
cp_status cp_swiglu_ref(float *out, const float *gate, const float *up, size_t n);
/* -inf entries become 0; a row that is entirely -inf becomes uniform. */
cp_status cp_softmax_ref(float *x, int n, int dim);
cp_status cp_embed_ref(const cp_tensor *table, const int32_t *ids, int n, float *out);
cp_status cp_dequantize_ref(const cp_tensor *w, int64_t row0, int64_t nrows, float *out);
/* Uses the type's reference quantizer (from_float_ref). */
cp_status cp_quantize_ref(cp_dtype t, const float *x, int64_t nrows, int64_t cols, void *out);
/* Sorts the whole (filtered) vocabulary per row; probabilities in fp32 with
 * sums in double. Same semantics as the fast sampler, see cp_backend.h. */
cp_status cp_sample_ref(const float *logits, int n, int vocab, const cp_sample_params *sp,
                        const float *u, int32_t *out);

/* Checks shared by the references and the fast paths. */
cp_status cp_cpu_check_tokens(const cp_attn_params *p, const char *op);
/* Under context parallelism, every token's position is one this cache holds. */
cp_status cp_cpu_check_held(const cp_attn_params *p, const char *op);
cp_status cp_cpu_check_ids(const cp_tensor *table, const int32_t *ids, int n);
/* true when the CPU backend has to_float and vec_dot for t. */
bool cp_cpu_supports(cp_dtype t);

/* Vector primitives of the fast paths. All take n >= 0 elements; pointers
 * need no particular alignment; dst may equal a source unless noted. */
typedef struct cp_cpu_vec_ops {
    const char *name;
    float (*dot_f32)(const float *a, const float *b, int n);
    float (*dot_f16)(const float *a, const cp_fp16_t *b, int n);
    void (*axpy_f32)(float *y, float a, const float *x, int n);     /* y += a*x */
    void (*axpy_f16)(float *y, float a, const cp_fp16_t *x, int n); /* y += a*x */
    void (*scale)(float *y, float a, int n);                        /* y *= a */
    float (*sumsq)(const float *x, int n);                          /* fp32 sum of x^2 */
    void (*mul_scaled)(float *out, const float *x, float s, const float *w, int n); /* x*s*w */
    float (*max)(const float *x, int n);                                            /* n >= 1 */
    float (*exp_sum)(float *x, float m, int n); /* x = exp(x - m); returns sum (fp32) */
    void (*add)(float *y, const float *a, const float *b, size_t n);
    void (*swiglu)(float *out, const float *gate, const float *up, size_t n);
    void (*f32_to_f16)(cp_fp16_t *dst, const float *src, int n);
    void (*div)(float *y, const float *x, float d, int n); /* y = x / d, IEEE division */
    int (*first_greater)(const float *x, int n, float t);  /* first i with x[i] > t, or n */
} cp_cpu_vec_ops;

/* The portable C table (any CPU). */
const cp_cpu_vec_ops *cp_cpu_vec_ops_generic(void);
/* The AVX2+FMA+F16C table, or NULL when this build or CPU lacks them. */
const cp_cpu_vec_ops *cp_cpu_vec_ops_avx2(void);

#ifdef __cplusplus
}
#endif

#endif /* CP_CPU_REF_H */
