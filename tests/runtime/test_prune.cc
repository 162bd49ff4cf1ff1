// test_prune.cc - pruning: cp_prune_row's choice of weights (unstructured,
// Wanda-scored, 2:4), and whole-model plans on tiny models built with parts
// that do nothing (a block whose output projections are zero, heads and MLP
// channels whose outputs are zero): the calibration statistics must find
// exactly those, and removing them must leave the logits unchanged; pruned
// files load, keep their unpruned weights bit for bit, and bad options fail
// with clear errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "common/tiny_engine.h"
#include "common/tiny_model.h"
#include "cp_backend.h"
#include "cp_gguf.h"
#include "cp_prune.h"
#include "cp_runtime.h"

using namespace cptest;

namespace {

std::vector<float> row_of(std::mt19937 &rng, int n) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> x(n);
    for (auto &v : x) v = d(rng);
    return x;
}

TEST(PruneRow, UnstructuredZeroesTheLowestScores) {
    std::mt19937 rng(3);
    const int n = 96;
    std::vector<float> scratch(2 * n);
    for (double sp : {0.25, 0.5, 0.7}) {
        for (bool wanda : {false, true}) {
            auto x = row_of(rng, n), orig = x;
            std::vector<float> norm(n);
            for (auto &v : norm) v = 0.1f + (float)(rng() % 100) / 10.0f;
            cp_prune_row(x.data(), n, wanda ? norm.data() : nullptr, sp, false, scratch.data());
            const int k = (int)std::floor(sp * n);
            int zeros = 0;
            double max_zeroed = 0, min_kept = INFINITY;
            for (int j = 0; j < n; j++) {
                const double s = std::fabs(orig[j]) * (wanda ? norm[j] : 1.0f);
                if (x[j] == 0.0f) {
                    zeros++;
                    max_zeroed = std::max(max_zeroed, s);
                } else {
                    EXPECT_EQ(x[j], orig[j]);  // kept weights untouched
                    min_kept = std::min(min_kept, s);
                }
            }
            EXPECT_EQ(zeros, k) << "sparsity " << sp;
            EXPECT_LE(max_zeroed, min_kept) << "a weight scored higher than a kept one was zeroed";
        }
    }
}

TEST(PruneRow, TwoOfFourAreZeroedInEveryGroup) {
    std::mt19937 rng(5);
    const int n = 128;
    std::vector<float> scratch(2 * n), norm(n);
    for (auto &v : norm) v = 0.5f + (float)(rng() % 10);
    for (bool wanda : {false, true}) {
        auto x = row_of(rng, n), orig = x;
        cp_prune_row(x.data(), n, wanda ? norm.data() : nullptr, 0, true, scratch.data());
        for (int g = 0; g < n; g += 4) {
            int kept = 0;
            std::vector<double> s(4);
            for (int k = 0; k < 4; k++) {
                s[k] = std::fabs(orig[g + k]) * (wanda ? norm[g + k] : 1.0f);
                kept += x[g + k] != 0.0f;
            }
            EXPECT_EQ(kept, 2) << "group " << g / 4;
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    if (x[g + a] == 0.0f && x[g + b] != 0.0f) EXPECT_LE(s[a], s[b]);
        }
    }
}

// ---- whole models ---------------------------------------------------------

std::vector<float> logits_of(const std::string &path, const std::vector<int32_t> &toks, int *vocab) {
    cp_engine_t e = cptest::open_engine(path);
    if (!e) return {};
    *vocab = cp_model_get_config(cp_engine_model(e))->n_vocab;
    std::vector<float> out(toks.size() * (size_t)*vocab);
    EXPECT_EQ(cp_engine_logits(e, toks.data(), (int)toks.size(), out.data()), CP_OK) << cp_last_error();
    cp_engine_free(e);
    return out;
}


struct Pruned {
    std::string path;
    cp_prune_report rep;
    cp_quantize_stats qs;
};

