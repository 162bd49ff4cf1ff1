/* test_quants.cc - CPU quantization routines: dtype geometry, fp16/bf16
 * conversions against bit-level references, GGUF block decoding (hand-built
 * blocks and a fixture decoded by gguf-py), quantize/dequantize round trips,
 * reference dot products against fp64 and SIMD variants against references. */
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cp_dtype.h"
#include "cpu/cpu_quants.h"
#include "cpu/quants_simd.h"

namespace {

const cp_cpu_type_traits *traits_of(cp_dtype t) {
    const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
    EXPECT_NE(tr, nullptr) << cp_dtype_name(t);
    return tr;
}

bool have_simd() {
    return std::string(cp_cpu_simd_level()) != "scalar";
}

uint32_t fbits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float bitsf(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, sigma);
    std::vector<float> v((size_t)n);
    for (auto &x : v)
        x = nd(rng);
    return v;
}

std::vector<uint8_t> quantize(cp_dtype t, const float *x, int64_t n, bool fast) {
    const cp_cpu_type_traits *tr = traits_of(t);
    std::vector<uint8_t> q(cp_dtype_row_size(t, n));
    (fast ? tr->from_float : tr->from_float_ref)(x, q.data(), n);
    return q;
}

/* Decodes a row to double. The activation-only types have no to_float (by
 * contract), so the test decodes them itself from the format definition. */
std::vector<double> decode(cp_dtype t, const void *data, int64_t n) {
    std::vector<double> out((size_t)n);
    if (t == CP_DTYPE_Q8_1) {
        const cp_block_q8_1 *b = (const cp_block_q8_1 *)data;
        for (int64_t i = 0; i < n; i++)
            out[i] = (double)cp_fp16_to_fp32(b[i / 32].d) * b[i / 32].qs[i % 32];
    } else if (t == CP_DTYPE_Q8_K) {
        const cp_block_q8_K *b = (const cp_block_q8_K *)data;
        for (int64_t i = 0; i < n; i++)
            out[i] = (double)b[i / 256].d * b[i / 256].qs[i % 256];
    } else {
        std::vector<float> f((size_t)n);
        traits_of(t)->to_float(data, f.data(), n);
        for (int64_t i = 0; i < n; i++)
            out[i] = f[i];
    }
    return out;
}

/* ---- geometry ----------------------------------------------------------- */

TEST(DtypeGeometry, NamesSizesAndBlocks) {
    struct G {
        cp_dtype t;
        const char *name;
        int64_t bs;
        size_t ts;
        bool q;
    };
    const G g[] = {
        {CP_DTYPE_F32, "F32", 1, 4, false},      {CP_DTYPE_F16, "F16", 1, 2, false},
        {CP_DTYPE_Q4_0, "Q4_0", 32, 18, true},   {CP_DTYPE_Q4_1, "Q4_1", 32, 20, true},
        {CP_DTYPE_Q5_0, "Q5_0", 32, 22, true},   {CP_DTYPE_Q5_1, "Q5_1", 32, 24, true},
        {CP_DTYPE_Q8_0, "Q8_0", 32, 34, true},   {CP_DTYPE_Q8_1, "Q8_1", 32, 36, true},
        {CP_DTYPE_Q2_K, "Q2_K", 256, 84, true},  {CP_DTYPE_Q3_K, "Q3_K", 256, 110, true},
        {CP_DTYPE_Q4_K, "Q4_K", 256, 144, true}, {CP_DTYPE_Q5_K, "Q5_K", 256, 176, true},
        {CP_DTYPE_Q6_K, "Q6_K", 256, 210, true}, {CP_DTYPE_Q8_K, "Q8_K", 256, 292, true},
        {CP_DTYPE_I8, "I8", 1, 1, false},        {CP_DTYPE_I16, "I16", 1, 2, false},
        {CP_DTYPE_I32, "I32", 1, 4, false},      {CP_DTYPE_I64, "I64", 1, 8, false},
        {CP_DTYPE_F64, "F64", 1, 8, false},      {CP_DTYPE_BF16, "BF16", 1, 2, false},
    };
    for (const G &e : g) {
        SCOPED_TRACE(e.name);
        EXPECT_TRUE(cp_dtype_known((int)e.t));
        ASSERT_NE(cp_dtype_name(e.t), nullptr);
        EXPECT_STREQ(cp_dtype_name(e.t), e.name);
        EXPECT_EQ(cp_dtype_block_size(e.t), e.bs);
        EXPECT_EQ(cp_dtype_type_size(e.t), e.ts);
        EXPECT_EQ(cp_dtype_is_quantized(e.t), e.q);
        EXPECT_EQ(cp_dtype_row_size(e.t, e.bs * 7), e.ts * 7);
        if (e.bs > 1) {
            EXPECT_EQ(cp_dtype_row_size(e.t, e.bs + 1), 0u);
        }
    }
    /* the structs must be byte-identical to GGUF's blocks */
    EXPECT_EQ(sizeof(cp_block_q4_0), 18u);
    EXPECT_EQ(sizeof(cp_block_q4_1), 20u);
    EXPECT_EQ(sizeof(cp_block_q5_0), 22u);
    EXPECT_EQ(sizeof(cp_block_q5_1), 24u);
    EXPECT_EQ(sizeof(cp_block_q8_0), 34u);
    EXPECT_EQ(sizeof(cp_block_q8_1), 36u);
    EXPECT_EQ(sizeof(cp_block_q2_K), 84u);
    EXPECT_EQ(sizeof(cp_block_q3_K), 110u);
    EXPECT_EQ(sizeof(cp_block_q4_K), 144u);
    EXPECT_EQ(sizeof(cp_block_q5_K), 176u);
    EXPECT_EQ(sizeof(cp_block_q6_K), 210u);
    EXPECT_EQ(sizeof(cp_block_q8_K), 292u);
    for (int t : {-1, 4, 5, 16, 23, 29, 31, 39, 45, 1000}) {
        EXPECT_FALSE(cp_dtype_known(t)) << t;
        EXPECT_EQ(cp_dtype_name((cp_dtype)t), nullptr) << t;
        EXPECT_EQ(cp_dtype_type_size((cp_dtype)t), 0u) << t;
        EXPECT_EQ(cp_cpu_get_type_traits((cp_dtype)t), nullptr) << t;
    }
}

/* ---- fp16 / bf16 -------------------------------------------------------- */

/* IEEE binary16 value from its fields, in double. */
double half_value(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0)
        v = std::ldexp((double)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = std::ldexp((double)(1024 + m), e - 25);
    return s ? -v : v;
}

/* Round to nearest even by search over all finite halves. */
uint16_t half_from_double_ref(double f) {
    static std::vector<double> pos; /* values of 0x0000..0x7bff, increasing */
    if (pos.empty())
        for (uint32_t h = 0; h < 0x7c00; h++)
            pos.push_back(half_value((uint16_t)h));
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(f);
    if (a >= 65520.0) return sign | 0x7c00; /* >= max + half an ulp: overflow */
    const size_t hi = (size_t)(std::lower_bound(pos.begin(), pos.end(), a) - pos.begin());
    if (hi == 0) return sign;
    if (hi == pos.size()) return sign | (uint16_t)(hi - 1);
    const double dlo = a - pos[hi - 1], dhi = pos[hi] - a;
    size_t r;
    if (dlo < dhi)
        r = hi - 1;
    else if (dhi < dlo)
        r = hi;
    else
        r = (hi % 2 == 0) ? hi : hi - 1;
    return sign | (uint16_t)r;
}

TEST(DtypeFp16, DecodeAllHalves) {
    for (uint32_t h = 0; h < 65536; h++) {
        const float got = cp_fp16_to_fp32((cp_fp16_t)h);
        const double want = half_value((uint16_t)h);
        if (std::isnan(want)) {
            ASSERT_TRUE(std::isnan(got)) << std::hex << h;
            EXPECT_EQ((fbits(got) >> 13) & 0x3ff, h & 0x3ff) << "payload " << std::hex << h;
            EXPECT_EQ(fbits(got) >> 31, h >> 15);
        } else {
            ASSERT_EQ(fbits(got), fbits((float)want)) << std::hex << h; /* also checks -0 */
        }
    }
}

TEST(DtypeFp16, EncodeRoundTripsAndTies) {
    for (uint32_t h = 0; h < 65536; h++) {
        if (((h >> 10) & 31) == 31 && (h & 1023)) continue; /* NaNs: below */
        ASSERT_EQ(cp_fp32_to_fp16(cp_fp16_to_fp32((cp_fp16_t)h)), h) << std::hex << h;
    }
    /* midpoints of neighbouring halves (exact in fp32) must go to the even
     * one; one fp32 ulp either side must go to the nearer one */
    int ties = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) {
        const double mid = 0.5 * (half_value((uint16_t)h) + half_value((uint16_t)(h + 1)));
        const float fm = (float)mid;
        ASSERT_EQ((double)fm, mid);
        const uint16_t even = (h % 2 == 0) ? (uint16_t)h : (uint16_t)(h + 1);
        ASSERT_EQ(cp_fp32_to_fp16(fm), even) << std::hex << h;
        ASSERT_EQ(cp_fp32_to_fp16(-fm), even | 0x8000) << std::hex << h;
        ASSERT_EQ(cp_fp32_to_fp16(std::nextafterf(fm, 0.0f)), h) << std::hex << h;
        ASSERT_EQ(cp_fp32_to_fp16(std::nextafterf(fm, INFINITY)), h + 1) << std::hex << h;
        ties++;
    }
    EXPECT_EQ(ties, 0x7bff);
}

