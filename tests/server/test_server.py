#!/usr/bin/env python3
"""test_server.py - `cparallel serve` end to end: the real server on a free
loopback port with the default model, driven by curl, the official openai
client and raw sockets. Checks responses and streams, greedy determinism,
concurrent requests against their single results, every 4xx path (and that
the server keeps answering), the health and metrics endpoints, KV blocks
coming back after a client leaves mid-stream, and the drain on SIGTERM.

Usage: test_server.py [--cparallel PATH] [--model PATH]
(defaults: env CP_CPARALLEL / CP_TEST_MODEL). Exit code 77 = skipped."""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SKIP = 77
API_KEY = "test-key-3b9f"
MODEL_NAME = "smollm2-test"
SECRET = "zanzibar-marmalade-7731"  # must never reach the server's log

ARGS = None
SERVER = None  # the shared server of most tests


class Server:
    """A cparallel serve process on 127.0.0.1:<free port>, its stderr kept."""

    def __init__(self, *extra, env_key=True, env_extra=None):
        env = dict(os.environ)
        env.update(env_extra or {})
        if env_key:
            env["CPARALLEL_API_KEY"] = API_KEY
        else:
            env.pop("CPARALLEL_API_KEY", None)
        cmd = [ARGS.cparallel, "serve", "--model", ARGS.model, "--port", "0",
               "--model-name", MODEL_NAME, "--threads", "2", "--ctx-size", "1024",
               "--max-tokens-limit", "512", "--no-progress", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env)
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
        if not ready.wait(60) or self.port is None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self):
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.pump.join(5)
        self.proc.stderr.close()

    # ---- HTTP helpers (stdlib) -------------------------------------------------
    def request(self, method, path, body=None, headers=None, key=API_KEY, timeout=60):
        h = {"Content-Type": "application/json"}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        h.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), data
        finally:
            c.close()

    def post(self, path, body, **kw):
        status, headers, data = self.request("POST", path, body, **kw)
        try:
            return status, json.loads(data) if data else None, headers
        except ValueError:
            return status, data, headers

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def metrics(self):
        status, _, data = self.get("/metrics")
        assert status == 200, status
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def complete(self, prompt, **kw):
        body = {"model": MODEL_NAME, "prompt": prompt, "temperature": 0, "max_tokens": 16}
        body.update(kw)
        status, r, _ = self.post("/v1/completions", body)
        assert status == 200, (status, r)
        return r["choices"][0]["text"]


def sse_events(data):
    """The JSON payloads of an SSE body, and whether it ended with [DONE]."""
    events, done = [], False
    for block in data.decode().split("\n\n"):
        block = block.strip()
        if not block or block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        if payload == "[DONE]":
            done = True
        else:
            assert not done, "data after [DONE]"
            events.append(json.loads(payload))
    return events, done


def curl(*args, input=None):
    if not shutil.which("curl"):
        raise unittest.SkipTest("curl is not installed (scripts/install_deps.sh)")
    r = subprocess.run(["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", *args],
                       capture_output=True, timeout=90, input=input)
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


