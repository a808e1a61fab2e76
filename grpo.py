"""
Stages 1 and 3: reinforcement learning with group rollouts, decoded serially or in parallel.

    python grpo.py                                       # the built-in default: PAPO on out/sft
    python grpo.py --mode serial --model out/sft_serial  # the same RL decoded serially (the paper's SR)
    python grpo.py --mode serial --model out/base --adv-std group --loss-mean token --ratio importance \
        --dynamic-sampling --overlong-buffer 10 --malformed grade     # stage 1 (NPR-Zero): DAPO's recipe

--mode picks only how rollouts decode; the recipe (advantage std, loss mean, ratio, dynamic sampling,
overlong penalty, what is dropped) is its own flags, PAPO's by default, so "the same RL, only serial"
is one flag. The method, both stages' official settings and where we differ (format reward flag,
dual-clip, bounded dynamic sampling, dropped rollouts, unbiased stds, no box = wrong): NPR.md section 4.
Both modes train on the exact sampled ids in the sampler's layout; forced tokens get no loss unless
--train-forced. --ratio importance: the clipped ratio exp(logp - logp_sampler), which moves off 1 in
a rollout batch's later updates (exact where the sampler's log-probs are the trainer's: see
rollout_model); --ratio onpolicy (PAPO): always 1. --repetition-penalty is off by default (NPR.md
section 5): on the built-in task a branch must repeat its answer's digits.
Logs one line per step, JSON lines in out_dir/metrics.jsonl, periodic eval, resumable checkpoints.
"""
import copy
import gc
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

import npr
from checkpoint import resume_training, save_final, save_resume_point, start_training
from metrics import evaluate, sample_metrics
from runs import (accumulating, all_gather, all_reduce, autocast, check_choices, check_context, parse_cli,
                  read_problems, warmup_cosine, wrap_distributed)
from parallel_attention import Layout
from sampler import Sampler, SamplingParams


