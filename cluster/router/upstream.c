/* upstream.c - the router's upstream pool: a background thread probes
 * URL/health/ready of every upstream each interval (all at once, through a
 * curl multi handle); a circuit breaker per upstream opens after
 * consecutive failures of probes or requests, rests, turns half-open and
 * closes on the next good probe; and the choice of an upstream per attempt. */
#include "router_impl.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void deadline_in(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

cp_status rt_pool_init(rt_pool *p, const cp_router_opts *o) {
    memset(p, 0, sizeof(*p));
    p->u = calloc((size_t)o->n_upstreams, sizeof(rt_upstream));
    if (!p->u) return CP_ERROR(CP_ERR_OOM, "out of memory");
    p->n = o->n_upstreams;
    p->fail_threshold = o->fail_threshold;
    p->open_s = o->open_seconds;
    p->interval_ms = o->health_interval_ms;
    p->timeout_ms = o->health_timeout_ms;
    p->min_priority = o->upstreams[0].priority;
    for (int i = 0; i < p->n; i++) {
        rt_upstream *u = &p->u[i];
        u->cfg = o->upstreams[i];
        if (u->cfg.api_key[0])
            snprintf(u->auth, sizeof(u->auth), "Authorization: Bearer %s", u->cfg.api_key);
        /* no traffic before a first good probe */
        u->state = RT_HALF_OPEN;
        atomic_init(&u->epoch, 0);
        if (u->cfg.priority < p->min_priority) p->min_priority = u->cfg.priority;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    return CP_OK;
}

/* Under p->mu. */
static void open_circuit(rt_pool *p, rt_upstream *u, double now) {
    bool was_closed = u->state == RT_CLOSED;
    u->state = RT_OPEN;
    u->open_until = now + p->open_s;
    atomic_fetch_add(&u->epoch, 1);
    if (was_closed || !u->announced)
        fprintf(stderr, RT_LOG "upstream %s: unhealthy (%s)\n", u->cfg.name,
                u->last_error[0] ? u->last_error : "failing");
    u->announced = true;
    pthread_cond_broadcast(&p->cv);
}

/* Under p->mu: an open circuit whose rest is over takes probes again. */
static void tick(rt_pool *p, rt_upstream *u, double now) {
    (void)p;
    if (u->state == RT_OPEN && now >= u->open_until) u->state = RT_HALF_OPEN;
}

static void failure(rt_pool *p, rt_upstream *u, const char *why, double now) {
    snprintf(u->last_error, sizeof(u->last_error), "%s", why ? why : "failed");
    u->fails++;
    tick(p, u, now);
    if (u->state == RT_HALF_OPEN || (u->state == RT_CLOSED && u->fails >= p->fail_threshold))
        open_circuit(p, u, now);
}

static void probe_result(rt_pool *p, int i, bool ok, const char *why) {
    double now = cp_time_now();
    pthread_mutex_lock(&p->mu);
    rt_upstream *u = &p->u[i];
    tick(p, u, now);
    if (ok) {
        u->fails = 0;
        if (u->state == RT_HALF_OPEN) {
            u->state = RT_CLOSED;
            fprintf(stderr, RT_LOG "upstream %s: healthy\n", u->cfg.name);
            u->announced = true;
            pthread_cond_broadcast(&p->cv);
        }
    } else {
        failure(p, u, why, now);
    }
    pthread_mutex_unlock(&p->mu);
}

static size_t discard(char *ptr, size_t size, size_t n, void *user) {
    (void)ptr;
    (void)user;
    return size * n;
}

const char *rt_curl_reason(int code) {
    switch ((CURLcode)code) {
    case CURLE_COULDNT_CONNECT: return "connection refused";
    case CURLE_COULDNT_RESOLVE_HOST: return "cannot resolve host";
    case CURLE_OPERATION_TIMEDOUT: return "timed out";
    case CURLE_GOT_NOTHING: return "empty reply";
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE: return "connection dropped";
    default: return curl_easy_strerror((CURLcode)code);
    }
}

/* One round: every upstream probed at once, each bounded by timeout_ms. */
static void probe_round(rt_pool *p) {
    CURLM *m = curl_multi_init();
    if (!m) return;
    CURL **h = calloc((size_t)p->n, sizeof(CURL *));
    if (!h) {
        curl_multi_cleanup(m);
        return;
    }
    for (int i = 0; i < p->n; i++) {
        char url[600];
        snprintf(url, sizeof(url), "%s/health/ready", p->u[i].cfg.url);
        CURL *e = curl_easy_init();
        if (!e) continue;
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)p->timeout_ms);
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)p->timeout_ms);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
        curl_easy_setopt(e, CURLOPT_PRIVATE, (void *)(intptr_t)i);
        if (curl_multi_add_handle(m, e) != CURLM_OK) {
            curl_easy_cleanup(e);
            continue;
        }
        h[i] = e;
    }
    int running = 1;
    while (running) {
        if (curl_multi_perform(m, &running) != CURLM_OK) break;
        if (running && curl_multi_poll(m, NULL, 0, 100, NULL) != CURLM_OK) break;
        pthread_mutex_lock(&p->mu);
        bool stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (stop) break;
    }
    CURLMsg *msg;
    int left;
    bool *done = calloc((size_t)p->n, sizeof(bool));
    while ((msg = curl_multi_info_read(m, &left))) {
        if (msg->msg != CURLMSG_DONE) continue;
        intptr_t i = 0;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&i);
        if (i < 0 || i >= p->n) continue;
        if (done) done[i] = true;
        long status = 0;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
        char why[96];
        if (msg->data.result != CURLE_OK)
            snprintf(why, sizeof(why), "%s", rt_curl_reason(msg->data.result));
        else
            snprintf(why, sizeof(why), "/health/ready answered HTTP %ld", status);
        probe_result(p, (int)i, msg->data.result == CURLE_OK && status == 200, why);
    }
    free(done);
    for (int i = 0; i < p->n; i++)
        if (h[i]) {
            curl_multi_remove_handle(m, h[i]);
            curl_easy_cleanup(h[i]);
        }
    free(h);
    curl_multi_cleanup(m);
}

