/* cp_eval.h - measures a model on text: perplexity with a sliding window,
 * and, against a reference model over the same windows, the per-token KL
 * divergence KL(reference || model) and top-1 agreement. What the
 * optimizing commands (quantize, prune, distil) report and gate on. */
#ifndef CP_EVAL_H
#define CP_EVAL_H

#include <stddef.h>
#include <stdint.h>

#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_eval_opts {
    int ctx;    /* tokens per window (<= 0: min(512, the engine's context)) */
    int stride; /* tokens the window moves by, 1 to ctx - 1 (<= 0: ctx / 2); each
                   token after the first window is predicted from at least
                   ctx - stride tokens before it */
    /* Called after each window with the tokens scored so far and in all. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_eval_opts;

#define CP_EVAL_BATCH 32
#define CP_EVAL_MIN_BATCHES 5

typedef struct cp_eval_result {
    int64_t n_scored; /* tokens predicted (every token but the first) */
    int n_windows;
    int ctx, stride;   /* as used */
    double nll;        /* mean negative log-likelihood, nats per token */
    double ppl;        /* exp(nll) */
    /* with a reference (else zero) */
    double ref_nll, ref_ppl;
    double kl_mean, kl_p50, kl_p99, kl_max; /* KL(ref || model), nats per token */
    double top1;                            /* share of positions with the same argmax */
    /* A 95% interval of ppl / ref_ppl: exp(mean d +- t * se), d the
     * per-token difference of the two negative log-likelihoods and se its
     * standard error from the means of consecutive batches of
     * CP_EVAL_BATCH scored tokens (neighbouring tokens' d are correlated;
     * batches far less), t Student's for batches - 1 degrees of freedom.
     * 0 and 0 with fewer than CP_EVAL_MIN_BATCHES whole batches. */
    double ratio_lo, ratio_hi;
    int n_batches;
    double seconds;
} cp_eval_result;

/* Scores tokens[n] (n >= 2) with m, and with ref when it is not NULL (same
 * vocabulary). Windows [begin, begin + ctx) start every stride tokens; each
 * token is scored once, in the first window that holds it with the context
 * before it (sliding-window perplexity). Multi-rank engines: a collective,
 * every rank gets the same result. Errors: CP_ERR_INVALID_ARG (fewer than
 * 2 tokens, a window larger than an engine's context, stride >= ctx,
 * different vocabularies), CP_ERR_OOM, the engines' errors. */
cp_status cp_eval_text(cp_engine_t m, cp_engine_t ref, const int32_t *tokens, size_t n,
                       const cp_eval_opts *opts, cp_eval_result *out);

#ifdef __cplusplus
}
#endif

#endif /* CP_EVAL_H */
