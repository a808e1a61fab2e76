"""
Benchmark and GPU check of the branch-isolated attention (parallel_attention.py, triton_attention.py).

    python bench_attention.py [--out results.json]       # CPU: ref vs SDPA + dense mask, the interpreter once
    python bench_attention.py --out k.json --deadline 400  # CUDA: the parts below, most important first
    python bench_attention.py --dry-run                  # the CUDA parts at tiny shapes (CPU: the interpreter)
    bash gpu_kernel.sh                                   # the same on a lent GPU, then the CUDA tests

CUDA parts (each under an alarm set to the time left; a failure is recorded and the next part runs;
the JSON is rewritten after every part):
    check   bf16 kernels vs the fp32 reference at T=4096 (o, dq, dk, dv; SDPA's error beside), decode
    T4096   fwd and fwd+bwd ms: Triton vs FlexAttention (compiled, same rule) vs SDPA causal (no branch
    T16384  mask: a floor), B=2, Hq=32, Hkv=8, D=128, prefix 1024 then blocks of 4 branches x 512
    sft     an sft.py step (fp32 weights, bf16 autocast, AdamW) on the Qwen3-0.6B shape with random
            weights, one packed 8k row of NPR documents: tokens/s and MFU, Triton vs FlexAttention
    decode  the decode kernel vs SDPA + dense mask, B=32 rows x 4 branch queries, S = 4k..16k
    tuning  the configuration the autotuner chose per kernel and key
"""
import argparse
import json
import os
import signal
import time

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined: before the imports below
from parallel_attention import Layout, attention, attention_ref, attention_sdpa, triton_kernels, visible, visible_mask

PEAK_BF16 = 989e12   # H100 / H200 SXM dense bf16 FLOP/s, for MFU
ERROR_BOUND = dict(o=0.0078, dq=0.0076, dk=0.0119, dv=0.0200)  # bf16 max errors vs fp32 allowed at T=4096


def bench_layout(B, T, prefix=1024, guide=64, nbr=4, step=512, take=128, device="cpu"):
    """A trunk prefix, then repeated blocks of [guideline trunk, nbr steps of `step` tokens, takeaway trunk]."""
    blk, br = torch.zeros(T, dtype=torch.int32), torch.zeros(T, dtype=torch.int32)
    i, b = prefix + guide, 1
    while i < T:
        for r in range(1, nbr + 1):
            blk[i + (r - 1) * step:i + r * step], br[i + (r - 1) * step:i + r * step] = b, r
        i, b = i + nbr * step + take + guide, b + 1
    row = lambda x: x.expand(B, T).contiguous().to(device)
    return Layout(row(torch.zeros_like(blk)), row(blk), row(br))


