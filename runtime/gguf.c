/* gguf.c - validating GGUF v2/v3 reader. The whole header (metadata and
 * tensor directory) is parsed through a bounds-checked cursor once at open;
 * every tensor's type, shape, alignment and extent is checked against the
 * file, so accessors afterwards cannot read outside the mapping. */
#define _DEFAULT_SOURCE /* madvise */
#include "cp_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 256        /* tensor names longer than this are rejected */
#define GGUF_MAX_ARRAY_DEPTH 4

typedef struct gguf_kv {
    cp_str key;
    cp_gguf_type type;
    union {
        uint64_t u;
        int64_t i;
        double f;
        bool b;
        cp_str s;
    } v;
    /* arrays */
    cp_gguf_type arr_type;
    uint64_t arr_n;
    const uint8_t *arr_data; /* numeric arrays: packed elements */
    cp_str *arr_strs;        /* string arrays: one per element */
    size_t begin, end;       /* the entry's bytes in the file (key, type, value) */
} gguf_kv;

struct cp_gguf {
    const uint8_t *base;
    size_t size;
    bool mapped;
    uint32_t version;
    int64_t n_kv;
    gguf_kv *kv;
    int64_t n_tensors;
    cp_weight_info *tensors;
    char *names; /* NUL-terminated copies of the tensor names */
    size_t alignment;
    size_t data_offset;
    size_t kv_begin, kv_end; /* the metadata section's bytes */
};

typedef struct cursor {
    const uint8_t *p;
    size_t size;
    size_t off;
    const char *what; /* context for error messages */
} cursor;

static cp_status need(cursor *c, size_t n) {
    if (n > c->size - c->off)
        return CP_ERROR(CP_ERR_FORMAT,
                        "GGUF file is truncated: %s needs %zu bytes at offset %zu but the file "
                        "has %zu bytes",
                        c->what, n, c->off, c->size);
    return CP_OK;
}

static cp_status rd(cursor *c, void *dst, size_t n) {
    CP_CHECK(need(c, n));
    memcpy(dst, c->p + c->off, n);
    c->off += n;
    return CP_OK;
}

static cp_status rd_u32(cursor *c, uint32_t *v) { return rd(c, v, 4); }
static cp_status rd_u64(cursor *c, uint64_t *v) { return rd(c, v, 8); }

static cp_status rd_str(cursor *c, cp_str *s) {
    uint64_t n;
    CP_CHECK(rd_u64(c, &n));
    if (n > c->size - c->off)
        return CP_ERROR(CP_ERR_FORMAT,
                        "GGUF file is corrupt: %s has a string of %llu bytes at offset %zu, past "
                        "the end of the file (%zu bytes)",
                        c->what, (unsigned long long)n, c->off, c->size);
    s->ptr = (const char *)c->p + c->off;
    s->len = (size_t)n;
    c->off += (size_t)n;
    return CP_OK;
}