TEST(DtypeFp16, EncodeSpecialsAndRandom) {
    EXPECT_EQ(cp_fp32_to_fp16(65504.0f), 0x7bff);
    EXPECT_EQ(cp_fp32_to_fp16(65519.996f), 0x7bff);
    EXPECT_EQ(cp_fp32_to_fp16(65520.0f), 0x7c00); /* tie with odd 0x7bff -> inf */
    EXPECT_EQ(cp_fp32_to_fp16(1e10f), 0x7c00);
    EXPECT_EQ(cp_fp32_to_fp16(-INFINITY), 0xfc00);
    EXPECT_EQ(cp_fp32_to_fp16(0x1p-25f), 0x0000); /* tie with 0 -> 0 */
    EXPECT_EQ(cp_fp32_to_fp16(std::nextafterf(0x1p-25f, 1.0f)), 0x0001);
    EXPECT_EQ(cp_fp32_to_fp16(0x1.8p-24f), 0x0002); /* 1.5 ulp: tie -> even 2 */
    EXPECT_EQ(cp_fp32_to_fp16(0x1p-14f), 0x0400);   /* smallest normal */
    EXPECT_EQ(cp_fp32_to_fp16(std::nextafterf(0x1p-14f, 0.0f)), 0x0400); /* rounds up into it */
    EXPECT_EQ(cp_fp32_to_fp16(1e-30f), 0x0000);
    EXPECT_EQ(cp_fp32_to_fp16(-0.0f), 0x8000);
    for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x7f802000u}) {
        const cp_fp16_t h = cp_fp32_to_fp16(bitsf(nan));
        EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << nan;
        EXPECT_NE(h & 0x3ff, 0) << "NaN must stay NaN " << std::hex << nan;
        EXPECT_EQ(h >> 15, nan >> 31);
    }
    std::mt19937 rng(7);
    for (int i = 0; i < 200000; i++) {
        /* exponents from far below the subnormals to beyond the overflow */
        const uint32_t e = 90 + rng() % 60, u = (rng() & 0x807fffffu) | (e << 23);
        const float f = bitsf(u);
        ASSERT_EQ(cp_fp32_to_fp16(f), half_from_double_ref(f)) << std::hexfloat << f;
    }
}

double bf16_value(uint16_t h) {
    const int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 0)
        v = std::ldexp((double)m, -133);
    else if (e == 255 && m)
        v = NAN;
    else
        v = std::ldexp((double)(128 + m), e - 134); /* e = 255, m = 0 gives 2^128 = inf's slot */
    return s ? -v : v;
}

TEST(DtypeBf16, DecodeEncodeAgainstBitReference) {
    for (uint32_t h = 0; h < 65536; h++) {
        const double want = bf16_value((uint16_t)h);
        const float got = cp_bf16_to_fp32((cp_bf16_t)h);
        if (std::isnan(want)) {
            ASSERT_TRUE(std::isnan(got));
            ASSERT_TRUE(std::isnan(cp_bf16_to_fp32(cp_fp32_to_bf16(got))));
            continue;
        }
        if (((h >> 7) & 255) == 255)
            ASSERT_TRUE(std::isinf(got));
        else
            ASSERT_EQ((double)got, want) << std::hex << h;
        ASSERT_EQ(cp_fp32_to_bf16(got), h) << std::hex << h;
    }
    /* ties to even, and nearest otherwise, over random fp32 bit patterns */
    std::mt19937 rng(11);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = rng();
        if ((u & 0x7f800000u) == 0x7f800000u) continue;
        if (i % 4 == 0) u = (u & 0xffff0000u) | 0x8000u; /* exact tie */
        const double f = bitsf(u);
        const uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
        const double dlo = std::fabs(f - bf16_value(lo)), dhi = std::fabs(bf16_value(hi) - f);
        const uint16_t want = dlo < dhi ? lo : (dhi < dlo ? hi : ((lo & 1) ? hi : lo));
        ASSERT_EQ(cp_fp32_to_bf16((float)f), want) << std::hex << u;
    }
    EXPECT_EQ(cp_fp32_to_bf16(INFINITY), 0x7f80);
    EXPECT_EQ(cp_fp32_to_bf16(-INFINITY), 0xff80);
    EXPECT_EQ(cp_fp32_to_bf16(bitsf(0x7f7fffffu)), 0x7f80); /* FLT_MAX rounds up to inf */
    EXPECT_TRUE(std::isnan(cp_bf16_to_fp32(cp_fp32_to_bf16(bitsf(0x7f800001u))))); /* low payload */
    EXPECT_EQ(cp_fp32_to_bf16(bitsf(0xffc00000u)) >> 15, 1);
}

/* ---- hand-built blocks decode to exact values --------------------------- */

constexpr cp_fp16_t H_0_125 = 0x3000, H_0_25 = 0x3400, H_0_5 = 0x3800, H_2 = 0x4000, H_M1 = 0xbc00;

std::vector<float> to_float(cp_dtype t, const void *blk, int64_t n) {
    std::vector<float> f((size_t)n);
    traits_of(t)->to_float(blk, f.data(), n);
    return f;
}

TEST(QuantDecode, Q4_0) {
    cp_block_q4_0 b[2];
    for (int k = 0; k < 2; k++) {
        b[k].d = k ? H_M1 : H_0_5;
        for (int j = 0; j < 16; j++)
            b[k].qs[j] = (uint8_t)(j | ((15 - j) << 4));
    }
    const auto f = to_float(CP_DTYPE_Q4_0, b, 64);
    for (int k = 0; k < 2; k++) {
        const float d = k ? -1.0f : 0.5f;
        for (int j = 0; j < 16; j++) {
            EXPECT_EQ(f[32 * k + j], d * (float)(j - 8)) << j;
            EXPECT_EQ(f[32 * k + j + 16], d * (float)(7 - j)) << j;
        }
    }
}

TEST(QuantDecode, Q4_1) {
    cp_block_q4_1 b;
    b.d = H_0_25;
    b.m = H_M1;
    for (int j = 0; j < 16; j++)
        b.qs[j] = (uint8_t)(j | ((j ^ 5) << 4));
    const auto f = to_float(CP_DTYPE_Q4_1, &b, 32);
    for (int j = 0; j < 16; j++) {
        EXPECT_EQ(f[j], 0.25f * (float)j - 1.0f);
        EXPECT_EQ(f[j + 16], 0.25f * (float)(j ^ 5) - 1.0f);
    }
}

TEST(QuantDecode, Q5_0_Q5_1) {
    const uint32_t qh = 0xA5A5F00Fu; /* bit j: 5th bit of element j (little-endian bytes) */
    cp_block_q5_0 b0;
    cp_block_q5_1 b1;
    b0.d = H_0_5;
    b1.d = H_0_25;
    b1.m = H_0_5;
    for (int k = 0; k < 4; k++)
        b0.qh[k] = b1.qh[k] = (uint8_t)(qh >> (8 * k));
    for (int j = 0; j < 16; j++)
        b0.qs[j] = b1.qs[j] = (uint8_t)(((j * 7) & 15) | ((15 - j) << 4));
    const auto f0 = to_float(CP_DTYPE_Q5_0, &b0, 32);
    const auto f1 = to_float(CP_DTYPE_Q5_1, &b1, 32);
    for (int e = 0; e < 32; e++) {
        const int nib = e < 16 ? ((e * 7) & 15) : (15 - (e - 16));
        const int q = nib | (int)(((qh >> e) & 1u) << 4);
        EXPECT_EQ(f0[e], 0.5f * (float)(q - 16)) << e;
        EXPECT_EQ(f1[e], 0.25f * (float)q + 0.5f) << e;
    }
}

TEST(QuantDecode, Q8_0) {
    cp_block_q8_0 b;
    b.d = H_2;
    for (int j = 0; j < 32; j++)
        b.qs[j] = (int8_t)(j == 0 ? -128 : (j == 1 ? 127 : 9 * j - 140));
    const auto f = to_float(CP_DTYPE_Q8_0, &b, 32);
    for (int j = 0; j < 32; j++)
        EXPECT_EQ(f[j], 2.0f * (float)b.qs[j]);
    EXPECT_EQ(f[0], -256.0f);
    EXPECT_EQ(f[1], 254.0f);
}

/* Q4_K / Q5_K share a 12-byte packing of 8 (6-bit scale, 6-bit min) pairs.
 * The bytes below were derived by hand from the format description:
 *   bytes 0-3 : sc[j] | (sc[j+4] >> 4) << 6     bytes 4-7 : m[j] | (m[j+4] >> 4) << 6
 *   bytes 8-11: (sc[j+4] & 15) | (m[j+4] & 15) << 4                               */
const int kSc[8] = {1, 2, 63, 17, 33, 48, 5, 60};
const int kMn[8] = {0, 63, 7, 32, 16, 49, 1, 62};
const uint8_t kPacked[12] = {0x81, 0xC2, 0x3F, 0xD1, 0x40, 0xFF,
                             0x07, 0xE0, 0x01, 0x10, 0x15, 0xEC};

