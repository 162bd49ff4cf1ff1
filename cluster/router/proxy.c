/* proxy.c - forwarding of /v1 requests. Plain requests go to the preferred
 * healthy upstream and are retried on another one on connection errors,
 * dropped connections, 5xx and 429. Streams are relayed event by event
 * from a curl multi handle driven by the response's content reader (in the
 * connection's own thread); the upstream is asked for usage on every chunk,
 * so when a stream breaks before its finish_reason the router knows the
 * text and token count so far and continues it on another upstream as a
 * text continuation, the client seeing one uninterrupted stream. */
#include "router_impl.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define SLICE_MS 200             /* how often a waiting transfer looks at its client */
#define KEEPALIVE_S 15.0         /* an SSE comment to the client after this long quiet */
#define CONNECT_TIMEOUT_MS 5000L /* of one connection to an upstream */
#define MAX_PLAIN_BODY (64u << 20)
#define MAX_EVENT (8u << 20)
#define MAX_ERROR_BODY (1u << 20)

/* ---- choosing an upstream ------------------------------------------------------- */

/* An upstream for attempt number `made` (0-based) of q: untried ones first,
 * then (after a short backoff) one already tried, waiting up to
 * retry_wait_s for a healthy one. -1 when none, the client left or the
 * router stops. */
static int choose(rt_req *q, const bool *tried, int made) {
    cp_router_t r = q->r;
    double deadline = cp_time_now() + r->o.retry_wait_s;
    bool backed_off = made == 0;
    for (;;) {
        bool failover = false;
        int i = rt_pool_choose(&r->pool, tried, false, &failover);
        if (i < 0 && backed_off) i = rt_pool_choose(&r->pool, tried, true, &failover);
        if (i >= 0) {
            if (failover) atomic_fetch_add(&r->failovers, 1);
            q->attempts++;
            rt_note_upstream(q, r->pool.u[i].cfg.name);
            return i;
        }
        if (atomic_load(&r->stopping) || rt_client_gone(q->fd)) return -1;
        if (!backed_off) {
            /* every healthy upstream was tried: give it a moment before again */
            int ms = 100 * made;
            rt_pool_wait(&r->pool, ms > 1000 ? 1000 : ms);
            backed_off = true;
            continue;
        }
        if (cp_time_now() >= deadline) return -1;
        rt_pool_wait(&r->pool, 100);
    }
}

static struct curl_slist *make_headers(const rt_upstream *u, const rt_req *q, bool json,
                                       bool sse) {
    struct curl_slist *h = NULL, *t;
    char id[64];
    snprintf(id, sizeof(id), "X-Request-Id: %s", q->id);
    const char *lines[] = {json ? "Content-Type: application/json" : NULL,
                           sse ? "Accept: text/event-stream" : "Accept: application/json",
                           "Expect:", id, u->auth[0] ? u->auth : NULL};
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        if (!lines[i]) continue;
        t = curl_slist_append(h, lines[i]);
        if (!t) {
            curl_slist_free_all(h);
            return NULL;
        }
        h = t;
    }
    return h;
}

/* Copies a header's value when the line is "Name: value". */
static void header_value(const char *line, size_t n, const char *name, char *out, size_t cap) {
    size_t k = strlen(name);
    if (n <= k + 1 || strncasecmp(line, name, k) != 0 || line[k] != ':') return;
    const char *v = line + k + 1;
    size_t vn = n - k - 1;
    while (vn && (*v == ' ' || *v == '\t')) {
        v++;
        vn--;
    }
    while (vn && (v[vn - 1] == '\r' || v[vn - 1] == '\n' || v[vn - 1] == ' '))
        vn--;
    if (vn >= cap) vn = cap - 1;
    memcpy(out, v, vn);
    out[vn] = '\0';
}

static rt_outcome outcome_of_status(long status) {
    if (status == 429) return RT_OUT_RATE_LIMITED;
    if (status >= 500) return RT_OUT_SERVER_ERROR;
    if (status >= 400) return RT_OUT_CLIENT_ERROR;
    return RT_OUT_SUCCESS;
}

static enum MHD_Result unavailable(rt_req *q, struct MHD_Connection *c, const char *last) {
    cp_router_t r = q->r;
    if (atomic_load(&r->stopping))
        return rt_fail(q, c, 503, "service_unavailable", "draining", NULL,
                       "the router is shutting down; retry");
    if (q->attempts == 0)
        return rt_fail(q, c, 503, "service_unavailable", "no_healthy_upstream", NULL,
                       "no upstream became healthy within %.0f s; retry later",
                       r->o.retry_wait_s);
    return rt_fail(q, c, 503, "service_unavailable", "upstream_unavailable", NULL,
                   "no upstream could answer after %d attempt(s) (last: %s); retry later",
                   q->attempts, last[0] ? last : "unknown");
}