Pruned prune(const std::string &in, const cp_prune_opts &o, const char *name, cp_dtype type = CP_DTYPE_F32,
             bool keep_types = true) {
    Pruned p;
    p.path = ::testing::TempDir() + "prune_" + std::to_string(getpid()) + "_" + name + (type >= CP_DTYPE_FIRST_OWN ? ".safetensors" : ".gguf");
    cp_gguf_t g = nullptr;
    EXPECT_EQ(cp_gguf_open(in.c_str(), &g), CP_OK) << cp_last_error();
    cp_model_edit *e = nullptr;
    EXPECT_EQ(cp_prune_plan(g, &o, &e, &p.rep), CP_OK) << cp_last_error();
    cp_gguf_close(g);
    if (!e) return p;
    cp_quantize_opts qo = {};
    qo.type = type;
    qo.keep_types = keep_types;
    qo.edit = e;
    EXPECT_EQ(cp_quantize_gguf(in.c_str(), p.path.c_str(), &qo, &p.qs), CP_OK) << cp_last_error();
    cp_model_edit_free(e);
    return p;
}

double max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
    double m = a.size() == b.size() ? 0 : INFINITY;
    for (size_t i = 0; i < a.size() && i < b.size(); i++) m = std::max(m, (double)std::fabs(a[i] - b[i]));
    return m;
}

std::vector<int32_t> tokens(int n, int vocab) {
    std::vector<int32_t> t(n);
    for (int i = 0; i < n; i++) t[i] = (i * 7 + 3) % vocab;
    return t;
}

// A model in which block 1 of 4 does nothing (zero O and down): it has
// importance 0, is the one dropped, and the logits do not change.
TEST(PruneModel, DropsTheBlockThatDoesNothing) {
    TinySpec s;
    s.n_layer = 4;
    TinyModel m = make_model(s, 21);
    std::fill(m.L[1].wo.begin(), m.L[1].wo.end(), 0.0f);
    std::fill(m.L[1].wd.begin(), m.L[1].wd.end(), 0.0f);
    const std::string in = write_gguf(m, "prune_drop");
    cp_act_stats *st = cptest::calibrate(in, 96, s.vocab);
    ASSERT_NE(st, nullptr);
    cp_prune_opts o = {};
    o.drop_layers = 1;
    o.stats = st;
    Pruned p = prune(in, o, "drop");
    cp_act_stats_free(st);
    ASSERT_EQ(p.rep.n_dropped, 1);
    EXPECT_EQ(p.rep.dropped[0], 1);
    EXPECT_NEAR(p.rep.importance[1], 0.0, 1e-6);
    for (int l : {0, 2, 3}) EXPECT_GT(p.rep.importance[l], 1e-3) << "layer " << l;
    cp_gguf_t g = nullptr;
    ASSERT_EQ(cp_gguf_open(p.path.c_str(), &g), CP_OK) << cp_last_error();
    EXPECT_EQ(cp_gguf_get_i64_or(g, "llama.block_count", -1), 3);
    EXPECT_NE(cp_gguf_find_tensor(g, "blk.2.ffn_down.weight"), nullptr);  // old block 3, renumbered
    EXPECT_EQ(cp_gguf_find_tensor(g, "blk.3.ffn_down.weight"), nullptr);
    cp_gguf_close(g);
    int V = 0, V2 = 0;
    auto t = tokens(20, s.vocab);
    auto a = logits_of(in, t, &V), b = logits_of(p.path, t, &V2);
    EXPECT_LT(max_abs_diff(a, b), 1e-4);
    unlink(p.path.c_str());
}

