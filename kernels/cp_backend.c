/* cp_backend.c - public entry points of the backend interface: argument
 * checks shared by every backend, then a call through its table. */
#include "cp_backend_impl.h"

#include <string.h>

#define NEED(cond, ...)                                                                            \
    do {                                                                                           \
        if (!(cond)) return CP_ERROR(CP_ERR_INVALID_ARG, __VA_ARGS__);                             \
    } while (0)

void cp_backend_free(cp_backend_t be) {
    if (be) be->iface.free(be);
}

const char *cp_backend_name(cp_backend_t be) { return be->iface.name; }
cp_device cp_backend_device(cp_backend_t be) { return be->iface.device; }
int cp_backend_n_threads(cp_backend_t be) { return be->iface.n_threads ? be->iface.n_threads(be) : 1; }
void *cp_backend_stream(cp_backend_t be) { return be->iface.stream ? be->iface.stream(be) : NULL; }

bool cp_backend_supports(cp_backend_t be, cp_dtype t) { return be->iface.supports(be, t); }

cp_status cp_backend_alloc(cp_backend_t be, size_t bytes, void **out) {
    NEED(out, "alloc: out is NULL");
    return be->iface.alloc(be, bytes, out);
}

void cp_backend_dealloc(cp_backend_t be, void *p) {
    if (p) be->iface.dealloc(be, p);
}

cp_status cp_backend_copy(cp_backend_t be, void *dst, const void *src, size_t bytes,
                          cp_copy_kind kind) {
    if (bytes == 0) return CP_OK;
    NEED(dst && src, "copy: NULL pointer");
    return be->iface.copy(be, dst, src, bytes, kind);
}

cp_status cp_backend_memset(cp_backend_t be, void *dst, int value, size_t bytes) {
    if (bytes == 0) return CP_OK;
    NEED(dst, "memset: NULL pointer");
    return be->iface.memset(be, dst, value, bytes);
}

cp_status cp_backend_synchronize(cp_backend_t be) { return be->iface.synchronize(be); }

static cp_status check_matrix(cp_backend_t be, const cp_tensor *w, const char *op) {
    NEED(w && w->data, "%s: weight tensor is NULL", op);
    NEED(cp_dtype_known((int)w->dtype), "%s: unknown dtype %d", op, (int)w->dtype);
    NEED(be->iface.supports(be, w->dtype), "%s: the %s backend has no kernel for %s weights", op,
         be->iface.name, cp_dtype_name(w->dtype));
    NEED(w->ne[0] > 0 && w->ne[1] > 0 && w->ne[2] == 1 && w->ne[3] == 1,
         "%s: weight must be 2-D, got [%lld, %lld, %lld, %lld]", op, (long long)w->ne[0],
         (long long)w->ne[1], (long long)w->ne[2], (long long)w->ne[3]);
    NEED(w->ne[0] % cp_dtype_block_size(w->dtype) == 0,
         "%s: row length %lld is not a multiple of the %s block (%lld)", op, (long long)w->ne[0],
         cp_dtype_name(w->dtype), (long long)cp_dtype_block_size(w->dtype));
    return CP_OK;
}

cp_status cp_backend_matmul(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y,
                            const float *bias) {
    CP_CHECK(check_matrix(be, w, "matmul"));
    NEED(n >= 0, "matmul: negative batch %d", n);
    if (n == 0) return CP_OK;
    NEED(x && y, "matmul: NULL activation");
    return be->iface.matmul(be, w, x, n, y, bias);
}

cp_status cp_backend_rmsnorm(cp_backend_t be, float *out, const float *x, const float *w, int n,
                             int dim, float eps) {
    NEED(n >= 0 && dim > 0, "rmsnorm: bad shape n=%d dim=%d", n, dim);
    if (n == 0) return CP_OK;
    NEED(out && x && w, "rmsnorm: NULL pointer");
    return be->iface.rmsnorm(be, out, x, w, n, dim, eps);
}

