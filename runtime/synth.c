/* synth.c - random-weight Hugging Face Llama checkpoints of real shapes for
 * benchmarks: a thread pool fills fixed-size chunks of each tensor from
 * per-chunk seeded generators (so the bytes never depend on the thread
 * count) while the calling thread streams the previous block to disk. */
#include "cp_synth.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* Elements per generator chunk: the unit of work and of seeding. Changing it
 * changes the bytes written for a seed. */
#define SYN_CHUNK ((int64_t)1 << 20)
/* Bytes generated while the previous block is written; two are in flight. */
#define SYN_BLOCK_BYTES ((uint64_t)128 << 20)
#define SYN_DEFAULT_SHARD ((uint64_t)5000000000ull)
#define SYN_NAME_MAX 96
/* config.json, index and headers: a generous allowance for the space check */
#define SYN_META_SLACK(total) (((uint64_t)1 << 20) + (total) / 1000)

/* clang-format off */
static const cp_synth_arch presets[] = {
    /* name          dim  layers heads kv  ffn    vocab   ctx   theta     eps   bos     eos */
    {"llama3-8b",   4096, 32,    32,   8,  14336, 128256, 8192, 500000.0, 1e-5, 128000, 128001},
    {"llama2-7b",   4096, 32,    32,   32, 11008, 32000,  4096, 10000.0,  1e-5, 1,      2},
    {"llama2-70b",  8192, 80,    64,   8,  28672, 32000,  4096, 10000.0,  1e-5, 1,      2},
    {"tiny",        256,  4,     8,    4,  704,   1024,   2048, 10000.0,  1e-5, 1,      2},
};
static const char *const preset_names[] = {"llama3-8b", "llama2-7b", "llama2-70b", "tiny", NULL};
/* clang-format on */

const char *const *cp_synth_preset_names(void) {
    return preset_names;
}

