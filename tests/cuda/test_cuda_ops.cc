// test_cuda_ops.cc - every CUDA backend op against the CPU reference
// (kernels/cpu/ops_ref.c) on fresh random inputs with odd sizes; outputs are
// poisoned with NaN before each run and must be fully written. Tolerances by
// operand precision: fp32 math 1e-5 relative (norm), fp16 operands 2e-3,
// bf16 operands 1e-2. Sampling is compared choice by choice with
// cp_sample_host (exact, or within the documented 1e-6 boundary tolerance
// of the device's whole-row masses). Skipped when no CUDA device is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <vector>

extern "C" {
#include "cp_backend.h"
#include "cpu/cpu_ref.h"
}
#ifdef CP_HAVE_CUDA
#include "cuda/cp_cuda_ops.h"
#define CP_SAMPLE_MAX_EXACT_K CP_SAMPLE_CUDA_MAX_K
#else
#define CP_SAMPLE_MAX_EXACT_K 256
#endif

namespace {

cp_backend_t g_be = nullptr;

class Cuda : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        int n = 0;
        if (cp_backend_cuda_device_count(&n) != CP_OK || n == 0) return;
        ASSERT_EQ(cp_backend_cuda_init(0, &g_be), CP_OK) << cp_last_error();
    }
    static void TearDownTestSuite() {
        cp_backend_free(g_be);
        g_be = nullptr;
    }
    void SetUp() override {
        if (!g_be) GTEST_SKIP() << "no CUDA device";
    }
};

std::mt19937 &rng() {
    static std::mt19937 r(std::random_device{}());
    return r;
}

std::vector<float> randn(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = d(rng());
    return v;
}

// Device buffer filled from / read into host vectors.
struct Dev {
    void *p = nullptr;
    size_t bytes = 0;
    explicit Dev(size_t b) : bytes(b) { EXPECT_EQ(cp_backend_alloc(g_be, b ? b : 1, &p), CP_OK); }
    template <typename T> explicit Dev(const std::vector<T> &h) : Dev(h.size() * sizeof(T)) {
        put(h);
    }
    ~Dev() { cp_backend_dealloc(g_be, p); }
    Dev(const Dev &) = delete;
    Dev &operator=(const Dev &) = delete;
    template <typename T> void put(const std::vector<T> &h) {
        EXPECT_EQ(cp_backend_copy(g_be, p, h.data(), h.size() * sizeof(T), CP_COPY_HOST_TO_DEVICE),
                  CP_OK);
    }
    void poison() {
        std::vector<float> nan(bytes / 4, NAN);
        put(nan);
    }
    template <typename T> std::vector<T> get(size_t n) {
        std::vector<T> h(n);
        EXPECT_EQ(cp_backend_copy(g_be, h.data(), p, n * sizeof(T), CP_COPY_DEVICE_TO_HOST), CP_OK);
        return h;
    }
    float *f() { return (float *)p; }
    int32_t *i() { return (int32_t *)p; }
};

