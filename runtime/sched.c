/* sched.c - the serving scheduler: a FIFO of submitted requests admitted by
 * free KV blocks, one forward step per iteration over the decode tokens and
 * prefill chunks of many sequences, host sampling with each request's own
 * generator, incremental detokenization with stop strings, preemption by
 * recomputation and a prefix cache of full KV blocks. */
#include "cp_sched.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct req req;

struct req {
    int64_t id;
    req *prev, *next; /* waiting queue links */
    req *done_next;   /* list of requests finished outside a step's rows */
    cp_sched_cb cb;
    void *user;
    /* the request as submitted */
    int n_prompt; /* the client's prompt length */
    int max_tokens;
    cp_sample_params sample;
    int top_logprobs;
    bool ignore_eos;
    char **stop; /* [n_stop] NUL-terminated, non-empty */
    size_t *stop_len;
    int n_stop;
    /* the sequence */
    int32_t *tokens; /* [n_prompt + max_tokens]: prompt, then generated tokens */
    int n_tokens;
    int n_gen;
    int n_computed;  /* leading positions whose K/V are in the cache */
    int32_t *blocks; /* [max_blocks] block table */
    int n_blocks;
    uint64_t *hashes; /* [max_blocks] chain hashes of the leading full blocks of tokens */
    int n_hashed;
    int n_registered; /* leading blocks already offered to the prefix cache */
    bool admitted_once;
    int n_cached;
    cp_rng rng;
    bool cancel; /* under the mutex */
    double t_submit, t_first;
    /* generated text not yet delivered (held back: an incomplete UTF-8
     * character or a possible start of a stop string) */
    char *text;
    size_t text_len, text_cap;
    /* this step */
    /* steps in flight (not yet back) holding the sequence, and the tokens
     * they feed: a prompt's next chunk may follow its previous one before
     * that is back; a token to sample waits for it */
    int flights, ahead;
    int row;  /* row in the batch being built, -1 when not in it */
    cp_finish_reason finish;
    char *error;
    int ev_tokens;
    int32_t ev_tok;
    size_t ev_len; /* bytes of text delivered with the event */
    cp_sched_logprob ev_lp;
    cp_sched_logprob ev_top[CP_SCHED_MAX_LOGPROBS];
};

/* One forward step's batch: everything another rank would need to run the
 * same step (kept in one place so it can be broadcast as a unit). */
typedef struct step_batch {
    int n_tok, n_seq, max_blocks, n_logits;
    int32_t *tokens, *pos, *seq; /* [max_step_tokens] */
    int32_t *block_tables;       /* [max_running][max_blocks] */
    int32_t *logit_rows;         /* [max_running] */
} step_batch;

/* A step started and not yet finished: its batch and its outputs. */
typedef struct flight {
    step_batch b;
    req **rows;      /* [max_running] the request of each batch row */
    int *take;       /* [max_running] the tokens it feeds */
    uint8_t *sample; /* [max_running] whether they reach its last known token */
    /* each sampled row's candidates and log-sum-exp (cp_model_forward_top) */
    float *top_val;  /* [max_running][CP_MODEL_MAX_TOP] */
    int32_t *top_id; /* [max_running][CP_MODEL_MAX_TOP] */
    double *top_lse; /* [max_running] */
    uint8_t *need;   /* [max_running] CP_TOP_* of each logit row */
    /* CP_TOP_SAMPLE rows: sampled by the forward pass */
    cp_sample_params *sp; /* [max_running] */
    float *u;             /* [max_running] */
    int32_t *tok;         /* [max_running] */
    float *tok_logit;     /* [max_running] */
    cp_logit_top top; /* the step's request to the forward pass */
    double t0;
} flight;

struct cp_sched {
    cp_engine_t e;
    cp_model_t model;
    cp_kv_cache_t kv;
    cp_tokenizer_t tok;
    int n_ctx, n_vocab, bs, max_blocks, n_blocks;
    int max_running, max_waiting, max_step_tokens, prefill_chunk;
    bool prefix;
    int64_t fail_step; /* fault injection for tests: this forward step fails */
    cp_status (*forward)(void *user, const cp_batch *b, const cp_logit_top *out);
    cp_status (*finish)(void *user, const cp_logit_top *out);
    cp_status (*idle)(void *user);
    void *hook_user;
    int depth;      /* steps in flight at most */
    int lone_chunk; /* > 0: the prefill chunk while fewer requests than depth are active */
    int64_t started;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool woken, draining;
    int64_t next_id;
    req *wait_head, *wait_tail; /* FIFO; preempted requests go to the front */
    int n_waiting;
    req **run; /* [max_running] in admission order */
    int n_run;
    cp_sched_stats stats;

    /* step-thread state: the steps in flight, oldest first from fl_head */
    flight fl[CP_SCHED_MAX_DEPTH];
    int fl_head, n_flight;
    const flight *cur; /* the step whose rows are being sampled */
    int32_t *matched; /* [max_blocks] scratch for prefix matches */
    bool host_backend; /* the backend computes on host memory */

    /* prefix cache, per physical block */
    uint64_t *bhash, *bparent;    /* chain hash of the block and of its predecessor */
    int32_t *btoks;               /* [n_blocks][bs] the tokens a cached block holds */
    int32_t *users;               /* running sequences holding the block */
    uint8_t *cached;              /* registered in the table (the cache holds a reference) */
    int32_t *lru_prev, *lru_next; /* cache-only blocks, least recently released first */
    int32_t lru_head, lru_tail;
    int n_evictable;
    int32_t *slots; /* open-addressing table of block ids keyed by bhash, -1 empty */
    size_t slot_mask;
};

/* ---- hashing ------------------------------------------------------------ */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Key of a full block: its tokens chained to the key of the block before
 * (0 for the first), so equal keys mean equal prefixes. */
static uint64_t block_hash(uint64_t parent, const int32_t *t, int n) {
    uint64_t h = mix64(parent + 0x9e3779b97f4a7c15ull);
    for (int i = 0; i < n; i++)
        h = mix64(h ^ (uint64_t)(uint32_t)t[i]);
    return h;
}

