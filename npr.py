"""
The NPR output format: tags, instruction, parser, format score, token layout and answer grading.

A response is a sequence of blocks, then the answer (NPR.md section 2):
    <guideline> <plan>1: ...</plan> <plan>2: ...</plan> </guideline>
    <step> 1: plan 1 carried out, blind to step 2 </step> <step> 2: ... </step>
    <takeaway> combine the steps, decide what next </takeaway>   ... more blocks ... \\boxed{ANSWER}

Used by the sampler (fork/join detection: `new_tags`, `plan_numbers`), the trainers (`token_layout`
gives each response token its block, branch and RoPE position), distillation (`format_score`,
`grade`) and eval (`grade`, `is_parallel`). Standard library only; sympy, when importable, adds
symbolic answer equality and is imported lazily (importing this file stays cheap).

Contents: tags and instruction -> structural scan (shared by parse and token_layout) -> parse ->
format_score -> token_layout -> answer extraction and equivalence.
"""
import ast
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field

TAGS = ("<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>")
# the sub-word name of each tag: a new special token's embedding row starts as the mean of the
# embeddings of the tokens of this name (NPR.md section 4, stage 2b)
TAG_NAMES = {t: t[1:-1] for t in TAGS}
TAG_RE = re.compile(r"</?(?:guideline|plan|step|takeaway)>")
_MAX_TAG = max(len(t) for t in TAGS)

INSTRUCTION = """\
Solve the problem below. Think in rounds, and inside a round explore several lines of reasoning \
at the same time. Mark up your reasoning with these tags:

<guideline> ... </guideline> starts a round. Inside it, put each idea you want to pursue in its \
own <plan> ... </plan>. Number the plans 1:, 2:, 3: and so on, and keep each plan to one short \
sentence. Whenever the problem allows different methods, or splits into parts that can be worked \
out separately, write several plans (at most five).

<step> ... </step> carries out one plan. Write exactly one step per plan, in the order of the \
plans, and begin each step with the number of its plan (1:, 2:, ...). The steps of a round are \
worked out simultaneously and none of them can read the others, so write every step as though the \
other steps did not exist: do not mention them or rely on their results.

<takeaway> ... </takeaway> ends the round once all its steps are written. Compare the steps, merge \
what they found, catch mistakes, and decide whether another round is needed.

Begin a new <guideline> round after a takeaway if more work remains. When you are finished, write \
the final answer after the last takeaway, inside \\boxed{}.

The shape of one round:
<guideline>
<plan>1: ...</plan>
<plan>2: ...</plan>
</guideline>
<step>
1: ...
</step>
<step>
2: ...
</step>
<takeaway>
...
</takeaway>"""


def build_prompt(question: str, instruction: str | None = None) -> str:
    """The user message (no system message, as in the official setup): instruction + question.
    `instruction` overrides INSTRUCTION (the built-in default's char-level model uses a short one)."""
    return f"{INSTRUCTION if instruction is None else instruction}\n\nProblem:\n{question.strip()}"


def new_tags(text: str, start: int) -> list[tuple[str, int]]:
    """Tags whose last character lies at index >= start, i.e. completed by text appended at `start`.
    Returns (tag, index of its '<') in order. Works whether tags arrive as one special token or as
    several plain-text pieces ("<st", "ep>"): the sampler calls it after appending each piece."""
    lo = max(0, start - _MAX_TAG + 1)  # a tag ending at >= start begins at >= start - 11
    return [(m.group(), m.start()) for m in TAG_RE.finditer(text, lo) if m.end() > start]


_PLAN_NUM_RE = re.compile(r"<plan>\s*(\d+(?:\.\d+)*)\s*:")


def plan_numbers(guideline_text: str) -> list[str]:
    """Numbers of the plans that open with "N:" ("1:", "2:", "1.1:"); len() is the fork width k."""
    return _PLAN_NUM_RE.findall(guideline_text)


