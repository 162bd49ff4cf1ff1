/* quantize.c - GGUF in; GGUF out for GGUF types (the metadata section
 * copied byte for byte, a new tensor directory), safetensors out for
 * cparallel's own types (the GGUF metadata embedded in the header); each
 * weight matrix converted row by row (dequantize to fp32, quantize) through
 * the CPU backend. */
#define _POSIX_C_SOURCE 200809L
#include "cp_quantize.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cp_backend.h"
#include "cp_gguf.h"
#include "cp_prune.h"
#include "cp_safetensors.h"

static bool is_target(cp_dtype t) {
    switch (t) {
    case CP_DTYPE_F32:
    case CP_DTYPE_F16:
    case CP_DTYPE_BF16:
    case CP_DTYPE_Q8_0:
    case CP_DTYPE_Q4_0:
    case CP_DTYPE_Q4_1:
    case CP_DTYPE_Q4_K:
    case CP_DTYPE_Q6_K:
    case CP_DTYPE_I8_ROW:
    case CP_DTYPE_F8_ROW:
    case CP_DTYPE_I4_G32:
    case CP_DTYPE_I4_G128:
    case CP_DTYPE_S24_Q8: return true;
    default: return false;
    }
}

/* The type a matrix of `cols` columns gets for target t. */
static cp_dtype pick(cp_dtype t, int64_t cols) {
    if (cols % cp_dtype_block_size(t) == 0) return t;
    if (t == CP_DTYPE_I4_G128) return cols % 32 == 0 ? CP_DTYPE_I4_G32 : CP_DTYPE_I8_ROW;
    if (t == CP_DTYPE_I4_G32) return CP_DTYPE_I8_ROW;
    cp_dtype f = (t == CP_DTYPE_Q4_K || t == CP_DTYPE_Q4_0 || t == CP_DTYPE_Q4_1) ? CP_DTYPE_Q4_0
                                                                                   : CP_DTYPE_Q8_0;
    return cols % cp_dtype_block_size(f) == 0 ? f : CP_DTYPE_F16;
}

static cp_status put(FILE *f, const void *p, size_t n, const char *path) {
    if (n && fwrite(p, 1, n, f) != n)
        return CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return CP_OK;
}

static cp_status pad(FILE *f, size_t *off, size_t align, const char *path) {
    static const char zeros[256];
    size_t n = (align - *off % align) % align;
    *off += n;
    return put(f, zeros, n, path);
}

/* ---- safetensors output ---------------------------------------------------- */

static char *base64_encode(const void *data, size_t n) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = data;
    char *o = malloc((n + 2) / 3 * 4 + 1), *q = o;
    if (!o) return NULL;
    for (size_t i = 0; i < n; i += 3) {
        const uint32_t w = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                           (i + 2 < n ? (uint32_t)p[i + 2] : 0);
        *q++ = a[w >> 18 & 63];
        *q++ = a[w >> 12 & 63];
        *q++ = i + 1 < n ? a[w >> 6 & 63] : '=';
        *q++ = i + 2 < n ? a[w & 63] : '=';
    }
    *q = '\0';
    return o;
}

/* One tensor of the output: where it comes from and how it is written. */
typedef struct out_tensor {
    const cp_weight_info *w;      /* the source */
    const cp_tensor_edit *e;      /* its edit, or NULL */
    const char *name;
    int ndim;
    int64_t ne[CP_MAX_DIMS];      /* written shape */
    int64_t rows;                 /* written rows (product of ne[1..]) */
    cp_dtype to;
    const float *cscale, *rscale; /* AWQ: source element j times cscale[j], source row r times rscale[r] */
} out_tensor;

/* What converting rows needs: a CPU backend and fp32 rows. */
typedef struct convert_ctx {
    cp_backend_t host;
    float *row, *src;     /* written row, source row */
    void *scratch;        /* cp_prune_row's */
    const cp_model_edit *edit;
} convert_ctx;

static bool copied_as_is(const out_tensor *t) {
    return t->to == t->w->dtype && !t->cscale && !t->rscale &&
           (!t->e || (!t->e->rows && !t->e->cols && !t->e->prune));
}

/* Written row r of t into dst (cp_dtype_row_size(t->to, t->ne[0]) bytes). */
static cp_status convert_row(convert_ctx *c, const out_tensor *t, int64_t r, void *dst) {
    const cp_weight_info *w = t->w;
    const int64_t cols = w->ne[0], n = t->ne[0];
    const int64_t sr = t->e && t->e->rows ? t->e->rows[r] : r;
    cp_tensor one = cp_tensor_2d(w->dtype, 1, cols, (char *)w->data + (size_t)sr * cp_dtype_row_size(w->dtype, cols));
    CP_CHECK(cp_backend_dequantize(c->host, &one, 0, 1, c->src));
    for (int64_t j = 0; t->cscale && j < cols; j++) c->src[j] *= t->cscale[j];
    for (int64_t j = 0; t->rscale && j < cols; j++) c->src[j] *= t->rscale[sr];
    float *x = c->src;
    if (t->e && t->e->cols) {
        for (int64_t j = 0; j < n; j++) c->row[j] = c->src[t->e->cols[j]];
        x = c->row;
    }
    if (t->e && t->e->prune) cp_prune_row(x, n, t->e->col_norm, c->edit->sparsity, c->edit->n2m, c->scratch);
    return cp_backend_quantize(c->host, t->to, x, 1, n, dst);
}

