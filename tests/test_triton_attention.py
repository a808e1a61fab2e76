"""The Triton kernels (triton_attention.py, optional reading) against the spec (parallel_attention.py).

Invariants held here, run by Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1;
tiles and blocks are 16 tokens there, so tiny shapes span several tiles):
- the kernels' copy of the rule (`_visible` on `token_info`'s rows) == parallel_attention.visible
  on random packed layouts (docs, a shared prefix, blocks of 2-4 branches, serial runs, padding,
  interleaved branches, queries against a cache), and every visible key lies in decode's key range;
- an edit of parallel_attention.visible alone (an ablation) is refused by the Triton path, which
  checks its copy once per version of the rule, and "auto" falls back to SDPA saying so;
- the tile classes (empty / partial / full per query tile x key tile) == a brute-force mask, and
  the tile lists hold exactly those tiles; empty tiles are never loaded, full tiles skip the mask;
- kernel == reference: forward, backward (dq, dk, dv) and decode, fp32 here, bf16 on CUDA
  (`-m cuda`, skipped without a GPU); padding rows give zeros and finite gradients.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_triton_attention.py -q
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import parallel_attention as pa  # noqa: E402
import triton_attention as ta  # noqa: E402
from parallel_attention import Layout, attention, attention_ref, visible_mask  # noqa: E402
from helpers import grads, qkv  # noqa: E402


def random_layout(B, T, seed, steps=(1, 5), unit=1, interleave=None, pad=True):
    """Rows of packed docs: a shared prefix, then serial trunk runs and blocks of 2-4 branches of
    ragged length (contiguous or interleaved, block ids not always 1, 2, ...), padding at the end.
    unit: every run a multiple of it (tile-aligned sections); interleave: None = at random."""
    g = torch.Generator().manual_seed(seed)
    n = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
    rows = []
    for _ in range(B):
        toks, d = [], 0
        while len(toks) < T:
            toks += [(d, 0, 0)] * (unit * n(1, 5))                 # the prompt: a shared prefix
            blk = n(0, 3)
            for _ in range(n(1, 3)):
                if n(0, 2) == 0:                                   # a serial run: trunk only
                    toks += [(d, 0, 0)] * (unit * n(1, 6))
                    continue
                blk += n(1, 2)
                run = [(d, blk, r) for r in range(1, n(2, 4) + 1) for _ in range(unit * n(*steps))]
                if n(0, 1) if interleave is None else interleave:
                    run = [run[i] for i in torch.randperm(len(run), generator=g)]
                toks += [(d, blk, 0)] * (unit * n(0, 2)) + run + [(d, blk, 0)] * (unit * n(1, 3))
            d += 1
        p = unit * n(0, 4) if pad else 0
        rows.append(toks[:T - p] + [(-1, 0, 0)] * p)
    t = torch.tensor(rows, dtype=torch.int32)
    return Layout(t[..., 0].contiguous(), t[..., 1].contiguous(), t[..., 2].contiguous())


def cache_queries(L, first, n):
    """Queries at slots first..first+n-1 of the cache L (a prefill chunk / decode step)."""
    sl = torch.arange(first, first + n, dtype=torch.int32).expand(L.doc.shape[0], n).contiguous()
    return Layout(L.doc[:, first:first + n], L.block[:, first:first + n], L.branch[:, first:first + n], sl)


# -----------------------------------------------------------------------------
# The kernels' copy of the rule == the Python rule, and the check that holds it on every device

RULE, KERNEL_MASK = pa.visible, ta.kernel_mask    # as imported, whatever a test patches


def assert_kernels_apply_rule(q_layout, k_layout=None):
    got, in_range = ta.kernel_mask(q_layout, k_layout)
    want = visible_mask(q_layout, k_layout)
    assert torch.equal(got, want) and not (want & ~in_range).any()   # decode's key range holds every visible key


@pytest.mark.parametrize("seed", range(5))
def test_kernel_rule_agrees_with_python_rule(seed):
    L = random_layout(3, 40, seed)
    assert (L.branch > 0).any() and ((L.branch == 0) & (L.doc >= 0)).any()
    assert_kernels_apply_rule(L)
    # queries with slots against a cache with empty slots (prefill chunk / decode)
    L.doc[:, 36:] = -1
    idx = torch.randperm(36, generator=torch.Generator().manual_seed(seed))[:7].sort().values
    sl = idx.int().expand(3, 7).contiguous()
    Q = Layout(L.doc[:, idx], L.block[:, idx], L.branch[:, idx], sl)
    want = visible_mask(Q, L)
    assert want.any() and not want.all()
    assert_kernels_apply_rule(Q, L)


def siblings_see_each_other(q_doc, q_block, q_branch, q_slot, k_doc, k_block, k_branch, k_slot):
    """An ablation: no branch isolation, the steps of a block see each other."""
    return (k_doc >= 0) & (q_doc == k_doc) & (k_slot <= q_slot)


def trunk_blind_to_steps(q_doc, q_block, q_branch, q_slot, k_doc, k_block, k_branch, k_slot):
    """An ablation that hides more: a block's trunk (plans, takeaway) does not see its steps."""
    hidden = (q_block == k_block) & (q_branch == 0) & (k_branch > 0)
    return RULE(q_doc, q_block, q_branch, q_slot, k_doc, k_block, k_branch, k_slot) & ~hidden