cp_status cp_backend_rope(cp_backend_t be, float *x, const int32_t *pos, int n_tok, int n_head,
                          const cp_rope_params *rp) {
    NEED(rp, "rope: NULL params");
    NEED(n_tok >= 0 && n_head > 0, "rope: bad shape n_tok=%d n_head=%d", n_tok, n_head);
    NEED(rp->rot_dim > 0 && rp->rot_dim <= rp->head_dim && rp->rot_dim % 2 == 0,
         "rope: rot_dim %d must be even and <= head_dim %d", rp->rot_dim, rp->head_dim);
    NEED(rp->mode == CP_ROPE_INTERLEAVED || rp->mode == CP_ROPE_HALF, "rope: unknown mode %d",
         (int)rp->mode);
    if (n_tok == 0) return CP_OK;
    NEED(x && pos, "rope: NULL pointer");
    return be->iface.rope(be, x, pos, n_tok, n_head, rp);
}

static cp_status check_attn(const cp_attn_params *p, const char *op) {
    NEED(p, "%s: NULL params", op);
    NEED(p->n_tok >= 0 && p->n_head > 0 && p->n_head_kv > 0 && p->head_dim > 0 &&
             p->block_size > 0 && p->max_blocks > 0,
         "%s: bad shape", op);
    NEED(p->n_head % p->n_head_kv == 0, "%s: %d query heads not a multiple of %d KV heads", op,
         p->n_head, p->n_head_kv);
    NEED(p->kv_dtype == CP_DTYPE_F32 || p->kv_dtype == CP_DTYPE_F16 || cp_kv_quantized(p->kv_dtype),
         "%s: KV cache dtype %s not supported", op, cp_dtype_name(p->kv_dtype));
    NEED(p->n_tok == 0 || (p->seq_of_tok && p->pos_of_tok && p->block_tables),
         "%s: NULL token tables", op);
    NEED(p->kv_stride >= 0 && p->kv_offset >= 0 && (p->kv_stride <= 1 ? p->kv_offset == 0 : p->kv_offset < p->kv_stride),
         "%s: bad context-parallel stride %d / offset %d", op, p->kv_stride, p->kv_offset);
    return CP_OK;
}

/* Context-parallel caches and partial (log-sum-exp) results are the CPU
 * backend's alone. */
static cp_status check_attn_device(cp_backend_t be, const cp_attn_params *p, const char *op) {
    if ((p->kv_stride > 1 || p->lse) && cp_backend_device(be) != CP_DEVICE_CPU)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: context parallelism (--cp) runs on the CPU backend only, not on %s", op,
                        cp_backend_name(be));
    if (cp_kv_quantized(p->kv_dtype) && cp_backend_device(be) != CP_DEVICE_CPU &&
        cp_backend_device(be) != CP_DEVICE_CUDA)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "%s: a %s KV cache runs on the CPU and CUDA backends, not on %s", op,
                        cp_dtype_name(p->kv_dtype), cp_backend_name(be));
    return CP_OK;
}

cp_status cp_backend_kv_store(cp_backend_t be, const cp_attn_params *p, const float *k,
                              const float *v, void *k_cache, void *v_cache) {
    CP_CHECK(check_attn(p, "kv_store"));
    CP_CHECK(check_attn_device(be, p, "kv_store"));
    if (p->n_tok == 0) return CP_OK;
    NEED(k && v && k_cache && v_cache, "kv_store: NULL pointer");
    return be->iface.kv_store(be, p, k, v, k_cache, v_cache);
}

cp_status cp_backend_attention(cp_backend_t be, const cp_attn_params *p, const float *q,
                               const void *k_cache, const void *v_cache, float *out) {
    CP_CHECK(check_attn(p, "attention"));
    CP_CHECK(check_attn_device(be, p, "attention"));
    if (p->n_tok == 0) return CP_OK;
    NEED(q && k_cache && v_cache && out, "attention: NULL pointer");
    return be->iface.attention(be, p, q, k_cache, v_cache, out);
}

cp_status cp_backend_add(cp_backend_t be, float *y, const float *a, const float *b, size_t n) {
    if (n == 0) return CP_OK;
    NEED(y && a && b, "add: NULL pointer");
    return be->iface.add(be, y, a, b, n);
}

