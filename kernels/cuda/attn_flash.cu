/* attn_flash.cu - fused causal attention over the paged fp16 KV cache
 * (FlashAttention-2 style): one thread block per (tile of batch rows, query
 * head), K/V tiles streamed through double-buffered shared memory with
 * cp.async, mma.sync m16n8k16 tensor-core products and an online softmax;
 * scores never reach device memory. sm_80 and newer. */
#include "attn_flash.h"

#include <climits>
#include <cuda_fp16.h>
#include <stdint.h>

/* Compile-time shape of one kernel instance: head dim HD, NW warps of MT
 * m-tiles (16 query rows each). With MT == 1 the Q fragments live in
 * registers for the whole block; with MT == 2 the registers go to the
 * second m-tile's accumulators and Q is re-read from shared memory, which
 * halves the shared-memory reads of K and V per query row. BN keys per K/V
 * tile. Shared rows are padded by 16 bytes so that the 8 row addresses of an
 * ldmatrix (and the 16-byte cp.async stores) fall in 8 distinct 4-bank
 * groups. */
template <int HD, int NW, int MT, int BN> struct fa_cfg {
    static constexpr bool QREG = MT == 1;
    static constexpr int BM = NW * 16 * MT; /* batch rows per block */
    static constexpr int NT = NW * 32;      /* threads per block */
    static constexpr int LD = HD + 8;       /* halves per shared row */
    static constexpr int CPR = HD / 8;      /* 16-byte chunks per row */
    static constexpr int RSTEP = NT / CPR;  /* rows one sweep of the block loads */
    static constexpr int RPT = BN / RSTEP;  /* K (and V) rows per thread per tile */
    static constexpr int TILE = BN * LD;    /* halves of one K or V tile */
    static constexpr int SMEM = (4 * TILE + (QREG ? 0 : BM * LD)) * 2; /* bytes */
    static_assert(NT % CPR == 0 && BN % RSTEP == 0, "tile loader shape");
    static_assert(!QREG || BM * LD <= 2 * TILE, "a register-resident Q tile is staged in stage 1");
    static_assert((BM * HD / 4) % NT == 0, "Q loader shape");
};

/* Unsigned division by a run-time constant d >= 1 for n < 2^31:
 * n / d = (umulhi(n, mul) + n) >> shift. */
struct fa_divider {
    uint32_t mul, shift, d;
};

static __device__ __forceinline__ uint32_t fa_div(uint32_t n, fa_divider v) {
    return (__umulhi(n, v.mul) + n) >> v.shift;
}

static __device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16-byte async copy global -> shared; src_bytes 0 writes zeros and reads
 * nothing (src must still be a valid address). Cached in L2 only: K/V tiles
 * are shared across blocks through L2, not L1. */
static __device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

static __device__ __forceinline__ void cp_async_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

static __device__ __forceinline__ void cp_async_wait_all(void) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* c[16x8] += a[16x16] . b[16x8], fp16 in, fp32 accumulate. */
static __device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 2^x on the special-function unit; 2^-inf = 0. */
static __device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

static __device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* Thread layout of the mma fragments (lane l, g = l >> 2, t = l & 3): warp
 * w owns block rows MT*16*w .. +MT*16-1; accumulators of m-tile m hold rows
 * MT*16*w + 16*m + g and that + 8, columns 2t and 2t+1 of every 8-wide
 * n-tile. Row statistics (max, sum) are reduced over the 4 lanes of a group
 * with xor-shuffles 1 and 2. */
