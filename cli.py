"""
Shared plumbing of the stage scripts (distill, sft, grpo, eval, serve): dataclass -> command-line
flags, reading problem files, JSON-lines logs, checkpoints in the HF layout, the start of a training
run, grpo's rollout copy of the weights, torch.distributed. Nothing here knows about the method; the
method lives in npr.py and the scripts.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys

import torch

INSTRUCTION_FILE = "npr_instruction.txt"  # a checkpoint's own instruction (the built-in default has one)


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
# Problems: JSONL or JSON, our fields or the ORZ-math collection's layout

def read_problems(path, question_field="question", answer_field="answer"):
    """-> list of {"question", "answer"}. Accepts JSONL (one object per line), a JSON list, and
    the ORZ layout: [{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}].
    A malformed line raises ValueError naming the file and line."""
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
            items = [(i + 1, x) for i, x in enumerate(json.loads(text))]
        except json.JSONDecodeError:
            items = None  # a JSONL file whose first line is itself a list (ORZ rows): parse by line
    if items is None:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}): {line[:80]!r}") from None
    out = []
    for n, x in items:
        if isinstance(x, list) and len(x) >= 2 and isinstance(x[0], dict) and x[0].get("from") == "human":
            try:
                out.append({"question": x[0]["value"], "answer": str(x[1]["ground_truth"]["value"])})
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{n}: ORZ row without human value / ground_truth.value") from None
        elif isinstance(x, dict) and question_field in x and answer_field in x:
            out.append({**x, "question": x[question_field], "answer": str(x[answer_field])})
        else:
            raise ValueError(f"{path}:{n}: expected an object with {question_field!r} and {answer_field!r} "
                             f"(see --question-field/--answer-field) or an ORZ row, got: {str(x)[:80]!r}")
    if not out:
        raise ValueError(f"{path}: no problems found")
    return out


def instruction_for(model_dir, override=""):
    """The NPR instruction to prompt with: an explicit override, else the checkpoint's own
    (npr_instruction.txt, written by the built-in default), else npr.INSTRUCTION."""
    import npr
    if override:
        return override
    p = os.path.join(model_dir, INSTRUCTION_FILE)
    if os.path.isfile(p):
        with open(p) as f:
            return f.read().strip()
    return npr.INSTRUCTION


def chat_prompt(tok, question, instruction):
    import npr
    # a hybrid Qwen3 runs in non-thinking mode: the NPR format takes the place of the think block
    return tok.encode(tok.render_chat([{"role": "user", "content": npr.build_prompt(question, instruction)}],
                                      enable_thinking=False))


# -----------------------------------------------------------------------------
# Logs and checkpoints

def atomic_write(path, text):
    """Replace `path` with `text` (a str or an iterable of lines) so that a kill, a full disk or Ctrl-C
    at any moment leaves the old content or the new, never a torn or empty file: a temp file in the
    same folder, flushed and fsynced, then os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text if isinstance(text, str) else "".join(text))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_tree(path):
    """Flush every file of a folder (and the folder) to disk before it is renamed into place."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_lines(path, lines):
    """Append whole lines; a torn last line left by a kill is cut off first (its chunk is redone)."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as f:
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
        if not os.path.isfile(self.path):
            return
        keep = []
        for line in open(self.path):
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
        atomic_write(self.path, keep)


# Files a checkpoint carries besides config.json and the weights (name prefixes): tokenizer and
# generation settings that transformers, vLLM & co. read (generation_config.json holds the eos ids
# generate() stops at and the sampling defaults; vocab.json + merges.txt the slow tokenizer).
SIDE_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
              "generation_config", INSTRUCTION_FILE)


def save_dtype(cfg, src_dir):
    """The dtype a final checkpoint is written in: cfg.save_dtype when set, else the input's
    (config.json dtype / torch_dtype): training keeps fp32 master weights, a bf16 model stays bf16."""
    from checkpoint import read_config
    from model import DTYPES
    name = getattr(cfg, "save_dtype", "")
    if not name and src_dir and os.path.isfile(os.path.join(src_dir, "config.json")):
        d = read_config(src_dir)
        name = d.get("dtype") or d.get("torch_dtype") or ""
    if name and name not in DTYPES:
        raise ValueError(f"unknown save dtype {name!r}: one of {', '.join(DTYPES)}")
    return DTYPES[name] if name else None