TEST(QuantDecode, Q4_K) {
    cp_block_q4_K b;
    b.d = H_0_5;
    b.dmin = H_0_25;
    std::memcpy(b.scales, kPacked, 12);
    for (int i = 0; i < 128; i++)
        b.qs[i] = (uint8_t)(i * 37 + 11);
    const auto f = to_float(CP_DTYPE_Q4_K, &b, 256);
    for (int k = 0; k < 256; k++) {
        const int j = k / 32, l = k % 32, byte = b.qs[32 * (j / 2) + l];
        const int q = (j % 2) ? byte >> 4 : byte & 15;
        ASSERT_EQ(f[k], 0.5f * (float)(kSc[j] * q) - 0.25f * (float)kMn[j]) << k;
    }
}

TEST(QuantDecode, Q5_K) {
    cp_block_q5_K b;
    b.d = H_0_5;
    b.dmin = H_0_25;
    std::memcpy(b.scales, kPacked, 12);
    for (int i = 0; i < 128; i++)
        b.qs[i] = (uint8_t)(i * 37 + 11);
    for (int l = 0; l < 32; l++)
        b.qh[l] = (uint8_t)(l * 53 + 7);
    const auto f = to_float(CP_DTYPE_Q5_K, &b, 256);
    for (int k = 0; k < 256; k++) {
        const int j = k / 32, l = k % 32, byte = b.qs[32 * (j / 2) + l];
        /* the 5th bit of sub-block j's element l is bit j of qh[l] */
        const int q = ((j % 2) ? byte >> 4 : byte & 15) + 16 * ((b.qh[l] >> j) & 1);
        ASSERT_EQ(f[k], 0.5f * (float)(kSc[j] * q) - 0.25f * (float)kMn[j]) << k;
    }
}

TEST(QuantDecode, Q6_K) {
    cp_block_q6_K b;
    b.d = H_0_125;
    for (int i = 0; i < 128; i++)
        b.ql[i] = (uint8_t)(i * 29 + 3);
    for (int i = 0; i < 64; i++)
        b.qh[i] = (uint8_t)(i * 71 + 5);
    for (int g = 0; g < 16; g++)
        b.scales[g] = (int8_t)(9 * g - 70);
    const auto f = to_float(CP_DTYPE_Q6_K, &b, 256);
    /* element 128h + 32r + l: low nibble r>>1 of ql[64h + 32(r&1) + l], high
     * bits 2r..2r+1 of qh[32h + l] */
    for (int k = 0; k < 256; k++) {
        const int h = k / 128, r = (k % 128) / 32, l = k % 32;
        const int lo = (b.ql[64 * h + 32 * (r & 1) + l] >> (4 * (r >> 1))) & 15;
        const int hi = (b.qh[32 * h + l] >> (2 * r)) & 3;
        ASSERT_EQ(f[k], 0.125f * (float)(b.scales[k / 16] * ((lo | hi << 4) - 32))) << k;
    }
}

TEST(QuantDecode, Q2_K_Q3_K) {
    cp_block_q2_K b2;
    cp_block_q3_K b3;
    b2.d = H_0_5;
    b2.dmin = H_0_25;
    b3.d = H_0_25;
    for (int g = 0; g < 16; g++)
        b2.scales[g] = (uint8_t)(g * 45 + 17);
    for (int i = 0; i < 64; i++)
        b2.qs[i] = b3.qs[i] = (uint8_t)(i * 97 + 1);
    for (int i = 0; i < 32; i++)
        b3.hmask[i] = (uint8_t)(i * 13 + 200);
    for (int i = 0; i < 12; i++)
        b3.scales[i] = (uint8_t)(i * 59 + 33);
    const auto f2 = to_float(CP_DTYPE_Q2_K, &b2, 256);
    const auto f3 = to_float(CP_DTYPE_Q3_K, &b3, 256);
    for (int k = 0; k < 256; k++) {
        /* 2-bit quant: bits 2r.. of qs[32h + l] for element 128h + 32r + l */
        const int h = k / 128, r = (k % 128) / 32, l = k % 32, g = k / 16;
        const int q = (b2.qs[32 * h + l] >> (2 * r)) & 3;
        ASSERT_EQ(f2[k],
                  0.5f * (float)((b2.scales[g] & 15) * q) - 0.25f * (float)(b2.scales[g] >> 4))
            << k;
        /* Q3_K scale g: low nibble from byte g%8 (high nibble for g >= 8), top
         * two bits from bits 2(g/4) of byte 8 + g%4, minus 32; hmask bit k/32
         * of byte k%32 set means no -4 offset */
        const int s_lo = g < 8 ? (b3.scales[g] & 15) : (b3.scales[g - 8] >> 4);
        const int s = (s_lo | (((b3.scales[8 + g % 4] >> (2 * (g / 4))) & 3) << 4)) - 32;
        const int q3 = q - (((b3.hmask[l] >> (k / 32)) & 1) ? 0 : 4);
        ASSERT_EQ(f3[k], 0.25f * (float)(s * q3)) << k;
    }
}

/* ---- blocks decoded by an independent implementation -------------------
 * Random blocks (with sane fp16 scale fields) decoded by gguf-py 0.19.0,
 * the reference Python implementation of the GGUF formats, with:
 *   raw = random bytes (numpy seed 20240611), fp16 fields set to U(0.01,1)
 *   v = gguf.quants.dequantize(raw, type) as float64
 *   c1 = sum v, c2 = sum v_i*w_i, a2 = sum |v_i|*w_i, w_i = (7919 i) % 31 + 1
 *   samples: v_i (as float32) every 4th (32-blocks) / 8th (K) element. */