cp_status cp_backend_swiglu(cp_backend_t be, float *out, const float *gate, const float *up,
                            size_t n) {
    if (n == 0) return CP_OK;
    NEED(out && gate && up, "swiglu: NULL pointer");
    return be->iface.swiglu(be, out, gate, up, n);
}

cp_status cp_backend_softmax(cp_backend_t be, float *x, int n, int dim) {
    NEED(n >= 0 && dim > 0, "softmax: bad shape n=%d dim=%d", n, dim);
    if (n == 0) return CP_OK;
    NEED(x, "softmax: NULL pointer");
    return be->iface.softmax(be, x, n, dim);
}

cp_status cp_backend_embed(cp_backend_t be, const cp_tensor *table, const int32_t *ids, int n,
                           float *out) {
    CP_CHECK(check_matrix(be, table, "embed"));
    NEED(n >= 0, "embed: negative count");
    if (n == 0) return CP_OK;
    NEED(ids && out, "embed: NULL pointer");
    return be->iface.embed(be, table, ids, n, out);
}

cp_status cp_backend_dequantize(cp_backend_t be, const cp_tensor *w, int64_t row0, int64_t nrows,
                                float *out) {
    CP_CHECK(check_matrix(be, w, "dequantize"));
    NEED(row0 >= 0 && nrows >= 0 && row0 + nrows <= w->ne[1],
         "dequantize: rows %lld..%lld outside 0..%lld", (long long)row0,
         (long long)(row0 + nrows), (long long)w->ne[1]);
    if (nrows == 0) return CP_OK;
    NEED(out, "dequantize: NULL pointer");
    return be->iface.dequantize(be, w, row0, nrows, out);
}

cp_status cp_backend_quantize(cp_backend_t be, cp_dtype t, const float *x, int64_t nrows,
                              int64_t cols, void *out) {
    NEED(cp_dtype_known((int)t) && be->iface.supports(be, t), "quantize: dtype %s not supported",
         cp_dtype_name(t) ? cp_dtype_name(t) : "?");
    NEED(nrows >= 0 && cols > 0 && cols % cp_dtype_block_size(t) == 0,
         "quantize: %lld columns is not a multiple of the %s block", (long long)cols,
         cp_dtype_name(t));
    if (nrows == 0) return CP_OK;
    NEED(x && out, "quantize: NULL pointer");
    return be->iface.quantize(be, t, x, nrows, cols, out);
}

cp_status cp_backend_sample(cp_backend_t be, const float *logits, int n, int vocab,
                            const cp_sample_params *sp, const float *u, int32_t *out) {
    NEED(sp, "sample: NULL params");
    NEED(n >= 0 && vocab > 0, "sample: bad shape n=%d vocab=%d", n, vocab);
    if (n == 0) return CP_OK;
    NEED(logits && u && out, "sample: NULL pointer");
    return be->iface.sample(be, logits, n, vocab, sp, u, out);
}

/* ---- fused operations: the fused kernel, or the composition ---- */

cp_status cp_backend_matmul_group(cp_backend_t be, int count, const cp_tensor *const *w,
                                  const float *x, int n, float *const *y, const float *const *bias) {
    NEED(count >= 1 && count <= 3 && w && y, "matmul_group: %d matrices (1..3)", count);
    for (int i = 0; i < count; i++) {
        CP_CHECK(check_matrix(be, w[i], "matmul_group"));
        NEED(w[i]->ne[0] == w[0]->ne[0], "matmul_group: rows of %lld and %lld elements",
             (long long)w[0]->ne[0], (long long)w[i]->ne[0]);
        NEED(y[i], "matmul_group: NULL output %d", i);
    }
    NEED(n >= 0, "matmul_group: negative batch %d", n);
    if (n == 0) return CP_OK;
    NEED(x, "matmul_group: NULL activation");
    if (be->iface.matmul_group) return be->iface.matmul_group(be, count, w, x, n, y, bias);
    for (int i = 0; i < count; i++)
        CP_CHECK(be->iface.matmul(be, w[i], x, n, y[i], bias ? bias[i] : NULL));
    return CP_OK;
}