typedef struct st_job {
    const out_tensor *t;
    convert_ctx *c;
    const cp_quantize_opts *o;
    size_t *done, total;
    cp_gguf_t g;
} st_job;

/* Converts one tensor into buf when the writer asks for it. */
static cp_status st_fill(void *user, void *buf, size_t nbytes) {
    st_job *j = user;
    const out_tensor *t = j->t;
    if (copied_as_is(t)) {
        memcpy(buf, t->w->data, nbytes);
    } else {
        const size_t out_row = nbytes / (size_t)t->rows;
        for (int64_t r = 0; r < t->rows; r++) CP_CHECK(convert_row(j->c, t, r, (char *)buf + (size_t)r * out_row));
    }
    cp_gguf_release(j->g, t->w->data, t->w->nbytes);
    *j->done += t->w->nbytes;
    if (j->o->progress) j->o->progress(j->o->progress_user, *j->done, j->total);
    return CP_OK;
}

static cp_st_dtype st_type_of(cp_dtype t) {
    return t == CP_DTYPE_F16 ? CP_ST_F16 : t == CP_DTYPE_BF16 ? CP_ST_BF16 : t == CP_DTYPE_F32 ? CP_ST_F32 : CP_ST_U8;
}

/* ---- AWQ ------------------------------------------------------------------- */

static int64_t tensor_index(cp_gguf_t g, const char *name) {
    for (int64_t i = 0; i < cp_gguf_n_tensors(g); i++)
        if (!strcmp(cp_gguf_tensor(g, i)->name, name)) return i;
    return -1;
}

/* Matrix i of g as fp32 [rows][cols], rows times rscale when given. */
static cp_status load_f32(cp_backend_t be, cp_gguf_t g, int64_t i, const float *rscale, float **out) {
    const cp_weight_info *w = cp_gguf_tensor(g, i);
    cp_tensor t = cp_tensor_2d(w->dtype, w->ne[1], w->ne[0], (void *)w->data);
    float *f = malloc((size_t)(w->ne[0] * w->ne[1]) * sizeof(float));
    if (!f) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st = cp_backend_dequantize(be, &t, 0, w->ne[1], f);
    if (st != CP_OK) {
        free(f);
        return st;
    }
    for (int64_t r = 0; rscale && r < w->ne[1]; r++)
        for (int64_t c = 0; c < w->ne[0]; c++) f[r * w->ne[0] + c] *= rscale[r];
    *out = f;
    return CP_OK;
}

#define AWQ_GRID 11 /* a = 0, 0.1, ..., 1 */

/* The scales s[cols] of n matrices W[k] (rows[k] x cols, fp32) that share
 * an input with per-channel sums sq (x^2) and ab (|x|) over `obs` rows. */
static cp_status awq_search(cp_backend_t be, cp_dtype target, int n, float *const *W, const int64_t *rows,
                            int64_t cols, const double *sq, const double *ab, int64_t obs, float *s) {
    int64_t maxr = 0;
    for (int k = 0; k < n; k++) maxr = rows[k] > maxr ? rows[k] : maxr;
    const cp_dtype t = pick(target, cols);
    float *ws = malloc((size_t)(maxr * cols) * sizeof(float)), *try_s = malloc((size_t)cols * sizeof(float));
    char *q = malloc(cp_dtype_row_size(t, cols) * (size_t)maxr);
    cp_status st = CP_OK;
    if (!ws || !try_s || !q) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory searching AWQ scales");
        goto done;
    }
    double best = INFINITY;
    for (int a = 0; a < AWQ_GRID; a++) {
        const double alpha = a / (double)(AWQ_GRID - 1);
        double mx = 0, mn = INFINITY;
        for (int64_t j = 0; j < cols; j++) {
            double v = pow(fmax(ab[j] / (double)obs, 1e-6), alpha);
            try_s[j] = (float)v;
            mx = fmax(mx, v);
            mn = fmin(mn, v);
        }
        const float norm = (float)(1.0 / sqrt(mx * mn)); /* centre the scales around 1 */
        for (int64_t j = 0; j < cols; j++) try_s[j] *= norm;
        double loss = 0;
        for (int k = 0; k < n && st == CP_OK; k++) {
            for (int64_t r = 0; r < rows[k]; r++)
                for (int64_t j = 0; j < cols; j++) ws[r * cols + j] = W[k][r * cols + j] * try_s[j];
            st = cp_backend_quantize(be, t, ws, rows[k], cols, q);
            cp_tensor qt = cp_tensor_2d(t, rows[k], cols, q);
            if (st == CP_OK) st = cp_backend_dequantize(be, &qt, 0, rows[k], ws);
            for (int64_t r = 0; st == CP_OK && r < rows[k]; r++)
                for (int64_t j = 0; j < cols; j++) {
                    const double d = (double)W[k][r * cols + j] - (double)ws[r * cols + j] / try_s[j];
                    loss += sq[j] * d * d;
                }
        }
        if (st != CP_OK) goto done;
        if (loss < best) {
            best = loss;
            memcpy(s, try_s, (size_t)cols * sizeof(float));
        }
    }
