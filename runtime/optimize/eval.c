/* eval.c - sliding-window perplexity, and KL divergence and top-1
 * agreement against a reference, computed in double precision. Against a
 * reference from the full logits of each window (cp_engine_logits); alone
 * from each row's log-sum-exp and the next token's logit
 * (cp_engine_logit_top), so tensor-parallel ranks do not gather the
 * vocabulary; on one rank both give the same bits. */
#include "cp_eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cp_model.h"

/* log-sum-exp of z[V] and its argmax (first of ties). */
static double lse_argmax(const float *z, int V, int *amax) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    double mx = z[best], s = 0;
    for (int v = 0; v < V; v++)
        s += exp((double)z[v] - mx);
    *amax = best;
    return mx + log(s);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double quantile(const double *sorted, int64_t n, double q) {
    if (n <= 0) return 0;
    double at = q * (double)(n - 1);
    int64_t i = (int64_t)at;
    if (i >= n - 1) return sorted[n - 1];
    double f = at - (double)i;
    return sorted[i] * (1 - f) + sorted[i + 1] * f;
}

/* Two-sided 95% quantile of Student's t with df degrees of freedom. */
static double t95(int df) {
    static const double t[30] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306,
                                 2.262,  2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
                                 2.110,  2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                                 2.060,  2.056, 2.052, 2.048, 2.045, 2.042};
    if (df < 1) return INFINITY;
    if (df <= 30) return t[df - 1];
    return df <= 60 ? 2.000 : (df <= 120 ? 1.980 : 1.960);
}

/* The interval of cp_eval_result from the per-token differences d[n]. */
static void ratio_interval(const double *d, int64_t n, cp_eval_result *out) {
    const int64_t nb = n / CP_EVAL_BATCH;
    out->n_batches = (int)nb;
    if (nb < CP_EVAL_MIN_BATCHES) return;
    double mean = 0, sb = 0, sbb = 0;
    for (int64_t i = 0; i < n; i++) mean += d[i];
    mean /= (double)n;
    for (int64_t b = 0; b < nb; b++) {
        double m = 0;
        for (int i = 0; i < CP_EVAL_BATCH; i++) m += d[b * CP_EVAL_BATCH + i];
        m /= CP_EVAL_BATCH;
        sb += m;
        sbb += m * m;
    }
    const double bm = sb / (double)nb, var = (sbb - (double)nb * bm * bm) / (double)(nb - 1);
    const double half = t95((int)nb - 1) * sqrt(var > 0 ? var : 0) / sqrt((double)nb);
    out->ratio_lo = exp(mean - half);
    out->ratio_hi = exp(mean + half);
}