cp_status cp_backend_matmul_swiglu(cp_backend_t be, const cp_tensor *w_gate,
                                   const cp_tensor *w_up, const float *x, int n, float *out,
                                   float *up) {
    CP_CHECK(check_matrix(be, w_gate, "matmul_swiglu"));
    CP_CHECK(check_matrix(be, w_up, "matmul_swiglu"));
    NEED(w_gate->ne[0] == w_up->ne[0] && w_gate->ne[1] == w_up->ne[1],
         "matmul_swiglu: gate and up shapes differ");
    NEED(n >= 0, "matmul_swiglu: negative batch %d", n);
    if (n == 0) return CP_OK;
    NEED(x && out && up, "matmul_swiglu: NULL pointer");
    if (be->iface.matmul_swiglu) return be->iface.matmul_swiglu(be, w_gate, w_up, x, n, out, up);
    CP_CHECK(be->iface.matmul(be, w_gate, x, n, out, NULL));
    CP_CHECK(be->iface.matmul(be, w_up, x, n, up, NULL));
    return be->iface.swiglu(be, out, out, up, (size_t)n * (size_t)w_gate->ne[1]);
}

cp_status cp_backend_add_rmsnorm(cp_backend_t be, float *x, const float *delta, const float *w,
                                 int n, int dim, float eps, float *out) {
    NEED(n >= 0 && dim > 0, "add_rmsnorm: bad shape n=%d dim=%d", n, dim);
    if (n == 0) return CP_OK;
    NEED(x && delta && w && out, "add_rmsnorm: NULL pointer");
    if (be->iface.add_rmsnorm) return be->iface.add_rmsnorm(be, x, delta, w, n, dim, eps, out);
    CP_CHECK(be->iface.add(be, x, x, delta, (size_t)n * (size_t)dim));
    return be->iface.rmsnorm(be, out, x, w, n, dim, eps);
}

cp_status cp_backend_rope_store(cp_backend_t be, const cp_rope_params *rp, const cp_attn_params *p,
                                float *q, float *k, const float *v, void *k_cache, void *v_cache) {
    CP_CHECK(check_attn(p, "rope_store"));
    CP_CHECK(check_attn_device(be, p, "rope_store"));
    NEED(rp && rp->rot_dim > 0 && rp->rot_dim <= rp->head_dim && rp->rot_dim % 2 == 0 &&
             rp->head_dim == p->head_dim,
         "rope_store: bad rotary parameters");
    NEED(rp->mode == CP_ROPE_INTERLEAVED || rp->mode == CP_ROPE_HALF, "rope_store: unknown mode %d",
         (int)rp->mode);
    if (p->n_tok == 0) return CP_OK;
    NEED(q && k && v && k_cache && v_cache, "rope_store: NULL pointer");
    if (be->iface.rope_store) return be->iface.rope_store(be, rp, p, q, k, v, k_cache, v_cache);
    CP_CHECK(be->iface.rope(be, q, p->pos_of_tok, p->n_tok, p->n_head, rp));
    CP_CHECK(be->iface.rope(be, k, p->pos_of_tok, p->n_tok, p->n_head_kv, rp));
    return be->iface.kv_store(be, p, k, v, k_cache, v_cache);
}

/* ---- graphs of repeated steps: optional, no-ops without the slots ---- */

cp_status cp_backend_graph_begin(cp_backend_t be, uint64_t key, bool *replay) {
    NEED(replay, "graph_begin: replay is NULL");
    *replay = false;
    return be->graph ? be->graph->begin(be, key, replay) : CP_OK;
}

cp_status cp_backend_graph_end(cp_backend_t be, bool failed, bool *reissue) {
    NEED(reissue, "graph_end: reissue is NULL");
    *reissue = false;
    return be->graph ? be->graph->end(be, failed, reissue) : CP_OK;
}

void cp_backend_graph_set_enabled(cp_backend_t be, bool enabled) {
    if (be->graph) be->graph->set_enabled(be, enabled);
}

void cp_backend_graph_get_stats(cp_backend_t be, cp_backend_graph_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof(*out));
    if (be->graph) be->graph->get_stats(be, out);
}
