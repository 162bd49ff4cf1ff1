/* model_hf.c - a Hugging Face checkpoint directory (config.json plus one or
 * more safetensors files) as the weight source of a cp_model. Tensor names
 * arrive already mapped to the GGUF convention by the safetensors reader;
 * the linears of 4-bit AWQ / GPTQ checkpoints are repacked at open into
 * cparallel's I4_G32 / I4_G128 rows (see cp_hf.h). */
#include "cp_hf.h"
#include "cp_safetensors.h"
#include "model_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const cp_weight_info *hf_find(void *ctx, const char *name) {
    return cp_safetensors_find((cp_safetensors_t)ctx, name);
}

static void hf_close(void *ctx) { cp_safetensors_close((cp_safetensors_t)ctx); }

/* Makes st (owned from here, closed by cp_model_free) m's weight source. */
static void attach(cp_model_t m, cp_safetensors_t st) {
    m->find = hf_find;
    m->find_ctx = st;
    m->hf_close = hf_close;
    for (int64_t i = 0; i < cp_safetensors_n_tensors(st); i++)
        m->total_bytes += cp_safetensors_tensor(st, i)->nbytes;
}

/* The configuration from dir/config.json. */
static cp_status hf_config(cp_model_t m, const char *dir) {
    char cfg_path[4096];
    snprintf(cfg_path, sizeof(cfg_path), "%s/config.json", dir);
    return cp_hf_config_load(cfg_path, &m->cfg);
}

/* ---- AWQ / GPTQ linears --------------------------------------------------- */

/* The tensors and geometry of one quantized linear. */
typedef struct qlin {
    const cp_hf_quant_config *qc;
    const char *prefix; /* e.g. model.layers.0.self_attn.q_proj */
    const cp_weight_info *qweight, *qzeros, *scales, *g_idx;
    int64_t in, out, groups, gs; /* gs: inputs per group (-1 resolved) */
} qlin;

/* One linear presented under its GGUF name as cparallel rows of info.dtype.
 * The rows are repacked on demand, only those a rank asks for (hfq_rows):
 * info.data stays NULL and the model loader takes them through
 * cp_model's rows/release hooks. */
typedef struct hfq_linear {
    char name[64], prefix[128];
    qlin L;
    cp_weight_info info;
    void *rows;     /* rows [r0, r1) of the linear, whole width, or NULL */
    int64_t r0, r1;
} hfq_linear;

/* The weight source of a quantized checkpoint: the repacked linears, then
 * everything else from the safetensors reader. */
typedef struct hfq_source {
    cp_safetensors_t st;
    cp_hf_quant_config qc;
    hfq_linear *lin;
    int n_lin;
    size_t held, held_max; /* bytes of repacked rows alive now, and at most */
} hfq_source;

static hfq_linear *hfq_lookup(const hfq_source *q, const char *name) {
    for (int i = 0; i < q->n_lin; i++)
        if (strcmp(q->lin[i].name, name) == 0) return &q->lin[i];
    return NULL;
}

static const cp_weight_info *hfq_find(void *ctx, const char *name) {
    const hfq_source *q = ctx;
    const hfq_linear *h = hfq_lookup(q, name);
    return h ? &h->info : cp_safetensors_find(q->st, name);
}

static void hfq_drop(hfq_source *q, hfq_linear *h) {
    if (!h->rows) return;
    q->held -= cp_dtype_row_size(h->info.dtype, h->L.in) * (size_t)(h->r1 - h->r0);
    free(h->rows);
    h->rows = NULL;
}

static void hfq_free(hfq_source *q, bool close_st) {
    if (!q) return;
    for (int i = 0; i < q->n_lin; i++)
        hfq_drop(q, &q->lin[i]);
    free(q->lin);
    if (close_st) cp_safetensors_close(q->st);
    free(q);
}

static void hfq_close(void *ctx) {
    hfq_free(ctx, true);
}

static void hfq_release(void *ctx, const char *name) {
    hfq_source *q = ctx;
    hfq_linear *h = hfq_lookup(q, name);
    if (h) hfq_drop(q, h);
}

/* Nibble of a packed int32 that holds AWQ output 8j + r (AutoAWQ packs the
 * outputs in the order 0, 2, 4, 6, 1, 3, 5, 7). */
static const int awq_nibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

