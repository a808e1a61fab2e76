"""
The sampling engine: many requests decoded together with continuous batching. What each drawn
token means (NPR's fork/join rules, the streams of a request) is request.py's.

Sampler.step() is the engine, in three parts (as nano-vllm's step):
  schedule     admit waiting requests into free cache rows with room for their worst case (a running
               request never grows, copies or is preempted; a smaller request may pass a bigger one
               that waits for a bigger cache, for a while); prefill their prompts
  run          build_grid: the next token of every live stream of every running request; one forward
               over that (R, W) grid, eager or decode_graph.StaticStep (CUDA graphs); the draws
  postprocess  each drawn token goes to its request (Seq.on_token: tags, fork, join, end); generate_many() loops
A request owns one cache row; branch tokens go into it interleaved, masked by per-slot metadata
(parallel_attention.py). Output (request.Sample) is in the trainer's layout, with the model's
log-prob of every token.

The engine's words, one meaning each (NPR's words are the method's: a plan is a `<plan>`; here a
branch is what decodes a `<step>`, and a step is one engine step):
  request   a request.Seq: one prompt decoded into one Sample (generate's n makes n requests)
  stream    a request.Stream: the trunk between forks, or one branch, each with its own generator
  feed      a stream's tokens not yet written into the cache (Seq.to_feed: the ones of this step)
  drawing   the (request, stream) pairs that draw a token this step (what a steer sees)
  draw      choosing a token from logits with one uniform: draw_tokens (Sampler.draw, StaticStep.draw)
  sample    a finished response (request.Sample), never the act of drawing
  row       a request's line of the step's grid and of the cache (a running request owns one)
  slot      an index into a cache row (a token's: Layout.slots(), a tensor)
  capacity  the slots of every cache row (KVCache.capacity, a count); size_cache makes the cache
  room      the capacity a request's worst case needs (Seq.room(), a count)
"""
import math
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decode_graph import StaticStep, free_gpu_bytes, in_step_settings
from model import Qwen
from parallel_attention import Layout
from request import GREEDY_BELOW, SamplingParams, Seq, resolved
from tokenizer import Tokenizer


