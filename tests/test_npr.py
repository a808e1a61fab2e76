"""npr.py, the format: what the parser reads (blocks, problems), the official format score (each
penalty, and 0.0 exactly for a perfect sample), the token layout (branch ids, the positions rule
of NPR.md section 3, separators with their branch), the engine's form of a response, tag detection
across token boundaries. Pure Python, a few seconds.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_npr.py -x -q
"""
import os
import random
import re

import pytest

import metrics
import npr


def block_text(plans, steps, takeaway="Both agree, so we conclude.", sep="\n"):
    g = sep.join(f"<plan>{p}</plan>" for p in plans)
    s = sep.join(f"<step>{sep}{x}{sep}</step>" for x in steps)
    return f"<guideline>{sep}{g}{sep}</guideline>{sep}{s}{sep}<takeaway>{sep}{takeaway}{sep}</takeaway>"


GOOD = ("Let me think.\n"
        + block_text(["1: Compute directly.", "2: Use symmetry."], ["1: Directly, 2+2 = 4.", "2: By symmetry, 4."])
        + "\nThe answer is \\boxed{4}.")


def pieces_of(text):
    """A toy tokenizer: whole tags, newlines, and runs of other text."""
    return re.findall(r"</?(?:guideline|plan|step|takeaway)>|\n|[^<\n]+|<", text)


def visible(lay, q, k):
    """The mask rule of NPR.md section 3, for checking layouts."""
    sib = lay.block[q] == lay.block[k] and lay.branch[q] > 0 and lay.branch[k] > 0 and lay.branch[q] != lay.branch[k]
    return k <= q and not sib


# -----------------------------------------------------------------------------
# tags, prompt, parser

def test_forced_texts_read_as_the_grammar():
    """The engine's forced texts (and nothing else) make the tags: a response written with them
    parses as one block whose steps carry their plans' numbers; each tag's embedding name is its name."""
    assert [m.group() for m in npr.TAG_RE.finditer("".join(npr.TAGS))] == list(npr.TAGS)
    assert {npr.TAG_NAMES[t] for t in npr.TAGS} == {"guideline", "/guideline", "plan", "/plan", "step", "/step",
                                                     "takeaway", "/takeaway"}
    text = ("<guideline><plan>1: a</plan><plan>2.1: b</plan></guideline>" + npr.SEPARATOR
            + "".join(npr.STEP_HEADER.format(n=n) + f" x{n}</step>" + npr.SEPARATOR for n in ("1", "2.1"))
            + npr.TAKEAWAY_HEADER + "both</takeaway>")
    p = npr.parse(text)
    assert p.problems == [] and p.blocks[0].numbers == ["1", "2.1"] and p.blocks[0].steps == ["1: x1", "2.1: x2.1"]
    assert npr.engine_pieces(text) == (["<guideline><plan>1: a</plan><plan>2.1: b</plan></guideline>", "\n",
                                        "<step>\n1:", " x1</step>", "\n", "<step>\n2.1:", " x2.1</step>", "\n",
                                        "<takeaway>\n", "both</takeaway>"], None)


def test_build_prompt_puts_the_problem_first_then_the_instruction():
    p = npr.build_prompt("  What is 2+2?  ")
    assert p == "What is 2+2?\n\n" + npr.INSTRUCTION      # the official order: the problem, a blank line, the instruction
    for t in npr.TAGS:
        assert t in npr.INSTRUCTION
    assert "1:" in npr.INSTRUCTION and "\\boxed{}" in npr.INSTRUCTION
    assert npr.build_prompt(" q ", instruction="Short.") == "q\n\nShort."


def test_instruction_is_the_file_beside_npr_py():
    path = os.path.join(os.path.dirname(os.path.abspath(npr.__file__)), "npr_instruction.txt")
    with open(path, encoding="utf-8") as f:
        assert f.read() == npr.INSTRUCTION + "\n"
    assert npr.INSTRUCTION.startswith("Solve the problem below.") and npr.INSTRUCTION.endswith("</takeaway>")


