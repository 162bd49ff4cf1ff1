#!/usr/bin/env python3
"""test_router.py - `cparallel route` end to end: two `cparallel serve`
deployments of the default model behind the router. Checks that answers
through the router equal the upstream's own (plain and streamed, completions
and chat), the router's endpoints and errors, then runs 500 mixed requests
from 8 clients and SIGKILLs the preferred deployment a third of the way in:
every request must still complete, broken streams are resumed on the other
deployment (a resumed greedy stream is compared with the survivor's own
answer), the killed upstream turns unhealthy, and a deployment restarted on
its port turns healthy again. Ends with the router's drain on SIGTERM.

Usage: test_router.py [--cparallel PATH] [--model PATH]
(defaults: env CP_CPARALLEL / CP_TEST_MODEL). Exit code 77 = skipped.
Python standard library only."""
import argparse
import http.client
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

SKIP = 77
API_KEY = "router-key-51c2"
UP_KEY = "upstream-key-90ad"
SECRET = "quetzal-saffron-4417"  # a prompt that must never reach the router's log
N_REQUESTS = 500
N_CLIENTS = 8

ARGS = None
PROCS = []


def log(msg):
    print(msg, flush=True)


class Proc:
    """A cparallel process whose stderr is kept; ready when a line matches."""

    def __init__(self, cmd, pattern, env=None, timeout=90):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env)
        PROCS.append(self)
        self.lines = []
        self.port = None
        ready = threading.Event()

        def pump():
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = re.search(pattern, line)
                if m and not ready.is_set():
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not ready.wait(timeout) or self.port is None:
            self.kill()
            raise RuntimeError(f"{cmd[1]} did not start:\n" + "".join(self.lines))

    def log(self):
        return "".join(self.lines)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.pump.join(5)


def serve(port=0):
    env = dict(os.environ)
    env["CPARALLEL_API_KEY"] = UP_KEY
    return Proc([ARGS.cparallel, "serve", "--model", ARGS.model, "--port", str(port),
                 "--threads", "1", "--max-running", "8", "--no-progress"],
                r"serving .* on http://127\.0\.0\.1:(\d+)", env=env)


def route(a, b):
    env = dict(os.environ)
    env["CPARALLEL_API_KEY"] = API_KEY
    return Proc([ARGS.cparallel, "route", "--listen", "127.0.0.1:0",
                 "--upstream", f"name=a,url=http://127.0.0.1:{a.port},priority=0",
                 "--upstream", f"name=b,url=http://127.0.0.1:{b.port},priority=1",
                 "--upstream-api-key", UP_KEY, "--health-interval-ms", "500",
                 "--open-seconds", "2"],
                r"routing on http://127\.0\.0\.1:(\d+)", env=env, timeout=30)


# ---- HTTP helpers ------------------------------------------------------------------