size_t cp_gguf_type_size(cp_gguf_type t) {
    switch (t) {
    case CP_GGUF_UINT8:
    case CP_GGUF_INT8:
    case CP_GGUF_BOOL: return 1;
    case CP_GGUF_UINT16:
    case CP_GGUF_INT16: return 2;
    case CP_GGUF_UINT32:
    case CP_GGUF_INT32:
    case CP_GGUF_FLOAT32: return 4;
    case CP_GGUF_UINT64:
    case CP_GGUF_INT64:
    case CP_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

static bool str_eq(cp_str s, const char *z) {
    size_t n = strlen(z);
    return s.len == n && memcmp(s.ptr, z, n) == 0;
}

/* Reads one scalar at the cursor into kv->v. */
static cp_status rd_scalar(cursor *c, cp_gguf_type t, gguf_kv *kv) {
    uint8_t buf[8] = {0};
    size_t n = cp_gguf_type_size(t);
    CP_CHECK(rd(c, buf, n));
    switch (t) {
    case CP_GGUF_UINT8: kv->v.u = buf[0]; break;
    case CP_GGUF_INT8: kv->v.i = (int8_t)buf[0]; break;
    case CP_GGUF_BOOL:
        if (buf[0] > 1)
            return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s: bool value %u", c->what,
                            buf[0]);
        kv->v.b = buf[0] != 0;
        break;
    case CP_GGUF_UINT16: { uint16_t x; memcpy(&x, buf, 2); kv->v.u = x; break; }
    case CP_GGUF_INT16: { int16_t x; memcpy(&x, buf, 2); kv->v.i = x; break; }
    case CP_GGUF_UINT32: { uint32_t x; memcpy(&x, buf, 4); kv->v.u = x; break; }
    case CP_GGUF_INT32: { int32_t x; memcpy(&x, buf, 4); kv->v.i = x; break; }
    case CP_GGUF_FLOAT32: { float x; memcpy(&x, buf, 4); kv->v.f = x; break; }
    case CP_GGUF_UINT64: { uint64_t x; memcpy(&x, buf, 8); kv->v.u = x; break; }
    case CP_GGUF_INT64: { int64_t x; memcpy(&x, buf, 8); kv->v.i = x; break; }
    case CP_GGUF_FLOAT64: { double x; memcpy(&x, buf, 8); kv->v.f = x; break; }
    default: return CP_ERROR(CP_ERR_INTERNAL, "rd_scalar: type %d", (int)t);
    }
    return CP_OK;
}

/* Skips a nested array (arrays of arrays are legal GGUF but no key we use has
 * them); depth bounds the recursion on hostile input. */
static cp_status skip_array(cursor *c, int depth) {
    uint32_t t;
    uint64_t n;
    if (depth > GGUF_MAX_ARRAY_DEPTH)
        return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s: arrays nested too deeply",
                        c->what);
    CP_CHECK(rd_u32(c, &t));
    CP_CHECK(rd_u64(c, &n));
    if (t == CP_GGUF_STRING) {
        for (uint64_t j = 0; j < n; j++) {
            cp_str s;
            CP_CHECK(rd_str(c, &s));
        }
    } else if (t == CP_GGUF_ARRAY) {
        for (uint64_t j = 0; j < n; j++) CP_CHECK(skip_array(c, depth + 1));
    } else {
        size_t es = cp_gguf_type_size((cp_gguf_type)t);
        if (es == 0)
            return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s: unknown array type %u",
                            c->what, t);
        if (n > (c->size - c->off) / es) return need(c, SIZE_MAX);
        c->off += (size_t)n * es;
    }
    return CP_OK;
}

static cp_status rd_value(cursor *c, gguf_kv *kv) {
    uint32_t t;
    CP_CHECK(rd_u32(c, &t));
    kv->type = (cp_gguf_type)t;
    if (t == CP_GGUF_STRING) return rd_str(c, &kv->v.s);
    if (t != CP_GGUF_ARRAY) {
        if (cp_gguf_type_size((cp_gguf_type)t) == 0)
            return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s has unknown value type %u",
                            c->what, t);
        return rd_scalar(c, (cp_gguf_type)t, kv);
    }
    uint32_t at;
    uint64_t n;
    CP_CHECK(rd_u32(c, &at));
    CP_CHECK(rd_u64(c, &n));
    kv->arr_type = (cp_gguf_type)at;
    kv->arr_n = n;
    if (at == CP_GGUF_STRING) {
        /* each element takes at least its 8-byte length */
        if (n > (c->size - c->off) / 8)
            return CP_ERROR(CP_ERR_FORMAT,
                            "GGUF file is truncated: %s claims %llu strings, more than the file "
                            "can hold",
                            c->what, (unsigned long long)n);
        kv->arr_strs = malloc((size_t)(n ? n : 1) * sizeof(cp_str));
        if (!kv->arr_strs) return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", c->what);
        for (uint64_t j = 0; j < n; j++) CP_CHECK(rd_str(c, &kv->arr_strs[j]));
        return CP_OK;
    }
    if (at == CP_GGUF_ARRAY) {
        for (uint64_t j = 0; j < n; j++) CP_CHECK(skip_array(c, 1));
        return CP_OK;
    }
    size_t es = cp_gguf_type_size((cp_gguf_type)at);
    if (es == 0)
        return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s is an array of unknown type %u",
                        c->what, at);
    if (n > (c->size - c->off) / es)
        return CP_ERROR(CP_ERR_FORMAT,
                        "GGUF file is truncated: %s claims %llu elements of %zu bytes at offset "
                        "%zu, past the end of the file (%zu bytes)",
                        c->what, (unsigned long long)n, es, c->off, c->size);
    if (at == CP_GGUF_BOOL) {
        for (uint64_t j = 0; j < n; j++)
            if (c->p[c->off + j] > 1)
                return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s: bool element %u",
                                c->what, c->p[c->off + j]);
    }
    kv->arr_data = c->p + c->off;
    c->off += (size_t)n * es;
    return CP_OK;
}