/* ---- plain requests ------------------------------------------------------------ */

typedef struct plain_xfer {
    rt_req *q;
    rt_buf body;
    bool too_big;
    char ctype[128];
    int up;
    unsigned epoch;
    double next_check;
    enum { ABORT_NONE, ABORT_CLIENT, ABORT_STOP, ABORT_CIRCUIT } abort;
} plain_xfer;

static size_t plain_write(char *ptr, size_t size, size_t n, void *user) {
    plain_xfer *x = user;
    size_t sz = size * n;
    if (x->body.len + sz > MAX_PLAIN_BODY) {
        x->too_big = true;
        return 0;
    }
    rt_buf_add(&x->body, ptr, sz);
    return x->body.oom ? 0 : sz;
}

static size_t plain_header(char *buf, size_t size, size_t n, void *user) {
    plain_xfer *x = user;
    size_t sz = size * n;
    if (sz > 5 && !strncmp(buf, "HTTP/", 5)) x->ctype[0] = '\0'; /* a new response */
    header_value(buf, sz, "Content-Type", x->ctype, sizeof(x->ctype));
    return sz;
}

static int plain_progress(void *user, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)dt;
    (void)dn;
    (void)ut;
    (void)un;
    plain_xfer *x = user;
    cp_router_t r = x->q->r;
    if (atomic_load(&r->stopping)) x->abort = ABORT_STOP;
    if (rt_pool_epoch(&r->pool, x->up) != x->epoch) x->abort = ABORT_CIRCUIT;
    double now = cp_time_now();
    if (now >= x->next_check) {
        x->next_check = now + SLICE_MS / 1000.0;
        if (rt_client_gone(x->q->fd)) x->abort = ABORT_CLIENT;
    }
    return x->abort != ABORT_NONE;
}

static enum MHD_Result proxy_plain(rt_req *q, struct MHD_Connection *c) {
    cp_router_t r = q->r;
    bool tried[CP_ROUTER_MAX_UPSTREAMS] = {0};
    char last[200] = "";
    bool post = !strcmp(q->method, "POST");
    for (int a = 0; a < r->o.max_attempts; a++) {
        int i = choose(q, tried, a);
        if (i < 0) break;
        tried[i] = true;
        if (a > 0) atomic_fetch_add(&r->retries, 1);
        rt_upstream *u = &r->pool.u[i];
        plain_xfer x = {.q = q, .up = i, .epoch = rt_pool_epoch(&r->pool, i)};
        char url[700];
        snprintf(url, sizeof(url), "%s%s", u->cfg.url, q->path);
        CURL *e = curl_easy_init();
        struct curl_slist *h = make_headers(u, q, post, false);
        if (!e || !h) {
            curl_easy_cleanup(e);
            curl_slist_free_all(h);
            rt_pool_done(&r->pool, i, RT_OUT_CANCELLED, NULL);
            return rt_fail(q, c, 500, "server_error", NULL, NULL, "out of memory");
        }
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
        if (post) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)q->body.len);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, q->body.p ? q->body.p : "");
        } else if (!strcmp(q->method, "HEAD")) {
            curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        }
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
        curl_easy_setopt(e, CURLOPT_TIMEOUT, (long)r->o.upstream_timeout_s);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, plain_write);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, &x);
        curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, plain_header);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, &x);
        curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, plain_progress);
        curl_easy_setopt(e, CURLOPT_XFERINFODATA, &x);
        curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
        CURLcode res = curl_easy_perform(e);
        long status = 0;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_cleanup(e);
        curl_slist_free_all(h);
        if (res == CURLE_OK && status != 429 && status < 500) {
            rt_pool_done(&r->pool, i, outcome_of_status(status), NULL);
            char *body = x.body.p ? x.body.p : strdup("");
            x.body.p = NULL;
            if (status >= 400) q->err_code = "upstream_client_error";
            return rt_queue(q, c, (int)status, body, x.ctype[0] ? x.ctype : NULL, NULL);
        }
        rt_buf_free(&x.body);
        rt_outcome o;
        if (res == CURLE_OK) {
            o = outcome_of_status(status);
            snprintf(last, sizeof(last), "%s: HTTP %ld", u->cfg.name, status);
        } else if (res == CURLE_ABORTED_BY_CALLBACK && x.abort != ABORT_CIRCUIT) {
            rt_pool_done(&r->pool, i, RT_OUT_CANCELLED, NULL);
            if (x.abort == ABORT_CLIENT) return MHD_NO; /* nobody to answer */
            return unavailable(q, c, "");
        } else if (res == CURLE_ABORTED_BY_CALLBACK) {
            o = RT_OUT_BROKEN;
            snprintf(last, sizeof(last), "%s: its circuit opened", u->cfg.name);
        } else {
            o = res == CURLE_COULDNT_CONNECT || res == CURLE_COULDNT_RESOLVE_HOST
                    ? RT_OUT_CONNECT_ERROR
                    : RT_OUT_BROKEN;
            if (x.too_big) o = RT_OUT_SERVER_ERROR;
            snprintf(last, sizeof(last), "%s: %s", u->cfg.name,
                     x.too_big ? "the response is too large" : rt_curl_reason(res));
        }
        rt_pool_done(&r->pool, i, o, strchr(last, ':') + 2);
    }
    return unavailable(q, c, last);
}

