#!/usr/bin/env bash
# One GPU check: the cuda-marked tests, the training, caching, eval and live-training benches at
# GPU shapes, then one table of figures and ratios. Made to finish within 8 minutes on one H100
# (80 GB): every section runs under its own timeout, so one failure or hang does not eat the rest.
#
#   bash bench/gpu_check.sh            # on a CUDA machine (run from anywhere; it cds to the repository)
#   bash bench/gpu_check.sh --smoke    # every section at tiny shapes on the CPU (cuda tests skip); tests the script
#   GPU_CHECK_OUT=dir bash bench/gpu_check.sh   # keep the logs and JSON there (default: a temp folder)
#
# Exit status: 0 when every section finished, 1 otherwise (the table says which did not).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SMOKE=${GPU_CHECK_SMOKE:-0}
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/status.txt"

# section NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log; records the exit status
section() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/status.txt"
  echo "   exit $rc after $((SECONDS - t0)) s; log $OUT/$name.log"
}

M7B=(--d-model 4096 --vocab 32000 --mlp 14336 --kv-heads 8)  # Mistral-7B: 32 heads of 128, 8 KV heads
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=1  # a shared CPU machine
  DEV=(--device cpu); T=(--threads 1)
  TRAIN=(--shapes 32x256,64x512 --precisions fp32 --batch 256 --steps 2 --no-parquet)
  CACHE=(--sections 5 --tokens 2048 --context 64 --batch-tokens 1024 --threads 1)
  CACHE_SMALL=(--d-model 64 --layers 4); CACHE_BIG=(--d-model 128 --layers 4 --vocab 1000 --mlp 320 --heads 4 --kv-heads 1)
  EVAL=(--tokens 1024 --context 64 --batch-tokens 512 --repeats 1)
  EVAL_SMALL=(--d-model 64 --layers 2 --vocab 512); EVAL_BIG=(--d-model 128 --layers 4 --vocab 1000 --mlp 320 --kv-heads 1)
  LIVE=(--d-model 128 --mlp 320 --heads 4 --kv-heads 1 --vocab 1000 --hook blocks.2.hook_resid_pre --tokens 8192
        --context-size 64 --buffer-tokens 4096 --batch-size 256 --expansion 4 --group 2)
  BF=(--dtype bfloat16); TL=(180 100 60 90 60 90 300)  # a loaded shared CPU: pytest alone took 14-60 s
else
  DEV=(--device cuda); T=()
  TRAIN=(--shapes 2048x32768,4096x65536)  # fp32, tf32 and bf16 (bench_train's CUDA default), every architecture
  CACHE=(--sections 5 --tokens 65536 --context 1024 --batch-tokens 16384)
  CACHE_SMALL=(--d-model 2048 --layers 16); CACHE_BIG=("${M7B[@]}" --heads 32 --layers 32)
  EVAL=(--tokens 16384 --context 1024 --batch-tokens 8192 --repeats 3)
  EVAL_SMALL=(--d-model 2048 --layers 16 --vocab 32000); EVAL_BIG=("${M7B[@]}" --layers 32)
  LIVE=("${M7B[@]}" --hook blocks.16.hook_resid_pre --tokens 262144 --context-size 1024 --buffer-tokens 131072
        --batch-size 4096 --expansion 8 --group 1)  # 17 blocks built, 16 run up to the hook; no group: its slot is 60 s
  BF=(--dtype bfloat16); TL=(100 110 35 75 30 60 60)  # 470 s of section limits + start-up < 8 min
fi

section tests "${TL[0]}" "$PY" -m pytest -q -m cuda -p no:cacheprovider
section train "${TL[1]}" "$PY" bench/bench_train.py "${DEV[@]}" "${T[@]}" "${TRAIN[@]}" --json "$OUT/train.json"
section cache_small "${TL[2]}" "$PY" bench/bench_cache.py "${DEV[@]}" "${BF[@]}" "${CACHE[@]}" "${CACHE_SMALL[@]}" \
  --json "$OUT/cache_small.json"
section cache_7b "${TL[3]}" "$PY" bench/bench_cache.py "${DEV[@]}" "${BF[@]}" "${CACHE[@]}" "${CACHE_BIG[@]}" \
  --json "$OUT/cache_7b.json"
