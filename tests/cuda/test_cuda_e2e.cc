// test_cuda_e2e.cc - the engine on the GPU against the engine on the CPU's
// fp32 reference ops (CP_CPU_FORCE_REF=1, set for this binary before any
// backend exists): the default model's greedy tokens and teacher-forced
// logits, and a random-weight bf16 Llama written by `synth`. Skipped when
// no CUDA device (or, for the default model, no model file) is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <unistd.h>
#include <vector>

extern "C" {
#include "cp_runtime.h"
}

namespace {

const int g_env = setenv("CP_CPU_FORCE_REF", "1", 1);

bool have_gpu() {
    int n = 0;
    return cp_backend_cuda_device_count(&n) == CP_OK && n > 0;
}

struct Engine {
    cp_engine_t e = nullptr;
    Engine(const std::string &path, cp_device dev, bool tokens_only) {
        cp_engine_opts o = {};
        o.model_path = path.c_str();
        o.n_threads = 0;
        o.device = dev;
        o.n_ctx = 512;
        o.n_seq = 1;
        o.tokens_only = tokens_only;
        EXPECT_EQ(cp_engine_init(&o, &e), CP_OK) << cp_last_error();
    }
    ~Engine() { cp_engine_free(e); }
};

struct Collect {
    std::vector<int32_t> toks;
    static bool cb(void *u, int32_t t, const char *, size_t) {
        ((Collect *)u)->toks.push_back(t);
        return true;
    }
};

std::vector<int32_t> greedy(cp_engine_t e, const std::vector<int32_t> &prompt, int n) {
    cp_gen_params p = {};
    p.sample.temperature = 0.0f;
    p.max_tokens = n;
    p.ignore_eos = true;
    Collect c;
    cp_gen_stats st;
    EXPECT_EQ(cp_engine_generate(e, prompt.data(), (int)prompt.size(), &p, Collect::cb, &c, &st),
              CP_OK)
        << cp_last_error();
    return c.toks;
}

// Max |a - b| over every logit, and the number of positions whose argmax
// differs although the reference's top-1/top-2 margin exceeds margin.
void compare_logits(const std::vector<float> &gpu, const std::vector<float> &cpu, int vocab,
                    double *max_abs, double *rel, int *bad_argmax, double margin) {
    *max_abs = 0;
    *bad_argmax = 0;
    double num = 0, den = 0;
    const int n = (int)(cpu.size() / vocab);
    for (int r = 0; r < n; r++) {
        const float *g = gpu.data() + (size_t)r * vocab, *c = cpu.data() + (size_t)r * vocab;
        int ag = 0, ac = 0;
        for (int j = 0; j < vocab; j++) {
            EXPECT_TRUE(std::isfinite(g[j]));
            *max_abs = std::max(*max_abs, (double)std::fabs(g[j] - c[j]));
            num += (double)(g[j] - c[j]) * (g[j] - c[j]);
            den += (double)c[j] * c[j];
            if (g[j] > g[ag]) ag = j;
            if (c[j] > c[ac]) ac = j;
        }
        float second = -INFINITY;
        for (int j = 0; j < vocab; j++)
            if (j != ac) second = std::max(second, c[j]);
        if (ag != ac && c[ac] - second > margin) (*bad_argmax)++;
    }
    *rel = std::sqrt(num / den);
}

TEST(CudaEndToEnd, DefaultModelMatchesTheCpuReference) {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    const char *path = getenv("CP_TEST_MODEL");
    if (!path || access(path, R_OK) != 0) GTEST_SKIP() << "default model not present";
    Engine cpu(path, CP_DEVICE_CPU, false), gpu(path, CP_DEVICE_CUDA, false);
    ASSERT_TRUE(cpu.e && gpu.e);
    const std::vector<std::vector<int32_t>> prompts = {
        {1, 9690, 198, 2683, 359, 253, 5356, 5646, 28},
        {504, 3458, 282, 4649, 314, 3575, 30, 378},
        {17, 30, 216, 33, 30, 216, 34, 30, 216, 35, 30, 216, 36, 30, 216, 37, 30, 216, 38, 30, 216}};
    const int vocab = cp_model_get_config(cp_engine_model(cpu.e))->n_vocab;
    for (const auto &pr : prompts) {
        auto tc = greedy(cpu.e, pr, 32), tg = greedy(gpu.e, pr, 32);
        // teacher-forced logits over prompt + the CPU's continuation
        std::vector<int32_t> all = pr;
        all.insert(all.end(), tc.begin(), tc.end());
        std::vector<float> lc(all.size() * vocab), lg(all.size() * vocab);
        ASSERT_EQ(cp_engine_logits(cpu.e, all.data(), (int)all.size(), lc.data()), CP_OK);
        ASSERT_EQ(cp_engine_logits(gpu.e, all.data(), (int)all.size(), lg.data()), CP_OK)
            << cp_last_error();
        double max_abs, rel;
        int bad;
        compare_logits(lg, lc, vocab, &max_abs, &rel, &bad, 0.05);
        // prefill rounds activations to fp16 for the GEMM (rel. 5e-4 per
        // element): on an H100 the largest difference of any logit was
        // 0.055 to 0.135 (logits span about +-30), relative 1.2e-3 to 2.2e-3
        EXPECT_LT(max_abs, 0.3);
        EXPECT_LT(rel, 5e-3);
        EXPECT_EQ(bad, 0);
        EXPECT_EQ(tg, tc) << "max |dlogit| " << max_abs;
        printf("[ prompt of %zu ] max |dlogit| %.4g, relative %.3g\n", pr.size(), max_abs, rel);
    }
}

TEST(CudaEndToEnd, SyntheticBf16Llama) {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    const char *dir = getenv("CP_TEST_SYNTH_MODEL");
    if (!dir || access(dir, R_OK) != 0) GTEST_SKIP() << "CP_TEST_SYNTH_MODEL not set";
    Engine cpu(dir, CP_DEVICE_CPU, true), gpu(dir, CP_DEVICE_CUDA, true);
    ASSERT_TRUE(cpu.e && gpu.e);
    const int vocab = cp_model_get_config(cp_engine_model(cpu.e))->n_vocab;
    std::vector<int32_t> toks;
    for (int i = 0; i < 40; i++) toks.push_back((i * 7919 + 13) % vocab);
    std::vector<float> lc(toks.size() * vocab), lg(toks.size() * vocab);
    ASSERT_EQ(cp_engine_logits(cpu.e, toks.data(), (int)toks.size(), lc.data()), CP_OK);
    ASSERT_EQ(cp_engine_logits(gpu.e, toks.data(), (int)toks.size(), lg.data()), CP_OK)
        << cp_last_error();
    double max_abs, rel;
    int bad;
    compare_logits(lg, lc, vocab, &max_abs, &rel, &bad, 1.0);
    // bf16 GEMM operands: relative error of the logits within 2e-2
    EXPECT_LT(rel, 2e-2);
    printf("[ synthetic bf16 ] max |dlogit| %.4g, relative %.3g\n", max_abs, rel);
}

}  // namespace
