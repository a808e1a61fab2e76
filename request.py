"""
One request while it decodes: its streams, its tokens and NPR's fork/join rules (NPR.md section 5).
The engine (sampler.py) hands each drawn token to its request (Seq.on_token); what the token means
is decided here.

serial mode: ordinary decoding; the tags are just text.
parallel mode: at a trunk's </guideline>, fork one branch per numbered plan (none, or more than
  max_branches: malformed), each opened with npr.STEP_HEADER, all at the same RoPE position. A branch
  ends at </step> (plus its own npr.SEPARATOR). When all have ended, npr.TAKEAWAY_HEADER is forced in
  the trunk at 1 + the largest branch position (npr.Positions). sft.py trains on the same forced texts.
  Near the budget (fewer than fork_min_tokens of it left) the block's steps stay serial in the trunk.
Each stream draws from its own torch.Generator, so a sample does not depend on its batch.
"""
import time
from dataclasses import dataclass, field

import torch

import npr


# A temperature below this is greedy: logits / T overflows fp32 near T = 1e-38 (the softmax turns NaN),
# and long before that the draw is an argmax anyway (vLLM uses the same cut-off).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    mode: str = "parallel"           # "serial" | "parallel"
    temperature: float = 1.0         # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    max_new_tokens: int = 512        # the token budget, counted as `budget` says
    budget: str = "total"            # "total": all tokens of all branches (official engine; OpenAI's max_tokens)
                                     # "critical": the critical path (longest chain of dependent tokens)
    max_total_tokens: int = 0        # budget "critical": cap on all tokens (0 = max_branches x max_new_tokens)
    max_branches: int = 5            # more numbered plans than this ends the sample as malformed
    fork_min_tokens: int = 64        # fork only while at least this many tokens of the budget remain (official: 1024)
    repetition_penalty: float = 1.0  # inside branches only (official engine: 1.02)
    seed: int = 0


def resolved(p):
    """Checked params, with the cap on all tokens (max_total_tokens) filled in and a greedy temperature made 0."""
    if p.mode not in ("serial", "parallel"):
        raise ValueError(f"mode must be 'serial' or 'parallel', not {p.mode!r}")
    if p.budget not in ("total", "critical"):
        raise ValueError(f"budget must be 'total' or 'critical', not {p.budget!r}")
    if p.budget == "total":
        total = p.max_new_tokens
    else:
        total = p.max_total_tokens or p.max_new_tokens * (p.max_branches if p.mode == "parallel" else 1)
    temperature = p.temperature if p.temperature >= GREEDY_BELOW else 0.0
    return SamplingParams(**{**p.__dict__, "max_total_tokens": total, "temperature": temperature})


@dataclass
class Token:
    """One response token, as the trainer reads it (NPR.md section 3)."""
    id: int
    sampled: bool      # drawn from the model (False: forced by the engine)
    logprob: float     # log p(id) under the model; 0.0 for forced tokens
    block: int
    branch: int
    pos: int           # RoPE position


@dataclass
class Sample:
    prompt_ids: list
    ids: list = field(default_factory=list)       # response tokens, canonical order
    block: list = field(default_factory=list)     # per token, NPR.md section 3
    branch: list = field(default_factory=list)
    pos: list = field(default_factory=list)       # RoPE positions (the prompt holds 0..P-1)
    sampled: list = field(default_factory=list)   # True: drawn from the model; False: forced by the engine
    logprobs: list = field(default_factory=list)  # log p(token) under the model (0.0 for forced tokens)
    finish_reason: str = ""                       # "eos" | "budget" | "malformed: <why>" | "cancelled"; "" running
    text: str = ""                                # the response text, without the final stop token
    stats: dict = field(default_factory=dict)


