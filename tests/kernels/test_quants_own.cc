/* test_quants_own.cc - cparallel's own weight types (I8_ROW, F8_ROW,
 * I4_G32, I4_G128): geometry, FP8 E4M3 conversions against an exhaustive
 * table of the format's values, quantize/dequantize error bounds, dot
 * products against fp64 of the decoded rows, SIMD against reference, and the
 * CPU backend's matmul against dequantize-then-fp64. */
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "cp_backend.h"
#include "cp_dtype.h"
#include "cpu/cpu_quants.h"
#include "cpu/cpu_ref.h"
#include "cpu/quants_simd.h"

namespace {

const cp_dtype kOwn[] = {CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_I4_G32, CP_DTYPE_I4_G128};

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, sigma);
    std::vector<float> v((size_t)n);
    for (auto &x : v) x = nd(rng);
    return v;
}

std::vector<uint8_t> quantize(cp_dtype t, const float *x, int64_t n) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    std::vector<uint8_t> q(cp_dtype_row_size(t, n), 0xcd);
    tr->from_float(x, q.data(), n);
    return q;
}

std::vector<double> decode(cp_dtype t, const void *data, int64_t n) {
    std::vector<float> f((size_t)n);
    cp_cpu_get_type_traits(t)->to_float(data, f.data(), n);
    return std::vector<double>(f.begin(), f.end());
}

/* ---- geometry ----------------------------------------------------------- */

TEST(OwnTypes, Geometry) {
    EXPECT_STREQ(cp_dtype_name(CP_DTYPE_I8_ROW), "I8_ROW");
    EXPECT_STREQ(cp_dtype_name(CP_DTYPE_F8_ROW), "F8_ROW");
    EXPECT_STREQ(cp_dtype_name(CP_DTYPE_I4_G32), "I4_G32");
    EXPECT_STREQ(cp_dtype_name(CP_DTYPE_I4_G128), "I4_G128");
    /* rows: codes then a 16-byte scale trailer; groups: 4-byte header + codes */
    EXPECT_EQ(cp_dtype_row_size(CP_DTYPE_I8_ROW, 576), 576u + 16u);
    EXPECT_EQ(cp_dtype_row_size(CP_DTYPE_F8_ROW, 37), 37u + 16u);
    EXPECT_EQ(cp_dtype_row_size(CP_DTYPE_I4_G32, 576), 18u * 20u);
    EXPECT_EQ(cp_dtype_row_size(CP_DTYPE_I4_G128, 1536), 12u * 68u);
    EXPECT_EQ(cp_dtype_row_size(CP_DTYPE_I4_G128, 576), 0u) << "576 is not whole groups of 128";
    EXPECT_EQ(cp_dtype_row_extra(CP_DTYPE_I8_ROW), 16u);
    EXPECT_EQ(cp_dtype_row_extra(CP_DTYPE_I4_G32), 0u);
    EXPECT_EQ(sizeof(cp_block_i4_g32), 20u);
    EXPECT_EQ(sizeof(cp_block_i4_g128), 68u);
    for (cp_dtype t : kOwn) {
        EXPECT_TRUE(cp_dtype_known((int)t));
        EXPECT_TRUE(cp_dtype_is_quantized(t));
        EXPECT_FALSE(cp_dtype_is_gguf((int)t)) << "GGUF files must not claim our types";
        ASSERT_NE(cp_cpu_get_type_traits(t), nullptr);
    }
    EXPECT_TRUE(cp_dtype_is_gguf(CP_DTYPE_Q4_K));
    EXPECT_FALSE(cp_dtype_is_gguf(4));
}

/* ---- FP8 E4M3 ----------------------------------------------------------- */

/* The value of a code from the format's definition, in double. */
double e4m3_value(int c) {
    const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    const double v = e == 0 ? std::ldexp((double)m, -9) : std::ldexp(8.0 + m, e - 10);
    return s ? -v : v;
}