/* Tensors are read through memcpy: a file need not align them. */
static inline uint32_t rd32(const void *base, size_t i) {
    uint32_t v;
    memcpy(&v, (const char *)base + 4 * i, 4);
    return v;
}
static inline uint16_t rd16(const void *base, size_t i) {
    uint16_t v;
    memcpy(&v, (const char *)base + 2 * i, 2);
    return v;
}

/* "[a, b]" of a tensor, outermost first as the file lists it. */
static void shape_str(const cp_weight_info *w, char *buf, size_t cap) {
    int o = snprintf(buf, cap, "[");
    for (int d = w->ndim - 1; d >= 0 && o > 0 && (size_t)o < cap; d--)
        o += snprintf(buf + o, cap - (size_t)o, "%lld%s", (long long)w->ne[d], d ? ", " : "");
    if (o > 0 && (size_t)o < cap) snprintf(buf + o, cap - (size_t)o, "]");
}

/* Checks that tensor <prefix>.<suffix> is 2-D with shape [rows, cols] (as
 * the file lists it) or 1-D [cols] when rows is 0, and of type t. */
static cp_status check_tensor(const qlin *L, const cp_weight_info *w, const char *suffix,
                              cp_dtype t, int64_t rows, int64_t cols) {
    const char *m = L->qc->method == CP_HF_QUANT_AWQ ? "AWQ" : "GPTQ";
    if (w->dtype != t)
        return CP_ERROR(CP_ERR_FORMAT, "%s.%s has type %s but %s checkpoints store it as %s",
                        L->prefix, suffix, cp_dtype_name(w->dtype) ? cp_dtype_name(w->dtype) : "?",
                        m, cp_dtype_name(t));
    const bool ok = rows ? (w->ndim == 2 && w->ne[1] == rows && w->ne[0] == cols)
                         : (w->ndim == 1 && w->ne[0] == cols);
    if (ok) return CP_OK;
    char have[96], want[64];
    shape_str(w, have, sizeof(have));
    if (rows)
        snprintf(want, sizeof(want), "[%lld, %lld]", (long long)rows, (long long)cols);
    else
        snprintf(want, sizeof(want), "[%lld]", (long long)cols);
    return CP_ERROR(
        CP_ERR_FORMAT,
        "%s.%s has shape %s but a %s linear of %lld inputs and %lld outputs (group size %lld) "
        "needs %s",
        L->prefix, suffix, have, m, (long long)L->in, (long long)L->out,
        (long long)L->qc->group_size, want);
}

/* Finds and checks the tensors of L (prefix, in, out and qc set). */
static cp_status qlin_open(cp_safetensors_t st, qlin *L) {
    static const char *const sfx[4] = {"qweight", "qzeros", "scales", "g_idx"};
    const cp_weight_info *w[4];
    char name[256];
    for (int k = 0; k < 4; k++) {
        snprintf(name, sizeof(name), "%s.%s", L->prefix, sfx[k]);
        w[k] = cp_safetensors_find(st, name);
        if (!w[k] && k < 3)
            return CP_ERROR(
                CP_ERR_FORMAT,
                "tensor %s is missing (a quantized linear has qweight, qzeros and scales)", name);
    }
    L->qweight = w[0];
    L->qzeros = w[1];
    L->scales = w[2];
    L->g_idx = w[3];
    const bool gptq = L->qc->method == CP_HF_QUANT_GPTQ;
    const int64_t in = L->in, out = L->out;
    L->gs = L->qc->group_size > 0 ? L->qc->group_size : in;
    L->groups = (in + L->gs - 1) / L->gs;
    /* packing 8 codes per int32 needs whole words */
    if (out % 8 != 0 || (gptq && in % 8 != 0))
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: %lld inputs and %lld outputs cannot be packed 8 per int32", L->prefix,
                        (long long)in, (long long)out);
    if (gptq)
        CP_CHECK(check_tensor(L, L->qweight, "qweight", CP_DTYPE_I32, in / 8, out));
    else
        CP_CHECK(check_tensor(L, L->qweight, "qweight", CP_DTYPE_I32, in, out / 8));
    CP_CHECK(check_tensor(L, L->qzeros, "qzeros", CP_DTYPE_I32, L->groups, out / 8));
    CP_CHECK(check_tensor(L, L->scales, "scales", CP_DTYPE_F16, L->groups, out));
    if (L->g_idx) CP_CHECK(check_tensor(L, L->g_idx, "g_idx", CP_DTYPE_I32, 0, in));
    const size_t ns = (size_t)(L->groups * out);
    for (size_t i = 0; i < ns; i++)
        if ((rd16(L->scales->data, i) & 0x7c00) == 0x7c00)
            return CP_ERROR(CP_ERR_FORMAT,
                            "%s.scales holds a value that is not finite (group %lld, output %lld)",
                            L->prefix, (long long)(i / (size_t)out), (long long)(i % (size_t)out));
    return CP_OK;
}

