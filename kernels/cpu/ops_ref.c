/* ops_ref.c - readable single-threaded fp32 references of the backend ops,
 * written for clarity, not speed (no intrinsics, no threads). The fast CPU
 * paths and the CUDA kernels are tested against these. */
#include "cpu_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_quants.h"

bool cp_cpu_supports(cp_dtype t) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    return tr && tr->to_float && tr->vec_dot;
}

cp_status cp_cpu_check_tokens(const cp_attn_params *p, const char *op) {
    for (int t = 0; t < p->n_tok; t++) {
        int s = p->seq_of_tok[t], pos = p->pos_of_tok[t];
        if (s < 0 || pos < 0)
            return CP_ERROR(CP_ERR_INVALID_ARG, "%s: token %d has sequence %d, position %d", op, t,
                            s, pos);
        int last = cp_attn_slot(p, pos) / p->block_size;
        if (last >= p->max_blocks)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "%s: token %d at position %d needs block %d but block tables have %d "
                            "entries (block_size %d)",
                            op, t, pos, last, p->max_blocks, p->block_size);
        const int32_t *bt = p->block_tables + (size_t)s * (size_t)p->max_blocks;
        for (int b = 0; b <= last; b++)
            if (bt[b] < 0)
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "%s: sequence %d has no physical block for logical block %d", op, s,
                                b);
    }
    return CP_OK;
}

cp_status cp_cpu_check_held(const cp_attn_params *p, const char *op) {
    if (p->kv_stride <= 1) return CP_OK;
    for (int t = 0; t < p->n_tok; t++)
        if (p->pos_of_tok[t] % p->kv_stride != p->kv_offset)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "%s: token %d at position %d is not held by this cache (positions %% %d == %d)",
                            op, t, p->pos_of_tok[t], p->kv_stride, p->kv_offset);
    return CP_OK;
}

cp_status cp_cpu_check_ids(const cp_tensor *table, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= table->ne[1])
            return CP_ERROR(CP_ERR_INVALID_ARG, "embed: token id %d at %d outside 0..%lld", ids[i],
                            i, (long long)table->ne[1] - 1);
    return CP_OK;
}

static const cp_cpu_type_traits *traits_or_error(cp_dtype t, const char *op, cp_status *st) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    if (!tr || !tr->to_float) {
        *st = CP_ERROR(CP_ERR_UNSUPPORTED, "%s: the CPU backend cannot read %s tensors", op,
                       cp_dtype_name(t) ? cp_dtype_name(t) : "unknown");
        return NULL;
    }
    *st = CP_OK;
    return tr;
}

cp_status cp_matmul_ref(const cp_tensor *w, const float *x, int n, float *y, const float *bias) {
    cp_status st;
    const cp_cpu_type_traits *tr = traits_or_error(w->dtype, "matmul", &st);
    if (!tr) return st;
    const int64_t k = w->ne[0], m = w->ne[1];
    /* F8_ROW is W8A8: its activations are quantized per token too, as part
     * of the format (the GGUF types' 8-bit activations only approximate fp32) */
    const bool w8a8 = w->dtype == CP_DTYPE_F8_ROW;
    float *row = malloc((size_t)k * sizeof *row);
    float *xa = w8a8 ? malloc((size_t)n * (size_t)k * sizeof *xa) : NULL;
    unsigned char *xq = w8a8 ? malloc(cp_dtype_row_size(w->dtype, k)) : NULL;
    if (!row || (w8a8 && (!xa || !xq))) {
        free(row);
        free(xa);
        free(xq);
        return CP_ERROR(CP_ERR_OOM, "matmul: out of memory for a row of %lld", (long long)k);
    }
    for (int i = 0; w8a8 && i < n; i++) {
        tr->from_float_ref(x + (size_t)i * (size_t)k, xq, k);
        tr->to_float(xq, xa + (size_t)i * (size_t)k, k);
    }
    free(xq);
    if (w8a8) x = xa;
    for (int64_t r = 0; r < m; r++) {
        tr->to_float((const char *)w->data + (size_t)r * w->nb[1], row, k);
        for (int i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * (size_t)k;
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++)
                acc += row[j] * xi[j];
            if (bias) acc += bias[r];
            y[(size_t)i * (size_t)m + (size_t)r] = acc;
        }
    }
    free(row);
    free(xa);
    return CP_OK;
}