/* ---- streams ------------------------------------------------------------------- */

struct rt_stream {
    rt_req *q;
    cp_router_t r;
    json_t *orig; /* the client's body */
    bool chat;
    bool include_usage, continuous; /* what the client asked for */
    bool resumable;
    const char *why_not;
    const char *max_key; /* the max-tokens field to lower on resume; NULL: leave unset */
    long long orig_max;

    CURLM *multi;
    CURL *easy;
    struct curl_slist *hdrs;
    int up; /* -1 between attempts */
    unsigned epoch;
    bool tried[CP_ROUTER_MAX_UPSTREAMS];

    /* the current attempt */
    long status;
    bool hdr_done, xfer_done;
    CURLcode result;
    char ctype[128];
    rt_buf raw; /* the body of a non-200 answer */
    rt_buf line, data;
    bool a_broken, a_done;
    char a_err[160];
    long long a_tokens; /* completion tokens of this attempt (its usage) */
    int a_chunks;       /* content chunks, when the upstream sends no usage */
    bool a_usage;

    /* the stream as the client sees it */
    char id[128];
    json_t *created;
    char model[256];
    char object[64];
    long long prompt_tokens;
    bool have_prompt;
    long long tokens_before; /* completion tokens of the attempts that ended */
    rt_buf text;             /* all text relayed (kept for resumption only) */
    bool role_sent, multi_choice, finished, done, queued;
    rt_buf out;
    size_t out_off;
    double last_write;
};

static void broken(rt_stream *s, const char *why) {
    if (s->a_broken) return;
    s->a_broken = true;
    snprintf(s->a_err, sizeof(s->a_err), "%s", why);
}

static void emit(rt_stream *s, json_t *o) {
    char *j = o ? json_dumps(o, JSON_COMPACT) : NULL;
    if (!j) {
        s->out.oom = true;
        return;
    }
    rt_buf_str(&s->out, "data: ");
    rt_buf_str(&s->out, j);
    rt_buf_str(&s->out, "\n\n");
    free(j);
}

static json_t *usage_json(rt_stream *s, long long completion) {
    return json_pack("{s:I,s:I,s:I}", "prompt_tokens", (json_int_t)s->prompt_tokens,
                     "completion_tokens", (json_int_t)completion, "total_tokens",
                     (json_int_t)(s->prompt_tokens + completion));
}

