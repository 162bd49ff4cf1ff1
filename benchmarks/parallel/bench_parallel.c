/* bench_parallel.c - communication per generated token under tensor,
 * pipeline and context parallelism. Started by mpirun with tp x cp x pp
 * ranks: prefills a
 * prompt, decodes G greedy tokens, and reports from the communicators'
 * counters the calls, bytes and time of the decode steps next to the counts
 * the layout predicts, plus the split of decode time between communication
 * and everything else, as Markdown table rows printed by rank 0. */
#include "cp_comm.h"
#include "cp_plan.h"
#include "cp_runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- options ------------------------------------------------------------ */

typedef struct bench_opts {
    const char *model, *name, *ops_out;
    int tp, pp, cp, n_prompt, n_gen, threads, cp_exchange, mixed, fresh;
    int logits; /* LOGITS_* */
    bool header_only, sp;
} bench_opts;

enum { LOGITS_FULL, LOGITS_TOP, LOGITS_SAMPLE, LOGITS_NUCLEUS };
static const char *const logits_names[] = {"full", "top", "sample", "nucleus"};

static void usage(FILE *f) {
    fprintf(f, "usage: mpirun -np TP*CP*PP bench_parallel --model PATH [--tp N] [--pp N] [--cp N]\n"
               "           [--prompt N] [--gen N] [--threads N] [--name LABEL] [--ops-out FILE]\n"
               "       bench_parallel --header-only [--ops-out FILE]\n"
               "  --prompt N     prompt tokens prefilled before the measured decode (default 32)\n"
               "  --gen N        decode steps measured (default 32)\n"
               "  --threads N    CPU threads per rank (default: cores / ranks on the node, >= 1)\n"
               "  --cp-exchange auto|queries|kv|ring  what cp ranks pass in attention (default auto)\n"
               "  --sp           sequence parallelism for the prompt inside the TP group\n"
               "  --mixed S      instead: one serving step of S sequences decoding after --prompt\n"
               "                 tokens of history each, batched with a fresh prompt of --fresh\n"
               "                 tokens (default 256); prints the step's bytes and time\n"
               "  --logits full|top|sample|nucleus  --mixed: the step returns every row's\n"
               "                 full logits (cp_model_forward, default), its best candidate\n"
               "                 as the server asks for a greedy row (cp_model_forward_top),\n"
               "                 or a token the forward pass samples for every row, at\n"
               "                 temperature 1 without filters (sample) or at temperature\n"
               "                 0.8 with top-p 0.95 (nucleus), as the server asks for such\n"
               "                 requests; the way each row was sampled goes to stderr\n"
               "  --name LABEL   model label in the table (default: the file name)\n"
               "  --ops-out FILE append the per-operation rows to FILE\n"
               "  --header-only  print the table headers (main table to stdout, the\n"
               "                 per-operation one to --ops-out) and exit\n"
               "Rank 0 prints one row of the main table to stdout.\n");
}