// One query head per KV group and a quarter of the MLP channels write
// nothing (zero columns of O and down): the plan keeps the others and the
// smaller model gives the same logits. With biases, so Q's bias is sliced too.
TEST(PruneModel, RemovesDeadHeadsAndChannels) {
    TinySpec s;
    s.dim = 64;
    s.n_head = 8;
    s.n_head_kv = 2;
    s.ffn = 96;
    s.n_layer = 2;
    s.bias = true;
    TinyModel m = make_model(s, 33);
    const int hd = m.hd, q = s.n_head * hd;
    // dead heads: layer 0 heads 1 and 6; layer 1 heads 3 and 4 (one per group of 4)
    const int dead[2][2] = {{1, 6}, {3, 4}};
    std::vector<std::vector<int>> dead_ch(2);
    for (int l = 0; l < 2; l++) {
        for (int h : dead[l])
            for (int r = 0; r < s.dim; r++)
                for (int j = h * hd; j < (h + 1) * hd; j++) m.L[l].wo[(size_t)r * q + j] = 0.0f;
        for (int c = l; c < s.ffn; c += 4) {
            dead_ch[l].push_back(c);
            for (int r = 0; r < s.dim; r++) m.L[l].wd[(size_t)r * s.ffn + c] = 0.0f;
        }
    }
    const std::string in = write_gguf(m, "prune_heads");
    cp_act_stats *st = cptest::calibrate(in, 64, s.vocab);
    ASSERT_NE(st, nullptr);
    cp_prune_opts o = {};
    o.n_head = 6;
    o.ffn_dim = 72;
    o.stats = st;
    Pruned p = prune(in, o, "heads");
    cp_act_stats_free(st);
    cp_gguf_t g = nullptr;
    ASSERT_EQ(cp_gguf_open(p.path.c_str(), &g), CP_OK) << cp_last_error();
    EXPECT_EQ(cp_gguf_get_i64_or(g, "llama.attention.head_count", -1), 6);
    EXPECT_EQ(cp_gguf_get_i64_or(g, "llama.attention.key_length", -1), hd);
    EXPECT_EQ(cp_gguf_get_i64_or(g, "llama.feed_forward_length", -1), 72);
    const cp_weight_info *wq = cp_gguf_find_tensor(g, "blk.0.attn_q.weight");
    const cp_weight_info *bq = cp_gguf_find_tensor(g, "blk.0.attn_q.bias");
    const cp_weight_info *wd = cp_gguf_find_tensor(g, "blk.1.ffn_down.weight");
    ASSERT_TRUE(wq && bq && wd);
    EXPECT_EQ(wq->ne[1], 6 * hd);
    EXPECT_EQ(bq->ne[0], 6 * hd);
    EXPECT_EQ(wd->ne[0], 72);
    // the first kept head of layer 0 is head 0, the second head 2 (1 is dead)
    const float *w = (const float *)wq->data;
    EXPECT_EQ(memcmp(w + (size_t)hd * s.dim, m.L[0].wq.data() + (size_t)2 * hd * s.dim, (size_t)hd * s.dim * 4), 0);
    cp_gguf_close(g);
    int V = 0, V2 = 0;
    auto t = tokens(24, s.vocab);
    auto a = logits_of(in, t, &V), b = logits_of(p.path, t, &V2);
    EXPECT_LT(max_abs_diff(a, b), 1e-4);
    unlink(p.path.c_str());
}

