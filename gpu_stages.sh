#!/usr/bin/env bash
# GPU smoke run of every stage script on CUDA (the CPU suite covers their logic): the built-in default's
# base model and data (carried in $SRC: a copy of out/base and out/data) through distill -> sft ->
# grpo (parallel) -> eval, small sizes, then serve.py answering a few clients. Logs under $OUT.
#   SRC=gpu_carry OUT=gpu_out bash gpu_stages.sh      (STAGES=0 or SERVE=0 skips a part)
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}; SRC=${SRC:-gpu_carry}; P=${P:-/tmp/npr_stages}; PY=${PY:-python3}
mkdir -p "$OUT" "$P"
export TRITON_INTERPRET=0
run() { local name=$1; shift; local t0=$(date +%s); echo "== $name: $*"; "$@" > "$OUT/$name.log" 2>&1; local rc=$?
        echo "== $name rc=$rc $(( $(date +%s) - t0 ))s"; tail -4 "$OUT/$name.log"; return $rc; }
if [ "${STAGES:-1}" = 1 ]; then
run distill $PY distill.py --model "$SRC/base" --data "$SRC/data/train.jsonl" --out "$P/distill/train.jsonl" --n-problems 300 &&
run sft $PY sft.py --model "$SRC/base" --data "$P/distill/train.jsonl" --out-dir "$P/sft" --epochs 2 &&
run grpo $PY grpo.py --model "$P/sft" --out-dir "$P/grpo" --data "$SRC/data/train.jsonl" --eval-data "$SRC/data/test.jsonl" \
  --steps 4 --eval-every 2 --eval-problems 100 &&
run eval $PY eval.py --model "$P/grpo" --data "$SRC/data/test.jsonl" --n-problems 200 --mode both -k 2 --out "$OUT/eval.json"
grep -h "^step\|^eval\|grpo (" "$OUT/grpo.log" | tail -6
fi
# serve.py on CUDA: a completion, a stream, serial mode and 3 concurrent clients against the base model
if [ "${SERVE:-1}" = 1 ]; then
  $PY serve.py --model "$SRC/base" --port 8123 > "$OUT/serve.log" 2>&1 &
  SP=$!
  $PY - <<'PY' 2>&1 | tee "$OUT/serve_client.log"
import json, threading, time, urllib.request
url = "http://127.0.0.1:8123"
for _ in range(120):
    try:
        urllib.request.urlopen(url + "/health", timeout=2); break
    except Exception:
        time.sleep(0.5)
def post(body):
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read().decode()
    return data, time.time() - t
msg = [{"role": "user", "content": "Compute 23*4 + 17*6 + 8*9."}]
d, s = post({"messages": msg, "temperature": 0, "seed": 1})
c = json.loads(d)["choices"][0]
print(f"completion {s:.2f}s | {c['npr_finish_reason']} | forks {c['npr']['stats']['forks']} | {c['message']['content'][-40:]!r}")
d, s = post({"messages": msg, "temperature": 0, "seed": 1, "stream": True})
chunks = [json.loads(x[6:]) for x in d.split("\n\n") if x.startswith("data: {")]
print(f"stream {s:.2f}s | {len(chunks)} chunks | ends with [DONE]: {d.rstrip().endswith('[DONE]')}")
d, s = post({"messages": msg, "mode": "serial", "n": 4, "seed": 2})
print(f"serial n=4 {s:.2f}s | {[c['npr_finish_reason'] for c in json.loads(d)['choices']]}")
out = []
th = [threading.Thread(target=lambda i=i: out.append(post({"messages": msg, "seed": i, "n": 2})[1])) for i in range(3)]
[t.start() for t in th]; [t.join() for t in th]
print(f"3 concurrent clients: {sorted(round(x, 2) for x in out)} s | health {urllib.request.urlopen(url + '/health').read().decode()}")
PY
  kill $SP
fi
