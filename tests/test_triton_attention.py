"""The Triton kernels (triton_attention.py, optional reading) against the spec (parallel_attention.py).

Invariants held here, run by Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1;
every tile is 16 x 16 there, so tiny shapes span several tiles and skip some):
- the kernels' copy of the rule (`_visible` on `_layout_info`'s rows) == parallel_attention.visible
  on random packed layouts (docs, a shared prefix, blocks of 2-4 branches, serial runs, padding,
  interleaved branches, queries against a cache): an ablation of the rule must change both;
- tile skipping is sound: every (query, key) pair a tile skips is invisible; the memo of the
  metadata follows in-place edits;
- kernel == reference: forward, backward (dq, dk, dv) and decode, fp32 here, bf16 on CUDA
  (`-m cuda`, skipped without a GPU); padding rows give zeros and finite gradients.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_triton_attention.py -q
"""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import triton_attention as ta  # noqa: E402
from parallel_attention import Layout, attention, attention_ref, visible_mask  # noqa: E402
from test_parallel_attention import grads, npr_layout, qkv  # noqa: E402


# -----------------------------------------------------------------------------
# The kernels' copy of the rule == the Python rule

@triton.jit
def _mask_kernel(QI, KI, OUT, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program per row: the (Tq, Tk) mask as the attention kernels compute it, loads included
    b = tl.program_id(0)
    offs_m, offs_n = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    in_q, in_k = offs_m < Tq, offs_n < Tk
    q_doc, q_grp, q_br, q_slot, _, _, _, _ = ta._tile_info(QI + b * 8 * Tq, Tq, offs_m, in_q, Tk, BLOCK_N)
    KI += b * 8 * Tk
    k_doc = tl.load(KI + offs_n, mask=in_k, other=-1)
    k_grp = tl.load(KI + Tk + offs_n, mask=in_k, other=0)
    k_br = tl.load(KI + 2 * Tk + offs_n, mask=in_k, other=0)
    vis = ta._visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                      k_doc[None, :], k_grp[None, :], k_br[None, :], offs_n[None, :])
    out = OUT + b * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :]
    tl.store(out, vis.to(tl.int8), mask=in_q[:, None] & in_k[None, :])


def kernel_mask(q_layout, k_layout=None, holes=True):
    q_info, k_info = ta._layout_info(q_layout, k_layout, holes)
    (B, _, Tq), Tk = q_info.shape, k_info.shape[2]
    out = torch.zeros(B, Tq, Tk, dtype=torch.int8)
    _mask_kernel[(B,)](q_info, k_info, out, Tq, Tk, BLOCK_M=triton.next_power_of_2(max(Tq, 16)),
                       BLOCK_N=triton.next_power_of_2(max(Tk, 16)))
    return out.bool()


def random_layout(B, T, seed):
    """Rows of packed docs: a shared prefix, then serial trunk runs and blocks of 2-4 branches
    (contiguous or interleaved, block ids not always 1, 2, ...), padding at the end."""
    g = torch.Generator().manual_seed(seed)
    n = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
    rows = []
    for _ in range(B):
        toks, d = [], 0
        while len(toks) < T:
            toks += [(d, 0, 0)] * n(1, 5)                          # the prompt: a shared prefix
            blk = n(0, 3)
            for _ in range(n(1, 3)):
                if n(0, 2) == 0:                                   # a serial run: trunk only
                    toks += [(d, 0, 0)] * n(1, 6)
                    continue
                blk += n(1, 2)
                steps = [(d, blk, r) for r in range(1, n(2, 4) + 1) for _ in range(n(1, 5))]
                if n(0, 1):
                    steps = [steps[i] for i in torch.randperm(len(steps), generator=g)]
                toks += [(d, blk, 0)] * n(0, 2) + steps + [(d, blk, 0)] * n(1, 3)
            d += 1
        p = n(0, 4)
        rows.append(toks[:T - p] + [(-1, 0, 0)] * p)
    t = torch.tensor(rows, dtype=torch.int32)
    return Layout(t[..., 0].contiguous(), t[..., 1].contiguous(), t[..., 2].contiguous())


