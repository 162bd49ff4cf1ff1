#!/usr/bin/env python3
"""loadgen.py - a closed-loop load generator for OpenAI-compatible servers.

Streams /v1/completions from C concurrent clients over a bounded, seeded set
of requests and reports, per concurrency level, output tokens/s, requests/s
and TTFT / TPOT / end-to-end latency percentiles. Standard library only, so it
runs on a machine without PyPI access. Timing only: it checks no output text.

  loadgen.py --url http://127.0.0.1:8080 --requests 32 --concurrency 1,8,32 \
             --mix short --json out.json
"""
import argparse
import http.client
import json
import math
import os
import platform
import random
import sys
import threading
import time
import urllib.parse

# Common English words that GPT-2-style and Llama-3-style BPE vocabularies
# (SmolLM2, Llama 3) hold as one token with a leading space, so a prompt of
# L words (each with a leading space) is about L tokens (exactly L with
# SmolLM2's tokenizer and synth_tokenizer.py's). Servers that report usage
# give the exact count, recorded per request.
WORDS = """
the of and to in is was for on are as with his they at be this from have or
by one had not but what all were when we there can an your which their said
if do will each about how up out them then she many some so these would other
into has more her two like him see time could no make than first been its who
now people my made over did down only way find use may water long little very
after words called just where most know get through back much before go good
new write our used me man too any day same right look think also around another
came come work three word must because does part even place well such here take
why things help put years different away again off went old number great tell
men say small every found still between name should home big give air line set
own under read last never us left end along while might next sound below saw
something thought both few those always looked show large often together asked
house world going want school important until form food keep children feet land
side without boy once animals life enough took sometimes four head above kind
began almost live page got earth need far hand high year mother light parts
country father let night following picture being study second eyes soon times
story boys since white days ever paper hard near sentence better best across
during today others however sure means knew try told young miles sun ways
thing whole hear example heard several change answer room sea against top turned
learn point city play toward five using himself usually money seen car morning
""".split()

MIXES = {
    # name: (prompt lo, prompt hi, output lo, output hi), tokens, inclusive
    "short": (32, 256, 32, 128),
    "long": (256, 1024, 128, 256),
}