cp_status cp_rmsnorm_ref(float *out, const float *x, const float *w, int n, int dim, float eps) {
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * (size_t)dim;
        float *oi = out + (size_t)i * (size_t)dim;
        double ss = 0.0;
        for (int j = 0; j < dim; j++)
            ss += (double)xi[j] * xi[j];
        float s = (float)(1.0 / sqrt(ss / dim + eps));
        for (int j = 0; j < dim; j++)
            oi[j] = xi[j] * s * w[j];
    }
    return CP_OK;
}

cp_status cp_rope_ref(float *x, const int32_t *pos, int n_tok, int n_head,
                      const cp_rope_params *rp) {
    const int half = rp->rot_dim / 2;
    for (int t = 0; t < n_tok; t++) {
        for (int h = 0; h < n_head; h++) {
            float *xh = x + ((size_t)t * (size_t)n_head + (size_t)h) * (size_t)rp->head_dim;
            for (int i = 0; i < half; i++) {
                double inv_freq = pow((double)rp->theta, -2.0 * i / rp->rot_dim);
                double angle = (double)pos[t] * rp->freq_scale * inv_freq;
                if (rp->freq_factors) angle /= rp->freq_factors[i];
                double c = cos(angle), s = sin(angle);
                int ia = rp->mode == CP_ROPE_INTERLEAVED ? 2 * i : i;
                int ib = rp->mode == CP_ROPE_INTERLEAVED ? 2 * i + 1 : i + half;
                double a = xh[ia], b = xh[ib];
                xh[ia] = (float)(a * c - b * s);
                xh[ib] = (float)(a * s + b * c);
            }
        }
    }
    return CP_OK;
}

/* Element offset of (slot of token position pos in sequence seq, kv head). */
static size_t cache_offset(const cp_attn_params *p, int seq, int pos, int kvh) {
    int block =
        p->block_tables[(size_t)seq * (size_t)p->max_blocks + (size_t)(pos / p->block_size)];
    size_t slot = (size_t)block * (size_t)p->block_size + (size_t)(pos % p->block_size);
    return (slot * (size_t)p->n_head_kv + (size_t)kvh) * (size_t)p->head_dim;
}

static float cache_get(const cp_attn_params *p, const void *cache, size_t off) {
    if (p->kv_dtype == CP_DTYPE_F16) return cp_fp16_to_fp32(((const cp_fp16_t *)cache)[off]);
    if (cp_kv_quantized(p->kv_dtype)) {
        /* element d of row off / head_dim: its code times the row's scale */
        const size_t hd = (size_t)p->head_dim, d = off % hd;
        const unsigned char *row = (const unsigned char *)cache + off / hd * cp_dtype_row_size(p->kv_dtype, (int64_t)hd);
        const float code = p->kv_dtype == CP_DTYPE_I8_ROW ? (float)(int8_t)row[d] : cp_e4m3_to_fp32(row[d]);
        return code * cp_row_scale(row, (int64_t)hd);
    }
    return ((const float *)cache)[off];
}

static void cache_set(const cp_attn_params *p, void *cache, size_t off, float v) {
    if (p->kv_dtype == CP_DTYPE_F16)
        ((cp_fp16_t *)cache)[off] = cp_fp32_to_fp16(v);
    else
        ((float *)cache)[off] = v;
}

cp_status cp_kv_store_ref(const cp_attn_params *p, const float *k, const float *v, void *k_cache,
                          void *v_cache) {
    CP_CHECK(cp_cpu_check_tokens(p, "kv_store"));
    CP_CHECK(cp_cpu_check_held(p, "kv_store"));
    const int hd = p->head_dim, kv_dim = p->n_head_kv * p->head_dim;
    const cp_cpu_type_traits *tr = cp_kv_quantized(p->kv_dtype) ? cp_cpu_get_type_traits(p->kv_dtype) : NULL;
    for (int t = 0; t < p->n_tok; t++) {
        for (int h = 0; h < p->n_head_kv; h++) {
            size_t off = cache_offset(p, p->seq_of_tok[t], cp_attn_slot(p, p->pos_of_tok[t]), h);
            if (tr) { /* a whole row: codes and scale */
                const size_t rb = cp_dtype_row_size(p->kv_dtype, hd), src = (size_t)t * (size_t)kv_dim + (size_t)h * (size_t)hd;
                tr->from_float_ref(k + src, (char *)k_cache + off / (size_t)hd * rb, hd);
                tr->from_float_ref(v + src, (char *)v_cache + off / (size_t)hd * rb, hd);
                continue;
            }
            for (int d = 0; d < hd; d++) {
                size_t src = (size_t)t * (size_t)kv_dim + (size_t)h * (size_t)hd + (size_t)d;
                cache_set(p, k_cache, off + (size_t)d, k[src]);
                cache_set(p, v_cache, off + (size_t)d, v[src]);
            }
        }
    }
    return CP_OK;
}

