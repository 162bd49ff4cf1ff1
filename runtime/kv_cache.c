/* kv_cache.c - the paged KV cache: one allocation holding K and V of every
 * layer in fixed-size blocks, and a reference-counted block allocator (a
 * free stack on the host) so prompts can share prefix blocks. */
#include "model_impl.h"

#include <stdlib.h>

cp_status cp_kv_cache_init(cp_model_t m, const cp_kv_cache_opts *o, cp_kv_cache_t *out) {
    *out = NULL;
    if (!o || o->n_blocks <= 0 || o->block_size <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "KV cache needs a positive block count and block size");
    if (o->dtype != CP_DTYPE_F32 && o->dtype != CP_DTYPE_F16 && !cp_kv_quantized(o->dtype))
        return CP_ERROR(CP_ERR_UNSUPPORTED, "KV cache type %s is not supported (f32, f16, int8, fp8)",
                        cp_dtype_name(o->dtype) ? cp_dtype_name(o->dtype) : "?");
    if (cp_kv_quantized(o->dtype) && cp_backend_device(m->be) != CP_DEVICE_CPU &&
        cp_backend_device(m->be) != CP_DEVICE_CUDA)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "a %s KV cache runs on the CPU and CUDA backends, not on %s",
                        o->dtype == CP_DTYPE_I8_ROW ? "int8" : "fp8", cp_backend_name(m->be));
    const cp_model_config *c = &m->cfg;
    const int cp = m->plan.cp > 1 ? m->plan.cp : 1;
    if (o->block_size % cp != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "KV block size %d is not a multiple of the %d context-parallel ranks (each keeps "
                        "every %d-th position of a block)",
                        o->block_size, cp, cp);
    cp_kv_cache_t kv = calloc(1, sizeof(*kv));
    if (!kv) return CP_ERROR(CP_ERR_OOM, "out of memory");
    cp_status st;
    kv->model = m;
    kv->n_blocks = o->n_blocks;
    kv->block_size = o->block_size;
    kv->slots = o->block_size / cp;
    kv->dtype = o->dtype;
    /* this rank's KV heads of this stage's layers, and with context
     * parallelism its 1/cp of the positions */
    kv->layer_bytes = (size_t)o->n_blocks * (size_t)kv->slots * (size_t)m->n_kv_l *
                      cp_dtype_row_size(o->dtype, c->head_dim);
    kv->refs = calloc((size_t)o->n_blocks, sizeof(int32_t));
    kv->free_list = malloc((size_t)o->n_blocks * sizeof(int32_t));
    if (!kv->refs || !kv->free_list) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    CP_CHECK_GOTO(cp_backend_alloc(m->be, 2 * (size_t)m->n_layer_l * kv->layer_bytes, &kv->mem), st,
                  fail);
    /* zeroed so that unwritten slots never hold NaN bit patterns */
    CP_CHECK_GOTO(cp_backend_memset(m->be, kv->mem, 0, 2 * (size_t)m->n_layer_l * kv->layer_bytes), st,
                  fail);
    /* stack with the lowest id on top */
    for (int i = 0; i < o->n_blocks; i++) kv->free_list[i] = o->n_blocks - 1 - i;
    kv->n_free = o->n_blocks;
    *out = kv;
    return CP_OK;
fail:
    cp_kv_cache_free(kv);
    return st;
}

void cp_kv_cache_free(cp_kv_cache_t kv) {
    if (!kv) return;
    cp_backend_dealloc(kv->model->be, kv->mem);
    free(kv->refs);
    free(kv->free_list);
    free(kv);
}

int cp_kv_cache_block_size(cp_kv_cache_t kv) { return kv->block_size; }
int cp_kv_cache_n_blocks(cp_kv_cache_t kv) { return kv->n_blocks; }
int cp_kv_cache_n_free(cp_kv_cache_t kv) { return kv->n_free; }
size_t cp_kv_cache_bytes(cp_kv_cache_t kv) { return 2 * (size_t)kv->model->n_layer_l * kv->layer_bytes; }

cp_status cp_kv_cache_alloc_blocks(cp_kv_cache_t kv, int n, int32_t *out) {
    if (n < 0) return CP_ERROR(CP_ERR_INVALID_ARG, "negative block count");
    if (n > kv->n_free)
        return CP_ERROR(CP_ERR_OOM, "KV cache is full: %d blocks wanted, %d free of %d", n,
                        kv->n_free, kv->n_blocks);
    for (int i = 0; i < n; i++) {
        int32_t id = kv->free_list[--kv->n_free];
        kv->refs[id] = 1;
        out[i] = id;
    }
    return CP_OK;
}

void cp_kv_cache_retain_block(cp_kv_cache_t kv, int32_t id) {
    CP_ASSERT(id >= 0 && id < kv->n_blocks && kv->refs[id] > 0);
    kv->refs[id]++;
}

void cp_kv_cache_release_blocks(cp_kv_cache_t kv, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        CP_ASSERT(id >= 0 && id < kv->n_blocks && kv->refs[id] > 0);
        if (--kv->refs[id] == 0) kv->free_list[kv->n_free++] = id;
    }
}
