/* awq.c - activation statistics of a model on calibration text (the input
 * of every linear layer, per channel), the input of activation-aware
 * quantization (AWQ) and pruning. */
#include "cp_quantize.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cp_comm.h"
#include "cp_model.h"
#include "cp_plan.h"

/* The statistics being collected, and the residual stream entering the
 * last block seen (to compare with what leaves it). Across ranks: where
 * this rank's columns of the sharded sites start, and whether it counts
 * the sites every rank of its TP group sees whole (only TP rank 0 does). */
typedef struct collector {
    cp_act_stats *s;
    float *prev;
    size_t prev_cap;
    int prev_layer, prev_rows;
    int col0[CP_ACT_SITES];
    bool whole;
    bool oom; /* a residual copy could not be kept: the statistics are incomplete */
} collector;

/* Block l's input against its output, row by row. */
static void observe_resid(collector *c, int layer, const float *x, int n, int width) {
    cp_act_stats *s = c->s;
    if (layer > 0 && c->prev_layer == layer - 1 && c->prev_rows == n) {
        for (int i = 0; i < n; i++) {
            const float *a = c->prev + (size_t)i * (size_t)width, *b = x + (size_t)i * (size_t)width;
            double ab = 0, aa = 0, bb = 0;
            for (int j = 0; j < width; j++) {
                ab += (double)a[j] * b[j];
                aa += (double)a[j] * a[j];
                bb += (double)b[j] * b[j];
            }
            s->block_cos[layer - 1] += aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : 1.0;
        }
    }
    c->prev_layer = -1;
    const size_t need = (size_t)n * (size_t)width;
    if (layer >= s->n_layer) return;
    if (need > c->prev_cap) {
        float *p = realloc(c->prev, need * sizeof(float));
        if (!p) {
            c->oom = true;
            return;
        }
        c->prev = p;
        c->prev_cap = need;
    }
    memcpy(c->prev, x, need * sizeof(float));
    c->prev_layer = layer;
    c->prev_rows = n;
}

static void observe(void *user, int layer, cp_act_site site, const float *x, int n, int width) {
    collector *c = user;
    cp_act_stats *s = c->s;
    if (site == CP_ACT_RESID) {
        if (c->whole && width == s->width[CP_ACT_ATTN_IN]) observe_resid(c, layer, x, n, width);
        return;
    }
    if ((int)site < 0 || site >= CP_ACT_SITES) return;
    const int col0 = c->col0[site];
    if (!c->whole && (site == CP_ACT_ATTN_IN || site == CP_ACT_FFN_IN)) return;
    if (layer < 0 || layer >= s->n_layer || col0 + width > s->width[site]) return;
    const size_t at = (size_t)layer * (size_t)s->width[site] + (size_t)col0;
    double *sq = s->sq[site] + at, *ab = s->abs[site] + at;
    for (int i = 0; i < n; i++) {
        const float *r = x + (size_t)i * (size_t)width;
        for (int j = 0; j < width; j++) {
            sq[j] += (double)r[j] * r[j];
            ab[j] += fabs((double)r[j]);
        }
    }
    if (layer == 0 && site == CP_ACT_ATTN_IN) s->rows += n;
}

/* Sums x[n] over the model's TP, context-parallel and pipeline groups: each
 * rank collected its own layers, rows and columns, zeros elsewhere. */
static cp_status sum_over_ranks(cp_model_groups g, double *x, size_t n) {
    struct cp_comm *groups[3] = {g.tp, g.cp, g.pp};
    for (int i = 0; i < 3; i++)
        if (groups[i]) CP_CHECK(cp_comm_allreduce(groups[i], x, x, n, CP_DTYPE_F64, CP_REDUCE_SUM, NULL));
    return CP_OK;
}

/* Sums every rank's part; *oom: some rank could not keep a residual copy
 * (every rank learns it, so all of them fail together). */
