// test_ops.cc - the CPU backend's ops and thread pool: every fast op against
// its fp32 reference (cp_<op>_ref) and against an fp64 computation written
// here, with odd shapes, seeded random inputs and NaN-poisoned outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cp_backend.h"
#include "cpu/cpu_quants.h"
#include "cpu/cpu_ref.h"
#include "cpu/threadpool.h"

namespace {

struct BackendDeleter {
    void operator()(cp_backend *be) const { cp_backend_free(be); }
};
using BackendPtr = std::unique_ptr<cp_backend, BackendDeleter>;

struct PoolDeleter {
    void operator()(cp_threadpool *p) const { cp_threadpool_free(p); }
};
using PoolPtr = std::unique_ptr<cp_threadpool, PoolDeleter>;

BackendPtr make_backend(int n_threads) {
    cp_backend_t be = nullptr;
    cp_status st = cp_backend_cpu_init(n_threads, &be);
    EXPECT_EQ(st, CP_OK) << cp_last_error();
    return BackendPtr(be);
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();
const double kEps32 = 1.0 / (1 << 24); // unit roundoff of fp32

std::vector<float> poisoned(size_t n) {
    return std::vector<float>(n, kNaN);
}

std::vector<float> randn(size_t n, uint32_t seed, float sigma = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, sigma);
    std::vector<float> v(n);
    for (auto &x : v)
        x = d(rng);
    return v;
}

// |got[i] - want[i]| <= tol[i] for every i; on failure prints the first
// mismatches and the largest error relative to its tolerance.
::testing::AssertionResult all_close(const float *got, const double *want, const double *tol,
                                     size_t n, const std::string &what) {
    size_t bad = 0, worst = 0;
    double worst_ratio = 0.0;
    std::string msg;
    for (size_t i = 0; i < n; i++) {
        double err = std::fabs((double)got[i] - want[i]);
        double ratio = tol[i] > 0 ? err / tol[i] : (err > 0 ? INFINITY : 0.0);
        if (!(err <= tol[i])) { // also catches NaN
            if (bad < 5)
                msg += "\n  [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " +
                       std::to_string(want[i]) + " tol " + std::to_string(tol[i]);
            bad++;
            ratio = INFINITY;
        }
        if (ratio > worst_ratio || (std::isinf(ratio) && bad == 1)) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": " << bad << " of " << n
                                         << " outside tolerance (worst at " << worst << ")" << msg;
}

::testing::AssertionResult all_close(const std::vector<float> &got, const std::vector<double> &want,
                                     const std::vector<double> &tol, const std::string &what) {
    if (got.size() != want.size() || got.size() != tol.size())
        return ::testing::AssertionFailure() << what << ": size mismatch";
    return all_close(got.data(), want.data(), tol.data(), got.size(), what);
}

::testing::AssertionResult bit_equal(const std::vector<float> &a, const std::vector<float> &b,
                                     const std::string &what) {
    if (a.size() != b.size()) return ::testing::AssertionFailure() << what << ": size mismatch";
    for (size_t i = 0; i < a.size(); i++)
        if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
            return ::testing::AssertionFailure()
                   << what << ": differ at " << i << ": " << a[i] << " vs " << b[i];
    return ::testing::AssertionSuccess();
}

std::vector<double> widen(const std::vector<float> &v) {
    return std::vector<double>(v.begin(), v.end());
}

// ---------------------------------------------------------------------------
// Thread pool

struct CountCtx {
    std::vector<std::atomic<int>> *hits;
    std::atomic<int> bad_thread;
    int n_threads;
};

void count_task(void *vctx, int task, int thread) {
    auto *c = static_cast<CountCtx *>(vctx);
    (*c->hits)[task].fetch_add(1);
    if (thread < 0 || thread >= c->n_threads) c->bad_thread.fetch_add(1);
}

TEST(ThreadPool, EveryTaskRunsExactlyOnce) {
    for (int nt : {1, 2, 3, 8}) {
        cp_threadpool *raw = nullptr;
        ASSERT_EQ(cp_threadpool_init(nt, &raw), CP_OK) << cp_last_error();
        PoolPtr pool(raw);
        EXPECT_EQ(cp_threadpool_n_threads(pool.get()), nt);
        for (int n_tasks : {0, 1, 2, 7, 64, 1000}) {
            for (int rep = 0; rep < 50; rep++) {
                std::vector<std::atomic<int>> hits(n_tasks > 0 ? n_tasks : 1);
                for (auto &h : hits)
                    h = 0;
                CountCtx c{&hits, {0}, nt};
                cp_threadpool_parallel_for(pool.get(), n_tasks, count_task, &c);
                for (int t = 0; t < n_tasks; t++)
                    ASSERT_EQ(hits[t].load(), 1) << "threads " << nt << " tasks " << n_tasks;
                if (n_tasks == 0) {
                    ASSERT_EQ(hits[0].load(), 0);
                }
                ASSERT_EQ(c.bad_thread.load(), 0);
            }
        }
    }
}

// Workers that have gone to sleep (after their spin time) must wake up.
TEST(ThreadPool, WakesSleepingWorkers) {
    cp_threadpool *raw = nullptr;
    ASSERT_EQ(cp_threadpool_init(3, &raw), CP_OK);
    PoolPtr pool(raw);
    for (int rep = 0; rep < 5; rep++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        std::vector<std::atomic<int>> hits(100);
        for (auto &h : hits)
            h = 0;
        CountCtx c{&hits, {0}, 3};
        cp_threadpool_parallel_for(pool.get(), 100, count_task, &c);
        for (auto &h : hits)
            ASSERT_EQ(h.load(), 1);
    }
}

struct SumCtx {
    std::vector<int64_t> *partial; // one slot per task: no sharing
};

void sum_task(void *vctx, int task, int) {
    auto *c = static_cast<SumCtx *>(vctx);
    (*c->partial)[task] = (int64_t)task * task;
}

// Many back-to-back jobs (the decode pattern): results of every job are
// complete when parallel_for returns.
TEST(ThreadPool, BackToBackJobsSeeCompleteResults) {
    cp_threadpool *raw = nullptr;
    ASSERT_EQ(cp_threadpool_init(3, &raw), CP_OK);
    PoolPtr pool(raw);
    std::vector<int64_t> partial(37);
    SumCtx c{&partial};
    int64_t want = 0;
    for (int t = 0; t < 37; t++)
        want += (int64_t)t * t;
    for (int rep = 0; rep < 20000; rep++) {
        std::fill(partial.begin(), partial.end(), -1);
        cp_threadpool_parallel_for(pool.get(), 37, sum_task, &c);
        int64_t got = std::accumulate(partial.begin(), partial.end(), (int64_t)0);
        ASSERT_EQ(got, want) << "job " << rep;
    }
}

TEST(ThreadPool, RejectsBadThreadCount) {
    cp_threadpool *raw = reinterpret_cast<cp_threadpool *>(0x1);
    EXPECT_EQ(cp_threadpool_init(0, &raw), CP_ERR_INVALID_ARG);
    EXPECT_EQ(raw, nullptr);
    EXPECT_NE(std::string(cp_last_error()).find("n_threads"), std::string::npos);
    cp_threadpool_free(nullptr); // no-op
}

// ---------------------------------------------------------------------------
// Vector primitives of the fast paths: the portable table (used on CPUs
// without AVX2, so not otherwise reached on this machine) and the AVX2 one.

TEST(VecOps, EveryTableMatchesFp64) {
    std::vector<const cp_cpu_vec_ops *> tables = {cp_cpu_vec_ops_generic()};
    if (cp_cpu_vec_ops_avx2()) tables.push_back(cp_cpu_vec_ops_avx2());
    uint32_t seed = 600;
    for (const cp_cpu_vec_ops *ops : tables) {
        for (int n : {1, 3, 7, 8, 17, 33, 64, 129, 576}) {
            std::string what = std::string(ops->name) + " n=" + std::to_string(n);
            std::vector<float> a = randn(n, seed++, 2.0f), b = randn(n, seed++, 2.0f);
            std::vector<uint16_t> bh(n);
            std::vector<double> bh64(n);
            for (int i = 0; i < n; i++)
                bh64[i] = cp_fp16_to_fp32(bh[i] = cp_fp32_to_fp16(b[i]));
            double dot = 0, doth = 0, sabs = 0, ss = 0;
            for (int i = 0; i < n; i++) {
                dot += (double)a[i] * b[i];
                doth += (double)a[i] * bh64[i];
                sabs += std::fabs((double)a[i] * b[i]);
                ss += (double)a[i] * a[i];
            }
            // fp32 sums of n products: |err| <= n 2^-24 sum|a b| (gamma_n).
            const double tol = (n + 2) * kEps32 * sabs + 1e-30;
            EXPECT_NEAR(ops->dot_f32(a.data(), b.data(), n), dot, tol) << what;
            EXPECT_NEAR(ops->dot_f16(a.data(), bh.data(), n), doth, tol) << what;
            EXPECT_NEAR(ops->sumsq(a.data(), n), ss, (n + 2) * kEps32 * ss) << what;
            double mx = *std::max_element(a.begin(), a.end());
            EXPECT_EQ(ops->max(a.data(), n), (float)mx) << what;
            // Axpy and scale: one fused or two rounded operations per element.
            std::vector<float> y = b, yh = b, sc = a;
            ops->axpy_f32(y.data(), 0.75f, a.data(), n);
            ops->axpy_f16(yh.data(), -1.5f, bh.data(), n);
            ops->scale(sc.data(), 0.3f, n);
            std::vector<float> ms(n), ad(n), sw(n), dv(n), ex = a;
            ops->mul_scaled(ms.data(), a.data(), 1.7f, b.data(), n);
            ops->add(ad.data(), a.data(), b.data(), (size_t)n);
            ops->swiglu(sw.data(), a.data(), b.data(), (size_t)n);
            ops->div(dv.data(), a.data(), 0.7f, n);
            float m = (float)mx;
            float esum = ops->exp_sum(ex.data(), m, n);
            std::vector<uint16_t> h(n);
            ops->f32_to_f16(h.data(), a.data(), n);
            double esum64 = 0;
            for (int i = 0; i < n; i++) {
                double axpy = b[i] + 0.75 * a[i], axpyh = b[i] - 1.5 * bh64[i];
                EXPECT_NEAR(y[i], axpy, 2 * kEps32 * (std::fabs(b[i]) + std::fabs(0.75 * a[i])))
                    << what;
                EXPECT_NEAR(yh[i], axpyh, 2 * kEps32 * (std::fabs(b[i]) + std::fabs(1.5 * bh64[i])))
                    << what;
                EXPECT_NEAR(sc[i], a[i] * (double)0.3f, kEps32 * std::fabs(a[i] * 0.3)) << what;
                EXPECT_NEAR(ms[i], a[i] * (double)1.7f * b[i],
                            2 * kEps32 * std::fabs(a[i] * 1.7 * b[i]))
                    << what;
                EXPECT_EQ(ad[i], a[i] + b[i]) << what;          // IEEE addition
                EXPECT_EQ(dv[i], a[i] / 0.7f) << what;          // IEEE division
                EXPECT_EQ(h[i], cp_fp32_to_fp16(a[i])) << what; // round to nearest even
                double g = a[i], swi = g / (1 + std::exp(-g)) * b[i];
                EXPECT_NEAR(sw[i], swi, 8 * kEps32 * std::fabs(swi) + 1e-30) << what;
                double e = std::exp((double)a[i] - m);
                esum64 += e;
                // exp within a few ulps of its fp32 argument a - m, whose own
                // rounding (|a - m| 2^-24 absolute) moves e by that relatively.
                EXPECT_NEAR(ex[i], e, (4 + std::fabs(a[i] - m)) * kEps32 * e) << what;
            }
            EXPECT_NEAR(esum, esum64, (n + 4 + 2 * std::fabs(m) + 20) * kEps32 * esum64) << what;
            // first_greater: the first element above a threshold, or n.
            for (int probe = 0; probe < n; probe += 1 + n / 5) {
                float t = a[probe];
                int want = n;
                for (int i = 0; i < n; i++)
                    if (a[i] > t) {
                        want = i;
                        break;
                    }
                EXPECT_EQ(ops->first_greater(a.data(), n, t), want) << what;
            }
            EXPECT_EQ(ops->first_greater(a.data(), n, (float)mx), n) << what;
        }
        // exp_sum of masked entries: exactly 0, including -inf.
        std::vector<float> masked = {0.0f,  -kInf, -200.0f, -1.0f, -kInf,
                                     -kInf, -kInf, -kInf,   -kInf};
        float s = ops->exp_sum(masked.data(), 0.0f, (int)masked.size());
        EXPECT_EQ(masked[1], 0.0f);
        EXPECT_EQ(masked[8], 0.0f);
        EXPECT_EQ(masked[2], 0.0f);
        EXPECT_NEAR(s, 1.0 + std::exp(-1.0), 4 * kEps32);
    }
}

// ---------------------------------------------------------------------------
// Backend basics

TEST(CpuBackend, BasicsAndMemory) {
    BackendPtr be = make_backend(2);
    ASSERT_TRUE(be);
    EXPECT_STREQ(cp_backend_name(be.get()), "cpu");
    EXPECT_EQ(cp_backend_device(be.get()), CP_DEVICE_CPU);
    EXPECT_EQ(cp_backend_n_threads(be.get()), 2);
    void *p = nullptr;
    ASSERT_EQ(cp_backend_alloc(be.get(), 1000, &p), CP_OK);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
    ASSERT_EQ(cp_backend_memset(be.get(), p, 0x5a, 1000), CP_OK);
    std::vector<uint8_t> host(1000);
    ASSERT_EQ(cp_backend_copy(be.get(), host.data(), p, 1000, CP_COPY_DEVICE_TO_HOST), CP_OK);
    for (uint8_t b : host)
        ASSERT_EQ(b, 0x5a);
    std::iota(host.begin(), host.end(), 0);
    ASSERT_EQ(cp_backend_copy(be.get(), p, host.data(), 1000, CP_COPY_HOST_TO_DEVICE), CP_OK);
    EXPECT_EQ(std::memcmp(p, host.data(), 1000), 0);
    EXPECT_EQ(cp_backend_synchronize(be.get()), CP_OK);
    cp_backend_dealloc(be.get(), p);
    cp_backend_dealloc(be.get(), nullptr);

    BackendPtr all = make_backend(0); // online cores
    ASSERT_TRUE(all);
    EXPECT_GE(cp_backend_n_threads(all.get()), 1);
    cp_backend_free(nullptr);
}

const cp_dtype kWeightTypes[] = {CP_DTYPE_F32,  CP_DTYPE_F16,  CP_DTYPE_BF16, CP_DTYPE_Q4_0,
                                 CP_DTYPE_Q4_1, CP_DTYPE_Q5_0, CP_DTYPE_Q5_1, CP_DTYPE_Q8_0,
                                 CP_DTYPE_Q4_K, CP_DTYPE_Q5_K, CP_DTYPE_Q6_K};

TEST(CpuBackend, SupportsExactlyTheWeightTypes) {
    BackendPtr be = make_backend(1);
    for (cp_dtype t : kWeightTypes)
        EXPECT_TRUE(cp_backend_supports(be.get(), t)) << cp_dtype_name(t);
    for (cp_dtype t : {CP_DTYPE_Q8_1, CP_DTYPE_Q8_K, CP_DTYPE_I32, CP_DTYPE_F64})
        EXPECT_FALSE(cp_backend_supports(be.get(), t)) << cp_dtype_name(t);
}

// ---------------------------------------------------------------------------
// matmul

struct QuantTensor {
    std::vector<uint8_t> bytes;
    std::vector<float> deq; // what the weights really are after quantization
    cp_tensor t;
};

// Byte offset of the fp16 super-block scales (d, then dmin for Q2_K) inside
// a block of the K types that have no quantizer; GGUF layouts.
size_t k_scale_offset(cp_dtype type) {
    return type == CP_DTYPE_Q2_K ? 16 + 64 : 32 + 64 + 12; // Q2_K: d, dmin; Q3_K: d
}

QuantTensor make_weights(cp_dtype type, int64_t m, int64_t k, uint32_t seed) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(type);
    QuantTensor q;
    std::vector<float> w = randn((size_t)(m * k), seed, 0.5f);
    size_t row = cp_dtype_row_size(type, k);
    q.bytes.assign(row * (size_t)m + 64, 0);
    q.deq.resize((size_t)(m * k));
    if (!tr->from_float) {
        // Types without a quantizer: random quant bits, sane fp16 scales.
        std::mt19937 rng(seed);
        for (size_t i = 0; i < row * (size_t)m; i++)
            q.bytes[i] = (uint8_t)rng();
        const size_t bsz = cp_dtype_type_size(type), off = k_scale_offset(type);
        for (size_t b0 = 0; b0 < row * (size_t)m; b0 += bsz) {
            uint16_t d = cp_fp32_to_fp16(0.01f + 0.02f * (float)(rng() % 100) / 100.0f);
            std::memcpy(&q.bytes[b0 + off], &d, 2);
            if (type == CP_DTYPE_Q2_K) std::memcpy(&q.bytes[b0 + off + 2], &d, 2);
        }
    }
    for (int64_t r = 0; r < m; r++) {
        if (tr->from_float) tr->from_float(w.data() + r * k, q.bytes.data() + (size_t)r * row, k);
        tr->to_float(q.bytes.data() + (size_t)r * row, q.deq.data() + r * k, k);
    }
    q.t = cp_tensor_2d(type, m, k, q.bytes.data());
    return q;
}

// Error bound of one output y[i][r] of the fast path relative to the exact
// product of the dequantized weights with the fp32 activations.
// The fast path rounds the activation row to the weight type's vec_dot_type:
//  - F32: exact; F16: |dx| <= 2^-11 |x|; BF16: |dx| <= 2^-8 |x|.
//  - Q8_0 / Q8_1 (blocks of 32, d = amax/127 stored as fp16): round-to-
//    nearest gives |dx| <= d/2, and the fp16 scale adds |q| d 2^-11 <=
//    127 d 2^-11, so |dx| <= amax/127 * (0.5 + 0.062) < 0.0045 amax.
//    Q8_1 also stores s = d*sum(q) in fp16, which the Q4_1/Q5_1 dot uses for
//    the min term m*s: error <= max|w| of the block * sum|x| of the block *
//    2^-11 (|m| <= max|w| because the min is one of the block's values).
//  - Q8_K (blocks of 256, d = max/127 kept in fp32): |dx| <= amax/254 (1.001
//    slack for the fp32 scale), bsums are exact integers.
// Each |dx_j| contributes |w_j| |dx_j|. On top, fp32 accumulation and the
// fp32 products of block scales: 4 k 2^-24 sum|w||x| (a generous gamma_k).
double matmul_bound(cp_dtype wt, const float *w, const float *x, int64_t k) {
    const cp_dtype vdt = cp_cpu_get_type_traits(wt)->vec_dot_type;
    double sum_abs = 0.0, act = 0.0;
    for (int64_t j = 0; j < k; j++)
        sum_abs += std::fabs((double)w[j] * x[j]);
    int64_t blk = vdt == CP_DTYPE_Q8_K ? 256 : 32;
    for (int64_t b0 = 0; b0 < k; b0 += blk) {
        double amax = 0.0, wmax = 0.0, xsum = 0.0, wsum = 0.0;
        for (int64_t j = b0; j < b0 + blk && j < k; j++) {
            amax = std::max(amax, (double)std::fabs(x[j]));
            wmax = std::max(wmax, (double)std::fabs(w[j]));
            xsum += std::fabs(x[j]);
            wsum += std::fabs(w[j]);
        }
        switch (vdt) {
        case CP_DTYPE_Q8_0: act += wsum * amax * 0.0045; break;
        case CP_DTYPE_Q8_1: act += wsum * amax * 0.0045 + wmax * xsum * 1.01 / 2048.0; break;
        case CP_DTYPE_Q8_K: act += wsum * amax / 254.0 * 1.001; break;
        default: break;
        }
    }
    if (vdt == CP_DTYPE_F16) act = sum_abs / 2048.0;
    if (vdt == CP_DTYPE_BF16) act = sum_abs / 256.0;
    return act + 4.0 * (double)k * kEps32 * sum_abs + 1e-6;
}

struct MatmulCase {
    cp_dtype type;
};

class MatmulTest : public ::testing::TestWithParam<cp_dtype> {};

TEST_P(MatmulTest, FastMatchesReferenceAndFp64) {
    const cp_dtype type = GetParam();
    BackendPtr be1 = make_backend(1), be3 = make_backend(3);
    ASSERT_TRUE(be1 && be3);
    if (type == CP_DTYPE_Q2_K || type == CP_DTYPE_Q3_K) {
        if (!cp_backend_supports(be3.get(), type)) GTEST_SKIP() << "no kernel for this type yet";
    }
    ASSERT_TRUE(cp_backend_supports(be3.get(), type));
    const int64_t bs = cp_dtype_block_size(type);
    std::vector<int64_t> ks;
    if (bs == 1)
        ks = {1, 3, 17, 64, 129, 576};
    else if (bs == 32)
        ks = {32, 64, 576};
    else
        ks = {256, 768};
    uint32_t seed = 1000u * (uint32_t)type;
    int checked = 0;
    for (int64_t k : ks) {
        for (int64_t m : {1, 3, 17, 129}) {
            QuantTensor W = make_weights(type, m, k, seed++);
            for (int n : {1, 5, 33}) {
                std::vector<float> x = randn((size_t)(n * k), seed++);
                std::vector<float> bias = randn((size_t)m, seed++);
                const float *b = checked % 2 ? bias.data() : nullptr; // with and without bias
                std::vector<float> y1 = poisoned((size_t)(n * m)), y3 = y1, yr = y1;
                ASSERT_EQ(cp_backend_matmul(be1.get(), &W.t, x.data(), n, y1.data(), b), CP_OK)
                    << cp_last_error();
                ASSERT_EQ(cp_backend_matmul(be3.get(), &W.t, x.data(), n, y3.data(), b), CP_OK);
                ASSERT_EQ(cp_matmul_ref(&W.t, x.data(), n, yr.data(), b), CP_OK);
                // Each output is one dot product of a fixed pair of rows: the
                // thread split must not change a single bit.
                ASSERT_TRUE(bit_equal(y1, y3, "threads 1 vs 3"));

                std::vector<double> want((size_t)(n * m)), tol_fast(want.size()),
                    tol_ref(want.size());
                for (int i = 0; i < n; i++)
                    for (int64_t r = 0; r < m; r++) {
                        const float *wr = W.deq.data() + r * k;
                        const float *xi = x.data() + (size_t)i * k;
                        double s = b ? b[r] : 0.0, sa = 0.0;
                        for (int64_t j = 0; j < k; j++) {
                            s += (double)wr[j] * xi[j];
                            sa += std::fabs((double)wr[j] * xi[j]);
                        }
                        size_t o = (size_t)i * m + r;
                        want[o] = s;
                        tol_fast[o] = matmul_bound(type, wr, xi, k);
                        // Reference: fp32 products and a sequential fp32 sum.
                        tol_ref[o] =
                            2.0 * (double)(k + 1) * kEps32 * (sa + (b ? std::fabs(b[r]) : 0)) +
                            1e-7;
                    }
                std::string what = std::string(cp_dtype_name(type)) + " m=" + std::to_string(m) +
                                   " k=" + std::to_string(k) + " n=" + std::to_string(n);
                ASSERT_TRUE(all_close(y3, want, tol_fast, what + " fast vs fp64"));
                ASSERT_TRUE(all_close(yr, want, tol_ref, what + " ref vs fp64"));
                std::vector<double> tol_both(want.size());
                for (size_t o = 0; o < want.size(); o++)
                    tol_both[o] = tol_fast[o] + tol_ref[o];
                ASSERT_TRUE(all_close(y3, widen(yr), tol_both, what + " fast vs ref"));
                checked++;
            }
        }
    }
    EXPECT_EQ(checked, (int)ks.size() * 4 * 3);
}

INSTANTIATE_TEST_SUITE_P(OptionalTypes, MatmulTest, ::testing::Values(CP_DTYPE_Q2_K, CP_DTYPE_Q3_K),
                         [](const ::testing::TestParamInfo<cp_dtype> &info) {
                             return std::string(cp_dtype_name(info.param));
                         });
INSTANTIATE_TEST_SUITE_P(AllWeightTypes, MatmulTest, ::testing::ValuesIn(kWeightTypes),
                         [](const ::testing::TestParamInfo<cp_dtype> &info) {
                             return std::string(cp_dtype_name(info.param));
                         });

// A 4096-wide Q8_0 and F32 matmul with 2 threads: large enough that the rows
// are split into many chunks and quantized activations reuse the workspace.
TEST(Matmul, LargeRowsRepeatedCallsAreStable) {
    BackendPtr be = make_backend(2);
    for (cp_dtype type : {CP_DTYPE_F32, CP_DTYPE_Q8_0}) {
        const int64_t m = 300, k = 4096;
        QuantTensor W = make_weights(type, m, k, 77);
        std::vector<float> x = randn((size_t)(2 * k), 78);
        std::vector<float> first = poisoned((size_t)(2 * m));
        ASSERT_EQ(cp_backend_matmul(be.get(), &W.t, x.data(), 2, first.data(), nullptr), CP_OK);
        for (int rep = 0; rep < 3; rep++) {
            std::vector<float> y = poisoned((size_t)(2 * m));
            ASSERT_EQ(cp_backend_matmul(be.get(), &W.t, x.data(), 2, y.data(), nullptr), CP_OK);
            ASSERT_TRUE(bit_equal(first, y, "repeat"));
        }
        std::vector<double> want((size_t)(2 * m)), tol(want.size());
        for (int i = 0; i < 2; i++)
            for (int64_t r = 0; r < m; r++) {
                double s = 0;
                for (int64_t j = 0; j < k; j++)
                    s += (double)W.deq[r * k + j] * x[i * k + j];
                want[i * m + r] = s;
                tol[i * m + r] = matmul_bound(type, &W.deq[r * k], &x[i * k], k);
            }
        EXPECT_TRUE(all_close(first, want, tol, cp_dtype_name(type)));
    }
}

// ---------------------------------------------------------------------------
// attention and kv_store over the paged cache

struct AttnCase {
    int n_head, n_head_kv, head_dim, block_size;
    cp_dtype kv;
};

std::string attn_name(const ::testing::TestParamInfo<AttnCase> &info) {
    const AttnCase &c = info.param;
    return "h" + std::to_string(c.n_head) + "_kv" + std::to_string(c.n_head_kv) + "_d" +
           std::to_string(c.head_dim) + "_bs" + std::to_string(c.block_size) + "_" +
           cp_dtype_name(c.kv);
}

class AttentionTest : public ::testing::TestWithParam<AttnCase> {};

// Several sequences of different lengths share a cache whose physical blocks
// are handed out in shuffled order. The test keeps the logical K/V of every
// sequence contiguously (rounded to fp16 for an F16 cache) and computes
// attention on them in fp64.
TEST_P(AttentionTest, PagedMatchesContiguousFp64) {
    const AttnCase c = GetParam();
    const int hd = c.head_dim, kv_dim = c.n_head_kv * hd, n_rep = c.n_head / c.n_head_kv;
    const std::vector<int> lens = {37, 5, 70, 1};
    const int n_seq = (int)lens.size();
    std::mt19937 rng(1234 + c.n_head * 7 + hd + c.block_size);

    int max_blocks = 0, n_blocks = 0;
    for (int len : lens) {
        int nb = (len + c.block_size - 1) / c.block_size;
        max_blocks = std::max(max_blocks, nb + 1);
        n_blocks += nb;
    }
    n_blocks += 3; // unused blocks stay poisoned
    std::vector<int32_t> phys(n_blocks);
    std::iota(phys.begin(), phys.end(), 0);
    std::shuffle(phys.begin(), phys.end(), rng);
    std::vector<int32_t> tables((size_t)n_seq * max_blocks, -1);
    int next = 0;
    for (int s = 0; s < n_seq; s++)
        for (int b = 0; b < (lens[s] + c.block_size - 1) / c.block_size; b++)
            tables[(size_t)s * max_blocks + b] = phys[next++];

    // History: every position of every sequence, stored in one kv_store.
    std::vector<int32_t> seq_h, pos_h;
    for (int s = 0; s < n_seq; s++)
        for (int p = 0; p < lens[s]; p++) {
            seq_h.push_back(s);
            pos_h.push_back(p);
        }
    const int n_hist = (int)seq_h.size();
    std::vector<float> k = randn((size_t)n_hist * kv_dim, rng()),
                       v = randn((size_t)n_hist * kv_dim, rng());

    cp_attn_params p{};
    p.n_head = c.n_head;
    p.n_head_kv = c.n_head_kv;
    p.head_dim = hd;
    p.block_size = c.block_size;
    p.max_blocks = max_blocks;
    p.scale = 1.0f / std::sqrt((float)hd);
    p.kv_dtype = c.kv;
    p.block_tables = tables.data();
    p.n_tok = n_hist;
    p.seq_of_tok = seq_h.data();
    p.pos_of_tok = pos_h.data();

    const size_t esz = c.kv == CP_DTYPE_F16 ? 2 : 4;
    const size_t cache_elems = (size_t)n_blocks * c.block_size * kv_dim;
    std::vector<uint8_t> kc(cache_elems * esz, 0xff), vc(kc), kc_ref(kc), vc_ref(kc); // 0xff..: NaN
    BackendPtr be3 = make_backend(3), be1 = make_backend(1);
    ASSERT_EQ(cp_backend_kv_store(be3.get(), &p, k.data(), v.data(), kc.data(), vc.data()), CP_OK)
        << cp_last_error();
    ASSERT_EQ(cp_kv_store_ref(&p, k.data(), v.data(), kc_ref.data(), vc_ref.data()), CP_OK);
    EXPECT_EQ(kc, kc_ref);
    EXPECT_EQ(vc, vc_ref);

    // Logical contiguous copy [s][pos][kvh][d] of what the cache must hold.
    auto rounded = [&](float x) -> double {
        return c.kv == CP_DTYPE_F16 ? (double)cp_fp16_to_fp32(cp_fp32_to_fp16(x)) : (double)x;
    };
    std::vector<std::vector<double>> K(n_seq), Vv(n_seq);
    for (int s = 0; s < n_seq; s++) {
        K[s].resize((size_t)lens[s] * kv_dim);
        Vv[s].resize((size_t)lens[s] * kv_dim);
    }
    for (int t = 0; t < n_hist; t++)
        for (int e = 0; e < kv_dim; e++) {
            K[seq_h[t]][(size_t)pos_h[t] * kv_dim + e] = rounded(k[(size_t)t * kv_dim + e]);
            Vv[seq_h[t]][(size_t)pos_h[t] * kv_dim + e] = rounded(v[(size_t)t * kv_dim + e]);
        }
    // The cache slot of every element, computed independently of the backend.
    for (int t = 0; t < n_hist; t++) {
        int s = seq_h[t], pos = pos_h[t];
        size_t slot = (size_t)tables[(size_t)s * max_blocks + pos / c.block_size] * c.block_size +
                      pos % c.block_size;
        for (int e = 0; e < kv_dim; e++) {
            size_t off = slot * kv_dim + e;
            double got = c.kv == CP_DTYPE_F16
                             ? cp_fp16_to_fp32(reinterpret_cast<const uint16_t *>(kc.data())[off])
                             : reinterpret_cast<const float *>(kc.data())[off];
            ASSERT_EQ(got, K[s][(size_t)pos * kv_dim + e]) << "token " << t << " elem " << e;
        }
    }

    // Query batches: prefill of the longest sequence, decode of one token of
    // each sequence, and an unordered mix.
    struct Batch {
        const char *name;
        std::vector<int32_t> seq, pos;
    };
    std::vector<Batch> batches(4);
    batches[0].name = "prefill";
    for (int q = 0; q < lens[2]; q++) {
        batches[0].seq.push_back(2);
        batches[0].pos.push_back(q);
    }
    batches[1].name = "decode";
    for (int s = 0; s < n_seq; s++) {
        batches[1].seq.push_back(s);
        batches[1].pos.push_back(lens[s] - 1);
    }
    batches[2].name = "mixed";
    batches[2].seq = {0, 2, 1, 0, 3, 2};
    batches[2].pos = {36, 0, 2, 16, 0, 63};
    // One token alone: the backend splits KV groups across threads when
    // there are too few (token, KV head) pairs, which must not change bits.
    batches[3].name = "single";
    batches[3].seq = {0};
    batches[3].pos = {36};

    for (const Batch &bt : batches) {
        const int n_tok = (int)bt.seq.size();
        cp_attn_params a = p;
        a.n_tok = n_tok;
        a.seq_of_tok = bt.seq.data();
        a.pos_of_tok = bt.pos.data();
        std::vector<float> q = randn((size_t)n_tok * c.n_head * hd, rng());
        std::vector<float> o3 = poisoned(q.size()), o1 = o3, orf = o3;
        ASSERT_EQ(cp_backend_attention(be3.get(), &a, q.data(), kc.data(), vc.data(), o3.data()),
                  CP_OK)
            << cp_last_error();
        ASSERT_EQ(cp_backend_attention(be1.get(), &a, q.data(), kc.data(), vc.data(), o1.data()),
                  CP_OK);
        ASSERT_EQ(cp_attention_ref(&a, q.data(), kc.data(), vc.data(), orf.data()), CP_OK);
        ASSERT_TRUE(bit_equal(o1, o3, std::string(bt.name) + " threads 1 vs 3"));

        // fp64 attention with the error bound of an fp32 implementation:
        // each score is an fp32 dot of hd terms, |err| <= es = 2 hd 2^-24
        // sum|q k| scale; a score error e changes the softmax weights by a
        // relative factor within exp(+-2e), so the output moves by at most
        // ~4 es max|v|; exp and the weighted fp32 sums of n_ctx terms add
        // (n_ctx + hd + 16) 2^-24 max|v| relative each. Doubled for slack.
        std::vector<double> want(q.size()), tol(q.size());
        for (int t = 0; t < n_tok; t++) {
            const int s = bt.seq[t], n_ctx = bt.pos[t] + 1;
            for (int h = 0; h < c.n_head; h++) {
                const int kvh = h / n_rep;
                const float *qh = q.data() + ((size_t)t * c.n_head + h) * hd;
                std::vector<double> sc(n_ctx);
                double mx = -INFINITY, es = 0.0, vmax = 0.0;
                for (int j = 0; j < n_ctx; j++) {
                    const double *kr = &K[s][(size_t)j * kv_dim + (size_t)kvh * hd];
                    double d = 0.0, da = 0.0;
                    for (int e = 0; e < hd; e++) {
                        d += qh[e] * kr[e];
                        da += std::fabs(qh[e] * kr[e]);
                    }
                    sc[j] = d * (double)p.scale;
                    es = std::max(es, 2.0 * hd * kEps32 * da * p.scale);
                    mx = std::max(mx, sc[j]);
                    for (int e = 0; e < hd; e++)
                        vmax = std::max(
                            vmax, std::fabs(Vv[s][(size_t)j * kv_dim + (size_t)kvh * hd + e]));
                }
                double z = 0.0;
                for (double &x : sc) {
                    x = std::exp(x - mx);
                    z += x;
                }
                for (int e = 0; e < hd; e++) {
                    double acc = 0.0;
                    for (int j = 0; j < n_ctx; j++)
                        acc += sc[j] * Vv[s][(size_t)j * kv_dim + (size_t)kvh * hd + e];
                    size_t o = ((size_t)t * c.n_head + h) * hd + e;
                    want[o] = acc / z;
                    tol[o] = 2.0 * (4.0 * es * vmax + (n_ctx + hd + 16) * kEps32 * vmax) + 1e-7;
                }
            }
        }
        ASSERT_TRUE(all_close(o3, want, tol, std::string(bt.name) + " fast vs fp64"));
        ASSERT_TRUE(all_close(orf, want, tol, std::string(bt.name) + " ref vs fp64"));
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Values(AttnCase{9, 3, 64, 16, CP_DTYPE_F32}, AttnCase{9, 3, 64, 16, CP_DTYPE_F16},
                      AttnCase{8, 8, 64, 32, CP_DTYPE_F32}, AttnCase{8, 8, 128, 16, CP_DTYPE_F16},
                      AttnCase{32, 8, 128, 32, CP_DTYPE_F32}, AttnCase{32, 8, 64, 32, CP_DTYPE_F16},
                      AttnCase{4, 1, 128, 16, CP_DTYPE_F32}),
    attn_name);

TEST(Attention, RejectsPositionsOutsideTheBlockTable) {
    BackendPtr be = make_backend(2);
    std::vector<int32_t> tables = {0, -1};
    int32_t seq = 0, pos = 20;
    cp_attn_params p{};
    p.n_tok = 1;
    p.n_head = 2;
    p.n_head_kv = 1;
    p.head_dim = 4;
    p.block_size = 16;
    p.max_blocks = 2;
    p.scale = 0.5f;
    p.kv_dtype = CP_DTYPE_F32;
    p.seq_of_tok = &seq;
    p.pos_of_tok = &pos;
    p.block_tables = tables.data();
    std::vector<float> cache(64 * 4), q(8), out(8);
    // Position 20 lives in logical block 1, which has no physical block.
    EXPECT_EQ(cp_backend_attention(be.get(), &p, q.data(), cache.data(), cache.data(), out.data()),
              CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("no physical block"), std::string::npos)
        << cp_last_error_detail();
    pos = 40; // beyond max_blocks * block_size
    EXPECT_EQ(cp_backend_kv_store(be.get(), &p, q.data(), q.data(), cache.data(), cache.data()),
              CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("block tables"), std::string::npos);
    pos = -1;
    EXPECT_EQ(cp_backend_attention(be.get(), &p, q.data(), cache.data(), cache.data(), out.data()),
              CP_ERR_INVALID_ARG);
}

// ---------------------------------------------------------------------------
// rope

struct RopeCase {
    cp_rope_mode mode;
    int head_dim, rot_dim;
    float theta, freq_scale;
    bool factors;
};

class RopeTest : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeTest, MatchesFp64Formula) {
    const RopeCase c = GetParam();
    const int n_head = 3, half = c.rot_dim / 2;
    const std::vector<int32_t> pos = {0, 1, 17, 4095, 32768, 100000, 131071};
    const int n_tok = (int)pos.size();
    std::vector<float> factors(half);
    for (int i = 0; i < half; i++)
        factors[i] = 1.0f + 7.0f * i / half; // Llama-3.1-like ramp
    cp_rope_params rp{c.mode,  c.head_dim,   c.rot_dim,
                      c.theta, c.freq_scale, c.factors ? factors.data() : nullptr};
    std::vector<float> x = randn((size_t)n_tok * n_head * c.head_dim, 99);
    std::vector<double> want(x.size()), tol(x.size());
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_head; h++) {
            const size_t base = ((size_t)t * n_head + h) * c.head_dim;
            for (int e = c.rot_dim; e < c.head_dim; e++) {
                want[base + e] = x[base + e]; // untouched, exactly
                tol[base + e] = 0.0;
            }
            for (int i = 0; i < half; i++) {
                double ang =
                    pos[t] * (double)c.freq_scale * std::pow((double)c.theta, -2.0 * i / c.rot_dim);
                if (c.factors) ang /= factors[i];
                int ia = c.mode == CP_ROPE_INTERLEAVED ? 2 * i : i;
                int ib = c.mode == CP_ROPE_INTERLEAVED ? 2 * i + 1 : i + half;
                double a = x[base + ia], b = x[base + ib];
                want[base + ia] = a * std::cos(ang) - b * std::sin(ang);
                want[base + ib] = a * std::sin(ang) + b * std::cos(ang);
                // fp32 sin/cos (1/2 ulp each) and two fp32 products and a sum:
                // a few ulps of |a| + |b|. An angle computed in fp32 would be
                // off by up to 0.004 rad at position 1e5 and fail this.
                tol[base + ia] = tol[base + ib] =
                    6.0 * kEps32 * (std::fabs(a) + std::fabs(b)) + 1e-30;
            }
        }
    BackendPtr be = make_backend(3);
    std::vector<float> fast = x, ref = x;
    ASSERT_EQ(cp_backend_rope(be.get(), fast.data(), pos.data(), n_tok, n_head, &rp), CP_OK);
    ASSERT_EQ(cp_rope_ref(ref.data(), pos.data(), n_tok, n_head, &rp), CP_OK);
    EXPECT_TRUE(all_close(fast, want, tol, "fast"));
    EXPECT_TRUE(all_close(ref, want, tol, "ref"));
}

