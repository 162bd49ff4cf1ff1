/* safetensors.c - validating reader of safetensors files and sharded model
 * directories (memory-mapped, tensors renamed to GGUF's convention, shapes
 * turned innermost-first) and the writer of single-file safetensors models.
 * Format: 8-byte little-endian header length, a JSON header, the data region. */
#include "cp_safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

/* The reference implementation refuses larger headers; so do we, which also
 * bounds what a hostile file can make us allocate. */
#define ST_MAX_HEADER 100000000ull
#define ST_MEMORY_PATH "<memory>"
#define ST_WRITER_MAX_DIMS 8

/* clang-format off */
static const struct {
    const char *name;
    size_t size;
    cp_dtype cp;
} st_types[CP_ST_DTYPE_COUNT] = {
    [CP_ST_F64] = {"F64", 8, CP_DTYPE_F64},
    [CP_ST_F32] = {"F32", 4, CP_DTYPE_F32},
    [CP_ST_F16] = {"F16", 2, CP_DTYPE_F16},
    [CP_ST_BF16] = {"BF16", 2, CP_DTYPE_BF16},
    [CP_ST_I64] = {"I64", 8, CP_DTYPE_I64},
    [CP_ST_I32] = {"I32", 4, CP_DTYPE_I32},
    [CP_ST_I16] = {"I16", 2, CP_DTYPE_I16},
    [CP_ST_I8] = {"I8", 1, CP_DTYPE_I8},
    [CP_ST_U64] = {"U64", 8, CP_DTYPE_I64},
    [CP_ST_U32] = {"U32", 4, CP_DTYPE_I32},
    [CP_ST_U16] = {"U16", 2, CP_DTYPE_I16},
    [CP_ST_U8] = {"U8", 1, CP_DTYPE_I8},
    [CP_ST_BOOL] = {"BOOL", 1, CP_DTYPE_I8},
    [CP_ST_F8_E4M3] = {"F8_E4M3", 1, CP_DTYPE_I8},
    [CP_ST_F8_E5M2] = {"F8_E5M2", 1, CP_DTYPE_I8},
};
/* clang-format on */

const char *cp_st_dtype_name(cp_st_dtype t) {
    return ((unsigned)t < CP_ST_DTYPE_COUNT) ? st_types[t].name : NULL;
}

size_t cp_st_dtype_size(cp_st_dtype t) {
    return ((unsigned)t < CP_ST_DTYPE_COUNT) ? st_types[t].size : 0;
}

cp_dtype cp_st_dtype_to_cp(cp_st_dtype t) {
    return ((unsigned)t < CP_ST_DTYPE_COUNT) ? st_types[t].cp : CP_DTYPE_COUNT;
}

