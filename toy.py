"""
The built-in default: a small arithmetic task, a character tokenizer and a 0.4M-parameter Qwen3
trained from scratch on it, so that every NPR stage (distill, sft, grpo, eval) runs on a CPU in
minutes through the same code as a real Qwen checkpoint. The model stands in for the paper's
instruct model: it answers serially, and writes the tagged format when asked to.

    python toy.py                                                   # data + base model + quick eval
    python toy.py --max-steps 3 --out-dir /tmp/b --data-dir /tmp/d   # smoke run

Writes out/data/{train,test}.jsonl and out/base (config.json, model.safetensors, tokenizer files,
npr_instruction.txt, train_config.json, metrics.jsonl): an HF-layout checkpoint that distill.py,
sft.py, grpo.py and eval.py take like any Qwen folder.

The task: "Compute 23*4 + 17*6 + 48*9." -> 626 (by default 2 to 5 terms, a of 2 digits, b in 2..9;
the number of terms is the width of the fork, so the plan's width is the model's to write).
  serial: 23*4=20*4+3*4=80+12=92. 17*6=10*6+7*6=60+42=102. 48*9=40*9+8*9=360+72=432. 92+102=194+432=626. \\boxed{626}
  tagged: the same work, one <plan> and one <step> per product, the additions in the <takeaway>:
      <guideline>
      <plan>1: 23*4</plan>                  (one plan per product, each on its own line)
      </guideline>
      <step>
      1: 23*4=20*4+3*4=80+12=92 #1:92
      </step>                               (one step per plan)
      <takeaway>
      92+102=194+432=626.
      </takeaway>
      \\boxed{626}
Training mix: prompts with the short INSTRUCTION get tagged solutions, plain prompts serial ones.
Every step needs only its own term, so nothing in the data makes a branch depend on a sibling it
cannot see. --serial-writer-share plants such a dependency (the ablation knob, off by default): a
share of the tagged solutions in the serial-writer variant, where step i >= 2 also adds its product
to the running sum ("2: 17*6=...=102 #2:102. 92+102=194"), as a model writing the steps in turn
does; decoded in parallel such a step must guess what it cannot see.

Deliberate deviations from a real instruct model:
- Tokenizer: one token per character (printable ASCII and "\\n"; encode drops any other character),
  ChatML specials, and `\\boxed{` and the 8 NPR tags as ONE ordinary token each: sequences short
  enough for a CPU (sft.py finds the tags present and leaves their trained embedding rows alone).
- The instruction is two words, not npr.INSTRUCTION (per character that is a 1.5k-token prompt). It
  follows the problem (the official order), so every extra character of it stands between the
  question and the answer, which a 2-layer character model reads poorly: with "Solve it with parallel
  steps." the base answered 0.27 of the 3-term task right (greedy), with "In parallel." 0.87.
- Training length is a step count, not a time budget: the same training on any machine.
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from itertools import accumulate

import torch
from tqdm import tqdm

import npr
from model import Qwen, QwenConfig
from runs import atomic_write, lock_output, parse_cli, print_config
from sampler import Sampler, SamplingParams
from tokenizer import Tokenizer


@dataclass
class Config:
    out_dir: str = "out/base"        # the base checkpoint (HF layout) + metrics.jsonl
    data_dir: str = "out/data"       # train.jsonl / test.jsonl
    seed: int = 0                    # data split, training problems and init
    n_train: int = 20000             # problems in train.jsonl (later stages draw from it)
    n_test: int = 1000               # problems in test.jsonl (never trained on, by exact question)
    # the task (the first factor's digit count is the main difficulty knob)
    min_terms: int = 2               # terms per problem, uniform in [min_terms, max_terms]: the fork's width
    max_terms: int = 5
    min_adigits: int = 2             # digits of the first factor a: 1 -> 2..9, 2 -> 10..99
    max_adigits: int = 2
    min_b: int = 2                   # second factor b in [min_b, max_b]
    max_b: int = 9
    # training mix
    tagged_share: float = 0.7        # share of training prompts with INSTRUCTION and a tagged solution
    serial_writer_share: float = 0.0  # share of the tagged solutions whose steps read a sibling (the planted-dependency ablation)
    label_share: float = 1.0         # share of the tagged solutions whose steps name their results (" #1:92")
    # model (0.40M parameters)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    # optimisation
    max_steps: int = 1450            # training steps; the cosine schedule spans them
    batch_size: int = 32
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1        # cosine decays to lr * this
    grad_clip: float = 1.0
    bucket: int = 8                  # batches drawn at once and sorted by length (less padding)
    threads: int = 2                 # torch.set_num_threads (1 is faster when another process is busy)
    log_every: int = 50              # print a log line every this many steps (metrics.jsonl gets all)
    # quick evaluation at the end (greedy, first eval_n test problems, INSTRUCTION prompt)
    eval_n: int = 200
    eval_batch: int = 100
    eval_max_new_tokens: int = 400


# -----------------------------------------------------------------------------
# The task

INSTRUCTION = "In parallel."
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOXED = "\\boxed{"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # one token each


def make_problem(rng, nterms=(2, 4), adigits=(1, 2), brange=(2, 9)):
    """A random "Compute a1*b1 + a2*b2 + ...". a has 1 digit (2..9) or 2 digits (10..99), the digit
    count uniform in adigits; b uniform in brange; the number of terms uniform in nterms."""
    terms = []
    for _ in range(rng.randint(*nterms)):
        d = rng.randint(*adigits)
        a = rng.randint(2, 9) if d == 1 else rng.randint(10 ** (d - 1), 10 ** d - 1)
        terms.append((a, rng.randint(*brange)))
    question = "Compute " + " + ".join(f"{a}*{b}" for a, b in terms) + "."
    return dict(question=question, answer=str(sum(a * b for a, b in terms)), terms=terms)


def task_kwargs(cfg):
    return dict(nterms=(cfg.min_terms, cfg.max_terms), adigits=(cfg.min_adigits, cfg.max_adigits),
                brange=(cfg.min_b, cfg.max_b))


def worked(a, b):
    """One product written out by place value: 23*4=20*4+3*4=80+12=92 (a one-part a: 40*4=160, 8*9=72).
    A step's whole work: it needs only its own term, so the steps of a fork are independent, and it is
    long enough to be worth decoding beside its siblings (a bare 23*4=92 is shorter than the tags)."""
    parts = [int(d) * 10 ** e for e, d in enumerate(reversed(str(a))) if d != "0"][::-1]
    if len(parts) == 1:
        return f"{a}*{b}={a * b}"
    return (f"{a}*{b}=" + "+".join(f"{x}*{b}" for x in parts) + "=" + "+".join(str(x * b) for x in parts)
            + f"={a * b}")


def chain(prods):
    """The left-to-right additions as one chain: 92+102=194+72=266"""
    return str(prods[0]) + "".join(f"+{p}={s}" for p, s in zip(prods[1:], list(accumulate(prods))[1:]))


def serial_solution(terms):
    """23*4=20*4+3*4=80+12=92. 17*6=10*6+7*6=60+42=102. 48*9=40*9+8*9=360+72=432. 92+102=194+432=626. \\boxed{626}
    (the same work as the tagged solution, written in one line)"""
    prods = [a * b for a, b in terms]
    return " ".join(f"{worked(a, b)}." for a, b in terms) + f" {chain(prods)}. {BOXED}{sum(prods)}}}"


def tagged_solution(terms, serial_writer=False, labels=True):
    """The NPR format (NPR.md section 2): one plan and one step per product, the takeaway adds up.
    serial_writer: step i >= 2 also adds its product to the running sum, and the takeaway restates
    the last addition. labels: step i ends by naming its result (" #2:102"): all branches start at
    the same position, so the takeaway tells their results apart by content alone ("#", not "=")."""
    prods = [a * b for a, b in terms]
    running = list(accumulate(prods))                                  # the sum after each step
    plans = "".join(f"<plan>{i}: {a}*{b}</plan>\n" for i, (a, b) in enumerate(terms, 1))
    steps = []
    for i, (a, b) in enumerate(terms, 1):
        # a step and the takeaway open with the bytes the parallel engine forces ("<step>\n1:", "<takeaway>\n")
        body = npr.STEP_HEADER.format(n=i) + f" {worked(a, b)}" + (f" #{i}:{a * b}" if labels else "")
        if serial_writer and i >= 2:
            body += f". {running[i - 2]}+{prods[i - 1]}={running[i - 1]}"
        steps.append(f"{body}\n</step>\n")
    take = f"{running[-2]}+{prods[-1]}={running[-1]}." if serial_writer else f"{chain(prods)}."
    return (f"<guideline>\n{plans}</guideline>\n{''.join(steps)}{npr.TAKEAWAY_HEADER}{take}\n</takeaway>\n"
            f"{BOXED}{sum(prods)}}}")


def serial_writer_step(step):
    """A step that carries a running sum (". 92+102=194"): it reads a sibling's result."""
    return ". " in step