@dataclass
class Config:
    mode: str = "parallel"                 # how rollouts decode: parallel (PAPO, NPR) | serial (NPR-Zero, SR); the recipe is separate
    model: str = "out/sft"
    data: str = "out/data/train.jsonl"
    eval_data: str = "out/data/test.jsonl"
    out_dir: str = "out/grpo"
    instruction_file: str = ""             # the instruction prompts end with ("" = the checkpoint's own, else npr.INSTRUCTION)
    steps: int = 60                        # rollout batches
    prompts_per_step: int = 16             # groups per rollout batch (global, all ranks)
    group_size: int = 8                    # rollouts per prompt (paper: 16)
    seqs_per_update: int = 32              # sequences per optimizer step (paper: 16)
    micro_batch: int = 8                   # sequences per forward/backward (gradient accumulation)
    # the recipe, whatever the decoding (defaults: PAPO; stage 1's DAPO: the docstring's third command)
    adv_std: str = "batch"                 # advantage = (r - group mean) / std of: batch (PAPO) | group (GRPO, DAPO)
    loss_mean: str = "seq"                 # seq: mean over sequences of each one's token mean (PAPO) | token: over all tokens (DAPO)
    ratio: str = "onpolicy"                # onpolicy: exp(logp - stopgrad(logp)) (PAPO) | importance: clipped, against the sampler's
    clip_low: float = 0.2
    clip_high: float = 0.28                # clip-higher (DAPO)
    clip_c: float = 10.0                   # dual-clip (official 10): a token with A < 0 loses at most c x |A| (0 = off)
    dynamic_sampling: bool = False         # drop groups whose scores are all equal and draw more prompts (DAPO)
    max_sampling_rounds: int = 4           # dynamic sampling: rounds of drawing per step at most (0 = until the batch is full)
    format_reward: bool = False            # the paper's format term: not well formed -> -1 - format_penalty
    format_penalty: float = 0.5
    overlong_buffer: int = 0               # DAPO's soft penalty over the last N tokens of the budget (0 = off; official stage 1: 10)
    malformed: str = "drop"                # structurally invalid rollouts: drop (PAPO) | penalize (reward -1) | grade (stage 1)
    budget_hit: str = "grade"              # rollouts that ran out of budget with their blocks closed: grade (official) | drop
    train_forced: bool = False             # put forced tokens (headers) into the loss
    lr: float = 5e-5                       # the built-in default (1e-4: faster, then unstable); paper: 1e-7 (PAPO on 4B), 1e-6 (NPR-Zero)
    lr_schedule: str = "constant"          # constant (PAPO) | cosine: linear warm-up, then cosine to lr x min_lr_ratio at --steps (stage 1)
    warmup_steps: int = 0                  # rollout batches of linear warm-up (official stage 1: 10)
    min_lr_ratio: float = 0.0              # cosine's floor, a fraction of lr (official: 1e-8)
    weight_decay: float = 0.0              # AdamW's, on every weight (official: 0.1 in both stages)
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 400              # token budget per rollout, all branches together
    max_branches: int = 5
    fork_min_tokens: int = 64              # fork only while this many tokens of the budget remain (official: 1024)
    repetition_penalty: float = 1.0        # rollouts, inside branches (official engine: 1.02; see above)
    rollout_rows: int = 512                # rows decoded together
    eval_every: int = 20                   # steps between evaluations (0 = never)
    eval_problems: int = 200
    save_every: int = 10                   # steps between resumable checkpoints
    resume: bool = True
    seed: int = 0
    dtype: str = "float32"                 # weights and optimizer state (keep fp32: see --bf16)
    save_dtype: str = ""  # dtype of the saved checkpoint: "" = the input model's (bf16 in -> bf16 out), or float32 / bfloat16
    bf16: bool = True                      # on CUDA: matmuls (rollouts and training) in bf16 under autocast
    rollout_copy: bool = True              # on CUDA with --bf16: roll out from a bf16 copy of the weights (CUDA graphs)
    fsdp: bool = False                     # under torchrun: FSDP2 (fully_shard per layer) instead of DDP
    attn_impl: str = "auto"
    grad_checkpointing: bool = False
    threads: int = 0


CHOICES = dict(mode=("parallel", "serial"), adv_std=("batch", "group"), loss_mean=("seq", "token"),
               ratio=("onpolicy", "importance"), malformed=("drop", "penalize", "grade"), budget_hit=("grade", "drop"),
               lr_schedule=("constant", "cosine"))


# -----------------------------------------------------------------------------
# Rewards, advantages and the loss: the algorithm in plain sight

def structure_problem(sample, mode):
    """Why a rollout is structurally invalid, or None: the parallel engine's malformed end; in serial
    mode the same grammar read from the text; in both, a block left open at the end (a step open, or
    no <takeaway> yet), which the official trainer cannot lay out and drops."""
    if sample.finish_reason.startswith("malformed"):
        return sample.finish_reason
    if mode == "serial" and (problems := npr.parse(sample.text, complete=False).problems):
        return "malformed: " + problems[0]
    if npr.open_block(sample.text):
        return "open block: the budget ran out inside a block" if sample.finish_reason == "budget" else \
            "open block: the answer ended inside a block"
    return None


def reward_of(sample, answer, cfg):
    """-> (reward, score, dropped reason or None); score: the reward before the overlong penalty."""
    why = structure_problem(sample, cfg.mode)
    if why and cfg.malformed == "drop":
        return None, None, why                                               # PAPO: dropped before scoring
    if sample.finish_reason == "budget" and cfg.budget_hit == "drop":
        return None, None, "budget hit"
    if why and cfg.malformed == "penalize":                                  # a bad format is a wrong answer
        score = -1.0
    else:   # an empty response is 0; any other is graded on its last \boxed{}: none at all is a wrong answer
        score = 0.0 if not sample.text.strip() else 1.0 if npr.grade(sample.text, answer) else -1.0
    if cfg.format_reward and (sample.finish_reason != "eos" or npr.format_score(sample.text)[0] != 0.0):
        score = -1.0 - cfg.format_penalty                                    # accuracy counts only when well formed
    L, budget, buf = sample.stats["total_tokens"], cfg.max_new_tokens, cfg.overlong_buffer
    penalty = max(-1.0, (budget - buf - L) / buf) if buf and L > budget - buf else 0.0   # DAPO soft overlong
    return score + penalty, score, None


