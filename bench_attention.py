"""
Benchmark of the branch-isolated attention (parallel_attention.py, triton_attention.py):

    python bench_attention.py [--out results.json]

CPU: the reference vs SDPA + dense mask, and the Triton interpreter at a tiny shape (a correctness
run, not a speed). CUDA: bf16 kernels vs the fp32 reference at T=4096, then Triton vs FlexAttention
(same mask) vs causal SDPA (flash), a few tile configs, and the decode kernel vs SDPA + dense mask.
"""
import torch
import torch.nn.functional as F

from parallel_attention import Layout, attention, attention_ref, attention_sdpa, has_triton, visible, visible_mask


def bench_layout(B, T, prefix=1024, guide=64, nbr=4, step=512, take=128, device="cpu"):
    """A training row: a trunk prefix, then repeated blocks of
    [guideline trunk, nbr steps of `step` tokens, takeaway trunk]."""
    blk, br = torch.zeros(T, dtype=torch.int32), torch.zeros(T, dtype=torch.int32)
    i, b = prefix + guide, 1
    while i < T:
        for r in range(1, nbr + 1):
            blk[i + (r - 1) * step:i + r * step], br[i + (r - 1) * step:i + r * step] = b, r
        i, b = i + nbr * step + take + guide, b + 1
    row = lambda x: x.expand(B, T).contiguous().to(device)
    return Layout(row(torch.zeros_like(blk)), row(blk), row(br))