/* One upstream event: noted, rewritten and queued for the client. */
static void dispatch(rt_stream *s) {
    if (s->data.len == 6 && !memcmp(s->data.p, "[DONE]", 6)) {
        s->a_done = true;
        /* several choices finish one by one: the end of the stream ends them */
        if (s->multi_choice) s->finished = true;
        return;
    }
    json_t *o = json_loadb(s->data.p, s->data.len, 0, NULL);
    if (!json_is_object(o)) {
        json_decref(o);
        broken(s, "a malformed event");
        return;
    }
    json_t *err = json_object_get(o, "error");
    if (err) {
        /* the type and code only: a message could quote the request */
        const char *type = json_string_value(json_object_get(err, "type"));
        const char *code = json_string_value(json_object_get(err, "code"));
        char why[128];
        snprintf(why, sizeof(why), "an error event (%.40s%s%.40s)", type ? type : "error",
                 code ? ", " : "", code ? code : "");
        broken(s, why);
        json_decref(o);
        return;
    }
    json_t *usage = json_object_get(o, "usage");
    if (json_is_object(usage)) {
        json_t *ct = json_object_get(usage, "completion_tokens");
        json_t *pt = json_object_get(usage, "prompt_tokens");
        if (json_is_integer(ct)) {
            s->a_tokens = json_integer_value(ct);
            s->a_usage = true;
        }
        if (json_is_integer(pt) && !s->have_prompt) {
            s->prompt_tokens = json_integer_value(pt);
            s->have_prompt = true;
        }
    }
    if (!s->id[0]) {
        const char *id = json_string_value(json_object_get(o, "id"));
        const char *model = json_string_value(json_object_get(o, "model"));
        const char *object = json_string_value(json_object_get(o, "object"));
        snprintf(s->id, sizeof(s->id), "%s", id ? id : s->q->id);
        snprintf(s->model, sizeof(s->model), "%s", model ? model : "");
        snprintf(s->object, sizeof(s->object), "%s",
                 object ? object : s->chat ? "chat.completion.chunk" : "text_completion");
        json_t *cr = json_object_get(o, "created");
        if (cr) {
            json_decref(s->created);
            s->created = json_incref(cr);
        }
    }
    json_t *ch = json_object_get(o, "choices");
    if (!json_is_array(ch)) {
        json_decref(o);
        broken(s, "an event without choices");
        return;
    }
    /* the usage-only chunk and anything after the finish: ours come at the end */
    if (json_array_size(ch) == 0 || s->finished) {
        json_decref(o);
        return;
    }
    if (json_array_size(ch) > 1 && !s->multi_choice) {
        s->multi_choice = true;
        s->resumable = false;
        s->why_not = "several choices (n > 1)";
    }
    json_t *c0 = json_array_get(ch, 0);
    const char *txt = NULL;
    size_t tl = 0;
    bool skip = false;
    json_t *fr = json_object_get(c0, "finish_reason");
    bool fin = json_is_string(fr);
    if (s->chat) {
        json_t *d = json_object_get(c0, "delta");
        if (json_is_object(d)) {
            json_t *ct = json_object_get(d, "content");
            if (json_is_string(ct)) {
                txt = json_string_value(ct);
                tl = json_string_length(ct);
            }
            if (json_object_get(d, "role")) {
                if (s->role_sent) {
                    /* a resumed stream's role chunk: the client has its role */
                    json_object_del(d, "role");
                    size_t keys = json_object_size(d);
                    skip = !fin && !s->multi_choice &&
                           (keys == 0 || (keys == 1 && ct && (json_is_null(ct) || tl == 0)));
                }
                s->role_sent = true;
            }
        }
    } else {
        json_t *t = json_object_get(c0, "text");
        if (json_is_string(t)) {
            txt = json_string_value(t);
            tl = json_string_length(t);
        }
    }
    if (tl && !s->multi_choice) {
        rt_buf_add(&s->text, txt, tl);
        s->a_chunks++;
    }
    if (fin && !s->multi_choice) s->finished = true;
    if (!skip) {
        json_object_set_new(o, "id", json_string(s->id));
        json_object_set(o, "created", s->created);
        if (s->continuous)
            json_object_set_new(o, "usage", usage_json(s, s->tokens_before + s->a_tokens));
        else if (s->include_usage)
            json_object_set_new(o, "usage", json_null());
        else
            json_object_del(o, "usage");
        emit(s, o);
    }
    json_decref(o);
}

/* Splits upstream bytes into SSE lines and events. */
static void feed(rt_stream *s, const char *p, size_t n) {
    while (n && !s->a_broken && !s->a_done) {
        const char *nl = memchr(p, '\n', n);
        size_t k = nl ? (size_t)(nl - p) : n;
        rt_buf_add(&s->line, p, k);
        if (s->line.len > MAX_EVENT || s->line.oom) {
            broken(s, "an event larger than the router takes");
            return;
        }
        if (!nl) return;
        p += k + 1;
        n -= k + 1;
        const char *l = s->line.p ? s->line.p : "";
        size_t len = s->line.len;
        if (len && l[len - 1] == '\r') len--;
        if (len == 0) {
            if (s->data.len) dispatch(s);
            s->data.len = 0;
        } else if (len >= 5 && !strncmp(l, "data:", 5)) {
            const char *v = l + 5;
            size_t vn = len - 5;
            if (vn && *v == ' ') {
                v++;
                vn--;
            }
            if (s->data.len) rt_buf_add(&s->data, "\n", 1);
            rt_buf_add(&s->data, v, vn);
            if (s->data.len > MAX_EVENT || s->data.oom)
                broken(s, "an event larger than the router takes");
        }
        /* comments (keep-alives) and other fields are dropped: the router
         * sends its own keep-alives */
        s->line.len = 0;
    }
}

