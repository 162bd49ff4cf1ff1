/* fuzz_gguf.c - libFuzzer target for the GGUF reader: parses the input as a
 * file image and, when it is accepted, touches every key, value, array
 * element and the first and last byte of every tensor, so that ASan sees any
 * pointer the reader's validation let escape the image. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cp_gguf.h"

static volatile uint8_t sink;

static void touch(const void *p, size_t n) {
    if (n == 0) return;
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    sink ^= b[0];
    sink ^= b[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cp_gguf_t g = NULL;
    if (cp_gguf_open_memory(data, size, &g) != CP_OK) return 0;
    sink ^= (uint8_t)cp_gguf_version(g);
    if (cp_gguf_file_size(g) != size) abort();

    char key[256];
    for (int64_t i = 0; i < cp_gguf_n_kv(g); i++) {
        cp_str k = cp_gguf_key(g, i);
        touch(k.ptr, k.len);
        cp_gguf_type t = cp_gguf_kv_type(g, i);
        if (t == CP_GGUF_ARRAY) {
            cp_gguf_type at = cp_gguf_arr_type(g, i);
            uint64_t n = cp_gguf_arr_n(g, i);
            if (at == CP_GGUF_STRING) {
                for (uint64_t j = 0; j < n; j++) {
                    cp_str s = cp_gguf_arr_str(g, i, j);
                    touch(s.ptr, s.len);
                }
            } else if (cp_gguf_type_size(at) != 0 && n > 0) {
                const void *p = cp_gguf_arr_data(g, i);
                if (!p) abort();
                touch(p, (size_t)n * cp_gguf_type_size(at));
            }
        }
        /* The typed getters by key, on every key (most conversions fail). */
        if (k.len < sizeof(key) && memchr(k.ptr, 0, k.len) == NULL) {
            memcpy(key, k.ptr, k.len);
            key[k.len] = '\0';
            if (cp_gguf_find_key(g, key) < 0) abort();
            uint64_t u;
            int64_t s;
            float f;
            bool b;
            cp_str str;
            char buf[64];
            if (cp_gguf_get_u64(g, key, &u) == CP_OK) sink ^= (uint8_t)u;
            if (cp_gguf_get_i64(g, key, &s) == CP_OK) sink ^= (uint8_t)s;
            if (cp_gguf_get_f32(g, key, &f) == CP_OK) sink ^= (uint8_t)(f != f);
            if (cp_gguf_get_bool(g, key, &b) == CP_OK) sink ^= (uint8_t)b;
            if (cp_gguf_get_str(g, key, &str) == CP_OK) touch(str.ptr, str.len);
            if (cp_gguf_get_str_buf(g, key, buf, sizeof(buf))) sink ^= (uint8_t)strlen(buf);
            sink ^= (uint8_t)cp_gguf_get_i64_or(g, key, 0);
        }
    }

    for (int64_t i = 0; i < cp_gguf_n_tensors(g); i++) {
        const cp_weight_info *w = cp_gguf_tensor(g, i);
        if (!w || !w->name) abort();
        touch(w->name, strlen(w->name) + 1);
        touch(w->data, w->nbytes);
        if (w->ndim < 1 || w->ndim > CP_MAX_DIMS) abort();
        /* Every listed tensor must be found again by its name. */
        if (!cp_gguf_find_tensor(g, w->name)) abort();
    }
    cp_model_config cfg;
    if (cp_gguf_model_config(g, &cfg) == CP_OK) sink ^= (uint8_t)cfg.n_layer;
    cp_gguf_close(g);
    return 0;
}
