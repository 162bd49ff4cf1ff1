// test_comm_stats.cc - the communicator's call/byte/time counters. A known
// sequence of calls on a fresh communicator (one rank alone, then the whole
// job) must leave exactly the call counts and payload bytes computed here
// from the arguments; rejected calls count nothing; reset and split children
// start from zero; the time of a barrier includes waiting for a late rank.
// Runs inside cp_test_parallel on every rank (its main lives in test_comm.cc).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cp_comm.h"

namespace {

const int kStatsTimeoutMs = 30000; // a hang fails the test instead of blocking ctest

struct StatsCommDeleter {
    void operator()(cp_comm *c) const { cp_comm_free(c); }
};
using StatsCommPtr = std::unique_ptr<cp_comm, StatsCommDeleter>;

// Expected counters, filled op by op as the test makes its calls.
struct Expect {
    uint64_t calls[CP_COMM_OP_COUNT] = {};
    uint64_t bytes[CP_COMM_OP_COUNT] = {};
    void add(cp_comm_op op, uint64_t b) {
        calls[op]++;
        bytes[op] += b;
    }
};

void expect_stats(cp_comm_t c, const Expect &want, const char *where) {
    cp_comm_stats got;
    std::memset(&got, 0xA5, sizeof(got)); // every field must be written
    cp_comm_get_stats(c, &got);
    for (int op = 0; op < CP_COMM_OP_COUNT; op++) {
        const char *name = cp_comm_op_name((cp_comm_op)op);
        EXPECT_EQ(got.calls[op], want.calls[op]) << where << ": calls of " << name;
        EXPECT_EQ(got.bytes[op], want.bytes[op]) << where << ": bytes of " << name;
        EXPECT_GE(got.seconds[op], 0.0) << where << ": seconds of " << name;
        // a few small calls on an idle machine: far below the test timeout
        EXPECT_LT(got.seconds[op], 30.0) << where << ": seconds of " << name;
        if (want.calls[op] == 0) EXPECT_EQ(got.seconds[op], 0.0) << where << ": " << name;
    }
}

TEST(CommStats, NamesAndNullHandle) {
    EXPECT_STREQ(cp_comm_op_name(CP_COMM_OP_ALLREDUCE), "all_reduce");
    EXPECT_STREQ(cp_comm_op_name(CP_COMM_OP_ALLGATHERV), "all_gatherv");
    EXPECT_STREQ(cp_comm_op_name(CP_COMM_OP_BARRIER), "barrier");
    EXPECT_STREQ(cp_comm_op_name(CP_COMM_OP_COUNT), "?");
    cp_comm_stats s;
    std::memset(&s, 0xA5, sizeof(s));
    cp_comm_get_stats(nullptr, &s);
    expect_stats(nullptr, Expect{}, "NULL communicator");
    for (int op = 0; op < CP_COMM_OP_COUNT; op++)
        EXPECT_EQ(s.calls[op], 0u);
    cp_comm_reset_stats(nullptr); // no-op, must not crash
}

// One rank on its own: every collective is a copy, so the counts are those
// of a size-1 communicator whatever the job size.
TEST(CommStats, SelfCountsExactly) {
    cp_comm_t raw = nullptr;
    ASSERT_EQ(cp_comm_init_world(CP_COMM_SELF, kStatsTimeoutMs, &raw), CP_OK) << cp_last_error();
    StatsCommPtr c(raw);
    Expect want;
    expect_stats(c.get(), want, "fresh");

    std::vector<float> f(10, 1.0f);
    ASSERT_EQ(
        cp_comm_allreduce(c.get(), f.data(), f.data(), 10, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
        CP_OK);
    want.add(CP_COMM_OP_ALLREDUCE, 10 * 4);
    int32_t i3[3] = {1, 2, 3}, o3[3];
    ASSERT_EQ(cp_comm_allgather(c.get(), i3, o3, 3, CP_DTYPE_I32, nullptr), CP_OK);
    want.add(CP_COMM_OP_ALLGATHER, 3 * 4);
    double d5[5] = {0}, r5[5];
    size_t counts[1] = {5};
    ASSERT_EQ(cp_comm_allgatherv(c.get(), d5, 5, r5, counts, CP_DTYPE_F64, nullptr), CP_OK);
    want.add(CP_COMM_OP_ALLGATHERV, 5 * 8);
    uint16_t h7[7] = {0}, hr[7];
    ASSERT_EQ(cp_comm_reduce_scatter(c.get(), h7, hr, 7, CP_DTYPE_F16, CP_REDUCE_MAX, nullptr),
              CP_OK);
    want.add(CP_COMM_OP_REDUCE_SCATTER, 7 * 2);
    int8_t b9[9] = {0};
    ASSERT_EQ(cp_comm_bcast(c.get(), b9, 9, CP_DTYPE_I8, 0, nullptr), CP_OK);
    want.add(CP_COMM_OP_BCAST, 9);
    ASSERT_EQ(cp_comm_barrier(c.get()), CP_OK);
    want.add(CP_COMM_OP_BARRIER, 0);
    float s11[11] = {0}, r11[11];
    ASSERT_EQ(cp_comm_sendrecv_start(c.get(), s11, 0, r11, 0, 11, CP_DTYPE_F32, nullptr), CP_OK);
    ASSERT_EQ(cp_comm_sendrecv_wait(c.get(), nullptr), CP_OK);
    want.add(CP_COMM_OP_SENDRECV, 11 * 4); // the count sent; the wait is no second call
    // zero elements is a call that moves nothing
    ASSERT_EQ(cp_comm_allreduce(c.get(), nullptr, nullptr, 0, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
              CP_OK);
    want.add(CP_COMM_OP_ALLREDUCE, 0);
    expect_stats(c.get(), want, "after one call of each collective");

    // rejected before reaching the backend: nothing is counted
    EXPECT_NE(
        cp_comm_allreduce(c.get(), nullptr, f.data(), 10, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
        CP_OK);
    EXPECT_NE(cp_comm_send(c.get(), f.data(), 10, CP_DTYPE_F32, 0, nullptr), CP_OK);
    EXPECT_NE(cp_comm_recv(c.get(), f.data(), 10, CP_DTYPE_F32, 0, nullptr), CP_OK);
    EXPECT_NE(cp_comm_bcast(c.get(), b9, 9, CP_DTYPE_I8, 1, nullptr), CP_OK);
    EXPECT_NE(cp_comm_bcast(c.get(), b9, 9, CP_DTYPE_Q8_0, 0, nullptr), CP_OK);
    EXPECT_NE(cp_comm_sendrecv_start(c.get(), s11, 1, r11, 0, 11, CP_DTYPE_F32, nullptr), CP_OK);
    EXPECT_NE(cp_comm_sendrecv_wait(c.get(), nullptr), CP_OK);
    expect_stats(c.get(), want, "after rejected calls");

    cp_comm_reset_stats(c.get());
    expect_stats(c.get(), Expect{}, "after reset");
    ASSERT_EQ(cp_comm_bcast(c.get(), b9, 4, CP_DTYPE_I16, 0, nullptr), CP_OK);
    Expect again;
    again.add(CP_COMM_OP_BCAST, 4 * 2);
    expect_stats(c.get(), again, "one call after reset");
}

// The whole job: a fresh world communicator, the same sequence on every
// rank, counts computed from the size and this rank's part in it.
TEST(CommStats, WorldCountsExactly) {
    cp_comm_t raw = nullptr;
    ASSERT_EQ(cp_comm_init_world(CP_COMM_AUTO, kStatsTimeoutMs, &raw), CP_OK) << cp_last_error();
    StatsCommPtr w(raw);
    const int n = cp_comm_size(w.get()), rank = cp_comm_rank(w.get());
    Expect want;

    std::vector<float> f(1000, 0.5f);
    for (int k = 0; k < 2; k++) {
        ASSERT_EQ(cp_comm_allreduce(w.get(), f.data(), f.data(), f.size(), CP_DTYPE_F32,
                                    CP_REDUCE_SUM, nullptr),
                  CP_OK)
            << cp_last_error();
        want.add(CP_COMM_OP_ALLREDUCE, 1000 * 4);
    }
    std::vector<int64_t> g3(3, rank), gall((size_t)n * 3);
    ASSERT_EQ(cp_comm_allgather(w.get(), g3.data(), gall.data(), 3, CP_DTYPE_I64, nullptr), CP_OK)
        << cp_last_error();
    want.add(CP_COMM_OP_ALLGATHER, (uint64_t)n * 3 * 8);
    // rank r contributes r + 1 elements: n (n + 1) / 2 gathered
    std::vector<size_t> counts((size_t)n);
    size_t total = 0;
    for (int r = 0; r < n; r++)
        total += counts[(size_t)r] = (size_t)r + 1;
    std::vector<int32_t> mine((size_t)rank + 1, rank), gv(total);
    ASSERT_EQ(cp_comm_allgatherv(w.get(), mine.data(), mine.size(), gv.data(), counts.data(),
                                 CP_DTYPE_I32, nullptr),
              CP_OK)
        << cp_last_error();
    want.add(CP_COMM_OP_ALLGATHERV, (uint64_t)n * (n + 1) / 2 * 4);
    std::vector<float> rs((size_t)n * 5, 1.0f), rsout(5);
    ASSERT_EQ(cp_comm_reduce_scatter(w.get(), rs.data(), rsout.data(), 5, CP_DTYPE_F32,
                                     CP_REDUCE_SUM, nullptr),
              CP_OK)
        << cp_last_error();
    want.add(CP_COMM_OP_REDUCE_SCATTER, (uint64_t)n * 5 * 4);
    uint16_t bf[17] = {0};
    ASSERT_EQ(cp_comm_bcast(w.get(), bf, 17, CP_DTYPE_BF16, n - 1, nullptr), CP_OK)
        << cp_last_error();
    want.add(CP_COMM_OP_BCAST, 17 * 2); // the root counts like every receiver
    // pairs (0,1), (2,3), ...: the even rank sends 6 doubles first, the odd
    // one answers with 2; an unpaired last rank moves nothing
    const int peer = rank ^ 1;
    if (peer < n) {
        double out6[6] = {1, 2, 3, 4, 5, 6}, in6[6];
        if (rank % 2 == 0) {
            ASSERT_EQ(cp_comm_send(w.get(), out6, 6, CP_DTYPE_F64, peer, nullptr), CP_OK);
            ASSERT_EQ(cp_comm_recv(w.get(), in6, 2, CP_DTYPE_F64, peer, nullptr), CP_OK);
            want.add(CP_COMM_OP_SEND, 6 * 8);
            want.add(CP_COMM_OP_RECV, 2 * 8);
        } else {
            ASSERT_EQ(cp_comm_recv(w.get(), in6, 6, CP_DTYPE_F64, peer, nullptr), CP_OK);
            ASSERT_EQ(cp_comm_send(w.get(), out6, 2, CP_DTYPE_F64, peer, nullptr), CP_OK);
            want.add(CP_COMM_OP_RECV, 6 * 8);
            want.add(CP_COMM_OP_SEND, 2 * 8);
        }
    }
    // a ring shift of 13 int16 to the right: what a rank sent
    int16_t sh[13] = {0}, shin[13];
    ASSERT_EQ(cp_comm_sendrecv_start(w.get(), sh, (rank + 1) % n, shin, (rank + n - 1) % n, 13, CP_DTYPE_I16,
                                     nullptr),
              CP_OK)
        << cp_last_error();
    ASSERT_EQ(cp_comm_sendrecv_wait(w.get(), nullptr), CP_OK) << cp_last_error();
    want.add(CP_COMM_OP_SENDRECV, 13 * 2);
    ASSERT_EQ(cp_comm_barrier(w.get()), CP_OK) << cp_last_error();
    want.add(CP_COMM_OP_BARRIER, 0);
    expect_stats(w.get(), want, "world after the sequence");

    // a split child starts at zero and its calls stay its own
    cp_comm_t half_raw = nullptr;
    ASSERT_EQ(cp_comm_split(w.get(), rank % 2, rank, &half_raw), CP_OK) << cp_last_error();
    StatsCommPtr half(half_raw);
    expect_stats(half.get(), Expect{}, "fresh split child");
    ASSERT_EQ(
        cp_comm_allreduce(half.get(), f.data(), f.data(), 3, CP_DTYPE_F32, CP_REDUCE_SUM, nullptr),
        CP_OK)
        << cp_last_error();
    Expect child;
    child.add(CP_COMM_OP_ALLREDUCE, 3 * 4);
    expect_stats(half.get(), child, "split child");
    expect_stats(w.get(), want, "world after the child's call");
    half.reset();

    // time inside a barrier includes waiting for the late rank; the other
    // ranks left the previous barrier at about the same time
    ASSERT_EQ(cp_comm_barrier(w.get()), CP_OK) << cp_last_error();
    cp_comm_reset_stats(w.get());
    if (n >= 2 && rank == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_EQ(cp_comm_barrier(w.get()), CP_OK) << cp_last_error();
    cp_comm_stats s;
    cp_comm_get_stats(w.get(), &s);
    EXPECT_EQ(s.calls[CP_COMM_OP_BARRIER], 1u);
    // 300 ms minus the skew with which ranks left the previous barrier
    if (n >= 2 && rank != 0) EXPECT_GE(s.seconds[CP_COMM_OP_BARRIER], 0.2);
}

} // namespace
