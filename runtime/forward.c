/* forward.c - the forward pass of a Llama-family decoder over a batch of
 * tokens from any number of sequences (prefill and decode alike), reading
 * and writing the paged KV cache. Every operation goes through the backend
 * interface, so the same code drives the CPU and the GPU. */
#include "model_impl.h"

#include <math.h>
#include <stdio.h>
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

/* ---- collectives on activations ----------------------------------------
 * A device-memory twin of the group (m->tp_dev / m->pp_dev: NCCL for a
 * device backend) moves the backend's buffers directly, ordered on its
 * stream. Otherwise the host group does: MPI takes host memory, so with a
 * device backend each call goes through two host staging buffers, sized
 * once for the largest message. */

static bool staged(cp_model_t m) {
    return cp_backend_device(m->be) != CP_DEVICE_CPU;
}

static cp_status stage_reserve(cp_model_t m) {
    if (m->stage_a) return CP_OK;
    size_t rows = (size_t)m->max_batch + (size_t)m->plan.tp;
    size_t n = rows * (size_t)m->cfg.dim;
    size_t nl = (size_t)CP_LOGIT_CHUNK * (size_t)m->cfg.n_vocab;
    if (nl > n) n = nl;
    m->stage_a = malloc(n * sizeof(float));
    m->stage_b = malloc(n * sizeof(float));
    if (!m->stage_a || !m->stage_b) return CP_ERROR(CP_ERR_OOM, "out of memory for %zu staging floats", 2 * n);
    m->stage_floats = n;
    return CP_OK;
}

static cp_status to_host(cp_model_t m, float *dst, const float *src, size_t n) {
    return cp_backend_copy(m->be, dst, src, n * sizeof(float), CP_COPY_DEVICE_TO_HOST);
}
static cp_status to_device(cp_model_t m, float *dst, const float *src, size_t n) {
    return cp_backend_copy(m->be, dst, src, n * sizeof(float), CP_COPY_HOST_TO_DEVICE);
}

static cp_status act_allreduce(cp_model_t m, float *buf, size_t n) {
    if (m->tp_dev)
        return cp_comm_allreduce(m->tp_dev, buf, buf, n, CP_DTYPE_F32, CP_REDUCE_SUM, cp_backend_stream(m->be));
    if (!staged(m)) return cp_comm_allreduce(m->tp_comm, buf, buf, n, CP_DTYPE_F32, CP_REDUCE_SUM, NULL);
    CP_CHECK(stage_reserve(m));
    CP_CHECK(to_host(m, m->stage_a, buf, n));
    CP_CHECK(cp_comm_allreduce(m->tp_comm, m->stage_a, m->stage_a, n, CP_DTYPE_F32, CP_REDUCE_SUM, NULL));
    return to_device(m, buf, m->stage_a, n);
}

static cp_status act_reduce_scatter(cp_model_t m, const float *send, float *recv, size_t per) {
    if (m->tp_dev)
        return cp_comm_reduce_scatter(m->tp_dev, send, recv, per, CP_DTYPE_F32, CP_REDUCE_SUM,
                                      cp_backend_stream(m->be));
    if (!staged(m)) return cp_comm_reduce_scatter(m->tp_comm, send, recv, per, CP_DTYPE_F32, CP_REDUCE_SUM, NULL);
    CP_CHECK(stage_reserve(m));
    CP_CHECK(to_host(m, m->stage_a, send, per * (size_t)m->plan.tp));
    CP_CHECK(cp_comm_reduce_scatter(m->tp_comm, m->stage_a, m->stage_b, per, CP_DTYPE_F32, CP_REDUCE_SUM, NULL));
    return to_device(m, recv, m->stage_b, per);
}

static cp_status act_allgather(cp_model_t m, const float *send, float *recv, size_t per) {
    if (m->tp_dev) return cp_comm_allgather(m->tp_dev, send, recv, per, CP_DTYPE_F32, cp_backend_stream(m->be));
    if (!staged(m)) return cp_comm_allgather(m->tp_comm, send, recv, per, CP_DTYPE_F32, NULL);
    CP_CHECK(stage_reserve(m));
    CP_CHECK(to_host(m, m->stage_a, send, per));
    CP_CHECK(cp_comm_allgather(m->tp_comm, m->stage_a, m->stage_b, per, CP_DTYPE_F32, NULL));
    return to_device(m, recv, m->stage_b, per * (size_t)m->plan.tp);
}

static cp_status act_send(cp_model_t m, const float *buf, size_t n, int peer) {
    if (m->pp_dev) return cp_comm_send(m->pp_dev, buf, n, CP_DTYPE_F32, peer, cp_backend_stream(m->be));
    if (!staged(m)) return cp_comm_send(m->pp_comm, buf, n, CP_DTYPE_F32, peer, NULL);
    CP_CHECK(stage_reserve(m));
    CP_CHECK(to_host(m, m->stage_a, buf, n));
    return cp_comm_send(m->pp_comm, m->stage_a, n, CP_DTYPE_F32, peer, NULL);
}

