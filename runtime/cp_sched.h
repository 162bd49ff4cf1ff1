/* cp_sched.h - the serving scheduler: continuous (iteration-level) batching
 * of many generation requests over one engine's model and paged KV cache.
 * Requests join and leave the running batch at every step; long prompts are
 * prefilled in chunks mixed with the decode tokens of running sequences;
 * admission is by free KV blocks, and when blocks run out the newest running
 * sequence is preempted (its blocks freed, recomputed later). Full prompt
 * blocks are shared between requests with the same prefix (prefix cache).
 *
 * Threads: cp_sched_submit / cp_sched_cancel / cp_sched_get_stats may be
 * called from any thread; cp_sched_step from one thread only (the loop that
 * owns the engine), which is also the thread every callback runs on. */
#ifndef CP_SCHED_H
#define CP_SCHED_H

#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_sched *cp_sched_t;

#define CP_SCHED_CPU_STEP_TOKENS 128

typedef struct cp_sched_opts {
    int max_running;      /* sequences in the running batch (<= 0: 64) */
    int max_waiting;      /* queued requests before submit answers CP_ERR_BUSY (<= 0: 256) */
    int max_step_tokens;  /* tokens per forward step, decodes + prefill chunks
                             (<= 0: the model's max batch; on the CPU backend
                             at most CP_SCHED_CPU_STEP_TOKENS or max_running) */
    int prefill_chunk;    /* prompt tokens of one sequence per step (<= 0: 256;
                             pipelined with fewer requests than depth:
                             max_step_tokens / (4 x depth), at least 16) */
    bool no_prefix_cache; /* do not share prompt blocks between requests */
    /* Multi-rank serving (see cp_step_link.h): forward runs each step
     * instead of cp_model_forward_top (same contract), and idle is called by
     * cp_sched_step when it ran no step; an idle error is returned by
     * cp_sched_step (the scheduler cannot go on). NULL: cp_model_forward_top,
     * nothing. Both run on the stepping thread with hook_user. */
    cp_status (*forward)(void *user, const cp_batch *b, const cp_logit_top *out);
    cp_status (*idle)(void *user);
    void *hook_user;
    /* Pipelined serving: with depth > 1 and both hooks, forward only starts
     * a step (its out is written later) and finish(user, out) waits for
     * the oldest started step, whose output is out; up to depth steps (at
     * most CP_SCHED_MAX_DEPTH) are in flight, each over different
     * sequences, so every pipeline stage can work on one. A failed forward
     * or finish ends that step's requests with the error. */
    int depth;
    cp_status (*finish)(void *user, const cp_logit_top *out);
} cp_sched_opts;

#define CP_SCHED_MAX_DEPTH 16

#define CP_SCHED_MAX_STOP 8       /* stop strings per request */
#define CP_SCHED_MAX_LOGPROBS 20  /* top logprobs per token */

typedef struct cp_sched_request {
    const int32_t *prompt;  /* [n_prompt] token ids, copied */
    int n_prompt;           /* >= 1; prompt + max_tokens must fit the context */
    int max_tokens;         /* >= 1 */
    cp_sample_params sample;
    uint64_t seed;          /* the request's own generator: same seed, same text
                               whatever else runs beside it */
    const char *const *stop;/* [n_stop] stop strings (copied); the text before
                               the first match is returned, the match is not */
    int n_stop;             /* 0..CP_SCHED_MAX_STOP */
    int top_logprobs;       /* 0..CP_SCHED_MAX_LOGPROBS alternatives per token;
                               -1: no logprobs at all; 0: the chosen token's only */
    bool ignore_eos;
} cp_sched_request;

typedef enum cp_finish_reason {
    CP_FINISH_NONE = 0,   /* more events follow */
    CP_FINISH_STOP,       /* end-of-generation token or a stop string */
    CP_FINISH_LENGTH,     /* max_tokens, or the context is full */
    CP_FINISH_CANCELLED,  /* cp_sched_cancel, or the scheduler shut down */
    CP_FINISH_ERROR,      /* a backend error ended the request; see error */
} cp_finish_reason;

