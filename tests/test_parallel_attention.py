"""parallel_attention: the spec (visible_mask, attention_ref, attention_sdpa) and the Triton kernels
(run by Triton's interpreter on CPU, 16 x 16 tiles, so tiny shapes span several tiles)."""
import pytest
import torch

import parallel_attention as pa
from parallel_attention import Layout, attention, attention_ref, attention_sdpa, visible_mask

needs_triton = pytest.mark.skipif(not pa.HAS_TRITON, reason="triton not importable")


def npr_layout(B, T, seed, max_branches=5, pad=True, interleave=False, step=(1, 9)):
    """Packed rows of NPR documents: prompt trunk, then blocks of [guideline trunk, 1..max_branches
    steps of uneven length, takeaway trunk]; optional padding (doc -1) at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    n = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
    rows = []
    for _ in range(B):
        toks, d = [], 0
        while len(toks) < T:
            toks += [(d, 0, 0)] * n(1, 6)
            for blk in range(1, n(1, 2) + 1):
                toks += [(d, blk, 0)] * n(0, 3)
                steps = [(d, blk, r) for r in range(1, n(1, max_branches) + 1) for _ in range(n(*step))]
                if interleave:  # branches not contiguous: the kernels must not assume they are
                    steps = [steps[i] for i in torch.randperm(len(steps), generator=g)]
                toks += steps + [(d, blk, 0)] * n(1, 4)
            d += 1
        p = n(0, 5) if pad else 0
        rows.append(toks[:T - p] + [(-1, 0, 0)] * p)
    t = torch.tensor(rows, dtype=torch.int32)  # (B, T, 3)
    return Layout(doc=t[..., 0].contiguous(), block=t[..., 1].contiguous(), branch=t[..., 2].contiguous())


def qkv(B, Hq, Hkv, Tq, Tk, D=16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda H, T: torch.randn(B, H, T, D, generator=g).requires_grad_(grad)
    return mk(Hq, Tq), mk(Hkv, Tk), mk(Hkv, Tk)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


# -----------------------------------------------------------------------------
# The spec

def test_visible_mask_picture():
    # the module docstring's picture: trunk t t, block 1 with steps a a | b b, takeaway w
    L = Layout(doc=torch.zeros(1, 7, dtype=torch.int32), block=torch.tensor([[0, 0, 1, 1, 1, 1, 0]]),
               branch=torch.tensor([[0, 0, 1, 1, 2, 2, 0]]))
    picture = ["x......", "xx.....", "xxx....", "xxxx...", "xx..x..", "xx..xx.", "xxxxxxx"]
    want = torch.tensor([[c == "x" for c in row] for row in picture])
    assert torch.equal(visible_mask(L)[0], want)


def test_visible_mask_docs_padding_and_slots():
    L = Layout(doc=torch.tensor([[0, 0, 1, 1, -1]]), block=torch.zeros(1, 5, dtype=torch.int32),
               branch=torch.zeros(1, 5, dtype=torch.int32))
    m = visible_mask(L)[0]
    assert m[3].tolist() == [False, False, True, True, False]  # only its own doc
    assert not m[4].any() and not m[:, 4].any()                # padding sees / is seen by nothing
    q = Layout(doc=torch.tensor([[1]]), block=torch.tensor([[0]]), branch=torch.tensor([[0]]),
               slot=torch.tensor([[2]]))
    assert visible_mask(q, L)[0, 0].tolist() == [False, False, True, False, False]  # k index <= slot


def test_sdpa_matches_ref_with_grads():
    L = npr_layout(2, 40, seed=3)
    L.doc[1, :] = -1  # a whole dead row too
    q, k, v = qkv(2, 4, 2, 40, 40)
    o_ref, o = attention_ref(q, k, v, L), attention_sdpa(q, k, v, L)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 2), (3, 1)])
def test_sdpa_decode_with_gqa_matches_ref(Hq, Hkv):
    """Decode-shaped queries (a few per row, at their slots) against a strided cache view: the
    SDPA path folds the query heads of a kv head into its rows; same result and grads as the spec."""
    K = npr_layout(2, 40, seed=5, pad=False)
    Q = Layout(doc=K.doc[:, -3:].clone(), block=K.block[:, -3:].clone(), branch=K.branch[:, -3:].clone(),
               slot=torch.tensor([[37, 38, 39]] * 2, dtype=torch.int32))
    Q.doc[1, 1] = -1                                   # a padding query: sees nothing, gives 0
    q, _, _ = qkv(2, Hq, Hkv, 3, 40, seed=2)
    big = torch.randn(2, Hkv, 64, 16, generator=torch.Generator().manual_seed(4))
    k = big[:, :, :40].clone().requires_grad_()
    v = (big[:, :, :40] * 0.5).clone().requires_grad_()
    kk, vv = torch.zeros(2, Hkv, 64, 16), torch.zeros(2, Hkv, 64, 16)    # the cache: k, v are views
    kk, vv = kk.index_copy(2, torch.arange(40), k), vv.index_copy(2, torch.arange(40), v)
    o_ref, o = attention_ref(q, k, v, Q, K), attention_sdpa(q, kk[:, :, :40], vv[:, :, :40], Q, K)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    assert (o[1, :, 1] == 0).all()
    for a, b in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["ref", "sdpa", pytest.param("triton", marks=needs_triton)])
def test_branch_is_blind_to_siblings(impl):
    # t t | a a a | b b | w w: changing a's keys/values changes nothing for b, but changes w
    L = Layout(doc=torch.zeros(1, 9, dtype=torch.int32), block=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]]),
               branch=torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 0]]))
    q, k, v = qkv(1, 2, 1, 9, 9, grad=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2:5] += 1.0
    v2[:, :, 2:5] -= 2.0
    o1, o2 = attention(q, k, v, L, impl=impl), attention(q, k2, v2, L, impl=impl)
    torch.testing.assert_close(o1[:, :, 5:7], o2[:, :, 5:7], atol=0, rtol=0)  # branch b: identical
    assert (o1[:, :, 7:] - o2[:, :, 7:]).abs().min() > 1e-3                   # takeaway: changed


def test_dispatcher_auto_on_cpu_is_sdpa():
    L = npr_layout(1, 20, seed=0)
    q, k, v = qkv(1, 2, 1, 20, 20, grad=False)
    assert torch.equal(attention(q, k, v, L), attention_sdpa(q, k, v, L))
    with pytest.raises(ValueError):
        attention(q, k, v, L, impl="flash")


# -----------------------------------------------------------------------------
# Tile-skipping metadata: every skipped (query, key) pair must be invisible

def _assert_sound(q_layout, k_layout=None):
    q_info, k_info = pa._layout_info(q_layout, k_layout)
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
    a = pa._cached_layout_info(L, None, True)
    assert pa._cached_layout_info(L, None, True) is a
    L.doc[0, 20:] = -1  # e.g. the KV cache metadata rewritten in place
    b = pa._cached_layout_info(L, None, True)
    assert b is not a and torch.equal(b[0], pa._layout_info(L)[0])


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


@needs_triton
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


@needs_triton
def test_kernel_strided_inputs_odd_head_dim():
    # q/k/v as (B, T, H, D) transposed views, as the model passes them; D = 24 is zero-padded to 32
    L = npr_layout(1, 40, seed=5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, H, 24, generator=g).transpose(1, 2).requires_grad_() for H in (4, 2, 2))
    _check(q, k, v, L)


@needs_triton
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


@needs_triton
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
        o = pa._decode(q, k, v, *pa._layout_info(q_l, cache, holes=False), 16 ** -0.5, splits=splits)
    assert not o.isnan().any()
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    assert o[1, :, 0].abs().max() == 0



@needs_triton
def test_fully_masked_rows_give_zeros_and_finite_grads():
    L = npr_layout(2, 30, seed=2)
    L.doc[0, :] = -1          # a row that is all padding
    L.doc[1, 10:14] = 7       # a short doc mid-row (docs out of order: no document skipping)
    L.doc[1, 20:] = -1
    q, k, v = qkv(2, 2, 1, 30, 30)
    o = attention(q, k, v, L, impl="triton")
    assert o[0].abs().max() == 0 and o[1, :, 20:].abs().max() == 0
    _check(q, k, v, L)


@needs_triton
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
@pytest.mark.skipif(not (torch.cuda.is_available() and pa.HAS_TRITON), reason="needs CUDA")
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
