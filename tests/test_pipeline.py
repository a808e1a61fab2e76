"""The built-in default end to end at a very small size, through each stage script's own main():
toy base model -> distill -> sft -> eval (speedrun.sh runs the same entry points at full size).
Invariant: every stage hands the next a usable output. The base model answers in the format and
solves some problems; distillation keeps a fair share of the problems and only correct,
format-perfect trajectories; the SFT model forks in parallel mode and keeps the format. The run is
seeded (one thread: the same numbers on every run on a machine); the thresholds sit at about half of
what it gives (base 0.35 correct and 1.0 format-valid on 20 problems, 28 of 60 accepted, SFT
parallel trigger 1.0 and 0.85 format-valid on 20 samples), since another CPU rounds differently.
Run: .venv/bin/python -m pytest tests/test_pipeline.py -q   (marked slow: `-m "not slow"` skips it)"""
import json
import os
import subprocess

import pytest

import distill
import eval as ev
import npr
import sft
import toy

BASE_STEPS = 500   # base training on the easiest slice of the task (2 terms, 1-digit factors)


@pytest.mark.slow
def test_base_distill_sft_eval(tmp_path):
    base, data = tmp_path / "base", tmp_path / "data"
    out = toy.main(toy.Config(out_dir=str(base), data_dir=str(data), n_train=400, n_test=40, min_terms=2,
                              max_terms=2, min_adigits=1, max_adigits=1, max_steps=BASE_STEPS, eval_n=20,
                              eval_batch=20, threads=1))
    serial = out["eval"][0]
    assert serial["mode"] == "serial" and serial["acc"] >= 0.15 and serial["format_ok"] >= 0.8, serial

    trajectories = tmp_path / "distill" / "train.jsonl"
    distill.main(distill.Config(model=str(base), data=str(data / "train.jsonl"), out=str(trajectories),
                                n_problems=60, max_tries=8, tries_per_round=4, max_new_tokens=120))
    summary = json.load(open(tmp_path / "distill" / "train.summary.json"))
    assert summary["problems"] == 60 and summary["acceptance"] >= 0.2, summary
    rows = [json.loads(line) for line in open(trajectories)]
    assert len(rows) == summary["accepted"]
    for r in rows:   # what SFT learns from: correct and format-perfect, nothing else
        assert npr.format_score(r["trajectory"])[0] == 0.0 and npr.grade(r["trajectory"], r["answer"]), r

    model = sft.main(sft.Config(model=str(base), data=str(trajectories), out_dir=str(tmp_path / "sft"), epochs=2,
                                batch_size=8, lr=1e-3))
    assert model is not None and (tmp_path / "sft" / "npr_instruction.txt").exists()
    rep = ev.main(ev.Config(model=str(tmp_path / "sft"), data=str(data / "test.jsonl"), n_problems=10, k=2,
                            max_new_tokens=120, mode="parallel", latency_n=0))
    par = rep["parallel"]
    assert par["samples"] == 20 and par["trigger_rate"] >= 0.8 and par["format_valid"] >= 0.5, par


def test_speedrun_distils_from_the_stage1_model(tmp_path):
    """With STAGE1=1 the distillation samples from the stage-1 model (the paper), the SFT still starts
    from the base model (NPR.md section 4, stage 2b); without it both use the base model. DRY_RUN prints the commands."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run(["bash", "-n", "speedrun.sh"], cwd=root).returncode == 0
    for stage1, src in [("1", "zero"), ("0", "base")]:
        out = tmp_path / stage1
        p = subprocess.run(["bash", "speedrun.sh"], cwd=root, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DRY_RUN": "1", "STAGE1": stage1, "OUT": str(out)})
        assert p.returncode == 0, p.stderr
        cmds = [line.split() for line in p.stdout.splitlines() if not line.startswith("=")]
        model_of = {c[1]: c[c.index("--model") + 1] for c in cmds if "--model" in c and c[1] != "grpo.py"}
        assert model_of["distill.py"] == str(out / src) and model_of["sft.py"] == str(out / "base"), model_of
        assert (["grpo.py", "--mode", "serial"] == cmds[1][1:4]) == (stage1 == "1")
