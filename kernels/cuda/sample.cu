/* sample.cu - sampling on the device with the reference's choices. One block
 * per row selects the K best tokens of z = logits / temperature by a radix
 * select over the bits of z (exact: the reference's order, ties to the lower
 * id); the host then decides on those K alone with the reference's own
 * arithmetic. Rows the K best cannot decide (pure temperature, a nucleus
 * wider than K) draw on the device over the whole row in the same order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cp_cuda_ops.h"
#include "cpu/cpu_ref.h"
#include "cuda_common.cuh"

/* One block of SAMPLE_THREADS per row; radix digits of 11, 11 and 10 bits
 * (2048 bins: each thread of the block owns two bins in the bin scans). */
#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_BINS 2048
#define SAMPLE_FULL 0xffffffffu
#define SAMPLE_NONE 0xffffffffu
/* Probability masses are fixed point in units of 2^-40 (a token's mass is
 * at most 1, so a row of up to 2^23 tokens sums below 2^63 in a uint64):
 * integer sums are exact and independent of order, so every pass over a
 * row sees the same bucket masses. */
#define SAMPLE_MASS_ONE 1099511627776.0f
#define SAMPLE_MASS_ONE_Q (1ull << 40)
#define SAMPLE_MAX_MASS_VOCAB (1 << 23)

static_assert(SAMPLE_THREADS * 2 == SAMPLE_BINS, "each thread owns two bins");
static_assert(SAMPLE_WARPS == 32, "warp totals are scanned by one warp");
static_assert(CP_SAMPLE_CUDA_MAX_K <= SAMPLE_THREADS, "one thread per candidate");
static_assert((CP_SAMPLE_CUDA_MAX_K & (CP_SAMPLE_CUDA_MAX_K - 1)) == 0, "bitonic sort size");

typedef unsigned long long u64;

/* Shared memory of both kernels (26.5 KiB, static). */
typedef struct sample_smem {
    unsigned hc[SAMPLE_BINS];       /* tokens per digit bin */
    u64 hq[SAMPLE_BINS];            /* probability mass per digit bin */
    u64 red[SAMPLE_WARPS];          /* block reductions and scans */
    u64 cand[CP_SAMPLE_CUDA_MAX_K]; /* candidate codes, see cand_code */
    int warp_cnt[SAMPLE_WARPS];     /* group members per warp segment */
    int warp_base[SAMPLE_WARPS];    /* members before the warp's segment */
    int n_above;
    int sel;          /* the selected bin, -1 before */
    u64 sel_c, sel_q; /* count and mass before the selected bin */
    int pick;
} sample_smem;

/* ---- keys: the order of the reference on uint32 ---------------------------
 * Larger key = earlier in the reference's order. -0 and +0 share one key (the
 * reference's comparison sees them equal, so their ids order them); NaN gets
 * key 0, below -inf. */
static __device__ __forceinline__ uint32_t z_key(float z) {
    if (z != z) return 0u;
    if (z == 0.0f) return 0x80000000u;
    const uint32_t b = __float_as_uint(z);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static __device__ __forceinline__ float key_z(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/* The same IEEE quotient as the host's l / temperature, whatever the
 * compiler flags (x / 1 is x exactly, and skips the division's cost). */
static __device__ __forceinline__ float z_of(const float *l, int i, float temp) {
    return temp == 1.0f ? l[i] : __fdiv_rn(l[i], temp);
}

/* key in the high half, ~id in the low: the larger code is the better token
 * (ties to the lower id); code 0 is below every real token. */
static __device__ __forceinline__ u64 cand_code(uint32_t key, int id) {
    return ((u64)key << 32) | (u64)(uint32_t) ~(uint32_t)id;
}

static __device__ __forceinline__ int code_id(u64 c) {
    return (int)~(uint32_t)c;
}

/* expf(z - zmax) in [0, 1] (device expf: within 2 ulp of the host's); NaN
 * tokens weigh nothing. */
static __device__ __forceinline__ float prob_dev(float z, float zmax) {
    const float p = expf(__fsub_rn(z, zmax));
    return p > 0.0f ? fminf(p, 1.0f) : 0.0f;
}

static __device__ __forceinline__ u64 mass_of(float p) {
    return __float2ull_rn(p * SAMPLE_MASS_ONE); /* exact scaling by 2^40 */
}

/* ---- block reductions (every thread of the block calls; all get the result) */

static __device__ u64 block_max_u64(u64 v, u64 *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const u64 t = __shfl_xor_sync(SAMPLE_FULL, v, o);
        v = t > v ? t : v;
    }
    __syncthreads(); /* red is free */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[lane];
    for (int o = 16; o > 0; o >>= 1) {
        const u64 t = __shfl_xor_sync(SAMPLE_FULL, v, o);
        v = t > v ? t : v;
    }
    return v;
}

static __device__ u64 block_sum_u64(u64 v, u64 *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(SAMPLE_FULL, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[lane];
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(SAMPLE_FULL, v, o);
    return v;
}

/* Sum of v over the threads before this one. Every warp scans the 32 warp
 * totals itself, which saves a barrier. */
static __device__ u64 block_excl_scan_u64(u64 v, u64 *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 x = v;
    for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(SAMPLE_FULL, x, o);
        if (lane >= o) x += t;
    }
    __syncthreads();
    if (lane == 31) red[warp] = x;
    __syncthreads();
    u64 w = red[lane];
    for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(SAMPLE_FULL, w, o);
        if (lane >= o) w += t;
    }
    const u64 before = __shfl_sync(SAMPLE_FULL, w, (warp + 31) & 31);
    return (warp > 0 ? before : 0ull) + x - v;
}

