/* cp_server.h - the OpenAI-compatible HTTP front end: /v1/completions,
 * /v1/chat/completions (plain and Server-Sent Events streams), /v1/models,
 * /health, /health/ready and Prometheus /metrics over one engine, with a
 * continuous-batching scheduler stepped by the thread that calls
 * cp_server_run. Built on the runtime's public API only. */
#ifndef CP_SERVER_H
#define CP_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "cp_runtime.h"
#include "cp_sched.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_server *cp_server_t;

typedef struct cp_server_opts {
    const char *host;       /* address or name to bind (NULL: "127.0.0.1") */
    int port;               /* 0: any free port (see cp_server_port) */
    const char *api_key;    /* NULL or "": no authentication; else the Bearer token
                               every /v1 request must carry (copied) */
    const char *model_name; /* the name /v1/models reports and requests may give (copied;
                               NULL: "default") */
    int max_tokens_limit;   /* largest max_tokens a request may ask for (<= 0: 4096) */
    size_t max_body;        /* largest request body in bytes (0: 1 MiB) */
    int drain_timeout_s;    /* after a stop request, seconds in-flight requests may
                               still run before they are cancelled (< 0: 30) */
    bool log_prompts;       /* also log prompts and outputs (off: ids, counts, timings only) */
    cp_sched_opts sched;    /* the scheduler's options */
} cp_server_opts;

/* Creates the scheduler over e (borrowed; it must outlive the server and
 * have been created with a tokenizer and n_seq >= opts->sched.max_running),
 * binds host:port and starts answering HTTP requests on internal threads.
 * Requests are queued until cp_server_run steps the scheduler. Errors:
 * CP_ERR_INVALID_ARG (bad options, an unresolvable host), CP_ERR_IO (the
 * address cannot be bound: the message names it), CP_ERR_OOM, and those of
 * cp_sched_init. */
cp_status cp_server_init(cp_engine_t e, const cp_server_opts *opts, cp_server_t *out);

/* The port the server listens on (the real one when opts.port was 0). */
int cp_server_port(cp_server_t s);

/* The address it listens on, as given (e.g. "127.0.0.1"). */
const char *cp_server_host(cp_server_t s);

/* Steps the scheduler on the calling thread (which becomes the only thread
 * that runs the engine) until a stop is requested, then drains: new
 * requests get 503, in-flight ones may finish within drain_timeout_s (then
 * they are cancelled), and the HTTP daemon stops. Returns CP_OK after a
 * clean drain; a scheduler failure ends the loop with its status. */
cp_status cp_server_run(cp_server_t s);

/* Asks cp_server_run to drain and return. Async-signal-safe (it only sets
 * an atomic flag), so a SIGTERM handler may call it; a second call skips
 * the rest of the drain time and cancels what is still running. */
void cp_server_request_stop(cp_server_t s);

/* Stops the daemon if it still runs and frees everything (the scheduler
 * first: remaining requests end as cancelled). NULL is a no-op. */
void cp_server_free(cp_server_t s);

#ifdef __cplusplus
}
#endif

#endif /* CP_SERVER_H */
