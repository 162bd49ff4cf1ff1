/* ops.cu - the CUDA backend's element-wise and row-wise kernels: RMSNorm,
 * RoPE, add, SwiGLU, softmax, embedding lookup, dequantization, fp32 ->
 * fp16/bf16 conversion and argmax. Each has its CPU twin in
 * kernels/cpu/ops_ref.c. */
#include "cp_cuda_ops.h"
#include "cuda_common.cuh"

#include <math.h>

/* ---- RMSNorm: one block per row ---- */

static __global__ void rmsnorm_f32_kernel(float *out, const float *x, const float *w, int dim,
                                          float eps) {
    __shared__ float red[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *orow = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float s = rsqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = xr[i] * s * w[i];
}

extern "C" cp_status cp_rmsnorm_cuda(float *out, const float *x, const float *w, int n, int dim,
                                     float eps, cudaStream_t stream) {
    int threads = dim >= 1024 ? 1024 : ((dim + 31) / 32) * 32;
    rmsnorm_f32_kernel<<<n, threads, 0, stream>>>(out, x, w, dim, eps);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- RoPE: one thread per rotated pair; angles in double as the
 * reference computes them (positions reach 1e5 and more) ---- */

static __global__ void rope_f32_kernel(float *x, const int32_t *pos, int n_tok, int n_head,
                                       int head_dim, int rot_dim, int interleaved, double log_theta,
                                       float freq_scale, const float *freq_factors) {
    const int half = rot_dim / 2;
    const int64_t total = (int64_t)n_tok * n_head * half;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const int64_t th = idx / half; /* token * n_head + head */
        const int t = (int)(th / n_head);
        float *xh = x + th * head_dim;
        const double inv_freq = exp(-2.0 * i / rot_dim * log_theta);
        double angle = (double)pos[t] * (double)freq_scale * inv_freq;
        if (freq_factors) angle /= (double)freq_factors[i];
        double s, c;
        sincos(angle, &s, &c);
        const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        const double a = xh[ia], b = xh[ib];
        xh[ia] = (float)(a * c - b * s);
        xh[ib] = (float)(a * s + b * c);
    }
}

extern "C" cp_status cp_rope_cuda(float *x, const int32_t *pos, int n_tok, int n_head,
                                  const cp_rope_params *rp, cudaStream_t stream) {
    const int64_t total = (int64_t)n_tok * n_head * (rp->rot_dim / 2);
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65535) blocks = 65535;
    rope_f32_kernel<<<(unsigned)blocks, threads, 0, stream>>>(
        x, pos, n_tok, n_head, rp->head_dim, rp->rot_dim, rp->mode == CP_ROPE_INTERLEAVED,
        log((double)rp->theta), rp->freq_scale, rp->freq_factors);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- element-wise ---- */

static __global__ void add_f32_kernel(float *y, const float *a, const float *b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

static __global__ void swiglu_f32_kernel(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static unsigned grid_for(size_t n, int threads) {
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    return (unsigned)(b > 8192 ? 8192 : (b ? b : 1));
}

extern "C" cp_status cp_add_cuda(float *y, const float *a, const float *b, size_t n,
                                 cudaStream_t stream) {
    add_f32_kernel<<<grid_for(n, 256), 256, 0, stream>>>(y, a, b, n);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

extern "C" cp_status cp_swiglu_cuda(float *out, const float *gate, const float *up, size_t n,
                                    cudaStream_t stream) {
    swiglu_f32_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, gate, up, n);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- softmax: one block per row ---- */

static __global__ void softmax_f32_kernel(float *x, int dim) {
    __shared__ float red[32];
    float *r = x + (size_t)blockIdx.x * dim;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) mx = fmaxf(mx, r[i]);
    mx = block_max(mx, red);
    if (mx == -INFINITY) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) r[i] = 1.0f / (float)dim;
        return;
    }
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float e = expf(r[i] - mx);
        r[i] = e;
        sum += e;
    }
    sum = block_sum(sum, red);
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) r[i] *= inv;
}

