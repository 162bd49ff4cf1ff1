/* server_impl.h - what the HTTP server's files share: a growable string,
 * the parsed form of an OpenAI request, its OpenAI-shaped responses
 * (api.c) and the Prometheus metrics (metrics.c). Private to runtime/server. */
#ifndef CP_SERVER_IMPL_H
#define CP_SERVER_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cp_runtime.h"
#include "cp_sched.h"

#include <jansson.h>

/* ---- growable string (str.c) ----------------------------------------------- */

typedef struct sbuf {
    char *p; /* NUL-terminated when len > 0 */
    size_t len, cap;
    bool oom;
} sbuf;

void sb_add(sbuf *b, const char *s, size_t n);
void sb_str(sbuf *b, const char *s);
void sb_printf(sbuf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void sb_free(sbuf *b);

/* Length of the longest prefix of s[0..n) that is valid UTF-8. */
size_t utf8_valid_prefix(const char *s, size_t n);
/* A JSON string of s[0..n): invalid UTF-8 bytes become U+FFFD. New reference. */
json_t *json_text(const char *s, size_t n);
/* a == b in time that depends on the lengths only. */
bool const_time_equal(const char *a, size_t na, const char *b, size_t nb);

/* ---- requests and responses (api.c) -------------------------------------- */

typedef enum api_kind { API_COMPLETIONS, API_CHAT } api_kind;

typedef struct api_error {
    int status;       /* HTTP status */
    const char *type; /* "invalid_request_error", ... */
    char param[96];   /* the offending field, "" for none */
    char code[48];    /* machine-readable code, "" for none */
    char message[640];
} api_error;

/* What the API layer needs of the server (all borrowed). */
typedef struct api_ctx {
    cp_tokenizer_t tok;
    int n_ctx;
    int max_tokens_limit;
    const char *model_name;
} api_ctx;

/* A validated generation request. */
typedef struct gen_spec {
    api_kind kind;
    int32_t *prompt; /* [n_prompt] malloc'd */
    int n_prompt;
    int max_tokens;
    cp_sample_params sample;
    uint64_t seed;
    bool seed_given;
    char *stop[CP_SCHED_MAX_STOP]; /* malloc'd */
    int n_stop;
    int top_logprobs; /* -1: no logprobs */
    bool stream, include_usage, ignore_eos;
    bool continuous_usage; /* stream_options.continuous_usage_stats: usage on every chunk */
    char *prompt_text; /* the text the prompt was encoded from (for --log-prompts) */
} gen_spec;

/* Parses and validates a request body of kind k. On failure fills *err (a
 * 4xx) and returns false; *out is then empty. */
bool api_parse(const api_ctx *ctx, api_kind k, const char *body, size_t len, gen_spec *out,
               api_error *err);
void gen_spec_free(gen_spec *g);

/* Tokens with their log-probabilities, as the scheduler delivered them. */
typedef struct lp_list {
    int n, cap, k;            /* k alternatives per token */
    int32_t *tokens;          /* [n] */
    cp_sched_logprob *chosen; /* [n] */
    cp_sched_logprob *top;    /* [n][k] */
} lp_list;

void lp_append(lp_list *l, int n, const int32_t *tokens, const cp_sched_logprob *chosen,
               const cp_sched_logprob *top);
void lp_free(lp_list *l);

/* The final result of a non-streamed request. */
typedef struct gen_result {
    const char *text;
    size_t len;
    const lp_list *lp; /* NULL: no logprobs */
    cp_finish_reason finish;
    int n_prompt, n_generated, n_cached;
} gen_result;

/* The complete response body (malloc'd JSON text). */
char *api_response(const api_ctx *ctx, api_kind k, const char *id, long created,
                   const gen_result *r);

/* One streamed chunk's JSON (malloc'd). text/lp may be empty/NULL; finish
 * NONE leaves finish_reason null; role_only writes the chat's opening
 * {"role":"assistant"} delta. usage_null adds "usage": null (include_usage);
 * usage_now adds the counts so far instead (continuous_usage_stats). */
typedef struct chunk_args {
    const char *text;
    size_t len;
    const lp_list *lp;  /* tokens of this chunk, NULL: logprobs not requested */
    size_t text_offset; /* completions: byte offset of this chunk's text */
    cp_finish_reason finish;
    bool role_only;
    bool usage_null;
    bool usage_now;
    int n_prompt, n_generated, n_cached; /* usage_now */
} chunk_args;
char *api_chunk(const api_ctx *ctx, api_kind k, const char *id, long created, const chunk_args *a);
/* The closing usage chunk (choices: []). */
char *api_usage_chunk(const api_ctx *ctx, api_kind k, const char *id, long created, int n_prompt,
                      int n_generated, int n_cached);
/* {"error": {...}} */
char *api_error_body(const api_error *e);
void api_set_error(api_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
/* GET /v1/models (the list) and GET /v1/models/{name} (the one model). */
char *api_models(const api_ctx *ctx, long created);
/* {"status": state, "region": region or null} of /health and /health/ready. */
char *api_health(const char *state, const char *region);
char *api_model(const api_ctx *ctx, long created);

/* ---- metrics (metrics.c) -------------------------------------------------- */

typedef enum metric_endpoint {
    EP_COMPLETIONS,
    EP_CHAT,
    EP_MODELS,
    EP_HEALTH,
    EP_READY,
    EP_METRICS,
    EP_OTHER,
    EP_COUNT,
} metric_endpoint;

const char *metric_endpoint_path(metric_endpoint ep);

typedef struct metrics metrics;
metrics *metrics_new(void);
void metrics_free(metrics *m);
void metrics_request(metrics *m, metric_endpoint ep, int status, double duration_s);
void metrics_tokens(metrics *m, int prompt, int generated);
void metrics_ttft(metrics *m, double s);
void metrics_tpot(metrics *m, double s);
/* What the deployment says of itself in /metrics. */
typedef struct metrics_info {
    const char *model, *region; /* region NULL: none */
    bool ready;                 /* admitting requests (not draining, not failed) */
    bool faulted;
} metrics_info;
/* The Prometheus text exposition (malloc'd), with the scheduler's gauges. */
char *metrics_render(metrics *m, const cp_sched_stats *st, const metrics_info *info);

#endif /* CP_SERVER_IMPL_H */
