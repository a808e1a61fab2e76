#!/usr/bin/env bash
# The whole NPR pipeline on the built-in default, end to end, on any machine (a 2-core CPU: ~20 min):
#   base model (toy.py) -> [stage 1: grpo.py --mode serial, with STAGE1=1] -> distill.py (from the
#   stage-1 model, else the base) -> sft.py (from the base) -> grpo.py (PAPO) -> eval.py of each stage in the mode it was trained for (EVAL_MODES=both: both modes) -> out/report.md
# Every stage is an ordinary script; rerunning skips finished stages and resumes unfinished ones.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${DRY_RUN:+echo}
[ -n "$RUN" ] || bash install.sh
PY=.venv/bin/python
OUT=${OUT:-out}
EVAL_K=${EVAL_K:-4}
EVAL_N=${EVAL_N:-1000}   # the whole test split
LATENCY_N=${LATENCY_N:-30}   # problems answered one at a time for the one-request time-to-answer
EVAL_MODES=${EVAL_MODES:-trained}   # trained: base and zero serially, sft and grpo in parallel | both
FORK_MIN=${FORK_MIN:-64}   # fork only while this many tokens of the budget remain (the official engine's: 1024)
mkdir -p "$OUT"
touch "$OUT/times.txt"
done_() {  # a finished checkpoint folder (single-file or sharded weights)
  [ -f "$1/config.json" ] && { [ -f "$1/model.safetensors" ] || [ -f "$1/model.safetensors.index.json" ]; }
}
stage() {  # stage NAME command...: run it and record its wall time
  local name=$1; shift
  echo "=================== $name: $* ==================="
  local t0=$(date +%s)
  $RUN "$@"
  grep -v "^$name " "$OUT/times.txt" > "$OUT/times.tmp" || true
  echo "$name $(( $(date +%s) - t0 ))" >> "$OUT/times.tmp" && mv "$OUT/times.tmp" "$OUT/times.txt"
}
done_ "$OUT/base" || stage base $PY toy.py --out-dir "$OUT/base" --data-dir "$OUT/data" ${TOY_ARGS:-}
if [ "${STAGE1:-0}" = 1 ] && ! done_ "$OUT/zero"; then
  stage stage1 $PY grpo.py --mode serial --model "$OUT/base" --out-dir "$OUT/zero" \
    --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/test.jsonl" --format-reward \
    --adv-std group --loss-mean token --ratio importance --dynamic-sampling --overlong-buffer 50 --malformed grade
fi
SRC="$OUT/base"; DIST="$OUT/distill"   # distil from the stage-1 model when there is one (the paper);
if [ "${STAGE1:-0}" = 1 ]; then SRC="$OUT/zero"; DIST="$OUT/distill_zero"; fi   # its own file: distill resumes
stage distill $PY distill.py --model "$SRC" --data "$OUT/data/train.jsonl" --out "$DIST/train.jsonl" ${DISTILL_ARGS:-}
done_ "$OUT/sft" || stage sft $PY sft.py --model "$OUT/base" --data "$DIST/train.jsonl" --out-dir "$OUT/sft" ${SFT_ARGS:-}
done_ "$OUT/grpo" || stage grpo $PY grpo.py --model "$OUT/sft" --out-dir "$OUT/grpo" \
  --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/test.jsonl" --fork-min-tokens "$FORK_MIN"
for s in base zero sft grpo; do
  [ -d "$OUT/$s" ] || continue
  mode=$EVAL_MODES
  [ "$mode" = trained ] && case $s in base|zero) mode=serial ;; *) mode=parallel ;; esac
  $RUN $PY eval.py --model "$OUT/$s" --data "$OUT/data/test.jsonl" --n-problems "$EVAL_N" --mode "$mode" -k "$EVAL_K" --latency-n "$LATENCY_N" --fork-min-tokens "$FORK_MIN" --out "$OUT/$s/eval.json"
done
$RUN $PY extras/report.py "$OUT"
