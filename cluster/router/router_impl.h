/* router_impl.h - what the router's files share: a growable buffer, the
 * upstream pool (health checks, circuit breakers, choice; upstream.c), the
 * router object and its requests (router.c) and the proxying of plain and
 * streamed requests (proxy.c). Private to cluster/router. */
#ifndef CP_ROUTER_IMPL_H
#define CP_ROUTER_IMPL_H

#include "cp_router.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RT_LOG "cparallel route: "

/* ---- growable buffer (router.c) ---------------------------------------------- */

typedef struct rt_buf {
    char *p; /* NUL-terminated when len > 0 */
    size_t len, cap;
    bool oom;
} rt_buf;

void rt_buf_add(rt_buf *b, const void *s, size_t n);
void rt_buf_str(rt_buf *b, const char *s);
void rt_buf_printf(rt_buf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void rt_buf_free(rt_buf *b);

/* ---- upstream pool (upstream.c) ---------------------------------------------- */

typedef enum rt_outcome {
    RT_OUT_SUCCESS,      /* 2xx/3xx, or a stream that reached its end */
    RT_OUT_CLIENT_ERROR, /* 4xx other than 429, passed through */
    RT_OUT_RATE_LIMITED, /* 429: retried elsewhere, not a failure */
    RT_OUT_SERVER_ERROR, /* 5xx */
    RT_OUT_CONNECT_ERROR,
    RT_OUT_BROKEN,    /* the connection or the stream broke mid-response */
    RT_OUT_CANCELLED, /* the client left or the router stopped */
    RT_OUT_COUNT
} rt_outcome;

typedef enum rt_state { RT_CLOSED, RT_OPEN, RT_HALF_OPEN } rt_state;

typedef struct rt_upstream {
    cp_router_upstream cfg;
    char auth[300]; /* "Authorization: Bearer KEY" or "" */
    /* under the pool's mutex */
    rt_state state;
    int fails;          /* consecutive failures */
    double open_until;  /* cp_time_now() when an open circuit turns half-open */
    int in_flight;
    bool announced;     /* a health state has been logged */
    char last_error[160];
    uint64_t outcomes[RT_OUT_COUNT];
    atomic_uint epoch; /* + 1 each time the circuit opens: transfers to it stop */
} rt_upstream;

typedef struct rt_pool {
    rt_upstream *u;
    int n;
    int min_priority;
    int fail_threshold;
    double open_s;
    int interval_ms, timeout_ms;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* health changes, stop */
    unsigned rr;
    bool stop;
    pthread_t thread;
    bool thread_started;
} rt_pool;

cp_status rt_pool_init(rt_pool *p, const cp_router_opts *o);
void rt_pool_free(rt_pool *p); /* stops the health thread */
cp_status rt_pool_start(rt_pool *p);

/* Picks an upstream for an attempt (lowest priority among the closed
 * circuits; ties: fewest in flight, then round robin), skipping those
 * marked in tried[] unless allow_tried. -1 when none. The choice counts as
 * in flight until rt_pool_done; *failover is set when a preferred one was
 * skipped. */
int rt_pool_choose(rt_pool *p, const bool *tried, bool allow_tried, bool *failover);
/* Ends an attempt started by rt_pool_choose and feeds the breaker. */
void rt_pool_done(rt_pool *p, int i, rt_outcome o, const char *why);
unsigned rt_pool_epoch(rt_pool *p, int i);
int rt_pool_healthy(rt_pool *p); /* closed circuits */
/* Waits up to ms for a health change. */
void rt_pool_wait(rt_pool *p, int ms);
void rt_pool_render(rt_pool *p, rt_buf *b);
/* Short words for a libcurl error code, for logs. */
const char *rt_curl_reason(int code);

/* ---- router and its requests (router.c) ------------------------------------- */

typedef enum rt_endpoint {
    RT_EP_COMPLETIONS,
    RT_EP_CHAT,
    RT_EP_MODELS,
    RT_EP_HEALTH,
    RT_EP_READY,
    RT_EP_METRICS,
    RT_EP_OTHER,
    RT_EP_COUNT
} rt_endpoint;

#define RT_STATUS_SLOTS 600

struct cp_router {
    cp_router_opts o;
    char *host, *api_key;
    int port;
    int listen_fd;
    struct MHD_Daemon *daemon;
    rt_pool pool;
    bool curl_ready;

    atomic_int stop_requests;
    atomic_bool draining; /* new requests get 503 */
    atomic_bool stopping; /* in-flight transfers give up */
    atomic_int n_reqs;    /* HTTP requests between first call and completion */
    atomic_int in_flight; /* proxied /v1 requests */
    atomic_uint_fast64_t next_id;

    /* metrics */
    pthread_mutex_t mmu;
    uint64_t requests[RT_EP_COUNT][RT_STATUS_SLOTS];
    atomic_uint_fast64_t retries, failovers, resumed;
};

typedef struct rt_stream rt_stream;

typedef struct rt_req {
    atomic_int refs; /* the connection's, and a streamed response's */
    cp_router_t r;
    rt_endpoint ep;
    char method[8];
    char path[128];
    char id[32];
    double t0;
    int status; /* of the response queued; 0 while none */
    bool responded;
    bool too_large;
    bool counted; /* in r->in_flight */
    rt_buf body;
    int fd;          /* the client's socket, to notice it leaving */
    char ups[192];   /* upstreams tried, for the log */
    int attempts;
    int resumes;
    const char *err_code; /* of an error response, for the log */
    rt_stream *stream;    /* a streamed response (owned by MHD's response) */
} rt_req;

/* Queues a response with body (malloc'd, taken) and marks the request
 * answered. */
enum MHD_Result rt_queue(rt_req *q, struct MHD_Connection *c, int status, char *body,
                         const char *ctype, const char *retry_after);
/* An OpenAI-shaped error {"error":{"message","type","param","code"}}. */
enum MHD_Result rt_fail(rt_req *q, struct MHD_Connection *c, int status, const char *type,
                        const char *code, const char *param, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 7, 8)))
#endif
    ;
/* The body of such an error (malloc'd). */
char *rt_error_json(const char *message, const char *type, const char *code, const char *param);
bool rt_client_gone(int fd);
/* Drops a reference; the last frees the request. */
void rt_req_release(rt_req *q);
/* Records the upstream of an attempt in q->ups for the log. */
void rt_note_upstream(rt_req *q, const char *name);

/* ---- proxying (proxy.c) ------------------------------------------------------ */

/* Forwards a request and queues the answer: plain requests (retried on
 * another upstream), or, for POSTs with "stream": true, a stream relayed
 * as it arrives and resumed elsewhere when it breaks. json is the parsed
 * body (NULL for GET), borrowed. */
enum MHD_Result rt_proxy(rt_req *q, struct MHD_Connection *c, void *json, bool stream);

#endif /* CP_ROUTER_IMPL_H */