cp_status cp_eval_text(cp_engine_t m, cp_engine_t ref, const int32_t *tokens, size_t n,
                       const cp_eval_opts *opts, cp_eval_result *out) {
    if (!m || !tokens || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_eval_text: NULL argument");
    memset(out, 0, sizeof(*out));
    if (n < 2) return CP_ERROR(CP_ERR_INVALID_ARG, "the text has %zu token(s); at least 2 are needed", n);
    cp_eval_opts o = opts ? *opts : (cp_eval_opts){0};
    int n_ctx = cp_engine_n_ctx(m);
    if (ref && cp_engine_n_ctx(ref) < n_ctx) n_ctx = cp_engine_n_ctx(ref);
    int ctx = o.ctx > 0 ? o.ctx : (n_ctx < 512 ? n_ctx : 512);
    if (ctx > n_ctx)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "a window of %d tokens does not fit the context of %d (raise --ctx-size or "
                        "lower --ctx)",
                        ctx, n_ctx);
    if (ctx < 2) return CP_ERROR(CP_ERR_INVALID_ARG, "a window needs at least 2 tokens, not %d", ctx);
    int stride = o.stride > 0 ? o.stride : ctx / 2;
    /* the token a window starts with has no prediction inside it: windows
     * overlap by at least one token so that every token is scored */
    if (stride > ctx - 1)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "a stride of %d would leave tokens unscored: it must be below the window "
                        "(%d)",
                        stride, ctx);
    const int V = cp_model_get_config(cp_engine_model(m))->n_vocab;
    if (ref && cp_model_get_config(cp_engine_model(ref))->n_vocab != V)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the reference has a vocabulary of %d tokens, the model %d: they must "
                        "share one tokenizer",
                        cp_model_get_config(cp_engine_model(ref))->n_vocab, V);
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return CP_ERROR(CP_ERR_INVALID_ARG, "token %zu is %d, outside the vocabulary of %d", i,
                            (int)tokens[i], V);

    cp_status st = CP_OK;
    float *zm = ref ? malloc((size_t)ctx * V * sizeof(float)) : NULL;
    float *zr = ref ? malloc((size_t)ctx * V * sizeof(float)) : NULL;
    double *kl = ref ? malloc(n * sizeof(double)) : NULL;
    double *dn = ref ? malloc(n * sizeof(double)) : NULL; /* per-token nll(m) - nll(ref) */
    /* alone: per row its best logit and id, log-sum-exp, next token's logit */
    float *bv = malloc((size_t)ctx * sizeof(float)), *tl = malloc((size_t)ctx * sizeof(float));
    int32_t *bi = malloc((size_t)ctx * sizeof(int32_t));
    double *lse = malloc((size_t)ctx * sizeof(double));
    uint8_t *need = malloc((size_t)ctx);
    if ((ref && (!zm || !zr || !kl || !dn)) || !bv || !tl || !bi || !lse || !need) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for the logits of a %d-token window (%d tokens "
                      "of vocabulary)", ctx, V);
        goto done;
    }
    double t0 = cp_time_now(), nll = 0, ref_nll = 0;
    int64_t scored = 0, agree = 0;
    size_t prev_end = 0;
    for (size_t begin = 0;; begin += (size_t)stride) {
        size_t end = begin + (size_t)ctx < n ? begin + (size_t)ctx : n;
        size_t first = prev_end > begin + 1 ? prev_end : begin + 1;
        int len = (int)(end - begin);
        if (ref) {
            CP_CHECK_GOTO(cp_engine_logits(m, tokens + begin, len, zm), st, done);
            CP_CHECK_GOTO(cp_engine_logits(ref, tokens + begin, len, zr), st, done);
        } else {
            /* row i predicts tokens[begin + i + 1]; the last row nothing */
            for (int i = 0; i < len; i++) need[i] = i + 1 < len ? CP_TOP_LSE | CP_TOP_TARGET : 0;
            const cp_logit_top top = {.k = 1,
                                      .need = need,
                                      .val = bv,
                                      .id = bi,
                                      .lse = lse,
                                      .target = tokens + begin + 1,
                                      .target_logit = tl};
            CP_CHECK_GOTO(cp_engine_logit_top(m, tokens + begin, len, &top), st, done);
        }
        for (size_t t = first; t < end; t++) {
            const size_t row = t - 1 - begin;
            if (!ref) {
                nll -= (double)tl[row] - lse[row];
                scored++;
                continue;
            }
            const float *a = zm + row * (size_t)V;
            int am, ar;
            double lm = lse_argmax(a, V, &am);
            nll -= (double)a[tokens[t]] - lm;
            const float *b = zr + row * (size_t)V;
            double lr = lse_argmax(b, V, &ar);
            ref_nll -= (double)b[tokens[t]] - lr;
            dn[scored] = ((double)b[tokens[t]] - lr) - ((double)a[tokens[t]] - lm);
            double d = 0;
            for (int v = 0; v < V; v++) {
                double lpr = (double)b[v] - lr, lpm = (double)a[v] - lm;
                d += exp(lpr) * (lpr - lpm);
            }
            kl[scored] = d > 0 ? d : 0; /* rounding can leave -1e-17 */
            agree += am == ar;
            scored++;
        }
        out->n_windows++;
        prev_end = end;
        if (o.progress) o.progress(o.progress_user, end, n);
        if (end == n) break;
    }
    out->n_scored = scored;
    out->ctx = ctx;
    out->stride = stride;
    out->nll = nll / (double)scored;
    out->ppl = exp(out->nll);
    if (ref) {
        out->ref_nll = ref_nll / (double)scored;
        out->ref_ppl = exp(out->ref_nll);
        ratio_interval(dn, scored, out);
        double sum = 0;
        for (int64_t i = 0; i < scored; i++)
            sum += kl[i];
        qsort(kl, (size_t)scored, sizeof(double), cmp_double);
        out->kl_mean = sum / (double)scored;
        out->kl_p50 = quantile(kl, scored, 0.50);
        out->kl_p99 = quantile(kl, scored, 0.99);
        out->kl_max = kl[scored - 1];
        out->top1 = (double)agree / (double)scored;
    }
    out->seconds = cp_time_now() - t0;
done:
    free(zm);
    free(zr);
    free(kl);
    free(dn);
    free(bv);
    free(tl);
    free(bi);
    free(lse);
    free(need);
    return st;
}