/* Round to nearest by search over the 127 non-negative finite codes, ties
 * to the even code, saturating at 448. */
uint8_t e4m3_ref(double f) {
    if (std::isnan(f)) return 0x7f; // whatever the sign
    const uint8_t sign = std::signbit(f) ? 0x80 : 0;
    const double a = std::fabs(f);
    if (a >= 448.0) return sign | 0x7e;
    int best = 0;
    for (int c = 1; c <= 0x7e; c++) {
        const double dc = std::fabs(e4m3_value(c) - a), db = std::fabs(e4m3_value(best) - a);
        if (dc < db || (dc == db && c % 2 == 0)) best = c;
    }
    return sign | (uint8_t)best;
}

TEST(OwnTypesE4M3, DecodeAllCodes) {
    for (int c = 0; c < 256; c++) {
        const double want = e4m3_value(c);
        const float got = cp_e4m3_to_fp32((uint8_t)c);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << c;
        } else {
            EXPECT_EQ((double)got, want) << "code " << c;
            EXPECT_EQ(std::signbit(got), c >= 128) << c;
        }
    }
    EXPECT_EQ(cp_e4m3_to_fp32(0x7e), 448.0f);
    EXPECT_EQ(cp_e4m3_to_fp32(0x01), std::ldexp(1.0f, -9));
    EXPECT_EQ(cp_e4m3_to_fp32(0x08), std::ldexp(1.0f, -6));
}

/* Every code through the dot products (the fast one decodes without the
 * table): a weight row holding all 256 codes (the NaN codes only where
 * tested), shifted so that each code passes through several lanes of the
 * vectors and the scalar tail, against an
 * activation row of one 1.0 (code 0x38) among zeros gives that code's value
 * times both scales, exactly; the NaN codes give NaN. */
TEST(OwnTypesE4M3, DotProductsDecodeEveryCode) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(CP_DTYPE_F8_ROW);
    const int64_t n = 256 + 7; // 16 vectors of 16, then a tail of 7
    std::vector<float> ramp(n);
    for (int64_t i = 0; i < n; i++) ramp[i] = 0.25f * (float)(i + 1);
    std::vector<uint8_t> x(cp_dtype_row_size(CP_DTYPE_F8_ROW, n)), y(x.size());
    tr->from_float(ramp.data(), x.data(), n); // the trailers hold the scales
    tr->from_float(ramp.data(), y.data(), n);
    const float sx = cp_row_scale(x.data(), n), sy = cp_row_scale(y.data(), n);
    int checked = 0;
    for (int shift : {0, 3, 8, 13}) {
        for (int64_t i = 0; i < n; i++) {
            // a NaN anywhere else would make the whole sum NaN (NaN x 0)
            for (int64_t j = 0; j < n; j++) {
                const uint8_t c = (uint8_t)((j + shift) % 256);
                x[j] = j == i || (c & 0x7f) != 0x7f ? c : 0;
            }
            std::fill(y.begin(), y.begin() + n, (uint8_t)0);
            y[i] = 0x38;
            const double v = e4m3_value(x[i]);
            float ref = 0, fast = 0;
            tr->vec_dot_ref(n, &ref, x.data(), y.data());
            tr->vec_dot(n, &fast, x.data(), y.data());
            if (std::isnan(v)) {
                EXPECT_TRUE(std::isnan(ref) && std::isnan(fast)) << "code " << (int)x[i] << " at " << i;
            } else {
                const float want = (float)v * sx * sy;
                EXPECT_EQ(ref, want) << "code " << (int)x[i] << " at " << i;
                EXPECT_EQ(fast, want) << "code " << (int)x[i] << " at " << i;
            }
            checked++;
        }
    }
    EXPECT_EQ(checked, 4 * n);
}