static bool st_dtype_parse(const char *s, cp_st_dtype *out) {
    for (int i = 0; i < CP_ST_DTYPE_COUNT; i++) {
        if (strcmp(s, st_types[i].name) == 0) {
            *out = (cp_st_dtype)i;
            return true;
        }
    }
    return false;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* "a" + "/" + "b" in a new allocation, or NULL. */
static char *join_path(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static uint64_t load_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ---- name mapping --------------------------------------------------------- */

static const struct {
    const char *hf;
    const char *gguf;
} layer_map[] = {
    {"self_attn.q_proj", "attn_q"},
    {"self_attn.k_proj", "attn_k"},
    {"self_attn.v_proj", "attn_v"},
    {"self_attn.o_proj", "attn_output"},
    {"mlp.gate_proj", "ffn_gate"},
    {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"},
    {"input_layernorm", "attn_norm"},
    {"post_attention_layernorm", "ffn_norm"},
};

static const struct {
    const char *hf;
    const char *gguf;
} top_map[] = {
    {"model.embed_tokens", "token_embd"},
    {"model.norm", "output_norm"},
    {"lm_head", "output"},
};

/* If s starts with prefix, the rest of s; else NULL. */
static const char *skip_prefix(const char *s, const char *prefix) {
    size_t n = strlen(prefix);
    return strncmp(s, prefix, n) == 0 ? s + n : NULL;
}

static bool is_param_suffix(const char *s) {
    return strcmp(s, ".weight") == 0 || strcmp(s, ".bias") == 0;
}

bool cp_safetensors_gguf_name(const char *hf_name, char *buf, size_t cap) {
    if (!hf_name || !buf || cap == 0) return false;
    for (size_t i = 0; i < sizeof(top_map) / sizeof(top_map[0]); i++) {
        const char *rest = skip_prefix(hf_name, top_map[i].hf);
        if (rest && is_param_suffix(rest)) {
            int n = snprintf(buf, cap, "%s%s", top_map[i].gguf, rest);
            return n > 0 && (size_t)n < cap;
        }
    }
    const char *p = skip_prefix(hf_name, "model.layers.");
    if (!p) return false;
    /* Layer numbers are plain decimal without leading zeros so that the
     * mapping stays one-to-one. */
    size_t nd = 0;
    while (p[nd] >= '0' && p[nd] <= '9')
        nd++;
    if (nd == 0 || nd > 9 || (nd > 1 && p[0] == '0') || p[nd] != '.') return false;
    const char *mod = p + nd + 1;
    for (size_t i = 0; i < sizeof(layer_map) / sizeof(layer_map[0]); i++) {
        const char *rest = skip_prefix(mod, layer_map[i].hf);
        if (rest && is_param_suffix(rest)) {
            int n = snprintf(buf, cap, "blk.%.*s.%s%s", (int)nd, p, layer_map[i].gguf, rest);
            return n > 0 && (size_t)n < cap;
        }
    }
    return false;
}

/* ---- reader --------------------------------------------------------------- */

typedef struct st_shard {
    char *path;
    const uint8_t *base; /* the whole file image */
    size_t size;
    bool mapped; /* base is our mmap (else borrowed or NULL) */
} st_shard;

typedef struct st_tensor {
    cp_weight_info info; /* info.name == name */
    char *name;          /* GGUF-convention name */
    char *hf_name;       /* name in the file */
    cp_st_dtype sdt;
    int shard;
    uint64_t begin, end; /* data_offsets, relative to the data region */
} st_tensor;

struct cp_safetensors {
    st_shard *shards;
    int n_shards;
    st_tensor *t;
    int64_t n, cap;
    st_tensor **by_name; /* sorted by name */
    char **meta_k, **meta_v;
    int64_t n_meta, cap_meta;
    char *dir;
};

static cp_status st_alloc(cp_safetensors_t *out, int n_shards) {
    *out = NULL;
    cp_safetensors_t st = calloc(1, sizeof(*st));
    if (!st) return CP_ERROR(CP_ERR_OOM, "out of memory opening a safetensors model");
    st->shards = calloc((size_t)n_shards, sizeof(*st->shards));
    if (!st->shards) {
        free(st);
        return CP_ERROR(CP_ERR_OOM, "out of memory opening a safetensors model");
    }
    st->n_shards = n_shards;
    *out = st;
    return CP_OK;
}

void cp_safetensors_close(cp_safetensors_t st) {
    if (!st) return;
    for (int i = 0; i < st->n_shards; i++) {
        if (st->shards[i].mapped) munmap((void *)st->shards[i].base, st->shards[i].size);
        free(st->shards[i].path);
    }
    free(st->shards);
    for (int64_t i = 0; i < st->n; i++) {
        if (st->t[i].hf_name != st->t[i].name) free(st->t[i].hf_name);
        free(st->t[i].name);
    }
    free(st->t);
    free(st->by_name);
    for (int64_t i = 0; i < st->n_meta; i++) {
        free(st->meta_k[i]);
        free(st->meta_v[i]);
    }
    free(st->meta_k);
    free(st->meta_v);
    free(st->dir);
    free(st);
}

static cp_status map_file(const char *path, st_shard *sh) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return CP_ERROR(CP_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return CP_ERROR(CP_ERR_IO, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return CP_ERROR(CP_ERR_IO, "%s is not a regular file", path);
    }
    sh->size = (size_t)sb.st_size;
    sh->base = NULL;
    sh->mapped = false;
    if (sh->size > 0) { /* an empty file cannot be mapped; the parser reports it */
        void *p = mmap(NULL, sh->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return CP_ERROR(CP_ERR_IO, "cannot map %s (%zu bytes): %s", path, sh->size,
                            strerror(e));
        }
        sh->base = p;
        sh->mapped = true;
    }
    close(fd);
    return CP_OK;
}

static cp_status add_meta(cp_safetensors_t st, const char *k, const char *v) {
    for (int64_t i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_k[i], k) == 0) return CP_OK; /* first shard wins */
    if (st->n_meta == st->cap_meta) {
        int64_t cap = st->cap_meta ? 2 * st->cap_meta : 8;
        char **nk = realloc(st->meta_k, (size_t)cap * sizeof(char *));
        if (!nk) return CP_ERROR(CP_ERR_OOM, "out of memory reading safetensors metadata");
        st->meta_k = nk;
        char **nv = realloc(st->meta_v, (size_t)cap * sizeof(char *));
        if (!nv) return CP_ERROR(CP_ERR_OOM, "out of memory reading safetensors metadata");
        st->meta_v = nv;
        st->cap_meta = cap;
    }
    char *kk = dup_str(k), *vv = dup_str(v);
    if (!kk || !vv) {
        free(kk);
        free(vv);
        return CP_ERROR(CP_ERR_OOM, "out of memory reading safetensors metadata");
    }
    st->meta_k[st->n_meta] = kk;
    st->meta_v[st->n_meta] = vv;
    st->n_meta++;
    return CP_OK;
}

static cp_status parse_meta(cp_safetensors_t st, const char *path, json_t *m) {
    if (!json_is_object(m))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"__metadata__\" is not a JSON object", path);
    const char *k;
    json_t *v;
    json_object_foreach(m, k, v) {
        if (!json_is_string(v))
            return CP_ERROR(CP_ERR_FORMAT, "%s: \"__metadata__\" value of key '%s' is not a string",
                            path, k);
        CP_CHECK(add_meta(st, k, json_string_value(v)));
    }
    return CP_OK;
}

/* A JSON integer >= 0, or false. */
static bool json_uint(const json_t *j, uint64_t *out) {
    if (!json_is_integer(j)) return false;
    json_int_t v = json_integer_value(j);
    if (v < 0) return false;
    *out = (uint64_t)v;
    return true;
}

/* Validates one header entry and appends it as a tensor of shard si. */
static cp_status parse_tensor(cp_safetensors_t st, int si, const char *key, json_t *val,
                              uint64_t data_len) {
    const char *path = st->shards[si].path;
    if (key[0] == '\0') return CP_ERROR(CP_ERR_FORMAT, "%s: a tensor has an empty name", path);
    if (!json_is_object(val))
        return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s': header entry is not a JSON object", path,
                        key);
    json_t *jd = json_object_get(val, "dtype");
    json_t *js = json_object_get(val, "shape");
    json_t *jo = json_object_get(val, "data_offsets");
    if (!jd) return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s' has no \"dtype\"", path, key);
    if (!js) return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s' has no \"shape\"", path, key);
    if (!jo) return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s' has no \"data_offsets\"", path, key);

    cp_st_dtype sdt;
    if (!json_is_string(jd))
        return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s': \"dtype\" is not a string", path, key);
    if (!st_dtype_parse(json_string_value(jd), &sdt))
        return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s' has unknown dtype \"%s\"", path, key,
                        json_string_value(jd));

    if (!json_is_array(js))
        return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s': \"shape\" is not an array", path, key);
    size_t ndim = json_array_size(js);
    uint64_t dims[CP_MAX_DIMS];
    uint64_t count = 1; /* element count, checked against INT64_MAX at each step */
    for (size_t d = 0; d < ndim; d++) {
        uint64_t v;
        if (!json_uint(json_array_get(js, d), &v))
            return CP_ERROR(CP_ERR_FORMAT,
                            "%s: tensor '%s': shape[%zu] is not a non-negative integer", path, key,
                            d);
        if (v != 0 && count > (uint64_t)INT64_MAX / v)
            return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s': element count of its shape overflows",
                            path, key);
        count *= v;
        if (d < CP_MAX_DIMS) dims[d] = v;
    }
    size_t esz = st_types[sdt].size;
    if (count > (uint64_t)INT64_MAX / esz)
        return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s': byte size of its shape overflows", path,
                        key);
    uint64_t nbytes = count * esz;

    uint64_t begin, end;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !json_uint(json_array_get(jo, 0), &begin) || !json_uint(json_array_get(jo, 1), &end))
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: tensor '%s': \"data_offsets\" is not [begin, end] with non-negative "
                        "integers",
                        path, key);
    if (begin > end || end > data_len)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: tensor '%s': data_offsets [%llu, %llu] are not an interval inside the "
                        "data region of %llu bytes",
                        path, key, (unsigned long long)begin, (unsigned long long)end,
                        (unsigned long long)data_len);
    if (end - begin != nbytes)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: tensor '%s': data_offsets span %llu bytes but %llu elements of %s "
                        "need %llu",
                        path, key, (unsigned long long)(end - begin), (unsigned long long)count,
                        st_types[sdt].name, (unsigned long long)nbytes);
    if (ndim > CP_MAX_DIMS)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: tensor '%s' has %zu dimensions; at most %d are supported", path, key,
                        ndim, CP_MAX_DIMS);

    if (st->n == st->cap) {
        int64_t cap = st->cap ? 2 * st->cap : 64;
        st_tensor *nt = realloc(st->t, (size_t)cap * sizeof(*nt));
        if (!nt) return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
        st->t = nt;
        st->cap = cap;
    }
    st_tensor *t = &st->t[st->n];
    memset(t, 0, sizeof(*t));
    char mapped[512];
    t->hf_name = dup_str(key);
    if (!t->hf_name) return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
    if (cp_safetensors_gguf_name(key, mapped, sizeof(mapped))) {
        t->name = dup_str(mapped);
        if (!t->name) {
            free(t->hf_name);
            return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
        }
    } else {
        t->name = t->hf_name;
    }
    st->n++;

    t->sdt = sdt;
    t->shard = si;
    t->begin = begin;
    t->end = end;
    cp_weight_info *w = &t->info;
    w->name = t->name;
    w->dtype = st_types[sdt].cp;
    w->ndim = (int)ndim;
    for (int d = 0; d < CP_MAX_DIMS; d++)
        w->ne[d] = 1;
    for (size_t d = 0; d < ndim; d++)
        w->ne[d] = (int64_t)dims[ndim - 1 - d];
    w->nbytes = (size_t)nbytes;
    return CP_OK;
}

