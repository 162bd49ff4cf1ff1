// test_comm.cc - the communicator. The same binary runs on every rank (under
// mpirun with --comm=mpi, or alone): each collective of the world
// communicator against values computed here on the host, for odd counts,
// every dtype and op, in and out of place; uneven all-gatherv; split grids;
// send/recv rings; bit-identical results on every rank; deadlines; and the
// single-rank backend. A failure on any rank fails the test on rank 0.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cp_comm.h"

#ifdef CP_HAVE_NCCL
#include <cuda_runtime.h>
#endif

namespace {

cp_comm_t g_world = nullptr;
int g_rank = 0, g_size = 1;
const int kTestTimeoutMs = 30000; // a hang in a broken collective fails instead of blocking ctest

struct CommDeleter {
    void operator()(cp_comm *c) const { cp_comm_free(c); }
};
using CommPtr = std::unique_ptr<cp_comm, CommDeleter>;

bool world_is_mpi() {
    return std::string(cp_comm_kind_name(g_world)) == "mpi";
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Every test syncs its verdict: a rank that passed learns about the ranks
// that failed, so rank 0's report lists every failure.
class Comm : public ::testing::Test {
  protected:
    void TearDown() override {
        int32_t mine = HasFailure() ? 1 : 0;
        std::vector<int32_t> all((size_t)g_size, 0);
        cp_status st = cp_comm_allgather(g_world, &mine, all.data(), 1, CP_DTYPE_I32, nullptr);
        ASSERT_EQ(st, CP_OK) << "syncing test results: " << cp_last_error();
        std::string bad;
        for (int r = 0; r < g_size; r++)
            if (all[(size_t)r] && r != g_rank) bad += " " + std::to_string(r);
        if (!bad.empty()) ADD_FAILURE() << "this test failed on rank(s)" << bad;
    }
};

// ---- inputs and host references -------------------------------------------

uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
uint64_t hash3(uint32_t seed, int rank, size_t i) {
    return mix64(((uint64_t)seed << 48) ^ ((uint64_t)(uint32_t)rank << 36) ^ (uint64_t)i);
}

size_t esize(cp_dtype dt) {
    return cp_dtype_type_size(dt);
}

// Values whose sums over up to 8 ranks are exact in the type itself (and so
// independent of the summation order): multiples of 1/8 with |v| <= 64 for
// F32/F64 (sums need <= 13 bits), |v| <= 32 for F16 (sum <= 256 in steps of
// 1/8: 11 significant bits), integers |v| <= 16 for BF16 (8 bits). Integer
// types use the full range: their sums wrap, checked with unsigned math.
double exact_float(cp_dtype dt, uint64_t h) {
    switch (dt) {
    case CP_DTYPE_F16: return ((int)(h % 513) - 256) / 8.0;
    case CP_DTYPE_BF16: return (double)((int)(h % 33) - 16);
    default: return ((int)(h % 1025) - 512) / 8.0;
    }
}

void store_float(void *buf, size_t i, cp_dtype dt, double v) {
    switch (dt) {
    case CP_DTYPE_F32: ((float *)buf)[i] = (float)v; break;
    case CP_DTYPE_F64: ((double *)buf)[i] = v; break;
    case CP_DTYPE_F16: ((uint16_t *)buf)[i] = cp_fp32_to_fp16((float)v); break;
    case CP_DTYPE_BF16: ((uint16_t *)buf)[i] = cp_fp32_to_bf16((float)v); break;
    default: FAIL() << "not a float type";
    }
}

double load(const void *buf, size_t i, cp_dtype dt) {
    switch (dt) {
    case CP_DTYPE_F32: return ((const float *)buf)[i];
    case CP_DTYPE_F64: return ((const double *)buf)[i];
    case CP_DTYPE_F16: return cp_fp16_to_fp32(((const uint16_t *)buf)[i]);
    case CP_DTYPE_BF16: return cp_bf16_to_fp32(((const uint16_t *)buf)[i]);
    case CP_DTYPE_I8: return ((const int8_t *)buf)[i];
    case CP_DTYPE_I32: return ((const int32_t *)buf)[i];
    case CP_DTYPE_I64: return (double)((const int64_t *)buf)[i];
    default: return NAN;
    }
}

// Rank `rank`'s exact-valued input of `count` elements.
std::vector<uint8_t> exact_input(cp_dtype dt, uint32_t seed, int rank, size_t count) {
    std::vector<uint8_t> v(count * esize(dt) + 1);
    for (size_t i = 0; i < count; i++) {
        uint64_t h = hash3(seed, rank, i);
        if (dt == CP_DTYPE_I32)
            ((int32_t *)v.data())[i] = (int32_t)(uint32_t)h;
        else if (dt == CP_DTYPE_I64)
            ((int64_t *)v.data())[i] = (int64_t)h;
        else if (dt == CP_DTYPE_I8)
            ((int8_t *)v.data())[i] = (int8_t)(uint8_t)h;
        else
            store_float(v.data(), i, dt, exact_float(dt, h));
    }
    v.resize(count * esize(dt));
    return v;
}

// The reduction over ranks 0..n-1 of exact_input, computed on the host.
std::vector<uint8_t> expected_reduce(cp_dtype dt, cp_reduce_op op, uint32_t seed, int n,
                                     size_t count) {
    std::vector<std::vector<uint8_t>> in;
    for (int r = 0; r < n; r++)
        in.push_back(exact_input(dt, seed, r, count));
    std::vector<uint8_t> out(count * esize(dt));
    for (size_t i = 0; i < count; i++) {
        if (dt == CP_DTYPE_I32 || dt == CP_DTYPE_I64) {
            uint64_t usum = 0;
            int64_t mx = INT64_MIN, mn = INT64_MAX;
            for (int r = 0; r < n; r++) {
                int64_t x = dt == CP_DTYPE_I32 ? ((const int32_t *)in[(size_t)r].data())[i]
                                               : ((const int64_t *)in[(size_t)r].data())[i];
                usum += (uint64_t)x;
                mx = std::max(mx, x);
                mn = std::min(mn, x);
            }
            int64_t res = op == CP_REDUCE_SUM ? (int64_t)usum : (op == CP_REDUCE_MAX ? mx : mn);
            if (dt == CP_DTYPE_I32)
                ((int32_t *)out.data())[i] = (int32_t)(uint32_t)(uint64_t)res;
            else
                ((int64_t *)out.data())[i] = res;
        } else {
            double s = 0, mx = -INFINITY, mn = INFINITY;
            for (int r = 0; r < n; r++) {
                double x = load(in[(size_t)r].data(), i, dt);
                s += x; // exact by construction of the inputs
                mx = std::max(mx, x);
                mn = std::min(mn, x);
            }
            store_float(out.data(), i, dt,
                        op == CP_REDUCE_SUM ? s : (op == CP_REDUCE_MAX ? mx : mn));
        }
    }
    return out;
}

::testing::AssertionResult same_bytes(const void *got, const void *want, size_t count,
                                      cp_dtype dt) {
    size_t es = esize(dt), bad = 0, first = SIZE_MAX;
    for (size_t i = 0; i < count; i++)
        if (memcmp((const char *)got + i * es, (const char *)want + i * es, es) != 0) {
            if (first == SIZE_MAX) first = i;
            bad++;
        }
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << bad << " of " << count << " elements differ; first at " << first << ": got "
           << load(got, first, dt) << ", want " << load(want, first, dt);
}

// Every rank must hold the same bytes: gather everyone's copy and compare.
::testing::AssertionResult same_on_all_ranks(const void *buf, size_t bytes) {
    std::vector<uint8_t> all(bytes * (size_t)g_size + 1);
    cp_status st = cp_comm_allgather(g_world, buf, all.data(), bytes, CP_DTYPE_I8, nullptr);
    if (st != CP_OK) return ::testing::AssertionFailure() << cp_last_error();
    for (int r = 0; r < g_size; r++)
        if (memcmp(all.data() + (size_t)r * bytes, buf, bytes) != 0)
            return ::testing::AssertionFailure() << "rank " << r << " holds different bits";
    return ::testing::AssertionSuccess();
}

const char *op_name(cp_reduce_op op) {
    return op == CP_REDUCE_SUM ? "sum" : (op == CP_REDUCE_MAX ? "max" : "min");
}

// ---- world information ----------------------------------------------------

TEST_F(Comm, WorldInfo) {
    EXPECT_GE(g_size, 1);
    EXPECT_GE(g_rank, 0);
    EXPECT_LT(g_rank, g_size);
    EXPECT_GE(cp_comm_local_rank(g_world), 0);
    EXPECT_LT(cp_comm_local_rank(g_world), cp_comm_local_size(g_world));
    EXPECT_LE(cp_comm_local_size(g_world), g_size);
    EXPECT_EQ(cp_comm_get_timeout(g_world), kTestTimeoutMs);
    if (const char *s = getenv("OMPI_COMM_WORLD_SIZE")) {
        if (world_is_mpi()) {
            EXPECT_EQ(g_size, atoi(s));
            EXPECT_EQ(g_rank, atoi(getenv("OMPI_COMM_WORLD_RANK")));
            EXPECT_EQ(cp_comm_local_rank(g_world), atoi(getenv("OMPI_COMM_WORLD_LOCAL_RANK")));
            EXPECT_EQ(cp_comm_local_size(g_world), atoi(getenv("OMPI_COMM_WORLD_LOCAL_SIZE")));
        }
    }
    // every rank reports its rank: the gathered list must be 0..size-1
    int32_t me = g_rank;
    std::vector<int32_t> all((size_t)g_size, -1);
    ASSERT_EQ(cp_comm_allgather(g_world, &me, all.data(), 1, CP_DTYPE_I32, nullptr), CP_OK)
        << cp_last_error();
    for (int r = 0; r < g_size; r++)
        EXPECT_EQ(all[(size_t)r], r);
}

// AUTO picks MPI for a multi-rank launch and SELF for one rank.
TEST_F(Comm, AutoKind) {
    cp_comm_t c = nullptr;
    ASSERT_EQ(cp_comm_init_world(CP_COMM_AUTO, CP_COMM_TIMEOUT_DEFAULT, &c), CP_OK)
        << cp_last_error();
    CommPtr guard(c);
    EXPECT_EQ(cp_comm_get_timeout(c), CP_COMM_TIMEOUT_DEFAULT_MS);
    if (world_is_mpi() && g_size > 1) {
        EXPECT_STREQ(cp_comm_kind_name(c), "mpi");
        EXPECT_EQ(cp_comm_size(c), g_size);
        EXPECT_EQ(cp_comm_rank(c), g_rank);
        int32_t x = 1, sum = 0;
        ASSERT_EQ(cp_comm_allreduce(c, &x, &sum, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_OK);
        EXPECT_EQ(sum, g_size);
    } else {
        EXPECT_STREQ(cp_comm_kind_name(c), "self");
        EXPECT_EQ(cp_comm_size(c), 1);
    }
}

// ---- all-reduce -------------------------------------------------------------

using ReduceParam = std::tuple<cp_dtype, cp_reduce_op, size_t, bool>;
const cp_dtype kReduceTypes[] = {CP_DTYPE_F32, CP_DTYPE_F16, CP_DTYPE_BF16,
                                 CP_DTYPE_I32, CP_DTYPE_I64, CP_DTYPE_F64};
const size_t kCounts[] = {1, 3, 1001, 65537}; // 1001 uses recursive doubling, 65537 the ring

std::string reduce_name(const ::testing::TestParamInfo<ReduceParam> &info) {
    return std::string(cp_dtype_name(std::get<0>(info.param))) + "_" +
           op_name(std::get<1>(info.param)) + "_" + std::to_string(std::get<2>(info.param)) +
           (std::get<3>(info.param) ? "_inplace" : "");
}

class AllReduce : public Comm, public ::testing::WithParamInterface<ReduceParam> {};

TEST_P(AllReduce, MatchesHostReference) {
    auto [dt, op, count, inplace] = GetParam();
    uint32_t seed = 11 + (uint32_t)count;
    std::vector<uint8_t> send = exact_input(dt, seed, g_rank, count);
    std::vector<uint8_t> want = expected_reduce(dt, op, seed, g_size, count);
    std::vector<uint8_t> recv(send.size(), 0xA5); // poisoned
    cp_status st;
    if (inplace) {
        recv = send;
        st = cp_comm_allreduce(g_world, recv.data(), recv.data(), count, dt, op, nullptr);
    } else {
        st = cp_comm_allreduce(g_world, send.data(), recv.data(), count, dt, op, nullptr);
        EXPECT_EQ(send, exact_input(dt, seed, g_rank, count)) << "send buffer was modified";
    }
    ASSERT_EQ(st, CP_OK) << cp_last_error();
    EXPECT_TRUE(same_bytes(recv.data(), want.data(), count, dt));
}

INSTANTIATE_TEST_SUITE_P(All, AllReduce,
                         ::testing::Combine(::testing::ValuesIn(kReduceTypes),
                                            ::testing::Values(CP_REDUCE_SUM, CP_REDUCE_MAX,
                                                              CP_REDUCE_MIN),
                                            ::testing::ValuesIn(kCounts), ::testing::Bool()),
                         reduce_name);

// Inexact sums of random values: the result must be within the error bound
// of some summation order, identical on every rank and across repeated
// calls. F16/BF16 must be accumulated in fp32 and rounded once.
class AllReduceRandom : public Comm,
                        public ::testing::WithParamInterface<std::tuple<cp_dtype, size_t>> {};

TEST_P(AllReduceRandom, SumWithinBoundAndBitIdentical) {
    auto [dt, count] = GetParam();
    const int n = g_size;
    auto value = [&](int r, size_t i) { // uniform in [-1, 1), rounded to dt
        double u = (double)(hash3(77, r, i) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
        std::vector<uint8_t> tmp(8);
        store_float(tmp.data(), 0, dt, u);
        return load(tmp.data(), 0, dt);
    };
    std::vector<uint8_t> send(count * esize(dt)), recv(send.size()), again(send.size());
    for (size_t i = 0; i < count; i++)
        store_float(send.data(), i, dt, value(g_rank, i));
    ASSERT_EQ(
        cp_comm_allreduce(g_world, send.data(), recv.data(), count, dt, CP_REDUCE_SUM, nullptr),
        CP_OK)
        << cp_last_error();
    ASSERT_EQ(
        cp_comm_allreduce(g_world, send.data(), again.data(), count, dt, CP_REDUCE_SUM, nullptr),
        CP_OK)
        << cp_last_error();
    EXPECT_EQ(recv, again) << "two identical all-reduces gave different bits";
    EXPECT_TRUE(same_on_all_ranks(recv.data(), recv.size()));

    // Recursive summation of n terms in a type with unit roundoff u errs by
    // at most (n-1) u sum|x| (+O(u^2)); accumulating in fp32 (u = 2^-24) and
    // rounding once to F16/BF16 adds half an ulp of the result, u_t |ref|
    // (u_t = 2^-11, 2^-8), plus 2^-25 absolute for F16 subnormals. F16
    // accumulation would err by up to (n-1) 2^-11 sum|x| and fails this.
    double u_acc = dt == CP_DTYPE_F64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
    double u_out = dt == CP_DTYPE_F16    ? std::ldexp(1.0, -11)
                   : dt == CP_DTYPE_BF16 ? std::ldexp(1.0, -8)
                                         : 0.0;
    size_t bad = 0, first = SIZE_MAX;
    double worst = 0;
    for (size_t i = 0; i < count; i++) {
        double ref = 0, mag = 0;
        for (int r = 0; r < n; r++) {
            ref += value(r, i);
            mag += std::fabs(value(r, i));
        }
        double tol = 1.01 * (n - 1) * u_acc * mag + u_out * std::fabs(ref) + std::ldexp(1.0, -25);
        double err = std::fabs(load(recv.data(), i, dt) - ref);
        worst = std::max(worst, err / tol);
        if (err > tol) {
            if (first == SIZE_MAX) first = i;
            bad++;
        }
    }
    EXPECT_EQ(bad, 0u) << "first bad element " << first << ", worst error/tolerance " << worst;
}

INSTANTIATE_TEST_SUITE_P(All, AllReduceRandom,
                         ::testing::Combine(::testing::Values(CP_DTYPE_F32, CP_DTYPE_F16,
                                                              CP_DTYPE_BF16, CP_DTYPE_F64),
                                            ::testing::Values((size_t)1001, (size_t)65537)),
                         [](const auto &info) {
                             return std::string(cp_dtype_name(std::get<0>(info.param))) + "_" +
                                    std::to_string(std::get<1>(info.param));
                         });

// 16 MB, the size of a large tensor-parallel activation.
TEST_F(Comm, AllReduceLarge) {
    const size_t count = ((size_t)1 << 22) + 3;
    std::vector<int32_t> send(count), recv(count, -1);
    for (size_t i = 0; i < count; i++)
        send[i] = (int32_t)(i % 1000) * (g_rank + 1);
    ASSERT_EQ(cp_comm_allreduce(g_world, send.data(), recv.data(), count, CP_DTYPE_I32,
                                CP_REDUCE_SUM, nullptr),
              CP_OK)
        << cp_last_error();
    int64_t tri = (int64_t)g_size * (g_size + 1) / 2;
    size_t bad = 0;
    for (size_t i = 0; i < count; i++)
        bad += recv[i] != (int32_t)((int64_t)(i % 1000) * tri);
    EXPECT_EQ(bad, 0u);
}

TEST_F(Comm, ZeroCountIsANoOp) {
    EXPECT_EQ(cp_comm_allreduce(g_world, nullptr, nullptr, 0, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
              CP_OK)
        << cp_last_error();
    EXPECT_EQ(cp_comm_bcast(g_world, nullptr, 0, CP_DTYPE_F32, 0, nullptr), CP_OK);
    EXPECT_EQ(cp_comm_allgather(g_world, nullptr, nullptr, 0, CP_DTYPE_F32, nullptr), CP_OK);
}

// ---- reduce-scatter ----------------------------------------------------------

class ReduceScatter : public Comm, public ::testing::WithParamInterface<ReduceParam> {};

TEST_P(ReduceScatter, MatchesHostReference) {
    auto [dt, op, count, inplace] = GetParam();
    const size_t total = count * (size_t)g_size, es = esize(dt);
    uint32_t seed = 23 + (uint32_t)count;
    std::vector<uint8_t> send = exact_input(dt, seed, g_rank, total);
    std::vector<uint8_t> full = expected_reduce(dt, op, seed, g_size, total);
    const uint8_t *want = full.data() + (size_t)g_rank * count * es;
    std::vector<uint8_t> recv(count * es, 0xA5);
    cp_status st;
    const uint8_t *got;
    if (inplace) { // result lands in this rank's block of the send buffer
        uint8_t *mine = send.data() + (size_t)g_rank * count * es;
        st = cp_comm_reduce_scatter(g_world, send.data(), mine, count, dt, op, nullptr);
        got = mine;
    } else {
        st = cp_comm_reduce_scatter(g_world, send.data(), recv.data(), count, dt, op, nullptr);
        got = recv.data();
    }
    ASSERT_EQ(st, CP_OK) << cp_last_error();
    EXPECT_TRUE(same_bytes(got, want, count, dt));
}

INSTANTIATE_TEST_SUITE_P(
    All, ReduceScatter,
    ::testing::Combine(::testing::ValuesIn(kReduceTypes),
                       ::testing::Values(CP_REDUCE_SUM, CP_REDUCE_MAX, CP_REDUCE_MIN),
                       ::testing::Values((size_t)1, (size_t)3, (size_t)1001, (size_t)16411),
                       ::testing::Bool()),
    reduce_name);

// ---- all-gather(v) -----------------------------------------------------------

using GatherParam = std::tuple<cp_dtype, size_t, bool>;
class AllGather : public Comm, public ::testing::WithParamInterface<GatherParam> {};

TEST_P(AllGather, ConcatenatesInRankOrder) {
    auto [dt, count, inplace] = GetParam();
    const size_t es = esize(dt);
    std::vector<uint8_t> want;
    for (int r = 0; r < g_size; r++) {
        auto v = exact_input(dt, 5, r, count);
        want.insert(want.end(), v.begin(), v.end());
    }
    std::vector<uint8_t> send = exact_input(dt, 5, g_rank, count);
    std::vector<uint8_t> recv(want.size(), 0xA5);
    const void *src = send.data();
    if (inplace) {
        memcpy(recv.data() + (size_t)g_rank * count * es, send.data(), send.size());
        src = recv.data() + (size_t)g_rank * count * es;
    }
    ASSERT_EQ(cp_comm_allgather(g_world, src, recv.data(), count, dt, nullptr), CP_OK)
        << cp_last_error();
    EXPECT_TRUE(same_bytes(recv.data(), want.data(), count * (size_t)g_size, dt));
}

INSTANTIATE_TEST_SUITE_P(All, AllGather,
                         ::testing::Combine(::testing::Values(CP_DTYPE_F32, CP_DTYPE_F16,
                                                              CP_DTYPE_I64, CP_DTYPE_I8),
                                            ::testing::ValuesIn(kCounts), ::testing::Bool()),
                         [](const auto &info) {
                             return std::string(cp_dtype_name(std::get<0>(info.param))) + "_" +
                                    std::to_string(std::get<1>(info.param)) +
                                    (std::get<2>(info.param) ? "_inplace" : "");
                         });

// Uneven splits (vocabulary, FFN columns): counts per rank from a pattern,
// zeros included.
class AllGatherV : public Comm, public ::testing::WithParamInterface<int> {};

TEST_P(AllGatherV, UnevenCountsIncludingZero) {
    const int pattern = GetParam();
    std::vector<size_t> counts((size_t)g_size);
    for (int r = 0; r < g_size; r++) {
        switch (pattern) {
        case 0: counts[(size_t)r] = (size_t)((r * 7 + 3) % 5); break;            // 3,0,2,4,1,...
        case 1: counts[(size_t)r] = r == g_size - 1 ? 1001 : 0; break;           // one rank only
        case 2: counts[(size_t)r] = 0; break;                                    // nothing at all
        default: counts[(size_t)r] = 32000 + (size_t)r * 977 + (r % 2 ? 0 : 13); // large, uneven
        }
    }
    const cp_dtype dt = CP_DTYPE_F32;
    size_t total = 0;
    std::vector<uint8_t> want;
    for (int r = 0; r < g_size; r++) {
        auto v = exact_input(dt, 9, r, counts[(size_t)r]);
        want.insert(want.end(), v.begin(), v.end());
        total += counts[(size_t)r];
    }
    std::vector<uint8_t> send = exact_input(dt, 9, g_rank, counts[(size_t)g_rank]);
    std::vector<uint8_t> recv(total * 4 + 4, 0xA5);
    ASSERT_EQ(cp_comm_allgatherv(g_world, send.data(), counts[(size_t)g_rank], recv.data(),
                                 counts.data(), dt, nullptr),
              CP_OK)
        << cp_last_error();
    EXPECT_TRUE(same_bytes(recv.data(), want.data(), total, dt));
    EXPECT_EQ(recv[total * 4], 0xA5) << "wrote past the end of recv";
}

INSTANTIATE_TEST_SUITE_P(All, AllGatherV, ::testing::Values(0, 1, 2, 3));

TEST_F(Comm, AllGatherVInPlace) {
    std::vector<size_t> counts((size_t)g_size);
    size_t total = 0, off = 0;
    for (int r = 0; r < g_size; r++) {
        counts[(size_t)r] = (size_t)(r % 3) * 5;
        if (r < g_rank) off += counts[(size_t)r];
        total += counts[(size_t)r];
    }
    std::vector<int64_t> recv(total + 1, -7), want;
    for (int r = 0; r < g_size; r++)
        for (size_t i = 0; i < counts[(size_t)r]; i++)
            want.push_back(r * 1000 + (int64_t)i);
    for (size_t i = 0; i < counts[(size_t)g_rank]; i++)
        recv[off + i] = g_rank * 1000 + (int64_t)i;
    ASSERT_EQ(cp_comm_allgatherv(g_world, recv.data() + off, counts[(size_t)g_rank], recv.data(),
                                 counts.data(), CP_DTYPE_I64, nullptr),
              CP_OK)
        << cp_last_error();
    recv.resize(total);
    EXPECT_EQ(recv, want);
}

// ---- broadcast -----------------------------------------------------------------

TEST_F(Comm, BcastFromEveryRoot) {
    for (cp_dtype dt : {CP_DTYPE_I8, CP_DTYPE_F32, CP_DTYPE_F64}) {
        for (size_t count : {(size_t)1, (size_t)1001, (size_t)65537}) {
            for (int root = 0; root < g_size; root++) {
                std::vector<uint8_t> want = exact_input(dt, 31 + (uint32_t)root, root, count);
                std::vector<uint8_t> buf =
                    g_rank == root ? want : std::vector<uint8_t>(want.size(), 0xA5);
                ASSERT_EQ(cp_comm_bcast(g_world, buf.data(), count, dt, root, nullptr), CP_OK)
                    << cp_last_error();
                EXPECT_TRUE(same_bytes(buf.data(), want.data(), count, dt))
                    << cp_dtype_name(dt) << " count " << count << " root " << root;
            }
        }
    }
}

// ---- point-to-point ------------------------------------------------------------

// Ring: each rank sends three messages right and receives three from the
// left, which must arrive in order. Even ranks send first so that large
// (rendezvous) messages cannot deadlock.
TEST_F(Comm, SendRecvRing) {
    if (g_size < 2) GTEST_SKIP() << "needs two ranks";
    const int right = (g_rank + 1) % g_size, left = (g_rank + g_size - 1) % g_size;
    for (size_t count : {(size_t)1, (size_t)1001, (size_t)65537}) {
        std::vector<std::vector<uint8_t>> out, in(3);
        for (uint32_t k = 0; k < 3; k++)
            out.push_back(exact_input(CP_DTYPE_F32, 40 + k, g_rank, count));
        auto do_send = [&] {
            for (auto &m : out)
                ASSERT_EQ(cp_comm_send(g_world, m.data(), count, CP_DTYPE_F32, right, nullptr),
                          CP_OK)
                    << cp_last_error();
        };
        auto do_recv = [&] {
            for (auto &m : in) {
                m.assign(count * 4, 0xA5);
                ASSERT_EQ(cp_comm_recv(g_world, m.data(), count, CP_DTYPE_F32, left, nullptr),
                          CP_OK)
                    << cp_last_error();
            }
        };
        if (g_rank % 2 == 0) {
            do_send();
            do_recv();
        } else {
            do_recv();
            do_send();
        }
        for (uint32_t k = 0; k < 3; k++)
            EXPECT_EQ(in[k], exact_input(CP_DTYPE_F32, 40 + k, left, count))
                << "message " << k << " of " << count << " elements from rank " << left;
    }
}

// Every pair exchanges once, pairs taken in one global order.
TEST_F(Comm, SendRecvAllPairs) {
    for (int a = 0; a < g_size; a++) {
        for (int b = a + 1; b < g_size; b++) {
            if (g_rank != a && g_rank != b) continue;
            int peer = g_rank == a ? b : a;
            int64_t out[2] = {g_rank * 100 + peer, -g_rank}, in[2] = {0, 0};
            if (g_rank == a) {
                ASSERT_EQ(cp_comm_send(g_world, out, 2, CP_DTYPE_I64, peer, nullptr), CP_OK);
                ASSERT_EQ(cp_comm_recv(g_world, in, 2, CP_DTYPE_I64, peer, nullptr), CP_OK);
            } else {
                ASSERT_EQ(cp_comm_recv(g_world, in, 2, CP_DTYPE_I64, peer, nullptr), CP_OK);
                ASSERT_EQ(cp_comm_send(g_world, out, 2, CP_DTYPE_I64, peer, nullptr), CP_OK);
            }
            EXPECT_EQ(in[0], peer * 100 + g_rank);
            EXPECT_EQ(in[1], -peer);
        }
    }
}

// A ring of shifts, as ring attention runs them: each step passes the
// block in hand right and takes the left neighbour's, with work between
// start and wait. After size - 1 steps every rank has seen every block,
// for odd sizes and counts, large ones (rendezvous) included.
TEST_F(Comm, SendRecvShiftsAroundTheRing) {
    const int right = (g_rank + 1) % g_size, left = (g_rank + g_size - 1) % g_size;
    for (size_t count : {(size_t)1, (size_t)1001, (size_t)300001}) {
        std::vector<uint8_t> buf[2];
        buf[0] = exact_input(CP_DTYPE_F32, 60, g_rank, count);
        buf[1].assign(count * 4, 0xA5);
        for (int step = 0; step < g_size; step++) {
            const int holder = (g_rank + g_size - step) % g_size;
            EXPECT_EQ(buf[step & 1], exact_input(CP_DTYPE_F32, 60, holder, count))
                << "step " << step << ": the block of rank " << holder << ", " << count << " elements";
            if (step + 1 == g_size) break;
            ASSERT_EQ(cp_comm_sendrecv_start(g_world, buf[step & 1].data(), right, buf[(step + 1) & 1].data(),
                                             left, count, CP_DTYPE_F32, nullptr),
                      CP_OK)
                << cp_last_error();
            // work overlapping the transfer; no call on the communicator
            volatile double acc = 0;
            for (int i = 0; i < 20000; i++) acc = acc + i * 0.5;
            ASSERT_EQ(cp_comm_sendrecv_wait(g_world, nullptr), CP_OK) << cp_last_error();
        }
    }
    cp_comm_stats st;
    cp_comm_get_stats(g_world, &st);
    EXPECT_GE(st.calls[CP_COMM_OP_SENDRECV], 3u * (uint64_t)(g_size - 1));
}

// Between start and wait the communicator takes no other call; a wait
// without a start, or a second start, is refused; this rank as its own
// peer is a copy.
TEST_F(Comm, SendRecvInFlightRules) {
    int32_t out[3] = {7, 8, 9}, in[3] = {0, 0, 0};
    EXPECT_EQ(cp_comm_sendrecv_wait(g_world, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("no sendrecv is in flight"), std::string::npos)
        << cp_last_error_detail();
    ASSERT_EQ(cp_comm_sendrecv_start(g_world, out, g_rank, in, g_rank, 3, CP_DTYPE_I32, nullptr), CP_OK)
        << cp_last_error();
    EXPECT_EQ(cp_comm_sendrecv_start(g_world, out, g_rank, in, g_rank, 3, CP_DTYPE_I32, nullptr),
              CP_ERR_INVALID_ARG);
    int32_t x = 1, y = 0;
    EXPECT_EQ(cp_comm_allreduce(g_world, &x, &y, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("a sendrecv is in flight"), std::string::npos)
        << cp_last_error_detail();
    ASSERT_EQ(cp_comm_sendrecv_wait(g_world, nullptr), CP_OK) << cp_last_error();
    EXPECT_EQ(in[0], 7);
    EXPECT_EQ(in[2], 9);
    EXPECT_EQ(cp_comm_sendrecv_start(g_world, out, g_size, in, 0, 3, CP_DTYPE_I32, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_sendrecv_start(g_world, out, 0, nullptr, 0, 3, CP_DTYPE_I32, nullptr), CP_ERR_INVALID_ARG);
    if (g_size > 1) {
        // to itself from another rank (or the reverse) could never be matched
        const int other = (g_rank + 1) % g_size;
        EXPECT_EQ(cp_comm_sendrecv_start(g_world, out, g_rank, in, other, 3, CP_DTYPE_I32, nullptr),
                  CP_ERR_INVALID_ARG);
        EXPECT_NE(std::string(cp_last_error_detail()).find("a shift to itself must also receive from itself"),
                  std::string::npos)
            << cp_last_error_detail();
        EXPECT_EQ(cp_comm_sendrecv_start(g_world, out, other, in, g_rank, 3, CP_DTYPE_I32, nullptr),
                  CP_ERR_INVALID_ARG);
        EXPECT_NE(std::string(cp_last_error_detail()).find("a shift from itself must also send to itself"),
                  std::string::npos)
            << cp_last_error_detail();
    }
    // the communicator works as before
    ASSERT_EQ(cp_comm_allreduce(g_world, &x, &y, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_OK);
    EXPECT_EQ(y, g_size);
}

// ---- agreement ----------------------------------------------------------------

// The smallest and largest of each value over the ranks, exactly, and
// whether all ranks agree: a value that differs by rank makes them
// disagree, on every rank alike; the same values agree.
TEST_F(Comm, SameValuesOnEveryRank) {
    const int64_t v[3] = {7, (int64_t)g_rank * 5 - 2, INT64_MAX};
    int64_t lo[3], hi[3];
    bool same = true;
    ASSERT_EQ(cp_comm_same_i64(g_world, v, 3, lo, hi, &same), CP_OK) << cp_last_error();
    EXPECT_EQ(same, g_size == 1);
    EXPECT_EQ(lo[0], 7);
    EXPECT_EQ(hi[0], 7);
    EXPECT_EQ(lo[1], -2);
    EXPECT_EQ(hi[1], (int64_t)(g_size - 1) * 5 - 2);
    EXPECT_EQ(lo[2], INT64_MAX);
    EXPECT_EQ(hi[2], INT64_MAX);
    const int64_t w[2] = {-(INT64_MAX), 0};
    same = false;
    ASSERT_EQ(cp_comm_same_i64(g_world, w, 2, nullptr, nullptr, &same), CP_OK) << cp_last_error();
    EXPECT_TRUE(same);
    EXPECT_EQ(cp_comm_same_i64(g_world, w, 0, nullptr, nullptr, &same), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_same_i64(g_world, w, 17, nullptr, nullptr, &same), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_same_i64(g_world, w, 2, nullptr, nullptr, nullptr), CP_ERR_INVALID_ARG);
}

// ---- barrier ------------------------------------------------------------------

TEST_F(Comm, BarrierWaitsForTheLastRank) {
    ASSERT_EQ(cp_comm_barrier(g_world), CP_OK) << cp_last_error();
    if (g_size < 2) GTEST_SKIP() << "needs two ranks";
    const int late = g_size - 1;
    double t0 = now_ms();
    if (g_rank == late) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_EQ(cp_comm_barrier(g_world), CP_OK) << cp_last_error();
    // 300 ms minus the skew with which ranks left the previous barrier
    if (g_rank != late) {
        EXPECT_GE(now_ms() - t0, 250.0);
    }
}

// ---- split ----------------------------------------------------------------------

// A 2-wide grid: rows {0,1},{2,3},... (tensor-parallel groups) and columns
// (pipeline groups); with an odd size the last row has one rank.
TEST_F(Comm, SplitRowsAndColumns) {
    const int w = 2;
    cp_comm_t row = nullptr, col = nullptr;
    ASSERT_EQ(cp_comm_set_timeout(g_world, 12345), CP_OK);
    cp_status st1 = cp_comm_split(g_world, g_rank / w, g_rank, &row);
    cp_status st2 = cp_comm_split(g_world, g_rank % w, g_rank, &col);
    ASSERT_EQ(cp_comm_set_timeout(g_world, kTestTimeoutMs), CP_OK);
    CommPtr row_guard(row), col_guard(col);
    ASSERT_EQ(st1, CP_OK) << cp_last_error();
    ASSERT_EQ(st2, CP_OK) << cp_last_error();
    ASSERT_TRUE(row && col);
    EXPECT_EQ(cp_comm_get_timeout(row), 12345) << "a child inherits the deadline";
    EXPECT_STREQ(cp_comm_kind_name(row), cp_comm_kind_name(g_world));

    std::vector<int> row_members, col_members;
    for (int q = 0; q < g_size; q++) {
        if (q / w == g_rank / w) row_members.push_back(q);
        if (q % w == g_rank % w) col_members.push_back(q);
    }
    EXPECT_EQ(cp_comm_size(row), (int)row_members.size());
    EXPECT_EQ(cp_comm_rank(row), g_rank % w);
    EXPECT_EQ(cp_comm_size(col), (int)col_members.size());
    EXPECT_EQ(cp_comm_rank(col), g_rank / w);
    EXPECT_LE(cp_comm_local_size(row), cp_comm_size(row));

    for (auto [c, members] : {std::make_pair(row, row_members), std::make_pair(col, col_members)}) {
        // sum of world ranks in the group, and the gathered member list
        int64_t mine = g_rank, sum = -1, want = 0;
        for (int q : members)
            want += q;
        ASSERT_EQ(cp_comm_allreduce(c, &mine, &sum, 1, CP_DTYPE_I64, CP_REDUCE_SUM, nullptr), CP_OK)
            << cp_last_error();
        EXPECT_EQ(sum, want);
        std::vector<int32_t> got(members.size(), -1);
        int32_t me32 = g_rank;
        ASSERT_EQ(cp_comm_allgather(c, &me32, got.data(), 1, CP_DTYPE_I32, nullptr), CP_OK);
        for (size_t k = 0; k < members.size(); k++)
            EXPECT_EQ(got[k], members[k]);
        // a larger reduction inside the group against the host reference
        const size_t count = 65537;
        std::vector<float> v(count), out(count), ref(count, 0.0f);
        for (size_t i = 0; i < count; i++)
            v[i] = (float)((i * 7 + (size_t)g_rank * 3) % 97) - 48;
        for (int q : members)
            for (size_t i = 0; i < count; i++)
                ref[i] += (float)((i * 7 + (size_t)q * 3) % 97) - 48;
        ASSERT_EQ(
            cp_comm_allreduce(c, v.data(), out.data(), count, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
            CP_OK);
        EXPECT_EQ(out, ref); // small integers: exact in any order
    }
    // the row and the column communicators interleave without mixing up
    int32_t a = 1, b = 2, ra = 0, rb = 0;
    ASSERT_EQ(cp_comm_allreduce(row, &a, &ra, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_OK);
    ASSERT_EQ(cp_comm_allreduce(col, &b, &rb, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_OK);
    EXPECT_EQ(ra, (int)row_members.size());
    EXPECT_EQ(rb, 2 * (int)col_members.size());
}

TEST_F(Comm, SplitKeyOrderAndExcludedRanks) {
    cp_comm_t rev = nullptr, half = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, 7, g_size - g_rank, &rev), CP_OK) << cp_last_error();
    CommPtr rev_guard(rev);
    ASSERT_TRUE(rev);
    EXPECT_EQ(cp_comm_rank(rev), g_size - 1 - g_rank) << "ranks ordered by key";
    int32_t me = g_rank;
    std::vector<int32_t> got((size_t)g_size);
    ASSERT_EQ(cp_comm_allgather(rev, &me, got.data(), 1, CP_DTYPE_I32, nullptr), CP_OK);
    for (int k = 0; k < g_size; k++)
        EXPECT_EQ(got[(size_t)k], g_size - 1 - k);

    // odd ranks opt out (negative color)
    ASSERT_EQ(cp_comm_split(g_world, g_rank % 2 ? -1 : 0, g_rank, &half), CP_OK) << cp_last_error();
    CommPtr half_guard(half);
    if (g_rank % 2) {
        EXPECT_EQ(half, nullptr);
    } else {
        ASSERT_TRUE(half);
        EXPECT_EQ(cp_comm_size(half), (g_size + 1) / 2);
        EXPECT_EQ(cp_comm_rank(half), g_rank / 2);
        // nested split of a split
        cp_comm_t one = nullptr;
        ASSERT_EQ(cp_comm_split(half, cp_comm_rank(half), 0, &one), CP_OK) << cp_last_error();
        CommPtr one_guard(one);
        ASSERT_TRUE(one);
        EXPECT_EQ(cp_comm_size(one), 1);
        ASSERT_EQ(cp_comm_barrier(half), CP_OK);
    }
}

// ---- deadlines ------------------------------------------------------------------

// Every rank waits for a message its left neighbour never sends: each must
// time out after the deadline, name that neighbour, and refuse later calls.
TEST_F(Comm, RecvTimesOutAndBreaksTheCommunicator) {
    if (!world_is_mpi() || g_size < 2) GTEST_SKIP() << "needs two MPI ranks";
    cp_comm_t c = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, 0, g_rank, &c), CP_OK) << cp_last_error();
    CommPtr guard(c);
    ASSERT_EQ(cp_comm_set_timeout(c, 300), CP_OK);
    const int left = (g_rank + g_size - 1) % g_size;
    int32_t buf = 0;
    double t0 = now_ms();
    cp_status st = cp_comm_recv(c, &buf, 1, CP_DTYPE_I32, left, nullptr);
    double ms = now_ms() - t0;
    EXPECT_EQ(st, CP_ERR_TIMEOUT);
    std::string msg = cp_last_error_detail();
    std::string want = "recv on split(color=0) (rank " + std::to_string(g_rank) + " of " +
                       std::to_string(g_size) + ") timed out after 300 ms waiting for rank " +
                       std::to_string(left) + " (world rank " + std::to_string(left) + ")";
    EXPECT_NE(msg.find(want), std::string::npos) << msg;
    EXPECT_GE(ms, 299.0);
    EXPECT_LT(ms, 300.0 + 1500.0); // scheduling slack on an oversubscribed machine
    t0 = now_ms();
    int32_t x = 1, y = 0;
    EXPECT_EQ(cp_comm_allreduce(c, &x, &y, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr),
              CP_ERR_TIMEOUT);
    EXPECT_NE(std::string(cp_last_error_detail()).find("unusable after an earlier timeout"),
              std::string::npos)
        << cp_last_error_detail();
    EXPECT_LT(now_ms() - t0, 50.0) << "a broken communicator must fail at once";
}

// A communicator freed with a shift in flight finishes it first: the
// buffers (still alive here) hold the neighbour's data afterwards.
TEST_F(Comm, FreeWaitsForTheSendRecvInFlight) {
    cp_comm_t c = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, 0, g_rank, &c), CP_OK) << cp_last_error();
    const int right = (g_rank + 1) % g_size, left = (g_rank + g_size - 1) % g_size;
    std::vector<int32_t> out(100001), in(100001, -1);
    for (size_t i = 0; i < out.size(); i++) out[i] = g_rank * 1000003 + (int32_t)i;
    ASSERT_EQ(cp_comm_sendrecv_start(c, out.data(), right, in.data(), left, out.size(), CP_DTYPE_I32, nullptr),
              CP_OK)
        << cp_last_error();
    cp_comm_free(c);
    for (size_t i = 0; i < in.size(); i += 997) ASSERT_EQ(in[i], left * 1000003 + (int32_t)i) << "element " << i;
    EXPECT_EQ(in.back(), left * 1000003 + (int32_t)(in.size() - 1));
}

// Every rank shifts a block to its right neighbour and waits for one from
// that neighbour too, which sends its own to the rank beyond: no receive is
// ever matched, so each wait times out after the deadline, counted from the
// wait, and names the right neighbour (the only peer of both halves).
// (Every rank must time out: a communicator that broke on some ranks only
// leaves the job unable to finalize. At two ranks the right neighbour is
// the left one too, and the shifts match.)
TEST_F(Comm, SendRecvTimesOutNamingTheSilentPeer) {
    if (!world_is_mpi() || g_size < 3) GTEST_SKIP() << "needs three MPI ranks";
    cp_comm_t c = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, 0, g_rank, &c), CP_OK) << cp_last_error();
    CommPtr guard(c);
    ASSERT_EQ(cp_comm_set_timeout(c, 300), CP_OK);
    const int right = (g_rank + 1) % g_size;
    int32_t out = 5, in = -1;
    ASSERT_EQ(cp_comm_sendrecv_start(c, &out, right, &in, right, 1, CP_DTYPE_I32, nullptr), CP_OK)
        << cp_last_error();
    std::this_thread::sleep_for(std::chrono::milliseconds(400)); // past the deadline, before the wait
    double t0 = now_ms();
    EXPECT_EQ(cp_comm_sendrecv_wait(c, nullptr), CP_ERR_TIMEOUT);
    double ms = now_ms() - t0;
    std::string msg = cp_last_error_detail();
    std::string want = "sendrecv on split(color=0) (rank " + std::to_string(g_rank) + " of " +
                       std::to_string(g_size) + ") timed out after 300 ms waiting for rank " + std::to_string(right);
    EXPECT_NE(msg.find(want), std::string::npos) << msg;
    EXPECT_NE(msg.find("did not post the matching sendrecv"), std::string::npos) << msg;
    EXPECT_GE(ms, 299.0) << "the deadline counts from the wait";
    EXPECT_LT(ms, 300.0 + 1500.0);
    int32_t x = 1, y = 0;
    EXPECT_EQ(cp_comm_allreduce(c, &x, &y, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_ERR_TIMEOUT)
        << "the communicator is unusable after the timeout";
}

// The last rank arrives late to an all-reduce: the others time out and,
// through the diagnosis exchange, name it even when they wait on it only
// indirectly. (The late rank may then fail, or even complete with data its
// peers sent before giving up: its status is not checked.)
TEST_F(Comm, AllReduceTimeoutNamesTheLateRank) {
    if (!world_is_mpi() || g_size < 2) GTEST_SKIP() << "needs two MPI ranks";
    cp_comm_t c = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, 0, g_rank, &c), CP_OK) << cp_last_error();
    CommPtr guard(c);
    const int late = g_size - 1, timeout = 400;
    ASSERT_EQ(cp_comm_set_timeout(c, timeout), CP_OK);
    ASSERT_EQ(cp_comm_barrier(c), CP_OK);
    if (g_rank == late) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    for (size_t count : {(size_t)1000}) {
        std::vector<float> v(count, 1.0f);
        double t0 = now_ms();
        cp_status st =
            cp_comm_allreduce(c, v.data(), v.data(), count, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr);
        double ms = now_ms() - t0;
        if (g_rank != late) {
            EXPECT_EQ(st, CP_ERR_TIMEOUT);
            std::string msg = cp_last_error_detail();
            std::string want = "all_reduce on split(color=0) (rank " + std::to_string(g_rank) +
                               " of " + std::to_string(g_size) + ") timed out after 400 ms " +
                               "waiting for rank " + std::to_string(late) + " (world rank " +
                               std::to_string(late) + ")";
            EXPECT_NE(msg.find(want), std::string::npos) << msg;
            EXPECT_GE(ms, timeout - 1.0);
            // deadline + diagnosis grace (200 ms) + scheduling slack
            EXPECT_LT(ms, timeout + 200.0 + 1500.0);
        }
    }
}

// ---- argument checks ----------------------------------------------------------------

TEST_F(Comm, RejectsBadArguments) {
    float x = 0, y = 0;
    EXPECT_EQ(cp_comm_allreduce(nullptr, &x, &y, 1, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_allreduce(g_world, &x, &y, 1, CP_DTYPE_Q4_0, CP_REDUCE_SUM, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_allreduce(g_world, &x, &y, 1, CP_DTYPE_I8, CP_REDUCE_SUM, nullptr),
              CP_ERR_UNSUPPORTED);
    EXPECT_EQ(cp_comm_allreduce(g_world, &x, &y, 1, CP_DTYPE_F32, (cp_reduce_op)9, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_allreduce(g_world, nullptr, &y, 1, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_bcast(g_world, &x, 1, CP_DTYPE_F32, g_size, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_bcast(g_world, &x, 1, CP_DTYPE_F32, -1, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_send(g_world, &x, 1, CP_DTYPE_F32, g_rank, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_recv(g_world, &x, 1, CP_DTYPE_F32, g_size, nullptr), CP_ERR_INVALID_ARG);
    std::vector<size_t> counts((size_t)g_size, 2);
    EXPECT_EQ(cp_comm_allgatherv(g_world, &x, 1, &y, counts.data(), CP_DTYPE_F32, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error_detail()).find("counts["), std::string::npos);
    EXPECT_EQ(cp_comm_allgatherv(g_world, &x, 1, &y, nullptr, CP_DTYPE_F32, nullptr),
              CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_set_timeout(g_world, -5), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_get_timeout(g_world), kTestTimeoutMs);
    EXPECT_EQ(cp_comm_split(g_world, 0, 0, nullptr), CP_ERR_INVALID_ARG);
    cp_comm_t c = reinterpret_cast<cp_comm_t>(&x);
    EXPECT_EQ(cp_comm_init_world(CP_COMM_SELF, -7, &c), CP_ERR_INVALID_ARG);
    EXPECT_EQ(c, nullptr);
    EXPECT_EQ(cp_comm_init_world(CP_COMM_SELF, 0, nullptr), CP_ERR_INVALID_ARG);
}

// ---- the single-rank backend ----------------------------------------------------------

class CommSelf : public Comm {
  protected:
    void SetUp() override {
        ASSERT_EQ(cp_comm_init_world(CP_COMM_SELF, 1000, &raw_), CP_OK) << cp_last_error();
        self_.reset(raw_);
    }
    cp_comm_t raw_ = nullptr;
    CommPtr self_;
};

TEST_F(CommSelf, Info) {
    cp_comm_t c = self_.get();
    EXPECT_STREQ(cp_comm_kind_name(c), "self");
    EXPECT_EQ(cp_comm_rank(c), 0);
    EXPECT_EQ(cp_comm_size(c), 1);
    EXPECT_EQ(cp_comm_local_rank(c), 0);
    EXPECT_EQ(cp_comm_local_size(c), 1);
    EXPECT_EQ(cp_comm_get_timeout(c), 1000);
    EXPECT_EQ(cp_comm_rank(nullptr), -1);
    EXPECT_STREQ(cp_comm_kind_name(nullptr), "none");
    cp_comm_free(nullptr); // no-op
}

TEST_F(CommSelf, CollectivesAreCopies) {
    cp_comm_t c = self_.get();
    for (cp_dtype dt : kReduceTypes) {
        for (size_t count : kCounts) {
            std::vector<uint8_t> in = exact_input(dt, 3, 0, count), out(in.size(), 0xA5);
            for (cp_reduce_op op : {CP_REDUCE_SUM, CP_REDUCE_MAX, CP_REDUCE_MIN}) {
                std::fill(out.begin(), out.end(), 0xA5);
                ASSERT_EQ(cp_comm_allreduce(c, in.data(), out.data(), count, dt, op, nullptr),
                          CP_OK);
                EXPECT_EQ(out, in);
                std::fill(out.begin(), out.end(), 0xA5);
                ASSERT_EQ(cp_comm_reduce_scatter(c, in.data(), out.data(), count, dt, op, nullptr),
                          CP_OK);
                EXPECT_EQ(out, in);
            }
            std::vector<uint8_t> inplace = in;
            ASSERT_EQ(cp_comm_allreduce(c, inplace.data(), inplace.data(), count, dt, CP_REDUCE_SUM,
                                        nullptr),
                      CP_OK);
            EXPECT_EQ(inplace, in);
            std::fill(out.begin(), out.end(), 0xA5);
            ASSERT_EQ(cp_comm_allgather(c, in.data(), out.data(), count, dt, nullptr), CP_OK);
            EXPECT_EQ(out, in);
            std::fill(out.begin(), out.end(), 0xA5);
            size_t counts[1] = {count};
            ASSERT_EQ(cp_comm_allgatherv(c, in.data(), count, out.data(), counts, dt, nullptr),
                      CP_OK);
            EXPECT_EQ(out, in);
            ASSERT_EQ(cp_comm_bcast(c, out.data(), count, dt, 0, nullptr), CP_OK);
            EXPECT_EQ(out, in);
        }
    }
    EXPECT_EQ(cp_comm_barrier(c), CP_OK);
}

TEST_F(CommSelf, PeersAndSplit) {
    cp_comm_t c = self_.get();
    float x = 1;
    EXPECT_EQ(cp_comm_bcast(c, &x, 1, CP_DTYPE_F32, 1, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_send(c, &x, 1, CP_DTYPE_F32, 0, nullptr), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_recv(c, &x, 1, CP_DTYPE_F32, 1, nullptr), CP_ERR_INVALID_ARG);
    float y = 0;
    ASSERT_EQ(cp_comm_sendrecv_start(c, &x, 0, &y, 0, 1, CP_DTYPE_F32, nullptr), CP_OK) << cp_last_error();
    EXPECT_EQ(y, 1.0f) << "a shift over one rank is a copy";
    EXPECT_EQ(cp_comm_sendrecv_wait(c, nullptr), CP_OK);
    EXPECT_EQ(cp_comm_sendrecv_start(c, &x, 1, &y, 0, 1, CP_DTYPE_F32, nullptr), CP_ERR_INVALID_ARG);
    cp_comm_t child = nullptr;
    ASSERT_EQ(cp_comm_split(c, 3, 0, &child), CP_OK);
    CommPtr guard(child);
    ASSERT_TRUE(child);
    EXPECT_EQ(cp_comm_size(child), 1);
    EXPECT_EQ(cp_comm_get_timeout(child), 1000);
    cp_comm_t none = reinterpret_cast<cp_comm_t>(&x);
    ASSERT_EQ(cp_comm_split(c, -1, 0, &none), CP_OK);
    EXPECT_EQ(none, nullptr);
}

TEST_F(CommSelf, AbortMakesItUnusable) {
    cp_comm_t c = self_.get();
    cp_comm_abort(c, 3); // SELF: returns, the caller exits
    cp_comm_abort(nullptr, 3);
    float x = 1;
    cp_status st = cp_comm_allreduce(c, &x, &x, 1, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr);
    EXPECT_NE(st, CP_OK);
    EXPECT_NE(std::string(cp_last_error_detail()).find("unusable"), std::string::npos);
}

TEST_F(Comm, UnavailableBackendsFailCleanly) {
#ifndef CP_HAVE_MPI
    cp_comm_t c = nullptr;
    EXPECT_EQ(cp_comm_init_world(CP_COMM_MPI, 0, &c), CP_ERR_UNSUPPORTED);
    EXPECT_EQ(c, nullptr);
#endif
#ifndef CP_HAVE_NCCL
    cp_comm_t n = nullptr;
    EXPECT_EQ(cp_comm_init_world(CP_COMM_NCCL, 0, &n), CP_ERR_UNSUPPORTED);
    EXPECT_EQ(n, nullptr);
#endif
    cp_comm_t bad = nullptr;
    EXPECT_EQ(cp_comm_init_world((cp_comm_kind)42, 0, &bad), CP_ERR_INVALID_ARG);
    EXPECT_EQ(bad, nullptr);
}

// ---- NCCL: runs on GPU machines; elsewhere it must fail with a clear error --------------

// An NCCL twin of a host group (what the launcher makes for the TP and
// pipeline groups when every rank has a GPU): the twin moves device
// buffers over the group's ranks in the group's order; where it cannot
// start, the call fails with a message naming the GPU and the host group
// stays usable.
TEST_F(Comm, NcclTwinOfAHostGroup) {
#ifdef CP_HAVE_MPI
    EXPECT_TRUE(cp_comm_built(CP_COMM_MPI));
#else
    EXPECT_FALSE(cp_comm_built(CP_COMM_MPI));
#endif
#ifdef CP_HAVE_NCCL
    EXPECT_TRUE(cp_comm_built(CP_COMM_NCCL));
#else
    EXPECT_FALSE(cp_comm_built(CP_COMM_NCCL));
#endif
    EXPECT_TRUE(cp_comm_built(CP_COMM_SELF));
    cp_comm_t twin = nullptr;
    EXPECT_EQ(cp_comm_nccl_create(1, nullptr, 0, &twin), CP_ERR_INVALID_ARG);
    EXPECT_EQ(cp_comm_nccl_create(0, nullptr, 0, nullptr), CP_OK); // nothing to make
    // the group of even and the group of odd ranks, the latter in reverse
    cp_comm_t host = nullptr;
    ASSERT_EQ(cp_comm_split(g_world, g_rank % 2, g_rank % 2 ? -g_rank : g_rank, &host), CP_OK) << cp_last_error();
    CommPtr host_guard(host);
#ifndef CP_HAVE_NCCL
    EXPECT_EQ(cp_comm_nccl_create(1, &host, 0, &twin), CP_ERR_UNSUPPORTED);
    EXPECT_EQ(twin, nullptr);
    EXPECT_NE(std::string(cp_last_error_detail()).find("NCCL"), std::string::npos) << cp_last_error_detail();
#else
    int ndev = 0;
    const bool have_gpu = cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0;
    if (!have_gpu) {
        // a NULL group beside it gets no twin, and the failure none either
        cp_comm_t hosts[2] = {host, nullptr}, twins[2] = {nullptr, nullptr};
        EXPECT_NE(cp_comm_nccl_create(2, hosts, 0, twins), CP_OK);
        EXPECT_EQ(twins[0], nullptr);
        EXPECT_EQ(twins[1], nullptr);
        EXPECT_EQ(twin, nullptr);
        EXPECT_NE(std::string(cp_last_error_detail()).find("GPU"), std::string::npos) << cp_last_error_detail();
    }
#endif
    // the host group still works
    int32_t one = 1, n = 0;
    ASSERT_EQ(cp_comm_allreduce(host, &one, &n, 1, CP_DTYPE_I32, CP_REDUCE_SUM, nullptr), CP_OK) << cp_last_error();
    EXPECT_EQ(n, cp_comm_size(host));
#ifdef CP_HAVE_NCCL
    if (!have_gpu) GTEST_SKIP() << "no CUDA device: checked the error path only";
    if (cp_comm_local_size(g_world) > ndev) GTEST_SKIP() << "more ranks than GPUs on this node";
    cp_comm_t hosts[2] = {host, g_world}, twins[2] = {nullptr, nullptr};
    ASSERT_EQ(cp_comm_nccl_create(2, hosts, cp_comm_local_rank(g_world), twins), CP_OK) << cp_last_error();
    twin = twins[0];
    CommPtr world_twin_guard(twins[1]);
    EXPECT_EQ(cp_comm_size(twins[1]), g_size);
    EXPECT_EQ(cp_comm_rank(twins[1]), g_rank);
    CommPtr twin_guard(twin);
    EXPECT_STREQ(cp_comm_kind_name(twin), "nccl");
    EXPECT_EQ(cp_comm_size(twin), cp_comm_size(host));
    EXPECT_EQ(cp_comm_rank(twin), cp_comm_rank(host));
    EXPECT_EQ(cp_comm_get_timeout(twin), cp_comm_get_timeout(host));
    cp_comm_t again = nullptr;
    EXPECT_EQ(cp_comm_nccl_create(1, &twin, 0, &again), CP_ERR_INVALID_ARG);
    // each rank sends its rank in the group: the all-gather is the group's order
    const int size = cp_comm_size(twin);
    int32_t *d = nullptr;
    ASSERT_EQ(cudaMalloc(&d, (size_t)(size + 1) * sizeof(int32_t)), cudaSuccess);
    const int32_t mine = cp_comm_rank(host);
    ASSERT_EQ(cudaMemcpy(d + size, &mine, sizeof mine, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cp_comm_allgather(twin, d + size, d, 1, CP_DTYPE_I32, nullptr), CP_OK) << cp_last_error();
    std::vector<int32_t> got((size_t)size, -1);
    ASSERT_EQ(cudaMemcpy(got.data(), d, (size_t)size * sizeof(int32_t), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int r = 0; r < size; r++) EXPECT_EQ(got[(size_t)r], r);
    cudaFree(d);
#endif
}

#ifdef CP_HAVE_NCCL
TEST_F(Comm, NcclWorld) {
    int ndev = 0; // left untouched when the driver is missing
    bool have_gpu = cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0;
    cp_comm_t c = nullptr;
    cp_status st = cp_comm_init_world(CP_COMM_NCCL, 20000, &c);
    CommPtr guard(c);
    if (!have_gpu) {
        EXPECT_NE(st, CP_OK);
        EXPECT_EQ(c, nullptr);
        EXPECT_NE(std::string(cp_last_error_detail()).find("GPU"), std::string::npos)
            << cp_last_error_detail();
        GTEST_SKIP() << "no CUDA device: checked the error path only";
    }
    if (cp_comm_local_size(g_world) > ndev) {
        EXPECT_EQ(st, CP_ERR_UNSUPPORTED) << cp_last_error();
        GTEST_SKIP() << "more ranks than GPUs on this node";
    }
    ASSERT_EQ(st, CP_OK) << cp_last_error();
    EXPECT_STREQ(cp_comm_kind_name(c), "nccl");
    EXPECT_EQ(cp_comm_size(c), g_size);
    const size_t count = 65537;
    std::vector<float> h(count), out(count), ref(count, 0.0f);
    for (size_t i = 0; i < count; i++)
        h[i] = (float)((i + (size_t)g_rank) % 13);
    for (int r = 0; r < g_size; r++)
        for (size_t i = 0; i < count; i++)
            ref[i] += (float)((i + (size_t)r) % 13);
    float *d = nullptr;
    ASSERT_EQ(cudaMalloc(&d, count * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d, h.data(), count * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cp_comm_allreduce(c, d, d, count, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr), CP_OK)
        << cp_last_error();
    ASSERT_EQ(cudaMemcpy(out.data(), d, count * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(out, ref); // small integers: exact in any order
    EXPECT_EQ(cp_comm_barrier(c), CP_OK) << cp_last_error();
    cudaFree(d);
}
#endif

} // namespace

// Failures of ranks other than 0, printed with the rank (their normal
// output is silenced to keep the log readable).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
    void OnTestPartResult(const ::testing::TestPartResult &r) override {
        if (r.failed())
            fprintf(stderr, "[rank %d] %s:%d: %s\n", g_rank, r.file_name() ? r.file_name() : "?",
                    r.line_number(), r.summary());
    }
};

int main(int argc, char **argv) {
    ::testing::InitGoogleTest(&argc, argv);
    cp_comm_kind kind = CP_COMM_AUTO;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--comm=mpi")
            kind = CP_COMM_MPI;
        else if (a == "--comm=self")
            kind = CP_COMM_SELF;
        else if (a == "--comm=auto")
            kind = CP_COMM_AUTO;
        else {
            fprintf(stderr, "unknown argument %s (use --comm=mpi|self|auto)\n", a.c_str());
            return 2;
        }
    }
    if (cp_comm_init_world(kind, kTestTimeoutMs, &g_world) != CP_OK) {
        fprintf(stderr, "cannot create the world communicator: %s\n", cp_last_error());
        return 1;
    }
    g_rank = cp_comm_rank(g_world);
    g_size = cp_comm_size(g_world);
    if (g_rank == 0) printf("communicator %s, %d rank(s)\n", cp_comm_kind_name(g_world), g_size);
    if (g_rank != 0) {
        auto &listeners = ::testing::UnitTest::GetInstance()->listeners();
        delete listeners.Release(listeners.default_result_printer());
        listeners.Append(new RankFailurePrinter);
    }
    int rc = RUN_ALL_TESTS();
    // The run fails on every rank when it failed on any.
    int32_t failed = rc != 0, any = 1;
    cp_status st =
        cp_comm_allreduce(g_world, &failed, &any, 1, CP_DTYPE_I32, CP_REDUCE_MAX, nullptr);
    if (st != CP_OK) fprintf(stderr, "[rank %d] final check failed: %s\n", g_rank, cp_last_error());
    if (g_rank == 0 && any && !failed) fprintf(stderr, "tests failed on another rank\n");
    cp_comm_free(g_world);
    return any ? 1 : 0;
}
