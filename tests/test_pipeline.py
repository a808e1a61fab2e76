"""A very small end-to-end run of the built-in default through the stage scripts' own main():
toy base model -> distill -> sft -> eval (speedrun.sh runs the same entry points at full size)."""
import json

import distill
import eval as ev
import sft
import toy


def test_base_distill_sft_eval(tmp_path):
    base, data = tmp_path / "base", tmp_path / "data"
    # the easiest slice of the task (2 terms, 1-digit factors) so a short run already gets some right
    toy.main(toy.Config(out_dir=str(base), data_dir=str(data), n_train=400, n_test=40, min_terms=2, max_terms=2,
                        min_adigits=1, max_adigits=1,
                        max_steps=STEPS, eval_n=20, eval_batch=20))
    assert (base / "npr_instruction.txt").exists()
    out = tmp_path / "distill" / "train.jsonl"
    distill.main(distill.Config(model=str(base), data=str(data / "train.jsonl"), out=str(out), n_problems=60,
                                max_tries=8, tries_per_round=4, max_new_tokens=120))
    summary = json.load(open(tmp_path / "distill" / "train.summary.json"))
    assert summary["problems"] == 60 and summary["accepted"] >= 1, summary
    model = sft.main(sft.Config(model=str(base), data=str(out), out_dir=str(tmp_path / "sft"), epochs=2,
                                batch_size=8, lr=1e-3))
    assert model is not None and (tmp_path / "sft" / "npr_instruction.txt").exists()
    rep = ev.main(ev.Config(model=str(tmp_path / "sft"), data=str(data / "test.jsonl"), n_problems=10, k=2,
                            max_new_tokens=120, mode="both"))
    assert rep["parallel"]["samples"] == 20 and rep["parallel"]["trigger_rate"] > 0.5, rep["parallel"]


STEPS = 500


def test_speedrun_distils_from_the_stage1_model(tmp_path):
    """With STAGE1=1 the distillation samples from the stage-1 model (the paper), the SFT still starts
    from the base model (NPR.md stage 2b); without it both use the base model. DRY_RUN prints the commands."""
    import os
    import subprocess
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
