"""
Branch-isolated causal attention for the Native Parallel Reasoner (NPR.md section 3).

Every token carries metadata: `doc` (which packed sequence; < 0 = padding / empty cache slot),
`block` (which guideline block, 0 = none), `branch` (0 = shared trunk, i > 0 = inside step i of
its block) and `slot` (its index in the key sequence, i.e. its KV-cache slot). RoPE positions are
NOT part of the mask: they are baked into q and k before this function is called.

Query q may attend key k iff
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

Contents: Layout -> visible_mask / attention_ref (the spec) -> Triton kernels (guarded import)
-> the dispatcher `attention(..., impl="auto" | "triton" | "ref")` -> `__main__` benchmark.
"""
from dataclasses import dataclass

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
# The reference (the spec). Dense (B, Tq, Tk) mask: fine for tests and CPU decoding.

def visible_mask(q_layout, k_layout=None):
    """(B, Tq, Tk) bool: True where query q may attend key k. k_layout=None: self-attention."""
    k_layout = q_layout if k_layout is None else k_layout
    Tk = k_layout.doc.shape[1]
    q_slot = q_layout.slots()[:, :, None]                                    # (B, Tq, 1)
    k_idx = torch.arange(Tk, device=q_slot.device)[None, None, :]            # (1, 1, Tk)
    qd, kd = q_layout.doc[:, :, None], k_layout.doc[:, None, :]
    qb, kb = q_layout.block[:, :, None], k_layout.block[:, None, :]
    qr, kr = q_layout.branch[:, :, None], k_layout.branch[:, None, :]
    sibling = (qb == kb) & (qr > 0) & (kr > 0) & (qr != kr)
    return (kd >= 0) & (qd == kd) & (k_idx <= q_slot) & ~sibling


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


def attention_sdpa(q, k, v, q_layout, k_layout=None, scale=None):
    """Same result as attention_ref, through SDPA with a dense bool mask (the fast CPU path)."""
    mask = visible_mask(q_layout, k_layout)[:, None]                         # (B, 1, Tq, Tk)
    empty = ~mask.any(-1, keepdim=True)                                      # (B, 1, Tq, 1)
    # an empty row would give NaN (also in backward): let it see everything, then zero it
    mask = mask | empty
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


# -----------------------------------------------------------------------------
# The dispatcher

def attention(q, k, v, q_layout, k_layout=None, scale=None, impl="auto"):
    """Branch-isolated attention. impl: "auto" (Triton on CUDA, SDPA+dense mask elsewhere),
    "triton", "sdpa" or "ref" (the readable spec)."""
    if impl == "auto":
        impl = "triton" if (q.is_cuda and HAS_TRITON) else "sdpa"
    if impl == "ref":
        return attention_ref(q, k, v, q_layout, k_layout, scale)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, q_layout, k_layout, scale)
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' but triton is not importable")
        return attention_triton(q, k, v, q_layout, k_layout, scale)
    raise ValueError(f"unknown attention impl {impl!r}: use auto, triton, sdpa or ref")


HAS_TRITON = False  # the Triton section (to be written) sets this when `import triton` works


def attention_triton(q, k, v, q_layout, k_layout=None, scale=None):
    raise NotImplementedError("Triton kernels not written yet")
