"""
Our own batched KV-cache sampler, with the NPR fork/join engine (NPR.md section 5).

    python sampler.py --model DIR --prompt "Compute 23*4 + 17*6." --mode parallel -n 4

serial mode: ordinary decoding; the tags are just text.
parallel mode: when a row's trunk emits </guideline>, count its numbered plans (k); 0 or more than
  the cap ends the row as malformed; else fork k branches, each opened with the forced header
  "<step>\nN:" (npr.STEP_HEADER), all at the same RoPE position. Every live branch of every row is
  decoded in the same forward. A branch ends at </step> (plus one forced "\n" separator, npr.SEPARATOR,
  that belongs to it). When all branches of a row have ended they are joined: "<takeaway>\n"
  (npr.TAKEAWAY_HEADER) is forced in the trunk at 1 + the largest branch position, and decoding goes on.
  sft.py writes its trajectories with the same forced texts (npr.engine_pieces).

No KV copying: every row owns one cache row; branch tokens are appended to it interleaved (one
slot per token, in the order they are decoded) and the branch mask is applied from per-slot
metadata (parallel_attention.py). Several new tokens per row go through one forward: one per
live branch, or a whole forced header. Slots and RoPE positions are separate quantities. The cache
starts with room for max_new_tokens; under the critical-path budget it doubles (for every row: one
copy) when a row's branches outgrow it, up to the cap on all tokens.

Budget (SamplingParams.budget): "total" (default, the official engine's rule) ends a sample when all
tokens of all its branches reach max_new_tokens; "critical" when its critical path does (all tokens
then capped by max_total_tokens). Near the budget (less than fork_min_tokens left per branch) the
engine does not fork: the block's steps are written serially in the trunk, as the official engine does.

Output per sample, in the trainer's layout: response ids in canonical order (trunk, step 1 ..
step k, trunk ...), per-token block / branch / position, a sampled-vs-forced mask, the log-prob of
every token under the model's own distribution (temperature 1, no top-p: what a training forward
computes; forced tokens get 0), the finish reason and stats.
"""
import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import npr
from decode_graph import StaticStep
from model import Qwen
from parallel_attention import Layout
from tokenizer import Tokenizer


@dataclass
class SamplingParams:
    mode: str = "parallel"           # "serial" | "parallel"
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    max_new_tokens: int = 512        # the token budget, counted as `budget` says
    budget: str = "total"            # "total": all tokens of all branches (official engine; OpenAI's max_tokens)
                                     # "critical": the critical path (longest chain of dependent tokens)
    max_total_tokens: int = 0        # budget "critical": cap on all tokens (0 = max_branches x max_new_tokens)
    max_branches: int = 5            # more numbered plans than this ends the sample as malformed
    fork_min_tokens: int = 8         # near the budget (less than this left per branch) do not fork
    repetition_penalty: float = 1.0  # inside branches only (official engine: 1.02)
    cache_gb: float = 0.0            # generate_many: KV-cache memory per call (0 = half the free GPU memory / 4 GB on CPU)
    seed: int = 0


@dataclass
class Sample:
    prompt_ids: list
    ids: list = field(default_factory=list)       # response tokens, canonical order
    block: list = field(default_factory=list)     # per token, NPR.md section 3
    branch: list = field(default_factory=list)
    pos: list = field(default_factory=list)       # RoPE positions (the prompt holds 0..P-1)
    sampled: list = field(default_factory=list)   # True: drawn from the model; False: forced by the engine
    logprobs: list = field(default_factory=list)  # log p(token) under the model (0.0 for forced tokens)
    finish_reason: str = ""                       # "eos" | "budget" | "malformed: <why>"
    text: str = ""                                # the response text, without the final stop token
    stats: dict = field(default_factory=dict)

    def full_layout(self, doc=0):
        """ids, positions and Layout (1, P + T) of prompt + response: what the trainer feeds."""
        P = len(self.prompt_ids)
        ids = torch.tensor([self.prompt_ids + self.ids])
        pos = torch.tensor([list(range(P)) + self.pos])
        t = lambda xs: torch.tensor([[0] * P + xs], dtype=torch.int32)
        return ids, pos, Layout(doc=torch.full_like(t(self.block), doc), block=t(self.block), branch=t(self.branch))


