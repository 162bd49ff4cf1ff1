// test_hf_quant.cc - 4-bit AWQ and GPTQ checkpoint directories: tiny Llama /
// Qwen2 models whose linears are chosen integer codes, zero points and fp16
// scales, packed here the AutoAWQ / AutoGPTQ way (independently of the
// loader's unpacking), must give the logits of the same model written with
// the dequantized fp32 weights, load as I4_G128 / I4_G32 where that is exact
// (F16 for act-order), and bad checkpoints must be refused with clear errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <list>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cp_dtype.h"
#include "cp_hf.h"
#include "cp_model.h"
#include "cp_runtime.h"
#include "cp_safetensors.h"

#include "common/hf_quant_writer.h"

namespace fs = std::filesystem;

namespace {

struct EngineDeleter {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
using EnginePtr = std::unique_ptr<cp_engine, EngineDeleter>;

using namespace cptest::hfq;

cp_status open_engine(const fs::path &dir, EnginePtr &out) {
    cp_engine_opts o = {};
    const std::string p = dir.string();
    o.model_path = p.c_str();
    o.n_threads = 2;
    o.device = CP_DEVICE_CPU;
    o.n_ctx = 64;
    o.n_seq = 1;
    o.tokens_only = true;
    cp_engine_t e = nullptr;
    cp_status st = cp_engine_init(&o, &e);
    if (st != CP_OK) EXPECT_EQ(e, nullptr);
    out.reset(e);
    return st;
}

std::vector<float> logits_of(cp_engine_t e, const std::vector<int32_t> &toks, int vocab) {
    std::vector<float> z(toks.size() * (size_t)vocab, NAN);
    EXPECT_EQ(cp_engine_logits(e, toks.data(), (int)toks.size(), z.data()), CP_OK)
        << cp_last_error();
    return z;
}

// max over rows of max |got - ref| / max |ref| of the row
double max_rel_err(const std::vector<float> &got, const std::vector<float> &ref, int vocab) {
    double worst = 0;
    for (size_t t = 0; t < got.size() / (size_t)vocab; t++) {
        double scale = 0, err = 0;
        for (int i = 0; i < vocab; i++) {
            scale = std::max(scale, (double)std::fabs(ref[t * vocab + i]));
            err = std::max(err, (double)std::fabs(got[t * vocab + i] - ref[t * vocab + i]));
        }
        worst = std::max(worst, err / scale);
    }
    return worst;
}

class HfQuantDir : public ::testing::Test {
  protected:
    void SetUp() override {
        std::string tmpl = (fs::temp_directory_path() / "cp_hfq_XXXXXX").string();
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        root_ = tmpl;
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

// ---- loading equals the dequantized model ------------------------------------

struct LoadCase {
    const char *name;
    QSpec s;
    cp_dtype want;   // type of every quantized linear
    double tol;      // relative logit error against the fp32 model
    bool quant_file; // settings in quantize_config.json instead of config.json
};

class HfQuantLoad : public HfQuantDir, public ::testing::WithParamInterface<LoadCase> {};

TEST_P(HfQuantLoad, MatchesDequantizedModel) {
    const LoadCase &c = GetParam();
    const QModel m = make_qmodel(c.s, 1234);
    write_dir(m, root_ / "q", true, quant_json(c.s), nullptr, !c.quant_file);
    write_dir(m, root_ / "ref", false, "");
    if (HasFatalFailure()) return;
    EnginePtr eq, er;
    ASSERT_EQ(open_engine(root_ / "q", eq), CP_OK) << cp_last_error();
    ASSERT_EQ(open_engine(root_ / "ref", er), CP_OK) << cp_last_error();

    // every quantized linear has the expected type
    int n_quant = 7 * c.s.n_layer - (c.s.plain_layer >= 0 ? 1 : 0) + (c.s.quant_head ? 1 : 0);
    cp_model_stats st;
    cp_model_get_stats(cp_engine_model(eq.get()), &st);
    EXPECT_EQ(st.count_by_dtype[c.want], n_quant) << "linears of type " << cp_dtype_name(c.want);
    cp_model_stats rs;
    cp_model_get_stats(cp_engine_model(er.get()), &rs);
    EXPECT_EQ(st.n_params, rs.n_params);
    // the repacked linears are made at load, each once, and kept (one
    // rank on the CPU uses them in place); the reference reads its file
    EXPECT_EQ(st.made_bytes, st.bytes_by_dtype[c.want]);
    EXPECT_EQ(st.made_peak_bytes, st.made_bytes);
    EXPECT_EQ(rs.made_bytes, 0u);

    std::vector<int32_t> toks = {3, 17, 42, 5, 63, 0, 28, 11, 9};
    const int V = c.s.vocab;
    auto zq = logits_of(eq.get(), toks, V), zr = logits_of(er.get(), toks, V);
    for (float x : zq)
        ASSERT_TRUE(std::isfinite(x));
    double err = max_rel_err(zq, zr, V);
    EXPECT_LE(err, c.tol) << "max relative logit error " << err;
    printf("[ %s ] max relative logit error %.3g\n", c.name, err);
}

QSpec spec(Method m, int group, bool v1 = true) {
    QSpec s;
    s.method = m;
    s.group = group;
    s.v1 = v1;
    return s;
}

std::vector<LoadCase> load_cases() {
    std::vector<LoadCase> v;
    v.push_back({"AwqG128", spec(Method::Awq, 128), CP_DTYPE_I4_G128, 1e-4, false});
    v.push_back({"GptqV1G128", spec(Method::Gptq, 128), CP_DTYPE_I4_G128, 1e-4, false});
    {
        QSpec s = spec(Method::Gptq, 32, false);
        s.write_gidx = false;
        v.push_back({"GptqV2G32", s, CP_DTYPE_I4_G32, 1e-4, false});
    }
    v.push_back({"GptqG64", spec(Method::Gptq, 64), CP_DTYPE_I4_G32, 1e-4, false});
    {
        // F16 weights: each dequantized weight rounded to fp16 (relative
        // 2^-11), and the CPU F16 kernel rounds the activations likewise
        // (measured 1.3e-3)
        QSpec s = spec(Method::Gptq, 32);
        s.act_order = true;
        v.push_back({"GptqActOrder", s, CP_DTYPE_F16, 5e-3, false});
    }
    v.push_back({"GptqPerColumn", spec(Method::Gptq, -1), CP_DTYPE_I4_G128, 1e-4, false});
    v.push_back({"GptqQuantizeConfigFile", spec(Method::Gptq, 128), CP_DTYPE_I4_G128, 1e-4, true});
    {
        // Qwen2 (fp16 Q/K/V biases), one linear left unquantized
        QSpec s = spec(Method::Awq, 64);
        s.arch = "qwen2";
        s.plain_layer = 1;
        v.push_back({"AwqQwen2G64Bias", s, CP_DTYPE_I4_G32, 1e-4, false});
    }
    {
        QSpec s = spec(Method::Gptq, 128, false);
        s.quant_head = true;
        v.push_back({"GptqV2QuantizedHead", s, CP_DTYPE_I4_G128, 1e-4, false});
    }
    return v;
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, HfQuantLoad, ::testing::ValuesIn(load_cases()),
                         [](const ::testing::TestParamInfo<LoadCase> &i) {
                             return std::string(i.param.name);
                         });

// ---- refusals -----------------------------------------------------------------

struct BadCase {
    const char *name;
    QSpec s;
    std::string quant; // quantization_config (empty: the usual one)
    Mutate mutate;
    cp_status want;
    std::vector<std::string> words; // the message names these
};

class HfQuantRefuse : public HfQuantDir, public ::testing::WithParamInterface<BadCase> {};

TEST_P(HfQuantRefuse, ClearError) {
    const BadCase &c = GetParam();
    QSpec s = c.s;
    s.n_layer = 1;
    const QModel m = make_qmodel(s, 99);
    write_dir(m, root_ / "q", true, c.quant.empty() ? quant_json(s) : c.quant, c.mutate);
    if (HasFatalFailure()) return;
    EnginePtr e;
    EXPECT_EQ(open_engine(root_ / "q", e), c.want) << cp_last_error();
    const std::string msg = cp_last_error();
    for (const auto &w : c.words)
        EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
}

std::vector<BadCase> bad_cases() {
    std::vector<BadCase> v;
    const QSpec g = spec(Method::Gptq, 128), a = spec(Method::Awq, 128);
    v.push_back({"Bits8",
                 g,
                 "{\"quant_method\": \"gptq\", \"bits\": 8, \"group_size\": 128, \"desc_act\": "
                 "false, \"sym\": true}",
                 nullptr,
                 CP_ERR_UNSUPPORTED,
                 {"bits", "8"}});
    v.push_back(
        {"AwqGemv",
         a,
         "{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 128, \"zero_point\": true,"
         " \"version\": \"gemv\"}",
         nullptr,
         CP_ERR_UNSUPPORTED,
         {"gemv"}});
    v.push_back({"OtherMethod",
                 g,
                 "{\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true}",
                 nullptr,
                 CP_ERR_UNSUPPORTED,
                 {"bitsandbytes"}});
    v.push_back({"MarlinFormat",
                 g,
                 "{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": 128, "
                 "\"checkpoint_format\": \"marlin\"}",
                 nullptr,
                 CP_ERR_UNSUPPORTED,
                 {"marlin"}});
    v.push_back({"NoGroupSize",
                 g,
                 "{\"quant_method\": \"gptq\", \"bits\": 4}",
                 nullptr,
                 CP_ERR_FORMAT,
                 {"group_size"}});
    v.push_back({"MissingQzeros",
                 g,
                 "",
                 [](std::string &n, cp_st_dtype &, std::vector<int64_t> &, std::vector<uint8_t> &) {
                     if (n == "model.layers.0.mlp.up_proj.qzeros") n.clear();
                 },
                 CP_ERR_FORMAT,
                 {"model.layers.0.mlp.up_proj.qzeros", "missing"}});
    v.push_back(
        {"WrongQweightShape",
         a,
         "",
         [](std::string &n, cp_st_dtype &, std::vector<int64_t> &shape, std::vector<uint8_t> &) {
             // [in, out/8] written as [in/2, 2*out/8]: same bytes, wrong shape
             if (n == "model.layers.0.self_attn.k_proj.qweight")
                 shape = {shape[0] / 2, shape[1] * 2};
         },
         CP_ERR_FORMAT,
         {"model.layers.0.self_attn.k_proj.qweight", "[64, 16]", "[128, 8]"}});
    v.push_back(
        {"ScalesNotF16",
         g,
         "",
         [](std::string &n, cp_st_dtype &t, std::vector<int64_t> &, std::vector<uint8_t> &) {
             if (n == "model.layers.0.self_attn.v_proj.scales") t = CP_ST_BF16;
         },
         CP_ERR_FORMAT,
         {"model.layers.0.self_attn.v_proj.scales", "BF16", "F16"}});
    v.push_back(
        {"WrongScalesShape",
         g,
         "",
         [](std::string &n, cp_st_dtype &, std::vector<int64_t> &shape, std::vector<uint8_t> &b) {
             if (n == "model.layers.0.self_attn.v_proj.scales") {
                 shape = {shape[0], shape[1] / 2};
                 b.resize(b.size() / 2);
             }
         },
         CP_ERR_FORMAT,
         {"model.layers.0.self_attn.v_proj.scales", "[1, 32]", "[1, 64]"}});
    v.push_back(
        {"InfiniteScale",
         g,
         "",
         [](std::string &n, cp_st_dtype &, std::vector<int64_t> &, std::vector<uint8_t> &b) {
             if (n == "model.layers.0.self_attn.o_proj.scales") {
                 b[10] = 0x00;
                 b[11] = 0x7c; // +inf at group 0, output 5
             }
         },
         CP_ERR_FORMAT,
         {"model.layers.0.self_attn.o_proj.scales", "not finite", "output 5"}});
    v.push_back(
        {"GidxOutOfRange",
         g,
         "",
         [](std::string &n, cp_st_dtype &, std::vector<int64_t> &, std::vector<uint8_t> &b) {
             if (n == "model.layers.0.mlp.down_proj.g_idx") b[4 * 7] = 9; // 2 groups of 128
         },
         CP_ERR_FORMAT,
         {"model.layers.0.mlp.down_proj.g_idx[7]", "9"}});
    return v;
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, HfQuantRefuse, ::testing::ValuesIn(bad_cases()),
                         [](const ::testing::TestParamInfo<BadCase> &i) {
                             return std::string(i.param.name);
                         });

// ---- quantization settings ---------------------------------------------------

TEST(HfQuantConfig, ParsesSettings) {
    cp_hf_quant_config q;
    const std::string plain = "{\"model_type\": \"llama\"}";
    ASSERT_EQ(
        cp_hf_quant_config_parse(plain.data(), plain.size(), nullptr, false, CP_HF_QUANT_NONE, &q),
        CP_OK);
    EXPECT_EQ(q.method, CP_HF_QUANT_NONE);

    const std::string gptq = "{\"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4,"
                             " \"group_size\": -1, \"desc_act\": true, \"sym\": false}}";
    ASSERT_EQ(
        cp_hf_quant_config_parse(gptq.data(), gptq.size(), nullptr, false, CP_HF_QUANT_NONE, &q),
        CP_OK)
        << cp_last_error();
    EXPECT_EQ(q.method, CP_HF_QUANT_GPTQ);
    EXPECT_EQ(q.bits, 4);
    EXPECT_EQ(q.group_size, -1);
    EXPECT_TRUE(q.desc_act);
    EXPECT_FALSE(q.sym);
    EXPECT_TRUE(q.zero_minus_one); // the "gptq" format is the default

    // AutoAWQ's own quant_config.json spelling
    const std::string awq =
        "{\"zero_point\": true, \"q_group_size\": 64, \"w_bit\": 4, \"version\": \"GEMM\"}";
    ASSERT_EQ(cp_hf_quant_config_parse(awq.data(), awq.size(), nullptr, true, CP_HF_QUANT_AWQ, &q),
              CP_OK)
        << cp_last_error();
    EXPECT_EQ(q.method, CP_HF_QUANT_AWQ);
    EXPECT_EQ(q.group_size, 64);
    EXPECT_FALSE(q.zero_minus_one);

    const std::string v2 = "{\"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4,"
                           " \"group_size\": 32, \"checkpoint_format\": \"gptq_v2\"}}";
    ASSERT_EQ(cp_hf_quant_config_parse(v2.data(), v2.size(), nullptr, false, CP_HF_QUANT_NONE, &q),
              CP_OK);
    EXPECT_FALSE(q.zero_minus_one);

    const std::string bad = "{\"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4,"
                            " \"group_size\": 0}}";
    EXPECT_EQ(cp_hf_quant_config_parse(bad.data(), bad.size(), "x/config.json", false,
                                       CP_HF_QUANT_NONE, &q),
              CP_ERR_FORMAT);
    EXPECT_NE(std::string(cp_last_error()).find("x/config.json"), std::string::npos)
        << cp_last_error();
    const std::string nomethod = "{\"quantization_config\": {\"bits\": 4, \"group_size\": 128}}";
    EXPECT_EQ(cp_hf_quant_config_parse(nomethod.data(), nomethod.size(), nullptr, false,
                                       CP_HF_QUANT_NONE, &q),
              CP_ERR_FORMAT);
    EXPECT_NE(std::string(cp_last_error()).find("quant_method"), std::string::npos)
        << cp_last_error();
}

TEST_F(HfQuantDir, LoadReadsNothingWithoutSettings) {
    cp_hf_quant_config q;
    write_text(root_ / "config.json", "{\"model_type\": \"llama\"}");
    ASSERT_EQ(cp_hf_quant_config_load(root_.string().c_str(), &q), CP_OK) << cp_last_error();
    EXPECT_EQ(q.method, CP_HF_QUANT_NONE);
    write_text(root_ / "quant_config.json",
               "{\"zero_point\": true, \"q_group_size\": 128, \"w_bit\": 4}");
    ASSERT_EQ(cp_hf_quant_config_load(root_.string().c_str(), &q), CP_OK) << cp_last_error();
    EXPECT_EQ(q.method, CP_HF_QUANT_AWQ);
    EXPECT_EQ(q.group_size, 128);
}

} // namespace
