/* router.c - the router's HTTP front: libmicrohttpd with one thread per
 * connection reads each request, checks path, method, key and body, answers
 * its own endpoints (/health, /health/ready, /metrics) and hands /v1 to the
 * proxy (proxy.c). Also the router's lifetime (bind, health thread, drain
 * on stop), its metrics and the parsing of --upstream values. */
#include "router_impl.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_BOOL_LOCK_FREE == 2,
               "cp_router_request_stop runs in signal handlers: its atomics must not lock");

#define FLUSH_S 5.0 /* after the drain, time for the last answers to reach clients */

/* ---- growable buffer --------------------------------------------------------- */

void rt_buf_add(rt_buf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void rt_buf_str(rt_buf *b, const char *s) {
    rt_buf_add(b, s, strlen(s));
}

void rt_buf_printf(rt_buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof(tmp)) {
        rt_buf_add(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    rt_buf_add(b, big, (size_t)n);
    free(big);
}

void rt_buf_free(rt_buf *b) {
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* ---- small helpers ------------------------------------------------------------ */

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* a == b in time that depends on the lengths only. */
static bool const_time_equal(const char *a, size_t na, const char *b, size_t nb) {
    unsigned char d = (unsigned char)(na != nb);
    for (size_t i = 0; i < na; i++)
        d |= (unsigned char)(a[i] ^ b[i % (nb ? nb : 1)]);
    return d == 0 && nb > 0;
}

bool rt_client_gone(int fd) {
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

void rt_note_upstream(rt_req *q, const char *name) {
    size_t len = strlen(q->ups);
    if (len + strlen(name) + 2 >= sizeof(q->ups)) return;
    snprintf(q->ups + len, sizeof(q->ups) - len, "%s%s", len ? "," : "", name);
}

char *rt_error_json(const char *message, const char *type, const char *code, const char *param) {
    json_t *e = json_pack("{s:{s:s,s:s,s:o,s:o}}", "error", "message", message, "type", type,
                          "param", param ? json_string(param) : json_null(), "code",
                          code ? json_string(code) : json_null());
    char *s = e ? json_dumps(e, JSON_COMPACT) : NULL;
    json_decref(e);
    return s;
}

enum MHD_Result rt_queue(rt_req *q, struct MHD_Connection *c, int status, char *body,
                         const char *ctype, const char *retry_after) {
    if (!body) {
        status = 500;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\","
                      "\"param\":null,\"code\":null}}");
        if (!body) return MHD_NO;
        ctype = NULL;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", ctype ? ctype : "application/json");
    if (retry_after) MHD_add_response_header(resp, "Retry-After", retry_after);
    if (status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    if (status == 405)
        MHD_add_response_header(resp, "Allow",
                                q->ep == RT_EP_COMPLETIONS || q->ep == RT_EP_CHAT ? "POST"
                                                                                  : "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    q->status = status;
    q->responded = true;
    return ret;
}

enum MHD_Result rt_fail(rt_req *q, struct MHD_Connection *c, int status, const char *type,
                        const char *code, const char *param, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    q->err_code = code ? code : type;
    const char *retry = status == 503 ? "5" : status == 429 ? "1" : NULL;
    return rt_queue(q, c, status, rt_error_json(msg, type, code, param), NULL, retry);
}

/* ---- metrics ------------------------------------------------------------------ */

static const char *EP_NAMES[RT_EP_COUNT] = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
    "/health/ready",   "/metrics",             "other",
};

static char *render_metrics(cp_router_t r) {
    rt_buf b = {0};
    rt_buf_str(&b, "# HELP cparallel_router_requests_total HTTP requests answered by the router, "
                   "by endpoint and status (499: the client left).\n"
                   "# TYPE cparallel_router_requests_total counter\n");
    pthread_mutex_lock(&r->mmu);
    for (int e = 0; e < RT_EP_COUNT; e++)
        for (int s = 0; s < RT_STATUS_SLOTS; s++)
            if (r->requests[e][s])
                rt_buf_printf(&b,
                              "cparallel_router_requests_total{endpoint=\"%s\",status=\"%d\"} "
                              "%llu\n",
                              EP_NAMES[e], s, (unsigned long long)r->requests[e][s]);
    pthread_mutex_unlock(&r->mmu);
    rt_buf_printf(&b,
                  "# HELP cparallel_router_retries_total Attempts beyond a request's first "
                  "before its answer started (plain requests, streams before their first "
                  "event).\n# TYPE cparallel_router_retries_total counter\n"
                  "cparallel_router_retries_total %llu\n"
                  "# HELP cparallel_router_failovers_total Attempts sent to a less preferred "
                  "upstream because a preferred one was down or had failed.\n"
                  "# TYPE cparallel_router_failovers_total counter\n"
                  "cparallel_router_failovers_total %llu\n"
                  "# HELP cparallel_router_resumed_streams_total Broken streams continued on "
                  "another upstream.\n# TYPE cparallel_router_resumed_streams_total counter\n"
                  "cparallel_router_resumed_streams_total %llu\n"
                  "# HELP cparallel_router_in_flight Proxied requests in progress.\n"
                  "# TYPE cparallel_router_in_flight gauge\ncparallel_router_in_flight %d\n",
                  (unsigned long long)atomic_load(&r->retries),
                  (unsigned long long)atomic_load(&r->failovers),
                  (unsigned long long)atomic_load(&r->resumed), atomic_load(&r->in_flight));
    rt_pool_render(&r->pool, &b);
    if (b.oom) {
        rt_buf_free(&b);
        return NULL;
    }
    return b.p ? b.p : strdup("");
}

/* ---- requests ------------------------------------------------------------------ */

typedef struct route {
    const char *path;
    rt_endpoint ep;
    bool post;
    bool auth;
} route;

static const route ROUTES[] = {
    {"/v1/completions", RT_EP_COMPLETIONS, true, true},
    {"/v1/chat/completions", RT_EP_CHAT, true, true},
    {"/v1/models", RT_EP_MODELS, false, true},
    {"/health", RT_EP_HEALTH, false, false},
    {"/health/ready", RT_EP_READY, false, false},
    {"/metrics", RT_EP_METRICS, false, false},
};

static const route *find_route(const char *url) {
    for (size_t i = 0; i < sizeof(ROUTES) / sizeof(ROUTES[0]); i++)
        if (!strcmp(url, ROUTES[i].path)) return &ROUTES[i];
    if (!strncmp(url, "/v1/models/", 11) && url[11]) return &ROUTES[2];
    return NULL;
}

static bool authorized(cp_router_t r, struct MHD_Connection *c) {
    if (!r->api_key) return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    const char *tok = h + 7;
    while (*tok == ' ')
        tok++;
    return const_time_equal(tok, strlen(tok), r->api_key, strlen(r->api_key));
}

static rt_req *req_new(cp_router_t r, const char *method, const char *url) {
    rt_req *q = calloc(1, sizeof(*q));
    if (!q) return NULL;
    atomic_init(&q->refs, 1);
    q->r = r;
    q->fd = -1;
    q->t0 = cp_time_now();
    snprintf(q->method, sizeof(q->method), "%s", method);
    snprintf(q->path, sizeof(q->path), "%s", url);
    uint64_t n = atomic_fetch_add(&r->next_id, 0x9e3779b97f4a7c15ull);
    snprintf(q->id, sizeof(q->id), "rt-%016llx", (unsigned long long)n);
    atomic_fetch_add(&r->n_reqs, 1);
    return q;
}

static enum MHD_Result handle(rt_req *q, struct MHD_Connection *c, const route *rt) {
    cp_router_t r = q->r;
    switch (rt->ep) {
    case RT_EP_HEALTH:
        return rt_queue(q, c, 200,
                        strdup(atomic_load(&r->draining) ? "{\"status\":\"draining\"}"
                                                         : "{\"status\":\"ok\"}"),
                        NULL, NULL);
    case RT_EP_READY: {
        if (atomic_load(&r->draining))
            return rt_fail(q, c, 503, "service_unavailable", "draining", NULL,
                           "the router is shutting down");
        int n = rt_pool_healthy(&r->pool);
        if (n > 0) {
            char buf[96];
            snprintf(buf, sizeof(buf), "{\"status\":\"ready\",\"healthy_upstreams\":%d}", n);
            return rt_queue(q, c, 200, strdup(buf), NULL, NULL);
        }
        return rt_fail(q, c, 503, "service_unavailable", "no_healthy_upstream", NULL,
                       "no upstream is healthy (all %d failing their checks)", r->pool.n);
    }
    case RT_EP_METRICS:
        return rt_queue(q, c, 200, render_metrics(r), "text/plain; version=0.0.4", NULL);
    case RT_EP_MODELS: return rt_proxy(q, c, NULL, false);
    case RT_EP_COMPLETIONS:
    case RT_EP_CHAT: {
        if (q->body.oom)
            return rt_fail(q, c, 500, "server_error", NULL, NULL, "out of memory");
        json_error_t je;
        json_t *o = json_loadb(q->body.p ? q->body.p : "", q->body.len, 0, &je);
        if (!o)
            return rt_fail(q, c, 400, "invalid_request_error", "invalid_json", NULL,
                           "the body is not valid JSON (line %d, column %d): %s", je.line,
                           je.column, je.text);
        if (!json_is_object(o)) {
            json_decref(o);
            return rt_fail(q, c, 400, "invalid_request_error", "invalid_json", NULL,
                           "the body must be a JSON object");
        }
        json_t *s = json_object_get(o, "stream");
        if (s && !json_is_null(s) && !json_is_boolean(s)) {
            json_decref(o);
            return rt_fail(q, c, 400, "invalid_request_error", "invalid_type", "stream",
                           "'stream' must be a boolean");
        }
        enum MHD_Result ret = rt_proxy(q, c, o, s && json_is_true(s));
        json_decref(o);
        return ret;
    }
    default: break;
    }
    return rt_fail(q, c, 404, "not_found_error", "not_found", NULL, "unknown path");
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls) {
    (void)version;
    cp_router_t r = cls;
    rt_req *q = *con_cls;
    const route *rt = find_route(url);
    if (!q) {
        q = req_new(r, method, url);
        if (!q) return MHD_NO;
        *con_cls = q;
        q->ep = rt ? rt->ep : RT_EP_OTHER;
        if (!rt)
            return rt_fail(q, c, 404, "not_found_error", "not_found", NULL,
                           "unknown path (the router has /v1/completions, /v1/chat/completions, "
                           "/v1/models, /health, /health/ready and /metrics)");
        bool is_post = !strcmp(method, "POST");
        bool is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        if (rt->post ? !is_post : !is_get)
            return rt_fail(q, c, 405, "invalid_request_error", "method_not_allowed", NULL,
                           "%s takes %s, not %.16s", rt->path, rt->post ? "POST" : "GET", method);
        if (rt->auth && !authorized(r, c))
            return rt_fail(q, c, 401, "authentication_error", "invalid_api_key", NULL,
                           "missing or wrong API key (send 'Authorization: Bearer KEY')");
        if (rt->auth && atomic_load(&r->draining))
            return rt_fail(q, c, 503, "service_unavailable", "draining", NULL,
                           "the router is shutting down; retry on another router");
        if (is_post) {
            const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
            unsigned long long n = cl ? strtoull(cl, NULL, 10) : 0;
            if (n > (unsigned long long)r->o.max_body) {
                /* a client waiting for "100 Continue" or sending a huge body is
                 * answered now; others see the 413 after their body is read */
                const char *expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Expect");
                if ((expect && !strcasecmp(expect, "100-continue")) ||
                    n > 16ull * (unsigned long long)r->o.max_body)
                    return rt_fail(q, c, 413, "invalid_request_error", "body_too_large", NULL,
                                   "the request body has %llu bytes; the router takes at most %zu",
                                   n, r->o.max_body);
                q->too_large = true;
            }
        }
        if (rt->auth) {
            atomic_fetch_add(&r->in_flight, 1);
            q->counted = true;
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!q->responded && !q->too_large) {
            if (q->body.len + *upload_size > r->o.max_body) {
                q->too_large = true;
                rt_buf_free(&q->body);
            } else {
                rt_buf_add(&q->body, upload, *upload_size);
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (q->responded) return MHD_YES;
    if (q->too_large)
        return rt_fail(q, c, 413, "invalid_request_error", "body_too_large", NULL,
                       "the request body is larger than %zu bytes", r->o.max_body);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    q->fd = ci ? ci->connect_fd : -1;
    return handle(q, c, rt);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)c;
    cp_router_t r = cls;
    rt_req *q = *con_cls;
    if (!q) return;
    *con_cls = NULL;
    bool aborted = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK;
    double dur = cp_time_now() - q->t0;
    /* 499: the client left before its answer was complete (nginx's code) */
    int status = !q->responded || (aborted && q->status == 200) ? 499 : q->status;
    pthread_mutex_lock(&r->mmu);
    r->requests[q->ep][status >= 0 && status < RT_STATUS_SLOTS ? status : 0]++;
    pthread_mutex_unlock(&r->mmu);
    bool own = q->ep == RT_EP_HEALTH || q->ep == RT_EP_READY || q->ep == RT_EP_METRICS;
    /* probes and scrapes that succeed would drown the log; never a prompt or
     * an output in it */
    if (!own || status >= 400)
        fprintf(stderr,
                RT_LOG "%s %s %s %d upstreams=%s attempts=%d resumed=%d duration=%.3fs%s%s%s\n",
                q->id, q->method, q->path, status, q->ups[0] ? q->ups : "-", q->attempts,
                q->resumes, dur, q->err_code ? " error=" : "", q->err_code ? q->err_code : "",
                aborted ? " client_closed" : "");
    if (q->counted) atomic_fetch_sub(&r->in_flight, 1);
    rt_req_release(q);
}

void rt_req_release(rt_req *q) {
    if (atomic_fetch_sub(&q->refs, 1) != 1) return;
    cp_router_t r = q->r;
    rt_buf_free(&q->body);
    free(q);
    atomic_fetch_sub(&r->n_reqs, 1);
}

/* ---- --upstream values ----------------------------------------------------------- */

static bool good_name(const char *s) {
    if (!*s) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-' || *s == '.'))
            return false;
    return true;
}

cp_status cp_router_parse_upstream(const char *spec, int index, const char *default_key,
                                   cp_router_upstream *out) {
    memset(out, 0, sizeof(*out));
    snprintf(out->name, sizeof(out->name), "u%d", index);
    if (default_key) snprintf(out->api_key, sizeof(out->api_key), "%s", default_key);
    if (!spec || !*spec)
        return CP_ERROR(CP_ERR_INVALID_ARG, "an --upstream value is empty (expected "
                                            "name=NAME,url=http://HOST:PORT,priority=N)");
    bool have_url = false;
    const char *p = spec;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        if (!eq)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "--upstream '%s': '%.*s' is not KEY=VALUE (keys: name, url, "
                            "priority, key)",
                            spec, (int)n, p);
        size_t kn = (size_t)(eq - p), vn = n - kn - 1;
        const char *v = eq + 1;
        char val[512];
        if (vn >= sizeof(val))
            return CP_ERROR(CP_ERR_INVALID_ARG, "--upstream '%s': the value of '%.*s' is too long",
                            spec, (int)kn, p);
        memcpy(val, v, vn);
        val[vn] = '\0';
        if (kn == 4 && !strncmp(p, "name", 4)) {
            if (!good_name(val) || vn >= sizeof(out->name))
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "--upstream '%s': name '%s' must be 1-63 characters of "
                                "A-Z a-z 0-9 _ - .",
                                spec, val);
            memcpy(out->name, val, vn + 1);
        } else if (kn == 3 && !strncmp(p, "url", 3)) {
            if (strncmp(val, "http://", 7) != 0 && strncmp(val, "https://", 8) != 0)
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "--upstream '%s': url '%s' must start with http:// or https://",
                                spec, val);
            while (vn > 8 && val[vn - 1] == '/')
                val[--vn] = '\0';
            memcpy(out->url, val, vn + 1);
            have_url = true;
        } else if (kn == 8 && !strncmp(p, "priority", 8)) {
            char *e;
            errno = 0;
            long pr = strtol(val, &e, 10);
            if (!*val || *e || errno || pr < -1000000 || pr > 1000000)
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "--upstream '%s': priority '%s' must be an integer", spec, val);
            out->priority = (int)pr;
        } else if (kn == 3 && !strncmp(p, "key", 3)) {
            if (vn >= sizeof(out->api_key) || strpbrk(val, "\r\n"))
                return CP_ERROR(CP_ERR_INVALID_ARG, "--upstream: the key of '%s' is not usable",
                                out->name);
            memcpy(out->api_key, val, vn + 1);
        } else {
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "--upstream '%s': unknown key '%.*s' (keys: name, url, priority, key)",
                            spec, (int)kn, p);
        }
        if (!end) break;
        p = end + 1;
    }
    if (!have_url)
        return CP_ERROR(CP_ERR_INVALID_ARG, "--upstream '%s' has no url=http://HOST:PORT", spec);
    return CP_OK;
}

/* ---- lifetime ------------------------------------------------------------------- */

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

static cp_status check_opts(const cp_router_opts *o) {
    if (o->n_upstreams < 1 || o->n_upstreams > CP_ROUTER_MAX_UPSTREAMS || !o->upstreams)
        return CP_ERROR(CP_ERR_INVALID_ARG, "the router needs 1 to %d upstreams (got %d)",
                        CP_ROUTER_MAX_UPSTREAMS, o->n_upstreams);
    if (o->port < 0 || o->port > 65535)
        return CP_ERROR(CP_ERR_INVALID_ARG, "port %d is outside 0-65535", o->port);
    for (int i = 0; i < o->n_upstreams; i++) {
        if (strncmp(o->upstreams[i].url, "http", 4) != 0)
            return CP_ERROR(CP_ERR_INVALID_ARG, "upstream %s has no http(s) url",
                            o->upstreams[i].name);
        for (int j = 0; j < i; j++)
            if (!strcmp(o->upstreams[i].name, o->upstreams[j].name))
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "two upstreams are named '%s' (names must be unique)",
                                o->upstreams[i].name);
    }
    return CP_OK;
}