static void *health_main(void *arg) {
    rt_pool *p = arg;
    for (;;) {
        double t0 = cp_time_now();
        probe_round(p);
        pthread_mutex_lock(&p->mu);
        int wait_ms = p->interval_ms - (int)((cp_time_now() - t0) * 1000);
        if (wait_ms < 10) wait_ms = 10;
        struct timespec ts;
        deadline_in(&ts, wait_ms);
        while (!p->stop)
            if (pthread_cond_timedwait(&p->cv, &p->mu, &ts) == ETIMEDOUT) break;
        bool stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (stop) break;
    }
    return NULL;
}

cp_status rt_pool_start(rt_pool *p) {
    if (pthread_create(&p->thread, NULL, health_main, p) != 0)
        return CP_ERROR(CP_ERR_INTERNAL, "cannot start the health-check thread");
    p->thread_started = true;
    return CP_OK;
}

void rt_pool_free(rt_pool *p) {
    if (!p->u) return;
    if (p->thread_started) {
        pthread_mutex_lock(&p->mu);
        p->stop = true;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->thread, NULL);
        p->thread_started = false;
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->u);
    p->u = NULL;
}

int rt_pool_choose(rt_pool *p, const bool *tried, bool allow_tried, bool *failover) {
    double now = cp_time_now();
    pthread_mutex_lock(&p->mu);
    int best = -1;
    for (int k = 0; k < p->n; k++) {
        int i = (int)((p->rr + (unsigned)k) % (unsigned)p->n);
        rt_upstream *u = &p->u[i];
        tick(p, u, now);
        if (u->state != RT_CLOSED || (tried && tried[i] && !allow_tried)) continue;
        if (best < 0 || u->cfg.priority < p->u[best].cfg.priority ||
            (u->cfg.priority == p->u[best].cfg.priority && u->in_flight < p->u[best].in_flight))
            best = i;
    }
    if (best >= 0) {
        p->u[best].in_flight++;
        p->rr++;
        if (failover) *failover = p->u[best].cfg.priority > p->min_priority;
    }
    pthread_mutex_unlock(&p->mu);
    return best;
}