def pct(xs, p):
    """The p-th percentile (0-100) of xs with linear interpolation; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_plan(args):
    """(prompt_len, output_len) per request: the same for every level."""
    rng = random.Random(args.seed)
    if args.prompt_len:
        return [(args.prompt_len, args.output_len)] * args.requests
    plo, phi, olo, ohi = MIXES[args.mix]
    return [(rng.randint(plo, phi), rng.randint(olo, ohi)) for _ in range(args.requests)]


def make_prompt(seed, level, index, n_words):
    """n_words words from WORDS, drawn from a generator seeded by (seed, level,
    index): every server sees the same text, and no two requests share a
    prefix, so prefix caches do not skew the comparison."""
    rng = random.Random("%d:%s:%d" % (seed, level, index))
    # a leading space: every word is " word", one token in common vocabularies
    return "".join(" " + rng.choice(WORDS) for _ in range(n_words))


class Target:
    def __init__(self, url, timeout, api_key):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit("loadgen: only http:// URLs are supported, got %r" % url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.base = u.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = "Bearer " + api_key

    def get(self, path, timeout=5.0):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", self.base + path, headers=self.headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def wait_ready(t, seconds):
    """Polls /health/ready (or /v1/models for servers without it) until 200."""
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        for path in ("/health/ready", "/v1/models"):
            try:
                st, body = t.get(path)
            except OSError as e:
                last = repr(e)
                break
            if st == 200:
                return
            last = "GET %s: HTTP %d" % (path, st)
            if st != 404:
                break
        time.sleep(0.25)
    raise SystemExit("loadgen: the server was not ready within %g s (%s)" % (seconds, last))


def served_model(t):
    st, body = t.get("/v1/models")
    if st != 200:
        raise SystemExit("loadgen: GET /v1/models: HTTP %d; pass --model" % st)
    data = json.loads(body).get("data") or []
    if not data:
        raise SystemExit("loadgen: GET /v1/models lists no model; pass --model")
    return data[0]["id"]


def one_request(t, body, max_tokens, exact):
    """Sends one streaming completion and times it. Returns a dict of raw
    numbers; 'error' is set (never dropped) on an HTTP status other than 200,
    an error event, a broken stream or a stream without a finish reason."""
    r = {"status": None, "error": None, "max_tokens": max_tokens, "chunks": 0,
         "usage_completion_tokens": None, "usage_prompt_tokens": None,
         "usage_cached_tokens": None, "finish_reason": None}
    times = []
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    done = False
    conn = http.client.HTTPConnection(t.host, t.port, timeout=t.timeout)
    try:
        conn.request("POST", t.base + "/v1/completions", body=payload, headers=t.headers)
        resp = conn.getresponse()
        r["status"] = resp.status
        if resp.status != 200:
            r["error"] = "HTTP %d: %s" % (resp.status, resp.read(300).decode("utf-8", "replace"))
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
                now = time.perf_counter()
                line = line.rstrip(b"\r\n")
                # blank lines end events, ':' lines are comments (keep-alives)
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    err = obj["error"]
                    r["error"] = "error event: %s" % (err.get("message") if isinstance(err, dict) else err)
                    continue
                for c in obj.get("choices") or []:
                    text = c.get("text")
                    if text is None:
                        text = (c.get("delta") or {}).get("content")
                    if text:
                        r["chunks"] += 1
                        times.append(now)
                    if c.get("finish_reason"):
                        r["finish_reason"] = c["finish_reason"]
                u = obj.get("usage")
                if u:
                    r["usage_completion_tokens"] = u.get("completion_tokens")
                    r["usage_prompt_tokens"] = u.get("prompt_tokens")
                    r["usage_cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    except (OSError, http.client.HTTPException, ValueError) as e:
        r["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        conn.close()
    t_end = time.perf_counter()
    if r["error"] is None and r["status"] == 200:
        if not done:
            r["error"] = "stream ended without [DONE]"
        elif r["finish_reason"] is None:
            r["error"] = "stream ended without a finish_reason (cut off)"
    # tokens: the server's count when it gives one, else one per text chunk
    n = r["usage_completion_tokens"] if r["usage_completion_tokens"] is not None else r["chunks"]
    r["tokens"] = n
    r["short"] = exact and r["error"] is None and n < max_tokens
    r["t_send"] = t0
    r["e2e_s"] = t_end - t0
    r["ttft_s"] = times[0] - t0 if times else None
    r["tpot_s"] = (times[-1] - times[0]) / (n - 1) if times and n > 1 else None
    gaps = [b - a for a, b in zip(times, times[1:])]
    r["max_gap_s"] = max(gaps) if gaps else None
    r["chunk_times_s"] = [round(x - t0, 5) for x in times]
    return r


def cpu_snapshot(server_pid):
    """CPU seconds so far: the whole machine (busy, and stolen by the
    hypervisor), the server process and this process; None off Linux."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        v += [0] * (10 - len(v))
        # user nice system idle iowait irq softirq steal guest guest_nice;
        # guest time is already counted in user and nice
        busy = v[0] + v[1] + v[2] + v[5] + v[6] - v[8] - v[9]

        def stat(pid):
            with open("/proc/%d/stat" % pid) as f:
                st = f.read()
            return st[st.rindex(")") + 2:].split()

        def proc(pid):
            fields = stat(pid)
            return int(fields[11]) + int(fields[12])  # utime + stime, all threads

        def tree(pid):
            # the server and its descendants (the ranks under mpirun)
            children = {}
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        children.setdefault(int(stat(int(d))[1]), []).append(int(d))
                    except (OSError, ValueError, IndexError):
                        pass
            total, todo = 0, [pid]
            while todo:
                p = todo.pop()
                try:
                    total += proc(p)
                except (OSError, ValueError, IndexError):
                    pass
                todo.extend(children.get(p, []))
            return total

        return {"t": time.perf_counter(), "busy": busy / hz, "steal": v[7] / hz,
                "server": tree(server_pid) / hz if server_pid else None,
                "self": proc(os.getpid()) / hz}
    except (OSError, ValueError, IndexError):
        return None