class KVCache:
    """A static per-layer K/V cache of `capacity` slots per row, plus the branch metadata of every slot.
    Slots and RoPE positions are separate: the caller says which slot each new token goes to
    (layout.slot); empty slots have doc = -1; the last slot is the scratch slot padding writes to."""

    def __init__(self, cfg, rows, capacity, device="cpu", dtype=None):
        dtype = dtype or cfg.dtype
        shape = (rows, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        meta = lambda fill: torch.full((rows, capacity), fill, dtype=torch.int32, device=device)
        self.doc, self.block, self.branch = meta(-1), meta(0), meta(0)
        self.capacity = capacity
        self.limit = capacity  # attend over slots [0, limit): the caller shrinks it to the filled length
        self.rows = None       # the cache rows a forward's batch rows are (a prefill's); None = all, in order

    def clear(self, row):
        """Empty one row for its next request (stale k/v are finite and masked: only the metadata resets)."""
        self.doc[row], self.block[row], self.branch[row] = -1, 0, 0

    # index_put_, not scatter_: under torch.compile Inductor keeps index_put an in-place write, while
    # scatter becomes a copy of the whole cache per layer plus a copy back.
    def write_layout(self, layout):
        """Record the new tokens' metadata at their slots; make the k/v write index and the keys' Layout
        (once per forward: one Layout object for all layers, their masks are memoised on it)."""
        s = layout.slots().long()
        rows = (self.rows if self.rows is not None else torch.arange(s.shape[0], device=s.device))[:, None]
        self.doc.index_put_((rows, s), layout.doc)
        self.block.index_put_((rows, s), layout.block)
        self.branch.index_put_((rows, s), layout.branch)
        heads = torch.arange(self.k[0].shape[1], device=s.device)
        self.index = (rows[:, :, None], heads[None, :, None], s[:, None, :])   # (B, Hkv, T) -> the D values
        self.k_layout = Layout(self.view(self.doc), self.view(self.block), self.view(self.branch))

    def update(self, layer_idx, k, v):
        """Write k/v (B, Hkv, T, D) at the slots given to write_layout -> the cache views (B, Hkv, limit, D)."""
        self.k[layer_idx].index_put_(self.index, k.to(self.k[layer_idx].dtype))
        self.v[layer_idx].index_put_(self.index, v.to(self.v[layer_idx].dtype))
        return self.view(self.k[layer_idx]), self.view(self.v[layer_idx])

    def view(self, t):
        """What a forward attends of a cache tensor: slots [0, limit) of its rows (a prefill's rows only)."""
        t = t[:, :, :self.limit] if t.dim() == 4 else t[:, :self.limit]
        return t if self.rows is None else t.index_select(0, self.rows)


class Sampler:
    def __init__(self, model: Qwen, tokenizer: Tokenizer):
        self.model, self.tok = model, tokenizer
        self.stop_ids = set(tokenizer.stop_ids)   # a drawn id in here ends its request
        # "auto" = CUDA graphs on a GPU (not under autocast), else "eager"; "static" = the graphs' shapes, eagerly
        self.step_mode = "auto"
        self.compile_step = False   # fast path through torch.compile too (decode_graph.py; attn_impl "sdpa")
        self.fuse_step = None       # fast path with fused q/k/v and gate/up GEMMs (None = with CUDA graphs only)
        self.cache_gb = 0.0         # KV-cache memory budget (0 = half the free GPU memory / 4 GB on CPU)
        self.max_rows = 256         # rows decoded together, at most (fewer when the budget says so)
        self.min_capacity = 0       # slots per row at least (a server: its largest request)
        self.admit_every = 1        # admit at every Nth step only (a prefill is an eager, launch-bound forward)
        # steps a request too big for the cache lets smaller ones pass it before admission stops until it fits
        # (None = the cache's capacity: no running request needs more steps, so its wait at most doubles)
        self.overtake_steps = None
        self.steer = None           # steer(drawing, logits) -> logits: edits what tokens are drawn from (tests)
        self.cache = self.fast = None   # the KV cache and the StaticStep on it, kept for the next call
        self.waiting, self.running, self.free, self.gone = deque(), [], [], []   # gone: cancelled while waiting
        self.lock = threading.RLock()   # guards `waiting`: add() may come from other threads while step() runs (serve.py)
        self.counters = dict(steps=0, row_steps=0, busy_row_steps=0)   # slot utilization = busy / row steps

    def release(self):
        """Free the kept KV cache and graphs (e.g. before a training step)."""
        assert not self.running, "release() while requests are running"
        self.cache = self.fast = None
        self.free = []

    # ---- the engine ----------------------------------------------------------------------------
    def add(self, prompt, params, seed=0, index=0):
        """Queue a request (prompt token ids) -> its Seq; it is admitted at the next step with a free row."""
        seq = Seq(prompt, params, seed, index, self.tok)
        with self.lock:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq):
        """End a request at the next step (its row is freed then)."""
        seq.end("cancelled")
        with self.lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
                self.gone.append(seq)

    @torch.no_grad()
    def step(self):
        """One engine step. -> the requests that ended in it."""
        done = self.schedule()                                    # admit and prefill: first tokens drawn
        if any(not seq.finish for seq in self.running):
            grid, drawing, cells, limit = self.build_grid()       # the next token of every live stream
            toks, lps = self.run(grid, drawing, cells, limit)     # one forward, the draws
            self.postprocess(drawing, toks, lps)                  # tags: fork, join, finish
        done += [seq for seq in self.running if seq.finish]
        for seq in done:
            if seq.row is not None:
                self.free.append(seq.row)
                seq.row = None
        self.running = [seq for seq in self.running if not seq.finish]
        return done

    def schedule(self):
        """Admit waiting requests, oldest first, into free rows; prefill them. -> those cancelled while waiting.
        An idle engine first sizes the cache for the largest waiting request. One that needs more room than
        the cache has waits for the running requests to drain (they keep their rows) and lets smaller ones
        behind it pass for overtake_steps steps; then nothing is admitted until the cache is sized for it."""
        gone, self.gone = self.gone, []
        with self.lock:
            room = max((seq.room() for seq in self.waiting), default=0) if not self.running else 0
        if room:
            self.size_cache(room)
        if not self.waiting or self.running and self.counters["steps"] % self.admit_every:
            return gone
        new, now, i = [], self.counters["steps"], 0
        overtake = self.cache.capacity if self.overtake_steps is None else self.overtake_steps
        with self.lock:
            while self.free and i < len(self.waiting):
                seq = self.waiting[i]
                if seq.room() > self.cache.capacity:            # it waits for a bigger cache
                    seq.too_big_since = now if seq.too_big_since is None else seq.too_big_since
                    if now - seq.too_big_since >= overtake:     # passed long enough: the rows drain for it
                        break
                    i += 1
                    continue
                del self.waiting[i]
                seq.row, seq.t_start = self.free.pop(0), time.perf_counter()
                self.cache.clear(seq.row)
                new.append(seq)
        if new:
            self.prefill(new)
            self.running += new
        return gone

    def size_cache(self, room):
        """(Re)make the KV cache and its fast path while no request runs: rows of capacity >= room slots
        (rounded up to 256: similar calls share cache and graphs), as many as the budget holds, up to max_rows."""
        capacity, w, cfg = -(-max(room, self.min_capacity) // 256) * 256, self.model.output_weight, self.model.config
        autocast = torch.is_autocast_enabled(w.device.type)       # k/v then come out in the autocast dtype
        dtype = torch.get_autocast_dtype(w.device.type) if autocast else w.dtype
        mode = self.step_mode if self.step_mode != "auto" else "graph" if w.is_cuda and not autocast else "eager"
        if mode not in ("eager", "static", "graph"):
            raise ValueError(f"step_mode must be auto, eager, static or graph, not {self.step_mode!r}")
        per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * capacity * dtype.itemsize
        budget = (self.cache_gb * 2 ** 30 if self.cache_gb else       # else half the GPU's free memory, or 4 GB
                  0.5 * free_gpu_bytes(w.device, self.cache) if w.is_cuda else 4 * 2 ** 30)
        if budget < per_row:
            raise ValueError(f"one KV-cache row of {capacity} slots needs {per_row / 2 ** 30:.3f} GB, more than "
                             f"the budget of {budget / 2 ** 30:.3f} GB (Sampler.cache_gb)")
        R = min(self.max_rows, int(budget // per_row))
        fuse = mode == "graph" if self.fuse_step is None else self.fuse_step
        key = (R, dtype, w.device, mode, self.compile_step, fuse)
        if self.cache is None or self.cache.key != key or self.cache.capacity < capacity:
            self.cache = self.fast = None                          # free the old one before allocating
            self.cache = KVCache(cfg, R, capacity, device=w.device, dtype=dtype)
            self.cache.key = key
            if mode != "eager":
                self.fast = StaticStep(self.model, self.cache, mode == "graph", self.compile_step, draw_tokens,
                                       fuse, logprob_of)
        elif self.fast is not None:
            self.fast.reset()        # fused weights refreshed after an update
        self.free = list(range(R))

    def prefill(self, seqs):
        """Newly admitted prompts, right-padded, in one forward into their cache rows; draw their first tokens."""
        dev, L, B = self.model.output_weight.device, max(len(s.prompt) for s in seqs), len(seqs)
        # padding: doc -1, invisible, in slots written later
        ids = torch.tensor([seq.prompt + [0] * (L - len(seq.prompt)) for seq in seqs])
        doc = torch.tensor([[0] * len(seq.prompt) + [-1] * (L - len(seq.prompt)) for seq in seqs], dtype=torch.int32)
        z = torch.zeros(B, L, dtype=torch.int32)
        slot = torch.arange(L, dtype=torch.int32).expand(B, L)
        self.cache.limit, self.cache.rows = L, torch.tensor([seq.row for seq in seqs], device=dev)
        try:
            h = self.model.hidden_states(ids.to(dev), slot.long().to(dev), Layout(doc, z, z, slot).to(dev), self.cache)
        finally:
            self.cache.rows = None
        last = torch.tensor([len(seq.prompt) - 1 for seq in seqs], device=dev)
        drawing = [(seq, seq.trunk) for seq in seqs]
        self.postprocess(drawing, *self.draw(drawing, F.linear(h[torch.arange(B, device=dev), last],
                                                               self.model.output_weight)))

    def build_grid(self):
        """The step's (R, W, 6) grid (columns: id, pos, doc, block, branch, slot): the next token of every live
        stream of every running request at its row's next slots; free rows and short rows padded. -> grid,
        drawing (the (request, stream) pairs whose logits draw a token), their (row, column) cells, the slots filled."""
        items = [(seq, seq.to_feed()) for seq in self.running if not seq.finish]
        W = max((len(x) for _, x in items), default=1)
        Wg = self.fast.width(W) if self.fast is not None else None     # static width of the fast path
        W, S = Wg or W, self.cache.capacity
        pad = (0, 0, -1, 0, 0, S - 1)                        # padding: invisible, written to the scratch slot
        grid = [[pad] * W for _ in range(self.cache.doc.shape[0])]
        drawing, cells = [], []
        for seq, feed in items:
            for j, (t, st) in enumerate(feed):
                grid[seq.row][j] = (t.id, t.pos, 0, t.block, t.branch, seq.next_slot)
                seq.next_slot += 1
                st.feed.pop(0)
                if not st.feed and not st.closed:            # its logits give the stream's next token
                    drawing.append((seq, st))
                    cells.append((seq.row, j))
            seq.live = [st for st in seq.live if st.feed or not st.closed]
        self.counters["steps"] += 1
        self.counters["row_steps"] += len(grid)
        self.counters["busy_row_steps"] += len(items)
        limit = max(seq.next_slot for seq in self.running)
        assert limit < S, "KV cache overflow: the worst-case room is wrong"
        return torch.tensor(grid, dtype=torch.long), drawing, cells, limit

    def run(self, grid, drawing, cells, limit):
        """One forward over the grid (eager, static or CUDA graph), then the draws -> (tokens, log-probs)."""
        dev, fast = self.model.output_weight.device, self.fast
        settings = in_step_settings([seq.p for seq in self.running if not seq.finish], self.steer)
        if fast is not None and settings is not None and fast.can_draw(grid.shape[1]):   # the step draws the tokens
            return fast.draw(grid, limit, drawing, cells, settings)
        if fast is not None:
            h = fast(grid, limit)                                        # (R, W, hidden)
        else:
            ids, pos, meta = (t.to(dev) for t in (grid[..., 0], grid[..., 1], grid[..., 2:].int()))
            self.cache.limit = limit
            h = self.model.hidden_states(ids, pos, Layout(*meta.unbind(-1)), self.cache)
        if not drawing:
            return [], []
        rr, jj = (torch.tensor(x, device=dev) for x in zip(*cells))       # logits only where a token is drawn
        return self.draw(drawing, F.linear(h[rr, jj], self.model.output_weight))

    # ---- the draw --------------------------------------------------------------------------------
    def draw(self, drawing, logits):
        """Draw one token for each (request, stream) pair of drawing from its logits (N, V), with the request's params.
        The log-prob recorded is the model's own (before steering and penalty), by logprob_of as in
        the decode step (closer to the trainer's logsumexp than torch's CPU log_softmax)."""
        logits = model_logits = logits.float()
        if self.steer is not None or any(seq.p.repetition_penalty != 1.0 for seq, _ in drawing):
            logits = logits.clone()                              # both edit the logits in place
        if self.steer is not None:
            logits = self.steer(drawing, logits)
        for i, (seq, st) in enumerate(drawing):
            rp = seq.p.repetition_penalty
            if rp != 1.0 and st.branch:  # the branch's visible response: trunk segments + its own tokens
                seen = {t.id for s in seq.streams if s.branch == 0 for t in s.tokens} | {t.id for t in st.tokens}
                idx = torch.tensor(sorted(seen), device=logits.device)
                v = logits[i, idx]
                logits[i, idx] = torch.where(v > 0, v / rp, v * rp)
        u = torch.cat([torch.rand(1, generator=st.gen) for _, st in drawing]).to(logits.device)
        groups = {}                                              # rows with the same sampling settings
        for i, (seq, _) in enumerate(drawing):
            groups.setdefault((seq.p.temperature, seq.p.top_p, seq.p.top_k), []).append(i)
        toks = torch.empty(len(drawing), dtype=torch.long, device=logits.device)
        for (temp, top_p, top_k), idx in groups.items():
            ii = torch.tensor(idx, device=logits.device)
            toks[ii] = draw_tokens(logits[ii], temp, top_p, top_k, u[ii])
        return toks.tolist(), logprob_of(model_logits, toks).tolist()

    def postprocess(self, drawing, toks, lps):
        """Hand each drawn token to its stream (a request that ended on an earlier token of this step takes no more)."""
        for (seq, st), t, lp in zip(drawing, toks, lps):
            if seq.finish is None:
                seq.on_token(st, t, lp, t in self.stop_ids)

    # ---- callers: a batch of requests in, samples out --------------------------------------------
    def generate(self, prompts, n=1, params=None, *, seeds=None, steer=None, progress=False, on_sample=None):
        """generate_many() over every request at once (as the KV-cache budget allows) -> its samples only."""
        return self.generate_many(prompts, n, params, seeds=seeds, steer=steer, progress=progress,
                                  on_sample=on_sample, batch_rows=0)[0]

    def generate_many(self, prompts, n=1, params=None, *, seeds=None, steer=None, progress=False, on_sample=None,
                      batch_rows=256):
        """prompts: token-id lists (chat already rendered) -> (one list of n Samples per prompt, wall seconds),
        decoded with continuous batching over at most batch_rows rows (0 = all requests at once, as the
        KV-cache budget allows). params: one SamplingParams, or one per prompt (requests with different
        settings share a batch). seeds: one per request (prompt-major); default params.seed * 1000003 +
        request index. steer(drawing, logits) -> logits: edits what a token is drawn from (tests force a
        structure with it); the log-probs stay the model's. on_sample(prompt index, sample index, Sample):
        as each ends."""
        if not prompts:
            raise ValueError("no prompts")
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        row_p = [resolved(p) for p in plist for _ in range(n)]   # checked before anything runs
        seeds = seeds if seeds is not None else [p.seed * 1000003 + i for i, p in enumerate(row_p)]
        if len(seeds) != len(row_p):
            raise ValueError(f"{len(seeds)} seeds for {len(row_p)} rows")
        assert not self.running and not self.waiting, "the engine is busy (serve.py drives it by step())"
        seqs = [Seq(prompts[i // n], p, sd, i, self.tok) for i, (p, sd) in enumerate(zip(row_p, seeds))]
        self.waiting.extend(seqs)
        kept_rows = self.max_rows                      # this call's row cap only
        self.max_rows, self.steer = min(batch_rows or len(seqs), len(seqs)), steer
        bar = tqdm(total=len(seqs), desc=f"sampling ({'/'.join(sorted({p.mode for p in row_p}))})", unit="sample",
                   disable=not progress)
        out, t0 = [None] * len(seqs), time.perf_counter()
        try:
            while self.waiting or self.running:
                for seq in self.step():
                    out[seq.index] = seq.to_sample()
                    if on_sample is not None:
                        on_sample(seq.index // n, seq.index % n, out[seq.index])
                    bar.update()
        finally:
            self.max_rows, self.steer = kept_rows, None
            bar.close()
            if self.waiting or self.running:           # interrupted: leave the engine empty
                self.waiting.clear()
                self.gone = []
                self.free += [seq.row for seq in self.running]
                self.running = []
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))], time.perf_counter() - t0


def draw_tokens(logits, temperature, top_p, top_k, u, argmax=None):
    """(N, V) float logits, (N,) uniforms in [0, 1) -> (N,) token ids, by inverse CDF (one uniform
    per row, so rows never share a random stream). temperature 0 (or below GREEDY_BELOW) = the first
    maximal index: logits.argmax(-1), or `argmax` (the GPU step's two-stage one, decode_graph.argmax_rows)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1) if argmax is None else argmax(logits)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p                    # keep the smallest set reaching top_p
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).cumsum(-1)                                 # (N, V)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return tok.clamp(max=logits.shape[-1] - 1)


def logprob_of(logits, tok):
    """log_softmax(logits)[tok] per row, by a two-stage logsumexp (over chunks of the row, then over the
    chunks): the decode step's head on a GPU computes it so too (one row over many blocks)."""
    N, V = logits.shape
    x = logits.view(N, math.gcd(V, 128), -1)                            # (N, C, V / C)
    mx = x.amax(-1).amax(-1)                                            # (N,)
    lse = mx + (x - mx[:, None, None]).exp().sum(-1).sum(-1).log()
    return logits.gather(1, tok[:, None]).squeeze(1) - lse
