"""
serve.py's guard: what a request must be before the engine sees it, and an answer with a status line
and a JSON body for every request that is not. serve.Handler is a GuardedHandler that adds the API's
paths, the loopback/key check and the chat completions; check_request checks a completion's fields.
The API it guards: SERVE.md. Standard library only.

- Every request gets an answer: the standard library's own refusals (bad request line, unknown
  method, huge headers) as JSON too; HTTP/0.9 (whose answers have no status line) and HTTP/2 a 505;
  anything unexpected a 500 with its traceback in the log; a client that left costs one log line.
- Paths and methods: 404 for an unknown path, 405 with Allow for a known one; HEAD; OPTIONS a 204
  without CORS headers (other origins' pages stay refused); 501 for an unknown method.
- The body: Content-Length required (411: chunked bodies are not supported), one value (differing
  ones are a 400, RFC 9112 6.3), ASCII digits, at most max_body_bytes (413); a body that stops
  arriving is a 408 after the socket timeout, one cut short a 400. A refusal reads (a bounded amount
  of) the body first: closing with unread data resets the connection, and the client would see the
  reset instead of the answer.
- POSTs must be Content-Type application/json (415): a cross-origin page may POST text/plain without
  asking, application/json needs a CORS preflight, which is never granted. Bad UTF-8, JSON nested too
  deeply, integers over 4300 digits: 400s. Each field of a chat request: a 400 naming it.
- Gone clients: a non-streaming client's socket is looked at every second (a closed one reads
  end-of-file); a stream writes an SSE comment when idle, which fails once its client has left.
- The listen backlog is sized for bursts (at least 1024), so a burst beyond what the server holds
  gets its 503s, not connection resets.
"""
import ipaddress
import json
import select
import socket
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty
from urllib.parse import urlsplit


class ApiError(Exception):
    """A refusal: answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host, port):
    """A Host header that names loopback with this port (as a browser sends it)."""
    try:
        u = urlsplit("//" + host)
        return is_loopback(u.hostname or "") and (u.port or 80) == port
    except ValueError:                                     # a port that is not a number
        return False


# -----------------------------------------------------------------------------
# A chat request's fields: every problem is a 400 naming the field

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
    """The request body (a dict) -> the validated fields (limits from serve.Config); raises ApiError."""
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
    out = dict(
        messages=msgs, mode=mode, thinking=flag(kwargs, "enable_thinking", False),
        instruction=flag(req, "npr_instruction", mode == "parallel"),
        stream=flag(req, "stream", False),
        temperature=float(number(req, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(number(req, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        n=number(req, "n", 1, 1, cfg.max_n, integer=True),
        max_tokens=number(req, name, None, 1, cfg.max_tokens_limit, integer=True),    # None: the server decides
        seed=number(req, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True))
    if out["instruction"] and not any(m["role"] == "user" for m in msgs):
        raise ApiError(400, "npr_instruction needs a user message to wrap (or send npr_instruction: false)", "messages")
    return out


def check_budget(P, max_tokens, context, cfg):
    """A rendered prompt of P tokens and the request's max_tokens (None: not given) against the server's
    limit and the model's context (max_position_embeddings; None: no check) -> the budget."""
    ctx = context or float("inf")
    if P > cfg.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {P} tokens, more than the server's limit "
                            f"{cfg.max_prompt_tokens}", "messages")
    # positions run along the critical path (<= max_tokens): the prompt + max_tokens must fit the
    # model's context (max_position_embeddings); beyond it RoPE positions are untrained: garbage
    if P >= ctx:
        raise ApiError(400, f"the prompt has {P} tokens, the model's context is {ctx} "
                            f"(max_position_embeddings): no room for an answer", "messages")
    if max_tokens is None:
        return min(cfg.default_max_tokens, ctx - P)       # no max_tokens given: fit what is left
    if P + max_tokens > ctx:
        raise ApiError(400, f"the prompt has {P} tokens and max_tokens is {max_tokens}: {P + max_tokens} positions, "
                            f"more than the model's context {ctx} (max_position_embeddings)", "max_tokens")
    return max_tokens


