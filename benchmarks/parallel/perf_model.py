#!/usr/bin/env python3
"""Decode-latency model for tensor-parallel serving at batch 1.

Predicts the time of one decode step (one token, one sequence) of a
Llama-family model split over TP GPUs, by default Llama-2-70B (80 layers,
dim 8192, 64 heads, 8 KV heads, FFN 28672, vocab 32000) in fp16 with TP=8
on an 8x H100 SXM node (NVLink 4 + NVSwitch), from

  (a) per-GPU kernel times: a GEMV at batch 1 streams this rank's weights
      once, so its time is bytes / achievable HBM bandwidth; attention reads
      this rank's KV cache; every kernel also pays a fixed overhead (launch
      gap, tail), and the FLOPs are checked against the tensor-core peak;
  (b) NCCL collectives: t = latency + bus_bytes / busbw (the Hockney form
      nccl-tests uses: an all-reduce moves 2 (n-1)/n of the buffer per rank,
      an all-gather (n-1)/n of the gathered buffer).

Each input has a nominal value and a pessimistic/optimistic one; the low and
high token rates take every input at its pessimistic or optimistic end.
Standard library only. Inputs and their sources: README.md next to this file.

  python3 perf_model.py                    # the default prediction
  python3 perf_model.py --gpu-bw 2900      # with a measured single-GPU GB/s
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


def breakdown(a, which):
    """Per-token times in microseconds for one end of the ranges."""
    m = a.model
    tp = a.tp
    hd = m["dim"] // m["heads"]
    kv_l = max(1, m["kv_heads"] // tp)  # KV heads per rank (replicated when tp > kv_heads)
    wb = a.weight_bytes
    # weights this rank streams per layer (elements): Q, O: dim x dim/tp;
    # K, V: dim x kv_l*hd; gate, up, down: dim x ffn/tp
    per_layer = (2 * m["dim"] * m["dim"] // tp + 2 * m["dim"] * kv_l * hd
                 + 3 * m["dim"] * m["ffn"] // tp)
    lm_head = m["vocab"] // tp * m["dim"]
    bw = (a.gpu_bw if a.gpu_bw else HBM_PEAK_GBS * BW_FRACTION[which]) * 1e3  # bytes/us
    attn_bw = HBM_PEAK_GBS * ATTN_BW_FRACTION[which] * 1e3
    if a.gpu_bw:  # a measured streaming number: scale the attention share alike
        attn_bw = a.gpu_bw * 1e3 * ATTN_BW_FRACTION[which] / BW_FRACTION[NOM]
    lat, busbw = AR_LATENCY_US[which], AR_BUSBW_GBS[which]
    if a.ar_latency_us is not None:
        lat = a.ar_latency_us
    L = m["layers"]
    t = {}
    t["weights"] = L * per_layer * wb / bw
    flops = 2.0 * (L * per_layer + lm_head)
    t["compute_floor"] = flops / (PEAK_TFLOPS * 1e6)  # overlapped with the reads
    kv_bytes = L * 2 * a.ctx * kv_l * hd * a.kv_bytes  # K and V of every position
    t["attention"] = kv_bytes / attn_bw
    t["kernel_overhead"] = L * KERNELS_PER_LAYER * KERNEL_OVERHEAD_US[which]
    msg = m["dim"] * a.act_bytes
    t["allreduce"] = 2 * L * ar_us(msg, tp, lat, busbw)
    t["embed_allreduce"] = ar_us(msg, tp, lat, busbw)  # vocabulary-parallel embedding
    t["lm_head"] = lm_head * wb / bw + KERNEL_OVERHEAD_US[which]
    t["logits_gather"] = ag_us(m["vocab"] * 4, tp, lat, busbw)  # fp32 logits
    t["sampling"] = SAMPLING_US[which]
    t["total"] = (max(t["weights"], t["compute_floor"]) + t["attention"] + t["kernel_overhead"]
                  + t["allreduce"] + t["embed_allreduce"] + t["lm_head"] + t["logits_gather"]
                  + t["sampling"])
    t["_per_layer_bytes"] = per_layer * wb
    t["_msg"] = msg
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
    ap.add_argument("--act-bytes", type=int, default=2,
                    help="bytes per all-reduced activation (default 2; this runtime's CPU "
                         "path sends fp32 = 4)")
    ap.add_argument("--gpu-bw", type=float, default=None, metavar="GB/S",
                    help="measured single-GPU streaming bandwidth (GB/s) replacing "
                         "peak x fraction at every end of the range")
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
          f"context {a.ctx}")
    bw_src = (f"measured {a.gpu_bw:g} GB/s" if a.gpu_bw else
              f"{HBM_PEAK_GBS:g} GB/s x {BW_FRACTION[NOM]:.2f} "
              f"(range {BW_FRACTION[LOW]:.2f}-{BW_FRACTION[HIGH]:.2f})")
    print(f"HBM streaming bandwidth: {bw_src}; weights per layer and rank "
          f"{nom['_per_layer_bytes'] / 1e6:.1f} MB")
    print(f"all-reduce of {m['dim']} x {a.act_bytes} B = {nom['_msg'] / 1024:.0f} KiB: "
          f"{nom['_ar_one']:.1f} us each (range {hi['_ar_one']:.1f}-{lo['_ar_one']:.1f})")
    print()
    rows = [
        ("weights read (GEMV, %d layers)" % L, "weights"),
        ("compute at tensor-core peak (overlaps the reads)", "compute_floor"),
        ("attention KV reads", "attention"),
        ("kernel overheads (%d kernels/layer)" % KERNELS_PER_LAYER, "kernel_overhead"),
        ("2 x %d all-reduces" % L, "allreduce"),
        ("embedding all-reduce", "embed_allreduce"),
        ("LM head GEMV", "lm_head"),
        ("logits all-gather (fp32)", "logits_gather"),
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
    comm = nom["allreduce"] + nom["embed_allreduce"] + nom["logits_gather"]
    print(f"communication: {comm / 1e3:.2f} ms/token ({100 * comm / nom['total']:.0f}% of the "
          f"step); weight streaming alone bounds the rate at "
          f"{1e6 / (nom['weights'] + nom['lm_head']):.0f} tokens/s")
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