/* Extends r->hashes over every full block of its known tokens. */
static void hash_blocks(cp_sched_t s, req *r) {
    int full = r->n_tokens / s->bs;
    if (full > s->max_blocks) full = s->max_blocks;
    for (int i = r->n_hashed; i < full; i++)
        r->hashes[i] = block_hash(i ? r->hashes[i - 1] : 0, r->tokens + (size_t)i * s->bs, s->bs);
    if (full > r->n_hashed) r->n_hashed = full;
}

/* ---- prefix cache table ------------------------------------------------- */

static int32_t table_find(cp_sched_t s, uint64_t h) {
    for (size_t i = h & s->slot_mask;; i = (i + 1) & s->slot_mask) {
        int32_t b = s->slots[i];
        if (b < 0) return -1;
        if (s->bhash[b] == h) return b;
    }
}

static void table_insert(cp_sched_t s, int32_t b) {
    size_t i = s->bhash[b] & s->slot_mask;
    while (s->slots[i] >= 0)
        i = (i + 1) & s->slot_mask;
    s->slots[i] = b;
}

/* Linear-probing removal with backward shift (no tombstones). */
static void table_remove(cp_sched_t s, int32_t b) {
    size_t i = s->bhash[b] & s->slot_mask;
    while (s->slots[i] != b) {
        CP_ASSERT(s->slots[i] >= 0);
        i = (i + 1) & s->slot_mask;
    }
    size_t j = i;
    for (;;) {
        j = (j + 1) & s->slot_mask;
        int32_t c = s->slots[j];
        if (c < 0) break;
        size_t k = s->bhash[c] & s->slot_mask; /* home slot of c */
        /* c may move to i unless its home lies cyclically in (i, j] */
        bool stays = i <= j ? (k > i && k <= j) : (k > i || k <= j);
        if (!stays) {
            s->slots[i] = c;
            i = j;
        }
    }
    s->slots[i] = -1;
}

/* ---- KV blocks ---------------------------------------------------------- */

static void lru_remove(cp_sched_t s, int32_t b) {
    int32_t p = s->lru_prev[b], n = s->lru_next[b];
    if (p >= 0)
        s->lru_next[p] = n;
    else
        s->lru_head = n;
    if (n >= 0)
        s->lru_prev[n] = p;
    else
        s->lru_tail = p;
    s->lru_prev[b] = s->lru_next[b] = -1;
    s->n_evictable--;
}

static void lru_push(cp_sched_t s, int32_t b) {
    s->lru_prev[b] = s->lru_tail;
    s->lru_next[b] = -1;
    if (s->lru_tail >= 0)
        s->lru_next[s->lru_tail] = b;
    else
        s->lru_head = b;
    s->lru_tail = b;
    s->n_evictable++;
}

/* Drops the cache's reference to the least recently used cache-only block. */
static void evict_one(cp_sched_t s) {
    int32_t b = s->lru_head;
    CP_ASSERT(b >= 0);
    lru_remove(s, b);
    table_remove(s, b);
    s->cached[b] = 0;
    cp_kv_cache_release_blocks(s->kv, &b, 1);
}

/* Blocks a new allocation could get now: free ones plus cache-only ones. */
static int blocks_available(cp_sched_t s) {
    return cp_kv_cache_n_free(s->kv) + s->n_evictable;
}

/* Appends one fresh block to r's table; false when none can be had. */
static bool grow_table(cp_sched_t s, req *r) {
    if (cp_kv_cache_n_free(s->kv) == 0) {
        if (s->n_evictable == 0) return false;
        evict_one(s);
    }
    int32_t b;
    if (cp_kv_cache_alloc_blocks(s->kv, 1, &b) != CP_OK) return false;
    s->users[b] = 1;
    r->blocks[r->n_blocks++] = b;
    return true;
}

/* Takes one more reference to a cached block for r. */
static void share_block(cp_sched_t s, req *r, int32_t b) {
    cp_kv_cache_retain_block(s->kv, b);
    if (s->users[b]++ == 0) lru_remove(s, b);
    r->blocks[r->n_blocks++] = b;
}

/* Releases r's blocks; cached ones nobody else holds become evictable, the
 * end of the chain before its start (a chain is matched from its first
 * block, so its last blocks are the least useful). */
static void release_seq(cp_sched_t s, req *r) {
    for (int i = r->n_blocks - 1; i >= 0; i--) {
        int32_t b = r->blocks[i];
        CP_ASSERT(s->users[b] > 0);
        s->users[b]--;
        cp_kv_cache_release_blocks(s->kv, &b, 1);
        if (s->users[b] == 0 && s->cached[b]) lru_push(s, b);
    }
    r->n_blocks = 0;
    r->n_computed = 0;
    r->n_registered = 0;
}

/* Offers r's full blocks of computed tokens to the prefix cache. */
static void register_blocks(cp_sched_t s, req *r) {
    if (!s->prefix) return;
    int full = r->n_computed / s->bs;
    if (full <= r->n_registered) return;
    hash_blocks(s, r);
    for (int i = r->n_registered; i < full && i < r->n_hashed; i++) {
        int32_t b = r->blocks[i];
        if (s->cached[b] || table_find(s, r->hashes[i]) >= 0) continue;
        s->bhash[b] = r->hashes[i];
        s->bparent[b] = i ? r->hashes[i - 1] : 0;
        memcpy(s->btoks + (size_t)b * s->bs, r->tokens + (size_t)i * s->bs,
               (size_t)s->bs * sizeof(int32_t));
        s->cached[b] = 1;
        cp_kv_cache_retain_block(s->kv, b);
        table_insert(s, b);
    }
    r->n_registered = full;
}

/* ---- queues (under the mutex) ------------------------------------------ */

static void wait_unlink(cp_sched_t s, req *r) {
    if (r->prev)
        r->prev->next = r->next;
    else
        s->wait_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        s->wait_tail = r->prev;
    r->prev = r->next = NULL;
    s->n_waiting--;
}