cp_status cp_synth_preset(const char *name, cp_synth_arch *out) {
    if (!name || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_synth_preset: NULL argument");
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
        if (strcmp(presets[i].name, name) == 0) {
            *out = presets[i];
            return CP_OK;
        }
    return CP_ERROR(CP_ERR_INVALID_ARG,
                    "unknown architecture '%s' (known: llama3-8b, llama2-7b, llama2-70b, tiny)",
                    name);
}

void cp_synth_opts_init(cp_synth_opts *o) {
    if (!o) return;
    memset(o, 0, sizeof(*o));
    o->dtype = CP_DTYPE_BF16;
}

/* ---- random numbers --------------------------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t splitmix64(uint64_t *x) {
    return mix64(*x += 0x9e3779b97f4a7c15ull);
}

static uint64_t fnv1a(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* SYN_LANES independent xoshiro256** streams stepped together: the lanes
 * have no dependency on each other, so the loop below pipelines (and
 * vectorises where the target allows) instead of waiting on one state. */
#define SYN_LANES 8
typedef struct xo_lanes {
    uint64_t s0[SYN_LANES], s1[SYN_LANES], s2[SYN_LANES], s3[SYN_LANES];
} xo_lanes;

static void xo_seed(xo_lanes *r, uint64_t key) {
    for (int l = 0; l < SYN_LANES; l++) {
        r->s0[l] = splitmix64(&key);
        r->s1[l] = splitmix64(&key);
        r->s2[l] = splitmix64(&key);
        r->s3[l] = splitmix64(&key);
    }
}

/* n (a multiple of SYN_LANES) standard-ish normal values, unscaled: each the
 * sum of the four 16-bit fields of one draw, centred. Multiplying by
 * sqrt(3) / 2^16 gives mean 0, variance 1 (Irwin-Hall with four terms). */
static void xo_fill(xo_lanes *restrict r, float *restrict z, int64_t n) {
    uint64_t s0[SYN_LANES], s1[SYN_LANES], s2[SYN_LANES], s3[SYN_LANES];
    memcpy(s0, r->s0, sizeof(s0));
    memcpy(s1, r->s1, sizeof(s1));
    memcpy(s2, r->s2, sizeof(s2));
    memcpy(s3, r->s3, sizeof(s3));
    for (int64_t i = 0; i < n; i += SYN_LANES) {
        for (int l = 0; l < SYN_LANES; l++) {
            /* s1 * 5 and * 9 as shifts and adds: they vectorise, 64-bit products do not */
            uint64_t x = s1[l] + (s1[l] << 2);
            x = (x << 7) | (x >> 57);
            x += x << 3;
            uint64_t t = s1[l] << 17;
            s2[l] ^= s0[l];
            s3[l] ^= s1[l];
            s1[l] ^= s2[l];
            s0[l] ^= s3[l];
            s2[l] ^= t;
            s3[l] = (s3[l] << 45) | (s3[l] >> 19);
            /* < 2^18, so the int32 conversion (vectorisable) is exact */
            int32_t sum =
                (int32_t)((x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48));
            z[i + l] = (float)(sum - 131070);
        }
    }
    memcpy(r->s0, s0, sizeof(s0));
    memcpy(r->s1, s1, sizeof(s1));
    memcpy(r->s2, s2, sizeof(s2));
    memcpy(r->s3, s3, sizeof(s3));
}

/* ---- the plan: tensors, shards, chunks ------------------------------------- */

typedef struct syn_tensor {
    char name[SYN_NAME_MAX];
    int64_t rows, cols; /* shape [rows][cols]; a norm is [cols] with rows = 1 */
    bool is_norm;
    uint64_t key; /* seeds this tensor's generators (name and seed only) */
    uint64_t nbytes;
    int shard;
    uint64_t offset; /* in the shard's data region */
} syn_tensor;

typedef struct syn_chunk {
    int tensor;
    int64_t index;        /* chunk number within the tensor */
    int64_t start, count; /* elements */
    uint64_t buf_off;     /* byte offset in its block's buffer */
} syn_chunk;

typedef struct syn_block {
    int shard;
    int first, n; /* chunks */
    uint64_t bytes;
} syn_block;

typedef struct syn_plan {
    cp_synth_arch arch;
    cp_dtype dtype;
    size_t esize;
    const char *st_name; /* "BF16", "F16", "F32" */
    syn_tensor *tensors;
    int n_tensors;
    int n_shards;
    uint64_t *shard_bytes; /* [n_shards] data bytes */
    syn_chunk *chunks;
    int64_t n_chunks;
    syn_block *blocks;
    int64_t n_blocks;
    uint64_t total;
} syn_plan;

static void plan_free(syn_plan *p) {
    free(p->tensors);
    free(p->shard_bytes);
    free(p->chunks);
    free(p->blocks);
    memset(p, 0, sizeof(*p));
}

static cp_status check_arch(const cp_synth_arch *a) {
    if (a->dim <= 0 || a->n_layers <= 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 ||
        a->ffn_dim <= 0 || a->vocab <= 0 || a->ctx <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "architecture '%s': every dimension must be positive",
                        a->name);
    if (a->dim % a->n_heads || (a->dim / a->n_heads) % 2)
        return CP_ERROR(
            CP_ERR_INVALID_ARG,
            "architecture '%s': hidden size %d must be a multiple of %d heads with an even "
            "head dimension",
            a->name, a->dim, a->n_heads);
    if (a->n_heads % a->n_kv_heads)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "architecture '%s': %d heads is not a multiple of %d KV heads", a->name,
                        a->n_heads, a->n_kv_heads);
    if (!(a->rope_theta > 0) || !(a->rms_eps > 0) || !isfinite(a->rope_theta) ||
        !isfinite(a->rms_eps))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "architecture '%s': rope_theta and rms_eps must be positive", a->name);
    /* keeps every byte count far from overflowing 64 bits */
    if ((int64_t)a->vocab * a->dim > ((int64_t)1 << 50) ||
        (int64_t)a->ffn_dim * a->dim > ((int64_t)1 << 50))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "architecture '%s': a tensor of more than 2^50 elements", a->name);
    if (a->n_layers > 100000)
        return CP_ERROR(CP_ERR_INVALID_ARG, "architecture '%s': %d layers is too many", a->name,
                        a->n_layers);
    return CP_OK;
}

/* Resolves the options to an architecture and dtype (no allocation). */
static cp_status resolve(const cp_synth_opts *o, cp_synth_arch *a, size_t *esize,
                         const char **st_name) {
    if (!o) return CP_ERROR(CP_ERR_INVALID_ARG, "synth: no options");
    if (o->custom) {
        *a = *o->custom;
        if (!a->name[0]) snprintf(a->name, sizeof(a->name), "custom");
    } else {
        if (!o->arch || !o->arch[0])
            return CP_ERROR(
                CP_ERR_INVALID_ARG,
                "no architecture given (known: llama3-8b, llama2-7b, llama2-70b, tiny)");
        CP_CHECK(cp_synth_preset(o->arch, a));
    }
    if (o->n_layers > 0) a->n_layers = o->n_layers;
    CP_CHECK(check_arch(a));
    switch (o->dtype) {
    case CP_DTYPE_BF16:
        *esize = 2;
        *st_name = "BF16";
        break;
    case CP_DTYPE_F16:
        *esize = 2;
        *st_name = "F16";
        break;
    case CP_DTYPE_F32:
        *esize = 4;
        *st_name = "F32";
        break;
    default:
        return CP_ERROR(CP_ERR_INVALID_ARG, "synth: dtype %s is not one of BF16, F16, F32",
                        cp_dtype_name(o->dtype) ? cp_dtype_name(o->dtype) : "(unknown)");
    }
    return CP_OK;
}

