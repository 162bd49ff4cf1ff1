/* model.c - building a cp_model from a weight file: configuration checks,
 * shape checks of every tensor against the configuration, and placing the
 * weights on the backend (zero-copy from the mapping on the CPU). */
#include "model_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

cp_status cp_model_config_validate(const cp_model_config *c) {
#define BAD(...) return CP_ERROR(CP_ERR_FORMAT, "invalid model configuration: " __VA_ARGS__)
    if (c->n_layer <= 0 || c->n_layer > 4096) BAD("n_layer = %d", c->n_layer);
    if (c->dim <= 0 || c->dim > 1 << 17) BAD("hidden size = %d", c->dim);
    if (c->n_head <= 0 || c->n_head > 4096) BAD("n_head = %d", c->n_head);
    if (c->n_head_kv <= 0 || c->n_head % c->n_head_kv != 0)
        BAD("n_head_kv = %d does not divide n_head = %d", c->n_head_kv, c->n_head);
    if (c->head_dim <= 0 || c->head_dim > 1024 || c->head_dim % 2 != 0)
        BAD("head_dim = %d", c->head_dim);
    if (c->rot_dim <= 0 || c->rot_dim > c->head_dim || c->rot_dim % 2 != 0)
        BAD("rope dimension = %d (head_dim %d)", c->rot_dim, c->head_dim);
    if (c->ffn_dim <= 0 || c->ffn_dim > 1 << 20) BAD("ffn size = %d", c->ffn_dim);
    if (c->n_vocab <= 0 || c->n_vocab > 1 << 24) BAD("vocabulary size = %d", c->n_vocab);
    if (c->ctx_train <= 0) BAD("context length = %d", c->ctx_train);
    if (!(c->norm_eps > 0 && c->norm_eps < 1)) BAD("rms epsilon = %g", (double)c->norm_eps);
    if (!(c->rope_theta > 0) || !isfinite(c->rope_theta)) BAD("rope theta = %g", (double)c->rope_theta);
    if (!(c->rope_freq_scale > 0)) BAD("rope frequency scale = %g", (double)c->rope_freq_scale);
#undef BAD
    return CP_OK;
}

const cp_model_config *cp_model_get_config(cp_model_t m) { return &m->cfg; }
const cp_plan *cp_model_get_plan(cp_model_t m) { return &m->plan; }
cp_backend_t cp_model_backend(cp_model_t m) { return m->be; }
struct cp_gguf *cp_model_gguf(cp_model_t m) { return m->gguf; }
const char *cp_model_path(cp_model_t m) { return m->path; }
int cp_model_max_batch(cp_model_t m) { return m->max_batch; }

void cp_model_get_stats(cp_model_t m, cp_model_stats *s) { *s = m->stats; }

cp_status cp_model_set_observer(cp_model_t m, cp_act_observer fn, void *user) {
    if (fn && cp_backend_device(m->be) != CP_DEVICE_CPU)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "activation statistics need the CPU backend");
    /* with sequence parallelism the residual stream holds a slice of the rows */
    if (fn && m->sp)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "activation statistics cannot be collected with sequence parallelism");
    m->observe = fn;
    m->observe_user = user;
    return CP_OK;
}

static const char *const exchange_names[] = {"auto", "queries", "kv", "ring"}; /* in CP_CP_* order */
#define N_EXCHANGES ((int)(sizeof(exchange_names) / sizeof(exchange_names[0])))

bool cp_cp_exchange_parse(const char *name, int *out) {
    for (int i = 0; i < N_EXCHANGES; i++)
        if (!strcmp(name, exchange_names[i])) {
            *out = i;
            return true;
        }
    return false;
}

const char *cp_cp_exchange_name(int exchange) {
    return exchange >= 0 && exchange < N_EXCHANGES ? exchange_names[exchange] : "?";
}

cp_model_groups cp_model_get_groups(cp_model_t m) {
    return (cp_model_groups){.tp = m->tp_comm, .pp = m->pp_comm, .cp = m->cp_comm};
}

/* ---- weight lookup ------------------------------------------------------ */

static const cp_weight_info *find_weight(cp_model_t m, const char *name) {
    if (m->find) return m->find(m->find_ctx, name); /* safetensors (m->gguf: metadata only) */
    return m->gguf ? cp_gguf_find_tensor(m->gguf, name) : NULL;
}

/* A file whose 9th byte opens a JSON header (after the 8-byte header
 * length) is safetensors; everything else goes to the GGUF reader, which
 * says what is wrong with it. */