void rt_pool_done(rt_pool *p, int i, rt_outcome o, const char *why) {
    if (i < 0 || i >= p->n) return;
    double now = cp_time_now();
    pthread_mutex_lock(&p->mu);
    rt_upstream *u = &p->u[i];
    if (u->in_flight > 0) u->in_flight--;
    u->outcomes[o]++;
    switch (o) {
    case RT_OUT_SUCCESS:
    case RT_OUT_CLIENT_ERROR: u->fails = 0; break;
    case RT_OUT_SERVER_ERROR:
    case RT_OUT_CONNECT_ERROR:
    case RT_OUT_BROKEN:
        /* a circuit already open keeps its rest; half-open waits for a probe */
        if (u->state == RT_CLOSED) failure(p, u, why, now);
        break;
    default: break;
    }
    pthread_mutex_unlock(&p->mu);
}

unsigned rt_pool_epoch(rt_pool *p, int i) {
    return atomic_load(&p->u[i].epoch);
}

int rt_pool_healthy(rt_pool *p) {
    double now = cp_time_now();
    int n = 0;
    pthread_mutex_lock(&p->mu);
    for (int i = 0; i < p->n; i++) {
        tick(p, &p->u[i], now);
        n += p->u[i].state == RT_CLOSED;
    }
    pthread_mutex_unlock(&p->mu);
    return n;
}

void rt_pool_wait(rt_pool *p, int ms) {
    struct timespec ts;
    deadline_in(&ts, ms);
    pthread_mutex_lock(&p->mu);
    if (!p->stop) pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    pthread_mutex_unlock(&p->mu);
}

static const char *OUTCOME_NAMES[RT_OUT_COUNT] = {
    "success", "client_error", "rate_limited", "server_error", "connect_error", "broken", "cancelled",
};

void rt_pool_render(rt_pool *p, rt_buf *b) {
    double now = cp_time_now();
    pthread_mutex_lock(&p->mu);
    rt_buf_str(b, "# HELP cparallel_router_upstream_healthy 1 when the upstream takes traffic "
                  "(its circuit is closed).\n# TYPE cparallel_router_upstream_healthy gauge\n");
    for (int i = 0; i < p->n; i++) {
        tick(p, &p->u[i], now);
        rt_buf_printf(b, "cparallel_router_upstream_healthy{upstream=\"%s\"} %d\n",
                      p->u[i].cfg.name, p->u[i].state == RT_CLOSED);
    }
    rt_buf_str(b, "# HELP cparallel_router_upstream_circuit_open 1 while the upstream's circuit "
                  "breaker is open or half-open.\n"
                  "# TYPE cparallel_router_upstream_circuit_open gauge\n");
    for (int i = 0; i < p->n; i++)
        rt_buf_printf(b, "cparallel_router_upstream_circuit_open{upstream=\"%s\"} %d\n",
                      p->u[i].cfg.name, p->u[i].state != RT_CLOSED);
    rt_buf_str(b, "# HELP cparallel_router_upstream_requests_total Attempts sent to each "
                  "upstream, by outcome.\n"
                  "# TYPE cparallel_router_upstream_requests_total counter\n");
    for (int i = 0; i < p->n; i++)
        for (int o = 0; o < RT_OUT_COUNT; o++)
            rt_buf_printf(b,
                          "cparallel_router_upstream_requests_total{upstream=\"%s\",outcome=\"%s\"} "
                          "%llu\n",
                          p->u[i].cfg.name, OUTCOME_NAMES[o],
                          (unsigned long long)p->u[i].outcomes[o]);
    rt_buf_str(b, "# HELP cparallel_router_upstream_in_flight Attempts now running on each "
                  "upstream.\n# TYPE cparallel_router_upstream_in_flight gauge\n");
    for (int i = 0; i < p->n; i++)
        rt_buf_printf(b, "cparallel_router_upstream_in_flight{upstream=\"%s\"} %d\n",
                      p->u[i].cfg.name, p->u[i].in_flight);
    pthread_mutex_unlock(&p->mu);
}