static void free_contents(cp_gguf_t g) {
    if (g->kv)
        for (int64_t i = 0; i < g->n_kv; i++) free(g->kv[i].arr_strs);
    free(g->kv);
    free(g->tensors);
    free(g->names);
}

void cp_gguf_close(cp_gguf_t g) {
    if (!g) return;
    free_contents(g);
    if (g->mapped && g->base) munmap((void *)g->base, g->size);
    free(g);
}

static cp_status parse(cp_gguf_t g) {
    cursor c = {g->base, g->size, 0, "the header"};
    uint32_t magic;
    uint64_t n_tensors, n_kv;
    if (g->size < 24)
        return CP_ERROR(CP_ERR_FORMAT, "not a GGUF file: %zu bytes is shorter than a GGUF header",
                        g->size);
    CP_CHECK(rd_u32(&c, &magic));
    if (magic != GGUF_MAGIC)
        return CP_ERROR(CP_ERR_FORMAT, "not a GGUF file: bad magic 0x%08x (expected \"GGUF\")",
                        magic);
    CP_CHECK(rd_u32(&c, &g->version));
    if (g->version != 2 && g->version != 3)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "GGUF version %u is not supported (only 2 and 3)",
                        g->version);
    CP_CHECK(rd_u64(&c, &n_tensors));
    CP_CHECK(rd_u64(&c, &n_kv));
    /* a key takes >= 12 bytes, a tensor entry >= 24: reject counts the file cannot hold */
    if (n_kv > g->size / 12 || n_tensors > g->size / 24)
        return CP_ERROR(CP_ERR_FORMAT,
                        "GGUF file is truncated or corrupt: it declares %llu metadata keys and %llu "
                        "tensors, which cannot fit in %zu bytes",
                        (unsigned long long)n_kv, (unsigned long long)n_tensors, g->size);
    g->kv = calloc((size_t)(n_kv ? n_kv : 1), sizeof(gguf_kv));
    g->tensors = calloc((size_t)(n_tensors ? n_tensors : 1), sizeof(cp_weight_info));
    if (!g->kv || !g->tensors) return CP_ERROR(CP_ERR_OOM, "out of memory reading GGUF header");

    char what[160];
    c.what = what;
    g->kv_begin = c.off;
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g->kv[i];
        snprintf(what, sizeof(what), "metadata entry %llu", (unsigned long long)i);
        kv->begin = c.off;
        CP_CHECK(rd_str(&c, &kv->key));
        g->n_kv = (int64_t)i + 1; /* so that free_contents sees arr_strs of this entry */
        snprintf(what, sizeof(what), "metadata key '%.*s'", (int)(kv->key.len > 100 ? 100 : kv->key.len),
                 kv->key.ptr);
        if (kv->key.len == 0)
            return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: metadata entry %llu has an empty key",
                            (unsigned long long)i);
        CP_CHECK(rd_value(&c, kv));
        kv->end = c.off;
        for (uint64_t j = 0; j < i; j++)
            if (g->kv[j].key.len == kv->key.len && !memcmp(g->kv[j].key.ptr, kv->key.ptr, kv->key.len))
                return CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: duplicate %s", what);
    }

    g->kv_end = c.off;
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = cp_gguf_find_key(g, "general.alignment");
    if (ai >= 0) {
        gguf_kv *kv = &g->kv[ai];
        if (kv->type != CP_GGUF_UINT32 || kv->v.u == 0 || (kv->v.u & (kv->v.u - 1)) != 0)
            return CP_ERROR(CP_ERR_FORMAT,
                            "GGUF file is corrupt: general.alignment must be a power-of-two uint32");
        g->alignment = (size_t)kv->v.u;
    }

    /* tensor directory */
    size_t names_bytes = 0;
    cp_str *tnames = calloc((size_t)(n_tensors ? n_tensors : 1), sizeof(cp_str));
    if (!tnames) return CP_ERROR(CP_ERR_OOM, "out of memory reading GGUF tensor directory");
    cp_status st = CP_OK;
    for (uint64_t i = 0; i < n_tensors; i++) {
        cp_weight_info *t = &g->tensors[i];
        uint32_t nd, type;
        uint64_t off;
        snprintf(what, sizeof(what), "tensor entry %llu", (unsigned long long)i);
        CP_CHECK_GOTO(rd_str(&c, &tnames[i]), st, done);
        snprintf(what, sizeof(what), "tensor '%.*s'", (int)(tnames[i].len > 100 ? 100 : tnames[i].len),
                 tnames[i].ptr);
        if (tnames[i].len == 0 || tnames[i].len > GGUF_MAX_NAME || memchr(tnames[i].ptr, 0, tnames[i].len)) {
            st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s has an invalid name", what);
            goto done;
        }
        names_bytes += tnames[i].len + 1;
        CP_CHECK_GOTO(rd_u32(&c, &nd), st, done);
        if (nd == 0 || nd > GGUF_MAX_DIMS) {
            st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s has %u dimensions (1..%d allowed)",
                          what, nd, GGUF_MAX_DIMS);
            goto done;
        }
        t->ndim = (int)nd;
        for (int d = 0; d < CP_MAX_DIMS; d++) t->ne[d] = 1;
        uint64_t nel = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne;
            CP_CHECK_GOTO(rd_u64(&c, &ne), st, done);
            if (ne == 0 || ne > (uint64_t)INT64_MAX / nel) {
                st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s has dimension %u = %llu", what,
                              d, (unsigned long long)ne);
                goto done;
            }
            nel *= ne;
            t->ne[d] = (int64_t)ne;
        }
        CP_CHECK_GOTO(rd_u32(&c, &type), st, done);
        if (!cp_dtype_is_gguf((int)type)) {
            st = CP_ERROR(CP_ERR_UNSUPPORTED, "%s has tensor type %u, which this build does not know",
                          what, type);
            goto done;
        }
        t->dtype = (cp_dtype)type;
        int64_t bs = cp_dtype_block_size(t->dtype);
        if (t->ne[0] % bs != 0) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "GGUF file is corrupt: %s: row length %lld is not a multiple of the %s "
                          "block size %lld",
                          what, (long long)t->ne[0], cp_dtype_name(t->dtype), (long long)bs);
            goto done;
        }
        /* bytes = rows * row size, with overflow checks */
        uint64_t row = cp_dtype_row_size(t->dtype, t->ne[0]);
        uint64_t rows = nel / (uint64_t)t->ne[0];
        if (row != 0 && rows > SIZE_MAX / row) {
            st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: %s is too large", what);
            goto done;
        }
        t->nbytes = (size_t)(rows * row);
        CP_CHECK_GOTO(rd_u64(&c, &off), st, done);
        if (off % g->alignment != 0) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "GGUF file is corrupt: %s data offset %llu is not aligned to %zu", what,
                          (unsigned long long)off, g->alignment);
            goto done;
        }
        t->file_offset = off; /* relative for now, made absolute below */
    }
    /* the data region starts at the next aligned offset */
    g->data_offset = (c.off + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_offset > g->size && n_tensors > 0) {
        st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is truncated: no room for tensor data after the header");
        goto done;
    }
    g->names = malloc(names_bytes ? names_bytes : 1);
    if (!g->names) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory reading GGUF tensor names");
        goto done;
    }
    size_t np = 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        cp_weight_info *t = &g->tensors[i];
        memcpy(g->names + np, tnames[i].ptr, tnames[i].len);
        g->names[np + tnames[i].len] = '\0';
        t->name = g->names + np;
        np += tnames[i].len + 1;
        uint64_t rel = t->file_offset;
        if (rel > g->size - g->data_offset || t->nbytes > g->size - g->data_offset - rel) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "GGUF file is truncated: tensor '%s' (%s, %zu bytes) ends at byte %llu "
                          "but the file has %zu bytes",
                          t->name, cp_dtype_name(t->dtype), t->nbytes,
                          (unsigned long long)(g->data_offset + rel + t->nbytes), g->size);
            goto done;
        }
        t->file_offset = g->data_offset + rel;
        t->data = g->base + t->file_offset;
        for (uint64_t j = 0; j < i; j++)
            if (!strcmp(g->tensors[j].name, t->name)) {
                st = CP_ERROR(CP_ERR_FORMAT, "GGUF file is corrupt: duplicate tensor '%s'", t->name);
                goto done;
            }
    }
    g->n_tensors = (int64_t)n_tensors;
