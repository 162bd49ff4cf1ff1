/* cp_backend.h - the compute backend interface: one opaque handle, one call
 * per operation. Every pointer argument is memory of the backend's device
 * (host memory for the CPU backend), borrowed for the call only. Calls are
 * ordered on the backend's stream; cp_backend_synchronize waits for them.
 * Activations are fp32; weights may be any cp_dtype the backend supports.
 * A backend is not thread-safe: its workspace is shared by all operations,
 * so one backend is called from one thread at a time (each engine owns its
 * own). */
#ifndef CP_BACKEND_H
#define CP_BACKEND_H

#include "cp_common.h"
#include "cp_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_backend *cp_backend_t;

typedef enum cp_copy_kind {
    CP_COPY_HOST_TO_DEVICE = 0,
    CP_COPY_DEVICE_TO_HOST = 1,
    CP_COPY_DEVICE_TO_DEVICE = 2,
} cp_copy_kind;

typedef enum cp_rope_mode {
    CP_ROPE_INTERLEAVED = 0, /* rotate pairs (2i, 2i+1): GGUF llama-family weights */
    CP_ROPE_HALF = 1,        /* rotate pairs (i, i + rot_dim/2): Hugging Face / NeoX */
} cp_rope_mode;

typedef struct cp_rope_params {
    cp_rope_mode mode;
    int head_dim;               /* elements per head */
    int rot_dim;                /* leading elements of each head that rotate (<= head_dim, even) */
    float theta;                /* frequency base, e.g. 10000 or 500000 */
    float freq_scale;           /* linear position scaling (1 = none) */
    const float *freq_factors;  /* optional [rot_dim/2]: angle_i /= freq_factors[i] (Llama 3.1
                                   scaling); device memory; NULL for none */
} cp_rope_params;

/* Causal attention of a batch of query tokens over a paged KV cache.
 * Cache layout per layer: [n_blocks][block_size][n_head_kv][head_dim] of
 * kv_dtype (F32 or F16; or a row of codes and scale per [head_dim], see
 * cp_kv_quantized). Token t of the batch belongs to sequence
 * seq_of_tok[t] (a row of block_tables) and sits at position pos_of_tok[t];
 * it attends to cache positions 0..pos_of_tok[t] of its sequence, so the
 * batch's own keys and values must be stored (cp_backend_kv_store) first.
 * Query head h reads KV head h / (n_head / n_head_kv) (grouped-query). */
typedef struct cp_attn_params {
    int n_tok;
    int n_head;
    int n_head_kv;
    int head_dim;
    int block_size;
    int max_blocks;             /* row length of block_tables */
    float scale;                /* softmax scale, usually 1/sqrt(head_dim) */
    cp_dtype kv_dtype;
    const int32_t *seq_of_tok;  /* [n_tok] */
    const int32_t *pos_of_tok;  /* [n_tok] */
    const int32_t *block_tables;/* [n_seq][max_blocks] physical block ids */
    int n_ctx_max;              /* max(pos_of_tok) + 1, or any larger bound, when the caller
                                   knows it (a host value that sizes device launches: a bound
                                   that stays fixed over many decode steps lets them be
                                   recorded once; the kernels read each token's length from
                                   pos_of_tok); 0: unknown */
    int n_seq_hint;             /* distinct sequences among the tokens when the caller knows
                                   it (host value; picks the kernel); 0: unknown */
    /* Context parallelism (0/0 or 1/0: off; the CPU backend only). The cache
     * holds only the positions p with p % kv_stride == kv_offset, position p
     * in slot p / kv_stride; block_size then counts slots per block (block
     * block_tables[seq][slot / block_size], row slot % block_size), so a
     * logical block of block_size * kv_stride positions keeps the same
     * table entry on every rank. kv_store takes only positions held here;
     * a token at pos attends to the held positions <= pos, possibly none. */
    int kv_stride, kv_offset;
    /* When not NULL (host memory; the CPU backend only): lse[n_tok][n_head]
     * receives log(sum_j exp(score_j * scale)) over the positions attended,
     * -inf when there are none (the output row is then 0), so that outputs
     * over disjoint sets of positions merge exactly:
     * out = sum_r exp(lse_r - L) out_r, L = log(sum_r exp(lse_r)). */
    float *lse;
} cp_attn_params;