static bool is_gguf_file(const char *path) {
    unsigned char head[9] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return true;
    size_t n = fread(head, 1, sizeof(head), f);
    fclose(f);
    return n < sizeof(head) || memcmp(head, "GGUF", 4) == 0 || head[8] != '{';
}

static void account(cp_model_t m, const cp_weight_info *w) {
    int64_t n = 1;
    for (int d = 0; d < CP_MAX_DIMS; d++) n *= w->ne[d];
    m->stats.n_params += n;
    m->stats.weight_bytes += w->nbytes;
    if ((int)w->dtype >= 0 && (int)w->dtype < CP_DTYPE_COUNT) {
        m->stats.count_by_dtype[w->dtype]++;
        m->stats.bytes_by_dtype[w->dtype] += w->nbytes;
    }
}

/* Device memory for a copy of host bytes, remembered for cp_model_free. */
static cp_status place(cp_model_t m, const void *host, size_t bytes, void **out) {
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **p = realloc(m->owned, (size_t)cap * sizeof(void *));
        if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory");
        m->owned = p;
        m->cap_owned = cap;
    }
    void *d;
    CP_CHECK(cp_backend_alloc(m->be, bytes, &d));
    m->owned[m->n_owned++] = d;
    cp_status st = cp_backend_copy(m->be, d, host, bytes, CP_COPY_HOST_TO_DEVICE);
    if (st != CP_OK) return st;
    *out = d;
    return CP_OK;
}

static void progress(cp_model_t m, const cp_model_load_opts *o, size_t add) {
    m->loaded_bytes += add;
    if (o && o->progress) o->progress(o->progress_user, m->loaded_bytes, m->total_bytes);
}

/* A slice [r0, r1) x [c0, c1) of a matrix weight stored as [rows][cols]:
 * rows and columns of the full tensor are checked against the
 * configuration, then only the slice is read. Row slices of the CPU backend
 * point into the mapped file; column slices (row-parallel weights) and
 * device backends get a copy. c0 and c1 must be block boundaries (or c1 the
 * row end), which the parallel plan guarantees. */
typedef struct slice {
    int64_t r0, r1, c0, c1;
} slice;

/* Element alignment typed loads need (block structs hold fp16 fields). */
static size_t dtype_align(cp_dtype t) { return t == CP_DTYPE_F32 ? 4 : 2; }

/* Columns [c0, c0 + nc) of one whole row (cols elements) of type t into
 * dst: the slice's blocks, then the row's scale trailer when t has one
 * (I8_ROW, F8_ROW), which every slice of the row shares. */
static void slice_row(cp_dtype t, const char *full, int64_t cols, int64_t c0, int64_t nc, char *dst) {
    const size_t extra = cp_dtype_row_extra(t), bytes = cp_dtype_row_size(t, nc);
    memcpy(dst, full + (size_t)(c0 / cp_dtype_block_size(t)) * cp_dtype_type_size(t), bytes - extra);
    if (extra) memcpy(dst + bytes - extra, full + cp_dtype_row_size(t, cols) - extra, extra);
}