static void wait_push_back(cp_sched_t s, req *r) {
    r->next = NULL;
    r->prev = s->wait_tail;
    if (s->wait_tail)
        s->wait_tail->next = r;
    else
        s->wait_head = r;
    s->wait_tail = r;
    s->n_waiting++;
}

static void wait_push_front(cp_sched_t s, req *r) {
    r->prev = NULL;
    r->next = s->wait_head;
    if (s->wait_head)
        s->wait_head->prev = r;
    else
        s->wait_tail = r;
    s->wait_head = r;
    s->n_waiting++;
}

static void run_remove(cp_sched_t s, req *r) {
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i] == r) {
            memmove(s->run + i, s->run + i + 1, (size_t)(s->n_run - i - 1) * sizeof(req *));
            s->n_run--;
            return;
        }
    CP_ASSERT(!"request not running");
}

static void update_kv_stats(cp_sched_t s) {
    s->stats.running = s->n_run;
    s->stats.waiting = s->n_waiting;
    s->stats.kv_blocks_free = blocks_available(s);
    s->stats.kv_blocks_used = s->n_blocks - s->stats.kv_blocks_free;
}

/* ---- requests ----------------------------------------------------------- */

static void req_free(req *r) {
    if (!r) return;
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->stop_len);
    free(r->tokens);
    free(r->blocks);
    free(r->hashes);
    free(r->text);
    free(r->error);
    free(r);
}

static bool text_reserve(req *r, size_t extra) {
    if (r->text_len + extra <= r->text_cap) return true;
    size_t cap = r->text_cap ? r->text_cap : 64;
    while (cap < r->text_len + extra)
        cap *= 2;
    char *t = realloc(r->text, cap);
    if (!t) return false;
    r->text = t;
    r->text_cap = cap;
    return true;
}

/* Bytes at the end of t[0..n) that begin a UTF-8 character whose remaining
 * bytes have not arrived yet. */
