"""sft.py, parallel SFT (stage 2b): the loss covers assistant tokens only; packed documents are blind
to each other; a trajectory becomes exactly the tokens, positions and branches the engine samples;
the loss falls and the checkpoint reloads with identical logits; a killed run resumes with the same
losses; 2 gloo ranks (DDP, FSDP2) == 1 rank; an over-long sequence is dropped and counted.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sft.py -x -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import npr
import sft
from helpers import make_checkpoint, solution
from model import Qwen
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(n):
    return [dict(question=f"Compute {a}*3 + 4*5.", answer=str(3 * a + 20),
                 trajectory=solution(a, 3, 4, 5)) for a in range(2, 2 + n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    make_checkpoint(d / "base")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    (d / "ins.txt").write_text("Solve.\n")
    return d


def test_encode_example_loss_mask_and_layout(setup):
    tok = Tokenizer.from_pretrained(str(setup / "base"))
    r = rows(1)[0]
    ex, why = sft.encode_example(tok, r, "Solve.", 5)
    assert why is None
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": npr.build_prompt(r["question"], "Solve.")}],
                                        enable_thinking=False))
    P = len(prompt)
    assert ex["ids"][:P] == prompt and ex["loss"] == [0] * P + [1] * (len(ex["ids"]) - P)
    assert ex["ids"][-1] == tok.eos_id and set(ex["branch"]) == {0, 1, 2}
    row = sft.to_row([ex])
    tgt = row["targets"][0].tolist()
    assert all(t == -100 for t in tgt[:P - 1]) and tgt[P - 1] == ex["ids"][P]   # last prompt token predicts
    assert tgt[-1] == -100
    bad, why = sft.encode_example(tok, dict(r, trajectory="<guideline>\n<plan>1: a</plan>\n"), "Solve.", 5)
    assert bad is None and why


def test_packed_documents_are_blind_to_each_other(setup):
    tok = Tokenizer.from_pretrained(str(setup / "base"))
    model = Qwen.from_pretrained(str(setup / "base"))
    exs = [sft.encode_example(tok, r, "Solve.", 5)[0] for r in rows(3)]
    packed = sft.pack(exs, 10_000)
    assert len(packed) == 1
    r = packed[0]
    with torch.no_grad():
        lp = model(r["ids"], r["pos"], r["layout"], targets=r["targets"])
        start = 0
        for d in sorted(exs, key=lambda e: -len(e["ids"])):      # pack() orders longest first
            alone = sft.to_row([d])
            lp1 = model(alone["ids"], alone["pos"], alone["layout"], targets=alone["targets"])
            assert (lp[:, start:start + len(d["ids"])] - lp1).abs().max() <= 5e-5    # fp32, |log-probs| up to ~30
            start += len(d["ids"])


def test_serial_layout_is_a_plain_causal_forward(setup):
    """--layout serial (SR-Beta): the same ids and loss mask as the parallel layout, and each packed
    document's log-probs equal a plain causal forward of it alone (positions 0..n-1, no branch mask)."""
    tok = Tokenizer.from_pretrained(str(setup / "base"))
    model = Qwen.from_pretrained(str(setup / "base"))
    par = [sft.encode_example(tok, r, "Solve.", 5)[0] for r in rows(3)]
    ser = [sft.encode_example(tok, r, "Solve.", 5, layout="serial")[0] for r in rows(3)]
    for p, s in zip(par, ser):
        assert (s["ids"], s["loss"]) == (p["ids"], p["loss"]) and s["pos"] == list(range(len(s["ids"])))
        assert set(s["branch"]) == {0} and set(p["branch"]) == {0, 1, 2}
    r = sft.pack(ser, 10_000)[0]
    with torch.no_grad():
        lp = model(r["ids"], r["pos"], r["layout"], targets=r["targets"])
        start = 0
        for d in sorted(ser, key=lambda e: -len(e["ids"])):
            alone = sft.to_row([d])
            causal = model(alone["ids"], targets=alone["targets"])      # no positions, no layout: SDPA's causal
            assert (lp[:, start:start + len(d["ids"])] - causal).abs().max() <= 5e-5
            parallel = model(*(lambda x: (x["ids"], x["pos"], x["layout"]))(sft.to_row([par[ser.index(d)]])),
                             targets=alone["targets"])
            assert (parallel - causal).abs().max() > 1e-3               # the branch mask and positions do matter
            start += len(d["ids"])


def run_sft(setup, out, **kw):
    cfg = sft.Config(model=str(setup / "base"), data=str(setup / "train.jsonl"), out_dir=str(out), epochs=6,
                     batch_size=4, row_tokens=1024, lr=3e-3, instruction_file=str(setup / "ins.txt"), **kw)
    return sft.main(cfg), [json.loads(x) for x in open(out / "metrics.jsonl")]


def test_loss_falls_and_checkpoint_reloads(setup, tmp_path):
    model, log = run_sft(setup, tmp_path / "o")
    assert len(log) == 12 and log[-1]["loss"] < 0.5 * log[0]["loss"], [r["loss"] for r in log]
    back = Qwen.from_pretrained(str(tmp_path / "o"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "o"))
    assert all(len(tok.encode(t)) == 1 for t in npr.TAGS)
    ids = torch.tensor([tok.encode(solution(3, 3, 4, 5))])
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))