static cp_status get_matrix(cp_model_t m, const cp_model_load_opts *o, const char *name,
                            int64_t rows, int64_t cols, slice sl, bool optional, cp_tensor *out) {
    memset(out, 0, sizeof(*out));
    const cp_weight_info *w = find_weight(m, name);
    if (!w) {
        if (optional) return CP_OK;
        return CP_ERROR(CP_ERR_FORMAT, "model file has no tensor '%s'", name);
    }
    if (w->ne[0] != cols || w->ne[1] != rows || w->ne[2] != 1 || w->ne[3] != 1)
        return CP_ERROR(CP_ERR_FORMAT,
                        "tensor '%s' has shape [%lld, %lld, %lld, %lld] but the configuration "
                        "requires [%lld, %lld] (inner dimension first)",
                        name, (long long)w->ne[0], (long long)w->ne[1], (long long)w->ne[2],
                        (long long)w->ne[3], (long long)cols, (long long)rows);
    const cp_dtype t0 = w->dtype;
    const int64_t bs = cp_dtype_block_size(t0);
    if (sl.c0 % bs != 0 || (sl.c1 % bs != 0 && sl.c1 != cols))
        return CP_ERROR(CP_ERR_INVALID_ARG, "the parallel layout cuts a %s block of '%s' (columns %lld..%lld)",
                        cp_dtype_name(t0), name, (long long)sl.c0, (long long)sl.c1);
    const bool convert = o && o->convert && o->convert_dtype != t0;
    const cp_dtype t = convert ? o->convert_dtype : t0;
    if (!cp_backend_supports(m->be, t0) || !cp_backend_supports(m->be, t))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "tensor '%s' has type %s, which the %s backend cannot use",
                        name, cp_dtype_name(convert ? t : t0), cp_backend_name(m->be));
    const int64_t nr = sl.r1 - sl.r0, nc = sl.c1 - sl.c0;
    const size_t src_row = cp_dtype_row_size(t0, cols);
    const size_t part_off = (size_t)(sl.c0 / bs) * cp_dtype_type_size(t0);
    const size_t part_bytes = cp_dtype_row_size(t0, nc);
    cp_weight_info part = *w;
    part.ne[0] = nc;
    part.ne[1] = nr;
    part.nbytes = part_bytes * (size_t)nr;
    account(m, &part);
    *out = cp_tensor_2d(t, nr, nc, NULL);
    out->device = cp_backend_device(m->be);
    if (o && o->inspect_only) return CP_OK;
    /* a source that makes tensors on demand makes only this slice's rows */
    const bool made = !w->data && m->find_rows;
    const char *base = (const char *)w->data + (size_t)sl.r0 * src_row;
    if (made) {
        const void *p;
        CP_CHECK(m->find_rows(m->find_ctx, name, sl.r0, sl.r1, &p));
        base = p;
        const size_t held = m->stats.made_bytes + (size_t)(sl.r1 - sl.r0) * src_row;
        if (held > m->stats.made_peak_bytes) m->stats.made_peak_bytes = held;
    } else if (!w->data) {
        return CP_ERROR(CP_ERR_INTERNAL, "tensor '%s' has no data", name);
    }
    const bool row_slice = sl.c0 == 0 && sl.c1 == cols;
    if (!convert && row_slice && cp_backend_device(m->be) == CP_DEVICE_CPU &&
        (uintptr_t)base % dtype_align(t0) == 0) {
        out->data = (void *)base; /* zero-copy: only touched pages (made rows) are held */
        if (made) m->stats.made_bytes += part.nbytes;
        progress(m, o, part.nbytes);
        return CP_OK;
    }
    /* gather the slice on the host, converting when asked, then place it */
    cp_backend_t host = NULL;
    float *row = NULL;
    char *dst = NULL, *qrow = NULL;
    cp_status st = CP_OK;
    const size_t dst_row = cp_dtype_row_size(t, nc);
    dst = malloc(dst_row * (size_t)nr + 1);
    if (!dst) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory reading '%s'", name);
        goto done;
    }
    if (convert) {
        if (nc % cp_dtype_block_size(t) != 0) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "cannot convert '%s' to %s: %lld columns are not whole blocks", name,
                          cp_dtype_name(t), (long long)nc);
            goto done;
        }
        row = malloc((size_t)cols * sizeof(float));
        /* a target with one scale per row is quantized over the whole row,
         * then sliced, so every rank holds the codes one rank would */
        const bool whole_q = cp_dtype_row_extra(t) && nc != cols;
        if (row && whole_q) qrow = malloc(cp_dtype_row_size(t, cols));
        if (!row || (whole_q && !qrow)) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory converting '%s'", name);
            goto done;
        }
        CP_CHECK_GOTO(cp_backend_cpu_init(1, &host), st, done);
    }
    /* per-row scale trailers (I8_ROW, F8_ROW) go with every slice of a row */
    const size_t extra = cp_dtype_row_extra(t0);
    for (int64_t r = 0; r < nr; r++) {
        const char *src = base + (size_t)r * src_row + part_off;
        if (!convert) {
            slice_row(t0, base + (size_t)r * src_row, cols, sl.c0, nc, dst + (size_t)r * dst_row);
            continue;
        }
        /* a row with a scale trailer (or going to one) is decoded whole, then sliced */
        const bool whole = extra || qrow;
        cp_tensor one = whole ? cp_tensor_2d(t0, 1, cols, (void *)(base + (size_t)r * src_row))
                              : cp_tensor_2d(t0, 1, nc, (void *)src);
        CP_CHECK_GOTO(cp_backend_dequantize(host, &one, 0, 1, row), st, done);
        if (qrow) {
            CP_CHECK_GOTO(cp_backend_quantize(host, t, row, 1, cols, qrow), st, done);
            slice_row(t, qrow, cols, sl.c0, nc, dst + (size_t)r * dst_row);
            continue;
        }
        CP_CHECK_GOTO(cp_backend_quantize(host, t, extra ? row + sl.c0 : row, 1, nc, dst + (size_t)r * dst_row),
                      st, done);
    }
    CP_CHECK_GOTO(place(m, dst, dst_row * (size_t)nr, &out->data), st, done);
    /* the rows read for a column slice hold other ranks' columns too: let
     * their pages go so a rank's resident set stays its own share */
    if (m->gguf && !made) cp_gguf_release(m->gguf, base, (size_t)nr * src_row);
    progress(m, o, part.nbytes);
