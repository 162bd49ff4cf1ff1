/* quantize.c - GGUF in, GGUF out: the metadata section copied byte for
 * byte, a new tensor directory, and each weight matrix converted row by row
 * (dequantize to fp32, quantize) through the CPU backend. */
#define _POSIX_C_SOURCE 200809L
#include "cp_quantize.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cp_backend.h"
#include "cp_gguf.h"

static bool is_target(cp_dtype t) {
    switch (t) {
    case CP_DTYPE_F32:
    case CP_DTYPE_F16:
    case CP_DTYPE_BF16:
    case CP_DTYPE_Q8_0:
    case CP_DTYPE_Q4_0:
    case CP_DTYPE_Q4_1:
    case CP_DTYPE_Q4_K:
    case CP_DTYPE_Q6_K: return true;
    default: return false;
    }
}

/* The type a matrix of `cols` columns gets for target t. */
static cp_dtype pick(cp_dtype t, int64_t cols) {
    if (cols % cp_dtype_block_size(t) == 0) return t;
    cp_dtype f = (t == CP_DTYPE_Q4_K || t == CP_DTYPE_Q4_0 || t == CP_DTYPE_Q4_1) ? CP_DTYPE_Q4_0
                                                                                   : CP_DTYPE_Q8_0;
    return cols % cp_dtype_block_size(f) == 0 ? f : CP_DTYPE_F16;
}

static cp_status put(FILE *f, const void *p, size_t n, const char *path) {
    if (n && fwrite(p, 1, n, f) != n)
        return CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return CP_OK;
}

static cp_status pad(FILE *f, size_t *off, size_t align, const char *path) {
    static const char zeros[256];
    size_t n = (align - *off % align) % align;
    *off += n;
    return put(f, zeros, n, path);
}

cp_status cp_quantize_gguf(const char *in, const char *out, const cp_quantize_opts *o,
                           cp_quantize_stats *stats) {
    if (!in || !out || !o || !stats)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_quantize_gguf: NULL argument");
    memset(stats, 0, sizeof(*stats));
    if (!is_target(o->type))
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s cannot be a target type", cp_dtype_name(o->type));
    cp_gguf_t g = NULL;
    CP_CHECK(cp_gguf_open(in, &g));
    cp_backend_t host = NULL;
    FILE *f = NULL;
    cp_dtype *types = NULL;
    float *row = NULL;
    char *dst = NULL;
    cp_status st;
    CP_CHECK_GOTO(cp_backend_cpu_init(1, &host), st, done);
    const int64_t nt = cp_gguf_n_tensors(g);
    const size_t align = cp_gguf_alignment(g);
    types = malloc((size_t)(nt ? nt : 1) * sizeof(cp_dtype));
    if (!types) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    size_t total = 0, max_cols = 1, max_row = 1;
    for (int64_t i = 0; i < nt; i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        total += w->nbytes;
        types[i] = w->dtype;
        if (w->ndim >= 2 && w->dtype != o->type) types[i] = pick(o->type, w->ne[0]);
        if ((size_t)w->ne[0] > max_cols) max_cols = (size_t)w->ne[0];
        size_t rb = cp_dtype_row_size(types[i], w->ne[0]);
        if (rb > max_row) max_row = rb;
    }
    row = malloc(max_cols * sizeof(float));
    dst = malloc(max_row);
    if (!row || !dst) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto done;
    }
    f = fopen(out, "wb");
    if (!f) {
        st = CP_ERROR(CP_ERR_IO, "cannot create '%s': %s", out, strerror(errno));
        goto done;
    }
    /* header and metadata as they were */
    size_t kv_len = 0;
    const void *kv = cp_gguf_kv_bytes(g, &kv_len);
    uint32_t magic_version[2] = {0x46554747u /* "GGUF" */, 3};
    uint64_t counts[2] = {(uint64_t)nt, (uint64_t)cp_gguf_n_kv(g)};
    size_t off = sizeof(magic_version) + sizeof(counts) + kv_len;
    CP_CHECK_GOTO(put(f, magic_version, sizeof(magic_version), out), st, done);
    CP_CHECK_GOTO(put(f, counts, sizeof(counts), out), st, done);
    CP_CHECK_GOTO(put(f, kv, kv_len, out), st, done);
    /* the tensor directory with the new types and offsets */
    uint64_t data_off = 0;
    for (int64_t i = 0; i < nt; i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        uint64_t len = strlen(w->name);
        uint32_t nd = (uint32_t)w->ndim, type = (uint32_t)types[i];
        CP_CHECK_GOTO(put(f, &len, 8, out), st, done);
        CP_CHECK_GOTO(put(f, w->name, len, out), st, done);
        CP_CHECK_GOTO(put(f, &nd, 4, out), st, done);
        for (int d = 0; d < w->ndim; d++) {
            uint64_t ne = (uint64_t)w->ne[d];
            CP_CHECK_GOTO(put(f, &ne, 8, out), st, done);
        }
        CP_CHECK_GOTO(put(f, &type, 4, out), st, done);
        CP_CHECK_GOTO(put(f, &data_off, 8, out), st, done);
        off += 8 + len + 4 + 8 * (size_t)w->ndim + 4 + 8;
        int64_t rows = 1;
        for (int d = 1; d < w->ndim; d++)
            rows *= w->ne[d];
        data_off += cp_dtype_row_size(types[i], w->ne[0]) * (uint64_t)rows;
        data_off = (data_off + align - 1) / align * align;
    }
    CP_CHECK_GOTO(pad(f, &off, align, out), st, done);
    /* the data */
    size_t done_bytes = 0;
    for (int64_t i = 0; i < nt; i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        int64_t rows = 1;
        for (int d = 1; d < w->ndim; d++)
            rows *= w->ne[d];
        const int64_t cols = w->ne[0];
        const size_t out_row = cp_dtype_row_size(types[i], cols);
        if (types[i] == w->dtype) {
            CP_CHECK_GOTO(put(f, w->data, w->nbytes, out), st, done);
            off += w->nbytes;
            stats->n_kept++;
        } else {
            const size_t in_row = cp_dtype_row_size(w->dtype, cols);
            for (int64_t r = 0; r < rows; r++) {
                cp_tensor one = cp_tensor_2d(w->dtype, 1, cols, (char *)w->data + (size_t)r * in_row);
                CP_CHECK_GOTO(cp_backend_dequantize(host, &one, 0, 1, row), st, done);
                CP_CHECK_GOTO(cp_backend_quantize(host, types[i], row, 1, cols, dst), st, done);
                CP_CHECK_GOTO(put(f, dst, out_row, out), st, done);
            }
            off += out_row * (size_t)rows;
            if (types[i] == o->type) {
                stats->n_quantized++;
            } else {
                stats->n_fallback++;
                stats->fallback_type = types[i];
            }
            cp_gguf_release(g, w->data, w->nbytes);
        }
        stats->bytes_in += w->nbytes;
        stats->bytes_out += out_row * (size_t)rows;
        CP_CHECK_GOTO(pad(f, &off, align, out), st, done);
        done_bytes += w->nbytes;
        if (o->progress) o->progress(o->progress_user, done_bytes, total);
    }
    if (fflush(f) != 0 || ferror(f)) {
        st = CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", out, strerror(errno));
        goto done;
    }
    st = CP_OK;
done:
    if (f && fclose(f) != 0 && st == CP_OK)
        st = CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", out, strerror(errno));
    free(row);
    free(dst);
    free(types);
    cp_backend_free(host);
    cp_gguf_close(g);
    return st;
}
