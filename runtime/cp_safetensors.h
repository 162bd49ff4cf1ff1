/* cp_safetensors.h - a validating, memory-mapped reader of Hugging Face
 * safetensors files (one file, or a model directory with a sharded index) that
 * presents tensors under GGUF's names and shape order, and a writer of
 * single-file safetensors models. */
#ifndef CP_SAFETENSORS_H
#define CP_SAFETENSORS_H

#include "cp_common.h"
#include "cp_dtype.h"
#include "cp_model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of the safetensors format, as its header spells them. */
typedef enum cp_st_dtype {
    CP_ST_F64 = 0,
    CP_ST_F32,
    CP_ST_F16,
    CP_ST_BF16,
    CP_ST_I64,
    CP_ST_I32,
    CP_ST_I16,
    CP_ST_I8,
    CP_ST_U64,
    CP_ST_U32,
    CP_ST_U16,
    CP_ST_U8,
    CP_ST_BOOL,
    CP_ST_F8_E4M3,
    CP_ST_F8_E5M2,
    CP_ST_DTYPE_COUNT, /* not a type */
} cp_st_dtype;

/* "F32", "BF16", ... or NULL for a value out of range. */
const char *cp_st_dtype_name(cp_st_dtype t);
/* Bytes per element (1, 2, 4 or 8), 0 for a value out of range. */
size_t cp_st_dtype_size(cp_st_dtype t);
/* The cp_dtype a tensor of this type is presented as. F64/F32/F16/BF16 and
 * I64/I32/I16/I8 map to their cp_dtype; the types cp_dtype lacks are given as
 * the signed integer type of the same width, i.e. raw bytes of the right size
 * (U64 -> I64, U32 -> I32, U16 -> I16, U8/BOOL/F8_E4M3/F8_E5M2 -> I8):
 * cp_safetensors_st_dtype tells them apart. */
cp_dtype cp_st_dtype_to_cp(cp_st_dtype t);

/* ---- reader ------------------------------------------------------------- */

typedef struct cp_safetensors *cp_safetensors_t;

/* Opens path, mapped read-only. path is either one .safetensors file or a
 * model directory holding model.safetensors.index.json and its shards, or
 * model.safetensors, or else exactly one *.safetensors file (config.json,
 * tokenizer.json and other files beside them are ignored; load the config with
 * cp_hf_config_load). Every header is validated completely before this
 * returns: dtype, shape, data_offsets inside the data region, byte count equal
 * to elements * element size, no overlapping tensors, no duplicate names, so
 * later accesses need no bounds checks. Tensors are listed shard by shard, in
 * data-offset order within a shard.
 * Names are mapped to GGUF's convention where they are Hugging Face Llama
 * names (see cp_safetensors_gguf_name), others are kept as they are. Shapes
 * are reversed to ne[] with ne[0] innermost; unused ne[] are 1, and a scalar
 * (shape []) has ndim 0. Weights are not permuted: Hugging Face Q/K weights
 * expect CP_ROPE_HALF, which cp_hf_config_load sets.
 * Errors: CP_ERR_INVALID_ARG (NULL arguments), CP_ERR_IO (a file or shard
 * cannot be opened, read or mapped), CP_ERR_FORMAT (malformed header or index;
 * the message names the file and the tensor), CP_ERR_UNSUPPORTED (a tensor
 * with more than 4 dimensions), CP_ERR_OOM. *out is NULL on error. */
cp_status cp_safetensors_open(const char *path, cp_safetensors_t *out);

/* Parses one safetensors file image already in memory, validated as above.
 * data is borrowed and must stay valid and unchanged until close (tests and
 * fuzzing). */
cp_status cp_safetensors_open_memory(const void *data, size_t size, cp_safetensors_t *out);

/* Unmaps and frees everything, including the names and data pointers handed
 * out. NULL is a no-op. */
void cp_safetensors_close(cp_safetensors_t st);

int64_t cp_safetensors_n_tensors(cp_safetensors_t st);
/* Tensor i (0 <= i < n_tensors, else NULL). Owned by st. file_offset is the
 * byte offset of the data in the shard file cp_safetensors_tensor_path names. */
const cp_weight_info *cp_safetensors_tensor(cp_safetensors_t st, int64_t i);
/* By GGUF-convention name (or the original name of an unmapped tensor), or
 * NULL. O(log n). */
