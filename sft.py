"""
Stage 2b (NPR-Beta): parallel SFT on the self-distilled trajectories, with branch isolation.

    python sft.py                                                     # the built-in default
    python sft.py --layout serial --out-dir out/sft_serial            # the same data as one causal sequence (SR-Beta)
    torchrun --nproc-per-node 8 sft.py --model Qwen3-4B-Instruct-2507 --data distill.jsonl \\
        --out-dir out/sft --lr 1e-6 --batch-size 8 --row-tokens 32768 --epochs 1 --fsdp

The method and the paper's settings are in NPR.md section 4, stage 2b: the tags become tokens, each
trajectory is put into the engine's exact bytes (npr.engine_pieces) with its block, branch and
positions (npr.token_layout), documents are packed into rows blind to each other, and the loss is a
token mean over the global batch. --layout serial trains the same ids and loss with a plain causal
mask and positions 0..n-1: the paper's sequential baseline. Malformed trajectories and ones longer
than a row are dropped and counted. torchrun: DDP, or FSDP2 with --fsdp. The final checkpoint goes to
--out-dir, resumable ones to --out-dir/last (rerunning resumes). The defaults are the built-in
default's (a 0.4M-parameter model: higher lr, more epochs than the paper's).
"""
import gc
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import npr
from checkpoint import resume_training, save_final, save_resume_point, start_training
from runs import (accumulating, all_reduce, autocast, check_choices, parse_cli, read_problems, warmup_cosine,
                  wrap_distributed)
from model import add_tag_tokens
from parallel_attention import Layout


@dataclass
class Config:
    model: str = "out/base"                   # the instruct / base model (HF layout)
    data: str = "out/distill/train.jsonl"     # distill.py output (prompt / question + trajectory)
    out_dir: str = "out/sft"
    layout: str = "parallel"                  # parallel: branch mask and shared positions (NPR-Beta) | serial: plain causal, positions 0..n-1 (SR-Beta)
    instruction_file: str = ""                # instruction of rows with only a "question" ("" = the checkpoint's own); travels with the output
    epochs: float = 8.0
    batch_size: int = 16                      # sequences per optimizer step (global, all ranks)
    row_tokens: int = 512                     # packed row length; the built-in default's documents are < 300 tokens (real runs: --row-tokens 32768)
    lr: float = 2e-3
    min_lr_frac: float = 0.0                  # cosine decays to lr * this
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    fsdp: bool = False                        # under torchrun: FSDP2 instead of DDP
    dtype: str = "float32"                    # weights and optimizer state (keep fp32: see --bf16)
    save_dtype: str = ""                      # dtype of the saved checkpoint: "" = the input model's (bf16 in -> bf16 out), or float32 / bfloat16
    bf16: bool = True                         # on CUDA: matmuls in bf16 under autocast
    attn_impl: str = "auto"                   # auto | triton | sdpa | ref
    save_every: int = 0                       # steps between resumable checkpoints (0 = only at the end)
    resume: bool = True                       # continue from out_dir/last when it exists
    seed: int = 0
    max_branches: int = 5
    threads: int = 0                          # torch CPU threads (0 = torch default)


# -----------------------------------------------------------------------------
# Data: trajectories -> (ids, positions, block, branch, loss mask) -> packed rows

def encode_example(tok, row, instruction, max_branches, layout="parallel"):
    """-> (dict(ids, pos, block, branch, loss) for prompt + response in the engine's form, None),
    or (None, reason). layout "serial": the same ids and loss as one causal sequence (no branch, no
    block, positions 0..n-1), the paper's sequential SFT."""
    user = row.get("prompt") or npr.build_prompt(row["question"], instruction)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": user}], enable_thinking=False))
    pieces, why = npr.engine_pieces(row["trajectory"], max_branches)
    if pieces is None:
        return None, why
    resp = [t for p in pieces for t in tok.encode(p)] + [tok.eos_id]
    lay = npr.token_layout([tok.decode_piece(t) for t in resp], start_pos=len(prompt), max_branches=max_branches)
    if lay.problems:
        return None, lay.problems[0]
    P, n = len(prompt), len(resp)
    if layout == "serial":                      # one causal sequence: no blocks, positions on from the prompt's
        lay = npr.TokenLayout([0] * n, [0] * n, list(range(P, P + n)), [])
    return dict(ids=prompt + resp, pos=list(range(P)) + lay.pos, block=[0] * P + lay.block,
                branch=[0] * P + lay.branch, loss=[0] * P + [1] * n), None


def pack(examples, row_tokens):
    """First-fit-decreasing packing into rows of <= row_tokens tokens, one doc id per example."""
    rows = []
    for ex in sorted(examples, key=lambda e: -len(e["ids"])):
        for r in rows:
            if r["n"] + len(ex["ids"]) <= row_tokens:
                break
        else:
            r = {"n": 0, "docs": []}
            rows.append(r)
        r["docs"].append(ex)
        r["n"] += len(ex["ids"])
    return [to_row(r["docs"]) for r in rows]