extern "C" cp_status cp_softmax_cuda(float *x, int n, int dim, cudaStream_t stream) {
    int threads = dim >= 1024 ? 1024 : ((dim + 31) / 32) * 32;
    softmax_f32_kernel<<<n, threads, 0, stream>>>(x, dim);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- rows of a weight as fp32 / fp16: float types element by element,
 * block types 32 values per thread ---- */

template <typename O> static __device__ __forceinline__ O to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

static __device__ __forceinline__ float float_elem(int t, const uint8_t *row, int64_t j) {
    if (t == CP_DTYPE_F32) return ((const float *)row)[j];
    if (t == CP_DTYPE_F16) return __half2float(((const __half *)row)[j]);
    return __bfloat162float(((const __nv_bfloat16 *)row)[j]);
}

/* rows[r] = source row rowid(r); rowid from ids (embedding) or row0 + r. */
template <typename O>
static __global__ void rows_float_kernel(int t, const uint8_t *data, size_t row_bytes, int64_t cols,
                                         const int32_t *ids, int64_t row0, int64_t nrows,
                                         int64_t n_src_rows, O *out, int *bad) {
    const int64_t r = blockIdx.y;
    int64_t src = row0 + r;
    if (ids) {
        src = ids[r];
        if (src < 0 || src >= n_src_rows) {
            if (threadIdx.x == 0 && blockIdx.x == 0) atomicCAS(bad, 0, (int)r + 1);
            return;
        }
    }
    const uint8_t *row = data + (size_t)src * row_bytes;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * blockDim.x)
        out[r * cols + j] = to_out<O>(float_elem(t, row, j));
    (void)nrows;
}

template <int T, typename O>
static __global__ void rows_block_kernel(const uint8_t *data, size_t row_bytes, int64_t cols,
                                         const int32_t *ids, int64_t row0, int64_t n_src_rows,
                                         O *out, int *bad) {
    const int64_t r = blockIdx.y;
    int64_t src = row0 + r;
    if (ids) {
        src = ids[r];
        if (src < 0 || src >= n_src_rows) {
            if (threadIdx.x == 0 && blockIdx.x == 0) atomicCAS(bad, 0, (int)r + 1);
            return;
        }
    }
    const uint8_t *row = data + (size_t)src * row_bytes;
    const int64_t chunks = cols / 32;
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < chunks;
         c += (int64_t)gridDim.x * blockDim.x) {
        float v[32];
        dq32_row<T>(row, cols, c, v);
        O *o = out + r * cols + c * 32;
#pragma unroll
        for (int i = 0; i < 32; i++) o[i] = to_out<O>(v[i]);
    }
}

template <typename O>
static cp_status rows_cuda(const cp_tensor *w, const int32_t *ids, int64_t row0, int64_t nrows,
                           O *out, int *bad, cudaStream_t stream) {
    const cp_dtype t = w->dtype;
    const int64_t cols = w->ne[0];
    const uint8_t *data = (const uint8_t *)w->data;
    const size_t rb = w->nb[1];
    if (nrows > 65535) {
        /* grid.y limit: in slices */
        for (int64_t r = 0; r < nrows; r += 65535) {
            int64_t k = nrows - r < 65535 ? nrows - r : 65535;
            CP_CHECK(rows_cuda<O>(w, ids ? ids + r : NULL, ids ? 0 : row0 + r, k,
                                  out + r * cols, bad, stream));
        }
        return CP_OK;
    }
    if (t == CP_DTYPE_F32 || t == CP_DTYPE_F16 || t == CP_DTYPE_BF16) {
        dim3 grid((unsigned)((cols + 255) / 256 > 64 ? 64 : (cols + 255) / 256), (unsigned)nrows);
        rows_float_kernel<O><<<grid, 256, 0, stream>>>((int)t, data, rb, cols, ids, row0, nrows,
                                                       w->ne[1], out, bad);
        CP_CUDA_LAUNCH_CHECK();
        return CP_OK;
    }
    CP_CHECK(cuda_check_row_width(t, cols));
    const int64_t chunks = cols / 32;
    dim3 grid((unsigned)((chunks + 127) / 128 > 64 ? 64 : (chunks + 127) / 128), (unsigned)nrows);
#define CP_ROWS_CALL(T)                                                                            \
    rows_block_kernel<T, O><<<grid, 128, 0, stream>>>(data, rb, cols, ids, row0, w->ne[1], out, bad)
    CP_CUDA_SWITCH_BLOCK_DTYPE(t, CP_ROWS_CALL,
                               return CP_ERROR(CP_ERR_UNSUPPORTED, "the CUDA backend cannot read %s",
                                               cp_dtype_name(t)))
#undef CP_ROWS_CALL
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

extern "C" cp_status cp_embed_cuda(const cp_tensor *table, const int32_t *ids, int n, float *out,
                                   int *bad, cudaStream_t stream) {
    return rows_cuda<float>(table, ids, 0, n, out, bad, stream);
}

extern "C" cp_status cp_dequantize_cuda(const cp_tensor *w, int64_t row0, int64_t nrows,
                                        float *out, cudaStream_t stream) {
    return rows_cuda<float>(w, NULL, row0, nrows, out, NULL, stream);
}

extern "C" cp_status cp_dequantize_f16_cuda(const cp_tensor *w, int64_t row0, int64_t nrows,
                                            void *out, cudaStream_t stream) {
    return rows_cuda<__half>(w, NULL, row0, nrows, (__half *)out, NULL, stream);
}

/* ---- fp32 -> fp16 / bf16 ---- */

static __global__ void convert_f32_kernel(void *out, const float *x, size_t n, int to_bf16) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (to_bf16)
            ((__nv_bfloat16 *)out)[i] = __float2bfloat16_rn(x[i]);
        else
            ((__half *)out)[i] = __float2half_rn(x[i]);
    }
}