static void add_tensor(syn_plan *p, uint64_t seed_key, const char *name, int64_t rows, int64_t cols,
                       bool is_norm) {
    syn_tensor *t = &p->tensors[p->n_tensors++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->rows = rows;
    t->cols = cols;
    t->is_norm = is_norm;
    t->key = mix64(seed_key ^ fnv1a(name));
    t->nbytes = (uint64_t)(rows * cols) * p->esize;
}

static cp_status plan_build(const cp_synth_opts *o, syn_plan *p) {
    memset(p, 0, sizeof(*p));
    CP_CHECK(resolve(o, &p->arch, &p->esize, &p->st_name));
    p->dtype = o->dtype;
    const cp_synth_arch *a = &p->arch;
    int64_t hd = a->dim / a->n_heads;
    int64_t dim = a->dim, q = hd * a->n_heads, kv = hd * a->n_kv_heads, ff = a->ffn_dim;
    int max_tensors = 9 * a->n_layers + 3;
    cp_status st = CP_OK;
    p->tensors = calloc((size_t)max_tensors, sizeof(*p->tensors));
    if (!p->tensors) {
        st = CP_ERROR(CP_ERR_OOM, "synth: out of memory planning %d tensors", max_tensors);
        goto fail;
    }
    uint64_t sk = mix64(o->seed ^ 0x5eed5eed5eed5eedull);
    char nm[SYN_NAME_MAX];
    add_tensor(p, sk, "model.embed_tokens.weight", a->vocab, dim, false);
    for (int l = 0; l < a->n_layers; l++) {
#define LT(suffix, r, c, norm)                                                                     \
    do {                                                                                           \
        snprintf(nm, sizeof(nm), "model.layers.%d.%s", l, suffix);                                 \
        add_tensor(p, sk, nm, r, c, norm);                                                         \
    } while (0)
        LT("input_layernorm.weight", 1, dim, true);
        LT("self_attn.q_proj.weight", q, dim, false);
        LT("self_attn.k_proj.weight", kv, dim, false);
        LT("self_attn.v_proj.weight", kv, dim, false);
        LT("self_attn.o_proj.weight", dim, q, false);
        LT("post_attention_layernorm.weight", 1, dim, true);
        LT("mlp.gate_proj.weight", ff, dim, false);
        LT("mlp.up_proj.weight", ff, dim, false);
        LT("mlp.down_proj.weight", dim, ff, false);
#undef LT
    }
    add_tensor(p, sk, "model.norm.weight", 1, dim, true);
    add_tensor(p, sk, "lm_head.weight", a->vocab, dim, false);

    /* shards: tensors in order, a new shard when the next would overflow */
    uint64_t max_shard = o->max_shard_bytes ? o->max_shard_bytes : SYN_DEFAULT_SHARD;
    p->shard_bytes = calloc((size_t)p->n_tensors, sizeof(*p->shard_bytes));
    if (!p->shard_bytes) {
        st = CP_ERROR(CP_ERR_OOM, "synth: out of memory planning shards");
        goto fail;
    }
    int sh = 0;
    for (int i = 0; i < p->n_tensors; i++) {
        syn_tensor *t = &p->tensors[i];
        if (p->shard_bytes[sh] > 0 && p->shard_bytes[sh] + t->nbytes > max_shard) sh++;
        t->shard = sh;
        t->offset = p->shard_bytes[sh];
        p->shard_bytes[sh] += t->nbytes;
        p->total += t->nbytes;
    }
    p->n_shards = sh + 1;
    if (p->n_shards > 99999) {
        st = CP_ERROR(CP_ERR_INVALID_ARG,
                      "synth: %d shards exceed the 99999 the file names allow; raise the "
                      "shard size",
                      p->n_shards);
        goto fail;
    }
    return CP_OK;
fail:
    plan_free(p);
    return st;
}

/* The generator chunks, grouped into blocks of at most SYN_BLOCK_BYTES within
 * a shard (separate from plan_build so that sizing needs no memory per chunk). */
static cp_status plan_chunks(syn_plan *p) {
    int64_t n_chunks = 0;
    for (int i = 0; i < p->n_tensors; i++)
        n_chunks += (p->tensors[i].rows * p->tensors[i].cols + SYN_CHUNK - 1) / SYN_CHUNK;
    p->chunks = calloc((size_t)n_chunks, sizeof(*p->chunks));
    p->blocks = calloc((size_t)n_chunks, sizeof(*p->blocks));
    if (!p->chunks || !p->blocks)
        return CP_ERROR(CP_ERR_OOM, "synth: out of memory planning %lld chunks",
                        (long long)n_chunks);
    syn_block *cur = NULL;
    for (int i = 0; i < p->n_tensors; i++) {
        const syn_tensor *t = &p->tensors[i];
        int64_t n = t->rows * t->cols;
        for (int64_t c = 0; c * SYN_CHUNK < n; c++) {
            syn_chunk *ch = &p->chunks[p->n_chunks];
            ch->tensor = i;
            ch->index = c;
            ch->start = c * SYN_CHUNK;
            ch->count = n - ch->start < SYN_CHUNK ? n - ch->start : SYN_CHUNK;
            uint64_t bytes = (uint64_t)ch->count * p->esize;
            if (!cur || cur->shard != t->shard || cur->bytes + bytes > SYN_BLOCK_BYTES) {
                cur = &p->blocks[p->n_blocks++];
                cur->shard = t->shard;
                cur->first = (int)p->n_chunks;
            }
            ch->buf_off = cur->bytes;
            cur->bytes += bytes;
            cur->n++;
            p->n_chunks++;
        }
    }
    return CP_OK;
}

cp_status cp_synth_plan(const cp_synth_opts *o, cp_synth_arch *arch, uint64_t *weight_bytes) {
    syn_plan p;
    CP_CHECK(plan_build(o, &p));
    if (arch) *arch = p.arch;
    if (weight_bytes) *weight_bytes = p.total;
    plan_free(&p);
    return CP_OK;
}

/* ---- generation ------------------------------------------------------------- */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; values here are finite */
    return (uint16_t)(u >> 16);
}

