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

/* Lifecycle events, for hook scripts and operators (cp_server_opts.on_state). */
typedef enum cp_server_state {
    CP_SERVER_READY,    /* cp_server_run started answering requests */
    CP_SERVER_DRAINING, /* a stop was requested: no new work, in-flight requests finish */
    CP_SERVER_FAULT,    /* a forward step, the scheduler or the ranks failed, or a fault
                           stop was requested: in-flight requests end with a retryable
                           error and cp_server_run returns an error */
} cp_server_state;

typedef struct cp_server_state_event {
    cp_server_state state;
    int in_flight;       /* requests in flight at that moment */
    const char *message; /* what happened (no prompt or output text) */
} cp_server_state_event;

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
    const char *region;     /* the deployment's label in /health, /health/ready and /metrics
                               (copied; NULL or "": none) */
    /* Called on the thread of cp_server_run at each lifecycle event (each
     * state at most once); it must not block for long. NULL: none. */
    void (*on_state)(void *user, const cp_server_state_event *ev);
    void *state_user;
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
 * clean drain. A fault (a failed forward step, a scheduler error such as
 * ranks that lost step, or cp_server_request_fault) makes the server
 * unready at once: in-flight requests end with a retryable 503, their
 * answers get a few seconds to reach the clients, and the call returns
 * the scheduler's status or CP_ERR_INTERNAL (cp_last_error says why). */
cp_status cp_server_run(cp_server_t s);

/* Asks cp_server_run to drain and return. Async-signal-safe (it only sets
 * an atomic flag), so a SIGTERM handler may call it; a second call skips
 * the rest of the drain time and cancels what is still running. */
void cp_server_request_stop(cp_server_t s);

/* Asks cp_server_run to fail over now: as after a fault, the server stops
 * admitting (503), ends in-flight requests with a retryable error
 * (503 server_fault; streams get an error event) and returns
 * CP_ERR_INTERNAL, so that the process exits non-zero and its supervisor
 * restarts it while clients retry elsewhere. Async-signal-safe (SIGUSR1). */
void cp_server_request_fault(cp_server_t s);

/* Stops the daemon if it still runs and frees everything (the scheduler
 * first: remaining requests end as cancelled). NULL is a no-op. */
void cp_server_free(cp_server_t s);

#ifdef __cplusplus
}
#endif

#endif /* CP_SERVER_H */