def packed_layout(T, seed=0, doc_tokens=(1500, 4000), step_tokens=(100, 600), device="cpu"):
    """One packed SFT row of NPR documents: a prompt, blocks of [guideline, 2-4 steps of step_tokens,
    takeaway] up to about doc_tokens, an answer; documents until the row is full."""
    g = torch.Generator().manual_seed(seed)
    n = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
    toks, d = [], 0
    while len(toks) < T:
        lo, hi = step_tokens
        doc, want = [(d, 0, 0)] * n(lo, 4 * lo), n(*doc_tokens)
        blk = 1
        while len(doc) < want - 2 * lo:
            doc += [(d, blk, 0)] * n(lo // 3, lo)
            for r in range(1, n(2, 4) + 1):
                doc += [(d, blk, r)] * n(lo, hi)
            doc += [(d, blk, 0)] * n(lo // 2, lo)
            blk += 1
        toks += doc + [(d, 0, 0)] * n(lo // 2, 2 * lo)
        d += 1
    t = torch.tensor(toks[:T], dtype=torch.int32).T[:, None].contiguous().to(device)  # (3, 1, T)
    return Layout(t[0], t[1], t[2])


def decode_layout(B, S, nbr=4, device="cpu"):
    """A full cache of S slots: a trunk prompt, then one block whose nbr branches were written one
    token per branch per step (interleaved slots); the queries are the last token of each branch."""
    br = torch.zeros(S, dtype=torch.int32)
    br[S // 2:] = torch.arange(S - S // 2) % nbr + 1
    row = lambda x: x.expand(B, -1).contiguous().to(device)
    slot = torch.arange(S - nbr, S, dtype=torch.int32)
    return (Layout(row(torch.zeros_like(slot)), row(torch.ones_like(slot)), row(br[slot]), row(slot)),
            Layout(row(torch.zeros_like(br)), row((br > 0).int()), row(br)))


def flex_block_mask(L, T, device):
    """FlexAttention's block mask for Layout L (self-attention), from the same rule."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, blk, br = L.doc, L.block, L.branch
    rule = lambda b, h, i, j: visible(doc[b, i], blk[b, i], br[b, i], i, doc[b, j], blk[b, j], br[b, j], j)
    return create_block_mask(rule, doc.shape[0], None, T, T, device=device)


def tile_stats(L):
    """Shares of (query tile, key tile) pairs that are empty / partial / full at the CUDA tile size."""
    import triton_attention as ta
    c = ta.tile_classes(L, tile=128)
    return {name: round((c == i).float().mean().item(), 4) for i, name in enumerate(("empty", "partial", "full"))}


# -----------------------------------------------------------------------------
# Timing

def timer(dev, dry=False):
    """-> ms(fn): CUDA: triton's do_bench; CPU: best of 3 calls after a warm-up (dry run: one call)."""
    if dev == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=50)

    def ms(fn):
        times = []
        for _ in range(1 if dry else 4):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times[1:] or times) * 1e3
    return ms


def part_check(res, dev, dry):
    """bf16 kernels vs the fp32 reference; SDPA's bf16 error on the same inputs is the yardstick."""
    T, D = (4096, 128) if not dry else (64, 16)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    mk = lambda B, H, T, g=True: torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=g)
    L = bench_layout(1, T, device=dev) if not dry else bench_layout(1, T, prefix=8, guide=4, step=12, take=4, device=dev)
    q, k, v = mk(1, 8, T), mk(1, 2, T), mk(1, 2, T)
    do = torch.randn_like(q)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = attention_ref(*ref, L)
    want = (o_ref, *torch.autograd.grad(o_ref, ref, do.float()))
    for impl in ("triton", "sdpa"):
        o = attention(q, k, v, L, impl=impl)
        for n, a, b in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, (q, k, v), do)), want):
            res[f"check_{impl}_{n}_maxabs"] = round((a.float() - b).abs().max().item(), 5)
    res["check_within_bound"] = all(res[f"check_triton_{n}_maxabs"] <= e for n, e in ERROR_BOUND.items())
    res["check_triton_over_sdpa"] = {n: round(res[f"check_triton_{n}_maxabs"] / max(res[f"check_sdpa_{n}_maxabs"], 1e-9), 2)
                                     for n in ERROR_BOUND}  # the same inputs: the noise of one draw cancels
    ql, cache = decode_layout(4, T, device=dev)
    q, k, v = mk(4, 8, 4, False), mk(4, 2, T, False), mk(4, 2, T, False)
    err = attention(q, k, v, ql, cache, impl="triton").float() - attention_ref(q.float(), k.float(), v.float(), ql, cache)
    res["check_decode_o_maxabs"] = round(err.abs().max().item(), 5)


