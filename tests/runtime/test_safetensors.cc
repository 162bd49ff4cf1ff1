// test_safetensors.cc - the safetensors reader against byte images built by
// hand (so a writer bug cannot hide a reader bug), the writer against an
// independent parse of its output, sharded model directories, every header
// corruption the reader must refuse, and config.json loading of Llama-3,
// Mistral, Qwen2 and SmolLM2-like checkpoints. All values compared are exact.
#include <gtest/gtest.h>
#include <jansson.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cp_gguf.h"
#include "cp_hf.h"
#include "cp_safetensors.h"

namespace fs = std::filesystem;

namespace {

struct StDeleter {
    void operator()(cp_safetensors *s) const { cp_safetensors_close(s); }
};
struct WriterDeleter {
    void operator()(cp_st_writer *w) const { cp_st_writer_free(w); }
};
using StPtr = std::unique_ptr<cp_safetensors, StDeleter>;
using WriterPtr = std::unique_ptr<cp_st_writer, WriterDeleter>;

// A safetensors image: 8-byte little-endian header length, header, data.
std::vector<uint8_t> image(const std::string &header, const std::vector<uint8_t> &data) {
    std::vector<uint8_t> b(8 + header.size() + data.size());
    uint64_t n = header.size();
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (8 * i));
    if (!header.empty()) std::memcpy(b.data() + 8, header.data(), header.size());
    if (!data.empty()) std::memcpy(b.data() + 8 + header.size(), data.data(), data.size());
    return b;
}

template <typename T> void put(std::vector<uint8_t> &b, T v) {
    size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T)); // the test machine is little-endian like the format
}

void write_file(const fs::path &p, const std::vector<uint8_t> &b) {
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char *>(b.data()), (std::streamsize)b.size());
}

void write_text(const fs::path &p, const std::string &s) {
    std::ofstream f(p, std::ios::binary);
    f << s;
}

