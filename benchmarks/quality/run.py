#!/usr/bin/env python3
"""Quality of cparallel's quantizations and prunings on the default model.

Every variant is quantized from the same baseline (the default model's
weights dequantized to f32), then measured against that baseline over the
evaluation text: perplexity, KL(baseline || variant) and top-1 agreement
(`cparallel eval --reference`), the size on disk, and greedy decode speed
on the CPU (`cparallel generate`). When llama-cpp-python is importable
(e.g. run it with that environment's python), a second table gets
llama.cpp's perplexity for its own F32, Q8_0, Q4_0 and Q4_K_M of the
baseline, over the same windows and tokens.

    python3 benchmarks/quality/run.py [--build build] [--threads 2] [--out results.md]
"""
import argparse, json, os, re, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/"
# the evaluation text: four chapters of the Python tutorial (python3-doc),
# about 15,500 tokens, none of them the calibration chapter
CHAPTERS = ["appetite", "interpreter", "introduction", "datastructures"]
CALIB = TUTORIAL + "controlflow.rst.txt"
TEXT = None  # the chapters joined, written into the work directory by main()
# (name, command and its options, file name); the pruned variants are
# written as q8_0 (2:4 as S24_Q8, its compressed int8) so they compare with the q8_0 row
VARIANTS = [
    ("int8 (per channel)", ["quantize", "--type", "int8"], "int8.safetensors"),
    ("fp8 E4M3 (W8A8)", ["quantize", "--type", "fp8"], "fp8.safetensors"),
    ("int4 g128", ["quantize", "--type", "int4"], "int4.safetensors"),
    ("awq (int4 g128)", ["quantize", "--type", "awq", "--calib", CALIB], "awq.safetensors"),
    ("q8_0", ["quantize", "--type", "q8_0"], "q8_0.gguf"),
    ("q4_0", ["quantize", "--type", "q4_0"], "q4_0.gguf"),
    ("q4_k", ["quantize", "--type", "q4_k"], "q4_k.gguf"),
    ("wanda 50% (q8_0)", ["prune", "--sparsity", "0.5", "--type", "q8_0", "--calib", CALIB], "wanda.gguf"),
    ("2:4 wanda (S24_Q8)", ["prune", "--sparsity", "2:4", "--calib", CALIB], "s24.safetensors"),
    ("drop 2 layers (q8_0)", ["prune", "--drop-layers", "2", "--type", "q8_0", "--calib", CALIB], "drop2.gguf"),
]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("failed: %s\n%s%s" % (" ".join(cmd), r.stdout, r.stderr))
    return r


def decode_speed(exe, model, threads):
    r = run([exe, "generate", "--model", model, "--no-progress", "--threads", str(threads), "--temperature", "0",
             "-n", "64", "-p", "The Python tutorial explains"])
    m = re.search(r"decode (\d+) tokens in [\d.]+ ms \(([\d.]+) tok/s\)", r.stderr)
    return float(m.group(2)) if m else float("nan")


