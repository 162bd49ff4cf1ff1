#!/usr/bin/env python3
"""Decode-latency model for tensor-parallel serving at batch 1.

Predicts the time of one decode step (one token, one sequence) of a
Llama-family model split over TP GPUs, by default Llama-2-70B (80 layers,
dim 8192, 64 heads, 8 KV heads, FFN 28672, vocab 32000) in bf16 with TP=8
on an 8x H100 SXM node (NVLink 4 + NVSwitch), from

  (a) per-GPU kernel times. By default (--kernels measured) the ones this
      runtime measured on one H100 (benchmarks/gpu/results/h100_2026-11-24,
      Llama-3-8B shapes, bf16): a GEMV launch takes bytes / R + F, with R
      and F fitted to the Nsight Compute times of its four product groups,
      and the rest of a layer (norms, RoPE, KV store, attention at a short
      context, adds, the gaps between kernels) takes what the measured step
      left beyond its GEMVs, with and without CUDA graphs. --kernels
      published uses a fraction of the HBM peak and a fixed cost per kernel
      from published studies instead. Attention over the context adds this
      rank's KV bytes at a published fraction of the peak.
  (b) NCCL collectives: t = latency + bus_bytes / busbw (the Hockney form
      nccl-tests uses: an all-reduce moves 2 (n-1)/n of the buffer per rank).

Two runtimes are predicted:
  built   this runtime as it is: the activations cross the TP group in fp32,
          a step with collectives is not recorded as a CUDA graph (one
          rank's is), and with a collective deadline (the default) the host
          waits for each collective to finish before it issues the next
          kernels, so the GPU idles for a launch after every one;
  target  the same kernels with the step recorded as one graph (NCCL calls
          included), bf16 activations and no host wait per collective.

Each input has a nominal value and a pessimistic/optimistic one; the low and
high token rates take every input at its pessimistic or optimistic end.
Standard library only. Inputs and their sources: README.md next to this file.

  python3 perf_model.py                    # the default prediction (built)
  python3 perf_model.py --runtime target   # without the known overheads
  python3 perf_model.py --gpu-bw 2900      # another GEMV streaming rate, GB/s
  python3 perf_model.py --check 11.8       # compare a measured ms/token
"""

import argparse
import sys

# ---- inputs: (pessimistic, nominal, optimistic), each with its source -------
#
# HBM: H100 SXM5 80 GB peak 3.35 TB/s (NVIDIA H100 datasheet). Streaming
# GEMV reaches 75-90 % of peak: a Nsight Compute study of a 70B BF16 TP=8
# decode (mikamirai.com, "GPU Memory Bandwidth: What Your Profiler Isn't
# Telling You", 2026) reports coalesced matrix loads at 2.8 TB/s (84 %) and
# MLP weight loads at 2.6 TB/s (78 %).
HBM_PEAK_GBS = 3350.0
BW_FRACTION = (0.75, 0.80, 0.88)
#
# NCCL all-reduce on 8x H100 over NVSwitch:
# - large messages: nccl-tests busbw about 450 GB/s with NVLink SHARP (NVLS);
#   NVLink 4 gives 450 GB/s per direction per GPU, of which p2p tests reach
#   376-380 GB/s (NVIDIA/nccl issue #1264), ring all-reduce about 366 GB/s
#   busbw (4x H100 measurement, waynehacking8.github.io "Where tensor-parallel
#   inference hits the NVLink wall", 2026: 77 % of the unidirectional budget,
#   NVLS > Ring > Tree for large messages). busbw definition: nccl-tests
#   doc/PERFORMANCE.md (all-reduce busbw = algbw x 2 (n-1)/n).
# - small messages (16 KB at decode) sit on the latency floor: the LL
#   protocol costs about 1 us per hop, LL128 about 2 us, Simple about 6 us
#   (the-dsvolk.github.io "NCCL protocols, algorithms and tuning"); a ring of
#   8 has 2 x 7 hops, a tree/NVLS fewer; measured end-to-end small all-reduce
#   latencies on one NVLink node are 10-20 us (task brief; the same page
#   above shows the latency floor; vLLM-level measurements of ~20-50 us per
#   all-reduce include framework overhead, hungchun0201.github.io week 13).
AR_LATENCY_US = (20.0, 12.0, 8.0)
AR_BUSBW_GBS = (360.0, 450.0, 480.0)
#
# Kernels: a decode step launches ~16 kernels per layer in this runtime's
# forward pass (Q, K, V, O, gate, up, down GEMVs; 2 RMSNorms, 2 RoPEs, KV
# store, attention, 2 residual adds, SwiGLU). Each costs a fixed ~1-3 us
# beyond its memory traffic (launch gap inside a CUDA graph ~1 us, without
# graphs the 2-4 us CPU launch cost can dominate: estimate, not measured).
KERNELS_PER_LAYER = 16
KERNEL_OVERHEAD_US = (3.0, 1.5, 1.0)
# Attention at batch 1 reads the KV cache of this rank's KV heads; its
# achievable bandwidth is lower (paged, irregular): 42-57 % of peak in the
# same Nsight study.
ATTN_BW_FRACTION = (0.42, 0.50, 0.57)
# Tensor-core peak (dense BF16, H100 SXM5): 989 TFLOP/s; GEMVs reach a small
# part of it, which still makes compute negligible next to the weight reads.
PEAK_TFLOPS = 989.0
# Sampling at batch 1: argmax/top-k over the vocabulary on the GPU, copy of
# the token to the host and the host's loop (estimate).
SAMPLING_US = (30.0, 15.0, 8.0)

