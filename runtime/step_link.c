/* step_link.c - rank 0 broadcasts each serving step's batch descriptor to
 * the follower ranks, which run the same forward pass (see cp_step_link.h).
 *
 * Wire format, per message: a header of HDR_N int64 broadcast from rank 0,
 *   {magic, command, seqno, n_tok, n_seq, max_blocks, n_logits, flag}
 * (flag: a step's candidates per row, cp_logit_top.k; a stop's failure)
 * then, for a step, one int32 body
 *   tokens[n_tok] pos[n_tok] seq[n_tok] block_tables[n_seq * max_blocks]
 *   logit_rows[n_logits] need[n_logits] (cp_logit_top.need)
 *   sample[n_logits][5] (each row's temperature, top_k, top_p, min_p and
 *   uniform, the floats as their bits; zeros for rows not CP_TOP_SAMPLE).
 *
 * Pipelined (pp > 1): the descriptor travels with the hidden states
 * instead. Rank 0 broadcasts it over its stage's TP group; every rank of a
 * stage before the last sends it, then its stage's output, to the same TP
 * rank of the next stage once the stage is computed; the last stage's TP
 * rank 0 sends the step's candidates to rank 0:
 *   val[n_logits * k] (f32) id[n_logits * k] (i32) lse[n_logits] (f64)
 *   then each CP_TOP_FULL row's logits (f32), then, when a row is
 *   CP_TOP_SAMPLE, tok[n_logits] (i32) and tok_logit[n_logits] (f32).
 * So rank 0 can start the next step while later stages still work on the
 * earlier ones. Everything flows from stage to stage in step order except
 * the candidates, and rank 0 takes the oldest step's candidates before it
 * sends a new step on when `depth` steps would otherwise be in flight:
 * the next stage can take the new step only after the last stage passed
 * on the oldest, so no rank ever waits on one that waits for it. */
#include "cp_step_link.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cp_comm.h"
#include "cp_plan.h"

enum { CMD_STEP = 1, CMD_HEARTBEAT = 2, CMD_STOP = 3 };
enum { HDR_N = 8 };
#define LINK_MAGIC 0x6370737465706c6bLL /* "cpsteplk" */

/* A step rank 0 started whose candidates have not been taken. */
typedef struct inflight {
    const cp_logit_top *out;
    int n_logits;
    bool got; /* received already (to make room for a newer step) */
} inflight;

struct cp_step_link {
    cp_comm_t world;
    /* pipelined: the stage's TP group (NULL when tp = 1) and the group of
     * the same TP rank across stages (ordered by stage) */
    cp_comm_t stage, pipe;
    bool piped;
    int pp, pp_rank, tp_rank;
    inflight q[CP_STEP_LINK_MAX_DEPTH]; /* rank 0: oldest first from q_head */
    int q_head, q_n;
    cp_model_t model;
    cp_kv_cache_t kv;
    int rank, size;
    int64_t seqno;
    double last_send;
    int32_t *body; /* followers: received descriptor; rank 0: packed one */
    size_t body_cap;
    /* followers: what every rank receives of the logit rows */
    float *logits; /* [n_logits][n_vocab] when a row wants its full logits */
    size_t logits_cap;
    float *val;
    int32_t *id;
    double *lse;
    uint8_t *need;
    cp_sample_params *sp;
    float *u, *tok_logit;
    int32_t *tok;
    size_t val_cap, id_cap, lse_cap, need_cap, sp_cap, u_cap, tok_cap, tok_logit_cap; /* elements */
    cp_status broken; /* CP_OK, or the error that broke the link */
    char broken_msg[256];
    cp_step_link_stats stats;
};

