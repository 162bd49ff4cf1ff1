// test_eval.cc - cp_eval_text against a direct computation from
// cp_engine_logits (perplexity, KL divergence, top-1 agreement), the
// sliding-window bookkeeping, a model against itself, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cp_eval.h"
#include "cp_model.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"

namespace {

struct EngineDel {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
using EnginePtr = std::unique_ptr<cp_engine, EngineDel>;

std::string model_path() {
    const char *e = getenv("CP_TEST_MODEL");
    return (e && *e) ? e : CP_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

EnginePtr make_engine(bool convert_q8 = false) {
    std::string path = model_path();
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) return nullptr;
    fclose(f);
    cp_engine_opts o = {};
    o.model_path = path.c_str();
    o.n_threads = 2;
    o.n_ctx = 128;
    o.n_seq = 1;
    o.kv_f32 = true;
    if (convert_q8) {
        o.convert_weights = true;
        o.weight_dtype = CP_DTYPE_Q8_0;
    }
    cp_engine_t e = nullptr;
    EXPECT_EQ(cp_engine_init(&o, &e), CP_OK) << cp_last_error();
    return EnginePtr(e);
}

#define NEED(e)                                                                                    \
    if (!(e)) GTEST_SKIP() << "default model not present (CP_TEST_MODEL)"

std::vector<int32_t> text_tokens(cp_engine_t e) {
    const std::string text =
        "The quick brown fox jumps over the lazy dog. Evaluation text is scored one token at a "
        "time: the model predicts each token from the ones before it, and the perplexity is the "
        "exponential of the mean negative log-likelihood. A sliding window keeps the context "
        "long while the text is longer than the window, so every token after the first window "
        "is predicted from at least half a window of text before it.";
    int32_t *ids = nullptr;
    size_t n = 0;
    EXPECT_EQ(cp_tokenizer_encode(cp_engine_tokenizer(e), text.data(), text.size(), true, false,
                                  &ids, &n),
              CP_OK);
    std::vector<int32_t> v(ids, ids + n);
    free(ids);
    return v;
}

// log p(.) of every row of logits[rows][V], in double
std::vector<double> log_softmax(const std::vector<float> &z, int V, int row) {
    const float *a = z.data() + (size_t)row * V;
    double mx = *std::max_element(a, a + V), s = 0;
    for (int v = 0; v < V; v++) s += std::exp((double)a[v] - mx);
    std::vector<double> out(V);
    for (int v = 0; v < V; v++) out[v] = (double)a[v] - mx - std::log(s);
    return out;
}

struct Ref {
    double nll = 0, ref_nll = 0, kl = 0;
    int64_t n = 0, agree = 0;
    int windows = 0;
    std::vector<double> d; // per scored token: its nll under m minus under r
};

// The sliding window written out plainly: windows [b, b + ctx) every stride
// tokens; token t is scored once, in the first window holding it and t - 1.
Ref reference(cp_engine_t m, cp_engine_t r, const std::vector<int32_t> &t, int ctx, int stride) {
    const int V = cp_model_get_config(cp_engine_model(m))->n_vocab;
    Ref out;
    std::vector<bool> done(t.size(), false);
    for (size_t b = 0; b < t.size(); b += stride) {
        size_t e = std::min(t.size(), b + ctx);
        int len = (int)(e - b);
        std::vector<float> zm((size_t)len * V), zr((size_t)len * V);
        EXPECT_EQ(cp_engine_logits(m, t.data() + b, len, zm.data()), CP_OK);
        EXPECT_EQ(cp_engine_logits(r, t.data() + b, len, zr.data()), CP_OK);
        for (size_t i = b + 1; i < e; i++) {
            if (done[i]) continue;
            done[i] = true;
            std::vector<double> lm = log_softmax(zm, V, (int)(i - 1 - b));
            std::vector<double> lr = log_softmax(zr, V, (int)(i - 1 - b));
            out.nll -= lm[t[i]];
            out.ref_nll -= lr[t[i]];
            out.d.push_back(lr[t[i]] - lm[t[i]]);
            double d = 0;
            for (int v = 0; v < V; v++) d += std::exp(lr[v]) * (lr[v] - lm[v]);
            out.kl += d;
            out.agree += std::max_element(lm.begin(), lm.end()) - lm.begin() ==
                         std::max_element(lr.begin(), lr.end()) - lr.begin();
            out.n++;
        }
        out.windows++;
        if (e == t.size()) break;
    }
    return out;
}

TEST(Eval, MatchesADirectComputation) {
    EnginePtr m = make_engine(), r = make_engine(true);
    NEED(m);
    ASSERT_TRUE(r);
    std::vector<int32_t> t = text_tokens(m.get());
    ASSERT_GT(t.size(), 70u);
    for (int stride : {10, 31}) {
        const int ctx = 32;
        Ref ref = reference(m.get(), r.get(), t, ctx, stride);
        cp_eval_opts o = {};
        o.ctx = ctx;
        o.stride = stride;
        cp_eval_result res;
        ASSERT_EQ(cp_eval_text(m.get(), r.get(), t.data(), t.size(), &o, &res), CP_OK)
            << cp_last_error();
        EXPECT_EQ(ref.n, (int64_t)t.size() - 1); // every token but the first, once
        EXPECT_EQ(res.n_scored, ref.n);
        EXPECT_EQ(res.n_windows, ref.windows);
        EXPECT_NEAR(res.nll, ref.nll / ref.n, 1e-9);
        EXPECT_NEAR(res.ppl, std::exp(ref.nll / ref.n), 1e-6 * res.ppl);
        EXPECT_NEAR(res.ref_nll, ref.ref_nll / ref.n, 1e-9);
        EXPECT_NEAR(res.kl_mean, ref.kl / ref.n, 1e-9);
        EXPECT_DOUBLE_EQ(res.top1, (double)ref.agree / ref.n);
        EXPECT_LE(res.kl_p50, res.kl_p99);
        EXPECT_LE(res.kl_p99, res.kl_max);
        // 8-bit weights stay close to the stored 4-bit ones, yet not equal
        EXPECT_GT(res.kl_mean, 0.0);
        EXPECT_LT(res.kl_mean, 0.5);
        EXPECT_GT(res.top1, 0.6);
        // alone the model is scored from each row's log-sum-exp and the next
        // token's logit (cp_engine_logit_top): on one rank the same bits
        cp_eval_result alone;
        ASSERT_EQ(cp_eval_text(m.get(), nullptr, t.data(), t.size(), &o, &alone), CP_OK) << cp_last_error();
        EXPECT_EQ(alone.n_scored, res.n_scored);
        EXPECT_EQ(alone.nll, res.nll);
    }
}

// The 95% interval of the perplexity ratio from batch means, written out
// with its own Student t quantiles; it holds the ratio itself.
TEST(Eval, IntervalOfThePerplexityRatio) {
    EnginePtr m = make_engine(), r = make_engine(true);
    NEED(m);
    ASSERT_TRUE(r);
    const std::vector<int32_t> one = text_tokens(m.get());
    std::vector<int32_t> t;
    for (int i = 0; i < 3; i++) t.insert(t.end(), one.begin(), one.end());
    const int ctx = 64, stride = 32;
    Ref ref = reference(m.get(), r.get(), t, ctx, stride);
    cp_eval_opts o = {};
    o.ctx = ctx;
    o.stride = stride;
    cp_eval_result res;
    ASSERT_EQ(cp_eval_text(m.get(), r.get(), t.data(), t.size(), &o, &res), CP_OK) << cp_last_error();
    const int nb = (int)(ref.d.size() / CP_EVAL_BATCH);
    ASSERT_GE(nb, CP_EVAL_MIN_BATCHES);
    EXPECT_EQ(res.n_batches, nb);
    std::vector<double> means(nb, 0.0);
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < CP_EVAL_BATCH; i++) means[b] += ref.d[(size_t)b * CP_EVAL_BATCH + i];
        means[b] /= CP_EVAL_BATCH;
    }
    double mb = 0, var = 0;
    for (double x : means) mb += x / nb;
    for (double x : means) var += (x - mb) * (x - mb) / (nb - 1);
    const double tq[] = {2.776, 2.571, 2.447, 2.365, 2.306, 2.262}; // df 4..9
    ASSERT_LE(nb - 1, 9);
    const double half = tq[nb - 1 - 4] * std::sqrt(var / nb), mean = (ref.nll - ref.ref_nll) / ref.n;
    EXPECT_NEAR(res.ratio_lo, std::exp(mean - half), 1e-9);
    EXPECT_NEAR(res.ratio_hi, std::exp(mean + half), 1e-9);
    const double ratio = res.ppl / res.ref_ppl;
    EXPECT_LT(res.ratio_lo, ratio);
    EXPECT_GT(res.ratio_hi, ratio);
    // against itself the interval closes on 1
    ASSERT_EQ(cp_eval_text(m.get(), m.get(), t.data(), t.size(), &o, &res), CP_OK);
    EXPECT_DOUBLE_EQ(res.ratio_lo, 1.0);
    EXPECT_DOUBLE_EQ(res.ratio_hi, 1.0);
    // too little text for an interval: none
    ASSERT_EQ(cp_eval_text(m.get(), r.get(), t.data(), 100, &o, &res), CP_OK);
    EXPECT_EQ(res.n_batches, 3);
    EXPECT_EQ(res.ratio_lo, 0.0);
    EXPECT_EQ(res.ratio_hi, 0.0);
}

