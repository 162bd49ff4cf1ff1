// test_golden.cc - the CPU engine on the real default model against
// llama.cpp's own outputs (tests/golden/smollm2_golden.json, written by
// tests/golden/make_golden.py): on the weights dequantized to F32 the same 32
// greedy tokens for every prompt and logits within 0.02; on the Q4_1 file
// logits within llama.cpp's own run-to-run noise (see the bounds below).
#include <gtest/gtest.h>
#include <jansson.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern "C" {
#include "cp_runtime.h"
}

namespace {

struct Prompt {
    std::string name;
    std::vector<int32_t> prompt, generated;
    std::vector<double> margins;
    // per position: top ids/logits and logsumexp
    std::vector<std::vector<std::pair<int, double>>> top;
    std::vector<double> lse;
};

std::vector<int32_t> ints(json_t *a) {
    std::vector<int32_t> v;
    size_t i;
    json_t *x;
    json_array_foreach(a, i, x) v.push_back((int32_t)json_integer_value(x));
    return v;
}

// set: "prompts" (the Q4_1 file as llama.cpp runs it) or "reference_f32"
// (the same weights dequantized to F32, F32 KV cache).
bool load_golden(const char *set, std::vector<Prompt> *out, std::string *why) {
    std::string path = std::string(CP_SOURCE_DIR) + "/tests/golden/smollm2_golden.json";
    json_error_t err;
    json_t *root = json_load_file(path.c_str(), 0, &err);
    if (!root) {
        *why = path + ": " + err.text;
        return false;
    }
    json_t *arr = !strcmp(set, "prompts") ? json_object_get(root, "prompts")
                                          : json_object_get(json_object_get(root, set), "prompts");
    size_t i;
    json_t *p;
    json_array_foreach(arr, i, p) {
        Prompt g;
        g.name = json_string_value(json_object_get(p, "name"));
        g.prompt = ints(json_object_get(p, "prompt_ids"));
        g.generated = ints(json_object_get(p, "generated_ids"));
        size_t j;
        json_t *x;
        json_array_foreach(json_object_get(p, "greedy_margins"), j, x) g.margins.push_back(json_number_value(x));
        json_array_foreach(json_object_get(p, "positions"), j, x) {
            std::vector<std::pair<int, double>> row;
            size_t k;
            json_t *e;
            json_array_foreach(json_object_get(x, "top"), k, e)
                row.push_back({(int)json_integer_value(json_array_get(e, 0)), json_number_value(json_array_get(e, 1))});
            g.top.push_back(row);
            g.lse.push_back(json_number_value(json_object_get(x, "logsumexp")));
        }
        out->push_back(g);
    }
    json_decref(root);
    return !out->empty();
}

struct EngineDeleter {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
using EnginePtr = std::unique_ptr<cp_engine, EngineDeleter>;

// The engine for a golden set: the file as is with an fp16 KV cache (as
// llama.cpp ran it), or converted to F32 with an F32 KV cache.
EnginePtr make_engine(bool f32, std::string *why) {
    const char *model = getenv("CP_TEST_MODEL");
    if (!model || !fopen(model, "rb")) {
        *why = "default model not present (scripts/fetch_model.sh)";
        return nullptr;
    }
    cp_engine_opts o = {};
    o.model_path = model;
    o.n_threads = 2;
    o.n_ctx = 2048;
    o.kv_f32 = f32;
    o.convert_weights = f32;
    o.weight_dtype = CP_DTYPE_F32;
    cp_engine_t e = nullptr;
    if (cp_engine_init(&o, &e) != CP_OK) {
        *why = std::string("engine failed: ") + cp_last_error();
        return nullptr;
    }
    return EnginePtr(e);
}

bool collect(void *user, int32_t tok, const char *, size_t) {
    static_cast<std::vector<int32_t> *>(user)->push_back(tok);
    return true;
}

std::vector<int32_t> greedy(cp_engine_t e, const Prompt &g) {
    cp_gen_params p = {};
    p.sample.temperature = 0;
    p.max_tokens = (int)g.generated.size();
    p.ignore_eos = true;
    std::vector<int32_t> got;
    cp_gen_stats st;
    EXPECT_EQ(cp_engine_generate(e, g.prompt.data(), (int)g.prompt.size(), &p, collect, &got, &st), CP_OK)
        << cp_last_error();
    return got;
}

struct LogitStats {
    double max_logit = 0, mean_logit = 0, max_lse = 0, max_logprob = 0, mean_logprob = 0;
    size_t argmax_checked = 0, argmax_equal = 0;
    std::string worst_at;
};

// Teacher-forced logits at every position of prompt + continuation against
// the stored top-10 (id, logit) and logsumexp rows. Argmax agreement is
// counted on rows whose stored top-1/top-2 gap is at least min_margin.
LogitStats compare_logits(cp_engine_t e, const std::vector<Prompt> &gold, double min_margin) {
    const int vocab = cp_model_get_config(cp_engine_model(e))->n_vocab;
    LogitStats s;
    size_t count = 0;
    for (const Prompt &g : gold) {
        std::vector<int32_t> toks = g.prompt;
        toks.insert(toks.end(), g.generated.begin(), g.generated.end());
        EXPECT_EQ(toks.size(), g.top.size()) << g.name;
        std::vector<float> logits(toks.size() * (size_t)vocab);
        EXPECT_EQ(cp_engine_logits(e, toks.data(), (int)toks.size(), logits.data()), CP_OK) << cp_last_error();
        for (size_t t = 0; t < toks.size() && t < g.top.size(); t++) {
            const float *row = &logits[t * vocab];
            int am = (int)(std::max_element(row, row + vocab) - row);
            double mx = row[am], sum = 0;
            for (int i = 0; i < vocab; i++) sum += std::exp((double)row[i] - mx);
            double lse = mx + std::log(sum);
            s.max_lse = std::max(s.max_lse, std::fabs(lse - g.lse[t]));
            if (g.top[t][0].second - g.top[t][1].second >= min_margin) {
                s.argmax_checked++;
                s.argmax_equal += am == g.top[t][0].first;
            }
            for (auto &x : g.top[t]) {
                double dl = std::fabs(row[x.first] - x.second);
                double dp = std::fabs((row[x.first] - lse) - (x.second - g.lse[t]));
                s.mean_logit += dl;
                s.mean_logprob += dp;
                count++;
                if (dl > s.max_logit) {
                    s.max_logit = dl;
                    s.worst_at = g.name + " position " + std::to_string(t) + " token " + std::to_string(x.first);
                }
                s.max_logprob = std::max(s.max_logprob, dp);
            }
        }
    }
    s.mean_logit /= (double)count;
    s.mean_logprob /= (double)count;
    printf("vs llama.cpp: |logit| max %.6f mean %.6f (worst at %s), |logsumexp| max %.6f, |logprob| max %.6f mean "
           "%.6f, argmax %zu/%zu equal on rows with margin >= %.2f\n",
           s.max_logit, s.mean_logit, s.worst_at.c_str(), s.max_lse, s.max_logprob, s.mean_logprob,
           s.argmax_equal, s.argmax_checked, min_margin);
    return s;
}

class GoldenTest : public ::testing::Test {
  protected:
    void load(const char *set, bool f32) {
        if (!load_golden(set, &gold_, &why_)) GTEST_SKIP() << why_;
        engine_ = make_engine(f32, &why_);
        if (!engine_) {
            if (why_.rfind("engine failed", 0) == 0) FAIL() << why_;
            GTEST_SKIP() << why_;
        }
    }
    std::vector<Prompt> gold_;
    std::string why_;
    EnginePtr engine_;
};

// ---- the same weights in F32: our engine against llama.cpp's F32 run ----
// llama.cpp moves by 1e-4 against itself under batch changes in F32 (see
// tests/golden/README.md); measured here: |logit| at most 3.9e-5 over the
// 457 rows (the golden file rounds to 5 decimals). Bound 1e-3 leaves room for
// other summation orders and libm versions, while a wrong RoPE pair, norm,
// GQA mapping or position is off by whole logits. The smallest stored greedy
// margin is 0.051 > 2 x 1e-3, so the 32 greedy tokens must be equal.

class GoldenF32 : public GoldenTest {
  protected:
    void SetUp() override { load("reference_f32", true); }
};

TEST_F(GoldenF32, GreedyTokensEqualLlamaCpp) {
    for (const Prompt &g : gold_) {
        std::vector<int32_t> got = greedy(engine_.get(), g);
        ASSERT_EQ(got.size(), g.generated.size()) << g.name;
        for (size_t i = 0; i < got.size(); i++)
            ASSERT_EQ(got[i], g.generated[i]) << g.name << ": first difference at generated token " << i;
    }
}

TEST_F(GoldenF32, LogitsMatchLlamaCpp) {
    LogitStats s = compare_logits(engine_.get(), gold_, 0.0);
    EXPECT_LT(s.max_logit, 1e-3) << s.worst_at;
    EXPECT_LT(s.max_lse, 1e-3);
    EXPECT_EQ(s.argmax_equal, s.argmax_checked);
}

// ---- the Q4_1 file as llama.cpp runs it ---------------------------------
// Both engines quantize activations to 8 bits per block before the Q4_1 dot
// products; a last-bit difference before that flips int8 roundings, which 30
// layers amplify to about one logit. llama.cpp differs from itself by up to
// 1.6 logits (max) / 0.10 (mean of the top-10) between batched and
// token-by-token prefill, and flips argmax on rows with margins up to 0.35.
// Measured here: |logit| max 1.01, mean 0.16, |logsumexp| max 0.58, argmax
// equal on all 324 rows with margin >= 0.5, greedy equal for 148 of 192
// tokens (32/32 on two prompts).
// Bounds: |logit| <= 2.0, mean <= 0.3, |logsumexp| <= 1.5; argmax equal on
// every row whose margin is >= 0.5; greedy tokens equal up to the first
// step where llama.cpp's own margin is < 0.5 (past it both continuations are
// legitimate).

class GoldenQ4 : public GoldenTest {
  protected:
    void SetUp() override { load("prompts", false); }
};

TEST_F(GoldenQ4, GreedyTokensEqualLlamaCppUpToTheFirstNearTie) {
    int total = 0;
    for (const Prompt &g : gold_) {
        std::vector<int32_t> got = greedy(engine_.get(), g);
        ASSERT_EQ(got.size(), g.generated.size()) << g.name;
        size_t same = 0;
        while (same < got.size() && got[same] == g.generated[same]) same++;
        size_t firm = 0;
        while (firm < g.margins.size() && g.margins[firm] >= 0.5) firm++;
        printf("%-14s %2zu/32 greedy tokens equal (first near-tie at step %zu)\n", g.name.c_str(), same, firm);
        EXPECT_GE(same, firm) << g.name << ": differs at step " << same << " where llama.cpp's margin was "
                              << g.margins[same];
        total += (int)same;
    }
    RecordProperty("greedy_tokens_equal", total);
}

TEST_F(GoldenQ4, LogitsMatchLlamaCppWithinItsOwnNoise) {
    LogitStats s = compare_logits(engine_.get(), gold_, 0.5);
    EXPECT_LT(s.max_logit, 2.0) << s.worst_at;
    EXPECT_LT(s.mean_logit, 0.3);
    EXPECT_LT(s.max_lse, 1.5);
    EXPECT_EQ(s.argmax_equal, s.argmax_checked);
}

// Running the same prompt twice gives bit-identical logits (no state leaks
// between requests, deterministic thread split).
TEST_F(GoldenQ4, Deterministic) {
    const Prompt &g = gold_[0];
    const int vocab = cp_model_get_config(cp_engine_model(engine_.get()))->n_vocab;
    std::vector<float> a(g.prompt.size() * (size_t)vocab), b(a.size());
    ASSERT_EQ(cp_engine_logits(engine_.get(), g.prompt.data(), (int)g.prompt.size(), a.data()), CP_OK);
    ASSERT_EQ(cp_engine_logits(engine_.get(), g.prompt.data(), (int)g.prompt.size(), b.data()), CP_OK);
    EXPECT_EQ(0, memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

}  // namespace