cp_status cp_step_link_init(cp_comm_t world, cp_model_t m, cp_kv_cache_t kv, bool pipelined,
                            cp_step_link_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_init: out is NULL");
    *out = NULL;
    if (!world || !m || !kv)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_init: NULL communicator, model or cache");
    cp_step_link_t l = calloc(1, sizeof(*l));
    if (!l) return CP_ERROR(CP_ERR_OOM, "out of memory for the step link");
    l->world = world;
    l->model = m;
    l->kv = kv;
    l->rank = cp_comm_rank(world);
    l->size = cp_comm_size(world);
    /* every rank must address the same blocks: compare the cache sizes */
    const int64_t blocks = cp_kv_cache_n_blocks(kv);
    int64_t lo, hi;
    bool same;
    cp_status st = cp_comm_same_i64(world, &blocks, 1, &lo, &hi, &same);
    if (st != CP_OK) {
        free(l);
        return st;
    }
    if (!same) {
        free(l);
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the ranks' KV caches differ (%lld to %lld blocks): start every rank with "
                        "the same --ctx-size, --max-running and --kv-f32",
                        (long long)lo, (long long)hi);
    }
    const cp_plan *p = cp_model_get_plan(m);
    l->pp = p->pp;
    l->pp_rank = p->pp_rank;
    l->tp_rank = p->tp_rank;
    l->piped = pipelined && p->pp > 1 && p->cp <= 1 && p->pp <= CP_STEP_LINK_MAX_DEPTH &&
               l->size == p->pp * p->tp;
    if (l->piped) {
        st = cp_comm_split(world, p->pp_rank, l->rank, &l->stage);
        if (st == CP_OK) st = cp_comm_split(world, p->tp_rank, l->rank, &l->pipe);
        if (st != CP_OK) {
            cp_step_link_free(l);
            return st;
        }
        if (p->tp == 1) {
            cp_comm_free(l->stage);
            l->stage = NULL;
        }
    }
    l->last_send = cp_time_now();
    *out = l;
    return CP_OK;
}

int cp_step_link_depth(cp_step_link_t l) { return l && l->piped ? l->pp : 1; }

void cp_step_link_free(cp_step_link_t l) {
    if (!l) return;
    cp_comm_free(l->stage);
    cp_comm_free(l->pipe);
    free(l->body);
    free(l->logits);
    free(l->val);
    free(l->id);
    free(l->lse);
    free(l->need);
    free(l->sp);
    free(l->u);
    free(l->tok);
    free(l->tok_logit);
    free(l);
}

void cp_step_link_get_stats(cp_step_link_t l, cp_step_link_stats *st) {
    if (l && st) *st = l->stats;
}

/* Grows the buffer whose pointer variable is at slot (any object pointer
 * type, read and written through memcpy) to n elements of size sz; cap
 * counts elements; what names them in the error. */
static cp_status grow(void *slot, size_t *cap, size_t n, size_t sz, const char *what) {
    if (n <= *cap) return CP_OK;
    void *p;
    memcpy(&p, slot, sizeof p);
    p = realloc(p, n * sz);
    if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory for %zu %s", n, what);
    memcpy(slot, &p, sizeof p);
    *cap = n;
    return CP_OK;
}

static cp_status reserve_body(cp_step_link_t l, size_t n) {
    return grow(&l->body, &l->body_cap, n, sizeof(*l->body), "ids of a step descriptor");
}

/* Remembers the first communication failure: the ranks can no longer agree
 * on what runs next, so every later call fails with it. */
static cp_status brk(cp_step_link_t l, cp_status st) {
    if (l->broken == CP_OK) {
        l->broken = st;
        snprintf(l->broken_msg, sizeof(l->broken_msg), "%s", cp_last_error());
    }
    return st;
}

static cp_status check_broken(cp_step_link_t l) {
    if (l->broken == CP_OK) return CP_OK;
    return CP_ERROR(l->broken, "the ranks lost step with each other: %s", l->broken_msg);
}

static void make_header(cp_step_link_t l, int64_t *h, int64_t cmd, const cp_batch *b, int64_t flag) {
    const int64_t v[HDR_N] = {LINK_MAGIC, cmd, ++l->seqno, 0, 0, 0, 0, flag};
    memcpy(h, v, sizeof v);
    if (b) {
        h[3] = b->n_tok;
        h[4] = b->n_seq;
        h[5] = b->max_blocks;
        h[6] = b->n_logits;
    }
}

/* Pipelined: the header (and a step's body of n ids) to the same TP rank
 * of the next stage. */
static cp_status pass_on(cp_step_link_t l, const int64_t *h, const int32_t *body, size_t n) {
    if (l->pp_rank + 1 >= l->pp) return CP_OK;
    cp_status st = cp_comm_send(l->pipe, h, HDR_N, CP_DTYPE_I64, l->pp_rank + 1, NULL);
    if (st == CP_OK && body) st = cp_comm_send(l->pipe, body, n, CP_DTYPE_I32, l->pp_rank + 1, NULL);
    return st;
}

