/* cp_model.h - a Llama-family model bound to a backend: its configuration,
 * its weights (borrowed from the mapped file when the backend is the CPU,
 * copied to device memory otherwise), the paged KV cache and the forward
 * pass over a batch of tokens from many sequences. */
#ifndef CP_MODEL_H
#define CP_MODEL_H

#include "cp_backend.h"
#include "cp_model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_model *cp_model_t;
typedef struct cp_kv_cache *cp_kv_cache_t;

struct cp_plan;
struct cp_comm;

enum { CP_CP_AUTO = 0, CP_CP_QUERIES = 1, CP_CP_KV = 2, CP_CP_RING = 3 };
#define CP_CP_RING_BYTES_DEFAULT (1024.0 * 1024.0)
/* What the exchange choice counts one collective as beyond its bytes: its
 * latency times the bandwidth, 2-6 KiB between two ranks of one node
 * (benchmarks/parallel/bench_comm), tens of KiB between nodes. */
#define CP_CP_CALL_BYTES 16384.0
/* The exchange named "auto", "queries", "kv" or "ring" into *out; false
 * otherwise. */
bool cp_cp_exchange_parse(const char *name, int *out);
/* Its name ("?" for a value out of range); static storage. */
const char *cp_cp_exchange_name(int exchange);

