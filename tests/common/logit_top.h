// logit_top.h - checks cp_model_forward_top's outputs against the full
// logit rows of the same step, searched here independently.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

extern "C" {
#include "cp_model.h"
}

namespace cptest {

// Output buffers for n rows of k candidates; full rows poisoned with a
// sentinel so that untouched rows are visible.
struct TopOut {
    int k, n, vocab;
    std::vector<uint8_t> need;
    std::vector<float> logits, val;
    std::vector<int32_t> id;
    std::vector<double> lse;
    std::vector<int32_t> target; // CP_TOP_TARGET rows: a token spread over the vocabulary
    std::vector<float> target_logit;
    TopOut(int k_, int n_, int vocab_, std::vector<uint8_t> need_)
        : k(k_), n(n_), vocab(vocab_), need(std::move(need_)), logits((size_t)n_ * vocab_, 12345.0f),
          val((size_t)n_ * k_, 0.0f), id((size_t)n_ * k_, -7), lse((size_t)n_, 0.0), target((size_t)n_),
          target_logit((size_t)n_, NAN) {
        for (int r = 0; r < n; r++) target[r] = (int32_t)(((int64_t)r * 7919 + 3) % vocab);
    }
    cp_logit_top view() {
        cp_logit_top t = {k, need.data(), logits.data(), val.data(), id.data(), lse.data()};
        t.target = target.data();
        t.target_logit = target_logit.data();
        return t;
    }
};

// Each row's k best of full (descending, lower id first on ties) equal the
// candidates exactly; rows flagged CP_TOP_LSE have the log-sum-exp within
// rel_lse of the full row's (0: exactly the one-rank sum: max, then exp of
// the differences in id order, in double); rows flagged CP_TOP_TARGET have
// their target's logit; rows flagged CP_TOP_FULL equal full bit for bit,
// and the others are untouched.
inline void expect_top_matches_full(const TopOut &o, const std::vector<float> &full, double rel_lse) {
    const int V = o.vocab;
    for (int r = 0; r < o.n; r++) {
        const float *row = full.data() + (size_t)r * V;
        std::vector<int32_t> ix(V);
        std::iota(ix.begin(), ix.end(), 0);
        std::stable_sort(ix.begin(), ix.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
        for (int j = 0; j < o.k; j++) {
            const int32_t want = j < V ? ix[j] : -1;
            ASSERT_EQ(o.id[(size_t)r * o.k + j], want) << "row " << r << " candidate " << j;
            if (want >= 0) EXPECT_EQ(o.val[(size_t)r * o.k + j], row[want]) << "row " << r << " candidate " << j;
        }
        const double got = o.lse[r];
        if (o.need[r] & CP_TOP_LSE) {
            float mx = row[0];
            for (int i = 1; i < V; i++) mx = std::max(mx, row[i]);
            double sum = 0;
            for (int i = 0; i < V; i++) sum += std::exp((double)row[i] - mx);
            const double want = mx + std::log(sum);
            if (rel_lse == 0)
                EXPECT_EQ(got, want) << "row " << r;
            else
                EXPECT_NEAR(got, want, rel_lse * std::fabs(want)) << "row " << r;
        } else {
            EXPECT_TRUE(std::isnan(got)) << "row " << r << " did not ask for its log-sum-exp: " << got;
        }
        if (o.need[r] & CP_TOP_TARGET)
            EXPECT_EQ(o.target_logit[r], row[o.target[r]]) << "row " << r << ": target " << o.target[r];
        else
            EXPECT_TRUE(std::isnan(o.target_logit[r])) << "row " << r << " did not ask for a target's logit";
        const float *lg = o.logits.data() + (size_t)r * V;
        if (o.need[r] & CP_TOP_FULL) {
            EXPECT_TRUE(std::equal(lg, lg + V, row)) << "row " << r << ": full logits differ";
        } else {
            EXPECT_TRUE(std::all_of(lg, lg + V, [](float v) { return v == 12345.0f; }))
                << "row " << r << " did not ask for its full logits but they were written";
        }
    }
}

} // namespace cptest