done:
    if (made) m->find_release(m->find_ctx, name); /* copied (or failed): the made rows go */
    free(row);
    free(qrow);
    free(dst);
    cp_backend_free(host);
    return st;
}

/* A vector (norm weight or bias) of n elements, converted to fp32. */
static cp_status get_vector(cp_model_t m, const cp_model_load_opts *o, const char *name, int64_t n,
                            int64_t i0, int64_t i1, bool optional, float **out) {
    *out = NULL;
    const cp_weight_info *w = find_weight(m, name);
    if (!w) {
        if (optional) return CP_OK;
        return CP_ERROR(CP_ERR_FORMAT, "model file has no tensor '%s'", name);
    }
    if (w->ne[0] != n || w->ne[1] != 1 || w->ne[2] != 1 || w->ne[3] != 1)
        return CP_ERROR(CP_ERR_FORMAT, "tensor '%s' has %lld x %lld elements but the configuration requires %lld",
                        name, (long long)w->ne[0], (long long)(w->ne[1] * w->ne[2] * w->ne[3]),
                        (long long)n);
    cp_weight_info part = *w;
    part.ne[0] = i1 - i0;
    part.nbytes = w->nbytes / (size_t)n * (size_t)(i1 - i0);
    account(m, &part);
    if (o && o->inspect_only) return CP_OK;
    float *host = NULL;
    cp_status st = CP_OK;
    const size_t es = w->nbytes / (size_t)n;
    const char *src = (const char *)w->data + (size_t)i0 * es;
    n = i1 - i0;
    if (w->dtype == CP_DTYPE_F32 && cp_backend_device(m->be) == CP_DEVICE_CPU &&
        ((uintptr_t)src % sizeof(float)) == 0) {
        *out = (float *)src;
        progress(m, o, part.nbytes);
        return CP_OK;
    }
    host = malloc((size_t)n * sizeof(float));
    if (!host) return CP_ERROR(CP_ERR_OOM, "out of memory converting '%s'", name);
    switch (w->dtype) {
    case CP_DTYPE_F32: memcpy(host, src, (size_t)n * sizeof(float)); break;
    case CP_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            cp_fp16_t h;
            memcpy(&h, src + 2 * i, 2);
            host[i] = cp_fp16_to_fp32(h);
        }
        break;
    case CP_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            cp_bf16_t h;
            memcpy(&h, src + 2 * i, 2);
            host[i] = cp_bf16_to_fp32(h);
        }
        break;
    default:
        st = CP_ERROR(CP_ERR_UNSUPPORTED, "tensor '%s' has type %s; norm weights and biases must be F32, F16 or BF16",
                      name, cp_dtype_name(w->dtype));
        goto fail;
    }
    CP_CHECK_GOTO(place(m, host, (size_t)n * sizeof(float), (void **)out), st, fail);
    progress(m, o, part.nbytes);
fail:
    free(host);
    return st;
}

/* Llama 3.1 frequency factors computed from the configuration when the file
 * does not carry them ("rope_freqs.weight"). */
static cp_status llama3_freq_factors(cp_model_t m) {
    const cp_model_config *c = &m->cfg;
    int n = c->rot_dim / 2;
    float *f = malloc((size_t)n * sizeof(float));
    if (!f) return CP_ERROR(CP_ERR_OOM, "out of memory");
    double lo_wl = c->rope_llama3_orig_ctx / c->rope_llama3_low_freq_factor;
    double hi_wl = c->rope_llama3_orig_ctx / c->rope_llama3_high_freq_factor;
    for (int i = 0; i < n; i++) {
        double freq = pow(c->rope_theta, -2.0 * i / c->rot_dim);
        double wl = 2 * 3.14159265358979323846 / freq;
        double factor;
        if (wl < hi_wl) {
            factor = 1.0;
        } else if (wl > lo_wl) {
            factor = c->rope_llama3_factor;
        } else {
            double smooth = (c->rope_llama3_orig_ctx / wl - c->rope_llama3_low_freq_factor) /
                            (c->rope_llama3_high_freq_factor - c->rope_llama3_low_freq_factor);
            /* new_freq = (1-s) freq/factor + s freq  =>  divisor = 1 / ((1-s)/factor + s) */
            factor = 1.0 / ((1 - smooth) / c->rope_llama3_factor + smooth);
        }
        f[i] = (float)factor;
    }
    cp_status st = place(m, f, (size_t)n * sizeof(float), (void **)&m->w.rope_freqs);
    free(f);
    return st;
}

