"""serve.py: the OpenAI-shaped API over real HTTP (a server on port 0 in a thread), streaming that
reassembles to the plain answer, batching that changes no answer, every bad input answered 4xx,
a full queue answered 503, a client that leaves mid-stream freeing its rows, and the live page in
headless chromium (test.sh installs it; skipped when it is not on PATH).

A random model does not write guidelines, so a steer (the sampler's logits hook) forces an NPR
block on every row and leaves a few tokens inside each step, the takeaway and the answer to the
model (never a tag, brace or stop token there), so rows, seeds and temperatures still matter.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_serve.py (~25 s)."""
import base64
import fcntl
import http.client
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from html.parser import HTMLParser

import pytest

from helpers import chat, make_checkpoint
from request import SamplingParams, Token
from serve import ChoiceStream, Config, Engine, Job, api_key, default_model, make_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
USER = [{"role": "user", "content": "Compute 2*3 + 4*5."}]


class Shape:
    """A steer: every row writes a guideline with `plans` plans, steps of `free` model tokens each,
    a takeaway and \\boxed{} of `free` model tokens (drawn from logits / 10), then stops (end=False:
    after the takeaway header the model writes on until the budget). delay / gate slow down or hold
    the worker at every step."""

    def __init__(self, tok, plans=2, free=3, end=True, delay=0.0, gate=None):
        ids = lambda *parts: [t for p in parts for t in tok.encode(p)]
        F = [None] * free
        guide = "<guideline>\n" + "".join(f"<plan>{i}: part {i}</plan>\n" for i in range(1, plans + 1)) + "</guideline>"
        self.trunk = ids(guide, "\n", "<takeaway>\n")      # "\n" and the takeaway header are forced by the engine
        if end:
            self.trunk += F + ids("\n</takeaway>\n\\boxed{") + F + ids("}") + [tok.eos_id]
        self.steps = {i: ids(f"<step>\n{i}:") + F + ids("</step>") for i in range(1, plans + 1)}
        self.ban = [i for i in range(tok.vocab_size) if i in tok.stop_ids or any(c in tok.decode_piece(i) for c in "<>{}\\")]
        self.delay, self.gate = delay, gate

    def __call__(self, drawing, logits):
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.delay)
        for i, (seq, st) in enumerate(drawing):
            if st.branch:
                script, done = self.steps.get(st.branch, []), len(st.tokens)
            else:
                script, done = self.trunk, sum(len(s.tokens) for s in seq.streams if s.branch == 0)
            if done < len(script) and script[done] is not None:
                logits[i] = float("-inf")
                logits[i, script[done]] = 0.0
            else:   # free tokens: a flatter draw (the random model is peaked: rows would draw alike)
                logits[i] = logits[i] * 0.1
                logits[i, self.ban] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck"), tags_special=True)


@contextmanager
def serving(ck, steer=None, **cfg):
    model, tok = ck
    cfg = Config(**{"max_tokens_limit": 256, "max_body_bytes": 4096, "max_n": 4, **cfg})
    engine = Engine(model, tok, cfg, instruction="Use parallel steps.", name="tiny", steer=steer or Shape(tok))
    srv = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", engine
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()


@pytest.fixture(scope="module")
def server(ck):
    with serving(ck) as s:
        yield s


def call(url, path="/v1/chat/completions", body=None, raw=None, method=None, headers=()):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **dict(headers)})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), e.headers


def post_raw(url, body):
    """POST a chat body on a bare socket (a client the test can drop mid-answer) -> the socket."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def stream(url, body):
    """POST with stream: true -> the decoded chunks, up to data: [DONE]."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    chunks = []
    for line in r:
        if line.startswith(b"data: "):
            if line.strip() == b"data: [DONE]":
                return chunks
            chunks.append(json.loads(line[6:]))
    raise AssertionError("stream ended without [DONE]")


def reassemble(chunks, n):
    """Per choice: the live pieces (delta.npr) joined per segment, segments in order (their canonical order)."""
    segs = [{} for _ in range(n)]
    for c in chunks:
        for ch in c["choices"]:
            for p in ch["delta"].get("npr", []):
                segs[ch["index"]][p["segment"]] = segs[ch["index"]].get(p["segment"], "") + p["text"]
    return ["".join(s[k] for k in sorted(s)) for s in segs]


def joined(chunks, n):
    """Per choice: delta.content joined in arrival order, as every OpenAI client does."""
    out = [""] * n
    for c in chunks:
        for ch in c["choices"]:
            out[ch["index"]] += ch["delta"].get("content") or ""
    return out


def pieces(chunks, index=0):
    return [p for c in chunks for ch in c["choices"] if ch["index"] == index for p in ch["delta"].get("npr", [])]


def without_time(structure):
    return {**structure, "stats": {k: v for k, v in structure["stats"].items() if k not in ("time_s", "tokens_per_s")}}