def part_speed(res, dev, dry, T):
    from torch.nn.attention.flex_attention import flex_attention
    B, H, KV, D = (2, 32, 8, 128) if not dry else (1, 2, 1, 16)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    L = bench_layout(B, T, device=dev) if not dry else bench_layout(B, T, prefix=16, guide=8, step=16, take=8, device=dev)
    mk = lambda H: torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=True)
    q, k, v = mk(H), mk(KV), mk(KV)
    do = torch.randn_like(q)
    bm = flex_block_mask(L, T, dev)
    flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
    kr, vr = (t.detach().repeat_interleave(H // KV, 1).requires_grad_() for t in (k, v))
    fq, fk, fv = (q, k, v) if dev == "cuda" else (t.detach() for t in (q, k, v))  # no backward on CPU
    fns = {"triton": lambda: attention(q, k, v, L, impl="triton"),
           "flex": lambda: flex(fq, fk, fv, block_mask=bm, enable_gqa=True),
           "sdpa_causal": lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)}
    frac = visible_mask(Layout(L.doc[:1], L.block[:1], L.branch[:1])).float().mean().item()
    res[f"T{T}_visible_frac"] = round(frac, 4)
    res[f"T{T}_tiles"] = tile_stats(Layout(L.doc[:1], L.block[:1], L.branch[:1]))
    ms = timer(dev, dry)
    for name, fn in fns.items():
        res[f"T{T}_{name}_fwd_ms"] = round(ms(fn), 3)
        if dev == "cuda" or name != "flex":  # (FlexAttention has no backward on CPU)
            res[f"T{T}_{name}_fwdbwd_ms"] = round(ms(lambda: fn().backward(do)), 3)
    flops = {"fwd": 4 * B * H * D * T * T * frac, "fwdbwd": 14 * B * H * D * T * T * frac}  # visible pairs
    for key in [k for k in res if k.startswith(f"T{T}_") and k.endswith("_ms")]:
        res[key[:-3] + "_tflops_on_visible"] = round(flops[key.split("_")[-2]] / res[key] / 1e9, 1)
    res[f"T{T}_speedup_vs_flex"] = {p: round(res[f"T{T}_flex_{p}_ms"] / res[f"T{T}_triton_{p}_ms"], 3)
                                    for p in ("fwd", "fwdbwd") if f"T{T}_flex_{p}_ms" in res}


def part_sft(res, dev, dry, steps=5):
    """One sft.py optimizer step per row: forward with chunked log-probs, backward, clip, AdamW."""
    import model as model_module
    from bench import SHAPES
    from model import Qwen, QwenConfig
    from runs import autocast
    from torch.nn.attention.flex_attention import flex_attention
    shape = SHAPES["qwen3-0.6b" if not dry else "tiny"]
    T = 8192 if not dry else 96
    cfg = QwenConfig.from_dict(dict(architectures=["Qwen3ForCausalLM"], rms_norm_eps=1e-6, rope_theta=1e6,
                                    tie_word_embeddings=True, torch_dtype="float32", **shape))
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen(cfg).train()
    L = packed_layout(T, device=dev) if not dry else packed_layout(T, doc_tokens=(40, 60), step_tokens=(4, 8))
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
    tgt = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
    pos = torch.arange(T, device=dev)[None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1, foreach=dev == "cuda")
    flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
    bm = flex_block_mask(L, T, dev)

    def flex_attn(q, k, v, q_layout, k_layout=None, scale=None, impl="auto"):  # model.py's call
        dt = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        return flex(q.to(dt), k.to(dt), v.to(dt), block_mask=bm, scale=scale, enable_gqa=True)

    def step():
        with autocast(dev, True):
            loss = -model(ids, pos, L, targets=tgt).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n_params = model.num_params()
    frac = visible_mask(L).float().mean().item()
    attn_flops = 3.5 * 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T * T * frac
    res["sft_tokens"], res["sft_params"], res["sft_visible_frac"] = T, n_params, round(frac, 4)
    saved = model_module.attention
    try:
        for name in ("triton", "flex"):
            model_module.attention = saved if name == "triton" else flex_attn
            model.attn_impl = "triton"
            if dev != "cuda" and name == "flex":  # no FlexAttention backward on CPU: its forward only
                with torch.no_grad():
                    model(ids, pos, L, targets=tgt)
                continue
            for _ in range(2 if dev == "cuda" else 0):
                step()  # compile / tune, warm up
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            sync()
            t = time.perf_counter()
            for _ in range(steps if dev == "cuda" else 1):
                step()
            sync()
            dt = (time.perf_counter() - t) / (steps if dev == "cuda" else 1)
            res[f"sft_{name}_step_s"] = round(dt, 4)
            res[f"sft_{name}_tokens_per_s"] = round(T / dt, 1)
            res[f"sft_{name}_mfu_6N"] = round(6 * n_params * T / dt / PEAK_BF16, 4)  # as sft.py logs it
            res[f"sft_{name}_mfu_with_attention"] = round((6 * n_params * T + attn_flops) / dt / PEAK_BF16, 4)
    finally:
        model_module.attention = saved
    if "sft_flex_step_s" in res:
        res["sft_speedup_vs_flex"] = round(res["sft_flex_step_s"] / res["sft_triton_step_s"], 3)


def part_decode(res, dev, dry):
    """B=32 rows x 4 queries (one per branch) against an interleaved cache."""
    B, H, KV, D = (32, 32, 8, 128) if not dry else (2, 4, 2, 16)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    ms = timer(dev, dry)
    for S in ((4096, 8192, 16384) if not dry else (64,)):
        ql, cache = decode_layout(B, S, device=dev)
        q, k, v = (torch.randn(B, h, t, D, device=dev, dtype=dt) for h, t in ((H, 4), (KV, S), (KV, S)))
        for name in ("triton", "sdpa"):
            res[f"decode_S{S}_{name}_us"] = round(ms(lambda: attention(q, k, v, ql, cache, impl=name)) * 1e3, 1)
        res[f"decode_S{S}_triton_kv_GBps"] = round(2 * k.numel() * k.element_size() / res[f"decode_S{S}_triton_us"] / 1e3, 1)


def part_tuning(res, dev, dry):
    import triton_attention as ta
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        cache = getattr(getattr(ta, name), "cache", {})
        res[f"tuned{name}"] = {str(key): str(cfg) for key, cfg in cache.items()}


def run_gpu_parts(res, out, deadline, dry):
    """Each part under an alarm set to the time left (minus a margin); errors recorded, not raised."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    t0 = time.time()
    parts = [("check", 150, lambda: part_check(res, dev, dry)),
             ("T4096", 120, lambda: part_speed(res, dev, dry, 4096 if not dry else 64)),
             ("T16384", 150, lambda: part_speed(res, dev, dry, 16384 if not dry else 96)),
             ("sft", 180, lambda: part_sft(res, dev, dry)),
             ("decode", 60, lambda: part_decode(res, dev, dry)),
             ("tuning", 10, lambda: part_tuning(res, dev, dry))]

    def alarm(*_):
        raise TimeoutError("part ran past its time")
    signal.signal(signal.SIGALRM, alarm)
    for name, most, fn in parts:
        left = int(deadline - (time.time() - t0)) - 10
        if left < 20:
            res[f"{name}_error"] = "skipped: deadline"
            continue
        signal.alarm(min(most, left))
        t = time.time()
        try:
            fn()
        except Exception as e:
            res[f"{name}_error"] = repr(e)[:400]
        finally:
            signal.alarm(0)
        res[f"{name}_s"] = round(time.time() - t, 1)
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name) or k.startswith(f"{name}_")}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=1)


def bench_cpu(res):
    """CPU: the reference vs SDPA + dense mask, and the interpreter at a tiny shape (not a speed)."""
    ms = timer("cpu")
    for T in (1024, 2048):
        L = bench_layout(1, T, prefix=256, guide=16, step=128, take=32)
        q, k, v = (torch.randn(1, H, T, 64, requires_grad=True) for H in (8, 2, 2))
        for name, fn in (("ref", attention_ref), ("sdpa_densemask", attention_sdpa)):
            res[f"cpu_T{T}_{name}_fwd_ms"] = round(ms(lambda: fn(q, k, v, L)), 2)
            res[f"cpu_T{T}_{name}_fwdbwd_ms"] = round(ms(lambda: fn(q, k, v, L).sum().backward()), 2)
    L = bench_layout(1, 64, prefix=8, guide=4, step=12, take=4)
    q, k, v = (torch.randn(1, H, 64, 16) for H in (2, 1, 1))
    try:
        err = attention(q, k, v, L, impl="triton") - attention_ref(q, k, v, L)
        res["interpreter_T64_fwd_maxabs_vs_ref"] = err.abs().max().item()
    except Exception as e:
        res["interpreter_error"] = repr(e)[:200]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="benchmark branch-isolated attention")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--dry-run", action="store_true", help="the GPU parts at tiny shapes (on CPU: the interpreter)")
    ap.add_argument("--deadline", type=float, default=400, help="seconds for all GPU parts")
    args = ap.parse_args()
    res = {"torch": torch.__version__, "triton": None}
    if triton_kernels():
        import triton
        res["triton"] = triton.__version__
    if (torch.cuda.is_available() or args.dry_run) and triton_kernels():
        run_gpu_parts(res, args.out, args.deadline, args.dry_run)
    else:
        bench_cpu(res)
    print(f"{'measure':52s} | value")
    for k, v in res.items():
        print(f"{k:52s} | {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
