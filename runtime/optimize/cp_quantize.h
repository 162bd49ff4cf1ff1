/* cp_quantize.h - rewrites a GGUF model with its weight matrices in another
 * GGUF type (q8_0, q4_0, q4_k, ...), keeping the metadata and every other
 * tensor as stored, so that llama.cpp and cparallel read the result. */
#ifndef CP_QUANTIZE_H
#define CP_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_quantize_opts {
    cp_dtype type; /* the target type of weight matrices */
    /* Called as tensors are written: bytes of the input done and in all. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_quantize_opts;

typedef struct cp_quantize_stats {
    int n_quantized;      /* matrices written in the target type */
    int n_fallback;       /* matrices whose rows are not whole blocks of the target:
                             written in fallback_type instead */
    cp_dtype fallback_type;
    int n_kept;           /* tensors kept as stored (vectors, or already the target) */
    size_t bytes_in, bytes_out; /* tensor data */
} cp_quantize_stats;

/* Reads the GGUF at in and writes out (replaced; written in place, so pass
 * a temporary name and rename it when the result is to be kept). Matrices
 * (2 or more dimensions) are dequantized to fp32 and quantized to o->type;
 * when a matrix's rows are not whole blocks of it, a type with 32-element
 * blocks of at least its bits is used (4-bit targets: q4_0, others: q8_0),
 * and f16 when the rows are not whole 32-element blocks either. Errors: CP_ERR_INVALID_ARG (a type that cannot be
 * a target), the reader's and CP_ERR_IO (naming the file). */
cp_status cp_quantize_gguf(const char *in, const char *out, const cp_quantize_opts *o,
                           cp_quantize_stats *stats);

#ifdef __cplusplus
}
#endif

#endif /* CP_QUANTIZE_H */
