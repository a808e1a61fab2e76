"""
Stages 1 and 3: reinforcement learning with group rollouts, serial (NPR-Zero) or parallel (PAPO).

    python grpo.py                                       # the built-in default: PAPO on out/sft
    python grpo.py --mode serial --model out/base        # stage 1 (NPR-Zero) on the default
    torchrun --nproc-per-node 8 grpo.py --model out/sft --data orz.json --lr 1e-7 --fsdp \\
        --prompts-per-step 16 --group-size 16 --seqs-per-update 16 --max-new-tokens 30000

The method, the official settings and where we differ (format reward flag, dual-clip, bounded
dynamic sampling, dropped rollouts, unbiased stds, no box = wrong) are in NPR.md section 4; rewards,
advantages and the loss are written out below (reward_of, advantages, policy_loss). Both modes
train on the exact sampled ids with the sampler's layout; forced tokens get no loss unless
--train-forced. --ratio importance: the later mini-batches of a rollout batch use the true ratio
exp(logp - logp_sampler) with the clip (exact where the sampler's log-probs are the trainer's: see
cli.rollout_model); --ratio onpolicy (PAPO) sets it to 1. --repetition-penalty is off by default (NPR.md
section 5): on the built-in task a branch must repeat its answer's digits.
Logs one line per step, JSON lines in out_dir/metrics.jsonl, periodic eval, resumable checkpoints.
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import npr
from checkpoint import save_final, save_resume_point
from cli import (accumulating, all_gather, all_reduce, autocast, chat_prompt, check_context, instruction_for, parse_cli,
                 read_problems, resume_training, rollout_model, start_training, sync_rollout_model, wrap_distributed)
from parallel_attention import Layout
from sampler import Sampler, SamplingParams


@dataclass
class Config:
    mode: str = "parallel"                 # parallel (PAPO, stage 3) | serial (NPR-Zero, stage 1)
    model: str = "out/sft"
    data: str = "out/data/train.jsonl"
    eval_data: str = "out/data/test.jsonl"
    out_dir: str = "out/grpo"
    instruction: str = ""                  # "" = the checkpoint's own, else npr.INSTRUCTION
    steps: int = 60                        # rollout batches
    prompts_per_step: int = 16             # groups per rollout batch (global, all ranks)
    group_size: int = 8                    # rollouts per prompt (paper: 16)
    seqs_per_update: int = 32              # sequences per optimizer step (paper: 16)
    micro_batch: int = 8                   # sequences per forward/backward (gradient accumulation)
    ratio: str = ""                        # onpolicy | importance ("" = onpolicy for parallel, importance for serial)
    clip_low: float = 0.2
    clip_high: float = 0.28                # clip-higher (DAPO)
    clip_c: float = 10.0                   # dual-clip (official 10): a token with A < 0 loses at most c x |A| (0 = off)
    dynamic_sampling: bool = True          # serial mode: drop zero-variance groups, draw more prompts
    max_sampling_rounds: int = 4
    format_reward: bool = False            # serial mode: the paper's format term
    format_penalty: float = 0.5
    overlong_buffer: int = -1              # serial mode: soft penalty in the last N tokens of the budget (-1 = budget/8)
    malformed: str = "drop"                # parallel mode: drop malformed rollouts (paper) | penalize (reward -1)
    train_forced: bool = False             # put forced tokens (headers) into the loss
    lr: float = 5e-5                       # the built-in default (1e-4: faster, then unstable); paper: 1e-7 (PAPO on 4B), 1e-6 (NPR-Zero)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 400              # token budget per rollout, counted as the sampler does (default: all branches)
    max_branches: int = 5
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


# -----------------------------------------------------------------------------
# Rewards, advantages and the loss: the algorithm in plain sight

def reward_of(sample, answer, cfg):
    """-> (reward, score, dropped reason or None); score: the reward before the overlong penalty."""
    if cfg.mode == "parallel":
        if sample.finish_reason.startswith("malformed"):
            if cfg.malformed == "penalize":                                  # our option: a bad format is a wrong answer
                return -1.0, -1.0, None
            return None, None, sample.finish_reason                          # the paper: dropped before scoring
        if sample.finish_reason == "budget":
            return None, None, "over budget"
    # an empty response is 0; any other is graded on its last \boxed{}: none at all is a wrong answer
    score = 0.0 if not sample.text.strip() else 1.0 if npr.grade(sample.text, answer) else -1.0
    if cfg.mode == "parallel":
        return score, score, None
    if cfg.format_reward and (sample.finish_reason != "eos" or npr.format_score(sample.text)[0] != 0.0):
        score = -1.0 - cfg.format_penalty                                    # accuracy counts only when well formed
    L, budget = sample.stats["critical_path_tokens"], cfg.max_new_tokens
    buf = cfg.overlong_buffer if cfg.overlong_buffer >= 0 else budget // 8
    penalty = max(-1.0, (budget - buf - L) / buf) if buf and L > budget - buf else 0.0   # DAPO soft overlong
    return score + penalty, score, None


def std(xs):   # unbiased (n - 1), as torch.std in the official trainer
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def advantages(groups, mode, batch=None):
    """groups: [[reward, ...] per prompt] -> same shape; (r - group mean) / (std + 1e-6), the std of the
    group (serial) or of `batch`, every reward of the step on all ranks (parallel; default: groups)."""
    if mode == "parallel":
        s = std(batch or [r for g in groups for r in g])
        return [[(r - sum(g) / len(g)) / (s + 1e-6) for r in g] for g in groups]
    return [[(r - sum(g) / len(g)) / (std(g) + 1e-6) for r in g] for g in groups]


def policy_loss(logp, old_logp, adv, mask, mode, ratio_kind, clip_low, clip_high, norm, clip_c=0.0):
    """logp/old_logp/mask (B, T); adv (B,). norm: the global count the sum is divided by (tokens for
    serial, sequences for parallel), so that gradient accumulation and ranks add up."""
    A = adv[:, None]
    if ratio_kind == "onpolicy":
        per_tok = -torch.exp(logp - logp.detach()) * A                      # ratio == 1, gradient of logp
    else:                                                                    # PPO clip with clip-higher
        ratio = torch.exp(logp - old_logp)
        per_tok = -torch.minimum(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
        if clip_c > 0:                                                       # dual-clip
            per_tok = torch.where(A < 0, torch.minimum(per_tok, -clip_c * A), per_tok)
    per_tok = per_tok * mask
    if mode == "serial":                                                     # token mean (DAPO)
        return per_tok.sum() / norm
    seq_mean = per_tok.sum(1) / mask.sum(1).clamp(min=1)                     # sequence mean of token means
    return seq_mean.sum() / norm


# -----------------------------------------------------------------------------
# Rollouts -> padded training batches

def to_batch(items, train_forced, dev):
    """items: [(Sample, advantage)] -> ids, pos, Layout, targets, old log-probs, mask, adv (padded)."""
    T = max(len(s.prompt_ids) + len(s.ids) for s, _ in items)
    B = len(items)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.int32)
    block = torch.zeros(B, T, dtype=torch.int32)
    branch = torch.zeros(B, T, dtype=torch.int32)
    targets = torch.full((B, T), -100, dtype=torch.long)
    old = torch.zeros(B, T)
    for b, (s, _) in enumerate(items):
        P, n = len(s.prompt_ids), len(s.ids)
        ids[b, :P + n] = torch.tensor(s.prompt_ids + s.ids)
        pos[b, :P + n] = torch.tensor(list(range(P)) + s.pos)
        doc[b, :P + n] = 0
        block[b, P:P + n] = torch.tensor(s.block, dtype=torch.int32)
        branch[b, P:P + n] = torch.tensor(s.branch, dtype=torch.int32)
        # response token i is predicted at index P+i-1 (the token before it in canonical order is the
        # previous token of its own stream: every segment starts with a forced token)
        keep = torch.tensor([bool(x) or train_forced for x in s.sampled])
        tgt = torch.tensor(s.ids).masked_fill(~keep, -100)
        targets[b, P - 1:P - 1 + n] = tgt
        old[b, P - 1:P - 1 + n] = torch.tensor([lp if x else float("nan") for lp, x in zip(s.logprobs, s.sampled)])
    adv = torch.tensor([a for _, a in items])
    layout = Layout(doc=doc, block=block, branch=branch)
    return ids.to(dev), pos.to(dev), layout.to(dev), targets.to(dev), old.to(dev), adv.to(dev)


def rollout(sampler, tok, problems, cfg, step, instruction, rank, world):
    """Sample groups for this rank's prompts; dynamic sampling in serial mode. -> (groups, each a
    list of (Sample, reward); every (Sample, answer) drawn; dropped counts by reason; wall seconds)"""
    per_rank = cfg.prompts_per_step // world
    groups, dropped, seen, wall, rounds = [], {}, [], 0.0, 0
    need = per_rank
    params = SamplingParams(mode=cfg.mode, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, max_branches=cfg.max_branches,
                            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.mode == "serial" and cfg.dynamic_sampling else 1):
        # round 0: the same prompts on every rank, split by rank, each row's stream named by (step,
        # slot, sample): rollouts do not depend on the rank count. Later rounds draw per rank.
        rng = random.Random((cfg.seed * 1_000_003 + step) * 1009 + rounds * 7919 + (rank if rounds else 0))
        n_draw = cfg.prompts_per_step if rounds == 0 else 2 * need
        slots = list(range(n_draw))[rank::world] if rounds == 0 else list(range(n_draw))
        allpicks = [rng.randrange(len(problems)) for _ in range(n_draw)]
        picks = [allpicks[g] for g in slots]
        seeds = [(((cfg.seed * 1_000_003 + step) * 1009 + rounds) * 100_003 + (g if rounds == 0 else rank * n_draw + g))
                 * 1024 + j for g in slots for j in range(cfg.group_size)]
        prompts = [chat_prompt(tok, problems[i]["question"], instruction) for i in picks]
        out, w = sampler.generate_many(prompts, cfg.group_size, params, cfg.rollout_rows, seeds=seeds)
        wall += w
        for i, samples in zip(picks, out):
            kept = []
            for s in samples:
                seen.append((s, problems[i]["answer"]))
                r, score, why = reward_of(s, problems[i]["answer"], cfg)
                if why is None:
                    kept.append((s, r, score))
                else:
                    dropped[why.split(":")[0]] = dropped.get(why.split(":")[0], 0) + 1
            scores = {score for _, _, score in kept}          # dynamic sampling: on the score, before the overlong penalty
            why = "group too small" if len(kept) < 2 else \
                "zero-variance group" if cfg.mode == "serial" and cfg.dynamic_sampling and len(scores) == 1 else None
            if why:                                              # no learning signal: dropped
                dropped[why] = dropped.get(why, 0) + len(kept)
                continue
            if len(groups) < per_rank:
                groups.append([(s, r) for s, r, _ in kept])
        need = per_rank - len(groups)
        rounds += 1
    return groups, seen, dropped, wall


# -----------------------------------------------------------------------------
# The update, the step's log, evaluation

def update(train_model, model, opt, items, cfg, world, dev):
    """Optimizer steps of seqs_per_update sequences (global) in micro-batches.
    -> (loss per step, grad norms, entropies, trained tokens)"""
    ratio_kind = cfg.ratio or ("onpolicy" if cfg.mode == "parallel" else "importance")
    per_rank = max(1, cfg.seqs_per_update // world)
    n_updates = all_reduce(torch.tensor(math.ceil(len(items) / per_rank) if items else 0, device=dev), world, "max")
    losses, gnorms, ents, n_train_tok = [], [], [], 0
    for u in range(int(n_updates)):
        mb = items[u * per_rank:(u + 1) * per_rank]
        n_tok = sum(sum(bool(x) or cfg.train_forced for x in s.sampled) for s, _ in mb)
        n_train_tok += n_tok
        # the loss is a sum divided by a global count: tokens (serial, token mean) or sequences (parallel)
        norm = all_reduce(torch.tensor(float(n_tok if cfg.mode == "serial" else len(mb)), device=dev), world)
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
                    loss = policy_loss(logp, old, A, mask, cfg.mode, ratio_kind, cfg.clip_low, cfg.clip_high,
                                       norm.clamp(min=1), cfg.clip_c) * world   # DDP/FSDP average over ranks
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
    m, n = (npr.sample_metrics(seen, roll_wall) if seen else {}), len(seen)
    forks = [b for s, _ in seen for b in s.stats["branches_per_fork"]]
    flat = [r for g in rewards for r in g]
    sums = dict(samples=n, accuracy=m.get("accuracy", 0) * n, format_valid=m.get("format_valid", 0) * n,
                trigger_rate=m.get("trigger_rate", 0) * n, tokens=m.get("mean_tokens", 0) * n,
                critical_tokens=m.get("mean_critical_tokens", 0) * n, branches=sum(forks), forks=len(forks),
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
                response_tokens=mean("tokens"), critical_tokens=mean("critical_tokens"),
                entropy=mean("entropy", "entropies"), loss=float(sums["loss"]), grad_norm=max(gnorms, default=0.0),
                rollout_tok_s=sums["tokens"] / max(sums["roll_wall"] / world, 1e-9),
                train_tok_s=n_train_tok * world / max(t_train, 1e-9))


def evaluate(sampler, tok, problems, instruction, cfg, dev, bf16_autocast):
    """Greedy decoding of the eval problems in the training mode -> eval.py's metrics."""
    params = SamplingParams(mode=cfg.mode, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                            max_branches=cfg.max_branches)
    prompts = [chat_prompt(tok, p["question"], instruction) for p in problems]
    with autocast(dev, bf16_autocast):
        got, wall = sampler.generate_many(prompts, 1, params, cfg.rollout_rows)
    return npr.sample_metrics([(ss[0], p["answer"]) for p, ss in zip(problems, got)], wall)


