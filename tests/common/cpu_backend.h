// cpu_backend.h - what the CPU kernel tests share: a backend on its fast
// kernels or its fp32 references, and the attention parameters of a paged
// KV cache.
#ifndef CP_TESTS_CPU_BACKEND_H
#define CP_TESTS_CPU_BACKEND_H

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

extern "C" {
#include "cp_backend.h"
}

namespace cptest {

// A CPU backend with `threads` threads; ref: its operations run the
// readable fp32 references (CP_CPU_FORCE_REF while it is created).
struct CpuBackend {
    cp_backend_t be = nullptr;
    explicit CpuBackend(bool ref, int threads = 3) {
        if (ref) setenv("CP_CPU_FORCE_REF", "1", 1);
        EXPECT_EQ(cp_backend_cpu_init(threads, &be), CP_OK) << cp_last_error();
        if (ref) unsetenv("CP_CPU_FORCE_REF");
    }
    ~CpuBackend() { cp_backend_free(be); }
    CpuBackend(const CpuBackend &) = delete;
    CpuBackend &operator=(const CpuBackend &) = delete;
};

// Attention of n_tok rows (sequence seq[i], position pos[i]) over a paged
// cache of kv_dtype: blocks of block_size positions, max_blocks per
// sequence in tables; the scale 1/sqrt(head_dim). Other fields zero.
inline cp_attn_params paged_attn_params(int n_tok, int n_head, int n_head_kv, int head_dim, int block_size,
                                        int max_blocks, cp_dtype kv_dtype, const int32_t *seq, const int32_t *pos,
                                        const int32_t *tables) {
    cp_attn_params p = {};
    p.n_tok = n_tok;
    p.n_head = n_head;
    p.n_head_kv = n_head_kv;
    p.head_dim = head_dim;
    p.block_size = block_size;
    p.max_blocks = max_blocks;
    p.scale = 1.0f / std::sqrt((float)head_dim);
    p.kv_dtype = kv_dtype;
    p.seq_of_tok = seq;
    p.pos_of_tok = pos;
    p.block_tables = tables;
    return p;
}

}  // namespace cptest

#endif  // CP_TESTS_CPU_BACKEND_H