done:
    free(ws);
    free(try_s);
    free(q);
    return st;
}

static const char *const awq_suffix[8] = {"attn_q.weight",   "attn_k.weight", "attn_v.weight",
                                          "attn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                                          "ffn_down.weight", "ffn_norm.weight"};

/* The indices in g of layer l's tensors in awq_suffix's order. */
static cp_status awq_tensors(cp_gguf_t g, int l, int64_t ix[8]) {
    char name[96];
    for (int k = 0; k < 8; k++) {
        snprintf(name, sizeof(name), "blk.%d.%s", l, awq_suffix[k]);
        if ((ix[k] = tensor_index(g, name)) < 0) return CP_ERROR(CP_ERR_FORMAT, "AWQ: layer %d lacks %s", l, name);
    }
    return CP_OK;
}

/* Layer l's scales: sd[ffn] of down's input, sf[dim] of gate/up's, sa[dim]
 * of Q/K/V's. Down first, as its 1/s goes into up's rows. */
static cp_status awq_layer(cp_gguf_t g, cp_backend_t be, cp_dtype type, const cp_act_stats *a, int l, float *sd,
                           float *sf, float *sa) {
    int64_t ix[8];
    CP_CHECK(awq_tensors(g, l, ix));
    const int dim = a->width[CP_ACT_ATTN_IN], ffn = a->width[CP_ACT_FFN_ACT];
    const size_t ld = (size_t)l;
    float *W[3] = {NULL, NULL, NULL};
    int64_t rows[3];
    cp_status st = CP_OK;
    float *inv_d = malloc((size_t)ffn * sizeof(float));
    if (!inv_d) return CP_ERROR(CP_ERR_OOM, "out of memory");
    CP_CHECK_GOTO(load_f32(be, g, ix[6], NULL, &W[0]), st, done);
    rows[0] = cp_gguf_tensor(g, ix[6])->ne[1];
    CP_CHECK_GOTO(awq_search(be, type, 1, W, rows, ffn, a->sq[CP_ACT_FFN_ACT] + ld * (size_t)ffn,
                             a->abs[CP_ACT_FFN_ACT] + ld * (size_t)ffn, a->rows, sd),
                  st, done);
    for (int j = 0; j < ffn; j++) inv_d[j] = 1.0f / sd[j];
    free(W[0]);
    W[0] = NULL;
    /* gate and up (up's rows already divided by down's scales) */
    CP_CHECK_GOTO(load_f32(be, g, ix[4], NULL, &W[0]), st, done);
    CP_CHECK_GOTO(load_f32(be, g, ix[5], inv_d, &W[1]), st, done);
    rows[0] = rows[1] = ffn;
    CP_CHECK_GOTO(awq_search(be, type, 2, W, rows, dim, a->sq[CP_ACT_FFN_IN] + ld * (size_t)dim,
                             a->abs[CP_ACT_FFN_IN] + ld * (size_t)dim, a->rows, sf),
                  st, done);
    for (int k = 0; k < 2; k++) free(W[k]), W[k] = NULL;
    /* q, k, v */
    for (int k = 0; k < 3; k++) {
        CP_CHECK_GOTO(load_f32(be, g, ix[k], NULL, &W[k]), st, done);
        rows[k] = cp_gguf_tensor(g, ix[k])->ne[1];
    }
    st = awq_search(be, type, 3, W, rows, dim, a->sq[CP_ACT_ATTN_IN] + ld * (size_t)dim,
                    a->abs[CP_ACT_ATTN_IN] + ld * (size_t)dim, a->rows, sa);
done:
    for (int k = 0; k < 3; k++) free(W[k]);
    free(inv_d);
    return st;
}

static cp_status awq_scales_alloc(int n_layer, int dim, int ffn, cp_awq_scales **out) {
    cp_awq_scales *s = calloc(1, sizeof(*s));
    if (!s) return CP_ERROR(CP_ERR_OOM, "out of memory");
    s->n_layer = n_layer;
    s->dim = dim;
    s->ffn = ffn;
    s->attn = calloc((size_t)n_layer * (size_t)dim, sizeof(float));
    s->ffn_in = calloc((size_t)n_layer * (size_t)dim, sizeof(float));
    s->down = calloc((size_t)n_layer * (size_t)ffn, sizeof(float));
    if (!s->attn || !s->ffn_in || !s->down) {
        cp_awq_scales_free(s);
        return CP_ERROR(CP_ERR_OOM, "out of memory for AWQ scales");
    }
    *out = s;
    return CP_OK;
}

void cp_awq_scales_free(cp_awq_scales *s) {
    if (!s) return;
    free(s->attn);
    free(s->ffn_in);
    free(s->down);
    free(s);
}

/* Searches layers part, part + parts, ... into s; progress gets the layers
 * done and this part's count. */
static cp_status search_layers(cp_gguf_t g, cp_backend_t be, cp_dtype type, const cp_act_stats *a, int part,
                               int parts, void (*progress)(void *user, size_t done, size_t total), void *user,
                               cp_awq_scales *s) {
    size_t mine = 0, n_done = 0;
    for (int l = part; l < a->n_layer; l += parts) mine++;
    for (int l = part; l < a->n_layer; l += parts) {
        CP_CHECK(awq_layer(g, be, type, a, l, s->down + (size_t)l * s->ffn, s->ffn_in + (size_t)l * s->dim,
                           s->attn + (size_t)l * s->dim));
        if (progress) progress(user, ++n_done, mine);
    }
    return CP_OK;
}

/* cp_quantize_opts.progress after each layer's search: (0, 1). */
static void layer_searched(void *user, size_t done, size_t total) {
    (void)done;
    (void)total;
    const cp_quantize_opts *o = user;
    if (o->progress) o->progress(o->progress_user, 0, 1);
}

/* Every layer's scales (those of o->awq_scales, else searched here). */
static cp_status awq_all(cp_gguf_t g, cp_backend_t be, const cp_quantize_opts *o, cp_awq_scales **owned,
                         const cp_awq_scales **out) {
    const cp_act_stats *a = o->awq;
    const int dim = a->width[CP_ACT_ATTN_IN], ffn = a->width[CP_ACT_FFN_ACT];
    if (o->awq_scales) {
        const cp_awq_scales *s = o->awq_scales;
        if (s->n_layer != a->n_layer || s->dim != dim || s->ffn != ffn)
            return CP_ERROR(CP_ERR_INVALID_ARG, "AWQ scales for %d layers of %d/%d channels, statistics for %d of %d/%d",
                            s->n_layer, s->dim, s->ffn, a->n_layer, dim, ffn);
        *out = s;
        return CP_OK;
    }
    CP_CHECK(awq_scales_alloc(a->n_layer, dim, ffn, owned));
    CP_CHECK(search_layers(g, be, o->type, a, 0, 1, layer_searched, (void *)o, *owned));
    *out = *owned;
    return CP_OK;
}

static float *copy_floats(const float *x, int n, bool invert) {
    float *v = malloc((size_t)n * sizeof(float));
    if (v)
        for (int j = 0; j < n; j++) v[j] = invert ? 1.0f / x[j] : x[j];
    return v;
}

/* Per tensor i: cs[i] (column scales; for a norm vector its multiplier) and
 * rs[i] (row scales), malloc'd or NULL, for every layer of the model: the
 * same scales on the matrices sharing an input, 1/s folded into what feeds
 * it (the norms; up's rows for down). */
static cp_status awq_plan(cp_gguf_t g, cp_backend_t be, const cp_quantize_opts *o, float **cs, float **rs) {
    cp_awq_scales *owned = NULL;
    const cp_awq_scales *s = NULL;
    cp_status st = awq_all(g, be, o, &owned, &s);
    for (int l = 0; st == CP_OK && l < s->n_layer; l++) {
        int64_t ix[8];
        CP_CHECK_GOTO(awq_tensors(g, l, ix), st, done);
        const float *sa = s->attn + (size_t)l * s->dim, *sf = s->ffn_in + (size_t)l * s->dim,
                    *sd = s->down + (size_t)l * s->ffn;
        const struct {
            int64_t tensor;
            float **dst;
            const float *src;
            int n;
            bool invert;
        } put[9] = {
            {ix[6], cs, sd, s->ffn, false},   {ix[5], rs, sd, s->ffn, true},   /* down; 1/s on up's rows */
            {ix[4], cs, sf, s->dim, false},   {ix[5], cs, sf, s->dim, false},  /* gate, up */
            {ix[0], cs, sa, s->dim, false},   {ix[1], cs, sa, s->dim, false},  /* q, k */
            {ix[2], cs, sa, s->dim, false},                                    /* v */
            {ix[3], cs, sa, s->dim, true},    {ix[7], cs, sf, s->dim, true},   /* the norms */
        };
        for (int k = 0; k < 9; k++) {
            float *v = copy_floats(put[k].src, put[k].n, put[k].invert);
            if (!v) {
                st = CP_ERROR(CP_ERR_OOM, "out of memory");
                break;
            }
            put[k].dst[put[k].tensor] = v;
        }
    }
done:
    cp_awq_scales_free(owned);
    return st;
}

cp_status cp_awq_search(const char *in, cp_dtype type, const cp_act_stats *a, int part, int parts, int threads,
                        void (*progress)(void *user, size_t done, size_t total), void *user,
                        cp_awq_scales **out) {
    *out = NULL;
    if (type != CP_DTYPE_I4_G32 && type != CP_DTYPE_I4_G128)
        return CP_ERROR(CP_ERR_INVALID_ARG, "AWQ scales are for the 4-bit types, not %s", cp_dtype_name(type));
    if (parts < 1 || part < 0 || part >= parts)
        return CP_ERROR(CP_ERR_INVALID_ARG, "AWQ search part %d of %d", part, parts);
    cp_gguf_t g = NULL;
    cp_backend_t be = NULL;
    cp_awq_scales *s = NULL;
    cp_status st;
    CP_CHECK_GOTO(cp_gguf_open(in, &g), st, done);
    CP_CHECK_GOTO(cp_backend_cpu_init(threads, &be), st, done);
    CP_CHECK_GOTO(awq_scales_alloc(a->n_layer, a->width[CP_ACT_ATTN_IN], a->width[CP_ACT_FFN_ACT], &s), st, done);
    CP_CHECK_GOTO(search_layers(g, be, type, a, part, parts, progress, user, s), st, done);
    *out = s;
    s = NULL;
done:
    cp_awq_scales_free(s);
    cp_backend_free(be);
    cp_gguf_close(g);
    return st;
}

/* The output tensors of g under o (the edit applied, AWQ scales cs/rs
 * attached) into outs[*n_out], with the statistics. */
static cp_status plan_outputs(cp_gguf_t g, const cp_quantize_opts *o, bool own, float **cs, float **rs,
                              out_tensor *outs, int64_t *n_out, cp_quantize_stats *stats) {
    const int64_t nt = cp_gguf_n_tensors(g);
    const bool four = o->type == CP_DTYPE_I4_G32 || o->type == CP_DTYPE_I4_G128;
    *n_out = 0;
    for (int64_t i = 0; i < nt; i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        const cp_tensor_edit *e = o->edit ? &o->edit->tensors[i] : NULL;
        stats->bytes_in += w->nbytes;
        if (e && e->drop) {
            stats->n_dropped++;
            continue;
        }
        out_tensor *t = &outs[(*n_out)++];
        *t = (out_tensor){.w = w, .e = e, .name = e && e->name[0] ? e->name : w->name, .ndim = w->ndim,
                          .cscale = cs ? cs[i] : NULL, .rscale = rs ? rs[i] : NULL};
        memcpy(t->ne, w->ne, sizeof(t->ne));
        if (e && (e->rows || e->cols) && (w->ndim > 2 || (e->rows && w->ndim < 2)))
            return CP_ERROR(CP_ERR_INVALID_ARG, "cannot select rows or columns of '%s' (%d dimensions)", w->name,
                            w->ndim);
        if (e && e->cols) t->ne[0] = e->n_cols;
        if (e && e->rows) t->ne[1] = e->n_rows;
        t->rows = 1;
        for (int d = 1; d < t->ndim; d++) t->rows *= t->ne[d];
        cp_dtype to = w->dtype;
        /* 4-bit targets keep the output projection (the embedding when tied)
         * at 8 bits: every logit goes through it, as llama.cpp does with its
         * 6-bit output tensor */
        const bool head = !strcmp(w->name, "output.weight") ||
                          (!strcmp(w->name, "token_embd.weight") && !cp_gguf_find_tensor(g, "output.weight"));
        /* 2:4 sparsity is for the linear layers of the blocks: the
         * embedding and the output projection stay dense at 8 bits (I8_ROW) */
        const bool dense8 = o->type == CP_DTYPE_S24_Q8 && strncmp(w->name, "blk.", 4) != 0;
        if (own) {
            if (w->ndim >= 2) to = (head && four) || dense8 ? CP_DTYPE_I8_ROW : pick(o->type, t->ne[0]);
            else if (st_type_of(to) == CP_ST_U8) to = CP_DTYPE_F32; /* vectors stay plain numbers */
        } else if (w->ndim >= 2 && w->dtype != o->type && !o->keep_types) {
            to = pick(o->type, t->ne[0]);
        }
        /* a block type cannot hold a selection that is not whole blocks */
        if (to == w->dtype && t->ne[0] != w->ne[0] && t->ne[0] % cp_dtype_block_size(to) != 0)
            to = pick(CP_DTYPE_Q8_0, t->ne[0]);
        t->to = to;
        if (to == w->dtype && copied_as_is(t)) {
            stats->n_kept++;
        } else if (to == o->type || (o->keep_types && to == w->dtype)) {
            stats->n_quantized++;
        } else if (own && ((head && four) || dense8)) {
            stats->n_head_8bit++;
        } else if (w->ndim >= 2) {
            stats->n_fallback++;
            stats->fallback_type = to;
        } else {
            stats->n_kept++;
        }
        stats->bytes_out += cp_dtype_row_size(to, t->ne[0]) * (size_t)t->rows;
    }
    return CP_OK;
}

/* The conversion buffers for the widest row of g. */
static cp_status convert_init(cp_gguf_t g, const cp_quantize_opts *o, int threads, convert_ctx *c) {
    size_t max_cols = 1;
    for (int64_t i = 0; i < cp_gguf_n_tensors(g); i++)
        if ((size_t)cp_gguf_tensor(g, i)->ne[0] > max_cols) max_cols = (size_t)cp_gguf_tensor(g, i)->ne[0];
    memset(c, 0, sizeof(*c));
    c->edit = o->edit;
    c->row = malloc(max_cols * sizeof(float));
    c->src = malloc(max_cols * sizeof(float));
    c->scratch = malloc(max_cols * (sizeof(float) + sizeof(int)));
    if (!c->row || !c->src || !c->scratch) return CP_ERROR(CP_ERR_OOM, "out of memory");
    return cp_backend_cpu_init(threads, &c->host);
}

static void convert_free(convert_ctx *c) {
    cp_backend_free(c->host);
    free(c->row);
    free(c->src);
    free(c->scratch);
}

/* llama.cpp's general.file_type of a file quantized to t (its
 * llama_ftype: "mostly" t), or -1 when t has none. A K-quant target names
 * the small variant (Q4_K_S): rows that are not whole super-blocks fall
 * back to a 32-element type, as llama.cpp's own do. */
static int64_t llama_file_type(cp_dtype t) {
    switch (t) {
    case CP_DTYPE_F32: return 0;
    case CP_DTYPE_F16: return 1;
    case CP_DTYPE_Q4_0: return 2;
    case CP_DTYPE_Q4_1: return 3;
    case CP_DTYPE_Q8_0: return 7;
    case CP_DTYPE_Q5_0: return 8;
    case CP_DTYPE_Q5_1: return 9;
    case CP_DTYPE_Q4_K: return 14;
    case CP_DTYPE_Q5_K: return 16;
    case CP_DTYPE_Q6_K: return 18;
    case CP_DTYPE_BF16: return 32;
    default: return -1;
    }
}

/* The metadata to write: the source's, with the edit's integers set, and
 * general.file_type naming the target type when every matrix gets it. */
static cp_status metadata(cp_gguf_t g, const cp_quantize_opts *o, void **owned, const void **kv, size_t *len,
                          int64_t *n_kv) {
    *owned = NULL;
    cp_gguf_kv_u32 set[9];
    int n = 0;
    for (int i = 0; o->edit && i < o->edit->n_kv_set && i < 8; i++)
        set[n++] = o->edit->kv_set[i];
    const int64_t ft = o->keep_types ? -1 : llama_file_type(o->type);
    if (ft >= 0) set[n++] = (cp_gguf_kv_u32){"general.file_type", (uint32_t)ft};
    if (n) {
        CP_CHECK(cp_gguf_kv_bytes_with(g, set, n, owned, len, n_kv));
        *kv = *owned;
        return CP_OK;
    }
    *kv = cp_gguf_kv_bytes(g, len);
    *n_kv = cp_gguf_n_kv(g);
    return CP_OK;
}

/* Safetensors: packed matrices as U8 [rows][row bytes] with their type in
 * "cparallel.dtype.<name>", other tensors as F32/F16/BF16, the GGUF
 * metadata (configuration, tokenizer) base64-encoded in "cparallel.gguf". */
static cp_status quantize_st(cp_gguf_t g, const char *out, const cp_quantize_opts *o, cp_quantize_stats *stats) {
    const int64_t nt = cp_gguf_n_tensors(g);
    cp_st_writer_t wr = NULL;
    convert_ctx cv = {0};
    st_job *jobs = calloc((size_t)(nt ? nt : 1), sizeof(*jobs));
    out_tensor *outs = calloc((size_t)(nt ? nt : 1), sizeof(*outs));
    char *b64 = NULL;
    unsigned char *img = NULL;
    void *kv_owned = NULL;
    size_t done = 0, total = 0;
    int64_t n_out = 0;
    cp_status st = CP_OK;
    float **cs = NULL, **rs = NULL;
    if (!jobs || !outs) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto end;
    }
    CP_CHECK_GOTO(convert_init(g, o, o->awq ? 0 : 1, &cv), st, end);
    CP_CHECK_GOTO(cp_st_writer_init(&wr), st, end);
    if (o->awq) {
        cs = calloc((size_t)(nt ? nt : 1), sizeof(float *));
        rs = calloc((size_t)(nt ? nt : 1), sizeof(float *));
        if (!cs || !rs) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory");
            goto end;
        }
        CP_CHECK_GOTO(awq_plan(g, cv.host, o, cs, rs), st, end);
    }
    CP_CHECK_GOTO(plan_outputs(g, o, true, cs, rs, outs, &n_out, stats), st, end);
    for (int64_t i = 0; i < n_out; i++) total += outs[i].w->nbytes;
    char key[320];
    for (int64_t i = 0; i < n_out; i++) {
        const out_tensor *t = &outs[i];
        jobs[i] = (st_job){t, &cv, o, &done, total, g};
        const size_t rb = cp_dtype_row_size(t->to, t->ne[0]);
        if (st_type_of(t->to) == CP_ST_U8) {
            const int64_t shape[2] = {t->rows, (int64_t)rb};
            CP_CHECK_GOTO(cp_st_writer_add_fill(wr, t->name, CP_ST_U8, 2, shape, rb * (size_t)t->rows, st_fill,
                                                &jobs[i]),
                          st, end);
            snprintf(key, sizeof(key), "cparallel.dtype.%s", t->name);
            CP_CHECK_GOTO(cp_st_writer_set_meta(wr, key, cp_dtype_name(t->to)), st, end);
        } else {
            int64_t shape[CP_MAX_DIMS];
            for (int d = 0; d < t->ndim; d++) shape[d] = t->ne[t->ndim - 1 - d];
            CP_CHECK_GOTO(cp_st_writer_add_fill(wr, t->name, st_type_of(t->to), t->ndim, shape,
                                                rb * (size_t)t->rows, st_fill, &jobs[i]),
                          st, end);
        }
    }
    /* the metadata as a GGUF image without tensors */
    size_t kv_len = 0;
    int64_t n_kv = 0;
    const void *kv = NULL;
    CP_CHECK_GOTO(metadata(g, o, &kv_owned, &kv, &kv_len, &n_kv), st, end);
    const uint32_t mv[2] = {0x46554747u /* "GGUF" */, 3};
    const uint64_t counts[2] = {0, (uint64_t)n_kv};
    img = malloc(sizeof(mv) + sizeof(counts) + kv_len);
    if (!img) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto end;
    }
    memcpy(img, mv, sizeof(mv));
    memcpy(img + sizeof(mv), counts, sizeof(counts));
    memcpy(img + sizeof(mv) + sizeof(counts), kv, kv_len);
    b64 = base64_encode(img, sizeof(mv) + sizeof(counts) + kv_len);
    if (!b64) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto end;
    }
    CP_CHECK_GOTO(cp_st_writer_set_meta(wr, "format", "pt"), st, end);
    CP_CHECK_GOTO(cp_st_writer_set_meta(wr, "cparallel.format", "1"), st, end);
    CP_CHECK_GOTO(cp_st_writer_set_meta(wr, "cparallel.quantization", cp_dtype_name(o->type)), st, end);
    CP_CHECK_GOTO(cp_st_writer_set_meta(wr, "cparallel.gguf", b64), st, end);
    st = cp_st_writer_finish(wr, out);
