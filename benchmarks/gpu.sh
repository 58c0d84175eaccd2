#!/usr/bin/env bash
# The one GPU run of the performance benchmarks, prepared to finish in under 5 minutes on
# one H100/H200: ResNet-50 at 224 px, Opti-CAM at 100 iterations, the authors' loop
# against the library (fp32, channels_last, bf16 autocast, torch.compile and the best
# combination), then a batch sweep in fp32 and bf16, with peak memory and the card's name.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/results/gpu-<date>.txt too
#
# Needs Python with torch and torchvision built for CUDA; the source tree is used as it
# is (PYTHONPATH), nothing is installed or downloaded. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
out="benchmarks/results/gpu-$(date -u +%F).txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
  echo
  timeout 200 "$PY" benchmarks/opticam_speed.py --device cuda --arch resnet50 --images 64 \
      --batch 32 --iterations 100 \
      --rows reference,opticam,channels_last,bf16,compile,"early stop (paper tolerance)"
  for batch in 16 64 128; do
    echo
    timeout 60 "$PY" benchmarks/opticam_speed.py --device cuda --arch resnet50 --images 128 \
        --batch "$batch" --iterations 100 --rows opticam,bf16
  done
} 2>&1 | tee "$out"