def write_data(out_dir, n_train, n_test, seed=0, **task):
    """train.jsonl / test.jsonl with {"question", "answer"}; test questions never appear in train.
    The same (n_test, seed, task) always gives the same test set; train is drawn after it."""
    rng, seen, splits = random.Random(seed), set(), {}
    for name, n in (("test", n_test), ("train", n_train)):
        rows = splits[name] = []
        while len(rows) < n:
            p = make_problem(rng, **task)
            if p["question"] not in seen:  # unique within a split, disjoint across them
                seen.add(p["question"])
                rows.append({"question": p["question"], "answer": p["answer"]})
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        atomic_write(os.path.join(out_dir, f"{name}.jsonl"), (json.dumps(r) + "\n" for r in rows))
    return splits["train"], splits["test"]


# -----------------------------------------------------------------------------
# Tokenizer, model and training examples

def build_tokenizer():
    """Character-level tokenizer (tokenizers' BPE with no merges), ChatML specials, tags and \\boxed{
    as single ordinary tokens. Saved with tok.save_pretrained; Tokenizer.from_pretrained loads it."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tk.decoder = decoders.Fuse()  # concatenate the pieces (the default decoder would join with spaces)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in npr.TAGS + (BOXED,)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1024}
    return Tokenizer(tk, config, CHAT_TEMPLATE)


def model_config(cfg: Config, vocab_size, eos_id=None):
    """config.json of the Qwen3 base model."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
            "attention_bias": False, "max_position_embeddings": 1024, "torch_dtype": "float32",
            "eos_token_id": eos_id, "initializer_range": 0.02}


@torch.no_grad()
def init_weights(model, std=0.02):
    """HF's Qwen3 init: N(0, std) for linears and embeddings (norm weights stay 1). PyTorch's default
    N(0, 1) embedding would, tied to the output, give logits of std ~ sqrt(hidden)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def prompt_ids(tok, question, tagged=True):
    """Chat-rendered prompt ids, ending with the assistant header. A tagged answer is asked for with
    the short instruction, exactly as distill / sft / grpo / eval prompt from npr_instruction.txt."""
    content = npr.build_prompt(question, INSTRUCTION) if tagged else question
    return tok.encode(tok.render_chat([{"role": "user", "content": content}], enable_thinking=False))


def sample_example(rng, tok, cfg, exclude=()):
    """A fresh training example from the mix (a problem not in `exclude`): (ids, n_prompt), the ids
    prompt + solution + <|im_end|>, the loss on those from n_prompt on."""
    while True:
        prob = make_problem(rng, **task_kwargs(cfg))
        if prob["question"] not in exclude:
            break
    tagged = rng.random() < cfg.tagged_share
    sol = (tagged_solution(prob["terms"], serial_writer=rng.random() < cfg.serial_writer_share,
                           labels=rng.random() < cfg.label_share) if tagged else serial_solution(prob["terms"]))
    p = prompt_ids(tok, prob["question"], tagged)
    return p + tok.encode(sol) + [tok.im_end_id], len(p)


def collate(examples, pad_id):
    """-> ids (B, T) right-padded, targets (B, T): the next token where it is an assistant token, else -1."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), T), -1, dtype=torch.long)
    for r, (x, n_prompt) in enumerate(examples):
        ids[r, :len(x)] = torch.tensor(x)
        tgt[r, n_prompt - 1:len(x) - 1] = torch.tensor(x[n_prompt:])  # position t predicts token t+1
    return ids, tgt


