/* test_quants_sparse.cc - the 2:4 sparse weight type S24_Q8: geometry, the
 * masks the quantizer chooses (exactly 2 of every 4, the largest), rows that
 * are already 2:4 sparse keeping their nonzeros, dequantization error
 * bounds, dot products (reference and AVX2) against fp64 of the decoded
 * operands, and the CPU backend's matmul, embedding and slices. */
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cp_backend.h"
#include "cp_dtype.h"
#include "cpu/cpu_quants.h"
#include "cpu/quants_sparse.h"

namespace {

constexpr cp_dtype kS24 = CP_DTYPE_S24_Q8;
constexpr double kU32 = 0x1p-24; /* unit roundoff of fp32 */

struct BackendFree {
    void operator()(cp_backend_t be) const { cp_backend_free(be); }
};
using BackendPtr = std::unique_ptr<std::remove_pointer_t<cp_backend_t>, BackendFree>;

BackendPtr cpu_backend(int threads) {
    cp_backend_t be = nullptr;
    EXPECT_EQ(cp_backend_cpu_init(threads, &be), CP_OK);
    return BackendPtr(be);
}

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, sigma);
    std::vector<float> v((size_t)n);
    for (auto &x : v) x = nd(rng);
    return v;
}

const cp_cpu_type_traits *s24() { return cp_cpu_get_type_traits(kS24); }
const cp_cpu_type_traits *q8() { return cp_cpu_get_type_traits(CP_DTYPE_Q8_0); }

std::vector<uint8_t> quantize(const float *x, int64_t n) {
    std::vector<uint8_t> q(cp_dtype_row_size(kS24, n), 0xcd); /* stale bytes must not survive */
    s24()->from_float(x, q.data(), n);
    return q;
}

std::vector<float> decode(const cp_cpu_type_traits *tr, const void *q, int64_t n) {
    std::vector<float> f((size_t)n);
    tr->to_float(q, f.data(), n);
    return f;
}

cp_block_s24_q8 block(const std::vector<uint8_t> &row, int64_t b) {
    cp_block_s24_q8 blk;
    std::memcpy(&blk, row.data() + (size_t)b * sizeof blk, sizeof blk);
    return blk;
}

bool kept(const cp_block_s24_q8 &b, int k) { return (b.mask >> k) & 1u; }

/* Q8_0 bytes of an activation row (the fast quantizer gives the
 * reference's bytes; test_quants.cc checks that). */
std::vector<uint8_t> quantize_q8_0(const float *x, int64_t n) {
    std::vector<uint8_t> q(cp_dtype_row_size(CP_DTYPE_Q8_0, n));
    q8()->from_float(x, q.data(), n);
    return q;
}

/* The 2 indices of largest |x| in a group of 4, the lower one on ties. */
uint32_t expected_group_mask(const float *x) {
    int idx[4] = {0, 1, 2, 3};
    std::stable_sort(idx, idx + 4, [&](int a, int b) { return std::fabs(x[a]) > std::fabs(x[b]); });
    return (1u << idx[0]) | (1u << idx[1]);
}

/* The error of one kept element: q = round(x / d) with the quantizer's
 * scale d = amax / 127 is within d/2 of x / d, and the row decodes q * d16
 * (d16 = d rounded to fp16) exactly in fp32 (q has 8 bits, d16 11), so
 * |x - q d16| <= d/2 + |q| |d - d16|, plus fp32 rounding of x / d. */
double kept_bound(double amax, const cp_block_s24_q8 &b, int j) {
    const double d = amax / 127.0, d16 = cp_fp16_to_fp32(b.d);
    return (d / 2 + std::abs((int)b.qs[j]) * std::fabs(d - d16)) * (1 + 1e-6) + 1e-30;
}

/* ---- geometry ----------------------------------------------------------- */

