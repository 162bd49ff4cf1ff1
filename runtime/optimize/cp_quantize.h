/* cp_quantize.h - rewrites a GGUF model with its weight matrices in another
 * type, keeping the metadata and every other tensor.
 *
 * GGUF types (q8_0, q4_0, q4_k, ...) give a GGUF file that llama.cpp and
 * cparallel read. cparallel's own types (I8_ROW, F8_ROW, I4_G32, I4_G128;
 * see cp_dtype.h for their bytes) give one safetensors file:
 *   - each packed matrix of R rows is a U8 tensor [R, row bytes] under its
 *     GGUF name, its type in the metadata key "cparallel.dtype.<name>";
 *   - vectors (norm weights) are F32 (F16/BF16 when stored so);
 *   - "cparallel.gguf" holds the source's GGUF metadata (configuration,
 *     tokenizer, chat template) as base64 of a GGUF image without tensors;
 *   - "cparallel.format" = "1", "cparallel.quantization" = the target type.
 * cp_model_load reads such a file like a GGUF file. */
#ifndef CP_QUANTIZE_H
#define CP_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Per-channel statistics of the input of every linear layer over
 * calibration text: sums over `rows` tokens of x^2 and |x|, per layer and
 * site ([n_layer][width[site]], see cp_act_site in cp_model.h). */
typedef struct cp_act_stats {
    int n_layer;
    int width[4];
    int64_t rows;
    double *sq[4], *abs[4];
} cp_act_stats;

/* Runs e (a single-rank CPU engine) over tokens in windows of ctx (<= 0:
 * the engine's context) and collects the statistics. Errors: the engine's,
 * CP_ERR_UNSUPPORTED (other engines), CP_ERR_OOM. */
cp_status cp_act_stats_collect(cp_engine_t e, const int32_t *tokens, size_t n, int ctx, cp_act_stats **out);
void cp_act_stats_free(cp_act_stats *s);

typedef struct cp_quantize_opts {
    cp_dtype type; /* the target type of weight matrices */
    /* AWQ (4-bit targets, cparallel types only): per-input-channel scales s
     * of the layers that share an input (Q/K/V; gate/up; down) chosen as
     * s = E|x|^a, a on a grid in [0, 1], minimising the output error of the
     * quantized layers on these statistics, sum_j E[x_j^2] |dW_j|^2 (the
     * diagonal of the input covariance); W is quantized as W diag(s) and
     * 1/s folded into what feeds it (the norm weights; up's rows for down).
     * NULL: round to nearest. */
    const cp_act_stats *awq;
    /* Called as tensors are written: bytes of the input done and in all. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_quantize_opts;

typedef struct cp_quantize_stats {
    int n_quantized;      /* matrices written in the target type */
    int n_fallback;       /* matrices whose rows are not whole blocks of the target:
                             written in fallback_type instead */
    cp_dtype fallback_type;
    int n_head_8bit;      /* 4-bit targets: the output projection (or the tied
                             embedding), written as I8_ROW */
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