TEST(OwnTypesE4M3, EncodeExactValuesMidpointsAndNeighbours) {
    std::vector<double> pos;
    for (int c = 0; c <= 0x7e; c++) pos.push_back(e4m3_value(c));
    for (size_t i = 0; i < pos.size(); i++) {
        for (double sgn : {1.0, -1.0}) {
            const float v = (float)(sgn * pos[i]);
            EXPECT_EQ(cp_fp32_to_e4m3(v), e4m3_ref(v)) << v;
            EXPECT_EQ(cp_e4m3_to_fp32(cp_fp32_to_e4m3(v)), v) << "exact values round-trip";
            if (i + 1 < pos.size()) {
                /* the midpoint ties to the even code; one ulp either side does not */
                const float mid = (float)(sgn * (pos[i] + pos[i + 1]) / 2);
                EXPECT_EQ(cp_fp32_to_e4m3(mid), e4m3_ref(mid)) << mid;
                EXPECT_EQ(cp_fp32_to_e4m3(mid) & 1, 0) << "tie to even at " << mid;
                const float below = std::nextafter(mid, 0.0f), above = std::nextafter(mid, sgn * 1e9f);
                EXPECT_EQ(cp_fp32_to_e4m3(below), e4m3_ref(below)) << below;
                EXPECT_EQ(cp_fp32_to_e4m3(above), e4m3_ref(above)) << above;
            }
        }
    }
}

TEST(OwnTypesE4M3, EncodeRandomSaturationAndNaN) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> ex(-14.0f, 10.0f);
    for (int i = 0; i < 20000; i++) {
        const float v = std::ldexp(1.0f, 0) * std::exp2(ex(rng)) * (i % 2 ? -1.0f : 1.0f);
        ASSERT_EQ(cp_fp32_to_e4m3(v), e4m3_ref(v)) << v;
    }
    EXPECT_EQ(cp_fp32_to_e4m3(448.0f), 0x7e);
    EXPECT_EQ(cp_fp32_to_e4m3(464.0f), 0x7e) << "saturating, not NaN";
    EXPECT_EQ(cp_fp32_to_e4m3(1e30f), 0x7e);
    EXPECT_EQ(cp_fp32_to_e4m3(INFINITY), 0x7e);
    EXPECT_EQ(cp_fp32_to_e4m3(-INFINITY), 0xfe);
    EXPECT_EQ(cp_fp32_to_e4m3(NAN), 0x7f);
    EXPECT_EQ(cp_fp32_to_e4m3(-NAN), 0x7f) << "a NaN's sign is not portable: dropped";
    EXPECT_EQ(cp_fp32_to_e4m3(0.0f), 0x00);
    EXPECT_EQ(cp_fp32_to_e4m3(-0.0f), 0x80);
    EXPECT_EQ(cp_fp32_to_e4m3(std::ldexp(1.0f, -11)), 0x00) << "a quarter of the smallest subnormal";
    EXPECT_EQ(cp_fp32_to_e4m3(std::ldexp(1.0f, -10)), 0x00) << "half of it ties to even (0)";
    EXPECT_EQ(cp_fp32_to_e4m3(std::ldexp(3.0f, -10)), 0x02) << "1.5 x 2^-9 ties to even (2)";
}

/* ---- quantize / dequantize ---------------------------------------------- */

struct Case {
    cp_dtype t;
    int64_t n;
};
std::string case_name(const testing::TestParamInfo<Case> &i) {
    return std::string(cp_dtype_name(i.param.t)) + "_n" + std::to_string(i.param.n);
}
std::vector<Case> cases() {
    std::vector<Case> out;
    for (cp_dtype t : kOwn) {
        const int64_t bs = cp_dtype_block_size(t);
        std::vector<int64_t> ns = {bs == 1 ? 37 : bs, 3 * bs, 4096, 1536, 11 * 256};
        if (bs == 1) ns.insert(ns.end(), {8, 576, 1001});
        for (int64_t n : ns)
            if (n % bs == 0) out.push_back({t, n});
    }
    return out;
}

