"""
A stage's checkpoints, in the Hugging Face layout (config.json and safetensors: hf_files.py, for
model.py) with the tokenizer: the one loader every stage starts from, its output (the input's dtype
and every tokenizer / generation file of the input carried along), resumable points that survive
a kill at any moment, and the start of a training stage from its input or its resume point; every
error names the file and what is wrong with it.
"""
import dataclasses
import json
import os
import pickle
import shutil

import torch

from hf_files import DTYPES, dtype_name, read_config, writing
from model import Qwen
from npr import INSTRUCTION_FILE   # a checkpoint's own instruction (the built-in default has one)
from runs import JsonlLog, init_distributed, lock_output, print_config
from tokenizer import Tokenizer


def load_checkpoint(path, device, dtype="", bf16=False):
    """-> (model, tokenizer) of the checkpoint folder `path`, the weights on `device` in `dtype` (a
    hf_files.DTYPES name; "": the file's, or bf16 on CUDA with `bf16`: the decoding scripts ask for that,
    since the sampler's CUDA-graph fast path does not run under autocast, fp32 sft/grpo outputs too).
    A tokenizer with more ids than the model has embedding rows is refused."""
    if dtype and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
    dt = DTYPES[dtype] if dtype else torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else None
    model, tok = Qwen.from_pretrained(path, device=device, dtype=dt), Tokenizer.from_pretrained(path)
    check_vocab(model, tok, path)
    return model, tok


def check_vocab(model, tokenizer, where=""):
    """Every token id needs an embedding row (a tokenizer from another checkpoint would index past the
    matrix mid-run). More rows than ids is normal: Qwen's files have 151936 rows for 151669 ids."""
    n_ids = tokenizer.max_id + 1
    if n_ids > model.config.vocab_size:
        raise ValueError(f"{where + ': ' if where else ''}the tokenizer has {n_ids} ids but the model only "
                         f"{model.config.vocab_size} embedding rows (config.json vocab_size): tokenizer and "
                         "weights from different checkpoints?")


# -----------------------------------------------------------------------------
# Saving: a stage's output and its resume points

class _Writes:
    """A file object for torch.save that keeps the error of a failed write: torch reports only
    "unexpected pos", the OS error (a full disk) is lost."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save_torch(obj, path):
    """torch.save into path; a failed write is write_error naming the file."""
    with writing(path), open(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


# Files a checkpoint carries besides config.json and the weights (name prefixes): tokenizer and
# generation settings that transformers, vLLM & co. read (generation_config.json holds the eos ids
# generate() stops at and the sampling defaults; vocab.json + merges.txt the slow tokenizer).
SIDE_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
              "generation_config", INSTRUCTION_FILE)


def save_dtype(cfg, src_dir):
    """The dtype a final checkpoint is written in: cfg.save_dtype when set, else the input's
    (config.json dtype / torch_dtype): training keeps fp32 master weights, a bf16 model stays bf16."""
    name = getattr(cfg, "save_dtype", "")
    if not name and src_dir and os.path.isfile(os.path.join(src_dir, "config.json")):
        d = read_config(src_dir)
        name = dtype_name(d) or ""
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
    with writing(tmp):
        if src_dir and os.path.isdir(src_dir):
            for f in os.listdir(src_dir):
                if f.startswith(SIDE_FILES) and os.path.isfile(os.path.join(src_dir, f)):
                    shutil.copy(os.path.join(src_dir, f), tmp)
        if getattr(cfg, "instruction_file", ""):   # the instruction the run prompted with travels with its output
            shutil.copy(cfg.instruction_file, os.path.join(tmp, INSTRUCTION_FILE))
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


def save_resume_point(model, tok, opt, last_dir, cfg, src_dir, step, rank, world):
    """A resumable checkpoint: weights in the training dtype (fp32 master weights resume exactly),
    each rank's optimizer state, then train_state.pt, all in a new folder `last_dir`.<step>.partial;
    synced to disk, renamed to `last_dir`.<step>, and only then the symlink `last_dir` is switched to
    it (an atomic rename) and the older saves removed. A kill at any moment leaves `last_dir`
    pointing at the last complete save (resume_point tells whether one exists)."""
    import torch.distributed as dist
    state = full_state_dict(model)
    new = f"{last_dir}.{step}"
    part = new + ".partial"
    if rank == 0:
        shutil.rmtree(part, ignore_errors=True)
        save_checkpoint(model, tok, part, cfg, src_dir, state_dict=state)
    if world > 1:
        dist.barrier()
    save_torch(opt.state_dict(), os.path.join(part, f"optimizer.rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        save_torch({"step": step, "world": world}, os.path.join(part, "train_state.pt"))
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


def resume_point(last_dir):
    """Whether a resume point `last_dir` exists (False: none, a fresh start). One that exists but
    cannot be used (a link to nothing, a plain file, a missing or torn train_state.pt) raises: a fresh
    start would overwrite the run's saves and metrics.jsonl."""
    if not os.path.lexists(last_dir):
        return False
    if not os.path.isdir(last_dir):
        what = f"a link to {os.readlink(last_dir)!r}, which does not exist" if os.path.islink(last_dir) else \
            "not a folder"
        raise ValueError(f"{last_dir}: the resume point is {what}; {start_over(last_dir)}")
    train_state(last_dir)
    return True