std::vector<uint8_t> read_file(const fs::path &p) {
    std::ifstream f(p, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

class TempDirTest : public ::testing::Test {
  protected:
    void SetUp() override {
        std::string tmpl = (fs::temp_directory_path() / "cp_st_XXXXXX").string();
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }
    fs::path dir_;
};

// Expects st == code and the last error to contain every fragment given.
#define EXPECT_ERR(expr, code, ...)                                                                \
    do {                                                                                           \
        cp_status st_ = (expr);                                                                    \
        EXPECT_EQ(st_, code) << cp_status_str(st_) << ": " << cp_last_error();                     \
        for (const char *frag_ : {__VA_ARGS__})                                                    \
            EXPECT_NE(std::string(cp_last_error_detail()).find(frag_), std::string::npos)          \
                << "message '" << cp_last_error_detail() << "' lacks '" << frag_ << "'";           \
    } while (0)

// ---- hand-built images ------------------------------------------------------

// Three tensors, declared out of data order, with HF names, metadata, trailing
// header padding and F32/F16/BF16/I64 payloads whose bits are known.
struct HandImage {
    std::string header;
    std::vector<uint8_t> data, bytes;
    HandImage() {
        header = "{\"model.layers.3.self_attn.q_proj.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                 "\"data_offsets\":[8,32]},"
                 "\"__metadata__\":{\"format\":\"pt\",\"note\":\"hand made\"},"
                 "\"model.embed_tokens.weight\":{\"dtype\":\"F16\",\"shape\":[2,2],"
                 "\"data_offsets\":[32,40]},"
                 "\"step\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},"
                 "\"custom.thing\":{\"dtype\":\"BF16\",\"shape\":[1,1,1,2],"
                 "\"data_offsets\":[40,44]}}    ";
        put<int64_t>(data, -1234567890123LL);
        for (int i = 0; i < 6; i++)
            put<float>(data, 0.5f * (float)i - 1.0f);
        // fp16 1, -2, 0.5, 65504
        for (uint16_t h : {0x3C00, 0xC000, 0x3800, 0x7BFF})
            put<uint16_t>(data, h);
        for (uint16_t h : {0x3F80, 0x4049})
            put<uint16_t>(data, h); // bf16 1.0, ~3.14
        bytes = image(header, data);
    }
};

void check_hand_image(cp_safetensors_t st, const uint8_t *base) {
    ASSERT_EQ(cp_safetensors_n_tensors(st), 4);
    const size_t data0 = 8 + HandImage().header.size();

    const cp_weight_info *q = cp_safetensors_find(st, "blk.3.attn_q.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_STREQ(q->name, "blk.3.attn_q.weight");
    EXPECT_EQ(q->dtype, CP_DTYPE_F32);
    EXPECT_EQ(q->ndim, 2);
    EXPECT_EQ(q->ne[0], 3); // innermost first: HF [out=2, in=3] -> ne {3, 2}
    EXPECT_EQ(q->ne[1], 2);
    EXPECT_EQ(q->ne[2], 1);
    EXPECT_EQ(q->ne[3], 1);
    EXPECT_EQ(q->nbytes, 24u);
    EXPECT_EQ(q->file_offset, data0 + 8);
    if (base) {
        EXPECT_EQ((const uint8_t *)q->data, base + data0 + 8);
    }
    for (int i = 0; i < 6; i++) {
        float v;
        std::memcpy(&v, (const uint8_t *)q->data + 4 * i, 4);
        EXPECT_EQ(v, 0.5f * (float)i - 1.0f);
    }

    const cp_weight_info *e = cp_safetensors_find(st, "token_embd.weight");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, CP_DTYPE_F16);
    // The header is not padded, so the data may be misaligned: copy it out.
    uint16_t h[4];
    std::memcpy(h, e->data, sizeof(h));
    EXPECT_EQ(cp_fp16_to_fp32(h[0]), 1.0f);
    EXPECT_EQ(cp_fp16_to_fp32(h[1]), -2.0f);
    EXPECT_EQ(cp_fp16_to_fp32(h[2]), 0.5f);
    EXPECT_EQ(cp_fp16_to_fp32(h[3]), 65504.0f);

    const cp_weight_info *s = cp_safetensors_find(st, "step");
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->dtype, CP_DTYPE_I64);
    EXPECT_EQ(s->ndim, 0);
    EXPECT_EQ(s->nbytes, 8u);
    int64_t step;
    std::memcpy(&step, s->data, 8);
    EXPECT_EQ(step, -1234567890123LL);

    const cp_weight_info *c = cp_safetensors_find(st, "custom.thing");
    ASSERT_NE(c, nullptr);
    EXPECT_EQ(c->dtype, CP_DTYPE_BF16);
    EXPECT_EQ(c->ndim, 4);
    EXPECT_EQ(c->ne[0], 2);
    EXPECT_EQ(c->ne[3], 1);
    uint16_t bf[2];
    std::memcpy(bf, c->data, sizeof(bf));
    EXPECT_EQ(cp_bf16_to_fp32(bf[0]), 1.0f);
    EXPECT_EQ(cp_bf16_to_fp32(bf[1]), 3.140625f); // 0x4049 exactly

    // Listed in data order; the original names are kept.
    EXPECT_STREQ(cp_safetensors_tensor(st, 0)->name, "step");
    EXPECT_STREQ(cp_safetensors_hf_name(st, 1), "model.layers.3.self_attn.q_proj.weight");
    EXPECT_STREQ(cp_safetensors_hf_name(st, 2), "model.embed_tokens.weight");
    EXPECT_EQ(cp_safetensors_st_dtype(st, 3), CP_ST_BF16);
    EXPECT_EQ(cp_safetensors_tensor(st, 4), nullptr);
    EXPECT_EQ(cp_safetensors_tensor(st, -1), nullptr);
    EXPECT_EQ(cp_safetensors_find(st, "model.embed_tokens.weight"), nullptr);
    EXPECT_EQ(cp_safetensors_find(st, "nothing"), nullptr);

    EXPECT_EQ(cp_safetensors_n_meta(st), 2);
    EXPECT_STREQ(cp_safetensors_get_meta(st, "format"), "pt");
    EXPECT_STREQ(cp_safetensors_get_meta(st, "note"), "hand made");
    EXPECT_EQ(cp_safetensors_get_meta(st, "absent"), nullptr);
}

TEST(Safetensors, HandBuiltImageInMemory) {
    HandImage im;
    cp_safetensors_t raw = nullptr;
    ASSERT_EQ(cp_safetensors_open_memory(im.bytes.data(), im.bytes.size(), &raw), CP_OK)
        << cp_last_error();
    StPtr st(raw);
    check_hand_image(st.get(), im.bytes.data());
    EXPECT_STREQ(cp_safetensors_tensor_path(st.get(), 0), "<memory>");
}

class SafetensorsFile : public TempDirTest {};

TEST_F(SafetensorsFile, HandBuiltImageOnDiskAndAsDirectory) {
    HandImage im;
    fs::path f = dir_ / "model.safetensors";
    write_file(f, im.bytes);
    cp_safetensors_t raw = nullptr;
    ASSERT_EQ(cp_safetensors_open(f.c_str(), &raw), CP_OK) << cp_last_error();
    StPtr st(raw);
    check_hand_image(st.get(), nullptr);
    EXPECT_EQ(cp_safetensors_tensor_path(st.get(), 0), f.string());
    EXPECT_EQ(std::string(cp_safetensors_dir(st.get())), dir_.string());

    // A model directory with config.json and tokenizer.json beside the weights.
    write_text(dir_ / "config.json", "{}");
    write_text(dir_ / "tokenizer.json", "{}");
    raw = nullptr;
    ASSERT_EQ(cp_safetensors_open(dir_.c_str(), &raw), CP_OK) << cp_last_error();
    StPtr st2(raw);
    check_hand_image(st2.get(), nullptr);
    EXPECT_EQ(std::string(cp_safetensors_dir(st2.get())), dir_.string());

    // Any single *.safetensors is found when model.safetensors is absent.
    fs::rename(f, dir_ / "weights.safetensors");
    raw = nullptr;
    ASSERT_EQ(cp_safetensors_open((dir_.string() + "/").c_str(), &raw), CP_OK) << cp_last_error();
    StPtr st3(raw);
    EXPECT_EQ(cp_safetensors_n_tensors(st3.get()), 4);
}

TEST(Safetensors, NameMapping) {
    const char *cases[][2] = {
        {"model.embed_tokens.weight", "token_embd.weight"},
        {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
        {"model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"},
        {"model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight"},
        {"model.layers.12.self_attn.v_proj.weight", "blk.12.attn_v.weight"},
        {"model.layers.31.self_attn.o_proj.weight", "blk.31.attn_output.weight"},
        {"model.layers.5.self_attn.q_proj.bias", "blk.5.attn_q.bias"},
        {"model.layers.5.self_attn.k_proj.bias", "blk.5.attn_k.bias"},
        {"model.layers.5.self_attn.v_proj.bias", "blk.5.attn_v.bias"},
        {"model.layers.2.mlp.gate_proj.weight", "blk.2.ffn_gate.weight"},
        {"model.layers.2.mlp.up_proj.weight", "blk.2.ffn_up.weight"},
        {"model.layers.2.mlp.down_proj.weight", "blk.2.ffn_down.weight"},
        {"model.layers.9.input_layernorm.weight", "blk.9.attn_norm.weight"},
        {"model.layers.9.post_attention_layernorm.weight", "blk.9.ffn_norm.weight"},
    };
    char buf[128];
    for (auto &c : cases) {
        ASSERT_TRUE(cp_safetensors_gguf_name(c[0], buf, sizeof(buf))) << c[0];
        EXPECT_STREQ(buf, c[1]) << c[0];
    }
    const char *kept[] = {"model.layers.0.self_attn.rotary_emb.inv_freq",
                          "model.layers.01.mlp.up_proj.weight",
                          "model.layers..mlp.up_proj.weight",
                          "model.layers.3.mlp.up_proj.weight.x",
                          "model.layers.3.mlp.up_proj",
                          "lm_head.weightx",
                          "blk.0.attn_q.weight",
                          "model.layers.3.mlp.up_proj.scales",
                          "model.embed_tokens"};
    for (const char *k : kept) {
        std::strcpy(buf, "untouched");
        EXPECT_FALSE(cp_safetensors_gguf_name(k, buf, sizeof(buf))) << k;
        EXPECT_STREQ(buf, "untouched");
    }
    // Too small a buffer is a refusal, not a truncation.
    EXPECT_FALSE(cp_safetensors_gguf_name("model.layers.0.mlp.up_proj.weight", buf, 10));
}

// ---- writer ------------------------------------------------------------------

TEST_F(SafetensorsFile, WriterRoundTripAndLayout) {
    // Odd sizes on purpose: the F16 and I8 tensors would misalign what
    // follows them if the writer packed in insertion order.
    std::vector<uint16_t> f16 = {0x3C00, 0x4000, 0xBC00}; // 3 x F16
    std::vector<int8_t> i8 = {-128, 0, 127, 5, -5};       // 5 x I8
    std::vector<float> f32(2 * 3 * 4);                    // [2,3,4] F32
    for (size_t i = 0; i < f32.size(); i++)
        f32[i] = (float)i * 0.25f - 3.0f;
    std::vector<double> f64 = {1.0 / 3.0, -2.5e300};               // [2] F64
    std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x0001, 0x7F80}; // [2,2] BF16
    std::vector<uint8_t> u8 = {0, 255, 7};                         // [3] U8

    cp_st_writer_t raw = nullptr;
    ASSERT_EQ(cp_st_writer_init(&raw), CP_OK);
    WriterPtr w(raw);
    int64_t s_f16[] = {3}, s_i8[] = {5}, s_f32[] = {2, 3, 4}, s_f64[] = {2}, s_bf[] = {2, 2},
            s_u8[] = {3};
    ASSERT_EQ(cp_st_writer_add(w.get(), "a.f16", CP_ST_F16, 1, s_f16, f16.data(), 6), CP_OK);
    ASSERT_EQ(cp_st_writer_add(w.get(), "model.layers.1.mlp.up_proj.weight", CP_ST_I8, 1, s_i8,
                               i8.data(), 5),
              CP_OK);
    ASSERT_EQ(cp_st_writer_add(w.get(), "model.norm.weight", CP_ST_F32, 3, s_f32, f32.data(),
                               f32.size() * 4),
              CP_OK);
    ASSERT_EQ(cp_st_writer_add(w.get(), "d.f64", CP_ST_F64, 1, s_f64, f64.data(), 16), CP_OK);
    ASSERT_EQ(cp_st_writer_add(w.get(), "e.bf16", CP_ST_BF16, 2, s_bf, bf16.data(), 8), CP_OK);
    ASSERT_EQ(cp_st_writer_add(w.get(), "f.u8", CP_ST_U8, 1, s_u8, u8.data(), 3), CP_OK);
    int64_t s_empty[] = {0, 4};
    ASSERT_EQ(cp_st_writer_add(w.get(), "g.empty", CP_ST_F32, 2, s_empty, nullptr, 0), CP_OK);
    ASSERT_EQ(cp_st_writer_set_meta(w.get(), "format", "pt"), CP_OK);
    ASSERT_EQ(cp_st_writer_set_meta(w.get(), "source", "first"), CP_OK);
    ASSERT_EQ(cp_st_writer_set_meta(w.get(), "source", "second"), CP_OK); // replaces
    fs::path f = dir_ / "w.safetensors";
    ASSERT_EQ(cp_st_writer_finish(w.get(), f.c_str()), CP_OK) << cp_last_error();
    EXPECT_FALSE(fs::exists(dir_ / "w.safetensors.tmp"));

    // Independent parse of the bytes: header JSON, aligned data start, and the
    // packing the reference implementation insists on (no gaps, no overlap,
    // the data region exactly covered).
    std::vector<uint8_t> bytes = read_file(f);
    ASSERT_GE(bytes.size(), 8u);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)bytes[i] << (8 * i);
    ASSERT_LE(8 + hlen, bytes.size());
    EXPECT_EQ((8 + hlen) % 8, 0u);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)bytes.data() + 8, hlen, 0, &jerr);
    ASSERT_NE(root, nullptr) << jerr.text;
    EXPECT_STREQ(
        json_string_value(json_object_get(json_object_get(root, "__metadata__"), "source")),
        "second");
    json_t *nrm = json_object_get(root, "model.norm.weight");
    ASSERT_NE(nrm, nullptr);
    EXPECT_STREQ(json_string_value(json_object_get(nrm, "dtype")), "F32");
    json_t *shape = json_object_get(nrm, "shape");
    ASSERT_EQ(json_array_size(shape), 3u);
    EXPECT_EQ(json_integer_value(json_array_get(shape, 0)), 2); // outermost first on disk
    EXPECT_EQ(json_integer_value(json_array_get(shape, 2)), 4);
    std::vector<std::pair<int64_t, int64_t>> spans;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (std::string(key) == "__metadata__") continue;
        json_t *o = json_object_get(val, "data_offsets");
        int64_t b = json_integer_value(json_array_get(o, 0));
        int64_t e = json_integer_value(json_array_get(o, 1));
        std::string dt = json_string_value(json_object_get(val, "dtype"));
        size_t esz = dt == "F64" ? 8 : dt == "F32" ? 4 : dt.find("16") != std::string::npos ? 2 : 1;
        EXPECT_EQ(b % (int64_t)esz, 0) << key << " is not aligned to its element size";
        spans.push_back({b, e});
    }
    json_decref(root);
    std::sort(spans.begin(), spans.end());
    int64_t at = 0;
    for (auto &s : spans) {
        EXPECT_EQ(s.first, at);
        at = s.second;
    }
    EXPECT_EQ((uint64_t)at, bytes.size() - 8 - hlen);

    // Read back: names mapped, shapes reversed, bytes identical.
    cp_safetensors_t sraw = nullptr;
    ASSERT_EQ(cp_safetensors_open(f.c_str(), &sraw), CP_OK) << cp_last_error();
    StPtr st(sraw);
    EXPECT_EQ(cp_safetensors_n_tensors(st.get()), 7);
    EXPECT_STREQ(cp_safetensors_get_meta(st.get(), "source"), "second");
    const cp_weight_info *t = cp_safetensors_find(st.get(), "output_norm.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->ndim, 3);
    EXPECT_EQ(t->ne[0], 4);
    EXPECT_EQ(t->ne[1], 3);
    EXPECT_EQ(t->ne[2], 2);
    EXPECT_EQ(std::memcmp(t->data, f32.data(), f32.size() * 4), 0);
    EXPECT_EQ(t->file_offset % 8, 0u);
    t = cp_safetensors_find(st.get(), "blk.1.ffn_up.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, CP_DTYPE_I8);
    EXPECT_EQ(std::memcmp(t->data, i8.data(), 5), 0);
    t = cp_safetensors_find(st.get(), "d.f64");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, CP_DTYPE_F64);
    EXPECT_EQ(std::memcmp(t->data, f64.data(), 16), 0);
    t = cp_safetensors_find(st.get(), "a.f16");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(std::memcmp(t->data, f16.data(), 6), 0);
    t = cp_safetensors_find(st.get(), "e.bf16");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->ne[0], 2);
    EXPECT_EQ(std::memcmp(t->data, bf16.data(), 8), 0);
    t = cp_safetensors_find(st.get(), "f.u8");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, CP_DTYPE_I8); // raw bytes; the file type says U8
    EXPECT_EQ(std::memcmp(t->data, u8.data(), 3), 0);
    t = cp_safetensors_find(st.get(), "g.empty");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->nbytes, 0u);
    EXPECT_EQ(t->ne[0], 4);
    EXPECT_EQ(t->ne[1], 0);
    for (int64_t i = 0; i < cp_safetensors_n_tensors(st.get()); i++)
        if (std::string(cp_safetensors_hf_name(st.get(), i)) == "f.u8") {
            EXPECT_EQ(cp_safetensors_st_dtype(st.get(), i), CP_ST_U8);
        }
}

