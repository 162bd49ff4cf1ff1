/* cp_distill.h - data for logit distillation: a teacher model continues
 * each prompt of a JSONL file, and the teacher's top-k next-token
 * log-probabilities at every position of prompt + continuation are written
 * beside the token ids (samples.jsonl, three little-endian arrays and
 * meta.json in one directory; the format is described in README.md). */
#ifndef CP_DISTILL_H
#define CP_DISTILL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CP_DISTILL_FORMAT "cparallel-distill"
#define CP_DISTILL_VERSION 1
#define CP_DISTILL_MAX_K 256

/* The prompts of a JSONL file, parsed but not tokenized. */
typedef struct cp_distill_prompts *cp_distill_prompts_t;

/* Reads a prompts file: one JSON object per line, {"prompt": "text"} or
 * {"messages": [{"role": "system"|"developer"|"user"|"assistant",
 * "content": "text"}, ...]}, with an optional "id" (any JSON value, kept as
 * given; else the line's 0-based index in the file). Other fields are
 * ignored; blank lines are skipped. path is borrowed for the call.
 * Errors: CP_ERR_IO (unreadable), CP_ERR_FORMAT (a malformed line, or no
 * prompt at all; the message names the file and the 1-based line number),
 * CP_ERR_OOM. *out is NULL on error; free with cp_distill_prompts_free. */
cp_status cp_distill_prompts_load(const char *path, cp_distill_prompts_t *out);
void cp_distill_prompts_free(cp_distill_prompts_t p);
size_t cp_distill_prompts_count(cp_distill_prompts_t p);
/* How many of the prompts are conversations ("messages"). */
size_t cp_distill_prompts_n_chat(cp_distill_prompts_t p);

/* Makes dir ready for cp_distill_run: creates it (one level) when absent;
 * an existing directory must be empty unless force, in which case the files
 * of an earlier run in it are removed (meta.json first, so that it stops
 * looking complete at once). Errors: CP_ERR_IO (not a directory, cannot
 * create or list it, not empty without force; the message says which). */
cp_status cp_distill_prepare_dir(const char *dir, bool force);

/* Whether plain "prompt" lines go through the chat template. */
typedef enum cp_distill_chat {
    CP_DISTILL_CHAT_AUTO = 0, /* when the teacher has a chat template */
    CP_DISTILL_CHAT_ON,       /* as a user message, always */
    CP_DISTILL_CHAT_OFF,      /* as raw text; a "messages" line is then an error */
} cp_distill_chat;

typedef struct cp_distill_progress {
    size_t done, total; /* prompts */
    int64_t n_gen;      /* tokens generated so far */
    int64_t n_rows;     /* rows written (scored positions) so far */
    double seconds;     /* since the first prompt */
} cp_distill_progress;

typedef struct cp_distill_opts {
    int top_k;         /* K, 1 to CP_DISTILL_MAX_K and at most the vocabulary (<= 0: 20) */
    int max_tokens;    /* tokens to generate per prompt (<= 0: 128) */
    float temperature; /* sampling temperature of the continuation; 0 = greedy */
    float top_p;       /* nucleus mass of the sampling (<= 0 or >= 1: off) */
    uint64_t seed;     /* prompt i (0-based, in file order) samples with seed + i */
    cp_distill_chat chat;
    bool completion_only; /* rows only for the positions that predict continuation tokens */
    bool write;           /* this rank writes the files (rank 0 of a job; the rest only compute) */
    const char *teacher;  /* recorded in meta.json (NULL: the model's path) */
    const char *prompts_path; /* recorded in meta.json and named in messages (NULL ok) */
    /* Called after each prompt on every rank (NULL ok). */
    void (*progress)(void *user, const cp_distill_progress *p);
    void *progress_user;
} cp_distill_opts;

typedef struct cp_distill_result {
    int64_t n_samples;
    int64_t n_rows;                  /* rows of every array */
    int64_t n_prompt_tokens;         /* over all samples */
    int64_t n_gen_tokens;            /* completion tokens over all samples */
    int n_stop, n_length, n_context; /* samples by finish reason */
    int top_k, n_vocab;
    bool chat; /* plain prompts went through the chat template */
    double seconds;
} cp_distill_result;

/* Tokenizes every prompt (checking each fits the teacher's context with at
 * least one token to spare), then for each: generates a continuation with
 * cp_engine_generate (end-of-generation tokens are kept as the last
 * completion token, with finish reason "stop"), runs prompt + continuation
 * through the teacher again in chunks (cp_model_forward_top on the
 * engine's KV cache: each row's K best and log-sum-exp, so tensor parallel
 * ranks pass candidates instead of the vocabulary and host memory stays at
 * one chunk of them) and turns every needed row into log-softmax at
 * temperature 1, in double: the K largest
 * (ids and log-probabilities, descending, ties by lower id) and the
 * log-probability of the token that follows. With opts->write, the results
 * go to out_dir (prepared with cp_distill_prepare_dir) under temporary
 * names renamed at the end, meta.json last: a directory without meta.json
 * is incomplete. teacher and prompts are borrowed for the call.
 * Multi-rank engines: a collective; every rank calls it with the same
 * prompts and options (only the writer touches out_dir). Errors:
 * CP_ERR_INVALID_ARG (bad options, a prompt that is empty or does not fit
 * the context; the message names the line), CP_ERR_IO (writing), CP_ERR_OOM,
 * the engine's errors. */
cp_status cp_distill_run(cp_engine_t teacher, cp_distill_prompts_t prompts, const char *out_dir,
                         const cp_distill_opts *opts, cp_distill_result *out);

#ifdef __cplusplus
}
#endif

#endif /* CP_DISTILL_H */