def test_parse_good_sample():
    p = npr.parse(GOOD)
    assert p.problems == [] and p.answer == "4" and p.final_text == "The answer is \\boxed{4}."
    (b,) = p.blocks
    assert b.plans == [("1", "Compute directly."), ("2", "Use symmetry.")]
    assert b.steps == ["1: Directly, 2+2 = 4.", "2: By symmetry, 4."]
    assert b.takeaway == "Both agree, so we conclude."
    assert metrics.is_parallel(GOOD) and metrics.is_parallel(p)


def test_parse_serial_and_unclosed():
    one = block_text(["1: Only way."], ["1: Do it fully."]) + " \\boxed{1}"
    assert not metrics.is_parallel(one) and npr.parse(one).problems == []
    p = npr.parse("<guideline><plan>1: a</plan><plan>first</plan></guideline><step>1: half")
    assert p.blocks[0].plans == [("1", "a"), ("", "first")] and p.blocks[0].steps == ["1: half"]
    assert p.blocks[0].takeaway is None and p.answer is None and p.final_text == ""
    assert any("unclosed step" in x for x in p.problems)
    plain = npr.parse("no tags at all, \\boxed{3}")
    assert plain.blocks == [] and plain.final_text == "no tags at all, \\boxed{3}" and plain.answer == "3"