class OwnRoundTrip : public testing::TestWithParam<Case> {};

/* Bounds from the formats:
 *   I8_ROW: |x - x^| <= scale / 2 (+ fp32 rounding), scale = amax / 127.
 *   F8_ROW: 3 mantissa bits: |x - x^| <= 2^-4 |x| for values scaled into the
 *     normal range, and <= 2^-10 scale below it (half the subnormal step).
 *   I4: the step of a group is its range / 15 (shrunk at most to 0.75 of it),
 *     so the RMS error of gaussian rows is ~ step / sqrt(12) ~ 0.085 of sigma
 *     for g32 (range ~4.4 sigma) and ~0.1 for g128; bounds 0.11 and 0.13
 *     (measured: 0.082 and 0.097). */
TEST_P(OwnRoundTrip, ErrorBounds) {
    const Case c = GetParam();
    auto x = gaussian(c.n, 300 + (uint32_t)c.n);
    x[(size_t)c.n / 3] = 6.5f; /* an outlier */
    const auto q = quantize(c.t, x.data(), c.n);
    const auto y = decode(c.t, q.data(), c.n);
    double amax = 0, se = 0, sx = 0;
    for (float v : x) amax = std::max(amax, (double)std::fabs(v));
    for (int64_t i = 0; i < c.n; i++) {
        const double e = std::fabs(y[i] - x[i]);
        se += e * e;
        sx += (double)x[i] * x[i];
        if (c.t == CP_DTYPE_I8_ROW) {
            ASSERT_LE(e, amax / 127 * 0.5 * (1 + 1e-5)) << i;
        } else if (c.t == CP_DTYPE_F8_ROW) {
            const double scale = amax / 448;
            ASSERT_LE(e, std::max(std::fabs((double)x[i]) / 16, scale * std::ldexp(1.0, -10)) * (1 + 1e-5)) << i;
        }
    }
    const double rel = std::sqrt(se / sx);
    if (c.t == CP_DTYPE_I4_G32) EXPECT_LE(rel, c.n >= 1024 ? 0.11 : 0.16);
    if (c.t == CP_DTYPE_I4_G128) EXPECT_LE(rel, c.n >= 1024 ? 0.13 : 0.18);
    if (c.t == CP_DTYPE_I8_ROW) {
        EXPECT_EQ(cp_row_scale(q.data(), c.n), (float)(amax / 127.0));
    }
    RecordProperty("rel_rms", std::to_string(rel));
}

TEST_P(OwnRoundTrip, ZeroConstantAndTinyRows) {
    const Case c = GetParam();
    std::vector<float> z((size_t)c.n, 0.0f);
    auto q = quantize(c.t, z.data(), c.n);
    for (double v : decode(c.t, q.data(), c.n)) ASSERT_EQ(v, 0.0);
    if (cp_dtype_row_extra(c.t)) {
        /* the trailer is the scale and 12 zero bytes, never stale memory */
        for (size_t i = (size_t)c.n + 4; i < q.size(); i++) ASSERT_EQ(q[i], 0) << i;
    }
    std::vector<float> k((size_t)c.n, -0.75f);
    for (double v : decode(c.t, quantize(c.t, k.data(), c.n).data(), c.n)) ASSERT_NEAR(v, -0.75, 0.75 * 0.07);
    std::vector<float> p((size_t)c.n, 2.5f);
    for (double v : decode(c.t, quantize(c.t, p.data(), c.n).data(), c.n)) ASSERT_NEAR(v, 2.5, 2.5 * 0.07);
    /* a row at 1e-3 keeps its relative accuracy (scales are relative) */
    auto x = gaussian(c.n, 11, 1e-3f);
    const auto y = decode(c.t, quantize(c.t, x.data(), c.n).data(), c.n);
    double se = 0, sx = 0;
    for (int64_t i = 0; i < c.n; i++) {
        se += (y[i] - x[i]) * (y[i] - x[i]);
        sx += (double)x[i] * x[i];
    }
    EXPECT_LE(std::sqrt(se / sx), 0.2);
}