static size_t stream_write(char *ptr, size_t size, size_t n, void *user) {
    rt_stream *s = user;
    size_t sz = size * n;
    if (s->status != 200) {
        if (s->raw.len + sz <= MAX_ERROR_BODY) rt_buf_add(&s->raw, ptr, sz);
        return sz;
    }
    feed(s, ptr, sz);
    return sz;
}

static size_t stream_header(char *buf, size_t size, size_t n, void *user) {
    rt_stream *s = user;
    size_t sz = size * n;
    if (sz > 5 && !strncmp(buf, "HTTP/", 5)) s->ctype[0] = '\0';
    header_value(buf, sz, "Content-Type", s->ctype, sizeof(s->ctype));
    if ((sz == 2 && buf[0] == '\r') || (sz == 1 && buf[0] == '\n')) {
        long st = 0;
        curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &st);
        if (st >= 200) {
            s->status = st;
            s->hdr_done = true;
        }
    }
    return sz;
}

/* Sets obj[key] to the string str followed by the text streamed so far. */
static bool append_text(json_t *obj, const char *key, const json_t *str, const rt_stream *s) {
    size_t n1 = json_string_length(str), n2 = s->text.len;
    char *cat = malloc(n1 + n2 + 1);
    if (!cat) return false;
    memcpy(cat, json_string_value(str), n1);
    memcpy(cat + n1, s->text.p ? s->text.p : "", n2);
    json_object_set_new(obj, key, json_stringn(cat, n1 + n2));
    free(cat);
    return true;
}

/* The body of the next attempt: the client's, with usage on every chunk,
 * and after a break the text so far as a continuation. NULL when it cannot
 * be built (s->why_not says why). */
static char *attempt_body(rt_stream *s) {
    json_t *b = json_deep_copy(s->orig);
    if (!b) return NULL;
    json_object_set_new(b, "stream", json_true());
    json_object_set_new(b, "stream_options", json_pack("{s:b,s:b}", "include_usage", 1,
                                                       "continuous_usage_stats", 1));
    char *out = NULL;
    if (s->text.len || s->tokens_before) {
        json_t *t = json_stringn(s->text.p ? s->text.p : "", s->text.len);
        if (!t) {
            s->why_not = "the text so far is not valid UTF-8";
            goto done;
        }
        bool ok = true;
        if (!s->chat) {
            json_t *p = json_object_get(b, "prompt");
            if (json_is_array(p)) p = json_array_get(p, 0);
            ok = append_text(b, "prompt", p, s);
        } else {
            json_t *msgs = json_object_get(b, "messages");
            if (json_is_true(json_object_get(b, "continue_final_message"))) {
                json_t *last = json_array_get(msgs, json_array_size(msgs) - 1);
                ok = append_text(last, "content", json_object_get(last, "content"), s);
            } else {
                json_array_append_new(msgs,
                                      json_pack("{s:s,s:O}", "role", "assistant", "content", t));
                json_object_set_new(b, "continue_final_message", json_true());
                json_object_set_new(b, "add_generation_prompt", json_false());
            }
        }
        json_decref(t);
        if (!ok) goto done;
        if (s->max_key)
            json_object_set_new(b, s->max_key,
                                json_integer((json_int_t)(s->orig_max - s->tokens_before)));
    }
    out = json_dumps(b, JSON_COMPACT);
done:
    json_decref(b);
    return out;
}

static void end_attempt(rt_stream *s, rt_outcome o, const char *why) {
    if (s->up < 0) return;
    if (s->easy) {
        curl_multi_remove_handle(s->multi, s->easy);
        curl_easy_cleanup(s->easy);
        s->easy = NULL;
    }
    curl_slist_free_all(s->hdrs);
    s->hdrs = NULL;
    s->tokens_before += s->a_usage ? s->a_tokens : s->a_chunks;
    s->a_tokens = 0;
    s->a_chunks = 0;
    s->a_usage = false;
    rt_pool_done(&s->r->pool, s->up, o, why);
    s->up = -1;
}

/* Starts the next attempt on a chosen upstream. False when none could be
 * had (attempts spent, no healthy upstream in time, client gone). */
