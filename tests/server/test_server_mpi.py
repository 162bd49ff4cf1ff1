#!/usr/bin/env python3
"""test_server_mpi.py - `mpirun -np N cparallel serve` end to end: rank 0
serves HTTP and schedules, the other ranks follow its steps. For tensor and
pipeline layouts on 2, 3 and 4 ranks, concurrent greedy requests (plain and
streamed, completions and chat) and seeded top-p sampled ones must return
exactly the text of the same requests on one rank; SIGTERM to mpirun drains and every rank exits 0; a
follower killed mid-service makes rank 0 fail its requests and exit non-zero
within the collective deadline instead of hanging.

Models: the default model (9 query / 3 KV heads: tp 3, pp any) and a small
random-weight model with its tokenizer (8 / 4 heads: tp 2 and 4) written with
benchmarks/make_random_gguf.py (needs the gguf and numpy packages).

Usage: test_server_mpi.py --cparallel PATH --model PATH [--mpirun PATH]
Exit code 77 = skipped (no mpirun, model, binary or gguf package)."""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SKIP = 77
ARGS = None
RAND_MODEL = None
PROMPTS = [
    "The capital of France is",
    "List three colors:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The boiling point of water at sea level is",
    "Translate to French: good morning",
    "1, 2, 3, 4,",
    "The largest planet in the solar system",
]
CHAT = [{"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 16


class MpiServer:
    """mpirun -np N cparallel serve ... on 127.0.0.1:<free port>."""

    def __init__(self, model, np_, tp=1, pp=1, extra=(), env=None, mpi_args=()):
        cmd = [ARGS.mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none", *mpi_args,
               ARGS.cparallel, "serve", "--model", model, "--port", "0", "--model-name", "m",
               "--threads", "1", "--ctx-size", "512", "--max-running", "8", "--no-progress",
               "--tp", str(tp), "--pp", str(pp), *extra]
        if np_ == 1:
            cmd = cmd[cmd.index(ARGS.cparallel):]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        self.lines = []
        self.port = None
        ready = threading.Event()

        def pump():
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
                if m and not ready.is_set():
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not ready.wait(120) or self.port is None:
            self.kill()
            raise RuntimeError(f"{' '.join(cmd)} did not start:\n" + self.log())

    def log(self):
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.pump.join(5)

    def ranks(self):
        """{world rank: pid} of the cparallel processes mpirun started."""
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            for kv in env:
                if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                    out[int(kv.split(b"=", 1)[1])] = int(pid)
        return out

    def stop(self, timeout=60):
        """SIGTERM to every rank, as Slurm's scancel sends it (mpirun itself,
        when signalled, kills its ranks a second later and reports 1);
        returns the exit code of the job."""
        pids = [self.proc.pid] if len(self.ranks()) == 0 else list(self.ranks().values())
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = f"still running {timeout} s after SIGTERM"
        self.pump.join(5)
        return rc

    def post(self, path, body, timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request("POST", path, body=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


def sse_text(data):
    """The concatenated text of an SSE stream; asserts it ends with [DONE]."""
    out = []
    # comment lines (": ...") keep an idle stream alive; only data counts
    events = [line[len("data: "):] for line in data.decode().split("\n")
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-1]
    for e in events[:-1]:
        d = json.loads(e)
        for ch in d["choices"]:
            if "text" in ch:
                out.append(ch["text"])
            elif ch.get("delta", {}).get("content"):
                out.append(ch["delta"]["content"])
    return "".join(out)


def workload(srv):
    """Every prompt at once (plain and streamed), a chat, and seeded sampled
    requests (top-p "n", plain temperature "p"): {key: text}."""
    results, errors = {}, []

    def one(key, path, body, stream):
        try:
            st, data = srv.post(path, body)
            if st != 200:
                errors.append((key, st, data[:300]))
                return
            if stream:
                results[key] = sse_text(data)
            else:
                d = json.loads(data)
                ch = d["choices"][0]
                results[key] = ch["text"] if "text" in ch else ch["message"]["content"]
        except Exception as ex:  # noqa: BLE001 - reported below
            errors.append((key, "exception", repr(ex)))

    threads = []
    for i, p in enumerate(PROMPTS):
        body = {"model": "m", "prompt": p, "temperature": 0, "max_tokens": MAX_TOKENS,
                "ignore_eos": True}
        threads.append(threading.Thread(target=one, args=(f"c{i}", "/v1/completions", body, False)))
        sbody = dict(body, stream=True)
        threads.append(threading.Thread(target=one, args=(f"s{i}", "/v1/completions", sbody, True)))
    chat = {"model": "m", "messages": CHAT, "temperature": 0, "max_tokens": MAX_TOKENS}
    threads.append(threading.Thread(target=one, args=("chat", "/v1/chat/completions", chat, False)))
    for i in range(3):
        body = {"model": "m", "prompt": PROMPTS[i], "temperature": 0.8, "top_p": 0.9, "seed": 11 + i,
                "max_tokens": MAX_TOKENS, "ignore_eos": True}
        threads.append(threading.Thread(target=one, args=(f"n{i}", "/v1/completions", body, False)))
        body = {"model": "m", "prompt": PROMPTS[i], "temperature": 1.0, "seed": 21 + i,
                "max_tokens": MAX_TOKENS, "ignore_eos": True}
        threads.append(threading.Thread(target=one, args=(f"p{i}", "/v1/completions", body, False)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results, errors


class Layouts(unittest.TestCase):
    reference = {}

    def run_layout(self, model, np_, tp, pp, extra=()):
        # the single-rank reference runs without the context- and
        # sequence-parallel flags
        ref_extra = tuple(a for a in extra if a != "--sp")
        if "--cp" in ref_extra:
            i = ref_extra.index("--cp")
            ref_extra = ref_extra[:i] + ref_extra[i + 2:]
        key = (model, ref_extra)
        if key not in self.reference:
            one = MpiServer(model, 1, extra=ref_extra)
            try:
                ref, errors = workload(one)
            finally:
                rc = one.stop()
            self.assertEqual(errors, [], one.log())
            self.assertEqual(rc, 0, one.log())
            for i in range(len(PROMPTS)):  # streamed equals plain on one rank too
                self.assertEqual(ref[f"s{i}"], ref[f"c{i}"])
            self.reference[key] = ref
        srv = MpiServer(model, np_, tp, pp, extra=extra)
        try:
            got, errors = workload(srv)
            st, _ = srv.get("/health/ready")
            self.assertEqual(st, 200, srv.log())
        finally:
            rc = srv.stop()
        log = srv.log()
        self.assertEqual(errors, [], log)
        cp = int(extra[extra.index("--cp") + 1]) if "--cp" in extra else 1
        shape = f"tp {tp} x cp {cp} x pp {pp}" if cp > 1 else f"tp {tp} x pp {pp}"
        self.assertIn(f"{np_} ranks ({shape}) ready", log)
        piped = pp > 1 and cp == 1 and "--pp-serial" not in extra
        self.assertEqual(f"ready, up to {pp} steps in flight" in log, piped, log[-2000:])
        self.assertEqual(rc, 0, f"mpirun ended with {rc} after SIGTERM:\n{log}")
        for req, text in self.reference[key].items():
            if (req.startswith("p") and tp > 1) or (req[0] in "np" and model != ARGS.model):
                # Plain temperature sampling across TP ranks: the rank that
                # holds u's share of the mass picks, walking its slice in
                # vocabulary order: the same distribution as one rank's walk
                # in order of probability, another token for the same u
                # (checked against the full rows in cp_test_model_parallel).
                # The random-weight model's distributions are nearly flat:
                # the last-bit changes of another summation order reorder
                # tokens of almost equal probability, and the same u lands
                # on another one.
                self.assertTrue(got.get(req), f"request {req} on tp {tp} x pp {pp}")
                continue
            self.assertEqual(got.get(req), text, f"request {req} on tp {tp} x pp {pp}")

    def test_pp2(self):
        self.run_layout(ARGS.model, 2, 1, 2)

    def test_pp2_serial(self):
        # one step through both stages at a time (micro-batched prompts)
        self.run_layout(ARGS.model, 2, 1, 2, extra=("--pp-serial",))

    def test_pp2_chunks_in_flight(self):
        # prompts in chunks of 8 tokens and requests waiting for one of 3
        # slots: a prompt's chunks follow each other through the pipeline
        # before the earlier ones are back
        self.run_layout(ARGS.model, 2, 1, 2, extra=("--prefill-chunk", "8", "--max-running", "3"))

    def test_tp3(self):
        # The fast CPU kernels quantize activations to 8 bits per block;
        # with split row-parallel sums, a last-bit change can move one
        # rounding step, and such steps add up to a different greedy token
        # on this Q4_1 model (pipeline stages keep the exact order and stay
        # bit-identical). Weights converted to f32 at load isolate what TP
        # changes: the summation order only.
        self.run_layout(ARGS.model, 3, 3, 1, extra=("--convert", "f32"))

    def test_pp4(self):
        self.run_layout(ARGS.model, 4, 1, 4)

    def test_tp2(self):
        self.run_layout(RAND_MODEL, 2, 2, 1)

    def test_tp2_pp2(self):
        self.run_layout(RAND_MODEL, 4, 2, 2)

    def test_tp4(self):
        self.run_layout(RAND_MODEL, 4, 4, 1)

    def test_cp2(self):
        # context parallelism: each rank computes and caches every other
        # position of every request, attention merged over both
        self.run_layout(RAND_MODEL, 2, 1, 1, extra=("--cp", "2"))

    def test_tp2_cp2(self):
        self.run_layout(RAND_MODEL, 4, 2, 1, extra=("--cp", "2"))

    def test_tp2_sp(self):
        # sequence parallelism for the prompt chunks of every step
        self.run_layout(RAND_MODEL, 2, 2, 1, extra=("--sp",))

    def test_sigterm_under_load(self):
        # SIGTERM to every rank while two requests run and three wait for a
        # slot (--max-running 2), one of them streamed: every accepted
        # request completes in full, a new one gets 503, all ranks exit 0
        srv = MpiServer(RAND_MODEL, 2, 2, 1, extra=("--max-running", "2", "--drain-timeout", "120"))
        n, tokens, results = 5, 48, {}
        try:
            def one(i):
                body = {"model": "m", "prompt": PROMPTS[i], "temperature": 0, "max_tokens": tokens,
                        "ignore_eos": True, "stream": i == 3}
                results[i] = srv.post("/v1/completions", body)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            deadline, loaded = time.time() + 60, False
            while time.time() < deadline and not loaded:
                st, data = srv.get("/metrics")
                m = dict(line.rsplit(" ", 1) for line in data.decode().splitlines()
                         if line and not line.startswith("#"))
                loaded = float(m["cparallel_running_sequences"]) >= 2 and \
                    float(m["cparallel_waiting_requests"]) >= 1
                time.sleep(0.02)
            self.assertTrue(loaded, "two requests running and one waiting before the SIGTERM")
            for pid in srv.ranks().values():
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.3)
            try:
                st, _ = srv.post("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
                self.assertEqual(st, 503)
            except (ConnectionError, OSError):
                pass  # refused: rank 0 already stopped listening
            for t in ts:
                t.join(300)
            rc = srv.proc.wait(120)
        finally:
            srv.kill()  # joins the log reader (and kills the job if it still runs)
        log = srv.log()
        self.assertEqual(rc, 0, log)
        for i in range(n):
            st, data = results[i]
            self.assertEqual(st, 200, (i, data[:200], log))
            if i == 3:
                self.assertTrue(sse_text(data), i)
            else:
                r = json.loads(data)
                self.assertEqual(r["usage"]["completion_tokens"], tokens, i)


class Faults(unittest.TestCase):
    def test_bad_layout_is_one_clear_error(self):
        p = subprocess.run([ARGS.mpirun, "-np", "2", "--oversubscribe", ARGS.cparallel, "serve",
                            "--model", ARGS.model, "--tp", "3", "--port", "0"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("--tp 3 x --pp 1 = 3 ranks, but the job has 2", p.stderr)

    def test_follower_killed(self):
        srv = MpiServer(ARGS.model, 2, 1, 2, extra=("--collective-timeout", "5"))
        try:
            self.assertEqual(srv.get("/health/ready")[0], 200, srv.log())
            follower = srv.ranks().get(1)
            self.assertIsNotNone(follower, "no follower process found")
            os.kill(follower, signal.SIGKILL)
            t0 = time.time()
            try:
                st, data = srv.post("/v1/completions",
                                    {"model": "m", "prompt": "Hello", "max_tokens": 8}, timeout=60)
            except (OSError, http.client.HTTPException):
                st, data = "connection closed", b""
            self.assertNotEqual(st, 200, data)
            rc = srv.proc.wait(60)
            self.assertNotEqual(rc, 0, srv.log())
            self.assertLess(time.time() - t0, 60)
        finally:
            srv.kill()


def gone(pid):
    """Whether a process has ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Faults(unittest.TestCase):
    """kill -9 of one rank of an np=4 serve under load: the other ranks
    exit non-zero within the collective deadline, the fault hook runs once
    with the right event, nothing is left behind. mpirun aborts a job whose
    rank died a second later by default; --mca odls_base_sigkill_timeout
    gives the ranks the time to report it themselves, as srun does."""

    TIMEOUT = 5

    def kill_one(self, victim):
        with tempfile.TemporaryDirectory() as tmp:
            hook = os.path.join(tmp, "hook.sh")
            with open(hook, "w") as f:
                f.write(f"#!/bin/sh\ncat >> {tmp}/events.jsonl\n")
            os.chmod(hook, 0o755)
            srv = MpiServer(ARGS.model, 4, 1, 4, mpi_args=("--mca", "odls_base_sigkill_timeout", "12"),
                            extra=("--collective-timeout", str(self.TIMEOUT), "--region", "test-r",
                                   "--hook", f"fault={hook}"))
            try:
                self.assertEqual(srv.get("/health/ready")[0], 200, srv.log())
                ranks = srv.ranks()
                self.assertEqual(sorted(ranks), [0, 1, 2, 3], srv.log())
                results = [None] * 6

                def one(i):
                    try:
                        results[i] = srv.post("/v1/completions", {
                            "prompt": f"Story {i}:", "max_tokens": 200, "ignore_eos": True,
                            "stream": i % 2 == 0}, timeout=60)
                    except (OSError, http.client.HTTPException) as e:
                        results[i] = ("dropped", str(e))

                threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
                for t in threads:
                    t.start()
                time.sleep(1.5)  # under load: every request is running
                os.kill(ranks[victim], signal.SIGKILL)
                t0 = time.time()
                survivors = [pid for r, pid in ranks.items() if r != victim]
                while time.time() - t0 < 60 and not all(gone(p) for p in survivors):
                    time.sleep(0.1)
                took = time.time() - t0
                self.assertTrue(all(gone(p) for p in survivors), srv.log())
                # the deadline, its diagnosis and the hook: well under 4 deadlines
                self.assertLess(took, 4 * self.TIMEOUT, srv.log())
                for t in threads:
                    t.join(60)
                rc = srv.proc.wait(60)
                self.assertNotEqual(rc, 0, srv.log())
                log = srv.log()
                for i, r in enumerate(results):
                    # when rank 0 lives each ends with a retryable error (else the
                    # connections drop)
                    self.assertIsNotNone(r)
                    if victim != 0:
                        st, data = r
                        if i % 2 == 0:
                            self.assertEqual(st, 200, data)
                            self.assertIn(b'"code":"server_fault"', data)
                        else:
                            self.assertEqual(st, 503, data)
                            self.assertEqual(json.loads(data)["error"]["code"], "server_fault")
                with open(os.path.join(tmp, "events.jsonl")) as f:
                    events = [json.loads(line) for line in f]
                self.assertEqual(len(events), 1, log)
                ev = events[0]
                self.assertEqual((ev["kind"], ev["region"]), ("fault", "test-r"))
                if victim == 0:
                    self.assertEqual(ev["rank"], 1)
                    self.assertIn("rank 0 is gone", ev["message"])
                else:
                    self.assertEqual(ev["rank"], 0)
                    # the ranks time out around the same moment, so the one named
                    # may be the dead rank or one that already gave up on it
                    self.assertIn("timed out", ev["message"])
                    self.assertEqual(ev["in_flight"], 6)
                    self.assertIn("the server stopped after a failure", log)
                self.assertEqual(log.count("serving stopped"), 3 if victim == 0 else 2, log)
                left = subprocess.run(["pgrep", "-f", hook], capture_output=True, text=True).stdout
                self.assertEqual(left.strip(), "")
                self.assertFalse([f for f in os.listdir("/dev/shm")
                                  if f.startswith(f"cparallel-fault-{ranks[0]}-")])
                print(f"  kill -9 rank {victim}: other ranks gone after {took:.1f} s, "
                      f"hook ran on rank {ev['rank']}", file=sys.stderr)
            finally:
                srv.kill()

    def test_kill_follower_under_load(self):
        self.kill_one(2)

    def test_kill_rank0_under_load(self):
        self.kill_one(0)


def make_rand_model(tmp):
    path = os.path.join(tmp, "rand-256x4.gguf")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "make_random_gguf.py")
    subprocess.run([sys.executable, script, "--out", path, "--dim", "256", "--layers", "4",
                    "--heads", "8", "--kv-heads", "4", "--ffn", "512", "--type", "f32",
                    "--ctx", "1024", "--tie-embeddings", "--seed", "7", "--tokenizer-from",
                    ARGS.model], check=True, stdout=subprocess.DEVNULL)
    return path


def main():
    global ARGS, RAND_MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--cparallel", default=os.environ.get("CP_CPARALLEL", ""))
    ap.add_argument("--model", default=os.environ.get("CP_TEST_MODEL", ""))
    ap.add_argument("--mpirun", default=os.environ.get("CP_MPIRUN", shutil.which("mpirun") or ""))
    ARGS, rest = ap.parse_known_args()
    if not ARGS.model or not os.path.isfile(ARGS.model):
        print(f"SKIPPED: no test model at '{ARGS.model}' (set CP_TEST_MODEL)")
        return SKIP
    if not ARGS.cparallel or not os.access(ARGS.cparallel, os.X_OK):
        print(f"SKIPPED: no cparallel binary at '{ARGS.cparallel}' (set CP_CPARALLEL)")
        return SKIP
    if not ARGS.mpirun:
        print("SKIPPED: no mpirun")
        return SKIP
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        print(f"SKIPPED: {sys.executable} lacks gguf/numpy (scripts/install_deps.sh makes .venv-test)")
        return SKIP
    with tempfile.TemporaryDirectory(prefix="cp-mpi-serve-") as tmp:
        RAND_MODEL = make_rand_model(tmp)
        prog = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False)
        return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
