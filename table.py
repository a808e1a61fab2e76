"""
The paper's comparison (its Table 1) on the built-in world, with seeds and error bars: one base
model and one distilled file, then the four trained arms, each over several seeds,

    SR-Beta   sft.py --layout serial          sequential SFT, decoded serially
    NPR-Beta  sft.py                          parallel SFT (branch mask), decoded in parallel
    SR        grpo.py --mode serial           the same RL as NPR, from SR-Beta, decoded serially
    NPR       grpo.py                         PAPO, from NPR-Beta, decoded in parallel

and the table: per arm the accuracy (mean +- sd over seeds, and the standard error), format
validity, trigger rate, tokens/s, time-to-answer of one request and total / critical-path tokens;
the paper's three questions answered with 2 pooled standard errors as the line between "on par" and
a difference; the paper's speedup TPS(NPR) / TPS(SR).

    python table.py                                   # the whole table (38 min on a 2-core CPU); rerun = resume
    python table.py --seeds 0 --eval-n 200            # a quick look
    python table.py --out-dir out/abl_std --base-dir out/table --arms npr --grpo-args="--adv-std group"

Jobs that do not depend on each other run side by side (--lanes), one thread each; the base model and
the distillation run alone with every thread. Accuracy comes from evaluating the whole test split in
the lanes; speed (tokens/s, time-to-answer) is measured at the end, one model at a time, alone.
Every job logs to out_dir/logs/ and, once finished, leaves out_dir/done/<job>: a rerun skips those,
and a killed sft or grpo continues from its own resume point. An ablation reuses another run's base,
data and distilled file (--base-dir) and reruns only the arms it names. Writes out_dir/table.md,
table.json and, with matplotlib installed (`bash install.sh report`), table.png.
"""
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from runs import atomic_write, parse_cli, print_config

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = {  # name: (label, decoding, what it trains from; "=" + arm: that arm's model itself, only decoded otherwise)
    "sr_beta": ("SR-Beta", "serial", "base"), "npr_beta": ("NPR-Beta", "parallel", "base"),
    "sr": ("SR", "serial", "sr_beta"), "npr": ("NPR", "parallel", "npr_beta"),
    "nomask": ("SR-Beta in parallel", "parallel", "=sr_beta")}   # an ablation: SFT without the branch mask


@dataclass
class Config:
    out_dir: str = "out/table"
    base_dir: str = ""              # where base/, data/ and distill/ are ("" = out_dir: made here)
    seeds: str = "0,1,2"            # seeds of everything after the base (SFT order, RL, evaluation draws)
    arms: str = "sr_beta,npr_beta,sr,npr"
    lanes: int = 2                  # jobs side by side, one thread each
    eval_n: int = 1000              # test problems for accuracy (the whole test split)
    eval_k: int = 4                 # samples per problem (avg@k)
    speed_n: int = 100              # problems x eval_k decoded in one batch for tokens/s (alone)
    latency_n: int = 30             # problems answered one at a time for time-to-answer (alone)
    toy_args: str = ""              # extra flags of each stage (e.g. --grpo-args="--adv-std group")
    distill_args: str = ""
    sft_args: str = ""
    grpo_args: str = ""
    eval_args: str = ""


@dataclass
class Job:
    name: str
    cmd: list
    deps: tuple = ()
    alone: bool = False             # every thread, nothing beside it
    out: str = ""                   # what it makes (shown in the log)


# -----------------------------------------------------------------------------
# The jobs

def seeds_of(cfg):
    return [int(s) for s in cfg.seeds.split(",") if s.strip()]


