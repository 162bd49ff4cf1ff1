// test_model.cc - the forward pass of small random-weight models written as
// GGUF, against an independent fp64 implementation of the Llama
// architecture in this file; prefill vs decode vs interleaved sequences over
// the paged cache; load-time shape checks and batch validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "common/gguf_builder.h"
#include "common/logit_top.h"
#include "common/tiny_model.h"

extern "C" {
#include "cp_gguf.h"
#include "cp_model.h"
#include "cp_safetensors.h"
}

using cptest::GgufBuilder;
using namespace cptest;

namespace {

// ---- independent fp64 reference ------------------------------------------

using Vec = std::vector<double>;

Vec matvec(const Mat &w, int rows, int cols, const Vec &x, const Mat *bias = nullptr) {
    Vec y(rows, 0.0);
    for (int r = 0; r < rows; r++) {
        double acc = bias && !bias->empty() ? (*bias)[r] : 0.0;
        for (int c = 0; c < cols; c++) acc += (double)w[(size_t)r * cols + c] * x[c];
        y[r] = acc;
    }
    return y;
}

Vec rmsnorm(const Vec &x, const Mat &w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    double inv = 1.0 / std::sqrt(ss / x.size() + 1e-5);
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = x[i] * inv * w[i];
    return y;
}

void rope(Vec &x, int n_head, int hd, int pos, double theta, bool half) {
    for (int h = 0; h < n_head; h++) {
        double *v = &x[(size_t)h * hd];
        for (int i = 0; i < hd / 2; i++) {
            double ang = pos * std::pow(theta, -2.0 * i / hd);
            double c = std::cos(ang), s = std::sin(ang);
            int a = half ? i : 2 * i, b = half ? i + hd / 2 : 2 * i + 1;
            double x0 = v[a], x1 = v[b];
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

// Logits [n][vocab] for a whole sequence, causal, no cache tricks.
std::vector<Vec> reference_logits(const TinyModel &m, const std::vector<int> &toks) {
    const TinySpec &s = m.s;
    int hd = m.hd, Q = s.n_head * hd, KV = s.n_head_kv * hd, n = (int)toks.size();
    bool half = s.arch == "qwen2";
    std::vector<Vec> x(n, Vec(s.dim));
    for (int t = 0; t < n; t++)
        for (int i = 0; i < s.dim; i++) x[t][i] = m.embd[(size_t)toks[t] * s.dim + i];
    for (int l = 0; l < s.n_layer; l++) {
        const auto &y = m.L[l];
        std::vector<Vec> q(n), k(n), v(n);
        for (int t = 0; t < n; t++) {
            Vec xn = rmsnorm(x[t], y.an);
            q[t] = matvec(y.wq, Q, s.dim, xn, &y.bq);
            k[t] = matvec(y.wk, KV, s.dim, xn, &y.bk);
            v[t] = matvec(y.wv, KV, s.dim, xn, &y.bv);
            rope(q[t], s.n_head, hd, t, s.theta, half);
            rope(k[t], s.n_head_kv, hd, t, s.theta, half);
        }
        for (int t = 0; t < n; t++) {
            Vec att(Q, 0.0);
            for (int h = 0; h < s.n_head; h++) {
                int kh = h / (s.n_head / s.n_head_kv);
                std::vector<double> sc(t + 1);
                double mx = -1e300;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += q[t][h * hd + i] * k[j][kh * hd + i];
                    sc[j] = d / std::sqrt((double)hd);
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (auto &e : sc) sum += (e = std::exp(e - mx));
                for (int j = 0; j <= t; j++)
                    for (int i = 0; i < hd; i++) att[h * hd + i] += sc[j] / sum * v[j][kh * hd + i];
            }
            Vec o = matvec(y.wo, s.dim, Q, att);
            for (int i = 0; i < s.dim; i++) x[t][i] += o[i];
            Vec xn = rmsnorm(x[t], y.fn);
            Vec g = matvec(y.wg, s.ffn, s.dim, xn), u = matvec(y.wu, s.ffn, s.dim, xn);
            for (int i = 0; i < s.ffn; i++) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
            Vec d = matvec(y.wd, s.dim, s.ffn, g);
            for (int i = 0; i < s.dim; i++) x[t][i] += d[i];
        }
    }
    std::vector<Vec> logits(n);
    for (int t = 0; t < n; t++) logits[t] = matvec(m.out, s.vocab, s.dim, rmsnorm(x[t], m.out_norm));
    return logits;
}

// ---- harness -----------------------------------------------------------------

struct Env {
    cp_backend_t be = nullptr;
    cp_model_t model = nullptr;
    cp_kv_cache_t kv = nullptr;
    ~Env() {
        cp_kv_cache_free(kv);
        cp_model_free(model);
        cp_backend_free(be);
    }
};

void open_env(Env &e, const std::string &path, cp_dtype kv_dtype, int n_blocks = 64, int block = 4) {
    ASSERT_EQ(cp_backend_cpu_init(2, &e.be), CP_OK) << cp_last_error();
    cp_model_load_opts o = {};
    o.backend = e.be;
    ASSERT_EQ(cp_model_load(path.c_str(), &o, &e.model), CP_OK) << cp_last_error();
    cp_kv_cache_opts ko = {n_blocks, block, kv_dtype};
    ASSERT_EQ(cp_kv_cache_init(e.model, &ko, &e.kv), CP_OK) << cp_last_error();
}

// max over rows of max |got-ref| / (max |ref| of the row)
double max_rel_err(const std::vector<float> &got, const std::vector<Vec> &ref, int vocab) {
    double worst = 0;
    for (size_t t = 0; t < ref.size(); t++) {
        double scale = 0, err = 0;
        for (int i = 0; i < vocab; i++) {
            scale = std::max(scale, std::fabs(ref[t][i]));
            err = std::max(err, std::fabs(got[t * vocab + i] - ref[t][i]));
        }
        worst = std::max(worst, err / scale);
    }
    return worst;
}

std::vector<int> some_tokens(int n, int vocab, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int> t(n);
    for (auto &x : t) x = (int)(rng() % vocab);
    return t;
}

struct Case {
    const char *name;
    TinySpec spec;
    cp_dtype kv;
    double tol;
};

class ModelVsReference : public ::testing::TestWithParam<Case> {};

// One prefill batch of the whole sequence, every position's logits.
TEST_P(ModelVsReference, PrefillMatchesFp64) {
    const Case &c = GetParam();
    TinyModel tm = make_model(c.spec, 1234);
    Env e;
    open_env(e, write_gguf(tm, std::string("prefill_") + c.name), c.kv);
    if (HasFatalFailure()) return;
    const int n = 37, V = c.spec.vocab;
    auto toks = some_tokens(n, V, 7);
    std::vector<int32_t> tok(toks.begin(), toks.end()), pos(n), seq(n, 0), rows(n);
    for (int i = 0; i < n; i++) pos[i] = rows[i] = i;
    // blocks in a shuffled physical order
    std::vector<int32_t> table = {9, 3, 14, 0, 7, 11, 2, 5, 13, 1, 4, 6};
    cp_batch b = {n, tok.data(), pos.data(), seq.data(), table.data(), 1, (int)table.size(), rows.data(), n};
    std::vector<float> logits((size_t)n * V, NAN);
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &b, logits.data()), CP_OK) << cp_last_error();
    auto ref = reference_logits(tm, toks);
    double err = max_rel_err(logits, ref, V);
    EXPECT_LT(err, c.tol) << "max relative logit error " << err;
}

// The same sequence fed one token at a time equals the prefill result:
// decode reads what earlier steps wrote into the paged cache.
TEST_P(ModelVsReference, DecodeStepByStepMatchesFp64) {
    const Case &c = GetParam();
    TinyModel tm = make_model(c.spec, 99);
    Env e;
    open_env(e, write_gguf(tm, std::string("decode_") + c.name), c.kv);
    if (HasFatalFailure()) return;
    const int n = 23, V = c.spec.vocab;
    auto toks = some_tokens(n, V, 11);
    std::vector<int32_t> table = {5, 2, 8, 0, 1, 3};
    std::vector<float> logits((size_t)n * V, NAN);
    for (int i = 0; i < n; i++) {
        int32_t tok = toks[i], pos = i, seq = 0, row = 0;
        cp_batch b = {1, &tok, &pos, &seq, table.data(), 1, (int)table.size(), &row, 1};
        ASSERT_EQ(cp_model_forward(e.model, e.kv, &b, logits.data() + (size_t)i * V), CP_OK) << cp_last_error();
    }
    auto ref = reference_logits(tm, toks);
    double err = max_rel_err(logits, ref, V);
    EXPECT_LT(err, c.tol) << "max relative logit error " << err;
}

// Two sequences of different lengths interleaved in one batch, then a
// decode step for both in one batch.
TEST_P(ModelVsReference, InterleavedSequencesMatchFp64) {
    const Case &c = GetParam();
    TinyModel tm = make_model(c.spec, 5);
    Env e;
    open_env(e, write_gguf(tm, std::string("multi_") + c.name), c.kv);
    if (HasFatalFailure()) return;
    const int V = c.spec.vocab;
    auto a = some_tokens(13, V, 21), bseq = some_tokens(6, V, 22);
    // block tables: [2][5]
    std::vector<int32_t> tables = {4, 10, 1, 7, 12, /* seq 1 */ 3, 0, 9, 2, 8};
    std::vector<int32_t> tok, pos, seq;
    size_t ia = 0, ib = 0;
    while (ia < 12 || ib < 5) {  // leave the last token of each for decode
        if (ia < 12) { tok.push_back(a[ia]); pos.push_back((int)ia); seq.push_back(0); ia++; }
        if (ib < 5 && ia % 2 == 0) { tok.push_back(bseq[ib]); pos.push_back((int)ib); seq.push_back(1); ib++; }
    }
    cp_batch b = {(int)tok.size(), tok.data(), pos.data(), seq.data(), tables.data(), 2, 5, nullptr, 0};
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &b, nullptr), CP_OK) << cp_last_error();
    int32_t t2[2] = {a[12], bseq[5]}, p2[2] = {12, 5}, s2[2] = {0, 1}, r2[2] = {0, 1};
    cp_batch d = {2, t2, p2, s2, tables.data(), 2, 5, r2, 2};
    std::vector<float> logits(2 * (size_t)V, NAN);
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &d, logits.data()), CP_OK) << cp_last_error();
    auto ra = reference_logits(tm, a), rb = reference_logits(tm, bseq);
    std::vector<Vec> last = {ra[12], rb[5]};
    double err = max_rel_err(logits, last, V);
    EXPECT_LT(err, c.tol) << "max relative logit error " << err;
}

