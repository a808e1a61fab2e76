"""
Evaluate a checkpoint with the metrics of NPR.md section 6, in serial and/or parallel decoding.

    python eval.py                                   # the built-in default (out/grpo on out/data/test.jsonl)
    python eval.py --model DIR --data FILE --mode parallel -k 8 --max-new-tokens 30000

Metrics (per mode):
- avg@k: mean correctness over k samples per problem (last brace-matched \\boxed{}, npr.is_equiv), and
  its standard error over problems (sd of the per-problem means / sqrt(N));
- format validity: share of samples that finished with EOS and score 0 under npr.format_score;
- parallel trigger rate: share of samples in which at least one guideline actually forked into
  >= 2 branches (steps written serially near the budget do not count; serial mode: share whose text
  holds a block with >= 2 steps, i.e. would fork);
- branches per fork (mean over forks);
- tokens/s counting every branch token (all tokens of all samples / wall time of generation);
- time-to-answer, one request: the first --latency-n problems answered one at a time (one prompt,
  one sample, the same sampling settings), mean wall seconds per answer: the latency a user of
  serve.py would see on an idle machine, the number parallel decoding is meant to lower;
- time-to-answer in the batch: mean seconds from the start of a batch to the end of a sample (same
  batch size in both modes). On a compute-bound machine (a 2-core CPU at 256 rows) it follows the
  total work, not the critical path, so it is reported beside the one-request figure, not instead;
- total / critical-path tokens (sum over samples of each): how much work ran side by side.
Running both modes prints the parallel/serial ratios side by side. A JSON report is written.
Budget: --budget total (the default, the official rule) bounds all tokens of all branches by
--max-new-tokens, so serial and parallel get the same amount of work; --budget critical bounds the
critical path instead (parallel may then write up to --max-branches x as many tokens in all). Each
mode's budget is printed and stored in the report.
Official settings: k = 8, T = 1.0, top-p 0.7 (the defaults here), repetition penalty 1.02 inside
branches (pass --repetition-penalty 1.02 for the paper's runs; the default 1.0 keeps the built-in
default's decoding as trained, and its fast path drawing in the decode step).
"""
import json
import os
import time
from dataclasses import dataclass

import torch

import npr
from checkpoint import load_checkpoint
from metrics import evaluate
from runs import atomic_write, check_context, parse_cli, print_config, read_problems
from sampler import Sampler, SamplingParams


@dataclass
class Config:
    model: str = "out/grpo"             # checkpoint folder (HF layout)
    data: str = "out/data/test.jsonl"   # JSONL/JSON problems, or the ORZ layout
    question_field: str = "question"
    answer_field: str = "answer"
    mode: str = "both"                  # serial | parallel | both
    k: int = 8                          # samples per problem (avg@k)
    n_problems: int = 0                 # first N problems only (0 = all)
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 512           # token budget per sample, counted as --budget says
    budget: str = "total"               # total: all tokens of all branches (official) | critical: the critical path
    max_total_tokens: int = 0           # --budget critical: cap on all tokens (0 = max_branches x max_new_tokens)
    max_branches: int = 5
    fork_min_tokens: int = 64           # parallel: fork only while this many tokens of the budget remain (official: 1024)
    repetition_penalty: float = 1.0     # parallel mode, inside branches only (official: 1.02)
    batch_size: int = 256               # rows (problems x k) decoded together
    latency_n: int = 50                 # problems answered alone (batch 1) for time-to-answer (0 = skip)
    instruction_file: str = ""             # the instruction prompts end with ("" = the checkpoint's own, else npr.INSTRUCTION)
    seed: int = 0
    device: str = ""                    # "" = cuda when available
    bf16: bool = True                   # on CUDA: bf16 weights for decoding (fp32 checkpoints of sft/grpo too)
    dtype: str = ""                     # "" = checkpoint dtype (bfloat16 / float16 / float32)
    out: str = ""                       # report path ("" = <model>/eval.json)


