/* cmd_route.c - `cparallel route`: parses the options (--upstream may be
 * repeated), starts the router through its public API, turns SIGTERM and
 * SIGINT into a drain and maps the outcome to an exit code. */
#include "cmd_route.h"

#include "cli.h"
#include "cp_router.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cp_router_t volatile g_router; /* for the signal handler */

static void on_signal(int sig) {
    (void)sig;
    cp_router_t r = g_router;
    if (r) cp_router_request_stop(r);
}

/* "HOST:PORT", "[V6]:PORT" or ":PORT" (all addresses of the default host). */
static bool parse_listen(const char *s, char *host, size_t n, int *port) {
    const char *colon;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':' || (size_t)(end - s - 1) >= n) return false;
        memcpy(host, s + 1, (size_t)(end - s - 1));
        host[end - s - 1] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || (size_t)(colon - s) >= n) return false;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = '\0';
    }
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || p < 0 || p > 65535) return false;
    *port = (int)p;
    return true;
}

int cp_cli_route(int argc, char **argv) {
    const char *listen = "127.0.0.1:8090", *api_key = NULL, *up_key = NULL, *up_dummy = NULL;
    int max_body = 1 << 20, interval_ms = 1000, probe_timeout_ms = 2000, threshold = 3;
    int max_attempts = 3, drain_timeout = 30, up_timeout = 600;
    float open_s = 5.0f, retry_wait = 10.0f;
    const cli_opt opts[] = {
        {"listen", 0, CLI_STR, &listen, 0, -1, "HOST:PORT",
         "address to listen on (default 127.0.0.1:8090; port 0 = any free port, printed)", NULL},
        {"upstream", 0, CLI_STR, &up_dummy, 0, -1, "SPEC",
         "a deployment, name=NAME,url=http://HOST:PORT[,priority=N][,key=KEY]; repeat for "
         "each (lower priority is preferred)",
         NULL},
        {"api-key", 0, CLI_STR, &api_key, 0, -1, "KEY",
         "require 'Authorization: Bearer KEY' on /v1 (default: env CPARALLEL_API_KEY)", NULL},
        {"upstream-api-key", 0, CLI_STR, &up_key, 0, -1, "KEY",
         "key sent to upstreams without key=... in their spec", NULL},
        {"max-body", 0, CLI_INT, &max_body, 1024, 1 << 30, "BYTES",
         "largest request body (default 1048576)", NULL},
        {"health-interval-ms", 0, CLI_INT, &interval_ms, 50, 3600000, "MS",
         "time between health checks of every upstream (default 1000)", NULL},
        {"health-timeout-ms", 0, CLI_INT, &probe_timeout_ms, 50, 600000, "MS",
         "a health check that takes longer fails (default 2000)", NULL},
        {"fail-threshold", 0, CLI_INT, &threshold, 1, 1000, "N",
         "consecutive failures that open an upstream's circuit (default 3)", NULL},
        {"open-seconds", 0, CLI_FLOAT, &open_s, 0.05, 86400, "S",
         "how long an open circuit takes no traffic before a probe may close it (default 5)",
         NULL},
        {"max-attempts", 0, CLI_INT, &max_attempts, 1, 64, "N",
         "upstream attempts per request, resumptions included (default 3)", NULL},
        {"retry-wait-s", 0, CLI_FLOAT, &retry_wait, 0, 3600, "S",
         "how long a request waits for a healthy upstream when none is (default 10)", NULL},
        {"drain-timeout", 0, CLI_INT, &drain_timeout, 0, 86400, "S",
         "on SIGTERM/SIGINT, seconds in-flight requests may still run (default 30)", NULL},
        {"upstream-timeout", 0, CLI_INT, &up_timeout, 1, 86400, "S",
         "longest plain upstream request, and longest silence of a stream (default 600)", NULL},
        {0},
    };
    const char *usage = "--upstream SPEC [--upstream SPEC ...] [--listen HOST:PORT] [options]";
    /* --upstream repeats, which the table cannot hold: taken out first */
    char **rest = malloc(sizeof(char *) * (size_t)(argc + 1));
    const char **specs = malloc(sizeof(char *) * (size_t)(argc + 1));
    cp_router_upstream *ups = NULL;
    int rc = 1, nrest = 0, nspec = 0;
    if (!rest || !specs) {
        fprintf(stderr, "cparallel route: error: out of memory\n");
        goto out;
    }
    for (int i = 0; i < argc; i++) {
        if (i >= 2 && !strcmp(argv[i], "--upstream")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "cparallel route: error: option '--upstream' needs a value "
                                "(see 'cparallel route --help')\n");
                rc = 2;
                goto out;
            }
            specs[nspec++] = argv[++i];
        } else if (i >= 2 && !strncmp(argv[i], "--upstream=", 11)) {
            specs[nspec++] = argv[i] + 11;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    rc = cli_parse("route", usage, opts, nrest, rest, 2);
    if (rc) {
        rc = rc == 1 ? 0 : rc;
        goto out;
    }
    rc = 2;
    if (nspec == 0) {
        fprintf(stderr, "cparallel route: error: at least one --upstream is required (see "
                        "'cparallel route --help')\n");
        goto out;
    }
    if (nspec > CP_ROUTER_MAX_UPSTREAMS) {
        fprintf(stderr, "cparallel route: error: at most %d upstreams\n", CP_ROUTER_MAX_UPSTREAMS);
        goto out;
    }
    char host[256];
    int port = 0;
    if (!parse_listen(listen, host, sizeof(host), &port)) {
        fprintf(stderr,
                "cparallel route: error: invalid value '%s' for --listen (expected HOST:PORT)\n",
                listen);
        goto out;
    }
    if (!host[0]) snprintf(host, sizeof(host), "127.0.0.1");
    ups = calloc((size_t)nspec, sizeof(*ups));
    if (!ups) goto out;
    for (int i = 0; i < nspec; i++)
        if (cp_router_parse_upstream(specs[i], i, up_key, &ups[i]) != CP_OK) {
            fprintf(stderr, "cparallel route: error: %s\n", cp_last_error_detail());
            goto out;
        }
    if (!api_key) api_key = getenv("CPARALLEL_API_KEY");
    cp_router_opts ro = {
        .host = host,
        .port = port,
        .api_key = api_key,
        .upstreams = ups,
        .n_upstreams = nspec,
        .max_body = (size_t)max_body,
        .health_interval_ms = interval_ms,
        .health_timeout_ms = probe_timeout_ms,
        .fail_threshold = threshold,
        .open_seconds = open_s,
        .max_attempts = max_attempts,
        .retry_wait_s = retry_wait,
        .drain_timeout_s = drain_timeout,
        .upstream_timeout_s = up_timeout,
    };
    signal(SIGPIPE, SIG_IGN);
    cp_router_t r = NULL;
    if (cp_router_init(&ro, &r) != CP_OK) {
        cli_report_error("cannot start the router");
        rc = 1;
        goto out;
    }
    g_router = r;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    const char *h = cp_router_host(r);
    bool v6 = strchr(h, ':') != NULL;
    for (int i = 0; i < nspec; i++)
        fprintf(stderr, "cparallel: upstream %s %s priority %d\n", ups[i].name, ups[i].url,
                ups[i].priority);
    fprintf(stderr, "cparallel: routing on http://%s%s%s:%d\n", v6 ? "[" : "", h, v6 ? "]" : "",
            cp_router_port(r));
    fflush(stderr);
    rc = cp_router_run(r) == CP_OK ? 0 : 1;
    if (rc) cli_report_error("the router stopped after a failure");
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    g_router = NULL;
    cp_router_free(r);
out:
    free(ups);
    free(rest);
    free(specs);
    return rc;
}