struct GgufFixture {
    cp_dtype t;
    int n;
    const char *hex;
    double c1, c2, a2;
    struct {
        int i;
        float v;
    } s[32];
};
// Generated with gguf-py 0.19.0 (gguf.quants.dequantize) by the script quoted above.
static const GgufFixture kGgufFixtures[] = {
    {CP_DTYPE_Q4_0,
     64,
     "c42f9c794b4e8c30ec1fdf814091f7ff12764e3a9e682f961aede8f7d625c9d54d64743e",
     11.57861328125,
     301.852783203125,
     1863.073486328125,
     {{0, 4.853515625e-01f},
      {4, 4.853515625e-01f},
      {8, 8.493652344e-01f},
      {12, -1.213378906e-01f},
      {16, 1.213378906e-01f},
      {20, 0.000000000e+00f},
      {24, 6.066894531e-01f},
      {28, 8.493652344e-01f},
      {32, 4.728515625e+00f},
      {36, 1.576171875e+00f},
      {40, -1.576171875e+00f},
      {44, 3.940429688e+00f},
      {48, 7.880859375e-01f},
      {52, -5.516601562e+00f},
      {56, 3.940429688e+00f},
      {60, -3.152343750e+00f}}},
    {CP_DTYPE_Q4_1,
     64,
     "7239463abf07d32726ed1a8578af07073e01afefb23459bac018fda4fec18845e4ba1a32dfe93bc1",
     242.28369140625,
     3489.69580078125,
     3562.28271484375,
     {{0, 1.099414062e+01f},
      {4, 4.868164062e+00f},
      {8, 6.229492188e+00f},
      {12, 1.031347656e+01f},
      {16, 8.271484375e+00f},
      {20, 2.145507812e+00f},
      {24, 5.548828125e+00f},
      {28, 2.826171875e+00f},
      {32, -7.934570312e-01f},
      {36, 3.314941406e+00f},
      {40, 3.803710938e-01f},
      {44, 3.608398438e+00f},
      {48, 2.728027344e+00f},
      {52, 3.608398438e+00f},
      {56, 3.314941406e+00f},
      {60, 3.021484375e+00f}}},
    {CP_DTYPE_Q5_0,
     64,
     "6130e36bb10fc4cab362d4d83903eb6431a52b985614623b61de2828a8626b0d616b0def63102f945be575a5",
     -75.3333740234375,
     -357.73828125,
     4728.72412109375,
     {{0, 5.473632812e-01f},
      {4, -1.642089844e+00f},
      {8, 1.505249023e+00f},
      {12, -6.842041016e-01f},
      {16, 1.642089844e+00f},
      {20, 1.778930664e+00f},
      {24, 1.915771484e+00f},
      {28, -1.915771484e+00f},
      {32, 7.382812500e+00f},
      {36, -1.384277344e+01f},
      {40, -1.199707031e+01f},
      {44, 1.015136719e+01f},
      {48, -5.537109375e+00f},
      {52, -9.228515625e+00f},
      {56, -9.228515625e+00f},
      {60, -1.015136719e+01f}}},
    {CP_DTYPE_Q5_1,
     64,
     "4235d5342887e0e53ca3324316b77c58f59207529f10afe2fd305133f0e3444784f2dde143d787b107902674e077f"
     "90d",
     231.271484375,
     3424.3323974609375,
     3424.3323974609375,
     {{0, 4.245361328e+00f},
      {4, 2.273681641e+00f},
      {8, 7.202880859e+00f},
      {12, 5.231201172e+00f},
      {16, 1.287841797e+00f},
      {20, 6.306152344e-01f},
      {24, 1.048901367e+01f},
      {28, 3.259521484e+00f},
      {32, 8.521728516e-01f},
      {36, 3.190429688e+00f},
      {40, 3.813964844e+00f},
      {44, 2.286376953e-01f},
      {48, 1.475708008e+00f},
      {52, 8.521728516e-01f},
      {56, 2.722778320e+00f},
      {60, 2.411010742e+00f}}},
    {CP_DTYPE_Q8_0,
     64,
     "ee355ad9d0fda2772d94f1edee489afdf2d960371f47dd8baaef20dce5411f0f66a728359a886e808cdb77935ba5e"
     "17d"
     "c541d453bd7d6f12406f2a2dfb47c26e5ce726c3",
     85.48095703125,
     -1643.21630859375,
     22450.87646484375,
     {{0, 3.335449219e+01f},
      {4, -3.483691406e+01f},
      {8, -5.559082031e+00f},
      {12, -3.780175781e+01f},
      {16, 3.557812500e+01f},
      {20, -1.297119141e+01f},
      {24, 1.185937500e+01f},
      {28, 1.148876953e+01f},
      {32, -3.287109375e+01f},
      {36, -3.738281250e+01f},
      {40, 2.932617188e+01f},
      {44, -1.901367188e+01f},
      {48, -2.159179688e+01f},
      {52, 2.062500000e+01f},
      {56, -1.611328125e+00f},
      {60, 2.964843750e+01f}}},
    {CP_DTYPE_Q2_K,
     256,
     "1b38fa87123de560acd710c77dbd0d692558c9a256ed977cf548ebb00f0d7ccce84b36e05f494742a1dc80ac63ced"
     "bf5"
     "70b7017c1fa9bf3f6ff9cb5f0631ddf0d128be4e01fca6281976c90841bbf29f9e3954b9",
     3392.5048828125,
     56343.859375,
     56343.859375,
     {{0, 8.389648438e+00f},   {8, 8.389648438e+00f},   {16, 1.998046875e+00f},
      {24, 7.615234375e+00f},  {32, 1.701171875e+01f},  {40, 1.701171875e+01f},
      {48, 1.515820312e+01f},  {56, 5.328125000e+00f},  {64, 3.474609375e+00f},
      {72, 4.878906250e+00f},  {80, 2.025390625e+01f},  {88, 2.025390625e+01f},
      {96, 9.324218750e+00f},  {104, 1.985644531e+01f}, {112, 3.996093750e+00f},
      {120, 3.996093750e+00f}, {128, 6.660156250e+00f}, {136, 3.193750000e+01f},
      {144, 1.357324219e+01f}, {152, 1.357324219e+01f}, {160, 6.660156250e-01f},
      {168, 6.660156250e-01f}, {176, 7.992187500e+00f}, {184, 1.782226562e+01f},
      {192, 3.204589844e+01f}, {200, 2.291796875e+01f}, {208, 1.645410156e+01f},
      {216, 1.645410156e+01f}, {224, 9.127929688e+00f}, {232, 9.127929688e+00f},
      {240, 2.295410156e+01f}, {248, 3.996093750e+00f}}},
    {CP_DTYPE_Q3_K,
     256,
     "0e4085544a5af1853d99ff77c257408fa147b5f2e96b102eb5e228f1b21b93b306403929a6024b8145a9a1c1c43b6"
     "6e6"
     "639c9517c5bbe47a33edc7c705616c110fa54f801cfde18ade3274613ed4c04ae17beab9a0b256b9c6753f8e25384"
     "89c"
     "033b32cc7576d2c392c000d4c039",
     2325.15625,
     29535.59375,
     120537.96875,
     {{0, -4.312500000e+00f},   {8, 2.156250000e+00f},    {16, -4.528125000e+01f},
      {24, -4.528125000e+01f},  {32, -2.156250000e+01f},  {40, 6.468750000e+01f},
      {48, 5.750000000e+01f},   {56, 5.750000000e+01f},   {64, -0.000000000e+00f},
      {72, -0.000000000e+00f},  {80, 3.737500000e+01f},   {88, -5.606250000e+01f},
      {96, -0.000000000e+00f},  {104, -2.156250000e+01f}, {112, 2.803125000e+01f},
      {120, 3.737500000e+01f},  {128, 1.150000000e+01f},  {136, -2.300000000e+01f},
      {144, 6.253125000e+01f},  {152, -4.168750000e+01f}, {160, 2.084375000e+01f},
      {168, -6.253125000e+01f}, {176, -0.000000000e+00f}, {184, -2.875000000e+00f},
      {192, -2.012500000e+01f}, {200, -1.509375000e+01f}, {208, -3.306250000e+01f},
      {216, -6.612500000e+01f}, {224, 5.462500000e+01f},  {232, 1.365625000e+01f},
      {240, 6.037500000e+01f},  {248, 6.037500000e+01f}}},
    {CP_DTYPE_Q4_K,
     256,
     "78330b34f702a6f504b1d437e68354198cbca08039dbdcff8ef197524a8222b112196e70e12de4a82b0e7cc67fa2f"
     "720"
     "d619216d6be91f6fb31492fb7eb8f87b2eab402f84e33fb8461ae25907eefbf1e0daee19a46379b13ef0ce036b8f5"
     "c3b"
     "b027828b1460d5c2d4411f8742b70ac8664b9270bd61d54f61d55c4cc1067175a7a63506b7c82c4f116bc51fbffb2"
     "ad0",
     14418.40625,
     231356.0537109375,
     247883.79931640625,
     {{0, 1.530322266e+02f},    {8, 1.787060547e+02f},    {16, 2.466308594e+01f},
      {24, 1.401953125e+02f},   {32, -8.647216797e+00f},  {40, -8.647216797e+00f},
      {48, -1.191479492e+01f},  {56, -1.144799805e+01f},  {64, 4.816113281e+01f},
      {72, 2.155371094e+01f},   {80, 1.191142578e+02f},   {88, 4.816113281e+01f},
      {96, 1.469138184e+02f},   {104, 1.221735840e+02f},  {112, 1.084252930e+01f},
      {120, 3.558276367e+01f},  {128, -3.537597656e+00f}, {136, 1.729116211e+02f},
      {144, -3.537597656e+00f}, {152, 4.687646484e+01f},  {160, -3.046875000e-01f},
      {168, -8.006835938e+00f}, {176, -2.405273438e+00f}, {184, -1.004882812e+00f},
      {192, 3.702172852e+01f},  {200, -4.989990234e+00f}, {208, 4.542407227e+01f},
      {216, -4.989990234e+00f}, {224, 7.956958008e+01f},  {232, 7.956958008e+01f},
      {240, 1.327844238e+02f},  {248, 1.305102539e+01f}}},
    {CP_DTYPE_Q5_K,
     256,
     "0133943bcb67c6cf4d86575f7c711da5ab3e1d780275156987c57cc7e45c69b2cc6e5862c77e1990347a5d4ed47d0"
     "01c"
     "a5ee963bd7d634defb58f3a22d7ff6835824e92242d1e757b8b64950350fae7d5b7c9b0c92460c653399b23177c41"
     "590"
     "9c87f2759d58cf1a6a28a37165ff9a667ff573df8059879aec2c5b532d2074ad6d584b5f305e582394c6c90ce32d8"
     "1af"
     "5aced218285e11c47b244b4dc9e563dabba5252056f55f47a4965d1d48ede460",
     23009.59228515625,
     374896.45837402344,
     396117.97399902344,
     {{0, 3.824499512e+01f},    {8, 5.269055176e+01f},    {16, 6.946289062e+00f},
      {24, 6.946289062e+00f},   {32, 2.162526855e+02f},   {40, 2.589327393e+02f},
      {48, 3.699645996e+01f},   {56, 8.821252441e+01f},   {64, -7.341552734e+00f},
      {72, 3.164306641e+00f},   {80, 1.498339844e+01f},   {88, 1.235693359e+01f},
      {96, 3.957946777e+01f},   {104, -1.951599121e+01f}, {112, 5.271179199e+01f},
      {120, -9.666748047e+00f}, {128, 1.751977539e+02f},  {136, 1.358007812e+02f},
      {144, 1.489331055e+02f},  {152, 2.408593750e+02f},  {160, 4.863562012e+01f},
      {168, 1.514819336e+01f},  {176, -1.461840820e+01f}, {184, 5.607727051e+01f},
      {192, 1.174084473e+02f},  {200, 1.307596436e+02f},  {208, 3.443787842e+02f},
      {216, 3.730126953e+01f},  {224, 2.189757080e+02f},  {232, 2.421761475e+02f},
      {240, 2.885770264e+02f},  {248, 9.137329102e+01f}}},
    {CP_DTYPE_Q6_K,
     256,
     "1df6154f8eecb00e7a9920d3803981ab5c9b2ad67d8f4e437f71c70e8437541298e69899d2f077deab5515919b879"
     "00b"
     "32a4834320f16bc8dd383b8c80c901915ccb707dc565bcbbcdc26ab0ba906d48dc590aafaf2b8f2091633aa3a6c1f"
     "220"
     "de6f194775ea7708756b5711987580275c7106b1cf1ea56e2417b557104f9c6fbd42a49297e1470207edae4912a18"
     "b1f"
     "362ad76c1c20bdf544df8681530c3884e3593632b739ef3a8b327f4b7ecb28b4cccf53110348cbfe000aa3839d96d"
     "f8f"
     "378d3c46ac22972f792c24cf0c07b6c6cc3a",
     36484.775390625,
     470319.9609375,
     3397377.1875,
     {{0, -1.401855469e+02f},   {8, 1.214941406e+03f},    {16, -1.172460938e+03f},
      {24, 1.660986328e+03f},   {32, 1.223437500e+03f},   {40, -2.548828125e+02f},
      {48, -8.326171875e+02f},  {56, -1.784179688e+02f},  {64, -1.213242188e+03f},
      {72, 1.784179688e+03f},   {80, 6.066210938e+02f},   {88, -7.221679688e+02f},
      {96, -8.028808594e+02f},  {104, 1.962597656e+03f},  {112, -1.158017578e+03f},
      {120, -1.197949219e+02f}, {128, 2.878476562e+03f},  {136, 2.981279297e+03f},
      {144, -7.476562500e+02f}, {152, -1.158867188e+03f}, {160, -5.505468750e+02f},
      {168, 1.529296875e+02f},  {176, -1.165664062e+03f}, {184, 1.165664062e+03f},
      {192, 5.097656250e+01f},  {200, -2.039062500e+02f}, {208, -1.129980469e+02f},
      {216, -1.367871094e+02f}, {224, -1.823261719e+03f}, {232, -4.400976562e+02f},
      {240, -1.034824219e+03f}, {248, 1.478320312e+03f}}},
};

