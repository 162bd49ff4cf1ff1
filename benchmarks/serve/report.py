#!/usr/bin/env python3
"""report.py - turns loadgen.py JSON files (one per server) into a markdown
page: the servers side by side per concurrency level, the throughput ratio
against the first server, the machine and the exact commands. Standard
library only.

  report.py --title T --json a.json [--json b.json] [--machine F]
            [--commands F] [--notes F] [--out README.md]
"""
import argparse
import json
import sys

from loadgen import fmt


def load(path):
    with open(path) as f:
        return json.load(f)


def cores(v):
    # /proc tick rounding can make a near-zero difference slightly negative
    return None if v is None else max(0.0, v)


def label(r):
    return r["meta"]["label"] or r["meta"]["url"]


def side_by_side(runs):
    head = ("| conc | server | ok | err | short | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
            "| TPOT p50 ms | TPOT p99 ms | e2e p50 s | e2e p99 s | wall s | other cores |")
    lines = [head, "|---:|---|" + "---:|" * (head.count("|") - 3)]
    levels = []
    for r in runs:
        for lv in r["levels"]:
            c = lv["summary"]["concurrency"]
            if c not in levels:
                levels.append(c)
    for c in levels:
        for r in runs:
            s = next((lv["summary"] for lv in r["levels"] if lv["summary"]["concurrency"] == c),
                     None)
            if s is None:
                continue
            cpu = s.get("cpu") or {}
            lines.append("| %d | %s | %d | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                c, label(r), s["ok"], s["errors"], s["short"],
                fmt(s["output_tok_s"]), fmt(s["req_s"], digits=2),
                fmt(s["ttft_s_p50"], 1e3, 0), fmt(s["ttft_s_p99"], 1e3, 0),
                fmt(s["tpot_s_p50"], 1e3), fmt(s["tpot_s_p99"], 1e3),
                fmt(s["e2e_s_p50"], digits=2), fmt(s["e2e_s_p99"], digits=2),
                fmt(s["wall_s"]), fmt(cores(cpu.get("other_cores")), digits=2)))
    return "\n".join(lines)


def ratios(runs):
    if len(runs) < 2:
        return ""
    base = runs[0]
    out = ["| conc | " + " | ".join("%s / %s out tok/s" % (label(base), label(r))
                                   for r in runs[1:]) + " |",
           "|---:|" + "---:|" * (len(runs) - 1)]
    for lv in base["levels"]:
        s = lv["summary"]
        cells = []
        for r in runs[1:]:
            o = next((x["summary"] for x in r["levels"]
                      if x["summary"]["concurrency"] == s["concurrency"]), None)
            ok = o and o["output_tok_s"] and s["output_tok_s"]
            cells.append("%.2f" % (s["output_tok_s"] / o["output_tok_s"]) if ok else "-")
        out.append("| %d | %s |" % (s["concurrency"], " | ".join(cells)))
    return "\n".join(out)


def details(runs):
    out = []
    for r in runs:
        m = r["meta"]
        load_desc = ("prompt %d words / output %d tokens" % (m["prompt_len"], m["output_len"])
                     if m["prompt_len"] else "mix %s" % m["mix"])
        out.append("- %s: model `%s`, %d requests per level, %s, seed %d, length mode `%s`, "
                   "temperature %g%s" % (
                       label(r), m["model"], m["requests"], load_desc, m["seed"],
                       m["length_mode"], m["temperature"],
                       ", extra fields `%s`" % json.dumps(m["extra"]) if m["extra"] else ""))
        for lv in r["levels"]:
            s = lv["summary"]
            notes = []
            if s["errors"]:
                notes.append("%d errors: %s" % (s["errors"], "; ".join(s["error_samples"])))
            if s["short"]:
                notes.append("%d requests shorter than max_tokens" % s["short"])
            if s["usage_reported"] < s["ok"]:
                notes.append("usage reported by %d of %d (tokens counted as text chunks)" % (
                    s["usage_reported"], s["ok"]))
            if s["chunk_usage_mismatch"]:
                notes.append("%d requests streamed a text-chunk count other than usage tokens" %
                             s["chunk_usage_mismatch"])
            notes.append("prompt tokens %d (cached %d), output tokens %d" % (
                s["prompt_tokens"], s["cached_tokens"], s["output_tokens"]) if s["usage_reported"]
                else "output tokens %d" % s["output_tokens"])
            notes.append("TPOT max %s ms, longest gap between two chunks %s ms" % (
                fmt(s["tpot_s_max"], 1e3), fmt(s["max_gap_s"], 1e3, 0)))
            cpu = s.get("cpu")
            if cpu:
                notes.append("cores used on average (of %d): server %s, loadgen %s, other processes "
                             "%s, stolen by the hypervisor %s" % (
                                 cpu["cpus"], fmt(cpu["server_cores"], digits=2),
                                 fmt(cpu["loadgen_cores"], digits=2),
                                 fmt(cores(cpu["other_cores"]), digits=2),
                                 fmt(cores(cpu["steal_cores"]), digits=2)))
            out.append("  - concurrency %d: %s" % (s["concurrency"], "; ".join(notes)))
    return "\n".join(out)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--title", default="Serving benchmark")
    ap.add_argument("--json", action="append", required=True, help="loadgen.py JSON, in order")
    ap.add_argument("--machine", help="file with the machine description (markdown)")
    ap.add_argument("--commands", help="file with the exact commands")
    ap.add_argument("--notes", help="markdown appended at the end")
    ap.add_argument("--out", help="write here instead of stdout")
    a = ap.parse_args(argv)
    runs = [load(p) for p in a.json]
    parts = ["# " + a.title, ""]
    if a.machine:
        parts += [open(a.machine).read().rstrip(), ""]
    parts += [
        "Closed loop: C clients each send one streaming /v1/completions request, wait for its "
        "last token, then send the next, until the level's requests are done. out tok/s = output "
        "tokens of the level / its wall time; TTFT = request sent to first streamed token; "
        "TPOT = (last token time - first token time) / (tokens - 1); e2e = request sent to "
        "[DONE]. Percentiles over the successful requests; `err` counts HTTP errors and broken "
        "or cut-off streams, `short` the requests that got fewer tokens than max_tokens; "
        "`other cores` = CPU cores that processes other than the server and the load generator "
        "used on average during the level (from /proc; above 0 lowers the numbers). "
        "See benchmarks/serve/README.md.", "",
        side_by_side(runs), ""]
    rt = ratios(runs)
    if rt:
        parts += ["Above 1: the first server produced more output tokens per second.", "", rt, ""]
    parts += ["## Details", "", details(runs), ""]
    if a.commands:
        parts += ["## Commands", "", "```", open(a.commands).read().rstrip(), "```", ""]
    if a.notes:
        parts += [open(a.notes).read().rstrip(), ""]
    text = "\n".join(parts)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