TinySpec qwen_like() {
    TinySpec s;
    s.arch = "qwen2";
    s.bias = true;
    s.tied = true;
    s.n_head = 8;
    s.n_head_kv = 2;
    s.theta = 1000000.0f;
    return s;
}

TinySpec mha() {
    TinySpec s;
    s.n_head = 2;
    s.n_head_kv = 2;
    s.dim = 96;
    s.ffn = 200;
    s.n_layer = 3;
    return s;
}

// Tolerances (relative to the largest |logit| of the row): fp32 weights and
// activations against fp64 measured at most 1.1e-6; 1e-5 leaves room for
// other summation orders while a wrong index or missing term shows up at
// 1e-2 or more. An fp16 cache rounds K and V to 11 significant bits (rel.
// 4.9e-4); measured at most 9.3e-4, bound 3e-3.
// cp_model_forward_top on one rank: each row's candidates, log-sum-exp and
// (when asked) full logits are exactly those of cp_model_forward's rows, for
// a prompt batch (chunks of the LM head) and for a decode step; k larger
// than the vocabulary pads with id -1.
TEST(ForwardTop, EqualsTheFullRowsSearched) {
    TinyModel tm = make_model(TinySpec{}, 77);
    Env e;
    open_env(e, write_gguf(tm, "top_one_rank"), CP_DTYPE_F32);
    if (HasFatalFailure()) return;
    const int n = 37, V = TinySpec{}.vocab;
    auto toks = some_tokens(n, V, 3);
    std::vector<int32_t> tok(toks.begin(), toks.end()), pos(n), seq(n, 0), rows(n);
    for (int i = 0; i < n; i++) pos[i] = rows[i] = i;
    std::vector<int32_t> table = {9, 3, 14, 0, 7, 11, 2, 5, 13, 1, 4, 6};
    cp_batch b = {n, tok.data(), pos.data(), seq.data(), table.data(), 1, (int)table.size(), rows.data(), n};
    std::vector<float> full((size_t)n * V, NAN);
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &b, full.data()), CP_OK) << cp_last_error();
    std::vector<uint8_t> need(n);
    for (int i = 0; i < n; i++) need[i] = (uint8_t)(i % 4 | (i % 5 == 2 ? CP_TOP_TARGET : 0)); // none, full, lse, both
    for (int k : {1, 7, V + 3}) {
        TopOut o(k, n, V, need);
        cp_logit_top t = o.view();
        ASSERT_EQ(cp_model_forward_top(e.model, e.kv, &b, &t), CP_OK) << cp_last_error();
        SCOPED_TRACE("k = " + std::to_string(k));
        expect_top_matches_full(o, full, 0);
    }
    // one decode row after the prompt
    int32_t t1 = toks[5], p1 = n, s1 = 0, r1 = 0;
    cp_batch d = {1, &t1, &p1, &s1, table.data(), 1, (int)table.size(), &r1, 1};
    std::vector<float> row(V, NAN);
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &d, row.data()), CP_OK) << cp_last_error();
    TopOut o(4, 1, V, {CP_TOP_LSE});
    cp_logit_top t = o.view();
    ASSERT_EQ(cp_model_forward_top(e.model, e.kv, &d, &t), CP_OK) << cp_last_error();
    expect_top_matches_full(o, row, 0);
    // bad requests: k out of range, a full row wanted without a buffer
    t.k = 0;
    EXPECT_EQ(cp_model_forward_top(e.model, e.kv, &d, &t), CP_ERR_INVALID_ARG);
    t.k = CP_MODEL_MAX_TOP + 1;
    EXPECT_EQ(cp_model_forward_top(e.model, e.kv, &d, &t), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("outside 1.."), std::string::npos) << cp_last_error();
    TopOut f(4, 1, V, {CP_TOP_FULL});
    cp_logit_top tf = f.view();
    tf.logits = nullptr;
    EXPECT_EQ(cp_model_forward_top(e.model, e.kv, &d, &tf), CP_ERR_INVALID_ARG);
    // a target token outside the vocabulary is named
    TopOut g(4, 1, V, {CP_TOP_TARGET});
    g.target[0] = V;
    cp_logit_top tg = g.view();
    EXPECT_EQ(cp_model_forward_top(e.model, e.kv, &d, &tg), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find("target token"), std::string::npos) << cp_last_error();
}

