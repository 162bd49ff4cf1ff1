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

#include "cp_gguf.h"
#include "cp_model.h"
#include "cp_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Per-channel statistics of the input of every linear layer over
 * calibration text: sums over `rows` tokens of x^2 and |x|, per layer and
 * site ([n_layer][width[site]], see cp_act_site in cp_model.h). */
typedef struct cp_act_stats {
    int n_layer;
    int width[CP_ACT_SITES];
    int64_t rows;
    double *sq[CP_ACT_SITES], *abs[CP_ACT_SITES];
    /* [n_layer]: sums over the rows of the cosine similarity between the
     * residual stream entering block l and leaving it (1 - the mean is the
     * block's importance: how much it changes the hidden state) */
    double *block_cos;
} cp_act_stats;

/* Runs e (a CPU engine) over tokens in windows of ctx (<= 0: the engine's
 * context) and collects the statistics. Across ranks it is a collective:
 * each rank observes its layers, rows and columns and every rank gets the
 * whole model's statistics. Errors: the engine's, CP_ERR_UNSUPPORTED (GPU
 * engines, sequence parallelism), CP_ERR_OOM. */
cp_status cp_act_stats_collect(cp_engine_t e, const int32_t *tokens, size_t n, int ctx, cp_act_stats **out);
void cp_act_stats_free(cp_act_stats *s);

/* Structural edits and pruning applied while converting (built by
 * cp_prune_plan, see cp_prune.h): per source tensor, whether and under which
 * name it is written, which of its rows and columns are kept, and whether
 * its weights are pruned. */
typedef struct cp_tensor_edit {
    bool drop;             /* not written */
    char name[96];         /* written under this name ("" = its own) */
    int32_t *rows;         /* 2-D: the source rows written, in order (NULL: all) */
    int64_t n_rows;
    int32_t *cols;         /* the source columns (elements of a vector) written, in order (NULL: all) */
    int64_t n_cols;
    bool prune;            /* zero weights of every written row (see cp_model_edit) */
    float *col_norm;       /* wanda: the input norm ||x_j|| of each written column; NULL: magnitude */
} cp_tensor_edit;

typedef struct cp_model_edit {
    cp_tensor_edit *tensors; /* one per source tensor, in the source's order */
    int64_t n_tensors;
    double sparsity;         /* unstructured: the fraction of each pruned row zeroed */
    bool n2m;                /* semi-structured: 2 of every 4 consecutive weights zeroed */
    cp_gguf_kv_u32 kv_set[8]; /* metadata integers set (block_count, head_count, ...) */
    char kv_keys[8][128];     /* storage of their keys */
    int n_kv_set;
} cp_model_edit;

/* AWQ scales of every layer, as searched for the inputs the quantized
 * matrices share: attn[n_layer][dim] (Q, K, V), ffn_in[n_layer][dim] (gate,
 * up), down[n_layer][ffn] (down). */
typedef struct cp_awq_scales {
    int n_layer, dim, ffn;
    float *attn, *ffn_in, *down;
} cp_awq_scales;

/* Searches the AWQ scales (see cp_quantize_opts.awq) of the layers l of the
 * GGUF at in with l % parts == part, leaving the others 0, so that parts
 * searched by different processes sum to the whole; threads: CPU threads (0:
 * all cores); progress (optional) gets layers done and this part's total.
 * Errors: CP_ERR_INVALID_ARG (a type other than I4_G32/I4_G128, a bad part),
 * the reader's, CP_ERR_FORMAT (a layer lacks a tensor), CP_ERR_OOM. */
cp_status cp_awq_search(const char *in, cp_dtype type, const cp_act_stats *a, int part, int parts, int threads,
                        void (*progress)(void *user, size_t done, size_t total), void *user,
                        cp_awq_scales **out);
void cp_awq_scales_free(cp_awq_scales *s);

typedef struct cp_quantize_opts {
    cp_dtype type; /* the target type of weight matrices */
    bool keep_types; /* GGUF targets: every tensor keeps its own type (type only
                        chooses GGUF output; selections that are not whole
                        blocks fall back as described below) */
    const cp_model_edit *edit; /* NULL: every tensor as it is */
    /* AWQ (4-bit targets, cparallel types only): per-input-channel scales s
     * of the layers that share an input (Q/K/V; gate/up; down) chosen as
     * s = E|x|^a, a on a grid in [0, 1], minimising the output error of the
     * quantized layers on these statistics, sum_j E[x_j^2] |dW_j|^2 (the
     * diagonal of the input covariance); W is quantized as W diag(s) and
     * 1/s folded into what feeds it (the norm weights; up's rows for down).
     * NULL: round to nearest. */
    const cp_act_stats *awq;
    /* With awq: the scales already searched (cp_awq_search, e.g. split over
     * ranks and summed), else NULL: searched here. */
    const cp_awq_scales *awq_scales;
    /* Called as tensors are written: bytes of the input done and in all;
     * with AWQ also with (0, 1) after each layer's scale search, which
     * precedes the writing. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_quantize_opts;

typedef struct cp_quantize_stats {
    int n_quantized;      /* matrices written in the target type */
    int n_fallback;       /* matrices whose rows are not whole blocks of the target:
                             written in fallback_type instead */
    cp_dtype fallback_type;
    int n_head_8bit;      /* 4-bit targets: the output projection (or the tied
                             embedding), written as I8_ROW; S24_Q8: the matrices
                             outside the blocks, written as I8_ROW */
    int n_kept;           /* tensors kept as stored (vectors, or already the target) */
    int n_dropped;        /* tensors not written (an edit dropped them) */
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
