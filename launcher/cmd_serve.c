/* cmd_serve.c - `cparallel serve`: parses the options, builds the engine
 * and the HTTP server through their public APIs, turns SIGTERM/SIGINT into
 * a drain, and maps the outcome to an exit code. Under mpirun/srun with
 * tp x pp ranks, rank 0 serves HTTP and schedules, and every other rank
 * follows its steps (cp_step_link.h). */
#include "cmd_serve.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_runtime.h"
#include "cp_server.h"
#include "cp_step_link.h"
#include "ranks.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static cp_server_t volatile g_server; /* for the signal handler */

static void on_signal(int sig) {
    (void)sig;
    cp_server_t s = g_server;
    if (s) cp_server_request_stop(s);
}

/* The served name by default: the file or directory name without ".gguf". */
static void default_name(const char *path, char *out, size_t n) {
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && path[start - 1] != '/')
        start--;
    size_t k = len - start;
    if (k > 5 && !strncasecmp(path + len - 5, ".gguf", 5)) k -= 5;
    if (k >= n) k = n - 1;
    memcpy(out, path + start, k);
    out[k] = '\0';
}

int cp_cli_serve(int argc, char **argv) {
    const char *model = NULL, *host = "127.0.0.1", *api_key = NULL, *model_name = NULL;
    const char *device = "cpu", *convert = NULL;
    int port = 8080, max_running = 16, max_waiting = 256, ctx = 0, max_tokens_limit = 4096;
    int max_body = 1 << 20, threads = 0, drain_timeout = 30, tp = 1, pp = 1, prefill_chunk = 0;
    int timeout_s = 60, micro = 0, max_step_tokens = 0;
    bool log_prompts = false, kv_f32 = false, no_prefix_cache = false, no_progress = false;
    bool sp = false;
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &model, 0, -1, "PATH",
         "GGUF file or Hugging Face model directory (required)", NULL},
        {"host", 0, CLI_STR, &host, 0, -1, "ADDR",
         "address to listen on (default 127.0.0.1; 0.0.0.0 for all)", NULL},
        {"port", 0, CLI_INT, &port, 0, 65535, "N",
         "TCP port (default 8080; 0 = any free port, printed at start)", NULL},
        {"api-key", 0, CLI_STR, &api_key, 0, -1, "KEY",
         "require 'Authorization: Bearer KEY' on /v1 (default: env CPARALLEL_API_KEY)", NULL},
        {"model-name", 0, CLI_STR, &model_name, 0, -1, "NAME",
         "the model's name in the API (default: the file name)", NULL},
        {"max-running", 0, CLI_INT, &max_running, 1, 4096, "N",
         "sequences generated together (default 16)", NULL},
        {"max-waiting", 0, CLI_INT, &max_waiting, 1, 1 << 20, "N",
         "queued requests before 429 (default 256)", NULL},
        {"ctx-size", 'c', CLI_INT, &ctx, 1, 1 << 24, "N",
         "context length in tokens (default: min(model's, 4096))", NULL},
        {"max-tokens-limit", 0, CLI_INT, &max_tokens_limit, 1, 1 << 24, "N",
         "largest max_tokens a request may ask for (default 4096)", NULL},
        {"max-body", 0, CLI_INT, &max_body, 1024, 1 << 30, "BYTES",
         "largest request body (default 1048576)", NULL},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N",
         "CPU threads for the model (default: all cores)", NULL},
        {"device", 0, CLI_STR, &device, 0, -1, "DEV", "cpu (default), cuda or cuda:N", NULL},
        {"drain-timeout", 0, CLI_INT, &drain_timeout, 0, 86400, "S",
         "on SIGTERM/SIGINT, seconds in-flight requests may still run (default 30)", NULL},
        {"max-step-tokens", 0, CLI_INT, &max_step_tokens, 1, 1 << 20, "N",
         "tokens per forward step, decodes + prompt chunks (default: the model's max batch); "
         "lower bounds the pause of running streams while prompts are prefilled",
         NULL},
        {"prefill-chunk", 0, CLI_INT, &prefill_chunk, 1, 1 << 20, "N",
         "prompt tokens of one sequence per step (default 256)", NULL},
        {"no-prefix-cache", 0, CLI_FLAG, &no_prefix_cache, 0, -1, NULL,
         "do not share prompt blocks between requests", NULL},
        {"convert", 0, CLI_STR, &convert, 0, -1, "TYPE", CLI_CONVERT_HELP, NULL},
        {"kv-f32", 0, CLI_FLAG, &kv_f32, 0, -1, NULL, "keep the KV cache in fp32 instead of fp16",
         NULL},
        {"log-prompts", 0, CLI_FLAG, &log_prompts, 0, -1, NULL,
         "also log prompts and outputs (off: ids, token counts and timings only)", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print load progress", NULL},
        {"tp", 0, CLI_INT, &tp, 1, 1024, "N", "tensor-parallel ranks per pipeline stage (default 1)",
         NULL},
        {"pp", 0, CLI_INT, &pp, 1, 1024, "N",
         "pipeline stages (default 1); the job needs tp x pp ranks", NULL},
        {"sp", 0, CLI_FLAG, &sp, 0, -1, NULL,
         "sequence parallelism for prompts inside the TP group (needs --tp > 1)", NULL},
        {"micro-batches", 0, CLI_INT, &micro, 1, 4096, "N",
         "pipeline micro-batches per step (default 4 x pp)", NULL},
        {"collective-timeout", 0, CLI_INT, &timeout_s, 1, 86400, "S",
         "deadline of every collective between ranks, in seconds (default 60)", NULL},
        {0},
    };
    int rc =
        cli_parse("serve", "--model PATH [--host ADDR] [--port N] [options]", opts, argc, argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!model) {
        fprintf(stderr,
                "cparallel serve: error: --model is required (see 'cparallel serve --help')\n");
        return 2;
    }
    if (sp && tp < 2) {
        fprintf(stderr, "cparallel serve: error: --sp needs --tp 2 or more\n");
        return 2;
    }
    cp_device dev;
    int device_id;
    if (!cli_parse_device(device, &dev, &device_id)) {
        fprintf(stderr,
                "cparallel serve: error: invalid value '%s' for --device (expected cpu, cuda or "
                "cuda:N)\n",
                device);
        return 2;
    }
    cp_dtype convert_dtype = CP_DTYPE_F32;
    if (convert && !cli_parse_convert(convert, &convert_dtype)) {
        fprintf(stderr,
                "cparallel serve: error: invalid value '%s' for --convert (expected " CLI_CONVERT_TYPES
                ")\n",
                convert);
        return 2;
    }
    if (!api_key) api_key = getenv("CPARALLEL_API_KEY");
    char name_buf[256];
    if (!model_name) {
        default_name(model, name_buf, sizeof(name_buf));
        model_name = name_buf;
    }
    if (!*model_name) {
        fprintf(stderr, "cparallel serve: error: --model-name must not be empty\n");
        return 2;
    }
    ranks rk;
    rc = ranks_init(&rk, tp, pp, timeout_s * 1000);
    if (rc) {
        ranks_free(&rk);
        return rc;
    }
    const bool lead = rk.rank == 0;
    ranks_node_defaults(&rk, dev, &threads, &device_id);
    signal(SIGPIPE, SIG_IGN);
    /* mpirun and Slurm signal every rank: rank 0 drains and then stops the
     * followers, which must live until then */
    if (!lead) {
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
    }

    cli_progress lp = {isatty(2), -1};
    cp_engine_opts eo = {
        .model_path = model,
        .n_threads = threads,
        .device = dev,
        .device_id = device_id < 0 ? 0 : device_id,
        .n_ctx = ctx,
        .n_seq = max_running,
        .kv_f32 = kv_f32,
        .convert_weights = convert != NULL,
        .weight_dtype = convert_dtype,
        .progress = no_progress || !lead ? NULL : cli_on_progress,
        .progress_user = &lp,
        .tp = tp,
        .pp = pp,
        .sp = sp,
        .pp_micro = micro,
        .rank = rk.rank,
        .tp_comm = rk.tp,
        .pp_comm = rk.pp,
    };
    cp_engine_t e = NULL;
    cp_server_t srv = NULL;
    cp_step_link_t link = NULL;
    rc = 1;
    cp_status st = cp_engine_init(&eo, &e);
    if (st != CP_OK) cli_report_error("cannot load the model");
    /* every rank learns whether every rank loaded, so none waits in vain */
    if (rk.size > 1) {
        int64_t failed = st != CP_OK;
        if (cp_comm_allreduce(rk.world, &failed, &failed, 1, CP_DTYPE_I64, CP_REDUCE_MAX, NULL) !=
            CP_OK) {
            cli_report_error("the ranks could not agree that the model loaded");
            goto out;
        }
        if (failed) {
            if (st == CP_OK)
                fprintf(stderr, "cparallel serve: error: rank %d: another rank failed to load\n",
                        rk.rank);
            goto out;
        }
    }
    if (st != CP_OK) goto out;
    if (cp_step_link_init(rk.world, cp_engine_model(e), cp_engine_kv(e), &link) != CP_OK) {
        cli_report_error("cannot link the ranks");
        goto out;
    }
    if (!lead) {
        if (cp_step_link_follow(link) != CP_OK) {
            cli_report_error("serving stopped");
            goto out;
        }
        rc = 0;
        goto out;
    }
    cp_server_opts so = {
        .host = host,
        .port = port,
        .api_key = api_key,
        .model_name = model_name,
        .max_tokens_limit = max_tokens_limit,
        .max_body = (size_t)max_body,
        .drain_timeout_s = drain_timeout,
        .log_prompts = log_prompts,
        .sched = {.max_running = max_running,
                  .max_waiting = max_waiting,
                  .prefill_chunk = prefill_chunk,
                  .max_step_tokens = max_step_tokens,
                  .no_prefix_cache = no_prefix_cache},
    };
    if (rk.size > 1) {
        so.sched.forward = cp_step_link_forward;
        so.sched.idle = cp_step_link_idle;
        so.sched.hook_user = link;
    }
    if (cp_server_init(e, &so, &srv) != CP_OK) {
        cli_report_error("cannot start the server");
        goto out;
    }
    g_server = srv;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    const char *h = cp_server_host(srv);
    bool v6 = strchr(h, ':') != NULL;
    if (rk.size > 1)
        fprintf(stderr, "cparallel: %d ranks (tp %d x pp %d) ready\n", rk.size, tp, pp);
    fprintf(stderr, "cparallel: serving %s on http://%s%s%s:%d\n", model_name, v6 ? "[" : "", h,
            v6 ? "]" : "", cp_server_port(srv));
    fflush(stderr);
    if (cp_server_run(srv) != CP_OK) {
        cli_report_error("the server stopped after a failure");
        goto out;
    }
    rc = 0;
out:
    /* the handler must not see the server being freed */
    if (lead) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
    }
    g_server = NULL;
    cp_server_free(srv);
    /* followers wait for this (or for their deadline when rank 0 is gone) */
    if (lead && link) cp_step_link_stop(link, rc == 0);
    cp_step_link_free(link);
    cp_engine_free(e);
    ranks_free(&rk);
    return rc;
}
