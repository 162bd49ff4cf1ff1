/* cuda_graph.cu - recorded steps of the CUDA backend: a small LRU cache of
 * CUDA graphs keyed by the caller's step key. A key is run directly the
 * first time (allocations, algorithm choices and workspace growth happen
 * then), captured from the stream (thread-local mode) and launched the
 * second time, and replayed from then on. A capture that fails is
 * discarded, reported once, and its key runs directly afterwards. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"
#include "cuda_graph.h"

typedef enum slot_state {
    SLOT_EMPTY = 0,
    SLOT_SEEN,   /* ran directly once; the next sight is captured */
    SLOT_READY,  /* exec holds the graph */
    SLOT_DIRECT, /* capture failed: always run directly */
} slot_state;

typedef enum bracket_mode {
    MODE_NONE = 0, /* no bracket open */
    MODE_DIRECT,
    MODE_CAPTURE,
    MODE_REPLAY,
} bracket_mode;

typedef struct graph_slot {
    uint64_t key;
    slot_state state;
    cudaGraphExec_t exec;
    uint64_t used;      /* clock of the last sight (LRU) */
    int64_t host_state; /* the backend's host bookkeeping after the recorded work */
} graph_slot;

struct cp_cuda_graphs {
    cudaStream_t stream;
    bool enabled;
    bool warned;
    bool poisoned; /* memory moved while capturing: discard that capture */
    bracket_mode mode;
    graph_slot *cur;
    uint64_t clock;
    cp_backend_graph_stats st;
    graph_slot slots[CP_CUDA_GRAPH_CACHE];
};

static void slot_clear(cp_cuda_graphs *g, graph_slot *s) {
    if (s->state == SLOT_READY) {
        /* a launch still in flight completes; its resources go afterwards */
        cudaGraphExecDestroy(s->exec);
        g->st.evictions++;
    }
    memset(s, 0, sizeof(*s));
}

static void warn_once(cp_cuda_graphs *g, const char *what, const char *detail) {
    if (g->warned) return;
    g->warned = true;
    fprintf(stderr,
            "cparallel: CUDA graph %s failed (%s); the steps concerned run without a graph "
            "(CP_CUDA_NO_GRAPH=1 turns graphs off)\n",
            what, detail);
}

extern "C" cp_status cp_cuda_graphs_init(cudaStream_t stream, bool enabled, cp_cuda_graphs **out) {
    cp_cuda_graphs *g = (cp_cuda_graphs *)calloc(1, sizeof(*g));
    if (!g) return CP_ERROR(CP_ERR_OOM, "out of memory for the CUDA graph cache");
    g->stream = stream;
    g->enabled = enabled;
    *out = g;
    return CP_OK;
}

extern "C" void cp_cuda_graphs_free(cp_cuda_graphs *g) {
    if (!g) return;
    if (g->mode == MODE_CAPTURE) {
        cudaGraph_t graph = NULL;
        if (cudaStreamEndCapture(g->stream, &graph) == cudaSuccess && graph)
            cudaGraphDestroy(graph);
        (void)cudaGetLastError();
    }
    for (int i = 0; i < CP_CUDA_GRAPH_CACHE; i++)
        slot_clear(g, &g->slots[i]);
    free(g);
}

/* The slot of key, or a fresh one (an empty slot, else the least recently
 * used one that is not open). */
static graph_slot *slot_for(cp_cuda_graphs *g, uint64_t key) {
    graph_slot *victim = NULL;
    for (int i = 0; i < CP_CUDA_GRAPH_CACHE; i++) {
        graph_slot *s = &g->slots[i];
        if (s->state != SLOT_EMPTY && s->key == key) return s;
        if (!victim ||
            (victim->state != SLOT_EMPTY && (s->state == SLOT_EMPTY || s->used < victim->used)))
            victim = s;
    }
    slot_clear(g, victim);
    victim->key = key;
    return victim;
}

extern "C" cp_status cp_cuda_graphs_begin(cp_cuda_graphs *g, uint64_t key, bool *replay) {
    *replay = false;
    if (g->mode != MODE_NONE)
        return CP_ERROR(CP_ERR_INTERNAL, "graph_begin: the previous graph_begin has no graph_end");
    g->cur = NULL;
    g->poisoned = false;
    if (!g->enabled) {
        g->mode = MODE_DIRECT;
        g->st.direct++;
        return CP_OK;
    }
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    CP_CUDA_CHECK(cudaStreamIsCapturing(g->stream, &cs));
    if (cs != cudaStreamCaptureStatusNone)
        return CP_ERROR(CP_ERR_INTERNAL, "graph_begin: the backend's stream is already being "
                                         "captured");
    graph_slot *s = slot_for(g, key);
    s->used = ++g->clock;
    g->cur = s;
    switch (s->state) {
    case SLOT_EMPTY:
        s->state = SLOT_SEEN;
        g->mode = MODE_DIRECT;
        g->st.direct++;
        return CP_OK;
    case SLOT_SEEN: {
        /* thread-local: a synchronising call of this thread while capturing
         * fails (and invalidates the capture) instead of running silently */
        const cudaError_t e = cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            warn_once(g, "capture", cudaGetErrorString(e));
            s->state = SLOT_DIRECT;
            g->st.failures++;
            g->mode = MODE_DIRECT;
            g->st.direct++;
            return CP_OK;
        }
        g->mode = MODE_CAPTURE;
        return CP_OK;
    }
    case SLOT_READY:
        g->mode = MODE_REPLAY;
        *replay = true;
        return CP_OK;
    case SLOT_DIRECT:
        g->mode = MODE_DIRECT;
        g->st.direct++;
        return CP_OK;
    }
    return CP_ERROR(CP_ERR_INTERNAL, "graph_begin: slot in state %d", (int)s->state);
}