typedef struct cp_model_load_opts {
    cp_backend_t backend;     /* borrowed; must outlive the model */
    /* Multi-rank: tp x pp ranks share the model (0 counts as 1); `rank` is
     * this process's rank among them (see cp_plan.h for the layout). The
     * communicators of its tensor-parallel group (the tp ranks of its stage,
     * ordered by tp_rank) and pipeline group (the pp ranks with its tp_rank,
     * ordered by stage) are borrowed until cp_model_free; NULL when the
     * group has one rank. Only this rank's slices are read from the file. */
    int tp, pp, rank;
    /* Context parallelism: cp ranks per (stage, TP slot) hold the same
     * weights and split every batch by position (position p on cp rank
     * p % cp, which also keeps its K/V, so each holds 1/cp of the cache).
     * Attention gathers the queries over the cp group, each rank attends to
     * the positions it holds, and the partial results merge by their
     * log-sum-exp. The world is tp x cp x pp (see cp_plan.h); cp_comm is the
     * group of ranks with this rank's stage and tp_rank, ordered by cp_rank.
     * CPU backend only; the KV block size must be a multiple of cp. */
    int cp;
    /* How the cp ranks meet in attention (see forward.c): CP_CP_AUTO moves
     * whichever is smaller per sequence, the queries (and partial outputs)
     * or the K/V history of the chunk's sequences; the others force one way
     * for every sequence. K/V is all-gathered (CP_CP_KV) or passed around
     * the ring (CP_CP_RING), which holds 2/cp of the history at a time
     * instead of all of it twice, in cp - 1 steps per layer (each transfer
     * started before the attention to the block in hand). Every cp rank
     * must be given the same cp_exchange and cp_ring_bytes: each decides
     * a chunk's exchange alone, and the load refuses ranks that differ. */
    int cp_exchange;
    /* Under CP_CP_AUTO, a chunk whose K/V-passing sequences hold at least
     * this many bytes of K and V per layer (their whole history) passes
     * them around the ring; less is all-gathered (0: the default,
     * CP_CP_RING_BYTES_DEFAULT). */
    double cp_ring_bytes;
    int edge_layer_discount;  /* layers moved off the first and last stage */
    /* Megatron sequence parallelism inside the TP group for multi-token
     * batches (prompts): the residual stream, norms and residual adds are
     * split by tokens; reduce-scatter replaces the all-reduce after the
     * row-parallel projections and an all-gather precedes the
     * column-parallel ones. Single-token steps run as plain TP. */
    bool sp;
    /* Pipeline micro-batches: a batch of n tokens is cut into this many
     * chunks (at least 16 tokens each) so that every stage works at once
     * (0: 4 x pp; 1: whole batches, no overlap). */
    int pp_micro;
    /* Check shapes and count this rank's share without reading weights or
     * allocating activations (no communicators needed): for sizing only,
     * the model cannot run. */
    bool inspect_only;
    struct cp_comm *tp_comm;
    struct cp_comm *pp_comm;
    struct cp_comm *cp_comm;
    /* Optional device-memory twins of tp_comm and pp_comm: the same ranks
     * in the same order, taking buffers of the backend's memory (NCCL for
     * a CUDA backend; any communicator for the CPU). When given they carry
     * the activations (TP's all-reduces, SP's reduce-scatters and
     * all-gathers, the hidden states between stages) straight from the
     * backend's buffers, ordered on its stream (cp_backend_stream), while
     * tp_comm and pp_comm keep the small host messages (sampling, logits,
     * tokens). NULL: the activations go over tp_comm / pp_comm, through
     * host staging buffers on a device backend. */
    struct cp_comm *tp_dev_comm;
    struct cp_comm *pp_dev_comm;
    /* When convert is set, every matrix weight is converted at load time to
     * convert_dtype (F32, F16, BF16 or a block type the backend can write),
     * e.g. to run a quantized file unquantized. */
    bool convert;
    cp_dtype convert_dtype;
    /* Called with (bytes done, bytes total) while weights are read; NULL ok. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} cp_model_load_opts;

/* Loads a model from a GGUF file or from a Hugging Face directory
 * (config.json + *.safetensors). Weight shapes are checked against the
 * configuration; the message names the first offending tensor.
 * Errors: CP_ERR_IO, CP_ERR_FORMAT, CP_ERR_UNSUPPORTED, CP_ERR_OOM. */
cp_status cp_model_load(const char *path, const cp_model_load_opts *opts, cp_model_t *out);
void cp_model_free(cp_model_t m);

const cp_model_config *cp_model_get_config(cp_model_t m);
/* This rank's share of the model (the whole model on a single rank). */
const struct cp_plan *cp_model_get_plan(cp_model_t m);
cp_backend_t cp_model_backend(cp_model_t m);
/* The GGUF handle when the model came from a GGUF file, else NULL (borrowed). */
struct cp_gguf *cp_model_gguf(cp_model_t m);
/* Path the model was loaded from (borrowed). */
const char *cp_model_path(cp_model_t m);

typedef struct cp_model_stats {
    int64_t n_params;            /* elements of the weights this rank holds */
    size_t weight_bytes;         /* bytes of the weights this rank holds, as stored */
    int64_t count_by_dtype[CP_DTYPE_COUNT];   /* tensors per dtype */
    size_t bytes_by_dtype[CP_DTYPE_COUNT];
    /* weights made at load rather than read from the file (AWQ / GPTQ
     * linears repacked, only the rows of this rank's slices): the bytes
     * this rank keeps, and the most it held at once while loading (a
     * row-parallel linear is made whole, sliced, then let go) */
    size_t made_bytes, made_peak_bytes;
    /* rows sampled across TP ranks (cp_model_forward_sample, CP_TOP_SAMPLE):
     * settled by the candidates, by the owning rank's walk over its slice,
     * or from gathered full rows */
    int64_t sampled_from_candidates, sampled_by_owner, sampled_from_full_rows;
    /* context parallelism: the most bytes of K/V that passing K/V held at
     * once for one layer (the rows all-gathered plus the sequences laid out
     * whole, or the ring's two blocks) */
    size_t cp_kv_peak_bytes;
} cp_model_stats;
void cp_model_get_stats(cp_model_t m, cp_model_stats *s);

/* ---- paged KV cache -------------------------------------------------- */

typedef struct cp_kv_cache_opts {
    int n_blocks;      /* physical blocks of block_size tokens (all layers) */
    int block_size;    /* tokens per block, e.g. 16 */
    cp_dtype dtype;    /* CP_DTYPE_F32 or CP_DTYPE_F16 */
} cp_kv_cache_opts;

/* Allocates K and V for every layer on the model's backend. */
cp_status cp_kv_cache_init(cp_model_t m, const cp_kv_cache_opts *opts, cp_kv_cache_t *out);
void cp_kv_cache_free(cp_kv_cache_t kv);
int cp_kv_cache_block_size(cp_kv_cache_t kv);
int cp_kv_cache_n_blocks(cp_kv_cache_t kv);
int cp_kv_cache_n_free(cp_kv_cache_t kv);
size_t cp_kv_cache_bytes(cp_kv_cache_t kv);
/* Takes n free blocks (ids written to out); CP_ERR_OOM when fewer are free,
 * in which case nothing is taken. */
cp_status cp_kv_cache_alloc_blocks(cp_kv_cache_t kv, int n, int32_t *out);
/* Takes one more reference to a block (prefix sharing). */
void cp_kv_cache_retain_block(cp_kv_cache_t kv, int32_t id);
/* Drops a reference; the block is free again when none remain. */
void cp_kv_cache_release_blocks(cp_kv_cache_t kv, const int32_t *ids, int n);

/* ---- forward pass ----------------------------------------------------- */

/* A batch of tokens, each of some sequence at some position. All arrays are
 * host memory, borrowed for the call. Every position 0..pos[t] of token t's
 * sequence must already be in the cache or in this batch, and the blocks
 * covering pos[t] must be in its block-table row. */
typedef struct cp_batch {
    int n_tok;
    const int32_t *tokens;       /* [n_tok] */
    const int32_t *pos;          /* [n_tok] */
    const int32_t *seq;          /* [n_tok] row of block_tables */
    const int32_t *block_tables; /* [n_seq][max_blocks] */
    int n_seq;
    int max_blocks;
    /* Rows whose logits are wanted, ascending indices into the batch. */
    const int32_t *logit_rows;
    int n_logits;
} cp_batch;

/* Runs the batch through every layer, writes K/V into the cache and the
 * logits of the requested rows to logits[n_logits][n_vocab] (host memory).
 * Multi-rank: a collective over all ranks of the model (every rank calls it
 * with the same batch); every rank receives the full logits.
 * Batches larger than the model's scratch capacity are processed in chunks.
 * Errors: CP_ERR_INVALID_ARG for a token id, position or block id out of
 * range (named in the message). */
cp_status cp_model_forward(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, float *logits);

/* Like cp_model_forward, but samples one token per requested row instead
 * of returning logits: tokens[n_logits] (host) with u[n_logits] uniform
 * numbers in [0, 1) (host). Multi-rank: pipeline stages exchange only the
 * token ids, and tensor parallel ranks do not gather the vocabulary. Each
 * rank passes its slice's k best candidates (k = top_k + 1 for top-k, else
 * CP_MODEL_MAX_TOP) with its slice's max and sum of exp(logit / T):
 *  - greedy, top-k, and top-p or min-p whose kept tokens lie within the
 *    candidates choose from them what cp_backend_sample chooses from the
 *    whole row (the top-p total is then summed from the ranks' sums, so a
 *    u within float rounding of a boundary may fall the other way);
 *  - plain temperature sampling (no top-k, top-p or min-p) picks the rank
 *    whose slice holds u's share of the mass, and that rank walks its slice
 *    in vocabulary order: the same distribution, but a different token for
 *    the same u than one rank's walk in order of probability;
 *  - a top-p, min-p or top-k cut beyond the candidates gathers those rows'
 *    logits and samples them as one rank does.
 * Every rank gets the tokens. */
cp_status cp_model_forward_sample(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b,
                                  const cp_sample_params *sp, const float *u, int32_t *tokens);

/* The k best candidates of each requested row, for a caller that samples
 * by itself (the serving scheduler). With tensor parallelism each rank
 * sends only its k best (logit, id) pairs and the max and sum of exp of its
 * slice, not the slice; pipeline stages pass only these. Rows flagged
 * CP_TOP_FULL get their whole logits too (sampling that needs the whole
 * distribution); those rows are gathered as cp_model_forward gathers them.
 * Rows flagged CP_TOP_SAMPLE are sampled by the model itself with their own
 * parameters and uniform (see cp_model_forward_sample for how the ranks
 * share that work). Rows flagged CP_TOP_TARGET get the logit of a given
 * token (a teacher-forced target: its log-probability with CP_TOP_LSE).
 * Every rank of the model receives everything. */
#define CP_MODEL_MAX_TOP 256
enum { CP_TOP_FULL = 1, CP_TOP_LSE = 2, CP_TOP_SAMPLE = 4, CP_TOP_TARGET = 8 };
typedef struct cp_logit_top {
    int k;               /* candidates per row, 1..CP_MODEL_MAX_TOP */
    const uint8_t *need; /* [n_logits] CP_TOP_* bits per row, or NULL (none) */
    float *logits;       /* [n_logits][n_vocab] host: the CP_TOP_FULL rows are
                            written there (the others untouched); may be NULL
                            when no row is flagged */
    float *val;          /* [n_logits][k] logits, descending, lower id first on
                            ties (as a full-row search finds them) */
    int32_t *id;         /* [n_logits][k] their token ids; -1 (val -inf) past
                            the vocabulary */
    double *lse;         /* [n_logits] log(sum(exp(logit))) over the whole row
                            for CP_TOP_LSE rows (on one rank summed in id order
                            from the row's max, in double); NaN for the others */
    /* CP_TOP_SAMPLE rows (all four may be NULL when no row is flagged): */
    const cp_sample_params *sp; /* [n_logits] each row's sampling */
    const float *u;             /* [n_logits] each row's uniform in [0, 1) */
    int32_t *tok;               /* [n_logits] out: the token sampled */
    float *tok_logit;           /* [n_logits] out: its logit */
    /* CP_TOP_TARGET rows (both may be NULL when no row is flagged; not
     * carried by the serving step link): */
    const int32_t *target;      /* [n_logits] a token id per row */
    float *target_logit;        /* [n_logits] out: its logit */
} cp_logit_top;

/* One token for row `row` of t with sp and the uniform u, as cp_sample_host
 * would choose it from the whole row: greedy takes the first candidate;
 * top-k needs top_k + 1 <= t->k candidates and hands the top_k + 1 best to
 * cp_sample_host in vocabulary order, which keeps the top_k best itself.
 * That is exact unless the top_k-th and the next tie after scaling by the
 * temperature, when a token outside the candidates could tie as well (the
 * choice is then among equally likely tokens). Sampling without a top-k
 * needs the whole row: CP_ERR_INVALID_ARG. */
cp_status cp_logit_top_sample(const cp_logit_top *t, int row, const cp_sample_params *sp, float u, int32_t *tok);

/* The candidates a row sampled with sp needs: 1 for greedy, top_k + 1 for
 * a top-k below the vocabulary and CP_MODEL_MAX_TOP (one more shows a tie
 * at the boundary; cp_logit_top_sample takes it from them), else
 * min(vocabulary, CP_MODEL_MAX_TOP) with *sample set: the choice may reach
 * beyond the candidates, so the forward pass makes it (CP_TOP_SAMPLE). */
int cp_logit_top_want(const cp_sample_params *sp, int vocab, bool *sample);

/* Like cp_model_forward, with the requested rows as cp_logit_top. */
cp_status cp_model_forward_top(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, const cp_logit_top *out);

/* Pipelined steps (several batches in flight, one per stage): runs only
 * this rank's stage of b, in one chunk, without the collectives that bring
 * every stage the result. The first stage embeds; a later stage receives
 * the previous stage's hidden states as cp_model_forward does. A stage
 * before the last keeps its output until cp_model_stage_send passes it on
 * (so the caller chooses when to block on the next stage); the last stage
 * writes out as cp_model_forward_top does, on its ranks only. Needs
 * b->n_tok <= cp_model_max_batch and no context parallelism
 * (CP_ERR_INVALID_ARG, CP_ERR_UNSUPPORTED otherwise). */
cp_status cp_model_forward_stage(cp_model_t m, cp_kv_cache_t kv, const cp_batch *b, const cp_logit_top *out);
/* Sends the output kept by the last cp_model_forward_stage to the next
 * stage (nothing on the last stage, or when nothing is kept). */
cp_status cp_model_stage_send(cp_model_t m);

/* ---- calibration ---------------------------------------------------------
 * The inputs of every linear layer, for activation-aware optimizations
 * (AWQ scales, Wanda pruning). */
typedef enum cp_act_site {
    CP_ACT_ATTN_IN = 0, /* normed residual stream: input of Q, K, V  [n][dim] */
    CP_ACT_ATTN_OUT,    /* attention output: input of O             [n][n_head*head_dim] */
    CP_ACT_FFN_IN,      /* normed residual stream: input of gate, up [n][dim] */
    CP_ACT_FFN_ACT,     /* silu(gate) * up: input of down          [n][ffn_dim] */
    CP_ACT_SITES,       /* the number of linear-input sites above */
    /* the residual stream entering block `layer` (layer = n_layer: leaving
     * the last block, before the final norm)    [n][dim] */
    CP_ACT_RESID = CP_ACT_SITES,
} cp_act_site;
typedef void (*cp_act_observer)(void *user, int layer, cp_act_site site, const float *x, int n, int width);

/* Calls fn (NULL: stop) during every later forward pass with the rows of
 * each site of each layer (host memory, valid during the call). On the CPU
 * backend only, and without sequence parallelism: CP_ERR_UNSUPPORTED
 * otherwise. Across ranks each rank sees its own part: the layers of its
 * stage (layer is the model's index), the rows of the positions it computes
 * (context parallelism), and at CP_ACT_ATTN_OUT and CP_ACT_FFN_ACT the
 * columns of its query heads and FFN columns (cp_plan head_begin and
 * ffn_begin give where they start); the other sites are the whole width on
 * every rank of a TP group. */
cp_status cp_model_set_observer(cp_model_t m, cp_act_observer fn, void *user);

/* The communicators of this rank's tensor-parallel, pipeline and
 * context-parallel groups (borrowed; NULL where the group is this rank
 * alone), for collectives over the model's layout. */
typedef struct cp_model_groups {
    struct cp_comm *tp, *pp, *cp;
} cp_model_groups;
cp_model_groups cp_model_get_groups(cp_model_t m);

/* Largest number of tokens one internal chunk of cp_model_forward takes. */
int cp_model_max_batch(cp_model_t m);

#ifdef __cplusplus
}
#endif

#endif /* CP_MODEL_H */
