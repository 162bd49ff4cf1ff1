/* cli_optimize.c - what the model-rewriting commands (quantize, prune)
 * share: the default texts, calibration statistics, progress, and the
 * accuracy measurement of the written model against the original. */
#include "cli_optimize.h"

#include "cli.h"
#include "cp_eval.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A chapter of the Python tutorial from Debian's python3-doc (English prose
 * nobody on this project wrote), or NULL when it is not installed. The
 * evaluation text is "appetite"; AWQ calibrates on "controlflow", so that
 * the evaluation is not on the text the scales fit. */
const char *cli_tutorial_chapter(const char *chapter, char *path, size_t cap) {
    static const char *const versions[] = {"python3.11", "python3.12", "python3.13", "python3"};
    if (!path || cap == 0) return NULL;
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]); i++) {
        snprintf(path, cap, "/usr/share/doc/%s/html/_sources/tutorial/%s.rst.txt", versions[i], chapter);
        if (access(path, R_OK) == 0) return path;
    }
    return NULL;
}

/* Activation statistics of the original model over calibration text. */
int cli_calibrate(const char *cmd, const char *model, const char *calib, int tokens, int threads, cp_act_stats **out) {
    size_t len = 0;
    char *body = NULL;
    if (!cli_read_file(cmd, "calibration text", calib, 256, &body, &len)) return 1;
    cp_engine_opts eo = {.model_path = model, .n_threads = threads, .n_ctx = 512, .n_seq = 1, .kv_f32 = true};
    cp_engine_t e = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 1;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error("cannot load the model");
        goto out;
    }
    if (cp_tokenizer_encode(cp_engine_tokenizer(e), body, len, true, false, &ids, &n) != CP_OK) {
        cli_report_error("cannot tokenize the calibration text");
        goto out;
    }
    if (n > (size_t)tokens) n = (size_t)tokens;
    if (cp_act_stats_collect(e, ids, n, 512, out) != CP_OK) {
        cli_report_error("calibration failed");
        goto out;
    }
    printf("calibration       %s: %zu tokens\n", calib, n);
    rc = 0;
out:
    free(ids);
    free(body);
    cp_engine_free(e);
    return rc;
}

void cli_write_progress(void *user, size_t done, size_t total) {
    cli_write_progress_state *p = user;
    int pct = total ? (int)(100 * done / total) : 100;
    if (pct / 10 == p->last / 10) return;
    p->last = pct;
    fprintf(stderr, "cparallel: %s %3d%%\n", p->cmd, pct);
}

/* Measures the written model against the original; 0 when it may be kept. */
int cli_measure(const char *cmd, const char *orig, const char *quant, const char *text, int ctx, int max_tokens,
                   int threads, double max_increase, bool force, double *increase) {
    size_t len = 0;
    char *body = NULL;
    if (!cli_read_file(cmd, "evaluation text", text, 256, &body, &len)) return 1;
    cp_engine_opts eo = {.model_path = orig, .n_threads = threads, .n_ctx = ctx, .n_seq = 1,
                         .kv_f32 = true};
    cp_engine_t r = NULL, m = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 1;
    if (cp_engine_init(&eo, &r) != CP_OK) {
        cli_report_error("cannot load the original model");
        goto out;
    }
    eo.model_path = quant;
    if (cp_engine_init(&eo, &m) != CP_OK) {
        cli_report_error("cannot load the new model");
        goto out;
    }
    if (cp_tokenizer_encode(cp_engine_tokenizer(r), body, len, true, false, &ids, &n) != CP_OK) {
        cli_report_error("cannot tokenize the evaluation text");
        goto out;
    }
    if (max_tokens > 0 && n > (size_t)max_tokens) n = (size_t)max_tokens;
    cp_eval_opts o = {.ctx = ctx};
    cp_eval_result res;
    if (cp_eval_text(m, r, ids, n, &o, &res) != CP_OK) {
        cli_report_error("the evaluation failed");
        goto out;
    }
    *increase = res.ppl / res.ref_ppl - 1;
    printf("evaluation text   %s: %zu tokens, windows of %d\n", text, n, res.ctx);
    printf("perplexity        original %.4f, %s %.4f (%+.2f%%; bound %+.2f%%)\n",
           res.ref_ppl, !strcmp(cmd, "quantize") ? "quantized" : "pruned", res.ppl, 100 * *increase, 100 * max_increase);
    printf("KL(orig || new)   mean %.5f  median %.5f  p99 %.5f  max %.5f  nats/token\n",
           res.kl_mean, res.kl_p50, res.kl_p99, res.kl_max);
    printf("top-1 agreement   %.2f%%\n", 100 * res.top1);
    rc = *increase > max_increase && !force ? 3 : 0;
out:
    free(ids);
    free(body);
    cp_engine_free(m);
    cp_engine_free(r);
    return rc;
}