/* Values generated per pass before scaling and conversion (fits L1). */
#define SYN_ZBUF 2048

/* 0.02 x the scale of row `row` x the normal-approximation unit. */
static float row_scale(const syn_tensor *t, int64_t row, float unit, float renorm) {
    double u =
        (double)(mix64(t->key ^ mix64((uint64_t)row + 0x9e3779b97f4a7c15ull)) >> 11) * 0x1p-53;
    return 0.02f * (float)(0.8 + 0.4 * u) * renorm * unit;
}

/* Fills one chunk. Matrices: every row r gets the scale s_r = (0.8 + 0.4 u_r)
 * / sqrt(1 + 0.16/12) (u_r uniform, so E[s_r^2] = 1), and each element is
 * 0.02 s_r z with z the standardised sum of four 16-bit uniforms (Irwin-Hall:
 * mean 0, variance 1, within +-3.46; close enough to normal for timing and
 * cheap: one 64-bit draw per value). */
static void fill_chunk(const syn_plan *p, const syn_chunk *ch, uint8_t *dst) {
    const syn_tensor *t = &p->tensors[ch->tensor];
    if (t->is_norm) {
        for (int64_t i = 0; i < ch->count; i++) {
            if (p->dtype == CP_DTYPE_F32) {
                const float one = 1.0f;
                memcpy(dst + 4 * i, &one, 4);
            } else {
                uint16_t h = p->dtype == CP_DTYPE_BF16 ? 0x3f80u : 0x3c00u;
                memcpy(dst + 2 * i, &h, 2);
            }
        }
        return;
    }
    xo_lanes r;
    xo_seed(&r, t->key + (uint64_t)(ch->index + 1) * 0xd1b54a32d192ed03ull);
    const float unit = (float)(1.7320508075688772 / 65536.0); /* sqrt(3) / 2^16 */
    const float renorm = (float)(1.0 / sqrt(1.0 + 0.16 / 12.0));
    float z[SYN_ZBUF];
    int64_t row = ch->start / t->cols, col = ch->start % t->cols;
    float k = 0;
    for (int64_t done = 0; done < ch->count;) {
        int64_t n = ch->count - done < SYN_ZBUF ? ch->count - done : SYN_ZBUF;
        xo_fill(&r, z, (n + SYN_LANES - 1) / SYN_LANES * SYN_LANES);
        for (int64_t i = 0; i < n;) {
            if (col == 0 || i == 0) k = row_scale(t, row, unit, renorm);
            int64_t seg = t->cols - col < n - i ? t->cols - col : n - i;
            uint8_t *out = dst + (size_t)(done + i) * p->esize;
            const float *zi = z + i;
            switch (p->dtype) {
            case CP_DTYPE_BF16:
                for (int64_t j = 0; j < seg; j++) {
                    uint16_t h = to_bf16(zi[j] * k);
                    memcpy(out + 2 * j, &h, 2);
                }
                break;
            case CP_DTYPE_F16:
                for (int64_t j = 0; j < seg; j++) {
                    uint16_t h = cp_fp32_to_fp16(zi[j] * k);
                    memcpy(out + 2 * j, &h, 2);
                }
                break;
            default:
                for (int64_t j = 0; j < seg; j++) {
                    float v = zi[j] * k;
                    memcpy(out + 4 * j, &v, 4);
                }
                break;
            }
            i += seg;
            col += seg;
            if (col == t->cols) {
                col = 0;
                row++;
            }
        }
        done += n;
    }
}

/* A pool that fills one block at a time; workers take chunks in any order,
 * each chunk's bytes depend only on the chunk. */
typedef struct syn_pool {
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    pthread_t *threads;
    int n_threads;
    unsigned gen; /* bumped for each block */
    bool quit;
    const syn_plan *plan;
    const syn_block *block;
    uint8_t *buf;
    int next;    /* next chunk of the block to take */
    int pending; /* workers that have not finished the current block */
} syn_pool;