static int cmp_begin(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Parses and validates the header of shard si; appends its tensors. */
static cp_status parse_shard(cp_safetensors_t st, int si) {
    const st_shard *sh = &st->shards[si];
    const char *path = sh->path;
    if (sh->size < 8)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: file is %zu bytes, shorter than the 8-byte header length that "
                        "starts a safetensors file",
                        path, sh->size);
    uint64_t hlen = load_le64(sh->base);
    if (hlen > ST_MAX_HEADER)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: header length %llu is larger than the 100 MB limit (not a "
                        "safetensors file?)",
                        path, (unsigned long long)hlen);
    if (hlen > sh->size - 8)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: header length %llu is larger than the file (%zu bytes): file "
                        "truncated?",
                        path, (unsigned long long)hlen, sh->size);
    json_error_t jerr;
    json_t *root =
        json_loadb((const char *)sh->base + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            return CP_ERROR(CP_ERR_FORMAT, "%s: duplicate tensor name in header: %s", path,
                            jerr.text);
        return CP_ERROR(CP_ERR_FORMAT, "%s: header is not valid JSON: %s (line %d, column %d)",
                        path, jerr.text, jerr.line, jerr.column);
    }
    cp_status s = CP_OK;
    if (!json_is_object(root)) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }
    uint64_t data_len = sh->size - 8 - hlen;
    int64_t first = st->n;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0)
            CP_CHECK_GOTO(parse_meta(st, path, val), s, fail);
        else
            CP_CHECK_GOTO(parse_tensor(st, si, key, val, data_len), s, fail);
    }

    /* Data order; then a tensor overlaps an earlier one exactly when it starts
     * before the largest end seen so far. Empty tensors overlap nothing. */
    if (st->n > first) qsort(st->t + first, (size_t)(st->n - first), sizeof(st_tensor), cmp_begin);
    const st_tensor *reach = NULL;
    for (int64_t i = first; i < st->n; i++) {
        st_tensor *t = &st->t[i];
        t->info.name = t->name;
        t->info.data = sh->base + 8 + hlen + t->begin;
        t->info.file_offset = 8 + hlen + t->begin;
        if (t->begin == t->end) continue;
        if (reach && t->begin < reach->end) {
            s = CP_ERROR(
                CP_ERR_FORMAT, "%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap", path,
                reach->hf_name, (unsigned long long)reach->begin, (unsigned long long)reach->end,
                t->hf_name, (unsigned long long)t->begin, (unsigned long long)t->end);
            goto fail;
        }
        if (!reach || t->end > reach->end) reach = t;
    }
