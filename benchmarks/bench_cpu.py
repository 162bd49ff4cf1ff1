#!/usr/bin/env python3
"""CPU throughput of cparallel against llama.cpp (through llama-cpp-python).

For each model: prefill of a 512-token prompt and 128 greedy decode steps,
same thread count for both engines, median of R repetitions. Prints a
Markdown table and writes it to benchmarks/results/cpu_<date>.md.
Timing only; correctness lives in tests/.
"""

import argparse
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    import llama_cpp
    from gguf import GGUFReader, LlamaFileType
except ImportError as e:
    sys.exit(f"bench_cpu.py: {e}; run it with the llama-cpp-python venv "
             "(e.g. /opt/llamacpp/bin/python), see benchmarks/README.md")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = os.path.join(REPO, "models")
DEFAULT_MODELS = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "rand-576x30.Q8_0.gguf",
    "rand-1024x16.f16.gguf",
    "rand-1024x16.Q8_0.gguf",
]

CPARALLEL_RE = re.compile(
    r"^cparallel: prefill (\d+) tokens in ([0-9.]+) ms \(([0-9.]+) tok/s\), "
    r"decode (\d+) tokens in ([0-9.]+) ms \(([0-9.]+) tok/s\)\s*$",
    re.MULTILINE)

# Fixed English text (original, written for this benchmark); trimmed so
# that it tokenizes to exactly --prompt-tokens tokens.
TEXT = """\
Before the railways, every town in the country kept its own time. Noon was
the moment the sun stood highest over the church tower, and a traveller who
rode west for a day had to set his watch back a few minutes on arrival. Nobody
minded, because nobody moved fast enough for the difference to matter. A
letter carried by coach took days, and a quarter of an hour lost or gained on
the way was hidden inside the general uncertainty of the roads.

The first railway companies changed that within a single decade. A train that
left the capital at nine o'clock and reached a port city three hours later had
to publish a timetable, and a timetable needs one clock. Station masters
complained that passengers missed connections because the platform clock and
the town hall clock disagreed by eleven minutes. Some stations solved the
problem by hanging two minute hands on the same dial, one for local time and
one for railway time, which confused everyone equally. Others simply adopted
the time of the company's headquarters and let the town argue about it.

The telegraph made a common time possible. An observatory could send a signal
down the wire at exactly ten o'clock every morning, and clerks in distant
offices would correct their clocks by it. Within a few years the signal
reached hundreds of stations, and then post offices, banks and factories.
Shopkeepers began to advertise that their windows showed "telegraph time", as
if precision were a product one could buy along with tea and thread.

Resistance was stubborn in places. A cathedral city refused for years to
abandon the sun, arguing that the hours belonged to heaven and not to a
company of engineers. Its clock kept local noon until a magistrate ruled that
a man who arrived late to court by railway time had, in law, arrived late. The
dean gave in the following month, although the bells continued for a while to
ring at the old hour, out of what the newspapers called affection and what the
railway managers called spite.

Across larger continents the problem was worse, because a single time could
not serve places thousands of miles apart. Engineers and astronomers proposed
dividing the world into zones, each one hour wide, so that clocks inside a
zone agreed and clocks in neighbouring zones differed by whole hours. The idea
seems obvious today, yet it took conferences, petitions and several decades
before governments accepted it. Farmers objected that cows did not read
timetables; preachers objected that the change was unnatural; and a few
towns changed their minds twice before settling into the zone their railway
had chosen for them.

What the railways began, electronics finished. Radio time signals reached
ships at sea, then quartz crystals made cheap clocks accurate to a second a
week, and finally atomic standards defined the second itself by counting the
oscillations of caesium atoms. A modern telephone corrects its clock silently
against satellites and servers many times a day. Its owner never thinks about
noon, and would be surprised to learn that the shadow of the church tower
still falls exactly north at a moment that his telephone calls by another
name. The sun has not changed its habits; only our agreement about what to
call them has changed, and that agreement was written, one timetable at a
time, by people who wanted trains to meet.
"""


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def model_info(path):
    """(type name, parameter count) from the GGUF header."""
    r = GGUFReader(path)
    ft = r.fields.get("general.file_type")
    try:
        tname = LlamaFileType(int(ft.contents())).name.replace(
            "MOSTLY_", "").replace("ALL_", "") if ft else "?"
    except ValueError:
        tname = str(int(ft.contents()))
    n_params = sum(int(np.prod(t.shape)) for t in r.tensors)
    return tname, n_params


