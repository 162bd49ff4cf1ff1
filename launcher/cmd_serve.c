/* cmd_serve.c - `cparallel serve`: parses the options, builds the engine
 * and the HTTP server through their public APIs, turns SIGTERM/SIGINT into
 * a drain, and maps the outcome to an exit code. Under mpirun/srun with
 * tp x pp ranks, rank 0 serves HTTP and schedules, and every other rank
 * follows its steps (cp_step_link.h). */
#include "cmd_serve.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_hooks.h"
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
    cp_server_t s = g_server;
    if (!s) return;
    if (sig == SIGUSR1)
        cp_server_request_fault(s);
    else
        cp_server_request_stop(s);
}

/* Lifecycle events of the server become hook runs (rank 0). */
typedef struct hook_ctx {
    cp_hooks *hooks;
    const char *region;
    ranks *rk;
} hook_ctx;

static void fire(hook_ctx *hc, cp_hook_kind kind, int in_flight, const char *message) {
    if (kind == CP_HOOK_FAULT) ranks_fault_reported(hc->rk);
    cp_hook_event ev = {.kind = kind,
                        .rank = hc->rk->rank,
                        .region = hc->region,
                        .in_flight = in_flight,
                        .message = message};
    cp_hooks_fire(hc->hooks, &ev);
}