def start_over(last_dir):
    return (f"to start over, move or delete {last_dir} and {last_dir}.* (or pass --no-resume, which overwrites "
            "them and the records past step 0)")


def load_resume_file(path, last_dir, **kw):
    """torch.load of a resume point's file; a missing, truncated or empty one is a ValueError naming it."""
    try:
        return torch.load(path, weights_only=False, **kw)
    except torch.OutOfMemoryError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{path}: missing from the resume point; {start_over(last_dir)}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        why = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a complete resume file ({why}); {start_over(last_dir)}") from None


def train_state(last_dir):
    """The resume point's {"step", "world"} (train_state.pt, written last: its presence marks a complete save)."""
    path = os.path.join(last_dir, "train_state.pt")
    state = load_resume_file(path, last_dir)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("world"), int)):
        raise ValueError(f"{path}: not a train state (step, world); {start_over(last_dir)}")
    return state


def load_resume_point(opt, last_dir, rank, world, device):
    """Restore this rank's optimizer state from save_resume_point; -> the step to continue from."""
    state = train_state(last_dir)
    if state["world"] != world:
        raise ValueError(f"{last_dir} was written by {state['world']} ranks; resume with the same number")
    opt.load_state_dict(load_resume_file(os.path.join(last_dir, f"optimizer.rank{rank}.pt"), last_dir,
                                         map_location=device))
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
        # the link first: a kill in the middle of this leaves no link to a removed folder (a refused resume)
        for p in sorted(resume_folders(os.path.join(out_dir, "last")), key=lambda p: not os.path.islink(p)):
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


# -----------------------------------------------------------------------------
# Starting a training stage (sft, grpo): from its input, or from its resume point

def start_training(cfg):
    """What a training stage (sft, grpo) does first: torch.distributed (under torchrun), the out-dir's
    lock, CPU threads, the seed, the resolved config printed (rank 0), then the model and tokenizer,
    from the resume point cfg.out_dir/last when one exists (and cfg.resume; one that cannot be used is
    refused), else from cfg.model; weights in cfg.dtype.
    -> (rank, world, device, model, tokenizer, resuming)"""
    rank, world, _, dev = init_distributed()
    lock_output(os.path.join(cfg.out_dir, ".lock"), rank, world)   # before anything in it is read or written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if rank == 0:
        print_config(cfg)
    last_dir = os.path.join(cfg.out_dir, "last")
    resuming = cfg.resume and resume_point(last_dir)     # one that exists but cannot be used: refused
    src = last_dir if resuming else cfg.model
    model, tok = load_checkpoint(src, dev, cfg.dtype)
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