TEST_F(SafetensorsFile, WriterRefusesBadInput) {
    cp_st_writer_t raw = nullptr;
    ASSERT_EQ(cp_st_writer_init(&raw), CP_OK);
    WriterPtr w(raw);
    float x[4] = {1, 2, 3, 4};
    int64_t s4[] = {4}, s22[] = {2, 2}, sneg[] = {-4};
    ASSERT_EQ(cp_st_writer_add(w.get(), "x", CP_ST_F32, 1, s4, x, 16), CP_OK);
    EXPECT_ERR(cp_st_writer_add(w.get(), "x", CP_ST_F32, 1, s4, x, 16), CP_ERR_INVALID_ARG,
               "twice");
    EXPECT_ERR(cp_st_writer_add(w.get(), "y", CP_ST_F32, 2, s22, x, 12), CP_ERR_INVALID_ARG,
               "12 bytes", "need 16");
    EXPECT_ERR(cp_st_writer_add(w.get(), "y", CP_ST_F32, 1, sneg, x, 16), CP_ERR_INVALID_ARG,
               "dimension");
    EXPECT_ERR(cp_st_writer_add(w.get(), "__metadata__", CP_ST_F32, 1, s4, x, 16),
               CP_ERR_INVALID_ARG, "reserved");
    EXPECT_ERR(cp_st_writer_add(w.get(), "y", CP_ST_DTYPE_COUNT, 1, s4, x, 16), CP_ERR_INVALID_ARG,
               "dtype");
    EXPECT_ERR(cp_st_writer_add(w.get(), "\xff\xfe", CP_ST_F32, 1, s4, x, 16), CP_ERR_INVALID_ARG,
               "UTF-8");
    fs::path bad = dir_ / "no" / "such" / "dir" / "m.safetensors";
    EXPECT_ERR(cp_st_writer_finish(w.get(), bad.c_str()), CP_ERR_IO, "cannot create",
               "m.safetensors.tmp");
    EXPECT_FALSE(fs::exists(bad));
    // The writer stays usable after a failed finish.
    fs::path good = dir_ / "m.safetensors";
    ASSERT_EQ(cp_st_writer_finish(w.get(), good.c_str()), CP_OK) << cp_last_error();
    cp_safetensors_t sraw = nullptr;
    ASSERT_EQ(cp_safetensors_open(good.c_str(), &sraw), CP_OK) << cp_last_error();
    StPtr st(sraw);
    EXPECT_EQ(cp_safetensors_n_tensors(st.get()), 1);
    cp_st_writer_free(nullptr);
    cp_safetensors_close(nullptr);
}

