#!/usr/bin/env bash
# The one script to run on a lent GPU (e.g. the device tool's H100: torch 2.11, triton 3.6, no internet):
# the decode benchmarks against the GPU goals, CUDA correctness (kernels == reference in bf16, sampler
# invariants with the Triton path, CUDA-graph decode == eager) and the other benchmarks, written under
# $OUT. Uses the machine's python.
#   OUT=gpu_out bash gpu_check.sh            # DEADLINE=430: seconds for everything; parts past it are skipped
# Parts, most important first: compiled graph decode vs transformers generate (+ profile); tests; the
# same without fused projections; graphs without compile; the forced-trace parallel speedup; attention;
# continuous batching (ragged workload) and serve.py's time to first token.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEADLINE=${DEADLINE:-430}
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
# 1) the GPU goals: decode of exactly 128 tokens, Qwen3-0.6B shape, bf16, through torch.compile (SDPA attention)
#    + CUDA graphs (fused projections, tokens drawn in the step); transformers generate (32 tokens) beside it;
#    a torch.profiler table of 16 steps per batch
part compiled 200 $PY bench.py decode --shapes qwen3-0.6b --batches 1,32 --new-tokens 128 --hf-tokens 32 \
  --modes graph --attn sdpa --compile --profile "$OUT/profile" --ckpt-dir "$CK" --out "$OUT/decode_compiled.json"
# 2) CUDA-only tests: kernels vs reference (bf16), sampler on the Triton path, CUDA graphs == eager, in-step draw
part tests 150 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider -o addopts="" -ra
# 3) A/B: the same compiled step without the fused projections (batch 1)
part unfused 90 $PY bench.py decode --shapes qwen3-0.6b --batches ${UNFUSED_BATCHES:-1} --new-tokens 128 --hf-tokens -1 \
  --modes graph --attn sdpa --compile --fuse off --ckpt-dir "$CK" --out "$OUT/decode_compiled_unfused.json"
# 4) graphs without torch.compile (Triton attention), eager step beside them
part decode 60 $PY bench.py decode --shapes qwen3-0.6b --batches 1,32 --new-tokens 128 --hf-tokens -1 \
  --modes eager,graph --ckpt-dir "$CK" --out "$OUT/decode.json"
# 5) one forced trace (3 blocks of k steps x 64 tokens) in parallel vs serial mode, k = 2, 4, 5
part parallel 100 $PY bench.py parallel --shapes qwen3-0.6b --widths 2,4,5 --blocks 3 --step-tokens 64 \
  --ckpt-dir "$CK" --out "$OUT/parallel.json"
# 6) attention: bf16 check at T=4096, Triton vs FlexAttention vs SDPA (the full run: gpu_kernel.sh)
part attention 120 $PY bench_attention.py --deadline 110 --out "$OUT/attention.json"
# 7) continuous batching on the GPU: the ragged workload, admissions every step and every 8th (batched prefills)
part ragged 120 $PY bench.py ragged --shapes qwen3-0.6b --requests 256 --rows 64 --ragged-modes serial,parallel \
  --ckpt-dir "$CK" --out "$OUT/ragged.json"
part ragged8 100 $PY bench.py ragged --shapes qwen3-0.6b --requests 256 --rows 64 --ragged-modes parallel --admit-every 8 \
  --ckpt-dir "$CK" --out "$OUT/ragged_admit8.json"
# 8) serve.py: time to first token of a request arriving while 32 long answers decode
part serve 60 $PY bench.py serve --shapes qwen3-0.6b --rows 32 --long-tokens 1024 --ckpt-dir "$CK" --out "$OUT/serve.json"
grep -E "passed|failed|error" "$OUT/log.txt" | tail -5
grep -E "^model|^\[" "$OUT/log.txt" | tail -30
