// test_attention_batch.cc - a token's attention on the CPU backend does not
// depend on what else is in the batch: a decode row at a long context (its
// context cut into ranges run as separate tasks) gives bit-identical output
// alone and beside other rows (one task over all ranges), for any thread
// count. This is what lets a served request return the same text alone and
// in a crowd.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

extern "C" {
#include "cp_backend.h"
}

namespace {

std::vector<float> attend(int threads, const std::vector<int32_t> &seq, const std::vector<int32_t> &pos,
                          const std::vector<float> &q, const std::vector<uint16_t> &kc,
                          const std::vector<uint16_t> &vc, const std::vector<int32_t> &tables,
                          int max_blocks) {
    cp_backend_t be = nullptr;
    EXPECT_EQ(cp_backend_cpu_init(threads, &be), CP_OK);
    const int n_head = 9, n_kv = 3, hd = 64;
    cp_attn_params p = {(int)seq.size(), n_head, n_kv, hd, 16, max_blocks, 0.125f, CP_DTYPE_F16,
                        seq.data(), pos.data(), tables.data(), 0, 0};
    std::vector<float> out(q.size(), NAN);
    EXPECT_EQ(cp_backend_attention(be, &p, q.data(), kc.data(), vc.data(), out.data()), CP_OK)
        << cp_last_error();
    cp_backend_free(be);
    return out;
}

TEST(AttentionBatch, LongContextRowIsTheSameAloneAndInACrowd) {
    const int n_head = 9, n_kv = 3, hd = 64, bs = 16, ctx = 1000;
    const int max_blocks = (ctx + bs - 1) / bs, n_seq = 4, n_blocks = max_blocks * n_seq;
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<uint16_t> kc((size_t)n_blocks * bs * n_kv * hd), vc(kc.size());
    for (size_t i = 0; i < kc.size(); i++) {
        kc[i] = cp_fp32_to_fp16(nd(rng));
        vc[i] = cp_fp32_to_fp16(nd(rng));
    }
    std::vector<int32_t> tables(n_blocks);
    for (int i = 0; i < n_blocks; i++) tables[i] = (i * 37) % n_blocks;
    std::vector<float> row((size_t)n_head * hd);
    for (auto &x : row) x = nd(rng);
    // alone: sequence 2 at position 900
    auto alone = attend(3, {2}, {900}, row, kc, vc, tables, max_blocks);
    // in a crowd: 11 rows of 4 sequences at other positions around it
    std::vector<int32_t> seq = {0, 1, 3, 0, 1, 2, 3, 0, 1, 3, 0}, pos = {5, 700, 999, 6, 701, 900, 300, 7, 702, 260, 8};
    std::vector<float> q(seq.size() * n_head * hd);
    for (auto &x : q) x = nd(rng);
    std::copy(row.begin(), row.end(), q.begin() + 5 * n_head * hd);
    for (int threads : {1, 2, 5}) {
        auto crowd = attend(threads, seq, pos, q, kc, vc, tables, max_blocks);
        for (int i = 0; i < n_head * hd; i++)
            ASSERT_EQ(alone[i], crowd[(size_t)5 * n_head * hd + i]) << "element " << i << ", " << threads << " threads";
    }
}

}  // namespace