static bool parse_int(const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (!s[0] || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

/* 0 ok, 2 usage error (message printed). */
static int parse_args(int argc, char **argv, bench_opts *o) {
    *o = (bench_opts){.tp = 1, .pp = 1, .cp = 1, .n_prompt = 32, .n_gen = 32, .fresh = 256};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true, takes = true;
        if (!strcmp(a, "--model") && v)
            o->model = v;
        else if (!strcmp(a, "--name") && v)
            o->name = v;
        else if (!strcmp(a, "--ops-out") && v)
            o->ops_out = v;
        else if (!strcmp(a, "--tp") && v)
            ok = parse_int(v, 1, 1024, &o->tp);
        else if (!strcmp(a, "--pp") && v)
            ok = parse_int(v, 1, 1024, &o->pp);
        else if (!strcmp(a, "--cp") && v)
            ok = parse_int(v, 1, 1024, &o->cp);
        else if (!strcmp(a, "--prompt") && v)
            ok = parse_int(v, 1, 1 << 20, &o->n_prompt);
        else if (!strcmp(a, "--gen") && v)
            ok = parse_int(v, 1, 1 << 20, &o->n_gen);
        else if (!strcmp(a, "--threads") && v)
            ok = parse_int(v, 1, 4096, &o->threads);
        else if (!strcmp(a, "--mixed") && v)
            ok = parse_int(v, 1, 4096, &o->mixed);
        else if (!strcmp(a, "--fresh") && v)
            ok = parse_int(v, 1, 1 << 20, &o->fresh);
        else if (!strcmp(a, "--logits") && v) {
            ok = false;
            for (int j = 0; j < (int)(sizeof logits_names / sizeof logits_names[0]); j++)
                if (!strcmp(v, logits_names[j])) {
                    o->logits = j;
                    ok = true;
                }
        } else if (!strcmp(a, "--cp-exchange") && v)
            ok = cp_cp_exchange_parse(v, &o->cp_exchange);
        else if (!strcmp(a, "--sp")) {
            o->sp = true;
            takes = false;
        } else if (!strcmp(a, "--header-only")) {
            o->header_only = true;
            takes = false;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "bench_parallel: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "bench_parallel: invalid value '%s' for %s\n", v, a);
            return 2;
        }
        if (takes) i++;
    }
    if (!o->header_only && !o->model) {
        fprintf(stderr, "bench_parallel: --model is required\n");
        usage(stderr);
        return 2;
    }
    if (!o->name && o->model) {
        const char *s = strrchr(o->model, '/');
        o->name = s ? s + 1 : o->model;
    }
    return 0;
}

/* ---- tables ---------------------------------------------------------------- */

static void print_headers(FILE *main_out, FILE *ops_out) {
    fprintf(main_out,
            "| model | np | tp | pp | cp | decode tok/s | calls/tok (rank max) | bytes/tok, rank max: "
            "measured / predicted | bytes/tok, all ranks: measured / predicted | exact | "
            "comm ms/tok mean (max) | other ms/tok mean (max) | comm share |\n"
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|\n");
    if (ops_out)
        fprintf(ops_out, "| model | tp | pp | cp | op | calls/tok, all ranks: measured / predicted | "
                         "bytes/tok, all ranks: measured / predicted | ms/tok mean (max) |\n"
                         "|---|--:|--:|--:|---|--:|--:|--:|\n");
}

/* ---- the prediction --------------------------------------------------------- */

/* Calls and payload bytes the n_gen measured decode steps (one token of one
 * sequence each, fed at positions n_prompt .. n_prompt + n_gen - 1) make this
 * rank pass to each operation, from the layout alone (see forward.c).
 * - tp > 1: the first stage all-reduces the embedding (dim floats), every
 *   layer the attention and the FFN outputs (dim floats each); the last
 *   stage samples from per-rank candidates: greedy all-gathers each rank's
 *   best candidate with its partial sums (one call of tp x TOP_PACK_BYTES).
 * - pp > 1: a stage receives dim floats from the previous one and sends dim
 *   floats to the next; the sampled token id (4 bytes) is broadcast from the
 *   last stage.
 * - cp > 1: a step's token belongs to cp rank pos % cp, and only that rank's
 *   TP group and stage chain run the TP reductions and the pipeline
 *   send/recv above; every cp rank takes part in each layer's attention
 *   exchange, chosen per step as runtime/forward.c (choose_exchange) does
 *   for a chunk of one sequence: with the history of len = pos + 1
 *   positions, passing K/V moves len x kvb bytes (kvb: K and V of one
 *   position, this rank's KV heads, the cache's type) in one collective,
 *   passing queries q_b = 4 n_head_l (2 head_dim + 2) bytes in three, and
 *   under auto the lighter wins once each collective counts CP_CP_CALL_BYTES:
 *   - queries: all-gather of the queries (n_head_l x head_dim floats per
 *     rank), all-reduce of the log-sum-exp maxima (cp x n_head_l floats),
 *     reduce-scatter of the weighted partial outputs (cp x n_head_l x
 *     (head_dim + 1) floats);
 *   - K/V all-gathered: one all-gatherv of the history's rows (len x kvb);
 *   - K/V around the ring (forced, or under auto from ring_bytes of
 *     history): cp - 1 sendrecvs of every rank's block, ceil(len / bs)
 *     blocks of bs / cp positions (kvb each);
 *   and the last stage all-reduces the token's hidden state (dim floats)
 *   so that every cp rank samples it. */
/* forward.c's candidate pack of one row for k = 1 (greedy): CP_TOP_WORDS(1)
 * 32-bit words (value and id, the log-sum-exp and temperature partial sums,
 * the target's logit) */
#define TOP_PACK_BYTES ((2 * 1 + 9) * 4)

typedef struct cp_layout {
    int exchange;      /* CP_CP_* the engine was given */
    int block_size;    /* of the KV cache */
    size_t kv_elem;    /* bytes per cached value */
    double ring_bytes; /* CP_CP_AUTO: histories this large go around the ring */
} cp_layout;

static void predict(const cp_model_config *c, const cp_plan *p, const cp_layout *x, int n_prompt, int n_gen,
                    uint64_t calls[], uint64_t bytes[]) {
    memset(calls, 0, sizeof(uint64_t) * CP_COMM_OP_COUNT);
    memset(bytes, 0, sizeof(uint64_t) * CP_COMM_OP_COUNT);
    const uint64_t layers = (uint64_t)(p->layer_end - p->layer_begin), f = sizeof(float);
    const bool first = p->first_stage, last = p->last_stage;
    const uint64_t dim = (uint64_t)c->dim, tp = (uint64_t)p->tp, cp = (uint64_t)p->cp;
    const uint64_t nh = (uint64_t)(p->head_end - p->head_begin), hd = (uint64_t)c->head_dim;
    uint64_t owned = 0; /* steps whose token this rank computes */
    for (int i = 0; i < n_gen; i++) owned += (uint64_t)((n_prompt + i) % p->cp == p->cp_rank);
    const uint64_t steps = (uint64_t)n_gen;
    if (tp > 1) {
        calls[CP_COMM_OP_ALLREDUCE] += owned * (2 * layers + (first ? 1 : 0));
        bytes[CP_COMM_OP_ALLREDUCE] += owned * (2 * layers + (first ? 1 : 0)) * dim * f;
        calls[CP_COMM_OP_ALLGATHER] += last ? steps : 0;
        bytes[CP_COMM_OP_ALLGATHER] += last ? steps * tp * TOP_PACK_BYTES : 0;
    }
    if (p->pp > 1) {
        calls[CP_COMM_OP_SEND] += last ? 0 : owned;
        bytes[CP_COMM_OP_SEND] += last ? 0 : owned * dim * f;
        calls[CP_COMM_OP_RECV] += first ? 0 : owned;
        bytes[CP_COMM_OP_RECV] += first ? 0 : owned * dim * f;
        calls[CP_COMM_OP_BCAST] += steps;
        bytes[CP_COMM_OP_BCAST] += steps * 4;
    }
    if (cp <= 1) return;
    const uint64_t sb = (uint64_t)(p->kv_head_end - p->kv_head_begin) * hd * x->kv_elem; /* K or V of a position */
    const double kvb = 2.0 * (double)sb, qb = (double)(nh * hd + nh * (hd + 1) + nh) * 4.0;
    const uint64_t bs = (uint64_t)x->block_size, slots = bs / cp;
    for (int i = 0; i < n_gen; i++) {
        const uint64_t len = (uint64_t)(n_prompt + i) + 1;
        bool kv = x->exchange == CP_CP_KV || x->exchange == CP_CP_RING;
        if (x->exchange == CP_CP_AUTO) kv = CP_CP_CALL_BYTES + (double)len * kvb <= 3 * CP_CP_CALL_BYTES + qb;
        const bool ring = kv && (x->exchange == CP_CP_RING ||
                                 (x->exchange == CP_CP_AUTO && (double)len * kvb >= x->ring_bytes));
        if (ring) {
            calls[CP_COMM_OP_SENDRECV] += (cp - 1) * layers;
            bytes[CP_COMM_OP_SENDRECV] += (cp - 1) * layers * 2 * ((len + bs - 1) / bs) * slots * sb;
        } else if (kv) {
            calls[CP_COMM_OP_ALLGATHERV] += layers;
            bytes[CP_COMM_OP_ALLGATHERV] += layers * len * 2 * sb;
        } else {
            calls[CP_COMM_OP_ALLGATHER] += layers;
            bytes[CP_COMM_OP_ALLGATHER] += layers * cp * nh * hd * f;
            calls[CP_COMM_OP_ALLREDUCE] += layers;
            bytes[CP_COMM_OP_ALLREDUCE] += layers * cp * nh * f;
            calls[CP_COMM_OP_REDUCE_SCATTER] += layers;
            bytes[CP_COMM_OP_REDUCE_SCATTER] += layers * cp * nh * (hd + 1) * f;
        }
    }
    calls[CP_COMM_OP_ALLREDUCE] += last ? steps : 0;
    bytes[CP_COMM_OP_ALLREDUCE] += last ? steps * dim * f : 0;
}

/* ---- measuring --------------------------------------------------------------- */

/* Counters are zeroed when the first token arrives (it comes out of the
 * prefill) and read when the last one arrives: in between lie exactly the
 * n_gen decode steps, each a forward pass of one token followed by sampling. */
typedef struct measure {
    cp_comm_t tp, pp, cp;
    int n_seen, n_last;
    double t_begin, t_end;
    cp_comm_stats tp_stats, pp_stats, cp_stats;
    uint64_t prefill_bytes; /* payload this rank passed during the prefill, all groups */
    double prefill_comm_s;  /* seconds this rank spent in communicator calls then */
} measure;

/* Adds c's payload bytes and seconds, over every operation, to the totals. */
static void add_totals(cp_comm_t c, uint64_t *bytes, double *seconds) {
    cp_comm_stats st;
    cp_comm_get_stats(c, &st);
    for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
        *bytes += st.bytes[op];
        *seconds += st.seconds[op];
    }
}

static bool on_token(void *user, int32_t token, const char *piece, size_t len) {
    (void)token;
    (void)piece;
    (void)len;
    measure *m = user;
    m->n_seen++;
    if (m->n_seen == 1) {
        /* the counters were zeroed just before the prompt went in */
        m->prefill_bytes = 0;
        m->prefill_comm_s = 0;
        add_totals(m->tp, &m->prefill_bytes, &m->prefill_comm_s);
        add_totals(m->pp, &m->prefill_bytes, &m->prefill_comm_s);
        add_totals(m->cp, &m->prefill_bytes, &m->prefill_comm_s);
        cp_comm_reset_stats(m->tp);
        cp_comm_reset_stats(m->pp);
        cp_comm_reset_stats(m->cp);
        m->t_begin = cp_time_now();
    } else if (m->n_seen == m->n_last) {
        m->t_end = cp_time_now();
        cp_comm_get_stats(m->tp, &m->tp_stats);
        cp_comm_get_stats(m->pp, &m->pp_stats);
        cp_comm_get_stats(m->cp, &m->cp_stats);
    }
    return true;
}

/* Per-rank record gathered to every rank: integers, then doubles. */
enum {
    R_CALLS = 0,
    R_BYTES = CP_COMM_OP_COUNT,
    R_PCALLS = 2 * CP_COMM_OP_COUNT,
    R_PBYTES = 3 * CP_COMM_OP_COUNT,
    R_INTS = 4 * CP_COMM_OP_COUNT
};
enum { R_SECONDS = 0, R_DECODE = CP_COMM_OP_COUNT, R_DBLS = CP_COMM_OP_COUNT + 1 };

static void report(const bench_opts *o, int size, const int64_t *ints, const double *dbls,
                   FILE *ops_out) {
    const double g = o->n_gen;
    int64_t calls_max = 0, bytes_max_m = 0, bytes_max_p = 0, sum_m = 0, sum_p = 0;
    double comm_sum = 0, comm_max = 0, other_sum = 0, other_max = 0, decode_max = 0, share_sum = 0;
    bool exact = true;
    for (int r = 0; r < size; r++) {
        const int64_t *iv = ints + (size_t)r * R_INTS;
        const double *dv = dbls + (size_t)r * R_DBLS;
        int64_t calls = 0, bm = 0, bp = 0;
        double comm = 0;
        for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
            calls += iv[R_CALLS + op];
            bm += iv[R_BYTES + op];
            bp += iv[R_PBYTES + op];
            comm += dv[R_SECONDS + op];
            if (iv[R_CALLS + op] != iv[R_PCALLS + op] || iv[R_BYTES + op] != iv[R_PBYTES + op])
                exact = false;
        }
        double decode = dv[R_DECODE], other = decode - comm;
        if (calls > calls_max) calls_max = calls;
        if (bm > bytes_max_m) bytes_max_m = bm;
        if (bp > bytes_max_p) bytes_max_p = bp;
        sum_m += bm;
        sum_p += bp;
        comm_sum += comm;
        other_sum += other;
        share_sum += decode > 0 ? comm / decode : 0;
        if (comm > comm_max) comm_max = comm;
        if (other > other_max) other_max = other;
        if (decode > decode_max) decode_max = decode;
    }
    printf("| %s | %d | %d | %d | %d | %.1f | %.0f | %.0f / %.0f | %.0f / %.0f | %s | %.2f (%.2f) | "
           "%.2f (%.2f) | %.0f%% |\n",
           o->name, size, o->tp, o->pp, o->cp, decode_max > 0 ? g / decode_max : 0.0, calls_max / g,
           bytes_max_m / g, bytes_max_p / g, sum_m / g, sum_p / g,
           exact ? "yes" : "**NO**", comm_sum / size / g * 1e3, comm_max / g * 1e3,
           other_sum / size / g * 1e3, other_max / g * 1e3, 100.0 * share_sum / size);
    fflush(stdout);
    if (!exact)
        for (int r = 0; r < size; r++)
            for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
                const int64_t *iv = ints + (size_t)r * R_INTS;
                if (iv[R_CALLS + op] != iv[R_PCALLS + op] || iv[R_BYTES + op] != iv[R_PBYTES + op])
                    fprintf(stderr,
                            "bench_parallel: rank %d %s: measured %lld calls / %lld bytes over %d "
                            "tokens, predicted %lld / %lld\n",
                            r, cp_comm_op_name((cp_comm_op)op), (long long)iv[R_CALLS + op],
                            (long long)iv[R_BYTES + op], o->n_gen, (long long)iv[R_PCALLS + op],
                            (long long)iv[R_PBYTES + op]);
            }
    if (!ops_out) return;
    for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
        int64_t cm = 0, cp = 0, bm = 0, bp = 0;
        double s_sum = 0, s_max = 0;
        for (int r = 0; r < size; r++) {
            const int64_t *iv = ints + (size_t)r * R_INTS;
            double s = dbls[(size_t)r * R_DBLS + R_SECONDS + op];
            cm += iv[R_CALLS + op];
            cp += iv[R_PCALLS + op];
            bm += iv[R_BYTES + op];
            bp += iv[R_PBYTES + op];
            s_sum += s;
            if (s > s_max) s_max = s;
        }
        if (cm == 0 && cp == 0) continue;
        fprintf(ops_out, "| %s | %d | %d | %d | %s | %.2f / %.2f | %.0f / %.0f | %.3f (%.3f) |\n",
                o->name, o->tp, o->pp, o->cp, cp_comm_op_name((cp_comm_op)op), cm / g, cp / g,
                bm / g, bp / g, s_sum / size / g * 1e3, s_max / g * 1e3);
    }
}