// ||a - b|| / ||b||; NaN anywhere fails.
double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    EXPECT_EQ(a.size(), b.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

// A weight [m][k] of dtype t made from random floats (packed by the CPU
// reference quantizer), on the host.
std::vector<uint8_t> make_weight(cp_dtype t, int64_t m, int64_t k) {
    auto w = randn((size_t)(m * k), 0.5f);
    std::vector<uint8_t> out((size_t)m * cp_dtype_row_size(t, k));
    EXPECT_EQ(cp_quantize_ref(t, w.data(), m, k, out.data()), CP_OK) << cp_last_error();
    return out;
}

struct MatmulCase {
    cp_dtype t;
    int64_t m, k;
};

// tolerance of a product through the GEMV kernels (fp32 on exact weights)
// or through cuBLASLt (activations rounded to the operand type). F8_ROW is
// W8A8 on both sides, so the device sees the reference's own quantized
// activations: beyond the GEMV its GEMMs sum products of codes (exact) in
// fp32 or in the FP8 tensor cores' accumulators, then scale; 1e-3 is far
// below the ~3% that quantizing the activations differently (or not at
// all) would cost.
double product_tol(cp_dtype t, int64_t k, int n) {
    const bool half = t == CP_DTYPE_F16 || t == CP_DTYPE_BF16;
    const bool gemv = n <= (half ? 2 : 8) && t != CP_DTYPE_F32 && (!half || k % 8 == 0);
    if (gemv || t == CP_DTYPE_F32) return 1e-5;
    if (t == CP_DTYPE_F8_ROW) return 1e-3;
    return t == CP_DTYPE_BF16 ? 1e-2 : 2e-3;
}

void check_matmul(cp_dtype t, int64_t m, int64_t k, int n, bool bias) {
    SCOPED_TRACE(::testing::Message() << cp_dtype_name(t) << " m=" << m << " k=" << k << " n=" << n
                                      << " bias=" << bias);
    auto wh = make_weight(t, m, k);
    auto x = randn((size_t)n * k);
    auto b = randn((size_t)m);
    cp_tensor wc = cp_tensor_2d(t, m, k, wh.data());
    std::vector<float> ref((size_t)n * m);
    ASSERT_EQ(cp_matmul_ref(&wc, x.data(), n, ref.data(), bias ? b.data() : nullptr), CP_OK);
    Dev dw(wh), dx(x), db(b), dy((size_t)n * m * 4);
    dy.poison();
    cp_tensor wd = cp_tensor_2d(t, m, k, dw.p);
    wd.device = CP_DEVICE_CUDA;
    ASSERT_EQ(cp_backend_matmul(g_be, &wd, dx.f(), n, dy.f(), bias ? db.f() : nullptr), CP_OK)
        << cp_last_error();
    auto y = dy.get<float>((size_t)n * m);
    EXPECT_LT(rel_err(y, ref), product_tol(t, k, n));
}

TEST_F(Cuda, MatmulEveryDtypeAndBatch) {
    const cp_dtype types[] = {CP_DTYPE_F32,  CP_DTYPE_F16,  CP_DTYPE_BF16, CP_DTYPE_Q4_0,
                              CP_DTYPE_Q4_1, CP_DTYPE_Q5_0, CP_DTYPE_Q5_1, CP_DTYPE_Q8_0,
                              CP_DTYPE_Q4_K, CP_DTYPE_Q5_K, CP_DTYPE_Q6_K, CP_DTYPE_I4_G32,
                              CP_DTYPE_I4_G128, CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_S24_Q8};
    for (cp_dtype t : types) {
        const int64_t bs = cp_dtype_block_size(t);
        const bool rows = t == CP_DTYPE_I8_ROW || t == CP_DTYPE_F8_ROW;
        const int64_t k = bs == 256 ? 768 : (bs == 128 ? 384 : (bs == 32 || rows ? 224 : 200));
        for (int n : {1, 3, 8, 13, 40}) check_matmul(t, 37, k, n, n % 2 == 1);
    }
    // float rows that are not a multiple of 8 take the cuBLASLt path at n = 1
    check_matmul(CP_DTYPE_F16, 19, 100, 1, false);
    check_matmul(CP_DTYPE_BF16, 19, 100, 2, true);
}

TEST_F(Cuda, MatmulLargerShapes) {
    check_matmul(CP_DTYPE_BF16, 1000, 512, 1, false);
    check_matmul(CP_DTYPE_BF16, 1000, 512, 77, true);
    check_matmul(CP_DTYPE_Q4_1, 577, 576, 1, false);
    check_matmul(CP_DTYPE_Q4_1, 577, 576, 64, false);
    check_matmul(CP_DTYPE_Q8_0, 1536, 576, 33, false);
    // fp16/bf16 GEMV rows shared by 4, 2 and 1 warps, with and without a
    // partial last chunk of 128 x 8 elements
    check_matmul(CP_DTYPE_BF16, 300, 5416, 1, true);
    check_matmul(CP_DTYPE_F16, 301, 5416, 2, false);
    check_matmul(CP_DTYPE_BF16, 5000, 2056, 1, true);
    check_matmul(CP_DTYPE_BF16, 5001, 2056, 1, true); // a last block with a row out of range
    check_matmul(CP_DTYPE_F16, 4097, 4096, 2, true);
    check_matmul(CP_DTYPE_BF16, 9000, 1032, 1, false);
}

TEST_F(Cuda, MatmulGroupEqualsSeparateProducts) {
    struct Case {
        cp_dtype t[3];
        int n;
    };
    const Case cases[] = {{{CP_DTYPE_BF16, CP_DTYPE_BF16, CP_DTYPE_BF16}, 1},
                          {{CP_DTYPE_BF16, CP_DTYPE_BF16, CP_DTYPE_BF16}, 2},
                          {{CP_DTYPE_BF16, CP_DTYPE_BF16, CP_DTYPE_BF16}, 40},
                          {{CP_DTYPE_Q4_1, CP_DTYPE_Q4_1, CP_DTYPE_Q4_1}, 3},
                          {{CP_DTYPE_Q4_K, CP_DTYPE_Q4_K, CP_DTYPE_Q6_K}, 1},
                          {{CP_DTYPE_Q8_0, CP_DTYPE_Q8_0, CP_DTYPE_Q8_0}, 17},
                          {{CP_DTYPE_I4_G128, CP_DTYPE_I4_G128, CP_DTYPE_I4_G128}, 1},
                          {{CP_DTYPE_I4_G32, CP_DTYPE_I4_G32, CP_DTYPE_I4_G32}, 12},
                          {{CP_DTYPE_I8_ROW, CP_DTYPE_I8_ROW, CP_DTYPE_I8_ROW}, 2},
                          {{CP_DTYPE_F8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_F8_ROW}, 3},
                          {{CP_DTYPE_F8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_F8_ROW}, 21},
                          {{CP_DTYPE_S24_Q8, CP_DTYPE_S24_Q8, CP_DTYPE_S24_Q8}, 1},
                          {{CP_DTYPE_S24_Q8, CP_DTYPE_S24_Q8, CP_DTYPE_S24_Q8}, 40}};
    const int64_t rows[3] = {96, 32, 40};
    for (const int64_t k : {512, 4352}) // 4352: the float GEMV's warps share rows
    for (const Case &c : cases) {
        SCOPED_TRACE(::testing::Message() << cp_dtype_name(c.t[0]) << "/" << cp_dtype_name(c.t[2])
                                          << " n=" << c.n << " k=" << k);
        auto x = randn((size_t)c.n * k);
        Dev dx(x);
        std::vector<std::vector<uint8_t>> wh(3);
        std::vector<std::unique_ptr<Dev>> dw, dy, db;
        std::vector<std::vector<float>> bh(3);
        cp_tensor wd[3];
        const cp_tensor *wp[3];
        float *yp[3];
        const float *bp[3];
        for (int i = 0; i < 3; i++) {
            wh[i] = make_weight(c.t[i], rows[i], k);
            bh[i] = randn((size_t)rows[i]);
            dw.emplace_back(new Dev(wh[i]));
            db.emplace_back(new Dev(bh[i]));
            dy.emplace_back(new Dev((size_t)c.n * rows[i] * 4));
            dy[i]->poison();
            wd[i] = cp_tensor_2d(c.t[i], rows[i], k, dw[i]->p);
            wd[i].device = CP_DEVICE_CUDA;
            wp[i] = &wd[i];
            yp[i] = dy[i]->f();
            bp[i] = i == 1 ? nullptr : db[i]->f();
        }
        ASSERT_EQ(cp_backend_matmul_group(g_be, 3, wp, dx.f(), c.n, yp, bp), CP_OK) << cp_last_error();
        for (int i = 0; i < 3; i++) {
            cp_tensor wc = cp_tensor_2d(c.t[i], rows[i], k, wh[i].data());
            std::vector<float> ref((size_t)c.n * rows[i]);
            cp_matmul_ref(&wc, x.data(), c.n, ref.data(), i == 1 ? nullptr : bh[i].data());
            EXPECT_LT(rel_err(dy[i]->get<float>(ref.size()), ref), product_tol(c.t[i], k, c.n)) << i;
        }
    }
}

TEST_F(Cuda, MatmulSwigluEqualsItsComposition) {
    const int64_t m = 72;
    for (const int64_t k : {256, 4352}) // 4352: the float GEMV's warps share rows
    for (cp_dtype t : {CP_DTYPE_BF16, CP_DTYPE_F16, CP_DTYPE_Q4_1, CP_DTYPE_Q4_K, CP_DTYPE_Q8_0,
                       CP_DTYPE_I4_G128, CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_S24_Q8})
        for (int n : {1, 2, 5, 33}) {
            SCOPED_TRACE(::testing::Message() << cp_dtype_name(t) << " n=" << n << " k=" << k);
            auto gh = make_weight(t, m, k), uh = make_weight(t, m, k);
            auto x = randn((size_t)n * k);
            cp_tensor gc = cp_tensor_2d(t, m, k, gh.data()), uc = cp_tensor_2d(t, m, k, uh.data());
            std::vector<float> g((size_t)n * m), u((size_t)n * m), ref((size_t)n * m);
            cp_matmul_ref(&gc, x.data(), n, g.data(), nullptr);
            cp_matmul_ref(&uc, x.data(), n, u.data(), nullptr);
            cp_swiglu_ref(ref.data(), g.data(), u.data(), ref.size());
            Dev dg(gh), du(uh), dx(x), dout((size_t)n * m * 4), dup((size_t)n * m * 4);
            dout.poison();
            cp_tensor gd = cp_tensor_2d(t, m, k, dg.p), ud = cp_tensor_2d(t, m, k, du.p);
            gd.device = ud.device = CP_DEVICE_CUDA;
            ASSERT_EQ(cp_backend_matmul_swiglu(g_be, &gd, &ud, dx.f(), n, dout.f(), dup.f()), CP_OK)
                << cp_last_error();
            EXPECT_LT(rel_err(dout.get<float>(ref.size()), ref), 2 * product_tol(t, k, n));
        }
}

TEST_F(Cuda, AddRmsnormEqualsItsComposition) {
    for (int dim : {9, 576, 4096}) {
        const int n = 3;
        auto x = randn((size_t)n * dim, 2.0f), d = randn((size_t)n * dim), w = randn((size_t)dim);
        auto xr = x;
        std::vector<float> ref(x.size());
        cp_add_ref(xr.data(), xr.data(), d.data(), xr.size());
        cp_rmsnorm_ref(ref.data(), xr.data(), w.data(), n, dim, 1e-6f);
        Dev dx(x), dd(d), dw(w), dout(x.size() * 4);
        dout.poison();
        ASSERT_EQ(cp_backend_add_rmsnorm(g_be, dx.f(), dd.f(), dw.f(), n, dim, 1e-6f, dout.f()), CP_OK);
        EXPECT_LT(rel_err(dx.get<float>(x.size()), xr), 1e-6) << dim;
        EXPECT_LT(rel_err(dout.get<float>(x.size()), ref), 1e-5) << dim;
    }
}

TEST_F(Cuda, RopeStoreEqualsItsComposition) {
    const int n_tok = 13, n_head = 6, n_kv = 2, hd = 64, bs = 7;
    for (int mode = 0; mode < 2; mode++)
        for (cp_dtype kvt : {CP_DTYPE_F16, CP_DTYPE_F32, CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW}) {
            SCOPED_TRACE(::testing::Message() << "mode " << mode << " " << cp_dtype_name(kvt));
            std::vector<int32_t> pos(n_tok), seq(n_tok);
            for (int t = 0; t < n_tok; t++) {
                seq[t] = t % 2;
                pos[t] = 40 + t / 2;
            }
            const int max_blocks = 9, n_blocks = 2 * max_blocks;
            std::vector<int32_t> tables(2 * max_blocks);
            for (int i = 0; i < 2 * max_blocks; i++) tables[i] = (i * 7) % n_blocks;
            cp_rope_params rp = {(cp_rope_mode)mode, hd, 48, 10000.0f, 1.0f, nullptr};
            auto q = randn((size_t)n_tok * n_head * hd), k = randn((size_t)n_tok * n_kv * hd),
                 v = randn((size_t)n_tok * n_kv * hd);
            const bool quant = kvt == CP_DTYPE_I8_ROW || kvt == CP_DTYPE_F8_ROW;
            const size_t esz = kvt == CP_DTYPE_F16 ? 2 : 4;
            const size_t row_bytes = quant ? cp_dtype_row_size(kvt, hd) : hd * esz;
            const size_t cache_bytes = (size_t)n_blocks * bs * n_kv * row_bytes;
            std::vector<uint8_t> kc(cache_bytes, 0), vc(cache_bytes, 0);
            cp_attn_params ph = {n_tok, n_head, n_kv, hd, bs, max_blocks, 0.125f, kvt,
                                 seq.data(), pos.data(), tables.data(), 0, 0};
            auto qr = q, kr = k;
            cp_rope_ref(qr.data(), pos.data(), n_tok, n_head, &rp);
            cp_rope_ref(kr.data(), pos.data(), n_tok, n_kv, &rp);
            ASSERT_EQ(cp_kv_store_ref(&ph, kr.data(), v.data(), kc.data(), vc.data()), CP_OK);
            Dev dq(q), dk(k), dv(v), dkc(std::vector<uint8_t>(cache_bytes, 0)),
                dvc(std::vector<uint8_t>(cache_bytes, 0)), dpos(pos), dseq(seq), dtab(tables);
            cp_attn_params p = ph;
            p.seq_of_tok = dseq.i();
            p.pos_of_tok = dpos.i();
            p.block_tables = dtab.i();
            ASSERT_EQ(cp_backend_rope_store(g_be, &rp, &p, dq.f(), dk.f(), dv.f(), dkc.p, dvc.p), CP_OK)
                << cp_last_error();
            EXPECT_LT(rel_err(dq.get<float>(q.size()), qr), 1e-6);
            auto as_float = [&](const std::vector<uint8_t> &c) {
                const size_t rows = c.size() / row_bytes;
                std::vector<float> f(rows * hd);
                if (quant) { // the rows' values (codes x scale)
                    cp_tensor t = cp_tensor_2d(kvt, (int64_t)rows, hd, (void *)c.data());
                    EXPECT_EQ(cp_dequantize_ref(&t, 0, (int64_t)rows, f.data()), CP_OK);
                    return f;
                }
                for (size_t i = 0; i < f.size(); i++) {
                    if (esz == 4) memcpy(&f[i], &c[4 * i], 4);
                    else f[i] = cp_fp16_to_fp32((uint16_t)(c[2 * i] | (c[2 * i + 1] << 8)));
                }
                return f;
            };
            // the device rotates K in another order (1e-6): a quantized
            // code may round the other way where a value lies on a
            // boundary, one step of 127 (int8) or 3 mantissa bits (fp8)
            EXPECT_LT(rel_err(as_float(dkc.get<uint8_t>(cache_bytes)), as_float(kc)), quant ? 2e-3 : 1e-4);
            EXPECT_TRUE(dvc.get<uint8_t>(cache_bytes) == vc);
        }
}

TEST_F(Cuda, Rmsnorm) {
    for (int dim : {7, 576, 4099}) {
        const int n = 5;
        auto x = randn((size_t)n * dim, 3.0f), w = randn((size_t)dim);
        std::vector<float> ref(x.size());
        cp_rmsnorm_ref(ref.data(), x.data(), w.data(), n, dim, 1e-5f);
        Dev dx(x), dw(w), dout(x.size() * 4);
        dout.poison();
        ASSERT_EQ(cp_backend_rmsnorm(g_be, dout.f(), dx.f(), dw.f(), n, dim, 1e-5f), CP_OK);
        EXPECT_LT(rel_err(dout.get<float>(x.size()), ref), 1e-5) << dim;
        // in place
        ASSERT_EQ(cp_backend_rmsnorm(g_be, dx.f(), dx.f(), dw.f(), n, dim, 1e-5f), CP_OK);
        EXPECT_LT(rel_err(dx.get<float>(x.size()), ref), 1e-5) << dim;
    }
}

TEST_F(Cuda, RopeBothModesWithFactors) {
    const int n_tok = 11, n_head = 3, hd = 64;
    std::uniform_int_distribution<int> pd(0, 100000);
    std::vector<int32_t> pos(n_tok);
    for (auto &p : pos) p = pd(rng());
    pos[0] = 0;
    std::vector<float> ff(24);
    for (auto &f : ff) f = 1.0f + std::uniform_real_distribution<float>(0, 7)(rng());
    Dev dff(ff);
    for (int mode = 0; mode < 2; mode++)
        for (int with_ff = 0; with_ff < 2; with_ff++) {
            cp_rope_params rp = {(cp_rope_mode)mode, hd, 48, 500000.0f, 0.5f, nullptr};
            auto x = randn((size_t)n_tok * n_head * hd);
            auto ref = x;
            cp_rope_params rph = rp;
            if (with_ff) rph.freq_factors = ff.data();
            cp_rope_ref(ref.data(), pos.data(), n_tok, n_head, &rph);
            if (with_ff) rp.freq_factors = dff.f();
            Dev dx(x), dp(pos);
            ASSERT_EQ(cp_backend_rope(g_be, dx.f(), dp.i(), n_tok, n_head, &rp), CP_OK);
            EXPECT_LT(rel_err(dx.get<float>(x.size()), ref), 1e-5) << mode << with_ff;
        }
}

TEST_F(Cuda, ElementwiseAndSoftmax) {
    const size_t n = 100003;
    auto a = randn(n, 4.0f), b = randn(n);
    std::vector<float> add(n), sw(n);
    cp_add_ref(add.data(), a.data(), b.data(), n);
    cp_swiglu_ref(sw.data(), a.data(), b.data(), n);
    Dev da(a), db(b), dy(n * 4);
    dy.poison();
    ASSERT_EQ(cp_backend_add(g_be, dy.f(), da.f(), db.f(), n), CP_OK);
    EXPECT_LT(rel_err(dy.get<float>(n), add), 1e-6);
    dy.poison();
    ASSERT_EQ(cp_backend_swiglu(g_be, dy.f(), da.f(), db.f(), n), CP_OK);
    EXPECT_LT(rel_err(dy.get<float>(n), sw), 1e-5);

    for (int dim : {1, 33, 49152}) {
        const int rows = 3;
        auto x = randn((size_t)rows * dim, 5.0f);
        if (dim == 33) x[40] = -INFINITY;
        auto ref = x;
        cp_softmax_ref(ref.data(), rows, dim);
        Dev dx(x);
        ASSERT_EQ(cp_backend_softmax(g_be, dx.f(), rows, dim), CP_OK);
        // fp32 sums over up to 49152 terms in another order
        EXPECT_LT(rel_err(dx.get<float>(x.size()), ref), 1e-4) << dim;
    }
}

// int8 and fp8 rows whose width is not a multiple of 32: refused with a
// message that names the type and the width, never read out of bounds.
TEST_F(Cuda, RowTypesOfOddWidthAreAClearError) {
    for (cp_dtype t : {CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW})
        for (int n : {1, 3, 20}) {
            SCOPED_TRACE(::testing::Message() << cp_dtype_name(t) << " n=" << n);
            const int64_t rows = 5, cols = 48;
            auto wh = make_weight(t, rows, cols);
            Dev dw(wh), dx(randn((size_t)n * cols)), dy((size_t)n * rows * 4);
            cp_tensor wd = cp_tensor_2d(t, rows, cols, dw.p);
            wd.device = CP_DEVICE_CUDA;
            EXPECT_EQ(cp_backend_matmul(g_be, &wd, dx.f(), n, dy.f(), nullptr), CP_ERR_UNSUPPORTED);
            const std::string want = std::string(cp_dtype_name(t)) + " rows of a multiple of 32 values, not 48";
            EXPECT_NE(std::string(cp_last_error_detail()).find(want), std::string::npos)
                << cp_last_error_detail();
            EXPECT_EQ(cp_backend_synchronize(g_be), CP_OK) << cp_last_error();
        }
}

#ifdef CP_HAVE_CUDA
// The device quantizes activations per token exactly as the CPU reference
// (cp_quantize_ref F8_ROW): the same codes and scale, bit for bit, for
// values at every magnitude, rows of zeros, and rows holding inf or NaN.
TEST_F(Cuda, Fp8ActivationsEqualTheReferenceBitForBit) {
    const int64_t k = 4099; // odd: the threads' last pass is partial
    const int n = 7;
    std::vector<float> x = randn((size_t)n * k);
    std::uniform_real_distribution<float> e(-30.0f, 30.0f);
    for (int64_t i = 0; i < k; i++) x[(size_t)k + i] *= std::exp2(e(rng())); // every magnitude
    for (int64_t i = 0; i < k; i++) x[2 * (size_t)k + i] = 0.0f;
    x[3 * (size_t)k + 17] = INFINITY;
    x[4 * (size_t)k + 5] = NAN;
    for (int64_t i = 0; i < k; i++) x[5 * (size_t)k + i] = std::ldexp((float)(i % 64) - 32.0f, -140); // subnormal
    const size_t rb = cp_dtype_row_size(CP_DTYPE_F8_ROW, k);
    std::vector<uint8_t> ref((size_t)n * rb);
    ASSERT_EQ(cp_quantize_ref(CP_DTYPE_F8_ROW, x.data(), n, k, ref.data()), CP_OK);
    Dev dx(x), dq((size_t)n * k), ds((size_t)n * 4), dd((size_t)n * k * 4);
    ASSERT_EQ(cp_f8_quantize_act_cuda(dx.f(), n, k, CP_F8_ACT_CODES, dq.p, ds.f(), nullptr), CP_OK);
    ASSERT_EQ(cp_f8_quantize_act_cuda(dx.f(), n, k, CP_F8_ACT_DEQUANT, dd.p, nullptr, nullptr), CP_OK);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); // the legacy stream above, then the backend's
    auto q = dq.get<uint8_t>((size_t)n * k);
    auto sc = ds.get<float>((size_t)n);
    auto dqv = dd.get<float>((size_t)n * k);
    cp_tensor wc = cp_tensor_2d(CP_DTYPE_F8_ROW, n, k, ref.data());
    std::vector<float> deq((size_t)n * k);
    ASSERT_EQ(cp_dequantize_ref(&wc, 0, n, deq.data()), CP_OK);
    for (int r = 0; r < n; r++) {
        SCOPED_TRACE(r);
        EXPECT_EQ(std::memcmp(q.data() + (size_t)r * k, ref.data() + (size_t)r * rb, (size_t)k), 0);
        EXPECT_EQ(std::memcmp(&sc[(size_t)r], ref.data() + (size_t)r * rb + k, 4), 0) << sc[(size_t)r];
        int differ = 0; // the dequantized values: equal bits, or NaN on both sides (the
                        // device's NaN results carry no payload)
        for (int64_t i = 0; i < k; i++) {
            const float a = dqv[(size_t)r * k + i], b = deq[(size_t)r * k + i];
            differ += std::isnan(a) ? !std::isnan(b) : std::memcmp(&a, &b, 4) != 0;
        }
        EXPECT_EQ(differ, 0);
    }
}
#endif