# -----------------------------------------------------------------------------
# Structural scan: one left-to-right pass over the tags, shared by parse() and token_layout().
# It records character spans, so the token layout can be derived from pieces of any granularity.

@dataclass
class _BlockSpan:
    start: int                      # index of the '<' of <guideline>
    end: int = -1                   # one past the '>' of </takeaway> (or where it was cut off)
    guide: tuple | None = None      # (a, b) content span of the guideline
    k: int = 0                      # numbered plans = fork width
    steps: list = field(default_factory=list)  # [outer_start, outer_end, content_start, content_end]
    take: tuple | None = None       # (a, b) content span of the takeaway


def _scan(text, max_branches=5, complete=True):
    """-> (blocks, problems). Best effort on malformed text: the engine's reading of the tags, with
    every deviation from the grammar recorded as a problem string."""
    blocks, problems = [], []
    state, cur, mark = "out", None, 0   # mark: start of the current content (guideline/takeaway/gap)
    bad = problems.append

    def close_guideline(at):
        nonlocal state, mark
        cur.guide = (mark, at)
        cur.k = len(plan_numbers(text[mark:at]))
        n = len(blocks)
        if cur.k == 0:
            bad(f"block {n} has 0 numbered plans")
        elif cur.k > max_branches:
            bad(f"block {n} has {cur.k} plans, more than the cap {max_branches}")
        state, mark = "steps", at

    def close_step(at):
        nonlocal state, mark
        cur.steps[-1][1] = cur.steps[-1][3] = at
        state, mark = "steps", at

    def end_block(at):
        nonlocal state
        cur.end = at
        state = "out"

    for m in TAG_RE.finditer(text):
        tag, a, b = m.group(), m.start(), m.end()
        if tag == "<guideline>":
            if state != "out":  # nesting: cut the open block here and start a new one
                bad(f"guideline nested inside an open {state if state != 'steps' else 'block'} at {a}")
                if state == "step":
                    close_step(a)
                end_block(a)
            cur = _BlockSpan(start=a)
            blocks.append(cur)
            state, mark = "guideline", b
        elif tag == "</guideline>":
            if state in ("guideline", "plan"):
                if state == "plan":
                    bad(f"unclosed plan at {a}")
                close_guideline(a)
                mark = b
            else:
                bad(f"stray </guideline> at {a}")
        elif tag == "<plan>":
            if state == "guideline":
                state = "plan"
            else:
                bad(f"plan outside a guideline at {a}")
        elif tag == "</plan>":
            if state == "plan":
                state = "guideline"
            else:
                bad(f"stray </plan> at {a}")
        elif tag == "<step>":
            if state in ("guideline", "plan"):
                bad(f"step inside an open guideline at {a}")
                close_guideline(a)
            elif state == "step":
                bad(f"step inside a step at {a}")
                close_step(a)
            if state == "steps":
                if text[mark:a].strip():
                    bad(f"text between steps at {mark}")
                cur.steps.append([a, -1, b, -1])
                state = "step"
            else:  # "out" or "takeaway": the step stays trunk text
                bad(f"step outside a block at {a}" if state == "out" else f"step inside a takeaway at {a}")
        elif tag == "</step>":
            if state == "step":
                close_step(a)
                cur.steps[-1][1], mark = b, b
            else:
                bad(f"stray </step> at {a}")
        elif tag == "<takeaway>":
            if state == "step":
                bad(f"takeaway inside an open step at {a}")
                close_step(a)
            elif state in ("guideline", "plan"):
                bad(f"takeaway inside an open guideline at {a}")
                close_guideline(a)
            if state == "steps":
                if text[mark:a].strip():
                    bad(f"text between steps at {mark}")
                state, mark = "takeaway", b
            else:
                bad(f"takeaway outside a block at {a}")
        elif tag == "</takeaway>":
            if state == "takeaway":
                cur.take = (mark, a)
                n = len(blocks)
                if 0 < cur.k <= max_branches and len(cur.steps) != cur.k:
                    bad(f"block {n} has {len(cur.steps)} steps for {cur.k} plans")
                end_block(b)
            else:
                bad(f"stray </takeaway> at {a}")

    if state != "out":  # cut off: close what is open at the end of the text
        if complete:
            if state == "step":
                bad("unclosed step at end of text")
            bad(f"unclosed block {len(blocks)} at end of text")
        if state == "step":
            close_step(len(text))
        elif state in ("guideline", "plan"):
            cur.guide = (mark, len(text))
        elif state == "takeaway":
            cur.take = (mark, len(text))
        end_block(len(text))
    return blocks, problems


