/* model.c - building a cp_model from a weight file: configuration checks,
 * shape checks of every tensor against the configuration, and placing the
 * weights on the backend (zero-copy from the mapping on the CPU). */
#include "model_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

cp_status cp_model_config_validate(const cp_model_config *c) {
#define BAD(...) return CP_ERROR(CP_ERR_FORMAT, "invalid model configuration: " __VA_ARGS__)
    if (c->n_layer <= 0 || c->n_layer > 4096) BAD("n_layer = %d", c->n_layer);
    if (c->dim <= 0 || c->dim > 1 << 17) BAD("hidden size = %d", c->dim);
    if (c->n_head <= 0 || c->n_head > 4096) BAD("n_head = %d", c->n_head);
    if (c->n_head_kv <= 0 || c->n_head % c->n_head_kv != 0)
        BAD("n_head_kv = %d does not divide n_head = %d", c->n_head_kv, c->n_head);
    if (c->head_dim <= 0 || c->head_dim > 1024 || c->head_dim % 2 != 0)
        BAD("head_dim = %d", c->head_dim);
    if (c->rot_dim <= 0 || c->rot_dim > c->head_dim || c->rot_dim % 2 != 0)
        BAD("rope dimension = %d (head_dim %d)", c->rot_dim, c->head_dim);
    if (c->ffn_dim <= 0 || c->ffn_dim > 1 << 20) BAD("ffn size = %d", c->ffn_dim);
    if (c->n_vocab <= 0 || c->n_vocab > 1 << 24) BAD("vocabulary size = %d", c->n_vocab);
    if (c->ctx_train <= 0) BAD("context length = %d", c->ctx_train);
    if (!(c->norm_eps > 0 && c->norm_eps < 1)) BAD("rms epsilon = %g", (double)c->norm_eps);
    if (!(c->rope_theta > 0) || !isfinite(c->rope_theta)) BAD("rope theta = %g", (double)c->rope_theta);
    if (!(c->rope_freq_scale > 0)) BAD("rope frequency scale = %g", (double)c->rope_freq_scale);
#undef BAD
    return CP_OK;
}

const cp_model_config *cp_model_get_config(cp_model_t m) { return &m->cfg; }
cp_backend_t cp_model_backend(cp_model_t m) { return m->be; }
struct cp_gguf *cp_model_gguf(cp_model_t m) { return m->gguf; }
const char *cp_model_path(cp_model_t m) { return m->path; }
int cp_model_max_batch(cp_model_t m) { return m->max_batch; }

void cp_model_get_stats(cp_model_t m, cp_model_stats *s) { *s = m->stats; }

/* ---- weight lookup ------------------------------------------------------ */

static const cp_weight_info *find_weight(cp_model_t m, const char *name) {
    if (m->gguf) return cp_gguf_find_tensor(m->gguf, name);
    return m->find ? m->find(m->find_ctx, name) : NULL;
}

static void account(cp_model_t m, const cp_weight_info *w) {
    int64_t n = 1;
    for (int d = 0; d < CP_MAX_DIMS; d++) n *= w->ne[d];
    m->stats.n_params += n;
    m->stats.weight_bytes += w->nbytes;
    if ((int)w->dtype >= 0 && (int)w->dtype < CP_DTYPE_COUNT) {
        m->stats.count_by_dtype[w->dtype]++;
        m->stats.bytes_by_dtype[w->dtype] += w->nbytes;
    }
}

/* Device memory for a copy of host bytes, remembered for cp_model_free. */
static cp_status place(cp_model_t m, const void *host, size_t bytes, void **out) {
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **p = realloc(m->owned, (size_t)cap * sizeof(void *));
        if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory");
        m->owned = p;
        m->cap_owned = cap;
    }
    void *d;
    CP_CHECK(cp_backend_alloc(m->be, bytes, &d));
    m->owned[m->n_owned++] = d;
    cp_status st = cp_backend_copy(m->be, d, host, bytes, CP_COPY_HOST_TO_DEVICE);
    if (st != CP_OK) return st;
    *out = d;
    return CP_OK;
}

