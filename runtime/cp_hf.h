/* cp_hf.h - reads the config.json of a Hugging Face Llama, Mistral or Qwen2
 * checkpoint into a cp_model_config (the safetensors counterpart of
 * cp_gguf_model_config). */
#ifndef CP_HF_H
#define CP_HF_H

#include "cp_common.h"
#include "cp_model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Loads config_json_path (a config.json file, or a model directory holding
 * one) into *cfg, which is fully overwritten. What is read:
 *   model_type (llama, mistral, qwen2; else CP_ERR_UNSUPPORTED), vocab_size,
 *   hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
 *   (required); num_key_value_heads (default n_head), head_dim (default
 *   hidden_size / n_head; null means the default), max_position_embeddings
 *   (default 2048), rms_norm_eps (default 1e-6), rope_theta (default 10000),
 *   rope_scaling (null, "default", "linear" -> rope_freq_scale = 1/factor,
 *   "llama3" -> rope_llama3_*; others CP_ERR_UNSUPPORTED), tie_word_embeddings
 *   (default false), attention_bias (llama; qwen2 always has QKV biases),
 *   hidden_act (must be "silu" when given), _name_or_path (-> name).
 * rope_mode is CP_ROPE_HALF and rot_dim = head_dim. A sliding window that is
 * in use (mistral's sliding_window, qwen2's with use_sliding_window) and
 * shorter than the context caps ctx_train at the window, where full attention
 * and the window agree.
 * Errors: CP_ERR_IO (cannot read the file), CP_ERR_FORMAT (not JSON, a
 * required key missing, a value of the wrong type or out of range; the message
 * names the file and the key), CP_ERR_UNSUPPORTED, CP_ERR_INVALID_ARG. */
cp_status cp_hf_config_load(const char *config_json_path, cp_model_config *cfg);

/* The same from JSON text in memory (json need not be NUL-terminated; it is
 * borrowed for the call). source names it in error messages (may be NULL). */
cp_status cp_hf_config_parse(const char *json, size_t len, const char *source,
                             cp_model_config *cfg);

#ifdef __cplusplus
}
#endif

#endif /* CP_HF_H */