/* The largest block size of the row-parallel matrices (names: attention
 * output, FFN down): tensor-parallel split points must fall on its
 * multiples. */
static int row_block(cp_model_t m, bool attn, bool ffn) {
    int rb = 1;
    char name[64];
    for (int l = 0; l < m->cfg.n_layer; l++) {
        const char *names[2] = {"attn_output.weight", "ffn_down.weight"};
        for (int k = 0; k < 2; k++) {
            if ((k == 0 && !attn) || (k == 1 && !ffn)) continue;
            snprintf(name, sizeof(name), "blk.%d.%s", l, names[k]);
            const cp_weight_info *w = find_weight(m, name);
            if (w && cp_dtype_block_size(w->dtype) > rb) rb = (int)cp_dtype_block_size(w->dtype);
        }
    }
    return rb;
}

/* A device-memory twin (cp_model_load_opts.tp_dev_comm / pp_dev_comm) must
 * hold the ranks of its host group in the same order and take the
 * backend's memory: NCCL's device buffers for a device backend, host
 * memory (any other kind) for the CPU. */
static cp_status check_dev_comm(cp_model_t m, const char *group, cp_comm_t host, cp_comm_t dev) {
    if (host && strcmp(cp_comm_kind_name(host), "nccl") == 0)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the %s-parallel communicator carries host messages and cannot be NCCL: pass an MPI "
                        "group of its ranks there and the NCCL one as its device communicator",
                        group);
    if (!dev || !host) return CP_OK; /* a group of one rank needs none */
    if (cp_comm_size(dev) != cp_comm_size(host) || cp_comm_rank(dev) != cp_comm_rank(host))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the %s-parallel device communicator (rank %d of %d) does not match its host group "
                        "(rank %d of %d): it must hold the same ranks in the same order",
                        group, cp_comm_rank(dev), cp_comm_size(dev), cp_comm_rank(host), cp_comm_size(host));
    const bool nccl = strcmp(cp_comm_kind_name(dev), "nccl") == 0;
    const bool device = cp_backend_device(m->be) != CP_DEVICE_CPU;
    if (nccl != device)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "the %s-parallel device communicator is %s, but the %s backend needs %s",
                        group, cp_comm_kind_name(dev), cp_backend_name(m->be),
                        device ? "NCCL (device buffers)" : "a host-memory communicator");
    return CP_OK;
}