/* Rank 0: a command without a body to every rank. */
static cp_status send_command(cp_step_link_t l, int64_t cmd, int64_t flag) {
    int64_t h[HDR_N];
    make_header(l, h, cmd, NULL, flag);
    cp_status st;
    if (!l->piped) {
        st = cp_comm_bcast(l->world, h, HDR_N, CP_DTYPE_I64, 0, NULL);
    } else {
        st = l->stage ? cp_comm_bcast(l->stage, h, HDR_N, CP_DTYPE_I64, 0, NULL) : CP_OK;
        if (st == CP_OK) st = pass_on(l, h, NULL, 0);
    }
    l->last_send = cp_time_now();
    return st;
}

enum { SAMPLE_WORDS = 5 };

static size_t body_len(int64_t n_tok, int64_t n_seq, int64_t max_blocks, int64_t n_logits) {
    return (size_t)(3 * n_tok + n_seq * max_blocks + (2 + SAMPLE_WORDS) * n_logits);
}

/* A follower's output buffers for n_logits rows of k candidates. */
static cp_status reserve_top(cp_step_link_t l, size_t n_logits, int k, bool full, size_t vocab) {
    const size_t nk = n_logits * (size_t)k;
    CP_CHECK(grow(&l->val, &l->val_cap, nk, sizeof(float), "logit outputs"));
    CP_CHECK(grow(&l->id, &l->id_cap, nk, sizeof(int32_t), "logit outputs"));
    CP_CHECK(grow(&l->lse, &l->lse_cap, n_logits, sizeof(double), "logit outputs"));
    CP_CHECK(grow(&l->need, &l->need_cap, n_logits, 1, "logit outputs"));
    CP_CHECK(grow(&l->sp, &l->sp_cap, n_logits, sizeof(cp_sample_params), "logit outputs"));
    CP_CHECK(grow(&l->u, &l->u_cap, n_logits, sizeof(float), "logit outputs"));
    CP_CHECK(grow(&l->tok, &l->tok_cap, n_logits, sizeof(int32_t), "logit outputs"));
    CP_CHECK(grow(&l->tok_logit, &l->tok_logit_cap, n_logits, sizeof(float), "logit outputs"));
    if (full) CP_CHECK(grow(&l->logits, &l->logits_cap, n_logits * vocab, sizeof(float), "logit outputs"));
    return CP_OK;
}

static cp_status move(cp_comm_t c, bool send, void *buf, size_t n, cp_dtype dt, int peer) {
    return send ? cp_comm_send(c, buf, n, dt, peer, NULL) : cp_comm_recv(c, buf, n, dt, peer, NULL);
}

/* Pipelined, the last stage's TP rank 0: a step's candidates to rank 0;
 * rank 0: receives them (the order of the messages is the wire format's). */
static cp_status move_results(cp_step_link_t l, const cp_logit_top *out, int n_logits, bool send) {
    const size_t nk = (size_t)n_logits * (size_t)out->k, V = (size_t)cp_model_get_config(l->model)->n_vocab;
    const int peer = send ? 0 : l->pp - 1;
    if (n_logits == 0) return CP_OK;
    CP_CHECK(move(l->pipe, send, out->val, nk, CP_DTYPE_F32, peer));
    CP_CHECK(move(l->pipe, send, out->id, nk, CP_DTYPE_I32, peer));
    CP_CHECK(move(l->pipe, send, out->lse, (size_t)n_logits, CP_DTYPE_F64, peer));
    bool sampled = false;
    for (int i = 0; out->need && i < n_logits; i++) {
        if (out->need[i] & CP_TOP_FULL) CP_CHECK(move(l->pipe, send, out->logits + (size_t)i * V, V, CP_DTYPE_F32, peer));
        sampled |= (out->need[i] & CP_TOP_SAMPLE) != 0;
    }
    if (sampled) {
        CP_CHECK(move(l->pipe, send, out->tok, (size_t)n_logits, CP_DTYPE_I32, peer));
        CP_CHECK(move(l->pipe, send, out->tok_logit, (size_t)n_logits, CP_DTYPE_F32, peer));
    }
    return CP_OK;
}

