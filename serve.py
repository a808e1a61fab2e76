"""
An OpenAI-compatible HTTP server for NPR checkpoints, and a live page that draws the branches of a
parallel answer as they decode side by side.

    python serve.py                            # the built-in default: newest of out/grpo, out/sft, out/base
    python serve.py --model DIR --port 8000    # any checkpoint folder (HF layout)
    NPR_API_KEY=KEY python serve.py --host 0.0.0.0   # other machines: clients send Authorization: Bearer KEY
    # page: http://127.0.0.1:8000/   (serve.html, self-contained, works offline)
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Compute 23*4 + 17*6."}]}'

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the page).

Request (OpenAI's shape; other OpenAI fields such as stop or stream_options are accepted and ignored):
  messages      [{"role": "system" | "user" | "assistant", "content": str}], not empty
  max_tokens    1..--max-tokens-limit, also as max_completion_tokens: the budget on all tokens of all branches
                together (as OpenAI's: usage.completion_tokens counts them). Positions run along the
                critical path (longest chain of dependent tokens), at most that long, so prompt +
                max_tokens over the model's context (max_position_embeddings) is a 400; without
                max_tokens: --default-max-tokens, cut to fit
  temperature   0..2 (default 1; 0, or below 1e-5, = greedy)   top_p (0, 1] (default 1)   n 1..--max-n (default 1)
  seed          int (default: drawn, and echoed as "seed"): choice i samples from the row seed
                seed * 1000003 + i (its branches from their own generators), so an answer does not
                depend on the requests it is batched with nor on when it starts (sampler.py)
  stream        bool: server-sent events (below)
  chat_template_kwargs  {"enable_thinking": bool} (vLLM's field; default false, the empty think block we train)
  NPR fields:
  mode             "parallel" (default): fork at </guideline>, join after the last </step>;
                   "serial": ordinary decoding, the tags are just text
  npr_instruction  bool (default: true in parallel mode, false in serial mode): the last user
                   message becomes npr.build_prompt(content, the checkpoint's instruction). A model
                   writes guidelines (and so forks) only when asked to, as in training.

Response: the usual fields (id, object, created, model, choices, usage) plus "seed", and per choice:
  finish_reason      "stop" (eos, also a malformed answer), "length" (budget), "cancelled"
  npr_finish_reason  the sampler's exact reason: "eos" | "budget" | "malformed: <why>" | "cancelled"
  npr                {"blocks": [{"plans": [{"number", "text"}], "steps": [str], "takeaway"}],
                      "answer" (last \\boxed{}), "final_text", "problems" (npr.parse), "stats":
                      {total_tokens, critical_path_tokens, forks, branches_per_fork, time_s, tokens_per_s}}
message.content is the response in canonical order (trunk, step 1 .. step k, takeaway ...): what a
serial reader of the sequence sees, = Sample.text without the stop token.

Streaming: `data: {chunk}` events. A role chunk per choice; per decoding step and choice a chunk with
delta = {"content": text, "npr": [{"segment": s, "block": b, "branch": br, "text": t}]}; a finish
chunk per choice (finish_reason, npr_finish_reason) as soon as its row ends; a last chunk with
"choices": [], "usage" and "npr": [the structure of each choice]; then `data: [DONE]`.
content comes in canonical order, so joined as it arrives (what every OpenAI client does) it is
message.content: the lowest unfinished segment streams live, later ones are held and follow in order
as those before them end (step 1 live, step 2 once step 1 is done, ...). npr is the live view the
page draws: each segment's new text as the branches decode side by side, segment counting the
choice's segments in canonical order (trunk, step 1 .. step k, trunk, ...), branch 0 the trunk.
Each segment's text is decoded from all its tokens so far; a trailing U+FFFD (a character split
across tokens) is held back until complete.

Batching, continuous: one worker thread drives the sampler's engine step by step (Sampler.step).
Before each step it hands the oldest waiting requests to the engine while rows are free for all their
choices (each row with its own SamplingParams: mode, temperature, top_p, budget); a request that
arrives while others decode joins them at the next step, and a row that ends is refilled at the next.
At most --max-queue requests wait for rows; one more is answered 503. A client that disconnects has
its rows cancelled and freed at the next step (a non-streaming one is noticed within a second: its
closed socket reads end-of-file; a client that half-closes its socket after the request counts as
gone). The KV cache is made once: --max-batch-rows rows (fewer if the sampler's memory budget says
so), each with room for the largest request the limits admit (prompt + max_tokens, within the
model's context; max_tokens bounds all tokens of all branches, as OpenAI's does): size
--max-batch-rows, --max-prompt-tokens and --max-tokens-limit to the accelerator for a real checkpoint.
Access: on loopback (the default) a Host header must name loopback with this port (421 otherwise: a
web page's DNS-rebinding name). POSTs must be Content-Type application/json (415: other origins'
pages cannot send that without a CORS preflight, never granted). With --api-key or $NPR_API_KEY,
/v1 needs "Authorization: Bearer <key>" (401; the page and /health stay open, as in vLLM); a
non-loopback --host without a key refuses to start unless --allow-no-key-on-network.
Errors: {"error": {"message", "type", "param"}} with 400 (bad request, conflicting Content-Lengths), 401,
404, 405 (with Allow), 408 (a body that stops arriving), 411, 413 (body over --max-body-bytes), 415, 421,
501 (unknown method), 503 (queue full), 505 (HTTP/0.9, HTTP/2), 500 (the sampler failed, or anything
unexpected; the server keeps serving). Every request gets an answer, with a status line.
"""
import dataclasses
import ipaddress
import json
import os
import secrets
import select
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty, Queue
from urllib.parse import urlsplit

