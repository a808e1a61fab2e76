"""checkpoint.py: a stage's output keeps its input's tokenizer and generation files and dtype, a resume
point keeps the training dtype and survives a kill at any moment, a tokenizer that does not fit the
weights is refused at load. (The HF files themselves against transformers: test_model.py.)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_checkpoint.py -x -q
"""
import json
import os
import re
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

import checkpoint
import npr
from helpers import make_checkpoint, make_model, qwen3_tokenizer_dir
from model import Qwen, add_tag_tokens
from tokenizer import Tokenizer

# Qwen3-*'s generation_config.json: generate() must stop at both ids and keep the sampling defaults
QWEN3_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


@dataclass
class Cfg:
    lr: float = 1e-3
    save_dtype: str = ""


def dtypes(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_stage_output_keeps_the_inputs_tokenizer_and_generation_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = qwen3_tokenizer_dir(tmp_path / "src")
    added = json.load(open(os.path.join(src, "tokenizer_config.json")))["added_tokens_decoder"]
    json.dump({t["content"]: int(i) for i, t in added.items()}, open(os.path.join(src, "added_tokens.json"), "w"))
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              open(os.path.join(src, "special_tokens_map.json"), "w"))
    json.dump(QWEN3_GENERATION, open(os.path.join(src, "generation_config.json"), "w"))
    make_model(src, 151936, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8)   # Qwen3's 151936 rows
    model, tok = Qwen.from_pretrained(src), Tokenizer.from_pretrained(src)
    ids = add_tag_tokens(model, tok, npr.TAG_NAMES)
    out = tmp_path / "out"
    checkpoint.save_checkpoint(model, tok, str(out), Cfg(), src)
    for f in os.listdir(src):
        assert (out / f).is_file(), f
    assert json.load(open(out / "generation_config.json")) == QWEN3_GENERATION
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [151645, 151643] and gen.top_k == 20
    assert {t: json.load(open(out / "added_tokens.json"))[t] for t in npr.TAGS} == dict(zip(npr.TAGS, ids))
    # transformers' tokenizer rebuilt from vocab.json + merges.txt alone (no tokenizer.json) knows the tags
    slow = tmp_path / "slow"
    shutil.copytree(out, slow, ignore=shutil.ignore_patterns("tokenizer.json", "model*"))
    hf = transformers.AutoTokenizer.from_pretrained(slow, use_fast=False)
    text = "<guideline>\n<plan>1: add</plan>\n</guideline>\n<step>\n1: 2+3=5\n</step>"
    assert hf.encode(text, add_special_tokens=False) == Tokenizer.from_pretrained(out).encode(text)
    assert hf.decode(hf.encode(text, add_special_tokens=False), skip_special_tokens=True) == text


def test_final_checkpoint_in_the_inputs_dtype_resume_point_in_the_training_dtype(tmp_path):
    make_checkpoint(tmp_path / "f32")
    src = str(tmp_path / "bf16")
    shutil.copytree(tmp_path / "f32", src)
    Qwen.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    model, tok = Qwen.from_pretrained(src, dtype=torch.float32), Tokenizer.from_pretrained(src)  # fp32 master
    opt = torch.optim.AdamW(model.parameters())
    out = tmp_path / "out"
    checkpoint.save_resume_point(model, tok, opt, str(out / "last"), Cfg(), src, 1, 0, 1)
    assert dtypes(out / "last") == {"F32"}                       # resumes bit-exactly
    checkpoint.save_final(model, tok, str(out), Cfg(), src, 0, 1)
    assert dtypes(out) == {"BF16"}
    cfg = json.load(open(out / "config.json"))
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert not os.path.lexists(out / "last") and not os.listdir(out / "..").count("out.tmp")
    checkpoint.save_final(model, tok, str(out), Cfg(save_dtype="float32"), src, 0, 1)
    assert dtypes(out) == {"F32"} and json.load(open(out / "config.json"))["dtype"] == "float32"