static void *pool_worker(void *arg) {
    syn_pool *pl = arg;
    unsigned seen = 0;
    pthread_mutex_lock(&pl->mu);
    for (;;) {
        while (!pl->quit && pl->gen == seen)
            pthread_cond_wait(&pl->go, &pl->mu);
        if (pl->quit) break;
        seen = pl->gen;
        while (pl->next < pl->block->n) {
            const syn_chunk *ch = &pl->plan->chunks[pl->block->first + pl->next++];
            uint8_t *dst = pl->buf + ch->buf_off;
            pthread_mutex_unlock(&pl->mu);
            fill_chunk(pl->plan, ch, dst);
            pthread_mutex_lock(&pl->mu);
        }
        if (--pl->pending == 0) pthread_cond_signal(&pl->done);
    }
    pthread_mutex_unlock(&pl->mu);
    return NULL;
}

static void pool_start(syn_pool *pl, const syn_block *b, uint8_t *buf) {
    pthread_mutex_lock(&pl->mu);
    pl->block = b;
    pl->buf = buf;
    pl->next = 0;
    pl->pending = pl->n_threads;
    pl->gen++;
    pthread_cond_broadcast(&pl->go);
    pthread_mutex_unlock(&pl->mu);
}

static void pool_wait(syn_pool *pl) {
    pthread_mutex_lock(&pl->mu);
    while (pl->pending > 0)
        pthread_cond_wait(&pl->done, &pl->mu);
    pthread_mutex_unlock(&pl->mu);
}

static void pool_free(syn_pool *pl) {
    if (!pl->threads) return;
    pthread_mutex_lock(&pl->mu);
    pl->quit = true;
    pthread_cond_broadcast(&pl->go);
    pthread_mutex_unlock(&pl->mu);
    for (int i = 0; i < pl->n_threads; i++)
        pthread_join(pl->threads[i], NULL);
    free(pl->threads);
    pthread_cond_destroy(&pl->go);
    pthread_cond_destroy(&pl->done);
    pthread_mutex_destroy(&pl->mu);
    pl->threads = NULL;
}

static cp_status pool_init(syn_pool *pl, const syn_plan *p, int n_threads) {
    memset(pl, 0, sizeof(*pl));
    pl->plan = p;
    pl->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!pl->threads)
        return CP_ERROR(CP_ERR_OOM, "synth: out of memory starting %d threads", n_threads);
    pthread_mutex_init(&pl->mu, NULL);
    pthread_cond_init(&pl->go, NULL);
    pthread_cond_init(&pl->done, NULL);
    for (int i = 0; i < n_threads; i++) {
        if (pthread_create(&pl->threads[i], NULL, pool_worker, pl) != 0) {
            pl->n_threads = i;
            pool_free(pl);
            return CP_ERROR(CP_ERR_INTERNAL, "synth: cannot start thread %d of %d", i + 1,
                            n_threads);
        }
        pl->n_threads = i + 1;
    }
    return CP_OK;
}

/* ---- text building ---------------------------------------------------------- */

typedef struct sbuf {
    char *s;
    size_t len, cap;
    bool oom;
} sbuf;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
sb_printf(sbuf *b, const char *fmt, ...) {
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 4096;
        while (cap <= b->len + (size_t)n)
            cap *= 2;
        char *ns = realloc(b->s, cap);
        if (!ns) {
            b->oom = true;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
}

static void shard_name(const syn_plan *p, int sh, char *buf, size_t cap) {
    if (p->n_shards == 1)
        snprintf(buf, cap, "model.safetensors");
    else
        snprintf(buf, cap, "model-%05d-of-%05d.safetensors", sh + 1, p->n_shards);
}

/* The header of shard sh: 8-byte length, JSON padded with spaces so that the
 * data region starts 8-byte aligned. */
static cp_status shard_header(const syn_plan *p, int sh, sbuf *out) {
    sbuf j = {0};
    sb_printf(&j, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < p->n_tensors; i++) {
        const syn_tensor *t = &p->tensors[i];
        if (t->shard != sh) continue;
        if (t->is_norm)
            sb_printf(&j,
                      ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld],\"data_offsets\":[%llu,%llu]}",
                      t->name, p->st_name, (long long)t->cols, (unsigned long long)t->offset,
                      (unsigned long long)(t->offset + t->nbytes));
        else
            sb_printf(
                &j, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%llu,%llu]}",
                t->name, p->st_name, (long long)t->rows, (long long)t->cols,
                (unsigned long long)t->offset, (unsigned long long)(t->offset + t->nbytes));
    }
    sb_printf(&j, "}");
    while (!j.oom && (8 + j.len) % 8)
        sb_printf(&j, " ");
    if (j.oom) {
        free(j.s);
        return CP_ERROR(CP_ERR_OOM, "synth: out of memory building a header");
    }
    memset(out, 0, sizeof(*out));
    uint64_t n = j.len;
    char len8[9];
    for (int i = 0; i < 8; i++)
        len8[i] = (char)(n >> (8 * i));
    len8[8] = 0;
    /* the length bytes may contain NULs: append them by hand */
    out->s = malloc(8 + j.len + 1);
    if (!out->s) {
        free(j.s);
        return CP_ERROR(CP_ERR_OOM, "synth: out of memory building a header");
    }
    memcpy(out->s, len8, 8);
    memcpy(out->s + 8, j.s, j.len);
    out->len = 8 + j.len;
    out->cap = out->len + 1;
    free(j.s);
    return CP_OK;
}