extern "C" cp_status cp_convert_f32_cuda(void *out, const float *x, size_t n, bool to_bf16,
                                         cudaStream_t stream) {
    convert_f32_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, x, n, to_bf16 ? 1 : 0);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- argmax: one block per row; ties go to the lowest index ---- */

static __device__ __forceinline__ void better(float &bv, int &bi, float v, int i) {
    /* NaN never wins: v > bv is false for NaN */
    if (v > bv || (v == bv && i < bi) || (bi < 0 && !(v != v))) {
        bv = v;
        bi = i;
    }
}

static __global__ void argmax_f32_kernel(const float *logits, int vocab, int32_t *out) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *r = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = -1;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) better(bv, bi, r[i], i);
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (i >= 0) better(bv, bi, v, i);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        bv = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : -1;
        for (int o = 16; o > 0; o >>= 1) {
            float v = __shfl_xor_sync(0xffffffffu, bv, o);
            int i = __shfl_xor_sync(0xffffffffu, bi, o);
            if (i >= 0) better(bv, bi, v, i);
        }
        if (lane == 0) out[blockIdx.x] = bi < 0 ? 0 : bi;
    }
}

extern "C" cp_status cp_argmax_cuda(const float *logits, int n, int vocab, int32_t *out,
                                    cudaStream_t stream) {
    argmax_f32_kernel<<<n, 1024, 0, stream>>>(logits, vocab, out);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- x += delta, out = rmsnorm(x) * w: one block per row ---- */

static __global__ void add_rmsnorm_f32_kernel(float *x, const float *delta, const float *w,
                                              int dim, float eps, float *out) {
    __shared__ float red[32];
    float *xr = x + (size_t)blockIdx.x * dim;
    const float *dr = delta + (size_t)blockIdx.x * dim;
    float *orow = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = xr[i] + dr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float s = rsqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = xr[i] * s * w[i];
}

extern "C" cp_status cp_add_rmsnorm_cuda(float *x, const float *delta, const float *w, int n,
                                         int dim, float eps, float *out, cudaStream_t stream) {
    int threads = dim >= 1024 ? 1024 : ((dim + 31) / 32) * 32;
    add_rmsnorm_f32_kernel<<<n, threads, 0, stream>>>(x, delta, w, dim, eps, out);
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}

/* ---- RoPE of q and k and the store of k and v into the paged cache, one
 * launch: work items are q pairs, then k pairs (rotated pairs, then the
 * unrotated tail two elements at a time; each stored), then v elements ---- */

static __device__ __forceinline__ void rope_pair(float *xh, int i, int half, int interleaved,
                                                 double angle) {
    double s, c;
    sincos(angle, &s, &c);
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const double a = xh[ia], b = xh[ib];
    xh[ia] = (float)(a * c - b * s);
    xh[ib] = (float)(a * s + b * c);
}

template <typename KV>
static __global__ void rope_store_kernel(float *q, float *k, const float *v, const int32_t *pos,
                                         const int32_t *seq, const int32_t *tables, int n_tok,
                                         int n_head, int n_head_kv, int head_dim, int rot_dim,
                                         int interleaved, double log_theta, float freq_scale,
                                         const float *freq_factors, int block_size,
                                         int max_blocks, KV *kc, KV *vc) {
    const int half = rot_dim / 2, hp = head_dim / 2;
    const int64_t nq = (int64_t)n_tok * n_head * half;
    const int64_t nk = (int64_t)n_tok * n_head_kv * hp;
    const int64_t nv = (int64_t)n_tok * n_head_kv * head_dim;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < nq + nk + nv;
         idx += (int64_t)gridDim.x * blockDim.x) {
        if (idx < nq) {
            const int i = (int)(idx % half);
            const int64_t th = idx / half;
            const int t = (int)(th / n_head);
            double angle = (double)pos[t] * (double)freq_scale * exp(-2.0 * i / rot_dim * log_theta);
            if (freq_factors) angle /= (double)freq_factors[i];
            rope_pair(q + th * head_dim, i, half, interleaved, angle);
            continue;
        }
        if (idx < nq + nk) {
            const int64_t j = idx - nq;
            const int i = (int)(j % hp);
            const int64_t th = j / hp;
            const int t = (int)(th / n_head_kv), h = (int)(th % n_head_kv);
            float *kh = k + th * head_dim;
            int e0, e1;
            if (i < half) {
                double angle = (double)pos[t] * (double)freq_scale * exp(-2.0 * i / rot_dim * log_theta);
                if (freq_factors) angle /= (double)freq_factors[i];
                rope_pair(kh, i, half, interleaved, angle);
                e0 = interleaved ? 2 * i : i;
                e1 = interleaved ? 2 * i + 1 : i + half;
            } else {
                e0 = rot_dim + 2 * (i - half);
                e1 = e0 + 1;
            }
            const size_t off = kv_slot(tables + (size_t)seq[t] * max_blocks, block_size, n_head_kv,
                                       head_dim, pos[t], h);
            store_kv(kc, off + e0, kh[e0]);
            store_kv(kc, off + e1, kh[e1]);
            continue;
        }
        const int64_t j = idx - nq - nk;
        const int kv_dim = n_head_kv * head_dim;
        const int t = (int)(j / kv_dim), e = (int)(j % kv_dim);
        const size_t off = kv_slot(tables + (size_t)seq[t] * max_blocks, block_size, n_head_kv,
                                   head_dim, pos[t], e / head_dim);
        store_kv(vc, off + e % head_dim, v[j]);
    }
}