/* ---- a mixed serving step ---------------------------------------------------------- */

/* --mixed: S sequences with `hist` tokens of history each decode one token
 * in the same batch as the `fresh` tokens of a new prompt, the way the
 * server mixes a chunked prefill with running streams; the batch is one
 * chunk (S + fresh <= cp_model_max_batch). Returns the payload bytes this
 * rank passed over all its groups during that step and the step's time. */
static cp_status mixed_step(cp_engine_t e, const bench_opts *o, cp_comm_t tp, cp_comm_t pp, cp_comm_t cpc,
                            double *bytes, double *secs) {
    cp_model_t m = cp_engine_model(e);
    const cp_model_config *cfg = cp_model_get_config(m);
    const int S = o->mixed, hist = o->n_prompt, fresh = o->fresh, n_seq = S + 1;
    if (S + fresh > cp_model_max_batch(m))
        return CP_ERROR(CP_ERR_INVALID_ARG, "--mixed %d + --fresh %d exceed one chunk (%d tokens)", S, fresh,
                        cp_model_max_batch(m));
    const int bs = 16 * o->cp, len = (hist + 1 > fresh ? hist + 1 : fresh);
    const int per_seq = (len + bs - 1) / bs;
    cp_kv_cache_opts ko = {n_seq * per_seq, bs, CP_DTYPE_F32};
    cp_kv_cache_t kv = NULL;
    const size_t n_hist = (size_t)S * (size_t)hist;
    int32_t *tables = malloc((size_t)n_seq * (size_t)per_seq * sizeof(int32_t));
    int32_t *tok = malloc((n_hist + (size_t)S + (size_t)fresh) * 3 * sizeof(int32_t));
    int32_t *rows = malloc(2 * ((size_t)S + 1) * sizeof(int32_t)); /* then --logits top's ids */
    float *logits = malloc(((size_t)S + 1) * (size_t)cfg->n_vocab * sizeof(float));
    double *lse = malloc(((size_t)S + 1) * sizeof(double)); /* --logits top */
    /* --logits sample / nucleus: the candidates' ids, what each row wants */
    int32_t *ids = malloc(((size_t)S + 1) * CP_MODEL_MAX_TOP * sizeof(int32_t));
    uint8_t *need = malloc((size_t)S + 1);
    cp_sample_params *sp = malloc(((size_t)S + 1) * sizeof(*sp));
    float *u = malloc(((size_t)S + 1) * sizeof(float)), *tok_logit = malloc(((size_t)S + 1) * sizeof(float));
    cp_status st = CP_OK;
    if (!tables || !tok || !rows || !logits || !lse || !ids || !need || !sp || !u || !tok_logit) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    int32_t *pos = tok + n_hist + (size_t)S + (size_t)fresh, *seq = pos + n_hist + (size_t)S + (size_t)fresh;
    if ((st = cp_kv_cache_init(m, &ko, &kv)) != CP_OK) goto done;
    if ((st = cp_kv_cache_alloc_blocks(kv, n_seq * per_seq, tables)) != CP_OK) goto done;
    /* the histories (any fixed ids do) */
    size_t n = 0;
    for (int s = 0; s < S; s++)
        for (int p = 0; p < hist; p++, n++) {
            tok[n] = (int32_t)(1 + ((int64_t)(p + 31 * s) * 7919) % (cfg->n_vocab - 1));
            pos[n] = p;
            seq[n] = s;
        }
    cp_batch b = {(int)n, tok, pos, seq, tables, n_seq, per_seq, NULL, 0};
    if ((st = cp_model_forward(m, kv, &b, NULL)) != CP_OK) goto done;
    /* the step: a decode row of every stream, then the new prompt */
    n = 0;
    for (int s = 0; s < S; s++, n++) {
        tok[n] = 1 + s;
        pos[n] = hist;
        seq[n] = s;
        rows[s] = (int32_t)n;
    }
    for (int p = 0; p < fresh; p++, n++) {
        tok[n] = (int32_t)(1 + ((int64_t)p * 104729) % (cfg->n_vocab - 1));
        pos[n] = p;
        seq[n] = S;
    }
    rows[S] = (int32_t)n - 1;
    b = (cp_batch){(int)n, tok, pos, seq, tables, n_seq, per_seq, rows, S + 1};
    cp_comm_reset_stats(tp);
    cp_comm_reset_stats(pp);
    cp_comm_reset_stats(cpc);
    const double t0 = cp_time_now();
    cp_model_stats before;
    cp_model_get_stats(m, &before);
    if (o->logits == LOGITS_TOP) {
        /* greedy rows: one candidate each, no log-sum-exp, no full row */
        const cp_logit_top top = {.k = 1, .need = NULL, .logits = NULL, .val = logits, .id = rows + S + 1, .lse = lse};
        st = cp_model_forward_top(m, kv, &b, &top);
    } else if (o->logits != LOGITS_FULL) {
        /* every row sampled by the forward pass, as the server does for
         * temperature sampling without a top-k */
        const cp_sample_params want = o->logits == LOGITS_SAMPLE ? (cp_sample_params){1.0f, 0, 1.0f, 0.0f}
                                                                 : (cp_sample_params){0.8f, 0, 0.95f, 0.0f};
        for (int i = 0; i <= S; i++) {
            need[i] = CP_TOP_SAMPLE;
            sp[i] = want;
            u[i] = (float)((i * 0.6180339887) - (int)(i * 0.6180339887));
        }
        const int k = CP_MODEL_MAX_TOP < cfg->n_vocab ? CP_MODEL_MAX_TOP : cfg->n_vocab;
        const cp_logit_top top = {.k = k,
                                  .need = need,
                                  .val = logits,
                                  .id = ids,
                                  .lse = lse,
                                  .sp = sp,
                                  .u = u,
                                  .tok = rows + S + 1,
                                  .tok_logit = tok_logit};
        st = cp_model_forward_top(m, kv, &b, &top);
    } else {
        st = cp_model_forward(m, kv, &b, logits);
    }
    if (st != CP_OK) goto done;
    *secs = cp_time_now() - t0;
    uint64_t moved = 0;
    double in_calls = 0;
    add_totals(tp, &moved, &in_calls);
    add_totals(pp, &moved, &in_calls);
    add_totals(cpc, &moved, &in_calls);
    *bytes = (double)moved;
    if (o->logits >= LOGITS_SAMPLE && cp_model_get_plan(m)->last_stage && cp_model_get_plan(m)->tp_rank == 0) {
        cp_model_stats after;
        cp_model_get_stats(m, &after);
        fprintf(stderr, "bench_parallel: %d rows sampled from the candidates, %d by the owning rank, %d from full rows\n",
                (int)(after.sampled_from_candidates - before.sampled_from_candidates),
                (int)(after.sampled_by_owner - before.sampled_by_owner),
                (int)(after.sampled_from_full_rows - before.sampled_from_full_rows));
    }
done:
    cp_kv_cache_free(kv);
    free(tables);
    free(tok);
    free(rows);
    free(logits);
    free(lse);
    free(ids);
    free(need);
    free(sp);
    free(u);
    free(tok_logit);
    return st;
}

