"""
The NPR output format: tags, forced texts, instruction and prompt, THE parser, format score, token layout.

A response is a sequence of blocks, then the answer (NPR.md section 2):
    <guideline> <plan>1: ...</plan> <plan>2: ...</plan> </guideline>
    <step> 1: plan 1 carried out, blind to step 2 </step> <step> 2: ... </step>
    <takeaway> combine the steps, decide what next </takeaway>   ... more blocks ... \\boxed{ANSWER}

One parser (`parse`) reads the grammar; format_score (the self-distillation filter), token_layout
(block, branch and RoPE position per token; positions by `Positions`, which the engine also uses)
and engine_pieces (a response in the engine's exact bytes, SFT's input) are views of what it read.
The engine (request.py) detects tags with `new_tags` and the fork width with `plan_numbers`. Answer grading
lives in grading.py (re-exported here). Standard library only.
"""
import os
import re
from bisect import bisect_right
from itertools import accumulate
from dataclasses import dataclass, field

from grading import extract_boxed, grade, is_equiv, normalize_answer  # noqa: F401  (re-exported)

TAGS = ("<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>")
# the sub-word name of each tag: a new tag token's embedding row starts as the mean of the
# embeddings of the tokens of this name (NPR.md section 4, stage 2b)
TAG_NAMES = {t: t[1:-1] for t in TAGS}
TAG_RE = re.compile("|".join(map(re.escape, TAGS)))
HEADER_RE = re.compile(r"\s*(\d+(?:\.\d+)*)\s*:")   # the "N:" that opens a numbered plan or step
_MAX_TAG = max(len(t) for t in TAGS)

# The texts the parallel engine forces (request.py), defined once: SFT puts its trajectories into the
# same bytes (engine_pieces), so it teaches exactly the tokens and positions the engine produces.
STEP_HEADER = "<step>\n{n}:"       # opens branch n (n = its plan's number)
TAKEAWAY_HEADER = "<takeaway>\n"   # opens the trunk after the join
SEPARATOR = "\n"                   # after </guideline> and after each </step> (unless the token ended in whitespace)

# The instruction the prompts end with (build_prompt), kept as the model reads it in its own file; a
# checkpoint may carry its own file of the same name, and --instruction-file names another (instruction_for).
INSTRUCTION_FILE = "npr_instruction.txt"
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), INSTRUCTION_FILE), encoding="utf-8") as _f:
    INSTRUCTION = _f.read().strip()


def build_prompt(question: str, instruction: str | None = None) -> str:
    """The user message, in the official order (no system message): the problem, a blank line, then
    the instruction. `instruction` overrides INSTRUCTION (e.g. the official prompt file's text, or the
    built-in default's short one)."""
    return f"{question.strip()}\n\n{INSTRUCTION if instruction is None else instruction}"


