"""
What a script's run needs around its stage, shared by the scripts (distill, sft, grpo, eval, serve,
toy, table): its flags (a Config dataclass -> --kebab-case flags, a value outside its choices and
other errors as one line), the learning-rate schedule of sft and grpo, the problem files it reads
(and whether their prompts fit the model's context), what it writes (atomic files, JSON-lines files
and logs, the lock on its output) and its processes under torchrun (torch.distributed).
Checkpoints, and the start of a training run from one, are checkpoint.py's; the prompt is npr.py's.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys

import torch

import npr
from hf_files import writing


# -----------------------------------------------------------------------------
# Config -> CLI

def parse_cli(cls, argv=None):
    """Every field of the dataclass `cls` becomes a --kebab-case flag of the field's type (bools as
    --flag / --no-flag; one-letter fields also as -x); each field's inline comment is its help.
    Parsing the real command line (argv None) also installs `one_line_errors`, unless --debug or
    NPR_DEBUG=1 asks for tracebacks."""
    comments = {}
    try:
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    except (OSError, TypeError):
        pass
    ap = argparse.ArgumentParser(description=(inspect.getmodule(cls).__doc__ or "").strip().split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-")] + (["-" + f.name] if len(f.name) == 1 else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = comments.get(f.name, " ").replace("%", "%%")
        if f.type in (bool, "bool"):
            ap.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(*flags, type=typ if callable(typ) else str, default=default, help=help_)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also NPR_DEBUG=1)")
    args = vars(ap.parse_args(argv))
    debug = args.pop("debug") or os.environ.get("NPR_DEBUG") == "1"
    if argv is None and not debug:
        sys.excepthook = one_line_errors
    return cls(**args)



def check_choices(cfg, choices):
    """Refuse a field outside its choices (choices: field name -> the values it may take), naming its flag."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")

def one_line_errors(typ, err, tb):
    """Errors about the user's inputs print as one line and exit 1: ValueError (a bad value, file
    content or field: every such error here names the file, field or line) and OSError (a missing or
    unreadable file, a full disk). Any other exception is a bug: full traceback."""
    if issubclass(typ, (ValueError, OSError)):
        msg = " ".join(str(err).split())
        print(f"error: {msg} (--debug or NPR_DEBUG=1 for the traceback)", file=sys.stderr)
    else:
        sys.__excepthook__(typ, err, tb)