std::vector<uint8_t> from_hex(const char *h) {
    std::vector<uint8_t> v;
    for (size_t i = 0; h[i] && h[i + 1]; i += 2) {
        unsigned x = 0;
        std::sscanf(h + i, "%2x", &x);
        v.push_back((uint8_t)x);
    }
    return v;
}

TEST(QuantDecode, MatchesGgufPyFixture) {
    for (const GgufFixture &fx : kGgufFixtures) {
        SCOPED_TRACE(cp_dtype_name(fx.t));
        const std::vector<uint8_t> raw = from_hex(fx.hex);
        ASSERT_EQ(raw.size(), cp_dtype_row_size(fx.t, fx.n));
        const auto f = to_float(fx.t, raw.data(), fx.n);
        double c1 = 0, c2 = 0, a1 = 0;
        for (int i = 0; i < fx.n; i++) {
            const double w = (double)((7919 * i) % 31 + 1);
            c1 += f[i];
            c2 += f[i] * w;
            a1 += std::fabs(f[i]);
        }
        /* the two implementations may round d*sc*q in a different order: a
         * few fp32 ulps per element, i.e. ~1e-6 of the absolute sums */
        EXPECT_NEAR(c1, fx.c1, 1e-6 * a1 + 1e-9);
        EXPECT_NEAR(c2, fx.c2, 1e-6 * fx.a2 + 1e-9);
        const int step = cp_dtype_block_size(fx.t) == 32 ? 4 : 8;
        for (int k = 0; k < fx.n / step; k++) {
            ASSERT_EQ(fx.s[k].i, k * step);
            EXPECT_NEAR(f[fx.s[k].i], fx.s[k].v, 4e-7 * std::fabs(fx.s[k].v))
                << "element " << fx.s[k].i;
        }
    }
}

/* The weight quantizers of the 32-blocks follow the conventional rounding
 * rules, so they give the same bytes as gguf-py 0.19.0's quantize() (which
 * is bit-exact with llama.cpp's reference) on
 *   x_i = (((7919 i + 13) % 1001) - 500) / 64, i < 64, and x_5 = -500/64. */
struct GgufEncodeFixture {
    cp_dtype t;
    const char *hex;
};
static const GgufEncodeFixture kGgufEncode[] = {
    {CP_DTYPE_Q4_0, "d03b908f7d5c4b2018f6e5d3b2a18f7e6c4bacbb4d5f7081a3b4d6e7f91a2c4d5f7f8193"},
    {CP_DTYPE_Q4_1,
     "0a3cd0c7908e6d5c4a2017f6e5c3b2918f7d5c4b143ca0c7b2a19f7e6c4b3a2807e5d4c3a1907e6d"},
    {CP_DTYPE_Q5_0,
     "d0371ef0831f300edba885502ffdca9764411eebb986acb7033ff8c18bbee01346699ccff114477aaddf0235"},
    {CP_DTYPE_Q5_1, "d137d0c71ef0831f300edba885502ffdca9764411eebb986e537a0c7fcc0073e75422ffcc99764"
                    "411eebb8865320fdda"},
    {CP_DTYPE_Q8_0, "e02b846c553f2881fbe4ceb7a08a725b442e1701ead3bda68f77614a331d06efd9c2bb2baa937f"
                    "68513a230cf5dec7b0"
                    "99826e57402912fbe4cdb69e87735c452e1700e9"},
};

TEST(QuantEncode, MatchesGgufPyFixture) {
    std::vector<float> x(64);
    for (int i = 0; i < 64; i++)
        x[i] = (float)(((7919 * i + 13) % 1001) - 500) / 64.0f;
    x[5] = -500.0f / 64.0f;
    for (const GgufEncodeFixture &fx : kGgufEncode) {
        SCOPED_TRACE(cp_dtype_name(fx.t));
        const std::vector<uint8_t> want = from_hex(fx.hex);
        for (bool fast : {false, true}) {
            const auto got = quantize(fx.t, x.data(), 64, fast);
            ASSERT_EQ(got.size(), want.size());
            for (size_t i = 0; i < got.size(); i++)
                ASSERT_EQ(got[i], want[i]) << "byte " << i << " fast " << fast;
        }
    }
}

/* ---- parameterised cases ------------------------------------------------ */

struct Case {
    cp_dtype t;
    int64_t n;
};
void PrintTo(const Case &c, std::ostream *os) {
    *os << cp_dtype_name(c.t) << " n=" << c.n;
}
std::string case_name(const testing::TestParamInfo<Case> &i) {
    return std::string(cp_dtype_name(i.param.t)) + "_n" + std::to_string(i.param.n);
}
std::vector<Case> cases_for(std::initializer_list<cp_dtype> types) {
    std::vector<Case> out;
    for (cp_dtype t : types) {
        const int64_t bs = cp_dtype_block_size(t);
        std::vector<int64_t> ns = {bs, 2 * bs, 3 * bs, 7 * bs, 4096, 11 * 256};
        if (bs == 1) ns.insert(ns.end(), {37, 4095, 1001}); /* SIMD tails */
        for (int64_t n : ns)
            out.push_back({t, n});
    }
    return out;
}

/* Round trip of N(0,1) data: relative RMS error bounds. A uniform quantizer
 * of step D has RMS error D/sqrt(12); per type (amax of 32 normals ~2.5):
 *   Q8_0/Q8_1: D = amax/127 -> ~0.0056; bound 0.008.
 *   Q8_K: amax of 256 normals ~3 -> ~0.0069; bound 0.009.
 *   Q4_0: D = amax/8 -> ~0.088 (one side of the range is used by fewer
 *     levels), bound 0.12; Q4_1: D = range/15 ~5/15 -> ~0.095, bound 0.12.
 *   Q5_0 / Q5_1: half the step of Q4 -> bound 0.06.
 *   Q4_K: scale+min fitted per 32 (range/15 ~ Q4_1's step, less the
 *     least-squares gain, plus 6-bit scale error), bound 0.09; Q5_K 0.045.
 *   Q6_K: groups of 16, D ~2.3/32 -> ~0.021, plus 8-bit scale error; 0.022.
 *   F16: relative error <= 2^-11 per element, BF16 <= 2^-8.
 * Measured at n = 4096 (quantizers of this commit): Q4_0 .087, Q4_1 .079,
 * Q5_0 .044, Q5_1 .038, Q8_0 .0054, Q8_K .0073, Q4_K .071, Q5_K .036,
 * Q6_K .0175: 65-80% of the bounds, so a regression of the quantizers shows. */
double rt_bound(cp_dtype t) {
    switch (t) {
    case CP_DTYPE_F16: return 1.0 / 2048;
    case CP_DTYPE_BF16: return 1.0 / 256;
    case CP_DTYPE_Q8_0:
    case CP_DTYPE_Q8_1: return 0.008;
    case CP_DTYPE_Q8_K: return 0.009;
    case CP_DTYPE_Q4_0:
    case CP_DTYPE_Q4_1: return 0.12;
    case CP_DTYPE_Q5_0:
    case CP_DTYPE_Q5_1: return 0.06;
    case CP_DTYPE_Q4_K: return 0.09;
    case CP_DTYPE_Q5_K: return 0.045;
    case CP_DTYPE_Q6_K: return 0.022;
    default: return 0.0;
    }
}

class QuantRoundTrip : public testing::TestWithParam<Case> {};

TEST_P(QuantRoundTrip, RmsErrorWithinBound) {
    const Case c = GetParam();
    const auto x = gaussian(c.n, 1234 + (uint32_t)c.n);
    const auto q = quantize(c.t, x.data(), c.n, false);
    const auto y = decode(c.t, q.data(), c.n);
    double se = 0, sx = 0, maxe = 0;
    for (int64_t i = 0; i < c.n; i++) {
        se += (y[i] - x[i]) * (y[i] - x[i]);
        sx += (double)x[i] * x[i];
        maxe = std::max(maxe, std::fabs(y[i] - x[i]));
    }
    const double rel = std::sqrt(se / sx);
    /* small rows are too few samples for a statistical bound: allow 1.5x */
    const double bound = rt_bound(c.t) * (c.n >= 1024 ? 1.0 : 1.5);
    EXPECT_LE(rel, bound) << "relative RMS error " << rel << ", max abs error " << maxe;
    RecordProperty("rel_rms", std::to_string(rel));
}