/* Whether every input's group is i / gs (g_idx absent or trivial), i.e. the
 * groups are contiguous runs of the row. Checks the range of g_idx. */
static cp_status groups_contiguous(const qlin *L, bool *contiguous) {
    *contiguous = true;
    if (!L->g_idx) return CP_OK;
    for (int64_t i = 0; i < L->in; i++) {
        const int32_t g = (int32_t)rd32(L->g_idx->data, (size_t)i);
        if (g < 0 || g >= L->groups)
            return CP_ERROR(CP_ERR_FORMAT, "%s.g_idx[%lld] = %d is not a group (there are %lld)",
                            L->prefix, (long long)i, g, (long long)L->groups);
        if (g != i / L->gs) *contiguous = false;
    }
    return CP_OK;
}

/* Gathers the codes of outputs o0..o0+7 as GPTQ lays out a column:
 * words[r][w] holds the codes of inputs 8w..8w+7 of output o0 + r, input
 * 8w + k in nibble k (words has 8 x (in+7)/8 entries). */
static void gather_codes(const qlin *L, int64_t o0, uint32_t *words) {
    const int64_t in = L->in, out = L->out, nw = (in + 7) / 8;
    if (L->qc->method == CP_HF_QUANT_GPTQ) {
        for (int64_t w = 0; w < nw; w++)
            for (int r = 0; r < 8; r++)
                words[r * nw + w] = rd32(L->qweight->data, (size_t)(w * out + o0 + r));
        return;
    }
    /* AWQ qweight [in][out/8]: one word holds the 8 outputs of an input */
    memset(words, 0, (size_t)(8 * nw) * sizeof(uint32_t));
    for (int64_t i = 0; i < in; i++) {
        const uint32_t v = rd32(L->qweight->data, (size_t)(i * (out / 8) + o0 / 8));
        for (int r = 0; r < 8; r++)
            words[r * nw + i / 8] |= ((v >> (4 * awq_nibble[r])) & 15u) << (4 * (i % 8));
    }
}

/* The 8 nibbles of v, one per byte (nibble k in the low half of byte k). */
static inline uint64_t spread_nibbles(uint32_t v) {
    uint64_t x = v;
    x = (x | x << 16) & 0x0000ffff0000ffffull;
    x = (x | x << 8) & 0x00ff00ff00ff00ffull;
    x = (x | x << 4) & 0x0f0f0f0f0f0f0f0full;
    return x;
}

/* Zero point and scale of output o in every group. */
static void row_params(const qlin *L, int64_t o, uint8_t *z, cp_fp16_t *d) {
    const int k = L->qc->method == CP_HF_QUANT_GPTQ ? (int)(o % 8) : awq_nibble[o % 8];
    const int add = L->qc->zero_minus_one ? 1 : 0;
    for (int64_t g = 0; g < L->groups; g++) {
        const uint32_t v = rd32(L->qzeros->data, (size_t)(g * (L->out / 8) + o / 8));
        z[g] = (uint8_t)(((v >> (4 * k)) & 15) + add);
        d[g] = rd16(L->scales->data, (size_t)(g * L->out + o));
    }
}

/* Fills rows with outputs [r0, r1) of the linear as type t: I4_G32 /
 * I4_G128 (contiguous groups that are whole blocks), F16 or F32
 * (dequantized, any g_idx; F16 only where no value can overflow it, see
 * linear_type). words: 8 x (in+7)/8 scratch. */
