// test_synth.cc - the random-weight checkpoint writer: config.json fields,
// every tensor's name, shape and dtype as the safetensors reader sees it,
// weight statistics, norms of exactly 1, a forward pass through the engine,
// sharding with an index, byte-for-byte determinism across thread counts,
// and the refusals (unknown architecture, unusable directory, no space).
#include <gtest/gtest.h>
#include <jansson.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cp_dtype.h"
#include "cp_hf.h"
#include "cp_runtime.h"
#include "cp_safetensors.h"
#include "cp_synth.h"

namespace fs = std::filesystem;

namespace {

struct StDeleter {
    void operator()(cp_safetensors *s) const { cp_safetensors_close(s); }
};
struct EngineDeleter {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
struct JsonDeleter {
    void operator()(json_t *j) const { json_decref(j); }
};
using StPtr = std::unique_ptr<cp_safetensors, StDeleter>;
using EnginePtr = std::unique_ptr<cp_engine, EngineDeleter>;
using JsonPtr = std::unique_ptr<json_t, JsonDeleter>;

std::vector<uint8_t> read_bytes(const fs::path &p) {
    std::ifstream f(p, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

float elem(const cp_weight_info *w, int64_t i) {
    const uint8_t *d = static_cast<const uint8_t *>(w->data);
    switch (w->dtype) {
    case CP_DTYPE_F32: {
        float v;
        std::memcpy(&v, d + 4 * i, 4);
        return v;
    }
    case CP_DTYPE_BF16: {
        uint16_t h;
        std::memcpy(&h, d + 2 * i, 2);
        return cp_bf16_to_fp32(h);
    }
    case CP_DTYPE_F16: {
        uint16_t h;
        std::memcpy(&h, d + 2 * i, 2);
        return cp_fp16_to_fp32(h);
    }
    default: return NAN;
    }
}

// Bytes of every file in a directory, by name.
std::vector<std::pair<std::string, std::vector<uint8_t>>> dir_bytes(const fs::path &d) {
    std::vector<std::pair<std::string, std::vector<uint8_t>>> out;
    for (auto &e : fs::directory_iterator(d))
        out.emplace_back(e.path().filename().string(), read_bytes(e.path()));
    std::sort(out.begin(), out.end());
    return out;
}

class SynthTest : public ::testing::Test {
  protected:
    void SetUp() override {
        std::string tmpl = (fs::temp_directory_path() / "cp_synth_XXXXXX").string();
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }

    cp_synth_opts opts(const fs::path &out, int layers, cp_dtype dt, uint64_t seed = 7) {
        cp_synth_opts o;
        cp_synth_opts_init(&o);
        o.arch = "tiny";
        out_ = out.string();
        o.out_dir = out_.c_str();
        o.n_layers = layers;
        o.dtype = dt;
        o.seed = seed;
        o.n_threads = 2;
        return o;
    }

    // Logits of a few tokens through the engine (CPU backend, no tokenizer).
    std::vector<float> logits(const fs::path &model, int n_vocab) {
        cp_engine_opts eo{};
        std::string path = model.string();
        eo.model_path = path.c_str();
        eo.n_threads = 2;
        eo.n_ctx = 32;
        eo.n_seq = 1;
        eo.tokens_only = true;
        cp_engine_t e = nullptr;
        EXPECT_EQ(cp_engine_init(&eo, &e), CP_OK) << cp_last_error();
        EnginePtr ep(e);
        if (!e) return {};
        const int32_t toks[] = {1, 17, 500, 1023, 3};
        const int n = 5;
        std::vector<float> lg((size_t)n * n_vocab);
        EXPECT_EQ(cp_engine_logits(e, toks, n, lg.data()), CP_OK) << cp_last_error();
        return lg;
    }

    fs::path dir_;
    std::string out_;
};

// Every tensor of a tiny checkpoint: name, shape, dtype, statistics.
void check_tensors(const fs::path &dir, int layers, cp_dtype dt) {
    cp_safetensors_t raw = nullptr;
    ASSERT_EQ(cp_safetensors_open(dir.string().c_str(), &raw), CP_OK) << cp_last_error();
    StPtr st(raw);
    const int64_t dim = 256, kv = 128, ff = 704, vocab = 1024;
    struct Want {
        std::string name;
        int64_t rows, cols; // rows 0: a norm of [cols]
    };
    std::vector<Want> want = {{"model.embed_tokens.weight", vocab, dim}};
    for (int l = 0; l < layers; l++) {
        std::string p = "model.layers." + std::to_string(l) + ".";
        want.push_back({p + "input_layernorm.weight", 0, dim});
        want.push_back({p + "self_attn.q_proj.weight", dim, dim});
        want.push_back({p + "self_attn.k_proj.weight", kv, dim});
        want.push_back({p + "self_attn.v_proj.weight", kv, dim});
        want.push_back({p + "self_attn.o_proj.weight", dim, dim});
        want.push_back({p + "post_attention_layernorm.weight", 0, dim});
        want.push_back({p + "mlp.gate_proj.weight", ff, dim});
        want.push_back({p + "mlp.up_proj.weight", ff, dim});
        want.push_back({p + "mlp.down_proj.weight", dim, ff});
    }
    want.push_back({"model.norm.weight", 0, dim});
    want.push_back({"lm_head.weight", vocab, dim});
    ASSERT_EQ(cp_safetensors_n_tensors(st.get()), (int64_t)want.size());
    for (const Want &w : want) {
        int64_t idx = -1;
        for (int64_t i = 0; i < cp_safetensors_n_tensors(st.get()); i++)
            if (w.name == cp_safetensors_hf_name(st.get(), i)) idx = i;
        ASSERT_GE(idx, 0) << "missing " << w.name;
        const cp_weight_info *t = cp_safetensors_tensor(st.get(), idx);
        EXPECT_EQ(t->dtype, dt) << w.name;
        if (w.rows == 0) {
            ASSERT_EQ(t->ndim, 1) << w.name;
            EXPECT_EQ(t->ne[0], w.cols) << w.name;
            for (int64_t i = 0; i < w.cols; i++)
                ASSERT_EQ(elem(t, i), 1.0f) << w.name << "[" << i << "]";
            continue;
        }
        ASSERT_EQ(t->ndim, 2) << w.name;
        EXPECT_EQ(t->ne[0], w.cols) << w.name; // innermost: in_features
        EXPECT_EQ(t->ne[1], w.rows) << w.name;
        double s = 0, s2 = 0, mx = 0;
        int64_t n = w.rows * w.cols;
        for (int64_t i = 0; i < n; i++) {
            double v = elem(t, i);
            ASSERT_TRUE(std::isfinite(v)) << w.name;
            s += v;
            s2 += v * v;
            mx = std::max(mx, std::fabs(v));
        }
        double mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
        EXPECT_NEAR(sd, 0.02, 0.02 * 0.05) << w.name;
        EXPECT_LT(std::fabs(mean), 0.02 * 6 / std::sqrt((double)n) + 1e-5) << w.name;
        EXPECT_LT(mx, 0.02 * 1.2 * 3.5) << w.name; // row scale <= 1.2, |z| <= sqrt(12)
        EXPECT_GT(mx, 0.02 * 2.0) << w.name;
    }
    // rows differ in scale (not one flat distribution)
    const cp_weight_info *q = cp_safetensors_find(st.get(), "blk.0.attn_q.weight");
    ASSERT_NE(q, nullptr);
    double lo = 1e9, hi = 0;
    for (int64_t r = 0; r < dim; r++) {
        double s2 = 0;
        for (int64_t c = 0; c < dim; c++)
            s2 += (double)elem(q, r * dim + c) * elem(q, r * dim + c);
        double rs = std::sqrt(s2 / dim);
        lo = std::min(lo, rs);
        hi = std::max(hi, rs);
    }
    EXPECT_GT(hi / lo, 1.25);
    EXPECT_LT(hi / lo, 2.0); // 1.5 from the scales, the rest sampling noise of 256 values
}

void check_config(const fs::path &dir, int layers, const char *torch_dtype) {
    json_error_t err;
    JsonPtr root(json_load_file((dir / "config.json").string().c_str(), 0, &err));
    ASSERT_TRUE(root) << err.text;
    json_t *r = root.get();
    auto i = [&](const char *k) { return json_integer_value(json_object_get(r, k)); };
    auto s = [&](const char *k) {
        const char *v = json_string_value(json_object_get(r, k));
        return std::string(v ? v : "<missing>");
    };
    json_t *archs = json_object_get(r, "architectures");
    ASSERT_TRUE(json_is_array(archs));
    EXPECT_STREQ(json_string_value(json_array_get(archs, 0)), "LlamaForCausalLM");
    EXPECT_EQ(s("model_type"), "llama");
    EXPECT_EQ(i("hidden_size"), 256);
    EXPECT_EQ(i("intermediate_size"), 704);
    EXPECT_EQ(i("num_attention_heads"), 8);
    EXPECT_EQ(i("num_key_value_heads"), 4);
    EXPECT_EQ(i("num_hidden_layers"), layers);
    EXPECT_EQ(i("vocab_size"), 1024);
    EXPECT_EQ(i("head_dim"), 32);
    EXPECT_EQ(i("max_position_embeddings"), 2048);
    EXPECT_EQ(i("bos_token_id"), 1);
    EXPECT_EQ(i("eos_token_id"), 2);
    EXPECT_EQ(i("pretraining_tp"), 1);
    EXPECT_EQ(json_number_value(json_object_get(r, "rms_norm_eps")), 1e-5);
    EXPECT_EQ(json_number_value(json_object_get(r, "rope_theta")), 10000.0);
    EXPECT_EQ(json_number_value(json_object_get(r, "initializer_range")), 0.02);
    EXPECT_TRUE(json_is_false(json_object_get(r, "tie_word_embeddings")));
    EXPECT_TRUE(json_is_false(json_object_get(r, "attention_bias")));
    EXPECT_TRUE(json_is_false(json_object_get(r, "mlp_bias")));
    EXPECT_TRUE(json_is_null(json_object_get(r, "rope_scaling")));
    EXPECT_EQ(s("hidden_act"), "silu");
    EXPECT_EQ(s("torch_dtype"), torch_dtype);

    cp_model_config cfg;
    ASSERT_EQ(cp_hf_config_load((dir / "config.json").string().c_str(), &cfg), CP_OK)
        << cp_last_error();
    EXPECT_EQ(cfg.dim, 256);
    EXPECT_EQ(cfg.n_layer, layers);
    EXPECT_EQ(cfg.n_head_kv, 4);
    EXPECT_EQ(cfg.norm_eps, 1e-5f);
    EXPECT_FALSE(cfg.tied_embeddings);
}

TEST_F(SynthTest, TinyBf16ConfigTensorsAndLogits) {
    cp_synth_opts o = opts(dir_ / "m", 0, CP_DTYPE_BF16);
    ASSERT_EQ(cp_synth_write(&o), CP_OK) << cp_last_error();
    EXPECT_TRUE(fs::exists(dir_ / "m" / "model.safetensors"));
    EXPECT_FALSE(fs::exists(dir_ / "m" / "model.safetensors.index.json"));
    check_config(dir_ / "m", 4, "bfloat16");
    check_tensors(dir_ / "m", 4, CP_DTYPE_BF16);
    std::vector<float> lg = logits(dir_ / "m", 1024);
    ASSERT_EQ(lg.size(), 5u * 1024);
    for (float v : lg)
        ASSERT_TRUE(std::isfinite(v));
    float lo = *std::min_element(lg.begin(), lg.end()),
          hi = *std::max_element(lg.begin(), lg.end());
    EXPECT_LT(lo, hi); // not degenerate
}

TEST_F(SynthTest, TinyF32TwoLayers) {
    cp_synth_opts o = opts(dir_ / "m", 2, CP_DTYPE_F32);
    ASSERT_EQ(cp_synth_write(&o), CP_OK) << cp_last_error();
    check_config(dir_ / "m", 2, "float32");
    check_tensors(dir_ / "m", 2, CP_DTYPE_F32);
    std::vector<float> lg = logits(dir_ / "m", 1024);
    ASSERT_EQ(lg.size(), 5u * 1024);
    for (float v : lg)
        ASSERT_TRUE(std::isfinite(v));
}

TEST_F(SynthTest, TinyF16) {
    cp_synth_opts o = opts(dir_ / "m", 1, CP_DTYPE_F16);
    ASSERT_EQ(cp_synth_write(&o), CP_OK) << cp_last_error();
    check_config(dir_ / "m", 1, "float16");
    check_tensors(dir_ / "m", 1, CP_DTYPE_F16);
}

TEST_F(SynthTest, ByteIdenticalForASeedWhateverTheThreads) {
    cp_synth_opts a = opts(dir_ / "a", 2, CP_DTYPE_BF16, 42);
    a.n_threads = 1;
    ASSERT_EQ(cp_synth_write(&a), CP_OK) << cp_last_error();
    cp_synth_opts b = opts(dir_ / "b", 2, CP_DTYPE_BF16, 42);
    b.n_threads = 5;
    ASSERT_EQ(cp_synth_write(&b), CP_OK) << cp_last_error();
    EXPECT_TRUE(dir_bytes(dir_ / "a") == dir_bytes(dir_ / "b"));
    cp_synth_opts c = opts(dir_ / "c", 2, CP_DTYPE_BF16, 43);
    ASSERT_EQ(cp_synth_write(&c), CP_OK) << cp_last_error();
    EXPECT_FALSE(read_bytes(dir_ / "a" / "model.safetensors") ==
                 read_bytes(dir_ / "c" / "model.safetensors"));
}

TEST_F(SynthTest, ShardedWithIndexLoadsLikeOneFile) {
    cp_synth_opts one = opts(dir_ / "one", 2, CP_DTYPE_BF16);
    ASSERT_EQ(cp_synth_write(&one), CP_OK) << cp_last_error();
    cp_synth_opts sh = opts(dir_ / "sh", 2, CP_DTYPE_BF16);
    sh.max_shard_bytes = 1 << 20; // embedding 512 KiB, layers ~1.3 MiB each
    ASSERT_EQ(cp_synth_write(&sh), CP_OK) << cp_last_error();
    ASSERT_TRUE(fs::exists(dir_ / "sh" / "model.safetensors.index.json"));
    EXPECT_FALSE(fs::exists(dir_ / "sh" / "model.safetensors"));
    int n_shards = 0;
    for (auto &e : fs::directory_iterator(dir_ / "sh"))
        if (e.path().extension() == ".safetensors") n_shards++;
    EXPECT_GE(n_shards, 3);
    EXPECT_TRUE(fs::exists(dir_ / "sh" /
                           ("model-00001-of-0000" + std::to_string(n_shards) + ".safetensors")));

    json_error_t err;
    JsonPtr idx(
        json_load_file((dir_ / "sh" / "model.safetensors.index.json").string().c_str(), 0, &err));
    ASSERT_TRUE(idx) << err.text;
    EXPECT_EQ(json_object_size(json_object_get(idx.get(), "weight_map")), 2u * 9 + 3);
    // the same tensors and bytes as the single file
    EXPECT_EQ(
        json_integer_value(json_object_get(json_object_get(idx.get(), "metadata"), "total_size")),
        (json_int_t)(2 * 2 * (1024 * 256) +
                     2 * 2 * (2 * 256 + 2 * 256 * 256 + 2 * 128 * 256 + 3 * 704 * 256) + 2 * 256));
    check_tensors(dir_ / "sh", 2, CP_DTYPE_BF16);
    std::vector<float> a = logits(dir_ / "one", 1024), b = logits(dir_ / "sh", 1024);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_TRUE(a == b);

    // rewriting as one file removes the index and shards that would shadow it
    cp_synth_opts again = opts(dir_ / "sh", 2, CP_DTYPE_BF16);
    ASSERT_EQ(cp_synth_write(&again), CP_OK) << cp_last_error();
    EXPECT_FALSE(fs::exists(dir_ / "sh" / "model.safetensors.index.json"));
    int left = 0;
    for (auto &e : fs::directory_iterator(dir_ / "sh"))
        left += e.path().extension() == ".safetensors";
    EXPECT_EQ(left, 1);
    EXPECT_TRUE(read_bytes(dir_ / "sh" / "model.safetensors") ==
                read_bytes(dir_ / "one" / "model.safetensors"));
}

TEST_F(SynthTest, PresetsHaveTheRealShapes) {
    cp_synth_arch a;
    ASSERT_EQ(cp_synth_preset("llama3-8b", &a), CP_OK);
    EXPECT_EQ(a.dim, 4096);
    EXPECT_EQ(a.n_layers, 32);
    EXPECT_EQ(a.n_kv_heads, 8);
    EXPECT_EQ(a.ffn_dim, 14336);
    EXPECT_EQ(a.vocab, 128256);
    EXPECT_EQ(a.rope_theta, 500000.0);
    EXPECT_EQ(a.ctx, 8192);
    cp_synth_opts o;
    cp_synth_opts_init(&o);
    o.arch = "llama3-8b";
    uint64_t bytes = 0;
    ASSERT_EQ(cp_synth_plan(&o, &a, &bytes), CP_OK);
    EXPECT_EQ(bytes, 8030261248ull * 2); // Meta-Llama-3-8B: 8,030,261,248 parameters
    o.arch = "llama2-7b";
    ASSERT_EQ(cp_synth_plan(&o, &a, &bytes), CP_OK);
    EXPECT_EQ(bytes, 6738415616ull * 2);
    o.arch = "llama2-70b";
    ASSERT_EQ(cp_synth_plan(&o, &a, &bytes), CP_OK);
    EXPECT_EQ(bytes, 68976648192ull * 2);
    EXPECT_EQ(a.n_heads, 64);
    EXPECT_EQ(a.n_layers, 80);
}

TEST_F(SynthTest, Refusals) {
    cp_synth_opts o = opts(dir_ / "m", 0, CP_DTYPE_BF16);
    o.arch = "llama4-400b";
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("llama4-400b"), std::string::npos);
    EXPECT_FALSE(fs::exists(dir_ / "m"));

    o = opts(dir_ / "m", 0, CP_DTYPE_Q8_0);
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_INVALID_ARG);

    o = opts(dir_ / "m", 0, CP_DTYPE_BF16);
    o.out_dir = nullptr;
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_synth_write(nullptr), CP_ERR_INVALID_ARG);

