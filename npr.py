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
format_score -> token_layout -> metrics. Answer extraction and equivalence live in grading.py
(re-exported here: npr.grade, npr.is_equiv, npr.extract_boxed, npr.normalize_answer).
"""
import re
from bisect import bisect_right
from dataclasses import dataclass, field

from grading import extract_boxed, grade, is_equiv, normalize_answer  # noqa: F401  (re-exported)

TAGS = ("<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>")
# the sub-word name of each tag: a new tag token's embedding row starts as the mean of the
# embeddings of the tokens of this name (NPR.md section 4, stage 2b)
TAG_NAMES = {t: t[1:-1] for t in TAGS}
TAG_RE = re.compile(r"</?(?:guideline|plan|step|takeaway)>")
_MAX_TAG = max(len(t) for t in TAGS)

# The texts the parallel engine forces (sampler.py), defined once: SFT puts its trajectories into the
# same bytes (engine_pieces), so it teaches exactly the tokens and positions the engine produces.
STEP_HEADER = "<step>\n{n}:"       # opens branch n (n = its plan's number)
TAKEAWAY_HEADER = "<takeaway>\n"   # opens the trunk after the join
SEPARATOR = "\n"                   # after </guideline> and after each </step> (unless the token ended in whitespace)

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
    Returns (tag, index of its '<') in order. Works whether tags arrive as one added token or as
    several plain-text pieces ("<st", "ep>"): the sampler calls it after appending each piece."""
    lo = max(0, start - _MAX_TAG + 1)  # a tag ending at >= start begins at >= start - 11
    return [(m.group(), m.start()) for m in TAG_RE.finditer(text, lo) if m.end() > start]


_PLAN_NUM_RE = re.compile(r"<plan>\s*(\d+(?:\.\d+)*)\s*:")


def plan_numbers(guideline_text: str) -> list[str]:
    """Numbers of the plans that open with "N:" ("1:", "2:", "1.1:"); len() is the fork width k."""
    return _PLAN_NUM_RE.findall(guideline_text)


_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_HEADER_RE = re.compile(r"\s*(\d+(?:\.\d+)*)\s*:")


def sibling_numbers(text: str, question: str = "") -> list[tuple[int, int, str]]:
    """Results a step can only have read in an earlier sibling step: (block, step, number), both
    counted from 1. A step's result is the last number it writes; a later step of the same block that
    writes it too (its "N:" header aside) is flagged unless the number also appears where that step
    may look: the question and the text before the block's first <step> (earlier blocks, the
    guideline). Serial decoding lets step 2 read step 1 ("2: 17*6=102. 92+102=194" takes 92, step
    1's result); branch-isolated decoding cannot, so training on such a step teaches the model to
    guess. A later step that happens to compute the same number on its own is flagged too; results of
    one digit are ignored (too common to tell)."""
    found = []
    blocks, _ = _scan(text)
    for bi, blk in enumerate(blocks, 1):
        if not blk.steps:
            continue
        seen = set(_NUMBER_RE.findall(question)) | set(_NUMBER_RE.findall(text[:blk.steps[0][0]]))
        results = set()                               # the earlier steps' results
        for si, (_, _, a, b) in enumerate(blk.steps, 1):
            body = text[a:b].replace("<step>", "", 1)
            body = body[m.end():] if (m := _HEADER_RE.match(body)) else body
            nums = _NUMBER_RE.findall(body)
            found += [(bi, si, n) for n in dict.fromkeys(nums) if n in results and n not in seen]
            results |= {n for n in nums[-1:] if len(n) > 1}     # single digits are everywhere: not evidence
    return found


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


def engine_pieces(text: str, max_branches: int = 5) -> tuple[list[str] | None, str | None]:
    """A well-formed response as the parallel engine writes it -> (pieces, None), else (None, why).
    The forced texts are pieces of their own (encode each piece alone, as the engine does), so the
    tokens are the engine's. Whitespace after </guideline>, between steps and before <takeaway>
    becomes one SEPARATOR; each step opens with STEP_HEADER of its plan's number (a step numbered
    otherwise is rejected); <takeaway> becomes TAKEAWAY_HEADER (one newline of the text it replaces).
        '<guideline>..</guideline><step>1: a</step> <step> 2 : b</step><takeaway>c'
     -> '<guideline>..</guideline>' '\\n' '<step>\\n1:' ' a</step>' '\\n' '<step>\\n2:' ' b</step>' '\\n' '<takeaway>\\n' 'c'"""
    blocks, problems = _scan(text, max_branches)
    if problems:
        return None, problems[0]
    pieces, at = [], 0
    for bi, blk in enumerate(blocks, 1):
        numbers = plan_numbers(text[blk.guide[0]:blk.guide[1]])
        pieces += [text[at:blk.guide[1] + len("</guideline>")], SEPARATOR]
        for si, (_, end, a, b) in enumerate(blk.steps):
            m = _HEADER_RE.match(text, a, b)
            if not m or m.group(1) != numbers[si]:
                return None, f"block {bi} step {si + 1} does not open with its plan's number {numbers[si]}:"
            pieces += [STEP_HEADER.format(n=numbers[si]), text[m.end():end], SEPARATOR]
        at = blk.take[0] + text.startswith("\n", blk.take[0])
        pieces.append(TAKEAWAY_HEADER)
    pieces.append(text[at:])
    return [p for p in pieces if p], None


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
# Metrics over sampled answers (eval.py, grpo.py)

def sample_metrics(samples, wall_s):
    """samples: [(Sample, gold answer)] (duck-typed: .text, .finish_reason, .stats); wall_s: generation
    wall time. -> avg accuracy, format validity, trigger rate, branches per fork, tokens/s over every
    branch token, time-to-answer, total/critical-path tokens, finish reasons. eval.py documents each.
    Trigger: a parallel-mode sample counts only when the engine forked into >= 2 branches (a block
    written serially near the budget does not); a serial-mode sample (stats["mode"] == "serial")
    when its text holds a block with >= 2 steps, i.e. would have forked."""
    n = max(len(samples), 1)
    forks = [b for s, _ in samples for b in s.stats["branches_per_fork"]]
    total = sum(s.stats["total_tokens"] for s, _ in samples)
    crit = sum(s.stats["critical_path_tokens"] for s, _ in samples)
    triggered = [is_parallel(s.text) if s.stats.get("mode") == "serial"
                 else any(b >= 2 for b in s.stats["branches_per_fork"]) for s, _ in samples]
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