def table(report):
    cols = ["accuracy", "accuracy_se", "format_valid", "trigger_rate", "branches_per_fork", "tokens_per_s",
            "time_to_answer_1_s", "time_to_answer_s", "total_over_critical", "mean_tokens"]
    lines = ["| mode | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for mode in ("serial", "parallel"):
        if mode in report:
            lines.append(f"| {mode} | " + " | ".join(f"{report[mode][c]:.3g}" if c in report[mode] else "-"
                                                     for c in cols) + " |")
    if "speedup" in report:
        lines.append("| parallel / serial | " + " | ".join(
            f"{report['speedup'][c]:.3g}" if c in report["speedup"] else "" for c in cols) + " |")
    return "\n".join(lines)


def standard_error(problems, got):
    """The evaluation's own standard error of avg@k: the problems are the sample (their k samples are
    not independent of each other), so SE = sd over problems of each one's mean correctness / sqrt(N).
    -> {accuracy_se, per_problem: [mean correctness of each problem]} (the table's pooled errors use them)."""
    per = [sum(npr.grade(s.text, p["answer"]) for s in ss) / max(len(ss), 1) for p, ss in zip(problems, got)]
    n, m = len(per), sum(per) / max(len(per), 1)
    sd = (sum((x - m) ** 2 for x in per) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return dict(accuracy_se=sd / max(n, 1) ** 0.5, per_problem=per)


def one_request_latency(sampler, prompts, params, k):
    """Answer each prompt alone (batch 1, one sample; seeded like the first of its k samples in the
    batched run, so it is the same sample) -> mean seconds per answer and what it decoded."""
    sampler.generate(prompts[:1], n=1, params=params, seeds=[params.seed * 1000003])   # warm-up, not timed
    secs, toks, crit = [], 0, 0
    for i, x in enumerate(prompts):
        t0 = time.perf_counter()
        s = sampler.generate([x], n=1, params=params, seeds=[params.seed * 1000003 + i * k])[0][0]
        secs.append(time.perf_counter() - t0)
        toks, crit = toks + s.stats["total_tokens"], crit + s.stats["critical_path_tokens"]
    n = max(len(prompts), 1)
    return dict(time_to_answer_1_s=sum(secs) / n, latency_problems=len(prompts),
                latency_tokens=toks / n, latency_critical_tokens=crit / n)


def main(cfg: Config):
    print_config(cfg)
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_checkpoint(cfg.model, dev, cfg.dtype, cfg.bf16)
    problems = read_problems(cfg.data, cfg.question_field, cfg.answer_field)[:cfg.n_problems or None]
    instruction = npr.instruction_for(cfg.model, cfg.instruction_file)
    check_context(problems, tok, instruction, cfg.max_new_tokens, model)
    sampler = Sampler(model, tok)
    report = dict(model=cfg.model, data=cfg.data, k=cfg.k, problems=len(problems))
    modes = ["serial", "parallel"] if cfg.mode == "both" else [cfg.mode]
    for mode in modes:
        rp = cfg.repetition_penalty if mode == "parallel" else 1.0          # it acts inside branches only
        settings = dict(budget=cfg.budget, max_new_tokens=cfg.max_new_tokens, repetition_penalty=rp)
        print(f"== {mode} decoding: {len(problems)} problems x {cfg.k} | budget {cfg.budget} "
              f"({'all tokens of all branches' if cfg.budget == 'total' else 'critical path'}): "
              f"{cfg.max_new_tokens} tokens ==", flush=True)
        params = SamplingParams(mode=mode, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, budget=cfg.budget,
                                max_total_tokens=cfg.max_total_tokens, max_branches=cfg.max_branches,
                                fork_min_tokens=cfg.fork_min_tokens, repetition_penalty=rp, seed=cfg.seed)
        report[mode], got = evaluate(sampler, tok, problems, instruction, params, cfg.k, cfg.batch_size, progress=True)
        report[mode].update(standard_error(problems, got))
        report[mode].update(settings)
        if cfg.latency_n:
            prompts = [npr.chat_prompt(tok, p["question"], instruction) for p in problems[:cfg.latency_n]]
            report[mode].update(one_request_latency(sampler, prompts, params, cfg.k))
    if len(modes) == 2:
        s, p = report["serial"], report["parallel"]
        report["speedup"] = {c: p[c] / max(s[c], 1e-9) for c in ("tokens_per_s", "time_to_answer_1_s", "time_to_answer_s")
                             if c in p and c in s}
    print(table(report))
    out = cfg.out or os.path.join(cfg.model, "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    atomic_write(out, json.dumps(report, indent=2))
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main(parse_cli(Config))