static void on_state(void *user, const cp_server_state_event *ev) {
    cp_hook_kind kind = ev->state == CP_SERVER_READY      ? CP_HOOK_READY
                        : ev->state == CP_SERVER_DRAINING ? CP_HOOK_DRAIN
                                                          : CP_HOOK_FAULT;
    fire(user, kind, ev->in_flight, ev->message);
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
    const char *device = "cpu", *convert = NULL, *kv_type = NULL;
    int port = 8080, max_running = 16, max_waiting = 256, ctx = 0, max_tokens_limit = 4096;
    int max_body = 1 << 20, threads = 0, drain_timeout = 30, prefill_chunk = 0;
    int timeout_s = 60, max_step_tokens = 0, hook_timeout = 10;
    cli_par par;
    cli_par_defaults(&par);
    const char *region = NULL;
    cli_list hook_specs = {0};
    bool log_prompts = false, kv_f32 = false, no_prefix_cache = false, no_progress = false, pp_serial = false;
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
         "tokens per forward step, decodes + prompt chunks (default: 128 or --max-running on the CPU, "
         "the model's max batch on a GPU); lower bounds the pause of running streams while prompts are "
         "prefilled",
         NULL},
        {"prefill-chunk", 0, CLI_INT, &prefill_chunk, 1, 1 << 20, "N",
         "prompt tokens of one sequence per step (default 256; with steps in flight across --pp stages "
         "and fewer requests than stages, the step tokens / (4 x pp), at least 16)",
         NULL},
        {"no-prefix-cache", 0, CLI_FLAG, &no_prefix_cache, 0, -1, NULL,
         "do not share prompt blocks between requests", NULL},
        {"pp-serial", 0, CLI_FLAG, &pp_serial, 0, -1, NULL,
         "with --pp > 1, run one step through every stage at a time (default: one step in flight per "
         "stage, each stage working on a different one)",
         NULL},
        {"convert", 0, CLI_STR, &convert, 0, -1, "TYPE", CLI_CONVERT_HELP, NULL},
        {"kv-f32", 0, CLI_FLAG, &kv_f32, 0, -1, NULL, "keep the KV cache in fp32 instead of fp16",
         NULL},
        {"kv-type", 0, CLI_STR, &kv_type, 0, -1, "TYPE", CLI_KV_TYPE_HELP, NULL},
        {"log-prompts", 0, CLI_FLAG, &log_prompts, 0, -1, NULL,
         "also log prompts and outputs (off: ids, token counts and timings only)", NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print load progress", NULL},
        CLI_PAR_OPTS(&par),
        {"collective-timeout", 0, CLI_INT, &timeout_s, 1, 86400, "S",
         "deadline of every collective between ranks, in seconds (default 60)", NULL},
        {"region", 0, CLI_STR, &region, 0, -1, "NAME",
         "the deployment's label in /health, /metrics and hook events", NULL},
        {"hook", 0, CLI_LIST, &hook_specs, 0, -1, "KIND=PATH",
         "run the executable PATH with a JSON event on stdin when the server becomes ready, "
         "starts to drain or fails (KIND: ready, drain, fault; repeatable)",
         NULL},
        {"hook-timeout", 0, CLI_INT, &hook_timeout, 1, 3600, "S",
         "seconds a hook may run before it is killed (default 10)", NULL},
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
    if ((rc = cli_par_check("serve", &par))) return rc;
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
    cp_dtype kv_dtype = CP_DTYPE_F32;
    if (kv_type && !cli_parse_kv_type("serve", kv_type, &kv_dtype)) return 2;
    cp_hooks *hooks = NULL;
    if (cp_hooks_create(hook_timeout * 1000, &hooks) != CP_OK) {
        cli_report_error("cannot set up the hooks");
        return 1;
    }
    for (int i = 0; i < hook_specs.n; i++)
        if (cp_hooks_add(hooks, hook_specs.v[i]) != CP_OK) {
            fprintf(stderr, "cparallel serve: error: --hook: %s\n", cp_last_error_detail());
            cp_hooks_free(hooks);
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
        cp_hooks_free(hooks);
        return 2;
    }
    ranks rk;
    rc = ranks_init(&rk, par.tp, par.pp, par.cp, timeout_s * 1000);
    if (!rc && rk.size > 1) rc = ranks_learn_peers(&rk);
    if (rc) {
        ranks_free(&rk);
        cp_hooks_free(hooks);
        return rc;
    }
    hook_ctx hc = {.hooks = hooks, .region = region, .rk = &rk};
    char lost[800] = ""; /* a follower: why it lost the job */
    const bool lead = rk.rank == 0;
    if (ranks_node_defaults(&rk, dev, par.comm, &threads, &device_id)) {
        ranks_free(&rk);
        cp_hooks_free(hooks);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    /* mpirun and Slurm signal every rank: rank 0 drains and then stops the
     * followers, which must live until then */
    if (!lead) {
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        signal(SIGUSR1, SIG_IGN);
    }

    cli_progress lp = {isatty(2), -1};
    cp_engine_opts eo = ranks_engine_opts(&rk, model, dev, device_id, threads, ctx, par.tp, par.pp);
    cli_par_apply(&par, &eo);
    eo.n_seq = max_running;
    eo.kv_f32 = kv_f32;
    if (kv_type) cli_set_kv_type(&eo, kv_dtype);
    eo.convert_weights = convert != NULL;
    eo.weight_dtype = convert_dtype;
    eo.progress = no_progress || !lead ? NULL : cli_on_progress;
    eo.progress_user = &lp;
    cp_engine_t e = NULL;
    cp_server_t srv = NULL;
    cp_step_link_t link = NULL;
    rc = 1;
    cp_status st = cp_engine_init(&eo, &e);
    if (st != CP_OK) {
        cli_report_error("cannot load the model");
        char msg[600];
        snprintf(msg, sizeof(msg), "rank %d cannot load the model: %s", rk.rank,
                 cp_last_error_detail());
        fire(&hc, CP_HOOK_FAULT, 0, msg);
    }
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
    if (cp_step_link_init(rk.world, cp_engine_model(e), cp_engine_kv(e), !pp_serial, &link) != CP_OK) {
        cli_report_error("cannot link the ranks");
        goto out;
    }
    if (!lead) {
        if (cp_step_link_follow(link) != CP_OK) {
            snprintf(lost, sizeof(lost), "%s", cp_last_error_detail());
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
        .region = region,
        .on_state = on_state,
        .state_user = &hc,
        .sched = {.max_running = max_running,
                  .max_waiting = max_waiting,
                  .prefill_chunk = prefill_chunk,
                  .max_step_tokens = max_step_tokens,
                  .no_prefix_cache = no_prefix_cache},
    };
    if (rk.size > 1) {
        so.sched.forward = cp_step_link_forward;
        so.sched.finish = cp_step_link_finish;
        so.sched.depth = cp_step_link_depth(link);
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
    sigaction(SIGUSR1, &sa, NULL);
    const char *h = cp_server_host(srv);
    bool v6 = strchr(h, ':') != NULL;
    if (rk.size > 1 && par.cp > 1)
        fprintf(stderr, "cparallel: %d ranks (tp %d x cp %d x pp %d) ready\n", rk.size, par.tp, par.cp, par.pp);
    else if (rk.size > 1 && cp_step_link_depth(link) > 1)
        fprintf(stderr, "cparallel: %d ranks (tp %d x pp %d) ready, up to %d steps in flight\n", rk.size,
                par.tp, par.pp, cp_step_link_depth(link));
    else if (rk.size > 1)
        fprintf(stderr, "cparallel: %d ranks (tp %d x pp %d) ready\n", rk.size, par.tp, par.pp);
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
        signal(SIGUSR1, SIG_DFL);
    }
    g_server = NULL;
    cp_server_free(srv);
    /* followers wait for this (or for their deadline when rank 0 is gone) */
    if (lead && link && cp_step_link_stop(link, rc == 0) != CP_OK && rc == 0) {
        cli_report_error("the other ranks did not take the stop");
        fire(&hc, CP_HOOK_FAULT, 0, cp_last_error_detail());
        rc = 1;
    }
    /* rank 0 reports faults while it lives; its loss is reported by one
     * follower of its host */
    if (!lead && rc != 0 && cp_hooks_has(hooks, CP_HOOK_FAULT) &&
        ranks_reports_lead_loss(&rk, timeout_s + hook_timeout + 10.0)) {
        char msg[900];
        snprintf(msg, sizeof(msg), "rank 0 is gone; rank %d: %s", rk.rank,
                 lost[0] ? lost : "the job failed");
        fire(&hc, CP_HOOK_FAULT, -1, msg);
    }
    cp_step_link_free(link);
    cp_engine_free(e);
    /* hooks are bounded by --hook-timeout: the exit waits for them */
    cp_hooks_free(hooks);
    ranks_free(&rk);
    return rc;
}
