/* cmd_prune.c - `cparallel prune`: calibrates on text when the method
 * needs activations, plans what to remove (cp_prune_plan), writes the
 * pruned model to a temporary file next to the output, measures it against
 * the original on evaluation text, and renames it into place only when the
 * perplexity increase is within --max-ppl-increase (or --force). Under
 * mpirun the calibration and the measurement run over the ranks
 * (--tp/--pp/--cp) and rank 0 plans and writes (see cli_job). */
#include "cmd_prune.h"

#include "cli.h"
#include "cli_optimize.h"
#include "cp_gguf.h"
#include "cp_prune.h"
#include "cp_runtime.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* Types that hold an exact 0, so that pruned weights stay pruned. */
static bool zero_exact(cp_dtype t) {
    switch (t) {
    case CP_DTYPE_F32:
    case CP_DTYPE_F16:
    case CP_DTYPE_BF16:
    case CP_DTYPE_Q8_0:
    case CP_DTYPE_Q4_0:
    case CP_DTYPE_Q6_K: return true;
    default: return false;
    }
}

/* The default output: 2:4 compressed; unstructured in the source's types
 * when they hold 0 exactly (else q8_0); structured only in the source's
 * types (*keep: every tensor keeps its type). */
static void default_type(cp_gguf_t g, bool n2m, bool zeroing, cp_dtype *t, bool *keep) {
    *keep = false;
    if (n2m) {
        *t = CP_DTYPE_S24_Q8;
        return;
    }
    *t = CP_DTYPE_Q8_0;
    bool all_exact = true;
    for (int64_t i = 0; i < cp_gguf_n_tensors(g); i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        if (w->ndim >= 2 && !strncmp(w->name, "blk.", 4) && !zero_exact(w->dtype)) all_exact = false;
    }
    *keep = !zeroing || all_exact;
}

/* Rank 0: plans the edit from the statistics, writes the pruned model to
 * tmp (matrices in *type, NULL: the default of default_type) and prints
 * what it did; false after reporting an error. */
static bool write_pruned(const char *in, const char *tmp, const char *out, cp_prune_opts *po,
                         const cp_act_stats *stats, const cp_dtype *type, bool no_progress, cli_job *job) {
    po->stats = stats;
    cp_gguf_t g = NULL;
    cp_model_edit *edit = NULL;
    cp_prune_report rep;
    if (cp_gguf_open(in, &g) != CP_OK) {
        cli_report_error("cannot read the model");
        return false;
    }
    cp_dtype t = type ? *type : CP_DTYPE_F32;
    bool keep_types = false;
    if (!type) default_type(g, po->n2m, po->n2m || po->sparsity > 0, &t, &keep_types);
    cp_status pst = cp_prune_plan(g, po, &edit, &rep);
    cp_gguf_close(g);
    if (pst != CP_OK) {
        cli_report_error("cannot prune the model");
        return false;
    }
    if (po->drop_layers) {
        printf("block importance  1 - cos(in, out) per layer:");
        for (int l = 0; l < rep.n_layer; l++) printf(" %d:%.4f", l, rep.importance[l]);
        printf("\ndropped layers   ");
        for (int i = 0; i < rep.n_dropped; i++) printf(" %d", rep.dropped[i]);
        printf("\n");
    }
    cli_write_progress_state prog = {no_progress ? NULL : "prune", -1, job};
    cp_quantize_opts qo = {.type = t, .keep_types = keep_types, .edit = edit, .progress = cli_write_progress,
                           .progress_user = &prog};
    cp_quantize_stats qs;
    const double t0 = cp_time_now();
    cp_status qst = cp_quantize_gguf(in, tmp, &qo, &qs);
    cp_model_edit_free(edit);
    if (qst != CP_OK) {
        cli_report_error("cannot write the pruned model");
        unlink(tmp);
        return false;
    }
    const bool zeroing = po->n2m || po->sparsity > 0;
    printf("pruned            %s -> %s:", in, out);
    const char *sep = " ";
    if (zeroing) {
        printf("%s%d matrices %s (%s)", sep, rep.n_pruned, po->n2m ? "2:4 sparse" : "sparse",
               po->method == CP_PRUNE_WANDA ? "wanda" : "magnitude");
        if (po->sparsity > 0) printf(" at %.0f%%", 100 * po->sparsity);
        sep = ", ";
    }
    if (po->drop_layers) {
        printf("%s%d layers dropped", sep, rep.n_dropped);
        sep = ", ";
    }
    if (po->n_head) {
        printf("%s%d heads per layer kept", sep, po->n_head);
        sep = ", ";
    }
    if (po->ffn_dim) printf("%s%d MLP channels per layer kept", sep, po->ffn_dim);
    printf("; matrices %s", keep_types ? "in their own types" : cp_dtype_name(t));
    if (qs.n_fallback) printf(" (%d in %s: rows not whole blocks)", qs.n_fallback, cp_dtype_name(qs.fallback_type));
    printf("\nsize              %.1f MB -> %.1f MB of tensor data in %.1f s\n", qs.bytes_in / 1e6,
           qs.bytes_out / 1e6, cp_time_now() - t0);
    fflush(stdout);
    return true;
}