static size_t utf8_partial_tail(const char *t, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char c = (unsigned char)t[n - k];
        if ((c & 0xC0) == 0x80) continue;
        size_t need = c >= 0xF8 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

/* Earliest full match of a stop string in r->text, or -1. */
static long find_stop(const req *r) {
    long best = -1;
    for (int i = 0; i < r->n_stop; i++) {
        size_t m = r->stop_len[i];
        if (m > r->text_len) continue;
        for (size_t p = 0; p + m <= r->text_len && (best < 0 || (long)p < best); p++)
            if (memcmp(r->text + p, r->stop[i], m) == 0) {
                best = (long)p;
                break;
            }
    }
    return best;
}

/* Length of the longest end of r->text that starts some stop string. */
static size_t stop_hold(const req *r) {
    size_t hold = 0;
    for (int i = 0; i < r->n_stop; i++) {
        size_t m = r->stop_len[i] - 1;
        if (m > r->text_len) m = r->text_len;
        for (size_t k = m; k > hold; k--)
            if (memcmp(r->text + r->text_len - k, r->stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    return hold;
}

/* All remaining text goes out with the final event; an unfinished UTF-8
 * character becomes U+FFFD so the stream stays valid UTF-8. */
static void flush_text(req *r) {
    size_t part = utf8_partial_tail(r->text, r->text_len);
    if (part) {
        r->text_len -= part;
        if (text_reserve(r, 3)) {
            memcpy(r->text + r->text_len, "\xEF\xBF\xBD", 3);
            r->text_len += 3;
        }
    }
    r->ev_len = r->text_len;
}

static void set_error(req *r, const char *msg) {
    r->finish = CP_FINISH_ERROR;
    free(r->error);
    r->error = strdup(msg && *msg ? msg : "unknown error");
}

/* Appends a generated token's text and decides what can be delivered. */
static void add_text(cp_sched_t s, req *r, int32_t tok) {
    const char *piece = "";
    size_t len = 0;
    if (s->tok && tok < cp_tokenizer_n_vocab(s->tok) &&
        cp_tokenizer_piece(s->tok, tok, false, &piece, &len) != CP_OK) {
        piece = "";
        len = 0;
    }
    if (!text_reserve(r, len)) {
        set_error(r, "out of memory for generated text");
        return;
    }
    if (len) memcpy(r->text + r->text_len, piece, len);
    r->text_len += len;
    if (r->n_stop) {
        long at = find_stop(r);
        if (at >= 0) {
            r->text_len = (size_t)at;
            r->ev_len = r->text_len;
            r->finish = CP_FINISH_STOP;
            return;
        }
    }
    size_t hold = stop_hold(r), part = utf8_partial_tail(r->text, r->text_len);
    if (part > hold) hold = part;
    r->ev_len = r->text_len - hold;
}

/* ---- sampling ------------------------------------------------------------
 * Each sampled row arrives as its best candidates (descending logit, lower
 * id first on ties) and its log-sum-exp when logprobs are wanted. Greedy
 * and top-k are chosen here from the candidates; sampling that may reach
 * beyond them (temperature without a top-k that fits) is done by the
 * forward pass itself (CP_TOP_SAMPLE), with the uniform drawn here when the
 * step starts. So across tensor parallel ranks a row moves a few hundred
 * bytes instead of the vocabulary (cp_model_forward_top). */

/* What row r needs of the forward pass, and how many candidates. */
static uint8_t row_need(const req *r, int V, int *k) {
    bool beyond;
    int want = cp_logit_top_want(&r->sample, V, &beyond);
    uint8_t need = beyond ? CP_TOP_SAMPLE : 0;
    if (r->top_logprobs >= 0) {
        need |= CP_TOP_LSE;
        if (r->top_logprobs > want) want = r->top_logprobs;
    }
    if (want > *k) *k = want;
    return need;
}

/* Log-softmax at temperature 1 of logit row li: the chosen token's logprob
 * and the n best alternatives (descending, lower id first on ties). */
static void logprobs(cp_sched_t s, int li, int32_t tok, int n, cp_sched_logprob *lp,
                     cp_sched_logprob *top) {
    const flight *f = s->cur;
    const int K = f->top.k;
    const float *val = f->top_val + (size_t)li * K;
    const int32_t *id = f->top_id + (size_t)li * K;
    const double lse = f->top_lse[li];
    float l = NAN;
    if (f->need[li] & CP_TOP_SAMPLE) l = f->tok_logit[li];
    for (int j = 0; j < K && isnan(l); j++)
        if (id[j] == tok) l = val[j];
    lp->token = tok;
    lp->logprob = (float)(l - lse);
    for (int j = 0; j < n && j < K && id[j] >= 0; j++) {
        top[j].token = id[j];
        top[j].logprob = (float)(val[j] - lse);
    }
}

/* Row li's token: the forward pass's for a CP_TOP_SAMPLE row; else
 * cp_sample_host's choice over the full row with the request's parameters
 * and a fresh uniform, taken from the candidates (cp_logit_top_sample:
 * exact unless the k-th and (k+1)-th tie after scaling). */
static cp_status sample_token(cp_sched_t s, req *r, int li, int32_t *tok) {
    const flight *f = s->cur;
    if (f->need[li] & CP_TOP_SAMPLE) {
        *tok = f->tok[li];
        return CP_OK;
    }
    return cp_logit_top_sample(&f->top, li, &r->sample, cp_rng_uniform(&r->rng), tok);
}

/* ---- init / free -------------------------------------------------------- */

cp_status cp_sched_init(cp_engine_t e, const cp_sched_opts *o, cp_sched_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_sched_init: NULL output");
    *out = NULL;
    if (!e) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_sched_init: no engine");
    cp_sched_opts def = {0};
    if (!o) o = &def;
    cp_sched_t s = calloc(1, sizeof(*s));
    if (!s) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st = CP_OK;
    s->e = e;
    s->model = cp_engine_model(e);
    s->kv = cp_engine_kv(e);
    s->tok = cp_engine_tokenizer(e);
    cp_backend_t be = cp_engine_backend(e);
    s->host_backend = be && cp_backend_device(be) == CP_DEVICE_CPU;
    if (!s->model || !s->kv) {
        free(s);
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_sched_init: the engine has no model or KV cache");
    }
    s->n_ctx = cp_engine_n_ctx(e);
    s->n_vocab = cp_model_get_config(s->model)->n_vocab;
    s->bs = cp_kv_cache_block_size(s->kv);
    s->n_blocks = cp_kv_cache_n_blocks(s->kv);
    s->max_blocks = (s->n_ctx + s->bs - 1) / s->bs;
    s->max_running = o->max_running > 0 ? o->max_running : 64;
    s->max_waiting = o->max_waiting > 0 ? o->max_waiting : 256;
    /* by default a step is one model chunk; on the CPU at most 128 tokens
     * (or one per running sequence): a prompt chunk then holds the running
     * streams up for a fraction of a second instead of seconds, at the same
     * throughput (benchmarks/serve/results/cpu_2026-11-24) */
    s->depth = o->depth > 1 && o->forward && o->finish ? o->depth : 1;
    if (s->depth > CP_SCHED_MAX_DEPTH) s->depth = CP_SCHED_MAX_DEPTH;
    s->max_step_tokens = cp_model_max_batch(s->model);
    if (s->host_backend) {
        const int cpu = s->max_running > CP_SCHED_CPU_STEP_TOKENS ? s->max_running : CP_SCHED_CPU_STEP_TOKENS;
        if (cpu < s->max_step_tokens) s->max_step_tokens = cpu;
    }
    if (o->max_step_tokens > 0) s->max_step_tokens = o->max_step_tokens;
    /* a pipelined step is one chunk of the model */
    if (s->depth > 1 && s->max_step_tokens > cp_model_max_batch(s->model))
        s->max_step_tokens = cp_model_max_batch(s->model);
    s->prefill_chunk = o->prefill_chunk > 0 ? o->prefill_chunk : 256;
    /* pipelined, with fewer requests than stages a prompt goes through in
     * chunks as a step taken by every stage in turn would go in
     * micro-batches (4 per stage, at least 16 tokens): its chunks follow
     * each other through the stages and keep them busy */
    if (s->depth > 1 && o->prefill_chunk <= 0) {
        int c = s->max_step_tokens / (4 * s->depth);
        s->lone_chunk = c > 16 ? c : 16;
    }
    s->prefix = !o->no_prefix_cache;
    /* lets tests exercise the error path of a failing forward step */
    const char *fail = getenv("CP_SCHED_FAIL_STEP");
    s->fail_step = fail ? atoll(fail) : 0;
    s->forward = o->forward;
    s->finish = o->finish;
    s->idle = o->idle;
    s->hook_user = o->hook_user;
    s->lru_head = s->lru_tail = -1;
    s->next_id = 1;
    if (s->max_blocks > s->n_blocks) {
        free(s);
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the KV cache has %d blocks of %d tokens, fewer than one sequence of the "
                        "%d-token context needs",
                        cp_kv_cache_n_blocks(cp_engine_kv(e)),
                        cp_kv_cache_block_size(cp_engine_kv(e)), cp_engine_n_ctx(e));
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0 || pthread_mutex_init(&s->mu, NULL) != 0) {
        if (rc == 0) pthread_cond_destroy(&s->cv);
        free(s);
        return CP_ERROR(CP_ERR_INTERNAL, "cannot create the scheduler's mutex");
    }

    const size_t R = (size_t)s->max_running, T = (size_t)s->max_step_tokens;
    const size_t NB = (size_t)s->n_blocks;
    size_t cap = 1;
    while (cap < 2 * NB)
        cap <<= 1;
    s->slot_mask = cap - 1;
    s->run = calloc(R, sizeof(req *));
    s->matched = malloc((size_t)s->max_blocks * sizeof(int32_t));
    bool fl_ok = true;
    for (int i = 0; i < s->depth; i++) {
        flight *f = &s->fl[i];
        f->rows = calloc(R, sizeof(req *));
        f->take = calloc(R, sizeof(int));
        f->sample = calloc(R, 1);
        f->top_val = malloc(R * CP_MODEL_MAX_TOP * sizeof(float));
        f->top_id = malloc(R * CP_MODEL_MAX_TOP * sizeof(int32_t));
        f->top_lse = malloc(R * sizeof(double));
        f->need = malloc(R);
        f->sp = malloc(R * sizeof(cp_sample_params));
        f->u = malloc(R * sizeof(float));
        f->tok = malloc(R * sizeof(int32_t));
        f->tok_logit = malloc(R * sizeof(float));
        f->b.tokens = malloc(T * sizeof(int32_t));
        f->b.pos = malloc(T * sizeof(int32_t));
        f->b.seq = malloc(T * sizeof(int32_t));
        f->b.block_tables = calloc(R * (size_t)s->max_blocks, sizeof(int32_t));
        f->b.logit_rows = malloc(R * sizeof(int32_t));
        f->b.max_blocks = s->max_blocks;
        fl_ok = fl_ok && f->rows && f->take && f->sample && f->top_val && f->top_id && f->top_lse && f->need &&
                f->sp && f->u && f->tok && f->tok_logit && f->b.tokens && f->b.pos && f->b.seq &&
                f->b.block_tables && f->b.logit_rows;
    }
    s->bhash = calloc(NB, sizeof(uint64_t));
    s->bparent = calloc(NB, sizeof(uint64_t));
    s->btoks = malloc(NB * (size_t)s->bs * sizeof(int32_t));
    s->users = calloc(NB, sizeof(int32_t));
    s->cached = calloc(NB, 1);
    s->lru_prev = malloc(NB * sizeof(int32_t));
    s->lru_next = malloc(NB * sizeof(int32_t));
    s->slots = malloc(cap * sizeof(int32_t));
    if (!s->run || !s->matched || !fl_ok || !s->bhash || !s->bparent || !s->btoks || !s->users || !s->cached || !s->lru_prev || !s->lru_next ||
        !s->slots) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for the scheduler (%d running, %d KV blocks)",
                      s->max_running, s->n_blocks);
        goto fail;
    }
    for (size_t i = 0; i < NB; i++)
        s->lru_prev[i] = s->lru_next[i] = -1;
    for (size_t i = 0; i < cap; i++)
        s->slots[i] = -1;
    update_kv_stats(s);
    *out = s;
    return CP_OK;
fail:
    cp_sched_free(s);
    return st;
}

static void deliver(req *r);

void cp_sched_free(cp_sched_t s) {
    if (!s) return;
    /* steps still in flight come back first (their rows are dropped) */
    for (; s->n_flight > 0; s->n_flight--) {
        const flight *f = &s->fl[s->fl_head];
        if (s->finish) (void)s->finish(s->hook_user, &f->top);
        s->fl_head = (s->fl_head + 1) % s->depth;
    }
    /* every request ends; the caller's thread gets the final events */
    while (s->n_run > 0) {
        req *r = s->run[s->n_run - 1];
        s->n_run--;
        release_seq(s, r);
        r->finish = CP_FINISH_CANCELLED;
        r->ev_tokens = 0;
        r->ev_len = 0;
        deliver(r);
        req_free(r);
    }
    while (s->wait_head) {
        req *r = s->wait_head;
        wait_unlink(s, r);
        r->finish = CP_FINISH_CANCELLED;
        r->ev_tokens = 0;
        r->ev_len = 0;
        deliver(r);
        req_free(r);
    }
    if (s->lru_prev && s->slots)
        while (s->n_evictable > 0)
            evict_one(s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->run);
    free(s->matched);
    for (int i = 0; i < CP_SCHED_MAX_DEPTH; i++) {
        flight *f = &s->fl[i];
        free(f->rows);
        free(f->take);
        free(f->sample);
        free(f->top_val);
        free(f->top_id);
        free(f->top_lse);
        free(f->need);
        free(f->sp);
        free(f->u);
        free(f->tok);
        free(f->tok_logit);
        free(f->b.tokens);
        free(f->b.pos);
        free(f->b.seq);
        free(f->b.block_tables);
        free(f->b.logit_rows);
    }
    free(s->bhash);
    free(s->bparent);
    free(s->btoks);
    free(s->users);
    free(s->cached);
    free(s->lru_prev);
    free(s->lru_next);
    free(s->slots);
    free(s);
}

/* ---- submit / cancel / drain / wake / stats ----------------------------- */

cp_status cp_sched_submit(cp_sched_t s, const cp_sched_request *q, cp_sched_cb cb, void *user,
                          int64_t *id) {
    if (id) *id = 0;
    if (!s || !q) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_sched_submit: NULL argument");
    if (q->n_prompt <= 0 || !q->prompt) return CP_ERROR(CP_ERR_INVALID_ARG, "the prompt is empty");
    if (q->max_tokens < 1)
        return CP_ERROR(CP_ERR_INVALID_ARG, "max_tokens must be at least 1, got %d", q->max_tokens);
    if ((int64_t)q->n_prompt + q->max_tokens > s->n_ctx)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the prompt has %d tokens and max_tokens is %d: %lld tokens do not fit the "
                        "context of %d",
                        q->n_prompt, q->max_tokens, (long long)q->n_prompt + q->max_tokens,
                        s->n_ctx);
    if (q->n_stop < 0 || q->n_stop > CP_SCHED_MAX_STOP || (q->n_stop > 0 && !q->stop))
        return CP_ERROR(CP_ERR_INVALID_ARG, "%d stop strings (at most %d)", q->n_stop,
                        CP_SCHED_MAX_STOP);
    if (q->n_stop > 0 && !s->tok)
        return CP_ERROR(CP_ERR_INVALID_ARG, "stop strings need an engine with a tokenizer");
    if (q->top_logprobs < -1 || q->top_logprobs > CP_SCHED_MAX_LOGPROBS)
        return CP_ERROR(CP_ERR_INVALID_ARG, "top_logprobs %d is outside -1..%d", q->top_logprobs,
                        CP_SCHED_MAX_LOGPROBS);
    for (int i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= s->n_vocab)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "prompt token %d at index %d is outside the vocabulary (0..%d)",
                            q->prompt[i], i, s->n_vocab - 1);

    req *r = calloc(1, sizeof(*r));
    if (!r) return CP_ERROR(CP_ERR_OOM, "out of memory");
    int cap = q->n_prompt + q->max_tokens;
    r->tokens = malloc((size_t)cap * sizeof(int32_t));
    r->blocks = malloc((size_t)s->max_blocks * sizeof(int32_t));
    r->hashes = malloc((size_t)s->max_blocks * sizeof(uint64_t));
    if (q->n_stop > 0) {
        r->stop = calloc((size_t)q->n_stop, sizeof(char *));
        r->stop_len = calloc((size_t)q->n_stop, sizeof(size_t));
    }
    if (!r->tokens || !r->blocks || !r->hashes || (q->n_stop > 0 && (!r->stop || !r->stop_len))) {
        req_free(r);
        return CP_ERROR(CP_ERR_OOM, "out of memory for a request of %d tokens", cap);
    }
    for (int i = 0; i < q->n_stop; i++) {
        if (!q->stop[i]) {
            req_free(r);
            return CP_ERROR(CP_ERR_INVALID_ARG, "stop string %d is NULL", i);
        }
        size_t len = strlen(q->stop[i]);
        if (len == 0) continue;
        if (!(r->stop[r->n_stop] = strdup(q->stop[i]))) {
            req_free(r);
            return CP_ERROR(CP_ERR_OOM, "out of memory");
        }
        r->stop_len[r->n_stop++] = len;
    }
    memcpy(r->tokens, q->prompt, (size_t)q->n_prompt * sizeof(int32_t));
    r->n_tokens = r->n_prompt = q->n_prompt;
    r->max_tokens = q->max_tokens;
    r->sample = q->sample;
    r->top_logprobs = q->top_logprobs;
    r->ignore_eos = q->ignore_eos;
    r->cb = cb;
    r->user = user;
    r->row = -1;
    cp_rng_seed(&r->rng, q->seed);
    r->t_submit = cp_time_now();

    pthread_mutex_lock(&s->mu);
    cp_status st = CP_OK;
    if (s->draining)
        st = CP_ERROR(CP_ERR_UNSUPPORTED, "the scheduler is draining and takes no new requests");
    else if (s->n_waiting >= s->max_waiting)
        st = CP_ERROR(CP_ERR_BUSY, "the queue is full (%d requests waiting)", s->n_waiting);
    if (st == CP_OK) {
        r->id = s->next_id++;
        wait_push_back(s, r);
        s->stats.waiting = s->n_waiting;
        if (id) *id = r->id;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    if (st != CP_OK) req_free(r);
    return st;
}