/* K/V caches of quantized rows (the CPU and CUDA backends): each (position, KV
 * head) row of head_dim values is stored as one I8_ROW (int8, symmetric) or
 * F8_ROW (FP8 E4M3) row with its scale, cp_dtype_row_size(t, head_dim)
 * bytes, instead of head_dim F32 / F16 values. */
static inline bool cp_kv_quantized(cp_dtype t) { return t == CP_DTYPE_I8_ROW || t == CP_DTYPE_F8_ROW; }

/* Keys a token at position pos attends to under p's context parallelism
 * (pos + 1 without it). */
static inline int cp_attn_n_keys(const cp_attn_params *p, int pos) {
    if (p->kv_stride <= 1) return pos + 1;
    return pos >= p->kv_offset ? (pos - p->kv_offset) / p->kv_stride + 1 : 0;
}
/* The cache slot of a held position. */
static inline int cp_attn_slot(const cp_attn_params *p, int pos) {
    return p->kv_stride <= 1 ? pos : pos / p->kv_stride;
}

typedef struct cp_sample_params {
    float temperature;  /* <= 0: greedy (argmax, lowest index on ties) */
    int top_k;          /* <= 0: off */
    float top_p;        /* >= 1: off */
    float min_p;        /* <= 0: off */
} cp_sample_params;

/* The CPU backend with n_threads workers (<= 0: the number of online cores).
 * The fast paths (AVX2, AVX-512) are chosen from the CPU's features at run
 * time; CP_CPU_FORCE_REF=1 in the environment selects the fp32 references. */
cp_status cp_backend_cpu_init(int n_threads, cp_backend_t *out);

/* The CUDA backend on device `device` (0-based): one stream, one cuBLASLt
 * handle with its workspace. CP_ERR_UNSUPPORTED when this build has no CUDA
 * or the machine no usable device (the message says which);
 * CP_ERR_INVALID_ARG for a device index that does not exist. */
cp_status cp_backend_cuda_init(int device, cp_backend_t *out);

/* Number of usable CUDA devices into *count (0 and CP_ERR_UNSUPPORTED when
 * this build has no CUDA or no driver answers). */
cp_status cp_backend_cuda_device_count(int *count);

/* The 16-byte UUID of CUDA device `device` as this process numbers it (so
 * processes that see different devices, e.g. through CUDA_VISIBLE_DEVICES,
 * can tell whether they share one). CP_ERR_UNSUPPORTED without CUDA,
 * CP_ERR_INVALID_ARG for a device that does not exist. */
cp_status cp_backend_cuda_device_uuid(int device, uint8_t uuid[16]);

/* Frees the backend and everything it allocated internally. NULL is a no-op. */
void cp_backend_free(cp_backend_t be);

const char *cp_backend_name(cp_backend_t be);
cp_device cp_backend_device(cp_backend_t be);
int cp_backend_n_threads(cp_backend_t be);
/* The queue the backend's operations are ordered on, for work issued beside
 * them (a cudaStream_t for CUDA, so that a device communicator's transfers
 * follow the operation that wrote their buffer); NULL for the CPU, whose
 * operations have completed when they return. */
void *cp_backend_stream(cp_backend_t be);

/* Device memory. cp_backend_dealloc(be, NULL) is a no-op. */
cp_status cp_backend_alloc(cp_backend_t be, size_t bytes, void **out);
void cp_backend_dealloc(cp_backend_t be, void *p);
cp_status cp_backend_copy(cp_backend_t be, void *dst, const void *src, size_t bytes, cp_copy_kind kind);
cp_status cp_backend_memset(cp_backend_t be, void *dst, int value, size_t bytes);
cp_status cp_backend_synchronize(cp_backend_t be);

/* True when matmul/embed/dequantize accept weights of this dtype. */
bool cp_backend_supports(cp_backend_t be, cp_dtype t);

/* y[n][m] = x[n][k] . W^T (+ bias[m] when bias != NULL), W a 2-D tensor of
 * m rows of k elements (w->ne[1] = m, w->ne[0] = k). x, y fp32, row-major,
 * must not overlap. Quantized weights are used in place (activations are
 * quantized to the matching 8-bit type for the dot products). */
cp_status cp_backend_matmul(cp_backend_t be, const cp_tensor *w, const float *x, int n, float *y,
                            const float *bias);

