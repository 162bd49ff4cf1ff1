/* model_hf.c - a Hugging Face checkpoint directory (config.json plus one or
 * more safetensors files) as the weight source of a cp_model. Tensor names
 * arrive already mapped to the GGUF convention by the safetensors reader. */
#include "cp_hf.h"
#include "cp_safetensors.h"
#include "model_impl.h"

#include <stdio.h>

static const cp_weight_info *hf_find(void *ctx, const char *name) {
    return cp_safetensors_find((cp_safetensors_t)ctx, name);
}

static void hf_close(void *ctx) { cp_safetensors_close((cp_safetensors_t)ctx); }

cp_status cp_model_open_hf(cp_model_t m, const char *dir) {
    char cfg_path[4096];
    snprintf(cfg_path, sizeof(cfg_path), "%s/config.json", dir);
    CP_CHECK(cp_hf_config_load(cfg_path, &m->cfg));
    cp_safetensors_t st;
    CP_CHECK(cp_safetensors_open(dir, &st));
    m->find = hf_find;
    m->find_ctx = st;
    m->hf_close = hf_close;
    for (int64_t i = 0; i < cp_safetensors_n_tensors(st); i++)
        m->total_bytes += cp_safetensors_tensor(st, i)->nbytes;
    /* tie_word_embeddings may be absent while the file still has no lm_head */
    if (!m->cfg.tied_embeddings && !cp_safetensors_find(st, "output.weight"))
        m->cfg.tied_embeddings = true;
    return cp_model_config_validate(&m->cfg);
}