#ifdef CP_HAVE_CUDA
// Sets an environment variable for a scope, restoring the caller's value.
struct ScopedEnv {
    std::string name, saved;
    bool had;
    ScopedEnv(const char *n, const char *v) : name(n) {
        const char *old = getenv(n);
        had = old != nullptr;
        if (had) saved = old;
        setenv(n, v, 1);
    }
    ~ScopedEnv() {
        if (had) setenv(name.c_str(), saved.c_str(), 1);
        else unsetenv(name.c_str());
    }
};
struct BackendFree {
    void operator()(cp_backend *b) const { cp_backend_free(b); }
};

// Each form of the W8A8 GEMM (FP8 tensor cores with the scales in cuBLASLt
// or in a kernel after, fp16 tensor cores on the codes) against the CPU
// reference, on backends started with CP_CUDA_FP8 set to that form (the
// default tries them in that order; a form without a cuBLASLt algorithm
// moves on, which the line printed shows; a GPU without FP8 runs f16).
TEST_F(Cuda, Fp8GemmFormsEqualTheReference) {
    for (const char *form : {"vec", "scalar", "f16"}) {
        ScopedEnv env("CP_CUDA_FP8", form);
        cp_backend_t raw = nullptr;
        ASSERT_EQ(cp_backend_cuda_init(0, &raw), CP_OK) << cp_last_error();
        std::unique_ptr<cp_backend, BackendFree> be(raw);
        for (const MatmulCase &mc : {MatmulCase{CP_DTYPE_F8_ROW, 1000, 512}, MatmulCase{CP_DTYPE_F8_ROW, 77, 4096},
                                     MatmulCase{CP_DTYPE_F8_ROW, 2048, 96}})
            for (int n : {9, 64, 130}) {
                SCOPED_TRACE(::testing::Message() << form << " m=" << mc.m << " k=" << mc.k << " n=" << n);
                auto wh = make_weight(mc.t, mc.m, mc.k);
                auto x = randn((size_t)n * mc.k, 3.0f);
                auto b = randn((size_t)mc.m);
                cp_tensor wc = cp_tensor_2d(mc.t, mc.m, mc.k, wh.data());
                std::vector<float> ref((size_t)n * mc.m), y(ref.size(), NAN);
                ASSERT_EQ(cp_matmul_ref(&wc, x.data(), n, ref.data(), n % 2 ? b.data() : nullptr), CP_OK);
                void *p[4] = {nullptr, nullptr, nullptr, nullptr};
                const size_t bytes[4] = {wh.size(), x.size() * 4, b.size() * 4, y.size() * 4};
                const void *src[4] = {wh.data(), x.data(), b.data(), y.data()};
                for (int i = 0; i < 4; i++) {
                    ASSERT_EQ(cp_backend_alloc(be.get(), bytes[i], &p[i]), CP_OK);
                    ASSERT_EQ(cp_backend_copy(be.get(), p[i], src[i], bytes[i], CP_COPY_HOST_TO_DEVICE), CP_OK);
                }
                cp_tensor wd = cp_tensor_2d(mc.t, mc.m, mc.k, p[0]);
                wd.device = CP_DEVICE_CUDA;
                EXPECT_EQ(cp_backend_matmul(be.get(), &wd, (float *)p[1], n, (float *)p[3],
                                            n % 2 ? (float *)p[2] : nullptr),
                          CP_OK)
                    << cp_last_error();
                EXPECT_EQ(cp_backend_copy(be.get(), y.data(), p[3], bytes[3], CP_COPY_DEVICE_TO_HOST), CP_OK);
                EXPECT_LT(rel_err(y, ref), product_tol(mc.t, mc.k, n));
                for (void *q : p) cp_backend_dealloc(be.get(), q);
            }
        printf("[ fp8 ] CP_CUDA_FP8=%s: the form in use after these products: %s\n", form,
               cp_cuda_fp8_form(be.get()));
    }
}
#endif