/* Rank 0, pipelined: the candidates of the oldest step in flight. */
static cp_status take_oldest(cp_step_link_t l) {
    inflight *f = &l->q[l->q_head];
    if (f->got) return CP_OK;
    cp_status st = move_results(l, f->out, f->n_logits, false);
    if (st != CP_OK)
        return brk(l, CP_ERROR(st, "no result of a pipelined step from the last stage (rank %d) in time: %s",
                               (int)(l->size - l->size / l->pp), cp_last_error()));
    f->got = true;
    return CP_OK;
}

/* Rank 0, pipelined: the body of n ids is packed. */
static cp_status forward_piped(cp_step_link_t l, const cp_batch *b, const cp_logit_top *out, size_t n, double t0) {
    if (l->q_n >= l->pp)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_forward: %d steps in flight already", l->q_n);
    int64_t h[HDR_N];
    make_header(l, h, CMD_STEP, b, out->k);
    cp_status st = CP_OK;
    if (l->stage) {
        st = cp_comm_bcast(l->stage, h, HDR_N, CP_DTYPE_I64, 0, NULL);
        if (st == CP_OK) st = cp_comm_bcast(l->stage, l->body, n, CP_DTYPE_I32, 0, NULL);
    }
    l->last_send = cp_time_now();
    if (st != CP_OK) return brk(l, st);
    l->stats.bcast_s += cp_time_now() - t0;
    l->stats.steps++;
    st = cp_model_forward_stage(l->model, l->kv, b, out);
    if (st != CP_OK) return st == CP_ERR_INVALID_ARG ? st : brk(l, st); /* as on every rank of the stage */
    /* with `pp` steps in flight the next stage takes this one only after
     * the last stage passed on the oldest */
    if (l->q_n == l->pp - 1) CP_CHECK(take_oldest(l));
    t0 = cp_time_now();
    st = pass_on(l, h, l->body, n);
    l->stats.bcast_s += cp_time_now() - t0;
    if (st == CP_OK) st = cp_model_stage_send(l->model);
    if (st != CP_OK) return brk(l, st);
    const int tail = (l->q_head + l->q_n) % CP_STEP_LINK_MAX_DEPTH;
    l->q[tail] = (inflight){.out = out, .n_logits = b->n_logits, .got = false};
    l->q_n++;
    return CP_OK;
}

