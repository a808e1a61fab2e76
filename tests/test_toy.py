"""toy.py, the built-in default: every solution it trains on is correct and well-formed under the
format's own parser (npr.parse, format_score, token_layout), the steps of a fork are independent
unless serial-writer, the character tokenizer round-trips and loads in transformers to the same ids,
the data split is disjoint and reproducible, and main() writes the same checkpoint for the same
config, one the rest of the code loads. Also extras/toy_diagnose.py's sorting of wrong answers.
Run: .venv/bin/python -m pytest tests/test_toy.py -q"""
import json
import random

import pytest
import torch

import npr
import toy
from extras import toy_diagnose
from model import Qwen
from runs import read_problems
from sampler import Sampler, SamplingParams
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The toy tokenizer, saved and loaded back through tokenizer.py."""
    path = tmp_path_factory.mktemp("toktok")
    toy.build_tokenizer().save_pretrained(path)
    return Tokenizer.from_pretrained(path)


def problems(n=300, seed=0, **kw):
    rng = random.Random(seed)
    return [toy.make_problem(rng, **kw) for _ in range(n)]


def test_problem_and_solutions_example():
    terms = [(23, 4), (17, 6), (8, 9)]
    assert toy.worked(23, 4) == "23*4=20*4+3*4=80+12=92"
    assert toy.worked(40, 4) == "40*4=160" and toy.worked(8, 9) == "8*9=72"
    assert toy.chain([92, 102, 72]) == "92+102=194+72=266"
    assert toy.serial_solution(terms) == \
        "23*4=20*4+3*4=80+12=92. 17*6=10*6+7*6=60+42=102. 8*9=72. 92+102=194+72=266. \\boxed{266}"
    head = "<guideline>\n<plan>1: 23*4</plan>\n<plan>2: 17*6</plan>\n<plan>3: 8*9</plan>\n</guideline>\n"
    assert toy.tagged_solution(terms, labels=False) == head + (
        "<step>\n1: 23*4=20*4+3*4=80+12=92\n</step>\n<step>\n2: 17*6=10*6+7*6=60+42=102\n</step>\n"
        "<step>\n3: 8*9=72\n</step>\n<takeaway>\n92+102=194+72=266.\n</takeaway>\n\\boxed{266}")
    assert toy.tagged_solution(terms) == head + (      # the default: named results
        "<step>\n1: 23*4=20*4+3*4=80+12=92 #1:92\n</step>\n<step>\n2: 17*6=10*6+7*6=60+42=102 #2:102\n</step>\n"
        "<step>\n3: 8*9=72 #3:72\n</step>\n<takeaway>\n92+102=194+72=266.\n</takeaway>\n\\boxed{266}")
    sw = toy.tagged_solution(terms, serial_writer=True, labels=False)
    assert "<step>\n2: 17*6=10*6+7*6=60+42=102. 92+102=194\n</step>" in sw
    assert "<step>\n3: 8*9=72. 194+72=266\n</step>" in sw
    assert "<takeaway>\n194+72=266.\n</takeaway>" in sw
    sw = toy.tagged_solution(terms, serial_writer=True)
    assert "<step>\n2: 17*6=10*6+7*6=60+42=102 #2:102. 92+102=194\n</step>" in sw
    assert "<takeaway>\n194+72=266.\n</takeaway>" in sw
    assert toy.serial_writer_step("2: 17*6=10*6+7*6=60+42=102. 92+102=194")
    assert not toy.serial_writer_step("2: 17*6=10*6+7*6=60+42=102")


def test_make_problem_ranges():
    for p in problems(500, nterms=(2, 4), adigits=(1, 2), brange=(2, 9)):
        assert 2 <= len(p["terms"]) <= 4
        assert all(2 <= a <= 99 and 2 <= b <= 9 for a, b in p["terms"])
        assert p["answer"] == str(sum(a * b for a, b in p["terms"]))
        assert p["question"] == "Compute " + " + ".join(f"{a}*{b}" for a, b in p["terms"]) + "."
    hard = problems(200, nterms=(3, 3), adigits=(2, 2))
    assert all(len(p["terms"]) == 3 and all(a >= 10 for a, _ in p["terms"]) for p in hard)


def test_solutions_are_correct_and_well_formed(tok):
    for i, p in enumerate(problems(300)):
        k = len(p["terms"])
        assert npr.grade(toy.serial_solution(p["terms"]), p["answer"])
        for sw, labels in ((False, True), (True, True), (False, False), (True, False)):
            sol = toy.tagged_solution(p["terms"], serial_writer=sw, labels=labels)
            assert npr.format_score(sol) == (0.0, []), sol
            assert npr.grade(sol, p["answer"])
            parsed = npr.parse(sol)
            assert not parsed.problems and len(parsed.blocks) == 1 and len(parsed.blocks[0].steps) == k
            # one piece per token (tags as one piece) and one piece per character
            for pieces in ([tok.decode_piece(t) for t in tok.encode(sol)], list(sol)):
                lay = npr.token_layout(pieces)
                assert lay.problems == [], (sol, lay.problems)
                assert max(lay.branch) == k and lay.block[0] == 1 and set(lay.block) == {0, 1}
            # independent steps: step i is its own product worked out, nothing from its siblings
            steps = [s.strip() for s in parsed.blocks[0].steps]
            if not sw:
                assert steps == [f"{j}: {toy.worked(a, b)}" + (f" #{j}:{a * b}" if labels else "")
                                 for j, (a, b) in enumerate(p["terms"], 1)]
                assert not any(toy.serial_writer_step(s) for s in steps)
            else:
                assert [toy.serial_writer_step(s) for s in steps] == [False] + [True] * (k - 1)
    for a in range(2, 100):  # the worked product is right for every first factor
        for b in (2, 7, 9):
            lhs, *mid, rhs = toy.worked(a, b).split("=")
            assert lhs == f"{a}*{b}" and int(rhs) == a * b
            assert all(sum(eval(t) for t in m.split("+")) == a * b for m in mid)


def test_tokenizer_round_trip_and_single_tokens(tok):
    texts = []
    for p in problems(300, seed=1):
        texts += [toy.serial_solution(p["terms"]), toy.tagged_solution(p["terms"]),
                  toy.tagged_solution(p["terms"], serial_writer=True), toy.tagged_solution(p["terms"], labels=False)]
        texts += [tok.decode(toy.prompt_ids(tok, p["question"], t)) for t in (True, False)]
    multi = npr.TAGS + (toy.BOXED,) + toy.SPECIAL_TOKENS
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        # one token per character, except the multi-character tokens (one each)
        assert len(ids) == len(t) - sum(t.count(m) * (len(m) - 1) for m in multi)
    for tag in npr.TAGS + (toy.BOXED, "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(tag)) == 1, tag
        assert len(tok.encode(f"x{tag}\n")) == 3
    for ch in toy.CHARS:
        assert len(tok.encode(ch)) == 1 and tok.decode(tok.encode(ch)) == ch
    assert tok.eos_id == tok.im_end_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.stop_ids == {tok.im_end_id, tok.endoftext_id}
    assert tok.chat_variant == "qwen3_instruct"
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # tags are ordinary vocabulary (skip_special_tokens keeps them), the ChatML markers are special
    s = "<|im_start|><step>\n1: 2*3=6\n</step>\n\\boxed{6}<|im_end|>"
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == "<step>\n1: 2*3=6\n</step>\n\\boxed{6}"
    # tag adding (sft.py) finds the tags present: ids unchanged, still non-special
    ids = [tok.token_to_id(t) for t in npr.TAGS]
    assert tok.add_tokens(list(npr.TAGS)) == ids
    specials = {t.content for t in tok._tk.get_added_tokens_decoder().values() if t.special}
    assert specials == set(toy.SPECIAL_TOKENS)


def test_tokenizer_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    toy.build_tokenizer().save_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    p = problems(5)[0]
    msgs = [{"role": "user", "content": npr.build_prompt(p["question"], toy.INSTRUCTION)}]
    prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.decode(toy.prompt_ids(ours, p["question"])) == prompt        # the prompt trained on
    text = prompt + toy.tagged_solution(p["terms"]) + "<|im_end|>"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text


def test_write_data_disjoint_and_reproducible(tmp_path):
    train, test = toy.write_data(tmp_path / "a", 400, 100, seed=3)
    train2, test2 = toy.write_data(tmp_path / "b", 400, 100, seed=3)
    _, test_more_train = toy.write_data(tmp_path / "c", 50, 100, seed=3)
    _, other = toy.write_data(tmp_path / "d", 50, 100, seed=4)
    assert (train, test) == (train2, test2) and test_more_train == test and other != test
    qs_train, qs_test = [r["question"] for r in train], [r["question"] for r in test]
    assert len(set(qs_train)) == 400 and len(set(qs_test)) == 100 and not set(qs_train) & set(qs_test)
    for name, rows in (("train", train), ("test", test)):
        assert read_problems(str(tmp_path / "a" / f"{name}.jsonl")) == rows
        assert all(set(r) == {"question", "answer"} for r in rows)
        # "Compute 23*4 + 17*6." is a Python expression between "Compute " and "."
        assert all(str(eval(r["question"][len("Compute "):-1])) == r["answer"] for r in rows)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


def test_collate_masks_prompt_and_padding(tok):
    cfg = toy.Config()
    rng = random.Random(0)
    exs = [toy.sample_example(rng, tok, cfg) for _ in range(8)]
    ids, tgt = toy.collate(exs, tok.pad_id)
    for r, (x, n_prompt) in enumerate(exs):
        assert ids[r, :len(x)].tolist() == x
        assert (tgt[r, :n_prompt - 1] == -1).all() and (tgt[r, len(x) - 1:] == -1).all()
        assert tgt[r, n_prompt - 1:len(x) - 1].tolist() == x[n_prompt:]
        assert x[-1] == tok.im_end_id
        assert tok.decode(x[:n_prompt]).endswith("<|im_start|>assistant\n")
    # both prompt kinds occur in the mix; by default no step reads a sibling, with the knob some do
    texts = [tok.decode(x[n:]) for x, n in (toy.sample_example(rng, tok, cfg) for _ in range(200))]
    assert any(t.startswith("<guideline>") for t in texts) and any(not t.startswith("<guideline>") for t in texts)
    assert not any(toy.serial_writer_step(s) for t in texts for b in npr.parse(t).blocks for s in b.steps)
    planted = toy.Config(serial_writer_share=0.4)
    texts = [tok.decode(x[n:]) for x, n in (toy.sample_example(rng, tok, planted) for _ in range(200))]
    assert any(toy.serial_writer_step(s) for t in texts for b in npr.parse(t).blocks for s in b.steps)


def test_lr_schedule():
    cfg = toy.Config(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=200)
    lrs = [toy.lr_at(cfg, s) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0, abs=0.01)    # linear warm-up
    assert lrs[100] == pytest.approx(0.55) and toy.lr_at(cfg, 200) == pytest.approx(0.1)  # cosine to lr * 0.1
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))                             # then only down


def test_parse_cli():
    cfg = toy.parse_cli(toy.Config, ["--max-steps", "7", "--tagged-share", "0.5", "--out-dir", "x"])
    assert (cfg.max_steps, cfg.tagged_share, cfg.out_dir, cfg.seed) == (7, 0.5, "x", toy.Config.seed)

    from dataclasses import dataclass

    @dataclass
    class C:
        flag: bool = True  # a switch
        n: int = 1
    assert toy.parse_cli(C, ["--no-flag", "--n", "3"]) == C(False, 3)
    assert toy.parse_cli(C, []) == C(True, 1)
    with pytest.raises(SystemExit):  # --help renders every field's comment (a "%" in one must not break it)
        toy.parse_cli(toy.Config, ["--help"])


SMOKE = dict(n_train=60, n_test=20, max_steps=3, batch_size=4, bucket=2, hidden_size=32, num_layers=1, num_heads=2,
             num_kv_heads=1, head_dim=16, intermediate_size=64, eval_n=4, eval_batch=4, eval_max_new_tokens=12,
             warmup_steps=2, threads=1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A 3-step toy.main run: (its return value, its output folder)."""
    root = tmp_path_factory.mktemp("smoke")
    out = toy.main(toy.Config(out_dir=str(root / "base"), data_dir=str(root / "data"), **SMOKE))
    return out, root