def request(port, method, path, body=None, key=API_KEY, timeout=120, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        if key:
            headers["Authorization"] = "Bearer " + key
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        payload = r.read()
        return r.status, dict(r.getheaders()), payload
    finally:
        c.close()


def post(port, path, body, key=API_KEY):
    st, _, payload = request(port, "POST", path, body, key=key)
    try:
        return st, json.loads(payload)
    except ValueError:
        return st, payload


def stream(port, path, body, key=API_KEY, on_event=None):
    """Returns (status, events, done) of a streamed request; events are the
    decoded JSON objects in order, done whether [DONE] ended the stream."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("POST", path, body=json.dumps(body),
                  headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, [json.loads(r.read() or b"null")], False
        events, done = [], False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if done:
                raise AssertionError("an event after [DONE]")
            if data == b"[DONE]":
                done = True
                continue
            ev = json.loads(data)
            events.append(ev)
            if on_event:
                on_event(ev)
        return 200, events, done
    finally:
        c.close()


def stream_text(events, chat):
    out = []
    for ev in events:
        for ch in ev.get("choices", []):
            out.append((ch.get("delta", {}).get("content") or "") if chat else ch.get("text", ""))
    return "".join(out)


def plain_text(resp, chat):
    ch = resp["choices"][0]
    return ch["message"]["content"] if chat else ch["text"]


def metrics(port):
    st, _, payload = request(port, "GET", "/metrics", key=None)
    assert st == 200, st
    vals = {}
    for line in payload.decode().splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            vals[name] = float(v)
    return vals


def check_stream(events, done, chat):
    """A complete stream: one id, a finish_reason, [DONE], no error event."""
    assert done, "no [DONE]"
    assert events, "no events"
    for ev in events:
        assert "error" not in ev, f"error event: {ev}"
    ids = {ev["id"] for ev in events}
    assert len(ids) == 1, f"several ids: {ids}"
    created = {ev["created"] for ev in events}
    assert len(created) == 1, f"several created: {created}"
    fins = [ch["finish_reason"] for ev in events for ch in ev.get("choices", [])
            if ch.get("finish_reason")]
    assert len(fins) == 1, f"finish reasons: {fins}"
    if chat:
        roles = [ev for ev in events for ch in ev.get("choices", [])
                 if "role" in ch.get("delta", {})]
        assert len(roles) == 1, f"{len(roles)} role chunks"


# ---- checks -----------------------------------------------------------------------

def basic(rt, a):
    cmp = {"prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": "Name a large animal."}],
            "max_tokens": 12, "temperature": 0}
    for path, body, is_chat in (("/v1/completions", cmp, False),
                                ("/v1/chat/completions", chat, True)):
        st, direct = post(a.port, path, body, key=UP_KEY)
        assert st == 200, (st, direct)
        st, via = post(rt.port, path, body)
        assert st == 200, (st, via)
        assert plain_text(via, is_chat) == plain_text(direct, is_chat), (via, direct)
        assert via["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
        sb = dict(body, stream=True, stream_options={"include_usage": True})
        st, events, done = stream(rt.port, path, sb)
        assert st == 200, (st, events)
        check_stream(events, done, is_chat)
        assert stream_text(events, is_chat) == plain_text(direct, is_chat)
        last = events[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == \
            direct["usage"]["completion_tokens"], last
        assert all(ev.get("usage") is None for ev in events[:-1])
        # without include_usage no chunk has usage
        st, events, done = stream(rt.port, path, dict(body, stream=True))
        check_stream(events, done, is_chat)
        assert all("usage" not in ev for ev in events)
    st, _, payload = request(rt.port, "GET", "/v1/models")
    assert st == 200 and json.loads(payload)["data"], payload
    st, err = post(rt.port, "/v1/completions", cmp, key="wrong")
    assert st == 401 and err["error"]["code"] == "invalid_api_key", (st, err)
    st, _, payload = request(rt.port, "POST", "/v1/completions", raw=b'{"prompt": "x",')
    err = json.loads(payload)
    assert st == 400 and "not valid JSON" in err["error"]["message"], (st, err)
    assert set(err["error"]) == {"message", "type", "param", "code"}
    st, _, payload = request(rt.port, "POST", "/v1/completions", raw=b'{"stream": 3}')
    assert st == 400 and json.loads(payload)["error"]["param"] == "stream"
    st, err = post(rt.port, "/v1/completions", {"prompt": "x", "max_tokens": "many"})
    assert st == 400, (st, err)  # the upstream's 4xx, passed through
    st, _, payload = request(rt.port, "POST", "/v1/completions",
                             raw=b'{"prompt":"' + b"x" * (1 << 20) + b'"}')
    assert st == 413, st
    st, _, _ = request(rt.port, "GET", "/v1/nothing")
    assert st == 404
    st, hdrs, _ = request(rt.port, "GET", "/v1/completions")
    assert st == 405
    st, _, payload = request(rt.port, "GET", "/health", key=None)
    assert st == 200 and json.loads(payload)["status"] == "ok"
    st, _, payload = request(rt.port, "GET", "/health/ready", key=None)
    assert st == 200, payload
    m = metrics(rt.port)
    for name in ("cparallel_router_retries_total", "cparallel_router_failovers_total",
                 "cparallel_router_resumed_streams_total", "cparallel_router_in_flight",
                 'cparallel_router_upstream_healthy{upstream="a"}',
                 'cparallel_router_upstream_circuit_open{upstream="b"}',
                 'cparallel_router_upstream_requests_total{upstream="a",outcome="success"}',
                 'cparallel_router_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in m, name
    # a prompt that must not be logged
    st, _ = post(rt.port, "/v1/completions", {"prompt": SECRET, "max_tokens": 2})
    assert st == 200
    log("basic: router answers equal the upstream's; endpoints, errors and metrics ok")


def make_requests(n, seed=7):
    rnd = random.Random(seed)
    topics = ["The ocean", "A good breakfast", "Mountains in winter", "The history of paper",
              "Why cats sleep", "A small village", "Learning to cook", "The night sky",
              "Trains in Europe", "A rainy afternoon", "Old libraries", "The color blue"]
    reqs = []
    for i in range(n):
        chat = i % 2 == 1         # completions and chat alternate
        streamed = i % 4 >= 2     # half of each streamed
        topic = rnd.choice(topics) + f" (#{i})"
        body = {"max_tokens": rnd.randint(8, 12)}
        if rnd.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, seed=rnd.randint(0, 1 << 30))
        if chat:
            body["messages"] = [{"role": "user", "content": f"Write about: {topic}"}]
        else:
            body["prompt"] = f"{topic} is"
        if streamed:
            body["stream"] = True
            if rnd.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        reqs.append(("/v1/chat/completions" if chat else "/v1/completions", body, chat,
                     streamed))
    return reqs


def run_one(port, path, body, chat, streamed):
    if streamed:
        st, events, done = stream(port, path, body)
        assert st == 200, (st, events)
        check_stream(events, done, chat)
        if body.get("stream_options", {}).get("include_usage"):
            assert events[-1]["usage"]["completion_tokens"] > 0, events[-1]
        return stream_text(events, chat)
    st, resp = post(port, path, body)
    assert st == 200, (st, resp)
    text = plain_text(resp, chat)
    assert isinstance(text, str), resp
    assert resp["usage"]["completion_tokens"] > 0, resp
    return text


def long_stream(rt, path, body, chat, started, result):
    """A greedy stream in flight at the kill, for the resumption check."""
    def on_event(ev):
        if stream_text([ev], chat):
            started.set()
    try:
        st, events, done = stream(rt.port, path, body, on_event=on_event)
        assert st == 200, (st, events)
        check_stream(events, done, chat)
        result["text"] = stream_text(events, chat)
    except Exception as e:  # reported by the main thread
        result["error"] = repr(e)
    started.set()


def failover(rt, a, b):
    reqs = make_requests(N_REQUESTS)
    work = queue.Queue()
    for i, r in enumerate(reqs):
        work.put((i, r))
    done_count = [0]
    failures = []
    lock = threading.Lock()
    kill_at = N_REQUESTS // 3
    killed = threading.Event()
    kill_ready = threading.Event()
    long_bodies = [
        ("/v1/completions", {"prompt": "Once upon a time, in a quiet town by the sea,",
                             "max_tokens": 48, "temperature": 0, "stream": True}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                "content": "Tell a short story about a fox."}],
                                  "max_tokens": 48, "temperature": 0, "stream": True}, True),
    ]
    long_results = [{} for _ in long_bodies]

    def client():
        while True:
            try:
                i, (path, body, chat, streamed) = work.get_nowait()
            except queue.Empty:
                return
            try:
                run_one(rt.port, path, body, chat, streamed)
            except Exception as e:
                with lock:
                    failures.append((i, path, body.get("stream", False), repr(e)[:400]))
            with lock:
                done_count[0] += 1
                if done_count[0] == kill_at:
                    kill_ready.set()

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(N_CLIENTS)]
    for t in threads:
        t.start()
    kill_ready.wait(600)
    # two long greedy streams that are mid-flight when the deployment dies
    long_threads = []
    for (path, body, chat), res in zip(long_bodies, long_results):
        started = threading.Event()
        t = threading.Thread(target=long_stream, args=(rt, path, body, chat, started, res))
        t.start()
        started.wait(60)
        long_threads.append(t)
    in_flight = metrics(rt.port)["cparallel_router_in_flight"]
    a.kill(signal.SIGKILL)
    killed.set()
    log(f"failover: SIGKILL of upstream a after {done_count[0]} of {N_REQUESTS} requests, "
        f"{int(in_flight)} in flight at the router")
    for t in threads + long_threads:
        t.join(600)
    wall = time.time() - t0
    assert not failures, f"{len(failures)} request(s) failed, first: {failures[:3]}"
    assert done_count[0] == N_REQUESTS
    m = metrics(rt.port)
    retries = m["cparallel_router_retries_total"]
    failovers = m["cparallel_router_failovers_total"]
    resumed = m["cparallel_router_resumed_streams_total"]
    assert retries + resumed > 0, m
    log(f"summary: requests={N_REQUESTS} failed=0 retries={int(retries)} "
        f"failovers={int(failovers)} resumed_streams={int(resumed)} wall={wall:.1f}s")
    # the resumed greedy streams against the survivor's answer to the whole request
    for (path, body, chat), res in zip(long_bodies, long_results):
        assert "error" not in res, res["error"]
        plain = dict(body)
        plain.pop("stream")
        st, direct = post(b.port, path, plain, key=UP_KEY)
        assert st == 200, direct
        want = plain_text(direct, chat)
        got = res["text"]
        kind = "chat" if chat else "completion"
        if got == want:
            log(f"resume ({kind}): the resumed greedy text equals b's own answer "
                f"({len(got)} chars)")
        else:
            n = 0
            while n < min(len(got), len(want)) and got[n] == want[n]:
                n += 1
            log(f"resume ({kind}): differs from b's own answer after {n} of {len(want)} chars "
                f"(tokenization at the seam); router: {got[n:n+40]!r} b: {want[n:n+40]!r}")
            assert n > 0, (got, want)
    return m


def health_cycle(rt, a_port):
    deadline = time.time() + 15
    while metrics(rt.port)['cparallel_router_upstream_healthy{upstream="a"}'] != 0:
        assert time.time() < deadline, "the killed upstream stayed healthy"
        time.sleep(0.2)
    m = metrics(rt.port)
    assert m['cparallel_router_upstream_healthy{upstream="b"}'] == 1
    assert "upstream a: unhealthy" in rt.log(), rt.log()
    # with a down, requests still work (on b) and /health/ready is 200
    st, resp = post(rt.port, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert st == 200, resp
    a2 = serve(a_port)
    deadline = time.time() + 30
    while metrics(rt.port)['cparallel_router_upstream_healthy{upstream="a"}'] != 1:
        assert time.time() < deadline, "the restarted upstream did not turn healthy"
        time.sleep(0.2)
    before = metrics(rt.port)['cparallel_router_upstream_requests_total{upstream="a",'
                              'outcome="success"}']
    st, resp = post(rt.port, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert st == 200, resp
    after = metrics(rt.port)['cparallel_router_upstream_requests_total{upstream="a",'
                             'outcome="success"}']
    assert after == before + 1, (before, after)
    log("health: killed upstream unhealthy, restarted one healthy again and preferred")
    return a2


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--cparallel", default=os.environ.get("CP_CPARALLEL"))
    ap.add_argument("--model", default=os.environ.get("CP_TEST_MODEL"))
    ARGS = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if not ARGS.cparallel:
        ARGS.cparallel = os.path.join(root, "build-rt", "cparallel")
    if not ARGS.model:
        ARGS.model = os.path.join(root, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    for what, p in (("binary", ARGS.cparallel), ("model", ARGS.model)):
        if not os.path.exists(p):
            print(f"SKIPPED: no {what} at {p}")
            return SKIP
    t0 = time.time()
    rt = None
    try:
        a, b = serve(), serve()
        rt = route(a, b)
        deadline = time.time() + 20
        while metrics(rt.port)['cparallel_router_upstream_healthy{upstream="a"}'] != 1 or \
                metrics(rt.port)['cparallel_router_upstream_healthy{upstream="b"}'] != 1:
            assert time.time() < deadline, rt.log()
            time.sleep(0.1)
        basic(rt, a)
        failover(rt, a, b)
        health_cycle(rt, a.port)
        assert SECRET not in rt.log(), "a prompt reached the router's log"
        for bad in ("runtime error", "AddressSanitizer", "LeakSanitizer"):
            assert bad not in rt.log(), f"'{bad}' in the router's log"
        # drain on SIGTERM: exit 0
        rt.proc.send_signal(signal.SIGTERM)
        code = rt.proc.wait(40)
        assert code == 0, f"router exit code {code}:\n{rt.log()[-2000:]}"
        assert "stopped" in rt.log()
        for bad in ("runtime error", "AddressSanitizer", "LeakSanitizer"):
            assert bad not in rt.log(), f"'{bad}' in the router's log:\n{rt.log()[-3000:]}"
        log(f"OK ({time.time() - t0:.1f}s)")
        return 0
    except Exception:
        if rt:
            sys.stderr.write("---- router log (tail) ----\n" + rt.log()[-6000:])
        raise
    finally:
        for p in PROCS:
            p.kill()


if __name__ == "__main__":
    sys.exit(main())