def make_prompt(model_path, n_tokens):
    """Text from TEXT that llama.cpp tokenizes to exactly n_tokens ids."""
    vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(TEXT.encode(), add_bos=False, special=False)
        if len(ids) < n_tokens:
            sys.exit(f"bench_cpu.py: built-in text has only {len(ids)} "
                     f"tokens, fewer than --prompt-tokens {n_tokens}")
        # Cut the token list and re-tokenize the decoded prefix; a cut
        # inside a word can re-merge, so search the nearby cut points.
        for k in sorted(range(n_tokens - 8, n_tokens + 9),
                        key=lambda k: abs(k - n_tokens)):
            text = vocab.detokenize(ids[:k]).decode("utf-8")
            again = vocab.tokenize(text.encode(), add_bos=False,
                                   special=False)
            if len(again) == n_tokens:
                return text, list(again)
        sys.exit(f"bench_cpu.py: could not cut the text to exactly "
                 f"{n_tokens} tokens")
    finally:
        del vocab


def bench_llamacpp(model_path, prompt_ids, n_gen, threads, reps):
    n_ctx = len(prompt_ids) + n_gen + 16
    llm = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads,
                          logits_all=False, seed=0, verbose=False)
    n_vocab = llm.n_vocab()

    def last_argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    # Warm-up (page in weights, size the compute buffers); not timed.
    llm.reset()
    llm.eval(prompt_ids[:32])
    llm.eval([last_argmax()])

    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        t1 = time.perf_counter()
        # n_gen single-token forward passes (llama-bench's tg convention),
        # each fed the argmax of the previous logits.
        for _ in range(n_gen):
            llm.eval([last_argmax()])
        t2 = time.perf_counter()
        pp.append(len(prompt_ids) / (t1 - t0))
        tg.append(n_gen / (t2 - t1))
    del llm
    gc.collect()
    print("  llama.cpp reps: pp " + " ".join(f"{x:.1f}" for x in pp) +
          ", tg " + " ".join(f"{x:.1f}" for x in tg) + " tok/s",
          file=sys.stderr)
    return pp, tg


def bench_cparallel(exe, model_path, prompt_file, n_prompt, n_gen, threads,
                    reps):
    cmd = [exe, "generate", "--model", model_path, "--prompt-file",
           prompt_file, "--ignore-eos", "-n", str(n_gen), "--temperature",
           "0", "--threads", str(threads)]
    pp, tg = [], []
    for _ in range(reps):
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, check=False)
        matches = CPARALLEL_RE.findall(res.stderr)
        if res.returncode != 0 or not matches:
            tail = "\n".join(res.stderr.strip().splitlines()[-5:])
            print(f"  cparallel failed (rc {res.returncode}) on "
                  f"{os.path.basename(model_path)}:\n{tail}", file=sys.stderr)
            return None, None
        n_pp, _, pp_tps, n_tg, _, tg_tps = matches[-1]
        # cparallel counts n_gen - 1 decode steps (its first token comes
        # from the prefill logits); the rates are comparable either way.
        if int(n_pp) != n_prompt or int(n_tg) not in (n_gen, n_gen - 1):
            print(f"  warning: cparallel reported {n_pp} prompt / {n_tg} "
                  f"decode tokens, expected {n_prompt} / {n_gen}",
                  file=sys.stderr)
        pp.append(float(pp_tps))
        tg.append(float(tg_tps))
    print("  cparallel reps: pp " + " ".join(f"{x:.1f}" for x in pp) +
          ", tg " + " ".join(f"{x:.1f}" for x in tg) + " tok/s",
          file=sys.stderr)
    return pp, tg


def med(xs):
    return None if not xs else statistics.median(xs)


def reps_str(xs):
    return "n/a" if not xs else " ".join(f"{x:.1f}" for x in xs)


def fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    help="GGUF files (default: the default model plus the "
                         "random benchmark models in models/ that exist)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--cparallel", default=os.path.join(REPO, "build",
                                                        "cparallel"))
    ap.add_argument("--skip-cparallel", action="store_true",
                    help="measure llama.cpp only")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-write", action="store_true",
                    help="print the table only")
    a = ap.parse_args()

    models = a.models or [os.path.join(MODELS, m) for m in DEFAULT_MODELS
                          if os.path.exists(os.path.join(MODELS, m))]
    if not models:
        sys.exit("bench_cpu.py: no model files (see benchmarks/README.md)")
    for m in models:
        if not os.path.exists(m):
            sys.exit(f"bench_cpu.py: {m} does not exist")
    if not a.skip_cparallel and not os.access(a.cparallel, os.X_OK):
        sys.exit(f"bench_cpu.py: {a.cparallel} is not an executable; build "
                 "it or pass --skip-cparallel")

    tmpdir = tempfile.mkdtemp(prefix="cp_bench_")
    prompts = {}  # prompt ids depend only on the tokenizer; cache by model
    rows = []
    details = []  # every repetition, tok/s
    t_start = time.time()
    load_before = os.getloadavg()[0]
    for m in models:
        name = os.path.basename(m)
        tname, n_params = model_info(m)
        text, ids = make_prompt(m, a.prompt_tokens)
        key = tuple(ids)
        if key not in prompts:
            pf = os.path.join(tmpdir, f"prompt{len(prompts)}.txt")
            with open(pf, "w", encoding="utf-8") as f:
                f.write(text)
            prompts[key] = pf
        prompt_file = prompts[key]
        print(f"{name}: llama.cpp ...", file=sys.stderr, flush=True)
        l_pps, l_tgs = bench_llamacpp(m, ids, a.gen, a.threads, a.reps)
        c_pps = c_tgs = None
        if not a.skip_cparallel:
            print(f"{name}: cparallel ...", file=sys.stderr, flush=True)
            c_pps, c_tgs = bench_cparallel(a.cparallel, m, prompt_file,
                                           a.prompt_tokens, a.gen, a.threads,
                                           a.reps)
        details.append(f"- {name}: llama.cpp pp {reps_str(l_pps)}, tg "
                       f"{reps_str(l_tgs)}; cparallel pp {reps_str(c_pps)}, "
                       f"tg {reps_str(c_tgs)}")
        l_pp, l_tg, c_pp, c_tg = med(l_pps), med(l_tgs), med(c_pps), \
            med(c_tgs)
        rows.append((name, tname, n_params, l_pp, c_pp, l_tg, c_tg))
        print(f"  pp {fmt(l_pp)} / {fmt(c_pp)} tok/s, tg {fmt(l_tg)} / "
              f"{fmt(c_tg)} tok/s", file=sys.stderr, flush=True)
    elapsed = time.time() - t_start

    pp_h = f"pp{a.prompt_tokens}"
    tg_h = f"tg{a.gen}"
    lines = [
        f"| model | type | params | threads | llama.cpp {pp_h} tok/s | "
        f"cparallel {pp_h} tok/s | ratio | llama.cpp {tg_h} tok/s | "
        f"cparallel {tg_h} tok/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tname, n_params, l_pp, c_pp, l_tg, c_tg in rows:
        lines.append(
            f"| {name} | {tname} | {n_params / 1e6:.0f}M | {a.threads} | "
            f"{fmt(l_pp)} | {fmt(c_pp)} | {ratio(c_pp, l_pp)} | {fmt(l_tg)} "
            f"| {fmt(c_tg)} | {ratio(c_tg, l_tg)} |")
    table = "\n".join(lines)
    print(table)

    if a.no_write:
        return
    now = datetime.datetime.now()
    header = [
        f"# CPU benchmark, {now:%Y-%m-%d %H:%M}",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible), "
        f"threads: {a.threads}",
        f"- llama.cpp: llama-cpp-python {llama_cpp.__version__}, "
        f"system info: `{llama_cpp.llama_print_system_info().decode().strip()}`",
        f"- cparallel: {'not run' if a.skip_cparallel else a.cparallel}",
        f"- prompt: {a.prompt_tokens} tokens (one batch, n_batch=512), "
        f"decode: {a.gen} single-token greedy steps; median of {a.reps} "
        f"repetitions after one warm-up; model load not timed",
        f"- wall time of the whole run: {elapsed:.0f} s; 1-min load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other "
        f"processes competing for the cores make the numbers lower)",
        "- ratio = cparallel / llama.cpp (above 1: cparallel faster)",
        "",
    ]
    os.makedirs(a.results_dir, exist_ok=True)
    out = os.path.join(a.results_dir, f"cpu_{now:%Y-%m-%d}.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n" + table + "\n\nEvery repetition "
                "(tok/s):\n\n" + "\n".join(details) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
