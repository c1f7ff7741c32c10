#!/usr/bin/env python
"""Operators and host reads of one HRDA self-training iteration, counted at the dispatcher on the CPU.

Every ATen operator that `hrda.dacs.dacs_step` dispatches (forward, backward, optimiser, EMA) is counted, and so is
every read of a tensor value back to the host (`aten::_local_scalar_dense`: `.item()`, `bool(tensor)`, `int(tensor)`;
and `.tolist()`, which bypasses the dispatcher and is counted by wrapping it), which on a GPU is a synchronisation. Operators whose output shape depends on the data (`nonzero`,
`unique`, `masked_select`, boolean indexing) are listed too: they also synchronise and defeat CUDA graphs. The
structure is the paper's (MiT-B5, batch 2 + 2, feature distance, HR slide pseudo-labels, ClassMix); only the crops are
scaled down (`--crop`), so the count is the GPU run's and needs no GPU.

With `--step-mode replay` the iteration runs as `hrda.replay.ReplayStep`: its draws are made first on the host (from
the CPU generator: reads of CPU tensors, no device wait), and the step a CUDA graph would capture is counted apart.

Usage: python benchmarks/count_ops.py [--crop 256] [--precision bf16] [--step-mode replay] [--set KEY=VALUE ...] [--top 15]
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train_step import make_step  # noqa: E402
from hrda.config import TrainConfig, load_config  # noqa: E402

HOST_READS = {"aten._local_scalar_dense.default"}
DATA_DEPENDENT = {"aten.nonzero.default", "aten._unique2.default", "aten.unique_dim.default", "aten.masked_select.default",
                  "aten.unique_consecutive.default", "aten.index.Tensor_bool"}


def where_in_hrda() -> str:
    "The innermost frame of hrda/ code on the stack, as 'file:line'."
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/hrda/" in frame.filename: return f"{Path(frame.filename).name}:{frame.lineno}"
    return "(torch: backward or optimiser)"


class OpCounter(TorchDispatchMode):
    "Counts every dispatched operator, and the host reads and data-dependent shapes by the line of hrda code."
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()
        self.dynamic: collections.Counter = collections.Counter()
        self.section, self.in_section = None, collections.Counter()  # what a replayed step's device part dispatched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] += 1
        if self.section: self.in_section["operators"] += 1
        if name in HOST_READS:
            self.reads[where_in_hrda()] += 1
            if self.section: self.in_section["host reads"] += 1
        if name in DATA_DEPENDENT or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])):
            self.dynamic[f"{name} at {where_in_hrda()}"] += 1
            if self.section: self.in_section["data-dependent shapes"] += 1
        return func(*args, **(kwargs or {}))


def count(cfg: TrainConfig, t: int = 2, precision: str = "fp32", step_mode: str = "eager") -> OpCounter:
    "The counts of iteration `t` (after t regular ones: the first copies the teacher)."
    step, _ = make_step(cfg, torch.device("cpu"), precision, step_mode=step_mode)
    for i in range(t): step(i)
    counter = OpCounter()
    tolist = torch.Tensor.tolist  # reads a whole tensor back without passing the dispatcher: counted here

    def counted_tolist(self):
        counter.reads[where_in_hrda() + " (tolist)"] += 1
        if counter.section: counter.in_section["host reads"] += 1
        return tolist(self)
    if step_mode != "eager":  # the device part alone: what a CUDA graph records
        replay, run = step.replay, step.replay._run

        def counted_run():
            counter.section = "step"
            try: return run()
            finally: counter.section = None
        replay._run = counted_run
    torch.Tensor.tolist = counted_tolist
    try:
        with counter: step(t)
    finally: torch.Tensor.tolist = tolist
    return counter


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crop", type=int, default=256, help="context crop side (the paper's 1024, scaled for the CPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (default: the paper's)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: under autocast, as on a GPU (its casts are counted too)")
    p.add_argument("--step-mode", default="eager", choices=["eager", "replay"],
                   help="replay: draws made first, and the device part (what a CUDA graph records) counted apart")
    p.add_argument("--top", type=int, default=15, help="list this many of the most frequent operators and host reads")
    args = p.parse_args(argv)
    c = args.crop
    cfg = load_config(TrainConfig, overrides=["pretrained=null", f"crop_size=[{c},{c}]", f"hr_crop_size=[{c // 2},{c // 2}]",
                                              *args.set])
    counter = count(cfg, precision=args.precision, step_mode=args.step_mode)
    total, reads = sum(counter.ops.values()), sum(counter.reads.values())
    print(f"one iteration ({cfg.backbone}, crop {c}, hr crop {c // 2}, fd_lambda {cfg.fd_lambda}, mic_lambda {cfg.mic_lambda}, "
          f"{args.precision}, {args.step_mode} step): "
          f"{total} operators, {reads} host reads, {sum(counter.dynamic.values())} data-dependent shapes")
    if args.step_mode != "eager":
        inside = counter.in_section
        print(f"of which in the device step (what a CUDA graph records): {inside['operators']} operators, "
              f"{inside['host reads']} host reads, {inside['data-dependent shapes']} data-dependent shapes")
    print("\nmost frequent operators:")
    for name, n in counter.ops.most_common(args.top): print(f"{n:7d}  {name}")
    print("\nhost reads by line:")
    for where, n in counter.reads.most_common(args.top): print(f"{n:7d}  {where}")
    print("\ndata-dependent shapes:")
    for where, n in counter.dynamic.most_common(args.top): print(f"{n:7d}  {where}")
    return {"operators": total, "host_reads": reads, "data_dependent": sum(counter.dynamic.values()),
            **({"step": dict(counter.in_section)} if args.step_mode != "eager" else {})}


if __name__ == "__main__":
    main()