@pytest.mark.parametrize("seed", range(5))
def test_kernel_rule_agrees_with_python_rule(seed):
    L = random_layout(3, 40, seed)
    assert (L.branch > 0).any() and ((L.branch == 0) & (L.doc >= 0)).any()
    assert torch.equal(kernel_mask(L), visible_mask(L))
    # queries with slots against a cache with empty slots (prefill chunk / decode), no holes
    L.doc[:, 36:] = -1
    idx = torch.randperm(36, generator=torch.Generator().manual_seed(seed))[:7].sort().values
    sl = idx.int().expand(3, 7).contiguous()
    Q = Layout(L.doc[:, idx], L.block[:, idx], L.branch[:, idx], sl)
    want = visible_mask(Q, L)
    assert want.any() and not want.all()
    assert torch.equal(kernel_mask(Q, L, holes=False), want)
    assert torch.equal(kernel_mask(Q, L), want)


# -----------------------------------------------------------------------------
# Tile-skipping metadata: every skipped (query, key) pair must be invisible

def _assert_sound(q_layout, k_layout=None):
    q_info, k_info = ta._layout_info(q_layout, k_layout)
    vis = visible_mask(q_layout, k_layout)                                  # (B, Tq, Tk)
    Tq, Tk = vis.shape[1:]
    kk, qq = torch.arange(Tk)[None, None, :], torch.arange(Tq)[None, :, None]
    lo, hi, hl, hh = (q_info[:, i, :, None] for i in range(4, 8))          # per query, over keys
    assert not (vis & ((kk < lo) | (kk >= hi) | ((kk >= hl) & (kk < hh)))).any()
    lo, hi, hl, hh = (k_info[:, i, None, :] for i in range(4, 8))          # per key, over queries
    assert not (vis & ((qq < lo) | (qq >= hi) | ((qq >= hl) & (qq < hh)))).any()
    return q_info, k_info


@pytest.mark.parametrize("seed", range(6))
def test_layout_info_is_sound(seed):
    L = npr_layout(3, 64, seed, interleave=seed % 3 == 2)
    if seed == 4:  # docs not in order along the row: no document skipping, still sound
        L.doc[0] = L.doc[0].flip(0)
    q_info, k_info = _assert_sound(L)
    if seed % 3 != 2:  # contiguous branches: the sibling holes are found (skipping is real)
        assert (q_info[:, 7] > q_info[:, 6]).any() and (k_info[:, 7] > k_info[:, 6]).any()
    # queries with slots against a cache (chunked prefill / decode): the last 10 tokens of each row
    sl = torch.arange(54, 64, dtype=torch.int32).expand(3, 10)
    Q = Layout(L.doc[:, 54:], L.block[:, 54:], L.branch[:, 54:], sl)
    _assert_sound(Q, L)


def test_layout_info_cache_sees_in_place_edits():
    L = npr_layout(1, 30, seed=1)
    a = ta._cached_layout_info(L, None, True)
    assert ta._cached_layout_info(L, None, True) is a
    L.doc[0, 20:] = -1  # e.g. the KV cache metadata rewritten in place
    b = ta._cached_layout_info(L, None, True)
    assert b is not a and torch.equal(b[0], ta._layout_info(L)[0])


# -----------------------------------------------------------------------------
# Kernels == reference (interpreter, fp32)

def _check(q, k, v, q_layout, k_layout=None, grad=True):
    o = attention(q, k, v, q_layout, k_layout, impl="triton")
    o_ref = attention_ref(q, k, v, q_layout, k_layout)
    assert not o.isnan().any()
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    if grad:
        for name, a, b in zip("qkv", grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
            assert not a.isnan().any(), name
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=f"d{name}")


