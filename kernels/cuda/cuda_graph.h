/* cuda_graph.h - the CUDA backend's cache of recorded steps (CUDA graphs)
 * behind cp_backend_graph_begin/end: the first sight of a key runs
 * directly, the second is captured from the backend's stream and launched,
 * later ones launch the cached graph; at most CP_CUDA_GRAPH_CACHE graphs,
 * least recently used dropped first. Private to kernels/cuda. */
#ifndef CP_CUDA_GRAPH_H
#define CP_CUDA_GRAPH_H

#include <cuda_runtime_api.h>

#include "cp_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CP_CUDA_GRAPH_CACHE 64

typedef struct cp_cuda_graphs cp_cuda_graphs;

/* A cache recording work of stream (borrowed; must outlive the cache).
 * enabled = false: every bracket runs directly until switched on. */
cp_status cp_cuda_graphs_init(cudaStream_t stream, bool enabled, cp_cuda_graphs **out);

/* Destroys every cached graph (launches in flight complete). NULL: no-op. */
void cp_cuda_graphs_free(cp_cuda_graphs *g);

/* See cp_backend_graph_begin. */
cp_status cp_cuda_graphs_begin(cp_cuda_graphs *g, uint64_t key, bool *replay);

/* See cp_backend_graph_end. *host_state carries one value of the backend's
 * host-side bookkeeping that the recorded operations set (the embedding's
 * pending check): a capture stores the value it holds, a replay writes the
 * stored value back. */
cp_status cp_cuda_graphs_end(cp_cuda_graphs *g, bool failed, int64_t *host_state, bool *reissue);

/* True between the begin and end of a capture: stream work is being
 * recorded, not run, so no synchronising call may be made. */
bool cp_cuda_graphs_capturing(const cp_cuda_graphs *g);

/* Drops every cached graph and every key seen (their device addresses are
 * no longer valid). Not while capturing. */
void cp_cuda_graphs_drop(cp_cuda_graphs *g);

void cp_cuda_graphs_set_enabled(cp_cuda_graphs *g, bool enabled);
void cp_cuda_graphs_stats(const cp_cuda_graphs *g, cp_backend_graph_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* CP_CUDA_GRAPH_H */
