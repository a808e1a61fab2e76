"""request.py, NPR's fork/join rules, through the real engine with scripted tokens: forced headers and
separators where training puts them, a branch decodes as if its siblings were absent, several forks per
sample and rows forking at different times, every malformed case ends with its reason, the two budget
rules, no fork near the budget, serial mode treats tags as text, a running request's snapshot. Each
sample's layout is the format module's and its log-probs the trainer's (check_exact).
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_request.py (~10 s)."""
import pytest

import metrics
import npr
from helpers import Script, block_script, chat, check_exact, generate_naive, ids_of, step_script
from sampler import Sampler, SamplingParams


def show(s, tok):
    """A sample for a failure message: why it ended, its stats, its text."""
    return f"[{s.finish_reason}] {s.stats}\n{tok.decode(s.ids)}"


def test_forced_structure_logprobs_equal_teacher_forced(ck):
    model, tok = ck
    steer = Script({0: block_script(tok, ["1", "2", "3"])},
                   {(0, 1, 1): step_script(tok, 1, "2*3=6"), (0, 1, 2): step_script(tok, 2, "4*5=20 and then some"),
                    (0, 1, 3): step_script(tok, 3, "x = 1 + 1")})
    s = Sampler(model, tok).generate([chat(tok)], params=SamplingParams(temperature=1.0), steer=steer)[0][0]
    assert s.finish_reason == "eos", show(s, tok)
    assert s.stats["forks"] == 1 and s.stats["branches_per_fork"] == [3]
    lay = check_exact(model, tok, s)
    assert lay.problems == [] and npr.format_score(s.text)[0] == 0.0, (lay.problems, npr.format_score(s.text))
    # forced = the three step headers, their separators (when </step> is its own token) and the takeaway header
    header = len(tok.encode("<step>\n1:"))
    assert sum(not x for x in s.sampled) >= 3 * header + len(tok.encode("<takeaway>\n"))
    # totals: the longest branch is the critical path of the block
    lens = [s.branch.count(i) for i in (1, 2, 3)]
    assert s.stats["total_tokens"] == len(s.ids)
    assert s.stats["critical_path_tokens"] == len(s.ids) - sum(lens) + max(lens)


def test_branch_decodes_as_if_alone(ck):
    """Greedy branches of one fork equal decoding each branch alone with its siblings absent."""
    model, tok = ck
    prompt = chat(tok)
    trunk = ids_of(tok, "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n<plan>3: c</plan>\n</guideline>")
    p = SamplingParams(temperature=0, max_new_tokens=60, max_total_tokens=len(trunk) + 3 * 20, fork_min_tokens=1)
    s = Sampler(model, tok).generate([prompt], params=p, steer=Script({0: trunk}))[0][0]
    assert s.stats["branches_per_fork"] == [3], show(s, tok)
    for i in (1, 2, 3):
        mine = [t for t, b in zip(s.ids, s.branch) if b == i]
        header = tok.encode(f"<step>\n{i}:")
        assert mine[:len(header)] == header
        alone, _ = generate_naive(model, prompt + trunk + tok.encode("\n") + header, len(mine) - len(header), tok.stop_ids)
        assert mine[len(header):] == alone[:len(mine) - len(header)], i


def test_rows_fork_at_different_times_and_widths(ck):
    model, tok = ck
    prompts = [chat(tok, "a"), chat(tok, "a longer question"), chat(tok, "b")]
    trunks = {0: block_script(tok, ["1", "2"]),
              1: ids_of(tok, "Let me think. ") + block_script(tok, ["1", "2", "3", "4"]),
              2: ids_of(tok, "serial answer \\boxed{3}") + [tok.eos_id]}
    branches = {(0, 1, 1): step_script(tok, 1, "one"), (0, 1, 2): step_script(tok, 2, "two two two two")}
    branches.update({(1, 1, i): step_script(tok, i, "w" * (2 * i)) for i in (1, 2, 3, 4)})
    out = Sampler(model, tok).generate(prompts, params=SamplingParams(temperature=0.7), steer=Script(trunks, branches))
    got = [o[0] for o in out]
    assert [s.finish_reason for s in got] == ["eos"] * 3
    assert [s.stats["branches_per_fork"] for s in got] == [[2], [4], []]
    for s in got:
        check_exact(model, tok, s)


def test_two_blocks_in_one_sample(ck):
    model, tok = ck
    first = block_script(tok, ["1", "2"], eos=False, answer="")
    trunk = first + block_script(tok, ["1", "2"])
    branches = {(0, b, i): step_script(tok, i, f"block {b} step {i}") for b in (1, 2) for i in (1, 2)}
    s = Sampler(model, tok).generate([chat(tok)], params=SamplingParams(), steer=Script({0: trunk}, branches))[0][0]
    assert s.finish_reason == "eos" and s.stats["branches_per_fork"] == [2, 2], show(s, tok)
    assert {b for b, br in zip(s.block, s.branch) if br} == {1, 2}
    check_exact(model, tok, s)


@pytest.mark.parametrize("case,reason", [
    ("zero plans", "0 numbered plans"), ("over cap", "6 plans > cap 5"), ("nested guideline", "guideline nested"),
    ("guideline in step", "<guideline> inside a step"), ("step in step", "<step> inside a step"),
    ("eos in step", "eos inside a step"), ("budget in step", "budget")])