# -----------------------------------------------------------------------------
# Parser

@dataclass
class Block:
    plans: list[tuple[str, str]]  # (number, text); number "" when the plan does not open with "N:"
    steps: list[str]              # step contents, stripped (the "N:" header kept)
    takeaway: str | None          # None when the block never reached </takeaway>


@dataclass
class Parsed:
    blocks: list[Block]
    answer: str | None            # content of the last \boxed{}
    final_text: str               # text after the last block
    problems: list[str]           # structural problems (empty = well formed)


_PLAN_RE = re.compile(r"<plan>(.*?)(?:</plan>|(?=<plan>)|$)", re.S)
_NUMBERED_RE = re.compile(r"\s*(\d+(?:\.\d+)*)\s*:\s*(.*)", re.S)


def parse(text: str, max_branches: int = 5) -> Parsed:
    """Split a response into blocks. Never raises: garbage gives no blocks and a list of problems."""
    text = text or ""
    spans, problems = _scan(text, max_branches)
    blocks = []
    for s in spans:
        plans = []
        for c in _PLAN_RE.findall(text[s.guide[0]:s.guide[1]] if s.guide else ""):
            m = _NUMBERED_RE.fullmatch(c)
            plans.append((m.group(1), m.group(2).strip()) if m else ("", c.strip()))
        steps = [text[st[2]:st[3]].strip() for st in s.steps]
        take = text[s.take[0]:s.take[1]].strip() if s.take else None
        blocks.append(Block(plans, steps, take))
    final = text[spans[-1].end:] if spans else text
    return Parsed(blocks, extract_boxed(text), final.strip(), problems)


def is_parallel(text_or_parsed) -> bool:
    """Parallel trigger: at least one block with >= 2 steps (a block that forked into >= 2 branches)."""
    p = parse(text_or_parsed) if isinstance(text_or_parsed, str) else text_or_parsed
    return any(len(b.steps) >= 2 for b in p.blocks)


# -----------------------------------------------------------------------------
# Format score (the filter for self-distilled samples: kept only at 0.0)

_NOT_G = r"(?:(?!<guideline>).)*?"  # any text that does not open a new guideline
_BLOCK_RE = re.compile(rf"<guideline>({_NOT_G})</guideline>({_NOT_G})<takeaway>({_NOT_G})</takeaway>", re.S)
_PLAN_ELEM_RE = re.compile(r"<plan>(.*?)</plan>", re.S)
_STEP_ELEM_RE = re.compile(r"<step>(.*?)</step>", re.S)