fail:
    json_decref(root);
    return s;
}

static int cmp_by_name(const void *a, const void *b) {
    const st_tensor *x = *(st_tensor *const *)a, *y = *(st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_key_name(const void *key, const void *elem) {
    return strcmp((const char *)key, (*(st_tensor *const *)elem)->name);
}

/* Builds the name index and rejects duplicate names (within a file the JSON
 * parser already did; this catches them across shards and after mapping). */
/* cparallel's own packed types (cp_dtype.h) travel as U8 tensors of
 * [rows][row bytes], their type named by the metadata key
 * "cparallel.dtype.<tensor name>": present them as rows of that type. */
static cp_status apply_own_types(cp_safetensors_t st) {
    char key[512];
    for (int64_t i = 0; i < st->n; i++) {
        st_tensor *t = &st->t[i];
        snprintf(key, sizeof(key), "cparallel.dtype.%s", t->hf_name);
        const char *tn = cp_safetensors_get_meta(st, key);
        if (!tn) continue;
        int dt = -1;
        for (int k = CP_DTYPE_FIRST_OWN; k < CP_DTYPE_COUNT; k++)
            if (cp_dtype_name((cp_dtype)k) && strcmp(cp_dtype_name((cp_dtype)k), tn) == 0) dt = k;
        if (dt < 0)
            return CP_ERROR(CP_ERR_UNSUPPORTED, "%s: tensor '%s' has type '%s', which this build does not know",
                            st->shards[t->shard].path, t->hf_name, tn);
        const int64_t row_bytes = t->info.ne[0];
        const size_t extra = cp_dtype_row_extra((cp_dtype)dt), ts = cp_dtype_type_size((cp_dtype)dt);
        const int64_t bs = cp_dtype_block_size((cp_dtype)dt);
        if (t->sdt != CP_ST_U8 || t->info.ne[2] != 1 || t->info.ne[3] != 1 || row_bytes <= (int64_t)extra ||
            (row_bytes - (int64_t)extra) % (int64_t)ts != 0)
            return CP_ERROR(CP_ERR_FORMAT, "%s: tensor '%s' of type %s must be U8 [rows, row bytes] with whole "
                            "%zu-byte blocks after a %zu-byte trailer", st->shards[t->shard].path, t->hf_name, tn, ts,
                            extra);
        t->info.dtype = (cp_dtype)dt;
        t->info.ne[0] = (row_bytes - (int64_t)extra) / (int64_t)ts * bs;
    }
    return CP_OK;
}

static cp_status finalize(cp_safetensors_t st) {
    if (st->n == 0) return CP_OK;
    CP_CHECK(apply_own_types(st));
    st->by_name = malloc((size_t)st->n * sizeof(st_tensor *));
    if (!st->by_name) return CP_ERROR(CP_ERR_OOM, "out of memory indexing tensors");
    for (int64_t i = 0; i < st->n; i++)
        st->by_name[i] = &st->t[i];
    qsort(st->by_name, (size_t)st->n, sizeof(st_tensor *), cmp_by_name);
    for (int64_t i = 1; i < st->n; i++) {
        const st_tensor *a = st->by_name[i - 1], *b = st->by_name[i];
        if (strcmp(a->name, b->name) == 0)
            return CP_ERROR(CP_ERR_FORMAT, "duplicate tensor name '%s': '%s' in %s and '%s' in %s",
                            a->name, a->hf_name, st->shards[a->shard].path, b->hf_name,
                            st->shards[b->shard].path);
    }
    return CP_OK;
}

cp_status cp_safetensors_open_memory(const void *data, size_t size, cp_safetensors_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_safetensors_open_memory: out is NULL");
    *out = NULL;
    if (!data && size > 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_safetensors_open_memory: data is NULL");
    cp_safetensors_t st;
    CP_CHECK(st_alloc(&st, 1));
    cp_status s = CP_OK;
    st->shards[0].path = dup_str(ST_MEMORY_PATH);
    st->dir = dup_str("");
    if (!st->shards[0].path || !st->dir) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory opening a safetensors image");
        goto fail;
    }
    st->shards[0].base = data;
    st->shards[0].size = size;
    CP_CHECK_GOTO(parse_shard(st, 0), s, fail);
    CP_CHECK_GOTO(finalize(st), s, fail);
    *out = st;
    return CP_OK;
fail:
    cp_safetensors_close(st);
    return s;
}

static bool is_regular(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static bool ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The directory part of path ("." when there is none), newly allocated. */
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return dup_str(".");
    size_t n = (slash == path) ? 1 : (size_t)(slash - path);
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, path, n);
    d[n] = '\0';
    return d;
}

static cp_status open_single(const char *file, char *dir, cp_safetensors_t *out) {
    cp_safetensors_t st;
    cp_status s = st_alloc(&st, 1);
    if (s != CP_OK) {
        free(dir);
        return s;
    }
    st->dir = dir;
    st->shards[0].path = dup_str(file);
    if (!st->shards[0].path) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory opening %s", file);
        goto fail;
    }
    CP_CHECK_GOTO(map_file(file, &st->shards[0]), s, fail);
    CP_CHECK_GOTO(parse_shard(st, 0), s, fail);
    CP_CHECK_GOTO(finalize(st), s, fail);
    *out = st;
    return CP_OK;
fail:
    cp_safetensors_close(st);
    return s;
}

