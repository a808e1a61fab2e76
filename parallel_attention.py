"""
Branch-isolated causal attention for the Native Parallel Reasoner (NPR.md section 3).

Every token carries metadata: `doc` (which packed sequence; < 0 = padding / empty cache slot),
`block` (which guideline block, 0 = none), `branch` (0 = shared trunk, i > 0 = inside step i of
its block) and `slot` (its index in the key sequence, i.e. its KV-cache slot). RoPE positions are
NOT part of the mask: they are baked into q and k before this function is called.

Query q may attend key k iff (`visible`, the one place an ablation of the rule changes; the Triton
kernels' own copy is checked against it before they run: triton_attention.kernels_hold_rule)
    k.doc >= 0  and  q.doc == k.doc  and  k.slot <= q.slot
    and NOT (q.block == k.block and q.branch > 0 and k.branch > 0 and q.branch != k.branch)

A picture (one doc; trunk t, block 1 with steps a and b, then takeaway w; x = visible):

            keys:  t t | a a | b b | w
    query  t       x
           t       x x
           a       x x   x
           a       x x   x x
           b       x x         x          <- b is blind to a (same block, different branch)
           b       x x         x x
           w       x x   x x   x x   x    <- the takeaway sees every step

Because positions live in k (RoPE), the slot ORDER of branch tokens is free: the sampler may
interleave the branches of one block in its KV cache; only "slot order inside a branch is causal"
and "everything after the join sits after every branch slot" matter.

A query that sees nothing (padding) gets a zero output, never NaN.

Contents: Layout -> visible (the rule) -> visible_mask / attention_ref (the spec) -> attention_sdpa
(the CPU path) -> the dispatcher `attention(..., impl="auto" | "triton" | "sdpa" | "ref")`.
The Triton kernels (the GPU fast path, optional reading) are in triton_attention.py, imported only
when chosen; their benchmark is bench_attention.py.
"""
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    """Per-token branch structure of a batch of rows, every field an int32 tensor of shape (B, T)."""
    doc: torch.Tensor     # packed-sequence id; < 0 = padding (sees nothing, is seen by nobody)
    block: torch.Tensor   # guideline block id, 0 = not in a block
    branch: torch.Tensor  # 0 = trunk, i > 0 = step i of its block (its trailing separator included)
    slot: torch.Tensor | None = None  # (B, T) key index of each token; None = 0..T-1 (no cache)

    @staticmethod
    def causal(B, T, device=None):
        """The plain causal layout: one document, no blocks."""
        z = torch.zeros(B, T, dtype=torch.int32, device=device)
        return Layout(doc=z, block=z, branch=z)

    def slots(self):
        if self.slot is not None:
            return self.slot
        B, T = self.doc.shape
        return torch.arange(T, dtype=torch.int32, device=self.doc.device).expand(B, T)

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device=device, dtype=torch.int32)
        return Layout(mv(self.doc), mv(self.block), mv(self.branch), mv(self.slot))


# -----------------------------------------------------------------------------
# The rule and the reference (the spec). Dense (B, Tq, Tk) mask: fine for tests and CPU decoding.

def visible(q_doc, q_block, q_branch, q_slot, k_doc, k_block, k_branch, k_slot):
    """THE visibility rule, elementwise on broadcastable tensors: may query q attend key k?
    Everything else (the reference, SDPA, the Triton tile lists, the tests) calls this; the Triton
    kernels' element mask is a copy (triton_attention._visible on token_info's rows), compared with
    this function on a small random layout at their first use under each version of it."""
    sibling = (q_block == k_block) & (q_branch > 0) & (k_branch > 0) & (q_branch != k_branch)
    return (k_doc >= 0) & (q_doc == k_doc) & (k_slot <= q_slot) & ~sibling


def visible_mask(q_layout, k_layout=None):
    """(B, Tq, Tk) bool: True where query q may attend key k. k_layout=None: self-attention."""
    k_layout = q_layout if k_layout is None else k_layout
    k_idx = torch.arange(k_layout.doc.shape[1], device=k_layout.doc.device)   # a key's slot is its index
    q = (t[:, :, None] for t in (q_layout.doc, q_layout.block, q_layout.branch, q_layout.slots()))
    k = (t[:, None, :] for t in (k_layout.doc, k_layout.block, k_layout.branch, k_idx[None]))
    return visible(*q, *k)


def attention_ref(q, k, v, q_layout, k_layout=None, scale=None):
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq % Hkv == 0 -> (B, Hq, Tq, D) in q's dtype."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    mask = visible_mask(q_layout, k_layout)[:, None]                         # (B, 1, Tq, Tk)
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale          # (B, Hq, Tq, Tk)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                             # empty rows -> 0
    return torch.matmul(p, v.float()).to(q.dtype)


