"""
The Hugging Face checkpoint folder on disk, for model.py (and the loaders in cli.py): config.json,
model.safetensors or its shards with their index, read and written so that transformers, vLLM and
SGLang read our outputs as they read Qwen's; every error names the file and what is wrong with it.
"""
import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not os.path.isfile(cfg_path := os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    return read_json(cfg_path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError (with its line and column), UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path, dtype, device):
    """All tensors of a single-file or sharded checkpoint, each cast to dtype on device as it is read."""
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
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def check_vocab(model, tokenizer, where=""):
    """Every token id needs an embedding row (a tokenizer from another checkpoint would index past the
    matrix mid-run). More rows than ids is normal: Qwen's files have 151936 rows for 151669 ids."""
    n_ids = max(tokenizer._tk.get_vocab(with_added_tokens=True).values()) + 1
    if n_ids > model.config.vocab_size:
        raise ValueError(f"{where + ': ' if where else ''}the tokenizer has {n_ids} ids but the model only "
                         f"{model.config.vocab_size} embedding rows (config.json vocab_size): tokenizer and "
                         "weights from different checkpoints?")