class Api(unittest.TestCase):
    s = None

    @classmethod
    def setUpClass(cls):
        cls.s = SERVER

    def assert_error(self, status, r, want, param=None):
        self.assertEqual(status, want, r)
        self.assertIsInstance(r, dict, r)
        err = r.get("error")
        self.assertIsInstance(err, dict, r)
        for k in ("message", "type", "param", "code"):
            self.assertIn(k, err)
        self.assertTrue(err["message"])
        if param is not None:
            self.assertEqual(err["param"], param, r)

    # ---- curl ------------------------------------------------------------------
    def test_curl_completion(self):
        url = self.s.base + "/v1/completions"
        hdr = ["-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {API_KEY}"]
        code, body = curl(*hdr, "-d", json.dumps({"prompt": "The capital of France is",
                                                  "max_tokens": 8, "temperature": 0}), url)
        self.assertEqual(code, 200, body)
        r = json.loads(body)
        self.assertTrue(r["id"].startswith("cmpl-"))
        self.assertEqual(r["object"], "text_completion")
        self.assertEqual(r["model"], MODEL_NAME)
        self.assertIsInstance(r["created"], int)
        ch = r["choices"][0]
        self.assertEqual(ch["index"], 0)
        self.assertIn(ch["finish_reason"], ("stop", "length"))
        self.assertIsNone(ch["logprobs"])
        self.assertTrue(ch["text"])
        u = r["usage"]
        self.assertEqual(u["total_tokens"], u["prompt_tokens"] + u["completion_tokens"])
        self.assertLessEqual(u["completion_tokens"], 8)
        # streamed: the same text in chunks
        code, body = curl("-N", *hdr, "-d", json.dumps({"prompt": "The capital of France is",
                                                        "max_tokens": 8, "temperature": 0,
                                                        "stream": True}), url)
        self.assertEqual(code, 200)
        events, done = sse_events(body)
        self.assertTrue(done)
        self.assertTrue(all(e["object"] == "text_completion" for e in events))
        self.assertEqual(len({e["id"] for e in events}), 1)
        self.assertEqual("".join(e["choices"][0]["text"] for e in events), ch["text"])
        self.assertEqual(events[-1]["choices"][0]["finish_reason"], ch["finish_reason"])
        self.assertTrue(all(e["choices"][0]["finish_reason"] is None for e in events[:-1]))

    def test_curl_chat(self):
        url = self.s.base + "/v1/chat/completions"
        hdr = ["-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {API_KEY}"]
        req = {"messages": [{"role": "system", "content": "You are brief."},
                            {"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 24, "temperature": 0}
        code, body = curl(*hdr, "-d", json.dumps(req), url)
        self.assertEqual(code, 200, body)
        r = json.loads(body)
        self.assertTrue(r["id"].startswith("chatcmpl-"))
        self.assertEqual(r["object"], "chat.completion")
        msg = r["choices"][0]["message"]
        self.assertEqual(msg["role"], "assistant")
        self.assertTrue(msg["content"].strip())
        code, body = curl("-N", *hdr, "-d", json.dumps(dict(req, stream=True)), url)
        self.assertEqual(code, 200)
        events, done = sse_events(body)
        self.assertTrue(done)
        self.assertTrue(all(e["object"] == "chat.completion.chunk" for e in events))
        self.assertEqual(events[0]["choices"][0]["delta"].get("role"), "assistant")
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        self.assertEqual(text, msg["content"])
        self.assertEqual(events[-1]["choices"][0]["finish_reason"], r["choices"][0]["finish_reason"])

    # ---- the official client -------------------------------------------------------
    def client(self):
        from openai import OpenAI
        return OpenAI(base_url=self.s.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def test_openai_completions(self):
        c = self.client()
        r = c.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12,
                                 temperature=0, logprobs=2)
        ch = r.choices[0]
        self.assertTrue(ch.text)
        self.assertEqual(r.usage.completion_tokens, len(ch.logprobs.tokens))
        self.assertEqual(len(ch.logprobs.top_logprobs), len(ch.logprobs.tokens))
        self.assertTrue(all(lp <= 0 for lp in ch.logprobs.token_logprobs))
        # greedy: the chosen token is the most likely one
        for tok, lp, top in zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.top_logprobs):
            self.assertAlmostEqual(max(top.values()), lp, places=4)
        self.assertEqual("".join(ch.logprobs.tokens), ch.text)
        chunks = list(c.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                           max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        self.assertEqual("".join(x.choices[0].text for x in chunks if x.choices), ch.text)
        self.assertEqual(chunks[-1].usage.completion_tokens, r.usage.completion_tokens)
        self.assertEqual(chunks[-1].choices, [])

    def test_continuous_usage_and_continuation(self):
        """What a router needs to resume a broken stream elsewhere: token counts
        on every chunk, and a chat turn the model goes on with."""
        st, _, data = self.s.request("POST", "/v1/completions", {
            "prompt": "The capital of France", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"continuous_usage_stats": True}})
        self.assertEqual(st, 200)
        events, done = sse_events(data)
        self.assertTrue(done)
        counts = [e["usage"]["completion_tokens"] for e in events]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(counts[-1], 10)
        self.assertTrue(all(e["usage"]["prompt_tokens"] > 0 for e in events))
        text = "".join(e["choices"][0]["text"] for e in events)
        # the same text in two parts: the first half, then the rest as a continuation
        msgs = [{"role": "user", "content": "Name three colors."}]
        st, _, data = self.s.request("POST", "/v1/chat/completions", {
            "messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True})
        self.assertEqual(st, 200)
        pieces = [e["choices"][0]["delta"].get("content", "") for e in sse_events(data)[0]]
        whole = "".join(pieces)
        self.assertTrue(text and whole)
        # cut where a stream would break: between two chunks (tokens)
        head = "".join(pieces[:len(pieces) // 2])
        st, rest, _ = self.s.post("/v1/chat/completions", {
            "messages": msgs + [{"role": "assistant", "content": head}], "max_tokens": 12,
            "temperature": 0, "continue_final_message": True, "add_generation_prompt": False})
        self.assertEqual(st, 200, rest)
        cont = rest["choices"][0]["message"]["content"]
        # greedy: the continuation re-joins the original (up to the seam's tokenization)
        self.assertEqual((head + cont)[:len(whole) - 3], whole[:len(whole) - 3], (head, cont, whole))
        for bad in ({"continue_final_message": True},
                    {"continue_final_message": True, "add_generation_prompt": True,
                     "messages": msgs + [{"role": "assistant", "content": "x"}]},
                    {"continue_final_message": 1},
                    {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}}):
            body = {"messages": msgs, "max_tokens": 2}
            body.update(bad)
            st, r, _ = self.s.post("/v1/chat/completions", body)
            self.assertEqual(st, 400, (bad, r))

    def test_openai_chat(self):
        c = self.client()
        msgs = [{"role": "user", "content": "Name three colors."}]
        r = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=20,
                                      temperature=0, logprobs=True, top_logprobs=3)
        ch = r.choices[0]
        self.assertEqual(ch.message.role, "assistant")
        self.assertTrue(ch.message.content)
        self.assertIn(ch.finish_reason, ("stop", "length"))
        self.assertEqual(len(ch.logprobs.content), r.usage.completion_tokens)
        self.assertEqual(len(ch.logprobs.content[0].top_logprobs), 3)
        stream = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=20,
                                           temperature=0, stream=True)
        text = "".join(x.choices[0].delta.content or "" for x in stream)
        self.assertEqual(text, ch.message.content)
        models = c.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL_NAME])

    def test_stop_and_seed(self):
        full = self.s.complete("1, 2, 3, 4, 5,", max_tokens=12)
        self.assertIn("7", full)
        cut = self.s.complete("1, 2, 3, 4, 5,", max_tokens=12, stop=["7"])
        self.assertTrue(full.startswith(cut) and "7" not in cut, (full, cut))
        a = self.s.complete("The weather today", max_tokens=12, temperature=1.0, seed=1234)
        b = self.s.complete("The weather today", max_tokens=12, temperature=1.0, seed=1234)
        self.assertEqual(a, b)

    # ---- determinism and concurrency -----------------------------------------------
    def test_greedy_determinism(self):
        a = self.s.complete("In a distant galaxy", max_tokens=24)
        b = self.s.complete("In a distant galaxy", max_tokens=24)
        self.assertEqual(a, b)

    def test_concurrent_equal_alone(self):
        # 32 at once (more than --max-running: some wait for a slot); every
        # fourth samples with top-k and a seed, every third asks for
        # logprobs: each answer equals the same request sent alone
        prompts = [f"Story number {i}: once there was a" for i in range(32)]

        def params(i):
            kw = {"max_tokens": 16}
            if i % 4 == 1:
                kw.update(temperature=0.8, top_k=20, seed=100 + i)
            if i % 3 == 2:
                kw.update(logprobs=2)
            return kw

        def ask(i):
            status, r, _ = self.s.post("/v1/completions", {"model": MODEL_NAME, "prompt": prompts[i],
                                                           "temperature": 0, **params(i)})
            assert status == 200, (status, r)
            ch = r["choices"][0]
            return ch["text"], ch.get("logprobs")

        alone = [ask(i) for i in range(len(prompts))]
        self.assertTrue(all(lp is not None for i, (_, lp) in enumerate(alone) if i % 3 == 2))
        got = [None] * len(prompts)

        def run(i):
            got[i] = ask(i)

        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        self.assertEqual(got, alone)

    # ---- errors -------------------------------------------------------------------------
    def test_errors(self):
        p = "/v1/completions"
        st, r, _ = self.s.post(p, "{not json")
        self.assert_error(st, r, 400)
        st, r, _ = self.s.post(p, {"prompt": 42})
        self.assert_error(st, r, 400, "prompt")
        st, r, _ = self.s.post(p, {"prompt": "x", "max_tokens": "ten"})
        self.assert_error(st, r, 400, "max_tokens")
        st, r, _ = self.s.post(p, {"prompt": "x", "temperature": "hot"})
        self.assert_error(st, r, 400, "temperature")
        st, r, _ = self.s.post(p, {"prompt": "x", "frobnicate": True})
        self.assert_error(st, r, 400, "frobnicate")
        self.assertIn("frobnicate", r["error"]["message"])
        st, r, _ = self.s.post(p, {"prompt": "x", "n": 3})
        self.assert_error(st, r, 400, "n")
        st, r, _ = self.s.post(p, {"prompt": "x", "max_tokens": 100000})
        self.assert_error(st, r, 400, "max_tokens")
        st, r, _ = self.s.post(p, {})
        self.assert_error(st, r, 400, "prompt")
        st, r, _ = self.s.post("/v1/chat/completions", {"messages": []})
        self.assert_error(st, r, 400, "messages")
        st, r, _ = self.s.post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
        self.assert_error(st, r, 400)
        st, r, _ = self.s.post(p, {"prompt": "x", "frequency_penalty": 0.5})
        self.assert_error(st, r, 400, "frequency_penalty")
        self.assertIn("not supported", r["error"]["message"])
        st, r, _ = self.s.post(p, {"prompt": "x", "frequency_penalty": 0, "presence_penalty": 0,
                                   "max_tokens": 1, "user": "u"})
        self.assertEqual(st, 200, r)
        # the prompt longer than the context: the message gives the numbers
        st, r, _ = self.s.post(p, {"prompt": "hello " * 1100, "max_tokens": 4})
        self.assert_error(st, r, 400)
        self.assertIn("1024", r["error"]["message"])
        st, r, _ = self.s.post(p, {"prompt": "hello " * 700, "max_tokens": 512})
        self.assert_error(st, r, 400, "max_tokens")
        self.assertRegex(r["error"]["message"], r"1024.*\d+ in the prompt, 512 in the completion")
        # invalid UTF-8 inside a JSON string
        st, r, _ = self.s.post(p, b'{"prompt": "caf\xc3\x28 au lait"}')
        self.assert_error(st, r, 400)
        # a body over --max-body (1 MiB), by length and chunked
        big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
        st, r, _ = self.s.post(p, big)
        self.assert_error(st, r, 413)

        def chunks():
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        if shutil.which("curl"):
            # curl asks "Expect: 100-continue" first: answered before the body
            code, body = curl("-H", f"Authorization: Bearer {API_KEY}", "--data-binary", "@-",
                              self.s.base + p, input=big)
            self.assertEqual(code, 413, body)
            self.assert_error(code, json.loads(body), 413)
        c = http.client.HTTPConnection("127.0.0.1", self.s.port, timeout=30)
        c.request("POST", p, body=chunks(), encode_chunked=True,
                  headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        resp = c.getresponse()
        self.assert_error(resp.status, json.loads(resp.read()), 413)
        c.close()
        # keys
        st, r, _ = self.s.post(p, {"prompt": "x"}, key=None)
        self.assert_error(st, r, 401)
        st, r, _ = self.s.post(p, {"prompt": "x"}, key="wrong-key")
        self.assert_error(st, r, 401)
        st, r, _ = self.s.post(p, {"prompt": "x"}, key=API_KEY + "x")
        self.assert_error(st, r, 401)
        st, _, data = self.s.get("/v1/models", key=None)
        self.assertEqual(st, 401)
        # paths and methods
        st, _, data = self.s.get("/v1/nothing")
        self.assert_error(st, json.loads(data), 404)
        st, _, data = self.s.get("/v1/completions")
        self.assert_error(st, json.loads(data), 405)
        st, r, _ = self.s.post(p, {"prompt": "x", "model": "some-other-model"})
        self.assert_error(st, r, 404, "model")
        # still serving
        self.assertEqual(self.s.get("/health")[0], 200)
        self.assertTrue(self.s.complete("One, two,", max_tokens=3) is not None)
        log = self.s.log()
        self.assertNotIn(SECRET, log)

    def test_logs_have_no_prompts(self):
        self.s.complete(f"Remember the code {SECRET} please", max_tokens=4)
        st, r, _ = self.s.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"The word is {SECRET}"}], "max_tokens": 4})
        self.assertEqual(st, 200)
        time.sleep(0.2)
        log = self.s.log()
        self.assertNotIn(SECRET, log)
        self.assertRegex(log, r"cmpl-\w+ POST /v1/completions 200 prompt_tokens=\d+ completion_tokens=\d+")

    # ---- models, health, metrics -----------------------------------------------------
    def test_models_health_metrics(self):
        st, _, data = self.s.get("/v1/models")
        self.assertEqual(st, 200)
        r = json.loads(data)
        self.assertEqual(r["object"], "list")
        self.assertEqual(r["data"][0]["id"], MODEL_NAME)
        self.assertEqual(r["data"][0]["object"], "model")
        st, _, data = self.s.get("/health", key=None)
        self.assertEqual((st, json.loads(data)), (200, {"status": "ok", "region": None}))
        st, _, data = self.s.get("/health/ready", key=None)
        self.assertEqual(st, 200, data)
        m0 = self.s.metrics()
        self.s.complete("Counting tokens:", max_tokens=5)
        m1 = self.s.metrics()
        key = 'cparallel_requests_total{endpoint="/v1/completions",status="200"}'
        self.assertEqual(m1[key], m0.get(key, 0) + 1)
        self.assertGreater(m1["cparallel_prompt_tokens_total"], m0["cparallel_prompt_tokens_total"])
        self.assertGreaterEqual(m1["cparallel_generation_tokens_total"],
                                m0["cparallel_generation_tokens_total"] + 1)
        self.assertGreater(m1["cparallel_time_to_first_token_seconds_count"],
                           m0["cparallel_time_to_first_token_seconds_count"])
        self.assertEqual(m1['cparallel_request_duration_seconds_bucket{le="+Inf"}'],
                         m1["cparallel_request_duration_seconds_count"])
        for name in ("cparallel_running_sequences", "cparallel_waiting_requests",
                     "cparallel_kv_blocks_used", "cparallel_kv_blocks_free",
                     "cparallel_prefix_cache_hit_ratio", "cparallel_step_seconds",
                     "cparallel_preemptions_total", "cparallel_time_per_output_token_seconds_count"):
            self.assertIn(name, m1)
        _, _, text = self.s.get("/metrics")
        self.assertIn(b"# TYPE cparallel_time_to_first_token_seconds histogram", text)
        self.assertIn(b"# HELP cparallel_kv_blocks_used", text)

    def test_disconnect_frees_kv(self):
        idle = self.s.metrics()["cparallel_kv_blocks_used"]
        body = json.dumps({"prompt": "Tell me a very long story.", "max_tokens": 400,
                           "ignore_eos": True, "temperature": 0, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", self.s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 6:
            chunk = sock.recv(4096)
            self.assertTrue(chunk, got)
            got += chunk
        self.assertIn(b"200 OK", got.split(b"\r\n")[0])
        during = self.s.metrics()
        self.assertGreater(during["cparallel_kv_blocks_used"], idle)
        self.assertEqual(during["cparallel_running_sequences"], 1)
        sock.close()
        deadline = time.time() + 5
        while time.time() < deadline:
            m = self.s.metrics()
            if m["cparallel_kv_blocks_used"] == idle and m["cparallel_running_sequences"] == 0:
                break
            time.sleep(0.1)
        self.assertEqual(m["cparallel_kv_blocks_used"], idle)
        self.assertEqual(m["cparallel_running_sequences"], 0)
        self.assertLess(m["cparallel_generation_tokens_total"] - during["cparallel_generation_tokens_total"], 390)
        self.assertTrue(self.s.complete("Still there?", max_tokens=2) is not None)


class OwnServer(unittest.TestCase):
    """Tests that need a server of their own (queue limits, signals)."""

    def test_queue_full_429(self):
        s = Server("--max-running", "1", "--max-waiting", "1")
        try:
            results = [None] * 4

            def one(i):
                results[i] = s.post("/v1/completions", {"prompt": f"Essay {i}:", "max_tokens": 60,
                                                        "ignore_eos": True, "temperature": 0})

            ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            codes = sorted(r[0] for r in results)
            self.assertIn(429, codes)
            self.assertIn(200, codes)
            self.assertTrue(set(codes) <= {200, 429}, codes)
            for st, r, headers in results:
                if st == 429:
                    self.assertEqual(r["error"]["type"], "rate_limit_error")
                    self.assertIn("Retry-After", headers)
            self.assertTrue(s.complete("Still there?", max_tokens=2) is not None)
            m = s.metrics()
            self.assertGreaterEqual(m['cparallel_requests_total{endpoint="/v1/completions",status="429"}'], 1)
        finally:
            s.kill()

    def test_sigterm_drains(self):
        # SIGTERM under load: two requests run (--max-running 2) and three
        # wait for a slot, two of the five streamed; every accepted request
        # still completes in full, new ones get 503, and the exit code is 0
        s = Server("--drain-timeout", "60", "--max-running", "2")
        try:
            n, tokens = 5, 60
            results = [None] * n

            def one(i):
                body = {"prompt": f"Essay {i}: write about rivers.", "max_tokens": tokens, "ignore_eos": True,
                        "temperature": 0, "stream": i % 3 == 1}
                status, headers, data = s.request("POST", "/v1/completions", body)
                results[i] = (status, data)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            deadline, loaded = time.time() + 30, False
            while time.time() < deadline and not loaded:
                m = s.metrics()
                loaded = m["cparallel_running_sequences"] >= 2 and m["cparallel_waiting_requests"] >= 1
                time.sleep(0.02)
            self.assertTrue(loaded, "two requests running and one waiting before the SIGTERM")
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                st, r, headers = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
                self.assertEqual(st, 503, r)
                self.assertIn("error", r)
                self.assertEqual(s.get("/health/ready")[0], 503)
            except (ConnectionError, OSError):
                pass  # refused: the daemon is already gone
            for t in ts:
                t.join(120)
            for i, (st, data) in enumerate(results):
                self.assertEqual(st, 200, (i, data[:200]))
                if i % 3 == 1:
                    events, done = sse_events(data)
                    self.assertTrue(done, i)
                    self.assertEqual(events[-1]["choices"][0]["finish_reason"], "length", i)
                    self.assertTrue("".join(e["choices"][0]["text"] for e in events), i)
                else:
                    r = json.loads(data)
                    self.assertEqual(r["usage"]["completion_tokens"], tokens, i)
                    self.assertEqual(r["choices"][0]["finish_reason"], "length", i)
            self.assertEqual(s.proc.wait(30), 0, s.log())
            self.assertIn("draining", s.log())
        finally:
            s.kill()

    def hooks(self, tmp):
        """A hook script that appends its stdin event to tmp/events.jsonl."""
        path = os.path.join(tmp, "hook.sh")
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\ncat >> {tmp}/events.jsonl\n")
        os.chmod(path, 0o755)
        return path

    def events(self, tmp):
        try:
            with open(os.path.join(tmp, "events.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def test_sigterm_drain_runs_hooks(self):
        with tempfile.TemporaryDirectory() as tmp:
            hook = self.hooks(tmp)
            s = Server("--region", "eu-west", "--hook", f"ready={hook}", "--hook", f"drain={hook}",
                       "--hook", f"fault={hook}")
            try:
                st, _, data = s.get("/health/ready", key=None)
                self.assertEqual((st, json.loads(data)), (200, {"status": "ready", "region": "eu-west"}))
                self.assertIn('cparallel_info{model="smollm2-test",region="eu-west"}', s.get("/metrics")[2].decode())
                result = {}
                t = threading.Thread(target=lambda: result.update(r=s.post("/v1/completions", {
                    "prompt": "Write an essay.", "max_tokens": 60, "ignore_eos": True, "temperature": 0})))
                t.start()
                deadline = time.time() + 20
                while time.time() < deadline and s.metrics()["cparallel_running_sequences"] < 1:
                    time.sleep(0.05)
                s.proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                try:
                    st, r, headers = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
                    self.assertEqual((st, r["error"]["code"]), (503, "draining"), r)
                    self.assertIn("Retry-After", headers)
                except (ConnectionError, OSError):
                    pass
                t.join(60)
                self.assertEqual(result["r"][0], 200, result["r"][1])
                self.assertEqual(s.proc.wait(30), 0, s.log())
                kinds = [e["kind"] for e in self.events(tmp)]
                self.assertEqual(sorted(kinds), ["drain", "ready"], s.log())
                drain = [e for e in self.events(tmp) if e["kind"] == "drain"][0]
                self.assertEqual((drain["rank"], drain["region"], drain["in_flight"]), (0, "eu-west", 1))
                self.assertEqual(drain["pid"], s.proc.pid)
                for key in ("host", "time", "unix_time", "message"):
                    self.assertIn(key, drain)
            finally:
                s.kill()

    def test_sigusr1_fails_over(self):
        """SIGUSR1: not ready at once, in-flight requests end with a retryable
        error (plain: 503 server_fault; streams: an error event), the fault
        hook runs once, the exit is non-zero."""
        with tempfile.TemporaryDirectory() as tmp:
            hook = self.hooks(tmp)
            s = Server("--region", "us-east", "--hook", f"fault={hook}", "--hook", f"drain={hook}")
            try:
                result = {}
                body = {"prompt": "Write an essay.", "max_tokens": 400, "ignore_eos": True,
                        "temperature": 0}
                t1 = threading.Thread(target=lambda: result.update(plain=s.post("/v1/completions", body)))
                t2 = threading.Thread(target=lambda: result.update(
                    stream=s.request("POST", "/v1/completions", dict(body, stream=True))))
                t1.start()
                t2.start()
                deadline = time.time() + 20
                while time.time() < deadline and s.metrics()["cparallel_running_sequences"] < 2:
                    time.sleep(0.05)
                t0 = time.time()
                s.proc.send_signal(signal.SIGUSR1)
                t1.join(30)
                t2.join(30)
                rc = s.proc.wait(30)
                self.assertNotEqual(rc, 0, s.log())
                self.assertLess(time.time() - t0, 15)
                st, r, headers = result["plain"]
                self.assertEqual((st, r["error"]["code"]), (503, "server_fault"), r)
                self.assertIn("Retry-After", headers)
                st, _, data = result["stream"]
                self.assertEqual(st, 200)
                events, done = sse_events(data)
                self.assertTrue(done)
                self.assertEqual(events[-1]["error"]["code"], "server_fault", events[-1])
                evs = self.events(tmp)
                self.assertEqual([e["kind"] for e in evs], ["fault"], s.log())
                self.assertEqual((evs[0]["region"], evs[0]["in_flight"]), ("us-east", 2))
                self.assertIn("SIGUSR1", evs[0]["message"])
                self.assertIn("fault: a fault stop was requested", s.log())
            finally:
                s.kill()

    def test_failed_step_is_a_fault(self):
        """A forward step that fails (a device error, say) fails the server
        over rather than answering errors forever."""
        s = Server(env_extra={"CP_SCHED_FAIL_STEP": "3"})
        try:
            st, r, headers = s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 8})
            self.assertEqual((st, r["error"]["code"]), (503, "server_fault"), r)
            self.assertIn("injected failure", r["error"]["message"])
            self.assertNotEqual(s.proc.wait(30), 0, s.log())
            self.assertIn("fault: a forward step failed", s.log())
        finally:
            s.kill()

    def test_hook_errors_and_timeout(self):
        with tempfile.TemporaryDirectory() as tmp:
            for spec, msg in (("fault", "is not KIND=PATH"), ("panic=/bin/true", "unknown hook kind"),
                              (f"fault={tmp}/missing", "No such file"),
                              (f"fault={tmp}", "not an executable file")):
                p = subprocess.run([ARGS.cparallel, "serve", "--model", ARGS.model, "--hook", spec],
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertIn(msg, p.stderr)
            slow = os.path.join(tmp, "slow.sh")
            with open(slow, "w") as f:
                f.write(f"#!/bin/sh\necho started > {tmp}/slow.out\nexec sleep 100\n")
            os.chmod(slow, 0o755)
            s = Server("--hook", f"fault={slow}", "--hook-timeout", "1")
            try:
                t0 = time.time()
                s.proc.send_signal(signal.SIGUSR1)
                self.assertNotEqual(s.proc.wait(30), 0)
                self.assertLess(time.time() - t0, 10)
                self.assertIn("killed after", s.log())
                self.assertTrue(os.path.exists(f"{tmp}/slow.out"))
            finally:
                s.kill()
            out = subprocess.run(["pgrep", "-f", slow], capture_output=True, text=True)
            self.assertEqual(out.stdout.strip(), "", "the hook outlived its timeout")

    def test_drain_timeout_cancels(self):
        s = Server("--drain-timeout", "1")
        try:
            result = {}

            def long_request():
                result["r"] = s.post("/v1/completions", {"prompt": "Write an essay.", "max_tokens": 500,
                                                         "ignore_eos": True, "temperature": 0})

            t = threading.Thread(target=long_request)
            t.start()
            deadline = time.time() + 20
            while time.time() < deadline and s.metrics()["cparallel_running_sequences"] < 1:
                time.sleep(0.05)
            t0 = time.time()
            s.proc.send_signal(signal.SIGTERM)
            self.assertEqual(s.proc.wait(30), 0, s.log())
            self.assertLess(time.time() - t0, 15)
            t.join(30)
            st, r, _ = result["r"]
            self.assertEqual(st, 503, r)
        finally:
            s.kill()


def main():
    global ARGS, SERVER
    ap = argparse.ArgumentParser()
    ap.add_argument("--cparallel", default=os.environ.get("CP_CPARALLEL", ""))
    ap.add_argument("--model", default=os.environ.get("CP_TEST_MODEL", ""))
    ARGS, rest = ap.parse_known_args()
    if not ARGS.model or not os.path.isfile(ARGS.model):
        print(f"SKIPPED: no test model at '{ARGS.model}' (set CP_TEST_MODEL; scripts/fetch_model.sh)")
        return SKIP
    if not ARGS.cparallel or not os.access(ARGS.cparallel, os.X_OK):
        print(f"SKIPPED: no cparallel binary at '{ARGS.cparallel}' (set CP_CPARALLEL)")
        return SKIP
    try:
        import openai  # noqa: F401
    except ImportError:
        print(f"SKIPPED: {sys.executable} has no 'openai' package (scripts/install_deps.sh makes .venv-test)")
        return SKIP
    t0 = time.time()
    SERVER = Server()
    try:
        prog = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False)
        ok = prog.result.wasSuccessful()
        # after everything above, the shared server still drains and exits 0
        SERVER.proc.send_signal(signal.SIGTERM)
        try:
            rc = SERVER.proc.wait(40)
        except subprocess.TimeoutExpired:
            rc = "still running 40 s after SIGTERM"
        if rc != 0:
            print(f"FAIL: the shared server ended with {rc} after SIGTERM; its log:\n{SERVER.log()}")
            ok = False
    finally:
        SERVER.kill()
    print(f"server tests took {time.time() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