static void progress(cp_model_t m, const cp_model_load_opts *o, size_t add) {
    m->loaded_bytes += add;
    if (o && o->progress) o->progress(o->progress_user, m->loaded_bytes, m->total_bytes);
}

/* Converts a [rows][cols] weight to dtype t row by row through fp32 on the
 * host (the CPU backend's dequantize/quantize), placing the result on the
 * model's backend. */
static cp_status convert_matrix(cp_model_t m, const cp_weight_info *w, const char *name, int64_t rows,
                                int64_t cols, cp_dtype t, cp_tensor *out) {
    if (cols % cp_dtype_block_size(t) != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cannot convert '%s' to %s: %lld columns are not whole blocks", name,
                        cp_dtype_name(t), (long long)cols);
    cp_backend_t host = NULL;
    float *row = NULL;
    void *dst = NULL;
    cp_status st;
    size_t row_bytes = cp_dtype_row_size(t, cols);
    CP_CHECK_GOTO(cp_backend_cpu_init(1, &host), st, fail);
    if (!cp_backend_supports(host, t) || !cp_backend_supports(host, w->dtype)) {
        st = CP_ERROR(CP_ERR_UNSUPPORTED, "cannot convert '%s' from %s to %s", name, cp_dtype_name(w->dtype),
                      cp_dtype_name(t));
        goto fail;
    }
    row = malloc((size_t)cols * sizeof(float));
    dst = malloc(row_bytes * (size_t)rows);
    if (!row || !dst) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory converting '%s'", name);
        goto fail;
    }
    cp_tensor src = cp_tensor_2d(w->dtype, rows, cols, (void *)w->data);
    for (int64_t r = 0; r < rows; r++) {
        CP_CHECK_GOTO(cp_backend_dequantize(host, &src, r, 1, row), st, fail);
        CP_CHECK_GOTO(cp_backend_quantize(host, t, row, 1, cols, (char *)dst + (size_t)r * row_bytes), st, fail);
    }
    *out = cp_tensor_2d(t, rows, cols, NULL);
    CP_CHECK_GOTO(place(m, dst, row_bytes * (size_t)rows, &out->data), st, fail);
    out->device = cp_backend_device(m->be);
fail:
    free(row);
    free(dst);
    cp_backend_free(host);
    return st;
}

/* A matrix weight of shape [rows][cols] in its stored dtype. */
static cp_status get_matrix(cp_model_t m, const cp_model_load_opts *o, const char *name,
                            int64_t rows, int64_t cols, bool optional, cp_tensor *out) {
    memset(out, 0, sizeof(*out));
    const cp_weight_info *w = find_weight(m, name);
    if (!w) {
        if (optional) return CP_OK;
        return CP_ERROR(CP_ERR_FORMAT, "model file has no tensor '%s'", name);
    }
    if (w->ne[0] != cols || w->ne[1] != rows || w->ne[2] != 1 || w->ne[3] != 1)
        return CP_ERROR(CP_ERR_FORMAT,
                        "tensor '%s' has shape [%lld, %lld, %lld, %lld] but the configuration "
                        "requires [%lld, %lld] (inner dimension first)",
                        name, (long long)w->ne[0], (long long)w->ne[1], (long long)w->ne[2],
                        (long long)w->ne[3], (long long)cols, (long long)rows);
    if (!cp_backend_supports(m->be, w->dtype))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "tensor '%s' has type %s, which the %s backend cannot use",
                        name, cp_dtype_name(w->dtype), cp_backend_name(m->be));
    account(m, w);
    if (o && o->convert && o->convert_dtype != w->dtype) {
        CP_CHECK(convert_matrix(m, w, name, rows, cols, o->convert_dtype, out));
        progress(m, o, w->nbytes);
        return CP_OK;
    }
    *out = cp_tensor_2d(w->dtype, rows, cols, (void *)w->data);
    /* files with unpadded headers can leave data unaligned: kernels get an
     * aligned copy rather than misaligned typed loads */
    if (cp_backend_device(m->be) != CP_DEVICE_CPU || (uintptr_t)w->data % 32 != 0) {
        CP_CHECK(place(m, w->data, w->nbytes, &out->data));
        out->device = cp_backend_device(m->be);
    }
    progress(m, o, w->nbytes);
    return CP_OK;
}