typedef struct cp_sched_logprob {
    int32_t token;
    float logprob;        /* natural log of the probability under the model's
                             distribution before sampling filters (temperature 1) */
} cp_sched_logprob;

/* One delivery to a request's callback. Pointers are valid during the call
 * only. Text arrives as complete UTF-8 (a character split across tokens is
 * held back), with any stop string and what follows it removed. */
typedef struct cp_sched_event {
    int64_t id;
    const char *text;     /* new text since the previous event (may be empty) */
    size_t len;
    int n_tokens;         /* tokens this event covers (0 on a final event that only finishes) */
    const int32_t *tokens;            /* [n_tokens] */
    const cp_sched_logprob *logprobs; /* [n_tokens] chosen tokens, when requested */
    const cp_sched_logprob *top;      /* [n_tokens][top_logprobs], when requested */
    cp_finish_reason finish;          /* != NONE on the last event of the request */
    int n_prompt, n_generated;        /* usage so far */
    int n_cached;                     /* prompt tokens served from the prefix cache */
    double ttft_s;                    /* submit to first token (0 before it) */
    const char *error;                /* CP_FINISH_ERROR: what went wrong */
} cp_sched_event;

/* Called on the stepping thread; must return quickly (queue the data). */
typedef void (*cp_sched_cb)(void *user, const cp_sched_event *ev);

/* The engine is borrowed and must outlive the scheduler; it must have been
 * created with a tokenizer (text and stop strings) and n_seq >= max_running
 * sequences of KV cache. Errors: CP_ERR_INVALID_ARG, CP_ERR_OOM. */
cp_status cp_sched_init(cp_engine_t e, const cp_sched_opts *o, cp_sched_t *out);

/* Ends every request (CP_FINISH_CANCELLED events from the calling thread),
 * frees everything. NULL is a no-op. */
void cp_sched_free(cp_sched_t s);

/* Queues a request; *id names it in events and cancel. Errors:
 * CP_ERR_INVALID_ARG (empty prompt, prompt + max_tokens longer than the
 * context: the message gives the numbers), CP_ERR_BUSY (the queue is
 * full), CP_ERR_UNSUPPORTED (the scheduler is draining: see cp_sched_drain). */
cp_status cp_sched_submit(cp_sched_t s, const cp_sched_request *r, cp_sched_cb cb, void *user,
                          int64_t *id);

/* Ends a request at the next step (its KV blocks are freed then, and its
 * callback gets a final CP_FINISH_CANCELLED event). Unknown or finished ids
 * are ignored. */
void cp_sched_cancel(cp_sched_t s, int64_t id);

/* Stops admitting new requests (submit answers CP_ERR_UNSUPPORTED); the
 * queued and running ones go on. */
void cp_sched_drain(cp_sched_t s);

/* One iteration: admit waiting requests, run one forward step over the
 * running batch (decode tokens plus prefill chunks), sample, deliver
 * events. Blocks up to wait_ms (< 0: until a request or cp_sched_wake) for
 * a request when there is nothing to do.
 * *worked tells whether a forward step ran. Errors: only a broken
 * scheduler (the requests of a failed step end with CP_FINISH_ERROR and the
 * call returns CP_OK). */
cp_status cp_sched_step(cp_sched_t s, int wait_ms, bool *worked);

/* Wakes a cp_sched_step blocked in its wait (e.g. at shutdown). */
void cp_sched_wake(cp_sched_t s);

typedef struct cp_sched_stats {
    int running, waiting;
    int kv_blocks_used, kv_blocks_free;      /* free includes blocks only the prefix cache
                                                holds (reusable, evicted on demand) */
    int64_t prefix_lookups, prefix_hits;     /* full prompt blocks looked up / found */
    int64_t prompt_tokens, generated_tokens; /* totals since init */
    int64_t preemptions, steps;
    int64_t failed_steps;                    /* forward steps that failed (their requests
                                                ended with CP_FINISH_ERROR) */
    double last_step_s;                      /* duration of the latest forward step */
} cp_sched_stats;

void cp_sched_get_stats(cp_sched_t s, cp_sched_stats *st);

#ifdef __cplusplus
}
#endif

#endif /* CP_SCHED_H */