def cpu_usage(a, b):
    """Average cores used between two snapshots, by whom."""
    if not a or not b or b["t"] <= a["t"]:
        return None
    dt = b["t"] - a["t"]
    busy = (b["busy"] - a["busy"]) / dt
    server = (b["server"] - a["server"]) / dt if a["server"] is not None else None
    me = (b["self"] - a["self"]) / dt
    return {"cpus": os.cpu_count(), "busy_cores": busy, "server_cores": server,
            "loadgen_cores": me,
            "other_cores": busy - me - server if server is not None else None,
            "steal_cores": (b["steal"] - a["steal"]) / dt,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def run_level(t, args, model, plan, conc):
    reqs = []
    for i, (plen, olen) in enumerate(plan):
        body = {"model": model, "prompt": make_prompt(args.seed, conc, i, plen),
                "max_tokens": olen, "temperature": args.temperature, "stream": True}
        if args.length_mode == "ignore_eos":
            body["ignore_eos"] = True
        elif args.length_mode == "min_tokens":
            body["min_tokens"] = olen
        if args.stream_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(args.extra)
        reqs.append((body, plen, olen))
    results = [None] * len(reqs)
    lock = threading.Lock()
    nxt = [0]
    exact = args.length_mode != "none"

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(reqs):
                return
            body, plen, olen = reqs[i]
            r = one_request(t, body, olen, exact)
            r["index"] = i
            r["prompt_words"] = plen
            results[i] = r

    cpu0 = cpu_snapshot(args.server_pid)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    cpu = cpu_usage(cpu0, cpu_snapshot(args.server_pid))
    for r in results:
        r["t_send"] -= start
    lv = summarize(conc, wall, results)
    lv["summary"]["cpu"] = cpu
    return lv


def summarize(conc, wall, results):
    ok = [r for r in results if r["error"] is None]
    err = [r for r in results if r["error"] is not None]
    toks = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    e2e = [r["e2e_s"] for r in ok]
    usage = [r for r in ok if r["usage_completion_tokens"] is not None]
    s = {
        "concurrency": conc,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(err),
        "short": sum(1 for r in ok if r["short"]),
        "usage_reported": len(usage),
        "chunk_usage_mismatch": sum(1 for r in usage if r["chunks"] != r["usage_completion_tokens"]),
        "wall_s": wall,
        "output_tokens": toks,
        "output_tok_s": toks / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "prompt_tokens": sum(r["usage_prompt_tokens"] or 0 for r in ok),
        "cached_tokens": sum(r["usage_cached_tokens"] or 0 for r in ok),
    }
    for name, xs in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e)):
        for p in (50, 99):
            s["%s_p%d" % (name, p)] = pct(xs, p)
        s[name + "_max"] = max(xs) if xs else None
    gaps = [r["max_gap_s"] for r in ok if r["max_gap_s"] is not None]
    s["max_gap_s"] = max(gaps) if gaps else None
    s["error_samples"] = sorted({r["error"] for r in err})[:5]
    return {"summary": s, "requests": results}


def fmt(v, scale=1.0, digits=1):
    return "-" if v is None else "%.*f" % (digits, v * scale)


HEADER = ("| conc | ok | err | short | wall s | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
          "| TPOT p50 ms | TPOT p99 ms | e2e p50 s | e2e p99 s |")