@pytest.mark.parametrize("seed,Hq,Hkv,T,interleave,step", [
    (0, 4, 2, 45, False, (1, 9)),    # packed docs, padding, 1..5 uneven branches, GQA, T % 16 != 0
    (1, 2, 2, 64, False, (1, 9)),    # no GQA, T a multiple of the tile
    (2, 3, 1, 37, True, (1, 9)),     # interleaved branches (no sibling holes), 3 q heads per kv head
    (3, 2, 1, 90, False, (17, 30)),  # long steps: unaligned sibling holes spanning whole tiles
])
def test_kernel_matches_ref(seed, Hq, Hkv, T, interleave, step):
    L = npr_layout(2, T, seed, interleave=interleave, step=step)
    q, k, v = qkv(2, Hq, Hkv, T, T, seed=seed)
    _check(q, k, v, L)


def test_kernel_strided_inputs_odd_head_dim():
    # q/k/v as (B, T, H, D) transposed views, as the model passes them; D = 24 is zero-padded to 32
    L = npr_layout(1, 40, seed=5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, H, 24, generator=g).transpose(1, 2).requires_grad_() for H in (4, 2, 2))
    _check(q, k, v, L)


def test_kernel_prefill_against_cache():
    # 20 queries (> 16: the forward kernel, with grads) at slots 30..49 of a 60-slot cache
    L = npr_layout(2, 60, seed=7, pad=False)
    L.doc[:, 50:] = -1                                      # empty cache slots at the end
    sl = torch.arange(30, 50, dtype=torch.int32).expand(2, 20)
    Q = Layout(L.doc[:, 30:50], L.block[:, 30:50], L.branch[:, 30:50], sl)
    q, k, v = qkv(2, 4, 2, 20, 60, seed=7)
    _check(q, k, v, Q, L)


def _interleaved_cache(B, S, n_prefix, n_branch, steps, seed=0):
    """A decode cache: prompt trunk, then block 1 with n_branch branches written one token per
    branch per step (interleaved slots), then empty slots (doc -1). Queries: one per branch."""
    doc = torch.full((B, S), -1, dtype=torch.int32)
    blk, br = torch.zeros_like(doc), torch.zeros_like(doc)
    doc[:, :n_prefix + n_branch * steps] = 0
    blk[:, n_prefix:n_prefix + n_branch * steps] = 1
    br[:, n_prefix:n_prefix + n_branch * steps] = torch.arange(1, n_branch + 1).repeat(steps).int()
    cache = Layout(doc, blk, br)
    last = n_prefix + n_branch * (steps - 1) + torch.arange(n_branch, dtype=torch.int32)
    q = Layout(doc[:, last], blk[:, last], br[:, last], last.expand(B, n_branch).contiguous())
    return q, cache


