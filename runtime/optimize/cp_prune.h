/* cp_prune.h - plans the pruning of a GGUF model: which weights are zeroed
 * (unstructured magnitude or Wanda, 2:4 semi-structured) and which layers,
 * attention heads and MLP channels are removed (structured), chosen from
 * activation statistics on calibration text. The plan is a cp_model_edit
 * that cp_quantize_gguf applies while it writes the result. */
#ifndef CP_PRUNE_H
#define CP_PRUNE_H

#include "cp_quantize.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Zeroes the weights of row x[n] with the lowest scores |x_j| * col_norm[j]
 * (|x_j| when col_norm is NULL): floor(sparsity * n) of them, or with n2m
 * two of every group of four (n a multiple of 4). scratch holds n floats and
 * n ints. Ties go to the lower index. cp_quantize_gguf applies it to the
 * rows a cp_model_edit marks. */
void cp_prune_row(float *x, int64_t n, const float *col_norm, double sparsity, bool n2m, void *scratch);

typedef enum cp_prune_method {
    CP_PRUNE_MAGNITUDE = 0, /* score |W_ij| */
    CP_PRUNE_WANDA,         /* score |W_ij| * ||x_j|| (Sun et al. 2023), x the layer's input */
} cp_prune_method;

typedef struct cp_prune_opts {
    /* Weights zeroed in every linear layer of the blocks (Q, K, V, O, gate,
     * up, down; not the embedding or the output projection), compared within
     * each output row: a fraction `sparsity` of each row, or with n2m the two
     * lowest-scored of every four consecutive weights. */
    cp_prune_method method;
    double sparsity; /* 0 <= sparsity < 1; 0 with !n2m: none */
    bool n2m;
    /* Structured: remove the drop_layers blocks whose output is the most
     * similar to their input (highest mean cosine similarity of the residual
     * stream across the block); keep n_head query heads per layer (0: all;
     * a multiple of the KV heads, the same number kept in each KV group, by
     * the energy sum_c E[a_c^2] |O[:,c]|^2 of each head's output channels c);
     * keep ffn_dim MLP channels per layer (0: all; by sqrt(E[h_j^2]) |down[:,j]|). */
    int drop_layers;
    int n_head;
    int ffn_dim;
    /* Activation statistics of the model on calibration text: required by
     * wanda and the structured options (cp_act_stats_collect). */
    const cp_act_stats *stats;
} cp_prune_opts;

typedef struct cp_prune_report {
    int n_layer;             /* layers of the source */
    double importance[1024]; /* per source layer: 1 - mean cosine similarity (with stats) */
    int n_dropped;
    int dropped[1024];       /* the source layers removed, ascending */
    int n_pruned;            /* matrices whose weights are zeroed */
} cp_prune_report;

/* The edit of g's tensors that implements o (free with cp_model_edit_free).
 * Errors: CP_ERR_INVALID_ARG naming the option (out of range, heads not a
 * multiple of the KV heads, wanda or structured options without stats,
 * statistics of another model), the reader's (a model that is not a
 * Llama-family GGUF), CP_ERR_OOM. */
cp_status cp_prune_plan(cp_gguf_t g, const cp_prune_opts *o, cp_model_edit **out, cp_prune_report *rep);
void cp_model_edit_free(cp_model_edit *e);

#ifdef __cplusplus
}
#endif

#endif /* CP_PRUNE_H */
