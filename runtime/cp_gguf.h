/* cp_gguf.h - a validating, memory-mapped reader of GGUF v2/v3 files: every
 * metadata value type, the tensor directory and its data region. Opening a
 * file checks every offset, size, type and shape against the file's size, so
 * later accesses need no bounds checks. */
#ifndef CP_GGUF_H
#define CP_GGUF_H

#include "cp_common.h"
#include "cp_dtype.h"
#include "cp_model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_gguf *cp_gguf_t;

typedef enum cp_gguf_type {
    CP_GGUF_UINT8 = 0,
    CP_GGUF_INT8 = 1,
    CP_GGUF_UINT16 = 2,
    CP_GGUF_INT16 = 3,
    CP_GGUF_UINT32 = 4,
    CP_GGUF_INT32 = 5,
    CP_GGUF_FLOAT32 = 6,
    CP_GGUF_BOOL = 7,
    CP_GGUF_STRING = 8,
    CP_GGUF_ARRAY = 9,
    CP_GGUF_UINT64 = 10,
    CP_GGUF_INT64 = 11,
    CP_GGUF_FLOAT64 = 12,
} cp_gguf_type;

/* A string inside the mapped file: not NUL-terminated. */
typedef struct cp_str {
    const char *ptr;
    size_t len;
} cp_str;

/* Bytes of one element of a scalar value type; 0 for strings, arrays and
 * unknown values. */
size_t cp_gguf_type_size(cp_gguf_type t);

/* Opens and validates path (mapped read-only). Errors: CP_ERR_IO (cannot open
 * or map), CP_ERR_FORMAT (bad magic, unsupported version, truncated or
 * inconsistent contents; the message names the key or tensor). */
cp_status cp_gguf_open(const char *path, cp_gguf_t *out);

/* Parses a GGUF image already in memory (borrowed until close; for tests and
 * fuzzing). The tensor data region must lie inside [data, data+size). */
cp_status cp_gguf_open_memory(const void *data, size_t size, cp_gguf_t *out);

/* Unmaps and frees. NULL is a no-op. */
void cp_gguf_close(cp_gguf_t g);

/* Tells the OS that bytes [p, p+n) of the mapped file will not be read
 * again (e.g. after a slice was copied out): their pages leave this
 * process's resident set; a later read would fault them in from the file
 * again. No-op for images opened with cp_gguf_open_memory. */
void cp_gguf_release(cp_gguf_t g, const void *p, size_t n);

/* Bytes before the tensor data (header, metadata, tensor directory). */
size_t cp_gguf_data_offset(cp_gguf_t g);

uint32_t cp_gguf_version(cp_gguf_t g);
size_t cp_gguf_file_size(cp_gguf_t g);

/* ---- metadata -------------------------------------------------------- */
int64_t cp_gguf_n_kv(cp_gguf_t g);
/* Index of key, or -1. */
int64_t cp_gguf_find_key(cp_gguf_t g, const char *key);
cp_str cp_gguf_key(cp_gguf_t g, int64_t i);
cp_gguf_type cp_gguf_kv_type(cp_gguf_t g, int64_t i);
/* For arrays: the element type and count. */
cp_gguf_type cp_gguf_arr_type(cp_gguf_t g, int64_t i);
uint64_t cp_gguf_arr_n(cp_gguf_t g, int64_t i);
/* Pointer to the packed elements of a numeric array (little-endian, may be
 * unaligned: copy with memcpy). NULL for string arrays. */
const void *cp_gguf_arr_data(cp_gguf_t g, int64_t i);
/* Element j of a string array. */
cp_str cp_gguf_arr_str(cp_gguf_t g, int64_t i, uint64_t j);

/* Typed getters by key. They return CP_ERR_FORMAT when the key is missing
 * (unless a default is given through the *_or variants) or its type cannot
 * be converted without loss (any integer type converts to a wider one). */
cp_status cp_gguf_get_u64(cp_gguf_t g, const char *key, uint64_t *out);
cp_status cp_gguf_get_i64(cp_gguf_t g, const char *key, int64_t *out);
cp_status cp_gguf_get_f32(cp_gguf_t g, const char *key, float *out);
cp_status cp_gguf_get_bool(cp_gguf_t g, const char *key, bool *out);
cp_status cp_gguf_get_str(cp_gguf_t g, const char *key, cp_str *out);
int64_t cp_gguf_get_i64_or(cp_gguf_t g, const char *key, int64_t dflt);
float cp_gguf_get_f32_or(cp_gguf_t g, const char *key, float dflt);
bool cp_gguf_get_bool_or(cp_gguf_t g, const char *key, bool dflt);
/* Copies a string value into buf (NUL-terminated, truncated to cap-1);
 * returns false when the key is missing or not a string. */
bool cp_gguf_get_str_buf(cp_gguf_t g, const char *key, char *buf, size_t cap);

/* The metadata section as stored (all n_kv entries, in the file's
 * encoding), for writing a new file with the same metadata. */
const void *cp_gguf_kv_bytes(cp_gguf_t g, size_t *len);
/* The metadata section with some integer values set: each key of `set`
 * gets its value as a uint32 (replacing the entry in place, whatever its
 * type, or appended when the file lacks the key); every other entry is
 * copied as stored. *bytes (malloc'd, the caller frees) holds *n_kv entries
 * in *len bytes. Errors: CP_ERR_OOM. */
typedef struct cp_gguf_kv_u32 {
    const char *key;
    uint32_t value;
} cp_gguf_kv_u32;
cp_status cp_gguf_kv_bytes_with(cp_gguf_t g, const cp_gguf_kv_u32 *set, int n_set, void **bytes, size_t *len,
                                int64_t *n_kv);
/* The tensor data alignment (general.alignment, default 32). */
size_t cp_gguf_alignment(cp_gguf_t g);

/* ---- tensors --------------------------------------------------------- */
int64_t cp_gguf_n_tensors(cp_gguf_t g);
/* Tensor i as a cp_weight_info (name NUL-terminated, data inside the map). */
const cp_weight_info *cp_gguf_tensor(cp_gguf_t g, int64_t i);
/* By name, or NULL. */
const cp_weight_info *cp_gguf_find_tensor(cp_gguf_t g, const char *name);

/* The model configuration from "<arch>.*" keys (llama, mistral, qwen2 and
 * the other Llama-family architectures). CP_ERR_UNSUPPORTED names an
 * architecture this build does not run. */
cp_status cp_gguf_model_config(cp_gguf_t g, cp_model_config *cfg);
/* The same with the tensors looked up by find(find_ctx, name) instead of in
 * g (metadata from GGUF, weights elsewhere; find NULL: in g). */
cp_status cp_gguf_model_config_with(cp_gguf_t g, const cp_weight_info *(*find)(void *ctx, const char *name),
                                    void *find_ctx, cp_model_config *cfg);

#ifdef __cplusplus
}
#endif

#endif /* CP_GGUF_H */
