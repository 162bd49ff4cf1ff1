/* fuzz_safetensors.c - libFuzzer target for the safetensors reader: parses
 * the input as a file image and, when it is accepted, touches every name,
 * metadata entry and the first and last byte of every tensor, and checks the
 * invariants a caller relies on (data inside the image, findable names). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cp_safetensors.h"

static volatile uint8_t sink;

static void touch(const void *p, size_t n) {
    if (n == 0) return;
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    sink ^= b[0];
    sink ^= b[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cp_safetensors_t st = NULL;
    if (cp_safetensors_open_memory(data, size, &st) != CP_OK) return 0;
    for (int64_t i = 0; i < cp_safetensors_n_meta(st); i++) {
        const char *k = cp_safetensors_meta_key(st, i), *v = cp_safetensors_meta_value(st, i);
        touch(k, strlen(k) + 1);
        touch(v, strlen(v) + 1);
        if (cp_safetensors_get_meta(st, k) != v) abort();
    }
    for (int64_t i = 0; i < cp_safetensors_n_tensors(st); i++) {
        const cp_weight_info *w = cp_safetensors_tensor(st, i);
        if (!w || !w->name) abort();
        touch(w->name, strlen(w->name) + 1);
        const char *hf = cp_safetensors_hf_name(st, i);
        touch(hf, strlen(hf) + 1);
        if (w->nbytes > 0) {
            const uint8_t *p = w->data;
            if (p < data || w->nbytes > size || (size_t)(p - data) > size - w->nbytes) abort();
            if (w->file_offset != (uint64_t)(p - data)) abort();
        }
        touch(w->data, w->nbytes);
        if (w->ndim < 0 || w->ndim > CP_MAX_DIMS) abort();
        uint64_t count = 1;
        for (int d = 0; d < CP_MAX_DIMS; d++)
            count *= (uint64_t)w->ne[d];
        if (count * cp_st_dtype_size(cp_safetensors_st_dtype(st, i)) != w->nbytes) abort();
        if (cp_safetensors_find(st, w->name) != w) abort();
    }
    cp_safetensors_close(st);
    return 0;
}