def test_completion_models_and_health(server):
    url, _ = server
    status, r, _ = call(url, body={"messages": USER, "temperature": 0, "seed": 3, "max_tokens": 100})
    assert status == 200, r
    assert r["object"] == "chat.completion" and r["model"] == "tiny" and r["seed"] == 3 and r["id"].startswith("chatcmpl-")
    ch = r["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["npr_finish_reason"] == "eos" and ch["message"]["role"] == "assistant"
    npr = ch["npr"]
    assert [p["number"] for p in npr["blocks"][0]["plans"]] == ["1", "2"] and npr["problems"] == []
    steps = npr["blocks"][0]["steps"]
    assert [s[:2] for s in steps] == ["1:", "2:"] and npr["blocks"][0]["takeaway"] is not None
    assert npr["answer"] is not None and ch["message"]["content"].endswith("\\boxed{" + npr["answer"] + "}")
    st = npr["stats"]
    assert st["forks"] == 1 and st["branches_per_fork"] == [2] and st["critical_path_tokens"] < st["total_tokens"]
    assert r["usage"]["completion_tokens"] == st["total_tokens"] > 0
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + st["total_tokens"]
    status, models, _ = call(url, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    status, health, _ = call(url, "/health")
    assert status == 200 and health["status"] == "ok" and health["running_rows"] == 0


@pytest.mark.parametrize("temperature,n", [(0.0, 1), (1.0, 3)])
def test_stream_reassembled_equals_completion(server, temperature, n):
    url, _ = server
    body = {"messages": USER, "temperature": temperature, "top_p": 0.9, "n": n, "seed": 11, "max_tokens": 100}
    status, plain, _ = call(url, body=body)
    assert status == 200, plain
    chunks = stream(url, body)
    contents = [ch["message"]["content"] for ch in plain["choices"]]
    assert reassemble(chunks, n) == contents and joined(chunks, n) == contents
    if n > 1:
        assert len(set(contents)) > 1                 # rows draw from their own streams
    finishes = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finishes == {ch["index"]: ch["finish_reason"] for ch in plain["choices"]}
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == plain["usage"] and last["seed"] == 11
    assert [without_time(s) for s in last["npr"]] == [without_time(ch["npr"]) for ch in plain["choices"]]
    # the two branches stream side by side: their live pieces interleave (segment 1 resumes after segment 2)
    order = [p["segment"] for p in pieces(chunks)]
    assert {1, 2} <= set(order) and any(a == 2 and b == 1 for a, b in zip(order, order[1:]))
    assert {p["segment"]: p["branch"] for p in pieces(chunks)} == {0: 0, 1: 1, 2: 2, 3: 0}


def test_serial_mode_does_not_fork(server):
    url, _ = server
    body = {"messages": USER, "temperature": 0, "seed": 1, "max_tokens": 60, "mode": "serial"}
    status, plain, _ = call(url, body=body)
    assert status == 200 and plain["choices"][0]["npr"]["stats"]["forks"] == 0
    chunks = stream(url, body)
    assert {p["branch"] for p in pieces(chunks)} == {0}
    assert reassemble(chunks, 1) == joined(chunks, 1) == [plain["choices"][0]["message"]["content"]]


def test_concurrent_clients_are_batched_and_match_alone(ck):
    with serving(ck, steer=Shape(ck[1], delay=0.005)) as (url, engine):
        # different settings per request (one batch holds them all: each row samples by its own)
        bodies = [{"messages": [{"role": "user", "content": f"Compute {i}*3."}], "temperature": [1.0, 0.5, 0][i % 3],
                   "seed": i, "n": 1 + i % 2, "max_tokens": 70 + 10 * (i % 2), "top_p": [1.0, 0.9][i % 2],
                   "mode": "serial" if i == 4 else "parallel"} for i in range(6)]
        alone, alone_steps = [], []
        for b in bodies:
            steps = engine.counts["steps"]
            alone.append(call(url, body=b)[1])
            alone_steps.append(engine.counts["steps"] - steps)
        steps = engine.counts["steps"]
        got = [None] * len(bodies)

        def client(i):     # half of them stream
            got[i] = reassemble(stream(url, bodies[i]), bodies[i]["n"]) if i % 2 else \
                [ch["message"]["content"] for ch in call(url, body=bodies[i])[1]["choices"]]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == [[ch["message"]["content"] for ch in a["choices"]] for a in alone]
        assert engine.counts["steps"] - steps < sum(alone_steps)       # requests decoded side by side


def test_a_request_arriving_mid_decode_joins_the_running_rows(ck):
    """Continuous batching: a request sent while a long answer decodes gets its first token within a
    few engine steps and its whole answer while the long one still runs (a static batch would hold it
    until the long one ends)."""
    with serving(ck, steer=Shape(ck[1], end=False, delay=0.005), max_tokens_limit=2000) as (url, engine):
        u = urllib.parse.urlsplit(url)
        sock = post_raw(url, {"messages": USER, "stream": True, "max_tokens": 2000})   # the long one: ~1000 steps
        t0 = time.time()
        while engine.counts["steps"] < 20:
            assert time.time() - t0 < 10, engine.health()
            time.sleep(0.01)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        at = engine.counts["steps"]
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": USER, "stream": True, "max_tokens": 30}),
                     {"Content-Type": "application/json"})
        first, finish = None, None
        for line in conn.getresponse():
            if first is None and b'"npr": [{"segment"' in line:
                first = engine.counts["steps"] - at
            if b'"finish_reason": "length"' in line:
                finish = engine.counts["running_rows"]
            if line.strip() == b"data: [DONE]":
                break
        assert first is not None and first <= 5, first
        assert finish == 1                      # the long answer was still decoding
        sock.close()
        while engine.counts["running_rows"]:
            assert time.time() - t0 < 20, engine.health()
            time.sleep(0.02)
        assert engine.counts["cancelled_rows"] == 1


def test_content_streams_the_lowest_open_segment_and_flushes_the_rest_in_order(ck):
    _, tok = ck
    cs = ChoiceStream(tok)
    recs = lambda text, block, branch: [Token(t, True, 0.0, block, branch, 0) for t in tok.encode(text)]
    steps = [  # one decoding step each: [(segment, text, block, branch)] -> the content it releases
        ([(0, "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n<plan>3: c</plan>\n</guideline>\n", 1, 0)],
         "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n<plan>3: c</plan>\n</guideline>\n"),
        ([(1, "<step>\n1:", 1, 1), (2, "<step>\n2:", 1, 2), (3, "<step>\n3:", 1, 3)], "<step>\n1:"),  # step 1 live
        ([(1, " 23", 1, 1), (2, " 45</step>\n", 1, 2), (3, " 6", 1, 3)], " 23"),     # step 2 ends first: held
        ([(1, "</step>\n", 1, 1), (3, " 7", 1, 3)], "</step>\n<step>\n2: 45</step>\n<step>\n3: 6 7"),  # 3 goes live
        ([(3, "</step>\n", 1, 3), (4, "<takeaway>\n", 1, 0)], "</step>\n<takeaway>\n"),        # the join
        ([(4, "68", 1, 0)], "68"),
    ]
    for events, content in steps:
        got, pieces = cs.step([(seg, recs(text, block, branch)) for seg, text, block, branch in events])
        assert got == content
        assert [(p["segment"], p["text"], p["branch"]) for p in pieces] == [(s, t, br) for s, t, _, br in events]
    assert cs.step([], final=True) == ("", [])


BAD = [  # (case, body or raw bytes, status, param, words the message must contain)
    ("invalid JSON", b"{not json", 400, None, "not valid JSON"),
    ("not an object", [1, 2], 400, None, "JSON object"),
    ("missing messages", {"temperature": 0}, 400, "messages", "required"),
    ("empty messages", {"messages": []}, 400, "messages", "non-empty"),
    ("message not an object", {"messages": ["hi"]}, 400, "messages[0]", "object"),
    ("message without role", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "role"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("content missing", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "string"),
    ("temperature a string", {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature too high", {"messages": USER, "temperature": 5}, 400, "temperature", "[0.0, 2.0]"),
    ("top_p zero", {"messages": USER, "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ("n zero", {"messages": USER, "n": 0}, 400, "n", "[1, 4]"),
    ("n over the limit", {"messages": USER, "n": 99}, 400, "n", "[1, 4]"),
    ("n a float", {"messages": USER, "n": 1.5}, 400, "n", "integer"),
    ("n a bool", {"messages": USER, "n": True}, 400, "n", "integer"),
    ("seed a string", {"messages": USER, "seed": "x"}, 400, "seed", "integer"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "[1, 256]"),
    ("max_tokens over the limit", {"messages": USER, "max_tokens": 10 ** 6}, 400, "max_tokens", "[1, 256]"),
    ("max_completion_tokens over", {"messages": USER, "max_completion_tokens": 257}, 400, "max_completion_tokens", "256"),
    ("unknown mode", {"messages": USER, "mode": "fast"}, 400, "mode", "parallel"),
    ("stream not a bool", {"messages": USER, "stream": "yes"}, 400, "stream", "true or false"),
    ("npr_instruction not a bool", {"messages": USER, "npr_instruction": 1}, 400, "npr_instruction", "true or false"),
    ("instruction without a user turn", {"messages": [{"role": "system", "content": "x"}]}, 400, "messages", "user"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', 400, "messages[0].content", "surrogate"),
    ("unknown chat_template_kwargs", {"messages": USER, "chat_template_kwargs": {"x": 1}}, 400, "chat_template_kwargs",
     "enable_thinking"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 5000}]}, 413, None, "limit 4096"),
]


@pytest.mark.parametrize("case,body,status,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_that_names_the_problem(server, case, body, status, param, words):
    url, _ = server
    got, r, _ = call(url, **({"raw": body} if isinstance(body, bytes) else {"body": body}))
    assert got == status, r
    assert r["error"]["param"] == param and words in r["error"]["message"], r
    assert r["error"]["type"] == "invalid_request_error"


def test_wrong_paths_methods_and_headers(server):
    url, _ = server
    assert call(url, "/nope")[0] == 404
    status, r, headers = call(url)                                       # GET on the completions path
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and "GET" in r["error"]["message"]
    assert call(url, "/health", body={})[0] == 405
    assert call(url, method="DELETE")[0] == 405
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:   # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().split()[1] == b"411"


def test_server_keeps_serving_after_bad_input(server):
    url, engine = server
    for raw in (b"{", b"[]", b'{"messages": 1}'):
        assert call(url, raw=raw)[0] == 400
    status, r, _ = call(url, body={"messages": USER, "max_tokens": 50})
    assert status == 200 and r["choices"][0]["message"]["content"]
    assert call(url, "/health")[1]["errors"] == 0 and engine.worker.is_alive()


def test_close_waits_for_the_step_in_flight(ck):
    """close() returns once the engine's thread has stopped: a step left running when Python exits
    aborts the process ("terminate called without an active exception")."""
    model, tok = ck
    engine = Engine(model, tok, Config(max_tokens_limit=2000), steer=Shape(tok, end=False, delay=0.05))
    job = Job(chat(tok), 1, SamplingParams(max_new_tokens=2000), 1, stream=False)
    engine.submit(job)
    t0 = time.time()
    while engine.counts["steps"] < 3:
        assert time.time() - t0 < 10, engine.health()
        time.sleep(0.01)
    engine.close()
    assert not engine.worker.is_alive()


def test_full_queue_answers_503(ck):
    gate = threading.Event()
    with serving(ck, steer=Shape(ck[1], gate=gate), max_queue=1, max_batch_rows=1) as (url, engine):
        results = {}

        def client(name):
            results[name] = call(url, body={"messages": USER, "max_tokens": 50})

        def wait_for(cond):
            t0 = time.time()
            while not cond():
                assert time.time() - t0 < 10, engine.health()
                time.sleep(0.01)
        a = threading.Thread(target=client, args=("a",))
        a.start()
        wait_for(lambda: engine.counts["running_rows"] == 1)     # the worker holds a, at the gate
        b = threading.Thread(target=client, args=("b",))
        b.start()
        wait_for(lambda: engine.health()["waiting"] == 1)       # b fills the queue
        status, r, _ = call(url, body={"messages": USER})
        assert status == 503 and r["error"]["type"] == "server_overloaded" and "busy" in r["error"]["message"]
        gate.set()
        a.join(30)
        b.join(30)
        assert results["a"][0] == results["b"][0] == 200


def test_disconnect_mid_stream_cancels_the_rows(ck):
    with serving(ck, steer=Shape(ck[1], end=False, delay=0.005), max_tokens_limit=2000) as (url, engine):
        sock = post_raw(url, {"messages": USER, "stream": True, "n": 2, "max_tokens": 2000})
        lines = sock.makefile("rb")
        t0, seen = time.time(), 0
        for line in lines:                   # leave after a few deltas (the whole answer: ~10 s)
            seen += line.startswith(b"data: ") and b'"npr": [{"segment"' in line
            if seen >= 5:
                break
        lines.close()
        sock.close()
        while engine.counts["running_rows"] or engine.counts["cancelled_rows"] < 2:
            assert time.time() - t0 < 8, engine.health()
            time.sleep(0.02)
        assert engine.counts["cancelled_rows"] == 2 and engine.counts["errors"] == 0
        status, r, _ = call(url, body={"messages": USER, "max_tokens": 20})    # and the next request is served
        assert status == 200 and r["choices"][0]["finish_reason"] == "length"
        assert call(url, "/health")[1]["running_rows"] == 0


def raw(url, head, body=b""):
    """Bytes in, the whole answer out (HTTP/1.0: the server closes) -> (status, headers, body);
    status None when the server closed without a word."""
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), dict(line.split(": ", 1) for line in lines[1:]), body


def post(url, body, headers=b"Content-Type: application/json", length=None):
    length = str(len(body)).encode() if length is None else length
    return raw(url, b"POST /v1/chat/completions HTTP/1.0\r\n" + headers + b"\r\nContent-Length: " + length, body)


KILLERS = [  # (case, body, Content-Length or None, status, words): each once ended the handler without an answer
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None, 400, "lone surrogate"),
    ("5000-digit integer", b'{"messages": [], "seed": ' + b"7" * 5000 + b"}", None, 400, "digits"),
    ("JSON nested 100k deep", b"[" * 100_000 + b"]" * 100_000, None, 400, "nested too deeply"),
    ("Content-Length of a superscript two", b"{}", "²".encode("latin-1"), 400, "Content-Length"),
]


def test_inputs_that_killed_the_handler_get_answers(ck, monkeypatch, capfd):
    with serving(ck, max_body_bytes=1 << 20) as (url, engine):
        for case, body, length, status, words in KILLERS:
            got, _, answer = post(url, body, length=length)
            assert got == status and words in json.loads(answer)["error"]["message"], (case, got, answer[:200])
        monkeypatch.setattr(engine, "make_job", lambda req: 1 / 0)          # the truly unexpected
        got, headers, answer = post(url, json.dumps({"messages": USER}).encode())
        assert got == 500 and headers["Content-Type"] == "application/json", answer
        assert json.loads(answer)["error"] == {"message": "internal error: ZeroDivisionError", "type": "server_error",
                                               "param": None, "code": None}
        monkeypatch.undo()
        status, r, _ = call(url, body={"messages": USER, "max_tokens": 20})   # and the server goes on
        assert status == 200 and engine.worker.is_alive()
    assert capfd.readouterr().err.count("Traceback") == 1                    # the 500's, for whoever debugs it


def test_burst_of_200_clients_gets_200s_and_503s_not_resets(ck):
    """200 clients at once on a server that holds 16 (8 rows, 8 waiting): a listen queue of
    queue + rows reset 95-139 of them; each must get its answer, 200 or 503."""
    gate = threading.Event()
    with serving(ck, steer=Shape(ck[1], gate=gate), max_queue=8, max_batch_rows=8) as (url, engine):
        body = json.dumps({"messages": USER, "max_tokens": 30}).encode()
        got, start = [], threading.Barrier(200)

        def client():
            start.wait()
            try:
                got.append(post(url, body)[0])
            except OSError as e:                     # a reset, or a connection the server never took
                got.append(type(e).__name__)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(200)]
        for t in threads:
            t.start()
        # the worker holds its first batch at the gate: every client is soon answered 503 or has its place
        # (connections left outside a full backlog retry for seconds, or time out)
        t0 = time.time()
        try:
            while (placed := len(got) + engine.health()["waiting"] + engine.counts["running_rows"]) < 200:
                assert time.time() - t0 < 10, f"after 10 s {placed} of 200 clients are answered or queued: {got}"
                time.sleep(0.02)
        finally:
            gate.set()
        for t in threads:
            t.join(60)
        assert len(got) == 200 and set(got) == {200, 503}, sorted(map(str, got))
        assert got.count(200) > 8                   # the queue's 8, and the rows the worker had taken


def test_api_key_guards_the_api(ck):
    with serving(ck, api_key="s3cret", max_body_bytes=4 << 20) as (url, _):
        for headers in ((), [("Authorization", "Bearer wrong")], [("Authorization", "s3cret")]):
            status, r, _ = call(url, body={"messages": USER, "max_tokens": 5}, headers=headers)
            assert status == 401 and r["error"]["type"] == "authentication_error" and "Bearer" in r["error"]["message"]
            assert call(url, "/v1/models", headers=headers)[0] == 401
        status, r, _ = call(url, body={"messages": USER, "max_tokens": 5}, headers=[("Authorization", "Bearer s3cret")])
        assert status == 200 and r["choices"][0]["message"]["content"]
        assert call(url, "/health")[0] == 200                       # as vLLM: only /v1 needs the key
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000_000}]}).encode()
        assert post(url, big)[0] == 401              # more than the socket buffers: read, then answered, not reset
        with urllib.request.urlopen(url + "/", timeout=10) as page:
            assert page.status == 200