static cp_status make_plan(cp_model_t m, const cp_model_load_opts *o) {
    const cp_model_config *c = &m->cfg;
    cp_plan_shape s = {c->n_layer,  c->n_head,  c->n_head_kv,           c->head_dim,
                       c->ffn_dim,  c->n_vocab, row_block(m, false, true), row_block(m, true, false)};
    cp_plan_opts po = {o->tp > 0 ? o->tp : 1, o->pp > 0 ? o->pp : 1, o->edge_layer_discount, o->cp > 0 ? o->cp : 1};
    CP_CHECK(cp_plan_init(&s, &po, o->rank, &m->plan));
    if (o->inspect_only) return CP_OK;
    if (po.cp > 1 && (!o->cp_comm || cp_comm_size(o->cp_comm) != po.cp))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp=%d needs a context-parallel communicator of %d ranks", po.cp, po.cp);
    if (po.cp > 1 && cp_backend_device(m->be) != CP_DEVICE_CPU)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "context parallelism (--cp %d) runs on the CPU backend only, not on %s",
                        po.cp, cp_backend_name(m->be));
    m->cp_comm = po.cp > 1 ? o->cp_comm : NULL;
    if ((po.tp > 1 && !o->tp_comm) || (po.pp > 1 && !o->pp_comm))
        return CP_ERROR(CP_ERR_INVALID_ARG, "tp=%d pp=%d needs the tensor- and pipeline-parallel communicators",
                        po.tp, po.pp);
    if ((o->tp_comm && cp_comm_size(o->tp_comm) != po.tp) || (o->pp_comm && cp_comm_size(o->pp_comm) != po.pp))
        return CP_ERROR(CP_ERR_INVALID_ARG, "communicator sizes do not match tp=%d pp=%d", po.tp, po.pp);
    m->tp_comm = po.tp > 1 ? o->tp_comm : NULL;
    m->sp = o->sp && po.tp > 1;
    m->pp_micro = o->pp_micro > 0 ? o->pp_micro : 4 * po.pp;
    m->cp_exchange = o->cp_exchange;
    m->cp_ring_bytes = o->cp_ring_bytes > 0 ? o->cp_ring_bytes : CP_CP_RING_BYTES_DEFAULT;
    if (m->cp_comm) {
        /* every cp rank decides each chunk's exchange alone: the inputs of
         * that decision must be the same on all of them, or some would
         * all-gather while others pass the ring */
        int64_t mine[2] = {m->cp_exchange, 0};
        memcpy(&mine[1], &m->cp_ring_bytes, sizeof(double)); /* positive: equal values have equal bits */
        bool same;
        CP_CHECK(cp_comm_same_i64(m->cp_comm, mine, 2, NULL, NULL, &same));
        if (!same)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "the context-parallel ranks were loaded with different exchange options (cp exchange "
                            "%s here, ring threshold %.0f bytes here); give every rank the same",
                            cp_cp_exchange_name(m->cp_exchange), m->cp_ring_bytes);
    }
    m->pp_comm = po.pp > 1 ? o->pp_comm : NULL;
    CP_CHECK(check_dev_comm(m, "tensor", m->tp_comm, o->tp_dev_comm));
    CP_CHECK(check_dev_comm(m, "pipeline", m->pp_comm, o->pp_dev_comm));
    m->tp_dev = m->tp_comm ? o->tp_dev_comm : NULL;
    m->pp_dev = m->pp_comm ? o->pp_dev_comm : NULL;
    return CP_OK;
}

static cp_status build(cp_model_t m, const cp_model_load_opts *o) {
    const cp_model_config *c = &m->cfg;
    const cp_plan *p = &m->plan;
    const int hd = c->head_dim;
    int64_t q_dim = (int64_t)c->n_head * hd;
    int64_t kv_dim = (int64_t)c->n_head_kv * hd;
    /* this rank's rows of Q, of K/V, of gate/up, and of the vocabulary */
    const int64_t q0 = (int64_t)p->head_begin * hd, q1 = (int64_t)p->head_end * hd;
    const int64_t k0 = (int64_t)p->kv_head_begin * hd, k1 = (int64_t)p->kv_head_end * hd;
    const int64_t f0 = p->ffn_begin, f1 = p->ffn_end;
    const int64_t v0 = p->vocab_begin, v1 = p->vocab_end;
    char name[128];

    m->n_layer_l = p->layer_end - p->layer_begin;
    m->n_head_l = p->head_end - p->head_begin;
    m->n_kv_l = p->kv_head_end - p->kv_head_begin;
    m->ffn_l = p->ffn_end - p->ffn_begin;
    m->vocab_l = p->vocab_end - p->vocab_begin;
    m->w.layers = calloc((size_t)m->n_layer_l, sizeof(cp_layer_weights));
    if (!m->w.layers) return CP_ERROR(CP_ERR_OOM, "out of memory");
    /* the embedding lives on the first stage, the LM head (often the same
     * tensor) on the last; both are split by vocabulary rows */
    if (p->first_stage || (p->last_stage && c->tied_embeddings))
        CP_CHECK(get_matrix(m, o, "token_embd.weight", c->n_vocab, c->dim, (slice){v0, v1, 0, c->dim}, false,
                            &m->w.tok_embd));
    if (p->last_stage) {
        CP_CHECK(get_vector(m, o, "output_norm.weight", c->dim, 0, c->dim, false, &m->w.out_norm));
        if (c->tied_embeddings)
            m->w.output = m->w.tok_embd;
        else
            CP_CHECK(get_matrix(m, o, "output.weight", c->n_vocab, c->dim, (slice){v0, v1, 0, c->dim}, false,
                                &m->w.output));
    }
    const cp_weight_info *rf = find_weight(m, "rope_freqs.weight");
    if (rf) {
        CP_CHECK(get_vector(m, o, "rope_freqs.weight", c->rot_dim / 2, 0, c->rot_dim / 2, false,
                            &m->w.rope_freqs));
    } else if (c->rope_llama3_factor > 0) {
        CP_CHECK(llama3_freq_factors(m));
    }
    for (int li = 0; li < m->n_layer_l; li++) {
        const int l = p->layer_begin + li;
        cp_layer_weights *L = &m->w.layers[li];
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d." s, l), name)
        CP_CHECK(get_vector(m, o, NAME("attn_norm.weight"), c->dim, 0, c->dim, false, &L->attn_norm));
        CP_CHECK(get_matrix(m, o, NAME("attn_q.weight"), q_dim, c->dim, (slice){q0, q1, 0, c->dim}, false, &L->wq));
        CP_CHECK(get_matrix(m, o, NAME("attn_k.weight"), kv_dim, c->dim, (slice){k0, k1, 0, c->dim}, false, &L->wk));
        CP_CHECK(get_matrix(m, o, NAME("attn_v.weight"), kv_dim, c->dim, (slice){k0, k1, 0, c->dim}, false, &L->wv));
        CP_CHECK(get_matrix(m, o, NAME("attn_output.weight"), c->dim, q_dim, (slice){0, c->dim, q0, q1}, false,
                            &L->wo));
        CP_CHECK(get_vector(m, o, NAME("attn_q.bias"), q_dim, q0, q1, !c->qkv_bias, &L->bq));
        CP_CHECK(get_vector(m, o, NAME("attn_k.bias"), kv_dim, k0, k1, !c->qkv_bias, &L->bk));
        CP_CHECK(get_vector(m, o, NAME("attn_v.bias"), kv_dim, k0, k1, !c->qkv_bias, &L->bv));
        CP_CHECK(get_vector(m, o, NAME("ffn_norm.weight"), c->dim, 0, c->dim, false, &L->ffn_norm));
        CP_CHECK(get_matrix(m, o, NAME("ffn_gate.weight"), c->ffn_dim, c->dim, (slice){f0, f1, 0, c->dim}, false,
                            &L->w_gate));
        CP_CHECK(get_matrix(m, o, NAME("ffn_up.weight"), c->ffn_dim, c->dim, (slice){f0, f1, 0, c->dim}, false,
                            &L->w_up));
        CP_CHECK(get_matrix(m, o, NAME("ffn_down.weight"), c->dim, c->ffn_dim, (slice){0, c->dim, f0, f1}, false,
                            &L->w_down));
#undef NAME
    }
    return CP_OK;
}