/* A vector (norm weight or bias) of n elements, converted to fp32. */
static cp_status get_vector(cp_model_t m, const cp_model_load_opts *o, const char *name, int64_t n,
                            bool optional, float **out) {
    *out = NULL;
    const cp_weight_info *w = find_weight(m, name);
    if (!w) {
        if (optional) return CP_OK;
        return CP_ERROR(CP_ERR_FORMAT, "model file has no tensor '%s'", name);
    }
    if (w->ne[0] != n || w->ne[1] != 1 || w->ne[2] != 1 || w->ne[3] != 1)
        return CP_ERROR(CP_ERR_FORMAT, "tensor '%s' has %lld x %lld elements but the configuration requires %lld",
                        name, (long long)w->ne[0], (long long)(w->ne[1] * w->ne[2] * w->ne[3]),
                        (long long)n);
    account(m, w);
    float *host = NULL;
    cp_status st = CP_OK;
    if (w->dtype == CP_DTYPE_F32 && cp_backend_device(m->be) == CP_DEVICE_CPU &&
        ((uintptr_t)w->data % sizeof(float)) == 0) {
        *out = (float *)w->data;
        progress(m, o, w->nbytes);
        return CP_OK;
    }
    host = malloc((size_t)n * sizeof(float));
    if (!host) return CP_ERROR(CP_ERR_OOM, "out of memory converting '%s'", name);
    switch (w->dtype) {
    case CP_DTYPE_F32: memcpy(host, w->data, (size_t)n * sizeof(float)); break;
    case CP_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            cp_fp16_t h;
            memcpy(&h, (const char *)w->data + 2 * i, 2);
            host[i] = cp_fp16_to_fp32(h);
        }
        break;
    case CP_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            cp_bf16_t h;
            memcpy(&h, (const char *)w->data + 2 * i, 2);
            host[i] = cp_bf16_to_fp32(h);
        }
        break;
    default:
        st = CP_ERROR(CP_ERR_UNSUPPORTED, "tensor '%s' has type %s; norm weights and biases must be F32, F16 or BF16",
                      name, cp_dtype_name(w->dtype));
        goto fail;
    }
    CP_CHECK_GOTO(place(m, host, (size_t)n * sizeof(float), (void **)out), st, fail);
    progress(m, o, w->nbytes);
fail:
    free(host);
    return st;
}

/* Llama 3.1 frequency factors computed from the configuration when the file
 * does not carry them ("rope_freqs.weight"). */
static cp_status llama3_freq_factors(cp_model_t m) {
    const cp_model_config *c = &m->cfg;
    int n = c->rot_dim / 2;
    float *f = malloc((size_t)n * sizeof(float));
    if (!f) return CP_ERROR(CP_ERR_OOM, "out of memory");
    double lo_wl = c->rope_llama3_orig_ctx / c->rope_llama3_low_freq_factor;
    double hi_wl = c->rope_llama3_orig_ctx / c->rope_llama3_high_freq_factor;
    for (int i = 0; i < n; i++) {
        double freq = pow(c->rope_theta, -2.0 * i / c->rot_dim);
        double wl = 2 * 3.14159265358979323846 / freq;
        double factor;
        if (wl < hi_wl) {
            factor = 1.0;
        } else if (wl > lo_wl) {
            factor = c->rope_llama3_factor;
        } else {
            double smooth = (c->rope_llama3_orig_ctx / wl - c->rope_llama3_low_freq_factor) /
                            (c->rope_llama3_high_freq_factor - c->rope_llama3_low_freq_factor);
            /* new_freq = (1-s) freq/factor + s freq  =>  divisor = 1 / ((1-s)/factor + s) */
            factor = 1.0 / ((1 - smooth) / c->rope_llama3_factor + smooth);
        }
        f[i] = (float)factor;
    }
    cp_status st = place(m, f, (size_t)n * sizeof(float), (void **)&m->w.rope_freqs);
    free(f);
    return st;
}

