/* model_hf.c - a Hugging Face checkpoint directory (config.json plus one or
 * more safetensors files) as the weight source of a cp_model. Tensor names
 * arrive already mapped to the GGUF convention by the safetensors reader. */
#include "cp_hf.h"
#include "cp_safetensors.h"
#include "model_impl.h"

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

static cp_status hf_finish(cp_model_t m) {
    /* tie_word_embeddings may be absent while the file still has no lm_head */
    if (!m->cfg.tied_embeddings && !hf_find(m->find_ctx, "output.weight")) m->cfg.tied_embeddings = true;
    return cp_model_config_validate(&m->cfg);
}

cp_status cp_model_open_hf(cp_model_t m, const char *dir) {
    CP_CHECK(hf_config(m, dir));
    cp_safetensors_t st;
    CP_CHECK(cp_safetensors_open(dir, &st));
    attach(m, st);
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
    return hf_finish(m);
}