TEST_F(Cuda, EmbedAndDequantize) {
    const cp_dtype types[] = {CP_DTYPE_F32,  CP_DTYPE_F16,  CP_DTYPE_BF16, CP_DTYPE_Q4_0,
                              CP_DTYPE_Q4_1, CP_DTYPE_Q5_0, CP_DTYPE_Q5_1, CP_DTYPE_Q8_0,
                              CP_DTYPE_Q4_K, CP_DTYPE_Q5_K, CP_DTYPE_Q6_K, CP_DTYPE_I4_G32,
                              CP_DTYPE_I4_G128, CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_S24_Q8};
    for (cp_dtype t : types) {
        SCOPED_TRACE(cp_dtype_name(t));
        const int64_t bs = cp_dtype_block_size(t);
        const int64_t rows = 53, cols = bs == 256 ? 512 : (bs == 128 ? 384 : 96);
        auto wh = make_weight(t, rows, cols);
        cp_tensor wc = cp_tensor_2d(t, rows, cols, wh.data());
        Dev dw(wh);
        cp_tensor wd = cp_tensor_2d(t, rows, cols, dw.p);
        wd.device = CP_DEVICE_CUDA;
        std::vector<int32_t> ids = {52, 0, 7, 7, 31};
        std::vector<float> ref(ids.size() * cols);
        ASSERT_EQ(cp_embed_ref(&wc, ids.data(), (int)ids.size(), ref.data()), CP_OK);
        Dev di(ids), dout(rows * cols * 4);
        dout.poison();
        ASSERT_EQ(cp_backend_embed(g_be, &wd, di.i(), (int)ids.size(), dout.f()), CP_OK);
        EXPECT_EQ(rel_err(dout.get<float>(ref.size()), ref), 0.0);

        std::vector<float> dq((size_t)(rows - 3) * cols);
        ASSERT_EQ(cp_dequantize_ref(&wc, 2, rows - 3, dq.data()), CP_OK);
        dout.poison();
        ASSERT_EQ(cp_backend_dequantize(g_be, &wd, 2, rows - 3, dout.f()), CP_OK);
        EXPECT_EQ(rel_err(dout.get<float>(dq.size()), dq), 0.0);

        std::vector<int32_t> bad = {3, 53};
        Dev dbad(bad);
        // reported at the next synchronisation (the stream never stalls)
        cp_status st = cp_backend_embed(g_be, &wd, dbad.i(), 2, dout.f());
        if (st == CP_OK) st = cp_backend_synchronize(g_be);
        EXPECT_EQ(st, CP_ERR_INVALID_ARG);
        EXPECT_NE(std::string(cp_last_error()).find("outside"), std::string::npos);
    }
}

