// test_attention_cp.cc - attention over a context-parallel cache on the CPU
// backend (fast path and fp32 reference): the cache of one rank holds every
// cp-th position (kv_stride / kv_offset), each rank's output comes with its
// log-sum-exp, and merging the ranks' results by it gives the attention over
// the whole cache, for long contexts (several 256-key ranges), decode rows
// (split-K) and crowds, for cp = 2, 3, 4 and 8.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_backend.h"

namespace {

constexpr int kHeads = 8, kKv = 2, kHd = 32, kBs = 24, kSeq = 3, kCtx = 700;
constexpr int kMaxBlocks = (kCtx + kBs - 1) / kBs, kBlocks = kMaxBlocks * kSeq;

cp_attn_params params(int n_tok, const int32_t *seq, const int32_t *pos, const int32_t *tables, int cp, int rank,
                      cp_dtype dt) {
    cp_attn_params p = cptest::paged_attn_params(n_tok, kHeads, kKv, kHd, kBs / cp, kMaxBlocks, dt, seq, pos, tables);
    p.kv_stride = cp > 1 ? cp : 0;
    p.kv_offset = cp > 1 ? rank : 0;
    return p;
}

class AttentionCp : public ::testing::TestWithParam<std::tuple<bool, cp_dtype>> {};

TEST_P(AttentionCp, MergedRanksEqualTheWholeCache) {
    const bool ref = std::get<0>(GetParam());
    const cp_dtype dt = std::get<1>(GetParam());
    cptest::CpuBackend b(ref);
    const size_t es = dt == CP_DTYPE_F16 ? 2 : 4, row = (size_t)kKv * kHd;
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<int32_t> tables(kBlocks);
    for (int i = 0; i < kBlocks; i++) tables[i] = (i * 29 + 5) % kBlocks;
    // K/V of every position of every sequence, stored into the whole cache
    std::vector<int32_t> all_seq, all_pos;
    for (int s = 0; s < kSeq; s++)
        for (int p = 0; p < kCtx; p++) all_seq.push_back(s), all_pos.push_back(p);
    const int n_all = (int)all_seq.size();
    std::vector<float> k((size_t)n_all * row), v(k.size());
    for (auto &x : k) x = nd(rng);
    for (auto &x : v) x = nd(rng);
    std::vector<char> kc_full((size_t)kBlocks * kBs * row * es), vc_full(kc_full.size());
    cp_attn_params pf = params(n_all, all_seq.data(), all_pos.data(), tables.data(), 1, 0, dt);
    ASSERT_EQ(cp_backend_kv_store(b.be, &pf, k.data(), v.data(), kc_full.data(), vc_full.data()), CP_OK)
        << cp_last_error();

    // queries: a crowd at short and long positions, then one decode row
    // alone (split into ranges as separate tasks)
    std::vector<std::vector<int32_t>> seqs = {{0, 1, 2, 0, 1, 2, 0, 1}, {1}};
    std::vector<std::vector<int32_t>> poss = {{0, 1, 2, 17, 255, 256, 513, 699}, {600}};
    for (size_t batch = 0; batch < seqs.size(); batch++) {
        const auto &qs = seqs[batch], &qp = poss[batch];
        const int n = (int)qs.size();
        std::vector<float> q((size_t)n * kHeads * kHd);
        for (auto &x : q) x = nd(rng);
        std::vector<float> want(q.size(), NAN), want_lse((size_t)n * kHeads, NAN);
        cp_attn_params pw = params(n, qs.data(), qp.data(), tables.data(), 1, 0, dt);
        pw.lse = want_lse.data();
        ASSERT_EQ(cp_backend_attention(b.be, &pw, q.data(), kc_full.data(), vc_full.data(), want.data()), CP_OK)
            << cp_last_error();
        for (int cp : {2, 3, 4, 8}) {
            std::vector<std::vector<float>> out(cp), lse(cp);
            for (int r = 0; r < cp; r++) {
                // this rank's cache: its positions only, a block of kBs / cp rows
                std::vector<int32_t> s_r, p_r;
                std::vector<float> k_r, v_r;
                for (int i = 0; i < n_all; i++)
                    if (all_pos[i] % cp == r) {
                        s_r.push_back(all_seq[i]);
                        p_r.push_back(all_pos[i]);
                        k_r.insert(k_r.end(), k.begin() + (size_t)i * row, k.begin() + (size_t)(i + 1) * row);
                        v_r.insert(v_r.end(), v.begin() + (size_t)i * row, v.begin() + (size_t)(i + 1) * row);
                    }
                std::vector<char> kc((size_t)kBlocks * (kBs / cp) * row * es), vc(kc.size());
                cp_attn_params ps = params((int)s_r.size(), s_r.data(), p_r.data(), tables.data(), cp, r, dt);
                ASSERT_EQ(cp_backend_kv_store(b.be, &ps, k_r.data(), v_r.data(), kc.data(), vc.data()), CP_OK)
                    << cp_last_error();
                out[r].assign(q.size(), NAN);
                lse[r].assign((size_t)n * kHeads, NAN);
                cp_attn_params pa = params(n, qs.data(), qp.data(), tables.data(), cp, r, dt);
                pa.lse = lse[r].data();
                ASSERT_EQ(cp_backend_attention(b.be, &pa, q.data(), kc.data(), vc.data(), out[r].data()), CP_OK)
                    << cp_last_error();
            }
            double worst = 0, worst_lse = 0;
            for (int t = 0; t < n; t++)
                for (int h = 0; h < kHeads; h++) {
                    const size_t th = (size_t)t * kHeads + h;
                    double L = -INFINITY;
                    for (int r = 0; r < cp; r++) {
                        if (qp[t] < r) {
                            // no position of this rank at or before the query
                            EXPECT_EQ(lse[r][th], -INFINITY) << "cp " << cp << " rank " << r << " pos " << qp[t];
                            for (int d = 0; d < kHd; d++) EXPECT_EQ(out[r][th * kHd + d], 0.0f);
                        }
                        if (lse[r][th] > L) L = lse[r][th];
                    }
                    double sum = 0;
                    for (int r = 0; r < cp; r++) sum += std::exp((double)lse[r][th] - L);
                    L += std::log(sum);
                    worst_lse = std::max(worst_lse, std::fabs(L - want_lse[th]));
                    for (int d = 0; d < kHd; d++) {
                        double o = 0;
                        for (int r = 0; r < cp; r++)
                            o += std::exp((double)lse[r][th] - L) * out[r][th * kHd + d];
                        worst = std::max(worst, std::fabs(o - want[th * kHd + d]));
                    }
                }
            // fp32 softmax sums over up to 700 keys in another order: a few
            // 1e-7; a missing or double-counted position moves them by 1e-3
            EXPECT_LE(worst, 2e-6) << "cp " << cp << " batch " << batch;
            EXPECT_LE(worst_lse, 2e-5) << "cp " << cp << " batch " << batch;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Paths, AttentionCp,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(CP_DTYPE_F32, CP_DTYPE_F16)),
                         [](const auto &info) {
                             return std::string(std::get<0>(info.param) ? "Ref" : "Fast") +
                                    (std::get<1>(info.param) == CP_DTYPE_F16 ? "F16" : "F32");
                         });

TEST(AttentionCpErrors, StoreRefusesAPositionAnotherRankHolds) {
    cptest::CpuBackend b(false);
    std::vector<int32_t> tables(kMaxBlocks);
    for (int i = 0; i < kMaxBlocks; i++) tables[i] = i;
    std::vector<float> k(kKv * kHd, 1.0f), v(k);
    std::vector<float> kc((size_t)kMaxBlocks * (kBs / 2) * kKv * kHd), vc(kc.size());
    int32_t seq = 0, pos = 5;
    cp_attn_params p = params(1, &seq, &pos, tables.data(), 2, 0, CP_DTYPE_F32);
    EXPECT_EQ(cp_backend_kv_store(b.be, &p, k.data(), v.data(), kc.data(), vc.data()), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("not held"), std::string::npos) << cp_last_error();
    p.kv_offset = 2; // an offset outside 0..stride-1
    EXPECT_EQ(cp_backend_kv_store(b.be, &p, k.data(), v.data(), kc.data(), vc.data()), CP_ERR_INVALID_ARG);
    p.kv_offset = 1;
    EXPECT_EQ(cp_backend_kv_store(b.be, &p, k.data(), v.data(), kc.data(), vc.data()), CP_OK) << cp_last_error();
}

}  // namespace
