/* engine.c - a model with its tokenizer and KV cache, and single-sequence
 * generation: chunked prefill, then one token per step with seeded
 * sampling through the backend. The serving scheduler builds on the same
 * model/KV-cache calls with many sequences per batch. */
#include "cp_runtime.h"
#include "cp_gguf.h"
#include "cp_hf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct cp_engine {
    cp_backend_t be;
    cp_model_t model;
    cp_tokenizer_t tok;
    cp_kv_cache_t kv;
    int n_ctx;
    int max_blocks;       /* blocks per sequence */
    int32_t *table;       /* [max_blocks] block table of the generating sequence */
    int32_t *pos, *seq, *rows; /* [max_batch] */
};

/* ---- rng ---------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void cp_rng_seed(cp_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t cp_rng_next(cp_rng *r) {
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

float cp_rng_uniform(cp_rng *r) { return (float)(cp_rng_next(r) >> 40) * (1.0f / 16777216.0f); }

/* ---- engine ------------------------------------------------------------- */

static bool is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static cp_status load_tokenizer(cp_engine_t e, const char *path) {
    if (cp_model_gguf(e->model)) return cp_tokenizer_init_gguf(cp_model_gguf(e->model), &e->tok);
    /* a Hugging Face directory, or a .safetensors file in one */
    char dir[4096], tj[4128], tc[4128];
    snprintf(dir, sizeof(dir), "%s", path);
    if (!is_dir(path)) {
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof(dir), ".");
    }
    snprintf(tj, sizeof(tj), "%s/tokenizer.json", dir);
    snprintf(tc, sizeof(tc), "%s/tokenizer_config.json", dir);
    struct stat sb;
    return cp_tokenizer_init_json(tj, stat(tc, &sb) == 0 ? tc : NULL, &e->tok);
}

cp_status cp_engine_init(const cp_engine_opts *o, cp_engine_t *out) {
    *out = NULL;
    if (!o || !o->model_path) return CP_ERROR(CP_ERR_INVALID_ARG, "no model path given");
    if (o->n_ctx < 0) return CP_ERROR(CP_ERR_INVALID_ARG, "context size must be positive, got %d", o->n_ctx);
    cp_engine_t e = calloc(1, sizeof(*e));
    if (!e) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st;
    if (o->device == CP_DEVICE_CUDA)
        CP_CHECK_GOTO(cp_backend_cuda_init(o->device_id, &e->be), st, fail);
    else
        CP_CHECK_GOTO(cp_backend_cpu_init(o->n_threads, &e->be), st, fail);
    cp_model_load_opts lo = {.backend = e->be,
                             .tp = o->tp,
                             .pp = o->pp,
                             .cp = o->cp,
                             .cp_exchange = o->cp_exchange,
                             .cp_ring_bytes = o->cp_ring_bytes,
                             .rank = o->rank,
                             .edge_layer_discount = o->edge_layer_discount,
                             .sp = o->sp,
                             .pp_micro = o->pp_micro,
                             .tp_comm = o->tp_comm,
                             .pp_comm = o->pp_comm,
                             .cp_comm = o->cp_comm,
                             .tp_dev_comm = o->tp_dev_comm,
                             .pp_dev_comm = o->pp_dev_comm,
                             .convert = o->convert_weights,
                             .convert_dtype = o->weight_dtype,
                             .progress = o->progress,
                             .progress_user = o->progress_user};
    CP_CHECK_GOTO(cp_model_load(o->model_path, &lo, &e->model), st, fail);
    if (!o->tokens_only) CP_CHECK_GOTO(load_tokenizer(e, o->model_path), st, fail);
    const cp_model_config *c = cp_model_get_config(e->model);
    if (e->tok && cp_tokenizer_n_vocab(e->tok) > c->n_vocab) {
        st = CP_ERROR(CP_ERR_FORMAT, "tokenizer has %d tokens but the model's vocabulary is %d",
                      cp_tokenizer_n_vocab(e->tok), c->n_vocab);
        goto fail;
    }
    e->n_ctx = o->n_ctx > 0 ? o->n_ctx : (c->ctx_train < 4096 ? c->ctx_train : 4096);
    /* by default 16 positions per block, or the next multiple of the
     * context-parallel ranks (each keeps every cp-th position) */
    int bs = o->kv_block_size;
    if (bs <= 0) {
        int cp = o->cp > 1 ? o->cp : 1;
        bs = (16 + cp - 1) / cp * cp;
    }
    int n_seq = o->n_seq > 0 ? o->n_seq : 1;
    e->max_blocks = (e->n_ctx + bs - 1) / bs;
    cp_kv_cache_opts ko = {.n_blocks = e->max_blocks * n_seq, .block_size = bs,
                           .dtype = cp_kv_quantized(o->kv_dtype) ? o->kv_dtype
                                    : o->kv_f32                   ? CP_DTYPE_F32
                                                                  : CP_DTYPE_F16};
    CP_CHECK_GOTO(cp_kv_cache_init(e->model, &ko, &e->kv), st, fail);
    int T = cp_model_max_batch(e->model);
    e->table = malloc((size_t)e->max_blocks * sizeof(int32_t));
    e->pos = malloc((size_t)T * sizeof(int32_t));
    e->seq = calloc((size_t)T, sizeof(int32_t));
    e->rows = malloc((size_t)T * sizeof(int32_t));
    if (!e->table || !e->pos || !e->seq || !e->rows) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    *out = e;
    return CP_OK;
fail:
    cp_engine_free(e);
    return st;
}

