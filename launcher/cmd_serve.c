/* cmd_serve.c - `cparallel serve`: parses the options, builds the engine
 * and the HTTP server through their public APIs, turns SIGTERM/SIGINT into
 * a drain, and maps the outcome to an exit code. Single rank for now. */
#include "cmd_serve.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_runtime.h"
#include "cp_server.h"

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

typedef struct load_progress {
    bool tty;
    int last;
} load_progress;

static void on_progress(void *user, size_t done, size_t total) {
    load_progress *p = user;
    int pct = total ? (int)(100.0 * (double)done / (double)total) : 100;
    if (p->tty) {
        if (pct != p->last)
            fprintf(stderr, "\rloading model: %3d%% (%.1f / %.1f MB)", pct, done / 1e6,
                    total / 1e6);
        if (pct >= 100 && p->last < 100) fputc('\n', stderr);
    } else if (pct / 25 != p->last / 25 || (pct >= 100 && p->last < 100)) {
        fprintf(stderr, "loading model: %d%% (%.1f / %.1f MB)\n", pct, done / 1e6, total / 1e6);
    }
    p->last = pct;
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
    const char *device = "cpu";
    int port = 8080, max_running = 16, max_waiting = 256, ctx = 0, max_tokens_limit = 4096;
    int max_body = 1 << 20, threads = 0, drain_timeout = 30, tp = 1, pp = 1, prefill_chunk = 0;
    bool log_prompts = false, kv_f32 = false, no_prefix_cache = false, no_progress = false;
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
        {"prefill-chunk", 0, CLI_INT, &prefill_chunk, 1, 1 << 20, "N",
         "prompt tokens of one sequence per step (default 256)", NULL},
        {"no-prefix-cache", 0, CLI_FLAG, &no_prefix_cache, 0, -1, NULL,
         "do not share prompt blocks between requests", NULL},
        {"kv-f32", 0, CLI_FLAG, &kv_f32, 0, -1, NULL, "keep the KV cache in fp32 instead of fp16",
         NULL},
        {"log-prompts", 0, CLI_FLAG, &log_prompts, 0, -1, NULL,
         "also log prompts and outputs (off: ids, token counts and timings only)", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print load progress", NULL},
        {"tp", 0, CLI_INT, &tp, 1, 1024, "N",
         "tensor-parallel ranks (serve runs on one rank for now: 1)", NULL},
        {"pp", 0, CLI_INT, &pp, 1, 1024, "N", "pipeline stages (serve runs on one rank for now: 1)",
         NULL},
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
    if (tp > 1 || pp > 1) {
        fprintf(stderr,
                "cparallel serve: error: --tp %d --pp %d: serve runs on one rank for now "
                "(use --tp 1 --pp 1; 'cparallel generate' runs across ranks)\n",
                tp, pp);
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
    /* started under an MPI launcher with several ranks: refuse on every rank */
    cp_comm_t world = NULL;
    if (cp_comm_init_world(CP_COMM_AUTO, 0, &world) == CP_OK) {
        int size = cp_comm_size(world), rank = cp_comm_rank(world);
        cp_comm_free(world);
        if (size > 1) {
            fprintf(stderr,
                    "cparallel serve: error: rank %d: the job has %d ranks, but serve runs on one "
                    "rank for now (start it without mpirun/srun)\n",
                    rank, size);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);

    load_progress lp = {isatty(2), -1};
    cp_engine_opts eo = {
        .model_path = model,
        .n_threads = threads,
        .device = dev,
        .device_id = device_id < 0 ? 0 : device_id, /* one rank: the first GPU */
        .n_ctx = ctx,
        .n_seq = max_running,
        .kv_f32 = kv_f32,
        .progress = no_progress ? NULL : on_progress,
        .progress_user = &lp,
        .tp = 1,
        .pp = 1,
    };
    cp_engine_t e = NULL;
    cp_server_t srv = NULL;
    rc = 1;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error("cannot load the model");
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
                  .no_prefix_cache = no_prefix_cache},
    };
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
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    g_server = NULL;
    cp_server_free(srv);
    cp_engine_free(e);
    return rc;
}