end:
    for (int64_t i = 0; i < nt; i++) {
        if (cs) free(cs[i]);
        if (rs) free(rs[i]);
    }
    free(cs);
    free(rs);
    cp_st_writer_free(wr);
    convert_free(&cv);
    free(jobs);
    free(outs);
    free(b64);
    free(img);
    free(kv_owned);
    return st;
}

/* GGUF: the metadata section (edited or copied byte for byte), a new tensor
 * directory, the tensors converted row by row. */
static cp_status quantize_gguf(cp_gguf_t g, const char *out, const cp_quantize_opts *o, cp_quantize_stats *stats) {
    const int64_t nt = cp_gguf_n_tensors(g);
    const size_t align = cp_gguf_alignment(g);
    convert_ctx cv = {0};
    FILE *f = NULL;
    char *dst = NULL;
    void *kv_owned = NULL;
    int64_t n_out = 0;
    cp_status st;
    out_tensor *outs = calloc((size_t)(nt ? nt : 1), sizeof(*outs));
    if (!outs) return CP_ERROR(CP_ERR_OOM, "out of memory");
    CP_CHECK_GOTO(convert_init(g, o, 1, &cv), st, done);
    CP_CHECK_GOTO(plan_outputs(g, o, false, NULL, NULL, outs, &n_out, stats), st, done);
    size_t total = 0, max_row = 1;
    for (int64_t i = 0; i < n_out; i++) {
        total += outs[i].w->nbytes;
        const size_t rb = cp_dtype_row_size(outs[i].to, outs[i].ne[0]);
        if (rb > max_row) max_row = rb;
    }
    dst = malloc(max_row);
    if (!dst) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    size_t kv_len = 0;
    int64_t n_kv = 0;
    const void *kv = NULL;
    CP_CHECK_GOTO(metadata(g, o, &kv_owned, &kv, &kv_len, &n_kv), st, done);
    f = fopen(out, "wb");
    if (!f) {
        st = CP_ERROR(CP_ERR_IO, "cannot create '%s': %s", out, strerror(errno));
        goto done;
    }
    uint32_t magic_version[2] = {0x46554747u /* "GGUF" */, 3};
    uint64_t counts[2] = {(uint64_t)n_out, (uint64_t)n_kv};
    size_t off = sizeof(magic_version) + sizeof(counts) + kv_len;
    CP_CHECK_GOTO(put(f, magic_version, sizeof(magic_version), out), st, done);
    CP_CHECK_GOTO(put(f, counts, sizeof(counts), out), st, done);
    CP_CHECK_GOTO(put(f, kv, kv_len, out), st, done);
    /* the tensor directory with the new names, shapes, types and offsets */
    uint64_t data_off = 0;
    for (int64_t i = 0; i < n_out; i++) {
        const out_tensor *t = &outs[i];
        uint64_t len = strlen(t->name);
        uint32_t nd = (uint32_t)t->ndim, type = (uint32_t)t->to;
        CP_CHECK_GOTO(put(f, &len, 8, out), st, done);
        CP_CHECK_GOTO(put(f, t->name, len, out), st, done);
        CP_CHECK_GOTO(put(f, &nd, 4, out), st, done);
        for (int d = 0; d < t->ndim; d++) {
            uint64_t ne = (uint64_t)t->ne[d];
            CP_CHECK_GOTO(put(f, &ne, 8, out), st, done);
        }
        CP_CHECK_GOTO(put(f, &type, 4, out), st, done);
        CP_CHECK_GOTO(put(f, &data_off, 8, out), st, done);
        off += 8 + len + 4 + 8 * (size_t)t->ndim + 4 + 8;
        data_off += cp_dtype_row_size(t->to, t->ne[0]) * (uint64_t)t->rows;
        data_off = (data_off + align - 1) / align * align;
    }
    CP_CHECK_GOTO(pad(f, &off, align, out), st, done);
    /* the data */
    size_t done_bytes = 0;
    for (int64_t i = 0; i < n_out; i++) {
        const out_tensor *t = &outs[i];
        const size_t out_row = cp_dtype_row_size(t->to, t->ne[0]);
        if (copied_as_is(t)) {
            CP_CHECK_GOTO(put(f, t->w->data, t->w->nbytes, out), st, done);
        } else {
            for (int64_t r = 0; r < t->rows; r++) {
                CP_CHECK_GOTO(convert_row(&cv, t, r, dst), st, done);
                CP_CHECK_GOTO(put(f, dst, out_row, out), st, done);
            }
            cp_gguf_release(g, t->w->data, t->w->nbytes);
        }
        off += out_row * (size_t)t->rows;
        CP_CHECK_GOTO(pad(f, &off, align, out), st, done);
        done_bytes += t->w->nbytes;
        if (o->progress) o->progress(o->progress_user, done_bytes, total);
    }
    if (fflush(f) != 0 || ferror(f)) {
        st = CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", out, strerror(errno));
        goto done;
    }
    st = CP_OK;
done:
    if (f && fclose(f) != 0 && st == CP_OK)
        st = CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", out, strerror(errno));
    free(dst);
    free(outs);
    free(kv_owned);
    convert_free(&cv);
    return st;
}

cp_status cp_quantize_gguf(const char *in, const char *out, const cp_quantize_opts *o,
                           cp_quantize_stats *stats) {
    if (!in || !out || !o || !stats)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_quantize_gguf: NULL argument");
    memset(stats, 0, sizeof(*stats));
    if (!is_target(o->type))
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s cannot be a target type", cp_dtype_name(o->type));
    if (o->awq && o->type != CP_DTYPE_I4_G32 && o->type != CP_DTYPE_I4_G128)
        return CP_ERROR(CP_ERR_INVALID_ARG, "AWQ scales are for the 4-bit types, not %s", cp_dtype_name(o->type));
    if (o->awq && o->edit) return CP_ERROR(CP_ERR_INVALID_ARG, "AWQ scales and edits cannot be combined");
    cp_gguf_t g = NULL;
    CP_CHECK(cp_gguf_open(in, &g));
    cp_status st = (int)o->type >= CP_DTYPE_FIRST_OWN ? quantize_st(g, out, o, stats) : quantize_gguf(g, out, o, stats);
    cp_gguf_close(g);
    return st;
}