class Stream:
    """One segment of a response that decodes as one line: the trunk between forks, or one branch."""

    def __init__(self, block, branch, gen, positions):
        self.block, self.branch = block, branch
        self.gen = gen         # its random draws: the row's trunk generator, or the branch's own
        self.positions = positions   # the row's npr.Positions: the positions rule, token by token in push order
        self.tokens = []       # its Tokens so far
        self.feed = []         # Tokens not yet written into the KV cache (the next steps' inputs)
        self.text = ""         # decoded text (tag detection works on text, tags special or not)
        self.closed = False    # samples no more (a branch after </step>, a trunk suspended by a fork)

    def push(self, tok, piece, sampled=False, logprob=0.0):
        """Append a token; -> where its text starts in self.text."""
        t = Token(tok, sampled, logprob, self.block, self.branch, self.positions(self.block, self.branch))
        self.tokens.append(t)
        self.feed.append(t)
        self.text += piece
        return len(self.text) - len(piece)


class Seq:
    """One request (one prompt decoded into one Sample): its prompt, params and seed, its streams, and
    the rules that turn each drawn token into forks, joins and an end. tok (the Tokenizer) is what the
    rules read tags with."""

    def __init__(self, prompt, params, seed, index=0, tok=None):
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        self.prompt, self.p, self.seed, self.index, self.tok = list(prompt), resolved(params), seed, index, tok
        self.positions = npr.Positions(len(self.prompt))
        self.trunk = Stream(0, 0, row_generator(seed), self.positions)   # each branch has its own generator
        self.streams = [self.trunk]     # every segment, canonical order: trunk, step 1 .. step k, trunk, ...
        self.live = [self.trunk]        # the streams that still sample or feed, in the same order
        self.fork = []                  # the branches of the open fork
        self.forks = []                 # branches per fork
        self.row = None                 # its KV-cache row while running
        self.too_big_since = None       # the engine step it first needed more room than the cache had (waiting)
        self.next_slot = len(self.prompt)
        self.finish = None              # why it ended, once it has
        self.total = self.crit = 0      # tokens so far: all of them / on the critical path
        self.blocks = 0                 # guideline blocks opened
        self.guide_start = None         # index in trunk.text where the open guideline starts
        self.unforked = False           # the open block's steps are written serially (budget)
        self.t_start = self.t_end = None

    def room(self):
        """KV-cache slots its worst case needs (a count): prompt, all-token budget, forced tokens, scratch slot."""
        return len(self.prompt) + self.p.max_total_tokens + 16 * (self.p.max_branches + 2) + 1

    def to_feed(self):
        """The (Token, Stream) pairs to write this step, in slot order: the next pending token of each
        stream. Slot order stays causal across a fork and a join: the streams go in groups (trunk, the
        branches of a fork, the trunk after the join) and a group waits while an earlier one still has
        tokens left after this step."""
        out, left, kind = [], False, None
        for st in self.live:
            if not st.feed:
                continue
            if (st.branch > 0) != kind:             # a new group: it waits for the earlier ones
                if left:
                    break
                kind = st.branch > 0
            out.append((st.feed[0], st))
            left = left or len(st.feed) > 1
        return out

    # ---- the rules -------------------------------------------------------------------------------
    def on_token(self, st, tok, logp, stop):
        """Record a token drawn for stream st and apply the rules to it (stop: it is a stop token)."""
        p = self.p
        start = st.push(tok, self.tok.decode_piece(tok), True, logp)
        self.count()
        if stop:
            return self.end("malformed: eos inside a step" if st.branch else "eos")
        if p.mode == "parallel":
            for tag, at in npr.new_tags(st.text, start):
                if st.branch:
                    self.on_branch_tag(st, tag)
                else:
                    self.on_trunk_tag(st, tag, at)
                if self.finish or st.closed:
                    break
        if self.finish is None and (self.total >= p.max_total_tokens or self.crit >= p.max_new_tokens):
            self.end("budget")

    def on_trunk_tag(self, st, tag, at):
        if tag == "<guideline>":
            if self.guide_start is not None:
                return self.end("malformed: guideline nested in a guideline")
            self.blocks += 1
            st.block = st.tokens[-1].block = self.blocks
            self.guide_start, self.unforked = at, False
        elif tag == "</guideline>":
            if self.guide_start is None:
                return self.end("malformed: </guideline> without <guideline>")
            numbers = npr.plan_numbers(st.text[self.guide_start:at])
            self.guide_start = None
            if not numbers:
                return self.end("malformed: guideline with 0 numbered plans")
            if len(numbers) > self.p.max_branches:
                return self.end(f"malformed: {len(numbers)} plans > cap {self.p.max_branches}")
            self.open_fork(numbers)
        elif tag == "<step>" and not self.unforked:
            return self.end("malformed: <step> outside a fork")
        elif tag == "</takeaway>":
            st.block = 0

    def on_branch_tag(self, st, tag):
        if tag == "</step>":
            st.closed = True
            if not st.text[-1:].isspace():       # keep one trailing separator, owned by the branch
                self.force(st, npr.SEPARATOR)
            if all(s.closed for s in self.fork):
                self.join()
        else:
            self.end(f"malformed: {tag} inside a step")

    def open_fork(self, numbers):
        """One branch per numbered plan, all at the position after the trunk's last token."""
        p = self.p
        # too close to a budget the steps stay serial in the trunk, as in the official engine (fork_min_tokens)
        if min(p.max_total_tokens - self.total, p.max_new_tokens - self.crit) < p.fork_min_tokens:
            self.unforked = True
            return
        if not self.trunk.text[-1:].isspace():   # the separator before the first step is the trunk's,
            self.force(self.trunk, npr.SEPARATOR)  # as in training text ("</guideline>\n<step>")
        self.forks.append(len(numbers))
        self.trunk.closed = True                                    # suspended until the join
        self.fork = [Stream(self.blocks, i, branch_generator(self.seed, self.blocks, i), self.positions)
                     for i in range(1, len(numbers) + 1)]
        for st, n in zip(self.fork, numbers):
            self.force(st, npr.STEP_HEADER.format(n=n))
        self.streams += self.fork
        self.live += self.fork
        self.count()

    def join(self):
        """All branches closed: the takeaway opens in the trunk at 1 + the largest branch position."""
        trunk = Stream(self.blocks, 0, self.trunk.gen, self.positions)
        trunk.text = self.trunk.text                                # tag state continues from the old trunk
        self.force(trunk, npr.TAKEAWAY_HEADER)
        self.trunk = trunk
        self.streams.append(trunk)                                  # after the branches' pending tokens
        self.live.append(trunk)
        self.count()

    def force(self, st, text):
        """Forced tokens (not sampled, log-prob 0): a forced text, encoded on its own."""
        for t in self.tok.encode(text):
            st.push(t, self.tok.decode_piece(t))

    def end(self, reason):
        if self.finish is None:
            self.finish, self.t_end = reason, time.perf_counter()

    def count(self):
        """Token totals: all tokens, and the critical path (each fork counts its longest branch)."""
        total = crit = longest = 0
        for st in self.streams:
            total += len(st.tokens)
            if st.branch:
                longest = max(longest, len(st.tokens))
            else:
                crit, longest = crit + longest + len(st.tokens), 0
        self.total, self.crit = total, crit + longest

    def to_sample(self):
        """Its Sample: at its end, or a snapshot while it runs (finish_reason "", time so far)."""
        toks = [t for st in self.streams for t in st.tokens]
        col = lambda name: [getattr(t, name) for t in toks]
        s = Sample(prompt_ids=self.prompt, ids=col("id"), sampled=col("sampled"), logprobs=col("logprob"),
                   block=col("block"), branch=col("branch"), pos=col("pos"), finish_reason=self.finish or "")
        s.text = self.tok.decode(s.ids[:-1] if self.finish == "eos" else s.ids)   # without the stop token
        end = self.t_end if self.t_end is not None else time.perf_counter()     # running: the time so far
        s.stats = dict(mode=self.p.mode, total_tokens=len(toks), critical_path_tokens=self.crit, forks=len(self.forks),
                       branches_per_fork=list(self.forks),
                       time_s=(end - self.t_start) if self.t_start is not None else 0.0)
        return s


def row_generator(seed):
    """A row's own CPU torch.Generator (seeds of any size are folded into 64 bits)."""
    return torch.Generator().manual_seed(seed % 2 ** 64)


def branch_generator(seed, block, branch):
    """Branch `branch` of block `block` of the row seeded `seed` draws from its own generator, so
    its tokens do not depend on the steps at which it and its siblings are scheduled."""
    return row_generator(seed * 0x9E3779B97F4A7C15 + block * 1000003 + branch)