@pytest.mark.parametrize("Tq,splits", [(3, None), (1, 1), (4, 3)])
def test_decode_matches_ref(Tq, splits):
    q_l, cache = _interleaved_cache(2, 75, n_prefix=9, n_branch=Tq, steps=max(2, 40 // Tq))
    cache.doc[1, 40:] = -1                        # row 1: a shorter cache, its queries see only the prompt
    q_l.doc[1, 0] = -1                            # and one dead query: zeros
    q, k, v = qkv(2, 4, 2, Tq, 75, seed=Tq, grad=False)
    o_ref = attention_ref(q, k, v, q_l, cache)
    if splits is None:  # through the dispatcher: small Tq without grad routes to the decode kernel
        o = attention(q, k, v, q_l, cache, impl="triton")
    else:
        o = ta._decode(q, k, v, *ta._layout_info(q_l, cache, holes=False), 16 ** -0.5, splits=splits)
    assert not o.isnan().any()
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    assert o[1, :, 0].abs().max() == 0


def test_fully_masked_rows_give_zeros_and_finite_grads():
    L = npr_layout(2, 30, seed=2)
    L.doc[0, :] = -1          # a row that is all padding
    L.doc[1, 10:14] = 7       # a short doc mid-row (docs out of order: no document skipping)
    L.doc[1, 20:] = -1
    q, k, v = qkv(2, 2, 1, 30, 30)
    o = attention(q, k, v, L, impl="triton")
    assert o[0].abs().max() == 0 and o[1, :, 20:].abs().max() == 0
    _check(q, k, v, L)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows
def test_kernels_skip_tiles():
    # Poison (NaN) keys that no query of a tile may see: a kernel that still loaded those tiles would
    # return NaN (0 * NaN = NaN in p @ v). 16-token tiles: trunk | step 1 | step 2 | step 3.
    T, z = 64, torch.zeros(2, 64, dtype=torch.int32)
    br = torch.tensor([0] * 16 + [1] * 16 + [2] * 16 + [3] * 16, dtype=torch.int32).expand(2, T).clone()
    doc = z.clone()
    br[1], doc[1, 32:] = 0, 1          # row 1: plain trunk, two documents of 32 tokens
    L = Layout(doc, (br > 0).int(), br)
    q, k, v = qkv(2, 2, 1, T, T)
    with torch.no_grad():
        k[0, :, 16:32], v[0, :, 16:32] = float("nan"), float("nan")  # step 1: siblings of steps 2, 3
        k[1, :, 0:16], v[1, :, 0:16] = float("nan"), float("nan")    # doc 0: before doc 1's keys
    o = attention(q, k, v, L, impl="triton")
    dq, = torch.autograd.grad(o, q, torch.ones_like(o))
    for t in (o, dq):  # sibling hole (row 0) and document start (row 1) skipped, causal too
        assert t[0, :, :16].isfinite().all() and t[0, :, 32:].isfinite().all() and t[1, :, 32:].isfinite().all()
    # dk/dv side: poisoned queries of steps 2 and 3 are skipped by the key tiles of step 1
    q, k, v = qkv(2, 2, 1, T, T)
    with torch.no_grad():
        q[0, :, 32:] = float("nan")
    dk, dv = torch.autograd.grad(attention(q, k, v, L, impl="triton"), (k, v), torch.ones(2, 2, T, 16))
    assert dk[0, :, 16:32].isfinite().all() and dv[0, :, 16:32].isfinite().all()


# -----------------------------------------------------------------------------
# GPU (bf16, real kernels)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_ref():
    # bf16 kernels vs the fp32 reference, held to (about) the error of bf16 SDPA on the same inputs
    dev = "cuda"
    L = npr_layout(2, 1000, seed=0, step=(20, 200)).to(dev)
    mk = lambda H, T: torch.randn(2, H, T, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(8, 1000), mk(2, 1000), mk(2, 1000)
    do = torch.randn_like(q)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = attention_ref(*ref, L)
    want = (o_ref, *torch.autograd.grad(o_ref, ref, do.float()))
    err = {}
    for impl in ("triton", "sdpa"):
        o = attention(q, k, v, L, impl=impl)
        got = (o, *torch.autograd.grad(o, (q, k, v), do))
        err[impl] = [(a.float() - b).abs().max().item() for a, b in zip(got, want)]
        assert all(not t.isnan().any() for t in got)
    assert all(t <= 2 * s + 1e-3 for t, s in zip(err["triton"], err["sdpa"])), err
    q_l, cache = _interleaved_cache(4, 3000, n_prefix=500, n_branch=4, steps=500)  # decode kernel
    q_l, cache = q_l.to(dev), cache.to(dev)
    q, k, v = (torch.randn(4, H, T, 128, device=dev, dtype=torch.bfloat16) for H, T in ((8, 4), (2, 3000), (2, 3000)))
    torch.testing.assert_close(attention(q, k, v, q_l, cache, impl="triton").float(),
                               attention_ref(q.float(), k.float(), v.float(), q_l, cache), atol=2e-2, rtol=2e-2)
