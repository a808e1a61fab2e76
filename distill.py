"""
Stage 2a: self-distillation by rejection sampling (NPR.md section 4, stage 2a).

    python distill.py                                                  # the built-in default
    python distill.py --model Qwen3-4B-Instruct-2507 --data orz_math_57k.json --out out/distill.jsonl \\
        --max-new-tokens 30000 --batch-size 512
    torchrun --nproc-per-node 8 distill.py --model ... --data ...      # each rank samples a shard

Per problem, up to --max-tries serial samples; keep the FIRST one that is correct and format-perfect
(--reject-sibling-results: see sibling_numbers). Tries are drawn in rounds of --tries-per-round
per still-unsolved problem.

Output: SFT-ready JSONL (index, question, answer, prompt, trajectory, tries, format_score), plus
<out>.state.jsonl with one line per finished problem (accepted or not, tries, reasons). Rerunning
after a kill skips every finished problem: nothing written is lost. Data: JSONL / JSON with
--question-field / --answer-field, or the ORZ-math collection's layout as it comes.
"""
import itertools
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import npr
from checkpoint import load_checkpoint
from runs import (append_lines, atomic_write, check_context, init_distributed, lock_output, parse_cli, print_config,
                  read_jsonl, read_problems)
from sampler import Sampler, SamplingParams


@dataclass
class Config:
    model: str = "out/base"                 # the instruct model (or the stage-1 model)
    data: str = "out/data/train.jsonl"      # problems: JSONL / JSON / ORZ layout
    question_field: str = "question"
    answer_field: str = "answer"
    out: str = "out/distill/train.jsonl"    # accepted trajectories (SFT input)
    n_problems: int = 2000                  # first N problems (0 = all)
    max_tries: int = 8                      # samples per problem at most (paper: 8)
    tries_per_round: int = 2                # samples per unsolved problem per round
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 400               # paper: 30k on real models
    mode: str = "serial"                    # decoding used for sampling (paper: serial)
    fork_min_tokens: int = 64               # --mode parallel: fork only while this many tokens of the budget remain (official: 1024)
    reject_sibling_results: bool = False    # also drop samples whose steps use an earlier step's result (not in the paper)
    batch_size: int = 512                   # rows decoded together (problems x tries_per_round)
    chunk: int = 256                        # problems per resumable unit (written when done)
    instruction_file: str = ""             # the instruction prompts end with ("" = the checkpoint's own, else npr.INSTRUCTION)
    seed: int = 0
    device: str = ""                        # "" = cuda when available (under torchrun: the rank's GPU)
    bf16: bool = True                       # on CUDA: bf16 weights for decoding (fp32 checkpoints of sft/grpo too)
    dtype: str = ""


_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def sibling_numbers(text: str, question: str = "") -> list[tuple[int, int, str]]:
    """Results a step can only have read in an earlier sibling step: (block, step, number), from 1. A
    step's result is the last number it writes; a later step of the block that writes it too is
    flagged unless the question or the text before the block's first <step> holds it ("2: 17*6=102.
    92+102=194" takes 92, step 1's result). Results of one digit are ignored (too common to tell)."""
    found = []
    for bi, blk in enumerate(npr.parse(text).blocks, 1):
        if not blk.step_spans:
            continue
        seen = set(_NUMBER_RE.findall(question)) | set(_NUMBER_RE.findall(text, 0, blk.step_spans[0][0]))
        results = set()                               # the earlier steps' results
        for si, (_, _, a, b, _) in enumerate(blk.step_spans, 1):
            header = npr.HEADER_RE.match(text, a, b)
            nums = _NUMBER_RE.findall(text, header.end() if header else a, b)
            found += [(bi, si, n) for n in dict.fromkeys(nums) if n in results and n not in seen]
            results |= {n for n in nums[-1:] if len(n) > 1}     # single digits are everywhere: not evidence
    return found


def judge(sample, answer, question="", siblings=False):
    """-> None when the sample is kept, else why not; siblings: apply sibling_numbers too."""
    if sample.finish_reason != "eos":
        return f"unfinished ({sample.finish_reason.split(':')[0]})"
    score, problems = npr.format_score(sample.text)
    if score != 0.0:
        return "format: " + (problems[0].split(":")[-1].strip() if problems else "score")
    if not npr.grade(sample.text, answer):
        return "wrong answer"
    if siblings and sibling_numbers(sample.text, question):
        return "a step uses an earlier step's result"
    return None


def read_done(state_path):
    """Problems already finished, by index, from the state file (a torn last line after a kill is ignored)."""
    return {r["index"]: r for r in read_jsonl(state_path) if "index" in r}


