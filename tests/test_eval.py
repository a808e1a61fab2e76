"""eval.py: the metrics on hand-made samples with known answers."""
import pytest

from eval import table
from npr import sample_metrics
from sampler import Sample

GOOD = ("<guideline>\n<plan>1: 2*3</plan>\n<plan>2: 4*5</plan>\n</guideline>\n<step>\n1: 2*3=6\n</step>\n"
        "<step>\n2: 4*5=20\n</step>\n<takeaway>\n6+20=26.\n</takeaway>\n\\boxed{26}")


def sample(text, finish, total, crit, forks, t, mode="parallel"):
    return Sample(prompt_ids=[1], finish_reason=finish, text=text,
                  stats=dict(mode=mode, total_tokens=total, critical_path_tokens=crit, forks=len(forks),
                             branches_per_fork=forks, time_s=t))


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


def test_main_both_modes_and_pipeline_report(tmp_path):
    import json
    import eval as ev
    from helpers import make_checkpoint
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
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "eval.json").write_text(json.dumps(rep))
    (tmp_path / "times.txt").write_text("base 10\ngrpo 20\n")
    text = ev.main(ev.Config(report=str(tmp_path)))
    assert "| grpo |" in text and "| base |" in text and (tmp_path / "report.md").exists()
    assert "grpo parallel vs base serial" in text and "1 request" in text


def test_repetition_penalty_reaches_the_parallel_sampler(tmp_path, monkeypatch):
    import json
    import eval as ev
    from helpers import make_checkpoint
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
    import eval as ev
    from helpers import make_checkpoint
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