// A paged cache with shuffled blocks, a batch mixing several sequences.
struct AttnCase {
    int n_head, n_head_kv, hd, block_size;
    cp_dtype kv;
    std::vector<int> seq_len;  // tokens already in the cache per sequence
    std::vector<int> new_tok;  // tokens of this batch per sequence
};

void check_attention(const AttnCase &c) {
    SCOPED_TRACE(::testing::Message() << "heads " << c.n_head << "/" << c.n_head_kv << " hd "
                                      << c.hd << " bs " << c.block_size << " kv "
                                      << cp_dtype_name(c.kv));
    const int n_seq = (int)c.seq_len.size();
    int max_ctx = 0, n_tok = 0;
    for (int s = 0; s < n_seq; s++) {
        max_ctx = std::max(max_ctx, c.seq_len[s] + c.new_tok[s]);
        n_tok += c.new_tok[s];
    }
    const int max_blocks = (max_ctx + c.block_size - 1) / c.block_size;
    const int n_blocks = max_blocks * n_seq + 3;
    std::vector<int32_t> perm(n_blocks);
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng());
    std::vector<int32_t> tables((size_t)n_seq * max_blocks, -1);
    int next = 0;
    for (int s = 0; s < n_seq; s++)
        for (int b = 0; b < (c.seq_len[s] + c.new_tok[s] + c.block_size - 1) / c.block_size; b++)
            tables[(size_t)s * max_blocks + b] = perm[next++];
    const int kv_dim = c.n_head_kv * c.hd;
    const bool quant = c.kv == CP_DTYPE_I8_ROW || c.kv == CP_DTYPE_F8_ROW;
    const size_t row_bytes = quant ? cp_dtype_row_size(c.kv, c.hd) : (size_t)c.hd * (c.kv == CP_DTYPE_F16 ? 2 : 4);
    const size_t cache_bytes = (size_t)n_blocks * c.block_size * c.n_head_kv * row_bytes;
    // history: every position of every sequence stored once (position order)
    std::vector<int32_t> hseq, hpos, seq, pos;
    for (int s = 0; s < n_seq; s++)
        for (int p = 0; p < c.seq_len[s]; p++) {
            hseq.push_back(s);
            hpos.push_back(p);
        }
    // the batch: sequences interleaved (decode rows between prompt chunks)
    for (int s = 0; s < n_seq; s++)
        for (int p = 0; p < c.new_tok[s]; p++) {
            seq.push_back(s);
            pos.push_back(c.seq_len[s] + p);
        }
    std::vector<uint8_t> kc_h(cache_bytes, 0), vc_h(cache_bytes, 0);
    Dev dkc(kc_h), dvc(vc_h), dtab(tables);
    auto store = [&](const std::vector<int32_t> &sq, const std::vector<int32_t> &ps,
                     std::vector<float> *kh, std::vector<float> *vh) {
        const int nt = (int)sq.size();
        if (nt == 0) return;
        *kh = randn((size_t)nt * kv_dim);
        *vh = randn((size_t)nt * kv_dim);
        Dev ds(sq), dp(ps), dk(*kh), dv(*vh);
        cp_attn_params p = {nt, c.n_head, c.n_head_kv, c.hd, c.block_size, max_blocks,
                            1.0f / std::sqrt((float)c.hd), c.kv, ds.i(), dp.i(), dtab.i(), 0};
        ASSERT_EQ(cp_backend_kv_store(g_be, &p, dk.f(), dv.f(), dkc.p, dvc.p), CP_OK) << cp_last_error();
        cp_attn_params ph = p;
        ph.seq_of_tok = sq.data();
        ph.pos_of_tok = ps.data();
        ph.block_tables = tables.data();
        ASSERT_EQ(cp_kv_store_ref(&ph, kh->data(), vh->data(), kc_h.data(), vc_h.data()), CP_OK);
    };
    std::vector<float> k1, v1, k2, v2;
    store(hseq, hpos, &k1, &v1);
    store(seq, pos, &k2, &v2);
    // the device cache equals the reference cache bit for bit (quantized
    // rows too: the same arithmetic)
    EXPECT_TRUE(dkc.get<uint8_t>(kc_h.size()) == kc_h);
    EXPECT_TRUE(dvc.get<uint8_t>(vc_h.size()) == vc_h);

    auto q = randn((size_t)n_tok * c.n_head * c.hd);
    Dev dq(q), ds(seq), dp(pos), dout(q.size() * 4);
    for (int hint = 0; hint < 2; hint++) {
        cp_attn_params p = {n_tok, c.n_head, c.n_head_kv, c.hd, c.block_size, max_blocks,
                            1.0f / std::sqrt((float)c.hd), c.kv, ds.i(), dp.i(), dtab.i(),
                            hint ? max_ctx : 0};
        dout.poison();
        ASSERT_EQ(cp_backend_attention(g_be, &p, dq.f(), dkc.p, dvc.p, dout.f()), CP_OK)
            << cp_last_error();
        cp_attn_params ph = p;
        ph.seq_of_tok = seq.data();
        ph.pos_of_tok = pos.data();
        ph.block_tables = tables.data();
        std::vector<float> ref(q.size());
        ASSERT_EQ(cp_attention_ref(&ph, q.data(), kc_h.data(), vc_h.data(), ref.data()), CP_OK);
        // q is rounded to fp16 by the fused kernel (n_tok >= 16, fp16 cache);
        // quantized rows are read as the reference reads them, in fp32
        const double tol = c.kv == CP_DTYPE_F16 ? 2e-3 : 1e-5;
        EXPECT_LT(rel_err(dout.get<float>(q.size()), ref), tol) << "hint " << hint;
    }
}