INSTANTIATE_TEST_SUITE_P(Tiny, ModelVsReference,
                         ::testing::Values(Case{"llama_gqa_f32", TinySpec{}, CP_DTYPE_F32, 1e-5},
                                           Case{"llama_gqa_f16kv", TinySpec{}, CP_DTYPE_F16, 3e-3},
                                           Case{"qwen2_bias_tied", qwen_like(), CP_DTYPE_F32, 1e-5},
                                           Case{"mha_odd_ffn", mha(), CP_DTYPE_F32, 1e-5}),
                         [](const ::testing::TestParamInfo<Case> &i) { return std::string(i.param.name); });

TEST(ModelLoad, ShapeMismatchNamesTheTensor) {
    TinyModel tm = make_model(TinySpec{}, 3);
    std::string path = write_gguf(tm, "badshape", -1, true);
    cp_backend_t be;
    ASSERT_EQ(cp_backend_cpu_init(1, &be), CP_OK);
    cp_model_load_opts o = {};
    o.backend = be;
    cp_model_t m = nullptr;
    EXPECT_EQ(cp_model_load(path.c_str(), &o, &m), CP_ERR_FORMAT);
    EXPECT_EQ(m, nullptr);
    std::string msg = cp_last_error_detail();
    EXPECT_NE(msg.find("blk.1.attn_q.weight"), std::string::npos) << msg;
    cp_backend_free(be);
}

