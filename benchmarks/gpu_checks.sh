#!/usr/bin/env bash
# The checks that need one CUDA GPU, as one run (about 5 minutes on an H100/H200 once the environment is set up):
#  1. the training step recorded as a CUDA graph against the eager step (fp32 and bf16, tests/test_replay.py);
#  2. eager and graph steps at paper settings (MiT-B5, 1024/512 crops, batch 2 + 2, FD on), bf16, with the test-time
#     inference of a 1024x2048 image: wall time, GPU busy time, peak memory, written to reports/perf/graph/.
# Usage: bash benchmarks/gpu_checks.sh   (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need one GPU')"
"$PY" -m pytest tests/test_replay.py -q -k cuda
"$PY" benchmarks/bench_train_step.py --device cuda --variants bf16 bf16+graph --no-flops --iters 10 --warmup 3 --profile \
    --out reports/perf/graph