template <int HD, int NW, int MT, int BN>
static __global__ void __launch_bounds__(NW * 32, (NW == 4) ? 2 : 1)
    attn_flash_f16_kernel(const float *__restrict__ q, const __half *__restrict__ k_cache,
                          const __half *__restrict__ v_cache, float *__restrict__ out,
                          const int32_t *__restrict__ seq_of_tok,
                          const int32_t *__restrict__ pos_of_tok,
                          const int32_t *__restrict__ block_tables, int n_tok, int n_head,
                          int n_rep, int kv_row, fa_divider bdiv, int max_blocks, int n_tiles,
                          float qscale) {
    using C = fa_cfg<HD, NW, MT, BN>;
    constexpr int BM = C::BM, NT = C::NT, LD = C::LD, TILE = C::TILE;
    constexpr bool QREG = C::QREG;
    constexpr int KC = HD / 16; /* k-steps of Q.K^T, also d-tile pairs of P.V */
    constexpr int NB = BN / 8;  /* 8-key n-tiles per K tile */

    extern __shared__ __align__(16) unsigned char fa_smem[];
    __half *const sbase = reinterpret_cast<__half *>(fa_smem); /* [stage][K|V][BN][LD], Q */
    __shared__ int s_seq[BM], s_pos[BM];
    /* Physical cache rows of the keys this thread copies next (private to
     * the thread; kept here rather than in registers, which the
     * accumulators need). */
    __shared__ uint32_t s_phys[C::RPT][NT];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    /* Tile-major launch order, longest rows first: the tiles at the end of
     * the batch (the longest rows of a prefill) start first, which balances
     * the causal triangle across the chip (longest-first scheduling); the
     * query heads of one tile are adjacent, so heads sharing a KV head read
     * the same K/V from L2 at about the same time. (Head-major order, which
     * keeps fewer KV heads in flight, measured 10-30% slower: it loses the
     * longest-first balance.) */
    const int head = (int)(blockIdx.x % (unsigned)n_head);
    const int tile = n_tiles - 1 - (int)(blockIdx.x / (unsigned)n_head);
    const int r0 = tile * BM;
    const int nvalid = min(BM, n_tok - r0);
    const int kvh = head / n_rep;
    const size_t q_row = (size_t)n_head * HD;

    for (int i = tid; i < BM; i += NT) {
        s_seq[i] = i < nvalid ? seq_of_tok[r0 + i] : -1;
        s_pos[i] = i < nvalid ? pos_of_tok[r0 + i] : -1;
    }

    /* Q tile: fp32 -> fp16 with scale * log2(e) folded in. A register
     * resident Q is staged through stage 1 of the K/V buffers (free until
     * the first prefetch into it). */
    __half *const s_q = sbase + (QREG ? 2 * TILE : 4 * TILE);
#pragma unroll
    for (int i = 0; i < BM * HD / 4 / NT; i++) {
        const int c = tid + i * NT, row = c / (HD / 4), c4 = c % (HD / 4);
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < nvalid)
            v = __ldg(reinterpret_cast<const float4 *>(q + (size_t)(r0 + row) * q_row +
                                                       (size_t)head * HD) +
                      c4);
        uint2 h;
        h.x = pack_half2(v.x * qscale, v.y * qscale);
        h.y = pack_half2(v.z * qscale, v.w * qscale);
        *reinterpret_cast<uint2 *>(s_q + row * LD + c4 * 4) = h;
    }
    __syncthreads();

    const uint32_t q_frag_addr =
        smem_addr(s_q + (warp * 16 * MT + (lane & 15)) * LD + (lane >> 4) * 8);
    uint32_t qf[QREG ? KC : 1][4];
    if (QREG) {
#pragma unroll
        for (int kc = 0; kc < (QREG ? KC : 1); kc++)
            ldsm_x4(qf[kc], q_frag_addr + kc * 32);
    }

    /* This lane's rows: [m][0] = row g of m-tile m, [m][1] = row g + 8. */
    const int lrow0 = warp * 16 * MT + (lane >> 2);
    if (QREG) __syncthreads(); /* every warp holds its Q fragments: stage 1 is free */

    float o[MT][HD / 8][4];
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int d = 0; d < HD / 8; d++)
            o[m][d][0] = o[m][d][1] = o[m][d][2] = o[m][d][3] = 0.f;
        mrow[m][0] = mrow[m][1] = -INFINITY;
        lrow[m][0] = lrow[m][1] = 0.f;
    }

    /* K/V loader: thread tid copies chunk tid % CPR of rows tid / CPR + i * RSTEP. */
    const int ld_row = tid / C::CPR;
    const size_t ld_col = (size_t)kvh * HD + (size_t)(tid % C::CPR) * 8;
    const uint32_t ld_dst = smem_addr(sbase + ld_row * LD + (tid % C::CPR) * 8);

    /* One pass per distinct sequence of the tile, in increasing id order.
     * The softmax state of rows of other sequences is untouched by a pass
     * (their scores are all masked, so the rescale factor is 1). */
    int prev = INT_MIN;
    for (;;) {
        int cand = INT_MAX;
        for (int i = lane; i < nvalid; i += 32) {
            const int sq = s_seq[i];
            if (sq > prev && sq < cand) cand = sq;
        }
        const int s = __reduce_min_sync(0xffffffffu, cand);
        if (s == INT_MAX) break;
        prev = s;
        int mp = -1;
        for (int i = lane; i < nvalid; i += 32)
            if (s_seq[i] == s) mp = max(mp, s_pos[i]);
        const int maxpos = __reduce_max_sync(0xffffffffu, mp);
        if (maxpos < 0) continue;

        /* Last visible key of each of this lane's rows in this pass (-1: none). */
        int pe[MT][2];
        int lmax = -1, lmin = INT_MAX;
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = lrow0 + m * 16 + h * 8;
                pe[m][h] = (r < nvalid && s_seq[r] == s) ? s_pos[r] : -1;
                lmax = max(lmax, pe[m][h]);
                lmin = min(lmin, pe[m][h]);
            }
        const int w_max = __reduce_max_sync(0xffffffffu, lmax);
        const int w_min = __reduce_min_sync(0xffffffffu, lmin);

        const int n_kt = maxpos / BN + 1;
        const int32_t *const bt = block_tables + (size_t)s * (size_t)max_blocks;

        /* Physical cache row (block * block_size + slot) of each key this
         * thread copies in tile kt; keys past maxpos are marked all-ones:
         * neither their table entries (possibly junk) nor their slots are
         * read, and they land as zeros. */
        auto fetch_ids = [&](int kt) {
#pragma unroll
            for (int i = 0; i < C::RPT; i++) {
                const int j = kt * BN + ld_row + i * C::RSTEP;
                uint32_t ph = 0xffffffffu;
                if (j <= maxpos) {
                    const uint32_t b = fa_div((uint32_t)j, bdiv);
                    ph = (uint32_t)__ldg(bt + b) * bdiv.d + ((uint32_t)j - b * bdiv.d);
                }
                s_phys[i][tid] = ph;
            }
        };
        auto issue = [&](int st) {
#pragma unroll
            for (int i = 0; i < C::RPT; i++) {
                const uint32_t dst = ld_dst + (uint32_t)((st * 2 * TILE + i * C::RSTEP * LD) * 2);
                const __half *ks = k_cache, *vs = v_cache;
                int nbytes = 0;
                const uint32_t ph = s_phys[i][tid];
                if (ph != 0xffffffffu) {
                    const size_t off = (size_t)ph * (size_t)kv_row + ld_col;
                    ks += off;
                    vs += off;
                    nbytes = 16;
                }
                cp_async16(dst, ks, nbytes);
                cp_async16(dst + TILE * 2, vs, nbytes);
            }
            cp_async_commit();
        };

        fetch_ids(0);
        issue(0);
        if (n_kt > 1) fetch_ids(1);

        for (int kt = 0; kt < n_kt; kt++) {
            const int st = kt & 1;
            cp_async_wait_all();
            /* Tile kt is visible to all, and every warp is done with tile
             * kt - 1, whose stage the prefetch below refills. */
            __syncthreads();
            if (kt + 1 < n_kt) {
                issue(st ^ 1);
                if (kt + 2 < n_kt) fetch_ids(kt + 2);
            }

            const int k0 = kt * BN;
            if (k0 > w_max) continue;
            const __half *const s_k = sbase + st * 2 * TILE;
            const __half *const s_v = s_k + TILE;

            /* S = Q K^T for BN keys: NB n-tiles of 8 keys per m-tile. */
            float sc[MT][NB][4];
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int n = 0; n < NB; n++)
                    sc[m][n][0] = sc[m][n][1] = sc[m][n][2] = sc[m][n][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KC; kc++) {
                uint32_t qa[MT][4];
                if (!QREG) {
#pragma unroll
                    for (int m = 0; m < MT; m++)
                        ldsm_x4(qa[m], q_frag_addr + (uint32_t)((m * 16 * LD + kc * 16) * 2));
                }
#pragma unroll
                for (int np = 0; np < NB / 2; np++) {
                    uint32_t b[4];
                    ldsm_x4(b, smem_addr(s_k + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD +
                                         kc * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        const uint32_t *a = QREG ? qf[QREG ? kc : 0] : qa[m];
                        mma_16816(sc[m][2 * np], a, b[0], b[1]);
                        mma_16816(sc[m][2 * np + 1], a, b[2], b[3]);
                    }
                }
            }

            /* Mask keys past each row's position (and rows of other
             * sequences) only where some row of the warp needs it. */
            if (k0 + BN - 1 > w_min) {
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int n = 0; n < NB; n++) {
                        const int j = k0 + n * 8 + 2 * (lane & 3);
                        if (j > pe[m][0]) sc[m][n][0] = -INFINITY;
                        if (j + 1 > pe[m][0]) sc[m][n][1] = -INFINITY;
                        if (j > pe[m][1]) sc[m][n][2] = -INFINITY;
                        if (j + 1 > pe[m][1]) sc[m][n][3] = -INFINITY;
                    }
            }

            uint32_t pf[MT][NB / 2][4]; /* P as A fragments of P.V */
