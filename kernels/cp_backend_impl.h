/* cp_backend_impl.h - the private table of operations behind cp_backend_t.
 * A backend implementation fills one struct cp_backend_i (with designated
 * initialisers) and embeds it as the first member of its context. The public
 * wrappers in cp_backend.c validate arguments before calling through it. */
#ifndef CP_BACKEND_IMPL_H
#define CP_BACKEND_IMPL_H

#include "cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

struct cp_backend_i {
    const char *name;
    cp_device device;
    void (*free)(cp_backend_t be);
    bool (*supports)(cp_backend_t be, cp_dtype t);
    cp_status (*alloc)(cp_backend_t be, size_t bytes, void **out);
    void (*dealloc)(cp_backend_t be, void *p);
    cp_status (*copy)(cp_backend_t be, void *dst, const void *src, size_t bytes, cp_copy_kind kind);
    cp_status (*memset)(cp_backend_t be, void *dst, int value, size_t bytes);
    cp_status (*synchronize)(cp_backend_t be);

    cp_status (*matmul)(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y,
                        const float *bias);
    cp_status (*rmsnorm)(cp_backend_t be, float *out, const float *x, const float *w, int n,
                         int dim, float eps);
    cp_status (*rope)(cp_backend_t be, float *x, const int32_t *pos, int n_tok, int n_head,
                      const cp_rope_params *rp);
    cp_status (*kv_store)(cp_backend_t be, const cp_attn_params *p, const float *k,
                          const float *v, void *k_cache, void *v_cache);
    cp_status (*attention)(cp_backend_t be, const cp_attn_params *p, const float *q,
                           const void *k_cache, const void *v_cache, float *out);
    cp_status (*add)(cp_backend_t be, float *y, const float *a, const float *b, size_t n);
    cp_status (*swiglu)(cp_backend_t be, float *out, const float *gate, const float *up, size_t n);
    cp_status (*softmax)(cp_backend_t be, float *x, int n, int dim);
    cp_status (*embed)(cp_backend_t be, const cp_tensor *table, const int32_t *ids, int n,
                       float *out);
    cp_status (*dequantize)(cp_backend_t be, const cp_tensor *w, int64_t row0, int64_t nrows,
                            float *out);
    cp_status (*quantize)(cp_backend_t be, cp_dtype t, const float *x, int64_t nrows, int64_t cols,
                          void *out);
    cp_status (*sample)(cp_backend_t be, const float *logits, int n, int vocab,
                        const cp_sample_params *sp, const float *u, int32_t *out);
    int (*n_threads)(cp_backend_t be);
    /* optional fused operations: NULL runs the composition (cp_backend.c) */
    cp_status (*matmul_group)(cp_backend_t be, int count, const cp_tensor *const *w,
                              const float *x, int n, float *const *y, const float *const *bias);
    cp_status (*matmul_swiglu)(cp_backend_t be, const cp_tensor *w_gate, const cp_tensor *w_up,
                               const float *x, int n, float *out, float *up);
    cp_status (*add_rmsnorm)(cp_backend_t be, float *x, const float *delta, const float *w, int n,
                             int dim, float eps, float *out);
    cp_status (*rope_store)(cp_backend_t be, const cp_rope_params *rp, const cp_attn_params *p,
                            float *q, float *k, const float *v, void *k_cache, void *v_cache);
    /* optional: the queue the operations are ordered on (NULL: none) */
    void *(*stream)(cp_backend_t be);
};

/* Optional graphs of repeated steps (cp_backend.h, cp_backend_graph_*):
 * a backend that has them points cp_backend.graph at one of these; NULL
 * (a zeroed context, e.g. the CPU's) makes the public calls no-ops. */
struct cp_backend_graph_i {
    cp_status (*begin)(cp_backend_t be, uint64_t key, bool *replay);
    cp_status (*end)(cp_backend_t be, bool failed, bool *reissue);
    void (*set_enabled)(cp_backend_t be, bool enabled);
    void (*get_stats)(cp_backend_t be, cp_backend_graph_stats *out);
};

/* Every backend context starts with this. */
struct cp_backend {
    struct cp_backend_i iface;
    const struct cp_backend_graph_i *graph; /* NULL: no graphs */
};

#ifdef __cplusplus
}
#endif

#endif /* CP_BACKEND_IMPL_H */