cp_status cp_attention_ref(const cp_attn_params *p, const float *q, const void *k_cache,
                           const void *v_cache, float *out) {
    CP_CHECK(cp_cpu_check_tokens(p, "attention"));
    int max_pos = 0;
    for (int t = 0; t < p->n_tok; t++)
        if (p->pos_of_tok[t] > max_pos) max_pos = p->pos_of_tok[t];
    float *scores = malloc(((size_t)max_pos + 1) * sizeof *scores);
    if (!scores) return CP_ERROR(CP_ERR_OOM, "attention: out of memory for %d scores", max_pos + 1);
    const int hd = p->head_dim, n_rep = p->n_head / p->n_head_kv;
    for (int t = 0; t < p->n_tok; t++) {
        const int seq = p->seq_of_tok[t], n_ctx = cp_attn_n_keys(p, p->pos_of_tok[t]);
        for (int h = 0; h < p->n_head; h++) {
            const int kvh = h / n_rep;
            const float *qh = q + ((size_t)t * (size_t)p->n_head + (size_t)h) * (size_t)hd;
            float *oh = out + ((size_t)t * (size_t)p->n_head + (size_t)h) * (size_t)hd;
            if (n_ctx == 0) { /* no key held here (context parallelism) */
                for (int d = 0; d < hd; d++) oh[d] = 0.0f;
                if (p->lse) p->lse[(size_t)t * (size_t)p->n_head + (size_t)h] = -INFINITY;
                continue;
            }
            float mx = -INFINITY;
            for (int j = 0; j < n_ctx; j++) {
                size_t off = cache_offset(p, seq, j, kvh);
                float s = 0.0f;
                for (int d = 0; d < hd; d++)
                    s += qh[d] * cache_get(p, k_cache, off + (size_t)d);
                scores[j] = s * p->scale;
                if (scores[j] > mx) mx = scores[j];
            }
            float sum = 0.0f;
            for (int j = 0; j < n_ctx; j++) {
                scores[j] = expf(scores[j] - mx);
                sum += scores[j];
            }
            for (int d = 0; d < hd; d++)
                oh[d] = 0.0f;
            for (int j = 0; j < n_ctx; j++) {
                size_t off = cache_offset(p, seq, j, kvh);
                float pj = scores[j] / sum;
                for (int d = 0; d < hd; d++)
                    oh[d] += pj * cache_get(p, v_cache, off + (size_t)d);
            }
            if (p->lse) p->lse[(size_t)t * (size_t)p->n_head + (size_t)h] = mx + logf(sum);
        }
    }
    free(scores);
    return CP_OK;
}

cp_status cp_add_ref(float *y, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
    return CP_OK;
}

cp_status cp_swiglu_ref(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
    return CP_OK;
}

cp_status cp_softmax_ref(float *x, int n, int dim) {
    for (int i = 0; i < n; i++) {
        float *xi = x + (size_t)i * (size_t)dim;
        float mx = -INFINITY;
        for (int j = 0; j < dim; j++)
            if (xi[j] > mx) mx = xi[j];
        if (mx == -INFINITY) {
            for (int j = 0; j < dim; j++)
                xi[j] = 1.0f / (float)dim;
            continue;
        }
        float sum = 0.0f;
        for (int j = 0; j < dim; j++) {
            xi[j] = expf(xi[j] - mx);
            sum += xi[j];
        }
        for (int j = 0; j < dim; j++)
            xi[j] /= sum;
    }
    return CP_OK;
}

cp_status cp_embed_ref(const cp_tensor *table, const int32_t *ids, int n, float *out) {
    cp_status st;
    const cp_cpu_type_traits *tr = traits_or_error(table->dtype, "embed", &st);
    if (!tr) return st;
    CP_CHECK(cp_cpu_check_ids(table, ids, n));
    const int64_t dim = table->ne[0];
    for (int i = 0; i < n; i++)
        tr->to_float((const char *)table->data + (size_t)ids[i] * table->nb[1],
                     out + (size_t)i * (size_t)dim, dim);
    return CP_OK;
}