TEST(SparseQuants, Geometry) {
    EXPECT_EQ(CP_DTYPE_S24_Q8, 44);
    EXPECT_STREQ(cp_dtype_name(kS24), "S24_Q8");
    EXPECT_TRUE(cp_dtype_known((int)kS24));
    EXPECT_TRUE(cp_dtype_is_quantized(kS24));
    EXPECT_FALSE(cp_dtype_is_gguf((int)kS24)) << "GGUF files must not claim our types";
    EXPECT_GE((int)kS24, CP_DTYPE_FIRST_OWN);
    EXPECT_LT((int)kS24, CP_DTYPE_COUNT);
    EXPECT_EQ(cp_dtype_block_size(kS24), 32);
    EXPECT_EQ(cp_dtype_type_size(kS24), 24u);
    EXPECT_EQ(cp_dtype_row_extra(kS24), 0u);
    EXPECT_EQ(cp_dtype_row_size(kS24, 576), 18u * 24u);
    EXPECT_EQ(cp_dtype_row_size(kS24, 4096), 128u * 24u);
    EXPECT_EQ(cp_dtype_row_size(kS24, 48), 0u) << "48 is not whole blocks";
    EXPECT_EQ(sizeof(cp_block_s24_q8), 24u);
    EXPECT_EQ(offsetof(cp_block_s24_q8, d), 0u);
    EXPECT_EQ(offsetof(cp_block_s24_q8, pad), 2u);
    EXPECT_EQ(offsetof(cp_block_s24_q8, mask), 4u);
    EXPECT_EQ(offsetof(cp_block_s24_q8, qs), 8u);
    const cp_cpu_type_traits *tr = s24();
    ASSERT_NE(tr, nullptr);
    EXPECT_EQ(tr->type, kS24);
    EXPECT_EQ(tr->vec_dot_type, CP_DTYPE_Q8_0) << "multiplies as Q8_0 weights do";
    EXPECT_NE(tr->to_float, nullptr);
    EXPECT_NE(tr->from_float_ref, nullptr);
    EXPECT_NE(tr->vec_dot_ref, nullptr);
    const char *force = std::getenv("CP_CPU_FORCE_REF");
    if (cp_cpu_has_avx2() && !(force && force[0] && std::strcmp(force, "0") != 0)) {
        EXPECT_NE(tr->vec_dot, tr->vec_dot_ref) << "the AVX2 dot product is installed";
        EXPECT_NE(cp_cpu_s24_q8_repack(), nullptr) << "and its packed form for batches";
    }
    auto be = cpu_backend(1);
    EXPECT_TRUE(cp_backend_supports(be.get(), kS24));
}

/* ---- masks -------------------------------------------------------------- */

/* Random rows, and rows of few distinct values (ties everywhere). */
std::vector<float> test_row(int64_t n, uint32_t seed, bool ties) {
    auto x = gaussian(n, seed);
    if (ties) {
        std::mt19937 rng(seed);
        for (auto &v : x) v = (float)((int)(rng() % 5) - 2); /* -2..2 */
    }
    return x;
}

TEST(SparseQuants, MaskValidAndKeepsTheLargestTwo) {
    for (int64_t n : {32, 96, 576, 4096})
        for (bool ties : {false, true})
            for (uint32_t seed = 1; seed <= 3; seed++) {
                SCOPED_TRACE("n=" + std::to_string(n) + " ties=" + std::to_string(ties) + " seed=" + std::to_string(seed));
                const auto x = test_row(n, seed * 101 + (uint32_t)n, ties);
                const auto q = quantize(x.data(), n);
                for (int64_t b = 0; b < n / 32; b++) {
                    const cp_block_s24_q8 blk = block(q, b);
                    ASSERT_EQ(blk.pad, 0) << "block " << b;
                    for (int g = 0; g < 8; g++) {
                        const uint32_t nib = (blk.mask >> (4 * g)) & 15u;
                        ASSERT_EQ(__builtin_popcount(nib), 2) << "block " << b << " group " << g;
                        ASSERT_EQ(nib, expected_group_mask(x.data() + 32 * b + 4 * g))
                            << "block " << b << " group " << g;
                    }
                }
            }
}