static cp_status merge_ranks(cp_model_groups g, cp_act_stats *s, bool *oom) {
    for (int k = 0; k < CP_ACT_SITES; k++) {
        const size_t n = (size_t)s->n_layer * (size_t)s->width[k];
        CP_CHECK(sum_over_ranks(g, s->sq[k], n));
        CP_CHECK(sum_over_ranks(g, s->abs[k], n));
    }
    CP_CHECK(sum_over_ranks(g, s->block_cos, (size_t)s->n_layer));
    double rows_oom[2] = {(double)s->rows, *oom ? 1.0 : 0.0}; /* exact: far below 2^53 */
    CP_CHECK(sum_over_ranks(g, rows_oom, 2));
    s->rows = (int64_t)rows_oom[0];
    *oom = rows_oom[1] > 0;
    return CP_OK;
}

void cp_act_stats_free(cp_act_stats *s) {
    if (!s) return;
    for (int k = 0; k < CP_ACT_SITES; k++) {
        free(s->sq[k]);
        free(s->abs[k]);
    }
    free(s->block_cos);
    free(s);
}

cp_status cp_act_stats_collect(cp_engine_t e, const int32_t *tokens, size_t n, int ctx, cp_act_stats **out) {
    *out = NULL;
    cp_model_t m = cp_engine_model(e);
    const cp_model_config *c = cp_model_get_config(m);
    if (n < 2) return CP_ERROR(CP_ERR_INVALID_ARG, "calibration needs at least 2 tokens, got %zu", n);
    if (ctx <= 0 || ctx > cp_engine_n_ctx(e)) ctx = cp_engine_n_ctx(e);
    const cp_plan *plan = cp_model_get_plan(m);
    cp_act_stats *s = calloc(1, sizeof(*s));
    collector col = {.s = s, .prev_layer = -1, .whole = plan->tp_rank == 0};
    col.col0[CP_ACT_ATTN_OUT] = plan->head_begin * c->head_dim;
    col.col0[CP_ACT_FFN_ACT] = plan->ffn_begin;
    cp_status st = CP_OK;
    if (!s) return CP_ERROR(CP_ERR_OOM, "out of memory");
    s->n_layer = c->n_layer;
    s->block_cos = calloc((size_t)c->n_layer, sizeof(double));
    if (!s->block_cos) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for activation statistics");
        goto fail;
    }
    s->width[CP_ACT_ATTN_IN] = s->width[CP_ACT_FFN_IN] = c->dim;
    s->width[CP_ACT_ATTN_OUT] = c->n_head * c->head_dim;
    s->width[CP_ACT_FFN_ACT] = c->ffn_dim;
    for (int k = 0; k < CP_ACT_SITES; k++) {
        s->sq[k] = calloc((size_t)c->n_layer * (size_t)s->width[k], sizeof(double));
        s->abs[k] = calloc((size_t)c->n_layer * (size_t)s->width[k], sizeof(double));
        if (!s->sq[k] || !s->abs[k]) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for activation statistics");
            goto fail;
        }
    }
    CP_CHECK_GOTO(cp_model_set_observer(m, observe, &col), st, fail);
    /* the activations only: no LM head */
    for (size_t b = 0; b < n && st == CP_OK; b += (size_t)ctx) {
        const int len = (int)(n - b < (size_t)ctx ? n - b : (size_t)ctx);
        st = cp_engine_logits(e, tokens + b, len, NULL);
    }
    cp_model_set_observer(m, NULL, NULL);
    free(col.prev);
    if (st == CP_OK) st = merge_ranks(cp_model_get_groups(m), s, &col.oom);
    if (st == CP_OK && col.oom) st = CP_ERROR(CP_ERR_OOM, "out of memory for the residual stream of a block");
    if (st != CP_OK) goto fail;
    *out = s;
    return CP_OK;
fail:
    cp_act_stats_free(s);
    return st;
}