done:
    free(tnames);
    return st;
}

static cp_status open_common(cp_gguf_t g, cp_gguf_t *out) {
    cp_status st = parse(g);
    if (st != CP_OK) {
        cp_gguf_close(g);
        return st;
    }
    *out = g;
    return CP_OK;
}

cp_status cp_gguf_open_memory(const void *data, size_t size, cp_gguf_t *out) {
    *out = NULL;
    cp_gguf_t g = calloc(1, sizeof(*g));
    if (!g) return CP_ERROR(CP_ERR_OOM, "out of memory");
    g->base = data;
    g->size = size;
    return open_common(g, out);
}

cp_status cp_gguf_open(const char *path, cp_gguf_t *out) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return CP_ERROR(CP_ERR_IO, "cannot open model file '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return CP_ERROR(CP_ERR_IO, "model path '%s' is not a regular file", path);
    }
    if (sb.st_size < 24) {
        close(fd);
        return CP_ERROR(CP_ERR_FORMAT, "'%s' is not a GGUF file: %lld bytes is shorter than a GGUF header",
                        path, (long long)sb.st_size);
    }
    void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return CP_ERROR(CP_ERR_IO, "cannot map '%s': %s", path, strerror(errno));
    cp_gguf_t g = calloc(1, sizeof(*g));
    if (!g) {
        munmap(p, (size_t)sb.st_size);
        return CP_ERROR(CP_ERR_OOM, "out of memory");
    }
    g->base = p;
    g->size = (size_t)sb.st_size;
    g->mapped = true;
    cp_status st = open_common(g, out);
    if (st != CP_OK) {
        /* prefix the path so the user knows which file */
        char msg[900];
        snprintf(msg, sizeof(msg), "%s", cp_last_error_detail());
        return CP_ERROR(st, "%s: %s", path, msg);
    }
    return CP_OK;
}

