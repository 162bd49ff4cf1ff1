/* cp_synth.h - writes Hugging Face Llama checkpoints (config.json plus
 * safetensors, sharded with an index beyond 5 GB) of real architectures'
 * exact shapes filled with seeded random weights, so that benchmarks need no
 * download. Both cparallel and Hugging Face transformers load the result. */
#ifndef CP_SYNTH_H
#define CP_SYNTH_H

#include "cp_common.h"
#include "cp_dtype.h"


#ifdef __cplusplus
extern "C" {
#endif

/* The shape of a Llama-family model as config.json states it. */
typedef struct cp_synth_arch {
    char name[32];  /* preset name, "custom" for caller-made shapes */
    int dim;        /* hidden_size */
    int n_layers;   /* num_hidden_layers */
    int n_heads;    /* num_attention_heads */
    int n_kv_heads; /* num_key_value_heads */
    int ffn_dim;    /* intermediate_size */
    int vocab;      /* vocab_size */
    int ctx;        /* max_position_embeddings */
    double rope_theta;
    double rms_eps;
    int bos_id, eos_id;
} cp_synth_arch;

/* The presets: "llama3-8b", "llama2-7b", "llama2-70b" (the exact shapes of
 * Meta's checkpoints) and "tiny" (dim 256, 4 layers, 8 heads, 4 KV heads,
 * ffn 704, vocab 1024) for tests. Names are matched exactly.
 * Errors: CP_ERR_INVALID_ARG (unknown name; the message lists the presets). */
cp_status cp_synth_preset(const char *name, cp_synth_arch *out);

/* Names of the presets, NULL-terminated (static storage). */
const char *const *cp_synth_preset_names(void);

typedef struct cp_synth_opts {
    const char *arch;            /* preset name; ignored when custom is set */
    const cp_synth_arch *custom; /* borrowed; caller-made shapes instead of a preset */
    const char *out_dir;         /* created (with its parents) when missing */
    int n_layers;                /* <= 0: the architecture's own */
    cp_dtype dtype;              /* CP_DTYPE_BF16 (the default), CP_DTYPE_F16 or CP_DTYPE_F32 */
    uint64_t seed;
    int n_threads; /* <= 0: all online cores */
    /* Largest shard in bytes of tensor data; 0: 5 GB (as transformers'
     * save_pretrained). A model that fits one shard is one model.safetensors
     * without an index. */
    uint64_t max_shard_bytes;
    /* Called on the calling thread with (weight bytes written, total) after
     * each block of writes and once at the end; NULL ok. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_synth_opts;

/* Fills *o with the defaults: BF16, seed 0, all cores, 5 GB shards, the
 * preset's layer count, no progress callback (arch and out_dir NULL). */
void cp_synth_opts_init(cp_synth_opts *o);

/* The byte count of the weights cp_synth_write would write for o (tensor
 * data only, headers excluded) and the architecture it resolves to (either
 * output may be NULL). Errors: as the argument checks of cp_synth_write. */
cp_status cp_synth_plan(const cp_synth_opts *o, cp_synth_arch *arch, uint64_t *weight_bytes);

/* Writes into o->out_dir: config.json (model_type "llama", accepted by
 * transformers' LlamaForCausalLM and by cp_hf_config_load) and the weights
 * under Hugging Face names (model.embed_tokens.weight,
 * model.layers.N.self_attn.q_proj.weight, ..., model.norm.weight,
 * lm_head.weight; shapes [out][in]). Matrices, the embedding included, are
 * normal with standard deviation 0.02 overall, each row scaled by a factor
 * in [0.8, 1.2] (renormalised) so that rows differ as in trained models;
 * norm weights are exactly 1. Data is generated on n_threads threads and
 * streamed to disk; the bytes depend only on the options, never on the thread
 * count. Each file is written as "<name>.tmp" and renamed when complete.
 * Files synth writes, and stale ones that would shadow them (model.safetensors,
 * model.safetensors.index.json, model-NNNNN-of-NNNNN.safetensors), are
 * replaced or removed; nothing else in the directory is touched.
 * Errors: CP_ERR_INVALID_ARG (NULL options or out_dir, unknown architecture,
 * bad dtype or shape, a directory that cannot be created or written; the
 * message names the problem), CP_ERR_IO (not enough free space, checked
 * before anything is written, or a write failed; the message names the file),
 * CP_ERR_UNSUPPORTED (a big-endian host), CP_ERR_OOM. */
cp_status cp_synth_write(const cp_synth_opts *o);

#ifdef __cplusplus
}
#endif

#endif /* CP_SYNTH_H */
