// tiny_engine.h - engines on the test models of tiny_model.h (no
// tokenizer): a one-sequence CPU engine, and calibration statistics over
// random token ids.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cp_quantize.h"
#include "cp_runtime.h"

namespace cptest {

// A one-sequence CPU engine with an fp32 cache (by default one thread, 64
// positions, on a model without a tokenizer).
inline cp_engine_t open_engine(const std::string &path, int threads = 1, int n_ctx = 64, bool tokens_only = true) {
    cp_engine_opts eo = {};
    eo.model_path = path.c_str();
    eo.tokens_only = tokens_only;
    eo.n_threads = threads;
    eo.n_ctx = n_ctx;
    eo.n_seq = 1;
    eo.kv_f32 = true;
    cp_engine_t e = nullptr;
    EXPECT_EQ(cp_engine_init(&eo, &e), CP_OK) << cp_last_error();
    return e;
}

// Activation statistics of the model over n_tokens random ids below vocab
// (seed 17), in windows of 32.
inline cp_act_stats *calibrate(const std::string &path, int n_tokens, int vocab) {
    cp_engine_t e = open_engine(path);
    if (!e) return nullptr;
    std::mt19937 rng(17);
    std::vector<int32_t> t(n_tokens);
    for (auto &x : t) x = (int32_t)(rng() % vocab);
    cp_act_stats *s = nullptr;
    EXPECT_EQ(cp_act_stats_collect(e, t.data(), t.size(), 32, &s), CP_OK) << cp_last_error();
    cp_engine_free(e);
    return s;
}

}  // namespace cptest
