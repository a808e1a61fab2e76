"""
Stages 1 and 3: reinforcement learning with group rollouts, serial (NPR-Zero) or parallel (PAPO).

    python grpo.py                                       # the built-in default: PAPO on out/sft
    python grpo.py --mode serial --model out/base        # stage 1 (NPR-Zero) on the default
    torchrun --nproc-per-node 8 grpo.py --model out/sft --data orz.json --lr 1e-7 --fsdp \\
        --prompts-per-step 16 --group-size 16 --seqs-per-update 16 --max-new-tokens 30000

--mode serial (stage 1, NPR-Zero; DAPO-style, NPR.md section 4): serial rollouts, group size n,
  advantage (r - group mean) / (group std + 1e-6), clipped importance ratio with clip-higher
  (0.2 / 0.28) against the sampler's own log-probs, dynamic sampling (groups whose rewards are all
  equal are dropped and more prompts drawn until the batch is full), token-mean loss, soft overlong
  penalty in the last --overlong-buffer tokens of the budget, dual-clip (--clip-c 10: a token with
  A < 0 loses at most c x |A|), no KL, no entropy bonus. Dynamic sampling looks at the score before
  the overlong penalty (the official filter_groups.metric=score) and stops after
  --max-sampling-rounds rounds (the official samples until the batch is full, which never ends on a
  model that solves, or fails, every prompt; we train on the groups we have).
  Score: +1 / -1 for the answer; with --format-reward (the paper's variant; the official code
  comments it out) a sample whose format score is not 0 gets -1 - --format-penalty whatever its
  answer, i.e. accuracy counts only when the format passes.
--mode parallel (stage 3, PAPO): rollouts with the fork/join engine; malformed and over-budget
  rollouts are dropped before scoring (counted; --malformed penalize scores them -1 instead: with a
  model that is not yet ~100% well formed, dropping lets RL drift into malformed outputs, which no
  reward ever pushes down); reward +1 / -1 (0 for an empty response); advantage
  (r - group mean) / (std of the whole batch + 1e-6); strictly on-policy loss: ratio
  exp(logp - stopgrad(logp)) == 1 (no clipping can fire), i.e. -A x (mean log-prob of the
  sequence's tokens), averaged over sequences. No KL, no reference model, no entropy term.
Both modes: a response without \\boxed{} has no answer and scores -1 like a wrong one (the official
grader falls back to the last number; our instruction asks for the box); an empty response scores 0.
Standard deviations are unbiased (n - 1, torch.std as in the official trainer). A group left with
fewer than 2 samples after the drops is dropped (the official keeps it with baseline 0: its
advantage r / (batch std + 1e-6) is then unbounded when the batch's rewards are all equal).
Both modes train on the exact sampled token ids with the sampler's layout (branch mask and shared
positions; no re-tokenization). Forced tokens (step headers, takeaway opener) get no loss unless
--train-forced. With --ratio importance, the later mini-batches of a rollout batch use the true
ratio exp(logp - logp_sampler) with the clip (exact on CPU and with --no-rollout-copy: the sampler's
log-probs equal the trainer's; on CUDA the bf16 rollout copy makes them agree to bf16 rounding);
--ratio onpolicy (the paper's PAPO) sets the ratio to 1 everywhere.
--repetition-penalty (inside branches, rollouts only) is off by default: the official engine uses
1.02 (pass it with real checkpoints), but on the built-in task the digits a branch must repeat are
the answer, the sampler's fast path cannot draw inside its step with it, and the samples would come
from a distribution other than the trained policy's (the log-probs are the model's own).
Logs one line per step, JSON lines in out_dir/metrics.jsonl, periodic eval, resumable checkpoints.
"""
import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import npr
from cli import (JsonlLog, autocast, chat_prompt, init_distributed, instruction_for, load_resume_point, parse_cli,
                 print_config, read_problems, save_final, save_resume_point)
from model import Qwen, check_vocab
from eval import sample_metrics
from parallel_attention import Layout
from sampler import Sampler, SamplingParams
from tokenizer import Tokenizer


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