void cp_gguf_release(cp_gguf_t g, const void *p, size_t n) {
    if (!g->mapped || n == 0) return;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t b = (uintptr_t)p, e = b + n;
    if (b < (uintptr_t)g->base || e > (uintptr_t)g->base + g->size) return;
    /* whole pages only: a shared edge page may hold data still in use
     * (reading it later would just fault it in again, but keep it cheap) */
    b = (b + page - 1) & ~(page - 1);
    e &= ~(page - 1);
    if (e > b) madvise((void *)b, e - b, MADV_DONTNEED);
}

size_t cp_gguf_data_offset(cp_gguf_t g) { return g->data_offset; }

uint32_t cp_gguf_version(cp_gguf_t g) { return g->version; }
size_t cp_gguf_file_size(cp_gguf_t g) { return g->size; }
int64_t cp_gguf_n_kv(cp_gguf_t g) { return g->n_kv; }

const void *cp_gguf_kv_bytes(cp_gguf_t g, size_t *len) {
    *len = g->kv_end - g->kv_begin;
    return g->base + g->kv_begin;
}

cp_status cp_gguf_kv_bytes_with(cp_gguf_t g, const cp_gguf_kv_u32 *set, int n_set, void **bytes, size_t *len,
                                int64_t *n_kv) {
    *bytes = NULL;
    *len = 0;
    *n_kv = 0;
    size_t cap = g->kv_end - g->kv_begin;
    for (int k = 0; k < n_set; k++) cap += 8 + strlen(set[k].key) + 4 + 4;
    unsigned char *o = malloc(cap ? cap : 1), *p = o;
    if (!o) return CP_ERROR(CP_ERR_OOM, "out of memory writing GGUF metadata");
    /* one entry of `set` as GGUF bytes */
#define PUT_U32_ENTRY(key, value)                                                                                      \
    do {                                                                                                               \
        const uint64_t kl_ = strlen(key);                                                                              \
        const uint32_t ty_ = CP_GGUF_UINT32, v_ = (value);                                                             \
        memcpy(p, &kl_, 8), p += 8;                                                                                    \
        memcpy(p, key, kl_), p += kl_;                                                                                 \
        memcpy(p, &ty_, 4), p += 4;                                                                                    \
        memcpy(p, &v_, 4), p += 4;                                                                                     \
    } while (0)
    bool *used = calloc((size_t)(n_set > 0 ? n_set : 1), sizeof(bool));
    if (!used) {
        free(o);
        return CP_ERROR(CP_ERR_OOM, "out of memory writing GGUF metadata");
    }
    for (int64_t i = 0; i < g->n_kv; i++) {
        const gguf_kv *kv = &g->kv[i];
        int k = 0;
        while (k < n_set && !(strlen(set[k].key) == kv->key.len && !memcmp(set[k].key, kv->key.ptr, kv->key.len)))
            k++;
        if (k < n_set) {
            PUT_U32_ENTRY(set[k].key, set[k].value);
            used[k] = true;
        } else {
            memcpy(p, g->base + kv->begin, kv->end - kv->begin);
            p += kv->end - kv->begin;
        }
        (*n_kv)++;
    }
    for (int k = 0; k < n_set; k++)
        if (!used[k]) {
            PUT_U32_ENTRY(set[k].key, set[k].value);
            (*n_kv)++;
        }
#undef PUT_U32_ENTRY
    free(used);
    *bytes = o;
    *len = (size_t)(p - o);
    return CP_OK;
}

