"""The house rules a reader relies on (STYLE.md), checked on the files themselves: imports run one
way (no two modules import each other, a lazy import of the optional Triton backend aside; stage
scripts never import each other), and the README states every file's line count, the files' own,
with the core within its budget.

    .venv/bin/python -m pytest tests/test_repository.py -q
"""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["parallel_attention.py", "model.py", "npr.py", "request.py", "sampler.py", "distill.py", "sft.py", "grpo.py"]
STAGES = {"distill", "sft", "grpo", "eval", "serve"}
LAZY_BACKENDS = {("parallel_attention", "triton_attention")}   # (importer, optional backend imported inside a function)


def imports():
    """module -> {root module it imports: True if at module level, False if only inside a function}."""
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    out = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + ".py"), encoding="utf-8").read())
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for n in names:
                if n in mods and n != m:
                    found[n] = found.get(n, False) or node in tree.body
        out[m] = found
    return out


def lines(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_no_two_modules_import_each_other_and_stages_stand_alone():
    imp = imports()
    assert imp["parallel_attention"] == {"triton_attention": False}    # the rule's file: the backend only, lazily
    cycles = [(a, b) for a in imp for b in imp[a] if a in imp[b] and a < b]
    allowed = [(a, b) for a, b in cycles if (a, b) in LAZY_BACKENDS and not imp[a][b] or
               (b, a) in LAZY_BACKENDS and not imp[b][a]]
    assert cycles == allowed, f"modules that import each other: {sorted(set(cycles) - set(allowed))}"
    crossing = [(a, b) for a in STAGES for b in imp[a] if b in STAGES]
    assert not crossing, f"stage scripts that import each other: {crossing}"


def test_the_readme_states_each_file_s_line_count_and_the_core_s_total():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    stated = {name: int(n) for name, n in re.findall(r"`(\w+\.py)` (?:\| )?(\d+)(?=[\s,;)|])", readme)}
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert set(stated) == files, f"the README misses {sorted(files - set(stated))}, or names {sorted(set(stated) - files)}"
    wrong = {name: (n, lines(name)) for name, n in stated.items() if lines(name) != n}
    assert not wrong, f"README line counts (stated, actual): {wrong}"
    total = sum(lines(name) for name in CORE)
    totals = {int((a or b).replace(",", "")) for a, b in re.findall(r"\*\*([\d,]+) lines\*\*|\(([\d,]+) lines\)", readme)}
    assert totals == {total}, f"the README says the core is {totals} lines; it is {total}"
    assert total <= 2300 and max(lines(name) for name in CORE) <= 450   # STYLE.md: the core's budget
