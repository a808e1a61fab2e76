"""runs.py, what every script's run shares: a log rewrite survives a fault at any moment, problem files
in every layout and input errors that name the file and line and show as one line, the lock on an output,
a prompt too long for the model's context refused by every stage. (Checkpoints: test_checkpoint.py.)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_runs.py -x -q
"""
import json
import os
import re
import time

import pytest

import npr
import runs
from helpers import full_disk_open


@pytest.mark.parametrize("fault", ["disk full mid-write", "replace"])
def test_truncate_after_survives_a_fault(tmp_path, monkeypatch, fault):
    log = runs.JsonlLog(str(tmp_path / "metrics.jsonl"))
    for s in (1, 2, 3):
        log.write(step=s, loss=0.5)
    before = open(log.path).read()

    def boom(*a):
        raise OSError("Input/output error")
    if fault == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(runs, "open", full_disk_open(), raising=False)
    with pytest.raises(OSError):
        log.truncate_after(1)
    monkeypatch.undo()
    assert open(log.path).read() == before and os.listdir(tmp_path) == ["metrics.jsonl"]
    log.truncate_after(1)
    assert [json.loads(x)["step"] for x in open(log.path)] == [1]


def test_an_input_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "distill.py"), "--model", str(tmp_path / "nonexistent"),
           "--data", str(data), "--out", str(tmp_path / "d.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPR_DEBUG", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        f"error: checkpoint folder not found: {tmp_path / 'nonexistent'} (--debug or NPR_DEBUG=1 for the traceback)"]
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr


BAD_FIELDS = [  # (row, the words of the error): each was read without complaint or failed with a traceback
    ({"question": "1+1?", "answer": None}, "'answer' must be a non-empty string or a number, got null"),
    ({"question": "1+1?", "answer": [2, 3]}, "'answer' must be a non-empty string or a number, got [2, 3]"),
    ({"question": "1+1?", "answer": {"value": 2}}, "'answer' must be"),
    ({"question": "1+1?", "answer": ""}, "'answer' must be a non-empty string"),
    ({"question": "1+1?", "answer": " "}, "'answer' must be a non-empty string"),
    ({"question": "1+1?", "answer": True}, "'answer' must be a non-empty string or a number, got true"),
    ({"question": "1+1?", "answer": float("nan")}, "'answer' must be a non-empty string or a number, got NaN"),
    ({"question": 7, "answer": "2"}, "'question' must be a non-empty string, got 7"),
    ({"question": None, "answer": "2"}, "'question' must be a non-empty string, got null"),
    ({"question": ["1+1?"], "answer": "2"}, "'question' must be a non-empty string"),
    ({"question": "", "answer": "2"}, "'question' must be a non-empty string"),
    ([{"from": "human", "value": None}, {"from": "assistant", "ground_truth": {"value": 2}}],
     "'value' of the human turn must be a non-empty string, got null"),
    ([{"from": "human", "value": "1+1?"}, {"from": "assistant", "ground_truth": {"value": None}}],
     "'ground_truth.value' must be a non-empty string or a number, got null"),
]


@pytest.mark.parametrize("row,words", BAD_FIELDS, ids=[f"{i}" for i in range(len(BAD_FIELDS))])
def test_problem_fields_of_the_wrong_type_are_refused_with_their_line(tmp_path, row, words):
    """str(None) once made the answer "None", which grades \\boxed{None} as correct."""
    good = {"question": "2+2?", "answer": 4}
    for name, text in (("p.jsonl", json.dumps(good) + "\n\n" + json.dumps(row) + "\n"),
                       ("p.json", json.dumps([good, row]))):
        path = tmp_path / name
        path.write_text(text)
        where = f"{path}:3" if name == "p.jsonl" else f"{path}: item 2"
        with pytest.raises(ValueError, match=re.escape(f"{where}: {words}")):
            runs.read_problems(str(path))


def test_problems_keep_numbers_as_answers_and_remember_where_they_are(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2+2?", "answer": 4}\n\n{"question": "1/2?", "answer": 0.5, "id": 9}\n')
    probs = runs.read_problems(str(path))
    assert probs == [{"question": "2+2?", "answer": "4"}, {"question": "1/2?", "answer": "0.5", "id": 9}]
    assert [p.where for p in probs] == [f"{path}:1", f"{path}:3"]
    assert [p.where for p in probs[1:]] == [f"{path}:3"]                 # kept through a slice


@pytest.mark.parametrize("field,value,words", [
    ("trajectory", None, "'trajectory' must be a string, got null"),
    ("trajectory", 5, "'trajectory' must be a string, got 5"),
    ("trajectory", ["a"], "'trajectory' must be a string"),
    ("prompt", 5, "'prompt' must be a string (or null), got 5"),
    ("prompt", {"a": 1}, "'prompt' must be a string (or null)"),
])
def test_sft_rows_with_fields_of_the_wrong_type_are_refused_with_their_line(tmp_path, field, value, words):
    row = {"question": "2+2?", "answer": "4", "trajectory": "x", "prompt": None}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, field: value}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {words}")):
        runs.read_problems(str(path), needs=("trajectory",), may=("prompt",))
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "trajectory"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'trajectory' is missing")):
        runs.read_problems(str(path), needs=("trajectory",), may=("prompt",))


