/* plan.c - dividing layers, heads, FFN columns and vocabulary rows among
 * pp x tp ranks (Megatron-style tensor parallelism inside a stage). */
#include "cp_plan.h"

#include <stdio.h>
#include <string.h>

bool cp_plan_split(int n, int parts, int i, int grain, int *begin, int *end) {
    if (parts <= 0 || i < 0 || i >= parts || grain <= 0 || n <= 0) return false;
    int units = (n + grain - 1) / grain; /* the last unit may be partial */
    if (units < parts) return false;
    int base = units / parts, extra = units % parts;
    /* the first `extra` parts take one unit more */
    int u0 = i * base + (i < extra ? i : extra);
    int u1 = u0 + base + (i < extra ? 1 : 0);
    *begin = u0 * grain;
    *end = u1 * grain < n ? u1 * grain : n;
    return *end > *begin;
}

static bool tp_heads_ok(const cp_plan_shape *s, int tp) {
    if (s->n_head % tp != 0) return false;
    if (!(s->n_head_kv % tp == 0 || tp % s->n_head_kv == 0)) return false;
    /* the row-parallel O projection is cut after each rank's heads */
    int block = s->attn_row_block > 0 ? s->attn_row_block : s->row_block;
    if (((s->n_head / tp) * s->head_dim) % block != 0) return false;
    return true;
}

static bool tp_ffn_ok(const cp_plan_shape *s, int tp) {
    int b, e;
    for (int i = 0; i < tp; i++)
        if (!cp_plan_split(s->ffn_dim, tp, i, s->row_block, &b, &e)) return false;
    return true;
}

int cp_plan_valid_tp(const cp_plan_shape *s, int *out, int cap) {
    int n = 0;
    for (int tp = 1; tp <= s->n_head; tp++)
        if (tp_heads_ok(s, tp) && tp_ffn_ok(s, tp) && tp <= s->n_vocab) {
            if (n < cap) out[n] = tp;
            n++;
        }
    return n;
}

static void list_valid_tp(const cp_plan_shape *s, char *buf, size_t cap) {
    int v[64];
    int n = cp_plan_valid_tp(s, v, 64);
    size_t off = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && i < 64 && off + 12 < cap; i++)
        off += (size_t)snprintf(buf + off, cap - off, "%s%d", i ? ", " : "", v[i]);
}

cp_plan_colors cp_plan_group_colors(int rank, int tp, int cp) {
    const int tc = tp * cp;
    return (cp_plan_colors){rank / tp, rank % tc, rank / tc * tp + rank % tp};
}