def save_checkpoint(model, tok, out_dir, cfg=None, src_dir=None, state_dict=None, dtype=None):
    """HF layout (config.json, safetensors in `dtype` or as they are, tokenizer files) + the run's
    config, into out_dir (other files there, e.g. metrics.jsonl, stay). Every tokenizer/generation
    file of src_dir (SIDE_FILES) comes along; ours then overwrite the ones the tags change.
    Written to a side folder first, then moved in file by file."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if src_dir and os.path.isdir(src_dir):
        for f in os.listdir(src_dir):
            if f.startswith(SIDE_FILES) and os.path.isfile(os.path.join(src_dir, f)):
                shutil.copy(os.path.join(src_dir, f), tmp)
    model.save_pretrained(tmp, state_dict=state_dict, dtype=dtype)
    tok.save_pretrained(tmp)
    if cfg is not None:
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # stale weights from an earlier save would shadow the new ones
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(out_dir, f))
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)


def resume_folders(last_dir):
    """Every folder and link of the resume point `last_dir` (a symlink to `last_dir`.<step>)."""
    parent, base = os.path.split(os.path.abspath(last_dir))
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, f) for f in os.listdir(parent) if f == base or f.startswith(base + ".")]


def save_resume_point(model, tok, opt, last_dir, cfg, src_dir, step, rank, world):
    """A resumable checkpoint: weights in the training dtype (fp32 master weights resume exactly),
    each rank's optimizer state, then train_state.pt, all in a new folder `last_dir`.<step>.partial;
    synced to disk, renamed to `last_dir`.<step>, and only then the symlink `last_dir` is switched to
    it (an atomic rename) and the older saves removed. A kill at any moment leaves `last_dir`
    pointing at the last complete save (os.path.isfile(last_dir/train_state.pt) tells one exists)."""
    import torch.distributed as dist
    state = full_state_dict(model)
    new = f"{last_dir}.{step}"
    part = new + ".partial"
    if rank == 0:
        shutil.rmtree(part, ignore_errors=True)
        save_checkpoint(model, tok, part, cfg, src_dir, state_dict=state)
    if world > 1:
        dist.barrier()
    torch.save(opt.state_dict(), os.path.join(part, f"optimizer.rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        torch.save({"step": step, "world": world}, os.path.join(part, "train_state.pt"))
        fsync_tree(part)
        shutil.rmtree(new, ignore_errors=True)
        os.replace(part, new)
        link = last_dir + ".link"
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.basename(new), link)
        if os.path.isdir(last_dir) and not os.path.islink(last_dir):
            shutil.rmtree(last_dir)  # a plain folder (an older layout): the new save is complete
        os.replace(link, last_dir)
        for p in resume_folders(last_dir):
            if p not in (os.path.abspath(last_dir), os.path.abspath(new)):
                if p.endswith(".partial"):
                    print(f"removed the unfinished save {p}", flush=True)
                shutil.rmtree(p, ignore_errors=True)


def load_resume_point(opt, last_dir, rank, world, device):
    """Restore this rank's optimizer state from save_resume_point; -> the step to continue from."""
    state = torch.load(os.path.join(last_dir, "train_state.pt"), weights_only=False)
    if state["world"] != world:
        raise ValueError(f"{last_dir} was written by {state['world']} ranks; resume with the same number")
    opt.load_state_dict(torch.load(os.path.join(last_dir, f"optimizer.rank{rank}.pt"), map_location=device,
                                   weights_only=False))
    skipped = [p for p in resume_folders(last_dir) if p.endswith(".partial")]
    print(f"resumed from {os.path.realpath(last_dir)} at step {state['step']}"
          + (f" (ignoring the unfinished save {', '.join(skipped)})" if skipped else ""), flush=True)
    return state["step"]


