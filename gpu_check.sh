#!/usr/bin/env bash
# The one script to run on a lent GPU (e.g. the device tool's H100: torch 2.11, triton 3.6, no internet):
# CUDA correctness (kernel == reference in bf16, sampler invariants with the Triton path) and the
# benchmarks, all written under $OUT. Uses the machine's python (no venv, nothing downloaded).
#   OUT=gpu_out bash gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
# 1) the CUDA-only tests (kernel == reference in bf16, sampler on CUDA)
TRITON_INTERPRET=0 timeout 240 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/pytest_cuda.txt"
# 2) attention: bf16 check at T=4096 (fwd+bwd), Triton vs FlexAttention vs SDPA causal, decode
timeout 300 $PY parallel_attention.py --out "$OUT/attention.json" 2>&1 | tail -60 | tee "$OUT/attention.txt"
# 3) sampler: decode tokens/s vs transformers generate, and the forced-trace parallel speedup
timeout 300 $PY bench.py all --shapes qwen3-0.6b --batches 1,32 --new-tokens 128 --out "$OUT/bench.json" 2>&1 \
  | grep -v Loading | tail -20 | tee "$OUT/bench.txt"