INSTANTIATE_TEST_SUITE_P(
    Modes, RopeTest,
    ::testing::Values(RopeCase{CP_ROPE_INTERLEAVED, 64, 64, 10000.0f, 1.0f, false},
                      RopeCase{CP_ROPE_HALF, 64, 64, 10000.0f, 1.0f, false},
                      RopeCase{CP_ROPE_INTERLEAVED, 128, 128, 500000.0f, 1.0f, true},
                      RopeCase{CP_ROPE_HALF, 128, 128, 500000.0f, 1.0f, true},
                      RopeCase{CP_ROPE_INTERLEAVED, 64, 32, 10000.0f, 0.25f, false},
                      RopeCase{CP_ROPE_HALF, 66, 18, 100000.0f, 0.5f, true},
                      RopeCase{CP_ROPE_HALF, 2, 2, 10000.0f, 1.0f, false}));

// ---------------------------------------------------------------------------
// rmsnorm, softmax, add, swiglu

TEST(RmsNorm, MatchesFp64) {
    BackendPtr be = make_backend(3);
    uint32_t seed = 5;
    for (int dim : {1, 3, 17, 64, 129, 576})
        for (int n : {1, 5, 33}) {
            std::vector<float> x = randn((size_t)n * dim, seed++, 3.0f), w = randn(dim, seed++);
            const float eps = 1e-5f;
            std::vector<double> want(x.size()), tol(x.size());
            for (int i = 0; i < n; i++) {
                double ss = 0;
                for (int d = 0; d < dim; d++)
                    ss += (double)x[i * dim + d] * x[i * dim + d];
                double s = 1.0 / std::sqrt(ss / dim + eps);
                for (int d = 0; d < dim; d++) {
                    double o = x[i * dim + d] * s * w[d];
                    want[i * dim + d] = o;
                    // fp32 sum of squares (relative error <= dim 2^-24 of the
                    // sum, half of that on the scale) plus ~4 roundings.
                    tol[i * dim + d] = std::fabs(o) * (dim * kEps32 + 6 * kEps32) + 1e-30;
                }
            }
            std::vector<float> fast = poisoned(x.size()), ref = poisoned(x.size());
            ASSERT_EQ(cp_backend_rmsnorm(be.get(), fast.data(), x.data(), w.data(), n, dim, eps),
                      CP_OK);
            ASSERT_EQ(cp_rmsnorm_ref(ref.data(), x.data(), w.data(), n, dim, eps), CP_OK);
            std::string what = "dim " + std::to_string(dim) + " n " + std::to_string(n);
            ASSERT_TRUE(all_close(fast, want, tol, what + " fast"));
            ASSERT_TRUE(all_close(ref, want, tol, what + " ref"));
            // In place (out == x).
            std::vector<float> inplace = x;
            ASSERT_EQ(
                cp_backend_rmsnorm(be.get(), inplace.data(), inplace.data(), w.data(), n, dim, eps),
                CP_OK);
            ASSERT_TRUE(bit_equal(inplace, fast, what + " in place"));
        }
}

