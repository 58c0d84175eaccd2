#!/usr/bin/env bash
# The one GPU run of the performance benchmarks, prepared to finish in under 10 minutes on
# one H100/H200: ResNet-50 at 224 px, Opti-CAM at 100 iterations, the authors' loop
# against the library (fp32, channels_last, bf16 autocast, torch.compile and the best
# combination), then a batch sweep in fp32 and bf16, with peak memory and the card's name;
# then compile's break-even on the GPU (the compile cost against the saving per batch, cold
# and warm inductor cache: is compile=auto's threshold right there?) for ResNet-50 and the
# demo classifier, and the class-prior rows of the schedule benchmark on the GPU.
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
  # compile=auto (the default): eager, compiled with a cold and a warm inductor cache, and
  # the padded last batch; prints the break-even in batches and the shard table.
  echo
  timeout 200 "$PY" benchmarks/opticam_compile.py --device cuda --arch resnet50 --batch 32 \
      --batches 4 --last 24 --iterations 100 --rows eager,cold,warm || echo "opticam_compile resnet50: failed ($?)"
  echo
  timeout 120 "$PY" benchmarks/opticam_compile.py --device cuda --arch demo --batch 32 \
      --batches 4 --last 24 --iterations 100 --rows eager,cold,warm || echo "opticam_compile demo: failed ($?)"
  # The class prior on the GPU: 3 calibration images per class, the paper's setting and
  # the prior schedules on 200 held-out demo images (quality as on the CPU, and ms/image).
  echo
  timeout 150 "$PY" benchmarks/opticam_schedule.py --device cuda --images 200 \
      --prior-per-class 3 --check-cut 0 || echo "opticam_schedule prior: failed ($?)"
} 2>&1 | tee "$out"
