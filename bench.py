"""
Benchmarks of the sampler (results go into BENCHMARKS.md with the command, machine and date).

    python bench.py decode     # our sampler vs transformers generate: tokens/s, batch 1 and 16
    python bench.py parallel   # one forced trace decoded in parallel vs serial mode, k = 2, 4, 5
    python bench.py ragged     # 256 requests of log-normal lengths: static batches vs continuous batching
    python bench.py serve      # time to first token of a request arriving while a long batch decodes
    python bench.py all --out bench.json

Models are random Qwen3-shaped checkpoints made here: "tiny" (the test size, 0.2M parameters),
"100m" (hidden 768, 12 layers, vocab 32k: ~100M parameters) and "qwen3-0.6b" (its exact shape).
transformers is needed only for the `decode` comparison. On CUDA everything runs in bf16 and our
sampler is timed with both decode steps: "eager" and "graph" (CUDA graphs, decode_graph.py); the
pure replay time of one graph step is reported too (GPU time without the sampler's Python).
"""
import argparse
import atexit
import contextlib
import functools
import json
import os
import platform
import shutil
import tempfile
import time

import torch
import torch.nn.attention
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

import npr
from model import Qwen, QwenConfig
from sampler import Sampler, SamplingParams
from tokenizer import Tokenizer

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
ATTN = ["auto"]   # the models' attention impl (--attn)
COMPILE = [False]  # --compile
REPEAT = [3]       # --repeat
FUSE = [None]      # --fuse: the fast path's fused projections (None = its default)
PROFILE = [""]     # --profile PREFIX: a torch.profiler table of a few graph-mode steps per batch
CKPT_DIR = [""]    # --ckpt-dir
SDPA_BACKENDS = [None]  # --decode-sdpa: SDPA kernels our generate calls may use
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAGS = ["<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>"]


def make_checkpoint(path, shape, dtype):
    """A random model and a byte-level tokenizer (256 bytes + ChatML + tags) in one folder."""
    d = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1e6,
             tie_word_embeddings=True, torch_dtype="float32", max_position_embeddings=40960,
             hidden_act="silu", attention_bias=False, **SHAPES[shape])
    torch.manual_seed(0)
    Qwen(QwenConfig.from_dict(d)).save_pretrained(path)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = HFTok(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + TAGS)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return Qwen.from_pretrained(path, device=DEVICE, dtype=dtype), Tokenizer.from_pretrained(path)


def timed(fn, repeat=3):
    return timed_rounds({"fn": (fn, repeat)})["fn"]


def timed_rounds(fns):
    """{name: (fn, n)} -> {name: best seconds of n timed calls}, after one warm-up call each. The
    calls are interleaved round by round (a, b, a, b, ...) so a drift of the machine's speed (this
    VM's varies by 10-30%) hits every contender alike instead of whichever ran last."""
    best = {}
    for name, (fn, n) in fns.items():
        fn()  # warm-up
        best[name] = float("inf")
    for r in range(max(n for _, n in fns.values())):
        for name, (fn, n) in fns.items():
            if r >= n:
                continue
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def load(shape, dtype):
    """Our model, tokenizer and the folder (kept for transformers) of one random checkpoint;
    with --ckpt-dir the folder is kept and reused by later runs (a GPU script's several parts)."""
    if CKPT_DIR[0]:
        path = os.path.join(CKPT_DIR[0], shape)
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            model, tok = Qwen.from_pretrained(path, device=DEVICE, dtype=dtype), Tokenizer.from_pretrained(path)
            model.attn_impl = ATTN[0]
            return model, tok, path
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix=f"bench-{shape}-")
        atexit.register(shutil.rmtree, path, True)
    model, tok = make_checkpoint(path, shape, dtype)
    model.attn_impl = ATTN[0]
    return model, tok, path


def replay_ms(sampler, repeat=50):
    """GPU time of one captured decode step (the smallest-span graph of width 1), no Python around it."""
    fast = sampler.fast
    key = min((k for k in fast.graph if k[0] == 1), key=lambda k: k[:2], default=None) if fast is not None else None
    if key is None:
        return None
    fast.graph[key].replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fast.graph[key].replay()
    torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - t0) / repeat, 3)