static cp_status act_recv(cp_model_t m, float *buf, size_t n, int peer) {
    if (m->pp_dev) return cp_comm_recv(m->pp_dev, buf, n, CP_DTYPE_F32, peer, cp_backend_stream(m->be));
    if (!staged(m)) return cp_comm_recv(m->pp_comm, buf, n, CP_DTYPE_F32, peer, NULL);
    CP_CHECK(stage_reserve(m));
    CP_CHECK(cp_comm_recv(m->pp_comm, m->stage_a, n, CP_DTYPE_F32, peer, NULL));
    return to_device(m, buf, m->stage_a, n);
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

/* Token rows through this rank's slice of a vocabulary-parallel embedding
 * into dst[T][dim]: ids outside the slice become row 0 and are zeroed after
 * the lookup, so a sum over the TP group holds exactly one real row per
 * token. The caller sums (all-reduce, or reduce-scatter with SP). */
static cp_status embed(cp_model_t m, const int32_t *tok_host, int T, float *dst) {
    cp_backend_t be = m->be;
    const int dim = m->cfg.dim;
    const int v0 = m->plan.vocab_begin, v1 = m->plan.vocab_end;
    int32_t *ids = m->s.tokens; /* device buffer; host on the CPU */
    bool host = cp_backend_device(be) == CP_DEVICE_CPU;
    int32_t *local = host ? ids : m->ids_host;
    for (int t = 0; t < T; t++) local[t] = tok_host[t] >= v0 && tok_host[t] < v1 ? tok_host[t] - v0 : 0;
    if (!host) CP_CHECK(cp_backend_copy(be, ids, local, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
    CP_CHECK(cp_backend_embed(be, &m->w.tok_embd, ids, T, dst));
    if (!m->tp_comm) return CP_OK;
    for (int t = 0; t < T; t++)
        if (tok_host[t] < v0 || tok_host[t] >= v1)
            CP_CHECK(cp_backend_memset(be, dst + (size_t)t * dim, 0, (size_t)dim * sizeof(float)));
    return CP_OK;
}

/* Sum of the TP group's partial rows part[T][dim] into this rank's residual
 * stream: all of it (plain TP: an all-reduce, then x += part), or with
 * sequence parallelism its own Ts rows (reduce-scatter of the rows padded
 * to Tp = Ts * tp, then x[Ts] += the reduced slice). */
static cp_status reduce_into_x(cp_model_t m, float *part, int T, int Tp, int Ts, bool sp) {
    const size_t dim = (size_t)m->cfg.dim;
    cp_scratch *s = &m->s;
    if (!m->tp_comm) return cp_backend_add(m->be, s->x, s->x, part, (size_t)T * dim);
    if (!sp) {
        CP_CHECK(act_allreduce(m, part, (size_t)T * dim));
        return cp_backend_add(m->be, s->x, s->x, part, (size_t)T * dim);
    }
    if (Tp > T) CP_CHECK(cp_backend_memset(m->be, part + (size_t)T * dim, 0, (size_t)(Tp - T) * dim * sizeof(float)));
    CP_CHECK(act_reduce_scatter(m, part, s->xl, (size_t)Ts * dim));
    return cp_backend_add(m->be, s->x, s->x, s->xl, (size_t)Ts * dim);
}

/* The residual update after a row-parallel matmul: reduce_into_x, except
 * that without sequence parallelism and with a next RMSNorm (norm_w) the
 * add and the norm into xb are one fused step after the TP all-reduce. */
static cp_status residual(cp_model_t m, float *part, int T, int Tp, int Ts, bool sp, const float *norm_w) {
    if (sp || !norm_w) return reduce_into_x(m, part, T, Tp, Ts, sp);
    const cp_model_config *c = &m->cfg;
    if (m->tp_comm) CP_CHECK(act_allreduce(m, part, (size_t)T * c->dim));
    return cp_backend_add_rmsnorm(m->be, m->s.x, part, norm_w, T, c->dim, c->norm_eps, m->s.xb);
}

/* RMSNorm of the residual stream into xb, the input of the column-parallel
 * matmuls: with sequence parallelism each rank normalises its Ts rows and
 * the group all-gathers the full (padded) sequence. */
static cp_status norm_for_matmul(cp_model_t m, const float *w, int T, int Ts, bool sp) {
    const cp_model_config *c = &m->cfg;
    cp_scratch *s = &m->s;
    if (!sp) return cp_backend_rmsnorm(m->be, s->xb, s->x, w, T, c->dim, c->norm_eps);
    CP_CHECK(cp_backend_rmsnorm(m->be, s->xl, s->x, w, Ts, c->dim, c->norm_eps));
    return act_allgather(m, s->xl, s->xb, (size_t)Ts * c->dim);
}

/* Every TP rank's vocabulary slices of k <= CP_LOGIT_CHUNK rows (mine:
 * this rank's [k][vocab_l], not m->gather) all-gathered through m->gather
 * and laid side by side into rows[k][vocab] (host). */
static cp_status gather_slices(cp_model_t m, const float *mine, int k, float *rows) {
    const int vocab = m->cfg.n_vocab, tp = m->plan.tp;
    int begin[CP_MAX_TP + 1] = {0};
    size_t counts[CP_MAX_TP] = {0};
    for (int r = 0; r < tp; r++) {
        cp_plan_split(vocab, tp, r, 1, &begin[r], &begin[r + 1]);
        counts[r] = (size_t)k * (size_t)(begin[r + 1] - begin[r]);
    }
    CP_CHECK(cp_comm_allgatherv(m->tp_comm, mine, (size_t)k * m->vocab_l, m->gather, counts, CP_DTYPE_F32, NULL));
    const float *src = m->gather;
    for (int r = 0; r < tp; r++) {
        const size_t w = (size_t)(begin[r + 1] - begin[r]);
        for (int j = 0; j < k; j++) memcpy(rows + (size_t)j * vocab + begin[r], src + (size_t)j * w, w * sizeof(float));
        src += counts[r];
    }
    return CP_OK;
}

/* Full logits of k <= CP_LOGIT_CHUNK rows of normed hidden states (xb rows
 * i..i+k) into rows[k][vocab] (host): each TP rank multiplies its
 * vocabulary rows, then the slices are gathered and laid side by side. */
static cp_status lm_head_rows(cp_model_t m, int i, int k, float *rows) {
    cp_backend_t be = m->be;
    const cp_model_config *c = &m->cfg;
    const int vocab = c->n_vocab, vl = m->vocab_l;
    const float *x = m->s.xb + (size_t)i * c->dim;
    if (!m->tp_comm && cp_backend_device(be) == CP_DEVICE_CPU)
        return cp_backend_matmul(be, &m->w.output, x, k, rows, NULL);
    CP_CHECK(cp_backend_matmul(be, &m->w.output, x, k, m->logits, NULL));
    if (!m->tp_comm)
        return cp_backend_copy(be, rows, m->logits, (size_t)k * vocab * sizeof(float), CP_COPY_DEVICE_TO_HOST);
    const float *mine = m->logits;
    if (staged(m)) { /* the host group gathers them */
        CP_CHECK(stage_reserve(m));
        CP_CHECK(to_host(m, m->stage_a, m->logits, (size_t)k * vl));
        mine = m->stage_a;
    }
    return gather_slices(m, mine, k, rows);
}

/* Full logits of n rows of xb into dst[n][vocab] (host); one matmul over all
 * n rows on a single CPU rank (each weight row reused across them). */
static cp_status lm_head(cp_model_t m, int n, float *dst) {
    if (!m->tp_comm && cp_backend_device(m->be) == CP_DEVICE_CPU)
        return cp_backend_matmul(m->be, &m->w.output, m->s.xb, n, dst, NULL);
    for (int i = 0; i < n; i += CP_LOGIT_CHUNK)
        CP_CHECK(lm_head_rows(m, i, n - i < CP_LOGIT_CHUNK ? n - i : CP_LOGIT_CHUNK, dst + (size_t)i * m->cfg.n_vocab));
    return CP_OK;
}

/* What the last stage does with the requested rows: full logits, or a
 * sampled token per row. */
typedef struct row_sampler {
    const cp_sample_params *sp;
    const float *u;  /* [n_logits] */
    int32_t *out;    /* [n_logits] */
    const cp_logit_top *top; /* instead of sampling: candidates (sp, u, out unused) */
} row_sampler;

static cp_status sample_rows(cp_model_t m, int n, const row_sampler *rs, int row0);
static cp_status top_rows(cp_model_t m, int n, const cp_logit_top *top, int row0, bool ready);

static cp_rope_params rope_params(cp_model_t m) {
    const cp_model_config *c = &m->cfg;
    cp_rope_params rp = {
        .mode = c->rope_mode,
        .head_dim = c->head_dim,
        .rot_dim = c->rot_dim,
        .theta = c->rope_theta,
        .freq_scale = c->rope_freq_scale,
        .freq_factors = m->w.rope_freqs,
    };
    return rp;
}

/* Attention parameters of T tokens whose sequence ids, positions and block
 * tables are at seq, pos and tables (device memory on a device backend);
 * n_ctx_max and n_seq_hint are the caller's. */
static cp_attn_params attn_params(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, int T,
                                  const int32_t *seq, const int32_t *pos, const int32_t *tables) {
    const cp_model_config *c = &m->cfg;
    cp_attn_params ap = {
        .n_tok = T,
        .n_head = m->n_head_l,
        .n_head_kv = m->n_kv_l,
        .head_dim = c->head_dim,
        .block_size = kv->slots,
        .max_blocks = b->max_blocks,
        .scale = 1.0f / sqrtf((float)c->head_dim),
        .kv_dtype = kv->dtype,
        .seq_of_tok = seq,
        .pos_of_tok = pos,
        .block_tables = tables,
        .n_ctx_max = 0,
        .kv_stride = m->plan.cp > 1 ? m->plan.cp : 0,
        .kv_offset = m->plan.cp > 1 ? m->plan.cp_rank : 0,
    };
    return ap;
}

/* ---- context parallelism ---------------------------------------------------
 * The cp ranks of a (stage, TP slot) split each chunk by position: rank r
 * computes the rows at positions p % cp == r and keeps their K/V (a cache of
 * block_size / cp rows per block). Every other step runs on those rows as
 * on a single rank (TP and SP inside the rows alike); attention needs every
 * held position of each row's sequence:
 *   1. the queries of all rows are all-gathered over the cp group, each
 *      rank's rows padded to the chunk's largest share (tmax);
 *   2. each rank attends all of them to the positions it holds, giving a
 *      normalised partial output and its log-sum-exp per (row, head);
 *   3. the per-(row, head) maximum log-sum-exp L is all-reduced, and each
 *      rank's partial weighted by w = exp(lse - L) (0 for an empty one);
 *   4. a reduce-scatter sums [w * out, w] so each owner receives its rows,
 *      and out = sum(w out) / sum(w): the softmax over all positions.
 * This is the pass-queries form of ring attention: the cache stays where it
 * was written, so prefill with a cached prefix and decode work the same way.
 * The pass-K/V form moves the other side: every rank all-gathers the K/V
 * rows the ranks hold of the chunk's sequences (their whole history), lays
 * them out as one cache of those sequences and attends its own rows to it
 * with the single-rank kernel. A fresh prompt's chunk moves 2 x n_kv_l rows
 * per position instead of the queries and the partial outputs (n_head_l rows
 * each, and more), a third as much for a model with 3 query heads per KV
 * head; a decode step would move the whole history, so each sequence of a
 * chunk takes the smaller (choose_exchange): a chunk that mixes a prompt
 * with decode rows runs both exchanges, each on its own rows.
 * The ring form of pass-K/V (ring attention) moves the same bytes without
 * ever holding the whole history: each rank packs its held rows of the
 * chunk's K/V sequences into one block of the same size on every rank, and
 * in cp steps attends its rows to the block in hand while passing it on to
 * the next rank (and receiving the previous rank's), merging the partial
 * outputs by their log-sum-exp (the online softmax). Memory is two blocks,
 * 2/cp of the history, instead of the history twice; it costs cp - 1
 * transfers per layer instead of one collective. Each transfer starts
 * before the attention to the block in hand, so a transport that moves
 * data on its own (NCCL, RDMA) can hide it; over one node's shared memory
 * MPI copies it inside the wait. */

static cp_status cpx_reserve(cp_model_t m) {
    if (m->cpx.count) return CP_OK;
    const size_t cp = (size_t)m->plan.cp, mb = (size_t)m->max_batch;
    const size_t qd = (size_t)m->n_head_l * (size_t)m->cfg.head_dim, nh = (size_t)m->n_head_l;
    const size_t pw = nh * ((size_t)m->cfg.head_dim + 1);
    m->cpx.count = calloc(4 * cp, sizeof(int));
    m->cpx.lrow = malloc(mb * sizeof(int32_t));
    m->cpx.tok = malloc(mb * sizeof(int32_t));
    m->cpx.pos = malloc(mb * sizeof(int32_t));
    m->cpx.seq = malloc(mb * sizeof(int32_t));
    m->cpx.gpos = malloc(cp * mb * sizeof(int32_t));
    m->cpx.gseq = malloc(cp * mb * sizeof(int32_t));
    m->cpx.qall = malloc(cp * mb * qd * sizeof(float));
    m->cpx.o = malloc(cp * mb * qd * sizeof(float));
    m->cpx.lse = malloc(cp * mb * nh * sizeof(float));
    m->cpx.lmax = malloc(cp * mb * nh * sizeof(float));
    m->cpx.pack = malloc(cp * mb * pw * sizeof(float));
    m->cpx.red = malloc(mb * pw * sizeof(float));
    m->cpx.xg = malloc(mb * (size_t)m->cfg.dim * sizeof(float));
    m->cpx.runs = malloc(2 * mb * sizeof(int32_t));
    m->cpx.seqs = malloc(3 * mb * sizeof(int32_t));
    m->cpx.rseq = malloc(mb * sizeof(int32_t));
    m->cpx.kvrow = malloc(mb);
    m->cpx.kidx = malloc(mb * sizeof(int32_t));
    m->cpx.qidx = malloc(mb * sizeof(int32_t));
    m->cpx.kpos = malloc(mb * sizeof(int32_t));
    m->cpx.kseq = malloc(mb * sizeof(int32_t));
    m->cpx.share = malloc(2 * cp * sizeof(size_t));
    if (!m->cpx.count || !m->cpx.lrow || !m->cpx.tok || !m->cpx.pos || !m->cpx.seq || !m->cpx.gpos || !m->cpx.gseq ||
        !m->cpx.qall || !m->cpx.o || !m->cpx.lse || !m->cpx.lmax || !m->cpx.pack || !m->cpx.red || !m->cpx.xg ||
        !m->cpx.runs || !m->cpx.seqs || !m->cpx.rseq || !m->cpx.kvrow || !m->cpx.kidx || !m->cpx.qidx || !m->cpx.kpos ||
        !m->cpx.kseq || !m->cpx.share)
        return CP_ERROR(CP_ERR_OOM, "out of memory for the context-parallel buffers (%zu rows)", cp * mb);
    return CP_OK;
}

/* Bytes of one position's K (or V) in kv: n_kv_l rows of the cache's type. */
static size_t kv_pos_bytes(cp_model_t m, cp_kv_cache_t kv) {
    return (size_t)m->n_kv_l * cp_dtype_row_size(kv->dtype, m->cfg.head_dim);
}

/* Positions p < len with p % cp == r. */
static int held(int len, int cp, int r) { return len > r ? (len - 1 - r) / cp + 1 : 0; }

/* Which sequences of chunk [t0, t0+T) of b pass K/V and which pass queries
 * (cpx.runs and cpx.kvrow), the same on every cp rank, which all see the
 * whole batch. Passing a sequence's K/V moves its length (history
 * included) x 2 rows of the cache; passing its queries moves its rows x
 * (query + partial output + log-sum-exp). Under CP_CP_AUTO each sequence
 * takes the lighter, unless sending the whole chunk one way costs less
 * once every collective is counted CP_CP_CALL_BYTES (passing K/V is one
 * all-gather per layer, passing queries three collectives): a fresh prompt
 * passes K/V, a decode step queries, and a chunk that mixes a long prompt
 * with decode rows of long histories splits. The K/V sequences go around
 * the ring (cpx.ring) when forced, or under CP_CP_AUTO when their history
 * holds at least cp_ring_bytes per layer: on one node the ring was level
 * with the all-gather at 0.77 MB and 3-6% faster at 3.1 MB, with under 1%
 * of the time in the transfers either way
 * (benchmarks/parallel/results/cp_ring_*), and it holds 2/cp of the K/V. */
static void choose_exchange(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, int t0, int T) {
    int32_t *seqs = m->cpx.seqs, *rows_seq = m->cpx.rseq;
    int n = 0;
    for (int t = 0; t < T; t++) {
        const int32_t sq = b->seq[t0 + t], len = b->pos[t0 + t] + 1;
        int i = t > 0 && sq == b->seq[t0 + t - 1] ? rows_seq[t - 1] : -1;
        for (int j = 0; i < 0 && j < n; j++)
            if (seqs[3 * j] == sq) i = j;
        if (i < 0) {
            i = n++;
            seqs[3 * i] = sq;
            seqs[3 * i + 1] = 0;
            seqs[3 * i + 2] = 0;
        }
        if (len > seqs[3 * i + 1]) seqs[3 * i + 1] = len;
        seqs[3 * i + 2]++;
        rows_seq[t] = i;
    }
    const double nh = m->n_head_l, hd = m->cfg.head_dim;
    const double kv_bytes = 2.0 * (double)kv_pos_bytes(m, kv), q_bytes = (nh * hd + nh * (hd + 1) + nh) * sizeof(float);
    /* 0: every sequence passes queries, 1: K/V, 2: each the lighter */
    int how = m->cp_exchange == CP_CP_KV || m->cp_exchange == CP_CP_RING ? 1 : 0;
    if (m->cp_exchange == CP_CP_AUTO) {
        double split = 0, all_kv = CP_CP_CALL_BYTES, all_q = 3 * CP_CP_CALL_BYTES;
        bool some_kv = false, some_q = false;
        for (int i = 0; i < n; i++) {
            const double k = seqs[3 * i + 1] * kv_bytes, q = seqs[3 * i + 2] * q_bytes;
            all_kv += k;
            all_q += q;
            split += k <= q ? k : q;
            some_kv |= k <= q;
            some_q |= k > q;
        }
        split += (some_kv ? CP_CP_CALL_BYTES : 0) + (some_q ? 3 * CP_CP_CALL_BYTES : 0);
        how = split < all_kv && split < all_q ? 2 : all_kv <= all_q ? 1 : 0;
    }
    int n_runs = 0;
    double gathered = 0;
    for (int i = 0; i < n; i++) {
        bool pass_kv = how == 1 || (how == 2 && seqs[3 * i + 1] * kv_bytes <= seqs[3 * i + 2] * q_bytes);
        gathered += pass_kv ? seqs[3 * i + 1] * kv_bytes : 0;
        seqs[3 * i + 2] = pass_kv; /* from here: whether it passes K/V */
        if (!pass_kv) continue;
        m->cpx.runs[2 * n_runs] = seqs[3 * i];
        m->cpx.runs[2 * n_runs + 1] = seqs[3 * i + 1];
        n_runs++;
    }
    for (int t = 0; t < T; t++) m->cpx.kvrow[t] = (unsigned char)seqs[3 * rows_seq[t] + 2];
    m->cpx.n_runs = n_runs;
    m->cpx.ring = m->cp_exchange == CP_CP_RING || (m->cp_exchange == CP_CP_AUTO && gathered >= m->cp_ring_bytes);
}

/* Copies rows idx[0..n) of src (of width w floats) to dst, one after the other. */
static void gather_rows(float *dst, const float *src, const int32_t *idx, int n, size_t w) {
    for (int i = 0; i < n; i++) memcpy(dst + (size_t)i * w, src + (size_t)idx[i] * w, w * sizeof(float));
}

/* Copies the n rows of src to rows idx[0..n) of dst. */
static void scatter_rows(float *dst, const float *src, const int32_t *idx, int n, size_t w) {
    for (int i = 0; i < n; i++) memcpy(dst + (size_t)idx[i] * w, src + (size_t)i * w, w * sizeof(float));
}

/* Lays the K/V sequences (cpx.runs) out as blocks numbered in run order,
 * ceil(length / bs) each, into the block tables cpx.ftab ([max seq id +
 * 1][mb]), and makes cpx.kvfull hold `bytes_per_block` x that many blocks
 * (the caller's layout inside). Returns the number of blocks in *n_blocks,
 * and records the bytes held beside `also` as the exchange's peak. */
static cp_status lay_out_runs(cp_model_t m, int mb, int bs, size_t bytes_per_block, size_t also, int32_t *n_blocks) {
    const int n = m->cpx.n_runs;
    const int32_t *runs = m->cpx.runs;
    int32_t max_seq = 0, nb = 0;
    for (int i = 0; i < n; i++) {
        if (runs[2 * i] > max_seq) max_seq = runs[2 * i];
        nb += (runs[2 * i + 1] + bs - 1) / bs;
    }
    const size_t tab = ((size_t)max_seq + 1) * (size_t)mb, bytes = (size_t)nb * bytes_per_block;
    if (tab > m->cpx.ftab_cap) {
        int32_t *p = realloc(m->cpx.ftab, tab * sizeof(int32_t));
        if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory for block tables");
        m->cpx.ftab = p;
        m->cpx.ftab_cap = tab;
    }
    if (bytes > m->cpx.kvfull_cap) {
        unsigned char *p = realloc(m->cpx.kvfull, bytes);
        if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory for %zu bytes of K/V", bytes);
        m->cpx.kvfull = p;
        m->cpx.kvfull_cap = bytes;
    }
    int32_t next = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < (runs[2 * i + 1] + bs - 1) / bs; j++) m->cpx.ftab[(size_t)runs[2 * i] * mb + j] = next++;
    if (bytes + also > m->stats.cp_kv_peak_bytes) m->stats.cp_kv_peak_bytes = bytes + also;
    *n_blocks = nb;
    return CP_OK;
}

/* The pass-K/V exchange (see above): this rank's held rows of the K/V
 * sequences go to every cp rank, and this rank's rows of those sequences
 * (cpx.nk of them; all of its T rows when none passes queries) attend to
 * the sequences laid out whole, into s->att. */
static cp_status cp_attention_kv(cp_model_t m, cp_kv_cache_t kv, int l, const cp_attn_params *ap, int T) {
    const int cp = m->plan.cp, me = m->plan.cp_rank, bs = kv->block_size, slots = kv->slots;
    const int n = m->cpx.n_runs, mb = ap->max_blocks, nk = m->cpx.nk;
    const int32_t *runs = m->cpx.runs;
    const size_t sb = kv_pos_bytes(m, kv);
    /* each rank's share in bytes, and where it starts */
    size_t *share = m->cpx.share, *off = m->cpx.share + cp, total = 0;
    for (int r = 0; r < cp; r++) {
        size_t k = 0;
        for (int i = 0; i < n; i++) k += (size_t)held(runs[2 * i + 1], cp, r);
        share[r] = k * 2 * sb;
        off[r] = total;
        total += share[r];
    }
    if (total > m->cpx.kvall_cap) {
        unsigned char *p = realloc(m->cpx.kvall, total);
        if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory for %zu bytes of K/V rows", total);
        m->cpx.kvall = p;
        m->cpx.kvall_cap = total;
    }
    /* this rank's rows, K then V per position, into its share */
    const unsigned char *lk = cp_kv_layer_k(kv, l), *lv = cp_kv_layer_v(kv, l);
    unsigned char *dst = m->cpx.kvall + off[me];
    for (int i = 0; i < n; i++)
        for (int p = me; p < runs[2 * i + 1]; p += cp) {
            const int slot = p / cp;
            const size_t row = (size_t)ap->block_tables[(size_t)runs[2 * i] * mb + slot / slots] * slots + slot % slots;
            memcpy(dst, lk + row * sb, sb);
            memcpy(dst + sb, lv + row * sb, sb);
            dst += 2 * sb;
        }
    CP_CHECK(cp_comm_allgatherv(m->cp_comm, m->cpx.kvall + off[me], share[me], m->cpx.kvall, share, CP_DTYPE_I8,
                                NULL));
    if (nk == 0) {
        if (total > m->stats.cp_kv_peak_bytes) m->stats.cp_kv_peak_bytes = total;
        return CP_OK;
    }
    /* the sequences whole: blocks of bs positions, K then V */
    int32_t n_blocks;
    CP_CHECK(lay_out_runs(m, mb, bs, 2 * (size_t)bs * sb, total, &n_blocks));
    const size_t half = (size_t)n_blocks * (size_t)bs * sb;
    unsigned char *fk = m->cpx.kvfull, *fv = m->cpx.kvfull + half;
    for (int r = 0; r < cp; r++) {
        const unsigned char *src = m->cpx.kvall + off[r];
        for (int i = 0; i < n; i++)
            for (int p = r; p < runs[2 * i + 1]; p += cp) {
                const size_t row = (size_t)m->cpx.ftab[(size_t)runs[2 * i] * mb + p / bs] * bs + p % bs;
                memcpy(fk + row * sb, src, sb);
                memcpy(fv + row * sb, src + sb, sb);
                src += 2 * sb;
            }
    }
    cp_attn_params g = *ap;
    g.block_size = bs;
    g.block_tables = m->cpx.ftab;
    g.kv_stride = 0;
    g.kv_offset = 0;
    g.lse = NULL;
    if (nk == T) return cp_backend_attention(m->be, &g, m->s.q, fk, fv, m->s.att);
    /* a split chunk: this rank's K/V rows gathered, attended, put back */
    const size_t qd = (size_t)m->n_head_l * (size_t)m->cfg.head_dim;
    g.n_tok = nk;
    g.seq_of_tok = m->cpx.kseq;
    g.pos_of_tok = m->cpx.kpos;
    g.n_seq_hint = 0;
    gather_rows(m->cpx.qall, m->s.q, m->cpx.kidx, nk, qd);
    CP_CHECK(cp_backend_attention(m->be, &g, m->cpx.qall, fk, fv, m->cpx.o));
    scatter_rows(m->s.att, m->cpx.o, m->cpx.kidx, nk, qd);
    return CP_OK;
}

/* o, lse (rows x head_dim, rows) := the merge of themselves with (o2,
 * lse2), partial attention outputs over disjoint sets of positions, each
 * normalised with its log-sum-exp (-inf: no positions, the row is 0). */
static void merge_partial(float *o, float *lse, const float *o2, const float *lse2, size_t rows, int hd) {
    for (size_t i = 0; i < rows; i++) {
        const float b = lse2[i], a = lse[i];
        float *x = o + i * (size_t)hd;
        const float *y = o2 + i * (size_t)hd;
        if (b == -INFINITY) continue;
        if (a == -INFINITY) {
            memcpy(x, y, (size_t)hd * sizeof(float));
            lse[i] = b;
            continue;
        }
        const float mx = a > b ? a : b, wa = expf(a - mx), wb = expf(b - mx), sum = wa + wb, inv = 1.0f / sum;
        for (int d = 0; d < hd; d++) x[d] = (wa * x[d] + wb * y[d]) * inv;
        lse[i] = mx + logf(sum);
    }
}

/* The ring form of the pass-K/V exchange (see above): this rank's rows of
 * the K/V sequences (cpx.nk of them) attend to every rank's held rows of
 * those sequences, one rank's block per step, into s->att. The block of
 * rank r keeps its positions p % cp == r of sequence runs[i] in blocks
 * numbered from base_i (cpx.ftab), `slots` rows each, as r's cache does: K
 * in the first half, V in the second. Every rank's block has the same size,
 * so each step is one sendrecv of equal halves around the ring. */
static cp_status cp_attention_ring(cp_model_t m, cp_kv_cache_t kv, int l, const cp_attn_params *ap, int T) {
    const int cp = m->plan.cp, me = m->plan.cp_rank, bs = kv->block_size, slots = kv->slots;
    const int n = m->cpx.n_runs, mb = ap->max_blocks, nk = m->cpx.nk, nh = m->n_head_l, hd = m->cfg.head_dim;
    const int32_t *runs = m->cpx.runs;
    const size_t sb = kv_pos_bytes(m, kv), qd = (size_t)nh * (size_t)hd;
    /* two blocks (the one in hand, the one arriving) of K and V halves */
    int32_t n_blocks;
    CP_CHECK(lay_out_runs(m, mb, bs, 4 * (size_t)slots * sb, 0, &n_blocks));
    const size_t half = (size_t)n_blocks * (size_t)slots * sb;
    /* this rank's block: its held rows, from its cache's blocks to the packed ones */
    unsigned char *buf[2] = {m->cpx.kvfull, m->cpx.kvfull + 2 * half};
    const unsigned char *lk = cp_kv_layer_k(kv, l), *lv = cp_kv_layer_v(kv, l);
    for (int i = 0; i < n; i++) {
        const size_t t0 = (size_t)runs[2 * i] * (size_t)mb;
        for (int slot = 0; slot < held(runs[2 * i + 1], cp, me); slot++) {
            const size_t from = (size_t)ap->block_tables[t0 + (size_t)(slot / slots)] * (size_t)slots + (size_t)(slot % slots);
            const size_t to = (size_t)m->cpx.ftab[t0 + (size_t)(slot / slots)] * (size_t)slots + (size_t)(slot % slots);
            memcpy(buf[0] + to * sb, lk + from * sb, sb);
            memcpy(buf[0] + half + to * sb, lv + from * sb, sb);
        }
    }
    /* the rows that attend, and where their output and log-sum-exp build up */
    const bool all = nk == T;
    const float *q = m->s.q;
    if (!all) {
        gather_rows(m->cpx.qall, m->s.q, m->cpx.kidx, nk, qd);
        q = m->cpx.qall;
    }
    float *acc = all ? m->s.att : m->cpx.o, *part = m->cpx.o + (size_t)m->max_batch * qd;
    float *lacc = m->cpx.lse, *lpart = m->cpx.lse + (size_t)m->max_batch * (size_t)nh;
    cp_attn_params g = *ap;
    g.block_size = slots;
    g.block_tables = m->cpx.ftab;
    g.kv_stride = cp;
    g.n_tok = nk;
    g.n_seq_hint = 0;
    if (!all) {
        g.seq_of_tok = m->cpx.kseq;
        g.pos_of_tok = m->cpx.kpos;
    }
    const int to = (me + 1) % cp, from = (me + cp - 1) % cp;
    for (int step = 0; step < cp; step++) {
        unsigned char *cur = buf[step & 1];
        const bool pass = step + 1 < cp;
        if (pass)
            CP_CHECK(cp_comm_sendrecv_start(m->cp_comm, cur, to, buf[(step + 1) & 1], from, 2 * half, CP_DTYPE_I8,
                                            NULL));
        cp_status st = CP_OK;
        if (nk > 0) {
            /* the block in hand is rank (me - step)'s */
            g.kv_offset = (me + cp - step) % cp;
            g.lse = step == 0 ? lacc : lpart;
            st = cp_backend_attention(m->be, &g, q, cur, cur + half, step == 0 ? acc : part);
            if (st == CP_OK && step > 0) merge_partial(acc, lacc, part, lpart, (size_t)nk * (size_t)nh, hd);
        }
        /* never leave with the transfer in flight: it writes into kvfull,
         * which a later chunk may move and the model's end frees */
        if (pass && st == CP_OK) {
            st = cp_comm_sendrecv_wait(m->cp_comm, NULL);
        } else if (pass) {
            char why[512];
            snprintf(why, sizeof(why), "%s", cp_last_error_detail());
            if (cp_comm_sendrecv_wait(m->cp_comm, NULL) != CP_OK) CP_ERROR(st, "%s", why); /* the first error */
        }
        CP_CHECK(st);
    }
    if (!all) scatter_rows(m->s.att, acc, m->cpx.kidx, nk, qd);
    return CP_OK;
}

/* The pass-queries exchange (see above) of this rank's rows of the
 * sequences that pass queries (cpx.nq of them; all of its T rows when
 * none passes K/V), into their rows of s->att. */
static cp_status cp_attention_q(cp_model_t m, cp_kv_cache_t kv, int l, const cp_attn_params *ap, int T) {
    const int cp = m->plan.cp, tmax = m->cpx.tmax, nh = m->n_head_l, hd = m->cfg.head_dim, nq = m->cpx.nq;
    const size_t qd = (size_t)nh * (size_t)hd, pw = (size_t)nh * (size_t)(hd + 1);
    const size_t rows = (size_t)cp * (size_t)tmax;
    const bool all = nq == T;
    /* this rank's queries go to its slot of qall, gathered in place */
    float *mine = m->cpx.qall + (size_t)m->plan.cp_rank * (size_t)tmax * qd;
    if (all)
        memcpy(mine, m->s.q, (size_t)nq * qd * sizeof(float));
    else
        gather_rows(mine, m->s.q, m->cpx.qidx, nq, qd);
    memset(mine + (size_t)nq * qd, 0, (size_t)(tmax - nq) * qd * sizeof(float));
    CP_CHECK(cp_comm_allgather(m->cp_comm, mine, m->cpx.qall, (size_t)tmax * qd, CP_DTYPE_F32, NULL));
    cp_attn_params g = *ap;
    g.n_tok = (int)rows;
    g.pos_of_tok = m->cpx.gpos;
    g.seq_of_tok = m->cpx.gseq;
    g.n_seq_hint = 0;
    g.lse = m->cpx.lse;
    CP_CHECK(cp_backend_attention(m->be, &g, m->cpx.qall, cp_kv_layer_k(kv, l), cp_kv_layer_v(kv, l), m->cpx.o));
    CP_CHECK(cp_comm_allreduce(m->cp_comm, m->cpx.lse, m->cpx.lmax, rows * (size_t)nh, CP_DTYPE_F32, CP_REDUCE_MAX,
                               NULL));
    for (size_t i = 0; i < rows * (size_t)nh; i++) {
        const float L = m->cpx.lmax[i], e = m->cpx.lse[i];
        const float w = e == -INFINITY ? 0.0f : expf(e - L); /* e finite: L >= e is too */
        const float *o = m->cpx.o + i * (size_t)hd;
        float *dst = m->cpx.pack + i * (size_t)(hd + 1);
        for (int d = 0; d < hd; d++) dst[d] = w * o[d];
        dst[hd] = w;
    }
    CP_CHECK(cp_comm_reduce_scatter(m->cp_comm, m->cpx.pack, m->cpx.red, (size_t)tmax * pw, CP_DTYPE_F32,
                                    CP_REDUCE_SUM, NULL));
    for (int t = 0; t < nq; t++) {
        float *out = m->s.att + (size_t)(all ? t : m->cpx.qidx[t]) * qd;
        for (int h = 0; h < nh; h++) {
            const float *src = m->cpx.red + ((size_t)t * (size_t)nh + (size_t)h) * (size_t)(hd + 1);
            const float inv = src[hd] > 0 ? 1.0f / src[hd] : 0.0f;
            for (int d = 0; d < hd; d++) out[(size_t)h * (size_t)hd + (size_t)d] = src[d] * inv;
        }
    }
    return CP_OK;
}

/* Attention of this rank's T rows (queries in s->q, ap their parameters)
 * over the positions every cp rank holds, into s->att: the rows of K/V
 * sequences, then those of query sequences (either set may be empty on
 * every rank, and its exchange is skipped). A collective of the cp group:
 * ranks without rows take part with T = 0. */
static cp_status cp_attention(cp_model_t m, cp_kv_cache_t kv, int l, const cp_attn_params *ap, int T) {
    if (m->cpx.n_runs) CP_CHECK(m->cpx.ring ? cp_attention_ring(m, kv, l, ap, T) : cp_attention_kv(m, kv, l, ap, T));
    if (m->cpx.tmax) CP_CHECK(cp_attention_q(m, kv, l, ap, T));
    return CP_OK;
}

/* Every layer of this stage over the T rows of the residual stream s->x
 * (Ts of them on this rank with sequence parallelism, padded to Tp). */
static cp_status run_layers(cp_model_t m, cp_kv_cache_t kv, const cp_attn_params *ap,
                            const cp_rope_params *rp, int T, int Tp, int Ts, bool sp) {
    cp_backend_t be = m->be;
    cp_scratch *s = &m->s;
    /* Without sequence parallelism the residual add and the next RMSNorm
     * are one fused step, so the first norm comes before the loop. */
    const bool fuse = !sp;
    if (T == 0) {
        /* a context-parallel rank without rows in this chunk: its cache
         * still answers the other ranks' queries */
        for (int l = 0; l < m->n_layer_l && m->cp_comm; l++) CP_CHECK(cp_attention(m, kv, l, ap, 0));
        return CP_OK;
    }
    if (fuse && m->n_layer_l > 0) CP_CHECK(norm_for_matmul(m, m->w.layers[0].attn_norm, T, Ts, sp));
    for (int l = 0; l < m->n_layer_l; l++) {
        const cp_layer_weights *L = &m->w.layers[l];
        /* attention block: column-parallel Q/K/V over this rank's heads,
         * row-parallel output projection, then the sum over the TP group */
        if (!fuse) CP_CHECK(norm_for_matmul(m, L->attn_norm, T, Ts, sp));
        const cp_tensor *qkv[3] = {&L->wq, &L->wk, &L->wv};
        float *qkv_out[3] = {s->q, s->k, s->v};
        const float *qkv_bias[3] = {L->bq, L->bk, L->bv};
        const int layer = m->plan.layer_begin + l, dim = m->cfg.dim;
        if (m->observe) m->observe(m->observe_user, layer, CP_ACT_RESID, s->x, T, dim);
        if (m->observe) m->observe(m->observe_user, layer, CP_ACT_ATTN_IN, s->xb, T, dim);
        CP_CHECK(cp_backend_matmul_group(be, 3, qkv, s->xb, T, qkv_out, qkv_bias));
        CP_CHECK(cp_backend_rope_store(be, rp, ap, s->q, s->k, s->v, cp_kv_layer_k(kv, l), cp_kv_layer_v(kv, l)));
        if (m->cp_comm)
            CP_CHECK(cp_attention(m, kv, l, ap, T));
        else
            CP_CHECK(cp_backend_attention(be, ap, s->q, cp_kv_layer_k(kv, l), cp_kv_layer_v(kv, l), s->att));
        if (m->observe) m->observe(m->observe_user, layer, CP_ACT_ATTN_OUT, s->att, T, m->n_head_l * m->cfg.head_dim);
        CP_CHECK(cp_backend_matmul(be, &L->wo, s->att, T, s->proj, NULL));
        CP_CHECK(residual(m, s->proj, T, Tp, Ts, sp, fuse ? L->ffn_norm : NULL));
        /* SwiGLU MLP: column-parallel gate/up, row-parallel down */
        if (!fuse) CP_CHECK(norm_for_matmul(m, L->ffn_norm, T, Ts, sp));
        if (m->observe) m->observe(m->observe_user, layer, CP_ACT_FFN_IN, s->xb, T, dim);
        CP_CHECK(cp_backend_matmul_swiglu(be, &L->w_gate, &L->w_up, s->xb, T, s->att, s->up));
        if (m->observe) m->observe(m->observe_user, layer, CP_ACT_FFN_ACT, s->att, T, m->ffn_l);
        CP_CHECK(cp_backend_matmul(be, &L->w_down, s->att, T, s->proj, NULL));
        const float *next = fuse && l + 1 < m->n_layer_l ? m->w.layers[l + 1].attn_norm : NULL;
        CP_CHECK(residual(m, s->proj, T, Tp, Ts, sp, next));
    }
    if (m->observe) m->observe(m->observe_user, m->plan.layer_begin + m->n_layer_l, CP_ACT_RESID, s->x, T, m->cfg.dim);
    return CP_OK;
}

/* The rows of chunk [t0, t0+T) that want logits (b->logit_rows from idx on),
 * taken from xfull and normed into xb[*n_out][dim]: runs of consecutive rows
 * move in one copy, and when they are the chunk's first rows the norm reads
 * them in place. */
static cp_status norm_logit_rows(cp_model_t m, const cp_batch *b, int t0, int T,
                                 const float *xfull, int idx, int *n_out) {
    const cp_model_config *c = &m->cfg;
    const size_t dim = (size_t)c->dim;
    const int32_t *rows = b->logit_rows + idx;
    int n = 0;
    bool prefix = true;
    while (idx + n < b->n_logits && rows[n] < t0 + T) {
        prefix = prefix && rows[n] - t0 == n;
        n++;
    }
    *n_out = n;
    if (n == 0) return CP_OK;
    if (!prefix) {
        for (int i = 0; i < n;) {
            int k = 1;
            while (i + k < n && rows[i + k] == rows[i] + k) k++;
            CP_CHECK(cp_backend_copy(m->be, m->s.xb + (size_t)i * dim,
                                     xfull + (size_t)(rows[i] - t0) * dim,
                                     (size_t)k * dim * sizeof(float), CP_COPY_DEVICE_TO_DEVICE));
            i += k;
        }
    }
    return cp_backend_rmsnorm(m->be, m->s.xb, prefix ? xfull : m->s.xb, m->w.out_norm, n, c->dim,
                              c->norm_eps);
}

/* This rank's rows of the residual stream for T tokens (Ts of them, padded
 * to Tp, with sequence parallelism): the first stage embeds tok (summed over
 * the vocabulary-parallel TP group), later stages receive the previous
 * stage's rows. */
static cp_status stage_input(cp_model_t m, const int32_t *tok, int T, int Tp, int Ts, bool sp) {
    const cp_plan *p = &m->plan;
    cp_scratch *s = &m->s;
    const size_t xn = (size_t)Ts * (size_t)m->cfg.dim;
    if (!p->first_stage) return act_recv(m, s->x, xn, p->pp_rank - 1);
    if (!m->tp_comm) return embed(m, tok, T, s->x);
    CP_CHECK(cp_backend_memset(m->be, s->x, 0, xn * sizeof(float)));
    CP_CHECK(embed(m, tok, T, s->proj));
    return reduce_into_x(m, s->proj, T, Tp, Ts, sp);
}

/* The last stage's n normed rows in xb: sampled (rs) or their full logits
 * into logits, rows counted from *logit_idx on, which advances by n. */
static cp_status head_rows(cp_model_t m, int n, const row_sampler *rs, float *logits, int *logit_idx) {
    if (n == 0) return CP_OK;
    if (rs && rs->top)
        CP_CHECK(top_rows(m, n, rs->top, *logit_idx, false));
    else if (rs)
        CP_CHECK(sample_rows(m, n, rs, *logit_idx));
    else
        CP_CHECK(lm_head(m, n, logits + (size_t)(*logit_idx) * m->cfg.n_vocab));
    *logit_idx += n;
    return CP_OK;
}

/* One chunk: batch rows [t0, t0+T) through this stage's layers. The first
 * stage embeds, later ones receive the hidden states of the previous stage;
 * the last stage computes the logits of the requested rows inside the chunk
 * into logits (host), or samples them (rs), rows counted from *logit_idx on. */
static cp_status forward_chunk(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b,
                               const int32_t *tables, int t0, int T, int *logit_idx, float *logits,
                               const row_sampler *rs) {
    const cp_model_config *c = &m->cfg;
    const cp_plan *p = &m->plan;
    cp_backend_t be = m->be;
    cp_scratch *s = &m->s;
    bool host = cp_backend_device(be) == CP_DEVICE_CPU;
    /* sequence parallelism: this rank keeps rows [tp_rank*Ts, +Ts) of the
     * chunk padded to Tp rows */
    const bool sp = m->sp && T > 1;
    const int Ts = sp ? (T + p->tp - 1) / p->tp : T, Tp = sp ? Ts * p->tp : T;
    const size_t xn = (size_t)Ts * c->dim; /* rows of x this rank holds */

    const int32_t *pos = b->pos + t0, *seq = b->seq + t0;
    if (!host) {
        CP_CHECK(cp_backend_copy(be, s->pos, pos, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
        CP_CHECK(cp_backend_copy(be, s->seq, seq, (size_t)T * 4, CP_COPY_HOST_TO_DEVICE));
        pos = s->pos;
        seq = s->seq;
    }

    const cp_rope_params rp = rope_params(m);
    cp_attn_params ap = attn_params(m, kv, b, T, seq, pos, tables);
    for (int t = 0; t < T; t++) {
        if (b->pos[t0 + t] + 1 > ap.n_ctx_max) ap.n_ctx_max = b->pos[t0 + t] + 1;
        if (t == 0 || b->seq[t0 + t] != b->seq[t0 + t - 1]) ap.n_seq_hint++; /* runs of a sequence */
    }

    CP_CHECK(stage_input(m, b->tokens + t0, T, Tp, Ts, sp));
    CP_CHECK(run_layers(m, kv, &ap, &rp, T, Tp, Ts, sp));
    if (!p->last_stage) {
        if (m->stage_only) {
            m->held = xn; /* cp_model_stage_send passes it on */
            return CP_OK;
        }
        CP_CHECK(act_send(m, s->x, xn, p->pp_rank + 1));
        return CP_OK;
    }

    /* gather the rows that want logits into xb, then norm + LM head; with
     * sequence parallelism the full sequence is all-gathered first */
    const float *xfull = s->x;
    if (sp && *logit_idx < b->n_logits && b->logit_rows[*logit_idx] < t0 + T) {
        CP_CHECK(act_allgather(m, s->x, s->xl, xn));
        xfull = s->xl;
    }
    int n;
    CP_CHECK(norm_logit_rows(m, b, t0, T, xfull, *logit_idx, &n));
    return head_rows(m, n, rs, logits, logit_idx);
}

/* One chunk under context parallelism (see cp_attention): this rank runs
 * the chunk's rows at its positions through the stage; on the last stage
 * the rows that want logits are shared over the cp group (each row comes
 * from its owner, an all-reduce of otherwise zero rows, exact), so every cp
 * rank computes the same logits or samples as without it. */
static cp_status forward_chunk_cp(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b,
                                  const int32_t *tables, int t0, int T, int *logit_idx, float *logits,
                                  const row_sampler *rs) {
    const cp_model_config *c = &m->cfg;
    const cp_plan *p = &m->plan;
    cp_scratch *s = &m->s;
    const int cp = p->cp, me = p->cp_rank;
    const size_t dim = (size_t)c->dim;
    CP_CHECK(cpx_reserve(m));
    choose_exchange(m, kv, b, t0, T);
    /* rows each rank owns, and those of them that pass queries */
    int *count = m->cpx.count, *qcount = count + cp, *fill = count + 2 * cp, *qfill = count + 3 * cp;
    memset(count, 0, 4 * (size_t)cp * sizeof(int));
    int n_ctx = 0;
    for (int t = 0; t < T; t++) {
        count[b->pos[t0 + t] % cp]++;
        qcount[b->pos[t0 + t] % cp] += !m->cpx.kvrow[t];
        if (b->pos[t0 + t] + 1 > n_ctx) n_ctx = b->pos[t0 + t] + 1;
    }
    int tmax = 0;
    for (int r = 0; r < cp; r++)
        if (qcount[r] > tmax) tmax = qcount[r];
    m->cpx.tmax = tmax;
    m->cpx.nk = m->cpx.nq = 0;
    for (int t = 0; t < T; t++) {
        const int r = b->pos[t0 + t] % cp, i = fill[r]++;
        m->cpx.lrow[t] = i;
        if (!m->cpx.kvrow[t]) {
            const int j = qfill[r]++;
            m->cpx.gpos[(size_t)r * tmax + j] = b->pos[t0 + t];
            m->cpx.gseq[(size_t)r * tmax + j] = b->seq[t0 + t];
        }
        if (r == me) {
            m->cpx.tok[i] = b->tokens[t0 + t];
            m->cpx.pos[i] = b->pos[t0 + t];
            m->cpx.seq[i] = b->seq[t0 + t];
            if (m->cpx.kvrow[t]) {
                m->cpx.kpos[m->cpx.nk] = b->pos[t0 + t];
                m->cpx.kseq[m->cpx.nk] = b->seq[t0 + t];
                m->cpx.kidx[m->cpx.nk++] = i;
            } else {
                m->cpx.qidx[m->cpx.nq++] = i;
            }
        }
    }
    /* padding rows: position 0 of a sequence of the chunk (attended, never used) */
    for (int r = 0; r < cp; r++)
        for (int j = qcount[r]; j < tmax; j++) {
            m->cpx.gpos[(size_t)r * tmax + j] = 0;
            m->cpx.gseq[(size_t)r * tmax + j] = b->seq[t0];
        }
    const int Tl = count[me];
    const bool sp = m->sp && Tl > 1;
    const int Ts = sp ? (Tl + p->tp - 1) / p->tp : Tl, Tp = sp ? Ts * p->tp : Tl;
    const size_t xn = (size_t)Ts * dim;

    const cp_rope_params rp = rope_params(m);
    cp_attn_params ap = attn_params(m, kv, b, Tl, m->cpx.seq, m->cpx.pos, tables);
    ap.n_ctx_max = n_ctx;
    for (int t = 0; t < Tl; t++)
        if (t == 0 || m->cpx.seq[t] != m->cpx.seq[t - 1]) ap.n_seq_hint++;

    if (Tl > 0) CP_CHECK(stage_input(m, m->cpx.tok, Tl, Tp, Ts, sp));
    CP_CHECK(run_layers(m, kv, &ap, &rp, Tl, Tp, Ts, sp));
    if (!p->last_stage) {
        if (Tl > 0) CP_CHECK(act_send(m, s->x, xn, p->pp_rank + 1));
        return CP_OK;
    }

    int n = 0, mine = 0;
    while (*logit_idx + n < b->n_logits && b->logit_rows[*logit_idx + n] < t0 + T) {
        mine += b->pos[b->logit_rows[*logit_idx + n]] % cp == me;
        n++;
    }
    if (n == 0) return CP_OK;
    const float *xfull = s->x;
    if (sp && mine > 0) {
        CP_CHECK(act_allgather(m, s->x, s->xl, xn));
        xfull = s->xl;
    }
    float *xg = m->cpx.xg;
    memset(xg, 0, (size_t)n * dim * sizeof(float));
    for (int i = 0; i < n; i++) {
        const int row = b->logit_rows[*logit_idx + i];
        if (b->pos[row] % cp == me)
            memcpy(xg + (size_t)i * dim, xfull + (size_t)m->cpx.lrow[row - t0] * dim, dim * sizeof(float));
    }
    CP_CHECK(cp_comm_allreduce(m->cp_comm, xg, xg, (size_t)n * dim, CP_DTYPE_F32, CP_REDUCE_SUM, NULL));
    CP_CHECK(cp_backend_rmsnorm(m->be, s->xb, xg, m->w.out_norm, n, c->dim, c->norm_eps));
    return head_rows(m, n, rs, logits, logit_idx);
}

/* Local top-k of row[0..n) as (value, global id = id0 + index) pairs, k
 * slots filled in descending value order (ties: lower id first); slots
 * beyond n hold -inf and id -1. */
static void local_top(const float *row, int n, int id0, int k, float *val, int32_t *id) {
    for (int j = 0; j < k; j++) {
        val[j] = -INFINITY;
        id[j] = -1;
    }
    for (int i = 0; i < n; i++) {
        float v = row[i];
        if (id[k - 1] >= 0 && !(v > val[k - 1])) continue;
        int j = k - 1;
        while (j > 0 && (id[j - 1] < 0 || v > val[j - 1])) {
            val[j] = val[j - 1];
            id[j] = id[j - 1];
            j--;
        }
        val[j] = v;
        id[j] = id0 + i;
    }
}

/* Samples one token per row of the normed hidden states in xb. A single
 * rank samples from its full logits. Across TP ranks each row is a
 * CP_TOP_SAMPLE row of top_rows: the ranks exchange candidates and their
 * slices' sums, not the vocabulary (see cp_model_forward_sample). */
static cp_status sample_rows(cp_model_t m, int n, const row_sampler *rs, int row0) {
    cp_backend_t be = m->be;
    const cp_model_config *c = &m->cfg;
    const cp_sample_params *sp = rs->sp;
    const int vocab = c->n_vocab;
    if (!m->tp_comm) {
        for (int i = 0; i < n; i += CP_LOGIT_CHUNK) {
            int k = n - i < CP_LOGIT_CHUNK ? n - i : CP_LOGIT_CHUNK;
            if (cp_backend_device(be) != CP_DEVICE_CPU) {
                /* logits stay on the device and are sampled there */
                CP_CHECK(cp_backend_matmul(be, &m->w.output, m->s.xb + (size_t)i * c->dim, k, m->logits, NULL));
                CP_CHECK(cp_backend_sample(be, m->logits, k, vocab, sp, rs->u + row0 + i, rs->out + row0 + i));
            } else {
                CP_CHECK(lm_head_rows(m, i, k, m->full));
                CP_CHECK(cp_backend_sample(be, m->full, k, vocab, sp, rs->u + row0 + i, rs->out + row0 + i));
            }
        }
        return CP_OK;
    }
    bool beyond; /* unused: top_rows samples every row here, as CP_TOP_SAMPLE */
    const int k = cp_logit_top_want(sp, vocab, &beyond);
    const size_t nk = (size_t)n * (size_t)k;
    if (nk > m->cand_cap || (size_t)n > m->cand_rows) {
        const size_t ck = nk > m->cand_cap ? nk : m->cand_cap;
        const size_t cr = (size_t)n > m->cand_rows ? (size_t)n : m->cand_rows;
        float *v = realloc(m->cand_v, ck * sizeof(float));
        if (v) m->cand_v = v;
        int32_t *id = realloc(m->cand_i, ck * sizeof(int32_t));
        if (id) m->cand_i = id;
        double *lse = realloc(m->cand_lse, cr * sizeof(double));
        if (lse) m->cand_lse = lse;
        float *lg = realloc(m->cand_logit, cr * sizeof(float));
        if (lg) m->cand_logit = lg;
        uint8_t *need = realloc(m->cand_need, cr);
        if (need) m->cand_need = need;
        cp_sample_params *p = realloc(m->cand_sp, cr * sizeof(*p));
        if (p) m->cand_sp = p;
        if (!v || !id || !lse || !lg || !need || !p)
            return CP_ERROR(CP_ERR_OOM, "out of memory for %d rows of %d candidates", n, k);
        m->cand_cap = ck;
        m->cand_rows = cr;
    }
    for (int i = 0; i < n; i++) {
        m->cand_need[i] = CP_TOP_SAMPLE;
        m->cand_sp[i] = *sp;
    }
    const cp_logit_top t = {.k = k,
                            .need = m->cand_need,
                            .val = m->cand_v,
                            .id = m->cand_i,
                            .lse = m->cand_lse,
                            .sp = m->cand_sp,
                            .u = rs->u + row0,
                            .tok = rs->out + row0,
                            .tok_logit = m->cand_logit};
    return top_rows(m, n, &t, 0, false);
}

int cp_logit_top_want(const cp_sample_params *sp, int vocab, bool *sample) {
    *sample = false;
    if (!(sp->temperature > 0)) return 1;
    if (sp->top_k > 0 && sp->top_k < vocab && sp->top_k < CP_MODEL_MAX_TOP) return sp->top_k + 1;
    *sample = true;
    return vocab < CP_MODEL_MAX_TOP ? vocab : CP_MODEL_MAX_TOP;
}

cp_status cp_logit_top_sample(const cp_logit_top *t, int row, const cp_sample_params *sp, float u, int32_t *tok) {
    const int K = t->k;
    const float *val = t->val + (size_t)row * K;
    const int32_t *id = t->id + (size_t)row * K;
    if (!(sp->temperature > 0)) {
        *tok = id[0]; /* the first largest logit, as greedy takes it */
        return CP_OK;
    }
    if (sp->top_k <= 0 || sp->top_k >= K)
        return CP_ERROR(CP_ERR_INVALID_ARG, "sampling with top_k %d needs more than %d candidates", sp->top_k, K);
    int have = 0;
    while (have <= sp->top_k && id[have] >= 0)
        have++;
    int ix[CP_MODEL_MAX_TOP]; /* candidate indices in id order */
    float l[CP_MODEL_MAX_TOP];
    for (int j = 0; j < have; j++) {
        int p = j;
        for (; p > 0 && id[ix[p - 1]] > id[j]; p--)
            ix[p] = ix[p - 1];
        ix[p] = j;
    }
    for (int j = 0; j < have; j++)
        l[j] = val[ix[j]];
    int32_t pick;
    CP_CHECK(cp_sample_host(l, 1, have, sp, &u, &pick));
    *tok = id[ix[pick]];
    return CP_OK;
}

/* ---- candidates instead of logits (cp_model_forward_top) ------------------
 * Per row, every rank finds its slice's k best (local_top) and, for rows
 * that want the log-sum-exp, the slice's max and sum of exp(l - max); one
 * all-gather of CP_LOGIT_CHUNK rows of these (CP_TOP_WORDS(k) words a row)
 * replaces gathering the vocabulary, and every rank merges the tp sorted
 * lists the same way. CP_TOP_SAMPLE rows add the slice's max and sum of
 * exp at their temperature and are sampled from what every rank then
 * holds alike (cand_pick), so every rank takes the same decisions: the
 * candidates settle most rows; plain temperature sampling beyond them
 * takes one more all-gather of a token per row (split_pick); a top-p,
 * min-p or top-k cut beyond them gathers those rows' logits. A chunk with a
 * CP_TOP_FULL row gathers its full rows at once (lm_head_rows) and every
 * rank searches them as one rank would. */

#define TOP_WORDS(k) CP_TOP_WORDS(k)
/* where a row's words after its k logits and k ids begin (CP_TOP_WORDS) */
#define PACK_LSE(k) (2 * (k))        /* (max, sum) at temperature 1 */
#define PACK_TEMP(k) (2 * (k) + 4)   /* (max, sum) at the row's temperature */
#define PACK_TARGET(k) (2 * (k) + 8) /* the target's logit, NaN off this slice */

static uint8_t top_need(const cp_logit_top *top, int row) {
    return top->need ? top->need[row] : 0;
}

/* max and sum of exp(l - max) of row[0..n), summed in id order in double */
static void slice_exp_sum(const float *row, int n, float *mx, double *se) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        if (row[i] > m) m = row[i];
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += exp((double)row[i] - m);
    *mx = m;
    *se = s;
}

/* max of z = l / t over row[0..n) and the sum of expf(z - max) in id order
 * in double: the terms cp_sample_ref adds up */
static void slice_exp_sum_t(const float *row, int n, float t, float *mx, double *se) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        if (row[i] / t > m) m = row[i] / t;
    double s = 0.0;
    if (m > -INFINITY)
        for (int i = 0; i < n; i++)
            s += expf(row[i] / t - m);
    *mx = m;
    *se = s;
}

/* Whether candidate (va, ia) ranks before (vb, ib): larger logit, then the
 * lower id. */
static bool top_before(float va, int32_t ia, float vb, int32_t ib) {
    return va > vb || (va == vb && ia < ib);
}

/* Writes a (max, sum) pair at p: f32, a zero pad word, f64. */
static void pack_put_sum(int32_t *p, float mx, double se) {
    memcpy(p, &mx, sizeof mx);
    p[1] = 0;
    memcpy(p + 2, &se, sizeof se);
}

/* The (max, sum) pair at word w of row j of rank r's pack. */
static void pack_sum(const int32_t *all, int kr, int r, int j, int k, int w, float *mx, double *se) {
    const int32_t *p = all + ((size_t)r * kr + j) * TOP_WORDS(k) + w;
    memcpy(mx, p, sizeof *mx);
    memcpy(se, p + 2, sizeof *se);
}

/* Each rank's share of row j's mass at word w, relative to the largest
 * slice max M (mass[r]); returns the sum over the ranks in rank order. */
static double rank_masses(const int32_t *all, int tp, int kr, int j, int k, int w, double *mass, float *M) {
    float mx[CP_MAX_TP];
    double se[CP_MAX_TP];
    *M = -INFINITY;
    for (int r = 0; r < tp; r++) {
        pack_sum(all, kr, r, j, k, w, &mx[r], &se[r]);
        if (mx[r] > *M) *M = mx[r];
    }
    double S = 0.0;
    for (int r = 0; r < tp; r++) {
        mass[r] = se[r] > 0 ? se[r] * exp((double)mx[r] - *M) : 0.0;
        S += mass[r];
    }
    return S;
}

/* Merges row j of every rank's packed candidates (all: [tp][kr][w] words)
 * into val/id (k slots) and the row's log-sum-exp into *lse. */
static void top_merge(const int32_t *all, int tp, int kr, int j, int k, float *val, int32_t *id,
                      double *lse) {
    const size_t w = TOP_WORDS(k);
    int at[CP_MAX_TP] = {0};
    for (int c = 0; c < k; c++) {
        int best = -1;
        float bv = 0;
        int32_t bi = 0;
        for (int r = 0; r < tp; r++) {
            const int32_t *p = all + ((size_t)r * kr + j) * w;
            if (at[r] >= k || p[k + at[r]] < 0) continue;
            float v;
            memcpy(&v, p + at[r], sizeof v);
            if (best < 0 || top_before(v, p[k + at[r]], bv, bi)) {
                best = r;
                bv = v;
                bi = p[k + at[r]];
            }
        }
        if (best < 0) {
            val[c] = -INFINITY;
            id[c] = -1;
            continue;
        }
        val[c] = bv;
        id[c] = bi;
        at[best]++;
    }
    if (!lse) return;
    double mass[CP_MAX_TP];
    float M;
    const double S = rank_masses(all, tp, kr, j, k, PACK_LSE(k), mass, &M);
    *lse = M + log(S);
}

enum { PICK_DONE, PICK_SPLIT, PICK_FULL };

/* A CP_TOP_SAMPLE row's token from its K candidates (val/id, as
 * cp_logit_top holds them) when they settle it: what cp_sample_ref picks
 * from the whole row of `vocab` logits. total: the row's sum of
 * expf(l / T - max) over the vocabulary (top-p needs it). PICK_SPLIT:
 * plain temperature sampling reaches beyond the candidates; PICK_FULL: a
 * top-p, min-p or top-k cut lies beyond them. */
static int cand_pick(const float *val, const int32_t *id, int K, int vocab, double total,
                     const cp_sample_params *sp, float u, int32_t *tok, float *logit) {
    if (!(sp->temperature > 0)) {
        *tok = id[0];
        *logit = val[0];
        return PICK_DONE;
    }
    if (sp->top_k > 0 && sp->top_k < vocab) {
        if (sp->top_k >= K) return PICK_FULL;
        const cp_logit_top t = {.k = K, .val = (float *)val, .id = (int32_t *)id};
        if (cp_logit_top_sample(&t, 0, sp, u, tok) != CP_OK) return PICK_FULL;
        for (int j = 0; j < K; j++)
            if (id[j] == *tok) *logit = val[j];
        return PICK_DONE;
    }
    int have = 0;
    while (have < K && id[have] >= 0)
        have++;
    if (have == 0) return PICK_FULL;
    /* the candidates in cp_sample_ref's order: scaled logit descending,
     * lower id first (distinct logits may scale to one value) */
    int ix[CP_MODEL_MAX_TOP];
    float z[CP_MODEL_MAX_TOP], prob[CP_MODEL_MAX_TOP];
    for (int j = 0; j < have; j++) {
        z[j] = val[j] / sp->temperature;
        int p = j;
        for (; p > 0 && (z[ix[p - 1]] < z[j] || (z[ix[p - 1]] == z[j] && id[ix[p - 1]] > id[j])); p--)
            ix[p] = ix[p - 1];
        ix[p] = j;
    }
    const float z0 = z[ix[0]];
    if (!(z0 > -INFINITY) || z0 == INFINITY) {
        *tok = id[ix[0]];
        *logit = val[ix[0]];
        return PICK_DONE;
    }
    for (int j = 0; j < have; j++)
        prob[j] = expf(z[ix[j]] - z0);
    const bool all = have >= vocab; /* the candidates are the whole row */
    int kept = have;
    bool known = all;
    if (sp->top_p < 1.0f) {
        double tot = total;
        if (all) {
            tot = 0.0;
            for (int j = 0; j < have; j++)
                tot += prob[j];
        }
        double cum = 0.0;
        for (int j = 0; j < have;) {
            cum += prob[j++];
            if (cum >= (double)sp->top_p * tot) {
                kept = j;
                known = true;
                break;
            }
        }
    }
    if (sp->min_p > 0.0f) {
        int j = 1;
        while (j < kept && prob[j] >= sp->min_p * prob[0])
            j++;
        if (j < kept || known) {
            kept = j;
            known = true;
        }
    }
    if (!known && (sp->top_p < 1.0f || sp->min_p > 0.0f)) return PICK_FULL;
    if (!known && total > 0 && total < INFINITY) return PICK_SPLIT;
    if (!known) kept = 1; /* the ranks' sums hold no distribution: the best */
    const int pick = cp_sample_walk(prob, kept, u);
    *tok = id[ix[pick]];
    *logit = val[ix[pick]];
    return PICK_DONE;
}

/* Plain temperature sampling of row j across the TP ranks: the rank whose
 * slice holds u's share of the row's mass (ranks in order, so in
 * vocabulary order) walks its slice in vocabulary order. Returns the
 * owning rank; on that rank *tok and *logit are set from row[0..vl). */
static int split_pick(cp_model_t m, const int32_t *all, int kr, int j, int k, const float *row, float t,
                      float u, int32_t *tok, float *logit) {
    const int tp = m->plan.tp, me = m->plan.tp_rank;
    double mass[CP_MAX_TP];
    float M;
    const double S = rank_masses(all, tp, kr, j, k, PACK_TEMP(k), mass, &M);
    const double target = (double)u * S;
    double before = 0.0;
    int owner = -1;
    for (int r = 0; r < tp; r++) {
        if (!(mass[r] > 0)) continue;
        owner = r;
        if (before + mass[r] > target) break;
        before += mass[r];
    }
    if (owner != me) return owner;
    /* the share in the slice's own scale, walked over the same terms */
    float mx;
    double se;
    pack_sum(all, kr, me, j, k, PACK_TEMP(k), &mx, &se);
    const double goal = (target - before) / exp((double)mx - M);
    double cum = 0.0;
    int pick = -1;
    for (int i = 0; i < m->vocab_l; i++) {
        const double e = expf(row[i] / t - mx);
        if (e > 0) pick = i;
        cum += e;
        if (e > 0 && cum > goal) break;
    }
    if (pick < 0) pick = 0;
    *tok = m->plan.vocab_begin + pick;
    *logit = row[pick];
    return owner;
}

/* One token from a full row, as one rank samples it (a backend on host
 * memory runs its own sampler, with the same choices). */
static cp_status sample_full(cp_model_t m, const float *row, const cp_sample_params *sp, float u, int32_t *tok,
                             float *logit) {
    const int vocab = m->cfg.n_vocab;
    if (cp_backend_device(m->be) == CP_DEVICE_CPU)
        CP_CHECK(cp_backend_sample(m->be, row, 1, vocab, sp, &u, tok));
    else
        CP_CHECK(cp_sample_host(row, 1, vocab, sp, &u, tok));
    *logit = row[*tok];
    return CP_OK;
}

/* The candidates (and full rows, log-sum-exps, sampled tokens) of the n
 * normed rows in xb, rows row0.. of top. ready: a single rank's device
 * already holds these rows' logits in m->logits (n <= CP_LOGIT_CHUNK). */
static cp_status top_rows(cp_model_t m, int n, const cp_logit_top *top, int row0, bool ready) {
    cp_backend_t be = m->be;
    const int vocab = m->cfg.n_vocab, vl = m->vocab_l, tp = m->plan.tp, k = top->k;
    const bool host = cp_backend_device(be) == CP_DEVICE_CPU;
    const size_t w = TOP_WORDS(k);
    for (int i = 0; i < n; i += CP_LOGIT_CHUNK) {
        const int kr = n - i < CP_LOGIT_CHUNK ? n - i : CP_LOGIT_CHUNK;
        bool full = !m->tp_comm;
        for (int j = 0; j < kr; j++)
            if (top_need(top, row0 + i + j) & CP_TOP_FULL) full = true;
        if (full) {
            /* whole rows on every rank, searched as one rank searches them */
            if (ready)
                CP_CHECK(cp_backend_copy(be, m->full, m->logits, (size_t)kr * vocab * sizeof(float),
                                         CP_COPY_DEVICE_TO_HOST));
            else
                CP_CHECK(lm_head_rows(m, i, kr, m->full));
            for (int j = 0; j < kr; j++) {
                const int r = row0 + i + j;
                const float *row = m->full + (size_t)j * vocab;
                local_top(row, vocab, 0, k, top->val + (size_t)r * k, top->id + (size_t)r * k);
                top->lse[r] = NAN;
                if (top_need(top, r) & CP_TOP_LSE) {
                    float mx;
                    double se;
                    slice_exp_sum(row, vocab, &mx, &se);
                    top->lse[r] = mx + log(se);
                }
                if (top_need(top, r) & CP_TOP_FULL)
                    memcpy(top->logits + (size_t)r * vocab, row, (size_t)vocab * sizeof(float));
                if (top_need(top, r) & CP_TOP_TARGET) top->target_logit[r] = row[top->target[r]];
                if (top_need(top, r) & CP_TOP_SAMPLE)
                    CP_CHECK(sample_full(m, row, &top->sp[r], top->u[r], &top->tok[r], &top->tok_logit[r]));
            }
            continue;
        }
        /* this rank's slices, then the candidates of every rank */
        CP_CHECK(cp_backend_matmul(be, &m->w.output, m->s.xb + (size_t)i * m->cfg.dim, kr, m->logits, NULL));
        const float *rows = m->logits;
        if (!host) {
            CP_CHECK(cp_backend_copy(be, m->gather, m->logits, (size_t)kr * vl * sizeof(float),
                                     CP_COPY_DEVICE_TO_HOST));
            rows = m->gather;
        }
        int32_t *pack = m->top_pack, *all = m->top_pack + (size_t)CP_LOGIT_CHUNK * TOP_WORDS(CP_MODEL_MAX_TOP);
        for (int j = 0; j < kr; j++) {
            const int r = row0 + i + j;
            int32_t *p = pack + (size_t)j * w;
            float v[CP_MODEL_MAX_TOP], mx = -INFINITY, mt = -INFINITY;
            double se = 0.0, st = 0.0;
            local_top(rows + (size_t)j * vl, vl, m->plan.vocab_begin, k, v, p + k);
            memcpy(p, v, (size_t)k * sizeof(float));
            if (top_need(top, r) & CP_TOP_LSE) slice_exp_sum(rows + (size_t)j * vl, vl, &mx, &se);
            if ((top_need(top, r) & CP_TOP_SAMPLE) && top->sp[r].temperature > 0)
                slice_exp_sum_t(rows + (size_t)j * vl, vl, top->sp[r].temperature, &mt, &st);
            pack_put_sum(p + PACK_LSE(k), mx, se);
            pack_put_sum(p + PACK_TEMP(k), mt, st);
            float tl = NAN;
            const int32_t want = (top_need(top, r) & CP_TOP_TARGET) ? top->target[r] - m->plan.vocab_begin : -1;
            if (want >= 0 && want < vl) tl = rows[(size_t)j * vl + want];
            memcpy(p + PACK_TARGET(k), &tl, sizeof tl);
        }
        CP_CHECK(cp_comm_allgather(m->tp_comm, pack, all, (size_t)kr * w, CP_DTYPE_I32, NULL));
        /* every rank merges and decides alike */
        uint8_t how[CP_LOGIT_CHUNK] = {0};
        bool split = false, refetch = false;
        for (int j = 0; j < kr; j++) {
            const int r = row0 + i + j;
            const uint8_t need = top_need(top, r);
            top->lse[r] = NAN;
            top_merge(all, tp, kr, j, k, top->val + (size_t)r * k, top->id + (size_t)r * k,
                      (need & CP_TOP_LSE) ? &top->lse[r] : NULL);
            if (need & CP_TOP_TARGET) {
                /* from the rank whose slice holds the token */
                int b0, b1, q = 0;
                for (; q < tp; q++) {
                    cp_plan_split(vocab, tp, q, 1, &b0, &b1);
                    if (top->target[r] < b1) break;
                }
                memcpy(&top->target_logit[r], all + ((size_t)(q < tp ? q : tp - 1) * kr + j) * w + PACK_TARGET(k),
                       sizeof(float));
            }
            if (!(need & CP_TOP_SAMPLE)) continue;
            double total = 0.0;
            if (top->sp[r].temperature > 0) {
                double mass[CP_MAX_TP];
                float M;
                total = rank_masses(all, tp, kr, j, k, PACK_TEMP(k), mass, &M);
            }
            float lg = NAN;
            how[j] = (uint8_t)cand_pick(top->val + (size_t)r * k, top->id + (size_t)r * k, k, vocab, total,
                                        &top->sp[r], top->u[r], &top->tok[r], &lg);
            if (how[j] == PICK_DONE) top->tok_logit[r] = lg;
            m->stats.sampled_from_candidates += how[j] == PICK_DONE;
            m->stats.sampled_by_owner += how[j] == PICK_SPLIT;
            m->stats.sampled_from_full_rows += how[j] == PICK_FULL;
            split |= how[j] == PICK_SPLIT;
            refetch |= how[j] == PICK_FULL;
        }
        if (split) {
            /* the owning rank's token of each such row; -1 from the others */
            for (int j = 0; j < kr; j++) {
                const int r = row0 + i + j;
                int32_t *p = pack + 2 * (size_t)j;
                p[0] = -1;
                p[1] = 0;
                if (how[j] != PICK_SPLIT) continue;
                int32_t tok;
                float lg;
                if (split_pick(m, all, kr, j, k, rows + (size_t)j * vl, top->sp[r].temperature, top->u[r], &tok,
                               &lg) == m->plan.tp_rank) {
                    p[0] = tok;
                    memcpy(&p[1], &lg, sizeof lg);
                }
            }
            CP_CHECK(cp_comm_allgather(m->tp_comm, pack, all, 2 * (size_t)kr, CP_DTYPE_I32, NULL));
            for (int j = 0; j < kr; j++) {
                if (how[j] != PICK_SPLIT) continue;
                const int r = row0 + i + j;
                top->tok[r] = -1;
                for (int q = 0; q < tp && top->tok[r] < 0; q++) {
                    const int32_t *p = all + ((size_t)q * kr + j) * 2;
                    if (p[0] < 0) continue;
                    float lg;
                    memcpy(&lg, &p[1], sizeof lg);
                    top->tok[r] = p[0];
                    top->tok_logit[r] = lg;
                }
                if (top->tok[r] < 0)
                    return CP_ERROR(CP_ERR_INTERNAL, "no tensor parallel rank sampled logit row %d", r);
            }
        }
        if (refetch) {
            /* a cut beyond the candidates: those rows' full logits (their
             * slices packed into m->full, gathered through m->gather, then
             * laid out in m->full) */
            int which[CP_LOGIT_CHUNK], nf = 0;
            for (int j = 0; j < kr; j++)
                if (how[j] == PICK_FULL) {
                    memcpy(m->full + (size_t)nf * vl, rows + (size_t)j * vl, (size_t)vl * sizeof(float));
                    which[nf++] = j;
                }
            CP_CHECK(gather_slices(m, m->full, nf, m->full));
            for (int f = 0; f < nf; f++) {
                const int r = row0 + i + which[f];
                CP_CHECK(sample_full(m, m->full + (size_t)f * vocab, &top->sp[r], top->u[r], &top->tok[r],
                                     &top->tok_logit[r]));
            }
        }
    }
    return CP_OK;
}

/* ---- decode steps as recorded graphs --------------------------------------
 * A decode-shaped batch (one new token for each of up to CP_DECODE_MAX_TOK
 * distinct sequences) on a single device rank runs as one bracketed step of
 * the backend (cp_backend_graph_begin/end): the CUDA backend records it
 * once and then replays ~10 launches per layer as one graph launch. What
 * the step reads from the host goes up first in one copy into fixed places
 * of the token area s->tokens ([max_batch] ints): ids at 0, positions at
 * CP_DECODE_MAX_TOK, sequences at 2 x CP_DECODE_MAX_TOK and the block
 * tables after them when they fit (else the device copy m->tables). Every
 * address and every host value that sizes a launch is in the step's key. */

#define CP_DECODE_MAX_TOK 64
#define DEC_IDS 0
#define DEC_POS CP_DECODE_MAX_TOK
#define DEC_SEQ (2 * CP_DECODE_MAX_TOK)
#define DEC_TABLES (3 * CP_DECODE_MAX_TOK)

static bool decode_shaped(cp_model_t m, const cp_batch *b) {
    if (cp_backend_device(m->be) == CP_DEVICE_CPU || m->tp_comm || m->pp_comm || m->cp_comm ||
        m->plan.tp != 1 || m->plan.pp != 1)
        return false; /* communicator calls cannot be recorded */
    if (b->n_tok < 1 || b->n_tok > CP_DECODE_MAX_TOK || b->n_tok > m->max_batch ||
        m->max_batch < DEC_TABLES)
        return false;
    for (int t = 1; t < b->n_tok; t++)
        for (int u = 0; u < t; u++)
            if (b->seq[u] == b->seq[t]) return false; /* a prompt chunk */
    return true;
}

/* The context length that sizes the attention launch: max(pos) + 1 rounded
 * up to a multiple of 256 below 2048 and to a quarter of the power of two
 * above (2560, 3072, ...), so that one recording serves many steps and at
 * most a quarter of the context splits are idle (the kernel reads each
 * token's true length from its position); never beyond cap, the table's
 * slots. */
static int ctx_bucket(int n, int cap) {
    int step = 256;
    while ((int64_t)step * 8 <= n) step *= 2;
    int64_t r = ((int64_t)n + step - 1) / step * step;
    return r < cap ? (int)r : cap;
}

static uint64_t key_mix(uint64_t h, uint64_t v) {
    /* splitmix64 finaliser over the running hash */
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

/* The recorded part of a decode step: embedding, every layer, the final
 * norm of the logit rows and, when they fit one LM-head chunk (head), the
 * LM head into m->logits. Device work only: no copy to or from the host. */
static cp_status decode_ops(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b,
                            const cp_attn_params *ap, const cp_rope_params *rp, bool head) {
    cp_scratch *s = &m->s;
    const int T = b->n_tok;
    CP_CHECK(cp_backend_embed(m->be, &m->w.tok_embd, s->tokens + DEC_IDS, T, s->x));
    CP_CHECK(run_layers(m, kv, ap, rp, T, T, T, false));
    int n;
    CP_CHECK(norm_logit_rows(m, b, 0, T, s->x, 0, &n));
    if (head) CP_CHECK(cp_backend_matmul(m->be, &m->w.output, s->xb, n, m->logits, NULL));
    return CP_OK;
}

static cp_status forward_decode(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, float *logits,
                                const row_sampler *rs) {
    cp_backend_t be = m->be;
    const int T = b->n_tok, n = b->n_logits, vocab = m->cfg.n_vocab;
    /* the upload: ids, positions, sequences (and block tables) in one copy;
     * the unused slots between the fields go up too (zeros, under 1 KB) */
    int32_t *h = m->ids_host; /* [max_batch] host */
    for (int t = 0; t < CP_DECODE_MAX_TOK; t++) {
        h[DEC_IDS + t] = t < T ? b->tokens[t] : 0;
        h[DEC_POS + t] = t < T ? b->pos[t] : 0;
        h[DEC_SEQ + t] = t < T ? b->seq[t] : 0;
    }
    const size_t tab = (size_t)b->n_seq * (size_t)b->max_blocks;
    size_t n_up = (size_t)DEC_SEQ + (size_t)T;
    const int32_t *tables;
    if ((size_t)DEC_TABLES + tab <= (size_t)m->max_batch) {
        memcpy(h + DEC_TABLES, b->block_tables, tab * sizeof(int32_t));
        n_up = (size_t)DEC_TABLES + tab;
        tables = m->s.tokens + DEC_TABLES;
    } else {
        CP_CHECK(upload_tables(m, b, &tables));
    }
    CP_CHECK(cp_backend_copy(be, m->s.tokens, h, n_up * sizeof(int32_t), CP_COPY_HOST_TO_DEVICE));

    const cp_rope_params rp = rope_params(m);
    cp_attn_params ap =
        attn_params(m, kv, b, T, m->s.tokens + DEC_SEQ, m->s.tokens + DEC_POS, tables);
    int n_ctx = 0;
    for (int t = 0; t < T; t++)
        if (b->pos[t] + 1 > n_ctx) n_ctx = b->pos[t] + 1;
    /* bucketed whether or not the backend records graphs, so that both give
     * the same numbers */
    ap.n_ctx_max = ctx_bucket(n_ctx, b->max_blocks * kv->block_size);
    ap.n_seq_hint = T;
    const bool head = n > 0 && n <= CP_LOGIT_CHUNK;

    /* the key: every address the step touches that can differ between
     * models, caches and tables, and every host value that shapes it
     * (whether the rows are sampled or returned happens after the
     * recording, so both share it) */
    uint64_t key = key_mix(0x63705f6465636f64ull, (uint64_t)(uintptr_t)m);
    key = key_mix(key, (uint64_t)(uintptr_t)kv);
    key = key_mix(key, (uint64_t)(uintptr_t)kv->mem);
    key = key_mix(key, (uint64_t)(uintptr_t)m->scratch);
    key = key_mix(key, (uint64_t)(uintptr_t)m->logits);
    key = key_mix(key, (uint64_t)(uintptr_t)tables);
    key = key_mix(key, (uint64_t)T);
    key = key_mix(key, (uint64_t)b->n_seq);
    key = key_mix(key, (uint64_t)b->max_blocks);
    key = key_mix(key, (uint64_t)kv->block_size);
    key = key_mix(key, (uint64_t)kv->dtype);
    key = key_mix(key, (uint64_t)ap.n_ctx_max);
    key = key_mix(key, (uint64_t)n);
    key = key_mix(key, (uint64_t)head);
    for (int i = 0; i < n; i++) key = key_mix(key, (uint64_t)b->logit_rows[i]);

    bool replay = false, reissue = false;
    CP_CHECK(cp_backend_graph_begin(be, key, &replay));
    cp_status st = replay ? CP_OK : decode_ops(m, kv, b, &ap, &rp, head);
    const cp_status end = cp_backend_graph_end(be, st != CP_OK, &reissue);
    if (reissue) st = decode_ops(m, kv, b, &ap, &rp, head); /* the recording was dropped */
    CP_CHECK(st);
    CP_CHECK(end);

    if (n == 0) return CP_OK;
    if (rs && rs->top) return top_rows(m, n, rs->top, 0, head);
    if (head)
        return rs ? cp_backend_sample(be, m->logits, n, vocab, rs->sp, rs->u, rs->out)
                  : cp_backend_copy(be, logits, m->logits, (size_t)n * vocab * sizeof(float),
                                    CP_COPY_DEVICE_TO_HOST);
    return rs ? sample_rows(m, n, rs, 0) : lm_head(m, n, logits);
}

static cp_status run_forward(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, float *logits,
                             const row_sampler *rs) {
    if (!m || !kv || !b) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward: NULL argument");
    if (kv->model != m) return CP_ERROR(CP_ERR_INVALID_ARG, "KV cache belongs to another model");
    CP_CHECK(check_batch(m, kv, b));
    if (b->n_tok == 0) return CP_OK;
    if (decode_shaped(m, b)) {
        CP_CHECK(forward_decode(m, kv, b, logits, rs));
        return cp_backend_synchronize(m->be);
    }
    const int32_t *tables;
    CP_CHECK(upload_tables(m, b, &tables));
    /* Chunks of at most max_batch tokens; across pipeline stages smaller
     * micro-batches, so that stage s works on chunk i while stage s+1 works
     * on chunk i-1 (later chunks attend to the earlier ones' keys, which
     * each stage has stored by then). Every rank cuts the same chunks. */
    int chunk = m->max_batch;
    if (m->plan.pp > 1 && m->pp_micro > 1 && !m->stage_only) {
        int want = (b->n_tok + m->pp_micro - 1) / m->pp_micro;
        if (want < 16) want = 16;
        if (want < chunk) chunk = want;
    }
    int logit_idx = 0;
    for (int t0 = 0; t0 < b->n_tok; t0 += chunk) {
        int T = b->n_tok - t0 < chunk ? b->n_tok - t0 : chunk;
        if (m->cp_comm)
            CP_CHECK(forward_chunk_cp(m, kv, b, tables, t0, T, &logit_idx, logits, rs));
        else
            CP_CHECK(forward_chunk(m, kv, b, tables, t0, T, &logit_idx, logits, rs));
    }
    return cp_backend_synchronize(m->be);
}

cp_status cp_model_forward(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, float *logits) {
    if (b && b->n_logits > 0 && !logits) return CP_ERROR(CP_ERR_INVALID_ARG, "logits buffer is NULL");
    CP_CHECK(run_forward(m, kv, b, logits, NULL));
    /* the last stage has the logits; every rank of the pipeline gets them */
    if (m->pp_comm && b->n_logits > 0)
        CP_CHECK(cp_comm_bcast(m->pp_comm, logits, (size_t)b->n_logits * m->cfg.n_vocab, CP_DTYPE_F32,
                               m->plan.pp - 1, NULL));
    return CP_OK;
}

/* The CP_TOP_* bits any of b's logit rows asks for. */
static uint8_t needs_of(const cp_batch *b, const cp_logit_top *out) {
    uint8_t any = 0;
    for (int i = 0; out->need && i < b->n_logits; i++) any |= out->need[i];
    return any;
}

/* The outputs of cp_model_forward_top for b, which asks for `any`
 * (needs_of). */
static cp_status check_top(const cp_batch *b, const cp_logit_top *out, const char *fn, int vocab, uint8_t any) {
    if (out->k < 1 || out->k > CP_MODEL_MAX_TOP)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s: k = %d is outside 1..%d", fn, out->k, CP_MODEL_MAX_TOP);
    if (b->n_logits > 0 && (!out->val || !out->id || !out->lse || ((any & CP_TOP_FULL) && !out->logits) ||
                            ((any & CP_TOP_SAMPLE) && (!out->sp || !out->u || !out->tok || !out->tok_logit)) ||
                            ((any & CP_TOP_TARGET) && (!out->target || !out->target_logit))))
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s: NULL output buffer", fn);
    for (int i = 0; (any & CP_TOP_TARGET) && i < b->n_logits; i++)
        if ((out->need[i] & CP_TOP_TARGET) && (out->target[i] < 0 || out->target[i] >= vocab))
            return CP_ERROR(CP_ERR_INVALID_ARG, "%s: target token %d of logit row %d is outside the vocabulary of %d",
                            fn, out->target[i], i, vocab);
    return CP_OK;
}

cp_status cp_model_forward_top(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, const cp_logit_top *out) {
    if (!out || !b) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward_top: NULL argument");
    const uint8_t any = needs_of(b, out);
    CP_CHECK(check_top(b, out, "cp_model_forward_top", m->cfg.n_vocab, any));
    row_sampler rs = {.top = out};
    CP_CHECK(run_forward(m, kv, b, NULL, &rs));
    /* the last stage has the candidates; every stage gets them */
    if (m->pp_comm && b->n_logits > 0) {
        const int root = m->plan.pp - 1;
        const size_t n = (size_t)b->n_logits * (size_t)out->k;
        CP_CHECK(cp_comm_bcast(m->pp_comm, out->val, n, CP_DTYPE_F32, root, NULL));
        CP_CHECK(cp_comm_bcast(m->pp_comm, out->id, n, CP_DTYPE_I32, root, NULL));
        CP_CHECK(cp_comm_bcast(m->pp_comm, out->lse, (size_t)b->n_logits, CP_DTYPE_F64, root, NULL));
        for (int i = 0; (any & CP_TOP_FULL) && i < b->n_logits; i++)
            if (out->need[i] & CP_TOP_FULL)
                CP_CHECK(cp_comm_bcast(m->pp_comm, out->logits + (size_t)i * m->cfg.n_vocab,
                                       (size_t)m->cfg.n_vocab, CP_DTYPE_F32, root, NULL));
        if (any & CP_TOP_SAMPLE) {
            CP_CHECK(cp_comm_bcast(m->pp_comm, out->tok, (size_t)b->n_logits, CP_DTYPE_I32, root, NULL));
            CP_CHECK(cp_comm_bcast(m->pp_comm, out->tok_logit, (size_t)b->n_logits, CP_DTYPE_F32, root, NULL));
        }
        if (any & CP_TOP_TARGET)
            CP_CHECK(cp_comm_bcast(m->pp_comm, out->target_logit, (size_t)b->n_logits, CP_DTYPE_F32, root, NULL));
    }
    return CP_OK;
}

cp_status cp_model_forward_stage(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, const cp_logit_top *out) {
    if (!m || !b || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward_stage: NULL argument");
    if (m->cp_comm)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "pipelined steps do not combine with context parallelism");
    if (b->n_tok > m->max_batch)
        return CP_ERROR(CP_ERR_INVALID_ARG, "a pipelined step of %d tokens exceeds the model's chunk of %d",
                        b->n_tok, m->max_batch);
    if (m->held)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward_stage: the previous step's output was not sent");
    const uint8_t any = needs_of(b, out);
    if (any & CP_TOP_TARGET)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward_stage: pipelined steps do not pass target logits on");
    if (m->plan.last_stage) CP_CHECK(check_top(b, out, "cp_model_forward_stage", m->cfg.n_vocab, any));
    row_sampler rs = {.top = out};
    m->stage_only = true;
    cp_status st = run_forward(m, kv, b, NULL, &rs);
    m->stage_only = false;
    if (st != CP_OK) m->held = 0;
    return st;
}

cp_status cp_model_stage_send(cp_model_t m) {
    if (!m) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_stage_send: NULL model");
    const size_t n = m->held;
    m->held = 0;
    if (n == 0 || m->plan.last_stage) return CP_OK;
    return act_send(m, m->s.x, n, m->plan.pp_rank + 1);
}

cp_status cp_model_forward_sample(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, const cp_sample_params *sp,
                                  const float *u, int32_t *tokens) {
    if (!sp || (b && b->n_logits > 0 && (!u || !tokens)))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_forward_sample: NULL argument");
    row_sampler rs = {sp, u, tokens, NULL};
    CP_CHECK(run_forward(m, kv, b, NULL, &rs));
    /* only token ids cross the pipeline */
    if (m->pp_comm && b->n_logits > 0)
        CP_CHECK(cp_comm_bcast(m->pp_comm, tokens, (size_t)b->n_logits, CP_DTYPE_I32, m->plan.pp - 1, NULL));
    return CP_OK;
}