def test_main_smoke(smoke):
    out, root = smoke
    assert out["steps"] == 3 and [r["mode"] for r in out["eval"]] == ["serial", "parallel"]
    base = root / "base"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_config.json"):
        assert (base / f).is_file(), f
    assert (base / "npr_instruction.txt").read_text() == toy.INSTRUCTION + "\n"    # later stages prompt with it
    assert json.loads((base / "train_config.json").read_text())["max_steps"] == 3
    lines = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3] and sum("eval" in m for m in lines) == 2
    assert len(read_problems(str(root / "data" / "train.jsonl"))) == 60

    model = Qwen.from_pretrained(str(base))
    tok = Tokenizer.from_pretrained(str(base))
    cfgd = json.loads((base / "config.json").read_text())
    assert cfgd["architectures"] == ["Qwen3ForCausalLM"] and cfgd["vocab_size"] == tok.vocab_size
    assert model.config.tie_word_embeddings and model.config.dtype == torch.float32
    q = read_problems(str(root / "data" / "test.jsonl"))[0]["question"]
    for mode in ("serial", "parallel"):
        (s,) = Sampler(model, tok).generate([toy.prompt_ids(tok, q)], n=1,
                                            params=SamplingParams(mode=mode, temperature=1.0, max_new_tokens=16))[0]
        # the text is the response without its final stop token (a random model may stop early)
        assert 0 < len(s.ids) and tok.decode(s.ids[:-1] if s.finish_reason == "eos" else s.ids) == s.text