TEST(Softmax, MatchesFp64IncludingLargeAndInfiniteEntries) {
    BackendPtr be = make_backend(3);
    uint32_t seed = 11;
    for (int dim : {1, 3, 17, 64, 129, 576, 50000})
        for (int n : {1, 5}) {
            std::vector<float> x = randn((size_t)n * dim, seed++, 4.0f);
            // Large values (exp would overflow without the max shift) and
            // masked (-inf) entries.
            for (size_t i = 0; i < x.size(); i += 7)
                x[i] = 1000.0f + x[i];
            for (size_t i = 3; i < x.size(); i += 5)
                x[i] = -kInf;
            std::vector<double> want(x.size()), tol(x.size());
            for (int i = 0; i < n; i++) {
                const float *xi = &x[(size_t)i * dim];
                double mx = -INFINITY;
                for (int d = 0; d < dim; d++)
                    mx = std::max(mx, (double)xi[d]);
                double z = 0;
                for (int d = 0; d < dim; d++)
                    z += std::exp((double)xi[d] - mx);
                for (int d = 0; d < dim; d++) {
                    size_t o = (size_t)i * dim + d;
                    want[o] = mx == -INFINITY ? 1.0 / dim : std::exp((double)xi[d] - mx) / z;
                    // exp to a few ulps of its fp32 argument x - max (whose
                    // rounding moves p by |x - max| 2^-24 relatively), an
                    // fp32 sum of dim terms (relative dim 2^-24), a division.
                    double arg = mx == -INFINITY ? 0.0 : std::fabs((double)xi[d] - mx);
                    if (std::isinf(arg)) arg = 0.0;
                    tol[o] = want[o] * (dim + 8 + arg) * kEps32 + 1e-30;
                }
            }
            std::vector<float> fast = x, ref = x;
            ASSERT_EQ(cp_backend_softmax(be.get(), fast.data(), n, dim), CP_OK);
            ASSERT_EQ(cp_softmax_ref(ref.data(), n, dim), CP_OK);
            std::string what = "dim " + std::to_string(dim);
            ASSERT_TRUE(all_close(fast, want, tol, what + " fast"));
            ASSERT_TRUE(all_close(ref, want, tol, what + " ref"));
            for (size_t i = 3; i < x.size(); i += 5)
                if (dim > 1) {
                    ASSERT_EQ(fast[i], 0.0f);
                }
        }
    // A row of only -inf has no maximum to shift by: it becomes uniform.
    std::vector<float> row(10, -kInf);
    ASSERT_EQ(cp_backend_softmax(be.get(), row.data(), 1, 10), CP_OK);
    for (float v : row)
        EXPECT_FLOAT_EQ(v, 0.1f);
}