static void fill_rows(const qlin *L, cp_dtype t, int64_t r0, int64_t r1, uint32_t *words, uint8_t *z,
                      cp_fp16_t *d, void *rows) {
    const int64_t in = L->in, nw = (in + 7) / 8;
    const size_t row_bytes = cp_dtype_row_size(t, in);
    const int G = t == CP_DTYPE_I4_G128 ? 128 : 32;
    const size_t block_bytes = 4 + (size_t)G / 2;
    for (int64_t o0 = r0 / 8 * 8; o0 < r1; o0 += 8) {
        gather_codes(L, o0, words);
        for (int r = 0; r < 8; r++) {
            const int64_t o = o0 + r;
            if (o < r0 || o >= r1) continue;
            const uint32_t *c = words + r * nw;
            unsigned char *row = (unsigned char *)rows + (size_t)(o - r0) * row_bytes;
            row_params(L, o, z, d);
            if (t == CP_DTYPE_I4_G32 || t == CP_DTYPE_I4_G128) {
                for (int64_t b = 0; b < in / G; b++) {
                    unsigned char *blk = row + (size_t)b * block_bytes;
                    const int64_t g = b * G / L->gs;
                    memcpy(blk, &d[g], 2);
                    blk[2] = z[g];
                    blk[3] = 0;
                    /* qs[j]: element j low, j + G/2 high; 8 bytes per pair of words */
                    const uint32_t *lo = c + b * G / 8, *hi = lo + G / 16;
                    for (int j = 0; j < G / 16; j++) {
                        const uint64_t q = spread_nibbles(lo[j]) | spread_nibbles(hi[j]) << 4;
                        memcpy(blk + 4 + 8 * j, &q, 8); /* little-endian: byte k = inputs k */
                    }
                }
                continue;
            }
            for (int64_t i = 0; i < in; i++) {
                const int64_t g = L->g_idx ? (int32_t)rd32(L->g_idx->data, (size_t)i) : i / L->gs;
                const int q = (int)((c[i / 8] >> (4 * (i % 8))) & 15u);
                /* exact in fp32: a 5-bit integer times an fp16 value */
                const float v = (float)(q - (int)z[g]) * cp_fp16_to_fp32(d[g]);
                if (t == CP_DTYPE_F32) {
                    memcpy(row + 4 * i, &v, 4);
                } else {
                    const cp_fp16_t h = cp_fp32_to_fp16(v);
                    memcpy(row + 2 * i, &h, 2);
                }
            }
        }
    }
}

/* The type a linear is repacked to: I4_G128 / I4_G32 when its groups are
 * contiguous whole blocks (exact), else dequantized to F16, or to F32 when
 * a scale is large enough that a value could overflow fp16 (|q - z| <= 16). */
static cp_status linear_type(const qlin *L, cp_dtype *t) {
    bool contiguous;
    CP_CHECK(groups_contiguous(L, &contiguous));
    if (contiguous && L->gs % 128 == 0 && L->in % 128 == 0) {
        *t = CP_DTYPE_I4_G128;
    } else if (contiguous && L->gs % 32 == 0 && L->in % 32 == 0) {
        *t = CP_DTYPE_I4_G32;
    } else {
        float big = 0;
        for (size_t i = 0; i < (size_t)(L->groups * L->out); i++) {
            const float v = fabsf(cp_fp16_to_fp32(rd16(L->scales->data, i)));
            if (v > big) big = v;
        }
        *t = 16.0f * big <= 65504.0f ? CP_DTYPE_F16 : CP_DTYPE_F32;
    }
    return CP_OK;
}

/* Rows [r0, r1) of the linear called name, whole width, repacked into
 * memory the source keeps until hfq_release or its close (one range per
 * linear: a second request replaces the first). */
static cp_status hfq_rows(void *ctx, const char *name, int64_t r0, int64_t r1, const void **out) {
    hfq_source *q = ctx;
    hfq_linear *h = hfq_lookup(q, name);
    if (!h) return CP_ERROR(CP_ERR_INTERNAL, "no repacked linear '%s'", name);
    if (r0 < 0 || r1 > h->L.out || r0 >= r1)
        return CP_ERROR(CP_ERR_INVALID_ARG, "rows %lld..%lld of '%s' (%lld rows)", (long long)r0, (long long)r1,
                        name, (long long)h->L.out);
    if (h->rows && h->r0 == r0 && h->r1 == r1) {
        *out = h->rows;
        return CP_OK;
    }
    hfq_drop(q, h);
    const qlin *L = &h->L;
    const cp_dtype t = h->info.dtype;
    const size_t bytes = cp_dtype_row_size(t, L->in) * (size_t)(r1 - r0);
    uint32_t *words = malloc((size_t)((L->in + 7) / 8) * 8 * sizeof(uint32_t));
    uint8_t *z = malloc((size_t)L->groups);
    cp_fp16_t *d = malloc((size_t)L->groups * sizeof(cp_fp16_t));
    void *rows = malloc(bytes);
    cp_status st = CP_OK;
    if (!words || !z || !d || !rows) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory repacking %s (%zu bytes)", L->prefix, bytes);
        free(rows);
    } else {
        fill_rows(L, t, r0, r1, words, z, d, rows);
        h->rows = rows;
        h->r0 = r0;
        h->r1 = r1;
        q->held += bytes;
        if (q->held > q->held_max) q->held_max = q->held;
        *out = rows;
    }
    free(words);
    free(z);
    free(d);
    return st;
}