# -----------------------------------------------------------------------------

def main(cfg: Config):
    if cfg.mode not in ("serial", "parallel"):
        raise ValueError(f"--mode must be serial or parallel, not {cfg.mode!r}")
    rank, world, dev, model, tok, resuming = start_training(cfg)
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {world} ranks")
    roll_model, roll_autocast = rollout_model(model, cfg, dev, world)   # before FSDP2 shards the model
    sampler = Sampler(roll_model, tok)
    instruction = instruction_for(cfg.model, cfg.instruction)
    problems = read_problems(cfg.data)
    eval_problems = read_problems(cfg.eval_data)[:cfg.eval_problems] if cfg.eval_every else []
    check_context(problems + eval_problems, tok, instruction, cfg.max_new_tokens, model)
    train_model = wrap_distributed(model, world, cfg.fsdp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    step, metrics = resume_training(opt, cfg, resuming, rank, world, dev)

    def maybe_evaluate(at_step):
        if eval_problems and rank == 0 and cfg.eval_every and at_step % cfg.eval_every == 0:
            model.eval()
            m = evaluate(sampler, tok, eval_problems, instruction, cfg, dev, roll_autocast)
            print(f"eval step {at_step} | greedy {cfg.mode} accuracy {m['accuracy']:.3f} | format "
                  f"{m['format_valid']:.3f} | trigger {m['trigger_rate']:.3f}", flush=True)
            metrics.write(step=at_step, **{f"eval_{k}": v for k, v in m.items() if not isinstance(v, dict)})

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
        if cfg.mode == "parallel":            # the batch std spans every rank's rollouts
            batch = [r for rank_batch in all_gather(batch, world) for r in rank_batch]
        adv = advantages(rewards, cfg.mode, batch) if rewards else []
        items = [(s, a) for g, ag in zip(groups, adv) for (s, _), a in zip(g, ag)]
        random.Random(step).shuffle(items)

        # ---- updates: seqs_per_update sequences per optimizer step ----
        model.train()
        t_train = time.perf_counter()
        trained = update(train_model, model, opt, items, cfg, world, dev)
        sync_rollout_model(roll_model, model)  # the rollout copy follows the trained weights
        t_train = time.perf_counter() - t_train
        step += 1

        rec = log_step(step, seen, rewards, dropped, len(items), trained, roll_wall, t_train, world, dev)
        rec["step_s"] = time.perf_counter() - t0
        bar.update(1)
        if rank == 0:
            metrics.log(**rec)
        maybe_evaluate(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_resume_point(model, tok, opt, os.path.join(cfg.out_dir, "last"), cfg, cfg.model, step, rank, world)
    bar.close()
    save_final(model, tok, cfg.out_dir, cfg, cfg.model, rank, world)
    return model


if __name__ == "__main__":
    main(parse_cli(Config))
