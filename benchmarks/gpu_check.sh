#!/usr/bin/env bash
# One-GPU check, under 10 minutes: step cost with AMP (ResNet-32 batch 128; DeiT-Tiny
# batch 64 at 224 px if it fits) and a short accuracy run end to end (whole CIFAR-10
# JPEG training set, ResNet-32 width 32, RigL at 90 % sparsity, SGD / SAM / ZO-SAM, 1 seed).
# Usage: benchmarks/gpu_check.sh [OUT]   (default OUT=gpu_results)
# The venv is made the README's way (make setup) unless .venv already exists. The CIFAR-10
# JPEG archive is read from $ZOSAM_CIFAR10_JPEG or ../shared/data/cifar10-jpeg.tar.gz.
# Every step has its own time limit, so one slow step cannot push the whole past 10 minutes;
# a step that fails or times out is reported and the next one still runs.
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
step step_cost_resnet32 150 $ZOSAM bench step-cost --device cuda --amp --model resnet32 --batch-size 128 \
    --methods sgd sam zosam:q=1 zosam:q=2 zosam:q=1,query_fraction=0.25 rwp esam looksam gsam \
    --rounds 20 "${MLFLOW[@]}"
step step_cost_deit_tiny 100 $ZOSAM bench step-cost --device cuda --amp --model deit_tiny --batch-size 64 \
    --image-size 224 --methods sgd sam zosam rwp --rounds 10 --no-memory "${MLFLOW[@]}"
step accuracy 270 $ZOSAM bench accuracy --device cuda --amp bf16 --train-subset 0 --test-subset 0 \
    --model resnet32 --width 32 --epochs 4 --batch-size 128 --update-interval 100 --seeds 1 \
    --hosts rigl --optimizers sgd sam zosam --densities 0.1 --out "$OUT/accuracy" \
    --tracking-uri "$TRACK" --quiet
echo "tables and JSON in $OUT (status $status)"
exit $status
