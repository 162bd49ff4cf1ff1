/* cp_runtime.h - the runtime's public API for front ends (the CLI, the HTTP
 * server): an engine owns a backend, a model, its tokenizer and a paged KV
 * cache, and generates text for a prompt with seeded sampling. */
#ifndef CP_RUNTIME_H
#define CP_RUNTIME_H

#include "cp_backend.h"
#include "cp_model.h"
#include "cp_tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_engine *cp_engine_t;

typedef struct cp_engine_opts {
    const char *model_path;    /* GGUF file or Hugging Face directory */
    int n_threads;             /* CPU threads; <= 0: all online cores */
    cp_device device;          /* CP_DEVICE_CPU (default) or CP_DEVICE_CUDA */
    int device_id;             /* CUDA device index */
    int n_ctx;                 /* tokens of context per sequence; <= 0: min(training context, 4096) */
    int n_seq;                 /* sequences the KV cache is sized for (>= 1) */
    int kv_block_size;         /* tokens per KV block; <= 0: 16 (rounded up to a multiple of cp) */
    bool kv_f32;               /* store K/V in fp32 instead of the default fp16 */
    cp_dtype kv_dtype;         /* CP_DTYPE_I8_ROW or CP_DTYPE_F8_ROW: quantized K/V rows, a
                                  scale per position and KV head (CPU backend); any other
                                  value: kv_f32 decides */
    bool tokens_only;          /* load no tokenizer: token ids in and out only
                                  (cp_engine_tokenizer returns NULL, pieces are "") */
    bool convert_weights;      /* convert every matrix weight to weight_dtype at load */
    cp_dtype weight_dtype;
    /* Multi-rank (see cp_model_load_opts): every rank of the tp x cp x pp world
     * creates its engine with the same options and calls the same
     * generate/logits functions in the same order. */
    int tp, pp, rank;
    int cp;                    /* context-parallel ranks (0 counts as 1; the world is tp x cp x pp) */
    int cp_exchange;           /* CP_CP_AUTO, CP_CP_QUERIES, CP_CP_KV or CP_CP_RING (see cp_model_load_opts) */
    double cp_ring_bytes;      /* see cp_model_load_opts (0: its default) */
    int edge_layer_discount;
    bool sp;                   /* sequence parallelism for prompts (needs tp > 1) */
    int pp_micro;              /* pipeline micro-batches per batch (0: 4 x pp; see cp_model_load_opts) */
    struct cp_comm *tp_comm, *pp_comm, *cp_comm;
    struct cp_comm *tp_dev_comm, *pp_dev_comm; /* optional (see cp_model_load_opts) */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_engine_opts;

/* Loads the model and tokenizer, allocates the KV cache. Errors as
 * cp_model_load, plus CP_ERR_INVALID_ARG for bad options. */
cp_status cp_engine_init(const cp_engine_opts *opts, cp_engine_t *out);
void cp_engine_free(cp_engine_t e);

cp_model_t cp_engine_model(cp_engine_t e);
cp_tokenizer_t cp_engine_tokenizer(cp_engine_t e);
cp_backend_t cp_engine_backend(cp_engine_t e);
int cp_engine_n_ctx(cp_engine_t e);
/* The engine's paged KV cache (sized for opts.n_seq sequences of n_ctx
 * tokens), for a scheduler that runs many sequences over the same model. */
cp_kv_cache_t cp_engine_kv(cp_engine_t e);

/* A small, fast, seedable generator (xoshiro256**) for sampling. */
typedef struct cp_rng {
    uint64_t s[4];
} cp_rng;
void cp_rng_seed(cp_rng *r, uint64_t seed);
uint64_t cp_rng_next(cp_rng *r);
/* Uniform in [0, 1) with 24 random bits. */
float cp_rng_uniform(cp_rng *r);

typedef enum cp_stop_reason {
    CP_STOP_NONE = 0,
    CP_STOP_EOS,        /* the model produced an end-of-generation token */
    CP_STOP_LENGTH,     /* max_tokens reached */
    CP_STOP_CONTEXT,    /* the context is full */
    CP_STOP_CALLBACK,   /* the token callback asked to stop */
} cp_stop_reason;

typedef struct cp_gen_params {
    cp_sample_params sample;
    uint64_t seed;
    int max_tokens;     /* tokens to generate; <= 0: until EOS or the context is full */
    bool ignore_eos;    /* keep going past end-of-generation tokens (benchmarks) */
} cp_gen_params;

typedef struct cp_gen_stats {
    int n_prompt;
    int n_gen;
    double prefill_s;   /* seconds from start to the first token's logits */
    double decode_s;    /* seconds spent on the following decode steps */
    cp_stop_reason stop;
} cp_gen_stats;

/* Called for each generated token with its text (bytes; a multi-byte UTF-8
 * character may be split across calls). Return false to stop. */
typedef bool (*cp_token_cb)(void *user, int32_t token, const char *piece, size_t len);

/* Generates a continuation of prompt[n_prompt] (token ids) for one
 * sequence. Multi-rank: a collective; every rank samples the same tokens
 * (same seed, same gathered logits) and calls cb. End-of-generation tokens are not passed to cb.
 * Errors: CP_ERR_INVALID_ARG when the prompt is empty or longer than the
 * context (the message gives both lengths), backend errors. */
cp_status cp_engine_generate(cp_engine_t e, const int32_t *prompt, int n_prompt,
                             const cp_gen_params *p, cp_token_cb cb, void *user,
                             cp_gen_stats *stats);

/* Runs prompt[n] through the model and writes the logits of every position
 * to logits[n][n_vocab] (host memory), for evaluation and tests. logits
 * NULL: no logits at all (no LM head), for a pass that only feeds an
 * activation observer (cp_model_set_observer). */
cp_status cp_engine_logits(cp_engine_t e, const int32_t *tokens, int n, float *logits);

/* Like cp_engine_logits, with every position's row as cp_logit_top (row i
 * of t's arrays is position i): candidates, log-sum-exps and target logits
 * without gathering the vocabulary across tensor-parallel ranks. */
cp_status cp_engine_logit_top(cp_engine_t e, const int32_t *tokens, int n, const cp_logit_top *t);

#ifdef __cplusplus
}
#endif

#endif /* CP_RUNTIME_H */