TEST(Elementwise, AddAndSwigluMatchFp64) {
    BackendPtr be = make_backend(3);
    uint32_t seed = 21;
    for (size_t n : {(size_t)1, (size_t)3, (size_t)17, (size_t)129, (size_t)100003}) {
        std::vector<float> a = randn(n, seed++, 4.0f), b = randn(n, seed++, 4.0f);
        std::vector<double> want_add(n), tol_add(n), want_sw(n), tol_sw(n);
        for (size_t i = 0; i < n; i++) {
            want_add[i] = (double)a[i] + b[i];
            tol_add[i] = std::fabs(want_add[i]) * kEps32; // one correctly rounded addition
            double g = a[i];
            want_sw[i] = g / (1.0 + std::exp(-g)) * b[i];
            // exp within a few ulps enters through 1/(1+e), then a division
            // and a product: 8 ulps of the result.
            tol_sw[i] = std::fabs(want_sw[i]) * 8 * kEps32 + 1e-30;
        }
        std::vector<float> y = poisoned(n), yr = poisoned(n);
        ASSERT_EQ(cp_backend_add(be.get(), y.data(), a.data(), b.data(), n), CP_OK);
        ASSERT_EQ(cp_add_ref(yr.data(), a.data(), b.data(), n), CP_OK);
        ASSERT_TRUE(all_close(y, want_add, tol_add, "add fast"));
        ASSERT_TRUE(bit_equal(y, yr, "add fast vs ref")); // both are one fp32 addition
        std::vector<float> s = poisoned(n), sr = poisoned(n);
        ASSERT_EQ(cp_backend_swiglu(be.get(), s.data(), a.data(), b.data(), n), CP_OK);
        ASSERT_EQ(cp_swiglu_ref(sr.data(), a.data(), b.data(), n), CP_OK);
        ASSERT_TRUE(all_close(s, want_sw, tol_sw, "swiglu fast"));
        ASSERT_TRUE(all_close(sr, want_sw, tol_sw, "swiglu ref"));
        // Aliasing allowed by the contract: y == a, out == gate.
        std::vector<float> a2 = a;
        ASSERT_EQ(cp_backend_add(be.get(), a2.data(), a2.data(), b.data(), n), CP_OK);
        ASSERT_TRUE(bit_equal(a2, y, "add in place"));
        std::vector<float> g2 = a;
        ASSERT_EQ(cp_backend_swiglu(be.get(), g2.data(), g2.data(), b.data(), n), CP_OK);
        ASSERT_TRUE(bit_equal(g2, s, "swiglu in place"));
    }
}