def to_row(docs):
    """Concatenate documents into one (1, T) row: ids, targets, positions and Layout."""
    cat = lambda key: [x for d in docs for x in d[key]]
    ids = torch.tensor([cat("ids")])
    # target of token t = token t+1 of the SAME document, where t+1 is an assistant token
    tgt = []
    for d in docs:
        tgt += [nxt if m else -100 for nxt, m in zip(d["ids"][1:], d["loss"][1:])] + [-100]
    doc = torch.tensor([[i for i, d in enumerate(docs) for _ in d["ids"]]], dtype=torch.int32)
    t32 = lambda key: torch.tensor([cat(key)], dtype=torch.int32)
    return dict(ids=ids, targets=torch.tensor([tgt]), pos=torch.tensor([cat("pos")]),
                layout=Layout(doc=doc, block=t32("block"), branch=t32("branch")))


def lr_at(step, total, cfg):   # linear warm-up over warmup_frac of the steps, then cosine to lr x min_lr_frac
    return warmup_cosine(step, total, max(1, int(cfg.warmup_frac * total)), cfg.lr, cfg.min_lr_frac)


# -----------------------------------------------------------------------------

def main(cfg: Config):
    check_choices(cfg, dict(layout=("parallel", "serial")))
    rank, world, dev, model, tok, resuming = start_training(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    if not resuming:                          # a resume point has the tag tokens already
        log("== add the tag tokens ==")
        add_tag_tokens(model, tok, npr.TAG_NAMES)
    n_params = model.num_params()

    log("== data: layouts, drops, packing ==")
    instruction = npr.instruction_for(cfg.model, cfg.instruction_file)
    examples, dropped = [], {}
    for r in read_problems(cfg.data, answer_field="answer", needs=("trajectory",), may=("prompt",)):
        ex, why = encode_example(tok, r, instruction, cfg.max_branches, cfg.layout)
        if ex is not None and len(ex["ids"]) > cfg.row_tokens:
            ex, why = None, f"longer than --row-tokens {cfg.row_tokens}"
        if ex is None:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            examples.append(ex)
    if not examples:
        raise ValueError(f"{cfg.data}: no usable trajectories (dropped: {dropped})")
    total_steps = max(1, int(math.ceil(len(examples) / cfg.batch_size) * cfg.epochs))
    log(f"trajectories {len(examples)} | dropped {sum(dropped.values())} {dropped} | "
        f"steps {total_steps} | params {n_params / 1e6:.2f}M")

    train_model = wrap_distributed(model, world, cfg.fsdp)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=dev.type == "cuda")
    step, records = resume_training(opt, cfg, resuming, rank, world, dev)

    log("== train ==")
    order = []
    for epoch in range(math.ceil(cfg.epochs) + 1):   # one fixed shuffle per epoch, so resuming replays it
        perm = list(range(len(examples)))
        random.Random(cfg.seed + epoch).shuffle(perm)
        order += perm
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        batch = [examples[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        rows = pack(batch[rank::world], cfg.row_tokens)
        n_tok = torch.tensor(float(sum(sum(e["loss"]) for e in batch)), device=dev)   # global loss tokens
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, cfg)
        n_rows = int(all_reduce(torch.tensor(len(rows), device=dev), world, "max"))   # the same on every rank
        loss_sum = 0.0
        for i in range(n_rows):
            # a rank with fewer rows runs an empty one (no loss tokens): the collectives stay in step
            r = rows[i] if i < len(rows) else to_row([dict(ids=[0], loss=[0], pos=[0], block=[0], branch=[0])])
            with accumulating(train_model, i == n_rows - 1), autocast(dev, cfg.bf16):
                lp = train_model(r["ids"].to(dev), r["pos"].to(dev), r["layout"].to(dev), targets=r["targets"].to(dev))
                # token mean over the global batch; DDP/FSDP average gradients over ranks, so x world
                loss = -lp.sum() * world / n_tok
                loss.backward()
            loss_sum += loss.item() / world
        if world > 1:
            loss_sum = all_reduce(torch.tensor(loss_sum, device=dev), world).item()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        tok_s = sum(len(e["ids"]) for e in batch) / dt
        rec = dict(step=step, loss=loss_sum, lr=opt.param_groups[0]["lr"], grad_norm=gnorm, tokens_per_s=tok_s,
                   step_s=dt)
        if dev.type == "cuda":   # model FLOPs utilisation against H100 dense bf16 peak (989 TFLOP/s)
            rec["mfu"] = 6 * n_params * tok_s / 989e12
        bar.update(1)
        if rank == 0:
            records.log(**rec)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save_resume_point(model, tok, opt, os.path.join(cfg.out_dir, "last"), cfg, cfg.model, step, rank, world)
    bar.close()
    save_final(model, tok, cfg.out_dir, cfg, cfg.model, rank, world)
    return model


if __name__ == "__main__":
    main(parse_cli(Config))
    gc.collect()   # free what still holds the process group while the interpreter lives: without it a gloo
    #                rank sometimes aborted at exit (~5% of 2-rank runs; 0 of 72 with it: BENCHMARKS.md 7)