def format_score(text: str, max_branches: int = 5) -> tuple[float, list[str]]:
    """0.0 for a perfect sample, else a sum of negative penalties, plus the problems in words.

    How each official rule is read here (all on the text with every whitespace character removed,
    so lengths count non-whitespace characters):
    - Blocks: non-overlapping left-to-right matches of
      <guideline>G</guideline>M<takeaway>T</takeaway> where G, M, T never contain <guideline>
      (a nested guideline breaks the outer block, whose text then lies between blocks).
      No block at all: -1.5 (and nothing else is checked but the boxed rule).
    - Text before the first block or between two blocks is allowed, but a tag in it: -1.5 per gap.
    - Plans are the <plan>..</plan> elements of G, steps the <step>..</step> elements of M.
      0 plans: -1.0; otherwise #steps != #plans: -1.0 (a block without steps lands here).
    - Residue (whatever is left of G once its plans are removed, of M once its steps are removed):
      -0.2 when it is plain text, -0.4 when it holds a tag (e.g. an unclosed <plan>); G and M are
      checked separately.
    - Each plan shorter than 3 characters, each step or takeaway shorter than 6, or any of them
      holding a tag: -0.4 per element (once per element even when both apply). The "N:" header
      counts towards the length.
    - A tag after the last block: -1.0.
    - An empty \\boxed{} anywhere: -1.0. (A missing answer is the answer reward's business.)
    Two additions that keep the filter consistent with the parallel engine (NPR.md section 5),
    which forks only on numbered plans and refuses more than `max_branches`:
    - each plan not opening with "N:" -> -0.4; more plans than max_branches -> -1.0.
    """
    s = re.sub(r"\s+", "", text or "")
    score, problems = 0.0, []

    def pen(x, why):
        nonlocal score
        score -= x
        problems.append(why)

    if "\\boxed{}" in s:
        pen(1.0, "empty \\boxed{}")
    blocks = list(_BLOCK_RE.finditer(s))
    if not blocks:
        pen(1.5, "no guideline/step/takeaway block")
        return round(score, 6), problems

    prev = 0
    for n, m in enumerate(blocks, 1):
        if TAG_RE.search(s[prev:m.start()]):
            pen(1.5, f"tag in the text before block {n}")
        prev = m.end()
        g, mid, take = m.groups()
        plans, steps = _PLAN_ELEM_RE.findall(g), _STEP_ELEM_RE.findall(mid)
        for where, rest in (("guideline", _PLAN_ELEM_RE.sub("", g)), ("steps", _STEP_ELEM_RE.sub("", mid))):
            if rest:
                tagged = bool(TAG_RE.search(rest))
                pen(0.4 if tagged else 0.2, f"block {n}: {'tag' if tagged else 'text'} residue in the {where}")
        if not plans:
            pen(1.0, f"block {n}: no plans")
        elif len(steps) != len(plans):
            pen(1.0, f"block {n}: {len(steps)} steps for {len(plans)} plans")
        elif len(plans) > max_branches:
            pen(1.0, f"block {n}: {len(plans)} plans, more than {max_branches}")
        for i, p in enumerate(plans, 1):
            if len(p) < 3 or TAG_RE.search(p):
                pen(0.4, f"block {n}: plan {i} too short or holds a tag")
            elif not _NUMBERED_RE.match(p):
                pen(0.4, f"block {n}: plan {i} does not open with 'N:'")
        for i, st in enumerate(steps, 1):
            if len(st) < 6 or TAG_RE.search(st):
                pen(0.4, f"block {n}: step {i} too short or holds a tag")
        if len(take) < 6 or TAG_RE.search(take):
            pen(0.4, f"block {n}: takeaway too short or holds a tag")
    if TAG_RE.search(s[prev:]):
        pen(1.0, "tag after the last block")
    return round(score, 6), problems


# -----------------------------------------------------------------------------
# Token layout: block, branch and RoPE position of every response token (NPR.md section 3)

@dataclass
class TokenLayout:
    block: list[int]     # guideline block id from 1; 0 outside blocks
    branch: list[int]    # 0 = trunk; i = i-th step of its block, trailing whitespace tokens included
    pos: list[int]       # RoPE positions
    problems: list[str]  # empty = well formed


