#!/usr/bin/env bash
# The checks that need one CUDA GPU, as one run (about 4 minutes on an H100/H200 once the environment is set up):
#  1. the training step recorded as a CUDA graph against the eager step, fp32 and bf16 (tests/test_replay.py; the
#     measured gaps are printed into test_replay_cuda.txt);
#  2. eager and graph steps at paper settings (MiT-B5, 1024/512 crops, batch 2 + 2, FD on), bf16, with the test-time
#     inference of a 1024x2048 image: wall time, GPU busy time, peak memory (eager/ and graph/);
#  3. `hrda train` on a small synthetic benchmark with step_mode=eager and step_mode=graph (bf16, 200 iterations):
#     the graph path inside the real training loop, with its checkpoints and evaluation (train_graph.md).
# Usage: bash benchmarks/gpu_checks.sh [DEST]   (default DEST reports/perf/graph; PYTHON=... for another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-reports/perf/graph}
TMP=$(mktemp -d)
mkdir -p "$DEST"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need one GPU')"
"$PY" -m pytest tests/test_replay.py -q -s -p no:cacheprovider -k "cuda or shadowed" 2>&1 | tee "$DEST/test_replay_cuda.txt" || echo "the CUDA tests failed: see $DEST/test_replay_cuda.txt"
"$PY" benchmarks/bench_train_step.py --device cuda --variants bf16 --no-flops --iters 10 --warmup 3 --profile \
    --out "$DEST/eager" | tail -n 3
"$PY" benchmarks/bench_train_step.py --device cuda --variants bf16+graph --no-flops --no-inference --iters 10 \
    --warmup 3 --profile --out "$DEST/graph" | tail -n 3
"$PY" data_prep/make_synth.py "$TMP/synth" --n-source 40 --n-target 40 --n-val 12 --workers 8 >/dev/null
for mode in eager graph; do
    "$PY" -c 'import sys; from hrda.cli import main; main(sys.argv[1:])' train --config experiments/synth_hrda.yaml \
        --set step_mode=$mode precision=bf16 device=cuda iters=200 eval_every=100 checkpoint_every=100 val_max_images=12 \
        source_root="$TMP/synth/source" target_root="$TMP/synth/target" out_dir="$TMP/run_$mode" workers=4 2>&1 | tail -n 1
done
mkdir -p "$TMP"; "$PY" - "$TMP" "$DEST/train_graph.md" <<'PY'
import json, sys
from pathlib import Path
tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
rows = ["| step_mode | iterations | wall time (s) | mIoU at 100 | mIoU at 200 | last logged loss |",
        "|---|---:|---:|---:|---:|---:|"]
for mode in ("eager", "graph"):
    m = json.loads((tmp / f"run_{mode}/metrics.json").read_text())
    log = [json.loads(l) for l in (tmp / f"run_{mode}/log.jsonl").read_text().splitlines() if l.strip()]
    rows.append(f"| {mode} | {m['iterations']} | {m['wall_time_s']} | "
                + " | ".join(f"{e['mIoU']:.2f}" for e in m["evals"][:2]) + f" | {log[-1]['decode.loss_seg']:.4f} |")
text = ("# `hrda train` with the step recorded as a CUDA graph\n\nThe synthetic benchmark (40 source, 40 target, 12 val "
        "images, `make_synth.py --n-source 40 --n-target 40 --n-val 12`), `experiments/synth_hrda.yaml` with "
        "`precision=bf16 iters=200 eval_every=100`, written by `bash benchmarks/gpu_checks.sh`.\n\n" + "\n".join(rows) + "\n")
dest.write_text(text)
print(text)
PY
rm -rf "$TMP"