import torch

import npr
from checkpoint import load_checkpoint
from cli import instruction_for, parse_cli, print_config
from sampler import Sampler, SamplingParams

DEFAULT_MODELS = ("out/grpo", "out/sft", "out/base")  # the built-in default's stages, newest first
FINISH = {"eos": "stop", "budget": "length", "cancelled": "cancelled"}   # malformed -> "stop"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


@dataclass
class Config:
    model: str = ""                  # checkpoint folder (HF layout); "" = newest of out/grpo, out/sft, out/base
    host: str = "127.0.0.1"          # 0.0.0.0 serves other machines too
    port: int = 8000                 # 0 = any free port
    device: str = ""                 # "" = cuda when available
    bf16: bool = True                # on CUDA: bf16 weights (the sampler's CUDA-graph fast path)
    compile_step: bool = False       # on CUDA: torch.compile the graph step (2x faster; ~1 min per new step shape)
    instruction_file: str = ""       # the NPR instruction ("" = the checkpoint's own, else npr.INSTRUCTION)
    name: str = ""                   # the model id the API reports; "" = the checkpoint folder's name
    max_batch_rows: int = 32         # rows (requests x n) decoded together
    max_queue: int = 64              # requests waiting for the worker; one more is answered 503
    max_n: int = 8                   # the largest n a request may ask for
    max_tokens_limit: int = 4096     # the largest max_tokens (all tokens of all branches) a request may ask for
    default_max_tokens: int = 512    # max_tokens when a request gives none
    max_prompt_tokens: int = 8192    # longer rendered prompts get 400
    max_branches: int = 5            # more numbered plans in one guideline ends the answer as malformed
    fork_min_tokens: int = 64        # fork only while this many tokens of the budget remain (official: 1024)
    max_body_bytes: int = 1 << 20    # larger request bodies get 413
    keepalive_s: float = 15.0        # streams send an SSE comment when idle this long (finds gone clients)
    api_key: str = ""                # /v1 needs "Authorization: Bearer <key>"; "" = $NPR_API_KEY, else no key
    allow_no_key_on_network: bool = False  # serve a non-loopback --host without a key (anyone who reaches it may use it)


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# -----------------------------------------------------------------------------
# Request checking: every problem is a 4xx naming the field

def number(req, name, default, lo, hi, integer=False, lo_open=False):
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:60]}", name)
    if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:          # NaN fails both
        raise ApiError(400, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def flag(req, name, default):
    v = req.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(v)[:60]}", name)
    return v


