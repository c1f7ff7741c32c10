#!/usr/bin/env python
"""Where one HRDA self-training iteration makes the host wait for the GPU: every synchronising CUDA call of
`hrda.dacs.dacs_step`, counted by the line of this repository's code that made it. Needs a CUDA device.

Usage: python benchmarks/find_syncs.py [--precision bf16] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train_step import make_step  # noqa: E402
from hrda.config import TrainConfig, load_config  # noqa: E402


def our_frame(stack: list[traceback.FrameSummary]) -> str:
    "The innermost frame of hrda/ code in `stack`, as 'file:line  code'."
    for frame in reversed(stack):
        if "/hrda/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}  {frame.line}"
    return "(outside hrda)"


def main(argv: list[str] | None = None) -> collections.Counter:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="bf16")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (default: the paper's)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available(): raise SystemExit("find_syncs needs a CUDA device")
    cfg = load_config(TrainConfig, overrides=["pretrained=null", *args.set])
    step, _ = make_step(cfg, torch.device("cuda"), args.precision)
    step(0); step(1)  # the first iteration copies the teacher; count a regular one
    torch.cuda.synchronize()
    counts: collections.Counter = collections.Counter()
    with warnings.catch_warnings():  # the sync debug mode reports each synchronising call as a warning
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: counts.update([our_frame(traceback.extract_stack()[:-1])])
        torch.cuda.set_sync_debug_mode("warn")
        try: step(2)
        finally: torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(counts.values())} synchronising calls in one iteration:")
    for where, n in counts.most_common():
        print(f"{n:5d}  {where}")
    return counts


if __name__ == "__main__":
    main()
