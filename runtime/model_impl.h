/* model_impl.h - the layout of cp_model and cp_kv_cache shared by the
 * loader (model.c), the KV cache (kv_cache.c) and the forward pass
 * (forward.c). Private to runtime/. */
#ifndef CP_MODEL_IMPL_H
#define CP_MODEL_IMPL_H

#include "cp_comm.h"
#include "cp_gguf.h"
#include "cp_model.h"
#include "cp_plan.h"

#define CP_LOGIT_CHUNK 16 /* rows of logits computed at once on a device backend or with TP */
/* Words a row takes in a TP rank's packed candidates (forward.c, top_rows):
 * k logits, k ids, the slice's max and sum of exp at temperature 1 (f32,
 * pad, f64), the same at the row's sampling temperature, and the target
 * token's logit when the slice holds it. */
#define CP_TOP_WORDS(k) (2 * (size_t)(k) + 9)
#define CP_MAX_TP 1024      /* tensor-parallel ranks per stage */

typedef struct cp_layer_weights {
    float *attn_norm;           /* [dim] */
    cp_tensor wq, wk, wv, wo;   /* [q_dim][dim], [kv_dim][dim] x2, [dim][q_dim] */
    float *bq, *bk, *bv;        /* [q_dim], [kv_dim], [kv_dim] or NULL */
    float *ffn_norm;            /* [dim] */
    cp_tensor w_gate, w_up;     /* [ffn][dim] */
    cp_tensor w_down;           /* [dim][ffn] */
} cp_layer_weights;

typedef struct cp_model_weights {
    cp_tensor tok_embd;         /* [vocab][dim] */
    cp_tensor output;           /* [vocab][dim]; equals tok_embd when tied */
    float *out_norm;            /* [dim] */
    float *rope_freqs;          /* [rot_dim/2] or NULL */
    cp_layer_weights *layers;   /* [layers of this stage] */
} cp_model_weights;

/* Activations of one chunk of at most max_batch tokens, carved from one
 * backend allocation. */
typedef struct cp_scratch {
    float *x;      /* [T][dim] residual stream */
    float *xb;     /* [T][dim] normed input */
    float *q;      /* [T][q_dim] */
    float *k, *v;  /* [T][kv_dim] */
    float *att;    /* [T][max(q_dim, ffn)] attention output, then gate */
    float *up;     /* [T][ffn] */
    float *proj;   /* [T][dim] */
    float *xl;     /* [T][dim] normed / reduced rows of this rank's sequence slice */
    int32_t *tokens, *pos, *seq, *rows; /* [T] device copies of the batch */
} cp_scratch;