TEST(Eval, OneWindowAndAModelAgainstItself) {
    EnginePtr m = make_engine();
    NEED(m);
    std::vector<int32_t> t = text_tokens(m.get());
    t.resize(40);
    const int V = cp_model_get_config(cp_engine_model(m.get()))->n_vocab;
    std::vector<float> z(t.size() * V);
    ASSERT_EQ(cp_engine_logits(m.get(), t.data(), (int)t.size(), z.data()), CP_OK);
    double nll = 0;
    for (size_t i = 1; i < t.size(); i++) nll -= log_softmax(z, V, (int)i - 1)[t[i]];
    cp_eval_opts o = {};
    o.ctx = 64; // the whole text in one window
    cp_eval_result res;
    ASSERT_EQ(cp_eval_text(m.get(), m.get(), t.data(), t.size(), &o, &res), CP_OK);
    EXPECT_EQ(res.n_windows, 1);
    EXPECT_EQ(res.stride, 32);
    EXPECT_NEAR(res.nll, nll / 39, 1e-9);
    EXPECT_DOUBLE_EQ(res.ref_ppl, res.ppl);
    EXPECT_LT(res.kl_max, 1e-12);
    EXPECT_DOUBLE_EQ(res.top1, 1.0);
}

TEST(Eval, BadInput) {
    EnginePtr m = make_engine();
    NEED(m);
    std::vector<int32_t> t = text_tokens(m.get());
    cp_eval_result res;
    cp_eval_opts o = {};
    EXPECT_EQ(cp_eval_text(m.get(), nullptr, t.data(), 1, &o, &res), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("at least 2"), std::string::npos);
    o.ctx = 256; // the engine holds 128
    EXPECT_EQ(cp_eval_text(m.get(), nullptr, t.data(), t.size(), &o, &res), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("does not fit the context"), std::string::npos);
    o.ctx = 32;
    o.stride = 32;
    EXPECT_EQ(cp_eval_text(m.get(), nullptr, t.data(), t.size(), &o, &res), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("unscored"), std::string::npos);
    o.stride = 0;
    std::vector<int32_t> bad = {1, 2, 1 << 30};
    EXPECT_EQ(cp_eval_text(m.get(), nullptr, bad.data(), bad.size(), &o, &res), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("outside the vocabulary"), std::string::npos);
    EXPECT_EQ(cp_eval_text(nullptr, nullptr, t.data(), t.size(), &o, &res), CP_ERR_INVALID_ARG);
}

} // namespace
