/* forward.c - the forward pass of a Llama-family decoder over a batch of
 * tokens from any number of sequences (prefill and decode alike), reading
 * and writing the paged KV cache. Every operation goes through the backend
 * interface, so the same code drives the CPU and the GPU. */
#include "model_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


static cp_status check_batch(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b) {
    const cp_model_config *c = &m->cfg;
    if (b->n_tok < 0 || b->n_logits < 0 || b->n_logits > b->n_tok)
        return CP_ERROR(CP_ERR_INVALID_ARG, "batch: %d tokens, %d logit rows", b->n_tok, b->n_logits);
    if (b->n_tok == 0) return CP_OK;
    if (!b->tokens || !b->pos || !b->seq || !b->block_tables || b->n_seq <= 0 || b->max_blocks <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "batch: missing token, position or block tables");
    int64_t max_pos = (int64_t)b->max_blocks * kv->block_size;
    for (int t = 0; t < b->n_tok; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= c->n_vocab)
            return CP_ERROR(CP_ERR_INVALID_ARG, "token id %d at batch row %d is outside the vocabulary (0..%d)",
                            b->tokens[t], t, c->n_vocab - 1);
        if (b->seq[t] < 0 || b->seq[t] >= b->n_seq)
            return CP_ERROR(CP_ERR_INVALID_ARG, "batch row %d names sequence %d of %d", t, b->seq[t], b->n_seq);
        if (b->pos[t] < 0 || b->pos[t] >= max_pos)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "position %d at batch row %d is outside the sequence's %lld cache slots",
                            b->pos[t], t, (long long)max_pos);
        const int32_t *row = b->block_tables + (size_t)b->seq[t] * b->max_blocks;
        for (int j = 0; j <= b->pos[t] / kv->block_size; j++)
            if (row[j] < 0 || row[j] >= kv->n_blocks)
                return CP_ERROR(CP_ERR_INVALID_ARG, "sequence %d has block id %d at index %d (cache has %d)",
                                b->seq[t], row[j], j, kv->n_blocks);
    }
    for (int i = 0; i < b->n_logits; i++)
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n_tok ||
            (i > 0 && b->logit_rows[i] <= b->logit_rows[i - 1]))
            return CP_ERROR(CP_ERR_INVALID_ARG, "logit rows must be ascending batch rows");
    return CP_OK;
}

/* Device copy of the block tables; grows only when a larger table arrives. */
static cp_status upload_tables(cp_model_t m, const cp_batch *b, const int32_t **out) {
    if (cp_backend_device(m->be) == CP_DEVICE_CPU) {
        *out = b->block_tables;
        return CP_OK;
    }
    size_t bytes = (size_t)b->n_seq * (size_t)b->max_blocks * sizeof(int32_t);
    if (bytes > m->tables_bytes) {
        cp_backend_dealloc(m->be, m->tables);
        m->tables = NULL;
        m->tables_bytes = 0;
        CP_CHECK(cp_backend_alloc(m->be, bytes, &m->tables));
        m->tables_bytes = bytes;
    }
    CP_CHECK(cp_backend_copy(m->be, m->tables, b->block_tables, bytes, CP_COPY_HOST_TO_DEVICE));
    *out = m->tables;
    return CP_OK;
}

/* One chunk: batch rows [t0, t0+T). Logits of the requested rows inside the
 * chunk go to logits (host), rows counted from *logit_idx on. */