def test_a_kill_during_a_resume_save_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    model, tok = make_checkpoint(tmp_path / "base")
    opt = torch.optim.AdamW(model.parameters())
    last = str(tmp_path / "run" / "last")
    checkpoint.save_resume_point(model, tok, opt, last, Cfg(), str(tmp_path / "base"), 1, 0, 1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = checkpoint.save_torch

    def dying_save(obj, path):                # the weights are written, the optimizer state is not
        if "optimizer" in str(path):
            raise OSError("No space left on device")
        return real_save(obj, path)
    monkeypatch.setattr(checkpoint, "save_torch", dying_save)
    with pytest.raises(OSError):
        checkpoint.save_resume_point(model, tok, opt, last, Cfg(), str(tmp_path / "base"), 2, 0, 1)
    monkeypatch.setattr(checkpoint, "save_torch", real_save)
    assert os.path.isfile(os.path.join(last, "train_state.pt"))   # the check sft.py / grpo.py resume on
    assert checkpoint.load_resume_point(opt, last, 0, 1, "cpu") == 1
    said = capsys.readouterr().out
    assert "last.1 at step 1" in said and "ignoring the unfinished save" in said    # says which
    back = Qwen.from_pretrained(last).state_dict()
    assert all(torch.equal(back[k], first[k]) for k in first)
    checkpoint.save_resume_point(model, tok, opt, last, Cfg(), str(tmp_path / "base"), 3, 0, 1)
    assert "removed the unfinished save" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run")) == ["last", "last.3"] and checkpoint.load_resume_point(opt, last, 0, 1, "cpu") == 3


def test_tokenizer_with_more_ids_than_embedding_rows_is_refused_at_load(tmp_path):
    """By the one loader, for the decoding scripts and for a training start alike."""
    import sft
    from helpers import make_tokenizer
    V = make_tokenizer(tmp_path / "ok")
    make_model(tmp_path / "ok", V + 10)                 # spare rows, like Qwen's 151936 for 151669 ids
    model, tok = checkpoint.load_checkpoint(str(tmp_path / "ok"), "cpu")
    assert model.config.vocab_size == V + 10 and len(tok) == V
    make_tokenizer(tmp_path / "bad")
    make_model(tmp_path / "bad", V - 4)
    refused = rf"bad: the tokenizer has {V} ids but the model only {V - 4} embedding rows"
    with pytest.raises(ValueError, match=refused):
        checkpoint.load_checkpoint(str(tmp_path / "bad"), "cpu")
    with pytest.raises(ValueError, match=refused):
        checkpoint.start_training(sft.Config(model=str(tmp_path / "bad"), out_dir=str(tmp_path / "run"), threads=0))


def test_the_loader_dtypes(tmp_path):
    """One dtype table (hf_files.DTYPES): "" keeps the file's dtype (fp32 here), bf16=True asks for bf16
    on CUDA only (the decoding scripts' default), a name is that dtype, an unknown name one error."""
    make_checkpoint(tmp_path / "ck")
    load = lambda *a, **k: checkpoint.load_checkpoint(str(tmp_path / "ck"), "cpu", *a, **k)[0].output_weight.dtype
    assert load() == load("", bf16=True) == load("float32") == torch.float32
    assert load("bfloat16") == torch.bfloat16 and load("float16") == torch.float16
    with pytest.raises(ValueError, match=r"unknown dtype 'fp16': one of float32, float16, bfloat16"):
        load("fp16")


@pytest.fixture(scope="module")
def killed_sft(tmp_path_factory):
    """An sft run killed after its resumable saves at steps 1 and 2: (data, base model, the run's folder)."""
    import sft
    from helpers import solution
    d = tmp_path_factory.mktemp("killed")
    make_checkpoint(d / "base")
    (d / "base" / "npr_instruction.txt").write_text("Solve.\n")     # the base's own, short instruction
    (d / "train.jsonl").write_text("".join(json.dumps(dict(question=f"Compute {a}*3 + 4*5.", answer=str(3 * a + 20),
                                                           trajectory=solution(a, 3, 4, 5))) + "\n" for a in range(2, 10)))
    real = sft.lr_at

    def dying(step, total, cfg):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, total, cfg)
    sft.lr_at = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            sft.main(sft_config(d, d / "run"))
    finally:
        sft.lr_at = real
    assert os.readlink(d / "run" / "last") == "last.2"
    return d