TEST_F(Cuda, AttentionDecodeLongContextSplits) {
    check_attention({32, 8, 128, 16, CP_DTYPE_F16, {3000}, {1}});
    check_attention({9, 3, 64, 16, CP_DTYPE_F32, {1500, 7, 40}, {1, 1, 1}});
    check_attention({4, 4, 80, 7, CP_DTYPE_F16, {700, 0}, {1, 2}});
}

// Caches of int8 and fp8 rows (--kv-type int8|fp8): stored as the CPU
// stores them and attended in fp32, in decode splits, prompts and mixes.
TEST_F(Cuda, AttentionOnQuantizedCaches) {
    for (cp_dtype kv : {CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW}) {
        check_attention({32, 8, 128, 16, kv, {3000}, {1}});
        check_attention({9, 3, 64, 16, kv, {1500, 7, 40}, {1, 1, 1}});
        check_attention({8, 2, 128, 7, kv, {45, 300, 0}, {30, 1, 70}});
        check_attention({4, 2, 96, 16, kv, {5}, {40}});
    }
}

TEST_F(Cuda, AttentionPrefillAndMixedBatches) {
    check_attention({9, 3, 64, 16, CP_DTYPE_F16, {0}, {77}});
    check_attention({32, 8, 128, 16, CP_DTYPE_F16, {0}, {200}});
    check_attention({8, 2, 128, 7, CP_DTYPE_F16, {45, 300, 0}, {30, 1, 70}});
    check_attention({6, 3, 64, 16, CP_DTYPE_F32, {10, 0}, {20, 33}});
    check_attention({4, 2, 96, 16, CP_DTYPE_F16, {5}, {40}});
}

TEST_F(Cuda, SampleGreedyAndStochastic) {
    const int n = 4, vocab = 50001;
    auto l = randn((size_t)n * vocab, 3.0f);
    l[(size_t)1 * vocab + 17] = 100.0f;
    l[(size_t)1 * vocab + 9] = 100.0f;  // tie: the lower index wins
    Dev dl(l);
    std::vector<float> u = {0.1f, 0.5f, 0.9f, 0.999f};
    cp_sample_params greedy = {0.0f, 0, 1.0f, 0.0f};
    std::vector<int32_t> got(n), ref(n);
    ASSERT_EQ(cp_backend_sample(g_be, dl.f(), n, vocab, &greedy, u.data(), got.data()), CP_OK);
    cp_sample_ref(l.data(), n, vocab, &greedy, u.data(), ref.data());
    EXPECT_EQ(got, ref);
    EXPECT_EQ(got[1], 9);
    cp_sample_params sp = {0.8f, 40, 0.9f, 0.05f};
    ASSERT_EQ(cp_backend_sample(g_be, dl.f(), n, vocab, &sp, u.data(), got.data()), CP_OK);
    cp_sample_ref(l.data(), n, vocab, &sp, u.data(), ref.data());
    EXPECT_EQ(got, ref);
}

// ---- sampling: the device's choices against cp_sample_host -------------------

// The reference's sorted list of one row at one temperature: z descending,
// ties to the lower id, prob = expf(z - z0) and the running sums in double in
// that order, exactly as cp_sample_ref computes them.
struct SortedRow {
    std::vector<float> z, prob;
    std::vector<int32_t> id;
    std::vector<double> cum;  // cum[j] = prob[0] + ... + prob[j-1], added in that order
    std::vector<int> pos;     // pos[id]: place in the order
    bool finite = false;
};

