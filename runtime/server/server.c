/* server.c - the HTTP server: libmicrohttpd with one thread per connection
 * hands each generation request to the scheduler with a callback that
 * queues its events (mutex + condition variable); plain responses wait for
 * the last event, streamed ones are written as Server-Sent Events by a
 * content reader. The thread in cp_server_run steps the scheduler, and on a
 * stop request drains: 503 for new work, in-flight requests finish (or are
 * cancelled after the drain timeout), then the daemon stops. */
#include "cp_server.h"
#include "server_impl.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WAIT_SLICE_MS 250    /* how often a waiting handler looks at its client */
#define KEEPALIVE_S 15.0     /* an SSE comment after this long without events */
#define READY_FRESH_S 10.0   /* a forward step this recent makes /health/ready 200 */
#define PROBE_TIMEOUT_S 10.0 /* a readiness probe that takes longer fails */
#define FAULT_MESSAGE "the server failed and is going down; retry on another replica"
#define FLUSH_S 5.0          /* after the drain, time for responses to reach clients */

/* cp_server_request_stop runs in signal handlers: its atomics must not lock */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_BOOL_LOCK_FREE == 2,
               "the stop flags need lock-free atomics");

/* One event of a request, copied out of the scheduler's callback. */
typedef struct ev_item {
    struct ev_item *next;
    cp_finish_reason finish;
    int n_tokens, n_prompt, n_generated, n_cached;
    double ttft_s;
    size_t len;
    char *text;                 /* [len + 1] */
    int32_t *tokens;            /* [n_tokens] */
    cp_sched_logprob *lp, *top; /* [n_tokens], [n_tokens][k] or NULL */
    char *error;                /* CP_FINISH_ERROR only */
} ev_item;

typedef struct req req;

struct cp_server {
    cp_engine_t engine;
    cp_sched_t sched;
    struct MHD_Daemon *daemon;
    int listen_fd;
    int port;
    char *host, *api_key, *model_name, *region;
    size_t max_body;
    int drain_timeout_s;
    bool log_prompts;
    api_ctx api;
    metrics *metrics;
    long started; /* wall-clock seconds at init */

    atomic_int stop_requests; /* from cp_server_request_stop (signal handlers) */
    atomic_int fault_requests; /* from cp_server_request_fault (signal handlers) */
    atomic_bool draining;     /* new work gets 503 */
    atomic_bool faulted;      /* failed: answers are retryable 503s, the run ends with an error */
    atomic_bool stopping;     /* waits give up: the daemon is going down */
    void (*on_state)(void *user, const cp_server_state_event *ev);
    void *state_user;

    pthread_mutex_t mu; /* guards what follows */
    req *active;        /* submitted requests without their final event */
    int n_active;
    int n_reqs; /* HTTP requests between first call and completion */
    cp_rng rng; /* ids and default seeds */

    pthread_mutex_t health_mu; /* readiness probes */
    pthread_cond_t health_cv;
    double last_ok, last_fail; /* cp_time_now() of the latest forward success / failure */
    bool probe_running;
    int64_t probe_id;
    char step_error[512]; /* the latest failed step's error */
    int step_failed;      /* requests ended by failed steps not yet reported */
    char fault[512];      /* why the server failed (set once, before faulted) */
};

struct req {
    atomic_int refs; /* connection, scheduler, streamed response */
    cp_server_t srv;
    metric_endpoint ep;
    char method[8];
    char path[48];
    char id[48];
    long created;
    double t_start;
    int status;           /* of the queued response; 0 while none */
    const char *err_type; /* of an error response, for the log */
    sbuf body;
    bool too_large;
    bool responded;
    int fd; /* the client's socket, to notice it leaving */

    gen_spec spec;
    bool has_spec;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ev_item *head, *tail; /* events not yet consumed */
    bool submitted, finished, cancel_sent, gone;
    int64_t sched_id;

    /* the scheduler thread's own view (TTFT / TPOT) */
    double cb_first_t, cb_last_t;

    /* what was generated (consumer side) */
    sbuf text;
    lp_list lp;
    cp_finish_reason finish;
    int n_prompt, n_generated, n_cached;
    double ttft_s;
    char error[256];

    /* streaming */
    sbuf out;
    size_t out_off;
    size_t text_offset;
    bool role_sent, stream_done;
    double last_write;

    req *act_prev, *act_next;
    bool in_active;
};

/* ---- small helpers --------------------------------------------------------- */

static long wall_time(void) {
    return (long)time(NULL);
}

static void rand_id(cp_server_t s, const char *prefix, char *out, size_t n) {
    pthread_mutex_lock(&s->mu);
    uint64_t a = cp_rng_next(&s->rng), b = cp_rng_next(&s->rng);
    pthread_mutex_unlock(&s->mu);
    snprintf(out, n, "%s%016llx%08llx", prefix, (unsigned long long)a,
             (unsigned long long)(b >> 32));
}

static uint64_t rand_seed(cp_server_t s) {
    pthread_mutex_lock(&s->mu);
    uint64_t v = cp_rng_next(&s->rng);
    pthread_mutex_unlock(&s->mu);
    return v;
}

static void abs_deadline(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* True when the peer has closed its side (or the socket failed). Data
 * waiting to be read (a pipelined request) counts as alive. */
static bool client_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLERR | POLLHUP | POLLNVAL)) return true;
    if (p.revents & POLLIN) {
        char c;
        ssize_t n = recv(fd, &c, 1, MSG_PEEK);
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    return false;
}

/* ---- request lifetime ------------------------------------------------------- */

static req *req_new(cp_server_t s, const char *method, const char *url) {
    req *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    atomic_init(&r->refs, 1);
    r->srv = s;
    r->fd = -1;
    r->t_start = cp_time_now();
    r->created = wall_time();
    snprintf(r->method, sizeof(r->method), "%s", method);
    snprintf(r->path, sizeof(r->path), "%s", url);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    pthread_mutex_lock(&s->mu);
    s->n_reqs++;
    pthread_mutex_unlock(&s->mu);
    return r;
}