/* The shortest %g form that reads back as v (1e-05, not 1.0000000000000001e-05). */
static void fmt_double(double v, char *buf, size_t cap) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

static void config_json(const syn_plan *p, sbuf *b) {
    const cp_synth_arch *a = &p->arch;
    const char *tdt = p->dtype == CP_DTYPE_BF16  ? "bfloat16"
                      : p->dtype == CP_DTYPE_F16 ? "float16"
                                                 : "float32";
    sb_printf(b, "{\n");
    sb_printf(b, "  \"_name_or_path\": \"cparallel-synth/%s-%dL\",\n", a->name, a->n_layers);
    sb_printf(b, "  \"architectures\": [\"LlamaForCausalLM\"],\n");
    sb_printf(b, "  \"attention_bias\": false,\n");
    sb_printf(b, "  \"attention_dropout\": 0.0,\n");
    sb_printf(b, "  \"bos_token_id\": %d,\n", a->bos_id);
    sb_printf(b, "  \"eos_token_id\": %d,\n", a->eos_id);
    sb_printf(b, "  \"head_dim\": %d,\n", a->dim / a->n_heads);
    sb_printf(b, "  \"hidden_act\": \"silu\",\n");
    sb_printf(b, "  \"hidden_size\": %d,\n", a->dim);
    sb_printf(b, "  \"initializer_range\": 0.02,\n");
    sb_printf(b, "  \"intermediate_size\": %d,\n", a->ffn_dim);
    sb_printf(b, "  \"max_position_embeddings\": %d,\n", a->ctx);
    sb_printf(b, "  \"mlp_bias\": false,\n");
    sb_printf(b, "  \"model_type\": \"llama\",\n");
    sb_printf(b, "  \"num_attention_heads\": %d,\n", a->n_heads);
    sb_printf(b, "  \"num_hidden_layers\": %d,\n", a->n_layers);
    sb_printf(b, "  \"num_key_value_heads\": %d,\n", a->n_kv_heads);
    sb_printf(b, "  \"pretraining_tp\": 1,\n");
    char eps[32];
    fmt_double(a->rms_eps, eps, sizeof(eps));
    sb_printf(b, "  \"rms_norm_eps\": %s,\n", eps);
    sb_printf(b, "  \"rope_scaling\": null,\n");
    sb_printf(b, "  \"rope_theta\": %.1f,\n", a->rope_theta);
    sb_printf(b, "  \"tie_word_embeddings\": false,\n");
    sb_printf(b, "  \"torch_dtype\": \"%s\",\n", tdt);
    sb_printf(b, "  \"use_cache\": true,\n");
    sb_printf(b, "  \"vocab_size\": %d\n", a->vocab);
    sb_printf(b, "}\n");
}

static void index_json(const syn_plan *p, sbuf *b) {
    char nm[64];
    sb_printf(b, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
              (unsigned long long)p->total);
    for (int i = 0; i < p->n_tensors; i++) {
        shard_name(p, p->tensors[i].shard, nm, sizeof(nm));
        sb_printf(b, "    \"%s\": \"%s\"%s\n", p->tensors[i].name, nm,
                  i + 1 < p->n_tensors ? "," : "");
    }
    sb_printf(b, "  }\n}\n");
}

/* ---- files ------------------------------------------------------------------ */

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static cp_status write_all(int fd, const void *data, size_t n, const char *path) {
    const uint8_t *d = data;
    while (n > 0) {
        size_t step = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, d, step);
        if (w < 0) {
            if (errno == EINTR) continue;
            return CP_ERROR(CP_ERR_IO, "cannot write %s: %s", path, strerror(errno));
        }
        d += w;
        n -= (size_t)w;
    }
    return CP_OK;
}