/* Scratch activations for up to max_batch tokens, allocated once. */
static cp_status alloc_scratch(cp_model_t m) {
    const cp_model_config *c = &m->cfg;
    /* sequence parallelism pads a chunk to a multiple of tp rows */
    size_t T = (size_t)m->max_batch + (size_t)m->plan.tp;
    size_t q_dim = (size_t)c->n_head * c->head_dim, kv_dim = (size_t)c->n_head_kv * c->head_dim;
    size_t wide = (size_t)c->ffn_dim > q_dim ? (size_t)c->ffn_dim : q_dim;
    size_t floats = T * c->dim            /* x: residual stream */
                    + T * c->dim          /* xb: normed input */
                    + T * q_dim           /* q */
                    + 2 * T * kv_dim      /* k, v */
                    + T * wide            /* att / gate */
                    + T * c->ffn_dim      /* up */
                    + T * c->dim          /* proj */
                    + T * c->dim;         /* xl: sequence-parallel slice */
    size_t ints = 4 * T;                  /* token ids, positions, sequences, logit rows */
    size_t bytes = floats * sizeof(float) + ints * sizeof(int32_t) + 64 * 16;
    CP_CHECK(cp_backend_alloc(m->be, bytes, &m->scratch));
    m->scratch_bytes = bytes;
    char *p = m->scratch;
#define CARVE(ptr, n) (ptr = (void *)p, p += (((n) + 15) / 16) * 64)
    CARVE(m->s.x, T * c->dim);
    CARVE(m->s.xb, T * c->dim);
    CARVE(m->s.q, T * q_dim);
    CARVE(m->s.k, T * kv_dim);
    CARVE(m->s.v, T * kv_dim);
    CARVE(m->s.att, T * wide);
    CARVE(m->s.up, T * c->ffn_dim);
    CARVE(m->s.proj, T * c->dim);
    CARVE(m->s.xl, T * c->dim);
    CARVE(m->s.tokens, T);
    CARVE(m->s.pos, T);
    CARVE(m->s.seq, T);
    CARVE(m->s.rows, T);
#undef CARVE
    CP_ASSERT((size_t)(p - (char *)m->scratch) <= bytes);
    return CP_OK;
}

static bool is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