def instruction_for(model_dir: str, instruction_file: str = "") -> str:
    """The instruction to prompt with (stripped): the text of instruction_file when given (e.g. the
    official release's prompt file), else the checkpoint's own (INSTRUCTION_FILE: the instruction it
    was trained with travels with it), else INSTRUCTION."""
    if instruction_file and not os.path.isfile(instruction_file):
        raise FileNotFoundError(f"instruction file not found: {instruction_file}")
    path = instruction_file or os.path.join(model_dir, INSTRUCTION_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return INSTRUCTION


def chat_prompt(tok, question: str, instruction: str) -> list[int]:
    """The prompt's token ids: build_prompt as the one user turn of tok's chat template (tok: the
    tokenizer.Tokenizer). A hybrid Qwen3 runs in non-thinking mode: the format takes the think block's place."""
    return tok.encode(tok.render_chat([{"role": "user", "content": build_prompt(question, instruction)}],
                                      enable_thinking=False))


def new_tags(text: str, start: int) -> list[tuple[str, int]]:
    """(tag, index of its '<') of the tags completed by text appended at `start`, in order; works
    whether a tag arrives as one token or as several pieces ("<st", "ep>")."""
    lo = max(0, start - _MAX_TAG + 1)  # a tag ending at >= start begins at >= start - 11
    return [(m.group(), m.start()) for m in TAG_RE.finditer(text, lo) if m.end() > start]


def plan_numbers(guideline_text: str) -> list[str]:
    """Numbers of the plans that open with "N:" ("1:", "2:", "1.1:"); len() is the fork width k."""
    return [m.group(1) for t in TAG_RE.finditer(guideline_text)
            if t.group() == "<plan>" and (m := HEADER_RE.match(guideline_text, t.end()))]


# -----------------------------------------------------------------------------
# The parser: one left-to-right pass over the tags (the engine's reading of them)

@dataclass
class Block:
    """One <guideline> block as read: character spans into the text, then its parts as text. Framed:
    </guideline>, <takeaway> and </takeaway> each came where the grammar puts them."""
    start: int                                        # the '<' of <guideline>
    end: int = -1                                     # one past </takeaway>, or where the block was cut off
    guide: tuple | None = None                        # (a, b): the guideline's content
    plan_spans: list = field(default_factory=list)    # [start, end, a, b, closed] per <plan>: outer, content
    step_spans: list = field(default_factory=list)    # [start, end, a, b, closed] per <step>
    take: tuple | None = None                         # (a, b): the takeaway's content
    framed: bool = False
    numbers: list = field(default_factory=list)       # the numbered plans' numbers: the fork
    plans: list = field(default_factory=list)         # (number, text); number "" when not "N:"
    steps: list = field(default_factory=list)         # step contents, stripped ("N:" header kept)
    takeaway: str | None = None                       # None when the block never reached its takeaway


@dataclass
class Parsed:
    blocks: list[Block]
    answer: str | None            # content of the last \boxed{}
    final_text: str               # text after the last block
    problems: list[str]           # what the engine could not decode as it stands (empty = well formed)


def parse(text: str, max_branches: int = 5, complete: bool = True) -> Parsed:
    """Split a response into blocks. Never raises: every deviation from the grammar is a problem and
    the text is still split best effort (a nested <guideline> cuts the open block, a <step> or
    <takeaway> closes an open guideline or step). complete=False: the text may still be growing
    (the sampler's view), so what is open at its end is not a problem."""
    text = text or ""
    blocks, problems = [], []
    bad = problems.append
    state, cur, mark = "out", None, 0   # mark: start of the current content (guideline/takeaway/gap)

    def close(span, at, end=None):      # end: one past its closing tag; None: cut off at `at`
        span[1], span[3], span[4] = at if end is None else end, at, end is not None

    def cut_guideline(at):
        if state == "plan":
            close(cur.plan_spans[-1], at)
        cur.guide = (mark, at)
        cur.numbers = [m.group(1) for p in cur.plan_spans if (m := HEADER_RE.match(text, p[2], p[3]))]

    def close_guideline(at):
        nonlocal state, mark
        cut_guideline(at)
        k = len(cur.numbers)
        if k == 0:
            bad(f"block {len(blocks)} has 0 numbered plans")
        elif k > max_branches:
            bad(f"block {len(blocks)} has {k} plans, more than the cap {max_branches}")
        state, mark = "steps", at

    def close_step(at, end=None):
        nonlocal state, mark
        close(cur.step_spans[-1], at, end)
        state, mark = "steps", cur.step_spans[-1][1]

    def end_block(at, framed=False):    # framed: ended by its </takeaway>
        nonlocal state
        if state == "step":
            close_step(at)
        elif state in ("guideline", "plan"):
            cut_guideline(at)
        cur.end, cur.framed, state = at, cur.framed and framed, "out"

    for m in TAG_RE.finditer(text):
        tag, a, b = m.group(), m.start(), m.end()
        if tag == "<guideline>":
            if state != "out":          # nesting: cut the open block here and start a new one
                bad(f"guideline nested inside an open {'block' if state == 'steps' else state} at {a}")
                end_block(a)
            cur, state, mark = Block(start=a), "guideline", b
            blocks.append(cur)
        elif tag == "</guideline>" and state in ("guideline", "plan"):
            if state == "plan":
                bad(f"unclosed plan at {a}")
            close_guideline(a)
            cur.framed, mark = True, b
        elif tag == "<plan>" and state in ("guideline", "plan"):
            if state == "plan":
                bad(f"plan inside a plan at {a}")
                close(cur.plan_spans[-1], a)
            cur.plan_spans.append([a, -1, b, -1, False])
            state = "plan"
        elif tag == "</plan>" and state == "plan":
            close(cur.plan_spans[-1], a, b)
            state = "guideline"
        elif tag in ("<step>", "<takeaway>") and state not in ("out", "takeaway"):
            if state == "step":         # an open step or guideline ends here
                bad(f"{tag[1:-1]} inside a step at {a}")
                close_step(a)
            elif state != "steps":
                bad(f"{tag[1:-1]} inside an open guideline at {a}")
                close_guideline(a)
            if text[mark:a].strip():
                bad(f"text between steps at {mark}")
            if tag == "<step>":
                cur.step_spans.append([a, -1, b, -1, False])
                state = "step"
            else:
                state, mark = "takeaway", b
        elif tag == "</step>" and state == "step":
            close_step(a, b)
        elif tag == "</takeaway>" and state == "takeaway":
            cur.take, k = (mark, a), len(cur.numbers)
            if 0 < k <= max_branches and len(cur.step_spans) != k:
                bad(f"block {len(blocks)} has {len(cur.step_spans)} steps for {k} plans")
            end_block(b, framed=True)
        else:                           # a tag the grammar does not allow here: it stays text
            bad(f"stray {tag} at {a}")
    if state != "out":                  # cut off: close what is open at the end of the text
        if complete:
            bad(f"unclosed {'step and block' if state == 'step' else 'block'} {len(blocks)} at end of text")
        if state == "takeaway":
            cur.take = (mark, len(text))
        end_block(len(text))
    for blk in blocks:  # the parts as text
        blk.plans = [(m.group(1), text[m.end():b].strip()) if (m := HEADER_RE.match(text, a, b))
                     else ("", text[a:b].strip()) for _, _, a, b, _ in blk.plan_spans]
        blk.steps = [text[a:b].strip() for _, _, a, b, _ in blk.step_spans]
        blk.takeaway = text[blk.take[0]:blk.take[1]].strip() if blk.take else None
    final = text[blocks[-1].end:] if blocks else text
    return Parsed(blocks, extract_boxed(text), final.strip(), problems)


def open_block(text: str) -> bool:
    """Whether the text ends inside a block before its <takeaway> (a guideline or a step still open, or
    steps not yet joined): a layout a trainer cannot build, so RL drops such a rollout (NPR.md section 4)."""
    blocks = parse(text, complete=False).blocks
    return bool(blocks) and blocks[-1].take is None


def engine_pieces(text: str, max_branches: int = 5) -> tuple[list[str] | None, str | None]:
    """A well-formed response as the parallel engine writes it -> (pieces, None), else (None, why).
    Encode each piece alone, as the engine does: the forced texts are pieces of their own, whitespace
    between blocks' parts becomes one SEPARATOR, a step misnumbered for its plan is rejected.
        '<guideline>..</guideline><step>1: a</step> <step> 2 : b</step><takeaway>c'
     -> '<guideline>..</guideline>' '\\n' '<step>\\n1:' ' a</step>' '\\n' '<step>\\n2:' ' b</step>' '\\n' '<takeaway>\\n' 'c'"""
    p = parse(text, max_branches)
    if p.problems:
        return None, p.problems[0]
    pieces, at = [], 0
    for bi, blk in enumerate(p.blocks, 1):
        pieces += [text[at:blk.guide[1] + len("</guideline>")], SEPARATOR]
        for si, (_, end, a, b, _) in enumerate(blk.step_spans):
            m, n = HEADER_RE.match(text, a, b), blk.numbers[si]
            if not m or m.group(1) != n:
                return None, f"block {bi} step {si + 1} does not open with its plan's number {n}:"
            pieces += [STEP_HEADER.format(n=n), text[m.end():end], SEPARATOR]
        at = blk.take[0] + text.startswith("\n", blk.take[0])
        pieces.append(TAKEAWAY_HEADER)
    pieces.append(text[at:])
    return [x for x in pieces if x], None


# -----------------------------------------------------------------------------
# Format score (the filter for self-distilled samples: kept only at 0.0)

def format_score(text: str, max_branches: int = 5) -> tuple[float, list[str]]:
    """0.0 for a perfect sample, else a sum of negative penalties, plus the problems in words. The rules
    of NPR.md section 2, on the parse of the text without whitespace; only framed blocks count, and
    a plan or step only when closed by its own tag; residue is penalised once per region."""
    s = re.sub(r"\s+", "", text or "")
    score, problems = 0.0, []

    def pen(x, why):
        nonlocal score
        score -= x
        problems.append(why)

    if "\\boxed{}" in s:
        pen(1.0, "empty \\boxed{}")
    blocks = [b for b in parse(s, max_branches).blocks if b.framed]
    if not blocks:
        pen(1.5, "no guideline/step/takeaway block")
        return round(score, 6), problems
    prev = 0
    for n, b in enumerate(blocks, 1):
        if TAG_RE.search(s, prev, b.start):
            pen(1.5, f"tag in the text before block {n}")
        prev = b.end
        plans, steps = [p for p in b.plan_spans if p[4]], [x for x in b.step_spans if x[4]]
        regions = (("guideline", b.guide[0], b.guide[1], plans),
                   ("steps", b.guide[1] + len("</guideline>"), b.take[0] - len("<takeaway>"), steps))
        for where, lo, hi, elems in regions:     # residue: the region less its elements' outer spans
            gaps = zip([lo] + [e[1] for e in elems], [e[0] for e in elems] + [hi])
            if rest := "".join(s[x:y] for x, y in gaps):
                tagged = bool(TAG_RE.search(rest))
                pen(0.4 if tagged else 0.2, f"block {n}: {'tag' if tagged else 'text'} residue in the {where}")
        if not plans:
            pen(1.0, f"block {n}: no plans")
        elif len(steps) != len(plans):
            pen(1.0, f"block {n}: {len(steps)} steps for {len(plans)} plans")
        elif len(plans) > max_branches:
            pen(1.0, f"block {n}: {len(plans)} plans, more than {max_branches}")
        parts = ([(f"plan {i}", 3, lo, hi) for i, (_, _, lo, hi, _) in enumerate(plans, 1)]
                 + [(f"step {i}", 6, lo, hi) for i, (_, _, lo, hi, _) in enumerate(steps, 1)] + [("takeaway", 6, *b.take)])
        for what, shortest, lo, hi in parts:   # each part's content: long enough, no tag; a plan opens with "N:"
            if hi - lo < shortest or TAG_RE.search(s, lo, hi):
                pen(0.4, f"block {n}: {what} too short or holds a tag")
            elif what.startswith("plan") and not HEADER_RE.match(s, lo, hi):
                pen(0.4, f"block {n}: {what} does not open with 'N:'")
    if TAG_RE.search(s, prev):
        pen(1.0, "tag after the last block")
    return round(score, 6), problems


# -----------------------------------------------------------------------------
# Positions and the token layout: block, branch and RoPE position of every token (NPR.md section 3)

class Positions:
    """The positions rule (NPR.md section 3), one token at a time, in any order that keeps each
    branch's tokens in order and the join after its branches (as the sampler's decode order does)."""

    def __init__(self, start_pos: int = 0):
        self.hi = self.trunk = start_pos - 1
        self.base, self.last = {}, {}         # block -> its branches' first position; (block, branch) -> last

    def __call__(self, block: int, branch: int) -> int:
        if branch == 0:
            p = self.trunk = self.hi + 1
        else:
            key = (block, branch)
            p = self.last[key] + 1 if key in self.last else self.base.setdefault(block, self.trunk + 1)
            self.last[key] = p
        self.hi = max(self.hi, p)
        return p


@dataclass
class TokenLayout:
    block: list[int]     # guideline block id from 1; 0 outside blocks
    branch: list[int]    # 0 = trunk; i = i-th step of its block, trailing whitespace tokens included
    pos: list[int]       # RoPE positions
    problems: list[str]  # empty = well formed


def token_layout(pieces: list[str], start_pos: int = 0, max_branches: int = 5,
                 complete: bool = True) -> TokenLayout:
    """Layout of response tokens given their decoded texts (one piece per token). A token is in block
    b / branch i if it overlaps b's span / its i-th step's span (tag to tag); whitespace-only tokens
    right after a branch join it (NPR.md section 3). complete=False: the text may still grow.

    Example (start_pos=0; each plan shown as one token P):
        token   Q  <guideline> P  P  </guideline> <step> 1:x </step> "\\n" <step> 2:y </step> <takeaway>
        block   0  1           1  1  1            1      1   1       1     1      1   1       1
        branch  0  0           0  0  0            1      1   1       1     2      2   2       0
        pos     0  1           2  3  4            5      6   7       8     5      6   7       9
    """
    starts, n = [0, *accumulate(map(len, pieces))][:-1], len(pieces)   # each token's first character
    parsed = parse("".join(pieces), max_branches, complete)

    def tok(c):  # the token holding character c (empty pieces never hold a character)
        return bisect_right(starts, c) - 1

    block, branch = [0] * n, [0] * n
    for bid, blk in enumerate(parsed.blocks, 1):   # a block and a step are never empty: end > start
        for t in range(tok(blk.start), tok(blk.end - 1) + 1):
            block[t] = bid
    for bid, blk in enumerate(parsed.blocks, 1):
        for i, (a, b, _, _, _) in enumerate(blk.step_spans, 1):
            last = tok(b - 1)
            for t in range(tok(a), last + 1):
                if branch[t] and (block[t], branch[t]) != (bid, i):
                    parsed.problems.append(f"token {t} spans two branches")
                    continue
                block[t], branch[t] = bid, i
            t = last + 1
            while t < n and not pieces[t].strip() and branch[t] == 0:  # separators join the branch
                block[t], branch[t] = bid, i
                t += 1
    positions = Positions(start_pos)
    return TokenLayout(block, branch, [positions(k, i) for k, i in zip(block, branch)], parsed.problems)