/* A shard file name from an index must name a file beside the index. */
static bool shard_name_ok(const char *s) {
    return s[0] != '\0' && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static cp_status read_small_file(const char *path, char **buf, size_t *len) {
    *buf = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return CP_ERROR(CP_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    cp_status s = CP_OK;
    size_t cap = 0, n = 0;
    char *b = NULL;
    for (;;) {
        if (n == cap) {
            if (cap >= ST_MAX_HEADER) {
                s = CP_ERROR(CP_ERR_FORMAT, "%s is larger than 100 MB", path);
                goto fail;
            }
            cap = cap ? 2 * cap : 65536;
            char *nb = realloc(b, cap);
            if (!nb) {
                s = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
                goto fail;
            }
            b = nb;
        }
        size_t r = fread(b + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            if (ferror(f)) {
                s = CP_ERROR(CP_ERR_IO, "cannot read %s: %s", path, strerror(errno));
                goto fail;
            }
            break;
        }
    }
    fclose(f);
    *buf = b;
    *len = n;
    return CP_OK;
fail:
    fclose(f);
    free(b);
    return s;
}

/* Opens the shards an index.json names (dir is taken over). */
static cp_status open_index(const char *index_path, char *dir, cp_safetensors_t *out) {
    cp_safetensors_t st = NULL;
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL;
    const char **names = NULL; /* distinct shard names, borrowed from root */
    size_t n_names = 0;
    cp_status s = read_small_file(index_path, &text, &len);
    if (s != CP_OK) goto fail;
    json_error_t jerr;
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s is not valid JSON: %s (line %d, column %d)", index_path,
                     jerr.text, jerr.line, jerr.column);
        goto fail;
    }
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s has no \"weight_map\" object", index_path);
        goto fail;
    }
    names = malloc((json_object_size(wm) + 1) * sizeof(char *));
    if (!names) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", index_path);
        goto fail;
    }
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val) {
        if (!json_is_string(val) || !shard_name_ok(json_string_value(val))) {
            s = CP_ERROR(CP_ERR_FORMAT,
                         "%s: weight_map entry of '%s' is not the file name of a shard beside "
                         "the index",
                         index_path, key);
            goto fail;
        }
        const char *f = json_string_value(val);
        size_t j = 0;
        while (j < n_names && strcmp(names[j], f) != 0)
            j++;
        if (j == n_names) names[n_names++] = f;
    }
    if (n_names == 0) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s: weight_map is empty", index_path);
        goto fail;
    }
    CP_CHECK_GOTO(st_alloc(&st, (int)n_names), s, fail);
    st->dir = dir;
    dir = NULL;
    for (size_t j = 0; j < n_names; j++) {
        st_shard *sh = &st->shards[j];
        sh->path = join_path(st->dir, names[j]);
        if (!sh->path) {
            s = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", index_path);
            goto fail;
        }
        if (!is_regular(sh->path)) {
            s = CP_ERROR(CP_ERR_IO, "%s names shard %s, which is missing or not a file (%s)",
                         index_path, names[j], sh->path);
            goto fail;
        }
        CP_CHECK_GOTO(map_file(sh->path, sh), s, fail);
        CP_CHECK_GOTO(parse_shard(st, (int)j), s, fail);
    }
    CP_CHECK_GOTO(finalize(st), s, fail);
    /* Every tensor the index promises must be in the shard it names. */
    json_object_foreach(wm, key, val) {
        char mapped[512];
        const char *name = cp_safetensors_gguf_name(key, mapped, sizeof(mapped)) ? mapped : key;
        st_tensor **hit =
            st->n ? bsearch(name, st->by_name, (size_t)st->n, sizeof(st_tensor *), cmp_key_name)
                  : NULL;
        const char *f = json_string_value(val);
        if (!hit || strcmp((*hit)->hf_name, key) != 0 || strcmp(names[(*hit)->shard], f) != 0) {
            s = CP_ERROR(CP_ERR_FORMAT, "%s maps tensor '%s' to %s, which does not contain it",
                         index_path, key, f);
            goto fail;
        }
    }
    *out = st;
    st = NULL;
