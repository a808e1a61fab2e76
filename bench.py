"""
Benchmarks of the sampler (results go into BENCHMARKS.md with the command, machine and date).

    python bench.py decode     # our sampler vs transformers generate: tokens/s, batch 1 and 16
    python bench.py parallel   # one forced trace decoded in parallel vs serial mode, k = 2, 4, 5
    python bench.py all --out bench.json

Models are random Qwen3-shaped checkpoints made here: "tiny" (the test size, 0.2M parameters)
and "100m" (hidden 768, 12 layers, vocab 32k: ~100M parameters). transformers is needed only for
the `decode` comparison. On CUDA the same code runs in bf16 (the GPU fast path is not written yet).
"""
import argparse
import json
import os
import platform
import tempfile
import time

import torch
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

from model import Qwen, QwenConfig, Tokenizer
from sampler import Sampler, SamplingParams

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
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
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return Qwen.from_pretrained(path, device=dev, dtype=dtype), Tokenizer.from_pretrained(path)


def timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_decode(shapes, batches, new_tokens, prompt_len, dtype):
    import transformers
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as path:
            model, tok = make_checkpoint(path, shape, dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(model.output_weight.device).eval()
        sampler = Sampler(model, tok)
        sampler.stop_ids = set()                               # decode exactly new_tokens
        for B in batches:
            prompt = torch.randint(0, 256, (prompt_len,)).tolist()
            p = SamplingParams(mode="serial", temperature=0, max_new_tokens=new_tokens)
            ours = timed(lambda: sampler.generate([prompt] * B, params=p))
            x = torch.tensor([prompt] * B, device=model.output_weight.device)
            with torch.no_grad():
                theirs = timed(lambda: hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   do_sample=False, pad_token_id=0))
            r = dict(model=shape, params_M=round(model.num_params() / 1e6, 1), batch=B, new_tokens=new_tokens,
                     ours_tok_s=round(B * new_tokens / ours, 1), hf_tok_s=round(B * new_tokens / theirs, 1),
                     ours_ms_step=round(1e3 * ours / new_tokens, 2), hf_ms_step=round(1e3 * theirs / new_tokens, 2),
                     speedup=round(theirs / ours, 2))
            print(" | ".join(f"{k} {v}" for k, v in r.items()), flush=True)
            rows.append(r)
    return rows


class Forced:
    """Steer that forces a fixed token script per stream (trunk script / per-branch scripts)."""

    def __init__(self, trunk, branch):
        self.trunk, self.branch = trunk, branch

    def __call__(self, requests, logits):
        for i, (row, st) in enumerate(requests):
            if st.branch:
                script, done = self.branch(st.block, st.branch), len(st.seg)
            else:
                script, done = self.trunk, sum(len(s) for s in row.segs if not s or s[0][4] == 0)
            logits[i] = float("-inf")
            logits[i, script[min(done, len(script) - 1)]] = 0.0
        return logits


def bench_parallel(shapes, widths, blocks, step_tokens, dtype):
    """The same trace (blocks x [guideline, k steps of step_tokens, takeaway]) in both modes."""
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as path:
            model, tok = make_checkpoint(path, shape, dtype)
        enc = tok.encode
        filler = enc("x" * 4)[:1]
        for k in widths:
            guide = enc("<guideline>\n" + "".join(f"<plan>{i}: p</plan>\n" for i in range(1, k + 1)) + "</guideline>")
            take = enc("<takeaway>\n") + enc("ok</takeaway>\n")
            trunk = (guide + enc("\n") + take) * blocks + enc("\\boxed{1}") + [tok.eos_id]
            body = lambda b, i: enc(f"<step>\n{i}:") + filler * step_tokens + enc("</step>")
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
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "parallel", "all"])
    ap.add_argument("--shapes", default="tiny,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--widths", default="2,4,5")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = default)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    res = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu")
    shapes = a.shapes.split(",")
    if a.what in ("decode", "all"):
        res["decode"] = bench_decode(shapes, [int(b) for b in a.batches.split(",")], a.new_tokens, a.prompt_len, dtype)
    if a.what in ("parallel", "all"):
        res["parallel"] = bench_parallel(shapes, [int(k) for k in a.widths.split(",")], a.blocks, a.step_tokens, dtype)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