    // a directory below a regular file cannot be created
    std::ofstream(dir_ / "file") << "x";
    o = opts(dir_ / "file" / "sub", 0, CP_DTYPE_BF16);
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("file"), std::string::npos);

    cp_synth_arch bad;
    ASSERT_EQ(cp_synth_preset("tiny", &bad), CP_OK);
    bad.n_kv_heads = 3;
    o = opts(dir_ / "m", 0, CP_DTYPE_BF16);
    o.custom = &bad;
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_INVALID_ARG);
}

TEST_F(SynthTest, NotEnoughSpaceIsRefusedBeforeWriting) {
    cp_synth_arch huge;
    ASSERT_EQ(cp_synth_preset("tiny", &huge), CP_OK);
    huge.vocab = 1 << 30;
    huge.dim = 1 << 16;
    huge.n_heads = 512;
    huge.n_kv_heads = 512;
    huge.n_layers = 1; // ~281 TB of embeddings alone
    cp_synth_opts o = opts(dir_ / "m", 0, CP_DTYPE_BF16);
    o.custom = &huge;
    uint64_t need = 0;
    ASSERT_EQ(cp_synth_plan(&o, nullptr, &need), CP_OK);
    struct statvfs v;
    ASSERT_EQ(statvfs(dir_.string().c_str(), &v), 0);
    if ((uint64_t)v.f_bavail * v.f_frsize > need)
        GTEST_SKIP() << "this file system has room for it";
    EXPECT_EQ(cp_synth_write(&o), CP_ERR_IO);
    EXPECT_NE(std::string(cp_last_error_detail()).find("free space"), std::string::npos)
        << cp_last_error();
    int n = 0;
    for (auto &e : fs::directory_iterator(dir_ / "m"))
        (void)e, n++;
    EXPECT_EQ(n, 0);
}

} // namespace