fail:
    cp_safetensors_close(st);
    json_decref(root);
    free(names);
    free(text);
    free(dir);
    return s;
}

/* A directory without index or model.safetensors: its only *.safetensors. */
static cp_status find_single(const char *dir, char **file) {
    *file = NULL;
    DIR *d = opendir(dir);
    if (!d) return CP_ERROR(CP_ERR_IO, "cannot list %s: %s", dir, strerror(errno));
    cp_status s = CP_OK;
    char *found = NULL;
    int n_found = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!ends_with(e->d_name, ".safetensors")) continue;
        char *p = join_path(dir, e->d_name);
        if (!p) {
            s = CP_ERROR(CP_ERR_OOM, "out of memory listing %s", dir);
            goto fail;
        }
        if (!is_regular(p)) {
            free(p);
            continue;
        }
        n_found++;
        free(found);
        found = p;
    }
    if (n_found == 0) {
        s = CP_ERROR(CP_ERR_IO,
                     "%s holds no model.safetensors.index.json, model.safetensors or other "
                     ".safetensors file",
                     dir);
        goto fail;
    }
    if (n_found > 1) {
        s = CP_ERROR(CP_ERR_FORMAT,
                     "%s holds %d .safetensors files but no model.safetensors.index.json that "
                     "says how they belong together: open one file instead",
                     dir, n_found);
        goto fail;
    }
    *file = found;
    found = NULL;
fail:
    free(found);
    closedir(d);
    return s;
}

cp_status cp_safetensors_open(const char *path, cp_safetensors_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_safetensors_open: out is NULL");
    *out = NULL;
    if (!path || !path[0]) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_safetensors_open: empty path");
    struct stat sb;
    if (stat(path, &sb) != 0)
        return CP_ERROR(CP_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) {
        char *dir = dir_of(path);
        if (!dir) return CP_ERROR(CP_ERR_OOM, "out of memory opening %s", path);
        if (ends_with(path, ".index.json")) return open_index(path, dir, out);
        return open_single(path, dir, out);
    }

    char *dir = dup_str(path);
    if (!dir) return CP_ERROR(CP_ERR_OOM, "out of memory opening %s", path);
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        dir[--n] = '\0';
    char *index = join_path(dir, "model.safetensors.index.json");
    char *single = join_path(dir, "model.safetensors");
    cp_status s;
    if (!index || !single) {
        free(dir);
        s = CP_ERROR(CP_ERR_OOM, "out of memory opening %s", path);
    } else if (is_regular(index)) {
        s = open_index(index, dir, out);
    } else if (is_regular(single)) {
        s = open_single(single, dir, out);
    } else {
        char *file = NULL;
        s = find_single(dir, &file);
        if (s == CP_OK)
            s = open_single(file, dir, out);
        else
            free(dir);
        free(file);
    }
    free(index);
    free(single);
    return s;
}

int64_t cp_safetensors_n_tensors(cp_safetensors_t st) {
    return st ? st->n : 0;
}

const cp_weight_info *cp_safetensors_tensor(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n) ? &st->t[i].info : NULL;
}

const cp_weight_info *cp_safetensors_find(cp_safetensors_t st, const char *gguf_name) {
    if (!st || !gguf_name || st->n == 0) return NULL;
    st_tensor **hit =
        bsearch(gguf_name, st->by_name, (size_t)st->n, sizeof(st_tensor *), cmp_key_name);
    return hit ? &(*hit)->info : NULL;
}

const char *cp_safetensors_hf_name(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n) ? st->t[i].hf_name : NULL;
}

cp_st_dtype cp_safetensors_st_dtype(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n) ? st->t[i].sdt : CP_ST_DTYPE_COUNT;
}

const char *cp_safetensors_tensor_path(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n) ? st->shards[st->t[i].shard].path : NULL;
}

const char *cp_safetensors_dir(cp_safetensors_t st) {
    return st ? st->dir : NULL;
}

int64_t cp_safetensors_n_meta(cp_safetensors_t st) {
    return st ? st->n_meta : 0;
}

const char *cp_safetensors_meta_key(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n_meta) ? st->meta_k[i] : NULL;
}

const char *cp_safetensors_meta_value(cp_safetensors_t st, int64_t i) {
    return (st && i >= 0 && i < st->n_meta) ? st->meta_v[i] : NULL;
}

const char *cp_safetensors_get_meta(cp_safetensors_t st, const char *key) {
    if (!st || !key) return NULL;
    for (int64_t i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_k[i], key) == 0) return st->meta_v[i];
    return NULL;
}

/* ---- writer --------------------------------------------------------------- */