def token_layout(pieces: list[str], start_pos: int = 0, max_branches: int = 5,
                 complete: bool = True) -> TokenLayout:
    """Layout of response tokens given their decoded texts (one piece per token, any granularity).

    Tokens are assigned by character spans of "".join(pieces): a token belongs to block b if it
    overlaps the span from the '<' of b's <guideline> to the '>' of its </takeaway>, and to branch i
    if it overlaps the span from the '<' of the i-th <step> to the '>' of its </step>; whitespace-only
    tokens right after a branch join that branch (so step i+1 cannot read step i through a "\\n").
    complete=False: the text may still be growing (sampler), so open blocks are not problems.

    Example (start_pos=0; each plan shown as one token P):
        token   Q  <guideline> P  P  </guideline> <step> 1:x </step> "\\n" <step> 2:y </step> <takeaway>
        block   0  1           1  1  1            1      1   1       1     1      1   1       1
        branch  0  0           0  0  0            1      1   1       1     2      2   2       0
        pos     0  1           2  3  4            5      6   7       8     5      6   7       9
    """
    starts, off = [], 0
    for p in pieces:
        starts.append(off)
        off += len(p)
    text, n = "".join(pieces), len(pieces)
    spans, problems = _scan(text, max_branches, complete)

    def tok(c):  # the token holding character c (empty pieces never hold a character)
        return bisect_right(starts, c) - 1

    block, branch = [0] * n, [0] * n
    for bid, s in enumerate(spans, 1):
        if s.end > s.start:
            for t in range(tok(s.start), tok(s.end - 1) + 1):
                block[t] = bid
    for bid, s in enumerate(spans, 1):
        for i, (a, b, _, _) in enumerate(s.steps, 1):
            if b <= a:
                continue
            last = tok(b - 1)
            for t in range(tok(a), last + 1):
                if branch[t] and (block[t], branch[t]) != (bid, i):
                    problems.append(f"token {t} spans two branches")
                    continue
                block[t], branch[t] = bid, i
            t = last + 1
            while t < n and not pieces[t].strip() and branch[t] == 0:  # separators join the branch
                block[t], branch[t] = bid, i
                t += 1

    # positions: trunk counts up from start_pos; all branches of a block start at 1 + the last
    # trunk position before its first step; after the join the trunk resumes at 1 + the highest
    # position so far (= the longest branch when well formed)
    pos, base, last_in = [0] * n, {}, {}
    hi, last_trunk = start_pos - 1, start_pos - 1
    for t in range(n):
        if branch[t] == 0:
            p = last_trunk = hi + 1
        else:
            key = (block[t], branch[t])
            base.setdefault(block[t], last_trunk + 1)
            p = last_in[key] + 1 if key in last_in else base[block[t]]
            last_in[key] = p
        pos[t] = p
        hi = max(hi, p)
    return TokenLayout(block, branch, pos, problems)


# -----------------------------------------------------------------------------
# Answer extraction and equivalence (NPR.md section 6)

def _match_brace(s, i):
    """Index of the '}' matching the '{' at s[i], or None."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (brace-matched), or of "\\boxed 5" (one token).
    A last box that is cut off falls back to the one before it. None when there is none."""
    text = text or ""
    hits = sorted(m.end() for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text))
    for i in reversed(hits):
        j = i
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            k = _match_brace(text, j)
            if k is not None:
                return text[j + 1:k].strip()
        elif j > i:  # "\boxed 5": the next run of non-space characters, up to a '$'
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group()
    return None


def _unwrap(s, cmds):
    """\\cmd{X} -> X for each command, brace-matched."""
    for cmd in cmds:
        i = s.find(cmd + "{")
        while i >= 0:
            j = _match_brace(s, i + len(cmd))
            if j is None:
                break
            s = s[:i] + s[i + len(cmd) + 1:j] + s[j + 1:]
            i = s.find(cmd + "{")
    return s


_UNIT_TEXT_RE = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s.]*\}(?:\s*\^\s*\{?\d\}?)?\s*$")
_UNIT_WORD_RE = re.compile(r"([-+]?\d[\d.,]*(?:/\d+)?)\s+(?:[a-zA-Z]{2,}\.?\s*)+(?:\^\{?\d\}?)?")