def table_row(s):
    return "| %d | %d | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        s["concurrency"], s["ok"], s["errors"], s["short"], fmt(s["wall_s"]),
        fmt(s["output_tok_s"]), fmt(s["req_s"], digits=2),
        fmt(s["ttft_s_p50"], 1e3), fmt(s["ttft_s_p99"], 1e3),
        fmt(s["tpot_s_p50"], 1e3), fmt(s["tpot_s_p99"], 1e3),
        fmt(s["e2e_s_p50"], digits=2), fmt(s["e2e_s_p99"], digits=2))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    ap.add_argument("--concurrency", default="1,8,32",
                    help="comma-separated client counts, run in turn (default 1,8,32)")
    ap.add_argument("--mix", choices=sorted(MIXES), default="short",
                    help="seeded prompt/output lengths: short = prompts 32-256 / outputs 32-128, "
                         "long = 256-1024 / 128-256 (default short)")
    ap.add_argument("--prompt-len", type=int, help="fixed prompt length (words); with --output-len")
    ap.add_argument("--output-len", type=int, help="fixed output length (tokens); with --prompt-len")
    ap.add_argument("--seed", type=int, default=1, help="seed of lengths and prompt text (default 1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    ap.add_argument("--length-mode", choices=["ignore_eos", "min_tokens", "none"],
                    default="ignore_eos",
                    help="how exact output lengths are asked for: 'ignore_eos': true (cparallel, "
                         "vLLM, llama.cpp's llama-server), 'min_tokens' = max_tokens "
                         "(llama-cpp-python), or nothing (default ignore_eos)")
    ap.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                    help="do not send stream_options.include_usage")
    ap.add_argument("--extra", type=json.loads, default={},
                    help="JSON object merged into every request body")
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout, s (default 600)")
    ap.add_argument("--wait-ready", type=float, default=0.0,
                    help="first wait up to S seconds for the server to answer ready")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="bearer token (default: env OPENAI_API_KEY)")
    ap.add_argument("--label", default="", help="server label stored in the JSON")
    ap.add_argument("--server-pid", type=int,
                    help="the server's process id (same machine; its descendants, such as the ranks "
                         "under mpirun, count with it): each level then records the "
                         "cores used by the server, by this client and by other processes")
    ap.add_argument("--json", help="write every raw number to this file")
    a = ap.parse_args(argv)
    if (a.prompt_len is None) != (a.output_len is None):
        ap.error("--prompt-len and --output-len go together")
    if a.prompt_len is not None and (a.prompt_len < 1 or a.output_len < 1):
        ap.error("--prompt-len and --output-len must be positive")
    try:
        a.levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error("--concurrency takes integers separated by commas")
    if not a.levels or min(a.levels) < 1 or a.requests < 1:
        ap.error("--concurrency and --requests must be positive")
    if not isinstance(a.extra, dict):
        ap.error("--extra must be a JSON object")
    return a


def main(argv):
    args = parse_args(argv)
    t = Target(args.url, args.timeout, args.api_key)
    if args.wait_ready > 0:
        wait_ready(t, args.wait_ready)
    model = args.model or served_model(t)
    plan = make_plan(args)
    # warm-up: one short request, not counted
    warm = run_level(t, argparse.Namespace(**{**vars(args), "seed": args.seed + 1000}), model,
                     [(8, 8)], 1)
    ws = warm["summary"]
    if ws["errors"]:
        sys.stderr.write("loadgen: the warm-up request failed: %s\n" % ws["error_samples"])
        return 1
    sys.stderr.write("loadgen: %s, model %s, %d requests per level, %s\n" % (
        args.url, model, args.requests,
        "prompt %d / output %d" % (args.prompt_len, args.output_len) if args.prompt_len
        else "mix %s" % args.mix))
    out = {"meta": {"label": args.label, "url": args.url, "model": model,
                    "argv": [os.path.basename(sys.argv[0])] + argv,
                    "mix": None if args.prompt_len else args.mix,
                    "prompt_len": args.prompt_len, "output_len": args.output_len,
                    "requests": args.requests, "seed": args.seed,
                    "length_mode": args.length_mode, "temperature": args.temperature,
                    "extra": args.extra, "python": platform.python_version(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "warmup": ws},
           "levels": []}
    print(("## " + args.label + "\n\n") if args.label else "", end="")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    failed = False
    for conc in args.levels:
        lv = run_level(t, args, model, plan, conc)
        out["levels"].append(lv)
        print(table_row(lv["summary"]), flush=True)
        s = lv["summary"]
        if s["errors"]:
            failed = True
            sys.stderr.write("loadgen: concurrency %d: %d errors, e.g. %s\n" % (
                conc, s["errors"], s["error_samples"]))
        if s["short"]:
            sys.stderr.write("loadgen: concurrency %d: %d requests got fewer tokens than "
                             "max_tokens\n" % (conc, s["short"]))
        if s["chunk_usage_mismatch"]:
            sys.stderr.write("loadgen: concurrency %d: %d requests streamed a chunk count other "
                             "than usage.completion_tokens\n" % (conc, s["chunk_usage_mismatch"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