def test_garbage_never_raises():
    rng = random.Random(0)
    alphabet = list(npr.TAGS) + ["<st", "ep>", "</", "\n", " ", "1:", "x", "\\boxed{", "}", "<", ">", "{"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        npr.parse(text)
        npr.format_score(text)
        lay = npr.token_layout(pieces_of(text))
        assert len(lay.block) == len(lay.branch) == len(lay.pos) == len(pieces_of(text))
        npr.new_tags(text, rng.randint(0, len(text)))
        npr.is_equiv(text, "1")


# -----------------------------------------------------------------------------
# format score

def test_perfect_sample_scores_zero():
    assert npr.format_score(GOOD) == (0.0, [])
    two = GOOD.replace("\nThe answer", "\n" + block_text(["1: Check it.", "2: Check again."],
                                                        ["1: Checked, fine.", "2: Also fine."]) + "\nThe answer")
    assert npr.format_score(two) == (0.0, [])
    assert npr.format_score(block_text(["1.1: Subcase"], ["1.1: solved it"]) + "\\boxed{2}") == (0.0, [])


BAD = {  # name -> (text, expected score)
    "no block": ("Just an answer \\boxed{4}.", -1.5),
    "tag between blocks": (GOOD.replace("Let me think.", "Let me <plan>think."), -1.5),
    "zero plans": (block_text([], ["1: something"]), -1.0),
    "steps != plans": (block_text(["1: one way", "2: another"], ["1: only one step"]), -1.0),
    "text residue in guideline": (GOOD.replace("<plan>2:", "hmm<plan>2:"), -0.2),
    "tag residue in guideline": (GOOD.replace("<plan>2: Use symmetry.</plan>", "<plan>2: Use symmetry."), -0.4 - 1.0),
    "residue between steps": (GOOD.replace("</step>\n<step>", "</step>\nso\n<step>"), -0.2),
    "short plan": (GOOD.replace("1: Compute directly.", "1:"), -0.4),
    "short step": (GOOD.replace("1: Directly, 2+2 = 4.", "1: 4"), -0.4),
    "short takeaway": (GOOD.replace("Both agree, so we conclude.", "ok"), -0.4),
    "tag inside step": (GOOD.replace("2+2 = 4.", "2+2 <plan> = 4."), -0.4),
    "tag inside takeaway": (GOOD.replace("so we conclude", "so <step> we conclude"), -0.4),
    "tag after last block": (GOOD + " </step>", -1.0),
    "empty boxed": (GOOD.replace("\\boxed{4}", "\\boxed{ }"), -1.0),
    "unnumbered plan": (GOOD.replace("2: Use symmetry.", "Use symmetry."), -0.4),
    "more plans than the cap": (block_text([f"{i}: way {i}" for i in range(1, 7)],
                                           [f"{i}: done {i}" for i in range(1, 7)]), -1.0),
    "nested guideline": (GOOD.replace("<step>\n1:", "<guideline><step>\n1:"), -1.5),
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_penalty(name):
    text, want = BAD[name]
    score, problems = npr.format_score(text)
    assert score == pytest.approx(want), (name, problems)
    assert problems, name


def test_penalties_accumulate_and_cap_is_a_parameter():
    text = GOOD.replace("1: Compute directly.", "1:").replace("\\boxed{4}", "\\boxed{}")
    assert npr.format_score(text)[0] == pytest.approx(-1.4)
    six = BAD["more plans than the cap"][0]
    assert npr.format_score(six, max_branches=6) == (0.0, [])


# -----------------------------------------------------------------------------
# token layout

def test_layout_single_piece_tags_and_separators():
    pieces = pieces_of(GOOD)
    lay = npr.token_layout(pieces)
    assert lay.problems == []
    first_step = pieces.index("<step>")
    second_step = pieces.index("<step>", first_step + 1)
    sep1 = second_step - 1                      # the "\n" after the first </step>
    assert pieces[sep1] == "\n" and pieces[sep1 - 1] == "</step>"
    assert lay.branch[sep1] == 1 and lay.block[sep1] == 1           # the separator belongs to step 1
    assert all(not visible(lay, q, sep1) for q in range(second_step, pieces.index("<takeaway>")))
    take = pieces.index("<takeaway>")
    assert lay.branch[take - 1] == 2 and pieces[take - 1] == "\n"   # step 2 keeps its separator too
    assert all(visible(lay, take, k) for k in range(take))          # the takeaway sees every step
    assert lay.pos[first_step] == lay.pos[second_step] == lay.pos[first_step - 1] + 1
    assert lay.pos[take] == 1 + max(lay.pos[first_step:take])
    assert lay.block[0] == 0 and lay.block[pieces.index("<guideline>")] == 1 and lay.block[-1] == 0


def test_layout_docstring_example():
    pieces = ["Q", "<guideline>", "<plan>1: a</plan>", "<plan>2: b</plan>", "</guideline>",
              "<step>", "1:x", "</step>", "\n", "<step>", "2:y", "</step>", "<takeaway>"]
    lay = npr.token_layout(pieces, complete=False)
    assert lay.problems == []
    assert lay.block == [0] + [1] * 12
    assert lay.branch == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0]
    assert lay.pos == [0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 9]


def test_layout_three_branches_exact_positions():
    pieces = (["Q", ":", "<guideline>"]
              + [x for i in "123" for x in ("<plan>", f"{i}:p", "</plan>")]
              + ["</guideline>", "\n"]
              + ["<step>1:x", "</step>"]                  # branch 1: 2 tokens
              + ["<step>", "2:y", "</step>", "\n"]        # branch 2: 4 tokens (separator included)
              + ["<step>", "3:zz", "</step>\n"]           # branch 3: 3 tokens (merged separator)
              + ["<takeaway>", "ok", "</takeaway>", "\\boxed{1}"])
    lay = npr.token_layout(pieces, start_pos=100)
    assert lay.problems == []
    assert lay.branch == [0] * 14 + [1, 1, 2, 2, 2, 2, 3, 3, 3] + [0] * 4
    assert lay.block == [0, 0] + [1] * 24 + [0]
    trunk = list(range(100, 114))
    assert lay.pos == trunk + [114, 115] + [114, 115, 116, 117] + [114, 115, 116] + [118, 119, 120, 121]


def test_layout_split_and_merged_tags():
    text = GOOD
    coarse = npr.token_layout(pieces_of(text))
    # split every tag into two pieces: "<st", "ep>"; the layout follows characters, not pieces
    split = []
    for p in pieces_of(text):
        split += [p[:3], p[3:]] if p in npr.TAGS else [p]
    fine = npr.token_layout(split)
    assert fine.problems == []
    joined = [b for p, b in zip(split, fine.branch) for _ in p]
    assert joined == [b for p, b in zip(pieces_of(text), coarse.branch) for _ in p]
    # merged pieces: "</step>\n" and "\n<step>" as single tokens
    merged = ["<guideline><plan>1: a</plan><plan>2: b</plan></guideline>", "\n<step>", "1: xx", "</step>\n",
              "<step>", "2: yy", "</step>\n", "<takeaway>", "done", "</takeaway>"]
    lay = npr.token_layout(merged)
    assert lay.problems == [] and lay.branch == [0, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert lay.pos == [0, 1, 2, 3, 1, 2, 3, 4, 5, 6]
    # one character per token: branch ids match the character spans exactly
    chars = npr.token_layout(list(text))
    a = text.index("<step>")
    assert chars.branch[a - 1] == 0 and chars.branch[a] == 1
    assert chars.branch[text.index("</step>") + len("</step>")] == 1   # the "\n" separator


def test_positions_in_the_samplers_decode_order():
    """The positions rule gives the same positions token by token in the engine's order (the
    branches interleaved, one token per live branch per step) as over the finished layout."""
    pieces = (["Q", "<guideline>", "<plan>1: a</plan>", "<plan>2: b</plan>", "</guideline>", "\n"]
              + ["<step>", "1:x", "</step>", "\n"] + ["<step>", "2:", "y", "y", "</step>", "\n"]
              + ["<takeaway>", "ok", "</takeaway>"])
    lay = npr.token_layout(pieces, start_pos=7)
    assert lay.problems == []
    b1 = [t for t in range(len(pieces)) if lay.branch[t] == 1]
    b2 = [t for t in range(len(pieces)) if lay.branch[t] == 2]
    first, rest = b1[0], [t for t in range(len(pieces)) if t > b2[-1]]
    interleaved = list(range(first)) + [t for pair in zip(b2, b1 + [None] * len(b2)) for t in pair if t is not None] + rest
    positions = npr.Positions(start_pos=7)
    got = {t: positions(lay.block[t], lay.branch[t]) for t in interleaved}
    assert [got[t] for t in range(len(pieces))] == lay.pos
    assert lay.pos[first] == lay.pos[b2[0]] == lay.pos[first - 1] + 1 and lay.pos[rest[0]] == lay.pos[b2[-1]] + 1


def test_layout_two_blocks():
    text = (block_text(["1: a", "2: b"], ["1: xx", "2: yy"], "tk", sep="") + "mid"
            + block_text(["1: c", "2: d", "3: e"], ["1: u", "2: vv", "3: w"], "tk2", sep="") + "end")
    pieces = pieces_of(text)
    lay = npr.token_layout(pieces)
    assert lay.problems == []
    assert max(lay.block) == 2 and lay.block[pieces.index("mid")] == 0
    g2 = pieces.index("<guideline>", 1)
    assert lay.block[g2] == 2 and lay.block[-1] == 0
    steps2 = [i for i, p in enumerate(pieces) if p == "<step>" and i > g2]
    assert [lay.branch[i] for i in steps2] == [1, 2, 3]
    assert len({lay.pos[i] for i in steps2}) == 1 and lay.pos[steps2[0]] == lay.pos[steps2[0] - 1] + 1
    # a branch of block 2 sees the (joined) steps of block 1 but not its own siblings
    s1 = pieces.index("<step>")
    assert visible(lay, steps2[1], s1) and not visible(lay, steps2[1] + 1, steps2[0] + 1)
    t1 = pieces.index("<takeaway>")  # block 1's join: 1 + its longest branch
    assert lay.pos[t1] == 1 + max(lay.pos[:t1])


MALFORMED = {  # name -> (pieces, substring of a problem)
    "unclosed step": (pieces_of("<guideline><plan>1: a</plan></guideline><step>1: abc"), "unclosed step"),
    "unclosed block": (pieces_of("<guideline><plan>1: a</plan></guideline><step>1: abc</step>"), "unclosed block"),
    "guideline in guideline": (pieces_of("<guideline><plan>1: a</plan><guideline>"), "nested inside an open guideline"),
    "guideline in step": (pieces_of("<guideline><plan>1: a</plan></guideline><step>1: <guideline>"),
                          "nested inside an open step"),
    "step outside a block": (pieces_of("x <step>1: a</step>"), "stray <step>"),
    "step after a closed block": (pieces_of(block_text(["1: a"], ["1: bcdefg"]) + "<step>1: a</step>"),
                                  "stray <step>"),
    "step in step": (pieces_of("<guideline><plan>1: a</plan><plan>2: b</plan></guideline><step>1: x<step>2: y</step>"
                               "<takeaway>t</takeaway>"), "step inside a step"),
    "text between steps": (pieces_of(block_text(["1: a", "2: b"], ["1: x", "2: y"]).replace("</step>\n<step>",
                                                                                            "</step>\nhi\n<step>")),
                           "text between steps"),
    "token spans two branches": (["<guideline><plan>1: a</plan><plan>2: b</plan></guideline>", "<step>1: x",
                                  "</step><step>", "2: y</step>", "<takeaway>t</takeaway>"], "spans two branches"),
    "zero plans": (pieces_of(block_text(["no number"], ["1: x"])), "0 numbered plans"),
    "steps != plans": (pieces_of(block_text(["1: a", "2: b"], ["1: x"])), "1 steps for 2 plans"),
    "more than the cap": (pieces_of(block_text([f"{i}: a" for i in range(1, 7)], [f"{i}: x" for i in range(1, 7)])),
                          "more than the cap 5"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_layout_malformed(name):
    pieces, why = MALFORMED[name]
    lay = npr.token_layout(pieces)
    assert any(why in p for p in lay.problems), (name, lay.problems)
    assert len(lay.pos) == len(lay.branch) == len(lay.block) == len(pieces)  # best effort layout still there


def test_layout_partial_text_and_cap_parameter():
    pieces, _ = MALFORMED["unclosed step"]
    assert npr.token_layout(pieces, complete=False).problems == []
    six, _ = MALFORMED["more than the cap"]
    assert npr.token_layout(six, max_branches=6).problems == []
    lay = npr.token_layout(pieces_of("<guideline><plan>1: a</plan><plan>2: b</plan></guideline>"
                                     "<step>1: x</step>\n<step>2: y"), complete=False)
    assert lay.problems == [] and lay.branch[-3:] == [1, 2, 2]  # "\n" stays with step 1


# -----------------------------------------------------------------------------
# incremental tag detection and plan numbers

def test_new_tags_across_piece_boundaries():
    pieces = ["<gui", "deline>", "\n<pl", "an>1: x</plan><plan>2", ": y</pl", "an></guide", "line", ">\n<", "step>",
              "1:", " a</", "step>", "\n"]
    text, seen = "", []
    for p in pieces:
        start = len(text)
        text += p
        got = npr.new_tags(text, start)
        assert all(i + len(t) - 1 >= start for t, i in got)
        seen += got
    full = [(m.group(), m.start()) for m in npr.TAG_RE.finditer(text)]
    assert seen == full and [t for t, _ in seen][-3:] == ["</guideline>", "<step>", "</step>"]
    assert npr.new_tags("<step>abc", 6) == [] and npr.new_tags("<step>", 5) == [("<step>", 0)]


def test_plan_numbers():
    g = "<guideline>\n<plan>1: a</plan><plan> 2 : b</plan><plan>1.1: c</plan><plan>Idea: d</plan><plan>x 3: e</plan>"
    assert npr.plan_numbers(g) == ["1", "2", "1.1"]
    assert npr.plan_numbers("") == []



# -----------------------------------------------------------------------------
# answers (the equivalence table: test_grading.py)

def test_grade():
    assert npr.grade(GOOD, "4") and not npr.grade(GOOD, "5")
    assert npr.grade("... \\boxed{\\dfrac{1}{2}}", "0.5") and not npr.grade("no answer", "0.5")


def test_engine_pieces_put_a_response_into_the_engines_form():
    """The canonical text keeps GOOD as it is; other spacing around the forced texts becomes the
    engine's; the forced texts are pieces of their own; a step numbered unlike its plan is rejected."""
    pieces, why = npr.engine_pieces(GOOD)
    assert why is None and "".join(pieces) == GOOD
    forced = [npr.STEP_HEADER.format(n=1), npr.STEP_HEADER.format(n=2), npr.TAKEAWAY_HEADER]
    assert all(f in pieces for f in forced) and pieces.count(npr.SEPARATOR) >= 3
    squeezed = (GOOD.replace("</guideline>\n", "</guideline>").replace("</step>\n", "</step> ")
                .replace("<step>\n", "<step>").replace("<takeaway>\n", "<takeaway>"))
    assert "</guideline><step>1:" in squeezed and "".join(npr.engine_pieces(squeezed)[0]) == GOOD
    assert npr.engine_pieces(GOOD.replace("<step>\n2:", "<step>\n3:")) == (None, "block 1 step 2 does not open with its plan's number 2:")
    assert npr.engine_pieces("<guideline>\n<plan>1: a</plan>\n")[0] is None