extern "C" cp_status cp_rope_store_cuda(const cp_rope_params *rp, const cp_attn_params *p,
                                        float *q, float *k, const float *v, void *k_cache,
                                        void *v_cache, cudaStream_t stream) {
    const int64_t total = (int64_t)p->n_tok *
                          ((int64_t)p->n_head * (rp->rot_dim / 2) +
                           (int64_t)p->n_head_kv * (p->head_dim / 2) +
                           (int64_t)p->n_head_kv * p->head_dim);
    int64_t blocks = (total + 255) / 256;
    if (blocks > 8192) blocks = 8192;
#define CP_RS_CALL(KV)                                                                             \
    rope_store_kernel<KV><<<(unsigned)blocks, 256, 0, stream>>>(                                   \
        q, k, v, p->pos_of_tok, p->seq_of_tok, p->block_tables, p->n_tok, p->n_head,               \
        p->n_head_kv, p->head_dim, rp->rot_dim, rp->mode == CP_ROPE_INTERLEAVED,                   \
        log((double)rp->theta), rp->freq_scale, rp->freq_factors, p->block_size, p->max_blocks,    \
        (KV *)k_cache, (KV *)v_cache)
    if (p->kv_dtype == CP_DTYPE_F16)
        CP_RS_CALL(__half);
    else
        CP_RS_CALL(float);
#undef CP_RS_CALL
    CP_CUDA_LAUNCH_CHECK();
    return CP_OK;
}