// ---- sharded directories -------------------------------------------------------

class SafetensorsShards : public TempDirTest {
  protected:
    // Two shards of a 2-layer model written with the writer, plus the index.
    void write_model(const std::string &index_text) {
        for (int s = 0; s < 2; s++) {
            cp_st_writer_t raw = nullptr;
            ASSERT_EQ(cp_st_writer_init(&raw), CP_OK);
            WriterPtr w(raw);
            std::string l = "model.layers." + std::to_string(s) + ".";
            int64_t shape[] = {2, 4}, vec[] = {4};
            ASSERT_EQ(cp_st_writer_add(w.get(), (l + "self_attn.q_proj.weight").c_str(), CP_ST_F32,
                                       2, shape, vals_[s].data(), 32),
                      CP_OK);
            ASSERT_EQ(cp_st_writer_add(w.get(), (l + "input_layernorm.weight").c_str(), CP_ST_F32,
                                       1, vec, vals_[s].data(), 16),
                      CP_OK);
            if (s == 0)
                ASSERT_EQ(cp_st_writer_add(w.get(), "model.embed_tokens.weight", CP_ST_F32, 2,
                                           shape, vals_[1].data(), 32),
                          CP_OK);
            ASSERT_EQ(cp_st_writer_set_meta(w.get(), "shard", std::to_string(s).c_str()), CP_OK);
            std::string name = "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors";
            ASSERT_EQ(cp_st_writer_finish(w.get(), (dir_ / name).c_str()), CP_OK)
                << cp_last_error();
        }
        write_text(dir_ / "model.safetensors.index.json", index_text);
        write_text(dir_ / "config.json", "{\"model_type\": \"llama\"}");
    }
    static std::string index(const std::string &extra = "",
                             const std::string &l1q_shard = "model-00002-of-00002.safetensors") {
        return "{\"metadata\": {\"total_size\": 112}, \"weight_map\": {"
               "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
               "\"model.layers.0.self_attn.q_proj.weight\": \"model-00001-of-00002.safetensors\","
               "\"model.layers.0.input_layernorm.weight\": \"model-00001-of-00002.safetensors\","
               "\"model.layers.1.self_attn.q_proj.weight\": \"" +
               l1q_shard +
               "\","
               "\"model.layers.1.input_layernorm.weight\": \"model-00002-of-00002.safetensors\"" +
               extra + "}}";
    }
    std::vector<float> vals_[2] = {{1, 2, 3, 4, 5, 6, 7, 8}, {-1, -2, -3, -4, -5, -6, -7, -8}};
};

