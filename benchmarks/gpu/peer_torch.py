#!/usr/bin/env python3
"""GPU throughput of PyTorch + Hugging Face transformers on a Llama checkpoint
directory (the peer cparallel is compared against on the same GPU).

Measures, in bf16 on one CUDA device:
  * prefill: one forward pass over --prompt-len random token ids at batch 1
    (KV cache built, logits of the last position only, as generation does);
  * decode: for each batch size, a --decode-prompt-len token prompt is
    prefilled, then --gen - 1 single-token greedy steps are timed, each
    feeding the argmax of the previous step's logits through the KV cache
    (a manual loop over forward calls; --decode-method generate times
    model.generate with min_new_tokens = max_new_tokens instead).
Each figure is the median of --reps timed runs after --warmup untimed ones,
with torch.cuda.synchronize() around every timed region. Model load is not
timed. Prints a Markdown table and writes every run to --json.
Timing only; correctness lives in tests/.
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time

try:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:  # pragma: no cover - depends on the machine
    sys.exit(f"peer_torch.py: {e}; it needs torch and transformers (see benchmarks/gpu/README.md)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--prompt-len", type=int, default=2048, help="prefill prompt length at batch 1 (default 2048)")
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes, comma-separated (default 1,8,32,64)")
    p.add_argument("--gen", type=int, default=64, help="new tokens per sequence in decode (default 64)")
    p.add_argument("--decode-prompt-len", type=int, default=16, help="prompt tokens before decode (default 16)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions, the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="transformers attn_implementation (default sdpa)")
    p.add_argument("--decode-method", default="loop", choices=["loop", "generate"],
                   help="loop: timed forward calls with the KV cache (default); generate: model.generate")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                   help="KV cache of --decode-method generate (default dynamic; the loop always uses dynamic)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    try:
        a.batches = [int(x) for x in a.batches.split(",") if x.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got '{a.batches}'")
    if not a.batches or min(a.batches) < 1:
        p.error("--batches needs at least one batch size >= 1")
    for name in ("prompt_len", "gen", "decode_prompt_len", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.gen < 2:
        p.error("--gen must be >= 2 (the first token comes from the prefill)")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def forward_kwargs(model):
    """Keyword arguments that keep only the last position's logits, where the
    installed transformers supports it (the LM head over 128k vocabulary
    entries for every prompt position is work a generator never does)."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}, "last"
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}, "last"
    return {}, "all"


def load_model(args, device):
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    # transformers renamed torch_dtype to dtype in 4.56
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    kw = {dtype_kw: torch.bfloat16, "attn_implementation": args.attn}
    try:
        import accelerate  # noqa: F401  (device_map needs it)
        kw["device_map"] = str(device)
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
    except ImportError:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw).to(device)
    model.eval()
    return model


def bench_prefill(args, model, device, vocab, gen, fkw):
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=gen, device="cpu").to(device)

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=True, **fkw)

    for _ in range(args.warmup):
        run()
    runs = []
    for _ in range(args.reps):
        t, out = timed(device, run)
        runs.append(t)
        del out
    med = statistics.median(runs)
    return {"batch": 1, "prompt_len": args.prompt_len, "median_s": med,
            "tokens_per_s": args.prompt_len / med, "runs_s": runs}