TEST(SparseQuants, ZeroAndTinyRows) {
    const int64_t n = 128;
    std::vector<float> z((size_t)n, 0.0f);
    auto q = quantize(z.data(), n);
    for (int64_t b = 0; b < n / 32; b++) {
        const cp_block_s24_q8 blk = block(q, b);
        EXPECT_EQ(blk.mask, 0x33333333u) << "ties keep the lower indices";
        EXPECT_EQ(blk.d, 0);
        EXPECT_EQ(blk.pad, 0);
        for (int8_t c : blk.qs) EXPECT_EQ(c, 0);
    }
    for (float v : decode(s24(), q.data(), n)) EXPECT_EQ(v, 0.0f);
    /* below fp16's smallest scale: zeros, with a valid mask */
    auto t = gaussian(n, 5, 1e-9f);
    q = quantize(t.data(), n);
    for (float v : decode(s24(), q.data(), n)) EXPECT_EQ(v, 0.0f);
    for (int64_t b = 0; b < n / 32; b++)
        for (int g = 0; g < 8; g++) EXPECT_EQ(__builtin_popcount((block(q, b).mask >> (4 * g)) & 15u), 2);
}

/* ---- already sparse rows ------------------------------------------------ */

TEST(SparseQuants, SparseRowsKeepTheirNonzeros) {
    std::mt19937 rng(9);
    for (int64_t n : {32, 576, 1536}) {
        SCOPED_TRACE("n=" + std::to_string(n));
        /* per group 0, 1 or 2 nonzeros at random places, some of them tiny
         * next to the block's largest (they must keep their place) */
        auto x = gaussian(n, 700 + (uint32_t)n);
        for (int64_t g = 0; g < n / 4; g++) {
            const int keep = (int)(rng() % 3);
            int pos[4] = {0, 1, 2, 3};
            std::shuffle(pos, pos + 4, rng);
            for (int e = keep; e < 4; e++) x[(size_t)(4 * g + pos[e])] = 0.0f;
            if (keep && rng() % 4 == 0) x[(size_t)(4 * g + pos[0])] *= 1e-3f;
        }
        const auto q = quantize(x.data(), n);
        const auto y = decode(s24(), q.data(), n);
        for (int64_t b = 0; b < n / 32; b++) {
            const cp_block_s24_q8 blk = block(q, b);
            double amax = 0;
            for (int k = 0; k < 32; k++) amax = std::max(amax, (double)std::fabs(x[(size_t)(32 * b + k)]));
            int j = 0;
            for (int k = 0; k < 32; k++) {
                const size_t i = (size_t)(32 * b + k);
                if (x[i] != 0.0f) ASSERT_TRUE(kept(blk, k)) << "nonzero element " << i << " was dropped";
                if (!kept(blk, k)) {
                    ASSERT_EQ(y[i], 0.0f);
                    continue;
                }
                ASSERT_LE(std::fabs((double)y[i] - x[i]), kept_bound(amax, blk, j)) << "element " << i;
                j++;
            }
            ASSERT_EQ(j, 16);
        }
    }
}

/* ---- dequantize(quantize(x)) -------------------------------------------- */