cp_status cp_router_init(const cp_router_opts *o, cp_router_t *out) {
    *out = NULL;
    if (!o) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_router_init: NULL options");
    CP_CHECK(check_opts(o));
    cp_router_t r = calloc(1, sizeof(*r));
    if (!r) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st = CP_OK;
    r->listen_fd = -1;
    r->o = *o;
    r->o.upstreams = NULL;
    if (!r->o.max_body) r->o.max_body = (size_t)1 << 20;
    if (r->o.health_interval_ms <= 0) r->o.health_interval_ms = 1000;
    if (r->o.health_timeout_ms <= 0) r->o.health_timeout_ms = 2000;
    if (r->o.fail_threshold <= 0) r->o.fail_threshold = 3;
    if (r->o.open_seconds <= 0) r->o.open_seconds = 5;
    if (r->o.max_attempts <= 0) r->o.max_attempts = 3;
    if (r->o.retry_wait_s < 0) r->o.retry_wait_s = 10;
    if (r->o.drain_timeout_s < 0) r->o.drain_timeout_s = 30;
    if (r->o.upstream_timeout_s <= 0) r->o.upstream_timeout_s = 600;
    pthread_mutex_init(&r->mmu, NULL);
    atomic_init(&r->stop_requests, 0);
    atomic_init(&r->draining, false);
    atomic_init(&r->stopping, false);
    atomic_init(&r->n_reqs, 0);
    atomic_init(&r->in_flight, 0);
    atomic_init(&r->retries, 0);
    atomic_init(&r->failovers, 0);
    atomic_init(&r->resumed, 0);
    uint64_t seed = (uint64_t)(cp_time_now() * 1e9) ^ ((uint64_t)getpid() << 32);
    FILE *ur = fopen("/dev/urandom", "rb");
    if (ur) {
        if (fread(&seed, sizeof(seed), 1, ur) != 1) seed ^= (uint64_t)time(NULL);
        fclose(ur);
    }
    atomic_init(&r->next_id, seed);
    r->host = strdup(o->host && *o->host ? o->host : "127.0.0.1");
    r->api_key = o->api_key && *o->api_key ? strdup(o->api_key) : NULL;
    if (!r->host || (o->api_key && *o->api_key && !r->api_key)) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    r->o.host = r->host;
    r->o.api_key = r->api_key;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        st = CP_ERROR(CP_ERR_INTERNAL, "cannot initialise libcurl");
        goto fail;
    }
    r->curl_ready = true;
    CP_CHECK_GOTO(rt_pool_init(&r->pool, o), st, fail);
    r->pool.fail_threshold = r->o.fail_threshold;
    r->pool.open_s = r->o.open_seconds;
    r->pool.interval_ms = r->o.health_interval_ms;
    r->pool.timeout_ms = r->o.health_timeout_ms;
    int family = AF_INET;
    CP_CHECK_GOTO(bind_listen(r->host, o->port, &r->listen_fd, &r->port, &family), st, fail);
    CP_CHECK_GOTO(rt_pool_start(&r->pool), st, fail);
    unsigned flags =
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC;
    if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES) flags |= MHD_USE_POLL;
    if (family == AF_INET6) flags |= MHD_USE_IPv6;
    r->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_access, r, MHD_OPTION_LISTEN_SOCKET,
                                 r->listen_fd, MHD_OPTION_NOTIFY_COMPLETED, on_completed, r,
                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned)2048,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300, MHD_OPTION_END);
    if (!r->daemon) {
        st = CP_ERROR(CP_ERR_IO, "cannot start the HTTP daemon on %s:%d", r->host, r->port);
        goto fail;
    }
    r->listen_fd = -1; /* the daemon owns it now */
    *out = r;
    return CP_OK;