/* The best token of the row: code of (max key, lowest id among it). */
static __device__ u64 row_best(const float *l, int vocab, float temp, sample_smem *s) {
    u64 best = 0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        const u64 c = cand_code(z_key(z_of(l, i, temp)), i);
        best = c > best ? c : best;
    }
    return block_max_u64(best, s->red);
}

/* ---- radix descent -------------------------------------------------------
 * Finds the token, in the reference's order, at which the running weight
 * first exceeds target: by count (BY_MASS false: the token of rank target)
 * or by probability mass (target in 2^-40 units, masses relative to zmax).
 * Each pass histograms one digit of the keys of the tokens whose higher
 * digits equal the prefix found so far and keeps the bin where the running
 * weight crosses target. The result is a group of tokens (a key prefix
 * under mask) and the rank, in id order, of the token within that group. */
typedef struct desc_out {
    uint32_t prefix, mask;
    u64 above_c, above_q; /* count and mass of the tokens before the group */
    u64 cnt;              /* tokens in the group */
    u64 rank;             /* of the token within the group, in id order */
    u64 incl_q;           /* mass of every token up to and including it */
    int ok;
} desc_out;

template <bool BY_MASS, bool WITH_MASS>
static __device__ void descend(const float *l, int vocab, float temp, float zmax, u64 target,
                               sample_smem *s, desc_out *o) {
    const int tid = threadIdx.x, lane = tid & 31;
    uint32_t prefix = 0, mask = 0;
    u64 above_c = 0, above_q = 0;
    o->ok = 0;
    for (int pass = 0; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const uint32_t dmask = pass == 2 ? 0x3ffu : 0x7ffu;
        for (int b = tid; b < SAMPLE_BINS; b += SAMPLE_THREADS) {
            s->hc[b] = 0;
            s->hq[b] = 0;
        }
        if (tid == 0) s->sel = -1;
        __syncthreads();
        /* the loop is uniform over the block, so warps are converged */
        for (int i0 = 0; i0 < vocab; i0 += SAMPLE_THREADS) {
            const int i = i0 + tid;
            uint32_t d = SAMPLE_NONE;
            u64 q = 0;
            if (i < vocab) {
                const float z = z_of(l, i, temp);
                const uint32_t key = z_key(z);
                if ((key & mask) == prefix) {
                    d = (key >> shift) & dmask;
                    if (WITH_MASS) q = mass_of(prob_dev(z, zmax));
                }
            }
            if (!__any_sync(SAMPLE_FULL, d != SAMPLE_NONE)) continue;
            /* lanes of one bin add once: a flat row puts every token in one bin */
            const unsigned peers = __match_any_sync(SAMPLE_FULL, d);
            const bool lead = d != SAMPLE_NONE && lane == __ffs(peers) - 1;
            if (WITH_MASS) {
                /* q <= 2^40: 32 halves of 20 bits sum without overflow */
                const unsigned hi = __reduce_add_sync(peers, (unsigned)(q >> 20));
                const unsigned lo = __reduce_add_sync(peers, (unsigned)q & 0xfffffu);
                if (lead) atomicAdd(&s->hq[d], ((u64)hi << 20) + (u64)lo);
            }
            if (lead) atomicAdd(&s->hc[d], (unsigned)__popc(peers));
        }
        __syncthreads();
        /* thread t owns bins 2047-2t and 2046-2t: the scan runs best first */
        const int b0 = SAMPLE_BINS - 1 - 2 * tid, b1 = b0 - 1;
        const u64 c0 = s->hc[b0], c1 = s->hc[b1];
        const u64 q0 = s->hq[b0], q1 = s->hq[b1];
        const u64 ec = block_excl_scan_u64(c0 + c1, s->red);
        const u64 eq = WITH_MASS ? block_excl_scan_u64(q0 + q1, s->red) : 0ull;
        const u64 w0 = BY_MASS ? q0 : c0, w1 = BY_MASS ? q1 : c1;
        const u64 base = BY_MASS ? above_q + eq : above_c + ec;
        if (w0 > 0 && base <= target && target - base < w0) {
            s->sel = b0;
            s->sel_c = above_c + ec;
            s->sel_q = above_q + eq;
        } else if (w1 > 0 && base + w0 <= target && target - base - w0 < w1) {
            s->sel = b1;
            s->sel_c = above_c + ec + c0;
            s->sel_q = above_q + eq + q0;
        }
        __syncthreads();
        const int b = s->sel;
        if (b < 0) return; /* target outside the row's weight: o->ok stays 0 */
        above_c = s->sel_c;
        above_q = s->sel_q;
        const u64 cnt = s->hc[b], grp_q = s->hq[b];
        prefix |= (uint32_t)b << shift;
        mask |= dmask << shift;
        __syncthreads(); /* all have read the bins before the next pass clears them */
        bool done = pass == 2;
        if (!BY_MASS && cnt == target + 1 - above_c) done = true; /* group taken whole */
        if (BY_MASS && cnt == 1) done = true;
        if (!done) continue;
        o->prefix = prefix;
        o->mask = mask;
        o->above_c = above_c;
        o->above_q = above_q;
        o->cnt = cnt;
        const bool ties = pass == 2 && cnt > 1; /* one key: every member has one mass */
        const u64 qt = ties ? grp_q / cnt : grp_q;
        u64 r;
        if (BY_MASS)
            r = ties ? (qt > 0 ? (target - above_q) / qt : 0ull) : 0ull;
        else
            r = target - above_c;
        if (r > cnt - 1) r = cnt - 1;
        o->rank = r;
        o->incl_q = ties ? above_q + (r + 1) * qt : above_q + grp_q;
        o->ok = 1;
        return;
    }
}