struct cp_model {
    cp_backend_t be;
    char *path;
    cp_model_config cfg;
    /* this rank's share (the whole model on a single rank) */
    cp_plan plan;
    cp_comm_t tp_comm, pp_comm;  /* borrowed; NULL on a single rank */
    cp_comm_t tp_dev, pp_dev;    /* borrowed device-memory twins for activations; NULL: none */
    cp_comm_t cp_comm;           /* borrowed; NULL without context parallelism */
    /* context parallelism (host buffers, made at the first batch): the
     * chunk's rows by owner (rank-major, each owner's rows padded to
     * cp_tmax), this rank's rows, and the attention exchange */
    struct {
        int tmax;                    /* the most query-passing rows any cp rank owns in the chunk */
        int *count;                  /* [4 * cp] rows each rank owns, its query-passing rows, and fill counters */
        int32_t *lrow;               /* [max_batch] a chunk row's index among its owner's rows */
        int32_t *tok, *pos, *seq;    /* [max_batch] this rank's rows */
        int32_t *gpos, *gseq;        /* [cp * max_batch] every rank's rows */
        float *qall, *o;             /* [cp * max_batch] rows of q_dim */
        float *lse, *lmax;           /* [cp * max_batch][n_head_l] */
        float *pack, *red;           /* [cp * max_batch] / [max_batch] rows of n_head_l * (head_dim + 1) */
        float *xg;                   /* [max_batch][dim] logit rows shared over the group */
        /* passing K/V instead, per sequence (the chunk's choice, made alike on
         * every cp rank): the sequences that do and their lengths (history
         * included), which chunk rows belong to them, and this rank's rows of
         * each kind */
        int n_runs;
        bool ring;                   /* they go around the ring, not all-gathered */
        int32_t *runs;               /* [max_batch][2] {seq, length} */
        int32_t *seqs;               /* [max_batch][3] {seq, length, rows} of every sequence of the chunk */
        int32_t *rseq;               /* [max_batch] a chunk row's index in seqs */
        unsigned char *kvrow;        /* [max_batch] chunk row t passes K/V */
        int nk, nq;                  /* this rank's rows passing K/V and queries */
        int32_t *kidx, *qidx;        /* [max_batch] their indices among this rank's rows */
        int32_t *kpos, *kseq;        /* [max_batch] positions and sequences of the K/V rows */
        size_t *share;               /* [2 * cp] bytes of K/V rows from each rank, and their offsets */
        unsigned char *kvall;        /* every rank's held rows of those sequences, K then V per position */
        size_t kvall_cap;
        unsigned char *kvfull;       /* the sequences' whole K, then V, in blocks of block_size;
                                        the ring: its two blocks */
        size_t kvfull_cap;
        int32_t *ftab;               /* its block tables [max seq id + 1][max_blocks] */
        size_t ftab_cap;
    } cpx;
    int cp_exchange;             /* CP_CP_AUTO, CP_CP_QUERIES, CP_CP_KV or CP_CP_RING */
    double cp_ring_bytes;        /* CP_CP_AUTO: K/V histories this large go around the ring */
    bool sp;                     /* sequence parallelism for multi-token chunks */
    int pp_micro;                /* micro-batches per batch across pipeline stages */
    bool stage_only;             /* cp_model_forward_stage: one chunk, output kept */
    size_t held;                 /* floats of s.x kept for cp_model_stage_send */
    int n_layer_l;               /* layers of this stage */
    int n_head_l, n_kv_l;        /* query / KV heads of this TP rank */
    int ffn_l, vocab_l;          /* FFN columns, vocabulary rows */
    float *gather;               /* [CP_LOGIT_CHUNK][vocab] host: logit slices gathered over TP */
    int32_t *ids_host;           /* [max_batch] host: token ids of this rank's vocabulary slice */
    float *full;                 /* [CP_LOGIT_CHUNK][vocab] host: full logit rows to sample */
    /* sampling from the rows' candidates under TP (host, grown on demand) */
    float *cand_v;               /* [cand_cap] */
    int32_t *cand_i;             /* [cand_cap] */
    double *cand_lse;            /* [cand_rows] */
    float *cand_logit;           /* [cand_rows] */
    uint8_t *cand_need;          /* [cand_rows] */
    cp_sample_params *cand_sp;   /* [cand_rows] */
    size_t cand_cap, cand_rows;
    int32_t *top_pack;           /* TP: [1 + tp][CP_LOGIT_CHUNK][CP_TOP_WORDS(CP_MODEL_MAX_TOP)]
                                    packed candidates, this rank's then all (forward.c) */
    cp_model_weights w;
    cp_model_stats stats;
    cp_gguf_t gguf;
    /* non-GGUF sources: lookup by GGUF-convention name */
    const cp_weight_info *(*find)(void *ctx, const char *name);
    void *find_ctx;
    /* a source that makes tensors on demand (find gives info->data NULL):
     * rows [r0, r1) of a tensor, whole width, owned by the source until
     * find_release (or hf_close) */
    cp_status (*find_rows)(void *ctx, const char *name, int64_t r0, int64_t r1, const void **out);
    void (*find_release)(void *ctx, const char *name);
    void (*hf_close)(void *ctx);
    cp_act_observer observe; /* calibration hook, or NULL */
    void *observe_user;
    void *meta_image;     /* the GGUF metadata image m->gguf reads, for a
                             cparallel safetensors file (freed after it) */
    void **owned;       /* device allocations made for weights */
    int n_owned, cap_owned;
    size_t total_bytes, loaded_bytes;
    int max_batch;
    void *scratch;
    size_t scratch_bytes;
    cp_scratch s;
    void *tables;       /* device copy of the block tables (device backends) */
    size_t tables_bytes;
    float *logits;      /* [CP_LOGIT_CHUNK][vocab_l] device (device backends or TP) */
    /* host staging of device buffers for a communicator that takes host
     * memory (MPI beside a GPU backend): two buffers of stage_floats */
    float *stage_a, *stage_b;
    size_t stage_floats;
};

struct cp_kv_cache {
    cp_model_t model;
    int n_blocks, block_size;
    int slots;            /* rows per block this rank stores: block_size / cp */
    cp_dtype dtype;
    size_t layer_bytes;   /* bytes of K (or V) of one layer */
    void *mem;            /* one allocation: K of every layer, then V of every layer */
    int32_t *refs;        /* [n_blocks] reference counts (host) */
    int32_t *free_list;   /* [n_blocks] stack of free ids (host) */
    int n_free;
};

/* Opens a Hugging Face model directory (config.json + safetensors) and sets
 * m->cfg, m->find, m->find_ctx, m->hf_close and m->total_bytes. */
cp_status cp_model_open_hf(cp_model_t m, const char *dir);

/* Opens one .safetensors file: a cparallel file (its configuration and
 * tokenizer in the embedded GGUF metadata, see cp_quantize.h; m->gguf is
 * set) or a Hugging Face file with config.json beside it. Sets what
 * cp_model_open_hf sets. */
cp_status cp_model_open_st_file(cp_model_t m, const char *path);

static inline void *cp_kv_layer_k(cp_kv_cache_t kv, int l) {
    return (char *)kv->mem + (size_t)l * kv->layer_bytes;
}
static inline void *cp_kv_layer_v(cp_kv_cache_t kv, int l) {
    return (char *)kv->mem + ((size_t)kv->model->n_layer_l + (size_t)l) * kv->layer_bytes;
}

#endif /* CP_MODEL_IMPL_H */
