#!/usr/bin/env bash
# The GPU figures of "Training speed" (BENCHMARKS.md) in one command:
#
#   bash benchmarks/gpu_suite.sh --short       # 2M rows, the quick steps: ~3 minutes on an H200
#   bash benchmarks/gpu_suite.sh [ROWS]        # everything; ROWS defaults to 10,000,000
#
# Needs an NVIDIA GPU and a CUDA build of PyTorch in $PYTHON's environment (default: .venv's
# python if present, else python3; see README, "PyTorch: CPU by default, CUDA if you ask").
# Generates Criteo-format rows, prepares a store, then runs benchmarks/train_speed.py on CUDA,
# DeepFM-D (embedding 10, 400-400-400, dropout 0.5, Adam): the time from the store to the first
# step; eager training at batch 4096 with TF32 matmuls (dense and sparse updates) and 65536 bf16;
# predict rows/s (TF32, bf16); dense vs sparse updates with a 10M-row table; compiled training
# with static shapes and CUDA graphs (4096 TF32, 65536 bf16) and compiled predict. The full run
# adds 65536 TF32, streamed async vs sync batches (Table I) and compiled TF32 predict.
#
# Robust by construction: every step has a time limit and is written to the JSON file as soon
# as it ends; a step that overruns is recorded as "timeout" and train_speed.py is started again
# for the remaining steps. Results: benchmarks/results/gpu_suite[_short].json and .log.
# Scratch files go to $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
SHORT=""
if [ "${1:-}" = "--short" ]; then
  SHORT="--short"
  shift
fi
if [ -n "$SHORT" ]; then DEFAULT_ROWS=2000000 LIMIT=600; else DEFAULT_ROWS=10000000 LIMIT=1800; fi
ROWS=${1:-$DEFAULT_ROWS}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NAME=gpu_suite${SHORT:+_short}
OUT=benchmarks/results/$NAME.json
WORK=${WORK:-$(mktemp -d /tmp/deepfm-gpu-XXXXXX)}
trap 'rm -rf "$WORK"' EXIT
mkdir -p benchmarks/results
rm -f "$OUT"
exec > >(tee "benchmarks/results/$NAME.log") 2>&1
date
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device for torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1
df -h "$WORK" | tail -1
time timeout 300 "$PYTHON" benchmarks/make_criteo.py "$WORK/criteo.txt" --rows "$ROWS" || exit 1
time timeout 300 "$PYTHON" -m deepfm prepare --input "$WORK/criteo.txt" --out "$WORK/store" \
  --quiet --json || exit 1
rm -f "$WORK/criteo.txt"
# each attempt continues after the last step written to $OUT (a timed-out step is not retried)
for attempt in 1 2 3 4 5 6; do
  time timeout "$LIMIT" "$PYTHON" benchmarks/train_speed.py --device cuda --store "$WORK/store" \
    --epochs 2 $SHORT --json "$OUT"
  status=$?
  [ "$status" -eq 0 ] && break
  echo "train_speed.py ended with status $status (attempt $attempt): going on with the steps left"
done
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
print(f"\n{results.get('gpu')}, torch {results.get('torch')}, rows {results.get('rows')}")
for name, step in results.get("steps", {}).items():
    keys = ("samples_per_s", "rows_per_s", "tflops", "seconds", "error")
    figure = next((f"{k}={step[k]}" for k in keys if k in step), "")
    print(f"{name:40s} {step['status']:8s} {figure}")
EOF