TEST_F(SafetensorsShards, OpensIndexedDirectory) {
    write_model(index());
    cp_safetensors_t raw = nullptr;
    ASSERT_EQ(cp_safetensors_open(dir_.c_str(), &raw), CP_OK) << cp_last_error();
    StPtr st(raw);
    EXPECT_EQ(cp_safetensors_n_tensors(st.get()), 5);
    for (int s = 0; s < 2; s++) {
        std::string l = "blk." + std::to_string(s) + ".";
        const cp_weight_info *q = cp_safetensors_find(st.get(), (l + "attn_q.weight").c_str());
        ASSERT_NE(q, nullptr);
        EXPECT_EQ(q->ne[0], 4);
        EXPECT_EQ(q->ne[1], 2);
        EXPECT_EQ(std::memcmp(q->data, vals_[s].data(), 32), 0);
        const cp_weight_info *n = cp_safetensors_find(st.get(), (l + "attn_norm.weight").c_str());
        ASSERT_NE(n, nullptr);
        EXPECT_EQ(std::memcmp(n->data, vals_[s].data(), 16), 0);
        // file_offset locates the same bytes in the shard the tensor came from.
        for (int64_t i = 0; i < cp_safetensors_n_tensors(st.get()); i++) {
            if (cp_safetensors_tensor(st.get(), i) != q) continue;
            std::vector<uint8_t> file = read_file(cp_safetensors_tensor_path(st.get(), i));
            EXPECT_NE(std::string(cp_safetensors_tensor_path(st.get(), i))
                          .find("model-0000" + std::to_string(s + 1)),
                      std::string::npos);
            ASSERT_LE(q->file_offset + q->nbytes, file.size());
            EXPECT_EQ(std::memcmp(file.data() + q->file_offset, vals_[s].data(), 32), 0);
        }
    }
    const cp_weight_info *e = cp_safetensors_find(st.get(), "token_embd.weight");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(std::memcmp(e->data, vals_[1].data(), 32), 0);
    EXPECT_STREQ(cp_safetensors_get_meta(st.get(), "shard"), "0"); // first shard wins
    EXPECT_EQ(std::string(cp_safetensors_dir(st.get())), dir_.string());

    // The index file itself can be opened too.
    raw = nullptr;
    ASSERT_EQ(cp_safetensors_open((dir_ / "model.safetensors.index.json").c_str(), &raw), CP_OK)
        << cp_last_error();
    StPtr st2(raw);
    EXPECT_EQ(cp_safetensors_n_tensors(st2.get()), 5);
}

TEST_F(SafetensorsShards, MissingShard) {
    write_model(index(",\"lm_head.weight\": \"model-00003-of-00003.safetensors\""));
    cp_safetensors_t raw = nullptr;
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_IO,
               "model-00003-of-00003.safetensors", "index.json");
    EXPECT_EQ(raw, nullptr);
}

TEST_F(SafetensorsShards, TensorNotInItsShard) {
    write_model(index("", "model-00001-of-00002.safetensors"));
    cp_safetensors_t raw = nullptr;
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT,
               "model.layers.1.self_attn.q_proj.weight", "does not contain it");
    write_model(index(",\"lm_head.weight\": \"model-00002-of-00002.safetensors\""));
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "lm_head.weight");
}

TEST_F(SafetensorsShards, BadIndex) {
    cp_safetensors_t raw = nullptr;
    write_model("{\"weight_map\": [1]}");
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "weight_map");
    write_model("{\"weight_map\": {\"a\": \"../model-00001-of-00002.safetensors\"}}");
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "'a'", "shard");
    write_model("{\"weight_map\": ");
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "not valid JSON",
               "index.json");
}

TEST_F(SafetensorsShards, DuplicateAcrossShards) {
    write_model(index());
    // A third shard repeating layer 0's norm under its GGUF name.
    cp_st_writer_t wraw = nullptr;
    ASSERT_EQ(cp_st_writer_init(&wraw), CP_OK);
    WriterPtr w(wraw);
    int64_t vec[] = {4};
    ASSERT_EQ(
        cp_st_writer_add(w.get(), "blk.0.attn_norm.weight", CP_ST_F32, 1, vec, vals_[0].data(), 16),
        CP_OK);
    ASSERT_EQ(cp_st_writer_finish(w.get(), (dir_ / "extra.safetensors").c_str()), CP_OK);
    write_text(dir_ / "model.safetensors.index.json",
               index(",\"blk.0.attn_norm.weight\": \"extra.safetensors\""));
    cp_safetensors_t raw = nullptr;
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "duplicate",
               "blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight");
}

TEST_F(SafetensorsFile, OpenErrors) {
    cp_safetensors_t raw = nullptr;
    fs::path missing = dir_ / "absent.safetensors";
    EXPECT_ERR(cp_safetensors_open(missing.c_str(), &raw), CP_ERR_IO, "absent.safetensors");
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_IO, "holds no");
    write_file(dir_ / "empty.safetensors", {});
    EXPECT_ERR(cp_safetensors_open((dir_ / "empty.safetensors").c_str(), &raw), CP_ERR_FORMAT,
               "empty.safetensors", "shorter");
    write_file(dir_ / "two.safetensors", HandImage().bytes);
    EXPECT_ERR(cp_safetensors_open(dir_.c_str(), &raw), CP_ERR_FORMAT, "2 .safetensors");
    EXPECT_ERR(cp_safetensors_open(nullptr, &raw), CP_ERR_INVALID_ARG, "path");
    EXPECT_ERR(cp_safetensors_open_memory(nullptr, 5, &raw), CP_ERR_INVALID_ARG, "NULL");
    EXPECT_EQ(raw, nullptr);
}

