"""The attention rule and its two PyTorch paths (parallel_attention.py): the specification.

Invariants held here, on the reference ("ref"), SDPA + dense mask ("sdpa") and, where Triton imports,
the kernels ("triton", by Triton's interpreter on CPU; their own tests are in test_triton_attention.py):
- the mask is the module docstring's picture: a branch is blind to its siblings, the takeaway sees
  every step, docs and padding are isolated, keys up to the query's slot;
- SDPA == reference (outputs and gradients, GQA, decode-shaped queries against a strided cache);
- a query's output depends only on the keys the rule lets it see (siblings, later tokens, other docs);
- a packed row == each of its documents alone; the slot order of branch tokens is free;
- a query that sees nothing gives zeros, never NaN.
- the core (this module and model.py) imports and runs without Triton.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_parallel_attention.py -q
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import parallel_attention as pa
from helpers import grads, npr_layout, qkv
from parallel_attention import Layout, attention, attention_ref, attention_sdpa, visible_mask

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not importable")
IMPLS = ["ref", "sdpa", pytest.param("triton", marks=needs_triton)]


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


@pytest.mark.parametrize("impl", IMPLS)
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


def test_the_core_runs_without_triton():
    """Importing the core and the model loads no Triton (a CPU-only install); "auto" is SDPA on CPU;
    impl="triton" without triton says so."""
    code = ("import sys; sys.modules['triton'] = None; import parallel_attention as pa, model, torch\n"
            "q = torch.randn(1, 2, 5, 8); L = pa.Layout.causal(1, 5)\n"
            "assert torch.allclose(pa.attention(q, q, q, L), pa.attention_ref(q, q, q, L), atol=1e-5)\n"
            "assert pa.triton_kernels() is None and 'triton_attention' not in sys.modules\n"
            "try:\n    pa.attention(q, q, q, L, impl='triton')\nexcept RuntimeError as e:\n    print(e)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cannot import triton" in out.stdout


def test_dispatcher_auto_on_cpu_is_sdpa():
    L = npr_layout(1, 20, seed=0)
    q, k, v = qkv(1, 2, 1, 20, 20, grad=False)
    assert torch.equal(attention(q, k, v, L), attention_sdpa(q, k, v, L))
    with pytest.raises(ValueError):
        attention(q, k, v, L, impl="flash")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(3))
def test_output_depends_only_on_visible_keys(impl, seed):
    """Perturb the keys/values of a random subset of tokens: exactly the queries that may see one of
    them (by the rule) change; all others are bit-identical (siblings, later tokens, other docs)."""
    L = npr_layout(2, 48, seed, interleave=seed == 2)
    q, k, v = qkv(2, 4, 2, 48, 48, seed=seed, grad=False)
    hit = torch.rand(2, 48, generator=torch.Generator().manual_seed(seed)) < 0.15    # (B, Tk)
    k2, v2 = k.clone(), v.clone()
    k2[hit.nonzero(as_tuple=True)[0], :, hit.nonzero(as_tuple=True)[1]] += 1.0
    v2[hit.nonzero(as_tuple=True)[0], :, hit.nonzero(as_tuple=True)[1]] -= 2.0
    diff = (attention(q, k, v, L, impl=impl) - attention(q, k2, v2, L, impl=impl)).abs().amax((1, 3))  # (B, Tq)
    sees = (visible_mask(L) & hit[:, None, :]).any(-1)                                  # (B, Tq)
    assert sees.any() and (~sees).any()
    assert (diff[~sees] == 0).all()
    assert (diff[sees] > 1e-4).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_row_equals_each_document_alone(impl):
    L = npr_layout(1, 60, seed=11)
    q, k, v = qkv(1, 4, 2, 60, 60, seed=11, grad=False)
    o = attention(q, k, v, L, impl=impl)
    docs = L.doc[0].unique()
    assert (docs >= 0).sum() >= 2
    for d in docs.tolist():
        i = (L.doc[0] == d).nonzero()[:, 0]
        if d < 0:  # padding: zeros
            assert o[0, :, i].abs().max() == 0
            continue
        alone = Layout(torch.zeros(1, len(i), dtype=torch.int32), L.block[:, i], L.branch[:, i])
        o_d = attention(q[:, :, i], k[:, :, i], v[:, :, i], alone, impl=impl)
        torch.testing.assert_close(o[:, :, i], o_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_branch_slot_order_is_free(impl):
    """The sampler interleaves a block's branches in its cache: t t t | a b a b a | w w, with each
    branch's own tokens in causal order, gives every token the same output as the contiguous order."""
    blk, br = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 2, 2, 0, 0]    # contiguous: a a a b b
    perm = torch.tensor([0, 1, 2, 3, 6, 4, 7, 5, 8, 9])                          # interleaved order
    mk = lambda b, r: Layout(torch.zeros(1, 10, dtype=torch.int32), torch.tensor([b], dtype=torch.int32),
                             torch.tensor([r], dtype=torch.int32))
    L = mk(blk, br)
    L2 = mk([blk[i] for i in perm], [br[i] for i in perm])
    q, k, v = qkv(1, 2, 1, 10, 10, seed=3, grad=False)
    o = attention(q, k, v, L, impl=impl)
    o2 = attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], L2, impl=impl)
    torch.testing.assert_close(o2, o[:, :, perm], atol=1e-5, rtol=1e-5)


def test_plain_causal_layout_is_causal_sdpa():
    q, k, v = qkv(2, 4, 2, 20, 20, grad=False)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for impl in ("ref", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, Layout.causal(2, 20), impl=impl), want, atol=1e-5, rtol=1e-5)


def test_sdpa_mask_memo_follows_in_place_layout_edits():
    """The mask is memoised on the layout object (all layers share it); a KV cache rewrites its
    layout in place between steps, so an edit must give the new mask, not the stale one."""
    L = npr_layout(1, 30, seed=1, pad=False)
    q, k, v = qkv(1, 2, 1, 30, 30, grad=False)
    before = attention_sdpa(q, k, v, L)
    L.doc[0, 20:] = -1
    after = attention_sdpa(q, k, v, L)
    assert after[0, :, 20:].abs().max() == 0 and before[0, :, 20:].abs().max() > 0
    torch.testing.assert_close(after, attention_ref(q, k, v, L), atol=1e-5, rtol=1e-5)
    hit = pa.memo(L, None, "sdpa", lambda: None)
    assert hit is not None and torch.equal(hit[0][0, 0], visible_mask(L)[0] | hit[1][0, 0])
