/* cmd_quantize.c - `cparallel quantize`: writes the quantized model to a
 * temporary file next to the output, measures it against the original on
 * evaluation text (perplexity, KL, top-1 agreement), and renames it into
 * place only when the perplexity increase is within --max-ppl-increase
 * (or --force). */
#include "cmd_quantize.h"

#include "cli.h"
#include "cp_eval.h"
#include "cp_quantize.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* A chapter of the Python tutorial from Debian's python3-doc (English prose
 * nobody on this project wrote), or NULL when it is not installed. The
 * evaluation text is "appetite"; AWQ calibrates on "controlflow", so that
 * the evaluation is not on the text the scales fit. */
static const char *tutorial_chapter(const char *chapter, char *path, size_t cap) {
    static const char *const versions[] = {"python3.11", "python3.12", "python3.13", "python3"};
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]); i++) {
        snprintf(path, cap, "/usr/share/doc/%s/html/_sources/tutorial/%s.rst.txt", versions[i], chapter);
        if (access(path, R_OK) == 0) return path;
    }
    return NULL;
}

/* Activation statistics of the original model over calibration text. */
static int calibrate(const char *model, const char *calib, int tokens, int threads, cp_act_stats **out) {
    size_t len = 0;
    char *body = NULL;
    if (!cli_read_file("quantize", "calibration text", calib, 256, &body, &len)) return 1;
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

static void on_progress(void *user, size_t done, size_t total) {
    int *last = user;
    int pct = total ? (int)(100 * done / total) : 100;
    if (pct / 10 == *last / 10) return;
    *last = pct;
    fprintf(stderr, "cparallel: quantize %3d%%\n", pct);
}

/* Measures the written model against the original; 0 when it may be kept. */
static int measure(const char *orig, const char *quant, const char *text, int ctx, int max_tokens,
                   int threads, double max_increase, bool force, double *increase) {
    size_t len = 0;
    char *body = NULL;
    if (!cli_read_file("quantize", "evaluation text", text, 256, &body, &len)) return 1;
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
        cli_report_error("cannot load the quantized model");
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
    printf("perplexity        original %.4f, quantized %.4f (%+.2f%%; bound %+.2f%%)\n",
           res.ref_ppl, res.ppl, 100 * *increase, 100 * max_increase);
    printf("KL(orig || quant) mean %.5f  median %.5f  p99 %.5f  max %.5f  nats/token\n",
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

int cp_cli_quantize(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *type = NULL, *text = NULL, *calib = NULL;
    char text_buf[256], calib_buf[256];
    int ctx = 512, max_tokens = 4096, threads = 0, calib_tokens = 1024;
    float max_increase = 5.0f;
    bool force = false, no_eval = false, no_progress = false;
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &in, 0, -1, "PATH", "the GGUF model to quantize (required)", NULL},
        {"out", 'o', CLI_STR, &out, 0, -1, "PATH", "where to write the GGUF result (required)",
         NULL},
        {"type", 't', CLI_STR, &type, 0, -1, "TYPE",
         "weight type of the matrices: " CLI_CONVERT_TYPES ", or awq (int4-g128 with activation-aware "
         "scales) (required)", NULL},
        {"calib", 0, CLI_STR, &calib, 0, -1, "FILE",
         "awq: calibration text (default: another chapter of the Python tutorial)", NULL},
        {"calib-tokens", 0, CLI_INT, &calib_tokens, 2, 1 << 24, "N", "awq: calibrate on N tokens (1024)", NULL},
        {"eval-text", 0, CLI_STR, &text, 0, -1, "FILE",
         "text the accuracy is measured on (default: the Python tutorial of python3-doc)", NULL},
        {"eval-ctx", 0, CLI_INT, &ctx, 2, 1 << 20, "N", "tokens per evaluation window (512)",
         NULL},
        {"eval-tokens", 0, CLI_INT, &max_tokens, 2, 1 << 30, "N",
         "score at most N tokens of the text (4096)", NULL},
        {"max-ppl-increase", 0, CLI_FLOAT, &max_increase, 0, 1e6, "PCT",
         "refuse to write when perplexity rises by more than PCT percent (default 5)", NULL},
        {"force", 0, CLI_FLAG, &force, 0, -1, NULL, "write even past the bound", NULL},
        {"no-eval", 0, CLI_FLAG, &no_eval, 0, -1, NULL,
         "skip the measurement and the bound (nothing is checked)", NULL},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N", "CPU threads (default: all cores)", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print progress", NULL},
        {0},
    };
    int rc = cli_parse("quantize", "--model IN --out OUT --type TYPE [options]", opts, argc, argv,
                       2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!in || !out || !type) {
        fprintf(stderr, "cparallel quantize: error: --model, --out and --type are required (see "
                        "'cparallel quantize --help')\n");
        return 2;
    }
    cp_dtype t;
    const bool awq = !strcasecmp(type, "awq");
    if (awq) {
        t = CP_DTYPE_I4_G128;
    } else if (!cli_parse_convert(type, &t)) {
        fprintf(stderr, "cparallel quantize: error: invalid value '%s' for --type (expected "
                        CLI_CONVERT_TYPES ")\n", type);
        return 2;
    }
    if (!no_eval && !text && !(text = tutorial_chapter("appetite", text_buf, sizeof(text_buf)))) {
        fprintf(stderr, "cparallel quantize: error: no evaluation text: give --eval-text FILE "
                        "(or install python3-doc, or skip the check with --no-eval)\n");
        return 2;
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.partial-%ld", out, (long)getpid()) >= (int)sizeof(tmp)) {
        fprintf(stderr, "cparallel quantize: error: --out is too long\n");
        return 2;
    }
    int last = -1;
    cp_act_stats *stats = NULL;
    if (awq) {
        if (!calib && !(calib = tutorial_chapter("controlflow", calib_buf, sizeof(calib_buf)))) {
            fprintf(stderr, "cparallel quantize: error: awq needs calibration text: give --calib FILE "
                            "(or install python3-doc)\n");
            return 2;
        }
        if (calibrate(in, calib, calib_tokens, threads, &stats)) return 1;
    }
    cp_quantize_opts qo = {.type = t, .awq = stats, .progress = no_progress ? NULL : on_progress,
                           .progress_user = &last};
    cp_quantize_stats qs;
    double t0 = cp_time_now();
    cp_status qst = cp_quantize_gguf(in, tmp, &qo, &qs);
    cp_act_stats_free(stats);
    if (qst != CP_OK) {
        cli_report_error("cannot quantize the model");
        unlink(tmp);
        return 1;
    }
    printf("quantized         %s -> %s: %d matrices to %s", in, out, qs.n_quantized,
           cp_dtype_name(t));
    if (qs.n_fallback)
        printf(", %d to %s (rows not whole %s blocks)", qs.n_fallback,
               cp_dtype_name(qs.fallback_type), cp_dtype_name(t));
    if (qs.n_head_8bit) printf(", the output projection to I8_ROW");
    printf(", %d tensors kept\n", qs.n_kept);
    printf("size              %.1f MB -> %.1f MB of tensor data (%.2fx) in %.1f s\n",
           qs.bytes_in / 1e6, qs.bytes_out / 1e6,
           qs.bytes_out ? (double)qs.bytes_in / (double)qs.bytes_out : 0.0, cp_time_now() - t0);
    fflush(stdout);
    if (!no_eval) {
        double increase = 0;
        rc = measure(in, tmp, text, ctx, max_tokens, threads, max_increase / 100.0, force,
                     &increase);
        if (rc) {
            unlink(tmp);
            if (rc == 3)
                fprintf(stderr, "cparallel quantize: error: not written: perplexity rose by "
                                "%.2f%%, more than --max-ppl-increase %.2f%% (--force writes it "
                                "anyway)\n", 100 * increase, (double)max_increase);
            return 1;
        }
    }
    if (rename(tmp, out) != 0) {
        fprintf(stderr, "cparallel quantize: error: cannot write '%s': %s\n", out,
                strerror(errno));
        unlink(tmp);
        return 1;
    }
    printf("written           %s\n", out);
    return 0;
}