def check_messages(msgs):
    """-> [{"role", "content"}]: string contents (OpenAI's text parts are joined), role developer = system."""
    if msgs is None:
        raise ApiError(400, "messages is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, user or assistant, got {json.dumps(role)[:40]}",
                           f"{where}.role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string (or a list of text parts), got "
                                f"{json.dumps(content)[:40]}", f"{where}.content")
        try:
            content.encode()          # JSON's \ud800 escapes decode to lone surrogates, not valid Unicode
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where}.content has a lone surrogate at character {e.start} (not valid Unicode)",
                           f"{where}.content") from None
        out.append({"role": role, "content": content})
    return out


def check_request(req, cfg):
    """The request body (a dict) -> the validated fields; raises ApiError."""
    if not isinstance(req, dict):
        raise ApiError(400, "the body must be a JSON object")
    msgs = check_messages(req.get("messages"))
    mode = req.get("mode", "parallel")
    if mode not in ("parallel", "serial"):
        raise ApiError(400, f"mode must be \"parallel\" or \"serial\", got {json.dumps(mode)[:40]}", "mode")
    name = "max_tokens" if req.get("max_tokens") is not None else "max_completion_tokens"
    kwargs = req.get("chat_template_kwargs") or {}               # vLLM's field; only the thinking switch here
    if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
        raise ApiError(400, 'chat_template_kwargs supports only {"enable_thinking": true | false}',
                       "chat_template_kwargs")
    return dict(
        messages=msgs, mode=mode, thinking=flag(kwargs, "enable_thinking", False),
        instruction=flag(req, "npr_instruction", mode == "parallel"),
        stream=flag(req, "stream", False),
        temperature=float(number(req, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(number(req, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        n=number(req, "n", 1, 1, cfg.max_n, integer=True),
        max_tokens=number(req, name, None, 1, cfg.max_tokens_limit, integer=True),    # None: make_job decides
        seed=number(req, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True))


# -----------------------------------------------------------------------------
# The engine: a queue of requests, one worker thread stepping the sampler (continuous batching)

class SegmentText:
    """Incremental text of one segment: decode its tokens so far, hand out the new suffix, hold
    back a trailing U+FFFD (a multi-byte character whose bytes have not all arrived)."""

    def __init__(self, tok, block, branch):
        self.tok, self.block, self.branch = tok, block, branch
        self.ids, self.base, self.sent = [], 0, ""   # text of ids[:base] is all handed out; of the rest, `sent`
        self.text = ""                               # all handed out
        self.closed = False                          # a branch that wrote </step> (it writes nothing after)

    def push(self, ids, final=False):
        self.ids += ids
        text = self.tok.decode(self.ids[self.base:])
        keep = text if final else text.rstrip("\ufffd")
        new = keep[len(self.sent):]
        if keep == text:      # a clean cut: later tokens cannot change this text (lossy UTF-8 is prefix-stable)
            self.base, self.sent = len(self.ids), ""
        else:
            self.sent = keep
        self.text += new
        self.closed = self.closed or (self.branch > 0 and "</step>" in self.text[-len(new) - 8:])
        return new


class ChoiceStream:
    """One streamed choice, two views. Live: each segment's new text per step (the `npr` pieces:
    branches side by side). Canonical: the same text in sequence order (`content`): the lowest
    unfinished segment streams live, later ones are held and follow in order as those before them
    end, so joining `content` as it arrives gives message.content."""

    def __init__(self, tok):
        self.tok, self.segs, self.held, self.head = tok, {}, {}, 0

    def step(self, events, drop=(), final=False):
        """events: [(segment, [sampler.Token])] of one step; drop: token ids left out (the final stop token);
        final: the row has ended -> (content, [{"segment", "block", "branch", "text"}])."""
        pieces = []
        for seg, toks in events:
            st = self.segs.setdefault(seg, SegmentText(self.tok, toks[0].block, toks[0].branch))
            st.block = toks[-1].block                    # a trunk segment enters a block at <guideline>
            pieces.append((seg, st.push([t.id for t in toks if t.id not in drop])))
        if final:                                        # a held-back half character: the row is over
            pieces += [(seg, st.push([], final=True)) for seg, st in sorted(self.segs.items())]
        pieces = [(seg, text) for seg, text in pieces if text]
        for seg, text in pieces:
            self.held[seg] = self.held.get(seg, "") + text
        last, last_trunk = max(self.segs, default=0), max((k for k, st in self.segs.items() if not st.branch), default=0)
        content = ""
        while self.head in self.segs:
            content += self.held.pop(self.head, "")
            st = self.segs[self.head]
            # a segment has ended when: a branch wrote </step>, a trunk forked, or the trunk went on after it
            if not (final or st.closed or (not st.branch and self.head < last) or self.head < last_trunk):
                break
            self.head += 1
        return content, [dict(segment=seg, block=self.segs[seg].block, branch=self.segs[seg].branch, text=text)
                         for seg, text in pieces]


class Job:
    """One request: its prompt, rows, parameters and the events its HTTP thread reads."""

    def __init__(self, prompt, n, params, seed, stream):
        self.prompt, self.n, self.params, self.seed, self.stream = prompt, n, params, seed, stream
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        # ("delta", i, content, npr pieces) | ("finish", i, why) | ("done", samples) | ("error", msg)
        self.events = Queue()
        self.choices = []                        # streaming: a ChoiceStream per choice
        self.seqs = []                           # its requests in the sampler, one per choice
        self.sent = []                           # streaming: per choice, the tokens reported per segment
        self.cancelled = False                   # set by the HTTP thread when its client is gone


class Engine:
    """Requests in, one worker thread that drives the sampler's engine step by step (continuous
    batching: a request joins the running rows as soon as a row is free), per-request events out.
    `steer` goes to the sampler (tests force an NPR structure on a random model with it)."""

    def __init__(self, model, tok, cfg=None, instruction=None, name="npr", steer=None):
        self.cfg = cfg or Config()
        self.tok, self.sampler, self.name = tok, Sampler(model, tok), name
        self.instruction = instruction           # None = npr.INSTRUCTION
        self.context = model.config.raw.get("max_position_embeddings")   # RoPE positions the model was trained for
        self.sampler.steer, self.sampler.max_rows = steer, self.cfg.max_batch_rows
        # rows sized once for the largest request the limits let in: an arriving one never waits for a new cache
        largest = min(self.context or float("inf"), self.cfg.max_prompt_tokens + self.cfg.max_tokens_limit)
        self.sampler.min_slots = largest + 16 * (self.cfg.max_branches + 2) + 1
        self.waiting, self.jobs = deque(), []    # jobs not yet in the sampler / in it
        self.cond = threading.Condition()
        self.counts = dict(requests=0, steps=0, rows=0, running_rows=0, cancelled_rows=0, errors=0)
        self.closed = False
        self.worker = threading.Thread(target=self.loop, name="npr-engine", daemon=True)
        self.worker.start()

    def make_job(self, req):
        """Validated request fields -> a Job (rendered prompt, SamplingParams, seed)."""
        msgs = req["messages"]
        if req["instruction"]:
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if not users:
                raise ApiError(400, "npr_instruction needs a user message to wrap (or send npr_instruction: false)",
                               "messages")
            msgs, last = list(msgs), users[-1]
            msgs[last] = {"role": "user", "content": npr.build_prompt(msgs[last]["content"], self.instruction)}
        try:     # the mode is explicit: the checkpoint's own template may default to thinking
            prompt = self.tok.encode(self.tok.render_chat(msgs, enable_thinking=req["thinking"]))
        except ValueError as e:
            raise ApiError(400, f"messages cannot be rendered with this model's chat template: {e}", "messages")
        P, ctx, budget = len(prompt), self.context or float("inf"), req["max_tokens"]
        if P > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {P} tokens, more than the server's limit "
                                f"{self.cfg.max_prompt_tokens}", "messages")
        # positions run along the critical path (<= max_tokens): the prompt + max_tokens must fit the
        # model's context (max_position_embeddings); beyond it RoPE positions are untrained: garbage
        if P >= ctx:
            raise ApiError(400, f"the prompt has {P} tokens, the model's context is {ctx} "
                                f"(max_position_embeddings): no room for an answer", "messages")
        if budget is None:
            budget = min(self.cfg.default_max_tokens, ctx - P)       # no max_tokens given: fit what is left
        elif P + budget > ctx:
            raise ApiError(400, f"the prompt has {P} tokens and max_tokens is {budget}: {P + budget} positions, "
                                f"more than the model's context {ctx} (max_position_embeddings)", "max_tokens")
        params = SamplingParams(mode=req["mode"], temperature=req["temperature"], top_p=req["top_p"],
                                max_new_tokens=budget, max_branches=self.cfg.max_branches,
                                fork_min_tokens=self.cfg.fork_min_tokens)
        seed = req["seed"] if req["seed"] is not None else secrets.randbits(31)
        job = Job(prompt, req["n"], params, seed, req["stream"])
        job.choices = [ChoiceStream(self.tok) for _ in range(job.n)] if job.stream else []
        return job

    def submit(self, job):
        with self.cond:
            if len(self.waiting) >= self.cfg.max_queue:
                raise ApiError(503, f"the server is busy: {len(self.waiting)} requests are waiting; retry later",
                               kind="server_overloaded")
            self.waiting.append(job)
            self.counts["requests"] += 1
            self.cond.notify()

    def admit(self):
        """Hand waiting jobs to the sampler, oldest first, while it has free rows for all their choices."""
        s = self.sampler
        with self.cond:
            while not (self.waiting or self.jobs or self.closed):
                self.cond.wait()
            while self.waiting and not self.closed:
                job = self.waiting[0]
                rows = len(s.free) if s.cache is not None else self.cfg.max_batch_rows
                if not job.cancelled and self.jobs and job.n > rows - len(s.waiting):
                    break                                # wait for rows (nothing runs: it goes in anyway)
                self.waiting.popleft()
                if job.cancelled:
                    continue
                job.seqs = [s.add(job.prompt, job.params, job.seed * 1000003 + i) for i in range(job.n)]
                job.sent = [[] for _ in range(job.n)]
                self.jobs.append(job)
                self.counts["rows"] += job.n
            self.counts["running_rows"] = len(s.running) + len(s.waiting)
            return not self.closed

    def loop(self):
        while self.admit():
            for job in self.jobs:
                if job.cancelled:                    # its client is gone: its rows end at this step
                    for seq in job.seqs:
                        self.sampler.cancel(seq)
            try:
                ended = self.sampler.step()
            except Exception as e:                   # one bad step must not stop the server
                traceback.print_exc()
                self.counts["errors"] += 1
                for job in self.jobs:
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.jobs, self.sampler.running, self.sampler.waiting = [], [], deque()
                self.sampler.release()
                continue
            self.counts["steps"] += 1
            self.counts["cancelled_rows"] += sum(seq.finish == "cancelled" for seq in ended)
            self.counts["running_rows"] = len(self.sampler.running) + len(self.sampler.waiting)
            for job in self.jobs:
                self.report(job)
            self.jobs = [job for job in self.jobs if not all(seq.finish for seq in job.seqs)]

    def report(self, job):
        """Events of one step: per streamed choice its new tokens (per segment) and its end; the job's samples at its end."""
        for i, seq in enumerate(job.seqs):
            if job.stream and (seq.finish is None or job.sent[i] is not None):
                sent = job.sent[i]
                sent += [0] * (len(seq.streams) - len(sent))
                events = [(k, st.tokens[sent[k]:]) for k, st in enumerate(seq.streams) if len(st.tokens) > sent[k]]
                for k, st in enumerate(seq.streams):
                    sent[k] = len(st.tokens)
                final = seq.finish is not None           # no final stop token in the text
                content, pieces = job.choices[i].step(events, self.sampler.stop_ids if seq.finish == "eos" else (), final)
                if content or pieces:
                    job.events.put(("delta", i, content, pieces))
                if final:
                    job.sent[i] = None                   # reported
                    job.events.put(("finish", i, seq.finish))
        if all(seq.finish for seq in job.seqs):
            job.events.put(("done", [seq.to_sample() for seq in job.seqs]))

    def close(self):
        """Stop the engine after its current step (a step still running when Python exits aborts it)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if threading.current_thread() is not self.worker:
            self.worker.join()

    def health(self):
        with self.cond:
            return dict(status="ok", model=self.name, waiting=len(self.waiting), **self.counts)


def structure(sample):
    """The parsed answer (npr.parse) and the stats of one sample: the "npr" field of a choice."""
    p = npr.parse(sample.text)
    st = dict(sample.stats)
    st["tokens_per_s"] = st["total_tokens"] / max(st["time_s"], 1e-9)
    return dict(blocks=[dict(plans=[dict(number=num, text=t) for num, t in b.plans], steps=b.steps,
                             takeaway=b.takeaway) for b in p.blocks],
                answer=p.answer, final_text=p.final_text, problems=p.problems, stats=st)


def usage(job, samples):
    done = sum(s.stats["total_tokens"] for s in samples)
    return dict(prompt_tokens=len(job.prompt), completion_tokens=done, total_tokens=len(job.prompt) + done)


# -----------------------------------------------------------------------------
# HTTP: one thread per connection (ThreadingHTTPServer), HTTP/1.0 (a response ends with its connection)

def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    server_version = "npr-serve/1"
    timeout = 60                     # socket timeout: a client that stops sending or reading is dropped
    # what a request line is taken as until its version is read: the standard library's HTTP/0.9
    # answers a refused version (HTTP/2.0, HTTP/1.x) with a body and no status line
    default_request_version = "HTTP/1.0"
    GET_PATHS = ("/", "/health", "/v1/models")
    POST_PATHS = ("/v1/chat/completions",)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def handle_one_request(self):
        """Every request gets an answer: a client that left is one log line, anything unexpected a
        500 with a JSON body and its traceback in the log; the connection's thread never dies silently."""
        self.replied, self.body_gone = False, False
        try:
            super().handle_one_request()
        except ConnectionError as e:                      # BrokenPipe, ConnectionReset: the client left
            self.log_message("client gone: %s", e)
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            self.close_connection = True
            if not self.replied:
                try:
                    self.send_error_json(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))
                except OSError:
                    pass

    def send_response(self, code, message=None):
        self.replied = True
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (bad request line, unknown method, huge headers) as JSON too."""
        self.close_connection = True
        self.send_error_json(ApiError(code, message or self.responses.get(code, ("error",))[0],
                                      kind="invalid_request_error" if code < 500 else "server_error"))

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error_json(self, e: ApiError):
        self.send_json(e.status, {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                       [("Allow", self.allowed())] if e.status == 405 else [])

    @property
    def path_only(self):
        return urlsplit(self.path).path

    def allowed(self):
        return "GET, HEAD, OPTIONS" if self.path_only in self.GET_PATHS else "POST, OPTIONS"

    def wrong_path(self):
        if self.path_only in self.GET_PATHS + self.POST_PATHS:
            return ApiError(405, f"{self.command} is not allowed on {self.path_only}", kind="method_not_allowed")
        return ApiError(404, f"no such path: {self.path_only}", kind="not_found")

    def parse_request(self):
        """The standard library's parsing, then who may ask: a False return sends nothing more."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":           # its answers have no status line: not spoken here
            self.request_version = "HTTP/1.0"
            self.send_error(505, "HTTP/0.9 is not supported: use HTTP/1.0 or HTTP/1.1")
            return False
        host, key = self.headers.get("Host"), self.engine.cfg.api_key
        # DNS rebinding: a web page can point a name of its own at 127.0.0.1 and read the answers as
        # same-origin; a browser always sends that name as Host, so on loopback only loopback names pass
        if self.server.loopback and host is not None and not self.loopback_host(host):
            self.refuse(ApiError(421, f"Host {host!r} is not a loopback name of this server "
                                    f"(127.0.0.1, localhost or [::1] with port {self.server.server_address[1]})",
                                 kind="misdirected_request"))
            return False
        # as vLLM: the key guards /v1; the page and /health stay open
        given = self.headers.get("Authorization", "")
        if key and self.path_only.startswith("/v1") and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self.refuse(ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                 kind="authentication_error"))
            return False
        return True

    def loopback_host(self, host):
        try:
            u = urlsplit("//" + host)
            return is_loopback(u.hostname or "") and (u.port or 80) == self.server.server_address[1]
        except ValueError:                                     # a port that is not a number
            return False

    def do_GET(self):
        path = self.path_only
        if path == "/":
            with open(PAGE, "rb") as f:
                body = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        elif path == "/health":
            self.send_json(200, self.engine.health())
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.engine.name, "object": "model", "created": 0, "owned_by": "npr"}]})
        else:
            self.send_error_json(self.wrong_path())

    do_HEAD = do_GET

    def do_OPTIONS(self):
        if self.path_only not in self.GET_PATHS + self.POST_PATHS:
            return self.send_error_json(self.wrong_path())
        self.send_response(204)               # no CORS headers: other origins' pages stay refused
        self.send_header("Allow", self.allowed())
        self.end_headers()

    def do_other(self):
        self.send_error_json(self.wrong_path())

    do_PUT = do_DELETE = do_PATCH = do_other

    def refuse(self, e: ApiError):
        """Answer e without using the body, but read (a bounded amount of) it first: closing with unread
        data resets the connection, and the client would see the reset instead of the answer. Of
        conflicting Content-Lengths the smallest is read; a body that timed out is not waited for again."""
        sizes = [int(v) for v in self.headers.get_all("Content-Length") or [] if v.isascii() and v.isdigit()]
        left = 0 if self.body_gone or not sizes else min(sizes + [16 * self.engine.cfg.max_body_bytes])
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)
        self.send_error_json(e)

    def read_body(self):
        sizes = self.headers.get_all("Content-Length") or []
        if not sizes:
            raise ApiError(411, "Content-Length is required (chunked bodies are not supported)")
        if len(set(sizes)) > 1:                                      # RFC 9112 6.3: framing unknown, a 400
            raise ApiError(400, f"conflicting Content-Length headers: {', '.join(sizes)}")
        size = sizes[0]
        if not (size.isascii() and size.isdigit()):                  # "²".isdigit() is True
            raise ApiError(400, f"bad Content-Length: {size!r}")
        size, limit = int(size), self.engine.cfg.max_body_bytes
        if size > limit:
            raise ApiError(413, f"the body has {size} bytes, more than the limit {limit}")
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            self.body_gone = True
            raise ApiError(408, f"the body ({size} bytes, Content-Length) did not arrive within {self.timeout:g} s") \
                from None
        if len(body) < size:                                         # the client closed its side early
            raise ApiError(400, f"the body ended after {len(body)} of its {size} bytes (Content-Length)")
        return body

    def do_POST(self):
        body = None
        try:
            if self.path_only not in self.POST_PATHS:
                raise self.wrong_path()
            body = self.read_body()
            # a cross-origin page may POST text/plain without asking first; application/json needs a
            # CORS preflight, which this server never grants
            if self.headers.get_content_type() != "application/json":
                raise ApiError(415, f"Content-Type must be application/json, got {self.headers.get('Content-Type')!r}")
            try:
                req = json.loads(body)
            except RecursionError:
                raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
            except ValueError as e:          # also bad UTF-8, and integers over 4300 digits
                raise ApiError(400, f"the body is not valid JSON: {e}") from None
            job = self.engine.make_job(check_request(req, self.engine.cfg))
            self.engine.submit(job)
        except ApiError as e:
            return self.send_error_json(e) if body is not None else self.refuse(e)
        if job.stream:
            self.stream(job)
        else:
            self.complete(job)

    def client_gone(self):
        """An HTTP/1.0 client sends nothing after its request: a readable socket that peeks
        end-of-file (or fails) has been closed."""
        try:
            return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def complete(self, job):
        while True:
            try:
                ev = job.events.get(timeout=1.0)
            except Empty:
                if self.client_gone():
                    job.cancelled = True                  # the worker cancels its rows at the next step
                    return self.log_message("client gone before its answer: its rows are cancelled")
                continue
            if ev[0] in ("done", "error"):              # a non-streaming job only waits for these
                break
        if ev[0] == "error":
            return self.send_error_json(ApiError(500, ev[1], kind="server_error"))
        samples = ev[1]
        choices = [dict(index=i, message=dict(role="assistant", content=s.text),
                        finish_reason=FINISH.get(s.finish_reason, "stop"), npr_finish_reason=s.finish_reason,
                        npr=structure(s)) for i, s in enumerate(samples)]
        self.send_json(200, dict(id=job.id, object="chat.completion", created=job.created, model=self.engine.name,
                                 seed=job.seed, choices=choices, usage=usage(job, samples)))

    def stream(self, job):
        """Server-sent events from the job's queue; a failed write means the client is gone."""
        head = dict(id=job.id, object="chat.completion.chunk", created=job.created, model=self.engine.name,
                    seed=job.seed)

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(i, delta, finish=None, **extra):
            send({**head, "choices": [dict(index=i, delta=delta, finish_reason=finish, **extra)]})

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for i in range(job.n):
                chunk(i, {"role": "assistant", "content": ""})
            while True:
                try:
                    ev = job.events.get(timeout=self.engine.cfg.keepalive_s)
                except Empty:
                    self.wfile.write(b": waiting\n\n")          # an SSE comment: clients skip it
                    self.wfile.flush()
                    continue
                if ev[0] == "delta":
                    _, i, content, pieces = ev
                    chunk(i, {"content": content, **({"npr": pieces} if pieces else {})})
                elif ev[0] == "finish":
                    chunk(ev[1], {}, FINISH.get(ev[2], "stop"), npr_finish_reason=ev[2])
                elif ev[0] == "error":
                    send({"error": {"message": ev[1], "type": "server_error", "param": None, "code": None}})
                    break
                else:
                    send({**head, "choices": [], "usage": usage(job, ev[1]), "npr": [structure(s) for s in ev[1]]})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError as e:                               # BrokenPipe, ConnectionReset, timeout
            job.cancelled = True                           # the worker cancels its rows at the next step
            self.close_connection = True
            self.log_message("client gone mid-stream (%s): its rows are cancelled", type(e).__name__)