TEST(ModelLoad, MissingTensorNamesTheTensor) {
    TinyModel tm = make_model(TinySpec{}, 3);
    std::string path = write_gguf(tm, "missing", 0);
    cp_backend_t be;
    ASSERT_EQ(cp_backend_cpu_init(1, &be), CP_OK);
    cp_model_load_opts o = {};
    o.backend = be;
    cp_model_t m = nullptr;
    EXPECT_EQ(cp_model_load(path.c_str(), &o, &m), CP_ERR_FORMAT);
    EXPECT_NE(std::string(cp_last_error_detail()).find("blk.0.attn_v.weight"), std::string::npos);
    cp_backend_free(be);
}

TEST(ModelLoad, UnsupportedArchitecture) {
    TinySpec s;
    s.arch = "mamba";
    TinyModel tm = make_model(s, 3);
    std::string path = write_gguf(tm, "mamba");
    cp_backend_t be;
    ASSERT_EQ(cp_backend_cpu_init(1, &be), CP_OK);
    cp_model_load_opts o = {};
    o.backend = be;
    cp_model_t m = nullptr;
    EXPECT_EQ(cp_model_load(path.c_str(), &o, &m), CP_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(cp_last_error_detail()).find("mamba"), std::string::npos);
    cp_backend_free(be);
}