size_t cp_gguf_alignment(cp_gguf_t g) { return g->alignment; }

int64_t cp_gguf_find_key(cp_gguf_t g, const char *key) {
    for (int64_t i = 0; i < g->n_kv; i++)
        if (str_eq(g->kv[i].key, key)) return i;
    return -1;
}

cp_str cp_gguf_key(cp_gguf_t g, int64_t i) { return g->kv[i].key; }
cp_gguf_type cp_gguf_kv_type(cp_gguf_t g, int64_t i) { return g->kv[i].type; }
cp_gguf_type cp_gguf_arr_type(cp_gguf_t g, int64_t i) { return g->kv[i].arr_type; }
uint64_t cp_gguf_arr_n(cp_gguf_t g, int64_t i) {
    return g->kv[i].type == CP_GGUF_ARRAY ? g->kv[i].arr_n : 0;
}
const void *cp_gguf_arr_data(cp_gguf_t g, int64_t i) { return g->kv[i].arr_data; }
cp_str cp_gguf_arr_str(cp_gguf_t g, int64_t i, uint64_t j) {
    cp_str none = {"", 0};
    const gguf_kv *kv = &g->kv[i];
    if (kv->type != CP_GGUF_ARRAY || kv->arr_type != CP_GGUF_STRING || j >= kv->arr_n) return none;
    return kv->arr_strs[j];
}

static cp_status find_kv(cp_gguf_t g, const char *key, const gguf_kv **out) {
    int64_t i = cp_gguf_find_key(g, key);
    if (i < 0) return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata key '%s' is missing", key);
    *out = &g->kv[i];
    return CP_OK;
}

static bool is_unsigned(cp_gguf_type t) {
    return t == CP_GGUF_UINT8 || t == CP_GGUF_UINT16 || t == CP_GGUF_UINT32 || t == CP_GGUF_UINT64;
}
static bool is_signed(cp_gguf_type t) {
    return t == CP_GGUF_INT8 || t == CP_GGUF_INT16 || t == CP_GGUF_INT32 || t == CP_GGUF_INT64;
}

cp_status cp_gguf_get_u64(cp_gguf_t g, const char *key, uint64_t *out) {
    const gguf_kv *kv = NULL;
    CP_CHECK(find_kv(g, key, &kv));
    if (is_unsigned(kv->type)) { *out = kv->v.u; return CP_OK; }
    if (is_signed(kv->type) && kv->v.i >= 0) { *out = (uint64_t)kv->v.i; return CP_OK; }
    return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' is not a non-negative integer", key);
}

cp_status cp_gguf_get_i64(cp_gguf_t g, const char *key, int64_t *out) {
    const gguf_kv *kv = NULL;
    CP_CHECK(find_kv(g, key, &kv));
    if (is_signed(kv->type)) { *out = kv->v.i; return CP_OK; }
    if (is_unsigned(kv->type) && kv->v.u <= (uint64_t)INT64_MAX) { *out = (int64_t)kv->v.u; return CP_OK; }
    return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' is not an integer", key);
}