static bool start_attempt(rt_stream *s) {
    cp_router_t r = s->r;
    if (s->q->attempts >= r->o.max_attempts) return false;
    int i = choose(s->q, s->tried, s->q->attempts);
    if (i < 0) return false;
    s->tried[i] = true;
    s->up = i;
    s->epoch = rt_pool_epoch(&r->pool, i);
    s->status = 0;
    s->hdr_done = s->xfer_done = s->a_broken = s->a_done = false;
    s->result = CURLE_OK;
    s->ctype[0] = s->a_err[0] = '\0';
    s->raw.len = s->line.len = s->data.len = 0;
    rt_upstream *u = &r->pool.u[i];
    char *body = attempt_body(s);
    s->hdrs = make_headers(u, s->q, true, true);
    s->easy = curl_easy_init();
    if (!body || !s->hdrs || !s->easy) {
        free(body);
        end_attempt(s, RT_OUT_CANCELLED, NULL);
        if (!s->why_not) s->why_not = "out of memory";
        s->resumable = false;
        return false;
    }
    char url[700];
    snprintf(url, sizeof(url), "%s%s", u->cfg.url, s->q->path);
    CURL *e = s->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, s->hdrs);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body);
    free(body);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
    /* a stream silent for this long is dead (servers send keep-alives) */
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (long)r->o.upstream_timeout_s);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, stream_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, stream_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, s);
    if (curl_multi_add_handle(s->multi, e) != CURLM_OK) {
        end_attempt(s, RT_OUT_CANCELLED, NULL);
        return false;
    }
    return true;
}

/* Moves the current transfer on for up to ms. */
static void pump(rt_stream *s, int ms) {
    int running = 0;
    curl_multi_perform(s->multi, &running);
    bool idle = true;
    for (int round = 0; round < 2; round++) {
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(s->multi, &left)))
            if (m->msg == CURLMSG_DONE && m->easy_handle == s->easy) {
                s->xfer_done = true;
                s->result = m->data.result;
            }
        if (round == 1 || s->xfer_done || s->a_broken || s->a_done || s->out.len > s->out_off)
            break;
        if (idle) curl_multi_poll(s->multi, NULL, 0, ms, NULL);
        curl_multi_perform(s->multi, &running);
        idle = false;
    }
}

static bool attempt_over(rt_stream *s) {
    if (s->up >= 0 && rt_pool_epoch(&s->r->pool, s->up) != s->epoch)
        broken(s, "its circuit opened");
    return s->a_broken || s->a_done || s->xfer_done;
}

/* Why the current attempt ended, as an outcome for the breaker. */
static rt_outcome classify(rt_stream *s, char *why, size_t n) {
    if (s->finished) {
        snprintf(why, n, "finished");
        return RT_OUT_SUCCESS;
    }
    if (s->a_broken) {
        snprintf(why, n, "stream broke: %s", s->a_err);
        return RT_OUT_BROKEN;
    }
    if (s->xfer_done && s->result != CURLE_OK) {
        snprintf(why, n, "%s", rt_curl_reason(s->result));
        return s->result == CURLE_COULDNT_CONNECT || s->result == CURLE_COULDNT_RESOLVE_HOST
                   ? RT_OUT_CONNECT_ERROR
                   : RT_OUT_BROKEN;
    }
    if (s->hdr_done && s->status != 200) {
        snprintf(why, n, "HTTP %ld", s->status);
        return outcome_of_status(s->status);
    }
    snprintf(why, n, "stream broke: it ended before a finish_reason");
    return RT_OUT_BROKEN;
}

static void stream_fail(rt_stream *s, const char *fmt, const char *detail) {
    char msg[320];
    snprintf(msg, sizeof(msg), fmt, detail);
    char *j = rt_error_json(msg, "service_unavailable", "upstream_failed", NULL);
    rt_buf_str(&s->out, "data: ");
    rt_buf_str(&s->out, j ? j : "{\"error\":{\"message\":\"upstream failed\"}}");
    rt_buf_str(&s->out, "\n\ndata: [DONE]\n\n");
    free(j);
    s->q->err_code = "upstream_failed";
    s->done = true;
}

static void stream_finish(rt_stream *s) {
    if (s->include_usage) {
        json_t *o = json_pack("{s:s,s:s,s:O,s:s,s:[],s:o}", "id", s->id, "object", s->object,
                              "created", s->created, "model",
                              s->model, "choices", "usage", usage_json(s, s->tokens_before));
        emit(s, o);
        json_decref(o);
    }
    rt_buf_str(&s->out, "data: [DONE]\n\n");
    s->done = true;
}

/* Ends the current attempt after its transfer stopped: the stream is
 * finished, continued on another upstream, or failed for the client. */