#pragma unroll
            for (int m = 0; m < MT; m++) {
                float mx0 = mrow[m][0], mx1 = mrow[m][1];
#pragma unroll
                for (int n = 0; n < NB; n++) {
                    mx0 = fmaxf(mx0, fmaxf(sc[m][n][0], sc[m][n][1]));
                    mx1 = fmaxf(mx1, fmaxf(sc[m][n][2], sc[m][n][3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                /* A row with nothing visible yet keeps max -inf; subtract 0
                 * then so that exp2(-inf - -inf) never makes a NaN. */
                const float u0 = mx0 == -INFINITY ? 0.f : mx0;
                const float u1 = mx1 == -INFINITY ? 0.f : mx1;
                const float al0 = fast_exp2(mrow[m][0] - u0), al1 = fast_exp2(mrow[m][1] - u1);
                mrow[m][0] = mx0;
                mrow[m][1] = mx1;
                float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
                for (int n = 0; n < NB; n++) {
                    const float p0 = fast_exp2(sc[m][n][0] - u0), p1 = fast_exp2(sc[m][n][1] - u0);
                    const float p2 = fast_exp2(sc[m][n][2] - u1), p3 = fast_exp2(sc[m][n][3] - u1);
                    sum0 += p0 + p1;
                    sum1 += p2 + p3;
                    pf[m][n >> 1][(n & 1) * 2 + 0] = pack_half2(p0, p1);
                    pf[m][n >> 1][(n & 1) * 2 + 1] = pack_half2(p2, p3);
                }
                /* Per-lane partial sums: the 4 lanes of a row share its
                 * rescale factors, so they are added up only at the end. */
                lrow[m][0] = lrow[m][0] * al0 + sum0;
                lrow[m][1] = lrow[m][1] * al1 + sum1;
#pragma unroll
                for (int d = 0; d < HD / 8; d++) {
                    o[m][d][0] *= al0;
                    o[m][d][1] *= al0;
                    o[m][d][2] *= al1;
                    o[m][d][3] *= al1;
                }
            }

            /* O += P V: V tile rows are keys, ldmatrix.trans gives the
             * k-major B fragments. */
#pragma unroll
            for (int kk = 0; kk < NB / 2; kk++) {
#pragma unroll
                for (int dp = 0; dp < KC; dp++) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, smem_addr(s_v +
                                               (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                               dp * 16 + (lane >> 4) * 8));
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        mma_16816(o[m][2 * dp], pf[m][kk], b[0], b[1]);
                        mma_16816(o[m][2 * dp + 1], pf[m][kk], b[2], b[3]);
                    }
                }
            }
        }
        /* Stage reuse across passes: the next pass's first copy targets
         * stage 0, which the last tile of this pass may have used. */
        __syncthreads();
    }

    const int col = 2 * (lane & 3);
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float l = lrow[m][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int r = lrow0 + m * 16 + h * 8;
            if (r >= nvalid) continue;
            float *dst = out + (size_t)(r0 + r) * q_row + (size_t)head * HD + col;
#pragma unroll
            for (int d = 0; d < HD / 8; d++)
                *reinterpret_cast<float2 *>(dst + d * 8) =
                    make_float2(o[m][d][2 * h] * inv, o[m][d][2 * h + 1] * inv);
        }
}

