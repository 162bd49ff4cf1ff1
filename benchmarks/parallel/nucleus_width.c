/* nucleus_width.c - how many tokens the sampling filters keep on the
 * default model's own text, which decides how often sampling across TP
 * ranks is settled by each rank's 256 best candidates (CP_MODEL_MAX_TOP)
 * and how often it needs the full rows (a top-p or min-p cut beyond them).
 *
 * For each of a few chat prompts the model writes a reply (temperature 0.8,
 * top-p 0.95, a fixed seed); then the logits of every reply position are
 * taken (cp_engine_logits over prompt + reply) and, for each filter
 * setting, the number of tokens kept is counted as cp_sample_ref keeps them
 * (scaled logits sorted, probabilities relative to the largest, the
 * smallest prefix reaching top_p of the total, then min_p). Prints a
 * Markdown table: the median, 90th and 99th percentile and largest kept
 * count, and the share of positions keeping more than 256.
 *
 *   nucleus_width --model PATH [--tokens N] [--threads N]
 */
#include "cp_runtime.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const prompts[] = {
    "Summarize the main causes of the First World War in a few sentences.",
    "Write a short poem about the sea at night.",
    "Explain how vaccines train the immune system.",
    "Give five practical tips for sleeping better.",
    "A patient reports headaches every morning for two weeks. What questions should a doctor ask?",
    "Describe the water cycle to a ten-year-old.",
};

typedef struct {
    float temperature, top_p, min_p;
} filter;

static const filter filters[] = {
    {1.0f, 1.0f, 0.0f},  {1.0f, 0.95f, 0.0f}, {1.0f, 0.9f, 0.0f},  {0.8f, 0.95f, 0.0f},
    {0.7f, 0.9f, 0.0f},  {1.0f, 1.0f, 0.05f}, {0.8f, 0.95f, 0.05f}, {1.0f, 1.0f, 0.1f},
};
enum { N_FILTERS = sizeof filters / sizeof filters[0] };

static int cmp_desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

static int cmp_int(const void *a, const void *b) {
    const int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Tokens kept of one row by filter f (z: scratch of vocab floats). */
static int kept(const float *row, int vocab, const filter *f, float *z) {
    for (int i = 0; i < vocab; i++) z[i] = row[i] / f->temperature;
    qsort(z, (size_t)vocab, sizeof *z, cmp_desc);
    int n = vocab;
    double total = 0.0;
    for (int j = 0; j < vocab; j++) total += expf(z[j] - z[0]);
    if (f->top_p < 1.0f) {
        double cum = 0.0;
        int j = 0;
        while (j < n) {
            cum += expf(z[j++] - z[0]);
            if (cum >= (double)f->top_p * total) break;
        }
        n = j;
    }
    if (f->min_p > 0.0f) {
        int j = 1;
        while (j < n && expf(z[j] - z[0]) >= f->min_p) j++;
        n = j;
    }
    return n;
}

typedef struct {
    int32_t *ids;
    int n, cap;
} reply;

static bool collect(void *user, int32_t tok, const char *piece, size_t len) {
    (void)piece;
    (void)len;
    reply *r = user;
    if (r->n < r->cap) r->ids[r->n++] = tok;
    return r->n < r->cap;
}

int main(int argc, char **argv) {
    const char *model = NULL;
    int max_tokens = 128, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            max_tokens = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: nucleus_width --model PATH [--tokens N (default 128)] [--threads N]\n");
            return 2;
        }
    }
    if (!model || max_tokens < 1 || max_tokens > 4096) {
        fprintf(stderr, "nucleus_width: --model PATH is required and --tokens must be 1..4096\n");
        return 2;
    }
    cp_engine_opts o = {.model_path = model, .n_threads = threads, .n_ctx = 2048, .n_seq = 1};
    cp_engine_t e = NULL;
    if (cp_engine_init(&o, &e) != CP_OK) {
        fprintf(stderr, "nucleus_width: %s\n", cp_last_error());
        return 1;
    }
    const int vocab = cp_model_get_config(cp_engine_model(e))->n_vocab;
    const int n_prompts = (int)(sizeof prompts / sizeof prompts[0]);
    int *counts[N_FILTERS];
    int n_rows = 0, cap_rows = n_prompts * max_tokens;
    for (int f = 0; f < N_FILTERS; f++) counts[f] = malloc((size_t)cap_rows * sizeof(int));
    float *z = malloc((size_t)vocab * sizeof(float));
    int rc = 0;
    for (int p = 0; p < n_prompts && rc == 0; p++) {
        const cp_chat_msg msg = {"user", prompts[p]};
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (cp_tokenizer_encode_chat(cp_engine_tokenizer(e), &msg, 1, CP_CHAT_GENERATION_PROMPT | CP_CHAT_TEMPLATE_SYSTEM, &ids, &n_ids, NULL) !=
            CP_OK) {
            fprintf(stderr, "nucleus_width: %s\n", cp_last_error());
            rc = 1;
            break;
        }
        int32_t *all = realloc(ids, (n_ids + (size_t)max_tokens) * sizeof(int32_t));
        if (!all) {
            free(ids);
            rc = 1;
            break;
        }
        reply r = {all + n_ids, 0, max_tokens};
        const cp_gen_params gp = {.sample = {0.8f, 0, 0.95f, 0.0f}, .seed = 1000 + (uint64_t)p, .max_tokens = max_tokens};
        float *logits = NULL;
        if (cp_engine_generate(e, all, (int)n_ids, &gp, collect, &r, NULL) != CP_OK ||
            !(logits = malloc((n_ids + (size_t)r.n) * (size_t)vocab * sizeof(float))) ||
            cp_engine_logits(e, all, (int)n_ids + r.n, logits) != CP_OK) {
            fprintf(stderr, "nucleus_width: %s\n", cp_last_error());
            rc = 1;
        }
        /* the rows that chose reply tokens: the last prompt position on */
        for (int t = 0; rc == 0 && t < r.n; t++, n_rows++)
            for (int f = 0; f < N_FILTERS; f++)
                counts[f][n_rows] = kept(logits + (n_ids - 1 + (size_t)t) * (size_t)vocab, vocab, &filters[f], z);
        fprintf(stderr, "nucleus_width: prompt %d: %zu prompt tokens, %d reply tokens\n", p + 1, n_ids, r.n);
        free(logits);
        free(all);
    }
    if (rc == 0) {
        printf("| temperature | top-p | min-p | median kept | p90 | p99 | largest | rows keeping > 256 |\n");
        printf("|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for (int f = 0; f < N_FILTERS; f++) {
            qsort(counts[f], (size_t)n_rows, sizeof(int), cmp_int);
            int over = 0;
            for (int i = 0; i < n_rows; i++) over += counts[f][i] > 256;
            printf("| %.2g | %.2g | %.2g | %d | %d | %d | %d | %.1f%% |\n", filters[f].temperature,
                   filters[f].top_p, filters[f].min_p, counts[f][n_rows / 2], counts[f][(int)(n_rows * 0.9)],
                   counts[f][(int)(n_rows * 0.99)], counts[f][n_rows - 1], 100.0 * over / n_rows);
        }
        printf("\n%d reply positions of %d prompts, vocabulary %d\n", n_rows, n_prompts, vocab);
    }
    for (int f = 0; f < N_FILTERS; f++) free(counts[f]);
    free(z);
    cp_engine_free(e);
    return rc;
}
