#!/usr/bin/env bash
# Create (or reuse) .venv and install what the project needs.
#   bash install.sh          runtime deps (torch, triton, numpy, tokenizers, safetensors, tqdm, pytest)
#   bash install.sh test     + transformers (the test-time logits oracle only)
#   bash install.sh report   + matplotlib (table.py's picture only)
# torch: a CUDA build when an NVIDIA driver is present, else torch==2.13.0 (the CPU build where the
# machine provides one, as ours does). Override with TORCH_SPEC="torch==X" or PIP_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "${TORCH_SPEC:-torch}"
  else
    # the CPU build this project's machines keep on disk; elsewhere fall back to PyPI's current torch
    "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || "$VPY" -m pip install -q torch
  fi
fi
"$VPY" -m pip install -q -r requirements.txt
if [ "${1:-}" = "test" ]; then "$VPY" -m pip install -q -r requirements-test.txt; fi
if [ "${1:-}" = "report" ]; then "$VPY" -m pip install -q -r requirements-report.txt; fi