// ---- corrupt headers -------------------------------------------------------------

struct Corrupt {
    const char *what;
    std::string header; // JSON text after the 8-byte length
    size_t data_len;
    cp_status code;
    std::vector<const char *> frags;
};

void PrintTo(const Corrupt &c, std::ostream *os) {
    *os << c.what;
}

std::string t1(const std::string &body) {
    return "{\"w\":{" + body + "}}";
}

class SafetensorsCorrupt : public ::testing::TestWithParam<Corrupt> {};

TEST_P(SafetensorsCorrupt, IsRefused) {
    const Corrupt &c = GetParam();
    std::vector<uint8_t> b = image(c.header, std::vector<uint8_t>(c.data_len, 0x11));
    cp_safetensors_t raw = (cp_safetensors_t)0x1;
    cp_status st = cp_safetensors_open_memory(b.data(), b.size(), &raw);
    EXPECT_EQ(st, c.code) << c.what << ": " << cp_last_error();
    EXPECT_EQ(raw, nullptr);
    std::string msg = cp_last_error_detail();
    EXPECT_NE(msg.find("<memory>"), std::string::npos) << msg;
    for (const char *f : c.frags)
        EXPECT_NE(msg.find(f), std::string::npos) << c.what << ": " << msg;
    if (raw) cp_safetensors_close(raw);
}

const std::string kOk = "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]";

