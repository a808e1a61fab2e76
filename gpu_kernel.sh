#!/usr/bin/env bash
# The attention kernels on a lent GPU (torch 2.11, triton 3.6, no internet): bf16 correctness against
# the fp32 reference, autotuning, Triton vs FlexAttention vs SDPA at T=4096 and 16384, an sft.py step
# on the Qwen3-0.6B shape (Triton vs FlexAttention), the decode kernel; then the CUDA kernel tests.
#   OUT=gpu_out bash gpu_kernel.sh       # DEADLINE=420: seconds for everything; parts past it are skipped
#   DRY_RUN=1 PY=.venv/bin/python bash gpu_kernel.sh   # the same parts at tiny shapes (on CPU: the interpreter)
# Writes $OUT/kernel.json (one JSON, rewritten after every part), $OUT/log.txt, $OUT/env.txt.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEADLINE=${DEADLINE:-420}
DRY=${DRY_RUN:+--dry-run}
[[ -n $DRY ]] || export TRITON_INTERPRET=0
T0=$(date +%s)
{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
# the benchmark keeps 60 s of the deadline for the tests; its own alarms stop a part that runs long
timeout $(( DEADLINE - 30 )) $PY bench_attention.py $DRY --deadline $(( DEADLINE - 60 )) --out "$OUT/kernel.json" 2>&1 | tee "$OUT/log.txt"
left=$(( DEADLINE - ($(date +%s) - T0) ))
if (( left > 20 )); then
  timeout "$left" $PY -m pytest -q -m cuda tests/test_triton_attention.py -p no:cacheprovider -o addopts="" -ra 2>&1 | tail -5 | tee -a "$OUT/log.txt"
fi
echo "[$(( $(date +%s) - T0 ))s] done: $OUT/kernel.json" | tee -a "$OUT/log.txt"