def test_read_problems_layouts_and_errors(tmp_path):
    orz = tmp_path / "orz.json"
    orz.write_text(json.dumps([[{"from": "human", "value": "1+1?"}, {"from": "assistant", "ground_truth": {"value": 2}}]]))
    assert runs.read_problems(str(orz)) == [{"question": "1+1?", "answer": "2"}]
    custom = tmp_path / "c.jsonl"
    custom.write_text(json.dumps({"problem": "x", "solution": "3"}) + "\n")
    assert runs.read_problems(str(custom), "problem", "solution")[0]["answer"] == "3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        runs.read_problems(str(bad))
    with pytest.raises(ValueError, match=r"c.jsonl:1: expected an object with 'question'"):
        runs.read_problems(str(custom))
    with pytest.raises(FileNotFoundError):
        runs.read_problems(str(tmp_path / "none.jsonl"))
    binary = tmp_path / "data.parquet"                            # e.g. a parquet file passed as --data
    binary.write_bytes(b'{"question": "a", "answer": "1"}\nPAR1\x15\x04\x15\xff\xfe\x00')
    with pytest.raises(ValueError, match=r"data.parquet:2: not UTF-8 text"):
        runs.read_problems(str(binary))


def test_a_second_run_on_an_output_in_use_is_refused_naming_the_holder(tmp_path):
    """Two runs on one --out-dir once truncated each other's metrics.jsonl and removed each other's
    saves. Another process holds the lock: each stage refuses before it touches anything, naming it;
    killed with -9, it leaves no lock behind."""
    import signal
    import socket
    import subprocess
    import sys
    import distill
    import sft
    import toy
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run, out = tmp_path / "run", tmp_path / "d" / "train.jsonl"
    code = "import sys, time, runs; [runs.lock_output(p) for p in sys.argv[1:]]; print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock"), f"{out}.lock"], cwd=root,
                              stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline() == b"held\n"
        os.makedirs(run / "last.2")
        (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        held_by = re.escape(f"in use by pid {holder.pid} on {socket.gethostname()}: -c {run / '.lock'} ")   # its argv
        for main in (lambda: sft.main(sft.Config(model=str(tmp_path / "none"), out_dir=str(run))),
                     lambda: toy.main(toy.Config(out_dir=str(run), data_dir=str(tmp_path / "data"))),
                     lambda: distill.main(distill.Config(model=str(tmp_path / "none"), out=str(out)))):
            with pytest.raises(OSError, match=held_by):
                main()
        assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
        assert sorted(os.listdir(run)) == [".lock", "last.2", "metrics.jsonl"] and not (tmp_path / "data").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    runs.lock_output(str(run / ".lock"))                # the kernel dropped the dead holder's lock
    runs.lock_output(str(run / ".lock"))                # and this process may take it again (a second main())


def test_a_prompt_that_cannot_fit_the_context_is_refused_by_every_stage_naming_its_line(tmp_path):
    """distill, eval and grpo once decoded past max_position_embeddings (untrained positions: garbage)
    with rc 0 and no word. The problems are checked when read: one whose prompt + --max-new-tokens does
    not fit is refused, naming its line (not skipped: eval's denominator and distill's indices stay)."""
    import distill
    import eval as ev
    import grpo
    from helpers import make_checkpoint
    ck = tmp_path / "ck"
    _, tok = make_checkpoint(ck)
    short, budget = "Compute 2*3 + 4*5.", 8
    P = len(npr.chat_prompt(tok, short, "Solve."))
    ctx = P + budget + 4                                        # the short problem fits, the long one does not
    json.dump({**json.load(open(ck / "config.json")), "max_position_embeddings": ctx}, open(ck / "config.json", "w"))
    long_ = short * 3
    L = len(npr.chat_prompt(tok, long_, "Solve."))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "26"}) + "\n" for q in (short, short, long_, long_)))
    words = re.escape(f"{data}:3: the prompt has {L} tokens; with --max-new-tokens {budget} that is {L + budget} "
                      f"positions, more than the model's context {ctx} (max_position_embeddings); so do 1 more "
                      f"({data}:4)")
    (tmp_path / "ins.txt").write_text("Solve.\n")
    common = dict(model=str(ck), data=str(data), max_new_tokens=budget, instruction_file=str(tmp_path / "ins.txt"))
    stages = {"distill": lambda: distill.main(distill.Config(out=str(tmp_path / "d.jsonl"), max_tries=1, **common)),
              "eval": lambda: ev.main(ev.Config(k=1, latency_n=0, out=str(tmp_path / "e.json"), **common)),
              "grpo": lambda: grpo.main(grpo.Config(out_dir=str(tmp_path / "g"), eval_data=str(data), steps=1,
                                                    prompts_per_step=2, group_size=2, **common))}
    for name, run in stages.items():
        with pytest.raises(ValueError, match=words):
            run()
    # a question of megabytes (once: 45 s and 8 GB of decoding) is refused in a moment, not tokenized whole
    data.write_text("".join(json.dumps({"question": q, "answer": "26"}) + "\n" for q in (short, short * 200_000)))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"{data}:2: the prompt has at least ")):
        stages["eval"]()
    assert time.perf_counter() - t0 < 10
    data.write_text("".join(json.dumps({"question": q, "answer": "26"}) + "\n" for q in (short, short)))
    ev.main(ev.Config(k=1, latency_n=0, mode="serial", out=str(tmp_path / "e.json"), **common))   # those that fit run


def test_a_value_outside_its_choices_is_refused_naming_its_flag():
    """grpo's recipe flags and sft's --layout: one error naming the flag, its choices and the value."""
    import grpo
    import sft
    runs.check_choices(grpo.Config(), grpo.CHOICES)                      # the defaults are among them
    with pytest.raises(ValueError, match=r"--adv-std must be one of batch, group, not 'groups'"):
        grpo.main(grpo.Config(adv_std="groups"))
    with pytest.raises(ValueError, match=r"--layout must be one of parallel, serial, not 'causal'"):
        sft.main(sft.Config(layout="causal"))