INSTANTIATE_TEST_SUITE_P(
    Headers, SafetensorsCorrupt,
    ::testing::Values(
        Corrupt{"not json", "{\"w\": {", 8, CP_ERR_FORMAT, {"not valid JSON"}},
        Corrupt{"trailing garbage", "{} x", 8, CP_ERR_FORMAT, {"not valid JSON"}},
        Corrupt{"not an object", "[1, 2]", 8, CP_ERR_FORMAT, {"not a JSON object"}},
        Corrupt{"entry not object", "{\"w\": 3}", 8, CP_ERR_FORMAT, {"'w'", "not a JSON object"}},
        Corrupt{"missing dtype",
                t1("\"shape\":[2],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "dtype"}},
        Corrupt{"missing shape",
                t1("\"dtype\":\"F32\",\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "shape"}},
        Corrupt{"missing offsets",
                t1("\"dtype\":\"F32\",\"shape\":[2]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "data_offsets"}},
        Corrupt{"unknown dtype",
                t1("\"dtype\":\"F12\",\"shape\":[2],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "unknown dtype", "F12"}},
        Corrupt{"dtype not string",
                t1("\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "dtype"}},
        Corrupt{"negative dim",
                t1("\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "shape[0]"}},
        Corrupt{"real dim",
                t1("\"dtype\":\"F32\",\"shape\":[2, 1.5],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "shape[1]"}},
        Corrupt{"string dim",
                t1("\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "shape[0]"}},
        Corrupt{"shape not array",
                t1("\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "shape"}},
        Corrupt{"count overflow",
                t1("\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "overflows"}},
        Corrupt{"byte overflow",
                t1("\"dtype\":\"F64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "overflows"}},
        Corrupt{"offsets reversed",
                t1("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "[8, 0]"}},
        Corrupt{"offsets past data",
                t1("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "[4, 12]", "8 bytes"}},
        Corrupt{"offsets one value",
                t1("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "data_offsets"}},
        Corrupt{"offsets negative",
                t1("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "data_offsets"}},
        Corrupt{"offsets three",
                t1("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4,8]"),
                8,
                CP_ERR_FORMAT,
                {"'w'", "data_offsets"}},
        Corrupt{"size mismatch",
                t1("\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]"),
                16,
                CP_ERR_FORMAT,
                {"'w'", "span 8 bytes", "need 12"}},
        Corrupt{"overlap",
                "{\"a\":{" + kOk +
                    "},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                16,
                CP_ERR_FORMAT,
                {"'a'", "'b'", "overlap"}},
        Corrupt{"overlap inside",
                "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                "\"b\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[15,16]}}",
                16,
                CP_ERR_FORMAT,
                {"'a'", "'b'", "overlap"}},
        Corrupt{"duplicate key",
                "{\"a\":{" + kOk + "},\"a\":{" + kOk + "}}",
                8,
                CP_ERR_FORMAT,
                {"duplicate", "a"}},
        Corrupt{"duplicate after mapping",
                "{\"lm_head.weight\":{" + kOk +
                    "},\"output.weight\":{\"dtype\":\"F32\",\"shape\":[2],"
                    "\"data_offsets\":[8,16]}}",
                16,
                CP_ERR_FORMAT,
                {"duplicate", "output.weight", "lm_head.weight"}},
        Corrupt{"five dims",
                t1("\"dtype\":\"F32\",\"shape\":[1,1,1,1,2],\"data_offsets\":[0,8]"),
                8,
                CP_ERR_UNSUPPORTED,
                {"'w'", "5 dimensions"}},
        Corrupt{"metadata not strings",
                "{\"__metadata__\":{\"k\":1},\"w\":{" + kOk + "}}",
                8,
                CP_ERR_FORMAT,
                {"__metadata__", "'k'"}},
        Corrupt{"metadata not object",
                "{\"__metadata__\":[],\"w\":{" + kOk + "}}",
                8,
                CP_ERR_FORMAT,
                {"__metadata__"}},
        Corrupt{"empty name", "{\"\":{" + kOk + "}}", 8, CP_ERR_FORMAT, {"empty name"}},
        Corrupt{"bad utf-8", "{\"\xff\":{" + kOk + "}}", 8, CP_ERR_FORMAT, {"not valid JSON"}}),
    [](const ::testing::TestParamInfo<Corrupt> &i) {
        std::string n = i.param.what;
        for (char &ch : n)
            if (!isalnum((unsigned char)ch)) ch = '_';
        return n;
    });

TEST(Safetensors, CorruptFraming) {
    cp_safetensors_t raw = nullptr;
    std::vector<uint8_t> b = {1, 0, 0};
    EXPECT_ERR(cp_safetensors_open_memory(b.data(), b.size(), &raw), CP_ERR_FORMAT, "<memory>",
               "3 bytes", "shorter");
    EXPECT_ERR(cp_safetensors_open_memory(b.data(), 0, &raw), CP_ERR_FORMAT, "shorter");
    // Header length larger than the file.
    b = image("{}", {});
    b[0] = 3; // claims 3 bytes but only 2 follow
    EXPECT_ERR(cp_safetensors_open_memory(b.data(), b.size(), &raw), CP_ERR_FORMAT,
               "header length 3", "larger than the file");
    // Header length beyond the 100 MB limit (file is far smaller: limit first).
    b = image("{}", {});
    uint64_t big = 100000001ull;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(big >> (8 * i));
    EXPECT_ERR(cp_safetensors_open_memory(b.data(), b.size(), &raw), CP_ERR_FORMAT, "100 MB");
    b[7] = 0xff; // 2^63-ish: must not overflow any size arithmetic
    EXPECT_ERR(cp_safetensors_open_memory(b.data(), b.size(), &raw), CP_ERR_FORMAT, "100 MB");
    EXPECT_EQ(raw, nullptr);
    // An empty header object is a valid file with no tensors.
    b = image("{}", {});
    ASSERT_EQ(cp_safetensors_open_memory(b.data(), b.size(), &raw), CP_OK) << cp_last_error();
    StPtr st(raw);
    EXPECT_EQ(cp_safetensors_n_tensors(st.get()), 0);
    EXPECT_EQ(cp_safetensors_find(st.get(), "x"), nullptr);
}

// ---- config.json --------------------------------------------------------------------

const char *kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256,
  "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct"})";

const char *kMistral = R"({
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
  "vocab_size": 32000})";

const char *kQwen2 = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
  "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
  "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
  "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936})";

const char *kSmolLM2 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
  "is_llama_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
  "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 49152})";

class HfConfig : public TempDirTest {
  protected:
    cp_status load(const std::string &text, cp_model_config *cfg) {
        fs::path p = dir_ / "config.json";
        write_text(p, text);
        return cp_hf_config_load(p.c_str(), cfg);
    }
};

TEST_F(HfConfig, Llama31) {
    cp_model_config c;
    ASSERT_EQ(load(kLlama31, &c), CP_OK) << cp_last_error();
    EXPECT_STREQ(c.arch, "llama");
    EXPECT_STREQ(c.name, "meta-llama/Llama-3.1-8B-Instruct");
    EXPECT_EQ(c.n_vocab, 128256);
    EXPECT_EQ(c.dim, 4096);
    EXPECT_EQ(c.n_layer, 32);
    EXPECT_EQ(c.n_head, 32);
    EXPECT_EQ(c.n_head_kv, 8);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.rot_dim, 128);
    EXPECT_EQ(c.ffn_dim, 14336);
    EXPECT_EQ(c.ctx_train, 131072);
    EXPECT_EQ(c.norm_eps, 1e-5f);
    EXPECT_EQ(c.rope_mode, CP_ROPE_HALF);
    EXPECT_EQ(c.rope_theta, 500000.0f);
    EXPECT_EQ(c.rope_freq_scale, 1.0f);
    EXPECT_EQ(c.rope_llama3_factor, 8.0f);
    EXPECT_EQ(c.rope_llama3_low_freq_factor, 1.0f);
    EXPECT_EQ(c.rope_llama3_high_freq_factor, 4.0f);
    EXPECT_EQ(c.rope_llama3_orig_ctx, 8192);
    EXPECT_FALSE(c.tied_embeddings);
    EXPECT_FALSE(c.qkv_bias);
    // The directory holding config.json works as well.
    cp_model_config d;
    ASSERT_EQ(cp_hf_config_load(dir_.c_str(), &d), CP_OK) << cp_last_error();
    EXPECT_EQ(d.n_vocab, 128256);
}

TEST_F(HfConfig, MistralSlidingWindowCapsContext) {
    cp_model_config c;
    ASSERT_EQ(load(kMistral, &c), CP_OK) << cp_last_error();
    EXPECT_STREQ(c.arch, "mistral");
    EXPECT_EQ(c.n_vocab, 32000);
    EXPECT_EQ(c.n_head_kv, 8);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.ctx_train, 4096); // sliding_window 4096 < 32768
    EXPECT_EQ(c.rope_theta, 10000.0f);
    EXPECT_EQ(c.rope_llama3_factor, 0.0f);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_FALSE(c.tied_embeddings);
    // Mistral v0.2 and later: no window.
    std::string v2 = kMistral;
    v2.replace(v2.find("\"sliding_window\": 4096"), 22, "\"sliding_window\": null");
    ASSERT_EQ(load(v2, &c), CP_OK) << cp_last_error();
    EXPECT_EQ(c.ctx_train, 32768);
}

TEST_F(HfConfig, Qwen2) {
    cp_model_config c;
    ASSERT_EQ(load(kQwen2, &c), CP_OK) << cp_last_error();
    EXPECT_STREQ(c.arch, "qwen2");
    EXPECT_EQ(c.n_vocab, 151936);
    EXPECT_EQ(c.dim, 896);
    EXPECT_EQ(c.n_layer, 24);
    EXPECT_EQ(c.n_head, 14);
    EXPECT_EQ(c.n_head_kv, 2);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.ffn_dim, 4864);
    EXPECT_EQ(c.ctx_train, 32768); // use_sliding_window false
    EXPECT_EQ(c.norm_eps, 1e-6f);
    EXPECT_EQ(c.rope_theta, 1000000.0f);
    EXPECT_EQ(c.rope_mode, CP_ROPE_HALF);
    EXPECT_TRUE(c.tied_embeddings);
    EXPECT_TRUE(c.qkv_bias);
}

TEST_F(HfConfig, SmolLM2TiedAndExplicitHeadDim) {
    cp_model_config c;
    ASSERT_EQ(load(kSmolLM2, &c), CP_OK) << cp_last_error();
    EXPECT_STREQ(c.arch, "llama");
    EXPECT_EQ(c.name[0], '\0');
    EXPECT_EQ(c.n_vocab, 49152);
    EXPECT_EQ(c.dim, 576);
    EXPECT_EQ(c.n_layer, 30);
    EXPECT_EQ(c.n_head, 9);
    EXPECT_EQ(c.n_head_kv, 3);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.ffn_dim, 1536);
    EXPECT_EQ(c.ctx_train, 8192);
    EXPECT_EQ(c.rope_theta, 100000.0f); // written as an integer
    EXPECT_TRUE(c.tied_embeddings);
    EXPECT_FALSE(c.qkv_bias);
    // head_dim need not be hidden_size / n_head.
    std::string odd = kSmolLM2;
    odd.replace(odd.find("\"head_dim\": 64"), 14, "\"head_dim\": 96");
    ASSERT_EQ(load(odd, &c), CP_OK) << cp_last_error();
    EXPECT_EQ(c.head_dim, 96);
    EXPECT_EQ(c.rot_dim, 96);
}

// The independent reference: the GGUF conversion of the same model, when the
// default model file is present.
TEST_F(HfConfig, SmolLM2MatchesItsGguf) {
    const char *path = std::getenv("CP_TEST_MODEL");
    std::string p = path ? path : CP_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!fs::exists(p)) GTEST_SKIP() << "no GGUF model at " << p;
    cp_gguf_t g = nullptr;
    ASSERT_EQ(cp_gguf_open(p.c_str(), &g), CP_OK) << cp_last_error();
    cp_model_config ref;
    cp_status st = cp_gguf_model_config(g, &ref);
    cp_gguf_close(g);
    ASSERT_EQ(st, CP_OK) << cp_last_error();
    if (ref.n_layer != 30 || ref.dim != 576) GTEST_SKIP() << "CP_TEST_MODEL is not SmolLM2-135M";
    cp_model_config c;
    ASSERT_EQ(load(kSmolLM2, &c), CP_OK) << cp_last_error();
    EXPECT_EQ(c.n_vocab, ref.n_vocab);
    EXPECT_EQ(c.dim, ref.dim);
    EXPECT_EQ(c.n_layer, ref.n_layer);
    EXPECT_EQ(c.n_head, ref.n_head);
    EXPECT_EQ(c.n_head_kv, ref.n_head_kv);
    EXPECT_EQ(c.head_dim, ref.head_dim);
    EXPECT_EQ(c.ffn_dim, ref.ffn_dim);
    EXPECT_EQ(c.ctx_train, ref.ctx_train);
    EXPECT_EQ(c.norm_eps, ref.norm_eps);
    EXPECT_EQ(c.rope_theta, ref.rope_theta);
    EXPECT_EQ(c.tied_embeddings, ref.tied_embeddings);
}

TEST_F(HfConfig, LinearRopeScalingAndDefaults) {
    cp_model_config c;
    ASSERT_EQ(load(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 128,
                       "rope_scaling": {"type": "linear", "factor": 4}})",
                   &c),
              CP_OK)
        << cp_last_error();
    EXPECT_EQ(c.rope_freq_scale, 0.25f);
    EXPECT_EQ(c.rope_llama3_factor, 0.0f);
    EXPECT_EQ(c.n_head_kv, 4); // defaults to n_head
    EXPECT_EQ(c.head_dim, 16);
    EXPECT_EQ(c.ctx_train, 2048); // LlamaConfig's default
    EXPECT_EQ(c.norm_eps, 1e-6f);
    EXPECT_EQ(c.rope_theta, 10000.0f);
    EXPECT_FALSE(c.tied_embeddings);
    // Only architectures, no model_type.
    ASSERT_EQ(load(R"({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100,
                       "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 128, "rope_scaling": {"rope_type": "default"}})",
                   &c),
              CP_OK)
        << cp_last_error();
    EXPECT_STREQ(c.arch, "qwen2");
    EXPECT_TRUE(c.qkv_bias);
    EXPECT_EQ(c.rope_freq_scale, 1.0f);
}

TEST_F(HfConfig, Refusals) {
    cp_model_config c;
    const std::string base = R"("vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 128)";
    EXPECT_ERR(load("{\"model_type\": \"gpt2\", " + base + "}", &c), CP_ERR_UNSUPPORTED, "gpt2");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"rope_scaling\": {\"rope_type\": \"yarn\", "
                    "\"factor\": 4}, " +
                        base + "}",
                    &c),
               CP_ERR_UNSUPPORTED, "yarn");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"hidden_act\": \"gelu\", " + base + "}", &c),
               CP_ERR_UNSUPPORTED, "gelu");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"attention_bias\": true, " + base + "}", &c),
               CP_ERR_UNSUPPORTED, "attention_bias");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"mlp_bias\": true, " + base + "}", &c),
               CP_ERR_UNSUPPORTED, "mlp_bias");
    EXPECT_ERR(load(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
                        "num_attention_heads": 4, "intermediate_size": 128})",
                    &c),
               CP_ERR_FORMAT, "config.json", "num_hidden_layers", "missing");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"num_key_value_heads\": 3, " + base + "}", &c),
               CP_ERR_FORMAT, "num_key_value_heads");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"vocab_size\": 100, \"hidden_size\": 64.5, "
                    "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
                    "\"intermediate_size\": 128}",
                    &c),
               CP_ERR_FORMAT, "hidden_size", "integer");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"rms_norm_eps\": -1, " + base + "}", &c),
               CP_ERR_FORMAT, "rms_norm_eps");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"rope_scaling\": {\"rope_type\": \"llama3\", "
                    "\"factor\": 8}, " +
                        base + "}",
                    &c),
               CP_ERR_FORMAT, "low_freq_factor");
    EXPECT_ERR(load("{\"model_type\": \"llama\", \"tie_word_embeddings\": 1, " + base + "}", &c),
               CP_ERR_FORMAT, "tie_word_embeddings");
    EXPECT_ERR(load("{\"model_type\": \"llama\", " + base, &c), CP_ERR_FORMAT, "not valid JSON");
    EXPECT_ERR(load("[]", &c), CP_ERR_FORMAT, "not a JSON object");
    EXPECT_ERR(cp_hf_config_load((dir_ / "nope.json").c_str(), &c), CP_ERR_IO, "nope.json");
    EXPECT_ERR(cp_hf_config_parse("{}", 2, "mem.json", &c), CP_ERR_FORMAT, "mem.json",
               "model_type");
}

} // namespace