SortedRow sort_row(const float *l, int V, float T) {
    SortedRow s;
    std::vector<float> z(V);
    for (int j = 0; j < V; j++) z[j] = l[j] / T;
    s.id.resize(V);
    for (int j = 0; j < V; j++) s.id[j] = j;
    std::sort(s.id.begin(), s.id.end(),
              [&](int a, int b) { return z[a] != z[b] ? z[a] > z[b] : a < b; });
    s.z.resize(V);
    s.prob.resize(V);
    s.cum.resize((size_t)V + 1);
    s.pos.resize(V);
    for (int j = 0; j < V; j++) {
        s.z[j] = z[s.id[j]];
        s.pos[s.id[j]] = j;
    }
    s.finite = s.z[0] > -INFINITY && s.z[0] != INFINITY;
    s.cum[0] = 0.0;
    for (int j = 0; j < V; j++) {
        s.prob[j] = s.finite ? expf(s.z[j] - s.z[0]) : 0.0f;
        s.cum[j + 1] = s.cum[j] + s.prob[j];
    }
    return s;
}

// Tokens the filters keep, with the top-p threshold scaled by ps and the
// min-p threshold by ms (1, 1: exactly cp_sample_ref's rules).
int kept_of(const SortedRow &s, const cp_sample_params &sp, double ps, double ms) {
    const int V = (int)s.z.size();
    int kept = V;
    if (sp.top_k > 0 && sp.top_k < kept) kept = sp.top_k;
    if (sp.top_p < 1.0f) {
        const double need = (double)sp.top_p * s.cum[kept] * ps;
        auto end = s.cum.begin() + kept + 1;
        auto it = std::lower_bound(s.cum.begin() + 1, end, need);
        if (it != end) kept = (int)(it - s.cum.begin());
    }
    if (sp.min_p > 0.0f) {
        int j = 1;
        if (ms == 1.0)
            while (j < kept && s.prob[j] >= sp.min_p * s.prob[0]) j++;
        else
            while (j < kept && (double)s.prob[j] >= (double)sp.min_p * ms) j++;
        kept = j;
    }
    return kept;
}

// The first kept token whose running mass exceeds u times the kept mass.
int pick_of(const SortedRow &s, int kept, float u) {
    const double target = (double)u * s.cum[kept];
    auto it = std::upper_bound(s.cum.begin() + 1, s.cum.begin() + kept + 1, target);
    const int j = (int)(it - s.cum.begin()) - 1;
    return j < kept ? j : kept - 1;
}

int32_t ref_choice(const SortedRow &s, const cp_sample_params &sp, float u) {
    if (!s.finite) return s.id[0];
    return s.id[pick_of(s, kept_of(s, sp, 1.0, 1.0), u)];
}

// True when got is a choice the reference makes with its top-p and min-p
// thresholds and u moved by at most eps (relative): the documented tolerance
// of rows drawn from the device's whole-row masses.
bool near_choice(const SortedRow &s, const cp_sample_params &sp, float u, int32_t got,
                 double eps) {
    if (!s.finite || got < 0 || got >= (int)s.z.size()) return false;
    const int j = s.pos[got];
    const int lo = kept_of(s, sp, 1.0 - eps, 1.0 + eps), hi = kept_of(s, sp, 1.0 + eps, 1.0 - eps);
    if (j >= hi) return false;
    const double c_lo = s.cum[std::max(lo, j + 1)], c_hi = s.cum[hi];
    return s.cum[j] / c_hi - eps <= (double)u && (double)u <= s.cum[j + 1] / c_lo + eps;
}

// Rows of eight kinds: normal, many exact ties, -inf entries, one huge
// logit, a flat row, a few high logits over a low bulk (language-model
// like), a nearly flat row (nucleus far wider than 256), and +inf twice or
// all -inf.
std::vector<float> sample_logits(int n, int V, int salt, std::mt19937 &g) {
    std::vector<float> l((size_t)n * V);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int> at(0, V - 1);
    for (int r = 0; r < n; r++) {
        float *x = l.data() + (size_t)r * V;
        for (int j = 0; j < V; j++) x[j] = 3.0f * nd(g);
        switch ((r + salt) % 8) {
        case 1:
            for (int j = 0; j < V; j++) x[j] = std::round(x[j]) * 0.5f;
            break;
        case 2:
            for (int j = 0; j < V; j++)
                if (at(g) % 10 == 0) x[j] = -INFINITY;
            x[at(g)] = 1.0f;
            break;
        case 3: x[at(g)] = 80.0f; break;
        case 4: std::fill(x, x + V, 1.5f); break;
        case 5:
            for (int j = 0; j < V; j++) x[j] *= 0.7f;
            for (int t = 0; t < 20; t++) x[at(g)] = 12.0f + 3.0f * nd(g);
            break;
        case 6:
            for (int j = 0; j < V; j++) x[j] *= 0.02f;
            break;
        case 7:
            if ((r / 8 + salt) % 2 == 0) {
                x[at(g)] = INFINITY;
                x[at(g)] = INFINITY;
            } else {
                std::fill(x, x + V, -INFINITY);
            }
            break;
        default: break;
        }
    }
    return l;
}

#ifdef CP_HAVE_CUDA
struct SamplerFree {
    void operator()(cp_sampler_cuda *s) const { cp_sampler_cuda_free(s); }
};
using SamplerPtr = std::unique_ptr<cp_sampler_cuda, SamplerFree>;
#endif