TEST_P(QuantRoundTrip, ScaledAndDegenerateInputs) {
    const Case c = GetParam();
    /* all-zero rows decode to exact zeros (no NaN from a zero scale) */
    std::vector<float> z((size_t)c.n, 0.0f);
    for (bool fast : {false, true}) {
        const auto y = decode(c.t, quantize(c.t, z.data(), c.n, fast).data(), c.n);
        for (int64_t i = 0; i < c.n; i++)
            ASSERT_EQ(y[i], 0.0) << i;
    }
    /* a constant row and a scaled row keep the relative error bound */
    std::vector<float> k((size_t)c.n, -0.75f);
    const auto yk = decode(c.t, quantize(c.t, k.data(), c.n, false).data(), c.n);
    for (int64_t i = 0; i < c.n; i++)
        ASSERT_NEAR(yk[i], -0.75, 0.75 * 2 * rt_bound(c.t)) << i;
    auto x = gaussian(c.n, 99, 1e-3f);
    const auto y = decode(c.t, quantize(c.t, x.data(), c.n, false).data(), c.n);
    double se = 0, sx = 0;
    for (int64_t i = 0; i < c.n; i++) {
        se += (y[i] - x[i]) * (y[i] - x[i]);
        sx += (double)x[i] * x[i];
    }
    EXPECT_LE(std::sqrt(se / sx), rt_bound(c.t) * 1.5);
}

INSTANTIATE_TEST_SUITE_P(
    Types, QuantRoundTrip,
    testing::ValuesIn(cases_for({CP_DTYPE_F16, CP_DTYPE_BF16, CP_DTYPE_Q4_0, CP_DTYPE_Q4_1,
                                 CP_DTYPE_Q5_0, CP_DTYPE_Q5_1, CP_DTYPE_Q8_0, CP_DTYPE_Q8_1,
                                 CP_DTYPE_Q4_K, CP_DTYPE_Q5_K, CP_DTYPE_Q6_K, CP_DTYPE_Q8_K})),
    case_name);

/* Element-wise bound of the 8-bit activation quantizers: q = round(x/d)
 * gives |x - d q| <= d/2, and storing Q8_0/Q8_1's d in fp16 adds at most
 * |q| * d * 2^-11 <= 127/2048 d, so |x - x^| <= 0.5625 d with d = amax/127
 * per block. Q8_K keeps d in fp32: 0.5 d (+ fp32 rounding). */
TEST(QuantActivation, ElementwiseErrorBound) {
    const int64_t n = 4096;
    const auto x = gaussian(n, 5);
    for (cp_dtype t : {CP_DTYPE_Q8_0, CP_DTYPE_Q8_1, CP_DTYPE_Q8_K}) {
        SCOPED_TRACE(cp_dtype_name(t));
        const int64_t bs = cp_dtype_block_size(t);
        const auto y = decode(t, quantize(t, x.data(), n, false).data(), n);
        for (int64_t b = 0; b < n / bs; b++) {
            double amax = 0;
            for (int64_t i = 0; i < bs; i++)
                amax = std::max(amax, (double)std::fabs(x[b * bs + i]));
            const double d = amax / 127, tol = (t == CP_DTYPE_Q8_K ? 0.5001 : 0.5625) * d;
            for (int64_t i = 0; i < bs; i++)
                ASSERT_LE(std::fabs(y[b * bs + i] - x[b * bs + i]), tol);
        }
    }
}

TEST(QuantActivation, Q8_1SumAndQ8_KBsums) {
    const int64_t n = 2048;
    const auto x = gaussian(n, 17);
    const auto q1 = quantize(CP_DTYPE_Q8_1, x.data(), n, false);
    const cp_block_q8_1 *b1 = (const cp_block_q8_1 *)q1.data();
    for (int64_t b = 0; b < n / 32; b++) {
        int sum = 0;
        for (int i = 0; i < 32; i++)
            sum += b1[b].qs[i];
        const float want = cp_fp16_to_fp32(cp_fp32_to_fp16(cp_fp16_to_fp32(b1[b].d) * (float)sum));
        /* s = fp16(d * sum) with the unrounded d: within one fp16 ulp of the rounded-d product */
        EXPECT_NEAR(cp_fp16_to_fp32(b1[b].s), want, std::fabs(want) * 2e-3 + 1e-7) << b;
    }
    const auto qk = quantize(CP_DTYPE_Q8_K, x.data(), n, false);
    const cp_block_q8_K *bk = (const cp_block_q8_K *)qk.data();
    for (int64_t b = 0; b < n / 256; b++) {
        bool has_pm127 = false;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++)
                sum += bk[b].qs[16 * g + i];
            EXPECT_EQ(bk[b].bsums[g], sum);
        }
        for (int i = 0; i < 256; i++)
            has_pm127 |= (bk[b].qs[i] == -127 || bk[b].qs[i] == 127);
        EXPECT_TRUE(has_pm127) << "the largest |x| maps to 127 in magnitude";
    }
}

/* ---- dot products ------------------------------------------------------- */

/* fp64 dot of the decoded rows, the semantics the formats define. For the
 * Q8_1 partner the offset term uses the stored s (= fp16(d sum q)), as the
 * format intends: sum_j (x_j - m) y_j + m s per block. *abs_sum gets the sum
 * of the magnitudes of the terms, the natural scale of rounding errors. */
double dot_fp64(cp_dtype wt, const std::vector<uint8_t> &xq, cp_dtype vt,
                const std::vector<uint8_t> &yq, int64_t n, double *abs_sum) {
    const auto xd = decode(wt, xq.data(), n), yd = decode(vt, yq.data(), n);
    double dot = 0, as = 0;
    if (vt == CP_DTYPE_Q8_1) {
        const size_t ts = cp_dtype_type_size(wt);
        const cp_block_q8_1 *yb = (const cp_block_q8_1 *)yq.data();
        for (int64_t b = 0; b < n / 32; b++) {
            cp_fp16_t mh; /* Q4_1 and Q5_1 both start with fp16 d, m */
            std::memcpy(&mh, xq.data() + b * ts + 2, 2);
            const double m = cp_fp16_to_fp32(mh), s = cp_fp16_to_fp32(yb[b].s);
            for (int64_t i = b * 32; i < b * 32 + 32; i++) {
                dot += (xd[i] - m) * yd[i];
                as += std::fabs((xd[i] - m) * yd[i]);
            }
            dot += m * s;
            as += std::fabs(m * s);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            dot += xd[i] * yd[i];
            as += std::fabs(xd[i] * yd[i]);
        }
    }
    *abs_sum = as;
    return dot;
}

class QuantVecDot : public testing::TestWithParam<Case> {
  protected:
    void SetUp() override {
        c = GetParam();
        tr = traits_of(c.t);
        ASSERT_NE(tr, nullptr);
        ASSERT_NE(tr->vec_dot_ref, nullptr);
        /* weights get an offset so Q4_1/Q5_1/K mins matter */
        x = gaussian(c.n, 100 + (uint32_t)c.n);
        for (auto &v : x)
            v += 0.3f;
        const auto y = gaussian(c.n, 200 + (uint32_t)c.n);
        xq = quantize(c.t, x.data(), c.n, false);
        yq = quantize(tr->vec_dot_type, y.data(), c.n, false);
        want = dot_fp64(c.t, xq, tr->vec_dot_type, yq, c.n, &abs_sum);
    }
    Case c{};
    const cp_cpu_type_traits *tr = nullptr;
    std::vector<float> x;
    std::vector<uint8_t> xq, yq;
    double want = 0, abs_sum = 0;
};

/* The reference sums exactly in integers inside a block and in fp32 across
 * blocks (one rounding per block plus ~3 for the scale products): at most
 * (n/bs + 3) * 2^-24 * abs_sum; with n/bs <= 128 that is < 1e-5 * abs_sum. */
TEST_P(QuantVecDot, ReferenceMatchesFp64) {
    float got = NAN;
    tr->vec_dot_ref(c.n, &got, xq.data(), yq.data());
    EXPECT_NEAR(got, want, 1e-5 * abs_sum) << "abs_sum " << abs_sum;
}

/* The SIMD variant only reassociates the fp32 sums (lanes, FMA): their
 * rounding errors are a random walk ~sqrt(n/bs) * 2^-24 * |partial sums|,
 * far below 1e-6 * abs_sum for these sizes (measured worst over 200 random
 * rows of 4096: 4e-8). The K-quant variants reduce each super-block's
 * integer sum exactly and then repeat the reference's fp32 steps, so they
 * must be bit-identical. */
bool is_k_quant(cp_dtype t) {
    return t == CP_DTYPE_Q2_K || t == CP_DTYPE_Q3_K || t == CP_DTYPE_Q4_K || t == CP_DTYPE_Q5_K ||
           t == CP_DTYPE_Q6_K;
}
TEST_P(QuantVecDot, FastMatchesReference) {
    if (!have_simd()) GTEST_SKIP() << "no SIMD level on this CPU";
    float ref = NAN, fast = NAN;
    tr->vec_dot_ref(c.n, &ref, xq.data(), yq.data());
    tr->vec_dot(c.n, &fast, xq.data(), yq.data());
    EXPECT_NEAR(fast, ref, 1e-6 * abs_sum) << "abs_sum " << abs_sum;
    if (is_k_quant(c.t)) {
        EXPECT_EQ(fbits(fast), fbits(ref));
    }
    /* and with activations from the fast quantizer (identical bits) */
    const auto y = gaussian(c.n, 200 + (uint32_t)c.n);
    const auto yf = quantize(tr->vec_dot_type, y.data(), c.n, true);
    float fast2 = NAN;
    tr->vec_dot(c.n, &fast2, xq.data(), yf.data());
    EXPECT_NEAR(fast2, ref, 1e-6 * abs_sum);
}

