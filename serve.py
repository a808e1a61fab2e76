"""
An OpenAI-compatible HTTP server for NPR checkpoints, and a live page (serve.html) that draws the
branches of a parallel answer as they decode side by side.

    python serve.py                            # the built-in default: newest of out/grpo, out/sft, out/base
    python serve.py --model DIR --port 8000    # any checkpoint folder (HF layout)
    NPR_API_KEY=KEY python serve.py --host 0.0.0.0   # other machines: clients send Authorization: Bearer KEY
    # page: http://127.0.0.1:8000/   (serve.html, self-contained, works offline)
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Compute 23*4 + 17*6."}]}'

Here: the engine (one worker thread steps the sampler; its queue is the server's only queue), the
two views of each choice (the live pieces of every branch as they decode, and the same text in the
canonical order a stock client joins into message.content: ChoiceStream), and one POST handler,
plain or server-sent events, behind the loopback/key check. The API (fields, streaming, errors):
SERVE.md. The HTTP guard (framing, limits, refusals, gone clients): http_guard.py.
"""
import dataclasses
import os
import secrets
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from queue import Queue

import torch

import npr
from checkpoint import load_checkpoint
from runs import parse_cli, print_config
from http_guard import ApiError, GuardedHandler, GuardedServer, check_budget, check_request, is_loopback, is_loopback_host
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
    max_queue: int = 64              # requests waiting for a row (in the sampler's queue); one more gets 503
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


# -----------------------------------------------------------------------------
# The engine: one worker thread stepping the sampler (continuous batching), two views of each choice

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
        self.id, self.created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        # ("delta", i, content, npr pieces) | ("finish", i, why) | ("done", samples) | ("error", msg)
        self.events = Queue()
        self.choices = []                        # streaming: a ChoiceStream per choice
        self.seqs = []                           # its rows in the sampler (request.Seq), one per choice
        self.sent = []                           # streaming: per choice, the tokens reported per segment
        self.cancelled = False                   # set by the HTTP thread when its client is gone


class Engine:
    """Requests in, per-request events out, one worker thread driving the sampler step by step. One queue,
    the sampler's: submit() adds a request's rows to it (Sampler.add); each step admits the oldest waiting
    rows into free KV-cache rows (Sampler.schedule: continuous batching). At most --max-queue requests
    wait (one more: 503); a gone client's rows are cancelled (Sampler.cancel) before the next step.
    `steer` goes to the sampler (tests force an NPR structure on a random model with it)."""

    def __init__(self, model, tok, cfg=None, instruction=None, name="npr", steer=None):
        self.cfg = cfg or Config()
        self.tok, self.sampler, self.name = tok, Sampler(model, tok), name
        self.instruction = instruction           # None = npr.INSTRUCTION
        self.context = model.config.raw.get("max_position_embeddings")   # RoPE positions the model was trained for
        self.sampler.steer, self.sampler.max_rows = steer, self.cfg.max_batch_rows
        # rows sized once for the largest request the limits let in: an arriving one never waits for a new cache
        largest = min(self.context or float("inf"), self.cfg.max_prompt_tokens + self.cfg.max_tokens_limit)
        self.sampler.min_capacity = largest + 16 * (self.cfg.max_branches + 2) + 1
        self.jobs = []                           # requests not done: their rows wait or run in the sampler
        # on the sampler's queue lock: HTTP threads add while the worker steps (it holds it between steps, never in one)
        self.cond = threading.Condition(self.sampler.lock)
        self.totals = dict(requests=0, rows=0, steps=0, cancelled_rows=0, errors=0)
        self.closed = False
        self.worker = threading.Thread(target=self.loop, name="npr-engine", daemon=True)
        self.worker.start()

    @property
    def counts(self):
        """The totals, and read live (the worker may be inside a long step): the requests with a row still in
        the sampler's queue (waiting), and the rows that hold a KV-cache row (running_rows)."""
        with self.cond:
            rows = [job.seqs for job in self.jobs]
            return dict(self.totals, waiting=sum(any(s.row is None and not s.finish for s in r) for r in rows),
                        running_rows=sum(s.row is not None for r in rows for s in r))

    def make_job(self, req):
        """Validated request fields -> a Job (rendered prompt, SamplingParams, seed)."""
        msgs = list(req["messages"])
        if req["instruction"]:                   # the last user message (check_request: there is one)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[last] = {"role": "user", "content": npr.build_prompt(msgs[last]["content"], self.instruction)}
        try:     # the mode is explicit: the checkpoint's own template may default to thinking
            prompt = self.tok.encode(self.tok.render_chat(msgs, enable_thinking=req["thinking"]))
        except ValueError as e:
            raise ApiError(400, f"messages cannot be rendered with this model's chat template: {e}", "messages")
        budget = check_budget(len(prompt), req["max_tokens"], self.context, self.cfg)
        params = SamplingParams(mode=req["mode"], temperature=req["temperature"], top_p=req["top_p"],
                                max_new_tokens=budget, max_branches=self.cfg.max_branches,
                                fork_min_tokens=self.cfg.fork_min_tokens)
        seed = req["seed"] if req["seed"] is not None else secrets.randbits(31)
        job = Job(prompt, req["n"], params, seed, req["stream"])
        job.choices = [ChoiceStream(self.tok) for _ in range(job.n)] if job.stream else []
        return job

    def submit(self, job):
        with self.cond:
            if (waiting := self.counts["waiting"]) >= self.cfg.max_queue:
                raise ApiError(503, f"the server is busy: {waiting} requests are waiting; retry later",
                               kind="server_overloaded")
            # a request's rows queue one after another, oldest request first; each row samples from its own
            # seed, so an answer does not depend on which of its rows start at which step
            job.seqs = [self.sampler.add(job.prompt, job.params, job.seed * 1000003 + i, i) for i in range(job.n)]
            job.sent = [[] for _ in range(job.n)]
            self.jobs.append(job)
            self.totals["requests"] += 1
            self.totals["rows"] += job.n
            self.cond.notify()

    def loop(self):
        s = self.sampler
        while True:
            with self.cond:
                while not (self.jobs or self.closed):
                    self.cond.wait()
                if self.closed:
                    return
                for job in self.jobs:
                    if job.cancelled:                # its client is gone: its rows end at this step
                        for seq in job.seqs:
                            s.cancel(seq)
            try:
                ended = s.step()                     # admit waiting rows, decode one token per live stream
            except Exception as e:                   # one bad step must not stop the server
                traceback.print_exc()
                with self.cond:
                    self.totals["errors"] += 1
                    for job in self.jobs:
                        job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                    self.jobs, s.running, s.gone = [], [], []
                    s.waiting.clear()
                    s.release()
                continue
            with self.cond:
                self.totals["steps"] += 1
                self.totals["cancelled_rows"] += sum(seq.finish == "cancelled" for seq in ended)
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
        return dict(status="ok", model=self.name, **self.counts)


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
# HTTP: the API on http_guard's handler (one thread per connection, HTTP/1.0)

