#!/usr/bin/env bash
# The one script to run on a lent GPU (e.g. the device tool's H100: torch 2.11, triton 3.6, no internet):
# CUDA correctness (kernels == reference in bf16, sampler invariants with the Triton path, CUDA-graph
# decode == eager) and the benchmarks, written under $OUT (7 files). Uses the machine's python.
#   OUT=gpu_out bash gpu_check.sh            # DEADLINE=470: seconds for everything; parts past it are skipped
# Parts, most important first: tests; decode (ours eager / CUDA graph vs transformers generate);
# graph + torch.compile; the forced-trace parallel speedup; the attention kernels vs FlexAttention / SDPA.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEADLINE=${DEADLINE:-470}
CK=${CK:-/tmp/npr_bench_ckpt}
export TRITON_INTERPRET=0
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
part() {  # part NAME MAX_SECONDS CMD...: run with a timeout that respects the deadline
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  local t=$(( max < left ? max : left ))
  if (( t < 30 )); then log "skip $name (deadline)"; return; fi
  log "start $name (timeout ${t}s)"
  timeout "$t" "$@" >> "$OUT/log.txt" 2>&1
  log "end $name: rc=$?"
}
{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
# 1) CUDA-only tests: kernels vs reference (bf16), sampler on the Triton path, CUDA graphs == eager
part tests 150 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider -o addopts="" -ra
# 2) decode of exactly 128 tokens, Qwen3-0.6B shape, bf16: eager and graph steps; transformers generate (32 tokens)
part decode 120 $PY bench.py decode --shapes qwen3-0.6b --batches 1,32 --new-tokens 128 --hf-tokens 32 \
  --ckpt-dir "$CK" --out "$OUT/decode.json"
[ -s "$OUT/decode.json" ] || part decode_sdpa 120 $PY bench.py decode --shapes qwen3-0.6b --batches 1,32 --new-tokens 128 \
  --hf-tokens 32 --attn sdpa --ckpt-dir "$CK" --out "$OUT/decode.json"     # the Triton path failed: SDPA instead
# 3) the step through torch.compile (SDPA attention) + CUDA graph: the launch-bound batch-1 case
part compiled 150 $PY bench.py decode --shapes qwen3-0.6b --batches ${COMPILED_BATCHES:-1} --new-tokens 128 --hf-tokens -1 \
  --modes graph --attn sdpa --compile --ckpt-dir "$CK" --out "$OUT/decode_compiled.json"
# 4) one forced trace (3 blocks of k steps x 64 tokens) in parallel vs serial mode, k = 2, 4, 5
part parallel 100 $PY bench.py parallel --shapes qwen3-0.6b --widths 2,4,5 --blocks 3 --step-tokens 64 \
  --ckpt-dir "$CK" --out "$OUT/parallel.json"
# 5) attention: bf16 check at T=4096, Triton vs FlexAttention vs SDPA, decode kernel
part attention 100 $PY parallel_attention.py --out "$OUT/attention.json"
grep -E "passed|failed|error" "$OUT/log.txt" | tail -5
grep -E "^model|^\[" "$OUT/log.txt" | tail -30