def bench_decode(shapes, batches, new_tokens, prompt_len, dtype, hf_tokens=0, modes=None):
    """Serial greedy decoding of exactly new_tokens (stop tokens off) from a random prompt.
    hf_tokens: tokens for transformers generate (0 = new_tokens, < 0 = skip it)."""
    rows = []
    modes = modes or (["eager", "graph"] if torch.cuda.is_available() else ["eager"])
    hf_tokens = hf_tokens or new_tokens
    for shape in shapes:
        model, tok, path = load(shape, dtype)
        hf = None
        if hf_tokens > 0:
            import transformers
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(model.output_weight.device).eval()
        for B in batches:
            prompt = torch.randint(0, 256, (prompt_len,)).tolist()
            r = dict(model=shape, params_M=round(model.num_params() / 1e6, 1), batch=B, new_tokens=new_tokens)
            samplers, fns = {}, {}
            for mode in modes:
                sampler = samplers[mode] = Sampler(model, tok)
                sampler.stop_ids = set()                               # decode exactly new_tokens
                sampler.step_mode = mode
                sampler.compile_step = COMPILE[0] and mode in ("graph", "static")   # static: the CPU compiled step
                sampler.fuse_step = FUSE[0]
                p = SamplingParams(mode="serial", temperature=0, max_new_tokens=new_tokens)

                def ours(sampler=sampler, p=p):
                    with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[0]) if SDPA_BACKENDS[0] else contextlib.nullcontext():
                        sampler.generate([prompt] * B, params=p)
                fns[mode] = (ours, REPEAT[0])
            if hf is not None:
                x = torch.tensor([prompt] * B, device=model.output_weight.device)

                def theirs():
                    with torch.no_grad():
                        hf.generate(x, max_new_tokens=hf_tokens, min_new_tokens=hf_tokens, do_sample=False, pad_token_id=0)
                fns["hf"] = (theirs, 1 if hf_tokens < new_tokens else REPEAT[0])
            t = timed_rounds(fns)
            for mode, sampler in samplers.items():
                sfx = "" if mode == "eager" else "_" + mode
                r.update({f"ours{sfx}_tok_s": round(B * new_tokens / t[mode], 1), f"ours{sfx}_ms_step": round(1e3 * t[mode] / new_tokens, 2)})
                if mode == "graph":
                    r["graph_replay_ms"] = replay_ms(sampler)
                    r["fused"] = sampler.fast.fused is not None
                    r["drawn_in_step"] = sampler.fast.draws > 0
                    if PROFILE[0]:
                        profile_steps(sampler, [prompt] * B, f"{PROFILE[0]}_{shape}_bs{B}.txt")
                sampler.release()
            if hf is not None:
                best = min(t[m] for m in modes) / new_tokens
                r.update(hf_new_tokens=hf_tokens, hf_tok_s=round(B * hf_tokens / t["hf"], 1),
                         hf_ms_step=round(1e3 * t["hf"] / hf_tokens, 2), speedup=round(t["hf"] / hf_tokens / best, 2))
            print(" | ".join(f"{k} {v}" for k, v in r.items()), flush=True)
            rows.append(r)
        hf = None                                             # free it before the next shape
    return rows