static cp_status build(cp_model_t m, const cp_model_load_opts *o) {
    const cp_model_config *c = &m->cfg;
    int64_t q_dim = (int64_t)c->n_head * c->head_dim;
    int64_t kv_dim = (int64_t)c->n_head_kv * c->head_dim;
    char name[128];

    m->w.layers = calloc((size_t)c->n_layer, sizeof(cp_layer_weights));
    if (!m->w.layers) return CP_ERROR(CP_ERR_OOM, "out of memory");
    CP_CHECK(get_matrix(m, o, "token_embd.weight", c->n_vocab, c->dim, false, &m->w.tok_embd));
    CP_CHECK(get_vector(m, o, "output_norm.weight", c->dim, false, &m->w.out_norm));
    if (c->tied_embeddings) {
        m->w.output = m->w.tok_embd;
    } else {
        CP_CHECK(get_matrix(m, o, "output.weight", c->n_vocab, c->dim, false, &m->w.output));
    }
    const cp_weight_info *rf = find_weight(m, "rope_freqs.weight");
    if (rf) {
        CP_CHECK(get_vector(m, o, "rope_freqs.weight", c->rot_dim / 2, false, &m->w.rope_freqs));
    } else if (c->rope_llama3_factor > 0) {
        CP_CHECK(llama3_freq_factors(m));
    }
    for (int l = 0; l < c->n_layer; l++) {
        cp_layer_weights *L = &m->w.layers[l];
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d." s, l), name)
        CP_CHECK(get_vector(m, o, NAME("attn_norm.weight"), c->dim, false, &L->attn_norm));
        CP_CHECK(get_matrix(m, o, NAME("attn_q.weight"), q_dim, c->dim, false, &L->wq));
        CP_CHECK(get_matrix(m, o, NAME("attn_k.weight"), kv_dim, c->dim, false, &L->wk));
        CP_CHECK(get_matrix(m, o, NAME("attn_v.weight"), kv_dim, c->dim, false, &L->wv));
        CP_CHECK(get_matrix(m, o, NAME("attn_output.weight"), c->dim, q_dim, false, &L->wo));
        CP_CHECK(get_vector(m, o, NAME("attn_q.bias"), q_dim, !c->qkv_bias, &L->bq));
        CP_CHECK(get_vector(m, o, NAME("attn_k.bias"), kv_dim, !c->qkv_bias, &L->bk));
        CP_CHECK(get_vector(m, o, NAME("attn_v.bias"), kv_dim, !c->qkv_bias, &L->bv));
        CP_CHECK(get_vector(m, o, NAME("ffn_norm.weight"), c->dim, false, &L->ffn_norm));
        CP_CHECK(get_matrix(m, o, NAME("ffn_gate.weight"), c->ffn_dim, c->dim, false, &L->w_gate));
        CP_CHECK(get_matrix(m, o, NAME("ffn_up.weight"), c->ffn_dim, c->dim, false, &L->w_up));
        CP_CHECK(get_matrix(m, o, NAME("ffn_down.weight"), c->dim, c->ffn_dim, false, &L->w_down));
#undef NAME
    }
    return CP_OK;
}

