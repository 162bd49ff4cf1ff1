/* cmd_quantize.c - `cparallel quantize`: writes the quantized model to a
 * temporary file next to the output, measures it against the original on
 * evaluation text (perplexity, KL, top-1 agreement), and renames it into
 * place only when the perplexity increase is within --max-ppl-increase
 * (or --force). Under mpirun the calibration and the measurement run over
 * the ranks (--tp/--pp/--cp) and rank 0 writes (see cli_job). */
#include "cmd_quantize.h"

#include "cli.h"
#include "cli_optimize.h"
#include "cp_comm.h"
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

/* The AWQ scale search, its layers dealt out over the ranks and the
 * results summed (each layer's scales come from one rank, zeros from the
 * others), so every rank ends with all of them; 0 on success. */
static int awq_search(cli_job *j, const char *in, cp_dtype t, const cp_act_stats *stats, bool no_progress,
                      cp_awq_scales **out) {
    cli_write_progress_state prog = {no_progress || !j->lead ? NULL : "awq search", -1, NULL};
    const double t0 = cp_time_now();
    if (cp_awq_search(in, t, stats, j->rk.rank, j->rk.size, j->threads, cli_write_progress, &prog, out) != CP_OK) {
        cli_report_error("the AWQ search failed");
        return 1;
    }
    cp_awq_scales *s = *out;
    const size_t n_dim = (size_t)s->n_layer * (size_t)s->dim, n_ffn = (size_t)s->n_layer * (size_t)s->ffn;
    if (j->rk.size > 1 &&
        (cp_comm_allreduce(j->rk.world, s->attn, s->attn, n_dim, CP_DTYPE_F32, CP_REDUCE_SUM, NULL) != CP_OK ||
         cp_comm_allreduce(j->rk.world, s->ffn_in, s->ffn_in, n_dim, CP_DTYPE_F32, CP_REDUCE_SUM, NULL) != CP_OK ||
         cp_comm_allreduce(j->rk.world, s->down, s->down, n_ffn, CP_DTYPE_F32, CP_REDUCE_SUM, NULL) != CP_OK)) {
        cli_report_error("cannot gather the AWQ scales");
        return 1;
    }
    if (j->lead)
        printf("awq search        %d layers over %d rank%s in %.1f s\n", s->n_layer, j->rk.size,
               j->rk.size > 1 ? "s" : "", cp_time_now() - t0);
    return 0;
}

int cp_cli_quantize(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *type = NULL, *text = NULL, *calib = NULL;
    char calib_buf[256];
    cli_eval_text eval_text;
    int ctx = 512, max_tokens = 4096, calib_tokens = 1024;
    float max_increase = 5.0f;
    bool force = false, no_eval = false, no_progress = false;
    cli_job job;
    cli_job_defaults(&job);
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
         "text the accuracy is measured on (default: four chapters of the Python tutorial, python3-doc)", NULL},
        {"eval-ctx", 0, CLI_INT, &ctx, 2, 1 << 20, "N", "tokens per evaluation window (512)",
         NULL},
        {"eval-tokens", 0, CLI_INT, &max_tokens, 2, 1 << 30, "N",
         "score at most N tokens of the text (4096)", NULL},
        {"max-ppl-increase", 0, CLI_FLOAT, &max_increase, 0, 1e6, "PCT",
         "refuse to write when perplexity rises by more than PCT percent (default 5)", NULL},
        {"force", 0, CLI_FLAG, &force, 0, -1, NULL, "write even past the bound", NULL},
        {"no-eval", 0, CLI_FLAG, &no_eval, 0, -1, NULL,
         "skip the measurement and the bound (nothing is checked)", NULL},
        CLI_JOB_OPTS(&job),
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
    if ((rc = cli_job_check("quantize", &job))) return rc;
    cp_dtype t;
    const bool awq = !strcasecmp(type, "awq");
    if (awq) {
        t = CP_DTYPE_I4_G128;
    } else if (!cli_parse_convert(type, &t)) {
        fprintf(stderr, "cparallel quantize: error: invalid value '%s' for --type (expected "
                        CLI_CONVERT_TYPES ")\n", type);
        return 2;
    }
    if ((rc = cli_eval_text_pick("quantize", no_eval, text, &eval_text))) return rc;
    if (awq && !calib && !(calib = cli_tutorial_chapter("controlflow", calib_buf, sizeof(calib_buf)))) {
        fprintf(stderr, "cparallel quantize: error: awq needs calibration text: give --calib FILE "
                        "(or install python3-doc)\n");
        return 2;
    }
    if ((rc = cli_job_start(&job))) return rc;
    char tmp[4096];
    if (!cli_job_partial_name("quantize", &job, out, tmp, sizeof(tmp))) return cli_job_end(&job, 1, true);
    cp_act_stats *stats = NULL;
    cp_awq_scales *scales = NULL;
    if (awq && (cli_calibrate("quantize", &job, in, calib, calib_tokens, &stats) ||
                awq_search(&job, in, t, stats, no_progress, &scales))) {
        cp_act_stats_free(stats);
        return cli_job_end(&job, 1, false);
    }
    /* rank 0 writes; the others wait for it */
    bool ok = true;
    if (job.lead) {
        cli_write_progress_state prog = {no_progress ? NULL : "quantize", -1, &job};
        cp_quantize_opts qo = {.type = t, .awq = stats, .awq_scales = scales, .progress = cli_write_progress,
                               .progress_user = &prog};
        cp_quantize_stats qs;
        double t0 = cp_time_now();
        ok = cp_quantize_gguf(in, tmp, &qo, &qs) == CP_OK;
        if (!ok) {
            cli_report_error("cannot quantize the model");
            unlink(tmp);
        } else {
            printf("quantized         %s -> %s: %d matrices to %s", in, out, qs.n_quantized, cp_dtype_name(t));
            if (qs.n_fallback)
                printf(", %d to %s (rows not whole %s blocks)", qs.n_fallback, cp_dtype_name(qs.fallback_type),
                       cp_dtype_name(t));
            if (qs.n_head_8bit) printf(", the output projection to I8_ROW");
            printf(", %d tensors kept\n", qs.n_kept);
            printf("size              %.1f MB -> %.1f MB of tensor data (%.2fx) in %.1f s\n", qs.bytes_in / 1e6,
                   qs.bytes_out / 1e6, qs.bytes_out ? (double)qs.bytes_in / (double)qs.bytes_out : 0.0,
                   cp_time_now() - t0);
            fflush(stdout);
        }
    }
    cp_act_stats_free(stats);
    cp_awq_scales_free(scales);
    if (!cli_job_written(&job, ok)) return cli_job_end(&job, 1, true);
    const cli_gate gate = {&eval_text, ctx, max_tokens, max_increase, force};
    return cli_job_finish("quantize", &job, in, tmp, out, &gate);
}
