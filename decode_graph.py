"""
The sampler's GPU fast path: one decode step with static shapes, replayed as a CUDA graph.

Eager decoding of a 0.6B model on an H100 is launch-bound (~1,700 small kernels per token, ~25 ms),
whatever the batch. A CUDA graph replays the same kernels without the Python and launch cost, but
only for fixed shapes and fixed addresses. So the step is made static:
- the rows R and the KV cache (capacity S, one cache row per sample) are fixed for a whole
  generate() call (sampler.py already works that way);
- the new tokens of a step form an (R, W) grid (one column per live branch, or a forced header);
  W is rounded up to a bucket (1, 2, 4, .. 64); padding columns are invisible (doc -1) and write
  to the scratch slot, exactly as in the eager path;
- attention runs over the first Sb cache slots, Sb = the filled length rounded up to a power of
  two (>= 256, <= S); the unfilled slots are empty (doc -1) and masked like any other; with the
  Triton decode kernel the tiles past a query's slot are skipped anyway;
- ids, positions and the branch metadata of the grid go through one preallocated (R, W, 6) buffer:
  one host->device copy per step. All the mask metadata is derived from it on the GPU.
One graph per (W bucket, Sb) is captured lazily the first time that shape occurs (all share one
memory pool), then every step is: copy the grid in, replay, read the (R, W, hidden) output.

StaticStep(..., graphs=False) runs the very same padded step eagerly: on CPU that is how the suite
checks the padding (static == ordinary step); on CUDA the graph is tested against both.
StaticStep(..., compiled=True) also passes the step through torch.compile (fullgraph, static
shapes: one compile per graph key) before capturing it: the norms, RoPE and SwiGLU fuse into a few
kernels, which is what a launch-bound batch-1 step needs. It needs a fully traceable attention:
model.attn_impl = "sdpa" (the Triton kernels are not traced).
Not under autocast (graph capture needs autocast's weight cache off): the sampler uses the
ordinary eager step there.
"""
import torch

from parallel_attention import Layout

W_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
S_MIN = 256


class StaticStep:
    """hidden_states of one decode step on a fixed (R, S) KV cache, padded to static shapes."""

    def __init__(self, model, cache, graphs=True, compiled=False):
        self.model, self.cache = model, cache
        self.compiled = compiled
        self.step = torch.compile(self.forward, dynamic=False, fullgraph=True) if compiled else self.forward
        self.R, self.S = cache.doc.shape
        self.dev = cache.doc.device
        self.graphs = graphs and self.dev.type == "cuda"
        self.buf = {}       # W bucket -> (R, W, 6) long grid: id, pos, doc, block, branch, slot
        self.out = {}       # (W, Sb) -> output tensor of the captured graph
        self.graph = {}     # (W, Sb) -> torch.cuda.CUDAGraph
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

    def forward(self, g, Sb):
        """The step itself: g (R, W, 6) on the device -> (R, W, hidden). Captured as is."""
        ids, pos, meta = g[..., 0], g[..., 1], g[..., 2:].int()
        layout = Layout(meta[..., 0], meta[..., 1], meta[..., 2], meta[..., 3])
        self.cache.limit = Sb
        return self.model.hidden_states(ids, pos, layout, self.cache)

    @torch.no_grad()
    def __call__(self, grid, limit):
        """grid: (R, W, 6) long CPU tensor with W = width(...); limit: slots filled after this step.
        -> (R, W, hidden), valid until the next call."""
        W = grid.shape[1]
        Sb = self.span(limit)
        if W not in self.buf:
            self.buf[W] = torch.zeros(self.R, W, 6, dtype=torch.long, device=self.dev)
        g = self.buf[W]
        g.copy_(grid, non_blocking=False)
        if not self.graphs:
            return self.step(g, Sb)
        key = (W, Sb)
        if key not in self.graph:
            self.capture(key, g)
        self.cache.limit = Sb
        self.graph[key].replay()
        return self.out[key]

    def capture(self, key, g):
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels; the step is
        idempotent: the same k/v land in the same slots), then record the step into a graph."""
        s = torch.cuda.Stream(self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):
            self.step(g, key[1])                  # torch.compile (if on) compiles here, not in the capture
        torch.cuda.current_stream(self.dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out[key] = self.step(g, key[1])
        self.graph[key] = graph

    def reset(self):
        """Empty the cache for the next generate() call (same rows and capacity: graphs stay valid)."""
        self.cache.doc.fill_(-1)
        self.cache.block.zero_()
        self.cache.branch.zero_()