def print_config(cfg):
    print("config | " + " | ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()), flush=True)


# -----------------------------------------------------------------------------
# The learning-rate schedule of sft.py and grpo.py

def warmup_cosine(step, total, warmup, lr, floor):
    """The learning rate at `step` (from 0; sft.py: an optimizer step, grpo.py: a rollout batch): linear
    warm-up over `warmup` steps, then cosine from lr down to lr x floor at step `total` (sft.py's
    schedule; grpo.py's --lr-schedule cosine; toy.py's base model has its own)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# Problems: JSONL or JSON, our fields or the ORZ-math collection's layout

class Problem(dict):
    """One problem's fields (a dict), and `where` it is: "path:line" (a JSON list: "path: item n"),
    for the errors that come later (a prompt too long for the model's context)."""
    where = ""


def read_problems(path, question_field="question", answer_field="answer", needs=(), may=()):
    """-> list of Problem {"question", "answer", ...}. Accepts JSONL (one object per line), a JSON list,
    and the ORZ layout: [{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}].
    The question must be a non-empty string, the answer one or a number (str(None) would grade
    \\boxed{None} as right); `needs` names more fields that must be strings, `may` fields that may
    also be null. A malformed line raises ValueError naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            line = f.read(e.start).count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}): expected JSONL or JSON, "
                         "is this a binary file?") from None
    items = None
    if text.lstrip().startswith("["):
        try:
            items = [(f"{path}: item {i + 1}", x) for i, x in enumerate(json.loads(text))]
        except json.JSONDecodeError:
            items = None  # a JSONL file whose first line is itself a list (ORZ rows): parse by line
    if items is None:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}): {line[:80]!r}") from None

    out = []
    for where, x in items:
        if isinstance(x, list) and len(x) >= 2 and isinstance(x[0], dict) and x[0].get("from") == "human":
            try:
                q, a = x[0]["value"], x[1]["ground_truth"]["value"]
            except (KeyError, TypeError):
                raise ValueError(f"{where}: ORZ row without human value / ground_truth.value") from None
            p = Problem(question=field_text(where, "'value' of the human turn", q),
                        answer=field_text(where, "'ground_truth.value'", a, number=True))
        elif isinstance(x, dict) and question_field in x and answer_field in x:
            p = Problem(x, question=field_text(where, repr(question_field), x[question_field]),
                        answer=field_text(where, repr(answer_field), x[answer_field], number=True))
            for name in needs + may:
                if name not in x and name in needs:
                    raise ValueError(f"{where}: {name!r} is missing")
                v = x.get(name)
                if not isinstance(v, str) and not (v is None and name in may):
                    raise ValueError(f"{where}: {name!r} must be a string{' (or null)' if name in may else ''}, "
                                     f"got {json.dumps(v)[:80]}")
        else:
            raise ValueError(f"{where}: expected an object with {question_field!r} and {answer_field!r} "
                             f"(see --question-field/--answer-field) or an ORZ row, got: {str(x)[:80]!r}")
        p.where = where
        out.append(p)
    if not out:
        raise ValueError(f"{path}: no problems found")
    return out


def field_text(where, name, v, number=False):
    """A question or answer field as text: a non-empty string, or (number) a finite int or float, as str."""
    if isinstance(v, str) and v.strip():
        return v
    if number and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return str(v)
    raise ValueError(f"{where}: {name} must be a non-empty string{' or a number' if number else ''}, "
                     f"got {json.dumps(v)[:80]}")


def check_context(problems, tok, instruction, max_new_tokens, model):
    """Refuse problems whose prompt + max_new_tokens does not fit the model's context (config.json
    max_position_embeddings; none given: no check): positions past it were never trained (serve.py
    answers such a request 400). The error names their lines; they are refused, not skipped, so that
    eval's denominator and distill's problem indices (its resume state) never depend on the budget."""
    ctx = model.config.raw.get("max_position_embeddings")
    if not ctx:
        return
    over = {}                                          # where -> tokens (grpo's eval problems are often the same)
    for p in problems:
        n, exact = prompt_length(tok, p["question"], instruction, ctx - max_new_tokens)
        if n + max_new_tokens > ctx:
            over.setdefault(getattr(p, "where", "a problem"), (n, exact))
    if over:
        (where, (n, exact)), more = next(iter(over.items())), list(over)[1:]
        also = f"; so do {len(more)} more ({', '.join(more[:5])}{', ...' if len(more) > 5 else ''})" if more else ""
        raise ValueError(f"{where}: the prompt has {'' if exact else 'at least '}{n} tokens; with --max-new-tokens "
                         f"{max_new_tokens} that is {n + max_new_tokens} positions, more than the model's context "
                         f"{ctx} (max_position_embeddings){also}: shorten or remove them, or lower --max-new-tokens")


def prompt_length(tok, question, instruction, limit, piece=1 << 16):
    """-> (len(npr.chat_prompt(...)), True); or, for a question of megabytes that clearly holds more than
    `limit` tokens, (a lower bound past it, False), found early (tokenizing 20 MB whole takes ~20 s and
    5 GB): its pieces are counted one by one, less 16 tokens per piece for what a cut can add."""
    if len(question) > piece:
        n = 0
        for i in range(0, len(question), piece):
            n += max(0, len(tok.encode(question[i:i + piece])) - 16)
            if n > limit:
                return n, False
    return len(npr.chat_prompt(tok, question, instruction)), True


# -----------------------------------------------------------------------------
# Outputs: files written whole, JSON-lines files and logs, the output's lock

def atomic_write(path, text):
    """Replace `path` with `text` (a str or an iterable of lines) so that a kill, a full disk or Ctrl-C
    at any moment leaves the old content or the new, never a torn or empty file: a temp file in the
    same folder, flushed and fsynced, then os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text if isinstance(text, str) else "".join(text))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class JsonlLog:
    """Append one JSON object per line (opened per write: a crash loses at most one record)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def log(self, **rec):
        """The step's record: appended here and printed as one `|`-separated line (above any tqdm bar)."""
        from tqdm import tqdm
        self.write(**rec)
        tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    def truncate_after(self, step):
        """Keep the records of steps <= step (a resumed run redoes the later ones); drop torn lines."""
        if os.path.isfile(self.path):
            atomic_write(self.path, (json.dumps(x) + "\n" for x in read_jsonl(self.path) if x.get("step", 0) <= step))