# -----------------------------------------------------------------------------
# HTTP: one thread per connection, HTTP/1.0 (a response ends with its connection)

class GuardedServer(ThreadingHTTPServer):
    def __init__(self, address, handler, max_body_bytes, holds):
        self.max_body_bytes = max_body_bytes
        # the listen backlog holds connections not yet accepted: a burst beyond it is reset, and a burst
        # far beyond what the server holds (`holds`: waiting + running) must still get its 503s, so it is
        # sized for bursts, not for the queue (the kernel caps it at net.core.somaxconn, 4096 by default)
        self.request_queue_size = max(1024, holds)
        super().__init__(address, handler)


class GuardedHandler(BaseHTTPRequestHandler):
    """A subclass names its paths and writes do_GET and do_POST (read_json, then its own work);
    a refusal is `raise ApiError` in do_POST, or `self.refuse(ApiError)` anywhere."""
    timeout = 60                     # socket timeout: a client that stops sending or reading is dropped
    # what a request line is taken as until its version is read: the standard library's HTTP/0.9
    # answers a refused version (HTTP/2.0, HTTP/1.x) with a body and no status line
    default_request_version = "HTTP/1.0"
    GET_PATHS, POST_PATHS = (), ()

    def handle_one_request(self):
        """Every request gets an answer: a client that left is one log line, anything unexpected a
        500 with a JSON body and its traceback in the log; the connection's thread never dies silently."""
        self.replied, self.body_gone = False, False      # body_gone: nothing of the body left to read
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

    def send_body(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj, headers=()):
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

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
        """The standard library's parsing, and HTTP/0.9 refused: a False return sends nothing more."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":           # its answers have no status line: not spoken here
            self.request_version = "HTTP/1.0"
            self.send_error(505, "HTTP/0.9 is not supported: use HTTP/1.0 or HTTP/1.1")
            return False
        return True

    def do_HEAD(self):
        self.do_GET()                                      # send_body leaves the body out

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
        conflicting Content-Lengths the smallest is read; a body read or timed out is not read again."""
        sizes = [int(v) for v in self.headers.get_all("Content-Length") or [] if v.isascii() and v.isdigit()]
        left = 0 if self.body_gone or not sizes else min(sizes + [16 * self.server.max_body_bytes])
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
        size, limit = int(size), self.server.max_body_bytes
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
        self.body_gone = True
        return body

    def read_json(self):
        """A POST's body -> the JSON value it holds; raises ApiError (411, 400, 413, 408, 415)."""
        if self.path_only not in self.POST_PATHS:
            raise self.wrong_path()
        body = self.read_body()
        # a cross-origin page may POST text/plain without asking first; application/json needs a
        # CORS preflight, which this server never grants
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {self.headers.get('Content-Type')!r}")
        try:
            return json.loads(body)
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
        except ValueError as e:          # also bad UTF-8, and integers over 4300 digits
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    def start_events(self):
        """The head of a server-sent event stream (its end is the connection's: HTTP/1.0)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def send_event(self, obj):
        """One `data:` event: obj as JSON (a str as it is, e.g. "[DONE]"); an OSError once the client left."""
        self.wfile.write(b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n")
        self.wfile.flush()

    def client_gone(self):
        """An HTTP/1.0 client sends nothing after its request: a readable socket that peeks
        end-of-file (or fails) has been closed."""
        try:
            return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def next_event(self, events, keepalive_s=None):
        """The next item of the queue `events`; None once the client is gone. Without keepalive_s (a
        plain answer) the socket is looked at every second; with it (a stream) an SSE comment is
        written when idle that long, which fails (OSError) once the client has left."""
        while True:
            try:
                return events.get(timeout=keepalive_s or 1.0)
            except Empty:
                if keepalive_s:
                    self.wfile.write(b": waiting\n\n")          # an SSE comment: clients skip it
                    self.wfile.flush()
                elif self.client_gone():
                    return None
