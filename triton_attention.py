"""
Optional reading: the GPU fast path of parallel_attention.py, in Triton. The core (the rule, the
reference, SDPA) is correct without this file; `parallel_attention.attention` imports it only when
impl="triton" (or "auto" on CUDA) is chosen.

Contents:
    _sibling_holes / _layout_info    per-token tile-skipping metadata (host side, plain torch)
    _visible                         the kernels' copy of parallel_attention.visible (tested to agree)
    _attn_fwd                        forward, mask from metadata, saves the log-sum-exp
    _attn_bwd_preprocess/_dkdv/_dq   backward; dk, dv summed over each GQA group
    _attn_decode                     few queries per row vs a long KV cache (flash-decoding splits)
    attention_triton                 the entry point: decode kernel, or forward + autograd backward
FlashAttention-2 after the Triton fused-attention tutorial. Benchmark: python bench_attention.py.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from parallel_attention import _memo


# -----------------------------------------------------------------------------
# Tile skipping metadata (host side, plain torch, no GPU->CPU sync).
# Per query row: the key range [lo, hi) it may see (its document's keys up to its slot) and a "hole"
# [hole_lo, hole_hi) inside it made only of sibling-branch keys. A kernel tile takes the union of its
# rows' ranges and the intersection of their holes, and skips every key tile outside / inside them.
# All of it is per token, so it does not depend on the tile sizes the kernels use.

def _sibling_holes(doc, blk, br):
    """(B, T) key metadata -> four (B, T) int64 tensors, for token j of a well-ordered parallel
    section (consecutive tokens of one doc and block with branch > 0, branch ids non-decreasing):
    [a, b) = the earlier branches of its block (all siblings: invisible to j as a query) and
    [c, d) = the later branches (all blind to j as a key). Empty (0, 0) where unsure, e.g. interleaved."""
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)
    prev = lambda x: x.roll(1, 1)
    seg_cont = (br > 0) & (prev(br) > 0) & (doc == prev(doc)) & (blk == prev(blk)) & (idx > 0)
    run_cont = seg_cont & (br == prev(br))                     # same branch as the token before
    nbad = (seg_cont & (br < prev(br))).cumsum(1)             # branch order violations so far
    zero, last = torch.zeros_like(idx), idx == T - 1
    seg_start = torch.where(seg_cont, zero, idx).cummax(1).values
    run_start = torch.where(run_cont, zero, idx).cummax(1).values
    rev_cummin = lambda x: x.flip(1).cummin(1).values.flip(1)
    seg_end = rev_cummin(torch.where(seg_cont.roll(-1, 1) & ~last, T, idx + 1))
    run_end = rev_cummin(torch.where(run_cont.roll(-1, 1) & ~last, T, idx + 1))
    ok_a = (br > 0) & (nbad == nbad.gather(1, seg_start))      # ordered on [seg_start, j]
    ok_c = (br > 0) & (nbad == nbad.gather(1, seg_end - 1))    # ordered on [j, seg_end)
    return (torch.where(ok_a, seg_start, zero), torch.where(ok_a, run_start, zero),
            torch.where(ok_c, run_end, zero), torch.where(ok_c, seg_end, zero))


def _layout_info(q_layout, k_layout=None, holes=True):
    """-> q_info (B, 8, Tq), k_info (B, 8, Tk) int32 rows [doc, group, branch, slot, lo, hi, hole_lo,
    hole_hi]. doc: dead queries -2, dead keys -1 (equal docs = both live); group: the block of a
    branch token, else a sentinel that differs between queries and keys (equal groups = two branch
    tokens of one block). For queries, lo..hole_hi are key indices (forward and dq); for keys, query
    indices (dk/dv), known only for self-attention without slots (training), else the full range."""
    self_attn = k_layout is None and q_layout.slot is None
    k_layout = q_layout if k_layout is None else k_layout
    i64 = lambda t: t.to(torch.int64)
    qd, qb, qr, qs = i64(q_layout.doc), i64(q_layout.block), i64(q_layout.branch), i64(q_layout.slots())
    kd, kb, kr = i64(k_layout.doc), i64(k_layout.block), i64(k_layout.branch)
    (B, Tq), Tk = qd.shape, kd.shape[1]
    # documents: when the keys' docs are non-decreasing (padding aside), a doc's keys are one run
    cm = kd.clamp_min(-1).cummax(1).values.contiguous()
    mono = ((cm == kd) | (kd < 0)).all(1, keepdim=True)
    start = torch.where(mono, torch.searchsorted(cm, qd.contiguous()), 0)
    end = torch.where(mono, torch.searchsorted(cm, qd.contiguous(), right=True), Tk)
    lo, hi = start, torch.minimum(qs + 1, end).clamp(0, Tk)  # causal: keys up to the query's slot
    zq, zk = torch.zeros_like(qd), torch.zeros_like(kd)
    if holes:
        a, b, c, d = _sibling_holes(kd, kb, kr)
        # a key with the query's (doc, block, branch) has the query's siblings in front of it
        j = qs.clamp(0, Tk - 1)
        same = (kd.gather(1, j) == qd) & (kb.gather(1, j) == qb) & (kr.gather(1, j) == qr)
        h_lo, h_hi = torch.where(same, a.gather(1, j), zq), torch.where(same, b.gather(1, j), zq)
    else:
        h_lo, h_hi, c, d = zq, zq, zk, zk
    live = qd >= 0  # a dead query sees nothing: empty range, everything is a hole
    q_info = [torch.where(live, qd, -2), torch.where(qr > 0, qb, -2 ** 31 + 1), qr, qs,
              torch.where(live, lo, Tk), torch.where(live, hi, 0),
              torch.where(live, h_lo, 0), torch.where(live, h_hi, Tk)]
    kidx = torch.arange(Tk, device=kd.device).expand(B, Tk)
    if self_attn:  # key j is seen by queries j..end of its doc, minus its block's later branches
        k_lo, k_hi = kidx, torch.where(mono, torch.searchsorted(cm, kd.contiguous(), right=True), Tq)
    else:
        k_lo, k_hi, c, d = zk, torch.full_like(kd, Tq), zk, zk
    live = kd >= 0
    k_info = [torch.where(live, kd, -1), torch.where(kr > 0, kb, -2 ** 31), kr, kidx,
              torch.where(live, k_lo, Tq), torch.where(live, k_hi, 0),
              torch.where(live, c, 0), torch.where(live, d, Tq)]
    pack = lambda rows: torch.stack(rows, 1).to(torch.int32).contiguous()
    return pack(q_info), pack(k_info)


def _cached_layout_info(q_layout, k_layout, holes):
    return _memo(q_layout, k_layout, ("info", holes), lambda: _layout_info(q_layout, k_layout, holes))


# -----------------------------------------------------------------------------
# Triton kernels (FlashAttention-2, after the Triton fused-attention tutorial). The mask is computed
# on the fly from the (8, T) info rows above; key tiles outside [lo, hi) or inside the hole are skipped.

@triton.jit
def _tile_info(INFO, T, offs, live, T_other, BLOCK: tl.constexpr):
    # Metadata of the rows `offs` of one (8, T) info block (absent rows: doc -1), and the tile's
    # range over the other side: [lo, hi) = union of the rows' ranges, lo rounded down to a tile;
    # hole [h_lo, h_hi) = intersection of the rows' holes, rounded inwards to whole tiles.
    # The caller loops over [lo, h_lo) and [h_hi, hi): the tiles in the hole are skipped.
    doc = tl.load(INFO + offs, mask=live, other=-1)
    grp = tl.load(INFO + T + offs, mask=live, other=0)
    br = tl.load(INFO + 2 * T + offs, mask=live, other=0)
    slot = tl.load(INFO + 3 * T + offs, mask=live, other=0)
    hi = tl.max(tl.load(INFO + 5 * T + offs, mask=live, other=0), 0)
    lo = tl.minimum(tl.min(tl.load(INFO + 4 * T + offs, mask=live, other=T_other), 0), hi) // BLOCK * BLOCK
    h_lo = tl.cdiv(tl.max(tl.load(INFO + 6 * T + offs, mask=live, other=0), 0), BLOCK) * BLOCK
    h_hi = tl.min(tl.load(INFO + 7 * T + offs, mask=live, other=T_other), 0) // BLOCK * BLOCK
    h_lo = tl.minimum(tl.maximum(h_lo, lo), hi)
    h_hi = tl.maximum(tl.minimum(h_hi, hi), h_lo)
    return doc, grp, br, slot, lo, hi, h_lo, h_hi


@triton.jit
def _visible(q_doc, q_grp, q_br, q_slot, k_doc, k_grp, k_br, k_idx):
    # The kernels' copy of parallel_attention.visible, on the info rows of _layout_info (operands
    # shaped to broadcast): same live doc (dead queries -2, dead keys -1), causal by slot, and not two
    # different branches of one block (equal groups = two branch tokens of one block).
    # tests/test_triton_attention.py checks that it agrees with the Python rule.
    return (q_doc == k_doc) & (k_idx <= q_slot) & ((q_grp != k_grp) | (q_br == k_br))


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot,  # q (BLOCK_M, D), metadata (BLOCK_M,)
                    K, V, KI, stride_kt, stride_vt, Tk, qk_scale, lo, hi,
                    offs_n, offs_d, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs = start_n + offs_n
        in_k = offs < Tk
        k_doc = tl.load(KI + offs, mask=in_k, other=-1)  # absent keys: doc -1, never visible
        k_grp = tl.load(KI + Tk + offs, mask=in_k, other=0)
        k_br = tl.load(KI + 2 * Tk + offs, mask=in_k, other=0)
        kT = tl.load(K + offs[None, :] * stride_kt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                       k_doc[None, :], k_grp[None, :], k_br[None, :], offs[None, :])
        qk = tl.where(vis, qk, float("-inf"))
        # online softmax; m_safe keeps rows that have seen nothing yet at p = 0 instead of NaN
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs[:, None] * stride_vt + offs_d[None, :], mask=in_k[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QI, KI, qk_scale,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, Hq, Tq, Tk,
              GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr):
    # grid (query tiles, B * Hq); q head h reads kv head h // GROUP
    start_m, off_bh = tl.program_id(0), tl.program_id(1)
    b, h = off_bh // Hq, off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < Tq
    KI += b * 8 * Tk
    q_doc, q_grp, q_br, q_slot, lo, hi, h_lo, h_hi = _tile_info(QI + b * 8 * Tq, Tq, offs_m, in_q, Tk, BLOCK_N)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    K += b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V += b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # the key tiles before and after the hole of sibling-branch tiles
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                                    stride_vt, Tk, qk_scale, lo, h_lo, offs_n, offs_d, BLOCK_N, PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                                    stride_vt, Tk, qk_scale, h_hi, hi, offs_n, offs_d, BLOCK_N, PREC)
    # epilogue: rows that saw nothing give 0 and lse = +inf (so backward's exp2(s - lse) is 0 there)
    seen = l_i > 0
    l_i = tl.where(seen, l_i, 1.0)
    row = off_bh.to(tl.int64) * Tq + offs_m  # o, lse: contiguous (B, Hq, Tq[, D])
    tl.store(LSE + row, tl.where(seen, m_i + tl.math.log2(l_i), float("inf")), mask=in_q)
    tl.store(O + row[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=in_q[:, None])


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, n_rows, D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta = rowsum(o * do) over the (B * Hq * Tq, D) rows of the contiguous o and do
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    live = offs_m < n_rows
    ptrs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + offs_m, tl.sum(o * do, 1), mask=live)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, k_doc, k_grp, k_br, offs_n,  # k, v (BLOCK_N, D)
                         Q, DO, LSE, DELTA, QI, stride_qt, Tq, qk_scale, lo, hi,
                         offs_d, BLOCK_M: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < Tq
        q_doc = tl.load(QI + offs_m, mask=in_q, other=-1)
        q_grp = tl.load(QI + Tq + offs_m, mask=in_q, other=0)
        q_br = tl.load(QI + 2 * Tq + offs_m, mask=in_q, other=0)
        q_slot = tl.load(QI + 3 * Tq + offs_m, mask=in_q, other=0)
        qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=in_q[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=in_q, other=float("inf"))
        qkT = tl.dot(k, qT, input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        vis = _visible(q_doc[None, :], q_grp[None, :], q_br[None, :], q_slot[None, :],
                       k_doc[:, None], k_grp[:, None], k_br[:, None], offs_n[:, None])
        pT = tl.where(vis, tl.math.exp2(qkT - lse[None, :]), 0.0)
        do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=in_q[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, QI, KI, qk_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, Hq, Hkv, Tq, Tk,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):
    # grid (key tiles, B * Hkv): dk, dv of one key tile, summed over the GROUP q heads that read it
    start_n, off_bh = tl.program_id(0), tl.program_id(1)
    b, kvh = off_bh // Hkv, off_bh % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_k = offs_n < Tk
    QI += b * 8 * Tq
    k_doc, k_grp, k_br, _, lo, hi, h_lo, h_hi = _tile_info(KI + b * 8 * Tk, Tk, offs_n, in_k, Tq, BLOCK_M)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=in_k[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=in_k[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        Qh = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        row = (b * Hq + h).to(tl.int64) * Tq  # do, lse, delta: contiguous (B, Hq, Tq[, D])
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_doc, k_grp, k_br, offs_n, Qh, DO + row * D, LSE + row,
                                      DELTA + row, QI, stride_qt, Tq, qk_scale, lo, h_lo, offs_d, BLOCK_M, D, PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_doc, k_grp, k_br, offs_n, Qh, DO + row * D, LSE + row,
                                      DELTA + row, QI, stride_qt, Tq, qk_scale, h_hi, hi, offs_d, BLOCK_M, D, PREC)
    out = (off_bh.to(tl.int64) * Tk + offs_n)[:, None] * D + offs_d[None, :]  # dk, dv: contiguous
    scale = qk_scale * 0.6931471805599453  # ds/dk = softmax scale = qk_scale * ln 2
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot,  # q, do (BLOCK_M, D)
                       K, V, KI, stride_kt, stride_vt, Tk, qk_scale, lo, hi,
                       offs_n, offs_d, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs = start_n + offs_n
        in_k = offs < Tk
        k_doc = tl.load(KI + offs, mask=in_k, other=-1)
        k_grp = tl.load(KI + Tk + offs, mask=in_k, other=0)
        k_br = tl.load(KI + 2 * Tk + offs, mask=in_k, other=0)
        kT = tl.load(K + offs[None, :] * stride_kt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        vT = tl.load(V + offs[None, :] * stride_vt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                       k_doc[None, :], k_grp[None, :], k_br[None, :], offs[None, :])
        p = tl.where(vis, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, QI, KI, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, Hq, Tq, Tk,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
    # grid (query tiles, B * Hq): the same key tiles as the forward
    start_m, off_bh = tl.program_id(0), tl.program_id(1)
    b, h = off_bh // Hq, off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < Tq
    KI += b * 8 * Tk
    q_doc, q_grp, q_br, q_slot, lo, hi, h_lo, h_hi = _tile_info(QI + b * 8 * Tq, Tq, offs_m, in_q, Tk, BLOCK_N)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    row = off_bh.to(tl.int64) * Tq + offs_m  # do, lse, delta, dq: contiguous (B, Hq, Tq[, D])
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + row, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + row, mask=in_q, other=0.0)
    K += b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V += b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                            stride_vt, Tk, qk_scale, lo, h_lo, offs_n, offs_d, BLOCK_N, PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                            stride_vt, Tk, qk_scale, h_hi, hi, offs_n, offs_d, BLOCK_N, PREC)
    scale = qk_scale * 0.6931471805599453  # ds/dq = softmax scale
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


@triton.jit
def _attn_decode(Q, K, V, O, LSE, QI, KI, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, B, Hq, Hkv, Tq, Tk, SPLITS,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
    # grid (B * Hkv, SPLITS). The M dimension holds all GROUP x Tq (q head, query) pairs that read
    # kv head kvh, so each K/V tile is loaded once per kv head; SPLITS programs share the keys
    # (flash-decoding) and write partial (o, lse) that the host merges. No sibling holes here:
    # decode caches interleave the branches.
    off_bh, split = tl.program_id(0), tl.program_id(1)
    b, kvh = off_bh // Hkv, off_bh % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < GROUP * Tq
    h, t = kvh * GROUP + offs_m // Tq, offs_m % Tq  # row m = (q head h, query t)
    q_doc, q_grp, q_br, q_slot, lo, hi, _, _ = _tile_info(QI + b * 8 * Tq, Tq, t, in_q, Tk, BLOCK_N)
    chunk = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), SPLITS) * BLOCK_N
    s_lo = lo + split * chunk
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
                + offs_d[None, :], mask=in_q[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot,
                                    K + b.to(tl.int64) * stride_kb + kvh * stride_kh,
                                    V + b.to(tl.int64) * stride_vb + kvh * stride_vh, KI + b * 8 * Tk,
                                    stride_kt, stride_vt, Tk, qk_scale, s_lo, tl.minimum(hi, s_lo + chunk),
                                    offs_n, offs_d, BLOCK_N, PREC)
    seen = l_i > 0  # an empty split has lse = -inf: weight 0 in the merge
    l_i = tl.where(seen, l_i, 1.0)
    row = ((split * B + b) * Hq + h).to(tl.int64) * Tq + t  # O (SPLITS, B, Hq, Tq, D) fp32
    tl.store(LSE + row, tl.where(seen, m_i + tl.math.log2(l_i), float("-inf")), mask=in_q)
    tl.store(O + row[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=in_q[:, None])


# -----------------------------------------------------------------------------
# Launchers

# Tile sizes per kernel on CUDA, for bf16 and D = 128 on sm_90: chosen offline from ptxas (no register
# spills but ~140 bytes in dkdv, wgmma in all three); not yet tuned by timing. Under the interpreter
# every tile is 16, so that tiny test shapes still span several tiles and skip some.
CUDA_CONFIGS = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "dkdv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    "decode": dict(BLOCK_N=64, num_warps=4, num_stages=3),
}


def _config(kind, q):
    if not q.is_cuda:
        return dict(BLOCK_M=16, BLOCK_N=16)
    cfg = dict(CUDA_CONFIGS[kind])
    if q.shape[-1] <= 64:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    # fp32 (IEEE dots on CUDA cores) and D = 256 need smaller tiles to fit registers and shared memory
    shrink = int(q.dtype == torch.float32) + int(q.shape[-1] > 128)
    if shrink:
        cfg.update({k: max(16, v >> shrink) for k, v in cfg.items() if k.startswith("BLOCK")}, num_stages=2)
    return cfg


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]  # (b, h, t) strides; d is contiguous


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


def _fwd(q, k, v, q_info, k_info, scale):
    """-> o (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) fp32 in log2 units (+inf: empty row)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty(B, Hq, Tq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    cfg = _config("fwd", q)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    _attn_fwd[grid](q, k, v, o, lse, q_info, k_info, scale * 1.4426950408889634, *_strides(q, k, v),
                    Hq, Tq, Tk, GROUP=Hq // Hkv, D=D, PREC=_precision(q), **cfg)
    return o, lse


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_info, k_info, scale):
        o, lse = _fwd(q, k, v, q_info, k_info, scale)
        ctx.save_for_backward(q, k, v, o, lse, q_info, k_info)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_info, k_info = ctx.saved_tensors
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = torch.empty_like(lse)
        _attn_bwd_preprocess[(triton.cdiv(B * Hq * Tq, 64),)](o, do, delta, B * Hq * Tq, D=D, BLOCK_M=64)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        args = (q_info, k_info, ctx.scale * 1.4426950408889634, *_strides(q, k, v))
        kw = dict(GROUP=Hq // Hkv, D=D, PREC=_precision(q))
        cfg = _config("dkdv", q)
        _attn_bwd_dkdv[(triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)](
            q, k, v, do, dk, dv, lse, delta, *args, Hq, Hkv, Tq, Tk, **kw, **cfg)
        cfg = _config("dq", q)
        _attn_bwd_dq[(triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](
            q, k, v, do, dq, lse, delta, *args, Hq, Tq, Tk, **kw, **cfg)
        return dq, dk, dv, None, None, None


def _num_splits(q, Hkv, Tk, block_n):
    """Flash-decoding: split the keys so that B * Hkv * splits programs fill the GPU about twice."""
    if not q.is_cuda:
        return 2  # exercise the merge under the interpreter
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, q.shape[0] * Hkv), triton.cdiv(Tk, 8 * block_n), 16))