TEST(SparseQuants, RoundTripErrorBounds) {
    for (int64_t n : {32, 96, 576, 1536, 4096}) {
        SCOPED_TRACE("n=" + std::to_string(n));
        auto x = gaussian(n, 300 + (uint32_t)n);
        x[(size_t)n / 3] = 6.5f; /* an outlier */
        const auto q = quantize(x.data(), n);
        const auto y = decode(s24(), q.data(), n);
        for (int64_t b = 0; b < n / 32; b++) {
            const cp_block_s24_q8 blk = block(q, b);
            double amax = 0;
            for (int k = 0; k < 32; k++)
                if (kept(blk, k)) amax = std::max(amax, (double)std::fabs(x[(size_t)(32 * b + k)]));
            int j = 0;
            for (int k = 0; k < 32; k++) {
                const size_t i = (size_t)(32 * b + k);
                if (!kept(blk, k)) {
                    ASSERT_EQ(y[i], 0.0f) << "dropped element " << i;
                    continue;
                }
                ASSERT_EQ(y[i], (float)blk.qs[j] * cp_fp16_to_fp32(blk.d)) << "decoding is exact";
                ASSERT_LE(std::fabs((double)y[i] - x[i]), kept_bound(amax, blk, j)) << "element " << i;
                j++;
            }
        }
        /* the backend's quantize gives the same bytes, rows at their strides */
        auto be = cpu_backend(2);
        std::vector<uint8_t> two(2 * q.size());
        std::vector<float> xx(x);
        xx.insert(xx.end(), x.begin(), x.end());
        ASSERT_EQ(cp_backend_quantize(be.get(), kS24, xx.data(), 2, n, two.data()), CP_OK);
        EXPECT_TRUE(std::equal(q.begin(), q.end(), two.begin()));
        EXPECT_TRUE(std::equal(q.begin(), q.end(), two.begin() + (ptrdiff_t)q.size()));
    }
}

/* S24_Q8 of x, expanded to Q8_0, is Q8_0 of x with the dropped elements set
 * to 0: the two types do the same arithmetic on a 2:4 pruned matrix. */
TEST(SparseQuants, ExpansionIsQ8_0OfThePrunedRow) {
    const int64_t n = 1536;
    const auto x = gaussian(n, 42);
    const auto q = quantize(x.data(), n);
    std::vector<float> pruned(x);
    for (int64_t b = 0; b < n / 32; b++)
        for (int k = 0; k < 32; k++)
            if (!kept(block(q, b), k)) pruned[(size_t)(32 * b + k)] = 0.0f;
    std::vector<uint8_t> want(cp_dtype_row_size(CP_DTYPE_Q8_0, n)), got(want.size());
    q8()->from_float_ref(pruned.data(), want.data(), n);
    cp_cpu_s24_q8_to_q8_0(q.data(), got.data(), n);
    EXPECT_EQ(got, want);
    /* and S24_Q8 of the pruned row is the same row */
    EXPECT_EQ(quantize(pruned.data(), n), q);
}

/* ---- dot products ------------------------------------------------------- */

/* Decoded weights and activations are exact in fp32 (8-bit codes times
 * 11-bit fp16 scales), so their fp64 dot is exact up to 2^-53. The kernels
 * sum each block (the AVX2 one: each 4-element run of a block pair) exactly
 * in int32, then round twice (d * d_act, then the fused multiply-add) and
 * accumulate at most nb terms in one fp32 sum (the AVX2 kernel: 16 lanes,
 * then a reduction of 4 steps): |got - want| <= (nb + 8) u sum|x_j y_j|. */
double dot_tolerance(int64_t n, double sum_abs) { return ((double)(n / 32) + 8) * kU32 * sum_abs + 1e-30; }

struct Exact {
    double dot, sum_abs;
};
Exact exact_dot(const std::vector<uint8_t> &w, const std::vector<uint8_t> &a, int64_t n) {
    const auto wd = decode(s24(), w.data(), n), ad = decode(q8(), a.data(), n);
    Exact e{0, 0};
    for (int64_t i = 0; i < n; i++) {
        e.dot += (double)wd[i] * ad[i];
        e.sum_abs += std::fabs((double)wd[i] * ad[i]);
    }
    return e;
}

