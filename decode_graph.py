"""
Optional reading: the sampler's GPU side. Its fast path, one decode step with static shapes replayed
as a CUDA graph (StaticStep), whose in-step greedy draw takes the argmax in two stages (argmax_rows);
and the free GPU memory the KV-cache budget is half of (free_gpu_bytes).

Eager decoding of a 0.6B model on an H100 is launch-bound (~1,700 small kernels per token, ~25 ms),
whatever the batch. A CUDA graph replays the same kernels without the Python and launch cost, but
only for fixed shapes and fixed addresses. So the step is made static:
- the rows R and the KV cache (capacity S, one cache row per running request) are fixed while the
  engine runs (sampler.py: a finished row is refilled, a free row is padding);
- the step's (R, W, 6) grid (sampler.Sampler.build_grid: id, pos, doc, block, branch, slot per cell)
  has W rounded up to a bucket (1, 2, 4, .. 64); padding cells are invisible (doc -1) and write to
  the scratch slot; it goes to the device in one copy, the mask metadata is derived from it there;
- attention runs over the first Sb cache slots, Sb = the filled length rounded up to a power of
  two (>= 256, <= S); the unfilled slots are empty (doc -1) and masked like any other.
One graph per (W bucket, Sb, settings) is captured lazily the first time that shape occurs (all share one
memory pool), then every step is: copy the grid in, replay, read the output.

With `settings` (the sampling settings every running request shares: no steering, no repetition penalty)
the step also ends with the head: logits of every cell, the token drawn with the cell's uniform (a
second (R, W) buffer: the CPU generators' draws) and its log-prob, read back as one (2, R*W) tensor.
Cells whose logits would not fit `HEAD_CELLS_BYTES` of fp32 return hidden states instead.

fuse=True: q/k/v and gate/up concatenated (fused_projections): two GEMMs where there were five (84
fewer kernels per step for Qwen3-0.6B), at the memory of those weights once more; the copies are
refreshed in place (graphs stay valid) when the weights changed since (an RL update). The step is then
fused_hidden_states, built here from each layer's own modules (model.py knows nothing of the copies).
graphs=False runs the very same padded step eagerly: on CPU that is how the suite checks the padding.
compiled=True passes the step through torch.compile (fullgraph, static shapes: one compile per graph
key) before capture: norms, RoPE and SwiGLU fuse into a few kernels; it needs model.attn_impl = "sdpa"
(the Triton kernels are not traced). Not under autocast (capture needs autocast's weight cache off):
the sampler uses the eager step there.
"""
import math

import torch
import torch.nn.functional as F

from model import rope_cos_sin
from parallel_attention import Layout

W_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
S_MIN = 256
HEAD_CELLS_BYTES = 512 << 20    # the in-step head's fp32 logits (R x W x vocab) at most this big