/* ---- ordered walks over the group of a descent ------------------------------
 * Warp w owns a contiguous segment of the row and reads it 32 tokens at a
 * time (coalesced); ballots give each member its rank in id order. */
static __device__ __forceinline__ void warp_segment(int vocab, int warp, int *start, int *end) {
    const long long seg = ((long long)vocab + SAMPLE_WARPS * 32 - 1) / (SAMPLE_WARPS * 32) * 32;
    const long long a = seg * warp, b = a + seg;
    *start = (int)(a < vocab ? a : vocab);
    *end = (int)(b < vocab ? b : vocab);
}

/* Counts the group's members per warp segment into warp_cnt / warp_base;
 * with cand, also appends the tokens above the group (s->n_above zeroed by
 * the caller) at cand[atomic position < cap]. */
static __device__ void group_counts(const float *l, int vocab, float temp, uint32_t mask,
                                    uint32_t prefix, u64 *cand, int cap, sample_smem *s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int start, end;
    warp_segment(vocab, warp, &start, &end);
    int cnt = 0;
    for (int i0 = start; i0 < end; i0 += 32) {
        const int i = i0 + lane;
        bool member = false;
        if (i < end) {
            const uint32_t key = z_key(z_of(l, i, temp));
            const uint32_t mk = key & mask;
            member = mk == prefix;
            if (cand && mk > prefix) {
                const int pos = atomicAdd(&s->n_above, 1);
                if (pos < cap) cand[pos] = cand_code(key, i);
            }
        }
        cnt += __popc(__ballot_sync(SAMPLE_FULL, member));
    }
    if (lane == 0) s->warp_cnt[warp] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        int b = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) {
            s->warp_base[w] = b;
            b += s->warp_cnt[w];
        }
    }
    __syncthreads();
}

/* The members of rank lo..hi-1 (id order): cand[rank - lo] = their code
 * (cand != NULL), or s->pick = the id (hi = lo + 1). After group_counts. */
