#!/usr/bin/env bash
# GPU smoke run of every stage script on CUDA (the CPU suite covers their logic): the built-in default's
# base model and data (carried in $SRC: a copy of out/base and out/data) through distill -> sft ->
# grpo (parallel) -> eval, small sizes. Logs under $OUT.   SRC=gpu_carry OUT=gpu_out bash gpu_stages.sh
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}; SRC=${SRC:-gpu_carry}; P=${P:-/tmp/npr_stages}; PY=${PY:-python3}
mkdir -p "$OUT" "$P"
export TRITON_INTERPRET=0
run() { local name=$1; shift; local t0=$(date +%s); echo "== $name: $*"; "$@" > "$OUT/$name.log" 2>&1; local rc=$?
        echo "== $name rc=$rc $(( $(date +%s) - t0 ))s"; tail -4 "$OUT/$name.log"; return $rc; }
run distill $PY distill.py --model "$SRC/base" --data "$SRC/data/train.jsonl" --out "$P/distill/train.jsonl" --n-problems 300 &&
run sft $PY sft.py --model "$SRC/base" --data "$P/distill/train.jsonl" --out-dir "$P/sft" --epochs 2 &&
run grpo $PY grpo.py --model "$P/sft" --out-dir "$P/grpo" --data "$SRC/data/train.jsonl" --eval-data "$SRC/data/test.jsonl" \
  --steps 4 --eval-every 2 --eval-problems 100 &&
run eval $PY eval.py --model "$P/grpo" --data "$SRC/data/test.jsonl" --n-problems 200 --mode both -k 2 --out "$OUT/eval.json"
grep -h "^step\|^eval\|grpo (" "$OUT/grpo.log" | tail -6