class Handler(GuardedHandler):
    server_version = "npr-serve/1"
    GET_PATHS = ("/", "/health", "/v1/models")
    POST_PATHS = ("/v1/chat/completions",)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def parse_request(self):
        """The guard's parsing, then who may ask: a False return sends nothing more."""
        if not super().parse_request():
            return False
        host, key = self.headers.get("Host"), self.engine.cfg.api_key
        # DNS rebinding: a web page can point a name of its own at 127.0.0.1 and read the answers as
        # same-origin; a browser always sends that name as Host, so on loopback only loopback names pass
        if self.server.loopback and host is not None and not is_loopback_host(host, self.server.server_address[1]):
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

    def do_GET(self):
        path = self.path_only
        if path == "/":
            with open(PAGE, "rb") as f:
                self.send_body(200, f.read(), "text/html; charset=utf-8")
        elif path == "/health":
            self.send_json(200, self.engine.health())
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.engine.name, "object": "model", "created": 0, "owned_by": "npr"}]})
        else:
            self.send_error_json(self.wrong_path())

    def do_POST(self):
        try:
            job = self.engine.make_job(check_request(self.read_json(), self.engine.cfg))
            self.engine.submit(job)
        except ApiError as e:
            return self.refuse(e)                 # reads what is left of the body first
        if job.stream:
            self.stream(job)
        else:
            self.complete(job)

    def complete(self, job):
        while (ev := self.next_event(job.events)) is not None and ev[0] not in ("done", "error"):
            pass                                  # a non-streaming job only waits for these
        if ev is None:
            job.cancelled = True                  # the worker cancels its rows at the next step
            return self.log_message("client gone before its answer: its rows are cancelled")
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
        send = self.send_event

        def chunk(i, delta, finish=None, **extra):
            send({**head, "choices": [dict(index=i, delta=delta, finish_reason=finish, **extra)]})

        try:
            self.start_events()
            for i in range(job.n):
                chunk(i, {"role": "assistant", "content": ""})
            while True:
                ev = self.next_event(job.events, self.engine.cfg.keepalive_s)
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
            send("[DONE]")
        except OSError as e:                               # BrokenPipe, ConnectionReset, timeout
            job.cancelled = True                           # the worker cancels its rows at the next step
            self.close_connection = True
            self.log_message("client gone mid-stream (%s): its rows are cancelled", type(e).__name__)


def make_server(engine, host="127.0.0.1", port=8000):
    cfg = engine.cfg
    server = GuardedServer((host, port), Handler, cfg.max_body_bytes, holds=cfg.max_queue + cfg.max_batch_rows)
    server.engine, server.loopback = engine, is_loopback(host)
    return server


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
    engine = Engine(model, tok, cfg, instruction=npr.instruction_for(path, cfg.instruction_file),
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
