// tiny_model.h - small random-weight Llama-family models written as GGUF
// files for tests (any head/FFN/vocabulary shape; F32 weights, or Q8_0/Q4_0
// matrices when the spec asks).
#pragma once

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/gguf_builder.h"

namespace cptest {

struct TinySpec {
    std::string arch = "llama";
    int dim = 64, n_head = 4, n_head_kv = 2, ffn = 96, n_layer = 2, vocab = 50, ctx = 256;
    bool tied = false, bias = false;
    float theta = 10000.0f;
    // GGUF types of the block matrices and of the embedding and output
    // (kGgufF32, kGgufQ8_0 or kGgufQ4_0; rows of the block types must be
    // multiples of 32). Norms and biases stay F32.
    uint32_t wtype = kGgufF32, head_type = kGgufF32;
};

using Mat = std::vector<float>;  // row-major [rows][cols]

struct TinyModel {
    TinySpec s;
    int hd;
    Mat embd, out, out_norm;
    struct Layer {
        Mat an, wq, wk, wv, wo, bq, bk, bv, fn, wg, wu, wd;
    };
    std::vector<Layer> L;
};

inline Mat randn(std::mt19937 &rng, size_t n, float scale, float mean = 0.0f) {
    std::normal_distribution<float> d(mean, scale);
    Mat m(n);
    for (auto &x : m) x = d(rng);
    return m;
}

inline TinyModel make_model(const TinySpec &s, unsigned seed) {
    std::mt19937 rng(seed);
    TinyModel m;
    m.s = s;
    m.hd = s.dim / s.n_head;
    int q = s.n_head * m.hd, kv = s.n_head_kv * m.hd;
    m.embd = randn(rng, (size_t)s.vocab * s.dim, 0.5f);
    m.out = s.tied ? m.embd : randn(rng, (size_t)s.vocab * s.dim, 0.2f);
    m.out_norm = randn(rng, s.dim, 0.1f, 1.0f);
    for (int l = 0; l < s.n_layer; l++) {
        TinyModel::Layer y;
        y.an = randn(rng, s.dim, 0.1f, 1.0f);
        y.wq = randn(rng, (size_t)q * s.dim, 0.15f);
        y.wk = randn(rng, (size_t)kv * s.dim, 0.15f);
        y.wv = randn(rng, (size_t)kv * s.dim, 0.15f);
        y.wo = randn(rng, (size_t)s.dim * q, 0.15f);
        if (s.bias) {
            y.bq = randn(rng, q, 0.1f);
            y.bk = randn(rng, kv, 0.1f);
            y.bv = randn(rng, kv, 0.1f);
        }
        y.fn = randn(rng, s.dim, 0.1f, 1.0f);
        y.wg = randn(rng, (size_t)s.ffn * s.dim, 0.15f);
        y.wu = randn(rng, (size_t)s.ffn * s.dim, 0.15f);
        y.wd = randn(rng, (size_t)s.dim * s.ffn, 0.15f);
        m.L.push_back(y);
    }
    return m;
}

inline std::string write_gguf(const TinyModel &m, const std::string &name, int skip_layer_tensor = -1,
                       bool bad_shape = false) {
    const TinySpec &s = m.s;
    GgufBuilder b;
    b.kv_str("general.architecture", s.arch);
    b.kv_str("general.name", "tiny");
    auto a = [&](const char *k) { return s.arch + "." + k; };
    b.kv_u32(a("block_count"), s.n_layer);
    b.kv_u32(a("context_length"), s.ctx);
    b.kv_u32(a("embedding_length"), s.dim);
    b.kv_u32(a("feed_forward_length"), s.ffn);
    b.kv_u32(a("attention.head_count"), s.n_head);
    b.kv_u32(a("attention.head_count_kv"), s.n_head_kv);
    b.kv_f32(a("rope.freq_base"), s.theta);
    b.kv_f32(a("attention.layer_norm_rms_epsilon"), 1e-5f);
    uint64_t D = s.dim, Q = (uint64_t)s.n_head * m.hd, KV = (uint64_t)s.n_head_kv * m.hd, F = s.ffn;
    b.tensor_as("token_embd.weight", s.head_type, {D, (uint64_t)s.vocab}, m.embd);
    if (!s.tied) b.tensor_as("output.weight", s.head_type, {D, (uint64_t)s.vocab}, m.out);
    b.tensor_f32("output_norm.weight", {D}, m.out_norm);
    for (int l = 0; l < s.n_layer; l++) {
        const auto &y = m.L[l];
        auto n = [&](const char *t) { return "blk." + std::to_string(l) + "." + t; };
        b.tensor_f32(n("attn_norm.weight"), {D}, y.an);
        if (bad_shape && l == 1)
            b.tensor_f32(n("attn_q.weight"), {D, Q / 2}, Mat(y.wq.begin(), y.wq.begin() + D * Q / 2));
        else
            b.tensor_as(n("attn_q.weight"), s.wtype, {D, Q}, y.wq);
        b.tensor_as(n("attn_k.weight"), s.wtype, {D, KV}, y.wk);
        if (skip_layer_tensor != l) b.tensor_as(n("attn_v.weight"), s.wtype, {D, KV}, y.wv);
        b.tensor_as(n("attn_output.weight"), s.wtype, {Q, D}, y.wo);
        if (s.bias) {
            b.tensor_f32(n("attn_q.bias"), {Q}, y.bq);
            b.tensor_f32(n("attn_k.bias"), {KV}, y.bk);
            b.tensor_f32(n("attn_v.bias"), {KV}, y.bv);
        }
        b.tensor_f32(n("ffn_norm.weight"), {D}, y.fn);
        b.tensor_as(n("ffn_gate.weight"), s.wtype, {D, F}, y.wg);
        b.tensor_as(n("ffn_up.weight"), s.wtype, {D, F}, y.wu);
        b.tensor_as(n("ffn_down.weight"), s.wtype, {F, D}, y.wd);
    }
    auto img = b.build();
    std::string path = ::testing::TempDir() + name + ".gguf";
    FILE *f = fopen(path.c_str(), "wb");
    fwrite(img.data(), 1, img.size(), f);
    fclose(f);
    return path;
}

}  // namespace cptest