def test_the_rule_check_passes_the_rule_once(monkeypatch):
    """The kernels pass the check under the rule as it is; it runs once per version of the rule
    (a new function object, e.g. a reloaded module, is checked again), not once per call."""
    assert ta.rule_mismatch(torch.device("cpu")) is None
    calls = []
    monkeypatch.setattr(ta, "kernel_mask", lambda *a: calls.append(1) or KERNEL_MASK(*a))
    monkeypatch.setattr(pa, "visible", lambda *a: RULE(*a))    # the same rule, a new version
    L = random_layout(1, 30, seed=3)
    q, k, v = qkv(1, 2, 1, 30, 30, grad=False)
    for _ in range(2):
        out = attention(q, k, v, L, impl="triton")
        torch.testing.assert_close(out, attention_ref(q, k, v, L), atol=1e-4, rtol=1e-4)
    assert len(calls) == 1 and ta.kernels_hold_rule(q.device) and len(calls) == 1


@pytest.mark.parametrize("ablation", [siblings_see_each_other, trunk_blind_to_steps])
def test_an_ablation_of_the_rule_is_refused_by_the_kernels_and_auto_falls_back(monkeypatch, ablation):
    """Edit parallel_attention.visible alone: the Triton path (tile lists from the new rule, element
    mask from its old copy) refuses loudly instead of mixing them; "auto", which picks Triton on CUDA,
    runs SDPA instead and warns once (ta.kernels_hold_rule decides it there); SDPA and the reference follow
    the new rule. The rule restored, the kernels run again."""
    L = random_layout(2, 40, seed=4)
    q, k, v = qkv(2, 2, 1, 40, 40, grad=False)
    before = visible_mask(L)
    monkeypatch.setattr(ta, "_WARNED", set())
    monkeypatch.setattr(pa, "visible", ablation)
    assert not torch.equal(visible_mask(L), before)           # the ablation matters on this layout
    with pytest.raises(RuntimeError, match=r"applies another rule than parallel_attention\.visible.*impl='sdpa'"):
        attention(q, k, v, L, impl="triton")
    with pytest.warns(RuntimeWarning, match="impl='auto' runs SDPA"):
        assert not ta.kernels_hold_rule(q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # said once, not on every layer of every step
        assert not ta.kernels_hold_rule(q.device)
    torch.testing.assert_close(attention(q, k, v, L, impl="sdpa"), attention_ref(q, k, v, L), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(pa, "visible", RULE)
    assert ta.kernels_hold_rule(q.device)
    torch.testing.assert_close(attention(q, k, v, L, impl="triton"), attention_ref(q, k, v, L), atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# Tile classes and lists against a brute-force mask

def brute_classes(q_layout, k_layout, tile):
    """(B, nQ, nK): 0 if no pair of the two tiles is visible, 2 if all are, else 1."""
    vis = visible_mask(q_layout, k_layout)
    B, Tq, Tk = vis.shape
    nQ, nK = -(-Tq // tile), -(-Tk // tile)
    v = F.pad(vis, (0, nK * tile - Tk, 0, nQ * tile - Tq)).view(B, nQ, tile, nK, tile)
    return torch.where(v.all(4).all(2), 2, torch.where(v.any(4).any(2), 1, 0)).to(torch.int8)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tile", [16, 32])
def test_tile_classes_match_brute_force(seed, tile, monkeypatch):
    # ragged and interleaved layouts, docs out of order, queries with slots against a cache; chunks
    # of a few query tiles (as at long T); T not a multiple of the tile
    monkeypatch.setattr(ta, "CLASSIFY_PAIRS", 3 * tile * tile * 13)
    L = random_layout(3, 200, seed)
    if seed == 2:
        L.doc[0] = L.doc[0].flip(0)
    for q_l, k_l in ((L, None), (cache_queries(L, 150, 50), L)):
        cls = ta.tile_classes(q_l, k_l, tile)
        assert torch.equal(cls, brute_classes(q_l, k_l, tile))
        assert (cls == 0).any() and (cls == 1).any()


@pytest.mark.parametrize("seed", range(2))
def test_tile_classes_full_tiles(seed):
    # sections in whole tiles: full tiles (a trunk before a block, a branch's earlier tiles)
    L = random_layout(2, 256, seed, steps=(1, 2), unit=16, interleave=False)
    cls = ta.tile_classes(L, None, 16)
    assert torch.equal(cls, brute_classes(L, None, 16)) and (cls == 2).sum() > 10


def test_tile_lists():
    L = random_layout(2, 100, seed=5)
    cls = ta.tile_classes(L, None, 16)
    kv_num, kv_idx, q_num, q_idx = ta.tile_lists(L, None, 16)
    for c, num, idx in ((cls, kv_num, kv_idx), (cls.transpose(1, 2), q_num, q_idx)):
        for b in range(2):
            for i in range(c.shape[1]):
                for part, want in ((0, 1), (1, 2)):  # partial tiles, full tiles: ascending
                    listed = idx[b, part, i, :num[b, part, i]].tolist()
                    assert listed == torch.nonzero(c[b, i] == want).flatten().tolist()


def test_tile_lists_memo_sees_in_place_edits():
    L = random_layout(1, 30, seed=1)
    out = attention(*qkv(1, 2, 1, 30, 30, grad=False), L, impl="triton")
    L.doc[0, 20:] = -1  # e.g. the KV cache metadata rewritten in place: new lists, not the cached ones
    q, k, v = qkv(1, 2, 1, 30, 30, grad=False)
    torch.testing.assert_close(attention(q, k, v, L, impl="triton"), attention_ref(q, k, v, L), atol=1e-4, rtol=1e-4)
    assert not torch.equal(out, attention_ref(q, k, v, L))


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


@pytest.mark.parametrize("seed,Hq,Hkv,T,D,kw", [
    (0, 4, 2, 70, 16, {}),                                  # ragged, padding, GQA, T % 16 != 0
    (1, 2, 2, 96, 32, dict(steps=(1, 2), unit=16, interleave=False)),  # whole tiles: full ones
    (2, 3, 1, 60, 16, dict(interleave=True)),               # interleaved branches, 3 q heads per kv head
    (3, 2, 1, 110, 16, dict(steps=(9, 24), interleave=False)),  # long steps: boundaries inside tiles
])
def test_kernel_matches_ref(seed, Hq, Hkv, T, D, kw):
    L = random_layout(2, T, seed, **kw)
    q, k, v = qkv(2, Hq, Hkv, T, T, D=D, seed=seed)
    _check(q, k, v, L)


def test_kernel_blocks_smaller_than_tiles(monkeypatch):
    # 32-token tiles read as two 16-row / 16-key blocks each (on CUDA: 128-token tiles, 32..128 blocks)
    monkeypatch.setattr(ta, "TILE", 32)
    L = random_layout(1, 100, seed=6, steps=(4, 12), interleave=False)
    q, k, v = qkv(1, 2, 1, 100, 100, seed=6)
    _check(q, k, v, L)


def test_kernel_strided_inputs_odd_head_dim():
    # q/k/v as (B, T, H, D) transposed views, as the model passes them; D = 24 is zero-padded to 32
    L = random_layout(1, 40, seed=5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, H, 24, generator=g).transpose(1, 2).requires_grad_() for H in (4, 2, 2))
    _check(q, k, v, L)


def test_kernel_prefill_against_cache():
    # 20 queries (> 16: the forward kernel, with grads) at slots 30..49 of a 60-slot cache
    L = random_layout(2, 60, seed=7, pad=False)
    L.doc[:, 50:] = -1                                      # empty cache slots at the end
    q, k, v = qkv(2, 4, 2, 20, 60, seed=7)
    _check(q, k, v, cache_queries(L, 30, 20), L)


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
        o = ta._decode(q, k, v, *ta.token_info(q_l, cache), 16 ** -0.5, splits=splits)
    assert not o.isnan().any()
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    assert o[1, :, 0].abs().max() == 0


def test_fully_masked_rows_give_zeros_and_finite_grads():
    L = random_layout(2, 30, seed=2)
    L.doc[0, :] = -1          # a row that is all padding
    L.doc[1, 10:14] = 7       # a short doc mid-row (docs out of order)
    L.doc[1, 20:] = -1
    q, k, v = qkv(2, 2, 1, 30, 30)
    o = attention(q, k, v, L, impl="triton")
    assert o[0].abs().max() == 0 and o[1, :, 20:].abs().max() == 0
    _check(q, k, v, L)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows
def test_kernels_never_load_empty_tiles():
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
    for t in (o, dq):  # sibling tiles (row 0) and the other document (row 1) skipped, causal too
        assert t[0, :, :16].isfinite().all() and t[0, :, 32:].isfinite().all() and t[1, :, 32:].isfinite().all()
    # dk/dv side: poisoned queries of steps 2 and 3 are skipped by the key tiles of step 1
    q, k, v = qkv(2, 2, 1, T, T)
    with torch.no_grad():
        q[0, :, 32:] = float("nan")
    dk, dv = torch.autograd.grad(attention(q, k, v, L, impl="triton"), (k, v), torch.ones(2, 2, T, 16))
    assert dk[0, :, 16:32].isfinite().all() and dv[0, :, 16:32].isfinite().all()


def test_full_tiles_skip_the_mask(monkeypatch):
    # lists that call every tile pair "full" on a causal layout: kernels that skip the mask on full
    # tiles give attention over all keys (forward and backward); kernels that still applied it, causal
    monkeypatch.setattr(ta, "tile_classes", lambda q, k=None, tile=None: torch.full((1, 4, 4), 2, dtype=torch.int8))
    q, k, v = qkv(1, 2, 2, 64, 64)
    o = attention(q, k, v, Layout.causal(1, 64), impl="triton")
    want = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    torch.testing.assert_close(o, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads(o, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


# -----------------------------------------------------------------------------
# GPU (bf16, real kernels)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_ref():
    # bf16 kernels vs the fp32 reference, held to (about) the error of bf16 SDPA on the same inputs
    dev = "cuda"
    L = random_layout(2, 1000, seed=0, steps=(20, 200)).to(dev)
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