def jobs_of(cfg):
    """The job graph: base and distill (unless --base-dir), the arms per seed, their evaluations,
    then the speed measurements."""
    py, D, B = [sys.executable], cfg.out_dir, cfg.base_dir or cfg.out_dir
    data, dist = os.path.join(B, "data"), os.path.join(B, "distill", "train.jsonl")
    script = lambda name, *args, extra="": py + [os.path.join(ROOT, name)] + list(args) + shlex.split(extra)
    jobs = []
    if not cfg.base_dir:
        jobs.append(Job("base", script("toy.py", "--out-dir", f"{B}/base", "--data-dir", data, "--eval-n", "0",
                                       extra=cfg.toy_args), alone=True, out=f"{B}/base"))
        jobs.append(Job("distill", script("distill.py", "--model", f"{B}/base", "--data", f"{data}/train.jsonl",
                                          "--out", dist, extra=cfg.distill_args), ("base",), alone=True, out=dist))
    base_deps = () if cfg.base_dir else ("distill",)
    test = ["--data", f"{data}/test.jsonl", "--n-problems", str(cfg.eval_n), "-k", str(cfg.eval_k)]
    models = []    # what the table reads: dict(name, path, label, mode, seed) per evaluated model
    if not cfg.base_dir:
        jobs.append(Job("eval_base", script("eval.py", "--model", f"{B}/base", "--mode", "serial", *test,
                                            "--latency-n", "0", "--out", f"{D}/eval/base.json", extra=cfg.eval_args),
                        base_deps, out=f"{D}/eval/base.json"))
    models.append(dict(name="base", path=f"{B}/base", label="base", mode="serial", seed=None,
                       eval=os.path.join(B, "eval", "base.json")))
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"--arms: unknown arm {a!r}: one of {', '.join(ARMS)}")
    for s in seeds_of(cfg):
        for a in arms:
            label, mode, src = ARMS[a]
            out, name = f"{D}/{a}_{s}", f"{a}_{s}"
            if src.startswith("="):       # another arm's model, decoded in this arm's mode: evaluation only
                other = src[1:]
                out = f"{D}/{other}_{s}" if other in arms else f"{B}/{other}_{s}"
                ev = f"{D}/eval/{name}.json"
                jobs.append(Job(f"eval_{name}", script("eval.py", "--model", out, "--mode", mode, *test, "--latency-n",
                                                       "0", "--seed", str(s), "--out", ev, extra=cfg.eval_args),
                                (f"{other}_{s}",) if other in arms else base_deps, out=ev))
                models.append(dict(name=name, path=out, label=label, mode=mode, seed=s, eval=ev))
                continue
            if src == "base":
                cmd = script("sft.py", "--model", f"{B}/base", "--data", dist, "--out-dir", out, "--seed", str(s),
                             "--layout", mode, "--threads", "1", extra=cfg.sft_args)
                deps = base_deps
            else:
                start = f"{D}/{src}_{s}" if src in arms else f"{B}/{src}_{s}"
                cmd = script("grpo.py", "--mode", mode, "--model", start, "--out-dir", out, "--seed", str(s),
                             "--data", f"{data}/train.jsonl", "--eval-every", "0", "--threads", "1", extra=cfg.grpo_args)
                deps = (f"{src}_{s}",) if src in arms else base_deps
            jobs.append(Job(name, cmd, deps, out=out))
            ev = f"{D}/eval/{name}.json"
            jobs.append(Job(f"eval_{name}", script("eval.py", "--model", out, "--mode", mode, *test, "--latency-n", "0",
                                                   "--seed", str(s), "--out", ev, extra=cfg.eval_args), (name,), out=ev))
            models.append(dict(name=name, path=out, label=label, mode=mode, seed=s, eval=ev))
    # speed, alone, after everything else: the same workload for every model
    after = tuple(j.name for j in jobs)
    for m in models:
        m["speed"] = f"{D}/speed/speed_{m['name']}.json"
        jobs.append(Job(f"speed_{m['name']}", script(
            "eval.py", "--model", m["path"], "--mode", m["mode"], "--data", f"{data}/test.jsonl", "--n-problems",
            str(cfg.speed_n), "-k", str(cfg.eval_k), "--latency-n", str(cfg.latency_n), "--seed", str(m["seed"] or 0),
            "--out", m["speed"], extra=cfg.eval_args), after, alone=True, out=m["speed"]))
    return jobs, models