cp_status cp_model_load(const char *path, const cp_model_load_opts *opts, cp_model_t *out) {
    *out = NULL;
    if (!opts || !opts->backend) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_model_load: no backend");
    cp_model_t m = calloc(1, sizeof(*m));
    if (!m) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st;
    m->be = opts->backend;
    m->path = strdup(path);
    if (!m->path) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    if (is_dir(path)) {
        CP_CHECK_GOTO(cp_model_open_hf(m, path), st, fail);
    } else if (!is_gguf_file(path)) {
        CP_CHECK_GOTO(cp_model_open_st_file(m, path), st, fail);
    } else {
        CP_CHECK_GOTO(cp_gguf_open(path, &m->gguf), st, fail);
        CP_CHECK_GOTO(cp_gguf_model_config(m->gguf, &m->cfg), st, fail);
        for (int64_t i = 0; i < cp_gguf_n_tensors(m->gguf); i++)
            m->total_bytes += cp_gguf_tensor(m->gguf, i)->nbytes;
    }
    CP_CHECK_GOTO(make_plan(m, opts), st, fail);
    CP_CHECK_GOTO(build(m, opts), st, fail);
    if (opts->inspect_only) {
        *out = m;
        return CP_OK;
    }
    /* a GPU keeps its matrix units busy only with long chunks */
    m->max_batch = cp_backend_device(m->be) == CP_DEVICE_CPU ? 512 : 2048;
    CP_CHECK_GOTO(alloc_scratch(m), st, fail);
    if (cp_backend_device(m->be) != CP_DEVICE_CPU || m->tp_comm)
        CP_CHECK_GOTO(cp_backend_alloc(m->be, (size_t)CP_LOGIT_CHUNK * m->cfg.n_vocab * sizeof(float),
                                       (void **)&m->logits),
                      st, fail);
    m->gather = malloc((size_t)CP_LOGIT_CHUNK * m->cfg.n_vocab * sizeof(float));
    m->full = malloc((size_t)CP_LOGIT_CHUNK * m->cfg.n_vocab * sizeof(float));
    m->ids_host = malloc((size_t)m->max_batch * sizeof(int32_t));
    if (m->tp_comm)
        m->top_pack = malloc((size_t)(1 + m->plan.tp) * CP_LOGIT_CHUNK * CP_TOP_WORDS(CP_MODEL_MAX_TOP) * sizeof(int32_t));
    if (!m->gather || !m->full || !m->ids_host || (m->tp_comm && !m->top_pack)) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    if (m->plan.tp > CP_MAX_TP) {
        st = CP_ERROR(CP_ERR_INVALID_ARG, "tp=%d exceeds %d", m->plan.tp, CP_MAX_TP);
        goto fail;
    }
    *out = m;
    return CP_OK;
fail:
    cp_model_free(m);
    return st;
}

void cp_model_free(cp_model_t m) {
    if (!m) return;
    for (int i = 0; i < m->n_owned; i++) cp_backend_dealloc(m->be, m->owned[i]);
    free(m->owned);
    cp_backend_dealloc(m->be, m->scratch);
    cp_backend_dealloc(m->be, m->tables);
    cp_backend_dealloc(m->be, m->logits);
    free(m->stage_a);
    free(m->stage_b);
    free(m->gather);
    free(m->full);
    free(m->ids_host);
    free(m->cand_v);
    free(m->cand_i);
    free(m->cand_lse);
    free(m->cand_logit);
    free(m->cand_need);
    free(m->cand_sp);
    free(m->top_pack);
    free(m->cpx.count);
    free(m->cpx.lrow);
    free(m->cpx.tok);
    free(m->cpx.pos);
    free(m->cpx.seq);
    free(m->cpx.gpos);
    free(m->cpx.gseq);
    free(m->cpx.qall);
    free(m->cpx.o);
    free(m->cpx.lse);
    free(m->cpx.lmax);
    free(m->cpx.pack);
    free(m->cpx.red);
    free(m->cpx.xg);
    free(m->cpx.runs);
    free(m->cpx.seqs);
    free(m->cpx.rseq);
    free(m->cpx.kvrow);
    free(m->cpx.kidx);
    free(m->cpx.qidx);
    free(m->cpx.kpos);
    free(m->cpx.kseq);
    free(m->cpx.share);
    free(m->cpx.kvall);
    free(m->cpx.kvfull);
    free(m->cpx.ftab);
    free(m->w.layers);
    cp_gguf_close(m->gguf);
    free(m->meta_image);
    if (m->hf_close) m->hf_close(m->find_ctx);
    free(m->path);
    free(m);
}