def evaluate(exe, model, ref, threads, ctx):
    r = run([exe, "eval", "--model", model, "--reference", ref, "--text", TEXT, "--ctx", str(ctx), "--json",
             "--no-progress", "--threads", str(threads)])
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_cpp_ppl(base_f32, work, ctx, threads):
    """llama.cpp's own quantizer and forward pass, scored over the same windows
    as `cparallel eval` (windows of ctx every ctx/2 tokens; each token scored
    once, in the first window that holds it with context), or None."""
    try:
        import llama_cpp  # noqa: F401
        import numpy as np
    except ImportError:
        return None
    out = {}
    ftypes = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # LLAMA_FTYPE_*
    text = open(TEXT, encoding="utf-8").read()
    stride = ctx // 2
    for name, ft in ftypes.items():
        path = os.path.join(work, "llama-%s.gguf" % name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ft
        params.nthread = threads
        if llama_cpp.llama_model_quantize(base_f32.encode(), path.encode(), params) != 0:
            return None
        llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, logits_all=True, n_threads=threads, verbose=False)
        toks = llm.tokenize(text.encode())
        n_tok = len(toks)
        nll, n, prev_end, begin = 0.0, 0, 0, 0
        while True:
            end = min(begin + ctx, n_tok)
            first = max(prev_end, begin + 1)
            llm.reset()
            llm.eval(toks[begin:end])
            lg = np.array(llm.scores[:end - begin], dtype=np.float64)
            for t in range(first, end):
                row = lg[t - 1 - begin]
                mx = row.max()
                nll += mx + np.log(np.exp(row - mx).sum()) - row[toks[t]]
                n += 1
            prev_end = end
            if end == n_tok:
                break
            begin += stride
        out[name] = (float(np.exp(nll / n)), os.path.getsize(path), n)
        del llm
        os.remove(path)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality", "results.md"))
    ap.add_argument("--chapters", default=",".join(CHAPTERS),
                    help="tutorial chapters joined into the evaluation text (comma-separated)")
    a = ap.parse_args()
    exe = os.path.join(a.build, "cparallel")
    work = tempfile.mkdtemp(prefix="cp-quality-")
    global TEXT
    chapters = a.chapters.split(",")
    TEXT = os.path.join(work, "eval.txt")
    with open(TEXT, "w", encoding="utf-8") as f:
        f.write("\n".join(open(TUTORIAL + c + ".rst.txt", encoding="utf-8").read() for c in chapters))
    base = os.path.join(work, "baseline-f32.gguf")
    run([exe, "quantize", "--model", a.model, "--out", base, "--type", "f32", "--no-eval", "--no-progress"])
    rows = []
    ref = evaluate(exe, base, base, a.threads, a.ctx)
    rows.append(("baseline (f32 of the Q4_1 file)", ref, os.path.getsize(base), decode_speed(exe, base, a.threads), 0))
    for name, args, fname in VARIANTS:
        path = os.path.join(work, fname)
        t0 = time.time()
        run([exe] + args + ["--model", base, "--out", path, "--no-eval", "--no-progress", "--threads", str(a.threads)])
        secs = time.time() - t0
        r = evaluate(exe, path, base, a.threads, a.ctx)
        rows.append((name, r, os.path.getsize(path), decode_speed(exe, path, a.threads), secs))
        os.remove(path)
    peer = llama_cpp_ppl(base, work, a.ctx, a.threads)
    lines = [
        "# Quantization and pruning quality on the default model",
        "",
        "SmolLM2-135M-Instruct; baseline = its Q4_1 weights dequantized to f32; evaluation text: the "
        "chapters %s of the Python tutorial (%s*.rst.txt, python3-doc), joined by newlines "
        "(%d tokens scored, windows of %d, stride %d); AWQ and the pruning scores calibrated on %s. "
        "CPU: %d threads, %s."
        % (", ".join(chapters), TUTORIAL, ref["tokens"], ref["ctx"], ref["stride"], CALIB, a.threads,
           os.uname().machine),
        "",
        "| variant | perplexity | vs baseline | KL mean (nats) | KL p99 | top-1 | size (MB) | decode tok/s | write s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bppl = ref["ppl"]
    for name, r, size, tps, secs in rows:
        lines.append("| %s | %.3f | %+.2f%% | %.4f | %.4f | %.2f%% | %.1f | %.1f | %.0f |" % (
            name, r["ppl"], 100 * (r["ppl"] / bppl - 1), r.get("kl_mean", 0), r.get("kl_p99", 0),
            100 * r.get("top1", 1), size / 1e6, tps, secs))
    lines.append("")
    if peer:
        import llama_cpp
        lines.append("llama.cpp (llama-cpp-python %s): its own quantizer from the same f32 baseline and its "
                     "own forward pass, scored over the same windows and tokens as above; \"vs its f32\" "
                     "compares with its own f32 run of the baseline:" % llama_cpp.__version__)
        lines.append("")
        lines.append("| llama.cpp type | perplexity | vs its f32 | tokens scored | size (MB) |")
        lines.append("|---|---|---|---|---|")
        lp = peer["F32"][0]
        for k, (p, size, n) in peer.items():
            lines.append("| %s | %.3f | %+.2f%% | %d | %.1f |" % (k, p, 100 * (p / lp - 1), n, size / 1e6))
    else:
        lines.append("llama.cpp: not measured (llama-cpp-python is not installed here).")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    os.remove(base)
    os.remove(TEXT)
    os.rmdir(work) if not os.listdir(work) else None


if __name__ == "__main__":
    main()