int cp_cli_prune(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *type = NULL, *text = NULL, *calib = NULL, *method = "wanda",
               *sparsity = NULL;
    char calib_buf[256];
    cli_eval_text eval_text;
    int ctx = 512, max_tokens = 4096, calib_tokens = 1024, drop = 0, heads = 0, ffn = 0;
    float max_increase = 5.0f;
    bool force = false, no_eval = false, no_progress = false;
    cli_job job;
    cli_job_defaults(&job);
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &in, 0, -1, "PATH", "the GGUF model to prune (required)", NULL},
        {"out", 'o', CLI_STR, &out, 0, -1, "PATH", "where to write the pruned model (required)", NULL},
        {"method", 0, CLI_STR, &method, 0, -1, "M",
         "magnitude (|W|) or wanda (|W| times the input's norm on calibration text; default)", NULL},
        {"sparsity", 0, CLI_STR, &sparsity, 0, -1, "S",
         "zero a fraction S (0..1) of every row of the block matrices, or 2:4 (two of every four, stored "
         "compressed as S24_Q8)", NULL},
        {"drop-layers", 0, CLI_INT, &drop, 1, 1 << 20, "K",
         "remove the K blocks that change the hidden state least on calibration text", NULL},
        {"heads", 0, CLI_INT, &heads, 1, 1 << 20, "N",
         "keep N query heads per layer (a multiple of the KV heads), the most active ones", NULL},
        {"ffn", 0, CLI_INT, &ffn, 1, 1 << 30, "N", "keep N MLP channels per layer, the most active ones", NULL},
        {"type", 't', CLI_STR, &type, 0, -1, "TYPE",
         "weight type of the written matrices: " CLI_CONVERT_TYPES " (default: S24_Q8 for 2:4; otherwise the "
         "source's types, or q8_0 when they cannot hold an exact zero)", NULL},
        {"calib", 0, CLI_STR, &calib, 0, -1, "FILE",
         "calibration text (default: another chapter of the Python tutorial)", NULL},
        {"calib-tokens", 0, CLI_INT, &calib_tokens, 2, 1 << 24, "N", "calibrate on N tokens (1024)", NULL},
        {"eval-text", 0, CLI_STR, &text, 0, -1, "FILE",
         "text the accuracy is measured on (default: four chapters of the Python tutorial, python3-doc)", NULL},
        {"eval-ctx", 0, CLI_INT, &ctx, 2, 1 << 20, "N", "tokens per evaluation window (512)", NULL},
        {"eval-tokens", 0, CLI_INT, &max_tokens, 2, 1 << 30, "N", "score at most N tokens of the text (4096)",
         NULL},
        {"max-ppl-increase", 0, CLI_FLOAT, &max_increase, 0, 1e6, "PCT",
         "refuse to write when perplexity rises by more than PCT percent (default 5)", NULL},
        {"force", 0, CLI_FLAG, &force, 0, -1, NULL, "write even past the bound", NULL},
        {"no-eval", 0, CLI_FLAG, &no_eval, 0, -1, NULL, "skip the measurement and the bound (nothing is checked)",
         NULL},
        CLI_JOB_OPTS(&job),
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print progress", NULL},
        {0},
    };
    int rc = cli_parse("prune", "--model IN --out OUT [--sparsity S] [--drop-layers K] [--heads N] [--ffn N] "
                                "[options]",
                       opts, argc, argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!in || !out) {
        fprintf(stderr, "cparallel prune: error: --model and --out are required (see 'cparallel prune --help')\n");
        return 2;
    }
    if ((rc = cli_job_check("prune", &job))) return rc;
    cp_prune_opts po = {.drop_layers = drop, .n_head = heads, .ffn_dim = ffn};
    if (!strcasecmp(method, "wanda")) {
        po.method = CP_PRUNE_WANDA;
    } else if (!strcasecmp(method, "magnitude")) {
        po.method = CP_PRUNE_MAGNITUDE;
    } else {
        fprintf(stderr, "cparallel prune: error: invalid value '%s' for --method (expected magnitude or wanda)\n",
                method);
        return 2;
    }
    if (sparsity) {
        char *end = NULL;
        errno = 0;
        if (!strcmp(sparsity, "2:4")) {
            po.n2m = true;
        } else {
            po.sparsity = strtod(sparsity, &end);
            if (errno || end == sparsity || *end || !(po.sparsity > 0 && po.sparsity < 1)) {
                fprintf(stderr, "cparallel prune: error: invalid value '%s' for --sparsity (expected a fraction "
                                "between 0 and 1, e.g. 0.5, or 2:4)\n", sparsity);
                return 2;
            }
        }
    }
    const bool zeroing = po.n2m || po.sparsity > 0;
    if (!zeroing && !drop && !heads && !ffn) {
        fprintf(stderr, "cparallel prune: error: nothing to prune: give --sparsity, --drop-layers, --heads or "
                        "--ffn\n");
        return 2;
    }
    cp_dtype t;
    if (type && !cli_parse_convert(type, &t)) {
        fprintf(stderr, "cparallel prune: error: invalid value '%s' for --type (expected " CLI_CONVERT_TYPES ")\n",
                type);
        return 2;
    }
    if ((rc = cli_eval_text_pick("prune", no_eval, text, &eval_text))) return rc;
    const bool need_calib = (zeroing && po.method == CP_PRUNE_WANDA) || drop || heads || ffn;
    if (need_calib && !calib && !(calib = cli_tutorial_chapter("controlflow", calib_buf, sizeof(calib_buf)))) {
        fprintf(stderr, "cparallel prune: error: wanda and structured pruning need calibration text: give "
                        "--calib FILE (or install python3-doc)\n");
        return 2;
    }
    if ((rc = cli_job_start(&job))) return rc;
    char tmp[4096];
    if (!cli_job_partial_name("prune", &job, out, tmp, sizeof(tmp))) return cli_job_end(&job, 1, true);
    cp_act_stats *stats = NULL;
    if (need_calib && cli_calibrate("prune", &job, in, calib, calib_tokens, &stats)) return cli_job_end(&job, 1, false);
    /* rank 0 plans and writes; the others wait for it */
    const bool ok = !job.lead || write_pruned(in, tmp, out, &po, stats, type ? &t : NULL, no_progress, &job);
    cp_act_stats_free(stats);
    if (!cli_job_written(&job, ok)) return cli_job_end(&job, 1, true);
    const cli_gate gate = {&eval_text, ctx, max_tokens, max_increase, force};
    return cli_job_finish("prune", &job, in, tmp, out, &gate);
}