INSTANTIATE_TEST_SUITE_P(Types, QuantVecDot,
                         testing::ValuesIn(cases_for({CP_DTYPE_F32, CP_DTYPE_F16, CP_DTYPE_BF16,
                                                      CP_DTYPE_Q4_0, CP_DTYPE_Q4_1, CP_DTYPE_Q5_0,
                                                      CP_DTYPE_Q5_1, CP_DTYPE_Q8_0, CP_DTYPE_Q4_K,
                                                      CP_DTYPE_Q5_K, CP_DTYPE_Q6_K})),
                         case_name);

/* Extreme quants (all 4-bit codes 0 / 15, Q8 at +-127) exercise the
 * saturating paths of the SIMD integer dots. */
TEST(QuantVecDotExtremes, FastMatchesReferenceOnSaturatedBlocks) {
    if (!have_simd()) GTEST_SKIP() << "no SIMD level on this CPU";
    const int64_t n = 1024;
    std::vector<float> x((size_t)n), y((size_t)n);
    for (int64_t i = 0; i < n; i++) {
        x[i] = (i / 7) % 2 ? 1.0f : -1.0f;
        y[i] = (i / 3) % 2 ? 1.0f : -1.0f;
    }
    for (cp_dtype t : {CP_DTYPE_Q4_0, CP_DTYPE_Q4_1, CP_DTYPE_Q5_0, CP_DTYPE_Q5_1, CP_DTYPE_Q8_0,
                       CP_DTYPE_Q4_K, CP_DTYPE_Q5_K, CP_DTYPE_Q6_K}) {
        SCOPED_TRACE(cp_dtype_name(t));
        const cp_cpu_type_traits *tr = traits_of(t);
        const auto xq = quantize(t, x.data(), n, false),
                   yq = quantize(tr->vec_dot_type, y.data(), n, false);
        double abs_sum = 0;
        const double want = dot_fp64(t, xq, tr->vec_dot_type, yq, n, &abs_sum);
        float ref = NAN, fast = NAN;
        tr->vec_dot_ref(n, &ref, xq.data(), yq.data());
        tr->vec_dot(n, &fast, xq.data(), yq.data());
        EXPECT_NEAR(ref, want, 1e-5 * abs_sum);
        EXPECT_NEAR(fast, ref, 1e-6 * abs_sum);
    }
}

/* Weights of random bytes: every bit pattern of the quants and scale codes
 * (Q8_0's -128, 6-bit scales up to 63, negative Q6_K scales...), with the
 * fp16 scale fields set to finite values of either sign. */
std::vector<uint8_t> random_blocks(cp_dtype t, int64_t n, uint32_t seed) {
    std::vector<int> f16; /* byte offsets of the fp16 fields in a block */
    switch (t) {
    case CP_DTYPE_Q4_1:
    case CP_DTYPE_Q5_1:
    case CP_DTYPE_Q4_K:
    case CP_DTYPE_Q5_K: f16 = {0, 2}; break;
    case CP_DTYPE_Q2_K: f16 = {80, 82}; break;
    case CP_DTYPE_Q3_K: f16 = {108}; break;
    case CP_DTYPE_Q6_K: f16 = {208}; break;
    default: f16 = {0}; break;
    }
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(0.01f, 1.0f);
    std::vector<uint8_t> b(cp_dtype_row_size(t, n));
    for (auto &v : b)
        v = (uint8_t)rng();
    const size_t ts = cp_dtype_type_size(t);
    for (size_t blk = 0; blk < b.size() / ts; blk++) {
        for (int off : f16) {
            const cp_fp16_t h = cp_fp32_to_fp16(u(rng) * ((rng() & 1) ? -1.0f : 1.0f));
            std::memcpy(b.data() + blk * ts + off, &h, 2);
        }
    }
    return b;
}

class QuantVecDotRandomBlocks : public testing::TestWithParam<Case> {};

TEST_P(QuantVecDotRandomBlocks, ReferenceAndFast) {
    const Case c = GetParam();
    const cp_cpu_type_traits *tr = traits_of(c.t);
    ASSERT_NE(tr->vec_dot_ref, nullptr);
    const auto xq = random_blocks(c.t, c.n, 400 + (uint32_t)c.n);
    const auto y = gaussian(c.n, 500 + (uint32_t)c.n);
    const auto yq = quantize(tr->vec_dot_type, y.data(), c.n, false);
    double abs_sum = 0;
    const double want = dot_fp64(c.t, xq, tr->vec_dot_type, yq, c.n, &abs_sum);
    float ref = NAN, fast = NAN;
    tr->vec_dot_ref(c.n, &ref, xq.data(), yq.data());
    EXPECT_NEAR(ref, want, 1e-5 * abs_sum); /* tolerances as in QuantVecDot */
    if (!have_simd()) return;
    tr->vec_dot(c.n, &fast, xq.data(), yq.data());
    EXPECT_NEAR(fast, ref, 1e-6 * abs_sum);
    if (is_k_quant(c.t)) {
        EXPECT_EQ(fbits(fast), fbits(ref));
    }
}

INSTANTIATE_TEST_SUITE_P(Types, QuantVecDotRandomBlocks,
                         testing::ValuesIn(cases_for({CP_DTYPE_Q4_0, CP_DTYPE_Q4_1, CP_DTYPE_Q5_0,
                                                      CP_DTYPE_Q5_1, CP_DTYPE_Q8_0, CP_DTYPE_Q2_K,
                                                      CP_DTYPE_Q3_K, CP_DTYPE_Q4_K, CP_DTYPE_Q5_K,
                                                      CP_DTYPE_Q6_K})),
                         case_name);

/* ---- activation quantizers: fast == reference, bit for bit -------------- */

class QuantActivationFast : public testing::TestWithParam<Case> {};

void expect_same_bytes(cp_dtype t, const std::vector<float> &x) {
    const int64_t n = (int64_t)x.size();
    const auto r = quantize(t, x.data(), n, false), f = quantize(t, x.data(), n, true);
    ASSERT_EQ(r.size(), f.size());
    const size_t ts = cp_dtype_type_size(t);
    for (size_t i = 0; i < r.size(); i++)
        ASSERT_EQ(r[i], f[i]) << "block " << i / ts << " byte " << i % ts;
}

TEST_P(QuantActivationFast, BitExact) {
    if (!have_simd()) GTEST_SKIP() << "no SIMD level on this CPU";
    const Case c = GetParam();
    expect_same_bytes(c.t, gaussian(c.n, 300 + (uint32_t)c.n, 3.0f));
    /* exact ties: amax = 127 makes d = 1, so k + 0.5 sits halfway (Q8_0/Q8_1
     * round half away from zero); Q8_K with max = -127 has iscale = 1 and
     * rounds ties to even */
    std::vector<float> t((size_t)c.n);
    for (int64_t i = 0; i < c.n; i++)
        t[i] = (float)((int)(i % 250) - 125) + 0.5f;
    for (int64_t i = 0; i < c.n; i += cp_dtype_block_size(c.t))
        t[i] = c.t == CP_DTYPE_Q8_K ? -127.0f : 127.0f;
    expect_same_bytes(c.t, t);
    /* zero and tiny rows */
    expect_same_bytes(c.t, std::vector<float>((size_t)c.n, 0.0f));
    expect_same_bytes(c.t, gaussian(c.n, 301, 1e-30f));
    expect_same_bytes(c.t, gaussian(c.n, 302, 1e-40f)); /* subnormal: 1/d would overflow */
}

INSTANTIATE_TEST_SUITE_P(
    Types, QuantActivationFast,
    testing::ValuesIn(cases_for({CP_DTYPE_Q8_0, CP_DTYPE_Q8_1, CP_DTYPE_Q8_K})), case_name);

TEST(QuantActivation, TiesRoundAsSpecified) {
    /* Q8_0: amax 127 -> d = 1; 2.5 -> 3, -2.5 -> -3 (half away from zero) */
    std::vector<float> x(32, 0.0f);
    x[0] = 127.0f;
    x[1] = 2.5f;
    x[2] = -2.5f;
    x[3] = 0.49999997f;
    const auto q = quantize(CP_DTYPE_Q8_0, x.data(), 32, false);
    const cp_block_q8_0 *b = (const cp_block_q8_0 *)q.data();
    EXPECT_EQ(cp_fp16_to_fp32(b->d), 1.0f);
    EXPECT_EQ(b->qs[0], 127);
    EXPECT_EQ(b->qs[1], 3);
    EXPECT_EQ(b->qs[2], -3);
    EXPECT_EQ(b->qs[3], 0);
    /* Q8_K: max = -127 -> iscale = 1; 2.5 -> 2, -3.5 -> -4 (ties to even) */
    std::vector<float> k(256, 0.0f);
    k[0] = -127.0f;
    k[1] = 2.5f;
    k[2] = -3.5f;
    k[3] = 126.5f;
    const auto qk = quantize(CP_DTYPE_Q8_K, k.data(), 256, false);
    const cp_block_q8_K *bk = (const cp_block_q8_K *)qk.data();
    EXPECT_EQ(bk->d, 1.0f);
    EXPECT_EQ(bk->qs[0], -127);
    EXPECT_EQ(bk->qs[1], 2);
    EXPECT_EQ(bk->qs[2], -4);
    EXPECT_EQ(bk->qs[3], 126);
    EXPECT_EQ(bk->bsums[0], -127 + 2 - 4 + 126);
    /* all-zero: d = 0, q = 0 */
    const auto qz = quantize(CP_DTYPE_Q8_K, std::vector<float>(256, 0.0f).data(), 256, false);
    const cp_block_q8_K *bz = (const cp_block_q8_K *)qz.data();
    EXPECT_EQ(bz->d, 0.0f);
    for (int i = 0; i < 256; i++)
        ASSERT_EQ(bz->qs[i], 0);
}

