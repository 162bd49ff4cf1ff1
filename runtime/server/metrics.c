/* metrics.c - the server's Prometheus metrics: request counters by endpoint
 * and status, token counters, latency histograms, and the scheduler's gauges,
 * written in the text exposition format. Never holds prompts or outputs. */
#include "server_impl.h"

#include <stdlib.h>
#include <string.h>

#define MAX_STATUS 24 /* distinct status codes counted per endpoint */

static const double TTFT_BUCKETS[] = {0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.25, 0.5, 0.75,
                                      1.0,   2.5,  5.0,   7.5,  10.0,  20.0, 40.0, 80.0};
static const double TPOT_BUCKETS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                      0.15,  0.2,    0.3,   0.4,  0.5,   0.75, 1.0,   2.5};
static const double DURATION_BUCKETS[] = {0.01, 0.025, 0.05, 0.1,  0.25, 0.5,  1.0,   2.5,  5.0,
                                          10.0, 15.0,  20.0, 30.0, 45.0, 60.0, 120.0, 300.0};
#define NB(a) ((int)(sizeof(a) / sizeof(a[0])))
#define MAX_BUCKETS 17

typedef struct histogram {
    const double *bounds;
    int n;
    uint64_t counts[MAX_BUCKETS]; /* per bucket (not cumulative) */
    uint64_t count;
    double sum;
} histogram;

struct metrics {
    pthread_mutex_t mu;
    struct {
        int status;
        uint64_t count;
    } requests[EP_COUNT][MAX_STATUS];
    uint64_t prompt_tokens, generation_tokens;
    histogram ttft, tpot, duration;
};

static const char *EP_PATH[EP_COUNT] = {"/v1/completions",
                                        "/v1/chat/completions",
                                        "/v1/models",
                                        "/health",
                                        "/health/ready",
                                        "/metrics",
                                        "other"};

const char *metric_endpoint_path(metric_endpoint ep) {
    return ep >= 0 && ep < EP_COUNT ? EP_PATH[ep] : "other";
}

metrics *metrics_new(void) {
    metrics *m = calloc(1, sizeof(*m));
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->ttft = (histogram){.bounds = TTFT_BUCKETS, .n = NB(TTFT_BUCKETS)};
    m->tpot = (histogram){.bounds = TPOT_BUCKETS, .n = NB(TPOT_BUCKETS)};
    m->duration = (histogram){.bounds = DURATION_BUCKETS, .n = NB(DURATION_BUCKETS)};
    return m;
}

void metrics_free(metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static void observe(histogram *h, double v) {
    int i = 0;
    while (i < h->n && v > h->bounds[i])
        i++;
    if (i < h->n) h->counts[i]++;
    h->count++;
    h->sum += v;
}

void metrics_request(metrics *m, metric_endpoint ep, int status, double duration_s) {
    if (ep < 0 || ep >= EP_COUNT) ep = EP_OTHER;
    pthread_mutex_lock(&m->mu);
    for (int i = 0; i < MAX_STATUS; i++) {
        if (m->requests[ep][i].status == status || m->requests[ep][i].status == 0) {
            m->requests[ep][i].status = status;
            m->requests[ep][i].count++;
            break;
        }
    }
    if (ep == EP_COMPLETIONS || ep == EP_CHAT) observe(&m->duration, duration_s);
    pthread_mutex_unlock(&m->mu);
}

void metrics_tokens(metrics *m, int prompt, int generated) {
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)(prompt > 0 ? prompt : 0);
    m->generation_tokens += (uint64_t)(generated > 0 ? generated : 0);
    pthread_mutex_unlock(&m->mu);
}

void metrics_ttft(metrics *m, double s) {
    pthread_mutex_lock(&m->mu);
    observe(&m->ttft, s);
    pthread_mutex_unlock(&m->mu);
}

void metrics_tpot(metrics *m, double s) {
    pthread_mutex_lock(&m->mu);
    observe(&m->tpot, s);
    pthread_mutex_unlock(&m->mu);
}

static void header(sbuf *b, const char *name, const char *type, const char *help) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render_histogram(sbuf *b, const char *name, const char *help, const histogram *h) {
    header(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->counts[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], (unsigned long long)cum);
    }
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)h->count);
    sb_printf(b, "%s_sum %.9g\n", name, h->sum);
    sb_printf(b, "%s_count %llu\n", name, (unsigned long long)h->count);
}

