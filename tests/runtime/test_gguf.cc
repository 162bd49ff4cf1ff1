// test_gguf.cc - the GGUF reader against images written byte by byte, every
// truncation of a valid file, corrupt headers, and the real default model.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/gguf_builder.h"

extern "C" {
#include "cp_gguf.h"
}

using cptest::GgufBuilder;

namespace {

struct GgufDeleter {
    void operator()(cp_gguf *g) const { cp_gguf_close(g); }
};
using GgufPtr = std::unique_ptr<cp_gguf, GgufDeleter>;

GgufBuilder small_file() {
    GgufBuilder b;
    b.kv_str("general.architecture", "llama");
    b.kv_u32("llama.block_count", 2);
    b.kv_f32("llama.rope.freq_base", 10000.5f);
    b.kv_bool("tokenizer.ggml.add_bos_token", true);
    b.kv_arr_str("tokenizer.ggml.tokens", {"a", "bc", "", "d\xc3\xa9"});
    b.kv_arr_i32("tokenizer.ggml.token_type", {1, 1, 3, 1});
    b.kv_i32("some.negative", -7);
    b.kv_u64("some.big", 1ull << 40);
    b.kv_f64("some.double", 0.125);
    std::vector<float> w(8 * 3);
    for (size_t i = 0; i < w.size(); i++) w[i] = (float)i * 0.5f;
    b.tensor_f32("w", {8, 3}, w);
    std::vector<float> n(5, 1.0f);
    b.tensor_f32("n", {5}, n);
    return b;
}

cp_status open_bytes(const std::vector<uint8_t> &img, cp_gguf_t *g) {
    return cp_gguf_open_memory(img.data(), img.size(), g);
}

}  // namespace

TEST(Gguf, ReadsEveryValueKindAndTensor) {
    auto img = small_file().build();
    cp_gguf_t raw = nullptr;
    ASSERT_EQ(open_bytes(img, &raw), CP_OK) << cp_last_error();
    GgufPtr g(raw);
    EXPECT_EQ(cp_gguf_version(g.get()), 3u);
    EXPECT_EQ(cp_gguf_n_kv(g.get()), 9);
    char arch[16];
    ASSERT_TRUE(cp_gguf_get_str_buf(g.get(), "general.architecture", arch, sizeof(arch)));
    EXPECT_STREQ(arch, "llama");
    uint64_t u;
    ASSERT_EQ(cp_gguf_get_u64(g.get(), "llama.block_count", &u), CP_OK);
    EXPECT_EQ(u, 2u);
    float f;
    ASSERT_EQ(cp_gguf_get_f32(g.get(), "llama.rope.freq_base", &f), CP_OK);
    EXPECT_EQ(f, 10000.5f);
    bool b = false;
    ASSERT_EQ(cp_gguf_get_bool(g.get(), "tokenizer.ggml.add_bos_token", &b), CP_OK);
    EXPECT_TRUE(b);
    int64_t i;
    ASSERT_EQ(cp_gguf_get_i64(g.get(), "some.negative", &i), CP_OK);
    EXPECT_EQ(i, -7);
    EXPECT_NE(cp_gguf_get_u64(g.get(), "some.negative", &u), CP_OK);  // negative to unsigned
    ASSERT_EQ(cp_gguf_get_u64(g.get(), "some.big", &u), CP_OK);
    EXPECT_EQ(u, 1ull << 40);
    ASSERT_EQ(cp_gguf_get_f32(g.get(), "some.double", &f), CP_OK);
    EXPECT_EQ(f, 0.125f);
    EXPECT_EQ(cp_gguf_get_i64_or(g.get(), "missing.key", 42), 42);
    EXPECT_EQ(cp_gguf_get_u64(g.get(), "missing.key", &u), CP_ERR_FORMAT);
    EXPECT_NE(std::string(cp_last_error()).find("missing.key"), std::string::npos);
    EXPECT_EQ(cp_gguf_get_str(g.get(), "llama.block_count", nullptr), CP_ERR_FORMAT);

    int64_t ti = cp_gguf_find_key(g.get(), "tokenizer.ggml.tokens");
    ASSERT_GE(ti, 0);
    EXPECT_EQ(cp_gguf_kv_type(g.get(), ti), CP_GGUF_ARRAY);
    EXPECT_EQ(cp_gguf_arr_type(g.get(), ti), CP_GGUF_STRING);
    ASSERT_EQ(cp_gguf_arr_n(g.get(), ti), 4u);
    cp_str s = cp_gguf_arr_str(g.get(), ti, 3);
    EXPECT_EQ(std::string(s.ptr, s.len), "d\xc3\xa9");
    EXPECT_EQ(cp_gguf_arr_str(g.get(), ti, 2).len, 0u);
    int64_t tt = cp_gguf_find_key(g.get(), "tokenizer.ggml.token_type");
    ASSERT_GE(tt, 0);
    int32_t types[4];
    memcpy(types, cp_gguf_arr_data(g.get(), tt), sizeof(types));
    EXPECT_EQ(types[2], 3);

    ASSERT_EQ(cp_gguf_n_tensors(g.get()), 2);
    const cp_weight_info *w = cp_gguf_find_tensor(g.get(), "w");
    ASSERT_NE(w, nullptr);
    EXPECT_EQ(w->dtype, CP_DTYPE_F32);
    EXPECT_EQ(w->ndim, 2);
    EXPECT_EQ(w->ne[0], 8);
    EXPECT_EQ(w->ne[1], 3);
    EXPECT_EQ(w->nbytes, 8u * 3 * 4);
    EXPECT_EQ(w->file_offset % 32, 0u);
    const float *wd = (const float *)w->data;
    EXPECT_EQ(wd[0], 0.0f);
    EXPECT_EQ(wd[23], 11.5f);
    const cp_weight_info *n = cp_gguf_find_tensor(g.get(), "n");
    ASSERT_NE(n, nullptr);
    EXPECT_EQ(((const float *)n->data)[4], 1.0f);
    EXPECT_EQ(cp_gguf_find_tensor(g.get(), "nope"), nullptr);
}