void cp_sched_cancel(cp_sched_t s, int64_t id) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    bool found = false;
    for (int i = 0; i < s->n_run && !found; i++)
        if (s->run[i]->id == id) s->run[i]->cancel = found = true;
    for (req *r = s->wait_head; r && !found; r = r->next)
        if (r->id == id) r->cancel = found = true;
    if (found) pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void cp_sched_drain(cp_sched_t s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->draining = true;
    pthread_mutex_unlock(&s->mu);
}

void cp_sched_wake(cp_sched_t s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->woken = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void cp_sched_get_stats(cp_sched_t s, cp_sched_stats *st) {
    if (!st) return;
    memset(st, 0, sizeof(*st));
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    *st = s->stats;
    st->running = s->n_run;
    st->waiting = s->n_waiting;
    pthread_mutex_unlock(&s->mu);
}

/* ---- one step ------------------------------------------------------------ */

static void deliver(req *r) {
    if (!r->cb) return;
    cp_sched_event ev = {
        .id = r->id,
        .text = r->text ? r->text : "",
        .len = r->ev_len,
        .n_tokens = r->ev_tokens,
        .tokens = r->ev_tokens ? &r->ev_tok : NULL,
        .logprobs = r->ev_tokens && r->top_logprobs >= 0 ? &r->ev_lp : NULL,
        .top = r->ev_tokens && r->top_logprobs > 0 ? r->ev_top : NULL,
        .finish = r->finish,
        .n_prompt = r->n_prompt,
        .n_generated = r->n_gen,
        .n_cached = r->n_cached,
        .ttft_s = r->t_first > 0 ? r->t_first - r->t_submit : 0,
        .error = r->finish == CP_FINISH_ERROR ? (r->error ? r->error : "unknown error") : NULL,
    };
    r->cb(r->user, &ev);
}

/* Delivers r's event of this step (if it has one) and drops the text it
 * carried. */
static void deliver_step(req *r) {
    if (r->ev_tokens == 0 && r->finish == CP_FINISH_NONE && r->ev_len == 0) return;
    deliver(r);
    if (r->ev_len) {
        memmove(r->text, r->text + r->ev_len, r->text_len - r->ev_len);
        r->text_len -= r->ev_len;
    }
    r->ev_len = 0;
    r->ev_tokens = 0;
}

/* Puts a running sequence back at the front of the queue. */
static void preempt(cp_sched_t s, req *r) {
    release_seq(s, r);
    run_remove(s, r);
    wait_push_front(s, r);
    s->stats.preemptions++;
}

/* Adds r's next `take` tokens to the batch; a sample is wanted when they
 * reach its last known token. */
static void add_rows(cp_sched_t s, flight *f, req *r, int take) {
    step_batch *b = &f->b;
    int row = b->n_seq++;
    f->rows[row] = r;
    f->take[row] = take;
    r->row = row;
    int32_t *tab = b->block_tables + (size_t)row * s->max_blocks;
    memcpy(tab, r->blocks, (size_t)r->n_blocks * sizeof(int32_t));
    memset(tab + r->n_blocks, 0, (size_t)(s->max_blocks - r->n_blocks) * sizeof(int32_t));
    const int from = r->n_computed + r->ahead;
    for (int i = 0; i < take; i++) {
        b->tokens[b->n_tok] = r->tokens[from + i];
        b->pos[b->n_tok] = from + i;
        b->seq[b->n_tok] = row;
        b->n_tok++;
    }
    r->ahead += take;
    r->flights++;
    f->sample[row] = r->n_computed + r->ahead == r->n_tokens;
    if (f->sample[row]) b->logit_rows[b->n_logits++] = b->n_tok - 1;
}

/* Admits the head of the queue when its blocks (after the prefix cache's
 * share) fit, with one spare block while others run. */
static bool try_admit(cp_sched_t s, req *r) {
    const int bs = s->bs;
    int lookup = 0, k = 0;
    if (s->prefix) {
        /* the last token is always recomputed (its logits are needed), so
         * only blocks before it are looked up */
        lookup = (r->n_tokens - 1) / bs;
        hash_blocks(s, r);
        while (k < lookup) {
            int32_t b = table_find(s, r->hashes[k]);
            if (b < 0 || s->bparent[b] != (k ? r->hashes[k - 1] : 0) ||
                memcmp(s->btoks + (size_t)b * bs, r->tokens + (size_t)k * bs,
                       (size_t)bs * sizeof(int32_t)) != 0)
                break;
            s->matched[k++] = b;
        }
    }
    int idle = 0;
    for (int i = 0; i < k; i++)
        idle += s->users[s->matched[i]] == 0;
    int need = (r->n_tokens + bs - 1) / bs - k;
    if (need + (s->n_run > 0 ? 1 : 0) > blocks_available(s) - idle) return false;
    for (int i = 0; i < k; i++)
        share_block(s, r, s->matched[i]);
    for (int i = 0; i < need; i++) {
        bool ok = grow_table(s, r); /* counted above */
        CP_ASSERT(ok);
    }
    r->n_computed = k * bs;
    r->n_registered = k;
    s->stats.prefix_lookups += lookup;
    s->stats.prefix_hits += k;
    if (!r->admitted_once) {
        r->admitted_once = true;
        r->n_cached = k * bs;
        s->stats.prompt_tokens += r->n_prompt;
    }
    wait_unlink(s, r);
    s->run[s->n_run++] = r;
    return true;
}

/* Ends requests marked cancelled; they go on the done list. */
static req *take_cancelled(cp_sched_t s) {
    req *done = NULL, **tail = &done;
    for (int i = 0; i < s->n_run;) {
        req *r = s->run[i];
        if (!r->cancel || r->flights) { /* ended once its steps in flight are back */
            i++;
            continue;
        }
        release_seq(s, r);
        run_remove(s, r);
        r->finish = CP_FINISH_CANCELLED;
        *tail = r;
        tail = &r->done_next;
    }
    for (req *r = s->wait_head, *n; r; r = n) {
        n = r->next;
        if (!r->cancel) continue;
        wait_unlink(s, r);
        r->finish = CP_FINISH_CANCELLED;
        *tail = r;
        tail = &r->done_next;
    }
    *tail = NULL;
    return done;
}

/* The newest running sequence not in a step in flight, or NULL. */
static req *newest_idle(cp_sched_t s) {
    for (int i = s->n_run - 1; i >= 0; i--)
        if (!s->run[i]->flights) return s->run[i];
    return NULL;
}

/* Picks step f's batch: decode tokens of running sequences first (oldest
 * first; a sequence that needs a block preempts the newest ones), then
 * prefill chunks of running sequences, then newly admitted ones. Sequences
 * in a step in flight wait for it; with several steps in flight each takes
 * about its share of the sequences, so that the steps stay alike. */
static void schedule(cp_sched_t s, flight *f) {
    step_batch *b = &f->b;
    b->n_tok = b->n_seq = b->n_logits = 0;
    int budget = s->max_step_tokens, seqs = s->max_running, chunk = s->prefill_chunk;
    if (s->depth > 1) {
        int active = s->n_run + s->n_waiting;
        if (active > s->max_running) active = s->max_running;
        seqs = (active + s->depth - 1) / s->depth;
        if (seqs < 1) seqs = 1;
        if (active < s->depth && s->lone_chunk > 0) chunk = s->lone_chunk;
    }
    for (int i = 0; i < s->n_run && budget > 0 && b->n_seq < seqs; i++) {
        req *r = s->run[i];
        if (r->flights || r->n_tokens - r->n_computed != 1) continue;
        bool ok = true;
        while (r->n_computed / s->bs >= r->n_blocks) {
            if (grow_table(s, r)) continue;
            req *victim = newest_idle(s);
            preempt(s, victim);
            if (victim == r) {
                ok = false;
                break;
            }
        }
        if (!ok) break; /* r was the newest idle one: nothing after it can run */
        add_rows(s, f, r, 1);
        budget--;
    }
    for (int i = 0; i < s->n_run && budget > 0 && b->n_seq < seqs; i++) {
        req *r = s->run[i];
        /* the rest of a prompt (its last token alone is a decode above,
         * unless an earlier chunk is still in flight) */
        int rem = r->n_tokens - r->n_computed - r->ahead;
        if (r->row >= 0 || rem <= 0 || (rem == 1 && !r->flights)) continue;
        int take = rem < chunk ? rem : chunk;
        if (take > budget) take = budget;
        add_rows(s, f, r, take);
        budget -= take;
    }
    while (budget > 0 && b->n_seq < seqs && s->n_run < s->max_running && s->wait_head &&
           try_admit(s, s->wait_head)) {
        req *r = s->run[s->n_run - 1];
        int rem = r->n_tokens - r->n_computed;
        int take = rem < chunk ? rem : chunk;
        if (take > budget) take = budget;
        add_rows(s, f, r, take);
        budget -= take;
    }
}

/* After a successful forward: sample the rows that reached their last
 * token, update text and finish conditions. No lock held. */
static void process_row(cp_sched_t s, req *r, int take, int li) {
    r->n_computed += take;
    register_blocks(s, r);
    if (r->n_computed < r->n_tokens) return; /* more prompt to prefill */
    int32_t tok;
    if (sample_token(s, r, li, &tok) != CP_OK) {
        set_error(r, cp_last_error());
        return;
    }
    if (r->t_first == 0) r->t_first = cp_time_now();
    if (!r->ignore_eos && s->tok && cp_tokenizer_is_eog(s->tok, tok)) {
        r->finish = CP_FINISH_STOP;
        flush_text(r);
        return;
    }
    r->tokens[r->n_tokens++] = tok;
    r->n_gen++;
    r->ev_tokens = 1;
    r->ev_tok = tok;
    if (r->top_logprobs >= 0)
        logprobs(s, li, tok, r->top_logprobs, &r->ev_lp, r->ev_top);
    add_text(s, r, tok);
    if (r->finish != CP_FINISH_NONE) return;
    if (r->n_gen >= r->max_tokens || r->n_tokens > s->n_ctx) {
        r->finish = CP_FINISH_LENGTH;
        flush_text(r);
    }
}

/* Starts step f: what each sampled row needs, then the forward pass (which
 * with depth 1 also finishes it). */
static cp_status start_step(cp_sched_t s, flight *f) {
    const step_batch *b = &f->b;
    int k = 1, nl = 0;
    for (int i = 0; i < b->n_seq; i++) {
        req *r = f->rows[i];
        if (!f->sample[i]) continue;
        f->need[nl] = row_need(r, s->n_vocab, &k);
        if (f->need[nl] & CP_TOP_SAMPLE) {
            f->sp[nl] = r->sample;
            f->u[nl] = cp_rng_uniform(&r->rng);
        }
        nl++;
    }
    f->top = (cp_logit_top){.k = k,
                            .need = f->need,
                            .val = f->top_val,
                            .id = f->top_id,
                            .lse = f->top_lse,
                            .sp = f->sp,
                            .u = f->u,
                            .tok = f->tok,
                            .tok_logit = f->tok_logit};
    const cp_batch batch = {
        .n_tok = b->n_tok,
        .tokens = b->tokens,
        .pos = b->pos,
        .seq = b->seq,
        .block_tables = b->block_tables,
        .n_seq = b->n_seq,
        .max_blocks = b->max_blocks,
        .logit_rows = b->logit_rows,
        .n_logits = b->n_logits,
    };
    f->t0 = cp_time_now();
    s->started++;
    if (s->fail_step > 0 && s->started == s->fail_step)
        return CP_ERROR(CP_ERR_INTERNAL, "injected failure of step %lld (CP_SCHED_FAIL_STEP)",
                        (long long)s->fail_step);
    return s->forward ? s->forward(s->hook_user, &batch, &f->top)
                      : cp_model_forward_top(s->model, s->kv, &batch, &f->top);
}

/* Step f came back with status st: sample its rows (or end them with the
 * error), free the finished requests, deliver the events. */
static void end_step(cp_sched_t s, flight *f, cp_status st) {
    const step_batch *b = &f->b;
    const double t1 = cp_time_now();
    s->cur = f;
    int n_sampled = 0, li = 0;
    for (int i = 0; i < b->n_seq; i++) {
        req *r = f->rows[i];
        r->ahead -= f->take[i];
        r->flights--;
        const int row_li = f->sample[i] ? li++ : -1;
        if (r->finish != CP_FINISH_NONE) continue; /* an earlier step failed */
        if (st != CP_OK) {
            set_error(r, cp_last_error());
            continue;
        }
        int before = r->n_gen;
        process_row(s, r, f->take[i], row_li);
        n_sampled += r->n_gen - before;
    }

    /* a request that failed here while a later chunk of it is still in
     * flight ends when that one is back */
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < b->n_seq; i++) {
        req *r = f->rows[i];
        if (r->finish == CP_FINISH_NONE || r->flights) continue;
        release_seq(s, r);
        run_remove(s, r);
    }
    s->stats.steps++;
    if (st != CP_OK) s->stats.failed_steps++;
    s->stats.generated_tokens += n_sampled;
    s->stats.last_step_s = t1 - f->t0;
    update_kv_stats(s);
    pthread_mutex_unlock(&s->mu);

    for (int i = 0; i < b->n_seq; i++) {
        req *r = f->rows[i];
        if (r->finish != CP_FINISH_NONE && r->flights) continue;
        deliver_step(r);
        if (r->finish != CP_FINISH_NONE) req_free(r);
    }
}

