"""
Optional reading: where a checkpoint's parallel answers to the built-in task (toy.py) go wrong.

    python extras/toy_diagnose.py --model out/grpo            # first 200 test problems x 4 samples

Samples in parallel mode with eval.py's settings (T=1, top-p 0.7) and sorts every answer into one
of four kinds: right; "step" (a step's result is not its product); "copy" (the takeaway's operands
are not the steps' results: it mis-copied one); "add" (operands right, the sum wrong).
"""
import os
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import npr
from checkpoint import load_checkpoint
from runs import parse_cli, read_problems
from sampler import Sampler, SamplingParams

KINDS = ("right", "step", "copy", "add")


@dataclass
class Config:
    model: str = "out/grpo"              # checkpoint folder
    data: str = "out/data/test.jsonl"    # the built-in task's test problems
    n: int = 200                         # first n problems
    k: int = 4                           # samples per problem
    max_new_tokens: int = 512


def parse_terms(question):
    """[(a, b), ...] of "Compute a1*b1 + a2*b2 + ..."."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)\*(\d+)", question)]


def answer_error(text, terms):
    """Where a tagged answer to `terms` goes wrong: one of KINDS. The takeaway chain a+b=c+d=e has
    the operands a, b, d, ..."""
    prods = [a * b for a, b in terms]
    parsed = npr.parse(text)
    if parsed.answer is not None and parsed.answer.strip() == str(sum(prods)):
        return "right"
    block = parsed.blocks[0] if parsed.blocks else None
    res = {}                                             # step number -> the last number it wrote
    for step in block.steps if block else []:
        nums = re.findall(r"\d+", step)                  # "N: ...=92" or "N: ...=92 #N:92"
        if len(nums) > 1 and re.match(r"\s*\d+:", step):
            res[int(nums[0])] = int(nums[-1])
    if [res.get(i) for i in range(1, len(prods) + 1)] != prods:
        return "step"
    nums = [int(x) for x in re.findall(r"\d+", block.takeaway or "")]
    return "copy" if sorted(nums[:2] + nums[3::2]) != sorted(prods) else "add"


def main(cfg: Config):
    model, tok = load_checkpoint(cfg.model, "cuda" if torch.cuda.is_available() else "cpu", "", True)
    probs, ins = read_problems(cfg.data)[:cfg.n], npr.instruction_for(cfg.model, "")
    params = SamplingParams(mode="parallel", temperature=1.0, top_p=0.7, max_new_tokens=cfg.max_new_tokens)
    prompts = [npr.chat_prompt(tok, q["question"], ins) for q in probs]      # as eval.py prompts
    got, _ = Sampler(model, tok).generate_many(prompts, cfg.k, params, progress=True, batch_rows=256)
    kinds = [answer_error(s.text, parse_terms(q["question"])) for q, ss in zip(probs, got) for s in ss]
    out = {k: kinds.count(k) for k in KINDS}
    print(f"{cfg.model}: {len(kinds)} parallel answers: "
          + ", ".join(f"{k} {v} ({v / len(kinds):.3f})" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main(parse_cli(Config))
