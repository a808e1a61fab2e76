"""
Optional reading: one markdown table over the stages of a speedrun.sh run.

    python extras/report.py out          # reads out/<stage>/eval.json and out/times.txt, writes out/report.md

Per stage (base, zero, sft, grpo): accuracy in each mode with the evaluation's standard error (over
problems; one run, one seed: the seed-to-seed spread is table.py's), format validity, trigger rate, branches
per fork, tokens/s, time-to-answer (one request and in the batch), total/critical tokens, stage
wall time; then NPR's comparison: the last stage decoding in parallel against the base serially.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
from table import compare   # noqa: E402  (the one rule for "on par")


def pipeline_report(root, stages=("base", "zero", "sft", "grpo")):
    """One markdown table over the stages of a speedrun.sh run (eval.json of each + times.txt)."""
    times = {}
    if os.path.isfile(os.path.join(root, "times.txt")):
        for line in open(os.path.join(root, "times.txt")):
            name, sec = line.split()
            times[name] = float(sec)
    head = ("| stage | acc serial (± SE) | acc parallel (± SE) | format valid (par) | trigger rate (par) | branches/fork | "
            "tok/s serial | tok/s parallel | time-to-answer s, 1 request (ser / par) | time-to-answer s, in batch "
            "(ser / par) | total/critical (par) | stage wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for st in stages:
        f = os.path.join(root, st, "eval.json")
        if not os.path.isfile(f):
            continue
        r = json.load(open(f))
        s, p = r.get("serial", {}), r.get("parallel", {})
        g = lambda d, k, fmt="{:.3f}": fmt.format(d[k]) if k in d else "-"
        acc = lambda d: g(d, "accuracy") + (f" ± {d['accuracy_se']:.3f}" if "accuracy_se" in d else "")
        wall = times.get(st, times.get({"base": "base", "zero": "stage1"}.get(st, st)))
        lines.append(f"| {st} | {acc(s)} | {acc(p)} | {g(p, 'format_valid')} | "
                     f"{g(p, 'trigger_rate')} | {g(p, 'branches_per_fork', '{:.2f}')} | {g(s, 'tokens_per_s', '{:.0f}')} | "
                     f"{g(p, 'tokens_per_s', '{:.0f}')} | {g(s, 'time_to_answer_1_s', '{:.2f}')} / "
                     f"{g(p, 'time_to_answer_1_s', '{:.2f}')} | {g(s, 'time_to_answer_s', '{:.2f}')} / "
                     f"{g(p, 'time_to_answer_s', '{:.2f}')} | {g(p, 'total_over_critical', '{:.2f}')} | "
                     f"{'-' if wall is None else f'{wall:.0f}'} |")
    # NPR's comparison: the final model decoding in parallel against the sequential model (base) serially
    done = [st for st in stages if os.path.isfile(os.path.join(root, st, "eval.json"))]
    if len(done) >= 2 and "base" in done:
        b = json.load(open(os.path.join(root, "base", "eval.json"))).get("serial", {})
        f = json.load(open(os.path.join(root, done[-1], "eval.json"))).get("parallel", {})
        if b and f:
            ratio = lambda k: f"{f[k]:.3g} vs {b[k]:.3g} ({f[k] / max(b[k], 1e-9):.2f}x)" if k in f and k in b else "-"
            lines += ["", f"{done[-1]} parallel vs base serial: accuracy {ratio('accuracy')}; "
                      f"time-to-answer, 1 request, s {ratio('time_to_answer_1_s')}; in batch {ratio('time_to_answer_s')}; "
                      f"tokens/s {ratio('tokens_per_s')}"]
            if "accuracy_se" in f and "accuracy_se" in b:   # a difference only beyond 2 pooled standard errors
                c = compare(*(dict(accuracy=x["accuracy"], se=x["accuracy_se"]) for x in (f, b)))
                lines += [f"accuracy difference {c['diff']:+.3f}, 2 pooled SE {2 * c['pooled_se']:.3f}: {done[-1]} "
                          f"{c['verdict']} (one seed: the seeds' spread is table.py's)"]
    total = sum(times.values())
    text = "\n".join(lines) + f"\n\nwhole run: {total:.0f} s of stages ({', '.join(f'{k} {v:.0f}' for k, v in times.items())})\n"
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    pipeline_report(sys.argv[1] if len(sys.argv) > 1 else "out")