# -----------------------------------------------------------------------------
# SDPA with a dense mask (the CPU path, and the traceable one for torch.compile)

def memo(q_layout, k_layout, tag, compute):
    """compute(), memoised on the q_layout object: all layers of one forward share it. The key holds
    each tensor's address, shape, strides and in-place version counter (the entry keeps the tensors
    alive, so an address cannot be reused); no caching under inference_mode; an entry made during a
    CUDA-graph capture serves only that capture (its tensors live in the graph's memory pool).
    While torch.compile traces, the entry is keyed by the tag alone (the layout is the trace's own
    object): Inductor does not merge the layers' identical mask computations by itself.
    Public: the Triton path memoises its token rows and tile lists here too."""
    if torch.compiler.is_compiling():
        entries = getattr(q_layout, "_traced", None)    # (dynamo cannot trace __dict__.setdefault)
        if entries is None:
            entries = q_layout._traced = {}
        if tag not in entries:
            entries[tag] = compute()
        return entries[tag]
    ts = [t for L in (q_layout, k_layout) if L is not None for t in (L.doc, L.block, L.branch, L.slot)
          if t is not None]
    if torch.is_inference_mode_enabled() or any(t.is_inference() for t in ts):
        return compute()
    capturing = ts[0].is_cuda and torch.cuda.is_current_stream_capturing()   # never reuse across a capture edge
    key = (k_layout is None, capturing) + tuple((t.data_ptr(), t.shape, t.stride(), t._version) for t in ts)
    entries = q_layout.__dict__.setdefault("_memo", {})
    hit = entries.get(tag)
    if hit is None or hit[0] != key:
        hit = entries[tag] = (key, ts, compute())
    return hit[2]


def _sdpa_mask(q_layout, k_layout):
    mask = visible_mask(q_layout, k_layout)[:, None]                         # (B, 1, Tq, Tk)
    empty = ~mask.any(-1, keepdim=True)                                      # (B, 1, Tq, 1)
    # an empty row would give NaN (also in backward): let it see everything, then zero it
    return mask | empty, empty


def attention_sdpa(q, k, v, q_layout, k_layout=None, scale=None):
    """Same result as attention_ref, through SDPA with a dense bool mask. Decode steps (few
    queries) with GQA fold each kv head's query heads into its query rows, so SDPA reads the cache
    as it is instead of expanding k and v per query head."""
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    if G > 1 and Tq <= 16:
        def folded():   # an additive mask in q's dtype, made once per step (SDPA would convert a bool one per layer)
            mask, empty = (m.expand(B, G, Tq, m.shape[-1]).reshape(B, 1, G * Tq, -1) for m in _sdpa_mask(q_layout, k_layout))
            return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf")), empty
        mask, empty = memo(q_layout, k_layout, f"sdpa-g{G}-{q.dtype}", folded)
        out = F.scaled_dot_product_attention(q.reshape(B, -1, G * Tq, D), k, v, attn_mask=mask, scale=scale)
        return out.masked_fill(empty, 0.0).view(B, Hq, Tq, D)
    mask, empty = memo(q_layout, k_layout, "sdpa", lambda: _sdpa_mask(q_layout, k_layout))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=G > 1)
    return out.masked_fill(empty, 0.0)


# -----------------------------------------------------------------------------
# The dispatcher

@cache
def triton_kernels():
    """The Triton path's module (triton_attention.py, optional reading), or None where triton does not
    import; imported at its first use on CUDA, never at import."""
    try:
        import triton_attention
        return triton_attention
    except Exception:
        return None


def attention(q, k, v, q_layout, k_layout=None, scale=None, impl="auto"):
    """Branch-isolated attention. impl: "auto" (Triton on CUDA when its kernels hold the rule, SDPA +
    dense mask elsewhere), "triton", "sdpa" or "ref" (the readable spec)."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):   # like SDPA under autocast: one low-precision dtype for q, k, v
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if impl == "auto":   # a kernel mask that differs from `visible` (an ablation): SDPA, said once
        impl = "triton" if q.is_cuda and triton_kernels() and triton_kernels().kernels_hold_rule(q.device) else "sdpa"
    if impl == "ref":
        return attention_ref(q, k, v, q_layout, k_layout, scale)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, q_layout, k_layout, scale)
    if impl == "triton":
        if triton_kernels() is None:
            raise RuntimeError("impl='triton' but triton_attention.py cannot import triton")
        return triton_kernels().attention_triton(q, k, v, q_layout, k_layout, scale)   # refuses if its mask differs
    raise ValueError(f"unknown attention impl {impl!r}: use auto, triton, sdpa or ref")