void cp_engine_free(cp_engine_t e) {
    if (!e) return;
    free(e->table);
    free(e->pos);
    free(e->seq);
    free(e->rows);
    cp_kv_cache_free(e->kv);
    cp_tokenizer_free(e->tok);
    cp_model_free(e->model);
    cp_backend_free(e->be);
    free(e);
}

cp_model_t cp_engine_model(cp_engine_t e) { return e->model; }
cp_tokenizer_t cp_engine_tokenizer(cp_engine_t e) { return e->tok; }
cp_backend_t cp_engine_backend(cp_engine_t e) { return e->be; }
cp_kv_cache_t cp_engine_kv(cp_engine_t e) { return e->kv; }
int cp_engine_n_ctx(cp_engine_t e) { return e->n_ctx; }

/* Rows [i0, ...) of t as a view of their own. */
static cp_logit_top top_from(const cp_logit_top *t, int i0, int vocab) {
    cp_logit_top v = *t;
    const size_t k = (size_t)t->k;
    if (v.need) v.need += i0;
    if (v.logits) v.logits += (size_t)i0 * (size_t)vocab;
    v.val += (size_t)i0 * k;
    v.id += (size_t)i0 * k;
    v.lse += i0;
    if (v.sp) v.sp += i0;
    if (v.u) v.u += i0;
    if (v.tok) v.tok += i0;
    if (v.tok_logit) v.tok_logit += i0;
    if (v.target) v.target += i0;
    if (v.target_logit) v.target_logit += i0;
    return v;
}

/* Feeds tokens[0..n) at positions start.. of the sequence whose block table
 * is e->table. With top every position's row goes to it as candidates;
 * else without sp every position's logits land in out[n][vocab] (none
 * when out is NULL); with sp
 * the last position is sampled (u its uniform number) into *tok and the
 * earlier chunks produce no logits at all. */
static cp_status feed(cp_engine_t e, const int32_t *tokens, int n, int start, float *out,
                      const cp_logit_top *top, const cp_sample_params *sp, float u, int32_t *tok) {
    const int T = cp_model_max_batch(e->model);
    const int vocab = cp_model_get_config(e->model)->n_vocab;
    for (int i0 = 0; i0 < n; i0 += T) {
        int k = n - i0 < T ? n - i0 : T;
        for (int i = 0; i < k; i++) e->pos[i] = start + i0 + i;
        cp_batch b = {
            .n_tok = k,
            .tokens = tokens + i0,
            .pos = e->pos,
            .seq = e->seq,
            .block_tables = e->table,
            .n_seq = 1,
            .max_blocks = e->max_blocks,
            .logit_rows = e->rows,
        };
        if (top) {
            for (int i = 0; i < k; i++) e->rows[i] = i;
            b.n_logits = k;
            const cp_logit_top v = top_from(top, i0, vocab);
            CP_CHECK(cp_model_forward_top(e->model, e->kv, &b, &v));
        } else if (!sp && out) {
            for (int i = 0; i < k; i++) e->rows[i] = i;
            b.n_logits = k;
            CP_CHECK(cp_model_forward(e->model, e->kv, &b, out + (size_t)i0 * vocab));
        } else if (!sp) {
            CP_CHECK(cp_model_forward(e->model, e->kv, &b, NULL));
        } else if (i0 + k == n) {
            e->rows[0] = k - 1;
            b.n_logits = 1;
            CP_CHECK(cp_model_forward_sample(e->model, e->kv, &b, sp, &u, tok));
        } else {
            CP_CHECK(cp_model_forward(e->model, e->kv, &b, NULL));
        }
    }
    return CP_OK;
}

