"""hf_files.py: the HF folder's weight files, single or sharded with HF's names and index, read back
in a dtype; a folder that is missing a file, or holds only other formats, is one error naming it; a
failed write names the file. (Against transformers, through the model: test_model.py.)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_hf_files.py -q
"""
import errno
import json
import os
import re

import pytest
import torch

from hf_files import load_safetensors, read_config, write_safetensors, writing


def state():
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.randn(16, 16, generator=g) for i in range(3)}


def test_shards_with_an_index_and_back(tmp_path):
    s = state()
    write_safetensors(s, str(tmp_path), max_shard_bytes=2 * 16 * 16 * 4)   # two tensors per shard
    names = sorted(os.listdir(tmp_path))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 3 * 16 * 16 * 4 and set(index["weight_map"]) == set(s)
    back = load_safetensors(str(tmp_path), torch.bfloat16, "cpu")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], s[k].bfloat16()) for k in s)
    write_safetensors(s, str(tmp_path))          # one file now: the old shards would shadow it
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert all(torch.equal(v, s[k]) for k, v in load_safetensors(str(tmp_path), torch.float32, "cpu").items())


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in checkpoint folder"):
        read_config(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"found \['pytorch_model.bin'\]: only safetensors are supported"):
        load_safetensors(str(tmp_path), torch.float32, "cpu")
    write_safetensors(state(), str(tmp_path), max_shard_bytes=1)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00003.safetensors listed in the index is missing"):
        load_safetensors(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("I/O error: No space left on device (os error 28)")])
def test_a_failed_write_names_the_file(tmp_path, error):
    # Python's own OSError without a file name, or a Rust library's message (safetensors, tokenizers)
    path = str(tmp_path / "model.safetensors")
    with pytest.raises(OSError, match=f"^no space left to write {re.escape(path)} ") as e, writing(path):
        raise error
    assert e.value.errno == errno.ENOSPC
