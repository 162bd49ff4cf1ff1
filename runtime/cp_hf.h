/* cp_hf.h - reads the config.json of a Hugging Face Llama, Mistral or Qwen2
 * checkpoint into a cp_model_config (the safetensors counterpart of
 * cp_gguf_model_config), and the quantization settings of 4-bit AWQ and GPTQ
 * checkpoints, which the model loader repacks into cparallel's own types. */
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

/* ---- 4-bit AWQ / GPTQ checkpoints ---------------------------------------
 *
 * A checkpoint quantized by AutoAWQ (GEMM layout) or AutoGPTQ / optimum /
 * GPTQModel ("gptq" or "gptq_v2" checkpoint format) loads as is: every linear
 * that has <prefix>.qweight, .qzeros and .scales (fp16) instead of .weight is
 * repacked at open into cparallel's own 4-bit group types (cp_dtype.h), one
 * row per output channel. With per-column groups (group_size -1) counting as
 * one group of the whole input width, groups that are whole multiples of 128
 * (and an input width that is one) give CP_DTYPE_I4_G128, else multiples of
 * 32 give CP_DTYPE_I4_G32 (a group of 64: two blocks with the same d and z).
 * Both are exact: every weight keeps its code, zero point and fp16 scale, so
 * the matrix computes (q - z) * scale as the checkpoint defines it. GPTQ's
 * "gptq" format stores z - 1 (z = stored + 1, so z may be 16; "gptq_v2"
 * stores z). Within each int32, GPTQ packs 8 input rows (qweight [in/8, out])
 * or 8 output zeros (qzeros [groups, out/8]) in nibble order; AWQ packs 8
 * outputs of qweight [in, out/8] and qzeros [groups, out/8] in the order
 * 0, 2, 4, 6, 1, 3, 5, 7.
 * A GPTQ g_idx [in] that is not i / group_size for every input i (act-order,
 * desc_act) makes groups that are not contiguous along the row; such a matrix
 * is dequantized to CP_DTYPE_F16 instead: (q - z) * scale rounded once to
 * fp16 (relative error at most 2^-11 per weight, smaller than one step of the
 * 4-bit grid by far), or CP_DTYPE_F32 when a value exceeds fp16's range. The
 * same holds for a group size that is no multiple of 32. Repacking reads every
 * packed tensor once on one thread (measured about 2.5 ns per weight: some
 * 20 s for a 7B model) and holds the repacked rows in memory until
 * cp_model_free (about the checkpoint's size).
 * Linears without .qweight (modules_to_not_convert), embeddings, norms,
 * lm_head (unless it has .qweight too) and biases load as usual.
 * cp_model_load then fails with CP_ERR_FORMAT when a quantized linear lacks
 * qweight, qzeros or scales (the message names the tensor), has a tensor of
 * another type or of a shape the configuration does not give (the message
 * names the tensor, its shape and the expected one), a scale that is not
 * finite, or a g_idx entry that is no group; with CP_ERR_UNSUPPORTED when
 * its output width (GPTQ: or input width) is not a multiple of 8. */

typedef enum cp_hf_quant_method {
    CP_HF_QUANT_NONE = 0, /* no quantization_config: a plain checkpoint */
    CP_HF_QUANT_AWQ,      /* AutoAWQ, GEMM layout */
    CP_HF_QUANT_GPTQ,     /* AutoGPTQ / optimum / GPTQModel */
} cp_hf_quant_method;

typedef struct cp_hf_quant_config {
    cp_hf_quant_method method;
    int bits;            /* always 4 when method != NONE */
    int group_size;      /* inputs per group (> 0), or -1: one group per column */
    bool sym;            /* informational: z is read from qzeros either way */
    bool desc_act;       /* informational: g_idx decides the layout */
    bool zero_minus_one; /* GPTQ "gptq" format: stored zero points are z - 1 */
} cp_hf_quant_config;

/* Reads the quantization settings of model directory dir: the
 * "quantization_config" object of dir/config.json, or else AutoGPTQ's
 * dir/quantize_config.json (method gptq unless it says otherwise) or
 * AutoAWQ's dir/quant_config.json (method awq). *q is fully overwritten;
 * method is CP_HF_QUANT_NONE when none of them exists (or the object is
 * null).
 * Keys: quant_method ("awq", "gptq"), bits (or w_bit; required, must be 4),
 * group_size (or q_group_size; required, > 0 or -1), sym (default true),
 * desc_act (default false), zero_point (AWQ, default true), version (AWQ,
 * default "gemm"), checkpoint_format (or format; GPTQ, default "gptq"),
 * is_marlin_format (GPTQ, must be false when given).
 * Errors: CP_ERR_IO (a file exists but cannot be read), CP_ERR_FORMAT (not
 * JSON, a key of the wrong type or out of range; the message names the file
 * and the key), CP_ERR_UNSUPPORTED (another quant_method, bits other than 4,
 * AWQ version other than gemm, GPTQ format other than gptq/gptq_v2; the
 * message names the value), CP_ERR_INVALID_ARG (NULL arguments). */
cp_status cp_hf_quant_config_load(const char *dir, cp_hf_quant_config *q);

/* Parses the text of a config.json (json need not be NUL-terminated; it is
 * borrowed for the call): its "quantization_config" object, or, when
 * whole_is_quant is true, the whole object (quantize_config.json,
 * quant_config.json); default_method applies when quant_method is absent
 * (CP_HF_QUANT_NONE: it is required). source names it in error messages (may
 * be NULL). Errors as cp_hf_quant_config_load. */
cp_status cp_hf_quant_config_parse(const char *json, size_t len, const char *source,
                                   bool whole_is_quant, cp_hf_quant_method default_method,
                                   cp_hf_quant_config *q);

#ifdef __cplusplus
}
#endif

#endif /* CP_HF_H */