const cp_weight_info *cp_safetensors_find(cp_safetensors_t st, const char *gguf_name);
/* The name tensor i has in the file, e.g. "model.layers.0.mlp.up_proj.weight". */
const char *cp_safetensors_hf_name(cp_safetensors_t st, int64_t i);
/* The dtype tensor i has in the file (CP_ST_DTYPE_COUNT for a bad i). */
cp_st_dtype cp_safetensors_st_dtype(cp_safetensors_t st, int64_t i);
/* Path of the file holding tensor i ("<memory>" for an image in memory). */
const char *cp_safetensors_tensor_path(cp_safetensors_t st, int64_t i);
/* The directory the model was opened from (the file's directory when a file
 * was opened, "" for memory), where config.json and tokenizer.json live. */
const char *cp_safetensors_dir(cp_safetensors_t st);

/* The "__metadata__" string map, all shards merged (the first shard that
 * defines a key wins). Pointers are owned by st. */
int64_t cp_safetensors_n_meta(cp_safetensors_t st);
const char *cp_safetensors_meta_key(cp_safetensors_t st, int64_t i);
const char *cp_safetensors_meta_value(cp_safetensors_t st, int64_t i);
/* Value of key, or NULL. */
const char *cp_safetensors_get_meta(cp_safetensors_t st, const char *key);

/* Maps a Hugging Face Llama/Mistral/Qwen2 tensor name to GGUF's convention:
 * model.embed_tokens.weight -> token_embd.weight, model.norm.weight ->
 * output_norm.weight, lm_head.weight -> output.weight, and under
 * model.layers.N.: self_attn.{q,k,v,o}_proj -> blk.N.attn_{q,k,v,output},
 * mlp.{gate,up,down}_proj -> blk.N.ffn_{gate,up,down}, input_layernorm ->
 * blk.N.attn_norm, post_attention_layernorm -> blk.N.ffn_norm, each followed
 * by .weight or .bias. Writes the NUL-terminated result into buf (cap bytes)
 * and returns true when hf_name is such a name and the result fits; returns
 * false (buf untouched) otherwise. */
bool cp_safetensors_gguf_name(const char *hf_name, char *buf, size_t cap);

/* ---- writer ------------------------------------------------------------- */

/* Collects tensors and metadata, then writes one safetensors file that the
 * reference implementation reads: a JSON header (dtype, shape outermost first,
 * data_offsets; "__metadata__" first when set) padded with spaces so that the
 * data region starts at an 8-byte aligned offset, followed by the tensors
 * packed without gaps, largest element size first, so that every tensor is
 * aligned to its element size within the file. */
typedef struct cp_st_writer *cp_st_writer_t;

/* Errors: CP_ERR_INVALID_ARG, CP_ERR_OOM. */
cp_status cp_st_writer_init(cp_st_writer_t *out);

/* Adds tensor name (copied) with ndim (0..8) dimensions shape_outer_first
 * (copied; as safetensors and PyTorch list them, outermost first). data is
 * BORROWED: it must stay valid until cp_st_writer_finish returns. nbytes must
 * equal the element count times cp_st_dtype_size(dtype); data may be NULL when
 * nbytes is 0. Errors: CP_ERR_INVALID_ARG (empty, reserved or duplicate name,
 * bad dtype, ndim, negative dimension, byte count mismatch), CP_ERR_OOM. */
cp_status cp_st_writer_add(cp_st_writer_t w, const char *name, cp_st_dtype dtype, int ndim,
                           const int64_t *shape_outer_first, const void *data, size_t nbytes);

/* Makes the bytes of a tensor added with cp_st_writer_add_fill: writes
 * exactly nbytes into buf (called once, by finish, in file order). */
typedef cp_status (*cp_st_fill_fn)(void *user, void *buf, size_t nbytes);

/* Like cp_st_writer_add, but the data is produced by fill(user, ...) while
 * finish writes the file, one tensor in memory at a time, so that models
 * larger than memory can be written. An error of fill fails finish. */
cp_status cp_st_writer_add_fill(cp_st_writer_t w, const char *name, cp_st_dtype dtype, int ndim,
                                const int64_t *shape_outer_first, size_t nbytes, cp_st_fill_fn fill,
                                void *user);

/* Sets metadata key to value (both copied; a second call replaces the value).
 * Errors: CP_ERR_INVALID_ARG, CP_ERR_OOM. */
cp_status cp_st_writer_set_meta(cp_st_writer_t w, const char *key, const char *value);

/* Writes everything to "<path>.tmp", flushes it to disk and renames it to
 * path, so that path is never seen half written. The writer stays usable (a
 * second finish writes the same content elsewhere). Errors: CP_ERR_IO (the
 * message names the file and the failing call; the .tmp file is removed),
 * CP_ERR_OOM. */
cp_status cp_st_writer_finish(cp_st_writer_t w, const char *path);

/* Frees the writer (not the borrowed data). NULL is a no-op. */
void cp_st_writer_free(cp_st_writer_t w);

#ifdef __cplusplus
}
#endif

#endif /* CP_SAFETENSORS_H */
