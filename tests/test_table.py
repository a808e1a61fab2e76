"""table.py, the paper's comparison with error bars: the verdict rule (2 pooled standard errors), the
job graph, and a tiny table run end to end through the real stage scripts, killed in the middle and
rerun: no finished job runs again and the table is written.

    .venv/bin/python -m pytest tests/test_table.py -q      (~1-2 min)
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_difference_is_called_only_beyond_two_pooled_standard_errors():
    a, b = dict(accuracy=0.70, se=0.01), dict(accuracy=0.66, se=0.01)
    c = table.compare(a, b)
    assert c["diff"] == pytest.approx(0.04) and c["pooled_se"] == pytest.approx(0.02 ** 0.5 * 0.1)
    assert c["verdict"] == "higher" and table.compare(b, a)["verdict"] == "lower"
    assert table.compare(dict(accuracy=0.70, se=0.02), b)["verdict"] == "on par"     # 0.04 < 2 x 0.0224


def test_the_job_graph():
    cfg = table.Config(out_dir="o", seeds="0,1")
    jobs, models = table.jobs_of(cfg)
    by = {j.name: j for j in jobs}
    assert by["base"].alone and by["distill"].alone and by["distill"].deps == ("base",)
    assert by["sr_1"].deps == ("sr_beta_1",) and by["npr_0"].deps == ("npr_beta_0",)
    assert "--layout" in by["sr_beta_0"].cmd and by["sr_beta_0"].cmd[by["sr_beta_0"].cmd.index("--layout") + 1] == "serial"
    assert by["npr_beta_0"].cmd[by["npr_beta_0"].cmd.index("--layout") + 1] == "parallel"
    assert by["sr_0"].cmd[by["sr_0"].cmd.index("--mode") + 1] == "serial"
    assert by["npr_0"].cmd[by["npr_0"].cmd.index("--mode") + 1] == "parallel"
    # the same RL flags for SR and NPR: only the mode and the starting model differ
    strip = lambda c: [x for x in c if x not in ("serial", "parallel") and "_beta_" not in x and "/sr_" not in x
                       and "/npr_" not in x]
    assert strip(by["sr_0"].cmd) == strip(by["npr_0"].cmd)
    speed = [j for j in jobs if j.name.startswith("speed_")]
    assert len(speed) == 1 + 4 * 2 and all(j.alone for j in speed)
    assert set(speed[0].deps) == {j.name for j in jobs if not j.name.startswith("speed_")}
    # the ablation "SFT without the branch mask, decoded in parallel": SR-Beta's models, evaluated in parallel
    jobs, models = table.jobs_of(table.Config(out_dir="o", base_dir="b", seeds="0", arms="nomask"))
    assert [j.name for j in jobs] == ["eval_nomask_0", "speed_base", "speed_nomask_0"]
    ev = jobs[0].cmd
    assert ev[ev.index("--model") + 1] == "b/sr_beta_0" and ev[ev.index("--mode") + 1] == "parallel"
    with pytest.raises(ValueError, match="unknown arm"):
        table.jobs_of(table.Config(arms="npr,nope"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model (toy.py, a few steps) with its data, and a distilled file of right answers."""
    import toy
    d = tmp_path_factory.mktemp("tbase")
    toy.main(toy.Config(out_dir=str(d / "base"), data_dir=str(d / "data"), n_train=60, n_test=20, max_steps=2,
                        eval_n=0, threads=1))
    rng = random.Random(0)
    rows = []
    for i in range(24):
        p = toy.make_problem(rng, **toy.task_kwargs(toy.Config()))
        rows.append(dict(index=i, question=p["question"], answer=p["answer"],
                         trajectory=toy.tagged_solution(p["terms"])))
    (d / "distill").mkdir()
    (d / "distill" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def tiny(out, base):
    return ["--out-dir", str(out), "--base-dir", str(base), "--seeds", "0", "--eval-n", "4", "--eval-k", "1",
            "--speed-n", "2", "--latency-n", "1", "--sft-args=--epochs 0.5 --batch-size 8",
            "--grpo-args=--steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 60 --save-every 1",
            "--eval-args=--max-new-tokens 60"]


@pytest.mark.slow
def test_killed_in_the_middle_a_rerun_runs_no_finished_job_again(base_dir, tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, os.path.join(ROOT, "table.py")] + tiny(out, base_dir)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    done = out / "done"
    t0 = time.time()
    while not (done.is_dir() and len(os.listdir(done)) >= 3) and time.time() - t0 < 240:
        assert p.poll() is None, "table.py ended before it could be killed"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)                 # the driver and every job it runs, mid-arm
    p.wait()
    before = set(os.listdir(done))
    assert 3 <= len(before) < 13
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"13 jobs: {len(before)} done before, {13 - len(before)} to run" in r.stdout
    for name in before:                                # a finished job ran once: one command line in its log
        log = (out / "logs" / f"{name}.log").read_text()
        assert sum(line.startswith("$ ") for line in log.splitlines()) == 1, name
        assert f"start {name}" not in r.stdout
    res = json.loads((out / "table.json").read_text())
    assert set(res["arms"]) == {"SR-Beta", "NPR-Beta", "SR", "NPR"}       # (the base is evaluated where it was made)
    assert "The paper's speedup" in (out / "table.md").read_text()