def test_resume_continues_from_the_last_checkpoint(setup, tmp_path):
    _, full = run_sft(setup, tmp_path / "a")
    out = tmp_path / "b"
    orig = sft.lr_at
    calls = {"n": 0}

    def dying_lr(step, total, cfg):           # kill the run at step 7 (after the save at step 6)
        calls["n"] += 1
        if step == 7:
            raise KeyboardInterrupt
        return orig(step, total, cfg)
    sft.lr_at = dying_lr
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sft(setup, out, save_every=3)
    finally:
        sft.lr_at = orig
    assert os.path.isfile(out / "last" / "train_state.pt")
    _, log = run_sft(setup, out, save_every=3)
    assert [r["step"] for r in log] == list(range(1, 13))   # the killed step 7 is not logged twice
    resumed = [r for r in log if r["step"] > 6]
    for a, b in zip(resumed, full[6:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"]))
    assert not os.path.exists(out / "last")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one(setup, tmp_path, fsdp):
    _, one = run_sft(setup, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           os.path.join(ROOT, "sft.py"), "--model", str(setup / "base"), "--data", str(setup / "train.jsonl"),
           "--out-dir", str(tmp_path / "two"), "--epochs", "6", "--batch-size", "4", "--row-tokens", "1024",
           "--lr", "3e-3", "--instruction-file", str(setup / "ins.txt"), "--threads", "1"] + (["--fsdp"] if fsdp else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                                "PYTHONFAULTHANDLER": "1"})
    # faulthandler: a rank that aborts shows its Python stacks (the abort at exit that gc.collect() in the
    # script's __main__ removed showed none: it was in the interpreter's teardown; BENCHMARKS.md section 7)
    assert p.returncode == 0, p.stderr[-8000:]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(two) == len(one)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * max(1.0, abs(a["loss"])), (a, b)


def test_trajectories_take_the_engines_forced_bytes(tmp_path):
    """A sampled parallel answer, re-read from its text (and from variants without the newlines the
    engine forces) by encode_example, gives the sampler's own ids, positions and branches: SFT
    teaches what the engine will produce. A step numbered unlike its plan is rejected."""
    from sampler import Sampler, SamplingParams
    from helpers import Script, block_script, chat, step_script
    model, tok = make_checkpoint(tmp_path, tags_special=True)
    steer = Script({0: block_script(tok, ["1", "2"])},
                   {(0, 1, 1): step_script(tok, 1, "2*3=6"), (0, 1, 2): step_script(tok, 2, "4*5=20")})
    s = Sampler(model, tok).generate([chat(tok)], params=SamplingParams(), steer=steer)[0][0]
    assert s.finish_reason == "eos" and s.stats["branches_per_fork"] == [2]
    bare = (s.text.replace("</guideline>\n", "</guideline>").replace("</step>\n", "</step>")
            .replace("<step>\n", "<step>").replace("<takeaway>\n", "<takeaway>"))
    assert "</guideline><step>1:" in bare
    for text in (s.text, bare, bare.replace("<step>2:", "<step>\n 2 :")):
        ex, why = sft.encode_example(tok, dict(prompt="Compute 2*3 + 4*5.", trajectory=text), "", 5)
        assert why is None, why
        P = ex["loss"].index(1)
        assert ex["ids"][P:] == s.ids and ex["pos"][P:] == [p - len(s.prompt_ids) + P for p in s.pos]
        assert ex["branch"][P:] == s.branch and ex["block"][P:] == s.block
    ex, why = sft.encode_example(tok, dict(prompt="x", trajectory=s.text.replace("<step>\n2:", "<step>\n3:")), "", 5)
    assert ex is None and "step 2 does not open with its plan's number 2:" in why


def test_a_sequence_longer_than_a_row_is_dropped_and_counted(setup, tmp_path, capsys):
    tok = Tokenizer.from_pretrained(str(setup / "base"))
    tok.add_tokens(npr.TAGS)                     # as sft.main does before encoding
    lens = sorted(len(sft.encode_example(tok, r, "Solve.", 5)[0]["ids"]) for r in rows(8))
    cut = lens[-1] - 1                                   # the longest ones do not fit in a row
    assert lens[0] <= cut
    sft.main(sft.Config(model=str(setup / "base"), data=str(setup / "train.jsonl"), out_dir=str(tmp_path),
                        epochs=0.25, batch_size=4, row_tokens=cut, instruction_file=str(setup / "ins.txt")))
    n = sum(x > cut for x in lens)
    assert f"trajectories {8 - n} | dropped {n} {{'longer than --row-tokens {cut}': {n}}}" in capsys.readouterr().out


@pytest.mark.parametrize("field,value", [("trajectory", None), ("trajectory", 5), ("trajectory", ["x"]), ("prompt", 5)])
def test_a_row_with_a_field_of_the_wrong_type_is_refused_with_its_line(setup, tmp_path, field, value):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(2)[:1] + [{**rows(2)[1], field: value}]))
    with pytest.raises(ValueError, match=f"d.jsonl:2: '{field}' must be a string"):
        sft.main(sft.Config(model=str(setup / "base"), data=str(data), out_dir=str(tmp_path / "o"), epochs=1,
                            batch_size=2, row_tokens=1024))