/* Rows far below 1e-36 (the factor qmax / amax would overflow: 0 x inf is
 * NaN) keep their zeros at code 0 and decode to finite values no larger
 * than the row's; a NaN value of an int8 row is code 0, of an fp8 row the
 * NaN code, and neither touches the others. */
TEST(OwnTypesRows, TinyRowsAndNaN) {
    for (cp_dtype t : {CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW}) {
        SCOPED_TRACE(cp_dtype_name(t));
        const int64_t n = 64;
        std::vector<float> x((size_t)n);
        for (int64_t i = 0; i < n; i++) x[(size_t)i] = std::ldexp((float)(i % 16) - 8.0f, -140);
        std::vector<uint8_t> q(cp_dtype_row_size(t, n));
        ASSERT_EQ(cp_quantize_ref(t, x.data(), 1, n, q.data()), CP_OK);
        std::vector<float> y((size_t)n);
        cp_tensor w = cp_tensor_2d(t, 1, n, q.data());
        ASSERT_EQ(cp_dequantize_ref(&w, 0, 1, y.data()), CP_OK);
        for (int64_t i = 0; i < n; i++) {
            ASSERT_TRUE(std::isfinite(y[(size_t)i])) << i;
            ASSERT_LE(std::fabs(y[(size_t)i]), std::ldexp(8.0f, -140)) << i;
            if (x[(size_t)i] == 0.0f) ASSERT_EQ(q[(size_t)i] & 0x7f, 0) << i;
        }
        std::vector<float> v = {1.0f, NAN, -2.0f, 0.5f};
        std::vector<uint8_t> r(cp_dtype_row_size(t, 4));
        ASSERT_EQ(cp_quantize_ref(t, v.data(), 1, 4, r.data()), CP_OK);
        EXPECT_EQ(r[1], t == CP_DTYPE_I8_ROW ? 0 : 0x7f);
        EXPECT_EQ(cp_row_scale(r.data(), 4), t == CP_DTYPE_I8_ROW ? 2.0f / 127.0f : 2.0f / 448.0f);
    }
}

/* Decoding does not go through fp32 subnormals, so a process that flushes
 * them (x86 MXCSR DAZ/FTZ, as -ffast-math binaries set at start-up) still
 * decodes the subnormal codes. */
#if defined(__x86_64__) && defined(__SSE__)
TEST(OwnTypesE4M3, SubnormalCodesUnderFlushToZero) {
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040); /* FTZ | DAZ */
    float got[8];
    for (int m = 0; m < 8; m++) got[m] = cp_e4m3_to_fp32((uint8_t)m);
    const float neg = cp_e4m3_to_fp32(0x83);
    _mm_setcsr(saved);
    for (int m = 0; m < 8; m++) EXPECT_EQ(got[m], std::ldexp((float)m, -9)) << m;
    EXPECT_EQ(neg, -std::ldexp(3.0f, -9));
}
#endif

INSTANTIATE_TEST_SUITE_P(Types, OwnRoundTrip, testing::ValuesIn(cases()), case_name);

/* ---- dot products ------------------------------------------------------- */

class OwnVecDot : public testing::TestWithParam<Case> {};

/* The activation row is quantized to the type's partner (fp32 for the
 * weight-only types, F8_ROW for F8_ROW); the dot of the decoded rows in fp64
 * is what both variants must give, up to fp32 summation (1e-5 of the sum of
 * the magnitudes of the terms). */
