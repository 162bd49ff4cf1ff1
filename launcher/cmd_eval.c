/* cmd_eval.c - `cparallel eval`: reads the text, builds the model (and the
 * reference) engine over the same ranks, runs cp_eval_text and prints a
 * table (or JSON). Under mpirun every rank computes, rank 0 prints. */
#include "cmd_eval.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_eval.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"
#include "ranks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct eval_progress {
    bool on;
    int last;
} eval_progress;

static void on_progress(void *user, size_t done, size_t total) {
    eval_progress *p = user;
    int pct = total ? (int)(100 * done / total) : 100;
    if (!p->on || pct / 10 == p->last / 10) return;
    p->last = pct;
    fprintf(stderr, "cparallel: eval %3d%% (%zu of %zu tokens)\n", pct, done, total);
}

int cp_cli_eval(int argc, char **argv) {
    const char *model = NULL, *text = NULL, *reference = NULL, *device = "cpu", *convert = NULL, *kv_type = NULL;
    int ctx = 512, stride = 0, max_tokens = 0, threads = 0, timeout_s = 60;
    bool json = false, no_progress = false;
    cli_par par;
    cli_par_defaults(&par);
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &model, 0, -1, "PATH", "the model to measure (required)", NULL},
        {"text", 0, CLI_STR, &text, 0, -1, "FILE", "UTF-8 text to score (required)", NULL},
        {"reference", 0, CLI_STR, &reference, 0, -1, "PATH",
         "also compare with this model (same tokenizer): KL(reference || model), top-1 agreement",
         NULL},
        {"convert", 0, CLI_STR, &convert, 0, -1, "TYPE",
         "convert the model's weights at load (the reference stays as stored) to " CLI_CONVERT_TYPES,
         NULL},
        {"ctx", 0, CLI_INT, &ctx, 2, 1 << 20, "N", "tokens per window (default 512)", NULL},
        {"stride", 0, CLI_INT, &stride, 1, 1 << 20, "S",
         "tokens the window moves by (default ctx / 2)", NULL},
        {"max-tokens", 0, CLI_INT, &max_tokens, 2, 1 << 30, "N",
         "score only the first N tokens of the text", NULL},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N", "CPU threads per rank", NULL},
        {"device", 0, CLI_STR, &device, 0, -1, "DEV", "cpu (default), cuda or cuda:N", NULL},
        {"kv-type", 0, CLI_STR, &kv_type, 0, -1, "TYPE", CLI_KV_TYPE_HELP, NULL},
        CLI_PAR_OPTS(&par),
        {"collective-timeout", 0, CLI_INT, &timeout_s, 0, 86400, "S",
         "deadline of every collective in seconds (default 60)", NULL},
        {"json", 0, CLI_FLAG, &json, 0, -1, NULL, "print the result as one JSON object", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print progress", NULL},
        {0},
    };
    int rc = cli_parse("eval", "--model PATH --text FILE [--reference PATH] [options]", opts, argc,
                       argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!model || !text) {
        fprintf(stderr, "cparallel eval: error: --model and --text are required (see 'cparallel "
                        "eval --help')\n");
        return 2;
    }
    if ((rc = cli_par_check("eval", &par))) return rc;
    if (stride >= ctx) {
        fprintf(stderr, "cparallel eval: error: --stride %d must be below --ctx %d (windows "
                        "overlap by a token at least, else tokens go unscored)\n", stride, ctx);
        return 2;
    }
    cp_device dev;
    int device_id = -1;
    if (!cli_parse_device(device, &dev, &device_id)) {
        fprintf(stderr, "cparallel eval: error: invalid value '%s' for --device (expected cpu, "
                        "cuda or cuda:N)\n", device);
        return 2;
    }
    cp_dtype convert_dtype = CP_DTYPE_F32;
    if (convert && !cli_parse_convert(convert, &convert_dtype)) {
        fprintf(stderr, "cparallel eval: error: invalid value '%s' for --convert (expected "
                        CLI_CONVERT_TYPES ")\n", convert);
        return 2;
    }
    cp_dtype kv_dtype = CP_DTYPE_F32;
    if (kv_type && !cli_parse_kv_type("eval", kv_type, &kv_dtype)) return 2;
    size_t text_len = 0;
    char *body = NULL;
    if (!cli_read_file("eval", "text", text, 256, &body, &text_len)) return 1;
    ranks rk;
    rc = ranks_init(&rk, par.tp, par.pp, par.cp, timeout_s * 1000);
    if (rc) {
        ranks_free(&rk);
        free(body);
        return rc;
    }
    const bool lead = rk.rank == 0;
    if (ranks_node_defaults(&rk, dev, par.comm, &threads, &device_id)) {
        ranks_free(&rk);
        free(body);
        return 1;
    }
    cli_progress lp = {isatty(2), -1};
    cp_engine_opts eo = ranks_engine_opts(&rk, model, dev, device_id, threads, ctx, par.tp, par.pp);
    cli_par_apply(&par, &eo); /* the reference's engine copies these */
    eo.kv_f32 = true; /* exact unless asked: --kv-type measures a cheaper cache */
    if (kv_type) cli_set_kv_type(&eo, kv_dtype);
    eo.convert_weights = convert != NULL;
    eo.weight_dtype = convert_dtype;
    eo.progress = no_progress || !lead ? NULL : cli_on_progress;
    eo.progress_user = &lp;
    cp_engine_t e = NULL, r = NULL;
    int32_t *ids = NULL, *rids = NULL;
    size_t n_ids = 0, n_rids = 0;
    rc = 1;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error("cannot load the model");
        goto out;
    }
    if (reference) {
        cp_engine_opts ro = eo;
        ro.model_path = reference;
        ro.convert_weights = false;
        ro.kv_dtype = CP_DTYPE_F32; /* the reference keeps an exact cache */
        ro.kv_f32 = true;
        if (cp_engine_init(&ro, &r) != CP_OK) {
            cli_report_error("cannot load the reference model");
            goto out;
        }
    }
    if (cp_tokenizer_encode(cp_engine_tokenizer(e), body, text_len, true, false, &ids, &n_ids) !=
        CP_OK) {
        cli_report_error("cannot tokenize the text");
        goto out;
    }
    if (r) {
        /* one tokenizer: the same text must give the same ids */
        if (cp_tokenizer_encode(cp_engine_tokenizer(r), body, text_len, true, false, &rids,
                                &n_rids) != CP_OK) {
            cli_report_error("the reference cannot tokenize the text");
            goto out;
        }
        if (n_rids != n_ids || memcmp(rids, ids, n_ids * sizeof(int32_t)) != 0) {
            fprintf(stderr, "cparallel eval: error: the model and the reference tokenize the text "
                            "differently (%zu and %zu tokens): they must share one tokenizer\n",
                    n_ids, n_rids);
            goto out;
        }
    }
    if (max_tokens > 0 && n_ids > (size_t)max_tokens) n_ids = (size_t)max_tokens;
    eval_progress ep = {!no_progress && lead, -1};
    cp_eval_opts o = {.ctx = ctx, .stride = stride, .progress = on_progress, .progress_user = &ep};
    cp_eval_result res;
    if (cp_eval_text(e, r, ids, n_ids, &o, &res) != CP_OK) {
        cli_report_error("the evaluation failed");
        goto out;
    }
    rc = 0;
    if (!lead) goto out;
    if (json) {
        printf("{\"model\":");
        cli_json_str(model);
        printf(",\"text\":");
        cli_json_str(text);
        printf(",\"tokens\":%lld,\"windows\":%d,\"ctx\":%d,\"stride\":%d,\"nll\":%.6f,"
               "\"ppl\":%.6f",
               (long long)res.n_scored + 1, res.n_windows, res.ctx, res.stride, res.nll, res.ppl);
        if (r) {
            printf(",\"reference\":");
            cli_json_str(reference);
            printf(",\"ref_ppl\":%.6f,\"ppl_increase\":%.6f,\"kl_mean\":%.6g,"
                   "\"kl_p50\":%.6g,\"kl_p99\":%.6g,\"kl_max\":%.6g,\"top1\":%.6f",
                   res.ref_ppl, res.ppl / res.ref_ppl - 1, res.kl_mean, res.kl_p50,
                   res.kl_p99, res.kl_max, res.top1);
            if (res.ratio_hi > 0)
                printf(",\"ppl_increase_95\":[%.6f,%.6f]", res.ratio_lo - 1, res.ratio_hi - 1);
            else
                printf(",\"ppl_increase_95\":null");
        }
        printf(",\"seconds\":%.3f}\n", res.seconds);
    } else {
        printf("model             %s%s%s\n", model, convert ? " converted to " : "",
               convert ? convert : "");
        printf("text              %s: %zu tokens, %d window(s) of %d moving by %d\n", text, n_ids,
               res.n_windows, res.ctx, res.stride);
        printf("perplexity        %.4f  (%.4f nats per token over %lld predictions)\n", res.ppl,
               res.nll, (long long)res.n_scored);
        if (r) {
            char interval[96];
            printf("reference         %s: perplexity %.4f, model %+.2f%% (%s)\n", reference, res.ref_ppl,
                   100 * (res.ppl / res.ref_ppl - 1), cli_ppl_interval(&res, interval, sizeof(interval)));
            printf("KL(ref || model)  mean %.5f  median %.5f  p99 %.5f  max %.5f  nats/token\n",
                   res.kl_mean, res.kl_p50, res.kl_p99, res.kl_max);
            printf("top-1 agreement   %.2f%%\n", 100 * res.top1);
        }
        printf("time              %.2f s (%.0f tokens/s%s)\n", res.seconds,
               res.seconds > 0 ? (double)res.n_windows * res.ctx / res.seconds : 0.0,
               r ? ", both models" : "");
    }
out:
    free(ids);
    free(rids);
    free(body);
    cp_engine_free(r);
    cp_engine_free(e);
    if (rc == 1 && rk.size > 1) cp_comm_abort(rk.world, 1);
    ranks_free(&rk);
    return rc;
}
