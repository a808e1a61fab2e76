"""
Shared plumbing of the stage scripts (distill, sft, grpo, eval, serve): dataclass -> command-line
flags, reading problem files, JSON-lines logs, checkpoints in the HF layout, torch.distributed setup.
Nothing here knows about the method; the method lives in npr.py and the scripts.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil

import torch

INSTRUCTION_FILE = "npr_instruction.txt"  # a checkpoint's own instruction (the built-in default has one)


# -----------------------------------------------------------------------------
# Config -> CLI

def parse_cli(cls, argv=None):
    """Every field of the dataclass `cls` becomes a --kebab-case flag of the field's type (bools as
    --flag / --no-flag; one-letter fields also as -x); each field's inline comment is its help."""
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
    return cls(**vars(ap.parse_args(argv)))


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
    with open(path) as f:
        text = f.read()
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
        with open(self.path, "w") as f:
            f.writelines(keep)


def save_checkpoint(model, tok, out_dir, cfg=None, src_dir=None, extra=None, state_dict=None):
    """HF layout (config.json, safetensors, tokenizer files) + the run's config, into out_dir
    (other files there, e.g. metrics.jsonl, stay). Written to a side folder first, then moved in
    file by file; `extra` objects (torch.save) go last after the old ones are removed, so a kill
    mid-save can lose the resume state but never pair it with the wrong weights."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tok.save_pretrained(tmp)
    if cfg is not None:
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    if src_dir and os.path.isfile(os.path.join(src_dir, INSTRUCTION_FILE)) and \
            os.path.abspath(src_dir) != os.path.abspath(out_dir):
        shutil.copy(os.path.join(src_dir, INSTRUCTION_FILE), tmp)
    os.makedirs(out_dir, exist_ok=True)
    for name in list(extra or {}) + [f for f in os.listdir(out_dir) if f.startswith("model") and
                                     (f.endswith(".safetensors") or f.endswith(".index.json"))]:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)
    for name, obj in (extra or {}).items():
        torch.save(obj, os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def save_resume_point(model, tok, opt, last_dir, cfg, src_dir, step, rank, world):
    """A resumable checkpoint in last_dir: weights (gathered: every rank takes part under FSDP), then
    each rank's optimizer state, then train_state.pt LAST, so it only exists for a complete save."""
    import torch.distributed as dist
    state = full_state_dict(model)
    if rank == 0:
        if os.path.exists(os.path.join(last_dir, "train_state.pt")):
            os.remove(os.path.join(last_dir, "train_state.pt"))
        save_checkpoint(model, tok, last_dir, cfg, src_dir, state_dict=state)
    if world > 1:
        dist.barrier()
    torch.save(opt.state_dict(), os.path.join(last_dir, f"optimizer.rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        torch.save({"step": step, "world": world}, os.path.join(last_dir, "train_state.pt"))


def load_resume_point(opt, last_dir, rank, world, device):
    """Restore this rank's optimizer state from save_resume_point; -> the step to continue from."""
    state = torch.load(os.path.join(last_dir, "train_state.pt"), weights_only=False)
    if state["world"] != world:
        raise ValueError(f"{last_dir} was written by {state['world']} ranks; resume with the same number")
    opt.load_state_dict(torch.load(os.path.join(last_dir, f"optimizer.rank{rank}.pt"), map_location=device,
                                   weights_only=False))
    print(f"resumed from {last_dir} at step {state['step']}", flush=True)
    return state["step"]


def save_final(model, tok, out_dir, cfg, src_dir, rank, world):
    """The final checkpoint in out_dir (every rank gathers under FSDP, rank 0 writes), the resume
    folder out_dir/last removed, and the process group closed."""
    import torch.distributed as dist
    state = full_state_dict(model)
    if rank == 0:
        save_checkpoint(model, tok, out_dir, cfg, src_dir, state_dict=state)
        shutil.rmtree(os.path.join(out_dir, "last"), ignore_errors=True)
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
    from model import Qwen, Tokenizer
    dt = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if dt is None and bf16 and torch.device(device).type == "cuda":
        dt = torch.bfloat16
    return Qwen.from_pretrained(path, device=device, dtype=dt), Tokenizer.from_pretrained(path)


# -----------------------------------------------------------------------------
# torch.distributed (launched by torchrun; a plain `python X.py` is world size 1)

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