def lr_at(cfg, step):
    """Linear warm-up over warmup_steps, then cosine from lr to lr * min_lr_ratio over max_steps."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.max_steps)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


# -----------------------------------------------------------------------------
# Quick evaluation

def evaluate(model, tok, problems, mode, cfg):
    """Greedy decoding of problems ({"question", "answer"}) with the INSTRUCTION prompt -> (metrics,
    texts): accuracy, format-valid share (score 0), share with a running sum inside a step (serial-
    writer), share ended by <|im_end|>, mean response tokens, wall time."""
    t0 = time.perf_counter()
    params = SamplingParams(mode=mode, temperature=0.0, max_new_tokens=cfg.eval_max_new_tokens)
    prompts = [prompt_ids(tok, p["question"]) for p in problems]
    got = [s for (s,) in Sampler(model, tok).generate_many(prompts, 1, params, batch_rows=cfg.eval_batch)[0]]
    texts = [tok.decode([t for t in s.ids if t not in tok.stop_ids]) for s in got]
    n = max(1, len(problems))
    return dict(mode=mode, tagged=True, n=len(problems),
                acc=sum(npr.grade(t, p["answer"]) for t, p in zip(texts, problems)) / n,
                format_ok=sum(npr.format_score(t)[0] == 0.0 for t in texts) / n,
                serial_writer=sum(any(serial_writer_step(s) for b in npr.parse(t).blocks for s in b.steps)
                                  for t in texts) / n,
                eos=sum(s.finish_reason == "eos" for s in got) / n,
                mean_tokens=sum(s.stats["total_tokens"] for s in got) / n,
                time_s=round(time.perf_counter() - t0, 1)), texts


# -----------------------------------------------------------------------------

def main(cfg: Config):
    lock_output(os.path.join(cfg.out_dir, ".lock"))   # a second run on the same out_dir is refused
    print_config(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed + 1)  # training problems; the split uses seed itself

    print("== data ==")
    train, test = write_data(cfg.data_dir, cfg.n_train, cfg.n_test, cfg.seed, **task_kwargs(cfg))
    exclude = {p["question"] for p in test}
    print(f"{cfg.data_dir}: {len(train)} train, {len(test)} test | e.g. {test[0]['question']} -> {test[0]['answer']}")

    print("== tokenizer + model ==")
    tok = build_tokenizer()
    model = Qwen(QwenConfig.from_dict(model_config(cfg, tok.vocab_size, tok.im_end_id)))
    init_weights(model)
    model.train()
    print(f"vocab {tok.vocab_size} | params {model.num_params() / 1e6:.2f}M")
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # none on norms
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    print("== train ==")
    queue, tokens, metrics, t_train = [], 0, [], 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.max_steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        if not queue:  # length bucketing: draw `bucket` batches, sort by length, shuffle the batches
            pool = sorted((sample_example(rng, tok, cfg, exclude) for _ in range(cfg.bucket * cfg.batch_size)),
                          key=lambda e: len(e[0]))
            queue = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
            rng.shuffle(queue)
        ids, tgt = collate(queue.pop(), tok.pad_id)
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        # plain causal forward (no layout): the base model is a serial model
        logp = model(ids, targets=tgt)                 # (B, T), 0 where tgt < 0
        loss = -logp.sum() / (tgt >= 0).sum()          # token mean over the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += int((ids != tok.pad_id).sum())
        t_train = time.perf_counter() - t0
        m = dict(step=step + 1, loss=round(loss.item(), 5), lr=lr, grad_norm=round(gnorm.item(), 4),
                 tokens=tokens, tok_per_s=round(tokens / t_train), time_s=round(t_train, 2))
        metrics.append(m)
        if m["step"] % cfg.log_every == 0 or m["step"] == 1:
            tqdm.write(" | ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v}" for k, v in m.items()))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    final_loss = sum(m["loss"] for m in metrics[-20:]) / max(1, len(metrics[-20:]))
    print(f"trained {len(metrics)} steps in {t_train:.1f}s | {tokens / max(t_train, 1e-9):.0f} tok/s | "
          f"final loss (mean of last 20) {final_loss:.4f}")

    print("== save ==")
    model.eval()
    model.save_pretrained(cfg.out_dir)
    tok.save_pretrained(cfg.out_dir)
    atomic_write(os.path.join(cfg.out_dir, npr.INSTRUCTION_FILE), INSTRUCTION + "\n")   # later stages prompt with it
    atomic_write(os.path.join(cfg.out_dir, "train_config.json"), json.dumps(asdict(cfg), indent=2))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    atomic_write(metrics_path, (json.dumps(m) + "\n" for m in metrics))
    print(f"checkpoint -> {cfg.out_dir}")

    print("== quick eval (greedy) ==")
    probs, results = test[:cfg.eval_n], []
    for mode in ("serial", "parallel") if probs else ():   # --eval-n 0: none
        r, texts = evaluate(model, tok, probs, mode, cfg)
        results.append(r)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        print(f"  e.g. {probs[0]['question']} ->\n" + "\n".join("    " + ln for ln in texts[0].splitlines()))
    with open(metrics_path, "a") as f:
        f.writelines(json.dumps({"eval": r, "step": len(metrics)}) + "\n" for r in results)
    return dict(steps=len(metrics), train_s=t_train, final_loss=final_loss, eval=results)


if __name__ == "__main__":
    main(parse_cli(Config))