#
# ---- measured on one H100 SXM 80GB by this runtime (2026-11-24) -------------
# benchmarks/gpu/results/h100_2026-11-24/README.md, Llama-3-8B shapes, bf16,
# batch 1, ncu --clock-control none: per group of the step, launches / time /
# bytes read: QKV (grouped) 32 / 665 us / 1.61 GB; o and down 64 / 1948 us /
# 4.84 GB; gate/up with SwiGLU 32 / 2559 us / 7.52 GB; LM head 1 / 340 us /
# 1.05 GB. A launch taking bytes / R + F fits QKV and gate/up exactly with
# R = 3.12 TB/s and F = 4.7 us, the LM head to 1 %, o and down 5 % fast;
# fitting o and down instead gives R = 2.93 TB/s (the pessimistic end).
GEMV_RATE_GBS = (2930.0, 3120.0, 3170.0)
GEMV_FIXED_US = (6.0, 4.7, 4.0)
# The step took 6.17 ms with graphs and 6.54 ms without, its GEMVs 5.51 ms:
# the rest of each of the 32 layers (2 RMSNorms, RoPE + KV store, attention
# over ~20 positions, residual adds, the gaps between kernels; argmax is in
# it too) took 20.6 us with graphs and 32.2 us without. The ends: +-20 %.
OTHER_LAYER_US_GRAPH = (24.7, 20.6, 16.5)
OTHER_LAYER_US_NOGRAPH = (38.6, 32.2, 25.8)
#
# ---- this runtime's collectives (runtime/forward.c, parallel/comm_nccl.c) ---
# With a deadline (--collective-timeout, 60 s by default) each NCCL call
# waits on the host until the stream has passed it, and only then are the
# next kernels issued: the GPU idles for the host to notice (it polls) and
# for the next launch to reach the GPU. Estimate, not measured: a launch
# takes 4-8 us from the call to the kernel's start when the queue is empty.
HOST_WAIT_US = (10.0, 6.0, 3.0)
# Sampling across TP ranks: each rank's best candidates go to the host and
# two MPI all-gathers of 4 x tp bytes (shared memory) merge them; the
# chosen token goes back up. Estimate.
SAMPLING_TP_US = (40.0, 20.0, 12.0)

# Llama-2-70B (config.json of meta-llama/Llama-2-70b-hf).
LLAMA2_70B = dict(layers=80, dim=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000)

