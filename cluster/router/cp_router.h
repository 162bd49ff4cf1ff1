/* cp_router.h - the multi-region failover router (`cparallel route`): an
 * OpenAI-compatible reverse proxy in front of several deployments of
 * `cparallel serve`, with active health checks, a circuit breaker per
 * upstream, retries of plain requests and resumption of broken streams on
 * another upstream. It talks to the servers only through HTTP. */
#ifndef CP_ROUTER_H
#define CP_ROUTER_H

#include <stdbool.h>
#include <stddef.h>

#include "cp_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CP_ROUTER_MAX_UPSTREAMS 64

/* One deployment behind the router. */
typedef struct cp_router_upstream {
    char name[64];     /* [A-Za-z0-9_.-], unique; used in logs and metric labels */
    char url[512];     /* "http://host:port" (no trailing '/') */
    char api_key[256]; /* sent as "Authorization: Bearer KEY"; "" for none */
    int priority;      /* lower is preferred */
} cp_router_upstream;

typedef struct cp_router_opts {
    const char *host; /* address to listen on (NULL: 127.0.0.1) */
    int port;         /* 0: any free port (see cp_router_port) */
    const char *api_key; /* required from clients on /v1 (NULL or "": none) */
    const cp_router_upstream *upstreams; /* borrowed for cp_router_init only */
    int n_upstreams;                     /* 1..CP_ROUTER_MAX_UPSTREAMS */
    size_t max_body;                     /* request body limit (0: 1 MiB) */
    int health_interval_ms;              /* between probe rounds (0: 1000) */
    int health_timeout_ms;               /* of one probe (0: 2000) */
    int fail_threshold;                  /* consecutive failures that open a circuit (0: 3) */
    double open_seconds;                 /* an open circuit's rest (0: 5) */
    int max_attempts;                    /* upstream attempts per request (0: 3) */
    double retry_wait_s;   /* wait for a healthy upstream before giving up (<0: 10) */
    int drain_timeout_s;   /* on stop, time in-flight requests may still run (<0: 30) */
    int upstream_timeout_s; /* of a plain upstream request; streams: of silence (0: 600) */
} cp_router_opts;

typedef struct cp_router *cp_router_t;

/* Parses an --upstream value "name=a,url=http://127.0.0.1:8001,priority=0,key=K"
 * (url required; name defaults to "u<index>", priority to 0, key to
 * default_key, which may be NULL) into *out. CP_ERR_INVALID_ARG with a
 * message naming the problem. */
cp_status cp_router_parse_upstream(const char *spec, int index, const char *default_key,
                                   cp_router_upstream *out);

/* Validates the options, binds the listening socket, starts the health
 * checker and the HTTP daemon. Everything in *o is copied. On failure
 * *out is NULL. Errors: CP_ERR_INVALID_ARG (options), CP_ERR_IO (bind),
 * CP_ERR_OOM. */
cp_status cp_router_init(const cp_router_opts *o, cp_router_t *out);

/* The port and host actually listened on. */
int cp_router_port(cp_router_t r);
const char *cp_router_host(cp_router_t r);

/* Serves until cp_router_request_stop, then drains: stops accepting, lets
 * in-flight requests finish for up to drain_timeout_s, cuts the rest and
 * stops the daemon. CP_OK after a clean stop. */
cp_status cp_router_run(cp_router_t r);

/* Asks cp_router_run to drain and return. Async-signal-safe (atomics only). */
void cp_router_request_stop(cp_router_t r);

/* Stops everything still running and frees. NULL is a no-op. Not while
 * cp_router_run runs on another thread. */
void cp_router_free(cp_router_t r);

#ifdef __cplusplus
}
#endif

#endif /* CP_ROUTER_H */