def decode_layout(B, S, nbr=4, device="cpu"):
    """A full cache of S slots: a trunk prompt, then one block whose nbr branches were written one
    token per branch per step (interleaved slots); the queries are the last token of each branch."""
    br = torch.zeros(S, dtype=torch.int32)
    br[S // 2:] = torch.arange(S - S // 2) % nbr + 1
    row = lambda x: x.expand(B, -1).contiguous().to(device)
    slot = torch.arange(S - nbr, S, dtype=torch.int32)
    return (Layout(row(torch.zeros_like(slot)), row(torch.ones_like(slot)), row(br[slot]), row(slot)),
            Layout(row(torch.zeros_like(br)), row((br > 0).int()), row(br)))


def _bench_cpu(res):
    import time

    def ms(fn, reps=3):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return round((time.perf_counter() - t) / reps * 1e3, 2)
    for T in (1024, 2048):
        L = bench_layout(1, T, prefix=256, guide=16, step=128, take=32)
        q, k, v = (torch.randn(1, H, T, 64, requires_grad=True) for H in (8, 2, 2))
        for name, fn in (("ref", attention_ref), ("sdpa_densemask", attention_sdpa)):
            res[f"cpu_T{T}_{name}_fwd_ms"] = ms(lambda: fn(q, k, v, L))
            res[f"cpu_T{T}_{name}_fwdbwd_ms"] = ms(lambda: fn(q, k, v, L).sum().backward())
    L = bench_layout(1, 64, prefix=8, guide=4, step=12, take=4)
    q, k, v = (torch.randn(1, H, 64, 16) for H in (2, 1, 1))
    try:
        from triton_attention import attention_triton
        res["interpreter_T64_fwd_ms (not a speed)"] = ms(lambda: attention_triton(q, k, v, L), reps=1)
        err = attention_triton(q, k, v, L) - attention_ref(q, k, v, L)
        res["interpreter_T64_fwd_maxabs_vs_ref"] = err.abs().max().item()
    except Exception as e:
        res["interpreter_error"] = repr(e)[:200]


def _bench_cuda(res):
    from triton.testing import do_bench
    from triton_attention import CUDA_CONFIGS
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    res["device"] = torch.cuda.get_device_name()
    mk = lambda B, H, T, g=True: torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=g)

    def part(name, fn):  # one failure must not lose the other numbers
        try:
            fn()
        except Exception as e:
            res[name + "_error"] = repr(e)[:300]
        print({k: v for k, v in res.items() if k.startswith(name)}, flush=True)

    def check():  # bf16 kernels vs the fp32 reference; SDPA's bf16 error is the yardstick
        L = bench_layout(1, 4096, device="cuda")
        q, k, v = mk(1, 8, 4096), mk(1, 2, 4096), mk(1, 2, 4096)
        do = torch.randn_like(q)
        ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
        o_ref = attention_ref(*ref, L)
        want = (o_ref, *torch.autograd.grad(o_ref, ref, do.float()))
        for impl in ("triton", "sdpa"):
            o = attention(q, k, v, L, impl=impl)
            for n, a, b in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, (q, k, v), do)), want):
                res[f"check_{impl}_{n}_maxabs"] = round((a.float() - b).abs().max().item(), 5)
        ql, cache = decode_layout(4, 4096, device="cuda")
        q, k, v = mk(4, 8, 4, False), mk(4, 2, 4096, False), mk(4, 2, 4096, False)
        err = attention(q, k, v, ql, cache, impl="triton").float() - attention_ref(
            q.float(), k.float(), v.float(), ql, cache)
        res["check_decode_o_maxabs"] = round(err.abs().max().item(), 5)
    part("check", check)

    flex = torch.compile(flex_attention)
    for T in (4096, 16384):
        def speed(B=2, H=32, KV=8):
            L = bench_layout(B, T, device="cuda")
            q, k, v = mk(B, H, T), mk(B, KV, T), mk(B, KV, T)
            do = torch.randn_like(q)
            blk, br = L.block[0], L.branch[0]
            doc = L.doc[0]
            mm = lambda b, h, i, j: visible(doc[i], blk[i], br[i], i, doc[j], blk[j], br[j], j)  # the same rule
            bm = create_block_mask(mm, None, None, T, T, device="cuda")
            kr, vr = (t.detach().repeat_interleave(H // KV, 1).requires_grad_() for t in (k, v))
            fns = {"triton": lambda: attention(q, k, v, L, impl="triton"),
                   "flex": lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
                   "sdpa_causal": lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)}
            frac = visible_mask(Layout(L.doc[:1], L.block[:1], L.branch[:1])).float().mean().item()
            res[f"T{T}_visible_frac"] = round(frac, 4)
            for name, fn in fns.items():
                res[f"T{T}_{name}_fwd_ms"] = round(do_bench(fn), 3)
                res[f"T{T}_{name}_fwdbwd_ms"] = round(do_bench(lambda: fn().backward(do)), 3)
            flops = 4 * B * H * 128 * T * T * frac
            res[f"T{T}_triton_fwd_tflops_on_visible"] = round(flops / res[f"T{T}_triton_fwd_ms"] / 1e9, 1)
            sweep = [("fwd", dict(BLOCK_N=128)), ("fwd", dict(BLOCK_M=64, num_warps=4)),
                     ("dkdv", dict(BLOCK_N=128, num_warps=8)), ("dq", dict(BLOCK_M=128, num_warps=8))]
            for kind, opt in sweep if T == 4096 else []:  # alternatives to CUDA_CONFIGS
                saved = dict(CUDA_CONFIGS[kind])
                CUDA_CONFIGS[kind].update(opt)
                try:
                    fn = fns["triton"] if kind == "fwd" else lambda: fns["triton"]().backward(do)
                    res[f"T{T}_sweep_{kind}_{opt}_ms"] = round(do_bench(fn), 3)
                finally:
                    CUDA_CONFIGS[kind] = saved
        part(f"T{T}", speed)
        torch.cuda.empty_cache()

    def decode():  # B=32 rows x 4 queries (one per branch) against an interleaved cache
        for S in (4096, 8192, 16384):
            ql, cache = decode_layout(32, S, device="cuda")
            q, k, v = mk(32, 32, 4, False), mk(32, 8, S, False), mk(32, 8, S, False)
            for name in ("triton", "sdpa"):
                t = do_bench(lambda: attention(q, k, v, ql, cache, impl=name))
                res[f"decode_S{S}_{name}_us"] = round(t * 1e3, 1)
            res[f"decode_S{S}_triton_kv_GBps"] = round(4 * k.numel() / res[f"decode_S{S}_triton_us"] / 1e3, 1)
    part("decode", decode)


if __name__ == "__main__":
    import argparse
    import importlib.util
    import json
    import os
    import sys
    if importlib.util.find_spec("triton") and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: restart with it
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser(description="benchmark branch-isolated attention")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args()
    res = {"torch": torch.__version__, "triton": None}
    if has_triton():
        import triton
        res["triton"] = triton.__version__
    (_bench_cuda if torch.cuda.is_available() and has_triton() else _bench_cpu)(res)
    print(f"{'measure':52s} | value")
    for k, v in res.items():
        print(f"{k:52s} | {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