static void after_attempt(rt_stream *s) {
    cp_router_t r = s->r;
    char why[200];
    rt_outcome o = classify(s, why, sizeof(why));
    const char *name = r->pool.u[s->up].cfg.name;
    end_attempt(s, o, why);
    if (s->finished) {
        stream_finish(s);
        return;
    }
    fprintf(stderr, RT_LOG "%s: upstream %s: %s after %lld token(s)\n", s->q->id, name, why,
            (long long)s->tokens_before);
    if (!s->resumable) {
        stream_fail(s, "the upstream failed and the stream cannot be continued: %s",
                    s->why_not ? s->why_not : "not resumable");
        return;
    }
    if (s->max_key && s->tokens_before >= s->orig_max) {
        /* every token was generated; only the end was lost */
        json_t *c0 =
            s->chat ? json_pack("{s:i,s:{},s:n,s:s}", "index", 0, "delta", "logprobs",
                                "finish_reason", "length")
                    : json_pack("{s:i,s:s,s:n,s:s}", "index", 0, "text", "", "logprobs",
                                "finish_reason", "length");
        json_t *ch = json_pack("{s:s,s:s,s:O,s:s,s:[o]}", "id", s->id, "object", s->object,
                               "created", s->created, "model",
                               s->model, "choices", c0);
        if (ch && s->include_usage) json_object_set_new(ch, "usage", json_null());
        emit(s, ch);
        json_decref(ch);
        s->finished = true;
        stream_finish(s);
        return;
    }
    bool resume = s->text.len || s->tokens_before;
    if (!start_attempt(s)) {
        stream_fail(s, "no upstream could continue the stream (%s)",
                    s->q->attempts >= r->o.max_attempts ? "attempts exhausted"
                                                        : "none healthy in time");
        return;
    }
    if (resume) {
        atomic_fetch_add(&r->resumed, 1);
        s->q->resumes++;
    } else {
        atomic_fetch_add(&r->retries, 1);
    }
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    rt_stream *s = cls;
    cp_router_t r = s->r;
    while (s->out_off >= s->out.len) {
        s->out.len = 0;
        s->out_off = 0;
        if (s->done) return MHD_CONTENT_READER_END_OF_STREAM;
        if (rt_client_gone(s->q->fd)) {
            end_attempt(s, RT_OUT_CANCELLED, NULL);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (atomic_load(&r->stopping)) {
            end_attempt(s, RT_OUT_CANCELLED, NULL);
            stream_fail(s, "%s", "the router is shutting down");
            continue;
        }
        if (s->up < 0) {
            stream_fail(s, "%s", "no upstream is serving the stream");
            continue;
        }
        if (attempt_over(s)) {
            after_attempt(s);
            continue;
        }
        pump(s, SLICE_MS);
        if (s->out.len == 0 && cp_time_now() - s->last_write > KEEPALIVE_S)
            rt_buf_str(&s->out, ": keep-alive\n\n");
        if (s->out.oom) {
            end_attempt(s, RT_OUT_CANCELLED, NULL);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
    size_t n = s->out.len - s->out_off;
    if (n > max) n = max;
    memcpy(buf, s->out.p + s->out_off, n);
    s->out_off += n;
    s->last_write = cp_time_now();
    return (ssize_t)n;
}

static void stream_free(rt_stream *s) {
    if (!s) return;
    end_attempt(s, RT_OUT_CANCELLED, NULL);
    if (s->multi) curl_multi_cleanup(s->multi);
    json_decref(s->orig);
    json_decref(s->created);
    rt_buf_free(&s->raw);
    rt_buf_free(&s->line);
    rt_buf_free(&s->data);
    rt_buf_free(&s->text);
    rt_buf_free(&s->out);
    rt_req *q = s->q;
    free(s);
    rt_req_release(q);
}

static void stream_free_cb(void *cls) {
    stream_free(cls);
}

/* Whether a broken stream of this request can be continued as text. */
static void check_resumable(rt_stream *s) {
    json_t *o = s->orig;
    s->resumable = false;
    json_t *n = json_object_get(o, "n");
    if (json_is_integer(n) && json_integer_value(n) > 1) {
        s->why_not = "several choices (n > 1)";
        return;
    }
    if (json_is_true(json_object_get(o, "echo"))) {
        s->why_not = "echo";
        return;
    }
    if (!s->chat) {
        json_t *p = json_object_get(o, "prompt");
        if (json_is_array(p) && json_array_size(p) == 1) p = json_array_get(p, 0);
        if (!json_is_string(p)) {
            s->why_not = "the prompt is not one string";
            return;
        }
    } else {
        json_t *m = json_object_get(o, "messages");
        if (!json_is_array(m) || !json_array_size(m)) {
            s->why_not = "no messages";
            return;
        }
        if (json_is_true(json_object_get(o, "continue_final_message"))) {
            json_t *last = json_array_get(m, json_array_size(m) - 1);
            if (!json_is_string(json_object_get(last, "content"))) {
                s->why_not = "the final message's content is not a string";
                return;
            }
        }
    }
    s->resumable = true;
}

static rt_stream *stream_new(rt_req *q, json_t *o) {
    rt_stream *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->q = q;
    s->r = q->r;
    s->up = -1;
    s->orig = json_incref(o);
    s->created = json_integer(0);
    s->chat = q->ep == RT_EP_CHAT;
    s->last_write = cp_time_now();
    json_t *so = json_object_get(o, "stream_options");
    s->include_usage = json_is_true(json_object_get(so, "include_usage"));
    s->continuous = json_is_true(json_object_get(so, "continuous_usage_stats"));
    check_resumable(s);
    const char *keys[] = {"max_tokens", "max_completion_tokens"};
    for (int k = 0; k < (s->chat ? 2 : 1); k++) {
        json_t *v = json_object_get(o, keys[k]);
        if (json_is_integer(v)) {
            s->max_key = keys[k];
            s->orig_max = json_integer_value(v);
            break;
        }
    }
    if (!s->max_key && !s->chat) {
        s->max_key = "max_tokens"; /* OpenAI's default for completions */
        s->orig_max = 16;
    }
    s->multi = curl_multi_init();
    if (!s->multi) {
        json_decref(s->created);
        json_decref(s->orig);
        free(s);
        return NULL;
    }
    atomic_fetch_add(&q->refs, 1);
    return s;
}

static enum MHD_Result proxy_stream(rt_req *q, struct MHD_Connection *c, json_t *o) {
    cp_router_t r = q->r;
    rt_stream *s = stream_new(q, o);
    if (!s) return rt_fail(q, c, 500, "server_error", NULL, NULL, "out of memory");
    char last[240] = "";
    /* until an upstream answers 200 the client sees nothing: plain retries */
    for (;;) {
        if (!start_attempt(s)) {
            if (q->attempts > 0 && !last[0]) snprintf(last, sizeof(last), "attempts exhausted");
            enum MHD_Result ret = rt_client_gone(q->fd) ? MHD_NO : unavailable(q, c, last);
            stream_free(s);
            return ret;
        }
        while (!s->hdr_done && !attempt_over(s)) {
            if (rt_client_gone(q->fd) || atomic_load(&r->stopping)) {
                bool gone = !atomic_load(&r->stopping);
                end_attempt(s, RT_OUT_CANCELLED, NULL);
                enum MHD_Result ret = gone ? MHD_NO : unavailable(q, c, "");
                stream_free(s);
                return ret;
            }
            pump(s, SLICE_MS);
        }
        if (q->attempts > 1) atomic_fetch_add(&r->retries, 1);
        if (s->hdr_done && s->status == 200) break;
        if (s->hdr_done && s->status < 500 && s->status != 429) {
            /* the client's own error: passed through */
            while (!s->xfer_done && !rt_client_gone(q->fd) && !atomic_load(&r->stopping))
                pump(s, SLICE_MS);
            long st = s->status;
            char ctype[128];
            snprintf(ctype, sizeof(ctype), "%s", s->ctype);
            char *body = s->raw.p ? s->raw.p : strdup("");
            s->raw.p = NULL;
            s->raw.len = s->raw.cap = 0;
            end_attempt(s, s->xfer_done && s->result == CURLE_OK ? outcome_of_status(st)
                                                                 : RT_OUT_CANCELLED,
                        NULL);
            stream_free(s);
            q->err_code = "upstream_client_error";
            return rt_queue(q, c, (int)st, body, ctype[0] ? ctype : NULL, NULL);
        }
        char why[200];
        rt_outcome oc = classify(s, why, sizeof(why));
        snprintf(last, sizeof(last), "%.63s: %.170s", r->pool.u[s->up].cfg.name, why);
        end_attempt(s, oc, why);
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, s,
                                          stream_free_cb);
    if (!resp) {
        stream_free(s);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    enum MHD_Result ret = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    q->status = 200;
    q->responded = true;
    return ret;
}

enum MHD_Result rt_proxy(rt_req *q, struct MHD_Connection *c, void *json, bool stream) {
    if (stream && json) return proxy_stream(q, c, json);
    return proxy_plain(q, c);
}
