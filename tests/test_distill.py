"""distill.py, self-distillation (stage 2a): a problem keeps its FIRST sample that is both correct and
format-perfect (and, with --reject-sibling-results, whose steps use no sibling's result); a killed
run resumes without losing or redoing a finished problem; a torn line is cut before appending.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_distill.py -x -q
"""
import json
import os

import pytest

import distill
import npr
import runs
from helpers import GOOD, WRONG, FakeSampler, FakeTok, sample

BAD_FORMAT = "2*3=6. 4*5=20. 6+20=26. \\boxed{26}"          # correct, but no blocks


def test_judge():
    assert distill.judge(sample(GOOD), "26") is None
    assert distill.judge(sample(WRONG), "26") == "wrong answer"
    assert distill.judge(sample(BAD_FORMAT), "26").startswith("format")
    assert distill.judge(sample(GOOD, finish="budget"), "26").startswith("unfinished")
    good, reads = two_steps()
    assert distill.judge(sample(reads), "32", "Compute 3*4 + 4*5.") is None  # the paper's rule: kept
    assert distill.judge(sample(reads), "32", "Compute 3*4 + 4*5.", siblings=True) == "a step uses an earlier step's result"
    assert distill.judge(sample(good), "32", "Compute 3*4 + 4*5.", siblings=True) is None


def two_steps():
    """A well-formed sample for 3*4 + 4*5, and the same with step 2 reusing step 1's result (12)."""
    good = GOOD.replace("2*3", "3*4").replace("=6\n", "=12\n").replace("6+20=26", "12+20=32").replace("{26}", "{32}")
    return good, good.replace("2: 4*5=20\n", "2: 4*5=20. 12+20=32\n")


def test_sibling_numbers():
    """A step that writes an earlier step's result (the last number it wrote) is flagged, unless the
    number is also in the question or before the block's steps; the "N:" header never counts."""
    steps = lambda *bodies: "".join(f"<step>\n{b}\n</step>\n" for b in bodies)
    head = "<guideline>\n<plan>1: 23*4</plan>\n<plan>2: 17*6</plan>\n<plan>3: 2*1</plan>\n</guideline>\n"
    tail = "<takeaway>\n92+102=194.\n</takeaway>\n\\boxed{194}"
    q = "Compute 23*4 + 17*6 + 2*1."
    assert distill.sibling_numbers(head + steps("1: 23*4=92", "2: 17*6=102", "3: 2*1=2") + tail, q) == []
    reads = head + steps("1: 23*4=92", "2: 17*6=102. 92+102=194", "3: 2*1=2. 194+2=196") + tail
    assert distill.sibling_numbers(reads, q) == [(1, 2, "92"), (1, 3, "194")]
    assert distill.sibling_numbers(reads, q + " Hint: 92.") == [(1, 3, "194")]         # 92 is in the question
    assert distill.sibling_numbers(head + steps("1: 23*4=92", "2: 1*2=2") + tail, q) == []   # "2:" is a header
    # an earlier block's results are visible to the next block's steps; only siblings count
    two = reads.replace("\\boxed{194}", "") + "<guideline>\n<plan>1: x</plan>\n<plan>2: y</plan>\n</guideline>\n" + \
        steps("1: 92*2=184", "2: 184+1=185") + "<takeaway>\n185.\n</takeaway>\n\\boxed{185}"
    assert distill.sibling_numbers(two, q) == [(1, 2, "92"), (1, 3, "194"), (2, 2, "184")]
    assert distill.sibling_numbers("no blocks at all 92 92", q) == []
    one_digit = head + steps("1: 2*1=2", "2: 17*6=102. 2+102=104") + tail                # a 1-digit result: not evidence
    assert distill.sibling_numbers(one_digit, "Compute 17*6 + 2*1.") == []


def test_first_correct_and_well_formed_sample_is_kept():
    tok = FakeTok()
    scripts = {"A": [(WRONG,), (GOOD.replace("6+20=26.", "first kept."),), (GOOD,)],
               "B": [(WRONG,)], "C": [(BAD_FORMAT,), (GOOD,)]}
    fake = FakeSampler(scripts)
    items = [(i, {"question": q, "answer": "26"}) for i, q in enumerate("ABC")]
    cfg = distill.Config(max_tries=4, tries_per_round=1)
    acc, state = distill.distill_chunk(fake, tok, items, cfg, "I", seed=0)
    assert [r["index"] for r in acc] == [0, 2]
    assert "first kept." in acc[0]["trajectory"] and acc[0]["tries"] == 2 and acc[1]["tries"] == 2
    assert state[1] == dict(index=1, accepted=False, tries=4, reasons={"wrong answer": 4})
    assert state[2]["reasons"] == {"format: " + distill.judge(sample(BAD_FORMAT), "26").split(": ", 1)[1]: 1}


