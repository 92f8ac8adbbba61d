#!/usr/bin/env bash
# One-GPU check, under 10 minutes: step cost with AMP, eager and CUDA-graph modes side by
# side, on ResNet-32 batch 128 (32 px) and DeiT-Small batch 128 (224 px). In each mode every
# method is timed against SGD run in that same mode (vs_sgd) and against its budget
# (vs_budget: SGD + its measured no-grad forwards); --count-ops adds launches (top-level
# ops) and host syncs per step. Graph mode replays ZO-SAM's no-grad query passes from a
# CUDA graph; methods without query passes (SGD, SAM, RWP, ...) run as in eager mode, so
# graph-mode SGD is eager SGD and the graph-mode ratios show what the capture buys ZO-SAM.
# Optional (ZOSAM_GPU_ACCURACY=1, about 4.5 more minutes): a short accuracy run end to end
# (whole CIFAR-10 JPEG training set, ResNet-32 width 32, RigL at 90 % sparsity, SGD / SAM /
# ZO-SAM, 1 seed; archive from $ZOSAM_CIFAR10_JPEG or ../shared/data/cifar10-jpeg.tar.gz).
# Usage: benchmarks/gpu_check.sh [OUT]   (default OUT=gpu_results)
# The venv is made the README's way (make setup) unless .venv already exists. Every step has
# its own time limit (4 x 130 s), so one slow step cannot push the whole past 10 minutes; a
# step that fails or times out is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The project's venv, else a machine's own torch + timm (a GPU box without network: the
# package runs from the checkout; MLflow logging is skipped where mlflow is not installed).
if [ -x .venv/bin/zosam ]; then
    ZOSAM=".venv/bin/zosam"; PY=.venv/bin/python
elif python3 -c 'import torch, timm, sklearn, yaml' 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; ZOSAM="python3 -m zosam.cli"; PY=python3
else
    make setup || { echo "make setup failed" >&2; exit 1; }
    ZOSAM=".venv/bin/zosam"; PY=.venv/bin/python
fi
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
if $PY -c 'import mlflow' 2>/dev/null; then MLFLOW=(--mlflow "$MLFLOW_TRACKING_URI"); TRACK="$MLFLOW_TRACKING_URI"
else MLFLOW=(); TRACK=off; fi
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, tee the output to OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || status=1
    grep '^{' "$OUT/$name.txt" | tail -1 > "$OUT/$name.json" || true
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; git rev-parse HEAD; } \
    > "$OUT/machine.txt" 2>&1
RESNET_METHODS=(sgd sam zosam:q=1 zosam:q=2 zosam:q=1,query_fraction=0.25 rwp esam looksam gsam asyncsam msam)
DEIT_METHODS=(sgd sam zosam:q=1 rwp)
for mode in none graphs; do
    step "step_cost_resnet32_$mode" 130 $ZOSAM bench step-cost --device cuda --amp --compile "$mode" \
        --model resnet32 --batch-size 128 --methods "${RESNET_METHODS[@]}" --rounds 20 --count-ops --count-steps 3 \
        --no-memory "${MLFLOW[@]}"
done
for mode in none graphs; do
    step "step_cost_deit_small_$mode" 130 $ZOSAM bench step-cost --device cuda --amp --compile "$mode" \
        --model deit_small --batch-size 128 --image-size 224 --methods "${DEIT_METHODS[@]}" --rounds 8 \
        --warmup 2 --no-memory "${MLFLOW[@]}"
done
if [ "${ZOSAM_GPU_ACCURACY:-0}" = 1 ]; then
    step accuracy 270 $ZOSAM bench accuracy --device cuda --amp bf16 --train-subset 0 --test-subset 0 \
        --model resnet32 --width 32 --epochs 4 --batch-size 128 --update-interval 100 --seeds 1 \
        --hosts rigl --optimizers sgd sam zosam --densities 0.1 --out "$OUT/accuracy" \
        --tracking-uri "$TRACK" --quiet
fi
# Side by side: per model, each method's step time and ratio to SGD in eager and graph mode.
$PY - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for model in ("resnet32", "deit_small"):
    runs = {}
    for mode in ("none", "graphs"):
        f = out / f"step_cost_{model}_{mode}.json"
        text = f.read_text().strip() if f.exists() else ""
        runs[mode] = {r["method"]: r for r in json.loads(text)["rows"]} if text else {}
    print(f"{model}: method, eager ms, eager vs_sgd, eager vs_budget, graphs ms, graphs vs_sgd, graphs vs_budget")
    for m in runs["none"] or runs["graphs"]:
        cells = []
        for mode in ("none", "graphs"):
            r = runs[mode].get(m)
            cells += ["-"] * 3 if r is None else [f"{1e3 * r['step_s']:.2f}", f"{r['vs_sgd']:.3f}", f"{r['vs_budget']:.3f}"]
        print("  " + ", ".join([m, *cells]))
PYEOF
echo "tables and JSON in $OUT (status $status)"
exit $status