static void gauge(sbuf *b, const char *name, const char *help, double v) {
    header(b, name, "gauge", help);
    sb_printf(b, "%s %.9g\n", name, v);
}

/* A label value with \\, \" and newlines escaped, as the format asks. */
static void label_value(sbuf *b, const char *v) {
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            sb_printf(b, "\\%c", *v);
        else if (*v == '\n')
            sb_str(b, "\\n");
        else
            sb_add(b, v, 1);
    }
}

char *metrics_render(metrics *m, const cp_sched_stats *st, const metrics_info *info) {
    sbuf b = {0};
    header(&b, "cparallel_info", "gauge", "The served model and the deployment's region (always 1).");
    sb_str(&b, "cparallel_info{model=\"");
    label_value(&b, info->model ? info->model : "");
    sb_str(&b, "\",region=\"");
    label_value(&b, info->region ? info->region : "");
    sb_str(&b, "\"} 1\n");
    gauge(&b, "cparallel_ready", "1 while the server admits requests, 0 draining or failed.",
          info->ready ? 1 : 0);
    gauge(&b, "cparallel_fault", "1 once the server failed (it exits non-zero soon).",
          info->faulted ? 1 : 0);
    pthread_mutex_lock(&m->mu);
    header(&b, "cparallel_requests_total", "counter",
           "HTTP requests answered, by endpoint and status.");
    for (int ep = 0; ep < EP_COUNT; ep++)
        for (int i = 0; i < MAX_STATUS && m->requests[ep][i].status; i++)
            sb_printf(&b, "cparallel_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n",
                      EP_PATH[ep], m->requests[ep][i].status,
                      (unsigned long long)m->requests[ep][i].count);
    header(&b, "cparallel_prompt_tokens_total", "counter",
           "Prompt tokens of finished generation requests.");
    sb_printf(&b, "cparallel_prompt_tokens_total %llu\n", (unsigned long long)m->prompt_tokens);
    header(&b, "cparallel_generation_tokens_total", "counter", "Tokens generated for requests.");
    sb_printf(&b, "cparallel_generation_tokens_total %llu\n",
              (unsigned long long)m->generation_tokens);
    render_histogram(&b, "cparallel_time_to_first_token_seconds",
                     "Seconds from a request's admission to its first generated token.", &m->ttft);
    render_histogram(&b, "cparallel_time_per_output_token_seconds",
                     "Mean seconds between generated tokens after the first, per request.",
                     &m->tpot);
    render_histogram(&b, "cparallel_request_duration_seconds",
                     "Seconds from a generation request's arrival to its last byte.", &m->duration);
    pthread_mutex_unlock(&m->mu);
    gauge(&b, "cparallel_running_sequences", "Sequences in the running batch.", st->running);
    gauge(&b, "cparallel_waiting_requests", "Requests queued for admission.", st->waiting);
    gauge(&b, "cparallel_kv_blocks_used", "KV-cache blocks in use.", st->kv_blocks_used);
    gauge(&b, "cparallel_kv_blocks_free", "KV-cache blocks free.", st->kv_blocks_free);
    gauge(&b, "cparallel_prefix_cache_hit_ratio",
          "Full prompt blocks found in the prefix cache / blocks looked up, since start.",
          st->prefix_lookups > 0 ? (double)st->prefix_hits / (double)st->prefix_lookups : 0.0);
    gauge(&b, "cparallel_step_seconds", "Duration of the latest forward step.", st->last_step_s);
    header(&b, "cparallel_preemptions_total", "counter",
           "Running sequences preempted because KV blocks ran out.");
    sb_printf(&b, "cparallel_preemptions_total %lld\n", (long long)st->preemptions);
    header(&b, "cparallel_steps_total", "counter", "Forward steps run by the scheduler.");
    sb_printf(&b, "cparallel_steps_total %lld\n", (long long)st->steps);
    header(&b, "cparallel_failed_steps_total", "counter", "Forward steps that failed.");
    sb_printf(&b, "cparallel_failed_steps_total %lld\n", (long long)st->failed_steps);
    if (b.oom) {
        sb_free(&b);
        return NULL;
    }
    return b.p;
}