/* Writes a small file through "<path>.tmp" and a rename. */
static cp_status write_small(const char *dir, const char *name, const sbuf *b) {
    if (b->oom) return CP_ERROR(CP_ERR_OOM, "synth: out of memory building %s", name);
    char *path = path_join(dir, name);
    char *tmp = path ? malloc(strlen(path) + 5) : NULL;
    cp_status st = CP_OK;
    if (!path || !tmp) {
        st = CP_ERROR(CP_ERR_OOM, "synth: out of memory");
        goto out;
    }
    snprintf(tmp, strlen(path) + 5, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        st = CP_ERROR(CP_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        goto out;
    }
    st = write_all(fd, b->s, b->len, tmp);
    if (st == CP_OK && fsync(fd) != 0)
        st = CP_ERROR(CP_ERR_IO, "cannot flush %s: %s", tmp, strerror(errno));
    if (close(fd) != 0 && st == CP_OK)
        st = CP_ERROR(CP_ERR_IO, "cannot close %s: %s", tmp, strerror(errno));
    if (st == CP_OK && rename(tmp, path) != 0)
        st = CP_ERROR(CP_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st != CP_OK) unlink(tmp);
out:
    free(path);
    free(tmp);
    return st;
}

/* mkdir -p */
static cp_status make_dirs(const char *dir) {
    size_t n = strlen(dir);
    char *p = malloc(n + 1);
    if (!p) return CP_ERROR(CP_ERR_OOM, "synth: out of memory");
    memcpy(p, dir, n + 1);
    cp_status st = CP_OK;
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "cannot create the output directory %s: %s", p,
                          strerror(errno));
            break;
        }
        p[i] = c;
    }
    free(p);
    if (st != CP_OK) return st;
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return CP_ERROR(CP_ERR_INVALID_ARG, "the output path %s exists but is not a directory",
                        dir);
    if (access(dir, W_OK | X_OK) != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "the output directory %s is not writable: %s", dir,
                        strerror(errno));
    return CP_OK;
}

/* A weight file name that a checkpoint written now could be shadowed by. */
static bool is_weight_file(const char *n) {
    if (!strcmp(n, "model.safetensors") || !strcmp(n, "model.safetensors.index.json")) return true;
    unsigned a, b;
    char tail[32];
    /* model-NNNNN-of-NNNNN.safetensors */
    return strlen(n) == strlen("model-00001-of-00001.safetensors") &&
           sscanf(n, "model-%5u-of-%5u%31s", &a, &b, tail) == 3 && !strcmp(tail, ".safetensors");
}

/* Sums (remove = false) or removes (remove = true) the weight files of dir. */
static cp_status old_weights(const char *dir, bool remove, uint64_t *bytes) {
    DIR *d = opendir(dir);
    if (!d)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cannot list the output directory %s: %s", dir,
                        strerror(errno));
    cp_status st = CP_OK;
    struct dirent *e;
    if (bytes) *bytes = 0;
    while ((e = readdir(d)) != NULL) {
        if (!is_weight_file(e->d_name)) continue;
        char *p = path_join(dir, e->d_name);
        if (!p) {
            st = CP_ERROR(CP_ERR_OOM, "synth: out of memory");
            break;
        }
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISREG(sb.st_mode)) {
            if (bytes) *bytes += (uint64_t)sb.st_size;
            if (remove && unlink(p) != 0) {
                st = CP_ERROR(CP_ERR_IO, "cannot remove the old %s: %s", p, strerror(errno));
                free(p);
                break;
            }
        }
        free(p);
    }
    closedir(d);
    return st;
}