cp_status cp_dequantize_ref(const cp_tensor *w, int64_t row0, int64_t nrows, float *out) {
    cp_status st;
    const cp_cpu_type_traits *tr = traits_or_error(w->dtype, "dequantize", &st);
    if (!tr) return st;
    const int64_t cols = w->ne[0];
    for (int64_t r = 0; r < nrows; r++)
        tr->to_float((const char *)w->data + (size_t)(row0 + r) * w->nb[1],
                     out + (size_t)r * (size_t)cols, cols);
    return CP_OK;
}

cp_status cp_quantize_ref(cp_dtype t, const float *x, int64_t nrows, int64_t cols, void *out) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    if (!tr || !tr->from_float_ref)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "quantize: the CPU backend has no quantizer for %s",
                        cp_dtype_name(t) ? cp_dtype_name(t) : "unknown");
    const size_t row_bytes = cp_dtype_row_size(t, cols);
    for (int64_t r = 0; r < nrows; r++)
        tr->from_float_ref(x + (size_t)r * (size_t)cols, (char *)out + (size_t)r * row_bytes, cols);
    return CP_OK;
}

/* Sorting by scaled logit, descending, lower index first on ties. */
typedef struct {
    float z;
    int32_t id;
} scored;

static int cmp_scored_desc(const void *pa, const void *pb) {
    const scored *a = pa, *b = pb;
    const bool an = isnan(a->z), bn = isnan(b->z);
    if (an != bn) return an ? 1 : -1; /* NaN last: a total order, which qsort needs */
    if (!an && a->z != b->z) return a->z > b->z ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

int cp_sample_walk(const float *prob, int kept, float u) {
    double z = 0.0;
    for (int j = 0; j < kept; j++)
        z += prob[j];
    const double target = (double)u * z;
    double cum = 0.0;
    for (int j = 0; j < kept; j++) {
        cum += prob[j];
        if (cum > target) return j;
    }
    return kept - 1;
}

cp_status cp_sample_ref(const float *logits, int n, int vocab, const cp_sample_params *sp,
                        const float *u, int32_t *out) {
    scored *c = NULL;
    float *prob = NULL;
    if (sp->temperature > 0.0f) {
        c = malloc((size_t)vocab * sizeof *c);
        prob = malloc((size_t)vocab * sizeof *prob);
        if (!c || !prob) {
            free(c);
            free(prob);
            return CP_ERROR(CP_ERR_OOM, "sample: out of memory for a vocabulary of %d", vocab);
        }
    }
    for (int i = 0; i < n; i++) {
        const float *l = logits + (size_t)i * (size_t)vocab;
        if (!(sp->temperature > 0.0f)) { /* NaN too: nothing was allocated */
            int best = 0;
            for (int j = 1; j < vocab; j++)
                if (l[j] > l[best]) best = j;
            out[i] = best;
            continue;
        }
        for (int j = 0; j < vocab; j++) {
            c[j].z = l[j] / sp->temperature;
            c[j].id = j;
        }
        qsort(c, (size_t)vocab, sizeof *c, cmp_scored_desc);
        if (!(c[0].z > -INFINITY) || c[0].z == INFINITY) { /* no finite distribution */
            out[i] = c[0].id;
            continue;
        }
        int kept = vocab;
        if (sp->top_k > 0 && sp->top_k < kept) kept = sp->top_k;
        /* Probabilities relative to the largest one (p[0] = 1). */
        double total = 0.0;
        for (int j = 0; j < kept; j++) {
            prob[j] = expf(c[j].z - c[0].z);
            total += prob[j];
        }
        if (sp->top_p < 1.0f) {
            double cum = 0.0;
            int j = 0;
            while (j < kept) {
                cum += prob[j++];
                if (cum >= (double)sp->top_p * total) break;
            }
            kept = j;
        }
        if (sp->min_p > 0.0f) {
            int j = 1;
            while (j < kept && prob[j] >= sp->min_p * prob[0])
                j++;
            kept = j;
        }
        out[i] = c[cp_sample_walk(prob, kept, u[i])].id;
    }
    free(c);
    free(prob);
    return CP_OK;
}

cp_status cp_sample_host(const float *logits, int n, int vocab, const cp_sample_params *sp,
                         const float *u, int32_t *out) {
    if (!sp || n < 0 || vocab <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "sample: bad arguments n=%d vocab=%d", n, vocab);
    if (n == 0) return CP_OK;
    if (!logits || !u || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "sample: NULL pointer");
    return cp_sample_ref(logits, n, vocab, sp, u, out);
}