cp_status cp_gguf_get_f32(cp_gguf_t g, const char *key, float *out) {
    const gguf_kv *kv = NULL;
    CP_CHECK(find_kv(g, key, &kv));
    if (kv->type == CP_GGUF_FLOAT32 || kv->type == CP_GGUF_FLOAT64) { *out = (float)kv->v.f; return CP_OK; }
    if (is_signed(kv->type)) { *out = (float)kv->v.i; return CP_OK; }
    if (is_unsigned(kv->type)) { *out = (float)kv->v.u; return CP_OK; }
    return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' is not a number", key);
}

cp_status cp_gguf_get_bool(cp_gguf_t g, const char *key, bool *out) {
    const gguf_kv *kv = NULL;
    CP_CHECK(find_kv(g, key, &kv));
    if (kv->type != CP_GGUF_BOOL) return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' is not a bool", key);
    *out = kv->v.b;
    return CP_OK;
}

cp_status cp_gguf_get_str(cp_gguf_t g, const char *key, cp_str *out) {
    const gguf_kv *kv = NULL;
    CP_CHECK(find_kv(g, key, &kv));
    if (kv->type != CP_GGUF_STRING) return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' is not a string", key);
    *out = kv->v.s;
    return CP_OK;
}

int64_t cp_gguf_get_i64_or(cp_gguf_t g, const char *key, int64_t dflt) {
    int64_t v = 0;
    if (cp_gguf_find_key(g, key) < 0 || cp_gguf_get_i64(g, key, &v) != CP_OK) return dflt;
    return v;
}

float cp_gguf_get_f32_or(cp_gguf_t g, const char *key, float dflt) {
    float v = 0;
    if (cp_gguf_find_key(g, key) < 0 || cp_gguf_get_f32(g, key, &v) != CP_OK) return dflt;
    return v;
}

bool cp_gguf_get_bool_or(cp_gguf_t g, const char *key, bool dflt) {
    bool v = false;
    if (cp_gguf_find_key(g, key) < 0 || cp_gguf_get_bool(g, key, &v) != CP_OK) return dflt;
    return v;
}

bool cp_gguf_get_str_buf(cp_gguf_t g, const char *key, char *buf, size_t cap) {
    int64_t i = cp_gguf_find_key(g, key);
    if (i < 0 || g->kv[i].type != CP_GGUF_STRING || cap == 0) return false;
    size_t n = g->kv[i].v.s.len < cap - 1 ? g->kv[i].v.s.len : cap - 1;
    memcpy(buf, g->kv[i].v.s.ptr, n);
    buf[n] = '\0';
    return true;
}

int64_t cp_gguf_n_tensors(cp_gguf_t g) { return g->n_tensors; }

const cp_weight_info *cp_gguf_tensor(cp_gguf_t g, int64_t i) {
    return (i >= 0 && i < g->n_tensors) ? &g->tensors[i] : NULL;
}