static cp_status forward_chunk(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b,
                               const int32_t *tables, int t0, int T, int *logit_idx, float *logits) {
    const cp_model_config *c = &m->cfg;
    cp_backend_t be = m->be;
    cp_scratch *s = &m->s;
    bool host = cp_backend_device(be) == CP_DEVICE_CPU;

    const int32_t *tok = b->tokens + t0, *pos = b->pos + t0, *seq = b->seq + t0;
    if (!host) {
        CP_CHECK(cp_backend_copy(be, s->tokens, tok, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
        CP_CHECK(cp_backend_copy(be, s->pos, pos, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
        CP_CHECK(cp_backend_copy(be, s->seq, seq, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
        tok = s->tokens;
        pos = s->pos;
        seq = s->seq;
    }

    cp_rope_params rp = {
        .mode = c->rope_mode,
        .head_dim = c->head_dim,
        .rot_dim = c->rot_dim,
        .theta = c->rope_theta,
        .freq_scale = c->rope_freq_scale,
        .freq_factors = m->w.rope_freqs,
    };
    cp_attn_params ap = {
        .n_tok = T,
        .n_head = c->n_head,
        .n_head_kv = c->n_head_kv,
        .head_dim = c->head_dim,
        .block_size = kv->block_size,
        .max_blocks = b->max_blocks,
        .scale = 1.0f / sqrtf((float)c->head_dim),
        .kv_dtype = kv->dtype,
        .seq_of_tok = seq,
        .pos_of_tok = pos,
        .block_tables = tables,
    };

    CP_CHECK(cp_backend_embed(be, &m->w.tok_embd, tok, T, s->x));
    for (int l = 0; l < c->n_layer; l++) {
        const cp_layer_weights *L = &m->w.layers[l];
        /* attention block */
        CP_CHECK(cp_backend_rmsnorm(be, s->xb, s->x, L->attn_norm, T, c->dim, c->norm_eps));
        CP_CHECK(cp_backend_matmul(be, &L->wq, s->xb, T, s->q, L->bq));
        CP_CHECK(cp_backend_matmul(be, &L->wk, s->xb, T, s->k, L->bk));
        CP_CHECK(cp_backend_matmul(be, &L->wv, s->xb, T, s->v, L->bv));
        CP_CHECK(cp_backend_rope(be, s->q, pos, T, c->n_head, &rp));
        CP_CHECK(cp_backend_rope(be, s->k, pos, T, c->n_head_kv, &rp));
        CP_CHECK(cp_backend_kv_store(be, &ap, s->k, s->v, cp_kv_layer_k(kv, l), cp_kv_layer_v(kv, l)));
        CP_CHECK(cp_backend_attention(be, &ap, s->q, cp_kv_layer_k(kv, l), cp_kv_layer_v(kv, l), s->att));
        CP_CHECK(cp_backend_matmul(be, &L->wo, s->att, T, s->proj, NULL));
        CP_CHECK(cp_backend_add(be, s->x, s->x, s->proj, (size_t)T * c->dim));
        /* SwiGLU MLP */
        CP_CHECK(cp_backend_rmsnorm(be, s->xb, s->x, L->ffn_norm, T, c->dim, c->norm_eps));
        CP_CHECK(cp_backend_matmul(be, &L->w_gate, s->xb, T, s->att, NULL));
        CP_CHECK(cp_backend_matmul(be, &L->w_up, s->xb, T, s->up, NULL));
        CP_CHECK(cp_backend_swiglu(be, s->att, s->att, s->up, (size_t)T * c->ffn_dim));
        CP_CHECK(cp_backend_matmul(be, &L->w_down, s->att, T, s->proj, NULL));
        CP_CHECK(cp_backend_add(be, s->x, s->x, s->proj, (size_t)T * c->dim));
    }

    /* gather the rows that want logits into xb, then norm + LM head */
    int n = 0;
    while (*logit_idx + n < b->n_logits && b->logit_rows[*logit_idx + n] < t0 + T) {
        int r = b->logit_rows[*logit_idx + n] - t0;
        CP_CHECK(cp_backend_copy(be, s->xb + (size_t)n * c->dim, s->x + (size_t)r * c->dim,
                                     (size_t)c->dim * sizeof(float), CP_COPY_DEVICE_TO_DEVICE));
        n++;
    }
    if (n == 0) return CP_OK;
    CP_CHECK(cp_backend_rmsnorm(be, s->xb, s->xb, m->w.out_norm, n, c->dim, c->norm_eps));
    float *dst = logits + (size_t)(*logit_idx) * c->n_vocab;
    if (host) {
        CP_CHECK(cp_backend_matmul(be, &m->w.output, s->xb, n, dst, NULL));
    } else {
        for (int i = 0; i < n; i += CP_LOGIT_CHUNK) {
            int k = n - i < CP_LOGIT_CHUNK ? n - i : CP_LOGIT_CHUNK;
            CP_CHECK(cp_backend_matmul(be, &m->w.output, s->xb + (size_t)i * c->dim, k, m->logits, NULL));
            CP_CHECK(cp_backend_copy(be, dst + (size_t)i * c->n_vocab, m->logits,
                                     (size_t)k * c->n_vocab * sizeof(float), CP_COPY_DEVICE_TO_HOST));
        }
    }
    *logit_idx += n;
    return CP_OK;
}

cp_status cp_model_forward(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, float *logits) {
    if (!m || !kv || !b) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward: NULL argument");
    if (kv->model != m) return CP_ERROR(CP_ERR_INVALID_ARG, "KV cache belongs to another model");
    CP_CHECK(check_batch(m, kv, b));
    if (b->n_tok == 0) return CP_OK;
    if (b->n_logits > 0 && !logits) return CP_ERROR(CP_ERR_INVALID_ARG, "logits buffer is NULL");
    const int32_t *tables;
    CP_CHECK(upload_tables(m, b, &tables));
    int logit_idx = 0;
    for (int t0 = 0; t0 < b->n_tok; t0 += m->max_batch) {
        int T = b->n_tok - t0 < m->max_batch ? b->n_tok - t0 : m->max_batch;
        CP_CHECK(forward_chunk(m, kv, b, tables, t0, T, &logit_idx, logits));
    }
    return cp_backend_synchronize(m->be);
}