def decode_loop(model, prompt, n_steps, fkw, device):
    """Prefills prompt, then times n_steps greedy single-token steps."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, **fkw)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        del out
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        sync(device)
        return time.perf_counter() - t0


def decode_generate(model, prompt, gen_tokens, args, device, pad_id):
    """Whole model.generate time and the prefill time of the same prompt; the
    difference is the decode time of gen_tokens - 1 steps."""
    mask = torch.ones_like(prompt)
    gkw = dict(max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False, temperature=None,
               top_p=None, top_k=None, pad_token_id=pad_id, attention_mask=mask)
    if args.cache == "static":
        gkw["cache_implementation"] = "static"
    with torch.inference_mode():
        t_all, out = timed(device, lambda: model.generate(prompt, **gkw))
        assert out.shape[1] == prompt.shape[1] + gen_tokens, "generate stopped early"
        t_pre, _ = timed(device, lambda: model(input_ids=prompt, attention_mask=mask, use_cache=True))
    return max(t_all - t_pre, 1e-9)


def bench_decode(args, model, device, vocab, gen, fkw, batch, pad_id):
    prompt = torch.randint(0, vocab, (batch, args.decode_prompt_len), generator=gen, device="cpu").to(device)
    steps = args.gen - 1

    def run():
        if args.decode_method == "loop":
            return decode_loop(model, prompt, steps, fkw, device)
        return decode_generate(model, prompt, args.gen, args, device, pad_id)

    for _ in range(args.warmup):
        run()
    runs = [run() for _ in range(args.reps)]
    med = statistics.median(runs)
    return {"batch": batch, "prompt_len": args.decode_prompt_len, "gen": args.gen, "timed_steps": steps,
            "median_s": med, "tokens_per_s": batch * steps / med, "ms_per_step": 1e3 * med / steps,
            "runs_s": runs}


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("peer_torch.py: CUDA is not available (use --device cpu only for a smoke test)")
    cfg = AutoConfig.from_pretrained(args.model)
    vocab = cfg.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    t0 = time.perf_counter()
    model = load_model(args, device)
    load_s = time.perf_counter() - t0
    fkw, logits_kept = forward_kwargs(model)
    attn = getattr(model.config, "_attn_implementation", args.attn)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad_id = eos if eos is not None else 0
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"peer_torch: {args.model}: {n_params / 1e9:.2f} B parameters, bf16, attn={attn}, "
          f"loaded in {load_s:.1f} s on {dev_name}", file=sys.stderr, flush=True)

    res = {
        "peer": "pytorch+transformers",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": dev_name,
        "model": os.path.abspath(args.model),
        "model_name": getattr(cfg, "_name_or_path", ""),
        "n_params": n_params,
        "dtype": "bfloat16",
        "attn_implementation": attn,
        "decode_method": args.decode_method,
        "cache": "dynamic" if args.decode_method == "loop" else args.cache,
        "prefill_logits": logits_kept,
        "warmup": args.warmup,
        "reps": args.reps,
        "seed": args.seed,
        "load_s": load_s,
        "prefill": None,
        "decode": [],
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        res["prefill"] = bench_prefill(args, model, device, vocab, gen, fkw)
    except torch.OutOfMemoryError as e:
        res["prefill"] = {"batch": 1, "prompt_len": args.prompt_len, "error": f"out of memory: {e}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for b in args.batches:
        try:
            r = bench_decode(args, model, device, vocab, gen, fkw, b, pad_id)
        except torch.OutOfMemoryError as e:
            r = {"batch": b, "prompt_len": args.decode_prompt_len, "gen": args.gen, "error": f"out of memory: {e}"}
        res["decode"].append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"peer_torch: decode batch {b}: "
              + (f"{r['tokens_per_s']:.1f} tok/s" if "error" not in r else r["error"]), file=sys.stderr, flush=True)
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9

    print(f"\nPyTorch {torch.__version__} + transformers {transformers.__version__}, {dev_name}, bf16, "
          f"attn={attn}, decode={res['decode_method']}/{res['cache']} cache, median of {args.reps} "
          f"after {args.warmup} warm-up\n")
    print("| phase | batch | prompt | new tokens | time (ms) | tokens/s | ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    p = res["prefill"]
    if "error" in p:
        print(f"| prefill | 1 | {args.prompt_len} | - | {p['error'][:40]} | - | - |")
    else:
        print(f"| prefill | 1 | {args.prompt_len} | - | {1e3 * p['median_s']:.1f} | {p['tokens_per_s']:.0f} | - |")
    for r in res["decode"]:
        if "error" in r:
            print(f"| decode | {r['batch']} | {r['prompt_len']} | {r['gen']} | {r['error'][:40]} | - | - |")
        else:
            print(f"| decode | {r['batch']} | {r['prompt_len']} | {r['gen']} | {1e3 * r['median_s']:.1f} | "
                  f"{r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