static fa_divider make_divider(uint32_t d) {
    fa_divider v;
    uint32_t shift = 0;
    while (shift < 32 && (1ull << shift) < d)
        shift++;
    v.d = d;
    v.shift = shift;
    v.mul = (uint32_t)(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
    return v;
}

template <int HD, int NW, int MT, int BN>
static cp_status launch(const cp_attn_params *p, const float *q, const void *k_cache,
                        const void *v_cache, float *out, cudaStream_t stream) {
    using C = fa_cfg<HD, NW, MT, BN>;
    const long long n_tiles = ((long long)p->n_tok + C::BM - 1) / C::BM;
    const long long n_blocks = n_tiles * p->n_head;
    if (n_blocks > INT_MAX)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "flash attention: %d tokens x %d heads is too many",
                        p->n_tok, p->n_head);
    cudaError_t e = cudaSuccess;
    if (C::SMEM > 48 * 1024) {
        /* Raising the dynamic shared-memory limit is a host-side attribute
         * write: no allocation, no synchronisation. */
        e = cudaFuncSetAttribute(attn_flash_f16_kernel<HD, NW, MT, BN>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
        if (e != cudaSuccess)
            return CP_ERROR(CP_ERR_CUDA,
                            "flash attention: cannot set %d bytes of shared memory: %s", C::SMEM,
                            cudaGetErrorString(e));
    }
    const float log2e = 1.4426950408889634f;
    attn_flash_f16_kernel<HD, NW, MT, BN><<<(unsigned)n_blocks, C::NT, C::SMEM, stream>>>(
        q, (const __half *)k_cache, (const __half *)v_cache, out, p->seq_of_tok, p->pos_of_tok,
        p->block_tables, p->n_tok, p->n_head, p->n_head / p->n_head_kv, p->n_head_kv * HD,
        make_divider((uint32_t)p->block_size), p->max_blocks, (int)n_tiles, p->scale * log2e);
    e = cudaGetLastError();
    if (e != cudaSuccess)
        return CP_ERROR(CP_ERR_CUDA, "flash attention launch (head_dim %d, %d rows x %d warps): %s",
                        HD, C::BM, NW, cudaGetErrorString(e));
    return CP_OK;
}

template <int HD>
static cp_status launch_hd(const cp_attn_params *p, const float *q, const void *k_cache,
                           const void *v_cache, float *out, int tile_rows, int n_warps,
                           cudaStream_t stream) {
    if (tile_rows == 64) return launch<HD, 4, 1, 64>(p, q, k_cache, v_cache, out, stream);
    if (n_warps == 8) return launch<HD, 8, 1, 64>(p, q, k_cache, v_cache, out, stream);
    /* 32 rows a warp: head_dim 64 leaves the registers for 128-key tiles
     * (fewer iterations, barriers and rescales per key); 128 does not. */
    return launch < HD, 4, 2, HD == 64 ? 128 : 64 > (p, q, k_cache, v_cache, out, stream);
}

extern "C" cp_status cp_attention_flash_config_cuda(const cp_attn_params *p, const float *q,
                                                    const void *k_cache, const void *v_cache,
                                                    float *out, int tile_rows, int n_warps,
                                                    cudaStream_t stream) {
    if (!p) return CP_ERROR(CP_ERR_INVALID_ARG, "flash attention: NULL params");
    if (p->kv_dtype != CP_DTYPE_F16)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "flash attention: KV cache dtype %d is not F16",
                        (int)p->kv_dtype);
    if (p->head_dim != 64 && p->head_dim != 128)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "flash attention: head_dim %d (64 or 128 only)",
                        p->head_dim);
    if (tile_rows == 0 && n_warps == 0) {
        /* Shape by how many blocks of 128 rows there are per multiprocessor
         * (measured on an H100, benchmarks/gpu/NOTES_attention.md): 32 rows
         * a warp once the grid fills the chip three times over, 16 rows a
         * warp below, 64-row tiles for batches too small to fill it. */
        int dev = 0, n_sm = 132;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            (void)cudaGetLastError();
            n_sm = 132;
        }
        const long long blocks128 = ((long long)p->n_tok + 127) / 128 * p->n_head;
        tile_rows = blocks128 >= n_sm ? 128 : 64;
        n_warps = blocks128 >= 3LL * n_sm ? 4 : blocks128 >= n_sm ? 8 : 4;
    }
    if (!((tile_rows == 64 && n_warps == 4) ||
          (tile_rows == 128 && (n_warps == 4 || n_warps == 8))))
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "flash attention: tile of %d rows on %d warps (64/4, 128/4 or 128/8)",
                        tile_rows, n_warps);
    if (p->n_tok < 0 || p->n_head < 1 || p->n_head_kv < 1 || p->n_head % p->n_head_kv != 0 ||
        p->block_size < 1 || p->max_blocks < 1)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "flash attention: bad shape (n_tok %d, n_head %d, n_head_kv %d, "
                        "block_size %d, max_blocks %d)",
                        p->n_tok, p->n_head, p->n_head_kv, p->block_size, p->max_blocks);
    if (p->n_tok == 0) return CP_OK;
    if (!q || !k_cache || !v_cache || !out || !p->seq_of_tok || !p->pos_of_tok || !p->block_tables)
        return CP_ERROR(CP_ERR_INVALID_ARG, "flash attention: NULL pointer");
    if (((uintptr_t)q | (uintptr_t)k_cache | (uintptr_t)v_cache) % 16 != 0 ||
        (uintptr_t)out % 8 != 0)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "flash attention: misaligned q, cache or out");
    if ((long long)p->n_head_kv * p->head_dim > INT_MAX / 2)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "flash attention: %d KV heads is too many",
                        p->n_head_kv);

    if (p->head_dim == 128)
        return launch_hd<128>(p, q, k_cache, v_cache, out, tile_rows, n_warps, stream);
    return launch_hd<64>(p, q, k_cache, v_cache, out, tile_rows, n_warps, stream);
}

extern "C" cp_status cp_attention_flash_cuda(const cp_attn_params *p, const float *q,
                                             const void *k_cache, const void *v_cache, float *out,
                                             cudaStream_t stream) {
    return cp_attention_flash_config_cuda(p, q, k_cache, v_cache, out, 0, 0, stream);
}
