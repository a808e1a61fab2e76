"""
Triton kernels for branch-isolated attention (optional reading: parallel_attention.py states the rule
and holds the reference; this file makes it fast on a GPU, and checks that its kernels apply that
rule before impl="auto" runs them).

The rule (parallel_attention.visible) is applied at two granularities:
- per tile pair, once per batch on the host (`tile_classes`, plain torch, no GPU->CPU sync): a
  (query tile, key tile) pair of TILE x TILE tokens is EMPTY (no visible pair: never loaded), FULL
  (every pair visible: no mask arithmetic) or PARTIAL (the mask is evaluated per element), as
  FlexAttention's block mask does. The kernels loop only over the listed tiles (`tile_lists`).
  Their BLOCK_M / BLOCK_N divide TILE, so one set of lists serves every tuned configuration.
- per element, inside the kernels (`_visible`), on partial tiles only. That is the kernels' own copy
  of the rule, on token_info's encoding: `rule_mismatch` compares it with the rule on a small random
  layout before the kernels first run (once per version of the rule) and attention_triton refuses
  to run when they differ, so an ablation that edits only `visible` cannot get new tile lists with
  the old element mask.

  One document, TILE = 4 tokens: trunk t, block of 2 steps a, b, takeaway w (F full, P partial, . empty)

            keys: t  a  b  w
    query tiles t P  .  .  .
                a F  P  .  .
                b F  .  P  .        <- b never loads a's keys
                w F  F  F  P

Contents: token metadata and tile lists (torch) -> kernels (FlashAttention-2 after the Triton fused-
attention tutorial: exp2 with the softmax scale folded in, fp32 accumulators):
    _attn_fwd                  forward over the listed key tiles, saves the log-sum-exp (log2 units)
    _attn_bwd_preprocess       delta = rowsum(o * do)
    _attn_bwd_dkdv             dk, dv of a key tile over its listed query tiles, summed over a GQA group
    _attn_bwd_dq               dq of a query tile over the forward's key tiles
    _attn_decode               few queries per row vs a long KV cache (flash-decoding splits)
    _mask                      the element mask alone (the rule check's probe)
-> the autotune sets -> launchers, the autograd Function -> the rule check (`rule_mismatch`, and
`kernels_hold_rule`: where impl="auto" falls back to SDPA, saying so once) -> `attention_triton`.

On CUDA the autotuner times a few (BLOCK_M, BLOCK_N, warps, stages) per head dim, GQA group, dtype
and length (rounded up to a power of two) on first use: a few seconds per new key, then cached.
Under the interpreter (tests) there is one configuration and no timing.
"""
import os
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import parallel_attention as pa   # pa.visible read at each call: the rule as it is now, not at import

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are defined
# Tokens per tile of the tile lists. Under the interpreter 16, so that tiny test shapes span several
# tiles; the tests also run with 32 (two 16-row blocks per tile).
TILE = 16 if INTERPRET else 128
LOG2E = 1.4426950408889634
CLASSIFY_PAIRS = 1 << 25  # (query, key) pairs per chunk of tile_classes (memory: a few bytes each)


# -----------------------------------------------------------------------------
# Per-token metadata for the kernels' element mask, and the tile lists