// ---------------------------------------------------------------------------
// embed, dequantize, quantize

TEST(Embed, RowsOfEveryTypeAndBadIds) {
    BackendPtr be = make_backend(3);
    for (cp_dtype type : kWeightTypes) {
        const int64_t bs = cp_dtype_block_size(type), dim = bs == 256 ? 512 : 96, rows = 50;
        std::vector<float> src = randn((size_t)(rows * dim), 31 + (uint32_t)type, 0.5f);
        const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(type);
        size_t row_bytes = cp_dtype_row_size(type, dim);
        std::vector<uint8_t> bytes(row_bytes * rows);
        for (int64_t r = 0; r < rows; r++)
            tr->from_float_ref(&src[r * dim], bytes.data() + r * row_bytes, dim);
        cp_tensor t = cp_tensor_2d(type, rows, dim, bytes.data());
        std::vector<int32_t> ids = {0, 49, 7, 7, 23, 1, 48, 30, 2, 11, 12, 13, 14, 15, 16, 17, 18};
        const int n = (int)ids.size();
        std::vector<float> out = poisoned((size_t)n * dim), ref = out;
        ASSERT_EQ(cp_backend_embed(be.get(), &t, ids.data(), n, out.data()), CP_OK)
            << cp_last_error();
        ASSERT_EQ(cp_embed_ref(&t, ids.data(), n, ref.data()), CP_OK);
        ASSERT_TRUE(bit_equal(out, ref, cp_dtype_name(type)));
        // Against the original values: exact for F32, otherwise within the
        // type's rounding: 2^-11 (F16) / 2^-8 (BF16) relative; for the block
        // types a loose 1/4 of the block's range (4-bit types step by
        // range/15; the point is catching wrong rows, which differ by O(1)).
        std::vector<double> want((size_t)n * dim), tol(want.size());
        for (int i = 0; i < n; i++) {
            for (int64_t d = 0; d < dim; d++) {
                double x = src[ids[i] * dim + d];
                want[i * dim + d] = x;
                if (type == CP_DTYPE_F32)
                    tol[i * dim + d] = 0.0;
                else if (type == CP_DTYPE_F16)
                    tol[i * dim + d] = std::fabs(x) / 2048.0 + 1e-7; // + subnormal step
                else if (type == CP_DTYPE_BF16)
                    tol[i * dim + d] = std::fabs(x) / 256.0;
                else {
                    int64_t b0 = d / bs * bs;
                    double lo = 1e30, hi = -1e30;
                    for (int64_t e = b0; e < b0 + bs; e++) {
                        lo = std::min(lo, (double)src[ids[i] * dim + e]);
                        hi = std::max(hi, (double)src[ids[i] * dim + e]);
                    }
                    // Symmetric types step by amax/8 even when the block's
                    // range is narrow.
                    tol[i * dim + d] = std::max(hi - lo, std::max(hi, -lo)) / 4.0;
                }
            }
        }
        ASSERT_TRUE(all_close(out, want, tol, std::string(cp_dtype_name(type)) + " vs source"));

        // dequantize a row range equals embed of those ids.
        std::vector<float> deq = poisoned((size_t)(5 * dim)), deq_ref = deq;
        ASSERT_EQ(cp_backend_dequantize(be.get(), &t, 11, 5, deq.data()), CP_OK);
        ASSERT_EQ(cp_dequantize_ref(&t, 11, 5, deq_ref.data()), CP_OK);
        ASSERT_TRUE(bit_equal(deq, deq_ref, "dequantize"));
        std::vector<float> emb5(out.begin() + 9 * dim, out.begin() + 14 * dim); // ids 11..15
        ASSERT_TRUE(bit_equal(deq, emb5, "dequantize vs embed"));

        // quantize equals the type's reference quantizer byte for byte.
        std::vector<uint8_t> q(bytes.size(), 0xAA);
        ASSERT_EQ(cp_backend_quantize(be.get(), type, src.data(), rows, dim, q.data()), CP_OK);
        EXPECT_EQ(q, bytes) << cp_dtype_name(type);

        // Ids outside the table are the caller's error.
        for (int32_t bad : {-1, 50, 1 << 30}) {
            std::vector<int32_t> bad_ids = {3, bad};
            EXPECT_EQ(cp_backend_embed(be.get(), &t, bad_ids.data(), 2, out.data()),
                      CP_ERR_INVALID_ARG);
            EXPECT_NE(std::string(cp_last_error_detail()).find("token id"), std::string::npos);
            EXPECT_EQ(cp_embed_ref(&t, bad_ids.data(), 2, out.data()), CP_ERR_INVALID_ARG);
        }
    }
}