typedef struct wr_tensor {
    char *name;
    cp_st_dtype dtype;
    int ndim;
    int64_t shape[ST_WRITER_MAX_DIMS]; /* outermost first */
    const void *data;                  /* borrowed */
    size_t nbytes;
    uint64_t begin; /* set by finish */
    cp_st_fill_fn fill; /* or the data is made at finish */
    void *fill_user;
} wr_tensor;

struct cp_st_writer {
    wr_tensor *t;
    int64_t n, cap;
    char **mk, **mv;
    int64_t n_meta, cap_meta;
};

cp_status cp_st_writer_init(cp_st_writer_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_init: out is NULL");
    *out = calloc(1, sizeof(**out));
    if (!*out) return CP_ERROR(CP_ERR_OOM, "out of memory creating a safetensors writer");
    return CP_OK;
}

void cp_st_writer_free(cp_st_writer_t w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n; i++)
        free(w->t[i].name);
    free(w->t);
    for (int64_t i = 0; i < w->n_meta; i++) {
        free(w->mk[i]);
        free(w->mv[i]);
    }
    free(w->mk);
    free(w->mv);
    free(w);
}

/* jansson refuses strings that are not UTF-8; find out before finish does. */
static bool valid_utf8(const char *s) {
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

static cp_status writer_add(cp_st_writer_t w, const char *name, cp_st_dtype dtype, int ndim,
                            const int64_t *shape_outer_first, const void *data, size_t nbytes,
                            cp_st_fill_fn fill, void *fill_user) {
    if (!w || !name) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add: NULL argument");
    if (!name[0] || strcmp(name, "__metadata__") == 0 || !valid_utf8(name))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "cp_st_writer_add: tensor name '%s' is empty, reserved or not UTF-8", name);
    if ((unsigned)dtype >= CP_ST_DTYPE_COUNT)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add: tensor '%s': bad dtype %d", name,
                        (int)dtype);
    if (ndim < 0 || ndim > ST_WRITER_MAX_DIMS || (ndim > 0 && !shape_outer_first))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add: tensor '%s': bad ndim %d", name,
                        ndim);
    uint64_t count = 1;
    for (int d = 0; d < ndim; d++) {
        int64_t v = shape_outer_first[d];
        if (v < 0 || (v != 0 && count > (uint64_t)INT64_MAX / (uint64_t)v))
            return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add: tensor '%s': bad dimension %lld",
                            name, (long long)v);
        count *= (uint64_t)v;
    }
    size_t esz = st_types[dtype].size;
    if (count > SIZE_MAX / esz || count * esz != nbytes || (nbytes > 0 && !data && !fill))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "cp_st_writer_add: tensor '%s': %zu bytes given but %llu elements of %s "
                        "need %llu",
                        name, nbytes, (unsigned long long)count, st_types[dtype].name,
                        (unsigned long long)(count * esz));
    for (int64_t i = 0; i < w->n; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add: tensor '%s' added twice", name);
    if (w->n == w->cap) {
        int64_t cap = w->cap ? 2 * w->cap : 64;
        wr_tensor *nt = realloc(w->t, (size_t)cap * sizeof(*nt));
        if (!nt) return CP_ERROR(CP_ERR_OOM, "out of memory adding tensor '%s'", name);
        w->t = nt;
        w->cap = cap;
    }
    wr_tensor *t = &w->t[w->n];
    memset(t, 0, sizeof(*t));
    t->name = dup_str(name);
    if (!t->name) return CP_ERROR(CP_ERR_OOM, "out of memory adding tensor '%s'", name);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        t->shape[d] = shape_outer_first[d];
    t->data = data;
    t->nbytes = nbytes;
    t->fill = fill;
    t->fill_user = fill_user;
    w->n++;
    return CP_OK;
}

cp_status cp_st_writer_add(cp_st_writer_t w, const char *name, cp_st_dtype dtype, int ndim,
                           const int64_t *shape_outer_first, const void *data, size_t nbytes) {
    return writer_add(w, name, dtype, ndim, shape_outer_first, data, nbytes, NULL, NULL);
}

cp_status cp_st_writer_add_fill(cp_st_writer_t w, const char *name, cp_st_dtype dtype, int ndim,
                                const int64_t *shape_outer_first, size_t nbytes, cp_st_fill_fn fill,
                                void *user) {
    if (!fill) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_add_fill: no fill function");
    return writer_add(w, name, dtype, ndim, shape_outer_first, NULL, nbytes, fill, user);
}

cp_status cp_st_writer_set_meta(cp_st_writer_t w, const char *key, const char *value) {
    if (!w || !key || !value)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_set_meta: NULL argument");
    if (!valid_utf8(key) || !valid_utf8(value))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "cp_st_writer_set_meta: key '%s' or its value is not UTF-8", key);
    char *v = dup_str(value);
    if (!v) return CP_ERROR(CP_ERR_OOM, "out of memory setting metadata '%s'", key);
    for (int64_t i = 0; i < w->n_meta; i++) {
        if (strcmp(w->mk[i], key) == 0) {
            free(w->mv[i]);
            w->mv[i] = v;
            return CP_OK;
        }
    }
    if (w->n_meta == w->cap_meta) {
        int64_t cap = w->cap_meta ? 2 * w->cap_meta : 8;
        char **nk = realloc(w->mk, (size_t)cap * sizeof(char *));
        if (nk) w->mk = nk;
        char **nv = nk ? realloc(w->mv, (size_t)cap * sizeof(char *)) : NULL;
        if (nv) w->mv = nv;
        if (!nk || !nv) {
            free(v);
            return CP_ERROR(CP_ERR_OOM, "out of memory setting metadata '%s'", key);
        }
        w->cap_meta = cap;
    }
    char *k = dup_str(key);
    if (!k) {
        free(v);
        return CP_ERROR(CP_ERR_OOM, "out of memory setting metadata '%s'", key);
    }
    w->mk[w->n_meta] = k;
    w->mv[w->n_meta] = v;
    w->n_meta++;
    return CP_OK;
}