// Wanda at 50% on F32: each pruned row has exactly half its weights zeroed,
// the others equal the source bit for bit; the embedding and the output
// projection are untouched; the model loads and runs.
TEST(PruneModel, UnstructuredRowsKeepTheirOtherWeights) {
    TinySpec s;
    TinyModel m = make_model(s, 44);
    const std::string in = write_gguf(m, "prune_wanda");
    cp_act_stats *st = cptest::calibrate(in, 64, s.vocab);
    ASSERT_NE(st, nullptr);
    cp_prune_opts o = {};
    o.method = CP_PRUNE_WANDA;
    o.sparsity = 0.5;
    o.stats = st;
    Pruned p = prune(in, o, "wanda");
    cp_act_stats_free(st);
    EXPECT_EQ(p.rep.n_pruned, 7 * s.n_layer);
    cp_gguf_t g = nullptr, src = nullptr;
    ASSERT_EQ(cp_gguf_open(p.path.c_str(), &g), CP_OK) << cp_last_error();
    ASSERT_EQ(cp_gguf_open(in.c_str(), &src), CP_OK) << cp_last_error();
    for (int64_t i = 0; i < cp_gguf_n_tensors(src); i++) {
        const cp_weight_info *a = cp_gguf_tensor(src, i), *b = cp_gguf_find_tensor(g, a->name);
        ASSERT_TRUE(b) << a->name;
        ASSERT_EQ(a->nbytes, b->nbytes);
        const bool pruned = a->ndim == 2 && !strncmp(a->name, "blk.", 4);
        const float *x = (const float *)a->data, *y = (const float *)b->data;
        const int64_t n = a->ne[0], rows = a->nbytes / 4 / n;
        for (int64_t r = 0; r < rows; r++) {
            int zeros = 0;
            for (int64_t j = 0; j < n; j++) {
                if (y[r * n + j] == 0.0f) zeros++;
                else EXPECT_EQ(y[r * n + j], x[r * n + j]);
            }
            EXPECT_EQ(zeros, pruned ? n / 2 : 0) << a->name << " row " << r;
        }
    }
    cp_gguf_close(g);
    cp_gguf_close(src);
    int V = 0;
    auto lg = logits_of(p.path, tokens(8, s.vocab), &V);
    for (float v : lg) ASSERT_TRUE(std::isfinite(v));
    unlink(p.path.c_str());
}

// 2:4 written compressed (S24_Q8): every group keeps its two kept weights,
// the model loads and its logits equal those of the same pruned weights
// held as F32 within int8 rounding.
TEST(PruneModel, TwoFourCompressedMatchesDense) {
    TinySpec s;
    TinyModel m = make_model(s, 55);
    const std::string in = write_gguf(m, "prune_24");
    cp_prune_opts o = {};
    o.method = CP_PRUNE_MAGNITUDE;
    o.n2m = true;
    Pruned dense = prune(in, o, "24dense");
    Pruned sparse = prune(in, o, "24sparse", CP_DTYPE_S24_Q8, false);
    EXPECT_EQ(sparse.qs.n_quantized, 7 * s.n_layer);
    int V = 0, V2 = 0;
    auto t = tokens(16, s.vocab);
    auto a = logits_of(dense.path, t, &V), b = logits_of(sparse.path, t, &V2);
    ASSERT_EQ(a.size(), b.size());
    double scale = 0;
    for (float v : a) scale = std::max(scale, (double)std::fabs(v));
    EXPECT_LT(max_abs_diff(a, b), 0.05 * scale);
    unlink(dense.path.c_str());
    unlink(sparse.path.c_str());
}

TEST(PruneModel, BadOptionsAreRefused) {
    TinySpec s;
    TinyModel m = make_model(s, 66);
    const std::string in = write_gguf(m, "prune_bad");
    cp_gguf_t g = nullptr;
    ASSERT_EQ(cp_gguf_open(in.c_str(), &g), CP_OK);
    cp_model_edit *e = nullptr;
    cp_prune_report rep;
    cp_prune_opts o = {};
    o.method = CP_PRUNE_WANDA;
    o.sparsity = 0.5;  // wanda without statistics
    EXPECT_EQ(cp_prune_plan(g, &o, &e, &rep), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("statistics"), std::string::npos);
    o = {};
    o.drop_layers = s.n_layer;  // nothing would be left
    EXPECT_EQ(cp_prune_plan(g, &o, &e, &rep), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("--drop-layers"), std::string::npos);
    o = {};
    o.n_head = 3;  // not a multiple of the 2 KV heads
    EXPECT_EQ(cp_prune_plan(g, &o, &e, &rep), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("--heads"), std::string::npos);
    o = {};
    o.sparsity = 1.5;
    EXPECT_EQ(cp_prune_plan(g, &o, &e, &rep), CP_ERR_INVALID_ARG);
    EXPECT_EQ(e, nullptr);
    cp_gguf_close(g);
}

}  // namespace