static void req_release(req *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    cp_server_t s = r->srv;
    for (ev_item *it = r->head; it;) {
        ev_item *n = it->next;
        free(it);
        it = n;
    }
    gen_spec_free(&r->spec);
    sb_free(&r->body);
    sb_free(&r->text);
    sb_free(&r->out);
    lp_free(&r->lp);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
    pthread_mutex_lock(&s->mu);
    s->n_reqs--;
    pthread_mutex_unlock(&s->mu);
}

static void req_cancel(req *r) {
    pthread_mutex_lock(&r->mu);
    bool send = r->submitted && !r->finished && !r->cancel_sent;
    r->cancel_sent = r->cancel_sent || send;
    r->gone = true;
    int64_t id = r->sched_id;
    pthread_mutex_unlock(&r->mu);
    if (send) cp_sched_cancel(r->srv->sched, id);
}

static void active_add(cp_server_t s, req *r) {
    pthread_mutex_lock(&s->mu);
    r->act_next = s->active;
    r->act_prev = NULL;
    if (s->active) s->active->act_prev = r;
    s->active = r;
    r->in_active = true;
    s->n_active++;
    pthread_mutex_unlock(&s->mu);
}

static void active_remove(cp_server_t s, req *r) {
    pthread_mutex_lock(&s->mu);
    if (r->in_active) {
        if (r->act_prev)
            r->act_prev->act_next = r->act_next;
        else
            s->active = r->act_next;
        if (r->act_next) r->act_next->act_prev = r->act_prev;
        r->in_active = false;
        s->n_active--;
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- readiness ------------------------------------------------------------- */

static void health_mark(cp_server_t s, bool ok) {
    pthread_mutex_lock(&s->health_mu);
    if (ok)
        s->last_ok = cp_time_now();
    else
        s->last_fail = cp_time_now();
    pthread_mutex_unlock(&s->health_mu);
}

static void on_probe_event(void *user, const cp_sched_event *ev) {
    cp_server_t s = user;
    if (ev->finish == CP_FINISH_NONE) return;
    pthread_mutex_lock(&s->health_mu);
    if (ev->finish == CP_FINISH_STOP || ev->finish == CP_FINISH_LENGTH)
        s->last_ok = cp_time_now();
    else if (ev->finish == CP_FINISH_ERROR)
        s->last_fail = cp_time_now();
    s->probe_running = false;
    pthread_cond_broadcast(&s->health_cv);
    pthread_mutex_unlock(&s->health_mu);
}

/* 200 when a forward step succeeded within READY_FRESH_S (probing through
 * the scheduler when the last one is older), else 503 with *why. */
static int ready_status(cp_server_t s, const char **why) {
    if (atomic_load(&s->faulted)) {
        *why = "the server failed and is going down";
        return 503;
    }
    if (atomic_load(&s->draining)) {
        *why = "the server is draining";
        return 503;
    }
    pthread_mutex_lock(&s->health_mu);
    double now = cp_time_now();
    bool fresh = s->last_ok > 0 && s->last_ok >= s->last_fail && now - s->last_ok < READY_FRESH_S;
    if (!fresh && !s->probe_running) {
        if (s->last_fail > s->last_ok && now - s->last_fail < 1.0) {
            pthread_mutex_unlock(&s->health_mu);
            *why = "the latest forward step failed";
            return 503;
        }
        cp_tokenizer_t tok = s->api.tok;
        int32_t t = cp_tokenizer_bos(tok);
        if (t < 0) t = cp_tokenizer_eos(tok);
        if (t < 0) t = 0;
        cp_sched_request pr = {.prompt = &t,
                               .n_prompt = 1,
                               .max_tokens = 1,
                               .sample = {.temperature = 0.0f, .top_p = 1.0f},
                               .top_logprobs = -1,
                               .ignore_eos = true};
        /* submitted without health_mu held: the probe's callback takes it */
        s->probe_running = true;
        s->probe_id = -1;
        pthread_mutex_unlock(&s->health_mu);
        int64_t id = -1;
        cp_status st = cp_sched_submit(s->sched, &pr, on_probe_event, s, &id);
        pthread_mutex_lock(&s->health_mu);
        if (st != CP_OK) {
            if (st != CP_ERR_BUSY && st != CP_ERR_UNSUPPORTED) s->last_fail = now;
            s->probe_running = false;
            pthread_cond_broadcast(&s->health_cv);
            pthread_mutex_unlock(&s->health_mu);
            *why =
                st == CP_ERR_BUSY ? "the request queue is full" : "the scheduler refused a probe";
            return 503;
        }
        if (s->probe_running) s->probe_id = id;
    }
    struct timespec ts;
    abs_deadline(&ts, (int)(PROBE_TIMEOUT_S * 1000));
    while (!fresh && s->probe_running && !atomic_load(&s->stopping)) {
        if (pthread_cond_timedwait(&s->health_cv, &s->health_mu, &ts) == ETIMEDOUT) break;
        now = cp_time_now();
        fresh = s->last_ok > 0 && s->last_ok >= s->last_fail && now - s->last_ok < READY_FRESH_S;
    }
    now = cp_time_now();
    fresh = s->last_ok > 0 && s->last_ok >= s->last_fail && now - s->last_ok < READY_FRESH_S;
    pthread_mutex_unlock(&s->health_mu);
    if (fresh) return 200;
    *why = "no forward step succeeded within the last 10 s";
    return 503;
}

/* ---- scheduler callback (runs on the stepping thread) ---------------------- */

static ev_item *copy_event(const cp_sched_event *ev, int k) {
    size_t nt = (size_t)(ev->n_tokens > 0 ? ev->n_tokens : 0);
    size_t elen = ev->error ? strlen(ev->error) + 1 : 0;
    size_t sz = sizeof(ev_item) + ev->len + 1 + nt * sizeof(int32_t) + elen +
                (ev->logprobs ? nt * sizeof(cp_sched_logprob) : 0) +
                (ev->top ? nt * (size_t)k * sizeof(cp_sched_logprob) : 0) + 16;
    ev_item *it = malloc(sz);
    if (!it) return NULL;
    memset(it, 0, sizeof(*it));
    /* lay the arrays out after the header, most aligned first */
    char *p = (char *)(it + 1);
    if (ev->logprobs && nt) {
        it->lp = (cp_sched_logprob *)p;
        memcpy(it->lp, ev->logprobs, nt * sizeof(cp_sched_logprob));
        p += nt * sizeof(cp_sched_logprob);
    }
    if (ev->top && nt && k > 0) {
        it->top = (cp_sched_logprob *)p;
        memcpy(it->top, ev->top, nt * (size_t)k * sizeof(cp_sched_logprob));
        p += nt * (size_t)k * sizeof(cp_sched_logprob);
    }
    it->tokens = (int32_t *)p;
    if (nt && ev->tokens) memcpy(it->tokens, ev->tokens, nt * sizeof(int32_t));
    p += nt * sizeof(int32_t);
    it->text = p;
    if (ev->len) memcpy(it->text, ev->text, ev->len);
    it->text[ev->len] = '\0';
    p += ev->len + 1;
    if (elen) {
        it->error = p;
        memcpy(it->error, ev->error, elen);
    }
    it->finish = ev->finish;
    it->n_tokens = (int)nt;
    it->n_prompt = ev->n_prompt;
    it->n_generated = ev->n_generated;
    it->n_cached = ev->n_cached;
    it->ttft_s = ev->ttft_s;
    it->len = ev->len;
    return it;
}

static void on_event(void *user, const cp_sched_event *ev) {
    req *r = user;
    cp_server_t s = r->srv;
    double now = cp_time_now();
    if (ev->n_tokens > 0) {
        metrics_tokens(s->metrics, 0, ev->n_tokens);
        if (r->cb_first_t == 0) {
            r->cb_first_t = now;
            metrics_ttft(s->metrics, ev->ttft_s > 0 ? ev->ttft_s : now - r->t_start);
        }
        r->cb_last_t = now;
    }
    bool final = ev->finish != CP_FINISH_NONE;
    if (final) {
        metrics_tokens(s->metrics, ev->n_prompt, 0);
        if (ev->n_generated > 1 && r->cb_last_t > r->cb_first_t)
            metrics_tpot(s->metrics, (r->cb_last_t - r->cb_first_t) / (ev->n_generated - 1));
        if ((ev->finish == CP_FINISH_STOP || ev->finish == CP_FINISH_LENGTH) && ev->n_generated > 0)
            health_mark(s, true);
        else if (ev->finish == CP_FINISH_ERROR) {
            health_mark(s, false);
            pthread_mutex_lock(&s->health_mu);
            snprintf(s->step_error, sizeof(s->step_error), "%s",
                     ev->error ? ev->error : "unknown error");
            s->step_failed++;
            pthread_mutex_unlock(&s->health_mu);
        }
        active_remove(s, r);
    }
    ev_item *it = copy_event(ev, r->spec.top_logprobs > 0 ? r->spec.top_logprobs : 0);
    pthread_mutex_lock(&r->mu);
    if (it) {
        if (r->tail)
            r->tail->next = it;
        else
            r->head = it;
        r->tail = it;
    }
    if (final) {
        r->finished = true;
        if (!it) {
            /* out of memory: the request still ends, as an error */
            r->finish = CP_FINISH_ERROR;
            snprintf(r->error, sizeof(r->error), "out of memory");
        }
    }
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (final) req_release(r); /* the scheduler's reference */
}

/* Takes the consumed event's data into the request's totals. */
static void absorb(req *r, const ev_item *it) {
    if (it->len) sb_add(&r->text, it->text, it->len);
    if (r->spec.top_logprobs >= 0 && it->n_tokens)
        lp_append(&r->lp, it->n_tokens, it->tokens, it->lp, it->top);
    r->n_prompt = it->n_prompt;
    r->n_generated = it->n_generated;
    r->n_cached = it->n_cached;
    if (it->ttft_s > 0) r->ttft_s = it->ttft_s;
    if (it->finish != CP_FINISH_NONE) {
        r->finish = it->finish;
        if (it->error) snprintf(r->error, sizeof(r->error), "%s", it->error);
    }
}

/* ---- responses ------------------------------------------------------------------ */

static enum MHD_Result queue(req *r, struct MHD_Connection *c, int status, char *body,
                             const char *ctype, const char *retry_after, const char *allow) {
    if (!body) {
        status = 500;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\","
                      "\"param\":null,\"code\":null}}");
        if (!body) return MHD_NO;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", ctype ? ctype : "application/json");
    if (retry_after) MHD_add_response_header(resp, "Retry-After", retry_after);
    if (allow) MHD_add_response_header(resp, "Allow", allow);
    if (status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    r->status = status;
    r->responded = true;
    return ret;
}

static enum MHD_Result queue_error(req *r, struct MHD_Connection *c, const api_error *e) {
    r->err_type = e->type;
    const char *retry = e->status == 429 ? "1" : e->status == 503 ? "5" : NULL;
    return queue(r, c, e->status, api_error_body(e), NULL, retry, NULL);
}

static enum MHD_Result fail(req *r, struct MHD_Connection *c, int status, const char *type,
                            const char *param, const char *code, const char *msg) {
    api_error e;
    api_set_error(&e, status, type, param, code, "%s", msg);
    return queue_error(r, c, &e);
}

/* ---- streaming --------------------------------------------------------------- */

static void sse(req *r, char *json) {
    if (!json) {
        sb_str(&r->out, "data: {\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\","
                        "\"param\":null,\"code\":null}}\n\n");
        return;
    }
    sb_str(&r->out, "data: ");
    sb_str(&r->out, json);
    sb_str(&r->out, "\n\n");
    free(json);
}

/* The retryable error that ends a request the server could not finish: a
 * failed step or a fault (503 server_fault), or a shutdown (503 cancelled). */
static void ended_error(const req *r, cp_finish_reason f, const char *error, api_error *e) {
    cp_server_t s = r->srv;
    if (f == CP_FINISH_ERROR)
        api_set_error(e, 503, "service_unavailable", NULL, "server_fault",
                      "generation failed: %s; the server is failing over, retry on another "
                      "replica",
                      error && *error ? error : "unknown error");
    else if (atomic_load(&s->faulted))
        api_set_error(e, 503, "service_unavailable", NULL, "server_fault", "%s", FAULT_MESSAGE);
    else
        api_set_error(e, 503, "service_unavailable", NULL, "cancelled",
                      "the request was cancelled (the server is shutting down or the client "
                      "left); retry");
}

/* continuous_usage_stats: the chunk carries the token counts so far. */
static void usage_so_far(const req *r, chunk_args *a) {
    if (!r->spec.continuous_usage) return;
    a->usage_now = true;
    a->n_prompt = r->n_prompt > 0 ? r->n_prompt : r->spec.n_prompt;
    a->n_generated = r->n_generated;
    a->n_cached = r->n_cached;
}

/* Formats one event as SSE data into r->out (and the end of the stream
 * after the final one). */
static void stream_event(req *r, const ev_item *it) {
    cp_server_t s = r->srv;
    api_kind k = r->spec.kind;
    absorb(r, it);
    bool want_lp = r->spec.top_logprobs >= 0;
    if (it->len || (want_lp && it->n_tokens)) {
        lp_list tmp = {.k = r->spec.top_logprobs > 0 ? r->spec.top_logprobs : 0};
        if (want_lp) lp_append(&tmp, it->n_tokens, it->tokens, it->lp, it->top);
        chunk_args a = {.text = it->text,
                        .len = it->len,
                        .lp = want_lp ? &tmp : NULL,
                        .text_offset = r->text_offset,
                        .usage_null = r->spec.include_usage};
        usage_so_far(r, &a);
        sse(r, api_chunk(&s->api, k, r->id, r->created, &a));
        lp_free(&tmp);
        r->text_offset += it->len;
    }
    if (it->finish == CP_FINISH_NONE) return;
    if (it->finish == CP_FINISH_STOP || it->finish == CP_FINISH_LENGTH) {
        chunk_args a = {.finish = it->finish, .usage_null = r->spec.include_usage};
        usage_so_far(r, &a);
        sse(r, api_chunk(&s->api, k, r->id, r->created, &a));
        if (r->spec.include_usage)
            sse(r, api_usage_chunk(&s->api, k, r->id, r->created, r->n_prompt, r->n_generated,
                                   r->n_cached));
    } else {
        api_error e;
        ended_error(r, it->finish, it->error, &e);
        r->err_type = e.type;
        sse(r, api_error_body(&e));
    }
    sb_str(&r->out, "data: [DONE]\n\n");
    r->stream_done = true;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    req *r = cls;
    cp_server_t s = r->srv;
    /* an event may format to nothing (text held back): take the next one,
     * since returning 0 would make the daemon call again at once */
    while (r->out_off >= r->out.len) {
        r->out.len = 0;
        r->out_off = 0;
        if (r->stream_done) return MHD_CONTENT_READER_END_OF_STREAM;
        if (r->spec.kind == API_CHAT && !r->role_sent) {
            /* the role first, before any token is ready */
            chunk_args a = {.role_only = true, .usage_null = r->spec.include_usage};
            usage_so_far(r, &a);
            sse(r, api_chunk(&s->api, API_CHAT, r->id, r->created, &a));
            r->role_sent = true;
            continue;
        }
        pthread_mutex_lock(&r->mu);
        bool ping = false;
        while (!r->head && !r->gone && !r->finished) {
            struct timespec ts;
            abs_deadline(&ts, WAIT_SLICE_MS);
            if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT) continue;
            pthread_mutex_unlock(&r->mu);
            bool gone = client_gone(r->fd) || atomic_load(&s->stopping);
            ping = cp_time_now() - r->last_write > KEEPALIVE_S;
            if (gone) req_cancel(r); /* sets r->gone */
            pthread_mutex_lock(&r->mu);
            if (ping) break;
        }
        ev_item *it = r->head;
        if (it) {
            r->head = it->next;
            if (!r->head) r->tail = NULL;
        }
        bool gone = r->gone, finished_empty = !it && r->finished;
        pthread_mutex_unlock(&r->mu);
        if (it) {
            stream_event(r, it);
            free(it);
        } else if (finished_empty) {
            /* the final event could not be queued (out of memory) */
            ev_item fin = {.finish = CP_FINISH_ERROR, .error = r->error, .text = (char *)""};
            stream_event(r, &fin);
        } else if (gone) {
            return MHD_CONTENT_READER_END_WITH_ERROR;
        } else if (ping) {
            sb_str(&r->out, ": keep-alive\n\n");
        }
        if (r->out.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = r->out.len - r->out_off;
    if (n > max) n = max;
    memcpy(buf, r->out.p + r->out_off, n);
    r->out_off += n;
    r->last_write = cp_time_now();
    return (ssize_t)n;
}

static void stream_free(void *cls) {
    req *r = cls;
    /* the response is gone: nobody reads the rest */
    pthread_mutex_lock(&r->mu);
    bool done = r->stream_done;
    pthread_mutex_unlock(&r->mu);
    if (!done) req_cancel(r);
    req_release(r);
}

/* ---- generation endpoints ---------------------------------------------------- */

static enum MHD_Result handle_generate(req *r, struct MHD_Connection *c, api_kind k) {
    cp_server_t s = r->srv;
    api_error e;
    if (!api_parse(&s->api, k, r->body.p ? r->body.p : "", r->body.len, &r->spec, &e))
        return queue_error(r, c, &e);
    r->has_spec = true;
    r->lp.k = r->spec.top_logprobs > 0 ? r->spec.top_logprobs : 0;
    if (atomic_load(&s->faulted))
        return fail(r, c, 503, "service_unavailable", NULL, "server_fault", FAULT_MESSAGE);
    if (atomic_load(&s->draining))
        return fail(r, c, 503, "service_unavailable", NULL, "draining",
                    "the server is shutting down; retry on another replica");
    cp_sched_request sr = {
        .prompt = r->spec.prompt,
        .n_prompt = r->spec.n_prompt,
        .max_tokens = r->spec.max_tokens,
        .sample = r->spec.sample,
        .seed = r->spec.seed_given ? r->spec.seed : rand_seed(s),
        .stop = (const char *const *)r->spec.stop,
        .n_stop = r->spec.n_stop,
        .top_logprobs = r->spec.top_logprobs,
        .ignore_eos = r->spec.ignore_eos,
    };
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = ci ? ci->connect_fd : -1;
    atomic_fetch_add(&r->refs, 1); /* the scheduler's, released by the final event */
    /* listed before the submit so that the drain can never miss it */
    active_add(s, r);
    pthread_mutex_lock(&r->mu);
    int64_t id = -1;
    cp_status st = cp_sched_submit(s->sched, &sr, on_event, r, &id);
    if (st == CP_OK) {
        r->submitted = true;
        r->sched_id = id;
    }
    pthread_mutex_unlock(&r->mu);
    if (st != CP_OK) {
        active_remove(s, r);
        atomic_fetch_sub(&r->refs, 1);
        switch (st) {
        case CP_ERR_BUSY:
            return fail(r, c, 429, "rate_limit_error", NULL, "queue_full",
                        "the server's request queue is full; retry shortly");
        case CP_ERR_UNSUPPORTED:
            return fail(r, c, 503, "service_unavailable", NULL, "draining",
                        "the server is shutting down; retry on another replica");
        case CP_ERR_INVALID_ARG:
            return fail(r, c, 400, "invalid_request_error", NULL, NULL, cp_last_error_detail());
        default: return fail(r, c, 500, "server_error", NULL, NULL, cp_last_error_detail());
        }
    }
    if (r->spec.stream) {
        atomic_fetch_add(&r->refs, 1); /* the response's, released by stream_free */
        r->last_write = cp_time_now();
        struct MHD_Response *resp = MHD_create_response_from_callback(
            MHD_SIZE_UNKNOWN, 4096, stream_reader, r, stream_free);
        if (!resp) {
            stream_free(r);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        enum MHD_Result ret = MHD_queue_response(c, 200, resp);
        MHD_destroy_response(resp);
        r->status = 200;
        r->responded = true;
        return ret;
    }
    /* plain: wait for the last event, watching the client */
    pthread_mutex_lock(&r->mu);
    while (!r->finished) {
        struct timespec ts;
        abs_deadline(&ts, WAIT_SLICE_MS);
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT) continue;
        pthread_mutex_unlock(&r->mu);
        bool gone = client_gone(r->fd) || atomic_load(&s->stopping);
        if (gone) req_cancel(r);
        pthread_mutex_lock(&r->mu);
        if (gone && atomic_load(&s->stopping)) break; /* the scheduler may be gone */
    }
    ev_item *list = r->head;
    r->head = r->tail = NULL;
    bool finished = r->finished;
    pthread_mutex_unlock(&r->mu);
    for (ev_item *it = list; it;) {
        ev_item *n = it->next;
        absorb(r, it);
        free(it);
        it = n;
    }
    if (!finished || r->finish == CP_FINISH_CANCELLED || r->finish == CP_FINISH_ERROR) {
        api_error e;
        ended_error(r, finished ? r->finish : CP_FINISH_CANCELLED, r->error, &e);
        return queue_error(r, c, &e);
    }
    gen_result res = {.text = r->text.p,
                      .len = r->text.len,
                      .lp = r->spec.top_logprobs >= 0 ? &r->lp : NULL,
                      .finish = r->finish,
                      .n_prompt = r->n_prompt,
                      .n_generated = r->n_generated,
                      .n_cached = r->n_cached};
    return queue(r, c, 200, api_response(&s->api, k, r->id, r->created, &res), NULL, NULL, NULL);
}

/* ---- routing ---------------------------------------------------------------- */

typedef struct route {
    const char *path;
    metric_endpoint ep;
    bool post; /* POST (else GET/HEAD) */
    bool auth; /* needs the API key */
    const char *id_prefix;
} route;

static const route ROUTES[] = {
    {"/v1/completions", EP_COMPLETIONS, true, true, "cmpl-"},
    {"/v1/chat/completions", EP_CHAT, true, true, "chatcmpl-"},
    {"/v1/models", EP_MODELS, false, true, "req-"},
    {"/health", EP_HEALTH, false, false, "req-"},
    {"/health/ready", EP_READY, false, false, "req-"},
    {"/metrics", EP_METRICS, false, false, "req-"},
};

static const route *find_route(const char *url, bool *model_path) {
    *model_path = false;
    for (size_t i = 0; i < sizeof(ROUTES) / sizeof(ROUTES[0]); i++)
        if (!strcmp(url, ROUTES[i].path)) return &ROUTES[i];
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        *model_path = true;
        return &ROUTES[2];
    }
    return NULL;
}

static bool authorized(cp_server_t s, struct MHD_Connection *c) {
    if (!s->api_key) return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    const char *tok = h + 7;
    while (*tok == ' ')
        tok++;
    return const_time_equal(tok, strlen(tok), s->api_key, strlen(s->api_key));
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls) {
    (void)version;
    cp_server_t s = cls;
    req *r = *con_cls;
    bool model_path;
    const route *rt = find_route(url, &model_path);
    if (!r) {
        r = req_new(s, method, url);
        if (!r) return MHD_NO;
        *con_cls = r;
        r->ep = rt ? rt->ep : EP_OTHER;
        rand_id(s, rt ? rt->id_prefix : "req-", r->id, sizeof(r->id));
        if (!rt)
            return fail(r, c, 404, "not_found_error", NULL, "not_found",
                        "unknown path (this server has /v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /health/ready and /metrics)");
        bool is_post = !strcmp(method, "POST");
        bool is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        if (rt->post ? !is_post : !is_get) {
            api_error e;
            api_set_error(&e, 405, "invalid_request_error", NULL, "method_not_allowed",
                          "%s takes %s, not %.16s", rt->path, rt->post ? "POST" : "GET", method);
            r->err_type = e.type;
            return queue(r, c, 405, api_error_body(&e), NULL, NULL,
                         rt->post ? "POST" : "GET, HEAD");
        }
        if (rt->auth && !authorized(s, c))
            return fail(r, c, 401, "authentication_error", NULL, "invalid_api_key",
                        "missing or wrong API key (send 'Authorization: Bearer KEY')");
        if (is_post) {
            const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
            unsigned long long n = cl ? strtoull(cl, NULL, 10) : 0;
            if (n > (unsigned long long)s->max_body) {
                /* A client that waits for "100 Continue", or whose body is
                 * huge, is answered now (and the connection closed). Others
                 * are still sending: their body is read and dropped first, so
                 * that they see the 413 instead of a reset connection. */
                const char *expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Expect");
                if ((expect && !strcasecmp(expect, "100-continue")) ||
                    n > 16ull * (unsigned long long)s->max_body) {
                    char msg[160];
                    snprintf(msg, sizeof(msg),
                             "the request body has %s bytes; this server takes at most %zu", cl,
                             s->max_body);
                    return fail(r, c, 413, "invalid_request_error", NULL, "body_too_large", msg);
                }
                r->too_large = true;
            }
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!r->responded && !r->too_large) {
            if (r->body.len + *upload_size > s->max_body) {
                r->too_large = true;
                sb_free(&r->body);
            } else {
                sb_add(&r->body, upload, *upload_size);
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->responded) return MHD_YES;
    if (r->too_large) {
        char msg[128];
        snprintf(msg, sizeof(msg), "the request body is larger than %zu bytes", s->max_body);
        return fail(r, c, 413, "invalid_request_error", NULL, "body_too_large", msg);
    }
    if (r->body.oom) return fail(r, c, 500, "server_error", NULL, NULL, "out of memory");
    switch (rt->ep) {
    case EP_COMPLETIONS: return handle_generate(r, c, API_COMPLETIONS);
    case EP_CHAT: return handle_generate(r, c, API_CHAT);
    case EP_MODELS:
        if (model_path && strcmp(url + 11, s->model_name) != 0)
            return fail(r, c, 404, "invalid_request_error", "model", "model_not_found",
                        "no such model; this server serves one model (see /v1/models)");
        return queue(r, c, 200,
                     model_path ? api_model(&s->api, s->started) : api_models(&s->api, s->started),
                     NULL, NULL, NULL);
    case EP_HEALTH: {
        /* liveness: 503 once failed (the process exits soon anyway) */
        bool failed = atomic_load(&s->faulted);
        const char *state = failed ? "failed" : atomic_load(&s->draining) ? "draining" : "ok";
        return queue(r, c, failed ? 503 : 200, api_health(state, s->region), NULL,
                     failed ? "5" : NULL, NULL);
    }
    case EP_READY: {
        const char *why = NULL;
        int st = ready_status(s, &why);
        if (st == 200) return queue(r, c, 200, api_health("ready", s->region), NULL, NULL, NULL);
        return fail(r, c, 503, "service_unavailable", NULL, "not_ready", why);
    }
    case EP_METRICS: {
        cp_sched_stats st;
        cp_sched_get_stats(s->sched, &st);
        metrics_info info = {.model = s->model_name,
                             .region = s->region,
                             .ready = !atomic_load(&s->draining),
                             .faulted = atomic_load(&s->faulted)};
        return queue(r, c, 200, metrics_render(s->metrics, &st, &info),
                     "text/plain; version=0.0.4", NULL, NULL);
    }
    default: return fail(r, c, 404, "not_found_error", NULL, "not_found", "unknown path");
    }
}

/* ---- request completion: log line and metrics --------------------------------- */

static const char *finish_name(cp_finish_reason f) {
    switch (f) {
    case CP_FINISH_STOP: return "stop";
    case CP_FINISH_LENGTH: return "length";
    case CP_FINISH_CANCELLED: return "cancelled";
    case CP_FINISH_ERROR: return "error";
    default: return "-";
    }
}

static void log_request(req *r, int status, bool aborted, double dur) {
    cp_server_t s = r->srv;
    bool gen = r->ep == EP_COMPLETIONS || r->ep == EP_CHAT;
    /* probes and scrapes that succeed would drown the log */
    if (!gen && status < 400) return;
    sbuf b = {0};
    sb_printf(&b, "cparallel: %s %s %s %d", r->id, r->method, r->path, status);
    if (gen && r->has_spec)
        sb_printf(&b, " prompt_tokens=%d completion_tokens=%d cached_tokens=%d finish=%s%s",
                  r->n_prompt, r->n_generated, r->n_cached, finish_name(r->finish),
                  r->spec.stream ? " stream" : "");
    if (r->ttft_s > 0) sb_printf(&b, " ttft=%.3fs", r->ttft_s);
    sb_printf(&b, " duration=%.3fs", dur);
    if (status >= 400 && r->err_type) sb_printf(&b, " error=%s", r->err_type);
    if (aborted) sb_str(&b, " client_closed");
    if (s->log_prompts && r->has_spec) {
        json_t *p = json_text(r->spec.prompt_text ? r->spec.prompt_text : "",
                              r->spec.prompt_text ? strlen(r->spec.prompt_text) : 0);
        json_t *o = json_text(r->text.p ? r->text.p : "", r->text.len);
        char *ps = json_dumps(p, JSON_ENCODE_ANY), *os = json_dumps(o, JSON_ENCODE_ANY);
        sb_printf(&b, " prompt=%s output=%s", ps ? ps : "?", os ? os : "?");
        free(ps);
        free(os);
        json_decref(p);
        json_decref(o);
    }
    sb_str(&b, "\n");
    if (!b.oom) fputs(b.p, stderr);
    sb_free(&b);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    req *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    bool aborted = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (aborted) req_cancel(r);
    double dur = cp_time_now() - r->t_start;
    /* 499: the client left before its answer was complete (nginx's code) */
    int status = !r->responded || (aborted && r->status == 200) ? 499 : r->status;
    metrics_request(r->srv->metrics, r->ep, status, dur);
    log_request(r, r->responded ? r->status : 499, aborted, dur);
    req_release(r);
}

/* ---- listening socket ------------------------------------------------------- */

static cp_status bind_listen(const char *host, int port, int *fd_out, int *port_out, int *family) {
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cannot resolve host '%s': %s", host, gai_strerror(rc));
    int err = 0, fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 256) == 0) {
            *family = a->ai_family;
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return CP_ERROR(CP_ERR_IO, "cannot listen on %s:%d: %s", host, port, strerror(err));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        close(fd);
        return CP_ERROR(CP_ERR_IO, "cannot read the listening port: %s", strerror(errno));
    }
    *port_out = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    return CP_OK;
}

/* ---- lifetime --------------------------------------------------------------- */

cp_status cp_server_init(cp_engine_t e, const cp_server_opts *o, cp_server_t *out) {
    *out = NULL;
    if (!e || !o) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_server_init: NULL engine or options");
    if (!cp_engine_tokenizer(e))
        return CP_ERROR(CP_ERR_INVALID_ARG, "the server needs an engine with a tokenizer");
    if (o->port < 0 || o->port > 65535)
        return CP_ERROR(CP_ERR_INVALID_ARG, "port %d is outside 0-65535", o->port);
    cp_server_t s = calloc(1, sizeof(*s));
    if (!s) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st;
    s->engine = e;
    s->listen_fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->health_mu, NULL);
    pthread_cond_init(&s->health_cv, NULL);
    atomic_init(&s->stop_requests, 0);
    atomic_init(&s->fault_requests, 0);
    atomic_init(&s->draining, false);
    atomic_init(&s->faulted, false);
    atomic_init(&s->stopping, false);
    s->on_state = o->on_state;
    s->state_user = o->state_user;
    s->host = strdup(o->host && *o->host ? o->host : "127.0.0.1");
    s->api_key = o->api_key && *o->api_key ? strdup(o->api_key) : NULL;
    s->model_name = strdup(o->model_name && *o->model_name ? o->model_name : "default");
    s->region = o->region && *o->region ? strdup(o->region) : NULL;
    s->metrics = metrics_new();
    if (!s->host || !s->model_name || !s->metrics || (o->api_key && *o->api_key && !s->api_key) ||
        (o->region && *o->region && !s->region)) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    s->max_body = o->max_body ? o->max_body : (size_t)1 << 20;
    s->drain_timeout_s = o->drain_timeout_s >= 0 ? o->drain_timeout_s : 30;
    s->log_prompts = o->log_prompts;
    s->started = wall_time();
    s->api = (api_ctx){.tok = cp_engine_tokenizer(e),
                       .n_ctx = cp_engine_n_ctx(e),
                       .max_tokens_limit = o->max_tokens_limit > 0 ? o->max_tokens_limit : 4096,
                       .model_name = s->model_name};
    uint64_t seed = (uint64_t)(cp_time_now() * 1e9) ^ ((uint64_t)getpid() << 32);
    FILE *ur = fopen("/dev/urandom", "rb");
    if (ur) {
        if (fread(&seed, sizeof(seed), 1, ur) != 1) seed ^= (uint64_t)wall_time();
        fclose(ur);
    }
    cp_rng_seed(&s->rng, seed);
    CP_CHECK_GOTO(cp_sched_init(e, &o->sched, &s->sched), st, fail);
    int family = AF_INET;
    CP_CHECK_GOTO(bind_listen(s->host, o->port, &s->listen_fd, &s->port, &family), st, fail);
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD;
    if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES) flags |= MHD_USE_POLL;
    if (family == AF_INET6) flags |= MHD_USE_IPv6;
    int max_running = o->sched.max_running > 0 ? o->sched.max_running : 64;
    int max_waiting = o->sched.max_waiting > 0 ? o->sched.max_waiting : 256;
    /* every queued or running request holds a connection, plus room for
     * probes, scrapes and refusals */
    unsigned limit = (unsigned)(max_running + max_waiting + 64);
    s->daemon =
        MHD_start_daemon(flags, 0, NULL, NULL, on_access, s, MHD_OPTION_LISTEN_SOCKET, s->listen_fd,
                         MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_CONNECTION_LIMIT,
                         limit, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300, MHD_OPTION_END);
    if (!s->daemon) {
        st = CP_ERROR(CP_ERR_IO, "cannot start the HTTP daemon on %s:%d", s->host, s->port);
        goto fail;
    }
    s->listen_fd = -1; /* the daemon owns and closes it */
    *out = s;
    return CP_OK;
fail:
    cp_server_free(s);
    return st;
}

int cp_server_port(cp_server_t s) {
    return s ? s->port : 0;
}
const char *cp_server_host(cp_server_t s) {
    return s ? s->host : "";
}

void cp_server_request_stop(cp_server_t s) {
    if (!s) return;
    /* new requests get 503 from now on, even while a long step runs */
    atomic_store(&s->draining, true);
    atomic_fetch_add(&s->stop_requests, 1);
}

void cp_server_request_fault(cp_server_t s) {
    if (!s) return;
    atomic_store(&s->draining, true);
    atomic_fetch_add(&s->fault_requests, 1);
}

static int count_active(cp_server_t s) {
    pthread_mutex_lock(&s->mu);
    int n = s->n_active;
    pthread_mutex_unlock(&s->mu);
    return n;
}

static void cancel_all(cp_server_t s) {
    /* the ids are collected under the lock, cancelled after it: cancel may
     * take the scheduler's lock */
    int64_t ids[512];
    int n;
    do {
        n = 0;
        pthread_mutex_lock(&s->mu);
        for (req *r = s->active; r && n < 512; r = r->act_next) {
            pthread_mutex_lock(&r->mu);
            if (r->submitted && !r->cancel_sent) {
                r->cancel_sent = true;
                ids[n++] = r->sched_id;
            }
            pthread_mutex_unlock(&r->mu);
        }
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < n; i++)
            cp_sched_cancel(s->sched, ids[i]);
    } while (n == 512);
    pthread_mutex_lock(&s->health_mu);
    int64_t probe = s->probe_running ? s->probe_id : -1;
    pthread_mutex_unlock(&s->health_mu);
    if (probe >= 0) cp_sched_cancel(s->sched, probe);
}