# -----------------------------------------------------------------------------
# Running them: side by side, resumable

def run(jobs, cfg):
    """Run what is not done yet, `lanes` at a time (an `alone` job by itself), in the graph's order.
    A failure stops the run (what finished stays done) and names the job's log."""
    done_dir, log_dir = (os.path.join(cfg.out_dir, d) for d in ("done", "logs"))
    os.makedirs(done_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    finished = {j.name for j in jobs if os.path.isfile(os.path.join(done_dir, j.name))}
    todo = [j for j in jobs if j.name not in finished]
    print(f"{len(jobs)} jobs: {len(finished)} done before, {len(todo)} to run", flush=True)
    running = {}   # name -> (job, process, start time, log file)
    try:
        while todo or running:
            for j in list(todo):
                busy_alone = any(r[0].alone for r in running.values())
                if busy_alone or len(running) >= cfg.lanes or (j.alone and running):
                    break
                if any(d not in finished for d in j.deps):
                    continue
                env = dict(os.environ)
                if not j.alone:
                    env["OMP_NUM_THREADS"] = "1"
                log = open(os.path.join(log_dir, j.name + ".log"), "a")
                log.write(f"$ {shlex.join(j.cmd)}\n")
                log.flush()
                running[j.name] = (j, subprocess.Popen(j.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                                   time.time(), log)
                todo.remove(j)
                print(f"{time.strftime('%H:%M:%S')} start {j.name}{' (alone)' if j.alone else ''}", flush=True)
            time.sleep(0.2)
            for name, (j, p, t0, log) in list(running.items()):
                if p.poll() is None:
                    continue
                log.close()
                del running[name]
                if p.returncode != 0:
                    raise RuntimeError(f"job {name} failed (exit {p.returncode}): see {log.name}")
                wall = time.time() - t0
                atomic_write(os.path.join(done_dir, name), json.dumps(dict(wall_s=round(wall, 1), out=j.out)) + "\n")
                finished.add(name)
                print(f"{time.strftime('%H:%M:%S')} done  {name} ({wall:.0f} s)", flush=True)
    finally:
        for j, p, _, log in running.values():    # Ctrl-C or a failure: the others stop too (they resume)
            p.terminate()
            p.wait()
            log.close()


# -----------------------------------------------------------------------------
# The table

def read(path):
    with open(path) as f:
        return json.load(f)


def arm_stats(cfg, models):
    """Per arm: the per-seed figures, their mean, sd and standard errors."""
    rows = {}
    for m in models:
        if not os.path.isfile(m["eval"]):     # the base of another run (--base-dir) evaluated there, or not
            continue
        ev, sp = read(m["eval"])[m["mode"]], read(m["speed"])[m["mode"]]
        rows.setdefault(m["label"], dict(label=m["label"], mode=m["mode"], seeds=[]))["seeds"].append(dict(
            seed=m["seed"], accuracy=ev["accuracy"], se=ev["accuracy_se"], format_valid=ev["format_valid"],
            trigger_rate=ev["trigger_rate"], total_over_critical=ev["total_over_critical"],
            tokens_per_s=sp["tokens_per_s"], time_to_answer_1_s=sp["time_to_answer_1_s"]))
    for r in rows.values():
        acc = [x["accuracy"] for x in r["seeds"]]
        n = len(acc)
        r["n"], r["accuracy"] = n, statistics.mean(acc)
        r["sd"] = statistics.stdev(acc) if n > 1 else 0.0
        r["eval_se"] = math.sqrt(statistics.mean(x["se"] ** 2 for x in r["seeds"]))
        # the standard error of the arm's mean: from the seeds' spread (which holds the evaluation's
        # noise too), never below what the evaluation alone gives
        r["se"] = math.sqrt(max(r["sd"] ** 2, r["eval_se"] ** 2) / n)
        for k in ("format_valid", "trigger_rate", "total_over_critical", "tokens_per_s", "time_to_answer_1_s"):
            vals = [x[k] for x in r["seeds"]]
            r[k], r[k + "_sd"] = statistics.mean(vals), (statistics.stdev(vals) if n > 1 else 0.0)
    return rows


def compare(a, b):
    """a vs b: the difference, its pooled standard error and the verdict (beyond 2 pooled SE or not)."""
    d, se = a["accuracy"] - b["accuracy"], math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    word = "on par" if abs(d) <= 2 * se else ("higher" if d > 0 else "lower")
    return dict(diff=d, pooled_se=se, verdict=word)


def write_table(cfg, models, wall):
    rows = arm_stats(cfg, models)
    order = [r for k in ["base"] + [v[0] for v in ARMS.values()] if (r := rows.get(k))]
    f3 = lambda r, k: f"{r[k]:.3f}" + (f" ± {r[k + '_sd']:.3f}" if r["n"] > 1 else "")
    lines = ["| arm | decoded | seeds | accuracy (mean ± sd) | standard error | format valid | trigger rate | "
             "tokens/s | time-to-answer, 1 request, s | total / critical-path tokens |", "|" + "---|" * 10]
    for r in order:
        acc = f"**{r['accuracy']:.3f}**" + (f" ± {r['sd']:.3f}" if r["n"] > 1 else "")
        lines.append(f"| {r['label']} | {r['mode']} | {r['n']} | {acc} | {r['se']:.3f} (evaluation {r['eval_se']:.3f}) | "
                     f"{f3(r, 'format_valid')} | {f3(r, 'trigger_rate')} | {r['tokens_per_s']:,.0f} ± "
                     f"{r['tokens_per_s_sd']:,.0f} | {f3(r, 'time_to_answer_1_s')} | "
                     f"{f3(r, 'total_over_critical')} |")
    questions = []
    ask = lambda q, a, b: questions.append((q, a, b, compare(rows[a], rows[b]))) if a in rows and b in rows else None
    ask("Does parallel SFT keep the base's accuracy?", "NPR-Beta", "base")
    ask("Does parallel SFT match sequential SFT on the same data?", "NPR-Beta", "SR-Beta")
    ask("Does parallel RL match or beat sequential RL trained the same way?", "NPR", "SR")
    ask("Does parallel RL beat the base?", "NPR", "base")
    ask("Does parallel decoding need SFT with the branch mask? (ablation)", "NPR-Beta", "SR-Beta in parallel")
    ask("Does SFT without the branch mask keep the base's accuracy in parallel? (ablation)", "SR-Beta in parallel", "base")
    lines += ["", "| question | arms | difference | 2 pooled SE | answer |", "|---|---|---|---|---|"] if questions else []
    for q, a, b, c in questions:
        lines.append(f"| {q} | {a} - {b} | {c['diff']:+.3f} | {2 * c['pooled_se']:.3f} | {a} {c['verdict']}"
                     f"{'' if c['verdict'] == 'on par' else ' than ' + b} |")
    speed = {}
    if "NPR" in rows and "SR" in rows:
        n, s = rows["NPR"], rows["SR"]
        speed = dict(tps=n["tokens_per_s"] / s["tokens_per_s"], time=s["time_to_answer_1_s"] / n["time_to_answer_1_s"])
        lines += ["", f"The paper's speedup, TPS(NPR) / TPS(SR): **{speed['tps']:.2f}x** (tokens/s {n['tokens_per_s']:,.0f}"
                  f" vs {s['tokens_per_s']:,.0f}); one request answered {speed['time']:.2f}x sooner "
                  f"({n['time_to_answer_1_s']:.3f} s vs {s['time_to_answer_1_s']:.3f} s)."]
    lines += ["", f"Seeds {cfg.seeds}; accuracy: {cfg.eval_n} test problems x {cfg.eval_k} samples (T=1, top-p 0.7) per "
              f"model, each arm-seed evaluated with its own draws; standard error of an arm = sqrt(max(sd², evaluation "
              f"SE²) / seeds); speed: {cfg.speed_n} problems x {cfg.eval_k} in one batch, and {cfg.latency_n} answered "
              f"one at a time, each model alone on the machine. {machine()}; jobs' wall time: {wall}."]
    text = "\n".join(lines) + "\n"
    atomic_write(os.path.join(cfg.out_dir, "table.md"), text)
    atomic_write(os.path.join(cfg.out_dir, "table.json"), json.dumps(dict(
        config=cfg.__dict__, arms=rows, questions=[dict(question=q, a=a, b=b, **c) for q, a, b, c in questions],
        speedup=speed, machine=machine()), indent=2))
    print(text)
    plot(cfg, order, models)
    return rows


def machine():
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return f"{name}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, commit {commit or '?'}"


def plot(cfg, order, models):
    """table.png: accuracy per arm with its error bar (2 SE) and the seeds as dots; time-to-answer per arm;
    the RL curves (rollout accuracy per step) of every seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: table.png not drawn (bash install.sh report)")
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    x = range(len(order))
    names = [r["label"] for r in order]
    ax[0].bar(x, [r["accuracy"] for r in order], yerr=[2 * r["se"] for r in order], capsize=4, color="#9ecae1")
    for i, r in enumerate(order):
        ax[0].plot([i] * r["n"], [s["accuracy"] for s in r["seeds"]], "k.", ms=5)
    ax[0].set(xticks=list(x), xticklabels=names, ylabel="accuracy", title="accuracy (bar: mean ± 2 SE; dots: seeds)")
    ax[0].set_ylim(0, 1)
    ax[1].bar(x, [r["time_to_answer_1_s"] for r in order], yerr=[r["time_to_answer_1_s_sd"] for r in order],
              capsize=4, color="#a1d99b")
    ax[1].set(xticks=list(x), xticklabels=names, ylabel="seconds", title="time-to-answer, one request (mean ± sd)")
    for m in models:
        log, label, s = os.path.join(m["path"], "metrics.jsonl"), m["label"], m["seed"]
        if label in ("SR", "NPR") and os.path.isfile(log):
            recs = [json.loads(line) for line in open(log) if '"accuracy"' in line]
            acc = [r["accuracy"] for r in recs]      # a step's 16 prompts vary: the mean of the last 10 steps
            smooth = [statistics.mean(acc[max(0, i - 9):i + 1]) for i in range(len(acc))]
            shades = ("#08519c", "#3182bd", "#6baed6") if label == "NPR" else ("#a63603", "#e6550d", "#fd8d3c")
            ax[2].plot([r["step"] for r in recs], smooth, "-" if label == "NPR" else "--",
                       color=shades[s % 3], label=f"{label} seed {s}")
    ax[2].set(xlabel="RL step", ylabel="rollout accuracy (last 10 steps)", title="RL: accuracy of the rollouts")
    if ax[2].get_legend_handles_labels()[0]:   # an ablation without RL arms draws no curve
        ax[2].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(cfg.out_dir, "table.png")
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


# -----------------------------------------------------------------------------

def main(cfg: Config):
    print_config(cfg)
    t0 = time.time()
    jobs, models = jobs_of(cfg)
    run(jobs, cfg)
    done_dir = os.path.join(cfg.out_dir, "done")
    walls = {j.name: read(os.path.join(done_dir, j.name))["wall_s"] for j in jobs}
    wall = (f"{sum(walls.values()):,.0f} s of jobs ({', '.join(f'{k} {v:.0f}' for k, v in walls.items())}); "
            f"this call {time.time() - t0:,.0f} s")
    return write_table(cfg, models, wall)


if __name__ == "__main__":
    main(parse_cli(Config))