def std(xs):
    """Unbiased (n - 1), as torch.std in the official trainer."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def advantages(groups, mode, batch=None):
    """groups: [[reward, ...] per prompt] -> same shape. serial (GRPO/DAPO): (r - group mean) /
    (group std + 1e-6); parallel (PAPO): (r - group mean) / (std of the whole batch + 1e-6), where
    `batch` holds every reward of the step (all ranks; default: these groups)."""
    if mode == "parallel":
        s = std(batch or [r for g in groups for r in g])
        return [[(r - sum(g) / len(g)) / (s + 1e-6) for r in g] for g in groups]
    return [[(r - sum(g) / len(g)) / (std(g) + 1e-6) for r in g] for g in groups]


def policy_loss(logp, old_logp, adv, mask, mode, ratio_kind, clip_low, clip_high, norm, clip_c=0.0):
    """logp/old_logp/mask (B, T); adv (B,). norm: global count (tokens for serial, sequences for
    parallel) that the sum is divided by, so that gradient accumulation and ranks add up.
    clip_c > 0: dual-clip, a token with A < 0 loses at most clip_c x |A| (a huge ratio stops counting)."""
    if ratio_kind == "onpolicy":
        ratio = torch.exp(logp - logp.detach())                              # == 1, gradient of logp
    else:
        ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    if ratio_kind == "onpolicy":
        per_tok = -ratio * A
    else:                                                                    # PPO clip with clip-higher
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


def rollout(sampler, tok, problems, order, cfg, step, instruction, rank, world):
    """Sample groups for this rank's prompts; dynamic sampling in serial mode.
    -> (groups [(Sample list, reward list)], stats)"""
    per_rank = cfg.prompts_per_step // world
    groups, dropped, seen, wall, rounds = [], {}, [], 0.0, 0
    need = per_rank
    while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.mode == "serial" and cfg.dynamic_sampling else 1):
        # round 0: the step's prompts are drawn identically on every rank and split by rank, and every
        # row's random stream is named by (step, prompt slot, sample): the rollouts do not depend on
        # the number of ranks. Later rounds (dynamic sampling) draw per rank.
        rng = random.Random((cfg.seed * 1_000_003 + step) * 1009 + rounds * 7919 + (rank if rounds else 0))
        n_draw = cfg.prompts_per_step if rounds == 0 else 2 * need
        slots = list(range(n_draw))[rank::world] if rounds == 0 else list(range(n_draw))
        allpicks = [order[rng.randrange(len(order))] for _ in range(n_draw)]
        picks = [allpicks[g] for g in slots]
        params = SamplingParams(mode=cfg.mode, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, max_branches=cfg.max_branches,
                                repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
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

def main(cfg: Config):
    rank, world, _, dev = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.mode not in ("serial", "parallel"):
        raise ValueError(f"--mode must be serial or parallel, not {cfg.mode!r}")
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {world} ranks")
    ratio_kind = cfg.ratio or ("onpolicy" if cfg.mode == "parallel" else "importance")
    torch.manual_seed(cfg.seed)
    if rank == 0:
        print_config(cfg)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    last_dir = os.path.join(cfg.out_dir, "last")
    resuming = cfg.resume and os.path.isfile(os.path.join(last_dir, "train_state.pt"))
    src = last_dir if resuming else cfg.model
    tok = Tokenizer.from_pretrained(src)
    model = Qwen.from_pretrained(src, device=dev, dtype=dtype)
    check_vocab(model, tok, src)
    model.attn_impl, model.gradient_checkpointing = cfg.attn_impl, cfg.grad_checkpointing
    # rollouts: on CUDA a bf16 copy of the weights decodes, refreshed after every update: the sampler's
    # CUDA graphs need plain bf16 weights, not autocast (its log-probs then differ from the trainer's
    # by bf16 rounding: --ratio importance is no longer exact to 1e-4, only close). Under FSDP2 the
    # trained weights are sharded, so the rollouts always use a full copy. Elsewhere: the model itself.
    fsdp = world > 1 and cfg.fsdp
    roll_model = model
    to_bf16 = cfg.rollout_copy and cfg.bf16 and torch.device(dev).type == "cuda"
    if to_bf16 or fsdp:
        roll_model = copy.deepcopy(model).eval().requires_grad_(False)
        if to_bf16:
            roll_model.to(torch.bfloat16)
    roll_autocast = cfg.bf16 and not to_bf16
    sampler = Sampler(roll_model, tok)
    instruction = instruction_for(cfg.model, cfg.instruction)
    problems = read_problems(cfg.data)
    eval_problems = read_problems(cfg.eval_data)[:cfg.eval_problems] if cfg.eval_every else []
    train_model = model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    step = 0
    if resuming:
        step = load_resume_point(opt, last_dir, rank, world, dev)
    metrics = JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
    if rank == 0:
        metrics.truncate_after(step)          # records past the resumed step are about to be redone
    order = list(range(len(problems)))

    def evaluate(at_step):
        if not eval_problems or rank != 0:
            return {}
        model.eval()
        params = SamplingParams(mode=cfg.mode, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                                max_branches=cfg.max_branches)
        prompts = [chat_prompt(tok, p["question"], instruction) for p in eval_problems]
        with autocast(dev, roll_autocast):
            got, wall = sampler.generate_many(prompts, 1, params, cfg.rollout_rows)
        m = sample_metrics([(ss[0], p["answer"]) for p, ss in zip(eval_problems, got)], wall)
        print(f"eval step {at_step} | greedy {cfg.mode} accuracy {m['accuracy']:.3f} | format {m['format_valid']:.3f}"
              f" | trigger {m['trigger_rate']:.3f}", flush=True)
        metrics.write(step=at_step, **{f"eval_{k}": v for k, v in m.items() if not isinstance(v, dict)})
        return m

    from tqdm import tqdm
    if step == 0:
        evaluate(0)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"grpo ({cfg.mode})", disable=rank != 0)
    while step < cfg.steps:
        t0 = time.perf_counter()
        # ---- rollouts (no grad) ----
        model.eval()
        with autocast(dev, roll_autocast):
            groups, seen, dropped, roll_wall = rollout(sampler, tok, problems, order, cfg, step, instruction, rank, world)
        sampler.release()                     # the fast path's KV cache and graphs: not kept through training
        rewards = [[r for _, r in g] for g in groups]
        batch = [r for g in rewards for r in g]
        if world > 1 and cfg.mode == "parallel":   # the batch std spans every rank's rollouts
            allr = [None] * world
            dist.all_gather_object(allr, batch)
            batch = [r for rr in allr for r in rr]
        adv = advantages(rewards, cfg.mode, batch) if rewards else []
        items = [(s, a) for g, ag in zip(groups, adv) for (s, _), a in zip(g, ag)]
        random.Random(step).shuffle(items)

        # ---- updates: seqs_per_update sequences per optimizer step ----
        model.train()
        per_rank_update = max(1, cfg.seqs_per_update // world)
        n_updates = torch.tensor(math.ceil(len(items) / per_rank_update) if items else 0, device=dev)
        if world > 1:
            dist.all_reduce(n_updates, op=dist.ReduceOp.MAX)
        losses, gnorms, ents, t_train, n_train_tok = [], [], [], time.perf_counter(), 0
        for u in range(int(n_updates)):
            mb = items[u * per_rank_update:(u + 1) * per_rank_update]
            n_tok = sum(sum(bool(x) or cfg.train_forced for x in s.sampled) for s, _ in mb)
            n_train_tok += n_tok
            norm = torch.tensor(float(n_tok if cfg.mode == "serial" else len(mb)), device=dev)
            # every rank runs the same number of forward/backward passes, so DDP's all-reduces pair up
            n_micro = torch.tensor(max(1, math.ceil(len(mb) / cfg.micro_batch)), device=dev)
            if world > 1:
                dist.all_reduce(norm)
                dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
            loss_u = 0.0
            for j in range(int(n_micro)):
                part = mb[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
                sync = world == 1 or fsdp or j == int(n_micro) - 1   # FSDP2 reduces every backward
                with (train_model.no_sync() if not sync else contextlib.nullcontext()), autocast(dev, cfg.bf16):
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
                        lp = train_model(z, None, Layout.causal(1, 1, dev), targets=torch.zeros_like(z))
                        loss = lp.sum() * 0.0
                    loss.backward()
                loss_u += loss.item() / world
            gnorms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_u)
        if roll_model is not model:          # the rollout copy follows the trained weights
            with torch.no_grad():                # (FSDP2: gather each shard; every rank takes part)
                for a, b in zip(roll_model.parameters(), model.parameters()):
                    a.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)
        t_train = time.perf_counter() - t_train
        step += 1

        # ---- log (sums over every rank's rollouts) ----
        m = sample_metrics(seen, roll_wall) if seen else {}
        n = len(seen)
        forks = [b for s, _ in seen for b in s.stats["branches_per_fork"]]
        flat = [r for g in rewards for r in g]
        tot = torch.tensor([n, m.get("accuracy", 0) * n, m.get("format_valid", 0) * n, m.get("trigger_rate", 0) * n,
                            m.get("mean_tokens", 0) * n, m.get("mean_critical_tokens", 0) * n, sum(forks), len(forks),
                            sum(flat), len(flat), len(items), sum(losses), roll_wall, sum(ents), len(ents)],
                           dtype=torch.float64, device=dev)
        drops = [dropped]
        if world > 1:
            dist.all_reduce(tot)
            drops = [None] * world
            dist.all_gather_object(drops, dropped)
        t = tot.tolist()
        nn_ = max(t[0], 1)
        rec = dict(step=step, reward=t[8] / max(t[9], 1), accuracy=t[1] / nn_, format_valid=t[2] / nn_,
                   trigger_rate=t[3] / nn_, branches_per_fork=t[6] / max(t[7], 1), trained_seqs=int(t[10]),
                   dropped={k: sum(d.get(k, 0) for d in drops) for d in drops for k in d},
                   response_tokens=t[4] / nn_, critical_tokens=t[5] / nn_, entropy=t[13] / max(t[14], 1),
                   loss=t[11], grad_norm=max(gnorms) if gnorms else 0.0, rollout_tok_s=t[4] / max(t[12] / world, 1e-9),
                   train_tok_s=n_train_tok * world / max(t_train, 1e-9), step_s=time.perf_counter() - t0)
        bar.update(1)
        if rank == 0:
            metrics.log(**rec)
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_resume_point(model, tok, opt, last_dir, cfg, cfg.model, step, rank, world)
    bar.close()
    save_final(model, tok, cfg.out_dir, cfg, cfg.model, rank, world)
    return model


if __name__ == "__main__":
    main(parse_cli(Config))
