// hf_quant_writer.h - tiny AWQ / GPTQ checkpoint directories for tests:
// Llama / Qwen2 models whose linears are chosen integer codes, zero points
// and fp16 scales, packed the AutoAWQ / AutoGPTQ way (independently of the
// loader's unpacking), or written with the dequantized fp32 weights as the
// reference.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <list>
#include <random>
#include <string>
#include <vector>

extern "C" {
#include "cp_dtype.h"
#include "cp_safetensors.h"
}

namespace cptest {
namespace hfq {

namespace fs = std::filesystem;

enum class Method { Awq, Gptq };

struct QSpec {
    std::string arch = "llama"; // qwen2: Q/K/V biases
    int dim = 128, n_head = 4, n_head_kv = 2, ffn = 256, n_layer = 2, vocab = 64;
    Method method = Method::Gptq;
    bool v1 = true;          // GPTQ "gptq" format: zero points stored as z - 1
    int group = 128;         // -1: one group per column
    bool act_order = false;  // shuffled g_idx (GPTQ)
    bool write_gidx = true;  // GPTQ: store g_idx even when it is trivial
    bool quant_head = false; // lm_head quantized too
    int plain_layer = -1;    // this layer's down_proj stays unquantized (modules_to_not_convert)
};

// One quantized linear: codes [out][in], true zero points and fp16 scale
// bits [groups][out], the group of every input.
struct Lin {
    int in = 0, out = 0, groups = 0;
    std::vector<uint8_t> code, zero;
    std::vector<uint16_t> scale;
    std::vector<int32_t> gidx;
    float at(int o, int i) const {
        const int g = gidx[i];
        return (float)((int)code[(size_t)o * in + i] - (int)zero[(size_t)g * out + o]) *
               cp_fp16_to_fp32(scale[(size_t)g * out + o]);
    }
    std::vector<float> dequant() const {
        std::vector<float> w((size_t)out * in);
        for (int o = 0; o < out; o++)
            for (int i = 0; i < in; i++)
                w[(size_t)o * in + i] = at(o, i);
        return w;
    }
};

inline Lin make_lin(std::mt19937 &rng, const QSpec &s, int in, int out) {
    Lin L;
    L.in = in;
    L.out = out;
    const int gs = s.group > 0 ? s.group : in;
    L.groups = (in + gs - 1) / gs;
    L.code.resize((size_t)out * in);
    L.zero.resize((size_t)L.groups * out);
    L.scale.resize((size_t)L.groups * out);
    for (auto &c : L.code)
        c = (uint8_t)(rng() % 16);
    // GPTQ v1 zero points are 1..16 (16 is stored as 15), the others 0..15
    const int zlo = s.method == Method::Gptq && s.v1 ? 1 : 0;
    for (auto &z : L.zero)
        z = (uint8_t)(zlo + rng() % 16);
    std::uniform_real_distribution<float> sd(0.004f, 0.02f);
    for (auto &d : L.scale)
        d = cp_fp32_to_fp16(sd(rng));
    L.gidx.resize(in);
    if (s.act_order) {
        // desc_act: input perm[j] belongs to group j / gs
        std::vector<int> perm(in);
        for (int i = 0; i < in; i++)
            perm[i] = i;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int j = 0; j < in; j++)
            L.gidx[perm[j]] = j / gs;
    } else {
        for (int i = 0; i < in; i++)
            L.gidx[i] = i / gs;
    }
    return L;
}

inline std::vector<float> randn(std::mt19937 &rng, size_t n, float sd, float mean = 0.0f) {
    std::normal_distribution<float> d(mean, sd);
    std::vector<float> v(n);
    for (auto &x : v)
        x = d(rng);
    return v;
}

struct QModel {
    QSpec s;
    std::vector<float> embd, head, norm;
    Lin head_q;
    struct Layer {
        std::vector<float> an, fn;
        std::vector<uint16_t> bq, bk, bv; // fp16
        Lin lin[7];                       // q, k, v, o, gate, up, down
    };
    std::vector<Layer> L;
};

const char *const kMods[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                              "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                              "mlp.down_proj"};

inline QModel make_qmodel(const QSpec &s, unsigned seed) {
    std::mt19937 rng(seed);
    QModel m;
    m.s = s;
    const int hd = s.dim / s.n_head, q = s.n_head * hd, kv = s.n_head_kv * hd;
    m.embd = randn(rng, (size_t)s.vocab * s.dim, 0.5f);
    m.norm = randn(rng, s.dim, 0.1f, 1.0f);
    if (s.quant_head)
        m.head_q = make_lin(rng, s, s.dim, s.vocab);
    else
        m.head = randn(rng, (size_t)s.vocab * s.dim, 0.2f);
    const int ins[7] = {s.dim, s.dim, s.dim, q, s.dim, s.dim, s.ffn};
    const int outs[7] = {q, kv, kv, s.dim, s.ffn, s.ffn, s.dim};
    for (int l = 0; l < s.n_layer; l++) {
        QModel::Layer y;
        y.an = randn(rng, s.dim, 0.1f, 1.0f);
        y.fn = randn(rng, s.dim, 0.1f, 1.0f);
        for (int k = 0; k < 7; k++)
            y.lin[k] = make_lin(rng, s, ins[k], outs[k]);
        if (s.arch == "qwen2") {
            auto b = [&](int n) {
                std::vector<uint16_t> v(n);
                for (auto &x : v)
                    x = cp_fp32_to_fp16(randn(rng, 1, 0.1f)[0]);
                return v;
            };
            y.bq = b(q);
            y.bk = b(kv);
            y.bv = b(kv);
        }
        m.L.push_back(y);
    }
    return m;
}

// ---- packing, the way AutoGPTQ and AutoAWQ write checkpoints ----------------

// GPTQ: qweight [in/8][out], input row 8r + k in nibble k; qzeros
// [groups][out/8], output 8c + k in nibble k (v1 stores z - 1).
inline void pack_gptq(const Lin &L, bool v1, std::vector<uint32_t> &qw, std::vector<uint32_t> &qz) {
    qw.assign((size_t)(L.in / 8) * L.out, 0);
    for (int i = 0; i < L.in; i++)
        for (int o = 0; o < L.out; o++)
            qw[(size_t)(i / 8) * L.out + o] |= (uint32_t)L.code[(size_t)o * L.in + i]
                                               << (4 * (i % 8));
    qz.assign((size_t)L.groups * (L.out / 8), 0);
    for (int g = 0; g < L.groups; g++)
        for (int o = 0; o < L.out; o++) {
            const uint32_t z = (uint32_t)(L.zero[(size_t)g * L.out + o] - (v1 ? 1 : 0)) & 15u;
            qz[(size_t)g * (L.out / 8) + o / 8] |= z << (4 * (o % 8));
        }
}

// AWQ GEMM: qweight [in][out/8] and qzeros [groups][out/8]; nibble k of a
// word holds output 8c + order[k].
inline void pack_awq(const Lin &L, std::vector<uint32_t> &qw, std::vector<uint32_t> &qz) {
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    const int cols = L.out / 8;
    qw.assign((size_t)L.in * cols, 0);
    for (int i = 0; i < L.in; i++)
        for (int c = 0; c < cols; c++)
            for (int k = 0; k < 8; k++)
                qw[(size_t)i * cols + c] |= (uint32_t)L.code[(size_t)(8 * c + order[k]) * L.in + i]
                                            << (4 * k);
    qz.assign((size_t)L.groups * cols, 0);
    for (int g = 0; g < L.groups; g++)
        for (int c = 0; c < cols; c++)
            for (int k = 0; k < 8; k++)
                qz[(size_t)g * cols + c] |= (uint32_t)L.zero[(size_t)g * L.out + 8 * c + order[k]]
                                            << (4 * k);
}

// ---- checkpoint directories ---------------------------------------------------

// Lets a test damage a tensor before it is written: rename (empty: drop),
// retype, reshape or rewrite the bytes.
using Mutate = std::function<void(std::string &name, cp_st_dtype &type, std::vector<int64_t> &shape,
                                  std::vector<uint8_t> &bytes)>;

struct DirWriter {
    cp_st_writer_t w = nullptr;
    std::list<std::vector<uint8_t>> keep; // the writer borrows data until finish
    Mutate mutate;
    DirWriter() { EXPECT_EQ(cp_st_writer_init(&w), CP_OK); }
    ~DirWriter() { cp_st_writer_free(w); }
    template <typename T>
    void add(std::string name, cp_st_dtype t, std::vector<int64_t> shape, const std::vector<T> &v) {
        std::vector<uint8_t> b(v.size() * sizeof(T));
        if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
        if (mutate) mutate(name, t, shape, b);
        if (name.empty()) return;
        keep.push_back(std::move(b));
        EXPECT_EQ(cp_st_writer_add(w, name.c_str(), t, (int)shape.size(), shape.data(),
                                   keep.back().data(), keep.back().size()),
                  CP_OK)
            << name << ": " << cp_last_error();
    }
};

inline std::string config_text(const QSpec &s, const std::string &quant) {
    char buf[1024];
    snprintf(buf, sizeof(buf),
             "{\"model_type\": \"%s\", \"vocab_size\": %d, \"hidden_size\": %d, "
             "\"num_hidden_layers\": %d,"
             " \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"intermediate_size\": %d,"
             " \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000,"
             " \"tie_word_embeddings\": false, \"hidden_act\": \"silu\"%s%s}\n",
             s.arch.c_str(), s.vocab, s.dim, s.n_layer, s.n_head, s.n_head_kv, s.ffn,
             quant.empty() ? "" : ", ", quant.c_str());
    return buf;
}

inline void write_text(const fs::path &p, const std::string &t) {
    std::ofstream f(p, std::ios::binary);
    f << t;
}

// The quantization_config object a quantizer writes for s.
inline std::string quant_json(const QSpec &s) {
    char buf[512];
    if (s.method == Method::Awq)
        snprintf(
            buf, sizeof(buf),
            "{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": %d, \"zero_point\": true,"
            " \"version\": \"gemm\"%s}",
            s.group, s.plain_layer >= 0 ? ", \"modules_to_not_convert\": [\"down_proj\"]" : "");
    else
        snprintf(buf, sizeof(buf),
                 "{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": %d, \"desc_act\": %s, "
                 "\"sym\": false,"
                 " \"damp_percent\": 0.01, \"checkpoint_format\": \"%s\"}",
                 s.group, s.act_order ? "true" : "false", s.v1 ? "gptq" : "gptq_v2");
    return buf;
}

// Writes m into dir: quantized (packed linears, config with quant) or as the
// fp32 reference (dequantized linears, no quantization_config).
inline void write_dir(const QModel &m, const fs::path &dir, bool quantized, const std::string &quant,
               const Mutate &mutate = nullptr, bool quant_in_config = true) {
    const QSpec &s = m.s;
    fs::remove_all(dir);
    fs::create_directories(dir);
    if (quantized && !quant_in_config) {
        write_text(dir / "config.json", config_text(s, ""));
        write_text(dir / "quantize_config.json", quant);
    } else {
        write_text(dir / "config.json",
                   config_text(s, quantized ? "\"quantization_config\": " + quant : ""));
    }
    DirWriter w;
    w.mutate = mutate;
    const int64_t D = s.dim, V = s.vocab;
    auto linear = [&](const std::string &prefix, const Lin &L, bool pack) {
        if (!pack) {
            w.add(prefix + ".weight", CP_ST_F32, {L.out, L.in}, L.dequant());
            return;
        }
        std::vector<uint32_t> qw, qz;
        if (s.method == Method::Awq) {
            pack_awq(L, qw, qz);
            w.add(prefix + ".qweight", CP_ST_I32, {L.in, L.out / 8}, qw);
        } else {
            pack_gptq(L, s.v1, qw, qz);
            w.add(prefix + ".qweight", CP_ST_I32, {L.in / 8, L.out}, qw);
        }
        w.add(prefix + ".qzeros", CP_ST_I32, {L.groups, L.out / 8}, qz);
        w.add(prefix + ".scales", CP_ST_F16, {L.groups, L.out}, L.scale);
        if (s.method == Method::Gptq && (s.write_gidx || s.act_order))
            w.add(prefix + ".g_idx", CP_ST_I32, {L.in}, L.gidx);
    };
    w.add("model.embed_tokens.weight", CP_ST_F32, {V, D}, m.embd);
    w.add("model.norm.weight", CP_ST_F32, {D}, m.norm);
    if (s.quant_head)
        linear("lm_head", m.head_q, quantized);
    else
        w.add("lm_head.weight", CP_ST_F32, {V, D}, m.head);
    for (int l = 0; l < s.n_layer; l++) {
        const auto &y = m.L[l];
        const std::string p = "model.layers." + std::to_string(l) + ".";
        w.add(p + "input_layernorm.weight", CP_ST_F32, {D}, y.an);
        w.add(p + "post_attention_layernorm.weight", CP_ST_F32, {D}, y.fn);
        for (int k = 0; k < 7; k++)
            linear(p + kMods[k], y.lin[k], quantized && !(k == 6 && l == s.plain_layer));
        if (!y.bq.empty()) {
            w.add(p + "self_attn.q_proj.bias", CP_ST_F16, {(int64_t)y.bq.size()}, y.bq);
            w.add(p + "self_attn.k_proj.bias", CP_ST_F16, {(int64_t)y.bk.size()}, y.bk);
            w.add(p + "self_attn.v_proj.bias", CP_ST_F16, {(int64_t)y.bv.size()}, y.bv);
        }
    }
    ASSERT_EQ(cp_st_writer_finish(w.w, (dir / "model.safetensors").string().c_str()), CP_OK)
        << cp_last_error();
}

} // namespace hfq
} // namespace cptest