def test_malformed_and_edge_cases_end_with_their_reason(ck, case, reason):
    model, tok = ck
    two = "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>"
    trunk = {"zero plans": "<guideline>\n<plan>first</plan>\n</guideline>",
             "over cap": "<guideline>\n" + "".join(f"<plan>{i}: p</plan>\n" for i in range(1, 7)) + "</guideline>",
             "nested guideline": "<guideline>\n<plan>1: a</plan>\n<guideline>"}.get(case, two)
    branch = {"guideline in step": step_script(tok, 1, "x <guideline>"), "step in step": step_script(tok, 1, "x <step>"),
              "eos in step": ids_of(tok, "<step>\n1:", " x") + [tok.eos_id]}.get(case)
    p = SamplingParams(max_new_tokens=60 if case == "budget in step" else 200, fork_min_tokens=1)
    steer = Script({0: ids_of(tok, trunk)}, {(0, 1, 1): branch} if branch else {})
    s = Sampler(model, tok).generate([chat(tok)], params=p, steer=steer)[0][0]
    assert reason in s.finish_reason, (s.finish_reason, show(s, tok))
    if case == "budget in step":
        assert s.branch[-1] > 0 and s.stats["total_tokens"] == 60


@pytest.mark.parametrize("budget", ["total", "critical"])
def test_budget_counts_all_branches_or_the_critical_path(ck, budget):
    """Default "total" (the official engine): all tokens of all branches stop at max_new_tokens, so a
    parallel answer gets no more tokens than a serial one; "critical": the critical path does."""
    model, tok = ck
    trunk = ids_of(tok, "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>")
    kw = {} if budget == "total" else dict(budget="critical")
    sampler = Sampler(model, tok)
    sampler.stop_ids = set()
    s = sampler.generate([chat(tok)], params=SamplingParams(max_new_tokens=60, fork_min_tokens=1, **kw),
                         steer=Script({0: trunk}))[0][0]
    assert s.finish_reason == "budget" and s.stats["forks"] == 1, show(s, tok)
    total, crit = s.stats["total_tokens"], s.stats["critical_path_tokens"]
    assert (total, crit < 60) == (60, True) if budget == "total" else (crit, total > 60) == (60, True)


def test_no_fork_near_the_budget(ck):
    """With too little budget left, the guideline's steps are written serially (no fork); such a
    sample has two steps in its text but did not trigger parallel decoding."""
    model, tok = ck
    trunk = ids_of(tok, "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>")
    serial_steps = ids_of(tok, "\n<step>\n1: a b c</step>\n<step>\n2: d e f</step>\n")   # allowed: no fork
    p = SamplingParams(max_new_tokens=len(trunk) + len(serial_steps) + 5, fork_min_tokens=len(serial_steps) + 10)
    s = Sampler(model, tok).generate([chat(tok)], params=p, steer=Script({0: trunk + serial_steps}))[0][0]
    assert s.stats["forks"] == 0 and set(s.branch) == {0} and s.finish_reason == "budget"
    assert metrics.is_parallel(s.text) and metrics.sample_metrics([(s, "1")], 1.0)["trigger_rate"] == 0.0


@pytest.mark.parametrize("budget", ["total", "critical"])
def test_a_fork_needs_fork_min_tokens_of_the_budget_left(ck, budget):
    """The official rule: fork while at least fork_min_tokens of the budget remain at </guideline>
    (whatever the width), else write the steps serially; the edge is exact."""
    model, tok = ck
    trunk = ids_of(tok, "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n<plan>3: c</plan>\n</guideline>")
    kw = {} if budget == "total" else dict(budget="critical")
    for left, forks in ((40, 1), (39, 0)):
        p = SamplingParams(max_new_tokens=len(trunk) + left, fork_min_tokens=40, **kw)
        s = Sampler(model, tok).generate([chat(tok)], params=p, steer=Script({0: trunk}))[0][0]
        assert s.stats["forks"] == forks, (left, show(s, tok))


def test_serial_mode_treats_tags_as_text(ck):
    model, tok = ck
    trunk = block_script(tok, ["1", "2"])
    s = Sampler(model, tok).generate([chat(tok)], params=SamplingParams(mode="serial"), steer=Script({0: trunk}))[0][0]
    assert s.stats["forks"] == 0 and set(s.branch) == {0} and s.ids == trunk and s.finish_reason == "eos"


def test_a_running_request_gives_a_snapshot(ck):
    """to_sample() while a request runs (serve.py's live view, a debugger): its tokens so far, in the
    layout its end gives, finish_reason "" and the time so far; it does not disturb the request."""
    model, tok = ck
    sampler = Sampler(model, tok)
    sampler.stop_ids, sampler.steer = set(), Script({0: block_script(tok, ["1", "2"])})
    p = SamplingParams(temperature=1.0, max_new_tokens=60, fork_min_tokens=1, seed=3)
    seq = sampler.add(chat(tok), p, seed=3)
    assert seq.to_sample().ids == [] and seq.to_sample().stats["time_s"] == 0.0     # not admitted yet
    snaps = []
    while not seq.finish:
        sampler.step()
        snaps.append(seq.to_sample())
    live, end = snaps[-2], snaps[-1]
    assert live.finish_reason == "" and 0 < len(live.ids) < len(end.ids) and live.stats["time_s"] > 0
    assert any(s.stats["forks"] == 1 and 2 in s.branch for s in snaps[:-1])        # a snapshot inside the fork
    assert end.finish_reason == "budget" and end.ids == sampler.generate(
        [chat(tok)], params=p, seeds=[3], steer=sampler.steer)[0][0].ids