TEST_P(OwnVecDot, ReferenceAndFastAgainstFp64) {
    const Case c = GetParam();
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(c.t);
    auto x = gaussian(c.n, 400 + (uint32_t)c.n);
    for (auto &v : x) v += 0.2f;
    const auto y = gaussian(c.n, 500 + (uint32_t)c.n);
    const auto xq = quantize(c.t, x.data(), c.n);
    std::vector<uint8_t> yq;
    std::vector<double> yd;
    if (tr->vec_dot_type == CP_DTYPE_F32) {
        yq.resize((size_t)c.n * 4);
        std::memcpy(yq.data(), y.data(), yq.size());
        yd.assign(y.begin(), y.end());
    } else {
        ASSERT_EQ(tr->vec_dot_type, c.t);
        yq = quantize(c.t, y.data(), c.n);
        yd = decode(c.t, yq.data(), c.n);
    }
    const auto xd = decode(c.t, xq.data(), c.n);
    double want = 0, as = 0;
    for (int64_t i = 0; i < c.n; i++) {
        want += xd[i] * yd[i];
        as += std::fabs(xd[i] * yd[i]);
    }
    float ref = NAN, fast = NAN;
    tr->vec_dot_ref(c.n, &ref, xq.data(), yq.data());
    tr->vec_dot(c.n, &fast, xq.data(), yq.data());
    EXPECT_NEAR(ref, want, 1e-5 * as);
    EXPECT_NEAR(fast, want, 1e-5 * as);
}

INSTANTIATE_TEST_SUITE_P(Types, OwnVecDot, testing::ValuesIn(cases()), case_name);

/* ---- the backend's matmul ----------------------------------------------- */

/* y = x W^T through the threaded CPU backend against fp64 of the dequantized
 * weights (and, for F8_ROW, of the activations quantized per token as the
 * format defines: W8A8). */
TEST(OwnTypesMatmul, BackendMatchesDequantizedFp64) {
    cp_backend_t be = nullptr;
    ASSERT_EQ(cp_backend_cpu_init(2, &be), CP_OK);
    const int64_t m = 96, k = 512;
    const int n = 5;
    const auto w = gaussian(m * k, 21, 0.05f);
    const auto x = gaussian(n * k, 22);
    for (cp_dtype t : kOwn) {
        SCOPED_TRACE(cp_dtype_name(t));
        const size_t rs = cp_dtype_row_size(t, k);
        std::vector<uint8_t> wq(rs * m);
        ASSERT_EQ(cp_backend_quantize(be, t, w.data(), m, k, wq.data()), CP_OK);
        cp_tensor wt = cp_tensor_2d(t, m, k, wq.data());
        EXPECT_EQ(wt.nb[1], rs);
        std::vector<float> wd((size_t)(m * k)), y((size_t)(n * m));
        ASSERT_EQ(cp_backend_dequantize(be, &wt, 0, m, wd.data()), CP_OK);
        ASSERT_EQ(cp_backend_matmul(be, &wt, x.data(), n, y.data(), nullptr), CP_OK);
        for (int i = 0; i < n; i++) {
            std::vector<double> xi(x.begin() + i * k, x.begin() + (i + 1) * k);
            if (t == CP_DTYPE_F8_ROW) {
                const auto aq = quantize(t, x.data() + i * k, k);
                xi = decode(t, aq.data(), k);
            }
            for (int64_t r = 0; r < m; r++) {
                double want = 0, as = 0;
                for (int64_t j = 0; j < k; j++) {
                    want += (double)wd[r * k + j] * xi[j];
                    as += std::fabs((double)wd[r * k + j] * xi[j]);
                }
                ASSERT_NEAR(y[i * m + r], want, 1e-5 * as + 1e-7) << "row " << r << " token " << i;
            }
        }
        /* a row slice decodes the same rows (the trailer travels with its row) */
        std::vector<float> part((size_t)(3 * k));
        ASSERT_EQ(cp_backend_dequantize(be, &wt, 40, 3, part.data()), CP_OK);
        for (int64_t j = 0; j < 3 * k; j++) ASSERT_EQ(part[j], wd[40 * k + j]);
    }
    cp_backend_free(be);
}

} // namespace
