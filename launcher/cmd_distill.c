/* cmd_distill.c - `cparallel distill`: reads the prompts, prepares the
 * output directory, builds the teacher engine over the ranks and runs
 * cp_distill_run; prints a summary (or JSON). Under mpirun every rank
 * computes, rank 0 writes the files and prints. */
#include "cmd_distill.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_distill.h"
#include "cp_runtime.h"
#include "ranks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct distill_progress {
    bool on, tty;
    int last; /* tenths of the prompts reported (non-terminal) */
} distill_progress;

/* A line rewritten in place on a terminal, else one per tenth of the prompts. */
static void on_progress(void *user, const cp_distill_progress *p) {
    distill_progress *d = user;
    if (!d->on) return;
    double tps = p->seconds > 0 ? (double)p->n_gen / p->seconds : 0.0;
    if (d->tty) {
        fprintf(stderr, "\rcparallel: distill %zu/%zu prompts, %lld tokens, %.1f tokens/s", p->done,
                p->total, (long long)p->n_gen, tps);
        if (p->done == p->total) fputc('\n', stderr);
        return;
    }
    int tenth = (int)(10 * p->done / p->total);
    if (tenth == d->last) return;
    d->last = tenth;
    fprintf(stderr, "cparallel: distill %zu/%zu prompts, %lld tokens, %.1f tokens/s\n", p->done,
            p->total, (long long)p->n_gen, tps);
}