cp_status cp_step_link_forward(void *link, const cp_batch *b, const cp_logit_top *out) {
    cp_step_link_t l = link;
    if (!l || !b || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_forward: NULL argument");
    CP_CHECK(check_broken(l));
    if (l->rank != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_forward runs on rank 0 only");
    for (int i = 0; out->need && i < b->n_logits; i++)
        if (out->need[i] & CP_TOP_TARGET)
            return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_forward: the step link does not carry target tokens");
    if (l->size > 1) {
        double t0 = cp_time_now();
        size_t n = body_len(b->n_tok, b->n_seq, b->max_blocks, b->n_logits);
        CP_CHECK(reserve_body(l, n));
        int32_t *p = l->body;
        memcpy(p, b->tokens, (size_t)b->n_tok * 4);
        p += b->n_tok;
        memcpy(p, b->pos, (size_t)b->n_tok * 4);
        p += b->n_tok;
        memcpy(p, b->seq, (size_t)b->n_tok * 4);
        p += b->n_tok;
        memcpy(p, b->block_tables, (size_t)b->n_seq * (size_t)b->max_blocks * 4);
        p += (size_t)b->n_seq * (size_t)b->max_blocks;
        if (b->n_logits) memcpy(p, b->logit_rows, (size_t)b->n_logits * 4);
        p += b->n_logits;
        for (int i = 0; i < b->n_logits; i++)
            p[i] = out->need ? out->need[i] : 0;
        p += b->n_logits;
        for (int i = 0; i < b->n_logits; i++, p += SAMPLE_WORDS) {
            memset(p, 0, SAMPLE_WORDS * sizeof(*p));
            if (!out->need || !(out->need[i] & CP_TOP_SAMPLE)) continue;
            const cp_sample_params *sp = &out->sp[i];
            memcpy(&p[0], &sp->temperature, 4);
            p[1] = sp->top_k;
            memcpy(&p[2], &sp->top_p, 4);
            memcpy(&p[3], &sp->min_p, 4);
            memcpy(&p[4], &out->u[i], 4);
        }
        if (l->piped) return forward_piped(l, b, out, n, t0);
        int64_t h[HDR_N];
        make_header(l, h, CMD_STEP, b, out->k);
        cp_status st = cp_comm_bcast(l->world, h, HDR_N, CP_DTYPE_I64, 0, NULL);
        l->last_send = cp_time_now();
        if (st == CP_OK) st = cp_comm_bcast(l->world, l->body, n, CP_DTYPE_I32, 0, NULL);
        if (st != CP_OK) return brk(l, st);
        l->stats.bcast_s += cp_time_now() - t0;
    }
    l->stats.steps++;
    cp_status st = cp_model_forward_top(l->model, l->kv, b, out);
    /* a batch the model rejects is rejected on every rank before any
     * collective; anything else may have left the ranks apart */
    if (st != CP_OK && st != CP_ERR_INVALID_ARG) brk(l, st);
    return st;
}

cp_status cp_step_link_finish(void *link, const cp_logit_top *out) {
    cp_step_link_t l = link;
    if (!l || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_finish: NULL argument");
    if (!l->piped) return check_broken(l); /* steps end inside cp_step_link_forward */
    if (l->q_n == 0 || l->q[l->q_head].out != out)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_finish: not the oldest step in flight");
    cp_status st = check_broken(l);
    if (st == CP_OK) st = take_oldest(l);
    l->q_head = (l->q_head + 1) % CP_STEP_LINK_MAX_DEPTH;
    l->q_n--;
    return st;
}

cp_status cp_step_link_idle(void *link) {
    cp_step_link_t l = link;
    if (!l) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_idle: NULL link");
    CP_CHECK(check_broken(l));
    if (l->size == 1 || cp_time_now() - l->last_send < CP_STEP_LINK_HEARTBEAT_MS * 1e-3)
        return CP_OK;
    cp_status st = send_command(l, CMD_HEARTBEAT, 0);
    if (st != CP_OK) return brk(l, st);
    l->stats.heartbeats++;
    return CP_OK;
}

cp_status cp_step_link_stop(cp_step_link_t l, bool ok) {
    if (!l || l->size == 1 || l->rank != 0 || l->broken != CP_OK) return CP_OK;
    /* the last stage waits to hand over what is still in flight */
    while (l->q_n > 0) {
        CP_CHECK(take_oldest(l));
        l->q_head = (l->q_head + 1) % CP_STEP_LINK_MAX_DEPTH;
        l->q_n--;
    }
    cp_status st = send_command(l, CMD_STOP, ok ? 0 : 1);
    if (st != CP_OK) brk(l, st);
    return st;
}

/* Followers: the next part of a message from rank 0, directly or (pipelined
 * beyond the first stage) through the previous stage. */
static cp_status take(cp_step_link_t l, void *buf, size_t n, cp_dtype dt) {
    if (!l->piped) return cp_comm_bcast(l->world, buf, n, dt, 0, NULL);
    if (l->pp_rank > 0) return cp_comm_recv(l->pipe, buf, n, dt, l->pp_rank - 1, NULL);
    return cp_comm_bcast(l->stage, buf, n, dt, 0, NULL);
}

cp_status cp_step_link_follow(cp_step_link_t l) {
    if (!l) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_step_link_follow: NULL link");
    if (l->rank == 0) return CP_ERROR(CP_ERR_INVALID_ARG, "rank 0 leads; it does not follow");
    const cp_model_config *cfg = cp_model_get_config(l->model);
    const int max_batch = 1 << 20;
    for (;;) {
        int64_t h[HDR_N];
        cp_status st = take(l, h, HDR_N, CP_DTYPE_I64);
        if (st != CP_OK)
            return CP_ERROR(st, "rank %d: no step or heartbeat from %s in time (%s)", l->rank,
                            l->piped && l->pp_rank > 0 ? "the previous pipeline stage" : "rank 0",
                            cp_last_error());
        /* pipelined, a step the first stage rejected goes no further, so
         * later stages may see a number skipped */
        const bool skips = l->piped && l->pp_rank > 0;
        if (h[0] != LINK_MAGIC || (skips ? h[2] <= l->seqno : h[2] != l->seqno + 1))
            return CP_ERROR(CP_ERR_INTERNAL,
                            "rank %d: unexpected message from rank 0 (magic %llx, seqno %lld after "
                            "%lld): the ranks run different programs or versions",
                            l->rank, (unsigned long long)h[0], (long long)h[2],
                            (long long)l->seqno);
        l->seqno = h[2];
        if (l->piped && (h[1] == CMD_HEARTBEAT || h[1] == CMD_STOP)) CP_CHECK(pass_on(l, h, NULL, 0));
        if (h[1] == CMD_HEARTBEAT) {
            l->stats.heartbeats++;
            continue;
        }
        if (h[1] == CMD_STOP)
            return h[7] ? CP_ERROR(CP_ERR_INTERNAL, "rank 0 stopped after a failure") : CP_OK;
        if (h[1] != CMD_STEP)
            return CP_ERROR(CP_ERR_INTERNAL, "rank %d: unknown command %lld from rank 0", l->rank,
                            (long long)h[1]);
        const int64_t n_tok = h[3], n_seq = h[4], max_blocks = h[5], n_logits = h[6], k = h[7];
        if (n_tok < 1 || n_tok > max_batch || n_seq < 1 || n_seq > n_tok || max_blocks < 1 ||
            max_blocks > (1 << 20) || n_logits < 0 || n_logits > n_tok || k < 1 || k > CP_MODEL_MAX_TOP)
            return CP_ERROR(CP_ERR_INTERNAL,
                            "rank %d: step descriptor out of range (n_tok %lld, n_seq %lld, "
                            "max_blocks %lld, n_logits %lld, k %lld)",
                            l->rank, (long long)n_tok, (long long)n_seq, (long long)max_blocks,
                            (long long)n_logits, (long long)k);
        size_t n = body_len(n_tok, n_seq, max_blocks, n_logits);
        CP_CHECK(reserve_body(l, n));
        st = take(l, l->body, n, CP_DTYPE_I32);
        if (st != CP_OK) return st;
        const int32_t *p = l->body;
        const int32_t *need = p + 3 * n_tok + n_seq * max_blocks + n_logits;
        bool full = false;
        for (int64_t i = 0; i < n_logits; i++)
            full |= (need[i] & CP_TOP_FULL) != 0;
        CP_CHECK(reserve_top(l, (size_t)n_logits, (int)k, full, (size_t)cfg->n_vocab));
        const int32_t *smp = need + n_logits;
        for (int64_t i = 0; i < n_logits; i++, smp += SAMPLE_WORDS) {
            l->need[i] = (uint8_t)need[i];
            cp_sample_params *sp = &l->sp[i];
            memcpy(&sp->temperature, &smp[0], 4);
            sp->top_k = smp[1];
            memcpy(&sp->top_p, &smp[2], 4);
            memcpy(&sp->min_p, &smp[3], 4);
            memcpy(&l->u[i], &smp[4], 4);
        }
        cp_batch b = {
            .n_tok = (int)n_tok,
            .tokens = p,
            .pos = p + n_tok,
            .seq = p + 2 * n_tok,
            .block_tables = p + 3 * n_tok,
            .n_seq = (int)n_seq,
            .max_blocks = (int)max_blocks,
            .logit_rows = p + 3 * n_tok + n_seq * max_blocks,
            .n_logits = (int)n_logits,
        };
        l->stats.steps++;
        const cp_logit_top top = {.k = (int)k,
                                  .need = l->need,
                                  .logits = l->logits,
                                  .val = l->val,
                                  .id = l->id,
                                  .lse = l->lse,
                                  .sp = l->sp,
                                  .u = l->u,
                                  .tok = l->tok,
                                  .tok_logit = l->tok_logit};
        if (!l->piped) {
            st = cp_model_forward_top(l->model, l->kv, &b, &top);
            if (st != CP_OK && st != CP_ERR_INVALID_ARG) return st;
            continue;
        }
        /* pipelined: the stage, then the step on to the next stage, or
         * from the last stage its candidates to rank 0 */
        st = cp_model_forward_stage(l->model, l->kv, &b, &top);
        if (st == CP_ERR_INVALID_ARG) continue; /* the first stage rejects it too and passes it no further */
        if (st != CP_OK) return st;
        if (l->pp_rank + 1 < l->pp) {
            CP_CHECK(pass_on(l, h, l->body, n));
            CP_CHECK(cp_model_stage_send(l->model));
        } else if (l->tp_rank == 0) {
            CP_CHECK(move_results(l, &top, (int)n_logits, true));
        }
    }
}
