/* cp_model_config.h - the hyper-parameters of a Llama-family model and a
 * format-neutral description of its weight tensors, filled by the GGUF and
 * the safetensors loaders alike and consumed by the model builder. */
#ifndef CP_MODEL_CONFIG_H
#define CP_MODEL_CONFIG_H

#include "cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_model_config {
    char arch[32];          /* "llama", "mistral", "qwen2" */
    char name[128];         /* human-readable model name, may be "" */
    int n_vocab;
    int dim;                /* hidden size */
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;           /* usually dim / n_head */
    int ffn_dim;            /* intermediate size of the SwiGLU MLP */
    int ctx_train;          /* context length the model was trained for */
    float norm_eps;         /* RMSNorm epsilon */
    cp_rope_mode rope_mode; /* INTERLEAVED for GGUF llama weights, HALF for HF / qwen2 */
    int rot_dim;            /* rotated elements per head (usually head_dim) */
    float rope_theta;
    float rope_freq_scale;  /* linear scaling, 1 = none */
    /* Llama 3.1 style frequency scaling; factor 0 = none. */
    float rope_llama3_factor;
    float rope_llama3_low_freq_factor;
    float rope_llama3_high_freq_factor;
    int rope_llama3_orig_ctx;
    bool tied_embeddings;   /* the LM head reuses the token embedding */
    bool qkv_bias;          /* Q, K, V projections have biases (Qwen2) */
} cp_model_config;

/* One weight tensor as found in a file: names follow GGUF's convention
 * ("token_embd.weight", "blk.N.attn_q.weight", "output_norm.weight", ...)
 * whatever the file format, and ne[0] is the innermost dimension (a linear
 * layer's weight is ne = {in_features, out_features}). data points into
 * memory owned by the file handle that produced it. */
typedef struct cp_weight_info {
    const char *name;
    cp_dtype dtype;
    int ndim;
    int64_t ne[CP_MAX_DIMS];
    const void *data;
    size_t nbytes;
    uint64_t file_offset;   /* byte offset of data in its file (for sharded reads) */
} cp_weight_info;

/* Checks the configuration for values the forward pass cannot run with and
 * names the first bad field. */
cp_status cp_model_config_validate(const cp_model_config *c);

#ifdef __cplusplus
}
#endif

#endif /* CP_MODEL_CONFIG_H */