class Server(ThreadingHTTPServer):
    def __init__(self, engine, host, port):
        self.engine, self.loopback = engine, is_loopback(host)
        # the listen backlog holds connections not yet accepted: a burst beyond it is reset, and a burst
        # far beyond what the server holds (waiting + running) must still get its 503s, so it is sized for
        # bursts, not for the queue (the kernel caps it at net.core.somaxconn, 4096 by default)
        self.request_queue_size = max(1024, engine.cfg.max_queue + engine.cfg.max_batch_rows)
        super().__init__((host, port), Handler)


def make_server(engine, host="127.0.0.1", port=8000):
    return Server(engine, host, port)


def api_key(cfg):
    """--api-key, else $NPR_API_KEY; a server that other machines can reach needs one unless asked not to."""
    key = cfg.api_key or os.environ.get("NPR_API_KEY", "")
    if not key and not is_loopback(cfg.host) and not cfg.allow_no_key_on_network:
        raise SystemExit(f"--host {cfg.host} lets other machines in: set --api-key KEY (or NPR_API_KEY=KEY), "
                         f"or pass --allow-no-key-on-network to serve everyone who can reach it")
    return key


def default_model():
    """The newest stage of the built-in default present under ./out, or a message saying how to make one."""
    for d in DEFAULT_MODELS:
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise SystemExit(f"no --model given and no built-in default checkpoint in {', '.join(DEFAULT_MODELS)} "
                     f"(looked under {os.getcwd()}): run `python toy.py` (the base model, ~4 min on a CPU) or "
                     f"`bash speedrun.sh` (every stage, ~12 min), or pass --model DIR")


def main(cfg: Config):
    print_config(dataclasses.replace(cfg, api_key="<set>" if cfg.api_key else ""))
    cfg = dataclasses.replace(cfg, api_key=api_key(cfg))
    path = cfg.model or default_model()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--model {path}: not a checkpoint folder (no config.json)")
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"== loading {path} on {dev} ==", flush=True)
    model, tok = load_checkpoint(path, dev, bf16=cfg.bf16)
    engine = Engine(model, tok, cfg, instruction=instruction_for(path, cfg.instruction_file),
                    name=cfg.name or os.path.basename(os.path.abspath(path)))
    if cfg.compile_step and model.output_weight.is_cuda:
        model.attn_impl = "sdpa"                  # traceable attention (the Triton kernels are not)
        engine.sampler.compile_step = True
    server = make_server(engine, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"== serving {engine.name} on http://{host}:{port}/ (page) and http://{host}:{port}/v1 (API"
          f"{', with the API key' if cfg.api_key else ''}); Ctrl-C stops ==", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main(parse_cli(Config))