def profile_steps(sampler, prompts, path, steps=16):
    """torch.profiler over `steps` decode steps of a warm sampler: what the GPU runs per step (kernels
    inside the replayed graphs included, where CUPTI reports them) and the host calls around it."""
    from torch.profiler import ProfilerActivity, profile
    p = SamplingParams(mode="serial", temperature=0, max_new_tokens=steps)
    sampler.generate(prompts, params=p)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sampler.generate(prompts, params=p)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    with open(path, "w") as f:
        f.write(f"{steps} steps (+ prefill); CUDA-side events: {kernels} ({kernels / steps:.0f} per step)\n")
        f.write(ev.table(sort_by="self_cuda_time_total", row_limit=40) + "\n")
        f.write(ev.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")


class Forced:
    """Steer that forces a fixed token script per stream (trunk script / per-branch scripts)."""

    def __init__(self, trunk, branch):
        self.trunk, self.branch = trunk, branch

    def __call__(self, drawing, logits):
        for i, (seq, st) in enumerate(drawing):
            if st.branch:
                script, done = self.branch(st.block, st.branch), len(st.tokens)
            else:
                script, done = self.trunk, sum(len(s.tokens) for s in seq.streams if s.branch == 0)
            logits[i] = float("-inf")
            logits[i, script[min(done, len(script) - 1)]] = 0.0
        return logits


def bench_parallel(shapes, widths, blocks, step_tokens, dtype):
    """The same trace (blocks x [guideline, k steps of step_tokens, takeaway]) in both modes."""
    rows = []
    for shape in shapes:
        model, tok, _ = load(shape, dtype)
        enc = tok.encode
        filler = enc("x" * 4)[:1]
        for k in widths:
            guide = enc("<guideline>\n" + "".join(f"<plan>{i}: p</plan>\n" for i in range(1, k + 1)) + "</guideline>")
            take = enc(npr.TAKEAWAY_HEADER) + enc("ok</takeaway>\n")
            trunk = (guide + enc("\n") + take) * blocks + enc("\\boxed{1}") + [tok.eos_id]
            body = lambda b, i: enc(npr.STEP_HEADER.format(n=i)) + filler * step_tokens + enc("</step>")
            serial_ids = []
            for b in range(blocks):
                serial_ids += guide + enc("\n") + [t for i in range(1, k + 1) for t in body(b, i) + enc("\n")] + take
            serial_ids += enc("\\boxed{1}") + [tok.eos_id]
            budget = len(serial_ids) + 64
            prompt = enc("<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n")
            sampler = Sampler(model, tok)
            pp = SamplingParams(mode="parallel", temperature=0, max_new_tokens=budget, max_total_tokens=budget)
            ps = SamplingParams(mode="serial", temperature=0, max_new_tokens=budget)
            out = {}
            t_par = timed(lambda: out.update(par=sampler.generate([prompt], params=pp, steer=Forced(trunk, body))[0][0]), 2)
            t_ser = timed(lambda: out.update(ser=sampler.generate([prompt], params=ps, steer=Forced(serial_ids, None))[0][0]), 2)
            par, ser = out["par"], out["ser"]
            assert par.finish_reason == "eos" and ser.finish_reason == "eos", (par.finish_reason, ser.finish_reason)
            assert sorted(par.ids) == sorted(ser.ids), "the two modes must decode the same tokens"
            r = dict(model=shape, k=k, blocks=blocks, step_tokens=step_tokens, total_tokens=len(par.ids),
                     critical_path=par.stats["critical_path_tokens"],
                     total_over_critical=round(len(par.ids) / par.stats["critical_path_tokens"], 2),
                     serial_s=round(t_ser, 3), parallel_s=round(t_par, 3), wall_speedup=round(t_ser / t_par, 2),
                     parallel_tok_s=round(len(par.ids) / t_par, 1), serial_tok_s=round(len(ser.ids) / t_ser, 1))
            print(" | ".join(f"{k_} {v}" for k_, v in r.items()), flush=True)
            rows.append(r)
            sampler.release()
    return rows


def ragged_lengths(n, lo=16, hi=2048, seed=0):
    """n answer lengths from a log-normal (median ~150 tokens, a long tail), clipped to [lo, hi]; fixed seed."""
    x = torch.empty(n).log_normal_(5.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return x.clamp(lo, hi).round().int().tolist()


class Ragged:
    """Steer: request i ends with eos at lengths[i] tokens; in parallel mode a request of at least 64
    tokens first writes a guideline of two plans and two steps of a third of its length each."""

    def __init__(self, tok, lengths, mode):
        self.lengths, self.eos, self.fill = lengths, tok.eos_id, tok.encode("x")[0]
        self.guide = tok.encode("<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>") if mode == "parallel" else []
        self.close = tok.encode("</step>")

    def __call__(self, drawing, logits):
        for i, (seq, st) in enumerate(drawing):
            L = self.lengths[seq.index]
            done = len(st.tokens) if st.branch else sum(len(s.tokens) for s in seq.streams if s.branch == 0)
            if st.branch:
                k = done - L // 3
                tok = self.fill if k < 0 else self.close[min(k, len(self.close) - 1)]
            elif L >= 64 and done < len(self.guide):
                tok = self.guide[done]
            else:
                tok = self.eos if seq.total + 1 >= L else self.fill
            logits[i] = float("-inf")
            logits[i, tok] = 0.0
        return logits


def bench_ragged(shapes, modes, n, rows, dtype, admit_every=1):
    """n requests of ragged lengths on `rows` rows: static batches (generate() per batch of rows, each
    waits for its longest) against continuous batching (generate_many: a finished row takes the next
    request at the next step). Slot utilization = busy row-steps / row-steps."""
    out = []
    lengths = ragged_lengths(n)
    for shape in shapes:
        model, tok, _ = load(shape, dtype)
        prompt = tok.encode("<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n")
        for mode in modes:
            p = SamplingParams(mode=mode, temperature=0, max_new_tokens=max(lengths) + 64)
            steer = Ragged(tok, lengths, mode)
            r = dict(model=shape, mode=mode, requests=n, rows=rows, admit_every=admit_every, mean_len=round(sum(lengths) / n, 1), max_len=max(lengths))
            for name in ("static", "continuous"):
                sampler = Sampler(model, tok)
                sampler.admit_every = admit_every
                t0 = time.perf_counter()
                if name == "static":
                    got = []
                    for i in range(0, n, rows):      # batch i's requests keep their index (the steer's lengths)
                        seqs = [sampler.add(prompt, p, j, j) for j in range(i, min(i + rows, n))]
                        sampler.max_rows, sampler.steer = len(seqs), steer
                        while sampler.waiting or sampler.running:
                            got += sampler.step()
                    got = [seq.to_sample() for seq in got]
                else:
                    got = [o[0] for o in sampler.generate_many([prompt] * n, 1, p, steer=steer, batch_rows=rows)[0]]
                wall = time.perf_counter() - t0
                c = sampler.counters
                toks = sum(s.stats["total_tokens"] for s in got)
                assert all(s.finish_reason == "eos" for s in got), {s.finish_reason for s in got}
                r.update({f"{name}_s": round(wall, 2), f"{name}_tok_s": round(toks / wall, 1), f"{name}_steps": c["steps"],
                          f"{name}_util": round(c["busy_row_steps"] / c["row_steps"], 3)})
                sampler.release()
            r["speedup"] = round(r["static_s"] / r["continuous_s"], 2)
            print(" | ".join(f"{k} {v}" for k, v in r.items()), flush=True)
            out.append(r)
    return out


def bench_serve(shapes, rows, long_tokens, dtype):
    """serve.py's engine: a batch of `rows` long answers (long_tokens each) decodes; after 10 steps one
    short request arrives. Its time to first token (seconds, engine steps) against the time the
    running batch still needed (what a static batch made it wait)."""
    import serve
    out = []
    for shape in shapes:
        model, tok, _ = load(shape, dtype)
        prompt = tok.encode("<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n")
        cfg = serve.Config(max_batch_rows=rows + 1, max_tokens_limit=long_tokens, max_prompt_tokens=len(prompt))
        engine = serve.Engine(model, tok, cfg)
        engine.sampler.stop_ids = set()                  # the long answers run to their budget
        p = SamplingParams(mode="serial", max_new_tokens=long_tokens)
        batch = serve.Job(prompt, rows, p, 1, stream=False)
        engine.submit(batch)
        while engine.counts["steps"] < 10:
            time.sleep(0.001)
        job = serve.Job(prompt, 1, SamplingParams(mode="serial", max_new_tokens=16), 2, stream=True)
        job.choices = [serve.ChoiceStream(tok)]
        t0, s0 = time.perf_counter(), engine.counts["steps"]
        engine.submit(job)
        job.events.get()                                 # its first delta
        ttft, ttft_steps = time.perf_counter() - t0, engine.counts["steps"] - s0
        batch.events.get()
        left, left_steps = time.perf_counter() - t0, engine.counts["steps"] - s0
        engine.close()
        r = dict(model=shape, rows=rows, long_tokens=long_tokens, ttft_s=round(ttft, 4), ttft_steps=ttft_steps,
                 batch_left_s=round(left, 3), batch_left_steps=left_steps)
        print(" | ".join(f"{k} {v}" for k, v in r.items()), flush=True)
        out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "parallel", "ragged", "serve", "all"])
    ap.add_argument("--shapes", default="tiny,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--hf-tokens", type=int, default=0, help="decode: tokens for transformers generate (0 = --new-tokens, -1 = skip)")
    ap.add_argument("--modes", default="", help="decode: our decode steps to time, e.g. eager,graph (default: both on CUDA)")
    ap.add_argument("--widths", default="2,4,5")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256, help="ragged: requests")
    ap.add_argument("--rows", type=int, default=32, help="ragged, serve: rows decoded together")
    ap.add_argument("--ragged-modes", default="serial,parallel")
    ap.add_argument("--admit-every", type=int, default=1, help="ragged: admit waiting requests every Nth step (batched prefills)")
    ap.add_argument("--long-tokens", type=int, default=512, help="serve: tokens of each answer of the running batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = default)")
    ap.add_argument("--attn", default="auto", help="attention impl of the model: auto (Triton on CUDA) | triton | sdpa")
    ap.add_argument("--compile", action="store_true", help="decode: the fast path through torch.compile too (use --attn sdpa)")
    ap.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                    help="decode: q/k/v and gate/up fused in the fast path (auto: with CUDA graphs)")
    ap.add_argument("--decode-sdpa", default="", help="decode: the SDPA kernels our sampler may use, e.g. efficient | math | cudnn | flash "
                    "(torch.nn.attention.sdpa_kernel around our generate calls; default: PyTorch's choice)")
    ap.add_argument("--profile", default="", help="decode, graph mode: write a torch.profiler table per batch to PREFIX_<shape>_bs<B>.txt")
    ap.add_argument("--ckpt-dir", default="", help="keep the random checkpoints here and reuse them (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="decode: timed calls per contender (best counts), interleaved")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ATTN[0], COMPILE[0], CKPT_DIR[0], REPEAT[0] = a.attn, a.compile, a.ckpt_dir, a.repeat
    FUSE[0], PROFILE[0] = {"auto": None, "on": True, "off": False}[a.fuse], a.profile
    if a.decode_sdpa:
        from torch.nn.attention import SDPBackend
        names = dict(efficient="EFFICIENT_ATTENTION", math="MATH", cudnn="CUDNN_ATTENTION", flash="FLASH_ATTENTION")
        SDPA_BACKENDS[0] = [getattr(SDPBackend, names[x]) for x in a.decode_sdpa.split(",")]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    res = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads(), attn=a.attn, compile=a.compile, fuse=a.fuse, decode_sdpa=a.decode_sdpa or "default",
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu")
    shapes = a.shapes.split(",")
    if a.what in ("decode", "all"):
        res["decode"] = bench_decode(shapes, [int(b) for b in a.batches.split(",")], a.new_tokens, a.prompt_len, dtype, a.hf_tokens,
                                     [m for m in a.modes.split(",") if m])
        if a.out:  # write what we have after each part: a GPU run may be cut short
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    if a.what in ("parallel", "all"):
        res["parallel"] = bench_parallel(shapes, [int(k) for k in a.widths.split(",")], a.blocks, a.step_tokens, dtype)
    if a.what in ("ragged", "all"):
        res["ragged"] = bench_ragged(shapes, a.ragged_modes.split(","), a.requests, a.rows, dtype, a.admit_every)
    if a.what in ("serve", "all"):
        res["serve"] = bench_serve(shapes, a.rows, a.long_tokens, dtype)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