static bool little_endian(void) {
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* The writer side of the pipeline: one open shard at a time. */
typedef struct syn_out {
    const syn_plan *p;
    const char *dir;
    int shard; /* the open one, -1 for none */
    int fd;
    char path[4096], tmp[4096 + 8];
    int n_done; /* shards renamed into place */
} syn_out;

static cp_status out_close(syn_out *w, bool keep) {
    if (w->shard < 0) return CP_OK;
    cp_status st = CP_OK;
    if (keep && fdatasync(w->fd) != 0)
        st = CP_ERROR(CP_ERR_IO, "cannot flush %s: %s", w->tmp, strerror(errno));
    if (close(w->fd) != 0 && st == CP_OK)
        st = CP_ERROR(CP_ERR_IO, "cannot close %s: %s", w->tmp, strerror(errno));
    if (keep && st == CP_OK && rename(w->tmp, w->path) != 0)
        st = CP_ERROR(CP_ERR_IO, "cannot rename %s to %s: %s", w->tmp, w->path, strerror(errno));
    if (!keep || st != CP_OK)
        unlink(w->tmp);
    else
        w->n_done++;
    w->shard = -1;
    w->fd = -1;
    return st;
}

static cp_status out_block(syn_out *w, const syn_block *b, const uint8_t *buf) {
    if (w->shard != b->shard) {
        CP_CHECK(out_close(w, true));
        char nm[64];
        shard_name(w->p, b->shard, nm, sizeof(nm));
        snprintf(w->path, sizeof(w->path), "%s/%s", w->dir, nm);
        snprintf(w->tmp, sizeof(w->tmp), "%s.tmp", w->path);
        w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (w->fd < 0) return CP_ERROR(CP_ERR_IO, "cannot create %s: %s", w->tmp, strerror(errno));
        w->shard = b->shard;
        sbuf h;
        CP_CHECK(shard_header(w->p, b->shard, &h));
        cp_status st = write_all(w->fd, h.s, h.len, w->tmp);
        free(h.s);
        CP_CHECK(st);
    }
    return write_all(w->fd, buf, (size_t)b->bytes, w->tmp);
}

/* Removes the shards already renamed into place after a failure. */
static void out_undo(syn_out *w) {
    char nm[64], path[4096];
    for (int s = 0; s < w->n_done; s++) {
        shard_name(w->p, s, nm, sizeof(nm));
        snprintf(path, sizeof(path), "%s/%s", w->dir, nm);
        unlink(path);
    }
}

/* "12.34 GB" or "5.6 MB" */
static const char *size_str(uint64_t b, char *buf, size_t cap) {
    if (b >= 1000000000ull)
        snprintf(buf, cap, "%.2f GB", (double)b / 1e9);
    else
        snprintf(buf, cap, "%.1f MB", (double)b / 1e6);
    return buf;
}

cp_status cp_synth_write(const cp_synth_opts *o) {
    if (!o) return CP_ERROR(CP_ERR_INVALID_ARG, "synth: no options");
    if (!o->out_dir || !o->out_dir[0])
        return CP_ERROR(CP_ERR_INVALID_ARG, "synth: no output directory given");
    if (strlen(o->out_dir) > 3000)
        return CP_ERROR(CP_ERR_INVALID_ARG, "synth: the output path is too long");
    if (!little_endian())
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "synth: safetensors is little-endian; this host is not");
    syn_plan p;
    CP_CHECK(plan_build(o, &p));
    cp_status st = CP_OK;
    syn_pool pool = {0};
    uint8_t *buf[2] = {NULL, NULL};
    syn_out w = {.p = &p, .dir = o->out_dir, .shard = -1, .fd = -1};
    sbuf cfg = {0}, idx = {0};

    CP_CHECK_GOTO(make_dirs(o->out_dir), st, fail);
    uint64_t reclaim = 0;
    CP_CHECK_GOTO(old_weights(o->out_dir, false, &reclaim), st, fail);
    struct statvfs vfs;
    if (statvfs(o->out_dir, &vfs) != 0) {
        st = CP_ERROR(CP_ERR_IO, "cannot query the free space of %s: %s", o->out_dir,
                      strerror(errno));
        goto fail;
    }
    uint64_t avail = (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize + reclaim;
    uint64_t need = p.total + SYN_META_SLACK(p.total);
    if (avail < need) {
        char a[32], b[32];
        st = CP_ERROR(
            CP_ERR_IO,
            "not enough free space in %s: the %s model (%d layers, %s) needs %s, %s is available",
            o->out_dir, p.arch.name, p.arch.n_layers, p.st_name, size_str(need, a, sizeof(a)),
            size_str(avail, b, sizeof(b)));
        goto fail;
    }
    CP_CHECK_GOTO(plan_chunks(&p), st, fail);
    CP_CHECK_GOTO(old_weights(o->out_dir, true, NULL), st, fail);

    uint64_t max_block = 0;
    for (int64_t b = 0; b < p.n_blocks; b++)
        if (p.blocks[b].bytes > max_block) max_block = p.blocks[b].bytes;
    for (int i = 0; i < 2; i++)
        CP_CHECK_GOTO(cp_aligned_alloc((void **)&buf[i], (size_t)max_block), st, fail);
    int nt = o->n_threads;
    if (nt <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nt = n > 0 ? (int)n : 1;
    }
    if (nt > 256) nt = 256;
    CP_CHECK_GOTO(pool_init(&pool, &p, nt), st, fail);

    /* Fill block b while block b-1 goes to disk. */
    uint64_t written = 0;
    cp_status wst = CP_OK;
    for (int64_t b = 0; b <= p.n_blocks; b++) {
        if (b < p.n_blocks) pool_start(&pool, &p.blocks[b], buf[b & 1]);
        if (b > 0 && wst == CP_OK) {
            wst = out_block(&w, &p.blocks[b - 1], buf[(b - 1) & 1]);
            written += p.blocks[b - 1].bytes;
            if (wst == CP_OK && o->progress && b < p.n_blocks)
                o->progress(o->progress_user, written, p.total);
        }
        if (b < p.n_blocks) pool_wait(&pool);
        if (wst != CP_OK) break;
    }
    if (wst == CP_OK) wst = out_close(&w, true);
    st = wst;
    if (st != CP_OK) goto fail;

    if (p.n_shards > 1) {
        index_json(&p, &idx);
        CP_CHECK_GOTO(write_small(o->out_dir, "model.safetensors.index.json", &idx), st, fail);
    }
    config_json(&p, &cfg);
    CP_CHECK_GOTO(write_small(o->out_dir, "config.json", &cfg), st, fail);
    if (o->progress) o->progress(o->progress_user, p.total, p.total);
    goto out;

fail:
    out_close(&w, false);
    out_undo(&w);
out:
    pool_free(&pool);
    cp_aligned_free(buf[0]);
    cp_aligned_free(buf[1]);
    free(cfg.s);
    free(idx.s);
    plan_free(&p);
    return st;
}