/* Scratch activations for up to max_batch tokens, allocated once. */
static cp_status alloc_scratch(cp_model_t m) {
    const cp_model_config *c = &m->cfg;
    size_t T = (size_t)m->max_batch;
    size_t q_dim = (size_t)c->n_head * c->head_dim, kv_dim = (size_t)c->n_head_kv * c->head_dim;
    size_t wide = (size_t)c->ffn_dim > q_dim ? (size_t)c->ffn_dim : q_dim;
    size_t floats = T * c->dim            /* x: residual stream */
                    + T * c->dim          /* xb: normed input */
                    + T * q_dim           /* q */
                    + 2 * T * kv_dim      /* k, v */
                    + T * wide            /* att / gate */
                    + T * c->ffn_dim      /* up */
                    + T * c->dim;         /* proj */
    size_t ints = 4 * T;                  /* token ids, positions, sequences, logit rows */
    size_t bytes = floats * sizeof(float) + ints * sizeof(int32_t) + 64 * 8;
    CP_CHECK(cp_backend_alloc(m->be, bytes, &m->scratch));
    m->scratch_bytes = bytes;
    char *p = m->scratch;
#define CARVE(ptr, n) (ptr = (void *)p, p += (((n) + 15) / 16) * 64)
    CARVE(m->s.x, T * c->dim);
    CARVE(m->s.xb, T * c->dim);
    CARVE(m->s.q, T * q_dim);
    CARVE(m->s.k, T * kv_dim);
    CARVE(m->s.v, T * kv_dim);
    CARVE(m->s.att, T * wide);
    CARVE(m->s.up, T * c->ffn_dim);
    CARVE(m->s.proj, T * c->dim);
    CARVE(m->s.tokens, T);
    CARVE(m->s.pos, T);
    CARVE(m->s.seq, T);
    CARVE(m->s.rows, T);
#undef CARVE
    CP_ASSERT((size_t)(p - (char *)m->scratch) <= bytes);
    return CP_OK;
}

static bool is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

cp_status cp_model_load(const char *path, const cp_model_load_opts *opts, cp_model_t *out) {
    *out = NULL;
    if (!opts || !opts->backend) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_load: no backend");
    cp_model_t m = calloc(1, sizeof(*m));
    if (!m) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st;
    m->be = opts->backend;
    m->path = strdup(path);
    if (!m->path) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    if (is_dir(path)) {
        CP_CHECK_GOTO(cp_model_open_hf(m, path), st, fail);
    } else {
        CP_CHECK_GOTO(cp_gguf_open(path, &m->gguf), st, fail);
        CP_CHECK_GOTO(cp_gguf_model_config(m->gguf, &m->cfg), st, fail);
        for (int64_t i = 0; i < cp_gguf_n_tensors(m->gguf); i++)
            m->total_bytes += cp_gguf_tensor(m->gguf, i)->nbytes;
    }
    CP_CHECK_GOTO(build(m, opts), st, fail);
    m->max_batch = 512;
    CP_CHECK_GOTO(alloc_scratch(m), st, fail);
    if (cp_backend_device(m->be) != CP_DEVICE_CPU)
        CP_CHECK_GOTO(cp_backend_alloc(m->be, (size_t)CP_LOGIT_CHUNK * m->cfg.n_vocab * sizeof(float),
                                       (void **)&m->logits),
                      st, fail);
    *out = m;
    return CP_OK;
fail:
    cp_model_free(m);
    return st;
}

void cp_model_free(cp_model_t m) {
    if (!m) return;
    for (int i = 0; i < m->n_owned; i++) cp_backend_dealloc(m->be, m->owned[i]);
    free(m->owned);
    cp_backend_dealloc(m->be, m->scratch);
    cp_backend_dealloc(m->be, m->tables);
    cp_backend_dealloc(m->be, m->logits);
    free(m->w.layers);
    cp_gguf_close(m->gguf);
    if (m->hf_close) m->hf_close(m->find_ctx);
    free(m->path);
    free(m);
}