section eval_small "${TL[4]}" "$PY" bench/bench_eval.py "${DEV[@]}" "${BF[@]}" "${EVAL[@]}" "${EVAL_SMALL[@]}" \
  --json "$OUT/eval_small.json"
section eval_7b "${TL[5]}" "$PY" bench/bench_eval.py "${DEV[@]}" "${BF[@]}" "${EVAL[@]}" "${EVAL_BIG[@]}" --json "$OUT/eval_7b.json"
section live_7b "${TL[6]}" "$PY" bench/bench_live.py "${DEV[@]}" "${BF[@]}" "${LIVE[@]}" --json "$OUT/live_7b.json"

"$PY" - "$OUT" <<'PYEOF'
"""One table from the sections' JSON files and logs."""
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
status = {n: (int(rc), int(s)) for n, rc, s in (line.split() for line in (out / "status.txt").read_text().splitlines())}
rows = []  # section, case, tokens/s, peak GiB, ratio, goal


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and status.get(name, (1,))[0] == 0 else None


def gib(x):
    return "-" if x is None or x != x else f"{x:.1f}"


log = (out / "tests.log").read_text() if (out / "tests.log").is_file() else ""
summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)]
rows.append(("tests -m cuda", summary[-1].strip("= ") if summary else "no summary", "", "", "", "all pass"))
for r in load("train") or []:
    if "tokens_per_s" in r:
        rows.append(("train", f"{r['shape']} {r['arch']} {r['precision']} {r['kernels']}", f"{r['tokens_per_s']:,.0f}",
                     gib(r["peak_gib"]), f"{r['ratio_matmul']:.2f} of matmul ({r['flops'] / 1e12:.1f} TFLOP/s)", "~1"))
for name in ("cache_small", "cache_7b"):
    c = load(name)
    if c:
        what = f"d{c['d_model']} L{c['layers']} {c['dtype']}"
        rows.append((name, f"{what} bare forward", f"{c['bare_tokens_per_s']:,.0f}", gib(c["peak_gib"]), "", ""))
        for case in c["cases"]:
            rows.append((name, f"{what} {case['case']}", f"{case['tokens_per_s']:,.0f}", "",
                         f"{case['ratio_to_bare']:.2f} of bare forward", ">= 0.90"))
for name in ("eval_small", "eval_7b"):
    e = load(name)
    if e:
        what = f"d{e['d_model']} L{e['layers']} V{e['vocab']} {e['dtype']}"
        rows.append((name, f"{what} CE eval, one policy", f"{e['eval_one_tokens_per_s']:,.0f}", gib(e["peak_gib"]),
                     f"{e['eval_one_ratio']:.2f}x bare forward", "<= 3.3x"))
        rows.append((name, f"{what} CE eval, both policies", "", "", f"{e['eval_both_ratio']:.2f}x bare forward", ""))
live = load("live_7b")
if live:
    what = f"d{live['d_in']} L{live['layers']} {live['dtype']} {live['arch']} F{live['d_sae']}"
    rows.append(("live_7b", f"{what} forward to hook", f"{live['forward_tokens_per_s']:,.0f}", "", "", ""))
    rows.append(("live_7b", f"{what} train, in memory", f"{live['train_tokens_per_s']:,.0f}", "", "", ""))
    rows.append(("live_7b", f"{what} live training", f"{live['live_tokens_per_s']:,.0f}", gib(live["peak_gib"]),
                 f"{live['live_over_bound']:.2f} of no-overlap bound", ">= 1.0"))
for name, (rc, secs) in status.items():
    rows.append(("status", name, "", "", f"exit {rc}" + (" (timed out)" if rc in (124, 137) else "") + f", {secs} s",
                 "exit 0"))
head = ("section", "case", "tokens/s", "peak GiB", "figure / ratio", "goal")
widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
print("\n" + " | ".join(h.ljust(w) for h, w in zip(head, widths)))
print("-+-".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))
print(f"\nlogs and JSON: {out}")
sys.exit(0 if all(rc == 0 for rc, _ in status.values()) else 1)
PYEOF