void check_dot(const std::vector<uint8_t> &w, const std::vector<uint8_t> &a, int64_t n) {
    const Exact e = exact_dot(w, a, n);
    float ref = NAN, fast = NAN;
    s24()->vec_dot_ref(n, &ref, w.data(), a.data());
    s24()->vec_dot(n, &fast, w.data(), a.data());
    EXPECT_NEAR(ref, e.dot, dot_tolerance(n, e.sum_abs)) << "reference";
    EXPECT_NEAR(fast, e.dot, dot_tolerance(n, e.sum_abs)) << "fast (" << cp_cpu_simd_level() << ")";
    /* the reference is Q8_0's on the expanded row, bit for bit */
    std::vector<uint8_t> wx(cp_dtype_row_size(CP_DTYPE_Q8_0, n));
    cp_cpu_s24_q8_to_q8_0(w.data(), wx.data(), n);
    float qref = NAN;
    q8()->vec_dot_ref(n, &qref, wx.data(), a.data());
    EXPECT_EQ(ref, qref);
    /* so does the two-row kernel of decode, for each row */
    if (s24()->vec_dot2) {
        std::vector<uint8_t> w2(w); /* another row: the blocks rotated by one */
        std::rotate(w2.begin(), w2.begin() + sizeof(cp_block_s24_q8), w2.end());
        float two[2] = {NAN, NAN}, other = NAN;
        s24()->vec_dot2(n, two, w.data(), w2.data(), a.data());
        s24()->vec_dot(n, &other, w2.data(), a.data());
        EXPECT_EQ(two[0], fast);
        EXPECT_EQ(two[1], other);
    }
    /* the packed form batched matmuls use gives the fast kernel's bits */
    if (const cp_cpu_s24_repack *rp = cp_cpu_s24_q8_repack()) {
        std::vector<uint8_t> packed(rp->row_size(n) + 1, 0xcd);
        rp->pack(w.data(), packed.data(), n);
        EXPECT_EQ(packed.back(), 0xcd) << "pack wrote past row_size";
        float p = NAN;
        rp->vec_dot(n, &p, packed.data(), a.data());
        EXPECT_EQ(p, fast);
        /* and so do its rows against several activation rows at once (4 at
         * a time, then one by one); outputs at a stride */
        const int ny = 6;
        std::vector<uint8_t> ys;
        for (int i = 0; i < ny; i++) ys.insert(ys.end(), a.begin(), a.end());
        std::vector<float> out(2 * ny, NAN);
        rp->vec_dot_rows(n, out.data(), 2, packed.data(), ys.data(), a.size(), ny);
        for (int i = 0; i < ny; i++) EXPECT_EQ(out[(size_t)(2 * i)], fast) << "activation row " << i;
    }
}

class SparseQuantsVecDot : public testing::TestWithParam<int64_t> {};

TEST_P(SparseQuantsVecDot, QuantizedRows) {
    const int64_t n = GetParam();
    auto x = gaussian(n, 400 + (uint32_t)n);
    for (auto &v : x) v += 0.2f;
    const auto y = gaussian(n, 500 + (uint32_t)n);
    check_dot(quantize(x.data(), n), quantize_q8_0(y.data(), n), n);
}

/* Raw blocks: any codes (-128 included, which only files hold), random
 * valid masks, scales over a wide range. */
TEST_P(SparseQuantsVecDot, RandomBlocks) {
    const int64_t n = GetParam();
    std::mt19937 rng(600 + (uint32_t)n);
    static const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
    for (int rep = 0; rep < 4; rep++) {
        std::vector<uint8_t> w(cp_dtype_row_size(kS24, n));
        for (int64_t b = 0; b < n / 32; b++) {
            cp_block_s24_q8 blk{};
            blk.d = cp_fp32_to_fp16(std::ldexp(1.0f + (float)(rng() % 1000) / 1000.0f, (int)(rng() % 20) - 16));
            for (int g = 0; g < 8; g++) {
                const int *p = pairs[rng() % 6];
                blk.mask |= (1u << (4 * g + p[0])) | (1u << (4 * g + p[1]));
            }
            for (auto &c : blk.qs) c = (int8_t)(int)(rng() % 256 - 128);
            std::memcpy(w.data() + (size_t)b * sizeof blk, &blk, sizeof blk);
        }
        const auto y = gaussian(n, rng());
        check_dot(w, quantize_q8_0(y.data(), n), n);
    }
}

INSTANTIATE_TEST_SUITE_P(Lengths, SparseQuantsVecDot, testing::Values(32, 64, 96, 576, 1536, 4096 + 32),
                         [](const testing::TestParamInfo<int64_t> &i) { return "n" + std::to_string(i.param); });