/* ---- fused operations ----------------------------------------------------
 * Each equals the composition of the single ops named in its comment (a
 * backend without a fused kernel runs exactly that composition); a device
 * backend saves launches and memory passes. */

/* y[i] = x . W[i]^T (+ bias[i]) for i < count (1..3): matrices sharing x and
 * its row length (e.g. Q, K and V). bias may be NULL, or hold NULL entries. */
cp_status cp_backend_matmul_group(cp_backend_t be, int count, const cp_tensor *const *w,
                                  const float *x, int n, float *const *y, const float *const *bias);

/* out = swiglu(x . W_gate^T, x . W_up^T): out[n][m] with m = rows of both;
 * up[n][m] is scratch the composition may use (a fused kernel may not). */
cp_status cp_backend_matmul_swiglu(cp_backend_t be, const cp_tensor *w_gate,
                                   const cp_tensor *w_up, const float *x, int n, float *out,
                                   float *up);

/* x += delta, then out = rmsnorm(x) * w (rows of dim, n rows). */
cp_status cp_backend_add_rmsnorm(cp_backend_t be, float *x, const float *delta, const float *w,
                                 int n, int dim, float eps, float *out);

/* rope(q, n_head), rope(k, n_head_kv) in place, then kv_store(k, v): the
 * positions are p->pos_of_tok. */
cp_status cp_backend_rope_store(cp_backend_t be, const cp_rope_params *rp, const cp_attn_params *p,
                                float *q, float *k, const float *v, void *k_cache, void *v_cache);

/* out[i][:] = x[i][:] / rms(x[i][:]) * w[:], i < n, rows of dim. out may equal x. */
cp_status cp_backend_rmsnorm(cp_backend_t be, float *out, const float *x, const float *w, int n,
                             int dim, float eps);

/* Rotates x[n_tok][n_head][head_dim] in place at positions pos[n_tok]. */
cp_status cp_backend_rope(cp_backend_t be, float *x, const int32_t *pos, int n_tok, int n_head,
                          const cp_rope_params *rp);

/* Writes k, v ([n_tok][n_head_kv*head_dim] fp32) into the cache slots of
 * their tokens (block_tables[seq][pos / block_size], pos % block_size). */
cp_status cp_backend_kv_store(cp_backend_t be, const cp_attn_params *p, const float *k,
                              const float *v, void *k_cache, void *v_cache);

/* out[n_tok][n_head*head_dim] = softmax(q k^T * scale, causal) v. See cp_attn_params. */
cp_status cp_backend_attention(cp_backend_t be, const cp_attn_params *p, const float *q,
                               const void *k_cache, const void *v_cache, float *out);

/* y = a + b, n elements. y may equal a or b. */
cp_status cp_backend_add(cp_backend_t be, float *y, const float *a, const float *b, size_t n);

/* out = silu(gate) * up, n elements. out may equal gate or up. */
cp_status cp_backend_swiglu(cp_backend_t be, float *out, const float *gate, const float *up,
                            size_t n);

/* In-place softmax of n rows of dim. */
cp_status cp_backend_softmax(cp_backend_t be, float *x, int n, int dim);

/* out[i][:] = table row ids[i] as fp32 (table: 2-D, any supported dtype).
 * Ids outside [0, rows) are CP_ERR_INVALID_ARG. */
cp_status cp_backend_embed(cp_backend_t be, const cp_tensor *table, const int32_t *ids, int n,
                           float *out);

/* out[nrows][cols] = rows row0 .. row0+nrows-1 of w as fp32. */
cp_status cp_backend_dequantize(cp_backend_t be, const cp_tensor *w, int64_t row0, int64_t nrows,
                                float *out);

/* Packs nrows rows of cols fp32 into dtype t (cols a multiple of its block). */
cp_status cp_backend_quantize(cp_backend_t be, cp_dtype t, const float *x, int64_t nrows,
                              int64_t cols, void *out);

/* Picks one token per row of logits[n][vocab]; u[n] are uniform random
 * numbers in [0, 1) (host memory), one per row, so the caller owns seeding;
 * out[n] is host memory.
 * Filters apply in the order top-k, top-p, min-p, after temperature. The
 * CPU picks exactly cp_sample_host's token. The CUDA backend does too for
 * greedy rows and rows whose top-k keeps at most 256 tokens; rows that
 * keep more may pick a neighbour where u falls within 1e-6 of the mass
 * from a boundary between two tokens (its sums run in another order). */