const cp_weight_info *cp_gguf_find_tensor(cp_gguf_t g, const char *name) {
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (!strcmp(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

/* ---- model configuration --------------------------------------------- */

static cp_status arch_int(cp_gguf_t g, const char *arch, const char *suffix, int *out, bool required,
                          int dflt) {
    char key[128];
    int64_t v = 0;
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int64_t i = cp_gguf_find_key(g, key);
    if (i < 0) {
        if (required) return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata key '%s' is missing", key);
        *out = dflt;
        return CP_OK;
    }
    if (g->kv[i].type == CP_GGUF_ARRAY)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "GGUF metadata '%s' varies per layer, which this build does not support", key);
    CP_CHECK(cp_gguf_get_i64(g, key, &v));
    if (v < 0 || v > INT32_MAX)
        return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata '%s' = %lld is out of range", key, (long long)v);
    *out = (int)v;
    return CP_OK;
}

static float arch_f32(cp_gguf_t g, const char *arch, const char *suffix, float dflt) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    return cp_gguf_get_f32_or(g, key, dflt);
}

cp_status cp_gguf_model_config(cp_gguf_t g, cp_model_config *cfg) {
    return cp_gguf_model_config_with(g, NULL, NULL, cfg);
}

cp_status cp_gguf_model_config_with(cp_gguf_t g, const cp_weight_info *(*find)(void *ctx, const char *name),
                                    void *find_ctx, cp_model_config *cfg) {
#define FIND(name) (find ? find(find_ctx, name) : cp_gguf_find_tensor(g, name))
    memset(cfg, 0, sizeof(*cfg));
    char arch[32];
    if (!cp_gguf_get_str_buf(g, "general.architecture", arch, sizeof(arch)))
        return CP_ERROR(CP_ERR_FORMAT, "GGUF metadata 'general.architecture' is missing");
    bool half_rope;
    if (!strcmp(arch, "llama") || !strcmp(arch, "mistral") || !strcmp(arch, "granite")) {
        half_rope = false; /* llama-family GGUF files store Q/K permuted for interleaved RoPE */
    } else if (!strcmp(arch, "qwen2")) {
        half_rope = true;
    } else {
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "model architecture '%s' is not supported (supported: llama, mistral, qwen2)",
                        arch);
    }
    if (!strcmp(arch, "granite"))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "model architecture 'granite' is not supported yet");
    snprintf(cfg->arch, sizeof(cfg->arch), "%s", arch);
    cp_gguf_get_str_buf(g, "general.name", cfg->name, sizeof(cfg->name));
    CP_CHECK(arch_int(g, arch, "block_count", &cfg->n_layer, true, 0));
    CP_CHECK(arch_int(g, arch, "embedding_length", &cfg->dim, true, 0));
    CP_CHECK(arch_int(g, arch, "feed_forward_length", &cfg->ffn_dim, true, 0));
    CP_CHECK(arch_int(g, arch, "attention.head_count", &cfg->n_head, true, 0));
    CP_CHECK(arch_int(g, arch, "attention.head_count_kv", &cfg->n_head_kv, false, cfg->n_head));
    CP_CHECK(arch_int(g, arch, "context_length", &cfg->ctx_train, false, 4096));
    int dflt_hd = cfg->n_head > 0 ? cfg->dim / cfg->n_head : 0;
    CP_CHECK(arch_int(g, arch, "attention.key_length", &cfg->head_dim, false, dflt_hd));
    CP_CHECK(arch_int(g, arch, "rope.dimension_count", &cfg->rot_dim, false, cfg->head_dim));
    cfg->norm_eps = arch_f32(g, arch, "attention.layer_norm_rms_epsilon", 1e-5f);
    cfg->rope_theta = arch_f32(g, arch, "rope.freq_base", 10000.0f);
    cfg->rope_freq_scale = 1.0f;
    char key[128], stype[32] = "";
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    cp_gguf_get_str_buf(g, key, stype, sizeof(stype));
    float factor = arch_f32(g, arch, "rope.scaling.factor", 0.0f);
    if (!strcmp(stype, "linear") && factor > 0) {
        cfg->rope_freq_scale = 1.0f / factor;
    } else if (stype[0] && strcmp(stype, "none") != 0 && strcmp(stype, "linear") != 0) {
        return CP_ERROR(CP_ERR_UNSUPPORTED, "RoPE scaling type '%s' is not supported", stype);
    }
    cfg->rope_mode = half_rope ? CP_ROPE_HALF : CP_ROPE_INTERLEAVED;

    /* vocabulary: explicit key, else the token list, else the embedding rows */
    const cp_weight_info *emb = FIND("token_embd.weight");
    if (!emb) return CP_ERROR(CP_ERR_FORMAT, "model file has no tensor 'token_embd.weight'");
    int vocab = 0;
    CP_CHECK(arch_int(g, arch, "vocab_size", &vocab, false, 0));
    if (vocab == 0) {
        int64_t ti = cp_gguf_find_key(g, "tokenizer.ggml.tokens");
        vocab = ti >= 0 ? (int)cp_gguf_arr_n(g, ti) : (int)emb->ne[1];
    }
    cfg->n_vocab = vocab;
    cfg->tied_embeddings = FIND("output.weight") == NULL;
    cfg->qkv_bias = FIND("blk.0.attn_q.bias") != NULL;
#undef FIND
    return cp_model_config_validate(cfg);
}
