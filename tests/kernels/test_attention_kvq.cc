// test_attention_kvq.cc - attention over an int8 or fp8 KV cache on the CPU
// backend (fast path and reference): kv_store writes each (position, KV head)
// row as codes and a scale, and attention equals fp32 attention over the
// dequantized rows (the quantized kernel against dequantize-then-fp32) to
// fp32 rounding, with a bounded distance from the unquantized cache.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_backend.h"

extern "C" {
#include "cp_dtype.h"
}

namespace {

constexpr int kHeads = 9, kKv = 3, kHd = 64, kBs = 16, kCtx = 600;
constexpr int kMaxBlocks = (kCtx + kBs - 1) / kBs;

cp_attn_params params(int n_tok, const int32_t *seq, const int32_t *pos, const int32_t *tables, cp_dtype dt) {
    return cptest::paged_attn_params(n_tok, kHeads, kKv, kHd, kBs, kMaxBlocks, dt, seq, pos, tables);
}

// The values a row of x reads back as after quantizing it to t.
std::vector<float> round_trip(cp_backend_t be, cp_dtype t, const float *x) {
    std::vector<unsigned char> row(cp_dtype_row_size(t, kHd));
    EXPECT_EQ(cp_backend_quantize(be, t, x, 1, kHd, row.data()), CP_OK) << cp_last_error();
    std::vector<float> out(kHd);
    const float s = cp_row_scale(row.data(), kHd);
    for (int d = 0; d < kHd; d++)
        out[d] = (t == CP_DTYPE_I8_ROW ? (float)(int8_t)row[d] : cp_e4m3_to_fp32(row[d])) * s;
    return out;
}

class AttentionKvq : public ::testing::TestWithParam<std::tuple<bool, cp_dtype>> {};

TEST_P(AttentionKvq, EqualsFp32OverTheDequantizedRows) {
    const bool ref = std::get<0>(GetParam());
    const cp_dtype t = std::get<1>(GetParam());
    cptest::CpuBackend backend(ref);
    cp_backend_t be = backend.be;
    ASSERT_NE(be, nullptr);

    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<int32_t> tables(kMaxBlocks);
    for (int i = 0; i < kMaxBlocks; i++) tables[i] = (i * 7 + 3) % kMaxBlocks;
    std::vector<int32_t> seq(kCtx, 0), pos(kCtx);
    for (int i = 0; i < kCtx; i++) pos[i] = i;
    const size_t row = (size_t)kKv * kHd;
    std::vector<float> k((size_t)kCtx * row), v(k.size());
    for (auto &x : k) x = nd(rng);
    for (auto &x : v) x = nd(rng);
    // a few outliers, as real keys have
    for (int i = 0; i < kCtx; i += 37) k[(size_t)i * row + 5] *= 12.0f;
    // the rows as the quantized cache holds them
    std::vector<float> kd(k.size()), vd(v.size());
    for (size_t r = 0; r < (size_t)kCtx * kKv; r++) {
        auto a = round_trip(be, t, k.data() + r * kHd), b = round_trip(be, t, v.data() + r * kHd);
        std::copy(a.begin(), a.end(), kd.begin() + r * kHd);
        std::copy(b.begin(), b.end(), vd.begin() + r * kHd);
    }
    const size_t slots = (size_t)kMaxBlocks * kBs * kKv;
    std::vector<unsigned char> kq(slots * cp_dtype_row_size(t, kHd)), vq(kq.size());
    std::vector<float> kf(slots * kHd), vf(kf.size()), kx(kf.size()), vx(kf.size());
    cp_attn_params pq = params(kCtx, seq.data(), pos.data(), tables.data(), t);
    cp_attn_params pf = params(kCtx, seq.data(), pos.data(), tables.data(), CP_DTYPE_F32);
    ASSERT_EQ(cp_backend_kv_store(be, &pq, k.data(), v.data(), kq.data(), vq.data()), CP_OK) << cp_last_error();
    ASSERT_EQ(cp_backend_kv_store(be, &pf, kd.data(), vd.data(), kf.data(), vf.data()), CP_OK);
    ASSERT_EQ(cp_backend_kv_store(be, &pf, k.data(), v.data(), kx.data(), vx.data()), CP_OK);

    // a crowd of queries at short and long positions, then one decode row (split-K)
    for (std::vector<int32_t> qp : {std::vector<int32_t>{0, 3, 100, 255, 256, 599}, std::vector<int32_t>{599}}) {
        const int n = (int)qp.size();
        std::vector<int32_t> qs(n, 0);
        std::vector<float> q((size_t)n * kHeads * kHd);
        for (auto &x : q) x = nd(rng);
        std::vector<float> got(q.size()), want(q.size()), exact(q.size());
        cp_attn_params aq = params(n, qs.data(), qp.data(), tables.data(), t);
        cp_attn_params af = params(n, qs.data(), qp.data(), tables.data(), CP_DTYPE_F32);
        ASSERT_EQ(cp_backend_attention(be, &aq, q.data(), kq.data(), vq.data(), got.data()), CP_OK) << cp_last_error();
        ASSERT_EQ(cp_backend_attention(be, &af, q.data(), kf.data(), vf.data(), want.data()), CP_OK);
        ASSERT_EQ(cp_backend_attention(be, &af, q.data(), kx.data(), vx.data(), exact.data()), CP_OK);
        double worst = 0, drift = 0;
        for (size_t i = 0; i < got.size(); i++) {
            worst = std::max(worst, (double)std::fabs(got[i] - want[i]));
            drift = std::max(drift, (double)std::fabs(got[i] - exact[i]));
        }
        // the same arithmetic on the same values but for the order of a few
        // products: fp32 rounding of outputs of magnitude <= 3
        EXPECT_LE(worst, 5e-6) << cp_dtype_name(t) << " against the dequantized rows";
        // int8 keeps ~2 decimal digits per row, E4M3 ~1: what the cache
        // costs the output, bounded well below the outputs' spread (~0.3)
        EXPECT_LE(drift, t == CP_DTYPE_I8_ROW ? 0.05 : 0.15) << cp_dtype_name(t) << " against the fp32 cache";
        RecordProperty(std::string("drift_") + cp_dtype_name(t) + "_" + std::to_string(n), std::to_string(drift));
    }
}

INSTANTIATE_TEST_SUITE_P(Paths, AttentionKvq,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW)),
                         [](const auto &info) {
                             return std::string(std::get<0>(info.param) ? "Ref" : "Fast") +
                                    (std::get<1>(info.param) == CP_DTYPE_I8_ROW ? "Int8" : "Fp8");
                         });

}  // namespace