cp_status cp_backend_sample(cp_backend_t be, const float *logits, int n, int vocab,
                            const cp_sample_params *sp, const float *u, int32_t *out);

/* The reference sampler's last step, for callers that filter candidates
 * themselves in its order: of the kept probabilities prob[0..kept) (each
 * relative to the largest), the index at which their running sum, in
 * double and in order, first exceeds u times their total (kept - 1 if
 * none does). */
int cp_sample_walk(const float *prob, int kept, float u);

/* The reference sampler on host memory (logits, u and out all host), for
 * callers that hold a few candidate logits on the host whatever their
 * backend. Same contract and choices as cp_backend_sample. */
cp_status cp_sample_host(const float *logits, int n, int vocab, const cp_sample_params *sp,
                         const float *u, int32_t *out);

/* ---- graphs of repeated steps ----------------------------------------------
 * A caller that issues the same sequence of operations again and again (a
 * decode step of one batch shape) may bracket it with graph_begin/graph_end
 * under a key that identifies that sequence exactly: the same operations,
 * sizes and device addresses in the same order. A device backend records
 * the sequence once and from then on launches the recording (a CUDA graph)
 * instead of issuing every operation from the host.
 *
 *   bool replay, reissue;
 *   CP_CHECK(cp_backend_graph_begin(be, key, &replay));
 *   cp_status st = replay ? CP_OK : issue_the_operations();
 *   cp_status end = cp_backend_graph_end(be, st != CP_OK, &reissue);
 *   if (reissue) st = issue_the_operations();   (now run directly)
 *   CP_CHECK(st);
 *   CP_CHECK(end);
 *
 * The first time a key is seen the operations run directly (the backend
 * allocates, picks algorithms and grows its workspace here); the second
 * time they are recorded and the recording launched at graph_end; later,
 * begin reports *replay = true, the caller issues nothing and graph_end
 * launches the recording. The result equals running the operations.
 *
 * Between begin and end (while not replaying) the caller may issue only
 * stream operations on device memory: no host<->device copy, no
 * cp_backend_synchronize, cp_backend_sample or alloc (while recording they
 * fail, CP_ERR_INTERNAL or CP_ERR_CUDA, and the recording is discarded;
 * a dealloc waits for graph_end). Everything the step
 * reads from the host is copied to device memory BEFORE begin, to
 * addresses that are part of the key; host values that size a launch
 * (token count, cp_attn_params.n_ctx_max, ...) belong to the key too.
 * The key names device addresses, so a backend drops every recording when
 * it frees or moves device memory (dealloc, workspace growth).
 *
 * graph_end must follow every begin, also when issuing failed (failed =
 * true: nothing is launched). When a recording cannot be completed (an
 * operation failed while recording, or capture, instantiation or launch
 * failed) the backend says so once on stderr, runs that key directly from
 * then on and sets *reissue: nothing of the step has run, and the caller
 * issues the operations again, directly (a genuine error then recurs and
 * is returned). A backend without graphs (the CPU), a CUDA backend
 * initialised with CP_CUDA_NO_GRAPH=1 in the environment, or one whose
 * graphs are switched off reports replay = false and reissue = false: the
 * bracket is a no-op. Neither call synchronises. */
cp_status cp_backend_graph_begin(cp_backend_t be, uint64_t key, bool *replay);
cp_status cp_backend_graph_end(cp_backend_t be, bool failed, bool *reissue);

/* Switches graphs on or off at run time (off drops every recording); a
 * no-op on a backend without graphs. Not between begin and end. */
void cp_backend_graph_set_enabled(cp_backend_t be, bool enabled);

typedef struct cp_backend_graph_stats {
    bool enabled;      /* graphs are in use on this backend */
    int64_t direct;    /* bracketed steps run directly (first sight of a key, or disabled) */
    int64_t captures;  /* recordings made and launched */
    int64_t replays;   /* launches of a cached recording */
    int64_t failures;  /* recordings or launches that failed (the step was reissued) */
    int64_t evictions; /* recordings dropped: least recently used, or memory freed/moved */
    int cached;        /* recordings held now */
} cp_backend_graph_stats;

/* Counters since the backend was created (all zero without graphs). */
void cp_backend_graph_get_stats(cp_backend_t be, cp_backend_graph_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* CP_BACKEND_H */