/* A mask that breaks the format (not 2 bits per nibble) still decodes
 * within its block, every kernel by the same rule (the first two set bits
 * of a nibble take the group's two codes), so all agree on random bytes. */
TEST(SparseQuants, DamagedMasksAgreeAndStayInTheBlock) {
    const int64_t n = 256;
    std::mt19937 rng(77);
    std::vector<uint8_t> w(cp_dtype_row_size(kS24, n));
    for (auto &c : w) c = (uint8_t)rng();
    for (int64_t b = 0; b < n / 32; b++) w[(size_t)b * 24 + 1] = 0x30; /* moderate scales */
    const auto y = gaussian(n, 78);
    check_dot(w, quantize_q8_0(y.data(), n), n);
}

/* ---- the backend -------------------------------------------------------- */

struct Shape {
    int64_t m, k;
};

/* y = x W^T through the threaded backend against fp64 of the dequantized
 * weights and the dequantized Q8_0 activations (the vec_dot tolerance per
 * output); the bias adds one more fp32 rounding. Every shape, batch and
 * thread count must also give the batch-1, one-thread bits (batches
 * repack tiles of weight rows; decode reads the rows as they are).
 * With CP_CPU_FORCE_REF=1 the backend runs its fp32 reference instead:
 * fp32 activations, k sequential fp32 sums. */