/* ---- traits and dispatch ------------------------------------------------ */

TEST(QuantTraits, PairsAndSlots) {
    struct P {
        cp_dtype t, vdt;
        bool weight;
    };
    const P p[] = {
        {CP_DTYPE_F32, CP_DTYPE_F32, true},    {CP_DTYPE_F16, CP_DTYPE_F16, true},
        {CP_DTYPE_BF16, CP_DTYPE_BF16, true},  {CP_DTYPE_Q4_0, CP_DTYPE_Q8_0, true},
        {CP_DTYPE_Q4_1, CP_DTYPE_Q8_1, true},  {CP_DTYPE_Q5_0, CP_DTYPE_Q8_0, true},
        {CP_DTYPE_Q5_1, CP_DTYPE_Q8_1, true},  {CP_DTYPE_Q8_0, CP_DTYPE_Q8_0, true},
        {CP_DTYPE_Q4_K, CP_DTYPE_Q8_K, true},  {CP_DTYPE_Q5_K, CP_DTYPE_Q8_K, true},
        {CP_DTYPE_Q6_K, CP_DTYPE_Q8_K, true},  {CP_DTYPE_Q8_1, CP_DTYPE_Q8_1, false},
        {CP_DTYPE_Q8_K, CP_DTYPE_Q8_K, false},
    };
    for (const P &e : p) {
        SCOPED_TRACE(cp_dtype_name(e.t));
        const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(e.t);
        ASSERT_NE(tr, nullptr);
        EXPECT_EQ(tr->type, e.t);
        EXPECT_EQ(tr->vec_dot_type, e.vdt);
        EXPECT_NE(tr->from_float_ref, nullptr);
        EXPECT_NE(tr->from_float, nullptr);
        EXPECT_EQ(tr->to_float != nullptr, e.weight);
        EXPECT_EQ(tr->vec_dot_ref != nullptr, e.weight);
        EXPECT_EQ(tr->vec_dot != nullptr, e.weight);
    }
    /* decode and dot products, no quantizer yet */
    for (cp_dtype t : {CP_DTYPE_Q2_K, CP_DTYPE_Q3_K}) {
        const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
        ASSERT_NE(tr, nullptr);
        EXPECT_EQ(tr->vec_dot_type, CP_DTYPE_Q8_K);
        EXPECT_NE(tr->to_float, nullptr);
        EXPECT_NE(tr->vec_dot_ref, nullptr);
        EXPECT_NE(tr->vec_dot, nullptr);
        EXPECT_EQ(tr->from_float_ref, nullptr);
    }
    EXPECT_EQ(cp_cpu_get_type_traits(CP_DTYPE_I32), nullptr);
    const std::string lvl = cp_cpu_simd_level();
    EXPECT_TRUE(lvl == "scalar" || lvl == "avx2" || lvl == "avx512") << lvl;
}

/* CP_CPU_FORCE_REF=1 must put the references in the fast slots. The choice
 * is made once per process, so this runs in a freshly started child. */
TEST(QuantTraits, ForceRefEnvironment) {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_EXIT(
        {
            setenv("CP_CPU_FORCE_REF", "1", 1);
            bool ok = std::string(cp_cpu_simd_level()) == "scalar";
            for (cp_dtype t : {CP_DTYPE_F32, CP_DTYPE_Q4_0, CP_DTYPE_Q4_1, CP_DTYPE_Q8_0,
                               CP_DTYPE_Q4_K, CP_DTYPE_Q6_K, CP_DTYPE_Q8_K}) {
                const cp_cpu_type_traits *tr = cp_cpu_get_type_traits(t);
                ok = ok && tr->vec_dot == tr->vec_dot_ref && tr->from_float == tr->from_float_ref &&
                     !tr->vec_dot2 && !tr->vec_dot22;
            }
            std::exit(ok ? 0 : 1);
        },
        testing::ExitedWithCode(0), "");
}

} // namespace

// The 2 x 2 kernels (two weight rows x two activation rows, prompt
// batches) must give exactly the one-row kernel's result for each of the
// four pairs: a prompt's logits then do not depend on how it is batched.
TEST(VecDot22, BitIdenticalToOneRow) {
    std::mt19937 rng(78);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int checked = 0;
    for (int t = 0; t < CP_DTYPE_COUNT; t++) {
        const cp_cpu_type_traits *tr = cp_cpu_get_type_traits((cp_dtype)t);
        if (!tr || !tr->vec_dot22) continue;
        const cp_cpu_type_traits *yt = cp_cpu_get_type_traits(tr->vec_dot_type);
        for (int64_t n : {32, 37, 64, 96, 256, 576, 768, 4096, 4096 + 32, 4096 + 45}) {
            if (n % cp_dtype_block_size((cp_dtype)t) != 0) continue;
            std::vector<float> a(n), b(n), c(n), d(n);
            for (auto *v : {&a, &b, &c, &d})
                for (auto &x : *v) x = nd(rng) * 3.0f;
            std::vector<uint8_t> x0(cp_dtype_row_size((cp_dtype)t, n)), x1(x0.size());
            std::vector<uint8_t> y0(cp_dtype_row_size(tr->vec_dot_type, n)), y1(y0.size());
            tr->from_float(a.data(), x0.data(), n);
            tr->from_float(b.data(), x1.data(), n);
            yt->from_float(c.data(), y0.data(), n);
            yt->from_float(d.data(), y1.data(), n);
            float s4[4], want[4];
            tr->vec_dot22(n, s4, x0.data(), x1.data(), y0.data(), y1.data());
            tr->vec_dot(n, &want[0], x0.data(), y0.data());
            tr->vec_dot(n, &want[1], x1.data(), y0.data());
            tr->vec_dot(n, &want[2], x0.data(), y1.data());
            tr->vec_dot(n, &want[3], x1.data(), y1.data());
            for (int q = 0; q < 4; q++) EXPECT_EQ(s4[q], want[q]) << cp_dtype_name((cp_dtype)t) << " n=" << n << " " << q;
            checked++;
        }
    }
    if (!cp_cpu_has_avx2()) GTEST_SKIP() << "no 2 x 2 kernels without AVX2";
    EXPECT_EQ(checked, 4 * 8 + 2 * 3 + 2) << "Q8_0, Q4_0, Q4_1 and F8_ROW at 8 lengths (and F8_ROW at 2 more), "
                                             "Q4_K and Q6_K at 3";
}

// The two-row kernels must give exactly the one-row kernel's result for
// each row (the matmul relies on it for thread-count independence).
TEST(VecDot2, BitIdenticalToOneRow) {
    std::mt19937 rng(77);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int checked = 0;
    for (int t = 0; t < CP_DTYPE_COUNT; t++) {
        const cp_cpu_type_traits *tr = cp_cpu_get_type_traits((cp_dtype)t);
        if (!tr || !tr->vec_dot2) continue;
        const cp_cpu_type_traits *yt = cp_cpu_get_type_traits(tr->vec_dot_type);
        for (int64_t n : {32, 37, 64, 96, 576, 4096 + 32, 4096 + 45}) {
            if (n % cp_dtype_block_size((cp_dtype)t) != 0) continue;
            std::vector<float> a(n), b(n), c(n);
            for (auto *v : {&a, &b, &c})
                for (auto &x : *v) x = nd(rng);
            std::vector<uint8_t> x0(cp_dtype_row_size((cp_dtype)t, n)), x1(x0.size());
            std::vector<uint8_t> y(cp_dtype_row_size(tr->vec_dot_type, n));
            tr->from_float(a.data(), x0.data(), n);
            tr->from_float(b.data(), x1.data(), n);
            yt->from_float(c.data(), y.data(), n);
            float s2[2], s0, s1;
            tr->vec_dot2(n, s2, x0.data(), x1.data(), y.data());
            tr->vec_dot(n, &s0, x0.data(), y.data());
            tr->vec_dot(n, &s1, x1.data(), y.data());
            EXPECT_EQ(s2[0], s0) << cp_dtype_name((cp_dtype)t) << " n=" << n;
            EXPECT_EQ(s2[1], s1) << cp_dtype_name((cp_dtype)t) << " n=" << n;
            checked++;
        }
    }
    if (!cp_cpu_has_avx2()) GTEST_SKIP() << "no two-row kernels without AVX2";
    EXPECT_GT(checked, 0);
}