class Stream:
    """One line of decoding: the trunk, or one branch of a fork."""

    def __init__(self, seg, block, branch, pos, gen):
        self.seg = seg         # the output segment this stream appends its token records to
        self.gen = gen         # its random draws: the row's trunk generator, or the branch's own
        self.block, self.branch = block, branch
        self.next_pos = pos    # RoPE position of the next token
        self.feed = []         # records waiting to be written into the KV cache (the next forward)
        self.text = ""         # decoded text so far (tag detection works on text, tags special or not)
        self.ids = []          # tokens this stream produced (repetition penalty)
        self.closed = False    # no more sampling (a branch after </step>, a suspended trunk)

    def push(self, tok, sampled, logp, piece):
        rec = [tok, sampled, logp, self.block, self.branch, self.next_pos]
        self.next_pos += 1
        self.seg.append(rec)
        self.feed.append(rec)
        self.ids.append(tok)
        start = len(self.text)
        self.text += piece
        return start


class Row:
    def __init__(self, prompt, index, seed, params):
        self.prompt, self.index, self.p = prompt, index, params
        self.seed = seed
        self.gen = row_generator(seed)  # the trunk's draws (each branch has its own): batch-independent
        self.trunk = Stream([], 0, 0, len(prompt), self.gen)
        self.segs = [self.trunk.seg]
        self.streams = [self.trunk]
        self.next_slot = len(prompt)
        self.finish = None
        self.total = self.crit = 0      # tokens so far: all of them / on the critical path
        self.blocks = 0                 # guideline blocks opened
        self.guide_start = None         # index in trunk.text where the open guideline starts
        self.unforked = False           # the open block's steps are written serially (budget)
        self.forks = []                 # branches per fork
        self.fork_streams = []          # the branches of the open fork
        self.t_end = None