@pytest.mark.parametrize("reject", [False, True])
def test_reject_sibling_results_option(reject):
    """--reject-sibling-results: a sample whose step 2 reuses step 1's result is passed over."""
    tok = FakeTok()
    good, reads = two_steps()
    q = "Compute 3*4 + 4*5."
    fake = FakeSampler({q: [(reads,), (good,)]})
    cfg = distill.Config(max_tries=4, tries_per_round=1, reject_sibling_results=reject)
    acc, state = distill.distill_chunk(fake, tok, [(0, {"question": q, "answer": "32"})], cfg, "I", seed=0)
    assert acc[0]["trajectory"] == (good if reject else reads) and acc[0]["tries"] == (2 if reject else 1)
    assert state[0]["reasons"] == ({"a step uses an earlier step's result": 1} if reject else {})


def test_resume_after_a_kill_loses_nothing(tmp_path, monkeypatch):
    data = tmp_path / "p.jsonl"
    qs = [f"Q{i}" for i in range(6)]
    data.write_text("".join(json.dumps({"question": q, "answer": "26"}) + "\n" for q in qs))
    tok = FakeTok()
    scripts = {q: [(GOOD,)] if i % 2 == 0 else [(WRONG,)] for i, q in enumerate(qs)}
    monkeypatch.setattr(distill, "load_checkpoint", lambda *a, **k: (None, tok))
    monkeypatch.setattr(npr, "instruction_for", lambda *a: "I")
    monkeypatch.setattr(distill, "check_context", lambda *a: None)     # no model, no context to check
    fakes = []

    def make(model, t, fail_after=None):
        f = FakeSampler(scripts, fail_after)
        fakes.append(f)
        return f
    out = tmp_path / "out" / "d.jsonl"
    cfg = distill.Config(data=str(data), out=str(out), chunk=2, max_tries=2, tries_per_round=2, n_problems=0)
    monkeypatch.setattr(distill, "Sampler", lambda m, t: make(m, t, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        distill.main(cfg)                                  # first chunk written, then killed
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0]
    monkeypatch.setattr(distill, "Sampler", lambda m, t: make(m, t))
    distill.main(cfg)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 2, 4]
    assert fakes[-1].calls == 2                            # only the two remaining chunks were sampled
    summary = json.load(open(tmp_path / "out" / "d.summary.json"))
    assert summary["problems"] == 6 and summary["accepted"] == 3 and summary["rejected_tries"] == {"wrong answer": 6}


def test_device_flag_picks_the_device(tmp_path, monkeypatch):
    """--device is where the model goes ("" = the one init_distributed picks)."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "Q", "answer": "1"}) + "\n")
    seen = []

    def load(path, dev, *a):
        seen.append(str(dev))
        raise KeyboardInterrupt                                   # stop before any decoding
    monkeypatch.setattr(distill, "load_checkpoint", load)
    for device in ("cuda:1", ""):
        with pytest.raises(KeyboardInterrupt):
            distill.main(distill.Config(data=str(data), out=str(tmp_path / "d.jsonl"), device=device))
    assert seen == ["cuda:1", str(runs.init_distributed()[3])]


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"index": 0}\n{"index": 1, "traj')          # killed in the middle of a write
    runs.append_lines(str(p), ['{"index": 1}', '{"index": 2}'])
    assert [json.loads(x)["index"] for x in p.read_text().splitlines()] == [0, 1, 2]
    assert [r["index"] for r in runs.read_jsonl(str(p))] == [0, 1, 2]


def test_the_end_of_run_rewrite_never_loses_the_trajectories(tmp_path, monkeypatch):
    from helpers import full_disk_open
    out = tmp_path / "d.jsonl"
    out.write_text('{"index": 0}\n{"index": 1}\n{"index": 0}\n')     # a chunk repeated after a kill
    before = out.read_text()
    done = {i: {"index": i, "accepted": True, "tries": 1, "reasons": {}} for i in (0, 1)}
    monkeypatch.setattr(runs, "open", full_disk_open(), raising=False)  # the disk fills mid-write
    monkeypatch.setattr(distill, "open", full_disk_open(), raising=False)
    with pytest.raises(OSError):
        distill.summarize(done, str(out), 1.0)
    monkeypatch.undo()
    assert out.read_text() == before and os.listdir(tmp_path) == ["d.jsonl"]
    assert distill.summarize(done, str(out), 1.0)["trajectories"] == 2
    assert out.read_text() == '{"index": 0}\n{"index": 1}\n'
