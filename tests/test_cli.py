"""cli.py, the plumbing every stage shares: a log rewrite survives a fault at any moment, input errors
name the file and show as one line. (Checkpoints: test_checkpoint.py.)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_cli.py -x -q
"""
import json
import os

import pytest

import cli
from helpers import full_disk_open


@pytest.mark.parametrize("fault", ["disk full mid-write", "replace"])
def test_truncate_after_survives_a_fault(tmp_path, monkeypatch, fault):
    log = cli.JsonlLog(str(tmp_path / "metrics.jsonl"))
    for s in (1, 2, 3):
        log.write(step=s, loss=0.5)
    before = open(log.path).read()

    def boom(*a):
        raise OSError("Input/output error")
    if fault == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(cli, "open", full_disk_open(), raising=False)
    with pytest.raises(OSError):
        log.truncate_after(1)
    monkeypatch.undo()
    assert open(log.path).read() == before and os.listdir(tmp_path) == ["metrics.jsonl"]
    log.truncate_after(1)
    assert [json.loads(x)["step"] for x in open(log.path)] == [1]


def test_an_input_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "distill.py"), "--model", str(tmp_path / "nonexistent"),
           "--data", str(data), "--out", str(tmp_path / "d.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPR_DEBUG", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        f"error: checkpoint folder not found: {tmp_path / 'nonexistent'} (--debug or NPR_DEBUG=1 for the traceback)"]
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr
