"""
The built-in default world: a tiny Qwen3 trained from scratch on "sums of products", so that every
NPR stage (distill, sft, grpo, eval) runs on a 2-core CPU in minutes through the same code paths
as a real Qwen checkpoint.

    python toy.py                      # data + tokenizer + base model + quick eval, 7-8 min on 2 cores (23-32k tok/s)
    python toy.py --max-steps 1450     # the same amount of training whatever the machine's load
    python toy.py --min-terms 2 --max-terms 4 --min-adigits 1   # feasibility's task (2-4 terms, a of 1-2 digits)
    python toy.py --max-steps 3 --out-dir /tmp/b --data-dir /tmp/d   # smoke run

Writes out/data/{train,test}.jsonl and out/base (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, train_config.json, metrics.jsonl): an ordinary HF-layout checkpoint that
distill.py / sft.py / grpo.py / eval.py take like any Qwen folder.

The task (shared/toy_feasibility.md): "Compute 23*4 + 17*6 + 48*9." -> 626. By default 3 terms,
every first factor of 2 digits, b in 2..9.
  serial solution: every product worked out by place value, then the additions as one chain:
      23*4=20*4+3*4=80+12=92. 17*6=10*6+7*6=60+42=102. 48*9=40*9+8*9=360+72=432. 92+102=194+432=626. \\boxed{626}
  tagged solution: the same work, one <plan> and one <step> per product, the additions in the <takeaway>:
      <guideline>
      <plan>1: 23*4</plan>
      ...
      </guideline>
      <step>
      1: 23*4=20*4+3*4=80+12=92 #1:92
      </step>
      ...
      <takeaway>
      92+102=194+432=626.
      </takeaway>
      \\boxed{626}
  Why worked products and 2-digit factors: a step must carry enough work to be worth running side by
  side. With `23*4=92` steps (~14 tokens each against ~60 of guideline and takeaway) the ratio of all
  tokens to critical-path tokens was 1.30 and parallel decoding answered later than serial; worked
  steps (~30 tokens) give ~1.6 on this task (2-3 terms with a of 1-2 digits would give ~1.33, since a
  1-digit product has nothing to work out). The worked form also gives the tiny model a chain of
  thought per product: greedy accuracy 0.77 after 1450 steps, where the old 2-3-term task with
  1-2-digit a reached 0.31.
  Why " #1:92": every step names its result, so the takeaway can find step i's result by content
  (all branches share their RoPE positions). Without it 17% of the RL model's parallel answers
  mis-copied a step's result (140 of 800); `--label-share 0` gives the old, unnamed format (tagged_solution).
  "serial-writer" tagged variant: the steps were written one after another, so step i >= 2 also
  carries the running sum (2: 17*6=10*6+7*6=60+42=102. 92+102=194) and the takeaway only restates
  the last sum. It is what a serial model imitating the format writes. Decoded in parallel, step i
  cannot see step i-1 and must guess the running sum: the base model loses accuracy in parallel mode,
  which self-distillation + parallel SFT are meant to recover (the point of the demo). With
  `distill.py --reject-sibling-results` (npr.sibling_numbers) serial-writer samples are not kept.
The base model sees a mix: prompts with the short INSTRUCTION get tagged solutions (a share of
them serial-writer), plain prompts get serial solutions.

Measured (idle 2-core Xeon, inside `bash speedrun.sh`, seed 0): 1450 steps in 312 s (~32k tok/s),
319 s in all; final loss 0.008; greedy on the first 200 test problems with the instruction: serial
decoding 0.785 accuracy (format-valid 1.00), parallel decoding 0.000 (format-valid 0.015). At T=1 on
100 x 8: serial 0.660 (32% of the samples serial-writer; pass@8 0.90), parallel 0.000. Why parallel
fails: besides the serial-writer sums, this tiny model finds "the next plan not yet carried out" by
counting the steps already written, not by the step's number; a branch sees no sibling steps, so
its steps do not follow their plans (most parallel samples end malformed or with a wrong sum).
Parallel SFT has to teach the lookup by number. An earlier run of the same script (one thread, a
busy machine) gave greedy serial 0.770: 2-thread CPU reductions are not bit-reproducible, so read
differences of a few points as noise.
On a busy machine two threads slow down 5-10x (one thread far less): the time budget then buys
few steps and accuracy collapses; the script warns, and --max-steps / --threads 1 avoid it.

Deliberate deviations from a real instruct model:
- Tokenizer: one token per character (printable ASCII and "\\n"; any other character is dropped
  by encode), plus <|endoftext|> <|im_start|> <|im_end|> as special tokens and `\\boxed{` and the
  8 NPR tags as ONE ordinary (non-special) token each. A real instruct model sees the tags as
  multi-token text; single tokens keep the sequences short enough for a CPU. sft.py's tag adding
  finds them present and leaves their trained embedding rows alone.
- The instruction is a few words, not npr.INSTRUCTION (the per-character prompt would be 1.5k tokens).
- The budget is a step count (reproducible on any machine; 5-8 min on 2 free cores); with
  --max-steps 0 the schedule follows the wall clock instead (cosine over `minutes`).
"""
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import npr
from cli import INSTRUCTION_FILE, atomic_write, chat_prompt, instruction_for, load_for_sampling, parse_cli
from model import Qwen, QwenConfig
from sampler import Sampler, SamplingParams
from tokenizer import Tokenizer


@dataclass
class Config:
    out_dir: str = "out/base"        # the base checkpoint (HF layout) + metrics.jsonl
    data_dir: str = "out/data"       # train.jsonl / test.jsonl
    seed: int = 0                    # data split, training problems and init
    n_train: int = 20000             # problems in train.jsonl (later stages draw from it)
    n_test: int = 1000               # problems in test.jsonl (never trained on, by exact question)
    # task difficulty (toy_feasibility.md section 3: first-factor digits is the main knob)
    min_terms: int = 3               # 3 terms, every a of 2 digits: steps long enough to run side by side
    max_terms: int = 3
    min_adigits: int = 2             # digits of the first factor a: 1 -> 2..9, 2 -> 10..99
    max_adigits: int = 2
    min_b: int = 2                   # second factor b in [min_b, max_b]
    max_b: int = 9
    # training mix
    tagged_share: float = 0.7        # share of training prompts with INSTRUCTION and a tagged solution
    serial_writer_share: float = 0.4  # share of the tagged solutions in the serial-writer variant
    label_share: float = 1.0         # share of the tagged solutions whose steps name their results (" #1:92"); 0 = the old format
    # model: size S of toy_feasibility.md (0.40M parameters)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    # optimisation
    max_steps: int = 1450            # training steps (5-8 min on 2 free cores); the cosine schedule spans them
    minutes: float = 4.0             # with --max-steps 0: a wall-clock budget instead (schedule follows the clock)
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
    eval_max_new_tokens: int = 256
    # --diagnose DIR: classify the parallel-mode answers of a checkpoint (what goes wrong), then exit
    diagnose: str = ""
    diagnose_n: int = 200            # first N test problems x 4 samples, T=1, top-p 0.7 (eval.py's settings)


# -----------------------------------------------------------------------------
# The task

INSTRUCTION = "Solve it with parallel steps."
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


def parse_terms(question):
    """[(a, b), ...] back from a question (train.jsonl keeps only question and answer)."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)\*(\d+)", question)]


def _sums(terms):
    """Products and the left-to-right additions [(running, product, new running), ...]."""
    prods = [a * b for a, b in terms]
    adds, run = [], prods[0]
    for p in prods[1:]:
        adds.append((run, p, run + p))
        run += p
    return prods, adds


def worked(a, b):
    """One product written out by place value: 23*4=20*4+3*4=80+12=92 (a one-part a: 40*4=160, 8*9=72).
    A step's whole work: it needs only its own term, so the steps of a fork are independent."""
    parts = [int(d) * 10 ** e for e, d in enumerate(reversed(str(a))) if d != "0"][::-1]
    if len(parts) == 1:
        return f"{a}*{b}={a * b}"
    return (f"{a}*{b}=" + "+".join(f"{x}*{b}" for x in parts) + "=" + "+".join(str(x * b) for x in parts)
            + f"={a * b}")


def chain(prods):
    """The left-to-right additions as one chain: 92+102=194+72=266"""
    out, run = str(prods[0]), prods[0]
    for p in prods[1:]:
        run += p
        out += f"+{p}={run}"
    return out


def serial_solution(terms):
    """23*4=20*4+3*4=80+12=92. 17*6=10*6+7*6=60+42=102. 48*9=40*9+8*9=360+72=432. 92+102=194+432=626. \\boxed{626}
    (the same work as the tagged solution, written in one line)"""
    prods = [a * b for a, b in terms]
    return " ".join(f"{worked(a, b)}." for a, b in terms) + f" {chain(prods)}. {BOXED}{sum(prods)}}}"


def label(i, value):
    """A step's result under its step's name: " #2:102" (see tagged_solution)."""
    return f" #{i}:{value}"


def tagged_solution(terms, serial_writer=False, labels=True):
    """The NPR format (NPR.md section 2), one plan and one step per product; each step works its
    product out, the takeaway adds the products up. serial_writer: step i >= 2 also adds its product
    to the running sum of the earlier steps, and the takeaway restates the last addition (what a model
    that writes the steps one after another produces).
    labels: step i ends by naming its result (" #2:102"). All branches share their positions, so
    the takeaway can only tell the steps' results apart by content; a name right before each result
    gives every digit of it a nearby, distinct mark. Without the names, over half of the wrong parallel
    answers mis-copied a step's result (560 with a sibling's 522 became 520). The name avoids "=":
    with ", s2=102" the base model learned its arithmetic far more slowly (serial accuracy 0.2-0.5
    instead of ~0.78 after the same training), as if "=" no longer always meant "work it out"."""
    prods, adds = _sums(terms)
    plans = "".join(f"<plan>{i}: {a}*{b}</plan>\n" for i, (a, b) in enumerate(terms, 1))
    steps = []
    for i, (a, b) in enumerate(terms, 1):
        body = f"{i}: {worked(a, b)}" + (label(i, a * b) if labels else "")
        if serial_writer and i >= 2:
            x, y, z = adds[i - 2]
            body += f". {x}+{y}={z}"
        steps.append(f"<step>\n{body}\n</step>\n")
    take = f"{adds[-1][0]}+{adds[-1][1]}={adds[-1][2]}." if serial_writer else f"{chain(prods)}."
    return f"<guideline>\n{plans}</guideline>\n{''.join(steps)}<takeaway>\n{take}\n</takeaway>\n{BOXED}{sum(prods)}}}"


def serial_writer_step(step):
    """A step that carries a running sum (". 92+102=194"): it reads a sibling's result."""
    return ". " in step


def answer_errors(text, terms):
    """Where a tagged answer to `terms` goes wrong -> "right", "step" (a step's result is not its
    product), "copy" (the takeaway's operands are not the step results) or "add" (operands right,
    the sum wrong). The takeaway chain a+b=c+d=e has operands a, b, d, ..."""
    prods = [a * b for a, b in terms]
    parsed = npr.parse(text)
    if parsed.answer is not None and parsed.answer.strip() == str(sum(prods)):
        return "right"
    block = parsed.blocks[0] if parsed.blocks else None
    res = {}                                       # step number -> the last number it wrote
    for step in block.steps if block else []:
        nums = re.findall(r"\d+", step)                  # "N: ...=92" or "N: ...=92 #N:92"
        if len(nums) > 1 and re.match(r"\s*\d+:", step):
            res[int(nums[0])] = int(nums[-1])
    if [res.get(i) for i in range(1, len(prods) + 1)] != prods:
        return "step"
    nums = [int(x) for x in re.findall(r"\d+", block.takeaway or "")]
    return "copy" if sorted(nums[:2] + nums[3::2]) != sorted(prods) else "add"


def diagnose(path, test, n):
    """Parallel-mode answers of a checkpoint on the first n test problems x 4 (T=1, top-p 0.7): how
    many are right, and where the others go wrong (answer_errors)."""
    model, tok = load_for_sampling(path, "cuda" if torch.cuda.is_available() else "cpu", "", True)
    probs, ins = test[:n], instruction_for(path, "")
    p = SamplingParams(mode="parallel", temperature=1.0, top_p=0.7, max_new_tokens=512)
    prompts = [chat_prompt(tok, q["question"], ins) for q in probs]          # as eval.py prompts
    got, _ = Sampler(model, tok).generate_many(prompts, 4, p, 256, progress=True)
    kinds = [answer_errors(s.text, parse_terms(q["question"])) for q, ss in zip(probs, got) for s in ss]
    out = {k: kinds.count(k) for k in ("right", "step", "copy", "add")}
    print(f"{path}: {len(kinds)} parallel answers: " + ", ".join(f"{k} {v} ({v / len(kinds):.3f})" for k, v in out.items()))
    return out