/* A capture or launch that did not work: this key runs directly from now
 * on, and the caller issues the step again. */
static void give_up(cp_cuda_graphs *g, graph_slot *s, const char *what, const char *detail,
                    bool *reissue) {
    (void)cudaGetLastError(); /* capture errors are not sticky: clear them */
    warn_once(g, what, detail);
    if (s) {
        if (s->state == SLOT_READY) {
            cudaGraphExecDestroy(s->exec);
            s->exec = NULL;
        }
        s->state = SLOT_DIRECT;
    }
    g->st.failures++;
    *reissue = true;
}

extern "C" cp_status cp_cuda_graphs_end(cp_cuda_graphs *g, bool failed, int64_t *host_state,
                                        bool *reissue) {
    *reissue = false;
    const bracket_mode mode = g->mode;
    graph_slot *s = g->cur;
    g->mode = MODE_NONE;
    g->cur = NULL;
    switch (mode) {
    case MODE_NONE: return CP_ERROR(CP_ERR_INTERNAL, "graph_end without graph_begin");
    case MODE_DIRECT: return CP_OK;
    case MODE_REPLAY: {
        if (failed) return CP_OK; /* nothing was issued, nothing to launch */
        if (g->poisoned) {
            /* memory moved since begin: the recording is stale */
            slot_clear(g, s);
            *reissue = true;
            return CP_OK;
        }
        const cudaError_t e = cudaGraphLaunch(s->exec, g->stream);
        if (e != cudaSuccess) {
            give_up(g, s, "launch", cudaGetErrorString(e), reissue);
            return CP_OK;
        }
        *host_state = s->host_state;
        g->st.replays++;
        return CP_OK;
    }
    case MODE_CAPTURE: break;
    }
    cudaGraph_t graph = NULL;
    const cudaError_t e = cudaStreamEndCapture(g->stream, &graph);
    if (failed || g->poisoned || e != cudaSuccess || !graph) {
        if (graph) cudaGraphDestroy(graph);
        char detail[256];
        if (failed)
            snprintf(detail, sizeof(detail), "an operation could not be recorded: %s",
                     cp_last_error());
        else if (g->poisoned)
            snprintf(detail, sizeof(detail), "device memory was freed or moved while recording");
        else
            snprintf(detail, sizeof(detail), "cudaStreamEndCapture: %s", cudaGetErrorString(e));
        if (g->poisoned && !failed && e == cudaSuccess) {
            /* not the key's fault: try again on its next sight */
            (void)cudaGetLastError();
            if (s) s->state = SLOT_EMPTY;
            *reissue = true;
            return CP_OK;
        }
        give_up(g, s, "capture", detail, reissue);
        return CP_OK;
    }
    cudaGraphExec_t exec = NULL;
    const cudaError_t ei = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (ei != cudaSuccess) {
        give_up(g, s, "instantiation", cudaGetErrorString(ei), reissue);
        return CP_OK;
    }
    const cudaError_t el = cudaGraphLaunch(exec, g->stream);
    if (el != cudaSuccess) {
        cudaGraphExecDestroy(exec);
        give_up(g, s, "launch", cudaGetErrorString(el), reissue);
        return CP_OK;
    }
    s->exec = exec;
    s->state = SLOT_READY;
    s->host_state = *host_state;
    g->st.captures++;
    return CP_OK;
}

extern "C" bool cp_cuda_graphs_capturing(const cp_cuda_graphs *g) {
    return g && g->mode == MODE_CAPTURE;
}

extern "C" void cp_cuda_graphs_drop(cp_cuda_graphs *g) {
    if (!g) return;
    for (int i = 0; i < CP_CUDA_GRAPH_CACHE; i++) {
        graph_slot *s = &g->slots[i];
        if (s == g->cur && g->mode != MODE_NONE) {
            /* the open bracket keeps its slot (a direct run is the warm-up:
             * the next sight records the new addresses); a capture in
             * progress may hold addresses that just went away */
            if (g->mode == MODE_CAPTURE || g->mode == MODE_REPLAY) g->poisoned = true;
            continue;
        }
        slot_clear(g, s);
    }
}

extern "C" void cp_cuda_graphs_set_enabled(cp_cuda_graphs *g, bool enabled) {
    if (!g || g->mode != MODE_NONE) return;
    if (!enabled) cp_cuda_graphs_drop(g);
    g->enabled = enabled;
}

extern "C" void cp_cuda_graphs_stats(const cp_cuda_graphs *g, cp_backend_graph_stats *out) {
    memset(out, 0, sizeof(*out));
    if (!g) return;
    *out = g->st;
    out->enabled = g->enabled;
    out->cached = 0;
    for (int i = 0; i < CP_CUDA_GRAPH_CACHE; i++)
        if (g->slots[i].state == SLOT_READY) out->cached++;
}