/* ---- main ----------------------------------------------------------------------- */

static void fail_msg(int rank, const char *what) {
    fprintf(stderr, "bench_parallel: rank %d: %s: %s\n", rank, what, cp_last_error_detail());
}

int main(int argc, char **argv) {
    bench_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc;
    FILE *ops_out = NULL;
    if (o.header_only) {
        if (o.ops_out && !(ops_out = fopen(o.ops_out, "a"))) {
            fprintf(stderr, "bench_parallel: cannot open %s\n", o.ops_out);
            return 1;
        }
        print_headers(stdout, ops_out);
        if (ops_out) fclose(ops_out);
        return 0;
    }

    cp_comm_t world = NULL, tp = NULL, pp = NULL, cpc = NULL;
    cp_engine_t e = NULL;
    int32_t *prompt = NULL;
    int64_t *ints = NULL;
    double *dbls = NULL;
    rc = 1;
    if (cp_comm_init_world(CP_COMM_AUTO, 300000, &world) != CP_OK) {
        fail_msg(0, "cannot start the communicator");
        return 1;
    }
    const int rank = cp_comm_rank(world), size = cp_comm_size(world);
    if (o.tp * o.pp * o.cp != size) {
        fprintf(stderr, "bench_parallel: --tp %d x --pp %d x --cp %d needs %d ranks, the job has %d\n",
                o.tp, o.pp, o.cp, o.tp * o.pp * o.cp, size);
        rc = 2;
        goto out;
    }
    /* the launcher's layout (cp_plan.h) */
    const cp_plan_colors col = cp_plan_group_colors(rank, o.tp, o.cp);
    if ((o.tp > 1 && cp_comm_split(world, col.tp, rank, &tp) != CP_OK) ||
        (o.pp > 1 && cp_comm_split(world, col.pp, rank, &pp) != CP_OK) ||
        (o.cp > 1 && cp_comm_split(world, col.cp, rank, &cpc) != CP_OK)) {
        fail_msg(rank, "cannot create the parallel groups");
        goto out;
    }
    int threads = o.threads;
    if (threads == 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        int local = cp_comm_local_size(world);
        threads = (int)(cores / (local > 0 ? local : 1));
        if (threads < 1) threads = 1;
    }
    cp_engine_opts eo = {
        .model_path = o.model,
        .n_threads = threads,
        .n_ctx = o.n_prompt + o.n_gen + 8,
        .n_seq = 1,
        .tokens_only = true,
        .tp = o.tp,
        .pp = o.pp,
        .cp = o.cp,
        .rank = rank,
        .tp_comm = tp,
        .pp_comm = pp,
        .cp_comm = cpc,
        .cp_exchange = o.cp_exchange,
        .sp = o.sp,
    };
    if (cp_engine_init(&eo, &e) != CP_OK) {
        fail_msg(rank, "cannot load the model");
        goto out;
    }
    const cp_model_config *cfg = cp_model_get_config(cp_engine_model(e));
    prompt = malloc((size_t)o.n_prompt * sizeof(int32_t));
    ints = calloc((size_t)size * R_INTS, sizeof(int64_t));
    dbls = calloc((size_t)size * R_DBLS, sizeof(double));
    if (!prompt || !ints || !dbls) {
        fprintf(stderr, "bench_parallel: out of memory\n");
        goto out;
    }
    /* any fixed ids do: the weights are the same whatever the text */
    for (int i = 0; i < o.n_prompt; i++)
        prompt[i] = (int32_t)(1 + ((int64_t)i * 7919) % (cfg->n_vocab - 1));

    /* a short untimed run first: pages in the weights and warms the caches */
    cp_gen_params gp = {
        .sample = {.temperature = 0}, .seed = 1, .max_tokens = 2, .ignore_eos = true};
    if (cp_engine_generate(e, prompt, o.n_prompt < 8 ? o.n_prompt : 8, &gp, NULL, NULL, NULL) !=
        CP_OK) {
        fail_msg(rank, "warm-up generation failed");
        goto out;
    }
    if (o.mixed) {
        double bytes = 0, secs = 0, worst = 0;
        if (mixed_step(e, &o, tp, pp, cpc, &bytes, &secs) != CP_OK) {
            fail_msg(rank, "the mixed step failed");
            goto out;
        }
        if (cp_comm_allreduce(world, &secs, &worst, 1, CP_DTYPE_F64, CP_REDUCE_MAX, NULL) != CP_OK) {
            fail_msg(rank, "cannot gather the results");
            goto out;
        }
        if (rank == 0)
            printf("| %s | %d | %d | %d | %s | %d x %d | %d | %.0f | %.1f |\n", o.name, o.tp, o.pp, o.cp,
                   cp_cp_exchange_name(o.cp_exchange), o.mixed, o.n_prompt, o.fresh, bytes, worst * 1e3);
        rc = 0;
        goto out;
    }
    measure m = {.tp = tp, .pp = pp, .cp = cpc, .n_last = o.n_gen + 1};
    cp_comm_reset_stats(tp);
    cp_comm_reset_stats(pp);
    cp_comm_reset_stats(cpc);
    gp.max_tokens = o.n_gen + 1; /* the first token comes from the prefill */
    cp_gen_stats gs;
    if (cp_engine_generate(e, prompt, o.n_prompt, &gp, on_token, &m, &gs) != CP_OK) {
        fail_msg(rank, "generation failed");
        goto out;
    }
    if (m.n_seen != o.n_gen + 1) {
        fprintf(stderr, "bench_parallel: rank %d: %d tokens generated, expected %d\n", rank,
                m.n_seen, o.n_gen + 1);
        goto out;
    }

    int64_t mine_i[R_INTS];
    double mine_d[R_DBLS];
    uint64_t pc[CP_COMM_OP_COUNT], pb[CP_COMM_OP_COUNT];
    const cp_layout lay = {o.cp_exchange, cp_kv_cache_block_size(cp_engine_kv(e)), sizeof(uint16_t) /* f16 cache */,
                           CP_CP_RING_BYTES_DEFAULT};
    predict(cfg, cp_model_get_plan(cp_engine_model(e)), &lay, o.n_prompt, o.n_gen, pc, pb);
    for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
        mine_i[R_CALLS + op] = (int64_t)(m.tp_stats.calls[op] + m.pp_stats.calls[op] + m.cp_stats.calls[op]);
        mine_i[R_BYTES + op] = (int64_t)(m.tp_stats.bytes[op] + m.pp_stats.bytes[op] + m.cp_stats.bytes[op]);
        mine_i[R_PCALLS + op] = (int64_t)pc[op];
        mine_i[R_PBYTES + op] = (int64_t)pb[op];
        mine_d[R_SECONDS + op] = m.tp_stats.seconds[op] + m.pp_stats.seconds[op] + m.cp_stats.seconds[op];
    }
    mine_d[R_DECODE] = m.t_end - m.t_begin;
    if (cp_comm_allgather(world, mine_i, ints, R_INTS, CP_DTYPE_I64, NULL) != CP_OK ||
        cp_comm_allgather(world, mine_d, dbls, R_DBLS, CP_DTYPE_F64, NULL) != CP_OK) {
        fail_msg(rank, "cannot gather the results");
        goto out;
    }
    if (rank == 0) {
        if (o.ops_out && !(ops_out = fopen(o.ops_out, "a"))) {
            fprintf(stderr, "bench_parallel: cannot open %s\n", o.ops_out);
            goto out;
        }
        report(&o, size, ints, dbls, ops_out);
        cp_model_stats ms;
        cp_model_get_stats(cp_engine_model(e), &ms);
        fprintf(stderr,
                "bench_parallel: %s tp=%d pp=%d cp=%d%s: %d threads/rank, prefill %d tokens %.1f ms "
                "(%.0f bytes per token passed by rank 0, %.1f ms in its communicator calls), decode %d tokens "
                "%.1f ms (rank 0)",
                o.name, o.tp, o.pp, o.cp, o.sp ? " sp" : "", threads, o.n_prompt, gs.prefill_s * 1e3,
                (double)m.prefill_bytes / o.n_prompt, m.prefill_comm_s * 1e3, o.n_gen, mine_d[R_DECODE] * 1e3);
        if (o.cp > 1)
            fprintf(stderr, ", exchange %s holding at most %.2f MB of K/V per layer", cp_cp_exchange_name(o.cp_exchange),
                    ms.cp_kv_peak_bytes / 1e6);
        fputc('\n', stderr);
    }
    rc = 0;
out:
    if (ops_out) fclose(ops_out);
    free(prompt);
    free(ints);
    free(dbls);
    cp_engine_free(e);
    /* a rank that failed mid-collective would leave the others waiting */
    if (rc == 1 && cp_comm_size(world) > 1) cp_comm_abort(world, 1);
    cp_comm_free(tp);
    cp_comm_free(pp);
    cp_comm_free(cpc);
    cp_comm_free(world);
    return rc;
}
