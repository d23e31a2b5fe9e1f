#!/usr/bin/env bash
# The GPU figures of "Training speed" (BENCHMARKS.md) in one command, a few minutes on one GPU:
#
#   bash benchmarks/gpu_suite.sh [ROWS]        # ROWS defaults to 10,000,000 (2.4 GB of text)
#
# Needs an NVIDIA GPU and a CUDA build of PyTorch in $PYTHON's environment (default: .venv's
# python if present, else python3; see README, "PyTorch: CPU by default, CUDA if you ask").
# Generates Criteo-format rows, prepares a store, then runs benchmarks/train_speed.py on CUDA:
# DeepFM-D (embedding 10, 400-400-400, dropout 0.5, Adam) at batch 4096 fp32 (TF32) and 65536
# bf16, dense vs sparse embedding updates, streamed async vs sync batches (Table I), predict
# samples/s and the time from the store on disk to the first step. Results:
# benchmarks/results/train_speed_cuda.json and gpu_suite.log. Scratch files go to $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ROWS=${1:-10000000}
WORK=${WORK:-$(mktemp -d /tmp/deepfm-gpu-XXXXXX)}
trap 'rm -rf "$WORK"' EXIT
mkdir -p benchmarks/results
exec > >(tee benchmarks/results/gpu_suite.log) 2>&1
date
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device for torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
df -h "$WORK" | tail -1
time "$PYTHON" benchmarks/make_criteo.py "$WORK/criteo.txt" --rows "$ROWS"
time "$PYTHON" -m deepfm prepare --input "$WORK/criteo.txt" --out "$WORK/store" --quiet --json
rm -f "$WORK/criteo.txt"
time "$PYTHON" benchmarks/train_speed.py --device cuda --store "$WORK/store" --epochs 2 \
  --json benchmarks/results/train_speed_cuda.json