def _decode(q, k, v, q_info, k_info, scale, splits=None):
    """Few queries per row against a long cache (forward only): (B, Hq, Tq, D) in q's dtype."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = _config("decode", q)
    cfg["BLOCK_M"] = max(16, triton.next_power_of_2(Hq // Hkv * Tq))
    if q.is_cuda and cfg["BLOCK_M"] >= 64:
        cfg["num_warps"] = 8  # 4 warps spill at 64+ rows
    splits = splits or _num_splits(q, Hkv, Tk, cfg["BLOCK_N"])
    o = torch.empty(splits, B, Hq, Tq, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, B, Hq, Tq, device=q.device, dtype=torch.float32)
    _attn_decode[(B * Hkv, splits)](q, k, v, o, lse, q_info, k_info, scale * 1.4426950408889634,
                                    *_strides(q, k, v), B, Hq, Hkv, Tq, Tk, splits,
                                    GROUP=Hq // Hkv, D=D, PREC=_precision(q), **cfg)
    if splits > 1:  # merge the partial softmaxes: weights 2^lse_s / sum_s 2^lse_s (0 if all empty)
        w = torch.softmax(lse * 0.6931471805599453, dim=0).nan_to_num(0.0)
        o = (w[..., None] * o).sum(0, keepdim=True)
    return o[0].to(q.dtype)


def attention_triton(q, k, v, q_layout, k_layout=None, scale=None):
    """The Triton path: the decode kernel for a few queries per row when no gradient is needed,
    else the forward kernel inside an autograd.Function with its backward kernels."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0, f"{Hq} q heads do not share {Hkv} kv heads evenly"
    scale = D ** -0.5 if scale is None else scale
    if D < 16 or D & (D - 1):  # other head dims (tiny test models): zero-pad, no dot product changes
        pad = lambda t: F.pad(t, (0, max(16, triton.next_power_of_2(D)) - D))
        return attention_triton(pad(q), pad(k), pad(v), q_layout, k_layout, scale)[..., :D]
    assert q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype} {k.dtype} {v.dtype}"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # any (b, h, t) strides
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grad and Tq <= 16 and Hq // Hkv * Tq <= 128:
        q_info, k_info = _cached_layout_info(q_layout, k_layout, holes=False)
        return _decode(q, k, v, q_info, k_info, scale)
    q_info, k_info = _cached_layout_info(q_layout, k_layout, holes=True)
    return _Attention.apply(q, k, v, q_info, k_info, scale)