def sft_config(d, out):
    import sft
    return sft.Config(model=str(d / "base"), data=str(d / "train.jsonl"), out_dir=str(out), epochs=2, batch_size=4,
                      row_tokens=1024, save_every=1)


def cut(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


CORRUPT = {  # what a careless user or a failing disk leaves -> the file the error names
    "truncated train_state": (lambda run: cut(run / "last.2" / "train_state.pt", 0.5), "last/train_state.pt"),
    "empty train_state": (lambda run: cut(run / "last.2" / "train_state.pt", 0), "last/train_state.pt"),
    "no train_state": (lambda run: os.remove(run / "last.2" / "train_state.pt"), "last/train_state.pt"),
    "truncated optimizer": (lambda run: cut(run / "last.2" / "optimizer.rank0.pt", 0.5), "last/optimizer.rank0.pt"),
    "empty optimizer": (lambda run: cut(run / "last.2" / "optimizer.rank0.pt", 0), "last/optimizer.rank0.pt"),
    "dangling last": (lambda run: shutil.rmtree(run / "last.2"), "last"),
    "last a plain file": (lambda run: (os.remove(run / "last"), (run / "last").write_text("x")), "last"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_a_resume_point_that_cannot_be_used_is_refused_naming_the_file(killed_sft, tmp_path, case):
    """Not a traceback naming no file, nor a silent fresh start that truncates metrics.jsonl: one
    error naming the file and how to start over; the run's records stay as they were."""
    import sft
    run = tmp_path / "run"
    shutil.copytree(killed_sft / "run", run, symlinks=True)
    corrupt, name = CORRUPT[case]
    corrupt(run)
    metrics = (run / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in metrics.splitlines()] == [1, 2]
    with pytest.raises(ValueError) as e:
        sft.main(sft_config(killed_sft, run))
    msg = str(e.value)
    assert msg.startswith(f"{run / name}") and "to start over" in msg and "--no-resume" in msg, msg
    assert "\n" not in msg and (run / "metrics.jsonl").read_text() == metrics


def test_a_full_disk_during_a_resume_save_is_one_line_naming_the_file(killed_sft, tmp_path):
    """A real sft.py resumes at step 2 under a file-size limit that lets the weights through but not the
    optimizer state (RLIMIT_FSIZE: the write fails as on a full disk), so its save at step 3 fails:
    one line naming the file, not torch's "unexpected pos" traceback; `last` stays at step 2, and the
    rerun resumes there and finishes."""
    import resource
    import signal
    import subprocess
    import sys
    import sft
    run = tmp_path / "run"
    shutil.copytree(killed_sft / "run", run, symlinks=True)
    limit = int(1.5 * os.path.getsize(run / "last.2" / "model.safetensors"))
    assert os.path.getsize(run / "last.2" / "optimizer.rank0.pt") > limit

    def small_disk():                         # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    c = sft_config(killed_sft, run)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "sft.py"), "--model", c.model, "--data", c.data, "--out-dir", str(run),
           "--epochs", "2", "--batch-size", "4", "--row-tokens", "1024", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPR_DEBUG", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, preexec_fn=small_disk)
    errors = re.findall(r"error: [^\r\n]*", p.stderr)            # (the line may follow tqdm's bar)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith(f"error: no space left to write {run / 'last.3.partial' / 'optimizer.rank0.pt'} "
                                "(File too large)"), errors
    assert os.readlink(run / "last") == "last.2"
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3]
    sft.main(c)
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not os.path.lexists(run / "last") and os.path.isfile(run / "model.safetensors")