LOW, NOM, HIGH = 0, 1, 2  # pessimistic, nominal, optimistic


def ar_us(nbytes, n, lat_us, busbw_gbs):
    """All-reduce of nbytes over n ranks: latency + 2 (n-1)/n bytes / busbw."""
    if n <= 1:
        return 0.0
    return lat_us + nbytes * 2.0 * (n - 1) / n / (busbw_gbs * 1e3)


def ag_us(total_bytes, n, lat_us, busbw_gbs):
    """All-gather of total_bytes (gathered) over n ranks."""
    if n <= 1:
        return 0.0
    return lat_us + total_bytes * (n - 1) / n / (busbw_gbs * 1e3)


def rank_shapes(m, tp):
    """(rows, cols) of the GEMV launches of one layer on one rank, in this
    runtime's order: grouped QKV, O, gate/up fused with SwiGLU, down; and
    the KV heads the rank holds (replicated when tp exceeds them)."""
    hd = m["dim"] // m["heads"]
    kv_l = m["kv_heads"] // tp if m["kv_heads"] % tp == 0 else 1
    q_l = m["heads"] // tp
    return ([((q_l + 2 * kv_l) * hd, m["dim"]), (m["dim"], q_l * hd),
             (2 * m["ffn"] // tp, m["dim"]), (m["dim"], m["ffn"] // tp)], kv_l, hd)


def breakdown(a, which):
    """Per-token times in microseconds for one end of the ranges."""
    m = a.model
    tp = a.tp
    built = a.runtime == "built"
    graph = not built or tp == 1  # one rank records its decode steps as graphs
    launches, kv_l, hd = rank_shapes(m, tp)
    wb = a.weight_bytes
    per_layer = sum(r * c for r, c in launches)  # weights this rank streams per layer
    lm_head = m["vocab"] // tp * m["dim"]
    L = m["layers"]
    attn_bw = HBM_PEAK_GBS * ATTN_BW_FRACTION[which] * 1e3  # bytes/us
    t = {}
    if a.kernels == "measured":
        rate = (a.gpu_bw if a.gpu_bw else GEMV_RATE_GBS[which]) * 1e3
        fixed = GEMV_FIXED_US[which]
        t["weights"] = L * per_layer * wb / rate
        t["gemv_fixed"] = L * len(launches) * fixed
        other = OTHER_LAYER_US_GRAPH[which] if graph else OTHER_LAYER_US_NOGRAPH[which]
        t["other_kernels"] = L * other
        t["lm_head"] = lm_head * wb / rate + fixed
        bw = rate
    else:
        bw = (a.gpu_bw if a.gpu_bw else HBM_PEAK_GBS * BW_FRACTION[which]) * 1e3
        if a.gpu_bw:  # a measured streaming number: scale the attention share alike
            attn_bw = a.gpu_bw * 1e3 * ATTN_BW_FRACTION[which] / BW_FRACTION[NOM]
        t["weights"] = L * per_layer * wb / bw
        t["gemv_fixed"] = 0.0
        t["other_kernels"] = L * KERNELS_PER_LAYER * KERNEL_OVERHEAD_US[which]
        t["lm_head"] = lm_head * wb / bw + KERNEL_OVERHEAD_US[which]
    flops = 2.0 * (L * per_layer + lm_head)
    t["compute_floor"] = flops / (PEAK_TFLOPS * 1e6)  # overlapped with the reads
    kv_bytes = L * 2 * a.ctx * kv_l * hd * a.kv_bytes  # K and V of every position
    t["attention"] = kv_bytes / attn_bw
    lat, busbw = AR_LATENCY_US[which], AR_BUSBW_GBS[which]
    if a.ar_latency_us is not None:
        lat = a.ar_latency_us
    act = a.act_bytes if a.act_bytes else (4 if built else 2)
    msg = m["dim"] * act
    n_coll = 2 * L + 1 if tp > 1 else 0  # two per layer and the vocabulary-parallel embedding
    t["allreduce"] = n_coll * ar_us(msg, tp, lat, busbw)
    t["host_wait"] = n_coll * HOST_WAIT_US[which] if built else 0.0
    t["sampling"] = SAMPLING_TP_US[which] if tp > 1 else SAMPLING_US[which]
    t["total"] = (max(t["weights"], t["compute_floor"]) + t["gemv_fixed"] + t["other_kernels"]
                  + t["attention"] + t["allreduce"] + t["host_wait"] + t["lm_head"] + t["sampling"])
    t["_per_layer_bytes"] = per_layer * wb
    t["_msg"] = msg
    t["_act"] = act
    t["_n_coll"] = n_coll
    t["_ar_one"] = ar_us(msg, tp, lat, busbw)
    t["_bw"] = bw
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=8, help="tensor-parallel GPUs (default 8)")
    ap.add_argument("--ctx", type=int, default=1024,
                    help="tokens already in the KV cache (default 1024)")
    ap.add_argument("--weight-bytes", type=float, default=2.0,
                    help="bytes per weight: 2 fp16/bf16 (default), 1 fp8/int8, "
                         "0.5625 Q4_1-like")
    ap.add_argument("--kv-bytes", type=float, default=2.0, help="bytes per KV element (default 2)")
    ap.add_argument("--runtime", choices=("built", "target"), default="built",
                    help="built: this runtime as it is (fp32 activations, no graph around "
                         "collectives, a host wait per collective); target: without those")
    ap.add_argument("--kernels", choices=("measured", "published"), default="measured",
                    help="per-GPU kernel times: this runtime's H100 measurement (default) or "
                         "fractions of the HBM peak from published studies")
    ap.add_argument("--act-bytes", type=int, default=0,
                    help="bytes per all-reduced activation (default: 4 built, 2 target)")
    ap.add_argument("--gpu-bw", type=float, default=None, metavar="GB/S",
                    help="single-GPU GEMV streaming rate (GB/s) replacing the measured or "
                         "published one at every end of the range")
    ap.add_argument("--ar-latency-us", type=float, default=None,
                    help="measured small-message all-reduce latency (us) at every end")
    ap.add_argument("--layers", type=int, default=LLAMA2_70B["layers"])
    ap.add_argument("--dim", type=int, default=LLAMA2_70B["dim"])
    ap.add_argument("--heads", type=int, default=LLAMA2_70B["heads"])
    ap.add_argument("--kv-heads", type=int, default=LLAMA2_70B["kv_heads"])
    ap.add_argument("--ffn", type=int, default=LLAMA2_70B["ffn"])
    ap.add_argument("--vocab", type=int, default=LLAMA2_70B["vocab"])
    ap.add_argument("--check", type=float, default=None, metavar="MEASURED_MS",
                    help="measured decode ms/token to compare with the prediction")
    a = ap.parse_args(argv)
    a.model = dict(layers=a.layers, dim=a.dim, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn,
                   vocab=a.vocab)
    m = a.model
    if a.tp < 1 or m["heads"] % a.tp or (m["kv_heads"] % a.tp and a.tp % m["kv_heads"]):
        sys.exit(f"perf_model.py: tp={a.tp} must divide the {m['heads']} heads and divide "
                 f"or be a multiple of the {m['kv_heads']} KV heads")

    lo, nom, hi = (breakdown(a, w) for w in (LOW, NOM, HIGH))
    L = m["layers"]
    print(f"Decode step at batch 1: {L} layers, dim {m['dim']}, {m['heads']}/{m['kv_heads']} "
          f"heads, FFN {m['ffn']}, vocab {m['vocab']}, TP={a.tp}, {a.weight_bytes:g} B/weight, "
          f"context {a.ctx}; runtime {a.runtime}, kernels {a.kernels}")
    if a.kernels == "measured":
        src = (f"{a.gpu_bw:g} GB/s given" if a.gpu_bw else
               f"{GEMV_RATE_GBS[NOM]:g} GB/s (range {GEMV_RATE_GBS[LOW]:g}-{GEMV_RATE_GBS[HIGH]:g})")
        src += f" + {GEMV_FIXED_US[NOM]:g} us per launch, measured on one H100"
    else:
        src = (f"{a.gpu_bw:g} GB/s given" if a.gpu_bw else
               f"{HBM_PEAK_GBS:g} GB/s x {BW_FRACTION[NOM]:.2f} "
               f"(range {BW_FRACTION[LOW]:.2f}-{BW_FRACTION[HIGH]:.2f})")
    print(f"GEMV streaming: {src}; weights per layer and rank {nom['_per_layer_bytes'] / 1e6:.1f} MB")
    if nom["_n_coll"]:
        print(f"all-reduce of {m['dim']} x {nom['_act']} B = {nom['_msg'] / 1024:.0f} KiB: "
              f"{nom['_ar_one']:.1f} us each (range {hi['_ar_one']:.1f}-{lo['_ar_one']:.1f})")
    print()
    other = ("other kernels of a layer, measured (%s)" % ("no graph" if a.runtime == "built" and a.tp > 1
                                                            else "graph")
             if a.kernels == "measured" else "kernel overheads (%d kernels/layer)" % KERNELS_PER_LAYER)
    rows = [
        ("weights read (GEMV, %d layers)" % L, "weights"),
        ("compute at tensor-core peak (overlaps the reads)", "compute_floor"),
        ("GEMV fixed cost per launch", "gemv_fixed"),
        (other, "other_kernels"),
        ("attention KV reads", "attention"),
        ("%d all-reduces" % nom["_n_coll"], "allreduce"),
        ("host wait after each collective", "host_wait"),
        ("LM head GEMV", "lm_head"),
        ("sampling + token to host", "sampling"),
    ]
    w = max(len(r[0]) for r in rows) + 2
    print(f"{'part':<{w}}{'nominal us':>12}{'optimistic':>12}{'pessimistic':>13}{'share':>8}")
    for label, key in rows:
        share = "" if key == "compute_floor" else f"{100 * nom[key] / nom['total']:.1f}%"
        print(f"{label:<{w}}{nom[key]:>12.1f}{hi[key]:>12.1f}{lo[key]:>13.1f}{share:>8}")
    print(f"{'total':<{w}}{nom['total']:>12.1f}{hi['total']:>12.1f}{lo['total']:>13.1f}")
    print()
    ms = nom["total"] / 1e3
    print(f"predicted: {ms:.2f} ms/token = {1e3 / ms:.1f} tokens/s "
          f"(bounds {1e6 / lo['total']:.1f} - {1e6 / hi['total']:.1f} tokens/s, "
          f"{hi['total'] / 1e3:.2f} - {lo['total'] / 1e3:.2f} ms)")
    comm = nom["allreduce"] + nom["host_wait"]
    print(f"communication: {comm / 1e3:.2f} ms/token ({100 * comm / nom['total']:.0f}% of the "
          f"step); weight streaming alone bounds the rate at "
          f"{1e6 / (nom['weights'] + nom['lm_head']):.0f} tokens/s")
    other_rt = "target" if a.runtime == "built" else "built"
    b = argparse.Namespace(**vars(a))
    b.runtime = other_rt
    o = breakdown(b, NOM)
    print(f"the {other_rt} runtime, same inputs: {o['total'] / 1e3:.2f} ms/token = "
          f"{1e6 / o['total']:.1f} tokens/s")
    if a.check is not None:
        if a.check <= 0:
            sys.exit("perf_model.py: --check needs a positive ms/token")
        ratio = a.check / ms
        inside = hi["total"] / 1e3 <= a.check <= lo["total"] / 1e3
        print(f"check: measured {a.check:.2f} ms/token = {ratio:.2f} x the prediction; "
              f"{'inside' if inside else 'OUTSIDE'} the bounds "
              f"[{hi['total'] / 1e3:.2f}, {lo['total'] / 1e3:.2f}] ms")
        return 0 if inside else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