def distill_chunk(sampler, tok, items, cfg, instruction, seed):
    """items: [(index, problem)] -> (accepted rows, state rows). Rounds of tries until solved."""
    prompts = {i: npr.chat_prompt(tok, p["question"], instruction) for i, p in items}
    probs = dict(items)
    tries, reasons, kept = Counter(), {i: Counter() for i, _ in items}, {}
    params = SamplingParams(mode=cfg.mode, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, fork_min_tokens=cfg.fork_min_tokens)
    for rnd in itertools.count():
        todo = [i for i, _ in items if i not in kept and tries[i] < cfg.max_tries]
        if not todo:
            break
        n = min(cfg.tries_per_round, cfg.max_tries - min(tries[i] for i in todo))
        # one continuous-batching call per round; the seeds are those of chunks of batch_size rows
        per_call = max(1, cfg.batch_size // n)
        seeds = [(seed * 1000 + rnd * 100 + c) * 1000003 + j for c in range(0, len(todo), per_call)
                 for j in range(len(todo[c:c + per_call]) * n)]
        out, _ = sampler.generate_many([prompts[i] for i in todo], n, params, seeds=seeds, batch_rows=cfg.batch_size)
        for i, samples in zip(todo, out):
            for s in samples:
                if i in kept or tries[i] >= cfg.max_tries:
                    break
                tries[i] += 1
                why = judge(s, probs[i]["answer"], probs[i]["question"], cfg.reject_sibling_results)
                if why is None:
                    kept[i] = s
                else:
                    reasons[i][why] += 1
    accepted = [dict(index=i, question=p["question"], answer=p["answer"],
                     prompt=npr.build_prompt(p["question"], instruction), trajectory=kept[i].text, tries=tries[i],
                     format_score=0.0) for i, p in items if i in kept]
    return accepted, [dict(index=i, accepted=i in kept, tries=tries[i], reasons=dict(reasons[i])) for i, _ in items]


def summarize(done, out_path, wall_s):
    """Problems tried, accepted, mean tries, rejection reasons (counted over all rejected tries)."""
    acc = [r for r in done.values() if r["accepted"]]
    reasons = sum((Counter(r["reasons"]) for r in done.values()), Counter())
    # dedupe the output file (a kill between the two appends may repeat a chunk); the rewrite is
    # atomic: a kill or a full disk in the middle must not empty a file the state calls done
    rows = {}
    if os.path.isfile(out_path):
        for x in read_jsonl(out_path):
            rows.setdefault(x["index"], json.dumps(x) + "\n")
        atomic_write(out_path, rows.values())
    return dict(problems=len(done), accepted=len(acc), acceptance=len(acc) / max(len(done), 1),
                mean_tries_accepted=sum(r["tries"] for r in acc) / max(len(acc), 1),
                rejected_tries=dict(reasons.most_common()), trajectories=len(rows), wall_s=round(wall_s, 1))


def main(cfg: Config):
    rank, world, _, dev = init_distributed()
    lock_output(cfg.out + ".lock", rank, world)       # a second run on the same output is refused
    dev = torch.device(cfg.device) if cfg.device else dev
    if rank == 0:
        print_config(cfg)
    problems = read_problems(cfg.data, cfg.question_field, cfg.answer_field)[:cfg.n_problems or None]
    model, tok = load_checkpoint(cfg.model, dev, cfg.dtype, cfg.bf16)
    sampler = Sampler(model, tok)
    instruction = npr.instruction_for(cfg.model, cfg.instruction_file)
    check_context(problems, tok, instruction, cfg.max_new_tokens, model)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    shard = cfg.out if world == 1 else f"{cfg.out}.rank{rank}"
    state_path = shard + ".state.jsonl"
    done = read_done(state_path)
    mine = [(i, p) for i, p in enumerate(problems) if i % world == rank and i not in done]
    print(f"rank {rank}: {len(problems)} problems, {len(done)} done before, {len(mine)} to go", flush=True)

    bar = tqdm(total=len(mine), desc="distill", unit="problem", disable=rank != 0)
    t0 = time.perf_counter()
    for c in range(0, len(mine), cfg.chunk):
        items = mine[c:c + cfg.chunk]
        accepted, state = distill_chunk(sampler, tok, items, cfg, instruction, seed=cfg.seed + items[0][0])
        # trajectories first, then the state: a kill between the two re-does the chunk (duplicates are
        # removed when reading), never skips it
        append_lines(shard, [json.dumps(r) for r in accepted])
        append_lines(state_path, [json.dumps(r) for r in state])
        done.update((r["index"], r) for r in state)
        bar.update(len(items))
        bar.set_postfix(accept=f"{sum(r['accepted'] for r in done.values()) / len(done):.1%}")
    bar.close()

    if world > 1:
        dist.barrier()
    if rank == 0:
        if world > 1:   # merge the shards (and their states) into cfg.out, in problem order
            rows = {x["index"]: x for r in range(world) for x in read_jsonl(f"{cfg.out}.rank{r}")}
            done = {i: x for r in range(world) for i, x in read_done(f"{cfg.out}.rank{r}.state.jsonl").items()}
            atomic_write(cfg.out, (json.dumps(rows[i]) + "\n" for i in sorted(rows)))
            atomic_write(cfg.out + ".state.jsonl", (json.dumps(done[i]) + "\n" for i in sorted(done)))
        summary = summarize(done, cfg.out, time.perf_counter() - t0)
        print(json.dumps(summary, indent=2))
        atomic_write(os.path.splitext(cfg.out)[0] + ".summary.json", json.dumps(summary, indent=2))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_cli(Config))