def test_network_host_needs_a_key_or_an_explicit_flag(monkeypatch):
    monkeypatch.delenv("NPR_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(SystemExit, match="--api-key.*--allow-no-key-on-network"):
            api_key(Config(host=host))
    assert api_key(Config(host="0.0.0.0", allow_no_key_on_network=True)) == ""
    assert api_key(Config(host="0.0.0.0", api_key="k")) == "k"
    assert api_key(Config(host="127.0.0.1")) == api_key(Config(host="localhost")) == ""
    monkeypatch.setenv("NPR_API_KEY", "from-env")
    assert api_key(Config(host="0.0.0.0")) == "from-env"


def test_posts_must_be_json_and_host_a_loopback_name(server):
    url, _ = server
    body, port = json.dumps({"messages": USER, "max_tokens": 5}).encode(), urllib.parse.urlsplit(url).port
    for headers in (b"Content-Type: text/plain", b"X-Nothing: 1"):          # what a cross-origin form can send
        status, _, answer = post(url, body, headers)
        assert status == 415 and "application/json" in json.loads(answer)["error"]["message"]
    assert post(url, body, b"Content-Type: application/json; charset=utf-8")[0] == 200
    for host in (b"localhost:%d" % port, b"127.0.0.1:%d" % port, b"[::1]:%d" % port):
        assert raw(url, b"GET /health HTTP/1.0\r\nHost: " + host)[0] == 200
    for host in (b"evil.example:%d" % port, b"127.0.0.1:%d" % (port + 1), b"localhost", b"localhost:x"):
        for request in (b"GET / HTTP/1.0", b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json"):
            status, _, answer = raw(url, request + b"\r\nHost: " + host + b"\r\nContent-Length: %d" % len(body), body)
            assert status == 421 and "loopback" in json.loads(answer)["error"]["message"], host


def test_prompt_over_the_model_context_is_refused(ck, monkeypatch):
    with serving(ck) as (url, _):
        P = call(url, body={"messages": USER, "max_tokens": 1})[1]["usage"]["prompt_tokens"]
    ctx = P + 20
    monkeypatch.setitem(ck[0].config.raw, "max_position_embeddings", ctx)
    with serving(ck, steer=Shape(ck[1], end=False)) as (url, _):
        status, r, _ = call(url, body={"messages": [{"role": "user", "content": "Compute 2*3. " * 10}]})
        assert status == 400 and r["error"]["param"] == "messages", r
        assert f"context is {ctx} (max_position_embeddings)" in r["error"]["message"]
        status, r, _ = call(url, body={"messages": USER, "max_tokens": 21})
        assert status == 400 and r["error"]["param"] == "max_tokens"
        assert f"{P} tokens and max_tokens is 21: {P + 21} positions" in r["error"]["message"], r
        status, r, _ = call(url, body={"messages": USER})             # no max_tokens: the budget is what is left
        assert status == 200 and r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["npr"]["stats"]["critical_path_tokens"] == ctx - P


def test_openai_sdk_joins_streamed_content_into_the_answer(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=USER, temperature=1.0, top_p=0.9, seed=11, max_tokens=100, n=2)
    plain = [c.message.content for c in client.chat.completions.create(**kw).choices]
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == plain and "<step>\n1:" in plain[0] and "<step>\n2:" in plain[0]


def test_clients_that_leave_cost_one_log_line_and_their_rows(ck, capfd):
    with serving(ck, steer=Shape(ck[1], end=False, delay=0.005), max_tokens_limit=2000) as (url, engine):
        u = urllib.parse.urlsplit(url)
        with post_raw(url, {"messages": USER, "n": 2, "max_tokens": 2000}):   # not streaming: ~10 s
            t0 = time.time()
            while engine.counts["running_rows"] < 2:
                assert time.time() - t0 < 10, engine.health()
                time.sleep(0.02)
        t0 = time.time()
        while engine.counts["running_rows"] or engine.counts["cancelled_rows"] < 2:
            assert time.time() - t0 < 5, engine.health()
            time.sleep(0.02)
        for _ in range(3):                    # clients that reset the connection right after asking
            with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert call(url, "/health")[1]["errors"] == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "client gone before its answer" in err, err[-3000:]


def test_head_options_and_unknown_methods_get_proper_answers(server):
    url, _ = server
    status, headers, body = raw(url, b"HEAD / HTTP/1.0")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and int(headers["Content-Length"]) > 1000
    assert body == b""
    status, headers, body = raw(url, b"HEAD /health HTTP/1.0")
    assert status == 200 and headers["Content-Type"] == "application/json" and body == b""
    status, headers, body = raw(url, b"OPTIONS /v1/chat/completions HTTP/1.0")
    assert status == 204 and headers["Allow"] == "POST, OPTIONS" and body == b""
    assert raw(url, b"OPTIONS /nope HTTP/1.0")[0] == 404
    status, headers, body = raw(url, b"BREW / HTTP/1.0")
    assert status == 501 and headers["Content-Type"] == "application/json" and "BREW" in json.loads(body)["error"]["message"]


def test_bad_http_versions_get_an_answer_with_a_status_line(server):
    """The standard library answers a version it refuses as HTTP/0.9 would: a body with no status line."""
    url, _ = server
    for request, status in ((b"GET /health HTTP/2.0", 505), (b"PRI * HTTP/2.0\r\n\r\nSM", 505),
                            (b"GET /health HTTP/0.9", 505), (b"GET /health HTTP/1.x", 400),
                            (b"GET /health HTTP/1.0 extra", 400)):
        u = urllib.parse.urlsplit(url)
        with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
            sock.sendall(request + b"\r\n\r\n")
            answer = sock.makefile("rb").read()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 %d " % status) and b"Content-Type: application/json" in head, (request, answer)
        assert "HTTP" in json.loads(body)["error"]["message"] or b"version" in body, (request, answer)


def test_conflicting_content_lengths_and_a_body_that_never_arrives_get_answers(server, monkeypatch):
    """RFC 9112 6.3: differing Content-Length headers are a 400 (the first one used to win); a declared
    body that stops arriving is a 408 after the socket timeout (it used to be closed without a word)."""
    import serve
    url, _ = server
    body = json.dumps({"messages": USER, "max_tokens": 5}).encode()
    head = b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
    n = b"%d" % len(body)
    status, _, answer = raw(url, head + b"Content-Length: " + n + b"\r\nContent-Length: 2", body)
    assert status == 400 and "Content-Length" in json.loads(answer)["error"]["message"], answer
    assert raw(url, head + b"Content-Length: " + n + b"\r\nContent-Length: " + n, body)[0] == 200   # the same twice
    monkeypatch.setattr(serve.Handler, "timeout", 1.0)
    t0 = time.time()
    status, _, answer = raw(url, head + b"Content-Length: " + n, body[:10])          # and then nothing
    assert status == 408 and time.time() - t0 < 10, answer
    assert "did not arrive" in json.loads(answer)["error"]["message"]


def test_max_tokens_bounds_all_tokens_as_the_docs_say(ck):
    """The API reference (SERVE.md) says max_tokens bounds all tokens of all branches (not the critical
    path), as the code does."""
    with open(os.path.join(ROOT, "SERVE.md")) as f:
        doc = f.read().split("  max_tokens", 1)[1].split("  temperature", 1)[0]
    assert "all tokens of all branches" in doc and "CRITICAL PATH" not in doc, doc
    with serving(ck, steer=Shape(ck[1], end=False)) as (url, _):
        status, r, _ = call(url, body={"messages": USER, "max_tokens": 100})
    st = r["choices"][0]["npr"]["stats"]
    assert status == 200 and r["choices"][0]["finish_reason"] == "length" and st["forks"] == 1
    assert r["usage"]["completion_tokens"] == st["total_tokens"] == 100 > st["critical_path_tokens"]


def test_thinking_mode_is_explicit(server, monkeypatch):
    url, engine = server
    seen, render = [], engine.tok.render_chat
    monkeypatch.setattr(engine.tok, "render_chat", lambda msgs, **kw: seen.append(kw) or render(msgs, **kw))
    for extra, thinking in (({}, False), ({"chat_template_kwargs": {"enable_thinking": True}}, True)):
        assert call(url, body={"messages": USER, "max_tokens": 5, **extra})[0] == 200
        assert seen[-1] == {"enable_thinking": thinking}


def test_default_model_is_the_newest_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="python toy.py"):
        default_model()
    for stage in ("base", "sft"):
        os.makedirs(tmp_path / "out" / stage)
        (tmp_path / "out" / stage / "config.json").write_text("{}")
    assert default_model() == "out/sft"


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRS = {"src", "srcset", "href", "action", "formaction", "poster", "data", "background", "xlink:href"}


class PageParser(HTMLParser):
    """The page's tags -> `problems` (what keeps it from being one self-contained, well-formed file),
    the text of its <script>s and the CSS of its <style>s and style attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems, self.scripts, self.css, self.open, self.doctype = [], [], [], [], False

    def handle_decl(self, decl):
        self.doctype |= decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        where = f"line {self.getpos()[0]}: <{tag}>"
        for name, value in attrs:
            if name in URL_ATTRS and not (value or "").startswith(("#", "data:")):
                self.problems.append(f"{where} loads {name}={value!r}")
            if name == "style":
                self.css.append(value or "")
        if tag == "link":
            self.problems.append(f"{where}: no <link>, the page inlines what it needs")
        if tag in ("script", "style"):
            (self.scripts if tag == "script" else self.css).append("")
        if tag not in VOID:
            self.open.append((tag, where))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.open.pop()

    def handle_endtag(self, tag):
        if not self.open or self.open[-1][0] != tag:
            opened = self.open[-1][1] if self.open else "nothing"
            self.problems.append(f"line {self.getpos()[0]}: </{tag}> closes {opened}")
        else:
            self.open.pop()

    def handle_data(self, data):
        if self.open and self.open[-1][0] in ("script", "style"):
            (self.scripts if self.open[-1][0] == "script" else self.css)[-1] += data


FETCH = re.compile(r"""fetch\(\s*(["'])(/[^"'`$]*)\1\s*(?:,\s*\{[^}]*?\bmethod\s*:\s*["'](\w+)["'])?""")


def page_problems(page, url):
    """Everything that keeps `page` from working offline against the server at `url`: a list of messages."""
    p = PageParser()
    p.feed(page)
    p.close()
    problems = p.problems + [f"{where} is never closed" for _, where in p.open]
    problems += [] if p.doctype else ["no <!doctype html>"]
    problems += [] if p.scripts and all(s.strip() for s in p.scripts) else ["a <script> without inline code"]
    for css in p.css:
        problems += [f"CSS loads {m!r}" for m in re.findall(r"@import[^;]*|url\(\s*(?![\"']?data:)[^)]*\)", css)]
    js = "\n".join(p.scripts)
    problems += [f"script names an absolute URL: {m!r}" for m in re.findall(r"""["'`]\s*(?:https?:)?//[^"'`]*""", js)]
    problems += [f"script loads through {m}: only fetch() with a literal path is checked"
                 for m in re.findall(r"XMLHttpRequest|EventSource|WebSocket|sendBeacon|importScripts|\bimport\(|"
                                     r"new Worker", js)]
    calls = [(m[2].upper() or "GET", m[1]) for m in FETCH.findall(js)]
    if len(calls) != js.count("fetch("):
        problems.append("a fetch() whose first argument is not a literal path")
    for method, path in calls:   # each answered by this server (the page's chat request shape, 1 token)
        data = json.dumps({"messages": USER, "max_tokens": 1}).encode() if method == "POST" else None
        req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            status = urllib.request.urlopen(req, timeout=60).status
        except urllib.error.HTTPError as e:
            status = e.code
        if status in (404, 405):
            problems.append(f"the page's {method} {path} gets {status} from the server")
    return problems, calls


def test_page_is_one_self_contained_file(server):
    """The page parses, loads nothing from outside (inline <script>/<style>, no <link>, no external URL
    in attributes, CSS or script) and every path its script fetches is one the server answers."""
    url, _ = server
    with urllib.request.urlopen(url + "/?prompt=x&autorun=1", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    problems, calls = page_problems(page, url)
    assert problems == [] and ("POST", "/v1/chat/completions") in calls, problems
    # the checks catch a broken page: each of these edits of the real page is reported
    breaks = [("<script>", '<script src="https://cdn.example.com/x.js"></script><script>'),
              ("</head>", '<link rel="stylesheet" href="https://cdn.example.com/x.css"></head>'),
              ("<style>", '<style>@import "https://cdn.example.com/x.css";'),
              ("<style>", "<style>body { background: url(https://cdn.example.com/b.png); }"),
              ('fetch("/v1/chat/completions"', 'fetch("/v1/completion"'),
              ('fetch("/v1/chat/completions"', 'fetch("https://api.example.com/v1/chat/completions"'),
              ('fetch("/v1/chat/completions"', 'fetch(location.origin + "/v1/chat/completions"'),
              ("</form>", "")]
    for old, new in breaks:
        assert old in page, old
        assert page_problems(page.replace(old, new, 1), url)[0], new


# -----------------------------------------------------------------------------
# The page in a real browser: headless chromium over the DevTools protocol on a pipe (stdlib only)

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """--remote-debugging-pipe: JSON messages ending in NUL, the browser reads fd 3 and writes fd 4."""

    def __init__(self, url, profile):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        # the browser's ends become fds 3 and 4 in a small Python launcher that then execs chromium
        # (copied to numbers >= 10 first, so one dup2 cannot overwrite the other)
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w))
        for fd in (to_r, from_w):
            os.close(fd)
        launch = f"import os, sys; os.dup2({a}, 3); os.dup2({b}, 4); os.execv(sys.argv[1], sys.argv[1:])"
        # the background-networking flags: this machine's network is closed (the browser's own calls home are refused)
        cmd = [sys.executable, "-c", launch, CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--remote-debugging-pipe",
               f"--user-data-dir={profile}", "--window-size=1280,1000", url]
        self.proc = subprocess.Popen(cmd, pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self.buf, self.n = b"", 0

    def send(self, method, session=None, timeout=30, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buf:
                if not select.select([self.from_r], [], [], max(0.0, deadline - time.time()))[0]:
                    raise TimeoutError(method)
                chunk = os.read(self.from_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            m = json.loads(raw)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_w)
        os.close(self.from_r)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (test.sh installs Debian's chromium when run as root)")
def test_page_draws_branch_columns_in_headless_chromium(ck, tmp_path):
    with serving(ck, steer=Shape(ck[1], plans=3, free=6, delay=0.03)) as (url, engine):
        q = urllib.parse.urlencode(dict(prompt="Compute 2*3 + 4*5 + 6*7.", temperature=0, seed=5, max_tokens=120, autorun=1))
        tools = DevTools(f"{url}/?{q}", tmp_path / "profile")
        try:
            t0 = time.time()
            while not (pages := [t for t in tools.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]):
                assert time.time() - t0 < 20
                time.sleep(0.1)
            session = tools.send("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]

            def js(expr):
                return tools.send("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")
            side_by_side = 0      # most branch columns seen writing at once, each with some text of its own
            writing = "[...document.querySelectorAll('.branch.live .mono')].filter(b => /\\d:/.test(b.textContent)).length"
            # state None: between documents; idle: the page has not submitted yet
            while (state := js("document.body ? document.body.dataset.state : 'loading'")) in (None, "loading",
                                                                                                 "idle", "running"):
                assert time.time() - t0 < 40, state
                side_by_side = max(side_by_side, js(writing) or 0)
                time.sleep(0.05)
            assert state == "done", js("document.getElementById('error').textContent")
            page = json.loads(js("""JSON.stringify({
                branches: [...document.querySelectorAll('.branch')].map(b => b.textContent),
                plans: document.querySelectorAll('.trunk .plan').length,
                takeaway: document.querySelectorAll('.trunk .takeaway').length,
                answer: document.getElementById('answer').textContent,
                stats: document.getElementById('stats').textContent})"""))
            png = base64.b64decode(tools.send("Page.captureScreenshot", session, format="png")["data"])
        finally:
            tools.close()
    os.makedirs(ARTIFACTS, exist_ok=True)                 # gitignored; look at it after a run
    with open(os.path.join(ARTIFACTS, "serve_page.png"), "wb") as f:
        f.write(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len(page["branches"]) == 3 and all(f"branch {i}" in b and f"{i}:" in b for i, b in enumerate(page["branches"], 1)), page
    assert page["plans"] == 3 and page["takeaway"] == 1
    assert page["answer"].startswith("Answer:") and "forks 1" in page["stats"] and "critical path" in page["stats"]
    assert side_by_side >= 2, "branch columns should fill in at the same time"