def token_info(q_layout, k_layout=None):
    """-> q_info (B, 6, Tq), k_info (B, 3, Tk) int32 rows for the kernels:
    queries [doc, group, branch, slot, lo, hi], keys [doc, group, branch]. doc: dead queries -2,
    dead keys -1 (equal docs = both live); group: the block of a branch token, else a sentinel that
    differs between queries and keys (equal groups = two branch tokens of one block). [lo, hi): the
    keys a query may see at most (its document's keys up to its slot); the decode kernel's range."""
    k_layout = q_layout if k_layout is None else k_layout
    i64 = lambda t: t.to(torch.int64)
    qd, qb, qr, qs = i64(q_layout.doc), i64(q_layout.block), i64(q_layout.branch), i64(q_layout.slots())
    kd, kb, kr = i64(k_layout.doc), i64(k_layout.block), i64(k_layout.branch)
    (B, Tq), Tk = qd.shape, kd.shape[1]
    # documents: when the keys' docs are non-decreasing (padding aside), a doc's keys are one run
    cm = kd.clamp_min(-1).cummax(1).values.contiguous()
    mono = ((cm == kd) | (kd < 0)).all(1, keepdim=True)
    lo = torch.where(mono, torch.searchsorted(cm, qd.contiguous()), 0)
    end = torch.where(mono, torch.searchsorted(cm, qd.contiguous(), right=True), Tk)
    hi = torch.minimum(qs + 1, end).clamp(0, Tk)
    live = qd >= 0  # a dead query sees nothing: empty range
    q_info = [torch.where(live, qd, -2), torch.where(qr > 0, qb, -2 ** 31 + 1), qr, qs,
              torch.where(live, lo, Tk), torch.where(live, hi, 0)]
    k_info = [torch.where(kd >= 0, kd, -1), torch.where(kr > 0, kb, -2 ** 31), kr]
    pack = lambda rows: torch.stack(rows, 1).to(torch.int32).contiguous()
    return pack(q_info), pack(k_info)