// Every row of every call, through the backend and (CUDA builds) through
// cp_sample_cuda directly, against the reference: exactly where the top-k
// set fits the device's 256 candidates, else exactly or within 1e-6.
void check_sampling(int V) {
    SCOPED_TRACE(::testing::Message() << "vocab=" << V);
    std::mt19937 g(1000u + (unsigned)V);
#ifdef CP_HAVE_CUDA
    cp_sampler_cuda *raw = nullptr;
    ASSERT_EQ(cp_sampler_cuda_init(&raw), CP_OK);
    SamplerPtr sampler(raw);
#endif
    const float temps[] = {0.3f, 1.0f, 1.7f};
    const int top_ks[] = {0, 1, 5, 40, 256, 300};
    const float top_ps[] = {1.0f, 0.9f, 0.5f, 0.01f};
    const float min_ps[] = {0.0f, 0.05f};
    long decisions = 0, tolerated = 0;
    for (int n : {1, 3, 64}) {
        auto l = sample_logits(n, V, V + n, g);
        Dev dl(l);
        const int n_host = std::min(n, 3);  // rows also run through cp_sample_host itself
        for (float T : temps) {
            std::vector<SortedRow> rows;
            for (int r = 0; r < n; r++) rows.push_back(sort_row(l.data() + (size_t)r * V, V, T));
            for (int tk : top_ks)
                for (float tp : top_ps)
                    for (float mp : min_ps) {
                        const cp_sample_params sp = {T, tk, tp, mp};
                        const int kept0 = tk > 0 && tk < V ? tk : V;
                        SCOPED_TRACE(::testing::Message() << "n=" << n << " T=" << T << " top_k="
                                                          << tk << " top_p=" << tp
                                                          << " min_p=" << mp);
                        for (int us = 0; us < 2; us++) {
                            std::vector<float> u(n);
                            std::uniform_real_distribution<float> ud(0.0f, 1.0f);
                            const float special[] = {0.0f, 0.5f, 0.99999994f};
                            for (int r = 0; r < n; r++) u[r] = us == 0 ? special[r % 3] : ud(g);
                            std::vector<int32_t> ref(n), host(n_host);
                            for (int r = 0; r < n; r++) ref[r] = ref_choice(rows[r], sp, u[r]);
                            if (us == 0) {  // the checker's reference is cp_sample_host's
                                ASSERT_EQ(cp_sample_host(l.data(), n_host, V, &sp, u.data(),
                                                         host.data()),
                                          CP_OK);
                                for (int r = 0; r < n_host; r++) ASSERT_EQ(ref[r], host[r]) << r;
                            }
                            for (int path = 0; path < 2; path++) {
                                std::vector<int32_t> got(n, -7);  // poisoned
                                if (path == 0) {
                                    ASSERT_EQ(cp_backend_sample(g_be, dl.f(), n, V, &sp, u.data(),
                                                                got.data()),
                                              CP_OK)
                                        << cp_last_error();
                                } else {
#ifdef CP_HAVE_CUDA
                                    ASSERT_EQ(cp_backend_synchronize(g_be), CP_OK);
                                    ASSERT_EQ(cp_sample_cuda(sampler.get(), dl.f(), n, V, &sp,
                                                             u.data(), got.data(), nullptr),
                                              CP_OK)
                                        << cp_last_error();
#else
                                    continue;
#endif
                                }
                                for (int r = 0; r < n; r++) {
                                    decisions++;
                                    if (got[r] == ref[r]) continue;
                                    const bool approx = kept0 > CP_SAMPLE_MAX_EXACT_K;
                                    if (approx && near_choice(rows[r], sp, u[r], got[r], 1e-6)) {
                                        tolerated++;
                                        continue;
                                    }
                                    ADD_FAILURE()
                                        << "path " << path << " row " << r << " u=" << u[r]
                                        << ": got " << got[r] << " (rank "
                                        << (got[r] >= 0 && got[r] < V ? rows[r].pos[got[r]] : -1)
                                        << "), reference " << ref[r] << " (rank "
                                        << rows[r].pos[ref[r]] << ")";
                                    return;
                                }
                            }
                        }
                    }
        }
    }
    std::cout << "vocab " << V << ": " << decisions << " choices, " << tolerated
              << " within the boundary tolerance\n";
    EXPECT_LE(tolerated, decisions / 1000 + 2);
}

TEST_F(Cuda, SampleMatchesReferenceSmallVocabularies) {
    for (int V : {1, 7, 1000}) check_sampling(V);
}

TEST_F(Cuda, SampleMatchesReferenceVocab49152) { check_sampling(49152); }

TEST_F(Cuda, SampleMatchesReferenceVocab128256) { check_sampling(128256); }

// Out-of-range parameters and u behave as the reference does.
TEST_F(Cuda, SampleBadParamsLikeReference) {
    const int n = 6;
    std::mt19937 g(7);
#ifdef CP_HAVE_CUDA
    cp_sampler_cuda *raw = nullptr;
    ASSERT_EQ(cp_sampler_cuda_init(&raw), CP_OK);
    SamplerPtr sampler(raw);
#endif
    for (int V : {5, 1000, 20000}) {
        auto l = sample_logits(n, V, 0, g);
        Dev dl(l);
        const std::vector<float> u = {0.3f, 0.7f, 1.0f, -0.5f, 0.0f, 0.99f};
        const cp_sample_params cases[] = {
            {NAN, 40, 0.9f, 0.0f},   {-1.0f, 0, 1.0f, 0.0f},      {1.0f, -3, 0.9f, 0.0f},
            {1.0f, V + 5, 0.5f, 0.0f}, {1.0f, 0, NAN, 0.0f},      {1.0f, 0, 0.0f, 0.0f},
            {1.0f, 0, -1.0f, 0.0f},  {1.0f, 0, 1.0f, NAN},        {1.0f, 0, 1.0f, 1.5f},
            {1.0f, 300, 1.0f, 0.0f}, {1e30f, 0, 0.9f, 0.0f},   {1e-30f, 0, 0.9f, 0.0f},
        };
        for (const cp_sample_params &sp : cases) {
            SCOPED_TRACE(::testing::Message() << "V=" << V << " T=" << sp.temperature << " top_k="
                                              << sp.top_k << " top_p=" << sp.top_p
                                              << " min_p=" << sp.min_p);
            std::vector<int32_t> got(n, -7), ref(n);
            // A NaN temperature is greedy (temperature > 0 is false), as a
            // temperature <= 0 is.
            const bool nan_t = std::isnan(sp.temperature);
            cp_sample_params rsp = sp;
            if (nan_t) rsp.temperature = 0.0f;
            ASSERT_EQ(cp_sample_host(l.data(), n, V, &rsp, u.data(), ref.data()), CP_OK);
            auto check = [&](const char *path) {
                for (int r = 0; r < n; r++) {
                    if (got[r] == ref[r]) continue;
                    const SortedRow s = sort_row(l.data() + (size_t)r * V, V, rsp.temperature);
                    const int kept0 = sp.top_k > 0 && sp.top_k < V ? sp.top_k : V;
                    EXPECT_TRUE(!nan_t && kept0 > CP_SAMPLE_MAX_EXACT_K && u[r] >= 0.0f &&
                                u[r] < 1.0f && near_choice(s, sp, u[r], got[r], 1e-6))
                        << path << " row " << r << " u=" << u[r] << ": got " << got[r]
                        << ", reference " << ref[r];
                }
            };
#ifdef CP_HAVE_CUDA
            ASSERT_EQ(cp_backend_synchronize(g_be), CP_OK);
            ASSERT_EQ(cp_sample_cuda(sampler.get(), dl.f(), n, V, &sp, u.data(), got.data(),
                                     nullptr),
                      CP_OK)
                << cp_last_error();
            check("cp_sample_cuda");
            std::fill(got.begin(), got.end(), -7);
#endif
            // The backend's former host path read a NaN temperature as sampled.
            if (nan_t) continue;
            ASSERT_EQ(cp_backend_sample(g_be, dl.f(), n, V, &sp, u.data(), got.data()), CP_OK)
                << cp_last_error();
            check("backend");
        }
    }
}

TEST_F(Cuda, QuantizeRoundTrip) {
    const int64_t rows = 5, cols = 256;
    auto x = randn((size_t)(rows * cols));
    for (cp_dtype t : {CP_DTYPE_Q8_0, CP_DTYPE_Q4_K, CP_DTYPE_F16}) {
        std::vector<uint8_t> ref(rows * cp_dtype_row_size(t, cols));
        ASSERT_EQ(cp_quantize_ref(t, x.data(), rows, cols, ref.data()), CP_OK);
        Dev dx(x), dout(ref.size());
        ASSERT_EQ(cp_backend_quantize(g_be, t, dx.f(), rows, cols, dout.p), CP_OK);
        EXPECT_TRUE(dout.get<uint8_t>(ref.size()) == ref) << cp_dtype_name(t);
    }
}

TEST_F(Cuda, BadDeviceIndexIsAClearError) {
    cp_backend_t be = nullptr;
    EXPECT_EQ(cp_backend_cuda_init(4096, &be), CP_ERR_INVALID_ARG);
    EXPECT_EQ(be, nullptr);
    EXPECT_NE(std::string(cp_last_error()).find("does not exist"), std::string::npos);
}

}  // namespace