// ---------------------------------------------------------------------------
// sample

int argmax_lowest(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

std::vector<int32_t> sample(cp_backend_t be, const std::vector<float> &logits, int n, int vocab,
                            cp_sample_params sp, const std::vector<float> &u) {
    std::vector<int32_t> out(n, -7);
    EXPECT_EQ(cp_backend_sample(be, logits.data(), n, vocab, &sp, u.data(), out.data()), CP_OK)
        << cp_last_error();
    return out;
}

std::vector<int32_t> sample_ref(const std::vector<float> &logits, int n, int vocab,
                                cp_sample_params sp, const std::vector<float> &u) {
    std::vector<int32_t> out(n, -7);
    EXPECT_EQ(cp_sample_ref(logits.data(), n, vocab, &sp, u.data(), out.data()), CP_OK);
    return out;
}

TEST(Sample, GreedyIsArgmaxLowestIndexOnTies) {
    BackendPtr be = make_backend(3);
    for (int vocab : {1, 3, 17, 129, 128256}) {
        const int n = 3;
        std::vector<float> l = randn((size_t)n * vocab, 40 + vocab);
        // Row 1: a tie for the maximum at two indices; row 2: all equal.
        if (vocab >= 3) {
            l[vocab + vocab / 2] = 50.0f;
            l[vocab + vocab - 1] = 50.0f;
        }
        std::fill(l.begin() + 2 * vocab, l.end(), 1.5f);
        std::vector<float> u = {0.3f, 0.9f, 0.0f};
        // a NaN temperature is greedy too (it once reached an unallocated
        // buffer in the reference)
        for (float temp : {0.0f, -1.0f, std::nanf("")}) {
            cp_sample_params sp{temp, 5, 0.5f, 0.1f}; // filters are ignored when greedy
            auto got = sample(be.get(), l, n, vocab, sp, u);
            for (int i = 0; i < n; i++)
                EXPECT_EQ(got[i], argmax_lowest(&l[(size_t)i * vocab], vocab)) << "vocab " << vocab;
            if (vocab >= 3) {
                EXPECT_EQ(got[1], vocab / 2);
            }
            EXPECT_EQ(got[2], 0);
            EXPECT_EQ(sample_ref(l, n, vocab, sp, u), got);
        }
    }
}

TEST(Sample, TopK1AndTinyTopPAreGreedy) {
    BackendPtr be = make_backend(3);
    const int vocab = 1000, n = 4;
    std::vector<float> l = randn((size_t)n * vocab, 77, 3.0f);
    for (float uu : {0.0f, 0.25f, 0.5f, 0.999f, 0.99999994f}) {
        std::vector<float> u(n, uu);
        auto a = sample(be.get(), l, n, vocab, {0.8f, 1, 1.0f, 0.0f}, u);
        auto b = sample(be.get(), l, n, vocab, {1.3f, 0, 1e-6f, 0.0f}, u);
        auto c = sample(be.get(), l, n, vocab, {1.0f, 0, 1.0f, 1.0f}, u); // min_p 1: only the max
        for (int i = 0; i < n; i++) {
            int g = argmax_lowest(&l[(size_t)i * vocab], vocab);
            EXPECT_EQ(a[i], g);
            EXPECT_EQ(b[i], g);
            EXPECT_EQ(c[i], g);
        }
    }
}

// Expected picks for a uniform grid u_j = (j + 0.5) / G: the probabilities
// are computed in fp64, filtered like the contract says, laid out in
// descending order (lower id first on ties) as CDF intervals, and the grid
// points falling in each interval are counted exactly.
std::vector<int> expected_counts(const float *l, int vocab, cp_sample_params sp, int G) {
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::vector<double> z(vocab);
    for (int i = 0; i < vocab; i++)
        z[i] = (double)l[i] / sp.temperature;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
    int kept = vocab;
    if (sp.top_k > 0 && sp.top_k < kept) kept = sp.top_k;
    std::vector<double> p(kept);
    double total = 0;
    for (int j = 0; j < kept; j++)
        total += p[j] = std::exp(z[order[j]] - z[order[0]]);
    if (sp.top_p < 1.0f) {
        double cum = 0;
        int j = 0;
        while (j < kept) {
            cum += p[j++] / total;
            if (cum >= sp.top_p) break;
        }
        kept = j;
    }
    if (sp.min_p > 0.0f) {
        int j = 1;
        while (j < kept && p[j] >= sp.min_p * p[0])
            j++;
        kept = j;
    }
    double zk = 0;
    for (int j = 0; j < kept; j++)
        zk += p[j];
    std::vector<int> counts(vocab, 0);
    double lo = 0;
    for (int j = 0; j < kept; j++) {
        double hi = lo + p[j] / zk;
        // grid points with lo <= u < hi: (j+0.5)/G in [lo, hi)
        int a = (int)std::ceil(lo * G - 0.5), b = (int)std::ceil(hi * G - 0.5);
        if (j == kept - 1) b = G;
        counts[order[j]] = std::max(0, std::min(b, G) - std::max(a, 0));
        lo = hi;
    }
    return counts;
}

// Ties at the top-k boundary keep the lower ids; every kept token is
// reachable and nothing else is.
TEST(Sample, TopKTiesKeepLowerIds) {
    BackendPtr be = make_backend(2);
    const int vocab = 12, G = 600;
    const std::vector<float> l = {1.0f, 5.0f, 3.0f,  3.0f, 3.0f, 0.0f,
                                  5.0f, 3.0f, -2.0f, 3.0f, 4.0f, 2.0f};
    // Sorted: 5 (ids 1, 6), 4 (id 10), 3 (ids 2, 3, 4, 7, 9) ...; top_k 5
    // keeps 1, 6, 10, 2, 3.
    std::vector<float> rows((size_t)G * vocab), u(G);
    for (int j = 0; j < G; j++) {
        std::copy(l.begin(), l.end(), rows.begin() + (size_t)j * vocab);
        u[j] = (float)((j + 0.5) / G);
    }
    cp_sample_params sp{1.0f, 5, 1.0f, 0.0f};
    auto got = sample(be.get(), rows, G, vocab, sp, u);
    std::vector<int> counts(vocab, 0);
    for (int32_t t : got)
        counts[t]++;
    std::vector<int> want = expected_counts(l.data(), vocab, sp, G);
    for (int i = 0; i < vocab; i++) {
        bool kept = i == 1 || i == 6 || i == 10 || i == 2 || i == 3;
        EXPECT_EQ(counts[i] > 0, kept) << "id " << i;
        EXPECT_NEAR(counts[i], want[i], 1) << "id " << i;
    }
    EXPECT_EQ(sample_ref(rows, G, vocab, sp, u), got);
}

TEST(Sample, GridFrequenciesEqualFilteredSoftmax) {
    BackendPtr be = make_backend(3);
    const int G = 2000;
    const std::vector<cp_sample_params> params = {
        {1.0f, 0, 1.0f, 0.0f},  {1.0f, 5, 1.0f, 0.0f},   {1.0f, 0, 0.9f, 0.0f},
        {1.0f, 0, 1.0f, 0.05f}, {0.7f, 10, 0.8f, 0.02f}, {1.5f, 40, 0.95f, 0.0f},
    };
    for (int vocab : {17, 129}) {
        std::vector<float> l = randn(vocab, 500 + vocab, 2.0f);
        l[3] = l[9]; // a tie inside the distribution
        for (const cp_sample_params &sp : params) {
            std::vector<int> want = expected_counts(l.data(), vocab, sp, G);
            // One call samples G rows of the same logits with the grid's u.
            std::vector<float> rows((size_t)G * vocab), u(G);
            for (int j = 0; j < G; j++) {
                std::copy(l.begin(), l.end(), rows.begin() + (size_t)j * vocab);
                u[j] = (float)((j + 0.5) / G);
            }
            auto got = sample(be.get(), rows, G, vocab, sp, u);
            EXPECT_EQ(sample_ref(rows, G, vocab, sp, u), got);
            std::vector<int> counts(vocab, 0);
            for (int32_t t : got) {
                ASSERT_GE(t, 0);
                ASSERT_LT(t, vocab);
                counts[t]++;
            }
            // The backend's probabilities are fp32 (relative error ~1e-7), so
            // a grid point lying within ~1e-7 of a CDF boundary may fall on
            // the other side: allow one point per token, and none for
            // tokens the filters removed.
            for (int i = 0; i < vocab; i++)
                EXPECT_NEAR(counts[i], want[i], 1)
                    << "token " << i << " vocab " << vocab << " top_k " << sp.top_k << " top_p "
                    << sp.top_p << " min_p " << sp.min_p;
        }
    }
}

TEST(Sample, FastEqualsReferenceAndIsDeterministic) {
    BackendPtr be1 = make_backend(1), be3 = make_backend(3);
    std::mt19937 rng(4242);
    std::uniform_real_distribution<float> U(0.0f, 1.0f);
    const std::vector<cp_sample_params> params = {
        {1.0f, 0, 1.0f, 0.0f}, {0.6f, 40, 0.95f, 0.05f}, {1.0f, 0, 0.9f, 0.0f},
        {0.9f, 0, 1.0f, 0.1f}, {1.2f, 1000, 1.0f, 0.0f}, {1.0f, 128256, 0.5f, 0.0f},
    };
    for (int vocab : {3, 129, 128256}) {
        const int n = 5;
        std::vector<float> l = randn((size_t)n * vocab, 900 + vocab, 3.0f);
        // Masked tokens and a row where only one token is finite.
        for (size_t i = 0; i < l.size(); i += 11)
            l[i] = -kInf;
        std::fill(l.begin() + 4 * (size_t)vocab, l.end(), -kInf);
        l[4 * (size_t)vocab + vocab / 2] = 0.0f;
        for (const cp_sample_params &sp : params) {
            std::vector<float> u(n);
            for (float &x : u)
                x = U(rng);
            auto a = sample(be3.get(), l, n, vocab, sp, u);
            auto b = sample(be1.get(), l, n, vocab, sp, u);
            auto again = sample(be3.get(), l, n, vocab, sp, u);
            EXPECT_EQ(a, b);
            EXPECT_EQ(a, again);
            EXPECT_EQ(a, sample_ref(l, n, vocab, sp, u))
                << "vocab " << vocab << " top_k " << sp.top_k;
            EXPECT_EQ(a[4], vocab / 2);
            for (int i = 0; i < n; i++)
                EXPECT_NE(l[(size_t)i * vocab + a[i]], -kInf);
        }
    }
}

// Fewer rows than threads: whichever thread picks a row up needs its own
// scratch (large vocabulary, so an undersized workspace would overflow).
TEST(Sample, FewerRowsThanThreads) {
    BackendPtr be = make_backend(3);
    const int vocab = 128256, n = 2;
    std::vector<float> l = randn((size_t)n * vocab, 31337, 2.0f), u = {0.25f, 0.75f};
    for (int rep = 0; rep < 20; rep++) {
        cp_sample_params sp{1.0f, 0, 0.9f, 0.0f};
        EXPECT_EQ(sample(be.get(), l, n, vocab, sp, u), sample_ref(l, n, vocab, sp, u));
    }
}

// ---------------------------------------------------------------------------
// error paths of the public wrappers and the backend

TEST(Errors, AMessageMayQuoteThePreviousOne) {
    CP_ERROR(CP_ERR_TIMEOUT, "broadcast timed out after %d ms waiting for rank %d", 5000, 2);
    std::string first = cp_last_error();
    cp_status st = CP_ERROR(CP_ERR_TIMEOUT, "rank %d: no step in time (%s)", 3, cp_last_error());
    EXPECT_EQ(st, CP_ERR_TIMEOUT);
    std::string msg = cp_last_error_detail();
    EXPECT_EQ(msg, "rank 3: no step in time (" + first + ")");
    cp_clear_error();
}

TEST(Errors, NullPointersBadShapesAndDtypes) {
    BackendPtr be = make_backend(2);
    cp_backend_t b = be.get();
    std::vector<float> buf(4096);
    float *f = buf.data();
    auto expect_err = [](cp_status st, cp_status want, const char *word) {
        EXPECT_EQ(st, want) << cp_status_str(st);
        std::string msg = cp_last_error_detail();
        EXPECT_FALSE(msg.empty());
        EXPECT_NE(msg.find(word), std::string::npos) << msg;
    };
    std::vector<uint8_t> wbytes(4096);
    cp_tensor w = cp_tensor_2d(CP_DTYPE_F32, 4, 32, wbytes.data());
    expect_err(cp_backend_matmul(b, nullptr, f, 1, f, nullptr), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_matmul(b, &w, nullptr, 1, f, nullptr), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_matmul(b, &w, f, -1, f, nullptr), CP_ERR_INVALID_ARG, "negative");
    cp_tensor i32 = cp_tensor_2d(CP_DTYPE_I32, 4, 32, wbytes.data());
    expect_err(cp_backend_matmul(b, &i32, f, 1, f, nullptr), CP_ERR_INVALID_ARG, "I32");
    cp_tensor odd = cp_tensor_2d(CP_DTYPE_Q8_0, 4, 32, wbytes.data());
    odd.ne[0] = 40;
    expect_err(cp_backend_matmul(b, &odd, f, 1, f, nullptr), CP_ERR_INVALID_ARG, "block");
    cp_tensor unk = w;
    unk.dtype = (cp_dtype)37;
    expect_err(cp_backend_matmul(b, &unk, f, 1, f, nullptr), CP_ERR_INVALID_ARG, "unknown dtype");
    cp_tensor three_d = w;
    three_d.ne[2] = 2;
    expect_err(cp_backend_matmul(b, &three_d, f, 1, f, nullptr), CP_ERR_INVALID_ARG, "2-D");

    expect_err(cp_backend_rmsnorm(b, f, f, f, 1, 0, 1e-5f), CP_ERR_INVALID_ARG, "bad shape");
    expect_err(cp_backend_rmsnorm(b, f, nullptr, f, 1, 4, 1e-5f), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_softmax(b, nullptr, 1, 4), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_softmax(b, f, 1, 0), CP_ERR_INVALID_ARG, "bad shape");
    expect_err(cp_backend_add(b, f, nullptr, f, 4), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_swiglu(b, f, f, nullptr, 4), CP_ERR_INVALID_ARG, "NULL");

    int32_t pos = 0;
    cp_rope_params rp{CP_ROPE_HALF, 8, 9, 10000.0f, 1.0f, nullptr};
    expect_err(cp_backend_rope(b, f, &pos, 1, 1, &rp), CP_ERR_INVALID_ARG, "rot_dim");
    rp.rot_dim = 8;
    rp.mode = (cp_rope_mode)5;
    expect_err(cp_backend_rope(b, f, &pos, 1, 1, &rp), CP_ERR_INVALID_ARG, "mode");
    rp.mode = CP_ROPE_HALF;
    expect_err(cp_backend_rope(b, f, nullptr, 1, 1, &rp), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_rope(b, f, &pos, 1, 1, nullptr), CP_ERR_INVALID_ARG, "NULL");

    int32_t seq = 0, table = 0;
    cp_attn_params p{};
    p.n_tok = 1;
    p.n_head = 9;
    p.n_head_kv = 2;
    p.head_dim = 4;
    p.block_size = 16;
    p.max_blocks = 1;
    p.scale = 0.5f;
    p.kv_dtype = CP_DTYPE_F32;
    p.seq_of_tok = &seq;
    p.pos_of_tok = &pos;
    p.block_tables = &table;
    expect_err(cp_backend_attention(b, &p, f, f, f, f), CP_ERR_INVALID_ARG, "multiple");
    p.n_head_kv = 3;
    p.kv_dtype = CP_DTYPE_Q8_0;
    expect_err(cp_backend_attention(b, &p, f, f, f, f), CP_ERR_INVALID_ARG, "Q8_0");
    p.kv_dtype = CP_DTYPE_F16;
    expect_err(cp_backend_kv_store(b, &p, f, f, nullptr, f), CP_ERR_INVALID_ARG, "NULL");
    p.block_tables = nullptr;
    expect_err(cp_backend_attention(b, &p, f, f, f, f), CP_ERR_INVALID_ARG, "token tables");
    expect_err(cp_backend_attention(b, nullptr, f, f, f, f), CP_ERR_INVALID_ARG, "NULL");

    int32_t id = 0;
    expect_err(cp_backend_embed(b, &w, &id, 1, nullptr), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_dequantize(b, &w, 3, 2, f), CP_ERR_INVALID_ARG, "outside");
    expect_err(cp_backend_quantize(b, CP_DTYPE_Q4_0, f, 1, 40, wbytes.data()), CP_ERR_INVALID_ARG,
               "multiple");
    expect_err(cp_backend_quantize(b, CP_DTYPE_Q8_K, f, 1, 256, wbytes.data()), CP_ERR_INVALID_ARG,
               "not supported");

    cp_sample_params sp{1.0f, 0, 1.0f, 0.0f};
    int32_t out = 0;
    expect_err(cp_backend_sample(b, f, 1, 4, nullptr, f, &out), CP_ERR_INVALID_ARG, "NULL");
    expect_err(cp_backend_sample(b, f, 1, 0, &sp, f, &out), CP_ERR_INVALID_ARG, "bad shape");
    expect_err(cp_backend_sample(b, f, 1, 4, &sp, nullptr, &out), CP_ERR_INVALID_ARG, "NULL");

    expect_err(cp_backend_cpu_init(1, nullptr), CP_ERR_INVALID_ARG, "NULL");
}

} // namespace

