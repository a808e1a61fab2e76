"""
The files of a Hugging Face checkpoint folder, for model.py: config.json (its fields checked against
what model.py supports), and model.safetensors or its shards with their index (HF's names, checked
against the model's), so that transformers, vLLM and SGLang read our outputs as they read Qwen's.
Every error names the file and what is wrong with it; a failed write (a full disk) is one OSError
naming what was being written (`writing`, used for the stages' other files too).
"""
import contextlib
import errno
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}   # architecture -> model.py's arch
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def read_config(path):
    """config.json of the checkpoint folder `path`, as a dict."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not os.path.isfile(cfg_path := os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    d = read_json(cfg_path)
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got a {type(d).__name__}")
    try:
        check_fields(d)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    return d


def check_fields(d):
    """What model.py supports, and the types and ranges of the config.json fields it reads (absent or
    null: the default), so that a wrong one is one error naming it, not a traceback from deep inside torch."""
    def bad(name, v, kind):
        raise ValueError(f"{name} must be {kind}, got {json.dumps(v)[:60]}")
    archs = d.get("architectures") or []
    if not any(a in SUPPORTED for a in archs) and d.get("model_type") not in SUPPORTED.values():
        raise ValueError(f"unsupported architecture {archs or d.get('model_type')!r}: "
                         f"supported are {', '.join(SUPPORTED)} (dense Qwen2/2.5/3)")
    if missing := [name for name in REQUIRED if d.get(name) is None]:
        raise ValueError(f"required field {missing[0]!r} is missing")
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if d.get(name) is not None and not count(d[name]):
            bad(name, d[name], "a positive integer")
    rope = d.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        bad("rope_parameters", rope, "an object")
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
        bad("rope_scaling", d["rope_scaling"], "an object")
    for name, v in (("rms_norm_eps", d.get("rms_norm_eps")), ("rope_theta", d.get("rope_theta")),
                    ("rope_parameters.rope_theta", (rope or {}).get("rope_theta"))):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
            bad(name, v, "a positive number")
    for name in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
        if d.get(name) is not None and not isinstance(d[name], bool):
            bad(name, d[name], "true or false")
    for name in ("dtype", "torch_dtype"):
        if d.get(name) is not None and not isinstance(d[name], str):
            bad(name, d[name], "a string")
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}) (GQA)")
    if d.get("head_dim") is None and heads and d.get("hidden_size") and d["hidden_size"] % heads:
        raise ValueError(f"hidden_size ({d['hidden_size']}) must be a multiple of num_attention_heads ({heads}) "
                         "when head_dim is not given")
    head_dim = d.get("head_dim") or (d.get("hidden_size") or 0) // (heads or 1)
    if head_dim % 2:
        bad("head_dim", head_dim, "even (RoPE rotates halves)")
    scaling = d.get("rope_scaling") or ({} if "rope_type" not in (rope or {}) else {"rope_type": rope["rope_type"]})
    if (kind := scaling.get("rope_type", scaling.get("type", "default"))) not in ("default", None):
        raise ValueError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is implemented")
    if d.get("use_sliding_window"):
        raise ValueError("unsupported: use_sliding_window=true (sliding-window attention)")
    if (name := dtype_name(d) or "float32") not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} in config.json: {', '.join(DTYPES)}")


def dtype_name(d):
    """The weights' dtype name in config.json, or None: transformers 5 writes `dtype`, 4.x `torch_dtype`."""
    return d.get("dtype") or d.get("torch_dtype")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError (with its line and column), UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path, dtype, device, expected=None):
    """All tensors of a single-file or sharded checkpoint, each cast to dtype on device as it is read;
    checked against `expected` (name -> shape, the model's): an error lists missing and unexpected names
    and wrong shapes. A tied embedding's lm_head.weight, when the file has one, is a duplicate: dropped."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        found = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".safetensors")))
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}"
                                + (f" (found {found}: only safetensors are supported)" if found else ""))
    state = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise FileNotFoundError(f"shard {name} listed in the index is missing from {path}")
        try:
            with safe_open(fp, framework="pt", device=str(device)) as f:
                state.update({k: f.get_tensor(k).to(dtype) for k in f.keys()})
        except SafetensorError as e:
            raise ValueError(f"{fp}: not a complete safetensors file ({e}): an interrupted download or save?") from None
    if expected is None:
        return state
    if "lm_head.weight" not in expected:
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        few = lambda names: f"{names[:20]}{' ...' if len(names) > 20 else ''}"
        raise ValueError(f"checkpoint {path} does not match its config.json: "
                         f"missing tensors {few(missing)}, unexpected tensors {few(unexpected)}")
    bad = [f"{k}: file {tuple(state[k].shape)} vs config {s}" for k, s in expected.items() if tuple(state[k].shape) != s]
    if bad:
        raise ValueError(f"checkpoint {path}: shape mismatch: " + "; ".join(bad[:20]))
    return state


def write_safetensors(state, path, max_shard_bytes=4 << 30):
    """state (name -> CPU tensor) into path: model.safetensors, or shards of at most max_shard_bytes
    and model.safetensors.index.json (HF's names); earlier weight files there are removed first."""
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size = v, size + nbytes
    for old in os.listdir(path):  # stale weights from an earlier save would shadow the new ones
        if old.startswith("model") and old.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(path, old))
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with writing(os.path.join(path, name)):
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def write_error(path, code):
    """A failed write as one OSError naming what was being written; a full disk (or a file-size or
    quota limit: the same to the writer) says so."""
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        e = OSError(f"no space left to write {path} ({os.strerror(code)}): free some space there or choose "
                    "another output folder; what was saved before is kept")
    else:
        e = OSError(f"cannot write {path}: {os.strerror(code)}")
    e.errno, e.path = code, path      # (path: an inner `writing` named the file already)
    return e


@contextlib.contextmanager
def writing(path):
    """Errors of writing `path` (a file, or a folder being filled) as write_error: Python's own name no
    file, and safetensors and tokenizers (Rust) report the OS error inside their message."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.errno or hasattr(e, "path"):
            raise
        raise write_error(path, e.errno) from None
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise write_error(path, int(code.group(1))) from None