/* Makes sure the blocks covering positions [0, n_pos) are in the table. */
static cp_status ensure_blocks(cp_engine_t e, int *have, int n_pos) {
    int bs = cp_kv_cache_block_size(e->kv);
    int need = (n_pos + bs - 1) / bs;
    if (need > *have) {
        CP_CHECK(cp_kv_cache_alloc_blocks(e->kv, need - *have, e->table + *have));
        *have = need;
    }
    return CP_OK;
}

/* One window of n positions from position 0, its blocks released after:
 * logits or top as feed takes them. */
static cp_status window(cp_engine_t e, const int32_t *tokens, int n, float *logits, const cp_logit_top *top) {
    if (n <= 0 || n > e->n_ctx)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%d tokens do not fit the context of %d", n, e->n_ctx);
    int have = 0;
    cp_status st = ensure_blocks(e, &have, n);
    if (st == CP_OK) st = feed(e, tokens, n, 0, logits, top, NULL, 0, NULL);
    cp_kv_cache_release_blocks(e->kv, e->table, have);
    return st;
}

cp_status cp_engine_logits(cp_engine_t e, const int32_t *tokens, int n, float *logits) {
    return window(e, tokens, n, logits, NULL);
}

cp_status cp_engine_logit_top(cp_engine_t e, const int32_t *tokens, int n, const cp_logit_top *t) {
    if (!t) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_engine_logit_top: NULL output");
    return window(e, tokens, n, NULL, t);
}

cp_status cp_engine_generate(cp_engine_t e, const int32_t *prompt, int n_prompt,
                             const cp_gen_params *p, cp_token_cb cb, void *user,
                             cp_gen_stats *stats) {
    cp_gen_stats local;
    if (!stats) stats = &local;
    memset(stats, 0, sizeof(*stats));
    if (!p) return CP_ERROR(CP_ERR_INVALID_ARG, "no generation parameters");
    if (n_prompt <= 0) return CP_ERROR(CP_ERR_INVALID_ARG, "the prompt is empty");
    if (n_prompt >= e->n_ctx)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the prompt has %d tokens but the context holds %d (raise --ctx-size or "
                        "shorten the prompt)",
                        n_prompt, e->n_ctx);
    stats->n_prompt = n_prompt;
    cp_rng rng;
    cp_rng_seed(&rng, p->seed);
    int have = 0;
    cp_status st;
    double t0 = cp_time_now();
    CP_CHECK_GOTO(ensure_blocks(e, &have, n_prompt), st, done);
    int32_t tok;
    CP_CHECK_GOTO(feed(e, prompt, n_prompt, 0, NULL, NULL, &p->sample, cp_rng_uniform(&rng), &tok), st, done);
    double t1 = cp_time_now();
    stats->prefill_s = t1 - t0;
    int pos = n_prompt;
    for (;;) {
        if (!p->ignore_eos && e->tok && cp_tokenizer_is_eog(e->tok, tok)) {
            stats->stop = CP_STOP_EOS;
            break;
        }
        stats->n_gen++;
        if (cb) {
            const char *piece = "";
            size_t len = 0;
            if (e->tok && tok < cp_tokenizer_n_vocab(e->tok))
                CP_CHECK_GOTO(cp_tokenizer_piece(e->tok, tok, false, &piece, &len), st, done);
            if (!cb(user, tok, piece, len)) {
                stats->stop = CP_STOP_CALLBACK;
                break;
            }
        }
        if (p->max_tokens > 0 && stats->n_gen >= p->max_tokens) {
            stats->stop = CP_STOP_LENGTH;
            break;
        }
        if (pos >= e->n_ctx) {
            stats->stop = CP_STOP_CONTEXT;
            break;
        }
        CP_CHECK_GOTO(ensure_blocks(e, &have, pos + 1), st, done);
        CP_CHECK_GOTO(feed(e, &tok, 1, pos, NULL, NULL, &p->sample, cp_rng_uniform(&rng), &tok), st, done);
        pos++;
    }
    stats->decode_s = cp_time_now() - t1;
    st = CP_OK;
done:
    cp_kv_cache_release_blocks(e->kv, e->table, have);
    return st;
}