def test_main_is_reproducible(smoke, tmp_path):
    """The same config gives the same data and bit for bit the same weights (every draw is seeded),
    with or without the quick evaluation (--eval-n 0 skips it)."""
    _, root = smoke
    out = toy.main(toy.Config(out_dir=str(tmp_path / "base"), data_dir=str(tmp_path / "data"),
                              **{**SMOKE, "eval_n": 0}))
    assert out["eval"] == []
    for f in ("base/model.safetensors", "base/tokenizer.json", "data/train.jsonl", "data/test.jsonl"):
        assert (tmp_path / f).read_bytes() == (root / f).read_bytes(), f


# -----------------------------------------------------------------------------
# extras/toy_diagnose.py

@pytest.mark.parametrize("labels", [True, False])
def test_answer_error(labels):
    terms = [(23, 4), (17, 6), (48, 9)]
    assert toy_diagnose.parse_terms("Compute 23*4 + 17*6 + 48*9.") == terms
    right = toy.tagged_solution(terms, labels=labels)
    assert toy_diagnose.answer_error(right, terms) == "right"
    swapped = right.replace("92+102=194+432=626", "102+92=194+432=626")    # any order adds up the same
    assert toy_diagnose.answer_error(swapped, terms) == "right"
    copy = right.replace("92+102=194+432=626.", "61+102=163+432=595.").replace("{626}", "{595}")
    assert toy_diagnose.answer_error(copy, terms) == "copy"
    add = right.replace("92+102=194+432=626.", "92+102=184+432=616.").replace("{626}", "{616}")
    assert toy_diagnose.answer_error(add, terms) == "add"
    step = right.replace("80+12=92", "80+12=93").replace("#1:92", "#1:93").replace("{626}", "{627}")
    assert toy_diagnose.answer_error(step, terms) == "step"
    assert toy_diagnose.answer_error(right.replace("{626}", "{625}"), terms) == "add"


def test_diagnose_smoke(smoke):
    _, root = smoke
    out = toy_diagnose.main(toy_diagnose.Config(model=str(root / "base"), data=str(root / "data" / "test.jsonl"),
                                                n=2, max_new_tokens=64))
    assert set(out) == set(toy_diagnose.KINDS) and sum(out.values()) == 2 * 4