typedef struct wr_order {
    size_t esz;
    int64_t idx;
} wr_order;

/* Larger elements first, then insertion order: all sizes are powers of two,
 * so every tensor starts at a multiple of its element size. */
static int cmp_order(const void *a, const void *b) {
    const wr_order *x = a, *y = b;
    if (x->esz != y->esz) return x->esz > y->esz ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static json_t *build_header(cp_st_writer_t w) {
    json_t *root = json_object();
    if (!root) return NULL;
    if (w->n_meta > 0) {
        json_t *m = json_object();
        if (json_object_set_new(root, "__metadata__", m) != 0) goto fail;
        for (int64_t i = 0; i < w->n_meta; i++)
            if (json_object_set_new(m, w->mk[i], json_string(w->mv[i])) != 0) goto fail;
    }
    for (int64_t i = 0; i < w->n; i++) {
        const wr_tensor *t = &w->t[i];
        json_t *e = json_object();
        if (json_object_set_new(root, t->name, e) != 0) goto fail;
        json_t *shape = json_array();
        json_t *offs = json_array();
        if (json_object_set_new(e, "dtype", json_string(st_types[t->dtype].name)) != 0 ||
            json_object_set_new(e, "shape", shape) != 0 ||
            json_object_set_new(e, "data_offsets", offs) != 0)
            goto fail;
        for (int d = 0; d < t->ndim; d++)
            if (json_array_append_new(shape, json_integer((json_int_t)t->shape[d])) != 0) goto fail;
        if (json_array_append_new(offs, json_integer((json_int_t)t->begin)) != 0 ||
            json_array_append_new(offs, json_integer((json_int_t)(t->begin + t->nbytes))) != 0)
            goto fail;
    }
    return root;
fail:
    json_decref(root);
    return NULL;
}

static bool write_all(FILE *f, const void *p, size_t n) {
    return n == 0 || fwrite(p, 1, n, f) == n;
}

cp_status cp_st_writer_finish(cp_st_writer_t w, const char *path) {
    if (!w || !path || !path[0])
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_st_writer_finish: NULL argument or empty path");
    cp_status s = CP_OK;
    wr_order *order = NULL;
    json_t *root = NULL;
    char *hdr = NULL;
    FILE *f = NULL;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return CP_ERROR(CP_ERR_OOM, "out of memory writing %s", path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    order = malloc(((size_t)w->n + 1) * sizeof(*order));
    if (!order) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory writing %s", path);
        goto fail;
    }
    for (int64_t i = 0; i < w->n; i++) {
        order[i].esz = st_types[w->t[i].dtype].size;
        order[i].idx = i;
    }
    qsort(order, (size_t)w->n, sizeof(*order), cmp_order);
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n; i++) {
        wr_tensor *t = &w->t[order[i].idx];
        t->begin = off;
        off += t->nbytes;
    }
    root = build_header(w);
    hdr = root ? json_dumps(root, JSON_COMPACT) : NULL;
    if (!hdr) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory building the header of %s", path);
        goto fail;
    }
    size_t hlen = strlen(hdr);
    size_t pad = (8 - (8 + hlen) % 8) % 8; /* data region starts 8-byte aligned */
    uint64_t total = hlen + pad;
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(total >> (8 * i));
    static const char spaces[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};

    f = fopen(tmp, "wb");
    if (!f) {
        s = CP_ERROR(CP_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        goto fail;
    }
    bool ok = write_all(f, le, 8) && write_all(f, hdr, hlen) && write_all(f, spaces, pad);
    for (int64_t i = 0; ok && i < w->n; i++) {
        const wr_tensor *t = &w->t[order[i].idx];
        if (!t->fill) {
            ok = write_all(f, t->data, t->nbytes);
            continue;
        }
        void *buf = malloc(t->nbytes ? t->nbytes : 1);
        if (!buf) {
            s = CP_ERROR(CP_ERR_OOM, "out of memory writing tensor '%s' of %s", t->name, path);
            goto fail;
        }
        s = t->fill(t->fill_user, buf, t->nbytes);
        if (s == CP_OK) ok = write_all(f, buf, t->nbytes);
        free(buf);
        if (s != CP_OK) goto fail;
    }
    if (!ok || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        s = CP_ERROR(CP_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
        goto fail;
    }
    int rc = fclose(f);
    f = NULL;
    if (rc != 0) {
        s = CP_ERROR(CP_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        s = CP_ERROR(CP_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto fail;
    }
    goto done;
fail:
    if (f) fclose(f);
    remove(tmp);
done:
    free(tmp);
    free(hdr);
    json_decref(root);
    free(order);
    return s;
}