/* The linears of a layer: Hugging Face module, GGUF name. */
static const struct {
    const char *hf, *gguf;
} hfq_mods[] = {
    {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
    {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
    {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"},
};
#define HFQ_MODS ((int)(sizeof(hfq_mods) / sizeof(hfq_mods[0])))

/* Inputs and outputs of module k of a layer (k == HFQ_MODS: lm_head). */
static void mod_dims(const cp_model_config *c, int k, int64_t *in, int64_t *out) {
    const int64_t q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_head_kv * c->head_dim;
    const int64_t ins[] = {c->dim, c->dim, c->dim, q, c->dim, c->dim, c->ffn_dim, c->dim};
    const int64_t outs[] = {q, kv, kv, c->dim, c->ffn_dim, c->ffn_dim, c->dim, c->n_vocab};
    *in = ins[k];
    *out = outs[k];
}

/* Makes m's weight source a repacking of st's quantized linears. On success
 * st is owned by the new source (closed by cp_model_free); on error st is
 * untouched and m's source is unchanged. */
static cp_status attach_quant(cp_model_t m, cp_safetensors_t st, const cp_hf_quant_config *qc) {
    const cp_model_config *c = &m->cfg;
    cp_status s = CP_OK;
    hfq_source *q = calloc(1, sizeof(*q));
    const int cap = c->n_layer * HFQ_MODS + 1;
    if (q) q->lin = calloc((size_t)cap, sizeof(hfq_linear));
    if (!q || !q->lin) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    q->st = st;
    q->qc = *qc;
    size_t consumed = 0, made = 0; /* bytes of the packed tensors, of the repacked rows */
    char prefix[128], name[160];
    for (int l = 0; l <= c->n_layer; l++) {
        for (int k = 0; k < HFQ_MODS; k++) {
            const bool head = l == c->n_layer;
            if (head && k > 0) break;
            if (head)
                snprintf(prefix, sizeof(prefix), "lm_head");
            else
                snprintf(prefix, sizeof(prefix), "model.layers.%d.%s", l, hfq_mods[k].hf);
            qlin L = {.qc = qc, .prefix = prefix};
            mod_dims(c, head ? HFQ_MODS : k, &L.in, &L.out);
            snprintf(name, sizeof(name), "%s.qweight", prefix);
            const bool quant = cp_safetensors_find(st, name) != NULL;
            snprintf(name, sizeof(name), "%s.weight", prefix);
            char gguf[64];
            if (!cp_safetensors_gguf_name(name, gguf, sizeof(gguf))) {
                s = CP_ERROR(CP_ERR_INTERNAL, "no GGUF name for %s", name);
                goto fail;
            }
            const bool plain = cp_safetensors_find(st, gguf) != NULL;
            if (quant && plain) {
                s = CP_ERROR(CP_ERR_FORMAT, "%s has both weight and qweight", prefix);
                goto fail;
            }
            /* modules_to_not_convert and an unquantized lm_head load as usual */
            if (plain || (head && !quant)) continue;
            hfq_linear *dst = &q->lin[q->n_lin];
            snprintf(dst->prefix, sizeof(dst->prefix), "%s", prefix);
            snprintf(dst->name, sizeof(dst->name), "%s", gguf);
            L.qc = &q->qc;
            L.prefix = dst->prefix;
            CP_CHECK_GOTO(qlin_open(st, &L), s, fail); /* names the missing tensor */
            cp_dtype t;
            CP_CHECK_GOTO(linear_type(&L, &t), s, fail);
            dst->L = L;
            dst->info = (cp_weight_info){.name = dst->name,
                                         .dtype = t,
                                         .ndim = 2,
                                         .ne = {L.in, L.out, 1, 1},
                                         .data = NULL,
                                         .nbytes = cp_dtype_row_size(t, L.in) * (size_t)L.out};
            q->n_lin++;
            consumed += L.qweight->nbytes + L.qzeros->nbytes + L.scales->nbytes +
                        (L.g_idx ? L.g_idx->nbytes : 0);
            made += dst->info.nbytes;
        }
    }
    size_t total = 0;
    for (int64_t i = 0; i < cp_safetensors_n_tensors(st); i++)
        total += cp_safetensors_tensor(st, i)->nbytes;
    m->find = hfq_find;
    m->find_ctx = q;
    m->find_rows = hfq_rows;
    m->find_release = hfq_release;
    m->hf_close = hfq_close;
    m->total_bytes = total - consumed + made;
    return CP_OK;
fail:
    hfq_free(q, false);
    return s;
}

/* Reads dir's quantization settings and, for an AWQ / GPTQ checkpoint,
 * replaces m's plain source (st) with the repacking one. */
static cp_status hf_quant(cp_model_t m, cp_safetensors_t st, const char *dir) {
    cp_hf_quant_config qc;
    CP_CHECK(cp_hf_quant_config_load(dir, &qc));
    if (qc.method == CP_HF_QUANT_NONE) return CP_OK;
    CP_CHECK(cp_model_config_validate(&m->cfg)); /* the dimensions size the repacking */
    return attach_quant(m, st, &qc);
}

static cp_status hf_finish(cp_model_t m) {
    /* tie_word_embeddings may be absent while the file still has no lm_head */
    if (!m->cfg.tied_embeddings && !m->find(m->find_ctx, "output.weight"))
        m->cfg.tied_embeddings = true;
    return cp_model_config_validate(&m->cfg);
}

cp_status cp_model_open_hf(cp_model_t m, const char *dir) {
    CP_CHECK(hf_config(m, dir));
    cp_safetensors_t st;
    CP_CHECK(cp_safetensors_open(dir, &st));
    attach(m, st);
    CP_CHECK(hf_quant(m, st, dir));
    return hf_finish(m);
}

/* RFC 4648 base64 (padding required, no line breaks); *len gets the bytes. */
static cp_status base64_decode(const char *in, unsigned char **out, size_t *len) {
    static signed char val[256];
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    memset(val, -1, sizeof(val));
    for (int i = 0; i < 64; i++) val[(unsigned char)alphabet[i]] = (signed char)i;
    const size_t n = strlen(in);
    if (n % 4 != 0) return CP_ERROR(CP_ERR_FORMAT, "metadata 'cparallel.gguf' is not base64 (length %zu)", n);
    unsigned char *b = malloc(n / 4 * 3 + 1);
    if (!b) return CP_ERROR(CP_ERR_OOM, "out of memory decoding the model metadata");
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            const unsigned char c = (unsigned char)in[i + k];
            if (c == '=' && i + 4 == n && k >= 2) {
                v[k] = 0;
                pad++;
            } else if (val[c] < 0 || pad) {
                free(b);
                return CP_ERROR(CP_ERR_FORMAT, "metadata 'cparallel.gguf' is not base64 (at byte %zu)", i + k);
            } else {
                v[k] = val[c];
            }
        }
        const uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        b[o++] = (unsigned char)(w >> 16);
        if (pad < 2) b[o++] = (unsigned char)(w >> 8);
        if (pad < 1) b[o++] = (unsigned char)w;
    }
    *out = b;
    *len = o;
    return CP_OK;
}

cp_status cp_model_open_st_file(cp_model_t m, const char *path) {
    cp_safetensors_t st;
    CP_CHECK(cp_safetensors_open(path, &st));
    attach(m, st);
    const char *b64 = cp_safetensors_get_meta(st, "cparallel.gguf");
    if (b64) {
        unsigned char *img = NULL;
        size_t len = 0;
        CP_CHECK(base64_decode(b64, &img, &len));
        m->meta_image = img;
        cp_status s = cp_gguf_open_memory(img, len, &m->gguf);
        if (s != CP_OK)
            return CP_ERROR(s, "%s: the embedded model metadata is invalid: %s", path, cp_last_error());
        /* validates, and ties the embeddings exactly when there is no output.weight */
        return cp_gguf_model_config_with(m->gguf, hf_find, st, &m->cfg);
    }
    CP_CHECK(hf_config(m, cp_safetensors_dir(st)));
    CP_CHECK(hf_quant(m, st, cp_safetensors_dir(st)));
    return hf_finish(m);
}
