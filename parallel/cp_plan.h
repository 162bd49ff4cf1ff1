/* cp_plan.h - the parallel plan: how world = pp x cp x tp ranks divide a
 * model. A rank is (pp_rank, cp_rank, tp_rank) with
 * rank = (pp_rank * cp + cp_rank) * tp + tp_rank, so the ranks of one
 * tensor-parallel group are consecutive (one node). Context-parallel ranks
 * (cp > 1) hold the same weights and split the sequence: each keeps the KV
 * cache of every cp-th position and computes the tokens at them. The plan
 * gives each rank its pipeline stage's layer range and, inside the stage,
 * its query/KV heads, FFN columns and vocabulary rows. It knows nothing of
 * files or communicators: every value follows from the shapes. */
#ifndef CP_PLAN_H
#define CP_PLAN_H

#include "cp_common.h"

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_plan_shape {
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;
    int ffn_dim;
    int n_vocab;
    /* Elements per quantization block along the row of the row-parallel
     * matrices (attention output and FFN down), the largest over the model's
     * weight types: split points inside a row must fall on block boundaries.
     * 1 for unquantized weights. */
    int row_block;
    /* When > 0, the attention output's own block, and row_block is then the
     * FFN down's alone (a mixed model, e.g. Q4_K FFN down with a Q4_0
     * attention output); 0: row_block covers both. */
    int attn_row_block;
} cp_plan_shape;

typedef struct cp_plan_opts {
    int tp;                /* tensor-parallel ranks per stage (>= 1) */
    int pp;                /* pipeline stages (>= 1) */
    /* Layers taken away from the first and from the last stage (each), which
     * also hold the embedding and the LM head; given to the middle stages.
     * 0 = an even split. */
    int edge_layer_discount;
    int cp;                /* context-parallel ranks per stage and TP slot (0 counts as 1) */
} cp_plan_opts;

typedef struct cp_plan {
    int world, rank;
    int tp, pp, tp_rank, pp_rank;
    int cp, cp_rank;                 /* context parallelism: the positions p % cp == cp_rank */
    int layer_begin, layer_end;      /* this stage's layers [begin, end) */
    int head_begin, head_end;        /* query heads of this TP rank */
    int kv_head_begin, kv_head_end;  /* KV heads it holds (a replica when tp > n_head_kv) */
    int kv_replicas;                 /* TP ranks holding each KV head (1 when tp <= n_head_kv) */
    int ffn_begin, ffn_end;          /* FFN columns (gate/up rows, down columns) */
    int vocab_begin, vocab_end;      /* embedding and LM head rows */
    bool first_stage, last_stage;
} cp_plan;

/* The plan of `rank` in a world of tp * cp * pp ranks for a model of
 * shape s. Errors (CP_ERR_INVALID_ARG) name the constraint and the values of
 * tp or pp that would work: tp must divide the query heads, and the KV heads
 * or be a multiple of them; every stage needs at least one layer; FFN and
 * head split points must fall on quantization-block boundaries. */
cp_status cp_plan_init(const cp_plan_shape *s, const cp_plan_opts *opts, int rank, cp_plan *out);

/* The colors that split the world into rank's groups (cp_comm_split, key =
 * rank): its TP group (same stage and cp rank), PP group (same cp and TP
 * rank) and CP group (same stage and TP rank) under the layout above. */
typedef struct cp_plan_colors {
    int tp, pp, cp;
} cp_plan_colors;
cp_plan_colors cp_plan_group_colors(int rank, int tp, int cp);

/* Writes the valid tensor-parallel sizes for shape s (ascending, at most
 * cap) and returns how many there are. */
int cp_plan_valid_tp(const cp_plan_shape *s, int *out, int cap);

/* Splits n units into parts as evenly as possible in multiples of grain,
 * part i getting [*begin, *end); the last part takes what is left over.
 * Returns false when some part would be empty. */
bool cp_plan_split(int n, int parts, int i, int grain, int *begin, int *end);

#ifdef __cplusplus
}
#endif

#endif /* CP_PLAN_H */
