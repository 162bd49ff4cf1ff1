/* prune.c - what pruning removes: the weights zeroed in each row
 * (cp_prune_row) and the plan of a whole model (cp_prune_plan): layers
 * dropped and renumbered, attention heads and MLP channels removed, the
 * matrices whose rows are pruned, the metadata changed. */
#define _POSIX_C_SOURCE 200809L
#include "cp_prune.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cp_backend.h"

typedef struct scored {
    float s;
    int32_t i;
} scored;

static int by_score(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s < y->s ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

void cp_prune_row(float *x, int64_t n, const float *col_norm, double sparsity, bool n2m, void *scratch) {
    scored *sc = scratch;
    if (n2m) {
        for (int64_t g = 0; g + 4 <= n; g += 4) {
            scored q[4];
            for (int k = 0; k < 4; k++)
                q[k] = (scored){fabsf(x[g + k]) * (col_norm ? col_norm[g + k] : 1.0f), k};
            qsort(q, 4, sizeof(q[0]), by_score);
            x[g + q[0].i] = 0.0f;
            x[g + q[1].i] = 0.0f;
        }
        return;
    }
    const int64_t k = (int64_t)floor(sparsity * (double)n);
    if (k <= 0) return;
    for (int64_t j = 0; j < n; j++) sc[j] = (scored){fabsf(x[j]) * (col_norm ? col_norm[j] : 1.0f), (int32_t)j};
    qsort(sc, (size_t)n, sizeof(sc[0]), by_score);
    for (int64_t j = 0; j < k && j < n; j++) x[sc[j].i] = 0.0f;
}

void cp_model_edit_free(cp_model_edit *e) {
    if (!e) return;
    for (int64_t i = 0; e->tensors && i < e->n_tensors; i++) {
        free(e->tensors[i].rows);
        free(e->tensors[i].cols);
        free(e->tensors[i].col_norm);
    }
    free(e->tensors);
    free(e);
}

/* "blk.<L>.<rest>": L and rest, or -1. */
static int block_of(const char *name, const char **rest) {
    if (strncmp(name, "blk.", 4) != 0) return -1;
    char *end;
    long l = strtol(name + 4, &end, 10);
    if (end == name + 4 || *end != '.' || l < 0 || l > 1 << 20) return -1;
    *rest = end + 1;
    return (int)l;
}

/* Sums of squares of the columns of 2-D tensor w (fp32 accumulation per row). */
static cp_status column_energy(cp_backend_t be, const cp_weight_info *w, double *out) {
    const int64_t cols = w->ne[0], rows = w->ne[1];
    float *row = malloc((size_t)cols * sizeof(float));
    if (!row) return CP_ERROR(CP_ERR_OOM, "out of memory");
    memset(out, 0, (size_t)cols * sizeof(double));
    const size_t rb = cp_dtype_row_size(w->dtype, cols);
    for (int64_t r = 0; r < rows; r++) {
        cp_tensor one = cp_tensor_2d(w->dtype, 1, cols, (char *)w->data + (size_t)r * rb);
        cp_status st = cp_backend_dequantize(be, &one, 0, 1, row);
        if (st != CP_OK) {
            free(row);
            return st;
        }
        for (int64_t c = 0; c < cols; c++) out[c] += (double)row[c] * row[c];
    }
    free(row);
    return CP_OK;
}

static int by_value_desc(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

static int by_int(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The indices of the k highest of score[n], ascending, into keep[k]. */
static cp_status top_k(const double *score, int n, int k, int32_t *keep) {
    scored *s = malloc((size_t)n * sizeof(*s));
    if (!s) return CP_ERROR(CP_ERR_OOM, "out of memory");
    for (int i = 0; i < n; i++) s[i] = (scored){(float)score[i], i};
    qsort(s, (size_t)n, sizeof(*s), by_value_desc);
    for (int i = 0; i < k; i++) keep[i] = s[i].i;
    qsort(keep, (size_t)k, sizeof(*keep), by_int);
    free(s);
    return CP_OK;
}

/* The structural part for one layer: kept heads and channels. */
typedef struct layer_keep {
    int32_t *q_rows;  /* [n_head_new * head_dim]: rows of Q (columns of O) kept */
    int32_t *ffn;     /* [ffn_new]: MLP channels kept */
} layer_keep;

static cp_status plan_layer(cp_gguf_t g, cp_backend_t be, const cp_model_config *c, const cp_prune_opts *o, int l,
                            layer_keep *k) {
    const cp_act_stats *a = o->stats;
    char name[96];
    cp_status st = CP_OK;
    double *energy = NULL, *score = NULL;
    if (o->n_head && o->n_head < c->n_head) {
        const int hd = c->head_dim, qw = c->n_head * hd, group = c->n_head / c->n_head_kv;
        const int keep_per = o->n_head / c->n_head_kv;
        snprintf(name, sizeof(name), "blk.%d.attn_output.weight", l);
        const cp_weight_info *w = cp_gguf_find_tensor(g, name);
        if (!w || w->ne[0] != qw) return CP_ERROR(CP_ERR_FORMAT, "cannot prune heads: '%s' is missing or not %d wide", name, qw);
        energy = malloc((size_t)qw * sizeof(double));
        score = malloc((size_t)c->n_head * sizeof(double));
        k->q_rows = malloc((size_t)o->n_head * (size_t)hd * sizeof(int32_t));
        int32_t *kept = malloc((size_t)keep_per * sizeof(int32_t));
        if (!energy || !score || !k->q_rows || !kept) {
            free(kept);
            st = CP_ERROR(CP_ERR_OOM, "out of memory");
            goto done;
        }
        st = column_energy(be, w, energy);
        const double *sq = a->sq[CP_ACT_ATTN_OUT] + (size_t)l * (size_t)qw;
        for (int h = 0; h < c->n_head && st == CP_OK; h++) {
            score[h] = 0;
            for (int j = h * hd; j < (h + 1) * hd; j++) score[h] += sq[j] * energy[j];
        }
        /* query head h reads KV head h / group: keep the same number in each group */
        int n = 0;
        for (int kv = 0; kv < c->n_head_kv && st == CP_OK; kv++) {
            st = top_k(score + (size_t)kv * (size_t)group, group, keep_per, kept);
            for (int i = 0; i < keep_per && st == CP_OK; i++) {
                const int h = kv * group + kept[i];
                for (int j = 0; j < hd; j++) k->q_rows[n++] = h * hd + j;
            }
        }
        free(kept);
        free(energy);
        free(score);
        energy = score = NULL;
        if (st != CP_OK) goto done;
    }
    if (o->ffn_dim && o->ffn_dim < c->ffn_dim) {
        const int f = c->ffn_dim;
        snprintf(name, sizeof(name), "blk.%d.ffn_down.weight", l);
        const cp_weight_info *w = cp_gguf_find_tensor(g, name);
        if (!w || w->ne[0] != f) return CP_ERROR(CP_ERR_FORMAT, "cannot prune the MLP: '%s' is missing or not %d wide", name, f);
        energy = malloc((size_t)f * sizeof(double));
        k->ffn = malloc((size_t)o->ffn_dim * sizeof(int32_t));
        if (!energy || !k->ffn) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory");
            goto done;
        }
        CP_CHECK_GOTO(column_energy(be, w, energy), st, done);
        const double *sq = a->sq[CP_ACT_FFN_ACT] + (size_t)l * (size_t)f;
        for (int j = 0; j < f; j++) energy[j] = sqrt(sq[j] * energy[j]);
        st = top_k(energy, f, o->ffn_dim, k->ffn);
    }
done:
    free(energy);
    free(score);
    return st;
}

static cp_status copy_indices(const int32_t *src, int64_t n, int32_t **dst) {
    *dst = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!*dst) return CP_ERROR(CP_ERR_OOM, "out of memory");
    memcpy(*dst, src, (size_t)n * sizeof(int32_t));
    return CP_OK;
}

cp_status cp_prune_plan(cp_gguf_t g, const cp_prune_opts *o, cp_model_edit **out, cp_prune_report *rep) {
    *out = NULL;
    memset(rep, 0, sizeof(*rep));
    cp_model_config c;
    CP_CHECK(cp_gguf_model_config(g, &c));
    const cp_act_stats *a = o->stats;
    const bool structured = o->drop_layers || (o->n_head && o->n_head != c.n_head) ||
                            (o->ffn_dim && o->ffn_dim != c.ffn_dim);
    if (o->sparsity < 0 || o->sparsity >= 1)
        return CP_ERROR(CP_ERR_INVALID_ARG, "--sparsity %g is not in [0, 1)", o->sparsity);
    if (c.n_layer > (int)(sizeof(rep->dropped) / sizeof(rep->dropped[0])))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "pruning supports at most %d layers, the model has %d",
                        (int)(sizeof(rep->dropped) / sizeof(rep->dropped[0])), c.n_layer);
    if (o->drop_layers < 0 || o->drop_layers >= c.n_layer)
        return CP_ERROR(CP_ERR_INVALID_ARG, "--drop-layers %d: the model has %d layers (at least one must stay)",
                        o->drop_layers, c.n_layer);
    if (o->n_head && (o->n_head < 0 || o->n_head > c.n_head || o->n_head % c.n_head_kv != 0))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "--heads %d: must be at most the model's %d query heads and a multiple of its %d KV heads",
                        o->n_head, c.n_head, c.n_head_kv);
    if (o->ffn_dim && (o->ffn_dim < 0 || o->ffn_dim > c.ffn_dim))
        return CP_ERROR(CP_ERR_INVALID_ARG, "--ffn %d: must be between 1 and the model's %d", o->ffn_dim, c.ffn_dim);
    if (o->n2m && o->ffn_dim && o->ffn_dim % 4 != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "--ffn %d with 2:4 sparsity: must be a multiple of 4", o->ffn_dim);
    if ((o->method == CP_PRUNE_WANDA && (o->sparsity > 0 || o->n2m)) || structured) {
        if (!a) return CP_ERROR(CP_ERR_INVALID_ARG, "wanda and structured pruning need activation statistics");
        if (a->n_layer != c.n_layer || a->width[CP_ACT_ATTN_IN] != c.dim ||
            a->width[CP_ACT_ATTN_OUT] != c.n_head * c.head_dim || a->width[CP_ACT_FFN_ACT] != c.ffn_dim ||
            a->rows <= 0)
            return CP_ERROR(CP_ERR_INVALID_ARG, "the activation statistics are not of this model");
    }
    rep->n_layer = c.n_layer;
    const int64_t nt = cp_gguf_n_tensors(g);
    cp_model_edit *e = calloc(1, sizeof(*e));
    layer_keep *keep = calloc((size_t)c.n_layer, sizeof(*keep));
    int *new_index = malloc((size_t)c.n_layer * sizeof(int));
    cp_backend_t be = NULL;
    cp_status st = CP_OK;
    if (!e || !keep || !new_index) {
        free(e);
        e = NULL;
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    e->tensors = calloc((size_t)(nt ? nt : 1), sizeof(cp_tensor_edit));
    e->n_tensors = nt;
    e->sparsity = o->n2m ? 0 : o->sparsity;
    e->n2m = o->n2m;
    if (!e->tensors) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    CP_CHECK_GOTO(cp_backend_cpu_init(1, &be), st, done);
    /* layers: the least important ones go */
    for (int l = 0; l < c.n_layer; l++) {
        rep->importance[l] = a && a->rows > 0 ? 1.0 - a->block_cos[l] / (double)a->rows : NAN;
        new_index[l] = l;
    }
    if (o->drop_layers) {
        double *neg = malloc((size_t)c.n_layer * sizeof(double));
        if (!neg) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory");
            goto done;
        }
        for (int l = 0; l < c.n_layer; l++) neg[l] = -rep->importance[l];
        int32_t dropped[1024];
        st = top_k(neg, c.n_layer, o->drop_layers, dropped);
        free(neg);
        if (st != CP_OK) goto done;
        rep->n_dropped = o->drop_layers;
        for (int i = 0; i < o->drop_layers; i++) {
            rep->dropped[i] = dropped[i];
            new_index[dropped[i]] = -1;
        }
        for (int l = 0, n = 0; l < c.n_layer; l++)
            if (new_index[l] >= 0) new_index[l] = n++;
    }
    for (int l = 0; l < c.n_layer; l++)
        if (new_index[l] >= 0) CP_CHECK_GOTO(plan_layer(g, be, &c, o, l, &keep[l]), st, done);
    const bool heads = o->n_head && o->n_head < c.n_head, ffn = o->ffn_dim && o->ffn_dim < c.ffn_dim;
    for (int64_t i = 0; i < nt; i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        cp_tensor_edit *t = &e->tensors[i];
        const char *rest = NULL;
        const int l = block_of(w->name, &rest);
        if (l < 0) continue;
        if (l >= c.n_layer) {
            st = CP_ERROR(CP_ERR_FORMAT, "tensor '%s' names a layer the model does not have (%d layers)", w->name,
                          c.n_layer);
            goto done;
        }
        if (new_index[l] < 0) {
            t->drop = true;
            continue;
        }
        if (new_index[l] != l) snprintf(t->name, sizeof(t->name), "blk.%d.%s", new_index[l], rest);
        const int64_t qn = heads ? (int64_t)o->n_head * c.head_dim : 0;
        if (heads && (!strcmp(rest, "attn_q.weight") || !strcmp(rest, "attn_q.bias"))) {
            int32_t **sel = w->ndim >= 2 ? &t->rows : &t->cols;
            CP_CHECK_GOTO(copy_indices(keep[l].q_rows, qn, sel), st, done);
            *(w->ndim >= 2 ? &t->n_rows : &t->n_cols) = qn;
        } else if (heads && !strcmp(rest, "attn_output.weight")) {
            CP_CHECK_GOTO(copy_indices(keep[l].q_rows, qn, &t->cols), st, done);
            t->n_cols = qn;
        } else if (ffn && (!strcmp(rest, "ffn_gate.weight") || !strcmp(rest, "ffn_up.weight"))) {
            CP_CHECK_GOTO(copy_indices(keep[l].ffn, o->ffn_dim, &t->rows), st, done);
            t->n_rows = o->ffn_dim;
        } else if (ffn && !strcmp(rest, "ffn_down.weight")) {
            CP_CHECK_GOTO(copy_indices(keep[l].ffn, o->ffn_dim, &t->cols), st, done);
            t->n_cols = o->ffn_dim;
        }
        /* the weights of the linear layers */
        static const struct {
            const char *name;
            cp_act_site site;
        } lin[7] = {{"attn_q.weight", CP_ACT_ATTN_IN},   {"attn_k.weight", CP_ACT_ATTN_IN},
                    {"attn_v.weight", CP_ACT_ATTN_IN},   {"attn_output.weight", CP_ACT_ATTN_OUT},
                    {"ffn_gate.weight", CP_ACT_FFN_IN}, {"ffn_up.weight", CP_ACT_FFN_IN},
                    {"ffn_down.weight", CP_ACT_FFN_ACT}};
        if (!(o->sparsity > 0 || o->n2m) || w->ndim != 2) continue;
        int k = 0;
        while (k < 7 && strcmp(rest, lin[k].name)) k++;
        if (k == 7) continue;
        const int64_t n = t->cols ? t->n_cols : w->ne[0];
        if (o->n2m && n % 4 != 0) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "2:4 sparsity: '%s' has %lld columns, not a multiple of 4", w->name,
                          (long long)n);
            goto done;
        }
        t->prune = true;
        rep->n_pruned++;
        if (o->method != CP_PRUNE_WANDA) continue;
        const int width = a->width[lin[k].site];
        if (w->ne[0] != width) {
            st = CP_ERROR(CP_ERR_FORMAT, "'%s' has %lld columns, its input %d", w->name, (long long)w->ne[0], width);
            goto done;
        }
        t->col_norm = malloc((size_t)n * sizeof(float));
        if (!t->col_norm) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory");
            goto done;
        }
        const double *sq = a->sq[lin[k].site] + (size_t)l * (size_t)width;
        for (int64_t j = 0; j < n; j++) t->col_norm[j] = (float)sqrt(sq[t->cols ? t->cols[j] : j]);
    }
    /* the metadata of the smaller model */
    char arch[64];
    if (!cp_gguf_get_str_buf(g, "general.architecture", arch, sizeof(arch))) {
        st = CP_ERROR(CP_ERR_FORMAT, "the model lacks general.architecture");
        goto done;
    }
    char (*keys)[128] = e->kv_keys;
    if (o->drop_layers) {
        snprintf(keys[0], sizeof(e->kv_keys[0]), "%s.block_count", arch);
        e->kv_set[e->n_kv_set++] = (cp_gguf_kv_u32){keys[0], (uint32_t)(c.n_layer - o->drop_layers)};
    }
    if (ffn) {
        snprintf(keys[1], sizeof(e->kv_keys[1]), "%s.feed_forward_length", arch);
        e->kv_set[e->n_kv_set++] = (cp_gguf_kv_u32){keys[1], (uint32_t)o->ffn_dim};
    }
    if (heads) {
        /* the head size no longer follows from dim / heads: say it */
        snprintf(keys[2], sizeof(e->kv_keys[2]), "%s.attention.head_count", arch);
        snprintf(keys[3], sizeof(e->kv_keys[3]), "%s.attention.key_length", arch);
        snprintf(keys[4], sizeof(e->kv_keys[4]), "%s.attention.value_length", arch);
        e->kv_set[e->n_kv_set++] = (cp_gguf_kv_u32){keys[2], (uint32_t)o->n_head};
        e->kv_set[e->n_kv_set++] = (cp_gguf_kv_u32){keys[3], (uint32_t)c.head_dim};
        e->kv_set[e->n_kv_set++] = (cp_gguf_kv_u32){keys[4], (uint32_t)c.head_dim};
    }
done:
    for (int l = 0; keep && l < c.n_layer; l++) {
        free(keep[l].q_rows);
        free(keep[l].ffn);
    }
    free(keep);
    free(new_index);
    cp_backend_free(be);
    if (st != CP_OK) {
        cp_model_edit_free(e);
        return st;
    }
    *out = e;
    return CP_OK;
}