TEST(Gguf, ReadsVersion2) {
    GgufBuilder b(2);
    b.kv_str("general.architecture", "llama");
    b.tensor_f32("t", {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
    auto img = b.build();
    cp_gguf_t raw = nullptr;
    ASSERT_EQ(open_bytes(img, &raw), CP_OK) << cp_last_error();
    GgufPtr g(raw);
    EXPECT_EQ(cp_gguf_version(g.get()), 2u);
    EXPECT_EQ(((const float *)cp_gguf_find_tensor(g.get(), "t")->data)[7], 8.0f);
}

// Every strict prefix of a valid file is rejected cleanly (no crash, no
// leak under the sanitizers), with CP_ERR_FORMAT.
TEST(Gguf, EveryTruncationIsAFormatError) {
    auto img = small_file().build();
    for (size_t len = 0; len < img.size(); len++) {
        std::vector<uint8_t> cut(img.begin(), img.begin() + len);
        cp_gguf_t g = nullptr;
        cp_status st = open_bytes(cut, &g);
        ASSERT_EQ(st, CP_ERR_FORMAT) << "prefix of " << len << " bytes";
        ASSERT_EQ(g, nullptr);
        ASSERT_NE(std::string(cp_last_error_detail()), "");
    }
}

TEST(Gguf, RejectsCorruptHeaders) {
    auto img = small_file().build();
    cp_gguf_t g = nullptr;
    {
        auto bad = img;
        bad[0] = 'X';
        EXPECT_EQ(open_bytes(bad, &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("magic"), std::string::npos);
    }
    {
        GgufBuilder b(1);
        b.kv_u32("x", 1);
        auto bad = b.build();
        EXPECT_EQ(open_bytes(bad, &g), CP_ERR_UNSUPPORTED);
        EXPECT_NE(std::string(cp_last_error()).find("version 1"), std::string::npos);
    }
    {
        // absurd key count
        auto bad = img;
        uint64_t huge = 1ull << 60;
        memcpy(&bad[16], &huge, 8);
        EXPECT_EQ(open_bytes(bad, &g), CP_ERR_FORMAT);
    }
    {
        GgufBuilder b;
        b.kv_u32("dup", 1);
        b.kv_u32("dup", 2);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("duplicate"), std::string::npos);
    }
    {
        // value type 99
        GgufBuilder b;
        std::vector<uint8_t> raw = {1, 0, 0, 0, 0, 0, 0, 0, 'k', 99, 0, 0, 0};
        b.kv_raw(raw, 1);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("unknown value type"), std::string::npos);
    }
    {
        // string length pointing past the end
        GgufBuilder b;
        std::vector<uint8_t> raw = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0};
        b.kv_raw(raw, 1);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    {
        // bool that is not 0/1
        GgufBuilder b;
        std::vector<uint8_t> raw = {1, 0, 0, 0, 0, 0, 0, 0, 'b', 7, 0, 0, 0, 5};
        b.kv_raw(raw, 1);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    EXPECT_EQ(g, nullptr);
}

TEST(Gguf, RejectsBadTensors) {
    cp_gguf_t g = nullptr;
    std::vector<float> v(64, 1.0f);
    {
        GgufBuilder b;  // unknown tensor type
        b.tensor("t", 77, {32}, v.data(), 128);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_UNSUPPORTED);
        EXPECT_NE(std::string(cp_last_error()).find("type 77"), std::string::npos);
    }
    {
        GgufBuilder b;  // Q8_0 row of 33 elements is not whole blocks
        std::vector<uint8_t> q(34 * 2, 0);
        b.tensor("q", 8, {33, 1}, q.data(), q.size());
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("block"), std::string::npos);
    }
    {
        GgufBuilder b;  // data offset past the end
        b.tensor_f32("t", {16}, std::vector<float>(16, 0.f));
        b.override_offset(0, 1 << 20);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("'t'"), std::string::npos);
    }
    {
        GgufBuilder b;  // misaligned offset
        b.tensor_f32("t", {16}, std::vector<float>(16, 0.f));
        b.override_offset(0, 4);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
        EXPECT_NE(std::string(cp_last_error()).find("aligned"), std::string::npos);
    }
    {
        GgufBuilder b;  // zero dimension
        b.tensor("z", 0, {0}, v.data(), 0);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    {
        GgufBuilder b;  // element count overflow
        b.tensor("big", 0, {1ull << 40, 1ull << 40}, v.data(), 4);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    {
        GgufBuilder b;  // duplicate tensor names
        b.tensor_f32("t", {16}, std::vector<float>(16, 0.f));
        b.tensor_f32("t", {16}, std::vector<float>(16, 0.f));
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    {
        GgufBuilder b;  // bad alignment value
        b.kv_u32("general.alignment", 24);
        EXPECT_EQ(open_bytes(b.build(), &g), CP_ERR_FORMAT);
    }
    EXPECT_EQ(g, nullptr);
}

TEST(Gguf, MissingFileIsAnIoError) {
    cp_gguf_t g = nullptr;
    EXPECT_EQ(cp_gguf_open("/nonexistent/model.gguf", &g), CP_ERR_IO);
    EXPECT_NE(std::string(cp_last_error()).find("/nonexistent/model.gguf"), std::string::npos);
    EXPECT_EQ(cp_gguf_open("/", &g), CP_ERR_IO);
}

TEST(Gguf, TruncatedFileOnDiskNamesThePath) {
    const char *model = getenv("CP_TEST_MODEL");
    if (!model || !fopen(model, "rb")) GTEST_SKIP() << "default model not present";
    FILE *f = fopen(model, "rb");
    std::vector<uint8_t> head(1 << 20);
    size_t n = fread(head.data(), 1, head.size(), f);
    fclose(f);
    head.resize(n);
    std::string path = ::testing::TempDir() + "truncated.gguf";
    FILE *o = fopen(path.c_str(), "wb");
    fwrite(head.data(), 1, head.size(), o);
    fclose(o);
    cp_gguf_t g = nullptr;
    EXPECT_EQ(cp_gguf_open(path.c_str(), &g), CP_ERR_FORMAT);
    std::string msg = cp_last_error_detail();
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    remove(path.c_str());
}

// The values below were read from the file with the independent Python
// `gguf` package.
TEST(Gguf, DefaultModelMetadata) {
    const char *model = getenv("CP_TEST_MODEL");
    if (!model || !fopen(model, "rb")) GTEST_SKIP() << "default model not present";
    cp_gguf_t raw = nullptr;
    ASSERT_EQ(cp_gguf_open(model, &raw), CP_OK) << cp_last_error();
    GgufPtr g(raw);
    EXPECT_EQ(cp_gguf_n_tensors(g.get()), 272);
    EXPECT_EQ(cp_gguf_n_kv(g.get()), 33);
    cp_model_config c;
    ASSERT_EQ(cp_gguf_model_config(g.get(), &c), CP_OK) << cp_last_error();
    EXPECT_STREQ(c.arch, "llama");
    EXPECT_EQ(c.n_layer, 30);
    EXPECT_EQ(c.dim, 576);
    EXPECT_EQ(c.ffn_dim, 1536);
    EXPECT_EQ(c.n_head, 9);
    EXPECT_EQ(c.n_head_kv, 3);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.n_vocab, 49152);
    EXPECT_EQ(c.ctx_train, 8192);
    EXPECT_FLOAT_EQ(c.rope_theta, 100000.0f);
    EXPECT_TRUE(c.tied_embeddings);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_EQ(c.rope_mode, CP_ROPE_INTERLEAVED);
    const cp_weight_info *e = cp_gguf_find_tensor(g.get(), "token_embd.weight");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, CP_DTYPE_Q8_0);
    EXPECT_EQ(e->nbytes, 30081024u);
    const cp_weight_info *q = cp_gguf_find_tensor(g.get(), "blk.0.ffn_down.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->dtype, CP_DTYPE_Q4_1);
    EXPECT_EQ(q->ne[0], 1536);
    EXPECT_EQ(q->ne[1], 576);
    EXPECT_EQ(q->nbytes, 552960u);
}