def tile_classes(q_layout, k_layout=None, tile=None):
    """(B, nQ, nK) int8 per (query tile, key tile): 0 = no visible pair, 1 = some, 2 = all (tokens
    past the end count as invisible). Evaluated with the rule itself (parallel_attention.visible) on
    every pair, a few query tiles at a time: Tq x Tk comparisons once per batch, shared by all layers."""
    tile = tile or TILE
    k_layout = q_layout if k_layout is None else k_layout
    (B, Tq), Tk = q_layout.doc.shape, k_layout.doc.shape[1]
    nQ, nK = -(-Tq // tile), -(-Tk // tile)
    pad = lambda t, n, v: F.pad(t, (0, n * tile - t.shape[1]), value=v)  # to whole tiles, dead (doc -1)
    qd, qb, qr, qs = (pad(t, nQ, v)[:, :, None] for t, v in ((q_layout.doc, -1), (q_layout.block, 0),
                                                              (q_layout.branch, 0), (q_layout.slots(), 0)))
    kd, kb, kr = (pad(t, nK, v)[:, None, :] for t, v in ((k_layout.doc, -1), (k_layout.block, 0),
                                                          (k_layout.branch, 0)))
    ks = torch.arange(nK * tile, device=kd.device)[None, None, :]
    step = max(1, CLASSIFY_PAIRS // (B * tile * nK * tile))  # query tiles per chunk
    out = []
    for i in range(0, nQ, step):
        rows = slice(i * tile, (i + step) * tile)
        vis = pa.visible(qd[:, rows], qb[:, rows], qr[:, rows], qs[:, rows], kd, kb, kr, ks)
        vis = vis.view(B, -1, tile, nK, tile)
        out.append(torch.where(vis.all(4).all(2), 2, vis.any(4).any(2).to(torch.int8)))
    return torch.cat(out, 1).to(torch.int8)


def tile_lists(q_layout, k_layout=None, tile=None):
    """-> kv_num (B, 2, nQ), kv_idx (B, 2, nQ, nK), q_num (B, 2, nK), q_idx (B, 2, nK, nQ), int32:
    per query tile the count and ascending indices of its partial [0] and full [1] key tiles (forward
    and dq), and per key tile those of its query tiles (dk/dv). Unused entries are padding."""
    cls = tile_classes(q_layout, k_layout, tile)

    def lists(c):  # (B, nR, nC) -> (B, 2, nR), (B, 2, nR, nC)
        listed = torch.stack([c == 1, c == 2], 1)
        idx = torch.sort((~listed).to(torch.int16), dim=-1, stable=True).indices  # listed tiles first
        return listed.sum(-1, dtype=torch.int32).contiguous(), idx.to(torch.int32).contiguous()
    return (*lists(cls), *lists(cls.transpose(1, 2)))


# -----------------------------------------------------------------------------
# Kernels

@triton.jit
def _visible(q_doc, q_grp, q_br, q_slot, k_doc, k_grp, k_br, k_idx):
    # The kernels' copy of parallel_attention.visible, on token_info's rows (operands shaped to
    # broadcast): same live doc (dead queries -2, dead keys -1), causal by slot, and not two different
    # branches of one block (equal groups = two branch tokens of one block).
    # rule_mismatch checks that it agrees with the Python rule before the kernels first run.
    return (q_doc == k_doc) & (k_idx <= q_slot) & ((q_grp != k_grp) | (q_br == k_br))


@triton.jit
def _key_rows(KI, Tk, offs, live):
    # doc, group, branch of the keys `offs` of one (3, Tk) info block; absent keys: doc -1, never seen
    doc = tl.load(KI + offs, mask=live, other=-1)
    return doc, tl.load(KI + Tk + offs, mask=live, other=0), tl.load(KI + 2 * Tk + offs, mask=live, other=0)


@triton.jit
def _query_rows(QI, Tq, offs, live):
    # doc, group, branch, slot of the queries `offs` of one (6, Tq) info block; absent queries: doc -2
    doc = tl.load(QI + offs, mask=live, other=-2)
    grp = tl.load(QI + Tq + offs, mask=live, other=0)
    return doc, grp, tl.load(QI + 2 * Tq + offs, mask=live, other=0), tl.load(QI + 3 * Tq + offs, mask=live, other=0)


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, PREC: tl.constexpr):
    # one online-softmax step on scores in log2 units (-inf = masked); a row that has seen nothing
    # yet keeps m_i = -inf and p = 0 instead of NaN
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot,  # q (BLOCK_M, D), metadata (BLOCK_M,)
                    K, V, KI, stride_kt, stride_vt, Tk, qk_scale, IDX, n_tiles, offs_n, offs_d,
                    MASK: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    # the key blocks of the n_tiles tiles listed at IDX, TILE // BLOCK_N blocks per tile
    for it in tl.range(0, n_tiles * (TILE // BLOCK_N)):
        offs = tl.load(IDX + it // (TILE // BLOCK_N)) * TILE + (it % (TILE // BLOCK_N)) * BLOCK_N + offs_n
        in_k = offs < Tk
        kT = tl.load(K + offs[None, :] * stride_kt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:  # partial tile: the rule per element (full tiles skip this)
            k_doc, k_grp, k_br = _key_rows(KI, Tk, offs, in_k)
            vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                           k_doc[None, :], k_grp[None, :], k_br[None, :], offs[None, :])
            qk = tl.where(vis, qk, float("-inf"))
        v = tl.load(V + offs[:, None] * stride_vt + offs_d[None, :], mask=in_k[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QI, KI, KV_NUM, KV_IDX, qk_scale,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, Hq, Tq, Tk, nQ, nK, T_KEY,
              GROUP: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (query blocks, B * Hq); q head h reads kv head h // GROUP. T_KEY: only the autotune key.
    start_m, off_bh = tl.program_id(0), tl.program_id(1)
    b, h = off_bh // Hq, off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < Tq
    q_doc, q_grp, q_br, q_slot = _query_rows(QI + b * 6 * Tq, Tq, offs_m, in_q)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    K += b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V += b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    KI += b * 3 * Tk
    row = b * 2 * nQ + start_m * BLOCK_M // TILE  # this block's tile in the (B, 2, nQ) lists: partial
    n_part, n_full = tl.load(KV_NUM + row), tl.load(KV_NUM + row + nQ)
    IDX = KV_IDX + row.to(tl.int64) * nK
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                                    stride_vt, Tk, qk_scale, IDX + nQ * nK, n_full, offs_n, offs_d,
                                    False, TILE, BLOCK_N, PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt,
                                    stride_vt, Tk, qk_scale, IDX, n_part, offs_n, offs_d,
                                    True, TILE, BLOCK_N, PREC)
    # epilogue: rows that saw nothing give 0 and lse = +inf (so backward's exp2(s - lse) is 0 there)
    seen = l_i > 0
    l_i = tl.where(seen, l_i, 1.0)
    out = off_bh.to(tl.int64) * Tq + offs_m  # o, lse: contiguous (B, Hq, Tq[, D])
    tl.store(LSE + out, tl.where(seen, m_i + tl.math.log2(l_i), float("inf")), mask=in_q)
    tl.store(O + out[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
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
                         Q, DO, LSE, DELTA, QI, stride_qt, Tq, qk_scale, IDX, n_tiles, offs_d,
                         MASK: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                         PREC: tl.constexpr):
    # the query blocks of the n_tiles tiles listed at IDX, TILE // BLOCK_M blocks per tile
    for it in tl.range(0, n_tiles * (TILE // BLOCK_M)):
        offs_m = tl.load(IDX + it // (TILE // BLOCK_M)) * TILE + (it % (TILE // BLOCK_M)) * BLOCK_M \
            + tl.arange(0, BLOCK_M)
        in_q = offs_m < Tq
        qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=in_q[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=in_q[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)
        qkT = tl.dot(k, qT, input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASK:
            q_doc, q_grp, q_br, q_slot = _query_rows(QI, Tq, offs_m, in_q)
            vis = _visible(q_doc[None, :], q_grp[None, :], q_br[None, :], q_slot[None, :],
                           k_doc[:, None], k_grp[:, None], k_br[:, None], offs_n[:, None])
            pT = tl.where(vis, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, QI, KI, Q_NUM, Q_IDX, qk_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, Hq, Hkv, Tq, Tk, nQ, nK, T_KEY,
                   GROUP: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (key blocks, B * Hkv): dk, dv of one key block, summed over the GROUP q heads that read it
    start_n, off_bh = tl.program_id(0), tl.program_id(1)
    b, kvh = off_bh // Hkv, off_bh % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_k = offs_n < Tk
    k_doc, k_grp, k_br = _key_rows(KI + b * 3 * Tk, Tk, offs_n, in_k)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=in_k[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=in_k[:, None], other=0.0)
    QI += b * 6 * Tq
    row = b * 2 * nK + start_n * BLOCK_N // TILE  # this block's tile in the (B, 2, nK) lists
    n_part, n_full = tl.load(Q_NUM + row), tl.load(Q_NUM + row + nK)
    IDX = Q_IDX + row.to(tl.int64) * nQ
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        Qh = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        r = (b * Hq + h).to(tl.int64) * Tq  # do, lse, delta: contiguous (B, Hq, Tq[, D])
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_doc, k_grp, k_br, offs_n, Qh, DO + r * D, LSE + r,
                                      DELTA + r, QI, stride_qt, Tq, qk_scale, IDX + nK * nQ, n_full, offs_d,
                                      False, TILE, BLOCK_M, D, PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_doc, k_grp, k_br, offs_n, Qh, DO + r * D, LSE + r,
                                      DELTA + r, QI, stride_qt, Tq, qk_scale, IDX, n_part, offs_d,
                                      True, TILE, BLOCK_M, D, PREC)
    out = (off_bh.to(tl.int64) * Tk + offs_n)[:, None] * D + offs_d[None, :]  # dk, dv: contiguous
    scale = qk_scale * 0.6931471805599453  # ds/dk = softmax scale = qk_scale * ln 2
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot,  # q, do (BLOCK_M, D)
                       K, V, KI, stride_kt, stride_vt, Tk, qk_scale, IDX, n_tiles, offs_n, offs_d,
                       MASK: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for it in tl.range(0, n_tiles * (TILE // BLOCK_N)):
        offs = tl.load(IDX + it // (TILE // BLOCK_N)) * TILE + (it % (TILE // BLOCK_N)) * BLOCK_N + offs_n
        in_k = offs < Tk
        kT = tl.load(K + offs[None, :] * stride_kt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        vT = tl.load(V + offs[None, :] * stride_vt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            k_doc, k_grp, k_br = _key_rows(KI, Tk, offs, in_k)
            vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                           k_doc[None, :], k_grp[None, :], k_br[None, :], offs[None, :])
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, QI, KI, KV_NUM, KV_IDX, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, Hq, Tq, Tk, nQ, nK, T_KEY,
                 GROUP: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (query blocks, B * Hq): the same key tiles as the forward
    start_m, off_bh = tl.program_id(0), tl.program_id(1)
    b, h = off_bh // Hq, off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < Tq
    q_doc, q_grp, q_br, q_slot = _query_rows(QI + b * 6 * Tq, Tq, offs_m, in_q)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    r = off_bh.to(tl.int64) * Tq + offs_m  # do, lse, delta, dq: contiguous (B, Hq, Tq[, D])
    do = tl.load(DO + r[:, None] * D + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + r, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + r, mask=in_q, other=0.0)
    K += b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V += b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    KI += b * 3 * Tk
    row = b * 2 * nQ + start_m * BLOCK_M // TILE
    n_part, n_full = tl.load(KV_NUM + row), tl.load(KV_NUM + row + nQ)
    IDX = KV_IDX + row.to(tl.int64) * nK
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt, stride_vt,
                            Tk, qk_scale, IDX + nQ * nK, n_full, offs_n, offs_d, False, TILE, BLOCK_N, PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_doc, q_grp, q_br, q_slot, K, V, KI, stride_kt, stride_vt,
                            Tk, qk_scale, IDX, n_part, offs_n, offs_d, True, TILE, BLOCK_N, PREC)
    scale = qk_scale * 0.6931471805599453  # ds/dq = softmax scale
    tl.store(DQ + r[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


@triton.jit
def _attn_decode(Q, K, V, O, LSE, QI, KI, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, B, Hq, Hkv, Tq, Tk, SPLITS,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
    # grid (B * Hkv, SPLITS). The M dimension holds all GROUP x Tq (q head, query) pairs that read
    # kv head kvh, so each K/V tile is loaded once per kv head; SPLITS programs share the keys
    # (flash-decoding) and write partial (o, lse) that the host merges. The keys are the union of
    # the queries' [lo, hi) ranges; no tile lists: decode caches interleave the branches.
    off_bh, split = tl.program_id(0), tl.program_id(1)
    b, kvh = off_bh // Hkv, off_bh % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, D)
    in_q = offs_m < GROUP * Tq
    h, t = kvh * GROUP + offs_m // Tq, offs_m % Tq  # row m = (q head h, query t)
    QI += b * 6 * Tq
    q_doc, q_grp, q_br, q_slot = _query_rows(QI, Tq, t, in_q)
    hi = tl.max(tl.load(QI + 5 * Tq + t, mask=in_q, other=0), 0)
    lo = tl.minimum(tl.min(tl.load(QI + 4 * Tq + t, mask=in_q, other=Tk), 0), hi) // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), SPLITS) * BLOCK_N
    s_lo = lo + split * chunk
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
                + offs_d[None, :], mask=in_q[:, None], other=0.0)
    K += b.to(tl.int64) * stride_kb + kvh * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh * stride_vh
    KI += b * 3 * Tk
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(s_lo, tl.minimum(hi, s_lo + chunk), BLOCK_N):
        offs = start_n + offs_n
        in_k = offs < Tk
        k_doc, k_grp, k_br = _key_rows(KI, Tk, offs, in_k)
        kT = tl.load(K + offs[None, :] * stride_kt + offs_d[:, None], mask=in_k[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                       k_doc[None, :], k_grp[None, :], k_br[None, :], offs[None, :])
        v = tl.load(V + offs[:, None] * stride_vt + offs_d[None, :], mask=in_k[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, tl.where(vis, qk, float("-inf")), v, PREC)
    seen = l_i > 0  # an empty split has lse = -inf: weight 0 in the merge
    l_i = tl.where(seen, l_i, 1.0)
    row = ((split * B + b) * Hq + h).to(tl.int64) * Tq + t  # O (SPLITS, B, Hq, Tq, D) fp32
    tl.store(LSE + row, tl.where(seen, m_i + tl.math.log2(l_i), float("-inf")), mask=in_q)
    tl.store(O + row[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=in_q[:, None])


@triton.jit
def _mask(QI, KI, OUT, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (B,): one row's (Tq, Tk) mask as the kernels apply it, the same loads and `_visible` (bit 0),
    # and whether each key lies in its query's range [lo, hi), outside which the decode kernel reads
    # nothing (bit 1)
    b = tl.program_id(0)
    offs_m, offs_n = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    in_q, in_k = offs_m < Tq, offs_n < Tk
    QI += b * 6 * Tq
    q_doc, q_grp, q_br, q_slot = _query_rows(QI, Tq, offs_m, in_q)
    lo = tl.load(QI + 4 * Tq + offs_m, mask=in_q, other=Tk)
    hi = tl.load(QI + 5 * Tq + offs_m, mask=in_q, other=0)
    k_doc, k_grp, k_br = _key_rows(KI + b * 3 * Tk, Tk, offs_n, in_k)
    vis = _visible(q_doc[:, None], q_grp[:, None], q_br[:, None], q_slot[:, None],
                   k_doc[None, :], k_grp[None, :], k_br[None, :], offs_n[None, :])
    in_range = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    out = OUT + b * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :]
    tl.store(out, vis.to(tl.int8) + 2 * in_range.to(tl.int8), mask=in_q[:, None] & in_k[None, :])


# -----------------------------------------------------------------------------
# Autotune sets: (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed on head dim, GQA group, dtype and
# the length rounded up to a power of two; for bf16, D = 128 on sm_90 each spills little or nothing
# (ptxas; sets that spilled hundreds of bytes are left out). Under the interpreter: one 16 x 16 set.

CUDA_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3)],
    "dq": [(64, 32, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3), (64, 64, 4, 3)],
}
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


def _configs(kind):
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16))]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
            for m, n, w, s in CUDA_CONFIGS[kind]]


def _prune(configs, named_args, **kwargs):
    # fp32 (IEEE dots on CUDA cores) and D = 256 need smaller tiles to fit registers and shared
    # memory; D <= 64 spills nothing with 4 warps
    args = {**named_args, **kwargs}
    D, fp32 = args["D"], args["Q"].dtype == torch.float32
    shrink = int(fp32) + int(D > 128)
    out = []
    for c in configs:
        kw = {k: max(16, min(v >> shrink, args["TILE"])) for k, v in c.kwargs.items()}  # blocks divide TILE
        c = triton.Config(kw, num_warps=min(c.num_warps, 4) if D <= 64 else c.num_warps,
                          num_stages=2 if shrink else c.num_stages)
        if all(str(c) != str(o) for o in out):
            out.append(c)
    return out


_tune = lambda kind: triton.autotune(configs=_configs(kind), key=["D", "GROUP", "T_KEY"],
                                     prune_configs_by=dict(early_config_prune=_prune))
_attn_fwd = _tune("fwd")(_attn_fwd)
_attn_bwd_dkdv = _tune("dkdv")(_attn_bwd_dkdv)
_attn_bwd_dq = _tune("dq")(_attn_bwd_dq)


# -----------------------------------------------------------------------------
# Launchers

def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]  # (b, h, t) strides; d is contiguous


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


def _fwd(q, k, v, q_info, k_info, tiles, scale):
    """-> o (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) fp32 in log2 units (+inf: empty row)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kv_num, kv_idx = tiles[:2]
    o = torch.empty(B, Hq, Tq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)
    _attn_fwd[grid](q, k, v, o, lse, q_info, k_info, kv_num, kv_idx, scale * LOG2E, *_strides(q, k, v),
                    Hq, Tq, Tk, kv_idx.shape[2], kv_idx.shape[3], triton.next_power_of_2(Tk),
                    GROUP=Hq // Hkv, D=D, TILE=tiles[4], PREC=_precision(q))
    return o, lse


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_info, k_info, tiles, scale):
        o, lse = _fwd(q, k, v, q_info, k_info, tiles, scale)
        ctx.save_for_backward(q, k, v, o, lse, q_info, k_info, *tiles[:4])
        ctx.scale, ctx.tile = scale, tiles[4]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_info, k_info, kv_num, kv_idx, q_num, q_idx = ctx.saved_tensors
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        nQ, nK = kv_idx.shape[2], kv_idx.shape[3]
        do = do.contiguous()
        delta = torch.empty_like(lse)
        _attn_bwd_preprocess[(triton.cdiv(B * Hq * Tq, 64),)](o, do, delta, B * Hq * Tq, D=D, BLOCK_M=64)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        args = (ctx.scale * LOG2E, *_strides(q, k, v))
        kw = dict(GROUP=Hq // Hkv, D=D, TILE=ctx.tile, PREC=_precision(q))
        T_KEY = triton.next_power_of_2(Tk)
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, do, dk, dv, lse, delta, q_info, k_info, q_num, q_idx, *args, Hq, Hkv, Tq, Tk, nQ, nK,
            T_KEY, **kw)
        _attn_bwd_dq[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, do, dq, lse, delta, q_info, k_info, kv_num, kv_idx, *args, Hq, Tq, Tk, nQ, nK, T_KEY, **kw)
        return dq, dk, dv, None, None, None, None


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
    cfg = dict(DECODE_CONFIG) if q.is_cuda else dict(BLOCK_N=16)
    if q.is_cuda and D <= 64:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    if q.is_cuda and (q.dtype == torch.float32 or D > 128):  # smaller tiles: registers, shared memory
        cfg.update(BLOCK_N=max(16, cfg["BLOCK_N"] >> (int(q.dtype == torch.float32) + int(D > 128))), num_stages=2)
    cfg["BLOCK_M"] = max(16, triton.next_power_of_2(Hq // Hkv * Tq))
    if q.is_cuda and cfg["BLOCK_M"] >= 64:
        cfg["num_warps"] = 8  # 4 warps spill at 64+ rows
    splits = splits or _num_splits(q, Hkv, Tk, cfg["BLOCK_N"])
    o = torch.empty(splits, B, Hq, Tq, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, B, Hq, Tq, device=q.device, dtype=torch.float32)
    _attn_decode[(B * Hkv, splits)](q, k, v, o, lse, q_info, k_info, scale * LOG2E,
                                    *_strides(q, k, v), B, Hq, Hkv, Tq, Tk, splits,
                                    GROUP=Hq // Hkv, D=D, PREC=_precision(q), **cfg)
    if splits > 1:  # merge the partial softmaxes: weights 2^lse_s / sum_s 2^lse_s (0 if all empty)
        w = torch.softmax(lse * 0.6931471805599453, dim=0).nan_to_num(0.0)
        o = (w[..., None] * o).sum(0, keepdim=True)
    return o[0].to(q.dtype)


# -----------------------------------------------------------------------------
# The kernels' copy of the rule, checked against the rule (parallel_attention.visible)

def kernel_mask(q_layout, k_layout=None):
    """-> (visible, in_range), (B, Tq, Tk) bool each: the element mask as the kernels apply it
    (`_visible` on token_info's rows) and each query's key range [lo, hi) (the decode kernel's)."""
    q_info, k_info = token_info(q_layout, k_layout)
    (B, _, Tq), Tk = q_info.shape, k_info.shape[2]
    out = torch.zeros(B, Tq, Tk, dtype=torch.int8, device=q_info.device)
    _mask[(B,)](q_info, k_info, out, Tq, Tk, BLOCK_M=triton.next_power_of_2(max(Tq, 16)),
                BLOCK_N=triton.next_power_of_2(max(Tk, 16)))
    return (out & 1).bool(), (out & 2).bool()


def rule_check_layouts(device):
    """A small random (queries, keys) pair on device. Every field is drawn per token, so each case of
    the rule occurs many times among its 2,304 pairs (live / dead / other doc, same / other block,
    trunk / same / sibling branch, earlier / later slot); row 0's keys have sorted docs, so that
    token_info's key ranges follow documents there, row 1's do not."""
    g = torch.Generator().manual_seed(0)
    B, Tq, Tk = 2, 24, 48
    draw = lambda lo, hi, n: torch.randint(lo, hi + 1, (B, n), generator=g, dtype=torch.int32)
    k_doc = draw(-1, 2, Tk)
    k_doc[0] = k_doc[0].sort().values
    keys = pa.Layout(k_doc, draw(0, 2, Tk), draw(0, 3, Tk))
    queries = pa.Layout(draw(-1, 2, Tq), draw(0, 2, Tq), draw(0, 3, Tq), draw(0, Tk - 1, Tq))
    return queries.to(device), keys.to(device)


RULE_CHECKS = {}   # (parallel_attention.visible, its code) -> None (the kernels agree) or what differs


def rule_mismatch(device):
    """None when the kernels apply the rule as parallel_attention.visible states it now, else a
    message naming one pair where they differ. Checked once per version of the rule in a process
    (the function object and its code: an edited file is a new process, a reload or a monkeypatch a
    new object), on rule_check_layouts: one tiny kernel launch and one read-back on `device`."""
    key = (pa.visible, pa.visible.__code__)
    if key not in RULE_CHECKS:
        q_l, k_l = rule_check_layouts(device)
        want = pa.visible_mask(q_l, k_l)
        got, in_range = kernel_mask(q_l, k_l)
        bad = (got != want) | (want & ~in_range)
        why = None
        if bad.any():
            b, i, j = bad.nonzero()[0].tolist()
            token = lambda L, t, slot: (f"(doc {int(L.doc[b, t])}, block {int(L.block[b, t])}, "
                                        f"branch {int(L.branch[b, t])}, slot {slot})")
            says = lambda v: "sees" if v else "does not see"
            kern = f"the kernels' mask {says(got[b, i, j])} it" if got[b, i, j] != want[b, i, j] else \
                "it lies outside the decode kernel's key range (token_info's lo, hi)"
            why = (f"triton_attention.py applies another rule than parallel_attention.visible: query "
                   f"{token(q_l, i, int(q_l.slot[b, i]))} {says(want[b, i, j])} key {token(k_l, j, j)} by the "
                   f"rule, but {kern}. Bring _visible and token_info in line with the edited rule, or run "
                   "attention on SDPA (impl='sdpa', --attn-impl sdpa)")
        RULE_CHECKS[key] = why
    return RULE_CHECKS[key]


_WARNED = set()   # the mismatch messages kernels_hold_rule has printed


def kernels_hold_rule(device):
    """Whether impl="auto" may run the kernels: their element mask (the rule's copy) equals `visible`
    (rule_mismatch). Where it does not (an ablation edited `visible` only), "auto" runs SDPA instead and
    this says so once: the edited rule then holds on every device, eval/distill/serve (which have no
    attention flag) keep running, and the warning names the slower path. An explicit impl="triton"
    refuses instead (attention_triton raises): a kernel test or benchmark must not time SDPA under
    the kernels' name."""
    why = rule_mismatch(device)
    if why is not None and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"{why}; impl='auto' runs SDPA with the dense mask instead (slower)", RuntimeWarning,
                      stacklevel=3)
    return why is None

def attention_triton(q, k, v, q_layout, k_layout=None, scale=None):
    """The Triton path: the decode kernel for a few queries per row when no gradient is needed,
    else the forward kernel inside an autograd.Function with its backward kernels."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0, f"{Hq} q heads do not share {Hkv} kv heads evenly"
    why = rule_mismatch(q.device)
    if why is not None:   # refuse: the tile lists would follow the new rule, the element mask the old one
        raise RuntimeError(why)
    scale = D ** -0.5 if scale is None else scale
    if D < 16 or D & (D - 1):  # other head dims (tiny test models): zero-pad, no dot product changes
        pad = lambda t: F.pad(t, (0, max(16, triton.next_power_of_2(D)) - D))
        return attention_triton(pad(q), pad(k), pad(v), q_layout, k_layout, scale)[..., :D]
    assert q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype} {k.dtype} {v.dtype}"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # any (b, h, t) strides
    q_info, k_info = pa.memo(q_layout, k_layout, "info", lambda: token_info(q_layout, k_layout))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grad and Tq <= 16 and Hq // Hkv * Tq <= 128:
        return _decode(q, k, v, q_info, k_info, scale)
    tile = TILE
    tiles = pa.memo(q_layout, k_layout, ("tiles", tile), lambda: (*tile_lists(q_layout, k_layout, tile), tile))
    return _Attention.apply(q, k, v, q_info, k_info, tiles, scale)