def std(xs):   # unbiased (n - 1), as torch.std in the official trainer
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def advantages(groups, std_over="batch", batch=None):
    """groups: [[reward, ...] per prompt] -> same shape: (r - its group's mean) / (std + 1e-6), the std of
    `batch` (every reward of the step on all ranks; default: all of groups) or of the group."""
    s = std(batch or [r for g in groups for r in g])
    return [[(r - sum(g) / len(g)) / ((s if std_over == "batch" else std(g)) + 1e-6) for r in g] for g in groups]


def policy_loss(logp, old_logp, adv, mask, ratio_kind, clip_low, clip_high, norm, clip_c=0.0, mean="seq"):
    """logp/old_logp/mask (B, T); adv (B,). norm: the global count the sum is divided by (tokens for
    mean "token", sequences for "seq"), so that gradient accumulation and ranks add up."""
    A = adv[:, None]
    if ratio_kind == "onpolicy":
        per_tok = -torch.exp(logp - logp.detach()) * A                      # ratio == 1, gradient of logp
    else:                                                                    # PPO clip with clip-higher
        ratio = torch.exp(logp - old_logp)
        per_tok = -torch.minimum(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
        if clip_c > 0:                                                       # dual-clip
            per_tok = torch.where(A < 0, torch.minimum(per_tok, -clip_c * A), per_tok)
    per_tok = per_tok * mask
    if mean == "token":                                                      # token mean (DAPO)
        return per_tok.sum() / norm
    return (per_tok.sum(1) / mask.sum(1).clamp(min=1)).sum() / norm         # sum of each sequence's token mean


def lr_at(step, cfg):
    """The learning rate of rollout batch `step`: constant, or linear warm-up then cosine to lr x min_lr_ratio."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)


# -----------------------------------------------------------------------------
# Rollouts: the weights they decode with, their samples -> padded training batches

def rollout_model(model, cfg, dev, world):
    """-> (the model the rollouts decode with, whether under bf16 autocast). CUDA --bf16 --rollout-copy:
    a bf16 copy for the CUDA graphs (log-probs then differ by bf16 rounding: --ratio importance is
    close, not exact); FSDP2: a full copy of the weights, made before they are sharded; elsewhere the
    model itself."""
    to_bf16 = cfg.rollout_copy and cfg.bf16 and torch.device(dev).type == "cuda"
    if not (to_bf16 or (world > 1 and cfg.fsdp)):
        return model, cfg.bf16
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    return (copy_.to(torch.bfloat16) if to_bf16 else copy_), cfg.bf16 and not to_bf16


@torch.no_grad()
def sync_rollout_model(roll_model, model):
    """Copy the trained weights into the rollout copy (FSDP2: each shard gathered; every rank takes part)."""
    if roll_model is not model:
        for a, b in zip(roll_model.parameters(), model.parameters()):
            a.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)


def to_batch(items, train_forced, dev):
    """items: [(Sample, advantage)] -> ids, pos, Layout, targets, old log-probs (nan: forced), adv;
    each row the prompt then the response, right-padded."""
    ids, pos, doc, block, branch, targets, old = ([] for _ in range(7))
    for s, _ in items:
        P = len(s.prompt_ids)
        ids.append(s.prompt_ids + s.ids)
        pos.append(list(range(P)) + s.pos)
        doc.append([0] * len(ids[-1]))
        block.append([0] * P + s.block)
        branch.append([0] * P + s.branch)
        # response token i is predicted at index P+i-1 (the token before it in canonical order is the
        # previous token of its own stream: every segment starts with a forced token)
        targets.append([-100] * (P - 1) + [t if x or train_forced else -100 for t, x in zip(s.ids, s.sampled)])
        old.append([0.0] * (P - 1) + [lp if x else float("nan") for lp, x in zip(s.logprobs, s.sampled)])
    T = max(map(len, ids))

    def pad(rows, fill, dtype=torch.long):   # -> (B, T)
        return torch.tensor([r + [fill] * (T - len(r)) for r in rows], dtype=dtype, device=dev)
    layout = Layout(doc=pad(doc, -1, torch.int32), block=pad(block, 0, torch.int32), branch=pad(branch, 0, torch.int32))
    return (pad(ids, 0), pad(pos, 0), layout, pad(targets, -100), pad(old, 0.0, torch.float32),
            torch.tensor([a for _, a in items], device=dev))


def rollout(sampler, tok, problems, cfg, step, instruction, rank, world):
    """Sample groups for this rank's prompts; dynamic sampling in serial mode. -> (groups, each a
    list of (Sample, reward); every (Sample, answer) drawn; dropped counts by reason; wall seconds)"""
    per_rank = cfg.prompts_per_step // world
    groups, seen, dropped, wall, rounds = [], [], Counter(), 0.0, 0
    params = SamplingParams(mode=cfg.mode, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, max_branches=cfg.max_branches,
                            fork_min_tokens=cfg.fork_min_tokens, repetition_penalty=cfg.repetition_penalty,
                            seed=cfg.seed)
    max_rounds = (cfg.max_sampling_rounds or math.inf) if cfg.dynamic_sampling else 1
    while (need := per_rank - len(groups)) > 0 and rounds < max_rounds:
        # round 0: the same prompts on every rank, split by rank, each row's stream named by (step,
        # slot, sample): rollouts do not depend on the rank count. Later rounds draw per rank.
        rng = random.Random((cfg.seed * 1_000_003 + step) * 1009 + rounds * 7919 + (rank if rounds else 0))
        n_draw = cfg.prompts_per_step if rounds == 0 else 2 * need
        slots = list(range(n_draw))[rank::world] if rounds == 0 else list(range(n_draw))
        allpicks = [rng.randrange(len(problems)) for _ in range(n_draw)]
        picks = [allpicks[g] for g in slots]
        seeds = [(((cfg.seed * 1_000_003 + step) * 1009 + rounds) * 100_003 + (g if rounds == 0 else rank * n_draw + g))
                 * 1024 + j for g in slots for j in range(cfg.group_size)]
        prompts = [npr.chat_prompt(tok, problems[i]["question"], instruction) for i in picks]
        out, w = sampler.generate_many(prompts, cfg.group_size, params, seeds=seeds, batch_rows=cfg.rollout_rows)
        wall += w
        for i, samples in zip(picks, out):
            seen += [(s, problems[i]["answer"]) for s in samples]
            judged = [(s, *reward_of(s, problems[i]["answer"], cfg)) for s in samples]
            dropped.update(why.split(":")[0] for *_, why in judged if why is not None)
            kept = [(s, r, score) for s, r, score, why in judged if why is None]
            # no learning signal: too few left for a baseline, or (dynamic sampling) one score for all,
            # the score being the reward before the overlong penalty
            if len(kept) < 2 or cfg.dynamic_sampling and len({score for _, _, score in kept}) == 1:
                dropped["group too small" if len(kept) < 2 else "zero-variance group"] += len(kept)
            elif len(groups) < per_rank:
                groups.append([(s, r) for s, r, _ in kept])
        rounds += 1
    return groups, seen, dropped, wall


# -----------------------------------------------------------------------------
# The update, the step's log

def update(train_model, model, opt, items, cfg, world, dev):
    """Optimizer steps of seqs_per_update sequences (global) in micro-batches.
    -> (loss per step, grad norms, entropies, trained tokens)"""
    per_rank = max(1, cfg.seqs_per_update // world)
    n_updates = all_reduce(torch.tensor(math.ceil(len(items) / per_rank) if items else 0, device=dev), world, "max")
    losses, gnorms, ents, n_train_tok = [], [], [], 0
    for u in range(int(n_updates)):
        mb = items[u * per_rank:(u + 1) * per_rank]
        n_tok = sum(sum(bool(x) or cfg.train_forced for x in s.sampled) for s, _ in mb)
        n_train_tok += n_tok
        # the loss is a sum divided by a global count: tokens (token mean) or sequences (sequence mean)
        norm = all_reduce(torch.tensor(float(n_tok if cfg.loss_mean == "token" else len(mb)), device=dev), world)
        # every rank runs the same number of forward/backward passes, so DDP's all-reduces pair up
        n_micro = int(all_reduce(torch.tensor(max(1, math.ceil(len(mb) / cfg.micro_batch)), device=dev), world, "max"))
        loss_u = 0.0
        for j in range(n_micro):
            part = mb[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
            with accumulating(train_model, j == n_micro - 1), autocast(dev, cfg.bf16):
                if part:
                    ids, pos, layout, targets, old, A = to_batch(part, cfg.train_forced, dev)
                    mask = (targets >= 0).float()
                    logp, ent = train_model(ids, pos, layout, targets=targets, with_entropy=True)
                    old = torch.where(torch.isnan(old), logp.detach(), old)   # forced tokens: ratio 1
                    loss = policy_loss(logp, old, A, mask, cfg.ratio, cfg.clip_low, cfg.clip_high, norm.clamp(min=1),
                                       cfg.clip_c, cfg.loss_mean) * world   # DDP/FSDP average over ranks
                    ents.append(float((ent * mask).sum() / mask.sum().clamp(min=1)))
                else:   # nothing left on this rank: a zero-weight pass keeps DDP/FSDP collectives in step
                    z = torch.zeros(1, 1, dtype=torch.long, device=dev)
                    loss = train_model(z, None, Layout.causal(1, 1, dev), targets=torch.zeros_like(z)).sum() * 0.0
                loss.backward()
            loss_u += loss.item() / world
        gnorms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_u)
    return losses, gnorms, ents, n_train_tok


def log_step(step, seen, rewards, dropped, n_items, trained, roll_wall, t_train, world, dev):
    """The step's record over every rank's rollouts: sums and counts added over the ranks, then the means."""
    losses, gnorms, ents, n_train_tok = trained
    m, n = (sample_metrics(seen, roll_wall) if seen else {}), len(seen)
    forks = [b for s, _ in seen for b in s.stats["branches_per_fork"]]
    flat = [r for g in rewards for r in g]
    per_sample = ("accuracy", "format_valid", "trigger_rate", "mean_tokens", "mean_critical_tokens")   # x n: sums
    sums = dict({k: m.get(k, 0) * n for k in per_sample}, samples=n, branches=sum(forks), forks=len(forks),
                reward=sum(flat), rewards=len(flat), trained_seqs=n_items, loss=sum(losses), roll_wall=roll_wall,
                entropy=sum(ents), entropies=len(ents))
    if world > 1:
        t = all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=dev), world)
        sums = dict(zip(sums, t.tolist()))
    drops = all_gather(dropped, world)
    mean = lambda k, count="samples": sums[k] / max(sums[count], 1)
    return dict(step=step, reward=mean("reward", "rewards"), accuracy=mean("accuracy"),
                format_valid=mean("format_valid"), trigger_rate=mean("trigger_rate"),
                branches_per_fork=mean("branches", "forks"), trained_seqs=int(sums["trained_seqs"]),
                dropped={k: sum(d.get(k, 0) for d in drops) for d in drops for k in d},
                response_tokens=mean("mean_tokens"), critical_tokens=mean("mean_critical_tokens"),
                entropy=mean("entropy", "entropies"), loss=float(sums["loss"]), grad_norm=max(gnorms, default=0.0),
                rollout_tok_s=sums["mean_tokens"] / max(sums["roll_wall"] / world, 1e-9),
                train_tok_s=n_train_tok * world / max(t_train, 1e-9))


# -----------------------------------------------------------------------------

def main(cfg: Config):
    check_choices(cfg, CHOICES)
    rank, world, dev, model, tok, resuming = start_training(cfg)
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {world} ranks")
    roll_model, roll_autocast = rollout_model(model, cfg, dev, world)   # before FSDP2 shards the model
    sampler = Sampler(roll_model, tok)
    instruction = npr.instruction_for(cfg.model, cfg.instruction_file)
    problems = read_problems(cfg.data)
    eval_problems = read_problems(cfg.eval_data)[:cfg.eval_problems] if cfg.eval_every else []
    check_context(problems + eval_problems, tok, instruction, cfg.max_new_tokens, model)
    train_model = wrap_distributed(model, world, cfg.fsdp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    step, records = resume_training(opt, cfg, resuming, rank, world, dev)

    def maybe_evaluate(at_step):   # greedy decoding of the eval problems in the training mode: metrics.py's metrics
        if eval_problems and rank == 0 and cfg.eval_every and at_step % cfg.eval_every == 0:
            model.eval()
            params = SamplingParams(mode=cfg.mode, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                                    max_branches=cfg.max_branches, fork_min_tokens=cfg.fork_min_tokens)
            with autocast(dev, roll_autocast):
                m, _ = evaluate(sampler, tok, eval_problems, instruction, params, batch_rows=cfg.rollout_rows)
            print(f"eval step {at_step} | greedy {cfg.mode} accuracy {m['accuracy']:.3f} | format "
                  f"{m['format_valid']:.3f} | trigger {m['trigger_rate']:.3f}", flush=True)
            records.write(step=at_step, **{f"eval_{k}": v for k, v in m.items() if not isinstance(v, dict)})

    if step == 0:
        maybe_evaluate(0)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"grpo ({cfg.mode})", disable=rank != 0)
    while step < cfg.steps:
        t0 = time.perf_counter()
        # ---- rollouts (no grad), rewards, advantages ----
        model.eval()
        with autocast(dev, roll_autocast):
            groups, seen, dropped, roll_wall = rollout(sampler, tok, problems, cfg, step, instruction, rank, world)
        sampler.release()                     # the fast path's KV cache and graphs: not kept through training
        rewards = [[r for _, r in g] for g in groups]
        batch = [r for g in rewards for r in g]
        if cfg.adv_std == "batch":            # the batch std spans every rank's rollouts
            batch = [r for rank_batch in all_gather(batch, world) for r in rank_batch]
        adv = advantages(rewards, cfg.adv_std, batch) if rewards else []
        items = [(s, a) for g, ag in zip(groups, adv) for (s, _), a in zip(g, ag)]
        random.Random(step).shuffle(items)

        # ---- updates: seqs_per_update sequences per optimizer step ----
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        model.train()
        t_train = time.perf_counter()
        trained = update(train_model, model, opt, items, cfg, world, dev)
        sync_rollout_model(roll_model, model)  # the rollout copy follows the trained weights
        t_train = time.perf_counter() - t_train
        step += 1

        rec = log_step(step, seen, rewards, dropped, len(items), trained, roll_wall, t_train, world, dev)
        rec.update(lr=opt.param_groups[0]["lr"], step_s=time.perf_counter() - t0)
        bar.update(1)
        if rank == 0:
            records.log(**rec)
        maybe_evaluate(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_resume_point(model, tok, opt, os.path.join(cfg.out_dir, "last"), cfg, cfg.model, step, rank, world)
    bar.close()
    save_final(model, tok, cfg.out_dir, cfg, cfg.model, rank, world)
    return model


if __name__ == "__main__":
    main(parse_cli(Config))
    gc.collect()   # free what still holds the process group while the interpreter lives: without it a gloo
    #                rank sometimes aborted at exit (~5% of 2-rank runs; 0 of 72 with it: BENCHMARKS.md 7)