TEST(ModelForward, RejectsBadBatches) {
    TinyModel tm = make_model(TinySpec{}, 8);
    Env e;
    open_env(e, write_gguf(tm, "badbatch"), CP_DTYPE_F32, 8, 4);
    if (HasFatalFailure()) return;
    int32_t table[2] = {0, 1}, seq = 0, row = 0;
    float logits[64];
    {
        int32_t tok = 50, pos = 0;  // vocab is 50
        cp_batch b = {1, &tok, &pos, &seq, table, 1, 2, &row, 1};
        EXPECT_EQ(cp_model_forward(e.model, e.kv, &b, logits), CP_ERR_INVALID_ARG);
        EXPECT_NE(std::string(cp_last_error_detail()).find("token id 50"), std::string::npos);
    }
    {
        int32_t tok = 1, pos = 8;  // 2 blocks of 4 slots
        cp_batch b = {1, &tok, &pos, &seq, table, 1, 2, &row, 1};
        EXPECT_EQ(cp_model_forward(e.model, e.kv, &b, logits), CP_ERR_INVALID_ARG);
    }
    {
        int32_t bad_table[2] = {0, 99}, tok = 1, pos = 5;
        cp_batch b = {1, &tok, &pos, &seq, bad_table, 1, 2, &row, 1};
        EXPECT_EQ(cp_model_forward(e.model, e.kv, &b, logits), CP_ERR_INVALID_ARG);
        EXPECT_NE(std::string(cp_last_error_detail()).find("block id 99"), std::string::npos);
    }
}

// The names of the context-parallel exchanges, both ways.
TEST(ModelOptions, ExchangeNamesRoundTrip) {
    for (int x : {CP_CP_AUTO, CP_CP_QUERIES, CP_CP_KV, CP_CP_RING}) {
        int back = -1;
        EXPECT_TRUE(cp_cp_exchange_parse(cp_cp_exchange_name(x), &back)) << x;
        EXPECT_EQ(back, x);
    }
    EXPECT_STREQ(cp_cp_exchange_name(CP_CP_KV), "kv");
    EXPECT_STREQ(cp_cp_exchange_name(CP_CP_RING), "ring");
    EXPECT_STREQ(cp_cp_exchange_name(4), "?");
    EXPECT_STREQ(cp_cp_exchange_name(-1), "?");
    int v = 7;
    EXPECT_FALSE(cp_cp_exchange_parse("sideways", &v));
    EXPECT_EQ(v, 7) << "a bad name leaves the value alone";
}

TEST(KvCache, AllocatorCountsAndRefs) {
    TinyModel tm = make_model(TinySpec{}, 8);
    Env e;
    open_env(e, write_gguf(tm, "kvalloc"), CP_DTYPE_F16, 6, 4);
    if (HasFatalFailure()) return;
    EXPECT_EQ(cp_kv_cache_n_free(e.kv), 6);
    int32_t ids[6];
    ASSERT_EQ(cp_kv_cache_alloc_blocks(e.kv, 4, ids), CP_OK);
    EXPECT_EQ(cp_kv_cache_n_free(e.kv), 2);
    EXPECT_EQ(cp_kv_cache_alloc_blocks(e.kv, 3, ids + 4), CP_ERR_OOM);
    EXPECT_EQ(cp_kv_cache_n_free(e.kv), 2);  // nothing taken on failure
    cp_kv_cache_retain_block(e.kv, ids[0]);
    cp_kv_cache_release_blocks(e.kv, ids, 4);
    EXPECT_EQ(cp_kv_cache_n_free(e.kv), 5);  // ids[0] still referenced once
    cp_kv_cache_release_blocks(e.kv, ids, 1);
    EXPECT_EQ(cp_kv_cache_n_free(e.kv), 6);
    std::vector<int32_t> all(6);
    ASSERT_EQ(cp_kv_cache_alloc_blocks(e.kv, 6, all.data()), CP_OK);
    std::sort(all.begin(), all.end());
    for (int i = 0; i < 6; i++) EXPECT_EQ(all[i], i);
}

// Hugging Face checkpoints keep Q/K rows in half-split RoPE order; GGUF
// llama files permute them for interleaved RoPE. Rows (j*hd/2 + i) of a head
// in HF order are rows (2i + j) in GGUF order.
Mat to_hf_rows(const Mat &w, int n_head, int hd, int cols) {
    Mat out(w.size());
    for (int h = 0; h < n_head; h++)
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < hd / 2; i++) {
                const float *src = &w[((size_t)h * hd + 2 * i + j) * cols];
                std::copy(src, src + cols, &out[((size_t)h * hd + j * (hd / 2) + i) * cols]);
            }
    return out;
}