fail:
    cp_router_free(r);
    return st;
}

int cp_router_port(cp_router_t r) {
    return r ? r->port : 0;
}

const char *cp_router_host(cp_router_t r) {
    return r ? r->host : "";
}

void cp_router_request_stop(cp_router_t r) {
    if (!r) return;
    atomic_store(&r->draining, true);
    atomic_fetch_add(&r->stop_requests, 1);
}

cp_status cp_router_run(cp_router_t r) {
    while (atomic_load(&r->stop_requests) == 0)
        sleep_ms(50);
    atomic_store(&r->draining, true);
    /* no new connections; open keep-alive ones get 503 on /v1 */
    MHD_socket lfd = MHD_quiesce_daemon(r->daemon);
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
    fprintf(stderr, RT_LOG "draining: %d request(s) in flight, up to %d s\n",
            atomic_load(&r->in_flight), r->o.drain_timeout_s);
    double deadline = cp_time_now() + r->o.drain_timeout_s;
    while (atomic_load(&r->n_reqs) > 0 && cp_time_now() < deadline &&
           atomic_load(&r->stop_requests) < 2)
        sleep_ms(20);
    if (atomic_load(&r->n_reqs) > 0) {
        fprintf(stderr, RT_LOG "drain %s: cutting %d request(s)\n",
                atomic_load(&r->stop_requests) > 1 ? "cut short" : "timed out",
                atomic_load(&r->n_reqs));
        atomic_store(&r->stopping, true);
        deadline = cp_time_now() + FLUSH_S;
        while (atomic_load(&r->n_reqs) > 0 && cp_time_now() < deadline)
            sleep_ms(20);
    }
    atomic_store(&r->stopping, true);
    MHD_stop_daemon(r->daemon);
    r->daemon = NULL;
    fprintf(stderr, RT_LOG "stopped\n");
    return CP_OK;
}

void cp_router_free(cp_router_t r) {
    if (!r) return;
    atomic_store(&r->draining, true);
    atomic_store(&r->stopping, true);
    if (r->daemon) MHD_stop_daemon(r->daemon);
    r->daemon = NULL;
    if (r->listen_fd >= 0) close(r->listen_fd);
    rt_pool_free(&r->pool);
    if (r->curl_ready) curl_global_cleanup();
    pthread_mutex_destroy(&r->mmu);
    free(r->host);
    free(r->api_key);
    free(r);
}