def normalize_answer(s) -> str:
    """A canonical string for comparison. Percent signs are dropped here ("50\\%" -> "50");
    is_equiv remembers them and also accepts the value / 100. Trailing unit words are dropped only
    after a plain number and when at least two letters long ("5 cm" -> "5", but "5 m" stays)."""
    if s is None:
        return ""
    s = str(s).strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or s
    s = _UNIT_TEXT_RE.sub("", s)  # "5\text{ cm}^2" -> "5"
    s = _unwrap(s, ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\boldsymbol"))
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    for a in ("\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\$", "$"):
        s = s.replace(a, "")
    s = s.replace("\\ ", " ").replace("~", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "").replace("\\degree", "")
    s = s.replace("\\%", "").replace("%", "").strip().rstrip(".").strip()
    m = re.fullmatch(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)", s, re.S)
    if m and "=" not in m.group(1):  # "x = 5" -> "5", "x \in [0, 1)" -> "[0, 1)"
        s = m.group(1)
    m = _UNIT_WORD_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # "1,000" is a thousand, not a pair
        s = s.replace(",", "")
    s = s.replace("{,}", "")
    # drop whitespace, except one space that ends a command before a letter ("\pi r" != "\pir")
    s = re.sub(r"(\\[a-zA-Z]+)?\s+(?=(.?))",
               lambda m: (m[1] or "") + (" " if m[1] and m[2].isalpha() else ""), s)
    # short LaTeX forms: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac ?(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac ?(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt ?(\w)", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"\(([A-E])\)", s)  # multiple choice "(B)" -> "B"
    return m.group(1) if m else s


def _split_seq(s):
    """"(1,2)" -> ("()", ["1", "2"]); "[0,1)" -> ("[)", ...); bare "1,2" -> ("", [...]); else None."""
    whole = [(s[0] + s[-1], s[1:-1])] if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" else []
    for outer, body in whole + [("", s)]:
        items, depth, cur = [], 0, ""
        for ch in body:
            depth += (ch in "([{") - (ch in ")]}")
            if depth < 0:
                break  # "(1)+(2)": the outer brackets are not one pair
            if ch == "," and depth == 0:
                items, cur = items + [cur], ""
            else:
                cur += ch
        else:
            return (outer, items + [cur]) if items else None
    return None


_FUNCS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp"}


def _to_py(s):
    """Normalised LaTeX-lite -> a Python expression string, or None when it holds anything else.
    Identifiers are restricted to single letters and a few functions (safe for sympy's parser)."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = re.sub(r"(\d)[eE]([-+]?\d+)(?![\w.])", r"\1*10^{\2}", s)  # 1.5e-3
    s = re.sub(r"\\pi(?![a-zA-Z])", "(pi)", s)  # "2\pi r" -> "2(pi) r": a product either way
    s = re.sub(r"\\(sin|cos|tan|log|ln|exp)(?![a-zA-Z])", r"\1 ", s)  # "\ln2" -> "ln 2" (sympy applies it)
    for cmd in ("\\frac", "\\sqrt"):
        while (i := s.rfind(cmd)) >= 0:  # the last one holds no other: innermost first
            j = i + len(cmd)
            root = None
            if cmd == "\\sqrt" and s[j:j + 1] == "[":
                k = s.find("]", j)
                if k < 0:
                    return None
                root, j = s[j + 1:k], k + 1
            if s[j:j + 1] != "{" or (k := _match_brace(s, j)) is None:
                return None
            a = s[j + 1:k]
            if cmd == "\\frac":
                if s[k + 1:k + 2] != "{" or (k2 := _match_brace(s, k + 1)) is None:
                    return None
                rep, k = f"(({a})/({s[k + 2:k2]}))", k2
            else:
                rep = f"(({a})**(1/({root})))" if root else f"sqrt({a})"
            s = s[:i] + rep + s[k + 1:]
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    if re.search(r"[^\w+\-*/(). ]", s) or "__" in s or re.search(r"\.(?!\d)", s):
        return None

    def ident(m):
        w = m.group()
        if w in _FUNCS or re.fullmatch(r"[a-zA-Z](?:_\d+)?", w):
            return w
        return "*".join(w) if w.isalpha() else "@"  # "xy" -> x*y; anything else poisons it
    s = re.sub(r"[a-zA-Z_]\w*", ident, s)
    s = re.sub(r"(?<=[\d)])(?=[a-zA-Z(])", "*", s)  # implicit products: 2pi, 2(x+1), (a)(b)
    return None if "@" in s else s


def _eval_num(node):
    """Float value of a parsed expression of numbers, + - * / **, pi and sqrt; raises otherwise."""
    if isinstance(node, ast.Expression):
        return _eval_num(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_num(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" \
            and len(node.args) == 1 and not node.keywords:
        return math.sqrt(_eval_num(node.args[0]))
    if isinstance(node, ast.BinOp):
        a, b = _eval_num(node.left), _eval_num(node.right)
        # floats only: a ** b is constant time (OverflowError past 1e308, never a huge integer)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b, ast.Pow: lambda: a ** b}
        v = ops[type(node.op)]()
        if isinstance(v, complex):
            raise ValueError("complex")
        return v
    raise ValueError(f"not numeric: {ast.dump(node)}")


def _number(s):
    """The numeric value of a normalised answer, or None."""
    py = _to_py(s)
    if not py:
        return None
    try:
        v = _eval_num(ast.parse(py, mode="eval"))
        return v if math.isfinite(v) else None
    except Exception:  # syntax, domain, overflow, unknown node: simply not a number
        return None


_SYMPY = None


def _sympy():
    """The sympy module and its parser, imported on first use; False when not installed."""
    global _SYMPY
    if _SYMPY is None:
        try:
            import sympy
            from sympy.parsing import sympy_parser as sp
            _SYMPY = (sympy, sp.parse_expr,
                      sp.standard_transformations + (sp.implicit_multiplication_application,))
        except Exception:
            _SYMPY = False
    return _SYMPY


def _symbolic_equal(a, b, rel_tol):
    """Equality through sympy: both sides parsed, then compared numerically at a few fixed points
    (cheap, no simplify, so no timeout needed). False when sympy is missing or either side fails."""
    lib = _sympy()
    pa, pb = _to_py(a), _to_py(b)
    if not lib or not pa or not pb or len(pa) + len(pb) > 200:
        return False
    sympy, parse_expr, tf = lib
    try:
        names = {w: sympy.Symbol(w) for w in re.findall(r"[a-zA-Z](?:_\d+)?", pa + " " + pb)
                 if w not in _FUNCS}
        names.update(pi=sympy.pi, sqrt=sympy.sqrt, ln=sympy.log, log=sympy.log, exp=sympy.exp,
                     sin=sympy.sin, cos=sympy.cos, tan=sympy.tan)
        # evaluate=False: "9^{9^{9}}" must not be expanded to an exact integer (that never ends);
        # evalf below works in floating point, whatever the size
        ea = parse_expr(pa, local_dict=dict(names), transformations=tf, evaluate=False)
        eb = parse_expr(pb, local_dict=dict(names), transformations=tf, evaluate=False)
        syms = sorted(ea.free_symbols | eb.free_symbols, key=str)
        if len(syms) > 4:
            return False
        for trial in ((0.37, 1.21, 2.03, 0.59), (1.73, 0.41, 0.83, 2.57), (2.9, 1.6, 0.23, 1.1)):
            sub = dict(zip(syms, trial))
            va, vb = complex(ea.evalf(subs=sub)), complex(eb.evalf(subs=sub))
            d = abs(va - vb)  # inf or nan when either side overflows: never a match
            if not (math.isfinite(d) and d <= rel_tol * max(abs(va), abs(vb)) + 1e-12):
                return False
        return True
    except Exception:  # parse errors, TypeError from non-numeric results, ...
        return False


def _num_close(x, y, rel_tol, exact_int):
    return x == y if exact_int else math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12)


def is_equiv(pred, gold, rel_tol: float = 1e-4) -> bool:
    """Is the predicted answer equal to the gold one? In order: normalised strings equal; text-only
    answers equal ignoring case; sequences element by element (same brackets, ordered; a bare list
    "1, 2" is compared as a multiset, being a list of solutions); numbers (integers exactly,
    everything else with relative tolerance; a side written with % also matches its value / 100,
    so "50\\%" == "50" == "0.5"); then sympy, when installed, for symbolic expressions."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    if not re.search(r"[\d\\]", a + b) and a.lower() == b.lower():
        return True
    sa, sb = _split_seq(a), _split_seq(b)
    if sa or sb:
        if not (sa and sb) or sa[0] != sb[0] or len(sa[1]) != len(sb[1]):
            return False
        if sa[0]:
            return all(is_equiv(x, y, rel_tol) for x, y in zip(sa[1], sb[1]))
        rest = list(sb[1])
        for x in sa[1]:
            hit = next((i for i, y in enumerate(rest) if is_equiv(x, y, rel_tol)), None)
            if hit is None:
                return False
            rest.pop(hit)
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        exact = bool(re.fullmatch(r"[-+]?\d+", a) and re.fullmatch(r"[-+]?\d+", b))
        pa, pb = "%" in str(pred), "%" in str(gold)
        return (_num_close(x, y, rel_tol, exact) or (pa and _num_close(x / 100, y, rel_tol, False))
                or (pb and _num_close(x, y / 100, rel_tol, False)))
    return _symbolic_equal(a, b, rel_tol)


def grade(response_text: str, gold) -> bool:
    """Correctness of a response: its last boxed answer against the gold answer."""
    return is_equiv(extract_boxed(response_text), gold)


# -----------------------------------------------------------------------------
# Metrics over sampled answers (eval.py, grpo.py)

def sample_metrics(samples, wall_s):
    """samples: [(Sample, gold answer)] (duck-typed: .text, .finish_reason, .stats); wall_s: generation
    wall time. -> avg accuracy, format validity, trigger rate (a fork into >= 2 branches; for serial
    decoding: a block with >= 2 steps in the text), branches per fork, tokens/s over every branch
    token, time-to-answer, total/critical-path tokens, finish reasons. eval.py documents each."""
    n = max(len(samples), 1)
    forks = [b for s, _ in samples for b in s.stats["branches_per_fork"]]
    total = sum(s.stats["total_tokens"] for s, _ in samples)
    crit = sum(s.stats["critical_path_tokens"] for s, _ in samples)
    triggered = [any(b >= 2 for b in s.stats["branches_per_fork"]) or (not s.stats["forks"] and is_parallel(s.text))
                 for s, _ in samples]
    valid = [s.finish_reason == "eos" and format_score(s.text)[0] == 0.0 for s, _ in samples]
    return dict(
        samples=len(samples),
        accuracy=sum(grade(s.text, a) for s, a in samples) / n,
        format_valid=sum(valid) / n, trigger_rate=sum(triggered) / n,
        branches_per_fork=sum(forks) / len(forks) if forks else 0.0,
        tokens_per_s=total / wall_s if wall_s else 0.0,
        time_to_answer_s=sum(s.stats["time_s"] for s, _ in samples) / n,
        total_over_critical=total / crit if crit else 0.0,
        mean_tokens=total / n, mean_critical_tokens=crit / n,
        finish={r: sum(s.finish_reason == r for s, _ in samples) / n
                for r in sorted({s.finish_reason for s, _ in samples})},
    )