def user_prompt(question, tagged=True):
    """The user message: npr.build_prompt with the short instruction when a tagged answer is wanted
    (exactly what distill / sft / grpo / eval build from the checkpoint's npr_instruction.txt)."""
    return npr.build_prompt(question, INSTRUCTION) if tagged else question


def write_data(out_dir, n_train, n_test, seed=0, **task):
    """train.jsonl / test.jsonl with {"question", "answer"}; test questions never appear in train.
    The same (n_test, seed, task) always gives the same test set; train is drawn after it."""
    rng = random.Random(seed)
    splits = {}
    seen = set()
    for name, n in (("test", n_test), ("train", n_train)):
        rows = []
        while len(rows) < n:
            p = make_problem(rng, **task)
            if p["question"] not in seen:  # unique within a split, disjoint across them
                seen.add(p["question"])
                rows.append({"question": p["question"], "answer": p["answer"]})
        splits[name] = rows
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        atomic_write(os.path.join(out_dir, f"{name}.jsonl"), (json.dumps(r) + "\n" for r in rows))
    return splits["train"], splits["test"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Tokenizer and model

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
    """Chat-rendered prompt ids, ending with the assistant header."""
    return tok.encode(tok.render_chat([{"role": "user", "content": user_prompt(question, tagged)}],
                                      enable_thinking=False))


def example(tok, question, solution, tagged):
    """(ids, n_prompt): the sequence trained on is prompt + solution + <|im_end|>; the loss covers
    the ids from n_prompt on."""
    p = prompt_ids(tok, question, tagged)
    return p + tok.encode(solution) + [tok.im_end_id], len(p)


def sample_example(rng, tok, cfg, exclude=()):
    """A fresh training example from the mix (a problem not in `exclude`)."""
    while True:
        prob = make_problem(rng, **task_kwargs(cfg))
        if prob["question"] not in exclude:
            break
    if rng.random() < cfg.tagged_share:
        sol = tagged_solution(prob["terms"], serial_writer=rng.random() < cfg.serial_writer_share,
                              labels=rng.random() < cfg.label_share)
        return example(tok, prob["question"], sol, True)
    return example(tok, prob["question"], serial_solution(prob["terms"]), False)


def task_kwargs(cfg):
    return dict(nterms=(cfg.min_terms, cfg.max_terms), adigits=(cfg.min_adigits, cfg.max_adigits),
                brange=(cfg.min_b, cfg.max_b))


def collate(examples, pad_id):
    """-> ids (B, T) right-padded, targets (B, T): the next token where it is an assistant token, else -1."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), T), -1, dtype=torch.long)
    for r, (x, n_prompt) in enumerate(examples):
        ids[r, :len(x)] = torch.tensor(x)
        tgt[r, n_prompt - 1:len(x) - 1] = torch.tensor(x[n_prompt:])  # position t predicts token t+1
    return ids, tgt


def lr_at(cfg, step, progress):
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


# -----------------------------------------------------------------------------
# Quick evaluation

def evaluate(model, tok, problems, mode="serial", tagged=True, batch_size=100, max_new_tokens=256):
    """Greedy decoding of problems ({"question", "answer"}) -> accuracy, format-valid share (score 0),
    share of outputs that carry a running sum inside a step (serial-writer), mean response tokens."""
    sampler = Sampler(model, tok)
    params = SamplingParams(mode=mode, temperature=0.0, max_new_tokens=max_new_tokens)
    texts, reasons, ntok = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [prompt_ids(tok, p["question"], tagged) for p in chunk]
        for (s,) in sampler.generate(prompts, n=1, params=params):
            texts.append(tok.decode([t for t in s.ids if t not in tok.stop_ids]))
            reasons.append(s.finish_reason)
            ntok.append(s.stats["total_tokens"])
    n = max(1, len(problems))
    parsed = [npr.parse(t) for t in texts]
    return dict(mode=mode, tagged=tagged, n=len(problems),
                acc=sum(npr.grade(t, p["answer"]) for t, p in zip(texts, problems)) / n,
                format_ok=sum(npr.format_score(t)[0] == 0.0 for t in texts) / n,
                serial_writer=sum(any(serial_writer_step(s) for b in q.blocks for s in b.steps) for q in parsed) / n,
                eos=sum(r == "eos" for r in reasons) / n, mean_tokens=sum(ntok) / n), texts


# -----------------------------------------------------------------------------
# CLI (the lead moves this to a shared module later)

# -----------------------------------------------------------------------------

def main(cfg: Config):
    if cfg.diagnose:
        return diagnose(cfg.diagnose, read_jsonl(os.path.join(cfg.data_dir, "test.jsonl")), cfg.diagnose_n)
    print(json.dumps(asdict(cfg), indent=2))
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
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norm weights
    keep = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    open(metrics_path, "w").close()

    print("== train ==")
    budget = cfg.minutes * 60
    bar = tqdm(total=cfg.max_steps if cfg.max_steps else int(budget), unit="step" if cfg.max_steps else "s",
               desc="train", dynamic_ncols=True)
    step, t_train, queue, tokens, metrics = 0, 0.0, [], 0, []
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / cfg.max_steps if cfg.max_steps else elapsed / budget
        if progress >= 1.0:
            break
        if not queue:  # length bucketing: draw `bucket` batches, sort by length, shuffle the batches
            pool = sorted((sample_example(rng, tok, cfg, exclude) for _ in range(cfg.bucket * cfg.batch_size)),
                          key=lambda e: len(e[0]))
            queue = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
            rng.shuffle(queue)
        ids, tgt = collate(queue.pop(), tok.pad_id)
        lr = lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # plain causal forward (no layout): the base model is a serial model
        logp = model(ids, targets=tgt)                 # (B, T), 0 where tgt < 0
        n_tgt = (tgt >= 0).sum()
        loss = -logp.sum() / n_tgt                             # token mean over the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += int((ids != tok.pad_id).sum())
        t_train = time.perf_counter() - t0
        m = dict(step=step, loss=round(loss.item(), 5), lr=lr, grad_norm=round(gnorm.item(), 4),
                 tokens=tokens, tok_per_s=round(tokens / t_train), time_s=round(t_train, 2))
        metrics.append(m)
        if step % cfg.log_every == 0 or step == 1:
            tqdm.write(" | ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v}" for k, v in m.items()))
        if cfg.max_steps:
            bar.update(1)
        else:
            bar.update(min(int(budget), int(t_train)) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss.item():.4f}")
    bar.close()
    final_loss = sum(m["loss"] for m in metrics[-20:]) / max(1, len(metrics[-20:]))
    tok_s = tokens / max(t_train, 1e-9)
    print(f"trained {step} steps in {t_train:.1f}s | {tok_s:.0f} tok/s | final loss (mean of last 20) {final_loss:.4f}")
    if not cfg.max_steps and tok_s < 20000:
        print(f"WARNING: {tok_s:.0f} tok/s is well below the ~30k tok/s of an idle 2-core machine (another process "
              "busy?): the time budget bought fewer steps than usual, so accuracy will be lower. "
              "--max-steps N trains a fixed number of steps whatever the load; on a busy machine --threads 1 is "
              "several times faster than 2.")

    print("== save ==")
    model.eval()
    model.save_pretrained(cfg.out_dir)
    tok.save_pretrained(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, INSTRUCTION_FILE), "w") as f:   # later stages prompt with it
        f.write(INSTRUCTION + "\n")
    with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    with open(metrics_path, "a") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    print(f"checkpoint -> {cfg.out_dir}")

    print("== quick eval (greedy) ==")
    probs = test[:cfg.eval_n]
    results = []
    for mode in ("serial", "parallel"):
        t1 = time.perf_counter()
        r, texts = evaluate(model, tok, probs, mode, True, cfg.eval_batch, cfg.eval_max_new_tokens)
        r["time_s"] = round(time.perf_counter() - t1, 1)
        results.append(r)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        if texts:
            print(f"  e.g. {probs[0]['question']} ->\n" + "\n".join("    " + ln for ln in texts[0].splitlines()))
    with open(metrics_path, "a") as f:
        f.writelines(json.dumps({"eval": r, "step": step}) + "\n" for r in results)
    return dict(steps=step, train_s=t_train, final_loss=final_loss, eval=results)


if __name__ == "__main__":
    main(parse_cli(Config))