static __device__ void group_ranked(const float *l, int vocab, float temp, uint32_t mask,
                                    uint32_t prefix, int lo, int hi, u64 *cand, sample_smem *s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int start, end;
    warp_segment(vocab, warp, &start, &end);
    int base = s->warp_base[warp];
    if (base + s->warp_cnt[warp] > lo) { /* else the segment holds none of them */
        for (int i0 = start; i0 < end && base < hi; i0 += 32) {
            const int i = i0 + lane;
            uint32_t key = 0;
            bool member = false;
            if (i < end) {
                key = z_key(z_of(l, i, temp));
                member = (key & mask) == prefix;
            }
            const unsigned bal = __ballot_sync(SAMPLE_FULL, member);
            const int r = base + __popc(bal & ((1u << lane) - 1u));
            if (member && r >= lo && r < hi) {
                if (cand)
                    cand[r - lo] = cand_code(key, i);
                else
                    s->pick = i;
            }
            base += __popc(bal);
        }
    }
    __syncthreads();
}

/* ---- kernel: the k best of each row ---------------------------------------- */

static __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_topk_kernel(const float *logits, int vocab, float temp, int k, int with_mass,
                       float *cand_z, int32_t *cand_id, u64 *mass) {
    __shared__ sample_smem s;
    const int tid = threadIdx.x;
    const float *l = logits + (size_t)blockIdx.x * (size_t)vocab;
    float *oz = cand_z + (size_t)blockIdx.x * (size_t)k;
    int32_t *oid = cand_id + (size_t)blockIdx.x * (size_t)k;

    if (with_mass) {
        const float zmax = key_z((uint32_t)(row_best(l, vocab, temp, &s) >> 32));
        u64 q = 0;
        if (zmax > -INFINITY && zmax < INFINITY) /* else the host needs no mass */
            for (int i = tid; i < vocab; i += SAMPLE_THREADS)
                q += mass_of(prob_dev(z_of(l, i, temp), zmax));
        q = block_sum_u64(q, s.red);
        if (tid == 0) mass[blockIdx.x] = q;
    }

    desc_out o;
    descend<false, false>(l, vocab, temp, 0.0f, (u64)(k - 1), &s, &o);
    if (!o.ok) { /* cannot happen for 1 <= k <= vocab: the host reports it */
        for (int j = tid; j < k; j += SAMPLE_THREADS)
            oid[j] = -1;
        return;
    }
    const int above = (int)o.above_c, need = k - above; /* need >= 1 of the group, in id order */
    for (int j = tid; j < CP_SAMPLE_CUDA_MAX_K; j += SAMPLE_THREADS)
        s.cand[j] = 0;
    if (tid == 0) s.n_above = 0;
    __syncthreads();
    group_counts(l, vocab, temp, o.mask, o.prefix, s.cand, k, &s);
    if (s.n_above != above) { /* the descent and the walk disagree: report it */
        for (int j = tid; j < k; j += SAMPLE_THREADS)
            oid[j] = -1;
        return;
    }
    group_ranked(l, vocab, temp, o.mask, o.prefix, 0, need, s.cand + above, &s);

    /* bitonic sort of the codes, descending: best first */
    for (int size = 2; size <= CP_SAMPLE_CUDA_MAX_K; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            if (tid < CP_SAMPLE_CUDA_MAX_K) {
                const int j = tid ^ stride;
                if (j > tid) {
                    const u64 a = s.cand[tid], b = s.cand[j];
                    const bool desc = (tid & size) == 0;
                    if (desc ? a < b : a > b) {
                        s.cand[tid] = b;
                        s.cand[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (tid < k) {
        const int id = code_id(s.cand[tid]);
        oid[tid] = id;
        oz[tid] = id >= 0 && id < vocab ? z_of(l, id, temp) : NAN;
    }
}

/* ---- kernel: the reference's whole-row decision ---------------------------------
 * kept0 tokens survive top-k (vocab: none cut); top-p and min-p cut the
 * prefix further by mass; the draw is the token at which the running mass
 * of the kept prefix first exceeds u times its mass. Every cut and the draw
 * is a descent, so the order is exactly the reference's; only the masses
 * (device expf, 2^-40 units) differ from the host's by rounding. */
static __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_tail_kernel(const float *logits, int vocab, const int32_t *rows, float temp, int kept0,
                       float top_p, float min_p, const float *u, int32_t *out) {
    __shared__ sample_smem s;
    const int tid = threadIdx.x;
    const int row = rows ? rows[blockIdx.x] : (int)blockIdx.x;
    const float *l = logits + (size_t)row * (size_t)vocab;

    const u64 best = row_best(l, vocab, temp, &s);
    const float zmax = key_z((uint32_t)(best >> 32));
    if (!(zmax > -INFINITY && zmax < INFINITY)) { /* no finite distribution */
        if (tid == 0) out[row] = code_id(best);
        return;
    }
    const bool use_min_p = min_p > 0.0f;
    u64 tot = 0, tm = 0;
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
        const float p = prob_dev(z_of(l, i, temp), zmax);
        const u64 q = mass_of(p);
        tot += q;
        if (use_min_p && p >= min_p) tm += q; /* the reference: prob >= min_p * 1 */
    }
    tot = block_sum_u64(tot, s.red);
    tm = block_sum_u64(tm, s.red);

    desc_out o;
    o.ok = 1;
    u64 kept_q = tot;
    if (kept0 < vocab) { /* mass of the top-k prefix */
        descend<false, true>(l, vocab, temp, zmax, (u64)(kept0 - 1), &s, &o);
        kept_q = o.incl_q;
    }
    if (o.ok && top_p < 1.0f) {
        /* the first token whose running mass reaches top_p of the kept mass:
         * running > ceil(need) - 1 in integers */
        const double need = (double)top_p * (double)kept_q;
        u64 t = 0;
        if (need >= (double)kept_q)
            t = kept_q - 1;
        else if (need > 1.0)
            t = (u64)ceil(need) - 1;
        descend<true, true>(l, vocab, temp, zmax, t, &s, &o);
        kept_q = o.incl_q;
    }
    if (use_min_p) { /* at least the best token (mass 2^40) survives min-p */
        const u64 mq = tm > SAMPLE_MASS_ONE_Q ? tm : SAMPLE_MASS_ONE_Q;
        kept_q = mq < kept_q ? mq : kept_q;
    }
    if (o.ok) { /* the draw */
        const float uu = u[row];
        u64 t = 0;
        if (uu > 0.0f) {
            const double x = floor((double)uu * (double)kept_q);
            t = x >= (double)kept_q ? kept_q - 1 : (u64)x;
        }
        descend<true, true>(l, vocab, temp, zmax, t, &s, &o);
    }
    if (!o.ok) { /* cannot happen: the host reports it */
        if (tid == 0) out[row] = -1;
        return;
    }
    if (tid == 0) s.pick = -1;
    __syncthreads();
    group_counts(l, vocab, temp, o.mask, o.prefix, NULL, 0, &s);
    group_ranked(l, vocab, temp, o.mask, o.prefix, (int)o.rank, (int)o.rank + 1, NULL, &s);
    if (tid == 0) out[row] = s.pick;
}

/* ---- launchers --------------------------------------------------------------- */

extern "C" cp_status cp_sample_topk_cuda(const float *logits, int n, int vocab, float temperature,
                                         int k, float *cand_z, int32_t *cand_id, uint64_t *mass,
                                         cudaStream_t stream) {
    if (n < 0 || vocab <= 0 || k < 1 || k > CP_SAMPLE_CUDA_MAX_K || k > vocab ||
        !(temperature > 0.0f) || vocab > INT32_MAX - SAMPLE_THREADS ||
        (mass && vocab > SAMPLE_MAX_MASS_VOCAB))
        return CP_ERROR(CP_ERR_INVALID_ARG, "sample top-k: bad arguments n=%d vocab=%d k=%d", n,
                        vocab, k);
    if (n == 0) return CP_OK;
    sample_topk_kernel<<<n, SAMPLE_THREADS, 0, stream>>>(
        logits, vocab, temperature, k, mass ? 1 : 0, cand_z, cand_id, (u64 *)mass);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

extern "C" cp_status cp_sample_tail_cuda(const float *logits, int m, const int32_t *rows, int vocab,
                                         const cp_sample_params *sp, const float *u, int32_t *out,
                                         cudaStream_t stream) {
    if (!sp || m < 0 || vocab <= 0 || vocab > SAMPLE_MAX_MASS_VOCAB || !(sp->temperature > 0.0f))
        return CP_ERROR(CP_ERR_INVALID_ARG, "sample tail: bad arguments m=%d vocab=%d", m, vocab);
    if (m == 0) return CP_OK;
    const int kept0 = sp->top_k > 0 && sp->top_k < vocab ? sp->top_k : vocab;
    sample_tail_kernel<<<m, SAMPLE_THREADS, 0, stream>>>(logits, vocab, rows, sp->temperature,
                                                         kept0, sp->top_p, sp->min_p, u, out);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- the host's half of the decision ------------------------------------------ */

extern "C" int32_t cp_sample_decide(const float *z, const int32_t *id, int k, int complete,
                                    double total, const cp_sample_params *sp, float u,
                                    float *prob) {
    /* Each line below repeats cp_sample_ref's arithmetic on its sorted list,
     * of which z/id are the first k entries. */
    if (!(z[0] > -INFINITY) || z[0] == INFINITY) return id[0];
    double sum = 0.0;
    for (int j = 0; j < k; j++) {
        prob[j] = expf(z[j] - z[0]);
        sum += prob[j];
    }
    int kept = k;
    bool known = complete != 0;
    if (sp->top_p < 1.0f) {
        const double all = complete ? sum : total;
        if (!(all >= 0.0)) return -1; /* the kept mass is unknown */
        const double need = (double)sp->top_p * all;
        double cum = 0.0;
        int j = 0;
        while (j < k) {
            cum += prob[j++];
            if (cum >= need) break;
        }
        if (complete || cum >= need) {
            kept = j;
            known = true;
        } else if (!(sp->min_p > 0.0f)) {
            return -1; /* the nucleus is wider than the candidates */
        }
    }
    if (sp->min_p > 0.0f) {
        int j = 1;
        while (j < kept && prob[j] >= sp->min_p * prob[0])
            j++;
        if (!known && j >= kept) return -1; /* every candidate passes min-p */
        kept = j;
        known = true;
    }
    if (!known) return -1; /* the draw needs the mass of the whole row */
    double mass = 0.0;
    for (int j = 0; j < kept; j++)
        mass += prob[j];
    const double target = (double)u * mass;
    double cum = 0.0;
    for (int j = 0; j < kept; j++) {
        cum += prob[j];
        if (cum > target) return id[j];
    }
    return id[kept - 1];
}

/* ---- the sampler --------------------------------------------------------------- */

struct cp_sampler_cuda {
    int cap;        /* rows the buffers hold */
    char *dev;      /* device: see sample_layout */
    char *host;     /* pinned mirror of dev */
    float *row;     /* one row of logits on the host, for the reference */
    size_t row_cap; /* floats */
    float prob[CP_SAMPLE_CUDA_MAX_K];
};

/* Byte offsets in dev/host for cap rows. */
typedef struct sample_layout {
    size_t z, id, mass, u, rows, tok, bytes;
} sample_layout;

static size_t align256(size_t x) {
    return (x + 255) & ~(size_t)255;
}

static sample_layout layout_for(int cap) {
    sample_layout L;
    const size_t c = (size_t)cap, kk = CP_SAMPLE_CUDA_MAX_K;
    L.z = 0;
    L.id = align256(L.z + c * kk * sizeof(float));
    L.mass = align256(L.id + c * kk * sizeof(int32_t));
    L.u = align256(L.mass + c * sizeof(u64));
    L.rows = align256(L.u + c * sizeof(float));
    L.tok = align256(L.rows + c * sizeof(int32_t));
    L.bytes = align256(L.tok + c * sizeof(int32_t));
    return L;
}

extern "C" cp_status cp_sampler_cuda_init(cp_sampler_cuda_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "sampler: NULL out");
    *out = (cp_sampler_cuda_t)calloc(1, sizeof(struct cp_sampler_cuda));
    if (!*out) return CP_ERROR(CP_ERR_OOM, "sampler: out of host memory");
    return CP_OK;
}

extern "C" void cp_sampler_cuda_free(cp_sampler_cuda_t s) {
    if (!s) return;
    cudaFree(s->dev);
    cudaFreeHost(s->host);
    free(s->row);
    free(s);
}

/* Grows the buffers to n rows. Every call of cp_sample_cuda ends
 * synchronised, so no copy or kernel still uses the old ones. */
static cp_status reserve_rows(cp_sampler_cuda_t s, int n) {
    if (n <= s->cap) return CP_OK;
    cudaFree(s->dev);
    cudaFreeHost(s->host);
    s->dev = s->host = NULL;
    s->cap = 0;
    const int cap = n < 8 ? 8 : n;
    const sample_layout L = layout_for(cap);
    if (cudaMalloc((void **)&s->dev, L.bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        s->dev = NULL;
        return CP_ERROR(CP_ERR_OOM, "sampler: cannot allocate %zu bytes on the device", L.bytes);
    }
    if (cudaMallocHost((void **)&s->host, L.bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        s->host = NULL;
        return CP_ERROR(CP_ERR_OOM, "sampler: cannot allocate %zu bytes of pinned memory", L.bytes);
    }
    s->cap = cap;
    return CP_OK;
}

/* Row i by the reference on the host: the whole row is copied. */
static cp_status sample_row_host(cp_sampler_cuda_t s, const float *logits, int i, int vocab,
                                 const cp_sample_params *sp, const float *u, int32_t *out,
                                 cudaStream_t stream) {
    if ((size_t)vocab > s->row_cap) {
        float *r = (float *)realloc(s->row, (size_t)vocab * sizeof(float));
        if (!r) return CP_ERROR(CP_ERR_OOM, "sample: out of host memory for %d logits", vocab);
        s->row = r;
        s->row_cap = (size_t)vocab;
    }
    CP_CUDA_CHECK(cudaMemcpyAsync(s->row, logits + (size_t)i * (size_t)vocab,
                                  (size_t)vocab * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CP_CUDA_CHECK(cudaStreamSynchronize(stream));
    return cp_sample_ref(s->row, 1, vocab, sp, u + i, out + i);
}

/* Copies u to the device and draws rows[0..m) (NULL: rows 0..m-1) with the
 * whole-row kernel; tokens land in host tok (pinned) at their row. */
static cp_status run_tail(cp_sampler_cuda_t s, const sample_layout *L, const float *logits, int n,
                          const int32_t *rows, int m, int vocab, const cp_sample_params *sp,
                          const float *u, cudaStream_t stream) {
    float *hu = (float *)(s->host + L->u);
    memcpy(hu, u, (size_t)n * sizeof(float));
    CP_CUDA_CHECK(cudaMemcpyAsync(s->dev + L->u, hu, (size_t)n * sizeof(float),
                                  cudaMemcpyHostToDevice, stream));
    const int32_t *drows = NULL;
    if (rows) {
        int32_t *hr = (int32_t *)(s->host + L->rows);
        if (hr != rows) memcpy(hr, rows, (size_t)m * sizeof(int32_t));
        CP_CUDA_CHECK(cudaMemcpyAsync(s->dev + L->rows, hr, (size_t)m * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream));
        drows = (const int32_t *)(s->dev + L->rows);
    }
    CP_CHECK(cp_sample_tail_cuda(logits, m, drows, vocab, sp, (const float *)(s->dev + L->u),
                                 (int32_t *)(s->dev + L->tok), stream));
    CP_CUDA_CHECK(cudaMemcpyAsync(s->host + L->tok, s->dev + L->tok, (size_t)n * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream));
    CP_CUDA_CHECK(cudaStreamSynchronize(stream));
    return CP_OK;
}

extern "C" cp_status cp_sample_cuda(cp_sampler_cuda_t s, const float *logits, int n, int vocab,
                                    const cp_sample_params *sp, const float *u, int32_t *out,
                                    cudaStream_t stream) {
    if (!s || !sp || n < 0 || vocab <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "sample: bad arguments n=%d vocab=%d", n, vocab);
    if (n == 0) return CP_OK;
    if (!logits || !u || !out) return CP_ERROR(CP_ERR_INVALID_ARG, "sample: NULL pointer");
    CP_CHECK(reserve_rows(s, n));
    const sample_layout L = layout_for(s->cap);
    int32_t *tok = (int32_t *)(s->host + L.tok);

    if (!(sp->temperature > 0.0f)) { /* greedy, NaN included, as the reference */
        CP_CHECK(cp_argmax_cuda(logits, n, vocab, (int32_t *)(s->dev + L.tok), stream));
        CP_CUDA_CHECK(cudaMemcpyAsync(tok, s->dev + L.tok, (size_t)n * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, stream));
        CP_CUDA_CHECK(cudaStreamSynchronize(stream));
        memcpy(out, tok, (size_t)n * sizeof(int32_t));
        return CP_OK;
    }
    const bool top_k_on = sp->top_k > 0 && sp->top_k < vocab;
    const bool top_p_on = sp->top_p<1.0f, min_p_on = sp->min_p> 0.0f;
    const int kept0 = top_k_on ? sp->top_k : vocab;
    const bool device_ok = vocab <= SAMPLE_MAX_MASS_VOCAB; /* fixed-point masses fit */

    if (kept0 > CP_SAMPLE_CUDA_MAX_K && !top_k_on && !top_p_on && !min_p_on) {
        /* pure temperature: a draw over the whole row, on the device */
        if (device_ok) {
            CP_CHECK(run_tail(s, &L, logits, n, NULL, n, vocab, sp, u, stream));
            for (int i = 0; i < n; i++) {
                if (!(u[i] < 1.0f)) { /* outside [0, 1): the reference's last-token rule */
                    CP_CHECK(sample_row_host(s, logits, i, vocab, sp, u, out, stream));
                    continue;
                }
                if (tok[i] < 0 || tok[i] >= vocab)
                    return CP_ERROR(CP_ERR_INTERNAL, "sample: device draw failed on row %d", i);
                out[i] = tok[i];
            }
            return CP_OK;
        }
        for (int i = 0; i < n; i++)
            CP_CHECK(sample_row_host(s, logits, i, vocab, sp, u, out, stream));
        return CP_OK;
    }

    /* The K best of every row; top-k up to K is decided by them alone. */
    const int k = kept0 < CP_SAMPLE_CUDA_MAX_K ? kept0 : CP_SAMPLE_CUDA_MAX_K;
    const bool complete = k == kept0;
    const bool with_mass = !complete && top_p_on && !top_k_on && device_ok;
    float *dz = (float *)(s->dev + L.z);
    int32_t *did = (int32_t *)(s->dev + L.id);
    u64 *dmass = (u64 *)(s->dev + L.mass);
    CP_CHECK(cp_sample_topk_cuda(logits, n, vocab, sp->temperature, k, dz, did,
                                 with_mass ? (uint64_t *)dmass : NULL, stream));
    const size_t nk = (size_t)n * (size_t)k;
    CP_CUDA_CHECK(
        cudaMemcpyAsync(s->host + L.z, dz, nk * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CP_CUDA_CHECK(
        cudaMemcpyAsync(s->host + L.id, did, nk * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    if (with_mass)
        CP_CUDA_CHECK(cudaMemcpyAsync(s->host + L.mass, dmass, (size_t)n * sizeof(u64),
                                      cudaMemcpyDeviceToHost, stream));
    CP_CUDA_CHECK(cudaStreamSynchronize(stream));

    const float *hz = (const float *)(s->host + L.z);
    const int32_t *hid = (const int32_t *)(s->host + L.id);
    const u64 *hmass = (const u64 *)(s->host + L.mass);
    int32_t *rows = (int32_t *)(s->host + L.rows); /* rows left to the whole-row draw */
    int m = 0;
    for (int i = 0; i < n; i++) {
        const float *z = hz + (size_t)i * (size_t)k;
        const int32_t *id = hid + (size_t)i * (size_t)k;
        for (int j = 0; j < k; j++) {
            /* the selection's own contract: valid ids in the reference's order */
            const bool bad_id = id[j] < 0 || id[j] >= vocab;
            const bool bad_order =
                j > 0 && (z[j] > z[j - 1] || (z[j] == z[j - 1] && id[j] <= id[j - 1]));
            if (bad_id || bad_order)
                return CP_ERROR(CP_ERR_INTERNAL, "sample: device top-%d selection failed on row %d",
                                k, i);
        }
        const double total = with_mass ? (double)hmass[i] / (double)SAMPLE_MASS_ONE_Q : -1.0;
        const int32_t pick = cp_sample_decide(z, id, k, complete, total, sp, u[i], s->prob);
        if (pick >= 0)
            out[i] = pick;
        else if (device_ok && u[i] < 1.0f)
            rows[m++] = i;
        else
            CP_CHECK(sample_row_host(s, logits, i, vocab, sp, u, out, stream));
    }
    if (m == 0) return CP_OK;
    CP_CHECK(run_tail(s, &L, logits, n, rows, m, vocab, sp, u, stream));
    for (int j = 0; j < m; j++) {
        const int i = rows[j];
        if (tok[i] < 0 || tok[i] >= vocab)
            return CP_ERROR(CP_ERR_INTERNAL, "sample: device draw failed on row %d", i);
        out[i] = tok[i];
    }
    return CP_OK;
}