TEST(SparseQuantsMatmul, BackendMatchesDequantizedFp64) {
    const char *force = std::getenv("CP_CPU_FORCE_REF");
    const bool ref_ops = force && std::strcmp(force, "1") == 0;
    const Shape shapes[] = {{40, 32}, {24, 96}, {64, 576}, {96, 1536}, {33, 4096}};
    for (const Shape &sh : shapes) {
        const int64_t m = sh.m, k = sh.k;
        const auto w = gaussian(m * k, 21 + (uint32_t)k, 0.05f);
        const auto bias = gaussian(m, 23);
        std::vector<uint8_t> wq(cp_dtype_row_size(kS24, k) * (size_t)m);
        auto be1 = cpu_backend(1), be2 = cpu_backend(2);
        ASSERT_EQ(cp_backend_quantize(be1.get(), kS24, w.data(), m, k, wq.data()), CP_OK);
        cp_tensor wt = cp_tensor_2d(kS24, m, k, wq.data());
        std::vector<float> wd((size_t)(m * k));
        ASSERT_EQ(cp_backend_dequantize(be2.get(), &wt, 0, m, wd.data()), CP_OK);
        for (int n : {1, 2, 5, 16}) {
            const auto x = gaussian(n * k, 22 + (uint32_t)n);
            std::vector<float> first;
            for (cp_backend_t be : {be1.get(), be2.get()})
                for (bool with_bias : {false, true}) {
                    SCOPED_TRACE("m=" + std::to_string(m) + " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                                 " threads=" + std::to_string(cp_backend_n_threads(be)) + " bias=" + std::to_string(with_bias));
                    std::vector<float> y((size_t)(n * m), NAN);
                    ASSERT_EQ(cp_backend_matmul(be, &wt, x.data(), n, y.data(), with_bias ? bias.data() : nullptr), CP_OK);
                    for (int i = 0; i < n; i++) {
                        const auto aq = quantize_q8_0(x.data() + (size_t)i * k, k);
                        const auto xi = ref_ops ? std::vector<float>(x.begin() + i * k, x.begin() + (i + 1) * k)
                                                : decode(q8(), aq.data(), k);
                        /* batch-1, one-thread bits of this row */
                        std::vector<float> y1((size_t)m);
                        ASSERT_EQ(cp_backend_matmul(be1.get(), &wt, x.data() + (size_t)i * k, 1, y1.data(),
                                                    with_bias ? bias.data() : nullptr),
                                  CP_OK);
                        for (int64_t r = 0; r < m; r++) {
                            double want = 0, as = 0;
                            for (int64_t j = 0; j < k; j++) {
                                want += (double)wd[(size_t)(r * k + j)] * xi[(size_t)j];
                                as += std::fabs((double)wd[(size_t)(r * k + j)] * xi[(size_t)j]);
                            }
                            double tol = ref_ops ? (double)(k + 1) * kU32 * as + 1e-30 : dot_tolerance(k, as);
                            if (with_bias) {
                                want += bias[(size_t)r];
                                tol += kU32 * (std::fabs(want) + tol);
                            }
                            const float got = y[(size_t)(i * m + r)];
                            ASSERT_NEAR(got, want, tol) << "row " << r << " token " << i;
                            ASSERT_EQ(got, y1[(size_t)r]) << "row " << r << " token " << i << " differs from batch 1";
                        }
                    }
                }
        }
    }
}

/* Embedding rows, row slices and the column slices tensor parallelism
 * takes (whole 32-blocks: the bytes of blocks c0/32 .. c1/32 of each row). */
TEST(SparseQuantsMatmul, EmbedAndSlices) {
    auto be = cpu_backend(2);
    const int64_t m = 50, k = 576;
    const auto w = gaussian(m * k, 31);
    const size_t rs = cp_dtype_row_size(kS24, k);
    std::vector<uint8_t> wq(rs * (size_t)m);
    ASSERT_EQ(cp_backend_quantize(be.get(), kS24, w.data(), m, k, wq.data()), CP_OK);
    cp_tensor wt = cp_tensor_2d(kS24, m, k, wq.data());
    EXPECT_EQ(wt.nb[1], rs);
    std::vector<float> wd((size_t)(m * k));
    ASSERT_EQ(cp_backend_dequantize(be.get(), &wt, 0, m, wd.data()), CP_OK);
    const std::vector<int32_t> ids = {7, 0, 49, 7, 23};
    std::vector<float> e(ids.size() * (size_t)k);
    ASSERT_EQ(cp_backend_embed(be.get(), &wt, ids.data(), (int)ids.size(), e.data()), CP_OK);
    for (size_t t = 0; t < ids.size(); t++)
        for (int64_t j = 0; j < k; j++) ASSERT_EQ(e[t * (size_t)k + (size_t)j], wd[(size_t)(ids[t] * k + j)]);
    std::vector<float> part((size_t)(3 * k));
    ASSERT_EQ(cp_backend_dequantize(be.get(), &wt, 40, 3, part.data()), CP_OK);
    for (int64_t j = 0; j < 3 * k; j++) ASSERT_EQ(part[(size_t)j], wd[(size_t)(40 * k + j)]);
    const int64_t c0 = 64, c1 = 320, nc = c1 - c0;
    const size_t ps = cp_dtype_row_size(kS24, nc);
    std::vector<uint8_t> cols(ps * (size_t)m);
    for (int64_t r = 0; r < m; r++)
        std::memcpy(cols.data() + (size_t)r * ps, wq.data() + (size_t)r * rs + (size_t)(c0 / 32) * 24, ps);
    cp_tensor ct = cp_tensor_2d(kS24, m, nc, cols.data());
    std::vector<float> cd((size_t)(m * nc));
    ASSERT_EQ(cp_backend_dequantize(be.get(), &ct, 0, m, cd.data()), CP_OK);
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < nc; j++) ASSERT_EQ(cd[(size_t)(r * nc + j)], wd[(size_t)(r * k + c0 + j)]);
    /* a 2-byte aligned row (a mapped file) decodes the same */
    std::vector<uint8_t> odd(rs + 2);
    std::memcpy(odd.data() + 2, wq.data(), rs);
    const auto d2 = decode(s24(), odd.data() + 2, k);
    for (int64_t j = 0; j < k; j++) ASSERT_EQ(d2[(size_t)j], wd[(size_t)j]);
    const auto a = quantize_q8_0(gaussian(k, 32).data(), k);
    float s0 = NAN, s1 = NAN;
    s24()->vec_dot(k, &s0, wq.data(), a.data());
    s24()->vec_dot(k, &s1, odd.data() + 2, a.data());
    EXPECT_EQ(s0, s1);
}

} // namespace