static void emit(cp_server_t s, cp_server_state state, int in_flight, const char *message) {
    if (!s->on_state) return;
    cp_server_state_event ev = {.state = state, .in_flight = in_flight, .message = message};
    s->on_state(s->state_user, &ev);
}

/* Turns the server unready for good and ends what is in flight with a
 * retryable error (delivered by the next scheduler steps). */
static void enter_fault(cp_server_t s, const char *why) {
    snprintf(s->fault, sizeof(s->fault), "%s", why);
    atomic_store(&s->faulted, true);
    atomic_store(&s->draining, true);
    cp_sched_drain(s->sched);
    health_mark(s, false);
    /* in flight: what is still running, and what the failed step ended */
    int n = count_active(s);
    pthread_mutex_lock(&s->health_mu);
    n += s->step_failed;
    s->step_failed = 0;
    pthread_mutex_unlock(&s->health_mu);
    fprintf(stderr,
            "cparallel: error: fault: %s; not ready, %d request(s) in flight end with a retryable "
            "error\n",
            why, n);
    fflush(stderr);
    emit(s, CP_SERVER_FAULT, n, why);
    cancel_all(s);
}

cp_status cp_server_run(cp_server_t s) {
    enum { RUN, DRAIN, CANCEL, FAULT, FLUSH } phase = RUN;
    double deadline = 0;
    cp_status result = CP_OK;
    cp_sched_stats ss;
    cp_sched_get_stats(s->sched, &ss);
    int64_t failed_seen = ss.failed_steps;
    emit(s, CP_SERVER_READY, 0, "the server answers requests");
    for (;;) {
        bool worked = false;
        cp_status st = cp_sched_step(s->sched, phase == RUN ? 100 : 20, &worked);
        double now = cp_time_now();
        if (!atomic_load(&s->faulted)) {
            char why[600] = "";
            cp_sched_get_stats(s->sched, &ss);
            if (st != CP_OK) {
                snprintf(why, sizeof(why), "the scheduler failed: %s", cp_last_error_detail());
                result = st;
            } else if (ss.failed_steps > failed_seen) {
                failed_seen = ss.failed_steps;
                pthread_mutex_lock(&s->health_mu);
                snprintf(why, sizeof(why), "a forward step failed: %s", s->step_error);
                pthread_mutex_unlock(&s->health_mu);
            } else if (atomic_load(&s->fault_requests) > 0) {
                snprintf(why, sizeof(why), "a fault stop was requested (SIGUSR1)");
            }
            if (why[0]) {
                if (result == CP_OK) result = CP_ERR_INTERNAL;
                enter_fault(s, why);
                phase = FAULT;
                deadline = now + FLUSH_S;
            }
        }
        int stops = atomic_load(&s->stop_requests);
        if (phase == RUN && stops > 0) {
            atomic_store(&s->draining, true);
            cp_sched_drain(s->sched);
            phase = DRAIN;
            deadline = now + s->drain_timeout_s;
            fprintf(stderr, "cparallel: draining: %d request(s) in flight, up to %d s\n",
                    count_active(s), s->drain_timeout_s);
            emit(s, CP_SERVER_DRAINING, count_active(s), "a stop was requested: draining");
        }
        if (phase == DRAIN) {
            if (count_active(s) == 0) {
                phase = FLUSH;
                deadline = now + FLUSH_S;
            } else if (now >= deadline || stops > 1) {
                fprintf(stderr, "cparallel: drain %s: cancelling %d request(s)\n",
                        stops > 1 ? "cut short" : "timed out", count_active(s));
                cancel_all(s);
                phase = CANCEL;
                deadline = now + FLUSH_S;
            }
        }
        if ((phase == CANCEL || phase == FAULT) && (count_active(s) == 0 || now >= deadline)) {
            phase = FLUSH;
            deadline = now + FLUSH_S;
        }
        if (phase == FLUSH) {
            /* let the answers of finished requests reach their clients */
            pthread_mutex_lock(&s->mu);
            int n = s->n_reqs;
            pthread_mutex_unlock(&s->mu);
            if (n == 0 || now >= deadline) break;
        }
    }
    atomic_store(&s->stopping, true);
    pthread_mutex_lock(&s->health_mu);
    pthread_cond_broadcast(&s->health_cv);
    pthread_mutex_unlock(&s->health_mu);
    if (s->daemon) {
        MHD_stop_daemon(s->daemon);
        s->daemon = NULL;
    }
    if (result == CP_OK) {
        fprintf(stderr, "cparallel: stopped\n");
        return CP_OK;
    }
    /* the caller reports it */
    return CP_ERROR(result, "%s", s->fault);
}

void cp_server_free(cp_server_t s) {
    if (!s) return;
    atomic_store(&s->stopping, true);
    atomic_store(&s->draining, true);
    if (s->daemon) MHD_stop_daemon(s->daemon);
    s->daemon = NULL;
    /* remaining requests get their final (cancelled) events here */
    cp_sched_free(s->sched);
    if (s->listen_fd >= 0) close(s->listen_fd);
    metrics_free(s->metrics);
    free(s->host);
    free(s->api_key);
    free(s->model_name);
    free(s->region);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->health_mu);
    pthread_cond_destroy(&s->health_cv);
    free(s);
}