class KVCache:
    """A static per-layer K/V cache of `capacity` slots per row, plus the branch metadata of every
    slot (a Layout over the slots). Slots and RoPE positions are separate quantities: the caller
    says which slot each new token goes to (layout.slot); empty slots have doc = -1."""

    def __init__(self, cfg, batch_size, capacity, device="cpu", dtype=None):
        dtype = dtype or cfg.dtype
        shape = (batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        meta = lambda fill: torch.full((batch_size, capacity), fill, dtype=torch.int32, device=device)
        self.doc, self.block, self.branch = meta(-1), meta(0), meta(0)
        self.capacity = capacity
        self.limit = capacity  # attend over slots [0, limit): the caller may shrink it to the filled length

    # Writes go through index_put_, not scatter_: under torch.compile (the GPU fast path) Inductor
    # turns index_put back into an in-place write, while scatter becomes a copy of the whole cache
    # per layer plus a copy back.
    def write_layout(self, layout):
        """Record the metadata of the new tokens at their slots and make the k/v write index (once per
        forward, before the layers)."""
        s = layout.slots().long()
        rows = torch.arange(s.shape[0], device=s.device)[:, None]
        self.doc.index_put_((rows, s), layout.doc)
        self.block.index_put_((rows, s), layout.block)
        self.branch.index_put_((rows, s), layout.branch)
        heads = torch.arange(self.k[0].shape[1], device=s.device)
        self.index = (rows[:, :, None], heads[None, :, None], s[:, None, :])   # (B, Hkv, T) -> the D values

    def update(self, layer_idx, k, v):
        """Write k/v (B, Hkv, T, D) at the slots given to write_layout; return the cache views
        (B, Hkv, limit, D)."""
        self.k[layer_idx].index_put_(self.index, k.to(self.k[layer_idx].dtype))
        self.v[layer_idx].index_put_(self.index, v.to(self.v[layer_idx].dtype))
        return self.k[layer_idx][:, :, :self.limit], self.v[layer_idx][:, :, :self.limit]

    def grow(self, capacity):
        """Enlarge every row to `capacity` slots, keeping what is written (a new allocation + a copy)."""
        n = self.capacity
        for kv in (self.k, self.v):
            for i, t in enumerate(kv):
                kv[i] = torch.zeros(*t.shape[:2], capacity, t.shape[3], dtype=t.dtype, device=t.device)
                kv[i][:, :, :n] = t
        for name, fill in (("doc", -1), ("block", 0), ("branch", 0)):
            t = getattr(self, name)
            new = torch.full((t.shape[0], capacity), fill, dtype=t.dtype, device=t.device)
            new[:, :n] = t
            setattr(self, name, new)
        self.capacity = capacity

    def layout(self):
        n = self.limit
        return Layout(self.doc[:, :n], self.block[:, :n], self.branch[:, :n])


class Sampler:
    def __init__(self, model: Qwen, tokenizer: Tokenizer):
        self.model, self.tok = model, tokenizer
        self.stop_ids = set(tokenizer.stop_ids)
        self.newline = tokenizer.encode(npr.SEPARATOR)
        # decode step: "auto" = CUDA graphs on a GPU (not under autocast), else "eager";
        # "static" = the graphs' padded shapes run eagerly (the CPU test of the fast path)
        self.step_mode = "auto"
        self.compile_step = False   # fast path through torch.compile too (decode_graph.py; attn_impl "sdpa")
        # fast path with q/k/v and gate/up fused into one GEMM each (a copy of those weights);
        # None = with CUDA graphs only, where a step costs per kernel
        self.fuse_step = None
        self.fast = None    # the StaticStep (with its KV cache and graphs) kept for the next call
        self.kept = None    # the eager step's KV cache, kept likewise
        # KV-cache slots per row allocated at first (0 = max_new_tokens, not the worst case of the
        # all-token cap); when a row gets there, every row's cache doubles (up to the worst case)
        self.initial_slots = 0

    def release(self):
        """Free the kept KV cache and graphs (e.g. before a training step)."""
        self.fast = self.kept = None

    def make_cache(self, R, cap, dev, dtype):
        """-> (KVCache, StaticStep or None). The cache (and the fast path's graphs) is kept for the next
        generate() with the same rows and no more capacity (generate_many's calls, benchmarks)."""
        mode = self.step_mode
        if mode == "auto":
            mode = "graph" if dev.type == "cuda" and not torch.is_autocast_enabled("cuda") else "eager"
        if mode not in ("eager", "static", "graph"):
            raise ValueError(f"step_mode must be auto, eager, static or graph, not {self.step_mode!r}")
        if mode == "eager":      # kept too: allocating it was ~7% of a 256-row call of the toy model on CPU
            c = self.kept
            if c is None or (c.doc.shape[0], c.k[0].dtype, c.k[0].device) != (R, dtype, dev) or c.capacity < cap:
                self.kept = c = None
                c = self.kept = KVCache(self.model.config, R, cap, device=dev, dtype=dtype)
            c.doc.fill_(-1)      # stale k/v in empty slots are finite and masked: only the metadata resets
            c.block.zero_()
            c.branch.zero_()
            return c, None
        self.kept = None
        f = self.fast
        fuse = mode == "graph" if self.fuse_step is None else self.fuse_step
        key = (R, dtype, mode == "graph", self.compile_step, fuse)
        if f is None or (f.R, f.cache.k[0].dtype, f.graphs, f.compiled, f.fused is not None) != key or f.S < cap:
            self.fast = f = None            # free the old cache before allocating the new one
            f = StaticStep(self.model, KVCache(self.model.config, R, cap, device=dev, dtype=dtype),
                           mode == "graph", self.compile_step, pick, fuse, logprob_of)
            self.fast = f
        f.reset()
        return f.cache, f

    def grow(self, cache, fast, cap):
        """More KV-cache slots for every row (the written ones copied); the fast path's graphs are
        captured again for the new cache (its addresses changed)."""
        cache.grow(cap)
        if fast is not None:
            fast = self.fast = StaticStep(self.model, cache, fast.graphs, fast.compiled, pick, fast.fused or False, logprob_of)
        return cache, fast

    # ---- the engine's decisions ------------------------------------------------------------
    def finish(self, row, reason):
        if row.finish is None:
            row.finish, row.t_end = reason, time.perf_counter()

    def fork(self, row, numbers):
        """Open one branch per numbered plan, all at the position after the trunk's last token."""
        p = row.p
        headers = [self.tok.encode(npr.STEP_HEADER.format(n=n)) for n in numbers]
        longest = max(len(h) for h in headers)
        need_total = sum(len(h) for h in headers) + len(numbers) * p.fork_min_tokens
        if row.total + need_total > p.max_total_tokens or row.crit + longest + p.fork_min_tokens > p.max_new_tokens:
            row.unforked = True                                     # too close to a budget: stay serial
            return
        if not row.trunk.text[-1:].isspace():   # the separator before the first step is the trunk's,
            for t in self.newline:              # as in training text ("</guideline>\n<step>")
                row.trunk.push(t, False, 0.0, self.tok.decode_piece(t))
        row.forks.append(len(numbers))
        row.trunk.closed = True                                     # suspended until the join
        row.fork_streams = []
        for i, header in enumerate(headers, 1):
            st = Stream([], row.blocks, i, row.trunk.next_pos, branch_generator(row.seed, row.blocks, i))
            for t in header:
                st.push(t, False, 0.0, self.tok.decode_piece(t))
            row.segs.append(st.seg)
            row.streams.append(st)
            row.fork_streams.append(st)
        self.count(row)

    def join(self, row):
        """All branches closed: the takeaway opens in the trunk at 1 + the largest branch position."""
        trunk = Stream([], row.blocks, 0, max(s.next_pos for s in row.fork_streams), row.gen)
        for t in self.tok.encode(npr.TAKEAWAY_HEADER):
            trunk.push(t, False, 0.0, self.tok.decode_piece(t))
        trunk.text = row.trunk.text + trunk.text                    # tag state continues from the old trunk
        row.trunk = trunk
        row.segs.append(trunk.seg)
        row.streams.append(trunk)                                   # after the branches' pending tokens
        self.count(row)

    def count(self, row):
        """Token totals: all tokens, and the critical path (each fork counts its longest branch)."""
        row.total = crit = longest = 0
        for seg in row.segs:
            row.total += len(seg)
            if seg and seg[0][4] > 0:           # a branch segment (field 4 = branch)
                longest = max(longest, len(seg))
            else:
                crit, longest = crit + longest + len(seg), 0
        row.crit = crit + longest

    def on_token(self, row, st, tok, logp):
        """Record a sampled token and apply the engine's rules to it."""
        p = row.p
        start = st.push(tok, True, logp, self.tok.decode_piece(tok))
        self.count(row)
        if tok in self.stop_ids:
            return self.finish(row, "malformed: eos inside a step" if st.branch else "eos")
        if p.mode == "parallel":
            for tag, at in npr.new_tags(st.text, start):
                if st.branch:
                    self.on_branch_tag(row, st, tag)
                else:
                    self.on_trunk_tag(row, st, tag, at)
                if row.finish or st.closed:
                    break
        if row.finish is None and (row.total >= p.max_total_tokens or row.crit >= p.max_new_tokens):
            self.finish(row, "budget")

    def on_trunk_tag(self, row, st, tag, at):
        if tag == "<guideline>":
            if row.guide_start is not None:
                return self.finish(row, "malformed: guideline nested in a guideline")
            row.blocks += 1
            st.block = row.blocks
            st.seg[-1][3] = row.blocks
            row.guide_start, row.unforked = at, False
        elif tag == "</guideline>":
            if row.guide_start is None:
                return self.finish(row, "malformed: </guideline> without <guideline>")
            numbers = npr.plan_numbers(st.text[row.guide_start:at])
            row.guide_start = None
            if not numbers:
                return self.finish(row, "malformed: guideline with 0 numbered plans")
            if len(numbers) > row.p.max_branches:
                return self.finish(row, f"malformed: {len(numbers)} plans > cap {row.p.max_branches}")
            self.fork(row, numbers)
        elif tag == "<step>" and not row.unforked:
            return self.finish(row, "malformed: <step> outside a fork")
        elif tag == "</takeaway>":
            st.block = 0

    def on_branch_tag(self, row, st, tag):
        if tag == "</step>":
            st.closed = True
            if not st.text[-1:].isspace():       # keep one trailing separator, owned by the branch
                for t in self.newline:
                    st.push(t, False, 0.0, self.tok.decode_piece(t))
            if all(s.closed for s in row.fork_streams):
                self.join(row)
        else:
            self.finish(row, f"malformed: {tag} inside a step")

    # ---- the decoding loop ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, n=1, params=None, steer=None, progress=False, seeds=None, on_step=None):
        """prompts: token-id lists (chat already rendered). Returns one list of n Samples per prompt.
        params: one SamplingParams for every prompt, or a list of one per prompt (each row then samples,
        budgets and forks by its own: requests with different settings share one batch).
        seeds: one per row (prompt-major, n rows per prompt); default params.seed * 1000003 + row.
        A row's trunk and each of its branches draw from their own torch.Generator, so a sample does
        not depend on its batch nor on the steps at which its branches are scheduled (with several
        rows live a fork's headers go in one token per step, so headers of different lengths, e.g.
        plans 9 and 10, start their branches at other steps than alone); only where a total budget
        cuts a fork short can the cut fall a token earlier or later.
        steer(requests, logits) -> logits, optional: edits the logits a token is drawn from (tests
        force a structure with it); recorded log-probs stay those of the model.
        on_step(events, finished) -> rows to cancel, optional (streaming): called after every decoding
        step with the tokens recorded since the last call, events = [(row, segment, records)] where
        segment counts the row's segments in canonical order (trunk, step 1 .. step k, trunk, ...) and
        each record is [id, sampled, logprob, block, branch, pos], and finished = [(row, reason)] for
        the rows that ended since; the rows it returns (indices) end with reason "cancelled"."""
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValueError("every prompt needs at least one token")
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        plist = [resolved(p) for p in plist]
        dev = self.model.output_weight.device
        flat = [x for x in prompts for _ in range(n)]
        row_p = [p for p in plist for _ in range(n)]
        seeds = seeds if seeds is not None else [p.seed * 1000003 + i for i, p in enumerate(row_p)]
        if len(seeds) != len(flat):
            raise ValueError(f"{len(seeds)} seeds for {len(flat)} rows")
        rows = [Row(list(x), i, sd, p) for i, (x, sd, p) in enumerate(zip(flat, seeds, row_p))]
        R, L = len(rows), max(len(x) for x in prompts)
        cap_max = capacity(L, plist)                             # the worst case: every budget spent
        cap = min(cap_max, capacity(L, plist, self.initial_slots or max(p.max_new_tokens for p in plist)))
        cache_dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                       else self.model.output_weight.dtype)        # under autocast k/v come out in bf16
        cache, fast = self.make_cache(R, cap, dev, cache_dtype)
        cap = cache.capacity                                     # a kept cache may be larger
        draw = in_step_draw(plist, steer)                        # the fast path may draw in its step
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm
            modes = sorted({p.mode for p in plist})
            bar = tqdm(total=R, desc=f"sampling ({'/'.join(modes)})", unit="sample")

        # prefill: prompts right-padded; padding is doc -1 (invisible) in slots overwritten later
        ids = torch.zeros(R, L, dtype=torch.long)
        doc = torch.full((R, L), -1, dtype=torch.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row.prompt)] = torch.tensor(row.prompt)
            doc[r, :len(row.prompt)] = 0
        z = torch.zeros(R, L, dtype=torch.int32)
        slot = torch.arange(L, dtype=torch.int32).expand(R, L)
        cache.limit = L
        h = self.model.hidden_states(ids.to(dev), slot.long().to(dev), Layout(doc, z, z, slot).to(dev), cache)
        last = torch.tensor([len(row.prompt) - 1 for row in rows], device=dev)
        logits = F.linear(h[torch.arange(R, device=dev), last], self.model.output_weight)   # (R, V): last tokens only
        self.sample_step([(row, row.trunk) for row in rows], logits, steer)
        emitted = [[] for _ in rows]                              # on_step: records reported per segment
        if on_step is not None:
            self.report(rows, emitted, on_step)

        done = 0
        while True:
            live = [row for row in rows if row.finish is None]
            if bar is not None:
                bar.update(R - len(live) - done)
            done = R - len(live)
            if not live:
                break
            # every pending token of every live row goes into one (R, W) forward; with several rows
            # live, one token per stream per step (a fork's forced headers would pad every row)
            one_each = len(live) > 1
            items = [self.to_feed(row, one_each) if row.finish is None else [] for row in rows]
            need = max(row.next_slot + len(x) for row, x in zip(rows, items)) + 1   # + the scratch slot
            if need > cap:
                cap = min(cap_max, max(2 * cap, -(-need // 256) * 256))
                cache, fast = self.grow(cache, fast, cap)
            W = max(len(x) for x in items)
            Wg = fast.width(W) if fast is not None else None          # static width of the fast path
            W = Wg or W
            pad = [0, 0, -1, 0, 0, cap - 1]                      # padding: invisible, written to the scratch slot
            grid = [[pad] * W for _ in range(R)]                 # per token: id, pos, doc, block, branch, slot
            requests, where = [], []
            for r, row in enumerate(rows):
                for j, (rec, st) in enumerate(items[r]):
                    grid[r][j] = [rec[0], rec[5], 0, rec[3], rec[4], row.next_slot]
                    row.next_slot += 1
                    if rec is st.feed[-1] and not st.closed:     # its logits give the stream's next token
                        requests.append((row, st))
                        where.append((r, j))
                for rec, st in items[r]:
                    st.feed.pop(0)
                row.streams = [st for st in row.streams if not st.closed or st.feed]
            g = torch.tensor(grid, dtype=torch.long)             # (R, W, 6)
            limit = max(row.next_slot for row in rows)
            assert limit < cap, "KV cache overflow: budget accounting is wrong"
            if Wg and draw is not None and fast.can_draw(W):       # the step draws the tokens itself
                u = None                                            # greedy needs no uniforms
                if draw[0] > 0:
                    u = [[0.0] * W for _ in range(R)]
                    for (row, st), (r, j) in zip(requests, where):
                        u[r][j] = torch.rand(1, generator=st.gen).item()
                    u = torch.tensor(u)
                toks, lps = fast(g, limit, u, draw).tolist()        # one copy back
                cells = [r * W + j for r, j in where]
                self.record(requests, [int(toks[c]) for c in cells], [lps[c] for c in cells])
                requests = []                                       # drawn: no logits pass below
            elif Wg:
                h = fast(g, limit)                                  # (R, W, hidden)
            else:
                ids, pos, meta = (t.to(dev) for t in (g[..., 0], g[..., 1], g[..., 2:].int()))
                cache.limit = limit
                layout = Layout(meta[..., 0], meta[..., 1], meta[..., 2], meta[..., 3])
                h = self.model.hidden_states(ids, pos, layout, cache)    # (R, W, hidden)
            if requests:                                                  # logits only where a token is drawn
                rr, jj = (torch.tensor(x, device=dev) for x in zip(*where))
                logits = F.linear(h[rr, jj], self.model.output_weight)
                self.sample_step(requests, logits, steer)
            if on_step is not None:
                self.report(rows, emitted, on_step)
        if on_step is not None:      # rows that on_step itself cancelled last are reported ended too
            self.report(rows, emitted, on_step)
        if bar is not None:
            bar.close()
        out = [self.to_sample(row, t0) for row in rows]
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def generate_many(self, prompts, n, params, batch_rows=256, progress=False, seeds=None):
        """generate() over many prompts, batch_rows rows (prompts x n) at a time; seeds: one per row
        (default params.seed * 1000003 + global row index, so batching changes nothing).
        -> (one list of n Samples per prompt, wall seconds spent generating)."""
        if seeds is None:
            seeds = [params.seed * 1000003 + i for i in range(len(prompts) * n)]
        per_call = max(1, batch_rows // n)
        # bound the rows of one call by the memory of their KV cache in the worst case (a call's cache
        # starts at max_new_tokens and grows up to the all-token cap)
        cfg, w = self.model.config, self.model.output_weight
        slots = capacity(max(len(x) for x in prompts), [resolved(params)])
        per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * slots * w.element_size()
        if w.is_cuda:
            self.release()     # a kept fast-path cache counts as free: PyTorch's allocator reuses it
            free = (torch.cuda.mem_get_info(w.device)[0] + torch.cuda.memory_reserved(w.device)
                    - torch.cuda.memory_allocated(w.device))
        budget = params.cache_gb * 2 ** 30 if params.cache_gb else (0.5 * free if w.is_cuda else 4 * 2 ** 30)
        per_call = max(1, min(per_call, int(budget // per_row) // n))
        out, wall = [], 0.0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts) * n, desc=f"sampling ({params.mode})", unit="sample")
        for i in range(0, len(prompts), per_call):
            t0 = time.perf_counter()
            out += self.generate(prompts[i:i + per_call], n=n, params=params, seeds=seeds[i * n:(i + per_call) * n])
            wall += time.perf_counter() - t0
            if bar is not None:
                bar.update(min(per_call, len(prompts) - i) * n)
        if bar is not None:
            bar.close()
        return out, wall

    def sample_step(self, requests, logits, steer):
        """Draw one token for each (row, stream) request from its logits (N, V), with its row's params.
        The log-prob recorded is the model's own (before steering and penalty), by logprob_of, the
        decode step's head: within a few fp32 ULPs of the largest logit of the trainer's logsumexp
        (torch's CPU log_softmax over a 152k vocabulary is several times further off: its fp32 sum)."""
        logits = model_logits = logits.float()
        if steer is not None or any(row.p.repetition_penalty != 1.0 for row, _ in requests):
            logits = logits.clone()                              # both edit the logits in place
        if steer is not None:
            logits = steer(requests, logits)
        for i, (row, st) in enumerate(requests):
            rp = row.p.repetition_penalty
            if rp != 1.0 and st.branch:  # the branch's visible response: trunk segments + its own tokens
                seen = {rec[0] for seg in row.segs if seg and seg[0][4] == 0 for rec in seg} | set(st.ids)
                idx = torch.tensor(sorted(seen), device=logits.device)
                v = logits[i, idx]
                logits[i, idx] = torch.where(v > 0, v / rp, v * rp)
        u = torch.cat([torch.rand(1, generator=st.gen) for _, st in requests]).to(logits.device)
        groups = {}                                              # rows with the same sampling settings
        for i, (row, _) in enumerate(requests):
            groups.setdefault((row.p.temperature, row.p.top_p, row.p.top_k), []).append(i)
        if len(groups) == 1:
            toks = pick(logits, *next(iter(groups)), u)
        else:
            toks = torch.empty(len(requests), dtype=torch.long, device=logits.device)
            for (temp, top_p, top_k), idx in groups.items():
                ii = torch.tensor(idx, device=logits.device)
                toks[ii] = pick(logits[ii], temp, top_p, top_k, u[ii])
        self.record(requests, toks.tolist(), logprob_of(model_logits, toks).tolist())

    def record(self, requests, toks, lps):
        """Hand each drawn token to its stream (a row that ended on an earlier token of this step takes no more)."""
        for (row, st), t, lp in zip(requests, toks, lps):
            if row.finish is None:
                self.on_token(row, st, t, lp)

    def to_feed(self, row, one_each):
        """The (record, stream) pairs of a row to write this step, in slot order. All pending ones,
        or (one_each) the first of each stream. Slot order must stay causal across a fork and a join:
        branches follow every trunk token before the fork, the takeaway every branch token. So the
        streams go in groups (trunk, the branches of a fork, the trunk after the join) and a group
        waits while an earlier one still has tokens left after this step."""
        if not one_each:
            return [(rec, st) for st in row.streams for rec in st.feed]
        out, left, kind = [], False, None
        for st in row.streams:
            if not st.feed:
                continue
            if (st.branch > 0) != kind:             # a new group: it waits for the earlier ones
                if left:
                    break
                kind = st.branch > 0
            out.append((st.feed[0], st))
            left = left or len(st.feed) > 1
        return out

    def report(self, rows, emitted, on_step):
        """Streaming: hand on_step the records added since the last report; cancel what it returns."""
        events, finished = [], []
        for r, row in enumerate(rows):
            if emitted[r] is None:                                 # ended and already reported
                continue
            emitted[r] += [0] * (len(row.segs) - len(emitted[r]))
            for i, seg in enumerate(row.segs):
                if len(seg) > emitted[r][i]:
                    events.append((r, i, seg[emitted[r][i]:]))
                    emitted[r][i] = len(seg)
            if row.finish is not None:
                finished.append((r, row.finish))
                emitted[r] = None
        for r in on_step(events, finished) or ():
            self.finish(rows[r], "cancelled")

    def to_sample(self, row, t0):
        recs = [rec for seg in row.segs for rec in seg]
        col = lambda i: [rec[i] for rec in recs]
        s = Sample(prompt_ids=row.prompt, ids=col(0), sampled=col(1), logprobs=col(2), block=col(3),
                   branch=col(4), pos=col(5), finish_reason=row.finish)
        s.text = self.tok.decode(s.ids[:-1] if row.finish == "eos" else s.ids)   # without the stop token
        s.stats = dict(mode=row.p.mode, total_tokens=len(recs), critical_path_tokens=row.crit, forks=len(row.forks),
                       branches_per_fork=list(row.forks), time_s=row.t_end - t0)
        return s


def capacity(L, plist, slots=None):
    """KV-cache slots per row for prompts of up to L tokens and these (resolved) params: the total budget
    (or `slots` tokens), room for forced tokens, the scratch slot; a multiple of 256, so calls with
    similar prompts share the kept cache and graphs."""
    cap = L + max((p.max_total_tokens if slots is None else slots) + 16 * (p.max_branches + 2) for p in plist) + 1
    return -(-cap // 256) * 256


def resolved(p):
    """Checked params with the all-branch cap filled in: max_new_tokens under budget "total";
    under "critical" max_total_tokens, 0 = max_branches x max_new_tokens."""
    if p.mode not in ("serial", "parallel"):
        raise ValueError(f"mode must be 'serial' or 'parallel', not {p.mode!r}")
    if p.budget not in ("total", "critical"):
        raise ValueError(f"budget must be 'total' or 'critical', not {p.budget!r}")
    if p.budget == "total":
        total = p.max_new_tokens
    else:
        total = p.max_total_tokens or p.max_new_tokens * (p.max_branches if p.mode == "parallel" else 1)
    return SamplingParams(**{**p.__dict__, "max_total_tokens": total})


def in_step_draw(plist, steer):
    """(temperature, top_p, top_k) when every row samples alike and nothing edits the logits (no
    steering, no repetition penalty): the fast path then draws inside its step; else None."""
    if steer is not None or any(p.repetition_penalty != 1.0 for p in plist):
        return None
    kinds = {(0.0, 1.0, 0) if p.temperature <= 0 else (float(p.temperature), float(p.top_p), int(p.top_k))
             for p in plist}
    return kinds.pop() if len(kinds) == 1 else None


def row_generator(seed):
    """A row's own CPU torch.Generator (seeds of any size are folded into 64 bits)."""
    return torch.Generator().manual_seed(seed % 2 ** 64)


def branch_generator(seed, block, branch):
    """Branch `branch` of block `block` of the row seeded `seed` draws from its own generator, so
    its tokens do not depend on the steps at which it and its siblings are scheduled."""
    return row_generator(seed * 0x9E3779B97F4A7C15 + block * 1000003 + branch)


def pick(logits, temperature, top_p, top_k, u):
    """(N, V) float logits, (N,) uniforms in [0, 1) -> (N,) token ids, by inverse CDF (one uniform
    per row, so rows never share a random stream). temperature 0 = argmax."""
    if temperature <= 0:
        return argmax_rows(logits)
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


def chunks(V):
    """How many chunks a vocabulary row splits into for two-stage reductions (a divisor of V)."""
    return next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if V % c == 0)


def argmax_rows(logits):
    """logits.argmax(-1) in two stages (the max of each chunk of the row, then the best chunk): the
    same first maximal index, but a GPU spreads one row over many blocks (a one-row argmax over a
    152k vocabulary ran as a single 28-microsecond block in the decode step)."""
    N, V = logits.shape
    C = chunks(V)
    m, i = logits.view(N, C, V // C).max(-1)                            # (N, C): first max of each chunk
    best = m.argmax(-1)                                                 # the first chunk holding the max
    return best * (V // C) + i.gather(1, best[:, None]).squeeze(1)


def logprob_of(logits, tok):
    """log_softmax(logits)[tok] per row, with a two-stage logsumexp (see argmax_rows)."""
    N, V = logits.shape
    x = logits.view(N, chunks(V), -1)
    mx = x.amax(-1).amax(-1)                                            # (N,)
    lse = mx + (x - mx[:, None, None]).exp().sum(-1).sum(-1).log()
    return logits.gather(1, tok[:, None]).squeeze(1) - lse


@torch.no_grad()
def generate_naive(model, prompt, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, top_k=0, seed=0):
    """The test oracle: serial decoding without a cache, one full forward per token.
    Returns (ids, logprobs)."""
    dev = model.output_weight.device
    gen = row_generator(seed * 1000003)                   # row 0's stream in generate()
    ids, lps = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=dev))[:, -1].float()
        t = pick(logits, temperature, top_p, top_k, torch.rand(1, generator=gen).to(dev))
        lps.append(torch.log_softmax(logits, -1)[0, t].item())
        ids.append(t.item())
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt):], lps


def segments(sample, tokenizer):
    """[(branch, text)] runs of the response in canonical order: trunk, step 1 .. step k, trunk ..."""
    runs = []
    for t, b in zip(sample.ids, sample.branch):
        if runs and runs[-1][0] == b:
            runs[-1][1].append(t)
        else:
            runs.append((b, [t]))
    return [(b, tokenizer.decode(ts)) for b, ts in runs]


def show(sample, tokenizer):
    lines = []
    for b, text in segments(sample, tokenizer):
        lines.append(f"  ── branch {b} ──" if b else "  ── trunk ──")
        lines += ["  " + ln for ln in text.splitlines() or [""]]
    st = sample.stats
    lines.append(f"  [{sample.finish_reason}] tokens {st['total_tokens']} | critical path "
                 f"{st['critical_path_tokens']} | forks {st['forks']} {st['branches_per_fork']} | {st['time_s']:.2f}s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="Sample from a Qwen checkpoint, serially or with NPR branches.")
    ap.add_argument("--model", required=True, help="HF checkpoint folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--mode", default="parallel", choices=["serial", "parallel"])
    ap.add_argument("-n", type=int, default=1, help="samples")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--budget", default="total", choices=["total", "critical"], help="what --max-new-tokens counts")
    ap.add_argument("--max-branches", type=int, default=5)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-instruction", action="store_true", help="send the prompt without the NPR instruction")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    tok = Tokenizer.from_pretrained(a.model)
    model = Qwen.from_pretrained(a.model, device=a.device)
    from cli import instruction_for   # the checkpoint's own instruction (the built-in default has one)
    user = a.prompt if a.no_instruction else npr.build_prompt(a.prompt, instruction_for(a.model))
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": user}], enable_thinking=False))
    params = SamplingParams(mode=a.mode, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            max_new_tokens=a.max_new_tokens, budget=a.budget, max_branches=a.max_branches,
                            repetition_penalty=a.repetition_penalty, seed=a.seed)
    t0 = time.perf_counter()
    samples = Sampler(model, tok).generate([prompt], n=a.n, params=params)[0]
    wall = time.perf_counter() - t0
    for i, s in enumerate(samples):
        print(f"=== sample {i} ===")
        print(show(s, tok))
    total = sum(s.stats["total_tokens"] for s in samples)
    print(f"{len(samples)} samples | {total} tokens in {wall:.2f}s | {total / wall:.1f} tokens/s")


if __name__ == "__main__":
    main()