// Decode at long context takes the split-context path (ranges of 256
// positions merged afterwards); it must agree with the one-pass reference
// and with fp64, for one token and for a small batch of tokens.
TEST(Attention, LongContextDecodeSplitsAndMerges) {
    for (cp_dtype kvt : {CP_DTYPE_F32, CP_DTYPE_F16})
        for (auto heads : {std::pair<int, int>{9, 3}, std::pair<int, int>{8, 8}}) {
            const int nh = heads.first, nkv = heads.second, hd = 64, bs = 16, len = 1100;
            const int kv_dim = nkv * hd, nblk = (len + bs - 1) / bs;
            std::mt19937 rng(5);
            std::normal_distribution<float> nd(0.0f, 1.0f);
            std::vector<float> K((size_t)len * kv_dim), V(K.size());
            for (auto &x : K) x = nd(rng);
            for (auto &x : V) x = nd(rng);
            std::vector<int32_t> table(nblk);
            for (int b = 0; b < nblk; b++) table[b] = (b * 37) % nblk;  // shuffled physical blocks
            size_t es = cp_dtype_type_size(kvt);
            std::vector<uint8_t> kc((size_t)nblk * bs * kv_dim * es), vc(kc.size());
            cp_backend_t be;
            ASSERT_EQ(cp_backend_cpu_init(2, &be), CP_OK);
            std::vector<int32_t> pos(len), seq(len, 0);
            for (int i = 0; i < len; i++) pos[i] = i;
            cp_attn_params p = {};
            p.n_tok = len;
            p.n_head = nh;
            p.n_head_kv = nkv;
            p.head_dim = hd;
            p.block_size = bs;
            p.max_blocks = nblk;
            p.scale = 0.125f;
            p.kv_dtype = kvt;
            p.seq_of_tok = seq.data();
            p.pos_of_tok = pos.data();
            p.block_tables = table.data();
            ASSERT_EQ(cp_backend_kv_store(be, &p, K.data(), V.data(), kc.data(), vc.data()), CP_OK);
            // the cache's own (possibly fp16-rounded) values for the fp64 check
            std::vector<float> Kr(K.size()), Vr(V.size());
            for (size_t i = 0; i < K.size(); i++) {
                Kr[i] = kvt == CP_DTYPE_F16 ? cp_fp16_to_fp32(cp_fp32_to_fp16(K[i])) : K[i];
                Vr[i] = kvt == CP_DTYPE_F16 ? cp_fp16_to_fp32(cp_fp32_to_fp16(V[i])) : V[i];
            }
            for (std::vector<int32_t> qpos : {std::vector<int32_t>{len - 1}, std::vector<int32_t>{700, len - 1}}) {
                const int nt = (int)qpos.size();
                std::vector<float> q((size_t)nt * nh * hd), out(q.size(), NAN), ref(q.size(), NAN);
                for (auto &x : q) x = nd(rng);
                std::vector<int32_t> qseq(nt, 0);
                cp_attn_params d = p;
                d.n_tok = nt;
                d.pos_of_tok = qpos.data();
                d.seq_of_tok = qseq.data();
                ASSERT_EQ(cp_backend_attention(be, &d, q.data(), kc.data(), vc.data(), out.data()), CP_OK);
                ASSERT_EQ(cp_attention_ref(&d, q.data(), kc.data(), vc.data(), ref.data()), CP_OK);
                double worst_ref = 0, worst_64 = 0;
                for (int t = 0; t < nt; t++)
                    for (int h = 0; h < nh; h++) {
                        int kh = h / (nh / nkv);
                        const float *qh = &q[((size_t)t * nh + h) * hd];
                        std::vector<double> sc(qpos[t] + 1);
                        double mx = -1e300, sum = 0;
                        for (int j = 0; j <= qpos[t]; j++) {
                            double s = 0;
                            for (int i = 0; i < hd; i++) s += (double)qh[i] * Kr[(size_t)j * kv_dim + kh * hd + i];
                            sc[j] = s * 0.125;
                            mx = std::max(mx, sc[j]);
                        }
                        for (auto &e : sc) sum += (e = std::exp(e - mx));
                        for (int i = 0; i < hd; i++) {
                            double o = 0;
                            for (int j = 0; j <= qpos[t]; j++) o += sc[j] / sum * Vr[(size_t)j * kv_dim + kh * hd + i];
                            size_t at = ((size_t)t * nh + h) * hd + i;
                            worst_64 = std::max(worst_64, std::fabs(out[at] - o));
                            worst_ref = std::max(worst_ref, (double)std::fabs(out[at] - ref[at]));
                        }
                    }
                // outputs are convex combinations of values of magnitude ~1:
                // fp32 accumulation over 1100 positions stays within 1e-5
                EXPECT_LT(worst_64, 1e-5) << cp_dtype_name(kvt) << " heads " << nh << "/" << nkv << " tokens " << nt;
                EXPECT_LT(worst_ref, 1e-5) << cp_dtype_name(kvt) << " heads " << nh << "/" << nkv << " tokens " << nt;
            }
            cp_backend_free(be);
        }
}
