// test_plan.cc - the parallel plan: every rank's ranges tile the model
// exactly once (heads, FFN columns, vocabulary, layers), split points fall on
// quantization blocks, KV heads are replicated when tp exceeds them, and
// impossible layouts are refused with the valid values named.
#include <gtest/gtest.h>

#include <string>
#include <vector>

extern "C" {
#include "cp_plan.h"
}

namespace {

cp_plan_shape smollm2() { return cp_plan_shape{30, 9, 3, 64, 1536, 49152, 32}; }
cp_plan_shape llama70b() { return cp_plan_shape{80, 64, 8, 128, 28672, 32000, 256}; }

std::vector<cp_plan> all_ranks(const cp_plan_shape &s, int tp, int pp, int discount = 0) {
    cp_plan_opts o = {tp, pp, discount};
    std::vector<cp_plan> v(tp * pp);
    for (int r = 0; r < tp * pp; r++) EXPECT_EQ(cp_plan_init(&s, &o, r, &v[r]), CP_OK) << cp_last_error();
    return v;
}

// Each unit in [0, n) covered exactly `copies` times by the ranges.
void expect_tiles(const std::vector<std::pair<int, int>> &ranges, int n, int copies, const char *what) {
    std::vector<int> cover(n, 0);
    for (auto &r : ranges) {
        ASSERT_LE(0, r.first) << what;
        ASSERT_LT(r.first, r.second) << what;
        ASSERT_LE(r.second, n) << what;
        for (int i = r.first; i < r.second; i++) cover[i]++;
    }
    for (int i = 0; i < n; i++) ASSERT_EQ(cover[i], copies) << what << " unit " << i;
}

TEST(Plan, SplitIsEvenAndOnGrain) {
    int b, e;
    ASSERT_TRUE(cp_plan_split(100, 3, 0, 1, &b, &e));
    EXPECT_EQ(b, 0);
    EXPECT_EQ(e, 34);
    ASSERT_TRUE(cp_plan_split(100, 3, 2, 1, &b, &e));
    EXPECT_EQ(b, 67);
    EXPECT_EQ(e, 100);
    // 1000 = 31 blocks of 32 + 8: boundaries on multiples of 32, the tail on the last part
    std::vector<std::pair<int, int>> r;
    for (int i = 0; i < 4; i++) {
        ASSERT_TRUE(cp_plan_split(1000, 4, i, 32, &b, &e));
        if (i < 3) EXPECT_EQ(e % 32, 0);
        r.push_back({b, e});
    }
    expect_tiles(r, 1000, 1, "split");
    EXPECT_FALSE(cp_plan_split(64, 3, 0, 32, &b, &e));  // 2 blocks for 3 parts
}

struct Layout {
    int tp, pp;
};

class PlanLayouts : public ::testing::TestWithParam<Layout> {};

TEST_P(PlanLayouts, RangesTileTheModel) {
    const Layout L = GetParam();
    for (const cp_plan_shape &s : {smollm2(), llama70b()}) {
        cp_plan_opts o = {L.tp, L.pp, 0};
        cp_plan p;
        if (cp_plan_init(&s, &o, 0, &p) != CP_OK) continue;  // layout not valid for this shape
        auto v = all_ranks(s, L.tp, L.pp);
        std::vector<std::pair<int, int>> layers, heads, ffn, vocab, kv;
        for (int r = 0; r < L.tp * L.pp; r++) {
            const cp_plan &q = v[r];
            EXPECT_EQ(q.pp_rank * L.tp + q.tp_rank, r);
            if (q.tp_rank == 0) layers.push_back({q.layer_begin, q.layer_end});
            if (q.pp_rank == 0) {
                heads.push_back({q.head_begin, q.head_end});
                ffn.push_back({q.ffn_begin, q.ffn_end});
                vocab.push_back({q.vocab_begin, q.vocab_end});
                kv.push_back({q.kv_head_begin, q.kv_head_end});
                EXPECT_EQ(q.ffn_begin % s.row_block, 0);
                EXPECT_EQ((q.head_begin * s.head_dim) % s.row_block, 0);
                // every query head of the rank maps to a KV head it holds
                int group = s.n_head / s.n_head_kv;
                EXPECT_GE(q.head_begin / group, q.kv_head_begin);
                EXPECT_LT((q.head_end - 1) / group, q.kv_head_end);
            }
            EXPECT_EQ(q.first_stage, q.pp_rank == 0);
            EXPECT_EQ(q.last_stage, q.pp_rank == L.pp - 1);
        }
        expect_tiles(layers, s.n_layer, 1, "layers");
        expect_tiles(heads, s.n_head, 1, "heads");
        expect_tiles(ffn, s.ffn_dim, 1, "ffn");
        expect_tiles(vocab, s.n_vocab, 1, "vocab");
        int replicas = L.tp > s.n_head_kv ? L.tp / s.n_head_kv : 1;
        expect_tiles(kv, s.n_head_kv, replicas, "kv heads");
        EXPECT_EQ(v[0].kv_replicas, replicas);
    }
}

INSTANTIATE_TEST_SUITE_P(All, PlanLayouts,
                         ::testing::Values(Layout{1, 1}, Layout{1, 2}, Layout{3, 1}, Layout{3, 2}, Layout{9, 1},
                                           Layout{2, 2}, Layout{4, 2}, Layout{8, 1}, Layout{16, 1},
                                           Layout{1, 8}, Layout{2, 4}, Layout{64, 1}, Layout{8, 10}));

TEST(Plan, KvHeadsReplicatedBeyondTheirCount) {
    // 64 query heads, 8 KV heads, tp = 16: ranks 2i and 2i+1 share KV head i
    auto v = all_ranks(llama70b(), 16, 1);
    for (int r = 0; r < 16; r++) {
        EXPECT_EQ(v[r].kv_head_begin, r / 2);
        EXPECT_EQ(v[r].kv_head_end, r / 2 + 1);
        EXPECT_EQ(v[r].kv_replicas, 2);
        EXPECT_EQ(v[r].head_end - v[r].head_begin, 4);
    }
}

TEST(Plan, ContextParallelRanksShareTheirSlotsShardsAndSplitPositions) {
    // tp 3 x cp 2 x pp 2 = 12 ranks: rank = (stage * cp + cp rank) * tp + tp rank
    cp_plan_shape s = smollm2();
    cp_plan_opts o = {3, 2, 0, 2};
    for (int r = 0; r < 12; r++) {
        cp_plan p;
        ASSERT_EQ(cp_plan_init(&s, &o, r, &p), CP_OK) << cp_last_error();
        EXPECT_EQ(p.world, 12);
        EXPECT_EQ(p.tp_rank, r % 3);
        EXPECT_EQ(p.cp_rank, (r / 3) % 2);
        EXPECT_EQ(p.pp_rank, r / 6);
        EXPECT_EQ(p.cp, 2);
        // the same shard as the rank of the same stage and TP slot without cp
        cp_plan_opts no_cp = {3, 2, 0};
        cp_plan q;
        ASSERT_EQ(cp_plan_init(&s, &no_cp, p.pp_rank * 3 + p.tp_rank, &q), CP_OK);
        EXPECT_EQ(p.head_begin, q.head_begin);
        EXPECT_EQ(p.ffn_begin, q.ffn_begin);
        EXPECT_EQ(p.vocab_begin, q.vocab_begin);
        EXPECT_EQ(p.layer_begin, q.layer_begin);
        EXPECT_EQ(p.layer_end, q.layer_end);
    }
    // the group colors put exactly the ranks the plan pairs into one group
    for (int a = 0; a < 12; a++)
        for (int b = 0; b < 12; b++) {
            cp_plan pa, pb;
            ASSERT_EQ(cp_plan_init(&s, &o, a, &pa), CP_OK);
            ASSERT_EQ(cp_plan_init(&s, &o, b, &pb), CP_OK);
            cp_plan_colors ca = cp_plan_group_colors(a, 3, 2), cb = cp_plan_group_colors(b, 3, 2);
            EXPECT_EQ(ca.tp == cb.tp, pa.pp_rank == pb.pp_rank && pa.cp_rank == pb.cp_rank) << a << " " << b;
            EXPECT_EQ(ca.pp == cb.pp, pa.cp_rank == pb.cp_rank && pa.tp_rank == pb.tp_rank) << a << " " << b;
            EXPECT_EQ(ca.cp == cb.cp, pa.pp_rank == pb.pp_rank && pa.tp_rank == pb.tp_rank) << a << " " << b;
        }
    cp_plan p;
    EXPECT_EQ(cp_plan_init(&s, &o, 12, &p), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("cp=2"), std::string::npos) << cp_last_error_detail();
    cp_plan_opts neg = {1, 1, 0, -1};
    EXPECT_EQ(cp_plan_init(&s, &neg, 0, &p), CP_ERR_INVALID_ARG);
}

TEST(Plan, EdgeStagesCanTakeFewerLayers) {
    auto v = all_ranks(llama70b(), 1, 4, 2);  // 80 layers: 18, 22, 22, 18
    EXPECT_EQ(v[0].layer_end - v[0].layer_begin, 18);
    EXPECT_EQ(v[1].layer_end - v[1].layer_begin, 22);
    EXPECT_EQ(v[2].layer_end - v[2].layer_begin, 22);
    EXPECT_EQ(v[3].layer_end - v[3].layer_begin, 18);
    EXPECT_EQ(v[3].layer_end, 80);
}

TEST(Plan, RefusesLayoutsThatDoNotFitAndNamesValidOnes) {
    cp_plan p;
    cp_plan_shape s = smollm2();
    cp_plan_opts o = {2, 1, 0};
    EXPECT_EQ(cp_plan_init(&s, &o, 0, &p), CP_ERR_INVALID_ARG);
    std::string msg = cp_last_error_detail();
    EXPECT_NE(msg.find("tp=2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("valid tp: 1, 3, 9"), std::string::npos) << msg;
    int valid[8];
    ASSERT_EQ(cp_plan_valid_tp(&s, valid, 8), 3);
    EXPECT_EQ(valid[1], 3);

    cp_plan_opts deep = {1, 31, 0};
    EXPECT_EQ(cp_plan_init(&s, &deep, 0, &p), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("only 30 layers"), std::string::npos);

    // 2 query heads of 64 per rank = 128 elements: a 256-element K-quant block would be cut
    cp_plan_shape k = {4, 8, 8, 64, 1024, 1000, 256};
    cp_plan_opts tp4 = {4, 1, 0};
    EXPECT_EQ(cp_plan_init(&k, &tp4, 0, &p), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("quantization block"), std::string::npos);

    // FFN 224 is 7 blocks of 32: 8 ranks cannot each get one
    cp_plan_shape few = {4, 8, 8, 16, 224, 101, 32};
    cp_plan_opts tp8 = {8, 1, 0};
    EXPECT_EQ(cp_plan_init(&few, &tp8, 0, &p), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("only 7 quantization blocks of 32"), std::string::npos)
        << cp_last_error_detail();

    // a mixed model: 256-element blocks in FFN down, 32 in the attention
    // output (SmolLM2 quantized to Q4_K, whose 576-wide rows fall back to Q4_0)
    cp_plan_shape mixed = {30, 9, 3, 64, 1536, 49152, 256, 32};
    cp_plan_opts tp1 = {1, 1, 0}, tp3 = {3, 1, 0};
    EXPECT_EQ(cp_plan_init(&mixed, &tp1, 0, &p), CP_OK) << cp_last_error();
    EXPECT_EQ(cp_plan_init(&mixed, &tp3, 2, &p), CP_OK) << cp_last_error();
    EXPECT_EQ((p.ffn_end - p.ffn_begin) % 256, 0);
    cp_plan_shape coarse = mixed;
    coarse.attn_row_block = 0; // one block for both: 576 is not whole 256-blocks
    EXPECT_EQ(cp_plan_init(&coarse, &tp1, 0, &p), CP_ERR_INVALID_ARG);

    cp_plan_opts bad_rank = {3, 1, 0};
    EXPECT_EQ(cp_plan_init(&s, &bad_rank, 3, &p), CP_ERR_INVALID_ARG);
    cp_plan_opts zero = {0, 1, 0};
    EXPECT_EQ(cp_plan_init(&s, &zero, 0, &p), CP_ERR_INVALID_ARG);
}

}  // namespace