cp_status cp_plan_init(const cp_plan_shape *s, const cp_plan_opts *o, int rank, cp_plan *p) {
    memset(p, 0, sizeof(*p));
    if (!s || !o) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_plan_init: NULL argument");
    if (s->n_layer <= 0 || s->n_head <= 0 || s->n_head_kv <= 0 || s->head_dim <= 0 || s->ffn_dim <= 0 ||
        s->n_vocab <= 0 || s->row_block <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_plan_init: invalid model shape");
    if (o->tp < 1 || o->pp < 1)
        return CP_ERROR(CP_ERR_INVALID_ARG, "tensor- and pipeline-parallel sizes must be >= 1 (tp=%d, pp=%d)",
                        o->tp, o->pp);
    const int cp = o->cp > 0 ? o->cp : 1;
    if (o->cp < 0 || cp > 1024) return CP_ERROR(CP_ERR_INVALID_ARG, "context-parallel size %d outside 1..1024", o->cp);
    int world = o->tp * o->pp * cp;
    if (rank < 0 || rank >= world)
        return CP_ERROR(CP_ERR_INVALID_ARG, "rank %d outside a world of tp=%d x cp=%d x pp=%d = %d", rank, o->tp,
                        cp, o->pp, world);
    char valid[256];
    if (!tp_heads_ok(s, o->tp) || !tp_ffn_ok(s, o->tp)) {
        list_valid_tp(s, valid, sizeof(valid));
        if (s->n_head % o->tp != 0 || !(s->n_head_kv % o->tp == 0 || o->tp % s->n_head_kv == 0))
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "tp=%d does not fit %d query heads and %d key/value heads (tp must divide the "
                            "query heads and divide or be a multiple of the key/value heads); valid tp: %s",
                            o->tp, s->n_head, s->n_head_kv, valid);
        const int blocks = s->row_block > 0 ? (s->ffn_dim + s->row_block - 1) / s->row_block : s->ffn_dim;
        if (blocks < o->tp)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "tp=%d ranks but the FFN (%d) has only %d quantization blocks of %d elements to "
                            "share out; valid tp: %s",
                            o->tp, s->ffn_dim, blocks, s->row_block, valid);
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "tp=%d would cut a quantization block of %d elements in the FFN (%d) or attention "
                        "output rows; valid tp: %s",
                        o->tp, s->row_block, s->ffn_dim, valid);
    }
    if (o->pp > s->n_layer)
        return CP_ERROR(CP_ERR_INVALID_ARG, "pp=%d stages but the model has only %d layers", o->pp, s->n_layer);
    p->world = world;
    p->rank = rank;
    p->tp = o->tp;
    p->pp = o->pp;
    p->cp = cp;
    p->pp_rank = rank / (o->tp * cp);
    p->cp_rank = (rank / o->tp) % cp;
    p->tp_rank = rank % o->tp;
    p->first_stage = p->pp_rank == 0;
    p->last_stage = p->pp_rank == o->pp - 1;

    /* layers: an even split, then move `discount` layers from each edge
     * stage to the middle ones when there are middle stages */
    int counts[1024];
    if (o->pp > 1024) return CP_ERROR(CP_ERR_INVALID_ARG, "pp=%d is more than 1024 stages", o->pp);
    for (int i = 0; i < o->pp; i++) {
        int b, e;
        cp_plan_split(s->n_layer, o->pp, i, 1, &b, &e);
        counts[i] = e - b;
    }
    int d = o->edge_layer_discount;
    if (d < 0) return CP_ERROR(CP_ERR_INVALID_ARG, "edge layer discount (--pp-edge-layers) must be >= 0");
    if (d > 0 && o->pp > 2) {
        if (counts[0] - d < 1 || counts[o->pp - 1] - d < 1)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "--pp-edge-layers %d leaves the first or last stage without layers (they have %d "
                            "and %d of %d)",
                            d, counts[0], counts[o->pp - 1], s->n_layer);
        counts[0] -= d;
        counts[o->pp - 1] -= d;
        for (int k = 0; k < 2 * d; k++) counts[1 + k % (o->pp - 2)]++;
    }
    for (int i = 0; i < p->pp_rank; i++) p->layer_begin += counts[i];
    p->layer_end = p->layer_begin + counts[p->pp_rank];

    int hpr = s->n_head / o->tp;
    p->head_begin = p->tp_rank * hpr;
    p->head_end = p->head_begin + hpr;
    if (o->tp <= s->n_head_kv) {
        int kpr = s->n_head_kv / o->tp;
        p->kv_head_begin = p->tp_rank * kpr;
        p->kv_head_end = p->kv_head_begin + kpr;
        p->kv_replicas = 1;
    } else {
        /* each KV head serves n_head/n_head_kv query heads; a rank's query
         * heads all map to one KV head, which tp/n_head_kv ranks replicate */
        int group = s->n_head / s->n_head_kv;
        p->kv_head_begin = p->head_begin / group;
        p->kv_head_end = p->kv_head_begin + 1;
        p->kv_replicas = o->tp / s->n_head_kv;
    }
    cp_plan_split(s->ffn_dim, o->tp, p->tp_rank, s->row_block, &p->ffn_begin, &p->ffn_end);
    if (!cp_plan_split(s->n_vocab, o->tp, p->tp_rank, 1, &p->vocab_begin, &p->vocab_end))
        return CP_ERROR(CP_ERR_INVALID_ARG, "tp=%d exceeds the vocabulary of %d", o->tp, s->n_vocab);
    return CP_OK;
}