def append_lines(path, lines):
    """Append whole lines (distill.py's outputs); a torn last line left by a kill is cut off first (its
    chunk is redone)."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    with writing(path), open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def read_jsonl(path):
    """The records of a JSON-lines file (none when it does not exist); a torn line (a kill in the
    middle of a write) is skipped."""
    out = []
    if os.path.isfile(path):
        for line in open(path):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


_LOCKS = {}   # the lock files this process holds (real path -> open file), until it ends


def lock_output(lock_path, rank=0, world=1):
    """Hold lock_path (an --out-dir's .lock, distill's <out>.lock) for the rest of this process, so
    that a second run on the same output is refused, naming the holder, instead of both truncating
    each other's metrics.jsonl and removing each other's saves. flock: the kernel drops the lock when
    its process ends, kill -9 included; this process may take it again (a second main() in one
    process). Under torchrun rank 0 holds it and every rank learns whether it got it."""
    import fcntl
    import socket
    busy = None
    real = os.path.realpath(lock_path)
    if rank == 0 and real not in _LOCKS:
        os.makedirs(os.path.dirname(real), exist_ok=True)
        f = open(real, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n")
            f.flush()
            _LOCKS[real] = f
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"   # (one that has not yet written its name)
            f.close()
            output = lock_path[:-len(".lock")].rstrip("/") or "."
            busy = f"{output} is in use by {holder} (it holds {lock_path}): wait for that run to end, or choose " \
                   "another output"
    if world > 1:
        busy = all_gather(busy, world)[0]
    if busy:
        raise OSError(busy)


# -----------------------------------------------------------------------------
# torch.distributed (launched by torchrun; a plain `python X.py` is world size 1)

def wrap_distributed(model, world, fsdp):
    """The module a training stage runs forward/backward through: under torchrun FSDP2 (fsdp:
    `fully_shard` on each layer, then the whole, in place) or DDP; one process: the model itself."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)


def accumulating(train_model, last):
    """Context of one micro-batch's backward: DDP all-reduces the gradients only on the last one
    (FSDP2 and one process: nothing to hold back)."""
    import contextlib
    from torch.nn.parallel import DistributedDataParallel
    if last or not isinstance(train_model, DistributedDataParallel):
        return contextlib.nullcontext()
    return train_model.no_sync()


def all_reduce(x, world, op="sum"):
    """The tensor x summed (op "max": maximised) over the ranks, in place."""
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


def all_gather(obj, world):
    """Every rank's `obj` (any picklable value), in rank order."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out



def autocast(device, bf16):
    """bf16 matmuls on CUDA while weights and optimizer state stay fp32: with the paper's learning
    rates (1e-6, 1e-7) a bf16 weight cannot absorb an update (8 bits of mantissa), fp32 can."""
    import contextlib
    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_distributed():
    """-> (rank, world_size, local_rank, device). gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    from datetime import timedelta
    if torch.cuda.is_available():   # long timeout: rank 0 may evaluate alone while the others wait
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timedelta(hours=2))
        dev = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
        dev = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local, dev