@torch.no_grad()
def fused_projections(model):
    """Per layer ((q|k|v weight, bias or None), gate|up weight): concatenated copies for decoding, where
    a step of few tokens costs per kernel launched, not per byte (the sampler's CUDA-graph fast path).
    Copies: they go stale when the weights change (see weights_version)."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
        out.append(((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight])))
    return out


def fused_hidden_states(model, fused, input_ids, positions, layout=None, kv_cache=None):
    """model.hidden_states(input_ids, positions, layout, kv_cache) with each layer's q/k/v and gate/up
    projections one GEMM each (`fused`: fused_projections(model)); the rest is the layer's own modules
    in the same order (tests/test_decode_graph.py holds the two equal)."""
    if kv_cache is not None:
        kv_cache.write_layout(layout)           # and sets kv_cache.k_layout, the keys' layout
    x = model.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, x.dtype)
    for layer, ((qkv_w, qkv_b), gate_up) in zip(model.model.layers, fused):
        a = layer.self_attn
        sizes = [a.n_head * a.head_dim] + [a.n_kv * a.head_dim] * 2
        q, k, v = F.linear(layer.input_layernorm(x), qkv_w, qkv_b).split(sizes, -1)     # (B, T, H * D) each
        x = x + a.attend(q, k, v, cos, sin, layout, kv_cache, model.attn_impl)
        g, u = F.linear(layer.post_attention_layernorm(x), gate_up).chunk(2, -1)
        x = x + layer.mlp.down_proj(F.silu(g) * u)
    return model.model.norm(x)


def argmax_rows(logits):
    """logits.argmax(-1) in two stages (the max of each chunk of the row, then the best chunk): the
    same first maximal index, but a GPU spreads one row over many blocks, not one."""
    N, V = logits.shape
    C = math.gcd(V, 128)                                                # chunks: a divisor of V
    m, i = logits.view(N, C, V // C).max(-1)                            # (N, C): first max of each chunk
    best = m.argmax(-1)                                                 # the first chunk holding the max
    return best * (V // C) + i.gather(1, best[:, None]).squeeze(1)


def weights_version(model):
    """Changes whenever a parameter is written in place (an optimizer step) or replaced."""
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def free_gpu_bytes(device, cache=None):
    """GPU memory a KV cache may take on `device`: what is free, plus what `cache` (a kept KVCache, which
    is replaced) holds."""
    kept = sum(t.numel() * t.element_size() for t in (cache.k + cache.v if cache else []))
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device) + kept)


def in_step_settings(plist, steer):
    """(temperature, top_p, top_k) when every row samples alike and nothing edits the logits (no
    steering, no repetition penalty): the step may then draw inside itself; else None."""
    if steer is not None or any(p.repetition_penalty != 1.0 for p in plist):
        return None
    kinds = {(0.0, 1.0, 0) if p.temperature <= 0 else (float(p.temperature), float(p.top_p), int(p.top_k))
             for p in plist}
    return kinds.pop() if len(kinds) == 1 else None


class StaticStep:
    """hidden_states of one decode step on a fixed (R, S) KV cache, padded to static shapes."""

    def __init__(self, model, cache, graphs=True, compiled=False, draw_tokens=None, fuse=False, logprob=None):
        self.model, self.cache = model, cache
        self.compiled = compiled
        # fuse: True, or the fused weights of the StaticStep this one replaces (a grown cache)
        self.fused = (fuse if isinstance(fuse, list) else fused_projections(model)) if fuse else None
        self.version = weights_version(model) if fuse else None
        self.draw_tokens = draw_tokens   # (logits, temperature, top_p, top_k, u, argmax) -> tokens: the sampler's rule
        self.logprob = logprob or (lambda logits, tok: logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1))
        if compiled:        # one compile per graph key: (W bucket, span, settings) keys outnumber dynamo's default 8
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 256))
        self.step = torch.compile(self.forward, dynamic=False, fullgraph=True) if compiled else self.forward
        self.R, self.S = cache.doc.shape
        self.dev = cache.doc.device
        self.graphs = graphs and self.dev.type == "cuda"
        self.buf = {}       # W bucket -> (R, W, 6) long grid: id, pos, doc, block, branch, slot
        self.ubuf = {}      # W bucket -> (R, W) float: each cell's uniform for the in-step draw
        self.host = {}      # W bucket -> pinned CPU staging of both (CUDA), so the copies are async
        self.copied = torch.cuda.Event() if self.dev.type == "cuda" else None   # the last step's copies are done
        self.copying = False
        self.draws = 0      # steps that drew their tokens in the step
        self.out = {}       # (W, Sb, settings) -> output tensor of the captured graph
        self.graph = {}     # (W, Sb, settings) -> torch.cuda.CUDAGraph
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def width(self, W):
        """The grid width to build for W new tokens per row (None: too wide, use the eager step)."""
        return next((b for b in W_BUCKETS if b >= W), None)

    def span(self, limit):
        """Cache slots attended: the filled length rounded up to a power of two."""
        Sb = S_MIN
        while Sb < limit:
            Sb *= 2
        return min(Sb, self.S)

    def can_draw(self, W):
        """Whether a step of width W may end with the head (its logits fit HEAD_CELLS_BYTES)."""
        return self.draw_tokens is not None and self.R * W * self.model.config.vocab_size * 4 <= HEAD_CELLS_BYTES

    def forward(self, g, Sb, u=None, settings=None):
        """The step itself: g (R, W, 6) on the device -> (R, W, hidden); with settings = (temperature,
        top_p, top_k) and u (R, W): -> (2, R*W) float64, each cell's drawn token and its log-prob
        under the model (temperature 1, the sampler's rule). Captured as is."""
        ids, pos, meta = g[..., 0], g[..., 1], g[..., 2:].int()
        layout = Layout(meta[..., 0], meta[..., 1], meta[..., 2], meta[..., 3])
        self.cache.limit = Sb
        h = self.model.hidden_states(ids, pos, layout, self.cache) if self.fused is None else \
            fused_hidden_states(self.model, self.fused, ids, pos, layout, self.cache)
        if settings is None:
            return h
        logits = F.linear(h.flatten(0, 1), self.model.output_weight).float()     # (R*W, V)
        tok = self.draw_tokens(logits, *settings, u.flatten(), argmax=argmax_rows)   # greedy: in two stages
        return torch.stack((tok.double(), self.logprob(logits, tok).double()))

    @torch.no_grad()
    def __call__(self, grid, limit, u=None, settings=None):
        """grid: (R, W, 6) long CPU tensor with W = width(...); limit: slots filled after this step;
        u: (R, W) float CPU tensor with settings (see forward; None: greedy, no uniforms needed).
        -> (R, W, hidden), or (2, R*W) with settings;
        valid until the next call."""
        W = grid.shape[1]
        Sb = self.span(limit)
        self.draws += settings is not None
        if W not in self.buf:
            self.buf[W] = torch.zeros(self.R, W, 6, dtype=torch.long, device=self.dev)
            self.ubuf[W] = torch.zeros(self.R, W, dtype=torch.float32, device=self.dev)
            if self.dev.type == "cuda":
                self.host[W] = (torch.zeros_like(self.buf[W], device="cpu").pin_memory(),
                                torch.zeros_like(self.ubuf[W], device="cpu").pin_memory())
        g, ub = self.buf[W], self.ubuf[W]
        if W in self.host:     # staging reused once the copies of the last step out of it are done
            hg, hu = self.host[W]
            if self.copying:
                self.copied.synchronize()
            hg.copy_(grid)
            g.copy_(hg, non_blocking=True)
            if u is not None:
                hu.copy_(u)
                ub.copy_(hu, non_blocking=True)
            self.copied.record()
            self.copying = True
        else:
            g.copy_(grid)
            if u is not None:
                ub.copy_(u)
        if not self.graphs:
            return self.step(g, Sb, ub, settings)
        key = (W, Sb, settings)
        if key not in self.graph:
            self.capture(key, g, ub)
        self.cache.limit = Sb
        self.graph[key].replay()
        return self.out[key]

    def draw(self, grid, limit, drawing, cells, settings):
        """The step with the draw inside it: each (request, stream) pair of drawing gets its token at its
        (row, column) cell, drawn with a uniform from the stream's own generator (greedy needs none).
        -> (tokens, log-probs), as Sampler.draw returns them."""
        u = None
        if settings[0] > 0:
            u = torch.zeros(grid.shape[:2])
            for (seq, st), (r, j) in zip(drawing, cells):
                u[r, j] = torch.rand(1, generator=st.gen).item()
        toks, lps = self(grid, limit, u, settings).tolist()          # one copy back
        at = [r * grid.shape[1] + j for r, j in cells]
        return [int(toks[c]) for c in at], [lps[c] for c in at]

    def capture(self, key, g, ub):
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels; the step is
        idempotent: the same k/v land in the same slots), then record the step into a graph."""
        s = torch.cuda.Stream(self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):
            self.step(g, key[1], ub, key[2])     # torch.compile (if on) compiles here, not in the capture
        torch.cuda.current_stream(self.dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out[key] = self.step(g, key[1], ub, key[2])
        self.graph[key] = graph

    def reset(self):
        """Empty the cache for the engine's next batch (same rows and capacity: graphs stay valid);
        fused weights that went stale are rewritten in place."""
        if self.fused is not None and weights_version(self.model) != self.version:
            with torch.no_grad():
                for (qkv, gate_up), ((w, b), gu) in zip(self.fused, fused_projections(self.model)):
                    qkv[0].copy_(w)
                    if b is not None:
                        qkv[1].copy_(b)
                    gate_up.copy_(gu)
            self.version = weights_version(self.model)
        self.cache.doc.fill_(-1)
        self.cache.block.zero_()
        self.cache.branch.zero_()