def save_final(model, tok, out_dir, cfg, src_dir, rank, world):
    """The final checkpoint in out_dir, in the input's dtype unless cfg.save_dtype says otherwise
    (every rank gathers under FSDP, rank 0 writes), the resume points removed, the process group closed."""
    import torch.distributed as dist
    state = full_state_dict(model)
    if rank == 0:
        save_checkpoint(model, tok, out_dir, cfg, src_dir, state_dict=state, dtype=save_dtype(cfg, src_dir))
        for p in resume_folders(os.path.join(out_dir, "last")):
            if os.path.islink(p):
                os.remove(p)
            else:
                shutil.rmtree(p, ignore_errors=True)
        print(f"saved {out_dir}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def full_state_dict(model):
    """The unsharded state dict (a collective under FSDP2: every rank must call it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def load_for_sampling(path, device, dtype="", bf16=True):
    """-> (model, tokenizer) for the scripts that only decode (distill, eval, serve). On CUDA with bf16
    and no explicit dtype the weights are loaded in bf16 (fp32 sft/grpo checkpoints too): the
    sampler's CUDA-graph fast path then applies (it does not run under autocast)."""
    from checkpoint import check_vocab
    from model import Qwen
    from tokenizer import Tokenizer
    dt = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if dt is None and bf16 and torch.device(device).type == "cuda":
        dt = torch.bfloat16
    model, tok = Qwen.from_pretrained(path, device=device, dtype=dt), Tokenizer.from_pretrained(path)
    check_vocab(model, tok, path)
    return model, tok


def start_training(cfg):
    """What a training stage (sft, grpo) does first: torch.distributed (under torchrun), CPU threads,
    the seed, the resolved config printed (rank 0), then the model and tokenizer, from the resume point
    cfg.out_dir/last when one exists (and cfg.resume), else from cfg.model; weights in cfg.dtype.
    -> (rank, world, device, model, tokenizer, resuming)"""
    from checkpoint import check_vocab
    from model import DTYPES, Qwen
    from tokenizer import Tokenizer
    rank, world, _, dev = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if rank == 0:
        print_config(cfg)
    last_dir = os.path.join(cfg.out_dir, "last")
    resuming = cfg.resume and os.path.isfile(os.path.join(last_dir, "train_state.pt"))
    src = last_dir if resuming else cfg.model
    model, tok = Qwen.from_pretrained(src, device=dev, dtype=DTYPES[cfg.dtype]), Tokenizer.from_pretrained(src)
    check_vocab(model, tok, src)
    model.attn_impl, model.gradient_checkpointing = cfg.attn_impl, cfg.grad_checkpointing
    return rank, world, dev, model, tok, resuming


def resume_training(opt, cfg, resuming, rank, world, device):
    """-> (the step to continue from, the run's JsonlLog out_dir/metrics.jsonl). Resuming: this rank's
    optimizer state restored from out_dir/last; either way the records past that step are dropped
    (they are about to be redone)."""
    step = load_resume_point(opt, os.path.join(cfg.out_dir, "last"), rank, world, device) if resuming else 0
    metrics = JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
    if rank == 0:
        metrics.truncate_after(step)
    return step, metrics


def rollout_model(model, cfg, dev, world):
    """-> (the model grpo's rollouts decode with, whether under bf16 autocast). CUDA --bf16 --rollout-copy:
    a bf16 copy for the CUDA graphs (log-probs then differ by bf16 rounding: --ratio importance is
    close, not exact); FSDP2: a full copy of the weights, made before they are sharded; elsewhere the
    model itself."""
    import copy
    to_bf16 = cfg.rollout_copy and cfg.bf16 and torch.device(dev).type == "cuda"
    if not (to_bf16 or (world > 1 and cfg.fsdp)):
        return model, cfg.bf16
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    return (copy_.to(torch.bfloat16) if to_bf16 else copy_), cfg.bf16 and not to_bf16


@torch.no_grad()
def sync_rollout_model(roll_model, model):
    """Copy the trained weights into the rollout copy (FSDP2: each shard gathered; every rank takes part)."""
    if roll_model is not model:
        for a, b in zip(roll_model.parameters(), model.parameters()):
            a.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)


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