cp_status cp_sched_step(cp_sched_t s, int wait_ms, bool *worked) {
    if (worked) *worked = false;
    if (!s) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_sched_step: NULL scheduler");

    pthread_mutex_lock(&s->mu);
    if (s->n_run == 0 && !s->wait_head && s->n_flight == 0 && wait_ms != 0 && !s->woken) {
        /* wait_ms < 0: until a request or a wake */
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        if (wait_ms > 0) {
            until.tv_sec += wait_ms / 1000;
            until.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
        }
        while (s->n_run == 0 && !s->wait_head && !s->woken) {
            if (wait_ms < 0) {
                pthread_cond_wait(&s->cv, &s->mu);
            } else if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) {
                break;
            }
        }
    }
    s->woken = false;
    req *cancelled = take_cancelled(s);
    flight *f = NULL;
    if (s->n_flight < s->depth) {
        f = &s->fl[(s->fl_head + s->n_flight) % s->depth];
        for (int i = 0; i < s->n_run; i++)
            s->run[i]->row = -1;
        schedule(s, f);
    }
    update_kv_stats(s);
    pthread_mutex_unlock(&s->mu);

    for (req *r = cancelled, *n; r; r = n) {
        n = r->done_next;
        r->ev_tokens = 0;
        r->ev_len = 0;
        deliver(r);
        req_free(r);
    }

    bool started = false;
    if (f && f->b.n_seq > 0) {
        cp_status st = start_step(s, f);
        if (st == CP_OK) {
            started = true;
            s->n_flight++;
        } else {
            end_step(s, f, st); /* its requests end with the error */
        }
        if (worked) *worked = true;
    }
    /* the oldest step comes back when every slot is taken, or when nothing
     * else can start before it does */
    if (s->n_flight > 0 && (s->n_flight == s->depth || !started)) {
        flight *old = &s->fl[s->fl_head];
        cp_status st = s->finish ? s->finish(s->hook_user, &old->top) : CP_OK;
        s->fl_head = (s->fl_head + 1) % s->depth;
        s->n_flight--;
        end_step(s, old, st);
        if (worked) *worked = true;
        return CP_OK;
    }
    if (!started && !(f && f->b.n_seq > 0)) return s->idle ? s->idle(s->hook_user) : CP_OK;
    return CP_OK;
}
