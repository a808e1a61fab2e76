"""eval.py, the metrics of NPR.md section 6: each metric on hand-made samples with known values;
the script in both modes (the budget bounds all tokens; the one-request pass answers like the
batch); the pipeline table of extras/report.py.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_eval.py -x -q
"""
import importlib.util
import json
import os

import pytest

import eval as ev
from eval import table
from metrics import sample_metrics
from helpers import GOOD, make_checkpoint, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_on_known_samples():
    samples = [
        (sample(GOOD, "eos", 100, 60, [2], 1.0), "26"),                          # right, valid, forked
        (sample(GOOD.replace("{26}", "{25}"), "eos", 120, 60, [3, 1], 2.0), "26"),  # wrong, forked (3), valid
        (sample(GOOD, "budget", 80, 80, [], 3.0, "serial"), "26"),                # serial text with 2 steps
        (sample("no idea", "malformed: guideline with 0 numbered plans", 20, 20, [], 2.0), "7"),
        (sample(GOOD, "budget", 80, 80, [], 2.0), "26"),    # parallel, steps written serially near the budget
    ]
    m = sample_metrics(samples, wall_s=4.0)
    assert m["accuracy"] == pytest.approx(3 / 5)                 # the budget ones still have the right box
    assert m["format_valid"] == pytest.approx(2 / 5)             # eos + score 0
    assert m["trigger_rate"] == pytest.approx(3 / 5)             # forked >= 2, or would fork (serial mode)
    assert m["branches_per_fork"] == pytest.approx((2 + 3 + 1) / 3)
    assert m["tokens_per_s"] == pytest.approx(400 / 4.0)
    assert m["time_to_answer_s"] == pytest.approx(10.0 / 5)
    assert m["total_over_critical"] == pytest.approx(400 / 300)
    assert m["finish"]["eos"] == 0.4
    assert "| serial |" in table({"serial": m})


def test_main_both_modes(tmp_path):
    make_checkpoint(tmp_path / "grpo", tags_special=True)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"Compute {i}*2.", "answer": str(2 * i)}) + "\n" for i in range(5)))
    rep = ev.main(ev.Config(model=str(tmp_path / "grpo"), data=str(data), k=2, max_new_tokens=24))
    assert set(rep) >= {"serial", "parallel", "speedup"} and rep["parallel"]["samples"] == 10
    assert json.load(open(tmp_path / "grpo" / "eval.json"))["k"] == 2
    for mode in ("serial", "parallel"):      # the budget each mode ran, and the default bounds ALL tokens
        assert (rep[mode]["budget"], rep[mode]["max_new_tokens"]) == ("total", 24)
        assert rep[mode]["mean_tokens"] <= 24
    for mode in ("serial", "parallel"):      # every problem also answered alone (batch 1) for the latency
        assert rep[mode]["latency_problems"] == 5 and rep[mode]["time_to_answer_1_s"] > 0
        assert rep[mode]["latency_tokens"] > 0
    assert "time_to_answer_1_s" in rep["speedup"]


def test_pipeline_report(tmp_path):
    """extras/report.py: one row per evaluated stage, its wall time, and the last stage in parallel
    against the base serially."""
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "extras", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    base = dict(serial=dict(accuracy=0.5, tokens_per_s=100.0, time_to_answer_1_s=2.0, time_to_answer_s=4.0))
    grpo = dict(parallel=dict(accuracy=0.75, format_valid=1.0, trigger_rate=1.0, tokens_per_s=300.0,
                              time_to_answer_1_s=1.0, time_to_answer_s=3.0))
    for stage, rep in (("base", base), ("grpo", grpo)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "eval.json").write_text(json.dumps(rep))
    (tmp_path / "times.txt").write_text("base 10\ngrpo 20\n")
    text = report.pipeline_report(str(tmp_path))
    assert text == (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "stage" not in line}
    assert set(rows) == {"base", "grpo"}
    assert "| 0.500 | - |" in rows["base"] and rows["base"].endswith("| 10 |")
    assert "| - | 0.750 | 1.000 | 1.000 |" in rows["grpo"] and rows["grpo"].endswith("| 20 |")
    assert "grpo parallel vs base serial: accuracy 0.75 vs 0.5 (1.50x); time-to-answer, 1 request, s 1 vs 2 (0.50x)" in text
    assert "whole run: 30 s of stages" in text
    assert "accuracy difference" not in text            # no standard errors: no verdict
    for se, verdict in ((0.05, "+0.250, 2 pooled SE 0.141: grpo higher"), (0.1, "+0.250, 2 pooled SE 0.283: grpo on par")):
        base["serial"]["accuracy_se"] = grpo["parallel"]["accuracy_se"] = se
        for stage, rep in (("base", base), ("grpo", grpo)):
            (tmp_path / stage / "eval.json").write_text(json.dumps(rep))
        assert f"accuracy difference {verdict}" in report.pipeline_report(str(tmp_path))


def test_repetition_penalty_reaches_the_parallel_sampler(tmp_path, monkeypatch):
    from sampler import Sampler
    make_checkpoint(tmp_path / "m", tags_special=True)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "Compute 2*3.", "answer": "6"}) + "\n")
    seen, real = {}, Sampler.generate_many
    monkeypatch.setattr(Sampler, "generate_many",
                        lambda self, prompts, n, params, *a, **kw: seen.update({params.mode: params}) or
                        real(self, prompts, n, params, *a, **kw))
    rep = ev.main(ev.Config(model=str(tmp_path / "m"), data=str(data), k=1, max_new_tokens=8, latency_n=0,
                            repetition_penalty=1.02))
    assert seen["parallel"].repetition_penalty == 1.02 and seen["serial"].repetition_penalty == 1.0
    assert rep["parallel"]["repetition_penalty"] == 1.02


def test_one_request_latency_answers_like_the_batch(tmp_path):
    """The batch-1 pass is seeded like each problem's first sample: the same answers as in the batch."""
    from model import Qwen
    from tokenizer import Tokenizer
    from sampler import Sampler, SamplingParams
    make_checkpoint(tmp_path / "m", tags_special=True)
    model, tok = Qwen.from_pretrained(str(tmp_path / "m")), Tokenizer.from_pretrained(str(tmp_path / "m"))
    sampler = Sampler(model, tok)
    prompts = [tok.encode(f"Compute {i}*2.") for i in range(3)]
    p = SamplingParams(mode="serial", temperature=1.0, max_new_tokens=12, seed=3)
    got, _ = sampler.generate_many(prompts, 2, p, batch_rows=6)
    seen = []
    real = sampler.generate
    sampler.generate = lambda xs, **kw: seen.append(real(xs, **kw)[0][0]) or [[seen[-1]]]
    m = ev.one_request_latency(sampler, prompts, p, k=2)
    assert m["latency_problems"] == 3 and m["time_to_answer_1_s"] > 0
    assert [s.ids for s in seen[1:]] == [g[0].ids for g in got]