int cp_cli_distill(int argc, char **argv) {
    const char *teacher = NULL, *prompts = NULL, *out = NULL, *device = "cpu", *convert = NULL;
    int top_k = 20, max_tokens = 128, threads = 0, ctx = 0, timeout_s = 60;
    cli_par par;
    cli_par_defaults(&par);
    float temperature = 0.0f, top_p = 1.0f;
    uint64_t seed = 0;
    bool chat = false, no_chat = false, completion_only = false, force = false, json = false;
    bool no_progress = false, kv_f16 = false;
    const cli_opt opts[] = {
        {"teacher", 0, CLI_STR, &teacher, 0, -1, "PATH", "the teacher model (required)", NULL},
        {"prompts", 0, CLI_STR, &prompts, 0, -1, "FILE",
         "JSONL, one {\"prompt\": ...} or {\"messages\": [...]} per line (required)", NULL},
        {"out", 'o', CLI_STR, &out, 0, -1, "DIR", "output directory, created (required)", NULL},
        {"top-k", 0, CLI_INT, &top_k, 1, CP_DISTILL_MAX_K, "K",
         "log-probabilities kept per position (default 20)", NULL},
        {"max-tokens", 'n', CLI_INT, &max_tokens, 1, 1 << 20, "N",
         "tokens generated per prompt at most (default 128)", NULL},
        {"temperature", 't', CLI_FLOAT, &temperature, 0, 100, "T",
         "sampling temperature of the continuations, 0 = greedy (default 0)", NULL},
        {"top-p", 0, CLI_FLOAT, &top_p, 0, 1, "P", "nucleus sampling mass, 1 = off (default 1)",
         NULL},
        {"seed", 's', CLI_U64, &seed, 0, -1, "S", "sampling seed; prompt i uses S + i (default 0)",
         NULL},
        {"chat", 0, CLI_FLAG, &chat, 0, -1, NULL,
         "plain prompts as a user message in the chat template (default when it exists)", NULL},
        {"no-chat", 0, CLI_FLAG, &no_chat, 0, -1, NULL, "plain prompts as raw text", NULL},
        {"completion-only", 0, CLI_FLAG, &completion_only, 0, -1, NULL,
         "rows only for the positions that predict completion tokens", NULL},
        {"force", 0, CLI_FLAG, &force, 0, -1, NULL,
         "write into a non-empty output directory (replaces an earlier run)", NULL},
        {"ctx-size", 'c', CLI_INT, &ctx, 2, 1 << 24, "N",
         "context length in tokens (default: min(model's, 4096))", NULL},
        {"convert", 0, CLI_STR, &convert, 0, -1, "TYPE", CLI_CONVERT_HELP, NULL},
        {"kv-f16", 0, CLI_FLAG, &kv_f16, 0, -1, NULL,
         "keep the KV cache in fp16 (GPU: fused prefill attention; default fp32, exact rows)",
         NULL},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N", "CPU threads per rank", NULL},
        {"device", 0, CLI_STR, &device, 0, -1, "DEV", "cpu (default), cuda or cuda:N", NULL},
        CLI_PAR_OPTS(&par),
        {"collective-timeout", 0, CLI_INT, &timeout_s, 0, 86400, "S",
         "deadline of every collective in seconds (default 60)", NULL},
        {"json", 0, CLI_FLAG, &json, 0, -1, NULL, "print the summary as one JSON object", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print progress", NULL},
        {0},
    };
    int rc = cli_parse("distill", "--teacher PATH --prompts FILE --out DIR [options]", opts, argc,
                       argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!teacher || !prompts || !out) {
        fprintf(stderr, "cparallel distill: error: --teacher, --prompts and --out are required "
                        "(see 'cparallel distill --help')\n");
        return 2;
    }
    if (chat && no_chat) {
        fprintf(stderr, "cparallel distill: error: give --chat or --no-chat, not both\n");
        return 2;
    }
    if ((rc = cli_par_check("distill", &par))) return rc;
    cp_device dev;
    int device_id = -1;
    if (!cli_parse_device(device, &dev, &device_id)) {
        fprintf(stderr,
                "cparallel distill: error: invalid value '%s' for --device (expected cpu, "
                "cuda or cuda:N)\n",
                device);
        return 2;
    }
    cp_dtype convert_dtype = CP_DTYPE_F32;
    if (convert && !cli_parse_convert(convert, &convert_dtype)) {
        fprintf(stderr,
                "cparallel distill: error: invalid value '%s' for --convert "
                "(expected " CLI_CONVERT_TYPES ")\n",
                convert);
        return 2;
    }
    ranks rk;
    rc = ranks_init(&rk, par.tp, par.pp, par.cp, timeout_s * 1000);
    if (rc) {
        ranks_free(&rk);
        return rc;
    }
    const bool lead = rk.rank == 0;
    cp_distill_prompts_t ps = NULL;
    cp_engine_t e = NULL;
    rc = 1;
    /* Every rank reads the prompts (the file must be visible to all), rank 0
     * prepares the directory; the ranks agree before the model loads. When
     * all fail alike, rank 0 alone says why. */
    int64_t failed = cp_distill_prompts_load(prompts, &ps) != CP_OK;
    char why[1024] = "";
    if (failed) snprintf(why, sizeof(why), "cannot read the prompts: %s", cp_last_error_detail());
    if (!failed && lead && cp_distill_prepare_dir(out, force) != CP_OK) {
        failed = 1;
        snprintf(why, sizeof(why), "%s", cp_last_error_detail());
    }
    int64_t n_failed = failed;
    if (rk.size > 1 && cp_comm_allreduce(rk.world, &failed, &n_failed, 1, CP_DTYPE_I64,
                                         CP_REDUCE_SUM, NULL) != CP_OK) {
        cli_report_error("the ranks could not agree on the prompts");
        goto out;
    }
    if (n_failed) {
        if (failed && (lead || n_failed < rk.size)) {
            if (rk.size > 1 && !lead)
                fprintf(stderr, "cparallel: error: rank %d: %s\n", rk.rank, why);
            else
                fprintf(stderr, "cparallel: error: %s\n", why);
        }
        ranks_free(&rk);
        cp_distill_prompts_free(ps);
        return 1; /* every rank stops here: no collective is left waiting */
    }
    if (ranks_node_defaults(&rk, dev, par.comm, &threads, &device_id)) {
        ranks_free(&rk);
        cp_distill_prompts_free(ps);
        return 1;
    }
    cli_progress lp = {isatty(2), -1};
    cp_engine_opts eo = ranks_engine_opts(&rk, teacher, dev, device_id, threads, ctx, par.tp, par.pp);
    cli_par_apply(&par, &eo);
    eo.kv_f32 = !kv_f16; /* the rows are scored on the KV cache: exact unless asked */
    eo.convert_weights = convert != NULL;
    eo.weight_dtype = convert_dtype;
    eo.progress = no_progress || !lead ? NULL : cli_on_progress;
    eo.progress_user = &lp;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error("cannot load the teacher");
        goto out;
    }
    distill_progress dp = {!no_progress && lead, isatty(2), 0};
    cp_distill_opts o = {
        .top_k = top_k,
        .max_tokens = max_tokens,
        .temperature = temperature,
        .top_p = top_p,
        .seed = seed,
        .chat = chat      ? CP_DISTILL_CHAT_ON
                : no_chat ? CP_DISTILL_CHAT_OFF
                          : CP_DISTILL_CHAT_AUTO,
        .completion_only = completion_only,
        .write = lead,
        .teacher = teacher,
        .prompts_path = prompts,
        .progress = on_progress,
        .progress_user = &dp,
    };
    cp_distill_result res;
    if (cp_distill_run(e, ps, out, &o, &res) != CP_OK) {
        cli_report_error("distillation data not written");
        goto out;
    }
    rc = 0;
    if (!lead) goto out;
    double tps = res.seconds > 0 ? (double)res.n_gen_tokens / res.seconds : 0.0;
    if (json) {
        printf("{\"teacher\":");
        cli_json_str(teacher);
        printf(",\"prompts\":");
        cli_json_str(prompts);
        printf(",\"out\":");
        cli_json_str(out);
        printf(",\"samples\":%lld,\"rows\":%lld,\"top_k\":%d,\"vocab_size\":%d,\"chat\":%s,"
               "\"completion_only\":%s,\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
               "\"finish_stop\":%d,\"finish_length\":%d,\"finish_context\":%d,"
               "\"seconds\":%.3f,\"tokens_per_s\":%.2f}\n",
               (long long)res.n_samples, (long long)res.n_rows, res.top_k, res.n_vocab,
               res.chat ? "true" : "false", completion_only ? "true" : "false",
               (long long)res.n_prompt_tokens, (long long)res.n_gen_tokens, res.n_stop,
               res.n_length, res.n_context, res.seconds, tps);
    } else {
        printf("teacher           %s%s%s\n", teacher, convert ? " converted to " : "",
               convert ? convert : "");
        printf("prompts           %s: %lld (%zu conversations), chat template %s\n", prompts,
               (long long)res.n_samples, cp_distill_prompts_n_chat(ps),
               res.chat ? "on for plain prompts" : "off for plain prompts");
        printf("tokens            %lld prompt, %lld generated (stop %d, length %d, context %d)\n",
               (long long)res.n_prompt_tokens, (long long)res.n_gen_tokens, res.n_stop,
               res.n_length, res.n_context);
        printf("written           %s: %lld rows of the top %d of %d log-probabilities%s\n", out,
               (long long)res.n_rows, res.top_k, res.n_vocab,
               completion_only ? " (completions only)" : "");
        printf("time              %.2f s (%.1f generated tokens/s)\n", res.seconds, tps);
    }
out:
    cp_engine_free(e);
    cp_distill_prompts_free(ps);
    /* a rank that failed mid-collective would leave the others waiting */
    if (rc == 1 && rk.size > 1) cp_comm_abort(rk.world, 1);
    ranks_free(&rk);
    return rc;
}