std::string write_hf_dir(const TinyModel &m, const std::string &name) {
    const TinySpec &s = m.s;
    std::string dir = ::testing::TempDir() + name;
    mkdir(dir.c_str(), 0755);
    FILE *f = fopen((dir + "/config.json").c_str(), "w");
    fprintf(f,
            "{\"model_type\": \"llama\", \"vocab_size\": %d, \"hidden_size\": %d, \"num_hidden_layers\": %d,"
            " \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"intermediate_size\": %d,"
            " \"max_position_embeddings\": %d, \"rms_norm_eps\": 1e-5, \"rope_theta\": %g,"
            " \"tie_word_embeddings\": false, \"hidden_act\": \"silu\"}\n",
            s.vocab, s.dim, s.n_layer, s.n_head, s.n_head_kv, s.ffn, s.ctx, (double)s.theta);
    fclose(f);
    cp_st_writer_t w;
    EXPECT_EQ(cp_st_writer_init(&w), CP_OK);
    std::vector<Mat> keep;  // the writer borrows data until finish
    auto add = [&](const std::string &n, const Mat &v, std::vector<int64_t> shape) {
        keep.push_back(v);
        EXPECT_EQ(cp_st_writer_add(w, n.c_str(), CP_ST_F32, (int)shape.size(), shape.data(), keep.back().data(),
                                   keep.back().size() * 4),
                  CP_OK)
            << cp_last_error();
    };
    keep.reserve(64);
    int64_t D = s.dim, Q = (int64_t)s.n_head * m.hd, KV = (int64_t)s.n_head_kv * m.hd, F = s.ffn;
    add("model.embed_tokens.weight", m.embd, {s.vocab, D});
    add("lm_head.weight", m.out, {s.vocab, D});
    add("model.norm.weight", m.out_norm, {D});
    for (int l = 0; l < s.n_layer; l++) {
        const auto &y = m.L[l];
        std::string p = "model.layers." + std::to_string(l) + ".";
        add(p + "input_layernorm.weight", y.an, {D});
        add(p + "self_attn.q_proj.weight", to_hf_rows(y.wq, s.n_head, m.hd, s.dim), {Q, D});
        add(p + "self_attn.k_proj.weight", to_hf_rows(y.wk, s.n_head_kv, m.hd, s.dim), {KV, D});
        add(p + "self_attn.v_proj.weight", y.wv, {KV, D});
        add(p + "self_attn.o_proj.weight", y.wo, {D, Q});
        add(p + "post_attention_layernorm.weight", y.fn, {D});
        add(p + "mlp.gate_proj.weight", y.wg, {F, D});
        add(p + "mlp.up_proj.weight", y.wu, {F, D});
        add(p + "mlp.down_proj.weight", y.wd, {D, F});
    }
    EXPECT_EQ(cp_st_writer_finish(w, (dir + "/model.safetensors").c_str()), CP_OK) << cp_last_error();
    cp_st_writer_free(w);
    return dir;
}

// The same weights as a Hugging Face directory (half-split RoPE, HF names,
// F32 safetensors) give the logits of the fp64 reference too.
TEST(ModelLoad, HuggingFaceDirectoryMatchesFp64) {
    TinyModel tm = make_model(TinySpec{}, 77);
    std::string dir = write_hf_dir(tm, "hf_tiny");
    Env e;
    open_env(e, dir, CP_DTYPE_F32);
    if (HasFatalFailure()) return;
    EXPECT_EQ(cp_model_get_config(e.model)->rope_mode, CP_ROPE_HALF);
    const int n = 19, V = tm.s.vocab;
    auto toks = some_tokens(n, V, 3);
    std::vector<int32_t> tok(toks.begin(), toks.end()), pos(n), seq(n, 0), rows(n);
    for (int i = 0; i < n; i++) pos[i] = rows[i] = i;
    std::vector<int32_t> table = {3, 1, 4, 0, 2};
    cp_batch b = {n, tok.data(), pos.data(), seq.data(), table.data(), 1, (int)table.size(), rows.data(), n};
    std::vector<float> logits((size_t)n * V, NAN);
    ASSERT_EQ(cp_model_forward(e.model, e.kv, &b, logits.data()), CP_OK) << cp_last_error();
    double err = max_rel_err(logits, reference_logits(tm, toks), V);
    EXPECT_LT(err, 1e-5) << "max relative logit error " << err;
}

}  // namespace
